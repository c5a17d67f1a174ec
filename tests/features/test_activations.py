"""Layer activations, dead units and raw filters."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn as nn

import reconviz.features as rf
from reconviz.errors import InputError
from features_fixtures import _one_thread, digits  # noqa: F401 (fixtures)


def test_activations_are_the_layer_outputs(digits):
    model, x, _, _ = digits
    acts = rf.activations(model, x[:5], ["features.2", "classifier.1"])
    assert list(acts) == ["features.2", "classifier.1"]
    with torch.no_grad():
        torch.testing.assert_close(acts["features.2"], model.features[:3](x[:5]), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(acts["classifier.1"], model.classifier[:2](model.features(x[:5])), rtol=1e-5,
                                   atol=1e-5)
    assert acts["features.2"].dtype == torch.float32  # x's dtype
    default = rf.activations(model, x[:2])  # conv, linear, rectifier and pooling leaves
    assert list(default) == ["features.0", "features.2", "features.3", "features.4", "features.6", "features.7",
                             "classifier.1", "classifier.2", "classifier.4"]
    by_type = rf.activations(model, x[:2], nn.ReLU)
    assert list(by_type) == ["features.2", "features.6", "classifier.2"]


def test_inplace_relu_does_not_change_the_recorded_conv_output():
    model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.ReLU(inplace=True)).eval()
    x = torch.randn(3, 1, 5, 5, generator=torch.Generator().manual_seed(0))
    acts = rf.activations(model, x, ["0", "1"])
    assert bool((acts["0"] < 0).any()) and torch.equal(acts["1"], acts["0"].clamp_min(0))


class Planted(nn.Module):
    """Channel 0 is dead (zero weights, bias -1); channels 1, 2 open wherever the input is positive."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 3, 3, padding=1)
        with torch.no_grad():
            self.conv.weight.zero_()
            self.conv.weight[1:, 0, 1, 1] = 1.0
            self.conv.bias.copy_(torch.tensor([-1.0, 0.0, 0.0]))
        self.relu = nn.ReLU()
        self.fc = nn.Linear(3 * 4 * 4, 2)

    def forward(self, x):
        return self.fc(self.relu(self.conv(x)).flatten(1))


def test_dead_units_are_counted_exactly():
    x = torch.rand(20, 1, 4, 4, generator=torch.Generator().manual_seed(0)) + 0.1
    x[:, :, 0, 0] = 0.0  # the top-left pixel is 0 in every input: channels 1, 2 are dead there too
    result = rf.dead_units(Planted().eval(), x, batch_size=6)
    assert result.layers == ("relu",) and result.n_inputs == 20
    assert result.units == (48,) and result.dead == (16 + 2,) and result.channels == (3,)
    assert result.dead_channels == (1,) and result.fraction == {"relu": 18 / 48}
    assert "18/48" in result.table() and result.to_dict()["layers"][0]["dead_channels"] == 1


def test_dead_units_on_digits_agree_with_the_activations(digits):
    model, x, y, _ = digits
    result = rf.dead_units(model, (x, y), batch_size=100)
    acts = rf.activations(model, x, nn.ReLU)
    for layer, dead in zip(result.layers, result.dead):
        assert dead == int((acts[layer] == 0).all(0).sum())
    assert result.dead == (40, 0, 2)  # the bundled weights: 40 of 1024 conv-1 units, 2 of 64 hidden units


def test_dead_units_needs_rectifiers():
    with pytest.raises(InputError, match="selects no module"):
        rf.dead_units(nn.Sequential(nn.Linear(3, 2)).eval(), torch.rand(4, 3))


def test_filter_images(digits):
    model, *_ = digits
    name, imgs, kind = rf.filter_images(model)
    w = model.features[0].weight.detach().double().numpy()[:, 0]
    assert name == "features.0" and kind == "signed" and imgs.shape == (16, 3, 3)
    np.testing.assert_allclose(imgs, w / np.abs(w).reshape(16, -1).max(1)[:, None, None])
    assert np.allclose(np.abs(imgs).reshape(16, -1).max(1), 1.0)
    name, deep, kind = rf.filter_images(model, "features.4")
    assert kind == "magnitude" and deep.shape == (32, 3, 3)
    np.testing.assert_allclose(deep, np.abs(model.features[4].weight.detach().double().numpy()).mean(1))
    rgb = nn.Conv2d(3, 5, 3)
    _, colour, kind = rf.filter_images(nn.Sequential(rgb))
    assert kind == "rgb" and colour.shape == (5, 3, 3, 3) and colour.min() >= 0 and colour.max() <= 1
    with pytest.raises(InputError, match="not a convolution"):
        rf.filter_images(model, "features.1")
    with pytest.raises(InputError, match="no convolution"):
        rf.filter_images(nn.Sequential(nn.Linear(2, 2)))
