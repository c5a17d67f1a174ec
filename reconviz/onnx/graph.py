"""ONNX stage 0 — the graph: a checked working copy, its input, its logits, its ops.

Everything here runs before onnxruntime does (no heavy work), on a copy: the
user's ``ModelProto`` is never modified.

A tensor is *value-dependent* when its value depends on the values of the
input x (``Shape``/``Size`` depend only on x's shape, so shape arithmetic for
reshape targets is constant). A reconstruction exists when every
value-dependent node is either

* affine in its value-dependent inputs (:data:`AFFINE`: Conv, Gemm, Add, ...),
  with the inputs it is not affine in (weights, shapes, pads) constant, or
* a gate, whose input-dependent choice is frozen at the probe: a registered
  gate of :mod:`reconviz.ops.gates` that lists the op type in its ``onnx_ops``
  (Relu, ThresholdedRelu, Clip, LeakyRelu, PRelu, MaxPool; under the value rule
  Sigmoid, Tanh, Erf, Softplus, Elu/Selu/Celu, HardSigmoid, HardSwish, Gelu, Mish;
  and what the user registers), or ReduceMax, GlobalMaxPool (:mod:`reconviz.onnx.gates`), or
* a product or division whose gate factor or divisor the value rule freezes
  (:mod:`reconviz.onnx.freeze`: squeeze-excitation, attention, the decomposed
  LayerNorm; ``LayerNormalization`` is expanded to that form first). Nodes that only
  feed frozen factors or divisors are not part of g and are not classified.

The gate registry is looked up first, so a registered gate takes an op type that
would otherwise be refused (Shrink for a hardshrink gate, say).

:func:`prepare` finds every node that is neither and raises one
:class:`UnsupportedGraphError` that lists them all.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import onnx
from onnx import ModelProto, NodeProto, TensorProto, helper, numpy_helper

from ..errors import InputError, UnsupportedOperationError
from ..export import IR_VERSION, OPSET, make_model  # noqa: F401  (re-exported: the graphs reconviz writes)
from .freeze import Freezing, expand_layer_norms, plan
from .gates import _attr, gate_for, gate_types

__all__ = ["Prepared", "prepare", "load_model", "UnsupportedGraphError", "AFFINE", "LOGITS", "IR_VERSION"]

LOGITS = ("auto", "output")  # or the name of a tensor in the graph
FLOAT_TYPES = {TensorProto.FLOAT, TensorProto.DOUBLE, TensorProto.FLOAT16, TensorProto.BFLOAT16}


class UnsupportedGraphError(UnsupportedOperationError):
    """The graph has nodes that cannot be frozen into an affine map.

    ``nodes`` lists every one as ``(name, op_type, reason)``; ``operation`` and
    ``module_path`` are the first one's op type and node name.
    """

    def __init__(self, nodes: list[tuple[str, str, str]]):
        self.nodes = nodes
        name, op, why = nodes[0]
        lines = "; ".join(f"node '{n}' ({o}): {w}" for n, o, w in nodes)
        super().__init__(op, name, (
            f"{why}. The ONNX graph has {len(nodes)} node(s) reconviz cannot freeze into an affine map: "
            f"{lines}. reconviz.onnx reconstructs graphs of affine ops and gates ({', '.join(gate_types())}), "
            "with gate factors (squeeze-excitation, attention) and divisors (LayerNorm) frozen at their "
            "values; cut the graph before these nodes with logits='<tensor name>', or replace them"))


# --------------------------------------------------------------------------
# Affine ops: which inputs may carry the input's values
# --------------------------------------------------------------------------

Rule = Callable[[NodeProto, list[bool], "GraphInfo"], "str | None"]


def _first_only(node: NodeProto, dep: list[bool], g: "GraphInfo") -> str | None:
    """Linear in input 0; every other input (weights, shapes, pads, axes) constant."""
    if any(dep[1:]):
        return "an input other than the first (weights, shape, pads or axes) depends on the input's values"
    return None


def _any(node: NodeProto, dep: list[bool], g: "GraphInfo") -> str | None:
    """Sums and concatenations: affine in all inputs together."""
    return None


def _at_most_one(node: NodeProto, dep: list[bool], g: "GraphInfo") -> str | None:
    """Products: linear in each factor, so affine only if one factor depends on the input."""
    if sum(dep[:2]) > 1 or (node.op_type == "Einsum" and sum(dep) > 1):
        return "multiplies two tensors that both depend on the input (bilinear, not affine)"
    return None


def _where(node: NodeProto, dep: list[bool], g: "GraphInfo") -> str | None:
    return "its condition depends on the input's values" if dep[0] else None


def _cast(node: NodeProto, dep: list[bool], g: "GraphInfo") -> str | None:
    to = _attr(node, "to", TensorProto.FLOAT)
    if to not in FLOAT_TYPES:
        return f"casts input-dependent values to {TensorProto.DataType.Name(to)} (rounds: not affine)"
    return None


def _inference_only(node: NodeProto, dep: list[bool], g: "GraphInfo") -> str | None:
    why = _first_only(node, dep, g)
    if why:
        return why
    if node.op_type == "BatchNormalization" and (_attr(node, "training_mode", 0) or len(node.output) > 1):
        return "BatchNormalization in training mode normalizes by batch statistics; export in eval mode"
    if node.op_type == "Dropout" and len(node.input) > 2 and node.input[2]:
        mode = g.consts.get(node.input[2])
        if mode is None or bool(np.asarray(mode).reshape(-1)[0]):
            return "Dropout with training_mode not constant False is random; export in eval mode"
    return None


AFFINE: dict[str, Rule] = {
    **{op: _first_only for op in (
        "Conv", "ConvTranspose", "Reshape", "Flatten", "Transpose", "Squeeze", "Unsqueeze", "Slice", "Pad",
        "Gather", "Identity", "GlobalAveragePool", "AveragePool", "ReduceMean", "ReduceSum", "Expand",
        "Tile", "Resize", "Upsample", "DepthToSpace", "SpaceToDepth", "Split", "Neg", "Div", "GatherND",
        "GatherElements",
    )},
    **{op: _any for op in ("Add", "Sub", "Sum", "Mean", "Concat")},
    **{op: _at_most_one for op in ("Mul", "MatMul", "Gemm", "Einsum")},
    "Where": _where,
    "Cast": _cast,
    "BatchNormalization": _inference_only,
    "Dropout": _inference_only,
}

_SMOOTH = ("Sigmoid Tanh Exp Log Sqrt Pow Reciprocal Erf Gelu Elu Selu Celu Softplus Softsign Mish "
           "HardSigmoid HardSwish Sin Cos Tan Atan Asin Acos Sinh Cosh").split()
_NORM = ("LayerNormalization InstanceNormalization GroupNormalization LRN LpNormalization "
         "MeanVarianceNormalization").split()
_SELECT = ("Softmax LogSoftmax Hardmax Max Min ArgMax ArgMin ReduceMin ReduceL1 ReduceL2 "
           "ReduceLogSum ReduceLogSumExp ReduceSumSquare ReduceProd TopK Abs Sign Floor Ceil Round Mod "
           "Equal Greater GreaterOrEqual Less LessOrEqual Not And Or Xor NonZero MaxUnpool MaxRoiPool "
           "LpPool Shrink CumSum").split()
_FLOW = "If Loop Scan".split()
_RANDOM = "RandomNormal RandomUniform RandomNormalLike RandomUniformLike Bernoulli Multinomial".split()

ADVICE = {
    **{op: "a smooth non-linearity with no frozen form (only on the way into a frozen gate factor or "
           "divisor, e.g. the Sqrt of a LayerNorm's divisor, may it appear)" for op in _SMOOTH},
    **{op: "normalization divides by an input-dependent statistic (not affine)" for op in _NORM},
    **{op: "its result depends on the input in a way reconviz cannot freeze" for op in _SELECT},
    "Softmax": "a softmax is frozen only as a factor that multiplies another input-dependent tensor "
               "(attention weights); here its output is added or returned (a final Softmax is stepped "
               "over with logits='auto')",
    **{op: "control flow (subgraphs) is not supported; export the model without it" for op in _FLOW},
    **{op: "random: the graph is not a function of its input" for op in _RANDOM},
}


# --------------------------------------------------------------------------
# Graph facts
# --------------------------------------------------------------------------


@dataclass
class GraphInfo:
    """Constants (initializers and Constant nodes), consumed names, value-dependent tensors."""

    consts: dict[str, np.ndarray]
    used: set[str]
    dependent: set[str]


@dataclass
class Prepared:
    """The working copy, pruned to the logits, with a dynamic batch dimension."""

    model: ModelProto
    input_name: str
    logits_name: str
    sample_shape: tuple[int, ...]
    info: GraphInfo
    gated: list[int]  # indices into model.graph.node of the value-dependent gates
    source: str
    notes: list[str] = field(default_factory=list)
    fixed_batch: int | None = None  # the model's fixed batch size, before the rewrite
    original: ModelProto | None = None  # pruned copy with the fixed batch (reference runs)
    freezing: Freezing = field(default_factory=lambda: Freezing({}, set()))  # the value rule's frozen edges


def load_model(model: "str | os.PathLike | bytes | ModelProto") -> tuple[ModelProto, str]:
    """A checked copy of ``model`` (a path, serialized bytes or a ModelProto) and its description."""
    if isinstance(model, ModelProto):
        proto, source = ModelProto(), f"ModelProto '{model.graph.name or 'graph'}'"
        proto.CopyFrom(model)
    elif isinstance(model, (bytes, bytearray)):
        proto, source = _parse(bytes(model), "the given bytes"), "serialized ModelProto"
    elif isinstance(model, (str, os.PathLike)):
        path = Path(model)
        if not path.is_file():
            raise InputError(f"ONNX model file not found: {path}")
        proto, source = _parse(path.read_bytes(), str(path)), str(path)
    else:
        hint = (" (a PyTorch model: use reconviz.reconstruct, or export it with reconviz.onnx.export_torch)"
                if hasattr(model, "state_dict") else "")
        raise InputError(f"model must be an ONNX file path or an onnx.ModelProto, got {type(model).__name__}{hint}")
    try:
        onnx.checker.check_model(proto)
    except Exception as e:  # noqa: BLE001 - the checker raises ValidationError and others
        raise InputError(f"{source} is not a valid ONNX model ({' '.join(str(e).split())[:300]}); "
                         "re-export it, or run onnx.checker.check_model on it to see where") from e
    return proto, source


def _parse(data: bytes, where: str) -> ModelProto:
    proto = ModelProto()
    try:
        proto.ParseFromString(data)
    except Exception as e:  # noqa: BLE001 - protobuf's DecodeError
        raise InputError(f"{where} is not an ONNX model (cannot parse the protobuf: {e})") from e
    if not proto.graph.node:
        raise InputError(f"{where} is not an ONNX model (no graph nodes)")
    return proto


def constants(graph: onnx.GraphProto) -> dict[str, np.ndarray]:
    """Values of initializers and Constant nodes, by tensor name."""
    out = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
    for node in graph.node:
        if node.op_type == "Constant" and node.attribute:
            a = node.attribute[0]
            v = helper.get_attribute_value(a)
            out[node.output[0]] = numpy_helper.to_array(v) if isinstance(v, TensorProto) else np.asarray(v)
    return out


def dependent_tensors(graph: onnx.GraphProto, input_name: str,
                      frozen: Any = ()) -> set[str]:
    """Tensors whose values depend on the input's values (nodes are in topological order);
    ``frozen``: (node index, input slot) edges that carry a constant (the value rule's)."""
    dep = {input_name}
    for k, node in enumerate(graph.node):
        if node.op_type in ("Shape", "Size"):
            continue
        if any(i in dep and (k, s) not in frozen for s, i in enumerate(node.input) if i):
            dep.update(o for o in node.output if o)
    return dep


def _problem(node: NodeProto, g: GraphInfo, frozen: set[int] = frozenset()) -> str | None:
    """Why ``node`` (value-dependent) cannot be frozen, or None. ``frozen``: its input slots the
    value rule freezes (constants of g)."""
    if node.domain not in ("", "ai.onnx"):
        return f"operator of the custom domain '{node.domain}'; export with standard ONNX ops"
    gate = gate_for(node.op_type)
    dep = [bool(i) and i in g.dependent and s not in frozen for s, i in enumerate(node.input)]
    if gate is not None:
        if any(dep[1:]):
            return "its parameters (bounds, slope) depend on the input's values"
        return gate.check(node, g)
    rule = AFFINE.get(node.op_type)
    if rule is not None:
        return rule(node, dep, g)
    return ADVICE.get(node.op_type, "not a known affine operation or piecewise-linear gate")


def _problems(graph: onnx.GraphProto, g: GraphInfo, freezing: Freezing) -> list[tuple[str, str, str]]:
    """(name, op type, reason) of every node of g (the live nodes) that cannot be frozen."""
    out = []
    for i, node in enumerate(graph.node):
        if i not in freezing.live:
            continue  # feeds only frozen factors or divisors: not part of g
        if node.op_type in _RANDOM + _FLOW:
            why = ADVICE[node.op_type]  # random even on constants; subgraphs may read the input
        elif any(o in g.dependent for o in node.output):
            why = _problem(node, g, {s for k, s in freezing.edges if k == i})
        else:
            continue  # constant or shape arithmetic
        if why:
            out.append((_name(node, i), node.op_type, why))
    return out


def _name(node: NodeProto, i: int) -> str:
    return node.name or f"#{i} {node.op_type} -> {node.output[0] if node.output else ''}"


# --------------------------------------------------------------------------
# prepare: input, logits, batch, support check
# --------------------------------------------------------------------------


def prepare(model: Any, x_shape: tuple[int, ...], logits: str = "auto") -> Prepared:
    """Load a copy of ``model``, select the logits, make the batch dynamic, check every op."""
    proto, source = load_model(model)
    graph = proto.graph
    input_name = _input(graph, x_shape, source)
    producers = _producers(graph)  # the tensor -> node map both steps walk
    logits_name, notes = _select_logits(graph, logits, producers)
    prune(graph, logits_name, producers)
    unexpanded = expand_layer_norms(graph, opset_of(proto))
    info = GraphInfo(constants(graph), _used(graph), dependent_tensors(graph, input_name))
    if logits_name not in info.dependent:
        raise InputError(f"the logits tensor '{logits_name}' does not depend on the input '{input_name}'")
    freezing = plan(graph, info.dependent, info.consts, logits_name)
    info.dependent = dependent_tensors(graph, input_name, freezing.edges)  # g's: frozen edges are constants
    problems = _problems(graph, info, freezing)
    problems += [(name, "LayerNormalization", "it normalizes over axes from a non-negative axis, or its Mean / "
                  "InvStdDev outputs are used: export with axis=-1") for name in unexpanded
                 if not any(p[0] == name for p in problems)]
    if problems:
        raise UnsupportedGraphError(problems)
    original = None
    fixed = _fixed_batch(graph, input_name)
    if fixed is not None:
        original = ModelProto()
        original.CopyFrom(proto)
        _dynamic_batch(graph, input_name, fixed, info)
        notes.append(f"the model's batch dimension was fixed at {fixed}; reconviz made it dynamic "
                     "(Reshape targets with that leading size copy the batch instead)")
    gated = [i for i, n in enumerate(graph.node)
             if i in freezing.live and gate_for(n.op_type) and n.output[0] in info.dependent]
    return Prepared(proto, input_name, logits_name, tuple(x_shape[1:]), info, gated, source, notes,
                    fixed, original, freezing)


def opset_of(proto: ModelProto) -> int:
    """The model's default-domain opset version."""
    return max((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), default=1)


def _input(graph: onnx.GraphProto, x_shape: tuple[int, ...], source: str) -> str:
    inits = {t.name for t in graph.initializer}
    real = [i for i in graph.input if i.name not in inits]
    if len(real) != 1:
        names = ", ".join(i.name for i in real) or "none"
        raise InputError(f"{source} has {len(real)} inputs ({names}); reconviz.onnx reconstructs a "
                         "classifier of one input tensor")
    inp = real[0]
    ttype = inp.type.tensor_type
    if ttype.elem_type != TensorProto.FLOAT:
        raise InputError(f"input '{inp.name}' is {TensorProto.DataType.Name(ttype.elem_type)}; reconviz.onnx "
                         "runs float32 graphs (onnxruntime's CPU convolution is float32)")
    if ttype.HasField("shape"):
        dims = [d.dim_value if d.HasField("dim_value") else None for d in ttype.shape.dim]
        ok = len(dims) == len(x_shape) and all(d is None or d == s for d, s in zip(dims[1:], x_shape[1:]))
        if not ok:
            want = ", ".join("?" if d is None else str(d) for d in dims)
            raise InputError(f"input '{inp.name}' has shape ({want}), but x has shape {tuple(x_shape)}: "
                             "give a batch of samples shaped like the model's input")
    return inp.name


def _producers(graph: onnx.GraphProto) -> dict[str, NodeProto]:
    return {o: n for n in graph.node for o in n.output if o}


def _select_logits(graph: onnx.GraphProto, logits: str,
                   producers: dict[str, NodeProto]) -> tuple[str, list[str]]:
    """The tensor to reconstruct: ``auto`` steps back over a final Softmax/LogSoftmax."""
    if not isinstance(logits, str):
        raise InputError(f"logits must be 'auto', 'output' or a tensor name, got {logits!r}")
    out = graph.output[0].name
    notes = [] if len(graph.output) == 1 else [
        f"the graph has {len(graph.output)} outputs; reconstructing the first, '{out}'"]
    if logits == "output":
        return out, notes
    if logits != "auto":
        if logits not in producers:
            raise InputError(f"logits={logits!r} is not a tensor computed by the graph (outputs: "
                             f"{', '.join(o.name for o in graph.output)})")
        return logits, notes + [f"reconstructing the tensor '{logits}' (logits={logits!r})"]
    node = producers.get(out)
    while node is not None and node.op_type == "Identity":
        node = producers.get(node.input[0])
    if node is not None and node.op_type in ("Softmax", "LogSoftmax"):
        notes.append(f"the graph ends in {node.op_type} (node '{node.name}'); the reconstruction is of its "
                     f"input '{node.input[0]}', the logits (pass logits='output' to refuse instead)")
        return node.input[0], notes
    return out, notes


def prune(graph: onnx.GraphProto, output: str, producers: dict[str, NodeProto]) -> None:
    """Keep only what computes ``output`` (``producers``: tensor -> node); make it the single graph output."""
    needed, stack = set(), [output]
    while stack:
        name = stack.pop()
        if name in needed:
            continue
        needed.add(name)
        node = producers.get(name)
        if node is not None:
            stack.extend(i for i in node.input if i)
    keep = [n for n in graph.node if any(o in needed for o in n.output)]
    old = {o.name: o for o in graph.output}
    vi = old.get(output) or helper.make_tensor_value_info(output, TensorProto.FLOAT, None)
    del graph.node[:]
    graph.node.extend(keep)
    del graph.output[:]
    graph.output.append(vi)
    used = needed | {i for n in keep for i in n.input}
    inits = [t for t in graph.initializer if t.name in used]
    del graph.initializer[:]
    graph.initializer.extend(inits)
    inputs = [i for i in graph.input if i.name in used]
    del graph.input[:]
    graph.input.extend(inputs)
    del graph.value_info[:]  # shapes may be stale (fixed batch); onnxruntime infers its own


def _used(graph: onnx.GraphProto) -> set[str]:
    return {i for n in graph.node for i in n.input if i} | {o.name for o in graph.output}


def _fixed_batch(graph: onnx.GraphProto, input_name: str) -> int | None:
    inp = next(i for i in graph.input if i.name == input_name)
    dims = inp.type.tensor_type.shape.dim
    return int(dims[0].dim_value) if dims and dims[0].HasField("dim_value") else None


def _dynamic_batch(graph: onnx.GraphProto, input_name: str, fixed: int, info: GraphInfo) -> None:
    """Input and output batch become symbolic; value-dependent Reshapes to (fixed, ...) copy the batch."""
    for vi in list(graph.input) + list(graph.output):
        if vi.name == input_name or vi.name == graph.output[0].name:
            dims = vi.type.tensor_type.shape.dim
            if dims:
                dims[0].Clear()
                dims[0].dim_param = "batch"
    for k, node in enumerate(graph.node):
        if node.op_type != "Reshape" or node.input[0] not in info.dependent or _attr(node, "allowzero", 0):
            continue
        target = info.consts.get(node.input[1])
        if target is None or target.ndim != 1 or not len(target) or int(target[0]) != fixed:
            continue
        new = target.astype(np.int64).copy()
        new[0] = 0  # 0: copy the input's leading dimension (the batch)
        name = f"reconviz/batch/{k}/shape"
        graph.initializer.append(numpy_helper.from_array(new, name))
        node.input[1] = name
