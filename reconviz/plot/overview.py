"""One figure per probe: the reconstruction beside the classic CNN visualizations."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import torch.nn as nn
from matplotlib.figure import Figure
from torch import Tensor

from ..errors import InputError
from ..reconstruction import Reconstruction
from ._base import (
    PathLike, as_chw, bare, check_probe, class_label, class_positions, composite, finish, fmt,
    indexed_path, limit, new_figure, np64, show_input, show_magnitude, show_signed,
)

__all__ = ["overview", "PANELS"]

PANELS = (
    "input", "template", "contribution", "gradient", "guided backprop", "deconvnet", "occlusion",
)


def overview(
    model: nn.Module,
    x: Tensor | None,
    rec: Reconstruction,
    probe: int | Sequence[int] = 0,
    *,
    target: int | None = None,
    class_names: Any = None,
    path: PathLike = None,
    output: Any = None,
    occlusion: dict[str, Any] | None = None,
    panel_size: float = 2.1,
    dpi: float = 100,
    title: str | None = None,
) -> Figure | list[Figure]:
    """The reconstruction next to the classic visualizations, for one probe (or several).

    Seven panels, side by side, all for the same class c (default: the predicted one):

    1. the input;
    2. the template W_c (diverging colour map centred at zero; RGB: colour composite);
    3. the contribution map W_c * x summed over channels (it sums, with b_c, to the logit);
    4. gradient saliency (Simonyan 2014): max over channels of |dS_c/dx| -- for a
       piecewise-linear net this is |W_c|, and the caption gives the measured difference;
    5. guided backprop (Springenberg 2015) and 6. deconvnet (Zeiler & Fergus 2014),
       signed (diverging; RGB: colour composite, 0.5 + r / 2L);
    7. occlusion sensitivity (Zeiler & Fergus): the drop of S_c when a patch around
       each position is replaced by the baseline (red: the score falls, so the region matters).

    Args:
        model: the model ``rec`` was computed from (used for the saliency methods; untouched).
        x: the probe batch given to :func:`reconviz.reconstruct` (None: ``rec.probes``).
        rec: the reconstruction.
        probe: a probe index (returns one Figure) or a sequence of them (returns a list;
            with ``path``, ``out.png`` becomes ``out_probe3.png``, or use ``"out_{probe}.png"``).
        target: the output index to explain (default: the predicted class); must be reconstructed.
        class_names: names indexed by output index (a sequence or a mapping).
        path: save the figure there (.png, .svg, .pdf), atomically.
        output: logits selector, as for :func:`reconviz.reconstruct`.
        occlusion: keyword arguments for :func:`reconviz.saliency.occlusion` (window, stride,
            baseline, ...); default: a square window of a quarter of the smaller side, half a
            window stride, baseline 0.
    """
    if isinstance(probe, Sequence) and not isinstance(probe, str) or isinstance(probe, (range, np.ndarray)):
        probes = [check_probe(rec, p) for p in probe]
        return [
            overview(model, x, rec, p, target=target, class_names=class_names, path=indexed_path(path, p),
                     output=output, occlusion=occlusion, panel_size=panel_size, dpi=dpi, title=title)
            for p in probes
        ]
    n = check_probe(rec, probe)
    xs = rec.probes if x is None else x
    if not isinstance(xs, Tensor) or tuple(xs.shape[1:]) != rec.sample_shape or xs.shape[0] != rec.n_probes:
        shape = tuple(xs.shape) if isinstance(xs, Tensor) else type(xs).__name__
        raise InputError(f"x must be the probe batch of the reconstruction, shape "
                         f"{(rec.n_probes, *rec.sample_shape)}; got {shape}")
    k = int(rec.predicted[n]) if target is None else class_positions(rec, [target])[0]
    c = int(rec.classes[k])
    output = rec.meta.get("output") if output is None else output
    maps = saliency_maps(model, xs[n : n + 1].to(rec.weight.dtype), c, output=output, dtype=rec.weight.dtype, occlusion=occlusion)

    w = as_chw(np64(rec.weight[n, k]))
    contrib = (w * as_chw(np64(rec.probes[n]))).sum(0)  # W_c * x over channels
    grad = as_chw(maps["gradient"])
    gap = float(np.abs(grad - w).max())  # gradient == W_c for a piecewise-linear net
    saliency = np.abs(grad).max(0)
    logit, bias = float(rec.logits[n, k]), float(rec.bias[n, k])
    h, wd = w.shape[1:]
    aspect = min(max(wd / h, 0.5), 4.0)

    fig = new_figure((len(PANELS) * panel_size * aspect + 0.4, panel_size + 1.5), path)
    axes = fig.subplots(1, len(PANELS), squeeze=True)
    name = class_label(c, class_names)

    show_input(axes[0], as_chw(np64(xs[n])))
    pred = int(rec.classes[int(rec.predicted[n])])
    _caption(axes[0], f"input (probe {n})", f"predicted: {class_label(pred, class_names)}")

    lw = _signed(axes[1], w)
    _caption(axes[1], "template $W_c$", f"scale ±{fmt(lw)}")

    show_signed(axes[2], contrib, limit(contrib))
    _caption(axes[2], "contribution $W_c \\odot x$", f"sum {fmt(contrib.sum())} + b {fmt(bias)}\n= logit {fmt(logit)}")

    show_magnitude(axes[3], saliency)
    _caption(axes[3], "gradient saliency", f"max$_k$ |∂S/∂x|; |∇ - $W_c$| {gap:.1e}")

    for ax, key, label in ((axes[4], "guided", "guided backprop"), (axes[5], "deconvnet", "deconvnet")):
        lm = _signed(ax, as_chw(maps[key]))
        _caption(ax, label, f"scale ±{fmt(lm)}")

    occ = _spatial(maps["occlusion"], h, wd)
    lo = limit(occ)
    show_signed(axes[6], occ, lo)
    _caption(axes[6], "occlusion", f"score drop, ±{fmt(lo)}")

    fig.suptitle(
        title or f"{name}: logit {fmt(logit)} at probe {n}  ({rec.exactness} reconstruction beside the "
        "classic maps; red = positive, blue = negative)",
        fontsize=10,
    )
    return finish(fig, path, dpi)


def saliency_maps(
    model: nn.Module,
    x: Tensor,
    c: int,
    *,
    output: Any = None,
    dtype: torch.dtype = torch.float64,
    occlusion: dict[str, Any] | None = None,
) -> dict[str, np.ndarray]:
    """gradient, guided, deconvnet (shaped like one sample) and occlusion maps of class ``c`` at ``x`` (1, ...)."""
    from ..saliency.gradient import gradient
    from ..saliency.guided import deconvnet, guided_backprop
    from ..saliency.occlusion import occlusion as occlude

    kw = {"output": output, "dtype": dtype}
    occlusion = dict(occlusion or {})
    if "window" not in occlusion:  # a quarter of the smaller side, so the map has structure
        side = max(1, round(min(x.shape[-2:]) / 4)) if x.dim() >= 3 else 1
        occlusion["window"] = side
        occlusion.setdefault("stride", max(1, side // 2))
    return {
        "gradient": np64(gradient(model, x, c, **kw)[0]),
        "guided": np64(guided_backprop(model, x, c, **kw)[0]),
        "deconvnet": np64(deconvnet(model, x, c, **kw)[0]),
        "occlusion": np64(occlude(model, x, c, **{**kw, **occlusion})[0]),
    }


def _signed(ax: Any, chw: np.ndarray) -> float:
    """RGB as a colour composite, otherwise the channel sum on the diverging map; returns the scale."""
    if chw.shape[0] == 3:
        lim = limit(chw)
        ax.imshow(composite(chw, lim), interpolation="nearest")
        bare(ax)
        return lim
    s = chw.sum(0)
    lim = limit(s)
    show_signed(ax, s, lim)
    return lim


def _spatial(m: np.ndarray, h: int, w: int) -> np.ndarray:
    """An occlusion map as (H, W): channel maps are summed."""
    m = np.asarray(m, dtype=np.float64)
    if m.ndim == 3:
        m = m.sum(0)
    if m.ndim == 1:
        m = m[None, :]
    if m.shape != (h, w):
        raise InputError(f"occlusion map of shape {m.shape} does not match the input's {(h, w)}")
    return m


def _caption(ax: Any, title: str, caption: str) -> None:
    ax.set_title(title, fontsize=9)
    ax.set_xlabel(caption, fontsize=7.5)
