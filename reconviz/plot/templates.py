"""Class templates: the rows W_c of the reconstructed model, rearranged to the input's shape."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
from matplotlib.figure import Figure

from ..errors import InputError
from ..reconstruction import Reconstruction
from ._base import (
    DIVERGING, PathLike, as_chw, bare, check_probe, class_label, class_positions, composite, finish,
    fmt, limit, new_figure, np64, show_signed,
)

__all__ = ["templates", "class_mean_templates"]

CHANNELS_RGB = ("R", "G", "B")


def templates(
    rec: Reconstruction,
    probe: int = 0,
    classes: Any = None,
    class_names: Any = None,
    shared_limits: bool = True,
    path: PathLike = None,
    *,
    mean_over: Any = None,
    ncols: int | None = None,
    cmap: str = DIVERGING,
    panel_size: float = 1.9,
    dpi: float = 100,
    title: str | None = None,
    colorbar: bool = True,
) -> Figure:
    """The class templates W_c of one probe, as images in the input's shape.

    Every panel uses a diverging colour map centred at zero (red: the class
    score grows with that input element, blue: it shrinks), with symmetric
    limits shared across the grid (``shared_limits=False``: per class). Grey-scale
    inputs (1, H, W) give one panel per class; RGB inputs (3, H, W) give a row
    per class with the R, G and B channel panels and a normalised colour
    composite (0.5 + W / 2L per channel: mid grey is zero); other channel counts
    give one panel per channel. Under each class: its logit and bias at the
    probe (logit = sum(W_c * x) + b_c); the predicted class is marked.

    Args:
        rec: a :class:`~reconviz.Reconstruction`.
        probe: which probe's templates (index into ``rec.probes``).
        classes: output indices to show (default: every reconstructed class).
        class_names: names indexed by output index (a sequence or a mapping).
        shared_limits: one colour scale for the whole grid (default) or one per class.
        path: save the figure there (.png, .svg, .pdf), atomically.
        mean_over: true labels (N,) of the probes: draw the class-mean templates
            instead (see :func:`class_mean_templates`); ``probe`` is then unused.
        colorbar: draw the colour scale (one shared bar, or one per class).
        ncols: panels per row for grey-scale inputs (default: up to 5); classes per row
            for multi-channel inputs (default: 1 for up to 3 classes, else 2).

    Returns:
        The :class:`matplotlib.figure.Figure`.
    """
    if mean_over is not None:
        return class_mean_templates(
            rec, mean_over, classes=classes, class_names=class_names, shared_limits=shared_limits,
            path=path, ncols=ncols, cmap=cmap, panel_size=panel_size, dpi=dpi, title=title, colorbar=colorbar,
        )
    n = check_probe(rec, probe)
    pos = class_positions(rec, classes)
    w = np64(rec.weight[n])
    predicted = int(rec.predicted[n])
    panels = []
    for k in pos:
        c = int(rec.classes[k])
        label = class_label(c, class_names) + ("  (predicted)" if k == predicted else "")
        caption = f"logit {fmt(float(rec.logits[n, k]))}\nbias {fmt(float(rec.bias[n, k]))}"
        panels.append((as_chw(w[k]), label, caption, k == predicted))
    head = title or (
        f"Class templates $W_c$ at probe {n}  ({rec.exactness}, {str(rec.weight.dtype).replace('torch.', '')})"
    )
    fig = template_grid(panels, shared_limits, cmap, ncols, panel_size, head, path, colorbar)
    return finish(fig, path, dpi)


def class_mean_templates(
    rec: Reconstruction,
    labels: Any,
    classes: Any = None,
    class_names: Any = None,
    shared_limits: bool = True,
    path: PathLike = None,
    *,
    ncols: int | None = None,
    cmap: str = DIVERGING,
    panel_size: float = 1.9,
    dpi: float = 100,
    title: str | None = None,
    colorbar: bool = True,
) -> Figure:
    """Dataset-level templates: for each class c, the mean of W_c over the probes whose
    true label is c, with the number of probes it averages.

    Args:
        rec: a reconstruction at N probes (e.g. a test set).
        labels: the probes' true labels (N,), as output indices.
        classes: classes to show (default: the reconstructed classes that occur in ``labels``).
            A class with no probe gets an empty panel.
        Others as in :func:`templates`.
    """
    y = np.asarray(labels.detach().cpu() if isinstance(labels, torch.Tensor) else labels).reshape(-1)
    if y.shape[0] != rec.n_probes:
        raise InputError(f"labels has {y.shape[0]} entries; the reconstruction has {rec.n_probes} probes")
    if not np.issubdtype(y.dtype, np.integer):
        if not np.all(np.mod(y, 1) == 0):
            raise InputError("labels must be integer class indices")
        y = y.astype(np.int64)
    if classes is None:
        have = [int(c) for c in rec.classes.tolist()]
        present = set(int(v) for v in y)
        classes = [c for c in have if c in present]
        if not classes:
            raise InputError("no label in labels is one of the reconstructed classes")
    pos = class_positions(rec, classes)
    w = np64(rec.weight)
    logits, bias = np64(rec.logits), np64(rec.bias)
    panels = []
    for k in pos:
        c = int(rec.classes[k])
        members = np.flatnonzero(y == c)
        label = class_label(c, class_names)
        if members.size == 0:
            panels.append((None, label, "n = 0 probes", False))
            continue
        mean = w[members, k].mean(0)
        caption = (
            f"n = {members.size} probe{'s' if members.size != 1 else ''}\n"
            f"mean logit {fmt(float(logits[members, k].mean()))}\nmean bias {fmt(float(bias[members, k].mean()))}"
        )
        panels.append((as_chw(mean), label, caption, False))
    head = title or f"Class-mean templates: mean of $W_c$ over the probes of true class c ({rec.n_probes} probes)"
    fig = template_grid(panels, shared_limits, cmap, ncols, panel_size, head, path, colorbar)
    return finish(fig, path, dpi)


# --------------------------------------------------------------------------
# the grid
# --------------------------------------------------------------------------


def template_grid(
    panels: list[tuple[np.ndarray | None, str, str, bool]],
    shared_limits: bool,
    cmap: str,
    ncols: int | None,
    panel_size: float,
    title: str,
    path: PathLike,
    colorbar: bool = True,
) -> Figure:
    """Draw (chw or None, label, caption, highlight) panels; one image per class for
    one channel, a row of channel panels (+ colour composite for RGB) otherwise."""
    shapes = {p[0].shape for p in panels if p[0] is not None}
    if len(shapes) > 1:  # pragma: no cover - one reconstruction has one sample shape
        raise InputError(f"templates of different shapes: {shapes}")
    chans = shapes.pop()[0] if shapes else 1
    shared = limit(*[p[0] for p in panels if p[0] is not None])
    lims = [shared if shared_limits or p[0] is None else limit(p[0]) for p in panels]
    h, w = next((p[0].shape[1:] for p in panels if p[0] is not None), (1, 1))
    aspect = min(max(w / h, 0.5), 4.0)  # panel width / height

    if chans == 1:
        k = len(panels)
        cols = max(1, min(k, ncols or 5))
        rows = math.ceil(k / cols)
        fig = new_figure((cols * panel_size * aspect + 1.0, rows * (panel_size + 0.75) + 0.5), path)
        axes = np.atleast_1d(fig.subplots(rows, cols, squeeze=False)).reshape(-1)
        mappable = None
        for ax, (chw, label, caption, hi), lim in zip(axes, panels, lims):
            _label(ax, label, caption, hi)
            if chw is None:
                bare(ax)
                ax.text(0.5, 0.5, "no probes", ha="center", va="center", transform=ax.transAxes)
                continue
            im = show_signed(ax, chw[0], lim, cmap)
            mappable = mappable or im
            if colorbar and not shared_limits:
                fig.colorbar(im, ax=ax, fraction=0.046, pad=0.03)
        for ax in axes[len(panels):]:
            ax.set_axis_off()
        if colorbar and shared_limits and mappable is not None:
            fig.colorbar(mappable, ax=list(axes), shrink=0.8, label="weight (shared scale)")
    else:
        rgb = chans == 3
        per = chans + (1 if rgb else 0)  # panels per class: its channels (+ the colour composite)
        k = len(panels)
        blocks = max(1, min(k, ncols or (1 if k <= 3 or per > 4 else 2)))  # classes per row
        rows = math.ceil(k / blocks)
        fig = new_figure(
            (blocks * (per * panel_size * aspect + 0.5) + 1.2, rows * (panel_size + 0.6) + 0.7), path
        )
        axes = fig.subplots(rows, blocks * per, squeeze=False)
        mappable = None
        for i, ((chw, label, caption, hi), lim) in enumerate(zip(panels, lims)):
            r, b = divmod(i, blocks)
            row = axes[r, b * per : (b + 1) * per]
            for j, ax in enumerate(row):
                bare(ax)
                if r == 0:
                    name = CHANNELS_RGB[j] if rgb and j < 3 else ("colour" if rgb else f"channel {j}")
                    ax.set_title(name, fontsize=9)
                if chw is None:
                    continue
                if rgb and j == 3:
                    ax.imshow(composite(chw, lim), interpolation="nearest")
                else:
                    im = show_signed(ax, chw[j], lim, cmap)
                    mappable = mappable or im
            row[0].set_ylabel(label, fontsize=9, fontweight="bold" if hi else "normal",
                              color="#b2182b" if hi else "black")
            row[-1].set_xlabel(caption, fontsize=8)
            if chw is None:
                row[0].text(0.5, 0.5, "no probes", ha="center", va="center", transform=row[0].transAxes)
            elif colorbar and not shared_limits:
                fig.colorbar(im, ax=list(row), fraction=0.03, pad=0.02)
        for ax in axes.reshape(-1)[k * per :]:
            ax.set_axis_off()
        if colorbar and shared_limits and mappable is not None:
            fig.colorbar(mappable, ax=list(axes.reshape(-1)), shrink=min(0.8, 3.0 / rows + 0.2),
                         label="weight (shared scale)")
    fig.suptitle(title, fontsize=11)
    return fig


def _label(ax: Any, label: str, caption: str, highlight: bool) -> None:
    ax.set_title(label, fontsize=9, fontweight="bold" if highlight else "normal",
                 color="#b2182b" if highlight else "black")
    ax.set_xlabel(caption, fontsize=8)
