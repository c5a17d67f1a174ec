"""torch.distributed for dataset runs: who am I, pool the accumulators, fail loudly.

A run inside an initialised process group (``torch.distributed.init_process_group``,
or ``torchrun`` through the command line) shards the data's batches over the ranks
(batch b goes to rank b mod P) and pools the per-rank accumulators with all_reduce
(:func:`reconviz.dataset.moments.pooled`). Every collective is wrapped: a rank that
died or hung makes the others raise :class:`DistributedError` (after the process
group's timeout at the latest) and nothing is written.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Callable

import torch
from torch import Tensor

from ..errors import ReconvizError

__all__ = ["DistributedError", "World", "world", "launched_by_torchrun", "init_from_env", "TIMEOUT_ENV"]

TIMEOUT_ENV = "RECONVIZ_DIST_TIMEOUT"  # seconds the command line's process group waits for a rank (default 1800)


class DistributedError(ReconvizError, RuntimeError):
    """A collective of a distributed run failed: another rank died, hung past the timeout, or disagrees."""


@dataclass(frozen=True)
class World:
    """This process's place: ``rank`` of ``size``; ``device`` the collectives' tensors go to."""

    rank: int = 0
    size: int = 1
    device: torch.device = torch.device("cpu")

    @property
    def distributed(self) -> bool:
        return self.size > 1

    def all_reduce(self, t: Tensor) -> Tensor:
        """The sum of ``t`` over the ranks (float64 CPU tensor in, float64 CPU tensor out)."""
        if not self.distributed:
            return t
        import torch.distributed as dist

        buf = t.to(self.device).contiguous()
        self._guard(lambda: dist.all_reduce(buf), f"all_reduce of a {tuple(t.shape)} tensor")
        return buf.to("cpu")

    def all_max(self, t: Tensor) -> Tensor:
        if not self.distributed:
            return t
        import torch.distributed as dist

        buf = t.to(self.device).contiguous()
        self._guard(lambda: dist.all_reduce(buf, op=dist.ReduceOp.MAX), "all_reduce (max)")
        return buf.to("cpu")

    def gather_json(self, value: Any) -> list[Any]:
        """``value`` (JSON-able) from every rank, in rank order (bytes in tensors: no pickles)."""
        if not self.distributed:
            return [value]
        data = torch.tensor(list(json.dumps(value).encode()), dtype=torch.uint8)
        size = self.all_max(torch.tensor([data.numel()], dtype=torch.long))
        lengths = self._all_gather(torch.tensor([data.numel()], dtype=torch.long))
        padded = torch.zeros(int(size), dtype=torch.uint8)
        padded[: data.numel()] = data
        blobs = self._all_gather(padded)
        return [json.loads(bytes(b[: int(n)].tolist()).decode()) for b, n in zip(blobs, lengths)]

    def agree(self, what: str, value: Any) -> None:
        """DistributedError unless every rank has the same ``value`` (a configuration fingerprint)."""
        values = self.gather_json(value)
        if any(v != values[0] for v in values):
            raise DistributedError(f"the ranks disagree on {what}: {values!r:.300}. Start every rank with the "
                                   "same model, data and options")

    def _all_gather(self, t: Tensor) -> list[Tensor]:
        import torch.distributed as dist

        buf = t.to(self.device)
        out = [torch.empty_like(buf) for _ in range(self.size)]
        self._guard(lambda: dist.all_gather(out, buf), "all_gather")
        return [o.to("cpu") for o in out]

    def _guard(self, op: Callable[[], Any], what: str) -> None:
        try:
            op()
        except Exception as e:  # noqa: BLE001 - gloo/nccl raise RuntimeError, DistBackendError, ...
            raise DistributedError(
                f"rank {self.rank} of {self.size}: {what} failed "
                f"({type(e).__name__}: {' '.join(str(e).split())[:300]}). "
                "Another rank died or did not arrive within the process group's timeout; nothing was written. "
                "Resume with the same checkpoint= once every rank can run"
            ) from e


def world() -> World:
    """The current process group's view (a single process when there is none)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return World()
    device = torch.device("cpu")
    if dist.get_backend() == "nccl":
        device = torch.device("cuda", torch.cuda.current_device())
    return World(dist.get_rank(), dist.get_world_size(), device)


def launched_by_torchrun() -> bool:
    """True in a process that torchrun (or another launcher) started as one of several ranks."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1 and "RANK" in os.environ


def init_from_env() -> bool:
    """Initialise the default process group from torchrun's environment (gloo on CPU, nccl when
    CUDA is available), with the timeout of ``$RECONVIZ_DIST_TIMEOUT`` seconds (default 1800).
    Returns True when it initialised one (the caller destroys it)."""
    import torch.distributed as dist

    if not launched_by_torchrun() or dist.is_initialized():
        return False
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    seconds = float(os.environ.get(TIMEOUT_ENV, "1800"))
    dist.init_process_group("nccl" if cuda else "gloo", timeout=timedelta(seconds=seconds))
    return True
