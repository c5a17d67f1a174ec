"""Stage 1 — probe: run the model once on x0 and record every gate's prior.

Calls are intercepted with :class:`torch.overrides.TorchFunctionMode`, which sees
module calls, functional calls (``F.relu``, ``torch.relu``, ``Tensor.relu``) and
in-place variants alike, inside any forward written in plain Python. Ops that
are not affine and cannot be frozen are refused here, with the module path where
they were called.
"""

from __future__ import annotations

import copy
import copyreg
import itertools
import warnings
from contextlib import contextmanager
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import torch
import torch.nn as nn
from torch import Tensor
from torch.overrides import TorchFunctionMode

from . import affine
from .errors import HooksRemovedWarning, InputError, ReconvizError, TrainingModeWarning, UnsupportedOperationError
from .ops import check_call, check_result, input_dependent, op_for
from .ops.affine import METADATA
from .ops.registry import NO_GRAD_ADVICE, composite_body
from .ops.base import in_place, op_name, tensors_in
from .ops.factors import FACTOR, Provenance, product_op
from .ops.gates import Call, Gate, Prior, gate_for, gate_named, in_layout_of

__all__ = [
    "Probe", "probe", "probe_pass", "record", "Recording", "check_dtype", "check_model", "eval_copy",
    "tree_copy", "select_output", "check_probe_input",
]

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
    scripted = [name for name, m in model.named_modules() if name and isinstance(m, torch.jit.ScriptModule)]
    if scripted:
        raise InputError(
            f"submodule '{scripted[0]}' is a TorchScript module: it runs outside Python, so reconviz "
            "cannot see its operations; use the original nn.Module there, or export the whole "
            "model to ONNX and use reconviz.onnx.reconstruct"
        )
    if any(t.is_meta for t in itertools.chain(model.parameters(), model.buffers())):
        raise InputError(
            "the model has parameters or buffers on the meta device (shapes without data): load its "
            "weights first (model.to_empty(device='cpu') then model.load_state_dict(...))"
        )
    return model


def eval_copy(model: nn.Module, dtype: torch.dtype, device: torch.device, *, stacklevel: int = 3,
              keep_hooks: bool = False, track_paths: bool = False) -> nn.Module:
    """A deep copy of ``model`` in eval mode, in ``dtype`` on ``device``, with frozen parameters.

    The user's model is only read (``copy.deepcopy``). Warns with
    :class:`TrainingModeWarning` when it, or any submodule, is in training mode.
    The copy carries none of the model's forward and backward hooks (a hook that
    writes into the user's objects would change them), unless ``keep_hooks``.
    ``track_paths``: the copy keeps a stack of the module paths it is in (the gate
    modes name them in their messages).
    Every entry point of reconviz (reconstruction, verification, the saliency
    methods and the metrics) works on such a copy. A module reconviz made itself from
    such a copy (``layer=``'s :class:`~reconviz.layer.LayerTail`, marked ``PRIVATE_COPY``
    with its dtype and device) is returned as it is: it is copied once, not twice.
    """
    if getattr(model, PRIVATE_COPY, None) == (dtype, torch.device(device)):
        if track_paths and not hasattr(model, "_reconviz_stack"):
            _install_tracker(model)
        return model
    check_model(model)
    _warn_training(model, stacklevel + 1)
    # parameters and buffers enter the copy already cast (deepcopy's memo): no float32 copy
    # made only to be cast; .to() then handles anything a module's own _apply converts
    memo: dict[int, Any] = {}
    for t in itertools.chain(model.parameters(), model.buffers()):
        cast = t.detach().to(device=device, dtype=dtype if t.is_floating_point() else None, copy=True)
        memo[id(t)] = _as_parameter(t, cast) if isinstance(t, nn.Parameter) else cast
    if not keep_hooks:
        _warn_hooks(model, stacklevel + 1)
        for m in model.modules():
            for name in _HOOK_DICTS:
                hooks = getattr(m, name, None)
                if hooks is not None:
                    memo[id(hooks)] = type(hooks)()
    try:
        work = tree_copy(model, memo).eval().to(device=device, dtype=dtype)
    except Exception as e:  # a module that cannot be copied: reconviz never works on the original
        raise InputError(
            f"reconviz could not copy the model to work on ({type(e).__name__}: {e}). It works on a deep "
            "copy so that your model is never changed: make the model deep-copyable (no TorchScript "
            "functions or open handles as attributes; for pruning or weight_norm, run one forward "
            "pass with torch.no_grad() or make the reparametrisation permanent first)"
        ) from e
    for p in work.parameters():
        p.requires_grad_(False)
    if track_paths:
        _install_tracker(work)
    return work


def tree_copy(obj: Any, memo: dict[int, Any]) -> Any:
    """``copy.deepcopy(obj, memo)``, walking a module tree itself.

    deepcopy dispatches every object it meets, the strings and flags of each module's
    ``__dict__`` included, at about a microsecond each (the digits CNN's eval copy: 2.3 ms
    with this walk, 3.3 ms with deepcopy, interleaved medians). Here plain values are kept
    as deepcopy keeps them; plain dicts, lists, sets of plain values and modules that copy by
    their ``__dict__`` (:func:`_copies_by_dict`) are rebuilt the way deepcopy rebuilds them;
    anything else goes to ``copy.deepcopy`` with the same memo."""
    cls = type(obj)
    if cls in _ATOMIC or (cls is tuple and all(type(o) in _ATOMIC for o in obj)):
        return obj
    done = memo.get(id(obj), memo)
    if done is not memo:
        return done
    if cls is list or cls is dict or (cls is OrderedDict and not vars(obj)):
        new: Any = cls()
        memo[id(obj)] = new
        if cls is list:
            new.extend(tree_copy(v, memo) for v in obj)
        else:
            for k, v in obj.items():
                new[tree_copy(k, memo)] = tree_copy(v, memo)
        return new
    if cls in (set, frozenset) and all(type(o) in _ATOMIC for o in obj):
        memo[id(obj)] = new = cls(obj)
        return new
    if isinstance(obj, nn.Module) and _copies_by_dict(cls):
        new = cls.__new__(cls)
        memo[id(obj)] = new
        new.__setstate__({k: tree_copy(v, memo) for k, v in obj.__getstate__().items()})
        return new
    return copy.deepcopy(obj, memo)


_ATOMIC = frozenset({int, float, bool, str, bytes, complex, type(None), torch.dtype, torch.device})


def _copies_by_dict(cls: type) -> bool:
    """deepcopy would copy an instance of ``cls`` as ``cls.__new__(cls)`` + ``nn.Module.__getstate__()``
    (its ``__dict__``), deep-copied, handed to its ``__setstate__``: no __deepcopy__, reduce,
    getstate, new-args or slots of its own, and no list, dict or set base whose items deepcopy
    would copy too. Asked afresh each time (a class may gain a __deepcopy__ later)."""
    return (getattr(cls, "__deepcopy__", None) is None and cls not in copyreg.dispatch_table
            and cls.__reduce_ex__ is object.__reduce_ex__ and cls.__reduce__ is object.__reduce__
            and cls.__getstate__ is nn.Module.__getstate__ and not issubclass(cls, (list, dict, set))
            and getattr(cls, "__getnewargs_ex__", None) is None and getattr(cls, "__getnewargs__", None) is None
            and not copyreg._slotnames(cls))


PRIVATE_COPY = "_reconviz_private_copy"  # (dtype, device) of a module built by reconviz over its own eval copy

# the hooks that run in a forward or backward pass: left off the copy unless keep_hooks
_HOOK_DICTS = (
    "_forward_hooks", "_forward_pre_hooks", "_forward_hooks_with_kwargs", "_forward_pre_hooks_with_kwargs",
    "_forward_hooks_always_called", "_backward_hooks", "_backward_pre_hooks",
)


def _warn_hooks(model: nn.Module, stacklevel: int) -> None:
    """HooksRemovedWarning naming the modules whose forward hooks the copy leaves off."""
    hooked = [name or type(model).__name__ for name, m in model.named_modules()
              if any(getattr(m, h, None) for h in _HOOK_DICTS)]
    if hooked:
        shown = ", ".join(f"'{n}'" for n in hooked[:5]) + (f" and {len(hooked) - 5} more" if len(hooked) > 5 else "")
        warnings.warn(
            f"module(s) {shown} have forward or backward hooks; reconviz's copy runs without them, so "
            "the result is of the model without its hooks. If they change the output (pruning, "
            "weight_norm, a hook that edits activations), pass keep_hooks=True",
            HooksRemovedWarning, stacklevel=stacklevel,
        )


def _warn_training(model: nn.Module, stacklevel: int) -> None:
    """TrainingModeWarning when the model or any submodule is in training mode."""
    training = [name for name, m in model.named_modules() if m.training and name]
    if model.training:
        what = f"{type(model).__name__} is in training mode"
    elif training:
        shown = ", ".join(f"'{n}'" for n in training[:5]) + (f" and {len(training) - 5} more" if len(training) > 5 else "")
        what = (f"{type(model).__name__} is in eval mode, but its submodule(s) {shown} are in training "
                "mode")
    else:
        return
    warnings.warn(
        f"{what}; reconviz works on an eval-mode copy (every module in eval mode: BatchNorm uses "
        "running statistics, Dropout is off), so its logits are what the model returns after model.eval(). "
        "Call model.eval() to silence this.",
        TrainingModeWarning,
        stacklevel=stacklevel,
    )


def _as_parameter(original: nn.Parameter, cast: Tensor) -> nn.Parameter:
    """``cast`` as a frozen parameter of ``original``'s class (nn.Parameter if that fails)."""
    try:
        return type(original)(cast, requires_grad=False)
    except TypeError:
        return nn.Parameter(cast, requires_grad=False)


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
# The modes: shared dispatch, record at the probe
# --------------------------------------------------------------------------


class GateMode(TorchFunctionMode):
    """Routes gated calls to :meth:`on_gate`; everything else to :meth:`on_other`."""

    def __init__(self, work: nn.Module):
        super().__init__()
        self.work = work
        self.products = 0  # product and division calls so far (the value rule's frozen factors)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if op_for(func) is METADATA:  # a size, dtype or flag: no value to classify or freeze
            return func(*args, **kwargs)
        return self.dispatch(func, args, kwargs)

    def dispatch(self, func: Callable, args: tuple, kwargs: dict) -> Any:
        """A call that is not a metadata read: a composite's body, a gate, or anything else."""
        body = composite_body(func)
        if body is not None:  # multi-head attention: its own Python body, every call seen
            with self:
                return body(*args, **kwargs)
        gate = gate_for(func)
        if gate is None or not gate.applies(func, args, kwargs):
            if product_op(func) is not None:
                self.products += 1
            return self.on_other(func, args, kwargs)
        if not args and "input" in kwargs:  # torch.relu(input=z): the gated tensor by keyword
            args, kwargs = (kwargs["input"],), {k: v for k, v in kwargs.items() if k != "input"}
        path = current_path(self.work)
        try:
            call = gate.parse(func, args, kwargs)
        except UnsupportedOperationError as e:  # a gate that refuses these arguments
            raise UnsupportedOperationError(e.operation, e.module_path or path, e.advice) from None
        call.args, call.kwargs = args, kwargs
        return self.on_gate(gate, call, path)

    def on_other(self, func: Callable, args: tuple, kwargs: dict) -> Any:
        """A call that is not a gate: run as written (through its lean form, if any)."""
        return affine.call(func, args, kwargs)

    def on_gate(self, gate: Gate, call: Call, path: str) -> Any:
        raise NotImplementedError


class RecordMode(GateMode):
    """Runs the model once at the probe (stage 1): classifies every call through the op
    registry (:mod:`reconviz.ops`: refused ones raise) and records every gate's prior.

    Input dependence is read from ``requires_grad``: only the probe input requires grad."""

    def __init__(self, work: nn.Module, n: int, keep_tail: bool = False):
        super().__init__(work)
        self.n = n
        self.priors: list[Prior] = []
        self.activation_bytes = 0  # bytes of all op outputs: a footprint estimate
        self._seen: set[Any] = set()
        self.tail: list[tuple[Tensor, int]] | None = [] if keep_tail else None
        self.provenance = Provenance()  # the value rule: which tensors are factors, or pending

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        self.check_inputs(func, (args, kwargs), current_path(self.work))
        if op_for(func) is METADATA:  # (no tensor out: nothing to count, mark or keep)
            return func(*args, **kwargs)
        out = self.dispatch(func, args, kwargs)
        outs = list(tensors_in(out))
        for t in outs:
            self.activation_bytes += t.numel() * t.element_size()
        self.saw(out, args[:1])  # the outputs, and a tensor an in-place call wrote into
        self._keep_tail(func, outs)
        return out

    def _keep_tail(self, func: Callable, outs: list[Tensor]) -> None:
        """Remember the input-dependent, batched, single outputs made since the last gate (with
        their versions): the affine tail's candidate cuts (:meth:`LinearizedModel.head_cut`)."""
        if self.tail is None:
            return
        if gate_for(func) is not None and any(t.requires_grad for t in outs):
            self.tail.clear()  # an input-dependent gate: the tail starts at its output
        keep_cut_candidate(self.tail, outs, self.n)

    def saw(self, *objs: Any) -> None:
        """Remember the autograd nodes of input-dependent tensors a seen call produced."""
        for t in tensors_in(objs):
            if t.requires_grad and t.grad_fn is not None:
                self._seen.add(t.grad_fn)

    def check_inputs(self, func: Callable | None, args: Any, path: str) -> None:
        """UnsupportedOperationError when an input-dependent tensor was computed by something the
        mode did not see (TorchScript code, a torch._C.DisableTorchFunction block, a C++
        extension): reconviz cannot know what it did."""
        for t in tensors_in(args):
            if t.requires_grad and t.grad_fn is not None and not self._seen_node(t.grad_fn):
                raise UnsupportedOperationError(
                    op_name(func) if func is not None else f"{t.grad_fn.name()} (unseen)", path,
                    f"its input was computed by an operation reconviz did not see ({t.grad_fn.name()} "
                    "in autograd): TorchScript code (torch.jit.script functions or modules), a "
                    "torch._C.DisableTorchFunction block or a C++ extension runs outside the op "
                    "registry; call plain torch operations in Python instead"
                )

    def _seen_node(self, node: Any) -> bool:
        """A seen call's node, or a view regenerated after an in-place write into a seen base."""
        while node not in self._seen:
            if node.name() not in _VIEW_REGENERATION:
                return False
            parents = [n for n, _ in node.next_functions if n is not None]
            if len(parents) != 1:
                return all(self._seen_node(n) for n in parents)
            node = parents[0]
        return True

    def on_other(self, func, args, kwargs):
        path = current_path(self.work)
        step = self.provenance.call(func, args, kwargs, path)
        if step.frozen:  # a factor frozen at its value (the value rule): replayed at this call
            self.priors.append(FACTOR.prior(func, step, path, self.products))
        try:
            op = check_call(func, step.args, step.kwargs, path)
        except UnsupportedOperationError as e:  # a product of two input-dependent tensors: pending
            step.defer(e)
            if not torch.is_grad_enabled():
                raise UnsupportedOperationError(op_name(func), path, NO_GRAD_ADVICE) from None
            op = None
        out = super().on_other(func, step.args, step.kwargs)
        if op is not None:
            check_result(op, func, step.args, out, path)
        self._mark(func, args, out, step.out)
        return out

    def _mark(self, func: Callable, args: tuple, out: Any, mark: Any) -> None:
        """Give the call's output (and the tensor an in-place call wrote into) its mark."""
        self.provenance.set(out, mark)
        if args and isinstance(args[0], Tensor) and in_place(func):
            self.provenance.set(args[0], mark)

    def on_gate(self, gate, call, path):
        if not input_dependent(call.z):  # F.relu(self.scale): a constant, replayed as written
            if input_dependent((call.args, call.kwargs)):
                raise UnsupportedOperationError(
                    op_name(call.func), path, "the tensor it gates does not depend on the input but another "
                    "argument does (scaled_dot_product_attention with constant values): freezing it would "
                    "make the result a constant; compute it from the input's features")
            self.priors.append(self._prior(gate, call, path, {}, {}, 0, constant=True))
            return call.original()
        mark = self.provenance.gate(gate, call.z, call.func, path)
        if not torch.is_grad_enabled():  # a frozen mask read under no_grad would leave autograd
            raise UnsupportedOperationError(op_name(call.func), path, NO_GRAD_ADVICE)
        if input_dependent(call.params):
            raise UnsupportedOperationError(
                op_name(call.func), path, "its bound or slope depends on the input (e.g. clamp(z, min=x)), "
                "so freezing it as a constant would not be the model; compute it from parameters only"
            )
        expected = _reference(call)
        out, tensors, params, ties = gate.record(call, self.n)
        out = in_layout_of(out, call.z)
        _check_frozen(call, out, expected, path)
        self.priors.append(self._prior(gate, call, path, tensors, params, ties))
        self._mark(call.func, call.args, out, mark)
        return out

    def _prior(self, gate: Gate, call: Call, path: str, tensors: dict, params: dict, ties: int,
               constant: bool = False) -> Prior:
        shape = tuple(call.z.shape)
        return Prior(
            gate=gate.name, op=op_name(call.func), module_path=path, shape=shape,
            batched=len(shape) > 0 and shape[0] == self.n and not constant,
            tensors={k: v.detach() for k, v in tensors.items()}, params=params, ties=ties, constant=constant,
        )


TAIL_KEPT = 64  # candidate cuts kept from the affine tail (the last ones)


def keep_cut_candidate(tail: list[tuple[Tensor, int]], outs: list[Tensor], n: int) -> None:
    """Append a call's output to ``tail`` (with its version) when it is one input-dependent
    tensor with the batch of ``n`` in front; keep the last :data:`TAIL_KEPT`."""
    if len(outs) == 1 and outs[0].requires_grad and outs[0].dim() > 0 and outs[0].shape[0] == n:
        tail.append((outs[0], outs[0]._version))
        del tail[:-TAIL_KEPT]

# autograd nodes that stand for a view of a tensor modified in place (regenerated lazily)
_VIEW_REGENERATION = {"AsStridedBackward0", "AsStridedBackward1", "CopySlices"}


def _reference(call: Call) -> Any:
    """The op's own output at the probe, computed on a copy of z (an in-place op keeps z)."""
    z = call.z
    copy_ = z.detach().clone()
    args = tuple(copy_ if a is z else a for a in call.args)
    kwargs = {k: (copy_ if v is z else v) for k, v in call.kwargs.items()}
    with torch.no_grad():
        return call.func(*args, **kwargs)


def _check_frozen(call: Call, out: Any, expected: Any, path: str) -> None:
    """UnsupportedOperationError unless the frozen form equals the op at the probe, value for value
    (e.g. clamp with min > max, whose frozen form would not be the op)."""
    got, ref = list(tensors_in(out)), list(tensors_in(expected))
    same = len(got) == len(ref) and all(
        g.shape == r.shape and torch.equal(g.detach(), r.to(g.dtype)) for g, r in zip(got, ref)
    )
    if not same:
        raise UnsupportedOperationError(
            op_name(call.func), path, "its frozen form differs from the op's own output at the probe, so "
            "freezing it would not be the model (e.g. clamp or hardtanh with min > max); check its arguments"
        )


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
    # tensors of that graph made after the last gate (with their versions at the time): where
    # the affine head may be cut (kept with the graph only)
    tail: list[tuple[Tensor, int]] | None = None

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
    if x[0].numel() == 0:
        raise InputError(f"each probe has no elements (x has shape {tuple(x.shape)})")
    if x.is_meta:
        raise InputError("x is on the meta device (a shape without data): give a tensor with values")
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
    if out.numel() == 0:
        raise InputError(f"the selected output has shape {tuple(out.shape)}: no logits to reconstruct")
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
    keep_hooks: bool = False,
) -> Probe:
    """Run ``model`` once on the probe batch ``x`` (N, ...) and record the priors.

    Piecewise-linear gates continue the pass with their frozen form (the same values),
    so the pass is g's forward at x0; ``keep_graph=True`` keeps its autograd graph in
    ``Probe.graph`` for a reverse-mode solve (when every gate recorded frozen).
    ``keep_hooks``: run the model's own forward hooks on the copy (default: left off)."""
    x = check_probe_input(x)
    check_dtype(dtype)
    work = eval_copy(model, dtype, x.device, keep_hooks=keep_hooks, track_paths=True)
    return probe_pass(work, x.to(dtype), output, keep_graph)


def probe_pass(work: nn.Module, x: Tensor, output: OutputSelector, keep_graph: bool = False,
               keep_tail: bool | None = None) -> Probe:
    """:func:`probe` on reconviz's working copy ``work`` at ``x`` (already in its dtype): the
    graph is kept when asked and the pass was g's (every gate recorded frozen), with the affine
    tail's candidate cuts unless ``keep_tail=False``."""
    keep_tail = keep_graph if keep_tail is None else keep_tail
    rec = record(work, x, output, keep_tail=keep_tail)
    frozen = all(gate_named(p.gate).records_frozen for p in rec.priors if not p.constant)
    kept = keep_graph and frozen and rec.outputs.requires_grad
    graph = (rec.x, rec.outputs) if kept else None
    return Probe(work, x, rec.priors, rec.outputs.detach(), output, rec.activation_bytes, graph,
                 rec.tail if kept and keep_tail else None)


@dataclass
class Recording:
    """One recorded pass: the input leaf, the selected outputs (with their graph), the priors."""

    x: Tensor
    outputs: Tensor
    priors: list[Prior]
    activation_bytes: int
    tail: list[tuple[Tensor, int]] | None = None  # the affine tail's tensors (keep_tail)


def record(work: nn.Module, x: Tensor, output: OutputSelector, keep_tail: bool = False) -> Recording:
    """Run the working copy once at ``x`` under :class:`RecordMode` (every call classified,
    every gate's prior recorded; the output selector runs under the mode too). ``keep_tail``:
    keep the tensors made after the last gate (:attr:`RecordMode.tail`)."""
    mode = RecordMode(work, n=x.shape[0], keep_tail=keep_tail)
    with _probe_grad(x) as xg, warnings.catch_warnings():
        # the probe input requires grad (to detect input-dependent products); that is ours
        warnings.filterwarnings("ignore", message="Converting a tensor with requires_grad=True")
        start = xg.clone()  # a non-leaf: in-place ops on the input stay legal
        mode.saw(start)
        try:
            with mode:
                selected = select_output(work(start), output, x.shape[0])
                mode.check_inputs(None, (selected,), "the selected output")
                mode.provenance.check_output(selected)
        except ReconvizError:
            raise
        except MODEL_ERRORS as e:
            if mode.provenance.first_pending is not None:  # it failed after a refused product ran on
                raise mode.provenance.first_pending from e
            raise InputError(
                f"the model failed on an input of shape {tuple(x.shape)}: {type(e).__name__}: {e}. reconviz "
                "passes x as one batch (N, ...): check the input's shape, dtype and device"
            ) from e
        finally:
            work._reconviz_stack.clear()  # type: ignore[attr-defined]
    return Recording(xg, selected, mode.priors, mode.activation_bytes, mode.tail)


# what a model's own forward raises on an input it cannot take (not reconviz's errors)
MODEL_ERRORS = (RuntimeError, TypeError, ValueError, IndexError, KeyError, AttributeError, AssertionError)


def check_dtype(dtype: Any) -> torch.dtype:
    """``dtype`` if it is a floating-point torch dtype; InputError otherwise."""
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise InputError(f"dtype must be a floating-point torch.dtype (torch.float64 for the 1e-9 "
                         f"contract, torch.float32 for 1e-4), got {dtype!r}")
    return dtype
