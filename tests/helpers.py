"""Shared by the tests: repository paths, configs built through the schema, tiny data
artifacts and tiny trained models, a dry-run parser, and kill-and-rerun helpers."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

from notbugs import data, hdf5, train
from notbugs.config import complete

REPO = Path(__file__).resolve().parents[1]
SNAKEFILE = REPO / "Snakefile"
DEFAULT_CONFIG = REPO / "config.yaml"
SCHEMA = REPO / "workflow/schemas/config.schema.yaml"
SNAKEMAKE = str(Path(sys.executable).with_name("snakemake"))


def train_config(**overrides) -> dict:
    """A full training section (schema defaults) for tiny test models: 3 epochs, batch 64."""
    return complete("targets.train", {"epochs": 3, "batch_size": 64, **overrides})


def construction_config(**settings) -> dict:
    return complete("constructions.test", settings)


def fast_paths(**overrides) -> dict:
    return complete("fast_paths", overrides)


def synthetic_spec(**overrides) -> data.SyntheticSpec:
    return data.SyntheticSpec(**complete("dataset.synthetic", overrides))


def make_data_artifact(path: Path, n_train: int = 600, n_test: int = 200, seed: int = 0) -> Path:
    cfg = complete("dataset", {"name": "tiny", "source": "synthetic", "n_train": n_train, "n_test": n_test})
    return data.prepare(cfg, seed, path)


def train_tiny_model(data_path: Path, out_dir: Path, epochs: int = 3, seed: int = 0, **train_overrides) -> Path:
    images, labels = hdf5.load_split(data_path, "train")
    with hdf5.open_artifact(data_path) as art:
        mean, std = art.attrs["mean"], art.attrs["std"]
    train.train(images, labels, arch="small_cnn", num_classes=10, mean=mean, std=std,
                cfg=train_config(epochs=epochs, **train_overrides), seed=seed, out_dir=out_dir,
                device=torch.device("cpu"))
    return out_dir / "model.pt"


# A tiny ImageNet-like tree (tests of the restricted_imagenet source and its preset). ImageNet-1k
# indices: both ends of several Restricted ImageNet ranges and at least one index in each of the 9 ...
KEPT = (151, 268, 281, 30, 32, 33, 80, 100, 365, 397, 118, 121, 300, 319)
# ... and classes outside every range, which must be dropped (29/150/269: just outside a range)
DROPPED = (0, 29, 150, 269, 999)
JPEG_MODES = ("RGB", "L", "CMYK", "RGB")  # ImageNet has greyscale and CMYK JPEGs
JPEG_SIZES = ((40, 48), (48, 40))        # (width, height): portrait and landscape


def make_imagenet_tree(root: Path, indices=KEPT + DROPPED, per_wnid=None, seed: int = 0,
                       tint: bool = False) -> dict[str, tuple[str, int]]:
    """root/{train,val}/<wnid>/*.JPEG with real wnid folder names (ImageNet-1k ``indices``) and
    ``per_wnid`` small JPEGs per wnid and folder; with ``tint`` each image is noise around a colour
    of its super-class, so that models can learn something. Returns {file path: (folder, index)}."""
    from PIL import Image

    from notbugs.data import imagenet_wnids, restricted_imagenet_label

    per_wnid = per_wnid or {"train": 4, "val": 2}
    wnids = imagenet_wnids()
    rng = np.random.default_rng(seed)
    colours = np.random.default_rng(1234).integers(40, 216, (9, 3))
    files = {}
    for folder, n in per_wnid.items():
        for index in indices:
            d = Path(root) / folder / wnids[index]
            d.mkdir(parents=True)
            for i in range(n):
                path = d / f"{wnids[index]}_{i}.JPEG"
                width, height = JPEG_SIZES[(i + index) % 2]
                pixels = rng.integers(0, 256, (height, width, 3))
                label = restricted_imagenet_label(index)
                if tint and label >= 0:
                    pixels = colours[label] + (pixels - 128) // 4
                image = Image.fromarray(pixels.clip(0, 255).astype(np.uint8))
                image.convert(JPEG_MODES[i % len(JPEG_MODES)]).save(path, "JPEG", quality=90)
                files[str(path)] = (folder, index)
    return files


def copy_finished_run(finished: Path, workdir: Path) -> None:
    """A finished run's results, logs, benchmarks and Snakemake's provenance records, copied into
    ``workdir`` with their modification times, so that Snakemake there reruns only what the copy
    lacks or what its rerun triggers (code, params, inputs) find stale."""
    import shutil
    for part in ("results", "logs", "benchmarks", ".snakemake/metadata"):
        if (Path(finished) / part).exists():
            shutil.copytree(Path(finished) / part, Path(workdir) / part, symlinks=True)


def parse_dry_run(text: str) -> list[dict]:
    """One dict per job that ``snakemake -n`` planned: ``rule``, first ``output``, ``resources``,
    ``threads`` (Snakemake prints them only above 1)."""
    jobs = []
    for block in re.split(r"\n(?=(?:local)?rule \w+:)", text):
        head = re.match(r"(?:local)?rule (\w+):", block)
        if not head or head.group(1) == "all":
            continue
        output = re.search(r"^\s+output: ([^,\n]+)", block, re.M)
        res_line = re.search(r"^\s+resources: (.*)$", block, re.M)
        resources = dict(item.split("=", 1) for item in res_line.group(1).split(", ")) if res_line else {}
        threads = re.search(r"^\s+threads: (\d+)", block, re.M)
        jobs.append({"rule": head.group(1), "output": output.group(1).strip() if output else "",
                     "resources": resources, "threads": int(threads.group(1)) if threads else 1})
    return jobs


def run_and_kill(code: str, trigger: str, timeout: float = 120) -> None:
    """Run ``code`` in a fresh Python and SIGKILL it as soon as a line containing ``trigger``
    appears on its output. Fails if the process finishes before that."""
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, env=env)
    deadline = time.time() + timeout
    seen = []
    for line in proc.stdout:
        seen.append(line)
        if trigger in line:
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            return
        if time.time() > deadline:
            break
    proc.kill()
    proc.wait()
    raise AssertionError(f"never saw {trigger!r} before the process ended:\n{''.join(seen[-20:])}")


def run_python(code: str) -> None:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    subprocess.run([sys.executable, "-c", code], check=True, env=env)


def tables_equal(a: np.ndarray, b: np.ndarray) -> bool:
    return a.shape == b.shape and a.dtype == b.dtype and np.array_equal(a, b, equal_nan=True)
