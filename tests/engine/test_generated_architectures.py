"""Property: for any generated piecewise-linear network, the reconstruction is
region-exact in float64 and every solve method and basis agrees.

Networks are drawn from sequential, residual and concatenating stages with 1d or 2d
convolutions, BatchNorm, every ReLU-family call form (module, functional, in-place,
Tensor method, ReLU6/Hardtanh/LeakyReLU/PReLU/clamp/threshold) and every pooling kind
(max with padding/ceil_mode/dilation, average, adaptive max, adaptive average, and a
pooling of one dimension more across channels: MaxPool2d/3d, AdaptiveMaxPool2d/3d).

The run itself is checked: at least 300 architectures are tried, and the architectures
that were actually built (stages that do not fit are dropped) cover every stage kind,
activation, pooling kind, dimension and basis. The counts are printed at the end of the
pytest run ("reconviz: ... generated architectures tried").
"""

from __future__ import annotations

from collections import Counter

import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

import reconviz as rv
from archs import ACTIVATIONS, RandomNet
from conftest import GENERATED

MIN_ARCHITECTURES = 300
ACTS = st.sampled_from(sorted(ACTIVATIONS))
POOL_PARAMS = st.tuples(
    st.integers(1, 3), st.integers(1, 3), st.integers(0, 1), st.booleans(), st.integers(1, 2)
)
STAGE = st.one_of(
    st.tuples(st.just("conv"), st.integers(2, 5), st.integers(1, 3), st.integers(1, 2), st.integers(0, 1)),
    st.tuples(st.just("act"), ACTS),
    st.tuples(st.just("act"), ACTS),
    st.tuples(st.just("pool"), st.sampled_from(["max", "max", "avg", "adaptive_max", "adaptive_avg"]), POOL_PARAMS),
    st.tuples(st.just("pool_up"), st.sampled_from(["max", "adaptive_max"]), POOL_PARAMS),
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


class Stats:
    """What the generated run really covered (architectures as built, not as specified)."""

    def __init__(self):
        self.tried = 0
        self.distinct: set[str] = set()
        self.gated = 0  # architectures with at least one gate
        self.radius_checked = 0
        self.ungated = 0  # specs rejected: no gate left once the stages that do not fit were dropped
        self.repeated = 0  # specs rejected: an architecture already tried
        self.covered: Counter = Counter()

    def add(self, spec: dict, model: RandomNet, lin_gates: dict, basis: str) -> None:
        self.tried += 1
        self.distinct.add(_key(spec, model))
        self.gated += bool(lin_gates)
        c = self.covered
        c[f"dims {spec['dims']}"] += 1
        c[f"basis {basis}"] += 1
        for gate in lin_gates:
            c[f"gate {gate}"] += 1
        for stage in model.kept:
            kind = stage[0]
            c[f"stage {kind}"] += 1
            if kind in ("act", "res", "cat"):
                c[f"activation {stage[-1]}"] += 1
            if kind in ("pool", "pool_up"):
                c[f"{kind} {stage[1]}"] += 1
                k, s, p, ceil, dil = stage[2]
                if stage[1] == "max":
                    c["max pool with padding"] += p > 0
                    c["max pool with ceil_mode"] += ceil
                    c["max pool with dilation"] += dil > 1
                    c[f"max pool {spec['dims'] + (kind == 'pool_up')}d"] += 1

    def line(self) -> str:
        return (
            f"{self.tried} generated architectures tried, distinct and each with gates ({self.ungated} "
            f"affine-only and {self.repeated} repeated specs skipped; {self.radius_checked} also checked "
            "inside the certified radius)"
        )


STATS = Stats()


def _key(spec: dict, model: RandomNet) -> str:
    """An architecture as built: input shape and the stages that were kept."""
    return repr((spec["dims"], spec["channels"], spec["size"], spec["classes"], model.kept))


def _gated(stage: tuple) -> bool:
    return stage[0] in ("act", "res", "cat", "pool_up") or (stage[0] == "pool" and "max" in stage[1])


@settings(max_examples=MIN_ARCHITECTURES, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])
@given(spec=SPEC, n=st.integers(1, 2), seed=st.integers(0, 2**16), basis=st.sampled_from(["identity", "hadamard", "random"]))
def _region_exact(spec, n, seed, basis):
    torch.manual_seed(seed)
    model = RandomNet(spec).eval()
    # a spec whose every gated stage was dropped (did not fit) builds an affine net: not a test
    # of the method, so it does not count towards the architectures tried
    if not any(_gated(stage) for stage in model.kept):
        STATS.ungated += 1
        assume(False)
    # nor does an architecture already tried (hypothesis repeats small ones); an example joins
    # STATS only once it has passed, so replaying a failure makes the same decision
    if _key(spec, model) in STATS.distinct:
        STATS.repeated += 1
        assume(False)
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

    # exact on the region too: a step well inside the certified radius
    if n == 1 and seed % 5 == 0:
        radius = rv.certified_radius(model, x)
        step = float(radius.l2[0])
        if 0 < step < float("inf"):
            STATS.radius_checked += 1
            d = torch.randn(x.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(seed + 1))
            xs = x.double() + 0.5 * step * d / d.norm()
            with torch.no_grad():
                fs = model(xs.clone())  # the model may rectify its input in place
            assert ((adjoint(xs) - fs).abs() / fs.abs().clamp_min(1)).max().item() <= TOL
    STATS.add(spec, model, adjoint.meta["gates"], basis)


def test_generated_architectures_are_region_exact():
    global STATS
    STATS = Stats()
    _region_exact()
    GENERATED["test_generated_architectures_are_region_exact"] = STATS.line()
    print(STATS.line())
    assert STATS.tried >= MIN_ARCHITECTURES, STATS.line()
    assert STATS.gated == STATS.tried == len(STATS.distinct), STATS.line()
    assert STATS.radius_checked >= 10, STATS.line()
    wanted = (
        ["dims 1", "dims 2", "basis identity", "basis hadamard", "basis random"]
        + [f"stage {k}" for k in ("conv", "act", "pool", "pool_up", "res", "cat", "bn")]
        + [f"activation {a}" for a in ACTIVATIONS]
        + [f"pool {p}" for p in ("max", "avg", "adaptive_max", "adaptive_avg")]
        + ["pool_up max", "pool_up adaptive_max"]
        + [f"max pool {d}d" for d in (1, 2, 3)]
        + ["max pool with padding", "max pool with ceil_mode", "max pool with dilation"]
        + [f"gate {g}" for g in ("relu", "clamp", "leaky_relu", "prelu", "threshold", "max_pool")]
    )
    missing = [w for w in wanted if STATS.covered[w] == 0]
    assert not missing, f"the generated run never built: {missing}"
