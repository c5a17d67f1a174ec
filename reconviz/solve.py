"""Stage 3 — solve: W and b of the affine network g(x) = W x + b.

* basis   (the paper's method)   b = g(0),  W = (g(Q) - b) Q^T  over an orthonormal
  basis Q, fed to g in chunks of columns (one forward pass per input element).
* adjoint (reverse mode)         W[c, :] = d g_c / d x: one forward pass with its
  graph kept, then one input-gradient backward pass per class; ``chunk`` > 1
  runs ``chunk`` classes in one batched backward (``is_grads_batched``).

Both are exact for an affine g; they agree to rounding.

Memory. Every solve works within a budget (:class:`MemoryPlan`): W itself (in
memory, or streamed to a memory-mapped ``.npy`` when it does not fit) plus the
working memory of the chunks in flight. Chunk sizes are derived from the probe
pass's measured activation footprint (``LinearizedModel.activation_bytes``),
never fixed; probes are split into groups when even one chunk of all probes
would not fit.

Speed. Within the memory cap the chunk size is *calibrated* on the real work:
chunks of 1, 2, 4, ... columns (or classes) are timed as they are computed, and
the doubling stops when the time per column stops improving (a float64 conv on
a CPU is often fastest one sample at a time; a GPU wants large batches). No
chunk is computed twice: calibration costs nothing but the odd chunk size.

``auto`` compares the two methods' predicted costs from the shapes and from
timings it takes anyway (the bias forward, the first chunks); where the
prediction is not clear-cut it times a first chunk of each (see
:func:`choose_method`).
"""

from __future__ import annotations

import dataclasses
import math
import os
import sys
import time
from dataclasses import dataclass
from typing import Any, Iterator

import torch
from torch import Tensor
from tqdm.auto import tqdm

from .basis import Basis
from .errors import InputError
from .linearize import LinearizedModel, Observer
from .probe import Probe
from .reconstruction import BLOCK_BYTES, MappedWeight

__all__ = [
    "solve_basis", "solve_adjoint", "choose_method", "basis_chunk", "adjoint_chunk", "basis_cap", "adjoint_cap",
    "plan_memory", "MemoryPlan", "WeightSink", "METHODS", "DEFAULT_WORK_MEMORY", "sweep", "assemble",
]

METHODS = ("auto", "basis", "adjoint")
DEFAULT_WORK_MEMORY = 768 * 2**20  # bytes of chunk working memory when max_memory is not given
DEFAULT_MAX_MEMORY = DEFAULT_WORK_MEMORY  # older name
MIN_WORK_MEMORY = 64 * 2**20  # a budget leaves at least this much for the chunks, or W streams
BACKWARD_COST = 1.3  # an input-gradient backward costs about this many forwards (prior for auto)
PASS_SAMPLES = 16.0  # fixed cost of a pass, in samples, for a model whose pass is all overhead
OVERHEAD_BOUND = 0.005  # a pass faster than this (seconds) is dominated by fixed costs: batch fully
TRIAL_CHUNKS = 3  # chunks timed per calibration size (the fastest counts) ...
TRIAL_SECONDS = 0.2  # ... or fewer, once they took this long


def sample_size(lin: LinearizedModel) -> int:
    return math.prod(lin.sample_shape)


def _itemsize(lin: LinearizedModel) -> int:
    return lin.probes.element_size()


def per_probe_bytes(lin: LinearizedModel) -> int:
    """Working bytes of one sample in flight: its measured activations plus the input."""
    return max(1, lin.activation_bytes // max(1, lin.n_probes)) + sample_size(lin) * _itemsize(lin)


# --------------------------------------------------------------------------
# Memory plan
# --------------------------------------------------------------------------


@dataclass
class MemoryPlan:
    """How a solve uses memory: W in memory or streamed, and the chunks' working budget."""

    weight_bytes: int  # size of W (N x K x D)
    work_bytes: int  # budget for the chunks in flight
    stream: bool  # W goes to a memory-mapped .npy file
    max_memory: int | None  # the budget asked for (None: default)
    path: str | None = None  # where a streamed W goes (None: a temporary file)

    def meta(self) -> dict[str, Any]:
        return {
            "max_memory": self.max_memory, "work_memory": self.work_bytes,
            "weight_bytes": self.weight_bytes, "streamed": self.stream,
        }


def available_memory(device: torch.device) -> int:
    """Bytes that can still be allocated on ``device`` (host: MemAvailable)."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free)
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:  # pragma: no cover - not Linux
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):  # pragma: no cover
        return 8 * 2**30


def default_work_memory(device: torch.device) -> int:
    if device.type == "cuda":  # a quarter of the free device memory, at most 8 GiB
        return int(min(8 * 2**30, max(MIN_WORK_MEMORY, available_memory(device) // 4)))
    return DEFAULT_WORK_MEMORY


def plan_memory(
    lin: LinearizedModel,
    n_classes: int,
    max_memory: int | None = None,
    out: str | os.PathLike | None = None,
) -> MemoryPlan:
    """Split the budget ``max_memory`` (bytes for W plus the chunks) between W and the chunks.

    * ``max_memory=None``: W in memory (streamed only when it would not fit in half
      of the available memory), chunks within :data:`DEFAULT_WORK_MEMORY`
      (on a GPU: a quarter of the free memory, at most 8 GiB).
    * ``max_memory=M``: W in memory if W plus :data:`MIN_WORK_MEMORY` fits in M,
      the rest for the chunks; otherwise W streams to disk and the chunks get M
      less one block of W in transit.
    * ``out=path``: W always streams to the ``.npy`` file ``path``.
    """
    if max_memory is not None and (not isinstance(max_memory, int) or isinstance(max_memory, bool)
                                   or max_memory <= 0):
        raise InputError(f"max_memory must be a positive number of bytes, got {max_memory!r}")
    device = lin.probes.device
    wbytes = lin.n_probes * n_classes * sample_size(lin) * _itemsize(lin)
    if max_memory is None:
        work = default_work_memory(device)
        # (a W below the chunk budget always fits: no need to read the free memory)
        stream = out is not None or (wbytes > MIN_WORK_MEMORY and wbytes > available_memory(device) // 2)
    else:
        stream = out is not None or wbytes + MIN_WORK_MEMORY > max_memory
        work = max_memory - (min(BLOCK_BYTES, wbytes) if stream else wbytes)
        work = max(work, max_memory // 2 if stream else MIN_WORK_MEMORY // 4)
    return MemoryPlan(wbytes, int(work), stream, max_memory, None if out is None else os.fspath(out))


def basis_cap(n_probes: int, per_probe: int, budget: int, columns: int) -> int:
    """Most basis columns per forward pass: m columns of n probes run m * n samples of
    ``per_probe`` working bytes each, within ``budget`` bytes."""
    return int(max(1, min(columns, budget // (n_probes * per_probe))))


def adjoint_cap(n_probes: int, per_probe: int, budget: int, n_classes: int) -> int:
    """Most classes per batched backward: the kept graph (n samples' activations) plus
    one gradient of that size per class in flight, within ``budget`` bytes."""
    graph = n_probes * per_probe
    return int(max(1, min(n_classes, (budget - graph) // graph)))


def _budget(lin: LinearizedModel, max_memory: int | None) -> int:
    return default_work_memory(lin.probes.device) if max_memory is None else max_memory


def basis_chunk(lin: LinearizedModel, max_memory: int | None = None) -> int:
    """:func:`basis_cap` for all N probes of ``lin`` within ``max_memory`` bytes of
    working memory (default :data:`DEFAULT_WORK_MEMORY`); the probe pass measured the
    bytes of all intermediate tensors."""
    return basis_cap(lin.n_probes, per_probe_bytes(lin), _budget(lin, max_memory), sample_size(lin))


def adjoint_chunk(lin: LinearizedModel, n_classes: int, max_memory: int | None = None) -> int:
    """:func:`adjoint_cap` for all N probes of ``lin`` within ``max_memory`` working bytes."""
    return adjoint_cap(lin.n_probes, per_probe_bytes(lin), _budget(lin, max_memory), n_classes)


# --------------------------------------------------------------------------
# Where W goes
# --------------------------------------------------------------------------


class WeightSink:
    """W (N, K, D) being assembled: a tensor on the solve's device, or a memory-mapped
    ``.npy`` (``plan.stream``) whose written pages are handed back every block."""

    def __init__(self, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device,
                 plan: MemoryPlan | None = None):
        """``shape``: (N, K, D) or (N, K, *sample_shape) (a streamed ``.npy`` keeps that shape)."""
        self.mapped: MappedWeight | None = None
        flat = (shape[0], shape[1], math.prod(shape[2:]))
        if plan is not None and plan.stream:
            self.mapped = MappedWeight.create(tuple(shape), dtype, path=plan.path)
            self.w = self.mapped.tensor.view(flat)
        else:
            self.w = torch.empty(flat, dtype=dtype, device=device)
        self._touched = 0

    def _moved(self, value: Tensor) -> Tensor:
        """``value`` on W's device, in W's dtype (a no-op where they match)."""
        return value.to(device=self.w.device, dtype=self.w.dtype)

    def put_rows(self, probes: slice, c0: int, c1: int, value: Tensor) -> None:
        """W[probes, c0:c1, :] = value (n, c1 - c0, D)."""
        self.w[probes, c0:c1] = self._moved(value)
        self._touch(value.numel() * value.element_size())

    def put_cols(self, probes: slice, cols: slice | Tensor, value: Tensor) -> None:
        """W[probes, :, cols] = value (n, K, m)."""
        if isinstance(cols, Tensor):
            cols = cols.to(self.w.device)
        self.w[probes, :, cols] = self._moved(value)
        # every row of W gets a few bytes: count at least a page per row
        self._touch(value.shape[0] * value.shape[1] * max(4096, value.shape[2] * value.element_size()))

    def _touch(self, nbytes: int) -> None:
        if self.mapped is None:
            return
        self._touched += nbytes
        if self._touched >= BLOCK_BYTES:
            self.mapped.release()
            self._touched = 0

    def finish(self) -> Tensor:
        if self.mapped is not None:
            self.mapped.flush()
            self.mapped.release()
        return self.w


# --------------------------------------------------------------------------
# Chunk sizes: fixed, or calibrated on the real work
# --------------------------------------------------------------------------


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Chunker:
    """Hands out chunk sizes. Fixed, or calibrating: 1, 2, 4, ... up to ``cap`` while the
    time per unit improves by more than ``gain``; then the best size seen.

    Each size is judged on the fastest of its first :data:`TRIAL_CHUNKS` chunks (or of
    as many as take :data:`TRIAL_SECONDS`): noise from other processes only ever adds
    time, so the minimum is the robust estimate, and a single slow chunk cannot send
    the calibration to a size that is really worse.
    """

    def __init__(self, fixed: int | None, cap: int, start: int = 1, gain: float = 0.05, total: int | None = None):
        self.cap = max(1, int(cap))
        if fixed is not None and total is not None:  # a chunk larger than the work is the whole work
            fixed = max(1, min(fixed, total))
        self.fixed = fixed
        self.size = fixed if fixed is not None else min(max(1, start), self.cap)
        self.settled = fixed is not None
        self.gain = gain
        self.trials: list[tuple[int, float]] = []  # (size, seconds per unit) of every timed chunk
        self._best: tuple[int, float] | None = None
        self._trial: list[float] = []  # seconds per unit of the current size's chunks

    def next(self, remaining: int) -> int:
        return max(1, min(self.size, remaining))

    def record(self, m: int, seconds: float) -> None:
        if self.settled:
            return
        self.trials.append((m, seconds / max(1, m)))
        if m < self.size:  # the work ran out before the planned size: nothing to learn
            return
        self._trial.append(seconds / m)
        if self.size < self.cap and len(self._trial) < TRIAL_CHUNKS and sum(self._trial) * m < TRIAL_SECONDS:
            return
        self._judge(m, min(self._trial))
        self._trial = []

    def _judge(self, m: int, per: float) -> None:
        if self._best is None or per < self._best[1] * (1 - self.gain):
            self._best = (m, per)
            if m >= self.cap:
                self.settled = True
            else:
                self.size = min(2 * m, self.cap)
        else:
            self.size = self._best[0]
            self.settled = True

    @property
    def per_unit(self) -> float | None:
        """Best measured seconds per unit (column or class), None before any trial."""
        if self._best is not None:
            return self._best[1]
        return min((p for _, p in self.trials), default=None)

    def meta(self) -> dict[str, Any]:
        return {"chunk": self.size, "calibration": [[m, p] for m, p in self.trials]}


class _NoBar:
    """What a disabled progress bar needs to be (a tqdm costs ~50 us to build, even disabled)."""

    def __enter__(self) -> "_NoBar":
        return self

    def __exit__(self, *exc: Any) -> None:
        return None

    def update(self, n: int = 1) -> None:
        return None


def _progress(total: int, desc: str, progress: bool | None, unit: str = "col"):
    enabled = (sys.stderr.isatty() and total >= 256) if progress is None else progress
    return tqdm(total=total, desc=desc, unit=unit, leave=False) if enabled else _NoBar()


# --------------------------------------------------------------------------
# Probe groups: when one chunk of all N probes does not fit
# --------------------------------------------------------------------------


def sub_linearized(lin: LinearizedModel, probes: slice) -> LinearizedModel:
    """The linearized model restricted to probes ``probes`` (priors sliced, model shared)."""
    if probes == slice(None) or (probes.start in (None, 0) and probes.stop >= lin.n_probes):
        return lin
    n = lin.n_probes
    priors = [
        dataclasses.replace(p, shape=(len(range(n)[probes]),) + p.shape[1:],
                            tensors={k: v[probes] for k, v in p.tensors.items()})
        if p.batched else p
        for p in lin.priors
    ]
    m = len(range(n)[probes])
    found = Probe(lin.work, lin.probes[probes], priors, lin.logits[probes], lin.output,
                  lin.activation_bytes * m // n)
    return LinearizedModel(found)


def probe_groups(lin: LinearizedModel, per_probe: int, budget: int) -> list[slice]:
    """Consecutive probe ranges with ``size * per_probe <= budget`` (at least one probe each)."""
    n = lin.n_probes
    if n * per_probe <= budget or not all(p.batched for p in lin.priors):
        return [slice(0, n)]
    size = max(1, budget // max(1, per_probe))
    return [slice(i, min(n, i + size)) for i in range(0, n, size)]


def adjoint_groups(lin: LinearizedModel, budget: int) -> list[slice]:
    """The adjoint solve's probe groups: a group's kept graph plus one gradient in flight."""
    return probe_groups(lin, 2 * per_probe_bytes(lin), budget)


# --------------------------------------------------------------------------
# Basis solve
# --------------------------------------------------------------------------


def bias(lin: LinearizedModel, classes: Tensor, observer: Observer | None = None) -> Tensor:
    """b = g(0) for every probe, (N, K)."""
    with torch.no_grad():
        zero = torch.zeros_like(lin.probes)
        return lin(zero, observer=observer)[:, classes]


def timed_bias(lin: LinearizedModel, classes: Tensor) -> tuple[Tensor, float]:
    """b = g(0) and the seconds its forward pass of N samples took."""
    _sync(lin.probes.device)
    t0 = time.perf_counter()
    b = bias(lin, classes)
    _sync(lin.probes.device)
    return b, time.perf_counter() - t0


def _adjoint_chunk_rule(chunk: int | None, device: torch.device, pass_seconds: float) -> int | None:
    """On a CPU, a pass that is not all overhead runs its backward one class at a time.

    A batched backward (``is_grads_batched``: vmap over the backward graph) buys
    nothing on a CPU once a pass is compute-bound: the work per class is the same
    (18.6 ms one at a time, 19.1-23.4 ms per class in batches of 2-32 on the
    benchmark's 64x64 VGG, docs/performance.md), while every class in flight holds
    a full set of activation gradients. Calibrating would only add trials and
    memory. Elsewhere (a GPU, a pass that is all overhead) the size is calibrated.
    """
    if chunk is None and device.type == "cpu" and pass_seconds >= OVERHEAD_BOUND:
        return 1
    return chunk


def _start(chunk: int | None, cap: int, pass_seconds: float) -> int:
    """First chunk size: calibrate from 1, or the cap at once when a pass is all overhead."""
    return cap if chunk is None and pass_seconds < OVERHEAD_BOUND else 1


def _block_tensor(basis: Basis, k: int, lin: LinearizedModel) -> Tensor | None:
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
    lin: LinearizedModel,
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
    lin: LinearizedModel,
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
        b, pass_seconds = timed_bias(lin, classes)
    per_probe = per_probe_bytes(lin)
    groups = probe_groups(lin, per_probe, plan.work_bytes)
    calib: list[dict] = []
    for probes in groups:
        sub = sub_linearized(lin, probes)
        bg = b[probes]
        cap = basis_cap(sub.n_probes, per_probe, plan.work_bytes, basis.size)
        chunker = Chunker(chunk, cap if chunk is None else chunk, _start(chunk, cap, pass_seconds or 1.0),
                          total=basis.size)
        for cols, value in assemble(_sweep(sub, basis, classes, chunker, progress, observer), bg, basis):
            sink.put_cols(probes, cols, value)
        calib.append(chunker.meta())
    if info is not None:
        info.update(calib[0] if len(calib) == 1 else {"chunk": calib[-1]["chunk"], "groups": calib})
        info["probe_groups"] = len(groups)
    return sink.finish(), b


# --------------------------------------------------------------------------
# Adjoint solve
# --------------------------------------------------------------------------


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


def solve_adjoint(
    lin: LinearizedModel,
    classes: Tensor,
    chunk: int | None = 1,
    progress: bool | None = None,
    *,
    plan: MemoryPlan | None = None,
    sink: WeightSink | None = None,
    batching: str = "grads",
    info: dict | None = None,
    b: Tensor | None = None,
    pass_seconds: float | None = None,
) -> tuple[Tensor, Tensor]:
    """W by reverse mode through the frozen network g.

    One forward pass keeps its graph; then ``chunk`` classes per backward pass:
    chunk = 1 is one backward per class on the retained graph; chunk = m > 1 seeds
    m one-hot classes in one batched backward (``batching="grads"``:
    ``torch.autograd.grad(..., is_grads_batched=True)``; ``"replicate"``: a forward
    of m copies of the probes, each copy seeded with one class). ``chunk=None``
    calibrates the size within the memory cap of ``plan`` (on a CPU, a pass that is
    not all overhead keeps one class per backward: :func:`_adjoint_chunk_rule`). Where a batched
    backward is not supported by an op, it falls back to one class at a time.
    """
    if batching not in ("grads", "replicate"):
        raise InputError(f"batching must be 'grads' or 'replicate', got {batching!r}")
    plan = plan or plan_memory(lin, len(classes))
    n, shape, k = lin.n_probes, lin.sample_shape, len(classes)
    device = lin.probes.device
    sink = sink or WeightSink((n, k, sample_size(lin)), lin.dtype, device, plan)
    if b is None:
        b, pass_seconds = timed_bias(lin, classes)
    chunk = _adjoint_chunk_rule(chunk, device, pass_seconds or 1.0)
    per_probe = per_probe_bytes(lin)
    groups = adjoint_groups(lin, plan.work_bytes)
    if len(groups) > 1 or batching == "replicate":
        lin.take_graph()  # the groups (or the replicas) build their own graphs: free the probe's
    calib: list[dict] = []
    fell_back: str | None = None
    with torch.enable_grad(), _progress(k * len(groups), "adjoint solve", progress, unit="class") as bar:
        for probes in groups:
            sub = sub_linearized(lin, probes)
            m_probes = sub.n_probes
            cap = adjoint_cap(m_probes, per_probe, plan.work_bytes, k)
            chunker = Chunker(chunk, cap if chunk is None else chunk, _start(chunk, cap, pass_seconds or 1.0),
                              total=k)
            x = out = None
            if batching == "grads" or chunker.size == 1:
                x, out = _kept_graph(sub, classes)
            c0 = 0
            while c0 < k:
                m = chunker.next(k - c0)
                timed = not chunker.settled
                if timed:
                    _sync(device)
                    t0 = time.perf_counter()
                last = c0 + m >= k
                if m == 1 or fell_back:
                    m = 1
                    if out is None:
                        x, out = _kept_graph(sub, classes)
                    (g,) = torch.autograd.grad(out[:, c0].sum(), x, retain_graph=not last)
                    g = g.reshape(m_probes, 1, -1)
                elif batching == "grads":
                    try:
                        (g,) = torch.autograd.grad(out, x, grad_outputs=_one_hot_seeds(m, out, c0),
                                                   is_grads_batched=True, retain_graph=not last)
                    except RuntimeError as e:  # an op without a batching rule
                        fell_back = f"batched backward unsupported ({str(e).splitlines()[0][:160]})"
                        chunker = Chunker(1, 1)
                        x = out = None  # rebuild the graph: the failed pass may have freed it
                        continue
                    g = g.reshape(m, m_probes, -1).transpose(0, 1)
                else:  # replicate: m copies of the probes, copy j seeded with class c0 + j
                    xr = sub.probes.detach().unsqueeze(0).expand(m, *sub.probes.shape)
                    xr = xr.reshape(m * m_probes, *shape).clone().requires_grad_(True)
                    outr = sub(xr)[:, classes].reshape(m, m_probes, -1)
                    (g,) = torch.autograd.grad(outr, xr, grad_outputs=_one_hot_seeds(m, outr[0], c0))
                    g = g.reshape(m, m_probes, -1).transpose(0, 1)
                if timed:
                    _sync(device)
                    chunker.record(m, time.perf_counter() - t0)
                sink.put_rows(probes, c0, c0 + m, g)
                c0 += m
                bar.update(m)
            del x, out
            calib.append(chunker.meta())
    if info is not None:
        info.update(calib[0] if len(calib) == 1 else {"chunk": calib[-1]["chunk"], "groups": calib})
        info["probe_groups"] = len(groups)
        info["batching"] = "loop" if (fell_back or info["chunk"] == 1) else batching
        if fell_back:
            info["fallback"] = fell_back
    return sink.finish(), b


# --------------------------------------------------------------------------
# auto
# --------------------------------------------------------------------------


def choose_method(lin: LinearizedModel, n_classes: int, *, seconds_per_pass: float | None = None,
                  work: int | None = None, why: dict | None = None) -> str:
    """``adjoint`` when K backward passes cost less than D forward passes.

    Shapes: the basis solve runs D * N samples forward; the adjoint K backward
    passes of N samples (a backward costs about :data:`BACKWARD_COST` forwards),
    plus N samples forward when the probe pass's graph was not kept.
    ``seconds_per_pass`` (the measured time of one forward pass of the N probes,
    e.g. the bias pass) adds the number of passes: a pass that takes under
    :data:`OVERHEAD_BOUND` is mostly fixed cost, so each method is charged its pass
    count (basis: D over its chunk cap; adjoint: K over its chunk cap, plus the
    bias pass and any forward pass) on top of its samples.

    Timing both methods on a first chunk was tried and dropped: where the rule
    is not clear-cut the passes are cheap, and two timed trials cost as much as
    the whole solve (the 8x8 digits net: 5.4-6 ms a solve, 13.5 ms with trials).
    """
    d = sample_size(lin)
    kept = lin.has_graph and len(adjoint_groups(lin, _budget(lin, work))) == 1
    forward = 0.0 if kept else 1.0
    basis = float(d)
    adjoint = forward + BACKWARD_COST * n_classes
    charged = seconds_per_pass is not None and seconds_per_pass < OVERHEAD_BOUND
    if charged:
        basis_passes = math.ceil(d / basis_chunk(lin, work))
        adjoint_passes = 1 + forward + math.ceil(n_classes / adjoint_chunk(lin, n_classes, work))
        basis, adjoint = basis + basis_passes * PASS_SAMPLES, adjoint + adjoint_passes * PASS_SAMPLES
    chosen = "adjoint" if adjoint <= basis else "basis"
    if why is not None:
        why.update(rule="shapes+passes" if charged else "shapes", basis_cost=basis,
                   adjoint_cost=adjoint, pass_seconds=seconds_per_pass, chosen=chosen)
    return chosen


# --------------------------------------------------------------------------
# classes
# --------------------------------------------------------------------------


def resolve_classes(classes, n_outputs: int, device: torch.device) -> Tensor:
    """The class indices to reconstruct as a LongTensor (default: all outputs).

    ``classes``: an int, a list/tuple/range of ints, or a 0-/1-D integer tensor or
    array. Anything else (floats, bools, strings, sets, nested lists) is an InputError:
    a non-integer value is never rounded to an index."""
    if classes is None:
        return torch.arange(n_outputs, device=device)
    idx = _class_list(classes)
    if not idx:
        raise InputError("classes is empty: give at least one class index, or None for all")
    bad = [c for c in idx if not 0 <= c < n_outputs]
    if bad:
        raise InputError(f"classes must be indices in [0, {n_outputs}) (the model has {n_outputs} outputs); "
                         f"got {bad[:8]}")
    if len(set(idx)) != len(idx):
        raise InputError(f"classes contains duplicates: {sorted({c for c in idx if idx.count(c) > 1})[:8]}; "
                         "give each class once")
    return torch.tensor(idx, dtype=torch.long, device=device)


def _class_list(classes: Any) -> list[int]:
    """``classes`` as Python ints (see :func:`resolve_classes`); InputError for other types."""
    import numpy as np

    if isinstance(classes, Tensor):
        classes = classes.detach().cpu().numpy()
    if isinstance(classes, np.ndarray) and classes.ndim >= 1:
        if classes.ndim != 1 or classes.dtype.kind not in "iu":
            raise InputError(f"classes must be a 1-D integer tensor or array, got a {classes.ndim}-D {classes.dtype} "
                             "one: pass integer indices such as [0, 3] (values are never rounded)")
        return [int(c) for c in classes]
    items = list(classes) if isinstance(classes, (list, tuple, range)) else [classes]
    values = [c.item() if isinstance(c, (Tensor, np.ndarray, np.generic)) and np.ndim(c) == 0 else c for c in items]
    for v in values:
        if not isinstance(v, int) or isinstance(v, bool):
            raise InputError(f"classes must be integer indices, got {v!r:.60} ({type(v).__name__}): pass an "
                             "int, a list of ints such as [0, 3], or a 1-D integer tensor (values are never rounded)")
    return values
