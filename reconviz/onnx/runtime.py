"""onnxruntime sessions: quiet, CPU, from a ModelProto in memory."""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np
from onnx import ModelProto

from ..errors import InputError

__all__ = ["session", "run", "run_model", "ort_version"]


def ort_version() -> str:
    import onnxruntime as ort

    return ort.__version__


def session(model: ModelProto | bytes, what: str = "the graph"):
    """An onnxruntime CPU InferenceSession (warnings off); InputError if it cannot load."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3  # errors only: shape-inference warnings are noise here
    data = model if isinstance(model, bytes) else model.SerializeToString()
    try:
        return ort.InferenceSession(data, sess_options=opts, providers=["CPUExecutionProvider"])
    except Exception as e:  # noqa: BLE001 - onnxruntime raises its own exception types
        raise InputError(f"onnxruntime cannot load {what}: {' '.join(str(e).split())[:400]}") from e


def run(sess, x: np.ndarray, outputs: Sequence[str] | None = None, what: str = "the graph") -> list[np.ndarray]:
    """Run ``sess`` on the float32 batch ``x`` (its single input)."""
    name = sess.get_inputs()[0].name
    try:
        return sess.run(list(outputs) if outputs is not None else None,
                        {name: np.ascontiguousarray(x, dtype=np.float32)})
    except Exception as e:  # noqa: BLE001
        raise InputError(f"onnxruntime could not run {what} on a batch of shape {tuple(x.shape)}: "
                         f"{' '.join(str(e).split())[:400]}") from e


def run_model(model: Any, x: Any, tensor: str | None = None) -> np.ndarray:
    """An ONNX model's output (or the named tensor ``tensor``) at ``x``, flattened to (B, -1), float32.

    ``model`` is a path, bytes or ModelProto (not modified); ``x`` a float batch."""
    from onnx import TensorProto, helper

    from .graph import load_model

    proto, source = load_model(model)
    names = [o.name for o in proto.graph.output]
    if tensor is not None and tensor not in names:
        if not any(tensor in n.output for n in proto.graph.node):
            raise InputError(f"{source} computes no tensor named '{tensor}'")
        proto.graph.output.append(helper.make_tensor_value_info(tensor, TensorProto.FLOAT, None))
    xf = np.ascontiguousarray(x.detach().cpu().numpy() if hasattr(x, "detach") else x, dtype=np.float32)
    out = run(session(proto, source), xf, [tensor or names[0]], source)[0]
    return out.reshape(xf.shape[0], -1)
