"""The op registry: every call the probe sees is classified here.

    gate      a registered :class:`~reconviz.gates.Gate` (ReLU family, max pooling): frozen
    affine    an op of the allowlist (:mod:`reconviz.ops.affine`) whose rule this call meets
    refused   anything else that touches an input-dependent tensor: UnsupportedOperationError

A call without input-dependent tensors computes a constant and is allowed, except a
random op (the model would not be a function of its input). Input-dependent calls
made with autograd switched off (``torch.no_grad()`` blocks, custom autograd
Functions) are refused: reconviz could not follow them.
"""

from __future__ import annotations

import types
from contextlib import contextmanager
from functools import lru_cache
from typing import Any, Callable, Iterator

import torch
import torch.nn.functional as F

from . import gates as _gates
from ..errors import InputError, UnsupportedOperationError
from .affine import AFFINE_OPS
from .base import Op, input_dependent, op_name
from .refused import REFUSED_OPS, UNKNOWN_ADVICE

__all__ = ["register_op", "registered", "op_for", "classify", "check_call", "check_result", "composite_body"]

_BY_FUNC: dict[Any, Op] = {}
_BY_ATEN: dict[str, Op] = {}

NO_GRAD_ADVICE = (
    "it was called on an input-dependent tensor with autograd switched off (a torch.no_grad() or "
    "inference_mode block, or inside a custom autograd.Function), so reconviz cannot follow how the "
    "output depends on the input; compute it with autograd on"
)


def register_op(op: Op) -> Op:
    """Route ``op``'s torch functions and aten names to it (later registrations win)."""
    if not isinstance(op, Op):
        raise InputError(f"register_op takes a reconviz.ops.Op, got {type(op).__name__}")
    for f in op.callables():
        _BY_FUNC[f] = op
    for name in op.aten():
        _BY_ATEN[name] = op
    return op


@contextmanager
def registered(*items: Op | _gates.Gate) -> Iterator[None]:
    """Register ops and gates for the ``with`` block only; the registries (torch functions,
    aten names, and the ONNX op types of gates) are restored on exit."""
    saved = (dict(_BY_FUNC), dict(_BY_ATEN), _gates.snapshot())
    try:
        for item in items:
            (_gates.register_gate if isinstance(item, _gates.Gate) else register_op)(item)
        yield
    finally:
        _BY_FUNC.clear()
        _BY_FUNC.update(saved[0])
        _BY_ATEN.clear()
        _BY_ATEN.update(saved[1])
        _gates.restore(saved[2])


def _aten_name(func: Callable) -> str | None:
    """``add`` for torch.ops.aten.add_.Tensor (and the packet); None for other callables."""
    qualified = getattr(getattr(func, "_schema", None), "name", None) or getattr(func, "_qualified_op_name", None)
    if not isinstance(qualified, str) or not qualified.startswith("aten::"):
        return None
    return qualified[len("aten::"):].rstrip("_") or None


def op_for(func: Callable) -> Op | None:
    """The registered op of a torch callable (functions, methods, aten ops), or None."""
    try:
        op = _BY_FUNC.get(func)
    except TypeError:  # unhashable callables are never registered
        return None
    if op is None:
        name = _aten_name(func)
        op = _BY_ATEN.get(name) if name else None
    return op


def classify(func: Callable) -> str:
    """``"gate"``, ``"affine"``, ``"refused"`` or ``"unknown"`` (refused when it touches the input)."""
    if _gates.gate_for(func) is not None:
        return "gate"
    op = op_for(func)
    return "unknown" if op is None else op.kind


def check_call(func: Callable, args: tuple, kwargs: dict, path: str) -> Op | None:
    """Raise UnsupportedOperationError unless this (non-gate) call is affine in the input.

    Returns the op whose result :func:`check_result` must see, or None (a constant call)."""
    op = op_for(func)
    if getattr(op, "always", False):
        op.refuse(func, path, op.advice)  # type: ignore[union-attr]
    if not input_dependent((args, kwargs)):
        return None
    if op is None:
        raise UnsupportedOperationError(op_name(func), path, _unknown_advice(func))
    op.check(func, args, kwargs, path)
    if op.constant_result:  # a size, a dtype, zeros_like: nothing for autograd to follow
        return None
    if not torch.is_grad_enabled():
        raise UnsupportedOperationError(op_name(func), path, NO_GRAD_ADVICE)
    return op


def check_result(op: Op, func: Callable, args: tuple, out: Any, path: str) -> None:
    """Raise when an input-dependent call's result is not a floating-point tensor."""
    op.check_result(func, args, out, path)


# composite torch functions written in Python: the probe and the replay run their own body under
# the gate mode, so that each call inside (projections, the softmax, the products) is classified
COMPOSITES = (F.multi_head_attention_forward,)


@lru_cache(maxsize=None)
def _body(func: Callable) -> Callable:
    """``func`` without its ``has_torch_function`` dispatch (which would hand it back whole)."""
    scope = dict(func.__globals__, has_torch_function=lambda *a: False)
    body = types.FunctionType(func.__code__, scope, func.__name__, func.__defaults__, func.__closure__)
    body.__kwdefaults__ = func.__kwdefaults__
    return body


def composite_body(func: Callable) -> Callable | None:
    """The Python body of a composite function (:data:`COMPOSITES`), or None."""
    try:
        return _body(func) if func in COMPOSITES else None
    except TypeError:  # unhashable callables are never composites
        return None


def _unknown_advice(func: Callable) -> str:
    name = _aten_name(func)
    if name is not None and name in _gates.gate_function_names():
        return (f"reconviz freezes {name} when it is called through torch (F.{name}, torch.{name}, "
                "Tensor methods or modules), not as an aten op; call the torch function instead")
    return UNKNOWN_ADVICE


for _op in AFFINE_OPS + REFUSED_OPS:  # refusals last: Tensor.__float__ is not the cast Tensor.float
    register_op(_op)
