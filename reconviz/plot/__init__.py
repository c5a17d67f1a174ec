"""Figures (matplotlib; never need a screen): class templates, contribution maps, the
original-vs-reconstructed table, and an overview beside the classic visualizations.

Every function returns the :class:`matplotlib.figure.Figure`. With ``path=`` it is
saved atomically (.png, .svg or .pdf) and is not registered with pyplot, so loops
of saved figures never pile up in ``plt.get_fignums()``; without ``path`` it is a
pyplot figure (``plt.show()``, notebooks) that the caller closes when done.

>>> rec = rv.reconstruct(model, x)                                   # doctest: +SKIP
>>> rv.plot.templates(rec, probe=0, class_names=names, path="templates.png")   # doctest: +SKIP
"""

from .contributions import completeness_bar, contributions
from .dataset import class_templates
from .equivalence import equivalence
from .overview import overview
from .templates import class_mean_templates, templates

__all__ = ["templates", "class_mean_templates", "contributions", "completeness_bar", "equivalence", "overview",
           "class_templates"]
