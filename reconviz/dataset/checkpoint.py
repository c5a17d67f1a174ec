"""Checkpoints of a dataset run: the accumulators and the position, written atomically.

A run with ``checkpoint=path`` writes its state every ``checkpoint_every``
batches (through a temporary file and a rename: a kill at any moment leaves the
previous checkpoint or the new one, never half of one). Started again with the
same path it continues after the last batch the checkpoint holds; since the
accumulators are merged batch by batch in the data's order, the result is the
one an uninterrupted run gives, bit for bit. A checkpoint of another run (other
model, data, options or number of processes) is refused, never silently mixed in.
"""

from __future__ import annotations

import hashlib
import json
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn

from ..errors import InputError
from ..files import atomic_write
from .moments import Moments
from .templateset import PARTS, FailedProbe

__all__ = ["State", "save_state", "load_state", "rank_path", "model_fingerprint"]


@dataclass
class State:
    """A run's accumulators and counters; ``position``: the next batch number to process."""

    parts: dict[str, Moments]
    position: int = 0
    exact: int = 0
    probes: int = 0
    skipped: int = 0
    max_rel_error: float = 0.0
    point_exact: bool = False
    failed: list[FailedProbe] = field(default_factory=list)

    def counters(self) -> dict[str, Any]:
        return {"position": self.position, "exact": self.exact, "probes": self.probes, "skipped": self.skipped,
                "max_rel_error": self.max_rel_error, "point_exact": self.point_exact}


def rank_path(path: str | Path, rank: int, size: int) -> Path:
    """The checkpoint file of one rank: ``ckpt.npz`` alone, ``ckpt.rank1of2.npz`` in a run of 2 processes."""
    path = Path(path)
    return path if size == 1 else path.with_name(f"{path.stem}.rank{rank}of{size}{path.suffix}")


def model_fingerprint(model: nn.Module) -> str:
    """SHA-256 of the model's parameters and buffers (names, dtypes, shapes, values)."""
    h = hashlib.sha256()
    for name, t in list(model.named_parameters()) + list(model.named_buffers()):
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
        h.update(t.detach().cpu().reshape(-1).contiguous().view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def save_state(path: Path, state: State, run: dict[str, Any]) -> None:
    """Write ``state`` and the run's fingerprint ``run`` to ``path`` atomically (no pickles)."""
    arrays = {k: v.numpy() for p, m in state.parts.items() for k, v in m.arrays(p + "_").items()}
    arrays["failed_index"] = np.array([f.index for f in state.failed], dtype=np.int64)
    arrays["failed_reason"] = np.array([f.reason for f in state.failed], dtype=np.str_).reshape(-1)
    arrays["counters"] = np.array(json.dumps(state.counters()))
    arrays["run"] = np.array(json.dumps(run))
    atomic_write(path, lambda f: np.savez(f, **arrays))


def load_state(path: Path, run: dict[str, Any]) -> State | None:
    """The state saved at ``path`` (None when there is no file); InputError when it is not a
    checkpoint or belongs to another run."""
    if not path.exists():
        return None
    try:
        with np.load(path, allow_pickle=False) as z:
            a = {k: z[k] for k in z.files}
        saved = json.loads(str(a.pop("run")))
        counters = json.loads(str(a.pop("counters")))
        numbers = {k: torch.from_numpy(v) for k, v in a.items() if v.dtype.kind == "f"}
        parts = {p: Moments.from_arrays(numbers, p + "_") for p in PARTS}
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as e:
        raise InputError(f"{path} is not a reconviz dataset checkpoint ({type(e).__name__}: {e}); delete it or "
                         "pass another checkpoint= path") from None
    if saved != run:
        diff = sorted(k for k in set(saved) | set(run) if saved.get(k) != run.get(k))
        raise InputError(f"checkpoint {path} belongs to another run (it differs in {', '.join(diff)}): delete it, "
                         "or pass another checkpoint= path, to start this run afresh")
    failed = [FailedProbe(int(i), str(r)) for i, r in zip(a["failed_index"], a["failed_reason"])]
    return State(parts, failed=failed, **counters)
