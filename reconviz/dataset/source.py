"""This process's share of the data, batch by batch, resumable: (batch number, first index, x, y).

The data's batches are numbered 0, 1, ... in the data's order (``batch_size``
consecutive samples each; a DataLoader's own batches); batch b belongs to rank
b mod P. Sources that can be indexed (a tensor, a pair (x, y), a ``.npy`` file, a
map-style Dataset, a folder of images) read only this rank's batches, from
``start`` on; a DataLoader or an IterableDataset is read in order by every rank,
each keeping its own batches (so it must yield the same order on every rank and
in every run: no shuffling, for resume and sharding to mean anything).

Reading and checking a batch is :func:`reconviz.data.batches`'s work; the
``.npy`` file is memory-mapped and sliced here.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, IterableDataset, Subset

from ..data import ImageFolder, batches
from ..errors import InputError
from .distributed import World

__all__ = ["shards", "length", "prepare"]

Shard = tuple[int, int, Tensor, "Tensor | None"]


def prepare(data: Any) -> Any:
    """A path becomes what it holds: a ``.npy`` file a memory-mapped array, a folder an :class:`ImageFolder`."""
    if not isinstance(data, (str, os.PathLike)):
        return data
    path = Path(data)
    if path.suffix.lower() == ".npy":
        if not path.is_file():
            raise InputError(f"cannot read data {path}: there is no such file")
        try:
            return np.load(path, mmap_mode="r", allow_pickle=False)
        except ValueError as e:
            raise InputError(f"cannot read data {path} as a .npy array ({e}); save it with np.save") from e
    if path.is_dir():
        return ImageFolder(path)
    raise InputError(f"data {path} is neither a .npy file nor a folder of images (one subfolder per class)")


def length(data: Any) -> int | None:
    """The number of samples of an indexable source (None for a DataLoader or an IterableDataset)."""
    if isinstance(data, (Tensor, np.ndarray)):
        return int(data.shape[0]) if data.ndim else 0
    if isinstance(data, tuple) and len(data) == 2 and hasattr(data[0], "shape"):
        return int(data[0].shape[0])
    if isinstance(data, Dataset) and not isinstance(data, IterableDataset) and hasattr(data, "__len__"):
        return len(data)  # type: ignore[arg-type]
    return None


def shards(data: Any, batch_size: int, world: World, start: int = 0, *, device: Any = None,
           dtype: torch.dtype = torch.float64) -> Iterator[Shard]:
    """This rank's batches numbered ``start`` and later: (number, index of the first sample, x, y or None)."""
    n = length(data)
    if n is None:
        yield from _streamed(data, batch_size, world, start, device, dtype)
        return
    for b in range(start, math.ceil(n / batch_size)):
        if b % world.size == world.rank:
            s, e = b * batch_size, min(n, (b + 1) * batch_size)
            x, y = next(batches(_slice(data, s, e), e - s, device=device, dtype=dtype))
            yield b, s, _standard(x), y


def _streamed(data: Any, batch_size: int, world: World, start: int, device: Any, dtype: torch.dtype) -> Iterator[Shard]:
    offset = 0
    for b, (x, y) in enumerate(batches(data, batch_size, device=device, dtype=dtype)):
        if b >= start and b % world.size == world.rank:
            yield b, offset, _standard(x), y
        offset += x.shape[0]


def _standard(x: Tensor) -> Tensor:
    """x with the standard (row-major) strides: a source's layout (e.g. stride 1 on a channel axis of
    size 1, which torch reads as channels-last) must not change which kernels run and so the rounding."""
    return x.clone(memory_format=torch.contiguous_format)


def _slice(data: Any, s: int, e: int) -> Any:
    if isinstance(data, np.ndarray):
        return torch.from_numpy(np.array(data[s:e]))  # a copy: the memory-mapped file stays read-only
    if isinstance(data, Tensor):
        return data[s:e]
    if isinstance(data, tuple):
        return tuple(torch.as_tensor(np.array(a[s:e]) if isinstance(a, np.ndarray) else a[s:e]) for a in data)
    return Subset(data, range(s, e))


def first_sample(data: Any) -> Tensor:
    """The data's first sample as a batch of one (for the shapes), or InputError for empty data."""
    for _, _, x, _ in shards(data, 1, World()):
        return x[:1]
    raise InputError("the data is empty: give at least one sample")


def is_loader(data: Any) -> bool:
    return isinstance(data, (DataLoader, IterableDataset))
