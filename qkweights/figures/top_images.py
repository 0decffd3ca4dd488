"""The figures of top-images: one grid of the top images per head (paper Fig. 4, S5–S19), ``top_L{l}_H{h}.png``,
and the anisotropy control (paper Fig. S4), ``anisotropy.png``."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure
from PIL import Image

from qkweights.analyses.runner import model_ref, run_jobs
from qkweights.analyses.top_images import SIGNS, TopImagesResult
from qkweights.figures import DPI
from qkweights.figures.common import CELL_PX, image_grid, save_png
from qkweights.figures.overlay import CAPTION, DIM, LUMA, blend, scale_map, upsample
from qkweights.outputs import save_figure
from qkweights.vision.model import ModelRef
from qkweights.vision.preprocess import display_image


def anisotropy_figure(title: str, layers: list[int], n_layers: int, baseline: np.ndarray, weighted: np.ndarray):
    """Paper Fig. S4: per layer, the profile's weighted cosine, the centre-token baseline and their difference."""
    x = np.asarray(layers) / max(n_layers - 1, 1)
    fig = Figure(figsize=(7.5, 5.2), layout="constrained")
    ax = fig.add_subplot()
    ax.axhline(0, color="0.6", lw=0.8)
    ax.plot(x, weighted, "o-", color="C0", ms=4, label="weighted cosine Σσ·cos/Σσ (profile, mean over heads)")
    ax.plot(
        x,
        baseline,
        "s--",
        color="C2",
        ms=4,
        label="anisotropy: mean cos between centre-token embeddings of different images",
    )
    ax.plot(x, weighted - baseline, "^-", color="C3", ms=4, label="relative cosine = weighted − anisotropy")
    ax.set_xlabel("normalised layer l/(L−1)")
    ax.set_ylabel("cosine")
    ax.set_xlim(-0.03, 1.03)
    ax.set_title(title, fontsize=10)
    fig.legend(fontsize=8, loc="outside lower center")
    return fig


def top_images_grid(title: str, rows: list, thumb) -> Image.Image:
    """Rows of top images with their red/cyan overlays (paper Fig. 4, S5–S19), as one RGB image (:func:`image_grid`).

    rows: [(label, [(image path, score, query (gh, gw), key (gh, gw), sign), …]), …];
    thumb(path): the image as the patch grid covers it, ``CELL_PX`` wide, (h, w, 3) in
    [0, 1]. Each cell is the red/cyan overlay of :mod:`qkweights.figures.overlay` on it, its score
    in the corner.
    """
    cells = [c for _, row in rows for c in row]
    out, i = [], 0
    if cells:  # every cell's maps scaled in one call (small arrays), then each cell blended on its grey image
        ch, cw = thumb(cells[0][0]).shape[:2]
        signs = np.array([c[4] for c in cells])
        q01 = upsample(scale_map(np.stack([c[2] for c in cells]), signs), (ch, cw)).astype(np.float32)  # (n, h, w)
        k01 = upsample(scale_map(np.stack([c[3] for c in cells]), signs), (ch, cw)).astype(np.float32)
    for label, row in rows:
        tiles = []
        for path, score, *_ in row:
            grey = DIM * (thumb(path) @ LUMA).astype(np.float32)  # (h, w)
            tiles.append(((blend(grey, q01[i], k01[i]) * 255 + 0.5).astype(np.uint8), f"{score:.3g}"))
            i += 1
        out.append((label, tiles))
    caption = CAPTION + "; score (corner) = max_t(s·x·u)·max_t(s·x·v) over patch tokens, s = the row's sign"
    return image_grid(title, caption, out)


@dataclass(frozen=True)
class GridJob:
    """One head's grid figure, as sent to the process that draws it."""

    ref: ModelRef
    root: str
    size: tuple[int, int] | None
    title: str
    rows: list  # [(label, [(path, score, query (gh, gw), key (gh, gw), sign), …]), …]
    path: Path


def draw_grid(job: GridJob) -> Path:
    """Draw and save one head's grid (:func:`top_images_grid`) in this process."""
    model = job.ref.open()
    return save_png(top_images_grid(job.title, job.rows, _thumbnailer(model, job.root, job.size)), job.path)


_THUMBS: dict = {}  # this process's display images, per (root, path, size)


def _thumbnailer(model, root: str, size):
    """path → (h, w, 3) float64 in [0, 1]: the part of the model input that the patch grid covers, at the grid's
    cell width (:data:`qkweights.figures.common.CELL_PX`), cached per process."""
    prep, p = model.preprocessing, model.weights.embeddings.patch_size

    def thumb(rel: str) -> np.ndarray:
        key = (root, rel, size)
        if key not in _THUMBS:
            if len(_THUMBS) > 4096:
                _THUMBS.clear()
            px = model.preprocess(Path(root) / rel, size=size)[0]  # (3, H, W)
            h, w = px.shape[1] // p * p, px.shape[2] // p * p
            img = display_image(px[:, :h, :w], prep.mean, prep.std, prep.rescale)
            small = Image.fromarray(np.round(img * 255).astype(np.uint8)).resize(
                (CELL_PX, max(1, round(CELL_PX * h / w))), Image.Resampling.LANCZOS
            )
            _THUMBS[key] = np.asarray(small) / 255.0
        return _THUMBS[key]

    return thumb


def draw_top_images(model, result: TopImagesResult, out: Path, *, workers=None, client=None) -> list[Path]:
    """Write ``top_L{l}_H{h}.png`` per head and ``anisotropy.png`` of ``result`` into ``out``; return the paths.

    model: the :class:`~qkweights.vision.model.VisionModel` of the result, which reads the images of its
    ``image_dir`` again for the thumbnails. The grids are drawn where the sweep ran: on ``client``'s Dask
    cluster, else on ``workers`` local processes, else here (:func:`qkweights.analyses.runner.run_jobs`).
    """
    ref = model_ref(model, workers=workers, client=client)
    doc = result.doc
    root = Path(doc["image_dir"])
    opts = doc["options"]
    layers, heads, modes = opts["layers"], opts["heads"], opts["modes"]
    size = tuple(opts["input_size"]) or None
    model_id = doc["source"].get("model_id", "?")
    jobs = []
    for hd in doc["heads"]:
        li, hi = layers.index(hd["layer"]), heads.index(hd["head"])
        rows = []
        for ni, m in enumerate(hd["modes"]):
            ci = hi * len(modes) + ni
            for si, sign in enumerate(SIGNS):
                cells = [
                    (w["path"], w["score"], result.maps[li, ci, si, j, 0], result.maps[li, ci, si, j, 1], 1 - 2 * si)
                    for j, w in enumerate(m["signs"][sign])
                ]
                label = (
                    f"L{hd['layer']} H{hd['head']} M{m['mode']} {'+' if si == 0 else '−'}\ncos {m['cosine']:+.3f}  σ "
                    f"{m['sigma']:.3g}"
                )
                rows.append((label, cells))
        x = "x = normalised token n, LayerNorm-folded modes" if opts.get("fold_ln") else "x = LayerNorm output"
        title = (
            f"{model_id} — layer {hd['layer']}, head {hd['head']}: top {opts['top']} of {doc['n_images']} images "
            f"per mode and sign ({x})"
        )
        jobs.append(
            GridJob(ref, str(Path(root).resolve()), size, title, rows, out / f"top_L{hd['layer']}_H{hd['head']}.png")
        )
    run_jobs(draw_grid, jobs, workers=workers, client=client)
    paths = [job.path for job in jobs]
    ani = doc["anisotropy"]
    n_layers = doc["model"]["layers"]
    paths.append(
        save_figure(
            anisotropy_figure(
                f"{model_id} — anisotropy control ({doc['n_images']} images)",
                layers,
                n_layers,
                np.array(ani["mean_cosine"], float),
                np.array(ani["weighted_cosine"], float),
            ),
            out / "anisotropy.png",
            dpi=DPI,
        )
    )
    return paths
