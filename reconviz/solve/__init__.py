"""Stage 3 — solve: W and b of the affine network g(x) = W x + b.

* basis   (the paper's method)   b = g(0),  W = (g(Q) - b) Q^T  over an orthonormal
  basis Q, fed to g in chunks of columns (one forward pass per input element).
* adjoint (reverse mode)         W[c, :] = d g_c / d x: one backward pass per class on
  the probe pass's graph (``chunk`` > 1: that many classes per batched backward);
  b = f(x0) - W x0, no forward pass.
* head    (head factorization)   W = A J: A = d g / d h through the affine head, J = d h / d x
  by P backward passes from the narrowest cut h (width P < K) instead of K.

All are exact for an affine g; they agree to rounding. One module per concern:

* :mod:`.memory`   the budget: W in memory or streamed, chunk caps, probe groups
* :mod:`.chunking` chunk sizes, fixed or calibrated on the real work; timed passes
* :mod:`.basis`    the orthogonal-basis solve
* :mod:`.adjoint`  the adjoint solve
* :mod:`.head`     the head-factorized solve: W = A J through the affine head's narrowest cut
* :mod:`.auto`     ``method="auto"``: the cheapest
* :mod:`.classes`  which outputs are solved for
* :mod:`.protocol` what a solve needs of g (:class:`AffineFunction`, :class:`DifferentiableAffine`):
  the torch backend's LinearizedModel and the ONNX backend's onnxruntime view supply it
"""

from .adjoint import chunk_rule, solve_adjoint
from .auto import BACKWARD_COST, METHODS, PASS_SAMPLES, choose_method
from .basis import assemble, bias, solve_basis, sweep, timed_bias
from .chunking import OVERHEAD_BOUND, Chunker, timed_pass
from .classes import resolve_classes
from .head import head_width, solve_head
from .protocol import AffineFunction, DifferentiableAffine
from .memory import (
    DEFAULT_MAX_MEMORY,
    DEFAULT_WORK_MEMORY,
    MIN_WORK_MEMORY,
    MemoryPlan,
    WeightSink,
    adjoint_cap,
    adjoint_chunk,
    adjoint_groups,
    available_memory,
    basis_cap,
    basis_chunk,
    per_probe_bytes,
    plan_memory,
    probe_groups,
    sample_size,
    sub_linearized,
)

__all__ = [
    "solve_basis", "solve_adjoint", "choose_method", "basis_chunk", "adjoint_chunk", "basis_cap", "adjoint_cap",
    "plan_memory", "MemoryPlan", "WeightSink", "METHODS", "DEFAULT_WORK_MEMORY", "MIN_WORK_MEMORY", "sweep",
    "assemble", "bias", "timed_bias", "timed_pass", "resolve_classes", "Chunker", "sample_size",
    "per_probe_bytes", "probe_groups", "adjoint_groups", "sub_linearized", "available_memory", "chunk_rule",
    "OVERHEAD_BOUND", "BACKWARD_COST", "PASS_SAMPLES", "DEFAULT_MAX_MEMORY", "AffineFunction", "DifferentiableAffine", "solve_head", "head_width",
]
