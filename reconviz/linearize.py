"""Stage 2 — linearize: the model with every gate frozen at its probe prior.

The linearized network g is affine in its input, g(x0) = f(x0), and g = f on
the probe's whole linear region. It runs on any batch of B = r * N inputs
(input i uses probe i % N's priors) and checks, call by call, that the model
makes the same sequence of gated calls as at the probe.
"""

from __future__ import annotations

import contextlib
import functools
from collections import Counter
from typing import Any, Callable

import torch
import torch.nn as nn
from torch import Tensor
from torch.nn.attention import SDPBackend, sdpa_kernel

from .errors import InputError, ReconvizError, ReplayMismatchError
from .ops.base import op_name, tensors_in
from .ops.factors import FACTOR, product_op
from .ops.gates import Call, Gate, Prior, gate_named, in_layout_of
from .probe import (MODEL_ERRORS, GateMode, OutputSelector, Probe, current_path, keep_cut_candidate, probe,
                    select_output)

__all__ = [
    "LinearizedModel", "TangentModel", "linearize", "linearized_from", "ReplayMode", "POINT_EXACT",
    "LINEARIZATIONS",
]

LINEARIZATIONS = ("value", "tangent")

# why a point-exact result has no certified radius, no region check and no Jacobian check
POINT_EXACT = "point-exact: gates frozen at their values"
POINT_EXACT_TANGENT = "point-exact: the first-order Taylor model at x0 (tangent rule)"

Observer = Callable[[int, Gate, Prior, Tensor], None]


class ReplayMode(GateMode):
    """Applies the recorded priors in order; ``observer`` sees each gate's input."""

    def __init__(self, work: nn.Module, priors: list[Prior], observer: Observer | None = None):
        super().__init__(work)
        self.priors = priors
        self.observer = observer
        self.i = 0

    def on_gate(self, gate: Gate, call: Call, path: str) -> Any:
        if self.i >= len(self.priors):
            raise ReplayMismatchError(
                f"the model made more gated calls than the probe recorded ({len(self.priors)}): "
                f"extra call '{op_name(call.func)}' in module '{path}'. Its control flow depends "
                "on the input, so one set of priors cannot describe it"
            )
        prior = self.priors[self.i]
        if (prior.gate, prior.op, prior.module_path) != (gate.name, op_name(call.func), path):
            raise ReplayMismatchError(
                f"gated call #{self.i} differs from the probe: expected '{prior.op}' in module "
                f"'{prior.module_path}', got '{op_name(call.func)}' in module '{path}'. The model's "
                "control flow depends on its input"
            )
        self.i += 1
        if prior.constant:  # the gate saw a constant at the probe (F.relu(self.scale))
            return call.original()
        if self.observer is not None:
            self.observer(self.i - 1, gate, prior, call.z)
        return self.run(gate, prior, call)

    def on_other(self, func: Callable, args: tuple, kwargs: dict) -> Any:
        """A product whose factors the probe froze (the value rule) gets them back; any other
        call runs as written."""
        prior = self.priors[self.i] if self.i < len(self.priors) else None
        if product_op(func) is None or prior is None or prior.gate != FACTOR.name:
            return super().on_other(func, args, kwargs)
        if prior.params["call"] > self.products:
            return super().on_other(func, args, kwargs)
        path = current_path(self.work)
        if prior.params["call"] < self.products or (prior.op, prior.module_path) != (op_name(func), path):
            raise ReplayMismatchError(
                f"frozen product #{self.i} differs from the probe: expected '{prior.op}' in module "
                f"'{prior.module_path}', got '{op_name(func)}' in module '{path}'. The model's control "
                "flow depends on its input")
        self.i += 1
        z = next(tensors_in((args, kwargs)))
        return self.run(FACTOR, prior, Call(func, z, {}, args=args, kwargs=kwargs))

    def run(self, gate: Gate, prior: Prior, call: Call) -> Any:
        """The gated call, frozen at its prior (in its input's memory layout)."""
        return in_layout_of(gate.apply(prior, call), call.z)

    def finish(self) -> None:
        if self.i != len(self.priors):
            raise ReplayMismatchError(
                f"the model made {self.i} gated calls, but the probe recorded {len(self.priors)}: "
                "its control flow depends on the input"
            )


class TailMode(ReplayMode):
    """g's replay that also keeps the tensors made after the last gate, as the probe does
    (:meth:`LinearizedModel.head_cut`'s candidates), in ``tail`` (a list given by the caller)."""

    def __init__(self, work: nn.Module, priors: list[Prior], observer: Observer | None = None, *,
                 tail: list, n: int):
        super().__init__(work, priors, observer)
        self.tail, self.n = tail, n

    def run(self, gate: Gate, prior: Prior, call: Call) -> Any:
        self.tail.clear()  # a gate: the affine tail starts at its output
        return super().run(gate, prior, call)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        out = super().__torch_function__(func, types, args, kwargs)
        keep_cut_candidate(self.tail, list(tensors_in(out)), self.n)
        return out


class ModelMode(ReplayMode):
    """The *model*, not g: each gated call runs as written (the observer still sees it)."""

    def run(self, gate: Gate, prior: Prior, call: Call) -> Any:
        return call.original()


class LinearizedModel(nn.Module):
    """The rewritten network g: the model's copy with frozen gates (affine in x).

    ``lin(x)`` takes a batch of ``r * N`` inputs shaped like the probes and returns
    the selected outputs flattened to ``(r * N, K)``. Inputs are cast to the
    working dtype. The user's model is not involved: ``lin`` runs on a deep copy.
    """

    def __init__(self, found: Probe):
        super().__init__()
        self.work = found.work
        self.priors: list[Prior] = found.priors
        self.output: OutputSelector = found.output
        self.register_buffer("probes", found.x.detach())
        self.register_buffer("logits", found.logits)
        self.activation_bytes = found.activation_bytes
        self._graph = found.graph
        self._tail = found.tail
        self._cut: tuple[Tensor | None] | None = None  # head_cut's answer, once found

    # facts ----------------------------------------------------------------
    @property
    def n_probes(self) -> int:
        return self.probes.shape[0]

    @property
    def sample_shape(self) -> tuple[int, ...]:
        return tuple(self.probes.shape[1:])

    @property
    def dtype(self) -> torch.dtype:
        return self.probes.dtype

    @property
    def ties(self) -> int:
        return sum(p.ties for p in self.priors)

    @property
    def exactness(self) -> str:
        """``region-exact`` when every frozen gate is piecewise linear (g = f on the probe's
        linear region); ``point-exact`` when any smooth gate was frozen at the probe
        (g = f at x0 only, and W is not the Jacobian)."""
        gated = (gate_named(p.gate) for p in self.priors if not p.constant)
        return "region-exact" if all(g.region_exact for g in gated) else "point-exact"

    @property
    def why_point_exact(self) -> str:
        """Why g = f at x0 only (the rule's words, for reports)."""
        return POINT_EXACT

    @property
    def frozen_priors(self) -> list[Prior]:
        """The priors g applies (``rec.frozen``): all of them; none under the tangent rule."""
        return self.priors

    @property
    def n_outputs(self) -> int:
        return self.logits.shape[1]

    def gate_counts(self) -> dict[str, int]:
        """Number of gated calls per gate type, e.g. ``{'relu': 4, 'max_pool': 2}``."""
        return dict(Counter(p.gate for p in self.priors if not p.constant))

    def extra_repr(self) -> str:
        return (
            f"probes={self.n_probes}, sample_shape={self.sample_shape}, outputs={self.n_outputs}, "
            f"gates={self.gate_counts()}, ties={self.ties}"
        )

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_graph"] = state["_tail"] = state["_cut"] = None  # the probe pass's graph is not copied (nor can it be)
        return state

    def _apply(self, fn: Any, *args: Any, **kwargs: Any) -> "LinearizedModel":
        self._graph = self._tail = self._cut = None  # a moved or cast model no longer matches the kept graph
        return super()._apply(fn, *args, **kwargs)

    @property
    def has_graph(self) -> bool:
        """The probe pass's graph is kept for a reverse-mode solve (:meth:`take_graph`)."""
        return self._graph is not None

    def keep_replay_graph(self) -> None:
        """Keep g's own graph at x0, from one replay pass (with the affine tail's tensors), when
        the probe pass was not g's (a smooth gate continued with the op's own output there)."""
        x, tail = self.probes.detach().clone().requires_grad_(True), []
        with torch.enable_grad():
            out = self(x, mode=functools.partial(TailMode, tail=tail, n=self.n_probes))
        self._graph, self._tail, self._cut = (x, out), tail, None

    def take_graph(self) -> tuple[Tensor, Tensor] | None:
        """The probe pass's (x0 leaf, g(x0) with its graph), once; None if not kept.

        Handing it over frees it here: a reverse-mode solve then owns (and frees) it."""
        graph, self._graph, self._tail, self._cut = self._graph, None, None, None
        return graph

    def head_cut(self) -> Tensor | None:
        """The narrowest tensor h of the kept graph through which every path from the outputs
        back to the input runs, made after the last gate: g = A h(x) + c with A constant (the
        affine head; :mod:`reconviz.solve.head`). None without a kept graph or such a tensor.
        Found once (a walk over the graph) and kept with the graph: ``auto`` and the head solve
        both ask."""
        if self._cut is None:
            self._cut = (self._narrowest_cut(),)
        return self._cut[0]

    def _narrowest_cut(self) -> Tensor | None:
        if self._graph is None or not self._tail:
            return None
        x, out = self._graph
        n = self.n_probes
        fresh = [t for t, version in self._tail if t._version == version and t.grad_fn is not None]
        for h in sorted(fresh, key=lambda t: t.numel()):  # sorted() is stable: the earlier of equal widths
            if h.numel() // n < out.shape[1] and _all_paths_through(h, out, x):
                return h
        return None

    # running --------------------------------------------------------------
    def model_at(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """The *model* (not g) at a batch of N inputs, and (N,) bool: does input i make every
        choice probe i made? One pass, each gate's :meth:`~reconviz.ops.gates.Gate.same_choice`
        observing it."""
        held = torch.ones(x.shape[0], dtype=torch.bool, device=self.probes.device)

        def observe(i: int, gate: Gate, prior: Prior, z: Tensor) -> None:
            held.mul_(gate.same_choice(prior, z).to(held.device))

        with torch.no_grad():
            return self(x, observer=observe, mode=ModelMode), held

    def model(self, x: Tensor) -> Tensor:
        """The *model* (not g) at a batch of inputs: a plain pass of the copy, no gate mode (so
        none of its per-call cost) and no grad; (B, K) selected outputs."""
        with torch.no_grad():
            return self(x, mode=None)

    def forward(self, x: Tensor, observer: Observer | None = None, mode: type | None = ReplayMode) -> Tensor:
        """g at ``x`` (``mode``: :class:`ReplayMode`; ``None``: the model's own plain pass)."""
        x = self._check(x)
        mode = mode(self.work, self.priors, observer) if mode is not None else None
        try:
            with mode if mode is not None else contextlib.nullcontext():
                selected = select_output(self.work(x), self.output, x.shape[0])
            if mode is not None:
                mode.finish()
        except ReconvizError:
            raise
        except MODEL_ERRORS as e:
            raise ReplayMismatchError(
                f"the model failed on a batch of {x.shape[0]} inputs ({type(e).__name__}: {e}); the "
                f"linearized model runs batches of r * {self.n_probes} (basis columns, the radius "
                "sweep): a forward that hard-codes its batch size cannot take them. Use "
                "method='adjoint', or let the forward read the batch size from its input"
            ) from e
        finally:
            self.work._reconviz_stack.clear()  # type: ignore[attr-defined]
        return selected

    def _check(self, x: Tensor) -> Tensor:
        if not isinstance(x, Tensor) or tuple(x.shape[1:]) != self.sample_shape:
            shape = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
            raise InputError(
                f"linearized model expects inputs of shape (r * {self.n_probes}, "
                f"{', '.join(map(str, self.sample_shape))}), got {shape}"
            )
        if x.shape[0] % self.n_probes:
            raise InputError(
                f"batch of {x.shape[0]} is not a multiple of the {self.n_probes} probes: input i "
                f"uses probe i % {self.n_probes}'s priors"
            )
        y = x.to(device=self.probes.device, dtype=self.dtype)
        # in-place gates must never write into the caller's tensor (nor into a grad leaf)
        return x.clone() if y is x else y


def _all_paths_through(h: Tensor, out: Tensor, x: Tensor) -> bool:
    """Every autograd path from ``out`` back to the leaf ``x`` passes through ``h``'s node."""
    stop, stack, seen = h.grad_fn, [out.grad_fn], set()
    while stack:
        node = stack.pop()
        if node is None or node is stop or node in seen:
            continue
        seen.add(node)
        if getattr(node, "variable", None) is x:
            return False
        stack.extend(n for n, _ in node.next_functions)
    return True


class TangentModel(LinearizedModel):
    """The "tangent" rule: g(x) = f(x0) + J (x - x0), J the Jacobian of the model at x0.

    It runs the model itself (no gate frozen): the forward is a forward-mode product
    (``torch.func.jvp``), so the basis solve gets J's columns, and the kept graph is the
    model's own pass at x0, so the adjoint gets J's rows; the affinity self-check then
    compares the two. The probe's priors stay for the record (what the value rule would
    freeze, the op classification that refuses what is not differentiable or not known).
    Point-exact: g(x0) = f(x0), and g = f to first order only."""

    def __init__(self, found: Probe, keep_graph: bool = False):
        super().__init__(found)
        self._graph = self._tail = None  # the probe pass was the value rule's: not this g
        if keep_graph:
            x = self.probes.detach().clone().requires_grad_(True)
            with torch.enable_grad():
                self._graph = (x, self._model(x.clone()))

    @property
    def exactness(self) -> str:
        return "point-exact"

    @property
    def why_point_exact(self) -> str:
        return POINT_EXACT_TANGENT

    @property
    def frozen_priors(self) -> list[Prior]:
        return []  # nothing is frozen: g is the model's own first-order Taylor model

    def _model(self, x: Tensor) -> Tensor:
        """f(x); scaled_dot_product_attention on its math kernel, which (unlike the fused CPU
        kernels) has forward-mode and double-backward derivatives."""
        try:
            with sdpa_kernel([SDPBackend.MATH]):
                return select_output(self.work(x), self.output, x.shape[0])
        finally:
            self.work._reconviz_stack.clear()  # type: ignore[attr-defined]

    def forward(self, x: Tensor, observer: Observer | None = None, mode: type = ReplayMode) -> Tensor:
        x = self._check(x)
        x0 = self.probes.repeat(x.shape[0] // self.n_probes, *(1,) * len(self.sample_shape))
        f = lambda z: self._model(z.clone())  # noqa: E731  (in-place ops never reach z)
        if self._forward_ad:
            try:
                out, tangent = torch.func.jvp(f, (x0,), (x - x0,))
                return out + tangent
            except NotImplementedError:  # an op without forward-mode AD (a fused inference kernel)
                self._forward_ad = False
        out, tangent = _jvp_by_reverse(f, x0, x - x0)
        return out + tangent

    _forward_ad = True

    def model(self, x: Tensor) -> Tensor:
        with torch.no_grad():
            return self._model(self._check(x))

    def model_at(self, x: Tensor) -> tuple[Tensor, Tensor]:
        raise NotImplementedError("the tangent rule has no region: nothing to hold")


def _jvp_by_reverse(f: Callable[[Tensor], Tensor], x0: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
    """(f(x0), J v) by two reverse passes: J v = d/du <J^T u, v> (the double-backward trick), for
    models with an op that forward-mode AD lacks. x0 requires grad here, which also keeps
    torch's no-grad inference fast paths (e.g. nn.MultiheadAttention's) out of the pass."""
    with torch.enable_grad():
        x0 = x0.detach().requires_grad_(True)
        out = f(x0)
        u = torch.zeros_like(out, requires_grad=True)
        (jt_u,) = torch.autograd.grad(out, x0, u, create_graph=True)
        (jv,) = torch.autograd.grad(jt_u, u, v, create_graph=v.requires_grad)
    return out.detach(), jv


def linearize(
    model: nn.Module,
    x: Tensor,
    *,
    dtype: torch.dtype = torch.float64,
    output: OutputSelector = None,
    keep_graph: bool = False,
    keep_hooks: bool = False,
    linearization: str = "value",
) -> LinearizedModel:
    """Probe ``model`` at ``x`` (N, ...) and return the network with its gates frozen.

    ``linearization``: ``"value"`` (gates frozen at their values: :class:`LinearizedModel`) or
    ``"tangent"`` (the first-order Taylor model, :class:`TangentModel`; on a piecewise-linear
    net the two coincide, and the value rule's region-exact model is returned).

    ``keep_graph``: keep the probe pass's autograd graph for one reverse-mode solve
    (:meth:`LinearizedModel.take_graph`). ``keep_hooks``: run the model's own forward
    hooks on reconviz's copy (by default the copy has none).

    >>> lin = linearize(model, x)      # doctest: +SKIP
    >>> torch.allclose(lin(x), model(x).double())   # g(x0) = f(x0)   # doctest: +SKIP
    """
    check_linearization(linearization)
    found = probe(model, x, dtype=dtype, output=output, keep_graph=keep_graph, keep_hooks=keep_hooks)
    return linearized_from(found, linearization, keep_graph)


def linearized_from(found: Probe, linearization: str = "value", keep_graph: bool = False) -> LinearizedModel:
    """The linearized model of what the probe ``found`` under the rule ``linearization``; with
    ``keep_graph``, holding g's graph at x0 (the probe pass's, or one replay pass's)."""
    lin = LinearizedModel(found)
    if linearization == "tangent" and lin.exactness == "point-exact":
        lin.take_graph()
        return TangentModel(found, keep_graph=keep_graph)
    if keep_graph and not lin.has_graph:  # the probe pass was not g's: one replay pass keeps g's
        lin.keep_replay_graph()
    return lin


def check_linearization(linearization: Any) -> str:
    """``linearization`` if it is a rule reconviz implements; InputError otherwise."""
    if not isinstance(linearization, str) or linearization not in LINEARIZATIONS:
        raise InputError(f"unknown linearization {linearization!r:.40}: choose 'value' (the default) or "
                         "'tangent'")
    return linearization


def as_linearized(model_or_lin: nn.Module, x: Tensor | None, **kw: Any) -> LinearizedModel:
    if isinstance(model_or_lin, LinearizedModel):
        return model_or_lin
    if x is None:
        raise InputError("x (the probe batch) is needed to linearize a model")
    return linearize(model_or_lin, x, **kw)
