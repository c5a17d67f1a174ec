"""The package's import graph: acyclic, and the core never imports reconviz.onnx.

Every ``import`` / ``from ... import`` of a reconviz module anywhere in a module
counts (function-level ones too); only ``if TYPE_CHECKING:`` blocks are skipped.
A plugin looked up by name (``importlib.import_module`` with a computed name) is
not a static import and does not count: see docs/architecture.md.
"""

from __future__ import annotations

import ast
import copy
from pathlib import Path

import pytest
import torch
import torch.nn as nn

import reconviz
import reconviz as rv
from reconviz.errors import InputError

PACKAGE = "reconviz"
ROOT = Path(reconviz.__file__).resolve().parent

# the core pipeline: none of these may import reconviz.onnx (directly or through another module)
CORE = ("probe", "linearize", "solve", "pipeline", "reconstruction", "verify", "radius", "selfcheck")


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for p in sorted(ROOT.rglob("*.py"))}


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _nodes(tree: ast.AST):
    """Every node of ``tree`` except the bodies of ``if TYPE_CHECKING:`` (their ``else`` counts)."""
    stack = [tree]
    while stack:
        node = stack.pop()
        yield node
        if isinstance(node, ast.If) and _is_type_checking(node.test):
            stack.extend(node.orelse)
            stack.append(node.test)
            continue
        stack.extend(ast.iter_child_nodes(node))


def _owner(name: str, modules: dict[str, Path]) -> str | None:
    """The package module ``name`` refers to: itself, or the closest enclosing module."""
    while name:
        if name in modules:
            return name
        name = name.rpartition(".")[0]
    return None


def imports_of(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """The reconviz modules ``name`` (at ``path``) imports, relative imports resolved."""
    is_package = path.name == "__init__.py"
    tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
    found: set[str] = set()
    for node in _nodes(tree):
        targets: list[str] = []
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = name.split(".") if is_package else name.split(".")[:-1]
                base = base[: len(base) - (node.level - 1)]
                source = ".".join(base + ([node.module] if node.module else []))
            else:
                source = node.module or ""
            # ``from pkg import sub`` imports the submodule pkg.sub when there is one (pkg itself
            # only as sub's parent, which every import of a submodule does); other names come from pkg
            subs = [f"{source}.{a.name}" for a in node.names if f"{source}.{a.name}" in modules]
            targets = subs if len(subs) == len(node.names) else [source, *subs]
        for target in targets:
            if target == PACKAGE or target.startswith(PACKAGE + "."):
                owner = _owner(target, modules)
                if owner is not None and owner != name:
                    found.add(owner)
    return found


def import_graph() -> dict[str, set[str]]:
    modules = _modules()
    return {name: imports_of(name, path, modules) for name, path in modules.items()}


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One cycle through each strongly connected component of more than one module."""
    return [_cycle_through(c, graph) for c in strongly_connected(graph)]


def strongly_connected(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components (Tarjan) that contain a cycle, each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    on_stack: set[str] = set()
    stack: list[str] = []
    components: list[list[str]] = []

    def connect(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                connect(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1 or v in graph.get(v, ()):
                components.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            connect(v)
    return components


def _cycle_through(component: list[str], graph: dict[str, set[str]]) -> list[str]:
    """A shortest cycle from the first module of ``component`` back to itself (breadth first)."""
    start, members = component[0], set(component)
    paths = {start: [start]}
    queue = [start]
    while queue:
        v = queue.pop(0)
        for w in sorted(graph[v] & members):
            if w == start:
                return paths[v] + [start]
            if w not in paths:
                paths[w] = paths[v] + [w]
                queue.append(w)
    return component  # pragma: no cover - a component always has a cycle


def reaches(graph: dict[str, set[str]], start: str) -> dict[str, list[str]]:
    """Every module ``start`` imports, directly or not, with one import path to it."""
    paths = {start: [start]}
    queue = [start]
    while queue:
        v = queue.pop(0)
        for w in sorted(graph.get(v, ())):
            if w not in paths:
                paths[w] = paths[v] + [w]
                queue.append(w)
    return paths


def test_the_walk_sees_the_package():
    graph = import_graph()
    assert {"reconviz", "reconviz.pipeline", "reconviz.onnx", "reconviz.onnx.solve", "reconviz.ops.registry"} <= set(graph)
    # relative imports resolve, function-level ones count, TYPE_CHECKING blocks do not
    assert "reconviz.reconstruction" in graph["reconviz.pipeline"]
    assert "reconviz.ops.gates" in graph["reconviz.ops.registry"]  # ``from . import gates``
    assert "reconviz.onnx" in graph["reconviz.cli"]  # imported inside a function
    assert "reconviz.onnx.graph" not in graph["reconviz.onnx.gates"]  # under TYPE_CHECKING only


def test_find_cycles_finds_one():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert find_cycles(graph) == [["a", "b", "c", "a"]]
    assert find_cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_cycles():
    graph = import_graph()
    components = strongly_connected(graph)
    assert not components, "import cycles in reconviz:\n" + "\n".join(
        f"{' -> '.join(_cycle_through(c, graph))}  (modules in this cycle: {', '.join(c)})" for c in components)


@pytest.mark.parametrize("module", CORE)
def test_core_does_not_import_onnx(module):
    paths = reaches(import_graph(), f"{PACKAGE}.{module}")
    bad = sorted(m for m in paths if m == "reconviz.onnx" or m.startswith("reconviz.onnx."))
    assert not bad, f"reconviz.{module} imports the ONNX plugin: " + "; ".join(" -> ".join(paths[m]) for m in bad)


# --------------------------------------------------------------------------
# The verify backends: objects, and names resolved through a plugin registry
# --------------------------------------------------------------------------

def test_importing_reconviz_does_not_load_the_onnx_plugin_until_a_backend_asks():
    import subprocess
    import sys

    code = ("import sys, reconviz; V = sys.modules['reconviz.verify']\n"
            "assert 'reconviz.onnx' not in sys.modules, 'import reconviz loaded reconviz.onnx'\n"
            "b = V.resolve_backend('both')\n"
            "assert 'reconviz.onnx' in sys.modules and b.name == 'both', b\n")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=300)


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(1, 3, 3, padding=1)
        self.act = nn.ReLU()
        self.pool = nn.MaxPool2d(2)
        self.fc = nn.Linear(3 * 3 * 3, 5)

    def forward(self, x):
        z = self.pool(self.act(self.conv(x)))
        z = torch.relu(z)  # a functional call in the top module
        return self.fc(z.flatten(1))


@pytest.fixture(scope="module")
def case():
    model = Net().eval()
    x = torch.randn(2, 1, 6, 6, generator=torch.Generator().manual_seed(1))
    return model, x, rv.reconstruct(model, x)


def test_backend_objects_and_names_agree(case):
    import reconviz.onnx as rv_onnx
    from reconviz.verify import BACKENDS, VerifyBackend, register_backend

    model, x, rec = case
    by_name = rv.verify(model, rec, backend="onnxruntime", radius=False, jacobian=False)
    by_object = rv.verify(model, rec, backends=[rv_onnx.OnnxRuntime()], radius=False, jacobian=False)
    assert list(by_name.columns) == list(by_object.columns) and len(by_object.columns) == 4
    assert [(c.a, c.b) for c in by_name.comparisons] == [(c.a, c.b) for c in by_object.comparisons]
    assert by_object.ok and isinstance(rv_onnx.OnnxRuntime(), VerifyBackend)
    assert BACKENDS["both"] == rv_onnx.OnnxRuntime(against_torch=True)
    both = rv.verify(model, rec, backends=[rv_onnx.OnnxRuntime(against_torch=True)], radius=False, jacobian=False)
    assert len(both.comparisons) == 5

    for bad in ({"backends": ["onnxruntime"]}, {"backends": rv_onnx.OnnxRuntime()}, {"backend": "tensorflow"},
                {"backend": rv_onnx.OnnxRuntime()}):
        with pytest.raises(InputError):
            rv.verify(model, rec, radius=False, jacobian=False, **bad)
    with pytest.raises(InputError, match="name and an add_columns"):
        register_backend("nothing", object())


def test_a_custom_backend_adds_its_columns(case):
    from reconviz.verify import RECONSTRUCTED, compare

    class Doubled:
        name = "doubled"

        def add_columns(self, report, model, rec, x, *, tolerance, output):
            col = torch.from_numpy(report.columns[RECONSTRUCTED])
            report.columns["doubled"] = (2 * col).numpy()
            report.comparisons.append(compare("doubled", RECONSTRUCTED, 2 * col, col, 1e-9))

    model, x, rec = case
    report = rv.verify(model, rec, backends=[Doubled()], radius=False)
    assert "doubled" in report.columns and not report.comparisons[-1].ok and not report.ok


# --------------------------------------------------------------------------
# Typed facts of a Reconstruction, and the linearized model it keeps
# --------------------------------------------------------------------------

def test_frozen_summarises_the_priors_and_survives_save_load(case, tmp_path):
    from reconviz.reconstruction import FrozenOp

    model, x, rec = case
    assert rec.method in ("basis", "adjoint") and rec.method == rec.meta["method"]
    assert rec.exactness == "region-exact" and rec.tolerance == 1e-9 and len(rec.self_checks) == 2
    assert rec.frozen == [FrozenOp("relu", "act", "relu", 1), FrozenOp("max_pool2d", "pool", "max_pool", 1),
                          FrozenOp("relu", "", "relu", 1)]
    assert rec.meta["gates"] == {"relu": 2, "max_pool": 1}  # the untyped counts, unchanged
    loaded = rv.Reconstruction.load(rec.save(tmp_path / "r.npz"))
    assert loaded.frozen == rec.frozen and loaded.method == rec.method
    assert rv.Reconstruction(rec.weight, rec.bias, rec.classes, rec.logits, rec.probes).frozen is None


def test_frozen_counts_repeated_calls_of_one_module():
    shared = nn.ReLU()
    model = nn.Sequential(nn.Linear(4, 4), shared, nn.Linear(4, 4), shared, nn.Linear(4, 2)).eval()
    x = torch.randn(1, 4, generator=torch.Generator().manual_seed(0))
    frozen = rv.reconstruct(model, x).frozen
    assert [(f.op, f.location, f.gate, f.count) for f in frozen] == [("relu", "1", "relu", 2)]


@pytest.mark.parametrize("bad, fragment", [
    ("not a list", "'frozen' must be a list"),
    ([{"op": "relu", "location": "act", "gate": "relu"}], "count"),
    ([{"op": "relu", "location": 3, "gate": "relu", "count": 1}], "location"),
])
def test_load_refuses_a_malformed_frozen_record(case, tmp_path, bad, fragment):
    _, _, rec = case
    broken = rv.Reconstruction(rec.weight, rec.bias, rec.classes, rec.logits, rec.probes, dict(rec.meta, frozen=bad))
    path = broken.save(tmp_path / "bad.npz")
    with pytest.raises(InputError, match=fragment):
        rv.Reconstruction.load(path)
    with pytest.raises(InputError, match=fragment.split("'")[0] or "frozen"):
        _ = broken.frozen


def test_onnx_reconstruction_lists_its_frozen_nodes(tmp_path):
    import io

    import onnx

    model = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 3)).eval()
    buf = io.BytesIO()
    torch.onnx.export(model, (torch.zeros(1, 4),), buf, dynamo=False, input_names=["x"], output_names=["y"],
                      dynamic_axes={"x": {0: "batch"}, "y": {0: "batch"}})
    proto = onnx.load_from_string(buf.getvalue())
    relu = next(n.name for n in proto.graph.node if n.op_type == "Relu")
    rec = rv.onnx.reconstruct(proto, torch.randn(2, 4, generator=torch.Generator().manual_seed(0)))
    assert [(f.op, f.location, f.gate, f.count) for f in rec.frozen] == [("Relu", relu, "relu", 1)]
    assert rec.meta["gates"] == {"Relu": 1} and rec.method == "basis" and rec.linearized is None
    assert rv.Reconstruction.load(rec.save(tmp_path / "o.npz")).frozen == rec.frozen


def _count_probes(monkeypatch) -> list[int]:
    import sys

    probe_module, linearize_module = sys.modules["reconviz.probe"], sys.modules["reconviz.linearize"]
    calls: list[int] = []
    real = probe_module.probe

    def counted(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(probe_module, "probe", counted)
    monkeypatch.setattr(linearize_module, "probe", counted)  # the name linearize calls
    return calls


def test_verify_reuses_the_kept_linearized_model(case, tmp_path, monkeypatch):
    import dataclasses

    from reconviz.verify import kept_linearized

    model, x, rec = case
    assert rec.linearized is not None and kept_linearized(rec, model) is rec.linearized
    assert "linearized" not in repr(rec) and not rec.linearized.has_graph
    calls = _count_probes(monkeypatch)
    fresh = rv.verify(model, rec, radius=True)
    assert calls == [] and fresh.ok  # no second probe
    loaded = rv.Reconstruction.load(rec.save(tmp_path / "r.npz"))
    assert loaded.linearized is None and torch.equal(loaded.weight, rec.weight)
    reprobed = rv.verify(model, loaded, radius=True)
    assert calls == [1] and reprobed.ok  # probed as before
    assert torch.equal(fresh.radius.l2, reprobed.radius.l2) and torch.equal(fresh.radius.linf, reprobed.radius.linf)
    assert fresh.radius.ties == reprobed.radius.ties and fresh.radius.nearest == reprobed.radius.nearest
    assert torch.equal(rv.certified_radius(rec.linearized).l2, fresh.radius.l2)
    # a kept model of other probes, of another dtype, or of another model is not used
    moved = dataclasses.replace(rec, probes=rec.probes + 1)
    assert kept_linearized(moved, model) is None
    assert kept_linearized(rec, copy.deepcopy(model)) is None
    single = dataclasses.replace(rec, weight=rec.weight.float(), bias=rec.bias.float(), logits=rec.logits.float(),
                                 probes=rec.probes.float())
    assert kept_linearized(single, model) is None
