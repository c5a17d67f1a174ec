"""Gradients at every layer, projected back to the input through receptive fields
(Fu, Li, Gao & Wang, Neurocomputing 2018).

:func:`layer_gradients` returns, for every selected layer, the gradient of the
(unnormalised) class score with respect to that layer's *output activations*::

    G_l = d S_c / d a_l          (shaped like the layer output a_l, e.g. (N, C, h, w))

:func:`project_to_input` maps each G_l back to the input plane: every unit u of
layer l (a spatial position (i, j) of a conv-type output, all channels
together) spreads ``A_u = sum_c |G_l[n, c, i, j]|`` uniformly over its
receptive field RF(u) in the input::

    P_l[n, p, q] = sum_{u : (p, q) in RF(u)}  A_u / |RF(u)|          (N, H, W)

so ``P_l`` sums to ``sum_u A_u``: nothing is lost or created by the projection.
Outputs without spatial axes, e.g. a Linear layer's (N, K), are one unit whose
receptive field is every input pixel connected to any of its K features.

Receptive fields are *computed from the network*, never assumed
(:func:`receptive_fields`), by a connectivity test on a private copy of the
model, the *connectivity network*:

* every weight tensor (dim >= 2) is set to the positive constant 1/fan_in,
  every other parameter to 1, every bias to 0, BatchNorm running statistics to
  mean 0 / variance 1; rectifiers (ReLU family, clamps) become the identity
  (slope 1 everywhere) and max pooling becomes an average over the same
  windows (same kernel, stride, padding, dilation, ceil mode; adaptive max
  pooling becomes adaptive average pooling). Every op then maps 0 to 0 and has
  positive coefficients, so there are no accidental cancellations and no data
  dependent switches;
* the network is run on H + W indicator images: row r lit (all columns and
  channels) and column q lit. Unit u is nonzero on "row r" exactly when some
  pixel of row r is connected to u. This gives, for all units of all layers at
  once, the set of input rows ``rows[u]`` and columns ``cols[u]`` connected to
  u, and RF(u) = rows[u] x cols[u];
* a check: for the centre unit of every layer, the exact connectivity set (the
  nonzero pattern of d u / d x in the connectivity network, one backward pass)
  is compared with rows x cols; a mismatch is warned about and recorded in
  :attr:`ReceptiveField.is_product`.

Because the test propagates through the real graph (every branch, every add,
every concatenation, functional calls included), receptive fields of residual
networks include the skip paths and parallel branches are combined as a union
(a forward-order composition of kernel sizes and strides would add them in
series instead). Dilated convolutions give receptive fields with holes, which
are kept (rows and columns are sets, not intervals). The product form rows x
cols is exact for convolutions, pooling (any kernel / stride / padding /
dilation), residual additions and concatenations of nested receptive fields,
i.e. every standard CNN; it over-covers a union of branches that is not a
rectangle, e.g. parallel 1x7 and 7x1 convolutions (cross-shaped), which the
centre check reports. Normalisations with input statistics (LayerNorm,
GroupNorm, InstanceNorm) and ops with f(0) != 0 (e.g. an additive sigmoid)
are outside what the test can see.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Sequence

import torch
import torch.nn as nn
from torch import Tensor

from ._common import Attribution, Hooks, InputError, attribution, check_dtype, check_input
from ..errors import TrainingModeWarning, UnsupportedOperationError
from ..ops.base import op_name
from ..ops.gates import Call, Gate
from ..probe import GateMode, eval_copy
from ..htmlparts import HtmlRepr

__all__ = [
    "DEFAULT_LAYER_TYPES",
    "ReceptiveField",
    "layer_gradients",
    "project_to_input",
    "receptive_fields",
]

#: The leaf module types whose outputs :func:`layer_gradients` reports by default.
DEFAULT_LAYER_TYPES: tuple[type[nn.Module], ...] = (
    nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d,
    nn.Linear,
    nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.PReLU, nn.RReLU, nn.Hardtanh, nn.ELU, nn.SELU, nn.CELU,
    nn.GELU, nn.SiLU, nn.Mish, nn.Hardswish,
    nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d,
    nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d, nn.AdaptiveMaxPool3d,
    nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d, nn.LPPool1d, nn.LPPool2d,
)

Layers = str | type | Sequence[str | type] | None


# --------------------------------------------------------------------------
# Layer selection and per-call recording
# --------------------------------------------------------------------------


def _select_layers(work: nn.Module, layers: Layers) -> list[tuple[str, nn.Module]]:
    """(name, module) of the layers to record, in ``named_modules`` order.

    ``layers``: None (leaf modules of :data:`DEFAULT_LAYER_TYPES`), a module
    name, a module type, or a sequence of names and/or types (leaf modules of
    the types).
    """
    mods = dict(work.named_modules())
    if layers is None:
        items: list[str | type] = list(DEFAULT_LAYER_TYPES)
    elif isinstance(layers, (str, type)):
        items = [layers]
    else:
        items = list(layers)
    names: set[str] = set()
    types = tuple(t for t in items if isinstance(t, type))
    for it in items:
        if isinstance(it, str):
            base = it.split("#", 1)[0]
            if base not in mods:
                some = [k for k in mods if k][:20]
                raise InputError(f"layers: no module named {base!r} in the model; some names: {some}")
            names.add(base)
        elif not isinstance(it, type):
            raise InputError(f"layers must hold module names (str) or module types, got {it!r}")
    if types:
        for name, m in mods.items():
            if isinstance(m, types) and next(iter(m.children()), None) is None:
                names.add(name)
    chosen = [(name, m) for name, m in mods.items() if name in names]
    if not chosen:
        raise InputError(f"layers={layers!r} selects no module of the model")
    return chosen


def _first_tensor(out: Any) -> tuple[Tensor | None, Callable[[Tensor], Any] | None]:
    """The activation tensor of a module output and a function putting a replacement back."""
    if isinstance(out, Tensor):
        return out, (lambda y: y)
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], Tensor):
        rest = tuple(out[1:])
        return out[0], (lambda y: (y, *rest))
    return None, None


def _keys(calls: list[str]) -> list[str]:
    """Result keys of the recorded calls: the module name, or ``name#k`` for a module called k > 1 times."""
    count: dict[str, int] = {}
    for n in calls:
        count[n] = count.get(n, 0) + 1
    seen: dict[str, int] = {}
    keys = []
    for n in calls:
        if count[n] == 1:
            keys.append(n)
        else:
            keys.append(f"{n}#{seen.get(n, 0)}")
            seen[n] = seen.get(n, 0) + 1
    return keys


class _Recorder:
    """Forward hooks on the chosen modules; ``fn(name, tensor)`` may return a replacement tensor."""

    def __init__(self, chosen: list[tuple[str, nn.Module]], fn: Callable[[str, Tensor], Tensor | None]):
        self.chosen, self.fn = chosen, fn
        self.calls: list[str] = []

    def _hook(self, name: str) -> Callable:
        def hook(module: nn.Module, args: Any, out: Any) -> Any:
            t, put = _first_tensor(out)
            if t is None or not t.is_floating_point():
                return None
            self.calls.append(name)
            new = self.fn(name, t)
            return None if new is None else put(new)  # type: ignore[misc]

        return hook

    def install(self, hooks: Hooks) -> None:
        for name, m in self.chosen:
            hooks.add(m.register_forward_hook(self._hook(name)))


# --------------------------------------------------------------------------
# Layer gradients
# --------------------------------------------------------------------------


@attribution()
def layer_gradients(
    a: Attribution,
    layers: Layers = None,
    *,
    project: bool = False,
    fields: Mapping[str, "ReceptiveField"] | None = None,
    batch_size: int = 64,
) -> dict[str, Tensor]:
    """The gradient of the class score w.r.t. the output of every selected layer.

    Args:
        layers: None (every leaf module of :data:`DEFAULT_LAYER_TYPES`: conv,
            linear, ReLU-family, pooling), a module name, a module type, or a
            sequence of names and/or types.
        project: return the input-space projections (:func:`project_to_input`)
            instead of the gradients; needs x of shape (N, C, H, W).
        fields: precomputed :func:`receptive_fields` for ``project`` (computed when None).
        batch_size: for the receptive-field computation (``project=True``).

    Returns:
        A dict, in forward-call order, mapping the module name (``name#k`` for
        the k-th call of a module run several times per forward, e.g. a shared
        ReLU) to ``d S / d output`` shaped like that output (for a module
        returning a tuple, its first element), in x's dtype. The gradient is
        taken w.r.t. the output *as the module returned it*: later in-place ops
        (``ReLU(inplace=True)`` after a conv) do not change it. With
        ``project=True``: name -> (N, H, W) projection.
    """
    eps: list[Tensor] = []

    def add_zero(name: str, t: Tensor) -> Tensor:
        # d S / d e at e = 0 of (t + e) is d S / d t, whatever happens to t + e afterwards
        e = torch.zeros_like(t, requires_grad=True)
        eps.append(e)
        return t + e

    rec = _Recorder(_select_layers(a.work, layers), add_zero)
    with Hooks() as hooks, torch.enable_grad():
        rec.install(hooks)
        score = a.score(a.work(a.xw.clone()))  # type: ignore[misc]
        grads = torch.autograd.grad(score.sum(), eps, allow_unused=True) if eps else ()
    result = {
        k: a.result(torch.zeros_like(e) if g is None else g) for k, e, g in zip(_keys(rec.calls), eps, grads)
    }
    if not project:
        return result
    if fields is None:
        fields = receptive_fields(a.model, a.x, layers, dtype=a.dtype, batch_size=batch_size)
    return project_to_input(result, fields)


# --------------------------------------------------------------------------
# Receptive fields
# --------------------------------------------------------------------------


@dataclass(frozen=True)
class ReceptiveField(HtmlRepr):
    """The input pixels connected to each unit (spatial position) of one layer output.

    Attributes:
        name: the layer's key (as in :func:`layer_gradients`).
        shape: the spatial shape of the layer output, e.g. (h, w); () for an (N, K) output.
        rows: (S, H) bool, S = prod(shape): input rows connected to unit s
            (units in row-major order over ``shape``).
        cols: (S, W) bool: input columns connected to unit s.
        is_product: whether the centre unit's exact connectivity set equals
            rows x cols (False is also warned about at computation time).

    Unit s's receptive field is ``rows[s] x cols[s]`` (:meth:`mask`).
    """

    name: str
    shape: tuple[int, ...]
    rows: Tensor
    cols: Tensor
    is_product: bool = True

    def _flat(self, index: int | Sequence[int]) -> int:
        if isinstance(index, int):
            return index
        idx = tuple(index)
        if len(idx) != len(self.shape):
            raise InputError(f"index {idx} does not fit the layer's spatial shape {self.shape}")
        flat = 0
        for i, d in zip(idx, self.shape):
            if not 0 <= i < d:
                raise InputError(f"index {idx} out of range for spatial shape {self.shape}")
            flat = flat * d + i
        return flat

    def mask(self, index: int | Sequence[int] = 0) -> Tensor:
        """(H, W) bool: the receptive field of unit ``index`` (flat, or a tuple like (i, j))."""
        s = self._flat(index)
        return self.rows[s][:, None] & self.cols[s][None, :]

    def box(self, index: int | Sequence[int] = 0) -> tuple[int, int, int, int]:
        """(r0, r1, c0, c1), half-open: the bounding box of unit ``index``'s receptive field."""
        s = self._flat(index)
        r = torch.nonzero(self.rows[s]).reshape(-1)
        c = torch.nonzero(self.cols[s]).reshape(-1)
        if r.numel() == 0 or c.numel() == 0:
            return (0, 0, 0, 0)
        return (int(r[0]), int(r[-1]) + 1, int(c[0]), int(c[-1]) + 1)

    @property
    def counts(self) -> Tensor:
        """(S,) the number of input pixels in each unit's receptive field."""
        return self.rows.sum(1) * self.cols.sum(1)

    @property
    def extent(self) -> tuple[int, int]:
        """(height, width) of the largest receptive field (bounding-box span, holes included):
        the classic "receptive field size" for units away from the border."""

        def span(m: Tensor) -> int:
            if not bool(m.any()):
                return 0
            ar = torch.arange(m.shape[1])
            first = torch.where(m, ar, m.shape[1]).amin(1)
            last = torch.where(m, ar, -1).amax(1)
            return int((last - first + 1).clamp_min(0).max())

        return (span(self.rows), span(self.cols))


class _ConnectivityMode(GateMode):
    """Every gate runs as its connectivity op (:meth:`Gate.connectivity`: elementwise
    gates -> identity, max pooling -> window averages of the same geometry)."""

    def on_gate(self, gate: Gate, call: Call, path: str) -> Any:
        try:
            return gate.connectivity(call)
        except NotImplementedError:
            raise UnsupportedOperationError(
                op_name(call.func), path, f"gate '{gate.name}' defines no connectivity for the "
                "receptive-field test: implement Gate.connectivity (see docs/extending.md)") from None


def _connectivity_copy(model: nn.Module, dtype: torch.dtype, device: torch.device) -> nn.Module:
    """An eval copy (no user hooks) with positive weights (1/fan_in), zero biases and neutral
    BatchNorm statistics."""
    with warnings.catch_warnings():  # the test reads the graph only: the model's mode does not matter
        warnings.simplefilter("ignore", TrainingModeWarning)
        conn = eval_copy(model, dtype, device)
    with torch.no_grad():
        for pname, p in conn.named_parameters():
            if not p.is_floating_point():
                continue
            leaf = pname.rsplit(".", 1)[-1]
            if "bias" in leaf:
                p.zero_()
            elif p.dim() >= 2:
                p.fill_(1.0 / max(1, math.prod(p.shape[1:])))
            else:
                p.fill_(1.0)
        for m in conn.modules():
            rm, rv = getattr(m, "running_mean", None), getattr(m, "running_var", None)
            if isinstance(rm, Tensor) and isinstance(rv, Tensor):
                rm.zero_()
                rv.fill_(1.0)
    return conn


def _units(t: Tensor) -> Tensor:
    """A layer output (B, C, *spatial) as (B, C, S); (B, K) as (B, K, 1)."""
    b = t.shape[0]
    if t.dim() == 1:
        return t.reshape(b, 1, 1)
    return t.reshape(b, t.shape[1], -1)


def receptive_fields(
    model: nn.Module,
    x: Tensor,
    layers: Layers = None,
    *,
    dtype: torch.dtype | None = torch.float64,
    batch_size: int = 64,
    check: bool = True,
) -> dict[str, ReceptiveField]:
    """The receptive field of every unit of every selected layer, computed from the network.

    See the module documentation for the connectivity test. Costs H + W
    forward passes of the model (batched by ``batch_size``) plus, with
    ``check``, one forward and one backward pass per layer for the centre-unit
    check. The result depends only on the model and the input *shape*; compute
    it once and pass it to :func:`layer_gradients` (``fields=``) or
    :func:`project_to_input`.

    Args:
        model: the model; a private copy is used, the model is left untouched.
        x: an input batch (N, C, H, W) (only its shape, dtype and device are used).
        layers: as in :func:`layer_gradients`.
        dtype: working precision (default float64).
        batch_size: indicator images per forward pass.
        check: run the centre-unit product check.

    Returns:
        A dict key -> :class:`ReceptiveField`, keys as in :func:`layer_gradients`.
    """
    x = check_input(x)
    if x.dim() != 4:
        raise InputError(f"receptive fields need images (N, C, H, W), got shape {tuple(x.shape)}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise InputError(f"batch_size must be a positive int, got {batch_size!r}")
    dt = check_dtype(dtype, x)
    c, h, w = x.shape[1:]
    conn = _connectivity_copy(model, dt, x.device)
    chosen = _select_layers(conn, layers)
    masks: dict[str, list[Tensor]] = {}
    shapes: dict[str, tuple[int, ...]] = {}
    keys: list[str] | None = None

    def indicator(j: int) -> Tensor:
        img = torch.zeros(c, h, w, dtype=dt, device=x.device)
        if j < h:
            img[:, j, :] = 1.0
        else:
            img[:, :, j - h] = 1.0
        return img

    found: list[tuple[Tensor, tuple[int, ...]]] = []

    def nonzero_units(name: str, t: Tensor) -> None:
        found.append(((_units(t) != 0).any(1).cpu(), tuple(t.shape[2:])))
        return None

    rec = _Recorder(chosen, nonzero_units)
    with Hooks() as hooks, torch.no_grad():
        rec.install(hooks)
        for start in range(0, h + w, batch_size):
            stop = min(h + w, start + batch_size)
            rec.calls.clear()
            found.clear()
            with _ConnectivityMode(conn):
                conn(torch.stack([indicator(j) for j in range(start, stop)]))
            ks = _keys(rec.calls)
            if keys is None:
                keys = ks
            elif ks != keys:
                raise InputError(
                    "the model ran different layers on different inputs (input-dependent control flow); "
                    "receptive fields cannot be computed for it"
                )
            for k, (m, sp) in zip(ks, found):
                masks.setdefault(k, []).append(m)
                shapes[k] = sp
    assert keys is not None
    fields: dict[str, ReceptiveField] = {}
    for k in keys:
        m = torch.cat(masks[k])  # (H + W, S)
        fields[k] = ReceptiveField(k, shapes[k], m[:h].T.contiguous(), m[h:].T.contiguous())
    if check:
        fields = _centre_check(conn, chosen, fields, x.shape[1:], dt, x.device)
    return fields


def _centre_check(
    conn: nn.Module,
    chosen: list[tuple[str, nn.Module]],
    fields: dict[str, ReceptiveField],
    in_shape: tuple[int, ...],
    dt: torch.dtype,
    device: torch.device,
) -> dict[str, ReceptiveField]:
    """Compare the exact connectivity of each layer's centre unit with rows x cols."""
    gen = torch.Generator().manual_seed(0)
    x0 = (torch.rand(1, *in_shape, generator=gen, dtype=dt) + 0.5).to(device).requires_grad_(True)
    outs: list[Tensor] = []

    def keep(name: str, t: Tensor) -> None:
        outs.append(t.clone())  # a copy: later in-place ops do not touch it
        return None

    rec = _Recorder(chosen, keep)
    with Hooks() as hooks, torch.enable_grad():
        rec.install(hooks)
        with _ConnectivityMode(conn):
            conn(x0)
        bad = []
        checked = {}
        for k, t in zip(_keys(rec.calls), outs):
            f = fields.get(k)
            if f is None:
                continue
            u = _units(t)
            s0 = f._flat(tuple(d // 2 for d in f.shape)) if f.shape else 0
            if not t.requires_grad:
                exact = torch.zeros(in_shape[1:], dtype=torch.bool)
            else:
                (g,) = torch.autograd.grad(u[0, :, s0].sum(), x0, retain_graph=True, allow_unused=True)
                exact = torch.zeros(in_shape[1:], dtype=torch.bool) if g is None else (g[0] != 0).any(0).cpu()
            ok = bool(torch.equal(exact, f.mask(s0)))
            checked[k] = ReceptiveField(f.name, f.shape, f.rows, f.cols, ok)
            if not ok:
                bad.append(k)
    if bad:
        warnings.warn(
            f"receptive fields of layer(s) {bad} are not a product of row and column sets at the centre "
            "unit (e.g. parallel 1xk / kx1 branches): the projection spreads over the enclosing "
            "rows x cols set",
            RuntimeWarning,
            stacklevel=3,
        )
    return {k: checked.get(k, f) for k, f in fields.items()}


# --------------------------------------------------------------------------
# Projection to the input
# --------------------------------------------------------------------------


def project_to_input(
    grads: Mapping[str, Tensor], fields: Mapping[str, ReceptiveField]
) -> dict[str, Tensor]:
    """Map each layer's gradient to the input plane through its units' receptive fields.

    ``P[n, p, q] = sum over units u whose receptive field contains (p, q) of
    A_u / |RF(u)|`` with ``A_u = sum_c |grads[key][n, c, u]|``: each unit's
    absolute gradient (all channels at that position together) is spread
    uniformly over its receptive field. A unit connected to no input pixel
    contributes nothing. ``P`` sums to the total ``sum_u A_u`` of the
    connected units.

    Args:
        grads: key -> gradient (N, C, *spatial) or (N, K), from :func:`layer_gradients`.
        fields: key -> :class:`ReceptiveField`, from :func:`receptive_fields`.

    Returns:
        key -> (N, H, W) map, in the gradient's dtype.
    """
    result = {}
    for key, g in grads.items():
        if key not in fields:
            raise InputError(f"no receptive field for layer {key!r}; fields has {list(fields)[:20]}")
        f = fields[key]
        n = g.shape[0]
        a = _units(g.detach()).abs().sum(1)  # (N, S)
        s = f.rows.shape[0]
        if a.shape[1] != s:
            raise InputError(
                f"gradient of {key!r} has {a.shape[1]} units but its receptive field has {s}: "
                "were they computed for the same input shape?"
            )
        rows = f.rows.to(device=g.device, dtype=g.dtype)
        cols = f.cols.to(device=g.device, dtype=g.dtype)
        cnt = rows.sum(1) * cols.sum(1)
        wts = torch.where(cnt > 0, a / cnt.clamp_min(1), torch.zeros_like(a))
        result[key] = torch.matmul((wts[:, :, None] * rows[None]).transpose(1, 2), cols)  # (N, H, W)
        assert result[key].shape == (n, f.rows.shape[1], f.cols.shape[1])
    return result
