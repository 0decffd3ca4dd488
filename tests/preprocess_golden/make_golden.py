"""Regenerate the preprocessing goldens with transformers' slow (PIL) image processors.

Run from the repository root (needs transformers >= 5 for the ``*ImageProcessorPil``
classes, and Pillow; no network, no torch):

    python tests/preprocess_golden/make_golden.py

Writes into this folder:
- the input images: small deterministic "real-looking" pictures (smooth gradients,
  shapes, mild noise), none square, in the modes RGB, L, RGBA (partial transparency),
  P (palette with a transparent index), CMYK and I;16, saved losslessly (PNG; TIFF for
  CMYK) so every machine decodes the same pixels;
- configs.json: processor configs shaped like the Hub's preprocessor_config.json of
  google/vit-base-patch16-224, facebook/deit-base-distilled-patch16-224,
  openai/clip-vit-base-patch16 and facebook/dinov2-small, scaled down to 26-46 px,
  plus one whose crop overhangs the resized image (zero padding);
- golden.npz: ``pixels/<config>/<image>`` = transformers' ``pixel_values`` (1, 3, h, w)
  float32, and ``rgb/<image>`` = transformers' ``convert_to_rgb`` (H, W, 3) uint8.

The processors are built with ``do_convert_rgb=True`` because ViT/DeiT configs leave
it unset and would otherwise reject non-RGB images; qkweights always converts.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image

HERE = Path(__file__).resolve().parent

OPENAI_MEAN = [0.48145466, 0.4578275, 0.40821073]
OPENAI_STD = [0.26862954, 0.26130258, 0.27577711]
IMAGENET_MEAN = [0.485, 0.456, 0.406]
IMAGENET_STD = [0.229, 0.224, 0.225]

# Shaped like the Hub files (legacy int sizes included), sizes scaled down.
CONFIGS = {
    "vit": {  # google/vit-base-patch16-224: square resize, bilinear, mean/std 0.5
        "do_normalize": True,
        "do_resize": True,
        "feature_extractor_type": "ViTFeatureExtractor",
        "image_mean": [0.5, 0.5, 0.5],
        "image_std": [0.5, 0.5, 0.5],
        "resample": 2,
        "size": 32,
    },
    "deit": {  # facebook/deit-base-distilled-patch16-224: square resize 37 (256/224 * 32), crop 32
        "crop_size": 32,
        "do_center_crop": True,
        "do_normalize": True,
        "do_resize": True,
        "feature_extractor_type": "DeiTFeatureExtractor",
        "image_mean": IMAGENET_MEAN,
        "image_std": IMAGENET_STD,
        "resample": 3,
        "size": 37,
    },
    "clip": {  # openai/clip-vit-base-patch16: int size = shortest edge, bicubic, crop
        "crop_size": 32,
        "do_center_crop": True,
        "do_normalize": True,
        "do_resize": True,
        "feature_extractor_type": "CLIPFeatureExtractor",
        "image_mean": OPENAI_MEAN,
        "image_std": OPENAI_STD,
        "resample": 3,
        "size": 32,
    },
    "dinov2": {  # facebook/dinov2-small: BitImageProcessor, shortest edge 46 (256/224 * 40), crop 40
        "crop_size": {"height": 40, "width": 40},
        "do_center_crop": True,
        "do_convert_rgb": True,
        "do_normalize": True,
        "do_rescale": True,
        "do_resize": True,
        "image_mean": IMAGENET_MEAN,
        "image_std": IMAGENET_STD,
        "image_processor_type": "BitImageProcessor",
        "resample": 3,
        "rescale_factor": 0.00392156862745098,
        "size": {"shortest_edge": 46},
    },
    "pad": {  # crop taller than the resize (odd overhang 5 -> zero padding), narrower in width
        "image_processor_type": "ViTImageProcessor",
        "size": {"height": 29, "width": 30},
        "do_center_crop": True,
        "crop_size": {"height": 34, "width": 26},
        "resample": 3,
    },
}


def _canvas(height: int, width: int, seed: int) -> np.ndarray:
    """(H, W, 3) float64 in [0, 255]: gradients, a disc, a bar, mild noise."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width].astype(np.float64)
    u, v = x / (width - 1), y / (height - 1)
    img = np.stack([200 * u + 30, 180 * v + 40, 120 + 100 * np.sin(3 * u + 2 * v)], axis=-1)
    disc = (x - 0.35 * width) ** 2 + (y - 0.55 * height) ** 2 < (0.22 * min(height, width)) ** 2
    img[disc] = (230, 60, 40)
    bar = (np.abs(x - 0.7 * width) < 0.08 * width) & (y > 0.2 * height)
    img[bar] = (30, 70, 200)
    return np.clip(img + rng.normal(0, 6, img.shape), 0, 255)


def make_images() -> dict[str, Image.Image]:
    """File name -> deterministic PIL image (modes RGB, RGB, L, RGBA, P, CMYK, I;16)."""
    rgb_small = _canvas(47, 61, 0).round().astype(np.uint8)
    rgb_large = _canvas(103, 160, 1).round().astype(np.uint8)
    gray = _canvas(53, 37, 2).mean(axis=-1).round().astype(np.uint8)

    rgba = _canvas(40, 64, 3).round().astype(np.uint8)
    alpha = np.tile(np.linspace(0, 255, 64), (40, 1))
    alpha[:, :8] = 0  # a fully transparent strip
    alpha[:10, -10:] = 255
    rgba = np.dstack([rgba, alpha.round().astype(np.uint8)])

    palette = Image.fromarray(_canvas(70, 45, 4).round().astype(np.uint8)).quantize(colors=12, dither=0)
    palette.info["transparency"] = 3

    cmyk = Image.fromarray(_canvas(33, 50, 5).round().astype(np.uint8)).convert("CMYK")

    ramp = np.tile(np.linspace(0, 420, 40), (30, 1)) + _canvas(30, 40, 6)[..., 0] * 0.2
    gray16 = Image.frombytes("I;16", (40, 30), ramp.round().astype("<u2").tobytes())

    return {
        "rgb_61x47.png": Image.fromarray(rgb_small),
        "rgb_160x103.png": Image.fromarray(rgb_large),
        "gray_37x53.png": Image.fromarray(gray),
        "rgba_64x40.png": Image.fromarray(rgba),
        "palette_45x70.png": palette,
        "cmyk_50x33.tif": cmyk,
        "gray16_40x30.png": gray16,
    }


# Which configs each image goes through (kept small: the folder must stay < 300 KB).
PAIRS = {
    "rgb_61x47.png": tuple(CONFIGS),
    "rgb_160x103.png": tuple(CONFIGS),
    "gray_37x53.png": ("vit", "dinov2", "pad"),
    "rgba_64x40.png": ("vit", "clip"),
    "palette_45x70.png": ("deit",),
    "cmyk_50x33.tif": ("clip",),
    "gray16_40x30.png": ("dinov2",),
}

_PIL_CLASSES = {
    "ViT": "ViTImageProcessorPil",
    "DeiT": "DeiTImageProcessorPil",
    "CLIP": "CLIPImageProcessorPil",
    "Bit": "BitImageProcessorPil",
}


def reference_processor(config: dict):
    """transformers' slow processor for a config, as from_pretrained builds it, converting to RGB."""
    import transformers

    kind = config.get("image_processor_type") or config["feature_extractor_type"]
    prefix = next(p for p in _PIL_CLASSES if kind.startswith(p + "ImageProcessor") or kind.startswith(p + "Feature"))
    cls = getattr(transformers, _PIL_CLASSES[prefix])
    return cls.from_dict({**config, "do_convert_rgb": True})


def reference_pixels(config: dict, image) -> np.ndarray:
    """transformers' pixel_values (B, 3, h, w) float32 for one image (PIL or array)."""
    return np.asarray(reference_processor(config)(images=image, return_tensors="np")["pixel_values"])


def reference_rgb(image) -> np.ndarray:
    """transformers' convert_to_rgb of a PIL image: (H, W, 3) uint8."""
    from transformers.image_transforms import convert_to_rgb

    return convert_to_rgb(image, return_numpy=True)


def read_image(name: str) -> Image.Image:
    """A committed golden input image, decoded."""
    with Image.open(HERE / name) as im:
        im.load()
        return im.copy()


def compute_goldens() -> dict[str, np.ndarray]:
    """All golden arrays, from the committed images in this folder."""
    out = {}
    for name, configs in PAIRS.items():
        image = read_image(name)
        out[f"rgb/{name}"] = reference_rgb(image)
        for config in configs:
            out[f"pixels/{config}/{name}"] = reference_pixels(CONFIGS[config], image)
    return out


def _atomic_write(path: Path, write) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def main() -> None:
    for name, image in make_images().items():
        fmt = "TIFF" if name.endswith(".tif") else "PNG"
        _atomic_write(HERE / name, lambda tmp, im=image, f=fmt: im.save(tmp, format=f))
    _atomic_write(HERE / "configs.json", lambda tmp: Path(tmp).write_text(json.dumps(CONFIGS, indent=1) + "\n"))
    goldens = compute_goldens()

    def write_npz(tmp):
        with open(tmp, "wb") as f:
            np.savez_compressed(f, **goldens)

    _atomic_write(HERE / "golden.npz", write_npz)
    total = sum(p.stat().st_size for p in HERE.iterdir() if p.is_file())
    print(f"wrote {len(goldens)} arrays; folder size {total / 1024:.0f} KB")


if __name__ == "__main__":
    main()
