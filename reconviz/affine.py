"""Affine ops that the gate modes run with a leaner backward of the same value.

An eval-mode batch norm is a per-channel affine map,

    y = (z - mean) / sqrt(var + eps) * gamma + beta,    dy/dz = gamma / sqrt(var + eps),

but PyTorch's CPU kernel for its backward (``native_batch_norm_backward``) costs
about five times an elementwise product. Inside the probe and the replay,
:func:`call` runs it as :class:`EvalBatchNorm`: the forward is PyTorch's own
kernel (bit for bit the model's values), the backward the one product above
(PyTorch's input gradient to one rounding: it forms (grad * invstd) * gamma). The reverse-mode solve then pays for
a batch norm what it pays for a ReLU. Nothing else changes; other ops run as
written.
"""

from __future__ import annotations

from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["call", "EvalBatchNorm", "LEAN_MIN_NUMEL"]

# below this many elements the kernel is cheap and a Python-level backward's fixed cost
# (~50 us a call) is not: the digits CNN's batch norms hold 1,024 elements per probe
LEAN_MIN_NUMEL = 2**15


class EvalBatchNorm(torch.autograd.Function):
    """F.batch_norm with running statistics (eval mode), differentiated in z only.

    In the setup_context form, with a generated vmap rule and a forward-mode rule,
    so that torch.func transforms (jacrev, vjp, jvp, vmap) work through it."""

    generate_vmap_rule = True

    @staticmethod
    def forward(z: Tensor, mean: Tensor, var: Tensor, weight: Tensor | None, bias: Tensor | None,
                eps: float) -> Tensor:
        return F.batch_norm(z, mean, var, weight, bias, False, 0.0, eps)

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple, output: Tensor) -> None:
        z, _, var, weight, _, eps = inputs
        ctx.scale = _scale(var, weight, eps, z.dim())

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:
        return grad * ctx.scale, None, None, None, None, None

    @staticmethod
    def jvp(ctx: Any, tangent: Tensor, *_: Any) -> Tensor:
        return tangent * ctx.scale


def _scale(var: Tensor, weight: Tensor | None, eps: float, dim: int) -> Tensor:
    """gamma / sqrt(var + eps), shaped (1, C, 1, ...) for an input of ``dim`` dims."""
    scale = torch.rsqrt(var + eps)
    if weight is not None:
        scale = scale * weight
    return scale.reshape((1, -1) + (1,) * (dim - 2))


def _arg(args: tuple, kwargs: dict, i: int, name: str, default: Any = None) -> Any:
    return args[i] if len(args) > i else kwargs.get(name, default)


def _batch_norm(args: tuple, kwargs: dict) -> Tensor | None:
    """EvalBatchNorm for an eval-mode call whose statistics and affine parameters are
    constants; None (run as written) otherwise."""
    z, mean, var = args[0], _arg(args, kwargs, 1, "running_mean"), _arg(args, kwargs, 2, "running_var")
    weight, bias = _arg(args, kwargs, 3, "weight"), _arg(args, kwargs, 4, "bias")
    training, eps = _arg(args, kwargs, 5, "training", False), _arg(args, kwargs, 7, "eps", 1e-5)
    consts = (mean, var, weight, bias)
    if training or not isinstance(mean, Tensor) or not isinstance(var, Tensor) or z.dim() < 2:
        return None
    if z.numel() < LEAN_MIN_NUMEL:  # small: the Python-level backward costs more than it saves
        return None
    if any(isinstance(t, Tensor) and t.requires_grad for t in consts) or not z.requires_grad:
        return None
    return EvalBatchNorm.apply(z, mean, var, weight, bias, float(eps))


_LEAN: dict[Callable, Callable[[tuple, dict], Tensor | None]] = {F.batch_norm: _batch_norm}


def call(func: Callable, args: tuple, kwargs: dict) -> Any:
    """``func(*args, **kwargs)``, through its lean form where there is one."""
    try:
        lean = _LEAN.get(func)
    except TypeError:  # unhashable callables have no lean form
        lean = None
    out = lean(args, kwargs) if lean is not None else None
    return func(*args, **kwargs) if out is None else out
