"""Shared test helpers: the exactness assertion and a model-untouched snapshot."""

from __future__ import annotations

import io
import os
import sys

import matplotlib
import pytest
import torch

matplotlib.use("Agg")
sys.path.insert(0, os.path.dirname(__file__))  # tests/archs.py importable as `archs`
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))

# generated-architecture counts reported at the end of the run (see test_property.py)
GENERATED: dict[str, int] = {}


def assert_exact(rec, model, x=None, rel=None):
    """|W x + b - f(x)| <= rel * max(1, |f(x)|) at x (default: the probes), in rec's dtype."""
    rel = rec.tolerance if rel is None else rel
    x = rec.probes if x is None else x.to(rec.weight.dtype)
    import copy

    m = copy.deepcopy(model).eval().to(rec.weight.dtype)
    with torch.no_grad():
        f = m(x).reshape(x.shape[0], -1)[:, rec.classes]
    got = rec(x)
    err = ((got - f).abs() / f.abs().clamp_min(1)).max().item()
    assert err <= rel, f"relative error {err:.3e} > {rel:g}"
    return err


def snapshot(model: torch.nn.Module):
    """Everything about a model reconviz promises not to change."""
    buf = io.BytesIO()
    torch.save(model.state_dict(), buf)
    return (
        buf.getvalue(),
        [(n, m.training) for n, m in model.named_modules()],
        [(n, p.requires_grad, p.dtype, p.device) for n, p in model.named_parameters()],
        [
            (n, len(m._forward_hooks), len(m._forward_pre_hooks), len(m._backward_hooks),
             len(getattr(m, "_backward_pre_hooks", {})))
            for n, m in model.named_modules()
        ],
        sorted(vars(model).keys()),
    )


@pytest.fixture
def untouched():
    """Use as: with untouched(model): ...  -> asserts the model is unchanged afterwards."""
    from contextlib import contextmanager

    @contextmanager
    def check(model):
        before = snapshot(model)
        try:
            yield
        finally:
            assert snapshot(model) == before, "the user's model was modified"

    return check


def pytest_terminal_summary(terminalreporter):
    for name, n in GENERATED.items():
        terminalreporter.write_line(f"reconviz: {name}: {n} generated architectures tried")
