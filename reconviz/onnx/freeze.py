"""The value rule on ONNX graphs: gate factors and divisors frozen at their values at x0.

The same rule as the PyTorch path (:mod:`reconviz.ops.factors`, :mod:`reconviz.ops.smooth`),
on nodes instead of calls:

* a **factor**: in ``Mul`` / ``MatMul`` / ``Gemm`` / ``Einsum`` of two input-dependent
  tensors, the one computed from the input only through a saturating gate (``Sigmoid``,
  ``HardSigmoid``, ``Tanh``, ``Erf``, ``Softmax``, a ``Clip`` bounded on both sides, the
  decomposed hardsigmoid ``clip(z + 3, 0, 6) / 6``) and constants is frozen at its value:
  squeeze-excitation ``x * sigmoid(...)``, SiLU ``x * sigmoid(x)``, the exported GELU
  ``x * 0.5 * (1 + erf(x / sqrt 2))``, attention ``softmax(Q K^T / sqrt d) V``;
* a **divisor**: in ``Div(u, d)`` with both input-dependent, d is frozen (the decomposed
  LayerNorm ``(z - mean) / sqrt(var + eps)``; ``LayerNormalization`` nodes are expanded to
  that form first, :func:`expand_layer_norms`).

Freezing is per edge (the consumer's input slot): the same sigmoid output flowing on
additively elsewhere keeps its own frozen form there (the secant gate). What only feeds
frozen edges (the scores ``Q K^T``, the variance) is no longer part of g: such nodes are
*dead* and are neither classified nor kept. A frozen value is a tensor of the probe batch:
its batch axis is found by running the probe graph at N and at 2N inputs (the axis that
doubles, with the two halves equal), and the rewritten graph tiles it along that axis for a
batch of r * N inputs (input i uses probe i % N's value).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from onnx import GraphProto, NodeProto, TensorProto, helper, numpy_helper

__all__ = ["Freezing", "plan", "expand_layer_norms", "batch_axis", "tile_frozen", "FACTOR_SOURCES"]

FACTOR_SOURCES = ("Sigmoid", "HardSigmoid", "Tanh", "Erf", "Softmax")
PRODUCTS = ("Mul", "MatMul", "Gemm", "Einsum")


@dataclass
class Freezing:
    """``edges``: (node index, input slot) -> why ("factor" / "divisor"); ``live``: indices of the
    nodes g keeps (what the logits need once the frozen edges are constants)."""

    edges: dict[tuple[int, int], str]
    live: set[int]

    def tensors(self, graph: GraphProto) -> list[str]:
        """The frozen tensors' names, each once, in node order."""
        names = [graph.node[i].input[s] for i, s in sorted(self.edges)]
        return list(dict.fromkeys(names))


def _bounded_clip(node: NodeProto, consts: dict[str, np.ndarray]) -> bool:
    """A Clip with both bounds (attributes before opset 11, constant inputs after): saturating."""
    if any(a.name in ("min", "max") for a in node.attribute):
        return {a.name for a in node.attribute} >= {"min", "max"}
    return len(node.input) >= 3 and all(i and i in consts for i in node.input[1:3])


def gate_derived(graph: GraphProto, dependent: set[str], consts: dict[str, np.ndarray]) -> set[str]:
    """Input-dependent tensors computed from the input only through saturating gates: a gate's
    output, or an output whose node's input-dependent inputs are all such tensors."""
    derived: set[str] = set()
    for node in graph.node:
        outs = [o for o in node.output if o in dependent]
        if not outs:
            continue
        deps = [i for i in node.input if i in dependent]
        source = node.op_type in FACTOR_SOURCES or (node.op_type == "Clip" and _bounded_clip(node, consts))
        if source or (deps and all(i in derived for i in deps)):
            derived.update(outs)
    return derived


def plan(graph: GraphProto, dependent: set[str], consts: dict[str, np.ndarray], logits: str) -> Freezing:
    """The frozen edges of the value rule and the nodes g keeps."""
    derived = gate_derived(graph, dependent, consts)
    edges: dict[tuple[int, int], str] = {}
    for k, node in enumerate(graph.node):
        slots = [s for s, i in enumerate(node.input) if i in dependent]
        if node.op_type in PRODUCTS and len(slots) > 1:
            plain = [s for s in slots if node.input[s] not in derived]
            if len(plain) == 1:  # one operand carries the input; the others are gate factors
                edges.update({(k, s): "factor" for s in slots if s not in plain})
        elif node.op_type == "Div" and slots == [0, 1]:
            edges[(k, 1)] = "divisor"
    return Freezing(edges, _live(graph, edges, logits))


def _live(graph: GraphProto, edges: dict[tuple[int, int], str], logits: str) -> set[int]:
    """Indices of the nodes the logits need when the frozen edges are constants."""
    producer = {o: k for k, n in enumerate(graph.node) for o in n.output if o}
    live: set[int] = set()
    stack = [producer[logits]] if logits in producer else []
    while stack:
        k = stack.pop()
        if k in live:
            continue
        live.add(k)
        stack.extend(producer[i] for s, i in enumerate(graph.node[k].input)
                     if i in producer and (k, s) not in edges)
    return live


def batch_axis(at_n: np.ndarray, at_2n: np.ndarray) -> int | None:
    """The axis of a frozen tensor that carries the batch: the one that doubles from the run
    at N inputs to the run at 2N (the same N inputs twice), with both halves equal to the run
    at N (batch-major); None when there is no such axis."""
    if at_n.ndim != at_2n.ndim:
        return None
    grown = [a for a, (p, q) in enumerate(zip(at_n.shape, at_2n.shape)) if p != q]
    if len(grown) != 1 or at_2n.shape[grown[0]] != 2 * at_n.shape[grown[0]]:
        return None
    a = grown[0]
    halves = np.split(at_2n, 2, axis=a)
    same = all(np.array_equal(h, at_n, equal_nan=True) for h in halves)
    return a if same else None


def tile_frozen(value: np.ndarray, axis: int, n: int, input_name: str, uid: str) -> tuple[list[NodeProto], list[TensorProto], str]:
    """Nodes and initializers of ``value`` tiled r times along ``axis`` for a batch of r * n
    inputs (r = batch / n), and the tiled tensor's name."""
    reps = [np.ones(axis, np.int64), None, np.ones(value.ndim - axis - 1, np.int64)]
    inits = [numpy_helper.from_array(np.ascontiguousarray(value, np.float32), f"{uid}/value"),
             numpy_helper.from_array(np.array([0], np.int64), f"{uid}/zero"),
             numpy_helper.from_array(np.array([n], np.int64), f"{uid}/n"),
             numpy_helper.from_array(reps[0], f"{uid}/before"),
             numpy_helper.from_array(reps[2], f"{uid}/after")]
    nodes = [
        helper.make_node("Shape", [input_name], [f"{uid}/shape"]),
        helper.make_node("Gather", [f"{uid}/shape", f"{uid}/zero"], [f"{uid}/batch"], axis=0),
        helper.make_node("Div", [f"{uid}/batch", f"{uid}/n"], [f"{uid}/r"]),
        helper.make_node("Concat", [f"{uid}/before", f"{uid}/r", f"{uid}/after"], [f"{uid}/repeats"], axis=0),
        helper.make_node("Tile", [f"{uid}/value", f"{uid}/repeats"], [f"{uid}/tiled"]),
    ]
    return nodes, inits, f"{uid}/tiled"


# --------------------------------------------------------------------------
# LayerNormalization -> its decomposed form (the divisor then freezes like any other)
# --------------------------------------------------------------------------


def expand_layer_norms(graph: GraphProto, opset: int) -> list[str]:
    """Replace every ``LayerNormalization`` (axis < 0, or >= 0 with a known rank) by
    ``(z - mean z) / sqrt(var z + eps) * scale + bias`` (ReduceMean over the normalized
    axes, keepdims). Returns the names of the nodes it could not expand (why, for the
    error), leaving them in place."""
    left, nodes = [], []
    for k, node in enumerate(graph.node):
        if node.op_type != "LayerNormalization":
            nodes.append(node)
            continue
        axis = next((helper.get_attribute_value(a) for a in node.attribute if a.name == "axis"), -1)
        extra = [o for o in node.output[1:] if o]
        if axis >= 0 or extra:
            left.append(node.name or f"#{k} LayerNormalization")
            nodes.append(node)
            continue
        eps = next((helper.get_attribute_value(a) for a in node.attribute if a.name == "epsilon"), 1e-5)
        new, inits = _layer_norm_nodes(node, list(range(axis, 0)), float(eps), opset, f"reconviz/ln{k}")
        nodes.extend(new)
        graph.initializer.extend(inits)
    del graph.node[:]
    graph.node.extend(nodes)
    return left


def _layer_norm_nodes(node: NodeProto, axes: list[int], eps: float, opset: int,
                      uid: str) -> tuple[list[NodeProto], list[TensorProto]]:
    z, scale = node.input[0], node.input[1]
    bias = node.input[2] if len(node.input) > 2 and node.input[2] else None
    inits = [numpy_helper.from_array(np.array(eps, np.float32), f"{uid}/eps")]

    def mean(src: str, dst: str) -> NodeProto:
        if opset >= 18:
            return helper.make_node("ReduceMean", [src, f"{uid}/axes"], [dst], keepdims=1)
        return helper.make_node("ReduceMean", [src], [dst], axes=axes, keepdims=1)

    if opset >= 18:
        inits.append(numpy_helper.from_array(np.array(axes, np.int64), f"{uid}/axes"))
    out = node.output[0]
    scaled = f"{uid}/scaled" if bias else out
    nodes = [
        mean(z, f"{uid}/mean"),
        helper.make_node("Sub", [z, f"{uid}/mean"], [f"{uid}/centred"]),
        helper.make_node("Mul", [f"{uid}/centred", f"{uid}/centred"], [f"{uid}/square"]),
        mean(f"{uid}/square", f"{uid}/var"),
        helper.make_node("Add", [f"{uid}/var", f"{uid}/eps"], [f"{uid}/var_eps"]),
        helper.make_node("Sqrt", [f"{uid}/var_eps"], [f"{uid}/std"]),
        helper.make_node("Div", [f"{uid}/centred", f"{uid}/std"], [f"{uid}/normed"]),
        helper.make_node("Mul", [f"{uid}/normed", scale], [scaled]),
    ]
    if bias:
        nodes.append(helper.make_node("Add", [scaled, bias], [out]))
    return nodes, inits
