"""Every bad input, a typed error (issue 11, item 5): classes, verify's inputs and
models, tampered reconstruction files, the command line's exit codes and --out,
and the solver's self-checks in verify's report."""

from __future__ import annotations

import io
import json
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn

import reconviz as rv
from conftest import snapshot
from reconviz.cli import main

X = torch.randn(2, 1, 4, 4, generator=torch.Generator().manual_seed(0))


def tiny(seed: int = 0, outputs: int = 3) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Flatten(), nn.Linear(16, 8), nn.ReLU(), nn.Linear(8, outputs)).eval()


class Wrapped(nn.Module):
    """``tiny`` behind a tuple (logits, aux) or a dict {"logits", "aux"}."""

    def __init__(self, kind: str):
        super().__init__()
        self.kind, self.net = kind, tiny()

    def forward(self, x):
        y = self.net(x)
        return (y, x.sum()) if self.kind == "tuple" else {"aux": x, "logits": y}


def raises(fragment: str, fn, *args, **kwargs) -> rv.InputError:
    """fn(*args, **kwargs) raises InputError whose message holds ``fragment``."""
    with pytest.raises(rv.InputError) as info:
        fn(*args, **kwargs)
    assert fragment in str(info.value), str(info.value)
    return info.value


# ---------------------------------------------------------------------------
# reconstruct(classes=...)
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("classes, fragment", [
    ("12", "got '12' (str)"),
    ({0, 1}, "(set)"),
    ([1.5], "got 1.5 (float)"),
    ([2.0], "got 2.0 (float)"),
    ([True], "got True (bool)"),
    (True, "got True (bool)"),
    ([[0, 1]], "got [0, 1] (list)"),
    ([2**70], "indices in [0, 3)"),
    (torch.tensor([1.0]), "1-D float32"),
    (torch.tensor([True]), "1-D bool"),
    (torch.tensor([[0, 1]]), "2-D int64"),
    (np.array([1.5]), "1-D float64"),
    (torch.tensor(1.0), "got 1.0 (float)"),
    ([None], "got None (NoneType)"),
    (-1, "indices in [0, 3)"),
])
def test_bad_classes_are_input_errors(classes, fragment):
    model = tiny()
    before = snapshot(model)
    err = raises(fragment, rv.reconstruct, model, X, classes=classes)
    assert "classes" in str(err) and not isinstance(err.__cause__, (TypeError, OverflowError))
    assert snapshot(model) == before


@pytest.mark.parametrize("classes, expected", [
    (2, [2]), (np.int64(2), [2]), (torch.tensor(2), [2]), ((0, 2), [0, 2]), (range(1, 3), [1, 2]),
    (torch.tensor([2, 0]), [2, 0]), (np.array([0, 2], dtype=np.uint8), [0, 2]),
    ([torch.tensor(1), np.int32(2)], [1, 2]),
])
def test_integer_classes_are_accepted(classes, expected):
    rec = rv.reconstruct(tiny(), X, classes=classes)
    assert rec.classes.tolist() == expected and rec.classes.dtype == torch.long


def test_duplicate_classes_name_the_duplicates():
    raises("duplicates: [1]", rv.reconstruct, tiny(), X, classes=[1, 0, 1])


def test_onnx_reconstruct_refuses_float_classes(tmp_path):
    model = tiny()
    path = tmp_path / "tiny.onnx"
    torch.onnx.export(model, (X[:1],), str(path), dynamo=False, input_names=["x"],
                      dynamic_axes={"x": {0: "n"}})
    raises("got 1.5 (float)", rv.onnx.reconstruct, str(path), X, classes=[1.5])


# ---------------------------------------------------------------------------
# verify(model, rec, x)
# ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def rec():
    return rv.reconstruct(tiny(), X)


@pytest.mark.parametrize("make_model, x, fragment", [
    (tiny, torch.randn(2, 1, 5, 5), "got (2, 1, 5, 5)"),
    (tiny, torch.randn(3, 1, 4, 4), "expected inputs of shape (r * 2, 1, 4, 4)"),
    (tiny, torch.randn(2, 16), "got (2, 16)"),
    (lambda: tiny(outputs=2), None, "the model has 2 output(s), but the reconstruction has class 2"),
    (lambda: nn.Sequential(nn.Linear(5, 3)).eval(), None, "the model failed on an input of shape (2, 1, 4, 4)"),
    (lambda: Wrapped("tuple").eval(), None, "pass output="),
])
def test_verify_bad_input_or_model(rec, make_model, x, fragment):
    model = make_model()
    before = snapshot(model)
    raises(fragment, rv.verify, model, rec, x)
    assert snapshot(model) == before


@pytest.mark.parametrize("kwargs, fragment", [
    ({"tolerance": "1e-9"}, "tolerance must be"),
    ({"tolerance": -1.0}, "tolerance must be"),
    ({"tolerance": float("nan")}, "tolerance must be"),
    ({"radius": "yes"}, "radius True, False or 'auto'"),
    ({"jacobian": "no"}, "jacobian must be True or False"),
    ({"class_names": ["a", "b"]}, "naming every output up to class 2"),
    ({"class_names": "abc"}, "class_names must be a list"),
    ({"backend": "tensorflow"}, "unknown backend"),
])
def test_verify_bad_options(rec, kwargs, fragment):
    model = tiny()
    before = snapshot(model)
    raises(fragment, rv.verify, model, rec, **kwargs)
    assert snapshot(model) == before


def test_verify_needs_a_reconstruction():
    raises("rec must be a Reconstruction", rv.verify, tiny(), {"weight": 1})


@pytest.mark.parametrize("kind, output", [("tuple", 0), ("dict", "logits")])
def test_verify_uses_the_reconstructions_output_selector(kind, output):
    """verify takes output= from rec.meta and hands it to the Jacobian and the certified radius."""
    model = Wrapped(kind).eval()
    before = snapshot(model)
    rec = rv.reconstruct(model, X, output=output)
    assert rec.meta["output"] == output
    report = rv.verify(model, rec, radius=True)
    assert report.ok and report.radius is not None and report.jacobian_max_error is not None
    plain = rv.certified_radius(tiny(), X)
    assert torch.equal(report.radius.l2, plain.l2)
    assert snapshot(model) == before


def test_certified_radius_takes_output():
    model = Wrapped("dict").eval()
    raises("pass output=", rv.certified_radius, model, X)
    r = rv.certified_radius(model, X, output="logits")
    assert torch.equal(r.linf, rv.certified_radius(tiny(), X).linf)


# ---------------------------------------------------------------------------
# Reconstruction.load on tampered files
# ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def saved(rec, tmp_path_factory):
    path = rec.save(tmp_path_factory.mktemp("rec") / "good.npz")
    with np.load(path) as z:
        return path, {k: z[k] for k in z.files}


def write_npz(path: Path, arrays: dict) -> Path:
    """A .npz as np.savez lays it out, but any array allowed (object arrays pickled)."""
    with zipfile.ZipFile(path, "w") as zf:
        for name, value in arrays.items():
            buf = io.BytesIO()
            np.lib.format.write_array(buf, np.asarray(value), allow_pickle=True)
            zf.writestr(name + ".npy", buf.getvalue())
    return path


def _meta(base: dict, **changes) -> np.ndarray:
    return np.array(json.dumps(dict(json.loads(str(base["meta"])), **changes)))


TAMPERED = {  # name -> (changes to the members (None drops one), fragment of the message)
    "bad json": (lambda b: {"meta": np.array("{oops")}, "metadata is not valid JSON"),
    "meta list": (lambda b: {"meta": np.array("[1, 2]")}, "metadata is a JSON list, not an object"),
    "meta number array": (lambda b: {"meta": np.array([1.0, 2.0])}, "metadata is a float64 array"),
    "string tolerance": (lambda b: {"meta": _meta(b, tolerance="1e-9")}, "'tolerance' must be a finite number"),
    "negative tolerance": (lambda b: {"meta": _meta(b, tolerance=-1)}, "'tolerance' must be a finite number"),
    "bad exactness": (lambda b: {"meta": _meta(b, exactness="sort of")}, "'exactness' must be"),
    "bad output": (lambda b: {"meta": _meta(b, output=[0])}, "'output' must be"),
    "bad notes": (lambda b: {"meta": _meta(b, notes="hello")}, "'notes' must be a list"),
    "bad class names": (lambda b: {"meta": _meta(b, class_names=[1, 2])}, "'class_names' must be"),
    "bad cli": (lambda b: {"meta": _meta(b, cli=[1])}, "'cli' must be an object"),
    "bad error": (lambda b: {"meta": _meta(b, max_rel_error="tiny")}, "'max_rel_error' must be a number"),
    "other format": (lambda b: {"meta": _meta(b, format="other/9")}, "'format' must be"),
    "bad self-check": (lambda b: {"meta": _meta(b, self_checks=[{"name": "affinity"}])},
                       "missing or mistyped field(s) passed"),
    "bias shape": (lambda b: {"bias": b["bias"][:, :2]}, "bias has shape (2, 2), but weight"),
    "logits shape": (lambda b: {"logits": b["logits"][:1]}, "logits has shape (1, 3)"),
    "probes shape": (lambda b: {"probes": b["probes"][:, :, :2]}, "probes has shape (2, 1, 2, 4)"),
    "zero probes": (lambda b: {k: b[k][:0] for k in ("weight", "bias", "logits", "probes")},
                    "weight has shape (0, 3, 1, 4, 4)"),
    "0-d weight": (lambda b: {"weight": np.array(1.0)}, "weight has shape ()"),
    "0-d bias": (lambda b: {"bias": np.array(1.0)}, "bias has shape ()"),
    "complex weight": (lambda b: {"weight": b["weight"].astype(np.complex128)}, "complex128"),
    "int probes": (lambda b: {"probes": b["probes"].astype(np.int64)}, "probes has dtype int64"),
    "object classes": (lambda b: {"classes": np.array([0, "a", 2], dtype=object)}, "cannot be read"),
    "classes out of range": (lambda b: {"classes": np.array([0, -1, 2])}, "not distinct indices >= 0"),
    "classes repeated": (lambda b: {"classes": np.array([0, 1, 1])}, "not distinct indices >= 0"),
    "float classes": (lambda b: {"classes": b["classes"].astype(np.float64)}, "classes has dtype float64"),
    "missing logits": (lambda b: {"logits": None}, "logits are missing"),
    "missing meta": (lambda b: {"meta": None}, "meta are missing"),
}


def tampered(saved, tmp_path, case: str) -> Path:
    _, base = saved
    arrays = dict(base)
    for name, value in TAMPERED[case][0](base).items():
        if value is None:
            arrays.pop(name)
        else:
            arrays[name] = value
    return write_npz(tmp_path / (case.replace(" ", "_") + ".npz"), arrays)


@pytest.mark.parametrize("mmap", [False, True])
@pytest.mark.parametrize("case", list(TAMPERED))
def test_load_tampered_file(saved, tmp_path, case, mmap):
    path = tampered(saved, tmp_path, case)
    err = raises(TAMPERED[case][1], rv.Reconstruction.load, path, mmap=mmap)
    assert f"{path} is not a reconviz reconstruction" in str(err) and "Re-create it" in str(err)


@pytest.mark.parametrize("content, fragment", [
    (b"not a zip at all", "not a .npz (zip) archive"),
    (None, "not a .npz (zip) archive"),  # a .npy file
    (b"PK\x03\x04" + b"\0" * 40, "not a .npz (zip) archive"),
])
def test_load_file_that_is_not_an_npz(tmp_path, content, fragment):
    path = tmp_path / "x.npz"
    if content is None:
        np.save(tmp_path / "x.npy", np.zeros(3))
        path = tmp_path / "x.npy"
    else:
        path.write_bytes(content)
    err = raises(fragment, rv.Reconstruction.load, path)
    assert str(path) in str(err)


def test_load_damaged_and_missing_file(saved, tmp_path):
    data = saved[0].read_bytes()
    cut = tmp_path / "cut.npz"
    cut.write_bytes(data[:200] + data[-200:])  # members gone, the end of the central directory kept
    flipped = tmp_path / "flipped.npz"
    flipped.write_bytes(data[:300] + bytes([data[300] ^ 0xFF]) + data[301:])  # a bit of W flipped: bad CRC
    for path, fragment in ((cut, "Bad magic number"), (flipped, "Bad CRC-32 for file 'weight.npy'")):
        err = raises(fragment, rv.Reconstruction.load, path)
        assert str(path) in str(err) and "its arrays cannot be read" in str(err)
    raises("cannot read reconstruction", rv.Reconstruction.load, tmp_path / "nope.npz")


def test_load_bad_map_location(saved):
    raises("not a device", rv.Reconstruction.load, saved[0], map_location="gpu7")
    raises("mmap=True maps W on the CPU", rv.Reconstruction.load, saved[0], map_location="meta", mmap=True)


def test_load_good_file_still_loads(saved, rec):
    for mmap in (False, True):
        back = rv.Reconstruction.load(saved[0], mmap=mmap)
        assert torch.equal(back.weight, rec.weight) and torch.equal(back.classes, rec.classes)


# ---------------------------------------------------------------------------
# the command line: exit code 2, one line; --out checked before the work
# ---------------------------------------------------------------------------


def run(*argv, capsys):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def assert_usage_error(code: int, out: str, err: str, *needles: str) -> None:
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2, (code, err)
    assert len(lines) == 1 and lines[0].startswith("reconviz: error: "), err
    assert "PASS" not in out and "internal error" not in err
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])


TINY_ARCH = """
import torch.nn as nn
def Tiny(outputs=3):
    return nn.Sequential(nn.Flatten(), nn.Linear(16, 8), nn.ReLU(), nn.Linear(8, outputs))
"""


@pytest.fixture(scope="module")
def cli_files(tmp_path_factory, saved):
    d = tmp_path_factory.mktemp("clibad")
    (d / "tiny_arch.py").write_text(TINY_ARCH)
    torch.save(tiny().state_dict(), d / "tiny.pt")
    torch.save(tiny(outputs=2).state_dict(), d / "tiny2.pt")
    np.save(d / "x.npy", X.numpy())
    (d / "file").write_text("a regular file")
    code = main(["reconstruct", str(d / "tiny.pt"), str(d / "x.npy"), "--arch", f"{d / 'tiny_arch.py'}:Tiny",
                 "--out", str(d / "out"), "--no-figures"])
    assert code == 0
    return d


def test_usage_error_is_a_reconviz_error():
    from reconviz.cli import UsageError

    assert issubclass(UsageError, rv.ReconvizError)


@pytest.mark.parametrize("case", ["bad json", "meta list", "string tolerance", "bias shape", "zero probes",
                                  "complex weight", "float classes", "missing logits", "bad self-check"])
def test_cli_show_tampered_file_exits_2(saved, tmp_path, capsys, case):
    path = tampered(saved, tmp_path, case)
    code, out, err = run("show", path, "--out", tmp_path, capsys=capsys)
    assert_usage_error(code, out, err, str(path), TAMPERED[case][1])


def test_cli_show_and_verify_not_a_zip(cli_files, tmp_path, capsys):
    bad = tmp_path / "bad.npz"
    bad.write_bytes(b"hello")
    code, out, err = run("show", bad, capsys=capsys)
    assert_usage_error(code, out, err, "not a .npz (zip) archive")
    code, out, err = run("verify", bad, cli_files / "tiny.pt", "--arch", f"{cli_files / 'tiny_arch.py'}:Tiny",
                         capsys=capsys)
    assert_usage_error(code, out, err, "not a .npz (zip) archive")


def _verify_args(d: Path, model: str = "tiny.pt", rec: Path | None = None, inputs: tuple = ()) -> list:
    return ["verify", rec or d / "out" / "reconstruction.npz", d / model, *inputs,
            "--arch", f"{d / 'tiny_arch.py'}:Tiny"]


def test_cli_verify_model_with_fewer_outputs(cli_files, capsys):
    d = cli_files
    code, out, err = run(*_verify_args(d, "tiny2.pt"), "--arch-kwargs", '{"outputs": 2}', capsys=capsys)
    assert_usage_error(code, out, err, "the model has 2 output(s)")


def test_cli_verify_inputs_of_another_shape(cli_files, tmp_path, capsys):
    np.save(tmp_path / "big.npy", np.zeros((2, 1, 5, 5)))
    code, out, err = run(*_verify_args(cli_files, inputs=(tmp_path / "big.npy",)), capsys=capsys)
    assert_usage_error(code, out, err, "got (2, 1, 5, 5)")


def test_cli_verify_bad_tolerance(cli_files, capsys):
    code, out, err = run(*_verify_args(cli_files), "--tolerance", "-1", capsys=capsys)
    assert_usage_error(code, out, err, "tolerance must be")


def test_cli_verify_tampered_preprocessing(cli_files, tmp_path, capsys):
    d = cli_files
    with np.load(d / "out" / "reconstruction.npz") as z:
        arrays = {k: z[k] for k in z.files}
    meta = json.loads(str(arrays["meta"]))
    meta["cli"]["preprocess"] = {"size": ["a", "b"]}
    arrays["meta"] = np.array(json.dumps(meta))
    path = write_npz(tmp_path / "pre.npz", arrays)
    code, out, err = run(*_verify_args(d, rec=path, inputs=(d / "x.npy",)), capsys=capsys)
    assert_usage_error(code, out, err, "recorded preprocessing is not valid (size)")


@pytest.mark.parametrize("command", ["reconstruct", "verify", "show", "demo"])
def test_cli_unwritable_out_is_refused_before_the_work(cli_files, capsys, command):
    d = cli_files
    out_dir = d / "file" / "sub"  # under a regular file: not creatable, even as root
    argv = {
        "reconstruct": ["reconstruct", d / "tiny.pt", d / "x.npy", "--arch", f"{d / 'tiny_arch.py'}:Tiny"],
        "verify": _verify_args(d),
        "show": ["show", d / "out" / "reconstruction.npz"],
        "demo": ["demo"],
    }[command]
    code, out, err = run(*argv, "--out", out_dir, capsys=capsys)
    assert_usage_error(code, out, err, "cannot write to the output folder", str(out_dir))
    assert out == ""  # nothing solved, verified or printed first
    code, out, err = run(*argv, "--out", d / "file", capsys=capsys)
    assert_usage_error(code, out, err, "exists and is not a folder")


# ---------------------------------------------------------------------------
# the solver's self-checks in verify's report
# ---------------------------------------------------------------------------

PASSED = {"name": "affinity", "passed": True, "max_rel_error": 1e-15, "tolerance": 1e-9, "detail": "at x0 + d"}
SKIPPED = {"name": "region", "passed": None, "max_rel_error": None, "tolerance": 1e-9, "detail": "a tie"}
FAILED = {"name": "region", "passed": False, "max_rel_error": 0.5, "tolerance": 1e-9, "detail": "inside r"}


def with_checks(checks: list) -> rv.Reconstruction:
    rec = rv.reconstruct(tiny(), X)
    rec.meta["self_checks"] = [dict(c) for c in checks]
    return rec


def test_self_checks_passing_and_skipped_keep_the_report_ok():
    rec = with_checks([PASSED, SKIPPED])
    report = rv.verify(tiny(), rec)
    assert report.ok and [c.name for c in report.self_checks] == ["affinity", "region"]
    lines = str(report).splitlines()
    assert lines[-1].endswith(": PASS")
    check_lines = [line for line in lines if line.startswith("self-check ")]
    assert check_lines == [
        "self-check affinity: max rel 1.000e-15 (tolerance 1e-09; at x0 + d)  PASS",
        "self-check region: skipped (a tie)",
    ]
    assert lines.index(check_lines[-1]) < len(lines) - 1
    d = json.loads(report.to_json())
    assert d["self_checks"] == [PASSED, SKIPPED] and d["ok"] is True


def test_a_failed_self_check_fails_the_report():
    report = rv.verify(tiny(), with_checks([PASSED, FAILED]))
    assert report.primary.ok and not report.ok
    text = str(report)
    assert "self-check region: max rel 5.000e-01 (tolerance 1e-09; inside r)  FAIL" in text
    assert text.splitlines()[-1].endswith(": FAIL")
    assert report.to_dict()["ok"] is False and report.to_dict()["self_checks"][1]["passed"] is False


def test_no_self_checks_recorded():
    rec = rv.reconstruct(tiny(), X)
    rec.meta.pop("self_checks", None)  # as in a file written before the self-checks
    report = rv.verify(tiny(), rec)
    assert report.self_checks == [] and report.to_dict()["self_checks"] == [] and "self-check" not in str(report)


def test_self_checks_survive_save_and_load(tmp_path):
    back = rv.Reconstruction.load(with_checks([PASSED, FAILED]).save(tmp_path / "r.npz"))
    assert [c.to_dict() for c in rv.verify(tiny(), back).self_checks] == [PASSED, FAILED]


@pytest.mark.parametrize("checks, fragment", [
    ("all good", "must be a list"),
    ([{"name": "affinity"}], "passed, max_rel_error, tolerance, detail"),
    ([dict(PASSED, passed="yes")], "field(s) passed"),
    ([dict(PASSED, max_rel_error=None)], "field(s) max_rel_error"),
    ([dict(PASSED, tolerance="1e-9")], "field(s) tolerance"),
    (["affinity"], "field(s) name"),
])
def test_malformed_self_checks_are_input_errors(checks, fragment):
    rec = rv.reconstruct(tiny(), X)
    rec.meta["self_checks"] = checks
    raises(fragment, rv.verify, tiny(), rec)
