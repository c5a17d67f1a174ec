"""Classic attribution methods, one call shape for all.

    rv.saliency.<method>(model, x, target, **options)

* ``model``: any ``nn.Module``; every method works on a private eval-mode copy
  (default float64), so the model's parameters, training flags and hooks are
  never changed.
* ``x``: a floating, finite input batch (N, ...).
* ``target``: an int class index (the same for every input), a sequence or 1-D
  tensor of N ints (one per input), or a callable mapping the model output
  (N, K) to scores (N,); one rule for all methods (:func:`resolve_target`).
* options common to all: ``output=`` (select the logits from a tuple / dict
  output) and ``dtype=`` (working precision; None: x's dtype).

Methods: :func:`gradient` (Simonyan et al. 2014) and :func:`saliency_map`,
:func:`gradient_x_input`, :func:`layer_gradients` with :func:`receptive_fields`
and :func:`project_to_input` (Fu et al. 2018), :func:`occlusion` (Zeiler &
Fergus 2014), and, where available, ``guided_backprop`` / ``deconvnet``.
Metrics for the maps are in :mod:`reconviz.metrics`.
"""

from ._common import resolve_target
from .gradient import gradient, gradient_x_input, saliency_map
from .layers import DEFAULT_LAYER_TYPES, ReceptiveField, layer_gradients, project_to_input, receptive_fields
from .occlusion import OcclusionResult, occlusion

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
]

try:
    from .guided import deconvnet, guided_backprop

    __all__ += ["guided_backprop", "deconvnet"]
except ImportError:
    pass
