"""The orthogonal-basis solve (the paper's method): b = g(0), W = (g(Q) - b) Q^T over an
orthonormal basis Q, fed to g in chunks of columns (one forward pass per input element)."""

from __future__ import annotations

import time
from typing import Iterator

import torch
from torch import Tensor

from ..basis import Basis
from ..linearize import LinearizedModel, Observer
from .chunking import Chunker, _progress, _sync, start_size, timed_pass
from .protocol import AffineFunction
from .memory import MemoryPlan, WeightSink, basis_cap, per_probe_bytes, plan_memory, probe_groups, sub_linearized


def bias(lin: LinearizedModel, classes: Tensor, observer: Observer | None = None) -> Tensor:
    """b = g(0) for every probe, (N, K)."""
    with torch.no_grad():
        return lin(torch.zeros_like(lin.probes), observer=observer)[:, classes]


def timed_bias(lin: LinearizedModel, classes: Tensor) -> tuple[Tensor, float]:
    """b = g(0) and the seconds its forward pass of N samples took."""
    return timed_pass(lin, torch.zeros_like(lin.probes), classes)


def _block_tensor(basis: Basis, k: int, lin: AffineFunction) -> Tensor | None:
    bk_np = basis.block(k)
    return None if bk_np is None else torch.as_tensor(bk_np, dtype=lin.dtype, device=lin.probes.device)


def _columns(basis: Basis, k: int, start: int, stop: int) -> slice | Tensor:
    """W columns that columns start..stop of block k land on (a slice where contiguous)."""
    off, _ = basis.blocks[k]
    if basis.perm is None:
        return slice(off + start, off + stop)
    return torch.as_tensor(basis.rows(k)[start:stop])


def assemble(chunks: Iterator[tuple[int, int, int, Tensor | None, Tensor]], b: Tensor,
             basis: Basis) -> Iterator[tuple[slice | Tensor, Tensor]]:
    """W's columns from a sweep's chunks (:func:`sweep`): yields (W columns, values (N, K, m)).

    Identity blocks: G - b lands directly. Other blocks: G_k - b is collected, then
    multiplied once, W[:, P(rows_k)] = (G_k - b) B_k^T."""
    block: Tensor | None = None
    for k, start, stop, bk, out in chunks:
        centred = out - b.unsqueeze(-1)
        if bk is None:
            yield _columns(basis, k, start, stop), centred
            continue
        if start == 0:
            block = out.new_empty(*out.shape[:2], bk.shape[0])
        block[:, :, start:stop] = centred
        if stop == bk.shape[0]:
            yield _columns(basis, k, 0, stop), block @ bk.T


def _sweep(
    lin: AffineFunction,
    basis: Basis,
    classes: Tensor,
    chunker: Chunker,
    progress: bool | None = None,
    observer: Observer | None = None,
    bar_total: int | None = None,
) -> Iterator[tuple[int, int, int, Tensor | None, Tensor]]:
    n, shape, device = lin.n_probes, lin.sample_shape, lin.probes.device
    timed = not chunker.settled
    with torch.no_grad(), _progress(bar_total or basis.size, f"basis solve ({basis.name})", progress) as bar:
        for k, (_, size) in enumerate(basis.blocks):
            bk = _block_tensor(basis, k, lin)
            start = 0
            while start < size:
                stop = start + chunker.next(size - start)
                if timed and not chunker.settled:
                    _sync(device)
                    t0 = time.perf_counter()
                q = basis.inputs(k, start, stop, bk, lin.probes)
                batch = q.reshape(stop - start, 1, *shape).expand(-1, n, *shape).reshape(-1, *shape)
                out = lin(batch, observer=observer)[:, classes]
                out = out.reshape(stop - start, n, -1).permute(1, 2, 0)
                if timed and not chunker.settled:
                    _sync(device)
                    chunker.record(stop - start, time.perf_counter() - t0)
                yield k, start, stop, bk, out
                bar.update(stop - start)
                start = stop


def sweep(
    lin: AffineFunction,
    basis: Basis,
    classes: Tensor,
    chunk: int,
    progress: bool | None = None,
    observer: Observer | None = None,
) -> Iterator[tuple[int, int, int, Tensor | None, Tensor]]:
    """Feed every basis column through g: yields (block, start, stop, B_k, outputs (N, K, m))."""
    yield from _sweep(lin, basis, classes, Chunker(chunk, chunk), progress, observer)


def solve_basis(
    lin: LinearizedModel,
    classes: Tensor,
    basis: Basis,
    chunk: int | None = None,
    progress: bool | None = None,
    observer: Observer | None = None,
    *,
    plan: MemoryPlan | None = None,
    sink: WeightSink | None = None,
    info: dict | None = None,
    b: Tensor | None = None,
    pass_seconds: float | None = None,
) -> tuple[Tensor, Tensor]:
    """W (N, K, D) and b (N, K) by the orthogonal-basis method.

    ``chunk``: columns per forward pass (default: calibrated within the memory cap
    of ``plan``). W goes to ``sink`` (default: in memory, or streamed per ``plan``).
    ``info`` (a dict) receives the chunk sizes used and their timings.
    """
    plan = plan or plan_memory(lin, len(classes))
    n, k_cls = lin.n_probes, len(classes)
    sink = sink or WeightSink((n, k_cls, basis.size), lin.dtype, lin.probes.device, plan)
    if b is None:
        b, seconds = timed_bias(lin, classes)
        pass_seconds = seconds if pass_seconds is None else pass_seconds
    per_probe = per_probe_bytes(lin)
    groups = probe_groups(lin, per_probe, plan.work_bytes)
    calib: list[dict] = []
    for probes in groups:
        sub = sub_linearized(lin, probes)
        bg = b[probes]
        cap = basis_cap(sub.n_probes, per_probe, plan.work_bytes, basis.size)
        chunker = Chunker(chunk, cap if chunk is None else chunk, start_size(chunk, cap, pass_seconds),
                          total=basis.size)
        for cols, value in assemble(_sweep(sub, basis, classes, chunker, progress, observer), bg, basis):
            sink.put_cols(probes, cols, value)
        calib.append(chunker.meta())
    if info is not None:
        info.update(calib[0] if len(calib) == 1 else {"chunk": calib[-1]["chunk"], "groups": calib})
        info["probe_groups"] = len(groups)
    return sink.finish(), b


