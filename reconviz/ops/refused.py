"""Ops reconviz refuses, grouped by why, each group with the advice its error gives.

Listing them is only for the message: an op that is neither here nor in the
allowlist (:mod:`reconviz.ops.affine`) nor a registered gate is refused all the
same, with the generic advice of :data:`UNKNOWN_ADVICE`.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.utils.dlpack  # noqa: F401  (torch.utils.dlpack.from_dlpack below)
from torch import Tensor

from .base import Op

__all__ = ["Refused", "Random", "REFUSED_OPS", "UNKNOWN_ADVICE"]

UNKNOWN_ADVICE = (
    "it is not on reconviz's list of affine operations, so reconviz cannot prove the reconstruction "
    "exact through it. If it is affine in its input, register it (reconviz.ops.register_op; see "
    "docs/extending.md); otherwise reconstruct the part of the network before it, or select the "
    "logits before it with output=..."
)


class Refused(Op):
    """Refused whenever it touches an input-dependent tensor, with ``advice``."""

    kind = "refused"

    def __init__(self, names: str, advice: str, functions: tuple[Callable, ...] = ()):
        self.names = tuple(names.split())
        self.advice = advice
        self.functions = functions


class Random(Refused):
    """Refused even on constants: random ops (the model is then not a function of x) and
    tensors made from foreign memory (which may hide a dependence on x)."""

    always = True


_SMOOTH = (
    "sigmoid tanh gelu silu mish elu selu celu softplus softsign hardswish hardsigmoid logsigmoid "
    "tanhshrink softshrink hardshrink glu erf erfc erfinv exp exp2 expm1 log log2 log10 log1p sqrt "
    "rsqrt reciprocal pow float_power square sin cos tan asin acos atan sinh cosh asinh acosh atanh "
    "atan2 arctan2 sinc logit xlogy expit i0 lgamma digamma polygamma"
)
_NORM = "layer_norm group_norm local_response_norm normalize rms_norm renorm"
_SELECT = (
    "softmax log_softmax softmin abs absolute sign sgn signbit copysign hypot heaviside max min amax "
    "amin aminmax maximum minimum fmax fmin sort argsort msort topk kthvalue median nanmedian mode "
    "quantile nanquantile cummax cummin cumprod logcumsumexp prod argmax argmin norm vector_norm "
    "matrix_norm dist cdist pdist cosine_similarity pairwise_distance std var std_mean var_mean "
    "logsumexp scaled_dot_product_attention multi_head_attention_forward lp_pool1d lp_pool2d "
    "lp_pool3d fractional_max_pool2d fractional_max_pool3d "
    "nonzero argwhere count_nonzero unique unique_consecutive bincount histc bucketize searchsorted "
    "l1_loss mse_loss smooth_l1_loss huber_loss"
)
_COMPARE = (
    "gt lt ge le eq ne greater less greater_equal less_equal not_equal isclose allclose equal "
    "logical_and logical_or logical_not logical_xor bitwise_and bitwise_or bitwise_xor bitwise_not "
    "and or xor invert isnan isinf isfinite isneginf isposinf isreal any all contains"
)
_ROUND = "floor ceil round trunc fix frac floor_divide floordiv remainder fmod mod"
_LEAVES = (
    Tensor.detach, Tensor.detach_, torch.detach, Tensor.data.__get__, Tensor.data.__set__, Tensor.item,
    Tensor.tolist, Tensor.numpy, Tensor.__array__, Tensor.__float__, Tensor.__int__, Tensor.__bool__,
    Tensor.__index__, Tensor.__complex__, torch.tensor, Tensor.new_tensor, Tensor.requires_grad_,
    Tensor.__deepcopy__, Tensor.__reduce_ex__, Tensor.storage, Tensor.untyped_storage,
)
_HOOKS = (Tensor.register_hook, Tensor.register_post_accumulate_grad_hook)
_READS = (Tensor.__repr__, Tensor.__format__, Tensor.__str__, Tensor.data_ptr)
_RANDOM = (
    "rand randn randint randperm rand_like randn_like randint_like normal bernoulli multinomial "
    "poisson uniform exponential geometric log_normal cauchy random binomial"
)

REFUSED_OPS: list[Op] = [
    Refused(_SMOOTH, "it is a smooth non-linearity that the value rule has no frozen form for (it "
            "freezes sigmoid, tanh, erf, softplus, the ELU family, GELU, SiLU, Hardswish and Mish; sqrt, "
            "pow, rsqrt only inside a normalization's divisor, z / sqrt(var + eps)); replace it, or "
            "reconstruct the part of the network before it"),
    Refused(_NORM, "a normalization divides by an input-dependent statistic, which is not affine; use "
            "BatchNorm (affine in eval mode) or reconstruct a sub-network without it"),
    Refused(_SELECT, "its result depends on the input in a way reconviz cannot freeze (a selection, an "
            "absolute value, a sort, a distance); use nn.MaxPool / nn.AdaptiveMaxPool / ReLU-family "
            "modules, or select the logits before it with output=..."),
    Refused(_COMPARE, "it compares input-dependent values; a mask or a branch computed from the input "
            "is not affine (a ReLU written as z * (z > 0) or z[z < 0] = 0 must be F.relu, which "
            "reconviz freezes)"),
    Refused(_ROUND, "it rounds an input-dependent value, which is not affine"),
    Refused("", "it takes an input-dependent value out of autograd (.detach(), .item(), .tolist(), "
            ".numpy(), .data, float(t), torch.tensor(t)), so reconviz cannot follow how the output "
            "depends on the input; keep the computation in torch operations on the tensor itself",
            functions=_LEAVES),
    Refused("", "it reads an input-dependent tensor's values outside autograd (printing or formatting "
            "it, or its memory address); remove it from the forward pass", functions=_READS),
    Refused("", "a hook on an input-dependent tensor can change its gradient, and the adjoint solve "
            "reads W from gradients; register hooks outside the forward pass", functions=_HOOKS),
    Random("from_dlpack", "it builds a tensor from memory outside autograd (a DLPack capsule), so "
           "reconviz cannot know whether it depends on the input; keep the computation in torch",
           functions=(torch.utils.dlpack.from_dlpack,)),
    Random(_RANDOM, "it draws random numbers inside the forward pass, so the model is not a function of "
           "its input; seed and precompute the noise as a buffer, or remove it at inference"),
]
