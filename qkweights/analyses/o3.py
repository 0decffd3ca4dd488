"""O3 attention allocation (paper Fig. 2 B–D): where the tokens on a target and on a distractor attend.

For each image of an Odd-One-Out folder (:mod:`qkweights.datasets.o3`; method §6) and each
layer and head, the attention row of one token on the singleton target and of one token
on the distractors is split into the share that falls on the target, on the distractors
and on the background. Protocol (the paper leaves these choices open; qkweights makes
them as follows):

1. **Image.** The model's own preprocessing (:meth:`VisionModel.preprocess`: the
   checkpoint's resize, centre crop and normalisation), whatever the photo's size.
2. **Masks.** Each mask is thresholded at 128 (:func:`qkweights.datasets.o3.load_mask`),
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

Outputs in ``out_dir`` (:class:`O3Result`): ``o3.csv`` (image, layer, head, tt, td, tb,
dt, dd, db) and ``o3_summary.json`` (schema ``qkweights.o3/1``, read by
:mod:`qkweights.figures.compare`); the workflow draws ``o3_by_layer.png`` from the summary
(:mod:`qkweights.figures.o3`). The sweep is run by :mod:`qkweights.analyses.runner` (shards on
this process, local workers or a Dask cluster; resumable from ``out_dir/.o3_state.npz``): the
partial result of a set of images is their rows with their list positions (:class:`O3Partial`),
merged in list order. The forward pass keeps only the two chosen query rows of each layer's
attention, so memory does not grow with the number of layers.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import numpy as np

from qkweights.analyses.runner import Analysis, Batch, DocumentResult, SweepSettings, run_sweep
from qkweights.analyses.sweep import READ_ERRORS, model_identity, model_record, opened, skip_reason
from qkweights.datasets.o3 import MASK_THRESHOLD, O3Item, load_masks, open_o3
from qkweights.errors import InputError
from qkweights.outputs import write_csv, write_json
from qkweights.version import __version__
from qkweights.vision.forward import token_layout
from qkweights.vision.model import VisionModel
from qkweights.vision.threads import one_blas_thread

SCHEMA = "qkweights.o3/1"
RATIOS = ("tt", "td", "tb", "dt", "dd", "db")
MEASURES = {"same": (0, 4), "different": (1, 3), "background": (2, 5)}  # measure → the two RATIOS it averages
STATE_NAME = ".o3_state.npz"
CSV_NAME, SUMMARY_NAME = "o3.csv", "o3_summary.json"


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
        raise InputError(
            f"attention rows {r.shape} do not fit masks {np.shape(masks)}; expected (..., 2, {m.shape[1]})"
        )
    with np.errstate(invalid="ignore", divide="ignore"):
        ratios = (r @ m.T) / r.sum(axis=-1, keepdims=True)  # (..., 2, 3)
    return ratios.reshape(*r.shape[:-2], 6)


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
class MaskedImage:
    """One image ready for the forward pass."""

    pixels: np.ndarray  # (3, H, W) float32 model input
    masks: np.ndarray  # (3, gh, gw) float64 target, distractor, background on the patch grid
    tokens: np.ndarray  # (2,) flat patch index of the target and the distractor token


def prepare(model: VisionModel, item: O3Item) -> MaskedImage:
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
                f"{what} mask is empty: no pixel >= {MASK_THRESHOLD}"
                if not full.any()
                else f"{what} mask is empty on the {masks.shape[1]}×{masks.shape[2]} patch grid "
                f"(the object lies outside the model's {pixels.shape[1]}×{pixels.shape[2]} input)"
            )
    return MaskedImage(pixels, masks, token_choice(masks))


def forward_rows(model: VisionModel, pixels: np.ndarray, tokens: np.ndarray) -> np.ndarray:
    """Attention rows of the chosen tokens in every layer, over the patch keys: (B, L, H, 2, N) float32.

    pixels: (B, 3, H, W) model input; tokens: (B, 2) flat patch indices (target,
    distractor). The forward pass keeps only these two query rows of each layer's
    attention (B·L·H·2·T floats) and no residual streams.
    """
    b, _, h, w = pixels.shape
    p = model.weights.embeddings.patch_size
    layout = token_layout(model.weights.embeddings, (h // p, w // p))
    fo = model.forward(
        pixels, attentions=True, rows=layout.patches.start + np.asarray(tokens), hidden=False, inputs=False
    )
    return np.stack([fo.attentions[l][..., layout.patches] for l in sorted(fo.attentions)], axis=1)  # (B, L, H, 2, N)


@dataclass
class O3Partial:
    """The rows of a set of images: positions (I,) in the item list, ascending; values (I, L, H, 6) ratios;
    areas (I, 3) the mean of each patch mask (target, distractor, background) = the ratios of uniform attention."""

    positions: np.ndarray
    values: np.ndarray
    areas: np.ndarray


@dataclass(frozen=True)
class O3Analysis(Analysis):
    """O3 as a :class:`~qkweights.analyses.runner.Analysis`: items are :class:`~qkweights.datasets.o3.O3Item`."""

    n_layers: int
    heads: int
    preprocessing: str  # JSON of the model's preprocessing (it decides the masks' geometry)
    name: ClassVar[str] = "o3"

    def item_files(self, item: O3Item) -> list[Path]:
        return [item.image, item.target_mask, item.distractor_mask]

    def item_name(self, item: O3Item) -> str:
        return item.name

    def load(self, model, items, positions):
        ok, prepared, skipped = [], [], []
        for pos, item in zip(positions, items):
            try:
                prepared.append(prepare(model, item))
                ok.append(pos)
            except READ_ERRORS as exc:
                skipped.append({"path": item.name, "reason": skip_reason(exc, item.image)})
        return (Batch(np.array(ok, np.int64), prepared) if prepared else None), skipped

    def compute(self, model, ctx, batch: Batch) -> O3Partial:
        """Images of one input size share a forward pass."""
        prepared = batch.data
        values = [None] * len(prepared)
        for size in dict.fromkeys(p.pixels.shape for p in prepared):
            group = [i for i, p in enumerate(prepared) if p.pixels.shape == size]
            pixels = np.stack([prepared[i].pixels for i in group])  # (B, 3, H, W)
            rows = forward_rows(model, pixels, np.stack([prepared[i].tokens for i in group]))  # (B, L, H, 2, N)
            with one_blas_thread():  # one image's matrices per BLAS call, whatever the thread count
                for i, r in zip(group, rows):
                    values[i] = allocation(r, prepared[i].masks)  # (L, H, 6)
        return O3Partial(
            batch.positions, np.stack(values), np.array([p.masks.reshape(3, -1).mean(axis=1) for p in prepared])
        )

    def empty(self) -> O3Partial:
        return O3Partial(np.empty(0, np.int64), np.empty((0, self.n_layers, self.heads, len(RATIOS))), np.empty((0, 3)))

    def merge(self, a: O3Partial, b: O3Partial) -> O3Partial:
        order = np.argsort(np.concatenate([a.positions, b.positions]), kind="stable")
        return O3Partial(
            *(
                np.concatenate([x, y])[order]
                for x, y in ((a.positions, b.positions), (a.values, b.values), (a.areas, b.areas))
            )
        )

    def to_arrays(self, p: O3Partial) -> dict[str, np.ndarray]:
        return {"positions": p.positions, "values": p.values, "areas": p.areas}

    def from_arrays(self, z) -> O3Partial:
        return O3Partial(z["positions"], z["values"], z["areas"])


@dataclass
class O3Result(DocumentResult):
    """The result of ``o3``: the summary document and the per-image ratios.

    doc: the ``o3_summary.json`` document (schema ``qkweights.o3/1``); names (I,) the
    images used, in name order; values (I, L, H, 6) their ratios (:data:`RATIOS`).
    """

    doc: dict
    names: list[str]
    values: np.ndarray
    files: list[Path] = dataclasses.field(default_factory=list)

    def save(self, out_dir) -> list[Path]:
        """Write ``o3.csv`` and ``o3_summary.json`` into ``out_dir``; returns the paths."""
        out = Path(out_dir)
        return [
            write_csv(out / CSV_NAME, ["image", "layer", "head", *RATIOS], _csv_rows(self.names, self.values)),
            write_json(out / SUMMARY_NAME, self.doc),
        ]

    @classmethod
    def load(cls, out_dir) -> O3Result:
        """Read a saved result (``o3_summary.json`` and ``o3.csv``); InputError naming the file if it is unusable."""
        out = Path(out_dir)
        try:
            summary = json.loads((out / SUMMARY_NAME).read_text())
            with open(out / CSV_NAME, newline="") as f:
                rows = list(csv.reader(f))[1:]
            model = summary["model"]
            shape = (model["layers"], model["heads"], len(RATIOS))
            names = list(dict.fromkeys(r[0] for r in rows))
            values = np.array([[float(v) for v in r[3:]] for r in rows]).reshape(len(names), *shape)
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise InputError(f"{out}: no readable O3 result ({type(e).__name__}: {e}); run o3 into it") from e
        if summary.get("schema") != SCHEMA:
            raise InputError(f"{out / SUMMARY_NAME}: schema {summary.get('schema')!r}, expected {SCHEMA!r}")
        return cls(summary, names, values)


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


def _protocol(model: VisionModel, max_images: int | None) -> dict:
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
        "attention": (
            "softmax over all tokens (special tokens included); the row restricted to patch tokens and renormalised "
            "to sum 1"
        ),
        "max_images": max_images,
    }


def build_document(
    model: VisionModel, values: np.ndarray, areas: np.ndarray, skipped: list[dict], dataset: dict, protocol: dict
) -> dict:
    """The ``o3_summary.json`` document from the ratios (I, L, H, 6) and mask areas (I, 3) of the images used."""
    n_layers = values.shape[1]
    stats = layer_statistics(values)
    uniform = areas.mean(axis=0)  # (3,) target, distractor, background fraction
    return {
        "schema": SCHEMA,
        "tool_version": __version__,
        "source": model_identity(model),
        "model": model_record(model, patch_size=protocol["patch_size"]),
        "protocol": protocol,
        "dataset": dataset,
        "images_used": int(values.shape[0]),
        "skipped": skipped,
        "uniform": {
            "same": float(uniform[:2].mean()),
            "different": float(uniform[:2].mean()),
            "background": float(uniform[2]),
        },
        "layers": [
            {
                "layer": l,
                "depth": l / (n_layers - 1) if n_layers > 1 else 0.0,
                **{name: {"mean": float(mean[l]), "sem": float(sem[l])} for name, (mean, sem) in stats.items()},
            }
            for l in range(n_layers)
        ],
    }


def run_o3(
    model: VisionModel | str,
    data_dir: str | Path,
    out_dir: str | Path,
    settings: SweepSettings = SweepSettings(),
    *,
    max_images: int | None = None,
    progress: Callable[[int, int], object] | None = None,
    notes: Callable[[str], object] | None = None,
) -> O3Result:
    """Run the O3 protocol (module docstring) and write o3.csv and o3_summary.json (the figure is
    :func:`qkweights.figures.o3.o3_figure`'s).

    model: a :class:`VisionModel` or a MODEL argument (:func:`qkweights.analyses.sweep.opened`).
    max_images: use the first N images by name (None: all). settings: images per forward pass, images per
    shard (the unit of work and of resume) and where the shards run
    (:class:`~qkweights.analyses.runner.SweepSettings`; the result is the same).
    progress(done, total): images consumed (used or skipped), at the start and after each
    shard; notes(text): what the caller may tell the user (a resumed or ignored state).
    InputError when no image is usable (existing outputs are kept). Returns the :class:`O3Result`.
    The caller holds ``out_dir`` (:func:`qkweights.outputs.claim_dir`), as :func:`qkweights.workflow.o3` does.
    """
    model = opened(model)
    batch_size, shard_size = settings.batch_size, settings.shard_size
    if batch_size < 1 or (shard_size is not None and shard_size < 1):
        raise InputError(f"batch size {batch_size}, shard size {shard_size}: both must be at least 1")
    if max_images is not None and max_images < 1:
        raise InputError(f"max_images {max_images} is not positive; give 1 or more, or None for all images")
    items, missing, n_found = select_items(data_dir, max_images)
    out = Path(out_dir)
    state_path = out / STATE_NAME
    an = O3Analysis(
        len(model.weights.blocks),
        model.weights.heads,
        json.dumps(dataclasses.asdict(model.preprocessing), sort_keys=True, default=str),
    )
    sweep = run_sweep(
        an, model, items, settings, state_path=state_path, source=model_identity(model), progress=progress, notes=notes
    )
    part: O3Partial = sweep.partial
    names = [items[i].name for i in part.positions]
    skipped = sorted([(s["path"], s["reason"]) for s in sweep.skipped] + missing)
    if not names:
        first = f" (first: {skipped[0][0]}: {skipped[0][1]})" if skipped else ""
        state_path.unlink(missing_ok=True)
        raise InputError(
            f"{data_dir}: none of the {len(items) + len(missing)} selected images is usable{first}; check the masks"
        )
    dataset = {
        "root": str(Path(data_dir).resolve()),
        "images_found": n_found,
        "images_selected": len(items) + len(missing),
    }
    doc = build_document(
        model,
        part.values,
        part.areas,
        [{"image": n, "reason": why} for n, why in skipped],
        dataset,
        _protocol(model, max_images),
    )
    doc["blas"] = sweep.kernels()
    result = O3Result(doc, names, part.values)
    result.files = result.save(out)
    state_path.unlink(missing_ok=True)
    return result


def _csv_rows(names: list[str], values: np.ndarray):
    """Rows (image, layer, head, six ratios) in image, layer, head order; floats as their shortest repr."""
    _, n_layers, heads, _ = values.shape
    for name, v in zip(names, values.tolist()):
        for l in range(n_layers):
            for h in range(heads):
                yield [name, l, h, *v[l][h]]
