"""ONNX stage 3 — solve by the orthogonal-basis method in onnxruntime batches.

With g the linearized graph (affine), b = g(0) and, for an orthonormal basis
Q = P blockdiag(B_k) (:mod:`reconviz.basis`) and a scale s > 0, block by block

    W[:, P(rows_k)] = (G_k - b) B_k^T / s,     G_k = g(s * columns of block k).

g is affine everywhere (its gates are frozen), so every s gives the same W in
exact arithmetic. In float32 it does not: g(q) - b cancels when |W q| << |b|,
and the error of W is about eps32 * |b| / (s |W q|). The default s = 2^12 (a
power of two: the division is exact) removes that cancellation: on the test
architectures the error of W relative to max |W| drops from up to 9e-4 (s = 1,
Hadamard basis) to below 1e-6 (docs/onnx.md).

The columns are fed by the PyTorch path's sweep (:func:`reconviz.solve.sweep`)
through :class:`TorchView`, which shows g to it as h(x) = g(s x) / s: the same W,
bias b / s. A chunk of m basis columns runs as one onnxruntime batch of m * N
inputs (input j * N + n uses probe n's priors). onnxruntime's CPU convolution is
float32, so g runs in float32; G_k - b and the one product per block are formed
in float64, and W is stored in float32: in memory, or streamed to a memory-mapped
``.npy`` (:func:`reconviz.solve.plan_memory`, ``max_memory=`` / ``out=``).
"""

from __future__ import annotations

import contextlib
import math
import os
import time
from typing import Any

import numpy as np
import torch
from torch import Tensor

from ..basis import Basis, make_basis
from ..errors import InputError
from ..pipeline import check_options, checked
from ..reconstruction import Reconstruction, frozen_summary, tolerance_for
from ..solve import MemoryPlan, WeightSink, assemble, plan_memory, resolve_classes, sweep
from .checks import self_check
from .linearize import LinearizedGraph, linearize
from .runtime import ort_version

__all__ = ["reconstruct", "solve_basis", "default_chunk", "memory_plan", "TorchView", "one_thread", "WORK_MEMORY",
           "MAX_CHUNK", "SCALE"]

WORK_MEMORY = 256 * 2**20  # bytes of activations in flight per onnxruntime batch (estimated)
MAX_CHUNK = 512  # basis columns per batch at most: larger batches gain nothing on a CPU
SCALE = 4096.0  # basis columns are fed as s * q (see the module docstring)


def default_chunk(lin: LinearizedGraph, budget: int = WORK_MEMORY) -> int:
    """Columns per batch so that m * N samples' activations fit in ``budget`` bytes.

    The per-sample footprint is estimated from the probe run's tapped tensors (every
    gate's input: about one tensor per layer), doubled for the rest."""
    d = math.prod(lin.sample_shape)
    per_sample = 2 * lin.activation_bytes / lin.n_probes + 4 * (d + lin.n_outputs)
    return int(max(1, min(d, MAX_CHUNK, budget // max(1, lin.n_probes * per_sample))))


class TorchView:
    """The linearized graph as the PyTorch path's solver sees a LinearizedModel:
    h(x) = g(s x) / s on ``dtype`` tensors (g runs in float32 in onnxruntime).

    h has g's W and the bias b / s; with s a power of two both are exact."""

    def __init__(self, lin: LinearizedGraph, dtype: torch.dtype = torch.float64, scale: float = 1.0):
        self.lin, self.dtype, self.scale = lin, dtype, scale
        self.n_probes, self.sample_shape = lin.n_probes, lin.sample_shape
        self.probes = torch.from_numpy(lin.probes).to(dtype)  # device and dtype of the sweep

    def __call__(self, batch: Tensor, observer: Any = None) -> Tensor:
        out = self.lin((batch * self.scale).numpy())  # (B, K_all) float32
        return torch.from_numpy(out).to(self.dtype) / self.scale


def solve_basis(lin: LinearizedGraph, classes: Tensor, basis: Basis, chunk: int, progress: bool | None = None,
                scale: float = SCALE, sink: WeightSink | None = None) -> tuple[Tensor, Tensor]:
    """(W (N, K, D) float32, b (N, K) float32) of the affine graph ``lin``:
    b = g(0), W[:, P(rows_k)] = (g(s Q_k) - b) B_k^T / s, one product per block k.

    W goes to ``sink`` (default: in memory). PyTorch's small steps between the
    onnxruntime batches run on one thread (:func:`one_thread`)."""
    with one_thread():
        return _solve(lin, classes, basis, chunk, progress, scale, sink)


@contextlib.contextmanager
def one_thread():
    """torch on one thread meanwhile: its idle OpenMP workers spin-wait after each parallel
    step and take the cores onnxruntime's batches need (the digits CNN at 8 columns a batch:
    about 4x slower with 2 threads on 2 cores)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _solve(lin: LinearizedGraph, classes: Tensor, basis: Basis, chunk: int, progress: bool | None,
           scale: float, sink: WeightSink | None) -> tuple[Tensor, Tensor]:
    view = TorchView(lin, torch.float64, scale)
    b = view(torch.zeros_like(view.probes))[:, classes]  # b / s
    sink = sink or WeightSink((lin.n_probes, len(classes), basis.size), torch.float32, torch.device("cpu"))
    for cols, value in assemble(sweep(view, basis, classes, chunk, progress), b, basis):
        sink.put_cols(slice(None), cols, value)  # (G - b) / s, stored in float32
    return sink.finish(), (b * scale).float()


def memory_plan(lin: LinearizedGraph, n_classes: int, max_memory: int | None = None,
                out: str | os.PathLike | None = None) -> MemoryPlan:
    """The PyTorch path's memory plan (:func:`reconviz.solve.plan_memory`) for a float32 W."""
    return plan_memory(TorchView(lin, torch.float32), n_classes, max_memory, out)


def reconstruct(
    model: Any,
    x: Any,
    classes: Any = None,
    basis: str | Basis = "identity",
    chunk_size: int | None = None,
    logits: str = "auto",
    *,
    seed: int = 0,
    progress: bool | None = None,
    scale: float = SCALE,
    max_memory: int | None = None,
    out: str | os.PathLike | None = None,
) -> Reconstruction:
    """Reconstruct ``f(x) = W x + b`` of an ONNX classifier at each probe, in onnxruntime.

    Args:
        model: an .onnx path, serialized bytes or an ``onnx.ModelProto`` (never modified).
        x: the probe batch (N, ...), a tensor or array; run in float32.
        classes: output indices to reconstruct (default: all).
        basis: ``"identity"`` (the paper's one by one), ``"hadamard"``, ``"random"`` or a
            :class:`~reconviz.basis.Basis`.
        chunk_size: basis columns per onnxruntime batch (default: from a memory estimate,
            within what ``max_memory`` leaves when it is given).
        logits: ``"auto"``: a final Softmax/LogSoftmax is detected and the reconstruction
            is of its input, the logits (``meta["notes"]`` says so); ``"output"``: the
            first graph output as it is; or the name of a tensor in the graph.
        seed: seed of the random basis.
        progress: show a progress bar (default: on a terminal, for long solves).
        scale: the basis columns are fed as ``scale * q`` (exact for the affine g;
            counters float32 cancellation, see the module docstring).
        max_memory: memory budget in bytes for W plus the batches in flight, as for
            :func:`reconviz.reconstruct`: W stays in memory when it fits with room for
            the batches, otherwise it streams to a memory-mapped ``.npy``
            (``rec.streamed``). Default: W in memory, batches within :data:`WORK_MEMORY`.
        out: path of a ``.npy`` file to stream W into (implies streaming).

    Returns:
        The same :class:`~reconviz.Reconstruction` as the PyTorch path, in float32,
        ``meta["backend"] == "onnxruntime"``, checked against the float32 tolerance at
        the probes and by the self-checks (:mod:`reconviz.onnx.checks`) away from them:
        ``meta["self_checks"]``. ``meta["exactness"]`` is region-exact when every frozen
        gate is piecewise linear (the torch gate's ``region_exact``).

    Raises:
        UnsupportedGraphError (an UnsupportedOperationError): every node that cannot
        be frozen, listed before any onnxruntime run. InputError: an unreadable or
        invalid model, or inputs that do not fit it. ExactnessError: the probe check or
        a self-check (named) failed.
    """
    check_options(basis, chunk_size)
    if not (isinstance(scale, (int, float)) and math.isfinite(scale) and scale > 0):
        raise InputError(f"scale must be a positive finite number, got {scale!r}")
    start = time.perf_counter()
    lin = linearize(model, x, logits)
    probed = time.perf_counter()
    cls = resolve_classes(classes, lin.n_outputs, torch.device("cpu"))
    bas = make_basis(basis, math.prod(lin.sample_shape), seed)
    memory = memory_plan(lin, len(cls), max_memory, out)
    chunk = chunk_size or default_chunk(lin, WORK_MEMORY if max_memory is None else memory.work_bytes)
    sink = WeightSink((lin.n_probes, len(cls), *lin.sample_shape), torch.float32, torch.device("cpu"), memory)
    w, b = solve_basis(lin, cls, bas, chunk, progress, float(scale), sink)
    solved = time.perf_counter()
    rec = Reconstruction(
        weight=w.reshape(lin.n_probes, len(cls), *lin.sample_shape),
        bias=b,
        classes=cls,
        logits=torch.from_numpy(np.ascontiguousarray(lin.logits[:, cls.numpy()])),
        probes=torch.from_numpy(lin.probes),
        meta=_meta(lin, bas, seed, chunk, float(scale), memory),
        mapped=sink.mapped,
    )
    return self_check(checked(rec, start, probed, solved), lin, seed)


def _meta(lin: LinearizedGraph, basis: Basis, seed: int, chunk: int, scale: float,
          memory: MemoryPlan) -> dict[str, Any]:
    graph = lin.model.graph
    meta = {
        "model": graph.name or "onnx graph",
        "source": lin.source,
        "backend": "onnxruntime",
        "onnxruntime": ort_version(),
        "input_name": lin.input_name,
        "logits_tensor": lin.output_name,
        "sample_shape": list(lin.sample_shape),
        "method": "basis",
        "basis": basis.name,
        "seed": seed if basis.name == "random" else None,
        "basis_scale": scale,
        "dtype": "float32",
        "tolerance": tolerance_for(torch.float32),
        "exactness": lin.exactness,
        "gates": lin.gates,  # untyped counts per ONNX op type; rec.frozen is the typed view
        "frozen": [f.to_dict() for f in frozen_summary(lin.priors)],
        "ties": lin.ties,
        "output": None,
        "chunk_size": chunk,
        "memory": memory.meta(),
        "notes": list(lin.notes),
    }
    if memory.path is not None:
        meta["weight_file"] = memory.path
    return meta
