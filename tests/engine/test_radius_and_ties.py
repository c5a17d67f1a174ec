"""The certified radius with in-place gates, ties of every gate kind, and the user's model
(and process-wide torch state) untouched by the core's entry points on success and on
every error path (the contract over every public entry point: contracts/test_contracts.py)."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import reconviz as rv
from conftest import assert_exact, global_state


# --------------------------------------------------------------------------
# certified radius: in-place gates give the same region as out-of-place ones
# --------------------------------------------------------------------------


def _conv_net(seed: int, inplace: bool) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(inplace=inplace), nn.Conv2d(4, 4, 3, padding=1),
        nn.LeakyReLU(0.1, inplace=inplace), nn.MaxPool2d(2), nn.Flatten(), nn.Linear(16, 3),
    ).eval()


@pytest.mark.parametrize("seed", range(4))
def test_radius_with_in_place_gates_equals_out_of_place(seed):
    """Regression: the radius kept a *view* of each in-place gate's input as h(0), which the
    frozen gate then overwrote, so every unit switched off at 0 got a wrong ||a_m||."""
    x = torch.randn(2, 1, 4, 4, generator=torch.Generator().manual_seed(seed))
    out_of_place = rv.certified_radius(_conv_net(seed, False), x)
    in_place = rv.certified_radius(_conv_net(seed, True), x)
    assert torch.equal(in_place.l2, out_of_place.l2) and torch.equal(in_place.linf, out_of_place.linf)
    assert [f.feature for f in in_place.nearest] == [f.feature for f in out_of_place.nearest]


def test_radius_of_in_place_net_is_tight():
    """A small AlexNet-style net (in-place ReLUs, overlapping ceil-mode max-pools, dropout):
    inside the radius exact, across the nearest face a prior changes."""
    from reconviz.radius import boundary_direction

    torch.manual_seed(5)
    model = nn.Sequential(
        nn.Conv2d(3, 6, 5, stride=2, padding=2), nn.ReLU(inplace=True), nn.MaxPool2d(3, 2, ceil_mode=True),
        nn.Conv2d(6, 8, 3, padding=1), nn.ReLU(inplace=True), nn.Flatten(), nn.Dropout(0.5),
        nn.Linear(8 * 4 * 4, 16), nn.ReLU(inplace=True), nn.Linear(16, 4),
    ).eval()
    x = torch.randn(1, 3, 16, 16, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    lin = rv.linearize(model, x)
    rec = rv.reconstruct(model, x, method="adjoint")
    radius = rv.certified_radius(lin)
    face = radius.nearest[0]
    d = boundary_direction(lin, 0, face)
    r = float(radius.l2[0])
    assert torch.isfinite(d).all() and abs(float(d.norm()) - 1) < 1e-12
    assert_exact(rec, model, x + 0.999 * r * d)
    moved = rv.linearize(model, x + 1.001 * r * d)
    assert any(not torch.equal(p.tensors[k], q.tensors[k]) for p, q in zip(lin.priors, moved.priors) for k in p.tensors)


# --------------------------------------------------------------------------
# ties of every gate kind are counted and give radius 0
# --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "act, value",
    [(nn.ReLU6(), 6.0), (nn.Hardtanh(-0.5, 0.5), -0.5), (nn.LeakyReLU(0.1), 0.0), (nn.Threshold(0.25, 0.0), 0.25),
     (nn.PReLU(init=0.2), 0.0)],
)
def test_tie_at_any_breakpoint_is_counted_and_radius_zero(act, value):
    lin_layer = nn.Linear(2, 2)
    with torch.no_grad():
        lin_layer.weight.copy_(torch.eye(2))
        lin_layer.bias.zero_()
    model = nn.Sequential(lin_layer, act, nn.Linear(2, 1)).eval()
    x = torch.tensor([[value, 3.0 if value != 6.0 else 2.0]])
    assert rv.linearize(model, x).ties == 1
    r = rv.certified_radius(model, x)
    assert r.ties == 1 and float(r.l2[0]) == 0.0 and float(r.linf[0]) == 0.0
    rec = rv.reconstruct(model, x)
    assert rec.meta["ties"] == 1 and rec.meta["max_rel_error"] <= 1e-9  # still exact at the probe
    report = rv.verify(model, rec)
    assert report.radius.ties == 1 and "ties on a moving face: 1" in str(report)


def test_adaptive_max_pool_tie_is_counted():
    model = nn.Sequential(nn.AdaptiveMaxPool1d(2), nn.Flatten(), nn.Linear(2, 1)).eval()
    x = torch.tensor([[[1.0, 5.0, 5.0, 0.0, 2.0, 3.0]]])  # first window [1, 5, 5]: two maxima
    assert rv.linearize(model, x).ties == 1
    assert float(rv.certified_radius(model, x).l2[0]) == 0.0


# --------------------------------------------------------------------------
# the user's model and torch's global state, untouched by every entry point
# --------------------------------------------------------------------------


class Net(nn.Module):
    def __init__(self, tail=None):
        super().__init__()
        self.conv = nn.Conv2d(1, 3, 3, padding=1)
        self.bn = nn.BatchNorm2d(3)
        self.drop = nn.Dropout(0.3)
        self.tail = tail if tail is not None else nn.Identity()
        self.fc = nn.Linear(3 * 4 * 4, 4)

    def forward(self, x):
        z = F.max_pool2d(torch.relu(self.bn(self.conv(x))), 3, 1, 1)
        return self.fc(self.drop(self.tail(z)).flatten(1))


def _hooked(model: nn.Module) -> tuple[nn.Module, list]:
    seen: list = []
    model.conv.register_forward_hook(lambda m, a, kw, o: seen.append("fwd-kw"), with_kwargs=True)
    model.conv.register_forward_pre_hook(lambda m, a, kw: seen.append("pre-kw"), with_kwargs=True)
    model.bn.register_forward_hook(lambda m, a, o: None, always_call=True)
    model.fc.register_full_backward_hook(lambda m, gi, go: None)
    model.fc.register_full_backward_pre_hook(lambda m, go: None)
    model.fc.weight.register_hook(lambda g: g)
    model.conv.bias.requires_grad_(False)
    return model, seen


X = torch.randn(2, 1, 4, 4, generator=torch.Generator().manual_seed(0))


def _entry_points():
    import reconviz.metrics as metrics
    import reconviz.saliency as S

    def overview(m, x):
        return rv.plot.overview(m, x, rv.reconstruct(m, x), occlusion={"window": 2})

    return {
        "reconstruct(basis)": lambda m, x: rv.reconstruct(m, x, method="basis"),
        "reconstruct(adjoint)": lambda m, x: rv.reconstruct(m, x, method="adjoint"),
        "linearize+replay": lambda m, x: rv.linearize(m, x)(x),
        # a fixed solve: "auto" picks its method and chunks by timing, and rounding follows them
        "verify": lambda m, x: rv.verify(m, rv.reconstruct(m, x, method="basis", chunk_size=8)),
        "certified_radius": lambda m, x: rv.certified_radius(m, x),
        "gradient": lambda m, x: S.gradient(m, x, 1),
        "guided_backprop": lambda m, x: S.guided_backprop(m, x, 1),
        "deconvnet": lambda m, x: S.deconvnet(m, x, 1),
        "layer_gradients": lambda m, x: S.layer_gradients(m, x, 1, project=True),
        "occlusion": lambda m, x: S.occlusion(m, x, 1, window=2, feature=("conv", 0)),
        "prediction_difference": lambda m, x: metrics.prediction_difference(m, x, x[:, 0].abs(), 1, patch=2),
        "deletion_auc": lambda m, x: metrics.deletion_auc(m, x, x.abs(), 1, steps=4),
        "overview": overview,
    }


@pytest.mark.parametrize("name", list(_entry_points()))
def test_every_entry_point_leaves_model_and_torch_state_untouched(name, untouched):
    import matplotlib.pyplot as plt

    run = _entry_points()[name]
    model, seen = _hooked(Net().eval())
    forward = copy.deepcopy(model)
    gh = nn.modules.module.register_module_forward_hook(lambda m, a, o: None)
    gp = nn.modules.module.register_module_forward_pre_hook(lambda m, a: None)
    try:
        state = global_state()
        with untouched(model):
            out = run(model, X)
            # error paths: a bad target / bad input, and an op that cannot be frozen
            with pytest.raises(rv.InputError):
                run(model, torch.full_like(X, float("nan")))
            bad, _ = _hooked(Net(tail=nn.Tanh()).eval())
            with untouched(bad):
                try:
                    run(bad, X)
                except rv.UnsupportedOperationError as e:
                    assert "tanh" in str(e) and e.module_path == "tail"
        assert global_state() == state
    finally:
        gh.remove()
        gp.remove()
    if isinstance(out, (list, tuple)):
        out = out[0]
    if hasattr(out, "savefig"):
        plt.close(out)
    with torch.no_grad():
        torch.testing.assert_close(model(X), forward(X), rtol=0, atol=0)  # behaves exactly as before
    assert not model.training and not model.conv.bias.requires_grad and model.conv.weight.requires_grad


@pytest.mark.parametrize("name", ["reconstruct(basis)", "verify", "gradient", "guided_backprop", "occlusion"])
def test_training_mode_model_warns_uses_eval_copy_and_stays_in_training(name, untouched):
    run = _entry_points()[name]
    model = Net().train()
    model.bn.running_mean.fill_(0.2)
    model.bn.running_var.fill_(2.0)
    evald = copy.deepcopy(model).eval()
    with untouched(model):
        with pytest.warns(rv.TrainingModeWarning, match="eval-mode copy"):
            got = run(model, X)
    assert model.training and all(m.training for m in model.modules())
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        want = run(evald, X)  # the eval-mode model: no warning, the same result
    if isinstance(got, torch.Tensor):
        assert torch.equal(got, want)
    elif hasattr(got, "score_drop"):
        assert torch.equal(got.score_drop, want.score_drop) and torch.equal(got.feature_max, want.feature_max)
    elif isinstance(got, rv.Reconstruction):
        assert torch.equal(got.weight, want.weight) and torch.equal(got.bias, want.bias)
    else:
        assert got.ok and want.ok and got.max_abs_error == want.max_abs_error


# --------------------------------------------------------------------------
# progress bar: on when asked (or on a terminal for long solves), off otherwise
# --------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["basis", "adjoint"])
def test_progress_bar_on_request_and_off_when_not_a_terminal(method, capsys):
    model = nn.Sequential(nn.Flatten(), nn.Linear(300, 8), nn.ReLU(), nn.Linear(8, 3)).eval()
    x = torch.randn(1, 3, 10, 10)
    rv.reconstruct(model, x, method=method, progress=True)
    err = capsys.readouterr().err
    # one step per basis column (D = 300) or per class (K = 3)
    assert ("basis solve (identity)" if method == "basis" else "adjoint solve") in err
    assert ("/300 " if method == "basis" else "/3 ") in err
    rv.reconstruct(model, x, method=method)  # default: stderr is not a terminal under pytest
    assert capsys.readouterr().err == ""
    rv.reconstruct(model, x, method=method, progress=False)
    assert capsys.readouterr().err == ""


# --------------------------------------------------------------------------
# verify() can fail: each of its checks catches what it is for
# --------------------------------------------------------------------------


def test_verify_fails_on_a_wrong_w_that_still_matches_at_the_probe():
    """W + v with v orthogonal to x0 gives the same outputs at the probe (the Table 1 view
    passes), but it is not the model's W: the Jacobian check fails, and so does any input
    inside the region with a component along v."""
    import dataclasses

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 2, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(32, 3)).eval()
    x = torch.randn(1, 1, 4, 4)
    rec = rv.reconstruct(model, x)
    good = rv.verify(model, rec)
    assert good.ok and good.jacobian_max_error <= good.jacobian_tolerance
    x0 = rec.probes[0].flatten()
    v = torch.randn(16, dtype=torch.float64)
    v = (v - (v @ x0) / (x0 @ x0) * x0).reshape(1, 4, 4) * 1e-3  # orthogonal to x0
    bad_w = rec.weight.clone()
    bad_w[0, 1] += v
    bad = dataclasses.replace(rec, weight=bad_w, meta=dict(rec.meta))
    report = rv.verify(model, bad)
    assert report.max_rel_error <= 1e-12  # at the probe the outputs agree ...
    assert report.jacobian_max_error >= 0.5 * float(v.abs().max()) and not report.ok  # ... W does not
    assert "W vs autograd Jacobian" in str(report) and str(report).rstrip().endswith("FAIL")
    inside = rec.probes + 0.5 * float(good.radius.l2[0]) * v / v.norm()
    assert rv.verify(model, rec, inside).ok and not rv.verify(model, bad, inside, jacobian=False).ok
    # a wrong bias: the Table 1 view itself fails, with the difference in its row
    bad_b = rec.bias.clone()
    bad_b[0, 2] += 1e-6
    report = rv.verify(model, dataclasses.replace(rec, bias=bad_b, meta=dict(rec.meta)), radius=False)
    assert not report.ok and report.max_abs_error == pytest.approx(1e-6, rel=1e-6)
    row = [r for r in report.table if r["class"] == 2][0]
    assert row["difference"] == pytest.approx(1e-6, rel=1e-6)


# --------------------------------------------------------------------------
# issue 2, requirement 2: everything affine in eval mode passes through, unfrozen
# --------------------------------------------------------------------------


class AffineZoo(nn.Module):
    """One ReLU among every affine op of the issue's list (eval mode)."""

    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv1d(2, 2, 3, padding=1)
        self.c3 = nn.Conv3d(1, 2, (1, 3, 3), padding=(0, 1, 1))
        self.up = nn.ConvTranspose2d(2, 2, 2, stride=2)
        self.bn = nn.BatchNorm2d(2)
        self.drop = nn.Dropout2d(0.5)
        self.avg = nn.AvgPool2d(2)
        self.aavg = nn.AdaptiveAvgPool2d((3, 3))
        self.ident = nn.Identity()
        self.fc = nn.Linear(2 * 2 * 3 * 3 + 2 * 4 * 4 * 2, 3)

    def forward(self, x):  # x: (N, 2, 4, 4)
        a = self.c1(x.flatten(2)).view_as(x)  # Conv1d over the flattened plane, reshape back
        b = self.c3(x[:, :1].unsqueeze(1)).squeeze(2)  # Conv3d
        y = torch.relu(a - b / 3.0 + 0.5 * x)  # sub, division and multiplication by constants
        y = self.drop(self.bn(self.up(y)))  # ConvTranspose 4x4 -> 8x8, BN (eval), Dropout (eval)
        y = F.pad(y, (1, 1, 1, 1), value=0.25)  # constant padding: affine, not linear
        y = F.interpolate(self.avg(y), size=(6, 6), mode="bilinear", align_corners=False)
        z = F.interpolate(y, scale_factor=0.5, mode="nearest")  # (N, 2, 3, 3)
        s = torch.stack([self.aavg(y), z], dim=1).permute(0, 2, 1, 3, 4).reshape(x.shape[0], -1)
        t = torch.cat([x.flatten(1), -x.flatten(1)], 1).view(x.shape[0], 2, -1).transpose(1, 2)
        return self.fc(self.ident(torch.cat([s, t.flatten(1)], 1)))


def test_every_affine_op_passes_through_unfrozen():
    from archs import _init_bn

    torch.manual_seed(3)
    model = _init_bn(AffineZoo(), 3)
    x = torch.randn(2, 2, 4, 4, generator=torch.Generator().manual_seed(5))
    lin = rv.linearize(model, x)
    assert lin.gate_counts() == {"relu": 1}  # only the ReLU is a gate
    for method in ("basis", "adjoint"):
        rec = rv.reconstruct(model, x, method=method)
        assert_exact(rec, model)
    report = rv.verify(model, rec)
    assert report.ok and float(report.radius.l2.min()) > 0
    inside = x.double() + 0.9 * report.radius.l2.view(-1, 1, 1, 1) * F.normalize(torch.ones_like(x.double()).flatten(1), dim=1).view_as(x)
    assert_exact(rec, model, inside)
