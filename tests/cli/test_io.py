"""reconviz.io from Python: every model kind and input kind the CLI reads, and its typed errors."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
import torch.nn as nn
from PIL import Image

import reconviz as rv
from reconviz.io import (Digits, LoadedModel, UsageError, load_class_names, load_digits, load_inputs, load_model,
                         load_reconstruction, recorded_preprocessing)
from reconviz.reconstruction import relative_error

ARCH = """
import torch.nn as nn
class Net(nn.Module):
    def __init__(self, n=3):
        super().__init__()
        self.fc = nn.Linear(4, n)
    def forward(self, x):
        return self.fc(x.flatten(1)).relu()
"""


@pytest.fixture(scope="module")
def digits():
    return rv.models.digits()


@pytest.fixture(scope="module")
def models(tmp_path_factory, digits):
    """The digits CNN as a state_dict, a checkpoint dict, a pickled model, TorchScript and ONNX; a small arch file."""
    model, data = digits
    d = tmp_path_factory.mktemp("io_models")
    x = torch.as_tensor(data.x_test[:2], dtype=torch.float64)
    torch.save(model.state_dict(), d / "digits.pt")
    torch.save({"model_state_dict": {"module." + k: v for k, v in model.state_dict().items()}}, d / "ckpt.pt")
    torch.save(model, d / "whole.pt")
    torch.jit.script(model).save(str(d / "digits_ts.pt"))
    torch.onnx.export(model, (x[:1].float(),), str(d / "digits.onnx"), dynamo=False, input_names=["x"],
                      output_names=["y"], dynamic_axes={"x": {0: "n"}, "y": {0: "n"}})
    (d / "net.py").write_text(ARCH)
    torch.save({"fc.weight": torch.randn(5, 4), "fc.bias": torch.randn(5)}, d / "net5.pt")
    torch.save({"epoch": 3}, d / "notstate.pt")
    (d / "empty.pt").write_bytes(b"")
    return {"dir": d, "x": x, "arch": f"{type(model).__module__}:{type(model).__qualname__}"}


def _torch_logits(model, x):
    with torch.no_grad():
        return copy.deepcopy(model).to(torch.float64)(x)


# ---------------------------------------------------------------------------
# models
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["digits.pt", "ckpt.pt"])
def test_state_dict_with_arch(models, digits, name):
    loaded = load_model(models["dir"] / name, arch=models["arch"])
    assert isinstance(loaded, LoadedModel) and loaded.kind == "torch" and loaded.is_torch
    assert loaded.source == str(models["dir"] / name) and loaded.describe() == "PyTorch model"
    assert not loaded.module.training
    for k, v in digits[0].state_dict().items():
        assert torch.equal(loaded.module.state_dict()[k], v), k


@pytest.mark.parametrize("kwargs", [{"n": 5}, '{"n": 5}'])
def test_arch_file_with_kwargs(models, kwargs):
    d = models["dir"]
    loaded = load_model(d / "net5.pt", arch=f"{d / 'net.py'}:Net", arch_kwargs=kwargs)
    assert loaded.module.fc.weight.shape == (5, 4)
    assert loaded.logits(torch.ones(2, 4)).shape == (2, 5)


def test_pickled_model_only_with_opt_in(models, monkeypatch):
    calls = []
    load = torch.load
    monkeypatch.setattr(torch, "load", lambda *a, **k: calls.append(k["weights_only"]) or load(*a, **k))
    with pytest.raises(UsageError, match="is not a weights-only file .* --unsafe-pickle"):
        load_model(models["dir"] / "whole.pt")
    assert calls == [True]
    loaded = load_model(models["dir"] / "whole.pt", unsafe_pickle=True)
    assert calls == [True, True, False]  # weights_only=True first, the unsafe load only after the opt-in
    assert loaded.kind == "torch" and isinstance(loaded.module, nn.Module)


def test_torchscript_runs_through_onnx(models, digits, tmp_path):
    loaded = load_model(models["dir"] / "digits_ts.pt")
    assert loaded.kind == "torchscript" and isinstance(loaded.module, torch.jit.ScriptModule)
    x = models["x"]
    got = loaded.logits(x, workdir=tmp_path)
    assert loaded.onnx_path == tmp_path / "model.onnx" and loaded.onnx_path.is_file()
    assert got.dtype == torch.float64 and got.shape == (2, 10)
    assert float(relative_error(got, _torch_logits(digits[0], x)).max()) <= 1e-4


def test_onnx_file(models, digits):
    path = models["dir"] / "digits.onnx"
    loaded = load_model(path)
    assert (loaded.kind, loaded.onnx_path, loaded.module) == ("onnx", path, None)
    assert loaded.describe() == "ONNX model" and loaded.onnx_file(models["x"]) == path
    got = loaded.logits(models["x"])
    assert float(relative_error(got, _torch_logits(digits[0], models["x"])).max()) <= 1e-4


def test_bundled_digits_reconstruct_exactly():
    demo = load_digits()
    assert isinstance(demo, Digits) and demo.model.kind == "torch"
    assert demo.x.shape == (10, 1, 8, 8) and demo.x.dtype == torch.float64
    assert demo.labels == list(range(10)) and len(demo.class_names) == 10
    rec = rv.reconstruct(demo.model.module, demo.x)
    err = relative_error(rec(demo.x), demo.model.logits(demo.x)[:, rec.classes])
    assert rec.weight.dtype == torch.float64 and float(err.max()) <= 1e-9


def _bad_models(d, arch):
    net = f"{d / 'net.py'}:Net"
    return {
        "missing": ((d / "nope.pt",), {}, "model file not found"),
        "a folder": ((d,), {}, "model path is not a file"),
        "no arch": ((d / "digits.pt",), {}, "is a state_dict (weights only): name the architecture with --arch"),
        "arch on onnx": ((d / "digits.onnx",), {"arch": arch}, "apply to state_dict files; MODEL is an ONNX file"),
        "arch on torchscript": ((d / "digits_ts.pt",), {"arch_kwargs": "{}"}, "MODEL is a TorchScript file"),
        "arch on a pickled model": ((d / "whole.pt",), {"arch": arch, "unsafe_pickle": True}, "drop --arch"),
        "arch spec": ((d / "digits.pt",), {"arch": "nonsense"}, "--arch must look like package.module:ClassName"),
        "arch module": ((d / "digits.pt",), {"arch": "no_such_mod:Net"}, "no module named 'no_such_mod'"),
        "arch file": ((d / "digits.pt",), {"arch": f"{d / 'nope.py'}:Net"}, "--arch: file not found"),
        "arch name": ((d / "digits.pt",), {"arch": f"{d / 'net.py'}:Nope"}, "has no attribute 'Nope'"),
        "kwargs json": ((d / "net5.pt",), {"arch": net, "arch_kwargs": "{oops"}, "--arch-kwargs is not valid JSON"),
        "kwargs list": ((d / "net5.pt",), {"arch": net, "arch_kwargs": "[5]"}, "must be a JSON object, got list"),
        "kwargs unknown": ((d / "net5.pt",), {"arch": net, "arch_kwargs": {"zzz": 1}}, "unexpected keyword"),
        "mismatch": ((d / "net5.pt",), {"arch": net}, "state_dict does not fit"),
        "not torch": ((d / "empty.pt",), {}, "as a PyTorch file"),
        "not a state_dict": ((d / "notstate.pt",), {"arch": arch}, "a dict that is not a state_dict (keys: epoch)"),
    }


BAD_MODELS = ["missing", "a folder", "no arch", "arch on onnx", "arch on torchscript", "arch on a pickled model",
              "arch spec", "arch module", "arch file", "arch name", "kwargs json", "kwargs list", "kwargs unknown",
              "mismatch", "not torch", "not a state_dict"]


@pytest.mark.parametrize("case", BAD_MODELS)
def test_bad_model_raises_usage_error(models, case):
    args, kwargs, message = _bad_models(models["dir"], models["arch"])[case]
    with pytest.raises(UsageError) as e:
        load_model(*args, **kwargs)
    assert message in str(e.value) and isinstance(e.value, rv.ReconvizError)


def test_cli_reexports_the_io_names():
    import reconviz.cli as cli

    assert cli.UsageError is UsageError and cli.LoadedModel is LoadedModel


# ---------------------------------------------------------------------------
# inputs
# ---------------------------------------------------------------------------


@pytest.fixture
def inputs(tmp_path):
    rng = np.random.default_rng(0)
    np.save(tmp_path / "batch.npy", rng.random((3, 2, 4, 4)))
    np.save(tmp_path / "hw.npy", rng.random((4, 4)).astype(np.float32))
    np.save(tmp_path / "vectors.npy", np.arange(6).reshape(2, 3))
    grey = rng.integers(0, 256, (4, 4), dtype=np.uint8)
    Image.fromarray(grey, mode="L").save(tmp_path / "grey.png")
    Image.fromarray(np.stack([grey] * 3, axis=-1), mode="RGB").save(tmp_path / "rgb.png")
    return tmp_path, grey


def test_npy_arrays(inputs):
    d, _ = inputs
    x = load_inputs([d / "batch.npy"])
    assert x.dtype == torch.float64 and x.shape == (3, 2, 4, 4)
    assert torch.equal(x, torch.from_numpy(np.load(d / "batch.npy")))
    assert load_inputs(str(d / "hw.npy")).shape == (1, 1, 4, 4)  # one path, one (H, W) image
    v = load_inputs([d / "vectors.npy"], npy_batch=True, scale=0.5)
    assert torch.equal(v, torch.arange(6, dtype=torch.float64).reshape(2, 3) / 2)


def test_images(inputs):
    d, grey = inputs
    x = load_inputs([d / "grey.png", d / "grey.png"])
    assert x.shape == (2, 1, 4, 4) and torch.allclose(x[0, 0], torch.from_numpy(grey / 255.0), rtol=0, atol=1e-15)
    rgb = load_inputs([d / "rgb.png"])
    assert rgb.shape == (1, 3, 4, 4) and torch.equal(rgb[0, 1], x[0, 0])
    assert load_inputs([d / "rgb.png"], grayscale=True).shape == (1, 1, 4, 4)
    assert load_inputs([d / "grey.png"], rgb=True, size=(2, 3)).shape == (1, 3, 2, 3)


def test_preprocessing_order(inputs):
    d, grey = inputs
    x = load_inputs([d / "rgb.png"], scale=1 / 255, mean=[0.5, 0.5, 0.0], std=[2, 2, 1])
    assert torch.allclose(x[0, 0], torch.from_numpy((grey / 255 - 0.5) / 2), rtol=0, atol=1e-15)
    assert torch.allclose(x[0, 2], torch.from_numpy(grey / 255.0), rtol=0, atol=1e-15)


def _bad_inputs(d):
    np.save(d / "text.npy", np.array(["a", "b"]))
    np.save(d / "scalar.npy", np.float64(3))
    np.save(d / "empty.npy", np.zeros((0, 1, 4, 4)))
    np.save(d / "nan.npy", np.full((4, 4), np.nan))
    (d / "broken.png").write_bytes(b"not an image")
    return {
        "missing": ([d / "nope.png"], {}, "input file not found"),
        "a folder": ([d], {}, "input path is not a file"),
        "broken image": ([d / "broken.png"], {}, "is not an image file Pillow can read"),
        "text array": ([d / "text.npy"], {}, "must hold a numeric array"),
        "scalar": ([d / "scalar.npy"], {}, "holds a scalar, not a sample"),
        "empty batch": ([d / "empty.npy"], {}, "holds an empty batch"),
        "mixed shapes": ([d / "grey.png", d / "rgb.png"], {}, "the inputs have different shapes"),
        "std zero": ([d / "grey.png"], {"std": [0]}, "--std must not contain 0"),
        "mean channels": ([d / "rgb.png"], {"mean": [1, 2]}, "--mean gives 2 values; the inputs have 3 channel(s)"),
        "no channel axis": ([d / "vectors.npy"], {"npy_batch": True, "mean": [1, 2]}, "have no channel axis"),
        "nan": ([d / "nan.npy"], {}, "the inputs contain NaN or Inf values"),
    }


BAD_INPUTS = ["missing", "a folder", "broken image", "text array", "scalar", "empty batch", "mixed shapes",
              "std zero", "mean channels", "no channel axis", "nan"]


@pytest.mark.parametrize("case", BAD_INPUTS)
def test_bad_input_raises_usage_error(inputs, case):
    paths, kwargs, message = _bad_inputs(inputs[0])[case]
    with pytest.raises(UsageError) as e:
        load_inputs(paths, **kwargs)
    assert message in str(e.value)


# ---------------------------------------------------------------------------
# saved reconstructions, recorded preprocessing, class names
# ---------------------------------------------------------------------------


def test_reconstruction_and_recorded_preprocessing(tmp_path):
    model = nn.Sequential(nn.Flatten(), nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2)).double()
    rec = rv.reconstruct(model, torch.randn(1, 1, 2, 2, dtype=torch.float64))
    rec.meta["cli"] = {"preprocess": {"size": [2, 2], "scale": 0.5}}
    loaded = load_reconstruction(rec.save(tmp_path / "rec.npz"))
    assert torch.equal(loaded.weight, rec.weight)
    assert recorded_preprocessing(loaded, "rec.npz") == {"size": [2, 2], "scale": 0.5}
    loaded.meta["cli"]["preprocess"]["scale"] = 0
    with pytest.raises(UsageError, match=r"rec.npz: the recorded preprocessing is not valid \(scale\)"):
        recorded_preprocessing(loaded, "rec.npz")
    with pytest.raises(UsageError, match="reconstruction file not found"):
        load_reconstruction(tmp_path / "nope.npz")


def test_class_names(tmp_path):
    (tmp_path / "names.txt").write_text("cat\n\ndog\n")
    assert load_class_names(str(tmp_path / "names.txt")) == ["cat", "dog"]
    assert load_class_names("a, b") == ["a", "b"] and load_class_names(None) is None
    with pytest.raises(UsageError, match="--class-names: expected comma-separated names or a file"):
        load_class_names("a,,b")
