"""One self-contained HTML page that tells the whole story of a reconstruction.

    rv.report(model, x, path="report.html")

The page holds the model's facts (class, parameters, input shape, the gates found
and what was frozen, exactness), the equivalence (the paper's Table 1 per probe,
every comparison, W vs the Jacobian, the certified radius, the self-checks), and
per probe: the input, its top classes, their templates and contribution maps, the
classic saliency maps side by side and their faithfulness metrics in a sortable
table; then the versions, the date and the command. Figures are embedded PNG data,
styles are inline; the page loads nothing from the network (a content security
policy forbids it) and reads without its small sorting script.
"""

from __future__ import annotations

import contextlib
import os
import platform
import sys
import tempfile
import warnings
from dataclasses import dataclass, field
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import torch
import torch.nn as nn

from . import htmlparts as H
from .errors import InputError
from .files import atomic_write
from .pipeline import reconstruct
from .reconstruction import Reconstruction
from .verify import VerificationReport, verify

__all__ = ["report", "render", "Page", "MAX_PROBES", "METHODS"]

MAX_PROBES = 16  # probes with a section of their own
MAX_ROWS = 50  # rows of a per-probe Table 1 / of the frozen ops (more: the largest logits / the first)
METRIC_STEPS = 32  # steps of the deletion / insertion curves
# (key, label, signed): the saliency methods shown side by side and scored
METHODS = (("gradient", "gradient", False), ("gradient_x_input", "Gradient x Input", True),
           ("guided_backprop", "guided backprop", True), ("deconvnet", "deconvnet", True),
           ("occlusion", "occlusion", True))


@dataclass
class Page:
    """A rendered report: the HTML text and the figure files kept in ``figure_dir`` (if any)."""

    html: str
    figures: list[Path] = field(default_factory=list)


def report(model: nn.Module, x: torch.Tensor | None = None, path: str | os.PathLike = "report.html",
           classes: Any = None, **options: Any) -> Path:
    """Write the HTML report of ``model`` reconstructed at ``x`` to ``path`` (atomically); returns the path.

    Options (keywords) are those of :func:`render`: ``top``, ``class_names``, ``backend``,
    ``rec``, ``verification``, ``command``, ``figure_dir``, ``labels``, ``title``.
    """
    target = _check_path(path)
    page = render(model, x, classes, **options)
    write(page, target)
    return target


def write(page: Page, path: Path) -> None:
    atomic_write(path, lambda f: f.write(page.html.encode("utf-8")))


def render(model: nn.Module, x: torch.Tensor | None = None, classes: Any = None, *, top: int = 3,
           class_names: Sequence[str] | None = None, backend: str = "torch", rec: Reconstruction | None = None,
           verification: VerificationReport | None = None, command: str | None = None,
           figure_dir: str | os.PathLike | None = None, labels: Sequence[str] | None = None,
           title: str | None = None) -> Page:
    """The report as a :class:`Page`.

    Args:
        model: the PyTorch model (never modified: every step works on a copy).
        x: the probe batch (N, ...); may be None when ``rec`` is given.
        classes: the outputs to reconstruct (as for :func:`reconviz.reconstruct`).
        top: classes shown per probe (templates and the top-class table), largest logits first.
        class_names: names of the model's outputs.
        backend: passed to :func:`reconviz.verify` (``"onnxruntime"`` or ``"both"`` add its check).
        rec, verification: a reconstruction of ``model`` at ``x`` and its report, to reuse.
        command: the command that made the page (default ``rv.report(...)``).
        figure_dir: also keep the figures there as PNG files (``templates_<label>.png``,
            ``contributions_<label>.png``, ``equivalence.png``).
        labels: per-probe labels of those files (default ``probe<n>``).
        title: the page's title.
    """
    _check_model(model)
    top = _check_top(top)
    with _each_warning_once():  # reconstruct, verify and every map would repeat e.g. a TrainingModeWarning
        return _render(model, x, classes, top, class_names, backend, rec, verification, command, figure_dir,
                       labels, title)


def _render(model: nn.Module, x: Any, classes: Any, top: int, class_names: Any, backend: str, rec: Any,
            verification: Any, command: Any, figure_dir: Any, labels: Any, title: Any) -> Page:
    rec = _reconstruction(model, x, classes, rec)
    labels = _labels(labels, rec.n_probes)
    verification = verification if verification is not None else verify(
        model, rec, class_names=None if class_names is None else list(class_names), backend=backend)
    probes = list(range(min(rec.n_probes, MAX_PROBES)))
    with _folder(figure_dir) as folder:
        figs = Figures(folder, keep=figure_dir is not None)
        ctx = Context(model, rec, verification, class_names, top, figs)
        body = [_header(ctx, title), model_section(ctx), equivalence_section(ctx)]
        body += probe_sections(ctx, probes, labels)
        body.append(provenance_section(command or "rv.report(...)"))
    return Page(H.page(title or _title(model), "".join(body)), figs.kept)


# --------------------------------------------------------------------------
# checks
# --------------------------------------------------------------------------


def _check_model(model: Any) -> None:
    if not isinstance(model, nn.Module):
        raise InputError(f"the report needs a PyTorch nn.Module (its saliency maps run the model in PyTorch), "
                         f"got {type(model).__name__}; for an ONNX file use rv.onnx.reconstruct and rv.verify")


def _check_top(top: Any) -> int:
    if isinstance(top, bool) or not isinstance(top, int) or top < 1:
        raise InputError(f"top must be a positive int (classes shown per probe), got {top!r:.40}")
    return top


def _check_path(path: Any) -> Path:
    if not isinstance(path, (str, os.PathLike)) or not str(path):
        raise InputError(f"path must be a file path such as 'report.html', got {path!r:.60}")
    target = Path(path)
    if target.is_dir():
        raise InputError(f"{target} is a folder: give the report's file path, e.g. {target / 'report.html'}")
    return target


def _reconstruction(model: nn.Module, x: Any, classes: Any, rec: Any) -> Reconstruction:
    if rec is None:
        return reconstruct(model, x, classes=classes)
    if not isinstance(rec, Reconstruction):
        raise InputError(f"rec must be a Reconstruction, got {type(rec).__name__}")
    if x is not None and not (isinstance(x, torch.Tensor) and x.shape == rec.probes.shape
                              and torch.equal(x.to(rec.probes), rec.probes)):
        raise InputError("x and rec.probes differ: pass the probes rec was reconstructed at (or x=None)")
    return rec


def _labels(labels: Any, n: int) -> list[str]:
    if labels is None:
        return [f"probe{i}" for i in range(n)]
    if isinstance(labels, str) or len(labels) != n or not all(isinstance(s, str) and s for s in labels):
        raise InputError(f"labels must be {n} non-empty strings, one per probe")
    return list(labels)


# --------------------------------------------------------------------------
# figures: drawn by reconviz.plot into a folder, embedded as PNG data
# --------------------------------------------------------------------------


@contextlib.contextmanager
def _each_warning_once() -> Iterator[None]:
    """Collect the warnings of a block and re-issue each distinct one once."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        yield
    seen = set()
    for w in caught:
        if (w.category, str(w.message)) not in seen:
            seen.add((w.category, str(w.message)))
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)


@contextlib.contextmanager
def _folder(figure_dir: Any) -> Iterator[Path]:
    if figure_dir is not None:
        yield Path(figure_dir)
        return
    with tempfile.TemporaryDirectory(prefix="reconviz-report-") as tmp:
        yield Path(tmp)


class Figures:
    """Draws a figure to ``folder/name`` (a bare Agg figure, saved atomically), returns its <img>."""

    def __init__(self, folder: Path, keep: bool):
        self.folder, self.keep_files = folder, keep
        self.kept: list[Path] = []

    def embed(self, name: str, draw: Callable[..., Any], alt: str, **kw: Any) -> str:
        path = self.folder / name
        fig = draw(path=str(path), **kw)  # saved with a path: never registered with pyplot
        fig.clear()  # free its artists now
        if self.keep_files:
            self.kept.append(path)
        return H.img(H.png_uri(path.read_bytes()), alt)


# --------------------------------------------------------------------------
# sections
# --------------------------------------------------------------------------


@dataclass
class Context:
    model: nn.Module
    rec: Reconstruction
    verification: VerificationReport
    class_names: Any
    top: int
    figs: Figures

    def label(self, c: int) -> str:
        from .plot._base import class_label

        return class_label(int(c), self.class_names)


def _title(model: nn.Module) -> str:
    return f"reconviz report: {type(model).__name__}"


def _header(ctx: Context, title: str | None) -> str:
    v, rec = ctx.verification, ctx.rec
    lead = (f"{H.verdict(v.ok)}: f(x) = W x + b reproduces the model's {rec.n_classes} logit(s) at "
            f"{rec.n_probes} probe(s): max relative error {v.max_rel_error:.2e} against a tolerance of "
            f"{v.tolerance:g} ({rec.exactness}, {v.dtype}).")
    nav = ('<nav aria-label="sections"><a href="#model">Model</a> · <a href="#equivalence">Equivalence</a> · '
           '<a href="#probe-0">Probes</a> · <a href="#provenance">Provenance</a></nav>')
    return f'<h1>{H.esc(title or _title(ctx.model))}</h1><p class="lead">{lead}</p>{nav}'


def model_section(ctx: Context) -> str:
    model, rec = ctx.model, ctx.rec
    kind = type(model)
    n_params = sum(p.numel() for p in model.parameters())
    m = rec.meta
    pairs = [
        ("class", f"{kind.__module__}.{kind.__qualname__}"),
        ("parameters", f"{n_params:,}"),
        ("input shape", f"{rec.n_probes} probe(s) x {tuple(rec.sample_shape)}"),
        ("classes reconstructed", f"{rec.n_classes}: {', '.join(ctx.label(c) for c in rec.classes.tolist()[:20])}"
                                  + (" ..." if rec.n_classes > 20 else "")),
        *H.reconstruction_facts(rec)[2:],
        ("solve time", f"{float(m.get('seconds', float('nan'))):.3f} s"),
    ]
    return (f'<section id="model"><h2>Model</h2>{H.facts(pairs, "the model and its reconstruction")}'
            f"<h3>What was frozen</h3>{_frozen(rec)}</section>")


def _frozen(rec: Reconstruction) -> str:
    frozen = rec.frozen
    if not frozen:
        return "<p>No gate: the network is affine in its input.</p>" if frozen == [] else "<p>Not recorded.</p>"
    rows = [[f.op, f.location or "(top module)", f.gate, f.count] for f in frozen[:MAX_ROWS]]
    more = f"<p>... and {len(frozen) - MAX_ROWS} more (rec.frozen).</p>" if len(frozen) > MAX_ROWS else ""
    text = ("<p>Every gate is frozen at the probe's choice (ReLU masks, max-pool switches): one row per "
            "operation and place in the network.</p>")
    return text + H.table(("op", "location", "gate", "gated calls"), rows, caption="frozen operations") + more \
        + _frozen_values(rec)


def _frozen_values(rec: Reconstruction) -> str:
    """The frozen tensors of every gated call (ReLU slopes, max-pool switch indices), when the solve's
    linearized network is at hand (a fresh reconstruction)."""
    priors = [p for p in getattr(rec.linearized, "priors", None) or [] if not p.constant][:MAX_ROWS]
    rows = [[p.op, p.module_path or "(top module)", str(tuple(p.shape)), _tensors(p.tensors), p.ties]
            for p in priors]
    if not rows:
        return ""
    return H.table(("op", "location", "gated tensor", "frozen values (all probes)", "ties"), rows,
                   caption="frozen values per gated call")


def _tensors(tensors: dict[str, torch.Tensor]) -> str:
    return "; ".join(f"{k} {tuple(t.shape)}" + (f", {int((t != 0).sum()):,} of {t.numel():,} nonzero"
                                                if t.is_floating_point() else "") for k, t in tensors.items())


def equivalence_section(ctx: Context) -> str:
    v = ctx.verification
    parts = ['<section id="equivalence"><h2>Equivalence</h2>',
             H.table(H.COMPARISON_HEADERS, H.comparison_rows(v), caption="comparisons", cls="comparisons"),
             H.facts(_checks(v), "checks"), _radius(v), _self_checks(v)]
    parts += [f"<p>Note: {H.esc(n)}</p>" for n in v.notes]
    parts.append(ctx.figs.embed("equivalence.png", lambda path: _equivalence_figure(v, ctx.class_names, path),
                                "original against reconstructed logits, and their relative error per class"))
    parts.append("<h3>Table 1: original and reconstructed logits</h3>")
    parts += [_table1(ctx, n) for n in range(next(iter(v.columns.values())).shape[0])[:MAX_PROBES]]
    return "".join(parts) + "</section>"


def _equivalence_figure(v: VerificationReport, class_names: Any, path: str) -> Any:
    from .plot import equivalence

    return equivalence(v, class_names=class_names, path=path)


def _checks(v: VerificationReport) -> list[tuple[str, Any]]:
    pairs: list[tuple[str, Any]] = [("verdict", H.Raw(H.verdict(v.ok))), ("exactness", v.exactness),
                                    ("dtype", v.dtype), ("max abs error", v.max_abs_error),
                                    ("max rel error", v.max_rel_error), ("tolerance (relative)", v.tolerance)]
    if v.jacobian_max_error is not None:
        ok = v.jacobian_max_error <= (v.jacobian_tolerance or 0)
        pairs.append(("W vs autograd Jacobian", H.Raw(f"max abs {v.jacobian_max_error:.3e} (tolerance "
                                                      f"{v.jacobian_tolerance:.3g}) {H.verdict(ok)}")))
    return pairs


def _radius(v: VerificationReport) -> str:
    r = v.radius
    if r is None:
        return "<p>Certified radius: not computed.</p>"
    rows = [[n, float(r.l2[n]), float(r.linf[n])] for n in range(len(r.l2))]
    note = f"<p>Ties on a moving face: {r.ties}; exact equalities: {r.equalities}. {H.esc(r.why)}</p>"
    return H.table(("probe", "L2 radius", "L-inf radius"), rows, caption="certified radius per probe",
                   cls="radius") + note


def _self_checks(v: VerificationReport) -> str:
    rows = [[c.name, H.Raw(H.verdict(c.passed)), "" if c.max_rel_error is None else float(c.max_rel_error),
             float(c.tolerance), c.detail] for c in v.self_checks]
    if not rows:
        return "<p>Self-checks: none recorded.</p>"
    return H.table(("self-check", "verdict", "max rel error", "tolerance", "detail"), rows, caption="self-checks")


def _table1(ctx: Context, n: int) -> str:
    v = ctx.verification
    names = list(v.columns)
    ref, new = v.primary.b, v.primary.a
    rows = [row for row in v.table if row["probe"] == n]
    if len(rows) > MAX_ROWS:
        rows = sorted(rows, key=lambda r: -r[ref])[:MAX_ROWS]
    body = []
    for row in rows:
        rel = abs(row[new] - row[ref]) / max(1.0, abs(row[ref]))
        body.append([ctx.label(row["class"]), *(row[c] for c in names), row["difference"], rel, v.tolerance,
                     H.Raw(H.verdict(rel <= v.tolerance))])
    headers = ("class", *names, "difference", "relative error", "tolerance", "verdict")
    keys = ("class", *names, "difference", "relative", "tolerance", "verdict")
    caption = f"probe {n}" + (f" (the {MAX_ROWS} largest logits)" if len(rows) == MAX_ROWS else "")
    return H.table(headers, body, caption=caption, cls=f"equivalence probe-{n}", keys=keys)


# --------------------------------------------------------------------------
# per probe: input, top classes, templates, contributions, saliency, metrics
# --------------------------------------------------------------------------


def probe_sections(ctx: Context, probes: list[int], labels: list[str]) -> list[str]:
    rec = ctx.rec
    targets = [int(rec.classes[int(rec.predicted[n])]) for n in probes]
    scored = _saliency(ctx, probes, targets) if len(rec.sample_shape) >= 2 else None
    out = [_probe(ctx, i, n, labels[n], scored) for i, n in enumerate(probes)]
    if rec.n_probes > len(probes):
        out.append(f"<p>Sections for the first {len(probes)} of {rec.n_probes} probes.</p>")
    return out


def _probe(ctx: Context, i: int, n: int, label: str, scored: dict[str, Any] | None) -> str:
    rec = ctx.rec
    order = np.argsort(-rec.logits[n].detach().cpu().double().numpy(), kind="stable")[: ctx.top]
    top = [int(rec.classes[int(k)]) for k in order]
    pred = ctx.label(top[0])
    rows = [[r + 1, ctx.label(c), H.Short(rec.logits[n, int(k)])] for r, (c, k) in enumerate(zip(top, order))]
    maps = "" if scored is None else f"<div>{_maps_html(scored, i, n, pred)}</div>"
    parts = [f'<section id="probe-{n}"><h2>Probe {n}: predicted {H.esc(pred)}</h2><div class="row">',
             H.table(("rank", "class", "logit"), rows, caption=f"top classes at probe {n}"), maps, "</div>"]
    shown = None if ctx.top >= rec.n_classes else top
    parts.append("<h3>Templates and contributions</h3>")
    parts.append(ctx.figs.embed(f"templates_{label}.png", _plot("templates"),
                                f"class templates W_c of the top classes at probe {n}",
                                rec=rec, probe=n, classes=shown, class_names=ctx.class_names))
    parts.append(ctx.figs.embed(f"contributions_{label}.png", _plot("contributions"),
                                f"contribution maps W_c x of the predicted class and the runner-up at probe {n}, "
                                "with bars that sum to the logit", rec=rec, probe=n, class_names=ctx.class_names))
    if scored is not None:
        parts.append(_metrics_html(scored, i, n, pred))
    return "".join(parts) + "</section>"


def _plot(name: str) -> Callable[..., Any]:
    from . import plot

    return getattr(plot, name)


def _saliency(ctx: Context, probes: list[int], targets: list[int]) -> dict[str, Any]:
    """The maps of every method for the predicted classes, and their faithfulness metrics."""
    from . import metrics, saliency

    rec = ctx.rec
    x = rec.probes[probes]
    kw = {"output": rec.meta.get("output"), "dtype": rec.weight.dtype}
    side = max(1, round(min(x.shape[-2:]) / 4))  # occlusion window / metric patch: a quarter of the side
    calls = {"gradient": saliency.gradient, "gradient_x_input": saliency.gradient_x_input,
             "guided_backprop": saliency.guided_backprop, "deconvnet": saliency.deconvnet,
             "occlusion": lambda m, xs, t, **k: saliency.occlusion(m, xs, t, window=side, stride=max(1, side // 2),
                                                                  batch_size=1024, **k)}
    maps = {key: calls[key](ctx.model, x, targets, **kw) for key, _, _ in METHODS}
    # the curves of all methods in one call each (rows are independent); prediction difference per
    # method, so that every method is measured against the same random regions
    curves = [_all_methods(auc, ctx.model, x, maps, targets, steps=METRIC_STEPS, batch_size=1024, **kw)
              for auc in (metrics.deletion_auc, metrics.insertion_auc)]
    scores = {key: (curves[0][j], curves[1][j],
                    metrics.prediction_difference(ctx.model, x, m, targets, patch=(side, side), batch_size=1024,
                                                  **kw).difference)
              for j, (key, m) in enumerate(maps.items())}
    return {"x": x, "maps": maps, "scores": scores}


def _all_methods(auc: Callable[..., torch.Tensor], model: nn.Module, x: torch.Tensor, maps: dict[str, Any],
                 targets: list[int], **options: Any) -> torch.Tensor:
    """``auc`` of every map in one call: (methods, N)."""
    from .saliency._common import check_map

    flat = torch.cat([check_map(m, x) for m in maps.values()])  # (methods * N, H, W)
    xs = x.repeat(len(maps), *([1] * (x.dim() - 1)))
    return auc(model, xs, flat, targets * len(maps), **options).reshape(len(maps), x.shape[0])


def _spatial(m: torch.Tensor, key: str) -> np.ndarray:
    """One map as (H, W): gradient by max over channels of |.|, the others summed over channels."""
    a = H.as_chw(m.detach().cpu().double().numpy())
    return np.abs(a).max(0) if key == "gradient" else a.sum(0)


def _maps_html(scored: dict[str, Any], i: int, n: int, pred: str) -> str:
    x = scored["x"][i].detach().cpu().double().numpy()
    cells = [_figure(H.image_png(H.as_chw(x)), f"input image of probe {n}", "input")]
    for key, label, signed in METHODS:
        a = _spatial(scored["maps"][key][i], key)
        how = "red positive, blue negative" if signed else "brighter is larger"
        cells.append(_figure(H.map_png(a, signed), f"{label} map of the predicted class ({pred}) at probe {n} ({how})", label))
    return (f"<h3>Saliency maps of the predicted class ({H.esc(pred)})</h3>"
            f'<div class="maps">{"".join(cells)}</div>')


def _figure(png: bytes, alt: str, caption: str) -> str:
    return f"<figure>{H.img(H.png_uri(png), alt, 'map')}<figcaption>{H.esc(caption)}</figcaption></figure>"


def _metrics_html(scored: dict[str, Any], i: int, n: int, pred: str) -> str:
    rows = [[label, *(H.Short(float(s[i])) for s in scored["scores"][key])] for key, label, _ in METHODS]
    headers = ("method", "deletion AUC (lower is better)", "insertion AUC (higher is better)",
               "prediction difference (higher is better)")
    text = (f"<p>Faithfulness of each map for the predicted class ({H.esc(pred)}): deletion and insertion AUC of the softmax "
            f"score over {METRIC_STEPS} steps (RISE), and the logit drop when the top regions are removed, "
            "against random regions. Click a column header to sort.</p>")
    return (f"<h3>Faithfulness metrics</h3>{text}"
            + H.table(headers, rows, caption=f"faithfulness metrics at probe {n}", cls="sortable metrics",
                      keys=("method", "deletion", "insertion", "difference")))


# --------------------------------------------------------------------------
# provenance
# --------------------------------------------------------------------------


def versions() -> list[tuple[str, str]]:
    """reconviz, torch, onnxruntime, numpy, matplotlib and Python versions (``not installed`` if absent)."""
    out = [("reconviz", sys.modules[__package__].__version__), ("torch", torch.__version__)]
    for name in ("onnxruntime", "numpy", "matplotlib"):
        try:
            out.append((name, metadata.version(name)))
        except metadata.PackageNotFoundError:
            out.append((name, "not installed"))
    return out + [("python", platform.python_version())]


def provenance_section(command: str) -> str:
    date = datetime.now(timezone.utc).isoformat(timespec="seconds")
    pairs = [*versions(), ("date (UTC)", date), ("command", H.Raw(f"<code>{H.esc(command)}</code>"))]
    return f'<section id="provenance"><h2>Provenance</h2>{H.facts(pairs, "versions, date and command")}</section>'
