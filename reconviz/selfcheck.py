"""Self-checks run by every solve: is the linearized network really affine, and
does the reconstruction match the model away from the probe?

The exactness check at the probe (``W x0 + b = f(x0)``) cannot see an op that
was not frozen but happens to agree at x0. Two more checks close that gap:

* **affinity**: g is affine by construction, so at any point x = x0 + d
  (d random, seeded, of the probe's own scale) ``g(x) = W x + b`` must hold to
  the contract's tolerance. A non-affine op that slipped into g (a product of
  two input-dependent tensors, a value read out of autograd, random noise,
  state that changes between calls) breaks it.
* **region** (region-exact results only): at a point x0 + d inside the probe's
  linear region (every gate makes the probe's choice there: checked, not
  assumed) the *model* must equal ``W x + b``. This compares f itself, not g,
  so a replay that differs from the model is caught too.

Each check is a :class:`SelfCheck`; a failed one raises
:class:`~reconviz.errors.ExactnessError` naming it.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import Tensor

from .errors import ExactnessError
from .htmlparts import HtmlRepr

__all__ = ["SelfCheck", "affinity_point", "compare_outputs", "raise_if_failed", "relative_error"]


def relative_error(a: Tensor, ref: Tensor) -> Tensor:
    """|a - ref| / max(1, |ref|), elementwise: the contract's error."""
    return (a - ref).abs() / ref.abs().clamp_min(1.0)


@dataclass(frozen=True)
class SelfCheck(HtmlRepr):
    """One self-check: ``passed`` is None when it was skipped (``detail`` says why)."""

    name: str  # "affinity" or "region"
    passed: bool | None
    max_rel_error: float | None
    tolerance: float
    detail: str

    @property
    def skipped(self) -> bool:
        return self.passed is None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "SelfCheck":
        return cls(str(d["name"]), d["passed"], d["max_rel_error"], float(d["tolerance"]), str(d["detail"]))

    def __str__(self) -> str:
        if self.passed is None:
            return f"self-check {self.name}: skipped ({self.detail})"
        verdict = "PASS" if self.passed else "FAIL"
        return (f"self-check {self.name}: max rel {self.max_rel_error:.3e} "
                f"(tolerance {self.tolerance:g}; {self.detail})  {verdict}")


def affinity_point(x0: Tensor, seed: int = 0) -> Tensor:
    """x0 + d with d ~ N(0, s^2) per probe, s = the probe's RMS (1 for an all-zero probe).

    Seeded on the CPU, so the point is the same on every device."""
    gen = torch.Generator().manual_seed(seed)
    d = torch.randn(x0.shape, generator=gen, dtype=torch.float64).to(device=x0.device, dtype=x0.dtype)
    flat = x0.flatten(1)
    peak = flat.abs().amax(1, keepdim=True)  # the RMS through x0 / peak: no overflow near 1e154
    peak = torch.where(peak > 0, peak, torch.ones_like(peak))
    scale = (flat / peak).pow(2).mean(1).sqrt() * peak.squeeze(1)
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    return x0 + d * scale.reshape((-1,) + (1,) * (x0.dim() - 1))


def compare_outputs(name: str, got: Tensor, expected: Tensor, tolerance: float, detail: str) -> SelfCheck:
    """SelfCheck of ``got`` (W x + b) against ``expected`` (g(x) or f(x)), relative as the contract."""
    err = float(relative_error(got, expected).max()) if got.numel() else 0.0
    ok = err <= tolerance  # NaN fails
    return SelfCheck(name, bool(ok), err, tolerance, detail)


def raise_if_failed(checks: list[SelfCheck]) -> None:
    """ExactnessError naming the first failed check."""
    for c in checks:
        if c.passed is False:
            what = {
                "affinity": "the linearized network is not affine: an op that depends on the input "
                            "was neither frozen nor refused (please report the model's ops)",
                "region": "the model differs from W x + b inside the probe's linear region: the "
                          "linearized network does not replay the model (state that changes between "
                          "calls, randomness, or an op reconviz mis-classified)",
            }.get(c.name, "a self-check failed")
            raise ExactnessError(
                f"self-check '{c.name}' failed: max relative error {c.max_rel_error:.3g} > tolerance "
                f"{c.tolerance:g} ({c.detail}). {what}"
            )

