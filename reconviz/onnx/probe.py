"""ONNX stage 1 — probe: one onnxruntime run that returns the logits and every gate's prior.

The probe graph is a copy of the prepared graph whose outputs also include the
tensors the gates need (an elementwise gate's input, MaxPool's optional Indices
output and its input, GlobalMaxPool's input). One run on the probe batch x0
gives f(x0) and, through :meth:`OnnxGate.record` (the registered torch gates'
frozen math), the priors.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from onnx import ModelProto, TensorProto, helper

from ..errors import InputError, UnsupportedOperationError
from ..probe import check_probe_input
from ..reconstruction import relative_error, tolerance_for
from .freeze import batch_axis
from .gates import NodePrior, gate_for
from .graph import Prepared, UnsupportedGraphError
from .runtime import run, session

__all__ = ["OnnxProbe", "probe", "as_probe_array", "FLOAT32_TOLERANCE", "max_relative_error"]

FLOAT32_TOLERANCE = tolerance_for(torch.float32)  # the contract's float32 relative tolerance


@dataclass
class OnnxProbe:
    prep: Prepared
    x: np.ndarray  # (N, *sample_shape) float32
    logits: np.ndarray  # (N, K_all) float32: the graph's output at the probes
    priors: dict[int, NodePrior]  # node index in prep.model.graph.node -> prior
    activation_bytes: int  # bytes of the tapped tensors (for chunk sizes)
    logits_shape: tuple[int, ...]  # the logits tensor's shape at the probes (before flattening)
    # the value rule's frozen edges (node index, input slot) -> their value ("value") and batch axis ("axis")
    frozen: dict[tuple[int, int], NodePrior] = field(default_factory=dict)


def as_probe_array(x: Any) -> np.ndarray:
    """The probe batch as a float32 array (N, ...), checked like the PyTorch path's."""
    if isinstance(x, np.ndarray):
        x = torch.from_numpy(np.asarray(x))
    x = check_probe_input(x)
    return np.ascontiguousarray(x.detach().cpu().numpy(), dtype=np.float32)


def uid(i: int) -> str:
    return f"reconviz/gate{i}"


def probe(prep: Prepared, x: np.ndarray) -> OnnxProbe:
    """Run the graph once on ``x`` and record the prior of every value-dependent gate."""
    model = ModelProto()
    model.CopyFrom(prep.model)
    graph = model.graph
    taps: list[str] = [prep.logits_name]
    for i in prep.gated:
        taps += [t for t in gate_for(graph.node[i].op_type).taps(graph.node[i], uid(i)) if t not in taps]
    frozen_names = prep.freezing.tensors(graph)
    taps += [t for t in frozen_names if t not in taps]
    present = {o.name for o in graph.output}
    int_taps = {t for i in prep.gated for t in gate_for(graph.node[i].op_type).index_taps(graph.node[i])}
    fetch = [t for t in taps if t != prep.input_name]  # a gate right on the input reads x itself
    for t in fetch:
        if t not in present:
            graph.output.append(helper.make_tensor_value_info(
                t, TensorProto.INT64 if t in int_taps else TensorProto.FLOAT, None))
    sess = session(model, "the probe graph")
    values = dict(zip(fetch, run(sess, x, fetch, "the probe graph")))
    values[prep.input_name] = x
    n = x.shape[0]
    logits = values[prep.logits_name].reshape(n, -1)
    if prep.fixed_batch is not None:
        _check_batch_rewrite(prep, x, logits)
    priors, problems = {}, []
    for i in prep.gated:
        node = graph.node[i]
        z = values[node.input[0]]
        name = node.name or f"#{i} {node.op_type}"
        if z.ndim == 0 or z.shape[0] != n:
            problems.append((name, node.op_type, f"its input of shape {z.shape} does not carry the batch "
                             f"({n} probes) in its first axis"))
            continue
        try:
            priors[i] = gate_for(node.op_type).record(node, values, prep.info, uid(i))
        except UnsupportedOperationError as e:
            problems.append((name, node.op_type, e.advice))
    frozen = _frozen(prep, sess, x, values, frozen_names, problems) if frozen_names else {}
    if problems:
        raise UnsupportedGraphError(problems)
    nbytes = sum(v.nbytes for v in values.values())
    return OnnxProbe(prep, x, logits, priors, nbytes, tuple(values[prep.logits_name].shape), frozen)


def _frozen(prep: Prepared, sess: Any, x: np.ndarray, values: dict[str, np.ndarray], names: list[str],
            problems: list) -> dict[tuple[int, int], NodePrior]:
    """The frozen edges' priors: each frozen tensor's value at x and its batch axis, found by a
    second run at 2N inputs (x twice); a tensor without one is a problem."""
    twice = dict(zip(names, run(sess, np.concatenate([x, x]), names, "the probe graph")))
    graph, out = prep.model.graph, {}
    for (k, slot), kind in sorted(prep.freezing.edges.items()):
        node, name = graph.node[k], graph.node[k].input[slot]
        axis = batch_axis(values[name], twice[name])
        where = node.name or f"#{k} {node.op_type}"
        if axis is None:
            problems.append((where, node.op_type, f"its {kind} '{name}' (frozen by the value rule) has no axis that "
                             "carries the batch (one that doubles with the batch, batch-major): reconviz cannot "
                             "tile it for a batch of inputs"))
            continue
        value = values[name]
        out[(k, slot)] = NodePrior(where, node.op_type, kind, tuple(value.shape),
                                   {"value": value, "axis": np.array(axis, np.int64)}, 0, False)
    return out


def _check_batch_rewrite(prep: Prepared, x: np.ndarray, logits: np.ndarray) -> None:
    """Compare the dynamic-batch graph with the original one run at its fixed batch size."""
    b, n = prep.fixed_batch, x.shape[0]
    sess = session(prep.original, "the original graph")
    rows = []
    for start in range(0, n, b):
        chunk = x[start:start + b]
        pad = np.concatenate([chunk, np.repeat(chunk[-1:], b - len(chunk), axis=0)]) if len(chunk) < b else chunk
        rows.append(run(sess, pad, [prep.logits_name], "the original graph")[0].reshape(b, -1)[:len(chunk)])
    ref = np.concatenate(rows)
    err = max_relative_error(logits, ref)
    if not err <= FLOAT32_TOLERANCE:
        raise InputError(
            f"the model's batch dimension is fixed at {b} and making it dynamic changed its outputs "
            f"(max relative error {err:.3g}): a node bakes the batch size in. Export the model with a "
            "dynamic batch axis (torch.onnx.export(..., dynamic_axes={'input': {0: 'batch'}}))"
        )


def max_relative_error(a: np.ndarray, ref: np.ndarray) -> float:
    """max |a - ref| / max(1, |ref|): the contract's relative error, on onnxruntime's arrays."""
    return float(relative_error(torch.from_numpy(np.asarray(a)), torch.from_numpy(np.asarray(ref))).max())
