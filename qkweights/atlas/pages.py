"""The atlas's HTML pages, as plain Python string templates.

Every page is complete without JavaScript (tables, grid, images and links are in the HTML); the
shipped ``atlas.js`` (a classic script) adds sorting, filtering, statistic switching, lazy image
loading and keyboard navigation. Data a page shows is also embedded as inline JSON
(``<script type="application/json">``), never fetched.
"""

from __future__ import annotations

import json
import math
from html import escape

import numpy as np

from qkweights.atlas.colours import colour, gradient, ink
from qkweights.atlas.stats import COLUMNS
from qkweights.version import __version__

PAGE = """<!DOCTYPE html>
<html lang="en" class="nojs">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<meta name="generator" content="qkweights {version} report">
<title>{title}</title>
<link rel="stylesheet" href="{root}assets/atlas.css">
{head}</head>
<body>
<nav class="crumbs" aria-label="breadcrumbs">{crumbs}</nav>
<main>
{body}
</main>
<footer>qkweights {version} · static atlas, opened from disk · <a href="{root}index.html">all models</a></footer>
<script src="{root}assets/atlas.js"></script>
</body>
</html>
"""


def page(title: str, body: str, *, root: str, crumbs: str = "", head: str = "") -> str:
    return PAGE.format(title=escape(title), body=body, root=root, crumbs=crumbs, head=head, version=escape(__version__))


def fmt(x, digits: int = 3) -> str:
    """A number for a table cell; "—" for NaN/None."""
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "—"
    if isinstance(x, (int, np.integer)):
        return str(int(x))
    return f"{float(x):.{digits}f}"


def sortkey(x) -> str:
    return "" if x is None or not math.isfinite(float(x)) else repr(float(x))


def json_block(id_: str, data) -> str:
    text = json.dumps(data, allow_nan=False, separators=(",", ":"), default=_plain).replace("</", "<\\/")
    return f'<script type="application/json" id="{id_}">{text}</script>'


def _plain(x):
    if isinstance(x, (np.floating, np.integer)):
        return x.item()
    raise TypeError(type(x).__name__)


def head_name(layer: int, head: int) -> str:
    return f"L{layer:02d}_H{head:02d}"


def finite(x):
    """JSON-safe number: None for NaN."""
    x = float(x)
    return x if math.isfinite(x) else None


# ----------------------------------------------------------------------------- index


def index_page(models, stats, compare_figs, skipped) -> str:
    rows = []
    for m in models:
        kinds = [k for k in ("profile", "top_images", "o3", "same_object") if getattr(m, k) is not None]
        dims = f"{m.layers} layers × {m.heads} heads, D = {m.model.get('hidden', '?')}"
        if m.model.get("head_dim"):
            dims += f", K = {m.model['head_dim']}"
        full = str(m.source.get("model_id") or "")
        rows.append(
            f'<tr><td><a href="{m.slug}/index.html" title="{escape(full)}">{escape(m.name)}</a></td>'
            f"<td>{escape(m.model.get('family', '?'))}"
            f"</td><td>{escape(dims)}</td><td><code>{escape(m.identity)}</code></td>"
            f"<td>{escape(', '.join(k.replace('_', '-') for k in kinds))}</td></tr>"
        )
    models_table = (
        '<table class="models"><caption>Models</caption><thead><tr><th scope="col">model</th>'
        '<th scope="col">family</th><th scope="col">dimensions</th><th scope="col">weights</th>'
        '<th scope="col">results</th></tr></thead><tbody>' + "".join(rows) + "</tbody></table>"
    )
    figs = "".join(
        f'<figure><img src="{src}" alt="{escape(alt)}" width="600"><figcaption>{escape(alt)}</figcaption></figure>'
        for src, alt in compare_figs
    )
    curves = f'<section><h2>Layer curves</h2><div class="figs">{figs}</div></section>' if figs else ""
    table, data = heads_table(models, stats)
    body = (
        f"<h1>Attention-head atlas</h1><p class='lede'>{len(models)} model(s), "
        f"{sum(m.layers * m.heads for m in models)} heads. Query-key modes of every head: σ-weighted cosine of the "
        "SVD of W<sub>q</sub><sup>T</sup>W<sub>k</sub>, top images, O3 and same-object results where they ran.</p>"
        f"{models_table}{curves}{table}{skipped_list(skipped)}{json_block('heads-data', data)}"
    )
    return page("qkweights atlas", body, root="", crumbs="<span>atlas</span>")


def heads_table(models, stats) -> tuple[str, dict]:
    cols = COLUMNS  # all of them, "—" where no result holds the statistic: what is missing is said, not hidden
    head = "".join(
        f'<th scope="col" title="{escape(c.help)}"><button type="button" data-col="{i + 3}">{escape(c.title)}'
        "</button></th>"
        for i, c in enumerate(cols)
    )
    body, data = [], {"columns": ["model", "layer", "head", *[c.key for c in cols]], "rows": []}
    for m in models:
        s = stats[m.key]
        for layer in range(m.layers):
            for h in range(m.heads):
                vals = [s[c.key][layer, h] for c in cols]
                cells = "".join(f'<td data-v="{sortkey(v)}">{fmt(v, c.digits)}</td>' for v, c in zip(vals, cols))
                link = f"{m.slug}/{head_name(layer, h)}.html"
                body.append(
                    f'<tr><td><a href="{link}">{escape(m.name)}</a></td><td data-v="{layer}">'
                    f'<a href="{link}">L{layer}</a></td><td data-v="{h}"><a href="{link}">H{h}</a></td>{cells}</tr>'
                )
                data["rows"].append([m.name, layer, h, *[finite(v) for v in vals]])
    html = (
        '<section><h2 id="heads-title">Every head</h2>'
        '<p><label for="filter">Filter rows </label><input id="filter" type="search" '
        'placeholder="model, L3, H7, …" aria-controls="heads"> <span id="count" aria-live="polite">'
        f"{len(data['rows'])} heads</span> <span class='hint'>Click a column header to sort.</span></p>"
        '<div class="scroll"><table id="heads" class="sortable" aria-labelledby="heads-title"><thead><tr>'
        '<th scope="col"><button type="button" data-col="0">model</button></th>'
        '<th scope="col"><button type="button" data-col="1">layer</button></th>'
        '<th scope="col"><button type="button" data-col="2">head</button></th>'
        f"{head}</tr></thead><tbody>{''.join(body)}</tbody></table></div></section>"
    )
    return html, data


def skipped_list(skipped) -> str:
    if not skipped:
        return ""
    items = "".join(f"<li><code>{escape(str(p))}</code>: {escape(why)}</li>" for p, why in skipped)
    return f'<section><h2>Not included</h2><ul class="skipped">{items}</ul></section>'


# ----------------------------------------------------------------------------- model page


def model_page(m, stats, centres, figures) -> str:
    s = stats[m.key]
    cols = [c for c in COLUMNS if np.isfinite(s[c.key]).any()]
    if not cols:
        grid = "<p class='missing'>No per-head statistic in the results of this model.</p>"
        legends = select = ""
    else:
        select = (
            '<p><label for="stat">Colour by </label><select id="stat">'
            + "".join(f'<option value="{c.key}">{escape(c.title)} — {escape(c.help)}</option>' for c in cols)
            + "</select></p>"
        )
        grid = _grid(m, s, cols, centres)
        absent = [c.title for c in COLUMNS if c not in cols]
        if absent:
            grid += f"<p class='note'>Not in this model's results: {escape(', '.join(absent))}.</p>"
        legends = "".join(
            _legend(c, *centres[c.key], _scaled(s[c.key], *centres[c.key])[1], hidden=i > 0) for i, c in enumerate(cols)
        )
    figs = "".join(
        f'<figure><img src="{src}" alt="{escape(alt)}" width="560"><figcaption>{escape(alt)}</figcaption></figure>'
        for src, alt in figures
    )
    body = (
        f"<h1>{escape(m.name)}</h1><p class='lede'>{escape(m.model.get('family', '?'))} · {m.layers} layers × "
        f"{m.heads} heads · D = {m.model.get('hidden', '?')} · <code>{escape(m.identity)}</code></p>"
        f"<section><h2>Heads</h2>{select}{legends}{grid}</section>"
        + (f'<section><h2>Figures</h2><div class="figs">{figs}</div></section>' if figs else "")
        + missing_kinds(m)
    )
    crumbs = f'<a href="../index.html">atlas</a> › <span>{escape(m.name)}</span>'
    return page(f"{m.name} — qkweights atlas", body, root="../", crumbs=crumbs)


def _scaled(values: np.ndarray, centre: float, band: float | None) -> tuple[np.ndarray, float]:
    """Values mapped to [-1, 1] around ``centre``, and the half-range r: the largest distance from the centre, but
    never less than the null band, so that a model whose heads all lie inside it stays pale."""
    finite_v = values[np.isfinite(values)]
    r = max(float(np.max(np.abs(finite_v - centre))) if finite_v.size else 0.0, band or 0.0)
    r = r if r > 0 else 1.0
    return (values - centre) / r, r


def _grid(m, s, cols, centres) -> str:
    scaled = {c.key: _scaled(s[c.key], *centres[c.key])[0] for c in cols}  # each in [-1, 1]
    head_cells = "".join(f'<th scope="col">H{h}</th>' for h in range(m.heads))
    rows = []
    for layer in range(m.layers):
        cells = []
        for h in range(m.heads):
            attrs, first = [], None
            for c in cols:
                v, t = s[c.key][layer, h], scaled[c.key][layer, h]
                centre, band = centres[c.key]
                bg = colour(float(t))
                null = band is not None and np.isfinite(v) and abs(v - centre) < band
                attrs.append(f'data-{c.key}="{bg}|{ink(bg)}|{fmt(v, c.digits)}|{int(null)}"')
                first = first or (bg, ink(bg), fmt(v, c.digits), null)
            bg, fg, text, null = first
            label = f"layer {layer} head {h}: {cols[0].title} {text}"
            cells.append(
                f'<td><a href="{head_name(layer, h)}.html" class="cell{" null" if null else ""}" '
                f'style="background:{bg};color:{fg}" aria-label="{escape(label)}" {" ".join(attrs)}>{text}</a></td>'
            )
        rows.append(f'<tr><th scope="row">L{layer}</th>{"".join(cells)}</tr>')
    return (
        f'<div class="scroll"><table class="grid" id="grid"><thead><tr><th></th>{head_cells}</tr></thead>'
        f"<tbody>{''.join(rows)}</tbody></table></div>"
    )


def _legend(c, centre: float, band, r: float, *, hidden: bool) -> str:
    mark = ""
    if band is not None:
        w = min(band / r, 1.0) * 50
        mark = f'<span class="band" style="left:{50 - w:.2f}%;width:{2 * w:.2f}%" title="null band"></span>'
        note = f" Dotted cells and the bracket on the bar: inside the null band ±{band:.3f} (95%, random unit vectors)."
    else:
        note = ""
    return (
        f'<div class="legend" data-for="{c.key}"{" hidden" if hidden else ""}><div class="bar" style="background:'
        f'{gradient()}">{mark}</div><div class="ticks"><span>{centre - r:.3f}</span><span>{centre:.3f}</span>'
        f"<span>{centre + r:.3f}</span></div><p class='note'>{escape(c.help)}. Centre {centre:.3f}: a head without "
        f"structure; the colour reaches its ends at the largest distance from it in this model (at least the null "
        f"band).{note}</p></div>"
    )


def missing_kinds(m) -> str:
    missing = [k.replace("_", "-") for k in ("profile", "top_images", "o3", "same_object") if getattr(m, k) is None]
    if not missing:
        return ""
    return f"<p class='missing'>Not found for this model: {escape(', '.join(missing))}.</p>"
