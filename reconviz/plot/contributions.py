"""Contribution maps W_c * x and the completeness bar: sum of contributions + bias = logit."""

from __future__ import annotations

from typing import Any

import numpy as np
from matplotlib.figure import Figure

from ..reconstruction import Reconstruction
from ._base import (
    DIVERGING, PathLike, as_chw, check_probe, class_label, class_positions, finish, fmt, limit,
    new_figure, np64, show_input, show_signed,
)

__all__ = ["contributions", "completeness_bar"]

POS, NEG, BIAS, TOTAL = "#d6604d", "#4393c3", "#999999", "#333333"


def _default_positions(rec: Reconstruction, n: int, classes: Any) -> list[int]:
    """The predicted class first, then ``classes`` (default: the runner-up)."""
    order = np.argsort(-np64(rec.logits[n]), kind="stable").tolist()
    chosen = order[1:2] if classes is None else class_positions(rec, classes)
    return list(dict.fromkeys([order[0], *chosen]))


def contributions(
    rec: Reconstruction,
    probe: int = 0,
    classes: Any = None,
    class_names: Any = None,
    path: PathLike = None,
    *,
    shared_limits: bool = True,
    cmap: str = DIVERGING,
    panel_size: float = 2.2,
    dpi: float = 100,
    title: str | None = None,
) -> Figure:
    """Where the logit comes from: W_c * x for the predicted class and the chosen classes.

    Top row: the probe, then one contribution map per class (W_c * x summed
    over channels, diverging colour map centred at zero, limits shared across
    the classes unless ``shared_limits=False``). Under each map, the
    completeness bar: the positive contributions, the negative contributions
    and the bias stack up to the reconstructed logit, and a marker shows the
    original model's logit at the same height (f_c(x) = sum(W_c * x) + b_c).

    Args:
        rec: a :class:`~reconviz.Reconstruction`.
        probe: which probe.
        classes: output indices to show next to the predicted class (default: the
            runner-up). The predicted class always comes first.
        class_names: names indexed by output index (a sequence or a mapping).
        path: save the figure there (.png, .svg, .pdf), atomically.
    """
    n = check_probe(rec, probe)
    pos = _default_positions(rec, n, classes)
    contrib = np64(rec.weight[n]) * np64(rec.probes[n])[None]  # W_c * x, (K, *sample)
    maps = [as_chw(contrib[k]).sum(0) for k in pos]
    shared = limit(*maps)
    x = as_chw(rec.probes[n])
    h, w = maps[0].shape
    aspect = min(max(w / h, 0.5), 4.0)
    cols = 1 + len(pos)
    fig = new_figure((cols * panel_size * aspect + 0.8, 2 * panel_size + 1.6), path)
    grid = fig.add_gridspec(2, cols, height_ratios=[1.0, 0.9])

    ax = fig.add_subplot(grid[0, 0])
    show_input(ax, x)
    ax.set_title(f"input (probe {n})", fontsize=9)
    legend = fig.add_subplot(grid[1, 0])
    legend.set_axis_off()
    legend.text(
        0.0, 0.5,
        "contribution map $W_c \\odot x$\n(summed over channels)\n\nred: raises the logit\n"
        "blue: lowers it\n\nbars: $\\Sigma^+ + \\Sigma^- + b_c$\n= logit; diamond = model",
        fontsize=8, va="center", transform=legend.transAxes,
    )
    predicted = int(rec.predicted[n])
    for j, (k, m) in enumerate(zip(pos, maps), start=1):
        c = int(rec.classes[k])
        ax = fig.add_subplot(grid[0, j])
        im = show_signed(ax, m, shared if shared_limits else limit(m), cmap)
        hi = k == predicted
        ax.set_title(class_label(c, class_names) + ("  (predicted)" if hi else ""), fontsize=9,
                     fontweight="bold" if hi else "normal", color="#b2182b" if hi else "black")
        fig.colorbar(im, ax=ax, fraction=0.046, pad=0.03)
        bar = fig.add_subplot(grid[1, j])
        completeness_bar(bar, contrib[k], float(rec.bias[n, k]), float(rec.logits[n, k]))
    fig.suptitle(title or f"Contributions $W_c \\odot x$: sum + bias = logit  (probe {n})", fontsize=11)
    return finish(fig, path, dpi)


def completeness_bar(ax: Any, contribution: np.ndarray, bias: float, logit: float) -> None:
    """Waterfall: sum of positive + sum of negative contributions + bias = logit (marker: f_c(x))."""
    c = np.asarray(contribution, dtype=np.float64)
    p, q = float(c[c > 0].sum()), float(c[c < 0].sum())
    total = p + q + bias
    ax.bar(0, p, color=POS)
    ax.bar(1, q, bottom=p, color=NEG)
    ax.bar(2, bias, bottom=p + q, color=BIAS)
    ax.bar(3, total, color=TOTAL)
    ax.plot([3], [logit], marker="D", color="black", markerfacecolor="#fee090", markersize=7, zorder=3)
    for a, b_ in ((0, p), (1, p + q), (2, total)):
        ax.plot([a + 0.4, a + 0.6], [b_, b_], color="black", linewidth=0.6)
    ax.axhline(0, color="black", linewidth=0.6)
    ax.set_xticks(range(4), ["$\\Sigma^+$", "$\\Sigma^-$", "$b_c$", "logit"], fontsize=8)
    ax.tick_params(axis="y", labelsize=7)
    ax.set_title(
        f"{fmt(p + q)} + {fmt(bias)} = {fmt(total)}\nmodel {fmt(logit)}  |diff| {abs(total - logit):.1e}",
        fontsize=8,
    )
