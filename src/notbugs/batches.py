"""Images in batches: [0,1] float conversion, row reads from HDF5 datasets, batched prediction."""

from __future__ import annotations

from typing import Iterator

import numpy as np
import torch


def to_float(images: torch.Tensor) -> torch.Tensor:
    """uint8 images to [0,1] floats; float images unchanged (as float32)."""
    return images.float().div_(255) if images.dtype == torch.uint8 else images.float()


def read_rows(dataset, rows: np.ndarray) -> np.ndarray:
    """``dataset[rows]`` for an h5py dataset or array, in the order of ``rows``."""
    if len(rows) and np.array_equal(rows, np.arange(rows[0], rows[0] + len(rows))):
        return dataset[rows[0]:rows[0] + len(rows)]  # a slice: h5py's point selection is slow
    order = np.argsort(rows)
    out = np.empty((len(rows),) + dataset.shape[1:], dtype=dataset.dtype)
    out[order] = dataset[rows[order]]
    return out


def float_batches(images, batch_size: int, device: torch.device | str = "cpu"
                  ) -> Iterator[tuple[int, torch.Tensor]]:
    """(first row, float batch on ``device``) over ``images`` (an array, h5py dataset or tensor)."""
    for lo in range(0, len(images), batch_size):
        batch = images[lo:lo + batch_size]
        if not isinstance(batch, torch.Tensor):
            batch = torch.from_numpy(np.asarray(batch))
        yield lo, to_float(batch).to(device)


def classes(model: torch.nn.Module, images, batch_size: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """The model's class for every image, batch by batch, as a tensor on ``device``."""
    with torch.no_grad():
        return torch.cat([model(x).argmax(1) for _, x in float_batches(images, batch_size, device)])


def predict(model: torch.nn.Module, images, batch_size: int, device: torch.device | str = "cpu") -> np.ndarray:
    """The model's class for every image, batch by batch."""
    return classes(model, images, batch_size, device).cpu().numpy().astype(np.int64)
