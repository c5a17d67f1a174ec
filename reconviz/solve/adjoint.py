"""The adjoint solve: W by reverse mode through the frozen network g, b from the probe.

    W[c, :] = d g_c / d x        one backward pass per class (or ``chunk`` classes per
                                 batched backward, ``is_grads_batched``) on the graph of
                                 one forward pass, kept from the probe pass where it was g's
    b = f(x0) - W x0             no forward pass: exact to rounding for an affine g;

the affinity self-check (g far from the probe against W x + b, :mod:`reconviz.selfcheck`)
is what then guards W and b together (docs/exactness.md).
"""

from __future__ import annotations

import time
from typing import Iterator

import torch
from torch import Tensor

from ..linearize import LinearizedModel
from .chunking import OVERHEAD_BOUND, Chunker, _progress, _sync, start_size
from .memory import MemoryPlan, WeightSink, adjoint_cap, adjoint_groups, per_probe_bytes, plan_memory, sample_size
from .memory import sub_linearized


def chunk_rule(chunk: int | None, device: torch.device, pass_seconds: float | None) -> int | None:
    """On a CPU, a pass that is not all overhead runs its backward one class at a time.

    A batched backward (``is_grads_batched``: vmap over the backward graph) buys
    nothing on a CPU once a pass is compute-bound: the work per class is the same
    (18.6 ms one at a time, 19.1-23.4 ms per class in batches of 2-32 on the
    benchmark's 64x64 VGG, docs/performance.md), while every class in flight holds
    a full set of activation gradients. Calibrating would only add trials and
    memory. Elsewhere (a GPU, a pass that is all overhead) the size is calibrated.
    """
    compute_bound = pass_seconds is None or pass_seconds >= OVERHEAD_BOUND
    if chunk is None and device.type == "cpu" and compute_bound:
        return 1
    return chunk


def _one_hot_seeds(m: int, out: Tensor, c0: int) -> Tensor:
    """(m, *out.shape): seed j is the one-hot of class c0 + j, for every probe."""
    seed = torch.zeros(m, *out.shape, dtype=out.dtype, device=out.device)
    seed[torch.arange(m, device=out.device), :, torch.arange(c0, c0 + m, device=out.device)] = 1
    return seed


def _kept_graph(sub: LinearizedModel, classes: Tensor) -> tuple[Tensor, Tensor]:
    """x0 as a leaf that requires grad, and g(x0)[:, classes] with its graph kept: the
    probe pass's graph when it was kept (it was g's pass), else a forward pass of g."""
    kept = sub.take_graph()
    if kept is not None:
        x, out = kept
        return x, out[:, classes]
    x = sub.probes.detach().clone().requires_grad_(True)
    return x, sub(x)[:, classes]


def _backward(x: Tensor, out: Tensor, c0: int, m: int, retain: bool) -> Tensor:
    """d out[:, c0:c0 + m] / d x, probe by probe: (n, m, D)."""
    n = x.shape[0]
    if m == 1:
        (g,) = torch.autograd.grad(out[:, c0].sum(), x, retain_graph=retain)
        return g.reshape(n, 1, -1)
    (g,) = torch.autograd.grad(out, x, grad_outputs=_one_hot_seeds(m, out, c0), is_grads_batched=True,
                               retain_graph=retain)
    return g.reshape(m, n, -1).transpose(0, 1)


def _rows(sub: LinearizedModel, classes: Tensor, chunker: Chunker, why: dict) -> Iterator[tuple[int, Tensor]]:
    """W's rows for one probe group: yields (first class, gradients (n, m, D))."""
    x, out = _kept_graph(sub, classes)
    yield from vjp_rows(x, out, chunker, why, rebuild=lambda: _kept_graph(sub, classes))


def vjp_rows(x: Tensor, out: Tensor, chunker: Chunker, why: dict, *, rebuild=None,
             keep: bool = False) -> Iterator[tuple[int, Tensor]]:
    """Rows of d out / d x, probe by probe, chunk by chunk: yields (first row, (n, m, size of x)).

    ``out`` (n, k) with its graph; ``chunker.size`` rows per backward (batched where > 1). A
    batched backward that an op has no batching rule for falls back to one row at a time
    (``why["fallback"]`` says why), on the graph ``rebuild()`` makes (default: the same one).
    The last backward frees the graph unless ``keep``."""
    device, k = x.device, out.shape[1]
    c0 = 0
    while c0 < k:
        m = chunker.next(k - c0)
        timed = not chunker.settled
        if timed:
            _sync(device)
        t0 = time.perf_counter()
        try:
            g = _backward(x, out, c0, m, retain=keep or c0 + m < k)
        except RuntimeError as e:
            if m == 1:
                raise
            why["fallback"] = f"batched backward unsupported ({str(e).splitlines()[0][:160]})"
            chunker.fix(1)
            if rebuild is not None:
                x, out = rebuild()  # the failed pass may have freed the graph
            continue
        if timed:
            _sync(device)
            chunker.record(m, time.perf_counter() - t0)
        yield c0, g
        c0 += m


def solve_adjoint(
    lin: LinearizedModel,
    classes: Tensor,
    chunk: int | None = 1,
    progress: bool | None = None,
    *,
    plan: MemoryPlan | None = None,
    sink: WeightSink | None = None,
    info: dict | None = None,
    pass_seconds: float | None = None,
) -> tuple[Tensor, Tensor]:
    """W (N, K, D) by reverse mode through the frozen network g, and b = f(x0) - W x0 (N, K).

    ``chunk`` = 1 is one backward per class on the retained graph; m > 1 seeds m
    one-hot classes in one batched backward; ``None`` calibrates the size within the
    memory cap of ``plan`` (on a CPU, a pass that is not all overhead keeps one class
    per backward: :func:`chunk_rule`; ``pass_seconds`` is a forward pass's measured time).
    """
    plan = plan or plan_memory(lin, len(classes))
    n, k = lin.n_probes, len(classes)
    sink = sink or WeightSink((n, k, sample_size(lin)), lin.dtype, lin.probes.device, plan)
    chunk = chunk_rule(chunk, lin.probes.device, pass_seconds)
    per_probe = per_probe_bytes(lin)
    groups = adjoint_groups(lin, plan.work_bytes)
    if len(groups) > 1:
        lin.take_graph()  # each group builds its own graph: free the probe's
    wx = torch.empty(n, k, dtype=lin.dtype, device=lin.probes.device)  # W x0
    calib: list[dict] = []
    why: dict = {}
    with torch.enable_grad(), _progress(k * len(groups), "adjoint solve", progress, unit="class") as bar:
        for probes in groups:
            sub = sub_linearized(lin, probes)
            cap = adjoint_cap(sub.n_probes, per_probe, plan.work_bytes, k)
            chunker = Chunker(chunk, cap if chunk is None else chunk, start_size(chunk, cap, pass_seconds), total=k)
            x0 = sub.probes.reshape(sub.n_probes, -1)
            for c0, g in _rows(sub, classes, chunker, why):
                m = g.shape[1]
                sink.put_rows(probes, c0, c0 + m, g)
                wx[probes, c0:c0 + m] = torch.einsum("nmd,nd->nm", g, x0)
                bar.update(m)
            calib.append(chunker.meta())
    if info is not None:
        info.update(calib[0] if len(calib) == 1 else {"chunk": calib[-1]["chunk"], "groups": calib})
        info["probe_groups"] = len(groups)
        info["batching"] = "loop" if info["chunk"] == 1 else "grads"
        info.update(why)
    return sink.finish(), lin.logits[:, classes].to(wx.dtype) - wx
