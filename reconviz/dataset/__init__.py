"""Dataset scale: class-mean templates over a whole dataset (issue 14).

>>> ts = rv.reconstruct_dataset(model, (x, y), by="label")      # doctest: +SKIP
>>> ts.mean, ts.std, ts.count, ts.contribution_mean, ts.failed   # doctest: +SKIP
>>> ts.save("templates.npz"); rv.TemplateSet.load("templates.npz")   # doctest: +SKIP

Streamed (memory: one batch plus 3 x K x D float64 accumulators), every probe
checked before it is averaged in, resumable (``checkpoint=``), and sharded over
the ranks of a ``torch.distributed`` process group. See docs/scaling.md.
"""

from .distributed import DistributedError
from .run import BY, reconstruct_dataset
from .templateset import FailedProbe, TemplateSet

__all__ = ["reconstruct_dataset", "TemplateSet", "FailedProbe", "DistributedError", "BY"]
