"""The head-factorized solve: W = A J through the affine head's narrowest cut (method="head").

It must agree with the adjoint solve to 1e-10 relative, find a cut only where every path
from the outputs to the input runs through it, and be what ``auto`` picks when P << K.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import reconviz as rv
from archs import classic
from conftest import assert_exact


def _agree(model: nn.Module, x: torch.Tensor, **kw) -> rv.Reconstruction:
    head = rv.reconstruct(model, x, method="head", **kw)
    adjoint = rv.reconstruct(model, x, method="adjoint", **kw)
    scale = adjoint.weight.abs().max()
    assert float((head.weight - adjoint.weight).abs().max() / scale) <= 1e-10
    assert float(((head.bias - adjoint.bias).abs() / adjoint.bias.abs().clamp_min(1)).max()) <= 1e-10
    assert head.meta["method"] == "head" and head.meta["max_rel_error"] <= 1e-9
    assert all(c["passed"] is not False for c in head.meta["self_checks"])
    assert_exact(head, model)
    return head


@pytest.mark.parametrize("name, width", [("resnet", 24), ("densenet", 18), ("vgg", None)])
def test_head_agrees_with_the_adjoint_on_classic_nets(name, width):
    """ResNet-style (global average pool: 24 features), DenseNet-style (global max pool, a gate:
    the cut is its output, 18 features) at 100 classes, and VGG-style (a cut wherever its head
    has one narrower than the classes, else a typed refusal of method='head')."""
    model = classic(name, classes=100)
    x = torch.rand(2, *model.input_shape, generator=torch.Generator().manual_seed(0))
    lin = rv.linearize(model, x, keep_graph=True)
    found = lin.head_cut()
    if width is not None:
        assert found is not None and found.numel() // 2 == width
    if found is None:
        with pytest.raises(rv.InputError, match="method='head'"):
            rv.reconstruct(model, x, method="head")
        return
    rec = _agree(model, x)
    assert rec.meta["solver"]["head_width"] == found.numel() // 2


class SkipHead(nn.Module):
    """A skip from before the last gate straight to the logits: the pooled features are not a
    cut (a path to the input avoids them); only the logits are."""

    def __init__(self, k: int = 30):
        super().__init__()
        torch.manual_seed(1)
        self.conv = nn.Conv2d(1, 3, 3, padding=1)
        self.fc = nn.Linear(3, k)
        self.skip = nn.Linear(36, k)

    def forward(self, x):
        z = self.conv(x)
        pooled = F.adaptive_avg_pool2d(torch.relu(z), 1).flatten(1)  # width 3, after the last gate
        return self.fc(pooled) + self.skip(x.flatten(1))


class TwoLinears(nn.Module):
    """ReLU, then two linear layers (8 -> 4 -> 50) and an in-place scale of the 4 features."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(2)
        self.body = nn.Sequential(nn.Flatten(), nn.Linear(36, 8), nn.ReLU())
        self.mid, self.out = nn.Linear(8, 4), nn.Linear(4, 50)

    def forward(self, x):
        h = self.mid(self.body(x))
        h.mul_(2.0)  # in place: the pre-scale h is no longer a valid cut (its version moved)
        return self.out(h)


def test_a_tensor_a_path_avoids_is_not_a_cut():
    x = torch.randn(2, 1, 6, 6)
    lin = rv.linearize(SkipHead().eval(), x, keep_graph=True)
    assert lin.head_cut() is None
    with pytest.raises(rv.InputError, match="narrower than the outputs"):
        rv.reconstruct(SkipHead().eval(), x, method="head")
    assert rv.reconstruct(SkipHead().eval(), x).meta["method"] != "head"


def test_the_cut_after_an_in_place_write_is_the_written_tensor():
    model, x = TwoLinears().eval(), torch.randn(3, 1, 6, 6)
    lin = rv.linearize(model, x, keep_graph=True)
    h = lin.head_cut()
    assert h is not None and h.shape == (3, 4)
    rec = _agree(model, x)
    assert rec.meta["solver"]["head_width"] == 4


@pytest.mark.parametrize("classes", [None, [0, 7, 49], 5])
def test_head_with_chosen_classes_and_chunk_sizes(classes):
    model, x = TwoLinears().eval(), torch.randn(4, 1, 6, 6)
    for chunk in (1, 3, None):
        _agree(model, x, classes=classes, chunk_size=chunk)


def test_head_in_float32_meets_the_float32_contract():
    model = classic("resnet", classes=200)
    x = torch.rand(1, *model.input_shape, generator=torch.Generator().manual_seed(3))
    rec = rv.reconstruct(model, x, method="head", dtype=torch.float32)
    assert rec.meta["max_rel_error"] <= 1e-4 and rec.weight.dtype == torch.float32


def test_auto_picks_the_head_only_when_it_pays():
    """P = 24 features under 300 classes: auto takes the head; under 10 classes the cut is
    wider than the outputs (none), and auto takes the adjoint."""
    x = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(4))
    wide = rv.reconstruct(classic("resnet", classes=300), x)
    assert wide.meta["method"] == "head" and wide.meta["auto"]["head_cost"] < wide.meta["auto"]["adjoint_cost"]
    narrow = rv.reconstruct(classic("resnet", classes=10), x)
    assert narrow.meta["method"] == "adjoint" and "head_cost" not in narrow.meta["auto"]


def test_head_streams_w_to_disk_like_every_solve(tmp_path):
    model = classic("densenet", classes=60)
    x = torch.rand(2, *model.input_shape, generator=torch.Generator().manual_seed(5))
    rec = rv.reconstruct(model, x, method="head", out=tmp_path / "w.npy")
    ref = rv.reconstruct(model, x, method="adjoint")
    assert rec.streamed
    assert float((torch.as_tensor(rec.weight) - ref.weight).abs().max() / ref.weight.abs().max()) <= 1e-10


def test_head_on_a_gated_net_uses_a_replay_of_g_and_agrees_with_the_adjoint():
    """A ViT (point-exact): the probe pass is not g's (smooth gates continue with their own
    output), so one replay pass keeps g's graph; the cut is the final LayerNorm's output (8 wide)
    under 200 classes, and auto takes it."""
    from archs import TinyViT

    model = TinyViT(classes=200).double().eval()
    x = torch.randn(2, *model.input_shape, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    lin = rv.linearize(model, x, keep_graph=True)
    assert lin.exactness == "point-exact" and lin.head_cut() is not None and lin.head_cut().shape == (2, 8)
    head = _agree(model, x)
    assert head.exactness == "point-exact"
    assert rv.reconstruct(model, x).meta["method"] == "head"
