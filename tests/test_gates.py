"""Unit tests per gate type: each call form is recorded, frozen and replayed exactly."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import reconviz as rv
from archs import Fn
from conftest import assert_exact


class Wrap(nn.Module):
    """conv/linear -> gate op -> linear head, so the gate sits between affine maps."""

    def __init__(self, op, in_shape, pre=None):
        super().__init__()
        torch.manual_seed(0)
        self.pre = pre if pre is not None else nn.Identity()
        self.op = op
        with torch.no_grad():
            y = self.op(self.pre(torch.zeros(1, *in_shape)))
            n = (y[0] if isinstance(y, tuple) else y).numel()
        self.head = nn.Linear(n, 4)

    def forward(self, x):
        y = self.op(self.pre(x))
        if isinstance(y, tuple):
            y = y[0]
        return self.head(y.flatten(1))



ELEMENTWISE = {
    "nn.ReLU": nn.ReLU(),
    "nn.ReLU(inplace)": nn.ReLU(inplace=True),
    "F.relu": Fn(F.relu),
    "F.relu(inplace)": Fn(lambda t: F.relu(t, inplace=True)),
    "torch.relu": Fn(torch.relu),
    "torch.relu_": Fn(torch.relu_),
    "F.relu_": Fn(F.relu_),
    "Tensor.relu": Fn(lambda t: t.relu()),
    "Tensor.relu_": Fn(lambda t: t.relu_()),
    "nn.ReLU6": nn.ReLU6(),
    "F.relu6(inplace)": Fn(lambda t: F.relu6(t, inplace=True)),
    "nn.Hardtanh": nn.Hardtanh(-0.3, 0.4),
    "F.hardtanh_": Fn(lambda t: F.hardtanh_(t, -0.2, 0.5)),
    "clamp": Fn(lambda t: t.clamp(-0.1, 0.3)),
    "torch.clamp(min)": Fn(lambda t: torch.clamp(t, min=0.1)),
    "clamp_": Fn(lambda t: t.clamp_(max=0.2)),
    "clip": Fn(lambda t: torch.clip(t, -0.2, 0.2)),
    "clamp_min": Fn(lambda t: torch.clamp_min(t, 0.0)),
    "nn.LeakyReLU": nn.LeakyReLU(0.05),
    "nn.LeakyReLU(inplace)": nn.LeakyReLU(0.2, inplace=True),
    "F.leaky_relu_": Fn(lambda t: F.leaky_relu_(t, 0.3)),
    "nn.PReLU(per channel)": nn.PReLU(3, init=0.2),
    "nn.PReLU(shared)": nn.PReLU(init=0.1),
    "nn.Threshold": nn.Threshold(0.1, -0.5),
    "F.threshold(inplace)": Fn(lambda t: F.threshold(t, -0.1, 0.25, inplace=True)),
}


def _check_frozen_gate(model, x, expected_gate):
    lin = rv.linearize(model, x)
    assert expected_gate in lin.gate_counts(), lin.gate_counts()
    with torch.no_grad():
        f = model.double()(x.double())
    assert torch.allclose(lin(x), f, rtol=0, atol=1e-12)  # g(x0) = f(x0)
    for method in ("basis", "adjoint"):
        rec = rv.reconstruct(model, x, method=method)
        assert rec.meta["max_rel_error"] <= 1e-9
        assert_exact(rec, model)
    # the frozen network is affine: g(a + b) - g(b) = g(a) - g(0)
    a, b = torch.randn_like(x).double(), torch.randn_like(x).double()
    zero = torch.zeros_like(a)
    assert torch.allclose(lin(a + b) - lin(b), lin(a) - lin(zero), atol=1e-10)
    return lin


@pytest.mark.parametrize("name", list(ELEMENTWISE))
def test_elementwise_gate(name):
    torch.manual_seed(1)
    conv = nn.Conv2d(2, 3, 3, padding=1)
    model = Wrap(ELEMENTWISE[name], (2, 5, 5), pre=conv).eval()
    x = torch.randn(2, 2, 5, 5)
    gate = {"LeakyReLU": "leaky_relu", "leaky": "leaky_relu", "PReLU": "prelu", "Threshold": "threshold",
            "threshold": "threshold"}
    expected = next((v for k, v in gate.items() if k in name), None)
    if expected is None:
        expected = "relu" if "relu" in name.lower() and "6" not in name else "clamp"
    _check_frozen_gate(model, x, expected)


POOLS = {
    "MaxPool1d(3,2,1)": (nn.MaxPool1d(3, 2, 1), (2, 11)),
    "MaxPool1d(ceil,dil2)": (nn.MaxPool1d(2, 2, 0, dilation=2, ceil_mode=True), (2, 10)),
    "MaxPool2d(2)": (nn.MaxPool2d(2), (2, 6, 6)),
    "MaxPool2d(3,2,1,ceil)": (nn.MaxPool2d(3, 2, 1, ceil_mode=True), (2, 7, 7)),
    "MaxPool2d(rect,dil)": (nn.MaxPool2d((2, 3), (1, 2), (1, 1), dilation=(2, 1)), (2, 7, 8)),
    "MaxPool2d(return_indices)": (nn.MaxPool2d(2, return_indices=True), (2, 6, 6)),
    "F.max_pool2d": (Fn(lambda t: F.max_pool2d(t, 3, 2, ceil_mode=True)), (2, 8, 8)),
    "torch.max_pool2d": (Fn(lambda t: torch.max_pool2d(t, 2)), (2, 6, 6)),
    "MaxPool3d(2,ceil)": (nn.MaxPool3d(2, ceil_mode=True), (1, 5, 5, 5)),
    "MaxPool3d(3,2,1)": (nn.MaxPool3d(3, 2, 1), (1, 6, 6, 6)),
    "AdaptiveMaxPool1d": (nn.AdaptiveMaxPool1d(4), (2, 11)),
    "AdaptiveMaxPool2d": (nn.AdaptiveMaxPool2d((3, 2)), (2, 7, 5)),
    "AdaptiveMaxPool2d(indices)": (nn.AdaptiveMaxPool2d(3, return_indices=True), (2, 7, 7)),
    "AdaptiveMaxPool3d": (nn.AdaptiveMaxPool3d(2), (1, 5, 4, 5)),
    "F.adaptive_max_pool2d": (Fn(lambda t: F.adaptive_max_pool2d(t, 1)), (2, 5, 5)),
}


@pytest.mark.parametrize("name", list(POOLS))
def test_max_pool_gate(name):
    op, shape = POOLS[name]
    torch.manual_seed(2)
    model = Wrap(op, shape).eval()
    x = torch.randn(3, *shape)
    _check_frozen_gate(model, x, "max_pool")


def test_max_unpool_uses_replayed_switches():
    """Indices returned by a frozen max-pool are the probe's, batch-broadcast: unpooling works."""

    class PoolUnpool(nn.Module):
        def __init__(self):
            super().__init__()
            self.pool, self.unpool = nn.MaxPool2d(2, return_indices=True), nn.MaxUnpool2d(2)
            self.head = nn.Linear(2 * 6 * 6, 3)

        def forward(self, x):
            y, idx = self.pool(x)
            return self.head(self.unpool(y, idx).flatten(1))

    x = torch.randn(2, 2, 6, 6)
    model = PoolUnpool().eval()
    rec = rv.reconstruct(model, x, method="basis", chunk_size=5)
    assert_exact(rec, model)
    # unpooling keeps exactly the switch positions: template is zero elsewhere
    nonzero_per_channel = (rec.weight[0, 0] != 0).sum(dim=(1, 2))
    assert nonzero_per_channel.tolist() == [9, 9]  # one switch per 2x2 window, 9 windows


def test_frozen_relu_is_not_relu_outside_region():
    """The linearized model keeps the probe's mask: at -x0 it differs from the model."""
    model = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 2)).eval()
    x = torch.randn(1, 4)
    lin = rv.linearize(model, x)
    with torch.no_grad():
        assert not torch.allclose(lin(-x), model.double()(-x.double()))


def test_relu_tie_is_counted_and_radius_zero():
    lin_layer = nn.Linear(2, 2)
    with torch.no_grad():
        lin_layer.weight.copy_(torch.tensor([[1.0, -1.0], [1.0, 1.0]]))
        lin_layer.bias.zero_()
    model = nn.Sequential(lin_layer, nn.ReLU(), nn.Linear(2, 1)).eval()
    x = torch.tensor([[0.5, 0.5]])  # first pre-activation is exactly 0
    lin = rv.linearize(model, x)
    assert lin.ties == 1
    r = rv.certified_radius(model, x)
    assert r.ties == 1 and float(r.l2[0]) == 0.0 and float(r.linf[0]) == 0.0


def test_max_pool_tie_is_counted():
    model = nn.Sequential(nn.MaxPool2d(2), nn.Flatten(), nn.Linear(4, 2)).eval()
    x = torch.randn(1, 1, 4, 4)
    x[0, 0, 0, 0] = x[0, 0, 0, 1] = 10.0  # two equal maxima in the first window
    lin = rv.linearize(model, x)
    assert lin.ties == 1
    r = rv.certified_radius(model, x)
    assert r.ties == 1 and float(r.l2[0]) == 0.0


def test_register_gate_is_the_only_extension_point():
    """A new gate type registered from outside is used by probe, replay and solve."""
    from reconviz.gates import ElementwiseGate, _BY_FUNC

    def my_relu(t):
        if torch.overrides.has_torch_function_unary(t):
            return torch.overrides.handle_torch_function(my_relu, (t,), t)
        return torch.where(t > 0, t, torch.zeros_like(t))

    class MyReLUGate(ElementwiseGate):
        name = "my_relu"
        functions = (my_relu,)

        def parse(self, func, args, kwargs):
            from reconviz.gates import Call
            return Call(func, args[0], {})

        def slope_offset(self, z, p):
            return z > 0, None

        def breakpoints(self, p):
            return [0.0]

    gate = rv.register_gate(MyReLUGate())
    try:
        model = nn.Sequential(nn.Linear(5, 7), Fn(my_relu), nn.Linear(7, 3)).eval()
        x = torch.randn(2, 5)
        lin = rv.linearize(model, x)
        assert lin.gate_counts() == {"my_relu": 1}
        assert_exact(rv.reconstruct(model, x, method="basis"), model)
    finally:
        rv.GATES.remove(gate)
        _BY_FUNC.pop(my_relu, None)
        from reconviz.gates import _BY_NAME
        _BY_NAME.pop("my_relu", None)
