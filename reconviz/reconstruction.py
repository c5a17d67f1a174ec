"""Stage 4 — the result: the affine model f(x) = W x + b at each probe.

A :class:`Reconstruction` is plain data: ``weight`` (N, K, *sample_shape),
``bias`` (N, K), the reconstructed ``classes``, the original ``logits`` at the
probes and the ``probes`` themselves, plus metadata (method, basis, dtype,
tolerance, measured errors). It saves to ``.npz`` atomically and loads without
executing code (``allow_pickle=False``).
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from .errors import ExactnessError, InputError

__all__ = ["Reconstruction", "tolerance_for", "atomic_write"]

FORMAT = "reconviz.reconstruction/1"


def tolerance_for(dtype: torch.dtype) -> float:
    """Relative tolerance of the exactness contract: |Wx+b - f(x)| <= tol * max(1, |f(x)|)."""
    return {torch.float64: 1e-9, torch.float32: 1e-4}.get(dtype, 1e-2)


def relative_error(a: Tensor, ref: Tensor) -> Tensor:
    """|a - ref| / max(1, |ref|), elementwise."""
    return (a - ref).abs() / ref.abs().clamp_min(1.0)


@dataclass
class Reconstruction:
    """The exact affine model at N probes: ``logit_c(x) = <W[n, c], x> + b[n, c]``."""

    weight: Tensor  # (N, K, *sample_shape): class templates
    bias: Tensor  # (N, K)
    classes: Tensor  # (K,) indices of the reconstructed outputs
    logits: Tensor  # (N, K) original model outputs at the probes
    probes: Tensor  # (N, *sample_shape)
    meta: dict[str, Any] = field(default_factory=dict)

    # shapes ---------------------------------------------------------------
    @property
    def n_probes(self) -> int:
        return self.weight.shape[0]

    @property
    def n_classes(self) -> int:
        return self.weight.shape[1]

    @property
    def sample_shape(self) -> tuple[int, ...]:
        return tuple(self.weight.shape[2:])

    @property
    def exactness(self) -> str:
        """``region-exact`` (valid on the probe's linear region) or ``point-exact``."""
        return self.meta.get("exactness", "region-exact")

    @property
    def tolerance(self) -> float:
        return float(self.meta.get("tolerance", tolerance_for(self.weight.dtype)))

    @property
    def predicted(self) -> Tensor:
        """Index into ``classes`` of the largest reconstructed logit, per probe (N,)."""
        return self.logits.argmax(dim=1)

    # the affine model -----------------------------------------------------
    def __call__(self, x: Tensor) -> Tensor:
        """W x + b for a batch of r * N inputs (input i uses probe i % N): (r * N, K)."""
        if not isinstance(x, Tensor) or tuple(x.shape[1:]) != self.sample_shape or x.shape[0] % self.n_probes:
            shape = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
            raise InputError(
                f"expected inputs of shape (r * {self.n_probes}, {', '.join(map(str, self.sample_shape))}), "
                f"got {shape}"
            )
        w = torch.as_tensor(self.weight).reshape(self.n_probes, self.n_classes, -1)
        xs = x.to(w.dtype).reshape(-1, self.n_probes, w.shape[-1])
        return (torch.einsum("nkd,rnd->rnk", w, xs) + self.bias).reshape(-1, self.n_classes)

    def contributions(self) -> Tensor:
        """W * x0 per probe and class, (N, K, *sample_shape); sums with b to the logit."""
        return torch.as_tensor(self.weight) * self.probes.unsqueeze(1).to(self.weight.dtype)

    def errors(self) -> tuple[float, float]:
        """(max abs, max rel) error of W x0 + b against the original logits."""
        rebuilt = self(self.probes)
        return (
            float((rebuilt - self.logits).abs().max()),
            float(relative_error(rebuilt, self.logits).max()),
        )

    def check(self) -> "Reconstruction":
        """Measure the error at the probes, store it in ``meta``; raise if above tolerance."""
        abs_err, rel_err = self.errors()
        self.meta.update(max_abs_error=abs_err, max_rel_error=rel_err)
        if not rel_err <= self.tolerance:
            raise ExactnessError(
                f"reconstruction misses the model at the probe: max relative error {rel_err:.3g} > "
                f"tolerance {self.tolerance:g} ({self.weight.dtype}). The frozen network is not "
                "affine: an op that depends on the input was not frozen. Use dtype=torch.float64 "
                "and report the model's ops if this persists"
            )
        return self

    def to_onnx(self, path: str | os.PathLike, **options: Any) -> Path:
        """Export the affine model as an ONNX graph (see :mod:`reconviz.onnx`)."""
        from .onnx import reconstruction_to_onnx

        return reconstruction_to_onnx(self, path, **options)

    # persistence ----------------------------------------------------------
    def save(self, path: str | os.PathLike) -> Path:
        """Write ``path`` (.npz) atomically; returns the path."""
        path = Path(path)
        meta = dict(self.meta, format=FORMAT, dtype=str(self.weight.dtype).replace("torch.", ""))
        arrays = {
            "weight": _np(self.weight), "bias": _np(self.bias), "classes": _np(self.classes),
            "logits": _np(self.logits), "probes": _np(self.probes),
            "meta": np.array(json.dumps(meta, default=_jsonable)),
        }
        atomic_write(path, lambda f: np.savez(f, **arrays))
        return path

    @classmethod
    def load(cls, path: str | os.PathLike, map_location: str | torch.device = "cpu") -> "Reconstruction":
        """Read a file written by :meth:`save` (never unpickles)."""
        try:
            with np.load(Path(path), allow_pickle=False) as z:
                data = {k: z[k] for k in z.files}
        except (OSError, ValueError) as e:
            raise InputError(f"cannot read reconstruction {path}: {e}") from e
        missing = {"weight", "bias", "classes", "logits", "probes", "meta"} - set(data)
        if missing:
            raise InputError(f"{path} is not a reconviz reconstruction (missing {sorted(missing)})")
        meta = json.loads(str(data["meta"]))
        t = {k: torch.from_numpy(np.ascontiguousarray(v)).to(map_location) for k, v in data.items() if k != "meta"}
        return cls(t["weight"], t["bias"], t["classes"], t["logits"], t["probes"], meta)

    def __repr__(self) -> str:
        m = self.meta
        return (
            f"Reconstruction(probes={self.n_probes}, classes={self.n_classes}, sample_shape="
            f"{self.sample_shape}, dtype={self.weight.dtype}, method={m.get('method')}, "
            f"basis={m.get('basis')}, {self.exactness}, max_rel_error={m.get('max_rel_error', float('nan')):.2e})"
        )


def _np(t: Tensor) -> np.ndarray:
    return t.detach().cpu().numpy() if isinstance(t, Tensor) else np.asarray(t)


def _jsonable(v: Any) -> Any:
    if isinstance(v, (np.generic,)):
        return v.item()
    if isinstance(v, (tuple, set)):
        return list(v)
    return str(v)


def atomic_write(path: Path, write) -> None:
    """Write through a temporary file in the same folder, then rename over ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
