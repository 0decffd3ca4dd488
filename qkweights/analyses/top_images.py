"""The images of a folder that drive each query-key mode most (paper Fig. 4, S4–S19).

Score of an image for (layer l, head h, mode n, sign s), over its patch tokens t only
(CLS, distillation and register tokens excluded) with x the LayerNorm output feeding
W_q/W_k (``attention_inputs[l]``):

    score = max_t(s·x_t·u_n) · max_t(s·x_t·v_n),   s = +1 (sign "+") or −1 (sign "-")

(u_n, v_n from :func:`qkweights.weights.qk.qk_svd`, the profiles' sign convention). Stored with
each winner, as the paper's notebook stores: the two maxima, the means over tokens of
s·x·u_n and s·x·v_n, the means of their top-5 tokens, and the winner's query and key
maps (x_t·u_n, x_t·v_n over the patch grid) for the figures — so the figures need no
second pass over the images.

The sweep is run by :mod:`qkweights.analyses.runner` (shards, executors, resume): each batch is
projected onto every chosen head's U and V at once (one (2·H·N, D) @ (D, N) per image and
layer, so that an image's scores are its own whatever its batch; see :func:`qkweights.vision.forward.forward`),
and the partial result of a set of images is a top-K per (layer, head, mode, sign)
(:class:`TopPartial`); two partials merge by keeping the K best (ties: the earlier path
first), which is associative and commutative, so memory does not grow with the number
of images and the result does not depend on how the sweep ran. Inside a shard each batch
is merged into the shard's top-K in place (:meth:`TopImagesAnalysis.accumulate`), and two
partials merge into a copy of the first (:meth:`TopImagesAnalysis.merge`, which writes with
:meth:`~TopImagesAnalysis.merge_into`): only the images that enter a list are copied (:func:`keep_best`).
The same forward passes give the anisotropy control (paper Fig. S4): per layer, the mean cosine between the
centre patch token's embeddings of different images, from the sum s of their unit
vectors, ``mean_{i≠j} cos = (|s|² − n) / (n(n − 1))``; the sum is kept in fixed point
(integers of 2⁻⁴⁰) so that it too is exact whatever the order of the merges.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

import numpy as np

from qkweights.analyses.runner import Batch, DocumentResult, Sweep, SweepSettings, context, run_sweep
from qkweights.analyses.sweep import (
    ModeBank,
    ModeSelection,
    ModeSweep,
    input_size,
    list_images,
    load_batch,
    mode_bank,
    model_identity,
    model_record,
    opened,
    other_files,
    patch_grid,
    select_modes,
)
from qkweights.checkpoints.folders import listing
from qkweights.errors import InputError
from qkweights.outputs import plural, write_json, write_npz
from qkweights.version import __version__
from qkweights.vision.threads import side_by_side
from qkweights.weights.modes import mode_source

SCHEMA = "qkweights.top_images/1"
STATE_NAME = ".top_images_state.npz"
JSON_NAME = "top_images.json"
MAPS_NAME = "top_images_maps.npz"
TOP = 8  # images kept per layer, head, mode and sign unless the selection says
TOP_MEAN = 5  # tokens in the "top-5 mean" projections
SIGNS = ("+", "-")
STATS = ("max_query", "max_key", "mean_query", "mean_key", "top5_query", "top5_key")  # per winner, for its sign
SCORE_TEXT = "max_t(s·x_t·u_n) · max_t(s·x_t·v_n) over patch tokens t, s = +1 for sign '+', −1 for sign '-'"
CENTRE_TEXT = "centre patch token: row gh//2, column gw//2 of the patch grid"
UNIT = 2.0**40  # fixed-point scale of the anisotropy sums: exact, order-free integer sums


# ----------------------------------------------------------------------------- scores


def batch_stats(p: np.ndarray) -> np.ndarray:
    """Score and projection statistics of a batch for every column pair of the projections ``p``.

    p: (B, 2C, T) float32 projections of the patch tokens on [u columns | v columns], a row per column.
    Returns (B, C, 2, 7) float64: per sign (+, −) the score followed by ``STATS``
    (max, mean and top-5 mean of s·x·u and of s·x·v over tokens).
    """
    b, c2, t = p.shape
    c = c2 // 2
    m = min(TOP_MEAN, t)
    ranked = np.sort(p, axis=-1)  # (B, 2C, T) ascending: one vectorised sort per row beats two partitions
    low, high = ranked[..., :m].astype(np.float64), ranked[..., t - m :].astype(np.float64)  # the m smallest, largest
    mean = p.mean(axis=-1, dtype=np.float64)  # (B, 2C)
    plus = np.stack([high[..., -1], mean, high.mean(-1)], axis=-1)  # (B, 2C, 3): max, mean, top-m mean of x·w
    minus = -np.stack([low[..., 0], mean, low.mean(-1)], axis=-1)  # the same of −x·w
    out = np.empty((b, c, 2, 7))
    for j, st in enumerate((plus, minus)):
        q, k = st[:, :c], st[:, c:]  # (B, C, 3) each
        out[:, :, j, 0] = q[..., 0] * k[..., 0]
        out[:, :, j, 1::2] = q
        out[:, :, j, 2::2] = k
    return out


def unit_sum(x: np.ndarray) -> np.ndarray:
    """Σ_b x_b/|x_b| for x (B, D) (zero vectors add nothing), in fixed point: int64 (D,) in units of 2⁻⁴⁰.

    Integer sums are exact, so the anisotropy does not depend on the order in which
    batches and shards are merged; the rounding (2⁻⁴¹ per component) is far below the
    float32 precision of the embeddings.
    """
    x = np.asarray(x, np.float64)
    norm = np.linalg.norm(x, axis=1, keepdims=True)
    return np.round(x / np.where(norm > 0, norm, 1.0) * UNIT).astype(np.int64).sum(0)


def mean_pairwise_cosine(s: np.ndarray, n: int) -> np.ndarray:
    """Mean cosine over ordered pairs i ≠ j of n unit vectors with sum s (..., D): (|s|² − n)/(n(n − 1)); NaN if n <
    2."""
    if n < 2:
        return np.full(s.shape[:-1], np.nan)
    return (np.einsum("...d,...d->...", s, s) - n) / (n * (n - 1))


def centre_token(layout) -> int:
    """Sequence index of the centre patch token (row gh//2, column gw//2)."""
    gh, gw = layout.grid
    return layout.patches.start + (gh // 2) * gw + gw // 2


# ----------------------------------------------------------------------------- partial results and the analysis


@dataclass
class TopPartial:
    """The top-K of a set of images per (layer, head·mode column, sign).

    scores, index: (L', C, 2, K) (−inf / −1 for empty slots); stats: (L', C, 2, K, 6);
    maps: (L', C, 2, K, 2, N) float16, each winner's query map x·u and key map x·v over
    the N patches (raw, not signed), rounded once when it enters a list to the precision that
    ``top_images_maps.npz`` keeps (half the memory and transfer of float32, and a result read back from its files
    equals the one the run returned); centre: (L', D) int64 fixed-point sum of
    the centre tokens' unit vectors; n_scored: images scored.
    """

    scores: np.ndarray
    index: np.ndarray
    stats: np.ndarray
    maps: np.ndarray
    centre: np.ndarray
    n_scored: int = 0


def keep_best(part, li: int, scores: np.ndarray, index: np.ndarray, stats: np.ndarray, maps_of) -> None:
    """Merge candidates into the top-K lists of layer ``li`` of ``part`` (a :class:`TopPartial`), in place.

    scores, index: (C, 2, n) of the candidates, stats (C, 2, n, 6); maps_of(cc, ss, j) gives the maps (M, K, 2, N)
    of candidates j (M, K) of lists (cc, ss) (M, 1) each, so that only the candidates that enter are gathered.
    A list keeps its K best of its own and the candidates (score descending, then position ascending); only the
    lists that change are written.
    """
    k = part.scores.shape[-1]
    all_scores = np.concatenate([part.scores[li], scores], axis=-1)  # (C, 2, K + n): the kept, then the candidates
    all_index = np.concatenate([part.index[li], index], axis=-1)
    order = np.lexsort((all_index, -all_scores), axis=-1)[..., :k]  # (C, 2, K)
    col, sign = np.nonzero((order != np.arange(k)).any(-1))  # the lists that change: (M,) each
    o = order[col, sign]  # (M, K)
    new = (o >= k)[..., None]  # (M, K, 1): slots filled from the candidates
    cc, ss, kept, j = col[:, None], sign[:, None], np.minimum(o, k - 1), np.maximum(o - k, 0)  # (M, 1|K) each
    new_stats = np.where(new, stats[cc, ss, j], part.stats[li, cc, ss, kept])  # (M, K, 6)
    new_maps = np.where(new[..., None], maps_of(cc, ss, j), part.maps[li, cc, ss, kept])  # (M, K, 2, N)
    part.scores[li, col, sign] = all_scores[cc, ss, o]
    part.index[li, col, sign] = all_index[cc, ss, o]
    part.stats[li, col, sign] = new_stats
    part.maps[li, col, sign] = new_maps


@dataclass(frozen=True)
class TopImagesAnalysis(ModeSweep):
    """top-images as a :class:`~qkweights.analyses.runner.Analysis`: items are relative paths under ``root``."""

    hidden: int
    n_patches: int
    fold_ln: bool = False  # the LayerNorm-folded modes, on the normalised tokens n
    name: ClassVar[str] = "top_images"

    def setup(self, model) -> ModeBank:
        source = mode_source(model.checkpoint, fold_ln=self.fold_ln)
        return mode_bank(source, list(self.layers), list(self.heads), list(self.modes))

    def item_files(self, item) -> list[Path]:
        return [Path(self.root) / item]

    def load(self, model, items, positions):
        pixels, ok, skipped = load_batch(model, Path(self.root), list(items), self.size)
        return (None if pixels is None else Batch(positions[ok], pixels)), skipped

    def empty(self) -> TopPartial:
        lc = (len(self.layers), len(self.heads) * len(self.modes), 2, self.top)
        return TopPartial(
            np.full(lc, -np.inf),
            np.full(lc, -1, np.int64),
            np.full(lc + (len(STATS),), np.nan),
            np.full(lc + (2, self.n_patches), np.nan, np.float16),
            np.zeros((lc[0], self.hidden), np.int64),
        )

    def compute(self, model, bank: ModeBank, batch: Batch) -> TopPartial:
        return self.accumulate(model, bank, batch, self.empty())

    def accumulate(self, model, bank: ModeBank, batch: Batch, partial: TopPartial) -> TopPartial:
        """``partial`` with the batch's images merged in, in place: only the images that enter a top-K are copied."""
        out = model.forward(batch.data, layers=bank.layers, truncate=True, **bank.source.keep)
        # the layers side by side, each image's projection one GEMM at one BLAS thread, whatever its neighbours
        side_by_side(lambda li: self._layer(bank, out, li, batch.positions, partial), range(len(bank.layers)))
        partial.n_scored += len(batch.positions)
        return partial

    def _layer(self, bank: ModeBank, out, li: int, positions: np.ndarray, part: TopPartial) -> None:
        """Merge the batch's images into the top-K of every mode of layer ``bank.layers[li]`` (``part``'s entries at
        ``li``, in place) and add the unit sum of their centre tokens."""
        lay = out.layout
        x = bank.source.tokens_of(out, bank.layers[li]).astype(np.float32, copy=False)  # (B, T, D): x̃, or n if folded
        part.centre[li] += unit_sum(x[:, centre_token(lay)])
        p = bank.w[li].T @ x[:, lay.patches].transpose(0, 2, 1)  # (B, 2C, N), one GEMM per image (stacked matmul)
        st = batch_stats(p).transpose(1, 2, 0, 3)  # (C, 2, B, 7)
        c = st.shape[0]
        index = np.broadcast_to(positions, st.shape[:3])  # (C, 2, B)
        keep_best(part, li, st[..., 0], index, st[..., 1:], lambda cc, ss, j: np.stack([p[j, cc], p[j, c + cc]], -2))

    def merge_into(self, a: TopPartial, b: TopPartial) -> TopPartial:
        """``merge(a, b)`` written into ``a``."""
        for li in range(len(a.scores)):
            keep_best(a, li, b.scores[li], b.index[li], b.stats[li], lambda cc, ss, j, li=li: b.maps[li, cc, ss, j])
        a.centre += b.centre
        a.n_scored += b.n_scored
        return a

    def merge(self, a: TopPartial, b: TopPartial) -> TopPartial:
        copy = TopPartial(a.scores.copy(), a.index.copy(), a.stats.copy(), a.maps.copy(), a.centre.copy(), a.n_scored)
        return self.merge_into(copy, b)

    def to_arrays(self, p: TopPartial) -> dict[str, np.ndarray]:
        return {
            "scores": p.scores,
            "index": p.index,
            "stats": p.stats,
            "maps": p.maps,
            "centre": p.centre,
            "n_scored": np.array(p.n_scored),
        }

    def from_arrays(self, z) -> TopPartial:
        saved = TopPartial(z["scores"], z["index"], z["stats"], z["maps"], z["centre"], int(z["n_scored"]))
        return self.merge_into(self.empty(), saved)  # in the layout of empty(): K slots, written in place


# ----------------------------------------------------------------------------- the typed result


@dataclass
class TopImagesResult(DocumentResult):
    """The result of ``top-images``: the ``top_images.json`` document and the winners' maps.

    doc: the JSON document (schema ``qkweights.top_images/1``); maps: (L', H'·N', 2, K, 2,
    gh, gw) float32 query and key maps of each winner (NaN for empty slots; float16 values, as
    ``top_images_maps.npz`` stores them), in the
    order of ``doc["options"]`` layers, heads × modes, signs (+, −), rank.
    """

    doc: dict
    maps: np.ndarray
    files: list[Path] = field(default_factory=list)

    def save(self, out_dir) -> list[Path]:
        """Write ``top_images.json`` and ``top_images_maps.npz`` (float16 maps) into ``out_dir``; returns the paths."""
        out = Path(out_dir)
        return [
            write_npz(
                out / MAPS_NAME, maps=self.maps.astype(np.float16), fingerprint=np.array(self.doc["fingerprint"])
            ),
            write_json(out / JSON_NAME, self.doc, indent=None),
        ]  # tens of thousands of records: compact

    @classmethod
    def load(cls, out_dir) -> TopImagesResult:
        """Read a saved result; InputError if the folder holds none, or maps of another run."""
        out = Path(out_dir)
        try:
            doc = json.loads((out / JSON_NAME).read_text())
            with np.load(out / MAPS_NAME, allow_pickle=False) as z:
                maps, fp = z["maps"].astype(np.float32), str(z["fingerprint"])
        except (OSError, ValueError, KeyError) as e:
            raise InputError(
                f"{out}: no readable top-images result ({type(e).__name__}: {e}); run top-images into it"
            ) from e
        if doc.get("schema") != SCHEMA or doc.get("fingerprint") != fp:
            raise InputError(
                f"{out / MAPS_NAME} does not belong to {out / JSON_NAME} (another run); run top-images again"
            )
        return cls(doc, maps)


def _winner(st: TopPartial, paths: list[str], li: int, ci: int, si: int, j: int) -> dict:
    rec = {"path": paths[int(st.index[li, ci, si, j])], "score": float(st.scores[li, ci, si, j])}
    rec.update({name: float(v) for name, v in zip(STATS, st.stats[li, ci, si, j])})
    return rec


def build_document(
    model,
    source: dict,
    root,
    paths: list[str],
    bank: ModeBank,
    sweep: Sweep,
    options: dict,
    anisotropy: dict,
) -> dict:
    """The ``top_images.json`` document (schema ``qkweights.top_images/1``) of a finished ``sweep``."""
    from qkweights.weights.qk import SIGN_CONVENTION

    st: TopPartial = sweep.partial
    heads = []
    n_modes = len(bank.modes)
    for li, l in enumerate(bank.layers):
        for hi, h in enumerate(bank.heads):
            modes = []
            for ni, n in enumerate(bank.modes):
                ci = hi * n_modes + ni
                signs = {
                    sign: [
                        _winner(st, paths, li, ci, si, j)
                        for j in range(st.index.shape[-1])
                        if st.index[li, ci, si, j] >= 0
                    ]
                    for si, sign in enumerate(SIGNS)
                }
                modes.append(
                    {
                        "mode": n,
                        "sigma": float(bank.sigma[li, hi, ni]),
                        "cosine": float(bank.cos[li, hi, ni]),
                        "signs": signs,
                    }
                )
            heads.append({"layer": l, "head": h, "modes": modes})
    return {
        "schema": SCHEMA,
        "tool_version": __version__,
        "source": source,
        "model": model_record(model, head_dim=model.dims.head_dim),
        "image_dir": str(root),
        "options": options,
        "score": SCORE_TEXT,
        "embedding": bank.source.tokens_text,
        "tokens": "patch tokens only (CLS, distillation and register tokens excluded)",
        "stats": {
            "max_query": "max_t s·x_t·u_n",
            "max_key": "max_t s·x_t·v_n",
            "mean_query": "mean_t s·x_t·u_n",
            "mean_key": "mean_t s·x_t·v_n",
            "top5_query": f"mean of the top {TOP_MEAN} s·x_t·u_n",
            "top5_key": f"mean of the top {TOP_MEAN} s·x_t·v_n",
        },
        "sign_convention": SIGN_CONVENTION,
        "ties": "equal scores: the earlier path (sorted relative paths) first",
        "n_files": len(paths),
        "n_images": st.n_scored,
        "heads": heads,
        "anisotropy": anisotropy,
        "skipped": sweep.skipped,
    }


# ----------------------------------------------------------------------------- the command


def run_top_images(
    model,
    data_dir,
    out_dir,
    selection: ModeSelection = ModeSelection(),
    settings: SweepSettings = SweepSettings(),
    *,
    fold_ln: bool = False,
    progress: Callable[[int, int], object] | None = None,
    notes: Callable[[str], object] | None = None,
) -> TopImagesResult:
    """The top ``selection.top`` images of ``data_dir`` per (layer, head, mode, sign) of the selected modes
    (:class:`~qkweights.analyses.sweep.ModeSelection`); writes the outputs into ``out_dir``.

    model: a :class:`qkweights.vision.model.VisionModel` or a MODEL argument (:func:`qkweights.analyses.sweep.opened`).
    settings: batch and shard sizes, and where the shards run (:class:`~qkweights.analyses.runner.SweepSettings`;
    the result is the same). progress(done, total):
    files consumed, at the start and after each shard; notes(text): what the caller may
    want to tell the user (a resumed or ignored state). Writes ``top_images.json`` and
    ``top_images_maps.npz`` (the figures are :func:`qkweights.figures.top_images.draw_top_images`'s);
    resumable. fold_ln: score the LayerNorm-folded modes on the
    normalised tokens n (:mod:`qkweights.weights.fold`), so that the decomposition of the logits
    stays exact. InputError when no image could be read (existing outputs are left as they
    are). Returns the :class:`TopImagesResult`, its ``files`` the two written. The caller holds ``out_dir``
    (:func:`qkweights.outputs.claim_dir`), as :func:`qkweights.workflow.top_images` does.
    """
    import warnings

    model = opened(model)
    d = model.dims
    root, out = Path(data_dir), Path(out_dir)
    layers, heads, modes, top = select_modes(d, selection, settings, TOP)
    paths, others = list_images(root), other_files(root)
    if not paths:
        raise InputError(
            f"{root}: no images found in it or its subfolders; an image has the suffix of a format Pillow reads, in "
            "any letter case (.jpg, .png, .gif, .webp, .tiff, …)"
        )
    if others and notes is not None:
        notes(f"{root}: left out {plural(len(others), 'file')} that Pillow does not read as images: {listing(others)}")
    source = model_identity(model)
    size = input_size(model)
    grid = patch_grid(model, size)
    options = {
        "layers": layers,
        "heads": heads,
        "modes": modes,
        "top": top,
        "input_size": list(size or ()),
        "fold_ln": fold_ln,
    }
    an = TopImagesAnalysis(
        str(root.resolve()), tuple(layers), tuple(heads), tuple(modes), top, size, d.hidden, grid[0] * grid[1], fold_ln
    )
    state_path = out / STATE_NAME
    sweep = run_sweep(
        an,
        model,
        paths,
        settings,
        state_path=state_path,
        source=source,
        progress=progress,
        notes=notes,
    )
    bank = context(an, sweep.ref, model)
    st: TopPartial = sweep.partial
    if st.n_scored == 0:
        first = f" (first: {sweep.skipped[0]['path']}: {sweep.skipped[0]['reason']})" if sweep.skipped else ""
        state_path.unlink(missing_ok=True)
        raise InputError(
            f"{root}: none of the {len(paths)} images could be read{first}; existing outputs in {out} are kept"
        )

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # a layer of all-zero heads stays NaN
        weighted = np.nanmean(bank.weighted, axis=1)  # (L',) as the profile's layer_stats()["weighted_cosine"]
    baseline = mean_pairwise_cosine(st.centre / UNIT, st.n_scored)
    anisotropy = {
        "token": CENTRE_TEXT,
        "embedding": bank.source.tokens_text,
        "n_images": st.n_scored,
        "layers": layers,
        "mean_cosine": baseline.tolist(),
        "weighted_cosine": weighted.tolist(),
        "relative_cosine": (weighted - baseline).tolist(),
    }
    doc = build_document(model, source, root, paths, bank, sweep, options, anisotropy)
    doc["fingerprint"] = sweep.fingerprint
    doc["n_other_files"] = len(others)
    doc["blas"] = sweep.kernels()
    maps = st.maps.reshape(st.maps.shape[:-1] + grid).astype(np.float32)  # float16 values, as the file keeps them
    result = TopImagesResult(doc, maps)
    result.files = result.save(out)
    state_path.unlink(missing_ok=True)
    return result
