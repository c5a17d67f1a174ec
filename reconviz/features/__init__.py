"""Inside the network: activations, dead units, top patches, filters, embeddings, activation
maximisation, and clustering of classes and neurons (the cs231n notes; Zeiler & Fergus 2014;
Simonyan et al. 2014; Dai 2020).

One call shape, one contract, as in the rest of reconviz:

    rv.features.<function>(model, x_or_data, [layer], ..., dtype=torch.float64)

* the model is only read: a private eval-mode copy runs (no user hooks; every hook reconviz puts
  on the copy goes in a ``finally``), so neither a success nor an error changes it;
* data-scale functions stream any source of :mod:`reconviz.data` (a tensor, ``(x, y)``, a
  Dataset, a DataLoader, a folder of images with one subfolder per class) batch by batch;
* layers are named as in ``model.named_modules()`` (or selected as in
  :func:`reconviz.saliency.layer_gradients`);
* mistakes are :class:`~reconviz.errors.InputError` saying what to do;
* figures are :class:`matplotlib.figure.Figure`; with ``path=`` saved atomically and never
  registered with pyplot (no leak in loops), without it pyplot figures the caller closes.

Modules: :mod:`.activations` (layer outputs, feature-map grids, dead units), :mod:`.patches`
(top-activating patches cropped to the exact receptive field), :mod:`.filters` (raw kernels),
:mod:`.embeddings` (t-SNE / PCA of penultimate features), :mod:`.maximise` (activation
maximisation beside the reconstructed templates), :mod:`.clustering` (classes and neurons,
hierarchical and k-means; neuron contribution profiles are exact, from
``rv.reconstruct(model, x, layer=...)``), :mod:`.summary` (all of it into a folder, as the CLI does).
"""

from .activations import RECTIFIERS, DeadUnits, activations, dead_units, dead_units_bar, feature_maps
from .clustering import (Clustering, class_profiles, cluster, cluster_classes, cluster_neurons, clustering_figure,
                         neuron_profiles)
from .embeddings import Embedding, embed, embedding, embedding_images, embedding_scatter, layer_features, separation
from .filters import filter_images, filters
from .maximise import Maximised, maximisation_figure, maximise
from .patches import TopPatches, patches_figure, top_patches

__all__ = [
    "activations", "feature_maps", "dead_units", "dead_units_bar", "DeadUnits", "RECTIFIERS",
    "top_patches", "patches_figure", "TopPatches",
    "filters", "filter_images",
    "layer_features", "embed", "embedding", "separation", "embedding_scatter", "embedding_images", "Embedding",
    "maximise", "maximisation_figure", "Maximised",
    "cluster", "class_profiles", "neuron_profiles", "cluster_classes", "cluster_neurons", "clustering_figure",
    "Clustering",
]
