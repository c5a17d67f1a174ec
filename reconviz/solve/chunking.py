"""Chunk sizes, fixed or calibrated on the real work, and the timing of passes.

Within the memory cap the chunk size is *calibrated*: chunks of 1, 2, 4, ...
columns (or classes) are timed as they are computed, and the doubling stops when
the time per unit stops improving (a float64 conv on a CPU is often fastest one
sample at a time; a GPU wants large batches). No chunk is computed twice.
"""

from __future__ import annotations

import sys
import time
from typing import Any

import torch
from torch import Tensor
from tqdm.auto import tqdm

from ..linearize import LinearizedModel

OVERHEAD_BOUND = 0.005  # a pass faster than this (seconds) is dominated by fixed costs: batch fully
TRIAL_CHUNKS = 3  # chunks timed per calibration size (the fastest counts) ...
TRIAL_SECONDS = 0.2  # ... or fewer, once they took this long



def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Chunker:
    """Hands out chunk sizes. Fixed, or calibrating: 1, 2, 4, ... up to ``cap`` while the
    time per unit improves by more than ``gain``; then the best size seen.

    Each size is judged on the fastest of its first :data:`TRIAL_CHUNKS` chunks (or of
    as many as take :data:`TRIAL_SECONDS`): noise from other processes only ever adds
    time, so the minimum is the robust estimate, and a single slow chunk cannot send
    the calibration to a size that is really worse.
    """

    def __init__(self, fixed: int | None, cap: int, start: int = 1, gain: float = 0.05, total: int | None = None):
        self.cap = max(1, int(cap))
        if fixed is not None and total is not None:  # a chunk larger than the work is the whole work
            fixed = max(1, min(fixed, total))
        self.fixed = fixed
        self.size = fixed if fixed is not None else min(max(1, start), self.cap)
        self.settled = fixed is not None
        self.gain = gain
        self.trials: list[tuple[int, float]] = []  # (size, seconds per unit) of every timed chunk
        self._best: tuple[int, float] | None = None
        self._trial: list[float] = []  # seconds per unit of the current size's chunks

    def fix(self, size: int) -> None:
        """Stop calibrating: every further chunk has ``size``."""
        self.fixed = self.size = size
        self.settled = True

    def next(self, remaining: int) -> int:
        return max(1, min(self.size, remaining))

    def record(self, m: int, seconds: float) -> None:
        if self.settled:
            return
        self.trials.append((m, seconds / max(1, m)))
        if m < self.size:  # the work ran out before the planned size: nothing to learn
            return
        self._trial.append(seconds / m)
        if self.size < self.cap and len(self._trial) < TRIAL_CHUNKS and sum(self._trial) * m < TRIAL_SECONDS:
            return
        self._judge(m, min(self._trial))
        self._trial = []

    def _judge(self, m: int, per: float) -> None:
        if self._best is None or per < self._best[1] * (1 - self.gain):
            self._best = (m, per)
            if m >= self.cap:
                self.settled = True
            else:
                self.size = min(2 * m, self.cap)
        else:
            self.size = self._best[0]
            self.settled = True

    @property
    def per_unit(self) -> float | None:
        """Best measured seconds per unit (column or class), None before any trial."""
        if self._best is not None:
            return self._best[1]
        return min((p for _, p in self.trials), default=None)

    def meta(self) -> dict[str, Any]:
        return {"chunk": self.size, "calibration": [[m, p] for m, p in self.trials]}


class _NoBar:
    """What a disabled progress bar needs to be (a tqdm costs ~50 us to build, even disabled)."""

    def __enter__(self) -> "_NoBar":
        return self

    def __exit__(self, *exc: Any) -> None:
        return None

    def update(self, n: int = 1) -> None:
        return None


def _progress(total: int, desc: str, progress: bool | None, unit: str = "col"):
    enabled = (sys.stderr.isatty() and total >= 256) if progress is None else progress
    return tqdm(total=total, desc=desc, unit=unit, leave=False) if enabled else _NoBar()




def timed_pass(lin: LinearizedModel, x: Tensor, classes: Tensor) -> tuple[Tensor, float]:
    """g(x)[:, classes] and the seconds its forward pass took (the solves' cost unit)."""
    _sync(lin.probes.device)
    t0 = time.perf_counter()
    with torch.no_grad():
        out = lin(x)[:, classes]
    _sync(lin.probes.device)
    return out, time.perf_counter() - t0


def start_size(chunk: int | None, cap: int, pass_seconds: float | None) -> int:
    """First chunk size: calibrate from 1, or the cap at once when a pass is all overhead."""
    return cap if chunk is None and pass_seconds is not None and pass_seconds < OVERHEAD_BOUND else 1
