"""The reconstructed class template W_target (the paper's "rearranged" parameters, DESIGN.md 1.4).

``template(model, x, target)`` is the row of the exact local linear model
f(x) = W x + b of :func:`reconviz.reconstruct` that scores ``target``, shaped
like ``x``: for an index target, ``W[n, target[n]]``; for a callable target
``s(f(x))``, ``sum_k (d s / d f_k) W[n, k]`` (the chain rule through the affine
model). For a piecewise-linear network W is the Jacobian, so ``template`` and
:func:`~reconviz.saliency.gradient` agree to rounding: one is solved on the
frozen network, the other is autograd on the model.
"""

from __future__ import annotations

import warnings

import torch
from torch import Tensor

from ..linearize import linearize
from ..pipeline import reconstruct
from ..errors import HooksRemovedWarning
from ._common import Attribution, TrainingModeWarning, attribution

__all__ = ["template"]


@attribution(model_copy=False)
def template(a: Attribution, *, method: str = "auto") -> Tensor:
    """The reconstructed template W_target at each input, shaped and typed like ``x``.

    ``method``: the solve of :func:`reconviz.reconstruct` ("auto", "basis" or "adjoint").
    Raises :class:`~reconviz.ExactnessError` when the reconstruction fails its checks.
    """
    with warnings.catch_warnings():  # the family's prologue has warned already
        warnings.simplefilter("ignore", TrainingModeWarning)
        warnings.simplefilter("ignore", HooksRemovedWarning)
        lin = linearize(a.model, a.x, dtype=a.dtype, output=a.output, keep_graph=method != "basis")
    logits = lin.logits.detach().clone().requires_grad_(True)
    with torch.enable_grad():
        (v,) = torch.autograd.grad(a.resolve(logits).sum(), logits, allow_unused=True)  # d score / d logits
    if v is None or not bool((v != 0).any()):  # the score ignores the logits
        return a.result(torch.zeros_like(a.xw))
    classes = torch.nonzero((v != 0).any(0)).flatten()
    rec = reconstruct(lin, None, classes=classes.tolist(), method=method)
    w = torch.as_tensor(rec.weight).to(a.xw.device)
    return a.result(torch.einsum("nc,nc...->n...", v[:, classes].to(w.dtype), w))
