"""The memory plan of a solve: W in memory or streamed to disk, the chunks' working
budget, the most columns or classes per pass, and probe groups when one chunk of all
N probes does not fit.

Chunk caps come from the probe pass's measured activation footprint
(``LinearizedModel.activation_bytes``), never from fixed sizes.
"""

from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from ..errors import InputError
from ..linearize import LinearizedModel
from ..probe import Probe
from ..reconstruction import BLOCK_BYTES, MappedWeight

DEFAULT_WORK_MEMORY = 768 * 2**20  # bytes of chunk working memory when max_memory is not given
DEFAULT_MAX_MEMORY = DEFAULT_WORK_MEMORY  # older name
MIN_WORK_MEMORY = 64 * 2**20  # a budget leaves at least this much for the chunks, or W streams


def sample_size(lin: LinearizedModel) -> int:
    return math.prod(lin.sample_shape)


def _itemsize(lin: LinearizedModel) -> int:
    return lin.probes.element_size()


def per_probe_bytes(lin: LinearizedModel) -> int:
    """Working bytes of one sample in flight: its measured activations plus the input."""
    return max(1, lin.activation_bytes // max(1, lin.n_probes)) + sample_size(lin) * _itemsize(lin)


# --------------------------------------------------------------------------
# Memory plan
# --------------------------------------------------------------------------


@dataclass
class MemoryPlan:
    """How a solve uses memory: W in memory or streamed, and the chunks' working budget."""

    weight_bytes: int  # size of W (N x K x D)
    work_bytes: int  # budget for the chunks in flight
    stream: bool  # W goes to a memory-mapped .npy file
    max_memory: int | None  # the budget asked for (None: default)
    path: str | None = None  # where a streamed W goes (None: a temporary file)

    def meta(self) -> dict[str, Any]:
        return {
            "max_memory": self.max_memory, "work_memory": self.work_bytes,
            "weight_bytes": self.weight_bytes, "streamed": self.stream,
        }


def available_memory(device: torch.device) -> int:
    """Bytes that can still be allocated on ``device`` (host: MemAvailable)."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free)
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:  # pragma: no cover - not Linux
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):  # pragma: no cover
        return 8 * 2**30


def default_work_memory(device: torch.device) -> int:
    if device.type == "cuda":  # a quarter of the free device memory, at most 8 GiB
        return int(min(8 * 2**30, max(MIN_WORK_MEMORY, available_memory(device) // 4)))
    return DEFAULT_WORK_MEMORY


def plan_memory(
    lin: LinearizedModel,
    n_classes: int,
    max_memory: int | None = None,
    out: str | os.PathLike | None = None,
) -> MemoryPlan:
    """Split the budget ``max_memory`` (bytes for W plus the chunks) between W and the chunks.

    * ``max_memory=None``: W in memory (streamed only when it would not fit in half
      of the available memory), chunks within :data:`DEFAULT_WORK_MEMORY`
      (on a GPU: a quarter of the free memory, at most 8 GiB).
    * ``max_memory=M``: W in memory if W plus :data:`MIN_WORK_MEMORY` fits in M,
      the rest for the chunks; otherwise W streams to disk and the chunks get M
      less one block of W in transit.
    * ``out=path``: W always streams to the ``.npy`` file ``path``.
    """
    if max_memory is not None and (not isinstance(max_memory, int) or isinstance(max_memory, bool)
                                   or max_memory <= 0):
        raise InputError(f"max_memory must be a positive number of bytes, got {max_memory!r}")
    device = lin.probes.device
    wbytes = lin.n_probes * n_classes * sample_size(lin) * _itemsize(lin)
    if max_memory is None:
        work = default_work_memory(device)
        # (a W below the chunk budget always fits: no need to read the free memory)
        stream = out is not None or (wbytes > MIN_WORK_MEMORY and wbytes > available_memory(device) // 2)
    else:
        stream = out is not None or wbytes + MIN_WORK_MEMORY > max_memory
        work = max_memory - (min(BLOCK_BYTES, wbytes) if stream else wbytes)
        work = max(work, max_memory // 2 if stream else MIN_WORK_MEMORY // 4)
    return MemoryPlan(wbytes, int(work), stream, max_memory, None if out is None else os.fspath(out))


def basis_cap(n_probes: int, per_probe: int, budget: int, columns: int) -> int:
    """Most basis columns per forward pass: m columns of n probes run m * n samples of
    ``per_probe`` working bytes each, within ``budget`` bytes."""
    return int(max(1, min(columns, budget // (n_probes * per_probe))))


def adjoint_cap(n_probes: int, per_probe: int, budget: int, n_classes: int) -> int:
    """Most classes per batched backward: the kept graph (n samples' activations) plus
    one gradient of that size per class in flight, within ``budget`` bytes."""
    graph = n_probes * per_probe
    return int(max(1, min(n_classes, (budget - graph) // graph)))


def _budget(lin: LinearizedModel, max_memory: int | None) -> int:
    return default_work_memory(lin.probes.device) if max_memory is None else max_memory


def basis_chunk(lin: LinearizedModel, max_memory: int | None = None) -> int:
    """:func:`basis_cap` for all N probes of ``lin`` within ``max_memory`` bytes of
    working memory (default :data:`DEFAULT_WORK_MEMORY`); the probe pass measured the
    bytes of all intermediate tensors."""
    return basis_cap(lin.n_probes, per_probe_bytes(lin), _budget(lin, max_memory), sample_size(lin))


def adjoint_chunk(lin: LinearizedModel, n_classes: int, max_memory: int | None = None) -> int:
    """:func:`adjoint_cap` for all N probes of ``lin`` within ``max_memory`` working bytes."""
    return adjoint_cap(lin.n_probes, per_probe_bytes(lin), _budget(lin, max_memory), n_classes)


# --------------------------------------------------------------------------
# Where W goes
# --------------------------------------------------------------------------


class WeightSink:
    """W (N, K, D) being assembled: a tensor on the solve's device, or a memory-mapped
    ``.npy`` (``plan.stream``) whose written pages are handed back every block."""

    def __init__(self, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device,
                 plan: MemoryPlan | None = None):
        """``shape``: (N, K, D) or (N, K, *sample_shape) (a streamed ``.npy`` keeps that shape)."""
        self.mapped: MappedWeight | None = None
        flat = (shape[0], shape[1], math.prod(shape[2:]))
        if plan is not None and plan.stream:
            self.mapped = MappedWeight.create(tuple(shape), dtype, path=plan.path)
            self.w = self.mapped.tensor.view(flat)
        else:
            self.w = torch.empty(flat, dtype=dtype, device=device)
        self._touched = 0

    def _moved(self, value: Tensor) -> Tensor:
        """``value`` on W's device, in W's dtype (a no-op where they match)."""
        return value.to(device=self.w.device, dtype=self.w.dtype)

    def put_rows(self, probes: slice, c0: int, c1: int, value: Tensor) -> None:
        """W[probes, c0:c1, :] = value (n, c1 - c0, D)."""
        self.w[probes, c0:c1] = self._moved(value)
        self._touch(value.numel() * value.element_size())

    def put_cols(self, probes: slice, cols: slice | Tensor, value: Tensor) -> None:
        """W[probes, :, cols] = value (n, K, m)."""
        if isinstance(cols, Tensor):
            cols = cols.to(self.w.device)
        self.w[probes, :, cols] = self._moved(value)
        # every row of W gets a few bytes: count at least a page per row
        self._touch(value.shape[0] * value.shape[1] * max(4096, value.shape[2] * value.element_size()))

    def _touch(self, nbytes: int) -> None:
        if self.mapped is None:
            return
        self._touched += nbytes
        if self._touched >= BLOCK_BYTES:
            self.mapped.release()
            self._touched = 0

    def finish(self) -> Tensor:
        if self.mapped is not None:
            self.mapped.flush()
            self.mapped.release()
        return self.w


# --------------------------------------------------------------------------
# Probe groups: when one chunk of all N probes does not fit
# --------------------------------------------------------------------------


def sub_linearized(lin: LinearizedModel, probes: slice) -> LinearizedModel:
    """The linearized model restricted to probes ``probes`` (priors sliced, model shared)."""
    if probes == slice(None) or (probes.start in (None, 0) and probes.stop >= lin.n_probes):
        return lin
    n = lin.n_probes
    priors = [
        dataclasses.replace(p, shape=(len(range(n)[probes]),) + p.shape[1:],
                            tensors={k: v[probes] for k, v in p.tensors.items()})
        if p.batched else p
        for p in lin.priors
    ]
    m = len(range(n)[probes])
    found = Probe(lin.work, lin.probes[probes], priors, lin.logits[probes], lin.output,
                  lin.activation_bytes * m // n)
    return type(lin)(found)  # the same rule: a TangentModel stays one


def probe_groups(lin: LinearizedModel, per_probe: int, budget: int) -> list[slice]:
    """Consecutive probe ranges with ``size * per_probe <= budget`` (at least one probe each)."""
    n = lin.n_probes
    if n * per_probe <= budget or not all(p.batched for p in lin.priors):
        return [slice(0, n)]
    size = max(1, budget // max(1, per_probe))
    return [slice(i, min(n, i + size)) for i in range(0, n, size)]


def adjoint_groups(lin: LinearizedModel, budget: int) -> list[slice]:
    """The adjoint solve's probe groups: a group's kept graph plus one gradient in flight."""
    return probe_groups(lin, 2 * per_probe_bytes(lin), budget)


