"""Reconstruction from a layer's activations to the logits (``rv.reconstruct(..., layer=...)``).

For every layer of sequential, residual and concatenating nets: sum(W_c * a) + b_c is logit c
to 1e-9 relative (float64), and W is the autograd Jacobian of the logits with respect to that
layer's output (region-exact); gated nets give the point-exact decomposition.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn

import reconviz as rv
from archs import TinyViT, classic


def _layers(model: nn.Module) -> list[str]:
    """Every named submodule the forward calls exactly once and whose output is one tensor."""
    counts: dict[str, int] = {}
    kinds: dict[str, bool] = {}
    handles = []
    for name, m in model.named_modules():
        if name:
            def hook(mod, args, out, name=name):
                counts[name] = counts.get(name, 0) + 1
                kinds[name] = isinstance(out, torch.Tensor)
            handles.append(m.register_forward_hook(hook))
    with torch.no_grad():
        model(torch.rand(1, *model.input_shape))
    for h in handles:
        h.remove()
    return [n for n, c in counts.items() if c == 1 and kinds[n]]


def _jacobian(model: nn.Module, x: torch.Tensor, layer: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(activations a at x, d logits / d a) by autograd: (N, ...), (N, K, ...)."""
    m = copy.deepcopy(model).eval().double()
    leaf = {}

    def swap(mod, args, out):
        leaf["a"] = out.detach().clone().requires_grad_(True)
        return leaf["a"] * 1  # a non-leaf: an in-place ReLU may follow

    m.get_submodule(layer).register_forward_hook(swap)
    out = m(x.double())
    rows = [torch.autograd.grad(out[:, k].sum(), leaf["a"], retain_graph=True)[0] for k in range(out.shape[1])]
    return leaf["a"].detach(), torch.stack(rows, 1)


def _decomposition_error(rec: rv.Reconstruction, model: nn.Module) -> float:
    m = copy.deepcopy(model).eval().double()
    with torch.no_grad():
        logits = m(rec.inputs)[:, rec.classes]
    total = rec.contributions().flatten(2).sum(-1) + rec.bias
    return float(((total - logits).abs() / logits.abs().clamp_min(1)).max())


@pytest.mark.parametrize("name", ["lenet", "resnet", "densenet"])
def test_every_layer_decomposes_the_logits_exactly_and_w_is_the_jacobian(name):
    """sequential (LeNet), residual (ResNet-style) and concatenating (DenseNet-style) nets."""
    model = classic(name)
    x = torch.rand(2, *model.input_shape, generator=torch.Generator().manual_seed(1))
    layers = _layers(model)
    assert len(layers) >= 5
    for layer in layers:
        rec = rv.reconstruct(model, x, layer=layer)
        a, jac = _jacobian(model, x, layer)
        assert rec.meta["layer"] == layer and rec.exactness == "region-exact"
        assert torch.equal(rec.probes, a) and torch.equal(rec.inputs, x.double())
        assert _decomposition_error(rec, model) <= 1e-9, layer
        scale = max(1.0, float(jac.abs().max()))
        assert float((rec.weight - jac).abs().max()) <= 1e-9 * scale, layer


def test_verify_save_and_load_of_a_layer_reconstruction(tmp_path):
    model, data = rv.models.digits()
    x = torch.as_tensor(data.x_test[:3])
    rec = rv.reconstruct(model, x, layer="features.3")
    assert rec.weight.shape == (3, 10, 16, 4, 4)
    report = rv.verify(model, rec)
    assert report.ok and report.max_rel_error <= 1e-9
    assert report.jacobian_max_error is not None and report.jacobian_max_error <= 1e-9
    assert report.radius is not None  # the certified radius in activation space
    loaded = rv.Reconstruction.load(rec.save(tmp_path / "layer.npz"))
    assert loaded.meta["layer"] == "features.3" and torch.equal(loaded.inputs, rec.inputs)
    assert rv.verify(model, loaded, radius=False).max_rel_error <= 1e-9
    # other activations of the same shape are compared through the same affine tail
    other = rec.probes + 1e-7 * torch.rand_like(rec.probes)
    assert rv.verify(model, rec, other, radius=False, jacobian=False).max_rel_error <= 1e-9


def test_a_reconstruction_with_layer_metadata_but_no_inputs_is_refused(tmp_path):
    model, data = rv.models.digits()
    rec = rv.reconstruct(model, torch.as_tensor(data.x_test[:1]), layer="classifier.1")
    rec.inputs = None
    with pytest.raises(rv.InputError, match="carries no inputs"):
        rv.verify(model, rec)
    path = rec.save(tmp_path / "bad.npz")
    with pytest.raises(rv.InputError, match="inputs member"):
        rv.Reconstruction.load(path)


def test_gated_layer_reconstruction_is_point_exact_and_decomposes_exactly():
    model = TinyViT().double()
    x = torch.rand(2, *model.input_shape, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    rec = rv.reconstruct(model, x, layer="blocks.1")
    assert rec.exactness == "point-exact" and rec.weight.shape[2:] == (5, 8)
    assert _decomposition_error(rec, model) <= 1e-9
    # after the last gate, the head is affine: region-exact again, and W is the Jacobian
    rec = rv.reconstruct(model, x, layer="norm")
    a, jac = _jacobian(model, x, "norm")
    assert rec.exactness == "region-exact" and float((rec.weight - jac).abs().max()) <= 1e-12


class Twice(nn.Module):
    input_shape = (4,)

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4)
        self.out = nn.Linear(4, 3)
        self.pair = nn.LSTM(4, 4)  # returns a tuple; never called

    def forward(self, x):
        return self.out(torch.relu(self.fc(torch.relu(self.fc(x)))))


def test_a_module_called_twice_needs_its_call_number():
    torch.manual_seed(0)
    model = Twice().eval()
    x = torch.randn(3, 4, dtype=torch.float64)
    with pytest.raises(rv.InputError, match=r"runs 2 times .*layer='fc#k'"):
        rv.reconstruct(model, x, layer="fc")
    for call in (0, 1):  # counted from 0, as the layer-gradient selectors count them
        rec = rv.reconstruct(model, x, layer=f"fc#{call}")
        assert _decomposition_error(rec, model) <= 1e-9
    assert set(rv.saliency.layer_gradients(model, x, 0, layers="fc")) == {"fc#0", "fc#1"}
    with pytest.raises(rv.InputError, match="no call #2"):
        rv.reconstruct(model, x, layer="fc#2")


@pytest.mark.parametrize("layer, match", [
    ("nope", "no module named 'nope'"),
    ("pair", "ran 0 time"),
    (3, "must be a module name"),
    ("fc#x", "call number"),
])
def test_bad_layers_are_typed_errors_and_leave_the_model_clean(layer, match):
    torch.manual_seed(0)
    model = Twice().eval()
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(rv.InputError, match=match):
        rv.reconstruct(model, torch.randn(2, 4), layer=layer)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert all(not m._forward_hooks for m in model.modules()) and not model.training


class Split(nn.Module):
    def forward(self, z):
        return z.split(2, dim=1)


class TupleLayer(nn.Module):
    def __init__(self):
        super().__init__()
        self.split, self.head = Split(), nn.Linear(2, 3)

    def forward(self, x):
        return self.head(self.split(x)[0])


def test_a_tuple_output_layer_is_refused():
    with pytest.raises(rv.InputError, match="returns tuple"):
        rv.reconstruct(TupleLayer().eval(), torch.randn(2, 4), layer="split")


def test_layer_with_an_onnx_model_or_a_linearized_model_is_refused(tmp_path):
    model, data = rv.models.digits()
    x = torch.as_tensor(data.x_test[:1])
    with pytest.raises(rv.InputError, match="layer="):
        rv.reconstruct(rv.linearize(model, x), None, layer="features.3")
    with pytest.raises(rv.InputError, match="layer='features.3'"):
        rv.reconstruct(tmp_path / "model.onnx", x, layer="features.3")


def test_the_users_model_is_untouched_by_a_layer_reconstruction():
    model, data = rv.models.digits()
    model.train()
    before = copy.deepcopy(model.state_dict())
    with pytest.warns(rv.TrainingModeWarning):
        rv.reconstruct(model, torch.as_tensor(data.x_test[:2]), layer="features.6")
    assert model.training and all(m.training for m in model.modules())
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert all(not m._forward_hooks for m in model.modules())


def test_a_layer_reconstruction_copies_the_model_once(monkeypatch):
    """layer= works on one eval copy of the model: the probe takes the tail built over it as
    reconviz's own instead of copying it (and the model inside it) a second time."""
    import reconviz.probe

    model, data = rv.models.digits()
    top: list[str] = []
    depth = [0]
    tree_copy = reconviz.probe.tree_copy

    def counting(obj, memo):
        if depth[0] == 0 and isinstance(obj, nn.Module):
            top.append(type(obj).__name__)
        depth[0] += 1
        try:
            return tree_copy(obj, memo)
        finally:
            depth[0] -= 1

    monkeypatch.setattr(reconviz.probe, "tree_copy", counting)
    rec = rv.reconstruct(model, torch.as_tensor(data.x_test[:2]), layer="features.6")
    assert top == ["DigitsCNN"]  # one copy of the model; before: DigitsCNN, then LayerTail
    assert rec.meta["max_rel_error"] <= 1e-9 and _decomposition_error(rec, model) <= 1e-9
