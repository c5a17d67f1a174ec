"""Orthonormal bases Q of the input space, for the solve W = (g(Q) - b) Q^T.

Every basis here is ``Q = P @ blockdiag(B_1, ..., B_r)`` with ``P`` a permutation
and each ``B_k`` an orthonormal block, so a block of columns can be generated on
its own and W assembled block by block, never forming a D x D matrix:

    W[:, P(rows_k)] = (G_k - b) @ B_k^T,     G_k = g(columns of block k)

* ``identity`` — the paper's one-by-one solve: W[:, i] = g(e_i) - b.
* ``hadamard`` — block-Hadamard: Sylvester Hadamard blocks H_n / sqrt(n),
  n a power of two up to 1024, covering D by its binary decomposition.
* ``random`` — a seeded random permutation times Haar-random orthogonal
  blocks of at most 256 (exactly orthogonal, reproducible from the seed).
* ``Basis.from_matrix(Q)`` — any orthonormal D x D matrix you supply.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import scipy.linalg
import torch
from torch import Tensor

from .errors import InputError

__all__ = ["Basis", "make_basis", "BASES"]

BASES = ("identity", "hadamard", "random")
HADAMARD_MAX = 1024
RANDOM_BLOCK = 256


@dataclass
class Basis:
    """Q = P blockdiag(B_k): ``blocks`` are (offset, size); ``perm`` maps row i to P(i)."""

    name: str
    size: int
    blocks: list[tuple[int, int]]
    perm: np.ndarray | None = None
    seeds: list[int] = field(default_factory=list)  # per-block seeds (random)
    matrix: np.ndarray | None = None  # from_matrix: the whole Q

    def block(self, k: int) -> np.ndarray | None:
        """B_k (n x n, orthonormal), or None where it is the identity."""
        _, n = self.blocks[k]
        if self.name == "identity" or n == 1 and self.name == "hadamard":
            return None
        if self.name == "hadamard":
            return scipy.linalg.hadamard(n).astype(np.float64) / np.sqrt(n)
        if self.name == "random":
            g = np.random.default_rng(self.seeds[k]).standard_normal((n, n))
            q, r = np.linalg.qr(g)
            return q * np.sign(np.diag(r))[None, :]  # Haar measure
        return self.matrix

    def rows(self, k: int) -> np.ndarray:
        """Input coordinates (and W columns) that block k lives on: P(offset .. offset+n)."""
        off, n = self.blocks[k]
        r = np.arange(off, off + n)
        return r if self.perm is None else self.perm[r]

    def inputs(self, k: int, start: int, stop: int, bk: Tensor | None, like: Tensor) -> Tensor:
        """Basis columns start..stop of block k as a batch of inputs, shape (m, D)."""
        rows = torch.as_tensor(self.rows(k), device=like.device)
        out = torch.zeros(stop - start, self.size, dtype=like.dtype, device=like.device)
        if bk is None:
            out[torch.arange(stop - start, device=like.device), rows[start:stop]] = 1
        else:
            out[:, rows] = bk[:, start:stop].T
        return out

    @classmethod
    def from_matrix(cls, q: np.ndarray | Tensor, atol: float = 1e-10) -> "Basis":
        """A user-supplied orthonormal basis (columns), checked: |Q^T Q - I| <= atol."""
        q = np.asarray(q.detach().cpu() if isinstance(q, Tensor) else q, dtype=np.float64)
        if q.ndim != 2 or q.shape[0] != q.shape[1]:
            raise InputError(f"a basis matrix must be square (D, D), got shape {q.shape}")
        err = np.abs(q.T @ q - np.eye(q.shape[0])).max()
        if err > atol:
            raise InputError(f"basis matrix is not orthonormal: max |Q^T Q - I| = {err:.3g} > {atol:g}")
        return cls("matrix", q.shape[0], [(0, q.shape[0])], matrix=q)


def _split(size: int, largest: int, powers_of_two: bool) -> list[tuple[int, int]]:
    if powers_of_two:
        sizes = [largest] * (size // largest)
        rest = size % largest
        sizes += [1 << b for b in reversed(range(rest.bit_length())) if rest >> b & 1]
    else:
        count = -(-size // largest)
        sizes = [size // count + (i < size % count) for i in range(count)]
    offsets = np.cumsum([0] + sizes[:-1]).tolist()
    return list(zip(offsets, sizes))


def make_basis(kind: "str | Basis", size: int, seed: int = 0) -> Basis:
    """Build a basis of R^size by name (``identity``, ``hadamard``, ``random``)."""
    if isinstance(kind, Basis):
        if kind.size != size:
            raise InputError(f"basis has size {kind.size}, but the input has {size} elements")
        return kind
    if kind == "identity":
        return Basis("identity", size, [(0, size)])
    if kind == "hadamard":
        return Basis("hadamard", size, _split(size, HADAMARD_MAX, powers_of_two=True))
    if kind == "random":
        rng = np.random.default_rng(seed)
        blocks = _split(size, RANDOM_BLOCK, powers_of_two=False)
        seeds = rng.integers(0, 2**63 - 1, size=len(blocks)).tolist()
        return Basis("random", size, blocks, perm=rng.permutation(size), seeds=seeds)
    raise InputError(f"unknown basis {kind!r}: choose one of {', '.join(BASES)} or pass a Basis")
