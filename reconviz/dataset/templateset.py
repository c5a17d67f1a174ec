"""``TemplateSet``: class-mean templates over a dataset, with their spread and what was left out."""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from ..errors import InputError
from ..files import atomic_write, read_npz
from .moments import Moments

__all__ = ["TemplateSet", "FailedProbe", "FORMAT"]

FORMAT = "reconviz.templateset/1"


@dataclass(frozen=True)
class FailedProbe:
    """A probe refused by the exactness check: its ``index`` in the data (0-based, in the data's
    order) and the ``reason``. It is listed, never averaged in."""

    index: int
    reason: str


@dataclass
class TemplateSet:
    """Per-class statistics of the reconstructed rows W_c over a dataset (float64, CPU).

    For class c (``classes[k]``) over the probes assigned to it (its label, its prediction,
    or every probe for by='all'):

    * ``count[k]``: how many probes were verified exact and averaged in;
    * ``mean[k]`` (*sample_shape): mean of W_c; ``std[k]``: its population standard
      deviation sqrt(sum (W_c - mean)^2 / count), elementwise;
    * ``contribution_mean[k]``: mean of W_c * x (elementwise; with the bias it sums to the logit);
    * ``bias_mean[k]``, ``bias_std[k]``, ``logit_mean[k]``: the same for b_c and f_c(x).

    ``exact``: the number of probes verified exact and accumulated (over all classes);
    ``failed``: the probes refused (:class:`FailedProbe`), none of them in any statistic.
    ``meta``: how it was made (``by``, ``tolerance``, ``max_rel_error`` of the accepted
    probes, ``probes`` seen, ``skipped`` probes of classes not asked for, ``world_size``, ...).
    """

    classes: Tensor
    weights: Moments
    contributions: Moments
    biases: Moments
    logits: Moments
    sample_shape: tuple[int, ...]
    exact: int
    failed: list[FailedProbe] = field(default_factory=list)
    meta: dict[str, Any] = field(default_factory=dict)

    # views ------------------------------------------------------------------
    @property
    def n_classes(self) -> int:
        return int(self.classes.shape[0])

    @property
    def count(self) -> Tensor:
        return self.weights.count.to(torch.long)

    @property
    def mean(self) -> Tensor:
        return self.weights.mean.reshape(self.n_classes, *self.sample_shape)

    @property
    def std(self) -> Tensor:
        return self.weights.std().reshape(self.n_classes, *self.sample_shape)

    @property
    def contribution_mean(self) -> Tensor:
        return self.contributions.mean.reshape(self.n_classes, *self.sample_shape)

    @property
    def bias_mean(self) -> Tensor:
        return self.biases.mean[:, 0]

    @property
    def bias_std(self) -> Tensor:
        return self.biases.std()[:, 0]

    @property
    def logit_mean(self) -> Tensor:
        return self.logits.mean[:, 0]

    @property
    def by(self) -> str:
        return str(self.meta.get("by"))

    def __repr__(self) -> str:
        return (f"TemplateSet(by={self.meta.get('by')!r}, classes={self.n_classes}, sample_shape={self.sample_shape}, "
                f"exact={self.exact}, failed={len(self.failed)}, count={self.count.tolist()})")

    # persistence --------------------------------------------------------------
    def save(self, path: str | os.PathLike) -> Path:
        """Write ``path`` (.npz) atomically (no pickles); returns the path."""
        path = Path(path)
        arrays = {k: v.numpy() for part, m in self._parts().items() for k, v in m.arrays(part + "_").items()}
        arrays.update(
            classes=self.classes.numpy(), sample_shape=np.array(self.sample_shape, dtype=np.int64),
            exact=np.array(self.exact, dtype=np.int64),
            failed_index=np.array([f.index for f in self.failed], dtype=np.int64),
            failed_reason=np.array([f.reason for f in self.failed], dtype=np.str_).reshape(-1),
            meta=np.array(json.dumps(dict(self.meta, format=FORMAT), default=str)),
        )
        atomic_write(path, lambda f: np.savez(f, **arrays))
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> "TemplateSet":
        """Read a file written by :meth:`save` (``allow_pickle=False``); InputError for anything else."""
        path = Path(path)
        a = _read(path)
        try:
            meta = json.loads(str(a.pop("meta")))
        except ValueError as e:
            raise _bad(path, f"its metadata is not JSON ({e})") from None
        if not isinstance(meta, dict) or meta.get("format") != FORMAT:
            raise _bad(path, f"its format is {meta.get('format') if isinstance(meta, dict) else meta!r:.40}, "
                             f"not {FORMAT!r}")
        t = {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in a.items() if v.dtype.kind in "fiu"}
        shape = tuple(int(s) for s in a["sample_shape"])
        failed = [FailedProbe(int(i), str(r)) for i, r in zip(a["failed_index"], a["failed_reason"])]
        parts = {p: Moments.from_arrays(t, p + "_") for p in PARTS}
        ts = cls(t["classes"], parts["weights"], parts["contributions"], parts["biases"], parts["logits"], shape,
                 int(a["exact"]), failed, meta)
        _check_shapes(path, ts)
        return ts

    def _parts(self) -> dict[str, Moments]:
        return {"weights": self.weights, "contributions": self.contributions, "biases": self.biases,
                "logits": self.logits}


PARTS = ("weights", "contributions", "biases", "logits")
_MEMBERS = ("classes", "sample_shape", "exact", "failed_index", "failed_reason", "meta",
            *(f"{p}_{s}" for p in PARTS for s in ("count", "mean")))


def _bad(path: Path, what: str) -> InputError:
    return InputError(f"{path} is not a template set as TemplateSet.save writes it: {what}. "
                      "Re-create it with rv.reconstruct_dataset(...).save (or 'reconviz dataset')")


def _read(path: Path) -> dict[str, np.ndarray]:
    return read_npz(path, "template set", _bad, _MEMBERS)


def _check_shapes(path: Path, ts: TemplateSet) -> None:
    k, d = ts.n_classes, math.prod(ts.sample_shape)
    for name, m in ts._parts().items():
        width = 1 if name in ("biases", "logits") else d
        want = {"count": (k,), "mean": (k, width), "m2": (k, width)}
        got = {"count": m.count, "mean": m.mean, "m2": m.m2}
        for key, shape in want.items():
            if got[key] is not None and (tuple(got[key].shape) != shape or got[key].dtype != torch.float64):
                raise _bad(path, f"{name}_{key} has shape {tuple(got[key].shape)} ({got[key].dtype}); "
                                 f"expected {shape} float64")
