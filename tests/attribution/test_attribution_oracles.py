"""The attribution methods against oracles: the reconstruction as the oracle of the
gradient, one call shape and one target rule for every method, and models that write
into their own input."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import reconviz as rv
import reconviz.metrics as metrics
import reconviz.saliency as S
from archs import classic

D = torch.float64


# --------------------------------------------------------------------------
# the oracle: for a piecewise-linear net the gradient *is* W_c
# --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name, method, basis",
    # the paper's basis solve (no autograd) where the input is small; the adjoint (on the
    # linearized copy, not the model) on the larger ones -- the property test ties the two
    [("lenet", "basis", "hadamard"), ("densenet", "adjoint", None), ("alexnet", "adjoint", None),
     ("resnet", "adjoint", None)],
)
def test_gradient_equals_reconstructed_weight_and_gxi_completes_to_logit(name, method, basis):
    model = classic(name, classes=4)
    x = torch.randn(2, *model.input_shape, generator=torch.Generator().manual_seed(1))
    rec = rv.reconstruct(model, x, method=method, basis=basis or "identity")
    scale = max(1.0, float(rec.weight.abs().max()))
    for c in range(4):
        g = S.gradient(model, x.double(), c)
        assert float((g - rec.weight[:, c]).abs().max()) <= 1e-10 * scale, c
        gxi = S.gradient_x_input(model, x.double(), c)
        total = gxi.flatten(1).sum(1) + rec.bias[:, c]
        assert float(((total - rec.logits[:, c]).abs() / rec.logits[:, c].abs().clamp_min(1)).max()) <= 1e-9
    gap = metrics.completeness(rec.weight, rec.bias, rec.probes, rec.logits)
    assert float(gap.max()) <= 1e-9 * max(1.0, float(rec.logits.abs().max()))
    # per-probe targets: one backward pass for the batch gives each probe its own row
    g = S.gradient(model, x.double(), [3, 1])
    assert torch.equal(g[0], S.gradient(model, x[:1].double(), 3)[0])
    assert float((g[1] - rec.weight[1, 1]).abs().max()) <= 1e-10 * scale


# --------------------------------------------------------------------------
# one call shape, one target rule
# --------------------------------------------------------------------------


class SmallNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(2, 4, 3, padding=1)
        self.fc = nn.Linear(4 * 3 * 3, 5)

    def forward(self, x):
        return self.fc(F.max_pool2d(F.relu(self.conv(x), inplace=True), 2).flatten(1))


def _methods():
    return {
        "gradient": lambda m, x, t: S.gradient(m, x, t),
        "gradient_x_input": lambda m, x, t: S.gradient_x_input(m, x, t),
        "guided_backprop": lambda m, x, t: S.guided_backprop(m, x, t),
        "deconvnet": lambda m, x, t: S.deconvnet(m, x, t),
        "layer_gradients": lambda m, x, t: S.layer_gradients(m, x, t),
        "layer_gradients(project)": lambda m, x, t: S.layer_gradients(m, x, t, project=True),
        "occlusion": lambda m, x, t: S.occlusion(m, x, t, window=2, stride=1),
        "prediction_difference": lambda m, x, t: metrics.prediction_difference(
            m, x, x.abs(), t, patch=2, n_random=2).drop_map,
        "deletion_auc": lambda m, x, t: metrics.deletion_auc(m, x, x.abs(), t, steps=5, score="logit"),
        "insertion_auc": lambda m, x, t: metrics.insertion_auc(m, x, x.abs(), t, steps=5, score="logit"),
    }


@pytest.mark.parametrize("name", list(_methods()))
def test_target_forms_agree_for_every_method(name):
    torch.manual_seed(0)
    model = SmallNet().to(D).eval()
    x = torch.randn(3, 2, 6, 6, generator=torch.Generator().manual_seed(2), dtype=D)
    run = _methods()[name]
    per_probe = [4, 0, 2]
    as_list = run(model, x, per_probe)
    forms = {
        "tensor": run(model, x, torch.tensor(per_probe)),
        "callable": run(model, x, lambda out: out.gather(1, torch.tensor(per_probe)[: out.shape[0], None]).squeeze(1))
        if name not in ("occlusion", "prediction_difference", "deletion_auc", "insertion_auc") else None,
    }
    for form, got in forms.items():
        if got is None:
            continue
        if isinstance(as_list, dict):
            assert got.keys() == as_list.keys()
            for k in got:
                assert torch.equal(got[k], as_list[k]), (form, k)
        else:
            assert torch.equal(got, as_list), form
    # an int is the same class for every probe; row i of a batch result is probe i's own
    same = run(model, x, 2)
    alone = run(model, x[2:3], 2)
    first = (lambda r: r[next(iter(r))]) if isinstance(same, dict) else (lambda r: r)
    torch.testing.assert_close(first(same)[2:3], first(alone), rtol=1e-12, atol=1e-12)
    if not isinstance(same, dict) and name not in ("occlusion", "prediction_difference", "deletion_auc",
                                                   "insertion_auc", "layer_gradients(project)"):
        assert same.shape == x.shape and same.dtype == x.dtype  # shaped like x
    with pytest.raises(rv.InputError, match="out of range"):
        run(model, x, 5)
    with pytest.raises(rv.InputError, match="one index or 3"):
        run(model, x, [0, 1])


def test_callable_target_is_a_score_per_probe():
    torch.manual_seed(0)
    model = SmallNet().to(D).eval()
    x = torch.randn(2, 2, 6, 6, generator=torch.Generator().manual_seed(3), dtype=D)
    rec = rv.reconstruct(model, x)
    diff = S.gradient(model, x, lambda out: out[:, 1] - out[:, 3])
    torch.testing.assert_close(diff, rec.weight[:, 1] - rec.weight[:, 3], rtol=0, atol=1e-13)


# --------------------------------------------------------------------------
# models that write into their own input
# --------------------------------------------------------------------------


class InputInplace(nn.Module):
    """Rectifies its own input in place (a pattern the core supports)."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 2, 3, padding=1)
        self.fc = nn.Linear(2 * 6 * 6, 3)

    def forward(self, x):
        x.relu_()
        return self.fc(self.conv(x).flatten(1))


@pytest.mark.parametrize("name", list(_methods()))
def test_methods_work_on_models_writing_into_their_input_and_never_write_into_x(name):
    """Regression: gradient() ran the model on its grad leaf (RuntimeError on x.relu_()),
    and occlusion / prediction_difference handed the caller's float64 x to the model."""
    torch.manual_seed(1)
    model = InputInplace().to(D).eval()
    x = torch.randn(2, 1, 6, 6, generator=torch.Generator().manual_seed(4), dtype=D)
    x0 = x.clone()
    _methods()[name](model, x, 1)
    assert torch.equal(x, x0), "the caller's x was written to"


def test_gradient_of_input_inplace_model_equals_reconstruction():
    torch.manual_seed(1)
    model = InputInplace().to(D).eval()
    x = torch.randn(2, 1, 6, 6, generator=torch.Generator().manual_seed(4), dtype=D)
    rec = rv.reconstruct(model, x)
    for c in range(3):
        torch.testing.assert_close(S.gradient(model, x, c), rec.weight[:, c], rtol=0, atol=1e-13)
    # occlusion of a 1x1 patch on this linear-in-relu(x) model: still equals the naive loop
    occ = S.occlusion(model, x, 0, window=1, stride=1)
    with torch.no_grad():
        s0 = model(x.clone())[:, 0]
        for i, j in [(0, 0), (2, 3), (5, 5)]:
            xo = x.clone()
            xo[..., i, j] = 0
            torch.testing.assert_close(occ[:, i, j], s0 - model(xo)[:, 0], rtol=0, atol=1e-13)
