"""``reconviz dataset``: in-process, and under torchrun with 2 processes."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import reconviz as rv
from dataset_common import digits_data, digits_model, save_digits
from reconviz.cli import main

ARCH = "reconviz.models.digits:DigitsCNN"
ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("cli")
    save_digits(d, 120)
    torch.save(digits_model().state_dict(), d / "digits.pt")
    return d


def test_dataset_command_writes_the_template_set_and_figure(files, tmp_path, capsys):
    out, fig = tmp_path / "ts.npz", tmp_path / "ct.png"
    code = main(["dataset", str(files / "digits.pt"), str(files / "x.npy"), "--labels", str(files / "y.npy"),
                 "--arch", ARCH, "--batch-size", "50", "--classes", "1,7", "--out", str(out), "--figure", str(fig)])
    stdout = capsys.readouterr().out
    assert code == 0, stdout
    ts = rv.TemplateSet.load(out)
    x, y = digits_data(120)
    want = rv.reconstruct_dataset(digits_model(), (x, y), classes=[1, 7], batch_size=50)
    assert torch.equal(ts.mean, want.mean) and torch.equal(ts.count, want.count)
    assert fig.stat().st_size > 1000 and "verified exact" in stdout


@pytest.mark.parametrize("argv, needle", [
    (["--out", "ts.txt"], "give a .npz file"),
    (["--out", "ts.npz", "--by", "nope"], "invalid choice"),
    (["--out", "ts.npz", "--classes", "a,b"], "--classes: expected"),
])
def test_dataset_command_usage_errors(files, tmp_path, capsys, argv, needle):
    code = main(["dataset", str(files / "digits.pt"), str(files / "x.npy"), "--arch", ARCH,
                 *[str(tmp_path / a) if a.startswith("ts.") else a for a in argv]])
    err = capsys.readouterr().err
    assert code == 2 and needle in err and "Traceback" not in err


def test_dataset_command_needs_labels_by_label(files, tmp_path, capsys):
    code = main(["dataset", str(files / "digits.pt"), str(files / "x.npy"), "--arch", ARCH,
                 "--out", str(tmp_path / "ts.npz")])
    assert code == 2 and "by='label' needs labels" in capsys.readouterr().err
    assert not (tmp_path / "ts.npz").exists()


def test_torchrun_two_processes_equal_one(files, tmp_path):
    out = tmp_path / "ts.npz"
    env = dict(os.environ, OMP_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           "-m", "reconviz", "dataset", str(files / "digits.pt"), str(files / "x.npy"), "--labels",
           str(files / "y.npy"), "--arch", ARCH, "--batch-size", "32", "--out", str(out)]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stderr[-3000:]
    two = rv.TemplateSet.load(out)
    one = rv.reconstruct_dataset(digits_model(), digits_data(120), batch_size=32)
    assert two.meta["world_size"] == 2 and torch.equal(two.count, one.count) and two.exact == 120
    for name in ("mean", "std", "contribution_mean", "bias_mean", "logit_mean"):
        a, b = getattr(two, name), getattr(one, name)
        assert (a - b).abs().max() <= 1e-12 * b.abs().max(), name
    assert done.stdout.count("verified exact") == 1  # rank 0 alone reports and writes
