"""Activation maximisation: the input that a class logit or a channel likes most (Simonyan et al. 2014;
Yosinski et al. 2015; Dai 2020).

Gradient ascent on the pixels of the objective S (a class logit, or the spatial
mean of one channel of a layer), with Simonyan's L2 decay and Yosinski's
regularisers, from a blank (zeros) or random start, for a fixed number of steps::

    g    = d S(roll(I, jitter)) / d I
    I   <- (1 - l2) * (I + lr * g / mean|g|)           (a normalised step of about lr per pixel)
    I   <- blur(I, sigma) every blur_every steps;  I <- clip(I, lo, hi)

One image per target, optimised together (the samples of a batch do not interact
in an eval-mode network). ``trace[t, s]`` is S of image t at step s (without jitter).
:func:`maximisation_figure` puts each class's optimised image beside the class
template reconstructed *at that image* (``W_c`` of ``rv.reconstruct``) and the
class-mean template over probes of that class.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from matplotlib.figure import Figure
from torch import Tensor

from ..errors import InputError
from ..plot._base import DIVERGING, PathLike, finish, limit, new_figure, normalise01
from ..saliency._common import target_index
from ._common import as_numpy, capture, check_dtype, check_input, check_positive, check_seed, layer_name, mosaic, \
    pick, run, working_copy
from ..saliency.layers import _select_layers

__all__ = ["Maximised", "maximise", "maximisation_figure"]


@dataclass(frozen=True)
class Maximised:
    """``images`` (T, C, H, W), one per target; ``trace`` (T, steps + 1) the objective at each step;
    ``logits`` (T, K) the model's output at the final images."""

    images: Tensor
    targets: tuple[int, ...]
    layer: str | None
    trace: np.ndarray
    logits: Tensor
    settings: dict[str, Any] = field(default_factory=dict)


def maximise(model: nn.Module, x: Tensor, target: int | Sequence[int], *, layer: str | None = None,
             steps: int = 100, lr: float = 0.05, l2: float = 1e-3, jitter: int = 1, blur_every: int = 4,
             blur_sigma: float = 0.5, clip: tuple[float, float] | None = None, start: str | Tensor = "blank",
             seed: int = 0, dtype: torch.dtype | None = torch.float64) -> Maximised:
    """Gradient ascent on the input for each target (see the module doc).

    Args:
        model: the model (left untouched; a private eval copy runs).
        x: an example input batch (N, C, H, W): its sample shape, dtype and device are used.
        target: a class index (or a list of them), or with ``layer`` a channel index (list).
        layer: maximise the mean of channel ``target`` of this module's output instead of a logit.
        steps, lr: iterations and the normalised step size (about lr per pixel per step).
        l2: L2 decay per step (Simonyan's ``- l2 ||I||^2`` term).
        jitter: random roll of the image by up to ``jitter`` pixels before each gradient (0: none).
        blur_every, blur_sigma: a Gaussian blur every ``blur_every`` steps (0: never).
        clip: (lo, hi) pixel range kept after every step (None: unbounded).
        start: ``"blank"`` (zeros), ``"random"`` (N(0, 0.1^2), seeded) or a tensor (C, H, W) / (T, C, H, W).
        seed: seeds the jitter and the random start: the result is deterministic.
    """
    x = check_input(x, min_dim=4)
    dt = check_dtype(dtype, x)
    targets = _targets(target)
    settings = _settings(steps, lr, l2, jitter, blur_every, blur_sigma, clip, seed)
    gen = torch.Generator().manual_seed(settings["seed"])
    img = _start(start, len(targets), x, dt, gen)
    rows = torch.arange(len(targets))
    idx = torch.tensor(targets)
    with working_copy(model, dt, x.device) as work:
        chosen = _select_layers(work, layer_name(layer)) if layer is not None else None

        def objective(batch: Tensor) -> Tensor:
            if chosen is None:
                out = _logits(run(work, batch))
                _check_range(idx, out.shape[1], "class")
                return out[rows, idx]
            a = pick(capture(work, batch, chosen, detach=False)[0], layer)  # type: ignore[arg-type]
            _check_range(idx, a.shape[1], "channel")
            return a[rows, idx].reshape(len(targets), -1).mean(1)

        trace = _ascend(img, objective, settings, gen)
        with torch.no_grad():
            logits = _logits(run(work, img))
    return Maximised(img.detach().to(x.dtype), tuple(targets), layer, trace, logits.to(x.dtype), settings)


def _targets(target: Any) -> list[int]:
    if callable(target) or isinstance(target, (str, bytes)):
        raise InputError(f"target must be an int index or a sequence of them, got {target!r:.60}")
    n = 1 if not hasattr(target, "__len__") or isinstance(target, Tensor) and target.dim() == 0 else len(target)
    if n == 0:
        raise InputError("target is empty: give at least one class (or channel) index")
    idx = target_index(target, n)
    assert idx is not None
    return [int(t) for t in idx.tolist()]


def _settings(steps: Any, lr: Any, l2: Any, jitter: Any, blur_every: Any, blur_sigma: Any, clip: Any,
              seed: Any) -> dict[str, Any]:
    s = {"steps": check_positive(steps, "steps"), "seed": check_seed(seed)}
    for name, v in (("lr", lr), ("l2", l2), ("blur_sigma", blur_sigma)):
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0:
            raise InputError(f"{name} must be a finite number >= 0, got {v!r}")
        s[name] = float(v)
    if s["l2"] >= 1:
        raise InputError(f"l2 is a decay per step and must be < 1, got {l2}")
    for name, v in (("jitter", jitter), ("blur_every", blur_every)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 0:
            raise InputError(f"{name} must be an int >= 0, got {v!r}")
        s[name] = v
    if clip is not None:
        if not (isinstance(clip, (tuple, list)) and len(clip) == 2 and float(clip[0]) < float(clip[1])):
            raise InputError(f"clip must be (lo, hi) with lo < hi, or None, got {clip!r}")
        clip = (float(clip[0]), float(clip[1]))
    s["clip"] = clip
    return s


def _start(start: Any, t: int, x: Tensor, dt: torch.dtype, gen: torch.Generator) -> Tensor:
    shape = (t, *x.shape[1:])
    if isinstance(start, Tensor):
        s = start.detach().to(device=x.device, dtype=dt)
        try:
            return torch.broadcast_to(s, shape).clone()
        except RuntimeError:
            raise InputError(f"start of shape {tuple(start.shape)} does not fit {shape}") from None
    if start == "blank":
        return torch.zeros(shape, dtype=dt, device=x.device)
    if start == "random":
        return (0.1 * torch.randn(shape, generator=gen, dtype=dt)).to(x.device)
    raise InputError(f"start must be 'blank', 'random' or a tensor, got {start!r:.60}")


def _logits(out: Any) -> Tensor:
    if not isinstance(out, Tensor) or out.dim() != 2:
        raise InputError("the model must return logits (N, K) to maximise a class; "
                         "for other outputs maximise a channel with layer=NAME")
    return out


def _check_range(idx: Tensor, n: int, what: str) -> None:
    bad = [int(i) for i in idx if not 0 <= int(i) < n]
    if bad:
        raise InputError(f"target {what} index out of range: {bad} (valid: 0..{n - 1})")


def _ascend(img: Tensor, objective: Any, s: dict[str, Any], gen: torch.Generator) -> np.ndarray:
    """Run the ascent in place on ``img``; return the trace (T, steps + 1)."""
    trace = []
    for step in range(s["steps"]):
        shift = [int(v) for v in torch.randint(-s["jitter"], s["jitter"] + 1, (2,), generator=gen)]
        xg = img.clone().requires_grad_(True)
        with torch.enable_grad():
            score = objective(torch.roll(xg, shift, (2, 3)))
            (g,) = torch.autograd.grad(score.sum(), xg)
        if s["jitter"]:
            with torch.no_grad():
                score = objective(img)
        trace.append(score.detach())
        scale = g.abs().flatten(1).mean(1).clamp_min(1e-12).reshape(-1, *(1,) * (img.dim() - 1))
        with torch.no_grad():
            img.add_(g / scale, alpha=s["lr"]).mul_(1 - s["l2"])
            if s["blur_every"] and (step + 1) % s["blur_every"] == 0 and s["blur_sigma"] > 0:
                img.copy_(_blur(img, s["blur_sigma"]))
            if s["clip"] is not None:
                img.clamp_(*s["clip"])
    with torch.no_grad():
        trace.append(objective(img).detach())
    return as_numpy(torch.stack(trace, 1))


def _blur(img: Tensor, sigma: float) -> Tensor:
    """A separable Gaussian blur, reflect-padded, per channel."""
    r = max(1, math.ceil(2 * sigma))
    r = min(r, img.shape[-1] - 1, img.shape[-2] - 1)
    t = torch.arange(-r, r + 1, dtype=img.dtype, device=img.device)
    k = torch.exp(-0.5 * (t / sigma) ** 2)
    k = k / k.sum()
    c = img.shape[1]
    out = F.conv2d(F.pad(img, (r, r, 0, 0), mode="reflect"), k.reshape(1, 1, 1, -1).repeat(c, 1, 1, 1), groups=c)
    return F.conv2d(F.pad(out, (0, 0, r, r), mode="reflect"), k.reshape(1, 1, -1, 1).repeat(c, 1, 1, 1), groups=c)


def maximisation_figure(model: nn.Module, result: Maximised, x: Tensor | None = None, labels: Any = None, *,
                        class_names: Sequence[str] | None = None, path: PathLike = None, dpi: float = 100) -> Figure:
    """Per class (column): the optimised image, the template ``W_c`` reconstructed at it, and (with
    probes ``x`` and their ``labels``) the class-mean template ``mean of W_c`` over the probes of class c.

    Templates share one diverging colour scale per row, centred at zero.
    """
    from ..pipeline import reconstruct

    if not isinstance(result, Maximised) or result.layer is not None:
        raise InputError("maximisation_figure takes the result of maximise() for classes (layer=None)")
    targets = list(result.targets)
    at_image = reconstruct(model, result.images)
    rows = [("optimised image", as_numpy(result.images), None),
            ("$W_c$ at the image", as_numpy(at_image.weight[torch.arange(len(targets)), torch.tensor(targets)]),
             DIVERGING)]
    if x is not None:
        rows.append(("class-mean $W_c$", _class_means(model, x, labels, targets), DIVERGING))
    h, w = result.images.shape[-2:]
    width, height = max(4.0, 0.9 * len(targets) * w / max(h, 1) + 2.0), 1.1 * len(rows) + 0.9
    fig = new_figure((width, height), path, layout=None)  # one mosaic per row: constrained layout costs seconds
    fig.subplots_adjust(left=1.0 / width, right=1 - 0.9 / width, top=1 - 0.75 / height, bottom=0.1 / height,
                        hspace=0.15)
    axes = np.atleast_1d(fig.subplots(len(rows), 1, squeeze=False)).reshape(-1)
    for r, (ax, (name, imgs, cmap)) in enumerate(zip(axes, rows)):
        drawn, corners, cell = _draw_row(ax, imgs, cmap)
        ax.set_ylabel(name, fontsize=7)
        ax.set_yticks([])
        ax.set_xticks([])
        if r == 0:
            ax.set_xticks([left + (cell[1] - 1) / 2 for _, left in corners],
                          [f"{_label(c, class_names)}\nlogit {float(result.logits[j, c]):.1f}"
                           for j, c in enumerate(targets)], fontsize=7)
            ax.xaxis.tick_top()
        ax.tick_params(length=0)
        if cmap is not None:
            fig.colorbar(drawn, ax=ax, fraction=0.03, pad=0.01, label="weight")
    fig.suptitle(f"Activation maximisation ({result.settings['steps']} steps) beside the reconstructed templates",
                 fontsize=9)
    return finish(fig, path, dpi)


def _label(c: int, class_names: Sequence[str] | None) -> str:
    return str(class_names[c]) if class_names is not None and c < len(class_names) else str(c)


def _class_means(model: nn.Module, x: Tensor, labels: Any, targets: list[int]) -> list[np.ndarray | None]:
    """Mean of W_c over the probes of class c, per target (None where no probe has that label)."""
    from ..pipeline import reconstruct

    x = check_input(x, min_dim=4)
    y = torch.as_tensor(labels).reshape(-1) if labels is not None else None
    if y is None or y.shape[0] != x.shape[0]:
        raise InputError(f"labels must give one class per probe ({x.shape[0]}), got {labels!r:.60}")
    rec = reconstruct(model, x, classes=sorted(set(targets)))
    have = rec.classes.tolist()
    return [as_numpy(rec.weight[y == c][:, have.index(c)].mean(0)) if bool((y == c).any()) else None
            for c in targets]


def _draw_row(ax: Any, imgs: Sequence[np.ndarray | None], cmap: str | None) -> tuple[Any, list, tuple[int, int]]:
    """One row of panels as a mosaic: images (grey or RGB) when ``cmap`` is None, else signed maps
    (channel sum) on one symmetric scale; a missing panel (None) stays blank."""
    shape = next(i.shape for i in imgs if i is not None)
    rgb = cmap is None and shape[0] == 3
    blank = np.full((*shape[1:], 3) if rgb else shape[1:], 1.0 if rgb else np.nan)
    tiles = [blank if i is None else (normalise01(i.transpose(1, 2, 0)) if rgb else
                                      (i.mean(0) if cmap is None else i.sum(0))) for i in imgs]
    canvas, corners, cell = mosaic(tiles, len(tiles))
    if cmap is None:
        return ax.imshow(canvas, cmap=None if rgb else "gray", interpolation="nearest"), corners, cell
    lim = limit(*[t for t in tiles if t is not blank])
    return ax.imshow(canvas, cmap=cmap, vmin=-lim, vmax=lim, interpolation="nearest"), corners, cell
