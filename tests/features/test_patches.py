"""Top-activating patches: equal to a brute-force search, cropped to the exact receptive field."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn as nn
from PIL import Image
from torch.utils.data import DataLoader, TensorDataset

import reconviz.features as rf
from reconviz.errors import InputError
from features_fixtures import _one_thread, digits  # noqa: F401 (fixtures)


def brute_force(model, x, layer, channels, k):
    """Every activation of the whole dataset, sorted (value desc, then sample, then position)."""
    a = rf.activations(model, x.double(), layer)[layer]
    units = a.reshape(a.shape[0], a.shape[1], -1)
    s = units.shape[2]
    out = []
    for c in channels:
        vals = units[:, c].reshape(-1)
        order = torch.sort(vals, descending=True, stable=True).indices[:k]
        out.append((vals[order], order // s, order % s))
    return out, tuple(a.shape[2:])


def assert_matches(result, model, x, y, layer, channels, k):
    expected, spatial = brute_force(model, x, layer, channels, k)
    assert result.channels == tuple(channels) and result.n_inputs == x.shape[0]
    for i, (vals, idx, flat) in enumerate(expected):
        # batches of another size round differently (conv and matmul kernels), by ~1e-16 relative
        torch.testing.assert_close(result.values[i], vals, rtol=1e-12, atol=1e-12)
        assert torch.equal(result.indices[i], idx)
        pos = torch.stack(torch.unravel_index(flat, spatial), -1) if spatial else flat.new_zeros(k, 0)
        assert torch.equal(result.positions[i], pos)
        for j in range(k):
            r0, r1, c0, c1 = result.field.box(int(flat[j]))
            assert result.boxes[i, j].tolist() == [r0, r1, c0, c1]
            assert torch.equal(result.crops[i][j], x[int(idx[j]), :, r0:r1, c0:c1].to(result.crops[i][j].dtype))
        if y is not None:
            assert torch.equal(result.labels[i], y[idx])


@pytest.mark.parametrize("layer", ["features.2", "features.6", "classifier.2"])
def test_top_patches_equal_brute_force_on_digits(digits, layer):
    model, x, y, _ = digits
    x, y = x[:200], y[:200]
    channels = [0, 5, 7]
    result = rf.top_patches(model, (x, y), layer, channels, k=6, batch_size=37)  # 37: merges across batches
    assert_matches(result, model, x, y, layer, channels, 6)


def test_every_source_gives_the_same_result(digits, tmp_path):
    model, x, y, _ = digits
    x, y = x[:40], y[:40]
    ref = rf.top_patches(model, (x, y), "features.6", [1, 2], k=4, batch_size=16)
    loader = DataLoader(TensorDataset(x, y), batch_size=9)
    for source in (TensorDataset(x, y), loader, x):
        got = rf.top_patches(model, source, "features.6", [1, 2], k=4, batch_size=16)
        torch.testing.assert_close(got.values, ref.values, rtol=1e-12, atol=1e-12)
        assert torch.equal(got.indices, ref.indices) and torch.equal(got.positions, ref.positions)
    # a folder of PNGs: 8-bit images, so compare against the brute force on what was written
    written = torch.round(x * 255) / 255
    for i, (img, label) in enumerate(zip(written, y)):
        folder = tmp_path / f"c{int(label)}"
        folder.mkdir(exist_ok=True)
        Image.fromarray((img[0].numpy() * 255).round().astype(np.uint8), "L").save(folder / f"{i:03d}.png")
    got = rf.top_patches(model, tmp_path, "features.6", [1, 2], k=4, batch_size=16)
    order = sorted(range(40), key=lambda i: (int(y[i]), i))  # the folder's order: class, then file name
    assert_matches(got, model, written[order], y[order], "features.6", [1, 2], 4)


class Deep(nn.Module):
    """conv3-ReLU-maxpool2-conv3 on (1, 16, 16): receptive field 8 x 8 at conv2 (the output)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(3)
        self.conv1, self.conv2 = nn.Conv2d(1, 4, 3), nn.Conv2d(4, 3, 3)
        self.pool, self.relu = nn.MaxPool2d(2), nn.ReLU()

    def forward(self, x):
        return self.conv2(self.pool(self.relu(self.conv1(x))))


def test_the_crop_is_the_receptive_field():
    """Perturbing a pixel just outside the crop leaves the activation exactly as it was;
    perturbing the crop's edge row / column just inside changes it."""
    model = Deep().eval()
    x = torch.rand(30, 1, 16, 16, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    result = rf.top_patches(model, x, "conv2", k=5, batch_size=8)
    assert result.field.extent == (8, 8)
    model64 = Deep().eval().double()
    checked_outside = 0
    for i, c in enumerate(result.channels):
        for j in range(5):
            n, (pi, pj) = int(result.indices[i, j]), result.positions[i, j].tolist()
            r0, r1, c0, c1 = result.boxes[i, j].tolist()

            def unit(img):
                with torch.no_grad():
                    return model64(img[None])[0, c, pi, pj]

            base = unit(x[n])
            torch.testing.assert_close(base, result.values[i, j], rtol=1e-12, atol=1e-12)
            edges = {"top": (r0 - 1, r0, "row"), "bottom": (r1, r1 - 1, "row"),
                     "left": (c0 - 1, c0, "col"), "right": (c1, c1 - 1, "col")}
            for outside, inside, axis in edges.values():
                if 0 <= outside < 16:
                    img = x[n].clone()
                    (img[0, outside, c0:c1] if axis == "row" else img[0, r0:r1, outside]).add_(5.0)
                    assert torch.equal(unit(img), base), "a pixel outside the receptive field changed the unit"
                    checked_outside += 1
                changed = []
                for delta in (5.0, -5.0, 0.5, -0.5):  # a max-pool switch or a closed ReLU may hide one of them
                    img = x[n].clone()
                    (img[0, inside, c0:c1] if axis == "row" else img[0, r0:r1, inside]).add_(delta)
                    changed.append(not torch.equal(unit(img), base))
                assert any(changed), "the receptive field's edge does not reach the unit"
    assert checked_outside >= 20


def test_progress_bar(digits, capsys):
    model, x, y, _ = digits
    rf.top_patches(model, (x[:50], y[:50]), "features.6", [0], k=2, batch_size=20, progress=True)
    err = capsys.readouterr().err
    assert "top patches" in err and "/50" in err  # tqdm on stderr, sized by the data


def test_memory_is_bounded_by_k(digits):
    model, x, y, _ = digits
    result = rf.top_patches(model, (x, y), "features.6", k=3, batch_size=64)
    assert result.values.shape == (32, 3) and len(result.crops) == 32 and all(len(r) == 3 for r in result.crops)
    assert bool((result.values[:, :-1] >= result.values[:, 1:]).all())


@pytest.mark.parametrize("kwargs, fragment", [
    (dict(layer="nope"), "no module named"),
    (dict(layer="features.6", channels=[40]), "channels"),
    (dict(layer="features.6", k=0), "k must be"),
    (dict(layer=3), "one module name"),
])
def test_bad_arguments(digits, kwargs, fragment):
    model, x, _, _ = digits
    with pytest.raises(InputError, match=fragment):
        rf.top_patches(model, x[:5], **kwargs)


def test_flat_inputs_are_refused():
    model = nn.Sequential(nn.Linear(6, 3), nn.ReLU()).eval()
    with pytest.raises(InputError, match="images"):
        rf.top_patches(model, torch.rand(4, 6), "1")
