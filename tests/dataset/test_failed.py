"""Probes that fail the check are listed with their reason and never averaged in."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn as nn

import reconviz as rv
from dataset_common import digits_data, digits_model


class Mixing(nn.Module):
    """The digits CNN, plus 0.5 * sum(x_1) added to sample 0's logits: sample 0 depends on
    sample 1 of the same batch (an affine op, so the probe accepts it; only a check sees it)."""

    def __init__(self):
        super().__init__()
        self.net = digits_model()
        self.eval()

    def forward(self, x):
        out = self.net(x)
        if x.shape[0] < 2:
            return out
        pick = torch.zeros(x.shape[0], 1, dtype=x.dtype)
        pick[0] = 0.5
        return out + pick * x[1:2].flatten(1).sum(1, keepdim=True)


def test_a_model_that_mixes_samples_fails_those_probes_only():
    x, y = digits_data(40)
    model = Mixing()
    ts = rv.reconstruct_dataset(model, (x, y), batch_size=20)
    # batches [0, 20) and [20, 40): in each, probes 0 and 1 of the batch mix
    assert [f.index for f in ts.failed] == [0, 1, 20, 21]
    assert all("mixes samples" in f.reason for f in ts.failed)
    assert ts.exact == 36 and int(ts.count.sum()) == 36
    keep = np.setdiff1d(np.arange(40), [0, 1, 20, 21])
    want = rv.reconstruct_dataset(digits_model(), (x[keep], y[keep]), batch_size=64)
    assert torch.equal(ts.count, want.count)
    assert torch.allclose(ts.mean, want.mean, rtol=0, atol=1e-12 * float(want.mean.abs().max()))
    assert torch.allclose(ts.std, want.std, rtol=0, atol=1e-12 * float(want.std.abs().max()))


def test_failed_probes_survive_save_and_load(tmp_path):
    x, y = digits_data(20)
    ts = rv.reconstruct_dataset(Mixing(), (x, y), batch_size=20)
    back = rv.TemplateSet.load(ts.save(tmp_path / "ts.npz"))
    assert back.failed == ts.failed and len(back.failed) == 2


def test_by_all_lists_failures_and_averages_only_the_rest():
    """by='all' merges a batch only when all of its probes pass; the failed ones are listed and the
    batch is solved again without them (where, with this model, the next two mix in turn)."""
    x, y = digits_data(12)
    ts = rv.reconstruct_dataset(Mixing(), x, by="all", classes=[0, 4], batch_size=5)  # 5 -> 3 -> 1 pass
    failed = [f.index for f in ts.failed]
    assert failed and ts.exact + len(failed) == 12
    keep = np.setdiff1d(np.arange(12), failed)
    want = rv.reconstruct_dataset(digits_model(), x[keep], by="all", classes=[0, 4], batch_size=64)
    assert torch.equal(ts.count, want.count) and int(ts.count[0]) == len(keep)
    assert torch.allclose(ts.mean, want.mean, rtol=0, atol=1e-12 * float(want.mean.abs().max()))
    assert torch.allclose(ts.std, want.std, rtol=0, atol=1e-12 * float(want.std.abs().max()))
