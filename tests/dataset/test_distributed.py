"""torch.distributed: 2 gloo processes equal one process; a dying rank fails the others, no output."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import reconviz as rv
from dataset_common import digits_data, digits_model, save_digits

HERE = Path(__file__).resolve().parent
REL = 1e-12
N, BATCH = 128, 32  # as dataset_worker.py: 4 batches, 2 per rank


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(mode: str, out: Path) -> list[subprocess.Popen]:
    """dataset_worker.py MODE OUT as ranks 0 and 1 of a gloo group on this machine (data beside OUT)."""
    save_digits(out.parent, N)
    port = free_port()
    procs = []
    for rank in (0, 1):
        env = dict(os.environ, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE="2",
                   RV_THREADS="1")
        env["PYTHONPATH"] = os.pathsep.join([str(HERE.parents[1]), env.get("PYTHONPATH", "")])
        procs.append(subprocess.Popen([sys.executable, str(HERE / "dataset_worker.py"), mode, str(out)], env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    return procs


def finish(procs: list[subprocess.Popen]) -> list[subprocess.CompletedProcess]:
    done = []
    for p in procs:
        stdout, stderr = p.communicate(timeout=180)
        done.append(subprocess.CompletedProcess(p.args, p.returncode, stdout, stderr))
    return done


@pytest.fixture(scope="module")
def groups(tmp_path_factory):
    """Two gloo groups of 2 processes at once (a run, and a run whose rank 1 dies): their start-up
    (importing torch) overlaps."""
    runs = {mode: tmp_path_factory.mktemp(mode) / "ts.npz" for mode in ("rank", "die")}
    procs = {mode: start(mode, out) for mode, out in runs.items()}
    return {mode: (runs[mode], finish(p)) for mode, p in procs.items()}


def test_two_gloo_processes_equal_one(groups):
    out, ranks = groups["rank"]
    assert [r.returncode for r in ranks] == [0, 0], [r.stderr[-2000:] for r in ranks]
    two = rv.TemplateSet.load(out)
    one = rv.reconstruct_dataset(digits_model(), digits_data(N), batch_size=BATCH)
    assert two.meta["world_size"] == 2 and one.meta["world_size"] == 1
    assert torch.equal(two.count, one.count) and two.exact == one.exact == N and two.failed == one.failed == []
    for name in ("mean", "std", "contribution_mean", "bias_mean", "bias_std", "logit_mean"):
        a, b = getattr(two, name), getattr(one, name)
        assert (a - b).abs().max() <= REL * b.abs().max(), name


def test_a_dying_rank_fails_the_others_and_nothing_is_written(groups):
    out, (rank0, rank1) = groups["die"]
    assert rank1.returncode == 7  # it died after its first batch
    assert rank0.returncode == 5, rank0.stderr[-2000:]
    assert "DistributedError: rank 0 of 2" in rank0.stderr and "nothing was written" in rank0.stderr
    assert not out.exists() and sorted(p.name for p in out.parent.iterdir()) == ["x.npy", "y.npy"]
