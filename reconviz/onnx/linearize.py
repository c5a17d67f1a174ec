"""ONNX stage 2 — linearize: the graph with every gate frozen at its probe prior.

The paper's "rewritten structure" as a plain ONNX graph: each gate node is
replaced by the nodes of its frozen form (:mod:`reconviz.onnx.gates`), its prior
stored as initializers. The result g is affine in its input, g(x0) = f(x0), and
g = f on the probe's linear region. It takes batches of B = r * N inputs (input
i uses probe i % N's priors) with a dynamic batch dimension, and runs in any
ONNX runtime.
"""

from __future__ import annotations

import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import ModelProto, TensorProto, helper

from ..errors import ExactnessError, InputError
from ..files import atomic_write
from .freeze import tile_frozen
from .gates import NodePrior, gate_for
from .graph import IR_VERSION, Prepared, prepare, prune
from .probe import FLOAT32_TOLERANCE, OnnxProbe, as_probe_array, max_relative_error, probe, uid
from .runtime import run, session

__all__ = ["LinearizedGraph", "linearize", "linearized_to_onnx"]


@dataclass
class LinearizedGraph:
    """The rewritten graph ``model`` and what the probe saw.

    ``lin(x)`` runs it in onnxruntime on a batch of r * N inputs: (r * N, K_all)."""

    model: ModelProto
    input_name: str
    output_name: str
    probes: np.ndarray  # (N, *sample_shape) float32
    logits: np.ndarray  # (N, K_all): the original graph's output at the probes
    priors: list[NodePrior]
    source: str
    notes: list[str] = field(default_factory=list)
    activation_bytes: int = 0
    prepared: Prepared | None = field(default=None, repr=False)  # the checked original graph (re-probing)
    _session: Any = field(default=None, repr=False)

    @property
    def n_probes(self) -> int:
        return self.probes.shape[0]

    @property
    def sample_shape(self) -> tuple[int, ...]:
        return tuple(self.probes.shape[1:])

    @property
    def n_outputs(self) -> int:
        return self.logits.shape[1]

    @property
    def gates(self) -> dict[str, int]:
        """Frozen nodes per ONNX op type."""
        return dict(Counter(p.op for p in self.priors))

    @property
    def ties(self) -> int:
        return sum(p.ties for p in self.priors)

    @property
    def exactness(self) -> str:
        """``"region-exact"`` when every frozen gate is piecewise linear, else ``"point-exact"``."""
        return "region-exact" if all(p.region_exact for p in self.priors) else "point-exact"

    def session(self):
        if self._session is None:
            self._session = session(self.model, "the linearized graph")
        return self._session

    def __call__(self, x: np.ndarray) -> np.ndarray:
        """g(x) for a float32 batch of r * N inputs, flattened to (r * N, K_all)."""
        x = np.asarray(x, dtype=np.float32)
        if x.shape[1:] != self.sample_shape or x.shape[0] % self.n_probes:
            raise InputError(f"expected a batch of shape (r * {self.n_probes}, "
                             f"{', '.join(map(str, self.sample_shape))}), got {x.shape}")
        out = run(self.session(), x, None, "the linearized graph")[0]
        return out.reshape(x.shape[0], -1)

    def save(self, path: str | os.PathLike) -> Path:
        """Write the linearized graph as an .onnx file (atomically); checked by onnx.checker."""
        path = Path(path)
        data = self.model.SerializeToString()
        onnx.checker.check_model(data)
        atomic_write(path, lambda f: f.write(data))
        return path


def linearize(model: Any, x: Any, logits: str = "auto") -> LinearizedGraph:
    """Probe an ONNX classifier at ``x`` and freeze its gates.

    Args:
        model: an .onnx path, serialized bytes or an ``onnx.ModelProto`` (not modified).
        x: the probe batch (N, ...) as a tensor or array; run in float32.
        logits: ``"auto"`` (a final Softmax/LogSoftmax is stepped over: its input is
            reconstructed), ``"output"`` (the first graph output as it is), or the name
            of a tensor in the graph.
    """
    x = as_probe_array(x)
    prep = prepare(model, x.shape, logits)  # every check before onnxruntime runs
    found = probe(prep, x)
    lin = LinearizedGraph(_rewrite(found), prep.input_name, prep.logits_name, x, found.logits,
                          [found.priors[i] for i in prep.gated] + list(found.frozen.values()), prep.source,
                          list(prep.notes), found.activation_bytes, prep)
    err = max_relative_error(lin(x), found.logits)
    if not err <= FLOAT32_TOLERANCE:
        raise ExactnessError(
            f"the linearized graph misses the model at the probe (max relative error {err:.3g} > "
            f"{FLOAT32_TOLERANCE:g}): a node that depends on the input was not frozen. Please report the "
            f"graph's op types ({', '.join(sorted({n.op_type for n in prep.model.graph.node}))})"
        )
    return lin


def _rewrite(found: OnnxProbe) -> ModelProto:
    """The prepared graph with each gate node replaced by its frozen form, each frozen factor or
    divisor by its value at the probes (tiled over the batch), and what then feeds nothing pruned."""
    prep = found.prep
    model = ModelProto()
    model.CopyFrom(prep.model)
    graph = model.graph
    nodes = _freeze_edges(found, graph)
    for i, node in enumerate(graph.node):
        if i not in found.priors:
            nodes.append(node)
            continue
        new, inits = gate_for(node.op_type).rewrite(node, found.priors[i], uid(i))
        nodes.extend(new)
        graph.initializer.extend(inits)
    del graph.node[:]
    graph.node.extend(nodes)
    if found.frozen:
        prune(graph, prep.logits_name, {o: nd for nd in graph.node for o in nd.output if o})
    n, sample = found.x.shape[0], found.x.shape[1:]
    inp = next(i for i in graph.input if i.name == prep.input_name)
    inp.CopyFrom(helper.make_tensor_value_info(prep.input_name, TensorProto.FLOAT, ["batch", *sample]))
    out_shape = ["batch", *found.logits_shape[1:]]
    graph.output[0].CopyFrom(helper.make_tensor_value_info(prep.logits_name, TensorProto.FLOAT, out_shape))
    graph.doc_string = (f"reconviz: the graph linearized at {n} probe(s) (gates frozen as initializers); "
                        f"input i of a batch of r * {n} uses probe i % {n}'s priors")
    if model.ir_version > 13:
        model.ir_version = IR_VERSION
    return model


def _freeze_edges(found: OnnxProbe, graph: Any) -> list:
    """Point each frozen edge at its tiled value; returns the nodes that tile them (they go first)."""
    nodes, tiled = [], {}
    for j, ((k, slot), prior) in enumerate(sorted(found.frozen.items())):
        name = graph.node[k].input[slot]
        if name not in tiled:
            new, inits, tiled[name] = tile_frozen(prior.tensors["value"], int(prior.tensors["axis"]),
                                                  found.x.shape[0], found.prep.input_name, f"reconviz/frozen{j}")
            nodes.extend(new)
            graph.initializer.extend(inits)
        graph.node[k].input[slot] = tiled[name]
    return nodes


def linearized_to_onnx(model: Any, x: Any, path: str | os.PathLike, logits: str = "auto") -> Path:
    """Write the linearized network of ``model`` at ``x`` as an .onnx file.

    ``model`` is an ONNX model (path, bytes, ModelProto) or a PyTorch ``nn.Module``,
    which is exported with ``torch.onnx.export`` first."""
    import torch.nn as nn

    if isinstance(model, nn.Module):
        from .export import export_torch

        proto, reason = export_torch(model, as_probe_array(x)[:1])
        if proto is None:
            raise InputError(f"the PyTorch model could not be exported to ONNX: {reason}")
        model = proto
    return linearize(model, x, logits).save(path)
