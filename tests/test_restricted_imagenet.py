"""Stage 1 source ``restricted_imagenet``: the super-class ranges, reading a tiny ImageNet-like
tree (real wnid folder names, some outside every range), the streamed data artifact, and the
errors bad trees give."""

from __future__ import annotations

import shutil
import sys

import numpy as np
import torch
import pytest
from PIL import Image

from helpers import DROPPED, KEPT, make_imagenet_tree
from notbugs import data, hdf5
from notbugs.config import RESTRICTED_IMAGENET_CLASSES, ConfigError, check_dataset, complete, natural_classes
from notbugs.data import (RESTRICTED_IMAGENET_CLASSES as NAMES, RESTRICTED_IMAGENET_RANGES, DataSourceError,
                          channel_stats, imagenet_wnids, load_imagenet_image, prepare,
                          restricted_imagenet_labels)
from notbugs.runtime import partial_path

PER_WNID = {"train": 4, "val": 2}
RESOLUTION, RESIZE = 16, 20


def _expected_superclass(index: int) -> int:
    """Straight from the documented inclusive ranges."""
    hits = [c for c, (_, first, last) in enumerate(RESTRICTED_IMAGENET_RANGES) if first <= index <= last]
    assert len(hits) <= 1
    return hits[0] if hits else -1


def make_tree(root, indices=KEPT + DROPPED, per_wnid=None, seed=0) -> dict[str, tuple[str, int]]:
    return make_imagenet_tree(root, indices, per_wnid or PER_WNID, seed)


def _cfg(root, **overrides) -> dict:
    settings = {"resolution": RESOLUTION, "resize": RESIZE}
    cfg = {"name": "rin", "source": "restricted_imagenet", "root": str(root), "n_train": None, "n_test": None,
           "n_val": 0, "restricted_imagenet": settings}
    cfg.update(overrides)
    return cfg


@pytest.fixture(scope="module")
def tree(tmp_path_factory):
    root = tmp_path_factory.mktemp("imagenet")
    return root, make_tree(root)


@pytest.fixture(scope="module")
def decoded(tree):
    """Every file of the tree decoded as the stage decodes it."""
    _, files = tree
    return {path: load_imagenet_image(path, RESOLUTION, RESIZE) for path in files}


# 5 rows of 3×16×16 uint8 per HDF5 chunk, so the tiny splits stream in several blocks as large
# images do (the real limit keeps 256 rows of such small images in one chunk)
SMALL_CHUNKS = 5 * 3 * RESOLUTION * RESOLUTION


@pytest.fixture(scope="module")
def prepared(tree, tmp_path_factory):
    root, _ = tree
    out = tmp_path_factory.mktemp("out") / "results" / "rin" / "data.h5"
    cfg = _cfg(root, n_val=9)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(hdf5, "CHUNK_BYTES", SMALL_CHUNKS)
        return prepare(cfg, seed=3, output=out), cfg


def _copy(tree, tmp_path):
    root, _ = tree
    shutil.copytree(root, tmp_path / "tree")
    return tmp_path / "tree"


def _rows_to_files(images, index, files, decoded, folder):
    """The file each stored row came from (its pixels equal that file's decoding, same wnid)."""
    out = []
    for img, idx in zip(images, index):
        hits = [p for p, (f, i) in files.items() if f == folder and i == idx and np.array_equal(decoded[p], img)]
        assert len(hits) == 1, f"row does not match exactly one {folder} file of ImageNet class {idx}"
        out.append(hits[0])
    return out


# --------------------------------------------------------------------------- the ranges

def test_superclass_mapping_matches_the_documented_ranges():
    table = restricted_imagenet_labels()
    assert table.shape == (1000,) and table.dtype == np.int64
    np.testing.assert_array_equal(table, [_expected_superclass(i) for i in range(1000)])
    counts = dict(zip(NAMES, np.bincount(table[table >= 0], minlength=9).tolist()))
    sizes = {name: last - first + 1 for name, first, last in RESTRICTED_IMAGENET_RANGES}
    assert counts == sizes
    assert counts == {"dog": 118, "cat": 5, "frog": 3, "turtle": 5, "bird": 21, "primate": 18, "fish": 9,
                      "crab": 4, "insect": 20}
    assert (table >= 0).sum() == 203
    assert NAMES == ["dog", "cat", "frog", "turtle", "bird", "primate", "fish", "crab", "insect"]
    for index in KEPT:
        assert table[index] >= 0
    for index in DROPPED:
        assert table[index] == -1
    assert sorted({int(table[i]) for i in KEPT}) == list(range(9))  # the tiny tree covers every super-class
    # config.py knows the class count without importing data (and torch)
    assert RESTRICTED_IMAGENET_CLASSES == len(RESTRICTED_IMAGENET_RANGES)


def test_wnids_come_from_timm_sorted():
    wnids = imagenet_wnids()
    assert len(wnids) == 1000 and wnids == sorted(wnids) and len(set(wnids)) == 1000
    assert wnids[0] == "n01440764" and wnids[151] == "n02085620"  # tench; Chihuahua, the first dog


def test_missing_timm_says_how_to_install_it(monkeypatch):
    monkeypatch.setitem(sys.modules, "timm.data", None)  # makes `from timm.data import ...` fail
    with pytest.raises(DataSourceError, match=r"timm.*pip install -e \."):
        imagenet_wnids()


# --------------------------------------------------------------------------- decoding

def test_decoding_is_the_standard_resize_and_centre_crop(tree):
    from torchvision import transforms
    _, files = tree
    transform = transforms.Compose([transforms.Resize(RESIZE), transforms.CenterCrop(RESOLUTION)])
    modes = set()
    for path in list(files)[:8]:
        with Image.open(path) as img:
            modes.add(img.mode)
            expected = np.asarray(transform(img.convert("RGB"))).transpose(2, 0, 1)
        got = load_imagenet_image(path, RESOLUTION, RESIZE)
        assert got.shape == (3, RESOLUTION, RESOLUTION) and got.dtype == np.uint8
        np.testing.assert_array_equal(got, expected)
    assert {"L", "CMYK", "RGB"} <= modes


# --------------------------------------------------------------------------- prepare

def test_prepare_writes_a_valid_data_artifact(tree, decoded, prepared):
    root, files = tree
    out, cfg = prepared
    assert not partial_path(out).exists()
    table = restricted_imagenet_labels()
    with hdf5.open_artifact(out, kind="data") as art:
        assert art.splits == ["test", "train", "val"]
        assert art.class_names == NAMES
        used = {}
        for split, folder in (("train", "train"), ("val", "train"), ("test", "val")):
            s = art.split(split)
            images, labels, index = s.images[:], s.labels, s["imagenet_index"][:]
            assert images.dtype == np.uint8 and images.shape == (len(s), 3, RESOLUTION, RESOLUTION)
            assert index.dtype == np.int64 and s.columns == ["imagenet_index", "images", "labels"]
            assert s.images.chunks == (min(5, len(s)), 3, RESOLUTION, RESOLUTION)
            # labels: the super-class of each row's ImageNet class; dropped classes absent
            np.testing.assert_array_equal(labels, table[index])
            assert set(index.tolist()) <= set(KEPT) and not set(index.tolist()) & set(DROPPED)
            # every row is the decoding of one file of that very class (so the column is right)
            used[split] = _rows_to_files(images, index, files, decoded, folder)
            assert len(set(used[split])) == len(s)
        # val: one image per super-class, held out of train; together they are the whole train tree
        np.testing.assert_array_equal(np.bincount(art.split("val").labels, minlength=9), np.ones(9))
        assert not set(used["train"]) & set(used["val"])
        kept_train = {p for p, (f, i) in files.items() if f == "train" and i in KEPT}
        assert set(used["train"]) | set(used["val"]) == kept_train
        assert set(used["test"]) == {p for p, (f, i) in files.items() if f == "val" and i in KEPT}
        assert len(art.split("test")) == PER_WNID["val"] * len(KEPT)
        # train rows are shuffled once (a streamed epoch shuffles whole chunks), test keeps the tree's order
        assert used["train"] != sorted(used["train"]) and used["test"] == sorted(used["test"])
        attrs = art.attrs
        train_images = art.split("train").images[:]
        mean, std = channel_stats(train_images)
        np.testing.assert_allclose(attrs["mean"], mean, rtol=1e-5)
        np.testing.assert_allclose(attrs["std"], std, rtol=1e-5)
        x = train_images.astype(np.float64) / 255
        np.testing.assert_allclose(attrs["mean"], x.mean(axis=(0, 2, 3)), rtol=1e-12)
        np.testing.assert_allclose(attrs["std"], x.std(axis=(0, 2, 3)), rtol=1e-12)
        assert attrs["superclass_ranges"]["dog"] == [151, 268] and len(attrs["superclass_ranges"]) == 9
        assert "Restricted ImageNet" in attrs["source"] and str(root.resolve()) in attrs["source"]
        assert art.config == cfg and attrs["seed"] == 3


def test_subsets_are_class_balanced_and_seeded(tree, tmp_path, monkeypatch):
    root, _ = tree
    monkeypatch.setattr(hdf5, "CHUNK_BYTES", SMALL_CHUNKS)  # several blocks per split
    cfg = _cfg(root, n_train=18, n_test=9, n_val=9)
    a = prepare(cfg, seed=0, output=tmp_path / "a.h5")
    b = prepare(cfg, seed=0, output=tmp_path / "b.h5", workers=2)  # decoded in two processes
    c = prepare(cfg, seed=1, output=tmp_path / "c.h5")
    with hdf5.open_artifact(a, "data") as fa, hdf5.open_artifact(b, "data") as fb, hdf5.open_artifact(c, "data") as fc:
        for split, n in (("train", 18), ("test", 9), ("val", 9)):
            labels = fa.split(split).labels
            np.testing.assert_array_equal(np.bincount(labels, minlength=9), np.full(9, n // 9))
            for column in ("images", "labels", "imagenet_index"):
                np.testing.assert_array_equal(fa.split(split)[column][:], fb.split(split)[column][:])
        np.testing.assert_array_equal(fa.attrs["mean"], fb.attrs["mean"])
        assert not np.array_equal(fa.split("train").images[:], fc.split("train").images[:])  # another seed, another draw


def test_asking_for_more_images_than_a_superclass_has(tree, tmp_path):
    root, _ = tree
    # 5 per super-class, but cat (one wnid here) has 4 training images
    with pytest.raises(DataSourceError, match="cat 4") as info:
        prepare(_cfg(root, n_train=45), seed=0, output=tmp_path / "data.h5")
    assert "fewer than 5" in str(info.value) and "train split" in str(info.value)
    with pytest.raises(DataSourceError, match="test split"):
        prepare(_cfg(root, n_test=27), seed=0, output=tmp_path / "data.h5")
    assert not (tmp_path / "data.h5").exists() and not partial_path(tmp_path / "data.h5").exists()


# --------------------------------------------------------------------------- bad input

@pytest.mark.parametrize("folder", ["train", "val"])
def test_missing_split_folder(tree, tmp_path, folder):
    root = _copy(tree, tmp_path)
    shutil.rmtree(root / folder)
    with pytest.raises(DataSourceError) as info:
        prepare(_cfg(root), seed=0, output=tmp_path / "data.h5")
    message = str(info.value)
    assert str(root / folder) in message and "does not exist" in message
    assert "train/<wnid>/*.JPEG" in message and "val/<wnid>/*.JPEG" in message
    assert not (tmp_path / "data.h5").exists()


@pytest.mark.parametrize("folder", ["train", "val"])
def test_folder_that_is_not_a_wnid(tree, tmp_path, folder):
    root = _copy(tree, tmp_path)
    (root / folder / "golden_retriever").mkdir()
    with pytest.raises(DataSourceError, match="not ImageNet-1k wnids: 'golden_retriever'") as info:
        prepare(_cfg(root), seed=0, output=tmp_path / "data.h5")
    assert str(root / folder) in str(info.value)


def test_flat_validation_folder(tree, tmp_path):
    root = _copy(tree, tmp_path)
    shutil.rmtree(root / "val")
    (root / "val").mkdir()
    Image.fromarray(np.zeros((48, 40, 3), np.uint8)).save(root / "val" / "ILSVRC2012_val_00000001.JPEG", "JPEG")
    with pytest.raises(DataSourceError, match="no class folders"):
        prepare(_cfg(root), seed=0, output=tmp_path / "data.h5")


@pytest.mark.parametrize("folder,split", [("train", "train"), ("val", "test")])
def test_superclass_without_images(tree, tmp_path, folder, split):
    root = _copy(tree, tmp_path)
    wnids = imagenet_wnids()
    for index in (118, 121):  # both crab wnids of the tree
        shutil.rmtree(root / folder / wnids[index])
    with pytest.raises(DataSourceError) as info:
        prepare(_cfg(root), seed=0, output=tmp_path / "data.h5")
    message = str(info.value)
    assert "'crab'" in message and f"the {split} split" in message and str(root / folder) in message


@pytest.mark.parametrize("damage", ["garbage", "truncated", "empty"])
def test_unreadable_image_fails_and_leaves_no_file(tree, tmp_path, damage):
    root = _copy(tree, tmp_path)
    wnids = imagenet_wnids()
    victim = sorted((root / "val" / wnids[300]).iterdir())[1]
    if damage == "garbage":
        victim.write_bytes(b"this is not a JPEG" * 10)
    elif damage == "truncated":
        content = victim.read_bytes()
        victim.write_bytes(content[: len(content) * 2 // 3])  # cut inside the scan data
    else:
        victim.write_bytes(b"")
    out = tmp_path / "results" / "data.h5"
    with pytest.raises(DataSourceError, match="cannot read image") as info:
        prepare(_cfg(root), seed=0, output=out)
    assert str(victim) in str(info.value)
    # the train split was already written when the test split hit the file: nothing is left behind
    assert not out.exists() and not partial_path(out).exists()


def test_resize_smaller_than_resolution(tree, tmp_path):
    root, _ = tree
    cfg = _cfg(root, restricted_imagenet={"resolution": 32, "resize": 24})
    with pytest.raises(DataSourceError, match="resize 24 is smaller than resolution 32"):
        prepare(cfg, seed=0, output=tmp_path / "data.h5")


# --------------------------------------------------------------------------- config

def test_config_defaults_and_checks(tree, tmp_path):
    root, _ = tree
    cfg = complete("dataset", {"name": "rin", "source": "restricted_imagenet", "root": str(root)})
    assert cfg["restricted_imagenet"] == {"resolution": 224, "resize": 256}
    assert natural_classes(cfg) == 9
    check_dataset(cfg)
    with pytest.raises(ConfigError, match="dataset.restricted_imagenet.resize"):
        check_dataset({**cfg, "restricted_imagenet": {"resolution": 224, "resize": 200}})
    with pytest.raises(ConfigError, match="dataset.n_train.*9 classes"):
        check_dataset({**cfg, "n_train": 100})
    with pytest.raises(ConfigError, match="dataset.root") as info:
        check_dataset({**cfg, "root": str(tmp_path / "nowhere")})
    assert "val/<wnid>" in str(info.value)
    with pytest.raises(ConfigError, match="restricted_imagenet.resolution"):
        complete("dataset", {"name": "rin", "source": "restricted_imagenet", "restricted_imagenet": {"resolution": 0}})
    assert "restricted_imagenet" in data.SOURCES


# --------------------------------------------------------------------------- the whole pipeline

def _tiny_preset(root) -> dict:
    """configs/restricted-imagenet.yaml at toy sizes on the CPU: every stage, every control, the
    streamed loader everywhere and one source trained by two processes."""
    import yaml

    from helpers import REPO
    config = yaml.safe_load((REPO / "configs/restricted-imagenet.yaml").read_text())
    config.update(device="cpu", threads=2, chunk_size=32)
    config["dataset"].update(root=str(root), restricted_imagenet={"resolution": 32, "resize": 36}, n_val=9)
    small = {"epochs": 2, "batch_size": 32, "loader": "stream", "shuffle_window": 64, "precision": "float32"}
    config["sources"]["standard"] = {"arch": "resnet18_imagenet", "train": {**small, "processes": 2}}
    config["sources"]["robust"] = {"arch": "small_cnn", "train": {
        **small, "adversarial": {"norm": "l2", "eps": 1.0, "steps": 2, "step_size": 0.5}}}
    config["sources"]["brief_clean"] = {"arch": "small_cnn", "train": {**small, "epochs": 1}}
    for cons in config["constructions"].values():
        if "steps" in cons:
            cons["steps"] = 5
    config["targets"].update(archs=["small_cnn"], replicates=2, group_replicates=True, train=small)
    config["evaluation"].update(steps=3, batch_size=64, figure2_autoattack=None)
    config["figures"]["figure2"] = {k: v.replace("resnet50_imagenet", "small_cnn")
                                    for k, v in config["figures"]["figure2"].items()}
    return config


@pytest.mark.slow
def test_the_whole_pipeline_runs_on_a_tiny_imagenet_tree(tmp_path):
    import pandas as pd

    from test_workflow import snakemake
    root = tmp_path / "imagenet"
    make_imagenet_tree(root, KEPT + DROPPED, {"train": 12, "val": 4}, tint=True)
    work = tmp_path / "work"
    work.mkdir()
    snakemake(work, _tiny_preset(root))
    results = work / "results" / "restricted_imagenet"
    table = restricted_imagenet_labels()
    with hdf5.open_artifact(results / "data.h5", kind="data") as art:
        assert art.class_names == NAMES
        for split, n in (("train", 12 * len(KEPT) - 9), ("val", 9), ("test", 4 * len(KEPT))):
            s = art.split(split)
            index = s["imagenet_index"][:]
            assert len(s) == n and s.images.shape[1:] == (3, 32, 32)
            np.testing.assert_array_equal(s.labels, [_expected_superclass(i) for i in index])
            np.testing.assert_array_equal(s.labels, table[index])
            assert not set(index.tolist()) & set(DROPPED)
    with hdf5.open_artifact(results / "constructed" / "d_rand.h5", kind="constructed") as art:
        assert art.split("train").images.dtype == np.float32
    # D_det without robust-t rows judged D_det's rows: the workflow passed them, the attack ran once
    with hdf5.open_artifact(results / "constructed" / "d_det_no_robust_t.h5", kind="constructed") as art:
        assert art.attrs["rows_judged_from"] == "results/restricted_imagenet/constructed/d_det.h5"
    models = pd.read_csv(results / "tables" / "models.csv")
    assert len(models) == 3 + 12 * 2  # the sources and two replicates of each of the twelve training sets
    claims = pd.read_csv(results / "tables" / "claims.csv")
    assert len(claims) == 6
    assert (results / "summary.md").exists() and (results / "figures" / "figure2.png").exists()
    log = (work / "logs" / "restricted_imagenet" / "train_source" / "standard.log").read_text()
    assert "launching 2 training processes" in log and "rank 0" in log
    standard = torch.load(results / "sources" / "standard" / "model.pt", weights_only=True)
    assert standard["arch"] == "resnet18_imagenet" and standard["config"]["train"]["processes"] == 2


_KILLED_PREPARE = """
import os, signal, sys
from notbugs import data, hdf5
hdf5.CHUNK_BYTES = {chunk_bytes}  # several chunks per split, as at 224 px
calls = 0
decode = data.load_imagenet_image
def dying_decode(*args, **kwargs):
    global calls
    calls += 1
    if calls > {kill_after}:
        os.kill(os.getpid(), signal.SIGKILL)
    return decode(*args, **kwargs)
data.load_imagenet_image = dying_decode
data.prepare({cfg!r}, seed=3, output={out!r})
"""


@pytest.mark.parametrize("kill_after", [7, 60])  # in the train split; in the test split
def test_a_killed_data_stage_resumes_to_the_same_file(tree, tmp_path, kill_after):
    import subprocess

    root, _ = tree
    cfg = _cfg(root, n_val=9)
    straight = tmp_path / "straight" / "data.h5"
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(hdf5, "CHUNK_BYTES", SMALL_CHUNKS)
        prepare(cfg, seed=3, output=straight)
    killed = tmp_path / "killed" / "data.h5"
    code = _KILLED_PREPARE.format(chunk_bytes=SMALL_CHUNKS, kill_after=kill_after, cfg=cfg, out=str(killed))
    assert subprocess.run([sys.executable, "-c", code]).returncode == -9
    assert partial_path(killed).exists() and not killed.exists()
    import h5py
    import json
    with h5py.File(partial_path(killed), "r") as f:
        written = sum(json.loads(f.attrs["rows_done"]).values())
    assert written > 0
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(hdf5, "CHUNK_BYTES", SMALL_CHUNKS)
        writes = []
        original = hdf5.ArtifactWriter.append
        mp.setattr(hdf5.ArtifactWriter, "append", lambda self, split, arrays, state=None: (
            writes.append((split, len(arrays["labels"]))), original(self, split, arrays, state))[1])
        prepare(cfg, seed=3, output=killed)
        resumed_rows = sum(n for _, n in writes)
    with hdf5.open_artifact(straight) as a, hdf5.open_artifact(killed) as b:
        total = sum(len(a.split(s)) for s in a.splits)
        assert resumed_rows == total - written, "the rerun continues after the rows written before the kill"
        assert a.attrs["mean"] == b.attrs["mean"] and a.attrs["std"] == b.attrs["std"]
        for split in a.splits:
            for column in a.split(split).columns:
                assert np.array_equal(a.split(split)[column][:], b.split(split)[column][:]), (split, column)
