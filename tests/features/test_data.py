"""reconviz.data: every data source gives the same batches; bad data is a typed error."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader, TensorDataset

from reconviz import data as rd
from reconviz.errors import InputError
from features_fixtures import _one_thread  # noqa: F401 (fixtures)


def _images(tmp_path, n_per_class=3, size=(5, 6)):
    """A class folder of grey PNGs; returns the folder and the expected (x, y) in folder order."""
    gen = np.random.default_rng(0)
    xs, ys = [], []
    for y, name in enumerate(["cat", "dog"]):
        (tmp_path / name).mkdir()
        for i in range(n_per_class):
            arr = gen.integers(0, 256, size, dtype=np.uint8)
            Image.fromarray(arr, "L").save(tmp_path / name / f"{i}.png")
            xs.append(arr[None] / 255.0)
            ys.append(y)
    (tmp_path / "dog" / "notes.txt").write_text("not an image")
    return tmp_path, torch.tensor(np.stack(xs), dtype=torch.float32), torch.tensor(ys)


def test_tensor_pair_dataset_loader_agree():
    x, y = torch.randn(10, 1, 4, 4), torch.arange(10) % 3
    ref = rd.collect((x, y), batch_size=4)
    for source in ((x, y), TensorDataset(x, y), DataLoader(TensorDataset(x, y), batch_size=3)):
        got = rd.collect(source, batch_size=4)
        assert torch.equal(got[0], x) and torch.equal(got[1], y)
    assert torch.equal(ref[0], x)
    sizes = [b[0].shape[0] for b in rd.batches(x, batch_size=4)]
    assert sizes == [4, 4, 2]
    assert all(b[1] is None for b in rd.batches(x, batch_size=4))
    assert [b[0].shape[0] for b in rd.batches(DataLoader(TensorDataset(x), batch_size=3))] == [3, 3, 3, 1]
    assert rd.collect(x, dtype=torch.float64)[0].dtype == torch.float64
    assert rd.num_samples(x) == 10 and rd.num_samples((x, y)) == 10 and rd.num_samples(TensorDataset(x)) == 10


def test_image_folder(tmp_path):
    root, x, y = _images(tmp_path)
    folder = rd.ImageFolder(root)
    assert folder.classes == ["cat", "dog"] and len(folder) == 6 and folder.channels == 1
    gx, gy = rd.collect(str(root), batch_size=4)
    assert gx.shape == (6, 1, 5, 6) and torch.equal(gy, y)
    assert torch.allclose(gx, x, atol=1e-7)
    assert rd.class_names(root) == ["cat", "dog"]
    rgb = rd.collect(root, channels=3, size=(4, 4))[0]
    assert rgb.shape == (6, 3, 4, 4) and float(rgb.min()) >= 0 and float(rgb.max()) <= 1


@pytest.mark.parametrize("bad, fragment", [
    (torch.arange(12).reshape(3, 4), "floating point"),
    (torch.tensor([1.0, float("nan")]).reshape(2, 1), "NaN"),
    (torch.ones(3), "leading sample axis"),
    ((torch.ones(3, 2), torch.ones(3)), "integer class indices"),
    ((torch.ones(3, 2), torch.zeros(4, dtype=torch.long)), "3 samples"),
    ([1, 2, 3], "got list"),
])
def test_bad_data_is_an_input_error(bad, fragment):
    with pytest.raises(InputError, match=fragment):
        rd.collect(bad)


def test_bad_folders(tmp_path):
    with pytest.raises(InputError, match="not a folder"):
        rd.collect(tmp_path / "missing")
    with pytest.raises(InputError, match="no subfolders"):
        rd.collect(tmp_path)
    (tmp_path / "a").mkdir()
    Image.fromarray(np.zeros((4, 4), np.uint8)).save(tmp_path / "a" / "0.png")
    Image.fromarray(np.zeros((5, 5), np.uint8)).save(tmp_path / "a" / "1.png")
    for batch_size in (1, 2):  # caught between batches, and by the collation inside one
        with pytest.raises(InputError, match="size"):
            rd.collect(tmp_path, batch_size=batch_size)
    (tmp_path / "a" / "2.png").write_bytes(b"not a png")
    with pytest.raises(InputError, match="cannot read image"):
        rd.collect(tmp_path, size=(4, 4))
    with pytest.raises(InputError, match="batch_size"):
        next(rd.batches(torch.ones(2, 2), batch_size=0))


def test_lazy_submodules():
    import reconviz as rv
    import reconviz.features

    assert rv.data is rd and rv.features is reconviz.features
    assert callable(rv.features.top_patches) and set(rv.features.__all__) <= set(dir(rv.features))
