"""Stage 3 — solve: W and b of the affine network g(x) = W x + b.

* basis   (the paper's method)   b = g(0),  W = (g(Q) - b) Q^T  over an orthonormal
  basis Q, fed to g in chunks of columns (one forward pass per input element).
* adjoint (reverse mode)         W[:, c] = d g_c / d x, one backward pass per class.

Both are exact for an affine g; they agree to rounding. ``auto`` picks by
shapes: the basis solve costs D forward passes, the adjoint about K forward +
backward pairs (a backward costs about two forwards).
"""

from __future__ import annotations

import math
import sys
from typing import Iterator

import torch
from torch import Tensor
from tqdm.auto import tqdm

from .basis import Basis
from .errors import InputError
from .linearize import LinearizedModel, Observer

__all__ = ["solve_basis", "solve_adjoint", "choose_method", "basis_chunk", "METHODS"]

METHODS = ("auto", "basis", "adjoint")
DEFAULT_MAX_MEMORY = 2 * 2**30  # bytes of working memory a chunk may use


def sample_size(lin: LinearizedModel) -> int:
    return math.prod(lin.sample_shape)


def choose_method(lin: LinearizedModel, n_classes: int) -> str:
    """``adjoint`` when K forward+backward pairs cost less than D forwards."""
    return "adjoint" if 3 * n_classes < sample_size(lin) else "basis"


def basis_chunk(lin: LinearizedModel, max_memory: int | None = None) -> int:
    """Basis columns per forward pass so that one pass stays within ``max_memory``.

    The probe pass measured the bytes of all intermediate tensors for N probes;
    a chunk of m columns runs m * N samples.
    """
    budget = DEFAULT_MAX_MEMORY if max_memory is None else max_memory
    per_column = max(1, lin.activation_bytes) + lin.n_probes * sample_size(lin) * lin.probes.element_size()
    return int(max(1, min(sample_size(lin), budget // per_column)))


def _progress(total: int, desc: str, progress: bool | None):
    enabled = (sys.stderr.isatty() and total >= 256) if progress is None else progress
    return tqdm(total=total, desc=desc, unit="col", disable=not enabled, leave=False)


def bias(lin: LinearizedModel, classes: Tensor, observer: Observer | None = None) -> Tensor:
    """b = g(0) for every probe, (N, K)."""
    with torch.no_grad():
        zero = torch.zeros_like(lin.probes)
        return lin(zero, observer=observer)[:, classes]


def sweep(
    lin: LinearizedModel,
    basis: Basis,
    classes: Tensor,
    chunk: int,
    progress: bool | None = None,
    observer: Observer | None = None,
) -> Iterator[tuple[int, int, int, Tensor | None, Tensor]]:
    """Feed every basis column through g: yields (block, start, stop, B_k, outputs (N, K, m))."""
    n, shape = lin.n_probes, lin.sample_shape
    with torch.no_grad(), _progress(basis.size, f"basis solve ({basis.name})", progress) as bar:
        for k, (_, size) in enumerate(basis.blocks):
            bk_np = basis.block(k)
            bk = None if bk_np is None else torch.as_tensor(bk_np, dtype=lin.dtype, device=lin.probes.device)
            for start in range(0, size, chunk):
                stop = min(size, start + chunk)
                q = basis.inputs(k, start, stop, bk, lin.probes)
                batch = q.reshape(stop - start, 1, *shape).expand(-1, n, *shape).reshape(-1, *shape)
                out = lin(batch, observer=observer)[:, classes]
                yield k, start, stop, bk, out.reshape(stop - start, n, -1).permute(1, 2, 0)
                bar.update(stop - start)


def solve_basis(
    lin: LinearizedModel,
    classes: Tensor,
    basis: Basis,
    chunk: int,
    progress: bool | None = None,
    observer: Observer | None = None,
) -> tuple[Tensor, Tensor]:
    """W (N, K, D) and b (N, K) by the orthogonal-basis method."""
    b = bias(lin, classes)
    w = torch.empty(lin.n_probes, len(classes), basis.size, dtype=lin.dtype, device=lin.probes.device)
    block_g: Tensor | None = None
    for k, start, stop, bk, out in sweep(lin, basis, classes, chunk, progress, observer):
        rows = torch.as_tensor(basis.rows(k), device=w.device)
        centred = out - b.unsqueeze(-1)
        if bk is None:  # identity block: columns land directly
            w[:, :, rows[start:stop]] = centred
            continue
        if start == 0:
            block_g = torch.empty(*w.shape[:2], bk.shape[0], dtype=w.dtype, device=w.device)
        block_g[:, :, start:stop] = centred
        if stop == bk.shape[0]:
            w[:, :, rows] = block_g @ bk.T  # (G_k - b) B_k^T
    return w, b


def solve_adjoint(
    lin: LinearizedModel,
    classes: Tensor,
    chunk: int = 1,
    progress: bool | None = None,
) -> tuple[Tensor, Tensor]:
    """W by reverse mode through the frozen network g; ``chunk`` classes per backward pass.

    chunk = 1 keeps one forward graph and runs a backward per class; chunk = m > 1
    runs m copies of the probes at once and seeds copy j with class j's one-hot.
    """
    n, shape, k = lin.n_probes, lin.sample_shape, len(classes)
    w = torch.empty(n, k, sample_size(lin), dtype=lin.dtype, device=lin.probes.device)
    with torch.enable_grad(), _progress(k, "adjoint solve", progress) as bar:
        if chunk <= 1:
            x = lin.probes.detach().clone().requires_grad_(True)
            out = lin(x)[:, classes]
            for j in range(k):
                (g,) = torch.autograd.grad(out[:, j].sum(), x, retain_graph=j < k - 1)
                w[:, j] = g.reshape(n, -1)
                bar.update(1)
        else:
            for c0 in range(0, k, chunk):
                m = min(chunk, k - c0)
                x = lin.probes.detach().unsqueeze(0).expand(m, n, *shape).reshape(m * n, *shape)
                x = x.clone().requires_grad_(True)
                out = lin(x).reshape(m, n, -1)
                seed = torch.zeros_like(out)
                seed[torch.arange(m), :, classes[c0 : c0 + m]] = 1
                (g,) = torch.autograd.grad(out, x, grad_outputs=seed)
                w[:, c0 : c0 + m] = g.reshape(m, n, -1).transpose(0, 1)
                bar.update(m)
    return w, bias(lin, classes)


def resolve_classes(classes, n_outputs: int, device: torch.device) -> Tensor:
    """The class indices to reconstruct as a LongTensor (default: all outputs)."""
    if classes is None:
        return torch.arange(n_outputs, device=device)
    idx = torch.as_tensor(classes, dtype=torch.long, device=device).reshape(-1)
    if idx.numel() == 0:
        raise InputError("classes is empty: give at least one class index, or None for all")
    if (idx < 0).any() or (idx >= n_outputs).any():
        raise InputError(f"classes must be indices in [0, {n_outputs}); got {idx.tolist()}")
    if len(set(idx.tolist())) != idx.numel():
        raise InputError(f"classes contains duplicates: {idx.tolist()}")
    return idx
