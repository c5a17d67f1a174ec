"""Property: for any generated piecewise-linear network, the reconstruction is
region-exact in float64 and every solve method and basis agrees.

Networks are drawn from sequential, residual and concatenating stages with 1d or 2d
convolutions, BatchNorm, every ReLU-family call form (module, functional, in-place,
Tensor method, ReLU6/Hardtanh/LeakyReLU/PReLU/clamp/threshold) and every pooling kind
(max with padding/ceil_mode/dilation, average, adaptive max, adaptive average).
"""

from __future__ import annotations

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import reconviz as rv
from archs import ACTIVATIONS, RandomNet
from conftest import GENERATED

ACTS = st.sampled_from(sorted(ACTIVATIONS))
POOL_PARAMS = st.tuples(
    st.integers(1, 3), st.integers(1, 3), st.integers(0, 1), st.booleans(), st.integers(1, 2)
)
STAGE = st.one_of(
    st.tuples(st.just("conv"), st.integers(2, 5), st.integers(1, 3), st.integers(1, 2), st.integers(0, 1)),
    st.tuples(st.just("act"), ACTS),
    st.tuples(st.just("act"), ACTS),
    st.tuples(st.just("pool"), st.sampled_from(["max", "max", "avg", "adaptive_max", "adaptive_avg"]), POOL_PARAMS),
    st.tuples(st.just("res"), st.integers(2, 4), ACTS),
    st.tuples(st.just("cat"), st.integers(1, 3), ACTS),
    st.tuples(st.just("bn")),
)
SPEC = st.fixed_dictionaries(
    {
        "dims": st.sampled_from([1, 2]),
        "channels": st.integers(1, 3),
        "size": st.integers(4, 9),
        "classes": st.integers(2, 4),
        "stages": st.lists(STAGE, min_size=1, max_size=6),
    }
)

TOL = 1e-9


@settings(max_examples=300, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@given(spec=SPEC, n=st.integers(1, 2), seed=st.integers(0, 2**16), basis=st.sampled_from(["identity", "hadamard", "random"]))
def test_generated_architectures_are_region_exact(spec, n, seed, basis):
    GENERATED["test_generated_architectures_are_region_exact"] = (
        GENERATED.get("test_generated_architectures_are_region_exact", 0) + 1
    )
    torch.manual_seed(seed)
    model = RandomNet(spec).eval()
    shape = (spec["channels"],) + (spec["size"],) * spec["dims"]
    x = torch.randn(n, *shape, generator=torch.Generator().manual_seed(seed))

    adjoint = rv.reconstruct(model, x, method="adjoint")
    by_basis = rv.reconstruct(model, x, method="basis", basis=basis, seed=seed, chunk_size=1 + seed % 97)

    with torch.no_grad():
        f = model.double()(x.double())
    for rec in (adjoint, by_basis):
        err = ((rec(x) - f).abs() / f.abs().clamp_min(1)).max().item()
        assert err <= TOL, (spec, rec.meta)
    scale = max(1.0, float(adjoint.weight.abs().max()))
    assert float((adjoint.weight - by_basis.weight).abs().max()) <= 1e-10 * scale
    assert float((adjoint.bias - by_basis.bias).abs().max()) <= 1e-10 * max(1.0, float(adjoint.bias.abs().max()))

    # exact on the region too: a tiny step well inside the certified radius
    if n == 1 and seed % 5 == 0:
        radius = rv.certified_radius(model, x)
        step = float(radius.l2[0])
        if 0 < step < float("inf"):
            d = torch.randn(x.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(seed + 1))
            xs = x.double() + 0.5 * step * d / d.norm()
            with torch.no_grad():
                fs = model(xs)
            assert ((adjoint(xs) - fs).abs() / fs.abs().clamp_min(1)).max().item() <= TOL


def test_generated_architectures_cover_every_stage_kind():
    """The generator really produces each gate and pooling kind (guards the property test)."""
    from hypothesis import find

    for kind in ("res", "cat", "bn"):
        find(SPEC, lambda s, k=kind: any(st_[0] == k for st_ in RandomNet(s).kept), settings=settings(database=None, max_examples=3000))
    for pool in ("max", "avg", "adaptive_max", "adaptive_avg"):
        find(SPEC, lambda s, p=pool: any(st_[:2] == ("pool", p) for st_ in RandomNet(s).kept),
             settings=settings(database=None, max_examples=3000))
    find(SPEC, lambda s: s["dims"] == 1 and any(st_[0] == "pool" and st_[1] == "max" and st_[2][3]
                                                for st_ in RandomNet(s).kept), settings=settings(database=None, max_examples=3000))
