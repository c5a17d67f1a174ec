"""The gate registry: the one place that knows every input-dependent choice.

A *gate* is an operation whose behaviour depends on its input in a piecewise
way: ReLU switches units on or off, MaxPool picks a switch per window. Each gate
class knows how to

* ``parse`` a call (which tensor is gated, its parameters, whether in place),
* ``record`` the prior at the probe (the choice it made),
* ``apply`` that prior frozen, which makes the op affine in its input,
* ``features`` / ``margins``: the affine functions h(z) whose zero set bounds the
  probe's linear region (used by the certified radius),
* match ONNX nodes: ``onnx_ops`` (the op types it freezes) and ``onnx_params``
  (a node's attributes and constant inputs as the ``params`` of ``record``), so
  that :mod:`reconviz.onnx` runs the same frozen math on ONNX graphs.

One registry: :func:`gate_for` (torch function -> gate) and :func:`gate_for_onnx`
(ONNX op type -> gate), both filled by :func:`register_gate` (or
:func:`reconviz.ops.registered` for a block). Adding a gate = adding one class
here and listing it in :data:`GATES`. The solver, the verifier and the radius
never look inside a gate.

Frozen forms, with D the recorded slope and C the recorded offset::

    elementwise:  phi(z)  ->  D * z + C          (ReLU: D = 1[z > 0], C = 0)
    max-pool:     max_w z ->  z[switch_w]         (gather at the recorded arg-max)

Priors carry the probe batch N in their leading dimension. Replaying on a batch
of B = r * N inputs uses probe ``i % N``'s prior for input ``i`` (the layout
``(r, N, ...)`` flattened), which is how the solvers batch basis columns.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from ..errors import InputError, ReplayMismatchError, UnsupportedOperationError
from .base import op_name

__all__ = [
    "Call", "Prior", "Gate", "ElementwiseGate", "ReLUGate", "ClampGate", "LeakyReLUGate", "PReLUGate",
    "ThresholdGate", "MaxPoolGate", "GATES", "gate_for", "gate_for_onnx", "gate_named", "register_gate",
    "registered_gates", "per_probe", "tile_probes",
]


@dataclass
class Call:
    """One parsed call of a gated op."""

    func: Callable
    z: Tensor  # the gated tensor (pre-activation / pooling input)
    params: dict[str, Any]
    inplace: bool = False
    args: tuple = ()
    kwargs: dict = field(default_factory=dict)

    def original(self) -> Any:
        """Run the op as the model wrote it."""
        return self.func(*self.args, **self.kwargs)


@dataclass
class Prior:
    """The frozen choice one gated call made at the probe."""

    gate: str  # gate name, e.g. "relu"
    op: str  # name of the function that was called
    module_path: str  # dotted path of the module whose forward called it
    shape: tuple[int, ...]  # shape of the gated tensor at the probe
    batched: bool  # leading dim is the probe batch (N)
    tensors: dict[str, Tensor]
    params: dict[str, Any] = field(default_factory=dict)
    ties: int = 0  # units exactly on a boundary at the probe
    # the gated tensor does not depend on the input (F.relu(self.scale)): the call is a
    # constant, replayed as written, with no region features
    constant: bool = False

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors.values())


def _arg(args: tuple, kwargs: dict, i: int, name: str, default: Any = None) -> Any:
    if len(args) > i:
        return args[i]
    return kwargs.get(name, default)


def tile_probes(value: Tensor, shape: tuple[int, ...] | torch.Size) -> Tensor:
    """A recorded probe value for a replay tensor of ``shape``: equal shapes as they are; else
    the one dim d where ``shape[d] = r * value.shape[d]`` repeated r times (replay row i uses
    probe row i % n, the layout of :func:`per_probe`)."""
    shape = tuple(shape)
    if tuple(value.shape) == shape:
        return value
    grown = [d for d, (a, b) in enumerate(zip(value.shape, shape)) if a != b]
    if len(shape) != value.dim() or len(grown) != 1 or shape[grown[0]] % max(1, value.shape[grown[0]]):
        raise ReplayMismatchError(f"a value frozen at the probe has shape {tuple(value.shape)}, but the "
                                  f"replay gives shape {shape}: only a multiple of the probe batch is allowed")
    reps = [1] * value.dim()
    reps[grown[0]] = shape[grown[0]] // value.shape[grown[0]]
    return value.repeat(*reps)


_CHANNELS_LAST = {4: torch.channels_last, 5: torch.channels_last_3d}


def in_layout_of(out: Any, z: Tensor) -> Any:
    """``out`` (a gate's frozen output, or its first element) in the memory layout of its input
    ``z`` when z is channels-last, as torch's own pooling and activations keep it. The frozen
    forms' gathers and reshapes return contiguous tensors; the next convolution's kernels for
    the two layouts differ by up to 2x in time (forward and backward), so g would otherwise
    run slower kernels than the model it replaces. The values are the same."""
    layout = _CHANNELS_LAST.get(z.dim())
    if layout is None or z.is_contiguous() or not z.is_contiguous(memory_format=layout):
        return out
    if isinstance(out, tuple) and out:
        return (in_layout_of(out[0], z), *out[1:])
    if not isinstance(out, Tensor) or out.dim() != z.dim() or out.is_contiguous(memory_format=layout):
        return out
    return out.contiguous(memory_format=layout)


def per_probe(t: Tensor, n: int) -> Tensor:
    """View a batch of B = r * n rows as (r, n, ...)."""
    if t.shape[0] % n:
        raise ReplayMismatchError(
            f"batch of {t.shape[0]} does not split over the {n} probes: the linearized model "
            f"takes batches of r * {n} inputs (input i uses probe i % {n})"
        )
    return t.unflatten(0, (t.shape[0] // n, n))


class Gate:
    """Base class: one subclass per family of gated operations."""

    name: str = ""
    functions: tuple[Callable, ...] = ()
    region_exact: bool = True  # False for smooth gates frozen at a point ("point-exact")
    # True when ``record`` returns the frozen form's output (equal to the op's own output,
    # value for value): the probe pass is then g's pass at x0, and its graph can be reused
    records_frozen: bool = False
    onnx_ops: tuple[str, ...] = ()  # ONNX op types this gate freezes (reconviz.onnx)
    # the value rule (reconviz.ops.factors): the output of a saturating gate (sigmoid, tanh,
    # hardsigmoid, softmax) is frozen at its value where it multiplies another input-dependent
    # tensor; ``factor_only``: it may go nowhere else (softmax: no additive frozen form)
    factor: bool = False
    factor_only: bool = False

    def applies(self, func: Callable, args: tuple, kwargs: dict) -> bool:
        """Whether this call is the gate's (default: always); False sends it to the op registry
        (F.instance_norm with running statistics is affine there)."""
        return True

    def parse(self, func: Callable, args: tuple, kwargs: dict) -> Call:
        raise NotImplementedError

    def onnx_params(self, node: Any) -> dict[str, Any]:
        """The ``params`` of :meth:`record` for an ONNX node of one of :attr:`onnx_ops`.

        ``node`` (:class:`reconviz.onnx.gates.OnnxNode`) has ``op_type``, ``name``,
        ``attr(name, default)`` and ``const(i, what)`` (constant input i as an array, None
        when absent). Raise UnsupportedOperationError for a node the gate cannot freeze."""
        raise NotImplementedError

    def record(self, call: Call, n: int) -> tuple[Any, dict[str, Tensor], dict[str, Any], int]:
        """Run the op at the probe: returns (output, prior tensors, params, ties).

        ``output`` is what the model's forward continues with: the op's own output, or
        (``records_frozen``) the frozen form applied at the probe, which must equal it."""
        raise NotImplementedError

    def apply(self, prior: Prior, call: Call) -> Any:
        """The op with its prior frozen (affine in ``call.z``)."""
        raise NotImplementedError

    def features(self, prior: Prior, z: Tensor) -> Tensor:
        """Affine functions of z, shape (B, M), whose sign pattern is the region.

        Must not share memory with ``z``: the gate may then write into z in place."""
        raise NotImplementedError

    def margins(self, prior: Prior, z: Tensor) -> Tensor:
        """Distance of each feature to its boundary at the probe, (N, M); inf: none."""
        raise NotImplementedError

    def face_sign(self, prior: Prior, z: Tensor, probe: int, feature: int) -> float:
        """+1 or -1: the way feature ``feature`` of probe ``probe`` moves to reach its face."""
        raise NotImplementedError

    def same_choice(self, prior: Prior, z: Tensor) -> Tensor:
        """(B,) bool: does row i of ``z`` make probe i's recorded choice? (z: a batch of N)."""
        raise NotImplementedError

    def connectivity(self, call: Call) -> Any:
        """The op in the receptive-field test's *connectivity network* (positive weights,
        no switches): what the gate connects, with positive coefficients and 0 -> 0."""
        raise NotImplementedError

    def backward_signal(self, call: Call) -> Callable[[Tensor], Tensor] | None:
        """rho for guided backprop and deconvnet: the non-linearity applied to the backward
        signal (ReLU: rho = relu). None: the ordinary backward (max pooling routes the
        signal through its switches; a clamp that is not a rectifier). A gate that does not
        define it is refused by those methods rather than given a rule silently."""
        raise NotImplementedError

    # shared helpers ------------------------------------------------------
    @staticmethod
    def check_shape(prior: Prior, z: Tensor) -> None:
        ok = (
            tuple(z.shape[1:]) == prior.shape[1:] and z.shape[0] % prior.shape[0] == 0
            if prior.batched
            else tuple(z.shape) == prior.shape
        )
        if not ok:
            raise ReplayMismatchError(
                f"gated op '{prior.op}' in module '{prior.module_path}' got a tensor of shape "
                f"{tuple(z.shape)}, but the probe recorded {prior.shape}"
                + (" (any multiple of the leading dim is allowed)" if prior.batched else "")
            )


# --------------------------------------------------------------------------
# Elementwise piecewise-linear gates: phi(z) -> D * z + C
# --------------------------------------------------------------------------


class ElementwiseGate(Gate):
    """phi(z) frozen as D * z + C; subclasses define the slope/offset and breakpoints.

    At the probe, the built-in (piecewise-linear) gates continue with D * z + C itself
    (``records_frozen``): with D and C read off z, it equals phi(z) in value (D is 0,
    1 or the slope phi uses, C a constant phi returns), so the probe pass is g's
    forward pass. Any other subclass continues with phi(z), the model's own value,
    so that the exactness check compares against f(x0) and catches a wrong rule."""

    def slope_offset(self, z: Tensor, p: dict) -> tuple[Tensor, Tensor | None]:
        raise NotImplementedError

    def breakpoints(self, p: dict) -> list[Any]:
        raise NotImplementedError

    def prior_at(self, z: Tensor, p: dict) -> tuple[dict[str, Tensor], int]:
        """The prior at z: {"slope": D, "offset": C} in z's dtype, and the ties (units of z
        on a breakpoint). The one place both paths (torch, ONNX) read a prior off z."""
        slope, offset = self.slope_offset(z, p)
        tensors = {"slope": slope.to(z.dtype)}
        if offset is not None:
            tensors["offset"] = offset.to(z.dtype)
        return tensors, sum(_count_equal(z, b) for b in self.breakpoints(p))

    def record(self, call, n):
        tensors, ties = self.prior_at(call.z.detach(), call.params)
        out = self._frozen(call, tensors, n=None) if self.records_frozen else call.original()
        return out, tensors, {k: _detach(v) for k, v in call.params.items()}, ties

    def apply(self, prior, call):
        self.check_shape(prior, call.z)
        return self._frozen(call, prior.tensors, n=prior.shape[0] if prior.batched else None)

    @staticmethod
    def _frozen(call: Call, tensors: dict[str, Tensor], n: int | None) -> Tensor:
        z = call.z
        view = per_probe(z, n) if n is not None else z
        slope, offset = tensors["slope"], tensors.get("offset")
        if call.inplace:
            view.mul_(slope)
            if offset is not None:
                view.add_(offset)
            return z
        out = view * slope
        if offset is not None:
            out = out + offset
        return out.reshape(z.shape)

    def connectivity(self, call):
        return call.z.clone()  # elementwise: each unit connects to itself (slope 1 everywhere)

    def same_choice(self, prior, z):
        slope, offset = self.slope_offset(z.detach(), prior.params)
        same = slope.to(z.dtype) == prior.tensors["slope"]
        if "offset" in prior.tensors:
            same &= offset.to(z.dtype) == prior.tensors["offset"]
        return _per_row(same, prior, z)

    def features(self, prior, z):
        # a copy, never a view of z: an in-place gate (ReLU(inplace=True), relu_, ...) overwrites
        # z right after the observer has seen it, and the radius keeps h(0) for the whole sweep
        return z.flatten(1).clone()

    def face_sign(self, prior, z, probe, feature):
        h = float(z[probe].flatten()[feature])
        points = [float(torch.as_tensor(b).expand(z.shape)[probe].flatten()[feature])
                  for b in self.breakpoints(prior.params) if b is not None]
        nearest = min(points, key=lambda b: abs(h - b))
        return 1.0 if nearest >= h else -1.0

    def margins(self, prior, z):
        zf = z.flatten(1)
        dist = torch.full_like(zf, math.inf)
        for b in self.breakpoints(prior.params):
            if b is None:
                continue
            bt = torch.as_tensor(b, dtype=z.dtype, device=z.device)
            d = (z - bt).abs().flatten(1) if bt.numel() > 1 else (zf - bt.reshape(())).abs()
            dist = torch.minimum(dist, d)
        return dist


class ReLUGate(ElementwiseGate):
    name = "relu"
    records_frozen = True
    functions = (F.relu, torch.relu, torch.relu_, Tensor.relu, Tensor.relu_)
    onnx_ops = ("Relu",)

    def parse(self, func, args, kwargs):
        inplace = func in (torch.relu_, Tensor.relu_) or bool(
            func is F.relu and _arg(args, kwargs, 1, "inplace", False)
        )
        return Call(func, args[0], {}, inplace)

    def onnx_params(self, node):
        return {}

    def slope_offset(self, z, p):
        return torch.gt(z, 0, out=torch.empty_like(z)), None  # 1[z > 0] in z's dtype, one pass

    def breakpoints(self, p):
        return [0.0]

    def backward_signal(self, call):
        return F.relu


class ClampGate(ElementwiseGate):
    """Hardtanh, ReLU6, clamp/clip: D = 1[lo < z < hi], C = lo 1[z <= lo] + hi 1[z >= hi]
    (clamp/clip: D = 1[lo <= z <= hi], as their gradient is, and C where z < lo or z > hi).
    ONNX Clip (bounds from inputs 1, 2, or attributes min, max before opset 11) is frozen
    like hardtanh: D = 0 on a bound."""

    name = "clamp"
    records_frozen = True
    functions = (
        F.hardtanh, F.hardtanh_, F.relu6, torch.clamp, torch.clamp_, torch.clip, torch.clip_,
        Tensor.clamp, Tensor.clamp_, Tensor.clip, Tensor.clip_, torch.clamp_min, torch.clamp_min_,
        Tensor.clamp_min, Tensor.clamp_min_, torch.clamp_max, torch.clamp_max_, Tensor.clamp_max,
        Tensor.clamp_max_,
    )
    onnx_ops = ("Clip",)

    def parse(self, func, args, kwargs):
        z = args[0]
        name = getattr(func, "__name__", "")
        if func in (F.hardtanh, F.hardtanh_):
            lo, hi = _arg(args, kwargs, 1, "min_val", -1.0), _arg(args, kwargs, 2, "max_val", 1.0)
            inplace = func is F.hardtanh_ or bool(_arg(args, kwargs, 3, "inplace", False))
        elif func is F.relu6:
            lo, hi, inplace = 0.0, 6.0, bool(_arg(args, kwargs, 1, "inplace", False))
        elif name.startswith("clamp_min"):
            lo, hi, inplace = _arg(args, kwargs, 1, "min"), None, name.endswith("_")
        elif name.startswith("clamp_max"):
            lo, hi, inplace = None, _arg(args, kwargs, 1, "max"), name.endswith("_")
        else:
            lo, hi = _arg(args, kwargs, 1, "min"), _arg(args, kwargs, 2, "max")
            inplace = name.endswith("_")
        _check_bounds(op_name(func), "", lo, hi)
        # torch.clamp/clip differentiate to 1 on their bounds, hardtanh/relu6 to 0: the frozen
        # slope at a tie follows, so that W is the autograd gradient there too
        return Call(func, z, {"lo": lo, "hi": hi, "closed": func not in (F.hardtanh, F.hardtanh_, F.relu6)},
                    inplace)

    def onnx_params(self, node):
        lo, hi = node.const(1, "min"), node.const(2, "max")
        lo = node.attr("min") if lo is None else lo
        hi = node.attr("max") if hi is None else hi
        lo, hi = (None if b is None else float(b) for b in (lo, hi))
        _check_bounds(node.op_type, node.name, lo, hi)
        return {"lo": lo, "hi": hi, "closed": False}

    def slope_offset(self, z, p):
        lo, hi, closed = p["lo"], p["hi"], p.get("closed", False)
        inside = torch.ones_like(z, dtype=torch.bool)
        offset = torch.zeros_like(z)
        if lo is not None:
            below = z < lo if closed else z <= lo
            inside &= ~below
            offset = torch.where(below, torch.as_tensor(lo, dtype=z.dtype, device=z.device), offset)
        if hi is not None:
            above = z > hi if closed else z >= hi
            inside &= ~above
            offset = torch.where(above, torch.as_tensor(hi, dtype=z.dtype, device=z.device), offset)
        return inside, offset

    def breakpoints(self, p):
        return [b for b in (p["lo"], p["hi"]) if b is not None]  # "closed" is not a breakpoint

    def backward_signal(self, call):
        """A rectifier (relu) when the lower bound is 0 (ReLU6, clamp(min=0)); else the plain backward."""
        lo = call.params.get("lo")
        return F.relu if lo is not None and bool(torch.all(torch.as_tensor(lo) == 0)) else None


class LeakyReLUGate(ElementwiseGate):
    """LeakyReLU, and RReLU in eval mode: its slope is then fixed, (lower + upper) / 2.
    ONNX LeakyRelu: the slope is its ``alpha`` (default 0.01)."""

    name = "leaky_relu"
    records_frozen = True
    functions = (F.leaky_relu, F.leaky_relu_, F.rrelu, F.rrelu_, torch.rrelu, torch.rrelu_)
    _rrelu = (F.rrelu, F.rrelu_, torch.rrelu, torch.rrelu_)
    onnx_ops = ("LeakyRelu",)

    def onnx_params(self, node):
        return {"a": float(node.attr("alpha", 0.01))}

    def parse(self, func, args, kwargs):
        if func in self._rrelu:
            return self._parse_rrelu(func, args, kwargs)
        slope = _arg(args, kwargs, 1, "negative_slope", 0.01)
        inplace = func is F.leaky_relu_ or bool(_arg(args, kwargs, 2, "inplace", False))
        return Call(func, args[0], {"a": slope}, inplace)

    def _parse_rrelu(self, func, args, kwargs):
        lower, upper = _arg(args, kwargs, 1, "lower", 1.0 / 8), _arg(args, kwargs, 2, "upper", 1.0 / 3)
        if bool(_arg(args, kwargs, 3, "training", False)):
            raise UnsupportedOperationError(
                op_name(func), "", "rrelu with training=True draws random slopes; call it with "
                "training=self.training (in eval mode it is a leaky ReLU, which reconviz freezes)")
        inplace = func in (F.rrelu_, torch.rrelu_) or bool(func is F.rrelu and _arg(args, kwargs, 4, "inplace", False))
        return Call(func, args[0], {"a": (lower + upper) / 2}, inplace)

    def slope_offset(self, z, p):
        return torch.where(z > 0, torch.ones_like(z), torch.full_like(z, p["a"])), None

    def breakpoints(self, p):
        return [0.0]

    def backward_signal(self, call):
        a = float(call.params["a"])
        return lambda g: _leaky(g, a)


class PReLUGate(ElementwiseGate):
    """PReLU: the learned slope a (one per channel, dim 1, or one in all). ONNX PRelu's
    slope (input 1) broadcasts numpy-style (from the last axis): a 1-D one of k > 1
    values is kept as (1, k), and a slope of 2 or more dims is used as it is."""

    name = "prelu"
    records_frozen = True
    functions = (F.prelu, torch.prelu, Tensor.prelu)
    onnx_ops = ("PRelu",)

    def parse(self, func, args, kwargs):
        return Call(func, args[0], {"weight": _arg(args, kwargs, 1, "weight")})

    def onnx_params(self, node):
        a = node.const(1, "slope")
        if a is None:
            raise UnsupportedOperationError(node.op_type, node.name, "it has no slope input")
        a = torch.as_tensor(a)
        return {"weight": a.reshape(1, -1) if a.dim() == 1 and a.numel() > 1 else a}

    def slope_offset(self, z, p):
        a = self._slope(z, p)
        return torch.where(z > 0, torch.ones_like(z), a.expand_as(z)), None

    @staticmethod
    def _slope(z: Tensor, p: dict) -> Tensor:
        """torch's 1-D weight along the channel dim 1; any other shape broadcast as it is."""
        a = p["weight"].detach().to(z.dtype)
        return a.reshape((1, -1) + (1,) * (z.dim() - 2)) if a.dim() == 1 and a.numel() > 1 and z.dim() >= 2 else a

    def backward_signal(self, call):
        a = self._slope(call.z, call.params)
        return lambda g: _leaky(g, a)

    def breakpoints(self, p):
        return [0.0]


class ThresholdGate(ElementwiseGate):
    """F.threshold: z if z > t else v  ->  D = 1[z > t], C = v 1[z <= t]. ONNX
    ThresholdedRelu (z if z > alpha else 0, alpha default 1.0) is t = alpha, v = 0."""

    name = "threshold"
    records_frozen = True
    functions = (F.threshold, F.threshold_, torch.threshold, torch.threshold_)
    onnx_ops = ("ThresholdedRelu",)

    def onnx_params(self, node):
        return {"t": float(node.attr("alpha", 1.0)), "v": 0.0}

    def parse(self, func, args, kwargs):
        t, v = _arg(args, kwargs, 1, "threshold"), _arg(args, kwargs, 2, "value")
        inplace = func in (F.threshold_, torch.threshold_) or bool(
            func is F.threshold and _arg(args, kwargs, 3, "inplace", False)
        )
        return Call(func, args[0], {"t": t, "v": v}, inplace)

    def slope_offset(self, z, p):
        keep = z > p["t"]
        return keep, torch.where(keep, torch.zeros_like(z), torch.full_like(z, p["v"]))

    def breakpoints(self, p):
        return [p["t"]]

    def backward_signal(self, call):
        return F.relu


def _per_row(same: Tensor, prior: Prior, z: Tensor) -> Tensor:
    """(B,) bool from an elementwise comparison: per row for a batched prior, else all or none."""
    return same.flatten(1).all(1) if prior.batched else same.all().expand(z.shape[0])


def _leaky(g: Tensor, a: Any) -> Tensor:
    return torch.where(g > 0, g, g * a)


def _count_equal(z: Tensor, b: Any) -> int:
    """Elements of z equal to the breakpoint b (a number or a broadcastable tensor)."""
    if isinstance(b, (int, float)) and b == 0:
        return z.numel() - int(torch.count_nonzero(z))
    return int((z == b).sum())


def _show(v: Any) -> str:
    return f"{v:g}" if isinstance(v, (int, float)) else "a tensor"


def _check_bounds(op: str, path: str, lo: Any, hi: Any) -> None:
    """UnsupportedOperationError when a clamp's lower bound exceeds its upper bound."""
    if lo is not None and hi is not None and bool(torch.as_tensor(lo > hi).any()):
        raise UnsupportedOperationError(
            op, path, f"its lower bound exceeds its upper bound (min {_show(lo)} > max {_show(hi)}): the op "
            "then returns max everywhere, which is not the clamp reconviz freezes; fix the bounds")


def _detach(v: Any) -> Any:
    return v.detach() if isinstance(v, Tensor) else v


# --------------------------------------------------------------------------
# Max pooling: max over a window -> gather at the recorded switch
# --------------------------------------------------------------------------


def _pool_fns(k: int) -> tuple[Callable, Callable]:
    return (
        getattr(F, f"max_pool{k}d_with_indices"),
        getattr(F, f"adaptive_max_pool{k}d_with_indices"),
    )


class MaxPoolGate(Gate):
    """MaxPool 1d/2d/3d (any kernel, stride, padding, dilation, ceil_mode) and
    AdaptiveMaxPool 1d/2d/3d. The prior is the flat arg-max index of every window
    over the last k (spatial) dims, exactly PyTorch's ``return_indices`` output.

    ONNX MaxPool: the same windows (``onnx_params``; ``padding`` is the leading pad of
    each axis, which is all :meth:`pairwise_ties` needs); reconviz.onnx records the
    switches from the node's own Indices output and counts ties with :meth:`pairwise_ties`."""

    name = "max_pool"
    records_frozen = True
    _dims = {
        f: k
        for k in (1, 2, 3)
        for f in (
            getattr(F, f"max_pool{k}d"), getattr(F, f"max_pool{k}d_with_indices"),
            getattr(F, f"adaptive_max_pool{k}d"), getattr(F, f"adaptive_max_pool{k}d_with_indices"),
            getattr(torch, f"max_pool{k}d", None), getattr(torch, f"max_pool{k}d_with_indices", None),
            getattr(torch, f"adaptive_max_pool{k}d", None),
        )
        if f is not None
    }
    functions = tuple(_dims)
    onnx_ops = ("MaxPool",)

    def onnx_params(self, node):
        if node.attr("storage_order", 0) != 0:
            raise UnsupportedOperationError(node.op_type, node.name,
                                            "storage_order=1 (column-major indices) is not supported")
        kernel = tuple(node.attr("kernel_shape"))
        k = len(kernel)
        ones = (1,) * k
        return {"k": k, "adaptive": False, "kernel_size": kernel, "stride": tuple(node.attr("strides", ones)),
                "padding": tuple(node.attr("pads", (0,) * 2 * k))[:k], "dilation": tuple(node.attr("dilations", ones)),
                "ceil_mode": bool(node.attr("ceil_mode", 0)), "return_indices": False}

    def parse(self, func, args, kwargs):
        k = self._dims[func]
        name = getattr(func, "__name__", "")
        adaptive = "adaptive" in name or func is getattr(F, f"adaptive_max_pool{k}d")
        with_idx = name.endswith("with_indices") or (
            # torch.adaptive_max_poolNd always returns (values, indices)
            adaptive and func is getattr(torch, f"adaptive_max_pool{k}d", None)
        )
        if adaptive:
            params = {"output_size": _arg(args, kwargs, 1, "output_size")}
            ri = _arg(args, kwargs, 2, "return_indices", False)
        else:
            stride = _arg(args, kwargs, 2, "stride", None)
            params = {
                "kernel_size": _arg(args, kwargs, 1, "kernel_size"),
                "stride": stride if stride not in (None, [], ()) else None,
                "padding": _arg(args, kwargs, 3, "padding", 0),
                "dilation": _arg(args, kwargs, 4, "dilation", 1),
                "ceil_mode": bool(_arg(args, kwargs, 5, "ceil_mode", False)),
            }
            ri = _arg(args, kwargs, 6, "return_indices", False)
        params.update(k=k, adaptive=adaptive, return_indices=bool(with_idx or ri))
        return Call(func, args[0], params)

    def record(self, call, n):
        p = call.params
        z = call.z.detach()
        out, idx = _pool(z, p)
        params = dict(p, in_spatial=tuple(z.shape[-p["k"]:]))
        size = math.prod(params["in_spatial"])
        if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= size):
            raise InputError(
                f"a max-pool window (kernel {p.get('kernel_size')}, stride {p.get('stride')}, padding "
                f"{p.get('padding')}, dilation {p.get('dilation')}) on an input of spatial shape "
                f"{params['in_spatial']} lies entirely in the padding: its output is -inf and it has no "
                "switch to freeze; use a smaller padding or dilation"
            )
        ties = self._ties(z, idx, out, params)
        # continue with the gather at the switch (the frozen form): the same values as `out`
        return self._frozen(call.z, idx, params), {"index": idx}, params, ties

    def apply(self, prior, call):
        self.check_shape(prior, call.z)
        z, idx = call.z, prior.tensors["index"]
        if prior.batched and z.shape[0] != idx.shape[0]:
            r = z.shape[0] // idx.shape[0]
            idx = idx.unsqueeze(0).expand(r, *idx.shape).flatten(0, 1)
        return self._frozen(z, idx, prior.params)

    @staticmethod
    def _frozen(z: Tensor, idx: Tensor, p: dict) -> Any:
        """max_w z -> z[switch_w]: a gather of the flat spatial index."""
        k = p["k"]
        out = z.flatten(-k).gather(-1, idx.flatten(-k)).view(idx.shape)
        return (out, idx) if p["return_indices"] else out

    # region geometry ------------------------------------------------------
    def _window_table(self, p: dict, out_spatial: tuple[int, ...]) -> tuple[Tensor, Tensor]:
        """(L_out, K) flat input positions of every window member, and a validity mask."""
        per_dim = []
        for d, (size, n_out) in enumerate(zip(p["in_spatial"], out_spatial)):
            o = torch.arange(n_out)
            if p["adaptive"]:
                start = (o * size) // n_out
                end = -((-(o + 1) * size) // n_out)
                width = int((end - start).max())
                pos = start[:, None] + torch.arange(width)[None, :]
                valid = pos < end[:, None]
            else:
                kern, stride, pad, dil = (
                    _tup(p["kernel_size"], p["k"])[d],
                    _tup(p["stride"] or p["kernel_size"], p["k"])[d],
                    _tup(p["padding"], p["k"])[d],
                    _tup(p["dilation"], p["k"])[d],
                )
                pos = o[:, None] * stride - pad + torch.arange(kern)[None, :] * dil
                valid = (pos >= 0) & (pos < size)
            per_dim.append((pos.clamp(0, size - 1), valid))
        strides = [math.prod(p["in_spatial"][d + 1 :]) for d in range(len(per_dim))]
        flat, mask = torch.zeros((), dtype=torch.long), torch.ones((), dtype=torch.bool)
        for d, (pos, valid) in enumerate(per_dim):
            # broadcast dim d's (O_d, K_d) table into the joint (O_1..O_k, K_1..K_k) grid
            shape = [1] * (2 * len(per_dim))
            shape[d], shape[len(per_dim) + d] = pos.shape
            flat = flat + (pos * strides[d]).reshape(shape)
            mask = mask & valid.reshape(shape)
        n_out = math.prod(out_spatial)
        return flat.reshape(n_out, -1), mask.reshape(n_out, -1)

    def _pairs(self, z: Tensor, idx: Tensor, p: dict) -> tuple[Tensor, Tensor]:
        """h = z[switch] - z[member] for every (window, member), and which pairs count."""
        k = p["k"]
        table, valid = self._window_table(p, tuple(idx.shape[-k:]))
        table, valid = table.to(z.device), valid.to(z.device)
        zf = z.flatten(-k)  # (..., L)
        fi = idx.flatten(-k)  # (..., L_out)
        members = zf[..., table]  # (..., L_out, K)
        best = zf.gather(-1, fi).unsqueeze(-1)
        counted = valid & (table != fi.unsqueeze(-1))
        return best - members, counted

    def _ties(self, z: Tensor, idx: Tensor, out: Tensor, p: dict) -> int:
        """Windows in which another member equals the max (``out``).

        Disjoint windows (the usual pooling): mask every switch with -inf and pool again;
        a window ties when its second-best equals its max. Overlapping windows: compare
        every (window, member) pair."""
        k, out_spatial = p["k"], tuple(idx.shape[-p["k"]:])
        if _disjoint(p, out_spatial):
            masked = z.flatten(-k).scatter(-1, idx.flatten(-k), -math.inf).view_as(z)
            return int(((_pool(masked, p)[0] == out) & (out > -math.inf)).sum())
        return self.pairwise_ties(z, idx, p)

    def pairwise_ties(self, z: Tensor, idx: Tensor, p: dict) -> int:
        """Windows in which a member other than the switch equals it, by comparing every
        (window, member) pair: any geometry (``padding`` is the leading pad of each axis)."""
        h, counted = self._pairs(z, idx, p)
        return int(((h == 0) & counted).any(-1).sum().item())

    def features(self, prior, z):
        idx = prior.tensors["index"]
        if prior.batched and z.shape[0] != idx.shape[0]:
            idx = idx.unsqueeze(0).expand(z.shape[0] // idx.shape[0], *idx.shape).flatten(0, 1)
        h, _ = self._pairs(z, idx, prior.params)
        return h.flatten(1)

    def face_sign(self, prior, z, probe, feature):
        return -1.0  # h = z[switch] - z[member] >= 0 shrinks to the face

    def backward_signal(self, call):
        return None  # the signal goes back through the switches (Zeiler & Fergus's unpooling)

    def same_choice(self, prior, z):
        return _per_row(_pool(z.detach(), prior.params)[1] == prior.tensors["index"], prior, z)

    def connectivity(self, call):
        """The average over the same windows (adaptive: adaptive average pooling)."""
        p, ref = call.params, call.original()
        z = call.z
        k = p["k"]
        unbatched = z.dim() == k + 1
        x = z.unsqueeze(0) if unbatched else z
        out_size = tuple((ref[0] if isinstance(ref, tuple) else ref).shape[-k:])
        if p["adaptive"]:
            y = getattr(F, f"adaptive_avg_pool{k}d")(x, out_size)
        else:
            y = _window_average(x, p, out_size)
        y = y.squeeze(0) if unbatched else y
        return (y, *ref[1:]) if isinstance(ref, tuple) else y

    def margins(self, prior, z):
        h, counted = self._pairs(z, prior.tensors["index"], prior.params)
        return torch.where(counted, h.abs(), torch.full_like(h, math.inf)).flatten(1)


def _pool(z: Tensor, p: dict) -> tuple[Tensor, Tensor]:
    """(max values, flat arg-max indices) of the pooling ``p`` on ``z``."""
    pooled, adaptive_pooled = _pool_fns(p["k"])
    if p["adaptive"]:
        return adaptive_pooled(z, p["output_size"])
    return pooled(z, p["kernel_size"], p["stride"], p["padding"], p["dilation"], p["ceil_mode"])


def _window_average(x: Tensor, p: dict, out_size: tuple[int, ...]) -> Tensor:
    """Mean over each max-pool window (padding counted as 0; ceil_mode windows padded at the end)."""
    k = p["k"]
    kern, pad, dil = _tup(p["kernel_size"], k), _tup(p["padding"], k), _tup(p["dilation"], k)
    stride = _tup(p["stride"] or p["kernel_size"], k)
    extra = [max(0, (o - 1) * s + d * (w - 1) + 1 - (n + 2 * q))
             for o, s, d, w, n, q in zip(out_size, stride, dil, kern, x.shape[-k:], pad)]
    end_pad = [v for e in reversed(extra) for v in (0, e)]
    c = x.shape[1]
    weight = torch.full((c, 1, *kern), 1.0 / math.prod(kern), dtype=x.dtype, device=x.device)
    conv = getattr(F, f"conv{k}d")
    y = conv(F.pad(x, end_pad), weight, stride=stride, padding=pad, dilation=dil, groups=c)
    return y[(Ellipsis, *[slice(0, o) for o in out_size])]


def _disjoint(p: dict, out_spatial: tuple[int, ...]) -> bool:
    """No input position lies in two windows (stride >= dilated kernel; adaptive: exact split)."""
    k = p["k"]
    if p["adaptive"]:
        return all(size % o == 0 for size, o in zip(p["in_spatial"], out_spatial))
    kern, dil = _tup(p["kernel_size"], k), _tup(p["dilation"], k)
    stride = _tup(p["stride"] or p["kernel_size"], k)
    return all(s >= d * (w - 1) + 1 for s, d, w in zip(stride, dil, kern))


def _tup(v: Any, k: int) -> tuple[int, ...]:
    if isinstance(v, int):
        return (v,) * k
    v = tuple(v)
    return v * k if len(v) == 1 else v


# --------------------------------------------------------------------------
# Registry
# --------------------------------------------------------------------------

GATES: list[Gate] = [ReLUGate(), ClampGate(), LeakyReLUGate(), PReLUGate(), ThresholdGate(), MaxPoolGate()]
_BY_FUNC: dict[Any, Gate] = {}
_BY_ONNX: dict[str, Gate] = {}
_BY_NAME: dict[str, Gate] = {}


def register_gate(gate: Gate) -> Gate:
    """Add a gate type (its torch functions and its ONNX op types then route to it; later
    registrations win). Returns the gate.

    To add one for a block of code only, use :func:`reconviz.ops.registered`."""
    if not isinstance(gate, Gate):
        raise InputError(f"register_gate takes a reconviz.Gate instance, got {type(gate).__name__}")
    if gate.name in _BY_NAME and _BY_NAME[gate.name] is not gate:
        raise InputError(f"a gate named {gate.name!r} is already registered: choose another name")
    if isinstance(gate.onnx_ops, str) or not all(isinstance(o, str) and o for o in gate.onnx_ops):
        raise InputError(f"gate {gate.name!r}: onnx_ops must be a tuple of ONNX op type names, got {gate.onnx_ops!r}")
    _BY_NAME[gate.name] = gate
    for f in gate.functions:
        _BY_FUNC[f] = gate
    for op_type in gate.onnx_ops:
        _BY_ONNX[op_type] = gate
    if gate not in GATES:
        GATES.append(gate)
    return gate


for _g in list(GATES):
    register_gate(_g)


def gate_for(func: Callable) -> Gate | None:
    try:
        return _BY_FUNC.get(func)
    except TypeError:  # unhashable callables are never gates
        return None


def gate_for_onnx(op_type: str) -> Gate | None:
    """The registered gate that freezes ONNX nodes of ``op_type`` (its ``onnx_ops``), or None."""
    return _BY_ONNX.get(op_type)


def registered_gates() -> tuple[Gate, ...]:
    """The gates registered now (built-in first), as a tuple: register with
    :func:`register_gate` or :func:`reconviz.ops.registered`, never by editing a list."""
    return tuple(GATES)


def gate_named(name: str) -> Gate:
    return _BY_NAME[name]


def gate_function_names() -> set[str]:
    """Names of the gated functions (relu, clamp, max_pool2d, ...), without a trailing '_'."""
    return {getattr(f, "__name__", "").rstrip("_") for f in _BY_FUNC} - {""}


def snapshot() -> tuple:
    """The registry's state, for :func:`restore`."""
    return list(GATES), dict(_BY_FUNC), dict(_BY_ONNX), dict(_BY_NAME)


def restore(state: tuple) -> None:
    """Put the registry back as :func:`snapshot` found it."""
    gates, *tables = state
    GATES[:] = gates
    for table, saved in zip((_BY_FUNC, _BY_ONNX, _BY_NAME), tables):
        table.clear()
        table.update(saved)

