"""docs/extending.md's worked examples, asserted: a custom piecewise-linear gate and a custom
affine op, registered for a block, work in reconstruct, verify, guided backprop and layer
gradients, and the gate in the ONNX path too; outside the block they are refused again."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import reconviz as rv
from reconviz.ops import Linear, classify, registered
from reconviz.ops.gates import Call, ElementwiseGate, gate_for_onnx

from conftest import assert_exact, snapshot


class HardshrinkGate(ElementwiseGate):
    """hardshrink(z, l) = z where |z| > l, else 0: D = 1[|z| > l], no offset, breakpoints +-l."""

    name = "hardshrink"
    functions = (F.hardshrink, torch.hardshrink, torch.Tensor.hardshrink)
    onnx_ops = ("Shrink",)  # ONNX Shrink: z + bias below -lambd, z - bias above lambd, else 0

    def parse(self, func, args, kwargs):
        lambd = args[1] if len(args) > 1 else kwargs.get("lambd", 0.5)
        return Call(func, args[0], {"lambd": float(lambd)})

    def onnx_params(self, node):
        if node.attr("bias", 0.0) != 0:
            raise rv.UnsupportedOperationError(node.op_type, node.name, "a Shrink with a bias is softshrink")
        return {"lambd": float(node.attr("lambd", 0.5))}

    def slope_offset(self, z, p):
        return (z.abs() > p["lambd"]).to(z.dtype), None

    def breakpoints(self, p):
        return [-p["lambd"], p["lambd"]]

    def backward_signal(self, call):
        return None  # not a rectifier: guided backprop and deconvnet use its ordinary backward


def _net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 3, 3), nn.Hardshrink(0.1), nn.MaxPool2d(2), nn.Flatten(),
                         nn.Linear(12, 4)).double().eval()


X = torch.randn(2, 1, 6, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(3))


def test_a_custom_gate_is_refused_until_registered():
    with pytest.raises(rv.UnsupportedOperationError, match="hardshrink"):
        rv.reconstruct(_net(), X)


def test_a_registered_custom_gate_works_everywhere():
    model = _net()
    before = snapshot(model)
    with registered(HardshrinkGate()):
        assert classify(F.hardshrink) == "gate"
        for method in ("adjoint", "basis"):
            rec = rv.reconstruct(model, X, method=method)
            assert rec.exactness == "region-exact" and assert_exact(rec, model) <= 1e-9
        report = rv.verify(model, rec, radius=True)
        assert report.ok and report.jacobian_max_error <= 1e-9
        assert bool((report.radius.l2 > 0).all())
        # inside the certified radius the reconstruction stays exact
        u = torch.randn_like(X)
        u = u / u.flatten(1).norm(dim=1).reshape(-1, 1, 1, 1)
        inside = X + 0.9 * report.radius.l2.reshape(-1, 1, 1, 1) * u
        assert assert_exact(rec, model, inside) <= 1e-9
        guided = rv.saliency.guided_backprop(model, X, target=1)
        grad = rv.saliency.gradient(model, X, target=1)
        assert torch.equal(torch.as_tensor(guided), torch.as_tensor(grad))  # not a rectifier: plain backward
        fields = rv.saliency.receptive_fields(model, X)
        assert fields  # the connectivity test ran through the custom gate (identity there)
    assert classify(F.hardshrink) == "refused"
    assert snapshot(model) == before


def _dyadic_net():
    """_net's layers with weights and biases k / 8: with inputs k / 64 in [-1, 1] every value
    computed is a dyadic rational that float32 holds exactly (the solve's scale 2^12 too), so
    float32 onnxruntime and float64 torch agree to the last bit."""
    model = _net()
    g = torch.Generator().manual_seed(4)
    for p in model.parameters():
        p.data = torch.randint(-8, 9, p.shape, generator=g).double() / 8
    return model


def _shrink_graph(model, bias=0.0):
    """model as ONNX: Conv -> Shrink (hardshrink) -> MaxPool -> Flatten -> Gemm."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    conv, shrink, _, _, fc = model
    n = helper.make_node
    nodes = [n("Conv", ["x", "w", "b"], ["c"]), n("Shrink", ["c"], ["s"], lambd=shrink.lambd, bias=bias, name="shrink"),
             n("MaxPool", ["s"], ["p"], kernel_shape=[2, 2], strides=[2, 2]), n("Flatten", ["p"], ["f"]),
             n("Gemm", ["f", "wf", "bf"], ["y"], transB=1)]
    weights = {"w": conv.weight, "b": conv.bias, "wf": fc.weight, "bf": fc.bias}
    inits = [numpy_helper.from_array(v.detach().float().numpy(), k) for k, v in weights.items()]
    graph = helper.make_graph(nodes, "shrink", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 1, 6, 6])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4])], initializer=inits)
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=9)
    onnx.checker.check_model(proto)
    return proto


def _affine(rec, x):
    """W x + b in float64."""
    return torch.einsum("nkd,nd->nk", rec.weight.double().flatten(2), x.flatten(1)) + rec.bias.double()


def test_a_registered_custom_gate_works_in_the_onnx_path():
    model = _dyadic_net()
    proto = _shrink_graph(model)
    x = torch.randint(-64, 65, (2, 1, 6, 6), generator=torch.Generator().manual_seed(6)).double() / 64
    with pytest.raises(rv.onnx.UnsupportedGraphError, match="Shrink"):
        rv.onnx.reconstruct(proto, x)
    with registered(HardshrinkGate()):
        assert isinstance(gate_for_onnx("Shrink"), HardshrinkGate)
        rec = rv.onnx.reconstruct(proto, x)
        torch_rec = rv.reconstruct(model, x)
        with pytest.raises(rv.onnx.UnsupportedGraphError, match="softshrink"):
            rv.onnx.reconstruct(_shrink_graph(model, bias=0.5), x)
    assert rec.meta["gates"] == {"Shrink": 1, "MaxPool": 1} and rec.exactness == "region-exact"
    assert rec.meta["ties"] == torch_rec.meta["ties"] == 0 and all(c["passed"] for c in rec.meta["self_checks"])
    ort = torch.from_numpy(rv.onnx.run_model(proto, x.float().numpy())).double()
    with torch.no_grad():
        f = model(x)
    for y in (ort, f):  # onnxruntime (float32, exact here) and torch (float64)
        assert float(((_affine(rec, x) - y).abs() / y.abs().clamp_min(1)).max()) <= 1e-9
    assert float((rec.weight.double() - torch_rec.weight).abs().max()) <= 1e-9 * float(torch_rec.weight.abs().max())
    # outside the block the op type is refused again, as before registering
    assert gate_for_onnx("Shrink") is None
    with pytest.raises(rv.onnx.UnsupportedGraphError, match="Shrink"):
        rv.onnx.reconstruct(proto, x)


def test_a_gate_without_a_backward_rule_is_refused_by_guided_backprop():
    class NoRule(HardshrinkGate):
        backward_signal = ElementwiseGate.backward_signal

    with registered(NoRule()):
        with pytest.raises(rv.UnsupportedOperationError, match="defines no rule for guided backprop"):
            rv.saliency.guided_backprop(_net(), X, target=0)


def test_a_registered_affine_op():
    """torch.fliplr is on the allowlist; a user op built on handle_torch_function is not, until
    registered as Linear (here a mirror, which is linear)."""

    def mirror(t):
        if torch.overrides.has_torch_function_unary(t):
            return torch.overrides.handle_torch_function(mirror, (t,), t)
        return t.flip(-1)

    class Mirrored(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.fc = nn.Conv2d(1, 2, 3), nn.Linear(32, 3)

        def forward(self, x):
            return self.fc(F.relu(mirror(self.conv(x))).flatten(1))

    model = Mirrored().double().eval()
    with pytest.raises(rv.UnsupportedOperationError, match="mirror"):
        rv.reconstruct(model, X)
    with registered(Linear(functions=(mirror,))):
        assert assert_exact(rv.reconstruct(model, X), model) <= 1e-9
