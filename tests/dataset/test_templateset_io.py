"""TemplateSet save / load (atomic, no pickles), the data sources, the figure."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader, TensorDataset

import reconviz as rv
from dataset_common import digits_data, digits_model

N = 64


@pytest.fixture(scope="module")
def ref():
    x, y = digits_data(N)
    return digits_model(), x, y, rv.reconstruct_dataset(digits_model(), (x, y), batch_size=16)


def same(a, b, rel=0.0):
    """Equal counts and failures; statistics equal to ``rel`` of their largest value (0: bit for bit,
    which every source gives: batches are laid out alike, whatever the source's strides)."""
    assert torch.equal(a.classes, b.classes) and torch.equal(a.count, b.count) and a.exact == b.exact
    for name in ("mean", "std", "contribution_mean", "bias_mean", "logit_mean"):
        u, v = getattr(a, name), getattr(b, name)
        assert (u - v).abs().max() <= rel * v.abs().max(), name
    assert a.failed == b.failed


def test_save_load_round_trip(ref, tmp_path):
    *_, ts = ref
    path = ts.save(tmp_path / "ts.npz")
    back = rv.TemplateSet.load(path)
    same(ts, back)
    assert back.meta["by"] == "label" and back.sample_shape == (1, 8, 8)
    assert back.mean.dtype == torch.float64
    with np.load(path, allow_pickle=False) as z:  # plain arrays only
        assert all(z[k].dtype != object for k in z.files)
    assert not list(tmp_path.glob(".*tmp"))  # the temporary file was renamed over


def test_load_refuses_what_is_not_a_template_set(tmp_path):
    (tmp_path / "x.npz").write_bytes(b"not a zip")
    with pytest.raises(rv.InputError, match="not a .npz"):
        rv.TemplateSet.load(tmp_path / "x.npz")
    np.savez(tmp_path / "y.npz", a=np.zeros(3))
    with pytest.raises(rv.InputError, match="missing"):
        rv.TemplateSet.load(tmp_path / "y.npz")
    with pytest.raises(rv.InputError, match="no such file"):
        rv.TemplateSet.load(tmp_path / "none.npz")


def test_every_kind_of_data_gives_the_same_result(ref, tmp_path):
    model, x, y, ts = ref
    same(ts, rv.reconstruct_dataset(model, TensorDataset(x, y), batch_size=16))
    same(ts, rv.reconstruct_dataset(model, DataLoader(TensorDataset(x, y), batch_size=16), batch_size=16))
    np.save(tmp_path / "x.npy", x.numpy())
    by_pred = rv.reconstruct_dataset(model, x, by="prediction", batch_size=16)
    same(by_pred, rv.reconstruct_dataset(model, tmp_path / "x.npy", by="prediction", batch_size=16))
    same(by_pred, rv.reconstruct_dataset(model, str(tmp_path / "x.npy"), by="prediction", batch_size=16))


def test_a_folder_of_images(tmp_path):
    """8-bit PNGs of digits in class subfolders: labels from the folders."""
    model = digits_model()
    x, y = digits_data(30)
    q = torch.round(x * 255) / 255  # what an 8-bit image holds
    for c in range(10):  # every class's folder (labels are folder positions), some of them empty
        (tmp_path / "digits" / str(c)).mkdir(parents=True)
    for i in range(30):
        d = tmp_path / "digits" / str(int(y[i]))
        d.mkdir(parents=True, exist_ok=True)
        Image.fromarray((q[i, 0].numpy() * 255).round().astype(np.uint8)).save(d / f"{i:03d}.png")
    ts = rv.reconstruct_dataset(model, tmp_path / "digits", batch_size=8)
    order = sorted(range(30), key=lambda i: (str(int(y[i])), f"{i:03d}"))  # folder order: class, then file name
    want = rv.reconstruct_dataset(model, (q[order], y[order]), batch_size=8)
    same(ts, want)


def test_class_templates_figure(ref, tmp_path):
    *_, ts = ref
    fig = rv.plot.class_templates(ts, class_names=[f"digit {i}" for i in range(10)], path=tmp_path / "ct.png")
    assert (tmp_path / "ct.png").stat().st_size > 1000
    assert len(fig.axes) >= 30
    with pytest.raises(rv.InputError, match="not in the template set"):
        rv.plot.class_templates(ts, classes=[42])


def test_load_refuses_a_corrupt_compressed_member(ref, tmp_path):
    """A template set re-packed with np.savez_compressed and then damaged: zlib's error inside the
    member comes out as the typed InputError, as Reconstruction.load's does."""
    *_, ts = ref
    with np.load(ts.save(tmp_path / "ts.npz"), allow_pickle=False) as z:
        arrays = {k: z[k] for k in z.files}
    np.savez_compressed(tmp_path / "packed.npz", **arrays)
    data = bytearray((tmp_path / "packed.npz").read_bytes())
    start = data.index(b"weights_mean.npy") + 200  # inside that member's deflated bytes
    data[start:start + 64] = b"\xff" * 64  # (zlib: "invalid distance too far back")
    (tmp_path / "bad.npz").write_bytes(bytes(data))
    with pytest.raises(rv.InputError, match="cannot be read"):
        rv.TemplateSet.load(tmp_path / "bad.npz")
