"""HTML building blocks: escaped tables, embedded PNG images, the page shell, and the
compact summaries behind ``Reconstruction._repr_html_`` and ``VerificationReport._repr_html_``.

A leaf module: it imports no other reconviz module, so the result classes can call it
(lazily) without an import cycle. :mod:`reconviz.report` builds the full page from it.
Everything here is self-contained: no script, style, font or image from the network.
"""

from __future__ import annotations

import base64
import html
import io
import math
from typing import Any, Iterable, Sequence

import numpy as np

__all__ = ["esc", "num", "png_uri", "img", "table", "facts", "map_png", "image_png", "page",
           "reconstruction_html", "verification_html", "verdict", "Raw", "Short", "as_chw", "result_html", "HtmlRepr"]

DIVERGING, SEQUENTIAL = "RdBu_r", "inferno"  # the colour maps of reconviz.plot

CSS = """
*,*::before,*::after{box-sizing:border-box}
body{font:16px/1.5 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;color:#1b1b1b;background:#fff;
margin:0 auto;max-width:1200px;padding:1rem;overflow-wrap:break-word}
caption{text-align:left;font-size:.85rem;color:#444;padding:.2rem 0}
h1{font-size:1.6rem;margin:.2rem 0 .6rem}h2{font-size:1.3rem;margin-top:2rem;border-bottom:1px solid #ccc}
h3{font-size:1.05rem;margin-top:1.4rem}
img{max-width:100%;height:auto}
img.map{width:100%;image-rendering:pixelated;border:1px solid #ddd}
figure{margin:0}figcaption{font-size:.8rem;color:#444}
.scroll{overflow-x:auto;max-width:100%;margin:.5rem 0}
table{border-collapse:collapse;font-size:.85rem;font-variant-numeric:tabular-nums}
th,td{border:1px solid #ccc;padding:.2rem .45rem;text-align:left;vertical-align:top}
thead th{background:#f2f2f2}
td.n{text-align:right;white-space:nowrap}
.pass{color:#0a6b22;font-weight:600}.fail{color:#b00020;font-weight:600}
.row{display:flex;flex-wrap:wrap;gap:0 2rem;align-items:flex-start}.row>div{min-width:0;flex:1 1 300px}.row>.scroll{flex:0 1 auto}
.maps{display:grid;grid-template-columns:repeat(auto-fill,minmax(110px,1fr));gap:.6rem;max-width:760px}
th button{font:inherit;border:0;background:none;padding:0;cursor:pointer;text-align:left}
code{overflow-wrap:anywhere}
code,pre{font-family:ui-monospace,Menlo,Consolas,monospace;font-size:.85rem}
pre{white-space:pre-wrap;background:#f6f6f6;padding:.5rem}
"""

# progressive enhancement: header buttons that sort a table.sortable by that column
SORT_SCRIPT = """
document.querySelectorAll("table.sortable").forEach(function (t) {
  t.querySelectorAll("thead th").forEach(function (th, col) {
    var b = document.createElement("button"); b.type = "button"; b.textContent = th.textContent;
    th.textContent = ""; th.appendChild(b);
    b.addEventListener("click", function () {
      var up = th.getAttribute("aria-sort") !== "ascending", body = t.tBodies[0];
      t.querySelectorAll("thead th").forEach(function (h) { h.removeAttribute("aria-sort"); });
      th.setAttribute("aria-sort", up ? "ascending" : "descending");
      var key = function (r) { var c = r.children[col], v = parseFloat(c.dataset.value || c.textContent);
                               return isNaN(v) ? c.textContent : v; };
      Array.from(body.rows).sort(function (a, b) {
        var x = key(a), y = key(b), s = x < y ? -1 : x > y ? 1 : 0; return up ? s : -s;
      }).forEach(function (r) { body.appendChild(r); });
    });
  });
});
"""

THUMB = "width:96px;image-rendering:pixelated;border:1px solid #ddd"  # inline: notebooks have no page CSS

# nothing may be loaded from anywhere but the page itself
CSP = ("default-src 'none'; img-src data:; style-src 'unsafe-inline'; script-src 'unsafe-inline'; "
       "base-uri 'none'; form-action 'none'")


def esc(text: Any) -> str:
    return html.escape(str(text), quote=True)


def num(v: Any) -> str:
    """A float as the shortest text that reads back as the same float (``repr``)."""
    v = float(v)
    return repr(v) if math.isfinite(v) else ("inf" if v > 0 else "-inf" if v < 0 else "nan")


def verdict(ok: bool | None) -> str:
    if ok is None:
        return '<span>skipped</span>'
    return '<span class="pass">PASS</span>' if ok else '<span class="fail">FAIL</span>'


def png_uri(data: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(data).decode("ascii")


def img(uri: str, alt: str, cls: str | None = None, style: str | None = None) -> str:
    c = f' class="{esc(cls)}"' if cls else ""
    st = f' style="{esc(style)}"' if style else ""
    return f'<img src="{uri}" alt="{esc(alt)}"{c}{st}>'


class Raw(str):
    """Cell content that is already HTML (not escaped again)."""


class Short(float):
    """A float shown with 4 significant digits; the exact value is the cell's ``data-value``."""


def _cell(v: Any, key: str | None = None) -> str:
    data = f' data-col="{esc(key)}"' if key else ""
    if isinstance(v, Short):
        return f'<td class="n"{data} data-value="{num(v)}">{float(v):.4g}</td>'
    if isinstance(v, Raw):
        return f"<td{data}>{v}</td>"
    if isinstance(v, (float, np.floating)):
        return f'<td class="n"{data}>{num(v)}</td>'
    if isinstance(v, (int, np.integer)) and not isinstance(v, bool):
        return f'<td class="n"{data}>{int(v)}</td>'
    return f"<td{data}>{esc(v)}</td>"


def _scroll(label: str, inner: str) -> str:
    """A focusable, horizontally scrollable region: a wide table never widens the page."""
    return f'<div class="scroll" role="region" aria-label="{esc(label)}" tabindex="0">{inner}</div>'


def table(headers: Sequence[str], rows: Iterable[Sequence[Any]], *, caption: str | None = None,
          cls: str = "", keys: Sequence[str] | None = None, label: str | None = None) -> str:
    """A table in a scrollable, focusable wrapper; floats as ``repr`` text, ``Raw`` cells as HTML."""
    keys = list(keys) if keys is not None else [None] * len(headers)
    head = "".join(f'<th scope="col">{esc(h)}</th>' for h in headers)
    body = "".join("<tr>" + "".join(_cell(v, k) for v, k in zip(row, keys)) + "</tr>" for row in rows)
    cap = f"<caption>{esc(caption)}</caption>" if caption else ""
    inner = f'<table class="{esc(cls)}">{cap}<thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>'
    return _scroll(label or caption or "table", inner)


def facts(pairs: Iterable[tuple[str, Any]], caption: str | None = None) -> str:
    """A two-column table of named facts (``th scope="row"``)."""
    rows = "".join(f'<tr><th scope="row">{esc(k)}</th>{_cell(v)}</tr>' for k, v in pairs)
    cap = f"<caption>{esc(caption)}</caption>" if caption else ""
    return _scroll(caption or "facts", f"<table>{cap}<tbody>{rows}</tbody></table>")


# --------------------------------------------------------------------------
# images without a figure: a map through a colour map, straight to PNG
# --------------------------------------------------------------------------


def _png(rgb: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format="PNG", optimize=True)
    return buf.getvalue()


def _limit(a: np.ndarray) -> float:
    m = float(np.nanmax(np.abs(a))) if a.size else 0.0
    return m if m > 0 and math.isfinite(m) else 1.0


def map_png(a: np.ndarray, signed: bool = True) -> bytes:
    """An (H, W) map as a PNG: diverging colours centred at zero, or magnitude (``signed=False``)."""
    from matplotlib import colormaps

    a = np.nan_to_num(np.asarray(a, dtype=np.float64))
    lim = _limit(a)
    scaled = (a / lim + 1) / 2 if signed else np.abs(a) / lim
    rgba = colormaps[DIVERGING if signed else SEQUENTIAL](np.clip(scaled, 0, 1), bytes=True)
    return _png(np.ascontiguousarray(rgba[..., :3]))


def image_png(chw: np.ndarray) -> bytes:
    """A (C, H, W) input as a person sees it: grey (channel mean) or RGB, rescaled to [0, 255]."""
    chw = np.nan_to_num(np.asarray(chw, dtype=np.float64))
    pic = chw.transpose(1, 2, 0) if chw.shape[0] == 3 else chw.mean(0)
    lo, hi = float(pic.min()), float(pic.max())
    pic = np.zeros_like(pic) + 0.5 if hi <= lo else (pic - lo) / (hi - lo)
    return _png(np.ascontiguousarray((pic * 255).round().astype(np.uint8)))


def as_chw(a: np.ndarray) -> np.ndarray:
    """One sample as (C, H, W): (D,) -> (1, 1, D), (H, W) -> (1, H, W); more axes are flattened."""
    a = np.asarray(a, dtype=np.float64)
    if a.ndim == 1:
        return a[None, None, :]
    if a.ndim == 2:
        return a[None]
    return a.reshape(-1, *a.shape[-2:])


# --------------------------------------------------------------------------
# the page
# --------------------------------------------------------------------------


def page(title: str, body: str, lang: str = "en") -> str:
    """A complete HTML document: inline styles, the sort script, a policy forbidding any fetch."""
    return (f'<!DOCTYPE html>\n<html lang="{esc(lang)}"><head><meta charset="utf-8">'
            f'<meta http-equiv="Content-Security-Policy" content="{CSP}">'
            '<meta name="viewport" content="width=device-width, initial-scale=1">'
            f"<title>{esc(title)}</title><style>{CSS}</style></head>"
            f"<body><main>{body}</main><script>{SORT_SCRIPT}</script></body></html>\n")


# --------------------------------------------------------------------------
# rich display in notebooks
# --------------------------------------------------------------------------


def reconstruction_facts(rec: Any) -> list[tuple[str, Any]]:
    m = rec.meta
    gates = m.get("gates") or {}
    return [
        ("probes x classes", f"{rec.n_probes} x {rec.n_classes}"),
        ("sample shape", str(rec.sample_shape)),
        ("dtype", str(rec.weight.dtype).replace("torch.", "")),
        ("method", f"{m.get('method')}" + (f" ({m['basis']} basis)" if m.get("basis") else "")),
        ("exactness", rec.exactness),
        ("max relative error", Short(m.get("max_rel_error", float("nan")))),
        ("tolerance", Short(rec.tolerance)),
        ("gates frozen", ", ".join(f"{k}: {v}" for k, v in gates.items()) or "none"),
        ("ties", int(m.get("ties", 0) or 0)),
    ]


def reconstruction_html(rec: Any) -> str:
    """Key facts and the template W_c of the first probe's top class (a small image)."""
    k = int(rec.predicted[0])
    c = int(rec.classes[k])
    w = as_chw(rec.weight[0, k].detach().cpu().double().numpy())
    picture = img(png_uri(map_png(w.sum(0))), f"template W_c of class {c} at probe 0 (red positive, blue negative)",
                  style=THUMB)
    return (f'<div class="rv-summary"><strong>Reconstruction</strong> f(x) = W x + b{facts(reconstruction_facts(rec))}'
            f"<figure>{picture}<figcaption>template of class {c}, probe 0</figcaption></figure></div>")


def comparison_rows(report: Any) -> list[list[Any]]:
    return [[f"{c.a} vs {c.b}", float(c.max_abs_error), float(c.max_rel_error), float(c.tolerance), Raw(verdict(c.ok))]
            for c in report.comparisons]


COMPARISON_HEADERS = ("comparison", "max abs error", "max rel error", "tolerance", "verdict")


def verification_html(report: Any) -> str:
    """The verdict, every comparison, W vs the Jacobian, the radius and the self-checks."""
    pairs: list[tuple[str, Any]] = [("verdict", Raw(verdict(report.ok))), ("exactness", report.exactness),
                                    ("dtype", report.dtype)]
    if report.jacobian_max_error is not None:
        pairs.append(("W vs autograd Jacobian", f"{report.jacobian_max_error:.3e} "
                                                f"(tolerance {report.jacobian_tolerance:.3g})"))
    if report.radius is not None:
        pairs.append(("certified radius (min over probes)", f"L2 {float(report.radius.l2.min()):.4g}, "
                                                            f"Linf {float(report.radius.linf.min()):.4g}"))
    pairs += [(f"self-check: {c.name}", Raw(verdict(c.passed))) for c in report.self_checks]
    return (f'<div class="rv-summary"><strong>VerificationReport</strong>{facts(pairs)}'
            f"{table(COMPARISON_HEADERS, comparison_rows(report), label='comparisons')}</div>")


# --------------------------------------------------------------------------
# the other result objects: a dataclass's fields as a table
# --------------------------------------------------------------------------

SHOWN_VALUES = 8  # a tensor of at most this many values is shown in full, a larger one summarised


def field_text(v: Any) -> Any:
    """A field's cell: small tensors and arrays in full, larger ones as shape, dtype, min, mean, max."""
    if hasattr(v, "detach"):  # a torch tensor, without importing torch here
        v = v.detach().cpu().numpy()
    if isinstance(v, np.ndarray):
        if v.size <= SHOWN_VALUES:
            return np.array2string(v, separator=", ", formatter={"float_kind": lambda t: f"{t:.6g}"})
        f = v.astype(np.float64)
        return (f"shape {tuple(v.shape)}, {v.dtype}: min {np.nanmin(f):.4g}, mean {np.nanmean(f):.4g}, "
                f"max {np.nanmax(f):.4g}")
    if isinstance(v, (list, tuple)) and len(v) > SHOWN_VALUES:
        return f"{type(v).__name__} of {len(v)}: {', '.join(map(str, v[:SHOWN_VALUES]))}, ..."
    return "None" if v is None else v


def result_html(obj: Any) -> str:
    """A dataclass result (Radius, Curve, OcclusionResult, ...) as a summary table of its fields,
    headed by its class name and the first line of its docstring."""
    import dataclasses

    doc = (type(obj).__doc__ or "").strip().splitlines()
    pairs = [(f.name, field_text(getattr(obj, f.name))) for f in dataclasses.fields(obj)]
    return (f'<div class="rv-summary"><strong>{esc(type(obj).__name__)}</strong> {esc(doc[0] if doc else "")}'
            f"{facts(pairs, caption=type(obj).__name__ + ' fields')}</div>")


class HtmlRepr:
    """Mixin for the result dataclasses: notebooks show them as a table of their fields."""

    def _repr_html_(self) -> str:
        return result_html(self)
