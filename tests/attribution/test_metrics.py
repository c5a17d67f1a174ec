"""Faithfulness metrics: completeness, prediction difference, deletion / insertion
curves and AUCs, checked against closed forms on linear models."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

import reconviz.metrics as M
import reconviz.saliency as S
from reconviz.errors import InputError

D = torch.float64


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def linear_model(c=2, h=6, w=6, k=3, seed=0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Flatten(), nn.Linear(c * h * w, k)).to(D).eval()


def relu_net(seed=0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(2, 4, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(), nn.Linear(4 * 3 * 3, 3)
    ).to(D).eval()


def contributions(net, x, t):
    """Per-pixel contributions of a linear model, summed over channels: (N, H, W)."""
    return (S.gradient(net, x, t) * x).sum(1)


# --------------------------------------------------------------------------
# Completeness
# --------------------------------------------------------------------------


def test_completeness_both_layouts():
    net = relu_net()
    x = torch.randn(3, 2, 6, 6, generator=gen(1), dtype=D)
    logits = net(x).detach()
    # all classes: W (N, K, ...) from the per-class gradients; bias from W x0 + b = f(x0) at the probe
    w = torch.stack([S.gradient(net, x, k) for k in range(3)], 1)
    b = logits - (w * x[:, None]).reshape(3, 3, -1).sum(2)
    assert M.completeness(w, b, x, logits).shape == (3,)
    assert float(M.completeness(w, b, x, logits).max()) < 1e-14
    assert torch.allclose(M.completeness(w, b + 0.25, x, logits), torch.full((3,), 0.25, dtype=D))
    # one class per input: gradient shaped like x, bias (N,) or a number
    g = S.gradient(net, x, [0, 1, 2])
    assert float(M.completeness(g, b[range(3), [0, 1, 2]], x, logits[range(3), [0, 1, 2]]).max()) < 1e-14
    lin = linear_model(c=2, h=6, w=6)
    gl = S.gradient(lin, x, 1)
    gap = M.completeness(gl, float(lin[1].bias.detach()[1]), x, lin(x).detach()[:, 1])
    assert float(gap.max()) < 1e-13
    with pytest.raises(InputError, match="weight must be shaped"):
        M.completeness(torch.zeros(3, 5), 0.0, x, logits)
    with pytest.raises(InputError, match="logits must be"):
        M.completeness(w, b, x, logits[:, :2])


# --------------------------------------------------------------------------
# Deletion / insertion
# --------------------------------------------------------------------------


def test_deletion_and_insertion_curves_of_a_linear_model_in_closed_form():
    net = linear_model()
    x = torch.randn(2, 2, 6, 6, generator=gen(2), dtype=D)
    t = [0, 2]
    c = contributions(net, x, t)  # (N, 6, 6)
    f = net(x).detach()[range(2), t]
    b = net[1].bias.detach()[t]
    # one pixel per step, raw score, baseline 0: removing pixel p removes exactly its contribution c_p
    dele = M.deletion_curve(net, x, c, t, steps=36, score="logit")
    ins = M.insertion_curve(net, x, c, t, steps=36, score="logit")
    csum = torch.cat([torch.zeros(2, 1, dtype=D), torch.sort(c.reshape(2, -1), 1, descending=True)[0].cumsum(1)], 1)
    torch.testing.assert_close(dele.fractions, torch.arange(37, dtype=D) / 36)
    torch.testing.assert_close(dele.scores, f[:, None] - csum, rtol=0, atol=1e-12)
    torch.testing.assert_close(ins.scores, b[:, None] + csum, rtol=0, atol=1e-12)
    torch.testing.assert_close(dele.auc, torch.trapezoid(f[:, None] - csum, dele.fractions, dim=1))
    # removing the largest contributions first minimises every partial sum: the lowest deletion AUC of
    # any ordering, and the highest insertion AUC -- in particular better than every random map
    for seed in range(10):
        rnd = torch.rand(2, 6, 6, generator=gen(100 + seed), dtype=D)
        assert (dele.auc <= M.deletion_auc(net, x, rnd, t, steps=36, score="logit")).all()
        assert (ins.auc >= M.insertion_auc(net, x, rnd, t, steps=36, score="logit")).all()
    # and strictly better than the reversed ranking
    assert (dele.auc < M.deletion_auc(net, x, -c, t, steps=36, score="logit")).all()


def test_curves_default_to_softmax_probability_and_fewer_steps():
    net = relu_net()
    x = torch.randn(2, 2, 6, 6, generator=gen(3), dtype=D)
    g = S.gradient(net, x, 1)
    cur = M.deletion_curve(net, x, g, 1, steps=5)  # map shaped like x: reduced by max |.| over channels
    assert cur.scores.shape == (2, 6)
    torch.testing.assert_close(cur.fractions, torch.tensor([0, 7, 14, 21, 28, 36], dtype=D) / 36)
    torch.testing.assert_close(cur.scores[:, 0], torch.softmax(net(x).detach(), 1)[:, 1], rtol=0, atol=1e-15)
    zero = torch.softmax(net(torch.zeros_like(x)).detach(), 1)[:, 1]
    torch.testing.assert_close(cur.scores[:, -1], zero, rtol=0, atol=1e-15)
    ins = M.insertion_curve(net, x, g, 1, steps=5)
    torch.testing.assert_close(ins.scores[:, 0], zero, rtol=0, atol=1e-15)
    assert ((cur.scores >= 0) & (cur.scores <= 1)).all()
    assert torch.equal(M.deletion_auc(net, x, g, 1, steps=5), cur.auc)
    # batching does not change anything
    assert torch.equal(M.deletion_curve(net, x, g, 1, steps=5, batch_size=1).scores, cur.scores)
    # steps beyond H*W are clipped to one pixel per step
    assert M.insertion_curve(net, x, g, 1, steps=1000).scores.shape == (2, 37)


# --------------------------------------------------------------------------
# Prediction difference
# --------------------------------------------------------------------------


def test_prediction_difference_formula_on_a_linear_model():
    net = linear_model()
    x = torch.randn(2, 2, 6, 6, generator=gen(4), dtype=D)
    t = [1, 0]
    c = contributions(net, x, t)
    # 2x2 patches -> a 3x3 grid of R = 9 regions; fraction 0.25 -> k = round(2.25) = 2
    res = M.prediction_difference(net, x, c, t, fraction=0.25, patch=2, n_random=6, seed=7, score="logit")
    assert res.n_regions == 9 and res.k == 2
    region = c.reshape(2, 3, 2, 3, 2).sum((2, 4)).reshape(2, 9)  # contribution of each region
    # drop of a region set = the sum of its contributions; the map's top-2 regions are the 2 largest
    top2 = torch.sort(region, 1, descending=True)[0][:, :2].sum(1)
    torch.testing.assert_close(res.drop_map, top2, rtol=0, atol=1e-12)
    # the random draws, replayed from the documented generator
    g = torch.Generator().manual_seed(7)
    want = torch.tensor([[float(region[i, torch.randperm(9, generator=g)[:2]].sum()) for _ in range(6)] for i in range(2)], dtype=D)
    torch.testing.assert_close(res.drops_random, want, rtol=0, atol=1e-12)
    torch.testing.assert_close(res.drop_random_mean, want.mean(1))
    torch.testing.assert_close(res.drop_random_std, want.std(1))
    torch.testing.assert_close(res.difference, top2 - want.mean(1))
    # the top-k set maximises the drop: a positive gap against chance
    assert (res.drop_map >= res.drops_random.max(1)[0]).all() and (res.difference > 0).all()
    torch.testing.assert_close(res.base_score, net(x).detach()[range(2), t])


def test_prediction_difference_of_the_true_gradient_map_is_positive():
    net = linear_model(k=4, seed=1)
    x = torch.ones(3, 2, 6, 6, dtype=D)  # constant input: contributions are proportional to the gradient
    t = [0, 1, 3]
    gmap = S.gradient(net, x, t).sum(1)  # the signed gradient, per pixel
    res = M.prediction_difference(net, x, gmap, t, fraction=0.2, patch=(3, 2), n_random=20)
    assert res.n_regions == 6 and res.k == 1
    assert (res.difference > 0).all()
    assert (res.drop_map >= res.drops_random.max(1)[0]).all()
    # a random map does not beat chance systematically; the gradient map does better than it
    rnd = M.prediction_difference(net, x, torch.rand(3, 6, 6, generator=gen(5), dtype=D), t, fraction=0.2, patch=(3, 2))
    assert (res.drop_map >= rnd.drop_map).all()


def test_metric_argument_errors():
    net = relu_net()
    x = torch.randn(1, 2, 6, 6, generator=gen(6), dtype=D)
    m = torch.rand(1, 6, 6, generator=gen(7), dtype=D)
    for kw, msg in [({"fraction": 0.0}, "fraction"), ({"n_random": 0}, "n_random"), ({"patch": 0}, "patch"),
                    ({"score": "prob"}, "score must be")]:
        with pytest.raises(InputError, match=msg):
            M.prediction_difference(net, x, m, 0, **kw)
    with pytest.raises(InputError, match="saliency_map must be"):
        M.deletion_curve(net, x, torch.rand(1, 5, 5), 0)
    with pytest.raises(InputError, match="steps"):
        M.insertion_curve(net, x, m, 0, steps=0)
    with pytest.raises(InputError, match="NaN"):
        M.deletion_auc(net, x, torch.full((1, 6, 6), float("nan")), 0)
    with pytest.raises(InputError, match="out of range"):
        M.deletion_auc(net, x, m, 3)
