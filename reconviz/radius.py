"""The certified radius of the probe's linear region.

Inside the region every gate keeps its prior, so g = f there. Each gate exposes
affine features h_m(x) = a_m . x + h_m(0) whose sign pattern defines the region
(ReLU: the pre-activation; max-pool: z[switch] - z[other member]); with
margin_m the distance of h_m(x0) to its breakpoint,

    r_2   = min_m margin_m / ||a_m||_2        r_inf = min_m margin_m / ||a_m||_1

is the exact L2 / L-inf distance from x0 to the nearest face of the region
(first order is exact because g is affine). ||a_m|| comes from one sweep of the
identity basis: a_m . e_i = h_m(e_i) - h_m(0). Ties (margin 0) give radius 0.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn as nn
from torch import Tensor

from .basis import make_basis
from .gates import Gate, Prior
from .linearize import LinearizedModel, as_linearized
from .probe import OutputSelector
from .solve import basis_chunk, sample_size, sweep
from .htmlparts import HtmlRepr

__all__ = ["Radius", "certified_radius", "boundary_direction"]


@dataclass
class Nearest:
    """The face of the region closest to a probe (in L2)."""

    gate_index: int  # position of the gated call in the forward pass
    gate: str
    module_path: str
    feature: int  # index of the feature within that call (flattened, per probe)
    distance: float


@dataclass
class Radius(HtmlRepr):
    """Certified radii per probe: ``l2`` and ``linf`` (N,), ties, nearest face."""

    l2: Tensor
    linf: Tensor
    ties: int  # features exactly on a face that moves with the input (radius 0)
    equalities: int  # all exact ties at the probe, including between input-independent units
    nearest: list[Nearest | None] = field(default_factory=list)
    why: str = ""  # why the radius is 0 without a tie (a point-exact linearization)

    def __str__(self) -> str:
        parts = [f"probe {i}: L2 {float(a):.4g}, Linf {float(b):.4g}" for i, (a, b) in enumerate(zip(self.l2, self.linf))]
        if self.why:
            return "; ".join(parts) + f" ({self.why}, no linear region)"
        return "; ".join(parts) + f" (ties on a moving face: {self.ties}; exact equalities: {self.equalities})"


class _Accumulator:
    """Observer for the three passes: margins at x0, features at 0, then the sweep."""

    def __init__(self, n: int):
        self.n = n
        self.phase = "probe"
        self.margin: dict[int, Tensor] = {}
        self.h0: dict[int, Tensor] = {}
        self.sumsq: dict[int, Tensor] = {}
        self.sumabs: dict[int, Tensor] = {}

    def __call__(self, i: int, gate: Gate, prior: Prior, z: Tensor) -> None:
        if self.phase == "probe":
            self.margin[i] = gate.margins(prior, z)
        elif self.phase == "zero":
            self.h0[i] = gate.features(prior, z)
        else:
            h = gate.features(prior, z)
            d = h.reshape(-1, self.n, h.shape[-1]) - self.h0[i]
            self.sumsq[i] = self.sumsq.get(i, 0) + (d * d).sum(0)
            self.sumabs[i] = self.sumabs.get(i, 0) + d.abs().sum(0)


def certified_radius(
    model: nn.Module | LinearizedModel,
    x: Tensor | None = None,
    *,
    dtype: torch.dtype = torch.float64,
    chunk_size: int | None = None,
    progress: bool | None = None,
    output: OutputSelector = None,
    linearization: str = "value",
) -> Radius:
    """L2 and L-inf radius of the linear region around each probe (costs D forward passes).

    ``output`` selects the logits of a model returning a tuple or dict (as for
    :func:`~reconviz.reconstruct`; a LinearizedModel keeps its own). A point-exact
    linearization (a smooth gate frozen at the probe, or the tangent rule on a gated net) has
    no region: radius 0."""
    lin = as_linearized(model, x, dtype=dtype, output=output, linearization=linearization)
    if lin.exactness == "point-exact":
        zero = torch.zeros(lin.n_probes, dtype=lin.dtype)
        return Radius(zero, zero.clone(), ties=0, equalities=0, nearest=[None] * lin.n_probes,
                      why=lin.why_point_exact)
    acc = _Accumulator(lin.n_probes)
    with torch.no_grad():
        lin(lin.probes, observer=acc)
        acc.phase = "zero"
        lin(torch.zeros_like(lin.probes), observer=acc)
        acc.phase = "sweep"
        classes = torch.zeros(1, dtype=torch.long, device=lin.probes.device)
        basis = make_basis("identity", sample_size(lin))
        for _ in sweep(lin, basis, classes, chunk_size or basis_chunk(lin), progress, acc):
            pass
    return _reduce(lin, acc)


def _reduce(lin: LinearizedModel, acc: _Accumulator) -> Radius:
    n = lin.n_probes
    l2 = torch.full((n,), math.inf, dtype=lin.dtype)
    linf = torch.full((n,), math.inf, dtype=lin.dtype)
    nearest: list[Nearest | None] = [None] * n
    ties = 0
    for i, prior in enumerate(lin.priors):
        if i not in acc.sumsq:
            continue
        moves = acc.sumsq[i] > 0  # features that do depend on the input
        ties += int(((acc.margin[i] == 0) & moves).sum())
        inf = torch.full_like(acc.margin[i], math.inf)
        r2 = torch.where(moves, acc.margin[i] / acc.sumsq[i].sqrt(), inf).cpu()
        ri = torch.where(moves, acc.margin[i] / acc.sumabs[i], inf).cpu()
        best, where = r2.min(dim=1)
        for p in range(n):
            if best[p] < l2[p]:
                l2[p] = best[p]
                nearest[p] = Nearest(i, prior.gate, prior.module_path, int(where[p]), float(best[p]))
        linf = torch.minimum(linf, ri.min(dim=1).values.to(linf.dtype))
    return Radius(l2, linf, ties, lin.ties, nearest)


def boundary_direction(lin: LinearizedModel, probe: int, face: Nearest) -> Tensor:
    """Unit vector (sample-shaped) from probe ``probe`` straight towards ``face``.

    Moving ``face.distance`` along it reaches the face; further crosses it.
    """
    from .gates import gate_named

    gate = gate_named(face.gate)
    grabbed: dict[str, Tensor] = {}

    def grab(i: int, g: Gate, prior: Prior, z: Tensor) -> None:
        if i == face.gate_index:
            grabbed["h"] = gate.features(prior, z)[probe, face.feature]
            grabbed["sign"] = gate.face_sign(prior, z.detach(), probe, face.feature)

    x = lin.probes.detach().clone().requires_grad_(True)
    with torch.enable_grad():
        lin(x, observer=grab)
        (a,) = torch.autograd.grad(grabbed["h"], x)
    return grabbed["sign"] * a[probe] / a[probe].norm()
