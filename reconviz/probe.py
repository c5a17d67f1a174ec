"""Stage 1 — probe: run the model once on x0 and record every gate's prior.

Calls are intercepted with :class:`torch.overrides.TorchFunctionMode`, which sees
module calls, functional calls (``F.relu``, ``torch.relu``, ``Tensor.relu``) and
in-place variants alike, inside any forward written in plain Python. Ops that
are not affine and cannot be frozen are refused here, with the module path where
they were called.
"""

from __future__ import annotations

import copy
import itertools
import warnings
from contextlib import contextmanager
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor
from torch.overrides import TorchFunctionMode

from . import affine
from .errors import InputError, TrainingModeWarning, UnsupportedOperationError
from .gates import Call, Gate, Prior, gate_for, gate_named, op_name

__all__ = ["Probe", "probe", "check_model", "eval_copy", "working_copy", "select_output", "check_probe_input"]

OutputSelector = int | str | Callable[[Any], Tensor] | None


# --------------------------------------------------------------------------
# The model copy we work on (the user's model is never touched)
# --------------------------------------------------------------------------


def check_model(model: Any) -> nn.Module:
    """``model`` if it is an ``nn.Module`` that runs in Python; InputError otherwise."""
    if not isinstance(model, nn.Module):
        raise InputError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if isinstance(model, torch.jit.ScriptModule):
        raise InputError(
            "TorchScript modules run outside Python, so their gates cannot be intercepted: "
            "pass the original nn.Module, or export it to ONNX and use reconviz.onnx.reconstruct"
        )
    return model


def eval_copy(model: nn.Module, dtype: torch.dtype, device: torch.device, *, stacklevel: int = 3) -> nn.Module:
    """A deep copy of ``model`` in eval mode, in ``dtype`` on ``device``, with frozen parameters.

    The user's model is only read (``copy.deepcopy``). Warns with
    :class:`TrainingModeWarning` when it is in training mode. Every entry point
    of reconviz (reconstruction, verification, the saliency methods and the
    metrics) works on such a copy.
    """
    check_model(model)
    if model.training:
        warnings.warn(
            f"{type(model).__name__} is in training mode; reconviz works on an eval-mode copy "
            "(BatchNorm uses running statistics, Dropout is off). Call model.eval() to silence this.",
            TrainingModeWarning,
            stacklevel=stacklevel,
        )
    # parameters and buffers enter the copy already cast (deepcopy's memo): no float32 copy
    # made only to be cast; .to() then handles anything a module's own _apply converts
    memo: dict[int, Any] = {}
    for t in itertools.chain(model.parameters(), model.buffers()):
        cast = t.detach().to(device=device, dtype=dtype if t.is_floating_point() else None, copy=True)
        memo[id(t)] = _as_parameter(t, cast) if isinstance(t, nn.Parameter) else cast
    work = copy.deepcopy(model, memo).eval().to(device=device, dtype=dtype)
    for p in work.parameters():
        p.requires_grad_(False)
    return work


def _as_parameter(original: nn.Parameter, cast: Tensor) -> nn.Parameter:
    """``cast`` as a frozen parameter of ``original``'s class (nn.Parameter if that fails)."""
    try:
        return type(original)(cast, requires_grad=False)
    except TypeError:
        return nn.Parameter(cast, requires_grad=False)


def working_copy(model: nn.Module, dtype: torch.dtype, device: torch.device) -> nn.Module:
    """:func:`eval_copy` plus the module-path tracker the gate modes use in their messages.

    Warns with :class:`TrainingModeWarning` when the user's model is in training mode.
    """
    work = eval_copy(model, dtype, device, stacklevel=4)
    _install_tracker(work)
    return work


def _install_tracker(work: nn.Module) -> None:
    """Keep a stack of module paths on the (private) copy, for error messages."""
    stack: list[str] = []
    work._reconviz_stack = stack  # type: ignore[attr-defined]

    def enter(name: str) -> Callable:
        def hook(module: nn.Module, args: Any) -> None:
            stack.append(name)
        return hook

    def leave(module: nn.Module, args: Any, out: Any) -> None:
        if stack:
            stack.pop()

    for name, mod in work.named_modules():
        if name:
            mod.register_forward_pre_hook(enter(name))
            mod.register_forward_hook(leave)


def current_path(work: nn.Module) -> str:
    stack = getattr(work, "_reconviz_stack", None)
    return stack[-1] if stack else ""


# --------------------------------------------------------------------------
# Ops refused because they are not affine (and not a known gate)
# --------------------------------------------------------------------------

_SMOOTH = (
    "sigmoid tanh gelu silu mish elu selu celu softplus softsign hardswish hardsigmoid logsigmoid "
    "tanhshrink softshrink hardshrink rrelu glu erf erfc exp exp2 expm1 log log2 log10 log1p sqrt "
    "rsqrt reciprocal pow square sin cos tan atan"
).split()
_NORM = "layer_norm group_norm instance_norm local_response_norm normalize rms_norm".split()
_SELECT = (
    "softmax log_softmax softmin abs sign sgn max min amax amin maximum minimum fmax fmin sort topk "
    "argmax argmin median norm std var logsumexp cumprod prod floor ceil round trunc frac where "
    "masked_fill scaled_dot_product_attention"
).split()

_ADVICE = {
    **{n: "it is a smooth non-linearity, not piecewise linear, so no region-exact linear model "
          "exists; replace it by a ReLU-family activation or reconstruct the part of the network "
          "before it" for n in _SMOOTH},
    **{n: "normalization divides by an input-dependent statistic, which is not affine; use "
          "BatchNorm (affine in eval mode) or reconstruct a sub-network without it" for n in _NORM},
    **{n: "its result depends on the input in a way reconviz cannot freeze; use nn.MaxPool / "
          "nn.AdaptiveMaxPool / ReLU-family modules, or select the logits before it with output=..."
       for n in _SELECT},
}


def _build_refusals() -> dict[Any, str]:
    table: dict[Any, str] = {}
    for name in _ADVICE:
        for space in (torch, torch.Tensor, F, torch.special, torch.linalg):
            for n in (name, name + "_"):
                f = getattr(space, n, None)
                if callable(f):
                    table.setdefault(f, name)
    return table


_REFUSED = _build_refusals()
_PRODUCTS = {
    torch.mul, Tensor.mul, Tensor.mul_, Tensor.__mul__, Tensor.__rmul__, Tensor.__imul__,
    torch.matmul, Tensor.matmul, Tensor.__matmul__, Tensor.__rmatmul__, torch.mm, Tensor.mm,
    torch.bmm, Tensor.bmm, torch.einsum, F.bilinear, torch.outer, torch.kron,
}
_DIVISIONS = {torch.div, Tensor.div, Tensor.div_, Tensor.__truediv__, Tensor.__itruediv__, torch.true_divide}


def _tensors_in(args: Any) -> list[Tensor]:
    if isinstance(args, Tensor):
        return [args]
    if isinstance(args, (list, tuple)):
        return [t for a in args for t in _tensors_in(a)]
    return []


def refuse_if_not_affine(func: Callable, args: tuple, kwargs: dict, path: str) -> None:
    """Raise UnsupportedOperationError for an op that is not affine in the input.

    Input dependence is read from ``requires_grad``: during the probe only the
    input requires grad, so a product of two tensors that both require grad is a
    product of two input-dependent tensors (x * x, attention scores, SE gating).
    """
    if not _hashable(func):
        return
    name = _REFUSED.get(func)
    if name is not None:
        raise UnsupportedOperationError(op_name(func), path, _ADVICE[name])
    if func in (F.dropout, F.dropout1d, F.dropout2d, F.dropout3d, F.alpha_dropout) and _arg_true(
        args, kwargs, 2, "training", func is not F.alpha_dropout
    ):
        raise UnsupportedOperationError(
            op_name(func), path, "functional dropout called with training=True is random; "
            "pass training=self.training so the eval-mode copy disables it"
        )
    if func is F.batch_norm and _arg_true(args, kwargs, 5, "training", False):
        raise UnsupportedOperationError(
            "batch_norm", path, "batch norm with training=True normalizes by batch statistics; "
            "pass training=self.training (reconviz reconstructs the eval-mode model)"
        )
    if func in _PRODUCTS and sum(t.requires_grad for t in _tensors_in((args, kwargs.values()))) >= 2:
        raise UnsupportedOperationError(
            op_name(func), path, "it multiplies two input-dependent tensors (a bilinear op, e.g. "
            "x * x, attention or squeeze-excitation gating), which is not affine in the input"
        )
    if func in _DIVISIONS or func is Tensor.__rtruediv__:
        divisor = args[0] if func is Tensor.__rtruediv__ else (args[1] if len(args) > 1 else None)
        if isinstance(divisor, Tensor) and divisor.requires_grad:
            raise UnsupportedOperationError(
                op_name(func), path, "it divides by an input-dependent tensor, which is not affine"
            )


def _hashable(f: Any) -> bool:
    try:
        hash(f)
        return True
    except TypeError:
        return False


def _arg_true(args: tuple, kwargs: dict, i: int, name: str, default: bool) -> bool:
    v = args[i] if len(args) > i else kwargs.get(name, default)
    return bool(v)


# --------------------------------------------------------------------------
# The modes: shared dispatch, record at the probe
# --------------------------------------------------------------------------


class GateMode(TorchFunctionMode):
    """Routes gated calls to :meth:`on_gate`; everything else runs unchanged."""

    def __init__(self, work: nn.Module):
        super().__init__()
        self.work = work

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        gate = gate_for(func)
        if gate is None:
            self.on_other(func, args, kwargs)
            return affine.call(func, args, kwargs)
        call = gate.parse(func, args, kwargs)
        call.args, call.kwargs = args, kwargs
        return self.on_gate(gate, call, current_path(self.work))

    def on_other(self, func: Callable, args: tuple, kwargs: dict) -> None:
        pass

    def on_gate(self, gate: Gate, call: Call, path: str) -> Any:
        raise NotImplementedError


class RecordMode(GateMode):
    """Runs gates as written and records their priors (stage 1)."""

    def __init__(self, work: nn.Module, n: int):
        super().__init__(work)
        self.n = n
        self.priors: list[Prior] = []
        self.activation_bytes = 0  # bytes of all op outputs: a footprint estimate

    def __torch_function__(self, func, types, args=(), kwargs=None):
        out = super().__torch_function__(func, types, args, kwargs)
        for t in _tensors_in(out):
            self.activation_bytes += t.numel() * t.element_size()
        return out

    def on_other(self, func, args, kwargs):
        refuse_if_not_affine(func, args, kwargs, current_path(self.work))

    def on_gate(self, gate, call, path):
        if any(isinstance(v, Tensor) and v.requires_grad for v in call.params.values()):
            raise UnsupportedOperationError(
                op_name(call.func), path, "its bound or slope depends on the input (e.g. clamp(z, min=x)), "
                "so freezing it as a constant would not be the model; compute it from parameters only"
            )
        shape = tuple(call.z.shape)
        out, tensors, params, ties = gate.record(call, self.n)
        self.priors.append(
            Prior(
                gate=gate.name, op=op_name(call.func), module_path=path, shape=shape,
                batched=len(shape) > 0 and shape[0] == self.n,
                tensors={k: v.detach() for k, v in tensors.items()}, params=params, ties=ties,
            )
        )
        return out


# --------------------------------------------------------------------------
# Probe: one forward pass
# --------------------------------------------------------------------------


@dataclass
class Probe:
    """What the probe pass found: the working copy, the priors, the outputs f(x0)."""

    work: nn.Module
    x: Tensor  # (N, *sample_shape), in the working dtype
    priors: list[Prior]
    logits: Tensor  # (N, K_all): the selected, flattened model output at x0
    output: OutputSelector
    activation_bytes: int  # bytes of all intermediate tensors for the N probes
    # (x0 as a grad leaf, the selected outputs g(x0) with their graph): the probe pass was
    # g's forward pass (every gate records frozen), kept for a reverse-mode solve
    graph: tuple[Tensor, Tensor] | None = None

    @property
    def ties(self) -> int:
        return sum(p.ties for p in self.priors)


def check_probe_input(x: Any, dtype: torch.dtype | None = None) -> Tensor:
    if not isinstance(x, Tensor):
        raise InputError(f"x must be a torch.Tensor batch (N, ...), got {type(x).__name__}")
    if x.dim() < 2:
        raise InputError(
            f"x must be a batch (N, ...) with a leading batch dimension, got shape {tuple(x.shape)}; "
            "for one sample use x.unsqueeze(0)"
        )
    if x.shape[0] < 1:
        raise InputError("x is an empty batch: give at least one probe (N >= 1)")
    if not (x.is_floating_point() or x.is_complex()) and dtype is None:
        raise InputError(f"x must be a floating-point tensor, got {x.dtype}")
    if x.is_complex():
        raise InputError("complex inputs are not supported")
    if not torch.isfinite(x).all():
        bad = int((~torch.isfinite(x)).sum())
        raise InputError(f"x contains {bad} NaN/Inf value(s): the probe must be finite")
    return x if dtype is None else x.to(dtype)


def select_output(out: Any, output: OutputSelector, n: int) -> Tensor:
    """Pick the logits from the model output and flatten them to (B, K)."""
    try:
        if callable(output):
            out = output(out)
        elif isinstance(output, str) and not isinstance(out, Mapping):
            out = getattr(out, output)
        elif output is not None:
            out = out[output]
    except (KeyError, IndexError, AttributeError, TypeError) as e:
        raise InputError(f"output={output!r} could not select the logits from the model output: {e}") from e
    if not isinstance(out, Tensor):
        raise InputError(
            f"the model returned {type(out).__name__}, not a tensor: pass output= (an index, a key, "
            "an attribute name or a callable) to select the logits"
        )
    if out.dim() == 0 or out.shape[0] != n:
        raise InputError(
            f"the selected output has shape {tuple(out.shape)}; expected a leading batch dimension of {n}"
        )
    return out.reshape(n, -1)


@contextmanager
def _probe_grad(x: Tensor) -> Iterator[Tensor]:
    with torch.enable_grad():
        yield x.detach().clone().requires_grad_(True)


def probe(
    model: nn.Module,
    x: Tensor,
    *,
    dtype: torch.dtype = torch.float64,
    output: OutputSelector = None,
    keep_graph: bool = False,
) -> Probe:
    """Run ``model`` once on the probe batch ``x`` (N, ...) and record the priors.

    Piecewise-linear gates continue the pass with their frozen form (the same values),
    so the pass is g's forward at x0; ``keep_graph=True`` keeps its autograd graph in
    ``Probe.graph`` for a reverse-mode solve (when every gate recorded frozen)."""
    x = check_probe_input(x)
    work = working_copy(model, dtype, x.device)
    xw = x.to(dtype)
    mode = RecordMode(work, n=xw.shape[0])
    with _probe_grad(xw) as xg, warnings.catch_warnings():
        # the probe input requires grad (to detect input-dependent products); that is ours
        warnings.filterwarnings("ignore", message="Converting a tensor with requires_grad=True")
        try:
            with mode:
                raw = work(xg.clone())  # a non-leaf: in-place ops on the input stay legal
        except (UnsupportedOperationError, InputError):
            raise
        except RuntimeError as e:
            raise InputError(
                f"the model failed on an input of shape {tuple(x.shape)}: {e}. reconviz passes x "
                "as one batch (N, ...): check the input's shape, dtype and device"
            ) from e
        finally:
            work._reconviz_stack.clear()  # type: ignore[attr-defined]
        selected = select_output(raw, output, xw.shape[0])
    frozen = all(gate_named(p.gate).records_frozen for p in mode.priors)
    graph = (xg, selected) if keep_graph and frozen and selected.requires_grad else None
    return Probe(work, xw, mode.priors, selected.detach(), output, mode.activation_bytes, graph)
