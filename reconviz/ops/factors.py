"""The value rule's products: which input-dependent factors are frozen, and where.

During the probe every input-dependent tensor is *linear* (affine in x once the gates are
frozen) unless it carries a :class:`Mark`:

    factor    the output of a saturating gate (sigmoid, tanh, hardsigmoid, softmax: the
              gate's ``factor``), or a tensor computed from such outputs and constants only
              (a view, a scaling, eval-mode dropout). ``only``: it may be used nowhere but
              as a frozen factor (softmax has no additive frozen form); otherwise the
              gate's own frozen form is affine (sigmoid's secant) and it may flow on.
    pending   computed non-linearly from the input (a product of two linear tensors, such
              as attention scores q k^T; a normalization's statistic written by hand:
              ``(z - m).pow(2).mean()``, ``sqrt``, ``var``, ``std``, a norm): legal only on its
              way into a saturating gate or a divisor. ``rsqrt`` / ``reciprocal`` / a negative
              ``pow`` of such a value is a factor-only (``z * rsqrt(var + eps)``: a divisor
              written as a product).

A product (``mul``, ``matmul``, ``bmm``, ``einsum``, ``baddbmm``, ``linear``, ... : the
:class:`~reconviz.ops.affine.Product` ops) of exactly one linear tensor with factors
freezes the factors at their value at x0 (u * v -> u * v0), and a division of an
input-dependent tensor by an input-dependent divisor freezes the divisor (u / d -> u / d0).
The call is recorded as a prior of :class:`FrozenFactor` (by its index among the probe's
product calls) and the replay substitutes the same constants. Anything else that mixes a
``pending`` or ``only`` tensor with a linear one, or returns one, raises the refusal its
mark carries (``x * x`` names ``mul``, a softmax added to its input names ``softmax``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

from torch import Tensor

from ..errors import ReplayMismatchError, UnsupportedOperationError
from .affine import Division, Product
from .base import Op, arg, in_place, op_name, tensors_in
from .gates import Call, Gate, Prior, register_gate, tile_probes
from .registry import op_for

__all__ = ["Mark", "Step", "Provenance", "FrozenFactor", "product_op", "substitute"]


@dataclass(frozen=True)
class Mark:
    """What a marked input-dependent tensor is (see the module docstring)."""

    kind: str  # "factor" or "pending"
    only: bool  # usable only as a frozen factor (always True for "pending")
    error: UnsupportedOperationError  # raised where it is used otherwise


@dataclass
class Step:
    """One call's provenance: the (substituted) arguments, the frozen positions and values,
    and the mark of its output. ``deferred``: the kind of mark the output gets when the op
    registry refuses the call (a product of two input-dependent tensors is then pending, or
    factor-only for two factors), with that refusal as the mark's error."""

    args: tuple
    kwargs: dict
    frozen: dict[int, Tensor] = field(default_factory=dict)  # tensor position -> value at x0
    out: Mark | None = None
    deferred: str | None = None
    hint: str = ""  # added to the refusal's advice (a statistic: where it would be legal)

    def defer(self, error: UnsupportedOperationError) -> None:
        """The registry refused the call: its output carries the refusal, or it is raised now."""
        if self.hint:
            error = UnsupportedOperationError(error.operation, error.module_path, error.advice + self.hint)
        if self.deferred is None:
            raise error
        self.out = Mark(self.deferred, True, error)


def product_op(func: Callable) -> Op | None:
    """The Product or Division op of ``func``, or None (the calls the value rule may freeze)."""
    op = op_for(func)
    return op if isinstance(op, (Product, Division)) else None


def substitute(obj: Any, values: dict[int, Tensor], counter: list[int] | None = None) -> Any:
    """``obj`` (nested tuples, lists, dicts) with the tensors at positions ``values`` (in
    :func:`~reconviz.ops.base.tensors_in` order) replaced by the given ones."""
    counter = [0] if counter is None else counter
    if isinstance(obj, Tensor):
        i = counter[0]
        counter[0] += 1
        return values.get(i, obj)
    if isinstance(obj, (list, tuple)):
        return type(obj)(substitute(o, values, counter) for o in obj)
    if isinstance(obj, dict):
        return {k: substitute(v, values, counter) for k, v in obj.items()}
    return obj


class Provenance:
    """The marks of the probe's input-dependent tensors, and the value rule's decisions."""

    def __init__(self) -> None:
        self.marks: dict[int, tuple[Tensor, Mark]] = {}  # id -> (tensor kept alive, mark)
        self.first_pending: UnsupportedOperationError | None = None  # the first refusal deferred

    def mark(self, t: Tensor) -> Mark | None:
        kept = self.marks.get(id(t))
        return kept[1] if kept is not None and kept[0] is t else None

    def set(self, obj: Any, mark: Mark | None) -> None:
        if mark is not None and mark.kind == "pending" and self.first_pending is None:
            self.first_pending = mark.error
        for t in tensors_in(obj):
            if not t.requires_grad:
                continue
            if mark is None:
                self.marks.pop(id(t), None)
            else:
                self.marks[id(t)] = (t, mark)

    def check_output(self, out: Tensor) -> None:
        """The model's selected output must not be a pending value or a factor-only one."""
        self._refuse_marked([out])

    # one call -----------------------------------------------------------------
    def gate(self, gate: Gate, z: Tensor, func: Callable, path: str) -> Mark | None:
        """The mark of a gate's output: a saturating gate makes a factor (factor-only when its
        input is pending, or the gate has no additive form); other gates need a linear input."""
        m = self.mark(z)
        if not gate.factor:
            self._refuse_marked([z])
            return None
        if m is not None and m.only and not gate.factor_only:
            return Mark("factor", True, m.error)  # sigmoid(x * x): a factor only, x * x's refusal
        return Mark("factor", gate.factor_only, UnsupportedOperationError(
            op_name(func), path, "the value rule freezes its output only where it multiplies another "
            "input-dependent tensor (attention weights times values); here it is used otherwise (added, "
            "returned), which has no affine form; select the logits before it with output=..."))

    def call(self, func: Callable, args: tuple, kwargs: dict, path: str) -> Step:
        """The step of a non-gate call: products and divisions may freeze factors; any op on
        marked tensors propagates their mark, or raises where it mixes them with linear ones."""
        op = product_op(func)
        if op is not None:
            return _division(func, args, kwargs, op, self._combine) if isinstance(op, Division) else \
                self._product(func, args, kwargs, op, path)
        deps = [t for t in tensors_in((args, kwargs)) if t.requires_grad]
        statistic = statistic_kind(func, args, kwargs)
        if statistic is not None and deps:  # refused by the registry: the output is marked instead
            self._refuse_marked(deps, kind="factor")  # a softmax's statistic has no frozen form
            return Step(args, kwargs, deferred=statistic, hint=STATISTIC_HINT)
        return Step(args, kwargs, out=self._combine(deps))

    def _combine(self, deps: list[Tensor]) -> Mark | None:
        """All deps marked: the most restrictive mark; else linear (raising a restricted one)."""
        marks = [self.mark(t) for t in deps]
        if not marks or any(m is None for m in marks):
            self._refuse_marked(deps)
            return None
        return next((m for m in marks if m.kind == "pending"), None) or \
            next((m for m in marks if m.only), marks[0])

    def _refuse_marked(self, deps: list[Tensor], kind: str | None = None) -> None:
        """Raise the refusal of the first dep whose mark is restricted (of ``kind``, if given)."""
        for t in deps:
            m = self.mark(t)
            if m is not None and m.only and kind in (None, m.kind):
                raise m.error

    def _product(self, func: Callable, args: tuple, kwargs: dict, op: Product, path: str) -> Step:
        """Factors times exactly one linear tensor: the factors are frozen. Two or more linear or
        pending factors: pending; two or more factors and no linear one: factor-only."""
        skip = {id(arg(args, kwargs, i, n)) for i, n in op.additive}  # as Product.check reads them
        # every tensor, in tensors_in order, and whether it sits in a factor argument
        slots = [(t, id(a) not in skip) for a in (*args, *kwargs.values()) for t in tensors_in(a)]
        factors = [t for t, is_factor in slots if is_factor and t.requires_grad]  # every occurrence
        added = [t for t, is_factor in slots if not is_factor and t.requires_grad]
        kinds = [getattr(self.mark(t), "kind", "linear") for t in factors]
        if kinds.count("linear") == 1 and "factor" in kinds and "pending" not in kinds:
            frozen = {id(t) for t, k in zip(factors, kinds) if k == "factor"}
            _check_not_written(func, args, frozen, path)
            values = {i: t.detach() for i, (t, is_factor) in enumerate(slots) if is_factor and id(t) in frozen}
            new_args, new_kwargs = substitute((args, kwargs), values)
            linear = [t for t, k in zip(factors, kinds) if k == "linear"]
            return Step(new_args, new_kwargs, frozen=values, out=self._combine(linear + added))
        if len(factors) <= 1:  # one input-dependent factor: the product is affine in it
            return Step(args, kwargs, out=self._combine(factors + added))
        if "pending" in kinds and "linear" in kinds:  # |z| * z: the pending value's own refusal names it
            raise next(self.mark(t) for t, k in zip(factors, kinds) if k == "pending").error
        return Step(args, kwargs, deferred="factor" if set(kinds) == {"factor"} else "pending")


# ops that compute a normalization's statistic or divisor by hand: pending (only on the way into a
# frozen divisor), or factor-only for the reciprocal forms (a divisor written as a product)
STATISTIC_HINT = (" (the value rule allows it only inside a normalization's divisor: z / sqrt(var + eps), "
                  "z * rsqrt(var + eps))")
STATISTICS = frozenset("sqrt pow square var std norm linalg_vector_norm".split())
RECIPROCALS = frozenset("rsqrt reciprocal".split())


def statistic_kind(func: Callable, args: tuple, kwargs: dict) -> str | None:
    """``"pending"`` for a statistic op, ``"factor"`` for a reciprocal one (also ``pow`` with a
    negative constant exponent), None for any other op."""
    name = op_name(func).removeprefix("Tensor.").removeprefix("__").removesuffix("__").rstrip("_")
    if name in RECIPROCALS:
        return "factor"
    if name not in STATISTICS:
        return None
    exponent = arg(args, kwargs, 1, "exponent", None)
    negative = name == "pow" and isinstance(exponent, (int, float)) and exponent < 0
    return "factor" if negative else "pending"


def _division(func: Callable, args: tuple, kwargs: dict, op: Division, combine: Callable) -> Step:
    """u / d with an input-dependent d: d frozen at x0 (any input-dependent d: a normalization's
    sigma, a norm) when u depends on the input too; a constant divided by it is pending."""
    flat = list(tensors_in((args, kwargs)))
    divisor = args[0] if func in op.reversed else arg(args, kwargs, 1, "other")
    numerator = [t for t in flat if t is not divisor and t.requires_grad]
    if not isinstance(divisor, Tensor) or not divisor.requires_grad:
        return Step(args, kwargs, out=combine(numerator))
    if not numerator:
        return Step(args, kwargs, deferred="pending")
    values = {i: t.detach() for i, t in enumerate(flat) if t is divisor}
    new_args, new_kwargs = substitute((args, kwargs), values)
    return Step(new_args, new_kwargs, frozen=values, out=combine(numerator))


def _check_not_written(func: Callable, args: tuple, frozen: set[int], path: str) -> None:
    """An in-place product (``s.mul_(x)``) may not write into the factor it freezes."""
    if in_place(func) and args and id(args[0]) in frozen:
        raise UnsupportedOperationError(op_name(func), path, "it writes the product into a gate's output that "
                                        "the value rule freezes as a factor; write it out of place (x = s * x)")


class FrozenFactor(Gate):
    """u * v -> u * v0 (and u / d -> u / d0): the factors a product or division froze at x0,
    substituted at the same call of the replay. Reached through the product ops, not through
    torch functions of its own; point-exact."""

    name = "factor"
    region_exact = False
    records_frozen = True  # the probe runs the product on the detached values: the same numbers

    def prior(self, func: Callable, step: Step, path: str, index: int) -> Prior:
        """The prior of a product call that froze ``step.frozen`` (the index-th product call)."""
        tensors = {str(i): v for i, v in step.frozen.items()}
        first = next(iter(step.frozen.values()))
        return Prior(gate=self.name, op=op_name(func), module_path=path, shape=tuple(first.shape),
                     batched=False, tensors=tensors, params={"call": index})

    def apply(self, prior: Prior, call: Call) -> Any:
        flat = list(tensors_in((call.args, call.kwargs)))
        values = {}
        for key, v in prior.tensors.items():
            i = int(key)
            if i >= len(flat):
                raise ReplayMismatchError(f"product '{prior.op}' in module '{prior.module_path}' has fewer "
                                          "tensor arguments than at the probe")
            values[i] = tile_probes(v, flat[i].shape)
        args, kwargs = substitute((call.args, call.kwargs), values)
        return call.func(*args, **kwargs)


FACTOR = register_gate(FrozenFactor())
