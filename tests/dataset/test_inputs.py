"""Bad inputs raise typed errors that say what to do; the user's model is left as it was."""

from __future__ import annotations

import pytest
import torch

import reconviz as rv
from dataset_common import digits_data, digits_model
from conftest import snapshot


@pytest.fixture(scope="module")
def data():
    return digits_data(32)


@pytest.mark.parametrize("kwargs, match", [
    ({"by": "class"}, "unknown by='class'"),
    ({"batch_size": 0}, "batch_size must be a positive integer"),
    ({"checkpoint_every": 1.5}, "checkpoint_every must be a positive integer"),
    ({"classes": [10]}, "class 10 is out of range"),
    ({"classes": [1, 1]}, "distinct"),
    ({"max_memory": 100}, "max_memory=100 bytes holds not even"),
    ({"max_memory": -1}, "max_memory must be a positive number"),
    ({"linearization": "taylor"}, "unknown linearization"),
    ({"transform": lambda x: x[:1]}, "transform must return a tensor with the batch's"),
])
def test_bad_options(data, kwargs, match):
    model = digits_model()
    before = snapshot(model)
    with pytest.raises(rv.InputError, match=match):
        rv.reconstruct_dataset(model, data, **kwargs)
    assert snapshot(model) == before


def test_bad_data():
    model = digits_model()
    x, y = digits_data(8)
    with pytest.raises(rv.InputError, match="by='label' needs labels"):
        rv.reconstruct_dataset(model, x)
    with pytest.raises(rv.InputError, match="sample 3 has label 12"):
        rv.reconstruct_dataset(model, (x, torch.tensor([0, 1, 2, 12, 4, 5, 6, 7])))
    bad = x.clone()
    bad[5, 0, 0, 0] = float("nan")
    with pytest.raises(rv.InputError, match="NaN/Inf"):
        rv.reconstruct_dataset(model, (bad, y))
    with pytest.raises(rv.InputError, match="data must be"):
        rv.reconstruct_dataset(model, [1, 2, 3])
    with pytest.raises(rv.InputError, match="neither a .npy file nor a folder"):
        rv.reconstruct_dataset(model, "no/such/thing.txt")
    with pytest.raises(rv.InputError, match="model must be a torch.nn.Module"):
        rv.reconstruct_dataset("model.pt", (x, y))


def test_model_untouched_and_nothing_left_behind(data):
    model = digits_model().train()
    model.features[0].register_forward_hook(lambda m, i, o: None)
    before = snapshot(model)
    with pytest.warns(UserWarning):  # training mode and the hook: the eval copy runs without it
        ts = rv.reconstruct_dataset(model, data, batch_size=16)
    assert ts.exact == 32
    assert snapshot(model) == before and model.training


def test_max_memory_slices_a_batch_and_changes_nothing_else(data):
    model = digits_model()
    whole = rv.reconstruct_dataset(model, data, batch_size=32)
    sliced = rv.reconstruct_dataset(model, data, batch_size=32, max_memory=1_000_000)  # a few probes at a time
    assert torch.equal(whole.count, sliced.count)
    assert (whole.mean - sliced.mean).abs().max() <= 1e-12 * whole.mean.abs().max()
    assert (whole.std - sliced.std).abs().max() <= 1e-12 * whole.std.abs().max()
