"""Same-object analysis (paper Fig. 6): do a mode's query and key directions pick the same object?

The paper (end of section 5) takes, per mode, the top 5 images that drive it most; in each
it finds the object with the largest projection on the left singular vector and the one
with the largest projection on the right singular vector, per object area; the probability
that both are the same object, weighted by the singular values as in Fig. 3, is plotted
per layer. The paper gives no code; qkweights fixes the protocol as follows.

1. **Geometry.** The image goes through the model's own preprocessing; its label map
   (:mod:`qkweights.datasets.ade20k`: instance ids, 0 = none) through exactly the same resize and
   crop with nearest-neighbour resampling (:meth:`Preprocess.transform_labels`). Per patch
   p and object o, ``a[o, p]`` = the fraction of the patch's P×P pixels that belong to o
   (pixels beyond the last whole patch are dropped, as the patch embedding drops them).
   Objects with ``Σ_p a[o, p] < 1`` (less than one patch in all) are dropped; an image with
   fewer than 2 objects left is **not eligible** (listed under ``skipped``, not scored).
2. **Embedding.** ``x_p`` = the LayerNorm output feeding W_q/W_k in the block
   (``attention_inputs[l]``), patch tokens only; projections in float64.
3. **Selection** per (layer, head, mode n) over the eligible images: for s = ±1,
   ``score_s = max_p(s·x_p·u_n) · max_p(s·x_p·v_n)``; the image's score is the larger of
   the two with its sign (+1 when they are equal). The top K images by score; equal scores
   go to the earlier image (sorted relative paths).
4. **Objects.** In each selected image with its sign s: ``q_p = s·x_p·u_n``,
   ``k_p = s·x_p·v_n``; ``Q_o = Σ_p a[o,p] q_p / Σ_p a[o,p]`` and ``K_o`` likewise; the query
   object is argmax_o Q_o, the key object argmax_o K_o (the lowest id on ties); same = 1
   when they are one object.
5. **Statistics.** ``p(l,h,n)`` = mean of ``same`` over the selected images;
   ``P(l,h) = Σ_n σ_n p(l,h,n) / Σ_n σ_n`` over the analysed modes; per layer the mean and
   standard error (std ddof 1 / √H) over heads. Chance level: per layer, the mean over all
   selected images (every head, mode and rank) of 1 / (the image's number of objects).

(u_n, σ_n, v_n) come from :func:`qkweights.weights.qk.qk_svd` (the profiles' sign convention; the
protocol is symmetric in the sign of a pair). The sweep is run by :mod:`qkweights.analyses.runner`:
each top-K slot carries, besides the image's list position and score, its sign, query and
key objects, their classes and the image's number of objects, all computed while the
image's maps are at hand, so no second pass over the images is needed; two partials
merge by keeping the K best (:func:`qkweights.analyses.sweep.merge_topk`), which is associative
and commutative, so the result does not depend on where or in which order shards ran.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

import numpy as np

from qkweights.analyses.runner import Batch, DocumentResult, SweepSettings, context, run_sweep
from qkweights.analyses.sweep import (
    READ_ERRORS,
    ModeBank,
    ModeSelection,
    ModeSweep,
    input_size,
    merge_topk,
    mode_bank,
    model_identity,
    model_record,
    opened,
    patch_grid,
    select_modes,
    skip_reason,
)
from qkweights.datasets.ade20k import (
    LAYOUT_TEXT,
    NO_CLASS,
    SegItem,
    open_segmentation,
    read_objects,
)
from qkweights.errors import InputError
from qkweights.outputs import write_csv, write_json
from qkweights.version import __version__
from qkweights.vision.threads import one_blas_thread
from qkweights.weights.modes import mode_source

SCHEMA = "qkweights.same_object/1"
STATE_NAME = ".same_object_state.npz"
CSV_NAME, JSON_NAME = "same_object.csv", "same_object.json"
TOP = 5  # images selected per layer, head and mode unless the selection says
MIN_OBJECTS = 2
NOT_ELIGIBLE = "not eligible"  # the start of a skip reason of an image with fewer than MIN_OBJECTS objects
SLOT = ("sign", "query_object", "key_object", "query_class", "key_class", "n_objects")  # int fields of a top-K slot
CSV_HEADER = [
    "layer",
    "head",
    "mode",
    "rank",
    "image",
    "sign",
    "score",
    "query_object",
    "key_object",
    "query_class",
    "key_class",
    "same",
    "n_objects",
]


# ----------------------------------------------------------------------------- pure math


def patch_fractions(ids: np.ndarray, patch: int) -> tuple[np.ndarray, np.ndarray]:
    """The objects of a label map on the model input and their fraction of each patch.

    ids: (H, W) integer object ids, 0 = no object (the output of
    :meth:`Preprocess.transform_labels`). Rows and columns beyond the last whole P×P patch
    are dropped. Returns (objects (M,) int64, the distinct ids > 0 ascending; a (M, N)
    float64, a[o, p] = share of patch p's P² pixels that belong to objects[o], patches
    row-major over the (H//P, W//P) grid).
    """
    m = np.asarray(ids)
    gh, gw = m.shape[0] // patch, m.shape[1] // patch
    if gh == 0 or gw == 0:
        raise InputError(f"a label map of {m.shape[0]}×{m.shape[1]} pixels holds no whole {patch}×{patch} patch")
    m = (
        m[: gh * patch, : gw * patch]
        .reshape(gh, patch, gw, patch)
        .transpose(0, 2, 1, 3)
        .reshape(gh * gw, patch * patch)
    )  # (N, P²)
    objects, inverse = np.unique(m, return_inverse=True)
    inverse = inverse.reshape(m.shape)  # (N, P²) index into objects
    n = gh * gw
    counts = np.bincount((inverse * n + np.arange(n)[:, None]).ravel(), minlength=len(objects) * n).reshape(
        len(objects), n
    )
    keep = objects > 0
    return objects[keep].astype(np.int64), counts[keep] / float(patch * patch)


def keep_objects(objects: np.ndarray, a: np.ndarray, min_area: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
    """The objects covering at least ``min_area`` patches in all (``Σ_p a[o, p] ≥ min_area``): (objects (M',), a (M',
    N))."""
    keep = a.sum(axis=1) >= min_area
    return objects[keep], a[keep]


def image_scores(p: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Score and sign of each image for each mode column.

    p: (B, N, 2C) projections x_p·w of the patch tokens on [u columns | v columns].
    score_+ = max_p(q)·max_p(k), score_− = max_p(−q)·max_p(−k) = min_p(q)·min_p(k).
    Returns (score (B, C) float64 = max(score_+, score_−), sign (B, C) int64: +1 where
    score_+ ≥ score_−, else −1).
    """
    c = p.shape[2] // 2
    hi, lo = p.max(axis=1), p.min(axis=1)  # (B, 2C)
    plus, minus = hi[:, :c] * hi[:, c:], lo[:, :c] * lo[:, c:]  # (B, C)
    sign = np.where(plus >= minus, 1, -1).astype(np.int64)
    return np.maximum(plus, minus).astype(np.float64), sign


def object_choice(a: np.ndarray, q: np.ndarray, k: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The query and key objects of signed maps: indices into the rows of ``a``.

    a: (M, N) object fractions per patch (every row with a positive sum); q, k: (N, ...)
    signed query and key maps. Q_o = Σ_p a[o,p] q_p / Σ_p a[o,p] (K_o likewise); returns
    (argmax_o Q_o, argmax_o K_o), each of shape q.shape[1:], the first (lowest) row on ties.
    """
    area = a.sum(axis=1)  # (M,)
    w = a / area[:, None]  # (M, N)
    qo, ko = np.tensordot(w, q, axes=(1, 0)), np.tensordot(w, k, axes=(1, 0))  # (M, ...)
    return np.argmax(qo, axis=0), np.argmax(ko, axis=0)


def weighted_probability(same: np.ndarray, valid: np.ndarray, sigma: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """p per mode and the σ-weighted P per head.

    same, valid: (..., N, K) bool: slot k of mode n holds a selected image (valid) whose two
    objects coincide (same). sigma: (..., N). Returns (p (..., N) = mean of same over the
    valid slots, NaN for a mode without one; P (...) = Σ_n σ_n p_n / Σ_n σ_n over the modes
    with a p).
    """
    n_valid = valid.sum(axis=-1)
    with np.errstate(invalid="ignore", divide="ignore"):
        p = np.where(n_valid > 0, (same & valid).sum(axis=-1) / n_valid, np.nan)
        w = np.where(np.isfinite(p), sigma, 0.0)
        big = (w * np.nan_to_num(p)).sum(axis=-1) / w.sum(axis=-1)
    return p, big


def mean_sem(values: np.ndarray) -> tuple[float, float]:
    """Mean and standard error (std ddof 1 / √n) of the finite values; s.e.m. NaN for fewer than two."""
    v = np.asarray(values, np.float64)
    v = v[np.isfinite(v)]
    if not len(v):
        return math.nan, math.nan
    return float(v.mean()), float(v.std(ddof=1) / math.sqrt(len(v))) if len(v) > 1 else math.nan


# ----------------------------------------------------------------------------- one image


@dataclass(frozen=True)
class LabelledImage:
    """One eligible image ready for the forward pass."""

    pixels: np.ndarray  # (3, H, W) float32 model input
    objects: np.ndarray  # (M,) int64 object ids, ascending
    classes: np.ndarray  # (M,) int64 their classes (−1: not known)
    a: np.ndarray  # (M, N) float64 object fraction of each patch


def prepare(model, item: SegItem, size) -> LabelledImage:
    """Read one item: model input, label map on the patch grid, objects of at least one patch.

    InputError (message = the skip reason) when a file is unusable or the image is not
    eligible (fewer than :data:`MIN_OBJECTS` objects left).
    """
    from qkweights.vision.preprocess import open_image

    image = open_image(item.image)  # decoded, EXIF orientation applied
    prep = model.preprocessing if size is None else model.preprocessing.with_size(*size)
    ids, classes = read_objects(item, image.size)
    pixels = prep(image)[0]  # (3, H, W)
    labels = prep.transform_labels(ids)  # (H, W) on the model input
    objects, a = patch_fractions(labels, model.weights.embeddings.patch_size)
    n_all = len(objects)
    objects, a = keep_objects(objects, a)
    if len(objects) < MIN_OBJECTS:
        raise InputError(
            f"{NOT_ELIGIBLE}: {len(objects)} object(s) cover at least one patch "
            f"({n_all} on the model input, {len(classes)} annotated); {MIN_OBJECTS} are needed"
        )
    return LabelledImage(pixels, objects, np.array([classes[int(o)] for o in objects], np.int64), a)


# ----------------------------------------------------------------------------- partial results and the analysis


@dataclass
class SamePartial:
    """The top-K of a set of images per (layer, head·mode column).

    scores, index: (L', C, K) (−inf / −1 for empty slots); slots: (L', C, K, 6) int64 the
    :data:`SLOT` fields of each selected image; n_scored: eligible images scored.
    """

    scores: np.ndarray
    index: np.ndarray
    slots: np.ndarray
    n_scored: int = 0


@dataclass(frozen=True)
class SameObjectAnalysis(ModeSweep):
    """same-object as a :class:`~qkweights.analyses.runner.Analysis`: items are
    :class:`~qkweights.datasets.ade20k.SegItem`."""

    preprocessing: str  # JSON of the model's preprocessing (it decides the label maps' geometry)
    name: ClassVar[str] = "same_object"

    def setup(self, model) -> ModeBank:
        """The chosen modes; per chosen layer the (D, 2C) float64 columns [u_(h,n) … | v_(h,n) …] in (head, mode)
        order."""
        source = mode_source(model.checkpoint)
        return mode_bank(source, list(self.layers), list(self.heads), list(self.modes), dtype=np.float64)

    def item_files(self, item: SegItem) -> list[Path]:
        return [item.image, item.annotation]

    def item_name(self, item: SegItem) -> str:
        return item.name

    def load(self, model, items, positions):
        ok, prepared, skipped = [], [], []
        for pos, item in zip(positions, items):
            try:
                prepared.append(prepare(model, item, self.size))
                ok.append(pos)
            except READ_ERRORS as e:
                skipped.append({"path": item.name, "reason": skip_reason(e, item.image)})
        return (Batch(np.array(ok, np.int64), prepared) if prepared else None), skipped

    def empty(self) -> SamePartial:
        lc = (len(self.layers), len(self.heads) * len(self.modes), 0)
        return SamePartial(np.full(lc, -np.inf), np.full(lc, -1, np.int64), np.zeros(lc + (len(SLOT),), np.int64))

    def compute(self, model, ctx, batch: Batch) -> SamePartial:
        layers, w = ctx.layers, ctx.w
        prepared: list[LabelledImage] = batch.data
        out = model.forward(np.stack([p.pixels for p in prepared]), layers=layers, truncate=True, hidden=False)
        b = len(prepared)
        scores, slots = [], []
        with one_blas_thread():  # one GEMM per image, whatever its neighbours and the thread count
            for li, l in enumerate(layers):
                x = out.attention_inputs[l][:, out.layout.patches].astype(np.float64)  # (B, N, D)
                p = x @ w[li]  # (B, N, 2C)
                c = p.shape[2] // 2
                score, sign = image_scores(p)  # (B, C)
                slot = np.empty((b, c, len(SLOT)), np.int64)
                for i, pr in enumerate(prepared):
                    s = sign[i].astype(np.float64)  # (C,)
                    iq, ik = object_choice(pr.a, p[i, :, :c] * s, p[i, :, c:] * s)  # (C,) each
                    slot[i] = np.stack(
                        [
                            sign[i],
                            pr.objects[iq],
                            pr.objects[ik],
                            pr.classes[iq],
                            pr.classes[ik],
                            np.full(c, len(pr.objects)),
                        ],
                        axis=-1,
                    )
                scores.append(score.T)  # (C, B)
                slots.append(slot.transpose(1, 0, 2))  # (C, B, 6)
        index = np.broadcast_to(batch.positions, (len(layers), scores[0].shape[0], b)).astype(np.int64)
        new = SamePartial(np.array(scores), index, np.array(slots), b)
        return self.merge(self.empty(), new)

    def merge(self, a: SamePartial, b: SamePartial) -> SamePartial:
        cat = [np.concatenate(pair, axis=2) for pair in zip((a.scores, a.index, a.slots), (b.scores, b.index, b.slots))]
        scores, index, slots = merge_topk(*cat, k=self.top)
        return SamePartial(scores, index, slots, a.n_scored + b.n_scored)

    def to_arrays(self, p: SamePartial) -> dict[str, np.ndarray]:
        return {"scores": p.scores, "index": p.index, "slots": p.slots, "n_scored": np.array(p.n_scored)}

    def from_arrays(self, z) -> SamePartial:
        return SamePartial(z["scores"], z["index"], z["slots"], int(z["n_scored"]))


# ----------------------------------------------------------------------------- the typed result


@dataclass
class SameObjectResult(DocumentResult):
    """The result of ``same-object``: the ``same_object.json`` document and the selected images.

    doc: the JSON document (schema ``qkweights.same_object/1``); rows: one dict per
    (layer, head, mode, rank) with the keys of :data:`CSV_HEADER` (query_class / key_class
    None where the layout has no classes).
    """

    doc: dict
    rows: list[dict]
    files: list[Path] = field(default_factory=list)

    def save(self, out_dir) -> list[Path]:
        """Write ``same_object.csv`` and ``same_object.json`` into ``out_dir``; returns the paths."""
        out = Path(out_dir)
        cells = [
            [("" if r[k] is None else repr(r[k]) if isinstance(r[k], float) else r[k]) for k in CSV_HEADER]
            for r in self.rows
        ]
        return [write_csv(out / CSV_NAME, CSV_HEADER, cells), write_json(out / JSON_NAME, self.doc)]

    @classmethod
    def load(cls, out_dir) -> SameObjectResult:
        """Read a saved result; InputError naming the folder if it holds none."""
        out = Path(out_dir)
        try:
            doc = json.loads((out / JSON_NAME).read_text(encoding="utf-8"))
            with open(out / CSV_NAME, newline="", encoding="utf-8") as f:
                rows = [_typed(r) for r in csv.DictReader(f)]
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise InputError(
                f"{out}: no readable same-object result ({type(e).__name__}: {e}); run same-object into it"
            ) from e
        if doc.get("schema") != SCHEMA:
            raise InputError(f"{out / JSON_NAME}: schema {doc.get('schema')!r}, expected {SCHEMA!r}")
        return cls(doc, rows)


def _typed(r: dict) -> dict:
    out = {k: (int(r[k]) if r[k] != "" else None) for k in CSV_HEADER if k not in ("image", "score")}
    out.update(image=r["image"], score=float(r["score"]))
    return {k: out[k] for k in CSV_HEADER}


def build_rows(items: list[SegItem], st: SamePartial, layers, heads, modes) -> list[dict]:
    """The CSV rows (one per layer, head, mode, rank) from the merged top-K."""
    rows = []
    for li, l in enumerate(layers):
        for hi, h in enumerate(heads):
            for ni, n in enumerate(modes):
                ci = hi * len(modes) + ni
                for rank in range(st.index.shape[-1]):
                    pos = int(st.index[li, ci, rank])
                    if pos < 0:
                        continue
                    sign, qo, ko, qc, kc, m = (int(v) for v in st.slots[li, ci, rank])
                    rows.append(
                        {
                            "layer": l,
                            "head": h,
                            "mode": n,
                            "rank": rank,
                            "image": items[pos].name,
                            "sign": sign,
                            "score": float(st.scores[li, ci, rank]),
                            "query_object": qo,
                            "key_object": ko,
                            "query_class": None if qc == NO_CLASS else qc,
                            "key_class": None if kc == NO_CLASS else kc,
                            "same": int(qo == ko),
                            "n_objects": m,
                        }
                    )
    return rows


def layer_entries(
    st: SamePartial, layers: list[int], heads: list[int], modes: list[int], sigma: np.ndarray, n_layers: int
) -> list[dict]:
    """The ``layers`` entries of the document: per layer P mean, s.e.m., chance and the heads' and modes' values.

    sigma: (L', H', N') of the analysed modes.
    """
    k = st.index.shape[-1]
    shape = (len(layers), len(heads), len(modes), k)
    valid = (st.index >= 0).reshape(shape)
    same = (st.slots[..., 1] == st.slots[..., 2]).reshape(shape)
    p, big = weighted_probability(same, valid, sigma)  # (L', H', N'), (L', H')
    inv = np.where(valid, 1.0 / np.maximum(st.slots[..., 5].reshape(shape), 1), 0.0)
    entries = []
    for li, l in enumerate(layers):
        mean, sem = mean_sem(big[li])
        chance = float(inv[li].sum() / valid[li].sum()) if valid[li].any() else math.nan
        entries.append(
            {
                "layer": l,
                "depth": l / (n_layers - 1) if n_layers > 1 else 0.0,
                "probability": mean,
                "sem": sem,
                "chance": chance,
                "heads": [
                    {
                        "head": h,
                        "probability": float(big[li, hi]),
                        "modes": [
                            {
                                "mode": n,
                                "sigma": float(sigma[li, hi, ni]),
                                "probability": float(p[li, hi, ni]),
                                "n_images": int(valid[li, hi, ni].sum()),
                            }
                            for ni, n in enumerate(modes)
                        ],
                    }
                    for hi, h in enumerate(heads)
                ],
            }
        )
    return entries


def protocol_text(model, size, patch: int) -> dict:
    from qkweights.weights.qk import SIGN_CONVENTION

    prep = model.preprocessing if size is None else model.preprocessing.with_size(*size)
    return {
        "preprocessing": {**dataclasses.asdict(prep), "origin": model.preprocessing_origin},
        "patch_size": patch,
        "geometry": "the label map goes through the image's resize and crop with nearest-neighbour resampling",
        "object_area": "a[o,p] = share of patch p's pixels in object o; objects with sum_p a[o,p] < 1 are dropped",
        "eligible": f"images with at least {MIN_OBJECTS} objects left",
        "embedding": "attention_inputs[l]: the LayerNorm output feeding W_q/W_k, patch tokens only",
        "score": (
            "max over s = +1, -1 of max_p(s x_p.u_n) * max_p(s x_p.v_n); the larger, with its sign (+1 on equality)"
        ),
        "ties": "equal scores: the earlier image (sorted relative paths) first",
        "objects": (
            "Q_o = sum_p a[o,p] q_p / sum_p a[o,p] with q_p = s x_p.u_n (K_o with v_n); argmax, the lowest id on ties"
        ),
        "probability": (
            "p = mean of same over the selected images; P = sum_n sigma_n p_n / sum_n sigma_n; per layer mean "
            "and s.e.m. (ddof 1) over heads"
        ),
        "chance": "per layer, the mean over the selected images of 1 / (number of objects)",
        "sign_convention": SIGN_CONVENTION,
    }


# ----------------------------------------------------------------------------- the command


def run_same_object(
    model,
    data_dir,
    out_dir,
    selection: ModeSelection = ModeSelection(),
    settings: SweepSettings = SweepSettings(),
    *,
    progress: Callable[[int, int], object] | None = None,
    notes: Callable[[str], object] | None = None,
) -> SameObjectResult:
    """Run the same-object protocol (module docstring) on ``data_dir``; write the outputs into ``out_dir``.

    model: a :class:`qkweights.vision.model.VisionModel` or a MODEL argument
    (:func:`~qkweights.analyses.sweep.opened`). data_dir: a folder in one of the layouts of
    :mod:`qkweights.datasets.ade20k`. selection: the modes, and the images selected per mode
    (:class:`~qkweights.analyses.sweep.ModeSelection`); settings: batch and shard sizes, and where the shards
    run (:class:`~qkweights.analyses.runner.SweepSettings`; the result is the same). progress(done, total):
    images consumed, at the start and after each shard; notes(text): what the caller may
    tell the user (a resumed or ignored state). Writes ``same_object.csv`` and ``same_object.json``
    (the figures are :func:`qkweights.figures.same_object.draw_same_object`'s); resumable from
    ``out_dir/.same_object_state.npz``. InputError when no image is eligible (existing outputs are kept).
    The caller holds ``out_dir`` (:func:`qkweights.outputs.claim_dir`), as :func:`qkweights.workflow.same_object`
    does.
    """
    model = opened(model)
    d = model.dims
    root, out = Path(data_dir), Path(out_dir)
    layers, heads, modes, top = select_modes(d, selection, settings, TOP)
    data = open_segmentation(root)
    items = data.items
    size = input_size(model)
    patch = model.weights.embeddings.patch_size
    prep_json = json.dumps(dataclasses.asdict(model.preprocessing), sort_keys=True, default=str)
    an = SameObjectAnalysis(str(root.resolve()), tuple(layers), tuple(heads), tuple(modes), top, size, prep_json)
    state_path = out / STATE_NAME
    source = model_identity(model)
    sweep = run_sweep(
        an,
        model,
        items,
        settings,
        state_path=state_path,
        source=source,
        progress=progress,
        notes=notes,
    )
    st: SamePartial = sweep.partial
    skipped = sorted(
        [{"image": s["path"], "reason": s["reason"]} for s in sweep.skipped]
        + [{"image": name, "reason": why} for name, why in data.missing],
        key=lambda s: s["image"],
    )
    if st.n_scored == 0:
        state_path.unlink(missing_ok=True)
        first = f" (first: {skipped[0]['image']}: {skipped[0]['reason']})" if skipped else ""
        raise InputError(
            f"{root}: none of the {len(items) + len(data.missing)} images is eligible{first}; "
            f"each needs {MIN_OBJECTS} annotated objects of at least one patch; existing outputs in {out} are kept"
        )
    bank = context(an, sweep.ref, model)
    n_ineligible = sum(s["reason"].startswith(NOT_ELIGIBLE) for s in skipped)
    gh, gw = patch_grid(model, size)
    doc = {
        "schema": SCHEMA,
        "tool_version": __version__,
        "source": source,
        "model": model_record(model, head_dim=d.head_dim, patch_size=patch, grid=[gh, gw]),
        "dataset": {
            "root": str(root.resolve()),
            "layout": data.layout,
            "layout_text": LAYOUT_TEXT[data.layout],
            "n_images": len(items) + len(data.missing),
            "n_eligible": st.n_scored,
            "n_ineligible": n_ineligible,
            "n_unusable": len(skipped) - n_ineligible,
        },
        "options": {
            "layers": layers,
            "heads": heads,
            "modes": modes,
            "top": top,
            "input_size": list(size or ()),
        },
        "protocol": protocol_text(model, size, patch),
        "fingerprint": sweep.fingerprint,
        "blas": sweep.kernels(),
        "skipped": skipped,
        "layers": layer_entries(st, layers, heads, modes, bank.sigma, d.layers),
    }
    result = SameObjectResult(doc, build_rows(items, st, layers, heads, modes))
    result.files = result.save(out)
    state_path.unlink(missing_ok=True)
    return result
