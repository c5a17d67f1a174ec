"""The numbers: reconstruct_dataset's mean / std / counts against brute force from rv.reconstruct."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import reconviz as rv
from dataset_common import digits_data, digits_model
from reconviz.dataset.moments import Moments
from reconviz.dataset.rows import solve_batch
from reconviz.probe import eval_copy

N = 150
REL = 1e-12


@pytest.fixture(scope="module")
def setup():
    model = digits_model()
    x, y = digits_data(N)
    rec = rv.reconstruct(model, x, method="adjoint")  # every probe's own W (N, K, 1, 8, 8), float64
    w = rec.weight.reshape(N, rec.n_classes, -1).numpy()
    return model, x, y, rec, w


def close(got, want, rel=REL):
    got, want = np.asarray(got, dtype=np.float64), np.asarray(want, dtype=np.float64)
    scale = max(np.abs(want).max(), 1e-300)
    assert got.shape == want.shape
    assert np.abs(got - want).max() <= rel * scale, np.abs(got - want).max() / scale


def brute(w_rows, x_rows, b_rows, l_rows, groups, k):
    """Per class: numpy mean / std (ddof 0) of W, mean of W * x, mean / std of b, mean logit."""
    out = {name: [] for name in ("count", "mean", "std", "contrib", "bias", "bias_std", "logit")}
    for c in range(k):
        m = groups == c
        out["count"].append(m.sum())
        for name, v in (("mean", w_rows[m].mean(0)), ("std", w_rows[m].std(0)),
                        ("contrib", (w_rows[m] * x_rows[m]).mean(0)), ("bias", b_rows[m].mean()),
                        ("bias_std", b_rows[m].std()), ("logit", l_rows[m].mean())):
            out[name].append(v)
    return {k_: np.array(v) for k_, v in out.items()}


def check(ts, want):
    close(ts.count.numpy(), want["count"], 0)
    close(ts.mean.reshape(ts.n_classes, -1), want["mean"])
    close(ts.std.reshape(ts.n_classes, -1), want["std"])
    close(ts.contribution_mean.reshape(ts.n_classes, -1), want["contrib"])
    close(ts.bias_mean, want["bias"])
    close(ts.bias_std, want["bias_std"])
    close(ts.logit_mean, want["logit"])


@pytest.mark.parametrize("by", ["label", "prediction"])
def test_one_class_per_probe_equals_brute_force(setup, by):
    model, x, y, rec, w = setup
    t = y.numpy() if by == "label" else rec.logits.argmax(1).numpy()
    ar = np.arange(N)
    xs = x.double().reshape(N, -1).numpy()
    want = brute(w[ar, t], xs, rec.bias.numpy()[ar, t], rec.logits.numpy()[ar, t], t, 10)
    ts = rv.reconstruct_dataset(model, (x, y), by=by, batch_size=32)  # 5 batches, the last one short
    check(ts, want)
    assert ts.exact == N and ts.failed == [] and ts.meta["probes"] == N
    assert ts.meta["max_rel_error"] <= 1e-9 and ts.meta["exactness"] == "region-exact"


def test_all_classes_equal_brute_force(setup):
    model, x, y, rec, w = setup
    n = 40
    ts = rv.reconstruct_dataset(model, x[:n], by="all", classes=[7, 2, 5], batch_size=16)
    xs = x[:n].double().reshape(n, -1).numpy()
    for k, c in enumerate([7, 2, 5]):
        close(ts.mean[k].reshape(-1), w[:n, c].mean(0))
        close(ts.std[k].reshape(-1), w[:n, c].std(0))
        close(ts.contribution_mean[k].reshape(-1), (w[:n, c] * xs).mean(0))
    assert ts.count.tolist() == [n] * 3 and ts.classes.tolist() == [7, 2, 5]


def test_classes_subset_skips_the_others(setup):
    model, x, y, rec, w = setup
    ts = rv.reconstruct_dataset(model, (x, y), classes=[3, 8], batch_size=64)
    for k, c in enumerate([3, 8]):
        m = y.numpy() == c
        assert int(ts.count[k]) == m.sum()
        close(ts.mean[k].reshape(-1), w[m, c].mean(0))
    assert ts.meta["skipped"] == N - ts.exact


def test_label_rows_are_each_probes_own_reconstruction(setup):
    """One backward pass of sum_i f_i[y_i] gives row i = the per-probe reconstruction's W_{y_i}."""
    model, x, y, _, _ = setup
    work = eval_copy(model, torch.float64, torch.device("cpu"), track_paths=True)
    xb = x[:24].double()
    rows = solve_batch(work, xb, lambda logits: y[:24, None], None, seed=0)
    for i in (0, 5, 23):
        one = rv.reconstruct(model, x[i:i + 1], classes=[int(y[i])], method="adjoint")
        close(rows.w[i, 0], one.weight.reshape(-1))
        close(rows.b[i, :1], one.bias.reshape(-1))
    assert bool(rows.ok.all())


def test_moments_stay_accurate_where_a_sum_of_squares_would_not():
    """mean 1e8, std 1: the naive E[w^2] - E[w]^2 loses every digit; Chan's merges keep them."""
    g = torch.Generator().manual_seed(0)
    v = 1e8 + torch.randn(20000, 3, generator=g, dtype=torch.float64)
    m = Moments.zeros(1, 3)
    for s in range(0, 20000, 333):
        m.add(torch.zeros(v[s:s + 333].shape[0], dtype=torch.long), v[s:s + 333])
    close(m.mean[0], v.numpy().mean(0), 1e-13)
    close(m.std()[0], v.numpy().std(0), 1e-7)  # the condition: eps * mean / std = 1e-8
    a, b = Moments.zeros(1, 3), Moments.zeros(1, 3)
    a.add(torch.zeros(7000, dtype=torch.long), v[:7000])
    b.add(torch.zeros(13000, dtype=torch.long), v[7000:])
    a.merge(b)
    close(a.std()[0], v.numpy().std(0), 1e-7)  # the condition: eps * mean / std = 1e-8
    naive = ((v.square().mean(0) - v.mean(0).square()).clamp_min(0)).sqrt()
    assert (naive - torch.from_numpy(v.numpy().std(0))).abs().max() > 1e-3  # what the Chan merge avoids


class Smooth(torch.nn.Module):
    """conv - SiLU - max-pool - linear: point-exact (the value rule freezes SiLU's gate at x0)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv = torch.nn.Conv2d(1, 4, 3, padding=1)
        self.fc = torch.nn.Linear(64, 5)

    def forward(self, x):
        return self.fc(torch.nn.functional.max_pool2d(torch.nn.functional.silu(self.conv(x)), 2).flatten(1))


@pytest.mark.parametrize("linearization", ["value", "tangent"])
def test_point_exact_models_follow_the_linearization_rule(linearization):
    model = Smooth().eval()
    x = torch.rand(8, 1, 8, 8, generator=torch.Generator().manual_seed(3))
    rec = rv.reconstruct(model, x, method="adjoint", linearization=linearization)
    t = rec.logits.argmax(1).numpy()
    w = rec.weight.reshape(8, 5, -1).numpy()[np.arange(8), t]
    ts = rv.reconstruct_dataset(model, x, by="prediction", batch_size=3, linearization=linearization)
    assert ts.exact == 8 and ts.meta["exactness"] == "point-exact"
    for c in range(5):
        if (t == c).any():
            close(ts.mean[c].reshape(-1), w[t == c].mean(0))
            close(ts.std[c].reshape(-1), w[t == c].std(0))
