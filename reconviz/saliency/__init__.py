"""Classic attribution methods and the reconstructed template: one family, one call shape.

    rv.saliency.<method>(model, x, target, *options, output=None, dtype=torch.float64)

One decorator (:func:`reconviz.saliency._common.attribution`) runs the shared
prologue of every method, the metrics of :mod:`reconviz.metrics` included:
check ``model`` and ``x`` (a floating, finite batch (N, ...)), check
``target`` (an int, N ints, or a callable mapping the output (N, K) to scores
(N,); one rule, :func:`resolve_target`), work on a private eval-mode copy in
``dtype`` (default float64; None: x's dtype), select the logits with
``output=``, and return results in x's dtype.

Methods: :func:`gradient` (Simonyan et al. 2014) and :func:`saliency_map`,
:func:`gradient_x_input`, :func:`template` (the reconstructed W_target; equal
to the gradient on piecewise-linear nets), :func:`layer_gradients` with
:func:`receptive_fields` and :func:`project_to_input` (Fu et al. 2018),
:func:`occlusion` (Zeiler & Fergus 2014), :func:`guided_backprop` and
:func:`deconvnet` (Springenberg et al. 2015; Zeiler & Fergus 2014).
"""

from ._common import resolve_target
from .gradient import gradient, gradient_x_input, saliency_map
from .guided import deconvnet, guided_backprop
from .layers import DEFAULT_LAYER_TYPES, ReceptiveField, layer_gradients, project_to_input, receptive_fields
from .occlusion import OcclusionResult, occlusion
from .template import template

__all__ = [
    "resolve_target",
    "gradient",
    "gradient_x_input",
    "saliency_map",
    "layer_gradients",
    "receptive_fields",
    "project_to_input",
    "ReceptiveField",
    "DEFAULT_LAYER_TYPES",
    "occlusion",
    "OcclusionResult",
    "guided_backprop",
    "deconvnet",
    "template",
]
