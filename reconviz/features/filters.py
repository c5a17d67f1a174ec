"""Raw filters: a conv layer's kernels as images (cs231n notes).

The first layer's kernels live in input space and are readable: an RGB kernel
(3, kh, kw) is drawn as colour (0.5 + w / (2 max|w|) per filter: mid grey is
zero), a one-channel kernel on a diverging map centred at zero, each normalised
to its own max |w|. Deeper kernels (C_in, kh, kw) mix C_in feature maps; they
are drawn as the per-position mean magnitude over input channels,
``mean_c |w[:, c]|``, which shows their spatial footprint but is hard to read.
"""

from __future__ import annotations

import numpy as np
import torch.nn as nn
from matplotlib.figure import Figure

from ..errors import InputError
from ..plot._base import DIVERGING, SEQUENTIAL, PathLike, finish, new_figure
from ..probe import check_model
from ._common import as_numpy, check_positive, label_rows, mosaic

__all__ = ["filter_images", "filters"]

_CONV = (nn.Conv1d, nn.Conv2d, nn.Conv3d)


def _conv(model: nn.Module, layer: str | None) -> tuple[str, nn.Module]:
    check_model(model)
    convs = [(n, m) for n, m in model.named_modules() if isinstance(m, _CONV)]
    if layer is None:
        if not convs:
            raise InputError("the model has no convolution layer: pass layer=NAME of a conv module")
        return convs[0]
    mods = dict(model.named_modules())
    if not isinstance(layer, str) or layer not in mods:
        raise InputError(f"no module named {layer!r:.60}; the conv layers are {[n for n, _ in convs][:20]}")
    if not isinstance(mods[layer], _CONV):
        raise InputError(f"{layer!r} is a {type(mods[layer]).__name__}, not a convolution; "
                         f"the conv layers are {[n for n, _ in convs][:20]}")
    return layer, mods[layer]


def filter_images(model: nn.Module, layer: str | None = None) -> tuple[str, np.ndarray, str]:
    """(layer, images, kind) of a conv layer's kernels (default: the first conv).

    kind ``"rgb"``: (C_out, kh, kw, 3) in [0, 1]; ``"signed"``: (C_out, kh, kw) in [-1, 1],
    each kernel divided by its max |w|; ``"magnitude"``: (C_out, kh, kw), mean |w| over the
    input channels (deeper layers, or first layers with other channel counts).
    The model is only read.
    """
    name, conv = _conv(model, layer)
    w = as_numpy(conv.weight)
    w = w.reshape(w.shape[0], w.shape[1], w.shape[2], -1)  # (C_out, C_in, kh, kw); 1-D kernels: kh = k, kw = 1
    top = np.abs(w).reshape(w.shape[0], -1).max(1).reshape(-1, 1, 1, 1)
    unit = w / np.where(top > 0, top, 1.0)
    first = name == _conv(model, None)[0]
    if first and w.shape[1] == 3:
        return name, (0.5 + unit / 2).transpose(0, 2, 3, 1), "rgb"
    if first and w.shape[1] == 1:
        return name, unit[:, 0], "signed"
    return name, np.abs(w).mean(1), "magnitude"


def filters(model: nn.Module, layer: str | None = None, *, max_filters: int = 64, ncols: int | None = None,
            path: PathLike = None, dpi: float = 100) -> Figure:
    """A mosaic of a conv layer's kernels (default: the first conv), one tile per output channel, row-major."""
    name, imgs, kind = filter_images(model, layer)
    shown = imgs[: check_positive(max_filters, "max_filters")]
    canvas, corners, cell = mosaic(list(shown), ncols)
    cols = len({left for _, left in corners})
    fig = new_figure((min(10.0, 0.3 * canvas.shape[1] + 1.6), min(10.0, 0.3 * canvas.shape[0] + 0.9)), path)
    ax = fig.subplots()
    if kind == "rgb":
        im = ax.imshow(canvas, interpolation="nearest")
    elif kind == "signed":
        im = ax.imshow(canvas, cmap=DIVERGING, vmin=-1, vmax=1, interpolation="nearest")
    else:
        im = ax.imshow(canvas, cmap=SEQUENTIAL, vmin=0, vmax=float(imgs.max()) or 1.0, interpolation="nearest")
    label_rows(ax, corners, cell, cols, [f"{c}" for c in range(0, len(shown), cols)])
    if kind != "rgb":
        label = "w / max|w| (per filter)" if kind == "signed" else "mean |w| over input channels"
        fig.colorbar(im, ax=ax, shrink=0.8, label=label)
    more = f" (first {len(shown)} of {len(imgs)})" if len(shown) < len(imgs) else ""
    note = {"rgb": "RGB, 0.5 + w / 2max|w| per filter (grey = 0)",
            "signed": "signed, per-filter scale",
            "magnitude": "deeper layer: mean |w| over input channels, hard to read"}[kind]
    fig.suptitle(f"Filters of {name}{more}:\n{note}", fontsize=9)
    return finish(fig, path, dpi)
