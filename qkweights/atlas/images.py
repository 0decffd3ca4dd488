"""The atlas's images: deduplicated thumbnails, per-head map sprites, outlined same-object examples.

The red/cyan overlays of :mod:`qkweights.figures.overlay` are composed in the browser, not here: a head's
*map sprite* is one small PNG holding, for every (mode, sign, rank) of its top images, the overlay
colour ``(q, k, k)`` of the scaled query and key maps at patch resolution (one pixel per patch);
the page stacks the matching cell (CSS ``background-position``, ``image-rendering: pixelated``)
over the thumbnail, which CSS dims to grey, with ``mix-blend-mode: screen`` — the screen blend of
:func:`qkweights.figures.overlay.blend`. Thumbnails are the part of the model input that the patch grid
covers, encoded once per image (WebP) and named by the hash of their bytes.
"""

from __future__ import annotations

import hashlib
import io
from contextlib import contextmanager
from dataclasses import fields
from pathlib import Path

import numpy as np
from PIL import Image

from qkweights.analyses.sweep import READ_ERRORS
from qkweights.datasets.ade20k import open_segmentation, read_objects
from qkweights.errors import QkError
from qkweights.figures.overlay import scale_map
from qkweights.vision.preprocess import Preprocess, display_image, open_image

THUMB_QUALITY = 72  # WebP quality of thumbnails: small, and sharp enough at 96–160 px
OUTLINE = {"query": (255, 64, 64), "key": (0, 230, 230)}  # red and cyan, as the overlays


class Assets:
    """The binary files of a site, by site-relative path; identical content is stored once."""

    def __init__(self):
        self.files: dict[str, bytes] = {}

    def add(self, data: bytes, folder: str, suffix: str) -> str:
        """Store ``data`` under ``folder/<hash>.suffix``; returns that path."""
        path = f"{folder}/{hashlib.sha256(data).hexdigest()[:20]}.{suffix}"
        self.files.setdefault(path, data)
        return path

    @property
    def bytes(self) -> int:
        return sum(len(v) for v in self.files.values())


def encode(image: np.ndarray, fmt: str = "WEBP") -> bytes:
    """(h, w, 3) float in [0, 1] or uint8 → WebP bytes: lossy for photos ("WEBP"), lossless for map sprites
    ("WEBP_LOSSLESS", a third smaller than PNG)."""
    a = image if image.dtype == np.uint8 else np.round(np.clip(image, 0, 1) * 255).astype(np.uint8)
    buf = io.BytesIO()
    if fmt == "WEBP":
        Image.fromarray(a).save(buf, "WEBP", quality=THUMB_QUALITY, method=4)
    else:
        Image.fromarray(a).save(buf, "WEBP", lossless=True, method=0)  # 25x faster than method 4, 8% larger
    return buf.getvalue()


def preprocessing_of(m) -> tuple[Preprocess | None, str]:
    """The model's image preprocessing and where it came from: a result that records it (o3, same-object), else
    the checkpoint's own config read through its spec (headers only), else None (thumbnails are then the whole
    image, squashed to the patch grid's shape: "approximate")."""
    for r in (m.same_object, m.o3):
        doc = None if r is None else r.to_json()
        rec = (doc or {}).get("protocol", {}).get("preprocessing")
        if rec:
            names = {f.name for f in fields(Preprocess)}
            return Preprocess(**{k: v for k, v in rec.items() if k in names}), "recorded with the result"
    model_id = m.source.get("model_id")
    if model_id:
        try:
            from qkweights.specs.load import open_model
            from qkweights.vision.model import preprocessing_for

            with _hub_offline():
                rev = m.source.get("commit") or m.source.get("revision")
                _, ck = open_model(model_id, revision=rev, progress=False)
            return preprocessing_for(ck)[0], f"the checkpoint's ({model_id})"
        except (QkError, OSError) as e:
            return None, f"unknown: the model could not be opened ({type(e).__name__}); images are only resized"
    return None, "unknown: the result names no model; images are only resized"


@contextmanager
def _hub_offline():
    """huggingface_hub's offline mode for the block: a Hub model is read from the local cache or not at all (the
    atlas never makes a network request, here included)."""
    from huggingface_hub import constants

    before = constants.HF_HUB_OFFLINE
    constants.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        constants.HF_HUB_OFFLINE = before


class Renderer:
    """Thumbnails and examples of one model's images, cached per (path, input size)."""

    def __init__(self, assets: Assets, prep: Preprocess | None, thumb_px: int, thumbs: bool, origin: str = ""):
        self.assets, self.prep, self.px, self.thumbs, self.origin = assets, prep, thumb_px, thumbs, origin
        self._cache: dict = {}
        self.page_style: list[str] = []  # the CSS rules of the page being written (tile sizes, its sprite)

    def _prep(self, size) -> Preprocess | None:
        if self.prep is None or not size:
            return self.prep
        return self.prep.with_size(*size)

    def model_view(self, path: Path, size, grid) -> np.ndarray:
        """(h, w, 3) in [0, 1]: the part of the model input covered by the (gh, gw) patch grid."""
        prep = self._prep(size)
        if prep is None:
            img = np.asarray(open_image(path).convert("RGB"), np.float64) / 255
            return img
        px = prep(path)[0]  # (3, H, W)
        gh, gw = grid
        h, w = px.shape[1] // gh * gh, px.shape[2] // gw * gw
        return display_image(px[:, :h, :w], prep.mean, prep.std, prep.rescale)

    def tile_shape(self, grid) -> tuple[int, int]:
        gh, gw = grid
        return self.px, max(1, round(self.px * gh / gw))  # (w, h)

    def thumb(self, path: Path, size, grid) -> str | None:
        """Site path of the thumbnail of ``path``; None with ``--no-thumbs`` or when the image is unreadable."""
        if not self.thumbs:
            return None
        key = (str(path), tuple(size or ()), tuple(grid))
        if key not in self._cache:
            try:
                img = self.model_view(path, size, grid)
            except READ_ERRORS:
                self._cache[key] = None
                return None
            small = Image.fromarray(np.round(img * 255).astype(np.uint8)).resize(self.tile_shape(grid), Image.LANCZOS)
            self._cache[key] = self.assets.add(encode(np.asarray(small)), "img", "webp")
        return self._cache[key]

    def example(self, root: Path, rel: str, size, grid, query_object: int, key_object: int):
        """One same-object example: (site path of the image's thumbnail or None with ``--no-thumbs``, site path of
        its outline layer: the query object outlined red, the key object cyan, transparent elsewhere); None when
        the image or its instance map is unreadable. The page stacks the two."""
        labels = self._labels(root, rel, size, grid)
        if labels is None:
            return None
        out = np.zeros(labels.shape, np.uint8)  # palette indices: 0 transparent, 1 red, 2 cyan
        out[_edge(labels == query_object)] = 1
        key = labels == key_object
        out[_edge(_erode(key, 2) if key_object == query_object else key)] = 2  # one object: cyan inside red
        layer = Image.fromarray(out, "P")
        layer.putpalette([0, 0, 0, *OUTLINE["query"], *OUTLINE["key"]])
        buf = io.BytesIO()
        layer.save(buf, "PNG", transparency=0)
        thumb = self.thumb(_seg_items(root)[rel].image, size, grid)
        return thumb, self.assets.add(buf.getvalue(), "img", "png")

    def _labels(self, root: Path, rel: str, size, grid) -> np.ndarray | None:
        """The instance ids of one image at thumbnail size, on the part of the model input the grid covers."""
        key = ("labels", str(root), rel, tuple(size or ()), tuple(grid))
        if key not in self._cache:
            try:
                item = _seg_items(root)[rel]
                ids, _ = read_objects(item, open_image(item.image).size)
            except (KeyError, *READ_ERRORS):
                self._cache[key] = None
                return None
            prep = self._prep(size)
            if prep is not None:
                ids = prep.transform_labels(ids)  # (H, W) on the model input
                ids = ids[: ids.shape[0] // grid[0] * grid[0], : ids.shape[1] // grid[1] * grid[1]]
            self._cache[key] = np.asarray(
                Image.fromarray(ids.astype(np.int32)).resize(self.tile_shape(grid), Image.NEAREST)
            )
        return self._cache[key]


def _erode(mask: np.ndarray, steps: int) -> np.ndarray:
    """``mask`` shrunk by ``steps`` pixels (4-neighbourhood; the image border counts as outside)."""
    inner = mask.copy()
    for _ in range(steps):
        inner[1:-1, 1:-1] &= inner[:-2, 1:-1] & inner[2:, 1:-1] & inner[1:-1, :-2] & inner[1:-1, 2:]
        inner[[0, -1], :] = False
        inner[:, [0, -1]] = False
    return inner


def _edge(mask: np.ndarray) -> np.ndarray:
    """The boundary pixels of a mask, two pixels wide."""
    return mask & ~_erode(mask, 2)


_SEG: dict[str, dict] = {}


def _seg_items(root: Path) -> dict:
    key = str(root)
    if key not in _SEG:
        _SEG[key] = {it.name: it for it in open_segmentation(root).items}
    return _SEG[key]


def map_sprite(maps: np.ndarray, top: int) -> np.ndarray:
    """The sprite of one head: maps (N, 2 signs, K ranks, 2 [query, key], gh, gw) raw → (N·2·gh, top·gw, 3) uint8,
    row block (mode n, sign s) = 2n + s, column block = rank; each cell the overlay colour (q, k, k) of the maps
    scaled for their sign (:func:`qkweights.figures.overlay.scale_map`); black where a slot is empty."""
    n, _, k, _, gh, gw = maps.shape
    k = min(k, top)
    sign = np.broadcast_to(np.array([1.0, -1.0])[None, :, None], (n, 2, k))  # one sign per map (N, 2, k)
    m = np.nan_to_num(maps[:, :, :k], nan=0.0)
    q = scale_map(m[:, :, :, 0], sign)  # (N, 2, k, gh, gw)
    kk = scale_map(m[:, :, :, 1], sign)
    rgb = np.stack([q, kk, kk], axis=-1)  # (N, 2, k, gh, gw, 3)
    rgb = rgb.transpose(0, 1, 3, 2, 4, 5).reshape(n * 2 * gh, k * gw, 3)
    return np.round(rgb * 255).astype(np.uint8)
