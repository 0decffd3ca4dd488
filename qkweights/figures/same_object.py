"""The figures of the same-object analysis: ``same_object_by_layer.png`` (paper Fig. 6) and
``same_object_examples.png`` (the selected images with their query and key objects)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from matplotlib.figure import Figure
from PIL import Image

from qkweights.analyses.same_object import SameObjectResult
from qkweights.datasets.ade20k import SegItem, open_segmentation, read_objects
from qkweights.figures import DPI
from qkweights.figures.common import CELL_PX, CHANCE_TICK, depth_axes, draw_band, image_grid, save_png
from qkweights.outputs import model_name, save_figure
from qkweights.vision.preprocess import display_image, open_image

FIGURE_NAME, EXAMPLES_NAME = "same_object_by_layer.png", "same_object_examples.png"
EXAMPLE_ROWS = 6  # rows of the examples figure
QUERY_RGB = (235, 40, 40)  # the query object's outline: red, as the query maps
KEY_RGB = (0, 215, 235)  # the key object's outline: cyan, as the key maps


def same_object_figure(doc: dict, path: str | Path) -> Path:
    """Paper Fig. 6 for one model (:func:`same_object_plot`), as a PNG at ``path``."""
    return save_figure(same_object_plot(doc), path, dpi=DPI)


def same_object_plot(doc: dict) -> Figure:
    """Paper Fig. 6 for one model.

    Against the normalised layer l/(L−1) (layer index on the top axis): each head's
    σ-weighted probability P(l, h) as a small dot (the head spread), the mean over heads
    with a ± s.e.m. band, and the chance level (mean of 1/number of objects over the
    selected images) dashed, with a tick at each layer. Only the analysed layers are drawn.
    """
    entries = doc["layers"]
    n_layers = doc["model"]["layers"]
    depth = np.array([e["depth"] for e in entries], np.float64)
    val = lambda x: np.nan if x is None else float(x)
    mean = np.array([val(e["probability"]) for e in entries])
    sem = np.nan_to_num(np.array([val(e["sem"]) for e in entries]))
    chance = np.array([val(e["chance"]) for e in entries])
    fig = Figure(figsize=(7.5, 4.8), layout="constrained")
    ax = fig.add_subplot()
    hx = [d for e, d in zip(entries, depth) for _ in e["heads"]]
    hy = [val(h["probability"]) for e in entries for h in e["heads"]]
    ax.scatter(hx, hy, s=14, color="0.45", alpha=0.55, lw=0, zorder=2, label="one head: P = Σσ_n p_n / Σσ_n")
    draw_band(ax, depth, mean - sem, mean + sem, color="C0", alpha=0.2, label="± s.e.m. over heads")
    ax.plot(depth, mean, "o-", color="C0", ms=4, lw=1.5, zorder=3, label="mean over heads")
    ax.plot(
        depth, chance, "_--", color="C3", ms=CHANCE_TICK, lw=1.2, label="chance: mean of 1 / (objects in the image)"
    )
    depth_axes(ax, n_layers)
    ax.set_ylim(-0.03, 1.03)
    ax.set_ylabel("P(query and key pick the same object)")
    ax.grid(alpha=0.3, lw=0.5)
    opts, data = doc["options"], doc["dataset"]
    name = model_name(doc)
    ax.set_title(
        f"Same object in the top {opts['top']} images per mode: {name}\n{data['n_eligible']} eligible images, "
        f"{len(opts['heads'])} heads × modes {_ranges(opts['modes'])}",
        fontsize=10,
    )
    ax.legend(fontsize=8, loc="best")
    return fig


def _ranges(values: list[int]) -> str:
    """[0, 1, 2, 5] → "0–2, 5"."""
    out, start = [], None
    for i, v in enumerate(values):
        if start is None:
            start = v
        if i + 1 == len(values) or values[i + 1] != v + 1:
            out.append(f"{start}" if start == v else f"{start}–{v}")
            start = None
    return ", ".join(out)


def _outline(mask: np.ndarray, width: int = 2) -> np.ndarray:
    """The pixels of ``mask`` (h, w) bool within ``width`` pixels of its edge (4-neighbour erosion, repeated)."""
    inner = mask.copy()
    for _ in range(width):
        e = inner.copy()
        e[1:] &= inner[:-1]
        e[:-1] &= inner[1:]
        e[:, 1:] &= inner[:, :-1]
        e[:, :-1] &= inner[:, 1:]
        e[[0, -1], :] = False
        e[:, [0, -1]] = False
        inner = e
    return mask & ~inner


def same_object_cell(image: np.ndarray, query: np.ndarray, key: np.ndarray, width: int = CELL_PX) -> Image.Image:
    """One image of the examples grid: ``width`` pixels wide, the image dimmed a little, the query object tinted
    and outlined red, the key object outlined cyan (inside the red outline when it is the same object).

    image: (h, w, 3) in [0, 1]; query, key: (h, w) bool masks on it.
    """
    h, w = image.shape[:2]
    size = (width, max(1, round(width * h / w)))
    rgb = Image.fromarray(np.round(image * 255).astype(np.uint8)).resize(size, Image.Resampling.LANCZOS)
    qm = np.asarray(Image.fromarray(query.astype(np.uint8) * 255).resize(size, Image.Resampling.NEAREST)) > 0
    km = np.asarray(Image.fromarray(key.astype(np.uint8) * 255).resize(size, Image.Resampling.NEAREST)) > 0
    px = np.asarray(rgb, np.float64) * 0.7 + 0.3 * 40  # dimmed so the outlines stand out
    px[qm] = 0.75 * px[qm] + 0.25 * np.array(QUERY_RGB)
    px[km & ~qm] = 0.8 * px[km & ~qm] + 0.2 * np.array(KEY_RGB)
    qo = _outline(qm, 2)
    ko = _outline(km, 4 if (qm == km).all() else 2)
    if (qm == km).all():
        ko &= ~qo  # the same object: red outside, cyan inside
    px[qo] = QUERY_RGB
    px[ko] = KEY_RGB
    return Image.fromarray(np.clip(np.round(px), 0, 255).astype(np.uint8))


def same_object_examples(title: str, rows: list) -> Image.Image:
    """Rows of selected images with their query and key objects, as one RGB image (:func:`image_grid`).

    rows: [(label, [(image (h, w, 3) in [0, 1], query mask (h, w), key mask (h, w), caption), …]), …];
    each cell is :func:`same_object_cell`, its caption printed in its corner.
    """
    key_text = (
        "red outline (tinted) = query object: largest mean of s·x·u_n over its area; cyan outline = key object: "
        "largest mean of s·x·v_n; both (red outside, cyan inside) = the same object; s = the image's sign"
    )
    return image_grid(
        title, key_text, [(label, [(same_object_cell(im, q, k), cap) for im, q, k, cap in row]) for label, row in rows]
    )


def example_picks(doc: dict, n_rows: int = EXAMPLE_ROWS) -> list[tuple[int, int, int]]:
    """(layer, head, mode) of the examples figure: the first analysed head's first analysed mode, in up to
    ``n_rows`` analysed layers evenly spread from the first to the last."""
    layers = doc["options"]["layers"]
    idx = sorted({round(float(i)) for i in np.linspace(0, len(layers) - 1, min(n_rows, len(layers)))})
    return [(layers[i], doc["options"]["heads"][0], doc["options"]["modes"][0]) for i in idx]


def example_cell(
    model, item: SegItem, size, query_object: int, key_object: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The model input of one image as the patch grid covers it ((h, w, 3) in [0, 1]) with the query and key
    objects' masks (h, w) bool on it."""
    image = open_image(item.image)
    prep = model.preprocessing if size is None else model.preprocessing.with_size(*size)
    ids, _ = read_objects(item, image.size)
    px, labels = prep(image)[0], prep.transform_labels(ids)  # (3, H, W), (H, W)
    p = model.weights.embeddings.patch_size
    h, w = px.shape[1] // p * p, px.shape[2] // p * p
    img = display_image(px[:, :h, :w], prep.mean, prep.std, prep.rescale)
    return img, labels[:h, :w] == query_object, labels[:h, :w] == key_object


def draw_same_object(model, result: SameObjectResult, out: Path) -> list[Path]:
    """Write ``same_object_by_layer.png`` (Fig. 6) and ``same_object_examples.png`` of ``result`` into ``out``.

    model: the :class:`~qkweights.vision.model.VisionModel` of the result; the examples' images and label
    maps are read again from the result's dataset folder. Returns the paths.
    """
    doc = result.doc
    paths = [same_object_figure(doc, out / FIGURE_NAME)]
    by_name = {it.name: it for it in open_segmentation(doc["dataset"]["root"]).items}
    size = tuple(doc["options"]["input_size"]) or None
    rows = []
    for l, h, n in example_picks(doc):
        picked = [r for r in result.rows if (r["layer"], r["head"], r["mode"]) == (l, h, n)]
        cells = []
        for r in picked:
            img, qm, km = example_cell(model, by_name[r["image"]], size, r["query_object"], r["key_object"])
            verdict = "same" if r["same"] else "different"
            cells.append((img, qm, km, f"{verdict} · {r['n_objects']} obj"))
        entry = next(
            m
            for e in doc["layers"]
            if e["layer"] == l
            for hd in e["heads"]
            if hd["head"] == h
            for m in hd["modes"]
            if m["mode"] == n
        )
        rows.append((f"L{l} H{h} M{n}\nσ {entry['sigma']:.3g}\np = {entry['probability']:.2f}", cells))
    name = doc["source"].get("model_id") or doc["model"]["family"]
    title = (
        f"{name} — the top {doc['options']['top']} of {doc['dataset']['n_eligible']} eligible images per mode: "
        "query object (largest mean s·x·u over its area) outlined red, key object (s·x·v) cyan"
    )
    paths.append(save_png(same_object_examples(title, rows), out / EXAMPLES_NAME))
    return paths
