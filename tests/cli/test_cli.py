"""The command line: demo, reconstruct, verify, show, and its errors and exit codes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import reconviz as rv
from reconviz.cli import main

DEMO_FIGURES = ["saliency.png", "overview.png", "equivalence.png"]


def run(*argv, capsys):
    """main(argv) in-process: (exit code, stdout, stderr)."""
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def assert_one_line_error(code: int, err: str, *needles: str) -> None:
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2, err
    assert len(lines) == 1, err
    assert lines[0].startswith("reconviz: error: "), err
    assert "Traceback" not in err
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])


# ---------------------------------------------------------------------------
# demo: the README's first command, as a real subprocess
# ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo") / "reconviz-demo"
    start = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-m", "reconviz", "demo", "--out", str(out)],
        capture_output=True, text=True, timeout=300, env=dict(os.environ, MPLBACKEND="Agg"),
    )
    return proc, out, time.perf_counter() - start


def test_demo_passes_and_prints_table(demo):
    proc, out, seconds = demo
    assert proc.returncode == 0, proc.stderr
    assert "region-exact, float64: PASS" in proc.stdout
    assert "original (torch)" in proc.stdout and "reconstructed (torch)" in proc.stdout
    assert "difference" in proc.stdout and "tolerance 1e-09" in proc.stdout
    assert str(out.resolve()) in proc.stdout  # says where the files are
    assert "Traceback" not in proc.stderr
    assert seconds < 60, f"demo took {seconds:.1f} s"


def test_demo_writes_figures(demo):
    proc, out, _ = demo
    pngs = {p.name: p.stat().st_size for p in out.glob("*.png")}
    for name in DEMO_FIGURES:
        assert pngs.get(name, 0) > 5_000, (name, pngs)
    templates = [n for n in pngs if n.startswith("templates_")]
    contributions = [n for n in pngs if n.startswith("contributions_")]
    assert len(templates) == 10 and len(contributions) == 10, sorted(pngs)  # one probe per class
    assert all(pngs[n] > 5_000 for n in templates + contributions)


def test_demo_writes_the_html_report(demo):
    proc, out, _ = demo
    page = out / "report.html"
    assert str(page.resolve()) in proc.stdout
    assert page.stat().st_size < 3_000_000  # the limit for the digits demo report
    text = page.read_text(encoding="utf-8")
    assert "<code>reconviz demo --out " in text and text.count('<section id="probe-') == 10


def test_demo_reconstruction_and_report(demo):
    _, out, _ = demo
    rec = rv.Reconstruction.load(out / "reconstruction.npz")
    assert rec.n_probes == 10 and rec.n_classes == 10 and rec.weight.dtype == torch.float64
    report = json.loads((out / "report.json").read_text())
    assert report["ok"] is True and report["comparisons"][0]["max_rel_error"] <= 1e-9
    assert "PASS" in (out / "report.txt").read_text()
    # one probe per class: the first test digit of each class
    _, data = rv.models.digits()
    y = torch.as_tensor(data.y_test)
    first = [int((y == c).nonzero()[0]) for c in range(10)]
    assert torch.equal(rec.probes, torch.as_tensor(data.x_test[first], dtype=torch.float64))


def test_console_script_installed():
    import shutil

    exe = shutil.which("reconviz", path=os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", ""))
    if exe is None:
        pytest.skip("the reconviz console script is not on PATH (package not pip-installed)")
    proc = subprocess.run([exe, "--version"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and proc.stdout.startswith("reconviz ")


# ---------------------------------------------------------------------------
# reconstruct: state_dict + --arch, .npy and PNG inputs
# ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def digits():
    model, data = rv.models.digits()
    return model, data


@pytest.fixture(scope="module")
def files(tmp_path_factory, digits):
    """The digits model as a state_dict, a pickled whole model and TorchScript; inputs as .npy and PNG."""
    model, data = digits
    d = tmp_path_factory.mktemp("cli")
    torch.save(model.state_dict(), d / "digits.pt")
    torch.save(model, d / "whole.pt")
    torch.jit.script(model).save(str(d / "digits_ts.pt"))
    x = torch.as_tensor(data.x_test[:3], dtype=torch.float64)
    np.save(d / "batch.npy", x.numpy())  # (3, 1, 8, 8): a batch
    np.save(d / "one.npy", x[0, 0].numpy())  # (8, 8): one grey image
    pngs = []
    for i in range(3, 5):
        img = np.round(np.asarray(data.x_test[i][0], dtype=np.float64) * 255).astype(np.uint8)
        Image.fromarray(img, mode="L").save(d / f"digit{i}.png")
        pngs.append(d / f"digit{i}.png")
    arch = f"{type(model).__module__}:{type(model).__qualname__}"
    return {"dir": d, "x": x, "pngs": pngs, "arch": arch}


def _png_tensor(paths) -> torch.Tensor:
    return torch.stack([torch.from_numpy(np.asarray(Image.open(p), dtype=np.float64) / 255)[None] for p in paths])


@pytest.fixture(scope="module")
def reconstructed(files):
    d = files["dir"]
    out = d / "out"
    code = main(["reconstruct", str(d / "digits.pt"), str(d / "batch.npy"), *map(str, files["pngs"]),
                 "--arch", files["arch"], "--out", str(out)])
    return code, out


def test_reconstruct_state_dict_npy_and_png(reconstructed, files, digits):
    code, out = reconstructed
    assert code == 0
    report = json.loads((out / "report.json").read_text())
    assert report["ok"] is True and report["dtype"] == "float64"
    assert "PASS" in (out / "report.txt").read_text()
    rec = rv.Reconstruction.load(out / "reconstruction.npz")
    x = torch.cat([files["x"], _png_tensor(files["pngs"])])
    assert torch.equal(rec.probes, x)
    expected = rv.reconstruct(digits[0], x)  # the same as the Python API, to 1e-12
    assert rec.weight.shape == expected.weight.shape == (5, 10, 1, 8, 8)
    assert float((rec.weight - expected.weight).abs().max()) <= 1e-12
    assert float((rec.bias - expected.bias).abs().max()) <= 1e-12
    for n in range(5):
        for kind in ("templates", "contributions"):
            assert (out / f"{kind}_probe{n}.png").stat().st_size > 5_000


def test_reconstruct_options(files, tmp_path, capsys, digits):
    d = files["dir"]
    code, out, err = run("reconstruct", d / "digits.pt", d / "one.npy", "--arch", files["arch"],
                         "--classes", "top-3", "--method", "basis", "--basis", "hadamard",
                         "--dtype", "float32", "--no-figures", "--out", tmp_path, capsys=capsys)
    assert code == 0, err
    assert "region-exact, float32: PASS" in out
    rec = rv.Reconstruction.load(tmp_path / "reconstruction.npz")
    assert rec.weight.dtype == torch.float32 and rec.meta["basis"] == "hadamard"
    with torch.no_grad():
        logits = digits[0](files["x"][:1].float())[0]
    assert rec.classes.tolist() == logits.topk(3).indices.tolist()
    assert not list(tmp_path.glob("*.png"))


def test_reconstruct_preprocessing(files, tmp_path, capsys):
    """--size, --scale, --mean and --std act on images in that order."""
    d = files["dir"]
    big = np.kron(np.asarray(Image.open(files["pngs"][0])), np.ones((2, 2), dtype=np.uint8))
    Image.fromarray(big).convert("RGB").save(tmp_path / "big.png")  # 16x16 colour image
    code, out, err = run("reconstruct", d / "digits.pt", tmp_path / "big.png", "--arch", files["arch"],
                         "--size", 8, 8, "--grayscale", "--scale", "1/255", "--mean", "0.5", "--std", "2",
                         "--no-figures", "--out", tmp_path / "o", capsys=capsys)
    assert code == 0, err
    rec = rv.Reconstruction.load(tmp_path / "o" / "reconstruction.npz")
    img = Image.open(tmp_path / "big.png").convert("L").resize((8, 8), Image.BILINEAR)
    expected = (np.asarray(img, dtype=np.float64) / 255 - 0.5) / 2
    assert np.allclose(rec.probes[0, 0].numpy(), expected, rtol=0, atol=1e-15)


def test_unsafe_pickle_is_opt_in(files, tmp_path, capsys):
    d = files["dir"]
    code, _, err = run("reconstruct", d / "whole.pt", d / "one.npy", "--out", tmp_path, capsys=capsys)
    assert_one_line_error(code, err, "--unsafe-pickle", "not a weights-only file")
    assert not (tmp_path / "reconstruction.npz").exists()
    code, out, err = run("reconstruct", d / "whole.pt", d / "one.npy", "--unsafe-pickle", "--no-figures",
                         "--out", tmp_path, capsys=capsys)
    assert code == 0, err
    assert json.loads((tmp_path / "report.json").read_text())["ok"] is True


def test_reconstruct_torchscript_via_onnx(files, tmp_path, capsys, digits):
    d = files["dir"]
    code, out, err = run("reconstruct", d / "digits_ts.pt", d / "batch.npy", "--no-figures", "--out", tmp_path,
                         capsys=capsys)
    assert code == 0, err
    assert "TorchScript" in out and "PASS" in out
    rec = rv.Reconstruction.load(tmp_path / "reconstruction.npz")
    expected = rv.reconstruct(digits[0], files["x"])
    scale = float(expected.weight.abs().max())
    assert float((rec.weight.double() - expected.weight).abs().max()) <= 1e-4 * scale
    assert json.loads((tmp_path / "report.json").read_text())["ok"] is True


def test_reconstruct_onnx_file(files, tmp_path, capsys, digits):
    d = files["dir"]
    path = tmp_path / "digits.onnx"
    torch.onnx.export(digits[0], (files["x"][:1].float(),), str(path), dynamo=False, input_names=["x"],
                      output_names=["y"], dynamic_axes={"x": {0: "n"}, "y": {0: "n"}})
    code, out, err = run("reconstruct", path, d / "batch.npy", "--no-figures", "--out", tmp_path / "o",
                         capsys=capsys)
    assert code == 0, err
    assert json.loads((tmp_path / "o" / "report.json").read_text())["ok"] is True
    code, _, err = run("reconstruct", path, d / "batch.npy", "--method", "adjoint", "--out", tmp_path / "o",
                       capsys=capsys)
    assert_one_line_error(code, err, "adjoint")


# ---------------------------------------------------------------------------
# verify and show
# ---------------------------------------------------------------------------


def test_verify_at_probes_and_inputs(reconstructed, files, capsys, tmp_path):
    _, out = reconstructed
    d = files["dir"]
    rec = out / "reconstruction.npz"
    code, text, err = run("verify", rec, d / "digits.pt", "--arch", files["arch"], capsys=capsys)
    assert code == 0, err
    assert "region-exact, float64: PASS" in text
    # the same files again (preprocessing recorded in the .npz), report written with --out
    code, text, err = run("verify", rec, d / "digits.pt", d / "batch.npy", *files["pngs"], "--arch", files["arch"],
                          "--out", tmp_path, capsys=capsys)
    assert code == 0, err
    assert json.loads((tmp_path / "report.json").read_text())["ok"] is True


def test_verify_fails_far_from_the_probes(reconstructed, files, capsys, tmp_path):
    """Far outside the probes' linear regions the affine model no longer equals f: exit code 1."""
    _, out = reconstructed
    far = files["x"].numpy()[::-1].copy()  # other digits through each probe's W
    x = np.concatenate([far, 1 - files["x"].numpy()[:2]])
    np.save(tmp_path / "far.npy", x)
    code, text, err = run("verify", out / "reconstruction.npz", files["dir"] / "digits.pt", tmp_path / "far.npy",
                          "--arch", files["arch"], capsys=capsys)
    assert code == 1, err
    assert "FAIL" in text


def test_verify_wrong_number_of_inputs(reconstructed, files, capsys):
    _, out = reconstructed
    code, _, err = run("verify", out / "reconstruction.npz", files["dir"] / "digits.pt", files["dir"] / "one.npy",
                       "--arch", files["arch"], capsys=capsys)
    assert_one_line_error(code, err, "r * 5")


def test_show(reconstructed, tmp_path, capsys):
    _, out = reconstructed
    code, text, err = run("show", out / "reconstruction.npz", "--out", tmp_path, "--probe", 1, 3, capsys=capsys)
    assert code == 0, err
    assert "Reconstruction(" in text
    names = sorted(p.name for p in tmp_path.glob("*.png"))
    assert names == ["contributions_probe1.png", "contributions_probe3.png", "templates_probe1.png",
                     "templates_probe3.png"]
    assert all((tmp_path / n).stat().st_size > 5_000 for n in names)
    code, _, err = run("show", out / "reconstruction.npz", "--out", tmp_path, "--probe", 9, capsys=capsys)
    assert_one_line_error(code, err, "--probe 9")


# ---------------------------------------------------------------------------
# errors: one line, exit code 2, no traceback (unless --debug)
# ---------------------------------------------------------------------------

UNSUPPORTED = """
import torch, torch.nn as nn
class Smooth(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(64, 10)
    def forward(self, x):
        return self.fc(torch.exp(x.flatten(1)))  # (sigmoid until the value rule froze it)
class Noisy(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(64, 10)
    def forward(self, x):
        return self.fc(x.flatten(1)) + torch.rand(1, dtype=x.dtype)
class Drifting(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(64, 10)
        self.calls = 0
    def forward(self, x):
        self.calls += 1
        return self.fc(x.flatten(1)) * self.calls
def not_a_module():
    return 3
"""


@pytest.fixture(scope="module")
def userfiles(tmp_path_factory):
    d = tmp_path_factory.mktemp("user")
    (d / "user_models.py").write_text(UNSUPPORTED)
    torch.save({"fc.weight": torch.randn(10, 64), "fc.bias": torch.randn(10)}, d / "fc.pt")
    (d / "broken.png").write_bytes(b"not an image")
    (d / "notes.txt").write_text("hello")
    np.save(d / "x.npy", np.random.default_rng(0).random((1, 8, 8)))
    return d


def _bad_cases(files, u):
    d, arch = files["dir"], files["arch"]
    ok = [d / "digits.pt", d / "one.npy", "--arch", arch, "--out", u / "o"]
    return {
        "no command args": (["reconstruct"], "required"),
        "unknown option": (["reconstruct", *ok, "--frobnicate"], "unrecognized arguments"),
        "unknown command": (["frobnicate"], "invalid choice"),
        "missing model": (["reconstruct", u / "missing.pt", d / "one.npy", "--out", u / "o"], "not found"),
        "missing input": (["reconstruct", d / "digits.pt", u / "missing.png", "--arch", arch, "--out", u / "o"],
                          "not found"),
        "state_dict without --arch": (["reconstruct", d / "digits.pt", d / "one.npy", "--out", u / "o"], "--arch"),
        "arch without colon": (["reconstruct", d / "digits.pt", d / "one.npy", "--arch", "nonsense",
                                "--out", u / "o"], "--arch"),
        "arch module missing": (["reconstruct", d / "digits.pt", d / "one.npy", "--arch", "no_such_mod:Net",
                                 "--out", u / "o"], "no_such_mod"),
        "arch class missing": (["reconstruct", d / "digits.pt", d / "one.npy", "--arch",
                                f"{u / 'user_models.py'}:Nope", "--out", u / "o"], "Nope"),
        "arch not a module": (["reconstruct", d / "digits.pt", d / "one.npy", "--arch",
                               f"{u / 'user_models.py'}:not_a_module", "--out", u / "o"], "not a torch.nn.Module"),
        "arch kwargs bad json": (["reconstruct", *ok, "--arch-kwargs", "{oops"], "JSON"),
        "arch kwargs unexpected": (["reconstruct", *ok, "--arch-kwargs", '{"zzz": 1}'], "zzz"),
        "state_dict mismatch": (["reconstruct", u / "fc.pt", d / "one.npy", "--arch", arch, "--out", u / "o"],
                                "state_dict does not fit"),
        "bad image": (["reconstruct", *ok[:1], u / "broken.png", *ok[2:]], "not an image"),
        "text file as input": (["reconstruct", *ok[:1], u / "notes.txt", *ok[2:]], "not an image"),
        "bad scale": (["reconstruct", *ok, "--scale", "zero"], "--scale"),
        "bad classes": (["reconstruct", *ok, "--classes", "3,x"], "--classes"),
        "class out of range (InputError)": (["reconstruct", *ok, "--classes", "3,99"], "classes must be indices"),
        "unsupported op (UnsupportedOperationError)": (
            ["reconstruct", u / "fc.pt", u / "x.npy", "--arch", f"{u / 'user_models.py'}:Smooth", "--out", u / "o"],
            "exp"),
        "mean per channel": (["reconstruct", *ok, "--mean", "0.1,0.2"], "--mean"),
        "mixed shapes": (["reconstruct", d / "digits.pt", d / "one.npy", u / "x.npy", files["pngs"][0], "--arch",
                          arch, "--size", "4", "4", "--out", u / "o"], "different shapes"),
        "verify: not a reconstruction": (["verify", d / "one.npy", d / "digits.pt", "--arch", arch],
                                         "reconstruction"),
        "show: missing file": (["show", u / "missing.npz"], "not found"),
    }


CASES = list(_bad_cases({"dir": Path("d"), "arch": "a", "pngs": [Path("p")]}, Path("u")))


@pytest.mark.parametrize("case", CASES)
def test_bad_usage_is_one_line_exit_2(case, files, userfiles, capsys):
    argv, needle = _bad_cases(files, userfiles)[case]
    code, _, err = run(*argv, capsys=capsys)
    assert_one_line_error(code, err, needle)


def test_exactness_error_exits_1(files, userfiles, capsys):
    """A model that is not a function of its input (state that changes between calls) fails its
    own self-check: exit 1. Random noise is refused up front: exit 2."""
    u = userfiles
    code, _, err = run("reconstruct", u / "fc.pt", u / "x.npy", "--arch", f"{u / 'user_models.py'}:Drifting",
                       "--out", u / "drifting", capsys=capsys)
    assert code == 1
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("reconviz: error: self-check 'affinity' failed")
    code, _, err = run("reconstruct", u / "fc.pt", u / "x.npy", "--arch", f"{u / 'user_models.py'}:Noisy",
                       "--out", u / "noisy", capsys=capsys)
    assert_one_line_error(code, err, "rand")


def test_debug_shows_traceback(files, capsys, tmp_path):
    d = files["dir"]
    code, _, err = run("--debug", "reconstruct", d / "digits.pt", d / "one.npy", "--out", tmp_path, capsys=capsys)
    assert code == 2 and "Traceback" in err and err.strip().splitlines()[-1].startswith("reconviz: error:")
    code, _, err = run("reconstruct", d / "digits.pt", d / "one.npy", "--out", tmp_path, "--debug", capsys=capsys)
    assert code == 2 and "Traceback" in err


def test_help_and_version(capsys):
    code, out, _ = run("--help", capsys=capsys)
    assert code == 0 and "reconstruct" in out and "Exit codes" in out
    code, out, _ = run("--version", capsys=capsys)
    assert code == 0 and out.startswith("reconviz ")
    code, out, _ = run("reconstruct", "--help", capsys=capsys)
    assert code == 0 and "--unsafe-pickle" in out and "--arch" in out
    code, _, err = run(capsys=capsys)  # no command: help, exit 2
    assert code == 2


def test_python_dash_m_error_is_one_line(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "reconviz", "show", str(tmp_path / "nope.npz")],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [f"reconviz: error: reconstruction file not found: {tmp_path / 'nope.npz'}"]
