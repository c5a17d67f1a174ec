"""Top-activating patches (Zeiler & Fergus 2014; cs231n notes): which inputs, and where, excite a channel most.

:func:`top_patches` streams a dataset once and keeps, for every chosen channel
c of a layer, the k largest activations ``a[n, c, i, j]`` over all inputs n and
positions (i, j), with the input index and position of each. Ties are broken by
the smaller (input index, flat position), so the result equals a brute-force
sort of the whole dataset. Memory is bounded by k (plus one batch), not by the
dataset: each kept entry holds the input crop of its unit's *exact receptive
field* (:func:`reconviz.saliency.receptive_fields`, computed from the network).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn as nn
from matplotlib.figure import Figure
from torch import Tensor

from ..data import DataSource
from ..errors import InputError
from ..plot._base import PathLike, finish, new_figure, normalise01
from ..saliency.layers import ReceptiveField, receptive_fields
from ._common import BLANKED_GREY, as_numpy, check_positive, layer_name, mosaic, pick, stream

__all__ = ["TopPatches", "top_patches", "patches_figure"]


@dataclass(frozen=True)
class TopPatches:
    """The k top activations of each channel of ``layer`` over a dataset, best first.

    Attributes:
        layer: the layer key.
        channels: the channels, one row each.
        values: (C', k) activations.
        indices: (C', k) sample index in the dataset (its order of iteration).
        positions: (C', k, d) spatial position of the unit (d = number of spatial axes; 0 for (N, K) outputs).
        boxes: (C', k, 4) the receptive field's box (r0, r1, c0, c1), half-open, in input pixels.
        crops: crops[i][j], the input (C, r1 - r0, c1 - c0) inside box [i, j].
        labels: (C', k) the samples' labels, or None for unlabelled data.
        field: the layer's :class:`~reconviz.saliency.ReceptiveField`.
        n_inputs: how many inputs were searched.
    """

    layer: str
    channels: tuple[int, ...]
    values: Tensor
    indices: Tensor
    positions: Tensor
    boxes: Tensor
    crops: list[list[Tensor]]
    labels: Tensor | None
    field: ReceptiveField
    n_inputs: int

    def to_dict(self) -> dict[str, Any]:
        return {"layer": self.layer, "n_inputs": self.n_inputs, "channels": [
            {"channel": c, "values": self.values[i].tolist(), "indices": self.indices[i].tolist(),
             "positions": self.positions[i].tolist(), "boxes": self.boxes[i].tolist()}
            for i, c in enumerate(self.channels)]}


class _Running:
    """The running top k of every channel: values and flat ids (sample * S + unit), ties to the smaller id."""

    def __init__(self, k: int):
        self.k = k
        self.values: Tensor | None = None  # (C', m)
        self.ids: Tensor | None = None
        self.crops: list[list[Tensor]] = []
        self.labels: Tensor | None = None

    def merge(self, vals: Tensor, ids: Tensor, crop: Any, labels: Tensor | None) -> None:
        """Add a batch's candidates (C', B * S) in increasing id order; ``crop(id)`` cuts one."""
        old = 0 if self.values is None else self.values.shape[1]
        if self.values is not None:
            vals, ids = torch.cat([self.values, vals], 1), torch.cat([self.ids, ids], 1)  # ids stay increasing
        order = torch.sort(vals, dim=1, descending=True, stable=True).indices[:, : self.k]
        self.values, self.ids = vals.gather(1, order), ids.gather(1, order)
        self.crops = [[self.crops[i][j] if j < old else crop(int(self.ids[i, r]))
                       for r, j in enumerate(order[i].tolist())] for i in range(order.shape[0])]
        if labels is not None:
            new = labels.expand(order.shape[0], -1)
            both = new if self.labels is None else torch.cat([self.labels, new], 1)
            self.labels = both.gather(1, order)


def top_patches(model: nn.Module, data: DataSource, layer: str, channels: int | Sequence[int] | None = None,
                k: int = 9, *, batch_size: int = 256, dtype: torch.dtype = torch.float64,
                progress: bool | None = None) -> TopPatches:
    """The k inputs and positions with the highest activation of each channel of ``layer``.

    Args:
        model: the model (left untouched; a private eval copy runs).
        data: images (N, C, H, W) in any form of :mod:`reconviz.data`.
        layer: a module name (``"name#k"``: its k-th call, from 0).
        channels: channel indices (default: all).
        k: entries kept per channel.
        batch_size, dtype: streaming batch size and working precision.
        progress: a progress bar (default: on a terminal, when the size is known).
    """
    key = layer_name(layer)
    k = check_positive(k, "k")
    field: ReceptiveField | None = None
    run: _Running = _Running(k)
    chans: list[int] | None = None
    seen = 0
    for x, y, acts, _ in stream(model, data, key.split("#")[0], batch_size=batch_size, dtype=dtype,
                                progress=progress, desc="top patches"):
        if x.dim() != 4:
            raise InputError(f"top patches need images (N, C, H, W), got batches of shape {tuple(x.shape)}")
        a = pick(acts, key)
        units = a.reshape(a.shape[0], a.shape[1], -1)  # (B, C, S)
        if field is None:
            field = _field(model, x, key, dtype)
            chans = _channels(channels, a.shape[1])
        s = units.shape[2]
        vals = units[:, chans].permute(1, 0, 2).reshape(len(chans), -1)  # (C', B * S), sample-major
        ids = torch.arange(seen * s, (seen + x.shape[0]) * s).expand(len(chans), -1)
        base = seen

        def crop(flat: int, x: Tensor = x, base: int = base, s: int = s) -> Tensor:
            r0, r1, c0, c1 = field.box(flat % s)  # type: ignore[union-attr]
            return x[flat // s - base, :, r0:r1, c0:c1].clone()

        run.merge(vals, ids, crop, None if y is None else y.repeat_interleave(s)[None])
        seen += x.shape[0]
    if field is None or run.values is None:
        raise InputError("the data is empty: give at least one image")
    return _result(key, chans, run, field, seen)


def _field(model: nn.Module, x: Tensor, key: str, dtype: torch.dtype) -> ReceptiveField:
    fields = receptive_fields(model, x[:1], key.split("#")[0], dtype=dtype)
    return pick(fields, key)  # type: ignore[arg-type]


def _channels(channels: Any, n: int) -> list[int]:
    if channels is None:
        return list(range(n))
    chosen = [channels] if isinstance(channels, (int, np.integer)) and not isinstance(channels, bool) else channels
    try:
        out = [int(c) for c in chosen if not isinstance(c, bool)]
    except TypeError:
        raise InputError(f"channels must be an int or a sequence of ints, got {channels!r:.60}") from None
    if not out or len(out) != len(list(chosen)) or any(not 0 <= c < n for c in out):
        raise InputError(f"channels must be ints in [0, {n}) (the layer has {n} channels), got {channels!r:.60}")
    return out


def _result(key: str, chans: Any, run: _Running, field: ReceptiveField, n: int) -> TopPatches:
    s = max(1, int(np.prod(field.shape)) if field.shape else 1)
    flat = run.ids % s  # type: ignore[operator]
    if field.shape:
        positions = torch.stack(torch.unravel_index(flat, field.shape), -1)
    else:
        positions = flat.new_zeros(*flat.shape, 0)
    boxes = torch.tensor([[field.box(int(u)) for u in row] for row in flat.tolist()], dtype=torch.long)
    return TopPatches(key, tuple(chans), run.values, run.ids // s, positions, boxes,  # type: ignore[arg-type]
                      run.crops, run.labels, field, n)


def patches_figure(result: TopPatches, *, channels: Sequence[int] | None = None, max_channels: int = 16,
                   class_names: Sequence[str] | None = None, path: PathLike = None, dpi: float = 100) -> Figure:
    """One row per channel, its top-k receptive-field crops left to right (best first).

    Crops are shown at their true size inside the layer's receptive-field extent
    (crops cut by the image border are padded with blank on the cut side); grey crops
    share one grey scale, RGB crops are each rescaled to [0, 1]. Under each crop: its
    activation (and the sample's label).
    """
    if not isinstance(result, TopPatches):
        raise InputError(f"patches_figure takes the result of top_patches(), got {type(result).__name__}")
    rows = [_row(c, result) for c in (channels or result.channels[:max_channels])]
    k = result.values.shape[1]
    extent = result.field.extent
    crops = [result.crops[i][j] for i in rows for j in range(k)]
    grey = (min(float(c.min()) for c in crops), max(float(c.max()) for c in crops))
    width, height = max(4.5, min(14.0, 0.75 * k + 1.0)), 0.95 * len(rows) + 0.8
    fig = new_figure((width, height), path, layout=None)  # fixed layout: constrained costs seconds here
    fig.subplots_adjust(left=0.6 / width, right=1 - 0.1 / width, top=1 - 0.5 / height, bottom=0.3 / height,
                        hspace=0.55)
    axes = np.atleast_1d(fig.subplots(len(rows), 1, squeeze=False)).reshape(-1)
    for ax, i in zip(axes, rows):
        tiles = [_padded(result.crops[i][j], result.boxes[i, j].tolist(), extent) for j in range(k)]
        canvas, corners, cell = mosaic(tiles, k)
        if canvas.ndim == 3:
            ax.imshow(canvas, interpolation="nearest")
        else:
            ax.imshow(canvas, cmap=BLANKED_GREY, vmin=grey[0], vmax=max(grey[1], grey[0] + 1e-12),
                      interpolation="nearest")
        names = ["" if result.labels is None else f"\ny={_name(int(result.labels[i, j]), class_names)}"
                 for j in range(k)]
        ax.set_xticks([left + (cell[1] - 1) / 2 for _, left in corners],
                      [f"{float(result.values[i, j]):.3g}{names[j]}" for j in range(k)], fontsize=6)
        ax.set_yticks([])
        ax.tick_params(length=0)
        ax.set_ylabel(f"ch {result.channels[i]}", fontsize=8)
    fig.suptitle(f"Top-{k} patches of {result.layer} over {result.n_inputs} inputs\n"
                 f"(receptive field {extent[0]}x{extent[1]}; under each crop: its activation)", fontsize=9)
    return finish(fig, path, dpi)


def _row(c: int, result: TopPatches) -> int:
    if c not in result.channels:
        raise InputError(f"channel {c} was not searched; the result has channels {list(result.channels)[:20]}")
    return result.channels.index(c)


def _name(y: int, names: Sequence[str] | None) -> str:
    return str(names[y]) if names is not None and 0 <= y < len(names) else str(y)


def _padded(crop: Tensor, box: list[int], extent: tuple[int, int]) -> np.ndarray:
    """A crop as a (h, w) grey or (h, w, 3) RGB tile of the field's extent, padded (blank) on the side
    the image border cut."""
    img = as_numpy(crop)
    r0, _, c0, _ = box
    h, w = max(extent[0], img.shape[1]), max(extent[1], img.shape[2])
    top, left = (h - img.shape[1]) if r0 == 0 else 0, (w - img.shape[2]) if c0 == 0 else 0
    rgb = img.shape[0] == 3
    tile = np.full((h, w, 3) if rgb else (h, w), 1.0 if rgb else np.nan)
    shown = normalise01(img).transpose(1, 2, 0) if rgb else img.mean(0)
    tile[top: top + img.shape[1], left: left + img.shape[2]] = shown
    return tile
