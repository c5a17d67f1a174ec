"""Unit tests per gate type: each call form is recorded, frozen and replayed exactly."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import reconviz as rv
from archs import Fn
from conftest import assert_exact, registered


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
    "torch.threshold_": Fn(lambda t: torch.threshold_(t, 0.1, 0.0)),
    "F.relu6": Fn(lambda t: F.relu6(4 * t)),
    "nn.ReLU6(inplace)": nn.ReLU6(inplace=True),
    "F.hardtanh(inplace)": Fn(lambda t: F.hardtanh(t, -0.2, 0.3, inplace=True)),
    "nn.Hardtanh(inplace)": nn.Hardtanh(-0.1, 0.2, inplace=True),
    "clamp(tensor bounds)": Fn(lambda t: t.clamp(min=torch.full((1, 3, 1, 1), -0.1, dtype=t.dtype),
                                                 max=torch.full((1, 3, 1, 1), 0.2, dtype=t.dtype))),
    "Tensor.clamp_min_": Fn(lambda t: t.clamp_min_(0.0)),
    "torch.clamp_max": Fn(lambda t: torch.clamp_max(t, 0.1)),
    "F.leaky_relu(inplace)": Fn(lambda t: F.leaky_relu(t, 0.2, inplace=True)),
    "F.leaky_relu(default slope)": Fn(F.leaky_relu),
}


class PReLUFn(nn.Module):
    """PReLU through its functional forms, with the slope a registered parameter."""

    def __init__(self, form: str, n: int):
        super().__init__()
        self.form = form
        self.a = nn.Parameter(torch.linspace(0.05, 0.3, n))

    def forward(self, t):
        if self.form == "F.prelu":
            return F.prelu(t, self.a)
        if self.form == "torch.prelu":
            return torch.prelu(t, self.a)
        return t.prelu(self.a[:1])  # Tensor.prelu, one shared slope


for _form in ("F.prelu", "torch.prelu", "Tensor.prelu"):
    ELEMENTWISE[f"PReLU via {_form}"] = PReLUFn(_form, 3)


def _check_frozen_gate(model, x, expected_gate):
    lin = rv.linearize(model, x)
    assert expected_gate in lin.gate_counts(), lin.gate_counts()
    with torch.no_grad():
        f = copy.deepcopy(model).double()(x.double())  # a copy: the gate modules are shared by tests
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
    # every functional / with-indices / return_indices call form, 1d to 3d
    "F.max_pool1d(3,2,1,ceil)": (Fn(lambda t: F.max_pool1d(t, 3, 2, 1, ceil_mode=True)), (2, 11)),
    "F.max_pool1d(return_indices)": (Fn(lambda t: F.max_pool1d(t, 3, 2, 1, return_indices=True)), (2, 11)),
    "F.max_pool1d_with_indices": (Fn(lambda t: F.max_pool1d_with_indices(t, 2)), (2, 11)),
    "torch.max_pool1d(positional ceil)": (Fn(lambda t: torch.max_pool1d(t, 2, 2, 0, 1, True)), (2, 11)),
    "MaxPool1d(return_indices,ceil)": (nn.MaxPool1d(3, 2, 1, return_indices=True, ceil_mode=True), (2, 10)),
    "F.max_pool2d(positional return_indices)": (Fn(lambda t: F.max_pool2d(t, 3, 2, 1, 1, True, True)), (2, 8, 8)),
    "F.max_pool2d(keywords)": (Fn(lambda t: F.max_pool2d(t, kernel_size=(2, 3), stride=(2, 1), padding=(1, 1),
                                                        dilation=(1, 2), ceil_mode=True)), (2, 8, 9)),
    "F.max_pool2d(stride=[])": (Fn(lambda t: F.max_pool2d(t, 2, [])), (2, 6, 6)),
    "F.max_pool2d_with_indices(ceil)": (Fn(lambda t: F.max_pool2d_with_indices(t, 2, ceil_mode=True)), (2, 7, 7)),
    "F.max_pool3d(2,2,1,ceil)": (Fn(lambda t: F.max_pool3d(t, 2, 2, 1, ceil_mode=True)), (1, 5, 5, 5)),
    "F.max_pool3d(return_indices)": (Fn(lambda t: F.max_pool3d(t, 2, return_indices=True)), (1, 4, 4, 4)),
    "MaxPool3d(return_indices,dil)": (nn.MaxPool3d(2, 1, 0, dilation=2, return_indices=True), (1, 5, 5, 5)),
    "AdaptiveMaxPool1d(return_indices)": (nn.AdaptiveMaxPool1d(3, return_indices=True), (2, 10)),
    "AdaptiveMaxPool2d((None,2))": (nn.AdaptiveMaxPool2d((None, 2)), (2, 5, 6)),
    "AdaptiveMaxPool3d(return_indices)": (nn.AdaptiveMaxPool3d((2, 3, 2), return_indices=True), (1, 5, 7, 4)),
    "F.adaptive_max_pool1d(return_indices)": (Fn(lambda t: F.adaptive_max_pool1d(t, 4, True)), (2, 10)),
    "F.adaptive_max_pool2d_with_indices": (Fn(lambda t: F.adaptive_max_pool2d_with_indices(t, (2, 3))), (2, 7, 7)),
    "F.adaptive_max_pool3d": (Fn(lambda t: F.adaptive_max_pool3d(t, 2)), (1, 5, 5, 5)),
    "torch.adaptive_max_pool1d": (Fn(lambda t: torch.adaptive_max_pool1d(t, 3)), (2, 10)),
}


@pytest.mark.parametrize("name", list(POOLS))
def test_max_pool_gate(name):
    op, shape = POOLS[name]
    torch.manual_seed(2)
    model = Wrap(op, shape).eval()
    x = torch.randn(3, *shape)
    _check_frozen_gate(model, x, "max_pool")


# values on every breakpoint the gates above use, so the probe meets ties everywhere
_BREAKPOINTS = torch.tensor([-1.0, -0.5, -0.3, -0.2, -0.1, 0.0, 0.1, 0.2, 0.25, 0.3, 0.4, 0.5, 1.5, 2.0],
                            dtype=torch.float64)


@pytest.mark.parametrize("name", list(ELEMENTWISE) + list(POOLS))
def test_probe_pass_is_the_frozen_pass_value_for_value(name):
    """Every built-in gate continues the probe pass with its frozen form, which must equal the
    op's own output in value (ties included): the probe's logits are f(x0) exactly, and the
    kept graph is g's, whose gradient is W."""
    op, shape = (ELEMENTWISE[name], (3, 4, 4)) if name in ELEMENTWISE else POOLS[name]
    model = Wrap(op, shape).eval()
    g = torch.Generator().manual_seed(3)
    values = _BREAKPOINTS if name in ELEMENTWISE else _BREAKPOINTS[:3]  # pools: equal maxima
    x = values[torch.randint(len(values), (2, *shape), generator=g)]
    with torch.no_grad():
        f = copy.deepcopy(model).double()(x.clone())
    lin = rv.linearize(model, x, keep_graph=True)
    assert lin.ties > 0
    assert torch.equal(lin.logits, f)
    leaf, out = lin.take_graph()
    assert lin.take_graph() is None  # handed over once
    (grad,) = torch.autograd.grad(out[:, 1].sum(), leaf)
    rec = rv.reconstruct(model, x, method="basis")
    assert torch.allclose(grad.flatten(1), rec.weight[:, 1].flatten(1), rtol=0, atol=1e-12)


def test_a_custom_gate_continues_with_the_models_own_value(monkeypatch):
    """A user's gate with a wrong frozen rule (hardshrink frozen with an offset in its dead
    zone) must not pass the exactness check: only the built-in gates continue the probe pass
    with their frozen form, so the check compares W x0 + b with the model's own f(x0)."""
    from reconviz.ops.gates import Call, ElementwiseGate

    class WrongHardshrink(ElementwiseGate):
        name = "hardshrink_wrong"
        functions = (F.hardshrink,)

        def parse(self, func, args, kwargs):
            return Call(func, args[0], {})

        def slope_offset(self, z, p):
            inside = z.abs() <= 0.5
            return ~inside, torch.where(inside, torch.full_like(z, 0.25), torch.zeros_like(z))

        def breakpoints(self, p):
            return [-0.5, 0.5]

    assert not WrongHardshrink().records_frozen
    assert all(g.records_frozen for g in rv.registered_gates()[:6])  # the ReLU family and max pooling
    # the value rule's smooth gates continue with the op's own value too (softmax and the frozen
    # factors record the value itself)
    smooth = [g for g in rv.registered_gates()[6:] if g.name not in ("softmax", "factor")]
    assert smooth and not any(g.records_frozen for g in smooth)
    with registered(WrongHardshrink()):
        model = nn.Sequential(nn.Linear(4, 6), nn.Hardshrink(), nn.Linear(6, 3)).eval()
        with pytest.raises(rv.ExactnessError):
            rv.reconstruct(model, torch.randn(2, 4))


def test_an_input_dependent_gate_parameter_is_refused(untouched):
    class ClampByInput(nn.Module):
        def __init__(self):
            super().__init__()
            self.head = nn.Linear(4, 3)

        def forward(self, x):
            return self.head(torch.clamp(x, min=x[:, :1]))

    model = ClampByInput().eval()
    with untouched(model):
        with pytest.raises(rv.UnsupportedOperationError, match="depends on the input"):
            rv.reconstruct(model, torch.randn(2, 4))


def test_a_kept_graph_is_neither_copied_nor_moved():
    model = Wrap(nn.ReLU(), (3, 4, 4)).eval()
    lin = rv.linearize(model, torch.randn(2, 3, 4, 4), keep_graph=True)
    assert not copy.deepcopy(lin).has_graph and lin.has_graph
    lin.float()
    assert not lin.has_graph and lin.take_graph() is None


def test_a_linearized_model_keeps_no_graph_unless_asked():
    model = Wrap(nn.ReLU(), (3, 4, 4)).eval()
    assert rv.linearize(model, torch.randn(2, 3, 4, 4)).take_graph() is None


@pytest.mark.parametrize("k", [1, 2, 3])
def test_max_pool_tie_count_agrees_with_the_pairwise_count(k):
    """The tie count's fast paths (disjoint windows: mask the switch, pool again) equal the
    pairwise comparison of every window member, on random pools over tie-heavy inputs."""
    from reconviz.ops.gates import GATES, _disjoint, _pool

    gate = next(g for g in GATES if g.name == "max_pool")
    g = torch.Generator().manual_seed(k)
    seen = {True: 0, False: 0}
    for trial in range(80):
        size = tuple(int(s) for s in torch.randint(3, 9, (k,), generator=g))
        if trial % 4 == 0:
            p = dict(adaptive=True, output_size=tuple(int(torch.randint(1, s + 1, (), generator=g)) for s in size))
        else:
            kern, stride = (int(v) for v in torch.randint(1, 4, (2,), generator=g))
            p = dict(adaptive=False, kernel_size=kern, stride=stride, padding=int(trial % 2 and kern > 1),
                     dilation=1 + (trial % 3 == 0), ceil_mode=trial % 5 == 0)
            if (kern - 1) * p["dilation"] + 1 > min(size):
                continue
        p.update(k=k, return_indices=False, in_spatial=size)
        z = torch.randint(0, 3, (2, 3, *size), generator=g).double()
        if trial % 7 == 0:
            z[0, 0] = -math.inf  # a channel of -inf: no window there has a tie (its max is no number)
        out, idx = _pool(z, p)
        if idx.min() < 0 or idx.max() >= z[0, 0].numel():
            continue  # a window wholly in the padding: refused at the probe
        h, counted = gate._pairs(z, idx, p)
        assert gate._ties(z, idx, out, p) == int(((h == 0) & counted).any(-1).sum()), p
        seen[_disjoint(p, tuple(idx.shape[-k:]))] += 1
    assert seen[True] >= 10 and seen[False] >= 10, seen


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
    from reconviz.ops.gates import ElementwiseGate

    def my_relu(t):
        if torch.overrides.has_torch_function_unary(t):
            return torch.overrides.handle_torch_function(my_relu, (t,), t)
        return torch.where(t > 0, t, torch.zeros_like(t))

    class MyReLUGate(ElementwiseGate):
        name = "my_relu"
        functions = (my_relu,)

        def parse(self, func, args, kwargs):
            from reconviz.ops.gates import Call
            return Call(func, args[0], {})

        def slope_offset(self, z, p):
            return z > 0, None

        def breakpoints(self, p):
            return [0.0]

    with registered(MyReLUGate()):
        model = nn.Sequential(nn.Linear(5, 7), Fn(my_relu), nn.Linear(7, 3)).eval()
        x = torch.randn(2, 5)
        lin = rv.linearize(model, x)
        assert lin.gate_counts() == {"my_relu": 1}
        assert_exact(rv.reconstruct(model, x, method="basis"), model)
        assert_exact(rv.reconstruct(model, x, method="adjoint"), model)  # a custom gate: its graph is rebuilt


def _priors_equal(a, b) -> bool:
    return all(
        p.tensors.keys() == q.tensors.keys() and all(torch.equal(p.tensors[k], q.tensors[k]) for k in p.tensors)
        for p, q in zip(a.priors, b.priors)
    )


def _gate_model(name):
    if name in POOLS:
        op, shape = POOLS[name]
        torch.manual_seed(2)
        return Wrap(copy.deepcopy(op), shape).eval(), shape
    torch.manual_seed(1)
    return Wrap(copy.deepcopy(ELEMENTWISE[name]), (2, 5, 5), pre=nn.Conv2d(2, 3, 3, padding=1)).eval(), (2, 5, 5)


@pytest.mark.parametrize("name", list(ELEMENTWISE) + list(POOLS))
def test_certified_radius_is_the_distance_to_the_nearest_face(name):
    """The region geometry of every gate form (window tables with padding / dilation / ceil_mode,
    adaptive windows, 1d-3d; clamp's two breakpoints, threshold, leaky slopes): at 0.999 r along
    the way to the nearest face no prior changes, at 1.001 r one does."""
    from reconviz.radius import boundary_direction

    model, shape = _gate_model(name)
    x = torch.randn(1, *shape, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    lin = rv.linearize(model, x)
    radius = rv.certified_radius(lin)
    assert radius.ties == 0 and 0 < float(radius.linf[0]) <= float(radius.l2[0]) < float("inf")
    face = radius.nearest[0]
    direction = boundary_direction(lin, 0, face)
    r = float(radius.l2[0])
    inside, across = x + 0.999 * r * direction, x + 1.001 * r * direction
    assert _priors_equal(lin, rv.linearize(model, inside)), "a prior changed inside the certified radius"
    assert not _priors_equal(lin, rv.linearize(model, across)), "no prior changed across the nearest face"
    # L-inf: every corner of the cube of half-width 0.999 r_inf keeps every prior (checked on 8 corners)
    g = torch.Generator().manual_seed(4)
    for _ in range(8):
        corner = x + 0.999 * float(radius.linf[0]) * torch.sign(torch.randn(x.shape, generator=g, dtype=x.dtype))
        assert _priors_equal(lin, rv.linearize(model, corner))


def test_max_pool_window_entirely_in_padding_is_a_clear_error(untouched):
    """PyTorch returns -inf and an out-of-range index for such a window; there is no switch to
    freeze, so reconviz says so instead of failing inside its own gather."""
    model = nn.Sequential(nn.MaxPool2d(2, 1, 1, dilation=2), nn.Flatten(), nn.Linear(4, 2)).eval()
    x = torch.randn(1, 1, 1, 4)
    with torch.no_grad():
        assert not torch.isfinite(model(x)).any()  # -inf through the head: inf or nan
    with untouched(model):
        with pytest.raises(rv.InputError, match=r"lies entirely in the padding: its output is -inf"):
            rv.reconstruct(model, x)


def test_a_smooth_gate_is_labelled_point_exact_everywhere(tmp_path, point_exact_silu):
    """SiLU frozen at the probe, phi(z) = z * sigmoid(z0): exact at x0 only. The label comes
    from the gate (region_exact = False); verify skips the Jacobian check, the radius is 0."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.SiLU(), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 3)).eval()
    x = torch.randn(2, 6, dtype=torch.float64)
    rec = rv.reconstruct(model, x)
    assert rec.exactness == "point-exact" and rec.meta["exactness"] == "point-exact"
    report = rv.verify(model, rec)
    assert report.ok and report.max_rel_error <= 1e-9  # exact at the probe
    assert report.jacobian_max_error is None  # W is not the Jacobian of a smooth net
    assert torch.equal(report.radius.l2, torch.zeros(2, dtype=torch.float64))
    assert "point-exact, float64: PASS" in str(report)
    with torch.no_grad():  # and not exact nearby: there is no region
        near = x + 1e-3
        assert float((rec(near) - copy.deepcopy(model).double()(near)).abs().max()) > 1e-9
    assert rv.Reconstruction.load(rec.save(tmp_path / "r.npz")).exactness == "point-exact"


def test_the_registry_is_read_as_a_tuple_and_changed_only_by_registering():
    """rv.registered_gates() is a snapshot (a tuple: no append); the old rv.GATES name reads
    the same snapshot with a DeprecationWarning."""
    gates = rv.registered_gates()
    assert isinstance(gates, tuple) and [g.name for g in gates[:6]] == [
        "relu", "clamp", "leaky_relu", "prelu", "threshold", "max_pool"]
    with pytest.warns(DeprecationWarning, match="registered_gates"):
        old = rv.GATES
    assert old == gates and not hasattr(old, "append")


def test_one_registry_routes_onnx_op_types_and_restores_them():
    """A gate's onnx_ops route ONNX nodes to it (later registrations win) for as long as it is
    registered; onnx_ops must be a tuple of op type names."""
    from reconviz.ops import registered as registered_for
    from reconviz.ops.gates import ReLUGate, gate_for_onnx

    class MyRelu(ReLUGate):
        name, onnx_ops = "my_relu", ("Relu", "MyRelu")

    class Bad(ReLUGate):
        name, onnx_ops = "bad_relu", "Relu"

    mine = MyRelu()
    assert type(gate_for_onnx("Relu")) is ReLUGate and gate_for_onnx("MyRelu") is None
    with registered_for(mine):
        assert gate_for_onnx("Relu") is mine and gate_for_onnx("MyRelu") is mine
    assert type(gate_for_onnx("Relu")) is ReLUGate and gate_for_onnx("MyRelu") is None
    with pytest.raises(rv.InputError, match="onnx_ops must be a tuple"):
        rv.register_gate(Bad())
    assert gate_for_onnx("Relu") is not None and "bad_relu" not in [g.name for g in rv.registered_gates()]


def test_frozen_gates_keep_a_channels_last_input_in_its_layout():
    """A channels-last input stays channels-last through the frozen ReLU and max pool (a gather,
    contiguous by itself), in the probe pass and in the replay, as through torch's own ops: the
    next convolution runs the kernels the model runs (up to 2x faster on a CPU). W unchanged."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(8, 4, 3, padding=1),
                        nn.ReLU(), nn.Flatten(), nn.Linear(64, 5)).double().eval()
    x = torch.randn(2, 3, 8, 8).contiguous(memory_format=torch.channels_last)
    layouts: list[bool] = []
    net[3].register_forward_pre_hook(
        lambda m, a: layouts.append(a[0].is_contiguous(memory_format=torch.channels_last)))
    net(x.double())
    lin = rv.linearize(net, x, keep_hooks=True)
    lin(x.double())
    assert layouts == [True, True, True]  # the model's own pass, the probe pass, the replay
    rec = rv.reconstruct(net, x, keep_hooks=True)
    jac = torch.autograd.functional.jacobian(lambda v: net(v.unsqueeze(0))[0], x[0].double())
    torch.testing.assert_close(rec.weight[0], jac.reshape(5, *x.shape[1:]), rtol=0, atol=1e-12)
