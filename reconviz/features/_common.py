"""What every feature shares: the working copy, running it with layer hooks, streaming data.

The user's model is only read: :func:`working_copy` deep-copies it
(:func:`reconviz.probe.eval_copy`: eval mode, the working dtype, frozen
parameters, no user hooks); every hook is put on the copy and removed in a
``finally``, so an error leaves nothing behind. Layers are chosen with the
selectors of :func:`reconviz.saliency.layer_gradients` (a module name, a module
type, a sequence of them); a module called k > 1 times per forward gives keys
``name#0``, ``name#1``, ...
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from typing import Any, Iterator, Sequence

import matplotlib
import numpy as np
import torch
import torch.nn as nn
from torch import Tensor

from ..data import DataSource, batches, num_samples
from ..errors import InputError, ReconvizError
from ..probe import MODEL_ERRORS, eval_copy
from ..saliency._common import Hooks, check_dtype, check_input
from ..saliency.layers import Layers, _keys, _Recorder, _select_layers
from ..solve.chunking import _progress

__all__ = ["working_copy", "run", "capture", "layer_name", "pick", "stream", "last_linear", "check_positive",
           "check_seed", "as_numpy", "grid_shape", "mosaic", "label_rows", "BLANKED_GREY", "Layers", "check_input",
           "check_dtype"]


@contextmanager
def working_copy(model: Any, dtype: torch.dtype, device: torch.device | str = "cpu") -> Iterator[nn.Module]:
    """A private eval-mode copy of ``model`` in ``dtype`` (see :func:`reconviz.probe.eval_copy`); every
    hook reconviz needs goes on it, inside a :class:`~reconviz.saliency._common.Hooks` block."""
    yield eval_copy(model, dtype, torch.device(device), stacklevel=5)  # (eval_copy checks the model)


def run(work: nn.Module, x: Tensor) -> Any:
    """``work(x)`` on a clone of ``x`` (a model may write into its input); model failures as InputError."""
    try:
        return work(x.clone())
    except ReconvizError:
        raise
    except MODEL_ERRORS as e:
        raise InputError(f"the model failed on a batch of shape {tuple(x.shape)}: {type(e).__name__}: {e}. "
                         "Check the data's sample shape, channels and dtype against what the model expects") from e


def capture(work: nn.Module, x: Tensor, chosen: Sequence[tuple[str, nn.Module]], *,
            inputs: bool = False, detach: bool = True) -> tuple[dict[str, Tensor], Any]:
    """Run ``work`` on ``x``; return (key -> output of each chosen layer, cloned, in call order; the model output).

    ``inputs``: record each layer's (first) input instead of its output; ``detach=False`` keeps the graph.
    """
    outs: list[Tensor] = []
    rec = _Recorder(list(chosen), lambda name, t: outs.append(t.detach().clone() if detach else t.clone()))
    with Hooks() as hooks:
        if inputs:
            for name, m in chosen:
                hooks.add(m.register_forward_pre_hook(_input_hook(rec, name)))
        else:
            rec.install(hooks)
        y = run(work, x)
    return dict(zip(_keys(rec.calls), outs)), y


def _input_hook(rec: _Recorder, name: str) -> Any:
    def hook(module: nn.Module, args: tuple) -> None:
        if args and isinstance(args[0], Tensor) and args[0].is_floating_point():
            rec.calls.append(name)
            rec.fn(name, args[0])

    return hook


def layer_name(layer: Any) -> str:
    """``layer`` if it names one layer (``"name"`` or ``"name#k"``, the k-th call from 0); InputError otherwise."""
    if not isinstance(layer, str) or not layer:
        raise InputError(f"layer must be one module name (as in model.named_modules()), got {layer!r:.60}")
    return layer


def pick(acts: dict[str, Tensor], key: str) -> Tensor:
    """The activation of ``key``; InputError naming the keys there are."""
    if key in acts:
        return acts[key]
    if f"{key}#0" in acts:
        raise InputError(f"layer {key!r} runs several times per forward: choose one call, e.g. {key + '#0'!r}")
    raise InputError(f"layer {key!r} gave no floating-point output on this input; recorded: {list(acts)[:20]}")


def stream(model: Any, data: DataSource, layers: Layers, *, batch_size: int, dtype: torch.dtype,
           progress: bool | None = None, inputs: bool = False,
           desc: str = "batches") -> Iterator[tuple[Tensor, Tensor | None, dict[str, Tensor], Any]]:
    """For each batch of ``data``: (x, y, key -> activation, model output), on one working copy.

    ``layers``: as in :func:`reconviz.saliency.layer_gradients`; ``[]`` records none."""
    check_dtype(dtype, torch.empty(0))
    total = num_samples(data)
    with working_copy(model, dtype) as work:
        chosen = [] if isinstance(layers, (list, tuple)) and not layers else _select_layers(work, layers)
        shown = progress if progress is not None or total else False  # None: on a terminal, for a known size
        with _progress(total or 0, desc, shown, unit="sample") as bar:
            for x, y in batches(data, batch_size, dtype=dtype):
                acts, out = capture(work, x, chosen, inputs=inputs)
                yield x, y, acts, out
                bar.update(x.shape[0])


def last_linear(model: nn.Module) -> str:
    """The name of the model's last ``nn.Linear`` (in ``named_modules`` order)."""
    names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    if not names:
        raise InputError("the model has no nn.Linear layer to take the penultimate features from: pass layer=NAME")
    return names[-1]


def check_positive(value: Any, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise InputError(f"{what} must be a positive int, got {value!r}")
    return int(value)


def check_seed(seed: Any) -> int:
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)):
        raise InputError(f"seed must be an int, got {seed!r}")
    return int(seed)


def as_numpy(t: Any) -> np.ndarray:
    """A tensor or array as a float64 numpy array."""
    if isinstance(t, Tensor):
        return t.detach().cpu().to(torch.float64).numpy()
    return np.asarray(t, dtype=np.float64)


def grid_shape(n: int, ncols: int | None) -> tuple[int, int]:
    """(rows, cols) for n panels, at most ``ncols`` (default: about square) per row."""
    cols = max(1, min(n, ncols or math.ceil(math.sqrt(n))))
    return math.ceil(n / cols), cols


#: grey-scale images with blank (NaN) cells in a pale blue, distinct from white pixels
BLANKED_GREY = matplotlib.colormaps["gray"].with_extremes(bad="#dde8f3")


def mosaic(tiles: Sequence[np.ndarray], ncols: int | None = None,
           gap: int = 1) -> tuple[np.ndarray, list[tuple[int, int]], tuple[int, int]]:
    """Tiles (h, w) or (h, w, 3) on one canvas, row-major, ``gap`` pixels apart: (canvas, the (top,
    left) of each tile, the cell size). Gaps and padding are NaN (blank) for maps, 1 (white) for RGB.

    One image instead of one axes per tile: matplotlib draws a hundred axes in seconds."""
    rows, cols = grid_shape(len(tiles), ncols)
    h, w = max(t.shape[0] for t in tiles), max(t.shape[1] for t in tiles)
    rgb = tiles[0].ndim == 3
    canvas = np.full((rows * (h + gap) - gap, cols * (w + gap) - gap) + ((3,) if rgb else ()),
                     1.0 if rgb else np.nan)
    corners = []
    for i, t in enumerate(tiles):
        top, left = (i // cols) * (h + gap), (i % cols) * (w + gap)
        canvas[top: top + t.shape[0], left: left + t.shape[1]] = t
        corners.append((top, left))
    return canvas, corners, (h, w)


def label_rows(ax: Any, corners: list[tuple[int, int]], cell: tuple[int, int], ncols: int,
               labels: Sequence[str]) -> None:
    """One y tick label per mosaic row (at its first tile), and nothing else on the axes."""
    firsts = corners[::ncols]
    ax.set_yticks([top + (cell[0] - 1) / 2 for top, _ in firsts], list(labels)[: len(firsts)], fontsize=7)
    ax.set_xticks([])
    ax.tick_params(length=0)
