"""Streaming data in batches: one reader for every dataset-scale feature.

A *data source* is any of

* a tensor ``x`` (N, ...) (no labels), or a pair ``(x, y)`` of tensors / arrays
  (``y``: N integer labels);
* a :class:`torch.utils.data.Dataset` whose items are ``x_i`` or ``(x_i, y_i, ...)``;
* a :class:`torch.utils.data.DataLoader` yielding ``x`` or ``(x, y, ...)`` batches
  (its own batch size is kept);
* a folder of images with one subfolder per class (read with Pillow, values in
  [0, 1]; :class:`ImageFolder`); the subfolders, sorted by name, are classes 0, 1, ...;
* :class:`Mapped` (any of these with a function applied to each batch's x).

:func:`batches` turns any of them into ``(x, y)`` batches, ``x`` a floating
tensor (B, ...) and ``y`` a LongTensor (B,) of labels or None, checked on the
way (floating point, finite, one sample shape). Nothing is loaded whole: memory
is one batch.

>>> for x, y in batches(dataset, batch_size=128, dtype=torch.float64):   # doctest: +SKIP
...     ...
>>> x, y = collect(dataset)                          # everything, for small datasets   # doctest: +SKIP
>>> source = open_path("data/")                      # a folder, .npy or .npz file (the CLI)  # doctest: +SKIP
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence, Union

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from .errors import InputError

__all__ = ["Batch", "DataSource", "ImageFolder", "Mapped", "IMAGE_SUFFIXES", "batches", "collect", "num_samples",
           "class_names", "open_path", "normalise", "normaliser"]

Batch = tuple[Tensor, Union[Tensor, None]]
DataSource = Union[Tensor, tuple, Dataset, DataLoader, str, os.PathLike, "Mapped"]

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm")


class ImageFolder(Dataset):
    """Images in ``root/<class>/<file>``: item i is ``(x_i, y_i)``, ``x_i`` float32 (C, H, W) in [0, 1].

    Args:
        root: the folder; each subfolder (sorted by name) is one class.
        size: (H, W) to resize every image to (bilinear); needed when sizes differ.
        channels: 1 (grey) or 3 (RGB); default: 1 when the first image is grey, else 3.
    """

    def __init__(self, root: str | os.PathLike, size: Sequence[int] | None = None, channels: int | None = None):
        self.root = Path(root)
        if not self.root.is_dir():
            raise InputError(f"{self.root} is not a folder: give a folder with one subfolder of images per class")
        self.classes = sorted(d.name for d in self.root.iterdir() if d.is_dir() and not d.name.startswith("."))
        if not self.classes:
            raise InputError(f"{self.root} has no subfolders: put the images of each class in its own subfolder")
        self.samples = [(f, y) for y, c in enumerate(self.classes) for f in sorted((self.root / c).iterdir())
                        if f.suffix.lower() in IMAGE_SUFFIXES]
        if not self.samples:
            raise InputError(f"no image files ({', '.join(IMAGE_SUFFIXES[:4])}, ...) in the subfolders of {self.root}")
        if channels not in (None, 1, 3):
            raise InputError(f"channels must be 1 (grey), 3 (RGB) or None (from the first image), got {channels!r}")
        self.size = None if size is None else (int(size[0]), int(size[1]))
        self.channels = channels or self._channels_of(self.samples[0][0])

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> tuple[Tensor, int]:
        path, label = self.samples[i]
        img = self._open(path).convert("L" if self.channels == 1 else "RGB")
        if self.size is not None:
            from PIL import Image

            img = img.resize((self.size[1], self.size[0]), Image.BILINEAR)
        arr = np.asarray(img, dtype=np.float32) / 255.0
        arr = arr[None] if arr.ndim == 2 else arr.transpose(2, 0, 1)
        return torch.from_numpy(np.ascontiguousarray(arr)), label

    def _channels_of(self, path: Path) -> int:
        return 1 if self._open(path).mode in ("1", "L", "LA", "I", "I;16", "F") else 3

    @staticmethod
    def _open(path: Path) -> Any:
        from PIL import Image, UnidentifiedImageError

        try:
            with Image.open(path) as img:
                img.load()
                return img
        except (UnidentifiedImageError, OSError) as e:
            raise InputError(f"cannot read image {path}: {e}; remove it or convert it to PNG") from None


class Mapped:
    """A data source whose samples pass through ``fn`` batch by batch (``fn(x) -> x'``, e.g. a
    normalisation ``(x * scale - mean) / std``); labels, length and class names are the source's."""

    def __init__(self, source: DataSource, fn: Callable[[Tensor], Tensor]):
        self.source, self.fn = source, fn


def batches(data: DataSource, batch_size: int = 256, *, dtype: torch.dtype | None = None,
            device: torch.device | str | None = None, size: Sequence[int] | None = None,
            channels: int | None = None) -> Iterator[Batch]:
    """``(x, y)`` batches of ``data`` (see the module doc); ``y`` is None when there are no labels.

    ``dtype`` / ``device``: cast ``x`` (default: as stored, float32 for folders). ``size`` and
    ``channels`` apply to a folder of images (:class:`ImageFolder`). A DataLoader keeps its batch size.
    """
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise InputError(f"batch_size must be a positive int, got {batch_size!r}")
    if isinstance(data, Mapped):
        for i, (x, y) in enumerate(batches(data.source, batch_size, size=size, channels=channels)):
            x, y = _split((data.fn(x), y), i)
            yield x.to(device=device, dtype=dtype or x.dtype), y if y is None else y.to(device)
        return
    shape: tuple[int, ...] | None = None
    for i, raw in enumerate(_raw_batches(data, batch_size, size, channels)):
        x, y = _split(raw, i)
        if shape is None:
            shape = tuple(x.shape[1:])
        elif tuple(x.shape[1:]) != shape:
            raise InputError(f"batch {i} has samples of shape {tuple(x.shape[1:])}, earlier ones {shape}: "
                             "all samples must have one shape (resize images with size=(H, W))")
        yield x.to(device=device, dtype=dtype or x.dtype), y if y is None else y.to(device)


def collect(data: DataSource, batch_size: int = 256, **options: Any) -> Batch:
    """All of ``data`` as one ``(x, y)`` pair (use for small datasets only); options as in :func:`batches`."""
    xs, ys = [], []
    for x, y in batches(data, batch_size, **options):
        xs.append(x)
        ys.append(y)
    if not xs:
        raise InputError("the data is empty: give at least one sample")
    labelled = [y is not None for y in ys]
    if any(labelled) and not all(labelled):
        raise InputError("some batches have labels and some do not: give labels for all or none")
    return torch.cat(xs), (torch.cat(ys) if all(labelled) else None)  # type: ignore[arg-type]


def num_samples(data: DataSource) -> int | None:
    """The number of samples, when it is known without reading the data (else None)."""
    if isinstance(data, Tensor):
        return int(data.shape[0]) if data.dim() else None
    if isinstance(data, tuple) and data and hasattr(data[0], "shape"):
        return int(data[0].shape[0])
    if isinstance(data, Mapped):
        return num_samples(data.source)
    if isinstance(data, DataLoader):
        data = data.dataset
    if isinstance(data, (str, os.PathLike)):
        return None
    try:
        return len(data)  # type: ignore[arg-type]
    except TypeError:
        return None


def class_names(data: DataSource) -> list[str] | None:
    """The class names of a folder (its subfolders) or of a dataset with a ``classes`` attribute."""
    if isinstance(data, Mapped):
        return class_names(data.source)
    if isinstance(data, (str, os.PathLike)):
        return ImageFolder(data).classes
    source = data.dataset if isinstance(data, DataLoader) else data
    names = getattr(source, "classes", None)
    return [str(c) for c in names] if isinstance(names, (list, tuple)) else None


# --------------------------------------------------------------------------
# internals
# --------------------------------------------------------------------------


def _raw_batches(data: Any, batch_size: int, size: Any, channels: Any) -> Iterator[Any]:
    """The source's batches as it gives them (a tensor, or a tuple/list whose first items are x, y)."""
    if isinstance(data, (str, os.PathLike)):
        data = ImageFolder(data, size, channels)
    if isinstance(data, (Tensor, np.ndarray)):
        x = torch.as_tensor(data)
        _check_batched(x, "data")
        for s in range(0, x.shape[0], batch_size):
            yield x[s : s + batch_size]
    elif isinstance(data, tuple) and len(data) == 2 and hasattr(data[0], "shape"):
        x, y = torch.as_tensor(data[0]), torch.as_tensor(data[1])
        _check_batched(x, "data[0] (x)")
        if y.shape[:1] != x.shape[:1]:
            raise InputError(f"data = (x, y): x has {x.shape[0]} samples but y has shape {tuple(y.shape)}")
        for s in range(0, x.shape[0], batch_size):
            yield x[s : s + batch_size], y[s : s + batch_size]
    elif isinstance(data, DataLoader):
        yield from data
    elif isinstance(data, Dataset):
        yield from _collated(DataLoader(data, batch_size=batch_size, shuffle=False, num_workers=0))
    else:
        raise InputError(
            f"data must be a tensor (N, ...), a pair (x, y), a torch Dataset or DataLoader, or a folder of "
            f"images with one subfolder per class; got {type(data).__name__}"
        )


def _collated(loader: DataLoader) -> Iterator[Any]:
    """The loader's batches; a failure to stack samples of different shapes as an InputError."""
    it = iter(loader)
    while True:
        try:
            batch = next(it)
        except StopIteration:
            return
        except RuntimeError as e:
            raise InputError(f"cannot batch the dataset's samples ({e}); give them one shape "
                             "(for a folder of images: size=(H, W))") from e
        yield batch


def _check_batched(x: Tensor, what: str) -> None:
    if x.dim() < 2 or x.shape[0] == 0:
        raise InputError(f"{what} must be a non-empty batch (N, ...) with a leading sample axis, "
                         f"got shape {tuple(x.shape)}; for one sample use x.unsqueeze(0)")


def _split(raw: Any, i: int) -> Batch:
    """A raw batch as (x, y-or-None), both checked."""
    if isinstance(raw, (tuple, list)) and raw and not isinstance(raw[0], (int, float)):
        x, y = raw[0], (raw[1] if len(raw) > 1 else None)
    else:
        x, y = raw, None
    if isinstance(x, np.ndarray):
        x = torch.from_numpy(x)
    if not isinstance(x, Tensor):
        raise InputError(f"batch {i}: the samples must be tensors, got {type(x).__name__}")
    if not x.is_floating_point():
        raise InputError(f"batch {i}: the samples must be floating point, got {x.dtype}; convert them with .float()")
    if x.dim() < 2 or x.shape[0] == 0:
        raise InputError(f"batch {i} has shape {tuple(x.shape)}: expected (B, ...) with B >= 1")
    if not bool(torch.isfinite(x).all()):
        raise InputError(f"batch {i} contains NaN/Inf values: inputs must be finite")
    return x, _labels(y, x.shape[0], i)


def _labels(y: Any, n: int, i: int) -> Tensor | None:
    if y is None:
        return None
    try:
        t = torch.as_tensor(y)
    except (TypeError, ValueError, RuntimeError) as e:
        raise InputError(f"batch {i}: the labels must be integers, got {type(y).__name__}") from e
    if t.is_floating_point() or t.is_complex() or t.dtype == torch.bool or t.shape != (n,):
        raise InputError(f"batch {i}: the labels must be {n} integer class indices (shape ({n},)), "
                         f"got dtype {t.dtype} shape {tuple(t.shape)}")
    return t.to(torch.long)



def open_path(path: str | os.PathLike, *, size: Sequence[int] | None = None,
              channels: int | None = None) -> DataSource:
    """A data source from a path: a folder of class subfolders (:class:`ImageFolder`), a ``.npy``
    array (N, ...) or a ``.npz`` with arrays ``x`` (N, ...) and optionally ``y`` (N,) labels."""
    p = Path(path)
    if p.is_dir():
        return ImageFolder(p, size, channels)
    if not p.is_file():
        raise InputError(f"data {p} does not exist: give a folder of class subfolders, a .npy or a .npz file")
    try:
        if p.suffix.lower() == ".npy":
            return torch.from_numpy(np.load(p, allow_pickle=False)).float()
        if p.suffix.lower() == ".npz":
            with np.load(p, allow_pickle=False) as f:
                if "x" not in f:
                    raise InputError(f"{p} has arrays {list(f.keys())[:10]}; it needs 'x' (N, ...) and optionally 'y'")
                x = torch.from_numpy(f["x"]).float()
                return (x, torch.from_numpy(f["y"])) if "y" in f else x
    except (ValueError, OSError) as e:
        raise InputError(f"cannot read {p} as a numpy array: {e}") from e
    raise InputError(f"data {p}: expected a folder of class subfolders, a .npy or a .npz file")


def normalise(x: Tensor, scale: float | None, mean: Sequence[float] | None, std: Sequence[float] | None) -> Tensor:
    """(x * scale - mean) / std, mean and std per channel (one value, or one per channel): the
    command line's --scale / --mean / --std."""
    shape = (1, -1) + (1,) * (x.dim() - 2)
    if scale is not None:
        x = x * scale
    if mean is not None:
        x = x - x.new_tensor(mean).reshape(shape)
    if std is not None:
        x = x / x.new_tensor(std).reshape(shape)
    return x


def normaliser(scale: float | None, mean: Sequence[float] | None,
               std: Sequence[float] | None) -> Callable[[Tensor], Tensor] | None:
    """:func:`normalise` with these options as a function of x, or None when none is given."""
    if scale is None and mean is None and std is None:
        return None
    return lambda x: normalise(x, scale, mean, std)
