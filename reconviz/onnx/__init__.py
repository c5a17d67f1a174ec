"""reconviz.onnx — the method on ONNX graphs, in onnxruntime; and ONNX export.

The same pipeline as the PyTorch path, one module per stage::

    graph (load a copy, check every op)  ->  probe (one onnxruntime run: logits + priors)
      ->  linearize (gates rewritten as nodes, priors as initializers)
      ->  solve (orthogonal basis, onnxruntime batches)  ->  Reconstruction

>>> import reconviz as rv                                          # doctest: +SKIP
>>> rec = rv.onnx.reconstruct("model.onnx", x)      # W, b of the logits, float32
>>> rec.to_onnx("affine.onnx")                      # W x + b as an ONNX Gemm
>>> rv.onnx.linearize("model.onnx", x).save("rewritten.onnx")   # the frozen network
>>> print(rv.verify(model, rec, backends=[rv.onnx.OnnxRuntime()]))   # Table 1 in onnxruntime too

onnxruntime's CPU convolution has no float64 kernel: results here are exact to
the float32 tolerance (1e-4 relative), see docs/onnx.md for measured errors.
"""

from __future__ import annotations

from ..export import reconstruction_graph, reconstruction_to_onnx
from . import verify as _verify  # noqa: F401  (registers the "onnxruntime" and "both" verify backends)
from .export import export_torch
from .gates import NodePrior, OnnxGate, gate_for, gate_types
from .graph import AFFINE, UnsupportedGraphError
from .linearize import LinearizedGraph, linearize, linearized_to_onnx
from .runtime import run_model
from .solve import reconstruct
from .verify import ORIGINAL_ORT, RECONSTRUCTED_ORT, OnnxRuntime, onnxruntime_columns

__all__ = [
    "reconstruct", "linearize", "linearized_to_onnx", "LinearizedGraph", "reconstruction_to_onnx",
    "reconstruction_graph", "export_torch", "run_model", "OnnxRuntime", "onnxruntime_columns",
    "UnsupportedGraphError", "gate_for", "gate_types", "OnnxGate", "NodePrior", "AFFINE", "ORIGINAL_ORT",
    "RECONSTRUCTED_ORT",
]
