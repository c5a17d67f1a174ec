"""reconviz: exact model reconstruction of piecewise-linear networks, and the
classic CNN visualizations beside it.

    probe -> priors -> linearize -> solve -> Reconstruction -> verify / export / plot

>>> import reconviz as rv                                   # doctest: +SKIP
>>> rec = rv.reconstruct(model, x)          # W (N, K, *x.shape[1:]), b (N, K)
>>> print(rv.verify(model, rec))            # the paper's Table 1 view, PASS/FAIL
"""

from .basis import Basis, make_basis
from .errors import (
    ExactnessError,
    HooksRemovedWarning,
    InputError,
    ReconvizError,
    ReplayMismatchError,
    TrainingModeWarning,
    UnsupportedOperationError,
)
from .ops.gates import Gate, Prior, register_gate, registered_gates
from .linearize import LinearizedModel, linearize
from .pipeline import reconstruct
from .radius import Radius, certified_radius
from .reconstruction import FrozenOp, Reconstruction, tolerance_for
from .verify import VerificationReport, VerifyBackend, verify
from .report import report  # the function: it shadows the submodule reconviz.report
from .dataset import TemplateSet, reconstruct_dataset

__version__ = "0.1.0"

__all__ = [
    "Basis", "make_basis", "ExactnessError", "HooksRemovedWarning", "InputError", "ReconvizError", "ReplayMismatchError",
    "TrainingModeWarning", "UnsupportedOperationError", "Gate", "Prior", "register_gate", "registered_gates",
    "LinearizedModel", "linearize", "reconstruct", "Radius", "certified_radius", "Reconstruction",
    "FrozenOp", "tolerance_for", "VerificationReport", "VerifyBackend", "verify", "report", "reconstruct_dataset",
    "TemplateSet", "__version__",
]


def __getattr__(name: str):
    # Submodules with heavier imports load on first use: rv.plot, rv.saliency, rv.metrics, rv.onnx, rv.models,
    # rv.features, rv.data
    import importlib
    import warnings

    if name in ("plot", "saliency", "metrics", "onnx", "models", "features", "data"):
        return importlib.import_module(f".{name}", __name__)
    if name == "GATES":  # was a mutable list: now a snapshot, and a warning
        warnings.warn("rv.GATES is deprecated: use rv.registered_gates() (a tuple) to read the registry and "
                      "rv.register_gate / reconviz.ops.registered to change it", DeprecationWarning, stacklevel=2)
        return registered_gates()
    raise AttributeError(f"module 'reconviz' has no attribute {name!r}")
