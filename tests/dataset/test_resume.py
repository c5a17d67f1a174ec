"""Checkpoint and resume: a child killed with SIGKILL mid-run, resumed, gives the uninterrupted result."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import reconviz as rv
import reconviz.dataset.run as run
from dataset_common import digits_data, digits_model, save_digits

HERE = Path(__file__).resolve().parent
BATCH = 64  # dataset_worker.py's batch size: 300 digits -> 5 batches


def _env() -> dict:
    env = dict(os.environ, RV_THREADS=str(torch.get_num_threads()))
    env["PYTHONPATH"] = os.pathsep.join([str(HERE.parents[1]), env.get("PYTHONPATH", "")])
    return env


def test_killed_run_resumes_to_the_same_result(tmp_path, monkeypatch):
    ckpt, out = tmp_path / "run.ckpt.npz", tmp_path / "ts.npz"
    save_digits(tmp_path)
    child = subprocess.Popen([sys.executable, str(HERE / "dataset_worker.py"), "slow", str(out), str(ckpt)], env=_env(),
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 60
    while not ckpt.exists() and child.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    assert ckpt.exists(), child.communicate()[1].decode()[-2000:]
    child.send_signal(signal.SIGKILL)
    child.wait()
    assert child.returncode == -signal.SIGKILL and not out.exists()

    model, data = digits_model(), digits_data()
    resumed_batches: list[int] = []
    monkeypatch.setattr(run, "after_batch", resumed_batches.append)
    resumed = rv.reconstruct_dataset(model, data, batch_size=BATCH, checkpoint=ckpt, checkpoint_every=1)
    monkeypatch.setattr(run, "after_batch", None)
    assert 0 < len(resumed_batches) < 5 and resumed_batches[-1] == 4  # it started after batch 0 at least
    assert not ckpt.exists()  # removed once the run is complete

    whole = rv.reconstruct_dataset(model, data, batch_size=BATCH)
    assert resumed.exact == whole.exact == 300 and torch.equal(resumed.count, whole.count)
    for name in ("mean", "std", "contribution_mean", "bias_mean", "bias_std", "logit_mean"):
        assert torch.equal(getattr(resumed, name), getattr(whole, name)), name


def test_a_checkpoint_of_another_run_is_refused(tmp_path, monkeypatch):
    model, (x, y) = digits_model(), digits_data(64)
    ckpt = tmp_path / "c.npz"

    def stop(n):
        raise KeyboardInterrupt

    monkeypatch.setattr(run, "after_batch", stop)
    with pytest.raises(KeyboardInterrupt):
        rv.reconstruct_dataset(model, (x, y), batch_size=16, checkpoint=ckpt, checkpoint_every=1)
    monkeypatch.setattr(run, "after_batch", None)
    assert ckpt.exists()
    with pytest.raises(rv.InputError, match="belongs to another run.*by"):
        rv.reconstruct_dataset(model, (x, y), by="prediction", batch_size=16, checkpoint=ckpt)
    other = digits_model()
    with torch.no_grad():
        other.classifier[-1].bias += 1
    with pytest.raises(rv.InputError, match="belongs to another run.*model"):
        rv.reconstruct_dataset(other, (x, y), batch_size=16, checkpoint=ckpt)
    ckpt.write_bytes(b"garbage")
    with pytest.raises(rv.InputError, match="not a reconviz dataset checkpoint"):
        rv.reconstruct_dataset(model, (x, y), batch_size=16, checkpoint=ckpt)
