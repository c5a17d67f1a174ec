"""Property: for any generated gated network (smooth activations, squeeze-excitation gates,
softmax attention, LayerNorm / RMSNorm / F.normalize / a norm by hand, residuals), the value
rule's reconstruction is point-exact in float64, equals the network written with its frozen
factors detached (the oracle), both solves agree, and the tangent rule is the Jacobian.

At least 200 architectures per run (counted, printed at the end of the pytest run).
"""

from __future__ import annotations

from collections import Counter

import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

import reconviz as rv
from archs import GATED_ACTS, RandomGatedNet
from conftest import GENERATED, value_oracle

MIN_ARCHITECTURES = 200
TOL = 1e-9
ACT = st.sampled_from(GATED_ACTS)
# sigmoid and tanh outputs are gate factors: a tensor computed from them alone cannot later be
# one side of a product (which side to freeze is ambiguous: refused), so they appear inside
# residual branches, where the skip path adds a linear tensor back
FLOWING = st.sampled_from([a for a in GATED_ACTS if a not in ("sigmoid", "tanh")])
STAGE = st.one_of(
    st.tuples(st.just("linear")),
    st.tuples(st.just("act"), FLOWING),
    st.tuples(st.just("res"), ACT),
    st.tuples(st.just("se"), st.sampled_from(["sigmoid", "hardsigmoid"])),
    st.tuples(st.just("attn")),
    st.tuples(st.just("norm"), st.sampled_from(["layer", "rms", "normalize", "by hand"])),
)
SPEC = st.fixed_dictionaries({"tokens": st.integers(2, 3), "width": st.integers(3, 5), "classes": st.integers(2, 3),
                              "stages": st.lists(STAGE, min_size=1, max_size=4)})


class Stats:
    def __init__(self):
        self.tried, self.seen, self.covered = 0, set(), Counter()

    def line(self) -> str:
        kinds = ", ".join(f"{k} {n}" for k, n in sorted(self.covered.items()))
        return f"{self.tried} generated gated architectures tried, distinct ({kinds})"


STATS = Stats()


def _gated(spec: dict) -> bool:
    return any(s[0] in ("se", "attn", "norm") or (len(s) > 1 and s[1] not in ("relu", "leaky_relu"))
               for s in spec["stages"])


@settings(max_examples=MIN_ARCHITECTURES, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])
@given(spec=SPEC, n=st.integers(1, 2), seed=st.integers(0, 2**16))
def _point_exact(spec, n, seed):
    key = repr(spec)
    assume(_gated(spec) and key not in STATS.seen)  # a smooth op somewhere; each architecture once
    torch.manual_seed(seed)
    model = RandomGatedNet(spec).double().eval()
    x = torch.randn(n, *model.input_shape, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))
    adjoint = rv.reconstruct(model, x, method="adjoint")
    basis = rv.reconstruct(model, x, method="basis")
    assert adjoint.exactness == "point-exact", spec
    with torch.no_grad():
        f = model(x)
    W, b = value_oracle(model.as_oracle(), x)
    scale = max(1.0, float(W.abs().max()))
    for rec in (adjoint, basis):
        assert ((rec(x) - f).abs() / f.abs().clamp_min(1)).max().item() <= TOL, spec
        assert float((rec.weight - W).abs().max()) <= TOL * scale, (spec, rec.meta["method"])
    assert float((adjoint.weight - basis.weight).abs().max()) <= 1e-10 * scale
    if seed % 4 == 0:  # the tangent rule: the Jacobian of the model itself
        J = torch.autograd.functional.jacobian(lambda t: model(t), x)
        J = torch.stack([J[i, :, i] for i in range(n)])
        tangent = rv.reconstruct(model, x, linearization="tangent")
        assert float((tangent.weight - J).abs().max()) <= TOL * max(1.0, float(J.abs().max())), spec
        STATS.covered["tangent"] += 1
    STATS.seen.add(key)
    STATS.tried += 1
    for s in spec["stages"]:
        STATS.covered[s[0] if s[0] in ("linear", "attn") else f"{s[0]} {s[1]}"] += 1


def test_generated_gated_architectures_are_point_exact():
    global STATS
    STATS = Stats()
    _point_exact()
    assert STATS.tried >= MIN_ARCHITECTURES * 0.9, STATS.line()
    for kind in ("attn", "se sigmoid", "se hardsigmoid", "norm layer", "norm rms", "norm normalize", "norm by hand",
                 "act silu", "act gelu", "act hardswish", "act mish", "res sigmoid", "res tanh", "tangent"):
        assert STATS.covered[kind] > 0, (kind, STATS.line())
    GENERATED["test_generated_gated_architectures_are_point_exact"] = STATS.line()
