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

A chunk of m basis columns runs as one onnxruntime batch of m * N inputs: column
j is fed to every probe (input j * N + n uses probe n's priors). onnxruntime's
CPU convolution is float32, so g runs in float32; the differences G - b and the
block products are formed in float64 and W is stored in float32.
"""

from __future__ import annotations

import math
import sys
import time
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from ..basis import BASES, Basis, make_basis
from ..errors import InputError
from ..reconstruction import Reconstruction, tolerance_for
from ..solve import resolve_classes
from .linearize import LinearizedGraph, linearize
from .runtime import ort_version

__all__ = ["reconstruct", "solve_basis", "default_chunk", "WORK_MEMORY", "MAX_CHUNK", "SCALE"]

WORK_MEMORY = 256 * 2**20  # bytes of activations in flight per onnxruntime batch (estimated)
MAX_CHUNK = 512  # basis columns per batch at most: larger batches gain nothing on a CPU
SCALE = 4096.0  # basis columns are fed as s * q (see the module docstring)


def default_chunk(lin: LinearizedGraph) -> int:
    """Columns per batch so that m * N samples' activations fit in :data:`WORK_MEMORY`.

    The per-sample footprint is estimated from the probe run's tapped tensors (every
    gate's input: about one tensor per layer), doubled for the rest."""
    d = math.prod(lin.sample_shape)
    per_sample = 2 * lin.activation_bytes / lin.n_probes + 4 * (d + lin.n_outputs)
    return int(max(1, min(d, MAX_CHUNK, WORK_MEMORY // max(1, lin.n_probes * per_sample))))


def solve_basis(lin: LinearizedGraph, classes: np.ndarray, basis: Basis, chunk: int,
                progress: bool | None = None, scale: float = SCALE) -> tuple[np.ndarray, np.ndarray]:
    """(W (N, K, D) float32, b (N, K) float32) of the affine graph ``lin``:
    b = g(0), W[:, rows_k] = (g(s Q_k) - b) B_k^T / s."""
    n, d = lin.n_probes, math.prod(lin.sample_shape)
    b = lin(np.zeros((n, *lin.sample_shape), np.float32))[:, classes].astype(np.float64)
    w = np.zeros((n, len(classes), d), np.float32)
    like = torch.empty(0, dtype=torch.float64)
    total = sum(size for _, size in basis.blocks)
    show = progress if progress is not None else (sys.stderr.isatty() and total * n > 50_000)
    with tqdm(total=total, desc="basis columns (onnxruntime)", unit="col", disable=not show, leave=False) as bar:
        for k, (_, size) in enumerate(basis.blocks):
            bk = basis.block(k)
            bk_t = None if bk is None else torch.from_numpy(bk)
            rows = basis.rows(k)
            for start in range(0, size, chunk):
                stop = min(size, start + chunk)
                cols = basis.inputs(k, start, stop, bk_t, like).numpy() * scale  # (m, D)
                batch = np.repeat(cols.astype(np.float32), n, axis=0).reshape(-1, *lin.sample_shape)
                g = (lin(batch)[:, classes].reshape(stop - start, n, -1) - b) / scale  # (m, N, K)
                if bk is None:
                    w[:, :, rows[start:stop]] = g.transpose(1, 2, 0)
                else:
                    w[:, :, rows] += g.transpose(1, 2, 0) @ bk[:, start:stop].T
                bar.update(stop - start)
    return w, b.astype(np.float32)


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
) -> Reconstruction:
    """Reconstruct ``f(x) = W x + b`` of an ONNX classifier at each probe, in onnxruntime.

    Args:
        model: an .onnx path, serialized bytes or an ``onnx.ModelProto`` (never modified).
        x: the probe batch (N, ...), a tensor or array; run in float32.
        classes: output indices to reconstruct (default: all).
        basis: ``"identity"`` (the paper's one by one), ``"hadamard"``, ``"random"`` or a
            :class:`~reconviz.basis.Basis`.
        chunk_size: basis columns per onnxruntime batch (default: from a memory estimate).
        logits: ``"auto"``: a final Softmax/LogSoftmax is detected and the reconstruction
            is of its input, the logits (``meta["notes"]`` says so); ``"output"``: the
            first graph output as it is; or the name of a tensor in the graph.
        seed: seed of the random basis.
        progress: show a progress bar (default: on a terminal, for long solves).
        scale: the basis columns are fed as ``scale * q`` (exact for the affine g;
            counters float32 cancellation, see the module docstring).

    Returns:
        The same :class:`~reconviz.Reconstruction` as the PyTorch path, in float32,
        ``meta["backend"] == "onnxruntime"``, checked against the float32 tolerance.

    Raises:
        UnsupportedGraphError (an UnsupportedOperationError): every node that cannot
        be frozen, listed before any onnxruntime run. InputError: an unreadable or
        invalid model, or inputs that do not fit it.
    """
    if not isinstance(basis, Basis) and basis not in BASES:
        raise InputError(f"unknown basis {basis!r}: choose one of {', '.join(BASES)} or pass a Basis")
    if chunk_size is not None and (not isinstance(chunk_size, int) or isinstance(chunk_size, bool)
                                   or chunk_size < 1):
        raise InputError(f"chunk_size must be a positive integer, got {chunk_size!r}")
    if not (isinstance(scale, (int, float)) and math.isfinite(scale) and scale > 0):
        raise InputError(f"scale must be a positive finite number, got {scale!r}")
    start = time.perf_counter()
    lin = linearize(model, x, logits)
    probed = time.perf_counter()
    cls = resolve_classes(classes, lin.n_outputs, torch.device("cpu"))
    bas = make_basis(basis, math.prod(lin.sample_shape), seed)
    chunk = chunk_size or default_chunk(lin)
    w, b = solve_basis(lin, cls.numpy(), bas, chunk, progress, float(scale))
    solved = time.perf_counter()
    rec = Reconstruction(
        weight=torch.from_numpy(w).reshape(lin.n_probes, len(cls), *lin.sample_shape),
        bias=torch.from_numpy(b),
        classes=cls,
        logits=torch.from_numpy(np.ascontiguousarray(lin.logits[:, cls.numpy()])),
        probes=torch.from_numpy(lin.probes),
        meta=_meta(lin, bas, seed, chunk, float(scale)),
    )
    rec.check()
    end = time.perf_counter()
    rec.meta["seconds"] = end - start
    rec.meta["timings"] = {"probe": probed - start, "solve": solved - probed, "check": end - solved}
    return rec


def _meta(lin: LinearizedGraph, basis: Basis, seed: int, chunk: int, scale: float) -> dict[str, Any]:
    graph = lin.model.graph
    return {
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
        "exactness": "region-exact",
        "gates": lin.gates,
        "ties": lin.ties,
        "output": None,
        "chunk_size": chunk,
        "notes": list(lin.notes),
    }
