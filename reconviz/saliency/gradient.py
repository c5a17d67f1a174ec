"""Vanilla gradient (Simonyan, Vedaldi & Zisserman 2014) and Gradient x Input.

For a class score S_c (the *unnormalised* score: the logit, before softmax)::

    gradient:          w = dS_c / dx  at x0                        (shaped like x)
    saliency map:      M_ij = max_k |w_kij|                         (N, H, W)
    gradient x input:  w * x0                                       (shaped like x)

For a piecewise-linear network, ``w`` is the row W_c of the exact local linear
model f(x) = W x + b, so ``sum(w * x0) + b_c == S_c(x0)`` (see
:func:`reconviz.metrics.completeness`); for a bias-free ReLU network b_c = 0.
"""

from __future__ import annotations

from contextlib import nullcontext
from typing import Any, Callable, ContextManager

import torch
import torch.nn as nn
from torch import Tensor

from ._common import (
    InputError,
    OutputSelector,
    Target,
    check_dtype,
    check_input,
    resolve_target,
    select_logits,
    working_model,
)

__all__ = ["gradient", "gradient_x_input", "saliency_map", "input_gradient"]


def gradient(
    model: nn.Module,
    x: Tensor,
    target: Target,
    *,
    output: OutputSelector = None,
    dtype: torch.dtype | None = torch.float64,
) -> Tensor:
    """The gradient of the class score w.r.t. the input, d S_target / d x, at each input of ``x``.

    Args:
        model: any ``nn.Module``; a private eval-mode copy is used, the model is left untouched.
        x: the input batch (N, ...), floating point and finite.
        target: an int class index (the same for every input), a sequence / 1-D
            tensor of N ints (one per input), or a callable mapping the model
            output (N, K) to scores (N,).
        output: selects the logits when the model returns a tuple, dict or object.
        dtype: working precision (default float64; None: x's dtype).

    Returns:
        A tensor shaped and typed like ``x``. Inputs are independent (eval
        mode), so row i is the gradient of input i's own score.
    """
    return input_gradient(model, x, target, output=output, dtype=dtype)


def input_gradient(
    model: nn.Module,
    x: Tensor,
    target: Target,
    *,
    output: OutputSelector = None,
    dtype: torch.dtype | None = torch.float64,
    mode: Callable[[nn.Module], ContextManager[Any]] | None = None,
) -> Tensor:
    """d S_target / d x on a private copy of ``model``: the backward pass every input-space map shares.

    ``mode(work)``, when given, is a context (e.g. a TorchFunctionMode that swaps
    the rectifiers' backward rule, :mod:`reconviz.saliency.guided`) around the
    forward pass of the copy ``work``. The forward runs on a non-leaf clone of
    the input, so a model that writes into its input (``x.relu_()``) works and
    the caller's ``x`` is never written to. Arguments as in :func:`gradient`.
    """
    x = check_input(x)
    dt = check_dtype(dtype, x)
    n = x.shape[0]
    with working_model(model, dt, x.device) as work:
        xw = x.detach().to(dt).clone().requires_grad_(True)
        with torch.enable_grad():
            with mode(work) if mode is not None else nullcontext():
                raw = work(xw.clone())  # a non-leaf: in-place ops on the input stay legal
            score = resolve_target(select_logits(raw, output, n), target)
            (g,) = torch.autograd.grad(score.sum(), xw, allow_unused=True)
    if g is None:  # the score does not depend on x
        g = torch.zeros_like(xw)
    return g.detach().to(x.dtype)


def gradient_x_input(
    model: nn.Module,
    x: Tensor,
    target: Target,
    *,
    output: OutputSelector = None,
    dtype: torch.dtype | None = torch.float64,
) -> Tensor:
    """Gradient x Input: ``gradient(model, x, target) * x`` (elementwise), shaped and typed like ``x``.

    For a piecewise-linear network the entries sum, with the class's bias
    total b_c, to the logit: ``sum(result[i]) + b_c == S_c(x[i])``. Arguments
    as in :func:`gradient`.
    """
    x = check_input(x)
    dt = check_dtype(dtype, x)
    g = gradient(model, x, target, output=output, dtype=dt)
    return (g.to(dt) * x.detach().to(dt)).to(x.dtype)


def saliency_map(grad: Tensor, channel_dim: int | None = 1) -> Tensor:
    """Simonyan's saliency map: the maximum of ``|grad|`` over the channel dimension.

    Shape rule: dimension ``channel_dim`` (default 1, the channel axis of an
    (N, C, H, W) batch) is reduced and removed:

    * (N, C, H, W) -> (N, H, W), ``M[n, i, j] = max_c |grad[n, c, i, j]|``;
    * (N, 1, H, W) (one channel, e.g. grey images) -> (N, H, W) = ``|grad[:, 0]|``
      (the channel axis is still removed, so grey and colour inputs give maps of
      the same shape);
    * (N, C, L) 1-D signals -> (N, L).

    For a model whose inputs have no channel axis, e.g. (N, H, W), pass
    ``channel_dim=None``: the result is ``|grad|`` with the shape unchanged.

    Args:
        grad: a gradient batch (N, ...), e.g. from :func:`gradient`.
        channel_dim: the axis to reduce (not 0, the batch axis), or None.
    """
    if not isinstance(grad, Tensor):
        raise InputError(f"grad must be a tensor, got {type(grad).__name__}")
    a = grad.abs()
    if channel_dim is None:
        return a
    if grad.dim() < 2:
        raise InputError(f"grad must be a batch (N, C, ...), got shape {tuple(grad.shape)}")
    d = channel_dim % grad.dim()
    if d == 0:
        raise InputError("channel_dim must not be the batch dimension 0")
    return a.amax(dim=d)
