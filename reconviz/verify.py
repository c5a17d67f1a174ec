"""Stage 5 — verify: the original and the reconstructed model, side by side.

The report is the paper's Table 1 (class, original, reconstructed, difference)
per probe, the max absolute and relative error against the tolerance, W against
the autograd Jacobian of the original model, and the certified radius.
Backends add columns: each column is one way of computing the outputs, and each
comparison checks a pair of columns against its tolerance.
"""

from __future__ import annotations

import importlib
import json
import math
import numbers
from dataclasses import dataclass, field
from typing import Any, Protocol, Sequence, runtime_checkable

import numpy as np
import torch
import torch.nn as nn
from torch import Tensor

from .errors import InputError
from .layer import model_of
from .linearize import POINT_EXACT, POINT_EXACT_TANGENT, LinearizedModel
from .probe import OutputSelector, check_probe_input, select_output, eval_copy
from .radius import Radius, certified_radius
from .reconstruction import Reconstruction, relative_error
from .selfcheck import SelfCheck

__all__ = ["verify", "VerificationReport", "Comparison", "VerifyBackend", "BACKENDS", "PLUGINS", "register_backend",
           "resolve_backend", "compare", "run_model", "class_columns", "kept_linearized", "ORIGINAL", "RECONSTRUCTED"]

RADIUS_AUTO_MAX = 4096  # radius="auto" sweeps the input when it has at most this many elements
ORIGINAL, RECONSTRUCTED = "original (torch)", "reconstructed (torch)"


@dataclass
class Comparison:
    """max |a - b| and max |a - b| / max(1, |b|) between two output columns."""

    a: str
    b: str
    max_abs_error: float
    max_rel_error: float
    tolerance: float

    @property
    def ok(self) -> bool:
        return self.max_rel_error <= self.tolerance


@dataclass
class VerificationReport:
    classes: list[int]
    columns: dict[str, np.ndarray]  # name -> (N, K) outputs
    comparisons: list[Comparison]
    dtype: str
    exactness: str
    jacobian_max_error: float | None = None
    jacobian_tolerance: float | None = None
    radius: Radius | None = None
    notes: list[str] = field(default_factory=list)
    class_names: list[str] | None = None
    self_checks: list[SelfCheck] = field(default_factory=list)  # the solver's (rec.meta["self_checks"])

    @property
    def ok(self) -> bool:
        """Every comparison within tolerance, W = Jacobian, and no self-check failed (skipped ones do not count)."""
        jac_ok = self.jacobian_max_error is None or self.jacobian_max_error <= (self.jacobian_tolerance or 0)
        checks_ok = all(c.passed is not False for c in self.self_checks)
        return all(c.ok for c in self.comparisons) and jac_ok and checks_ok

    @property
    def primary(self) -> Comparison:
        return self.comparisons[0]

    @property
    def max_abs_error(self) -> float:
        return self.primary.max_abs_error

    @property
    def max_rel_error(self) -> float:
        return self.primary.max_rel_error

    @property
    def tolerance(self) -> float:
        return self.primary.tolerance

    @property
    def table(self) -> list[dict[str, Any]]:
        """One row per (probe, class): the columns and original - reconstructed."""
        first, second = self.primary.b, self.primary.a
        rows = []
        for n in range(next(iter(self.columns.values())).shape[0]):
            for k, c in enumerate(self.classes):
                row = {"probe": n, "class": c}
                row.update({name: float(v[n, k]) for name, v in self.columns.items()})
                row["difference"] = float(self.columns[second][n, k] - self.columns[first][n, k])
                rows.append(row)
        return rows

    def to_dict(self) -> dict[str, Any]:
        return {
            "ok": self.ok, "dtype": self.dtype, "exactness": self.exactness, "classes": self.classes,
            "comparisons": [dict(vars(c), ok=c.ok) for c in self.comparisons],
            "jacobian_max_error": self.jacobian_max_error, "jacobian_tolerance": self.jacobian_tolerance,
            "radius_l2": None if self.radius is None else self.radius.l2.tolist(),
            "radius_linf": None if self.radius is None else self.radius.linf.tolist(),
            "ties": None if self.radius is None else self.radius.ties,
            "self_checks": [c.to_dict() for c in self.self_checks],
            "notes": self.notes, "table": self.table,
        }

    def to_json(self) -> str:
        """Strict JSON: an infinite radius (a model with no gate) is the string ``"inf"``,
        ``float("inf")`` reads it back; NaN is ``null``."""
        return json.dumps(_finite(self.to_dict()), indent=2, allow_nan=False, default=str)

    def __str__(self) -> str:
        return format_report(self)

    def _repr_html_(self) -> str:
        """Notebooks: the verdict, the comparisons and the checks."""
        from .htmlparts import verification_html

        return verification_html(self)


def _finite(v: Any) -> Any:
    """``v`` with every non-finite float replaced (json.dumps never hands floats to ``default``)."""
    if isinstance(v, dict):
        return {k: _finite(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_finite(x) for x in v]
    if isinstance(v, float) and not math.isfinite(v):
        return None if math.isnan(v) else ("inf" if v > 0 else "-inf")
    return v


def format_report(r: VerificationReport, max_rows: int = 40) -> str:
    names = list(r.columns)
    head = f"{'probe':>5} {'class':>6} " + " ".join(f"{n:>24}" for n in names) + f" {'difference':>12}"
    lines = [head, "-" * len(head)]
    rows = r.table
    for row in rows[:max_rows]:
        label = r.class_names[row["class"]] if r.class_names else str(row["class"])
        vals = " ".join(f"{row[n]:>24.12f}" for n in names)
        lines.append(f"{row['probe']:>5} {label:>6} {vals} {row['difference']:>12.3e}")
    if len(rows) > max_rows:
        lines.append(f"... {len(rows) - max_rows} more rows (report.table has them all)")
    lines.append("")
    for c in r.comparisons:
        verdict = "PASS" if c.ok else "FAIL"
        lines.append(
            f"{c.a} vs {c.b}: max abs {c.max_abs_error:.3e}, max rel {c.max_rel_error:.3e} "
            f"(tolerance {c.tolerance:g} relative)  {verdict}"
        )
    if r.jacobian_max_error is not None:
        verdict = "PASS" if r.jacobian_max_error <= (r.jacobian_tolerance or 0) else "FAIL"
        lines.append(f"W vs autograd Jacobian: max abs {r.jacobian_max_error:.3e} "
                     f"(tolerance {r.jacobian_tolerance:.3g})  {verdict}")
    if r.radius is not None:
        lines.append(f"certified radius: {r.radius}")
    lines += [str(c) for c in r.self_checks]
    lines += [f"note: {n}" for n in r.notes]
    lines.append(f"{r.exactness}, {r.dtype}: {'PASS' if r.ok else 'FAIL'}")
    return "\n".join(lines)


# --------------------------------------------------------------------------
# Backends: extra columns computed by another runtime
# --------------------------------------------------------------------------


@runtime_checkable
class VerifyBackend(Protocol):
    """Another runtime beside PyTorch: it adds columns and comparisons to a report.

    ``name`` names it in messages. :meth:`add_columns` runs the model and/or the
    reconstruction at ``x`` (the r * N inputs the report compares at) and adds its
    columns to ``report.columns``, its :class:`Comparison` s (see :func:`compare`) to
    ``report.comparisons`` and anything it could not run to ``report.notes``.
    ``tolerance`` is the one given to :func:`verify` (None: the backend's own),
    ``output`` the logits selector. :class:`reconviz.onnx.OnnxRuntime` is one."""

    name: str

    def add_columns(self, report: "VerificationReport", model: nn.Module, rec: Reconstruction, x: Tensor, *,
                    tolerance: float | None, output: OutputSelector) -> None: ...


BACKENDS: dict[str, VerifyBackend] = {}  # backend="name" -> the backend object
# names a plugin registers when it is imported: verify(backend=name) imports it by name
# (importlib, a plugin lookup: the core never imports reconviz.onnx itself)
PLUGINS: dict[str, str] = {"onnxruntime": "reconviz.onnx", "both": "reconviz.onnx"}


def register_backend(name: str, backend: VerifyBackend) -> None:
    """Make ``verify(..., backend=name)`` use ``backend`` (a :class:`VerifyBackend`)."""
    if not isinstance(backend, VerifyBackend):
        raise InputError(f"a verify backend needs a name and an add_columns method, got {type(backend).__name__}")
    BACKENDS[name] = backend


def resolve_backend(name: str) -> VerifyBackend:
    """The backend registered as ``name``, importing the plugin that registers it
    (:data:`PLUGINS`) the first time; InputError for an unknown name."""
    if name not in BACKENDS and name in PLUGINS:
        importlib.import_module(PLUGINS[name])  # a plugin lookup by name, not a static import
    if name not in BACKENDS:
        known = sorted(set(BACKENDS) | set(PLUGINS))
        raise InputError(f"unknown backend {name!r}: choose torch, {', '.join(known)}")
    return BACKENDS[name]


def verify(
    model: nn.Module,
    rec: Reconstruction,
    x: Tensor | None = None,
    *,
    tolerance: float | None = None,
    jacobian: bool = True,
    radius: bool | str = "auto",
    backend: str = "torch",
    output: OutputSelector = None,
    class_names: list[str] | None = None,
    backends: Sequence[VerifyBackend] = (),
) -> VerificationReport:
    """Check a reconstruction against the model it came from.

    Args:
        model: the original model (not modified).
        rec: the reconstruction.
        x: inputs to compare at, a batch of r * N samples (default: the probes).
        tolerance: relative tolerance (default: the contract's for rec's dtype).
        jacobian: compare W with the autograd Jacobian of the original model at the probes.
        radius: compute the certified radius (D forward passes); ``"auto"`` does it
            when the input has at most 4096 elements.
        backend: ``"torch"``; ``"onnxruntime"`` or ``"both"`` add onnxruntime columns
            (names looked up in :data:`BACKENDS`; the same as
            ``backends=[reconviz.onnx.OnnxRuntime()]`` and
            ``backends=[reconviz.onnx.OnnxRuntime(against_torch=True)]``).
        output: logits selector for models returning tuples/dicts (default: rec's).
        class_names: names of the model's outputs, for the printed table.
        backends: :class:`VerifyBackend` objects, each adding its columns and
            comparisons after PyTorch's (e.g. ``[reconviz.onnx.OnnxRuntime()]``).
    """
    extra = _check_options(rec, tolerance, jacobian, radius, backend, class_names, backends)
    dtype = rec.weight.dtype
    output = output if output is not None else rec.meta.get("output")
    x = rec.probes if x is None else rec.check_input(check_probe_input(x)).to(dtype)
    source, model = model, model_of(model, rec)  # a layer's reconstruction: the network from that layer on
    work = eval_copy(model, dtype, rec.probes.device, track_paths=True)
    with torch.no_grad():
        original = class_columns(run_model(work, x, output), rec.classes)
    rebuilt = rec(x)
    tol = rec.tolerance if tolerance is None else tolerance
    report = VerificationReport(
        classes=rec.classes.tolist(),
        columns={ORIGINAL: _np(original), RECONSTRUCTED: _np(rebuilt)},
        comparisons=[compare(RECONSTRUCTED, ORIGINAL, rebuilt, original, tol)],
        dtype=str(dtype).replace("torch.", ""),
        exactness=rec.exactness,
        notes=[str(n) for n in rec.meta.get("notes", [])],  # the reconstruction's own (e.g. a Softmax cut off)
        class_names=class_names,
        self_checks=rec.self_checks,
    )
    tangent = rec.meta.get("linearization") == "tangent"
    if jacobian and (rec.exactness == "region-exact" or tangent):  # the tangent rule's W is the Jacobian
        report.jacobian_max_error = _jacobian_error(work, rec, output)
        report.jacobian_tolerance = tol * max(1.0, float(torch.as_tensor(rec.weight).abs().max()))
    elif jacobian:
        report.notes.append(f"W vs autograd Jacobian skipped: {POINT_EXACT} (W is a template of the model at "
                            "x0, not its Jacobian), and the certified radius is 0")
    if tangent and rec.exactness == "point-exact":
        report.notes.append(f"{POINT_EXACT_TANGENT}: W is the Jacobian at x0 and the certified radius is 0")
    if radius is True or (radius == "auto" and math.prod(rec.sample_shape) <= RADIUS_AUTO_MAX):
        kept = kept_linearized(rec, source)  # the solve's own linearized network: no second probe
        report.radius = certified_radius(kept if kept is not None else model, rec.probes, dtype=dtype, output=output,
                                         linearization=rec.meta.get("linearization") or "value")
    elif radius == "auto":
        report.notes.append(
            f"certified radius skipped: the input has {math.prod(rec.sample_shape)} elements "
            f"(> {RADIUS_AUTO_MAX}); pass radius=True to compute it (one forward pass per element)"
        )
    for b in extra:
        b.add_columns(report, model, rec, x, tolerance=tolerance, output=output)
    return report


def kept_linearized(rec: Reconstruction, model: Any) -> LinearizedModel | None:
    """``rec.linearized`` when it is the linearization of ``model`` (the same object) at ``rec``'s
    probes in ``rec``'s dtype, else None."""
    lin = rec.linearized
    if not isinstance(lin, LinearizedModel) or lin.dtype != rec.weight.dtype:
        return None
    source = getattr(lin, "source", None)
    if model is not lin and (source is None or source() is not model):
        return None
    probes = rec.probes.to(lin.probes.device)
    if lin.probes.shape != probes.shape or not torch.equal(lin.probes, probes):
        return None
    return lin


def _check_options(rec: Any, tolerance: Any, jacobian: Any, radius: Any, backend: Any, class_names: Any,
                   backends: Any) -> list[VerifyBackend]:
    """The backends to run; InputError for an argument of :func:`verify` that is not usable as given."""
    if not isinstance(rec, Reconstruction):
        raise InputError(f"rec must be a Reconstruction (from reconviz.reconstruct or Reconstruction.load), "
                         f"got {type(rec).__name__}")
    if tolerance is not None and not (isinstance(tolerance, numbers.Real) and not isinstance(tolerance, bool)
                                      and 0 <= tolerance < math.inf):
        raise InputError(f"tolerance must be a finite relative tolerance >= 0 (e.g. 1e-9), got {tolerance!r:.60}")
    radius_ok = isinstance(radius, bool) or (isinstance(radius, str) and radius == "auto")
    if not isinstance(jacobian, bool) or not radius_ok:
        raise InputError(f"jacobian must be True or False and radius True, False or 'auto'; got jacobian="
                         f"{jacobian!r:.40}, radius={radius!r:.40}")
    if not isinstance(backend, str):
        raise InputError(f"backend must be a name (torch, onnxruntime, both), got {backend!r:.60}; "
                         "pass backend objects as backends=[...]")
    if isinstance(backends, (str, bytes)) or not isinstance(backends, (list, tuple)) or not all(
            isinstance(b, VerifyBackend) for b in backends):
        raise InputError(f"backends must be a list of verify backends (objects with a name and an add_columns "
                         f"method, e.g. reconviz.onnx.OnnxRuntime()), got {backends!r:.80}")
    extra = [] if backend == "torch" else [resolve_backend(backend)]
    if class_names is not None and not (isinstance(class_names, (list, tuple))
                                        and all(isinstance(n, str) for n in class_names)
                                        and len(class_names) > int(rec.classes.max())):
        raise InputError(f"class_names must be a list of strings naming every output up to class "
                         f"{int(rec.classes.max())}, got {class_names!r:.80}")
    return extra + list(backends)


def run_model(work: nn.Module, x: Tensor, output: OutputSelector) -> Tensor:
    """The working copy's selected outputs at x, (B, K_all); InputError when the model fails on x."""
    try:
        out = work(x.clone())
    except RuntimeError as e:
        raise InputError(
            f"the model failed on an input of shape {tuple(x.shape)}: {' '.join(str(e).split())[:300]}. "
            "Verify against the model the reconstruction came from, at inputs shaped like its probes"
        ) from e
    return select_output(out, output, x.shape[0])


def class_columns(out: Tensor, classes: Tensor) -> Tensor:
    """``out[:, classes]``; InputError when the model has fewer outputs than the classes reach."""
    top = int(classes.max())
    if top >= out.shape[1]:
        raise InputError(
            f"the model has {out.shape[1]} output(s), but the reconstruction has class {top}: verify against "
            "the model the reconstruction came from (and the output= that selected its logits)"
        )
    return out[:, classes.to(out.device)]


def compare(a: str, b: str, va: Tensor, vb: Tensor, tol: float) -> Comparison:
    """The :class:`Comparison` of column ``a`` (values ``va``) with column ``b`` (``vb``)."""
    return Comparison(a, b, float((va - vb).abs().max()), float(relative_error(va, vb).max()), tol)


def _jacobian_error(work: nn.Module, rec: Reconstruction, output: OutputSelector) -> float:
    """max |W - d f / d x| at the probes, by one backward pass per class."""
    x = rec.probes.detach().clone().requires_grad_(True)
    with torch.enable_grad():
        out = class_columns(run_model(work, x, output), rec.classes)
        worst = 0.0
        w = torch.as_tensor(rec.weight)
        for k in range(out.shape[1]):
            (g,) = torch.autograd.grad(out[:, k].sum(), x, retain_graph=k < out.shape[1] - 1)
            worst = max(worst, float((g - w[:, k]).abs().max()))
    return worst


def _np(t: Tensor) -> np.ndarray:
    return t.detach().cpu().numpy()

