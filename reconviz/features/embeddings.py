"""Embeddings of a layer's features in 2-D (t-SNE or PCA), as a scatter and as images at their positions.

The default features are the *penultimate* ones (cs231n): the input of the
model's last ``nn.Linear``, i.e. the code the classifier reads (after its ReLU).
:func:`separation` measures how well a 2-D map (or any features) separates the
classes: the 5-fold k-NN accuracy and the silhouette score.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn as nn
from matplotlib.figure import Figure

from ..data import DataSource, batches
from ..errors import InputError
from ..plot._base import PathLike, bare, finish, new_figure, normalise01
from ._common import as_numpy, check_positive, check_seed, last_linear, layer_name, mosaic, pick, stream

__all__ = ["Embedding", "layer_features", "embed", "embedding", "separation", "embedding_scatter",
           "embedding_images", "METHODS"]

METHODS = ("tsne", "pca")


@dataclass(frozen=True)
class Embedding:
    """``points`` (N, 2): the 2-D map of ``features`` (N, D) of ``layer``; ``labels`` (N,) or None."""

    points: np.ndarray
    features: np.ndarray
    labels: np.ndarray | None
    layer: str
    method: str
    seed: int

    def separation(self, k: int = 5) -> dict[str, float | None]:
        """:func:`separation` of the 2-D points."""
        return separation(self.points, self.labels, k)


def layer_features(model: nn.Module, data: DataSource, layer: str | None = None, *, batch_size: int = 256,
                   dtype: torch.dtype = torch.float64,
                   progress: bool | None = None) -> tuple[np.ndarray, np.ndarray | None, str]:
    """(features (N, D), labels (N,) or None, layer key) over ``data``, each output flattened.

    ``layer``: a module name (its output); default: the *input* of the last ``nn.Linear``.
    """
    inputs = layer is None
    key = last_linear(model) if inputs else layer_name(layer)
    feats, labels = [], []
    for _, y, acts, _ in stream(model, data, key.split("#")[0], batch_size=batch_size, dtype=dtype,
                                progress=progress, inputs=inputs, desc="features"):
        a = pick(acts, key)
        feats.append(as_numpy(a.reshape(a.shape[0], -1)))
        labels.append(None if y is None else y.numpy())
    if not feats:
        raise InputError("the data is empty: give at least one sample")
    y_all = None if any(v is None for v in labels) else np.concatenate(labels)  # type: ignore[arg-type]
    return np.concatenate(feats), y_all, (f"input of {key}" if inputs else key)


def embed(features: Any, method: str = "tsne", *, seed: int = 0, perplexity: float = 30.0) -> np.ndarray:
    """``features`` (N, D) -> (N, 2) with scikit-learn: ``"pca"`` or ``"tsne"`` (PCA init; inputs of
    more than 50 dimensions are first reduced to 50 by PCA). Deterministic for a given ``seed``."""
    from sklearn.decomposition import PCA
    from sklearn.manifold import TSNE

    f = as_numpy(features)
    if f.ndim != 2 or f.shape[0] < 3 or not np.isfinite(f).all():
        raise InputError(f"features must be a finite (N, D) array with N >= 3, got shape {f.shape}")
    if method not in METHODS:
        raise InputError(f"method must be one of {METHODS}, got {method!r}")
    seed = check_seed(seed)
    if method == "pca" or f.shape[1] > 50:
        f = PCA(n_components=min(2 if method == "pca" else 50, *f.shape), random_state=seed).fit_transform(f)
    if method == "pca":
        return np.pad(f, ((0, 0), (0, 2 - f.shape[1])))
    perp = float(min(perplexity, (f.shape[0] - 1) / 3))
    return TSNE(2, perplexity=perp, init="pca", random_state=seed).fit_transform(f)


def embedding(model: nn.Module, data: DataSource, layer: str | None = None, *, method: str = "tsne",
              seed: int = 0, perplexity: float = 30.0, batch_size: int = 256, dtype: torch.dtype = torch.float64,
              progress: bool | None = None) -> Embedding:
    """:func:`layer_features` over ``data``, embedded in 2-D by :func:`embed`."""
    if method not in METHODS:
        raise InputError(f"method must be one of {METHODS}, got {method!r}")
    f, y, key = layer_features(model, data, layer, batch_size=batch_size, dtype=dtype, progress=progress)
    return Embedding(embed(f, method, seed=seed, perplexity=perplexity), f, y, key, method, seed)


def separation(points: Any, labels: Any, k: int = 5) -> dict[str, float | None]:
    """How well ``points`` (N, D) separate the classes ``labels`` (N,).

    ``knn_accuracy``: mean accuracy of a k-nearest-neighbour classifier, stratified f-fold with
    f = min(5, the smallest class's size) and no shuffling (deterministic); None when a class has
    a single sample. ``silhouette``: the mean silhouette score (Euclidean), in [-1, 1].
    """
    from sklearn.metrics import silhouette_score
    from sklearn.model_selection import cross_val_score
    from sklearn.neighbors import KNeighborsClassifier

    if labels is None:
        raise InputError("separation needs class labels: give data with labels (x, y)")
    p, y = as_numpy(points), np.asarray(labels).reshape(-1)
    classes, counts = np.unique(y, return_counts=True)
    if p.ndim != 2 or p.shape[0] != y.shape[0] or not 2 <= len(classes) < len(y):
        raise InputError(f"points must be (N, D) and labels (N,) with 2 to N - 1 classes, got {p.shape}, {y.shape}")
    folds = int(min(5, counts.min()))
    knn = None
    if folds >= 2:
        neighbours = min(check_positive(k, "k"), len(y) - -(-len(y) // folds))
        knn = float(cross_val_score(KNeighborsClassifier(neighbours), p, y, cv=folds).mean())
    return {"knn_accuracy": knn, "silhouette": float(silhouette_score(p, y))}


def embedding_scatter(emb: Embedding, *, class_names: Sequence[str] | None = None, path: PathLike = None,
                      dpi: float = 100) -> Figure:
    """The 2-D points coloured by class (one legend entry per class), with the separation in the title."""
    _check(emb)
    fig = new_figure((5.2, 4.4), path)
    ax = fig.subplots()
    if emb.labels is None:
        ax.scatter(emb.points[:, 0], emb.points[:, 1], s=6, color="tab:blue")
        note = ""
    else:
        cmap = _colours(int(emb.labels.max()) + 1)
        for c in np.unique(emb.labels):
            at = emb.labels == c
            name = class_names[c] if class_names is not None and c < len(class_names) else str(c)
            ax.scatter(emb.points[at, 0], emb.points[at, 1], s=6, color=cmap(int(c)), label=name)
        ax.legend(fontsize=7, markerscale=2, loc="best", ncols=2)
        sep = emb.separation() if len(np.unique(emb.labels)) > 1 else None
        note = "" if sep is None else f"\nsilhouette {sep['silhouette']:.3f}" + (
            "" if sep["knn_accuracy"] is None else f", 5-NN accuracy {sep['knn_accuracy']:.3f}")
    bare(ax)
    ax.set_title(f"{emb.method.upper()} of {emb.layer} ({len(emb.points)} inputs, seed {emb.seed}){note}", fontsize=9)
    return finish(fig, path, dpi)


def _colours(n: int) -> Any:
    import matplotlib

    return matplotlib.colormaps["tab10" if n <= 10 else "tab20"]


def embedding_images(emb: Embedding, data: DataSource, *, grid: int = 16, path: PathLike = None,
                     dpi: float = 100) -> Figure:
    """The inputs at their embedded positions (the "t-SNE grid"): a ``grid`` x ``grid`` raster over the
    map's bounding box, the points assigned one per cell by least total squared distance (every cell is
    filled when there are grid^2 points or more; a subset of grid^2 is shown then). ``data`` is the
    same data, in the same order, as the embedding's (re-read for the chosen inputs)."""
    _check(emb)
    grid = check_positive(grid, "grid")
    chosen = _cells(emb.points, grid)
    images = _fetch(data, sorted(set(chosen.values())), len(emb.points))
    some = next(iter(images.values()))
    rgb = some.shape[0] == 3
    blank = np.full((*some.shape[1:], 3) if rgb else some.shape[1:], 1.0 if rgb else np.nan)
    tiles = [blank] * (grid * grid)
    for (r, c), i in chosen.items():
        tiles[r * grid + c] = normalise01(images[i]).transpose(1, 2, 0) if rgb else images[i].mean(0)
    canvas, _, _ = mosaic(tiles, grid, gap=0)
    fig = new_figure((6.0, 6.3), path)
    ax = fig.subplots()
    ax.imshow(canvas, cmap=None if rgb else "gray_r", interpolation="nearest")
    bare(ax)
    fig.suptitle(f"Inputs at their {emb.method.upper()} positions ({emb.layer}; {len(chosen)} of {grid * grid} "
                 "cells filled)", fontsize=9)
    return finish(fig, path, dpi)


def _check(emb: Any) -> None:
    if not isinstance(emb, Embedding):
        raise InputError(f"expected the result of embedding(), got {type(emb).__name__}")


def _cells(points: np.ndarray, grid: int) -> dict[tuple[int, int], int]:
    """(row, col) -> point index: the points (at most grid^2, an evenly spaced subset) assigned one per
    cell so that the total squared distance from each point (scaled to the unit square) to its cell's
    centre is least (scipy's linear_sum_assignment); row 0 is the top (largest y)."""
    from scipy.optimize import linear_sum_assignment
    from scipy.spatial.distance import cdist

    n_cells = grid * grid
    idx = np.arange(len(points)) if len(points) <= n_cells else np.linspace(0, len(points) - 1, n_cells).astype(int)
    lo, hi = points.min(0), points.max(0)
    unit = (points[idx] - lo) / np.where(hi > lo, hi - lo, 1.0)
    r, c = np.divmod(np.arange(n_cells), grid)
    centres = np.stack([(c + 0.5) / grid, 1 - (r + 0.5) / grid], 1)
    chosen, cells = linear_sum_assignment(cdist(unit, centres, "sqeuclidean"))
    return {(int(r[j]), int(c[j])): int(idx[i]) for i, j in zip(chosen, cells)}


def _fetch(data: DataSource, wanted: list[int], n: int) -> dict[int, np.ndarray]:
    """The samples at indices ``wanted`` (sorted), as (C, H, W) arrays, reading ``data`` once."""
    out: dict[int, np.ndarray] = {}
    seen = 0
    for x, _ in batches(data):
        for i in wanted:
            if seen <= i < seen + x.shape[0]:
                out[i] = as_numpy(x[i - seen]).reshape(-1, *x.shape[-2:])
        seen += x.shape[0]
    if seen != n:
        raise InputError(f"data has {seen} samples but the embedding has {n}: pass the data it was computed on")
    return out
