"""Shared fixtures of the features tests (imported by each module: a conftest.py here would shadow
tests/conftest.py, which other test folders import as `conftest`): the digits model, one thread."""

from __future__ import annotations

import pytest
import torch

import reconviz as rv


@pytest.fixture(scope="session")
def digits():
    """(model, x_test (450, 1, 8, 8) float32, y_test (450,) int64, class names)."""
    model, data = rv.models.digits()
    return model, torch.as_tensor(data.x_test), torch.as_tensor(data.y_test), list(data.class_names)


@pytest.fixture(autouse=True)
def _one_thread():
    """The digits model is tiny: one intra-op thread is faster than two (and than two fighting over a
    shared machine). tests/conftest.py restores the thread count after each test."""
    torch.set_num_threads(1)
    yield
