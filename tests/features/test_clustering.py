"""Clustering: reproducible labels, and two planted groups of neurons recovered exactly."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn as nn
from sklearn.metrics import adjusted_rand_score

import reconviz as rv
import reconviz.features as rf
from reconviz.errors import InputError
from features_fixtures import _one_thread, digits  # noqa: F401 (fixtures)

GROUPS = np.array([0, 0, 0, 0, 1, 1, 1, 1])  # the planted partition of the 8 hidden neurons


def planted_data(n=40, seed=0):
    """4 classes, inputs near the class's one-hot vector."""
    gen = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % 4
    x = torch.eye(4)[y] + 0.05 * torch.rand(n, 4, generator=gen)
    return x, y


def net(hidden, head):
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 4)).eval()
    with torch.no_grad():
        model[0].weight.copy_(hidden)
        model[0].bias.zero_()
        model[2].weight.copy_(head)
        model[2].bias.zero_()
    return model


def by_activation():
    """Neurons 0-3 fire for classes 0, 1 and 4-7 for classes 2, 3 (each with its own scale); the head is random."""
    scale = torch.tensor([1.0, 2.0, 3.0, 4.0, 1.5, 2.5, 0.5, 3.5])[:, None]
    hidden = torch.where(torch.tensor(GROUPS)[:, None] == 0, torch.tensor([[1.0, 1, 0, 0]]),
                         torch.tensor([[0.0, 0, 1, 1]])) * scale
    return net(hidden, torch.randn(4, 8, generator=torch.Generator().manual_seed(1)))


def by_contribution():
    """Every neuron fires for every class alike (activation profiles do not tell the groups apart);
    the head wires neurons 0-3 to logits 0, 1 (+) and 2, 3 (-), neurons 4-7 the other way round."""
    hidden = 0.5 + torch.rand(8, 4, generator=torch.Generator().manual_seed(2))
    sign = torch.tensor([[1.0, 1, -1, -1]]).T * torch.where(torch.tensor(GROUPS) == 0, 1.0, -1.0)[None]
    return net(hidden, sign * (0.5 + torch.rand(4, 8, generator=torch.Generator().manual_seed(3))))


@pytest.mark.parametrize("method", ["hierarchical", "kmeans"])
@pytest.mark.parametrize("kind, make", [("activation", by_activation), ("contribution", by_contribution)])
def test_planted_groups_are_recovered_exactly(kind, make, method):
    x, y = planted_data()
    result = rf.cluster_neurons(make(), (x, y), "1", 2, kind=kind, method=method, batch_size=16)
    assert result.profiles.shape == (8, 4)
    assert np.array_equal(result.labels, GROUPS)  # ids by first appearance: the planted ids themselves
    assert set(result.top_columns(0, 2)) == {"0", "1"} and set(result.top_columns(1, 2)) == {"2", "3"}


def test_contribution_profiles_are_exact_decompositions():
    """Each neuron's contribution sum_s (W_k * a)_j; over the neurons plus b_k they sum to logit k."""
    model = by_contribution()
    x, y = planted_data(8)
    prof = rf.neuron_profiles(model, (x, y), "1", "contribution")
    with torch.no_grad():
        h = model[1](model[0](x)).double()
        contrib = h[:, None, :] * model[2].weight.double()[None]  # (N, K, 8): exact for a linear head
    expected = np.stack([contrib[y == k, k].mean(0).numpy() for k in range(4)], 1)
    np.testing.assert_allclose(prof, expected, rtol=1e-6, atol=1e-6)


def test_activation_profiles_do_not_separate_the_contribution_net():
    x, y = planted_data()
    act = rf.cluster_neurons(by_contribution(), (x, y), "1", 2, kind="activation")
    assert adjusted_rand_score(act.labels, GROUPS) < 1.0


@pytest.mark.parametrize("method", ["hierarchical", "kmeans"])
def test_labels_are_reproducible_with_a_seed(digits, method):
    model, x, y, names = digits
    runs = [rf.cluster_neurons(model, (x[:120], y[:120]), "features.6", 4, method=method, seed=7).labels
            for _ in range(2)]
    assert np.array_equal(*runs) and set(runs[0]) == {0, 1, 2, 3}
    profiles = np.random.default_rng(0).normal(size=(30, 5))
    a, b = (rf.cluster(profiles, 3, method=method, seed=3).labels for _ in range(2))
    assert np.array_equal(a, b)


@pytest.mark.parametrize("kind", ["features", "templates", "confusion"])
def test_class_clustering(digits, kind):
    model, x, y, names = digits
    result = rf.cluster_classes(model, (x[:150], y[:150]), 3, kind=kind, class_names=names)
    assert result.names == tuple(names) and result.labels.shape == (10,) and set(result.labels) == {0, 1, 2}
    assert sorted(m for k in range(3) for m in result.members(k)) == sorted(names)
    if kind == "confusion":
        np.testing.assert_allclose(result.profiles.sum(1), 1.0)
        assert np.all(np.diag(result.profiles) > 0.8)  # the model is 97 % accurate on the test split
    if kind == "templates":  # the class means of each probe's own template, as rv.reconstruct gives them
        w = rv.reconstruct(model, x[:150]).weight.flatten(2)
        want = np.stack([w[y[:150] == c, c].mean(0).numpy() for c in range(10)])
        np.testing.assert_allclose(result.profiles, want, rtol=0, atol=1e-12 * np.abs(want).max())


@pytest.mark.parametrize("call, fragment", [
    (lambda: rf.cluster(np.ones((3, 2)), 4), "n_clusters"),
    (lambda: rf.cluster(np.ones((3, 2)), 2, method="dbscan"), "method"),
    (lambda: rf.cluster(np.full((3, 2), np.nan), 2), "finite"),
    (lambda: rf.cluster(np.ones((3, 2)), 2, names=["a"]), "names"),
    (lambda: rf.neuron_profiles(by_activation(), planted_data()[0], "1", "gradient"), "kind"),
    (lambda: rf.class_profiles(by_activation(), planted_data()[0]), "labelled"),
])
def test_bad_arguments(call, fragment):
    with pytest.raises(InputError, match=fragment):
        call()


def test_template_profiles_refuse_a_probe_that_fails_its_check(digits):
    """A model that mixes samples (sample 0's logits depend on sample 1: affine, so only the
    per-probe check sees it): the profile raises, as rv.reconstruct does, never averaging fewer."""
    model, x, y, _ = digits

    class Mixing(nn.Module):
        def __init__(self):
            super().__init__()
            self.net = model

        def forward(self, z):
            pick = torch.zeros(z.shape[0], 1, dtype=z.dtype)
            pick[0] = 0.5 if z.shape[0] > 1 else 0.0
            return self.net(z) + pick * z[-1:].flatten(1).sum(1, keepdim=True)

    with pytest.raises(rv.ExactnessError, match="failed the exactness check"):
        rf.class_profiles(Mixing().eval(), (x[:40], y[:40]), "templates", batch_size=20)
