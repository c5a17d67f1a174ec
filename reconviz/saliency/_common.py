"""Shared plumbing of the attribution methods: input checks, the target rule,
a private working copy of the model, hook bookkeeping and batched scoring.

Every method in :mod:`reconviz.saliency` and :mod:`reconviz.metrics` runs the
user's model the same way:

* ``x`` is checked by :func:`check_input` (a finite floating tensor with a
  batch dimension);
* the model is deep-copied by :func:`working_model` (eval mode, the working
  dtype, ``x``'s device, parameters frozen); the user's model is never run,
  hooked, moved, cast or switched to eval, so its ``state_dict``, training
  flags, ``requires_grad`` flags and hook dictionaries are unchanged whatever
  happens, errors included;
* every hook put on the copy is registered through :class:`Hooks`, which
  removes them in a ``finally``;
* the class score comes from :func:`resolve_target`, the one place that turns
  ``target`` into scores.

The working copy and the logits selector are the core's own
(:func:`reconviz.probe.eval_copy`, :func:`reconviz.probe.select_output`), so a
model is copied, checked and read the same way by every entry point.
"""

from __future__ import annotations

import operator
from contextlib import contextmanager
from typing import Any, Callable, Iterator, Sequence, Union

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor
from torch.overrides import TorchFunctionMode

from ..errors import InputError, TrainingModeWarning
from ..probe import eval_copy
from ..probe import select_output as select_logits

__all__ = [
    "InputError",
    "TrainingModeWarning",
    "Target",
    "OutputSelector",
    "check_input",
    "check_dtype",
    "resolve_target",
    "target_index",
    "select_logits",
    "working_model",
    "Hooks",
    "BatchInvariant",
    "score_batches",
    "as_baseline",
]

Target = Union[int, Sequence[int], Tensor, Callable[[Tensor], Tensor]]
OutputSelector = Union[int, str, Callable[[Any], Tensor], None]


# --------------------------------------------------------------------------
# Input checks
# --------------------------------------------------------------------------


def check_input(x: Any, *, min_dim: int = 2, what: str = "x") -> Tensor:
    """Check that ``x`` is a non-empty, finite, floating-point batch (N, ...) of dim >= ``min_dim``."""
    if not isinstance(x, Tensor):
        raise InputError(f"{what} must be a torch.Tensor batch (N, ...), got {type(x).__name__}")
    if not x.is_floating_point():
        raise InputError(f"{what} must be a floating-point tensor, got {x.dtype}; convert it with x.float()")
    if x.dim() < min_dim:
        hint = "; for one sample use x.unsqueeze(0)" if min_dim == 2 else ""
        raise InputError(
            f"{what} must have at least {min_dim} dimensions (N, ...) with a leading batch dimension, "
            f"got shape {tuple(x.shape)}{hint}"
        )
    if x.shape[0] < 1 or x.numel() == 0:
        raise InputError(f"{what} is empty (shape {tuple(x.shape)}): give at least one input")
    if not bool(torch.isfinite(x).all()):
        bad = int((~torch.isfinite(x)).sum())
        raise InputError(f"{what} contains {bad} NaN/Inf value(s): inputs must be finite")
    return x


def check_dtype(dtype: torch.dtype | None, x: Tensor) -> torch.dtype:
    """The working dtype: ``dtype``, or ``x.dtype`` when None; must be floating point."""
    dt = x.dtype if dtype is None else dtype
    if not isinstance(dt, torch.dtype) or not dt.is_floating_point:
        raise InputError(f"dtype must be a floating-point torch.dtype (or None for x's dtype), got {dt!r}")
    return dt


# --------------------------------------------------------------------------
# The target rule (one helper, used by every method)
# --------------------------------------------------------------------------


def target_index(target: Any, n: int) -> Tensor | None:
    """``target`` as a LongTensor of ``n`` class indices, or None when it is a callable.

    Accepted: an int (the same class for every input), a sequence / 1-D integer
    tensor / numpy array of ``n`` ints (one per input), or a callable. Range
    checks against the number of classes are done by :func:`resolve_target`.
    """
    if callable(target) and not isinstance(target, Tensor):
        return None
    if isinstance(target, bool):
        raise InputError(f"target must be an int class index, a sequence of {n} indices or a callable, got a bool")
    if isinstance(target, Tensor):
        if target.is_floating_point() or target.is_complex() or target.dtype == torch.bool:
            raise InputError(f"a target tensor must hold integer class indices, got dtype {target.dtype}")
        idx = target.detach().to(torch.long).reshape(-1).cpu() if target.dim() <= 1 else None
        if idx is None:
            raise InputError(f"a target tensor must be 0-D or 1-D, got shape {tuple(target.shape)}")
    else:
        try:
            idx = torch.tensor([operator.index(target)], dtype=torch.long)
        except TypeError:
            try:
                vals = [operator.index(t) for t in target]  # type: ignore[union-attr]
            except TypeError as e:
                raise InputError(
                    "target must be an int class index, a sequence / 1-D tensor of ints (one per input), "
                    f"or a callable mapping the output (N, K) to scores (N,); got {target!r}"
                ) from e
            if any(isinstance(t, bool) for t in target):  # type: ignore[union-attr]
                raise InputError("target indices must be ints, not bools")
            idx = torch.tensor(vals, dtype=torch.long)
    if idx.numel() == 1:
        idx = idx.expand(n)
    if idx.numel() != n:
        raise InputError(f"target must be one index or {n} indices (one per input), got {idx.numel()}")
    return idx


def resolve_target(output: Tensor, target: Target) -> Tensor:
    """The class score of each row of ``output`` (N, K): a tensor (N,).

    ``target`` is an int (column ``target`` of every row), a sequence or 1-D
    integer tensor of N ints (column ``target[i]`` of row i), or a callable
    ``f(output) -> (N,)`` (for example ``lambda out: out[:, 3] - out[:, 5]``).
    Indices must lie in ``[0, K)``; anything else raises :class:`InputError`.

    The scores keep ``output``'s autograd graph, so ``d score / d x`` can be taken.
    """
    if not isinstance(output, Tensor) or output.dim() != 2:
        shape = tuple(output.shape) if isinstance(output, Tensor) else type(output).__name__
        raise InputError(f"resolve_target needs a model output of shape (N, K), got {shape}")
    n, k = output.shape
    if callable(target) and not isinstance(target, Tensor):
        score = target(output)
        if not isinstance(score, Tensor) or score.numel() != n or (score.dim() > 0 and score.shape[0] != n):
            got = tuple(score.shape) if isinstance(score, Tensor) else type(score).__name__
            raise InputError(
                f"a target callable must map the output {tuple(output.shape)} to one score per input ({n},); "
                f"it returned {got}"
            )
        return score.reshape(n)
    idx = target_index(target, n)
    assert idx is not None
    idx = idx.to(output.device)
    if bool(((idx < 0) | (idx >= k)).any()):
        bad = sorted({int(i) for i in idx.tolist() if i < 0 or i >= k})
        raise InputError(f"target index out of range: {bad} (the model has {k} outputs, valid: 0..{k - 1})")
    return output.gather(1, idx[:, None]).reshape(n)


# --------------------------------------------------------------------------
# The working copy and hooks
# --------------------------------------------------------------------------


@contextmanager
def working_model(model: nn.Module, dtype: torch.dtype, device: torch.device) -> Iterator[nn.Module]:
    """A private deep copy of ``model``: eval mode, ``dtype``, on ``device``, parameters frozen.

    The user's model itself is only read (``copy.deepcopy``): its parameters,
    buffers, training flags, ``requires_grad`` flags and hooks stay as they were,
    also when the body raises. A model in training mode triggers a
    :class:`TrainingModeWarning` (the copy uses running BatchNorm statistics and
    no dropout).
    """
    work = eval_copy(model, dtype, device, stacklevel=5)
    try:
        yield work
    finally:
        del work


class Hooks:
    """Collects hook handles and removes them all on exit (``with Hooks() as h: h.add(...)``)."""

    def __init__(self) -> None:
        self.handles: list[Any] = []

    def add(self, handle: Any) -> Any:
        self.handles.append(handle)
        return handle

    def remove(self) -> None:
        while self.handles:
            self.handles.pop().remove()

    def __enter__(self) -> "Hooks":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.remove()


def named_module(work: nn.Module, name: str) -> nn.Module:
    """The submodule called ``name`` (as in ``named_modules()``), or a clear error."""
    mods = dict(work.named_modules())
    if name not in mods:
        names = [k for k in mods if k][:20]
        raise InputError(f"no module named {name!r} in the model; some names: {names}")
    return mods[name]


# --------------------------------------------------------------------------
# Batch-invariant evaluation
# --------------------------------------------------------------------------


_MATMULS = {"matmul", "mm", "__matmul__"}


class BatchInvariant(TorchFunctionMode):
    """Evaluates matrix products one sample at a time, so that a row's result does
    not depend on which other rows share its batch.

    BLAS rounds a matrix-matrix product (a batch of rows) differently from a
    matrix-vector product (one row), by about 1e-16 relative in float64. Under
    this mode ``F.linear`` (``nn.Linear``) and ``matmul`` / ``mm`` / ``@`` with a
    2-D right operand are computed as a loop over the leading (batch) dimension
    of the left operand, i.e. exactly as when the model is run on that sample
    alone. Convolution, pooling, batch norm (eval) and elementwise ops are
    already computed per sample on the CPU in float64. Used by occlusion and the
    metrics, whose results must not depend on ``batch_size``.
    """

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = getattr(func, "__name__", "")
        if func is F.linear and args and isinstance(args[0], Tensor):
            inp = args[0]
            if inp.dim() >= 2 and inp.shape[0] > 1:
                rest = args[1:]
                return torch.cat([func(inp[i : i + 1], *rest, **kwargs) for i in range(inp.shape[0])])
        elif (
            name in _MATMULS
            and len(args) >= 2
            and isinstance(args[0], Tensor)
            and isinstance(args[1], Tensor)
            and args[0].dim() >= 2
            and args[1].dim() == 2
            and args[0].shape[0] > 1
            and not kwargs
        ):
            a, b = args[0], args[1]
            return torch.cat([func(a[i : i + 1], b) for i in range(a.shape[0])])
        return func(*args, **kwargs)


def as_baseline(baseline: Any, x: Tensor, dtype: torch.dtype) -> Tensor:
    """``baseline`` (a number, or a tensor broadcastable to ``x``) as a tensor of x's shape."""
    if isinstance(baseline, bool):
        raise InputError("baseline must be a number or a tensor broadcastable to x, got a bool")
    if isinstance(baseline, (int, float)):
        if baseline != baseline or baseline in (float("inf"), float("-inf")):
            raise InputError(f"baseline must be finite, got {baseline}")
        return torch.full_like(x, float(baseline), dtype=dtype)
    if not isinstance(baseline, Tensor):
        raise InputError(f"baseline must be a number or a tensor broadcastable to x, got {type(baseline).__name__}")
    b = baseline.detach().to(device=x.device, dtype=dtype)
    try:
        b = torch.broadcast_to(b, x.shape).clone()
    except RuntimeError as e:
        raise InputError(
            f"baseline of shape {tuple(baseline.shape)} does not broadcast to x's shape {tuple(x.shape)}; "
            "e.g. a per-channel mean should have shape (C, 1, 1)"
        ) from e
    if not bool(torch.isfinite(b).all()):
        raise InputError("baseline contains NaN/Inf values")
    return b


@torch.no_grad()
def score_batches(
    work: nn.Module,
    make: Callable[[int, int], Tensor],
    rows: Tensor,
    n_probes: int,
    target: Target,
    *,
    output: OutputSelector,
    batch_size: int,
    transform: Callable[[Tensor], Tensor] | None = None,
    after: Callable[[int, int], None] | None = None,
) -> Tensor:
    """Scores (len(rows),) of inputs made in chunks: ``make(start, stop)`` builds rows start..stop-1.

    ``rows[j]`` (in ``0..n_probes-1``) is the probe index of row j (picks that probe's class for int
    targets). ``transform`` is applied to the logits before the target (e.g.
    softmax). Runs under :class:`BatchInvariant`, so the scores do not depend on
    ``batch_size``. ``after(start, stop)`` is called after each chunk's forward.
    """
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise InputError(f"batch_size must be a positive int, got {batch_size!r}")
    idx = target_index(target, n_probes)
    count = rows.numel()
    out_scores = []
    with BatchInvariant():
        for start in range(0, count, batch_size):
            stop = min(count, start + batch_size)
            batch = make(start, stop).clone()  # the model may write into its input: never into x
            logits = select_logits(work(batch), output, stop - start)
            if transform is not None:
                logits = transform(logits)
            t = target if idx is None else idx[rows[start:stop]]
            out_scores.append(resolve_target(logits, t).detach())
            if after is not None:
                after(start, stop)
    return torch.cat(out_scores)
