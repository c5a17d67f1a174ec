"""The ONNX gate registry: the one place that knows every input-dependent ONNX op.

The ONNX counterpart of :mod:`reconviz.gates`. Each gate knows how to

* ``check`` a node (its parameters must be constants reconviz can read),
* name the tensors the probe run must return (``taps``; MaxPool also gets its
  optional Indices output),
* ``record`` the prior from those tensors at the probe,
* ``rewrite`` the node with the prior frozen, as plain ONNX nodes and
  initializers, affine in the gated tensor.

Frozen forms (D the recorded slope, C the recorded offset, probe n of N)::

    Relu(z)               ->  D * z               D = 1[z > 0]
    ThresholdedRelu(z; a) ->  D * z               D = 1[z > a]   (alpha a, default 1.0)
    Clip(z, lo, hi)       ->  D * z + C           D = 1[lo < z < hi], C = lo 1[z <= lo] + hi 1[z >= hi]
    LeakyRelu(z; a)       ->  D * z               D = 1 if z > 0 else a
    PRelu(z, a)           ->  D * z               D = 1 if z > 0 else a (broadcast)
    MaxPool(z)            ->  Gather(z, switches)  the recorded flat arg-max (MaxPool's Indices)
    ReduceMax(z, axes)    ->  Gather(z, switches)  the arg-max over the reduced axes (not the batch axis)
    GlobalMaxPool(z)      ->  Gather(z, switches)  the arg-max over each channel (ReduceMax over 2, 3, ...)

A batch of B = r * N inputs uses probe ``i % N``'s prior for input ``i``: the
gated tensor is viewed as (r, N, ...) and multiplied by the (N, ...) prior
(batch-broadcast), or gathered from the (r, N * size) view. Adding an op =
adding one class here and listing it in :data:`ONNX_GATES`.

Every gate here is piecewise linear (``region_exact``): its frozen form equals
the op on the probe's whole linear region, so the reconstruction is
region-exact. A gate frozen at a point only (a smooth one) would set
``region_exact = False``, and the result would be labelled point-exact.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from onnx import NodeProto, TensorProto, helper, numpy_helper

from ..gates import gate_named

if TYPE_CHECKING:  # pragma: no cover
    from .graph import GraphInfo

__all__ = ["Frozen", "OnnxGate", "ONNX_GATES", "gate_for"]


@dataclass
class Frozen:
    """The prior of one gated node at the probe."""

    node: str  # node name (or a generated one)
    op: str  # ONNX op type
    gate: str  # reconviz gate name, as in reconviz.gates ("relu", "clamp", ...)
    shape: tuple[int, ...]  # shape of the gated tensor at the probe (N, ...)
    tensors: dict[str, np.ndarray]
    ties: int = 0  # units exactly on a breakpoint, or pooling windows whose max is not unique


class GateError(Exception):
    """A gate node whose parameters reconviz cannot read (internal; becomes a listed problem)."""


def _attr(node: NodeProto, name: str, default: Any = None) -> Any:
    for a in node.attribute:
        if a.name == name:
            return helper.get_attribute_value(a)
    return default


def _const_input(node: NodeProto, i: int, g: "GraphInfo", what: str) -> np.ndarray | None:
    """The constant value of optional input i (None when absent)."""
    if len(node.input) <= i or not node.input[i]:
        return None
    if node.input[i] not in g.consts:
        raise GateError(f"its {what} ('{node.input[i]}') is not a constant (initializer or Constant node)")
    return np.asarray(g.consts[node.input[i]], dtype=np.float64)


class OnnxGate:
    """Base class: one subclass per gated ONNX op type."""

    op_type: str = ""
    name: str = ""
    region_exact: bool = True  # piecewise linear: the frozen form holds on the probe's whole region

    def params(self, node: NodeProto, g: "GraphInfo") -> dict[str, Any]:
        return {}

    def check(self, node: NodeProto, g: "GraphInfo") -> str | None:
        """Why the node cannot be frozen, or None."""
        try:
            self.params(node, g)
        except GateError as e:
            return str(e)
        return None

    def taps(self, node: NodeProto, uid: str) -> list[str]:
        """Tensors the probe run returns for this node (may add an optional output to ``node``)."""
        return [node.input[0]]

    def record(self, node: NodeProto, values: dict[str, np.ndarray], g: "GraphInfo", uid: str) -> Frozen:
        raise NotImplementedError

    def rewrite(self, node: NodeProto, prior: Frozen, uid: str) -> tuple[list[NodeProto], list[TensorProto]]:
        """Nodes and initializers that compute ``node.output[0]`` with the prior frozen."""
        raise NotImplementedError

    def pattern(self, prior: Frozen) -> np.ndarray:
        """Each probe's choice as one row (N, -1): equal rows, same linear piece (comparable
        between runs of any batch size)."""
        raise NotImplementedError


# --------------------------------------------------------------------------
# Elementwise gates: phi(z) -> D * z + C
# --------------------------------------------------------------------------


class ElementwiseGate(OnnxGate):
    def slope_offset(self, z: np.ndarray, p: dict) -> tuple[np.ndarray, np.ndarray | None]:
        raise NotImplementedError

    def breakpoints(self, p: dict) -> list[np.ndarray]:
        return [np.zeros(())]

    def record(self, node, values, g, uid):
        z = values[node.input[0]]
        p = self.params(node, g)
        slope, offset = self.slope_offset(z, p)
        tensors = {"slope": np.ascontiguousarray(slope, dtype=np.float32)}
        if offset is not None and np.any(offset):
            tensors["offset"] = np.ascontiguousarray(offset, dtype=np.float32)
        ties = int(sum(np.count_nonzero(z == np.float32(b)) for b in self.breakpoints(p)))
        return Frozen(node.name or uid, node.op_type, self.name, tuple(z.shape), tensors, ties)

    def rewrite(self, node, prior, uid):
        return per_probe_affine(node.input[0], node.output[0], prior.tensors["slope"],
                                prior.tensors.get("offset"), uid)

    def pattern(self, prior):
        slope = prior.tensors["slope"]
        offset = prior.tensors.get("offset", np.zeros_like(slope))
        return np.concatenate([slope.reshape(len(slope), -1), offset.reshape(len(slope), -1)], axis=1)


class ThresholdedRelu(ElementwiseGate):
    """ThresholdedRelu(z; alpha) = z if z > alpha else 0 (alpha default 1.0): torch's
    F.threshold(z, alpha, 0)."""

    op_type, name = "ThresholdedRelu", "threshold"

    def params(self, node, g):
        return {"alpha": np.float32(_attr(node, "alpha", 1.0))}

    def slope_offset(self, z, p):
        return z > p["alpha"], None

    def breakpoints(self, p):
        return [p["alpha"]]


class Relu(ThresholdedRelu):
    """Relu(z): ThresholdedRelu with alpha = 0."""

    op_type, name = "Relu", "relu"

    def params(self, node, g):
        return {"alpha": np.float32(0)}


class Clip(ElementwiseGate):
    """Clip(z, lo, hi): bounds from inputs 1, 2 (opset >= 11) or attributes min, max (older)."""

    op_type, name = "Clip", "clamp"

    def params(self, node, g):
        lo = _const_input(node, 1, g, "min")
        hi = _const_input(node, 2, g, "max")
        lo = lo if lo is not None else _attr(node, "min")
        hi = hi if hi is not None else _attr(node, "max")
        return {"lo": None if lo is None else np.float32(lo), "hi": None if hi is None else np.float32(hi)}

    def slope_offset(self, z, p):
        lo, hi = p["lo"], p["hi"]
        inside = np.ones(z.shape, dtype=bool)
        offset = np.zeros(z.shape, dtype=np.float32)
        if lo is not None:
            inside &= z > lo
            offset = np.where(z <= lo, lo, offset)
        if hi is not None:
            inside &= z < hi
            offset = np.where(z >= hi, hi, offset)
        return inside, offset

    def breakpoints(self, p):
        return [b for b in (p["lo"], p["hi"]) if b is not None]


class LeakyRelu(ElementwiseGate):
    op_type, name = "LeakyRelu", "leaky_relu"

    def params(self, node, g):
        return {"a": np.float32(_attr(node, "alpha", 0.01))}

    def slope_offset(self, z, p):
        return np.where(z > 0, np.float32(1), p["a"]), None


class PRelu(ElementwiseGate):
    op_type, name = "PRelu", "prelu"

    def params(self, node, g):
        a = _const_input(node, 1, g, "slope")
        if a is None:
            raise GateError("it has no slope input")
        return {"a": a.astype(np.float32)}

    def slope_offset(self, z, p):
        try:
            a = np.broadcast_to(p["a"], z.shape)
        except ValueError as e:
            raise GateError(f"its slope of shape {p['a'].shape} does not broadcast to {z.shape}") from e
        return np.where(z > 0, np.float32(1), a), None


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

    def pattern(self, prior):
        n, size = prior.shape[0], math.prod(prior.shape[1:])
        return prior.tensors["index"].reshape(n, -1) - np.arange(n)[:, None] * size  # within each sample


class MaxPool(SwitchGate):
    """MaxPool (any kernel, strides, pads, dilations, ceil_mode). The prior is its optional
    Indices output: flat over the whole (N, C, *spatial) input, exactly the position in
    the (N * C * prod spatial) view of one group of N samples, so one Gather does it."""

    op_type, name = "MaxPool", "max_pool"

    def params(self, node, g):
        if _attr(node, "storage_order", 0) != 0:
            raise GateError("storage_order=1 (column-major indices) is not supported")
        if len(node.output) > 1 and node.output[1] and node.output[1] in g.used:
            raise GateError("its Indices output is used by other nodes (e.g. MaxUnpool)")
        return {}

    def taps(self, node, uid):
        if len(node.output) < 2 or not node.output[1]:
            del node.output[1:]
            node.output.append(f"{uid}/indices")
        return [node.input[0], node.output[1], node.output[0]]

    def record(self, node, values, g, uid):
        z, idx, y = values[node.input[0]], values[node.output[1]], values[node.output[0]]
        return Frozen(node.name or uid, node.op_type, self.name, tuple(z.shape),
                      {"index": idx.astype(np.int64), "out_shape": np.array(y.shape, dtype=np.int64)},
                      window_ties(z, idx, y, *pool_geometry(node, z.shape, y.shape)))


def pool_geometry(node: NodeProto, z_shape: tuple[int, ...], y_shape: tuple[int, ...]) -> tuple[list[int], ...]:
    """(kernel, strides, leading pads, dilations) of a MaxPool node, per spatial axis.

    Window o of axis d covers input positions o * stride - pad + j * dilation, j < kernel
    (ceil_mode only adds windows, and they are in ``y_shape``); ``auto_pad`` SAME_* pads
    (out - 1) * stride + (kernel - 1) * dilation + 1 - in in all, the odd one at the end
    (SAME_UPPER) or the start (SAME_LOWER)."""
    k = len(z_shape) - 2
    kernel = list(_attr(node, "kernel_shape"))
    strides = list(_attr(node, "strides", [1] * k))
    dilations = list(_attr(node, "dilations", [1] * k))
    auto = _attr(node, "auto_pad", b"NOTSET")
    auto = auto.decode() if isinstance(auto, bytes) else auto
    if auto in ("SAME_UPPER", "SAME_LOWER"):
        total = [max(0, (o - 1) * s + (w - 1) * d + 1 - i)
                 for o, s, w, d, i in zip(y_shape[2:], strides, kernel, dilations, z_shape[2:])]
        begin = [t // 2 if auto == "SAME_UPPER" else t - t // 2 for t in total]
    else:
        begin = list(_attr(node, "pads", [0] * 2 * k))[:k] if auto != "VALID" else [0] * k
    return kernel, strides, begin, dilations


def window_ties(z: np.ndarray, idx: np.ndarray, y: np.ndarray, kernel: list[int], strides: list[int],
                begin: list[int], dilations: list[int]) -> int:
    """Windows in which a member other than the switch equals the max, counted by the torch
    path's pairwise rule (:meth:`reconviz.gates.MaxPoolGate.pairwise_ties`). ``idx`` is
    MaxPool's Indices, flat over the whole (N, C, *spatial) z."""
    space = tuple(z.shape[2:])
    switch = idx % math.prod(space)  # (N, C, *out spatial), flat within each (sample, channel)
    p = {"k": len(space), "adaptive": False, "kernel_size": tuple(kernel), "stride": tuple(strides),
         "padding": tuple(begin), "dilation": tuple(dilations), "in_spatial": space}
    return gate_named("max_pool").pairwise_ties(torch.from_numpy(z), torch.from_numpy(switch), p)


class ReduceMax(SwitchGate):
    """ReduceMax(z, axes; keepdims): the arg-max over the reduced axes, which must leave the
    batch axis alone (the torch.export-based exporter writes it for adaptive_max_pool(z, 1)
    and amax). Axes come from input 1 (opset >= 18) or the ``axes`` attribute."""

    op_type, name = "ReduceMax", "max_pool"

    def params(self, node, g):
        axes = _const_input(node, 1, g, "axes")
        axes = _attr(node, "axes", []) if axes is None else axes.astype(np.int64).reshape(-1).tolist()
        if not axes and _attr(node, "noop_with_empty_axes", 0):
            raise GateError("noop_with_empty_axes=1 without axes (an identity) is not supported")
        return {"axes": list(axes), "keepdims": bool(_attr(node, "keepdims", 1))}

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
        return Frozen(node.name or uid, node.op_type, self.name, tuple(z.shape),
                      {"index": index, "out_shape": np.array(index.shape, dtype=np.int64)}, ties)


class GlobalMaxPool(ReduceMax):
    """GlobalMaxPool: ReduceMax over every spatial axis (2, 3, ...), dimensions kept."""

    op_type = "GlobalMaxPool"

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


ONNX_GATES: dict[str, OnnxGate] = {g.op_type: g for g in (Relu(), ThresholdedRelu(), Clip(), LeakyRelu(), PRelu(),
                                                           MaxPool(), ReduceMax(), GlobalMaxPool())}


def gate_for(op_type: str) -> OnnxGate | None:
    return ONNX_GATES.get(op_type)


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
