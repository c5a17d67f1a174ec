"""The model-safety contract, over every public entry point that takes a model.

After a success and after each typed error, the user's model is what it was
(weights, buffers, modes, requires_grad, parameter identity, hooks, attributes)
and nothing process-wide is left behind (global hooks, torch-function modes,
grad mode, default dtype): :func:`conftest.snapshot`. The caller's input
tensor is not written either.
"""

from __future__ import annotations

import warnings
from typing import Callable

import pytest
import torch
import torch.nn as nn

import reconviz as rv
import reconviz.metrics as metrics
import reconviz.saliency as sal
from conftest import snapshot

pytestmark = pytest.mark.filterwarnings("ignore::reconviz.HooksRemovedWarning")


class Net(nn.Module):
    """conv-BN-ReLU-maxpool-dropout-linear on (1, 8, 8), with a forward hook on the conv."""

    def __init__(self, act: Callable = torch.relu):
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(1, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.bn.running_mean.uniform_(-0.2, 0.2)
        self.bn.running_var.uniform_(0.5, 1.5)
        self.drop = nn.Dropout(0.5)
        self.fc = nn.Linear(64, 5)
        self.act = act
        self.conv.register_forward_hook(lambda m, i, o: None)

    def forward(self, x):
        z = nn.functional.max_pool2d(self.act(self.bn(self.conv(x))), 2)
        return self.fc(self.drop(z.flatten(1)))


def _smooth(z):
    return z * torch.sigmoid(z)  # SiLU written out: point-exact by the value rule (issue 12)


def _square(z):
    return z * z  # a product of two input-dependent tensors, neither from a gate: refused


def _rec(model, x):
    return rv.reconstruct(model, x)


def _uniform_map(x):
    return torch.linspace(0, 1, x[0].numel(), dtype=x.dtype).reshape(x.shape[1:]).expand_as(x).contiguous()


# entry point -> call(model, x, target); target is an int class or, for reconstruct, classes
ENTRIES: dict[str, Callable] = {
    "reconstruct": lambda m, x, t: rv.reconstruct(m, x, classes=[t]),
    "reconstruct basis": lambda m, x, t: rv.reconstruct(m, x, classes=[t], method="basis"),
    "linearize": lambda m, x, t: rv.linearize(m, x),
    "certified_radius": lambda m, x, t: rv.certified_radius(m, x),
    "verify": lambda m, x, t: rv.verify(m, _rec(m, x), x, radius=True),
    "gradient": lambda m, x, t: sal.gradient(m, x, t),
    "gradient_x_input": lambda m, x, t: sal.gradient_x_input(m, x, t),
    "template": lambda m, x, t: sal.template(m, x, t),
    "guided_backprop": lambda m, x, t: sal.guided_backprop(m, x, t),
    "deconvnet": lambda m, x, t: sal.deconvnet(m, x, t),
    "occlusion": lambda m, x, t: sal.occlusion(m, x, t, window=4),
    "layer_gradients": lambda m, x, t: sal.layer_gradients(m, x, t),
    "receptive_fields": lambda m, x, t: sal.receptive_fields(m, x),
    "deletion_auc": lambda m, x, t: metrics.deletion_auc(m, x, _uniform_map(x), t, steps=4),
    "insertion_auc": lambda m, x, t: metrics.insertion_auc(m, x, _uniform_map(x), t, steps=4),
    "prediction_difference": lambda m, x, t: metrics.prediction_difference(m, x, _uniform_map(x), t, patch=4),
    "verify onnxruntime": lambda m, x, t: rv.verify(m, _rec(m, x), x, backend="both"),
    "onnx.export_torch": lambda m, x, t: rv.onnx.export_torch(m, x.numpy())[0],
    "onnx.onnxruntime_columns": lambda m, x, t: rv.onnx.onnxruntime_columns(m, _rec(m, x), x),
    "plot.overview": lambda m, x, t: rv.plot.overview(m, x, _rec(m, x)),
    "report": lambda m, x, t: rv.report(m, x, "report.html", classes=[t], top=1),
    "reconstruct_dataset": lambda m, x, t: rv.reconstruct_dataset(m, x, classes=[t], by="prediction"),
}

# the entry points that reconstruct (and so refuse a non-piecewise-linear op)
RECONSTRUCTING = ("reconstruct", "reconstruct basis", "linearize", "certified_radius", "verify", "template",
                  "verify onnxruntime", "onnx.onnxruntime_columns", "report", "reconstruct_dataset")


def _probes() -> torch.Tensor:
    return torch.rand(2, 1, 8, 8, generator=torch.Generator().manual_seed(1))


def _assert_untouched(model: nn.Module, x: torch.Tensor, call: Callable, target, error=None):
    before, x_before = snapshot(model), x.numpy().tobytes()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if error is None:
            result = call(model, x, target)
            assert result is not None
        else:
            with pytest.raises(error):
                call(model, x, target)
    assert snapshot(model) == before, "the user's model (or process-wide state) was modified"
    assert x.numpy().tobytes() == x_before, "the caller's input was written"


@pytest.mark.parametrize("entry", list(ENTRIES))
def test_model_untouched_after_success(entry, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # an entry point that writes files writes them here
    _assert_untouched(Net().eval(), _probes(), ENTRIES[entry], 3)


@pytest.mark.parametrize("entry", list(ENTRIES))
def test_model_untouched_in_training_mode(entry, tmp_path, monkeypatch):
    """A model left in training mode stays in training mode (reconviz works on an eval copy)."""
    monkeypatch.chdir(tmp_path)
    model = Net().train()
    _assert_untouched(model, _probes(), ENTRIES[entry], 3)
    assert all(m.training for m in model.modules())


@pytest.mark.parametrize("entry", [e for e in ENTRIES if e != "onnx.export_torch"])  # export: any example
def test_model_untouched_after_a_bad_input(entry):
    x = _probes()
    x[0, 0, 0, 0] = float("nan")
    _assert_untouched(Net().eval(), x, ENTRIES[entry], 3, error=rv.InputError)


NO_TARGET = ("linearize", "certified_radius", "receptive_fields", "verify", "verify onnxruntime", "plot.overview",
             "onnx.export_torch", "onnx.onnxruntime_columns")


@pytest.mark.parametrize("entry", [e for e in ENTRIES if e not in NO_TARGET])
def test_model_untouched_after_a_bad_target(entry):
    _assert_untouched(Net().eval(), _probes(), ENTRIES[entry], 99, error=rv.ReconvizError)


@pytest.mark.parametrize("entry", RECONSTRUCTING)
def test_model_untouched_after_a_refused_operation(entry):
    """The refusal happens mid-forward, inside reconviz's modes: they and the copy's hooks go."""
    error = (rv.UnsupportedOperationError, rv.onnx.UnsupportedGraphError)
    _assert_untouched(Net(act=_square).eval(), _probes(), ENTRIES[entry], 3, error=error)


@pytest.mark.parametrize("entry", RECONSTRUCTING)
def test_model_untouched_after_a_point_exact_reconstruction(entry, tmp_path, monkeypatch):
    """The SiLU written out (refused before the value rule) is frozen point-exactly: the
    reconstructing entry points succeed and leave the model as it was."""
    monkeypatch.chdir(tmp_path)
    _assert_untouched(Net(act=_smooth).eval(), _probes(), ENTRIES[entry], 3)


def test_every_public_entry_point_that_takes_a_model_is_covered():
    """A new public function with a ``model`` parameter must join ENTRIES."""
    import inspect

    covered = {e.split(" ")[0] for e in ENTRIES}
    found = set()
    for prefix, mod in (("", rv), ("", sal), ("", metrics), ("onnx.", rv.onnx), ("plot.", rv.plot)):
        for name in getattr(mod, "__all__", []):
            f = getattr(mod, name)
            if inspect.isfunction(f) and "model" in inspect.signature(f).parameters:
                found.add(prefix + name)
    helpers = {"deletion_curve", "insertion_curve"}  # the AUCs' curves: the AUCs' code path
    onnx_files = {"onnx.reconstruct", "onnx.linearize", "onnx.linearized_to_onnx", "onnx.run_model"}  # ONNX files
    found -= onnx_files
    assert found - helpers <= covered, f"not covered by the contract test: {sorted(found - helpers - covered)}"
