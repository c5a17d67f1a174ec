"""One batch of probes: W's rows by one backward pass per target, b, and the per-probe check.

For N probes x_i with targets t_i (a class per probe, or every class), on the
batch-linearized model g (probe i's gates frozen for sample i):

    W_i = d/dx_i  sum_j g_j(x_j)[t_j]         one backward pass for all N probes
    b_i = f(x_i)[t_i] - <W_i, x_i>

The gradient of the sum is every probe's own row only if sample j's output does
not depend on sample i (no cross-sample mixing). Both facts are *checked*, probe
by probe, before anything is accumulated: at a second point x'_i = x_i + 100 d_i
(d random at the probe's scale, for every probe at once)

    | <W_i, x'_i> + b_i - g(x')_i[t_i] |  <=  tol * max(1, |g(x')_i[t_i]|)

An op that is not affine, or a model that mixes samples (the row of the sum then
holds other probes' terms, and g(x')_i moves with the other probes' d_j), fails it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
from torch import Tensor

from ..linearize import LinearizedModel, linearized_from
from ..pipeline import affinity_far
from ..probe import OutputSelector, probe_pass
from ..reconstruction import tolerance_for
from ..selfcheck import relative_error
from .moments import Moments

__all__ = ["BatchRows", "solve_batch", "ClassMoments", "solve_classes"]

CHECK_FAILED = ("g(x') differs from W x' + b at a second point x' = x + 100 d (relative error {err:.3g} > "
                "tolerance {tol:g}): the linearized model is not affine for this probe, or the model mixes "
                "samples across the batch (statistics over the batch in its forward, e.g. x - x.mean(0))")


@dataclass
class BatchRows:
    """The rows of one batch: ``w`` (n, R, D) for targets ``targets`` (n, R), ``b`` and ``logit``
    (n, R), the inputs ``x`` (n, D), the check's error per probe ``err`` (n,), ``exactness``."""

    w: Tensor
    b: Tensor
    logit: Tensor
    targets: Tensor
    x: Tensor
    err: Tensor
    tolerance: float
    exactness: str

    @property
    def ok(self) -> Tensor:
        return self.err <= self.tolerance  # NaN fails

    def reason(self, i: int) -> str:
        return CHECK_FAILED.format(err=float(self.err[i]), tol=self.tolerance)


def linearized(work: nn.Module, x: Tensor, output: OutputSelector,
               linearization: str = "value") -> tuple[LinearizedModel, Tensor, Tensor]:
    """g at the batch ``x`` (one probe pass on the working copy ``work``), with x as a grad leaf and
    g(x) carrying its graph: the probe pass's own graph when every gate records frozen, else a
    replay of g. ``linearization="tangent"`` on a point-exact net: g is the first-order Taylor
    model (:class:`~reconviz.linearize.TangentModel`) and the graph the model's own pass."""
    lin = linearized_from(probe_pass(work, x, output, keep_graph=True, keep_tail=False), linearization,
                          keep_graph=True)
    return (lin, *lin.take_graph())


def solve_batch(work: nn.Module, x: Tensor, targets, output: OutputSelector, seed: int,
                linearization: str = "value") -> BatchRows:
    """W, b and the second-point check for the probes ``x`` (n, ...); ``targets(logits)`` -> (n, R)
    class indices. One backward pass per target column (R = 1 for by='label' / 'prediction')."""
    lin, leaf, out = linearized(work, x, output, linearization)
    t = targets(lin.logits).to(out.device)
    n, r = t.shape
    w = torch.empty(n, r, leaf[0].numel(), dtype=leaf.dtype, device=leaf.device)
    for j in range(r):
        (g,) = torch.autograd.grad(out.gather(1, t[:, j:j + 1]).sum(), leaf, retain_graph=j < r - 1)
        w[:, j] = g.reshape(n, -1)
    del out
    flat = x.reshape(n, 1, -1)
    logit = lin.logits.gather(1, t)
    b = logit - (w * flat).sum(2)
    far = affinity_far(x, seed)
    with torch.no_grad():
        g_far = lin(far).gather(1, t)
    pred = (w * far.reshape(n, 1, -1)).sum(2) + b
    err = relative_error(pred, g_far).amax(1)
    err = torch.where(torch.isnan(err), torch.full_like(err, float("inf")), err)
    return BatchRows(w, b, logit, t, flat.squeeze(1), err.cpu(), tolerance_for(x.dtype), lin.exactness)


@dataclass
class ClassMoments:
    """by='all' on one batch: the batch's own moments per class (``parts``, as the run's accumulators),
    the check's worst error per probe over the classes ``err`` (n,), ``exactness``. Row by row, so that
    memory is one class's rows (n, D), not the batch's W (n, K, D)."""

    parts: dict[str, Moments]
    err: Tensor
    tolerance: float
    exactness: str

    @property
    def ok(self) -> Tensor:
        return self.err <= self.tolerance

    def reason(self, i: int) -> str:
        return CHECK_FAILED.format(err=float(self.err[i]), tol=self.tolerance)


def solve_classes(work: nn.Module, x: Tensor, classes: Tensor, output: OutputSelector, seed: int,
                  linearization: str, parts: dict[str, Moments]) -> ClassMoments:
    """Every class's row W_c for every probe of ``x``: one backward pass per class, each row checked at
    the second point and merged into ``parts`` (fresh, zero moments: the caller merges them into the
    run's only if every probe passed)."""
    lin, leaf, out = linearized(work, x, output, linearization)
    n = x.shape[0]
    flat, far = x.reshape(n, -1), affinity_far(x, seed)
    with torch.no_grad():
        g_far = lin(far)
    err = torch.zeros(n, dtype=x.dtype, device=x.device)
    for j, c in enumerate(classes.tolist()):
        (g,) = torch.autograd.grad(out[:, c].sum(), leaf, retain_graph=j < len(classes) - 1)
        w = g.reshape(n, -1)
        b = lin.logits[:, c] - (w * flat).sum(1)
        pred = (w * far.reshape(n, -1)).sum(1) + b
        err = torch.maximum(err, relative_error(pred, g_far[:, c]))
        parts["weights"].add_class(j, w)
        parts["contributions"].add_class(j, w * flat)
        parts["biases"].add_class(j, b.unsqueeze(1))
        parts["logits"].add_class(j, lin.logits[:, c].unsqueeze(1))
    err = torch.where(torch.isnan(err), torch.full_like(err, float("inf")), err).cpu()
    return ClassMoments(parts, err, tolerance_for(x.dtype), lin.exactness)
