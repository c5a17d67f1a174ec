"""The op registry: the allowlist is affine op by op, unknown ops are refused, gates and ops
register for a block only, and the probe's own checks (frozen form = op, constant gates)."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import reconviz as rv
from reconviz.ops import AFFINE_OPS, REFUSED_OPS, Linear, Refused, classify, registered
from reconviz.ops.base import callables_named

from conftest import assert_exact, assert_value_rule, snapshot

C = torch.arange(1.0, 7.0, dtype=torch.float64).reshape(1, 1, 1, 6) / 7  # a constant operand
MASK = torch.tensor([True, False, True, False, False, True]).reshape(1, 1, 1, 6)

# z: (N, 2, 6, 6) float64, input-dependent; every call returns a tensor of z's batch size
AFFINE_CALLS = {
    "view/reshape": lambda z: z.view(z.shape[0], -1).reshape(z.shape),
    "permute/transpose": lambda z: z.permute(0, 1, 3, 2).transpose(2, 3),
    "flatten/unflatten": lambda z: z.flatten(2).unflatten(2, (6, 6)),
    "getitem": lambda z: z[:, :, 1:5, ::2],
    "setitem": lambda z: _setitem(z),
    "cat/stack": lambda z: torch.cat([z, torch.stack([z[:, 0], z[:, 1]], 1)], 1),
    "split/chunk": lambda z: torch.cat(z.split(1, 1), 1) + torch.cat(z.chunk(2, 3)[::-1], 3),
    "add/sub/neg": lambda z: (z + C) - 2 * (-z) + z.sub(C),
    "mul by constant": lambda z: z * C * 0.5,
    "matmul by constant": lambda z: z @ C.transpose(-1, -2).expand(1, 1, 6, 6),
    "einsum with constant": lambda z: torch.einsum("nchw,w->nch", z, C.flatten()).unsqueeze(-1),
    "div by constant": lambda z: z / (C + 1) + torch.div(z, 3.0),
    "rdiv of constant": lambda z: z + (C + 1).__rtruediv__(torch.tensor(2.0, dtype=torch.float64)),
    "sum/mean/cumsum": lambda z: z.sum(1, keepdim=True) + z.mean(-1, keepdim=True) + z.cumsum(-1),
    "pad reflect": lambda z: F.pad(z, (1, 1, 1, 1), mode="reflect"),
    "pad constant": lambda z: F.pad(z, (1, 2, 0, 1), value=0.5),
    "interpolate bilinear": lambda z: F.interpolate(z, scale_factor=2, mode="bilinear", align_corners=False),
    "interpolate nearest": lambda z: F.interpolate(z, size=(4, 4), mode="nearest"),
    "avg_pool": lambda z: F.avg_pool2d(z, 2),
    "adaptive_avg_pool": lambda z: F.adaptive_avg_pool2d(z, 3),
    "where constant mask": lambda z: torch.where(MASK, z, 0.0),
    "masked_fill constant mask": lambda z: z.masked_fill(MASK, -1.0),
    "index_select/gather": lambda z: z.index_select(3, torch.tensor([0, 2, 4])).gather(
        3, torch.zeros(z.shape[0], 2, 6, 1, dtype=torch.long)),
    "flip/roll/rot90": lambda z: z.flip(3).roll(1, 2) + z.rot90(1, (2, 3)),
    "expand/repeat": lambda z: z[:, :1].expand(-1, 2, -1, -1) + z.repeat(1, 1, 1, 1),
    "pixel_shuffle": lambda z: F.pixel_shuffle(z.repeat(1, 2, 1, 1), 2),
    "unfold (im2col)": lambda z: F.unfold(z, 2),
    "tril/diagonal": lambda z: z.tril() + z.diagonal(0, 2, 3).unsqueeze(-1),
    "lerp constant weight": lambda z: torch.lerp(z, C.expand_as(z), 0.25),
    "conv with constant weight": lambda z: F.conv2d(z, torch.ones(3, 2, 2, 2, dtype=z.dtype), torch.ones(3, dtype=z.dtype)),
    "linear with constant weight": lambda z: F.linear(z, torch.ones(4, 6, dtype=z.dtype)),
    "addmm with constant": lambda z: torch.addmm(z.flatten(1)[:, :6], z.flatten(1), torch.ones(72, 6, dtype=z.dtype)),
    "cast to float64": lambda z: z.to(torch.float64).double().type_as(z),
    "zeros_like/new_ones": lambda z: z + torch.zeros_like(z) + z.new_ones(z.shape),
    "batch_norm eval": lambda z: F.batch_norm(z, torch.zeros(2, dtype=z.dtype), torch.ones(2, dtype=z.dtype) * 2),
    "dropout eval": lambda z: F.dropout(z, 0.5, training=False),
    "relu of a constant": lambda z: z * F.relu(C - 0.3),
    "sigmoid of a constant": lambda z: z * torch.sigmoid(C),
    "clone/contiguous/T": lambda z: z.clone().contiguous().flatten(1).T.T,
    "trapezoid with constant x": lambda z: z + torch.trapezoid(z, C.flatten(), dim=-1).unsqueeze(-1),
    "instance norm with running statistics": lambda z: F.instance_norm(
        z, torch.tensor([0.1, -0.2], dtype=z.dtype), torch.tensor([2.0, 0.5], dtype=z.dtype), use_input_stats=False),
    "view of a tensor written in place": lambda z: _view_then_inplace(z),
}


def _view_then_inplace(z):
    z = z.clone()
    flat = z.view(z.shape[0], -1)
    z.add_(1.0)  # the view's autograd node is regenerated: still a seen computation
    return flat.reshape(z.shape) * 2


def _setitem(z):
    out = torch.zeros_like(z)
    out[:, :, 1:3] = z[:, :, 2:4] * 2
    return out


class Wrap(nn.Module):
    """conv -> the call -> flatten -> linear: the call sees input-dependent tensors."""

    def __init__(self, fn):
        super().__init__()
        self.fn = fn
        self.conv = nn.Conv2d(1, 2, 3, padding=1)
        self.head = nn.LazyLinear(3)

    def forward(self, x):
        return self.head(self.fn(self.conv(x)).flatten(1))


def _model(fn):
    torch.manual_seed(0)
    m = Wrap(fn).double()
    m(torch.zeros(1, 1, 6, 6, dtype=torch.float64))  # materialise the lazy layer
    return m.eval()


@pytest.mark.parametrize("name", sorted(AFFINE_CALLS))
def test_allowlisted_call_is_affine_and_reconstructs_exactly(name):
    fn = AFFINE_CALLS[name]
    gen = torch.Generator().manual_seed(1)
    x, y = (torch.randn(2, 2, 6, 6, generator=gen, dtype=torch.float64) for _ in range(2))
    zero = fn(torch.zeros_like(x))
    lhs = fn(2.5 * x - 1.5 * y) - zero
    rhs = 2.5 * (fn(x) - zero) - 1.5 * (fn(y) - zero)
    assert torch.allclose(lhs, rhs, rtol=1e-12, atol=1e-12), "the call itself is not affine"
    model = _model(fn)
    probe = torch.randn(2, 1, 6, 6, generator=gen, dtype=torch.float64)
    before = snapshot(model)
    for method in ("adjoint", "basis"):
        rec = rv.reconstruct(model, probe, method=method)
        assert rec.exactness == "region-exact"
        assert assert_exact(rec, model) <= 1e-9
        checks = {c["name"]: c for c in rec.meta["self_checks"]}
        assert checks["affinity"]["passed"] is True and checks["affinity"]["max_rel_error"] <= 1e-9
    assert snapshot(model) == before


REFUSED_CALLS = {
    "x * x": (lambda z: z * z, "Tensor.mul"),
    "division by z": (lambda z: 1.0 / (z.abs() + 1), "Tensor.abs"),
    "floor division": (lambda z: torch.div(z, 2, rounding_mode="floor"), "div"),
    "comparison": (lambda z: z * (z > 0), "Tensor.gt"),
    "cast to int": (lambda z: z.long().double(), "Tensor.long"),
    "cast to float32": (lambda z: z.float().double(), "Tensor.float"),
    "detach": (lambda z: z * z.detach(), "Tensor.detach"),
    "item": (lambda z: z * z.sum().item(), "Tensor.item"),
    "data": (lambda z: z * z.data, "Tensor.data"),
    "no_grad block": (lambda z: z * _no_grad_sum(z), "Tensor.sum"),
    "custom autograd Function": (lambda z: _Twice.apply(z), "Tensor.mul"),
    "random noise": (lambda z: z + torch.randn(z.shape, dtype=z.dtype), "randn"),
    "random like": (lambda z: z + torch.rand_like(z), "rand_like"),
    "aten op": (lambda z: torch.ops.aten.abs(z), "aten::abs"),
    "aten relu": (lambda z: torch.ops.aten.relu.default(z), "aten::relu"),
    "grid from input": (lambda z: F.grid_sample(z, z[:, :, :, :2].permute(0, 2, 3, 1).clamp(-1, 1) * 0 + z[:, :1, :, :2].permute(0, 2, 3, 1), align_corners=False), "grid_sample"),
    "conv with input weight": (lambda z: F.conv2d(z, z[:1, :, :2, :2]), "conv2d"),
    "batch_norm training": (lambda z: F.batch_norm(z, None, None, training=True), "batch_norm"),
    "dropout training": (lambda z: F.dropout(z, 0.5, training=True), "dropout"),
    "unknown op": (lambda z: torch.logdet(z[:, :, :3, :3] + 5 * torch.eye(3, dtype=z.dtype)).unsqueeze(-1).unsqueeze(-1) * z, "logdet"),
    "clamp min > max": (lambda z: torch.clamp(z, min=1.0, max=0.0), "clamp"),
    "hardtanh min > max": (lambda z: F.hardtanh(z, 1.0, -1.0), "hardtanh"),
    "rrelu training": (lambda z: F.rrelu(z, training=True), "rrelu"),
    "tensor hook": (lambda z: (z.register_hook(lambda g: g * 2), z)[1], "Tensor.register_hook"),
    "scatter multiply": (lambda z: torch.ones_like(z).scatter(
        3, torch.zeros(z.shape, dtype=torch.long), z, reduce="multiply"), "Tensor.scatter"),
    "relu in no_grad": (lambda z: z * _no_grad_relu(z), "relu"),
    "TorchScript function": (lambda z: _scripted(z), "Tensor.flatten"),
    "DisableTorchFunction block": (lambda z: _hidden_relu(z), "Tensor.flatten"),
    "print": (lambda z: (repr(z), z)[1], "Tensor.__repr__"),
    "setitem into long": (lambda z: _setitem_long(z), "Tensor.__setitem__"),
    "sum to float16": (lambda z: z.sum(1, keepdim=True, dtype=torch.float16).double() + z, "Tensor.sum"),
    "trapezoid over input": (lambda z: z + torch.trapezoid(z, z, dim=-1).unsqueeze(-1), "trapezoid"),
    "einsum of a list": (lambda z: torch.einsum("nchw,nchw->nchw", [z, z]), "einsum"),
}

# refused before the value rule (issue 12), accepted since: point-exact, and W, b those of the oracle,
# the call written with its frozen factor detached (sigmoid: its secant through 0)
POINT_EXACT_CALLS = {
    "sigmoid": (lambda z: torch.sigmoid(z), lambda z: 0.5 + ((torch.sigmoid(z) - 0.5) / z).detach() * z),
    "divide by input": (lambda z: z / (z + 10), lambda z: z / (z + 10).detach()),
    "instance norm": (lambda z: F.instance_norm(z), lambda z: (z - z.mean((2, 3), keepdim=True)) * torch.rsqrt(
        z.var((2, 3), unbiased=False, keepdim=True) + 1e-5).detach()),
}


@pytest.mark.parametrize("name", sorted(POINT_EXACT_CALLS))
def test_value_rule_call_is_accepted_point_exact_with_the_oracle(name):
    fn, frozen = POINT_EXACT_CALLS[name]
    model, oracle = _model(fn), _model(frozen)
    oracle.load_state_dict(model.state_dict())
    probe = torch.randn(2, 1, 6, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    before = snapshot(model)
    for method in ("adjoint", "basis"):
        rec = rv.reconstruct(model, probe, method=method)
        assert rec.exactness == "point-exact"
        assert assert_exact(rec, model) <= 1e-9
        assert_value_rule(rec, oracle, probe)
    assert snapshot(model) == before


@torch.jit.script
def _scripted_relu(z):
    return torch.relu(z + 0.1)


def _scripted(z):
    return _scripted_relu(z)


def _hidden_relu(z):
    with torch._C.DisableTorchFunction():
        return torch.relu(z + 0.1)


def _setitem_long(z):
    b = torch.zeros(z.shape, dtype=torch.long)
    b[:] = z * 100
    return torch.where(b == 0, z, -z)


def _no_grad_relu(z):
    with torch.no_grad():
        return F.relu(z)


def _no_grad_sum(z):
    with torch.no_grad():
        return z.sum()


class _Twice(torch.autograd.Function):
    @staticmethod
    def forward(ctx, z):
        return z * 2

    @staticmethod
    def backward(ctx, g):
        return g * 2


@pytest.mark.parametrize("name", sorted(REFUSED_CALLS))
def test_non_affine_call_is_refused_by_name_with_module_path(name):
    fn, op = REFUSED_CALLS[name]
    model = _model(lambda z: z)
    model.fn = fn  # the lazy head is already materialised on the identity's shape (shape-keeping calls)
    probe = torch.randn(2, 1, 6, 6, dtype=torch.float64)
    before = snapshot(model)
    with pytest.raises(rv.UnsupportedOperationError) as err:
        rv.reconstruct(model, probe)
    assert err.value.operation == op, str(err.value)
    assert op in str(err.value) and err.value.advice in str(err.value)
    assert snapshot(model) == before


def test_a_refusal_names_the_module_path():
    class Inner(nn.Module):
        def forward(self, z):
            return torch.exp(z)  # (tanh until the value rule froze it)

    model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.Sequential(nn.ReLU(), Inner()), nn.Flatten(), nn.LazyLinear(2))
    model(torch.zeros(1, 1, 6, 6))
    with pytest.raises(rv.UnsupportedOperationError, match=r"'exp' called in module '1\.1'"):
        rv.reconstruct(model.eval(), torch.randn(1, 1, 6, 6))


def test_every_listed_name_resolves_to_a_torch_callable():
    """A typo in the lists would leave an op unlisted (refused): each name must exist."""
    for op in AFFINE_OPS + REFUSED_OPS:
        for name in op.names:
            assert callables_named(name), f"{type(op).__name__}: no torch callable named {name!r}"


def test_classify_knows_gates_affine_refused_and_unknown():
    assert classify(torch.relu) == "gate" and classify(F.max_pool2d) == "gate"
    assert classify(torch.add) == "affine" and classify(torch.Tensor.__getitem__) == "affine"
    assert classify(torch.exp) == "refused" and classify(torch.Tensor.detach) == "refused"
    assert classify(torch.sigmoid) == "gate" and classify(F.layer_norm) == "gate"  # the value rule
    assert classify(torch.logdet) == "unknown"
    assert classify(torch.ops.aten.add.Tensor) == "affine"


def test_registered_op_works_for_the_block_only():
    model = _model(lambda z: torch.fix(z) + z)
    probe = torch.randn(1, 1, 6, 6, dtype=torch.float64)
    with pytest.raises(rv.UnsupportedOperationError, match="fix"):
        rv.reconstruct(model, probe)
    with registered(Linear("fix")):  # a deliberately wrong registration: fix rounds
        assert classify(torch.fix) == "affine"
        with pytest.raises(rv.ExactnessError, match="self-check 'affinity' failed"):
            rv.reconstruct(model, probe, method="adjoint")
    assert classify(torch.fix) == "refused"


def test_registered_restores_the_gate_registry_too():
    class Expit(rv.Gate):
        name = "expit_test_gate"
        functions = (torch.special.expit,)

    before = classify(torch.special.expit)
    with registered(Expit()):
        assert classify(torch.special.expit) == "gate"
    assert classify(torch.special.expit) == before


def test_register_op_refuses_what_is_not_an_op():
    with pytest.raises(rv.InputError, match="reconviz.ops.Op"):
        rv.ops.register_op(lambda z: z)
    with pytest.raises(rv.InputError, match="Gate instance"):
        rv.register_gate(object())


class StatefulNet(nn.Module):
    """Scales by a call counter: state that changes between calls (g is not the model's replay)."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 2, 3)
        self.fc = nn.Linear(32, 3)
        self.calls = 0

    def forward(self, x):
        self.calls += 1
        return self.fc(F.relu(self.conv(x)).flatten(1) * self.calls)


def test_affinity_self_check_catches_state_that_changes_between_calls():
    model = StatefulNet().double().eval()
    probe = torch.randn(2, 1, 6, 6, dtype=torch.float64)
    with pytest.raises(rv.ExactnessError, match="self-check 'affinity' failed"):
        rv.reconstruct(model, probe, method="adjoint")
    assert model.calls == 0  # only reconviz's copy ran


def test_self_checks_are_recorded_with_numbers():
    model, data = rv.models.digits()
    rec = rv.reconstruct(model, torch.as_tensor(data.x_test[:3]))
    checks = {c["name"]: c for c in rec.meta["self_checks"]}
    assert set(checks) == {"affinity", "region"}
    for c in checks.values():
        assert c["passed"] is True and c["max_rel_error"] <= 1e-12 and c["tolerance"] == 1e-9


def test_region_check_is_skipped_for_point_exact_and_states_why(monkeypatch):
    from reconviz.pipeline import region_check

    lin = rv.linearize(_model(lambda z: z), torch.randn(1, 1, 6, 6, dtype=torch.float64))
    rec = rv.reconstruct(lin, None)
    monkeypatch.setattr(rv.LinearizedModel, "exactness", property(lambda self: "point-exact"))
    check = region_check(lin, rec)
    assert check.passed is None and "point-exact" in check.detail


def _edge_net(threshold: float) -> nn.Module:
    """relu(x - threshold) * 1e9 on one input: a probe just below the threshold switches the
    unit on at the region check's step (x0 + 1e-6 x0), and its output jumps far past W x + b."""
    first, last = nn.Linear(1, 1).double(), nn.Linear(1, 2).double()
    with torch.no_grad():
        first.weight.fill_(1.0), first.bias.fill_(-threshold)
        last.weight.fill_(1e9), last.bias.zero_()
    return nn.Sequential(first, nn.ReLU(), last).eval()


def test_region_check_passes_on_a_plain_pass_of_the_model(monkeypatch):
    """Where every probe agrees on the model's own plain pass, no pass observes the gates."""
    model, data = rv.models.digits()
    observed: list[int] = []
    monkeypatch.setattr(rv.LinearizedModel, "model_at", lambda self, x: observed.append(1))
    rec = rv.reconstruct(model, torch.as_tensor(data.x_test[:4]))
    region = {c.name: c for c in rec.self_checks}["region"]
    assert region.passed and region.max_rel_error <= 1e-12 and "every probe (4)" in region.detail
    assert observed == []


def test_region_check_reports_a_probe_on_a_boundary_instead_of_failing():
    """The plain pass disagrees at a probe whose gate switches at the step: the second pass sees
    the switch, and the check compares the other probe only."""
    x = torch.tensor([[1.0], [3.0]], dtype=torch.float64)  # the first: 5e-7 below the threshold
    rec = rv.reconstruct(_edge_net(1.0 + 5e-7), x)
    region = {c.name: c for c in rec.self_checks}["region"]
    assert region.passed and region.max_rel_error <= 1e-12
    assert "at 1 of 2 probe(s)" in region.detail and "1 probe(s) on a region boundary" in region.detail
    alone = rv.reconstruct(_edge_net(1.0 + 5e-7), x[:1])
    region = {c.name: c for c in alone.self_checks}["region"]
    assert region.passed is None and "region boundaries" in region.detail


def test_region_check_fails_where_the_model_leaves_w_x_plus_b(monkeypatch):
    """A model that is not its replay near the probe (here: 1 % off after the probe) fails the
    region check, and the second pass confirms it at a probe whose gates all held."""
    real = rv.LinearizedModel.model_at
    monkeypatch.setattr(rv.LinearizedModel, "model", lambda self, x: real(self, x)[0] * 1.01)
    monkeypatch.setattr(rv.LinearizedModel, "model_at", lambda self, x: (lambda f, h: (f * 1.01, h))(*real(self, x)))
    model, data = rv.models.digits()
    with pytest.raises(rv.ExactnessError, match=r"self-check 'region' failed: max relative error \S+ > "
                                                r"tolerance 1e-09 \(f\(x\) vs W x \+ b at 2 of 2 probe"):
        rv.reconstruct(model, torch.as_tensor(data.x_test[:2]))


def test_frozen_form_must_equal_the_op_at_the_probe():
    """A gate whose frozen form differs from the op is refused before the solve."""
    from reconviz.ops.gates import ReLUGate

    class Wrong(ReLUGate):
        name = "wrong_relu"
        functions = (torch.special.expit,)
        records_frozen = True

        def slope_offset(self, z, p):
            return torch.ones_like(z), None  # identity, but expit is not the identity

    with registered(Wrong()):
        with pytest.raises(rv.UnsupportedOperationError, match="frozen form differs"):
            rv.reconstruct(_model(torch.special.expit), torch.randn(1, 1, 6, 6, dtype=torch.float64))


def test_gate_on_a_parameter_is_a_constant_and_radius_works():
    class Scaled(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(1, 2, 3)
            self.scale = nn.Parameter(torch.tensor([[[0.5]], [[-0.3]]]))
            self.fc = nn.Linear(32, 3)

        def forward(self, x):
            return self.fc((F.relu(self.conv(x)) * F.relu(self.scale)).flatten(1))

    model = Scaled().double().eval()
    probe = torch.randn(2, 1, 6, 6, dtype=torch.float64)
    rec = rv.reconstruct(model, probe)
    assert assert_exact(rec, model) <= 1e-9
    lin = rv.linearize(model, probe)
    assert lin.gate_counts() == {"relu": 1}  # the parameter's relu is a constant, not a gate
    report = rv.verify(model, rec, radius=True)
    assert report.ok and bool((report.radius.l2 > 0).all())


class Recorder(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 2, 3)
        self.fc = nn.Linear(32, 3)

    def forward(self, x):
        return self.fc(F.relu(self.conv(x)).flatten(1))


def test_user_hooks_do_not_run_on_the_copy_unless_asked():
    model = Recorder().double().eval()
    seen: list[tuple] = []
    handle = model.conv.register_forward_hook(lambda m, a, out: seen.append(tuple(out.shape)))
    try:
        probe = torch.randn(2, 1, 6, 6, dtype=torch.float64)
        rv.reconstruct(model, probe)
        rv.verify(model, rv.reconstruct(model, probe))
        assert seen == []
        rv.reconstruct(model, probe, keep_hooks=True)
        assert seen and all(s[1:] == (2, 4, 4) for s in seen)
        assert len(model.conv._forward_hooks) == 1  # the user's hook is still on the model
    finally:
        handle.remove()


def test_training_submodule_warning_names_it():
    model = Recorder().double().eval()
    model.conv.train()
    with pytest.warns(rv.TrainingModeWarning, match="submodule\\(s\\) 'conv'"):
        rv.reconstruct(model, torch.randn(1, 1, 6, 6, dtype=torch.float64))
    assert model.conv.training and not model.training


@pytest.mark.parametrize("dtype", [torch.int64, "float64", torch.complex128, None])
def test_dtype_must_be_a_floating_torch_dtype(dtype):
    with pytest.raises(rv.InputError, match="dtype must be a floating-point torch.dtype"):
        rv.reconstruct(Recorder().eval(), torch.randn(1, 1, 6, 6), dtype=dtype)


def test_meta_device_model_and_input_are_refused():
    with torch.device("meta"):
        meta = Recorder()
    with pytest.raises(rv.InputError, match="meta device"):
        rv.reconstruct(meta.eval(), torch.randn(1, 1, 6, 6))
    with pytest.raises(rv.InputError, match="meta device"):
        rv.reconstruct(Recorder().eval(), torch.empty(1, 1, 6, 6, device="meta"))


def test_rrelu_in_eval_mode_is_a_leaky_gate():
    model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.RReLU(0.1, 0.3), nn.Flatten(), nn.Linear(32, 3)).double().eval()
    probe = torch.randn(2, 1, 6, 6, dtype=torch.float64)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        rec = rv.reconstruct(model, probe)
    assert assert_exact(rec, model) <= 1e-9
    assert rv.linearize(model, probe).priors[0].gate == "leaky_relu"
    assert isinstance(REFUSED_OPS[0], Refused)


def test_clamp_at_a_tie_gives_the_autograd_gradient():
    """torch.clamp differentiates to 1 on its bound: W at a tie must be that gradient (verify passes)."""
    class Clamped(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.fc = nn.Conv2d(1, 2, 3), nn.Linear(32, 3)

        def forward(self, x):
            return self.fc(self.conv(torch.clamp(x, min=0.0)).flatten(1) + self.conv(x.clip(0, 1)).flatten(1))

    x = torch.randn(2, 1, 6, 6, dtype=torch.float64)
    x[:, :, :3] = 0.0  # black pixels: ties on the lower bound
    x[:, :, 4, 4] = 1.0  # a tie on the upper bound
    model = Clamped().double().eval()
    rec = rv.reconstruct(model, x)
    report = rv.verify(model, rec)
    assert report.ok and report.jacobian_max_error <= 1e-12


def test_the_far_affinity_point_catches_a_hidden_kink():
    """A kink at 50 is not near the probe; the affinity check's second point (100 d) reaches it."""
    def hidden(z):  # a dlpack round trip: a mask reconviz cannot see
        v = torch.from_dlpack(torch.utils.dlpack.to_dlpack(z))
        return z * (v.abs() < 50).to(z.dtype)

    with pytest.raises(rv.ExactnessError, match="self-check 'affinity' failed"):
        rv.reconstruct(_model(hidden), torch.randn(2, 1, 6, 6, dtype=torch.float64))


def test_huge_probes_do_not_overflow_the_self_checks():
    model = _model(lambda z: z)
    rec = rv.reconstruct(model, torch.randn(2, 1, 6, 6, dtype=torch.float64) * 1e155)
    assert all(c["passed"] is not False for c in rec.meta["self_checks"])
    assert rec.meta["self_checks"][0]["max_rel_error"] <= 1e-9


def test_hooks_left_off_the_copy_are_named_in_a_warning():
    model = Recorder().double().eval()
    handle = model.conv.register_forward_hook(lambda m, a, out: out * 2 + 1)
    try:
        with pytest.warns(rv.HooksRemovedWarning, match="'conv'.*keep_hooks=True"):
            rec = rv.reconstruct(model, torch.randn(1, 1, 6, 6, dtype=torch.float64))
        with warnings.catch_warnings():
            warnings.simplefilter("error", rv.HooksRemovedWarning)
            kept = rv.reconstruct(model, rec.probes, keep_hooks=True)
        with torch.no_grad():
            assert torch.allclose(kept.logits, model(rec.probes), rtol=0, atol=1e-12)
    finally:
        handle.remove()


def test_torchscript_submodules_and_uncopyable_models_are_input_errors():
    scripted = nn.Sequential(torch.jit.script(nn.Conv2d(1, 2, 3)), nn.Flatten(), nn.Linear(32, 3)).eval()
    with pytest.raises(rv.InputError, match="submodule '0' is a TorchScript module"):
        rv.reconstruct(scripted, torch.randn(1, 1, 6, 6))
    holder = Recorder().eval()
    holder.fn = _scripted_relu  # a ScriptFunction attribute cannot be deep-copied
    with pytest.raises(rv.InputError, match="could not copy the model"):
        rv.reconstruct(holder, torch.randn(1, 1, 6, 6))


def test_a_forward_that_hard_codes_its_batch_is_a_replay_error_for_the_basis_solve():
    class Fixed(Recorder):
        def forward(self, x):
            return self.fc(F.relu(self.conv(x)).reshape(2, 32))

    model = Fixed().double().eval()
    x = torch.randn(2, 1, 6, 6, dtype=torch.float64)
    assert assert_exact(rv.reconstruct(model, x, method="adjoint"), model) <= 1e-9
    with pytest.raises(rv.ReplayMismatchError, match="hard-codes its batch size"):
        rv.reconstruct(model, x, method="basis")


def test_empty_probes_and_empty_outputs_are_input_errors():
    with pytest.raises(rv.InputError, match="no elements"):
        rv.reconstruct(nn.Flatten().eval(), torch.zeros(2, 0))
    with pytest.raises(rv.InputError, match="no logits"):
        rv.reconstruct(nn.Linear(4, 0).eval(), torch.randn(2, 4))


def test_gates_called_with_the_input_by_keyword():
    model = _model(lambda z: torch.relu(input=z) + torch.clamp(input=z, min=0.1))
    x = torch.randn(2, 1, 6, 6, dtype=torch.float64)
    assert assert_exact(rv.reconstruct(model, x), model) <= 1e-9
    assert rv.linearize(model, x).gate_counts() == {"relu": 1, "clamp": 1}


def test_tensors_in_finds_every_tensor_in_order():
    """The probe's argument walk: nested tuples, lists, dicts and named tuples, tensor subclasses
    and parameters, depth first and in order; plain values and other objects are skipped."""
    import collections

    from reconviz.ops.base import tensors_in

    class Sub(torch.Tensor):
        pass

    pair = collections.namedtuple("pair", "a b")
    t = [torch.full((1,), float(i)) for i in range(6)]
    p = nn.Parameter(torch.zeros(2))
    s = torch.ones(3).as_subclass(Sub)
    args = ((t[0], 2, "x", None, (1, 1), [t[1], {"k": t[2]}], pair(t[3], [p])), {"w": s, "n": slice(1), "o": object()})
    found = list(tensors_in(args))
    assert [id(x) for x in found] == [id(x) for x in (t[0], t[1], t[2], t[3], p, s)]
    assert list(tensors_in(t[4])) == [t[4]] and list(tensors_in(3.0)) == []
    assert list(tensors_in(collections.OrderedDict(a=t[5]))) == [t[5]]


def test_size_and_flag_reads_skip_the_classification(monkeypatch):
    """Sizes, dtypes and autograd flags read off input-dependent tensors (x.shape, x.size(0),
    x.dim(): BatchNorm's input check) run as written in the gate modes, before the registry is
    asked; everything else is still classified, and the reconstruction stays exact."""
    import reconviz.probe as probe_module
    from reconviz.ops.affine import METADATA
    from reconviz.ops.base import op_name

    class Reads(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.bn, self.fc = nn.Conv2d(1, 3, 3), nn.BatchNorm2d(3), nn.Linear(48, 4)

        def forward(self, x):
            z = F.relu(self.bn(self.conv(x)))
            assert z.dim() == 4 and z.dtype == x.dtype and z.requires_grad == x.requires_grad
            return self.fc(z.reshape(z.shape[0], z.size(1) * z.numel() // (z.size(0) * z.size(1))))

    classified: list[str] = []
    real = probe_module.check_call
    monkeypatch.setattr(probe_module, "check_call", lambda func, *a: (classified.append(op_name(func)), real(func, *a))[1])
    model = Reads().double().eval()
    x = torch.randn(2, 1, 6, 6, dtype=torch.float64)
    rec = rv.reconstruct(model, x)
    assert all(rv.ops.op_for(f) is METADATA for f in [torch.Tensor.dim, torch.Tensor.size, torch.Tensor.numel])
    assert not {"Tensor.dim", "Tensor.size", "Tensor.numel", "Tensor.shape", "Tensor.dtype"} & set(classified)
    assert {"conv2d", "linear", "Tensor.reshape"} <= set(classified)
    assert_exact(rec, model, x)
