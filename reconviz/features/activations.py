"""Layer activations, feature-map grids, and dead units over a dataset (cs231n notes).

:func:`activations` returns named layers' outputs at ``x``; :func:`feature_maps`
draws one layer's channels as a grid. :func:`dead_units` streams a dataset and
counts, per layer, the units that are zero for *every* input::

    dead(u) = [ a_u(x) = 0 for all x in the data ]          (u: one element of the layer output)

a symptom of a too-high learning rate (a unit pushed where its ReLU never opens).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn as nn
from matplotlib.figure import Figure
from torch import Tensor

from ..data import DataSource
from ..errors import InputError
from ..plot._base import DIVERGING, SEQUENTIAL, PathLike, finish, limit, new_figure
from ._common import Layers, as_numpy, capture, check_dtype, check_input, check_positive, label_rows, \
    layer_name, mosaic, pick, stream, working_copy
from ..saliency.layers import _select_layers

__all__ = ["activations", "feature_maps", "DeadUnits", "dead_units", "dead_units_bar", "RECTIFIERS"]

#: The layer types :func:`dead_units` looks at by default (they output exact zeros).
RECTIFIERS: tuple[type[nn.Module], ...] = (nn.ReLU, nn.ReLU6, nn.Hardtanh, nn.Threshold)


def activations(model: nn.Module, x: Tensor, layers: Layers = None, *,
                dtype: torch.dtype | None = torch.float64) -> dict[str, Tensor]:
    """The outputs of the selected layers at ``x``: key -> tensor (N, ...), in forward-call order, x's dtype.

    ``layers``: as in :func:`reconviz.saliency.layer_gradients` (None: every conv, linear,
    rectifier and pooling leaf module; a name; a type; a sequence). Outputs are copies taken
    when the module returns, so a later in-place op does not change them.
    """
    x = check_input(x)
    dt = check_dtype(dtype, x)
    with working_copy(model, dt, x.device) as work, torch.no_grad():
        acts, _ = capture(work, x.to(dt), _select_layers(work, layers))
    return {k: v.to(x.dtype) for k, v in acts.items()}


def feature_maps(model: nn.Module, x: Tensor, layer: str, *, probe: int = 0, max_channels: int = 64,
                 ncols: int | None = None, dtype: torch.dtype | None = torch.float64, path: PathLike = None,
                 dpi: float = 100) -> Figure:
    """One layer's feature maps at probe ``probe``: a mosaic of its channels, row-major (row r starts
    at the channel its label names).

    One colour scale for the mosaic (channels compare): sequential from 0 when the maps
    are non-negative (after a ReLU), diverging and centred at 0 when signed.
    """
    key = layer_name(layer)
    act = pick(activations(model, x, key, dtype=dtype), key)
    if not 0 <= probe < act.shape[0]:
        raise InputError(f"probe {probe} is out of range: x has {act.shape[0]} sample(s)")
    maps = as_numpy(act[probe]).reshape(act.shape[1], *(act.shape[2:] or (1,)))
    maps = maps if maps.ndim == 3 else maps.reshape(maps.shape[0], 1, -1)
    shown = maps[: check_positive(max_channels, "max_channels")]
    canvas, corners, cell = mosaic(list(shown), ncols)
    cols = len({left for _, left in corners})
    fig = new_figure((min(12.0, 0.25 * canvas.shape[1] + 1.5), min(12.0, 0.25 * canvas.shape[0] + 0.8)), path)
    ax = fig.subplots()
    lim = limit(shown)
    signed = bool((maps < 0).any())
    kw = dict(cmap=DIVERGING, vmin=-lim, vmax=lim) if signed else dict(cmap=SEQUENTIAL, vmin=0, vmax=lim)
    im = ax.imshow(canvas, interpolation="nearest", **kw)
    label_rows(ax, corners, cell, cols, [f"ch {c}" for c in range(0, len(shown), cols)])
    fig.colorbar(im, ax=ax, shrink=0.8, label="activation (shared scale)")
    more = f", first {len(shown)} of {maps.shape[0]} channels" if len(shown) < maps.shape[0] else ""
    fig.suptitle(f"Feature maps of {key} at probe {probe}{more}", fontsize=9)
    return finish(fig, path, dpi)


@dataclass(frozen=True)
class DeadUnits:
    """Per layer: units (elements of one sample's output) and channels that are zero on every input."""

    layers: tuple[str, ...]
    units: tuple[int, ...]
    dead: tuple[int, ...]
    channels: tuple[int, ...]
    dead_channels: tuple[int, ...]
    n_inputs: int

    @property
    def fraction(self) -> dict[str, float]:
        """layer -> fraction of dead units."""
        return {k: d / u for k, d, u in zip(self.layers, self.dead, self.units)}

    def table(self) -> str:
        """A plain-text table, one row per layer."""
        rows = [f"{'layer':<24} {'dead units':>16} {'fraction':>9} {'dead channels':>15}"]
        for k, u, d, c, dc in zip(self.layers, self.units, self.dead, self.channels, self.dead_channels):
            rows.append(f"{k:<24} {f'{d}/{u}':>16} {d / u:>9.3f} {f'{dc}/{c}':>15}")
        return "\n".join(rows) + f"\n({self.n_inputs} inputs)"

    def to_dict(self) -> dict[str, Any]:
        return {"n_inputs": self.n_inputs, "layers": [
            {"layer": k, "units": u, "dead": d, "fraction": d / u, "channels": c, "dead_channels": dc}
            for k, u, d, c, dc in zip(self.layers, self.units, self.dead, self.channels, self.dead_channels)]}

    def __str__(self) -> str:
        return self.table()


def dead_units(model: nn.Module, data: DataSource, layers: Layers = None, *, batch_size: int = 256,
               dtype: torch.dtype = torch.float64, progress: bool | None = None) -> DeadUnits:
    """Stream ``data`` (:mod:`reconviz.data`) and count each layer's units that are 0 on every input.

    ``layers``: default every leaf module of :data:`RECTIFIERS` (functional ``F.relu`` calls
    have no module: name the module whose output they produce). A channel is dead when all its
    units are.
    """
    alive: dict[str, Tensor] = {}
    n = 0
    for x, _, acts, _ in stream(model, data, RECTIFIERS if layers is None else layers, batch_size=batch_size,
                                dtype=dtype, progress=progress, desc="dead units"):
        n += x.shape[0]
        for k, a in acts.items():
            now = (a != 0).any(0)
            alive[k] = now if k not in alive else alive[k] | now
    if not alive:
        raise InputError("no selected layer produced an output: choose layers=... (module names)")
    keys = tuple(alive)
    flat = [alive[k].reshape(alive[k].shape[0], -1) if alive[k].dim() > 1 else alive[k][:, None] for k in keys]
    return DeadUnits(
        layers=keys,
        units=tuple(int(f.numel()) for f in flat),
        dead=tuple(int((~f).sum()) for f in flat),
        channels=tuple(int(f.shape[0]) for f in flat),
        dead_channels=tuple(int((~f.any(1)).sum()) for f in flat),
        n_inputs=n,
    )


def dead_units_bar(result: DeadUnits, *, path: PathLike = None, dpi: float = 100) -> Figure:
    """Bar plot: the fraction of dead units and of dead channels per layer."""
    if not isinstance(result, DeadUnits):
        raise InputError(f"dead_units_bar takes the result of dead_units(), got {type(result).__name__}")
    k = len(result.layers)
    fig = new_figure((max(4.0, 0.9 * k + 2), 3.2), path)
    ax = fig.subplots()
    pos = np.arange(k)
    units = [d / u for d, u in zip(result.dead, result.units)]
    chans = [d / c for d, c in zip(result.dead_channels, result.channels)]
    ax.bar(pos - 0.2, units, 0.4, label="units", color="tab:red")
    ax.bar(pos + 0.2, chans, 0.4, label="channels", color="tab:gray")
    ax.set_xticks(pos, result.layers, rotation=30, ha="right", fontsize=8)
    ax.set_ylim(0, 1)
    ax.set_ylabel("fraction dead")
    ax.legend(fontsize=8)
    ax.set_title(f"Dead units: zero on all {result.n_inputs} inputs", fontsize=9)
    return finish(fig, path, dpi)
