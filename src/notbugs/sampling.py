"""Seeded draws shared by the stages: target classes, start images, and the per-chunk
generators that make chunked jobs resume with the same random numbers they would have drawn."""

from __future__ import annotations

import hashlib
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    import torch

TARGET_SCHEMES = ("random", "next", "other")


def derived_seed(*parts) -> int:
    """A seed in [0, 2³¹) determined by ``parts`` alone (stable across runs and machines)."""
    digest = hashlib.sha256("/".join(map(str, parts)).encode()).digest()
    return int.from_bytes(digest[:4], "little") & 0x7FFF_FFFF


def target_seed(seed: int, train_set: str, arch: str, replicate: int) -> int:
    """The seed of one target model: its initial weights, data order and augmentation draws differ
    from every source's (which use ``seed`` itself) and from every other target's."""
    return derived_seed("target", seed, train_set, arch, replicate)


def chunk_generator(seed: int, offset: int) -> torch.Generator:
    """The generator for the chunk or batch starting at row ``offset``: one per chunk, not one
    stream for the whole set, so a job resumed at a chunk boundary draws the same numbers."""
    import torch
    return torch.Generator().manual_seed(seed * 1_000_003 + offset)


def epoch_generator(seed: int, epoch: int) -> torch.Generator:
    """The generator of one training epoch (shuffle, augmentation, attack starts)."""
    import torch
    return torch.Generator().manual_seed(seed * 100_003 + epoch)


def choose_targets(scheme: str, labels: np.ndarray, n_classes: int, rng: np.random.Generator) -> np.ndarray:
    """Target class per example: ``random`` (uniform over all classes, so t = y about 1/C of the
    time), ``next`` (t = (y+1) mod C) or ``other`` (t = y + U{1..C−1}, never the true label)."""
    if scheme == "random":
        return rng.integers(0, n_classes, size=len(labels)).astype(np.int64)
    if scheme == "next":
        return (labels + 1) % n_classes
    if scheme == "other":
        return (labels + rng.integers(1, n_classes, size=len(labels))) % n_classes
    raise ValueError(f"unknown target scheme {scheme!r}; expected one of {TARGET_SCHEMES}")


def derangement(n: int, rng: np.random.Generator) -> np.ndarray:
    """A random permutation with no fixed point: every image starts from *another* image."""
    if n < 2:
        raise ValueError("inversion from another image needs at least two training images")
    perm = rng.permutation(n)
    for i in np.flatnonzero(perm == np.arange(n)):
        if perm[i] == i:  # an earlier swap may have moved it already
            # Swapping a fixed point with its neighbour never creates a new one (perm[j] != i).
            j = (i + 1) % n
            perm[i], perm[j] = perm[j], perm[i]
    return perm


def balanced_subset(labels: np.ndarray, n: int | None, n_classes: int, seed: int) -> np.ndarray:
    """Indices of a seeded, class-balanced subset of size ``n`` (all indices if n is None)."""
    if n is None or n >= len(labels):
        return np.arange(len(labels))
    if n % n_classes:
        raise ValueError(f"subset size {n} is not a multiple of the {n_classes} classes")
    rng = np.random.default_rng(seed)
    per_class = n // n_classes
    picks = []
    for c in range(n_classes):
        members = np.flatnonzero(labels == c)
        if len(members) < per_class:
            raise ValueError(f"class {c} has {len(members)} examples, fewer than {per_class} asked for")
        picks.append(rng.choice(members, size=per_class, replace=False))
    return np.sort(np.concatenate(picks))
