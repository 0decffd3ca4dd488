"""One head's page of the atlas: its modes, top images with query/key maps, same-object examples, O3."""

from __future__ import annotations

from html import escape
from pathlib import Path

import numpy as np

from qkweights.analyses.top_images import SIGNS
from qkweights.atlas.images import encode, map_sprite
from qkweights.atlas.pages import finite, fmt, head_name, json_block, page
from qkweights.atlas.stats import COLUMNS, o3_head

SIGN_WORDS = {"+": "positive side (s = +1)", "-": "negative side (s = −1)"}


def head_page(m, layer: int, head: int, stats, renderer, top: int) -> str:
    """The HTML of head (layer, head) of model ``m`` (images registered with ``renderer``)."""
    data: dict = {"model": m.name, "layer": layer, "head": head}
    renderer.page_style.clear()
    s = stats[m.key]
    data["stats"] = {c.key: finite(s[c.key][layer, head]) for c in COLUMNS}
    summary = "".join(
        f'<div><dt title="{escape(c.help)}">{escape(c.title)}</dt><dd>{fmt(s[c.key][layer, head], c.digits)}</dd></div>'
        for c in COLUMNS
        if np.isfinite(s[c.key][layer, head])
    )
    top_html, data["top_images"] = _top_images(m, layer, head, renderer, top)
    same_html, data["same_object"] = _same_object(m, layer, head, renderer)
    modes, modes_html = _modes(m, layer, head, shown=set(top_html) | set(same_html))
    data["modes"] = modes
    o3_html, data["o3"] = _o3(m, layer, head)
    mode_ids = sorted({r["mode"] for r in modes} | set(top_html) | set(same_html))
    sections = []
    for n in mode_ids:
        rec = next((r for r in modes if r["mode"] == n), None)
        line = (
            f"σ {fmt(rec['sigma'], 4)} · cos {fmt(rec['cosine'])}"
            + (f" · OV cos {fmt(rec['ov_cosine'])}" if rec.get("ov_cosine") is not None else "")
            if rec
            else ""
        )
        if n not in top_html and n not in same_html:
            continue
        sections.append(
            f'<section id="m{n}" class="mode"><h3><a href="#m{n}">mode {n}</a> <small>{line}</small></h3>'
            f"{top_html.get(n, '')}{same_html.get(n, '')}</section>"
        )
    if not sections:
        sections.append(f"<p class='missing'>{escape(_why_no_images(m, layer, head))}</p>")
    nav = _nav(m, layer, head)
    body = (
        f"{nav}<h1>{escape(m.name)} · layer {layer}, head {head}</h1>"
        f"<dl class='summary'>{summary or '<div><dt>statistics</dt><dd>none in the results</dd></div>'}</dl>"
        f"<section><h2>Images per mode</h2>{_caption(m, renderer)}{''.join(sections)}</section>{o3_html}"
        f"<section><h2>All modes of W<sub>q</sub><sup>T</sup>W<sub>k</sub></h2>{modes_html}</section>"
        f"{json_block('head-data', data)}"
    )
    crumbs = (
        f'<a href="../index.html">atlas</a> › <a href="index.html">{escape(m.name)}</a> › <span>L{layer} H{head}</span>'
    )
    style = f"<style>{''.join(renderer.page_style)}</style>\n" if renderer.page_style else ""
    return page(f"L{layer} H{head} — {m.name}", body, root="../", crumbs=crumbs, head=style)


def _nav(m, layer: int, head: int) -> str:
    def link(l: int, h: int, text: str, rel: str, key: str) -> str:
        if not (0 <= l < m.layers and 0 <= h < m.heads):
            return f'<span class="off">{text}</span>'
        return f'<a href="{head_name(l, h)}.html" rel="{rel}" id="{key}" title="key: {key}">{text}</a>'

    flat = layer * m.heads + head
    prev_l, prev_h = divmod(flat - 1, m.heads) if flat > 0 else (-1, -1)
    next_l, next_h = divmod(flat + 1, m.heads)
    return (
        '<nav class="heads" aria-label="other heads">'
        + link(prev_l, prev_h, "← previous head", "prev", "prev-head")
        + link(next_l, next_h, "next head →", "next", "next-head")
        + link(layer - 1, head, "↑ layer above", "up", "prev-layer")
        + link(layer + 1, head, "↓ layer below", "down", "next-layer")
        + '<a href="index.html">grid</a><span class="hint">keys ← → ↑ ↓</span></nav>'
    )


def _modes(m, layer: int, head: int, shown: set[int]) -> tuple[list[dict], str]:
    """The modes table (rows of modes without an image section carry their ``#m<n>`` anchor) and its data."""
    p = m.profile
    if p is None:
        return [], "<p class='missing'>No profile of this model: σ, cosines and value-output modes are not known.</p>"
    sv, cos = p.singular_values[layer, head], p.cosines[layer, head]
    blocks = p.degenerate[layer][head]
    ov = p.ov
    recs, rows = [], []
    for n in range(len(sv)):
        block = next((b for b in blocks if b["start"] <= n < b["stop"]), None)
        rec = {
            "mode": n,
            "sigma": finite(sv[n]),
            "cosine": finite(cos[n]),
            "degenerate": None if block is None else [block["start"], block["stop"]],
            "ov_sigma": None if ov is None else finite(ov.singular_values[layer, head, n]),
            "ov_cosine": None if ov is None else finite(ov.cosines[layer, head, n]),
        }
        recs.append(rec)
        deg = "—" if block is None else f"{block['start']}–{block['stop'] - 1}"
        bar = _bar(rec["cosine"])
        anchor = "" if n in shown else f' id="m{n}"'
        rows.append(
            f'<tr{anchor}><th scope="row"><a href="#m{n}">{n}</a></th><td>{fmt(rec["sigma"], 4)}</td><td>{bar}'
            f"{fmt(rec['cosine'])}</td><td>{deg}</td><td>{fmt(rec['ov_sigma'], 4)}</td>"
            f"<td>{_bar(rec['ov_cosine'])}{fmt(rec['ov_cosine'])}</td></tr>"
        )
    note = "" if ov is not None else "<p class='missing'>The profile holds no value-output circuit.</p>"
    return recs, (
        '<div class="scroll"><table class="modes"><thead><tr><th scope="col">mode n</th><th scope="col">σ_n</th>'
        '<th scope="col">cos u_n·v_n</th><th scope="col">degenerate block</th><th scope="col">OV λ_n</th>'
        f'<th scope="col">OV cos p_n·r_n</th></tr></thead><tbody>{"".join(rows)}</tbody></table></div>{note}'
    )


def _bar(x) -> str:
    if x is None:
        return ""
    w = min(abs(x), 1) * 50
    side = "left:50%" if x >= 0 else f"left:{50 - w:.1f}%"
    return f'<span class="cbar" aria-hidden="true"><span style="{side};width:{w:.1f}%"></span></span>'


def _caption(m, renderer) -> str:
    if m.top_images is None and m.same_object is None:
        return ""
    shown = "Source images left out: maps over black. " if not renderer.thumbs else ""
    return (
        f"<p class='note'>{shown}Image preprocessing: {escape(renderer.origin)}.</p>"
        "<p class='note'>Each image: the part of the model input the patch grid covers, in grey; red = query map "
        "x·u, cyan = key map x·v, white = both (positive side of the shown sign, ÷ its 99th percentile, one block "
        "per patch). Same-object examples: query object outlined red, key object cyan.</p>"
    )


def _why_no_images(m, layer: int, head: int) -> str:
    if m.top_images is None and m.same_object is None:
        return "No top-images or same-object result for this model."
    return f"Top-images and same-object did not analyse layer {layer}, head {head}."


def _top_images(m, layer: int, head: int, renderer, top: int) -> tuple[dict[int, str], dict | None]:
    r = m.top_images
    if r is None:
        return {}, None
    doc, opts = r.doc, r.doc["options"]
    if layer not in opts["layers"] or head not in opts["heads"]:
        return {}, None
    li, hi = opts["layers"].index(layer), opts["heads"].index(head)
    n_modes = len(opts["modes"])
    maps = r.maps[li, hi * n_modes : (hi + 1) * n_modes]  # (N, 2, K, 2, gh, gw)
    k = min(top, maps.shape[2])
    grid = maps.shape[-2:]
    sprite = renderer.assets.add(encode(map_sprite(maps, k), "WEBP_LOSSLESS"), "maps", "webp")
    root = Path(doc["image_dir"])
    size = tuple(opts.get("input_size") or ())
    entry = next(e for e in doc["heads"] if (e["layer"], e["head"]) == (layer, head))
    w, h = renderer.tile_shape(grid)
    rows_n, out, data = n_modes * 2, {}, {"image_dir": str(root), "modes": []}
    renderer.page_style.append(
        f".ov.t{{background-image:url(../{sprite});background-size:{k * 100}% {rows_n * 100}%;"
        f"width:{w}px;height:{h}px}}"
    )
    for ni, mode in enumerate(entry["modes"]):
        blocks, dm = [], {"mode": mode["mode"], "signs": {}}
        for si, sign in enumerate(SIGNS):
            tiles = []
            winners = mode["signs"][sign][:k]
            dm["signs"][sign] = [{"path": w_["path"], "score": w_["score"]} for w_ in winners]
            for j, win in enumerate(winners):
                thumb = renderer.thumb(root / win["path"], size, grid)
                x = j / (k - 1) * 100 if k > 1 else 0
                y = (2 * ni + si) / (rows_n - 1) * 100
                tiles.append(_tile(thumb, x, y, win, mode["mode"], sign, j))
            if not tiles:
                tiles.append("<p class='missing'>no image scored on this side</p>")
            blocks.append(
                f"<div class='sign'><h4>{escape(SIGN_WORDS[sign])}</h4><div class='tiles'>{''.join(tiles)}</div></div>"
            )
        out[mode["mode"]] = f"<div class='top'>{''.join(blocks)}</div>"
        data["modes"].append(dm)
    return out, data


def lazy_img(src: str, alt: str, cls: str) -> str:
    """An image that the script loads when it nears the viewport, with a plain copy for readers without JavaScript
    (``loading="lazy"`` is not honoured on file://)."""
    a = escape(alt)
    return (
        f'<img class="{cls} lazy" data-src="../{src}" alt="{a}">'
        f'<noscript><img class="{cls}" src="../{src}" alt="{a}"></noscript>'
    )


def _tile(thumb, x: float, y: float, win: dict, mode: int, sign: str, rank: int) -> str:
    alt = f"{win['path']}: top {rank + 1} image of mode {mode}, sign {sign}, score {win['score']:.3g}"
    img = lazy_img(thumb, alt, "th") if thumb else ""
    label = "" if thumb else f' role="img" aria-label="{escape(alt)} (maps only)"'
    return (
        f'<figure class="tile"><div class="ov t"{label}>{img}'
        f'<span class="mp" style="background-position:{x:.4f}% {y:.4f}%;"></span></div>'
        f"<figcaption title='{escape(win['path'])}'>{win['score']:.3g}</figcaption></figure>"
    )


def _same_object(m, layer: int, head: int, renderer) -> tuple[dict[int, str], dict | None]:
    r = m.same_object
    if r is None:
        return {}, None
    doc = r.doc
    entry = next((hd for e in doc["layers"] if e["layer"] == layer for hd in e["heads"] if hd["head"] == head), None)
    if entry is None:
        return {}, None
    root, grid = Path(doc["dataset"]["root"]), tuple(doc["model"]["grid"])
    size = tuple(doc["options"].get("input_size") or ())
    out, data = {}, {"probability": entry.get("probability"), "modes": []}
    w, h = renderer.tile_shape(grid)
    renderer.page_style.append(f".ov.ex{{width:{w}px;height:{h}px}}")
    for md in entry["modes"]:
        n = md["mode"]
        picked = [x for x in r.rows if (x["layer"], x["head"], x["mode"]) == (layer, head, n)]
        tiles = []
        for x in picked:
            ex = renderer.example(root, x["image"], size, grid, x["query_object"], x["key_object"])
            verdict = "same object" if x["same"] else "different objects"
            if ex is None:
                tiles.append(f"<figure class='tile'><figcaption>{escape(x['image'])}: unreadable</figcaption></figure>")
                continue
            alt = f"{x['image']}: {verdict} (query object outlined red, key object cyan)"
            thumb = lazy_img(ex[0], "", "th") if ex[0] else ""
            tiles.append(
                f'<figure class="tile"><div class="ov ex">{thumb}'
                f"{lazy_img(ex[1], alt, 'ol')}</div>"
                f"<figcaption>{verdict}</figcaption></figure>"
            )
        data["modes"].append({"mode": n, "probability": md.get("probability"), "n_images": md.get("n_images")})
        out[n] = (
            f"<div class='same'><h4>same object: P = {fmt(md.get('probability'), 2)} over "
            f"{md.get('n_images', '?')} images</h4><div class='tiles'>{''.join(tiles)}</div></div>"
        )
    return out, data


def _o3(m, layer: int, head: int) -> tuple[str, dict | None]:
    alloc = o3_head(m, layer, head)
    if alloc is None:
        return "<section><h2>O3 allocation</h2><p class='missing'>No O3 result for this model.</p></section>", None
    uni = m.o3.doc["uniform"]
    rows = "".join(
        f'<tr><th scope="row">from the {tok} token</th>'
        + "".join(f"<td>{fmt(v[k])}</td>" for k in ("same", "different", "background"))
        + "</tr>"
        for tok, v in alloc.items()
    )
    uniform = "".join(f"<td>{fmt(uni[k])}</td>" for k in ("same", "different", "background"))
    html = (
        "<section><h2>O3 allocation</h2><table class='o3'><thead><tr><th></th><th scope='col'>same object</th>"
        "<th scope='col'>other object</th><th scope='col'>background</th></tr></thead><tbody>"
        f"{rows}<tr class='ref'><th scope='row'>uniform attention</th>{uniform}</tr></tbody></table>"
        f"<p class='note'>Mean over {m.o3.values.shape[0]} images of this head's attention shares.</p></section>"
    )
    return html, {t: {k: finite(v) for k, v in d.items()} for t, d in alloc.items()}
