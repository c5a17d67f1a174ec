"""Export: the reconstructed affine model as an ONNX graph, and PyTorch models to ONNX.

The reconstruction ``logit(x) = W x + b`` as a graph built with ``onnx.helper``:

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

import contextlib
import copy
import io
import json
import os
import re
import sys
import tempfile
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import ModelProto, TensorProto, helper, numpy_helper

from ..errors import InputError
from ..reconstruction import Reconstruction, atomic_write
from .graph import make_model

__all__ = ["reconstruction_to_onnx", "reconstruction_graph", "export_torch"]

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


def export_torch(model: Any, example: np.ndarray, output_names: list[str] | None = None, *,
                 strict: bool = False) -> tuple[ModelProto | None, str | None]:
    """``torch.onnx.export`` of a float32 eval copy of ``model`` with a dynamic batch axis ``batch``.

    The torch.export-based exporter (``dynamo=True``) runs first; where it fails (a
    TorchScript module, Python it cannot trace, an op it does not know) the TorchScript
    exporter (``dynamo=False``, deprecated: its DeprecationWarning is suppressed) does the
    work. ``metadata_props["reconviz.exporter"]`` says which one did (``"dynamo"`` or
    ``"torchscript"``). The input is named ``input``; the outputs ``output_names`` (default
    ``output0``, ``output1``, ... for each output the model returns). Returns (ModelProto,
    None), or (None, why) when neither exporter can export the model (``strict=True``: the
    TorchScript exporter's exception is raised instead). The exporters' warnings and
    printed output are suppressed."""
    import torch

    x = torch.from_numpy(np.ascontiguousarray(example, np.float32))
    first: list[BaseException] = []  # the torch.export-based exporter's failure
    try:
        with warnings.catch_warnings(), _quiet():
            warnings.simplefilter("ignore")  # .float() of a TorchScript copy warns about .grad too
            work = copy.deepcopy(model).eval().float()
            names = output_names if output_names is not None else _output_names(work, x)
            proto, exporter = _export(work, x, names, first)
    except Exception as e:  # noqa: BLE001 - the exporters raise many types
        if strict:
            raise
        return None, f"torch.onnx.export failed: {_why(e)}" + "".join(
            f" (the torch.export-based exporter: {_why(f)[:200]})" for f in first)
    proto.metadata_props.add(key="reconviz.exporter", value=exporter)
    return proto, None


def _export(work: Any, x: Any, names: list[str] | None, failed: list[BaseException]) -> tuple[ModelProto, str]:
    """(the exported model, which exporter): dynamo first, then TorchScript (its failure,
    if any, is appended to ``failed``)."""
    try:
        return _export_dynamo(work, x, names), "dynamo"
    except Exception as e:  # noqa: BLE001
        failed.append(e)
    return _export_torchscript(work, x, names), "torchscript"


def _export_dynamo(work: Any, x: Any, names: list[str] | None) -> ModelProto:
    """The torch.export-based exporter, batch axis dynamic (``Dim.DYNAMIC``: a named Dim refuses
    the example's batch of 1) and renamed ``batch``."""
    import torch

    program = torch.onnx.export(work, (x,), dynamo=True, input_names=["input"], output_names=names,
                                dynamic_shapes=({0: torch.export.Dim.DYNAMIC},), verbose=False)
    return _name_batch(program.model_proto)


def _name_batch(proto: ModelProto, name: str = "batch") -> ModelProto:
    """Rename the input's symbolic first dimension (the exporter's ``s0``, ``s77``, ...) to ``name``
    in every input, output and value_info."""
    old = proto.graph.input[0].type.tensor_type.shape.dim[0].dim_param
    if old:
        for v in (*proto.graph.input, *proto.graph.output, *proto.graph.value_info):
            for d in v.type.tensor_type.shape.dim:
                if d.dim_param == old:
                    d.dim_param = name
    return proto


def _export_torchscript(work: Any, x: Any, names: list[str] | None) -> ModelProto:
    """The TorchScript exporter (dynamo=False), its DeprecationWarning suppressed."""
    import torch

    buf = io.BytesIO()
    axes = {"input": {0: "batch"}, **{o: {0: "batch"} for o in names or ()}}
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        torch.onnx.export(work, (x,), buf, dynamo=False, input_names=["input"], output_names=names,
                          dynamic_axes=axes)
    return onnx.load_from_string(buf.getvalue())


def _why(e: BaseException) -> str:
    """``Type: message`` on one line, without the exporters' boilerplate and colour codes."""
    text = " ".join(re.sub(r"\x1b\[[0-9;]*m", "", str(e)).split())
    for cut in (" Please feel free", " [Caused by", " This is step"):
        text = text.split(cut)[0]
    return f"{type(e).__name__}: {text[:300]}"


def _output_names(work: Any, x: Any) -> list[str] | None:
    """``output0``, ``output1``, ... for the tensors ``work(x)`` returns (None: let the exporter name them)."""
    import torch

    with torch.no_grad():
        out = work(x)
    count = 1 if isinstance(out, torch.Tensor) else len(out) if isinstance(out, (tuple, list)) else 0
    return [f"output{i}" for i in range(count)] or None


@contextlib.contextmanager
def _quiet():
    """Silence stdout and stderr, Python's and the C++ exporter's (file descriptors 1 and 2)."""
    sys.stdout.flush()
    sys.stderr.flush()
    saved = []
    try:
        with tempfile.TemporaryFile() as sink, contextlib.redirect_stdout(io.StringIO()), \
                contextlib.redirect_stderr(io.StringIO()):
            for fd in (1, 2):
                try:
                    saved.append((fd, os.dup(fd)))
                    os.dup2(sink.fileno(), fd)
                except OSError:  # pragma: no cover - no such descriptor
                    pass
            yield
    finally:
        for fd, copy_fd in saved:
            os.dup2(copy_fd, fd)
            os.close(copy_fd)
