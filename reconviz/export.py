"""Export: the reconstructed affine model ``f(x) = W x + b`` as an ONNX graph.

Part of the core (it needs only ``onnx``, never onnxruntime nor :mod:`reconviz.onnx`):
``Reconstruction.to_onnx`` calls it, and :mod:`reconviz.onnx` re-exports it.

The reconstruction as a graph built with ``onnx.helper``:

* one probe (N = 1, or ``probe=n``): ``Flatten -> Gemm(W, b, transB=1)``, any batch;
* all N probes in one graph (the default for N > 1): the same convention as
  ``Reconstruction.__call__`` — input i of a batch of r * N uses probe i % N's
  weights — as ``Reshape (r, N, 1, D) -> MatMul W^T (N, D, K) -> Add b (N, 1, K)
  -> Reshape (r * N, K)``.

The input is named and shaped like the model's (``meta["input_name"]``, else
``input``; ``(batch, *sample_shape)`` with a dynamic batch), the output is
``logits`` (batch, K). Metadata props record the classes, probes, exactness and
tolerance.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import onnx
from onnx import ModelProto, TensorProto, helper, numpy_helper

from .errors import InputError
from .files import atomic_write

if TYPE_CHECKING:  # duck-typed at run time: reconstruction.py imports this module (Reconstruction.to_onnx)
    from .reconstruction import Reconstruction

__all__ = ["reconstruction_to_onnx", "reconstruction_graph", "make_model", "IR_VERSION", "OPSET", "PROTOBUF_LIMIT"]

IR_VERSION = 9  # onnx.helper writes IR 14 by default, which onnxruntime 1.31 and older refuse: keep files portable
OPSET = 17  # opset of the graphs reconviz writes (Gemm, MatMul, Add, Reshape, Gather, Mul)
PROTOBUF_LIMIT = 2 * 2**30 - 2**20  # a ModelProto must serialize to less than 2 GiB
_DTYPES = {"float32": (np.float32, TensorProto.FLOAT), "float64": (np.float64, TensorProto.DOUBLE)}


def reconstruction_graph(rec: Reconstruction, probe: int | None = None, dtype: str = "float32",
                         input_name: str | None = None, output_name: str = "logits") -> ModelProto:
    """The affine model of ``rec`` as an ONNX ModelProto (checked by onnx.checker)."""
    if dtype not in _DTYPES:
        raise InputError(f"dtype must be 'float32' or 'float64', got {dtype!r}")
    np_dtype, elem = _DTYPES[dtype]
    n, k, sample = rec.n_probes, rec.n_classes, list(rec.sample_shape)
    d = int(np.prod(sample))
    if probe is not None and not (isinstance(probe, int) and 0 <= probe < n):
        raise InputError(f"probe must be an index in [0, {n}) or None for all probes, got {probe!r}")
    probes = range(n) if probe is None else [probe]
    nbytes = len(probes) * k * d * np.dtype(np_dtype).itemsize
    if nbytes > PROTOBUF_LIMIT:
        raise InputError(f"W is {nbytes / 2**30:.1f} GiB, over ONNX's 2 GiB protobuf limit: export one probe "
                         "(probe=n) or reconstruct fewer classes")
    w = np.stack([_np(rec.weight[p].reshape(k, d), np_dtype) for p in probes])  # (P, K, D)
    b = _np(rec.bias[list(probes)], np_dtype)  # (P, K)
    name = input_name or rec.meta.get("input_name") or "input"
    if len(probes) == 1:
        nodes, inits = _gemm(name, output_name, w[0], b[0])
    else:
        nodes, inits = _grouped(name, output_name, w, b)
    graph = helper.make_graph(
        nodes, "reconviz_reconstruction",
        [helper.make_tensor_value_info(name, elem, ["batch", *sample])],
        [helper.make_tensor_value_info(output_name, elem, ["batch", k])],
        initializer=inits,
        doc_string=_doc(rec, probe),
    )
    model = make_model(graph, doc_string="reconviz: the exact affine model f(x) = W x + b")
    onnx.helper.set_model_props(model, {
        "reconviz.classes": json.dumps(rec.classes.tolist()),
        "reconviz.probes": json.dumps(list(probes)),
        "reconviz.layout": "gemm" if len(probes) == 1 else f"input i uses probe i % {n}",
        "reconviz.exactness": rec.exactness,
        "reconviz.tolerance": repr(rec.tolerance),
        "reconviz.dtype": dtype,
    })
    onnx.checker.check_model(model)
    return model


def _np(t: Any, dtype: Any) -> np.ndarray:
    return np.asarray(t.detach().cpu().numpy() if hasattr(t, "detach") else t, dtype=dtype)


def _gemm(x: str, out: str, w: np.ndarray, b: np.ndarray) -> tuple[list, list]:
    """logits = Flatten(x) W^T + b."""
    nodes = [
        helper.make_node("Flatten", [x], ["flat"], axis=1, name="flatten"),
        helper.make_node("Gemm", ["flat", "W", "b"], [out], transB=1, name="affine"),
    ]
    return nodes, [numpy_helper.from_array(w, "W"), numpy_helper.from_array(b, "b")]


def _grouped(x: str, out: str, w: np.ndarray, b: np.ndarray) -> tuple[list, list]:
    """logits[i] = W[i % N] x[i] + b[i % N] for a batch of r * N inputs."""
    n, k, d = w.shape
    inits = [
        numpy_helper.from_array(np.array([-1, n, 1, d], np.int64), "grouped"),
        numpy_helper.from_array(np.ascontiguousarray(w.transpose(0, 2, 1)), "Wt"),  # (N, D, K)
        numpy_helper.from_array(b.reshape(n, 1, k), "b"),
        numpy_helper.from_array(np.array([-1, k], np.int64), "ungrouped"),
    ]
    nodes = [
        helper.make_node("Reshape", [x, "grouped"], ["xg"], name="group"),
        helper.make_node("MatMul", ["xg", "Wt"], ["wx"], name="matmul"),
        helper.make_node("Add", ["wx", "b"], ["wxb"], name="bias"),
        helper.make_node("Reshape", ["wxb", "ungrouped"], [out], name="ungroup"),
    ]
    return nodes, inits


def _doc(rec: Reconstruction, probe: int | None) -> str:
    which = f"probe {probe}" if probe is not None else (
        "the probe" if rec.n_probes == 1 else
        f"all {rec.n_probes} probes: input i of a batch of r * {rec.n_probes} uses probe i % {rec.n_probes}")
    return (f"reconviz reconstruction ({rec.exactness}) of {rec.meta.get('model', 'a model')} at {which}; "
            f"classes {rec.classes.tolist()}")


def reconstruction_to_onnx(rec: Reconstruction, path: str | os.PathLike, *, probe: int | None = None,
                           dtype: str = "float32", input_name: str | None = None,
                           output_name: str = "logits") -> Path:
    """Write ``rec`` as an .onnx file (atomically) and return its path.

    Args:
        probe: None (default): all probes in one graph (input i of a batch of r * N
            uses probe i % N; a plain Gemm when N = 1); an index: that probe's
            model only, a Gemm for any batch size.
        dtype: ``"float32"`` (default, runs everywhere) or ``"float64"``.
        input_name: the graph's input name (default: the model's, else ``input``).
    """
    model = reconstruction_graph(rec, probe, dtype, input_name, output_name)
    path = Path(path)
    atomic_write(path, lambda f: f.write(model.SerializeToString()))
    return path


def make_model(graph: onnx.GraphProto, opset: int = OPSET, **kwargs: Any) -> ModelProto:
    """A model with an explicit IR version onnxruntime reads."""
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=IR_VERSION,
                             producer_name="reconviz", **kwargs)
