"""The head-factorized solve: W = A J through the narrowest cut of the affine head.

After its last gate a network is affine: g(x) = A h(x) + c, with h the narrowest
tensor every path from the outputs back to the input runs through
(:meth:`~reconviz.linearize.LinearizedModel.head_cut`, width P per probe: e.g. the
pooled 512 features of a ResNet-18 under its 1,000 classes). Then

    A = d g / d h      (K x P)  K backward passes through the head only (batched)
    J = d h / d x      (P x D)  P backward passes through the trunk
    W = A J                     one GEMM per probe;   b = f(x0) - A (J x0)

P trunk passes instead of K: K / P times fewer where P < K. W is the adjoint's W to
rounding (the head is affine, so A is exact); the self-checks guard it like any solve.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..errors import InputError
from ..linearize import LinearizedModel
from .adjoint import chunk_rule, vjp_rows
from .chunking import Chunker, _progress, start_size
from .memory import MemoryPlan, WeightSink, adjoint_cap, per_probe_bytes, plan_memory, sample_size

HEAD_ROWS_BYTES = 64 * 2**20  # A's rows per batched backward through the head: this much gradient at most


def head_bytes(lin: LinearizedModel, n_classes: int, width: int) -> int:
    """Working bytes of the head solve beyond the kept graph: J (N, P, D) and A (N, K, P)."""
    return lin.n_probes * width * (sample_size(lin) + n_classes) * lin.probes.element_size()


def head_width(lin: LinearizedModel) -> int | None:
    """P, the width per probe of the narrowest cut of the affine head (None: no cut narrower
    than the outputs, or no kept graph)."""
    h = lin.head_cut()
    return None if h is None else h.numel() // lin.n_probes


def solve_head(
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
    """W (N, K, D) = A J and b = f(x0) - A J x0 (N, K) through the head's narrowest cut.

    ``chunk``: rows of J per trunk backward (as the adjoint's ``chunk``; ``None`` calibrates).
    InputError when the probe pass kept no graph or the head has no cut narrower than K."""
    h = lin.head_cut()
    if h is None:
        raise InputError("method='head' needs the probe pass's graph (the built-in gates keep it) and an "
                         "affine head with a cut narrower than the outputs; use method='adjoint'")
    plan = plan or plan_memory(lin, len(classes))
    n, k, p = lin.n_probes, len(classes), h.numel() // lin.n_probes
    sink = sink or WeightSink((n, k, sample_size(lin)), lin.dtype, lin.probes.device, plan)
    x, out = lin.take_graph()
    why: dict = {}
    a = _head_jacobian(h, out[:, classes], why)
    chunk = chunk_rule(chunk, x.device, pass_seconds)
    cap = adjoint_cap(n, per_probe_bytes(lin), plan.work_bytes, p)
    chunker = Chunker(chunk, cap if chunk is None else chunk, start_size(chunk, cap, pass_seconds), total=p)
    j = torch.empty(n, p, x[0].numel(), dtype=lin.dtype, device=x.device)
    with torch.enable_grad(), _progress(p, "head solve (trunk)", progress, unit="row") as bar:
        for r0, g in vjp_rows(x, h.reshape(n, p), chunker, why):
            j[:, r0:r0 + g.shape[1]] = g
            bar.update(g.shape[1])
    del x, out, h
    block = max(1, HEAD_ROWS_BYTES // max(1, n * j.shape[2] * j.element_size()))  # W's rows per GEMM
    for k0 in range(0, k, block):
        sink.put_rows(slice(0, n), k0, min(k, k0 + block), torch.bmm(a[:, k0:k0 + block], j))
    wx = torch.bmm(a, torch.bmm(j, lin.probes.reshape(n, -1, 1))).squeeze(-1)
    if info is not None:
        info.update(chunker.meta(), head_width=p, probe_groups=1, **why)
        info["batching"] = "loop" if info["chunk"] == 1 else "grads"
    return sink.finish(), lin.logits[:, classes].to(wx.dtype) - wx


def _head_jacobian(h: Tensor, out: Tensor, why: dict) -> Tensor:
    """A = d out / d h, (N, K, P): batched backwards through the head only (the graph kept)."""
    n, k, p = out.shape[0], out.shape[1], h.numel() // out.shape[0]
    rows = max(1, min(k, HEAD_ROWS_BYTES // max(1, n * p * h.element_size())))
    a = torch.empty(n, k, p, dtype=h.dtype, device=h.device)
    with torch.enable_grad():
        for r0, g in vjp_rows(h, out, Chunker(rows, rows, total=k), why, keep=True):
            a[:, r0:r0 + g.shape[1]] = g
    return a
