"""The allowlist: every op family reconviz knows to be affine in the input.

Each class is one rule; the instances at the bottom list the ops it covers.
An op not listed here (or registered with :func:`reconviz.ops.register_op`)
is refused when it touches an input-dependent tensor. The list is tested op by
op in tests/ops/test_ops.py: each op, applied to input-dependent tensors, must
satisfy f(a x + b y) = a f(x) + b f(y) up to its constant part.

    Linear       f(x) linear/affine in every tensor argument jointly (reshapes, add, sum, pad, ...)
    Product      f(u, v) bilinear: affine when at most one factor depends on the input
    Division     u / v: affine when the divisor v does not depend on the input
    Cast         a dtype change: allowed to a floating type of at least the input's precision
    Shape        a result that does not depend on the input's values (size, zeros_like, ...)
    EvalOnly     dropout and batch norm: affine only with training=False (running statistics)
"""

from __future__ import annotations

from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from .base import Op, arg, input_dependent, tensors_in

__all__ = ["Linear", "Product", "Division", "Scatter", "Cast", "Shape", "EvalOnly", "AFFINE_OPS"]


class Linear(Op):
    """Affine in all its tensor arguments jointly. ``constant_args``: arguments
    (position, name) that must not depend on the input (a sampling grid, a weight)."""

    def __init__(self, names: str = "", *, functions: tuple[Callable, ...] = (), aten: str | None = None,
                 constant_args: tuple[tuple[int, str], ...] = ()):
        self.names = tuple(names.split())
        self.functions = functions
        self.aten_names = None if aten is None else tuple(aten.split()) + self.names
        self.constant_args = constant_args

    def check(self, func, args, kwargs, path):
        for i, name in self.constant_args:
            if input_dependent(arg(args, kwargs, i, name)):
                self.refuse(func, path, f"its argument '{name}' depends on the input, and the op is "
                            f"affine only in its other arguments; compute '{name}' from parameters")


class Product(Linear):
    """Bilinear (u * v, u @ v, conv(u, weight)): affine when at most one factor depends
    on the input. ``additive``: arguments (position, name) that are added, not multiplied
    (a bias)."""

    def __init__(self, names: str = "", *, functions: tuple[Callable, ...] = (), aten: str | None = None,
                 additive: tuple[tuple[int, str], ...] = ()):
        super().__init__(names, functions=functions, aten=aten)
        self.additive = additive

    def check(self, func, args, kwargs, path):
        skip = {id(arg(args, kwargs, i, n)) for i, n in self.additive}
        factors = [t for a in (*args, *kwargs.values()) if id(a) not in skip for t in tensors_in(a)]
        if sum(t.requires_grad for t in factors) > 1:
            self.refuse(func, path, "it multiplies two input-dependent tensors (x * x, a bilinear layer), "
                        "which is not affine in the input, and neither factor comes from a saturating gate "
                        "(sigmoid, hardsigmoid, tanh, softmax) that the value rule would freeze at its value; "
                        "compute the gating factor through one of them, or reconstruct the part of the "
                        "network before it (under either rule: a product of two input-dependent tensors "
                        "has no faithful per-input template)")


class Division(Linear):
    """u / v: affine when v does not depend on the input; no rounding mode."""

    def __init__(self, names: str = "", *, reversed_: tuple[Callable, ...] = (), **kw: Any):
        super().__init__(names, **kw)
        self.reversed = set(reversed_)

    def check(self, func, args, kwargs, path):
        divisor = args[0] if func in self.reversed else arg(args, kwargs, 1, "other")
        if input_dependent(divisor):
            self.refuse(func, path, "it divides a constant by an input-dependent tensor (a reciprocal), "
                        "which is not affine; the value rule freezes a divisor only where it divides another "
                        "input-dependent tensor (u / d -> u / d(x0), a normalization)")
        if kwargs.get("rounding_mode") is not None:
            self.refuse(func, path, f"rounding_mode={kwargs['rounding_mode']!r} rounds the quotient, "
                        "which is not affine")


class Scatter(Linear):
    """scatter/scatter_add: linear when values are summed or replaced; ``reduce="multiply"``
    multiplies two tensors and is refused."""

    def check(self, func, args, kwargs, path):
        reduce = arg(args, kwargs, 4, "reduce")
        if reduce not in (None, "add", "sum"):
            self.refuse(func, path, f"scatter with reduce={reduce!r} is not affine; use reduce='add'")


class Cast(Linear):
    """A dtype change: refused to an integer or bool type (a rounding) and to a floating type
    less precise than the input (the base rule on results, :meth:`Op.check_result`)."""


class Shape(Linear):
    """A result that does not depend on the input's values: sizes, dtypes, new tensors of a
    given shape. ``constant_args`` (a fill value) must not depend on the input."""

    constant_result = True


class EvalOnly(Linear):
    """Affine only in inference form: ``training`` (argument ``i``, default ``default``)
    must be False, and the ``statistics`` arguments must be given (batch norm)."""

    def __init__(self, functions: tuple[Callable, ...], training: tuple[int, str, bool], why: str,
                 statistics: tuple[tuple[int, str], ...] = (), constant_args: tuple[tuple[int, str], ...] = ()):
        super().__init__("", functions=functions, constant_args=constant_args)
        self.training, self.why, self.statistics = training, why, statistics

    def check(self, func, args, kwargs, path):
        super().check(func, args, kwargs, path)
        i, name, default = self.training
        training = bool(arg(args, kwargs, i, name if func is not torch.dropout else "train", default))
        if training or any(arg(args, kwargs, j, n) is None for j, n in self.statistics):
            self.refuse(func, path, self.why)


_RESHAPE = (
    "view view_as reshape reshape_as flatten unflatten ravel squeeze unsqueeze permute transpose t "
    "swapaxes swapdims movedim moveaxis expand expand_as broadcast_to broadcast_tensors as_strided "
    "narrow narrow_copy select index_select gather take take_along_dim masked_select getitem "
    "split split_with_sizes chunk tensor_split unbind hsplit vsplit dsplit cat concat concatenate "
    "stack hstack vstack dstack column_stack row_stack atleast_1d atleast_2d atleast_3d repeat "
    "repeat_interleave tile flip fliplr flipud roll rot90 diagonal diag diag_embed diagflat tril triu "
    "unfold fold contiguous clone cpu cuda T mT H mH conj resolve_conj resolve_neg block_diag"
)
_ARITHMETIC = (
    "add sub subtract rsub neg negative positive pos sum mean cumsum trace diff "
    "sum_to_size setitem masked_fill masked_scatter index_fill index_add index_copy index_put put "
    "copy zero fill where"
)
_SPATIAL = (
    "pad interpolate upsample upsample_nearest upsample_bilinear avg_pool1d avg_pool2d avg_pool3d "
    "adaptive_avg_pool1d adaptive_avg_pool2d adaptive_avg_pool3d pixel_shuffle pixel_unshuffle "
    "channel_shuffle native_channel_shuffle affine_grid max_unpool1d max_unpool2d max_unpool3d"
)
_ATEN_EXTRA = "slice index _unsafe_view alias view_copy expand_copy permute_copy constant_pad_nd"

_METADATA = (
    "size dim ndimension numel nelement stride storage_offset is_contiguous is_floating_point "
    "is_complex is_signed element_size get_device len retain_grad "
    "shape dtype device requires_grad is_leaf grad_fn grad layout ndim is_cuda is_cpu is_sparse "
    "is_quantized is_meta is_nested itemsize nbytes output_nr retains_grad"
)

# sizes, dtypes and autograd flags: nothing comes out that depends on the input's values, so the
# gate modes run these reads as written, before any classification (9 of the 23 calls the
# digits CNN's probe pass sees, BatchNorm's input.dim() among them)
METADATA = Shape(_METADATA)

AFFINE_OPS: list[Op] = [
    Linear(_RESHAPE + " " + _ARITHMETIC + " " + _SPATIAL, aten=_ATEN_EXTRA),
    Linear("lerp", constant_args=((2, "weight"),)),
    Scatter("scatter scatter_add"),
    Linear("grid_sample", constant_args=((1, "grid"),)),
    Linear("trapezoid trapz", constant_args=((1, "x"),)),
    Product(
        "mul multiply matmul mm bmm mv dot vdot inner outer ger kron einsum tensordot cross vecdot "
        "multi_dot chain_matmul embedding",
    ),
    Product(
        "linear conv1d conv2d conv3d conv_transpose1d conv_transpose2d conv_transpose3d conv_tbc",
        aten="convolution _convolution", additive=((2, "bias"),),
    ),
    Product("bilinear", additive=((3, "bias"),)),
    Product("addmm addmv addbmm baddbmm addr addcmul", additive=((0, "input"),)),
    Division("div divide true_divide truediv", reversed_=(Tensor.__rtruediv__,)),
    Cast("to type type_as double float half bfloat16 long int short char byte bool cfloat cdouble",
         aten="_to_copy"),
    METADATA,
    Shape("zeros_like ones_like empty_like new_zeros new_ones new_empty"),
    Shape("full_like new_full", constant_args=((1, "fill_value"),)),
    EvalOnly(
        (F.dropout, F.dropout1d, F.dropout2d, F.dropout3d, torch.dropout, torch.dropout_), (2, "training", True),
        "dropout with training=True is random; call it with training=self.training so that the "
        "eval-mode copy reconviz works on disables it",
    ),
    EvalOnly(
        (F.alpha_dropout, F.feature_alpha_dropout), (2, "training", False),
        "dropout with training=True is random; call it with training=self.training",
    ),
    EvalOnly(
        (F.batch_norm,), (5, "training", False),
        "batch norm with training=True (or without running statistics) normalizes by the batch's "
        "statistics, which is not affine; pass training=self.training and keep running statistics "
        "(reconviz reconstructs the eval-mode model)",
        statistics=((1, "running_mean"), (2, "running_var")),
        constant_args=((1, "running_mean"), (2, "running_var"), (3, "weight"), (4, "bias")),
    ),
    EvalOnly(
        (F.instance_norm,), (5, "use_input_stats", True),
        "instance norm with input statistics divides by an input-dependent sigma, which is not "
        "affine; only InstanceNorm with track_running_stats=True in eval mode is",
        statistics=((1, "running_mean"), (2, "running_var")),
        constant_args=((1, "running_mean"), (2, "running_var"), (3, "weight"), (4, "bias")),
    ),
]
