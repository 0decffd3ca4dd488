"""A synthetic Odd-One-Out (O3) dataset, in the layout of the real one.

Each scene is a textured background (smooth noise, stripes or a gradient, in
muted colours) with 3–8 similar distractors and one target that differs from
them in exactly one feature: colour, shape, size or orientation. Objects are
Pillow polygons (circle, square, triangle, diamond, bar) of equal area at equal
scale, so a shape or colour singleton is not also a size singleton; their
bounding circles do not overlap.

:func:`draw_scene` draws one scene in memory (for training scripts that need
unlimited scenes); :func:`make_o3` writes ``n`` scenes as a folder that
:func:`qkweights.datasets.o3.open_o3` reads like the real dataset:

- ``images/NAME.jpg``: RGB JPEG (quality 90);
- ``targ_images/NAME.jpg``, ``dist_images/NAME.jpg``: single-channel JPEG masks
  (quality 95, white = object), so JPEG ringing is present at the edges as in
  the real masks;
- ``image_properties.txt``: the real header, :data:`qkweights.datasets.o3.PROPERTY_COLUMNS`.

Sizes are ``(height, width)`` in pixels, as the returned mask arrays.
Everything is a function of the seed: image ``i`` of seed ``s`` is drawn from
``numpy.random.default_rng([s, i])``, so a folder of ``n`` images is a prefix
of one of ``n + k`` images, and the same seed gives the same bytes.
"""

from __future__ import annotations

import csv
import io
import os
import shutil
import uuid
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from qkweights.datasets.o3 import (
    DISTRACTOR_DIRS,
    FEATURE_FLAGS,
    PROPERTY_COLUMNS,
    TARGET_DIRS,
)
from qkweights.errors import InputError
from qkweights.outputs import prepare_dir

FEATURES = ("color", "shape", "size", "orientation")  # the flags a synthetic target differs in

IMAGE_QUALITY = 90
MASK_QUALITY = 95
MIN_SIDE = 48  # pixels; below this, nine objects of visible size do not fit

PALETTE = {  # saturated object colours, far from the muted backgrounds
    "red": (225, 35, 35),
    "green": (30, 185, 60),
    "blue": (40, 80, 235),
    "yellow": (245, 215, 25),
    "magenta": (215, 40, 205),
    "cyan": (25, 210, 225),
    "orange": (250, 130, 20),
}


def _regular(k: int, radius: float, phase: float) -> np.ndarray:
    """Vertices (k, 2) of a regular k-gon of circumradius ``radius``, as (x, y)."""
    a = phase + 2 * np.pi * np.arange(k) / k
    return radius * np.stack([np.cos(a), np.sin(a)], axis=1)


# Unit shapes of area pi (that of the unit circle; the 48-gon is 0.3% short),
# centred at the origin, x right and y down; scaled by the object radius and
# rotated when drawn.
SHAPES = {
    "circle": _regular(48, 1.0, 0.0),
    "square": _regular(4, np.sqrt(np.pi / 2), np.pi / 4),
    "triangle": _regular(3, np.sqrt(4 * np.pi / (3 * np.sqrt(3))), -np.pi / 2),
    "diamond": np.array([[0, -1], [0.6, 0], [0, 1], [-0.6, 0]]) * np.sqrt(np.pi / 1.2),
    "bar": np.array([[-1, -0.25], [1, -0.25], [1, 0.25], [-1, 0.25]]) * np.sqrt(np.pi),
}
# Rotation that makes an orientation singleton obvious: a bar turned across the
# others, a triangle turned upside down (its symmetry is 120 degrees).
ORIENTATION_TURN = {"bar": 90.0, "triangle": 60.0}


def _muted_colour(rng: np.random.Generator) -> np.ndarray:
    """A low-saturation colour (3,) float: grey level 70–180 with a tint of ±25."""
    return rng.uniform(70, 180) + rng.uniform(-25, 25, size=3)


def _smooth_noise(rng: np.random.Generator, c: int, h: int, w: int) -> np.ndarray:
    """Smooth noise (h, w, c) float32 in about [-1, 1]: uniform noise on a 16-pixel grid, bicubic-upsampled."""
    coarse = rng.uniform(-1, 1, size=(c, max(2, h // 16), max(2, w // 16))).astype(np.float32)
    return np.stack([np.asarray(Image.fromarray(a, "F").resize((w, h), Image.BICUBIC)) for a in coarse], axis=2)


def _background(rng: np.random.Generator, h: int, w: int) -> tuple[np.ndarray, str]:
    """A textured background (h, w, 3) uint8 and its kind: noise, stripes or gradient."""
    kind = str(rng.choice(["noise", "stripes", "gradient"]))
    if kind == "noise":
        base = _muted_colour(rng).astype(np.float32)
        bg = base + 35 * _smooth_noise(rng, 1, h, w) + 12 * _smooth_noise(rng, 3, h, w)  # mostly lightness
    else:
        phi = rng.uniform(0, np.pi)
        y = np.arange(h, dtype=np.float32)[:, None]
        x = np.arange(w, dtype=np.float32)[None, :]
        along = x * np.float32(np.cos(phi)) + y * np.float32(np.sin(phi))  # (h, w) pixels along direction phi
        if kind == "stripes":
            mix = 0.5 + 0.5 * np.sin(along * np.float32(2 * np.pi / rng.uniform(6, 30)))
        else:
            mix = (along - along.min()) / max(float(np.ptp(along)), 1.0)
        c0, c1 = _muted_colour(rng).astype(np.float32), _muted_colour(rng).astype(np.float32)
        bg = c0 + (c1 - c0) * mix[:, :, None]
    bg += 6 * rng.standard_normal((h, w, 3), dtype=np.float32)  # fine grain
    return np.clip(np.rint(bg), 0, 255).astype(np.uint8), kind


def _vertices(shape: str, radius: float, angle_deg: float, centre: tuple[float, float]) -> list[tuple[float, float]]:
    """Pixel (x, y) vertices of ``shape`` scaled by ``radius``, rotated, placed at ``centre``."""
    a = np.deg2rad(angle_deg)
    rot = np.array([[np.cos(a), -np.sin(a)], [np.sin(a), np.cos(a)]])
    pts = SHAPES[shape] @ rot.T * radius + np.asarray(centre)
    return [(float(x), float(y)) for x, y in pts]


def _bounding_radius(shape: str, radius: float) -> float:
    return float(np.linalg.norm(SHAPES[shape], axis=1).max() * radius)


def _design(rng: np.random.Generator, side: float) -> tuple[str, dict, dict, int]:
    """Choose the differing feature, the distractors' look and the target's look."""
    feature = str(rng.choice(FEATURES))
    shapes = list(ORIENTATION_TURN) if feature == "orientation" else list(SHAPES)
    base = {
        "shape": str(rng.choice(shapes)),
        "color": str(rng.choice(list(PALETTE))),
        "radius": rng.uniform(0.04, 0.055) * side,
        "angle": rng.uniform(0, 180),
    }
    target = dict(base)
    if feature == "color":
        target["color"] = str(rng.choice([c for c in PALETTE if c != base["color"]]))
    elif feature == "shape":
        target["shape"] = str(rng.choice([s for s in SHAPES if s != base["shape"]]))
    elif feature == "size":
        target["radius"] = base["radius"] * float(rng.choice([0.55, 1.7]))
    else:
        target["angle"] = base["angle"] + ORIENTATION_TURN[base["shape"]]
    return feature, base, target, int(rng.integers(3, 9))


def _place(rng: np.random.Generator, radii: list[float], h: int, w: int) -> list[tuple[float, float] | None]:
    """Centres (x, y) for objects of bounding radii ``radii`` whose discs keep a gap.

    The first object (the target) always finds room; an object that finds none
    in 400 tries gets ``None`` and is left out of the scene.
    """
    gap = 0.02 * min(h, w)
    centres: list[tuple[float, float] | None] = []
    for r in radii:
        taken = [(c, pr) for c, pr in zip(centres, radii) if c is not None]
        for _ in range(400):
            x, y = rng.uniform(r + gap, w - r - gap), rng.uniform(r + gap, h - r - gap)
            if all(np.hypot(x - cx, y - cy) > r + pr + gap for (cx, cy), pr in taken):
                centres.append((x, y))
                break
        else:
            centres.append(None)
    return centres


def _placed(rng: np.random.Generator, looks: list[dict], h: int, w: int) -> list[tuple[dict, tuple[float, float]]]:
    """The objects that found room, with their centres; the target comes first."""
    radii = [_bounding_radius(o["shape"], o["radius"]) for o in looks]
    return [(o, c) for o, c in zip(looks, _place(rng, radii, h, w)) if c is not None]


def draw_scene_labels(
    rng: np.random.Generator, size: tuple[int, int] = (224, 224), *, object_scale: float = 1.0
) -> tuple[Image.Image, np.ndarray, dict]:
    """Draw one odd-one-out scene with its instance map: (image, labels (H, W) uint8, properties).

    labels: 0 background, 1 the target, 2, 3, … the distractors (exactly the pixels
    painted with each object's colour); the rest as :func:`draw_scene`, which draws the
    same scene from the same ``rng``. object_scale: multiplies every object's radius
    (1 = the usual scenes; 2 makes objects of about 2.5 patches of 8×8 pixels at 64×64,
    large enough for ``same-object``, which drops objects smaller than one patch).
    """
    h, w = _check_size(size)
    if not 0 < object_scale <= 2.5:
        raise InputError(f"object_scale {object_scale} is out of range; give a factor in (0, 2.5]")
    side = float(min(h, w))
    feature, base, target, num_distractors = _design(rng, side)
    base["radius"] *= object_scale
    target["radius"] *= object_scale
    looks = [target] + [
        dict(base, radius=base["radius"] * rng.uniform(0.95, 1.05), angle=base["angle"] + rng.uniform(-4, 4))
        for _ in range(num_distractors)
    ]
    placed = _placed(rng, looks, h, w)
    while len(placed) < 4:  # crowded: shrink everything and place again
        for o in looks:
            o["radius"] *= 0.85
        placed = _placed(rng, looks, h, w)

    labels = Image.new("L", (w, h), 0)  # 0 background, 1 target, 2.. distractors
    draw = ImageDraw.Draw(labels)
    for k, (o, c) in enumerate(placed):
        draw.polygon(_vertices(o["shape"], o["radius"], o["angle"], c), fill=k + 1)
    label = np.asarray(labels)  # (H, W) uint8
    pixels, kind = _background(rng, h, w)  # (H, W, 3) uint8
    for k, (o, _) in enumerate(placed):
        pixels[label == k + 1] = PALETTE[o["color"]]

    target_mask = label == 1
    rows, cols = np.nonzero(target_mask)
    cx, cy = placed[0][1]
    props = {
        "num_distractors": len(placed) - 1,
        "target_type": target["shape"],
        "target_subtype": target["color"],
        "target_size": int(target_mask.sum()),
        "target_x": int(round(cx)),
        "target_y": int(round(cy)),
        **{flag: int(flag == feature) for flag in FEATURE_FLAGS},
        "feature": feature,
        "target_bbox": (int(cols.min()), int(rows.min()), int(cols.max()) + 1, int(rows.max()) + 1),
        "target_centre": (float(cx), float(cy)),
        "distractor_shape": base["shape"],
        "distractor_color": base["color"],
        "background": kind,
    }
    return Image.fromarray(pixels, "RGB"), label, props


def draw_scene(
    rng: np.random.Generator, size: tuple[int, int] = (224, 224)
) -> tuple[Image.Image, np.ndarray, np.ndarray, dict]:
    """Draw one odd-one-out scene.

    ``size`` is (height H, width W) in pixels, at least 48 each. Returns the RGB
    image (PIL, W×H), the target mask and the distractor mask (bool (H, W),
    exactly the pixels painted with each object's colour) and the properties:
    the columns of :data:`PROPERTY_COLUMNS` except ``image_name`` (target_type
    = target shape, target_subtype = target colour name, target_size = target
    area in pixels, target_x/target_y = pixel column/row of the target's
    centre; one flag of :data:`FEATURES` is 1, the rest 0), plus
    ``feature`` (the flag that is set), ``target_bbox`` (x0, y0, x1, y1), pixel
    bounds with x1, y1 exclusive, ``target_centre`` (x, y) float pixels,
    ``distractor_shape``, ``distractor_color`` and ``background`` (noise,
    stripes or gradient). The same draw as :func:`draw_scene_labels`.
    """
    image, label, props = draw_scene_labels(rng, size)
    return image, label == 1, label > 1, props


def _check_size(size: tuple[int, int]) -> tuple[int, int]:
    try:
        h, w = (int(s) for s in size)
    except (TypeError, ValueError):
        raise InputError(f"size {size!r} is not (height, width); pass two integers such as (224, 224)") from None
    if min(h, w) < MIN_SIDE:
        raise InputError(
            f"size {h}x{w} (height x width) is too small for a scene; use at least {MIN_SIDE} pixels a side"
        )
    return h, w


def _jpeg(image: Image.Image, quality: int) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def _write_folder(
    folder: Path,
    n: int,
    seed: int,
    size: tuple[int, int],
    mask_dirs: tuple[str, str],
    instances: bool = False,
    object_scale: float = 1.0,
) -> None:
    """Write the n scenes of ``seed`` into the (new, empty) ``folder``."""
    targ_dir, dist_dir = mask_dirs
    for sub in ("images", targ_dir, dist_dir) + (("instances",) if instances else ()):
        (folder / sub).mkdir()
    rows = []
    for i in range(n):
        name = f"synth_{i:04d}"
        image, label, props = draw_scene_labels(np.random.default_rng([seed, i]), size, object_scale=object_scale)
        target_mask, distractor_mask = label == 1, label > 1
        (folder / "images" / f"{name}.jpg").write_bytes(_jpeg(image, IMAGE_QUALITY))
        if instances:
            Image.fromarray(label, "L").save(folder / "instances" / f"{name}.png")
        for sub, mask in ((targ_dir, target_mask), (dist_dir, distractor_mask)):
            grey = Image.fromarray(mask.astype(np.uint8) * 255, "L")
            (folder / sub / f"{name}.jpg").write_bytes(_jpeg(grey, MASK_QUALITY))
        rows.append({"image_name": f"{name}.jpg", **{c: props[c] for c in PROPERTY_COLUMNS[1:]}})
    with open(folder / "image_properties.txt", "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=PROPERTY_COLUMNS, lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)


def make_o3(
    out_dir: str | os.PathLike,
    *,
    n: int = 40,
    seed: int = 0,
    size: tuple[int, int] = (224, 224),
    mask_dirs: tuple[str, str] = ("targ_images", "dist_images"),
    instances: bool = False,
    object_scale: float = 1.0,
) -> Path:
    """Write a synthetic O3 folder of ``n`` scenes of ``size`` (height, width) and return its path.

    ``mask_dirs`` names the target and distractor mask folders: one of
    ``targ_images``/``targ_labels`` and one of ``dist_images``/``dist_labels``.
    ``instances``: also write ``instances/NAME.png``, the 8-bit instance map of each
    scene (0 background, 1 target, 2… distractors; lossless), which makes the folder a
    generic layout for ``same-object`` (:mod:`qkweights.datasets.ade20k`). ``object_scale``:
    see :func:`draw_scene_labels`.
    The folder is built in a hidden temporary sibling and renamed into place, so
    ``out_dir`` either appears complete or not at all; an existing ``out_dir``
    must be an empty folder.
    """
    out = Path(out_dir)
    if n < 1:
        raise InputError(f"n={n}: a synthetic O3 folder needs at least one image; pass n >= 1")
    if seed < 0:
        raise InputError(f"seed={seed} is negative; pass a seed >= 0")
    _check_size(size)
    if len(mask_dirs) != 2 or mask_dirs[0] not in TARGET_DIRS or mask_dirs[1] not in DISTRACTOR_DIRS:
        raise InputError(
            f"mask_dirs={tuple(mask_dirs)!r} is not a known O3 spelling; "
            f"pass one of {TARGET_DIRS} and one of {DISTRACTOR_DIRS}"
        )
    if out.exists() and not out.is_dir():
        raise InputError(f"{out}: is a file; give the path of a new folder (or of an empty one)")
    if out.exists() and any(out.iterdir()):
        raise InputError(f"{out} already exists and is not an empty folder; remove it or choose another output folder")
    prepare_dir(out.parent)
    tmp = out.parent / f".{out.name}.{uuid.uuid4().hex[:12]}.tmp"
    tmp.mkdir()
    try:
        _write_folder(tmp, n, seed, size, tuple(mask_dirs), instances, object_scale)
        os.replace(tmp, out)  # an empty ``out`` is replaced; a non-empty one makes this fail
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out
