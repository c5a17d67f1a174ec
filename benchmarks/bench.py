"""Benchmark: reconviz's solves against the Jacobian tools a user would otherwise reach for.

    python benchmarks/run.py            # full run (~20 min on 2 CPU cores), writes docs/performance.md
    python benchmarks/run.py --quick    # digits + a small VGG (~1-2 min): development and CI smoke test

This module lives in the repository's ``benchmarks/`` folder, not in the
package (it is not installed); ``run.py`` is its entry point.

Every (case, method) runs in its own child process under an address-space cap
(``RLIMIT_AS``), so a method that would blow up memory fails with "OOM at N GB"
instead of taking the machine down; methods whose predicted footprint exceeds
the cap are skipped with the prediction stated. Peak memory is the child's own
peak resident set (``ru_maxrss``), the whole process included (Python, torch,
the model, W).

Timings are medians of repeats, end to end for the user's call
(reconviz: copy, probe, solve and the exactness check; the alternatives: the
forward pass and all backward passes). With one thread on a CPU (the default)
the clock is the child's CPU time, which other processes' load inflates far less
than wall time; wall seconds are kept beside it in the JSON rows. Solves too long to run are timed on two
sizes of partial work u1 < u2 (classes, or basis columns) and extrapolated
linearly to the full size U:

    t(U) = t(u2) + (U - u2) * (t(u2) - t(u1)) / (u2 - u1)        (classes)
    t(U) = (t(u2) - s(u2)) + U * s(u2) / u2                        (basis columns)

(s: the basis sweep's own time, chunk calibration included) and are marked "extrapolated" (their peak memory adds the part of W not yet
written). Work is counted in FLOPs with ``torch.utils.flop_counter``: a basis
solve is N * D forward passes of one sample, a reverse-mode solve N * (F + K * B)
(F: forward, B: input-gradient backward of one sample); the achieved rate is
stated as a fraction of a large matmul's rate measured in the same run.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import platform
import re
import resource
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable


__all__ = ["main", "CASES", "extrapolate", "run_case", "format_table"]

GB = 2**30
RUN_SCRIPT = Path(__file__).resolve().with_name("run.py")  # the entry point; children run it by path
PROG = "python benchmarks/run.py"
RESULT_TAG = "RECONVIZ-BENCH-RESULT "
DOC_START, DOC_END = "<!-- bench:start -->", "<!-- bench:end -->"
RV_METHODS = ("basis-identity", "basis-hadamard", "basis-random", "adjoint", "head", "auto", "tangent")
RV_ALL = tuple(m for m in RV_METHODS if m not in ("head", "tangent"))  # every solve that runs on any net
# (head: a narrow head; tangent: linearization="tangent", auto's solve: gated nets, where it is not the value rule)
ALT_METHODS = ("loop", "jacrev", "jacrev-c10", "jacrev-c50", "jacobian-vec")


# --------------------------------------------------------------------------
# Models (built deterministically in every child)
# --------------------------------------------------------------------------


def _init_bn(model, seed: int):
    """Non-trivial BatchNorm statistics, so that eval-mode BN is a real affine map."""
    import torch
    import torch.nn as nn

    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.1)
            m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
    return model.eval()


def vgg(size: int, classes: int, widths=(32, 64, 128, 256)):
    """VGG-style: 4 blocks of (conv3x3-BN-ReLU) x 2 + max-pool 2, then one linear layer."""
    import torch
    import torch.nn as nn

    torch.manual_seed(0)
    layers, c = [], 3
    for w in widths:
        for cin in (c, w):
            layers += [nn.Conv2d(cin, w, 3, padding=1), nn.BatchNorm2d(w), nn.ReLU(inplace=True)]
        layers.append(nn.MaxPool2d(2))
        c = w
    side = size // 2 ** len(widths)
    return _init_bn(nn.Sequential(*layers, nn.Flatten(), nn.Linear(c * side * side, classes)), 0)


def resnet18(classes: int = 1000):
    """ResNet-18's shape (torchvision's layout, no torchvision needed): 224x224 -> classes."""
    import torch
    import torch.nn as nn

    class Block(nn.Module):
        def __init__(self, cin: int, cout: int, stride: int):
            super().__init__()
            self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
            self.bn1 = nn.BatchNorm2d(cout)
            self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
            self.bn2 = nn.BatchNorm2d(cout)
            self.down = None
            if stride != 1 or cin != cout:
                self.down = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

        def forward(self, x):
            out = torch.relu(self.bn1(self.conv1(x)))
            out = self.bn2(self.conv2(out))
            return torch.relu(out + (x if self.down is None else self.down(x)))

    torch.manual_seed(0)
    stages, cin = [], 64
    for cout, stride in ((64, 1), (128, 2), (256, 2), (512, 2)):
        stages += [Block(cin, cout, stride), Block(cout, cout, 1)]
        cin = cout
    model = nn.Sequential(
        nn.Conv2d(3, 64, 7, 2, 3, bias=False), nn.BatchNorm2d(64), nn.ReLU(inplace=True), nn.MaxPool2d(3, 2, 1),
        *stages, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(512, classes),
    )
    return _init_bn(model, 0)


def efficientnet(classes: int = 100, size: int = 64):
    """An EfficientNet-style gated net: SiLU stem, three MBConv blocks (1x1 expand x4, SiLU,
    depthwise 3x3, SiLU, sigmoid squeeze-excitation, 1x1 project, residual where shapes allow),
    global average pool, linear. Input 3 x size x size."""
    import torch
    import torch.nn as nn

    class MBConv(nn.Module):
        def __init__(self, cin: int, cout: int, stride: int):
            super().__init__()
            wide = 4 * cin
            self.expand = nn.Sequential(nn.Conv2d(cin, wide, 1), nn.BatchNorm2d(wide), nn.SiLU())
            self.dw = nn.Sequential(nn.Conv2d(wide, wide, 3, stride, 1, groups=wide), nn.BatchNorm2d(wide), nn.SiLU())
            self.se = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Conv2d(wide, cin // 2, 1), nn.SiLU(),
                                    nn.Conv2d(cin // 2, wide, 1), nn.Sigmoid())
            self.project = nn.Sequential(nn.Conv2d(wide, cout, 1), nn.BatchNorm2d(cout))
            self.skip = stride == 1 and cin == cout

        def forward(self, x):
            h = self.dw(self.expand(x))
            h = self.project(h * self.se(h))
            return x + h if self.skip else h

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 16, 3, 2, 1), nn.BatchNorm2d(16), nn.SiLU(), MBConv(16, 24, 2),
                          MBConv(24, 24, 1), MBConv(24, 40, 2), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                          nn.Linear(40, classes))
    return _init_bn(model, 0)


def vit(classes: int = 100, size: int = 32, patch: int = 4, d: int = 64, depth: int = 4, heads: int = 4):
    """A ViT-style gated net: patch embedding, class token, position embedding, ``depth`` pre-norm
    blocks (nn.MultiheadAttention, GELU MLP), LayerNorm, linear head. Input 3 x size x size."""
    import torch
    import torch.nn as nn

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.n1, self.n2 = nn.LayerNorm(d), nn.LayerNorm(d)
            self.attn = nn.MultiheadAttention(d, heads, batch_first=True)
            self.mlp = nn.Sequential(nn.Linear(d, 2 * d), nn.GELU(), nn.Linear(2 * d, d))

        def forward(self, z):
            h = self.n1(z)
            z = z + self.attn(h, h, h, need_weights=False)[0]
            return z + self.mlp(self.n2(z))

    class ViT(nn.Module):
        def __init__(self):
            super().__init__()
            tokens = (size // patch) ** 2
            self.patch = nn.Conv2d(3, d, patch, patch)
            self.cls = nn.Parameter(torch.randn(1, 1, d) * 0.02)
            self.pos = nn.Parameter(torch.randn(1, tokens + 1, d) * 0.02)
            self.blocks = nn.Sequential(*(Block() for _ in range(depth)))
            self.norm, self.head = nn.LayerNorm(d), nn.Linear(d, classes)

        def forward(self, x):
            z = self.patch(x).flatten(2).transpose(1, 2)
            z = torch.cat([self.cls.expand(len(z), -1, -1), z], 1) + self.pos
            return self.head(self.norm(self.blocks(z)[:, 0]))

    torch.manual_seed(0)
    return ViT().eval()


def _digits(n: int | None):
    import numpy as np
    import torch

    from reconviz.models import digits

    model, data = digits()
    x = np.concatenate([data.x_test, data.x_train]) if n is None else data.x_test[:n]
    return model, torch.as_tensor(x)


def _random_input(shape: tuple[int, ...], n: int = 1):
    import torch

    return torch.randn(n, *shape, generator=torch.Generator().manual_seed(1))


# --------------------------------------------------------------------------
# Cases
# --------------------------------------------------------------------------


@dataclass
class Case:
    """One benchmark case: a model, its probes, the methods run on it, and time limits.

    ``budget`` (seconds): a solve predicted to take longer runs on partial work
    and is extrapolated. ``methods`` maps method names to a fixed partial size
    (None: decide from the budget)."""

    name: str
    title: str
    build: Callable[[], tuple[Any, Any]]
    classes: int
    methods: tuple[str, ...]
    budget: float = 40.0
    repeats: int = 3
    many_probes: bool = False
    # auto and the loop also timed in turns in auto's child: a ratio that differences between
    # processes (±50 % on a 10 ms call on a shared machine) do not move
    paired: bool = False
    full: tuple[str, ...] = ("head",)  # never on partial classes (the head's cost is its width P, not K)
    gated: bool = False  # point-exact: the value rule's W is not the Jacobian (the loop's, the tangent's)


def _vgg_case(size: int, classes: int, methods: tuple[str, ...], budget: float = 40.0) -> Case:
    return Case(f"vgg{size}-{classes}", f"VGG-style 3x{size}x{size}, {classes} classes",
                lambda: (vgg(size, classes), _random_input((3, size, size))), classes, methods, budget)


_ALL = RV_ALL + ALT_METHODS

CASES: dict[str, Case] = {c.name: c for c in [
    Case("digits", "digits CNN 1x8x8, 10 classes, 1 probe", lambda: _digits(1), 10,
         RV_ALL + ("loop", "jacrev", "jacobian-vec"), repeats=101, paired=True),  # ~10 ms a call: noise +-30%
    Case("digits-all", "digits CNN, all 1,797 probes, 10 classes", lambda: _digits(None), 10,
         ("auto", "adjoint", "basis-identity", "loop", "loop-per-probe"), repeats=15, many_probes=True, paired=True),
    _vgg_case(64, 100, _ALL),
    _vgg_case(64, 1000, ("basis-identity", "adjoint", "auto", "loop", "jacrev-c10", "jacrev-c50",
                         "jacobian-vec")),
    _vgg_case(128, 100, ("basis-identity", "adjoint", "auto", "loop", "jacrev-c10", "jacobian-vec"), budget=60.0),
    _vgg_case(128, 1000, ("basis-identity", "basis-hadamard", "adjoint", "auto", "loop", "jacrev-c10",
                          "jacrev-c50", "jacrev", "jacobian-vec"), budget=150.0),
    Case("resnet18-64", "ResNet-18-shaped 3x64x64, 1000 classes (head: 512 features)",
         lambda: (resnet18(), _random_input((3, 64, 64))), 1000, ("head", "auto", "adjoint", "loop"),
         budget=30.0, repeats=1, full=("head", "auto")),
    Case("resnet18", "ResNet-18-shaped 3x224x224, 1000 classes", lambda: (resnet18(), _random_input((3, 224, 224))),
         1000, ("adjoint", "loop", "basis-identity"), budget=15.0, repeats=1),
    Case("effnet64-100", "EfficientNet-style (SiLU, sigmoid SE) 3x64x64, 100 classes, gated",
         lambda: (efficientnet(), _random_input((3, 64, 64))), 100, ("adjoint", "auto", "tangent", "loop"),
         budget=30.0, gated=True),
    Case("vit32-100", "ViT-style (4 blocks, MHA, LayerNorm, GELU) 3x32x32, 100 classes, gated",
         lambda: (vit(), _random_input((3, 32, 32))), 100, ("adjoint", "auto", "tangent", "loop"),
         budget=30.0, gated=True),
    Case("vit32-1000", "ViT-style 3x32x32, 1000 classes, gated (head: 64 features)",
         lambda: (vit(classes=1000), _random_input((3, 32, 32))), 1000, ("head", "auto", "adjoint", "loop"),
         budget=30.0, repeats=1, full=("head", "auto"), gated=True),
]}
QUICK = ("digits", "digits-all", "vgg64-100")
QUICK_METHODS = {"vgg64-100": ("basis-identity", "adjoint", "auto", "loop", "jacrev-c10")}
QUICK_SCALE = 0.3  # --quick: time budgets scaled by this


# --------------------------------------------------------------------------
# Methods (run inside a child): each returns W (N, K, D), b (N, K), info
# --------------------------------------------------------------------------


def _float_copy(model, dtype, device):
    import copy

    return copy.deepcopy(model).eval().to(device=device, dtype=dtype)


def _rv_reconstruct(model, x, k: int, method: str, dtype, max_memory):
    import reconviz as rv

    kind, _, basis = method.partition("-")
    rule = "tangent" if kind == "tangent" else "value"
    rec = rv.reconstruct(model, x, classes=range(k), method="auto" if rule == "tangent" else kind,
                         basis=basis or "identity", dtype=dtype, max_memory=max_memory, progress=False,
                         linearization=rule)
    m = rec.meta
    info = {"chosen": m["method"], "chunk": m.get("chunk_size"), "streamed": rec.streamed,
            "rel_error": m["max_rel_error"], "timings": m["timings"]}
    if "auto" in m:
        info["auto"] = {key: m["auto"][key] for key in ("basis_cost", "adjoint_cost", "head_cost", "chosen")
                        if key in m["auto"]}
    return rec.weight.reshape(rec.n_probes, rec.n_classes, -1), rec.bias, info


def _rv_partial_basis(model, x, cols: int, kind: str, dtype, max_memory, k: int):
    """The basis solve on its first ``cols`` columns (whole blocks): for extrapolation."""
    import numpy as np
    import torch

    import reconviz as rv
    from reconviz.basis import make_basis
    from reconviz.solve import plan_memory, sample_size, solve_basis, timed_bias

    lin = rv.linearize(model, x, dtype=dtype)
    basis = make_basis(kind, sample_size(lin), seed=0)
    if kind in ("identity", "hadamard"):  # the blocks of a basis of the partial width: the same work per column
        blocks = make_basis(kind, cols).blocks
    else:
        ends = np.cumsum([size for _, size in basis.blocks])
        blocks = basis.blocks[: int(np.searchsorted(ends, cols)) + 1]
    done = sum(size for _, size in blocks)
    part = dataclasses.replace(basis, blocks=blocks)
    cls = torch.arange(k, device=lin.probes.device)
    plan = plan_memory(lin, k, max_memory)
    b, secs = timed_bias(lin, cls)
    info: dict[str, Any] = {}
    solve, _, _ = _clock(lambda: solve_basis(lin, cls, part, None, False, plan=plan, info=info, b=b,
                                             pass_seconds=secs), lin.probes.device)
    return None, None, {"chunk": info.get("chunk"), "units_done": done, "streamed": plan.stream,
                        "solve_seconds": solve}


def _loop(model, x, k: int, dtype, device):
    """The per-class loop a user writes: one forward with the graph kept, one
    ``torch.autograd.grad`` of the class score per class."""
    return _loop_on(_float_copy(model, dtype, device), x, k, dtype, device)


def _loop_on(m, x, k: int, dtype, device):
    """:func:`_loop` on a model already in ``dtype`` on ``device``."""
    import torch

    xg = x.to(device=device, dtype=dtype).clone().requires_grad_(True)
    out = m(xg)
    n = xg.shape[0]
    w = torch.empty(n, k, xg[0].numel(), dtype=dtype, device=device)
    for c in range(k):
        (g,) = torch.autograd.grad(out[:, c].sum(), xg, retain_graph=c < k - 1)
        w[:, c] = g.reshape(n, -1)
    b = out.detach()[:, :k] - torch.einsum("nkd,nd->nk", w, xg.detach().reshape(n, -1))
    return w, b, {}


def _loop_per_probe(model, x, k: int, dtype, device):
    """The same loop, one probe at a time (no batching across probes)."""
    import torch

    m = _float_copy(model, dtype, device)  # one copy, as a user's loop would have
    parts = [_loop_on(m, x[i:i + 1], k, dtype, device) for i in range(x.shape[0])]
    return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts]), {}


def _jac_alt(model, x, k: int, dtype, device, how: str):
    """torch.func.jacrev (optionally chunked) or torch.autograd.functional.jacobian(vectorize=True)."""
    import torch

    m = _float_copy(model, dtype, device)
    xs = x.to(device=device, dtype=dtype)

    def f(x1):
        return m(x1.unsqueeze(0))[0, :k]

    ws = []
    for x1 in xs:
        if how == "jacobian-vec":
            j = torch.autograd.functional.jacobian(f, x1, vectorize=True)
        else:
            chunk = None if how == "jacrev" else int(how.split("-c")[1])
            j = torch.func.jacrev(f, chunk_size=chunk)(x1)
        ws.append(j.reshape(k, -1).detach())
    w = torch.stack(ws)
    with torch.no_grad():
        out = m(xs)[:, :k]
    return w, out - torch.einsum("nkd,nd->nk", w, xs.reshape(len(xs), -1)), {}


def _call(method: str, model, x, units: int, spec: dict):
    import torch

    dtype, device = getattr(torch, spec["dtype"]), torch.device(spec["device"])
    x = x.to(device)
    model = model.to(device)
    partial_cols = spec.get("partial_basis")
    if partial_cols:
        return _rv_partial_basis(model, x, units, method.split("-")[1], dtype, spec.get("max_memory"), spec["k"])
    if method in RV_METHODS:
        return _rv_reconstruct(model, x, units, method, dtype, spec.get("max_memory"))
    if method == "loop":
        return _loop(model, x, units, dtype, device)
    if method == "loop-per-probe":
        return _loop_per_probe(model, x[:units], spec["k"], dtype, device)
    return _jac_alt(model, x, units, dtype, device, method)


# --------------------------------------------------------------------------
# Child process: limits, measurement, result
# --------------------------------------------------------------------------


def _vm_size() -> int:
    with open("/proc/self/status") as f:
        return int(re.search(r"VmSize:\s+(\d+)", f.read()).group(1)) * 1024


def _rss_peak() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _cap_memory(cap: int) -> None:
    """Cap the address space at what is mapped now plus ``cap`` bytes."""
    limit = _vm_size() + cap
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))


def _fingerprint(w, b) -> list[float]:
    """(W r + b) for a fixed random r: K numbers per probe that any two exact solves share."""
    import torch

    g = torch.Generator().manual_seed(123)
    r = torch.randn(w.shape[-1], generator=g, dtype=torch.float64)
    fp = torch.einsum("nkd,d->nk", w.to("cpu", torch.float64), r) + b.to("cpu", torch.float64)
    return fp[:4].reshape(-1).tolist()


def _is_oom(e: BaseException) -> bool:
    msg = str(e)
    return isinstance(e, MemoryError) or any(s in msg for s in ("can't allocate memory", "out of memory", "bad_alloc"))


_CLOCK: dict[str, Any] = {"name": "wall", "fn": time.perf_counter}
_WALL: list[float] = []  # wall seconds of every timed call, beside the clock's


def _use_clock(spec: dict) -> None:
    """CPU time of this process when it runs one thread on the CPU: on a shared machine
    it is what the work costs, unlike wall time, which adds the time other processes
    held the cores. Otherwise (several threads, a GPU) wall time."""
    if spec.get("threads") == 1 and spec["device"] == "cpu":
        _CLOCK.update(name="cpu", fn=time.process_time)


def _clock(fn: Callable[[], Any], device: Any) -> tuple[float, float, Any]:
    """(seconds on the run's clock, wall seconds, fn()), the device synchronised around fn."""
    import torch

    from reconviz.solve.chunking import _sync

    device = torch.device(device)
    _sync(device)
    w0, t0 = time.perf_counter(), _CLOCK["fn"]()
    out = fn()
    _sync(device)
    return _CLOCK["fn"]() - t0, time.perf_counter() - w0, out


_CHECKS: list[float] = []  # seconds (the run's clock) of every self-check pass of rv.reconstruct

SELF_CHECK_STEPS = ("timed_pass", "self_checks")  # reconviz.pipeline's names: g at the affinity point
# (run before the solve, and timed for it), then the comparisons and the region check's pass of f


def _time_self_checks() -> bool:
    """Wrap :data:`SELF_CHECK_STEPS` in ``reconviz.pipeline`` (``rv.reconstruct`` calls each
    once per solve) so that each call's seconds on the run's clock land in ``_CHECKS``. The
    timed region of a row is still the whole ``rv.reconstruct`` call: this only splits it."""
    from reconviz import pipeline

    return all(_wrap_timed(pipeline, name) for name in SELF_CHECK_STEPS)


def _wrap_timed(module: Any, name: str) -> bool:
    """Replace ``module.name`` (a function whose first argument is the linearized model) by a
    timed wrapper appending to ``_CHECKS``; False when the name is missing."""
    from reconviz.solve.chunking import _sync

    orig = getattr(module, name, None)
    if orig is None:
        return False
    if getattr(orig, "_bench_timed", False):
        return True

    def timed(lin, *args, **kwargs):
        device = lin.probes.device
        _sync(device)
        t0 = _CLOCK["fn"]()
        try:
            return orig(lin, *args, **kwargs)
        finally:
            _sync(device)
            _CHECKS.append(_CLOCK["fn"]() - t0)

    timed._bench_timed = True  # type: ignore[attr-defined]
    setattr(module, name, timed)
    return True


def _checks_since(start: int) -> float | None:
    return sum(_CHECKS[start:]) if len(_CHECKS) > start else None


def _timed(fn: Callable[[], Any], device: str) -> tuple[float, Any]:
    """(seconds on the run's clock, fn()); the wall seconds go to _WALL."""
    seconds, wall, out = _clock(fn, device)
    _WALL.append(wall)
    return seconds, out


def child(spec: dict) -> dict:
    """Run one (case, method) as ``spec`` says; the result goes to stdout as JSON."""
    import torch

    if spec.get("threads"):
        torch.set_num_threads(spec["threads"])
    _cap_memory(int(spec["mem_cap"]))
    _use_clock(spec)
    task = spec["method"]
    if task == "matmul":
        return _matmul_rate(spec)
    case = CASES[spec["case"]]
    model, x = case.build()
    if task == "count":
        return _count(model, x, spec)
    if task in RV_METHODS:
        _time_self_checks()
    base = _rss_peak()
    res: dict[str, Any] = {"base_rss": base}
    try:
        start = len(_WALL)
        res.update(_partial_runs(task, model, x, spec) if spec.get("units") else _full_runs(task, model, x, spec))
        res["wall"] = _WALL[start:]
        if spec.get("forward_rate") and res.get("info", {}).get("chunk"):
            res["forward"] = _forward_rate(model, x, spec, int(res["info"]["chunk"]))
    except Exception as e:  # noqa: BLE001 - every failure is a row in the table
        if not _is_oom(e):
            raise
        res.update(status="oom", message=f"OOM at {spec['mem_cap'] / GB:.0f} GB cap")
    res.update(peak_rss=_rss_peak(), clock=_CLOCK["name"])
    if spec["device"].startswith("cuda"):
        res["gpu_peak"] = torch.cuda.max_memory_allocated()
    if spec.get("paired") and res.get("status") == "ok":  # after the row's own peaks were read
        try:
            res["paired"] = _paired(model, x, spec)
        except Exception as e:  # noqa: BLE001 - the row stands without its paired ratio
            if not _is_oom(e):
                raise
    return res


def _full_runs(task: str, model, x, spec: dict) -> dict:
    times, checks, out = [], [], None
    for i in range(spec["repeats"] + 1):
        start = len(_CHECKS)
        t, out = _timed(lambda: _call(task, model, x, spec["k"], spec), spec["device"])
        times.append(t)
        checks.append(_checks_since(start))
        if sum(times) > spec["budget"] / 4:
            break
    if len(times) > 2:  # the first call was a warm-up: one-time costs (allocator, first use of kernels)
        times, checks = times[1:], checks[1:]
    w, b, info = out
    res = {"status": "ok", "times": times, "seconds": statistics.median(times), "info": info,
           "fingerprint": _fingerprint(w, b)}
    res.update(_checks_row(checks, times))
    return res


def _paired(model, x, spec: dict) -> dict:
    """auto and the loop timed in turns in this one process (after auto's own runs, which the
    row's time and peak memory are), which goes first alternating: medians and their ratio."""
    times: dict[str, list[float]] = {"auto": [], "loop": []}
    for turn in range(spec["repeats"] + 1):
        for method in (("auto", "loop") if turn % 2 == 0 else ("loop", "auto")):
            times[method].append(_clock(lambda: _call(method, model, x, spec["k"], spec), spec["device"])[0])
        if sum(map(sum, times.values())) > spec["budget"] / 2:
            break
    if len(times["auto"]) > 2:  # the first turn was a warm-up
        times = {k: v[1:] for k, v in times.items()}
    auto, loop = statistics.median(times["auto"]), statistics.median(times["loop"])
    return {"auto": auto, "loop": loop, "ratio": auto / loop, "turns": len(times["auto"])}


def _checks_row(checks: list[float | None], times: list[float]) -> dict:
    """The self-checks' seconds per timed call (median, and as a fraction of the call)."""
    if not checks or any(c is None for c in checks):
        return {}
    return {"checks": {"times": checks, "seconds": statistics.median(checks),
                       "fraction": statistics.median(c / t for c, t in zip(checks, times) if t > 0)}}


def _partial_runs(task: str, model, x, spec: dict) -> dict:
    """Time partial work of u1 and u2 units (the fastest of two runs each: others' load
    only adds time) and extrapolate to the full size."""
    u1, u2 = spec["units"]
    full = spec["full_units"]
    t1, info1, _ = _fastest(task, model, x, u1, spec)
    t2, info, c2 = _fastest(task, model, x, u2, spec)
    done1, done2 = info1.get("units_done", u1), info.get("units_done", u2)
    if "solve_seconds" in info:  # basis: fixed costs once, the sweep's measured rate for every column
        s2 = info["solve_seconds"]
        total = t2 - s2 + full * s2 / done2
    else:
        total = extrapolate((done1, t1), (done2, t2), full)
    res = {"status": "ok", "extrapolated": True, "times": [t1, t2], "units": [done1, done2], "full_units": full,
           "seconds": total, "done_fraction": done2 / full, "info": info}
    if c2 is not None:  # the checks' cost does not grow with the classes: the partial run's, against the total
        res["checks"] = {"times": [c2], "seconds": c2, "fraction": c2 / total}
    return res


def _fastest(task: str, model, x, units: int, spec: dict, runs: int = 2) -> tuple[float, dict, float | None]:
    """(seconds, info, self-check seconds) of the fastest of ``runs`` calls on ``units``."""
    best: tuple[float, dict, float | None] | None = None
    for _ in range(runs):
        start = len(_CHECKS)
        t, (_, _, info) = _timed(lambda: _call(task, model, x, units, spec), spec["device"])
        if best is None or t < best[0]:
            best = (t, info, _checks_since(start))
    return best


def extrapolate(p1: tuple[float, float], p2: tuple[float, float], full: float) -> float:
    """Linear extrapolation of time over units: t(full) = t2 + (full - u2) * slope,
    slope = (t2 - t1) / (u2 - u1) (at least t2 / u2 / 4: noise can not make work free)."""
    (u1, t1), (u2, t2) = p1, p2
    slope = (t2 - t1) / (u2 - u1) if u2 > u1 else t2 / u2
    return t2 + (full - u2) * max(slope, t2 / u2 / 4)


def _forward_rate(model, x, spec: dict, chunk: int) -> dict:
    """Samples per second of the original network's batched forward (no_grad), best
    of a few batch sizes up to the basis solve's chunk of columns x N probes."""
    import torch

    dtype, device = getattr(torch, spec["dtype"]), spec["device"]
    m = _float_copy(model, dtype, device)
    rates = {}
    for bs in sorted({1, 2, 4, 8, 16, chunk * x.shape[0]}):
        if bs > 256:
            continue
        xb = x[:1].to(device=device, dtype=dtype).expand(bs, *x.shape[1:]).contiguous()
        with torch.no_grad():
            m(xb)
            ts = [_timed(lambda: m(xb), device)[0] for _ in range(3)]
        rates[bs] = bs / statistics.median(ts)
    return {"rates": rates, "best": max(rates.values())}


def _count(model, x, spec: dict) -> dict:
    """FLOPs of one sample's forward pass and of one input-gradient backward pass."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    m = _float_copy(model, getattr(torch, spec["dtype"]), "cpu")
    for p in m.parameters():
        p.requires_grad_(False)
    x1 = x[:1].to(getattr(torch, spec["dtype"])).clone().requires_grad_(True)
    with FlopCounterMode(display=False) as fwd:
        out = m(x1)
    with FlopCounterMode(display=False) as bwd:
        torch.autograd.grad(out[0, 0], x1)
    import reconviz as rv

    act = rv.linearize(model, x[:1], dtype=getattr(torch, spec["dtype"])).activation_bytes
    xb = x[:1].to(getattr(torch, spec["dtype"])).expand(4, *x.shape[1:]).contiguous()
    with torch.no_grad():
        m(xb)
        per_sample = statistics.median(_timed(lambda: m(xb), "cpu")[0] for _ in range(3)) / 4
    return {"status": "ok", "activation_bytes": act, "forward_seconds": per_sample, "forward_flops": fwd.get_total_flops(), "backward_flops": bwd.get_total_flops(),
            "sample": list(x.shape[1:]), "probes": x.shape[0], "outputs": int(out.shape[1])}


def _matmul_rate(spec: dict, n: int = 2048) -> dict:
    """FLOP/s of an n x n x n matmul in the working dtype: the machine's practical peak."""
    import torch

    dtype = getattr(torch, spec["dtype"])
    a = torch.randn(n, n, dtype=dtype, device=spec["device"])
    bm = torch.randn(n, n, dtype=dtype, device=spec["device"])
    a @ bm
    ts = [_timed(lambda: a @ bm, spec["device"])[0] for _ in range(5)]
    return {"status": "ok", "flops_per_s": 2 * n**3 / statistics.median(ts), "n": n}


def _child_main(arg: str) -> None:
    spec = json.loads(arg)
    try:
        res = child(spec)
    except Exception as e:  # noqa: BLE001
        res = {"status": "oom" if _is_oom(e) else "error", "message": f"{type(e).__name__}: {str(e)[:300]}",
               "peak_rss": _rss_peak()}
    print(RESULT_TAG + json.dumps(res), flush=True)


# --------------------------------------------------------------------------
# Parent: plan each child, run it, collect
# --------------------------------------------------------------------------


@dataclass
class Options:
    quick: bool = False
    threads: int | None = None
    dtype: str = "float64"
    device: str = "cpu"
    mem_cap: int = 8 * GB
    timeout: float = 900.0
    repeats: int | None = None
    cases: tuple[str, ...] = ()
    trial_seconds: float = 6.0  # work per partial basis run (the second runs twice as much)


def run_child(spec: dict, opts: Options) -> dict:
    """One child process; its JSON result (or a failure row)."""
    spec = dict(spec, threads=opts.threads, dtype=opts.dtype, device=opts.device, mem_cap=opts.mem_cap)
    cmd = [sys.executable, str(RUN_SCRIPT), "--child", json.dumps(spec)]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=opts.timeout)
    except subprocess.TimeoutExpired:
        return {"status": "timeout", "message": f"over {opts.timeout:.0f} s"}
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith(RESULT_TAG):
            return json.loads(line[len(RESULT_TAG):])
    tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or [""]
    killed = proc.returncode < 0 or "MemoryError" in proc.stderr or "std::bad_alloc" in proc.stderr
    return {"status": "oom" if killed else "error", "message": f"exit {proc.returncode}: {tail[0][:200]}"}


def _predicted_alt_bytes(method: str, count: dict, k: int) -> int:
    """Rough working set of torch.func.jacrev / functional.jacobian: every class of a
    chunk carries a set of activation gradients (x3 for vmap's intermediates), plus J twice."""
    d = math.prod(count["sample"])
    item = 8 if count.get("dtype", "float64") == "float64" else 4
    chunk = min(k, int(method.split("-c")[1])) if "-c" in method else k
    return int(chunk * 3 * count["activation_bytes"] + 2 * k * d * item * count["probes"])


def plan_spec(case: Case, method: str, count: dict, opts: Options, rate_guess: dict) -> dict | None:
    """The child spec for one method, or a 'skipped' row when its memory is predicted too large.

    ``rate_guess``: rough seconds per sample-forward (``fwd``) and per class-backward
    (``bwd``) from the count child, to decide whether to extrapolate."""
    k, d, n = case.classes, math.prod(count["sample"]), count["probes"]
    budget = case.budget * (QUICK_SCALE if opts.quick else 1.0)
    spec: dict[str, Any] = {"case": case.name, "method": method, "k": k, "budget": budget,
                            "repeats": opts.repeats or case.repeats}
    if method == "auto" and case.paired:
        spec["paired"] = True
    if method.startswith("basis"):
        predicted = n * d * rate_guess["fwd"]
        spec["forward_rate"] = True
        if predicted > case.budget:
            cols = max(64, int(opts.trial_seconds / max(rate_guess["fwd"] * n, 1e-9)))
            spec.update(partial_basis=True, units=[cols, 2 * cols], full_units=d)
        return spec
    if method in ALT_METHODS[1:]:
        need = _predicted_alt_bytes(method, count, k)
        if need > opts.mem_cap:
            return {"skip": f"skipped: predicted {need / GB:.0f} GB > {opts.mem_cap / GB:.0f} GB cap"}
    if method in case.full:
        return spec
    if method == "loop-per-probe":
        per = rate_guess["fwd"] + k * rate_guess["bwd"] + 2e-3 * (k + 3)
        units = max(8, min(n, int(budget / 3 / per)))
        if units < n:
            spec.update(units=[units, 2 * units], full_units=n)
        return spec
    slow = 3.0 if method.startswith("jac") else 1.0  # vmap over a conv backward is several times slower
    predicted = n * (rate_guess["fwd"] + k * rate_guess["bwd"] * slow)
    if predicted > budget and k >= 40:
        units = max(10, int(k * budget / predicted / 3))
        units -= units % 10
        spec.update(units=[units, 2 * units], full_units=k)
    return spec


def _rate_guess(count: dict) -> dict:
    """Seconds per sample-forward (measured) and per class-backward (scaled by FLOPs)."""
    fwd = count["forward_seconds"]
    return {"fwd": fwd, "bwd": fwd * count["backward_flops"] / max(1, count["forward_flops"])}


def run_case(case: Case, opts: Options, log: Callable[[str], None] = print) -> list[dict]:
    """Every method of ``case`` in its own child: a list of result rows."""
    count = run_child({"case": case.name, "method": "count"}, opts)
    if count.get("status") != "ok":
        return [dict(count, case=case.name, method="(build)")]
    count["dtype"] = opts.dtype
    guess = _rate_guess(count)
    methods = QUICK_METHODS.get(case.name, case.methods) if opts.quick else case.methods
    rows = []
    for method in methods:
        spec = plan_spec(case, method, count, opts, guess)
        res = {"status": "skipped", "message": spec["skip"]} if "skip" in spec else run_child(spec, opts)
        row = dict(res, case=case.name, method=method, count=count, k=case.classes)
        rows.append(row)
        log(_row_line(row))
    return rows


# --------------------------------------------------------------------------
# Derived figures: ratios, FLOP rates, throughput, agreement
# --------------------------------------------------------------------------


def solve_flops(row: dict) -> float:
    """FLOPs of the minimal work of a row's solve (see the module docstring)."""
    c = row["count"]
    n, d, k = c["probes"], math.prod(c["sample"]), row["k"]
    if row.get("info", {}).get("chosen", row["method"]).startswith("basis"):
        return n * d * c["forward_flops"]
    return n * (c["forward_flops"] + k * c["backward_flops"])


def weight_bytes(row: dict) -> int:
    c = row["count"]
    return c["probes"] * row["k"] * math.prod(c["sample"]) * (8 if row.get("dtype", "float64") == "float64" else 4)


def peak_bytes(row: dict) -> int | None:
    """Peak RSS; for an extrapolated row, plus the part of W its partial run did not write."""
    peak = row.get("peak_rss")
    if peak is None or not row.get("extrapolated") or row["method"] not in RV_METHODS:
        return peak  # the alternatives: the peak of the partial run (see the note on the row)
    return int(peak + weight_bytes(row) * (1 - row.get("done_fraction", 1.0)))


def linear_rate(row: dict) -> float | None:
    """Samples per second the basis solve ran the linearized network at."""
    n = row["count"]["probes"]
    if row.get("info", {}).get("solve_seconds"):
        return n * row["units"][1] / row["info"]["solve_seconds"]
    solve = row.get("info", {}).get("timings", {}).get("solve")
    return n * math.prod(row["count"]["sample"]) / solve if solve else None


def _ok(row: dict) -> bool:
    return row.get("status") == "ok" and row.get("seconds") is not None


def _by_method(rows: list[dict], case: str) -> dict[str, dict]:
    return {r["method"]: r for r in rows if r["case"] == case}


def agreement(rows: list[dict]) -> None:
    """Each row's fingerprint (W r + b) against the case's loop row: max relative difference. On a
    gated case the value rule's rows are compared with its adjoint row (their W is not the loop's
    Jacobian), the tangent rule's with the loop."""
    for case in {r["case"] for r in rows}:
        found = [r for r in rows if r["case"] == case and r.get("fingerprint")]
        loop = next((r for r in found if r["method"] == "loop"), found[0] if found else None)
        value = next((r for r in found if r["method"] == "adjoint"), loop)
        gated = CASES[case].gated if case in CASES else False
        for r in found:
            ref = value if gated and r["method"] not in ("loop", "tangent") else loop
            r["agree"] = max(abs(a - b) / max(1.0, abs(b)) for a, b in zip(r["fingerprint"], ref["fingerprint"]))


def _fmt_s(s: float | None) -> str:
    if s is None:
        return "-"
    return f"{s * 1e3:.1f} ms" if s < 1 else f"{s:.2f} s" if s < 100 else f"{s / 60:.1f} min"


def _notes(row: dict) -> str:
    info = row.get("info", {})
    notes = []
    if row.get("extrapolated"):
        u1, u2 = row["units"]
        notes.append(f"extrapolated from {u1} and {u2} of {row['full_units']}")
        if row["method"] not in RV_METHODS:
            notes.append(f"peak measured at {u2}")
    if row.get("gpu_peak"):
        notes.append(f"GPU peak {_gb(row['gpu_peak'])}")
    if row["method"] == "auto" and info.get("chosen"):
        notes.append(f"chose {info['chosen']}")
    if info.get("chunk") is not None:
        notes.append(f"chunk {info['chunk']}")
    if info.get("streamed"):
        notes.append("W streamed")
    if row.get("forward"):
        lr = linear_rate(row)
        if lr:
            notes.append(f"g at {lr / row['forward']['best']:.0%} of f's batched forward rate")
    if row.get("agree") is not None:
        notes.append(f"agree {row['agree']:.0e}")
    if row.get("status") != "ok":
        notes.append(row.get("message", row.get("status", "")))
    return "; ".join(notes)


def _fmt_checks(row: dict) -> str:
    """The self-checks' median seconds and their share of the row's timed call."""
    c = row.get("checks")
    if not c or not _ok(row):
        return "-"
    frac = c["fraction"]
    return f"{_fmt_s(c['seconds'])} ({frac:.0%})" if frac >= 0.095 else f"{_fmt_s(c['seconds'])} ({frac:.1%})"


def _row_line(row: dict) -> str:
    checks = f"  self-checks {_fmt_checks(row)}" if row.get("checks") else ""
    return f"  {row['case']:<12} {row['method']:<16} {row.get('status', ''):<8} {_fmt_s(row.get('seconds')):>10}  " \
           f"peak {_gb(peak_bytes(row))}{checks}  {_notes(row)}"


def _gb(b: int | None) -> str:
    if b is None:
        return "-"
    return f"{b / GB:.2f} GB" if b >= 0.1 * GB else f"{b / 2**20:.1f} MB" if b >= 2**20 else f"{b / 2**10:.0f} KB"


def format_table(rows: list[dict], matmul: dict) -> str:
    """The markdown table of every row: time, ratio to the loop, the self-checks' share of
    the time (reconviz rows), FLOP rate, peak RSS, W."""
    peak = matmul.get("flops_per_s")
    head = ("| case | method | time (median) | x loop | self-checks (% of time) | GFLOP/s (% of matmul) "
            "| peak RSS | W | notes |\n"
            "|---|---|---:|---:|---:|---:|---:|---:|---|\n")
    lines = []
    for r in rows:
        if "count" not in r:
            lines.append(f"| {r['case']} | {r['method']} | - | - | - | - | - | - | {r.get('message', '')} |")
            continue
        loop = _by_method(rows, r["case"]).get("loop")
        ratio = f"{r['seconds'] / loop['seconds']:.2f}" if _ok(r) and loop and _ok(loop) else "-"
        rate = "-"
        if _ok(r):
            fl = solve_flops(r) / r["seconds"]
            rate = f"{fl / 1e9:.1f} ({fl / peak:.0%})" if peak else f"{fl / 1e9:.1f}"
        if _ok(r) and r["case"] == "digits-all":
            rate += f"; {r['count']['probes'] / r['seconds']:.0f} probes/s"
        lines.append(f"| {r['case']} | {r['method']} | {_fmt_s(r.get('seconds'))} | {ratio} | {_fmt_checks(r)} | "
                     f"{rate} | "
                     f"{_gb(peak_bytes(r))} | {_gb(weight_bytes(r))} | {_notes(r)} |")
    return head + "\n".join(lines) + "\n"


def _with_checks(row: dict, loop: dict) -> str:
    """How much of a ratio to the loop the self-checks are (they are inside the timed call)."""
    c = row.get("checks")
    if not c:
        return ""
    return (f", self-checks included: {_fmt_checks(row)} of the call; "
            f"{(row['seconds'] - c['seconds']) / loop['seconds']:.2f} without them")


def targets(rows: list[dict]) -> list[str]:
    """The issue's targets, checked case by case: one markdown bullet each."""
    out = []
    for case in dict.fromkeys(r["case"] for r in rows):
        m = _by_method(rows, case)
        rv_rows = {k: v for k, v in m.items() if k in RV_METHODS and k not in ("auto", "tangent") and _ok(v)}
        auto, loop = m.get("auto"), m.get("loop")
        parts = []
        solo = m.get("adjoint")
        if not auto and solo and _ok(solo) and loop and _ok(loop):
            ratio = solo["seconds"] / loop["seconds"]
            parts.append(f"adjoint / loop = {ratio:.2f} ({'PASS' if ratio <= 1.25 else 'FAIL'} <= 1.25"
                         f"{_with_checks(solo, loop)})")
        if auto and _ok(auto) and rv_rows:
            best = min(rv_rows.values(), key=lambda r: r["seconds"])
            chosen = auto["info"].get("chosen")
            picked = rv_rows.get(chosen) or rv_rows.get("basis-identity" if chosen == "basis" else "adjoint")
            ok = picked is not None and picked["seconds"] <= 1.1 * best["seconds"]
            parts.append(f"auto chose {chosen} ({_fmt_s(picked['seconds']) if picked else '?'}; fastest "
                         f"{best['method']} {_fmt_s(best['seconds'])}): {'PASS' if ok else 'FAIL'}")
            paired = auto.get("paired")
            if paired:  # the same ratio with both timed in turns in one process: the verdict's
                ratio = paired["ratio"]
                parts.append(f"auto / loop timed in turns in one process = {ratio:.2f} "
                             f"({_fmt_s(paired['auto'])} / {_fmt_s(paired['loop'])}, {paired['turns']} turns; "
                             f"{'PASS' if ratio <= 1.25 else 'FAIL'} <= 1.25)")
            if loop and _ok(loop):
                ratio = auto["seconds"] / loop["seconds"]
                verdict = "the rows, from separate processes" if paired else \
                    f"{'PASS' if ratio <= 1.25 else 'FAIL'} <= 1.25"
                parts.append(f"auto / loop = {ratio:.2f} ({verdict}{_with_checks(auto, loop)})")
        tangent = m.get("tangent")
        if tangent and _ok(tangent) and loop and _ok(loop):
            parts.append(f"tangent / loop = {tangent['seconds'] / loop['seconds']:.2f}")
        mem = [(k, peak_bytes(v), weight_bytes(v)) for k, v in m.items() if k in RV_METHODS and _ok(v)]
        bad = [k for k, p, w in mem if p is not None and p > w + 1.5 * GB]
        if mem:
            parts.append("peak <= W + 1.5 GB: " + ("PASS" if not bad else f"FAIL ({', '.join(bad)})"))
        fw = [(k, linear_rate(v) / v["forward"]["best"]) for k, v in m.items()
              if _ok(v) and v.get("forward") and linear_rate(v)]
        if fw:
            worst = min(fw, key=lambda t: t[1])
            parts.append(f"basis throughput >= 80% of f: worst {worst[0]} {worst[1]:.0%} "
                         f"({'PASS' if worst[1] >= 0.8 else 'FAIL'})")
        if parts:
            out.append(f"- **{case}**: " + "; ".join(parts))
    return out


# --------------------------------------------------------------------------
# Machine, report, entry point
# --------------------------------------------------------------------------


def machine(opts: Options) -> dict:
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = re.search(r"model name\s*:\s*(.*)", f.read()).group(1)
    except (OSError, AttributeError):
        pass
    try:
        with open("/proc/meminfo") as f:
            ram = int(re.search(r"MemTotal:\s+(\d+)", f.read()).group(1)) * 1024
    except (OSError, AttributeError):
        ram = 0
    return {"cpu": cpu, "cores": os.cpu_count(), "ram_gb": round(ram / GB, 1), "python": platform.python_version(),
            "torch": torch.__version__, "threads": opts.threads or torch.get_num_threads(), "dtype": opts.dtype,
            "device": opts.device, "load_start": os.getloadavg(), "date": time.strftime("%Y-%m-%d %H:%M %Z")}


def report(table: str, bullets: list[str], matmul: dict, info: dict) -> str:
    """The markdown block that goes between the markers of docs/performance.md."""
    la, lb = info["load_start"], info.get("load_end")
    lines = [
        DOC_START,
        f"Run: `{info.get('command', PROG)}` on {info['date']}, "
        f"{info['wall_s'] / 60:.1f} min.",
        "",
        f"Machine: {info['cpu']}, {info['cores']} cores, {info['ram_gb']} GB RAM; Python {info['python']}, "
        f"torch {info['torch']}, {info['threads']} thread(s), {info['dtype']}, device {info['device']}. "
        f"Load average at start {la[0]:.2f} / {la[1]:.2f} / {la[2]:.2f} (1/5/15 min)"
        + (f", at end {lb[0]:.2f} / {lb[1]:.2f} / {lb[2]:.2f}" if lb else ""),
        "",
        *_update_note(info),
        f"Matmul reference ({matmul.get('n', '?')}^3, {info['dtype']}): "
        f"{matmul.get('flops_per_s', float('nan')) / 1e9:.1f} GFLOP/s.",
        "",
        table,
        "Targets, as measured in this run:",
        "",
        *bullets,
        DOC_END,
    ]
    return "\n".join(lines) + "\n"


def _update_note(info: dict) -> list[str]:
    if "updated" not in info:
        return []
    was = info["updated"]["from"]
    la = was["load_start"]
    return [f"Cases {', '.join(info['updated']['cases'])} were run again (the latest as above); every other row comes "
            f"from the run of {was['date']} ({was['wall_s'] / 60:.1f} min, load average at start "
            f"{la[0]:.2f} / {la[1]:.2f} / {la[2]:.2f}) on the same machine and settings.", ""]


def atomic_write_text(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file beside it: a reader never sees half a file."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        tmp.write_text(text)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_doc(path: Path, block: str) -> None:
    """Replace the marked block of ``path`` (or create the file around it)."""
    text = path.read_text() if path.exists() else "# Performance\n\n" + DOC_START + "\n" + DOC_END + "\n"
    if DOC_START in text and DOC_END in text:
        head, rest = text.split(DOC_START, 1)
        text = head + block + rest.split(DOC_END, 1)[1].lstrip("\n")
    else:
        text = text.rstrip("\n") + "\n\n" + block
    atomic_write_text(path, text)


def parse(argv: list[str] | None) -> tuple[Options, argparse.Namespace]:
    ap = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="digits + a small VGG (~1-2 min)")
    ap.add_argument("--cases", nargs="*", default=None, choices=list(CASES), help="run only these cases")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads in each child (default 1: stable timings on a shared machine; "
                         "0: torch's default)")
    ap.add_argument("--dtype", default="float64", choices=["float64", "float32"])
    ap.add_argument("--device", default="cpu", help="cpu or cuda (GPU figures: run where one exists)")
    ap.add_argument("--mem-cap-gb", type=float, default=8.0, help="address-space cap of each child")
    ap.add_argument("--repeats", type=int, default=None, help="repeats per method (default: per case)")
    ap.add_argument("--doc", default=None, help="markdown file to write (default: docs/performance.md in a "
                                                "checkout; 'none' to skip)")
    ap.add_argument("--json", default=None, help="also write the raw rows as JSON here")
    ap.add_argument("--update", default=None, metavar="JSON",
                    help="start from an earlier run's --json rows: only --cases run again (and replace theirs)")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    cases = tuple(a.cases) if a.cases is not None else (QUICK if a.quick else tuple(CASES))
    return Options(a.quick, a.threads or None, a.dtype, a.device, int(a.mem_cap_gb * GB), repeats=a.repeats,
                   cases=cases, trial_seconds=6.0 * (QUICK_SCALE if a.quick else 1.0)), a


def _default_doc() -> Path | None:
    root = Path(__file__).resolve().parents[1]
    return root / "docs" / "performance.md" if (root / "docs").is_dir() else None


def main(argv: list[str] | None = None) -> list[dict]:
    opts, a = parse(argv)
    if a.child is not None:
        _child_main(a.child)
        return []
    t0 = time.perf_counter()
    info = machine(opts)
    info["command"] = " ".join([PROG, *(sys.argv[1:] if argv is None else argv)])
    print(f"reconviz bench: {info['cpu']}, {info['cores']} cores, {info['ram_gb']} GB, threads {info['threads']}, "
          f"load {info['load_start'][0]:.2f}", flush=True)
    rows, matmul = [], None
    if a.update:  # an earlier run's rows; the cases named here are run again and replace theirs
        saved = json.loads(Path(a.update).read_text())
        rows, matmul = [r for r in saved["rows"] if r["case"] not in opts.cases], saved["matmul"]
        if opts.cases:  # the cases of earlier updates stay listed: their rows are not the first run's
            earlier = saved["machine"].get("updated", {})
            info["updated"] = {"from": earlier.get("from", saved["machine"]),
                               "cases": list(dict.fromkeys([*earlier.get("cases", []), *opts.cases]))}
        else:  # nothing to run: render the saved run again (e.g. after a change to the report)
            info = saved["machine"]
    if matmul is None:
        matmul = run_child({"case": None, "method": "matmul"}, opts)
        print(f"  matmul: {matmul.get('flops_per_s', float('nan')) / 1e9:.1f} GFLOP/s", flush=True)
    for name in opts.cases:
        rows += [dict(r, dtype=opts.dtype) for r in
                 run_case(CASES[name], opts, log=lambda s: print(s, flush=True))]
    rows.sort(key=lambda r: list(CASES).index(r["case"]))  # stable: methods keep their order
    agreement(rows)
    if opts.cases:
        info.update(load_end=os.getloadavg(), wall_s=time.perf_counter() - t0)
    table, bullets = format_table(rows, matmul), targets(rows)
    print(table)
    print("\n".join(bullets))
    block = report(table, bullets, matmul, info)
    doc = _default_doc() if a.doc is None else (None if a.doc == "none" else Path(a.doc))
    if doc is not None:
        write_doc(doc, block)
        print(f"wrote {doc}")
    if a.json:
        raw = json.dumps({"machine": info, "matmul": matmul, "rows": rows}, indent=1, default=str)
        atomic_write_text(Path(a.json), raw)
    return rows


if __name__ == "__main__":
    main()
