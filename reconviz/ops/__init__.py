"""The op registry: what reconviz knows about every torch operation.

Every call the probe sees is a registered *gate* (frozen at its probe choice:
:mod:`reconviz.gates`), an *affine* op of the allowlist (:mod:`reconviz.ops.affine`),
or refused with :class:`~reconviz.errors.UnsupportedOperationError` naming the op,
the module path and what to do (:mod:`reconviz.ops.refused`; an op nobody
listed is refused too).

>>> from reconviz.ops import classify                      # doctest: +SKIP
>>> classify(torch.relu), classify(torch.add), classify(torch.sigmoid)
('gate', 'affine', 'refused')
"""

from .affine import AFFINE_OPS, Cast, Division, EvalOnly, Linear, Product, Shape
from .base import Op, input_dependent, op_name
from .refused import REFUSED_OPS, Random, Refused
from .registry import check_call, check_result, classify, op_for, register_op, registered
from . import smooth, factors  # noqa: E402,F401  (the value rule's gates, registered on import)

__all__ = [
    "Op", "Linear", "Product", "Division", "Cast", "Shape", "EvalOnly", "Refused", "Random",
    "AFFINE_OPS", "REFUSED_OPS", "register_op", "registered", "op_for", "classify", "check_call",
    "check_result", "input_dependent", "op_name",
]
