"""Folders of images with object annotations, for ``same-object``: three layouts, detected.

1. **ADE20K full release** (``ADE20K_2021_17_01``, also the 2016 full release): ``NAME.jpg``
   with ``NAME_seg.png`` beside it, anywhere below the root. In the seg PNG, the object
   class is ``R // 10 * 256 + G``; the instances come from the B channel: B = 0 is
   unlabelled, the other distinct B values in ascending order are objects 1, 2, 3, …
   (the official loader's ``np.unique(B, return_inverse=True)``, with 0 kept for
   unlabelled). Part masks (``NAME_parts_N.png``) and everything else (``.json``, the
   per-instance folders of the 2021 release) are ignored; images are ``.jpg``/``.jpeg``.
   Suffixes are matched in any letter case (``IMG.JPG``; an annotation ``.png`` or ``.PNG``).
2. **ADE20K SceneParsing** (``ADEChallengeData2016``): ``images/{training,validation}/NAME.jpg``
   with ``annotations/{…}/NAME.png`` class maps; every class id > 0 present in an image is
   one object whose id is its class id; 0 is unlabelled. The root may be the folder that
   holds ``images/`` and ``annotations/``, or its parent holding ``ADEChallengeData2016/``.
3. **Generic**: ``images/NAME.*`` (jpg, jpeg, png, webp; subfolders allowed) with
   ``instances/NAME.png`` (the same relative path, extension .png): 8- or 16-bit integer
   instance ids, 0 = none. The object class is not known (reported as −1).

Detection, in this order: ``images/`` and ``instances/`` in the root → generic;
``images/`` and ``annotations/`` in the root (or in ``ADEChallengeData2016/``) →
SceneParsing; any ``*_seg.png`` below the root → full release. Anything else is an
InputError saying what was looked for.

Items are listed in sorted relative-path order (the order of ties in ``same-object``); an
image without its annotation file is not an item but listed in ``missing`` with the reason.
:func:`read_objects` reads an annotation as an instance map and the class of each object.

**EXIF orientation.** Annotations follow the image *as displayed*: the image's EXIF
orientation tag applied (:func:`qkweights.vision.preprocess.open_image`, as transformers' ``load_image``
and detectron2's ``read_image`` do, so the model sees that image), and an annotation file's
own EXIF orientation tag, if it has one, applied to it alike. An annotation drawn on the stored
pixels of a turned image (orientations 5–8) is refused for its size, naming the EXIF tag;
a square one cannot be told apart and is read as displayed.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import ExifTags, Image, ImageOps

from qkweights.checkpoints.folders import not_a_folder
from qkweights.errors import InputError

FULL, SCENE, GENERIC = "ade20k-full", "ade20k-sceneparsing", "generic"
LAYOUT_TEXT = {
    FULL: "ADE20K full release: NAME.jpg + NAME_seg.png (instances from B, class = R // 10 * 256 + G)",
    SCENE: "ADE20K SceneParsing: images/…/NAME.jpg + annotations/…/NAME.png (one object per class id > 0)",
    GENERIC: "generic: images/NAME.* + instances/NAME.png (8- or 16-bit instance ids, 0 = none)",
}
LOOKED_FOR = (
    "images/ + instances/ (generic), images/ + annotations/ (ADE20K SceneParsing, also under "
    "ADEChallengeData2016/), or NAME.jpg with NAME_seg.png beside it (ADE20K full release)"
)
FULL_IMAGE_SUFFIXES = (".jpg", ".jpeg")
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp")
SEG_SUFFIX = "_seg.png"
NO_CLASS = -1  # the class of an object of a generic instance map


@dataclass(frozen=True)
class SegItem:
    """One image with its annotation: ``name`` the image's path relative to the root (POSIX), ``layout`` one of
    FULL, SCENE, GENERIC."""

    name: str
    image: Path
    annotation: Path
    layout: str


@dataclass(frozen=True)
class SegDataset:
    """An opened folder: ``items`` in sorted name order; ``missing``: (name, reason) of images without annotation."""

    root: Path
    layout: str
    items: list[SegItem]
    missing: list[tuple[str, str]]


def _walk(folder: Path, suffixes: tuple[str, ...]) -> list[Path]:
    """Files below ``folder`` with one of ``suffixes`` (any letter case), not hidden; sorted."""
    found = []
    for here, dirs, files in os.walk(folder):
        here = Path(here)
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        found += [here / f for f in files if not f.startswith(".") and Path(f).suffix.lower() in suffixes]
    return sorted(found)


def _annotation_file(path: Path) -> Path | None:
    """``path`` (an annotation's name, ending .png) or that name ending .PNG, whichever exists first; else None."""
    return next((p for p in (path, path.with_suffix(path.suffix.upper())) if p.is_file()), None)


def _paired(root: Path, images: Path, annotations: Path, layout: str, suffixes) -> SegDataset:
    items, missing = [], []
    for path in _walk(images, suffixes):
        rel = path.relative_to(images)
        ann = (annotations / rel).with_suffix(".png")
        name = path.relative_to(root).as_posix()
        found = _annotation_file(ann)
        if found is not None:
            items.append(SegItem(name, path, found, layout))
        else:
            missing.append((name, f"no annotation {ann.relative_to(root).as_posix()}"))
    return SegDataset(root, layout, sorted(items, key=lambda it: it.name), sorted(missing))


def open_segmentation(root: str | os.PathLike) -> SegDataset:
    """Detect the layout of ``root`` (module docstring) and pair each image with its annotation.

    InputError if ``root`` is no folder, matches no layout, or holds no image.
    """
    root = Path(root)
    if (why := not_a_folder(root)) is not None:
        raise InputError(f"{root}: {why}; give the dataset folder (looked for {LOOKED_FOR})")
    root = root.absolute()  # the items' paths are read by workers in other folders too (Dask)
    if (root / "images").is_dir() and (root / "instances").is_dir():
        data = _paired(root, root / "images", root / "instances", GENERIC, IMAGE_SUFFIXES)
    else:
        base = next(
            (
                b
                for b in (root, root / "ADEChallengeData2016")
                if (b / "images").is_dir() and (b / "annotations").is_dir()
            ),
            None,
        )
        if base is not None:
            data = _paired(root, base / "images", base / "annotations", SCENE, IMAGE_SUFFIXES)
        else:
            segs = [p for p in _walk(root, (".png",)) if p.name.lower().endswith(SEG_SUFFIX)]
            if not segs:
                raise InputError(f"{root}: no known dataset layout; looked for {LOOKED_FOR}")
            items, missing = [], []
            for path in _walk(root, FULL_IMAGE_SUFFIXES):
                seg = path.with_name(path.stem + SEG_SUFFIX)
                name = path.relative_to(root).as_posix()
                found = _annotation_file(seg)
                if found is not None:
                    items.append(SegItem(name, path, found, FULL))
                else:
                    missing.append((name, f"no annotation {seg.name} beside it"))
            data = SegDataset(root, FULL, items, sorted(missing))
    if not data.items and not data.missing:
        raise InputError(
            f"{root}: the {LAYOUT_TEXT[data.layout].split(':')[0]} layout holds no image; "
            "give the folder that holds the images"
        )
    return data


# ----------------------------------------------------------------------------- annotations


TURNING_ORIENTATIONS = (5, 6, 7, 8)  # EXIF orientations that swap width and height (a quarter turn, ± a mirror)


def _open(path: Path) -> Image.Image:
    """The annotation decoded, as displayed (its own EXIF orientation applied, like the image's)."""
    try:
        with Image.open(path) as im:
            im.load()
            ImageOps.exif_transpose(im, in_place=True)  # upright; no copy of an annotation that needs no turn
            return im
    except (OSError, ValueError, SyntaxError, EOFError, Image.DecompressionBombError) as e:
        raise InputError(
            f"annotation {path.name} is unreadable ({type(e).__name__}: {' '.join(str(e).split())})"
        ) from None


def _exif_note(image: Path, annotation_size, image_size) -> str:
    """For a size mismatch: what the image's EXIF orientation did, when it turned the image ("" otherwise)."""
    try:
        with Image.open(image) as im:
            orientation = im.getexif().get(ExifTags.Base.Orientation)
    except (OSError, ValueError, SyntaxError, EOFError, Image.DecompressionBombError):
        return ""
    if orientation not in TURNING_ORIENTATIONS:
        return ""
    stored = f"{image_size[1]}x{image_size[0]}"
    note = f" as displayed: its EXIF orientation {orientation} turns the stored {stored} pixels"
    if tuple(annotation_size) == (image_size[1], image_size[0]):
        note += (
            "; the annotation follows the stored pixels, but annotations follow the image as displayed "
            "(EXIF orientation applied, as the model sees it): turn the annotation the same way, or give it the "
            "image's EXIF orientation tag"
        )
    return note


def full_release_objects(rgb: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Instance map and classes of an ADE20K full-release seg PNG.

    rgb: (H, W, 3) uint8. Returns (ids (H, W) uint8: 0 where B = 0, else the rank 1, 2, …
    of B among the distinct non-zero B values (at most 255); classes (M,) int64: per object
    1…M the most frequent ``R // 10 * 256 + G`` over its pixels, the lowest on ties).
    Per-pixel arrays stay 1, 2 or 4 bytes wide (a few bytes a pixel in all for a large map).
    """
    r, g, b = rgb[..., 0], rgb[..., 1], rgb[..., 2]  # (H, W) uint8 views
    values = np.unique(b)  # ascending
    rank = np.zeros(256, np.uint8)
    rank[values] = np.arange(len(values)) + (values[0] != 0)  # B = 0 → 0, the others 1, 2, … in ascending B
    ids = rank[b]  # (H, W) uint8
    cls = (r // 10).astype(np.uint16)  # (H, W) uint16: R // 10 * 256 + G < 26 · 256
    cls *= 256
    cls += g
    span = int(cls.max()) + 1
    key = ids.astype(np.uint32)  # (H, W) object · span + class < 256 · 6656
    key *= span
    key += cls
    pairs, counts = np.unique(key, return_counts=True)  # (object, class) pairs, ascending
    obj, cl = pairs // span, pairs % span
    order = np.lexsort((cl, -counts, obj))  # per object: the most pixels first, then the lowest class
    first = order[np.r_[True, obj[order][1:] != obj[order][:-1]]]  # the first pair of each object
    keep = obj[first] > 0
    return ids, cl[first][keep].astype(np.int64)


def read_objects(item: SegItem, image_size: tuple[int, int]) -> tuple[np.ndarray, dict[int, int]]:
    """The instance map of ``item`` and the class of each object id.

    image_size: the image's (width, height) as displayed (EXIF orientation applied, as
    :func:`qkweights.vision.preprocess.open_image` decodes it). The annotation is read as displayed too
    (module docstring). Returns (ids (H, W) integer, 0 = no object — in the stored width, uint8,
    uint16 or int32, so a large map takes 1–4 bytes a pixel, int64 for the full release; {id:
    class}, class −1 for generic maps). InputError (message = the reason to skip) when the annotation is unreadable,
    of another size than the image (naming the image's EXIF orientation when it turns it), or
    of an unusable pixel mode.
    """
    im = _open(item.annotation)
    if im.size != tuple(image_size):
        raise InputError(
            f"annotation {item.annotation.name} is {im.size[0]}x{im.size[1]} but the image is "
            f"{image_size[0]}x{image_size[1]} (width x height){_exif_note(item.image, im.size, image_size)}; "
            "it must match its image as displayed, pixel for pixel"
        )
    if item.layout == FULL:
        if im.mode not in ("RGB", "RGBA", "P"):
            raise InputError(
                f"seg PNG {item.annotation.name} has pixel mode {im.mode}; the ADE20K full release stores RGB"
            )
        ids, classes = full_release_objects(np.asarray(im if im.mode == "RGB" else im.convert("RGB")))
        return ids, {o + 1: int(c) for o, c in enumerate(classes)}
    if im.mode not in ("L", "P", "I;16", "I;16B", "I;16L", "I", "1"):
        raise InputError(
            f"annotation {item.annotation.name} has pixel mode {im.mode}; "
            "save it as a single-channel 8- or 16-bit integer PNG"
        )
    ids = np.asarray(im)  # (H, W) uint8 (L, P: its palette indices, as ids), uint16 (I;16) or int32 (I)
    if ids.dtype == np.bool_:  # mode 1
        ids = ids.view(np.uint8)
    if ids.min() < 0:
        raise InputError(f"annotation {item.annotation.name} holds negative ids; ids must be 0 (none) or positive")
    present = [int(v) for v in np.unique(ids) if v > 0]
    return ids, {o: (o if item.layout == SCENE else NO_CLASS) for o in present}
