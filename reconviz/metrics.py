"""Faithfulness metrics for attribution maps.

* :func:`completeness` -- does a linear explanation add up to the logit?
  ``max_k |sum(W_k * x) + b_k - logit_k|`` per input.
* :func:`prediction_difference` -- the class-score drop when the regions a map
  ranks highest are replaced by a baseline, against replacing random regions
  (the quantitative check of Fu, Li, Gao & Wang 2018; their exact formula is
  not published in the abstract, the one implemented is documented below).
* :func:`deletion_curve` / :func:`insertion_curve` and their areas
  :func:`deletion_auc` / :func:`insertion_auc` (RISE, Petsiuk et al. 2018).

Maps may be (N, H, W) (used as given: larger = more important) or shaped like
``x`` (N, C, H, W), in which case they are reduced to (N, H, W) by the saliency
map rule ``max over channels of |map|``. Regions and pixels are spatial: a
replaced pixel is replaced in every channel.

The model-based metrics belong to the attribution family
(:func:`reconviz.saliency._common.attribution`): ``metric(model, x,
saliency_map, target, *options, output=None, dtype=torch.float64)``, with the
same prologue (checks, private eval-mode copy, target rule) as the saliency
methods. Batches of ``batch_size`` do not change the results (see
:class:`reconviz.saliency._common.BatchInvariant`).
``score="logit"`` uses the raw selected output; ``score="softmax"`` the softmax
probability (for a callable target, the callable receives the probabilities).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch
import torch.nn as nn
from torch import Tensor

from .saliency._common import Attribution, InputError, Target, as_baseline, attribution, check_input
from .htmlparts import HtmlRepr

__all__ = [
    "completeness",
    "prediction_difference",
    "PredictionDifference",
    "Curve",
    "deletion_curve",
    "insertion_curve",
    "deletion_auc",
    "insertion_auc",
]

SCORES = ("logit", "softmax")


# --------------------------------------------------------------------------
# Completeness
# --------------------------------------------------------------------------


def completeness(weight: Tensor, bias: Tensor | float, x: Tensor, logits: Tensor) -> Tensor:
    """The largest gap between a linear explanation and the logits, per input.

    Two layouts:

    * all classes: ``weight`` (N, K, *x.shape[1:]) (e.g. a reconstruction's W),
      ``bias`` (N, K) or (K,), ``logits`` (N, K)::

          gap[n] = max_k | sum(weight[n, k] * x[n]) + bias[n, k] - logits[n, k] |

    * one class per input: ``weight`` shaped like ``x`` (e.g. a gradient, so
      that ``weight * x`` is Gradient x Input), ``bias`` (N,) or a number,
      ``logits`` (N,)::

          gap[n] = | sum(weight[n] * x[n]) + bias[n] - logits[n] |

    Returns:
        (N,) the gaps, computed in the widest dtype of the inputs. Zero (to
        rounding) for an exact local linear model, e.g. the gradient of a
        piecewise-linear network with its bias total.
    """
    for name, t in (("weight", weight), ("x", x), ("logits", logits)):
        if not isinstance(t, Tensor):
            raise InputError(f"completeness: {name} must be a tensor, got {type(t).__name__}")
    x = check_input(x, what="x")
    n = x.shape[0]
    dt = torch.promote_types(torch.promote_types(weight.dtype, x.dtype), logits.dtype)
    if not dt.is_floating_point:
        dt = torch.float64
    b = torch.as_tensor(bias, dtype=dt, device=x.device) if not isinstance(bias, Tensor) else bias.to(dt)
    w, xx, lg = weight.to(dt), x.to(dt), logits.to(dt)
    if w.shape == x.shape:
        contrib = (w * xx).reshape(n, -1).sum(1)  # (N,)
        lg = lg.reshape(-1)
        if lg.shape != (n,):
            raise InputError(f"with weight shaped like x, logits must be (N,) = ({n},), got {tuple(logits.shape)}")
        b = torch.broadcast_to(b.reshape(-1) if b.dim() else b, (n,))
        return (contrib + b - lg).abs()
    if w.dim() == x.dim() + 1 and w.shape[0] == n and w.shape[2:] == x.shape[1:]:
        k = w.shape[1]
        contrib = (w * xx[:, None]).reshape(n, k, -1).sum(2)  # (N, K)
        if lg.shape != (n, k):
            raise InputError(f"logits must be (N, K) = ({n}, {k}), got {tuple(logits.shape)}")
        try:
            b = torch.broadcast_to(b, (n, k))
        except RuntimeError as e:
            raise InputError(f"bias of shape {tuple(b.shape)} does not fit (N, K) = ({n}, {k})") from e
        return (contrib + b - lg).abs().amax(1)
    raise InputError(
        f"weight must be shaped like x {tuple(x.shape)} or (N, K, *x.shape[1:]), got {tuple(weight.shape)}"
    )


# --------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------


def _score_transform(score: str):
    if score not in SCORES:
        raise InputError(f"score must be one of {SCORES}, got {score!r}")
    return (lambda out: torch.softmax(out, dim=1)) if score == "softmax" else None


def _masked_scores(a: Attribution, masks: list[tuple[int, Tensor]], baseline: float | Tensor, score: str,
                   batch_size: int, deletion: bool = True) -> Tensor:
    """The score of x with each (probe i, (H, W) mask)'s masked pixels taken from the baseline
    (``deletion``) or from x, the rest from the baseline (insertion)."""
    base = as_baseline(baseline, a.xw, a.dtype)

    def make(start: int, stop: int) -> Tensor:
        rows = []
        for i, m in masks[start:stop]:
            m = m.to(a.xw.device)
            rows.append(torch.where(m, base[i], a.xw[i]) if deletion else torch.where(m, a.xw[i], base[i]))
        return torch.stack(rows)

    return a.scores(make, torch.tensor([i for i, _ in masks]), batch_size, transform=_score_transform(score))


# --------------------------------------------------------------------------
# Prediction difference
# --------------------------------------------------------------------------


@dataclass(frozen=True)
class PredictionDifference(HtmlRepr):
    """Result of :func:`prediction_difference` (all tensors (N,) unless noted).

    Attributes:
        drop_map: S(x) - S(x with the map's top-k regions replaced).
        drop_random_mean: mean over the random draws of S(x) - S(x with k random regions replaced).
        drop_random_std: their standard deviation (Bessel-corrected; 0 for one draw).
        difference: drop_map - drop_random_mean (> 0: the map beats chance).
        drops_random: (N, n_random) the individual random drops.
        base_score: S(x).
        k: the number of regions replaced.
        n_regions: the number of regions R.
        top_regions: (N, k) indices of the map's top-k regions (row-major over the region grid).
    """

    drop_map: Tensor
    drop_random_mean: Tensor
    drop_random_std: Tensor
    difference: Tensor
    drops_random: Tensor
    base_score: Tensor
    k: int
    n_regions: int
    top_regions: Tensor


def _regions(h: int, w: int, ph: int, pw: int) -> list[tuple[int, int, int, int]]:
    return [(r, min(r + ph, h), c, min(c + pw, w)) for r in range(0, h, ph) for c in range(0, w, pw)]


@attribution(min_dim=3, with_map=True)
def prediction_difference(
    a: Attribution,
    fraction: float = 0.1,
    patch: int | Sequence[int] = (8, 8),
    baseline: float | Tensor = 0.0,
    n_random: int = 10,
    seed: int = 0,
    *,
    score: str = "logit",
    batch_size: int = 64,
) -> PredictionDifference:
    """Prediction difference: the score drop from removing the map's top regions, against random regions.

    Formula (per input n, class score S = the raw logit by default):

    1. Regions: the H x W plane is cut into a grid of non-overlapping
       ``patch = (ph, pw)`` rectangles, starting at (0, 0) (the last row / column
       of the grid is smaller when ph / pw do not divide H / W); R regions.
    2. Ranking: region r's importance is the mean of the map over it;
       ``k = max(1, round(fraction * R))`` top regions (Python's round, halves
       to even; ties in importance: lower region index first).
    3. ``drop_map = S(x) - S(x with the top-k regions set to baseline)`` (all channels).
    4. For j = 1..n_random, draw k distinct regions uniformly at random
       (``torch.Generator`` seeded with ``seed``, draws in probe order) and
       ``drop_j = S(x) - S(x with them set to baseline)``.
    5. ``difference = drop_map - mean_j drop_j``; also reported: the mean and
       the (Bessel-corrected) standard deviation of the drop_j.

    A map that finds the evidence for the class gives ``difference > 0``. For a
    linear model S(x) = sum(w * x) + b and baseline 0, the drop of a region set
    is the sum of the contributions w * x inside it, so the Gradient x Input map
    (with equal-size regions) attains the largest possible drop_map.

    Args (``x`` (N, ..., H, W); a callable target is applied to batches (B, K), row by row):
        saliency_map: (N, H, W), or shaped like x (reduced by max over channels of |.|).
        fraction: the fraction of regions to replace, in (0, 1].
        patch: region size (ph, pw) or an int.
        baseline: replacement value: a number or a tensor broadcastable to x.
        n_random: number of random draws (>= 1).
        seed: seed of the random draws.
        score: "logit" (raw score, default) or "softmax" (probability).
        batch_size: inputs per forward pass (does not change the result).
    """
    x, n, m = a.x, a.n, a.map
    h, w = x.shape[-2:]
    if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or not 0 < fraction <= 1:
        raise InputError(f"fraction must be in (0, 1], got {fraction!r}")
    if isinstance(n_random, bool) or not isinstance(n_random, int) or n_random < 1:
        raise InputError(f"n_random must be a positive int, got {n_random!r}")
    if isinstance(patch, bool):
        raise InputError(f"patch must be an int or a pair of ints, got {patch!r}")
    ph, pw = (patch, patch) if isinstance(patch, int) else tuple(int(v) for v in patch)
    if ph < 1 or pw < 1:
        raise InputError(f"patch must be positive, got {(ph, pw)}")
    ph, pw = min(ph, h), min(pw, w)
    regions = _regions(h, w, ph, pw)
    r_count = len(regions)
    k = min(r_count, max(1, round(fraction * r_count)))
    means = torch.stack([m[:, r0:r1, c0:c1].mean((1, 2)) for r0, r1, c0, c1 in regions], 1)  # (N, R)
    top = torch.argsort(means, dim=1, descending=True, stable=True)[:, :k]

    def region_mask(idx: Sequence[int]) -> Tensor:
        mk = torch.zeros(h, w, dtype=torch.bool)
        for r in idx:
            r0, r1, c0, c1 = regions[int(r)]
            mk[r0:r1, c0:c1] = True
        return mk

    gen = torch.Generator().manual_seed(int(seed))
    masks: list[tuple[int, Tensor]] = [(i, region_mask(top[i].tolist())) for i in range(n)]
    for i in range(n):
        for _ in range(n_random):
            masks.append((i, region_mask(torch.randperm(r_count, generator=gen)[:k].tolist())))
    s0 = a.scores(lambda i, j: a.xw[i:j], torch.arange(n), batch_size, transform=_score_transform(score))
    s = _masked_scores(a, masks, baseline, score, batch_size)
    drop_map = s0 - s[:n]
    drops = s0[:, None] - s[n:].reshape(n, n_random)
    mean = drops.mean(1)
    std = drops.std(1, correction=1) if n_random > 1 else torch.zeros_like(mean)
    cast = a.result
    return PredictionDifference(
        drop_map=cast(drop_map),
        drop_random_mean=cast(mean),
        drop_random_std=cast(std),
        difference=cast(drop_map - mean),
        drops_random=cast(drops),
        base_score=cast(s0),
        k=k,
        n_regions=r_count,
        top_regions=top,
    )


# --------------------------------------------------------------------------
# Deletion / insertion
# --------------------------------------------------------------------------


@dataclass(frozen=True)
class Curve(HtmlRepr):
    """A deletion or insertion curve.

    Attributes:
        fractions: (T + 1,) the fraction of pixels removed (deletion) or inserted
            (insertion) at each step, from 0 to 1.
        scores: (N, T + 1) the class score at each step.
        auc: (N,) the area under the curve, ``torch.trapezoid(scores, fractions)`` on [0, 1].
    """

    fractions: Tensor
    scores: Tensor
    auc: Tensor


def _curve_metric(kind: str, summary: str, what: str, verdict: str) -> Callable:
    """The deletion or insertion curve: the two differ only in what a masked pixel takes."""

    def curve(a: Attribution, steps: int = 100, baseline: float | Tensor = 0.0, *, score: str = "softmax",
              batch_size: int = 64) -> Curve:
        n, (h, w) = a.n, a.x.shape[-2:]
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
            raise InputError(f"steps must be a positive int, got {steps!r}")
        hw = h * w
        t = min(steps, hw)
        counts = [(j * hw) // t for j in range(t + 1)]  # pixels removed / inserted at step j
        order = torch.argsort(a.map.reshape(n, -1), dim=1, descending=True, stable=True)  # type: ignore[union-attr]
        rank = torch.empty_like(order)
        rank.scatter_(1, order, torch.arange(hw).expand(n, hw).contiguous())
        masks = [(i, (rank[i] < c).reshape(h, w)) for i in range(n) for c in counts]
        s = _masked_scores(a, masks, baseline, score, batch_size, deletion=kind == "deletion")
        scores = s.reshape(n, t + 1)
        fractions = torch.tensor(counts, dtype=a.dtype, device=scores.device) / hw
        auc = torch.trapezoid(scores, fractions, dim=1)
        return Curve(a.result(fractions), a.result(scores), a.result(auc))

    curve.__name__ = curve.__qualname__ = f"{kind}_curve"
    curve.__doc__ = f"""{summary}

    Pixels (spatial positions, all channels) are ranked by the map, highest
    first (ties: row-major order). With ``T = min(steps, H*W)`` steps, step j
    {what} the top ``floor(j * H*W / T)`` pixels, j = 0..T. ``auc`` is the
    trapezoid area of the scores over the removed / inserted fraction on [0, 1].
    {verdict}

    Args (``x`` (N, ..., H, W); a callable target is applied to batches (B, K), row by row):
        saliency_map: (N, H, W), or shaped like x (reduced by max over channels of |.|).
        steps: the number of steps T (at most H*W).
        baseline: the "removed" value: a number or a tensor broadcastable to x (e.g. a blurred x).
        score: "softmax" (the target's probability, default, as in RISE) or "logit" (raw score).
        batch_size: inputs per forward pass (does not change the result).

    Returns:
        A :class:`Curve` (fractions, scores (N, T + 1), auc (N,)).
    """
    return attribution(min_dim=3, with_map=True)(curve)


deletion_curve = _curve_metric(
    "deletion", "Deletion curve (RISE): the class score as the most important pixels are replaced by the baseline.",
    "sets to the baseline, starting from x,", "A faithful map drops the score fast: a *low* deletion AUC is good.")
insertion_curve = _curve_metric(
    "insertion", "Insertion curve (RISE): the class score as the most important pixels of x are put into the "
    "baseline.", "copies from x into the baseline image,",
    "A faithful map raises the score fast: a *high* insertion AUC is good.")


def deletion_auc(model: nn.Module, x: Tensor, saliency_map: Tensor, target: Target, **options: Any) -> Tensor:
    """(N,) area under the :func:`deletion_curve` (same options); lower is better."""
    return deletion_curve(model, x, saliency_map, target, **options).auc


def insertion_auc(model: nn.Module, x: Tensor, saliency_map: Tensor, target: Target, **options: Any) -> Tensor:
    """(N,) area under the :func:`insertion_curve` (same options); higher is better."""
    return insertion_curve(model, x, saliency_map, target, **options).auc
