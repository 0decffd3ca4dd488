"""Reading an Odd-One-Out (O3) folder as found in the wild.

Layout (Kotseruba et al., BMVC 2019; docs/method.md §6)::

    ROOT/images/NAME.jpg                 RGB photo
    ROOT/targ_images/NAME.jpg            target mask      (or targ_labels/)
    ROOT/dist_images/NAME.jpg            distractor mask  (or dist_labels/)
    ROOT/image_properties.txt            optional table   (or .csv)

Choices made here:

- images are files with the extension of a format Pillow reads in any letter case
  (:func:`qkweights.checkpoints.folders.image_suffixes`: jpg, png, gif, …); names starting
  with a dot (macOS ``._NAME.jpg`` companions) and other files are ignored; a mask
  is matched to its image by stem, whatever its extension;
- an image lacking a mask in either mask folder is not an item: it is listed
  in :attr:`O3Dataset.missing` with the reason;
- if both spellings of a mask folder (or both property files) exist, the folder
  is ambiguous and refused rather than one silently chosen;
- property rows are matched by ``image_name`` with or without an image
  extension; values are stripped, then read as int, else float, else kept as
  text; an image without a row gets ``{}``;
- mask sizes are checked against the image by :func:`check_sizes`, which
  :func:`load_masks` calls: loading masks through it can not mismatch silently.
"""

from __future__ import annotations

import csv
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from qkweights.checkpoints.folders import image_suffixes, not_a_folder
from qkweights.errors import InputError, SourceError

# The columns of the real image_properties.txt; the last seven are 0/1 flags of
# the feature in which the target differs from the distractors.
PROPERTY_COLUMNS = (
    "image_name",
    "num_distractors",
    "target_type",
    "target_subtype",
    "target_size",
    "target_x",
    "target_y",
    "orientation",
    "color",
    "focus",
    "shape",
    "size",
    "location",
    "pattern",
)
FEATURE_FLAGS = PROPERTY_COLUMNS[-7:]
TARGET_DIRS = ("targ_images", "targ_labels")
DISTRACTOR_DIRS = ("dist_images", "dist_labels")
PROPERTY_FILES = ("image_properties.txt", "image_properties.csv")
MASK_THRESHOLD = 128  # JPEG noise keeps real mask values within 0–7 and 248–255
MASK_MODES = ("1", "L", "LA", "P", "PA", "RGB", "RGBA")  # 8-bit (or 1-bit) modes a mask may use


@dataclass(frozen=True)
class O3Item:
    """One O3 image with its two masks and its row of ``image_properties`` ({} if none)."""

    name: str
    image: Path
    target_mask: Path
    distractor_mask: Path
    properties: dict


@dataclass(frozen=True)
class O3Dataset:
    """An opened O3 folder: ``items`` sorted by name; ``missing`` holds (name, reason) of images left out."""

    root: Path
    items: list[O3Item]
    missing: list[tuple[str, str]]


def _image_files(folder: Path) -> dict[str, Path]:
    """Stem -> path of the image files (a format Pillow reads, any case, not hidden) in ``folder``."""
    found: dict[str, Path] = {}
    for path in sorted(folder.iterdir()):
        if (
            path.name.startswith(".") or path.suffix.lower() not in image_suffixes() or path.is_dir()
        ):  # broken links stay: skipped and listed
            continue
        if path.stem in found:
            raise InputError(
                f"{found[path.stem]} and {path.name} have the same name {path.stem!r}; "
                f"keep one file per name in {folder}"
            )
        found[path.stem] = path
    return found


def _pick_one(root: Path, names: tuple[str, ...], what: str, required: bool) -> Path | None:
    """The one entry of ``names`` under ``root`` that exists (as a folder if ``required``, else a file).

    None if there is none and it is not ``required``.
    """
    present = [root / n for n in names if ((root / n).is_dir() if required else (root / n).is_file())]
    if len(present) > 1:
        raise InputError(f"{root} has both {' and '.join(p.name for p in present)}; keep only one {what}")
    if not present:
        if required:
            raise SourceError(
                f"{root} has no {what} (looked for {' and '.join(n + '/' for n in names)}); "
                f"pass the O3 folder that holds images/ and the mask folders"
            )
        return None
    return present[0]


def _value(text: str) -> int | float | str:
    """A property value: int if it reads as one, else float, else the stripped text."""
    text = text.strip()
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def _stem(name: str) -> str:
    """``name`` without a trailing image extension (``a.jpg`` -> ``a``; ``a.b`` stays ``a.b``)."""
    return os.path.splitext(name)[0] if os.path.splitext(name)[1].lower() in image_suffixes() else name


def read_properties(path: Path) -> dict[str, dict]:
    """Rows of an O3 ``image_properties`` table, keyed by image stem.

    Comma-separated with a header naming ``image_name``; spaces around headers
    and values are stripped; numbers become int (or float). Returns
    {stem: {column: value}} without the ``image_name`` column.
    """
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            rows = list(csv.reader(f))
    except UnicodeDecodeError as exc:
        raise InputError(f"{path}: not UTF-8 text ({exc.reason}); save it as comma-separated UTF-8") from None
    rows = [r for r in rows if any(cell.strip() for cell in r)]
    if not rows:
        raise InputError(f"{path} is empty; it needs a header line starting with image_name, or remove the file")
    header = [h.strip() for h in rows[0]]
    if "image_name" not in header:
        raise InputError(
            f"{path}: header {','.join(header)!r} has no image_name column; the first line must name the columns"
        )
    key = header.index("image_name")
    table: dict[str, dict] = {}
    for line, row in enumerate(rows[1:], start=2):
        if len(row) != len(header):
            raise InputError(f"{path} line {line}: {len(row)} fields but the header has {len(header)}; fix that row")
        stem = _stem(row[key].strip())
        if stem in table:
            raise InputError(f"{path} line {line}: image {stem!r} appears twice; keep one row per image")
        table[stem] = {h: _value(v) for h, v in zip(header, row) if h != "image_name"}
    return table


def open_o3(root: str | os.PathLike) -> O3Dataset:
    """Open an O3 folder: pair each image with its target and distractor masks and its properties.

    Raises SourceError if ``root``, ``images/`` or a mask folder is missing,
    InputError if the folder is ambiguous (two spellings, two files of one name)
    or holds no image.
    """
    root = Path(root)
    why = not_a_folder(root)
    if why is not None:
        raise SourceError(f"{root}: {why}; pass the O3 folder that holds images/")
    root = root.absolute()  # the items' paths are read by workers in other folders too (Dask)
    image_dir = _pick_one(root, ("images",), "images/ folder", required=True)
    targ_dir = _pick_one(root, TARGET_DIRS, "target mask folder", required=True)
    dist_dir = _pick_one(root, DISTRACTOR_DIRS, "distractor mask folder", required=True)
    prop_file = _pick_one(root, PROPERTY_FILES, "properties file", required=False)

    images = _image_files(image_dir)
    if not images:
        raise InputError(
            f"{image_dir} holds no image (.jpg, .png or another format Pillow reads); pass the O3 folder whose "
            "images/ holds the photos"
        )
    targets, distractors = _image_files(targ_dir), _image_files(dist_dir)
    properties = read_properties(prop_file) if prop_file is not None else {}

    items: list[O3Item] = []
    missing: list[tuple[str, str]] = []
    for name in sorted(images):
        lacking = [d.name + "/" for d, masks in ((targ_dir, targets), (dist_dir, distractors)) if name not in masks]
        if lacking:
            missing.append((name, f"no mask in {' or '.join(lacking)}"))
            continue
        items.append(O3Item(name, images[name], targets[name], distractors[name], properties.get(name, {})))
    return O3Dataset(root=root, items=items, missing=missing)


def _open_image(path: Path) -> Image.Image:
    try:
        return Image.open(path)
    except (UnidentifiedImageError, OSError) as exc:
        raise InputError(f"{path}: not an image Pillow can read ({exc}); replace the file") from None


def load_mask(path: str | os.PathLike) -> np.ndarray:
    """A mask as bool (H, W): pixels whose grey value is >= 128.

    Single-channel masks are thresholded directly; colour masks through their
    luminance (Pillow's "L" conversion); alpha is ignored.
    """
    path = Path(path)
    with _open_image(path) as image:
        if image.mode not in MASK_MODES:
            raise InputError(f"{path}: pixel mode {image.mode} is not an 8-bit mask; save it as 8-bit greyscale")
        try:
            if image.mode == "1":
                return np.asarray(image, dtype=bool)
            grey = np.asarray(image.convert("L"))  # (H, W) uint8
        except OSError as exc:  # header fine, pixel data truncated or corrupt
            raise InputError(f"{path}: the image data is damaged ({exc}); replace the file") from None
    return grey >= MASK_THRESHOLD


def check_sizes(item: O3Item) -> tuple[int, int]:
    """Check that both masks of ``item`` have the image's size; return it as (H, W) pixels.

    Reads only the file headers. Raises InputError naming both sizes otherwise.
    """
    sizes = {}
    for path in (item.image, item.target_mask, item.distractor_mask):
        with _open_image(path) as image:
            sizes[path] = image.size  # (W, H)
    w, h = sizes[item.image]
    for path in (item.target_mask, item.distractor_mask):
        if sizes[path] != (w, h):
            mw, mh = sizes[path]
            raise InputError(
                f"{path}: mask is {mw}x{mh} but image {item.image.name} is {w}x{h} (width x height); "
                f"the mask must match its image pixel for pixel"
            )
    return h, w


def load_masks(item: O3Item) -> tuple[np.ndarray, np.ndarray]:
    """The target and distractor masks of ``item``, bool (H, W) each, after :func:`check_sizes`."""
    check_sizes(item)
    return load_mask(item.target_mask), load_mask(item.distractor_mask)
