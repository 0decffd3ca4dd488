"""What every figure shares: the curves' bands and axes, the image grids, PNG writing.

Curves are drawn on pyplot-free :class:`matplotlib.figure.Figure` objects and written atomically
by :func:`qkweights.outputs.save_figure`; image grids are composed as PIL images and written by
:func:`save_png`.
"""

from __future__ import annotations

import textwrap
from pathlib import Path

import matplotlib
import numpy as np
from matplotlib.ticker import MaxNLocator
from PIL import Image

DEPTH_LABEL = "normalised layer l/(L−1)"
NULL_COLOR = "0.82"
BAR_WIDTH = 6  # points: the range of a lone layer, drawn as a bar
CHANCE_TICK = 10  # points: the tick marking each layer's chance level, so that a lone layer's shows
CELL_PX = 132  # width of one image cell of the image grids
GRID_GAP = 6
LABEL_PX = 190  # the row labels' column
PNG_COMPRESSION = 1  # zlib level of the grid PNGs: level 6 (the default) takes about 3× as long for ~25% smaller files


def draw_band(ax, x, lo, hi, *, color, alpha: float, label: str | None = None) -> None:
    """The range ``lo``–``hi`` shaded over ``x`` (each (L,)); a point with no finite neighbour (one layer, or one
    between gaps), which a band of zero width would not show, gets a vertical bar of the same colour instead."""
    x, lo, hi = (np.asarray(a, np.float64) for a in (x, lo, hi))
    ok = np.isfinite(lo) & np.isfinite(hi)
    alone = ok & ~np.r_[False, ok[:-1]] & ~np.r_[ok[1:], False]  # (L,)
    runs = bool((ok[1:] & ok[:-1]).any())
    ax.fill_between(x, lo, hi, color=color, alpha=alpha, lw=0, label=label if runs else None)
    if alone.any():
        ax.vlines(x[alone], lo[alone], hi[alone], color=color, alpha=alpha, lw=BAR_WIDTH, label=None if runs else label)


def draw_null_band(ax, half_width: float, label: str) -> None:
    """The grey band ±``half_width`` around 0 (labelled ``label``) with a zero line."""
    ax.axhspan(-half_width, half_width, color=NULL_COLOR, alpha=0.6, lw=0, label=label, zorder=0)
    ax.axhline(0, color="k", lw=0.7, zorder=1)


def depth_axes(ax, layers: int | None) -> None:
    """x axis l/(L−1) on [0, 1]; with ``layers`` also the layer index l on the top axis."""
    ax.set_xlim(-0.03, 1.03)
    ax.set_xlabel(DEPTH_LABEL)
    if layers and layers > 1:
        top = ax.secondary_xaxis("top", functions=(lambda d: d * (layers - 1), lambda l: l / (layers - 1)))
        top.xaxis.set_major_locator(MaxNLocator(integer=True, nbins=min(layers, 12)))
        top.set_xlabel("layer l", fontsize=8)
        top.tick_params(labelsize=8)


# ----------------------------------------------------------------------------- image grids


def font(size: int):
    """DejaVu Sans, the font matplotlib ships, at ``size`` pixels (Pillow's own default font if it is missing)."""
    from PIL import ImageFont

    path = Path(matplotlib.get_data_path()) / "fonts" / "ttf" / "DejaVuSans.ttf"
    try:
        return ImageFont.truetype(str(path), size)
    except OSError:
        return ImageFont.load_default(size)


def image_grid(title: str, caption: str, rows: list) -> Image.Image:
    """Rows of image cells with labels, composed as one RGB image (no matplotlib figure).

    rows: [(label, [(cell (h, w, 3) uint8 or PIL image, corner text), …]), …], every cell of
    one size. The label is left of each row, the corner text in each cell's lower left corner,
    the rank (#1, #2, …) above each column, the title above and the caption below; text is
    drawn once, directly on the pixels.
    """
    from PIL import ImageDraw

    tiles = [[(c if isinstance(c, Image.Image) else Image.fromarray(c), text) for c, text in row] for _, row in rows]
    first = next((c for row in tiles for c, _ in row), None)
    cw, ch = first.size if first is not None else (CELL_PX, CELL_PX)
    k = max((len(row) for row in tiles), default=1) or 1
    title_font, label_font, small = font(15), font(12), font(10)
    width = LABEL_PX + k * (cw + GRID_GAP) + GRID_GAP
    title_lines = textwrap.wrap(title, width=max(40, width // 9))
    caption_lines = textwrap.wrap(caption, width=max(40, width // 6))
    top = 10 + 19 * len(title_lines) + 18
    height = top + len(rows) * (ch + GRID_GAP) + 8 + 13 * len(caption_lines) + 6
    img = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(img)
    for i, line in enumerate(title_lines):
        draw.text((width // 2, 8 + 19 * i), line, fill="black", font=title_font, anchor="ma")
    for j in range(k):
        draw.text(
            (LABEL_PX + j * (cw + GRID_GAP) + cw // 2, top - 4), f"#{j + 1}", fill="black", font=label_font, anchor="md"
        )
    for r, ((label, _), row) in enumerate(zip(rows, tiles)):
        y = top + r * (ch + GRID_GAP)
        draw.multiline_text(
            (LABEL_PX - 8, y + ch // 2), label, fill="black", font=label_font, anchor="rm", align="right"
        )
        for j, (cell, text) in enumerate(row):
            x = LABEL_PX + j * (cw + GRID_GAP)
            img.paste(cell, (x, y))
            box = draw.textbbox((x + 3, y + ch - 3), text, font=small, anchor="ld")
            draw.rectangle((box[0] - 1, box[1] - 1, box[2] + 1, box[3] + 1), fill=(40, 40, 40))
            draw.text((x + 3, y + ch - 3), text, fill="white", font=small, anchor="ld")
    y = height - 6 - 13 * len(caption_lines)
    for i, line in enumerate(caption_lines):
        draw.text((width // 2, y + 13 * i), line, fill=(80, 80, 80), font=small, anchor="ma")
    return img


def save_png(image, path) -> Path:
    """Save a PIL image as PNG atomically (fast compression)."""
    from qkweights.outputs import atomic_path

    with atomic_path(path) as tmp:
        image.save(tmp, format="PNG", compress_level=PNG_COMPRESSION)
    return Path(path)
