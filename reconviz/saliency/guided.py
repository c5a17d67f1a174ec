"""Deconvnet (Zeiler & Fergus 2014) and guided backpropagation (Springenberg et al. 2015).

Both are a backward pass from a class score to the input that differs from the
gradient only at the rectifiers; every other op (conv, linear, batch norm,
average pooling, cat, add, ...) keeps its ordinary backward, which *is* the
transposed operation, and max pooling keeps its ordinary backward, which *is*
max-unpooling with the forward switches::

    gradient:   R_in = D * R_out                  (D: the forward slope, 1[z > 0] for ReLU)
    deconvnet:  R_in = rho(R_out)                 (rectify the backward signal; no forward mask)
    guided:     R_in = D * rho(R_out)             (both masks)

with ``rho = relu`` for ReLU. The rectifiers are found the way the core finds
its gates: a :class:`~reconviz.probe.GateMode` on a deep copy of the model
routes every ReLU-family call (``nn.ReLU``, ``F.relu``, ``torch.relu_``,
``Tensor.relu``, in place or not, inside residual or concatenating blocks) to a
custom :class:`torch.autograd.Function` whose forward is the original op and
whose backward applies the rule. The user's model is never run, mutated or
hooked.

How each gate of the registry is treated (``rho`` and ``D`` per gate):

========================  ===============================  =====================================
gate                      rho (backward non-linearity)     D (forward slope, used by guided)
========================  ===============================  =====================================
relu                      relu(R)                          1[z > 0]
threshold(t, v)           relu(R)  (a shifted ReLU)        1[z > t]
clamp with min == 0       relu(R)  (ReLU6, clamp(min=0))   1[0 < z < max]  (saturation masks)
other clamp / hardtanh    none: ordinary backward D * R    1[lo < z < hi]
leaky_relu(a)             leaky_relu(R, a)                 1 or a
prelu(a)                  prelu(R, a)                      1 or a
max_pool                  ordinary backward (unpooling with the forward switches)
========================  ===============================  =====================================

That is, a rectifier's backward signal goes through the *same* non-linearity
(Zeiler & Fergus: "pass the reconstructed signal through a relu"), with the
leaky slope for LeakyReLU / PReLU; with slope 0 every row reduces to the
classic ReLU rule. The upper clip of ReLU6 is a forward *value* effect, so the
deconvnet ignores it (like every forward mask) and guided backprop keeps it
(it keeps every forward mask). Clamps that are not rectifiers (Hardtanh(-1, 1),
clamp_max, clamp(min=c != 0)) pass the signal with their ordinary backward in
both methods, like max pooling.
"""

from __future__ import annotations

from functools import partial
from typing import Any, Callable

import torch
import torch.nn as nn
from torch import Tensor

from ..errors import InputError, UnsupportedOperationError
from ..ops.base import op_name
from ..ops.gates import Call, ElementwiseGate, Gate
from ..probe import GateMode
from ._common import Attribution, attribution

__all__ = ["guided_backprop", "deconvnet", "RectifierMode"]

METHODS = ("deconvnet", "guided")


# --------------------------------------------------------------------------
# The backward rules
# --------------------------------------------------------------------------


def backward_rule(gate: Gate, call: Call, path: str = "") -> tuple[Tensor, Callable[[Tensor], Tensor] | None]:
    """(D, rho) for one gated elementwise call: the forward slope at z and the backward
    non-linearity (:meth:`Gate.backward_signal`; None: the ordinary backward)."""
    try:
        rho = gate.backward_signal(call)
    except NotImplementedError:
        raise UnsupportedOperationError(
            op_name(call.func), path, f"gate '{gate.name}' defines no rule for guided backprop and "
            "deconvnet: implement Gate.backward_signal (see docs/extending.md)") from None
    z = call.z.detach()
    return gate.slope_offset(z, call.params)[0].to(z.dtype), rho


class _Rectifier(torch.autograd.Function):
    """Forward: the original call (in place if the model wrote it so). Backward: the rule."""

    @staticmethod
    def forward(ctx, z, call, slope, rho, method):  # type: ignore[override]
        out = call.original()
        if call.inplace:
            ctx.mark_dirty(z)
            out = z
        ctx.save_for_backward(slope)
        ctx.rho, ctx.method = rho, method
        return out

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        (slope,) = ctx.saved_tensors
        rho, method = ctx.rho, ctx.method
        if rho is None:  # not a rectifier: ordinary backward
            g = grad * slope
        elif method == "deconvnet":
            g = rho(grad)
        else:  # guided
            g = slope * rho(grad)
        return g, None, None, None, None


class RectifierMode(GateMode):
    """Runs the model with rectifiers whose backward follows ``method`` ("deconvnet"/"guided").

    Max pooling and every non-gated op run unchanged (their ordinary backward).
    """

    def __init__(self, work: nn.Module, method: str):
        super().__init__(work)
        if method not in METHODS:
            raise InputError(f"method must be one of {METHODS}, got {method!r}")
        self.method = method
        self.rectified = 0  # number of gated elementwise calls given the rule

    def on_gate(self, gate: Gate, call: Call, path: str) -> Any:
        if not isinstance(gate, ElementwiseGate) or not (torch.is_grad_enabled() and call.z.requires_grad):
            return call.original()
        slope, rho = backward_rule(gate, call, path)
        self.rectified += 1
        return _Rectifier.apply(call.z, call, slope, rho, self.method)


# --------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------


@attribution()
def deconvnet(a: Attribution) -> Tensor:
    """Zeiler & Fergus deconvnet map of class ``target``, shaped and typed like ``x``.

    The gradient's backward pass (transposed filters; max-unpooling with the
    forward switches), except that each rectifier passes ``rho(R_out)``, not the
    forward mask (see the module docs for other rectifiers).
    """
    return a.result(a.input_gradient(partial(RectifierMode, method="deconvnet")))


@attribution()
def guided_backprop(a: Attribution) -> Tensor:
    """Guided backpropagation (Springenberg et al. 2015) of class ``target``, shaped and typed like ``x``.

    The gradient's backward pass, except that each rectifier passes ``D * rho(R_out)``:
    masked by both the forward activation and the backward signal's sign.
    """
    return a.result(a.input_gradient(partial(RectifierMode, method="guided")))
