"""reconviz.onnx: ThresholdedRelu, the exactness label, the self-checks, the graph error,
the exporters (torch.export-based, TorchScript fallback) and the saliency imports.

Tolerances as in test_onnx.py: onnxruntime runs float32, F32 = 1e-4 relative."""

from __future__ import annotations

import importlib
import sys
import warnings

import numpy as np
import onnx
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from onnx import TensorProto, helper, numpy_helper

import reconviz as rv
from reconviz.errors import ExactnessError, UnsupportedOperationError
from reconviz.onnx import UnsupportedGraphError, checks
from reconviz.onnx.gates import Elementwise, OnnxNode, gate_for, gate_types
from reconviz.ops import registered
from reconviz.ops.gates import ReLUGate, ThresholdGate, gate_for_onnx

F32 = rv.tolerance_for(torch.float32)


def rel(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float((np.abs(a - b) / np.maximum(1.0, np.abs(b))).max())


def ort_run(model, x):
    return rv.onnx.run_model(model, np.asarray(x, np.float32))


# --------------------------------------------------------------------------
# ThresholdedRelu: Conv -> ThresholdedRelu -> Flatten -> Gemm
# --------------------------------------------------------------------------


def thresholded(w, b, wf, bf, alpha=None):
    """The graph with these weights (alpha None: the attribute left out, default 1.0)."""
    attrs = {} if alpha is None else {"alpha": alpha}
    c, h = w.shape[1], 5
    nodes = [helper.make_node("Conv", ["x", "w", "b"], ["c"], pads=[1, 1, 1, 1] if w.shape[2] == 3 else [0] * 4),
             helper.make_node("ThresholdedRelu", ["c"], ["t"], name="thr", **attrs),
             helper.make_node("Flatten", ["t"], ["f"], axis=1),
             helper.make_node("Gemm", ["f", "wf", "bf"], ["y"], transB=1)]
    inits = [numpy_helper.from_array(v, k) for k, v in {"w": w, "b": b, "wf": wf, "bf": bf}.items()]
    graph = helper.make_graph(nodes, "thresholded", [helper.make_tensor_value_info("x", TensorProto.FLOAT,
                                                                                    ["N", c, h, h])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", wf.shape[0]])],
                              initializer=inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=9)
    onnx.checker.check_model(model)
    return model


def twin(w, b, wf, bf, alpha):
    """The same network in torch (float64): F.threshold(z, alpha, 0) is ThresholdedRelu."""
    t = {k: torch.from_numpy(v).double() for k, v in {"w": w, "b": b, "wf": wf, "bf": bf}.items()}
    pad = 1 if w.shape[2] == 3 else 0
    return lambda x: F.linear(F.threshold(F.conv2d(x, t["w"], t["b"], padding=pad), alpha, 0.0).flatten(1),
                              t["wf"], t["bf"])


def weights(seed=0, out=3, k=3):
    rng = np.random.default_rng(seed)
    f32 = lambda *s: rng.standard_normal(s).astype(np.float32)  # noqa: E731
    return f32(out, 2, k, k) * 0.5, f32(out) * 0.1, f32(4, out * 25) * 0.3, f32(4) * 0.1


@pytest.mark.parametrize("alpha", [0.4, None])
def test_thresholded_relu_is_region_exact(alpha):
    w, b, wf, bf = weights()
    model = thresholded(w, b, wf, bf, alpha)
    x = torch.randn(2, 2, 5, 5, generator=torch.Generator().manual_seed(0))
    rec = rv.onnx.reconstruct(model, x)
    m = rec.meta
    assert m["gates"] == {"ThresholdedRelu": 1} and m["exactness"] == "region-exact" and m["ties"] == 0
    assert m["max_rel_error"] <= F32
    # oracle: the torch Jacobian of the float64 twin (the mask 1[z > alpha] between two linear maps)
    f = twin(w, b, wf, bf, 1.0 if alpha is None else alpha)
    x64 = x.double()
    jac = torch.stack([torch.autograd.functional.jacobian(f, x64[i:i + 1])[0, :, 0] for i in range(2)])
    w_err = float((rec.weight.double() - jac).abs().max() / jac.abs().max())
    assert w_err <= 1e-5, w_err
    bias = f(x64) - torch.einsum("nkd,nd->nk", jac.flatten(2), x64.flatten(1))
    assert rel(rec.bias, bias) <= F32 and rel(rec.logits, f(x64)) <= F32
    lin = rv.onnx.linearize(model, x)
    slope = lin.priors[0].tensors["slope"]
    z = F.conv2d(x64, torch.from_numpy(w).double(), torch.from_numpy(b).double(), padding=1)
    thr = 1.0 if alpha is None else alpha
    assert np.array_equal(slope, (z > thr).numpy().astype(np.float32)) and 0 < slope.mean() < 1
    assert "offset" not in lin.priors[0].tensors
    affinity, region = m["self_checks"]
    assert affinity["passed"] and affinity["max_rel_error"] <= F32
    assert region["passed"] and region["max_rel_error"] <= F32 and "2 of 2 probe(s)" in region["detail"]


@pytest.mark.parametrize("alpha, ties", [(0.5, 3), (None, 2)])
def test_thresholded_relu_ties_are_counted(alpha, ties):
    """1x1 conv with weights (2, -1): z = 2x and -x. x holds 0.25 twice, -0.5 once and 0.5 twice,
    so z == 0.5 three times (alpha 0.5) and z == 1.0 twice (alpha 1.0), exactly in float32."""
    w = np.array([2.0, -1.0], np.float32).reshape(2, 1, 1, 1)
    rng = np.random.default_rng(1)
    model = thresholded(w, np.zeros(2, np.float32), rng.standard_normal((3, 50)).astype(np.float32),
                        np.zeros(3, np.float32), alpha)
    x = torch.from_numpy(rng.uniform(2.0, 3.0, (1, 1, 5, 5)).astype(np.float32))  # far from both alphas
    for (i, j), v in {(0, 0): 0.25, (1, 1): 0.25, (2, 2): -0.5, (3, 3): 0.5, (4, 4): 0.5}.items():
        x[0, 0, i, j] = v
    rec = rv.onnx.reconstruct(model, x)
    assert rec.meta["ties"] == ties and rec.meta["max_rel_error"] <= F32
    assert rv.onnx.reconstruct(model, x + 0.01).meta["ties"] == 0


def test_onnx_nodes_route_to_the_torch_gates():
    """One registry: Relu is ReLUGate, ThresholdedRelu is ThresholdGate at t = alpha, v = 0."""
    assert isinstance(gate_for_onnx("Relu"), ReLUGate) and isinstance(gate_for_onnx("ThresholdedRelu"), ThresholdGate)
    node = OnnxNode(helper.make_node("ThresholdedRelu", ["z"], ["y"], alpha=1.5), {})
    assert gate_for_onnx("ThresholdedRelu").onnx_params(node) == {"t": 1.5, "v": 0.0}
    assert gate_for_onnx("ThresholdedRelu").breakpoints({"t": 1.5, "v": 0.0}) == [1.5]
    assert isinstance(gate_for("Relu"), Elementwise) and gate_for("Relu").gate is gate_for_onnx("Relu")
    assert gate_types()[:6] + gate_types()[-2:] == ["Relu", "Clip", "LeakyRelu", "PRelu", "ThresholdedRelu",
                                                    "MaxPool", "ReduceMax", "GlobalMaxPool"]
    # the value rule's smooth gates (point-exact), in registration order
    assert gate_types()[6:-2] == ["Gelu", "HardSwish", "Mish", "Sigmoid", "Tanh", "Erf", "Softplus", "Elu", "Selu",
                                  "Celu", "HardSigmoid"]
    assert not any(gate_for(op).region_exact for op in gate_types()[6:-2])


# --------------------------------------------------------------------------
# One registry: an ONNX gate node and its torch twin record the same prior
# --------------------------------------------------------------------------

SLOPE = np.array([0.25, -0.5, 2.0], np.float32)  # PRelu, one per channel (ONNX shape (3, 1, 1))


def one_node(op, attrs=None, inits=None):
    """x (N, 3, 4, 4) -> op -> y: the gate on the input itself."""
    inits = inits or {}
    node = helper.make_node(op, ["x", *inits], ["y"], name="gate", **(attrs or {}))
    vi = [helper.make_tensor_value_info(n, TensorProto.FLOAT, ["N", 3, 4, 4]) for n in ("x", "y")]
    graph = helper.make_graph([node], "one", vi[:1], vi[1:],
                              initializer=[numpy_helper.from_array(np.asarray(v, np.float32), k)
                                           for k, v in inits.items()])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=9)


def _prelu():
    m = nn.PReLU(3)
    m.weight.data = torch.from_numpy(SLOPE)
    return m


# (ONNX op, attributes, constant inputs, the torch twin, the breakpoints placed in x)
TWINS = {
    "Relu": ({}, {}, nn.ReLU, [0.0]),
    "ThresholdedRelu": ({"alpha": 0.5}, {}, lambda: nn.Threshold(0.5, 0.0), [0.5]),
    "Clip": ({}, {"lo": -0.5, "hi": 0.75}, lambda: nn.Hardtanh(-0.5, 0.75), [-0.5, 0.75]),
    "LeakyRelu": ({"alpha": 0.2}, {}, lambda: nn.LeakyReLU(0.2), [0.0]),
    "PRelu": ({}, {"slope": SLOPE.reshape(3, 1, 1)}, _prelu, [0.0]),
}


@pytest.mark.parametrize("op", list(TWINS))
def test_onnx_and_torch_record_identical_priors(op):
    """Same z, same slope D, offset C and ties, bit for bit, with units exactly on every breakpoint."""
    attrs, inits, twin_of, points = TWINS[op]
    x = torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(7))
    flat = x.view(-1)
    for k, b in enumerate(points):
        flat[5 * k:5 * k + 3] = b  # three units on each breakpoint
    onnx_prior = rv.onnx.linearize(one_node(op, attrs, inits), x).priors[0]
    torch_prior = rv.linearize(nn.Sequential(twin_of()).eval(), x, dtype=torch.float32).priors[0]
    assert onnx_prior.gate == torch_prior.gate and onnx_prior.ties == torch_prior.ties == 3 * len(points)
    slope = torch_prior.tensors["slope"].numpy()
    offset = torch_prior.tensors.get("offset", torch.zeros(slope.shape)).numpy()
    assert onnx_prior.tensors["slope"].dtype == np.float32 and np.array_equal(onnx_prior.tensors["slope"], slope)
    assert np.array_equal(onnx_prior.tensors.get("offset", np.zeros_like(slope)), offset)
    assert len(np.unique(slope)) > 1  # both pieces met


def test_an_onnx_prelu_slope_broadcasts_from_the_last_axis():
    """ONNX PRelu broadcasts numpy-style: a 1-D slope of 4 runs along the last axis (W), not channels."""
    slope = np.array([0.5, -1.0, 2.0, 0.25], np.float32)
    x = torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(8))
    lin = rv.onnx.linearize(one_node("PRelu", inits={"slope": slope}), x)
    want = np.where(x.numpy() > 0, np.float32(1), np.broadcast_to(slope, x.shape))
    assert np.array_equal(lin.priors[0].tensors["slope"], want)


def test_onnx_clip_refuses_crossed_bounds_like_torch():
    with pytest.raises(UnsupportedGraphError, match="lower bound exceeds its upper bound"):
        rv.onnx.linearize(one_node("Clip", inits={"lo": 1.0, "hi": -1.0}), torch.randn(1, 3, 4, 4))


# --------------------------------------------------------------------------
# ReduceMax (what the torch.export-based exporter writes for adaptive_max_pool(z, 1))
# --------------------------------------------------------------------------


def reduce_max(opset, axes, keepdims, m):
    """x (N, 3, 4, 5) -> ReduceMax -> Flatten -> MatMul m; axes as input 1 (opset 18) or attribute."""
    inits = {"m": m}
    if opset >= 18:
        inits["axes"] = np.array(axes, np.int64)
        rmax = helper.make_node("ReduceMax", ["x", "axes"], ["r"], keepdims=keepdims, name="rmax")
    else:
        rmax = helper.make_node("ReduceMax", ["x"], ["r"], axes=axes, keepdims=keepdims, name="rmax")
    nodes = [rmax, helper.make_node("Flatten", ["r"], ["f"]), helper.make_node("MatMul", ["f", "m"], ["y"])]
    graph = helper.make_graph(nodes, "rmax", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 4, 5])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 2])],
                              initializer=[numpy_helper.from_array(v, k) for k, v in inits.items()])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=9)


@pytest.mark.parametrize("opset, axes, keepdims", [(13, [1], 0), (18, [-2, -1], 1), (18, [3, 1], 0)])
def test_reduce_max_gathers_at_the_arg_max(opset, axes, keepdims):
    size = {1: 3, 2: 4, 3: 5}
    kept = 60 // np.prod([size[a % 4] for a in axes])
    m = np.random.default_rng(4).standard_normal((kept, 2)).astype(np.float32)
    model = reduce_max(opset, axes, keepdims, m)
    x = torch.randn(2, 3, 4, 5, generator=torch.Generator().manual_seed(4))
    rec = rv.onnx.reconstruct(model, x)
    assert rec.meta["gates"] == {"ReduceMax": 1} and rec.meta["ties"] == 0 and rec.meta["max_rel_error"] <= F32
    f = lambda t: t.amax(dim=tuple(axes), keepdim=bool(keepdims)).flatten(1) @ torch.from_numpy(m).double()  # noqa
    jac = torch.stack([torch.autograd.functional.jacobian(f, x.double()[i:i + 1])[0, :, 0] for i in range(2)])
    assert torch.equal(rec.weight.double(), jac)  # 0/1 selections times m: exact in float32
    assert rec.meta["self_checks"][1]["passed"]
    # equal maxima: x[0] at (h, w) = (0, 0) in every channel, x[1] in channel 0's rows 0 and 1
    x[0, :, 0, 0], x[1, 0, :2] = 9.0, 9.0
    assert rv.onnx.reconstruct(model, x).meta["ties"] == {(1,): 1, (-2, -1): 1, (3, 1): 3}[tuple(axes)]


def test_reduce_max_over_the_batch_axis_is_refused():
    model = reduce_max(18, [0, 1], 1, np.ones((20, 2), np.float32))
    with pytest.raises(UnsupportedGraphError, match="rmax.*reduces over the batch axis"):
        rv.onnx.reconstruct(model, torch.randn(2, 3, 4, 5))


# --------------------------------------------------------------------------
# The exactness label, derived from the gates
# --------------------------------------------------------------------------


class PointThreshold(ThresholdGate):
    """A threshold gate registered as if it were smooth (frozen at the probe only)."""

    name = "point_threshold"
    region_exact = False


def test_exactness_is_derived_from_the_frozen_gates():
    w, b, wf, bf = weights(2)
    model = thresholded(w, b, wf, bf, 0.3)
    x = torch.randn(1, 2, 5, 5, generator=torch.Generator().manual_seed(2))
    exact = rv.onnx.reconstruct(model, x)
    assert exact.meta["exactness"] == exact.exactness == "region-exact"
    piecewise = [op for op in gate_types() if gate_for(op).region_exact]
    assert piecewise == ["Relu", "Clip", "LeakyRelu", "PRelu", "ThresholdedRelu", "MaxPool", "ReduceMax",
                         "GlobalMaxPool"]
    with registered(PointThreshold()):
        point = rv.onnx.reconstruct(model, x)
        lin = rv.onnx.linearize(model, x)
    assert point.meta["exactness"] == point.exactness == "point-exact"
    assert lin.exactness == "point-exact"  # the label was taken when the gate was frozen
    assert type(gate_for_onnx("ThresholdedRelu")) is ThresholdGate and gate_for("ThresholdedRelu").region_exact
    assert torch.equal(point.weight, exact.weight) and point.meta["max_rel_error"] <= F32
    region = point.meta["self_checks"][1]
    assert region["passed"] is None and region["max_rel_error"] is None and "point-exact" in region["detail"]
    assert point.meta["self_checks"][0]["passed"]  # g is affine either way


# --------------------------------------------------------------------------
# Self-checks
# --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def cnn():
    """The Conv-ThresholdedRelu-Gemm graph and 3 probes."""
    w, b, wf, bf = weights(3)
    return thresholded(w, b, wf, bf, 0.2), torch.randn(3, 2, 5, 5, generator=torch.Generator().manual_seed(3))


def test_self_checks_pass_and_are_saved(cnn, tmp_path):
    model, x = cnn
    rec = rv.onnx.reconstruct(model, x, seed=4)
    affinity, region = rec.meta["self_checks"]
    assert affinity["name"] == "affinity" and affinity["passed"] and affinity["max_rel_error"] <= 1e-5
    assert affinity["tolerance"] == F32 and "seed 4" in affinity["detail"]
    assert region["name"] == "region" and region["passed"] and region["max_rel_error"] <= 1e-5
    assert rec.meta["timings"]["self_checks"] > 0
    loaded = rv.Reconstruction.load(rec.save(tmp_path / "r.npz"))
    assert loaded.meta["self_checks"] == rec.meta["self_checks"]
    # the affinity point is x0 + d, far outside the probe's region: there the graph is not W x + b
    far = checks.affinity_point(x, 4)
    assert rel(ort_run(model, far), rec(far.double())) > 1e-2


def test_a_non_affine_linearized_graph_fails_affinity(cnn, monkeypatch):
    model, x = cnn
    real = checks.graph_at

    def quadratic(lin, xs):
        """g(x) + 0.01 |x - x0|^2: equal to g at the probe, not affine."""
        return real(lin, xs) + 0.01 * (xs - torch.from_numpy(lin.probes)).double().pow(2).flatten(1).sum(1, True)

    monkeypatch.setattr(checks, "graph_at", quadratic)
    with pytest.raises(ExactnessError, match=r"self-check 'affinity' failed: max relative error \S+ > "
                                             r"tolerance 0.0001 .*not affine") as info:
        rv.onnx.reconstruct(model, x)
    err = float(str(info.value).split("max relative error ")[1].split()[0])
    assert err > 1e-2


def test_a_model_that_leaves_w_x_plus_b_fails_region(cnn, monkeypatch):
    model, x = cnn
    real = checks.original_at
    monkeypatch.setattr(checks, "original_at", lambda lin, xs: (lambda f, i: (f * 1.01, i))(*real(lin, xs)))
    with pytest.raises(ExactnessError, match="self-check 'region' failed"):
        rv.onnx.reconstruct(model, x)


def test_region_points_keep_every_gate_choice(cnn):
    model, x = cnn
    lin = rv.onnx.linearize(model, x)
    e = checks.region_direction(torch.from_numpy(lin.probes).double(), 0)
    assert float(e.pow(2).mean().sqrt()) == pytest.approx(1.0, rel=0.5)  # of the probe's scale
    near = torch.from_numpy(lin.probes) + 1e-4 * e.float()
    _, inside = checks.original_at(lin, torch.cat([torch.from_numpy(lin.probes), near, -near]))
    assert inside.tolist() == [True] * 6 + [False] * 3  # -x is in another region


# --------------------------------------------------------------------------
# UnsupportedGraphError
# --------------------------------------------------------------------------


def test_unsupported_graph_error_is_an_unsupported_operation_error():
    n = helper.make_node
    graph = helper.make_graph(
        [n("Exp", ["x"], ["s"], name="gate"), n("Softmax", ["s"], ["p"], name="attention"),
         n("Relu", ["p"], ["y"])], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=9)
    with pytest.raises(UnsupportedGraphError) as info:
        rv.onnx.reconstruct(model, torch.randn(1, 4))
    e = info.value
    assert isinstance(e, UnsupportedOperationError)
    assert (e.operation, e.module_path, len(e.nodes)) == ("Exp", "gate", 2)
    assert str(e).startswith("cannot freeze operation 'Exp' called in module 'gate': a smooth non-linearity")
    assert e.args == (str(e),) and "2 node(s)" in str(e) and "ThresholdedRelu" in str(e)
    assert getattr(e, "advice", e.nodes[0][2]).startswith(e.nodes[0][2])


# --------------------------------------------------------------------------
# Exporters: torch.export-based first, TorchScript as the fallback
# --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def digits_model():
    from reconviz.models.digits import digits

    model, data = digits()
    return model, torch.from_numpy(data.x_test[:3])


def _exported(proto):
    props = {p.key: p.value for p in proto.metadata_props}
    dims = [[d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim]
            for v in (*proto.graph.input, *proto.graph.output)]
    return props["reconviz.exporter"], dims


def test_dynamo_export_of_the_digits_model(digits_model):
    model, x = digits_model
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        proto, why = rv.onnx.export_torch(model, x[:1].numpy(), ["logits"])
    assert why is None and [w.category.__name__ for w in caught if issubclass(w.category, DeprecationWarning)] == []
    assert _exported(proto) == ("dynamo", [["batch", 1, 8, 8], ["batch", 10]])
    assert proto.ir_version == 10  # onnxruntime 1.32 reads it (it runs below)
    with torch.no_grad():
        assert rel(ort_run(proto, x), model(x)) <= F32  # a batch of 3 from an example of 1
    rec = rv.onnx.reconstruct(proto, x)
    assert rec.meta["max_rel_error"] <= F32 and rec.meta["gates"] == {"Relu": 3, "MaxPool": 2}


def test_torchscript_fallback_when_dynamo_fails(digits_model, monkeypatch):
    model, x = digits_model
    real, calls = torch.onnx.export, []

    def no_dynamo(*a, **k):
        calls.append(bool(k.get("dynamo")))
        if k.get("dynamo"):
            raise RuntimeError("torch.export failed")
        return real(*a, **k)

    monkeypatch.setattr(torch.onnx, "export", no_dynamo)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        proto, why = rv.onnx.export_torch(model, x[:1].numpy())
    assert why is None and calls == [True, False]
    assert [w for w in caught if issubclass(w.category, DeprecationWarning)] == []
    assert _exported(proto) == ("torchscript", [["batch", 1, 8, 8], ["batch", 10]])
    assert proto.ir_version <= 10
    with torch.no_grad():
        assert rel(ort_run(proto, x), model(x)) <= F32


def test_the_legacy_exporter_warns_without_the_suppression(digits_model):
    """What the fallback suppresses: torch.onnx.export(dynamo=False) warns that it is deprecated."""
    import io

    model, x = digits_model
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.onnx.export(model, (x[:1],), io.BytesIO(), dynamo=False)
    assert sum(issubclass(w.category, DeprecationWarning) and "legacy TorchScript-based ONNX export" in str(w.message)
               for w in caught) == 1


# --------------------------------------------------------------------------
# reconviz.saliency imports guided backprop and deconvnet unconditionally
# --------------------------------------------------------------------------


def test_saliency_exports_guided_methods():
    from reconviz import saliency
    from reconviz.saliency import guided

    assert saliency.guided_backprop is guided.guided_backprop and saliency.deconvnet is guided.deconvnet
    assert {"guided_backprop", "deconvnet", "template"} <= set(saliency.__all__)
    model = nn.Sequential(nn.Linear(2, 2, bias=False), nn.ReLU(), nn.Linear(2, 1, bias=False)).eval()
    with torch.no_grad():
        model[0].weight.copy_(torch.tensor([[1.0, -1.0], [2.0, 1.0]]))  # z = (-1, 4): mask (0, 1)
        model[2].weight.copy_(torch.tensor([[1.0, 3.0]]))
    x = torch.tensor([[1.0, 2.0]])
    assert saliency.guided_backprop(model, x, 0).tolist() == [[6.0, 3.0]]  # (0, 3) W1
    assert saliency.deconvnet(model, x, 0).tolist() == [[7.0, 2.0]]  # (1, 3) W1


def test_a_broken_guided_module_is_an_import_error(monkeypatch):
    monkeypatch.delitem(sys.modules, "reconviz.saliency")
    monkeypatch.setitem(sys.modules, "reconviz.saliency.guided", None)  # import of it raises ImportError
    with pytest.raises(ImportError, match="reconviz.saliency.guided"):
        importlib.import_module("reconviz.saliency")
