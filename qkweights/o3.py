"""O3 attention allocation (paper Fig. 2 B–D): where the tokens on a target and on a distractor attend.

For each image of an Odd-One-Out folder (:mod:`qkweights.o3data`; method §6) and each
layer and head, the attention row of one token on the singleton target and of one token
on the distractors is split into the share that falls on the target, on the distractors
and on the background. Protocol (the paper leaves these choices open; qkweights makes
them as follows):

1. **Image.** The model's own preprocessing (:meth:`VisionModel.preprocess`: the
   checkpoint's resize, centre crop and normalisation), whatever the photo's size.
2. **Masks.** Each mask is thresholded at 128 (:func:`qkweights.o3data.load_mask`),
   then given the image's geometric transform (:meth:`Preprocess.transform_mask`:
   the same resize and crop, with PIL's antialiased bilinear filter on the 0/1 mask),
   then averaged over each P×P patch: fractional masks target ``t`` and distractor
   ``d`` on the patch grid (gh, gw), and background ``b = clip(1 − t − d, 0, 1)``.
3. **Tokens.** The target token is the patch where ``t`` is largest, the distractor
   token the patch where ``d`` is largest; ties go to the first patch in raster order
   (row by row, left to right).
4. **Attention.** The model's forward pass gives each layer's and head's softmax over
   all T tokens, special ones (CLS, distillation, registers) included, as the model
   computes it. The two tokens' rows are restricted to the patch tokens and
   renormalised to sum to 1.
5. **Ratios.** Per image, layer and head, six inner products of a renormalised row with
   a mask: ``tt = Σ_patches a_target · t``, ``td = Σ a_target · d``,
   ``tb = Σ a_target · b``, and ``dt``, ``dd``, ``db`` from the distractor's row.
   As the masks do not overlap, ``t + d + b = 1`` on every patch and ``tt + td + tb = 1``.
6. **Summary.** Per image and layer, "same object" = mean(tt, dd), "different object"
   = mean(td, dt), "background" = mean(tb, db), each averaged over heads; then the mean
   and standard error of the mean (ddof 1) over images, per layer, against the
   normalised depth l/(L−1). "uniform" in the summary is what attention spread evenly
   over the patches would give (per image the mean of the masks; "same" and
   "different" coincide there), as a chance level.

Images are skipped, with the reason listed, when their masks are missing, a file is
unreadable or of another size than its image, or the target or distractor mask is
empty on the patch grid (no pixel ≥ 128, or the object lies outside the crop).

Outputs in ``out_dir``: ``o3.csv`` (image, layer, head, tt, td, tb, dt, dd, db),
``o3_summary.json`` (schema ``qkweights.o3/1``, read by :mod:`qkweights.compare`) and
``o3_by_layer.png``. A run is resumable: after each batch its results are written
atomically to ``out_dir/.o3_state/batch_NNNNN.npz`` with a fingerprint of the model
(weight file digests), the preprocessing, the batch size and the images (names, sizes,
modification times); re-running the same command continues after the last completed
batch and gives the same outputs as an uninterrupted run. State with another
fingerprint is ignored (with a note on stderr) and removed.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import shutil
import sys
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from qkweights.errors import InputError
from qkweights.figures import DEPTH_LABEL
from qkweights.forward import TokenLayout, token_layout
from qkweights.load import source_record
from qkweights.o3data import MASK_THRESHOLD, O3Item, load_masks, open_o3
from qkweights.outputs import atomic_path, save_figure, write_csv, write_json
from qkweights.vision import VisionModel, load_model

SCHEMA = "qkweights.o3/1"
RATIOS = ("tt", "td", "tb", "dt", "dd", "db")
MEASURES = {"same": (0, 4), "different": (1, 3), "background": (2, 5)}  # measure → the two RATIOS it averages
MEASURE_TITLES = {"same": "same object", "different": "different object", "background": "background"}
ATTENTION_BUDGET = 1 << 30  # bytes of attention probabilities one forward pass may keep
STATE_DIR = ".o3_state"
CSV_NAME, SUMMARY_NAME, FIGURE_NAME = "o3.csv", "o3_summary.json", "o3_by_layer.png"


# ----------------------------------------------------------------------------- pure math


def patch_masks(target: np.ndarray, distractor: np.ndarray, patch: int) -> np.ndarray:
    """Fractional masks on the patch grid: (3, gh, gw) float64 = target, distractor, background.

    target, distractor: (H, W) values in [0, 1] on the model input (the output of
    :meth:`Preprocess.transform_mask`). Each patch gets the mean of its P×P pixels
    (P = ``patch``); rows and columns beyond the last whole patch are dropped, as the
    patch embedding drops them. Background = clip(1 − target − distractor, 0, 1).
    """
    t, d = np.asarray(target, np.float64), np.asarray(distractor, np.float64)
    if t.shape != d.shape or t.ndim != 2:
        raise InputError(f"target mask {t.shape} and distractor mask {d.shape} must be 2-D of one shape")
    gh, gw = t.shape[0] // patch, t.shape[1] // patch
    if gh == 0 or gw == 0:
        raise InputError(f"masks of {t.shape[0]}×{t.shape[1]} pixels hold no whole {patch}×{patch} patch")
    m = np.stack([t, d])[:, : gh * patch, : gw * patch]  # (2, gh·P, gw·P)
    m = m.reshape(2, gh, patch, gw, patch).mean(axis=(2, 4))  # (2, gh, gw)
    return np.concatenate([m, np.clip(1.0 - m[0] - m[1], 0.0, 1.0)[None]])


def token_choice(masks: np.ndarray) -> np.ndarray:
    """(2,) int: flat patch index (row-major over (gh, gw)) of the target and the distractor token.

    masks: (3, gh, gw) from :func:`patch_masks`. Each index is the argmax of its mask,
    the first in raster order on ties.
    """
    m = np.asarray(masks)
    return np.array([np.argmax(m[0].ravel()), np.argmax(m[1].ravel())], dtype=np.int64)


def allocation(rows: np.ndarray, masks: np.ndarray) -> np.ndarray:
    """The six ratios of one image: (..., 6) float64 = tt, td, tb, dt, dd, db.

    rows: (..., 2, N) attention probabilities of the target token (row 0) and the
    distractor token (row 1) over the N = gh·gw patch tokens, e.g. (L, H, 2, N); the
    mass on special tokens is already dropped, and each row is renormalised here to
    sum to 1. masks: (3, gh, gw) target, distractor, background. A row with no mass
    on the patches gives NaN.
    """
    r = np.asarray(rows, np.float64)
    m = np.asarray(masks, np.float64).reshape(3, -1)  # (3, N)
    if r.ndim < 2 or r.shape[-2] != 2 or r.shape[-1] != m.shape[1]:
        raise InputError(f"attention rows {r.shape} do not fit masks {np.shape(masks)}; expected (..., 2, {m.shape[1]})")
    with np.errstate(invalid="ignore", divide="ignore"):
        ratios = (r @ m.T) / r.sum(axis=-1, keepdims=True)  # (..., 2, 3)
    return ratios.reshape(*r.shape[:-2], 6)


def attention_rows(attentions: dict[int, np.ndarray], layout: TokenLayout, tokens: np.ndarray) -> np.ndarray:
    """The chosen tokens' attention over the patch keys, for every layer in ``attentions``.

    attentions: layer → (B, H, T, T) probabilities (query row, key column); tokens:
    (B, 2) flat patch indices of the target and distractor token of each image.
    Returns (B, L', H, 2, N) for the L' layers in ascending order, N = gh·gw.
    """
    query = layout.patches.start + np.asarray(tokens)  # (B, 2) token indices
    batch = np.arange(len(query))[:, None]  # (B, 1)
    per_layer = [attentions[l][batch, :, query, layout.patches] for l in sorted(attentions)]  # L' × (B, 2, H, N)
    return np.stack(per_layer, axis=1).swapaxes(2, 3)  # (B, L', H, 2, N)


def layer_statistics(values: np.ndarray) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Per-layer mean and s.e.m. over images of each measure.

    values: (I, L, H, 6) ratios. Per image and layer a measure is the mean of its two
    ratios (:data:`MEASURES`) over the heads; then mean and std(ddof=1)/√I over the I
    images (s.e.m. NaN for one image). Returns measure → (mean (L,), sem (L,)).
    """
    v = np.asarray(values, np.float64)
    out = {}
    for name, pair in MEASURES.items():
        per_image = v[..., list(pair)].mean(axis=(2, 3))  # (I, L)
        n = per_image.shape[0]
        sem = per_image.std(axis=0, ddof=1) / math.sqrt(n) if n > 1 else np.full(per_image.shape[1], np.nan)
        out[name] = (per_image.mean(axis=0), sem)
    return out


# ----------------------------------------------------------------------------- one image, one batch


@dataclass(frozen=True)
class Prepared:
    """One image ready for the forward pass."""

    pixels: np.ndarray  # (3, H, W) float32 model input
    masks: np.ndarray  # (3, gh, gw) float64 target, distractor, background on the patch grid
    tokens: np.ndarray  # (2,) flat patch index of the target and the distractor token


def prepare(model: VisionModel, item: O3Item) -> Prepared:
    """Preprocess one O3 item; InputError (message = the skip reason) if it can not be used."""
    pixels = model.preprocess(item.image)[0]  # (3, H, W)
    target, distractor = load_masks(item)  # bool (H0, W0) each
    patch = model.weights.embeddings.patch_size
    masks = patch_masks(
        model.preprocessing.transform_mask(target), model.preprocessing.transform_mask(distractor), patch
    )
    for k, (what, full) in enumerate((("target", target), ("distractor", distractor))):
        if not masks[k].any():
            raise InputError(
                f"{what} mask is empty: no pixel >= {MASK_THRESHOLD}" if not full.any() else
                f"{what} mask is empty on the {masks.shape[1]}×{masks.shape[2]} patch grid "
                f"(the object lies outside the model's {pixels.shape[1]}×{pixels.shape[2]} input)"
            )
    return Prepared(pixels, masks, token_choice(masks))


def forward_rows(model: VisionModel, pixels: np.ndarray, tokens: np.ndarray, budget: int = ATTENTION_BUDGET) -> np.ndarray:
    """Attention rows of the chosen tokens in every layer: (B, L, H, 2, N) float32.

    pixels: (B, 3, H, W) model input; tokens: (B, 2) flat patch indices. The forward
    pass keeps the attentions of all layers (B·L·H·T·T float32); images are split
    into smaller forward passes so that at most ``budget`` bytes are kept, and when a
    single image's attentions exceed it, layers are taken in chunks (one forward
    pass per chunk).
    """
    b, _, h, w = pixels.shape
    wt = model.weights
    n_layers, heads, p = len(wt.blocks), wt.heads, wt.embeddings.patch_size
    layout = token_layout(wt.embeddings, (h // p, w // p))
    per_layer = heads * layout.n_tokens**2 * 4  # bytes of one image's attentions in one layer
    images = max(1, min(b, budget // (per_layer * n_layers)))
    chunk = n_layers if per_layer * n_layers <= budget else max(1, budget // per_layer)
    n_patches = layout.grid[0] * layout.grid[1]
    out = np.empty((b, n_layers, heads, 2, n_patches), np.float32)  # (B, L, H, 2, N)
    for i in range(0, b, images):
        for l0 in range(0, n_layers, chunk):
            layers = None if chunk == n_layers else range(l0, min(n_layers, l0 + chunk))
            fo = model.forward(pixels[i : i + images], attentions=True, layers=layers)
            out[i : i + images, l0 : l0 + chunk] = attention_rows(fo.attentions, fo.layout, tokens[i : i + images])
    return out


@dataclass(frozen=True)
class BatchResult:
    """The outcome of one batch of items, in item order.

    names (n,); reasons (n,): "" for an image used, else why it was skipped;
    values (n_used, L, H, 6) ratios of the images used; areas (n_used, 3) the mean of
    each patch mask (target, distractor, background) = the ratios of uniform attention.
    """

    names: np.ndarray
    reasons: np.ndarray
    values: np.ndarray
    areas: np.ndarray


def run_batch(model: VisionModel, items: list[O3Item]) -> BatchResult:
    """Prepare, run and measure a batch of items (images of one input size share a forward pass)."""
    prepared: dict[int, Prepared] = {}
    reasons = [""] * len(items)
    for i, item in enumerate(items):
        try:
            prepared[i] = prepare(model, item)
        except InputError as exc:
            reasons[i] = str(exc)
    wt = model.weights
    shape = (len(wt.blocks), wt.heads, len(RATIOS))
    values = {}
    for size in dict.fromkeys(p.pixels.shape for p in prepared.values()):
        group = [i for i, p in prepared.items() if p.pixels.shape == size]
        pixels = np.stack([prepared[i].pixels for i in group])  # (B, 3, H, W)
        rows = forward_rows(model, pixels, np.stack([prepared[i].tokens for i in group]))  # (B, L, H, 2, N)
        for i, r in zip(group, rows):
            values[i] = allocation(r, prepared[i].masks)  # (L, H, 6)
    used = sorted(values)
    return BatchResult(
        names=np.array([item.name for item in items]),
        reasons=np.array(reasons),
        values=np.stack([values[i] for i in used]) if used else np.empty((0, *shape)),
        areas=np.array([prepared[i].masks.reshape(3, -1).mean(axis=1) for i in used]).reshape(-1, 3),
    )


# ----------------------------------------------------------------------------- resumable state


def _file_stat(path: Path) -> list:
    st = path.stat()
    return [path.name, st.st_size, st.st_mtime_ns]


def _source_json(model: VisionModel) -> dict:
    if model.source is not None:
        return source_record(model.source, model.checkpoint)
    return {"model_id": model.checkpoint.spec.name}


def fingerprint(model: VisionModel, items: list[O3Item], batch_size: int) -> str:
    """sha256 hex of what a partial run depends on: the model's weight files, its preprocessing, the batch size
    and each item's three files (name, size, modification time)."""
    doc = {
        "schema": SCHEMA,
        "source": _source_json(model),
        "preprocessing": dataclasses.asdict(model.preprocessing),
        "batch_size": batch_size,
        "images": [[it.name] + [_file_stat(p) for p in (it.image, it.target_mask, it.distractor_mask)] for it in items],
    }
    return hashlib.sha256(json.dumps(doc, sort_keys=True).encode()).hexdigest()


def _batch_path(state: Path, j: int) -> Path:
    return state / f"batch_{j:05d}.npz"


def _read_batch(path: Path) -> tuple[str, BatchResult]:
    """(fingerprint, result) of a saved batch; OSError/ValueError/KeyError/BadZipFile if unreadable."""
    with np.load(path, allow_pickle=False) as z:
        return str(z["fingerprint"]), BatchResult(z["names"], z["reasons"], z["values"], z["areas"])


def load_state(state: Path, fp: str, batches: list[list[O3Item]]) -> list[BatchResult]:
    """The completed batches 0 … k−1 saved in ``state`` for fingerprint ``fp``.

    State written for another fingerprint (or unreadable) is removed, with a note on
    stderr, and nothing is resumed.
    """
    done: list[BatchResult] = []
    problem = None
    for j, batch in enumerate(batches):
        path = _batch_path(state, j)
        if not path.is_file():
            break
        try:
            saved_fp, result = _read_batch(path)
        except (OSError, ValueError, KeyError, zipfile.BadZipFile) as exc:
            problem = f"{path.name} is unreadable ({exc})"
            break
        if saved_fp != fp or list(result.names) != [it.name for it in batch]:
            problem = "it was written for other arguments, model or images"
            break
        done.append(result)
    if problem is None:
        return done
    print(f"qkweights: note: ignoring the partial O3 run in {state}: {problem}; starting over", file=sys.stderr)
    shutil.rmtree(state, ignore_errors=True)
    return []


def save_batch(state: Path, j: int, fp: str, result: BatchResult) -> None:
    """Write batch ``j``'s result atomically into ``state``."""
    state.mkdir(parents=True, exist_ok=True)
    with atomic_path(_batch_path(state, j)) as tmp:
        with open(tmp, "wb") as f:
            np.savez(f, fingerprint=np.array(fp), names=result.names, reasons=result.reasons,
                     values=result.values, areas=result.areas)


# ----------------------------------------------------------------------------- the analysis


def select_items(root: str | Path, max_images: int | None) -> tuple[list[O3Item], list[tuple[str, str]], int]:
    """The first ``max_images`` images of an O3 folder by name (all if None).

    Returns (items with both masks, (name, reason) of selected images lacking a mask,
    number of images in the folder).
    """
    data = open_o3(root)
    names = sorted([it.name for it in data.items] + [name for name, _ in data.missing])
    chosen = set(names if max_images is None else names[:max_images])
    items = [it for it in data.items if it.name in chosen]
    missing = [(name, why) for name, why in data.missing if name in chosen]
    return items, missing, len(names)


def _protocol(model: VisionModel, batch_size: int, max_images: int | None) -> dict:
    prep = model.preprocessing
    patch = model.weights.embeddings.patch_size
    size = prep.crop or prep.size
    return {
        "input_size": list(size) if size else None,
        "patch_size": patch,
        "grid": [size[0] // patch, size[1] // patch] if size else None,
        "preprocessing": {**dataclasses.asdict(prep), "origin": model.preprocessing_origin},
        "mask_threshold": MASK_THRESHOLD,
        "mask_downscale": "the image's resize and crop with a bilinear filter, then the mean over each patch",
        "background": "clip(1 - target - distractor, 0, 1)",
        "token_choice": "argmax of the patch mask, first in raster order on ties",
        "attention": "softmax over all tokens (special tokens included); the row restricted to patch tokens and renormalised to sum 1",
        "batch_size": batch_size,
        "max_images": max_images,
    }


def summarise(model: VisionModel, values: np.ndarray, areas: np.ndarray, skipped: list[dict], dataset: dict,
              protocol: dict) -> dict:
    """The ``o3_summary.json`` document from the ratios (I, L, H, 6) and mask areas (I, 3) of the images used."""
    n_layers = values.shape[1]
    stats = layer_statistics(values)
    dims = model.dims
    uniform = areas.mean(axis=0)  # (3,) target, distractor, background fraction
    return {
        "schema": SCHEMA,
        "source": _source_json(model),
        "model": {"family": model.checkpoint.spec.name, "layers": dims.layers, "heads": dims.heads,
                  "hidden": dims.hidden, "patch_size": protocol["patch_size"]},
        "protocol": protocol,
        "dataset": dataset,
        "images_used": int(values.shape[0]),
        "skipped": skipped,
        "uniform": {"same": float(uniform[:2].mean()), "different": float(uniform[:2].mean()),
                    "background": float(uniform[2])},
        "layers": [
            {"layer": l, "depth": l / (n_layers - 1) if n_layers > 1 else 0.0,
             **{name: {"mean": float(mean[l]), "sem": float(sem[l])} for name, (mean, sem) in stats.items()}}
            for l in range(n_layers)
        ],
    }


def o3_allocation(model: VisionModel | str, o3_dir: str | Path, out_dir: str | Path, *, max_images: int | None = None,
                  batch_size: int = 8, progress: Callable[[int, int], object] | None = None,
                  plots: bool = True) -> dict:
    """Run the O3 protocol (module docstring) and write o3.csv, o3_summary.json and (if ``plots``) o3_by_layer.png.

    model: a :class:`VisionModel` or a MODEL argument for :func:`load_model`.
    max_images: use the first N images by name (None: all). batch_size: images per
    forward pass and per saved step of the resumable state. progress: called as
    ``progress(done, total)`` with images processed (used or skipped) after each
    batch and once at the start. Returns the summary document.
    """
    if isinstance(model, str):
        model = load_model(model)
    if batch_size < 1:
        raise InputError(f"batch size {batch_size} is not positive; pass --batch-size 1 or more")
    if max_images is not None and max_images < 1:
        raise InputError(f"--max-images {max_images} is not positive; pass 1 or more, or leave it out for all images")
    items, missing, n_found = select_items(o3_dir, max_images)
    out = Path(out_dir)
    state = out / STATE_DIR
    fp = fingerprint(model, items, batch_size)
    batches = [items[i : i + batch_size] for i in range(0, len(items), batch_size)]
    results = load_state(state, fp, batches) if state.is_dir() else []
    done = sum(len(b) for b in batches[: len(results)])
    if results:
        print(f"qkweights: resuming the O3 run in {out}: {done} of {len(items)} images already done", file=sys.stderr)
    if progress is not None:
        progress(done, len(items))
    for j in range(len(results), len(batches)):
        results.append(run_batch(model, batches[j]))
        save_batch(state, j, fp, results[-1])
        done += len(batches[j])
        if progress is not None:
            progress(done, len(items))

    names = [str(n) for r in results for n, why in zip(r.names, r.reasons) if not why]
    skipped = sorted([(str(n), str(why)) for r in results for n, why in zip(r.names, r.reasons) if why] + missing)
    if not names:
        first = f" (first: {skipped[0][0]}: {skipped[0][1]})" if skipped else ""
        raise InputError(f"{o3_dir}: none of the {len(items) + len(missing)} selected images is usable{first}; check the masks")
    values = np.concatenate([r.values for r in results])  # (I, L, H, 6)
    areas = np.concatenate([r.areas for r in results])  # (I, 3)
    dataset = {"root": str(Path(o3_dir).resolve()), "images_found": n_found, "images_selected": len(items) + len(missing)}
    summary = summarise(model, values, areas, [{"image": n, "reason": why} for n, why in skipped], dataset,
                        _protocol(model, batch_size, max_images))
    write_csv(out / CSV_NAME, ["image", "layer", "head", *RATIOS], _csv_rows(names, values))
    write_json(out / SUMMARY_NAME, summary)
    if plots:
        o3_figure(summary, out / FIGURE_NAME)
    shutil.rmtree(state, ignore_errors=True)
    return summary


def _csv_rows(names: list[str], values: np.ndarray):
    """Rows (image, layer, head, six ratios) in image, layer, head order; floats as their shortest repr."""
    _, n_layers, heads, _ = values.shape
    for name, v in zip(names, values.tolist()):
        for l in range(n_layers):
            for h in range(heads):
                yield [name, l, h, *v[l][h]]


# ----------------------------------------------------------------------------- figure


def o3_figure(summary: dict, path: str | Path) -> Path:
    """Paper Fig. 2 B–D for one model, as a PNG at ``path``.

    Three panels (same object, different object, background) of the mean ± s.e.m.
    over images against the normalised layer l/(L−1) (layer index on the top axis),
    each with the uniform-attention level dashed; the first two share their y axis.
    """
    layers = summary["layers"]
    n_layers = len(layers)
    depth = np.array([e["depth"] for e in layers], np.float64)
    fig = Figure(figsize=(12, 4.4), layout="constrained")
    axes = fig.subplots(1, 3)
    axes[1].sharey(axes[0])
    for ax, (key, title) in zip(axes, MEASURE_TITLES.items()):
        mean, sem = (np.array([np.nan if e[key][s] is None else e[key][s] for e in layers], np.float64)
                     for s in ("mean", "sem"))
        ax.fill_between(depth, mean - sem, mean + sem, color="C0", alpha=0.2, lw=0, label="± s.e.m. over images")
        ax.plot(depth, mean, "o-", color="C0", ms=3.5, lw=1.5, label="mean over images and heads")
        ax.axhline(summary["uniform"][key], color="0.4", ls="--", lw=1, label="uniform attention over the patches")
        ax.set_title(title, fontsize=10)
        ax.set_xlim(-0.03, 1.03)
        ax.set_xlabel(DEPTH_LABEL)
        ax.grid(alpha=0.3, lw=0.5)
        if n_layers > 1:
            top = ax.secondary_xaxis("top", functions=(lambda d: d * (n_layers - 1), lambda l: l / (n_layers - 1)))
            top.xaxis.set_major_locator(MaxNLocator(integer=True, nbins=min(n_layers, 12)))
            top.tick_params(labelsize=8)
    axes[0].set_ylabel("share of the token's attention over the patches")
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside lower center", ncols=3, fontsize=8)
    model = summary["model"]
    name = summary["source"].get("model_id") or model["family"]
    fig.suptitle(f"O3 attention allocation: {name}\n{summary['images_used']} images, {model['layers']} layers × "
                 f"{model['heads']} heads; top axis: layer index", fontsize=10)
    return save_figure(fig, path)
