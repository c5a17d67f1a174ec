"""What a solve needs of the network it solves: typed, so that any backend can supply it.

    AffineFunction        g(x) = W x + b on a batch; the basis solve and the sweep need
                          only this (the ONNX backend's onnxruntime view is one)
    DifferentiableAffine  plus reverse mode: g's forward builds an autograd graph and the
                          probe pass's graph may be kept; the adjoint solve needs this
                          (:class:`reconviz.linearize.LinearizedModel` is one)

A batch of r * N inputs uses probe ``i % N``'s frozen choices for input ``i``.
"""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

from torch import Tensor


@runtime_checkable
class AffineFunction(Protocol):
    """An affine function of the probes' shape: ``g(batch) -> (r * N, n_outputs)``."""

    probes: Tensor  # (N, *sample_shape): the solve's device and dtype

    @property
    def n_probes(self) -> int: ...

    @property
    def sample_shape(self) -> tuple[int, ...]: ...

    def __call__(self, batch: Tensor, observer: Any = None) -> Tensor: ...


@runtime_checkable
class DifferentiableAffine(AffineFunction, Protocol):
    """An :class:`AffineFunction` whose evaluation autograd can run backward through.

    ``logits`` are f(x0) (an adjoint solve's b = f(x0) - W x0); ``take_graph`` hands over the
    probe pass's kept graph ``(x0 leaf, g(x0))`` once, or None."""

    logits: Tensor

    @property
    def dtype(self) -> Any: ...

    @property
    def has_graph(self) -> bool: ...

    def take_graph(self) -> tuple[Tensor, Tensor] | None: ...
