"""Class templates over a dataset: per class, the mean of W_c, its spread and the mean contribution."""

from __future__ import annotations

from typing import Any

import numpy as np
from matplotlib.figure import Figure

from ..errors import InputError
from ._base import DIVERGING, SEQUENTIAL, PathLike, bare, class_label, finish, limit, new_figure, show_signed

__all__ = ["class_templates"]

COLUMNS = ("mean $W_c$", "std $W_c$", "mean $W_c \\odot x$")


def class_templates(
    ts: Any,
    classes: Any = None,
    class_names: Any = None,
    path: PathLike = None,
    *,
    cmap: str = DIVERGING,
    panel_size: float = 1.8,
    dpi: float = 100,
    title: str | None = None,
) -> Figure:
    """A grid with one row per class of a :class:`~reconviz.TemplateSet`: the mean template
    (diverging colours centred at zero, one scale for all classes), its standard deviation
    (sequential, one scale) and the mean contribution W_c * x (diverging), with the count
    of probes each row averages. Multi-channel inputs are summed over channels (the
    template's response to a change of every channel at once; std: root of the summed variances).

    Args:
        ts: the template set (``rv.reconstruct_dataset``'s result, or ``TemplateSet.load``).
        classes: output indices to draw (default: every class of ``ts`` with a probe).
        class_names: names indexed by output index (a sequence or a mapping).
        path: save the figure there (.png, .svg, .pdf), atomically.
    """
    rows = _rows(ts, classes)
    mean, var, contrib = (_channels(a, ts) for a in (ts.mean.numpy(), ts.std.numpy() ** 2,
                                                      ts.contribution_mean.numpy()))
    std = np.sqrt(var)
    lims = (limit(*mean[rows]), limit(*std[rows]), limit(*contrib[rows]))
    fig = new_figure((3 * panel_size + 1.6, len(rows) * (panel_size + 0.35) + 0.8), path)
    axes = fig.subplots(len(rows), 3, squeeze=False)
    images = [None, None, None]
    for r, k in enumerate(rows):
        for j, (maps, lim) in enumerate(zip((mean, std, contrib), lims)):
            ax = axes[r, j]
            if j == 1:
                images[j] = ax.imshow(maps[k], cmap=SEQUENTIAL, vmin=0, vmax=lim, interpolation="nearest")
                bare(ax)
            else:
                images[j] = show_signed(ax, maps[k], lim, cmap)
            if r == 0:
                ax.set_title(COLUMNS[j], fontsize=9)
        c = int(ts.classes[k])
        axes[r, 0].set_ylabel(f"{class_label(c, class_names)}\nn = {int(ts.count[k])}", fontsize=9)
    for j, im in enumerate(images):
        fig.colorbar(im, ax=list(axes[:, j]), location="bottom", shrink=0.9, aspect=15)
    fig.suptitle(title or f"Class templates over {ts.meta.get('probes', '?')} probes (by {ts.meta.get('by')}; "
                          f"{ts.exact} exact, {len(ts.failed)} failed)", fontsize=10)
    return finish(fig, path, dpi)


def _rows(ts: Any, classes: Any) -> list[int]:
    have = [int(c) for c in ts.classes.tolist()]
    if classes is None:
        rows = [k for k in range(len(have)) if int(ts.count[k]) > 0]
        if not rows:
            raise InputError("the template set has no class with a probe: nothing to draw")
        return rows
    wanted = [int(c) for c in ([classes] if isinstance(classes, int) else classes)]
    missing = [c for c in wanted if c not in have]
    if missing or not wanted:
        raise InputError(f"class {missing[0] if missing else None} is not in the template set (classes {have})")
    return [have.index(c) for c in wanted]


def _channels(a: np.ndarray, ts: Any) -> np.ndarray:
    """(K, *S) -> (K, H, W): (K, C, H, W) summed over C; (K, H, W) kept; (K, D) as one row."""
    if a.ndim == 4:
        return a.sum(1)
    if a.ndim == 3:
        return a
    if a.ndim == 2:
        return a[:, None, :]
    raise InputError(f"cannot draw templates of sample shape {ts.sample_shape}: expected (D,), (H, W) or (C, H, W)")
