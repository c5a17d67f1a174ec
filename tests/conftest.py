"""Shared test helpers: the exactness assertion and a model-untouched snapshot."""

from __future__ import annotations

import contextlib
import io
import os
import sys

import matplotlib
import pytest
import torch

matplotlib.use("Agg")
sys.path.insert(0, os.path.dirname(__file__))  # tests/archs.py importable as `archs`
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))

# generated-architecture counts reported at the end of the run (see engine/test_generated_architectures.py):
# test name -> a line such as "312 generated architectures tried (298 distinct, ...)"
GENERATED: dict[str, str] = {}


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


_HOOK_DICTS = (
    "_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks",
    "_forward_hooks_with_kwargs", "_forward_pre_hooks_with_kwargs", "_forward_hooks_always_called",
    "_state_dict_hooks", "_state_dict_pre_hooks", "_load_state_dict_pre_hooks",
    "_load_state_dict_post_hooks",
)


def global_state():
    """Process-wide state reconviz must leave as it found it: global module hooks, the
    torch-function mode stack (the gate modes), grad mode and the default dtype."""
    from torch.nn.modules import module as M

    hooks = {n: list(getattr(M, n, {}).keys()) for n in dir(M) if n.startswith("_global_") and n.endswith("hooks")}
    return (hooks, torch._C._len_torch_function_stack(), torch.is_grad_enabled(), torch.get_default_dtype())


def snapshot(model: torch.nn.Module):
    """Everything about a model reconviz promises not to change."""
    buf = io.BytesIO()
    torch.save(model.state_dict(), buf)
    return (
        buf.getvalue(),
        [(n, m.training) for n, m in model.named_modules()],
        [(n, p.requires_grad, p.dtype, p.device, id(p), p.grad is None) for n, p in model.named_parameters()],
        [(n, b.requires_grad, b.dtype, id(b)) for n, b in model.named_buffers()],
        [(n, h, list(getattr(m, h, {}).keys())) for n, m in model.named_modules() for h in _HOOK_DICTS],
        [(n, sorted(vars(m).keys())) for n, m in model.named_modules()],
        global_state(),
    )


@pytest.fixture(autouse=True)
def _torch_global_settings():
    """Restore torch's process-wide switches after each test: a script run in-process
    (examples/train_digits.py's main sets deterministic algorithms and one thread) must not
    change how the tests after it run (MaxUnpool has no deterministic kernel)."""
    saved = (torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled(),
             torch.get_num_threads())
    yield
    if (torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()) != saved[:2]:
        torch.use_deterministic_algorithms(saved[0], warn_only=saved[1])
    if torch.get_num_threads() != saved[2]:
        torch.set_num_threads(saved[2])


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


@pytest.fixture
def point_exact_silu():
    """A custom gate freezing SiLU at the probe, phi(z) = z * sigmoid(z0) (region_exact =
    False), registered for one test and removed after it."""
    import torch.nn.functional as F

    from reconviz.ops.gates import Call, ElementwiseGate

    class FrozenSiLU(ElementwiseGate):
        name = "silu_point"
        functions = (F.silu,)
        region_exact = False

        def parse(self, func, args, kwargs):
            return Call(func, args[0], {})

        def slope_offset(self, z, p):
            return torch.sigmoid(z), None

        def breakpoints(self, p):
            return []

    with registered(FrozenSiLU()) as gate:
        yield gate


@pytest.fixture
def one_thread():
    """Tiny float64 tensors: one thread is faster, and a second one only contends on a busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@contextlib.contextmanager
def registered(gate):
    """The gate registered for the duration of a block (reconviz.ops.registered), yielding it."""
    from reconviz.ops import registered as _registered

    with _registered(gate):
        yield gate


def pytest_terminal_summary(terminalreporter):
    for name, line in GENERATED.items():
        terminalreporter.write_line(f"reconviz: {name}: {line}")


def value_oracle(oracle, x):
    """(W, b) of the value rule's oracle: ``oracle`` is the model written with its frozen factors
    ``.detach()``ed (z * torch.sigmoid(z).detach() for SiLU), so one forward pass at x is g's;
    W is its autograd Jacobian at each probe, (N, K, *sample_shape), and b = f(x) - W x."""
    import copy

    m = copy.deepcopy(oracle).eval().double()
    x = x.double().clone()
    J = torch.autograd.functional.jacobian(lambda t: m(t).reshape(t.shape[0], -1), x)  # (N, K, N, *s)
    W = torch.stack([J[i, :, i] for i in range(x.shape[0])])
    with torch.no_grad():
        f = m(x).reshape(x.shape[0], -1)
    return W, f - (W.flatten(2) * x.flatten(1)[:, None]).sum(-1)


def assert_value_rule(rec, oracle, x, rel=1e-9):
    """rec's W and b equal the value oracle's to ``rel`` relative (of max(1, max |W|), of
    max(1, |f|)); returns the largest relative difference of W."""
    W, b = value_oracle(oracle, x)
    w_err = float((rec.weight - W).abs().max()) / max(1.0, float(W.abs().max()))
    b_err = float(((rec.bias - b[:, rec.classes]).abs() / b[:, rec.classes].abs().clamp_min(1)).max())
    assert w_err <= rel and b_err <= rel, f"W off the oracle by {w_err:.2e}, b by {b_err:.2e} (relative)"
    return w_err
