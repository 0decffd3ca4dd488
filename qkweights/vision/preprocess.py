"""Image loading and each checkpoint's own preprocessing, with PIL and numpy only.

A :class:`Preprocess` turns images into the model input ``(B, 3, H, W)`` float32:
convert to RGB, resize with PIL, centre-crop, rescale to [0, 1], normalise with the
checkpoint's mean and std. Three sources of truth are reproduced:

* **transformers** (``from_hf``): the *slow*, PIL-based image processors
  (``ViTImageProcessorPil``, ``DeiTImageProcessorPil``, ``CLIPImageProcessorPil``,
  ``BitImageProcessorPil``; DINOv2 uses BiT's, I-JEPA ViT's). Those are the reference,
  because the fast torchvision processors resize tensors with ``torch`` interpolation
  and differ from PIL by up to a few grey levels; torchvision is not a dependency here.
  transformers resizes the uint8 RGB image with ``PIL.Image.resize`` (no
  ``reducing_gap``), centre-crops with ``top = (H - h) // 2`` (zero padding when the
  crop is larger), rescales as ``float32(float64(x) * rescale_factor)`` and normalises
  in float32.
* **timm** (``from_timm``): ``transforms_imagenet_eval``: resize the shortest edge to
  ``floor(size / crop_pct)`` (or squash both edges), torchvision ``CenterCrop``
  (``top = int(round((H - h) / 2))``, round half to even), ``ToTensor``, ``Normalize``.
* **open_clip** (``from_open_clip``): ``image_transform(is_train=False)``: "shortest"
  = shortest-edge resize + torchvision ``CenterCrop``; "squash" = resize to the exact
  size; the RGB conversion comes *after* the resize and crop.

The ``convention`` field records which of the three an instance follows:

===============  =========================================  ==========================
convention       RGB conversion                              centre-crop offset
===============  =========================================  ==========================
"transformers"   before resizing, alpha composited on white  ``(H - h) // 2``
"timm"           before resizing, ``convert("RGB")``         ``round((H - h) / 2)``
"open_clip"      after resize and crop, ``convert("RGB")``   ``round((H - h) / 2)``
===============  =========================================  ==========================

The three differ only for images with transparency or palettes (RGB conversion) and
for odd crop margins (offset rounding). ToTensor's ``float32(x) / 255`` equals
transformers' ``float32(float64(x) * (1/255))`` for every uint8 value, so rescaling is
shared.

Inputs that transformers would reject without ``do_convert_rgb`` (grayscale, RGBA,
palette images fed to ViT/DeiT processors, whose configs leave it unset) are always
converted to RGB here; for RGB inputs the conversion is the identity.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

from qkweights.errors import InputError, SpecError

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
IMAGENET_DEFAULT_MEAN = (0.485, 0.456, 0.406)
IMAGENET_DEFAULT_STD = (0.229, 0.224, 0.225)
IMAGENET_STANDARD_MEAN = (0.5, 0.5, 0.5)
IMAGENET_STANDARD_STD = (0.5, 0.5, 0.5)

CONVENTIONS = ("transformers", "timm", "open_clip")
PIL_FILTERS = {"nearest": 0, "lanczos": 1, "bilinear": 2, "bicubic": 3, "box": 4, "hamming": 5}

# Class defaults of the slow transformers processors (transformers 5.x
# models/*/image_processing_pil_*.py); a key missing or null in a config takes these.
_HF_DEFAULTS = {
    "ViTImageProcessor": dict(
        size={"height": 224, "width": 224},
        resample=2,
        do_center_crop=False,
        crop_size=None,
        image_mean=IMAGENET_STANDARD_MEAN,
        image_std=IMAGENET_STANDARD_STD,
        default_to_square=True,
    ),
    "DeiTImageProcessor": dict(
        size={"height": 256, "width": 256},
        resample=3,
        do_center_crop=True,
        crop_size={"height": 224, "width": 224},
        image_mean=IMAGENET_STANDARD_MEAN,
        image_std=IMAGENET_STANDARD_STD,
        default_to_square=True,
    ),
    "CLIPImageProcessor": dict(
        size={"shortest_edge": 224},
        resample=3,
        do_center_crop=True,
        crop_size={"height": 224, "width": 224},
        image_mean=OPENAI_CLIP_MEAN,
        image_std=OPENAI_CLIP_STD,
        default_to_square=False,
    ),
    "BitImageProcessor": dict(
        size={"shortest_edge": 224},
        resample=3,
        do_center_crop=True,
        crop_size={"height": 224, "width": 224},
        image_mean=OPENAI_CLIP_MEAN,
        image_std=OPENAI_CLIP_STD,
        default_to_square=False,
    ),
}
_HF_COMMON = dict(do_resize=True, do_rescale=True, rescale_factor=1 / 255, do_normalize=True)


# ----------------------------------------------------------------------------- loading


def _read_file(path: Path) -> Image.Image:
    """Decode an image file fully (so truncation fails here), upright per its EXIF tag."""
    if path.is_dir():
        raise InputError(f"{path}: is a folder; give one image file (PNG, JPEG, …)")
    if not path.is_file():
        dangling = path.is_symlink() and not path.exists()
        why = " (a symbolic link that leads nowhere: a loop, or a missing target)" if dangling else ""
        raise InputError(f"{path}: no such image file{why}; check the path")
    try:
        with Image.open(path) as im:
            im.load()
            ImageOps.exif_transpose(im, in_place=True)  # upright; no copy of an image that needs no turn
            return im
    except Image.DecompressionBombError:
        raise InputError(
            f"{path}: the image is larger than the {2 * Image.MAX_IMAGE_PIXELS:,} pixels Pillow decodes (a "
            "guard against "
            f"decompression bombs); downscale it (the model sees at most a few hundred pixels a side)"
        ) from None
    except (OSError, ValueError, SyntaxError, EOFError) as exc:
        reason = " ".join(f"{type(exc).__name__}: {exc}".split())
        raise InputError(f"{path}: cannot decode the image ({reason}); give a complete PNG or JPEG file") from None


def _check_array(image: np.ndarray) -> None:
    if image.dtype != np.uint8:
        raise InputError(
            f"image array has dtype {image.dtype}; give uint8 values 0-255 of shape (H, W), (H, W, 3) or (H, W, 4)"
        )
    if not (image.ndim == 2 or (image.ndim == 3 and image.shape[2] in (3, 4))) or 0 in image.shape:
        raise InputError(f"image array has shape {image.shape}; give uint8 of shape (H, W), (H, W, 3) or (H, W, 4)")


def open_image(image) -> Image.Image:
    """The image as a decoded PIL image in its own mode (no RGB conversion).

    image: a path (str or Path; EXIF orientation applied, as transformers'
    ``load_image`` does), a PIL image (returned as is), or a uint8 array (H, W),
    (H, W, 3) or (H, W, 4) (as modes L, RGB, RGBA).
    """
    if isinstance(image, (str, os.PathLike)):
        return _read_file(Path(image))
    if isinstance(image, Image.Image):
        return image
    if isinstance(image, np.ndarray):
        _check_array(image)
        return Image.fromarray(np.ascontiguousarray(image))
    raise InputError(
        f"cannot read an image from a {type(image).__name__}; give a file path, a PIL image or a uint8 array"
    )


def _as_rgb(image: Image.Image) -> Image.Image:
    """PIL's ``convert("RGB")``, without its copy of an image that is RGB already (the same pixels, half the memory
    of a large image)."""
    return image if image.mode == "RGB" else image.convert("RGB")


def _pil_to_rgb(image: Image.Image) -> Image.Image:
    """transformers' ``convert_to_rgb`` for PIL images: transparency composited on white."""
    if "A" in image.getbands() or image.info.get("transparency") is not None:
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return _as_rgb(image)


def _array_to_rgb(image: np.ndarray) -> np.ndarray:
    """transformers' ``convert_to_rgb`` for uint8 arrays: (H, W[, 1|3|4]) -> (H, W, 3)."""
    if image.ndim == 2:
        return np.repeat(image[:, :, None], 3, axis=2)
    if image.shape[2] == 3:
        return image
    alpha = image[..., 3:4] / 255
    return np.round(alpha * image[..., :3] + (1 - alpha) * 255).astype(np.uint8)


def load_image(image) -> Image.Image:
    """Load one image as an RGB PIL image, converted the way transformers' processors do.

    image: a path (str/Path), a PIL image of any mode, or a uint8 array (H, W),
    (H, W, 3) or (H, W, 4). Grayscale is replicated; images with an alpha band or a
    transparency key (RGBA, LA, PA, P with transparency) are composited on opaque
    white; every other mode (CMYK, P, I;16, I, F, 1, YCbCr, ...) goes through PIL's
    ``convert("RGB")`` (16-bit and float values are clipped to 0-255 by PIL, not
    rescaled). Arrays with 4 channels are composited in float64 and rounded, as in
    transformers' numpy path. Raises InputError naming the file if it is missing,
    unreadable or truncated.
    """
    if isinstance(image, np.ndarray):
        _check_array(image)
        return Image.fromarray(np.ascontiguousarray(_array_to_rgb(image)))
    return _pil_to_rgb(open_image(image))


# ----------------------------------------------------------------------------- geometry


@dataclass(frozen=True)
class Geometry:
    """Where an input image lands on the model's input grid.

    The input (height, width) ``input_hw`` is resized to ``resized_hw``; the output is
    the window of ``output_hw`` pixels whose top-left corner is at row ``top``, column
    ``left`` of the resized image. ``top``/``left`` are negative (and the window
    overhangs) when the crop is larger than the resized image: the overhang is zero
    padding (pixel value 0 before normalisation). In continuous pixel-edge
    coordinates, input point (y, x) lands at
    ``(y * resized_h / input_h - top, x * resized_w / input_w - left)``.
    """

    input_hw: tuple[int, int]
    resized_hw: tuple[int, int]
    top: int
    left: int
    output_hw: tuple[int, int]

    @property
    def box(self) -> tuple[int, int, int, int]:
        """The crop window as a PIL box (left, upper, right, lower) on the resized image."""
        return (self.left, self.top, self.left + self.output_hw[1], self.top + self.output_hw[0])


def _shortest_edge_hw(height: int, width: int, edge: int) -> tuple[int, int]:
    """(h, w) with the shorter side = edge, the longer truncated (transformers = torchvision)."""
    short, long = (width, height) if width <= height else (height, width)
    new_long = int(edge * long / short)
    return (new_long, edge) if width <= height else (edge, new_long)


def _hf_offset(resized: int, crop: int) -> int:
    """transformers ``center_crop``: floor((H - h) / 2); with padding the image sits at ceil((h - H) / 2)."""
    return (resized - crop) // 2


def _torchvision_offset(resized: int, crop: int) -> int:
    """torchvision ``center_crop``: pad (h - H) // 2 before, then int(round((H - h) / 2)) (half to even)."""
    if crop > resized:
        return -((crop - resized) // 2)
    return int(round((resized - crop) / 2.0))


# ----------------------------------------------------------------------------- preprocess


def _hf_typed(cfg: dict, key: str, kind, wanted: str) -> None:
    """Refuse a preprocessor_config.json value of the wrong JSON type, naming the key."""
    value = cfg.get(key)
    if value is not None and (not isinstance(value, kind) or (isinstance(value, bool) and kind is not bool)):
        raise SpecError(f"preprocessor_config.json: {key} is {value!r}; it must be {wanted}; fix the file")


def _pair(value, what: str) -> tuple[int, int] | None:
    if value is None:
        return None
    pair = tuple(value)
    if len(pair) != 2 or not all(isinstance(v, (int, np.integer)) and v > 0 for v in pair):
        raise SpecError(f"preprocess {what} is {value!r}; give two positive integers (height, width)")
    return (int(pair[0]), int(pair[1]))


def _triple(value, what: str) -> tuple[float, float, float]:
    real = (int, float, np.integer, np.floating)
    values = (
        (value,) * 3
        if isinstance(value, real)
        else tuple(value)
        if isinstance(value, (list, tuple, np.ndarray))
        else ()
    )
    if len(values) != 3 or not all(
        isinstance(v, real) and not isinstance(v, bool) and math.isfinite(v) for v in values
    ):
        raise SpecError(f"preprocess {what} is {value!r}; give three finite numbers (R, G, B)")
    return tuple(float(v) for v in values)


@dataclass(frozen=True)
class Preprocess:
    """One checkpoint's image preprocessing: resize, centre crop, rescale, normalise.

    size: resize to exactly (h, w); or shortest_edge: resize so the shorter side is
    this many pixels, the longer ``int(edge * long / short)``; neither = no resize.
    crop: centre crop (h, w) after resizing (zero padding where it overhangs), or None.
    resample: PIL filter code (0 nearest, 1 lanczos, 2 bilinear, 3 bicubic, 4 box,
    5 hamming). rescale: factor from uint8 to [0, 1] (1/255; 1.0 = no rescale).
    mean, std: per-channel normalisation (RGB). convention: "transformers", "timm" or
    "open_clip" (module docstring: RGB conversion and crop rounding).
    """

    size: tuple[int, int] | None = None
    shortest_edge: int | None = None
    crop: tuple[int, int] | None = None
    resample: int = 3
    rescale: float = 1 / 255
    mean: tuple[float, float, float] = (0.0, 0.0, 0.0)
    std: tuple[float, float, float] = (1.0, 1.0, 1.0)
    convention: str = "transformers"

    def __post_init__(self):
        size, crop = _pair(self.size, "size"), _pair(self.crop, "crop")
        mean, std = _triple(self.mean, "mean"), _triple(self.std, "std")
        if size is not None and self.shortest_edge is not None:
            raise SpecError("preprocess has both size and shortest_edge; give one of them")
        if self.shortest_edge is not None and not (
            isinstance(self.shortest_edge, (int, np.integer)) and self.shortest_edge > 0
        ):
            raise SpecError(f"preprocess shortest_edge is {self.shortest_edge!r}; give a positive integer")
        if self.resample not in PIL_FILTERS.values():
            raise SpecError(f"preprocess resample is {self.resample!r}; give a PIL filter code 0-5")
        if not (math.isfinite(self.rescale) and self.rescale > 0):
            raise SpecError(f"preprocess rescale is {self.rescale!r}; give a positive factor such as 1/255")
        if any(s == 0 for s in std):
            raise SpecError(f"preprocess std is {std}; every channel needs a non-zero std")
        if self.convention not in CONVENTIONS:
            raise SpecError(f"preprocess convention is {self.convention!r}; give one of {', '.join(CONVENTIONS)}")
        object.__setattr__(self, "size", size)
        object.__setattr__(self, "crop", crop)
        object.__setattr__(self, "mean", mean)
        object.__setattr__(self, "std", std)
        if self.shortest_edge is not None:
            object.__setattr__(self, "shortest_edge", int(self.shortest_edge))

    # ------------------------------------------------------------------ constructors

    @classmethod
    def from_hf(cls, preprocessor_config: dict) -> Preprocess:
        """From a transformers ``preprocessor_config.json`` (ViT, DeiT, CLIP, BiT/DINOv2 processors).

        The processor class comes from ``image_processor_type`` (or the legacy
        ``feature_extractor_type``, "…FeatureExtractor"; "Fast"/"Pil" suffixes ignored);
        missing or null keys take that class's defaults. An integer ``size`` means a
        square for ViT/DeiT and the shortest edge for CLIP/BiT (``default_to_square``).
        ``do_convert_rgb`` is ignored: images are always converted to RGB.
        """
        cfg = preprocessor_config
        kind = str(cfg.get("image_processor_type") or cfg.get("feature_extractor_type") or "")
        kind = kind.replace("FeatureExtractor", "ImageProcessor").removesuffix("Fast").removesuffix("Pil")
        if kind not in _HF_DEFAULTS:
            raise SpecError(
                f"preprocessor_config.json: image processor {kind or '(none)'!r} is not supported "
                f"(supported: {', '.join(_HF_DEFAULTS)}); give the preprocessing explicitly"
            )
        merged = {**_HF_COMMON, **_HF_DEFAULTS[kind]}
        merged.update({k: v for k, v in cfg.items() if v is not None})
        for key in ("do_resize", "do_center_crop", "do_rescale", "do_normalize"):
            _hf_typed(merged, key, bool, "true or false")
        _hf_typed(merged, "resample", int, "a PIL filter code 0-5")
        _hf_typed(merged, "rescale_factor", (int, float), "a number such as 0.00392156862745098")
        size = shortest = crop = None
        if merged["do_resize"]:
            size, shortest = _hf_size(merged["size"], bool(merged["default_to_square"]))
        if merged["do_center_crop"]:
            crop_size = merged["crop_size"]
            crop = None if crop_size is None else _hf_size(crop_size, True)[0]
            if crop is None:
                raise SpecError(
                    f"preprocessor_config.json: do_center_crop is true but crop_size is {crop_size!r}; "
                    "give crop_size as {height, width}"
                )
        return cls(
            size=size,
            shortest_edge=shortest,
            crop=crop,
            resample=int(merged["resample"]),
            rescale=float(merged["rescale_factor"]) if merged["do_rescale"] else 1.0,
            mean=merged["image_mean"] if merged["do_normalize"] else (0.0, 0.0, 0.0),
            std=merged["image_std"] if merged["do_normalize"] else (1.0, 1.0, 1.0),
            convention="transformers",
        )

    @classmethod
    def from_timm(cls, pretrained_cfg: dict) -> Preprocess:
        """From a timm ``pretrained_cfg`` (``transforms_imagenet_eval``).

        Defaults as timm's ``resolve_data_config``: input_size (3, 224, 224),
        interpolation "bicubic", crop_pct 0.875, crop_mode "center", ImageNet mean/std.
        The resize size is ``floor(size / crop_pct)``: shortest edge for "center"
        (square inputs only), both edges for "squash"; then a centre crop to the input
        size. crop_mode "border" and non-square "center" are not supported.
        """
        cfg = pretrained_cfg
        height, width = (int(v) for v in tuple(cfg.get("input_size") or (3, 224, 224))[-2:])
        interpolation = cfg.get("interpolation") or "bicubic"
        if interpolation not in PIL_FILTERS:
            raise SpecError(
                f"timm pretrained_cfg: interpolation {interpolation!r} is not one of "
                f"{', '.join(PIL_FILTERS)}; fix the config"
            )
        crop_pct = cfg.get("crop_pct") or 0.875
        crop_mode = cfg.get("crop_mode") or "center"
        scale_hw = (math.floor(height / crop_pct), math.floor(width / crop_pct))
        common = dict(
            crop=(height, width),
            resample=PIL_FILTERS[interpolation],
            mean=cfg.get("mean") or IMAGENET_DEFAULT_MEAN,
            std=cfg.get("std") or IMAGENET_DEFAULT_STD,
            convention="timm",
        )
        if crop_mode == "squash":
            return cls(size=scale_hw, **common)
        if crop_mode == "center" and height == width:
            return cls(shortest_edge=scale_hw[0], **common)
        raise SpecError(
            f"timm pretrained_cfg: crop_mode {crop_mode!r} with input size {height}x{width} is not supported "
            "(supported: 'center' with a square input, 'squash'); give the preprocessing explicitly"
        )

    @classmethod
    def from_open_clip(cls, preprocess_cfg: dict, image_size) -> Preprocess:
        """From open_clip's ``preprocess_cfg`` (open_clip_config.json) and the tower's image size.

        image_size: int or (h, w) (the model's ``vision_cfg.image_size``; it wins over
        any ``size`` key in the cfg). Defaults as open_clip's ``image_transform``:
        OpenAI CLIP mean/std, "bicubic" ("random" also means bicubic), resize_mode
        "shortest" (shortest-edge resize + centre crop, square sizes only) or "squash"
        (resize to exactly image_size); "longest" is not supported.
        """
        cfg = preprocess_cfg
        square = isinstance(image_size, (int, np.integer))
        height, width = (image_size, image_size) if square else tuple(image_size)
        interpolation = cfg.get("interpolation") or "bicubic"
        if interpolation not in ("bicubic", "bilinear", "random"):
            raise SpecError(
                f"open_clip preprocess_cfg: interpolation {interpolation!r} is not bicubic, bilinear or random; "
                "fix the config"
            )
        resize_mode = cfg.get("resize_mode") or "shortest"
        common = dict(
            resample=PIL_FILTERS["bilinear"] if interpolation == "bilinear" else PIL_FILTERS["bicubic"],
            mean=cfg.get("mean") or OPENAI_CLIP_MEAN,
            std=cfg.get("std") or OPENAI_CLIP_STD,
            convention="open_clip",
        )
        if resize_mode == "squash":
            return cls(size=(height, width), **common)
        if resize_mode == "shortest" and height == width:
            return cls(shortest_edge=int(height), crop=(height, width), **common)
        raise SpecError(
            f"open_clip preprocess_cfg: resize_mode {resize_mode!r} with image size {height}x{width} is not supported "
            "(supported: 'shortest' with a square size, 'squash'); give the preprocessing explicitly"
        )

    def with_size(self, height: int, width: int) -> Preprocess:
        """The same preprocessing but resized straight to (height, width) pixels, without crop."""
        if not all(isinstance(v, (int, np.integer)) and v > 0 for v in (height, width)):
            raise InputError(f"image size {height}x{width} is invalid; give two positive integers")
        return replace(self, size=(int(height), int(width)), shortest_edge=None, crop=None)

    # ------------------------------------------------------------------ application

    def geometry(self, width: int, height: int) -> Geometry:
        """The resize and crop applied to an image of width x height pixels (PIL's order)."""
        if self.size is not None:
            resized = self.size
        elif self.shortest_edge is not None:
            resized = _shortest_edge_hw(height, width, self.shortest_edge)
        else:
            resized = (height, width)
        if self.crop is None:
            return Geometry((height, width), resized, 0, 0, resized)
        offset = _hf_offset if self.convention == "transformers" else _torchvision_offset
        return Geometry(
            (height, width), resized, offset(resized[0], self.crop[0]), offset(resized[1], self.crop[1]), self.crop
        )

    def _resize_crop(self, image: Image.Image, resample: int) -> Image.Image:
        """Resize (if the size changes) then crop a PIL image; PIL fills the overhang with 0."""
        geo = self.geometry(*image.size)
        if geo.resized_hw != geo.input_hw:
            image = image.resize((geo.resized_hw[1], geo.resized_hw[0]), resample=resample)
        if geo.box != (0, 0, image.width, image.height):
            image = image.crop(geo.box)
        return image

    def _rgb_uint8(self, image) -> np.ndarray:
        """One image resized, cropped and converted per the convention: (H, W, 3) uint8."""
        if self.convention == "transformers":
            out = self._resize_crop(load_image(image), self.resample)
        elif self.convention == "timm":
            out = self._resize_crop(_as_rgb(open_image(image)), self.resample)
        else:
            out = self._resize_crop(open_image(image), self.resample).convert("RGB")
        return np.asarray(out, dtype=np.uint8)

    def __call__(self, images) -> np.ndarray:
        """Model input for one image or a list of images (anything ``load_image`` accepts).

        Returns (B, 3, H, W) float32: ``(float32(float64(x) * rescale) - mean) / std``
        in float32 (x the uint8 RGB pixels after resize and crop). All images must
        come out the same size (always true with a crop or an exact size).
        """
        batch = list(images) if isinstance(images, (list, tuple)) else [images]
        if not batch:
            raise InputError("no images given; give at least one image")
        pixels = [self._rgb_uint8(image) for image in batch]  # B x (H, W, 3)
        shapes = {p.shape for p in pixels}
        if len(shapes) > 1:
            raise InputError(
                f"images come out in different sizes {sorted(s[:2] for s in shapes)}; "
                "use a preprocessing with a crop or an exact size (with_size)"
            )
        mean, std = np.asarray(self.mean, np.float32), np.asarray(self.std, np.float32)
        height, width, _ = pixels[0].shape
        out = np.empty((len(pixels), 3, height, width), np.float32)  # (B, 3, H, W)
        for b, rgb in enumerate(pixels):
            x = (rgb.astype(np.float64) * self.rescale).astype(np.float32)  # (H, W, 3)
            out[b] = ((x - mean) / std).transpose(2, 0, 1)
        return out

    def transform_mask(self, mask: np.ndarray) -> np.ndarray:
        """Put a mask on the model's input grid: the image's resize and crop, bilinear, no normalisation.

        mask: (H, W) bool, uint8 or float in [0, 1] at the image's resolution. A uint8
        mask holding only 0 and 1 is a label mask; any other uint8 mask is an 8-bit
        image (255 = inside) and is divided by 255. The mask is resized with PIL's
        bilinear filter on float32 (antialiased: when shrinking, each output pixel
        averages the input pixels under it, so values are the covered fraction),
        whatever the image's own filter, then cropped with the same window as the
        image; the overhang of a padding crop is 0. Returns (h_out, w_out) float32 in
        [0, 1], aligned pixel for pixel with ``self(image)[0, c]``.
        """
        m = np.asarray(mask)
        if m.ndim != 2 or 0 in m.shape:
            raise InputError(f"mask has shape {m.shape}; give a 2-D (H, W) mask")
        if m.dtype == np.bool_:
            values = m.astype(np.float32)
        elif m.dtype == np.uint8:
            values = m.astype(np.float32) if m.max() <= 1 else m.astype(np.float32) / np.float32(255)
        elif np.issubdtype(m.dtype, np.floating):
            if not np.all(np.isfinite(m)) or m.min() < 0 or m.max() > 1:
                raise InputError(f"mask values span [{np.nanmin(m)}, {np.nanmax(m)}]; give finite values in [0, 1]")
            values = m.astype(np.float32)
        else:
            raise InputError(f"mask has dtype {m.dtype}; give bool, uint8 or float values in [0, 1]")
        out = self._resize_crop(Image.fromarray(values), Image.Resampling.BILINEAR)
        return np.clip(np.asarray(out, dtype=np.float32), 0.0, 1.0)

    def transform_labels(self, labels: np.ndarray) -> np.ndarray:
        """Put an integer label map on the model's input grid: the image's resize and crop, nearest neighbour.

        labels: (H, W) non-negative integer ids (8-, 16- or 32-bit; bool counts as 0/1) at the
        image's resolution. The map goes through exactly the geometry of :meth:`geometry`
        (the image's own resize, then its crop window) with PIL's NEAREST filter on an 8-bit
        image (mode "L") for uint8 and bool maps, else a 32-bit integer one (mode "I") — NEAREST
        copies pixels, so both give the same ids, and no id is ever blended or invented: output pixel (y, x) takes
        input pixel (floor((y + ½)·H/h), floor((x + ½)·W/w)) of the resized axes, as PIL maps
        pixel centres. The overhang of a padding crop is 0. Returns (h_out, w_out) int64,
        aligned pixel for pixel with ``self(image)[0, c]``.
        """
        m = np.asarray(labels)
        if m.ndim != 2 or 0 in m.shape:
            raise InputError(f"label map has shape {m.shape}; give a 2-D (H, W) map of integer ids")
        if m.dtype == np.bool_:
            m = m.view(np.uint8)
        if not np.issubdtype(m.dtype, np.integer):
            raise InputError(f"label map has dtype {m.dtype}; give integer ids (8-, 16- or 32-bit)")
        if m.min() < 0 or m.max() > np.iinfo(np.int32).max:
            raise InputError(f"label map ids span [{m.min()}, {m.max()}]; give ids in 0–{np.iinfo(np.int32).max}")
        small = m.dtype == np.uint8  # mode "L": a quarter of the memory of mode "I" for a large map
        image = Image.fromarray(m if small else m.astype(np.int32, copy=False))
        out = self._resize_crop(image, Image.Resampling.NEAREST)
        return np.asarray(out, dtype=np.int64)


def _hf_size(value, default_to_square: bool) -> tuple[tuple[int, int] | None, int | None]:
    """transformers ``get_size_dict`` for the size forms these processors use: ((h, w), None) or (None, edge)."""
    if isinstance(value, (int, np.integer)):
        return ((int(value), int(value)), None) if default_to_square else (None, int(value))
    if isinstance(value, (list, tuple)):
        return _pair(value, "size"), None
    if isinstance(value, dict) and set(value) == {"height", "width"}:
        return _pair((value["height"], value["width"]), "size"), None
    if isinstance(value, dict) and set(value) == {"shortest_edge"}:
        return None, value["shortest_edge"]
    raise SpecError(
        f"preprocessor_config.json: size {value!r} is not supported; give {{height, width}} or {{shortest_edge}}"
    )


def display_image(pixels: np.ndarray, mean, std, rescale: float) -> np.ndarray:
    """The model's input image back in [0, 1]: undo the normalisation of one preprocessed image.

    pixels: (3, H, W) float32 as ``Preprocess`` returns it, ``(x·rescale − mean)/std``
    with x the uint8 RGB values. Returns (H, W, 3) float64 ``x/255`` clipped to [0, 1].
    """
    px = np.asarray(pixels, np.float64).transpose(1, 2, 0)  # (H, W, 3)
    x = (px * np.asarray(std) + np.asarray(mean)) / (rescale * 255.0)
    return np.clip(x, 0.0, 1.0)
