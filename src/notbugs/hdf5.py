"""The one place that knows the HDF5 layout of every notbugs artifact.

Layout (format version 1), readable with nothing but h5py::

    /                       attrs: format="notbugs", format_version, kind, notbugs_version,
                                   config (JSON of the config subtree that made the file),
                                   seed, source (human description), created (UTC ISO time),
                                   plus kind-specific attributes (attack parameters, ...)
    /class_names            (C,) variable-length UTF-8 strings
    /<split>/images         (N, C, H, W) uint8 for natural data, float32 for anything perturbed
    /<split>/labels         (N,) int64, the label a model is trained/tested with
    /<split>/<column>       (N, ...) optional per-example columns, e.g. for constructed sets:
                            orig_index, orig_label, loss, perturbation_norm, target_reached;
                            for Restricted ImageNet data: imagenet_index (the image's ImageNet-1k
                            class index, its position in the sorted list of the 1000 wnids)

``kind`` is "data" (splits ``train`` and ``test``, ``val`` if held out, and ``extra_train``: images only
sources train on, if asked for), "constructed" (split ``train``) or
"evaluation" (split ``test``, no images: per-example predictions of one model on the data's
test split, with columns clean_pred and, per attack radius ε, robust_pred_eps<ε> and
adv_norm_eps<ε>).
Every dataset is chunked along N and gzip-compressed so readers can stream it. A chunk holds
``ROWS_PER_CHUNK`` (256) rows, fewer when that would exceed ``CHUNK_BYTES`` (4 MiB): 256 rows for
CIFAR-sized images, 27 rows of 3×224×224 uint8 images.

Writes are atomic: a file only ever appears under its final name once complete.
:class:`ArtifactWriter` streams a whole artifact (every split) that need not fit in memory, chunk
by chunk, into a ``.partial`` file that is renamed only when every row is written.
:class:`ChunkedWriter` fills one split and additionally survives being killed: a rerun with the
same fingerprint continues after the last finished chunk.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Mapping, Sequence

import h5py
import numpy as np

from notbugs import __version__
from notbugs.runtime import atomic_write, partial_path

FORMAT = "notbugs"
FORMAT_VERSION = 1
KINDS = {"data": ("train", "test"), "constructed": ("train",), "evaluation": ("test",)}
OPTIONAL_SPLITS = {"data": ("val", "extra_train")}  # checked like the others when present
IMAGELESS_KINDS = ("evaluation",)
IMAGE_DTYPES = (np.dtype("uint8"), np.dtype("float32"))
ROWS_PER_CHUNK = 256
CHUNK_BYTES = 4 * 1024 * 1024  # a chunk stays a few MB however large one row is
CHUNK_CACHE_BYTES = 16 * 1024 * 1024  # per dataset, so a partly written chunk stays cached


class ArtifactError(ValueError):
    """An HDF5 file that is missing, foreign, truncated or not laid out as notbugs writes it."""


def chunk_rows(row_shape: Sequence[int], dtype) -> int:
    """Rows per HDF5 chunk for rows of ``row_shape`` and ``dtype``: ``ROWS_PER_CHUNK``, or fewer so
    that a chunk stays within ``CHUNK_BYTES`` (at least one row)."""
    row_bytes = int(np.prod(row_shape, dtype=np.int64)) * np.dtype(dtype).itemsize
    return max(1, min(ROWS_PER_CHUNK, CHUNK_BYTES // max(1, row_bytes)))


def _dataset_kwargs(shape: tuple[int, ...], dtype) -> dict:
    chunk = (max(1, min(chunk_rows(shape[1:], dtype), shape[0])),) + tuple(shape[1:])
    return dict(chunks=chunk, compression="gzip", compression_opts=1, shuffle=True)


def _create_split(f: h5py.File, split: str, n_rows: int, columns: Mapping[str, "ColumnSpec"]) -> None:
    group = f.create_group(split)
    for name, spec in columns.items():
        shape = (n_rows,) + tuple(spec.shape)
        group.create_dataset(name, shape=shape, dtype=spec.dtype, **_dataset_kwargs(shape, spec.dtype))


def _seal(f: h5py.File, kind: str, class_names: Sequence[str], config: Mapping, seed: int, source: str,
          extra_attrs: Mapping | None) -> None:
    """Turn a partial file into a finished artifact's content: drop the resume bookkeeping, write
    the root attributes and the class names."""
    for key in ("fingerprint", "rows_done", "state"):
        if key in f.attrs:
            del f.attrs[key]
    _write_root_attrs(f, kind, config, seed, source, extra_attrs)
    f.create_dataset("class_names", data=np.array(list(class_names), dtype=h5py.string_dtype()))


def _write_root_attrs(f: h5py.File, kind: str, config: Mapping, seed: int, source: str,
                      extra_attrs: Mapping | None) -> None:
    f.attrs["format"] = FORMAT
    f.attrs["format_version"] = FORMAT_VERSION
    f.attrs["kind"] = kind
    f.attrs["notbugs_version"] = __version__
    f.attrs["config"] = json.dumps(config, sort_keys=True, default=str)
    f.attrs["seed"] = int(seed)
    f.attrs["source"] = source
    f.attrs["created"] = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
    for key, value in (extra_attrs or {}).items():
        f.attrs[key] = json.dumps(value) if isinstance(value, (dict, list)) else value


def _check_split_arrays(split: str, arrays: Mapping[str, np.ndarray]) -> None:
    images, labels = arrays.get("images"), arrays.get("labels")
    if images is None or labels is None:
        raise ValueError(f"split {split!r} needs 'images' and 'labels'")
    if images.ndim != 4 or images.dtype not in IMAGE_DTYPES:
        raise ValueError(f"split {split!r}: images must be N×C×H×W uint8 or float32, "
                         f"got {images.shape} {images.dtype}")
    for name, arr in arrays.items():
        if len(arr) != len(images):
            raise ValueError(f"split {split!r}: column {name!r} has {len(arr)} rows, "
                             f"images has {len(images)}")


def write_artifact(path: str | os.PathLike, *, kind: str, splits: Mapping[str, Mapping[str, np.ndarray]],
                   class_names: Sequence[str], config: Mapping, seed: int, source: str,
                   extra_attrs: Mapping | None = None) -> Path:
    """Write a whole artifact atomically (temporary file, then rename)."""
    path = Path(path)
    if kind not in KINDS:
        raise ValueError(f"unknown artifact kind {kind!r}; expected one of {sorted(KINDS)}")
    missing = set(KINDS[kind]) - set(splits)
    if missing:
        raise ValueError(f"a {kind!r} artifact needs splits {sorted(missing)}")
    for split, arrays in splits.items():
        _check_split_arrays(split, arrays)
    with atomic_write(path) as tmp, h5py.File(tmp, "w") as f:
        _write_root_attrs(f, kind, config, seed, source, extra_attrs)
        f.create_dataset("class_names", data=np.array(list(class_names), dtype=h5py.string_dtype()))
        for split, arrays in splits.items():
            group = f.create_group(split)
            for name, arr in arrays.items():
                arr = np.asarray(arr)
                if name == "labels":
                    arr = arr.astype(np.int64)
                group.create_dataset(name, data=arr, **_dataset_kwargs(arr.shape, arr.dtype))
    return path


@dataclass
class ColumnSpec:
    shape: tuple[int, ...]  # per-example shape
    dtype: str


@dataclass
class ChunkedWriter:
    """Fill one split of an artifact chunk by chunk; resumable after a kill.

    The partial file carries ``fingerprint`` (a string describing everything that determines
    the content). A rerun with the same fingerprint continues at ``rows_done``; any other
    partial file is discarded. :meth:`finish` renames the file to its final name.
    """

    path: Path
    n_rows: int
    columns: Mapping[str, ColumnSpec]
    fingerprint: str
    split: str = "train"
    rows_done: int = field(init=False, default=0)

    def __post_init__(self) -> None:
        self.path = Path(self.path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._partial = partial_path(self.path)
        self._file = self._reopen() or self._create()

    def _reopen(self) -> h5py.File | None:
        if not self._partial.exists():
            return None
        try:
            f = h5py.File(self._partial, "a")
        except OSError:
            self._partial.unlink()
            return None
        same = (f.attrs.get("fingerprint") == self.fingerprint
                and self.split in f
                and all(name in f[self.split] for name in self.columns)
                and f[self.split]["labels"].shape[0] == self.n_rows)
        if not same:
            f.close()
            self._partial.unlink()
            return None
        self.rows_done = int(f.attrs["rows_done"])
        return f

    def _create(self) -> h5py.File:
        f = h5py.File(self._partial, "w")
        f.attrs["fingerprint"] = self.fingerprint
        f.attrs["rows_done"] = 0
        _create_split(f, self.split, self.n_rows, self.columns)
        f.flush()
        return f

    @property
    def done(self) -> bool:
        return self.rows_done >= self.n_rows

    def append(self, arrays: Mapping[str, np.ndarray]) -> None:
        n = len(next(iter(arrays.values())))
        start, stop = self.rows_done, self.rows_done + n
        if stop > self.n_rows:
            raise ValueError(f"{self.path}: appending {n} rows overflows {self.n_rows}")
        if set(arrays) != set(self.columns):
            raise ValueError(f"{self.path}: columns {sorted(arrays)} != {sorted(self.columns)}")
        group = self._file[self.split]
        for name, arr in arrays.items():
            group[name][start:stop] = arr
        # Data first, then the counter: a kill in between only redoes one chunk.
        self._file.flush()
        self._file.attrs["rows_done"] = stop
        self._file.flush()
        self.rows_done = stop

    def dataset(self, name: str) -> h5py.Dataset:
        """One column as an h5py dataset, to stream (only the first ``rows_done`` rows are final)."""
        return self._file[self.split][name]

    def read_column(self, name: str) -> np.ndarray:
        """Everything written so far in one column (e.g. to aggregate diagnostics)."""
        return self._file[self.split][name][: self.rows_done]

    def finish(self, *, kind: str, class_names: Sequence[str], config: Mapping, seed: int,
               source: str, extra_attrs: Mapping | None = None) -> Path:
        if not self.done:
            raise RuntimeError(f"{self.path}: only {self.rows_done}/{self.n_rows} rows written")
        f = self._file
        _seal(f, kind, class_names, config, seed, source, extra_attrs)
        f.close()
        os.replace(self._partial, self.path)
        return self.path

    def close(self) -> None:
        if self._file.id.valid:
            self._file.close()


class ArtifactWriter:
    """Stream a whole artifact, every split, into a file that need not fit in memory.

    The datasets are created up front with their final row counts (``splits``: rows per split;
    ``columns``: per-example shape and dtype of each column, the same in every split) inside
    ``<path>.partial``, and :meth:`append` fills each split in order, a block of rows at a time
    (blocks of :meth:`chunk_rows` rows write whole HDF5 chunks). :meth:`finish` writes the root
    attributes and ``class_names``, checks the layout as a reader would, and only then renames
    the file to ``path``. Used as a context manager, leaving the block without :meth:`finish`
    (an exception, Ctrl-C) deletes the partial file; a killed process leaves at most the
    ``.partial`` file, never a finished-looking one. With a ``fingerprint`` (everything that
    determines the content) a writer that finds a killed run's partial file of the same
    fingerprint and layout continues it: :attr:`rows_done` says where each split stands, and
    :attr:`state` returns what the last :meth:`append` stored with its rows (e.g. running
    statistics); any other partial file is started afresh. Typical use::

        columns = {"images": ColumnSpec((3, 224, 224), "uint8"), "labels": ColumnSpec((), "int64")}
        with ArtifactWriter(path, "data", {"train": n_train, "test": n_test}, columns) as w:
            for split, block in blocks:          # block: {column: rows}, in row order per split
                w.append(split, block)
            w.finish(class_names=names, config=cfg, seed=seed, source="...", extra_attrs={...})
    """

    def __init__(self, path: str | os.PathLike, kind: str, splits: Mapping[str, int],
                 columns: Mapping[str, ColumnSpec], fingerprint: str | None = None):
        if kind not in KINDS:
            raise ValueError(f"unknown artifact kind {kind!r}; expected one of {sorted(KINDS)}")
        missing = set(KINDS[kind]) - set(splits)
        if missing:
            raise ValueError(f"a {kind!r} artifact needs splits {sorted(missing)}")
        required = ("labels",) if kind in IMAGELESS_KINDS else ("images", "labels")
        for name in required:
            if name not in columns:
                raise ValueError(f"a {kind!r} artifact needs a column {name!r}")
        if "images" in columns and (len(columns["images"].shape) != 3
                                    or np.dtype(columns["images"].dtype) not in IMAGE_DTYPES):
            raise ValueError(f"images must be N×C×H×W uint8 or float32, got rows of "
                             f"{columns['images'].shape} {columns['images'].dtype}")
        if np.dtype(columns["labels"].dtype) != np.int64 or tuple(columns["labels"].shape) != ():
            raise ValueError("labels must be one int64 per row")
        self.path = Path(path)
        self.kind = kind
        self.n_rows = {split: int(n) for split, n in splits.items()}
        self.columns = dict(columns)
        self.rows_done = {split: 0 for split in splits}
        self.state = None
        self.fingerprint = fingerprint
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._partial = partial_path(self.path)
        self._file = self._reopen()
        if self._file is None:
            self._partial.unlink(missing_ok=True)  # another run's leftover
            self._file = h5py.File(self._partial, "w", rdcc_nbytes=CHUNK_CACHE_BYTES)
            try:
                for split, n in self.n_rows.items():
                    _create_split(self._file, split, n, self.columns)
                if fingerprint is not None:
                    self._file.attrs["fingerprint"] = fingerprint
                    self._file.attrs["rows_done"] = json.dumps(self.rows_done)
                self._file.flush()
            except BaseException:
                self.abort()
                raise

    def _reopen(self) -> h5py.File | None:
        """A killed run's partial file of the same fingerprint and layout, opened to continue."""
        if self.fingerprint is None or not self._partial.exists():
            return None
        try:
            f = h5py.File(self._partial, "a", rdcc_nbytes=CHUNK_CACHE_BYTES)
        except OSError:
            return None
        try:
            same = (f.attrs.get("fingerprint") == self.fingerprint
                    and set(f.keys()) == set(self.n_rows)
                    and all(set(f[s].keys()) == set(self.columns) for s in self.n_rows)
                    and all(f[s][c].shape == (n,) + tuple(spec.shape) and f[s][c].dtype == np.dtype(spec.dtype)
                            for s, n in self.n_rows.items() for c, spec in self.columns.items()))
            if same:
                self.rows_done = {s: int(v) for s, v in json.loads(f.attrs["rows_done"]).items()}
                self.state = json.loads(f.attrs["state"]) if "state" in f.attrs else None
                return f
        except (KeyError, ValueError, OSError):
            pass
        f.close()
        return None

    def __enter__(self) -> "ArtifactWriter":
        return self

    def __exit__(self, *exc) -> None:
        if self._file.id.valid or self._partial.exists():
            self.abort()

    def chunk_rows(self, column: str = "images") -> int:
        """Rows per HDF5 chunk of ``column`` (in the largest split)."""
        spec = self.columns[column]
        return max(1, min(chunk_rows(spec.shape, spec.dtype), max(self.n_rows.values())))

    @property
    def done(self) -> bool:
        return all(self.rows_done[s] >= n for s, n in self.n_rows.items())

    def append(self, split: str, arrays: Mapping[str, np.ndarray], state=None) -> None:
        """Write the next rows of ``split``: one array per column, all of the same length. With a
        fingerprint, ``state`` (anything JSON can hold) is stored with the row counts, for a
        resumed writer's :attr:`state`."""
        if split not in self.n_rows:
            raise ValueError(f"{self.path}: no split {split!r} (splits: {sorted(self.n_rows)})")
        if set(arrays) != set(self.columns):
            raise ValueError(f"{self.path}: columns {sorted(arrays)} != {sorted(self.columns)}")
        lengths = {len(arr) for arr in arrays.values()}
        if len(lengths) != 1:
            raise ValueError(f"{self.path}: columns of different lengths {sorted(lengths)}")
        n = lengths.pop()
        start, stop = self.rows_done[split], self.rows_done[split] + n
        if stop > self.n_rows[split]:
            raise ValueError(f"{self.path}: appending {n} rows to {split!r} overflows {self.n_rows[split]}")
        group = self._file[split]
        for name, arr in arrays.items():
            group[name][start:stop] = arr
        self.rows_done[split] = stop
        if self.fingerprint is not None:
            # Data first, then the counters: a kill in between only redoes one block.
            self._file.flush()
            self._file.attrs["rows_done"] = json.dumps(self.rows_done)
            if state is not None:
                self._file.attrs["state"] = json.dumps(state)
            self._file.flush()

    def finish(self, *, class_names: Sequence[str], config: Mapping, seed: int, source: str,
               extra_attrs: Mapping | None = None) -> Path:
        """Write the root attributes and class names, check the layout, rename to ``path``."""
        if not self.done:
            progress = ", ".join(f"{s} {self.rows_done[s]}/{n}" for s, n in self.n_rows.items())
            raise RuntimeError(f"{self.path}: not every row is written ({progress})")
        f = self._file
        _seal(f, self.kind, class_names, config, seed, source, extra_attrs)
        try:
            _check_layout(self.path, f, self.kind)
        except ArtifactError as exc:
            self.abort()
            raise ValueError(f"refusing to finish an invalid artifact: {exc}") from exc
        f.close()
        os.replace(self._partial, self.path)
        return self.path

    def abort(self) -> None:
        """Close and delete the partial file (nothing appears under ``path``)."""
        if self._file.id.valid:
            self._file.close()
        self._partial.unlink(missing_ok=True)


class Split:
    """Lazy view of one split; slices read only what they ask for."""

    def __init__(self, group: h5py.Group):
        self._group = group

    def __len__(self) -> int:
        return self._group["labels"].shape[0]

    def __getitem__(self, name: str) -> h5py.Dataset:
        return self._group[name]

    def __contains__(self, name: str) -> bool:
        return name in self._group

    @property
    def columns(self) -> list[str]:
        return list(self._group.keys())

    @property
    def images(self) -> h5py.Dataset:
        return self._group["images"]

    @property
    def labels(self) -> np.ndarray:
        return self._group["labels"][:]

    def iter_chunks(self, size: int, start: int = 0, columns: Sequence[str] = ("images", "labels"),
                    ) -> Iterator[tuple[int, dict[str, np.ndarray]]]:
        """Stream (offset, {column: rows}) in pieces of ``size`` rows."""
        for lo in range(start, len(self), size):
            hi = min(lo + size, len(self))
            yield lo, {name: self._group[name][lo:hi] for name in columns}


class Artifact:
    """A validated, open notbugs HDF5 file. Use as a context manager."""

    def __init__(self, path: str | os.PathLike, kind: str | None = None):
        self.path = Path(path)
        self._file = _open_checked(self.path, kind)
        self.kind: str = self._file.attrs["kind"]

    def __enter__(self) -> "Artifact":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self._file.close()

    def split(self, name: str) -> Split:
        if name not in self._file:
            raise ArtifactError(f"{self.path}: has no split {name!r} (has {self.splits})")
        return Split(self._file[name])

    @property
    def splits(self) -> list[str]:
        return [k for k in self._file.keys() if isinstance(self._file[k], h5py.Group)]

    @property
    def class_names(self) -> list[str]:
        return [s.decode() if isinstance(s, bytes) else str(s) for s in self._file["class_names"][:]]

    @property
    def attrs(self) -> dict:
        out = {}
        for key, value in self._file.attrs.items():
            if isinstance(value, np.generic):
                value = value.item()
            if isinstance(value, str) and value[:1] in "{[":
                try:
                    value = json.loads(value)
                except json.JSONDecodeError:
                    pass
            out[key] = value
        return out

    @property
    def config(self) -> dict:
        return json.loads(self._file.attrs["config"])


def _open_checked(path: Path, kind: str | None) -> h5py.File:
    if not path.exists():
        raise ArtifactError(f"{path}: no such file")
    if not h5py.is_hdf5(path):
        raise ArtifactError(f"{path}: not an HDF5 file (truncated, or not written by notbugs)")
    try:
        f = h5py.File(path, "r")
    except OSError as exc:
        raise ArtifactError(f"{path}: cannot be opened as HDF5, probably truncated or corrupt ({exc})") from exc
    try:
        _check_layout(path, f, kind)
    except ArtifactError:
        f.close()
        raise
    return f


def _check_layout(path: Path, f: h5py.File, kind: str | None) -> None:
    if f.attrs.get("format") != FORMAT:
        raise ArtifactError(f"{path}: not a notbugs artifact (root attribute 'format' is "
                            f"{f.attrs.get('format')!r}, expected {FORMAT!r})")
    version = int(f.attrs.get("format_version", -1))
    if version != FORMAT_VERSION:
        raise ArtifactError(f"{path}: layout version {version}, this notbugs reads {FORMAT_VERSION}")
    file_kind = f.attrs.get("kind")
    if file_kind not in KINDS:
        raise ArtifactError(f"{path}: unknown artifact kind {file_kind!r}")
    if kind is not None and file_kind != kind:
        raise ArtifactError(f"{path}: is a {file_kind!r} artifact, expected {kind!r}")
    if "class_names" not in f:
        raise ArtifactError(f"{path}: missing dataset 'class_names'")
    n_classes = f["class_names"].shape[0]
    present = [s for s in OPTIONAL_SPLITS.get(file_kind, ()) if s in f]
    for split in (*KINDS[file_kind], *present):
        if split not in f:
            raise ArtifactError(f"{path}: missing split group '/{split}'")
        group = f[split]
        required = ("labels",) if file_kind in IMAGELESS_KINDS else ("images", "labels")
        for name in required:
            if name not in group:
                raise ArtifactError(f"{path}: missing dataset '/{split}/{name}'")
        labels = group["labels"]
        if "images" in required:
            images = group["images"]
            if images.ndim != 4 or images.dtype not in IMAGE_DTYPES:
                raise ArtifactError(f"{path}: '/{split}/images' must be N×C×H×W uint8/float32, "
                                    f"is {images.shape} {images.dtype}")
        for name, ds in group.items():
            if ds.shape[0] != labels.shape[0]:
                raise ArtifactError(f"{path}: '/{split}/{name}' has {ds.shape[0]} rows but "
                                    f"labels has {labels.shape[0]}")
        try:
            lab = labels[:]
        except OSError as exc:
            raise ArtifactError(f"{path}: '/{split}/labels' cannot be read, file is corrupt ({exc})") from exc
        if len(lab) and (lab.min() < 0 or lab.max() >= n_classes):
            raise ArtifactError(f"{path}: '/{split}/labels' outside 0..{n_classes - 1}")


def open_artifact(path: str | os.PathLike, kind: str | None = None) -> Artifact:
    return Artifact(path, kind)


def load_split(path: str | os.PathLike, split: str, kind: str | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Read one split's images and labels fully into memory."""
    with open_artifact(path, kind) as art:
        s = art.split(split)
        try:
            return s.images[:], s.labels
        except OSError as exc:
            raise ArtifactError(f"{path}: '/{split}/images' cannot be read, file is corrupt ({exc})") from exc
