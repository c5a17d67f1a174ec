"""Every error path: typed, with a message that names the problem and the way out,
and the user's model untouched afterwards."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import reconviz as rv
from archs import Fn


class Net(nn.Module):
    """conv -> BN -> op -> linear; ``op`` is the thing under test."""

    def __init__(self, op):
        super().__init__()
        self.conv = nn.Conv2d(1, 2, 3, padding=1)
        self.bn = nn.BatchNorm2d(2)
        self.block = nn.Sequential(nn.Identity())
        self.op = op
        self.fc = nn.Linear(2 * 4 * 4, 3)

    def forward(self, x):
        return self.fc(self.block(self.op(self.bn(self.conv(x)))).flatten(1))



X = torch.randn(2, 1, 4, 4)


@pytest.mark.parametrize(
    "op, name, words",
    [
        (Fn(torch.exp), "exp", "smooth non-linearity"),
        (nn.LogSigmoid(), "log_sigmoid", "smooth non-linearity"),
        (nn.LocalResponseNorm(2), "local_response_norm", "normalization"),
        (Fn(lambda t: t * t), "mul", "two input-dependent tensors"),
        (Fn(lambda t: t / (t.abs() + 1)), "abs", "cannot freeze"),
        (Fn(lambda t: 2.0 / (t + 10)), "div", "divides a constant by an input-dependent"),
        (Fn(lambda t: F.dropout(t, 0.5)), "dropout", "training=True"),
        (Fn(lambda t: torch.softmax(t, 1)), "softmax", "output="),
        (Fn(lambda t: t.max(dim=1, keepdim=True).values.expand_as(t)), "max", "MaxPool"),
    ],
)
def test_unsupported_operation_names_op_module_and_way_out(op, name, words, untouched):
    model = Net(op).eval()
    with untouched(model):
        with pytest.raises(rv.UnsupportedOperationError) as info:
            rv.reconstruct(model, X)
    err = info.value
    assert name in err.operation
    assert err.module_path in ("op", "op.fn", "")
    msg = str(err)
    assert name in msg and words in msg
    assert "module 'op'" in msg or err.module_path == ""
    assert isinstance(err, rv.ReconvizError) and not isinstance(err, TypeError)


@pytest.mark.parametrize("op", [nn.Sigmoid(), nn.GELU(), nn.SiLU(), Fn(torch.tanh), nn.LayerNorm([2, 4, 4]),
                                nn.GroupNorm(1, 2), Fn(lambda t: t / t.sum())],
                         ids=["sigmoid", "gelu", "silu", "tanh", "layer_norm", "group_norm", "div by sum"])
def test_value_rule_ops_are_point_exact_not_refused(op, untouched):
    """Refused (by these tests) until the value rule (issue 12) froze them at their value."""
    model = Net(op).eval()
    with untouched(model):
        rec = rv.reconstruct(model, X)
    assert rec.exactness == "point-exact" and rec.meta["max_rel_error"] <= 1e-4  # float32 model, float64 copy


def test_unsupported_in_nested_module_reports_full_path():
    model = Net(nn.Identity()).eval()
    model.block = nn.Sequential(nn.Sequential(nn.Identity(), nn.Softsign()))
    with pytest.raises(rv.UnsupportedOperationError, match=r"module 'block\.0\.1'"):
        rv.linearize(model, X)


def test_training_mode_warns_and_reconstructs_eval_copy(untouched):
    model = Net(nn.ReLU())
    model.bn.running_mean.fill_(0.3)
    model.train()
    with untouched(model):
        with pytest.warns(rv.TrainingModeWarning, match="eval-mode copy"):
            rec = rv.reconstruct(model, X)
    assert model.training and model.bn.training  # still in training mode
    model.eval()
    with torch.no_grad():
        f = model.double()(X.double())
    assert torch.allclose(rec(X), f, atol=1e-12)


def test_eval_model_gives_no_warning():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        rv.reconstruct(Net(nn.ReLU()).eval(), X)


@pytest.mark.parametrize(
    "x, words",
    [
        (torch.randn(16), "leading batch dimension"),
        (torch.randn(0, 1, 4, 4), "empty batch"),
        (torch.full((1, 1, 4, 4), float("nan")), "NaN/Inf"),
        (torch.tensor([[[[1.0, float("inf"), 0.0, 0.0]] * 4]]), "NaN/Inf"),
        (torch.randn(2, 3, 4, 4), "model failed on an input of shape (2, 3, 4, 4)"),
        (torch.zeros(1, 1, 4, 4, dtype=torch.long), "floating-point"),
        ([[0.0]], "torch.Tensor"),
    ],
)
def test_bad_input_is_an_input_error(x, words, untouched):
    model = Net(nn.ReLU()).eval()
    with untouched(model):
        with pytest.raises(rv.InputError) as info:
            rv.reconstruct(model, x)
    assert words in str(info.value)
    assert isinstance(info.value, ValueError)


@pytest.mark.parametrize(
    "kwargs, words",
    [
        ({"method": "newton"}, "unknown method"),
        ({"basis": "fourier"}, "unknown basis"),
        ({"classes": [3]}, "indices in [0, 3)"),
        ({"classes": []}, "empty"),
        ({"classes": [1, 1]}, "duplicates"),
        ({"chunk_size": 0}, "positive integer"),
        ({"chunk_size": True}, "positive integer"),
        ({"chunk_size": 2.0}, "positive integer"),
    ],
)
def test_bad_options_are_input_errors(kwargs, words):
    with pytest.raises(rv.InputError, match=words.replace("[", r"\[").replace(")", r"\)")):
        rv.reconstruct(Net(nn.ReLU()).eval(), X, **kwargs)


@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated")
def test_not_a_module_and_torchscript():
    with pytest.raises(rv.InputError, match="torch.nn.Module"):
        rv.reconstruct(lambda t: t, X)
    scripted = torch.jit.script(nn.Sequential(nn.Linear(3, 2), nn.ReLU()))
    with pytest.raises(rv.InputError, match="TorchScript"):
        rv.reconstruct(scripted, torch.randn(1, 3))


class Branchy(nn.Module):
    """Control flow that depends on the input's batch size: a replay mismatch waiting to happen
    (a branch on the input's values is refused at the probe: see the test below).

    A batch of 3 takes two ReLUs (or a LeakyReLU with ``other``), any other batch one ReLU."""

    def __init__(self, other: str = "two relus"):
        super().__init__()
        self.a = nn.Linear(4, 4)
        self.b = nn.Linear(4, 2)
        self.other = other
        with torch.no_grad():
            self.a.weight.copy_(torch.eye(4))
            self.a.bias.zero_()

    def forward(self, x):
        h = self.a(x)
        if h.shape[0] != 3:
            h = F.relu(h)
        elif self.other == "two relus":
            h = F.relu(F.relu(h) - 0.5)
        else:
            h = F.leaky_relu(h, 0.1)
        return self.b(h)


POS, NEG = torch.tensor([[1.0, 2.0, -0.5, 0.25]]), torch.tensor([[-1.0, -2.0, 0.5, -0.25]])


def test_replay_mismatch_when_control_flow_depends_on_input(untouched):
    model = Branchy().eval()
    three = POS.repeat(3, 1)
    with untouched(model):
        lin = rv.linearize(model, POS)  # probe: one gated call
        assert lin.gate_counts() == {"relu": 1}
        with torch.no_grad():
            f = model(POS * 2).double()
        assert torch.allclose(lin(POS * 2), f, atol=1e-6)  # same branch: fine
        with pytest.raises(rv.ReplayMismatchError, match=r"more gated calls than the probe recorded \(1\).*"
                           r"control flow depends"):
            lin(three)  # the other branch makes a second gated call
        lin = rv.linearize(model, three)  # probe: two gated calls
        with pytest.raises(rv.ReplayMismatchError, match=r"made 1 gated calls, but the probe recorded 2"):
            lin(three.repeat(2, 1))  # the other branch makes fewer
    assert torch._C._len_torch_function_stack() == 0  # the replay mode was popped on the error


def test_a_branch_on_the_inputs_values_is_refused_at_the_probe(untouched):
    class ValueBranch(nn.Module):
        def forward(self, x):
            return F.relu(x) if float(x.sum()) > 0 else F.relu(F.relu(x) - 0.5)

    model = ValueBranch()
    with untouched(model), pytest.raises(rv.UnsupportedOperationError, match="Tensor.__float__"):
        rv.reconstruct(model, POS)


def test_replay_mismatch_when_a_different_gate_is_called():
    model = Branchy(other="leaky").eval()
    lin = rv.linearize(model, POS)
    with pytest.raises(rv.ReplayMismatchError, match=r"gated call #0 differs from the probe: expected 'relu'.*"
                       r"got 'leaky_relu'.*control flow depends"):
        lin(POS.repeat(3, 1))
    # the basis solve replays the model on chunks of basis columns; a chunk of 3 takes the other
    # branch here: an error, never a wrong W
    with pytest.raises(rv.ReplayMismatchError, match="control flow depends"):
        rv.reconstruct(model, NEG, method="basis", chunk_size=3)


def test_replay_rejects_wrong_batch_and_shape():
    model = Net(nn.ReLU()).eval()
    lin = rv.linearize(model, X)  # N = 2
    with pytest.raises(rv.InputError, match="not a multiple of the 2 probes"):
        lin(torch.randn(3, 1, 4, 4))
    with pytest.raises(rv.InputError, match=r"expects inputs of shape \(r \* 2, 1, 4, 4\)"):
        lin(torch.randn(2, 1, 5, 5))
    assert lin(torch.randn(6, 1, 4, 4)).shape == (6, 3)


def test_model_untouched_after_success_with_user_hooks(untouched):
    model = Net(nn.ReLU()).eval()
    calls = []
    handle = model.conv.register_forward_hook(lambda m, a, o: calls.append(1))
    for p in model.fc.parameters():
        p.requires_grad_(False)
    with untouched(model):
        rec = rv.reconstruct(model, X, method="basis")
        rv.verify(model, rec)
    handle.remove()
    assert model.conv.weight.dtype == torch.float32


def test_exactness_error_when_self_check_fails(monkeypatch):
    """If the frozen network were not affine, reconstruct refuses to return a result."""
    from reconviz import reconstruction

    monkeypatch.setattr(reconstruction.Reconstruction, "errors", lambda self: (1.0, 1.0))
    with pytest.raises(rv.ExactnessError, match="tolerance 1e-09"):
        rv.reconstruct(Net(nn.ReLU()).eval(), X)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_in_place_first_op_never_writes_into_the_callers_tensor(dtype):
    model = nn.Sequential(nn.ReLU(inplace=True), nn.Flatten(), nn.Linear(16, 3)).eval()
    x = torch.randn(2, 1, 4, 4, dtype=dtype)
    before = x.clone()
    rec = rv.reconstruct(model, x, dtype=dtype, method="adjoint")
    rec_b = rv.reconstruct(model, x, dtype=dtype, method="basis")
    lin = rv.linearize(model, x, dtype=dtype)
    lin(x)
    report = rv.verify(model, rec, x)
    assert torch.equal(x, before) and torch.equal(rec.probes, before.to(rec.probes.dtype))
    assert report.ok and torch.allclose(rec.weight, rec_b.weight, atol=1e-6)
