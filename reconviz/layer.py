"""The network from one layer's activations to the logits: ``f_L(a) = W a + b``.

``rv.reconstruct(model, x, layer="features.6")`` reconstructs :class:`LayerTail`, the
model whose layer ``L`` outputs ``a`` instead of what it computed: everything before
``L`` runs at the probe ``x0`` and is a constant of ``a``, everything after is frozen as
usual. Then ``sum(W_c * a0) + b_c`` is logit c exactly, and ``W_c * a0`` is each unit's
exact contribution to it; ``b_c`` holds the rest (biases after L, and any path from the
input to the logits that bypasses L, such as a skip connection around it).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn
from torch import Tensor

from .errors import InputError
from .probe import MODEL_ERRORS, PRIVATE_COPY, check_probe_input, eval_copy

__all__ = ["LayerTail", "layer_tail", "parse_layer", "model_of"]


def parse_layer(model: nn.Module, layer: Any) -> tuple[str, int | None]:
    """``"name"`` -> (name, None), or ``"name#k"`` -> (name, k): call k, counted from 0 as the
    layer-gradient selectors count them, of a module called more than once; InputError when the
    model has no such module."""
    if not isinstance(layer, str) or not layer:
        raise InputError(f"layer must be a module name (str, as in model.named_modules()), got {layer!r:.60}")
    name, _, call = layer.partition("#")
    if not call.isdigit() and call:
        raise InputError(f"layer={layer!r}: after '#' comes the call number (1, 2, ...), got {call!r}")
    mods = dict(model.named_modules())
    if not name or name not in mods:
        some = [k for k in mods if k][:20]
        raise InputError(f"layer={layer!r}: the model has no module named {name!r}; some names: {some}")
    return name, int(call) if call else None


class LayerTail(nn.Module):
    """``f_L(a)``: ``model`` run at ``inputs`` with the output of layer ``name`` (its call number
    ``call``, from 0; None: its only call) replaced by ``a``. A batch of ``r * N`` activations runs the model at
    ``inputs`` repeated r times (activation i belongs to probe i % N, as in the linearized model)."""

    def __init__(self, model: nn.Module, name: str, call: int | None, inputs: Tensor):
        super().__init__()
        self.model, self.name, self.call = model, name, call
        self.register_buffer("inputs", inputs)
        self.training = False  # the wrapper only: model.eval() would change the user's model

    def forward(self, a: Tensor) -> Any:
        n = self.inputs.shape[0]
        x = self.inputs.repeat(a.shape[0] // n, *(1,) * (self.inputs.dim() - 1))
        return run_swapped(self.model, self.name, self.call, x, lambda out: _replace(out, a, self.name))

    def extra_repr(self) -> str:
        return f"layer={self.name!r}" + (f", call={self.call}" if self.call is not None else "")


def run_swapped(model: nn.Module, name: str, call: int | None, x: Tensor, swap: Any) -> Any:
    """``model(x)`` with ``swap(out)`` applied to the output of module ``name`` at call number
    ``call`` (from 0; None: it must be called exactly once); the forward hook is removed on exit."""
    seen = [0]
    target = 0 if call is None else call

    def hook(module: nn.Module, args: Any, out: Any) -> Any:
        seen[0] += 1
        return swap(out) if seen[0] == target + 1 else None

    handle = model.get_submodule(name).register_forward_hook(hook)
    try:
        out = model(x)
    finally:
        handle.remove()
    if seen[0] <= target:
        raise InputError(f"layer {name!r} ran {seen[0]} time(s) in the forward pass"
                         + (f", so it has no call #{call} (calls count from 0)" if call is not None
                            else ": choose a layer the forward uses"))
    if call is None and seen[0] > 1:
        raise InputError(f"layer {name!r} runs {seen[0]} times in one forward pass: choose one call with "
                         f"layer='{name}#k', k = 0..{seen[0] - 1}")
    return out


def _replace(out: Any, a: Tensor, name: str) -> Tensor:
    if not isinstance(out, Tensor):
        raise InputError(f"layer {name!r} returns {type(out).__name__}, not a tensor: choose a layer whose "
                         "output is one tensor (e.g. one of its submodules)")
    if out.shape[1:] != a.shape[1:] or out.shape[0] != a.shape[0]:
        raise InputError(f"activations of shape {tuple(a.shape)} do not fit layer {name!r}, whose output has "
                         f"shape {tuple(out.shape)}")
    return a.to(out.dtype)


def layer_tail(model: nn.Module, layer: Any, x: Tensor, dtype: torch.dtype, *,
               keep_hooks: bool = False) -> tuple[LayerTail, Tensor]:
    """(:class:`LayerTail` over an eval copy of ``model`` at ``x``, the layer's activations at ``x``).
    The user's model is only read; the copy is in ``dtype`` on ``x``'s device, and the tail is
    marked as reconviz's own (the probe then works on it without copying it again)."""
    x = check_probe_input(x)
    name, call = parse_layer(model, layer)
    work = eval_copy(model, dtype, x.device, stacklevel=4, keep_hooks=keep_hooks)
    inputs = x.to(dtype)
    seen: list[Tensor] = []

    def keep(out: Any) -> None:
        seen.append(_replace(out, out, name).detach().clone())

    try:
        with torch.no_grad():
            run_swapped(work, name, call, inputs, keep)
    except MODEL_ERRORS as e:
        raise InputError(f"the model failed on an input of shape {tuple(x.shape)} ({type(e).__name__}: {e}) "
                         f"while reading layer {layer!r}'s activations") from e
    tail = LayerTail(work, name, call, inputs)
    setattr(tail, PRIVATE_COPY, (dtype, x.device))  # reconviz's own: the probe works on it without a copy
    return tail, seen[0]


def model_of(model: nn.Module, rec: Any) -> nn.Module:
    """The network ``rec`` reconstructs: ``model``, or for a layer's reconstruction
    (``rec.meta["layer"]``) its :class:`LayerTail` at ``rec.inputs`` (over ``model`` itself:
    the callers work on an eval copy of what this returns)."""
    layer = rec.meta.get("layer")
    if layer is None:
        return model
    if rec.inputs is None:
        raise InputError(f"the reconstruction is from layer {layer!r} but carries no inputs (rec.inputs): "
                         "reconstruct again with rv.reconstruct(model, x, layer=...)")
    name, call = parse_layer(model, layer)
    return LayerTail(model, name, call, rec.inputs)
