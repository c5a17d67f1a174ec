"""The bundled digits CNN and its data: scikit-learn's UCI handwritten digits.

``load_digits`` ships 1,797 real 8x8 grey images (values 0..16) with the
package, so nothing is downloaded. The split is fixed (stratified, 25 % test,
``random_state=0``) and pixel values are scaled to [0, 1].

The network (conv-BN-ReLU-maxpool twice, then two fully connected layers) is
piecewise linear in its input, so every reconstruction of it is region-exact.
Its weights are trained by ``examples/train_digits.py`` and ship as
``digits_cnn.pt`` beside this file (a state_dict, loaded with
``weights_only=True``).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ..errors import InputError

__all__ = ["DigitsCNN", "DigitsData", "digits", "load_data", "WEIGHTS"]

WEIGHTS = Path(__file__).with_name("digits_cnn.pt")
TEST_FRACTION = 0.25
SPLIT_SEED = 0


class DigitsCNN(nn.Module):
    """(N, 1, 8, 8) grey digits in [0, 1] -> (N, 10) logits.

    conv3x3(1->16)-BN-ReLU-maxpool2 -> conv3x3(16->32)-BN-ReLU-maxpool2 -> 128
    -> Linear(64)-ReLU -> Linear(10).
    """

    def __init__(self, n_classes: int = 10, width: int = 16):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(width, 2 * width, 3, padding=1), nn.BatchNorm2d(2 * width), nn.ReLU(), nn.MaxPool2d(2),
        )
        self.classifier = nn.Sequential(
            nn.Flatten(), nn.Linear(2 * width * 2 * 2, 64), nn.ReLU(), nn.Dropout(0.25), nn.Linear(64, n_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


@dataclass(frozen=True)
class DigitsData:
    """The fixed split: images (N, 1, 8, 8) float32 in [0, 1], labels (N,) int64."""

    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    class_names: tuple[str, ...]


def load_data() -> DigitsData:
    """scikit-learn's bundled digits, scaled to [0, 1], in the fixed stratified split."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    bunch = load_digits()
    x = (bunch.images / 16.0).astype(np.float32)[:, None]  # (1797, 1, 8, 8)
    y = bunch.target.astype(np.int64)
    x_train, x_test, y_train, y_test = train_test_split(
        x, y, test_size=TEST_FRACTION, random_state=SPLIT_SEED, stratify=y)
    return DigitsData(x_train, y_train, x_test, y_test, tuple(str(c) for c in bunch.target_names))


def digits(weights: str | Path | None = None) -> tuple[DigitsCNN, DigitsData]:
    """The trained digits CNN (eval mode, float32, CPU) and its data split.

    ``weights``: a state_dict file to load instead of the bundled one (e.g. one
    written by ``examples/train_digits.py``); always read with ``weights_only=True``.
    """
    path = Path(weights) if weights is not None else WEIGHTS
    if not path.is_file():
        raise InputError(f"digits weights not found at {path}: run examples/train_digits.py to write them")
    model = DigitsCNN()
    model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
    return model.eval(), load_data()
