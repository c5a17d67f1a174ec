"""ONNX self-checks (:mod:`reconviz.selfcheck`), run by :func:`reconviz.onnx.reconstruct` after the solve.

* **affinity**: the linearized graph g at x = x0 + d (:func:`~reconviz.selfcheck.affinity_point`,
  one onnxruntime batch) must equal ``W x + b``.
* **region** (region-exact results): the *original* graph at x0 + eps e, for the largest
  eps in :data:`REGION_STEPS` at which every gate makes the probe's choice (re-probed and
  compared, :meth:`NodePrior.pattern`), must equal ``W x + b``. The direction e is d
  scaled by |x0| / rms(x0) entry by entry (:func:`region_direction`): entries where the
  probe is 0 (an image's background, padding) stay 0, so pooling windows that tie on them
  keep tying. With d itself, on the digits CNN (16 test digits, 1,366 tied max-pool
  windows) 1 of 16 probes kept every choice at eps = 1e-4; with e, 15 of 16 did.

Both errors are the contract's relative error with a float32 rounding floor::

    |W x + b - y| / max(1, |y|, ROUNDING * (sum_i |W_ci x_i| + |b_c|))

onnxruntime runs g and f in float32, and x0 + d is about 1.4 times the probe's scale,
so the rounding of y grows with the mass sum_i |W_ci x_i| + |b_c| that the graph adds
up, not with |y| (they differ where terms cancel). Measured at x0 + d (seeds 0-2; W x + b
in float64): the plain contract error max |W x + b - y| / max(1, |y|) is at most 4.8e-6
(digits CNN exported to ONNX, 8 test digits; its probe check: 1.7e-6), 3.4e-6 (the
Paddle-style test graph) and 2.7e-7 (lenet, vgg, resnet, densenet, Keras-style), all
well below the 1e-4 tolerance; the error relative to the mass is at most 1.5e-7
(digits, 64 probes). ROUNDING = 1e-2 admits a rounding error of 1e-6 of the mass
(about 17 float32 epsilons, 7x the worst measured) where |y| is small against the
mass, and changes nothing elsewhere: on every graph above the floor is below max(1, |y|).
A non-affine op shows at x0 + d with an error of the order of the activations, far
above either bound.
"""

from __future__ import annotations

import time

import numpy as np
import torch
from torch import Tensor

from ..reconstruction import Reconstruction
from ..selfcheck import SelfCheck, affinity_point, compare_outputs, raise_if_failed
from .linearize import LinearizedGraph
from .probe import probe

__all__ = ["self_check", "affinity", "region", "ROUNDING", "REGION_STEPS"]

ROUNDING = 1e-2  # the rounding floor's share of the mass (see the module docstring)
REGION_STEPS = (1e-2, 1e-3, 1e-4, 1e-5)  # eps of the region check's points x0 + eps e, largest first
BLOCK_BYTES = 64 * 2**20  # float64 W per block when forming W x + b


def self_check(rec: Reconstruction, lin: LinearizedGraph, seed: int = 0) -> Reconstruction:
    """Run both checks, store them in ``rec.meta["self_checks"]``; ExactnessError naming a failed one."""
    start = time.perf_counter()
    checks = [affinity(rec, lin, seed), region(rec, lin, seed)]
    seconds = time.perf_counter() - start
    rec.meta["self_checks"] = [c.to_dict() for c in checks]
    rec.meta.setdefault("timings", {})["self_checks"] = seconds
    rec.meta["seconds"] = rec.meta.get("seconds", 0.0) + seconds
    raise_if_failed(checks)
    return rec


def affinity(rec: Reconstruction, lin: LinearizedGraph, seed: int = 0) -> SelfCheck:
    """g(x0 + d) against W x + b."""
    x = affinity_point(torch.from_numpy(lin.probes), seed)
    y = graph_at(lin, x)[:, rec.classes]
    detail = f"the linearized graph at x0 + d, d ~ N(0, rms(x0)^2), seed {seed}"
    return compare("affinity", rec, x, list(range(lin.n_probes)), y, detail)


def graph_at(lin: LinearizedGraph, x: Tensor) -> Tensor:
    """g(x) in onnxruntime, (N, K_all) float64."""
    return torch.from_numpy(lin(x.numpy())).double()


def region(rec: Reconstruction, lin: LinearizedGraph, seed: int = 0) -> SelfCheck:
    """f(x0 + eps e) against W x + b, per probe at the largest eps that keeps every gate's choice."""
    if lin.exactness != "region-exact":
        return SelfCheck("region", None, None, rec.tolerance, "point-exact: the frozen gates hold at the probe only")
    if lin.prepared is None:
        return SelfCheck("region", None, None, rec.tolerance, "the original graph is not at hand")
    x0 = torch.from_numpy(lin.probes).double()
    e = region_direction(x0, seed)
    x = torch.cat([x0 + eps * e for eps in REGION_STEPS]).float()
    f, inside = original_at(lin, x)
    rows, probes = inside_rows(inside, lin.n_probes)
    used = sorted({REGION_STEPS[i // lin.n_probes] for i in rows} or REGION_STEPS, reverse=True)
    steps = ", ".join(f"{eps:g}" for eps in used)
    if not rows:
        return SelfCheck("region", None, None, rec.tolerance, f"no point x0 + eps e (eps {steps}) kept every "
                         "gate's choice: the probes lie on or next to a face of their linear region")
    detail = (f"the original graph at x0 + eps e (eps {steps}; seed {seed}) inside the probe's linear region "
              f"(every gate's choice unchanged), {len(rows)} of {lin.n_probes} probe(s)")
    return compare("region", rec, x[rows], probes, f[rows][:, rec.classes], detail)


def region_direction(x0: Tensor, seed: int = 0) -> Tensor:
    """d = affinity_point(x0) - x0 scaled by |x0| / rms(x0) entry by entry (rms 0: by |x0|)."""
    d = affinity_point(x0, seed) - x0
    rms = x0.flatten(1).pow(2).mean(1).sqrt()
    rms = torch.where(rms > 0, rms, torch.ones_like(rms)).reshape((-1,) + (1,) * (x0.dim() - 1))
    return d * x0.abs() / rms


def inside_rows(inside: np.ndarray, n: int) -> tuple[list[int], list[int]]:
    """For each probe p whose choices held at some step (rows e * n + p, largest eps first):
    the first such row, and p."""
    steps = len(inside) // n
    found = [(next((e * n + p for e in range(steps) if inside[e * n + p]), None), p) for p in range(n)]
    found = [(r, p) for r, p in found if r is not None]
    return [r for r, _ in found], [p for _, p in found]


def original_at(lin: LinearizedGraph, x: Tensor) -> tuple[Tensor, np.ndarray]:
    """(f(x) (B, K_all) float64, per row: does every gate make probe (row % N)'s choice)
    for a batch of B = k * N points, from one probe run of the original graph."""
    found = probe(lin.prepared, x.numpy())
    k = x.shape[0] // lin.n_probes
    inside = np.ones(x.shape[0], dtype=bool)
    for base, new in zip(lin.priors, (found.priors[i] for i in lin.prepared.gated)):
        inside &= (np.tile(base.pattern(), (k, 1)) == new.pattern()).all(axis=1)
    return torch.from_numpy(found.logits).double(), inside


def compare(name: str, rec: Reconstruction, x: Tensor, probes: list[int], y: Tensor, detail: str) -> SelfCheck:
    """SelfCheck of W x + b (row i with probe ``probes[i]``'s W, b) against ``y``, with the rounding floor."""
    wx, mass = affine_terms(rec, x, probes)
    s = torch.maximum(y.abs().clamp_min(1.0), ROUNDING * mass)  # >= max(1, |y|): compare_outputs divides by 1
    return compare_outputs(name, wx / s, y / s, rec.tolerance,
                           f"{detail}; error relative to max(1, |y|, {ROUNDING:g} * sum |W x| + |b|)")


def affine_terms(rec: Reconstruction, x: Tensor, probes: list[int]) -> tuple[Tensor, Tensor]:
    """(W x + b, sum_i |W_ci x_i| + |b_c|) in float64, (R, K), class block by class block
    (W may be streamed from disk)."""
    xf = x.double().flatten(1)
    step = max(1, BLOCK_BYTES // (8 * xf.numel()))
    values, mass = [], []
    for k0 in range(0, rec.n_classes, step):
        w = torch.as_tensor(rec.weight[probes, k0:k0 + step]).double().flatten(2)  # (R, k, D)
        values.append(torch.einsum("rkd,rd->rk", w, xf))
        mass.append(torch.einsum("rkd,rd->rk", w.abs(), xf.abs()))
    b = rec.bias[probes].double()
    return torch.cat(values, 1) + b, torch.cat(mass, 1) + b.abs()
