"""What the image analyses share, above all the mode sweeps: ``top-images`` and ``same-object`` score images on
chosen query-key modes.

Both run a :class:`ModeSweep` (the options they share) over a folder with :mod:`qkweights.analyses.runner`:
the chosen modes of the chosen heads are one :class:`ModeBank` per worker (:func:`mode_bank`), the chosen
layers, heads and modes are checked once (:func:`select_modes`), and a partial result keeps the top K of
each mode (:func:`merge_topk`). Here too: how an image folder is listed (:func:`list_images`) and read
(:func:`load_batch`), which errors skip an image rather than stop the run (:data:`READ_ERRORS`, also
for the O3 analysis) and the one-line reason recorded for it (:func:`skip_reason`); and the provenance and
``model`` block every analysis's document holds (:func:`model_identity`, :func:`model_record`).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from qkweights.analyses.runner import Analysis, SweepSettings
from qkweights.checkpoints.folders import image_suffixes, not_a_folder
from qkweights.errors import InputError, QkError
from qkweights.specs.load import source_record
from qkweights.vision.model import open_vision_model
from qkweights.weights.modes import ModeSource

READ_ERRORS = (QkError, OSError, ValueError, SyntaxError, EOFError, Image.DecompressionBombError)


# ----------------------------------------------------------------------------- images


def list_images(root: Path) -> list[str]:
    """Image files under ``root`` (recursive), as sorted relative POSIX paths.

    An image file has the suffix, in any letter case, of a format Pillow opens
    (:func:`qkweights.checkpoints.folders.image_suffixes`): .jpg, .PNG, .gif, .webp, .tiff, … The
    other files are :func:`other_files`.
    """
    return _walk(root, lambda name: Path(name).suffix.lower() in image_suffixes())


def other_files(root: Path) -> list[str]:
    """The files under ``root`` that :func:`list_images` leaves out (not hidden ones), as sorted relative paths."""
    return _walk(root, lambda name: not name.startswith(".") and Path(name).suffix.lower() not in image_suffixes())


def _walk(root: Path, keep) -> list[str]:
    """The files under ``root`` whose name ``keep`` accepts, as sorted relative POSIX paths."""
    root = Path(root)
    why = not_a_folder(root)
    if why is not None:
        raise InputError(f"{root}: {why}; give a folder of images")
    found = []
    for folder, dirs, files in os.walk(root):
        here = Path(folder)
        dirs.sort()
        found += [(here / f).relative_to(root).as_posix() for f in files if keep(f)]
    return sorted(found)


def skip_reason(err: BaseException, image: Path) -> str:
    """Why ``image`` was skipped, in one line, for a record that names the image already: a QkError's message
    without its leading ``image`` path, another error's type and text."""
    text = str(err) if isinstance(err, QkError) else f"{type(err).__name__}: {err}"
    return " ".join(text.removeprefix(f"{image}: ").split())


def input_size(model) -> tuple[int, int] | None:
    """None when the model's preprocessing gives a fixed size; else the size to resize every image to."""
    prep = model.preprocessing
    if prep.crop is not None or prep.size is not None:
        return None
    return model.dims.image_size


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
            skipped.append({"path": rel, "reason": skip_reason(e, root / rel)})
    return (np.concatenate(pixels) if pixels else None), ok, skipped


# ----------------------------------------------------------------------------- the chosen modes


def select_indices(values, limit: int, what: str, default) -> list[int]:
    """``values`` (None: ``default``) as a list of ints in 0 … ``limit`` − 1, at least one, without repeats.

    InputError naming the first index out of range (``what``: "layer", "head", "mode"), or the repeats.
    """
    out = list(default if values is None else values)
    out = [int(v) for v in out]
    bad = [v for v in out if not 0 <= v < limit]
    if bad:
        raise InputError(f"{what} {bad[0]} is out of range: the model has {limit} {what}s (0–{limit - 1})")
    if len(set(out)) != len(out) or not out:
        raise InputError(f"{what}s {out}: give at least one, without repeats")
    return out


@dataclass(frozen=True)
class ModeSelection:
    """Which modes a mode sweep scores, and how many images it keeps per mode.

    layers, heads: 0-based indices (None: all); modes: indices, those ≥ the head dim dropped; top: images kept
    per mode (per layer, head, mode and sign for top-images; None: the analysis's own default, 8 for top-images
    and 5 for same-object).
    """

    layers: Sequence[int] | None = None
    heads: Sequence[int] | None = None
    modes: Sequence[int] = range(10)
    top: int | None = None


def select_modes(dims, selection: ModeSelection, settings: SweepSettings, top: int) -> tuple[list, list, list, int]:
    """The chosen (layers, heads, modes) of a model of ``dims``, each a list of 0-based indices, and the images kept
    per mode (``selection.top``, else ``top``).

    InputError when no mode is left, or when that top, ``settings.batch_size`` or ``settings.shard_size`` (None:
    chosen later) is below 1.
    """
    layers = select_indices(selection.layers, dims.layers, "layer", range(dims.layers))
    heads = select_indices(selection.heads, dims.heads, "head", range(dims.heads))
    modes = selection.modes
    kept = [int(n) for n in modes if 0 <= int(n) < dims.head_dim]
    if not kept:
        raise InputError(
            f"modes {list(modes)}: a head of this model has {dims.head_dim} modes; give modes in 0–{dims.head_dim - 1}"
        )
    modes = select_indices(kept, dims.head_dim, "mode", ())
    top = top if selection.top is None else selection.top
    batch_size, shard_size = settings.batch_size, settings.shard_size
    if top < 1 or batch_size < 1 or (shard_size is not None and shard_size < 1):
        raise InputError(f"top {top}, batch size {batch_size}, shard size {shard_size}: each must be at least 1")
    return layers, heads, modes, top


@dataclass(frozen=True)
class ModeBank:
    """The chosen modes of the chosen heads, per chosen layer.

    w: per layer (D, 2C) float32, C = H'·N' columns [u_(h,n) … | v_(h,n) …] in (head, mode)
    order; sigma, cos: (L', H', N') float64; weighted: (L', H) the σ-weighted cosine
    Σσ·cos/Σσ of every head of each chosen layer (NaN for an all-zero head); source: where the
    modes come from, and which tokens of a forward pass they apply to.
    """

    layers: list[int]
    heads: list[int]
    modes: list[int]
    w: list[np.ndarray]
    sigma: np.ndarray
    cos: np.ndarray
    weighted: np.ndarray
    source: ModeSource


def mode_bank(source: ModeSource, layers: list[int], heads: list[int], modes: list[int], dtype=np.float32) -> ModeBank:
    """SVD of every head of each chosen layer (:meth:`~qkweights.weights.modes.ModeSource.modes`, plain or
    LayerNorm-folded); the chosen heads' and modes' directions as a :class:`ModeBank` (columns ``w`` in ``dtype``).

    Layers run on as many threads as there are cores, each with one BLAS thread: OpenBLAS
    with more is slower on these small LAPACK calls.
    """
    from concurrent.futures import ThreadPoolExecutor

    from threadpoolctl import threadpool_limits

    def layer(l: int):
        m = source.modes(l)
        u, s, v = m.u, m.s, m.v  # (H, D, K), (H, K), (H, D, K)
        c = np.einsum("hdk,hdk->hk", u, v)  # (H, K)
        with np.errstate(invalid="ignore", divide="ignore"):
            weighted = (s * c).sum(-1) / s.sum(-1)  # (H,)
        u, v, s, c = u[heads][..., modes], v[heads][..., modes], s[heads][:, modes], c[heads][:, modes]  # (H', D, N')
        d = u.shape[1]
        cols = [u.transpose(1, 0, 2).reshape(d, -1), v.transpose(1, 0, 2).reshape(d, -1)]  # 2 × (D, H'·N')
        return np.ascontiguousarray(np.concatenate(cols, axis=1), dtype=dtype), s, c, weighted

    threads = max(1, min(len(layers), os.cpu_count() or 1))
    with threadpool_limits(1, user_api="blas"), ThreadPoolExecutor(threads) as pool:
        w, sigma, cos, weighted = zip(*pool.map(layer, layers)) if layers else ((), (), (), ())
    return ModeBank(layers, heads, modes, list(w), np.array(sigma), np.array(cos), np.array(weighted), source)


def merge_topk(scores: np.ndarray, index: np.ndarray, *extra: np.ndarray, k: int) -> tuple[np.ndarray, ...]:
    """The ``k`` best of candidate lists: order by score descending, then image index ascending.

    scores (..., M), index (..., M) int (−1 = empty, score −inf); each of ``extra``
    (..., M, ...) is carried along (stats, maps). Returns (scores, index, *extra) with
    M cut to ``k``.
    """
    order = np.lexsort((index, -scores), axis=-1)[..., :k]  # primary −score, secondary index
    out = [np.take_along_axis(scores, order, -1), np.take_along_axis(index, order, -1)]
    for x in extra:
        o = order.reshape(order.shape + (1,) * (x.ndim - order.ndim))
        out.append(np.take_along_axis(x, o, order.ndim - 1))
    return tuple(out)


@dataclass(frozen=True)
class ModeSweep(Analysis):
    """The options every analysis of the top images of chosen modes shares (top-images, same-object)."""

    root: str  # the image folder (absolute)
    layers: tuple[int, ...]
    heads: tuple[int, ...]
    modes: tuple[int, ...]
    top: int  # images kept per mode
    size: tuple[int, int] | None  # None: the checkpoint's own resize and crop


# ----------------------------------------------------------------------------- the model


def opened(model):
    """``model`` itself, or the :class:`~qkweights.vision.model.VisionModel` that
    :func:`~qkweights.vision.model.open_vision_model` opens for a MODEL argument (Hub id, folder or file)."""
    return open_vision_model(model) if isinstance(model, str) else model


def model_record(model, **extra) -> dict:
    """The ``model`` block of every analysis's document: family, layers, heads, hidden, then ``extra`` (what that
    analysis records besides: head_dim, patch_size, grid), in that order."""
    d = model.dims
    return {"family": model.checkpoint.spec.name, "layers": d.layers, "heads": d.heads, "hidden": d.hidden, **extra}


def model_identity(model) -> dict:
    """Provenance of the weights: Source.to_json() (sha256 of each file), or file names, sizes and mtimes."""
    if model.source is not None:
        return source_record(model.source, model.checkpoint)
    files = [Path(f) for f in model.checkpoint.store.files]
    return {
        "model_id": model.checkpoint.spec.name,
        "files": [{"name": str(f), "bytes": f.stat().st_size, "mtime_ns": f.stat().st_mtime_ns} for f in files],
    }


def patch_grid(model, size) -> tuple[int, int]:
    """(gh, gw) of the model input that ``model.preprocess(…, size=size)`` makes (every image alike)."""
    pixels = model.preprocess(np.zeros((32, 32, 3), np.uint8), size=size)
    p = model.weights.embeddings.patch_size
    return pixels.shape[2] // p, pixels.shape[3] // p
