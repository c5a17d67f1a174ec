"""``reconstruct``: probe -> priors -> linearized model -> solve -> Reconstruction."""

from __future__ import annotations

import importlib
import os
import sys
import time
import weakref
from typing import Any

import torch
import torch.nn as nn
from torch import Tensor

from .basis import BASES, Basis, make_basis
from .errors import InputError
from .linearize import LINEARIZATIONS, LinearizedModel, as_linearized, check_linearization
from .layer import layer_tail
from .probe import OutputSelector, check_dtype
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
    solve_head,
    timed_pass,
)

__all__ = ["reconstruct", "check_options", "checked", "check_linearization", "LINEARIZATIONS"]


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
    linearization: str = "value",
    layer: str | None = None,
) -> Reconstruction:
    """Reconstruct the exact affine model ``f(x) = W x + b`` of ``model`` at each probe.

    Args:
        model: a PyTorch module, piecewise linear in its input (ReLU-family
            activations, max pooling, and affine layers). Never modified: the
            work happens on a deep copy in eval mode. A :class:`LinearizedModel`
            from :func:`reconviz.linearize` is accepted too (then ``x`` may be None).
            An ``onnx.ModelProto`` or the path of a ``.onnx`` file goes to
            :func:`reconviz.onnx.reconstruct` (onnxruntime, float32) with ``classes``,
            ``basis``, ``chunk_size``, ``seed``, ``max_memory``, ``out`` and
            ``progress``; ``method`` must then be ``"auto"`` or ``"basis"``, ``dtype``
            float64 (the default) or float32, ``output`` None and ``keep_hooks`` False
            (InputError otherwise; ``rv.onnx.reconstruct(..., logits=...)`` selects a tensor).
        x: the probe batch (N, ...). Each probe gets its own W and b.
        classes: output indices to reconstruct (default: all outputs).
        method: ``"basis"`` (the paper's orthogonal-basis solve: one forward pass
            per input element), ``"adjoint"`` (one backward pass per class),
            ``"head"`` (W = A J through the affine head's narrowest cut, width P:
            P backward passes instead of K), or ``"auto"`` (the cheapest by the shapes).
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
        linearization: ``"value"`` (default): piecewise-linear gates keep their masks and
            switches (region-exact), smooth gates and the factors of products and divisions
            are frozen at their value at x0 (point-exact). ``"tangent"``: the first-order
            Taylor model at x0, W = the Jacobian of the model there, b = f(x0) - W x0
            (point-exact; on a piecewise-linear net the two rules coincide and the result is
            the value rule's, region-exact). See docs/exactness.md.
        layer: reconstruct from that module's output to the logits instead of from the
            input (a name from ``model.named_modules()``; ``"name#k"``: its call k, from 0): W has
            the layer's activation shape, ``rec.probes`` are the activations at ``x``,
            ``rec.inputs`` is ``x``, and ``sum(W_c * a) + b_c`` is logit c exactly, so
            ``rec.contributions()`` are the units' exact contributions (b_c holds the rest,
            including paths that bypass the layer). See :mod:`reconviz.layer`.

    Returns:
        A :class:`Reconstruction` whose ``meta`` records the measured error at
        the probes and the self-checks (``meta["self_checks"]``: affinity of the
        linearized network at a random point, and the model itself at a point
        inside the probe's region). Raises :class:`~reconviz.ExactnessError` if
        any of them exceeds the tolerance of ``dtype``.
    """
    if method not in METHODS:
        raise InputError(f"unknown method {method!r}: choose one of {', '.join(METHODS)}")
    check_linearization(linearization)
    if is_onnx_model(model):
        _check_onnx_options(method, dtype, output, keep_hooks, layer, linearization)
        plugin = importlib.import_module(ONNX_PLUGIN)  # a plugin lookup by name: the core never imports it
        return plugin.reconstruct(model, x, classes, basis, chunk_size, seed=seed, progress=progress,
                                  max_memory=max_memory, out=out)
    check_options(basis, chunk_size)
    start = time.perf_counter()
    source, inputs = model, None
    if layer is not None:
        model, x, inputs = _from_layer(model, x, layer, dtype, keep_hooks)
        keep_hooks = False  # the tail runs on reconviz's copy, which already has the hooks asked for
    lin = as_linearized(model, x, dtype=dtype, output=output, keep_graph=method != "basis", keep_hooks=keep_hooks,
                       linearization=linearization)
    probed = time.perf_counter()
    cls = resolve_classes(classes, lin.n_outputs, lin.probes.device)
    plan = plan_memory(lin, len(cls), max_memory, out)
    far = affinity_far(lin.probes, seed)
    g_far, pass_seconds = timed_pass(lin, far, cls)  # the affinity self-check's pass, timed for the solve
    decision: dict[str, Any] = {}
    if method == "auto":
        chosen = choose_method(lin, len(cls), seconds_per_pass=pass_seconds, work=plan.work_bytes, why=decision)
    else:
        chosen = method
    sink = WeightSink((lin.n_probes, len(cls), *lin.sample_shape), lin.dtype, lin.probes.device, plan)
    info: dict[str, Any] = {}
    common = dict(plan=plan, sink=sink, info=info, pass_seconds=pass_seconds)
    if chosen == "basis":
        lin.take_graph()  # the probe pass's graph serves the adjoint solve only: free it
        bas = make_basis(basis, sample_size(lin), seed)
        w, b = solve_basis(lin, cls, bas, chunk_size, progress, **common)
    elif chosen == "head":
        w, b = solve_head(lin, cls, chunk_size, progress, **common)
    else:
        w, b = solve_adjoint(lin, cls, chunk_size, progress, **common)
    solved = time.perf_counter()
    meta = _meta(source, lin, chosen, basis if chosen == "basis" else None, seed, output)
    meta["linearization"] = linearization
    if layer is not None:
        meta["layer"] = layer
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
        inputs=inputs,
    )
    rec.meta["self_checks"] = [c.to_dict() for c in self_checks(lin, rec, seed, (far, g_far))]
    lin.take_graph()  # the probe pass's graph (if the solve left it) is not kept with the result
    rec.linearized = lin  # verify's certified radius reuses it instead of probing again
    lin.source = weakref.ref(source)  # ... for the same model only
    return checked(rec, start, probed, solved)


def _from_layer(model: Any, x: Tensor, layer: Any, dtype: torch.dtype,
                keep_hooks: bool) -> tuple[nn.Module, Tensor, Tensor]:
    """(the network from ``layer`` to the logits, its activations at x, x in dtype)."""
    if isinstance(model, LinearizedModel):  # (an ONNX model never gets here: reconstruct routes it first)
        raise InputError("layer= needs the torch model itself (an nn.Module), not a LinearizedModel")
    check_dtype(dtype)
    tail, activations = layer_tail(model, layer, x, dtype, keep_hooks=keep_hooks)
    return tail, activations, tail.inputs


ONNX_PLUGIN = "reconviz.onnx"  # reconstructs ONNX models; imported by name when one is given


def is_onnx_model(model: Any) -> bool:
    """An ``onnx.ModelProto``, or a str / PathLike path ending in ``.onnx``."""
    if isinstance(model, (str, os.PathLike)):
        return os.fspath(model).lower().endswith(".onnx")
    onnx = sys.modules.get("onnx")  # a ModelProto exists only once onnx is imported
    return onnx is not None and isinstance(model, onnx.ModelProto)


def _check_onnx_options(method: str, dtype: Any, output: Any, keep_hooks: bool, layer: Any = None,
                        linearization: str = "value") -> None:
    """InputError for an option the ONNX path (basis method, float32 in onnxruntime) cannot honour."""
    bad = [f"method={method!r}"] if method not in ("auto", "basis") else []
    bad += [f"dtype={dtype}"] if dtype not in (torch.float32, torch.float64) else []
    bad += ["output=..."] if output is not None else []
    bad += ["keep_hooks=True"] if keep_hooks else []
    bad += [f"layer={layer!r}"] if layer is not None else []
    bad += [f"linearization={linearization!r}"] if linearization != "value" else []
    if bad:
        raise InputError(f"an ONNX model is reconstructed by the basis method in float32 (onnxruntime): "
                         f"{', '.join(bad)} does not apply; use rv.onnx.reconstruct(model, x, logits=...) to "
                         "select the logits tensor")


def affinity_far(x0: Tensor, seed: int = 0) -> Tensor:
    """The affinity self-check's point: x0 + AFFINITY_FAR * d, d random at the probe's scale."""
    return x0 + AFFINITY_FAR * (affinity_point(x0, seed) - x0)


def self_checks(lin: LinearizedModel, rec: Reconstruction, seed: int = 0,
                far: tuple[Tensor, Tensor] | None = None) -> list[SelfCheck]:
    """The affinity and region self-checks of ``rec`` (see :mod:`reconviz.selfcheck`);
    ExactnessError naming the one that fails. Two passes: g at the affinity point (``far``:
    that point and g there, when the caller ran it already), and a plain pass of the model at
    the region step (a second one, observing the gates, only where a probe disagrees). The affinity check is the one that
    guards an adjoint solve's b = f(x0) - W x0 (its point check at x0 holds by construction)."""
    if far is None:
        x = affinity_far(lin.probes, seed)
        far = x, timed_pass(lin, x, rec.classes)[0]
    x, g = far
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
    """f(x) vs W x + b at x = :func:`region_step`. A plain pass of the model first: where every
    probe agrees, the check holds whatever the gates did there. Otherwise a second pass observes
    the gates, and the check compares the probes whose gates all make the probe's choice at x;
    a probe on a region boundary there is reported, not compared."""
    if lin.exactness != "region-exact":
        return SelfCheck("region", None, None, rec.tolerance, f"{lin.why_point_exact}, no region")
    x = region_step(lin.probes)
    n, step = lin.n_probes, f"x = x0 + d, |d|_inf = {REGION_STEP:g} x max(1, |x0|_inf)"
    got = rec(x)
    plain = compare_outputs("region", got, lin.model(x)[:, rec.classes], rec.tolerance,
                            f"f(x) vs W x + b at every probe ({n}), {step}")
    if plain.passed:
        return plain
    try:
        f, held = lin.model_at(x)
    except NotImplementedError:  # a custom gate that cannot tell its choice
        return SelfCheck("region", None, None, rec.tolerance, "a custom gate defines no same_choice")
    k = int(held.sum())
    if k == 0:
        return SelfCheck("region", None, None, rec.tolerance, "the step changed a gate's choice for every "
                         "probe: they lie on region boundaries (ties; certified radius 0)")
    where = f"f(x) vs W x + b at {k} of {n} probe(s), {step}, every gate making the probe's choice there"
    if k < n:
        where += f"; {n - k} probe(s) on a region boundary"
    return compare_outputs("region", got[held], f[:, rec.classes][held], rec.tolerance, where)


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
        "frozen": [f.to_dict() for f in frozen_summary(lin.frozen_priors)],
        "ties": lin.ties,
        "output": output if isinstance(output, (int, str)) else None,
    }
