"""The onnxruntime backend of :func:`reconviz.verify`: the Table 1 view in onnxruntime.

Columns added to the report:

* ``original (onnxruntime)`` — the user's model exported with ``torch.onnx.export``
  (float32, dynamic batch) and run by onnxruntime;
* ``reconstructed (onnxruntime)`` — the reconstruction's own ONNX graph
  (:func:`reconviz.onnx.reconstruction_graph`, float32) run by onnxruntime.

Comparisons (each against its tolerance; onnxruntime runs float32, so the
contract's float32 tolerance, 1e-4 relative, unless ``tolerance=`` is given):

* ``OnnxRuntime()`` (``backend="onnxruntime"``): reconstructed (onnxruntime) vs original
  (onnxruntime) — Table 1 inside onnxruntime — and reconstructed (onnxruntime) vs
  reconstructed (torch).
* ``OnnxRuntime(against_torch=True)`` (``backend="both"``): also original (onnxruntime)
  vs original (torch) and reconstructed (onnxruntime) vs original (torch).

Importing :mod:`reconviz.onnx` registers both names in :data:`reconviz.verify.BACKENDS`.

When the model cannot be exported, a note says why, and the reconstruction's
graph is still compared with the PyTorch columns.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn as nn
from torch import Tensor

from ..reconstruction import Reconstruction, tolerance_for
from ..export import reconstruction_graph
from ..verify import ORIGINAL, RECONSTRUCTED, VerificationReport, compare, register_backend
from .export import export_torch
from .runtime import run, session

__all__ = ["OnnxRuntime", "ORIGINAL_ORT", "RECONSTRUCTED_ORT", "onnxruntime_columns"]

ORIGINAL_ORT, RECONSTRUCTED_ORT = "original (onnxruntime)", "reconstructed (onnxruntime)"


def onnxruntime_columns(model: nn.Module | None, rec: Reconstruction, x: Tensor,
                        output: Any = None) -> tuple[dict[str, np.ndarray], list[str]]:
    """The onnxruntime columns at ``x`` (r * N inputs) and notes on what could not be run."""
    xf = np.ascontiguousarray(x.detach().cpu().numpy(), dtype=np.float32)
    sess = session(reconstruction_graph(rec), "the reconstruction's graph")
    columns = {RECONSTRUCTED_ORT: run(sess, xf, None, "the reconstruction's graph")[0].astype(np.float64)}
    notes = []
    if model is None:
        return columns, notes
    if output is not None and not isinstance(output, int):
        notes.append(f"original (onnxruntime) skipped: output={output!r} selects the logits in Python; "
                     "the exported graph's outputs are positional (use an integer output)")
        return columns, notes
    proto, why = export_torch(model, xf[:1])
    if proto is None:
        notes.append(f"original (onnxruntime) skipped: the model cannot be exported to ONNX ({why}); the "
                     "reconstruction's ONNX graph is still compared with the PyTorch columns")
        return columns, notes
    outs = run(session(proto, "the exported model"), xf, None, "the exported model")
    index = 0 if output is None else output
    columns[ORIGINAL_ORT] = outs[index].reshape(xf.shape[0], -1)[:, rec.classes.cpu().numpy()].astype(np.float64)
    return columns, notes


@dataclass(frozen=True)
class OnnxRuntime:
    """The onnxruntime verify backend (a :class:`reconviz.verify.VerifyBackend`):
    ``rv.verify(model, rec, backends=[OnnxRuntime()])``.

    ``against_torch=True`` also compares the onnxruntime columns with the original
    model's PyTorch column (what ``backend="both"`` does)."""

    against_torch: bool = False

    @property
    def name(self) -> str:
        return "both" if self.against_torch else "onnxruntime"

    def add_columns(self, report: VerificationReport, model: nn.Module, rec: Reconstruction, x: Tensor, *,
                    tolerance: float | None, output: Any) -> None:
        columns, notes = onnxruntime_columns(model, rec, x, output)
        report.columns.update(columns)
        report.notes += notes
        tol = tolerance_for(torch.float32) if tolerance is None else tolerance
        pairs = [(RECONSTRUCTED_ORT, ORIGINAL_ORT), (RECONSTRUCTED_ORT, RECONSTRUCTED)]
        if self.against_torch or ORIGINAL_ORT not in columns:
            pairs += [(ORIGINAL_ORT, ORIGINAL), (RECONSTRUCTED_ORT, ORIGINAL)]
        for a, b in pairs:
            if a in report.columns and b in report.columns:
                va, vb = torch.from_numpy(report.columns[a]), torch.from_numpy(report.columns[b]).to(torch.float64)
                report.comparisons.append(compare(a, b, va, vb, tol))
        which = "the float32 tolerance" if tolerance is None else "the given tolerance"
        report.notes.append(f"onnxruntime columns run in float32 (its CPU convolution has no float64 kernel); "
                            f"their comparisons use {which}, {tol:g} relative")


register_backend("onnxruntime", OnnxRuntime())
register_backend("both", OnnxRuntime(against_torch=True))
