"""``reconstruct_dataset``: class-mean templates over a whole dataset, streamed, checked, resumable, sharded."""

from __future__ import annotations

import math
import os
import sys
from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.nn as nn
from torch import Tensor

from ..errors import InputError
from ..linearize import check_linearization
from ..probe import OutputSelector, check_model, eval_copy, record
from ..reconstruction import tolerance_for
from .checkpoint import State, load_state, model_fingerprint, rank_path, save_state
from .distributed import World, world
from .moments import Moments, pooled
from .rows import BatchRows, solve_batch, solve_classes
from .source import first_sample, length, prepare, shards
from .templateset import PARTS, FailedProbe, TemplateSet

__all__ = ["reconstruct_dataset", "BY"]

BY = ("label", "prediction", "all")
DTYPE = torch.float64

# called after each batch with its number (tests use it to slow a run down before killing it)
after_batch: Callable[[int], None] | None = None


def reconstruct_dataset(
    model: nn.Module,
    data: Any,
    classes: Any = None,
    by: str = "label",
    linearization: str = "value",
    batch_size: int = 256,
    max_memory: int | None = None,
    checkpoint: str | os.PathLike | None = None,
    *,
    output: OutputSelector = None,
    transform: Callable[[Tensor], Tensor] | None = None,
    checkpoint_every: int = 10,
    progress: bool | None = None,
) -> TemplateSet:
    """Mean and spread of the exact class templates W_c over a dataset, per class.

    Each probe x_i is reconstructed exactly, f(x) = W_i x + b_i on its linear region
    (as :func:`reconviz.reconstruct`, float64), checked, and merged into per-class running
    moments (Chan's pairwise update); memory is one batch's rows of W plus the accumulators
    (3 x K x D float64: mean and M2 of W, mean of W * x; by='all' twice that, the batch's own
    moments beside the run's, and one class's rows at a time), whatever the dataset's size.

    Args:
        model: a PyTorch module, piecewise linear in its input (as for ``reconstruct``).
            Never modified: the work happens on a float64 eval-mode copy on its device.
        data: a tensor (N, ...), a pair (x, y), a ``torch.utils.data.Dataset`` or
            ``DataLoader`` (items / batches ``x`` or ``(x, y, ...)``), the path of a ``.npy``
            array (N, ...), or a folder of images with one subfolder per class (Pillow).
            Labels come from the data where it has them.
        classes: output indices to keep statistics for (default: every output). Probes
            of other classes are skipped (counted in ``meta["skipped"]``).
        by: which template a probe contributes to the mean of: ``"label"`` (W_{y_i}, its
            true class; needs labels), ``"prediction"`` (W at its predicted class), both
            ONE backward pass per batch: the gradient of sum_i f_i(x_i)[t_i] through the
            batch-linearized model is every probe's own row at once; or ``"all"`` (every
            class's W_c over every probe: one backward pass per class).
        linearization: ``"value"`` (gates frozen at their values) or ``"tangent"`` (the first-order
            Taylor model; the same on piecewise-linear nets), as for :func:`reconviz.reconstruct`.
        batch_size: probes per batch (the unit of sharding and checkpointing; a
            DataLoader keeps its own batches).
        max_memory: bytes for the accumulators plus one batch in flight; a batch that
            would not fit is solved in slices (InputError if not even one probe fits).
        checkpoint: a file to save the accumulators and the position to every
            ``checkpoint_every`` batches (atomically); a run started with the same path
            resumes there and gives the result of an uninterrupted run. Removed at the end.
        output: selects the logits of a model that returns a tuple or dict.
        transform: applied to every batch x (float64) before the probe, e.g. normalisation.
        progress: a progress bar with probes/s (default: on a terminal, rank 0).

    Every probe is checked before it is accumulated: W_i x'_i + b_i against the
    linearized model at a second point x'_i (:mod:`reconviz.dataset.rows`). A probe
    that fails is listed in ``failed`` with the reason and left out of every statistic.

    In an initialised ``torch.distributed`` process group, batch b is solved by rank
    b mod P and the accumulators are pooled with all_reduce; every rank returns the
    same TemplateSet (save it on rank 0). A rank that dies makes the others raise
    :class:`~reconviz.dataset.DistributedError`.
    """
    _check_options(by, batch_size, max_memory, checkpoint_every, transform)
    check_linearization(linearization)
    check_model(model)
    data = prepare(data)
    here = world()
    job = _job(model, data, classes, by, linearization, output, transform)
    job.chunk = _chunk(batch_size, max_memory, job)
    run = {"by": by, "classes": job.classes.tolist(), "batch_size": batch_size, "k_all": job.k_all,
           "shape": list(job.shape), "samples": length(data), "world_size": here.size, "rank": here.rank,
           "linearization": linearization}
    here.agree("the run (model outputs, sample shape, data size, options)", {**run, "rank": None})
    path = None if checkpoint is None else rank_path(checkpoint, here.rank, here.size)
    if path is not None:
        run["model"] = model_fingerprint(model)
    state = (load_state(path, run) if path is not None else None) or _fresh(len(job.classes), math.prod(job.shape))
    stream = shards(data, batch_size, here, state.position, device=job.device, dtype=DTYPE)
    total = length(data)
    share = None if total is None else math.ceil(total / here.size)  # rank 0's bar counts its own probes
    with _bar(share, progress and here.rank == 0 if progress is not None else None, here) as bar:
        for done, (number, first, x, y) in enumerate(stream, 1):
            _solve_batch(job, x, y, first, number, state)
            bar.update(x.shape[0])
            if path is not None and done % checkpoint_every == 0:
                save_state(path, state, run)
            if after_batch is not None:
                after_batch(number)
    ts = _result(state, job, here, batch_size)
    if path is not None:
        path.unlink(missing_ok=True)
    return ts


@dataclass
class Job:
    """What every batch of a run needs: the working copy, the options, the classes asked for
    (``lookup``: output index -> position in ``classes``, -1 for the others)."""

    work: nn.Module
    device: torch.device
    by: str
    classes: Tensor
    lookup: Tensor
    k_all: int
    shape: tuple[int, ...]
    output: OutputSelector
    linearization: str
    transform: Callable[[Tensor], Tensor] | None
    probe_bytes: int  # the probe pass's activations for one probe (the memory plan's unit)
    chunk: int = 0


def _job(model: nn.Module, data: Any, classes: Any, by: str, linearization: str, output: OutputSelector,
         transform: Callable | None) -> Job:
    device = _device(model)
    work = eval_copy(model, DTYPE, device, track_paths=True)
    x = _first(data, device, transform)
    first = record(work, x, output)  # the probe pass refuses what it cannot freeze, early
    k_all = int(first.outputs.shape[1])
    cls = _classes(classes, k_all)
    lookup = torch.full((k_all,), -1, dtype=torch.long)
    lookup[cls] = torch.arange(len(cls))
    return Job(work, device, by, cls, lookup, k_all, tuple(x.shape[1:]), output, linearization, transform,
               first.activation_bytes)


def _solve_batch(job: Job, x: Tensor, y: Tensor | None, first: int, number: int, state: State) -> None:
    """One batch of the data (number ``number``, first probe ``first``), in slices of ``job.chunk``."""
    if job.transform is not None:
        x = _transformed(job.transform, x)
    for s in range(0, x.shape[0], job.chunk):
        _batch(job, x[s:s + job.chunk], None if y is None else y[s:s + job.chunk], first + s, number, state)
    state.position = number + 1


# -- one batch -----------------------------------------------------------------------


def _batch(job: Job, x: Tensor, y: Tensor | None, first: int, number: int, state: State) -> None:
    """Solve, check and accumulate the probes x (indices first, first + 1, ...)."""
    index = torch.arange(first, first + x.shape[0])
    state.probes += x.shape[0]
    if job.by == "all":
        _every_class(job, x, index, number, state)
        return
    if job.by == "label":
        y = _labels(y, job.k_all, first)
        keep = job.lookup[y] >= 0
        state.skipped += int((~keep).sum())
        if not bool(keep.any()):
            return
        x, y, index = x[keep.to(x.device)], y[keep], index[keep]
        targets = _fixed(y.unsqueeze(1))
    else:
        targets = lambda logits: logits.argmax(1, keepdim=True)  # noqa: E731
    rows = solve_batch(job.work, x, targets, job.output, seed=number, linearization=job.linearization)
    _accumulate(rows, index, job.lookup, state)


def _every_class(job: Job, x: Tensor, index: Tensor, number: int, state: State) -> None:
    """by='all': the batch's moments class by class; merged only when every probe passed its check,
    else the failed probes are listed and the batch is solved again without them."""
    while x.shape[0]:
        parts = _fresh(len(job.classes), x[0].numel()).parts
        done = solve_classes(job.work, x, job.classes, job.output, number, job.linearization, parts)
        ok = done.ok
        if bool(ok.all()):
            for name, part in done.parts.items():
                state.parts[name].merge(part)
            state.exact += x.shape[0]
            state.max_rel_error = max(state.max_rel_error, float(done.err.max()))
            state.point_exact |= done.exactness != "region-exact"
            return
        for i in (~ok).nonzero().flatten().tolist():
            state.failed.append(FailedProbe(int(index[i]), done.reason(i)))
        x, index = x[ok.to(x.device)], index[ok]


def _fixed(t: Tensor) -> Callable[[Tensor], Tensor]:
    return lambda logits: t


def _accumulate(rows: BatchRows, index: Tensor, lookup: Tensor, state: State) -> None:
    """Failed probes listed; the others' rows merged into the moments of their classes."""
    ok = rows.ok
    for i in (~ok).nonzero().flatten().tolist():
        state.failed.append(FailedProbe(int(index[i]), rows.reason(i)))
    pos = lookup[rows.targets.cpu()]  # (n, R); -1: a predicted class not asked for
    wanted = ok.unsqueeze(1) & (pos >= 0)
    state.skipped += int(((pos < 0).all(1) & ok).sum())
    if not bool(wanted.any()):
        return
    state.exact += int((ok & (pos >= 0).any(1)).sum())
    state.max_rel_error = max(state.max_rel_error, float(rows.err[ok].max()))
    state.point_exact |= rows.exactness != "region-exact"
    w = rows.w.cpu()[wanted]  # (m, D)
    x = rows.x.cpu().unsqueeze(1).expand_as(rows.w)[wanted]
    p = pos[wanted]
    state.parts["weights"].add(p, w)
    state.parts["contributions"].add(p, w * x)
    state.parts["biases"].add(p, rows.b.cpu()[wanted].unsqueeze(1))
    state.parts["logits"].add(p, rows.logit.cpu()[wanted].unsqueeze(1))


def _labels(y: Tensor | None, k_all: int, first: int) -> Tensor:
    if y is None:
        raise InputError("by='label' needs labels, and the data has none: pass (x, y), a Dataset or DataLoader "
                         "yielding (x, y), or a folder of class subfolders; or use by='prediction'")
    y = y.cpu()
    bad = ((y < 0) | (y >= k_all)).nonzero().flatten()
    if bad.numel():
        i = int(bad[0])
        raise InputError(f"sample {first + i} has label {int(y[i])}, but the model has {k_all} outputs "
                         f"(labels are output indices 0..{k_all - 1})")
    return y


# -- setup ---------------------------------------------------------------------------


def _check_options(by: Any, batch_size: Any, max_memory: Any, every: Any, transform: Any) -> None:
    if by not in BY:
        raise InputError(f"unknown by={by!r}: choose 'label' (each probe's true class), 'prediction' or 'all'")
    for name, v in (("batch_size", batch_size), ("checkpoint_every", every)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise InputError(f"{name} must be a positive integer, got {v!r}")
    if max_memory is not None and (isinstance(max_memory, bool) or not isinstance(max_memory, int) or max_memory < 1):
        raise InputError(f"max_memory must be a positive number of bytes or None, got {max_memory!r}")
    if transform is not None and not callable(transform):
        raise InputError(f"transform must be a callable on a batch x, got {type(transform).__name__}")


def _device(model: nn.Module) -> torch.device:
    for t in list(model.parameters()) + list(model.buffers()):
        return t.device
    return torch.device("cpu")


def _transformed(transform: Callable[[Tensor], Tensor], x: Tensor) -> Tensor:
    out = transform(x)
    if not isinstance(out, Tensor) or out.shape[0] != x.shape[0]:
        raise InputError(f"transform must return a tensor with the batch's {x.shape[0]} samples, "
                         f"got {type(out).__name__} {tuple(getattr(out, 'shape', ()))}")
    return out.to(DTYPE)


def _first(data: Any, device: torch.device, transform: Callable | None) -> Tensor:
    """The data's first sample as a float64 batch of one (transformed): for the shapes and the memory plan."""
    x = first_sample(data).to(device=device, dtype=DTYPE)
    return x if transform is None else _transformed(transform, x)


def _classes(classes: Any, k_all: int) -> Tensor:
    if classes is None:
        return torch.arange(k_all)
    try:
        cls = torch.as_tensor([int(c) for c in (classes.tolist() if hasattr(classes, "tolist") else classes)]
                              if not isinstance(classes, int) else [classes], dtype=torch.long).reshape(-1)
    except (TypeError, ValueError):
        raise InputError(f"classes must be output indices (a list of ints), got {classes!r:.60}") from None
    if cls.numel() == 0 or len(set(cls.tolist())) != cls.numel():
        raise InputError(f"classes must be distinct output indices, at least one; got {cls.tolist()[:10]}")
    bad = [c for c in cls.tolist() if not 0 <= c < k_all]
    if bad:
        raise InputError(f"class {bad[0]} is out of range: the model has {k_all} outputs (0..{k_all - 1})")
    return cls


def _chunk(batch_size: int, max_memory: int | None, job: Job) -> int:
    """Probes per solve: the batch, or fewer when max_memory says so. A probe in flight holds its
    activations with their graph (the probe pass's count, x3 for gradients) and one row of W at a
    time (x3 with its products); by='all' also holds the batch's own moments beside the run's."""
    if max_memory is None:
        return batch_size
    d, k = math.prod(job.shape), len(job.classes)
    per_probe = 3 * job.probe_bytes + 3 * d * 8
    accumulators = 8 * k * (3 * d + 4) * (2 if job.by == "all" else 1)
    fit = (max_memory - accumulators) // max(1, per_probe)
    if fit < 1:
        raise InputError(f"max_memory={max_memory} bytes holds not even the accumulators ({accumulators} bytes) "
                         f"and one probe in flight (~{per_probe} bytes): raise it")
    return int(min(batch_size, fit))


def _fresh(k: int, d: int) -> State:
    return State({"weights": Moments.zeros(k, d), "contributions": Moments.zeros(k, d, second=False),
                  "biases": Moments.zeros(k, 1), "logits": Moments.zeros(k, 1, second=False)})


# -- the end: pool over the ranks ---------------------------------------------------


def _result(state: State, job: Job, here: World, batch_size: int) -> TemplateSet:
    """The TemplateSet of the run: this rank's state pooled over the ranks (as it is for one process)."""
    parts = {p: (pooled(state.parts[p], here.all_reduce) if here.distributed else state.parts[p]) for p in PARTS}
    counts = here.all_reduce(torch.tensor([state.exact, state.probes, state.skipped, int(state.point_exact)],
                                          dtype=torch.float64))
    max_err = float(here.all_max(torch.tensor([state.max_rel_error], dtype=torch.float64)))
    failed = [FailedProbe(int(i), str(r)) for part in here.gather_json([[f.index, f.reason] for f in state.failed])
              for i, r in part]
    failed.sort(key=lambda f: f.index)
    exact, probes, skipped, point = (int(v) for v in counts.tolist())
    meta = {"by": job.by, "linearization": job.linearization, "dtype": "float64", "tolerance": tolerance_for(DTYPE),
            "max_rel_error": max_err, "probes": probes, "skipped": skipped, "batch_size": batch_size,
            "world_size": here.size, "exactness": "point-exact" if point else "region-exact",
            "check": "W x' + b vs the linearized model at x' = x + 100 d, every probe"}
    return TemplateSet(job.classes, parts["weights"], parts["contributions"], parts["biases"], parts["logits"],
                       job.shape, exact, failed, meta)


class _NoBar:
    def __enter__(self) -> "_NoBar":
        return self

    def __exit__(self, *exc: Any) -> None:
        return None

    def update(self, n: int) -> None:
        return None


def _bar(total: int | None, enabled: bool | None, here: World) -> Any:
    if enabled is None:
        enabled = sys.stderr.isatty() and here.rank == 0
    if not enabled:
        return _NoBar()
    from tqdm.auto import tqdm

    return tqdm(total=total, desc="reconstruct_dataset", unit="probe", leave=False)
