"""The HTML report (rv.report, `reconviz report`, the demo's report.html), rich display in
notebooks, the example notebook, and the page itself rendered in a real browser."""

from __future__ import annotations

import json
import os
import re
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
import torch

import reconviz as rv
from reconviz.cli import main
from reconviz.report import Page, write

ROOT = Path(__file__).resolve().parents[2]
CHROMIUM = Path("/usr/bin/chromium")
INSTALL = "install it with 'apt-get install -y chromium' (Debian) and 'pip install playwright' (never 'playwright install')"


@pytest.fixture(scope="module")
def digits():
    model, data = rv.models.digits()
    return model, list(data.class_names), torch.as_tensor(data.x_test[:2], dtype=torch.float64)


@pytest.fixture(scope="module")
def made(digits, tmp_path_factory):
    """A report of two digits, the verification it shows, and the model's state before and after."""
    from conftest import snapshot

    model, names, x = digits
    before = snapshot(model)
    path = tmp_path_factory.mktemp("report") / "report.html"
    rec = rv.reconstruct(model, x)
    verification = rv.verify(model, rec, class_names=names)
    assert rv.report(model, x, path, class_names=names, rec=rec, verification=verification) == path
    return {"path": path, "html": path.read_text(encoding="utf-8"), "verification": verification,
            "untouched": snapshot(model) == before}


class Outline(HTMLParser):
    """Headings, images, table headers and the <html> attributes of a page."""

    def __init__(self):
        super().__init__()
        self.headings, self.imgs, self.ths, self.html_attrs = [], [], [], {}

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if re.fullmatch(r"h[1-6]", tag):
            self.headings.append(int(tag[1]))
        elif tag == "img":
            self.imgs.append(a)
        elif tag == "th":
            self.ths.append(a)
        elif tag == "html":
            self.html_attrs = a


def outline(text: str) -> Outline:
    o = Outline()
    o.feed(text)
    return o


# ---------------------------------------------------------------------------
# the page's content, as written
# ---------------------------------------------------------------------------


def test_report_states_the_facts(made, digits):
    model, _, _ = digits
    text = made["html"]
    for fact in ("reconviz.models.digits.DigitsCNN", f"{sum(p.numel() for p in model.parameters()):,}",
                 "2 probe(s) x (1, 8, 8)", "relu: 3, max_pool: 2", "region-exact", "max_pool2d", "features.3",
                 "certified radius per probe", "self-checks", "frozen values per gated call", "nonzero", "affinity", "Gradient x Input", "guided backprop",
                 "deconvnet", "occlusion", "deletion AUC", "insertion AUC", "prediction difference",
                 "<code>rv.report(...)</code>", rv.__version__, torch.__version__, "onnxruntime", "date (UTC)"):
        assert fact in text, fact
    assert "PASS" in text and "FAIL" not in text
    assert made["untouched"], "rv.report changed the user's model"


def test_report_is_self_contained_and_accessible(made):
    text = made["html"]
    o = outline(text)
    assert o.html_attrs.get("lang") == "en"
    assert o.headings.count(1) == 1 and o.headings[0] == 1
    assert all(b - a <= 1 for a, b in zip(o.headings, o.headings[1:])), o.headings  # no level skipped
    assert o.imgs and all(i.get("alt") and i["src"].startswith("data:image/png;base64,") for i in o.imgs)
    assert o.ths and all(th.get("scope") in ("col", "row") for th in o.ths)
    assert "://" not in text and "url(" not in text, "a network URL"  # base64 has no ':'
    assert not re.search(r'(src|href)="(?!data:image/png;base64,|#)', text)
    assert "<link" not in text and "@import" not in text and "<script src" not in text
    assert len(text.encode()) < 3_000_000


def test_write_is_atomic(tmp_path):
    path = tmp_path / "report.html"
    path.write_text("the old report")
    with pytest.raises(UnicodeEncodeError):
        write(Page("<p>\ud800</p>"), path)  # fails while writing
    assert path.read_text() == "the old report"
    assert [p.name for p in tmp_path.iterdir()] == ["report.html"]  # no temporary file left


def test_bad_input_is_a_typed_error_and_the_model_untouched(digits, tmp_path, untouched):
    model, _, x = digits
    cases = [((object(), x, tmp_path / "r.html"), {}, "nn.Module"),
             ((model, x, tmp_path), {}, "is a folder"),
             ((model, x, tmp_path / "r.html"), {"top": 0}, "top"),
             ((model, "not a tensor", tmp_path / "r.html"), {}, None),
             ((model, x[:1], tmp_path / "r.html"), {"rec": "rec"}, "Reconstruction"),
             ((model, x, tmp_path / "r.html"), {"labels": ["a"]}, "labels")]
    for args, kw, needle in cases:
        with untouched(model), pytest.raises(rv.InputError, match=needle):
            rv.report(*args, **kw)
    assert not (tmp_path / "r.html").exists()


def test_rec_must_match_x(digits, made, tmp_path):
    model, _, x = digits
    rec = rv.reconstruct(model, x[:1])
    with pytest.raises(rv.InputError, match="differ"):
        rv.report(model, x[1:2], tmp_path / "r.html", rec=rec)


# ---------------------------------------------------------------------------
# rich display in notebooks, and the example notebook
# ---------------------------------------------------------------------------


def test_repr_html(digits):
    model, names, x = digits
    rec = rv.reconstruct(model, x[:1])
    html = rec._repr_html_()
    o = outline(html)
    assert "region-exact" in html and "relu: 3, max_pool: 2" in html and "1 x 10" in html
    assert len(o.imgs) == 1 and o.imgs[0]["src"].startswith("data:image/png;base64,") and o.imgs[0]["alt"]
    assert len(html) < 20_000
    report = rv.verify(model, rec, class_names=names)
    html = report._repr_html_()
    assert "PASS" in html and "W vs autograd Jacobian" in html and "self-check: affinity" in html
    assert "reconstructed (torch) vs original (torch)" in html and "certified radius" in html
    assert all(th.get("scope") for th in outline(html).ths)


def test_example_notebook_runs(tmp_path, monkeypatch):
    nb = json.loads((ROOT / "examples" / "report.ipynb").read_text())
    assert nb["nbformat"] == 4
    code = [c for c in nb["cells"] if c["cell_type"] == "code"]
    assert code and all(c["outputs"] == [] and c["execution_count"] is None for c in code)  # no outputs stored
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    for i, cell in enumerate(code):
        exec(compile("".join(cell["source"]), f"report.ipynb cell {i}", "exec"), namespace)
    assert (tmp_path / "report.html").stat().st_size > 10_000
    assert "<table>" in namespace["rec"]._repr_html_()


# ---------------------------------------------------------------------------
# the command line
# ---------------------------------------------------------------------------


def test_cli_report(digits, tmp_path, capsys):
    model, _, x = digits
    torch.save(model.state_dict(), tmp_path / "digits.pt")
    np.save(tmp_path / "one.npy", x[:1].numpy())
    arch = f"{type(model).__module__}:{type(model).__qualname__}"
    out = tmp_path / "out" / "r.html"
    argv = ["report", str(tmp_path / "digits.pt"), str(tmp_path / "one.npy"), "--arch", arch, "--out", str(out),
            "--top", "2"]
    assert main(argv) == 0
    text = out.read_text(encoding="utf-8")
    assert "PASS" in capsys.readouterr().out
    assert "reconviz report " in text and "--top 2" in text and "Probe 0" in text
    assert main(["report", str(tmp_path / "digits.pt"), str(tmp_path / "missing.npy"), "--arch", arch]) == 2
    assert "not found" in capsys.readouterr().err


# ---------------------------------------------------------------------------
# the page in a real browser (headless Chromium)
# ---------------------------------------------------------------------------

WIDTHS = (375, 1440)

TABLE1 = """() => Array.from(document.querySelectorAll("table.equivalence")).map(t => ({
    caption: t.caption.textContent,
    rows: Array.from(t.tBodies[0].rows).map(r => Object.fromEntries(
        Array.from(r.cells).map(c => [c.dataset.col, c.textContent])))}))"""

IMAGES = """() => Array.from(document.images).map(i => ({alt: i.alt, complete: i.complete, width: i.naturalWidth}))"""


def missing(what: str) -> None:
    """Skip (locally) or fail (CI sets RECONVIZ_REQUIRE_BROWSER=1: the browser test must run there)."""
    message = f"the browser test needs {what}: {INSTALL}"
    if os.environ.get("RECONVIZ_REQUIRE_BROWSER") == "1":
        pytest.fail(message)
    pytest.skip(message)


@pytest.fixture(scope="module")
def browser():
    if not CHROMIUM.exists():
        missing(f"Chromium at {CHROMIUM}")
    try:
        from playwright import sync_api as sync
    except ImportError:
        missing("the playwright package")
    with sync.sync_playwright() as p:
        b = p.chromium.launch(executable_path=str(CHROMIUM), args=["--no-sandbox"])
        yield b
        b.close()


def open_page(browser, path: Path, width: int, fragment: str = ""):
    """The page at ``width`` px, with every console message, page error and request recorded."""
    page = browser.new_page(viewport={"width": width, "height": 900})
    seen = {"console": [], "errors": [], "requests": []}
    page.on("console", lambda m: seen["console"].append((m.type, m.text)))
    page.on("pageerror", lambda e: seen["errors"].append(str(e)))
    page.on("request", lambda r: seen["requests"].append(r.url))
    page.goto(path.resolve().as_uri() + fragment, wait_until="load")
    return page, seen


def screenshot(browser, path: Path, width: int, out: Path, fragment: str = "") -> None:
    """A screenshot at ``width`` px, of the top or of ``fragment`` (``#probe-0``: docs/report.png)."""
    page, _ = open_page(browser, path, width, fragment)
    page.screenshot(path=str(out))
    page.close()


@pytest.mark.parametrize("width", WIDTHS)
def test_in_the_browser(browser, made, width, tmp_path):
    page, seen = open_page(browser, made["path"], width)
    images = page.evaluate(IMAGES)
    assert len(images) == 1 + 2 * 8 and all(i["complete"] and i["width"] > 0 for i in images), images
    assert all(i["alt"] for i in images)
    assert page.evaluate("document.documentElement.scrollWidth") <= width  # no horizontal overflow
    screenshot(browser, made["path"], width, tmp_path / f"report_{width}.png")
    assert (tmp_path / f"report_{width}.png").stat().st_size > 10_000
    assert not [m for m in seen["console"] if m[0] == "error"] and not seen["errors"], seen
    assert seen["requests"] == [made["path"].resolve().as_uri()], seen["requests"]  # nothing from the network
    page.close()


def test_browser_table_equals_verify(browser, made):
    page, _ = open_page(browser, made["path"], 1440)
    tables = page.evaluate(TABLE1)
    v = made["verification"]
    assert len(tables) == 2
    for n, t in enumerate(tables):
        assert t["caption"] == f"probe {n}"
        expected = [row for row in v.table if row["probe"] == n]
        assert len(t["rows"]) == len(expected) == 10
        for cells, row in zip(t["rows"], expected):
            for col in (*v.columns, "difference"):
                assert float(cells[col]) == row[col], (n, col, cells[col], row[col])
            assert cells["class"] == str(row["class"]) and cells["verdict"] == "PASS"
    page.close()


def test_browser_sorts_the_metrics_table(browser, made):
    page, seen = open_page(browser, made["path"], 1440)
    table = page.locator("table.metrics").first
    column = table.locator("thead th").nth(1)
    column.locator("button").click()
    values = [float(v) for v in table.locator("tbody td[data-col=deletion]").evaluate_all(
        "cells => cells.map(c => c.dataset.value)")]
    assert column.get_attribute("aria-sort") == "ascending" and values == sorted(values)
    column.locator("button").click()
    values = [float(v) for v in table.locator("tbody td[data-col=deletion]").evaluate_all(
        "cells => cells.map(c => c.dataset.value)")]
    assert column.get_attribute("aria-sort") == "descending" and values == sorted(values, reverse=True)
    assert not seen["errors"]
    page.close()
