"""The model-safety contract for every entry point of reconviz.features: the user's model is the
same after a success and after a typed error (weights, buffers, modes, hooks, attributes), and no
process-wide state (global hooks, torch-function modes, grad mode, default dtype) is left behind."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn as nn

import reconviz as rv
import reconviz.features as rf
from features_fixtures import _one_thread  # noqa: F401 (fixtures)
from conftest import snapshot


class Net(nn.Module):
    """conv-BN-ReLU-maxpool-linear on (1, 8, 8), with a forward hook of the user's on the conv."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(1, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.relu = nn.ReLU()
        self.pool = nn.MaxPool2d(2)
        self.fc = nn.Linear(64, 3)
        self.conv.register_forward_hook(lambda m, i, o: None)

    def forward(self, x):
        return self.fc(self.pool(self.relu(self.bn(self.conv(x)))).flatten(1))


def _data(channels: int = 1):
    gen = torch.Generator().manual_seed(1)
    return torch.rand(12, channels, 8, 8, generator=gen), torch.arange(12) % 3


ENTRIES = {
    "activations": lambda m, x, y: rf.activations(m, x, "relu"),
    "feature_maps": lambda m, x, y: rf.feature_maps(m, x, "relu", path="fm.png"),
    "dead_units": lambda m, x, y: rf.dead_units(m, (x, y)),
    "top_patches": lambda m, x, y: rf.top_patches(m, (x, y), "relu", k=2, batch_size=5),
    "filters": lambda m, x, y: rf.filters(m, path="f.png"),
    "layer_features": lambda m, x, y: rf.layer_features(m, (x, y)),
    "embedding": lambda m, x, y: rf.embedding(m, (x, y), method="pca"),
    "maximise": lambda m, x, y: rf.maximise(m, x, [0, 2], steps=3),
    "maximise channel": lambda m, x, y: rf.maximise(m, x, 1, layer="relu", steps=3),
    "maximisation_figure": lambda m, x, y: rf.maximisation_figure(
        m, rf.maximise(rv.models.DigitsCNN(3, 4).eval(), torch.zeros(1, 1, 8, 8), [0], steps=1), x, y,
        path="m.png"),
    "class_profiles": lambda m, x, y: rf.class_profiles(m, (x, y), "templates", batch_size=5),
    "cluster_classes": lambda m, x, y: rf.cluster_classes(m, (x, y), 2, kind="confusion"),
    "cluster_neurons": lambda m, x, y: rf.cluster_neurons(m, (x, y), "relu", 2, kind="contribution"),
    "neuron_profiles": lambda m, x, y: rf.neuron_profiles(m, (x, y), "relu"),
}
NO_FORWARD = {"filters"}  # reads the weights only


def _assert_untouched(model, call, x, y, error=None):
    before, x_before = snapshot(model), x.numpy().tobytes()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if error is None:
            assert call(model, x, y) is not None
        else:
            with pytest.raises(error):
                call(model, x, y)
    assert snapshot(model) == before, "the user's model (or process-wide state) was modified"
    assert x.numpy().tobytes() == x_before, "the caller's input was written"


def test_every_public_function_with_a_model_is_covered():
    import inspect

    found = {n for n in rf.__all__ if inspect.isfunction(getattr(rf, n))
             and "model" in inspect.signature(getattr(rf, n)).parameters}
    assert found <= {e.split(" ")[0] for e in ENTRIES} | {"filter_images"}


@pytest.mark.parametrize("training", [False, True])
@pytest.mark.parametrize("entry", list(ENTRIES))
def test_model_untouched_after_success(entry, training, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    model = Net().train(training)
    _assert_untouched(model, ENTRIES[entry], *_data())
    assert all(m.training == training for m in model.modules())


@pytest.mark.parametrize("entry", [e for e in ENTRIES if e not in NO_FORWARD])
def test_model_untouched_when_the_forward_fails_midway(entry, tmp_path, monkeypatch):
    """Two-channel images: the conv fails inside the forward, with reconviz's hooks on the copy."""
    monkeypatch.chdir(tmp_path)
    x, y = _data(channels=2)
    _assert_untouched(Net().eval(), ENTRIES[entry], x, y, error=rv.InputError)


@pytest.mark.parametrize("entry", [e for e in ENTRIES if e not in NO_FORWARD])
def test_model_untouched_after_a_bad_input(entry, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    x, y = _data()
    x[3, 0, 2, 2] = float("nan")
    _assert_untouched(Net().eval(), ENTRIES[entry], x, y, error=rv.InputError)
