"""The attribution family: one call shape and one prologue for every method
(saliency and metrics), and ``template`` (the reconstructed W_target) beside
``gradient``: equal to it on piecewise-linear nets for every target form."""

from __future__ import annotations

import inspect

import numpy as np
import pytest
import torch
import torch.nn as nn

import reconviz as rv
import reconviz.metrics as M
import reconviz.saliency as S
from reconviz.errors import InputError, TrainingModeWarning
from reconviz.saliency import _common, guided
from archs import classic

D = torch.float64


def net() -> nn.Module:
    """conv - in-place ReLU - max-pool - LeakyReLU - linear; input 2x6x6, 5 classes."""
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(2, 4, 3, padding=1), nn.ReLU(inplace=True), nn.MaxPool2d(2), nn.LeakyReLU(0.1), nn.Flatten(),
        nn.Linear(4 * 3 * 3, 5),
    ).to(D).eval()


def probes(n=3, seed=1) -> torch.Tensor:
    return torch.randn(n, 2, 6, 6, generator=torch.Generator().manual_seed(seed), dtype=D)


TARGETS = {
    "int": 2,
    "list": [4, 0, 2],
    "tensor": torch.tensor([1, 1, 3]),
    "0-d tensor": torch.tensor(3),
    "numpy": np.array([0, 4, 4]),
    "difference": lambda out: out[:, 1] - out[:, 3],
    "softmax": lambda out: torch.softmax(out, 1)[:, 2],
}


# --------------------------------------------------------------------------
# template == gradient on piecewise-linear nets
# --------------------------------------------------------------------------


@pytest.mark.parametrize("form", list(TARGETS))
def test_template_equals_gradient_for_every_target_form(form):
    model, x = net(), probes()
    w = S.template(model, x, TARGETS[form])
    g = S.gradient(model, x, TARGETS[form])
    assert w.shape == g.shape == x.shape and w.dtype == g.dtype == x.dtype
    assert float((w - g).abs().max()) <= 1e-12


def test_template_is_the_reconstructed_row():
    model, x = net(), probes()
    rec = rv.reconstruct(model, x)
    t = [4, 0, 2]
    assert torch.equal(S.template(model, x, t, method="adjoint"), rec.weight[range(3), t])
    torch.testing.assert_close(S.template(model, x, t, method="basis"), rec.weight[range(3), t], rtol=0, atol=1e-13)
    diff = S.template(model, x, lambda out: out[:, 1] - 2 * out[:, 3])
    torch.testing.assert_close(diff, rec.weight[:, 1] - 2 * rec.weight[:, 3], rtol=0, atol=1e-13)


@pytest.mark.parametrize("name", ["lenet", "resnet"])
def test_template_equals_gradient_on_classic_architectures(name):
    model = classic(name, classes=4)
    x = torch.randn(2, *model.input_shape, generator=torch.Generator().manual_seed(3), dtype=D)
    for t in (3, [1, 2], lambda out: out[:, 0] + out[:, 2]):
        w, g = S.template(model, x, t), S.gradient(model, x, t)
        assert float((w - g).abs().max()) <= 1e-12 * max(1.0, float(g.abs().max()))


def test_template_follows_the_gradient_conventions():
    model, x = net(), probes().float()
    w = S.template(model, x, 1)
    assert w.dtype == torch.float32 and torch.equal(w, S.gradient(model, x, 1))
    assert S.template(model.float(), x, 1, dtype=None).dtype == torch.float32
    # a score that ignores the output: zeros, like the gradient
    zero = S.template(model, x.double(), lambda out: out[:, 0] * 0)
    assert torch.equal(zero, torch.zeros_like(x.double()))
    assert torch.equal(zero, S.gradient(model, x.double(), lambda out: out[:, 0] * 0))
    # logits picked from a tuple output, as everywhere
    tup = nn.Sequential(net(), _Pair()).eval()
    assert torch.equal(S.template(tup, x.double(), 2, output=1), S.template(net(), x.double(), 2))


class _Pair(nn.Module):
    def forward(self, y):
        return y.sum(1), y


@pytest.mark.parametrize("target, msg", [(5, "out of range"), ([0, 1], "one index or 3"), (1.5, "int class index"),
                                         (lambda out: out, "one score per input")])
def test_template_refuses_what_gradient_refuses(target, msg):
    model, x = net(), probes()
    for method in (S.gradient, S.template):
        with pytest.raises(InputError, match=msg):
            method(model, x, target)


# --------------------------------------------------------------------------
# one family: one call shape, one prologue
# --------------------------------------------------------------------------

MAPS = [S.gradient, S.gradient_x_input, S.guided_backprop, S.deconvnet, S.template, S.layer_gradients, S.occlusion]
METRICS = [M.prediction_difference, M.deletion_curve, M.insertion_curve]


@pytest.mark.parametrize("method", MAPS + METRICS, ids=lambda f: f.__name__)
def test_one_call_shape(method):
    params = inspect.signature(method).parameters
    lead = ["model", "x", "saliency_map", "target"] if method in METRICS else ["model", "x", "target"]
    assert list(params)[: len(lead)] == lead
    assert params["output"].kind is params["dtype"].kind is inspect.Parameter.KEYWORD_ONLY
    assert params["output"].default is None and params["dtype"].default is torch.float64
    assert "Shared arguments" in method.__doc__


def test_target_is_defined_once():
    assert S.resolve_target is _common.resolve_target
    assert not hasattr(guided, "Target")
    assert "template" in S.__all__ and S.template.__module__ == "reconviz.saliency.template"


def _calls():
    smap = torch.rand(2, 6, 6, generator=torch.Generator().manual_seed(0), dtype=D)
    return [
        ("gradient", lambda m, x, t: S.gradient(m, x, t)),
        ("gradient_x_input", lambda m, x, t: S.gradient_x_input(m, x, t)),
        ("guided_backprop", lambda m, x, t: S.guided_backprop(m, x, t)),
        ("deconvnet", lambda m, x, t: S.deconvnet(m, x, t)),
        ("template", lambda m, x, t: S.template(m, x, t)),
        ("layer_gradients", lambda m, x, t: S.layer_gradients(m, x, t)),
        ("occlusion", lambda m, x, t: S.occlusion(m, x, t, window=3)),
        ("prediction_difference", lambda m, x, t: M.prediction_difference(m, x, smap, t, patch=3, n_random=2)),
        ("deletion_curve", lambda m, x, t: M.deletion_curve(m, x, smap, t, steps=4)),
    ]


@pytest.mark.parametrize("name, call", _calls(), ids=[n for n, _ in _calls()])
def test_prologue_is_shared(name, call, untouched):
    model, x = net().train(), probes(2)
    model[-1].register_forward_hook(lambda *a: None)
    with untouched(model):
        with pytest.warns(TrainingModeWarning) as caught:
            call(model, x, [1, 4])
        kinds = sorted(w.category.__name__ for w in caught)
        assert kinds == ["HooksRemovedWarning", "TrainingModeWarning"], kinds  # once each
        assert all(w.filename == __file__ for w in caught), "pointing at the caller"
        for bad, msg in [(torch.ones(2, 2, 6, 6, dtype=torch.long), "floating-point"), ([[1.0]], "torch.Tensor")]:
            with pytest.raises(InputError, match=msg):
                call(model, bad, 0)
        with pytest.raises(InputError, match="one index or 2"):
            call(model, x, [0, 1, 2])
        with pytest.raises(InputError, match="must be a torch.nn.Module"):
            call(lambda t: t, x, 0)
    assert model.training


def test_results_come_back_in_x_dtype_and_x_is_never_written():
    model, x = net(), probes(2).float()
    x0 = x.clone()
    for name, call in _calls():
        out = call(model, x, 1)
        first = next(iter(out.values())) if isinstance(out, dict) else getattr(out, "drop_map", out)
        first = getattr(first, "auc", first)
        assert first.dtype == torch.float32, name
    assert torch.equal(x, x0)
