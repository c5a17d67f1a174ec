"""ONNX gates: the torch gates of :mod:`reconviz.ops.gates` run on ONNX nodes.

There is one gate registry (:func:`reconviz.ops.gates.gate_for_onnx`): a gate
class owns its torch matching, its ONNX matching (``onnx_ops``, ``onnx_params``)
and its frozen math, written once in torch. This module holds only what is
ONNX-specific, by kind of gate rather than by op:

* which tensors the probe run returns (``taps``; MaxPool also gets its optional
  Indices output),
* ``record``: the prior from those tensors, computed by the torch gate
  (elementwise: :meth:`~reconviz.ops.gates.ElementwiseGate.prior_at` on the
  tapped tensor; MaxPool: its Indices, ties by
  :meth:`~reconviz.ops.gates.MaxPoolGate.pairwise_ties`),
* ``rewrite``: the node with the prior frozen, as plain ONNX nodes and
  initializers, affine in the gated tensor.

Frozen forms (D the recorded slope, C the recorded offset, probe n of N)::

    elementwise (Relu, ThresholdedRelu, Clip, LeakyRelu, PRelu, and any registered
    gate whose onnx_ops name the node's type)   ->  D * z + C     (Mul, Add)
    MaxPool(z)            ->  Gather(z, switches)  the recorded flat arg-max (MaxPool's Indices)
    ReduceMax(z, axes)    ->  Gather(z, switches)  the arg-max over the reduced axes (not the batch axis)
    GlobalMaxPool(z)      ->  Gather(z, switches)  the arg-max over each channel (ReduceMax over 2, 3, ...)

ReduceMax and GlobalMaxPool are the only ONNX-only gates (:data:`SWITCH_GATES`):
no torch gate freezes a max over whole axes, so their arg-max is taken here.

A batch of B = r * N inputs uses probe ``i % N``'s prior for input ``i``: the
gated tensor is viewed as (r, N, ...) and multiplied by the (N, ...) prior
(batch-broadcast), or gathered from the (r, N * size) view.

A gate's ``region_exact`` is the torch gate's: a piecewise-linear gate's frozen
form equals the op on the probe's whole linear region (region-exact); a smooth
gate frozen at a point labels the result point-exact.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from onnx import NodeProto, TensorProto, helper, numpy_helper

from ..errors import UnsupportedOperationError
from ..ops.gates import ElementwiseGate, Gate, MaxPoolGate, gate_for_onnx, registered_gates

if TYPE_CHECKING:  # pragma: no cover
    from .graph import GraphInfo

__all__ = ["NodePrior", "OnnxNode", "OnnxGate", "SWITCH_GATES", "gate_for", "gate_types"]


@dataclass
class NodePrior:
    """The prior of one gated ONNX node at the probe: the ONNX path's :class:`reconviz.Prior`
    (its tensors as numpy arrays, for the rewritten graph's initializers)."""

    node: str  # node name (or a generated one)
    op: str  # ONNX op type
    gate: str  # reconviz gate name, as in reconviz.gates ("relu", "clamp", ...)
    shape: tuple[int, ...]  # shape of the gated tensor at the probe (N, ...)
    tensors: dict[str, np.ndarray]
    ties: int = 0  # units exactly on a breakpoint, or pooling windows whose max is not unique
    region_exact: bool = True  # the gate's label when it was frozen

    def pattern(self) -> np.ndarray:
        """Each probe's choice as one row (N, -1): equal rows, same linear piece (comparable
        between runs of any batch size). Switches: the index within each sample."""
        n = self.shape[0]
        if "index" in self.tensors:
            return self.tensors["index"].reshape(n, -1) - np.arange(n)[:, None] * math.prod(self.shape[1:])
        slope = self.tensors["slope"]
        offset = self.tensors.get("offset", np.zeros_like(slope))
        return np.concatenate([slope.reshape(n, -1), offset.reshape(n, -1)], axis=1)


class GateError(UnsupportedOperationError):
    """A gate node reconviz cannot freeze (internal: becomes one of UnsupportedGraphError's nodes)."""

    def __init__(self, why: str):
        super().__init__("", "", why)


def _attr(node: NodeProto, name: str, default: Any = None) -> Any:
    for a in node.attribute:
        if a.name == name:
            return helper.get_attribute_value(a)
    return default


class OnnxNode:
    """An ONNX node as a torch gate's ``onnx_params`` reads it: attributes and constant inputs."""

    def __init__(self, node: NodeProto, consts: dict[str, np.ndarray]):
        self.proto, self.consts = node, consts
        self.op_type, self.name = node.op_type, node.name

    def attr(self, name: str, default: Any = None) -> Any:
        """Attribute ``name`` (ints, floats, lists, ...), or ``default`` when absent."""
        return _attr(self.proto, name, default)

    def const(self, i: int, what: str) -> np.ndarray | None:
        """A copy of the constant value of optional input i (None when absent; GateError when not
        constant)."""
        node = self.proto
        if len(node.input) <= i or not node.input[i]:
            return None
        if node.input[i] not in self.consts:
            raise GateError(f"its {what} ('{node.input[i]}') is not a constant (initializer or Constant node)")
        return np.array(self.consts[node.input[i]])


class OnnxGate:
    """How one kind of gate runs on ONNX nodes. ``gate``: the torch gate whose math it runs
    (None for the ONNX-only :data:`SWITCH_GATES`)."""

    name: str = ""
    region_exact: bool = True

    def __init__(self, gate: Gate | None = None):
        self.gate = gate
        if gate is not None:
            self.name, self.region_exact = gate.name, gate.region_exact

    def params(self, node: NodeProto, g: "GraphInfo") -> dict[str, Any]:
        """The torch gate's params for this node (its ``onnx_params``)."""
        try:
            return self.gate.onnx_params(OnnxNode(node, g.consts))
        except NotImplementedError as e:
            raise GateError(f"gate {self.name!r} lists {node.op_type} in its onnx_ops but defines no "
                            "onnx_params") from e

    def check(self, node: NodeProto, g: "GraphInfo") -> str | None:
        """Why the node cannot be frozen, or None."""
        try:
            self.params(node, g)
        except UnsupportedOperationError as e:
            return e.advice
        return None

    def taps(self, node: NodeProto, uid: str) -> list[str]:
        """Tensors the probe run returns for this node (may add an optional output to ``node``)."""
        return [node.input[0]]

    def index_taps(self, node: NodeProto) -> list[str]:
        """Which of :meth:`taps` are int64 (indices)."""
        return []

    def record(self, node: NodeProto, values: dict[str, np.ndarray], g: "GraphInfo", uid: str) -> NodePrior:
        raise NotImplementedError

    def rewrite(self, node: NodeProto, prior: NodePrior, uid: str) -> tuple[list[NodeProto], list[TensorProto]]:
        """Nodes and initializers that compute ``node.output[0]`` with the prior frozen."""
        raise NotImplementedError

    def frozen(self, node: NodeProto, uid: str, z: np.ndarray, tensors: dict[str, np.ndarray], ties: int) -> NodePrior:
        return NodePrior(node.name or uid, node.op_type, self.name, tuple(z.shape), tensors, ties, self.region_exact)


# --------------------------------------------------------------------------
# Elementwise gates: phi(z) -> D * z + C, the torch gate's prior_at on the tapped z
# --------------------------------------------------------------------------


class Elementwise(OnnxGate):
    """An :class:`~reconviz.ops.gates.ElementwiseGate` on a node: D, C and the ties are the
    torch gate's :meth:`~reconviz.ops.gates.ElementwiseGate.prior_at` of the tapped z."""

    def record(self, node, values, g, uid):
        z = values[node.input[0]]
        tensors, ties = self.gate.prior_at(torch.from_numpy(z), self.params(node, g))
        arrays = {k: np.ascontiguousarray(v.numpy()) for k, v in tensors.items()}
        if "offset" in arrays and not arrays["offset"].any():
            del arrays["offset"]  # C = 0: a Mul alone
        return self.frozen(node, uid, z, arrays, int(ties))

    def rewrite(self, node, prior, uid):
        return per_probe_affine(node.input[0], node.output[0], prior.tensors["slope"],
                                prior.tensors.get("offset"), uid)


class NoOnnxForm(OnnxGate):
    """A registered gate with ``onnx_ops`` that is neither elementwise nor max pooling."""

    def check(self, node, g):
        return (f"gate {self.name!r} ({type(self.gate).__name__}) lists {node.op_type} in its onnx_ops, but "
                "reconviz.onnx freezes only elementwise gates (ElementwiseGate) and max pooling (MaxPoolGate)")


# --------------------------------------------------------------------------
# Max pooling: gather at the recorded switches
# --------------------------------------------------------------------------


class SwitchGate(OnnxGate):
    """A max over windows or axes, frozen as a gather at the recorded switches: ``index``,
    flat over the whole (N, ...) gated tensor (the position in the (N * size) view of one
    group of N samples), and ``out_shape``, the output's shape at the probe."""

    def rewrite(self, node, prior, uid):
        return per_probe_gather(node.input[0], node.output[0], prior.shape, prior.tensors["index"],
                                tuple(prior.tensors["out_shape"][1:]), uid)


class MaxPool(SwitchGate):
    """MaxPool (any kernel, strides, pads, auto_pad, dilations, ceil_mode) with the torch
    :class:`~reconviz.ops.gates.MaxPoolGate`'s windows. The prior is the node's optional
    Indices output: flat over the whole (N, C, *spatial) input, exactly the position in
    the (N * C * prod spatial) view of one group of N samples, so one Gather does it."""

    def params(self, node, g):
        if len(node.output) > 1 and node.output[1] and node.output[1] in g.used:
            raise GateError("its Indices output is used by other nodes (e.g. MaxUnpool)")
        return super().params(node, g)

    def taps(self, node, uid):
        if len(node.output) < 2 or not node.output[1]:
            del node.output[1:]
            node.output.append(f"{uid}/indices")
        return [node.input[0], node.output[1], node.output[0]]

    def index_taps(self, node):
        return [node.output[1]]

    def record(self, node, values, g, uid):
        z, idx, y = values[node.input[0]], values[node.output[1]], values[node.output[0]]
        space = tuple(z.shape[2:])
        p = self.params(node, g)
        p.update(padding=leading_pads(node, p, space, tuple(y.shape[2:])), in_spatial=space)
        switch = idx % math.prod(space)  # (N, C, *out spatial), flat within each (sample, channel)
        ties = self.gate.pairwise_ties(torch.from_numpy(z), torch.from_numpy(switch), p)
        return self.frozen(node, uid, z, {"index": idx.astype(np.int64),
                                          "out_shape": np.array(y.shape, dtype=np.int64)}, ties)


def leading_pads(node: NodeProto, p: dict, space: tuple[int, ...], out: tuple[int, ...]) -> tuple[int, ...]:
    """The pad before each spatial axis of a MaxPool node with the gate's params ``p``
    (its ``pads``), after ``auto_pad``; ``space``, ``out``: the input's, the output's spatial shape.

    Window o of axis d covers input positions o * stride - pad + j * dilation, j < kernel
    (ceil_mode only adds windows, and they are in ``out``); ``auto_pad`` SAME_* pads
    (out - 1) * stride + (kernel - 1) * dilation + 1 - in in all, the odd one at the end
    (SAME_UPPER) or the start (SAME_LOWER)."""
    auto = _attr(node, "auto_pad", b"NOTSET")
    auto = auto.decode() if isinstance(auto, bytes) else auto
    if auto == "VALID":
        return (0,) * len(space)
    if auto not in ("SAME_UPPER", "SAME_LOWER"):
        return p["padding"]
    total = [max(0, (o - 1) * s + (w - 1) * d + 1 - i)
             for o, s, w, d, i in zip(out, p["stride"], p["kernel_size"], p["dilation"], space)]
    return tuple(t // 2 if auto == "SAME_UPPER" else t - t // 2 for t in total)


class ReduceMax(SwitchGate):
    """ReduceMax(z, axes; keepdims): the arg-max over the reduced axes, which must leave the
    batch axis alone (the torch.export-based exporter writes it for adaptive_max_pool(z, 1)
    and amax). Axes come from input 1 (opset >= 18) or the ``axes`` attribute. ONNX-only:
    no torch gate freezes a max over whole axes."""

    name = "max_pool"

    def params(self, node, g):
        view = OnnxNode(node, g.consts)
        axes = view.const(1, "axes")
        axes = view.attr("axes", []) if axes is None else axes.astype(np.int64).reshape(-1).tolist()
        if not axes and view.attr("noop_with_empty_axes", 0):
            raise GateError("noop_with_empty_axes=1 without axes (an identity) is not supported")
        return {"axes": list(axes), "keepdims": bool(view.attr("keepdims", 1))}

    def reduced(self, p: dict, ndim: int) -> list[int]:
        axes = sorted({int(a) % ndim for a in p["axes"]}) if p["axes"] else list(range(ndim))
        if 0 in axes:
            raise GateError("it reduces over the batch axis (axis 0): the probes would mix")
        return axes

    def record(self, node, values, g, uid):
        z = values[node.input[0]]
        p = self.params(node, g)
        axes = self.reduced(p, z.ndim)
        index, ties = argmax_switches(z, axes)
        if p["keepdims"]:
            index = np.expand_dims(index, tuple(axes))
        return self.frozen(node, uid, z, {"index": index, "out_shape": np.array(index.shape, dtype=np.int64)}, ties)


class GlobalMaxPool(ReduceMax):
    """GlobalMaxPool: ReduceMax over every spatial axis (2, 3, ...), dimensions kept."""

    def params(self, node, g):
        return {"axes": [], "keepdims": True}

    def reduced(self, p, ndim):
        return list(range(2, ndim))


def argmax_switches(z: np.ndarray, axes: list[int]) -> tuple[np.ndarray, int]:
    """(flat indices into the whole ``z`` of the max over ``axes``, shaped like z without
    them; the number of those maxima that are not unique)."""
    kept = [a for a in range(z.ndim) if a not in axes]
    moved = np.transpose(z, kept + axes)
    flat = moved.reshape(moved.shape[:len(kept)] + (-1,))
    arg = flat.argmax(axis=-1)
    ties = int(np.count_nonzero((flat == flat.max(axis=-1, keepdims=True)).sum(axis=-1) > 1))
    coords = dict(zip(kept, np.indices(arg.shape)))
    coords.update(zip(axes, np.unravel_index(arg, [z.shape[a] for a in axes])))
    return np.ravel_multi_index([coords[a] for a in range(z.ndim)], z.shape).astype(np.int64), ties


# --------------------------------------------------------------------------
# Lookup: the registered torch gates first, then the ONNX-only switch gates
# --------------------------------------------------------------------------

SWITCH_GATES: dict[str, OnnxGate] = {"ReduceMax": ReduceMax(), "GlobalMaxPool": GlobalMaxPool()}


def gate_for(op_type: str) -> OnnxGate | None:
    """The gate of ONNX op type ``op_type``: the registered torch gate that lists it in its
    ``onnx_ops`` (run by kind), else an ONNX-only switch gate; None: not a gate."""
    gate = gate_for_onnx(op_type)
    if gate is None:
        return SWITCH_GATES.get(op_type)
    if isinstance(gate, ElementwiseGate):
        return Elementwise(gate)
    return MaxPool(gate) if isinstance(gate, MaxPoolGate) else NoOnnxForm(gate)


def gate_types() -> list[str]:
    """Every ONNX op type frozen as a gate now (registered gates first)."""
    names = dict.fromkeys(op for g in registered_gates() for op in g.onnx_ops if gate_for_onnx(op) is g)
    return list(names) + [op for op in SWITCH_GATES if op not in names]


# --------------------------------------------------------------------------
# Frozen forms as ONNX nodes (batch-broadcast over r * N inputs)
# --------------------------------------------------------------------------


def _shape(name: str, dims: tuple[int, ...]) -> TensorProto:
    return numpy_helper.from_array(np.array(dims, dtype=np.int64), name)


def per_probe_affine(z: str, out: str, slope: np.ndarray, offset: np.ndarray | None,
                     uid: str) -> tuple[list[NodeProto], list[TensorProto]]:
    """out = slope * z + offset, input i of a batch of r * N using probe i % N's (N, ...) prior."""
    n, sample = slope.shape[0], tuple(slope.shape[1:])
    inits = [numpy_helper.from_array(slope, f"{uid}/slope")]
    nodes = []
    src = z
    if n > 1:
        inits.append(_shape(f"{uid}/grouped", (-1, n) + sample))
        nodes.append(helper.make_node("Reshape", [z, f"{uid}/grouped"], [f"{uid}/z"], name=f"{uid}/group"))
        src = f"{uid}/z"
    last = out if n == 1 and offset is None else f"{uid}/scaled"
    nodes.append(helper.make_node("Mul", [src, f"{uid}/slope"], [last], name=f"{uid}/mul"))
    if offset is not None:
        inits.append(numpy_helper.from_array(offset, f"{uid}/offset"))
        shifted = out if n == 1 else f"{uid}/shifted"
        nodes.append(helper.make_node("Add", [last, f"{uid}/offset"], [shifted], name=f"{uid}/add"))
        last = shifted
    if n > 1:
        inits.append(_shape(f"{uid}/ungrouped", (-1,) + sample))
        nodes.append(helper.make_node("Reshape", [last, f"{uid}/ungrouped"], [out], name=f"{uid}/ungroup"))
    return nodes, inits


def per_probe_gather(z: str, out: str, z_shape: tuple[int, ...], index: np.ndarray, out_sample: tuple[int, ...],
                     uid: str) -> tuple[list[NodeProto], list[TensorProto]]:
    """out = z viewed as (r, N * size) gathered at the flat switches, viewed as (r * N, *out_sample)."""
    group = int(np.prod(z_shape))
    inits = [
        _shape(f"{uid}/flat", (-1, group)),
        numpy_helper.from_array(np.ascontiguousarray(index.reshape(-1), dtype=np.int64), f"{uid}/switches"),
        _shape(f"{uid}/unflat", (-1,) + tuple(int(d) for d in out_sample)),
    ]
    nodes = [
        helper.make_node("Reshape", [z, f"{uid}/flat"], [f"{uid}/z"], name=f"{uid}/flatten"),
        helper.make_node("Gather", [f"{uid}/z", f"{uid}/switches"], [f"{uid}/picked"], axis=1,
                         name=f"{uid}/gather"),
        helper.make_node("Reshape", [f"{uid}/picked", f"{uid}/unflat"], [out], name=f"{uid}/unflatten"),
    ]
    return nodes, inits
