"""Clustering of classes and of neurons by their profiles (Dai 2020, "What do CNN neurons learn").

Profiles (one row per item, one column per class):

* classes (:func:`class_profiles`): ``"features"``, the class-mean penultimate
  features; ``"templates"``, the class-mean reconstructed template
  ``mean_{x: y=c} W_c(x)`` (flattened); ``"confusion"``, the row-normalised
  confusion matrix;
* neurons (channels) of a layer (:func:`neuron_profiles`):
  ``"activation"``, ``P[j, k] = mean_{x: y=k} mean_s a_j(x)_s`` (class-conditional
  mean activation); ``"contribution"``, ``P[j, k] = mean_{x: y=k} sum_s (W_k * a)_{j,s}``,
  the neuron's *exact* contribution to the logit of the class shown, from
  ``rv.reconstruct(model, x, layer=...)`` (``sum_j sum_s (W_k * a)_{j,s} + b_k`` is
  logit k exactly). Unlabelled data uses the model's predicted class as y.

:func:`cluster` groups the rows (each divided by its L2 norm) by hierarchical
clustering (Ward linkage, :mod:`scipy.cluster.hierarchy`) or k-means
(scikit-learn, seeded); cluster ids are numbered by first appearance, so equal
partitions give equal labels. :func:`clustering_figure` draws the dendrogram,
the profiles in leaf order and each cluster's top classes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn as nn
from matplotlib.figure import Figure

from ..data import DataSource
from ..errors import ExactnessError, InputError
from ..plot._base import DIVERGING, SEQUENTIAL, PathLike, finish, limit, new_figure
from ._common import BLANKED_GREY, as_numpy, check_positive, check_seed, layer_name, pick, stream
from .embeddings import layer_features

__all__ = ["Clustering", "cluster", "class_profiles", "neuron_profiles", "cluster_classes", "cluster_neurons",
           "clustering_figure", "CLASS_PROFILES", "NEURON_PROFILES", "ALGORITHMS"]

CLASS_PROFILES = ("features", "templates", "confusion")
NEURON_PROFILES = ("activation", "contribution")
ALGORITHMS = ("hierarchical", "kmeans")


@dataclass(frozen=True)
class Clustering:
    """``labels[i]``: the cluster (0, 1, ... by first appearance) of item ``names[i]``, whose profile
    is ``profiles[i]`` over ``columns``; ``linkage``: the Ward linkage (for the dendrogram)."""

    labels: np.ndarray
    profiles: np.ndarray
    names: tuple[str, ...]
    columns: tuple[str, ...]
    method: str
    linkage: np.ndarray
    what: str = ""
    column_kind: str = "classes"  # what the profile's columns are (for titles)

    @property
    def n_clusters(self) -> int:
        return int(self.labels.max()) + 1

    def members(self, k: int) -> list[str]:
        return [n for n, lab in zip(self.names, self.labels) if lab == k]

    def top_columns(self, k: int, n: int = 3) -> list[str]:
        """The ``n`` columns (classes, or features) with the largest mean profile in cluster ``k``."""
        mean = self.profiles[self.labels == k].mean(0)
        return [self.columns[i] for i in np.argsort(-mean, kind="stable")[:n]]

    def to_dict(self) -> dict[str, Any]:
        return {"what": self.what, "method": self.method, "top_of": self.column_kind, "clusters": [
            {"cluster": k, "members": self.members(k), "top": self.top_columns(k)} for k in range(self.n_clusters)]}


def cluster(profiles: Any, n_clusters: int, *, method: str = "hierarchical", seed: int = 0,
            names: Sequence[str] | None = None, columns: Sequence[str] | None = None, what: str = "",
            column_kind: str = "classes") -> Clustering:
    """Cluster the rows of ``profiles`` (M, D) into ``n_clusters`` groups (see the module doc)."""
    from scipy.cluster.hierarchy import cut_tree, linkage
    from sklearn.cluster import KMeans

    p = as_numpy(profiles)
    if p.ndim != 2 or not np.isfinite(p).all():
        raise InputError(f"profiles must be a finite (M, D) array, got shape {p.shape}")
    k = check_positive(n_clusters, "n_clusters")
    if not 2 <= p.shape[0] or k > p.shape[0]:
        raise InputError(f"cannot make {k} clusters of {p.shape[0]} items: n_clusters must be <= the items")
    if method not in ALGORITHMS:
        raise InputError(f"method must be one of {ALGORITHMS}, got {method!r}")
    norms = np.linalg.norm(p, axis=1, keepdims=True)
    unit = p / np.where(norms > 0, norms, 1.0)
    tree = linkage(unit, method="ward")
    if method == "hierarchical":
        raw = cut_tree(tree, n_clusters=k).reshape(-1)  # exactly k clusters, ties in height included
    else:
        raw = KMeans(k, n_init=10, random_state=check_seed(seed)).fit_predict(unit)
    names = tuple(names) if names is not None else tuple(str(i) for i in range(p.shape[0]))
    columns = tuple(columns) if columns is not None else tuple(str(i) for i in range(p.shape[1]))
    if len(names) != p.shape[0] or len(columns) != p.shape[1]:
        raise InputError(f"names ({len(names)}) and columns ({len(columns)}) must match profiles {p.shape}")
    return Clustering(_first_appearance(raw), p, names, columns, method, tree, what, column_kind)


def _first_appearance(raw: np.ndarray) -> np.ndarray:
    order = {c: i for i, c in enumerate(dict.fromkeys(raw.tolist()))}
    return np.array([order[c] for c in raw.tolist()], dtype=np.int64)


# --------------------------------------------------------------------------
# profiles
# --------------------------------------------------------------------------


def class_profiles(model: nn.Module, data: DataSource, kind: str = "features", *, layer: str | None = None,
                   n_classes: int | None = None, batch_size: int = 256,
                   dtype: torch.dtype = torch.float64) -> np.ndarray:
    """(K, D) one profile per class over labelled ``data`` (``kind`` in :data:`CLASS_PROFILES`;
    ``"templates"`` comes from :func:`reconviz.reconstruct_dataset`, in float64 whatever ``dtype``)."""
    if kind not in CLASS_PROFILES:
        raise InputError(f"kind must be one of {CLASS_PROFILES}, got {kind!r}")
    if kind == "features":
        f, y, _ = layer_features(model, data, layer, batch_size=batch_size, dtype=dtype)
        return _class_means(f, _need_labels(y), n_classes)
    if kind == "confusion":
        return _confusion(model, data, batch_size, dtype)
    return _template_means(model, data, batch_size)


def _need_labels(y: Any) -> np.ndarray:
    if y is None:
        raise InputError("class profiles need labelled data: give (x, y), a labelled Dataset or a class folder")
    return np.asarray(y)


def _class_means(values: np.ndarray, y: np.ndarray, n_classes: int | None) -> np.ndarray:
    """(K, D): the mean of ``values`` (N, D) over the rows of each class (zeros for an absent class)."""
    k = n_classes or int(y.max()) + 1
    sums = np.zeros((k, values.shape[1]))
    np.add.at(sums, y, values)
    counts = np.bincount(y, minlength=k)[:, None]
    return sums / np.maximum(counts, 1)


def _confusion(model: nn.Module, data: DataSource, batch_size: int, dtype: torch.dtype) -> np.ndarray:
    preds, ys = [], []
    for _, y, _, out in stream(model, data, [], batch_size=batch_size, dtype=dtype, desc="confusion"):
        preds.append(as_numpy(out).argmax(1))
        ys.append(_need_labels(None if y is None else y.numpy()))
    p, y = np.concatenate(preds).astype(np.int64), np.concatenate(ys)
    k = max(int(p.max()), int(y.max())) + 1
    m = np.zeros((k, k))
    np.add.at(m, (y, p), 1.0)
    return m / np.maximum(m.sum(1, keepdims=True), 1)


def _template_means(model: nn.Module, data: DataSource, batch_size: int) -> np.ndarray:
    """Mean of W_c over the probes of class c, flattened (K, D): :func:`reconviz.reconstruct_dataset`
    by label (float64, one backward pass per batch; zeros for an absent class). ExactnessError if a
    probe fails its check, as ``rv.reconstruct`` raises: a profile never averages fewer probes silently."""
    from ..dataset import reconstruct_dataset

    ts = reconstruct_dataset(model, data, by="label", batch_size=batch_size, progress=False)
    if ts.failed:
        first = ts.failed[0]
        raise ExactnessError(f"{len(ts.failed)} probe(s) failed the exactness check; probe {first.index}: "
                             f"{first.reason}")
    return as_numpy(ts.mean.reshape(ts.n_classes, -1))


def neuron_profiles(model: nn.Module, data: DataSource, layer: str, kind: str = "activation", *,
                    n_classes: int | None = None, batch_size: int = 256,
                    dtype: torch.dtype = torch.float64) -> np.ndarray:
    """(C, K) one profile per channel of ``layer`` (``kind`` in :data:`NEURON_PROFILES`, see the module doc)."""
    if kind not in NEURON_PROFILES:
        raise InputError(f"kind must be one of {NEURON_PROFILES}, got {kind!r}")
    key = layer_name(layer)
    rows, ys = [], []
    for x, y, acts, out in stream(model, data, key.split("#")[0], batch_size=batch_size, dtype=dtype,
                                  desc=f"{kind} profiles"):
        a = pick(acts, key)
        label = (out.argmax(1) if y is None else y).cpu()
        if kind == "activation":
            rows.append(as_numpy(a.reshape(a.shape[0], a.shape[1], -1).mean(2)))
        else:
            rows.append(_contributions(model, x, key, label, dtype))
        ys.append(label.numpy())
    if not rows:
        raise InputError("the data is empty: give at least one sample")
    return _class_means(np.concatenate(rows), np.concatenate(ys), n_classes).T


def _contributions(model: nn.Module, x: torch.Tensor, key: str, label: torch.Tensor,
                   dtype: torch.dtype) -> np.ndarray:
    """(B, C): each channel's exact contribution ``sum_s (W_y * a)`` to the logit of the sample's class y."""
    from ..pipeline import reconstruct

    rec = reconstruct(model, x, dtype=dtype, layer=key)  # the same "name#k" keys, counted from 0
    c = rec.contributions()  # (B, K, C, *spatial)
    cls = rec.classes.tolist()
    pos = torch.tensor([cls.index(int(v)) for v in label])
    picked = c[torch.arange(c.shape[0]), pos]
    return as_numpy(picked.reshape(picked.shape[0], picked.shape[1], -1).sum(2))


def cluster_classes(model: nn.Module, data: DataSource, n_clusters: int, *, kind: str = "features",
                    method: str = "hierarchical", seed: int = 0, class_names: Sequence[str] | None = None,
                    **options: Any) -> Clustering:
    """:func:`cluster` of :func:`class_profiles`; ``options`` go to :func:`class_profiles`."""
    p = class_profiles(model, data, kind, **options)
    names = _names(class_names, p.shape[0])
    columns = names if kind == "confusion" else tuple(f"f{i}" for i in range(p.shape[1]))
    return cluster(p, n_clusters, method=method, seed=seed, names=names, columns=columns,
                   what=f"classes by {kind} profile",
                   column_kind="predicted classes" if kind == "confusion" else f"{kind} columns")


def cluster_neurons(model: nn.Module, data: DataSource, layer: str, n_clusters: int, *, kind: str = "activation",
                    method: str = "hierarchical", seed: int = 0, class_names: Sequence[str] | None = None,
                    **options: Any) -> Clustering:
    """:func:`cluster` of :func:`neuron_profiles` of ``layer``'s channels."""
    p = neuron_profiles(model, data, layer, kind, **options)
    return cluster(p, n_clusters, method=method, seed=seed, names=tuple(f"ch {j}" for j in range(p.shape[0])),
                   columns=_names(class_names, p.shape[1]), what=f"neurons of {layer} by {kind} profile")


def _names(class_names: Sequence[str] | None, k: int) -> tuple[str, ...]:
    return tuple(str(class_names[i]) if class_names is not None and i < len(class_names) else str(i)
                 for i in range(k))


# --------------------------------------------------------------------------
# figure
# --------------------------------------------------------------------------


def clustering_figure(result: Clustering, *, patches: Any = None, max_columns: int = 40, path: PathLike = None,
                      dpi: float = 100) -> Figure:
    """The dendrogram (Ward, coloured by the clusters), the profiles in leaf order (one colour scale:
    diverging when signed, sequential otherwise) and, per cluster, its top classes. ``patches``: a
    :class:`~reconviz.features.TopPatches` of the same layer, whose best crop is drawn beside each neuron."""
    from scipy.cluster.hierarchy import dendrogram

    if not isinstance(result, Clustering):
        raise InputError(f"clustering_figure takes a Clustering, got {type(result).__name__}")
    m = len(result.names)
    cols = min(result.profiles.shape[1], check_positive(max_columns, "max_columns"))
    with_patches = patches is not None
    width, height = 3.6 + 0.22 * cols + (0.6 if with_patches else 0), 1.5 + 0.2 * m
    fig = new_figure((width, height), path, layout=None)  # a fixed layout: constrained costs seconds here
    fig.subplots_adjust(left=0.2 / width, right=1 - 0.2 / width, top=1 - 0.85 / height, bottom=0.5 / height,
                        wspace=0.45)
    widths = [1.4, 0.12 * cols + 0.4] + ([0.35] if with_patches else [])
    axes = fig.subplots(1, len(widths), gridspec_kw={"width_ratios": widths})
    tree = dendrogram(result.linkage, orientation="left", no_labels=True, ax=axes[0], color_threshold=0,
                      above_threshold_color="0.4")
    order = tree["leaves"][::-1]  # top to bottom
    axes[0].set_xticks([])
    axes[0].set_title("Ward dendrogram", fontsize=8)
    prof = result.profiles[order][:, :cols]
    signed = bool((prof < 0).any())
    lim = limit(prof)
    im = axes[1].imshow(prof, aspect="auto", interpolation="nearest",
                        **(dict(cmap=DIVERGING, vmin=-lim, vmax=lim) if signed else dict(cmap=SEQUENTIAL, vmin=0,
                                                                                           vmax=lim)))
    axes[1].set_yticks(range(m), [f"{result.names[i]} [{result.labels[i]}]" for i in order], fontsize=6)
    axes[1].set_xticks(range(cols), result.columns[:cols], fontsize=6, rotation=90)
    fig.colorbar(im, ax=axes[1], shrink=0.8, label="profile")
    if with_patches:
        _patch_column(axes[2], patches, [result.names[i] for i in order])
    tops = "; ".join(f"[{k}] {', '.join(result.top_columns(k))}" for k in range(result.n_clusters))
    fig.suptitle(f"{result.what or 'Clustering'} ({result.method}, {result.n_clusters} clusters)\n"
                 f"top {result.column_kind} per cluster: {tops}", fontsize=8)
    return finish(fig, path, dpi)


def _patch_column(ax: Any, patches: Any, names: list[str]) -> None:
    """Each neuron's best receptive-field crop, stacked in the figure's row order."""
    crops = []
    for name in names:
        ch = int(name.split()[-1])
        i = patches.channels.index(ch) if ch in patches.channels else None
        crops.append(None if i is None else as_numpy(patches.crops[i][0]).mean(0))
    h = max((c.shape[0] for c in crops if c is not None), default=1)
    w = max((c.shape[1] for c in crops if c is not None), default=1)
    canvas = np.full((len(crops) * h, w), np.nan)
    for r, c in enumerate(crops):
        if c is not None:
            canvas[r * h: r * h + c.shape[0], : c.shape[1]] = c
    ax.imshow(canvas, cmap=BLANKED_GREY, aspect="auto", interpolation="nearest")
    ax.set_xticks([])
    ax.set_yticks([])
    ax.set_title("top\npatch", fontsize=7)
