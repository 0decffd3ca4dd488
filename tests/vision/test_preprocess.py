"""Tests of qkweights.vision.preprocess: image loading and each checkpoint's preprocessing.

References:
- goldens in tests/preprocess_golden/ (golden.npz), computed by make_golden.py with
  transformers 5.24's slow PIL processors (ViT/DeiT/CLIP/BitImageProcessorPil) and its
  ``convert_to_rgb``; re-checked live when transformers is installed;
- hand-computed sizes, offsets and pixel values (arithmetic written out next to each);
- timm / open_clip / torchvision rules read from their sources (timm
  data/transforms_factory.py ``transforms_imagenet_eval``, data/config.py defaults;
  open_clip transform.py ``image_transform``; torchvision transforms/functional.py
  ``center_crop`` and ``to_tensor``), applied by hand with plain PIL calls.
"""

from __future__ import annotations

import importlib.util
import json
import re
from pathlib import Path

import numpy as np
import pytest
from conftest import big_jpeg, peak_bytes_per_pixel
from PIL import Image

from qkweights.errors import InputError, SpecError
from qkweights.vision.preprocess import (
    IMAGENET_DEFAULT_MEAN,
    IMAGENET_DEFAULT_STD,
    OPENAI_CLIP_MEAN,
    OPENAI_CLIP_STD,
    Geometry,
    Preprocess,
    load_image,
)

GOLDEN = Path(__file__).parents[1] / "preprocess_golden"
FIXTURES = Path(__file__).parents[1] / "fixtures" / "models"
CONFIGS = json.loads((GOLDEN / "configs.json").read_text())
with np.load(GOLDEN / "golden.npz") as _npz:
    GOLDENS = {k: _npz[k] for k in _npz.files}
PIXEL_KEYS = sorted(k for k in GOLDENS if k.startswith("pixels/"))
RGB_KEYS = sorted(k for k in GOLDENS if k.startswith("rgb/"))
HF_FIXTURE_CONFIGS = sorted(FIXTURES.glob("*/preprocessor_config.json"))


def _gradient(height: int, width: int) -> np.ndarray:
    """(H, W, 3) uint8 test picture: two ramps and their mix."""
    y, x = np.mgrid[0:height, 0:width]
    return np.stack([x * 255 // max(width - 1, 1), y * 255 // max(height - 1, 1), (x + y) % 256], -1).astype(np.uint8)


# ----------------------------------------------------------------------------- goldens


@pytest.mark.parametrize("key", PIXEL_KEYS)
def test_matches_transformers_golden(key):
    _, config, name = key.split("/")
    got = Preprocess.from_hf(CONFIGS[config])(GOLDEN / name)
    want = GOLDENS[key]  # transformers 5.24 slow processor, make_golden.py
    assert got.dtype == np.float32 and got.shape == want.shape
    # Same PIL resize on the same uint8 pixels and the same float32 arithmetic: in
    # practice bit-identical; 1e-4 leaves room for a BLAS-free rounding difference.
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-4)


@pytest.mark.parametrize("key", RGB_KEYS)
def test_load_image_matches_transformers_convert_to_rgb(key):
    name = key.split("/")[1]
    got = load_image(GOLDEN / name)
    assert got.mode == "RGB"
    np.testing.assert_array_equal(np.asarray(got), GOLDENS[key])  # transformers convert_to_rgb


def test_goldens_cover_what_they_claim():
    """The golden inputs really hold transparency, a palette and >8-bit values, and 'pad' pads."""
    rgba = Image.open(GOLDEN / "rgba_64x40.png")
    assert rgba.mode == "RGBA"
    assert not np.array_equal(GOLDENS["rgb/rgba_64x40.png"], np.asarray(rgba.convert("RGB")))
    assert (GOLDENS["rgb/rgba_64x40.png"][:, :8] == 255).all()  # alpha 0 strip -> white
    palette = Image.open(GOLDEN / "palette_45x70.png")
    assert palette.mode == "P" and palette.info["transparency"] == 3
    assert (GOLDENS["rgb/palette_45x70.png"][np.asarray(palette) == 3] == 255).all()
    gray16 = Image.open(GOLDEN / "gray16_40x30.png")
    assert gray16.mode == "I;16" and np.asarray(gray16).max() > 255
    assert Image.open(GOLDEN / "cmyk_50x33.tif").mode == "CMYK"
    # 'pad': size 29x30, crop 34x26. transformers pads ceil((34-29)/2) = 3 rows on top and
    # 2 below with 0, which normalise to (0 - 0.5) / 0.5 = -1 (ViT defaults).
    padded = GOLDENS["pixels/pad/rgb_61x47.png"][0]
    assert np.all(padded[:, :3] == -1.0) and np.all(padded[:, 32:] == -1.0)
    assert not np.all(padded[:, 3] == -1.0) and not np.all(padded[:, 31] == -1.0)


def _load_make_golden():
    spec = importlib.util.spec_from_file_location("make_golden", GOLDEN / "make_golden.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_golden_inputs_are_reproducible():
    """make_golden.make_images() rebuilds exactly the committed input images (no transformers needed)."""
    make_golden = _load_make_golden()
    for name, image in make_golden.make_images().items():
        committed = make_golden.read_image(name)
        assert committed.mode == image.mode, name
        np.testing.assert_array_equal(np.asarray(committed), np.asarray(image), err_msg=name)
    assert make_golden.CONFIGS == CONFIGS


# ----------------------------------------------------------------------------- live transformers


# Importing transformers (and torch with it) takes 5-15 s: these tests are marked slow.
@pytest.fixture(scope="module")
def make_golden():
    pytest.importorskip("transformers")
    return _load_make_golden()


@pytest.mark.slow
def test_live_goldens_recompute(make_golden):
    recomputed = make_golden.compute_goldens()
    assert sorted(recomputed) == sorted(GOLDENS)
    for key, value in recomputed.items():
        np.testing.assert_allclose(value, GOLDENS[key], rtol=0, atol=1e-6, err_msg=key)


def _live_cases():
    rng = np.random.default_rng(7)
    noisy = np.clip(_gradient(23, 41).astype(int) + rng.integers(-20, 21, (23, 41, 3)), 0, 255).astype(np.uint8)
    rgba = np.dstack([noisy, rng.integers(0, 256, (23, 41), dtype=np.uint8)])
    la = Image.fromarray(np.dstack([noisy[..., 0], noisy[..., 1]]), mode="LA")
    palette = Image.fromarray(noisy).quantize(colors=7)  # P without transparency
    as_int = Image.fromarray(noisy[..., 0].astype(np.int32) * 3 - 100)  # mode I, clipped by PIL
    as_float = Image.fromarray(noisy[..., 1].astype(np.float32) * 1.7)  # mode F
    return {
        "rgb_array": noisy,
        "rgba_array": rgba,  # transformers' numpy compositing path
        "la": la,
        "palette": palette,
        "mode_I": as_int,
        "mode_F": as_float,
        "tall": Image.fromarray(_gradient(77, 19)),
    }


LIVE_CONFIGS = {
    "defaults_deit": {"image_processor_type": "DeiTImageProcessor", "size": 40, "crop_size": 33},
    "defaults_clip": {"image_processor_type": "CLIPImageProcessorFast", "size": 31, "crop_size": 28},
    "no_rescale": {"image_processor_type": "ViTImageProcessor", "do_rescale": False, "size": [20, 27]},
    "no_normalize": {"image_processor_type": "BitImageProcessor", "do_normalize": False, "size": 30},
    "bigger_crop": {
        "image_processor_type": "CLIPImageProcessor",
        "size": {"shortest_edge": 20},
        "crop_size": {"height": 25, "width": 22},
    },
}


@pytest.mark.slow
@pytest.mark.parametrize("config_name", sorted(LIVE_CONFIGS))
def test_live_matches_transformers_on_more_inputs(make_golden, config_name):
    config = LIVE_CONFIGS[config_name]
    pre = Preprocess.from_hf(config)
    for case, image in _live_cases().items():
        want = make_golden.reference_pixels(config, image)
        np.testing.assert_allclose(pre(image), want, rtol=0, atol=1e-4, err_msg=case)


@pytest.mark.slow
@pytest.mark.parametrize("path", HF_FIXTURE_CONFIGS, ids=lambda p: p.parent.name)
def test_live_fixture_configs_match_transformers(make_golden, path):
    config = json.loads(path.read_text())
    image = Image.fromarray(_gradient(45, 70))
    np.testing.assert_allclose(
        Preprocess.from_hf(config)(image), make_golden.reference_pixels(config, image), rtol=0, atol=1e-4
    )


@pytest.mark.slow
def test_live_crop_offsets_match_transformers_center_crop(make_golden):
    from transformers.image_transforms import center_crop

    for height in range(20, 41):
        image = np.arange(height * 3, dtype=np.float32).reshape(1, height, 3) + 1  # (C=1, H, W), no zeros
        cropped = center_crop(image, (30, 3), input_data_format="channels_first")[0, :, 0]
        geo = Preprocess(size=(height, 3), crop=(30, 3)).geometry(3, height)
        rows = np.arange(30) + geo.top
        want = np.where((rows >= 0) & (rows < height), rows * 3 + 1, 0)
        np.testing.assert_array_equal(cropped, want, err_msg=f"height {height}")


# ----------------------------------------------------------------------------- load_image


def test_load_image_modes_hand_computed():
    # L: grey replicated.
    gray = Image.fromarray(np.array([[0, 77, 255]], np.uint8))
    assert np.asarray(load_image(gray)).tolist() == [[[0, 0, 0], [77, 77, 77], [255, 255, 255]]]
    # RGBA on white: c' = c * a/255 + 255 * (1 - a/255); (200,100,50,a=128) -> (227.4,177.2,152.1);
    # PIL's integer compositing may round either way, so +-1.
    rgba = Image.fromarray(np.array([[[200, 100, 50, 128], [10, 20, 30, 0], [10, 20, 30, 255]]], np.uint8))
    got = np.asarray(load_image(rgba)).astype(int)
    assert np.abs(got[0, 0] - [227, 177, 152]).max() <= 1
    assert got[0, 1].tolist() == [255, 255, 255] and got[0, 2].tolist() == [10, 20, 30]
    # The same pixels as an array follow transformers' numpy path: round() of the float formula.
    arr = np.asarray(load_image(np.asarray(rgba)))
    assert arr[0].tolist() == [[227, 177, 152], [255, 255, 255], [10, 20, 30]]
    # LA: grey + alpha, composited like RGBA: 100 * 0.2 + 255 * 0.8 = 224.
    la = Image.fromarray(np.array([[[100, 51]]], np.uint8), mode="LA")
    assert np.abs(np.asarray(load_image(la)).astype(int) - 224).max() <= 1
    # P with a transparent index: that index becomes white, the others their palette colour.
    pal = Image.fromarray(np.array([[0, 1, 2]], np.uint8), mode="P")
    pal.putpalette([255, 0, 0, 0, 255, 0, 0, 0, 255])
    pal.info["transparency"] = 1
    assert np.asarray(load_image(pal)).tolist() == [[[255, 0, 0], [255, 255, 255], [0, 0, 255]]]
    # CMYK: Pillow's cmyk->rgb is round((255 - c)(255 - k) / 255): (10,20,30,40) ->
    # 245*215/255 = 206.6, 235*215/255 = 198.1, 225*215/255 = 189.7.
    cmyk = Image.new("CMYK", (1, 1), (10, 20, 30, 40))
    assert np.asarray(load_image(cmyk)).tolist() == [[[207, 198, 190]]]
    # I;16: PIL (hence transformers) clips to 0-255, it does not rescale 16-bit values.
    raw = np.array([[0, 100, 255, 300, 65535]], "<u2")
    i16 = Image.frombytes("I;16", (5, 1), raw.tobytes())
    assert np.asarray(load_image(i16))[0, :, 0].tolist() == [0, 100, 255, 255, 255]
    # Arrays: (H, W) replicated, (H, W, 3) unchanged.
    img = _gradient(5, 7)
    np.testing.assert_array_equal(np.asarray(load_image(img)), img)
    np.testing.assert_array_equal(np.asarray(load_image(img[..., 0])), np.repeat(img[..., :1], 3, axis=2))


def test_load_image_from_path_applies_exif_orientation(tmp_path):
    image = Image.fromarray(_gradient(10, 30))
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: rotate 90 degrees clockwise to display
    image.save(tmp_path / "rotated.png", exif=exif)
    loaded = load_image(str(tmp_path / "rotated.png"))
    assert loaded.size == (10, 30)  # (W, H): 30 wide x 10 high on disk, upright 10 wide x 30 high
    np.testing.assert_array_equal(np.asarray(loaded), np.asarray(image.transpose(Image.Transpose.ROTATE_270)))


def test_truncated_jpeg_raises_input_error_naming_the_file(tmp_path):
    path = tmp_path / "cut.jpg"
    Image.fromarray(_gradient(64, 64)).save(path, quality=90)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(InputError, match="(?i)cut.jpg.*truncated"):
        load_image(path)
    with pytest.raises(InputError, match="cut.jpg"):
        Preprocess(size=(8, 8))([path])


def test_unreadable_inputs_raise_input_error(tmp_path):
    (tmp_path / "notes.txt").write_text("not an image")
    with pytest.raises(InputError, match="notes.txt: cannot decode"):
        load_image(tmp_path / "notes.txt")
    with pytest.raises(InputError, match=r"missing.png: no such image file; check"):
        load_image(tmp_path / "missing.png")
    (tmp_path / "loop.png").symlink_to(tmp_path / "loop.png")  # a link to itself: a loop
    with pytest.raises(InputError, match=r"loop.png: no such image file \(a symbolic link that leads nowhere"):
        load_image(tmp_path / "loop.png")
    with pytest.raises(InputError, match="dtype float64"):
        load_image(np.zeros((4, 4, 3)))
    with pytest.raises(InputError, match=r"shape \(4, 4, 2\)"):
        load_image(np.zeros((4, 4, 2), np.uint8))
    with pytest.raises(InputError, match="from a list"):
        load_image([1, 2])


# ----------------------------------------------------------------------------- constructors


def test_from_hf_legacy_int_sizes_and_class_defaults():
    # ViT: int size is a square (default_to_square True), no crop.
    vit = Preprocess.from_hf({"feature_extractor_type": "ViTFeatureExtractor", "size": 224, "resample": 2})
    assert (vit.size, vit.shortest_edge, vit.crop, vit.resample) == ((224, 224), None, None, 2)
    assert vit.mean == (0.5, 0.5, 0.5) and vit.std == (0.5, 0.5, 0.5)  # IMAGENET_STANDARD defaults
    # CLIP: int size is the shortest edge, int crop a square.
    clip = Preprocess.from_hf({"feature_extractor_type": "CLIPFeatureExtractor", "size": 224, "crop_size": 224})
    assert (clip.size, clip.shortest_edge, clip.crop, clip.resample) == (None, 224, (224, 224), 3)
    assert clip.mean == OPENAI_CLIP_MEAN and clip.std == OPENAI_CLIP_STD
    # DeiT defaults (image_processing_pil_deit.py): 256x256, crop 224, bicubic, mean/std 0.5.
    deit = Preprocess.from_hf({"image_processor_type": "DeiTImageProcessorFast"})
    assert (deit.size, deit.crop, deit.resample, deit.mean) == ((256, 256), (224, 224), 3, (0.5, 0.5, 0.5))
    # BiT (DINOv2) defaults: shortest edge 224, crop 224; null values take defaults too.
    bit = Preprocess.from_hf({"image_processor_type": "BitImageProcessor", "size": None})
    assert (bit.shortest_edge, bit.crop) == (224, (224, 224))
    off = Preprocess.from_hf(
        {"image_processor_type": "ViTImageProcessor", "do_resize": False, "do_rescale": False, "do_normalize": False}
    )
    assert (off.size, off.shortest_edge, off.rescale, off.mean, off.std) == (None, None, 1.0, (0, 0, 0), (1, 1, 1))


def test_from_hf_rejects_what_it_cannot_reproduce():
    with pytest.raises(SpecError, match="'ConvNextImageProcessor' is not supported"):
        Preprocess.from_hf({"image_processor_type": "ConvNextImageProcessor"})
    with pytest.raises(SpecError, match="not supported"):
        Preprocess.from_hf(
            {"image_processor_type": "CLIPImageProcessor", "size": {"shortest_edge": 9, "longest_edge": 20}}
        )
    with pytest.raises(SpecError, match="crop_size"):
        Preprocess.from_hf({"image_processor_type": "ViTImageProcessor", "do_center_crop": True})


@pytest.mark.parametrize("path", HF_FIXTURE_CONFIGS, ids=lambda p: p.parent.name)
def test_from_hf_reads_fixture_configs(path):
    config = json.loads(path.read_text())
    pre = Preprocess.from_hf(config)
    out = pre([_gradient(45, 70), _gradient(45, 70)])
    crop = config.get("crop_size") if config.get("do_center_crop") else config["size"]
    assert out.shape == (2, 3, crop["height"], crop["width"])


def test_from_timm_hand_computed():
    # crop_pct 0.9: floor(224 / 0.9) = floor(248.9) = 248 shortest edge, then crop 224.
    pre = Preprocess.from_timm(
        {"input_size": [3, 224, 224], "interpolation": "bilinear", "crop_pct": 0.9, "mean": [0.5] * 3, "std": [0.5] * 3}
    )
    assert (pre.shortest_edge, pre.crop, pre.resample, pre.mean, pre.convention) == (
        248,
        (224, 224),
        2,
        (0.5, 0.5, 0.5),
        "timm",
    )
    # Defaults (timm resolve_data_config): 224, bicubic, crop_pct 0.875 -> 256, ImageNet mean/std.
    default = Preprocess.from_timm({})
    assert (default.shortest_edge, default.crop, default.resample) == (256, (224, 224), 3)
    assert default.mean == IMAGENET_DEFAULT_MEAN and default.std == IMAGENET_DEFAULT_STD
    squash = Preprocess.from_timm({"input_size": [3, 224, 224], "crop_pct": 0.9, "crop_mode": "squash"})
    assert (squash.size, squash.shortest_edge, squash.crop) == ((248, 248), None, (224, 224))
    assert Preprocess.from_timm({"input_size": [3, 32, 32], "crop_pct": 1.0}).shortest_edge == 32
    with pytest.raises(SpecError, match="'border'"):
        Preprocess.from_timm({"crop_mode": "border"})
    with pytest.raises(SpecError, match="interpolation 'random'"):
        Preprocess.from_timm({"interpolation": "random"})


def test_timm_pipeline_hand_computed():
    """timm eval on a 302 x 225 image, shortest edge 256, crop 224, done by hand with PIL.

    Resize: 256 * 302 / 225 = 343.6 -> 256 x 343 (h x w). torchvision CenterCrop:
    left = int(round((343 - 224) / 2)) = round(59.5) = 60 (half to even), top = round(16) = 16.
    transformers would take left = 119 // 2 = 59.
    """
    image = Image.fromarray(_gradient(225, 302))
    pre = Preprocess.from_timm({"input_size": [3, 224, 224], "crop_pct": 0.875, "interpolation": "bicubic"})
    assert pre.geometry(302, 225) == Geometry((225, 302), (256, 343), 16, 60, (224, 224))
    assert Preprocess.from_hf({"image_processor_type": "CLIPImageProcessor", "size": 256}).geometry(302, 225).left == 59
    resized = image.resize((343, 256), Image.Resampling.BICUBIC)
    crop = np.asarray(resized.crop((60, 16, 284, 240))).astype(np.float32) / np.float32(255)  # ToTensor
    want = (crop - np.float32(IMAGENET_DEFAULT_MEAN)) / np.float32(IMAGENET_DEFAULT_STD)  # Normalize
    np.testing.assert_array_equal(pre(image)[0], want.transpose(2, 0, 1))


def test_from_open_clip_and_its_rgb_order():
    pre = Preprocess.from_open_clip({}, 224)
    assert (pre.shortest_edge, pre.crop, pre.resample, pre.mean, pre.std, pre.convention) == (
        224,
        (224, 224),
        3,
        OPENAI_CLIP_MEAN,
        OPENAI_CLIP_STD,
        "open_clip",
    )
    squash = Preprocess.from_open_clip({"resize_mode": "squash", "interpolation": "bilinear"}, 32)
    assert (squash.size, squash.crop, squash.resample) == ((32, 32), None, 2)
    with pytest.raises(SpecError, match="'longest'"):
        Preprocess.from_open_clip({"resize_mode": "longest"}, 224)
    fixture = FIXTURES / "open-clip" / "open_clip_config.json"
    if fixture.exists():
        cfg = json.loads(fixture.read_text())
        assert Preprocess.from_open_clip(cfg["preprocess_cfg"], cfg["model_cfg"]["vision_cfg"]["image_size"]).crop == (
            32,
            32,
        )
    # open_clip converts to RGB after Resize + CenterCrop (PIL resizes RGBA premultiplied,
    # then convert("RGB") drops alpha); transformers composites on white first.
    rgba = np.dstack([_gradient(30, 50), np.full((30, 50), 90, np.uint8)])
    small = Preprocess.from_open_clip({}, 16)
    # resize: 16 x int(16 * 50 / 30) = 16 x 26; crop left = round(10 / 2) = 5.
    by_hand = Image.fromarray(rgba).resize((26, 16), Image.Resampling.BICUBIC).crop((5, 0, 21, 16)).convert("RGB")
    want = (np.asarray(by_hand).astype(np.float32) / 255 - np.float32(OPENAI_CLIP_MEAN)) / np.float32(OPENAI_CLIP_STD)
    np.testing.assert_array_equal(small(rgba)[0], want.transpose(2, 0, 1))
    hf_order = Preprocess(shortest_edge=16, crop=(16, 16), mean=OPENAI_CLIP_MEAN, std=OPENAI_CLIP_STD)
    assert np.abs(hf_order(rgba) - small(rgba)).max() > 0.5


def test_timm_converts_before_resizing_without_compositing():
    rgba = np.dstack([_gradient(20, 20), np.zeros((20, 20), np.uint8)])  # fully transparent
    timm = Preprocess(size=(10, 10), convention="timm")
    hf = Preprocess(size=(10, 10))
    by_hand = np.asarray(Image.fromarray(rgba).convert("RGB").resize((10, 10), Image.Resampling.BICUBIC))
    np.testing.assert_array_equal(timm(rgba)[0], (by_hand / np.float32(255)).astype(np.float32).transpose(2, 0, 1))
    np.testing.assert_array_equal(hf(rgba), np.ones((1, 3, 10, 10), np.float32))  # white


def test_rescale_equals_torchvision_to_tensor():
    """float32(float64(k) * (1/255)) == float32(k) / 255 for every uint8 k (ToTensor divides in float32)."""
    k = np.arange(256, dtype=np.uint8)
    np.testing.assert_array_equal((k.astype(np.float64) * (1 / 255)).astype(np.float32), k.astype(np.float32) / 255)


# ----------------------------------------------------------------------------- sizes and geometry


def test_with_size_resizes_straight_without_crop():
    pre = Preprocess.from_hf({"image_processor_type": "CLIPImageProcessor", "size": 32, "crop_size": 32})
    small = pre.with_size(24, 40)
    assert (small.size, small.shortest_edge, small.crop, small.resample, small.mean) == (
        (24, 40),
        None,
        None,
        3,
        OPENAI_CLIP_MEAN,
    )
    image = _gradient(50, 61)
    by_hand = np.asarray(Image.fromarray(image).resize((40, 24), Image.Resampling.BICUBIC)).astype(np.float32) / 255
    want = ((by_hand - np.float32(OPENAI_CLIP_MEAN)) / np.float32(OPENAI_CLIP_STD)).transpose(2, 0, 1)
    np.testing.assert_allclose(small(image)[0], want, rtol=0, atol=1e-6)
    assert small.geometry(61, 50) == Geometry((50, 61), (24, 40), 0, 0, (24, 40))
    with pytest.raises(InputError, match="0x40"):
        pre.with_size(0, 40)


def test_geometry_hand_computed():
    clip = Preprocess(shortest_edge=224, crop=(224, 224))
    # 640 x 480 landscape: h = 224, w = int(224 * 640 / 480) = int(298.67) = 298; left = 74 // 2 = 37.
    assert clip.geometry(640, 480) == Geometry((480, 640), (224, 298), 0, 37, (224, 224))
    # portrait 480 x 640: the width is the short side.
    assert clip.geometry(480, 640) == Geometry((640, 480), (298, 224), 37, 0, (224, 224))
    # Offsets: margin 3 -> transformers 1, torchvision round(1.5) = 2; margin 5 -> 2 and round(2.5) = 2;
    # overhang 5 (crop 34 over 29) -> transformers pads 3 above (top -3), torchvision 5 // 2 = 2 (top -2).
    for convention, tops in (("transformers", (1, 2, -3)), ("timm", (2, 2, -2)), ("open_clip", (2, 2, -2))):
        for resized, top in zip((37, 39, 29), tops):
            pre = Preprocess(size=(resized, 40), crop=(34, 40), convention=convention)
            assert pre.geometry(40, resized).top == top, (convention, resized)
    assert Preprocess().geometry(13, 7) == Geometry((7, 13), (7, 13), 0, 0, (7, 13))
    assert Geometry((7, 13), (10, 20), -2, 3, (14, 8)).box == (3, -2, 11, 12)


def test_padding_crop_fills_zero_before_normalisation():
    pre = Preprocess(size=(29, 30), crop=(34, 26), mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))
    out = pre(np.full((10, 10, 3), 255, np.uint8))[0]
    assert np.all(out[:, :3] == -1) and np.all(out[:, 32:] == -1) and np.all(out[:, 3:32] == 1)


def test_batches_and_mismatched_sizes():
    pre = Preprocess(shortest_edge=16, crop=(16, 16), mean=(0.4, 0.5, 0.6), std=(0.2, 0.3, 0.4))
    a, b = _gradient(30, 20), _gradient(17, 40)
    batch = pre([a, Image.fromarray(b)])
    assert batch.shape == (2, 3, 16, 16) and batch.dtype == np.float32
    np.testing.assert_array_equal(batch[0], pre(a)[0])
    np.testing.assert_array_equal(batch[1], pre(b)[0])
    with pytest.raises(InputError, match="different sizes"):
        Preprocess(shortest_edge=16)([a, b])
    with pytest.raises(InputError, match="no images"):
        pre([])


def test_preprocess_validates_its_fields():
    with pytest.raises(SpecError, match="both size and shortest_edge"):
        Preprocess(size=(4, 4), shortest_edge=4)
    with pytest.raises(SpecError, match="resample"):
        Preprocess(resample=7)
    with pytest.raises(SpecError, match="std"):
        Preprocess(std=(1, 0, 1))
    with pytest.raises(SpecError, match="convention"):
        Preprocess(convention="keras")
    assert Preprocess(mean=[0.1, 0.2, 0.3]) == Preprocess(mean=(0.1, 0.2, 0.3))  # lists become tuples


# ----------------------------------------------------------------------------- masks


def test_transform_mask_box_lands_where_expected():
    """A 200 x 100 (W x H) image, shortest edge 50, crop 50.

    Resize x0.5 to 50 x 100 (h x w); crop left = (100 - 50) // 2 = 25. The box rows
    20-60, columns 100-140 becomes rows 10-30, columns 50-70 resized, columns 25-45 out.
    """
    mask = np.zeros((100, 200), bool)
    mask[20:60, 100:140] = True
    pre = Preprocess(shortest_edge=50, crop=(50, 50), resample=3)
    assert pre.geometry(200, 100) == Geometry((100, 200), (50, 100), 0, 25, (50, 50))
    out = pre.transform_mask(mask)
    assert out.shape == (50, 50) and out.dtype == np.float32
    # PIL's antialiased bilinear at x0.5 is a triangle of radius 2 input pixels around each
    # output centre (input 2j + 1): output rows 11-28 see only the box, rows 10 and 29 see
    # 1 outside pixel of weight 1/8 (0.875), rows 9 and 30 one inside pixel (0.125).
    assert np.all(out[11:29, 26:44] == 1)
    assert np.all(out[10, 26:44] == 0.875) and np.all(out[9, 26:44] == 0.125)
    assert np.all(out[11:29, 24] == 0.125) and np.all(out[11:29, 45] == 0.125)
    outside = np.ones((50, 50), bool)
    outside[9:31, 24:46] = False
    assert np.all(out[outside] == 0)
    assert abs(out.sum() - 400) < 1e-3  # area 40 x 40 / 4, conserved by the normalised filter
    np.testing.assert_array_equal(pre.transform_mask(mask.astype(np.uint8) * 255), out)
    np.testing.assert_array_equal(pre.transform_mask(mask.astype(np.uint8)), out)


def test_transform_mask_aligns_with_the_image():
    """A white box on black through the image path (bilinear, no normalisation) equals the mask path to 1/255."""
    mask = np.zeros((37, 53), np.float32)
    mask[5:20, 11:40] = 1.0
    image = (mask * 255).astype(np.uint8)
    for convention in ("transformers", "timm"):
        pre = Preprocess(shortest_edge=20, crop=(18, 18), resample=2, convention=convention)
        np.testing.assert_allclose(pre.transform_mask(mask), pre(image)[0, 1], rtol=0, atol=0.5 / 255 + 1e-6)


def test_transform_mask_padding_and_errors():
    pre = Preprocess(size=(29, 30), crop=(34, 26))
    out = pre.transform_mask(np.ones((10, 10), np.float32))
    assert out.shape == (34, 26) and np.all(out[:3] == 0) and np.all(out[32:] == 0) and np.all(out[3:32] == 1)
    with pytest.raises(InputError, match="shape"):
        pre.transform_mask(np.ones((4, 4, 3), np.float32))
    with pytest.raises(InputError, match=r"\[0, 1\]"):
        pre.transform_mask(np.full((4, 4), 1.5))
    with pytest.raises(InputError, match="dtype int64"):
        pre.transform_mask(np.ones((4, 4), np.int64))


@pytest.mark.parametrize(
    "key, value, message",
    [
        ("rescale_factor", "x", "preprocessor_config.json: rescale_factor is 'x'; it must be a number"),
        ("resample", "x", "preprocessor_config.json: resample is 'x'; it must be a PIL filter code 0-5; fix the file"),
        ("do_resize", "yes", "preprocessor_config.json: do_resize is 'yes'; it must be true or false; fix the file"),
        ("image_mean", ["a", 1, 2], "preprocess mean is ['a', 1, 2]; give three finite numbers (R, G, B)"),
    ],
)
def test_preprocessor_config_values_of_the_wrong_type_name_the_key(key, value, message):
    with pytest.raises(SpecError, match="^" + re.escape(message)):
        Preprocess.from_hf({"image_processor_type": "ViTImageProcessor", key: value})


# ----------------------------------------------------------------------------- memory of a large image


# The peak RSS of this process's memory (VmHWM, KiB): getrusage's ru_maxrss would do, but Linux carries it over
# fork and exec, so a child of a large pytest process would start at its parent's peak.
@pytest.mark.slow
@pytest.mark.parametrize("model", ["vit", "timm-vit", "open-clip"])  # the transformers, timm and open_clip paths
def test_a_large_image_is_decoded_once(tmp_path, model):
    # Pillow holds an RGB image at 4 bytes a pixel (RGBX). Decoding it is the least a full-resolution resize needs;
    # a second full-size copy (an RGB → RGB convert, an EXIF transpose of an upright image) would make 8. The
    # model-size resize adds (input height × output width) × 4 bytes, 0.3 % of it here.
    path = big_jpeg(tmp_path / "big.jpg")
    per_pixel = peak_bytes_per_pixel(f"model.preprocessing({str(path)!r})", 4000 * 3000, model=model)
    assert 3.5 < per_pixel < 5.0
