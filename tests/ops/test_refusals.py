"""Trust (issue 11): no silent wrong result, ever.

Each example is one line inside a small conv net (conv -> op -> relu -> linear, a float64
batch of two 1x6x6 probes). An op that is not affine in the input (or that leaves autograd,
so that reconviz cannot see how the input flows through it) must be refused by both the
default method and the basis method with ``rv.UnsupportedOperationError`` naming the op, and
the user's model must be untouched. Ops that only look suspicious (a gate applied to a
parameter, a constant mask, RReLU in eval mode, shape and pooling ops, products with
constants) must not be refused: the reconstruction is region-exact in float64
(|W x + b - f(x)| <= 1e-9 * max(1, |f(x)|) at the probes and inside the certified radius,
and W is the autograd Jacobian).
"""

from __future__ import annotations

import copy
import re
import warnings

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import reconviz as rv
from conftest import snapshot

TOL = 1e-9
C = 3  # channels after the conv
X = torch.randn(2, 1, 6, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(11))
METHODS = ["auto", "basis"]


pytestmark = pytest.mark.usefixtures("one_thread")


def _batch_norm(g: torch.Generator, mean_scale: float, bias_scale: float) -> nn.BatchNorm2d:
    """A BatchNorm2d with random, non-default running statistics and affine parameters."""
    bn = nn.BatchNorm2d(C)
    with torch.no_grad():
        bn.running_mean.copy_(torch.randn(C, generator=g) * mean_scale)
        bn.running_var.copy_(torch.rand(C, generator=g) + 0.5)
        bn.weight.copy_(torch.rand(C, generator=g) + 0.5)
        bn.bias.copy_(torch.randn(C, generator=g) * bias_scale)
    return bn


class OpNet(nn.Module):
    """conv -> op -> relu -> linear; ``op(self, z)`` is the one line under test.

    Constants an op may use: ``param`` and ``scale`` (parameters of shape (C, 1, 1); ``scale``
    has a negative entry, so relu(scale) gates a channel off), ``mask`` (a bool buffer of z's
    shape), ``idx`` (a long buffer), ``weight`` (a 6x6 buffer), ``divisor`` (a positive buffer),
    ``rrelu`` (an nn.RReLU) and ``bn`` (a BatchNorm2d with non-default running statistics).
    """

    def __init__(self, op, seed: int = 0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.conv = nn.Conv2d(1, C, 3, padding=1)
        with torch.no_grad():
            self.conv.weight.copy_(torch.randn(self.conv.weight.shape, generator=g) * 0.5)
            self.conv.bias.copy_(torch.randn(C, generator=g) * 0.2)
        self.param = nn.Parameter(torch.randn(C, 1, 1, generator=g))
        self.scale = nn.Parameter(torch.tensor([0.7, -0.3, 1.2]).reshape(C, 1, 1))
        self.register_buffer("mask", torch.rand(C, 6, 6, generator=g) < 0.4)
        self.register_buffer("idx", torch.tensor([5, 0, 2, 2]))
        self.register_buffer("weight", torch.randn(6, 6, generator=g))
        self.register_buffer("divisor", torch.rand(C, 1, 6, generator=g) + 0.5)
        self.rrelu = nn.RReLU(0.1, 0.3)
        self.bn = _batch_norm(g, mean_scale=0.3, bias_scale=0.1)
        self.op = op
        self.eval()
        with torch.no_grad():
            features = self.features(X.float()).shape[1]
        self.fc = nn.Linear(features, 3)
        with torch.no_grad():
            self.fc.weight.copy_(torch.randn(self.fc.weight.shape, generator=g) * 0.3)
        self.double().eval()

    def features(self, x):
        z = self.conv(x)
        out = self.op(self, z)
        return F.relu(out).reshape(x.shape[0], -1)

    def forward(self, x):
        return self.fc(self.features(x))


def _no_grad_sum(m, z):
    with torch.no_grad():
        s = z.sum()
    return z * s


def _setitem(m, z):
    z = z.clone()
    z[z < 0] = 0
    return z


def _numpy_round_trip(m, z):
    return z * torch.from_numpy(z.detach().numpy())


def _tolist(m, z):
    return z * torch.tensor(z.tolist(), dtype=z.dtype)


def _argsort_gather(m, z):
    return torch.gather(z, -1, torch.argsort(z, dim=-1))


# (id, op, names: the error's operation (named in its message) is one of them)
REFUSED = [
    ("detach", lambda m, z: z * z.detach(), ["detach"]),
    ("item", lambda m, z: z * z.sum().item(), ["item"]),
    ("compare_mask", lambda m, z: z * (z > 0), ["gt", "greater"]),
    ("setitem_compare_mask", _setitem, ["lt", "less", "setitem", "index_put"]),
    ("numpy_round_trip", _numpy_round_trip, ["detach", "numpy", "from_numpy"]),
    ("hypot", lambda m, z: torch.hypot(z, z), ["hypot"]),
    ("copysign", lambda m, z: torch.copysign(z, -z), ["copysign"]),
    ("cummax", lambda m, z: torch.cummax(z, -1).values, ["cummax"]),
    ("kthvalue", lambda m, z: z - torch.kthvalue(z, 2, -1, keepdim=True).values, ["kthvalue"]),
    ("quantile", lambda m, z: z - torch.quantile(z.flatten(1), 0.5, dim=1)[:, None, None, None], ["quantile"]),
    ("vector_norm", lambda m, z: torch.linalg.vector_norm(z, dim=-1, keepdim=True) * z, ["vector_norm", "norm"]),
    ("cdist", lambda m, z: torch.cdist(z, z), ["cdist"]),
    ("argsort_gather", _argsort_gather, ["argsort", "gather", "sort"]),
    ("l1_loss", lambda m, z: F.l1_loss(z, torch.zeros_like(z), reduction="none"), ["l1_loss"]),
    ("aten_abs", lambda m, z: torch.ops.aten.abs(z), ["abs"]),
    # random pooling regions (6 -> 4 with a 2-window): a different function at every call
    ("fractional_max_pool2d", lambda m, z: F.fractional_max_pool2d(z, 2, output_size=(4, 4)),
     ["fractional_max_pool2d"]),
    ("clamp_min_above_max", lambda m, z: torch.clamp(z, min=1.0, max=0.0), ["clamp"]),
    ("no_grad_block", _no_grad_sum, ["no_grad", "grad mode", "sum"]),
    ("data", lambda m, z: z * z.data, ["data"]),
    ("tolist", _tolist, ["tolist"]),
]

# (id, op): affine in the input (or region-exact piecewise linear), must not be refused
ACCEPTED = [
    ("sigmoid_of_parameter", lambda m, z: z * torch.sigmoid(m.param)),
    ("relu_of_parameter", lambda m, z: z * F.relu(m.scale)),
    ("rrelu_eval", lambda m, z: m.rrelu(z)),
    ("where_constant_mask", lambda m, z: torch.where(m.mask, z, 0)),
    ("masked_fill_constant_mask", lambda m, z: z.masked_fill(m.mask, 0.0)),
    ("reshape", lambda m, z: z.reshape(z.shape[0], 4, 3, 9) - 0.1),
    ("permute", lambda m, z: z.permute(0, 1, 3, 2) + z),
    ("cat", lambda m, z: torch.cat([z, 2.0 * z[:, :1]], dim=1)),
    ("stack", lambda m, z: torch.stack([z, -0.5 * z], dim=1)),
    ("pad_reflect", lambda m, z: F.pad(z, (1, 2, 2, 1), mode="reflect")),
    ("interpolate_bilinear", lambda m, z: F.interpolate(z, scale_factor=1.5, mode="bilinear", align_corners=False)),
    ("avg_pool", lambda m, z: F.avg_pool2d(z, 2, stride=1)),
    ("adaptive_avg_pool", lambda m, z: F.adaptive_avg_pool2d(z, (4, 3))),
    ("getitem_constant", lambda m, z: z[:, 1:, ::2, [0, 2, 5]]),
    ("index_select", lambda m, z: z.index_select(3, m.idx)),
    ("einsum_constant", lambda m, z: torch.einsum("nchw,wv->nchv", z, m.weight)),
    ("matmul_constant", lambda m, z: z @ m.weight),
    ("divide_by_constant", lambda m, z: z / m.divisor),
]


def names_one_of(text: str, names: list[str]) -> bool:
    """``text`` names one of ``names`` as a word ('gt' in 'Tensor.gt' or '__gt__', not in 'length')."""
    return any(re.search(rf"(?<![a-z0-9]){re.escape(n)}(?![a-z0-9])", text, re.IGNORECASE) for n in names)


def model_output(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return copy.deepcopy(model).eval().double()(x.double().clone())


def rel_err(got: torch.Tensor, ref: torch.Tensor) -> float:
    return float(((got - ref).abs() / ref.abs().clamp_min(1)).max())


def jacobian(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """(N, K, *sample_shape): the float64 autograd Jacobian of each probe's outputs."""
    m = copy.deepcopy(model).eval().double()
    J = torch.autograd.functional.jacobian(lambda t: m(t), x.double().clone())  # (N, K, N, *s)
    n = x.shape[0]
    return torch.stack([J[i, :, i] for i in range(n)])


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("op, names", [pytest.param(op, names, id=i) for i, op, names in REFUSED])
def test_not_affine_op_is_refused(op, names, method):
    model = OpNet(op)
    model_output(model, X)  # the model itself runs on the probes
    before = snapshot(model)
    try:
        with pytest.raises(rv.UnsupportedOperationError) as info:
            rv.reconstruct(model, X, method=method)
    finally:
        assert snapshot(model) == before, "the user's model was modified"
    err = info.value
    assert type(err) is rv.UnsupportedOperationError, type(err)
    # the op it names (not words of the advice, which may list other ops) is this one
    assert names_one_of(err.operation, names), f"the error names {err.operation!r}, not one of {names}: {err}"
    assert err.operation in str(err), str(err)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("op", [pytest.param(op, id=i) for i, op in ACCEPTED])
def test_affine_op_is_accepted_and_region_exact(op, method):
    model = OpNet(op)
    before = snapshot(model)
    rec = rv.reconstruct(model, X, method=method)
    assert snapshot(model) == before, "the user's model was modified"
    assert rec.exactness == "region-exact"
    f = model_output(model, X)
    assert rel_err(rec.logits, f) <= TOL
    assert rel_err(rec(X), f) <= TOL
    J = jacobian(model, X)
    scale = max(1.0, float(J.abs().max()))
    assert float((rec.weight - J).abs().max()) <= TOL * scale
    # inside the certified radius, at three random points per probe
    r = rv.certified_radius(model, X).l2
    g = torch.Generator().manual_seed(5)
    for _ in range(3):
        u = torch.randn(X.shape, dtype=torch.float64, generator=g)
        u = u / u.flatten(1).norm(dim=1).reshape(-1, 1, 1, 1)
        step = torch.where(torch.isinf(r), torch.full_like(r, 0.1), 0.5 * r).reshape(-1, 1, 1, 1)
        xs = X + step * u
        assert rel_err(rec(xs), model_output(model, xs)) <= TOL


class BNNet(nn.Module):
    """conv -> bn -> relu -> linear, BatchNorm with running statistics that are not the defaults."""

    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(3)
        self.conv = nn.Conv2d(1, C, 3, padding=1)
        self.bn = _batch_norm(g, mean_scale=0.5, bias_scale=0.2)
        self.fc = nn.Linear(C * 36, 3)
        self.double()

    def forward(self, x):
        return self.fc(F.relu(self.bn(self.conv(x))).flatten(1))


def test_submodule_in_training_mode_warns_and_names_it():
    model = BNNet()
    model.eval()
    model.bn.train()  # the top level is in eval mode, one submodule is not
    before = snapshot(model)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        rec = rv.reconstruct(model, X)
    assert snapshot(model) == before, "the user's model was modified"
    assert model.bn.training and not model.training
    training = [w for w in caught if issubclass(w.category, rv.TrainingModeWarning)]
    assert training, f"no TrainingModeWarning; warnings: {[str(w.message) for w in caught]}"
    assert any(re.search(r"(?<![A-Za-z0-9_])bn(?![A-Za-z0-9_])", str(w.message)) for w in training), \
        [str(w.message) for w in training]
    with torch.no_grad():
        f = copy.deepcopy(model).eval()(X)
    assert rel_err(rec.logits, f) <= 1e-12
    assert rel_err(rec(X), f) <= TOL
