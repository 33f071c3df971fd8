"""The HDF5 artifact layer: layout, atomic writes, validation on read, resumable chunked writes."""

from __future__ import annotations

import datetime as dt
import json
import os
import shutil

import h5py
import numpy as np
import pytest

import notbugs
from notbugs import hdf5
from notbugs.runtime import partial_path
from notbugs.hdf5 import ArtifactError, ChunkedWriter, ColumnSpec, load_split, open_artifact, write_artifact

CLASSES = ["cat", "dog", "ship"]


def _data_splits(rng: np.random.Generator, n_train: int = 300, n_test: int = 40) -> dict:
    # n_train > ROWS_PER_CHUNK so the datasets span several chunks
    return {
        "train": {"images": rng.integers(0, 256, (n_train, 3, 8, 8), dtype=np.uint8),
                  "labels": rng.integers(0, len(CLASSES), n_train)},
        "test": {"images": rng.integers(0, 256, (n_test, 3, 8, 8), dtype=np.uint8),
                 "labels": rng.integers(0, len(CLASSES), n_test)},
    }


def _constructed_columns(rng: np.random.Generator, n: int = 300) -> dict:
    return {
        "images": rng.random((n, 3, 8, 8), dtype=np.float32),
        "labels": rng.integers(0, len(CLASSES), n).astype(np.int64),
        "orig_index": rng.permutation(n).astype(np.int64),
        "orig_label": rng.integers(0, len(CLASSES), n).astype(np.int64),
        "loss": rng.random(n, dtype=np.float32),
        "perturbation_norm": rng.random(n, dtype=np.float32),
        "target_reached": rng.random(n) < 0.5,
    }


def _write_data(path, rng=None, **kw):
    rng = rng or np.random.default_rng(0)
    splits = _data_splits(rng)
    args = dict(kind="data", splits=splits, class_names=CLASSES, config={"name": "x", "n_train": 300},
                seed=7, source="unit test data")
    args.update(kw)
    return write_artifact(path, **args), splits


@pytest.fixture
def data_file(tmp_path):
    path, splits = _write_data(tmp_path / "data.h5")
    return path, splits


# --------------------------------------------------------------------------- round trip

def test_data_round_trip_with_module(data_file):
    path, splits = data_file
    assert path.exists()
    assert not partial_path(path).exists()
    with open_artifact(path, kind="data") as art:
        assert art.kind == "data"
        assert sorted(art.splits) == ["test", "train"]
        assert art.class_names == CLASSES
        assert art.config == {"name": "x", "n_train": 300}
        attrs = art.attrs
        assert attrs["format"] == "notbugs"
        assert attrs["format_version"] == hdf5.FORMAT_VERSION
        assert attrs["notbugs_version"] == notbugs.__version__
        assert attrs["seed"] == 7
        assert attrs["source"] == "unit test data"
        for name in ("train", "test"):
            split = art.split(name)
            assert len(split) == len(splits[name]["labels"])
            assert split.images.dtype == np.uint8
            np.testing.assert_array_equal(split.images[:], splits[name]["images"])
            np.testing.assert_array_equal(split.labels, splits[name]["labels"])
            assert split.labels.dtype == np.int64
        # streaming in pieces gives back the same rows
        pieces = list(art.split("train").iter_chunks(128))
        assert [lo for lo, _ in pieces] == [0, 128, 256]
        np.testing.assert_array_equal(np.concatenate([p["images"] for _, p in pieces]),
                                      splits["train"]["images"])
        with pytest.raises(ArtifactError, match="no split 'validation'"):
            art.split("validation")
    images, labels = load_split(path, "test", kind="data")
    np.testing.assert_array_equal(images, splits["test"]["images"])
    np.testing.assert_array_equal(labels, splits["test"]["labels"])


def test_data_round_trip_with_plain_h5py(data_file):
    path, splits = data_file
    before = dt.datetime.now(dt.timezone.utc) - dt.timedelta(minutes=5)
    with h5py.File(path, "r") as f:
        assert f.attrs["format"] == "notbugs"
        assert f.attrs["kind"] == "data"
        assert int(f.attrs["format_version"]) == 1
        assert f.attrs["notbugs_version"] == notbugs.__version__
        assert json.loads(f.attrs["config"]) == {"name": "x", "n_train": 300}
        assert int(f.attrs["seed"]) == 7
        assert f.attrs["source"] == "unit test data"
        created = dt.datetime.fromisoformat(f.attrs["created"])
        assert created.tzinfo is not None
        assert before <= created <= dt.datetime.now(dt.timezone.utc) + dt.timedelta(seconds=5)
        assert [s.decode() for s in f["class_names"][:]] == CLASSES
        for name in ("train", "test"):
            np.testing.assert_array_equal(f[name]["images"][:], splits[name]["images"])
            np.testing.assert_array_equal(f[name]["labels"][:], splits[name]["labels"])
            assert f[name]["images"].dtype == np.uint8
            assert f[name]["labels"].dtype == np.int64
            for ds in (f[name]["images"], f[name]["labels"]):
                assert ds.chunks is not None
                assert ds.chunks[0] <= hdf5.ROWS_PER_CHUNK
                assert ds.chunks[1:] == ds.shape[1:]
                assert ds.compression == "gzip"
        # chunked along N: the 300-row train split spans more than one chunk
        assert f["train"]["images"].chunks[0] < f["train"]["images"].shape[0]


def test_constructed_round_trip(tmp_path):
    rng = np.random.default_rng(1)
    cols = _constructed_columns(rng)
    path = write_artifact(tmp_path / "sub" / "d_det.h5", kind="constructed", splits={"train": cols},
                          class_names=CLASSES, config={"method": "pgd", "eps": 0.5}, seed=3,
                          source="pgd from standard",
                          extra_attrs={"eps": 0.5, "norm": "l2", "history": [1, 2, 3]})
    with open_artifact(path, kind="constructed") as art:
        assert art.splits == ["train"]
        split = art.split("train")
        assert sorted(split.columns) == sorted(cols)
        for name, arr in cols.items():
            np.testing.assert_array_equal(split[name][:], arr)
            assert split[name].dtype == arr.dtype
        assert split.images.dtype == np.float32
        assert art.attrs["eps"] == 0.5
        assert art.attrs["norm"] == "l2"
        assert art.attrs["history"] == [1, 2, 3]
        assert art.config == {"method": "pgd", "eps": 0.5}
    with h5py.File(path, "r") as f:
        assert f.attrs["kind"] == "constructed"
        assert json.loads(f.attrs["history"]) == [1, 2, 3]
        assert "test" not in f
        for name, arr in cols.items():
            ds = f["train"][name]
            np.testing.assert_array_equal(ds[:], arr)
            assert ds.compression == "gzip" and ds.chunks is not None
        assert f["train"]["loss"].dtype == np.float32
        assert f["train"]["target_reached"].dtype == np.bool_


def test_write_rejects_bad_input(tmp_path):
    rng = np.random.default_rng(2)
    with pytest.raises(ValueError, match="unknown artifact kind"):
        write_artifact(tmp_path / "a.h5", kind="weird", splits=_data_splits(rng), class_names=CLASSES,
                       config={}, seed=0, source="")
    with pytest.raises(ValueError, match="needs splits \\['test'\\]"):
        write_artifact(tmp_path / "a.h5", kind="data", splits={"train": _data_splits(rng)["train"]},
                       class_names=CLASSES, config={}, seed=0, source="")
    bad = _data_splits(rng)
    bad["train"]["images"] = bad["train"]["images"].astype(np.float64)
    with pytest.raises(ValueError, match="uint8 or float32"):
        write_artifact(tmp_path / "a.h5", kind="data", splits=bad, class_names=CLASSES,
                       config={}, seed=0, source="")
    assert list(tmp_path.iterdir()) == []


# --------------------------------------------------------------------------- atomicity

def test_mismatched_column_leaves_no_file(tmp_path):
    rng = np.random.default_rng(3)
    cols = _constructed_columns(rng)
    cols["loss"] = cols["loss"][:-1]
    path = tmp_path / "d.h5"
    with pytest.raises(ValueError, match="'loss' has 299 rows"):
        write_artifact(path, kind="constructed", splits={"train": cols}, class_names=CLASSES,
                       config={}, seed=0, source="")
    assert not path.exists()
    assert list(tmp_path.iterdir()) == []


def test_failure_while_writing_leaves_nothing_acceptable(tmp_path):
    """A column h5py cannot store fails after images and labels are already on disk."""
    rng = np.random.default_rng(4)
    cols = _constructed_columns(rng, n=20)
    cols["junk"] = np.array([object()] * 20)  # same length, passes the up-front checks
    path = tmp_path / "d.h5"
    with pytest.raises(TypeError):
        write_artifact(path, kind="constructed", splits={"train": cols}, class_names=CLASSES,
                       config={}, seed=0, source="")
    assert not path.exists()
    for leftover in tmp_path.iterdir():
        with pytest.raises(ArtifactError):
            open_artifact(leftover, kind="constructed").close()


def test_failed_rewrite_keeps_previous_file(data_file):
    path, splits = data_file
    bad = _data_splits(np.random.default_rng(5))
    bad["test"]["labels"] = bad["test"]["labels"][:3]
    with pytest.raises(ValueError):
        write_artifact(path, kind="data", splits=bad, class_names=CLASSES, config={}, seed=0, source="")
    images, _ = load_split(path, "train", kind="data")
    np.testing.assert_array_equal(images, splits["train"]["images"])


# --------------------------------------------------------------------------- rejection

def _assert_rejected(path, *fragments, kind=None):
    with pytest.raises(ArtifactError) as info:
        open_artifact(path, kind=kind).close()
    message = str(info.value)
    assert str(path) in message
    for fragment in fragments:
        assert fragment in message, message
    return message


def test_rejects_missing_file(tmp_path):
    _assert_rejected(tmp_path / "nope.h5", "no such file")
    with pytest.raises(ArtifactError, match="no such file"):
        load_split(tmp_path / "nope.h5", "train")


def test_rejects_non_hdf5(tmp_path):
    path = tmp_path / "text.h5"
    path.write_text("this is not HDF5\n" * 100)
    _assert_rejected(path, "not an HDF5 file")


def test_rejects_truncated(data_file, tmp_path):
    path, _ = data_file
    cut = tmp_path / "truncated.h5"
    shutil.copy(path, cut)
    os.truncate(cut, os.path.getsize(cut) // 2)
    message = _assert_rejected(cut)
    assert "truncated" in message or "corrupt" in message
    with pytest.raises(ArtifactError):
        load_split(cut, "train")


def test_rejects_foreign_hdf5(tmp_path):
    path = tmp_path / "foreign.h5"
    with h5py.File(path, "w") as f:
        f.create_dataset("train/images", data=np.zeros((2, 3, 4, 4), np.uint8))
        f.create_dataset("train/labels", data=np.zeros(2, np.int64))
    _assert_rejected(path, "not a notbugs artifact", "format")


def test_rejects_wrong_format_version(data_file):
    path, _ = data_file
    with h5py.File(path, "a") as f:
        f.attrs["format_version"] = 99
    _assert_rejected(path, "version 99")


def test_rejects_missing_dataset(data_file):
    path, _ = data_file
    with h5py.File(path, "a") as f:
        del f["train/labels"]
    _assert_rejected(path, "missing dataset '/train/labels'")


def test_rejects_missing_split(data_file):
    path, _ = data_file
    with h5py.File(path, "a") as f:
        del f["test"]
    _assert_rejected(path, "missing split group '/test'")


def test_rejects_wrong_kind(data_file):
    path, _ = data_file
    _assert_rejected(path, "'data'", "expected 'constructed'", kind="constructed")
    with pytest.raises(ArtifactError, match="expected 'constructed'"):
        load_split(path, "train", kind="constructed")
    open_artifact(path, kind="data").close()  # the right kind is fine


def test_rejects_labels_out_of_range(data_file):
    path, _ = data_file
    with h5py.File(path, "a") as f:
        labels = f["test/labels"]
        labels[5] = len(CLASSES)
    _assert_rejected(path, "'/test/labels' outside 0..2")
    with h5py.File(path, "a") as f:
        f["test/labels"][5] = -1
    _assert_rejected(path, "'/test/labels' outside 0..2")


def test_rejects_ragged_columns(data_file):
    path, _ = data_file
    with h5py.File(path, "a") as f:
        f["train"].create_dataset("loss", data=np.zeros(7, np.float32))
    _assert_rejected(path, "'/train/loss' has 7 rows")


# --------------------------------------------------------------------------- ChunkedWriter

COLUMN_SPECS = {
    "images": ColumnSpec((3, 8, 8), "float32"),
    "labels": ColumnSpec((), "int64"),
    "orig_index": ColumnSpec((), "int64"),
    "loss": ColumnSpec((), "float32"),
}
FINISH = dict(kind="constructed", class_names=CLASSES, config={"method": "pgd"}, seed=11,
              source="chunked", extra_attrs={"eps": 0.5})


def _columns(n=100):
    rng = np.random.default_rng(6)
    return {"images": rng.random((n, 3, 8, 8), dtype=np.float32),
            "labels": rng.integers(0, len(CLASSES), n).astype(np.int64),
            "orig_index": np.arange(n, dtype=np.int64),
            "loss": rng.random(n, dtype=np.float32)}


def _rows(cols, lo, hi):
    return {k: v[lo:hi] for k, v in cols.items()}


def test_chunked_writer_resume_and_finish(tmp_path):
    cols, n = _columns(), 100
    path = tmp_path / "out" / "d_rand.h5"
    w = ChunkedWriter(path, n, COLUMN_SPECS, fingerprint="fp-1")
    assert w.rows_done == 0 and not w.done
    w.append(_rows(cols, 0, 30))
    w.append(_rows(cols, 30, 60))
    assert w.rows_done == 60
    np.testing.assert_array_equal(w.read_column("loss"), cols["loss"][:60])
    w.close()  # killed before finishing: nothing under the final name
    assert not path.exists()
    with pytest.raises(ArtifactError, match="no such file"):
        open_artifact(path)

    w = ChunkedWriter(path, n, COLUMN_SPECS, fingerprint="fp-1")
    assert w.rows_done == 60
    np.testing.assert_array_equal(w.read_column("images"), cols["images"][:60])
    with pytest.raises(RuntimeError, match="60/100"):
        w.finish(**FINISH)
    with pytest.raises(ValueError, match="overflows"):
        w.append(_rows(cols, 0, 50))
    w.append(_rows(cols, 60, 100))
    assert w.done
    assert w.finish(**FINISH) == path
    assert not partial_path(path).exists()

    with open_artifact(path, kind="constructed") as art:
        split = art.split("train")
        for name, arr in cols.items():
            np.testing.assert_array_equal(split[name][:], arr)
        assert art.class_names == CLASSES
        assert art.attrs["seed"] == 11 and art.attrs["eps"] == 0.5
        assert "fingerprint" not in art.attrs and "rows_done" not in art.attrs

    # identical to writing everything in one go
    one_go = write_artifact(tmp_path / "one_go.h5", splits={"train": cols}, **FINISH)
    with h5py.File(path, "r") as a, h5py.File(one_go, "r") as b:
        assert set(a.attrs) == set(b.attrs)
        for key in a.attrs:
            if key != "created":
                assert a.attrs[key] == b.attrs[key], key
        assert list(a.keys()) == list(b.keys())
        assert set(a["train"]) == set(b["train"])
        np.testing.assert_array_equal(a["class_names"][:], b["class_names"][:])
        for name in cols:
            da, db = a["train"][name], b["train"][name]
            assert da.dtype == db.dtype and da.shape == db.shape and da.chunks == db.chunks
            np.testing.assert_array_equal(da[:], db[:])


def test_chunked_writer_other_fingerprint_starts_over(tmp_path):
    cols, n = _columns(), 100
    path = tmp_path / "d.h5"
    w = ChunkedWriter(path, n, COLUMN_SPECS, fingerprint="eps=0.5")
    w.append(_rows(cols, 0, 40))
    w.close()
    w = ChunkedWriter(path, n, COLUMN_SPECS, fingerprint="eps=0.25")
    assert w.rows_done == 0
    assert len(w.read_column("labels")) == 0
    w.append(_rows(cols, 0, 10))
    w.close()
    # and a different size also starts over, even with the same fingerprint
    w = ChunkedWriter(path, 50, COLUMN_SPECS, fingerprint="eps=0.25")
    assert w.rows_done == 0
    w.close()


def test_chunked_writer_discards_corrupt_partial(tmp_path):
    path = tmp_path / "d.h5"
    partial_path(path).write_bytes(b"garbage, e.g. a file killed while being created")
    w = ChunkedWriter(path, 10, COLUMN_SPECS, fingerprint="fp")
    assert w.rows_done == 0
    w.append(_rows(_columns(10), 0, 10))
    w.finish(**FINISH)
    images, labels = load_split(path, "train", kind="constructed")
    np.testing.assert_array_equal(images, _columns(10)["images"])


def test_chunked_writer_rejects_wrong_columns(tmp_path):
    w = ChunkedWriter(tmp_path / "d.h5", 10, COLUMN_SPECS, fingerprint="fp")
    rows = _rows(_columns(10), 0, 5)
    del rows["loss"]
    with pytest.raises(ValueError, match="columns"):
        w.append(rows)
    assert w.rows_done == 0
    w.close()



# --------------------------------------------------------------------------- ArtifactWriter

def test_chunk_rows_keep_small_images_at_256_and_large_ones_near_4_mib(tmp_path):
    assert hdf5.chunk_rows((3, 32, 32), "uint8") == hdf5.ROWS_PER_CHUNK == 256
    assert hdf5.chunk_rows((3, 32, 32), "float32") == 256
    assert hdf5.chunk_rows((), "int64") == 256
    assert hdf5.chunk_rows((3, 224, 224), "uint8") == 4 * 1024 * 1024 // (3 * 224 * 224) == 27
    assert hdf5.chunk_rows((3, 224, 224), "float32") == 6
    assert hdf5.chunk_rows((3, 2048, 2048), "float32") == 1
    cols = {"images": np.zeros((40, 3, 224, 224), np.uint8), "labels": np.zeros(40, np.int64)}
    path = write_artifact(tmp_path / "big.h5", kind="data", splits={"train": cols, "test": cols},
                          class_names=CLASSES, config={}, seed=0, source="s")
    with h5py.File(path, "r") as f:
        assert f["train/images"].chunks == (27, 3, 224, 224)
        assert f["train/labels"].chunks == (40,)


DATA_COLUMNS = {"images": ColumnSpec((3, 8, 8), "uint8"), "labels": ColumnSpec((), "int64"),
                "imagenet_index": ColumnSpec((), "int64")}
DATA_FINISH = dict(class_names=CLASSES, config={"name": "x"}, seed=7, source="streamed",
                   extra_attrs={"mean": [0.1, 0.2, 0.3], "std": [0.4, 0.5, 0.6]})


def _data_columns(n, seed):
    rng = np.random.default_rng(seed)
    return {"images": rng.integers(0, 256, (n, 3, 8, 8), dtype=np.uint8),
            "labels": rng.integers(0, len(CLASSES), n).astype(np.int64),
            "imagenet_index": rng.integers(0, 1000, n).astype(np.int64)}


def test_artifact_writer_streams_every_split(tmp_path):
    sizes = {"train": 300, "test": 40, "val": 9}
    cols = {split: _data_columns(n, i) for i, (split, n) in enumerate(sizes.items())}
    path = tmp_path / "results" / "data.h5"
    with hdf5.ArtifactWriter(path, "data", sizes, DATA_COLUMNS) as w:
        assert w.chunk_rows() == 256 and not w.done
        for split, n in sizes.items():
            for lo in range(0, n, 70):
                w.append(split, _rows(cols[split], lo, min(lo + 70, n)))
                assert not path.exists() and partial_path(path).exists()
        assert w.done
        assert w.finish(**DATA_FINISH) == path
    assert not partial_path(path).exists()
    with open_artifact(path, kind="data") as art:
        assert sorted(art.splits) == ["test", "train", "val"]
        assert art.class_names == CLASSES and art.attrs["std"] == [0.4, 0.5, 0.6] and art.attrs["seed"] == 7
        for split in sizes:
            for name, arr in cols[split].items():
                np.testing.assert_array_equal(art.split(split)[name][:], arr)
    # the same file write_artifact makes from the whole arrays
    one_go = write_artifact(tmp_path / "one_go.h5", kind="data", splits=cols, **DATA_FINISH)
    with h5py.File(path, "r") as a, h5py.File(one_go, "r") as b:
        assert {k for k in a.attrs if k != "created"} == {k for k in b.attrs if k != "created"}
        for split in sizes:
            for name in cols[split]:
                da, db = a[split][name], b[split][name]
                assert da.dtype == db.dtype and da.chunks == db.chunks and da.compression == db.compression


def test_artifact_writer_leaves_nothing_when_it_fails(tmp_path):
    path = tmp_path / "data.h5"
    cols = _data_columns(20, 0)
    with pytest.raises(RuntimeError, match="decoding failed"):
        with hdf5.ArtifactWriter(path, "data", {"train": 20, "test": 20}, DATA_COLUMNS) as w:
            w.append("train", cols)
            raise RuntimeError("decoding failed")
    assert not path.exists() and not partial_path(path).exists()
    with hdf5.ArtifactWriter(path, "data", {"train": 20, "test": 20}, DATA_COLUMNS) as w:
        w.append("train", cols)
        w.append("test", _rows(cols, 0, 5))
        with pytest.raises(RuntimeError, match="test 5/20"):
            w.finish(**DATA_FINISH)
        with pytest.raises(ValueError, match="overflows"):
            w.append("test", cols)
        with pytest.raises(ValueError, match="columns"):
            w.append("test", {"images": cols["images"], "labels": cols["labels"]})
        with pytest.raises(ValueError, match="no split 'val'"):
            w.append("val", cols)
    assert not path.exists() and not partial_path(path).exists()  # left without finish: deleted
    # labels outside the classes: refused at finish, nothing left behind
    bad = dict(cols, labels=np.full(20, len(CLASSES), np.int64))
    with hdf5.ArtifactWriter(path, "data", {"train": 20, "test": 20}, DATA_COLUMNS) as w:
        w.append("train", bad)
        w.append("test", cols)
        with pytest.raises(ValueError, match="labels' outside"):
            w.finish(**DATA_FINISH)
    assert not path.exists() and not partial_path(path).exists()


def test_artifact_writer_rejects_bad_layouts(tmp_path):
    with pytest.raises(ValueError, match="needs splits"):
        hdf5.ArtifactWriter(tmp_path / "d.h5", "data", {"train": 3}, DATA_COLUMNS)
    with pytest.raises(ValueError, match="column 'images'"):
        hdf5.ArtifactWriter(tmp_path / "d.h5", "data", {"train": 3, "test": 3}, {"labels": ColumnSpec((), "int64")})
    with pytest.raises(ValueError, match="uint8 or float32"):
        hdf5.ArtifactWriter(tmp_path / "d.h5", "data", {"train": 3, "test": 3},
                            {**DATA_COLUMNS, "images": ColumnSpec((3, 8, 8), "float64")})
    with pytest.raises(ValueError, match="int64"):
        hdf5.ArtifactWriter(tmp_path / "d.h5", "data", {"train": 3, "test": 3},
                            {**DATA_COLUMNS, "labels": ColumnSpec((), "int32")})
    assert list(tmp_path.iterdir()) == []


def test_killed_artifact_writer_leaves_no_finished_file(tmp_path):
    from helpers import run_and_kill
    path = tmp_path / "data.h5"
    partial_path(path).write_bytes(b"an older killed run's leftover")
    code = f"""
import time, numpy as np
from notbugs import hdf5
cols = {{"images": hdf5.ColumnSpec((3, 8, 8), "uint8"), "labels": hdf5.ColumnSpec((), "int64")}}
w = hdf5.ArtifactWriter({str(path)!r}, "data", {{"train": 10, "test": 10}}, cols)
w.append("train", {{"images": np.zeros((10, 3, 8, 8), np.uint8), "labels": np.zeros(10, np.int64)}})
print("train written", flush=True)
time.sleep(60)
"""
    run_and_kill(code, trigger="train written")
    assert not path.exists() and partial_path(path).exists()
    # a rerun starts afresh and finishes normally
    with hdf5.ArtifactWriter(path, "data", {"train": 10, "test": 10}, DATA_COLUMNS) as w:
        cols = _data_columns(10, 1)
        w.append("train", cols)
        w.append("test", cols)
        w.finish(**DATA_FINISH)
    images, _ = load_split(path, "test", kind="data")
    np.testing.assert_array_equal(images, cols["images"])
