"""The synthetic O3 generator (qkweights.datasets.synthetic_o3) and the O3 folder reader (qkweights.datasets.o3).

References are measured from the pixels independently of the generator's
bookkeeping: objects are connected components of the masks (scipy.ndimage),
colours are pixel medians, shapes are told apart by two rotation- and
scale-invariant numbers computed here (see ``_shape_signature``).
"""

import csv
import shutil

import numpy as np
import pytest
from PIL import Image
from scipy import ndimage

from qkweights.datasets.o3 import (
    FEATURE_FLAGS,
    PROPERTY_COLUMNS,
    O3Item,
    check_sizes,
    load_mask,
    load_masks,
    open_o3,
    read_properties,
)
from qkweights.datasets.synthetic_o3 import FEATURES, PALETTE, draw_scene, make_o3
from qkweights.errors import InputError, SourceError

N = 40


@pytest.fixture(scope="module")
def o3(tmp_path_factory):
    return make_o3(tmp_path_factory.mktemp("o3") / "o3", n=N, seed=0)


@pytest.fixture(scope="module")
def drawn():
    """The scenes of the o3 fixture, drawn again in memory."""
    return [_scene(0, i) for i in range(N)]


def _copy(o3, tmp_path):
    return shutil.copytree(o3, tmp_path / "copy")


def _scene(seed, i, size=(224, 224)):
    """The scene make_o3(seed=seed) writes as image i (make_o3 documents this rng)."""
    return draw_scene(np.random.default_rng([seed, i]), size)


def _objects(mask):
    """Connected components (8-neighbour) of a bool (H, W) mask, as bool masks."""
    lab, k = ndimage.label(mask, structure=np.ones((3, 3)))
    return [lab == j for j in range(1, k + 1)]


def _coords(obj, dy=0, dx=0):
    """Pixels of an object as sorted int64 codes y * 2**20 + x, shifted by (dy, dx)."""
    ys, xs = np.nonzero(obj)
    return np.unique((ys + dy).astype(np.int64) * 2**20 + (xs + dx))


def _iou_codes(a, b):
    return len(np.intersect1d(a, b)) / len(np.union1d(a, b))


def _shape_signature(obj):
    """(rho, sym): two rotation- and scale-invariant numbers of an object's shape.

    rho = farthest pixel from the centroid / radius of the disc of equal area
    (continuous shapes of the generator: circle 1.00, square 1.25, triangle
    1.56, diamond 1.62, bar 1.83); sym = IoU of the object with its point
    reflection through the centroid (1 for centrally symmetric shapes, 0.5 for
    a triangle: it and its reflection meet in a hexagon of 2/3 its area).
    """
    ys, xs = np.nonzero(obj)
    cy, cx = ys.mean(), xs.mean()
    rho = np.hypot(ys - cy, xs - cx).max() / np.sqrt(len(ys) / np.pi)
    iy, ix = int(round(2 * cy)), int(round(2 * cx))
    reflected = np.unique((iy - ys).astype(np.int64) * 2**20 + (ix - xs))
    return rho, _iou_codes(_coords(obj), reflected)


def _aligned_iou(a, b):
    """IoU of two objects after moving a's centroid onto b's (no rotation, no scaling)."""
    (ay, ax), (by, bx) = ndimage.center_of_mass(a), ndimage.center_of_mass(b)
    return _iou_codes(_coords(a, int(round(by - ay)), int(round(bx - ax))), _coords(b))


def _colour(pixels, obj):
    """Median RGB of an object's pixels away from its edge (JPEG bleeds 1–2 px)."""
    core = ndimage.binary_erosion(obj, iterations=2)
    return np.median(pixels[core if core.sum() >= 5 else obj].astype(float), axis=0)


# --- the generated folder ---------------------------------------------------


def test_layout_matches_the_real_o3(o3):
    names = [f"synth_{i:04d}.jpg" for i in range(N)]
    for sub in ("images", "targ_images", "dist_images"):
        assert sorted(p.name for p in (o3 / sub).iterdir()) == names
    with Image.open(o3 / "images" / names[0]) as im:
        assert (im.format, im.mode, im.size) == ("JPEG", "RGB", (224, 224))
    with Image.open(o3 / "targ_images" / names[0]) as im:
        assert (im.format, im.mode, im.size) == ("JPEG", "L", (224, 224))
    with open(o3 / "image_properties.txt", newline="") as f:
        rows = list(csv.reader(f))
    # header spelled as in the reference notes (method §6, "O3 on disk")
    assert (
        rows[0]
        == (
            "image_name num_distractors target_type target_subtype target_size target_x target_y "
            "orientation color focus shape size location pattern"
        ).split()
    )
    assert [r[0] for r in rows[1:]] == names
    assert not [p for p in o3.parent.iterdir() if p.name.startswith(".")]  # no temporary folder left


def test_masks_read_back_equal_the_drawn_masks(o3, drawn):
    ds = open_o3(o3)
    assert len(ds.items) == N and ds.missing == []
    noisy = 0
    for i, item in enumerate(ds.items):
        _, target, distractors, _ = drawn[i]
        for path, mask in ((item.target_mask, target), (item.distractor_mask, distractors)):
            raw = np.asarray(Image.open(path))
            noisy += np.count_nonzero((raw != 0) & (raw != 255))
            read = load_mask(path)
            assert read.shape == mask.shape
            # JPEG may flip a thin border only; the masks hold 100–3000 pixels per object
            assert (read & mask).sum() / (read | mask).sum() > 0.97
    assert noisy > 0  # JPEG noise is really present, as in the real masks


def test_threshold_keeps_jpeg_noisy_values_exactly(tmp_path):
    rng = np.random.default_rng(1)
    truth = rng.random((30, 50)) < 0.4
    # the range JPEG noise keeps real O3 masks in (method §6): 0–7 and 248–255
    noisy = np.where(truth, rng.integers(248, 256, truth.shape), rng.integers(0, 8, truth.shape)).astype(np.uint8)
    Image.fromarray(noisy, "L").save(tmp_path / "grey.png")
    Image.fromarray(np.repeat(noisy[:, :, None], 3, axis=2), "RGB").save(tmp_path / "rgb.png")
    Image.fromarray(np.stack([noisy, np.full_like(noisy, 7)], axis=2), "LA").save(tmp_path / "la.png")
    for name in ("grey.png", "rgb.png", "la.png"):
        mask = load_mask(tmp_path / name)
        assert mask.dtype == bool and mask.shape == (30, 50)
        np.testing.assert_array_equal(mask, truth)
    Image.fromarray(np.array([[127, 128]], np.uint8), "L").save(tmp_path / "edge.png")
    np.testing.assert_array_equal(load_mask(tmp_path / "edge.png"), [[False, True]])


def test_both_mask_folder_spellings(o3, tmp_path):
    other = make_o3(tmp_path / "labels", n=3, seed=0, mask_dirs=("targ_labels", "dist_labels"))
    assert sorted(p.name for p in other.iterdir()) == ["dist_labels", "image_properties.txt", "images", "targ_labels"]
    a, b = open_o3(o3).items[:3], open_o3(other).items
    assert [i.target_mask.parent.name for i in b] == ["targ_labels"] * 3
    for x, y in zip(a, b):
        assert x.name == y.name and x.properties == y.properties
        assert x.target_mask.read_bytes() == y.target_mask.read_bytes()
        assert x.distractor_mask.read_bytes() == y.distractor_mask.read_bytes()
    with pytest.raises(InputError, match="mask_dirs"):
        make_o3(tmp_path / "bad", n=1, mask_dirs=("targets", "dist_images"))


def test_properties_match_the_pixels(o3, drawn):
    """Each row has one flag set, and colour, size, count and position agree with the files."""
    for i, item in enumerate(open_o3(o3).items):
        p = item.properties
        flags = [f for f in FEATURE_FLAGS if p[f] == 1]
        assert len(flags) == 1 and flags[0] in FEATURES and sum(p[f] for f in FEATURE_FLAGS) == 1
        assert p == {c: drawn[i][3][c] for c in PROPERTY_COLUMNS[1:]}
        target, distractors = load_masks(item)
        pixels = np.asarray(Image.open(item.image))
        objects = _objects(distractors)
        assert len(objects) == p["num_distractors"]
        assert abs(target.sum() - p["target_size"]) <= 0.02 * p["target_size"]
        cy, cx = ndimage.center_of_mass(target)
        assert abs(cx - p["target_x"]) < 1.5 and abs(cy - p["target_y"]) < 1.5
        # colours of the palette are >= 85 apart (orange-yellow); jittered distractors stay within ±10% area
        colour_gap = np.linalg.norm(_colour(pixels, target) - np.median([_colour(pixels, o) for o in objects], axis=0))
        assert (colour_gap > 50) == (flags == ["color"]), (item.name, colour_gap)
        area_ratio = target.sum() / np.median([o.sum() for o in objects])
        assert (not 0.6 < area_ratio < 1.6) == (flags == ["size"]), (item.name, area_ratio)


@pytest.mark.parametrize("seed", range(20))
def test_drawn_difference_matches_the_flag(seed):
    """Shape and orientation singletons, measured at 448 px (rasterisation noise of rho/sym <= 0.07 there)."""
    image, target, distractors, p = draw_scene(np.random.default_rng(seed), (448, 448))
    objects = _objects(distractors)
    assert 3 <= len(objects) == p["num_distractors"] <= 8
    assert (np.asarray(image)[target] == PALETTE[p["target_subtype"]]).all()
    assert not (target & distractors).any()
    assert not (ndimage.binary_dilation(target, iterations=3) & distractors).any()  # objects keep apart
    rho, sym = _shape_signature(target)
    sigs = np.array([_shape_signature(o) for o in objects])
    assert np.ptp(sigs[:, 0]) < 0.15 and np.ptp(sigs[:, 1]) < 0.2  # the distractors share one shape
    other_shape = abs(rho - np.median(sigs[:, 0])) > 0.15 or abs(sym - np.median(sigs[:, 1])) > 0.2
    assert other_shape == (p["feature"] == "shape")
    if p["feature"] in ("orientation", "color"):
        # same shape and size: overlap with the best-aligned distractor says whether it is turned
        best = max(_aligned_iou(target, o) for o in objects)
        assert (best < 0.6) == (p["feature"] == "orientation"), best
    x0, y0, x1, y1 = p["target_bbox"]
    rows, cols = np.nonzero(target)
    assert (x0, y0, x1, y1) == (cols.min(), rows.min(), cols.max() + 1, rows.max() + 1)
    assert x0 < p["target_centre"][0] < x1 and y0 < p["target_centre"][1] < y1


def test_same_seed_same_bytes(o3, tmp_path):
    again = make_o3(tmp_path / "again", n=5, seed=0)
    files = sorted(p.relative_to(again) for p in again.rglob("*.jpg"))
    assert len(files) == 15
    for rel in files:  # image i depends on (seed, i) only: a short folder is a prefix of a long one
        assert (again / rel).read_bytes() == (o3 / rel).read_bytes()
    lines = (o3 / "image_properties.txt").read_text().splitlines()
    assert (again / "image_properties.txt").read_text().splitlines() == lines[:6]
    other = make_o3(tmp_path / "other", n=1, seed=1)
    assert (other / "images/synth_0000.jpg").read_bytes() != (o3 / "images/synth_0000.jpg").read_bytes()


def test_non_square(tmp_path):
    root = make_o3(tmp_path / "wide", n=3, seed=2, size=(160, 288))
    for item in open_o3(root).items:
        assert check_sizes(item) == (160, 288)
        with Image.open(item.image) as im:
            assert im.size == (288, 160)  # PIL reports (width, height)
        target, distractors = load_masks(item)
        assert target.shape == distractors.shape == (160, 288) and target.any() and distractors.any()
    image, target, _, _ = draw_scene(np.random.default_rng(0), (300, 100))
    assert image.size == (100, 300) and target.shape == (300, 100)


def test_output_folder_rules(tmp_path):
    (tmp_path / "empty").mkdir()
    assert make_o3(tmp_path / "empty", n=1).joinpath("images/synth_0000.jpg").is_file()
    with pytest.raises(InputError, match="already exists and is not an empty folder"):
        make_o3(tmp_path / "empty", n=1)
    with pytest.raises(InputError, match="too small"):
        make_o3(tmp_path / "tiny", n=1, size=(20, 224))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty"]  # nothing half-written left


# --- reading folders as found in the wild -------------------------------------


def test_missing_mask_is_reported(o3, tmp_path):
    root = _copy(o3, tmp_path)
    (root / "dist_images/synth_0003.jpg").unlink()
    (root / "targ_images/synth_0005.jpg").unlink()
    (root / "dist_images/synth_0005.jpg").unlink()
    ds = open_o3(root)
    assert len(ds.items) == N - 2
    assert ds.missing == [
        ("synth_0003", "no mask in dist_images/"),
        ("synth_0005", "no mask in targ_images/ or dist_images/"),
    ]


def test_missing_mask_folder_error(o3, tmp_path):
    root = _copy(o3, tmp_path)
    shutil.rmtree(root / "dist_images")
    (tmp_path / "afile").write_text("not a folder")
    with pytest.raises(SourceError) as err:
        open_o3(root)
    assert str(err.value) == (
        f"{root} has no distractor mask folder (looked for dist_images/ and dist_labels/); "
        "pass the O3 folder that holds images/ and the mask folders"
    )
    (root / "dist_labels").mkdir()
    (root / "targ_labels").mkdir()
    with pytest.raises(InputError, match="has both targ_images and targ_labels; keep only one target mask folder"):
        open_o3(root)
    for name, why in [("nowhere", "no such folder"), ("afile", "is a file, not a folder")]:
        with pytest.raises(SourceError) as err:
            open_o3(tmp_path / name)
        assert str(err.value) == f"{tmp_path / name}: {why}; pass the O3 folder that holds images/"


def test_extensions_any_case_and_masks_matched_by_stem(o3, tmp_path):
    root = _copy(o3, tmp_path)
    (root / "images/synth_0001.jpg").rename(root / "images/synth_0001.JPG")
    (root / "images/synth_0002.jpg").rename(root / "images/synth_0002.Jpeg")
    mask = root / "targ_images/synth_0001.jpg"
    Image.open(mask).save(root / "targ_images/synth_0001.png")
    mask.unlink()
    image = root / "images/synth_0003.jpg"  # any format Pillow reads: a GIF image with a TIFF mask
    Image.open(image).convert("P").save(root / "images/synth_0003.GIF")
    image.unlink()
    mask = root / "dist_images/synth_0003.jpg"
    Image.open(mask).save(root / "dist_images/synth_0003.tif")
    mask.unlink()
    (root / "images/._synth_0001.jpg").write_bytes(b"\0\5\26\7 AppleDouble")  # macOS companion file
    (root / "images/notes.txt").write_text("not an image")
    ds = open_o3(root)
    assert [i.name for i in ds.items] == [f"synth_{i:04d}" for i in range(N)] and ds.missing == []
    item = ds.items[1]
    assert (item.image.name, item.target_mask.name) == ("synth_0001.JPG", "synth_0001.png")
    assert ds.items[2].image.name == "synth_0002.Jpeg"
    assert (ds.items[3].image.name, ds.items[3].distractor_mask.name) == ("synth_0003.GIF", "synth_0003.tif")
    np.testing.assert_array_equal(load_masks(item)[0], load_mask(o3 / "targ_images/synth_0001.jpg"))
    (root / "images/synth_0001.png").write_bytes(b"")
    with pytest.raises(InputError, match="same name 'synth_0001'"):
        open_o3(root)


def test_size_mismatch_names_both_sizes(o3, tmp_path):
    root = _copy(o3, tmp_path)
    mask = root / "dist_images/synth_0000.jpg"
    Image.open(mask).resize((112, 100)).save(mask)
    item = open_o3(root).items[0]
    with pytest.raises(InputError) as err:
        load_masks(item)
    assert str(err.value) == (
        f"{mask}: mask is 112x100 but image synth_0000.jpg is 224x224 (width x height); "
        "the mask must match its image pixel for pixel"
    )


def test_properties_file_variants(o3, tmp_path):
    root = _copy(o3, tmp_path)
    (root / "image_properties.txt").unlink()
    assert all(i.properties == {} for i in open_o3(root).items)  # optional
    (root / "image_properties.csv").write_text(
        "image_name , num_distractors, target_type, target_x\n"
        " synth_0000 , 4 , triangle , 12.5\n"
        "synth_0001.JPG,7,bar,3\n"
    )
    items = open_o3(root).items
    assert items[0].properties == {"num_distractors": 4, "target_type": "triangle", "target_x": 12.5}
    assert items[1].properties == {"num_distractors": 7, "target_type": "bar", "target_x": 3}
    assert items[2].properties == {}
    (root / "bad.csv").write_text("name,size\na,1\n")
    with pytest.raises(InputError, match="has no image_name column"):
        read_properties(root / "bad.csv")
    (root / "bad.csv").write_text("image_name,size\na,1,2\n")
    with pytest.raises(InputError, match="line 2: 3 fields but the header has 2"):
        read_properties(root / "bad.csv")


def test_unreadable_and_odd_masks(tmp_path):
    (tmp_path / "junk.jpg").write_bytes(b"not a jpeg")
    with pytest.raises(InputError, match="not an image Pillow can read"):
        load_mask(tmp_path / "junk.jpg")
    Image.fromarray(np.full((64, 64), 255, np.uint8)).save(tmp_path / "whole.png")
    (tmp_path / "cut.png").write_bytes((tmp_path / "whole.png").read_bytes()[:-40])
    with pytest.raises(InputError, match="the image data is damaged"):
        load_mask(tmp_path / "cut.png")
    Image.fromarray(np.zeros((4, 4), np.uint16)).save(tmp_path / "deep.png")
    with pytest.raises(InputError, match="is not an 8-bit mask"):
        load_mask(tmp_path / "deep.png")
    one_bit = Image.fromarray(np.eye(4, dtype=bool))
    one_bit.save(tmp_path / "bits.png")
    np.testing.assert_array_equal(load_mask(tmp_path / "bits.png"), np.eye(4, dtype=bool))
    item = O3Item("x", tmp_path / "bits.png", tmp_path / "bits.png", tmp_path / "bits.png", {})
    assert check_sizes(item) == (4, 4)
