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

from torch import Tensor

from ._common import Attribution, InputError, attribution

__all__ = ["gradient", "gradient_x_input", "saliency_map"]


@attribution()
def gradient(a: Attribution) -> Tensor:
    """d S_target / d x at each input of ``x``, shaped and typed like ``x`` (row i: input i's own score)."""
    return a.result(a.input_gradient())


@attribution()
def gradient_x_input(a: Attribution) -> Tensor:
    """Gradient x Input, ``gradient * x`` (computed in ``dtype``), shaped and typed like ``x``.

    For a piecewise-linear network ``sum(result[i]) + b_c == S_c(x[i])``, b_c the class's bias total.
    """
    return a.result(a.input_gradient() * a.xw)


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
