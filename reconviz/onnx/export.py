"""Export of PyTorch models to ONNX (:func:`export_torch`), and the reconstruction's
ONNX graph (:func:`reconstruction_graph`, :func:`reconstruction_to_onnx`: defined in the
core, :mod:`reconviz.export`, and re-exported here)."""

from __future__ import annotations

import contextlib
import copy
import io
import os
import re
import sys
import tempfile
import warnings
from typing import Any

import numpy as np
import onnx
from onnx import ModelProto

from ..export import PROTOBUF_LIMIT, reconstruction_graph, reconstruction_to_onnx

__all__ = ["reconstruction_to_onnx", "reconstruction_graph", "export_torch", "PROTOBUF_LIMIT"]


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
