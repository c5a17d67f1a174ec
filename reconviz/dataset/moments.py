"""Streaming per-class moments: count, mean and the sum of squared deviations (M2).

A batch's rows are summarised on their own (two-pass: mean, then squared
deviations from it), then merged into the running totals with Chan, Golub and
LeVeque's pairwise update, for a part A (n_a, mean_a, M2_a) and a part B:

    n    = n_a + n_b
    d    = mean_b - mean_a
    mean = mean_a + d * n_b / n
    M2   = M2_a + M2_b + d^2 * n_a * n_b / n

Each merge adds one rounding error relative to the values, not to their squares,
so mean and std stay accurate over millions of probes (a running sum of squares,
sum(w^2) - n mean^2, loses every digit where std << |mean|). The same algebra
merges the parts of P processes (:func:`pooled`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = ["Moments", "pooled"]


@dataclass
class Moments:
    """Per-class moments of D-vectors: ``count`` (K,), ``mean`` (K, D), ``m2`` (K, D) or None
    (``second=False``: the mean alone), all float64 on the CPU."""

    count: Tensor
    mean: Tensor
    m2: Tensor | None

    @classmethod
    def zeros(cls, k: int, d: int, second: bool = True) -> "Moments":
        f64 = torch.float64
        return cls(torch.zeros(k, dtype=f64), torch.zeros(k, d, dtype=f64),
                   torch.zeros(k, d, dtype=f64) if second else None)

    def add(self, pos: Tensor, rows: Tensor) -> None:
        """Merge rows (m, D) whose classes sit at positions ``pos`` (m,) into the totals: per class
        present, the batch's mean and M2 (two passes), then Chan's update of its row (only the
        classes present are touched: temporaries are (classes present, D), not K x D)."""
        if pos.numel() == 0:
            return
        rows = rows.detach().to("cpu", torch.float64).reshape(pos.numel(), -1)
        present, inv = torch.unique(pos.to("cpu", torch.long), return_inverse=True)
        n_b = torch.bincount(inv, minlength=present.numel()).to(torch.float64).unsqueeze(1)
        mean_b = rows.new_zeros(present.numel(), rows.shape[1]).index_add_(0, inv, rows) / n_b
        n_a = self.count[present].unsqueeze(1)
        n = n_a + n_b
        delta = mean_b - self.mean[present]
        if self.m2 is not None:
            m2_b = rows.new_zeros(mean_b.shape).index_add_(0, inv, (rows - mean_b[inv]).square())
            self.m2[present] += m2_b + delta.square() * (n_a * n_b / n)
        self.mean[present] += delta * (n_b / n)
        self.count[present] = n.squeeze(1)

    def add_class(self, k: int, rows: Tensor) -> None:
        """Merge rows (m, D) of the class at position k: the batch's mean and M2 (two passes), then
        Chan's update of row k."""
        rows = rows.detach().to("cpu", torch.float64).reshape(rows.shape[0], -1)
        n_b = rows.shape[0]
        if n_b == 0:
            return
        n_a = float(self.count[k])
        n = n_a + n_b
        mean_b = rows.mean(0)
        delta = mean_b - self.mean[k]
        if self.m2 is not None:
            self.m2[k] += (rows - mean_b).square().sum(0) + delta.square() * (n_a * n_b / n)
        self.mean[k] += delta * (n_b / n)
        self.count[k] = n

    def merge(self, other: "Moments") -> None:
        """Chan's pairwise update with another part (classes with no rows in it are unchanged)."""
        n = self.count + other.count
        some = (other.count > 0).unsqueeze(1)
        frac = (other.count / n.clamp_min(1)).unsqueeze(1)
        delta = other.mean - self.mean
        if self.m2 is not None and other.m2 is not None:
            cross = (self.count * other.count / n.clamp_min(1)).unsqueeze(1)
            self.m2 = torch.where(some, self.m2 + other.m2 + delta.square() * cross, self.m2)
        self.mean = torch.where(some, self.mean + delta * frac, self.mean)
        self.count = n

    def std(self) -> Tensor | None:
        """Population standard deviation sqrt(M2 / n) per class (0 where n = 0)."""
        if self.m2 is None:
            return None
        return (self.m2 / self.count.clamp_min(1).unsqueeze(1)).sqrt()

    def arrays(self, prefix: str) -> dict[str, Tensor]:
        out = {f"{prefix}count": self.count, f"{prefix}mean": self.mean}
        if self.m2 is not None:
            out[f"{prefix}m2"] = self.m2
        return out

    @classmethod
    def from_arrays(cls, a: dict[str, Tensor], prefix: str) -> "Moments":
        return cls(a[f"{prefix}count"], a[f"{prefix}mean"], a.get(f"{prefix}m2"))


def pooled(parts: Moments, all_reduce) -> Moments:
    """The moments of P parts (one per process) pooled by ``all_reduce`` (a sum over processes):

        n = sum n_r,  mean = sum n_r mean_r / n,  M2 = sum (M2_r + n_r (mean_r - mean)^2)

    the closed form of P - 1 Chan merges; deviations are taken from the pooled mean, so it is
    as accurate as the pairwise update."""
    n = all_reduce(parts.count.clone())
    total = all_reduce(parts.mean * parts.count.unsqueeze(1))
    mean = total / n.clamp_min(1).unsqueeze(1)
    m2 = None
    if parts.m2 is not None:
        m2 = all_reduce(parts.m2 + (parts.mean - mean).square() * parts.count.unsqueeze(1))
    return Moments(n, mean, m2)
