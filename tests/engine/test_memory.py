"""The solver's memory plan, streaming and chunking: every method and chunk size gives
the same W, a small ``max_memory`` streams W to disk with an identical result, and
the benchmark's pure helpers. No timing assertions here (see benchmarks/bench.py)."""

from __future__ import annotations

import copy
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn

import reconviz as rv
from conftest import assert_exact
from reconviz.basis import make_basis
from reconviz.errors import InputError
from reconviz.solve import (
    MIN_WORK_MEMORY,
    adjoint_chunk,
    basis_chunk,
    choose_method,
    plan_memory,
    solve_adjoint,
    solve_basis,
)


def small_net(classes: int = 7, seed: int = 0) -> nn.Module:
    """conv-BN-ReLU-maxpool, conv-ReLU, linear: 2x8x8 -> classes (D = 128)."""
    torch.manual_seed(seed)
    net = nn.Sequential(
        nn.Conv2d(2, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(6, 8, 3, padding=1), nn.ReLU(inplace=True), nn.Flatten(), nn.Linear(8 * 4 * 4, classes),
    )
    bn = net[1]
    bn.running_mean.uniform_(-0.2, 0.2)
    bn.running_var.uniform_(0.5, 1.5)
    return net.eval()


def probes(n: int = 3, seed: int = 1) -> torch.Tensor:
    return torch.randn(n, 2, 8, 8, generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def reference():
    model, x = small_net(), probes()
    return model, x, rv.reconstruct(model, x, method="adjoint", chunk_size=1)


def assert_same(rec, ref, rel=1e-10):
    scale = max(1.0, float(ref.weight.abs().max()))
    assert rec.weight.shape == ref.weight.shape
    w, b = torch.as_tensor(rec.weight).to(ref.weight.device), rec.bias.to(ref.bias.device)
    assert float((w - ref.weight).abs().max()) <= rel * scale, rec.meta
    assert float((b - ref.bias).abs().max()) <= rel * max(1.0, float(ref.bias.abs().max()))


# --------------------------------------------------------------------------
# Every method and chunk size agrees
# --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "method,basis,chunk",
    [
        ("basis", "identity", None), ("basis", "identity", 1), ("basis", "identity", 5), ("basis", "identity", 128),
        ("basis", "hadamard", None), ("basis", "hadamard", 3), ("basis", "hadamard", 1000),
        ("basis", "random", None), ("basis", "random", 7), ("basis", "random", 64),
        ("adjoint", "identity", None), ("adjoint", "identity", 2), ("adjoint", "identity", 7),
        ("adjoint", "identity", 100), ("auto", "identity", None),
    ],
)
def test_every_method_and_chunk_size_agree(reference, method, basis, chunk):
    model, x, ref = reference
    rec = rv.reconstruct(model, x, method=method, basis=basis, chunk_size=chunk, progress=False)
    assert_same(rec, ref)
    assert_exact(rec, model)
    if chunk is not None:
        assert rec.meta["chunk_size"] == min(chunk, 128 if method == "basis" else 7)


@pytest.mark.parametrize("chunk", [1, 3, None])
def test_adjoint_chunk_sizes_agree(reference, chunk):
    """One class per backward, batched backwards of 3, calibrated: the same W; b = f(x0) - W x0
    equals the basis solve's g(0)."""
    model, x, ref = reference
    lin = rv.linearize(model, x)
    cls = torch.arange(lin.n_outputs)
    w, b = solve_adjoint(lin, cls, chunk, False)
    assert torch.allclose(w.reshape(ref.weight.shape), ref.weight, rtol=0, atol=1e-12)
    assert torch.allclose(b, ref.bias, rtol=0, atol=1e-12)


def test_calibrated_chunks_are_recorded(reference):
    model, x, _ = reference
    info: dict = {}
    lin = rv.linearize(model, x)
    solve_basis(lin, torch.arange(lin.n_outputs), make_basis("identity", 128), None, False, info=info)
    assert info["chunk"] >= 1 and info["probe_groups"] == 1
    assert all(m >= 1 and s >= 0 for m, s in info["calibration"])


# --------------------------------------------------------------------------
# The memory budget: streaming, probe groups, chunk caps
# --------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["basis", "adjoint"])
def test_small_budget_streams_w_with_identical_result(reference, method, tmp_path):
    model, x, ref = reference
    mem = rv.reconstruct(model, x, method=method, chunk_size=4, progress=False)
    small = rv.reconstruct(model, x, method=method, chunk_size=4, max_memory=2**20, progress=False)
    assert not mem.streamed and small.streamed
    assert small.meta["memory"]["streamed"] and small.meta["memory"]["max_memory"] == 2**20
    assert torch.equal(torch.as_tensor(small.weight), mem.weight)  # same chunks: bit for bit
    assert torch.equal(small.bias, mem.bias)
    assert_same(small, ref)
    # the Reconstruction works the same on top of the mapped W
    assert torch.equal(small(x), mem(x))
    assert torch.equal(torch.as_tensor(small.contributions()), mem.contributions())
    assert small.errors() == mem.errors()
    small.save(tmp_path / "s.npz")
    for mmap in (False, True):
        back = rv.Reconstruction.load(tmp_path / "s.npz", mmap=mmap)
        assert torch.equal(torch.as_tensor(back.weight), mem.weight) and back.streamed == mmap


def test_budget_below_w_streams_a_w_larger_than_the_budget():
    model = small_net(classes=1000)
    x = probes(4)
    w_bytes = 4 * 1000 * 128 * 8  # 4 MB
    budget = w_bytes // 4
    rec = rv.reconstruct(model, x, method="adjoint", max_memory=budget, progress=False)
    ref = rv.reconstruct(model, x, method="adjoint", progress=False)
    assert rec.streamed and not ref.streamed
    assert rec.meta["memory"]["weight_bytes"] == w_bytes > budget
    assert rec.meta["memory"]["work_memory"] <= budget
    assert_same(rec, ref, rel=1e-12)
    assert_exact(rec, model)


def test_streaming_to_a_named_npy(reference, tmp_path):
    model, x, ref = reference
    path = tmp_path / "w" / "W.npy"
    rec = rv.reconstruct(model, x, method="basis", basis="hadamard", out=path, progress=False)
    assert rec.streamed and rec.meta["weight_file"] == str(path)
    on_disk = np.load(path)
    assert on_disk.shape == (3, 7, 2, 8, 8)
    assert np.array_equal(on_disk, torch.as_tensor(rec.weight).numpy())
    assert_same(rec, ref)


def test_probe_groups_under_a_small_budget_give_the_same_w(reference):
    model, x, ref = reference
    lin = rv.linearize(model, x)
    cls = torch.arange(lin.n_outputs)
    per_probe = lin.activation_bytes // lin.n_probes
    plan = plan_memory(lin, len(cls), max(2 * per_probe, 4096))
    for solve in ("basis", "adjoint"):
        info: dict = {}
        if solve == "basis":
            w, b = solve_basis(lin, cls, make_basis("identity", 128), None, False, plan=plan, info=info)
        else:
            w, b = solve_adjoint(lin, cls, None, False, plan=plan, info=info)
        assert info["probe_groups"] > 1, info
        assert torch.allclose(torch.as_tensor(w).reshape(ref.weight.shape), ref.weight, rtol=0, atol=1e-12)


def test_chunk_caps_follow_the_budget(reference):
    model, x, _ = reference
    lin = rv.linearize(model, x)
    sizes = [basis_chunk(lin, m) for m in (2**16, 2**20, 2**24)]
    assert sizes == sorted(sizes) and sizes[0] >= 1 and sizes[-1] <= 128
    per_column = lin.activation_bytes + x.numel() * 8
    assert sizes[1] * per_column <= 2**20 or sizes[1] == 1
    classes = [adjoint_chunk(lin, 1000, m) for m in (2**16, 2**20, 2**24)]
    assert classes == sorted(classes) and classes[0] >= 1


def test_plan_memory_splits_the_budget(reference):
    model, x, _ = reference
    lin = rv.linearize(model, x)
    w = 3 * 7 * 128 * 8
    roomy = plan_memory(lin, 7, w + 2 * MIN_WORK_MEMORY)
    assert not roomy.stream and roomy.weight_bytes == w and roomy.work_bytes == 2 * MIN_WORK_MEMORY
    tight = plan_memory(lin, 7, w + MIN_WORK_MEMORY // 2)
    assert tight.stream and tight.work_bytes <= w + MIN_WORK_MEMORY // 2
    assert plan_memory(lin, 7).stream is False


@pytest.mark.parametrize("bad", [0, -5, 1.5, "1GB", True])
def test_bad_budget_is_an_input_error(reference, bad):
    model, x, _ = reference
    with pytest.raises(InputError, match="max_memory"):
        rv.reconstruct(model, x, max_memory=bad)


# --------------------------------------------------------------------------
# auto
# --------------------------------------------------------------------------


def test_auto_rule_follows_the_shapes():
    lin = rv.linearize(small_net(classes=7), probes(1))
    assert choose_method(lin, 7) == "adjoint"  # K = 7 backward passes << D = 128 forward passes
    wide = rv.linearize(small_net(classes=1000), probes(1))
    assert choose_method(wide, 1000) == "basis"  # D = 128 << K = 1000
    why: dict = {}
    choose_method(lin, 7, seconds_per_pass=1.0, why=why)
    assert why["chosen"] == "adjoint" and why["basis_cost"] > why["adjoint_cost"]


# --------------------------------------------------------------------------
# CUDA: the same solves on the device the model and input live on
# --------------------------------------------------------------------------


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
@pytest.mark.parametrize("method,basis", [("basis", "identity"), ("basis", "hadamard"), ("adjoint", "identity"),
                                          ("auto", "identity")])
def test_cuda_solves_match_cpu(reference, method, basis):
    model, x, ref = reference
    rec = rv.reconstruct(copy.deepcopy(model).cuda(), x.cuda(), method=method, basis=basis, progress=False)
    assert rec.weight.device.type == "cuda"
    assert_same(rec, ref, rel=1e-9)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_cuda_streamed_w_lands_on_the_host(reference):
    model, x, ref = reference
    rec = rv.reconstruct(copy.deepcopy(model).cuda(), x.cuda(), method="adjoint", max_memory=2**20, progress=False)
    assert rec.streamed and rec.weight.device.type == "cpu"
    assert float((torch.as_tensor(rec.weight) - ref.weight).abs().max()) <= 1e-9


# --------------------------------------------------------------------------
# The benchmark's pure helpers (the benchmark itself runs in child processes).
# It lives in the repository's benchmarks/ folder, outside the package.
# --------------------------------------------------------------------------

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"


def _bench():
    if str(BENCHMARKS) not in sys.path:
        sys.path.insert(0, str(BENCHMARKS))
    import bench

    return bench


def test_bench_is_not_in_the_package():
    import importlib.util

    assert importlib.util.find_spec("reconviz.bench") is None
    with pytest.raises(AttributeError):
        rv.bench  # noqa: B018


def test_bench_extrapolation_is_linear_in_work():
    extrapolate = _bench().extrapolate

    # 1 s fixed + 0.1 s per unit
    assert extrapolate((10, 2.0), (20, 3.0), 1000) == pytest.approx(101.0)
    # noise that makes the second run faster cannot make the rest free
    assert extrapolate((10, 2.0), (20, 1.9), 1000) > 1.9 + 980 * 1.9 / 20 / 4 - 1e-9


def test_bench_table_and_doc_block(tmp_path):
    bench = _bench()

    count = {"probes": 1, "sample": [3, 4, 4], "forward_flops": 1e6, "backward_flops": 1e6}
    rows = [
        {"case": "c", "method": "loop", "status": "ok", "seconds": 2.0, "count": count, "k": 10,
         "peak_rss": bench.GB, "fingerprint": [1.0, 2.0]},
        {"case": "c", "method": "adjoint", "status": "ok", "seconds": 1.0, "count": count, "k": 10,
         "peak_rss": bench.GB, "fingerprint": [1.0, 2.0 + 1e-13], "info": {"chunk": 1}},
        {"case": "c", "method": "auto", "status": "ok", "seconds": 1.1, "count": count, "k": 10,
         "peak_rss": bench.GB, "info": {"chosen": "adjoint"},
         "checks": {"times": [0.1], "seconds": 0.1, "fraction": 0.1 / 1.1}},
        {"case": "c", "method": "jacrev", "status": "skipped", "message": "skipped: predicted 99 GB",
         "count": count, "k": 10},
    ]
    bench.agreement(rows)
    table = bench.format_table(rows, {"flops_per_s": 1e9})
    assert "| c | adjoint | 1.00 s | 0.50 | - |" in table and "skipped: predicted 99 GB" in table
    assert "| c | auto | 1.10 s | 0.55 | 100.0 ms (9.1%) |" in table
    assert rows[1]["agree"] == pytest.approx(5e-14)
    # the ratio the target quotes is the whole call's, the self-checks included
    assert any("auto / loop = 0.55 (PASS <= 1.25, self-checks included: 100.0 ms (9.1%) of the call; "
               "0.50 without them)" in t for t in bench.targets(rows))
    # timed in turns in one process, the paired ratio gives the verdict; the rows' ratio is shown
    rows[2]["paired"] = {"auto": 1.3, "loop": 1.0, "ratio": 1.3, "turns": 7}
    line = next(t for t in bench.targets(rows) if "**c**" in t)
    assert "auto / loop timed in turns in one process = 1.30 (1.30 s / 1.00 s, 7 turns; FAIL <= 1.25)" in line
    assert "auto / loop = 0.55 (the rows, from separate processes, self-checks included" in line
    doc = tmp_path / "perf.md"
    doc.write_text("# P\n\nintro\n\n" + bench.DOC_START + "\nold\n" + bench.DOC_END + "\n\nafter\n")
    bench.write_doc(doc, bench.DOC_START + "\nnew\n" + bench.DOC_END + "\n")
    text = doc.read_text()
    assert "intro" in text and "after" in text and "new" in text and "old" not in text


def test_bench_runs_end_to_end_on_the_digits_case(tmp_path):
    """The benchmark script itself, smallest case, one repeat: every method agrees on W,
    the table names every method, the doc block is written where asked (not into docs/)."""
    import json
    import subprocess

    doc, rows = tmp_path / "perf.md", tmp_path / "rows.json"
    doc.write_text("# perf\n\n<!-- bench:start -->\nold\n<!-- bench:end -->\n")
    proc = subprocess.run(
        [sys.executable, str(BENCHMARKS / "run.py"), "--cases", "digits", "--repeats", "1",
         "--doc", str(doc), "--json", str(rows)],
        capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    text = doc.read_text()
    assert "old" not in text and "Matmul reference" in text
    found = {r["method"]: r for r in json.loads(rows.read_text())["rows"] if r.get("case") == "digits"}
    methods = set(found)
    assert {"basis-identity", "basis-hadamard", "basis-random", "adjoint", "auto", "loop", "jacrev"} <= methods
    for method in methods:
        assert f"| digits | {method} |" in text
    # the self-checks run inside every reconviz row's timed call, and are timed apart
    for method in ("basis-identity", "adjoint", "auto"):
        checks = found[method]["checks"]
        assert 0 < checks["seconds"] < found[method]["seconds"] and 0 < checks["fraction"] < 1
    assert "checks" not in found["loop"] and "self-checks included" in text
    paired = found["auto"]["paired"]  # auto and the loop, in turns in auto's process
    assert paired["turns"] >= 1 and paired["ratio"] == pytest.approx(paired["auto"] / paired["loop"])
    assert "timed in turns in one process" in text


def test_both_backends_give_the_solver_what_its_protocol_asks(reference):
    """The torch backend's LinearizedModel is a DifferentiableAffine (basis and adjoint solves);
    the ONNX backend's onnxruntime view an AffineFunction (the basis sweep), and not more."""
    from reconviz.onnx.solve import TorchView
    from reconviz.solve import AffineFunction, DifferentiableAffine

    model, x, _ = reference
    lin = rv.linearize(model, x)
    assert isinstance(lin, DifferentiableAffine) and isinstance(lin, AffineFunction)
    graph = rv.onnx.linearize(rv.onnx.export_torch(model, x.numpy())[0], x.numpy())
    view = TorchView(graph)
    assert isinstance(view, AffineFunction) and not isinstance(view, DifferentiableAffine)
    batch = torch.cat([view.probes, 2 * view.probes])
    assert view(batch).shape == (2 * x.shape[0], lin.n_outputs)
