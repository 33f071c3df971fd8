"""Training at scale: streamed from HDF5 with bounded memory, and with several processes
(DistributedDataParallel under torchrun, gloo on CPU). Both keep the exact resume of training."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import h5py
import numpy as np
import pandas as pd
import pytest
import torch

from helpers import REPO, make_data_artifact, train_config
from notbugs import bench, hdf5
from notbugs.batches import predict
from notbugs.config import complete
from notbugs.models import load_model
from notbugs.train import StreamedRows, job_spec, launch_distributed, run_job, windowed_order


def test_windowed_order_visits_every_row_once_in_windows_of_whole_blocks():
    n, block, window_blocks = 1000, 64, 3
    order, windows = windowed_order(n, block, window_blocks, torch.Generator().manual_seed(0))
    assert sorted(order.tolist()) == list(range(n))
    windows = windows[0]
    assert sorted(b for window in windows for b in window) == list(range(16))  # the last block has 40 rows
    lo = 0
    for window in windows:
        assert len(window) <= window_blocks
        size = sum(min(n, (b + 1) * block) - b * block for b in window)
        rows = order[lo:lo + size]
        assert sorted(rows.tolist()) == [r for b in window for r in range(b * block, min(n, (b + 1) * block))]
        lo += size
    assert order[:block].tolist() != list(range(block)), "rows are shuffled within a window"


def test_each_rank_reads_its_own_blocks_and_the_ranks_share_every_batch():
    n, block, window_blocks, batch, ranks = 1000, 32, 2, 48, 3
    order, windows = windowed_order(n, block, window_blocks, torch.Generator().manual_seed(1),
                                    batch_size=batch, ranks=ranks)
    blocks_of = [{b for window in windows[r] for b in window} for r in range(ranks)]
    assert set.union(*blocks_of) == set(range(32)) and sum(map(len, blocks_of)) == 32  # disjoint
    assert len(order) % batch == 0 and len(set(order.tolist())) == len(order)
    # an epoch leaves over what the ranks' streams differ by (a block each) and each one's last partial slice
    assert len(order) > n - ranks * (block + batch // ranks)
    for lo in range(0, len(order), batch):
        for rank, share in enumerate(order[lo:lo + batch].tensor_split(ranks)):
            assert set((share // block).tolist()) <= blocks_of[rank]
    single, _ = windowed_order(n, block, window_blocks, torch.Generator().manual_seed(1), batch_size=batch)
    assert sorted(single.tolist()) == list(range(n))


class _CountingDataset:
    """An array that records which row slices were read, shaped like an h5py dataset."""

    def __init__(self, array: np.ndarray, chunk_rows: int):
        self.array, self.chunks, self.reads = array, (chunk_rows,) + array.shape[1:], []
        self.shape, self.dtype = array.shape, array.dtype

    def __len__(self):
        return len(self.array)

    def __getitem__(self, key):
        self.reads.append((key.start, key.stop))
        return self.array[key]


@pytest.mark.parametrize("rank, ranks", [(0, 1), (1, 2)])
def test_streamed_rows_read_whole_chunks_once_and_hold_at_most_two_windows(rank, ranks):
    n, chunk, window_rows, batch = 1010, 50, 200, 64  # the last chunk has 10 rows
    images = np.random.default_rng(0).integers(0, 255, (n, 3, 4, 4), dtype=np.uint8)
    dataset = _CountingDataset(images, chunk)
    rows = StreamedRows(dataset, window_rows, torch.device("cpu"), batch_size=batch, rank=rank, ranks=ranks)
    order, _ = rows.epoch_order(seed=3, epoch=0)
    most_held = 0
    for lo in range(0, len(order), batch):
        idx = order[lo:lo + batch].tensor_split(ranks)[rank]
        assert np.array_equal(rows.read(idx).numpy(), images[idx.numpy()])
        most_held = max(most_held, len(rows.cache))
    assert most_held <= 2 * window_rows // chunk
    assert all(start % chunk == 0 and stop == min(n, start + chunk) for start, stop in dataset.reads), "whole chunks"
    starts = [start for start, _ in dataset.reads]
    assert len(starts) == len(set(starts)), "every chunk is read at most once an epoch"
    assert len(starts) == len(rows.window_index), "this rank reads its own chunks, all of them"
    if ranks == 1:
        assert len(starts) == -(-n // chunk)


def _stream_code(data_path: Path, out_dir: Path, epochs: int) -> str:
    return textwrap.dedent(f"""
        import logging, sys, torch
        torch.set_num_threads(1)
        logging.basicConfig(level=logging.INFO, stream=sys.stdout)
        sys.path.insert(0, {str(REPO / 'tests')!r})
        from helpers import train_config
        from notbugs.config import complete
        from notbugs.train import job_spec, run_job
        cfg = train_config(epochs={epochs}, loader="stream", shuffle_window=128)
        job = job_spec(rule="test", data={str(data_path)!r}, train_set={str(data_path)!r}, arch="small_cnn",
                       train_cfg=cfg, seeds=[0], out_dirs=[{str(out_dir)!r}], validation=complete("validation"),
                       device="cpu", threads=1)
        run_job(job, torch.device("cpu"))
    """)


@pytest.mark.slow
def test_streamed_training_resumes_after_sigkill_with_identical_result(tmp_path):
    from helpers import run_and_kill, run_python
    data_path = make_data_artifact(tmp_path / "data.h5", n_train=600, n_test=100)
    run_python(_stream_code(data_path, tmp_path / "straight", 4))
    killed = tmp_path / "killed"
    run_and_kill(_stream_code(data_path, killed, 4), trigger="epoch 2/4")
    assert not (killed / "model.pt").exists()
    run_python(_stream_code(data_path, killed, 4))
    _assert_same_model(tmp_path / "straight", killed)


def _assert_same_model(a_dir: Path, b_dir: Path) -> None:
    a = torch.load(a_dir / "model.pt", weights_only=True)["state_dict"]
    b = torch.load(b_dir / "model.pt", weights_only=True)["state_dict"]
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    log_a = pd.read_csv(a_dir / "train_log.csv").drop(columns="seconds")
    log_b = pd.read_csv(b_dir / "train_log.csv").drop(columns="seconds")
    pd.testing.assert_frame_equal(log_a, log_b)


@pytest.mark.slow
def test_streamed_training_memory_does_not_grow_with_the_training_set(tmp_path):
    """The benchmark of `notbugs bench --memory`, small: peak RSS of a training job over N and 4N
    images. In memory it grows by the images; streamed it must not."""
    n = 3000
    peaks = bench.peak_rss(n, tmp_path, jobs=("training, loader stream", "training, loader memory"))
    image_growth = 3 * n * 3 * 32 * 32 * 4 / 2 ** 20  # MiB of float32 images added from N to 4N
    streamed, in_memory = peaks["training, loader stream"], peaks["training, loader memory"]
    assert in_memory[4 * n] - in_memory[n] > 0.75 * image_growth, "the measurement sees the images"
    assert streamed[4 * n] - streamed[n] < 0.25 * image_growth
    assert streamed[4 * n] / streamed[n] < 1.2


# --------------------------------------------------------------------------- several processes


def _job(data_path: Path, out_dir: Path, processes: int, seed: int = 0, arch: str = "small_cnn", **train) -> dict:
    return job_spec(rule="test", data=data_path, train_set=data_path, arch=arch,
                    train_cfg=train_config(processes=processes, **train), seeds=[seed], out_dirs=[out_dir],
                    validation=complete("validation"), device="cpu", threads=processes)


def _train(job: dict, log: Path) -> None:
    if job["train"]["processes"] > 1:
        launch_distributed(job, log)
    else:
        torch.set_num_threads(1)
        run_job(job, torch.device("cpu"))


def _weights(out_dir: Path) -> dict[str, torch.Tensor]:
    return torch.load(out_dir / "model.pt", weights_only=True)["state_dict"]


@pytest.mark.slow
def test_two_processes_take_the_same_steps_as_one(tmp_path):
    """Without BatchNorm (mlp) and augmentation, two ranks each stepping on half of every batch
    with averaged gradients are one process stepping on the whole batch, up to float rounding."""
    data_path = make_data_artifact(tmp_path / "data.h5", n_train=640, n_test=100)
    for processes in (1, 2):
        _train(_job(data_path, tmp_path / f"p{processes}", processes, arch="mlp", epochs=2), tmp_path / "log")
    one, two = _weights(tmp_path / "p1"), _weights(tmp_path / "p2")
    for key in one:
        assert torch.allclose(one[key], two[key], atol=1e-5, rtol=1e-4), key
    assert any(not torch.equal(one[k], _initial[k]) for _initial in [_initial_weights("mlp")] for k in one)
    log = pd.read_csv(tmp_path / "p2" / "train_log.csv")
    assert list(log["epoch"]) == [1, 2]
    assert not list(tmp_path.glob(".*distributed-job.json")), "the launch removes its job file"


def _initial_weights(arch: str) -> dict[str, torch.Tensor]:
    from notbugs.train import initial_model
    return initial_model(arch, 10, [0.5] * 3, [0.25] * 3, seed=0).state_dict()


@pytest.mark.slow
def test_two_process_training_is_as_accurate_as_one_within_seed_noise(tmp_path):
    """With BatchNorm (small_cnn) the ranks normalise over their own half batch, so runs differ;
    their test accuracy over three seeds must agree within the seed-to-seed spread."""
    data_path = make_data_artifact(tmp_path / "data.h5", n_train=2000, n_test=500)
    images, labels = hdf5.load_split(data_path, "test")
    accuracy = {}
    for processes in (1, 2):
        accuracy[processes] = []
        for seed in (0, 1, 2):
            out = tmp_path / f"p{processes}s{seed}"
            _train(_job(data_path, out, processes, seed=seed, epochs=6), tmp_path / "log")
            model, _ = load_model(out / "model.pt")
            accuracy[processes].append(float((predict(model, images, 500) == labels).mean()))
    one, two = np.array(accuracy[1]), np.array(accuracy[2])
    spread = np.sqrt(one.var(ddof=1) / 3 + two.var(ddof=1) / 3)
    assert one.mean() > 0.5 and two.mean() > 0.5, accuracy  # chance is 0.1
    assert abs(one.mean() - two.mean()) < 3 * spread, accuracy


_LAUNCH = """
import sys, json, logging
logging.basicConfig(level=logging.INFO, stream=sys.stdout)
from notbugs.train import launch_distributed
launch_distributed(json.loads(sys.argv[1]), sys.argv[2])
"""


def _rank_processes(marker: str) -> list[int]:
    out = subprocess.run(["pgrep", "-f", marker], capture_output=True, text=True).stdout
    return [int(pid) for pid in out.split()]


@pytest.mark.slow
def test_two_process_training_resumes_after_sigkill_with_identical_result(tmp_path):
    import json
    data_path = make_data_artifact(tmp_path / "data.h5", n_train=1200, n_test=100)
    epochs = 5
    streamed = dict(loader="stream", shuffle_window=256)  # each process reads its own chunks of the file
    _train(_job(data_path, tmp_path / "straight", 2, epochs=epochs, **streamed), tmp_path / "straight.log")

    killed = tmp_path / "killed"
    job = _job(data_path, killed, 2, epochs=epochs, **streamed)
    log = tmp_path / "killed.log"
    launcher = subprocess.Popen([sys.executable, "-c", _LAUNCH, json.dumps(job), str(log)])
    resume_state = killed / "checkpoints" / "last.pt"
    deadline = time.time() + 120
    while time.time() < deadline and launcher.poll() is None:
        if resume_state.exists() and torch.load(resume_state, weights_only=False)["epoch"] >= 2:
            break
        time.sleep(0.05)
    assert launcher.poll() is None, "training finished before it could be killed"
    launcher.send_signal(signal.SIGKILL)  # the job's own process; its torchrun and ranks must follow
    launcher.wait()
    marker = f".{killed.name}.distributed-job.json"
    deadline = time.time() + 30
    while _rank_processes(marker) and time.time() < deadline:
        time.sleep(0.2)
    assert not _rank_processes(marker), "the ranks outlived the killed job"
    done = torch.load(resume_state, weights_only=False)["epoch"]
    assert 2 <= done < epochs and not (killed / "model.pt").exists()

    _train(job, log)
    assert f"resuming from {resume_state} after epoch" in log.read_text()
    _assert_same_model(tmp_path / "straight", killed)
    assert not (killed / "checkpoints").exists()


def test_a_source_with_use_extra_train_learns_from_the_extra_images(tmp_path):
    # The train split holds classes 0 and 1 only, the extra_train split class 2 only (each class
    # a flat colour): only a model that saw the extra images can predict class 2.
    rng = np.random.default_rng(0)
    colours = np.array([[200, 30, 30], [30, 200, 30], [30, 30, 200]], dtype=np.uint8)

    def flat(labels):
        noise = rng.integers(0, 20, (len(labels), 3, 32, 32), dtype=np.uint8)
        return colours[labels][:, :, None, None] + noise, labels

    train_images, train_labels = flat(np.arange(120) % 2)
    extra_images, extra_labels = flat(np.full(60, 2))
    test_images, test_labels = flat(np.arange(30) % 3)
    data_path = hdf5.write_artifact(
        tmp_path / "data.h5", kind="data", class_names=["r", "g", "b"], config={}, seed=0, source="test",
        splits={"train": {"images": train_images, "labels": train_labels},
                "extra_train": {"images": extra_images, "labels": extra_labels},
                "test": {"images": test_images, "labels": test_labels}},
        extra_attrs={"mean": [0.5] * 3, "std": [0.3] * 3})
    predicted = {}
    for use_extra in (False, True):
        out_dir = tmp_path / f"extra_{use_extra}"
        job = _job(data_path, out_dir, processes=1, epochs=4, batch_size=30)
        job["use_extra_train"] = use_extra
        _train(job, tmp_path / "log.txt")
        model, meta = load_model(out_dir / "model.pt")
        predicted[use_extra] = predict(model, extra_images, batch_size=60)
        provenance = meta["config"]
        assert provenance.get("extra_train_rows") == (60 if use_extra else None)
    assert not (predicted[False] == 2).any()
    assert (predicted[True] == 2).mean() > 0.9
