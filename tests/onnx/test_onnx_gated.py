"""The value rule on ONNX graphs (issue 12): smooth gates, gate factors and divisors frozen at
their values, point-exact, in onnxruntime (float32).

Oracles: the PyTorch path's value rule on the same network (exported blocks), or the network
written in torch with its frozen factors ``.detach()``ed (``conftest.value_oracle``) for graphs
built here with ``onnx.helper`` in the shapes other exporters write. W must agree to 1e-4
relative (the float32 contract); ``W x0 + b = f(x0)`` to 1e-4.
"""

from __future__ import annotations

from collections import Counter

import numpy as np
import onnx
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from onnx import TensorProto, helper, numpy_helper

import reconviz as rv
from archs import GATED_BLOCKS
from conftest import value_oracle
from reconviz.onnx import UnsupportedGraphError
from reconviz.onnx.export import export_torch

F32 = 1e-4
pytestmark = pytest.mark.usefixtures("one_thread")


def w_rel(w, ref) -> float:
    return float((w.double() - ref.double()).abs().max() / ref.double().abs().max())


# (op, gate) pairs the ONNX path must freeze in each exported block
FROZEN = {
    "mobilenetv3": {("HardSwish", "hardswish"), ("Mul", "factor")},
    "mbconv": {("Mul", "factor")},
    "convnext": {("Gelu", "gelu"), ("Div", "divisor")},
    "vit": {("Gelu", "gelu"), ("Div", "divisor"), ("MatMul", "factor")},
    "swin": {("Gelu", "gelu"), ("Div", "divisor"), ("MatMul", "factor")},
}


@pytest.mark.parametrize("name", sorted(GATED_BLOCKS))
def test_exported_block_reconstructs_point_exactly_and_equals_the_torch_path(name):
    torch.manual_seed(11)
    model = GATED_BLOCKS[name]().double().eval()
    x = torch.randn(3, *model.input_shape, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    proto, why = export_torch(model, x.float().numpy()[:2])  # batch 2: the exporter specializes a batch of 1
    assert proto is not None, why
    rec = rv.onnx.reconstruct(proto, x.float())
    torch_rec = rv.reconstruct(model, x)
    assert rec.exactness == "point-exact" and rec.meta["max_rel_error"] <= F32
    assert w_rel(rec.weight, torch_rec.weight) <= F32
    assert float(((rec.bias.double() - torch_rec.bias).abs() / torch_rec.bias.abs().clamp_min(1)).max()) <= F32
    assert {(f.op, f.gate) for f in rec.frozen} == FROZEN[name]
    checks = {c.name: c for c in rec.self_checks}
    assert checks["affinity"].passed and checks["region"].passed is None  # point-exact: no region
    # every basis gives the same W (the basis columns run in batches of r * 3: the tiled factors)
    hadamard = rv.onnx.reconstruct(proto, x.float(), basis="hadamard")
    assert w_rel(hadamard.weight, rec.weight) <= F32


# --------------------------------------------------------------------------
# PP-LCNet-style graphs written with onnx.helper (as Paddle2ONNX writes them)
# --------------------------------------------------------------------------


class LCNetTwin(nn.Module):
    """The value oracle of the PP-LCNet-style graph: conv, hardswish, depthwise conv, hardswish,
    squeeze-excitation with a ReLU and a hardsigmoid clip(0.2 s + 0.5, 0, 1) scale, pointwise
    conv, global average pool, linear; frozen factors detached."""

    def __init__(self, p: dict[str, np.ndarray]):
        super().__init__()
        self.p = {k: torch.from_numpy(v).double() for k, v in p.items()}

    def forward(self, x):
        p = self.p
        hs = lambda z: z * (F.relu6(z + 3) / 6).detach()  # noqa: E731
        z = hs(F.conv2d(x, p["w1"], p["b1"], padding=1))
        z = hs(F.conv2d(z, p["wd"], p["bd"], padding=1, groups=8))
        s = F.conv2d(F.relu(F.conv2d(z.mean((2, 3), keepdim=True), p["ws1"], p["bs1"])), p["ws2"], p["bs2"])
        z = z * torch.clamp(0.2 * s + 0.5, 0, 1).detach()
        z = F.conv2d(z, p["wp"], p["bp"]).mean((2, 3))
        return z @ p["wf"].T + p["bf"]


def lcnet_style(decomposed: bool) -> tuple[onnx.ModelProto, LCNetTwin]:
    """HardSwish and HardSigmoid ops (``decomposed``: x * Clip(x + 3, 0, 6) / 6 for hardswish, as
    older exporters write it, and Clip(0.2 s + 0.5, 0, 1) for the hardsigmoid), a final Softmax."""
    rng = np.random.default_rng(3)
    r = lambda *shape, s=0.4: (rng.standard_normal(shape) * s).astype(np.float32)  # noqa: E731
    p = {"w1": r(8, 3, 3, 3, s=0.8), "b1": r(8), "wd": r(8, 1, 3, 3, s=0.8), "bd": r(8), "ws1": r(4, 8, 1, 1),
         "bs1": r(4), "ws2": r(8, 4, 1, 1, s=1.5), "bs2": r(8), "wp": r(6, 8, 1, 1), "bp": r(6), "wf": r(5, 6),
         "bf": r(5)}
    consts = {"three": np.array(3, np.float32), "zero": np.array(0, np.float32), "six": np.array(6, np.float32),
              "one": np.array(1, np.float32), "a": np.array(0.2, np.float32), "half": np.array(0.5, np.float32)}
    n = helper.make_node
    if decomposed:
        def hswish(z, out):
            return [n("Add", [z, "three"], [out + "_a"]), n("Clip", [out + "_a", "zero", "six"], [out + "_c"]),
                    n("Div", [out + "_c", "six"], [out + "_g"]), n("Mul", [z, out + "_g"], [out])]

        hsig = [n("Mul", ["s2", "a"], ["s3"]), n("Add", ["s3", "half"], ["s4"]),
                n("Clip", ["s4", "zero", "one"], ["scale"])]
    else:
        def hswish(z, out):
            return [n("HardSwish", [z], [out])]

        hsig = [n("HardSigmoid", ["s2"], ["scale"], alpha=0.2, beta=0.5)]
    nodes = [n("Conv", ["x", "w1", "b1"], ["c1"], pads=[1, 1, 1, 1]), *hswish("c1", "h1"),
             n("Conv", ["h1", "wd", "bd"], ["c2"], pads=[1, 1, 1, 1], group=8), *hswish("c2", "h2"),
             n("GlobalAveragePool", ["h2"], ["s0"]), n("Conv", ["s0", "ws1", "bs1"], ["s1r"]),
             n("Relu", ["s1r"], ["s1"]), n("Conv", ["s1", "ws2", "bs2"], ["s2"]), *hsig,
             n("Mul", ["h2", "scale"], ["se"]), n("Conv", ["se", "wp", "bp"], ["c3"]),
             n("GlobalAveragePool", ["c3"], ["g"]), n("Flatten", ["g"], ["fl"]),
             n("Gemm", ["fl", "wf", "bf"], ["logits"], transB=1), n("Softmax", ["logits"], ["prob"], axis=1)]
    graph = helper.make_graph(nodes, "lcnet", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 6, 6])],
                              [helper.make_tensor_value_info("prob", TensorProto.FLOAT, ["N", 5])],
                              initializer=[numpy_helper.from_array(v, k) for k, v in {**p, **consts}.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 14)], ir_version=8)
    onnx.checker.check_model(model)
    return model, LCNetTwin(p)


@pytest.mark.parametrize("decomposed", [False, True], ids=["ops", "decomposed"])
def test_pp_lcnet_style_graph_is_point_exact_and_equals_its_oracle(decomposed):
    model, oracle = lcnet_style(decomposed)
    x = torch.rand(3, 3, 6, 6, generator=torch.Generator().manual_seed(4)) * 4 - 2
    rec = rv.onnx.reconstruct(model, x)
    assert rec.exactness == "point-exact" and rec.meta["max_rel_error"] <= F32
    assert any("Softmax" in note for note in rec.meta["notes"])  # the final Softmax is stepped over
    W, b = value_oracle(oracle, x)
    assert w_rel(rec.weight, W) <= F32
    assert float(((rec.bias.double() - b).abs() / b.abs().clamp_min(1)).max()) <= F32
    frozen = Counter((f.op, f.gate) for f in rec.frozen)
    if decomposed:  # both hardswishes and the SE scale: gate factors of Mul
        assert frozen == Counter({("Mul", "factor"): 3})
    else:
        assert frozen == Counter({("HardSwish", "hardswish"): 2, ("Mul", "factor"): 1})


# --------------------------------------------------------------------------
# A transformer MLP as older exporters write it: LayerNorm and GELU decomposed
# --------------------------------------------------------------------------


def decomposed_mlp(opset: int) -> tuple[onnx.ModelProto, nn.Module]:
    """Gemm, LayerNorm as ReduceMean/Sub/Pow/ReduceMean/Add/Sqrt/Div/Mul/Add, GELU as
    x * 0.5 * (1 + Erf(x / sqrt 2)), Gemm; and its value oracle (divisor and Phi detached)."""
    rng = np.random.default_rng(5)
    w1, b1 = rng.standard_normal((8, 6)).astype(np.float32), rng.standard_normal(8).astype(np.float32)
    g, beta = (rng.random(8) + 0.5).astype(np.float32), (rng.standard_normal(8) * 0.1).astype(np.float32)
    w2, b2 = rng.standard_normal((4, 8)).astype(np.float32), rng.standard_normal(4).astype(np.float32)
    n = helper.make_node
    axes = {"axes": [-1]} if opset < 18 else {}
    ax_in = [] if opset < 18 else ["ax"]
    nodes = [n("Gemm", ["x", "w1", "b1"], ["h"], transB=1),
             n("ReduceMean", ["h", *ax_in], ["mu"], keepdims=1, **axes), n("Sub", ["h", "mu"], ["c"]),
             n("Pow", ["c", "two"], ["sq"]), n("ReduceMean", ["sq", *ax_in], ["var"], keepdims=1, **axes),
             n("Add", ["var", "eps"], ["ve"]), n("Sqrt", ["ve"], ["sd"]), n("Div", ["c", "sd"], ["nz"]),
             n("Mul", ["nz", "g"], ["ns"]), n("Add", ["ns", "beta"], ["ln"]),
             n("Div", ["ln", "sqrt2"], ["u"]), n("Erf", ["u"], ["e"]), n("Add", ["e", "one"], ["e1"]),
             n("Mul", ["ln", "half"], ["lh"]), n("Mul", ["lh", "e1"], ["gelu"]),
             n("Gemm", ["gelu", "w2", "b2"], ["y"], transB=1)]
    inits = {"w1": w1, "b1": b1, "g": g, "beta": beta, "w2": w2, "b2": b2, "two": np.array(2, np.float32),
             "eps": np.array(1e-5, np.float32), "sqrt2": np.array(np.sqrt(2), np.float32),
             "one": np.array(1, np.float32), "half": np.array(0.5, np.float32), "ax": np.array([-1], np.int64)}
    graph = helper.make_graph(nodes, "mlp", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 6])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4])],
                              initializer=[numpy_helper.from_array(v, k) for k, v in inits.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=8)
    onnx.checker.check_model(model)
    t = {k: torch.from_numpy(np.asarray(v)).double() for k, v in inits.items()}

    class Oracle(nn.Module):
        def forward(self, x):
            h = x @ t["w1"].T + t["b1"]
            c = h - h.mean(-1, keepdim=True)
            ln = c / torch.sqrt(c.pow(2).mean(-1, keepdim=True) + 1e-5).detach() * t["g"] + t["beta"]
            return (ln * (0.5 * (1 + torch.erf(ln / np.sqrt(2)))).detach()) @ t["w2"].T + t["b2"]

    return model, Oracle()


@pytest.mark.parametrize("opset", [13, 18])
def test_decomposed_layer_norm_and_gelu_freeze_their_divisor_and_phi(opset):
    model, oracle = decomposed_mlp(opset)
    x = torch.randn(4, 6, generator=torch.Generator().manual_seed(6))
    rec = rv.onnx.reconstruct(model, x)
    assert rec.exactness == "point-exact" and rec.meta["max_rel_error"] <= F32
    W, _ = value_oracle(oracle, x)
    assert w_rel(rec.weight, W) <= F32
    assert Counter((f.op, f.gate) for f in rec.frozen) == Counter({("Div", "divisor"): 1, ("Mul", "factor"): 1})


def test_standalone_smooth_gates_take_their_secant_and_hardsigmoid_its_piece():
    """Sigmoid, Tanh, Erf and HardSigmoid whose outputs flow on additively: the torch gates'
    frozen forms, on the same tapped values."""
    n = helper.make_node
    nodes = [n("MatMul", ["x", "w"], ["z"]), n("Sigmoid", ["z"], ["a"]), n("Tanh", ["z"], ["b"]),
             n("Erf", ["z"], ["c"]), n("HardSigmoid", ["z"], ["d"], alpha=0.3, beta=0.4),
             n("Sum", ["a", "b", "c", "d"], ["y"])]
    w = np.random.default_rng(7).standard_normal((4, 4)).astype(np.float32) * 2
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4])],
                              initializer=[numpy_helper.from_array(w, "w")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=9)
    x = torch.randn(3, 4, generator=torch.Generator().manual_seed(8))
    rec = rv.onnx.reconstruct(model, x)
    assert rec.exactness == "point-exact" and rec.meta["max_rel_error"] <= F32
    z0 = (x.double() @ torch.from_numpy(w).double())

    def secant(phi, d0):
        s = torch.where(z0 == 0, torch.full_like(z0, d0), (phi(z0) - phi(torch.zeros(()))) / z0)
        return s

    y = 0.3 * z0 + 0.4
    slope = (secant(torch.sigmoid, 0.25) + secant(torch.tanh, 1.0) + secant(torch.erf, 2 / np.sqrt(np.pi))
             + ((y > 0) & (y < 1)).double() * 0.3)  # (N, 4): d y_j / d z_j
    W = slope[:, :, None] * torch.from_numpy(w).double().T[None]  # (N, K, D)
    assert w_rel(rec.weight, W) <= F32
    assert {f.gate for f in rec.frozen} == {"sigmoid", "tanh", "erf", "hardsigmoid"}


@pytest.mark.parametrize("nodes, bad", [
    ([("Mul", ["x", "x"], ["y"])], "Mul"),  # x * x: neither factor comes from a gate
    ([("Softmax", ["x"], ["s"]), ("Add", ["s", "x"], ["y"])], "Softmax"),  # softmax added, not a factor
    ([("Sqrt", ["x"], ["y"])], "Sqrt"),  # a smooth op that is not a divisor
    ([("Div", ["one", "x"], ["y"])], "Div"),  # a reciprocal
])
def test_what_the_value_rule_does_not_freeze_is_refused(nodes, bad):
    n = helper.make_node
    graph = helper.make_graph([n(op, i, o, name=op.lower()) for op, i, o in nodes], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4])],
                              initializer=[numpy_helper.from_array(np.array(1, np.float32), "one")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=9)
    with pytest.raises(UnsupportedGraphError) as info:
        rv.onnx.reconstruct(model, torch.rand(2, 4) + 0.5)
    assert [op for _, op, _ in info.value.nodes] == [bad]


def test_a_frozen_factor_without_a_batch_axis_is_refused():
    """A factor that mixes the batch (a softmax over the batch axis) cannot be tiled per probe."""
    n = helper.make_node
    nodes = [n("Softmax", ["x"], ["s"], axis=0, name="over_batch"), n("Mul", ["x", "s"], ["y"], name="scale")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=9)
    with pytest.raises(UnsupportedGraphError, match="no axis that carries the batch"):
        rv.onnx.reconstruct(model, torch.randn(3, 4))
