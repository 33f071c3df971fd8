"""Stage 1 data sources: the synthetic planted-feature dataset, ImageFolder, CIFAR-10 files, prepare()."""

from __future__ import annotations

import os
import pickle

import numpy as np
import pytest
from PIL import Image

from helpers import synthetic_spec
from notbugs.config import complete
from notbugs import data
from notbugs.data import (DataSourceError, balanced_subset, load_cifar10, load_imagefolder,
                          make_synthetic, prepare, render_synthetic, synthetic_components,
                          synthetic_templates)
from notbugs.hdf5 import open_artifact

SPEC = synthetic_spec()
SEED = 0
N_TRAIN, N_TEST = 600, 600


def _split_components(n: int, split_seed: int):
    """The labels make_synthetic draws, and the ground-truth components of that split."""
    images, labels = make_synthetic(SPEC, n, SEED, split_seed)
    comp = synthetic_components(SPEC, labels, SEED, split_seed)
    return images, labels, comp


@pytest.fixture(scope="module")
def synth():
    train = _split_components(N_TRAIN, 1)
    test = _split_components(N_TEST, 2)
    return {"train": train, "test": test, "templates": synthetic_templates(SPEC, SEED)}


def _least_squares_probe(x_train, y_train, x_test, n_classes):
    """One-vs-all least-squares linear classifier with bias; returns predictions on x_test."""
    a = np.c_[x_train, np.ones(len(x_train))].astype(np.float64)
    w, *_ = np.linalg.lstsq(a, np.eye(n_classes)[y_train], rcond=None)
    return (np.c_[x_test, np.ones(len(x_test))] @ w).argmax(axis=1)


# --------------------------------------------------------------------------- synthetic

def test_synthetic_is_deterministic():
    a_img, a_lab = make_synthetic(SPEC, 50, seed=3, split_seed=1)
    b_img, b_lab = make_synthetic(SPEC, 50, seed=3, split_seed=1)
    np.testing.assert_array_equal(a_img, b_img)
    np.testing.assert_array_equal(a_lab, b_lab)
    assert a_img.shape == (50, 3, 32, 32) and a_img.dtype == np.float32
    assert a_lab.dtype == np.int64
    assert a_img.min() >= 0.0 and a_img.max() <= 1.0
    np.testing.assert_array_equal(np.bincount(a_lab, minlength=10), np.full(10, 5))

    c_img, _ = make_synthetic(SPEC, 50, seed=4, split_seed=1)
    assert np.abs(a_img - c_img).mean() > 0.01
    d_img, _ = make_synthetic(SPEC, 50, seed=3, split_seed=2)
    assert np.abs(a_img - d_img).mean() > 0.01
    t3, t4 = synthetic_templates(SPEC, 3), synthetic_templates(SPEC, 4)
    assert not np.allclose(t3["robust"], t4["robust"])
    assert not np.allclose(t3["nonrobust"], t4["nonrobust"])
    # the templates depend on the seed only, not on the split
    np.testing.assert_array_equal(synthetic_templates(SPEC, 3)["nonrobust"], t3["nonrobust"])


def test_render_reproduces_make_synthetic(synth):
    images, labels, comp = synth["train"]
    np.testing.assert_array_equal(render_synthetic(SPEC, labels, comp), images)
    without_nr = render_synthetic(SPEC, labels, comp, nonrobust=False)
    # removing the non-robust feature moves every image by (about) its texture, norm 0.1
    diff = np.linalg.norm((images - without_nr).reshape(len(images), -1), axis=1)
    assert np.median(diff) == pytest.approx(SPEC.nonrobust_norm, rel=0.02)


def test_template_geometry(synth):
    t = synth["templates"]
    c = SPEC.n_classes
    assert t["robust"].shape == t["nonrobust"].shape == (c, 3, 32, 32)
    nr = t["nonrobust"].reshape(c, -1).astype(np.float64)
    r = t["robust"].reshape(c, -1).astype(np.float64)
    # non-robust textures: norm == nonrobust_norm, well below eps = 0.25; orthogonal, zero mean
    np.testing.assert_allclose(np.linalg.norm(nr, axis=1), SPEC.nonrobust_norm, rtol=1e-4)
    assert SPEC.nonrobust_norm < 0.25 / 2
    np.testing.assert_allclose(nr @ nr.T, SPEC.nonrobust_norm ** 2 * np.eye(c), atol=1e-6)
    np.testing.assert_allclose(nr.mean(axis=1), 0, atol=1e-6)
    # robust templates: norm robust_norm, zero mean, pairwise far beyond eps = 0.5
    np.testing.assert_allclose(np.linalg.norm(r, axis=1), SPEC.robust_norm, rtol=1e-4)
    np.testing.assert_allclose(r.mean(axis=1), 0, atol=1e-5)
    dist = np.linalg.norm(r[:, None] - r[None], axis=2)[~np.eye(c, dtype=bool)]
    assert dist.min() > 2.0
    assert dist.min() > 4 * 0.5


def test_nonrobust_feature_alone_is_predictive(synth):
    """A linear probe on images rendered WITHOUT the robust feature is >= 95% accurate."""
    nr = synth["templates"]["nonrobust"].reshape(SPEC.n_classes, -1)
    feats = {}
    for split in ("train", "test"):
        _, labels, comp = synth[split]
        x = render_synthetic(SPEC, labels, comp, robust=False).reshape(len(labels), -1)
        feats[split] = (x @ nr.T, labels)
    pred = _least_squares_probe(*feats["train"], feats["test"][0], SPEC.n_classes)
    assert (pred == feats["test"][1]).mean() >= 0.95


def test_robust_feature_alone_is_not_fully_predictive(synth):
    r = synth["templates"]["robust"].reshape(SPEC.n_classes, -1)
    agree = []
    for split in ("train", "test"):
        _, labels, comp = synth[split]
        agree.append(comp["robust_class"] == labels)
        # a flipped image shows another class's template, never its own
        assert np.all(comp["robust_class"] >= 0) and np.all(comp["robust_class"] < SPEC.n_classes)
    agree = np.concatenate(agree)
    assert agree.mean() == pytest.approx(1 - SPEC.robust_flip_prob, abs=0.04)

    # nearest robust template (after removing the grey level) on images WITHOUT the non-robust texture
    _, labels, comp = synth["test"]
    x = render_synthetic(SPEC, labels, comp, nonrobust=False).reshape(len(labels), -1) - 0.5
    pred = np.linalg.norm(x[:, None] - r[None], axis=2).argmin(axis=1)
    assert (pred == comp["robust_class"]).mean() >= 0.95  # the robust feature itself is easy to read ...
    accuracy = (pred == labels).mean()
    assert accuracy < 0.85  # ... but only ~70% predictive of the label
    assert accuracy == pytest.approx(1 - SPEC.robust_flip_prob, abs=0.06)


def test_synthetic_spec_flip_prob_zero_makes_robust_predictive():
    spec = synthetic_spec(robust_flip_prob=0.0)
    _, labels = make_synthetic(spec, 100, SEED, 1)
    comp = synthetic_components(spec, labels, SEED, 1)
    np.testing.assert_array_equal(comp["robust_class"], labels)


# --------------------------------------------------------------------------- balanced_subset

def test_balanced_subset():
    labels = np.random.default_rng(0).integers(0, 4, 200)
    idx = balanced_subset(labels, 40, 4, seed=5)
    assert len(idx) == 40 and len(np.unique(idx)) == 40
    assert np.all(np.diff(idx) > 0)
    np.testing.assert_array_equal(np.bincount(labels[idx], minlength=4), [10, 10, 10, 10])
    np.testing.assert_array_equal(idx, balanced_subset(labels, 40, 4, seed=5))
    assert not np.array_equal(idx, balanced_subset(labels, 40, 4, seed=6))
    np.testing.assert_array_equal(balanced_subset(labels, None, 4, seed=5), np.arange(200))
    with pytest.raises(ValueError, match="not a multiple of the 4 classes"):
        balanced_subset(labels, 42, 4, seed=5)
    few = np.array([0] * 10 + [1] * 2)
    with pytest.raises(ValueError, match="class 1 has 2 examples"):
        balanced_subset(few, 8, 2, seed=0)


# --------------------------------------------------------------------------- imagefolder

FOLDER_CLASSES = ["bird", "cat", "dog"]  # written in unsorted order below


def _make_imagefolder(root, per_class=4):
    pixels = {}
    rng = np.random.default_rng(9)
    for split in ("train", "test"):
        for cls in ("dog", "bird", "cat"):
            d = root / split / cls
            d.mkdir(parents=True)
            for i in range(per_class):
                arr = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
                Image.fromarray(arr).save(d / f"{i}.png")
                pixels[(split, cls, i)] = arr
    return pixels


def _match_rows(images, labels, pixels, split):
    """Map every loaded image back to the PNG it came from; returns the set of files used."""
    used = set()
    for img, lab in zip(images, labels):
        cls = FOLDER_CLASSES[lab]
        hits = [i for (s, c, i), arr in pixels.items()
                if s == split and c == cls and np.array_equal(arr.transpose(2, 0, 1), img)]
        assert len(hits) == 1, "loaded image does not match a PNG of its class"
        used.add((cls, hits[0]))
    return used


def test_load_imagefolder(tmp_path):
    pixels = _make_imagefolder(tmp_path)
    splits, classes = load_imagefolder(tmp_path, None, 6, seed=0, n_val=0)
    assert classes == FOLDER_CLASSES
    train, test = splits["train"], splits["test"]
    assert train["images"].shape == (12, 3, 32, 32) and train["images"].dtype == np.uint8
    assert test["images"].shape == (6, 3, 32, 32) and test["images"].dtype == np.uint8
    np.testing.assert_array_equal(np.bincount(train["labels"], minlength=3), [4, 4, 4])
    np.testing.assert_array_equal(np.bincount(test["labels"], minlength=3), [2, 2, 2])
    assert len(_match_rows(train["images"], train["labels"], pixels, "train")) == 12
    assert len(_match_rows(test["images"], test["labels"], pixels, "test")) == 6
    again, _ = load_imagefolder(tmp_path, None, 6, seed=0, n_val=0)
    np.testing.assert_array_equal(again["test"]["images"], test["images"])


def test_validation_split_is_held_out_of_the_training_pool(tmp_path):
    pixels = _make_imagefolder(tmp_path, per_class=6)
    splits, _ = load_imagefolder(tmp_path, 6, None, seed=1, n_val=6)
    train, val = splits["train"], splits["val"]
    np.testing.assert_array_equal(np.bincount(val["labels"], minlength=3), [2, 2, 2])
    np.testing.assert_array_equal(np.bincount(train["labels"], minlength=3), [2, 2, 2])
    used_train = _match_rows(train["images"], train["labels"], pixels, "train")
    used_val = _match_rows(val["images"], val["labels"], pixels, "train")
    assert len(used_val) == 6 and not used_train & used_val
    # Without a validation split the training subset is what it always was.
    without, _ = load_imagefolder(tmp_path, 6, None, seed=1, n_val=0)
    idx = balanced_subset(np.repeat([0, 1, 2], 6), 6, 3, seed=1 + 1)  # ImageFolder's rows: class by class, files 0..5
    expected = {(FOLDER_CLASSES[i // 6], i % 6) for i in idx}
    assert "val" not in without
    assert _match_rows(without["train"]["images"], without["train"]["labels"], pixels, "train") == expected


def test_extra_training_images_come_from_outside_the_train_and_val_subsets(tmp_path):
    pixels = _make_imagefolder(tmp_path, per_class=6)
    splits, _ = load_imagefolder(tmp_path, 6, None, seed=1, n_val=6, n_extra_train=3)
    used = {name: _match_rows(splits[name]["images"], splits[name]["labels"], pixels, "train")
            for name in ("train", "val", "extra_train")}
    np.testing.assert_array_equal(np.bincount(splits["extra_train"]["labels"], minlength=3), [1, 1, 1])
    assert len(used["extra_train"]) == 3 and not used["extra_train"] & (used["train"] | used["val"])
    # The extra images change neither the subset the constructions perturb nor the validation split.
    without, _ = load_imagefolder(tmp_path, 6, None, seed=1, n_val=6)
    assert "extra_train" not in without
    for name in ("train", "val"):
        np.testing.assert_array_equal(without[name]["images"], splits[name]["images"])
    with pytest.raises(DataSourceError, match="n_extra_train 9 exceeds the 6 training images outside"):
        load_imagefolder(tmp_path, 6, None, seed=1, n_val=6, n_extra_train=9)


def test_prepare_synthetic_extra_training_images_are_an_independent_draw(tmp_path):
    cfg = complete("dataset", {"name": "s", "source": "synthetic", "n_train": 50, "n_test": 20, "n_extra_train": 40})
    with open_artifact(prepare(cfg, seed=2, output=tmp_path / "data.h5"), kind="data") as art:
        assert art.splits == ["extra_train", "test", "train"]
        images, labels = make_synthetic(synthetic_spec(), 40, 2, 4)
        np.testing.assert_array_equal(art.split("extra_train").images[:], images)
        np.testing.assert_array_equal(art.split("extra_train").labels, labels)


def test_prepare_synthetic_validation_split_is_an_independent_draw(tmp_path):
    cfg = complete("dataset", {"name": "s", "source": "synthetic", "n_train": 50, "n_test": 20, "n_val": 30})
    out = prepare(cfg, seed=2, output=tmp_path / "data.h5")
    with open_artifact(out, kind="data") as art:
        assert art.splits == ["test", "train", "val"]
        val = art.split("val")
        images, labels = make_synthetic(synthetic_spec(), 30, 2, 3)
        np.testing.assert_array_equal(val.images[:], images)
        np.testing.assert_array_equal(val.labels, labels)
        train_images, _ = make_synthetic(synthetic_spec(), 50, 2, 1)
        np.testing.assert_array_equal(art.split("train").images[:], train_images)


def test_prepare_imagefolder(tmp_path):
    pixels = _make_imagefolder(tmp_path / "tree")
    # 6 images is below the schema's minimum subset size, so this section is written out in full
    cfg = {"name": "x", "source": "imagefolder", "root": str(tmp_path / "tree"), "n_train": 6, "n_test": None, "n_val": 0}
    out = prepare(cfg, seed=0, output=tmp_path / "data.h5")
    assert out == tmp_path / "data.h5"
    with open_artifact(out, kind="data") as art:
        assert art.class_names == FOLDER_CLASSES
        train, test = art.split("train"), art.split("test")
        assert train.images.shape == (6, 3, 32, 32) and train.images.dtype == np.uint8
        assert test.images.shape == (12, 3, 32, 32)
        np.testing.assert_array_equal(np.bincount(train.labels, minlength=3), [2, 2, 2])
        np.testing.assert_array_equal(np.bincount(test.labels, minlength=3), [4, 4, 4])
        used = _match_rows(train.images[:], train.labels, pixels, "train")
        assert len(used) == 6
        _match_rows(test.images[:], test.labels, pixels, "test")
        attrs = art.attrs
        assert attrs["config"] == cfg and art.config == cfg
        assert attrs["seed"] == 0
        assert "ImageFolder" in attrs["source"]
        expected_mean = (train.images[:].astype(np.float64) / 255).mean(axis=(0, 2, 3))
        np.testing.assert_allclose(attrs["mean"], expected_mean, rtol=1e-5)
        assert len(attrs["std"]) == 3 and all(s > 0.2 for s in attrs["std"])  # uniform noise: ~0.29


def test_imagefolder_missing_train(tmp_path):
    (tmp_path / "test" / "cat").mkdir(parents=True)
    with pytest.raises(DataSourceError) as info:
        load_imagefolder(tmp_path, None, None, seed=0, n_val=0)
    assert str(tmp_path / "train") in str(info.value)
    assert "does not exist" in str(info.value)


def test_imagefolder_class_mismatch(tmp_path):
    _make_imagefolder(tmp_path, per_class=1)
    for f in (tmp_path / "test" / "dog").iterdir():
        f.unlink()
    (tmp_path / "test" / "dog").rmdir()
    with pytest.raises(DataSourceError, match="classes differ"):
        load_imagefolder(tmp_path, None, None, seed=0, n_val=0)


# --------------------------------------------------------------------------- cifar10

def test_cifar10_offline_error(tmp_path):
    with pytest.raises(DataSourceError) as info:
        load_cifar10(tmp_path, None, None, 0, n_val=0, download=False)
    message = str(info.value)
    assert str(tmp_path) in message
    assert "imagefolder" in message and "synthetic" in message


CIFAR_NAMES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


def _write_cifar(root):
    """cifar-10-batches-py in torchvision's format: 5 train batches of 20 rows, a test batch of 30."""
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(12)
    raw = {}
    names = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    for name in names:
        n = 30 if name == "test_batch" else 20
        rows = rng.integers(0, 256, (n, 3072), dtype=np.uint8)
        labels = rng.permutation(np.arange(n) % 10).tolist()
        raw[name] = (rows, labels)
        with open(folder / name, "wb") as f:
            pickle.dump({"batch_label": name, "data": rows, "labels": labels, "filenames": []}, f)
    with open(folder / "batches.meta", "wb") as f:
        pickle.dump({"label_names": CIFAR_NAMES, "num_cases_per_batch": 20, "num_vis": 3072}, f)
    train = (np.concatenate([raw[n][0] for n in names[:5]]), sum((raw[n][1] for n in names[:5]), []))
    return train, raw["test_batch"]


@pytest.fixture
def fake_cifar(tmp_path, monkeypatch):
    import torchvision.datasets.cifar as tv_cifar
    # the files are not the real ones, so their md5 sums differ: only check they exist
    monkeypatch.setattr(tv_cifar, "check_integrity", lambda fpath, md5=None: os.path.isfile(fpath))
    return tmp_path, _write_cifar(tmp_path)


def test_load_cifar10_files(fake_cifar):
    root, ((train_raw, train_labels), (test_raw, test_labels)) = fake_cifar
    splits, classes = load_cifar10(root, None, None, 0, n_val=0, download=False)
    assert classes == CIFAR_NAMES
    tr, te = splits["train"], splits["test"]
    assert tr["images"].shape == (100, 3, 32, 32) and tr["images"].dtype == np.uint8
    assert te["images"].shape == (30, 3, 32, 32) and te["images"].dtype == np.uint8
    assert tr["images"].flags["C_CONTIGUOUS"]
    # CIFAR rows are channel-first R(1024) G(1024) B(1024)
    np.testing.assert_array_equal(tr["images"], train_raw.reshape(-1, 3, 32, 32))
    np.testing.assert_array_equal(te["images"], test_raw.reshape(-1, 3, 32, 32))
    np.testing.assert_array_equal(tr["labels"], train_labels)
    np.testing.assert_array_equal(te["labels"], test_labels)
    assert tr["labels"].dtype == np.int64


def test_load_cifar10_subset_and_prepare(fake_cifar, tmp_path):
    root, ((train_raw, train_labels), (test_raw, test_labels)) = fake_cifar
    splits, _ = load_cifar10(root, 50, 20, 0, n_val=0, download=False)
    tr, te = splits["train"], splits["test"]
    assert tr["images"].shape == (50, 3, 32, 32) and te["images"].shape == (20, 3, 32, 32)
    np.testing.assert_array_equal(np.bincount(tr["labels"], minlength=10), np.full(10, 5))
    np.testing.assert_array_equal(np.bincount(te["labels"], minlength=10), np.full(10, 2))
    # every picked row is the raw row with that label
    idx = balanced_subset(np.asarray(train_labels), 50, 10, 0 + 1)
    np.testing.assert_array_equal(tr["images"], train_raw[idx].reshape(-1, 3, 32, 32))
    np.testing.assert_array_equal(tr["labels"], np.asarray(train_labels)[idx])

    cfg = complete("dataset", {"name": "c", "source": "cifar10", "root": str(root), "n_train": 50, "n_test": 20})
    out = prepare(cfg, seed=0, output=tmp_path / "out" / "data.h5")
    # prepare() downloads by default; with files present it must not need the network
    with open_artifact(out, kind="data") as art:
        assert art.class_names == CIFAR_NAMES
        np.testing.assert_array_equal(art.split("train").images[:], tr["images"])
        np.testing.assert_array_equal(art.split("test").labels, te["labels"])


# --------------------------------------------------------------------------- prepare, synthetic

def test_prepare_synthetic(tmp_path):
    cfg = complete("dataset", {"name": "s", "source": "synthetic", "n_train": 60, "n_test": 30,
                               "synthetic": {"robust_flip_prob": 0.2}})
    out = prepare(cfg, seed=4, output=tmp_path / "results" / "s" / "data.h5")
    with open_artifact(out, kind="data") as art:
        train, test = art.split("train"), art.split("test")
        assert len(train) == 60 and len(test) == 30
        assert train.images.dtype == np.float32 and train.images.shape == (60, 3, 32, 32)
        assert art.class_names == [f"class{c}" for c in range(10)]
        np.testing.assert_array_equal(np.bincount(train.labels, minlength=10), np.full(10, 6))
        spec = synthetic_spec(robust_flip_prob=0.2)
        images, labels = make_synthetic(spec, 60, 4, 1)
        np.testing.assert_array_equal(train.images[:], images)
        np.testing.assert_array_equal(train.labels, labels)
        test_images, _ = make_synthetic(spec, 30, 4, 2)
        np.testing.assert_array_equal(test.images[:], test_images)
        attrs = art.attrs
        assert attrs["seed"] == 4
        assert "'robust_flip_prob': 0.2" in attrs["source"]
        np.testing.assert_allclose(attrs["mean"], images.mean(axis=(0, 2, 3)), rtol=1e-5)
        np.testing.assert_allclose(attrs["std"], images.std(axis=(0, 2, 3)), rtol=1e-4)
        assert all(0.4 < m < 0.6 for m in attrs["mean"])
        assert art.config == cfg


def test_prepare_unknown_source(tmp_path):
    with pytest.raises(DataSourceError, match="unknown dataset.source 'mnist'"):
        prepare({"name": "m", "source": "mnist"}, seed=0, output=tmp_path / "d.h5")
    assert not (tmp_path / "d.h5").exists()


def test_channel_stats_scales_uint8():
    imgs = np.zeros((2, 3, 2, 2), np.uint8)
    imgs[:, 1] = 255
    mean, std = data.channel_stats(imgs)
    assert mean == pytest.approx([0.0, 1.0, 0.0])
    assert std == pytest.approx([0.0, 0.0, 0.0])


def test_running_channel_stats_match_the_whole_array():
    rng = np.random.default_rng(3)
    images = rng.integers(0, 256, (70, 3, 9, 7), dtype=np.uint8)
    images[:, 2] //= 4  # channels with different means and spreads
    running = data.RunningChannelStats()
    for lo, hi in ((0, 1), (1, 28), (28, 28), (28, 69), (69, 70)):  # uneven batches, one empty
        running.update(images[lo:hi])
    x = images.astype(np.float64) / 255
    mean, std = running.result()
    np.testing.assert_allclose(mean, x.mean(axis=(0, 2, 3)), rtol=1e-12)
    np.testing.assert_allclose(std, x.std(axis=(0, 2, 3)), rtol=1e-12)
    np.testing.assert_allclose(std, data.channel_stats(images)[1], rtol=1e-5)
    floats = rng.random((20, 3, 4, 4)).astype(np.float32)
    running = data.RunningChannelStats()
    running.update(floats[:7]), running.update(floats[7:])
    np.testing.assert_allclose(running.result()[0], floats.astype(np.float64).mean(axis=(0, 2, 3)), rtol=1e-12)
    with pytest.raises(ValueError, match="no images"):
        data.RunningChannelStats().result()
