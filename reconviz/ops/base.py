"""The op classes' shared base: what the probe asks of every call it sees.

An *op* is one family of torch calls with one rule. During the probe the input
is the only tensor that requires grad, so ``requires_grad`` marks every tensor
that depends on the input ("input-dependent"). A call whose arguments hold no
input-dependent tensor computes a constant and is always allowed; for any other
call the registry finds its op and asks :meth:`Op.check` whether this call is
affine in the input, and :meth:`Op.check_result` whether its result stayed in
autograd.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Callable, Iterator

import torch
import torch.nn.functional as F
from torch import Tensor

from ..errors import UnsupportedOperationError

__all__ = ["Op", "tensors_in", "input_dependent", "arg", "callables_named", "op_name", "in_place"]

# the namespaces whose functions an op's ``names`` resolve in
NAMESPACES = (torch, Tensor, F, torch.special, torch.linalg, torch._C._nn)


def op_name(func: Callable) -> str:
    """A readable name: ``relu``, ``Tensor.relu_``, ``Tensor.data``, ``aten::abs``."""
    schema = getattr(func, "_schema", None)
    if schema is not None:
        return schema.name
    qualified = getattr(func, "_qualified_op_name", None)
    if qualified is not None:
        return qualified
    owner = getattr(func, "__self__", None)
    if type(func).__name__ == "method-wrapper" and hasattr(owner, "__name__"):
        return f"Tensor.{owner.__name__}"  # a property getter such as Tensor.data
    name = getattr(func, "__name__", None) or repr(func)
    cls = getattr(func, "__qualname__", name).split(".")[0]
    return f"Tensor.{name}" if cls in ("TensorBase", "Tensor") else name


def in_place(func: Callable) -> bool:
    """An in-place call (add_, __setitem__, __iadd__, copy_): its first argument is written into."""
    name = getattr(func, "__name__", "")
    return (name.endswith("_") and not name.endswith("__")) or name in _IN_PLACE_DUNDERS


_IN_PLACE_DUNDERS = {"__setitem__"} | {
    f"__i{op}__" for op in "add sub mul truediv div floordiv mod pow matmul and or xor lshift rshift".split()}


def tensors_in(obj: Any) -> Iterator[Tensor]:
    """Every tensor in (nested) tuples, lists and dicts (depth first, in order)."""
    return iter(_collect(obj, []))


_ATOMS = frozenset({int, float, bool, str, type(None), torch.dtype, torch.device, torch.Size, slice})
_PLAIN_TENSORS = frozenset({Tensor, torch.nn.Parameter})


def _collect(obj: Any, found: list[Tensor]) -> list[Tensor]:
    """:func:`tensors_in` into ``found``. It runs several times on every intercepted call, so the
    common types are told apart by exact type (a set lookup) before any isinstance check, and
    the abstract Mapping check (slow) comes last: 3 us for a convolution's arguments, 10 us
    with isinstance checks first."""
    cls = type(obj)
    if cls in _ATOMS:
        return found
    if cls is tuple or cls is list:
        items = obj
    elif cls is dict:
        items = obj.values()
    elif isinstance(obj, Tensor):
        found.append(obj)
        return found
    elif isinstance(obj, (list, tuple)):
        items = obj
    elif isinstance(obj, Mapping):
        items = obj.values()
    else:
        return found
    for o in items:
        kind = type(o)
        if kind in _PLAIN_TENSORS:
            found.append(o)
        elif kind not in _ATOMS:
            _collect(o, found)
    return found


def input_dependent(obj: Any) -> bool:
    """True when ``obj`` holds a tensor that depends on the probe input (requires grad)."""
    return any(t.requires_grad for t in tensors_in(obj))


def arg(args: tuple, kwargs: dict, i: int, name: str, default: Any = None) -> Any:
    """Positional argument ``i``, else keyword ``name``, else ``default``."""
    return args[i] if len(args) > i else kwargs.get(name, default)


def callables_named(name: str) -> set[Callable]:
    """``name`` in every namespace, with its in-place (``name_``) and operator variants."""
    found: set[Callable] = set()
    variants = (name, name + "_", f"__{name}__", f"__i{name}__", f"__r{name}__")
    for space in NAMESPACES:
        for v in variants:
            f = getattr(space, v, None)
            if f is None:
                continue
            if not callable(f) and hasattr(f, "__get__"):  # a property such as Tensor.T
                f = f.__get__
            try:
                hash(f)
            except TypeError:
                continue
            found.add(f)
    return found


class Op:
    """One family of torch calls and its rule.

    ``kind``: ``"affine"`` (allowed when :meth:`check` passes) or ``"refused"``.
    ``names``: resolved in torch, Tensor, F, torch.special and torch.linalg with
    in-place and operator variants; ``aten_names``: matched against
    ``torch.ops.aten`` calls (default: ``names``); ``functions``: explicit callables.
    """

    kind: str = "affine"
    names: tuple[str, ...] = ()
    aten_names: tuple[str, ...] | None = None
    functions: tuple[Callable, ...] = ()
    advice: str = ""
    # an affine op whose result may be a constant (zeros_like) or a non-tensor (size)
    constant_result: bool = False

    def callables(self) -> set[Callable]:
        out = set(self.functions)
        for n in self.names:
            out |= callables_named(n)
        return out

    def aten(self) -> tuple[str, ...]:
        return self.names if self.aten_names is None else self.aten_names

    def check(self, func: Callable, args: tuple, kwargs: dict, path: str) -> None:
        """Raise UnsupportedOperationError when this call is not affine in the input."""
        if self.kind == "refused":
            self.refuse(func, path, self.advice)

    def check_result(self, func: Callable, args: tuple, out: Any, path: str) -> None:
        """Raise when an input-dependent call's result (or the tensor an in-place call wrote
        into) is not floating point, or less precise than the input it came from."""
        if self.constant_result:
            return
        source = next((t for t in tensors_in(args) if t.requires_grad), None)
        written = [args[0]] if args and isinstance(args[0], Tensor) and in_place(func) else []
        for t in [*tensors_in(out), *written]:
            if not t.is_floating_point():
                self.refuse(func, path, f"its result is a {t.dtype} tensor computed from the input "
                            "(a comparison, an index, a cast or a rounding), which is not affine")
            if source is not None and torch.finfo(t.dtype).eps > torch.finfo(source.dtype).eps:
                self.refuse(func, path, f"it turns an input-dependent {source.dtype} tensor into "
                            f"{t.dtype}: the reconstruction would be exact to {t.dtype} rounding only; "
                            f"remove the conversion or reconstruct with dtype={t.dtype}")

    @staticmethod
    def refuse(func: Callable, path: str, advice: str) -> None:
        raise UnsupportedOperationError(op_name(func), path, advice)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.kind})"
