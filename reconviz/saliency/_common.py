"""The attribution family's shared base: one call shape, one prologue.

Every model-based method of :mod:`reconviz.saliency` and :mod:`reconviz.metrics`
is a function ``body(a, **options)`` wrapped by :func:`attribution`, which makes
it ``method(model, x, target, *options, output=None, dtype=torch.float64)``
(metrics take ``saliency_map`` between ``x`` and ``target``). The wrapper runs
the prologue once for all of them and hands the body an :class:`Attribution`:

* ``model`` is checked and deep-copied (:func:`reconviz.probe.eval_copy`: eval
  mode, the working dtype, ``x``'s device, parameters frozen, no user hooks);
  the user's model is never run, hooked, moved or cast, errors included;
* ``x`` is checked (:func:`check_input`) and cast (``a.xw``, read only);
* ``target``'s form is checked against ``N`` (:func:`target_index`), and
  :meth:`Attribution.score` is the one place that turns it into scores
  (:func:`resolve_target`, which also checks the range);
* results come back in ``x``'s dtype (:meth:`Attribution.result`), and the
  copy is dropped in a ``finally``.

A method then states only what differs: its options and its body.
"""

from __future__ import annotations

import functools
import inspect
import operator
from contextlib import nullcontext
from typing import Any, Callable, ContextManager, Sequence, Union

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor
from torch.overrides import TorchFunctionMode

from ..errors import InputError, TrainingModeWarning
from ..probe import OutputSelector, _warn_hooks, _warn_training, check_model, eval_copy
from ..probe import select_output as select_logits

__all__ = [
    "InputError",
    "TrainingModeWarning",
    "Target",
    "OutputSelector",
    "Attribution",
    "attribution",
    "check_input",
    "check_dtype",
    "check_map",
    "resolve_target",
    "target_index",
    "select_logits",
    "Hooks",
    "BatchInvariant",
    "as_baseline",
]

#: The one target type of the family (see :func:`resolve_target`).
Target = Union[int, Sequence[int], Tensor, Callable[[Tensor], Tensor]]


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


def check_map(saliency: Any, x: Tensor) -> Tensor:
    """A map for ``x`` as (N, H, W) float64 on the CPU: as given if (N, H, W); if shaped like
    ``x``, the saliency-map rule max over channels of ``|map|``."""
    if not isinstance(saliency, Tensor):
        raise InputError(f"saliency_map must be a tensor, got {type(saliency).__name__}")
    n, (h, w) = x.shape[0], x.shape[-2:]
    if saliency.shape == (n, h, w):
        m = saliency
    elif saliency.shape == x.shape:
        m = saliency.abs().reshape(n, -1, h, w).amax(1)
    else:
        raise InputError(
            f"saliency_map must be (N, H, W) = {(n, h, w)} or shaped like x {tuple(x.shape)}, "
            f"got {tuple(saliency.shape)}"
        )
    m = m.detach().to(torch.float64)
    if not bool(torch.isfinite(m).all()):
        raise InputError("saliency_map contains NaN/Inf values")
    return m.cpu()


# --------------------------------------------------------------------------
# The target rule (one rule, used by every method)
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
# Hooks on the working copy
# --------------------------------------------------------------------------


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


# --------------------------------------------------------------------------
# The base: one call of an attribution method
# --------------------------------------------------------------------------


_NO_MAP = object()  # a method that takes no saliency map


class Attribution:
    """One call of an attribution method, after the shared prologue (see :func:`attribution`).

    Attributes:
        model: the user's model (only read; never run).
        x: the checked input batch (N, ...); ``n`` = N.
        dtype: the working dtype.
        xw: ``x`` detached, in ``dtype``: may share ``x``'s memory, so read it, never write it.
        target, output: as given; ``index``: the (N,) class indices, None for a callable target.
        map: the checked (N, H, W) map (:func:`check_map`) of a metric, else None.
        work: the private eval-mode copy of the model (None with ``model_copy=False``).
    """

    def __init__(self, model: nn.Module, x: Any, target: Target, *, output: OutputSelector,
                 dtype: torch.dtype | None, min_dim: int = 2, saliency_map: Any = _NO_MAP,
                 model_copy: bool = True) -> None:
        self.model = check_model(model)
        self.x = check_input(x, min_dim=min_dim)
        self.n = self.x.shape[0]
        self.dtype = check_dtype(dtype, self.x)
        self.map = None if saliency_map is _NO_MAP else check_map(saliency_map, self.x)
        self.target, self.output = target, output
        self.index = target_index(target, self.n)  # the form now; the range on the first output
        self.xw = self.x.detach().to(self.dtype)
        # a TrainingModeWarning points at the caller of the public method
        self.work = eval_copy(model, self.dtype, self.x.device, stacklevel=4) if model_copy else None
        if not model_copy:
            _warn_training(model, stacklevel=4)
            _warn_hooks(model, stacklevel=4)

    def close(self) -> None:
        self.work = None

    def result(self, t: Tensor) -> Tensor:
        """``t`` detached, in ``x``'s dtype."""
        return t.detach().to(self.x.dtype)

    def score(self, raw: Any, rows: Tensor | None = None,
              transform: Callable[[Tensor], Tensor] | None = None) -> Tensor:
        """The class score of each row of a model output: the logits picked by ``output``,
        ``transform`` (e.g. softmax), then the target. Row j of a batch belongs to probe
        ``rows[j]`` (default: row i is probe i), whose class it takes."""
        logits = select_logits(raw, self.output, self.n if rows is None else rows.numel())
        return self.resolve(logits if transform is None else transform(logits), rows)

    def resolve(self, logits: Tensor, rows: Tensor | None = None) -> Tensor:
        """The target applied to selected logits (B, K) (:func:`resolve_target`); rows as in :meth:`score`."""
        if self.index is None:
            return resolve_target(logits, self.target)
        return resolve_target(logits, self.index if rows is None else self.index[rows])

    def input_gradient(self, mode: Callable[[nn.Module], ContextManager[Any]] | None = None) -> Tensor:
        """d score / d x in ``dtype``: the backward pass every input-space map shares.

        ``mode(work)``, when given, is a context around the forward pass (e.g. a
        TorchFunctionMode that swaps the rectifiers' backward rule). The forward
        runs on a non-leaf clone, so a model that writes into its input works and
        ``x`` is never written to."""
        xg = self.xw.clone().requires_grad_(True)
        with torch.enable_grad():
            with mode(self.work) if mode is not None else nullcontext():
                raw = self.work(xg.clone())  # type: ignore[misc]
            (g,) = torch.autograd.grad(self.score(raw).sum(), xg, allow_unused=True)
        return torch.zeros_like(xg) if g is None else g.detach()  # None: the score ignores x

    @torch.no_grad()
    def scores(self, make: Callable[[int, int], Tensor], rows: Tensor, batch_size: int, *,
               transform: Callable[[Tensor], Tensor] | None = None,
               after: Callable[[int, int], None] | None = None) -> Tensor:
        """Scores (len(rows),) of inputs made in chunks: ``make(start, stop)`` builds rows start..stop-1.

        ``rows[j]`` is the probe of row j (see :meth:`score`). Runs under
        :class:`BatchInvariant`, so the scores do not depend on ``batch_size``.
        ``after(start, stop)`` is called after each chunk's forward."""
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise InputError(f"batch_size must be a positive int, got {batch_size!r}")
        out = []
        with BatchInvariant():
            for start in range(0, rows.numel(), batch_size):
                stop = min(rows.numel(), start + batch_size)
                batch = make(start, stop).clone()  # the model may write into its input: never into x
                out.append(self.score(self.work(batch), rows[start:stop], transform).detach())  # type: ignore[misc]
                if after is not None:
                    after(start, stop)
        return torch.cat(out)


_P = inspect.Parameter
_SHARED = [_P("output", _P.KEYWORD_ONLY, default=None), _P("dtype", _P.KEYWORD_ONLY, default=torch.float64)]


def attribution(*, min_dim: int = 2, with_map: bool = False, model_copy: bool = True) -> Callable:
    """Make ``body(a: Attribution, *options)`` an attribution method of the family.

    The method's signature is ``(model, x, [saliency_map,] target, *options,
    output=None, dtype=torch.float64)``: ``saliency_map`` with ``with_map`` (the
    metrics), ``min_dim`` the least dimension of ``x``, ``model_copy=False`` for a
    body that hands ``a.model`` to the reconstruction (which copies it itself).
    """

    def wrap(body: Callable) -> Callable:
        options = list(inspect.signature(body).parameters.values())[1:]
        lead = ["model", "x"] + (["saliency_map"] if with_map else []) + ["target"]
        sig = inspect.Signature(
            [_P(name, _P.POSITIONAL_OR_KEYWORD) for name in lead] + options + _SHARED,
            return_annotation=inspect.signature(body).return_annotation,
        )

        @functools.wraps(body)
        def method(*args: Any, **kwargs: Any) -> Any:
            bound = sig.bind(*args, **kwargs)
            bound.apply_defaults()
            kw = bound.arguments
            a = Attribution(kw.pop("model"), kw.pop("x"), kw.pop("target"), output=kw.pop("output"),
                            dtype=kw.pop("dtype"), min_dim=min_dim, saliency_map=kw.pop("saliency_map", _NO_MAP),
                            model_copy=model_copy)
            try:
                return body(a, **kw)
            finally:
                a.close()

        method.__signature__ = sig  # type: ignore[attr-defined]
        method.__doc__ = (body.__doc__ or "").rstrip() + _CALL_DOC
        return method

    return wrap


_CALL_DOC = """

    Shared arguments (one call shape for the family, see :mod:`reconviz.saliency`):
    ``model`` (left untouched: a private eval-mode copy is used), ``x`` (N, ...),
    ``target`` (an int, N ints, or a callable (N, K) -> (N,)), ``output`` (selects
    the logits of a tuple / dict output), ``dtype`` (working precision, default
    float64; None: x's dtype).
"""
