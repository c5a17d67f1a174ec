"""Every feature of :mod:`reconviz.features` for one model and dataset, written into a folder:
the figures and ``features.json`` (what ``reconviz features`` and the demo write).
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
import torch.nn as nn

from ..data import DataSource, batches, class_names as names_of
from ..errors import InputError
from ..files import atomic_write
from ._common import run, working_copy
from .activations import RECTIFIERS, activations, dead_units, dead_units_bar, feature_maps
from .clustering import cluster_classes, cluster_neurons, clustering_figure
from .embeddings import embedding, embedding_images, embedding_scatter
from .filters import filters
from .maximise import maximisation_figure, maximise
from .patches import patches_figure, top_patches

__all__ = ["Settings", "default_layer", "write_features"]


@dataclass(frozen=True)
class Settings:
    """What :func:`write_features` computes (defaults: the CLI's)."""

    layer: str | None = None  # None: :func:`default_layer`
    channels: Sequence[int] | None = None  # top patches (None: the first 16)
    k: int = 9
    method: str = "tsne"
    classes: Sequence[int] | None = None  # activation maximisation (None: every class, up to 10)
    steps: int = 100
    clusters: int = 4
    probes: int = 100  # samples for the class-mean templates
    contributions: bool = True  # neuron clusters by exact contribution profiles (one reconstruction per batch)
    batch_size: int = 256
    seed: int = 0
    dpi: float = 100  # of every figure


def default_layer(model: nn.Module, x: torch.Tensor) -> str:
    """The last rectifier (else conv / pooling layer) whose output has spatial axes (N, C, H, W)."""
    acts = activations(model, x[:1])
    spatial = [k for k, a in acts.items() if a.dim() == 4]
    named = dict(model.named_modules())
    rect = [k for k in spatial if isinstance(named.get(k.split("#")[0]), RECTIFIERS)]
    if not (rect or spatial):
        raise InputError("the model has no layer with (N, C, H, W) outputs: pass layer=NAME")
    return (rect or spatial)[-1]


def write_features(model: nn.Module, data: DataSource, out: str | Path, settings: Settings = Settings(), *,
                   class_names: Sequence[str] | None = None,
                   log: Callable[[str], None] = lambda s: None) -> tuple[list[Path], dict[str, Any]]:
    """Compute every feature, write the figures and ``features.json`` into ``out``; return (files, summary)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    s = settings
    probes, labels = _first(data, s.probes)
    layer = s.layer or default_layer(model, probes)
    names = list(class_names) if class_names is not None else names_of(data)
    files: list[Path] = []
    summary: dict[str, Any] = {"layer": layer, "settings": {k: _plain(getattr(s, k)) for k in s.__dataclass_fields__}}
    timings: dict[str, float] = {}

    def step(name: str, make: Callable[[], Any]) -> Any:
        t0 = time.perf_counter()
        result = make()
        timings[name] = round(time.perf_counter() - t0, 3)
        log(f"  {name}: {timings[name]:.2f} s")
        return result

    def save(name: str, draw: Callable[[str], Any]) -> None:
        path = out / name
        draw(str(path))
        files.append(path)

    if any(isinstance(m, nn.Conv2d) for m in model.modules()):
        step("filters", lambda: save("filters.png", lambda p: filters(model, path=p, dpi=s.dpi)))
    step("feature maps", lambda: save("feature_maps.png",
                                      lambda p: feature_maps(model, probes, layer, path=p, dpi=s.dpi)))
    dead = step("dead units", lambda: dead_units(model, data, batch_size=s.batch_size))
    save("dead_units.png", lambda p: dead_units_bar(dead, path=p, dpi=s.dpi))
    summary["dead_units"] = dead.to_dict()

    patches = step("top patches", lambda: top_patches(model, data, layer, _channels(s.channels, model, probes, layer),
                                                       s.k, batch_size=s.batch_size))
    save("top_patches.png", lambda p: patches_figure(patches, class_names=names, path=p, dpi=s.dpi))
    summary["top_patches"] = patches.to_dict()

    emb = step("embedding", lambda: embedding(model, data, method=s.method, seed=s.seed, batch_size=s.batch_size))
    save("embedding.png", lambda p: embedding_scatter(emb, class_names=names, path=p, dpi=s.dpi))
    save("embedding_images.png", lambda p: embedding_images(emb, data, path=p, dpi=s.dpi))
    summary["embedding"] = {"layer": emb.layer, "method": emb.method, "seed": emb.seed, "n": len(emb.points),
                            "separation": emb.separation() if emb.labels is not None and
                            1 < len(set(emb.labels.tolist())) < len(emb.labels) else None}

    summary["maximisation"] = step("maximisation", lambda: _maximisation(model, probes, labels, s, names, save))
    summary["clusters"] = step("clustering", lambda: _clusters(model, data, layer, patches, s, names, labels, save))
    summary["seconds"] = timings
    summary["files"] = [p.name for p in files] + ["features.json"]
    path = out / "features.json"
    atomic_write(path, lambda f: f.write((json.dumps(summary, indent=1) + "\n").encode()))
    return files + [path], summary


def _plain(v: Any) -> Any:
    """A setting as JSON: sequences (a range, a tuple) as lists."""
    return v if v is None or isinstance(v, (str, int, float, bool)) else [int(i) for i in v]


def _first(data: DataSource, n: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The first ``n`` samples (and labels) of ``data``."""
    xs, ys = [], []
    got = 0
    for x, y in batches(data, max(1, min(n, 256))):
        xs.append(x)
        ys.append(y)
        got += x.shape[0]
        if got >= n:
            break
    if not xs:
        raise InputError("the data is empty: give at least one sample")
    y_all = None if any(y is None for y in ys) else torch.cat(ys)[:n]  # type: ignore[arg-type]
    return torch.cat(xs)[:n], y_all


def _channels(channels: Any, model: nn.Module, probes: torch.Tensor, layer: str) -> list[int]:
    if channels is not None:
        return list(channels)
    n = activations(model, probes[:1], layer.split("#")[0])[layer].shape[1]
    return list(range(min(16, n)))


def _maximisation(model: nn.Module, probes: torch.Tensor, labels: Any, s: Settings, names: Any,
                  save: Callable) -> dict[str, Any]:
    classes = list(s.classes) if s.classes is not None else list(range(min(10, _logits_width(model, probes))))
    lo, hi = float(probes.min()), float(probes.max())
    result = maximise(model, probes[:1], classes, steps=s.steps, clip=(lo, hi), seed=s.seed)
    save("maximisation.png", lambda p: maximisation_figure(model, result, probes if labels is not None else None,
                                                           labels, class_names=names, path=p, dpi=s.dpi))
    wins = (result.logits.argmax(1) == torch.tensor(classes)).tolist()
    return {"classes": classes, "steps": s.steps, "clip": [lo, hi], "target_wins": wins,
            "objective_start": result.trace[:, 0].tolist(), "objective_end": result.trace[:, -1].tolist()}


def _logits_width(model: nn.Module, probes: torch.Tensor) -> int:
    """K of the model's (N, K) logits, from one forward pass of a copy."""
    with working_copy(model, torch.float64) as work, torch.no_grad():
        out = run(work, probes[:1].double())
    if not isinstance(out, torch.Tensor) or out.dim() != 2:
        raise InputError("the model must return logits (N, K) for activation maximisation")
    return int(out.shape[1])


def _clusters(model: nn.Module, data: DataSource, layer: str, patches: Any, s: Settings, names: Any, labels: Any,
              save: Callable) -> dict[str, Any]:
    found: dict[str, Any] = {}
    if labels is not None:
        classes = cluster_classes(model, data, min(s.clusters, 10), kind="features", class_names=names,
                                  batch_size=s.batch_size)
        save("clusters_classes.png", lambda p: clustering_figure(classes, path=p, dpi=s.dpi))
        found["classes"] = classes.to_dict()
    kinds = ("activation", "contribution") if s.contributions else ("activation",)
    for kind in kinds:
        neurons = cluster_neurons(model, data, layer, s.clusters, kind=kind, class_names=names, seed=s.seed,
                                  batch_size=s.batch_size)
        save(f"clusters_neurons_{kind}.png",
             lambda p: clustering_figure(neurons, patches=patches, path=p, dpi=s.dpi))
        found[f"neurons_{kind}"] = neurons.to_dict()
    return found
