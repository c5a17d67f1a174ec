"""The tangent rule (issue 12): W = the Jacobian of the model at x0, b = f(x0) - W x0, point-exact.

Every reconstruction is checked against the autograd Jacobian of the model itself (the oracle),
to 1e-9 relative in float64, by every solve; the solves agree with one another to 1e-10; on a
piecewise-linear net the tangent rule is the value rule, bit for bit and region-exact.
"""

from __future__ import annotations

import pytest
import torch

import reconviz as rv
from archs import GATED_BLOCKS, VGGish
from conftest import assert_exact
from reconviz.linearize import TangentModel
from test_gated import OPS, REFUSED, X, OpNet

pytestmark = pytest.mark.usefixtures("one_thread")

TOL = 1e-9


def jacobian(model, x):
    """(N, K, *sample_shape): d f_n / d x_n by autograd on the model itself."""
    J = torch.autograd.functional.jacobian(lambda z: model(z).reshape(z.shape[0], -1), x)
    return torch.stack([J[n, :, n] for n in range(x.shape[0])])


def w_error(rec, J) -> float:
    return float((rec.weight - J).abs().max()) / max(1.0, float(J.abs().max()))


@pytest.mark.parametrize("method", ["adjoint", "basis"])
@pytest.mark.parametrize("name", sorted(OPS))
def test_op_tangent_is_the_jacobian(name, method, untouched):
    model = OpNet(OPS[name][0])
    with untouched(model):
        rec = rv.reconstruct(model, X, method=method, linearization="tangent")
    assert rec.exactness == "point-exact" and rec.meta["linearization"] == "tangent"
    assert w_error(rec, jacobian(model, X)) <= TOL
    assert assert_exact(rec, model, rel=TOL) <= TOL


@pytest.mark.parametrize("name", sorted(GATED_BLOCKS))
def test_block_every_solve_gives_the_jacobian_and_they_agree(name, untouched):
    torch.manual_seed(11)
    model = GATED_BLOCKS[name]().double().eval()
    x = torch.randn(2, *model.input_shape, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    J = jacobian(model, x)
    solves = {"adjoint": {"method": "adjoint"}, "identity": {"method": "basis"},
              "hadamard": {"method": "basis", "basis": "hadamard"}, "random": {"method": "basis", "basis": "random"},
              "auto": {"method": "auto"}}
    with untouched(model):
        recs = {k: rv.reconstruct(model, x, linearization="tangent", **kw) for k, kw in solves.items()}
    for key, rec in recs.items():
        assert rec.exactness == "point-exact"
        assert w_error(rec, J) <= TOL, key
        assert_exact(rec, model, rel=TOL)
        affinity = {c.name: c for c in rec.self_checks}["affinity"]
        assert affinity.passed and affinity.max_rel_error <= TOL  # jvp vs vjp: forward vs reverse mode
    ref = recs["adjoint"].weight
    for key, rec in recs.items():
        assert float((rec.weight - ref).abs().max()) / max(1.0, float(ref.abs().max())) <= 1e-10, key
    value = rv.reconstruct(model, x)
    # the rules differ on a gated net: the tangent is not the value rule
    assert float((value.weight - J).abs().max() / J.abs().max()) > 1e-3


@pytest.mark.parametrize("method", ["adjoint", "basis"])
def test_on_a_piecewise_linear_net_tangent_is_the_value_rule_bit_for_bit(method):
    torch.manual_seed(3)
    model = VGGish(widths=(4, 6)).double().eval()
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    value = rv.reconstruct(model, x, method=method, classes=[0, 3])
    tangent = rv.reconstruct(model, x, method=method, classes=[0, 3], linearization="tangent")
    assert tangent.exactness == "region-exact" and tangent.meta["linearization"] == "tangent"
    assert torch.equal(value.weight, tangent.weight) and torch.equal(value.bias, tangent.bias)


def test_verify_checks_the_jacobian_of_a_tangent_reconstruction_and_says_why_the_radius_is_zero(tmp_path):
    model = GATED_BLOCKS["vit"]().double().eval()
    x = torch.randn(1, *model.input_shape, dtype=torch.float64, generator=torch.Generator().manual_seed(6))
    rec = rv.reconstruct(model, x, linearization="tangent")
    report = rv.verify(model, rec, radius=True)
    assert report.ok and report.jacobian_max_error is not None
    assert report.jacobian_max_error <= report.jacobian_tolerance
    assert torch.equal(report.radius.l2, torch.zeros(1, dtype=torch.float64))
    text = str(report)
    assert "first-order Taylor model at x0 (tangent rule)" in text and "gates frozen" not in text
    region = {c.name: c for c in rec.self_checks}["region"]
    assert region.passed is None and "tangent rule" in region.detail
    # saved and loaded: the rule is kept, so verify still checks the Jacobian
    loaded = rv.Reconstruction.load(rec.save(tmp_path / "tangent.npz"))
    assert loaded.meta["linearization"] == "tangent"
    assert rv.verify(model, loaded, radius=False).jacobian_max_error <= report.jacobian_tolerance


@pytest.mark.parametrize("name", ["x * x", "bilinear layer", "control flow"])
def test_products_and_control_flow_are_refused_under_the_tangent_rule_too(name, untouched):
    model, op, path = REFUSED[name]
    with untouched(model):
        with pytest.raises(rv.UnsupportedOperationError) as info:
            rv.reconstruct(model, X, linearization="tangent")
    assert (info.value.operation, info.value.module_path) == (op, path)


def test_the_onnx_path_refuses_the_tangent_rule(tmp_path):
    with pytest.raises(rv.InputError, match="linearization='tangent'"):
        rv.reconstruct(tmp_path / "model.onnx", X, linearization="tangent")


def test_linearize_returns_the_tangent_model_and_it_is_affine():
    model = OpNet(OPS["nn.GELU"][0])
    lin = rv.linearize(model, X, linearization="tangent")
    assert isinstance(lin, TangentModel) and lin.exactness == "point-exact"
    d = torch.randn_like(X)
    with torch.no_grad():
        g0, g1, g2 = lin(X), lin(X + d), lin(X + 2 * d)
        f0 = model(X)
    assert float((g0 - f0).abs().max()) <= 1e-12  # g(x0) = f(x0)
    assert float((g2 - 2 * g1 + g0).abs().max()) <= 1e-12  # affine: equal steps, equal increments


def test_nothing_is_listed_as_frozen_under_the_tangent_rule():
    model = OpNet(OPS["nn.GELU"][0])
    assert rv.reconstruct(model, X, linearization="tangent").frozen == []
    assert [f.gate for f in rv.reconstruct(model, X).frozen] == ["gelu"]
