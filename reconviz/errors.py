"""Typed errors and warnings raised by reconviz.

Every error says what was wrong and what to do about it. All derive from
:class:`ReconvizError`; input errors are also ``ValueError`` and failed checks
``RuntimeError``. :class:`UnsupportedOperationError` deliberately derives from
no builtin: torch turns a ``TypeError`` raised inside ``Tensor.__mul__`` and
friends into ``NotImplemented``, which would hide it.
"""

from __future__ import annotations


class ReconvizError(Exception):
    """Base class of every error reconviz raises on purpose."""


class InputError(ReconvizError, ValueError):
    """The input (probe batch, classes, options, file) is not usable as given."""


class UnsupportedOperationError(ReconvizError):
    """The model calls an operation that cannot be frozen into an affine map.

    Attributes: ``operation`` (its name), ``module_path`` (the dotted path of
    the module whose forward called it, ``""`` for the top level) and ``advice``.
    """

    def __init__(self, operation: str, module_path: str, advice: str):
        self.operation = operation
        self.module_path = module_path
        self.advice = advice
        where = f"in module '{module_path}'" if module_path else "in the model's top-level forward"
        super().__init__(f"cannot freeze operation '{operation}' called {where}: {advice}")


class ReplayMismatchError(ReconvizError, RuntimeError):
    """The linearized model's gated operations differ from what the probe recorded.

    This happens when the model's control flow depends on its input (different
    branches, a different number of gated calls) or when the linearized model is
    run on an input whose shape does not fit the probes.
    """


class ExactnessError(ReconvizError, RuntimeError):
    """A reconstruction failed its own exactness check (W x0 + b != f(x0))."""


class TrainingModeWarning(UserWarning):
    """The model was in training mode; reconviz reconstructed an eval-mode copy."""


class HooksRemovedWarning(UserWarning):
    """The model has forward hooks; reconviz's copy runs without them (``keep_hooks=True`` keeps them)."""
