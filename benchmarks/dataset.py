"""Benchmark of ``reconviz.reconstruct_dataset``: probes/s against hand-written loops, and 1 vs 2 processes.

    python benchmarks/dataset.py            # digits + VGG 64x64, ~5 min on 2 cores; rewrites its block of
                                            # docs/performance.md (between the dataset-bench markers)
    python benchmarks/dataset.py --quick    # digits + VGG 32x32, ~1 min, prints the table only

Methods, per case (every one computes each probe's W row of its own label, in float64):

* ``reconstruct_dataset``: ``rv.reconstruct_dataset(model, (x, y), by="label")``, the whole call
  (model copy, probe pass, ONE backward pass per batch, the per-probe check at a second point
  - one more forward pass of the linearized model -, the Chan-merged accumulators);
* ``rv without check``: the same probe pass and backward pass per batch alone (what the check costs);
* ``batched loop``: the best hand-written loop: a float64 copy of the model, per batch one forward
  with ``requires_grad`` on x and one ``torch.autograd.grad`` of sum_i f_i[y_i];
* ``per-probe loop``: the same, one probe at a time.

Timings: medians of repeats, run round-robin over the methods, of the CPU time of this process
(one torch thread: CPU time is the work, which the load of other processes inflates far less than
wall time). Scaling: the same
``reconstruct_dataset`` call in 1 process and in 2 gloo processes (one thread each; wall time of
the call, the slower rank's, start-up and a warm-up call excluded); efficiency = T1 / (2 T2).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))  # reconviz from this checkout
sys.path.insert(0, str(HERE))  # bench.py (the VGG builder, the machine line)

DOC = HERE.parent / "docs" / "performance.md"
START, END = "<!-- dataset-bench:start -->", "<!-- dataset-bench:end -->"
RESULT_TAG = "RECONVIZ-DATASET-RANK "
PROG = "python benchmarks/dataset.py"


# -- cases -------------------------------------------------------------------------


def case(name: str) -> tuple[Any, Any, Any, int, str]:
    """(model, x, y, batch size, description), built deterministically (also in the rank children)."""
    import numpy as np
    import torch

    if name.startswith("digits"):
        from reconviz.models import digits

        model, data = digits()
        if name == "digits-all":
            x, y = np.concatenate([data.x_test, data.x_train]), np.concatenate([data.y_test, data.y_train])
        else:
            x, y = data.x_test, data.y_test
        return model, torch.as_tensor(x), torch.as_tensor(y), 256, f"digits CNN 1x8x8, {len(y)} digits, 10 classes"
    from bench import vgg

    size, n = {"vgg64": (64, 64), "vgg32": (32, 64)}[name]
    g = torch.Generator().manual_seed(1)
    x = torch.randn(n, 3, size, size, generator=g)
    y = torch.randint(0, 100, (n,), generator=g)
    return vgg(size, 100), x, y, 16, f"VGG-style 3x{size}x{size}, {n} probes, 100 classes"


# -- methods -----------------------------------------------------------------------


def rv_dataset(model, x, y, batch: int):
    import reconviz as rv

    return rv.reconstruct_dataset(model, (x, y), by="label", batch_size=batch, progress=False)


def rv_no_check(model, x, y, batch: int):
    """reconstruct_dataset's probe pass + one backward pass per batch, nothing else."""
    import torch

    from reconviz.dataset.rows import linearized
    from reconviz.probe import eval_copy

    work = eval_copy(model, torch.float64, torch.device("cpu"), track_paths=True)
    for s in range(0, x.shape[0], batch):
        xb, yb = x[s:s + batch].double(), y[s:s + batch]
        _, leaf, out = linearized(work, xb, None)
        torch.autograd.grad(out.gather(1, yb[:, None]).sum(), leaf)


def batched_loop(model, x, y, batch: int):
    import torch

    m = copy.deepcopy(model).eval().double()
    for p in m.parameters():
        p.requires_grad_(False)
    for s in range(0, x.shape[0], batch):
        xg = x[s:s + batch].double().requires_grad_(True)
        out = m(xg)
        torch.autograd.grad(out.gather(1, y[s:s + batch, None]).sum(), xg)


def per_probe_loop(model, x, y, batch: int):
    batched_loop(model, x, y, 1)


def forward_only(model, x, y, batch: int):
    """The cost unit F of the cost model: a float64 forward pass without autograd."""
    import torch

    m = copy.deepcopy(model).eval().double()
    with torch.no_grad():
        for s in range(0, x.shape[0], batch):
            m(x[s:s + batch].double())


def rv_all_10(model, x, y, batch: int):
    """by='all' over 10 classes: with by label, the per-class cost of the cost model."""
    import reconviz as rv

    return rv.reconstruct_dataset(model, x, by="all", classes=range(10), batch_size=batch, progress=False)


METHODS: dict[str, Callable] = {"reconstruct_dataset": rv_dataset, "rv without check": rv_no_check,
                                "batched loop": batched_loop, "per-probe loop": per_probe_loop,
                                "forward only (F)": forward_only, "by all, 10 classes": rv_all_10}


def _once(fn: Callable) -> tuple[float, float]:
    c, w = time.process_time(), time.perf_counter()
    fn()
    return time.process_time() - c, time.perf_counter() - w


def run_case(name: str, repeats: int, log: Callable[[str], None]) -> list[dict]:
    """Every method timed ``repeats`` times, round-robin (method after method in each round), so that
    a change of the machine's load falls on all of them alike; medians. On the VGG the per-probe
    loop and by='all' run in the first round only (each is minutes)."""
    model, x, y, batch, what = case(name)
    rv_dataset(model, x[:batch], y[:batch], batch)  # warm-up: imports, allocator
    times: dict[str, list[tuple[float, float]]] = {m: [] for m in METHODS}
    for round_ in range(repeats):
        for method, fn in METHODS.items():
            if round_ == 0 or not (method in ("per-probe loop", "by all, 10 classes") and name.startswith("vgg")):
                times[method].append(_once(lambda: fn(model, x, y, batch)))
    rows = []
    for method, ts in times.items():
        cpu, wall = statistics.median(t[0] for t in ts), statistics.median(t[1] for t in ts)
        rows.append({"case": name, "what": what, "method": method, "probes": int(x.shape[0]), "batch": batch,
                     "cpu": cpu, "wall": wall, "repeats": len(ts), "probes_per_s": x.shape[0] / cpu})
        log(f"  {name:12s} {method:20s} {cpu:8.3f} s cpu  {x.shape[0] / cpu:9.1f} probes/s")
    return rows


# -- scaling: 1 vs 2 processes -------------------------------------------------------


def rank_child(name: str) -> None:
    """One rank (or the single process): time the reconstruct_dataset call after a warm-up call (the
    first call of a fresh process pays one-time costs: lazy imports, first kernels) and a barrier."""
    import torch

    torch.set_num_threads(1)
    model, x, y, batch, _ = case(name)
    dist = None
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        import torch.distributed as dist

        dist.init_process_group("gloo")
    rv_dataset(model, x[: 2 * batch], y[: 2 * batch], batch)  # warm: one-time costs of a fresh process out
    if dist is not None:
        dist.barrier()
    c, w = time.process_time(), time.perf_counter()
    ts = rv_dataset(model, x, y, batch)
    cpu, wall = time.process_time() - c, time.perf_counter() - w
    print(RESULT_TAG + json.dumps({"cpu": cpu, "wall": wall, "exact": ts.exact}), flush=True)
    if dist is not None:
        dist.destroy_process_group()


def launch(name: str, procs: int) -> dict:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    children = []
    for rank in range(procs):
        env = dict(os.environ, OMP_NUM_THREADS="1")
        if procs > 1:
            env.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(procs))
        children.append(subprocess.Popen([sys.executable, __file__, "--rank-child", name], env=env,
                                         stdout=subprocess.PIPE, text=True))
    results = []
    for c in children:
        out, _ = c.communicate(timeout=1800)
        line = next(ln for ln in out.splitlines() if ln.startswith(RESULT_TAG))
        results.append(json.loads(line[len(RESULT_TAG):]))
    return {"wall": max(r["wall"] for r in results), "cpu": max(r["cpu"] for r in results)}


def scaling(name: str, repeats: int, log: Callable[[str], None]) -> dict:
    """Wall time (what a user waits for; on a machine shared with other work it counts their load too)
    and CPU time (the work: the slower rank's) of the call, 1 and 2 processes, medians."""
    ones = [launch(name, 1) for _ in range(repeats)]
    twos = [launch(name, 2) for _ in range(repeats)]
    _, x, *_ = case(name)
    row = {"case": name, "probes": int(x.shape[0])}
    for clock in ("wall", "cpu"):
        one = statistics.median(r[clock] for r in ones)
        two = statistics.median(r[clock] for r in twos)
        row[clock] = {"t1": one, "t2": two, "speedup": one / two, "efficiency": one / (2 * two)}
        log(f"  {name:12s} {clock}: 1 process {one:.2f} s, 2 processes {two:.2f} s: speed-up {one / two:.2f}, "
            f"efficiency {one / (2 * two):.0%}")
    return row


# -- the report --------------------------------------------------------------------


def cost_model(rows: list[dict]) -> list[str]:
    """Per probe, in units of F (one forward pass, float64, no autograd): by label = a + b, by all over
    K classes = a + K b, a and b from the by-label and the 10-class rows."""
    out = []
    for name in dict.fromkeys(r["case"] for r in rows):
        by = {r["method"]: r["cpu"] / r["probes"] for r in rows if r["case"] == name}
        f = by["forward only (F)"]
        label, all10 = by["reconstruct_dataset"] / f, by["by all, 10 classes"] / f
        per_class = (all10 - label) / 9
        out.append(f"- {name}: F = {f * 1e3:.2f} ms per probe; by label {label:.2f} F per probe, by all "
                   f"{label - per_class:.2f} F + K x {per_class:.2f} F (fitted on K = 1 and 10)")
    return out


def table(rows: list[dict]) -> list[str]:
    lines = ["| case | method | time (median, CPU) | probes/s | reconstruct_dataset x |",
             "|---|---|---:|---:|---:|"]
    for r in rows:
        ours = next(o for o in rows if o["case"] == r["case"] and o["method"] == "reconstruct_dataset")
        ratio = "1.00" if r is ours else f"{ours['probes_per_s'] / r['probes_per_s']:.2f}"
        if r["method"] in ("forward only (F)", "by all, 10 classes"):
            ratio = "-"
        lines.append(f"| {r['what']} | {r['method']} | {r['cpu']:.3f} s | {r['probes_per_s']:.1f} | {ratio} |")
    return lines


def targets(rows: list[dict]) -> list[str]:
    out = []
    for name in dict.fromkeys(r["case"] for r in rows):
        by = {r["method"]: r for r in rows if r["case"] == name}
        ours = by["reconstruct_dataset"]["probes_per_s"]
        vs_batch = ours / by["batched loop"]["probes_per_s"]
        vs_probe = ours / by["per-probe loop"]["probes_per_s"]
        nocheck = by["rv without check"]["probes_per_s"] / by["batched loop"]["probes_per_s"]
        check = 1 - by["rv without check"]["cpu"] / by["reconstruct_dataset"]["cpu"]
        out.append(f"- {name}: {vs_batch:.2f}x the batched loop (target >= 0.9: "
                   f"{'yes' if vs_batch >= 0.9 else '**no**'}), {vs_probe:.1f}x the per-probe loop (target >= 5: "
                   f"{'yes' if vs_probe >= 5 else '**no**'}); without the per-probe check {nocheck:.2f}x the batched "
                   f"loop (the check is {check:.0%} of the time)")
    return out


def scaling_lines(rows: list[dict]) -> list[str]:
    lines = ["| case | probes | clock | 1 process | 2 processes | speed-up | efficiency T1 / (2 T2) |",
             "|---|---:|---|---:|---:|---:|---:|"]
    for r in rows:
        for clock, what in (("wall", "wall"), ("cpu", "CPU (slower rank)")):
            c = r[clock]
            lines.append(f"| {r['case']} | {r['probes']} | {what} | {c['t1']:.2f} s | {c['t2']:.2f} s | "
                         f"{c['speedup']:.2f} | {c['efficiency']:.0%} |")
    return lines


def machine_line() -> str:
    import platform
    import re

    import torch

    cpu = platform.machine()
    try:
        cpu = re.search(r"model name\s*:\s*(.*)", Path("/proc/cpuinfo").read_text()).group(1)
    except (OSError, AttributeError):
        pass
    la = os.getloadavg()
    return (f"Machine: {cpu}, {os.cpu_count()} cores; Python {platform.python_version()}, torch {torch.__version__}, "
            f"1 thread per process, float64, device cpu. Load average at start {la[0]:.2f} / {la[1]:.2f} / "
            f"{la[2]:.2f} (1/5/15 min)")


def report(rows: list[dict], scale: list[dict], command: str, minutes: float, machine: str) -> str:
    la = os.getloadavg()
    lines = [START, f"Run: `{command}` on {time.strftime('%Y-%m-%d %H:%M %Z')}, {minutes:.1f} min.", "",
             machine + f", at end {la[0]:.2f} / {la[1]:.2f} / {la[2]:.2f}.", "", *table(rows), "",
             "Targets, as measured in this run:", "", *targets(rows), "",
             "Cost model (CPU time per probe, in units of F; docs/scaling.md extrapolates it):", "",
             *cost_model(rows), "",
             "1 vs 2 processes (gloo, one thread each; the call alone, after a warm-up call on two batches; medians):", "",
             *scaling_lines(scale), END]
    return "\n".join(lines) + "\n"


def write_doc(block: str) -> None:
    text = DOC.read_text()
    if START in text and END in text:
        head, rest = text.split(START, 1)
        text = head + block + rest.split(END, 1)[1].lstrip("\n")
    else:
        text = text.rstrip("\n") + "\n\n" + block
    tmp = DOC.with_name(f".{DOC.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    os.replace(tmp, DOC)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="digits + VGG 32x32, fewer repeats; no document")
    ap.add_argument("--repeats", type=int, default=None, help="repeats per timing (default 5, quick 2)")
    ap.add_argument("--no-doc", action="store_true", help="print the block, do not rewrite docs/performance.md")
    ap.add_argument("--json", default=None, metavar="FILE", help="also write the raw rows")
    ap.add_argument("--rank-child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.rank_child:
        rank_child(args.rank_child)
        return
    import torch

    torch.set_num_threads(1)
    start, machine = time.perf_counter(), machine_line()
    repeats = args.repeats or (2 if args.quick else 5)
    cases = ("digits", "vgg32") if args.quick else ("digits", "vgg64")
    print(machine)
    rows = [r for name in cases for r in run_case(name, repeats, print)]
    scale = [scaling(name, max(1, repeats // 2 + 1), print) for name in ("digits-all", cases[1])]
    command = PROG + (" " + " ".join(argv if argv is not None else sys.argv[1:])).rstrip()
    block = report(rows, scale, command.strip(), (time.perf_counter() - start) / 60, machine)
    print(block)
    if args.json:
        Path(args.json).write_text(json.dumps({"rows": rows, "scaling": scale}, indent=1))
    if not (args.quick or args.no_doc):
        write_doc(block)
        print(f"wrote the block into {DOC}")


if __name__ == "__main__":
    main()
