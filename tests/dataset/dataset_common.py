"""Shared builders of the dataset tests (importable by the child processes too, without scikit-learn)."""

from __future__ import annotations

import functools

import numpy as np
import torch

from reconviz.models.digits import WEIGHTS, DigitsCNN


def digits_model() -> torch.nn.Module:
    """The bundled digits CNN (eval mode, float32): a fresh copy each call."""
    model = DigitsCNN()
    model.load_state_dict(torch.load(WEIGHTS, map_location="cpu", weights_only=True))
    return model.eval()


@functools.lru_cache(maxsize=None)
def _test_split() -> tuple[np.ndarray, np.ndarray]:
    from reconviz.models import load_data

    data = load_data()
    return data.x_test, data.y_test


def digits_data(n: int = 300) -> tuple[torch.Tensor, torch.Tensor]:
    """The first n digits of the bundled test split: (x float32 (n, 1, 8, 8), y (n,))."""
    x, y = _test_split()
    return torch.as_tensor(x[:n]), torch.as_tensor(y[:n])


def save_digits(folder, n: int = 300) -> None:
    """x.npy and y.npy of :func:`digits_data` in ``folder`` (for child processes)."""
    x, y = digits_data(n)
    np.save(folder / "x.npy", x.numpy())
    np.save(folder / "y.npy", y.numpy())


def load_digits_files(folder) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.from_numpy(np.load(folder / "x.npy")), torch.from_numpy(np.load(folder / "y.npy"))
