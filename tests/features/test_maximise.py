"""Activation maximisation on the bundled digits model: every class wins from a blank start."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import reconviz.features as rf
from reconviz.errors import InputError
from features_fixtures import _one_thread, digits  # noqa: F401 (fixtures)

SETTINGS = dict(steps=40, lr=0.05, clip=(0.0, 1.0), seed=0)


@pytest.fixture(scope="module")
def all_classes(digits):
    model, x, _, _ = digits
    return rf.maximise(model, x[:1], list(range(10)), **SETTINGS)


def test_each_target_logit_beats_every_other_from_blank(all_classes, digits):
    model, x, _, _ = digits
    r = all_classes
    assert r.images.shape == (10, 1, 8, 8) and r.targets == tuple(range(10))
    assert float(r.images.min()) >= 0.0 and float(r.images.max()) <= 1.0
    logits = r.logits.double()
    target = logits[torch.arange(10), torch.arange(10)]
    others = logits.clone()
    others[torch.arange(10), torch.arange(10)] = -float("inf")
    margin = target - others.max(1).values
    assert bool((margin > 1.0).all()), f"margins {margin.tolist()}"
    with torch.no_grad():  # the reported logits are the model's at the returned images (x's dtype: float32)
        torch.testing.assert_close(model(r.images), r.logits, rtol=1e-4, atol=1e-4)


def test_trace_rises(all_classes):
    trace = all_classes.trace
    assert trace.shape == (10, SETTINGS["steps"] + 1)
    steps = np.diff(trace, axis=1)
    assert bool((steps.mean(1) > 0).all())  # non-decreasing on average, every class
    assert bool((trace[:, -1] > trace[:, 0] + 5).all())
    assert float((steps > 0).mean()) > 0.6
    # blank start: the first entry is the logit at the zero image
    assert np.allclose(trace[:, 0], trace[0, 0] * 0 + trace[:, 0])


def test_deterministic_with_a_seed(all_classes, digits):
    model, x, _, _ = digits
    again = rf.maximise(model, x[:1], list(range(10)), **SETTINGS)
    assert torch.equal(again.images, all_classes.images) and np.array_equal(again.trace, all_classes.trace)
    other = rf.maximise(model, x[:1], list(range(10)), **{**SETTINGS, "seed": 1})
    assert not torch.equal(other.images, all_classes.images)  # the jitter follows the seed


def test_channel_objective_and_random_start(digits):
    model, x, _, _ = digits
    r = rf.maximise(model, x[:1], [3, 7], layer="features.6", steps=25, start="random", clip=(0, 1), seed=2)
    assert r.layer == "features.6" and r.trace.shape == (2, 26)
    assert bool((r.trace[:, -1] > r.trace[:, 0]).all())
    acts = rf.activations(model, r.images, "features.6")["features.6"]
    np.testing.assert_allclose(acts[[0, 1], [3, 7]].mean((1, 2)).numpy(), r.trace[:, -1], rtol=1e-5)


def test_regularisers_are_applied(digits):
    model, x, _, _ = digits
    free = rf.maximise(model, x[:1], 4, steps=10, jitter=0, blur_every=0, l2=0.0)
    decayed = rf.maximise(model, x[:1], 4, steps=10, jitter=0, blur_every=0, l2=0.5)
    assert float(decayed.images.norm()) < 0.5 * float(free.images.norm())
    blurred = rf.maximise(model, x[:1], 4, steps=10, jitter=0, blur_every=1, blur_sigma=1.0, l2=0.0)
    def roughness(img):
        return float((img[..., 1:, :] - img[..., :-1, :]).abs().mean() + (img[..., 1:] - img[..., :-1]).abs().mean())
    assert roughness(blurred.images) < roughness(free.images)


@pytest.mark.parametrize("kwargs, fragment", [
    (dict(target=10), "out of range"),
    (dict(target=[]), "empty"),
    (dict(target=1, steps=0), "steps"),
    (dict(target=1, clip=(1, 0)), "clip"),
    (dict(target=1, start="noise"), "start"),
    (dict(target=1, l2=1.5), "l2"),
    (dict(target=40, layer="features.6"), "channel index out of range"),
    (dict(target=1, layer="nope"), "no module named"),
])
def test_bad_arguments(digits, kwargs, fragment):
    model, x, _, _ = digits
    with pytest.raises(InputError, match=fragment):
        rf.maximise(model, x[:1], **kwargs)
