"""The bundled digits model and its data split."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import reconviz as rv


@pytest.fixture(scope="module")
def digits():
    return rv.models.digits()


def test_split_is_fixed_stratified_and_scaled(digits):
    _, data = digits
    assert data.x_train.shape == (1347, 1, 8, 8) and data.x_test.shape == (450, 1, 8, 8)
    assert data.x_train.dtype == np.float32 and data.y_test.dtype == np.int64
    assert 0.0 == data.x_test.min() and data.x_test.max() == 1.0
    assert data.class_names == tuple("0123456789")
    per_class = np.bincount(data.y_test) / (np.bincount(data.y_test) + np.bincount(data.y_train))
    assert np.abs(per_class - 0.25).max() < 0.01  # stratified: a quarter of every class is held out
    again = rv.models.load_data()
    assert np.array_equal(again.x_test, data.x_test) and np.array_equal(again.y_test, data.y_test)


def test_bundled_model_accuracy_and_mode(digits):
    model, data = digits
    assert not model.training and all(p.dtype == torch.float32 for p in model.parameters())
    with torch.no_grad():
        pred = model(torch.as_tensor(data.x_test)).argmax(1)
    assert float((pred == torch.as_tensor(data.y_test)).double().mean()) >= 0.97


def test_weights_file_is_small_and_weights_only():
    from reconviz.models.digits import WEIGHTS

    assert WEIGHTS.stat().st_size < 300_000
    state = torch.load(WEIGHTS, weights_only=True)  # a plain state_dict: no code runs on load
    assert all(isinstance(v, torch.Tensor) for v in state.values())


def test_each_call_returns_a_fresh_model(digits):
    model, _ = digits
    other, _ = rv.models.digits()
    with torch.no_grad():
        other.classifier[-1].bias.add_(1.0)
    assert not torch.equal(model.classifier[-1].bias, other.classifier[-1].bias)


def test_missing_weights_is_a_clear_error(tmp_path):
    with pytest.raises(rv.InputError, match="train_digits.py"):
        rv.models.digits(tmp_path / "nope.pt")


def test_reconstruction_of_the_bundled_model_is_region_exact(digits):
    model, data = digits
    x = torch.as_tensor(data.x_test[:20], dtype=torch.float64)
    rec = rv.reconstruct(model, x)
    work = rv.linearize(model, x)  # the same network, float64
    with torch.no_grad():
        logits = work(x)
    assert float(((rec(x) - logits).abs() / logits.abs().clamp_min(1)).max()) <= 1e-9
