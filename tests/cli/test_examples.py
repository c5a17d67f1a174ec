"""The scripts in examples/ run and pass, so they never rot."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


def _load(name: str):
    spec = importlib.util.spec_from_file_location(f"example_{name}", EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_every_example_is_tested():
    assert {p.stem for p in EXAMPLES.glob("*.py")} == {
        "reconstruct_and_plot", "verify_digits", "overview_digits", "train_digits", "gated_vit"}


def test_reconstruct_and_plot(tmp_path, capsys):
    out = tmp_path / "figs"
    assert _load("reconstruct_and_plot").main(["--index", "3", "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "region-exact, float64: PASS" in text
    for name in ("templates.png", "contributions.png", "overview.png"):
        assert (out / name).stat().st_size > 5_000, name
    import reconviz as rv

    rec = rv.Reconstruction.load(out / "reconstruction.npz")
    assert rec.n_probes == 1 and rec.meta["max_rel_error"] <= 1e-9


@pytest.mark.parametrize("onnx", [False, True])
def test_verify_digits(capsys, onnx):
    argv = ["--n", "12"] + (["--onnx"] if onnx else [])
    assert _load("verify_digits").main(argv) == 0
    text = capsys.readouterr().out
    assert "all checks PASS" in text and "FAILED" not in text
    assert "held-out accuracy" in text


def test_overview_digits(tmp_path, capsys):
    out = tmp_path / "overview"
    assert _load("overview_digits").main(["--out", str(out), "--digits", "0", "8", "--dpi", "60"]) == 0
    text = capsys.readouterr().out
    assert "region-exact, float64: PASS" in text
    names = {"overview_digit0.png", "overview_digit8.png", "templates.png", "contributions.png",
             "equivalence.png", "class_mean_templates.png"}
    sizes = {p.name: p.stat().st_size for p in out.glob("*.png")}
    assert set(sizes) == names
    assert all(size > 5_000 for size in sizes.values()), sizes


def test_train_digits_reaches_the_stated_accuracy(tmp_path, capsys):
    """The training script, as shipped, trains a model as good as the bundled one (>= 97 %)."""
    import re

    import torch

    import reconviz as rv

    path = tmp_path / "digits.pt"
    assert _load("train_digits").main(["--out", str(path)]) == 0
    accuracy = float(re.search(r"held-out test accuracy: ([\d.]+)%", capsys.readouterr().out).group(1))
    assert accuracy >= 97.0
    retrained, data = rv.models.digits(path)
    bundled, _ = rv.models.digits()
    x = torch.as_tensor(data.x_test)
    with torch.no_grad():
        same = float((retrained(x).argmax(1) == bundled(x).argmax(1)).double().mean())
    assert same >= 0.98, f"the retrained model agrees with the bundled one on only {same:.1%} of test digits"


def test_train_digits_is_deterministic(tmp_path, capsys):
    import torch

    paths = [tmp_path / "a.pt", tmp_path / "b.pt"]
    for path in paths:
        assert _load("train_digits").main(["--out", str(path), "--epochs", "2"]) == 0
    assert not torch.are_deterministic_algorithms_enabled()  # main() restores the process-wide settings
    a, b = (torch.load(p, weights_only=True) for p in paths)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_gated_vit(tmp_path, capsys):
    """One epoch (the shipped default trains 12, 94 % held out): both rules point-exact and PASS."""
    out = tmp_path / "vit"
    assert _load("gated_vit").main(["--out", str(out), "--epochs", "1", "--digits", "3"]) == 0
    text = capsys.readouterr().out
    assert "  value: point-exact" in text and "tangent: point-exact" in text and "FAIL" not in text
    assert text.count(": PASS") == 2 and "frozen []: PASS" in text  # the tangent rule freezes nothing
    err = float(text.split("logit_c = ")[1].split()[0])
    assert err <= 1e-9
    assert (out / "gated_vit.png").stat().st_size > 5_000
