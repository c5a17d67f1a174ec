"""The "value" linearization's gates: smooth operations frozen at their value at x0.

Each class is one op family. Every gate here is *point-exact* (``region_exact =
False``): its frozen form equals the op at the probe, and nowhere else in general, so W is a faithful template but not the
Jacobian, and the certified radius is 0. The probe continues with the op's own output
(``records_frozen = False``), so the exactness check compares W x0 + b with the model's
own f(x0). Frozen forms, with z0 the gated tensor at the probe::

    z * g(z)      SiLU (g = sigmoid), GELU (g = Phi, erf or tanh form), Hardswish
                  (g = relu6(z + 3) / 6), Mish (g = tanh(softplus z))   ->  z * g(z0)
    phi(z)        sigmoid, tanh, erf, softplus, ELU / SELU / CELU: the secant through 0,
                  phi(0) + s * z,  s = (phi(z0) - phi(0)) / z0  (phi'(0) where z0 = 0)
    hardsigmoid   clamp(z / 6 + 1/2, 0, 1) -> its linear piece at z0: D = 1/6 on (-3, 3), else 0
    softmax       its value at x0 (a constant): legal only as a factor (attention weights)
    attention     scaled_dot_product_attention(q, k, v) -> A0 @ v,  A0 = softmax(q k^T s + mask) at x0
    norms         layer / group / instance / RMS norm, F.normalize: the centring stays, the
                  divisor is frozen: (z - mean z) * rstd(z0) * w + b

Outputs of the saturating gates (sigmoid, tanh, hardsigmoid, softmax) are *factors*: where
they multiply another input-dependent tensor they are frozen at their value
(:mod:`reconviz.ops.factors`).
"""

from __future__ import annotations

import math
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from ..errors import UnsupportedOperationError
from .base import arg, op_name
from .gates import Call, ElementwiseGate, Gate, register_gate, tile_probes

__all__ = [
    "ValueGate", "SelfGatedGate", "SiLUGate", "GELUGate", "HardswishGate", "MishGate", "SecantGate",
    "SigmoidGate", "TanhGate", "ErfGate", "SoftplusGate", "ELUGate", "HardsigmoidGate", "SoftmaxGate",
    "AttentionGate", "NormGate", "LayerNormGate", "GroupNormGate", "InstanceNormGate", "RMSNormGate",
    "NormalizeGate", "SMOOTH_GATES",
]


def _inplace(func: Callable, args: tuple, kwargs: dict, i: int) -> bool:
    """An in-place form: a name ending in '_' or ``inplace=True`` (argument ``i``)."""
    name = getattr(func, "__name__", "")
    return (name.endswith("_") and not name.endswith("__")) or bool(arg(args, kwargs, i, "inplace", False))


class ValueGate(ElementwiseGate):
    """A smooth elementwise op frozen at its value at the probe: D z + C with D, C read off
    z0 (point-exact: no breakpoints, no region). ``inplace_arg``: position of ``inplace``."""

    region_exact = False
    inplace_arg = 1

    def parse(self, func, args, kwargs):
        return Call(func, args[0], self.params(args, kwargs), _inplace(func, args, kwargs, self.inplace_arg))

    def params(self, args: tuple, kwargs: dict) -> dict[str, Any]:
        return {}

    def onnx_params(self, node: Any) -> dict[str, Any]:
        return {}

    def breakpoints(self, p):
        return []

    def backward_signal(self, call):
        return None  # not a rectifier: guided backprop and deconvnet use the ordinary backward


class SelfGatedGate(ValueGate):
    """z * g(z) -> z * g(z0): the gate g is frozen, the contribution stays with z."""

    def g(self, z: Tensor, p: dict) -> Tensor:
        raise NotImplementedError

    def slope_offset(self, z, p):
        return self.g(z, p), None


class SiLUGate(SelfGatedGate):
    """SiLU / Swish: z * sigmoid(z) -> z * sigmoid(z0)."""

    name = "silu"
    functions = (F.silu,)

    def g(self, z, p):
        return torch.sigmoid(z)


class GELUGate(SelfGatedGate):
    """GELU: z * Phi(z) -> z * Phi(z0); Phi = (1 + erf(z / sqrt 2)) / 2, or with
    ``approximate="tanh"``, (1 + tanh(sqrt(2 / pi) (z + 0.044715 z^3))) / 2."""

    name = "gelu"
    functions = (F.gelu,)
    onnx_ops = ("Gelu",)

    def params(self, args, kwargs):
        return {"approximate": arg(args, kwargs, 1, "approximate", "none")}

    def onnx_params(self, node):
        approximate = node.attr("approximate", b"none")
        return {"approximate": approximate.decode() if isinstance(approximate, bytes) else approximate}

    def g(self, z, p):
        if p["approximate"] == "tanh":
            return 0.5 * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (z + 0.044715 * z**3)))
        return 0.5 * (1.0 + torch.erf(z / math.sqrt(2.0)))


class HardswishGate(SelfGatedGate):
    """Hardswish: z * relu6(z + 3) / 6 -> z * relu6(z0 + 3) / 6."""

    name = "hardswish"
    functions = (F.hardswish,)
    onnx_ops = ("HardSwish",)

    def g(self, z, p):
        return F.relu6(z + 3.0) / 6.0


class MishGate(SelfGatedGate):
    """Mish: z * tanh(softplus(z)) -> z * tanh(softplus(z0))."""

    name = "mish"
    functions = (F.mish,)
    onnx_ops = ("Mish",)

    def g(self, z, p):
        return torch.tanh(F.softplus(z))


class SecantGate(ValueGate):
    """A saturating phi whose output flows on additively: its secant through 0,
    phi(z) -> phi(0) + s z with s = (phi(z0) - phi(0)) / z0, and s = phi'(0) where z0 = 0.
    ``function`` is phi and ``derivative_at_zero`` phi'(0) (or override the two methods)."""

    function: Callable[[Tensor], Tensor]
    derivative_at_zero: float = 1.0

    def phi(self, z: Tensor, p: dict) -> Tensor:
        return type(self).function(z)

    def slope_at_zero(self, p: dict) -> float:
        return self.derivative_at_zero

    def slope_offset(self, z, p):
        at0 = self.phi(torch.zeros((), dtype=z.dtype, device=z.device), p)
        zero = z == 0
        s = (self.phi(z, p) - at0) / torch.where(zero, torch.ones_like(z), z)
        return torch.where(zero, torch.full_like(z, self.slope_at_zero(p)), s), at0


class SigmoidGate(SecantGate):
    """sigmoid: 1/2 + s z (sigmoid'(0) = 1/4); its output is a factor (squeeze-excitation scales)."""

    name, factor, function, derivative_at_zero = "sigmoid", True, torch.sigmoid, 0.25
    onnx_ops = ("Sigmoid",)
    functions = (torch.sigmoid, torch.sigmoid_, Tensor.sigmoid, Tensor.sigmoid_, torch.special.expit)


class TanhGate(SecantGate):
    """tanh: s z (tanh(0) = 0, tanh'(0) = 1); its output is a factor (a tanh gate)."""

    name, factor, function = "tanh", True, torch.tanh
    onnx_ops = ("Tanh",)
    functions = (torch.tanh, torch.tanh_, Tensor.tanh, Tensor.tanh_)


class ErfGate(SecantGate):
    """erf: s z (erf(0) = 0, erf'(0) = 2 / sqrt(pi))."""

    name, function, derivative_at_zero = "erf", torch.erf, 2.0 / math.sqrt(math.pi)
    onnx_ops = ("Erf",)
    functions = (torch.erf, torch.erf_, Tensor.erf, Tensor.erf_, torch.special.erf)


class SoftplusGate(SecantGate):
    """softplus(z; beta, threshold): log(2) / beta + s z (softplus'(0) = 1/2)."""

    name = "softplus"
    functions = (F.softplus,)
    onnx_ops = ("Softplus",)  # log(1 + exp z): beta 1; torch's threshold 20 is below float32's resolution

    def params(self, args, kwargs):
        return {"beta": arg(args, kwargs, 1, "beta", 1.0), "threshold": arg(args, kwargs, 2, "threshold", 20.0)}

    def onnx_params(self, node):
        return {"beta": 1.0, "threshold": 20.0}

    def phi(self, z, p):
        return F.softplus(z, p["beta"], p["threshold"])

    def slope_at_zero(self, p):
        return 0.5


class ELUGate(SecantGate):
    """ELU, SELU, CELU: scale * (z if z > 0 else alpha (exp(z / c) - 1)); phi(0) = 0, and the
    slope at z0 = 0 is the right derivative, ``scale``."""

    name = "elu"
    _forms = {
        F.elu: ("alpha", 1), F.elu_: ("alpha", 1), torch.selu: (None, 1), torch.selu_: (None, 1),
        F.selu: (None, 1), F.selu_: (None, 1), F.celu: ("alpha", 1), F.celu_: ("alpha", 1),
        torch.celu: ("alpha", 1), torch.celu_: ("alpha", 1),
    }
    functions = tuple(_forms)
    onnx_ops = ("Elu", "Selu", "Celu")
    _SELU = (1.6732632423543772848170429916717, 1.0507009873554804934193349852946)

    def onnx_params(self, node):
        if node.op_type == "Selu":
            return {"func": F.elu, "alpha": float(node.attr("alpha", 1.67326319217681884765625)),
                    "scale": float(node.attr("gamma", 1.05070102214813232421875))}
        return {"func": F.celu if node.op_type == "Celu" else F.elu, "alpha": float(node.attr("alpha", 1.0)),
                "scale": 1.0}

    def parse(self, func, args, kwargs):
        alpha_name, i = self._forms[func]
        name = getattr(func, "__name__", "")
        if alpha_name is None:  # selu: fixed alpha and scale
            p, inplace_at = {"func": F.elu, "alpha": self._SELU[0], "scale": self._SELU[1]}, 1
        else:
            p = {"func": F.celu if "celu" in name else F.elu, "alpha": arg(args, kwargs, i, "alpha", 1.0), "scale": 1.0}
            inplace_at = 2
        return Call(func, args[0], p, _inplace(func, args, kwargs, inplace_at))

    def phi(self, z, p):
        return p["scale"] * p["func"](z, p["alpha"])

    def slope_at_zero(self, p):
        return p["scale"]


class HardsigmoidGate(ElementwiseGate):
    """hardsigmoid = clamp(z / 6 + 1/2, 0, 1), frozen as its linear piece at z0: D = 1/6
    1[-3 < z0 < 3], C = 1/2 inside, 0 at or below -3, 1 at or above 3. Its output is a factor
    (squeeze-excitation scales). Labelled point-exact although the piece holds on a region:
    torch differentiates hardsigmoid with a float32 1/6, so no W can be both exact and the
    autograd Jacobian there to 1e-9. The probe continues with the op's own value."""

    name = "hardsigmoid"
    factor = True
    region_exact = False
    functions = (F.hardsigmoid,)
    onnx_ops = ("HardSigmoid",)  # clip(alpha z + beta, 0, 1): alpha 0.2 and beta 0.5 by default

    def parse(self, func, args, kwargs):
        return Call(func, args[0], {}, _inplace(func, args, kwargs, 1))

    def onnx_params(self, node):
        return {"alpha": float(node.attr("alpha", 0.2)), "beta": float(node.attr("beta", 0.5))}

    def slope_offset(self, z, p):
        if "alpha" in p:  # the ONNX form
            y = p["alpha"] * z + p["beta"]
            inside = (y > 0) & (y < 1)
            offset = torch.where(inside, torch.full_like(z, p["beta"]), (y >= 1).to(z.dtype))
            return inside.to(z.dtype) * p["alpha"], offset
        inside = (z > -3.0) & (z < 3.0)
        offset = torch.where(inside, torch.full_like(z, 0.5), (z >= 3.0).to(z.dtype))
        return inside.to(z.dtype) / 6.0, offset

    def breakpoints(self, p):
        return []  # point-exact: no region is claimed


class RecordedValueGate(Gate):
    """A gate frozen at its whole output at x0 (or a matrix of it): ``record`` keeps
    ``tensors``, ``apply`` tiles them over the replay batch (:func:`tile_probes`)."""

    region_exact = False

    def record(self, call, n):
        out = call.original()
        return out, self.frozen_tensors(call, out), self.kept_params(call), 0

    def frozen_tensors(self, call: Call, out: Any) -> dict[str, Tensor]:
        raise NotImplementedError

    def kept_params(self, call: Call) -> dict[str, Any]:
        return {k: v.detach() if isinstance(v, Tensor) else v for k, v in call.params.items()}

    def backward_signal(self, call):
        return None  # not a rectifier: the ordinary backward

    def connectivity(self, call):
        return call.original()  # the op as written (it connects what it reads)


class SoftmaxGate(RecordedValueGate):
    """softmax(z, dim) -> its value at x0, a constant. Its output is a factor only: where it
    multiplies another input-dependent tensor (attention weights times values) it is frozen;
    anywhere else (a softmax whose output is added, or returned) it is refused."""

    name = "softmax"
    factor = factor_only = True
    records_frozen = True  # the probe continues with the recorded value itself
    functions = (F.softmax, torch.softmax, Tensor.softmax, torch.special.softmax)

    def parse(self, func, args, kwargs):
        dim = arg(args, kwargs, 1, "dim")
        if dim is None:
            raise UnsupportedOperationError(op_name(func), "", "softmax without dim picks an axis implicitly; "
                                            "pass dim explicitly")
        dtype = kwargs.get("dtype", args[3] if func is F.softmax and len(args) > 3 else None)
        if dtype is not None and torch.finfo(dtype).eps > torch.finfo(args[0].dtype).eps:
            raise UnsupportedOperationError(op_name(func), "", f"it computes in {dtype}, less precise than "
                                            "its input: the result would be exact to that rounding only")
        return Call(func, args[0], {"dim": dim})

    def frozen_tensors(self, call, out):
        return {"value": out.detach()}

    def apply(self, prior, call):
        return tile_probes(prior.tensors["value"], call.z.shape).clone()


class AttentionGate(RecordedValueGate):
    """scaled_dot_product_attention(q, k, v) -> A0 @ v, A0 = softmax(q k^T * scale + mask) at
    x0 (linear in v; q and k only set A0). Dropout (dropout_p > 0) and enable_gqa are refused."""

    name = "attention"
    functions = (F.scaled_dot_product_attention,)

    def parse(self, func, args, kwargs):
        if arg(args, kwargs, 4, "dropout_p", 0.0):
            raise UnsupportedOperationError(op_name(func), "", "dropout_p > 0 drops random attention weights; "
                                            "pass dropout_p=self.p if self.training else 0.0")
        if kwargs.get("enable_gqa", False):
            raise UnsupportedOperationError(op_name(func), "", "enable_gqa=True is not supported yet; repeat "
                                            "the key and value heads (repeat_interleave) before the call")
        # q and k only set the frozen weights, so they may depend on the input: not params
        return Call(func, arg(args, kwargs, 2, "value"), {
            "attn_mask": arg(args, kwargs, 3, "attn_mask"), "is_causal": bool(arg(args, kwargs, 5, "is_causal", False)),
            "scale": arg(args, kwargs, 6, "scale")})

    def frozen_tensors(self, call, out):
        p = call.params
        q, k = (arg(call.args, call.kwargs, i, n).detach() for i, n in ((0, "query"), (1, "key")))
        scale = 1.0 / math.sqrt(q.shape[-1]) if p["scale"] is None else p["scale"]
        scores = (q @ k.transpose(-2, -1)) * scale
        if p["is_causal"]:
            keep = torch.ones(scores.shape[-2:], dtype=torch.bool, device=q.device).tril()
            scores = scores.masked_fill(~keep, -math.inf)
        mask = p["attn_mask"]
        if mask is not None:
            scores = scores.masked_fill(~mask, -math.inf) if mask.dtype == torch.bool else scores + mask
        return {"weights": torch.softmax(scores, dim=-1)}

    def apply(self, prior, call):
        v = call.z
        a = prior.tensors["weights"]
        return tile_probes(a, (*v.shape[:-2], a.shape[-2], v.shape[-2])) @ v


class NormGate(RecordedValueGate):
    """A normalization: the centring (if any) stays, the divisor is frozen at x0,
    (z - mean z) * r0 * w + b, with r0 = 1 / sigma(z0). Subclasses give the statistic's
    axes (``center`` and ``inverse``) and the affine weight and bias (``finish``)."""

    def inverse(self, z: Tensor, p: dict) -> Tensor:
        """1 / sigma at z, broadcastable against :meth:`grouped` z."""
        raise NotImplementedError

    def center(self, z: Tensor, p: dict) -> Tensor:
        """z minus its mean over the statistic's axes (grouped); identity when not centred."""
        raise NotImplementedError

    def grouped(self, z: Tensor, p: dict) -> Tensor:
        return z

    def finish(self, y: Tensor, z: Tensor, p: dict) -> Tensor:
        """The normalized y (grouped) back to z's shape, times the weight, plus the bias."""
        return _affine(y.reshape(z.shape), p.get("weight"), p.get("bias"), self.channel_dim(z))

    def channel_dim(self, z: Tensor) -> int | None:
        return None  # weight and bias broadcast from the last dims

    def frozen_tensors(self, call, out):
        return {"inverse": self.inverse(self.grouped(call.z.detach(), call.params), call.params)}

    def apply(self, prior, call):
        z, p = call.z, prior.params
        zg = self.grouped(z, p)
        r = prior.tensors["inverse"]
        return self.finish(self.center(zg, p) * tile_probes(r, _broadcast_shape(r, zg)), z, p)


def _broadcast_shape(r: Tensor, z: Tensor) -> tuple[int, ...]:
    """The shape of r over a replay batch of z: z's size where r is not 1."""
    return tuple(a if b != 1 else 1 for a, b in zip(z.shape, r.shape))


def _affine(y: Tensor, weight: Tensor | None, bias: Tensor | None, channel_dim: int | None) -> Tensor:
    """y * weight + bias, per channel (dim ``channel_dim``) or broadcast from the last dims."""
    def shaped(t: Tensor) -> Tensor:
        if channel_dim is None:
            return t
        return t.reshape((-1,) + (1,) * (y.dim() - channel_dim - 1))

    if weight is not None:
        y = y * shaped(weight)
    return y + shaped(bias) if bias is not None else y


class _LastDims(NormGate):
    """Statistics over the last ``len(normalized_shape)`` dims."""

    def dims(self, p: dict) -> tuple[int, ...]:
        return tuple(range(-len(p["normalized_shape"]), 0))

    def params_of(self, args: tuple, kwargs: dict, eps_default: Any) -> dict[str, Any]:
        shape = arg(args, kwargs, 1, "normalized_shape")
        return {"normalized_shape": (shape,) if isinstance(shape, int) else tuple(shape),
                "weight": arg(args, kwargs, 2, "weight"), "bias": arg(args, kwargs, 3, "bias"),
                "eps": arg(args, kwargs, 4, "eps", eps_default)}


class LayerNormGate(_LastDims):
    """layer_norm: (z - mean z) * rstd(z0) * w + b over the last dims,
    rstd = 1 / sqrt(var + eps) (biased variance)."""

    name = "layer_norm"
    functions = (F.layer_norm, torch.layer_norm)

    def parse(self, func, args, kwargs):
        return Call(func, args[0], self.params_of(args, kwargs, 1e-5))

    def center(self, z, p):
        return z - z.mean(self.dims(p), keepdim=True)

    def inverse(self, z, p):
        return torch.rsqrt(z.var(self.dims(p), unbiased=False, keepdim=True) + p["eps"])


class RMSNormGate(_LastDims):
    """rms_norm: z * rrms(z0) * w, rrms = 1 / sqrt(mean(z^2) + eps) over the last dims (no centring)."""

    name = "rms_norm"
    functions = tuple(f for f in (getattr(F, "rms_norm", None), getattr(torch, "rms_norm", None)) if f is not None)

    def parse(self, func, args, kwargs):
        p = self.params_of(args, kwargs, None)
        p["eps"], p["bias"] = arg(args, kwargs, 3, "eps", None), None
        return Call(func, args[0], p)

    def center(self, z, p):
        return z

    def inverse(self, z, p):
        eps = torch.finfo(z.dtype).eps if p["eps"] is None else p["eps"]
        return torch.rsqrt(z.pow(2).mean(self.dims(p), keepdim=True) + eps)


class GroupNormGate(NormGate):
    """group_norm over (N, G, C/G * spatial): (z - mean) * rstd(z0), then w, b per channel."""

    name = "group_norm"
    functions = (F.group_norm, torch.group_norm)

    def parse(self, func, args, kwargs):
        return Call(func, args[0], {"groups": arg(args, kwargs, 1, "num_groups"), "weight": arg(args, kwargs, 2, "weight"),
                                    "bias": arg(args, kwargs, 3, "bias"), "eps": arg(args, kwargs, 4, "eps", 1e-5)})

    def grouped(self, z, p):
        return z.reshape(z.shape[0], p["groups"], -1)

    def center(self, z, p):
        return z - z.mean(-1, keepdim=True)

    def inverse(self, z, p):
        return torch.rsqrt(z.var(-1, unbiased=False, keepdim=True) + p["eps"])

    def channel_dim(self, z):
        return 1


class InstanceNormGate(GroupNormGate):
    """instance_norm with input statistics (no running statistics): group norm with one
    group per channel, (N, C, spatial). With running statistics in eval mode it is affine
    (the op registry's EvalOnly rule)."""

    name = "instance_norm"
    functions = (F.instance_norm, torch.instance_norm)

    def applies(self, func, args, kwargs):
        return bool(arg(args, kwargs, 5, "use_input_stats", True))

    def parse(self, func, args, kwargs):
        if arg(args, kwargs, 1, "running_mean") is not None or arg(args, kwargs, 2, "running_var") is not None:
            raise UnsupportedOperationError(op_name(func), "", "instance norm with input statistics and running "
                                            "statistics updates the running statistics at every call; use "
                                            "track_running_stats=False, or eval mode with running statistics")
        z = args[0]
        return Call(func, z, {"groups": z.shape[1], "weight": arg(args, kwargs, 3, "weight"),
                              "bias": arg(args, kwargs, 4, "bias"), "eps": arg(args, kwargs, 7, "eps", 1e-5)})


class NormalizeGate(NormGate):
    """F.normalize: z / max(|z|_p, eps) along dim -> z / d0, the norm frozen at x0."""

    name = "normalize"
    functions = (F.normalize,)

    def parse(self, func, args, kwargs):
        if arg(args, kwargs, 4, "out") is not None:
            raise UnsupportedOperationError(op_name(func), "", "normalize(out=...) writes into a tensor; "
                                            "use the returned value")
        return Call(func, args[0], {"p": arg(args, kwargs, 1, "p", 2.0), "dim": arg(args, kwargs, 2, "dim", 1),
                                    "eps": arg(args, kwargs, 3, "eps", 1e-12)})

    def center(self, z, p):
        return z

    def inverse(self, z, p):
        return 1.0 / torch.linalg.vector_norm(z, p["p"], p["dim"], keepdim=True).clamp_min(p["eps"])


SMOOTH_GATES: list[Gate] = [
    SiLUGate(), GELUGate(), HardswishGate(), MishGate(), SigmoidGate(), TanhGate(), ErfGate(), SoftplusGate(),
    ELUGate(), HardsigmoidGate(), SoftmaxGate(), AttentionGate(), LayerNormGate(), GroupNormGate(),
    InstanceNormGate(), RMSNormGate(), NormalizeGate(),
]

for _g in SMOOTH_GATES:
    register_gate(_g)
