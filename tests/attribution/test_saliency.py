"""Gradient, Gradient x Input, layer gradients with receptive fields, occlusion:
hand-computed values, autograd oracles, analytic receptive fields, a naive
occlusion loop, and the user's model left untouched (errors included)."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import reconviz.metrics as metrics
import reconviz.saliency as S
from reconviz.errors import InputError, TrainingModeWarning

D = torch.float64


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# --------------------------------------------------------------------------
# Small models
# --------------------------------------------------------------------------


def linear_model(c=2, h=4, w=4, k=3, seed=0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Flatten(), nn.Linear(c * h * w, k)).to(D).eval()


class SmallCNN(nn.Module):
    """conv - ReLU(in place) - max-pool - conv(stride 2) - functional relu - linear. Input 2x8x8."""

    def __init__(self, k=4, bias=True):
        super().__init__()
        self.conv1 = nn.Conv2d(2, 4, 3, padding=1, bias=bias)
        self.relu = nn.ReLU(inplace=True)
        self.pool = nn.MaxPool2d(2)
        self.conv2 = nn.Conv2d(4, 6, 3, stride=2, padding=1, bias=bias)
        self.fc = nn.Linear(6 * 2 * 2, k, bias=bias)

    def forward(self, x):
        x = self.pool(self.relu(self.conv1(x)))
        x = F.relu(self.conv2(x))
        return self.fc(x.flatten(1))


def small_cnn(seed=0, **kw) -> nn.Module:
    torch.manual_seed(seed)
    return SmallCNN(**kw).to(D).eval()


class ConvHead(nn.Module):
    """All-convolutional classifier (no Linear) with BatchNorm; input 3x12x12."""

    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 5, 3, padding=1), nn.BatchNorm2d(5), nn.ReLU(),
            nn.MaxPool2d(2), nn.Conv2d(5, 4, 3, padding=1), nn.ReLU(),
        )
        self.head = nn.Conv2d(4, 3, 1)

    def forward(self, x):
        return self.head(self.features(x)).mean((2, 3))


class TrainingNet(nn.Module):
    """BatchNorm and Dropout, for the untouched-model checks (used in training mode)."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(2, 3, 3, padding=1)
        self.bn = nn.BatchNorm2d(3)
        self.drop = nn.Dropout(0.5)
        self.fc = nn.Linear(3 * 8 * 8, 4)

    def forward(self, x):
        return self.fc(self.drop(F.relu(self.bn(self.conv1(x)))).flatten(1))


# --------------------------------------------------------------------------
# Gradient
# --------------------------------------------------------------------------


def test_gradient_of_linear_model_is_its_weight_row_exactly():
    net = linear_model()
    wt = net[1].weight.detach()
    x = torch.randn(4, 2, 4, 4, generator=gen(), dtype=D)
    g = S.gradient(net, x, 2)
    assert g.shape == x.shape and g.dtype == x.dtype
    assert torch.equal(g, wt[2].reshape(1, 2, 4, 4).expand(4, -1, -1, -1))
    g = S.gradient(net, x, [0, 1, 2, 0])
    assert torch.equal(g, wt[[0, 1, 2, 0]].reshape(4, 2, 4, 4))
    g = S.gradient(net, x, torch.tensor([1, 1, 0, 2]))
    assert torch.equal(g, wt[[1, 1, 0, 2]].reshape(4, 2, 4, 4))
    g = S.gradient(net, x, lambda out: out[:, 0] - out[:, 1])
    torch.testing.assert_close(g, (wt[0] - wt[1]).reshape(1, 2, 4, 4).expand(4, -1, -1, -1), rtol=0, atol=1e-15)


def test_gradient_equals_autograd_jacobian_rows_on_relu_net():
    net = small_cnn()
    x = torch.randn(3, 2, 8, 8, generator=gen(1), dtype=D)
    t = [3, 0, 1]
    jac = torch.autograd.functional.jacobian(lambda z: net(z), x)  # (N, K, N, 2, 8, 8)
    want = torch.stack([jac[i, t[i], i] for i in range(3)])
    torch.testing.assert_close(S.gradient(net, x, t), want, rtol=0, atol=1e-14)


def test_float32_input_is_computed_in_float64_and_returned_as_float32():
    net = small_cnn().float()
    x = torch.randn(2, 2, 8, 8, generator=gen(2))
    g32 = S.gradient(net, x, 1)
    g64 = S.gradient(net.to(D), x.to(D), 1)
    assert g32.dtype == torch.float32
    torch.testing.assert_close(g32, g64.float(), rtol=0, atol=0)
    assert S.gradient(net.float(), x, 1, dtype=None).dtype == torch.float32


def test_gradient_x_input_completes_to_the_logit():
    # linear model: sum(grad * x) + b_t == logit_t
    net = linear_model()
    x = torch.randn(5, 2, 4, 4, generator=gen(3), dtype=D)
    t = [0, 1, 2, 1, 0]
    gxi = S.gradient_x_input(net, x, t)
    logits = net(x).detach()
    b = net[1].bias.detach()[t]
    torch.testing.assert_close(gxi, S.gradient(net, x, t) * x, rtol=0, atol=0)
    assert float(metrics.completeness(S.gradient(net, x, t), b, x, logits[range(5), t]).max()) < 1e-13
    assert float(((gxi.reshape(5, -1).sum(1) + b) - logits[range(5), t]).abs().max()) < 1e-13
    # bias-free ReLU net: positively homogeneous, so sum(grad * x) == logit with no bias at all
    net = small_cnn(bias=False)
    x = torch.randn(4, 2, 8, 8, generator=gen(4), dtype=D)
    gxi = S.gradient_x_input(net, x, 2)
    torch.testing.assert_close(gxi.reshape(4, -1).sum(1), net(x).detach()[:, 2], rtol=1e-12, atol=1e-13)


def test_saliency_map_shape_rule():
    g = torch.randn(2, 3, 5, 6, generator=gen(5), dtype=D)
    m = S.saliency_map(g)
    assert m.shape == (2, 5, 6)
    assert torch.equal(m, torch.maximum(torch.maximum(g[:, 0].abs(), g[:, 1].abs()), g[:, 2].abs()))
    g1 = g[:, :1]
    assert torch.equal(S.saliency_map(g1), g1[:, 0].abs())  # (N, 1, H, W) -> (N, H, W)
    assert torch.equal(S.saliency_map(g[:, 0], channel_dim=None), g[:, 0].abs())
    with pytest.raises(InputError):
        S.saliency_map(g, channel_dim=0)


# --------------------------------------------------------------------------
# Target handling and input validation
# --------------------------------------------------------------------------


def test_resolve_target_forms_and_errors():
    out = torch.arange(12.0).reshape(3, 4)
    assert S.resolve_target(out, 2).tolist() == [2.0, 6.0, 10.0]
    assert S.resolve_target(out, [0, 1, 3]).tolist() == [0.0, 5.0, 11.0]
    assert S.resolve_target(out, torch.tensor([3, 3, 0])).tolist() == [3.0, 7.0, 8.0]
    assert S.resolve_target(out, torch.tensor(1)).tolist() == [1.0, 5.0, 9.0]
    assert S.resolve_target(out, lambda o: o.sum(1)).tolist() == [6.0, 22.0, 38.0]
    for bad, msg in [
        (4, "out of range"), (-1, "out of range"), ([0, 1], "one index or 3"), (1.0, "int class index"),
        (True, "bool"), (torch.tensor([0.0, 1.0, 2.0]), "integer"), (lambda o: o, "one score per input"),
    ]:
        with pytest.raises(InputError, match=msg):
            S.resolve_target(out, bad)


@pytest.mark.parametrize(
    "x, msg",
    [
        (torch.ones(8, dtype=D), "at least 2 dimensions"),
        (torch.ones(1, 2, 8, 8, dtype=torch.long), "floating-point"),
        (torch.full((1, 2, 8, 8), float("nan"), dtype=D), "NaN/Inf"),
        ([[1.0]], "torch.Tensor"),
    ],
)
def test_bad_inputs_raise_input_error(x, msg):
    with pytest.raises(InputError, match=msg):
        S.gradient(small_cnn(), x, 0)


# --------------------------------------------------------------------------
# The user's model is never changed, errors included
# --------------------------------------------------------------------------


def _methods():
    x_shape = (2, 2, 8, 8)
    return {
        "gradient": lambda m, x, t: S.gradient(m, x, t),
        "gradient_x_input": lambda m, x, t: S.gradient_x_input(m, x, t),
        "layer_gradients": lambda m, x, t: S.layer_gradients(m, x, t, project=True),
        "receptive_fields+layer_gradients": lambda m, x, t: (S.receptive_fields(m, x), S.layer_gradients(m, x, t)),
        "occlusion": lambda m, x, t: S.occlusion(m, x, t, window=3, stride=2, feature=("conv1", 1), batch_size=5),
        "prediction_difference": lambda m, x, t: metrics.prediction_difference(
            m, x, torch.rand(x_shape[0], 8, 8, generator=gen()), t, patch=2, n_random=3
        ),
        "deletion_auc": lambda m, x, t: metrics.deletion_auc(m, x, torch.rand(x_shape, generator=gen()), t, steps=8),
        "insertion_auc": lambda m, x, t: metrics.insertion_auc(m, x, torch.rand(x_shape, generator=gen()), t, steps=8),
    }


@pytest.mark.parametrize("name", list(_methods()))
def test_model_untouched_in_training_mode_with_user_hooks(name, untouched):
    torch.manual_seed(0)
    model = TrainingNet().to(D)  # training mode
    model.conv1.weight.requires_grad_(False)
    model.fc.register_forward_hook(lambda m, a, o: None)
    model.conv1.register_forward_pre_hook(lambda m, a: None)
    model.bn.register_full_backward_hook(lambda m, gi, go: None)
    x = torch.randn(2, 2, 8, 8, generator=gen(6), dtype=D)
    run = _methods()[name]
    with untouched(model):
        with pytest.warns(TrainingModeWarning):
            run(model, x, [1, 3])
        with pytest.raises(InputError, match="out of range"), pytest.warns(TrainingModeWarning):
            run(model, x, 9)
    assert model.training and all(m.training for m in model.modules())
    assert not model.conv1.weight.requires_grad and model.fc.weight.requires_grad


@pytest.mark.parametrize("name", list(_methods()))
def test_model_untouched_in_eval_mode(name, untouched):
    model = small_cnn()
    x = torch.randn(2, 2, 8, 8, generator=gen(7), dtype=D)
    with untouched(model):
        _methods()[name](model, x, 0)
        with pytest.raises(InputError):
            _methods()[name](model, x, [0, 1, 2])  # wrong number of targets
    assert not model.training


# --------------------------------------------------------------------------
# Layer gradients
# --------------------------------------------------------------------------


def _mlp() -> nn.Module:
    torch.manual_seed(1)
    return nn.Sequential(nn.Linear(5, 6), nn.ReLU(), nn.Linear(6, 3)).to(D).eval()


def test_layer_gradients_by_hand_on_mlp():
    net = _mlp()
    x = torch.randn(4, 5, generator=gen(8), dtype=D)
    t = [0, 2, 1, 2]
    g = S.layer_gradients(net, x, t)
    assert list(g) == ["0", "1", "2"]
    w2 = net[2].weight.detach()
    z = net[0](x).detach()
    assert torch.equal(g["2"], F.one_hot(torch.tensor(t), 3).to(D))  # d logit_t / d logits
    assert torch.equal(g["1"], w2[t])  # d logit_t / d relu output
    assert torch.equal(g["0"], w2[t] * (z > 0))  # through the ReLU's mask
    only = S.layer_gradients(net, x, t, layers=["1"])
    assert list(only) == ["1"] and torch.equal(only["1"], g["1"])
    assert list(S.layer_gradients(net, x, t, layers=nn.Linear)) == ["0", "2"]
    with pytest.raises(InputError, match="no module named"):
        S.layer_gradients(net, x, t, layers=["nope"])


def test_layer_gradients_match_retain_grad_with_inplace_relu():
    net = small_cnn()
    x = torch.randn(2, 2, 8, 8, generator=gen(9), dtype=D)
    g = S.layer_gradients(net, x, 1)
    assert list(g) == ["conv1", "relu", "pool", "conv2", "fc"]
    # oracle: the same net without in-place ops, with retain_grad on every intermediate
    m = copy.deepcopy(net)
    a1 = m.conv1(x)
    a1.retain_grad()
    r = F.relu(a1)
    r.retain_grad()
    p = m.pool(r)
    p.retain_grad()
    a2 = m.conv2(p)
    a2.retain_grad()
    out = m.fc(F.relu(a2).flatten(1))
    out.retain_grad()
    out[:, 1].sum().backward()
    for key, t in [("conv1", a1), ("relu", r), ("pool", p), ("conv2", a2), ("fc", out)]:
        torch.testing.assert_close(g[key], t.grad, rtol=0, atol=1e-15, msg=key)
    # the conv output's gradient is the pre-activation one (masked), not the ReLU output's
    assert not torch.equal(g["conv1"], g["relu"])


def test_module_called_twice_gets_one_key_per_call():
    class Shared(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b, self.act = nn.Linear(4, 4), nn.Linear(4, 2), nn.ReLU()

        def forward(self, x):
            return self.b(self.act(self.a(self.act(x))))

    torch.manual_seed(2)
    net = Shared().to(D).eval()
    x = torch.randn(3, 4, generator=gen(10), dtype=D)
    g = S.layer_gradients(net, x, 0)
    assert list(g) == ["act#0", "a", "act#1", "b"]
    assert torch.equal(g["act#1"], net.b.weight.detach()[0].expand(3, 4))


# --------------------------------------------------------------------------
# Receptive fields (computed, compared with analytic values)
# --------------------------------------------------------------------------


def _interval_rows(rf, lo, hi, h):
    """Expected rows mask of a 1-D interval [lo, hi) clipped to [0, h)."""
    m = torch.zeros(h, dtype=torch.bool)
    m[max(lo, 0) : min(hi, h)] = True
    return m


def test_receptive_field_of_three_conv_stack_is_analytic():
    # RF recursion: r_l = r_{l-1} + (k_l - 1) * j_{l-1}, j_l = j_{l-1} * s_l
    #   conv 3x3 s1: r = 1 + 2*1 = 3, j = 1;  conv 3x3 s2: r = 3 + 2*1 = 5, j = 2;  conv 3x3 s1: r = 5 + 2*2 = 9
    for pad in (0, 1):
        torch.manual_seed(3)
        net = nn.Sequential(
            nn.Conv2d(1, 2, 3, padding=pad), nn.ReLU(), nn.Conv2d(2, 2, 3, stride=2, padding=pad), nn.ReLU(),
            nn.Conv2d(2, 2, 3, padding=pad),
        ).to(D).eval()
        h = 17
        x = torch.zeros(1, 1, h, h, dtype=D)
        rf = S.receptive_fields(net, x, layers=["0", "2", "4"])
        assert rf["0"].extent == (3, 3) and rf["2"].extent == (5, 5) and rf["4"].extent == (9, 9)
        f = rf["4"]
        hout = f.shape[0]
        for i in range(hout):
            # unit i of layer 3 sees layer-2 units i-p..i+2-p, i.e. input rows 2(i-p) - 2p ... + 9 (then - p)
            lo = 2 * i - 4 * pad if pad else 2 * i
            want = _interval_rows(f, lo, lo + 9, h)
            assert torch.equal(f.rows[i * hout], want), (pad, i)
            assert torch.equal(f.cols[i], want), (pad, i)
        assert all(fld.is_product for fld in rf.values())


def test_receptive_field_of_dilated_strided_ceil_max_pool_keeps_holes():
    net = nn.Sequential(nn.MaxPool2d(3, stride=2, padding=1, dilation=2, ceil_mode=True)).to(D)
    h = 10
    rf = S.receptive_fields(net, torch.zeros(1, 1, h, h, dtype=D))["0"]
    assert rf.shape == tuple(net(torch.zeros(1, 1, h, h, dtype=D)).shape[2:])
    for i in range(rf.shape[0]):
        want = torch.zeros(h, dtype=torch.bool)
        for t in range(3):
            r = 2 * i - 1 + 2 * t
            if 0 <= r < h:
                want[r] = True
        assert torch.equal(rf.rows[i * rf.shape[1]], want), i
    assert rf.is_product


class Residual(nn.Module):
    """out = conv1x1(x) + maxpool3x3(x): the skip path has the larger receptive field."""

    def __init__(self):
        super().__init__()
        self.main = nn.Conv2d(2, 2, 1)
        self.skip = nn.MaxPool2d(3, stride=1, padding=1)
        self.out = nn.Conv2d(2, 2, 1)

    def forward(self, x):
        return self.out(F.relu(self.main(x) + self.skip(x)))


class Parallel(nn.Module):
    """Two 3x3 branches in parallel: the union is 3x3 (composing them in series would say 5x5)."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Conv2d(2, 2, 3, padding=1), nn.Conv2d(2, 2, 3, padding=1)
        self.out = nn.Conv2d(2, 2, 1)

    def forward(self, x):
        y = self.a(x)
        y += self.b(x)
        return self.out(torch.relu(y))


class BasicBlock(nn.Module):
    """ResNet basic block with a strided 1x1 downsample on the skip path."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(2, 3, 3, stride=2, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(3)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(3, 3, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(3)
        self.down = nn.Sequential(nn.Conv2d(2, 3, 1, stride=2, bias=False), nn.BatchNorm2d(3))

    def forward(self, x):
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        out += self.down(x)
        return self.relu(out)


def test_receptive_fields_of_residual_nets_include_every_path():
    x = torch.zeros(1, 2, 12, 12, dtype=D)
    rf = S.receptive_fields(Residual().to(D).eval(), x)
    assert rf["main"].extent == (1, 1) and rf["skip"].extent == (3, 3) and rf["out"].extent == (3, 3)
    assert rf["out"].box((5, 5)) == (4, 7, 4, 7)
    rf = S.receptive_fields(Parallel().to(D).eval(), x)
    assert rf["out"].extent == (3, 3)
    torch.manual_seed(4)
    rf = S.receptive_fields(BasicBlock().to(D).eval(), x)
    # main path: 3x3 s2 then 3x3 -> 3 + 2*2 = 7, centred on 2i; the skip (1x1 s2, input row 2i) lies inside
    out = rf["relu#1"]
    for i in range(out.shape[0]):
        assert out.box((i, i)) == (max(2 * i - 3, 0), min(2 * i + 4, 12), max(2 * i - 3, 0), min(2 * i + 4, 12))
    assert rf["down.0"].extent == (1, 1)


def test_non_product_receptive_field_is_reported():
    class Cross(nn.Module):
        def __init__(self):
            super().__init__()
            self.h, self.v = nn.Conv2d(1, 1, (1, 3), padding=(0, 1)), nn.Conv2d(1, 1, (3, 1), padding=(1, 0))
            self.out = nn.Conv2d(1, 1, 1)

        def forward(self, x):
            return self.out(self.h(x) + self.v(x))

    with pytest.warns(RuntimeWarning, match="not a product"):
        rf = S.receptive_fields(Cross().to(D), torch.zeros(1, 1, 7, 7, dtype=D))
    assert not rf["out"].is_product and rf["h"].is_product and rf["v"].is_product
    assert rf["out"].extent == (3, 3)


# --------------------------------------------------------------------------
# Projection to the input
# --------------------------------------------------------------------------


def test_projection_by_hand_on_non_overlapping_receptive_fields():
    torch.manual_seed(5)
    net = nn.Sequential(nn.Conv2d(1, 2, 2, stride=2), nn.Flatten(), nn.Linear(8, 3)).to(D).eval()
    x = torch.randn(2, 1, 4, 4, generator=gen(11), dtype=D)
    g = S.layer_gradients(net, x, [0, 2], layers=["0", "2"])
    p = S.layer_gradients(net, x, [0, 2], layers=["0", "2"], project=True)
    a = g["0"].abs().sum(1)  # (N, 2, 2): |g| over channels per unit
    torch.testing.assert_close(p["0"], a.repeat_interleave(2, 1).repeat_interleave(2, 2) / 4, rtol=0, atol=1e-15)
    # the Linear layer's units all see the whole input: spread uniformly
    want = (g["2"].abs().sum(1) / 16)[:, None, None].expand(2, 4, 4)
    torch.testing.assert_close(p["2"], want, rtol=0, atol=1e-15)


def test_projection_conserves_the_gradient_mass_and_matches_separate_calls():
    net = small_cnn()
    x = torch.randn(2, 2, 8, 8, generator=gen(12), dtype=D)
    g = S.layer_gradients(net, x, 3)
    fields = S.receptive_fields(net, x)
    p = S.project_to_input(g, fields)
    assert p.keys() == g.keys()
    for k in g:
        assert p[k].shape == (2, 8, 8)
        torch.testing.assert_close(p[k].sum((1, 2)), g[k].abs().reshape(2, -1).sum(1), rtol=1e-12, atol=0)
    p2 = S.layer_gradients(net, x, 3, project=True, fields=fields)
    for k in p:
        assert torch.equal(p[k], p2[k])
    with pytest.raises(InputError, match="no receptive field"):
        S.project_to_input({"zzz": g["fc"]}, fields)


# --------------------------------------------------------------------------
# Occlusion
# --------------------------------------------------------------------------


def naive_occlusion(model, x, t, wh, ww, sh, sw, base):
    """One occluded image at a time, straight from the definition."""
    n, _, h, w = x.shape
    rows = list(range(0, h - wh + 1, sh))
    rows += [h - wh] if rows[-1] != h - wh else []
    cols = list(range(0, w - ww + 1, sw))
    cols += [w - ww] if cols[-1] != w - ww else []
    total = torch.zeros(n, h, w, dtype=D)
    count = torch.zeros(h, w, dtype=D)
    drops = torch.zeros(n, len(rows) * len(cols), dtype=D)
    with torch.no_grad():
        for i in range(n):
            s0 = model(x[i : i + 1])[0, t[i]]
            for p, (r, c) in enumerate([(r, c) for r in rows for c in cols]):
                xo = x[i : i + 1].clone()
                xo[..., r : r + wh, c : c + ww] = base[i : i + 1, ..., r : r + wh, c : c + ww]
                drops[i, p] = s0 - model(xo)[0, t[i]]
        for p, (r, c) in enumerate([(r, c) for r in rows for c in cols]):
            total[:, r : r + wh, c : c + ww] += drops[:, p, None, None]
            count[r : r + wh, c : c + ww] += 1
    return total / count


@pytest.mark.parametrize("make", [small_cnn, lambda: ConvHead().to(D).eval()], ids=["linear-head", "conv-head"])
def test_occlusion_equals_naive_loop_exactly_for_any_batch_size(make):
    torch.manual_seed(6)
    model = make()
    c = 2 if isinstance(model, SmallCNN) else 3
    h = 8 if isinstance(model, SmallCNN) else 12
    x = torch.randn(3, c, h, h, generator=gen(13), dtype=D)
    t = [0, 2, 1]
    mean = torch.randn(c, 1, 1, generator=gen(14), dtype=D)
    want = naive_occlusion(model, x, t, 3, 4, 2, 3, mean.expand_as(x))
    for bs in (1, 7, 64):
        got = S.occlusion(model, x, t, window=(3, 4), stride=(2, 3), baseline=mean, batch_size=bs)
        assert got.shape == (3, h, h)
        assert torch.equal(got, want), bs


def test_occlusion_of_linear_model_with_1x1_window_is_gradient_x_input():
    net = linear_model(c=2, h=5, w=5)
    x = torch.randn(2, 2, 5, 5, generator=gen(15), dtype=D)
    occ = S.occlusion(net, x, 1, window=1, stride=1, baseline=0.5)
    want = (S.gradient(net, x, 1) * (x - 0.5)).sum(1)
    torch.testing.assert_close(occ, want, rtol=0, atol=1e-14)


def test_occlusion_result_and_feature_maxima():
    model = small_cnn()
    x = torch.randn(2, 2, 8, 8, generator=gen(16), dtype=D)
    res = S.occlusion(model, x, 1, window=4, stride=4, feature=("conv2", 5), batch_size=3)
    assert isinstance(res, S.OcclusionResult)
    assert res.rows == (0, 4) and res.cols == (0, 4) and res.scores.shape == (2, 2, 2)
    assert torch.equal(res.score_drop, S.occlusion(model, x, 1, window=4, stride=4))
    with torch.no_grad():
        pool = model.pool(model.relu(model.conv1(x)))
        assert torch.equal(res.base_feature_max, model.conv2(pool)[:, 5].reshape(2, -1).amax(1))
        for a, r in enumerate(res.rows):
            for b, c in enumerate(res.cols):
                xo = x.clone()
                xo[..., r : r + 4, c : c + 4] = 0
                f = model.conv2(model.pool(model.relu(model.conv1(xo))))[:, 5].reshape(2, -1).amax(1)
                torch.testing.assert_close(res.feature_max[:, a, b], f, rtol=0, atol=1e-15)
                torch.testing.assert_close(res.scores[:, a, b], model(xo)[:, 1], rtol=0, atol=1e-15)
    torch.testing.assert_close(res.base_score, model(x).detach()[:, 1], rtol=0, atol=1e-15)
    full = S.occlusion(model, x, 1, window=4, stride=4, full=True)
    assert full.feature_max is None and torch.equal(full.scores, res.scores)
    with pytest.raises(InputError, match="no module named"):
        S.occlusion(model, x, 1, window=4, feature=("nope", 0))
    with pytest.raises(InputError, match="out of range"):
        S.occlusion(model, x, 1, window=4, feature=("conv2", 6))
    with pytest.raises(InputError, match="larger than the input"):
        S.occlusion(model, x, 1, window=9)
    with pytest.raises(InputError, match="larger than the window"):
        S.occlusion(model, x, 1, window=2, stride=3)
    with pytest.raises(InputError, match="broadcast"):
        S.occlusion(model, x, 1, window=4, baseline=torch.zeros(3, 1, 1))


def test_occlusion_default_stride_covers_every_pixel():
    net = linear_model(c=1, h=7, w=9, k=2)
    x = torch.randn(1, 1, 7, 9, generator=gen(17), dtype=D)
    res = S.occlusion(net, x, 0, window=(4, 4), full=True)
    assert res.rows == (0, 2, 3) and res.cols == (0, 2, 4, 5)
    assert torch.isfinite(res.score_drop).all()
