"""The paper's Table 1 as a figure: original vs reconstructed outputs per class, with the error."""

from __future__ import annotations

from typing import Any

import numpy as np
from matplotlib.figure import Figure

from ..errors import InputError
from ..verify import VerificationReport
from ._base import PathLike, class_label, finish, new_figure

__all__ = ["equivalence"]

COLUMN_COLOURS = ("#4d4d4d", "#d6604d", "#4393c3", "#5aae61", "#9970ab")
ERROR_FLOOR = 1e-20  # where an error of exactly 0 is drawn on the log axis


def equivalence(
    report: VerificationReport,
    probes: Any = None,
    class_names: Any = None,
    path: PathLike = None,
    *,
    max_probes: int = 2,
    max_classes: int = 12,
    dpi: float = 100,
    title: str | None = None,
) -> Figure:
    """Original vs reconstructed class outputs, as in the paper's Table 1.

    One row per probe: a table of the outputs of every column of the report
    (original model, reconstruction, and any backend such as onnxruntime) and
    their difference; a grouped bar chart of the same outputs; and the relative
    error |reconstructed - original| / max(1, |original|) per class on a log axis
    against the tolerance (an error of exactly 0 sits on the bottom edge). The
    title gives the verdict of every comparison in the report.

    Args:
        report: a :class:`~reconviz.VerificationReport` from :func:`reconviz.verify`.
        probes: row indices of the report's inputs to show (default: the first ``max_probes``).
        class_names: names indexed by output index (default: the report's).
        max_classes: with more classes, the ones with the largest original outputs are shown.
        path: save the figure there (.png, .svg, .pdf), atomically.
    """
    if not isinstance(report, VerificationReport):
        raise InputError(f"equivalence takes a VerificationReport (reconviz.verify), got {type(report).__name__}")
    names = list(report.columns)
    ref_name, rec_name = report.primary.b, report.primary.a
    cols = {k: np.asarray(v, dtype=np.float64) for k, v in report.columns.items()}
    rows_total = cols[ref_name].shape[0]
    if probes is None:
        probes = list(range(min(rows_total, max_probes)))
    elif isinstance(probes, (int, np.integer)):
        probes = [int(probes)]
    probes = [int(p) for p in probes]
    if not probes or any(not 0 <= p < rows_total for p in probes):
        raise InputError(f"probes must be indices in [0, {rows_total}), got {probes}")
    class_names = report.class_names if class_names is None else class_names
    k_all = len(report.classes)
    shown = min(k_all, max_classes)

    fig = new_figure((15.0, 0.9 + (0.32 * shown + 1.4) * len(probes)), path)
    grid = fig.add_gridspec(len(probes), 3, width_ratios=[1.45, 1.3, 1.0])
    for r, p in enumerate(probes):
        ref, got = cols[ref_name][p], cols[rec_name][p]
        order = np.arange(k_all) if shown == k_all else np.argsort(-ref, kind="stable")[:shown]
        labels = [class_label(int(report.classes[i]), class_names) for i in order]

        # the table ------------------------------------------------------
        tab = fig.add_subplot(grid[r, 0])
        tab.set_axis_off()
        header = ["class", *[_short(nm).replace(" (", "\n(") for nm in names], "difference"]
        cells = [
            [lab, *[f"{cols[nm][p, i]:.10f}" for nm in names], f"{got[i] - ref[i]:.2e}"]
            for lab, i in zip(labels, order)
        ]
        table = tab.table(cellText=cells, colLabels=header, loc="center", cellLoc="right")
        table.auto_set_font_size(False)
        table.set_fontsize(7.5)
        table.auto_set_column_width(list(range(len(header))))
        table.scale(1.0, 1.15)
        tall = any("\n" in h for h in header)
        for j in range(len(header)):
            table[0, j].set_text_props(fontweight="bold")
            if tall:
                table[0, j].set_height(table[0, j].get_height() * 1.8)
        more = f" (top {shown} of {k_all} by original output)" if shown < k_all else ""
        tab.set_title(f"probe {p}{more}", fontsize=9)

        # the outputs, side by side --------------------------------------
        bars = fig.add_subplot(grid[r, 1])
        width = 0.8 / len(names)
        xs = np.arange(len(order))
        for j, nm in enumerate(names):
            bars.bar(xs + (j - (len(names) - 1) / 2) * width, cols[nm][p, order], width,
                     label=_short(nm), color=COLUMN_COLOURS[j % len(COLUMN_COLOURS)])
        bars.axhline(0, color="black", linewidth=0.6)
        bars.set_xticks(xs, labels, rotation=45 if shown > 6 else 0, ha="right" if shown > 6 else "center",
                        fontsize=7)
        bars.tick_params(axis="y", labelsize=7)
        bars.set_ylabel("class output (logit)", fontsize=8)
        bars.legend(fontsize=7, loc="best")

        # the error: every comparison of the report, against its own tolerance --
        err = fig.add_subplot(grid[r, 2])
        comps = [c for c in report.comparisons if c.a in cols and c.b in cols]
        width = 0.8 / max(1, len(comps))
        top = 1e-6
        for j, comp in enumerate(comps):
            a, b = cols[comp.a][p], cols[comp.b][p]
            rel = np.abs(a - b) / np.maximum(1.0, np.abs(b))
            colour = COLUMN_COLOURS[(names.index(comp.a) if comp.a in names else j + 1) % len(COLUMN_COLOURS)]
            err.bar(xs + (j - (len(comps) - 1) / 2) * width, np.maximum(rel[order], ERROR_FLOOR), width,
                    color=colour)
            err.axhline(comp.tolerance, color=colour, linestyle="--", linewidth=1,
                        label=f"{_short(comp.a)}: tolerance {comp.tolerance:g}")
            top = max(top, comp.tolerance * 100, float(rel.max()) * 10)
        err.set_yscale("log")
        err.set_ylim(ERROR_FLOOR, top)
        err.set_xticks(xs, labels, rotation=45 if shown > 6 else 0, ha="right" if shown > 6 else "center",
                       fontsize=7)
        err.tick_params(axis="y", labelsize=7)
        err.set_ylabel("relative error", fontsize=8)
        diff = np.abs(got - ref)
        err.set_title(f"max rel {(diff / np.maximum(1.0, np.abs(ref))).max():.1e}, max abs {diff.max():.1e}",
                      fontsize=8)
        err.legend(fontsize=6.5, loc="best")

    verdicts = "; ".join(
        f"{_short(c.a)} vs {_short(c.b)}: max rel {c.max_rel_error:.1e} {'PASS' if c.ok else 'FAIL'}"
        for c in report.comparisons
    )
    head = title or (
        f"Original vs reconstructed model ({report.exactness}, {report.dtype}): "
        f"{'PASS' if report.ok else 'FAIL'}\n{verdicts}"
    )
    fig.suptitle(head, fontsize=10)
    return finish(fig, path, dpi)


def _short(name: str) -> str:
    return name.replace(" (torch)", "")
