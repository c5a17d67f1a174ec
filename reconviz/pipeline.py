"""``reconstruct``: probe -> priors -> linearized model -> solve -> Reconstruction."""

from __future__ import annotations

import os
import time
import weakref
from typing import Any

import torch
import torch.nn as nn
from torch import Tensor

from .basis import BASES, Basis, make_basis
from .errors import InputError
from .linearize import LinearizedModel, as_linearized
from .probe import OutputSelector
from .reconstruction import Reconstruction, frozen_summary, tolerance_for
from .selfcheck import SelfCheck, affinity_point, compare_outputs, raise_if_failed
from .solve import (
    METHODS,
    WeightSink,
    choose_method,
    plan_memory,
    resolve_classes,
    sample_size,
    solve_adjoint,
    solve_basis,
    timed_bias,
)

__all__ = ["reconstruct", "check_options", "checked"]


def reconstruct(
    model: nn.Module,
    x: Tensor,
    classes: Any = None,
    method: str = "auto",
    basis: str | Basis = "identity",
    dtype: torch.dtype = torch.float64,
    chunk_size: int | None = None,
    output: OutputSelector = None,
    *,
    seed: int = 0,
    max_memory: int | None = None,
    out: str | os.PathLike | None = None,
    progress: bool | None = None,
    keep_hooks: bool = False,
) -> Reconstruction:
    """Reconstruct the exact affine model ``f(x) = W x + b`` of ``model`` at each probe.

    Args:
        model: a PyTorch module, piecewise linear in its input (ReLU-family
            activations, max pooling, and affine layers). Never modified: the
            work happens on a deep copy in eval mode. A :class:`LinearizedModel`
            from :func:`reconviz.linearize` is accepted too (then ``x`` may be None).
        x: the probe batch (N, ...). Each probe gets its own W and b.
        classes: output indices to reconstruct (default: all outputs).
        method: ``"basis"`` (the paper's orthogonal-basis solve: one forward pass
            per input element), ``"adjoint"`` (one backward pass per class), or
            ``"auto"`` (the cheaper by the shapes).
        basis: ``"identity"`` (one by one), ``"hadamard"``, ``"random"``, or a
            :class:`~reconviz.basis.Basis`; used by the basis method.
        dtype: working precision (float64 by default: tolerance 1e-9 relative).
        chunk_size: basis columns per forward pass (basis) or classes per batched
            backward pass (adjoint; 1 = one backward per class on a retained graph).
            Default: calibrated on the work itself (sizes 1, 2, 4, ... timed while
            they improve) within the cap the memory budget allows.
        output: selects the logits when the model returns a tuple, dict or object
            (an index, a key, or a callable on the output).
        seed: seed of the random basis.
        max_memory: memory budget in bytes for W plus the chunks in flight. W
            stays in memory when it fits with room for the chunks; otherwise it
            streams to a memory-mapped ``.npy`` (``rec.streamed``) and every
            :class:`Reconstruction` method works on it block by block. Default:
            W in memory, 768 MiB for the chunks (GPU: a quarter of free memory).
        out: path of a ``.npy`` file to stream W into (implies streaming); by
            default a streamed W goes to an unlinked temporary file (folder:
            ``$RECONVIZ_TMPDIR`` or the system's temporary folder).
        progress: show a progress bar (default: on a terminal, for long solves).
        keep_hooks: run the model's own forward hooks on reconviz's copy (default:
            the copy has none, so a hook cannot change your objects).

    Returns:
        A :class:`Reconstruction` whose ``meta`` records the measured error at
        the probes and the self-checks (``meta["self_checks"]``: affinity of the
        linearized network at a random point, and the model itself at a point
        inside the probe's region). Raises :class:`~reconviz.ExactnessError` if
        any of them exceeds the tolerance of ``dtype``.
    """
    if method not in METHODS:
        raise InputError(f"unknown method {method!r}: choose one of {', '.join(METHODS)}")
    check_options(basis, chunk_size)
    start = time.perf_counter()
    lin = as_linearized(model, x, dtype=dtype, output=output, keep_graph=method != "basis", keep_hooks=keep_hooks)
    probed = time.perf_counter()
    cls = resolve_classes(classes, lin.n_outputs, lin.probes.device)
    plan = plan_memory(lin, len(cls), max_memory, out)
    b, pass_seconds = timed_bias(lin, cls)
    decision: dict[str, Any] = {}
    if method == "auto":
        chosen = choose_method(lin, len(cls), seconds_per_pass=pass_seconds, work=plan.work_bytes, why=decision)
    else:
        chosen = method
    sink = WeightSink((lin.n_probes, len(cls), *lin.sample_shape), lin.dtype, lin.probes.device, plan)
    info: dict[str, Any] = {}
    common = dict(plan=plan, sink=sink, info=info, b=b, pass_seconds=pass_seconds)
    if chosen == "basis":
        lin.take_graph()  # the probe pass's graph serves the adjoint solve only: free it
        bas = make_basis(basis, sample_size(lin), seed)
        w, b = solve_basis(lin, cls, bas, chunk_size, progress, **common)
    else:
        w, b = solve_adjoint(lin, cls, chunk_size, progress, **common)
    solved = time.perf_counter()
    meta = _meta(model, lin, chosen, basis if chosen == "basis" else None, seed, output)
    meta.update(chunk_size=info.get("chunk"), memory=plan.meta(), solver=info)
    if decision:
        meta["auto"] = decision
    if plan.path is not None:
        meta["weight_file"] = plan.path
    rec = Reconstruction(
        weight=w.reshape(lin.n_probes, len(cls), *lin.sample_shape),
        bias=b,
        classes=cls,
        logits=lin.logits[:, cls],
        probes=lin.probes,
        meta=meta,
        mapped=sink.mapped,
    )
    rec.meta["self_checks"] = [c.to_dict() for c in self_checks(lin, rec, seed)]
    lin.take_graph()  # the probe pass's graph (if the solve left it) is not kept with the result
    rec.linearized = lin  # verify's certified radius reuses it instead of probing again
    lin.source = weakref.ref(model)  # ... for the same model only
    return checked(rec, start, probed, solved)


def self_checks(lin: LinearizedModel, rec: Reconstruction, seed: int = 0) -> list[SelfCheck]:
    """The affinity and region self-checks of ``rec`` (see :mod:`reconviz.selfcheck`);
    ExactnessError naming the one that fails. Two passes: g at the affinity point, and the
    model at the region step (its gates' choices observed on the way)."""
    x0 = lin.probes
    x = x0 + AFFINITY_FAR * (affinity_point(x0, seed) - x0)
    with torch.no_grad():
        g = lin(x)[:, rec.classes]
    checks = [compare_outputs("affinity", rec(x), g, rec.tolerance,
                              f"g(x) vs W x + b at x = x0 + {AFFINITY_FAR:g} d, d random at the probe's "
                              "scale: far out, where a kink reconviz missed would show")]
    checks.append(region_check(lin, rec))
    raise_if_failed(checks)
    return checks


AFFINITY_FAR = 100.0  # the affinity point's distance, in units of the probe's scale
REGION_STEP = 1e-6  # the region check's step, relative to max(1, |x0|_inf)


def region_step(x0: Tensor) -> Tensor:
    """x0 + s max(1, |x0|_inf) u, s = REGION_STEP, u = x0 / |x0|_inf: along the probe keeps its
    exact zeros (the usual source of ties) at zero; an all-zero probe steps along ones."""
    shape = (-1,) + (1,) * (x0.dim() - 1)
    peak = x0.flatten(1).abs().amax(1)
    unit = torch.where((peak > 0).reshape(shape), x0 / peak.clamp_min(1e-300).reshape(shape), torch.ones_like(x0))
    return x0 + REGION_STEP * peak.clamp_min(1.0).reshape(shape) * unit


def region_check(lin: LinearizedModel, rec: Reconstruction) -> SelfCheck:
    """f(x) vs W x + b at x = :func:`region_step`, probe by probe where every gate makes that
    probe's choice at x; a probe on a region boundary there is reported, not compared."""
    if lin.exactness != "region-exact":
        return SelfCheck("region", None, None, rec.tolerance, "point-exact: gates frozen at their values, no region")
    x = region_step(lin.probes)
    try:
        f, held = lin.model_at(x)
    except NotImplementedError:  # a custom gate that cannot tell its choice
        return SelfCheck("region", None, None, rec.tolerance, "a custom gate defines no same_choice")
    n, k = lin.n_probes, int(held.sum())
    if k == 0:
        return SelfCheck("region", None, None, rec.tolerance, "the step changed a gate's choice for every "
                         "probe: they lie on region boundaries (ties; certified radius 0)")
    where = (f"f(x) vs W x + b at {k} of {n} probe(s), x = x0 + d, |d|_inf = {REGION_STEP:g} x "
             "max(1, |x0|_inf), every gate making the probe's choice there")
    if k < n:
        where += f"; {n - k} probe(s) on a region boundary"
    return compare_outputs("region", rec(x)[held], f[:, rec.classes][held], rec.tolerance, where)


def check_options(basis: str | Basis, chunk_size: int | None) -> None:
    """InputError for an unknown basis name or a chunk_size that is not a positive int."""
    if not isinstance(basis, Basis) and basis not in BASES:
        raise InputError(f"unknown basis {basis!r}: choose one of {', '.join(BASES)} or pass a Basis")
    if chunk_size is not None and (not isinstance(chunk_size, int) or isinstance(chunk_size, bool)
                                   or chunk_size < 1):
        raise InputError(f"chunk_size must be a positive integer, got {chunk_size!r}")


def checked(rec: Reconstruction, start: float, probed: float, solved: float) -> Reconstruction:
    """``rec.check()`` (ExactnessError above the tolerance), then the stage timings in ``rec.meta``."""
    rec.check()
    end = time.perf_counter()
    rec.meta["seconds"] = end - start
    rec.meta["timings"] = {"probe": probed - start, "solve": solved - probed, "check": end - solved}
    return rec


def _meta(model: nn.Module, lin: LinearizedModel, method: str, basis: Any, seed: int, output: Any) -> dict:
    work = lin.work
    return {
        "model": type(work).__name__ if isinstance(model, LinearizedModel) else type(model).__name__,
        "sample_shape": list(lin.sample_shape),
        "method": method,
        "basis": basis.name if isinstance(basis, Basis) else basis,
        "seed": seed if basis == "random" else None,
        "tolerance": tolerance_for(lin.dtype),
        "exactness": lin.exactness,
        "gates": lin.gate_counts(),  # untyped counts per gate name; rec.frozen is the typed view
        "frozen": [f.to_dict() for f in frozen_summary(lin.priors)],
        "ties": lin.ties,
        "output": output if isinstance(output, (int, str)) else None,
    }
