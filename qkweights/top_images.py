"""The images of a folder that drive each query-key mode most (paper Fig. 4, S4–S19).

Score of an image for (layer l, head h, mode n, sign s), over its patch tokens t only
(CLS, distillation and register tokens excluded) with x the LayerNorm output feeding
W_q/W_k (``attention_inputs[l]``):

    score = max_t(s·x_t·u_n) · max_t(s·x_t·v_n),   s = +1 (sign "+") or −1 (sign "-")

(u_n, v_n from :func:`qkweights.qk.qk_svd`, the profiles' sign convention). Stored with
each winner, as the paper's notebook stores: the two maxima, the means over tokens of
s·x·u_n and s·x·v_n, and the means of their top-5 tokens.

One pass over the folder (sorted relative paths, in batches of ``batch_size``): each
batch is projected onto every chosen head's U and V at once ((B·T, D) @ (D, 2·H·N) per
layer), and a running top-K per (layer, head, mode, sign) keeps the best images (ties:
the earlier path first), so memory does not grow with the number of images. The same
forward passes give the anisotropy control (paper Fig. S4): per layer, the mean cosine
between the centre patch token's embeddings of different images, from the running sum
s of unit vectors: ``mean_{i≠j} cos = (|s|² − n) / (n(n − 1))``.

After each batch the running state is written atomically to ``<out>/.top_images_state.npz``
with a fingerprint of the command (options, model weights' sha256, image list with sizes
and modification times); re-running the same command continues after the last completed
batch and gives the same result as an uninterrupted run. Batches are fixed slices of the
sorted list, so a resumed run computes exactly the same batches. A state with another
fingerprint is ignored (with a note on stderr). Then the winning images alone are run
again to draw their maps, the outputs are written and the state file is removed.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import textwrap
import zipfile
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
from PIL import Image

from qkweights import __version__
from qkweights.errors import InputError, QkError
from qkweights.load import source_record
from qkweights.outputs import atomic_path, draw_in_parallel, save_figure, write_json, write_npz
from qkweights.overlay import CAPTION, composite, display_image
from qkweights.qk import qk_svd

SCHEMA = "qkweights.top_images/1"
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp")
STATE_NAME = ".top_images_state.npz"
JSON_NAME = "top_images.json"
TOP_MEAN = 5  # tokens in the "top-5 mean" projections
SIGNS = ("+", "-")
STATS = ("max_query", "max_key", "mean_query", "mean_key", "top5_query", "top5_key")  # per winner, for its sign
READ_ERRORS = (QkError, OSError, ValueError, SyntaxError, EOFError, Image.DecompressionBombError)
SCORE_TEXT = "max_t(s·x_t·u_n) · max_t(s·x_t·v_n) over patch tokens t, s = +1 for sign '+', −1 for sign '-'"
EMBEDDING_TEXT = "attention_inputs[l]: the LayerNorm output feeding W_q/W_k"
CENTRE_TEXT = "centre patch token: row gh//2, column gw//2 of the patch grid"
CELL_INCHES = 1.2
GRID_DPI = 110
PNG_COMPRESSION = 3  # zlib level of the grid PNGs: level 6 (the default) takes about twice as long for ~10% smaller files
THUMB_CACHE = 2048  # cell-sized display images kept in memory while drawing the grids (~50 kB each)


# ----------------------------------------------------------------------------- images


def list_images(root: Path, exclude: Path | None = None) -> list[str]:
    """Image files under ``root`` (recursive), as sorted relative POSIX paths.

    Suffixes .jpg .jpeg .png .webp in any letter case; files under ``exclude`` (the
    output folder, when it lies inside ``root``) are left out.
    """
    root = Path(root)
    if not root.is_dir():
        raise InputError(f"{root}: no such folder; give a folder of images (jpg, jpeg, png, webp)")
    skip = Path(exclude).resolve() if exclude is not None else None
    found = []
    for folder, dirs, files in os.walk(root):
        here = Path(folder)
        if skip is not None and here.resolve() == skip:
            dirs[:] = []
            continue
        dirs.sort()
        found += [(here / f).relative_to(root).as_posix() for f in files if Path(f).suffix.lower() in IMAGE_SUFFIXES]
    return sorted(found)


def input_size(model) -> tuple[int, int] | None:
    """None when the model's preprocessing gives a fixed size; else the size to resize every image to."""
    prep = model.preprocessing
    if prep.crop is not None or prep.size is not None:
        return None
    return model.dims.image_size or (224, 224)


def load_batch(model, root: Path, paths: list[str], size) -> tuple[np.ndarray | None, list[int], list[dict]]:
    """Preprocess the readable images of ``paths``: (B, 3, H, W) float32, their positions in ``paths``, and the skipped.

    Unreadable, truncated or otherwise unusable files are skipped, never fatal:
    ``{"path", "reason"}`` each.
    """
    pixels, ok, skipped = [], [], []
    for i, rel in enumerate(paths):
        try:
            pixels.append(model.preprocess(root / rel, size=size))
            ok.append(i)
        except READ_ERRORS as e:
            skipped.append({"path": rel, "reason": " ".join(f"{type(e).__name__}: {e}".split())})
    return (np.concatenate(pixels) if pixels else None), ok, skipped


# ----------------------------------------------------------------------------- modes and scores


@dataclass(frozen=True)
class ModeBank:
    """The chosen modes of the chosen heads, per chosen layer.

    w: per layer (D, 2C) float32, C = H'·N' columns [u_(h,n) … | v_(h,n) …] in (head, mode)
    order; sigma, cos: (L', H', N') float64.
    """

    layers: list[int]
    heads: list[int]
    modes: list[int]
    w: list[np.ndarray]
    sigma: np.ndarray
    cos: np.ndarray


def mode_bank(ck, layers: list[int], heads: list[int], modes: list[int]) -> ModeBank:
    """SVD of the chosen heads of each chosen layer of checkpoint ``ck``, as a :class:`ModeBank`."""
    w, sigma, cos = [], [], []
    for l in layers:
        qk = ck.qk(l)
        u, s, v = qk_svd(qk.wq[heads], qk.wk[heads])  # (H', D, K), (H', K), (H', D, K)
        u, v, s = u[..., modes], v[..., modes], s[:, modes]  # (H', D, N')
        d = u.shape[1]
        cols = [u.transpose(1, 0, 2).reshape(d, -1), v.transpose(1, 0, 2).reshape(d, -1)]  # 2 × (D, H'·N')
        w.append(np.ascontiguousarray(np.concatenate(cols, axis=1), dtype=np.float32))
        sigma.append(s)
        cos.append(np.einsum("hdn,hdn->hn", u, v))
    return ModeBank(layers, heads, modes, w, np.array(sigma), np.array(cos))


def batch_stats(x: np.ndarray, w: np.ndarray) -> np.ndarray:
    """Score and projection statistics of a batch for every column pair of ``w``.

    x: (B, T, D) float32 patch-token embeddings; w: (D, 2C) [u columns | v columns].
    Returns (B, C, 2, 7) float64: per sign (+, −) the score followed by ``STATS``
    (max, mean and top-5 mean of s·x·u and of s·x·v over tokens).
    """
    b, t, d = x.shape
    c = w.shape[1] // 2
    p = (x.reshape(b * t, d) @ w).reshape(b, t, 2 * c)  # (B, T, 2C)
    m = min(TOP_MEAN, t)
    part = np.partition(p, sorted({m - 1, t - m}), axis=1)  # smallest m first, largest m last
    low = part[:, :m].astype(np.float64)  # (B, m, 2C)
    high = part[:, t - m:].astype(np.float64)
    mean = p.mean(axis=1, dtype=np.float64)  # (B, 2C)
    plus = np.stack([high.max(1), mean, high.mean(1)], axis=-1)  # (B, 2C, 3): max, mean, top-m mean of x·w
    minus = -np.stack([low.min(1), mean, low.mean(1)], axis=-1)  # the same of −x·w
    out = np.empty((b, c, 2, 7))
    for j, st in enumerate((plus, minus)):
        q, k = st[:, :c], st[:, c:]  # (B, C, 3) each
        out[:, :, j, 0] = q[..., 0] * k[..., 0]
        out[:, :, j, 1::2] = q
        out[:, :, j, 2::2] = k
    return out


def merge_topk(scores: np.ndarray, index: np.ndarray, stats: np.ndarray, new_scores: np.ndarray,
               new_index: np.ndarray, new_stats: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Merge a batch into running top-K lists: order by score descending, then image index ascending.

    scores (..., K), index (..., K) int (−1 = empty, score −inf), stats (..., K, S); new_scores
    (..., B), new_index (B,), new_stats (..., B, S). Returns the new (scores, index, stats).
    """
    k = scores.shape[-1]
    s = np.concatenate([scores, new_scores], axis=-1)  # (..., K + B)
    i = np.concatenate([index, np.broadcast_to(new_index, new_scores.shape)], axis=-1)
    x = np.concatenate([stats, new_stats], axis=-2)
    order = np.lexsort((i, -s), axis=-1)[..., :k]  # primary −score, secondary index
    return (np.take_along_axis(s, order, -1), np.take_along_axis(i, order, -1),
            np.take_along_axis(x, order[..., None], -2))


def unit_sum(x: np.ndarray) -> np.ndarray:
    """Σ_b x_b/|x_b| for x (B, D) (zero vectors add nothing), float64 (D,)."""
    x = np.asarray(x, np.float64)
    norm = np.linalg.norm(x, axis=1, keepdims=True)
    return (x / np.where(norm > 0, norm, 1.0)).sum(0)


def mean_pairwise_cosine(s: np.ndarray, n: int) -> np.ndarray:
    """Mean cosine over ordered pairs i ≠ j of n unit vectors with sum s (..., D): (|s|² − n)/(n(n − 1)); NaN if n < 2."""
    if n < 2:
        return np.full(s.shape[:-1], np.nan)
    return (np.einsum("...d,...d->...", s, s) - n) / (n * (n - 1))


# ----------------------------------------------------------------------------- running state


@dataclass
class ScanState:
    """The scan so far: ``done`` files of the list consumed (scored or skipped).

    scores, index: (L', C, 2, K); stats: (L', C, 2, K, 6); unit_sums: (L', D) running sums
    of the centre tokens' unit vectors over ``n_scored`` images; skipped: [{"path", "reason"}].
    """

    done: int
    scores: np.ndarray
    index: np.ndarray
    stats: np.ndarray
    unit_sums: np.ndarray
    n_scored: int
    skipped: list

    @classmethod
    def empty(cls, n_layers: int, c: int, k: int, d: int) -> ScanState:
        return cls(0, np.full((n_layers, c, 2, k), -np.inf), np.full((n_layers, c, 2, k), -1, np.int64),
                   np.full((n_layers, c, 2, k, len(STATS)), np.nan), np.zeros((n_layers, d)), 0, [])


def save_state(path: Path, st: ScanState, fingerprint: str) -> None:
    write_npz(path, fingerprint=np.array(fingerprint), done=np.array(st.done), scores=st.scores, index=st.index,
              stats=st.stats, unit_sums=st.unit_sums, n_scored=np.array(st.n_scored),
              skipped=np.array(json.dumps(st.skipped)))


def load_state(path: Path, fingerprint: str, like: ScanState) -> ScanState | None:
    """The saved state if it exists and belongs to this command (same fingerprint and shapes), else None."""
    if not path.exists():
        return None
    try:
        with np.load(path, allow_pickle=False) as z:
            if str(z["fingerprint"]) != fingerprint:
                print(f"qkweights: {path} is from another command (options, model or image list differ); ignoring it and starting over", file=sys.stderr)
                return None
            st = ScanState(int(z["done"]), z["scores"], z["index"], z["stats"], z["unit_sums"], int(z["n_scored"]),
                           json.loads(str(z["skipped"])))
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as e:
        print(f"qkweights: {path} is unreadable ({type(e).__name__}); ignoring it and starting over", file=sys.stderr)
        return None
    if any(getattr(st, f).shape != getattr(like, f).shape for f in ("scores", "index", "stats", "unit_sums")):
        print(f"qkweights: {path} has other array shapes than this command; ignoring it and starting over", file=sys.stderr)
        return None
    return st


def model_identity(model) -> dict:
    """Provenance of the weights: Source.to_json() (sha256 of each file), or file names, sizes and mtimes."""
    if model.source is not None:
        return source_record(model.source, model.checkpoint)
    files = [Path(f) for f in model.checkpoint.store.files]
    return {"model_id": model.checkpoint.spec.name,
            "files": [{"name": str(f), "bytes": f.stat().st_size, "mtime_ns": f.stat().st_mtime_ns} for f in files]}


def fingerprint(source: dict, root: Path, paths: list[str], options: dict) -> str:
    """sha256 of the tool version, model provenance, options, and each image's path, size and mtime."""
    images = []
    for rel in paths:
        st = (root / rel).stat()
        images.append([rel, st.st_size, st.st_mtime_ns])
    doc = {"tool": __version__, "source": source, "root": str(Path(root).resolve()), "options": options, "images": images}
    return hashlib.sha256(json.dumps(doc, sort_keys=True).encode()).hexdigest()


# ----------------------------------------------------------------------------- the scan


def centre_token(layout) -> int:
    """Sequence index of the centre patch token (row gh//2, column gw//2)."""
    gh, gw = layout.grid
    return layout.patches.start + (gh // 2) * gw + gw // 2


def scan_batch(model, bank: ModeBank, st: ScanState, pixels: np.ndarray, index: np.ndarray) -> None:
    """Run and score one batch (B, 3, H, W) of images with list positions ``index`` (B,) into ``st``."""
    score_batch(bank, st, model.forward(pixels, layers=bank.layers), index)


def score_batch(bank: ModeBank, st: ScanState, out, index: np.ndarray) -> None:
    """Merge a batch's :class:`~qkweights.forward.ForwardOutput` into the running top-K and anisotropy sums of ``st``."""
    lay = out.layout
    centre = centre_token(lay)
    for li, l in enumerate(bank.layers):
        x = out.attention_inputs[l]  # (B, T, D)
        stats = batch_stats(x[:, lay.patches], bank.w[li]).transpose(1, 2, 0, 3)  # (C, 2, B, 7)
        st.scores[li], st.index[li], st.stats[li] = merge_topk(
            st.scores[li], st.index[li], st.stats[li], stats[..., 0], index, stats[..., 1:])
        st.unit_sums[li] += unit_sum(x[:, centre])
    st.n_scored += len(index)


def scan(model, root: Path, paths: list[str], bank: ModeBank, top: int, batch_size: int, state_path: Path,
         fp: str, progress: Callable[[int, int], None] | None = None) -> ScanState:
    """Run the resumable pass over ``paths``; the state file holds the result when it returns."""
    c = len(bank.heads) * len(bank.modes)
    st = ScanState.empty(len(bank.layers), c, top, model.dims.hidden)
    st = load_state(state_path, fp, st) or st
    size = input_size(model)
    n = len(paths)
    if progress:
        progress(st.done, n)
    for start in range(st.done, n, batch_size):
        chunk = paths[start : start + batch_size]
        pixels, ok, skipped = load_batch(model, root, chunk, size)
        if pixels is not None:
            scan_batch(model, bank, st, pixels, start + np.array(ok, dtype=np.int64))
        st.skipped += skipped
        st.done = start + len(chunk)
        save_state(state_path, st, fp)
        if progress:
            progress(st.done, n)
    return st


# ----------------------------------------------------------------------------- winners' maps and figures


def winner_maps(model, root: Path, paths: list[str], bank: ModeBank, st: ScanState, batch_size: int) -> tuple[np.ndarray, np.ndarray, tuple[int, int]]:
    """Query and key maps of every winning image on its own (layer, head, mode, sign) slot.

    Runs the forward pass on the union of winners only. Returns query, key
    (L', C, 2, K, gh, gw) float32 (raw x·u, x·v; NaN for empty slots) and the grid.
    """
    size = input_size(model)
    winners = np.unique(st.index[st.index >= 0])
    query = key = grid = None
    c = len(bank.heads) * len(bank.modes)
    for start in range(0, len(winners), batch_size):
        idx = winners[start : start + batch_size]  # ascending
        pixels, ok, _ = load_batch(model, root, [paths[i] for i in idx], size)
        if pixels is None:
            continue
        idx = idx[ok]
        out = model.forward(pixels, layers=bank.layers)
        lay = out.layout
        if query is None:
            grid = lay.grid
            query = np.full(st.index.shape + (lay.grid[0] * lay.grid[1],), np.nan, np.float32)
            key = np.full_like(query, np.nan)
        for li, l in enumerate(bank.layers):
            x = out.attention_inputs[l][:, lay.patches]  # (B, T, D)
            b, t, d = x.shape
            p = (x.reshape(b * t, d) @ bank.w[li]).reshape(b, t, 2 * c)  # (B, T, 2C)
            slot = np.nonzero(np.isin(st.index[li], idx))  # (c, sign, k) of slots won in this batch
            row = np.searchsorted(idx, st.index[li][slot])  # their positions in the batch
            query[li][slot] = p[row, :, slot[0]]
            key[li][slot] = p[row, :, c + slot[0]]
    if query is None:
        return np.zeros(st.index.shape + (0,), np.float32), np.zeros(st.index.shape + (0,), np.float32), (0, 0)
    shape = st.index.shape + grid
    return query.reshape(shape), key.reshape(shape), grid


class Thumbnails:
    """Display images of list positions at the grid's cell size, loaded on demand, the last ``THUMB_CACHE`` kept.

    Each is the part of the model input that the patch grid covers (gh·P × gw·P pixels),
    resized to ``cell`` (height, width) pixels: (h, w, 3) float64 in [0, 1].
    """

    def __init__(self, model, root: Path, paths: list[str], covered: tuple[int, int], cell: tuple[int, int]):
        self.model, self.root, self.paths, self.covered, self.cell = model, root, paths, covered, cell
        self.size = input_size(model)
        self.cache: OrderedDict[int, np.ndarray] = OrderedDict()

    def __call__(self, i: int) -> np.ndarray:
        if i not in self.cache:
            prep = self.model.preprocessing
            px = self.model.preprocess(self.root / self.paths[i], size=self.size)[0]
            img = display_image(px, prep.mean, prep.std, prep.rescale)[: self.covered[0], : self.covered[1]]
            small = Image.fromarray(np.round(img * 255).astype(np.uint8)).resize(self.cell[::-1], Image.Resampling.LANCZOS)
            self.cache[i] = np.asarray(small)
            if len(self.cache) > THUMB_CACHE:
                self.cache.popitem(last=False)
        self.cache.move_to_end(i)
        return self.cache[i] / 255.0


def cell_size(grid: tuple[int, int]) -> tuple[int, int]:
    """(height, width) in pixels of one cell of the grid figures: CELL_INCHES wide at GRID_DPI, the grid's aspect."""
    w = round(CELL_INCHES * GRID_DPI)
    return max(1, round(w * grid[0] / grid[1])), w


def grid_figure(title: str, rows: list[dict], cell: tuple[int, int], thumbs: Thumbnails):
    """Rows of top images with their red/cyan overlays (paper Fig. 4, S5–S16) as one montage.

    rows: [{"label": str, "cells": [(image index, score, query (gh, gw), key (gh, gw), sign), …]}];
    cell: (height, width) pixels per image. Returns ``(fig, montage, (x0, y0))``: the labels
    (to the left, each cell's score in its corner) on a transparent figure at ``GRID_DPI``,
    and the montage (uint8 RGB) that :func:`save_png` lays under it pixel for pixel at
    (x0, y0) — no resampling.
    """
    from matplotlib.figure import Figure

    ch, cw = cell
    gap = max(2, cw // 20)
    k = max((len(r["cells"]) for r in rows), default=1) or 1
    n = len(rows)
    mont = np.full((n * (ch + gap) - gap, k * (cw + gap) - gap, 3), 255, np.uint8)
    for r, row in enumerate(rows):
        for j, (i, _, q, kk, sign) in enumerate(row["cells"]):
            y, x = r * (ch + gap), j * (cw + gap)
            mont[y : y + ch, x : x + cw] = np.round(composite(thumbs(i), q, kk, sign) * 255).astype(np.uint8)
    label_in, dpi = 1.7, GRID_DPI
    w_in = label_in + mont.shape[1] / dpi + 0.25
    title = textwrap.fill(title, width=max(40, int(w_in * 72 / (9 * 0.55))))
    caption = textwrap.fill(CAPTION + "; score (corner) = max_t(s·x·u)·max_t(s·x·v) over patch tokens, s = the row's sign",
                            width=max(40, int(w_in * 72 / (6 * 0.55))))
    top_in = 0.3 + (title.count("\n") + 1) * 9 * 1.3 / 72
    bottom_in = 0.15 + (caption.count("\n") + 1) * 6 * 1.3 / 72
    h_in = top_in + mont.shape[0] / dpi + bottom_in
    fig = Figure(figsize=(w_in, h_in), dpi=dpi)
    fig.patch.set_alpha(0.0)
    ax = fig.add_axes((label_in / w_in, bottom_in / h_in, mont.shape[1] / dpi / w_in, mont.shape[0] / dpi / h_in))
    ax.set_xlim(0, mont.shape[1])
    ax.set_ylim(mont.shape[0], 0)  # montage pixel coordinates for the labels
    ax.set_axis_off()
    for r, row in enumerate(rows):
        y = r * (ch + gap)
        ax.text(-gap * 1.5, y + ch / 2, row["label"], ha="right", va="center", fontsize=7.5)
        for j, (_, score, *_rest) in enumerate(row["cells"]):
            ax.text(j * (cw + gap) + 2, y + ch - 2, f"{score:.3g}", fontsize=5.5, color="white", ha="left", va="bottom",
                    bbox={"facecolor": "black", "alpha": 0.55, "pad": 1, "lw": 0})
    for j in range(k):
        ax.text(j * (cw + gap) + cw / 2, -gap, f"#{j + 1}", ha="center", va="bottom", fontsize=7.5)
    fig.text(0.5, 1 - 0.1 / h_in, title, ha="center", va="top", fontsize=9)
    fig.text(0.5, 0.06 / h_in, caption, ha="center", va="bottom", fontsize=6, color="0.3")
    return fig, mont, (round(label_in * dpi), round(top_in * dpi))


def draw_grid(title: str, rows: list[dict], cell: tuple[int, int], thumbs: Thumbnails, path: Path) -> None:
    """One head's grid figure (:func:`grid_figure`) saved as ``path``."""
    save_png(*grid_figure(title, rows, cell, thumbs), path)


def save_png(fig, montage: np.ndarray, at: tuple[int, int], path: Path) -> Path:
    """Lay ``montage`` (h, w, 3) uint8 at pixel ``at`` = (x0, y0) of a white canvas, draw the
    transparent figure over it, and save an RGB PNG (fast compression) atomically."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    canvas = FigureCanvasAgg(fig)
    canvas.draw()
    over = np.asarray(canvas.buffer_rgba()).astype(np.float32) / 255  # (H, W, 4) labels on transparent
    rgb = np.ones(over.shape[:2] + (3,), np.float32)
    (x0, y0), (h, w) = at, montage.shape[:2]
    rgb[y0 : y0 + h, x0 : x0 + w] = montage[: rgb.shape[0] - y0, : rgb.shape[1] - x0] / 255
    alpha = over[..., 3:]
    rgb = over[..., :3] * alpha + rgb * (1 - alpha)  # the labels over the montage
    with atomic_path(path) as tmp:
        Image.fromarray(np.round(rgb * 255).astype(np.uint8)).save(tmp, format="PNG", compress_level=PNG_COMPRESSION)
    return Path(path)


def head_rows(doc_head: dict, li: int, ci0: int, n_modes: int, st: ScanState, query, key) -> list[dict]:
    """The grid rows of one head: for each mode, its '+' row then its '−' row."""
    rows = []
    l, h = doc_head["layer"], doc_head["head"]
    for ni in range(n_modes):
        m = doc_head["modes"][ni]
        ci = ci0 + ni
        for si, sign in enumerate(SIGNS):
            cells = [(int(st.index[li, ci, si, j]), float(st.scores[li, ci, si, j]), query[li, ci, si, j], key[li, ci, si, j],
                      1 if si == 0 else -1)
                     for j in range(st.index.shape[-1]) if st.index[li, ci, si, j] >= 0 and np.isfinite(query[li, ci, si, j]).all()]
            sign_char = "+" if si == 0 else "−"
            rows.append({"label": f"L{l} H{h} M{m['mode']} {sign_char}\ncos {m['cosine']:+.3f}  σ {m['sigma']:.3g}", "cells": cells})
    return rows


def anisotropy_figure(title: str, layers: list[int], n_layers: int, baseline: np.ndarray, weighted: np.ndarray):
    """Paper Fig. S4: per layer, the profile's weighted cosine, the centre-token baseline and their difference."""
    from matplotlib.figure import Figure

    x = np.asarray(layers) / max(n_layers - 1, 1)
    fig = Figure(figsize=(7.5, 5.2), layout="constrained")
    ax = fig.add_subplot()
    ax.axhline(0, color="0.6", lw=0.8)
    ax.plot(x, weighted, "o-", color="C0", ms=4, label="weighted cosine Σσ·cos/Σσ (profile, mean over heads)")
    ax.plot(x, baseline, "s--", color="C2", ms=4, label="anisotropy: mean cos between centre-token embeddings of different images")
    ax.plot(x, weighted - baseline, "^-", color="C3", ms=4, label="relative cosine = weighted − anisotropy")
    ax.set_xlabel("normalised layer l/(L−1)")
    ax.set_ylabel("cosine")
    ax.set_xlim(-0.03, 1.03)
    ax.set_title(title, fontsize=10)
    fig.legend(fontsize=8, loc="outside lower center")
    return fig


# ----------------------------------------------------------------------------- the command


def _indices(values, limit: int, what: str, default) -> list[int]:
    out = list(default if values is None else values)
    out = [int(v) for v in out]
    bad = [v for v in out if not 0 <= v < limit]
    if bad:
        raise InputError(f"{what} {bad[0]} is out of range: the model has {limit} {what}s (0–{limit - 1})")
    if len(set(out)) != len(out) or not out:
        raise InputError(f"{what}s {out}: give at least one, without repeats")
    return out


def _winner(st: ScanState, paths: list[str], li: int, ci: int, si: int, j: int) -> dict:
    rec = {"path": paths[int(st.index[li, ci, si, j])], "score": float(st.scores[li, ci, si, j])}
    rec.update({name: float(v) for name, v in zip(STATS, st.stats[li, ci, si, j])})
    return rec


def build_document(model, source: dict, root, paths: list[str], bank: ModeBank, st: ScanState, options: dict,
                   anisotropy: dict) -> dict:
    """The ``top_images.json`` document (schema ``qkweights.top_images/1``)."""
    from qkweights.profiles import SIGN_CONVENTION

    heads = []
    n_modes = len(bank.modes)
    for li, l in enumerate(bank.layers):
        for hi, h in enumerate(bank.heads):
            modes = []
            for ni, n in enumerate(bank.modes):
                ci = hi * n_modes + ni
                signs = {sign: [_winner(st, paths, li, ci, si, j) for j in range(st.index.shape[-1]) if st.index[li, ci, si, j] >= 0]
                         for si, sign in enumerate(SIGNS)}
                modes.append({"mode": n, "sigma": float(bank.sigma[li, hi, ni]), "cosine": float(bank.cos[li, hi, ni]), "signs": signs})
            heads.append({"layer": l, "head": h, "modes": modes})
    d = model.dims
    return {
        "schema": SCHEMA,
        "tool_version": __version__,
        "source": source,
        "model": {"family": model.checkpoint.spec.name, "layers": d.layers, "heads": d.heads, "hidden": d.hidden, "head_dim": d.head_dim},
        "image_dir": str(root),
        "options": options,
        "score": SCORE_TEXT,
        "embedding": EMBEDDING_TEXT,
        "tokens": "patch tokens only (CLS, distillation and register tokens excluded)",
        "stats": {"max_query": "max_t s·x_t·u_n", "max_key": "max_t s·x_t·v_n", "mean_query": "mean_t s·x_t·u_n",
                  "mean_key": "mean_t s·x_t·v_n", "top5_query": f"mean of the top {TOP_MEAN} s·x_t·u_n",
                  "top5_key": f"mean of the top {TOP_MEAN} s·x_t·v_n"},
        "sign_convention": SIGN_CONVENTION,
        "ties": "equal scores: the earlier path (sorted relative paths) first",
        "n_files": len(paths),
        "n_images": st.n_scored,
        "heads": heads,
        "anisotropy": anisotropy,
        "skipped": st.skipped,
    }


def top_images(model, image_dir, out_dir, *, layers=None, heads=None, modes=range(10), top: int = 8,
               batch_size: int = 16, progress: Callable[[int, int], None] | None = None, plots: bool = True) -> dict:
    """Top-``top`` images of ``image_dir`` per (layer, head, mode, sign); writes the outputs into ``out_dir``.

    model: a :class:`qkweights.vision.VisionModel`. layers, heads: 0-based indices (None:
    all); modes: indices, those ≥ head_dim dropped. progress(done, total) is called with
    the number of files consumed, at the start and after each batch. Writes
    ``top_images.json``, and with ``plots`` ``top_L{l}_H{h}.png`` per head and
    ``anisotropy.png``; resumable (module docstring). Returns the json document.
    """
    from qkweights.profiles import compute_profile

    d = model.dims
    root, out = Path(image_dir), Path(out_dir)
    layers = _indices(layers, d.layers, "layer", range(d.layers))
    heads = _indices(heads, d.heads, "head", range(d.heads))
    kept = [int(n) for n in modes if 0 <= int(n) < d.head_dim]
    if not kept:
        raise InputError(f"modes {list(modes)}: a head of this model has {d.head_dim} modes; give modes in 0–{d.head_dim - 1}")
    modes = _indices(kept, d.head_dim, "mode", ())
    if top < 1 or batch_size < 1:
        raise InputError(f"top {top}, batch size {batch_size}: both must be at least 1")
    paths = list_images(root, exclude=out)
    if not paths:
        raise InputError(f"{root}: no images found (looked for {', '.join(IMAGE_SUFFIXES)} in any letter case, in subfolders too)")
    source = model_identity(model)
    options = {"layers": layers, "heads": heads, "modes": modes, "top": top, "batch_size": batch_size,
               "input_size": list(input_size(model) or ())}
    fp = fingerprint(source, root, paths, options)
    bank = mode_bank(model.checkpoint, layers, heads, modes)
    state_path = out / STATE_NAME
    st = scan(model, root, paths, bank, top, batch_size, state_path, fp, progress)

    weighted = compute_profile(model.checkpoint, source).layer_stats()["weighted_cosine"][layers]
    baseline = mean_pairwise_cosine(st.unit_sums, st.n_scored)
    anisotropy = {"token": CENTRE_TEXT, "embedding": EMBEDDING_TEXT, "n_images": st.n_scored, "layers": layers,
                  "mean_cosine": baseline.tolist(), "weighted_cosine": weighted.tolist(),
                  "relative_cosine": (weighted - baseline).tolist()}
    doc = build_document(model, source, root, paths, bank, st, options, anisotropy)
    if plots and st.n_scored:
        model_id = source.get("model_id", "?")
        query, key, grid = winner_maps(model, root, paths, bank, st, batch_size)
        patch = model.weights.embeddings.patch_size
        cell = cell_size(grid)
        thumbs = Thumbnails(model, root, paths, (grid[0] * patch, grid[1] * patch), cell)
        jobs = []
        for hd in doc["heads"]:
            li, hi = layers.index(hd["layer"]), heads.index(hd["head"])
            rows = head_rows(hd, li, hi * len(modes), len(modes), st, query, key)
            title = f"{model_id} — layer {hd['layer']}, head {hd['head']}: top {top} of {st.n_scored} images per mode and sign (x = LayerNorm output)"
            jobs.append((title, rows, cell, thumbs, out / f"top_L{hd['layer']}_H{hd['head']}.png"))
        draw_in_parallel(draw_grid, jobs)
        save_figure(anisotropy_figure(f"{model_id} — anisotropy control ({st.n_scored} images)", layers, d.layers, baseline, weighted),
                    out / "anisotropy.png", dpi=120)
    write_json(out / JSON_NAME, doc)
    state_path.unlink(missing_ok=True)
    return doc
