"""The value rule (issue 12, torch): smooth gates, gate factors of products and normalizations
frozen at their value at x0, point-exact.

Every reconstruction is checked against an oracle written here: the model with its frozen
factors ``.detach()``ed (SiLU: z * torch.sigmoid(z).detach()), differentiated by autograd,
W = its Jacobian at x0 and b = f(x0) - W x0 (``conftest.value_oracle``), to 1e-9 relative in
float64; and |W x0 + b - f(x0)| <= 1e-9 max(1, |f(x0)|).
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import reconviz as rv
from archs import GATED_BLOCKS, Fn, VGGish
from conftest import assert_exact, assert_value_rule

TOL = 1e-9
METHODS = ["adjoint", "basis"]

pytestmark = pytest.mark.usefixtures("one_thread")


class OpNet(nn.Module):
    """(N, 4, 6) -> linear to (N, 4, 8) -> the op -> flatten -> linear to 3 classes. ``oracle``
    (the value rule written by hand, a function of the op module and z) replaces the op."""

    def __init__(self, op: nn.Module, oracle=None, seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        self.inp, self.op, self.head = nn.Linear(6, 8), op, nn.Linear(32, 3)
        for p in self.op.parameters():  # non-default affine weights (norms)
            p.data.copy_(torch.rand(p.shape) + 0.5)
        self.oracle = oracle
        self.double().eval()

    def forward(self, x):
        z = self.inp(x)
        z = self.op(z) if self.oracle is None else self.oracle(self.op, z)
        return self.head(z.flatten(1))


def _secant(phi, slope_at_zero):
    """phi(0) + s z, s = (phi(z0) - phi(0)) / z0 (phi'(0) at 0), with s detached."""
    def frozen(m, z):
        at0 = phi(torch.zeros_like(z))
        s = torch.where(z == 0, torch.full_like(z, slope_at_zero), (phi(z) - at0) / z)
        return at0 + s.detach() * z
    return frozen


def _gated(g):
    """z * g(z) -> z * g(z0): g detached."""
    return lambda m, z: z * g(z).detach()


def _centred(z, dims, eps):
    return (z - z.mean(dims, keepdim=True)) * torch.rsqrt(z.var(dims, unbiased=False, keepdim=True) + eps).detach()


def _attention(q, k, v, mask=None, causal=False):
    """softmax(q k^T / sqrt(d) + mask) frozen (detached), times v."""
    s = q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])
    if causal:
        s = s.masked_fill(~torch.ones(s.shape[-2:], dtype=torch.bool).tril(), -math.inf)
    if mask is not None:
        s = s + mask
    return torch.softmax(s, -1).detach() @ v


MASK = torch.randn(4, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(5))

# name -> (the op as the model writes it, the oracle: fn(op module, z))
OPS = {
    # z * g(z) -> z * g(z0)
    "F.silu": (Fn(F.silu), _gated(torch.sigmoid)),
    "nn.SiLU(inplace)": (nn.SiLU(inplace=True), _gated(torch.sigmoid)),
    "F.silu(inplace)": (Fn(lambda z: F.silu(z, inplace=True)), _gated(torch.sigmoid)),
    "nn.GELU": (nn.GELU(), _gated(lambda z: 0.5 * (1 + torch.erf(z / math.sqrt(2))))),
    "nn.GELU(tanh)": (nn.GELU(approximate="tanh"), _gated(
        lambda z: 0.5 * (1 + torch.tanh(math.sqrt(2 / math.pi) * (z + 0.044715 * z**3))))),
    "nn.Hardswish": (nn.Hardswish(), _gated(lambda z: F.relu6(z + 3) / 6)),
    "F.hardswish(inplace)": (Fn(lambda z: F.hardswish(z, inplace=True)), _gated(lambda z: F.relu6(z + 3) / 6)),
    "nn.Mish": (nn.Mish(), _gated(lambda z: torch.tanh(F.softplus(z)))),
    # saturating, flowing on additively: the secant through 0
    "nn.Sigmoid": (nn.Sigmoid(), _secant(torch.sigmoid, 0.25)),
    "Tensor.sigmoid_": (Fn(lambda z: z.sigmoid_()), _secant(torch.sigmoid, 0.25)),
    "nn.Tanh": (nn.Tanh(), _secant(torch.tanh, 1.0)),
    "torch.erf": (Fn(torch.erf), _secant(torch.erf, 2 / math.sqrt(math.pi))),
    "nn.Softplus(beta, threshold)": (nn.Softplus(2.0, 1.0), _secant(lambda z: F.softplus(z, 2.0, 1.0), 0.5)),
    "nn.ELU(alpha)": (nn.ELU(0.7), _secant(lambda z: F.elu(z, 0.7), 1.0)),
    "nn.SELU": (nn.SELU(), _secant(F.selu, 1.0507009873554804934193349852946)),
    "nn.CELU(alpha)": (nn.CELU(1.5), _secant(lambda z: F.celu(z, 1.5), 1.0)),
    # gate outputs that multiply another input-dependent tensor: frozen factors
    "sigmoid gate": (Fn(lambda z: z * torch.sigmoid(z.mean(-1, keepdim=True))),
                     lambda m, z: z * torch.sigmoid(z.mean(-1, keepdim=True)).detach()),
    "hardsigmoid gate": (Fn(lambda z: F.hardsigmoid(2 * z.mean(-1, keepdim=True)) * z),
                         lambda m, z: F.hardsigmoid(2 * z.mean(-1, keepdim=True)).detach() * z),
    "tanh gate": (Fn(lambda z: z * torch.tanh(z[:, :1])), lambda m, z: z * torch.tanh(z[:, :1]).detach()),
    "attention by hand": (Fn(lambda z: torch.softmax(z @ z.transpose(-2, -1) / math.sqrt(8), -1) @ z),
                          lambda m, z: _attention(z, z, z)),
    "scaled_dot_product_attention": (Fn(lambda z: F.scaled_dot_product_attention(z, 0.5 * z, z + 1)),
                                     lambda m, z: _attention(z, 0.5 * z, z + 1)),
    "sdpa causal, float mask": (
        Fn(lambda z: F.scaled_dot_product_attention(z, z, z, attn_mask=MASK) + F.scaled_dot_product_attention(
            z, z, z, is_causal=True)),
        lambda m, z: _attention(z, z, z, mask=MASK) + _attention(z, z, z, causal=True)),
    # normalizations: the centring stays, the divisor is frozen
    "nn.LayerNorm": (nn.LayerNorm(8), lambda m, z: _centred(z, (-1,), 1e-5) * m.weight + m.bias),
    "F.layer_norm over two dims": (Fn(lambda z: F.layer_norm(z, (4, 8), eps=1e-3)), lambda m, z: _centred(z, (1, 2), 1e-3)),
    "nn.GroupNorm": (nn.GroupNorm(2, 4), lambda m, z: _centred(z.reshape(z.shape[0], 2, -1), (-1,), 1e-5).reshape(
        z.shape) * m.weight[:, None] + m.bias[:, None]),
    "nn.InstanceNorm1d(affine)": (nn.InstanceNorm1d(4, affine=True),
                                  lambda m, z: _centred(z, (-1,), 1e-5) * m.weight[:, None] + m.bias[:, None]),
    "nn.RMSNorm": (nn.RMSNorm(8, eps=1e-6), lambda m, z: z * torch.rsqrt(
        z.pow(2).mean(-1, keepdim=True) + 1e-6).detach() * m.weight),
    "F.normalize": (Fn(lambda z: F.normalize(z, dim=-1)),
                    lambda m, z: z / torch.linalg.vector_norm(z, dim=-1, keepdim=True).detach()),
    "division by an input-dependent tensor": (Fn(lambda z: z / (z.sum(-1, keepdim=True) + 10)),
                                              lambda m, z: z / (z.sum(-1, keepdim=True) + 10).detach()),
}

X = torch.randn(2, 4, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
MEASURED: dict[str, float] = {}  # the largest errors, reported by the last test


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("name", sorted(OPS))
def test_op_is_point_exact_and_equals_its_oracle(name, method, untouched):
    op, oracle = OPS[name]
    model = OpNet(copy.deepcopy(op))
    frozen = copy.deepcopy(model)
    frozen.oracle = oracle
    with untouched(model):
        rec = rv.reconstruct(model, X, method=method)
    assert rec.exactness == "point-exact" and rec.meta["exactness"] == "point-exact"
    assert rec.meta["linearization"] == "value"
    err = assert_exact(rec, model, rel=TOL)
    w_err = assert_value_rule(rec, frozen, X, rel=TOL)
    MEASURED["exactness"] = max(MEASURED.get("exactness", 0.0), err)
    MEASURED["oracle W"] = max(MEASURED.get("oracle W", 0.0), w_err)
    assert rec.frozen and all(f.location == "op" or f.gate == "factor" for f in rec.frozen), rec.frozen


def test_hardsigmoid_is_frozen_as_its_linear_piece_and_labelled_point_exact():
    """hardsigmoid flowing on additively: D = 1/6 inside (-3, 3), 0 and offsets 0 / 1 outside.
    Exact on the piece, but labelled point-exact: torch's own derivative of hardsigmoid uses a
    float32 1/6 (3e-8 off), so the autograd Jacobian could not confirm it to 1e-9."""
    model = OpNet(Fn(lambda z: F.hardsigmoid(4 * z)))
    oracle = copy.deepcopy(model)
    oracle.oracle = lambda m, z: _piece(4 * z)
    assert bool(((4 * model.inp(X)).abs() > 3).any())  # both saturated parts and the middle
    for method in METHODS:
        rec = rv.reconstruct(model, X, method=method)
        assert rec.exactness == "point-exact"
        assert_exact(rec, model, rel=TOL)
        assert_value_rule(rec, oracle, X)
    x = X + 1e-7  # and the piece holds near x0, to rounding
    assert_exact(rec, model, x=x, rel=TOL)


def _piece(z):
    inside = ((z > -3) & (z < 3)).to(z.dtype)
    return inside * (z / 6 + 0.5) + (z >= 3).to(z.dtype)


# --------------------------------------------------------------------------
# Small blocks of modern classifiers
# --------------------------------------------------------------------------


class FrozenGelu(nn.Module):
    def forward(self, z):
        return z * (0.5 * (1 + torch.erf(z / math.sqrt(2)))).detach()


class FrozenSiLU(nn.Module):
    def forward(self, z):
        return z * torch.sigmoid(z).detach()


class FrozenHardswish(nn.Module):
    def forward(self, z):
        return z * (F.relu6(z + 3) / 6).detach()


class Detached(nn.Module):
    """A gate whose output is a factor (squeeze-excitation): its value, a constant."""

    def __init__(self, gate):
        super().__init__()
        self.gate = gate

    def forward(self, z):
        return self.gate(z).detach()


class FrozenLayerNorm(nn.Module):
    def __init__(self, ln):
        super().__init__()
        self.ln = ln

    def forward(self, z):
        dims = tuple(range(-len(self.ln.normalized_shape), 0))
        return _centred(z, dims, self.ln.eps) * self.ln.weight + self.ln.bias


class FrozenMHA(nn.Module):
    """nn.MultiheadAttention (batch_first, self-attention) written out, softmax detached."""

    def __init__(self, mha):
        super().__init__()
        self.mha = mha

    def forward(self, q, k, v):
        m = self.mha
        n, length, d = q.shape
        heads = lambda t: t.reshape(n, length, m.num_heads, d // m.num_heads).transpose(1, 2)  # noqa: E731
        qq, kk, vv = (heads(t) for t in F.linear(q, m.in_proj_weight, m.in_proj_bias).chunk(3, -1))
        out = _attention(qq, kk, vv).transpose(1, 2).reshape(n, length, d)
        return m.out_proj(out), None


def frozen_copy(model: nn.Module) -> nn.Module:
    """The value rule's oracle of a block: smooth activations and norms swapped for their frozen
    forms, squeeze-excitation gates detached, attention written out with its softmax detached."""
    oracle = copy.deepcopy(model)
    for name, m in list(oracle.named_modules()):
        for child_name, child in list(m.named_children()):
            swap = _frozen_module(child_name, child)
            if swap is not None:
                setattr(m, child_name, swap)
    if hasattr(oracle, "detach_attention"):  # attention written by hand (Swin): its softmax detached
        oracle.detach_attention = True
    return oracle


def _frozen_module(name: str, m: nn.Module) -> nn.Module | None:
    if name == "gate":  # a squeeze-excitation scale
        return Detached(m)
    table = {nn.GELU: FrozenGelu, nn.SiLU: FrozenSiLU, nn.Hardswish: FrozenHardswish}
    if type(m) in table:
        return table[type(m)]()
    if isinstance(m, nn.LayerNorm):
        return FrozenLayerNorm(m)
    if isinstance(m, nn.MultiheadAttention):
        return FrozenMHA(m)
    return None


@pytest.mark.parametrize("name", sorted(GATED_BLOCKS))
def test_block_is_point_exact_solves_agree_and_equal_the_oracle(name, untouched):
    torch.manual_seed(11)
    model = GATED_BLOCKS[name]().double().eval()
    x = torch.randn(2, *model.input_shape, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    with untouched(model):
        recs = {m: rv.reconstruct(model, x, method=m) for m in METHODS}
    for rec in recs.values():
        assert rec.exactness == "point-exact"
        MEASURED["blocks exactness"] = max(MEASURED.get("blocks exactness", 0.0), assert_exact(rec, model, rel=TOL))
        MEASURED["blocks oracle W"] = max(MEASURED.get("blocks oracle W", 0.0),
                                          assert_value_rule(rec, frozen_copy(model), x, rel=TOL))
    a, b = recs["adjoint"].weight, recs["basis"].weight
    agree = float((a - b).abs().max()) / max(1.0, float(a.abs().max()))
    MEASURED["adjoint vs basis"] = max(MEASURED.get("adjoint vs basis", 0.0), agree)
    assert agree <= 1e-10, f"adjoint and basis W differ by {agree:.2e} (relative)"


def test_vit_names_what_it_froze_and_verify_says_why_the_radius_is_zero():
    model = GATED_BLOCKS["vit"]().double().eval()
    x = torch.randn(1, *model.input_shape, dtype=torch.float64)
    rec = rv.reconstruct(model, x)
    frozen = {(f.op, f.location, f.gate): f.count for f in rec.frozen}
    assert frozen[("softmax", "blocks.0.attn", "softmax")] == 1
    assert frozen[("bmm", "blocks.0.attn", "factor")] == 1  # A V with A frozen
    assert frozen[("layer_norm", "blocks.1.norm2", "layer_norm")] == 1
    assert frozen[("gelu", "blocks.1.mlp.1", "gelu")] == 1
    report = rv.verify(model, rec, radius=True)
    assert report.ok and report.jacobian_max_error is None
    assert torch.equal(report.radius.l2, torch.zeros(1, dtype=torch.float64))
    text = str(report)
    assert "point-exact: gates frozen at their values" in text and "point-exact, float64: PASS" in text
    region = {c.name: c for c in rec.self_checks}["region"]
    assert region.passed is None and "point-exact: gates frozen at their values" in region.detail


def test_attention_without_weights_goes_through_scaled_dot_product_attention():
    mha = nn.MultiheadAttention(8, 2, batch_first=True)

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb, self.attn, self.head = nn.Linear(6, 8), mha, nn.Linear(32, 3)

        def forward(self, x):
            h = self.emb(x)
            return self.head(self.attn(h, h, h, need_weights=False)[0].flatten(1))

    model = Net().double().eval()
    rec = rv.reconstruct(model, X)
    assert {f.gate for f in rec.frozen} == {"attention"}
    oracle = frozen_copy(model)
    oracle.forward = lambda x: oracle.head(oracle.attn(oracle.emb(x), oracle.emb(x), oracle.emb(x))[0].flatten(1))
    assert_value_rule(rec, oracle, X)


# --------------------------------------------------------------------------
# Piecewise-linear nets: the value rule changes nothing
# --------------------------------------------------------------------------


@pytest.mark.parametrize("method", METHODS)
def test_piecewise_linear_results_are_bit_for_bit_those_of_the_default(method):
    torch.manual_seed(3)
    model = VGGish(widths=(4, 6)).double().eval()
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    default = rv.reconstruct(model, x, method=method, classes=[0, 3])
    value = rv.reconstruct(model, x, method=method, classes=[0, 3], linearization="value")
    assert default.exactness == value.exactness == "region-exact"
    assert torch.equal(default.weight, value.weight) and torch.equal(default.bias, value.bias)
    assert {f.gate for f in value.frozen} == {"relu", "max_pool"}


def test_linearization_is_checked():
    model = OpNet(nn.SiLU())
    for bad in ("secant", None, 3):
        with pytest.raises(rv.InputError, match="unknown linearization.*'value' .*'tangent'"):
            rv.reconstruct(model, X, linearization=bad)


# --------------------------------------------------------------------------
# Refusals: typed, naming the op and the module path; the model untouched
# --------------------------------------------------------------------------


class Two(nn.Module):
    """Two linear branches of the input combined by ``combine`` in module 'mix', then a head."""

    def __init__(self, combine):
        super().__init__()
        self.a, self.b = nn.Linear(6, 8), nn.Linear(6, 8)
        self.mix = combine
        self.head = nn.Linear(32, 3)
        self.double().eval()

    def forward(self, x):
        return self.head(self.mix(self.a(x), self.b(x)).flatten(1))


class Mix(nn.Module):
    def __init__(self, fn):
        super().__init__()
        self.fn = fn

    def forward(self, u, v):
        return self.fn(u, v)


class Branchy(nn.Module):
    def __init__(self):
        super().__init__()
        self.inp, self.head = nn.Linear(6, 8), nn.Linear(32, 3)

    def forward(self, x):
        z = self.inp(x)
        if z.sum() > 0:  # control flow on the input's values
            z = torch.sigmoid(z)
        return self.head(z.flatten(1))


REFUSED = {
    "x * x": (Two(Mix(lambda u, v: u * u)), "Tensor.mul", "mix"),
    "u @ v^T @ u": (Two(Mix(lambda u, v: u @ v.transpose(-2, -1) @ u)), "Tensor.matmul", "mix"),
    "bilinear layer": (Two(nn.Bilinear(8, 8, 8)), "bilinear", "mix"),
    "softmax added": (Two(Mix(lambda u, v: torch.softmax(u, -1) + v)), "softmax", "mix"),
    "softmax returned": (OpNet(Fn(lambda z: torch.softmax(z, -1))), "softmax", "op"),
    "silu gated by silu (GLU)": (Two(Mix(lambda u, v: F.silu(u) * v)), "Tensor.mul", "mix"),
    "two gates multiplied, then added": (
        Two(Mix(lambda u, v: torch.sigmoid(u) * torch.tanh(v) + u)), "Tensor.mul", "mix"),
    "a constant divided by the input": (OpNet(Fn(lambda z: 1.0 / (z + 10))), "Tensor.__rdiv__", "op"),
    "relu of a product": (Two(Mix(lambda u, v: F.relu(u * v))), "Tensor.mul", "mix"),
    "control flow": (Branchy().double().eval(), "Tensor.gt", ""),
}


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("name", sorted(REFUSED))
def test_other_products_are_refused_by_name_and_path(name, method, untouched):
    model, op, path = REFUSED[name]
    with untouched(model):
        with pytest.raises(rv.UnsupportedOperationError) as info:
            rv.reconstruct(model, X, method=method)
    err = info.value
    assert (err.operation, err.module_path) == (op, path), str(err)
    assert str(err).startswith(f"cannot freeze operation '{op}'") and err.advice


def test_the_way_out_of_a_product_refusal_is_named():
    with pytest.raises(rv.UnsupportedOperationError, match="sigmoid, hardsigmoid, tanh, softmax.*under either rule"):
        rv.reconstruct(REFUSED["x * x"][0], X)


def test_gates_multiplied_then_used_as_a_factor_are_frozen_together():
    """s1 * s2 (two factors) multiplying x: both frozen, x * (s1 s2)(x0)."""
    model = Two(Mix(lambda u, v: u * (torch.sigmoid(v) * torch.tanh(v))))
    oracle = Two(Mix(lambda u, v: u * (torch.sigmoid(v) * torch.tanh(v)).detach()))
    oracle.load_state_dict(model.state_dict())
    rec = rv.reconstruct(model, X)
    assert rec.exactness == "point-exact"
    assert_value_rule(rec, oracle, X)


def test_measured_errors_are_reported():
    """Prints the largest errors the tests above measured (run with -s to see them)."""
    print("value rule, largest measured relative errors:", {k: f"{v:.2e}" for k, v in MEASURED.items()})
    assert all(v <= TOL for v in MEASURED.values())


# --------------------------------------------------------------------------
# Normalizations written by hand: the statistic is allowed on its way into a divisor
# --------------------------------------------------------------------------


def _hand_norm(kind):
    def norm(z):
        c = z - z.mean(-1, keepdim=True)
        if kind == "pow":
            return c / torch.sqrt(c.pow(2).mean(-1, keepdim=True) + 1e-5)
        if kind == "dunder":
            return c / ((c ** 2).mean(-1, keepdim=True).add(1e-5)).sqrt()
        if kind == "var":
            return c / torch.sqrt(z.var(-1, keepdim=True, unbiased=False) + 1e-5)
        if kind == "rsqrt":
            return c * torch.rsqrt(z.var(-1, keepdim=True, unbiased=False) + 1e-5)
        return c * (c.square().mean(-1, keepdim=True) + 1e-5).pow(-0.5)  # "pow(-1/2)"
    return norm


@pytest.mark.parametrize("kind", ["pow", "dunder", "var", "rsqrt", "pow(-1/2)"])
def test_hand_written_layer_norm_is_frozen_like_the_module(kind, untouched):
    """(z - m) / sqrt(var + eps) in five spellings: the same W as nn.LayerNorm (no affine)."""
    hand, module = OpNet(Fn(_hand_norm(kind))), OpNet(nn.LayerNorm(8, elementwise_affine=False))
    with untouched(hand):
        rec = rv.reconstruct(hand, X)
    ref = rv.reconstruct(module, X)
    assert rec.exactness == "point-exact" and assert_exact(rec, hand, rel=TOL) <= TOL
    assert float((rec.weight - ref.weight).abs().max()) <= 1e-12 * max(1.0, float(ref.weight.abs().max()))
    assert [f.gate for f in rec.frozen] == ["factor"]


@pytest.mark.parametrize("name, fn, op", [
    ("sqrt added", lambda z: z + torch.sqrt(z.pow(2) + 1), "sqrt"),
    ("rsqrt added", lambda z: z + torch.rsqrt(z.pow(2) + 1), "rsqrt"),
    ("var returned", lambda z: z.var(-1, keepdim=True).expand_as(z), "Tensor.var"),
    ("pow returned", lambda z: z.pow(3), "Tensor.pow"),
])
def test_a_statistic_used_outside_a_divisor_is_refused(name, fn, op, untouched):
    model = OpNet(Fn(fn))
    with untouched(model):
        with pytest.raises(rv.UnsupportedOperationError) as info:
            rv.reconstruct(model, X)
    assert info.value.operation == op and "divisor" in str(info.value)


@pytest.mark.parametrize("name", ["mbconv", "vit"])
def test_every_solve_gives_the_same_value_rule_w(name):
    """identity, Hadamard and random bases, the adjoint and auto: one W, to 1e-10 relative."""
    torch.manual_seed(11)
    model = GATED_BLOCKS[name]().double().eval()
    x = torch.randn(2, *model.input_shape, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    ref = rv.reconstruct(model, x, method="adjoint").weight
    for kw in ({"method": "basis"}, {"method": "basis", "basis": "hadamard"},
               {"method": "basis", "basis": "random", "seed": 3}, {"method": "auto"}):
        w = rv.reconstruct(model, x, **kw).weight
        assert float((w - ref).abs().max()) <= 1e-10 * max(1.0, float(ref.abs().max())), kw
