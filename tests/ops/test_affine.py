"""The lean backward of eval-mode batch norm: same values, same gradient, and used."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import reconviz as rv
from reconviz import affine
from reconviz.affine import EvalBatchNorm, call
from conftest import assert_exact


@pytest.mark.parametrize("shape", [(5, 3), (5, 3, 7), (4, 3, 5, 6), (2, 3, 3, 4, 5)])
@pytest.mark.parametrize("affine", [True, False])
def test_eval_batch_norm_matches_pytorch(shape, affine):
    """Forward bit for bit; the input gradient to one rounding (one product, grad * (gamma * invstd),
    where PyTorch forms (grad * invstd) * gamma)."""
    g = torch.Generator().manual_seed(len(shape))
    z = torch.randn(shape, generator=g, dtype=torch.float64)
    mean, var = torch.randn(3, generator=g, dtype=torch.float64), torch.rand(3, generator=g, dtype=torch.float64)
    weight = torch.randn(3, generator=g, dtype=torch.float64) if affine else None
    bias = torch.randn(3, generator=g, dtype=torch.float64) if affine else None
    seed = torch.randn(shape, generator=g, dtype=torch.float64)
    za, zb = z.clone().requires_grad_(), z.clone().requires_grad_()
    native = F.batch_norm(za, mean, var, weight, bias, False, 0.1, 1e-3)
    lean = EvalBatchNorm.apply(zb, mean, var, weight, bias, 1e-3)
    assert torch.equal(native, lean)
    (ga,), (gb,) = torch.autograd.grad(native, za, seed), torch.autograd.grad(lean, zb, seed)
    assert torch.all((ga - gb).abs() <= 2 * torch.finfo(torch.float64).eps * ga.abs())
    if not affine:
        assert torch.equal(ga, gb)


def test_only_large_eval_calls_with_constant_statistics_take_the_lean_form(monkeypatch):
    z = torch.randn(4, 3, 5, dtype=torch.float64, requires_grad=True)
    mean, var = torch.zeros(3, dtype=torch.float64), torch.ones(3, dtype=torch.float64)
    assert "EvalBatchNorm" not in type(call(F.batch_norm, (z, mean, var), {}).grad_fn).__name__  # small
    monkeypatch.setattr(affine, "LEAN_MIN_NUMEL", z.numel())
    mean, var = torch.zeros(3, dtype=torch.float64), torch.ones(3, dtype=torch.float64)
    lean = call(F.batch_norm, (z, mean, var), {})
    assert lean.grad_fn is not None and "EvalBatchNorm" in type(lean.grad_fn).__name__
    train = call(F.batch_norm, (z, mean.clone(), var.clone()), {"training": True})
    assert "EvalBatchNorm" not in type(train.grad_fn).__name__  # batch statistics: as written
    w = torch.ones(3, dtype=torch.float64, requires_grad=True)  # a weight that needs its gradient
    assert "EvalBatchNorm" not in type(call(F.batch_norm, (z, mean, var, w), {}).grad_fn).__name__
    assert torch.equal(call(torch.add, (z, 1.0), {}), z + 1.0)  # other ops run as written


class _ConvBN(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.body = nn.Sequential(nn.Conv2d(2, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.MaxPool2d(2),
                                  nn.Flatten(), nn.Linear(4 * 3 * 3, 8), nn.BatchNorm1d(8), nn.ReLU(),
                                  nn.Linear(8, 5))
        with torch.no_grad():  # statistics a trained net would have, not the identity
            for bn in (self.body[1], self.body[6]):
                bn.running_mean.uniform_(-1, 1), bn.running_var.uniform_(0.5, 2), bn.weight.uniform_(0.5, 2)

    def forward(self, x):
        return self.body(x)


@pytest.mark.parametrize("chunk", [1, 2, 5])
def test_adjoint_through_batch_norm_agrees_with_the_basis_solve(chunk, monkeypatch):
    """One class per backward, and several in one batched backward (vmap over the lean backward)."""
    monkeypatch.setattr(affine, "LEAN_MIN_NUMEL", 0)  # the lean form on these small tensors too
    model = _ConvBN().eval()
    x = torch.randn(3, 2, 6, 6)
    adjoint = rv.reconstruct(model, x, method="adjoint", chunk_size=chunk)
    basis = rv.reconstruct(model, x, method="basis")
    assert torch.allclose(adjoint.weight, basis.weight, rtol=0, atol=1e-12)
    assert adjoint.meta["solver"].get("fallback") is None
    assert_exact(adjoint, model)


@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated")  # torch's own jvp decompositions load
def test_torch_func_transforms_run_through_the_lean_batch_norm(monkeypatch):
    """jacrev / jvp on the linearized model (whose replay runs the lean form) give its W."""
    monkeypatch.setattr(affine, "LEAN_MIN_NUMEL", 0)
    model = _ConvBN().eval()
    x = torch.randn(2, 2, 6, 6, dtype=torch.float64)
    lin = rv.linearize(model, x)
    rec = rv.reconstruct(model, x, method="basis")
    jac = torch.func.jacrev(lin)(x)  # (N, K, N, C, H, W): probe i's rows in block (i, :, i)
    for i in range(2):
        assert torch.allclose(jac[i, :, i].flatten(1), rec.weight[i].flatten(1), rtol=0, atol=1e-12)
    tangent = torch.randn_like(x)
    _, out = torch.func.jvp(lin, (x,), (tangent,))
    assert torch.allclose(out, torch.einsum("nkd,nd->nk", rec.weight.flatten(2), tangent.flatten(1)), atol=1e-12)
