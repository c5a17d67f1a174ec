"""docs/extending.md's worked examples, asserted: a custom piecewise-linear gate and a custom
affine op, registered for a block, work in reconstruct, verify, guided backprop and layer
gradients; outside the block they are refused again."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import reconviz as rv
from reconviz.ops import Linear, classify, registered
from reconviz.ops.gates import Call, ElementwiseGate

from conftest import assert_exact, snapshot


class HardshrinkGate(ElementwiseGate):
    """hardshrink(z, l) = z where |z| > l, else 0: D = 1[|z| > l], no offset, breakpoints +-l."""

    name = "hardshrink"
    functions = (F.hardshrink, torch.hardshrink, torch.Tensor.hardshrink)

    def parse(self, func, args, kwargs):
        lambd = args[1] if len(args) > 1 else kwargs.get("lambd", 0.5)
        return Call(func, args[0], {"lambd": float(lambd)})

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
