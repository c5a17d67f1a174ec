"""Rich display of the other result objects: each dataclass result shows its fields as a
table in notebooks (``_repr_html_``), small tensors in full, larger ones summarised."""

from __future__ import annotations

import dataclasses
from html.parser import HTMLParser

import pytest
import torch
import torch.nn as nn

import reconviz as rv
import reconviz.metrics as metrics
import reconviz.saliency as sal


class _Rows(HTMLParser):
    """(row header, cell text) pairs of every table row, and the alt-less images."""

    def __init__(self):
        super().__init__()
        self.rows: list[list[str]] = []
        self._cell: list[str] | None = None

    def handle_starttag(self, tag, attrs):
        if tag == "tr":
            self.rows.append([])
        elif tag in ("th", "td"):
            self._cell = []

    def handle_endtag(self, tag):
        if tag in ("th", "td") and self._cell is not None:
            self.rows[-1].append("".join(self._cell).strip())
            self._cell = None

    def handle_data(self, data):
        if self._cell is not None:
            self._cell.append(data)


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 3, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
                         nn.Linear(48, 4)).eval()


def _results():
    model, x = _net(), torch.rand(2, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    grad = sal.gradient(model, x, 1)
    rec = rv.reconstruct(model, x)
    return {
        "Radius": rv.certified_radius(model, x),
        "SelfCheck": rec.self_checks[0],
        "OcclusionResult": sal.occlusion(model, x, 1, window=4, full=True),
        "ReceptiveField": next(iter(sal.receptive_fields(model, x).values())),
        "Curve": metrics.deletion_curve(model, x, grad.abs(), 1, steps=4),
        "PredictionDifference": metrics.prediction_difference(model, x, grad.abs(), 1, patch=4),
    }


RESULTS = _results()


@pytest.mark.parametrize("name", list(RESULTS))
def test_every_result_shows_its_fields_as_a_table(name):
    obj = RESULTS[name]
    page = obj._repr_html_()
    parser = _Rows()
    parser.feed(page)
    table = {row[0]: row[1] for row in parser.rows if len(row) == 2}
    fields = [f.name for f in dataclasses.fields(obj)]
    assert f"<strong>{name}</strong>" in page and list(table) == fields
    for f in fields:
        value = getattr(obj, f)
        if isinstance(value, torch.Tensor) and value.numel() > 8:
            assert table[f].startswith(f"shape {tuple(value.shape)}")
            assert f"max {float(value.double().max()):.4g}" in table[f]
        elif isinstance(value, torch.Tensor):
            shown = [float(t) for t in table[f].strip("[]").replace("\n", " ").replace("[", "").replace("]", "")
                     .split(",") if t.strip()]
            assert shown == pytest.approx(value.double().flatten().tolist(), rel=1e-5, abs=1e-12)


def test_the_summary_escapes_text_and_keeps_the_page_inert():
    check = dataclasses.replace(RESULTS["SelfCheck"], detail="<script>alert(1)</script>")
    page = check._repr_html_()
    assert "<script>" not in page and "&lt;script&gt;" in page
