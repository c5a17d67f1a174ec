"""Shared plumbing of the figures: creating and saving them, shapes, labels, colours.

Figures are created in one of two ways:

* without ``path``: through :mod:`matplotlib.pyplot`, so ``plt.show()`` and
  notebooks display them like any other figure (the caller owns it and closes
  it when done);
* with ``path``: as a bare :class:`matplotlib.figure.Figure` on an Agg canvas,
  saved atomically and never registered with pyplot, so it needs no screen and
  can't pile up in ``plt.get_fignums()`` in a loop. It is returned anyway
  (``fig.savefig`` again works).

No function here closes or touches a figure it did not create.
"""

from __future__ import annotations

import contextlib
import math
import os
import uuid
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from matplotlib.figure import Figure

from ..errors import InputError
from ..reconstruction import Reconstruction

DIVERGING = "RdBu_r"  # blue negative, white zero, red positive
SEQUENTIAL = "inferno"
FORMATS = {".png": "png", ".svg": "svg", ".pdf": "pdf", ".jpg": "jpg", ".jpeg": "jpg"}

PathLike = str | os.PathLike | None


# --------------------------------------------------------------------------
# figures
# --------------------------------------------------------------------------


def new_figure(figsize: tuple[float, float], path: PathLike, **kw: Any) -> Figure:
    """A constrained-layout figure: pyplot-managed without ``path``, bare Agg with it."""
    kw.setdefault("layout", "constrained")
    if path is None:
        import matplotlib.pyplot as plt

        return plt.figure(figsize=figsize, **kw)
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    fig = Figure(figsize=figsize, **kw)
    FigureCanvasAgg(fig)
    return fig


def finish(fig: Figure, path: PathLike, dpi: float | None = None) -> Figure:
    """Save ``fig`` to ``path`` (format from the suffix) atomically; return it."""
    if path is None:
        return fig
    path = Path(path)
    fmt = FORMATS.get(path.suffix.lower())
    if fmt is None:
        raise InputError(f"cannot tell the figure format of {path}: use a .png, .svg or .pdf path")
    save_atomic(path, lambda f: fig.savefig(f, format=fmt, dpi=dpi))
    return fig


def save_atomic(path: Path, write: Any) -> None:
    """Write through a temporary file in the same folder, then rename over ``path``.

    The temporary file is created with mode 0o666 minus the umask (like ``open``),
    so the figure gets ordinary permissions (``tempfile.mkstemp`` would give 0o600).
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:12]}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def indexed_path(path: PathLike, i: int) -> PathLike:
    """``out.png`` -> ``out_probe3.png`` (or ``path.format(probe=3)`` when it has ``{probe}``)."""
    if path is None:
        return None
    s = os.fspath(path)
    if "{probe" in s:
        return s.format(probe=i)
    p = Path(s)
    return p.with_name(f"{p.stem}_probe{i}{p.suffix}")


# --------------------------------------------------------------------------
# data
# --------------------------------------------------------------------------


def np64(t: Any) -> np.ndarray:
    if isinstance(t, torch.Tensor):
        return t.detach().cpu().to(torch.float64).numpy()
    return np.asarray(t, dtype=np.float64)


def as_chw(a: Any) -> np.ndarray:
    """One sample as a (C, H, W) array: (D,) -> (1, 1, D); (H, W) -> (1, H, W)."""
    a = np64(a)
    if a.ndim == 1:
        return a[None, None, :]
    if a.ndim == 2:
        return a[None]
    if a.ndim == 3:
        return a
    raise InputError(
        f"cannot show a sample of shape {a.shape} as an image: figures take (D,), (H, W) or (C, H, W) inputs"
    )


def check_probe(rec: Reconstruction, probe: Any) -> int:
    try:
        i = int(probe)
    except (TypeError, ValueError):
        raise InputError(f"probe must be an integer index, got {probe!r}") from None
    if not -rec.n_probes <= i < rec.n_probes:
        raise InputError(f"probe {i} is out of range: the reconstruction has {rec.n_probes} probe(s)")
    return i % rec.n_probes


def class_positions(rec: Reconstruction, classes: Any) -> list[int]:
    """Positions in ``rec.classes`` of the output indices ``classes`` (None: all)."""
    if classes is None:
        return list(range(rec.n_classes))
    if isinstance(classes, (int, np.integer)) or (isinstance(classes, torch.Tensor) and classes.dim() == 0):
        classes = [int(classes)]
    have = [int(c) for c in rec.classes.tolist()]
    pos = []
    for c in classes:
        c = int(c)
        if c not in have:
            raise InputError(
                f"class {c} was not reconstructed (the reconstruction has classes {have}); "
                "pass classes=... to reconviz.reconstruct"
            )
        pos.append(have.index(c))
    if not pos:
        raise InputError("classes is empty: give at least one class, or None for all")
    return pos


def class_label(c: int, class_names: Any) -> str:
    """The display name of output index ``c``."""
    if class_names is None:
        return f"class {c}"
    if isinstance(class_names, Mapping):
        return str(class_names.get(c, f"class {c}"))
    if isinstance(class_names, (Sequence, np.ndarray, torch.Tensor)) and not isinstance(class_names, (str, bytes)):
        if 0 <= c < len(class_names):
            name = class_names[c]
            return str(name.item() if hasattr(name, "item") else name)
        return f"class {c}"
    raise InputError(f"class_names must be a sequence or a mapping, got {type(class_names).__name__}")


def limit(*arrays: np.ndarray) -> float:
    """Symmetric colour limit: max |a| over the arrays (1 where all are zero)."""
    m = max((float(np.nanmax(np.abs(a))) for a in arrays if np.size(a)), default=0.0)
    return m if m > 0 and math.isfinite(m) else 1.0


def fmt(v: float) -> str:
    """A number short enough for a caption."""
    a = abs(v)
    if a != 0 and (a >= 1e4 or a < 1e-3):
        return f"{v:.3e}"
    return f"{v:.4f}"


# --------------------------------------------------------------------------
# drawing
# --------------------------------------------------------------------------


def bare(ax: Any) -> None:
    """No ticks, keep the frame."""
    ax.set_xticks([])
    ax.set_yticks([])


def show_signed(ax: Any, img: np.ndarray, lim: float, cmap: str = DIVERGING) -> Any:
    """A 2-D map on a diverging colour map centred at zero, limits [-lim, lim]."""
    im = ax.imshow(img, cmap=cmap, vmin=-lim, vmax=lim, interpolation="nearest")
    bare(ax)
    return im


def show_magnitude(ax: Any, img: np.ndarray, cmap: str = SEQUENTIAL) -> Any:
    im = ax.imshow(img, cmap=cmap, vmin=0, vmax=limit(img), interpolation="nearest")
    bare(ax)
    return im


def show_input(ax: Any, chw: np.ndarray) -> Any:
    """A probe as a person sees it: grey-scale, or RGB rescaled to [0, 1]."""
    if chw.shape[0] == 3:
        im = ax.imshow(normalise01(chw.transpose(1, 2, 0)), interpolation="nearest")
    else:
        im = ax.imshow(chw.mean(0), cmap="gray", interpolation="nearest")
    bare(ax)
    return im


def normalise01(a: np.ndarray) -> np.ndarray:
    lo, hi = float(np.min(a)), float(np.max(a))
    return np.zeros_like(a) + 0.5 if hi <= lo else (a - lo) / (hi - lo)


def composite(chw: np.ndarray, lim: float) -> np.ndarray:
    """A signed (3, H, W) map as colour: 0.5 + w / (2 lim) per channel (zero is mid grey)."""
    return np.clip(0.5 + chw.transpose(1, 2, 0) / (2 * lim), 0, 1)


def show_signed_or_colour(ax: Any, chw: np.ndarray, lim: float, cmap: str = DIVERGING) -> Any:
    """RGB maps as a normalised colour composite, anything else as the channel sum (diverging)."""
    if chw.shape[0] == 3:
        im = ax.imshow(composite(chw, lim), interpolation="nearest")
        bare(ax)
        return im
    return show_signed(ax, chw.sum(0), lim, cmap)
