"""Which outputs a solve reconstructs: ``classes`` checked and turned into indices."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from ..errors import InputError



def resolve_classes(classes, n_outputs: int, device: torch.device) -> Tensor:
    """The class indices to reconstruct as a LongTensor (default: all outputs).

    ``classes``: an int, a list/tuple/range of ints, or a 0-/1-D integer tensor or
    array. Anything else (floats, bools, strings, sets, nested lists) is an InputError:
    a non-integer value is never rounded to an index."""
    if classes is None:
        return torch.arange(n_outputs, device=device)
    idx = _class_list(classes)
    if not idx:
        raise InputError("classes is empty: give at least one class index, or None for all")
    bad = [c for c in idx if not 0 <= c < n_outputs]
    if bad:
        raise InputError(f"classes must be indices in [0, {n_outputs}) (the model has {n_outputs} outputs); "
                         f"got {bad[:8]}")
    if len(set(idx)) != len(idx):
        raise InputError(f"classes contains duplicates: {sorted({c for c in idx if idx.count(c) > 1})[:8]}; "
                         "give each class once")
    return torch.tensor(idx, dtype=torch.long, device=device)


def _class_list(classes: Any) -> list[int]:
    """``classes`` as Python ints (see :func:`resolve_classes`); InputError for other types."""
    import numpy as np

    if isinstance(classes, Tensor):
        classes = classes.detach().cpu().numpy()
    if isinstance(classes, np.ndarray) and classes.ndim >= 1:
        if classes.ndim != 1 or classes.dtype.kind not in "iu":
            raise InputError(f"classes must be a 1-D integer tensor or array, got a {classes.ndim}-D {classes.dtype} "
                             "one: pass integer indices such as [0, 3] (values are never rounded)")
        return [int(c) for c in classes]
    items = list(classes) if isinstance(classes, (list, tuple, range)) else [classes]
    values = [c.item() if isinstance(c, (Tensor, np.ndarray, np.generic)) and np.ndim(c) == 0 else c for c in items]
    for v in values:
        if not isinstance(v, int) or isinstance(v, bool):
            raise InputError(f"classes must be integer indices, got {v!r:.60} ({type(v).__name__}): pass an "
                             "int, a list of ints such as [0, 3], or a 1-D integer tensor (values are never rounded)")
    return values
