"""Occlusion sensitivity (Zeiler & Fergus 2014).

A patch of ``baseline`` values (grey, zero, the dataset mean, ...) slides over
the input; for every patch position p the occluded input x_p is scored. The map
is the score *drop*, averaged over the patches covering each pixel::

    drop_p        = S_c(x) - S_c(x_p)
    M[n, i, j]    = mean of drop_p over the patch positions p whose patch covers (i, j)     (N, H, W)

The patch covers all channels (every axis between the batch axis and the last
two, spatial, axes). Patch positions along each spatial axis are
0, s, 2s, ... while the patch fits, plus the last position ``H - h`` when the
stride does not land on it, so every pixel is covered at least once.
Optionally the strongest activation of one feature map is recorded for every
patch position too (Zeiler & Fergus's Fig. 7 (b)).

Batching: occluded inputs are scored ``batch_size`` at a time, under
:class:`~reconviz.saliency._common.BatchInvariant` (matrix products computed
per sample) and with the drops accumulated in a fixed patch order, so in
float64 on the CPU the result is bit-for-bit independent of ``batch_size`` and
equal to scoring one occluded input at a time. (A GPU or float32 conv backend
may still round differently for different batch sizes.)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import torch
import torch.nn as nn
from torch import Tensor

from ._common import Attribution, Hooks, InputError, as_baseline, attribution, named_module
from ..htmlparts import HtmlRepr

__all__ = ["occlusion", "OcclusionResult", "patch_positions"]


@dataclass(frozen=True)
class OcclusionResult(HtmlRepr):
    """Everything :func:`occlusion` measured (returned with ``feature=`` or ``full=True``).

    Attributes:
        score_drop: (N, H, W) the occlusion map (the function's plain return value).
        scores: (N, P_h, P_w) the class score with the patch at each position
            (top-left corner ``(rows[a], cols[b])``).
        feature_max: (N, P_h, P_w) the maximum of the chosen feature map with the
            patch at each position, or None without ``feature``.
        base_score: (N,) the class score of the unoccluded input.
        base_feature_max: (N,) the feature map's maximum on the unoccluded input, or None.
        rows, cols: the patch positions (top-left corners) along H and W.
    """

    score_drop: Tensor
    scores: Tensor
    feature_max: Tensor | None
    base_score: Tensor
    base_feature_max: Tensor | None
    rows: tuple[int, ...]
    cols: tuple[int, ...]


def _pair(v: Any, what: str) -> tuple[int, int]:
    if isinstance(v, bool):
        raise InputError(f"{what} must be an int or a pair of ints, got {v!r}")
    if isinstance(v, int):
        v = (v, v)
    try:
        a, b = (int(t) for t in v)
    except (TypeError, ValueError) as e:
        raise InputError(f"{what} must be an int or a pair of ints, got {v!r}") from e
    if a < 1 or b < 1:
        raise InputError(f"{what} must be positive, got {(a, b)}")
    return a, b


def patch_positions(size: int, window: int, stride: int) -> list[int]:
    """Top-left positions along one axis: 0, stride, ... while the window fits, plus ``size - window``."""
    pos = list(range(0, size - window + 1, stride))
    if pos[-1] != size - window:
        pos.append(size - window)
    return pos


@attribution(min_dim=3)
def occlusion(
    a: Attribution,
    window: int | Sequence[int] = (8, 8),
    stride: int | Sequence[int] | None = None,
    baseline: float | Tensor = 0.0,
    batch_size: int = 64,
    feature: tuple[str, int] | None = None,
    *,
    full: bool = False,
) -> Tensor | OcclusionResult:
    """Occlusion map: the class-score drop when a ``baseline`` patch hides each region.

    ``x`` is (N, ..., H, W) (the last two axes are spatial); a callable target is
    called on batches of occluded inputs (B, K), row by row.

    Args:
        window: patch size (h, w), or an int for a square patch.
        stride: patch step (sh, sw) or an int, at most the window; default half the
            window (at least 1).
        baseline: the patch value: a number, or a tensor broadcastable to ``x``
            (e.g. a per-channel dataset mean of shape (C, 1, 1), or a blurred x).
        batch_size: occluded inputs per forward pass (does not change the result).
        feature: ``(module_name, channel)``: also record, for every patch
            position, the maximum of that module's output channel (over its
            spatial positions; over all calls if the module runs several times).
        full: return the :class:`OcclusionResult` even without ``feature``.

    Returns:
        The (N, H, W) map of score drops ``S(x) - S(x occluded)`` averaged over the
        patches covering each pixel (positive: hiding the pixel lowers the score),
        in x's dtype; with ``feature`` or ``full=True``, an :class:`OcclusionResult`.
    """
    x, n, dt = a.x, a.n, a.dtype
    hh, ww = x.shape[-2:]
    wh, wwid = _pair(window, "window")
    if wh > hh or wwid > ww:
        raise InputError(f"window {(wh, wwid)} is larger than the input's spatial size {(hh, ww)}")
    sh, sw = _pair(stride, "stride") if stride is not None else (max(1, wh // 2), max(1, wwid // 2))
    if sh > wh or sw > wwid:
        raise InputError(
            f"stride {(sh, sw)} is larger than the window {(wh, wwid)}: some pixels would never be occluded"
        )
    if feature is not None:
        if not (isinstance(feature, (tuple, list)) and len(feature) == 2 and isinstance(feature[0], str)):
            raise InputError(f"feature must be (module_name, channel), got {feature!r}")
        if isinstance(feature[1], bool) or not isinstance(feature[1], int):
            raise InputError(f"feature channel must be an int, got {feature[1]!r}")

    rows = patch_positions(hh, wh, sh)
    cols = patch_positions(ww, wwid, sw)
    patches = [(r, c) for r in rows for c in cols]  # raster order
    n_p = len(patches)
    xw = a.xw
    base = as_baseline(baseline, xw, dt)

    def make(start: int, stop: int) -> Tensor:
        batch = []
        for j in range(start, stop):
            i, p = divmod(j, n_p)
            r, c = patches[p]
            img = xw[i].clone()
            img[..., r : r + wh, c : c + wwid] = base[i][..., r : r + wh, c : c + wwid]
            batch.append(img)
        return torch.stack(batch)

    feats: list[Tensor] = []
    current: list[Tensor] = []

    def record(module: nn.Module, args: Any, out: Any) -> None:
        t = out[0] if isinstance(out, (tuple, list)) else out
        if not isinstance(t, Tensor) or t.dim() < 2:
            raise InputError(f"feature module {feature[0]!r} does not return a batch tensor (B, C, ...)")  # type: ignore[index]
        ch = feature[1]  # type: ignore[index]
        if not 0 <= ch < t.shape[1]:
            raise InputError(f"feature channel {ch} out of range: {feature[0]!r} has {t.shape[1]} channels")  # type: ignore[index]
        v = t[:, ch].reshape(t.shape[0], -1).amax(1).detach()
        current.append(v)

    def flush(start: int, stop: int) -> None:
        if feature is not None:
            if not current:
                raise InputError(f"feature module {feature[0]!r} was not called by the model's forward")
            feats.append(torch.stack(current).amax(0))
            current.clear()

    with Hooks() as hooks:
        if feature is not None:
            hooks.add(named_module(a.work, feature[0]).register_forward_hook(record))
        base_score = a.scores(lambda s, e: xw[s:e], torch.arange(n), batch_size, after=flush)
        base_feat = torch.cat(feats) if feature is not None else None
        feats.clear()
        scores = a.scores(make, torch.arange(n).repeat_interleave(n_p), batch_size, after=flush).reshape(n, n_p)
        feat = torch.cat(feats).reshape(n, n_p) if feature is not None else None

    drop = base_score[:, None] - scores  # (N, P)
    total = torch.zeros(n, hh, ww, dtype=dt, device=x.device)
    count = torch.zeros(hh, ww, dtype=dt, device=x.device)
    for p, (r, c) in enumerate(patches):  # fixed order: the sum does not depend on batching
        total[:, r : r + wh, c : c + wwid] += drop[:, p, None, None]
        count[r : r + wh, c : c + wwid] += 1
    score_drop = (total / count).to(x.dtype)
    if feature is None and not full:
        return score_drop
    shape = (n, len(rows), len(cols))
    return OcclusionResult(
        score_drop=score_drop,
        scores=scores.reshape(shape).to(x.dtype),
        feature_max=None if feat is None else feat.reshape(shape).to(x.dtype),
        base_score=base_score.to(x.dtype),
        base_feature_max=None if base_feat is None else base_feat.to(x.dtype),
        rows=tuple(rows),
        cols=tuple(cols),
    )
