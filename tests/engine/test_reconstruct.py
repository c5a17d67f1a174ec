"""Reconstruction of classic architectures: exactness, agreement of every method and
basis, persistence, the certified radius, and the user's model left untouched."""

from __future__ import annotations

import math
import os

import numpy as np
import pytest
import torch
import torch.nn as nn

import reconviz as rv
from archs import CLASSIC, classic
from conftest import assert_exact
from reconviz.radius import boundary_direction


def _probes(model, n=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, *model.input_shape, generator=g)


@pytest.mark.parametrize("name", list(CLASSIC))
def test_classic_architecture_region_exact(name, untouched):
    model = classic(name)
    x = _probes(model)
    with untouched(model):
        rec = rv.reconstruct(model, x, method="adjoint")
        report = rv.verify(model, rec, radius=False)
    assert rec.weight.shape == (2, 10, *model.input_shape)
    assert rec.meta["max_rel_error"] <= 1e-9
    assert report.ok and report.max_rel_error <= 1e-9
    assert report.jacobian_max_error <= 1e-9 * max(1.0, float(rec.weight.abs().max()))
    # completeness: sum(W * x0) + b = f(x0)
    total = rec.contributions().flatten(2).sum(-1) + rec.bias
    assert torch.allclose(total, rec.logits, rtol=0, atol=1e-9)


@pytest.mark.parametrize("name", ["lenet", "resnet", "densenet"])
def test_all_methods_and_bases_agree(name):
    model = classic(name, classes=4)
    x = _probes(model, n=2, seed=1)
    ref = rv.reconstruct(model, x, method="adjoint")
    variants = [
        rv.reconstruct(model, x, method="adjoint", chunk_size=3),
        rv.reconstruct(model, x, method="basis", basis="identity", chunk_size=257),
        rv.reconstruct(model, x, method="basis", basis="hadamard", chunk_size=300),
        rv.reconstruct(model, x, method="basis", basis="random", seed=3),
    ]
    scale = max(1.0, float(ref.weight.abs().max()))
    for rec in variants:
        assert float((rec.weight - ref.weight).abs().max()) <= 1e-10 * scale, rec.meta
        assert float((rec.bias - ref.bias).abs().max()) <= 1e-10 * max(1.0, float(ref.bias.abs().max()))
        assert_exact(rec, model)


def test_chunk_size_does_not_change_the_result():
    model = classic("lenet", classes=3)
    x = _probes(model, n=1)
    a = rv.reconstruct(model, x, method="basis", basis="random", chunk_size=1000)
    b = rv.reconstruct(model, x, method="basis", basis="random", chunk_size=37)
    assert float((a.weight - b.weight).abs().max()) <= 1e-12


def test_auto_method_and_meta():
    model = classic("lenet")
    rec = rv.reconstruct(model, _probes(model, 1))
    assert rec.meta["method"] in ("adjoint", "basis")
    assert rec.meta["exactness"] == "region-exact"
    assert rec.meta["gates"] == {"relu": 4, "max_pool": 2}
    assert rec.meta["tolerance"] == 1e-9


def test_float32_tolerance():
    model = classic("vgg")
    x = _probes(model, 2)
    rec = rv.reconstruct(model, x, dtype=torch.float32, method="adjoint")
    assert rec.weight.dtype == torch.float32 and rec.tolerance == 1e-4
    assert rec.meta["max_rel_error"] <= 1e-4
    assert rv.verify(model, rec, radius=False).ok


def test_many_probes_each_get_their_own_model():
    model = classic("lenet", classes=5)
    x = _probes(model, n=4, seed=5)
    together = rv.reconstruct(model, x, method="basis", chunk_size=100)
    for i in range(4):
        alone = rv.reconstruct(model, x[i : i + 1], method="adjoint")
        assert float((together.weight[i] - alone.weight[0]).abs().max()) <= 1e-10
        assert float((together.bias[i] - alone.bias[0]).abs().max()) <= 1e-10


def test_classes_subset_and_call_shape():
    model = classic("resnet")
    x = _probes(model, 2)
    rec = rv.reconstruct(model, x, classes=[7, 2])
    assert rec.classes.tolist() == [7, 2] and rec.weight.shape[:2] == (2, 2)
    out = rec(torch.cat([x, x + 0.0]))  # r * N inputs: input i uses probe i % N
    assert out.shape == (4, 2)
    assert torch.allclose(out[:2], out[2:])
    with pytest.raises(rv.InputError, match="expected inputs of shape"):
        rec(x[:1])


def test_output_selector_for_tuple_dict_and_callable():
    class Multi(nn.Module):
        def __init__(self):
            super().__init__()
            self.net = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3))

        def forward(self, x):
            y = self.net(x)
            return {"logits": y, "aux": y.sum(1)}, y * 2

    model, x = Multi().eval(), torch.randn(2, 6)
    by_key = rv.reconstruct(model, x, output=lambda out: out[0]["logits"])
    by_index = rv.reconstruct(model, x, output=1)
    assert torch.allclose(by_index.weight, 2 * by_key.weight, atol=1e-12)
    with pytest.raises(rv.InputError, match="output="):
        rv.reconstruct(model, x)


def test_save_load_round_trip(tmp_path):
    model = classic("densenet", classes=3)
    rec = rv.reconstruct(model, _probes(model, 2), method="basis", basis="hadamard")
    path = rec.save(tmp_path / "rec.npz")
    assert os.listdir(tmp_path) == ["rec.npz"]  # no temporary left behind
    back = rv.Reconstruction.load(path)
    for field in ("weight", "bias", "classes", "logits", "probes"):
        assert torch.equal(getattr(back, field), getattr(rec, field).cpu())
    assert back.meta["basis"] == "hadamard" and back.meta["method"] == "basis"
    assert back.meta["max_rel_error"] == rec.meta["max_rel_error"]
    assert back.meta["model"] == "DenseNetish" and back.meta["sample_shape"] == [3, 16, 16]
    assert_exact(back, model)


def test_load_refuses_pickles_and_foreign_files(tmp_path):
    np.savez(tmp_path / "obj.npz", weight=np.array([object()], dtype=object))
    with pytest.raises(rv.InputError):
        rv.Reconstruction.load(tmp_path / "obj.npz")
    np.savez(tmp_path / "other.npz", a=np.zeros(3))
    with pytest.raises(rv.InputError, match="not a reconviz reconstruction"):
        rv.Reconstruction.load(tmp_path / "other.npz")
    with pytest.raises(rv.InputError, match="cannot read"):
        rv.Reconstruction.load(tmp_path / "missing.npz")


def test_save_is_atomic_when_writing_fails(tmp_path, monkeypatch):
    model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2)).eval()
    rec = rv.reconstruct(model, torch.randn(1, 3))
    target = tmp_path / "rec.npz"
    target.write_bytes(b"previous contents")

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(np, "savez", boom)
    with pytest.raises(OSError):
        rec.save(target)
    assert target.read_bytes() == b"previous contents"
    assert os.listdir(tmp_path) == ["rec.npz"]


# ---------------------------------------------------------------- radius


def _radius_model():
    torch.manual_seed(4)
    return nn.Sequential(
        nn.Conv2d(1, 3, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(3, 4, 3), nn.LeakyReLU(0.1),
        nn.Flatten(), nn.Linear(4 * 2 * 2, 5),
    ).eval()


def test_exact_inside_the_certified_radius():
    model = _radius_model()
    x = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    rec = rv.reconstruct(model, x, method="basis")
    radius = rv.certified_radius(model, x)
    assert (radius.l2 > 0).all() and (radius.linf > 0).all() and (radius.linf <= radius.l2).all()
    g = torch.Generator().manual_seed(1)
    for _ in range(20):
        d = torch.randn(x.shape, generator=g, dtype=torch.float64)
        d2 = d / d.flatten(1).norm(dim=1).view(-1, 1, 1, 1) * (0.999 * radius.l2).view(-1, 1, 1, 1)
        assert_exact(rec, model, x.double() + d2)
        dinf = torch.sign(d) * (0.999 * radius.linf).view(-1, 1, 1, 1)  # corners of the L-inf ball
        assert_exact(rec, model, x.double() + dinf)


@pytest.mark.parametrize("kind", ["conv", "mlp"])
def test_not_exact_across_the_radius(kind):
    """Crossing the nearest face changes a prior. In an MLP every unit reaches the output,
    so the reconstruction then misses the model; in the conv net the changed unit may be
    pooled away (the radius is a certified lower bound on where exactness holds)."""
    torch.manual_seed(6)
    if kind == "conv":
        model = _radius_model()
        x = torch.randn(1, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    else:
        model = nn.Sequential(nn.Linear(10, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 3)).eval()
        x = torch.randn(1, 10)
    rec = rv.reconstruct(model, x, method="basis")
    lin = rv.linearize(model, x)
    radius = rv.certified_radius(lin)
    face = radius.nearest[0]
    assert math.isclose(face.distance, float(radius.l2[0]))
    direction = boundary_direction(lin, 0, face)
    step = float(radius.l2[0])
    # just inside the face: still exact; well across it: the prior changes and the model differs
    assert_exact(rec, model, x.double() + 0.99 * step * direction)
    across = x.double() + 3 * step * direction
    moved = rv.linearize(model, across)
    changed = any(not all(torch.equal(a, b) for a, b in zip(p.tensors.values(), q.tensors.values()))
                  for p, q in zip(lin.priors, moved.priors))
    assert changed, "crossing the nearest face must change a gate's prior"
    if kind == "mlp":
        with torch.no_grad():
            f = model.double()(across)
        assert float((rec(across) - f).abs().max()) > 1e3 * 1e-9 * max(1.0, float(f.abs().max()))


def test_verify_reports_radius_and_table():
    model = _radius_model()
    x = torch.randn(2, 1, 8, 8)
    rec = rv.reconstruct(model, x)
    report = rv.verify(model, rec)
    assert report.radius is not None and report.radius.l2.shape == (2,)
    rows = report.table
    assert len(rows) == 2 * 5 and {"probe", "class", "difference"} <= set(rows[0])
    text = str(report)
    assert "PASS" in text and "tolerance 1e-09" in text and "certified radius" in text
    assert '"ok": true' in report.to_json()


def test_saved_files_get_the_usual_permissions(tmp_path):
    """atomic_write goes through mkstemp (mode 0600) but leaves a file readable as umask allows."""
    import os

    from reconviz.reconstruction import atomic_write

    old = os.umask(0o022)
    try:
        atomic_write(tmp_path / "a.bin", lambda f: f.write(b"x"))
    finally:
        os.umask(old)
    assert (tmp_path / "a.bin").stat().st_mode & 0o777 == 0o644
    assert [p.name for p in tmp_path.iterdir()] == ["a.bin"]  # no temporary left behind


def test_report_json_is_strict_when_the_radius_is_infinite():
    """A model with no gate is affine everywhere: radius inf, written as "inf" (valid JSON)."""
    import json

    import reconviz as rv

    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(12, 3)).eval()
    x = torch.randn(2, 3, 4, dtype=torch.float64)
    report = rv.verify(model, rv.reconstruct(model, x))
    assert report.ok and math.isinf(float(report.radius.l2[0]))
    data = json.loads(report.to_json(), parse_constant=lambda c: pytest.fail(f"non-JSON constant {c}"))
    assert data["radius_l2"] == ["inf", "inf"] and float(data["radius_l2"][0]) == math.inf


_FORWARDS: list[str] = []  # a module-level log: the model is deep-copied, a counter on it would be too


class _Counted(nn.Module):
    def __init__(self, act: nn.Module):
        super().__init__()
        torch.manual_seed(0)
        self.body = nn.Sequential(nn.Conv2d(1, 4, 3), act, nn.MaxPool2d(2), nn.Flatten(), nn.Linear(36, 5))

    def forward(self, x):
        _FORWARDS.append("f")
        return self.body(x)


@pytest.mark.parametrize("act, passes", [(nn.ReLU(), 2), (nn.LeakyReLU(0.1, inplace=True), 2), (nn.SiLU(), 3)])
def test_adjoint_solve_backpropagates_through_the_probe_pass(act, passes, request, monkeypatch):
    """The probe pass runs g's frozen gates (same values as f), so the adjoint solve reuses its
    graph: two forward passes before the self-checks (the probe, and g at the affinity point,
    timed for the solve; b = f(x0) - W x0 needs none), then one backward per class. A smooth
    gate records f's own value: its graph is not g's, and the solve runs g once more. After
    the solve, the region check runs f once (region-exact only)."""
    import reconviz.pipeline as pipeline

    if isinstance(act, nn.SiLU):
        request.getfixturevalue("point_exact_silu")
    at_checks: list[int] = []
    original = pipeline.self_checks
    monkeypatch.setattr(pipeline, "self_checks", lambda *a, **k: (at_checks.append(len(_FORWARDS)), original(*a, **k))[1])
    model = _Counted(act).eval()
    x = torch.randn(3, 1, 8, 8)
    _FORWARDS.clear()
    rec = rv.reconstruct(model, x, method="adjoint")
    assert at_checks == [passes]
    checks = {c["name"]: c for c in rec.meta["self_checks"]}
    point_exact = "point-exact" in checks["region"]["detail"]
    assert len(_FORWARDS) == passes + (0 if point_exact else 1)  # f at the region step
    basis = rv.reconstruct(model, x, method="basis", chunk_size=64)
    assert torch.allclose(rec.weight, basis.weight, rtol=0, atol=1e-12)
    assert rec.meta["max_rel_error"] <= 1e-9


def test_auto_charges_a_forward_pass_only_when_the_probe_graph_is_not_kept():
    """With the probe pass's graph kept, the adjoint costs its K backward passes (1.3 K
    forward samples); without it, one forward pass more."""
    from reconviz.solve import choose_method

    model = _Counted(nn.ReLU()).eval()
    x = torch.randn(2, 1, 8, 8)
    kept, plain = {}, {}
    choose_method(rv.linearize(model, x, keep_graph=True), 5, why=kept)
    choose_method(rv.linearize(model, x), 5, why=plain)
    assert kept["adjoint_cost"] == pytest.approx(1.3 * 5) and plain["adjoint_cost"] == pytest.approx(1 + 1.3 * 5)
    assert kept["rule"] == plain["rule"] == "shapes" and kept["basis_cost"] == 64 + 1
