"""``method="auto"``: the cheaper of the two solves, from the shapes and a measured pass."""

from __future__ import annotations

import math

from ..linearize import LinearizedModel
from .chunking import OVERHEAD_BOUND
from .head import head_bytes, head_width
from .memory import _budget, adjoint_cap, adjoint_chunk, adjoint_groups, basis_chunk, per_probe_bytes, sample_size

METHODS = ("auto", "basis", "adjoint", "head")
BACKWARD_COST = 1.3  # an input-gradient backward costs about this many forwards (prior for auto)
PASS_SAMPLES = 16.0  # fixed cost of a pass, in samples, for a model whose pass is all overhead
HEAD_MARGIN = 0.75  # the head solve is chosen when it costs less than this share of the adjoint
# (its GEMM W = A J and the head's own backward passes are not counted in its cost)



def choose_method(lin: LinearizedModel, n_classes: int, *, seconds_per_pass: float | None = None,
                  work: int | None = None, why: dict | None = None) -> str:
    """``adjoint`` when K backward passes cost less than D forward passes.

    Shapes: the basis solve runs D * N samples forward (and b = g(0): N more); the
    adjoint K backward passes of N samples (a backward costs about
    :data:`BACKWARD_COST` forwards), plus N samples forward when the probe pass's
    graph was not kept (its b comes from the probe: no pass). ``seconds_per_pass``
    (the measured time of one forward pass of the N probes, the affinity self-check's
    pass) adds the number of passes: a pass that takes under :data:`OVERHEAD_BOUND`
    is mostly fixed cost, so each method is charged its pass count on top of its samples.

    Timing both methods on a first chunk was tried and dropped: where the rule
    is not clear-cut the passes are cheap, and two timed trials cost as much as
    the whole solve (the 8x8 digits net: 5.4-6 ms a solve, 13.5 ms with trials).
    """
    d = sample_size(lin)
    kept = lin.has_graph and len(adjoint_groups(lin, _budget(lin, work))) == 1
    forward = 0.0 if kept else 1.0
    basis = float(d + 1)
    adjoint = forward + BACKWARD_COST * n_classes
    charged = seconds_per_pass is not None and seconds_per_pass < OVERHEAD_BOUND
    if charged:
        basis_passes = 1 + math.ceil(d / basis_chunk(lin, work))
        adjoint_passes = forward + math.ceil(n_classes / adjoint_chunk(lin, n_classes, work))
        basis, adjoint = basis + basis_passes * PASS_SAMPLES, adjoint + adjoint_passes * PASS_SAMPLES
    chosen = "adjoint" if adjoint <= basis else "basis"
    head = _head_cost(lin, n_classes, work, charged) if kept else None
    if head is not None and head < HEAD_MARGIN * min(adjoint, basis):
        chosen = "head"
    if why is not None:
        why.update(rule="shapes+passes" if charged else "shapes", basis_cost=basis,
                   adjoint_cost=adjoint, pass_seconds=seconds_per_pass, chosen=chosen)
        if head is not None:
            why["head_cost"] = head
    return chosen


def _head_cost(lin: LinearizedModel, n_classes: int, work: int | None, charged: bool) -> float | None:
    """The head solve's cost in forward samples: P backward passes through the trunk (and their
    pass charge); None without a narrow cut, or when J and A do not fit the working memory."""
    width = head_width(lin)
    if width is None or head_bytes(lin, n_classes, width) > _budget(lin, work):
        return None
    cost = BACKWARD_COST * width
    if charged:
        cap = adjoint_cap(lin.n_probes, per_probe_bytes(lin), _budget(lin, work), width)
        cost += math.ceil(width / cap) * PASS_SAMPLES
    return cost


