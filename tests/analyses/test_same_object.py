"""Same-object analysis (qkweights.analyses.same_object, qkweights.datasets.ade20k): protocol, layouts, geometry, runs.

References: a one-layer ViT written here whose mode 0 reads "red" or "blue" in closed form,
so the same or a different object must win; a brute-force implementation of the protocol
in plain loops (each image run alone, a dense numpy SVD of W_qᵀW_k, label maps put on the
model input by PIL's own NEAREST resize of an RGB image that encodes pixel coordinates);
hand-written seg PNGs whose instance numbering follows the rule of the issue (B = 0
unlabelled, other B values ranked ascending).
"""

import json
import math
import re
from pathlib import Path

import numpy as np
import pytest
from conftest import MODELS, big_jpeg, one_layer_vit, peak_bytes_per_pixel, read_csv
from PIL import Image

from qkweights.analyses.runner import SweepSettings
from qkweights.analyses.same_object import (
    STATE_NAME,
    SameObjectResult,
    image_scores,
    keep_objects,
    object_choice,
    patch_fractions,
    run_same_object,
    weighted_probability,
)
from qkweights.analyses.sweep import ModeSelection
from qkweights.cli import main
from qkweights.datasets.ade20k import (
    FULL,
    GENERIC,
    SCENE,
    full_release_objects,
    open_segmentation,
    read_objects,
)
from qkweights.errors import InputError
from qkweights.vision.model import open_vision_model
from qkweights.vision.preprocess import Preprocess


def save_png(array, path, mode=None):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array, mode).save(path) if mode else Image.fromarray(array).save(path)


def save_jpg(array, path):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array.astype(np.uint8)).save(path, quality=95)


# ----------------------------------------------------------------------------- pure functions


def test_patch_fractions_by_hand():
    ids = np.zeros((5, 6), np.int64)  # 2×3 patches of 2×2 (the last row is dropped)
    ids[0, 0] = ids[0, 1] = 3  # half of patch 0
    ids[1, 1] = 7  # a quarter of patch 0
    ids[2:4, 2:6] = 3  # patches 4 and 5 whole
    ids[4, :] = 9  # below the last whole patch: dropped
    objects, a = patch_fractions(ids, 2)
    assert objects.tolist() == [3, 7]
    np.testing.assert_array_equal(a, [[0.5, 0, 0, 0, 1, 1], [0.25, 0, 0, 0, 0, 0]])
    kept, ka = keep_objects(objects, a)
    assert kept.tolist() == [3] and ka.shape == (1, 6)


def test_object_choice_is_the_area_weighted_mean_with_ties_to_the_lowest():
    a = np.array([[1.0, 1.0, 0, 0], [0, 0, 0.5, 0], [0, 0, 0, 1.0]])  # (M 3, N 4)
    q = np.array(
        [[4.0, 0.0], [0.0, 1.0], [3.0, 1.0], [2.0, 1.0]]
    )  # (N, 2): means column 0: 2, 3, 2; column 1: 0.5, 1, 1
    iq, ik = object_choice(a, q, -q)
    assert iq.tolist() == [1, 1]  # column 1 ties objects 1 and 2: the lower wins
    assert ik.tolist() == [0, 0]  # −q: −2, −3, −2 → tie of 0 and 2 → 0; −0.5, −1, −1 → 0


def test_image_scores_take_the_better_sign():
    p = np.zeros((2, 3, 2))  # (B 2, N 3, 2C 2): one column
    p[0, :, 0], p[0, :, 1] = [1, -5, 0], [2, -1, 0]  # +: 1·2 = 2, −: (−5)(−1) = 5 → −1, 5
    p[1, :, 0], p[1, :, 1] = [3, -1, 0], [2, -2, 0]  # +: 6, −: 2 → +1, 6
    score, sign = image_scores(p)
    assert score[:, 0].tolist() == [5, 6] and sign[:, 0].tolist() == [-1, 1]


def test_weighted_probability_by_hand():
    same = np.array([[[1, 0, 1, 0], [1, 1, 0, 0]]], bool)  # (H 1, N 2, K 4)
    valid = np.array([[[1, 1, 1, 1], [1, 1, 1, 0]]], bool)
    p, big = weighted_probability(same, valid, np.array([[3.0, 1.0]]))
    np.testing.assert_allclose(p, [[0.5, 2 / 3]])
    np.testing.assert_allclose(big, [(3 * 0.5 + 1 * 2 / 3) / 4])


# ----------------------------------------------------------------------------- nearest-neighbour geometry


@pytest.mark.parametrize(
    "prep",
    [
        Preprocess(size=(13, 17), resample=0),
        Preprocess(shortest_edge=19, crop=(16, 16), resample=0),
        Preprocess(shortest_edge=19, crop=(15, 13), resample=0, convention="timm"),
        Preprocess(size=(10, 9), crop=(14, 12), resample=0),  # the crop overhangs: padding
    ],
)
def test_label_geometry_is_the_image_geometry(prep):
    """An RGB image whose pixels encode their row and column (+1) goes through the image path with NEAREST;
    decoding it must give the label map's ids, and both must match PIL's pixel-centre rule computed here."""
    h, w = 23, 29
    rows, cols = np.mgrid[:h, :w]
    rgb = np.stack([rows + 1, cols + 1, np.full((h, w), 200)], -1).astype(np.uint8)
    px = prep(rgb)[0]  # (3, H', W') normalised with mean 0, std 1, rescale 1/255
    dec = np.round(px * 255).astype(np.int64)
    ids = ((rows + 1) * 100 + (cols + 1)).astype(np.uint16)  # a 16-bit map
    got = prep.transform_labels(ids)
    want = np.where(dec[2] == 200, dec[0] * 100 + dec[1], 0)  # padding is black: id 0
    np.testing.assert_array_equal(got, want)
    geo = prep.geometry(w, h)
    rh, rw = geo.resized_hw
    src_r = np.floor((np.arange(rh) + 0.5) * h / rh).astype(int)  # PIL: centre of the output pixel, floored
    src_c = np.floor((np.arange(rw) + 0.5) * w / rw).astype(int)
    resized = (src_r[:, None] + 1) * 100 + (src_c[None, :] + 1)
    padded = np.zeros((rh + 40, rw + 40), np.int64)
    padded[20 : 20 + rh, 20 : 20 + rw] = resized
    oh, ow = geo.output_hw
    np.testing.assert_array_equal(got, padded[20 + geo.top : 20 + geo.top + oh, 20 + geo.left : 20 + geo.left + ow])
    assert got.dtype == np.int64 and got.max() > 255


def test_label_geometry_refuses_non_integer_maps():
    with pytest.raises(InputError, match="integer ids"):
        Preprocess(size=(4, 4)).transform_labels(np.zeros((3, 3), np.float32))


# ----------------------------------------------------------------------------- layouts


def test_full_release_objects_rank_b_and_read_the_class():
    rgb = np.zeros((4, 5, 3), np.uint8)
    rgb[..., 2] = [[0, 7, 7, 200, 200], [0, 31, 31, 200, 0], [0, 0, 0, 0, 0], [7, 7, 31, 31, 31]]
    rgb[..., 0], rgb[..., 1] = 25, 3  # class 2 * 256 + 3 = 515
    rgb[1, 1:3, 0], rgb[1, 1:3, 1] = 10, 9  # object B = 31: two pixels of class 1 * 256 + 9 = 265 …
    rgb[3, 2:, 0] = 10  # … and three of class 1 * 256 + 3 = 259
    ids, classes = full_release_objects(rgb)
    want = np.array([[0, 1, 1, 3, 3], [0, 2, 2, 3, 0], [0, 0, 0, 0, 0], [1, 1, 2, 2, 2]])
    np.testing.assert_array_equal(ids, want)
    assert classes.tolist() == [515, 259, 515]  # B = 31: the class of most of its pixels


def _ade_full(root: Path):
    """Two images with seg PNGs (one in a subfolder, with a parts file), one without."""
    img = np.full((16, 16, 3), 90, np.uint8)
    seg = np.zeros((16, 16, 3), np.uint8)
    seg[:8, :, 2], seg[:8, :, 0], seg[:8, :, 1] = 40, 0, 12  # class 12
    seg[8:, :, 2], seg[8:, :, 0], seg[8:, :, 1] = 9, 10, 1  # class 257
    save_jpg(img, root / "a" / "x.jpg")
    save_png(seg, root / "a" / "x_seg.png")
    save_png(seg, root / "a" / "x_parts_1.png")
    save_jpg(img, root / "b" / "c" / "y.jpg")
    save_png(seg, root / "b" / "c" / "y_seg.png")
    save_jpg(img, root / "b" / "z.jpg")
    return root


def test_layouts_are_detected(tmp_path):
    data = open_segmentation(_ade_full(tmp_path / "full"))
    assert data.layout == FULL
    assert [it.name for it in data.items] == ["a/x.jpg", "b/c/y.jpg"]
    assert data.missing == [("b/z.jpg", "no annotation z_seg.png beside it")]
    ids, classes = read_objects(data.items[0], (16, 16))
    assert ids[0, 0] == 2 and ids[15, 0] == 1 and classes == {1: 257, 2: 12}  # B 9 → 1, B 40 → 2

    scene = tmp_path / "sp" / "ADEChallengeData2016"
    save_jpg(np.zeros((8, 8, 3)), scene / "images" / "validation" / "v1.jpg")
    save_png(
        np.array([[0, 3], [150, 3]], np.uint8).repeat(4, 0).repeat(4, 1),
        scene / "annotations" / "validation" / "v1.png",
    )
    save_jpg(np.zeros((8, 8, 3)), scene / "images" / "training" / "t1.jpg")
    for root in (tmp_path / "sp", scene):
        data = open_segmentation(root)
        assert data.layout == SCENE and len(data.items) == 1
        assert data.missing[0][1].startswith("no annotation")
        ids, classes = read_objects(data.items[0], (8, 8))
        assert classes == {3: 3, 150: 150}
    assert open_segmentation(tmp_path / "sp").items[0].name == "ADEChallengeData2016/images/validation/v1.jpg"

    gen = tmp_path / "gen"
    save_jpg(np.zeros((6, 8, 3)), gen / "images" / "p.jpg")
    save_png(np.array([[0, 1000], [40000, 1000]], np.uint16).repeat(3, 0).repeat(4, 1), gen / "instances" / "p.png")
    data = open_segmentation(gen)
    assert data.layout == GENERIC
    ids, classes = read_objects(data.items[0], (8, 6))
    assert ids.max() == 40000 and classes == {1000: -1, 40000: -1}


def test_a_data_dir_that_is_no_folder_says_what_it_is(tmp_path):
    (tmp_path / "data.txt").write_text("not a folder")
    (tmp_path / "loop").symlink_to(tmp_path / "loop")
    for path, why in (
        (tmp_path / "data.txt", "is a file, not a folder"),
        (tmp_path / "missing", "no such folder"),
        (tmp_path / "loop", "is a symbolic link that leads nowhere"),
    ):
        with pytest.raises(InputError, match=f"^{re.escape(str(path))}: {why}"):
            open_segmentation(path)


def test_unknown_layout_is_an_input_error(tmp_path):
    (tmp_path / "images").mkdir()
    with pytest.raises(InputError, match="no known dataset layout; looked for images/ \\+ instances/"):
        open_segmentation(tmp_path)
    assert main(["same-object", str(MODELS / "vit"), str(tmp_path), "--out", str(tmp_path / "o")]) == 2


# ----------------------------------------------------------------------------- a model with a known answer


def write_colour_vit(folder: Path, same: bool) -> Path:
    """A one-layer hf-vit (D 16, 2 heads of 8, image 32, patch 8) whose head 0 mode 0 reads red and blue.

    The patch conv gives e = r·a + b·β + g with r = patch mean of (R − G)/2 and b = mean of
    (B − G)/2 on the normalised pixels (red 1, blue 0, grey ≈ 0 for r), a = e0 − e1,
    β = e2 − e3, g = 4(e4 − e5): orthogonal, zero-mean over D, so the LayerNorm output is
    x = e·√D/|e| and x·a ∝ r, x·β ∝ b. W_q's row 0 is a/√2 and W_k's row 0 is β/√2 (or a/√2
    when ``same``), so mode 0 has u = a/√2 and v = β/√2 (or a/√2): the query object is the
    reddest, the key object the bluest (or the reddest). The other rows are zero.
    """
    d, p = 16, 8
    conv = np.zeros((d, 3, p, p), np.float32)
    conv[0, 0], conv[0, 1] = 0.5 / p**2, -0.5 / p**2
    conv[1] = -conv[0]
    conv[2, 2], conv[2, 1] = 0.5 / p**2, -0.5 / p**2
    conv[3] = -conv[2]
    bias = np.zeros(d, np.float32)
    bias[4], bias[5] = 4.0, -4.0
    wq, wk = np.zeros((d, d), np.float32), np.zeros((d, d), np.float32)
    wq[0, :2] = [1 / math.sqrt(2), -1 / math.sqrt(2)]
    wk[0, :4] = wq[0, :4] if same else [0, 0, 1 / math.sqrt(2), -1 / math.sqrt(2)]
    return one_layer_vit(folder, wq=wq, wk=wk, conv=conv, conv_bias=bias, resample=0)


RED, BLUE, GREEN, GREY = (255, 0, 0), (0, 0, 255), (0, 255, 0), (128, 128, 128)


def colour_scenes(root: Path) -> dict[str, list]:
    """Generic-layout scenes of 64×64 pixels (patch = 16×16 of the original): name → [(id, colour, box)]."""
    scenes = {
        "s0": [(5, RED, (0, 0, 32, 32)), (9, BLUE, (32, 32, 64, 64)), (2, GREEN, (0, 32, 32, 64))],
        "s1": [(1, BLUE, (0, 0, 16, 48)), (4, RED, (16, 16, 48, 48))],
        "s2": [(3, RED, (0, 0, 16, 16)), (8, BLUE, (48, 48, 64, 64)), (6, GREEN, (16, 16, 40, 40))],
        "s3": [(7, RED, (0, 0, 64, 32))],  # one object: not eligible
        "s4": [(1, RED, (0, 0, 32, 32)), (2, BLUE, (40, 40, 46, 46))],  # the blue one is smaller than a patch
        "s5": [],  # no objects
    }
    for name, objs in scenes.items():
        img = np.full((64, 64, 3), GREY, np.uint8)
        ids = np.zeros((64, 64), np.uint8)
        for i, colour, (y0, x0, y1, x1) in objs:
            img[y0:y1, x0:x1] = colour
            ids[y0:y1, x0:x1] = i
        save_png(img, root / "images" / f"{name}.png")
        save_png(ids, root / "instances" / f"{name}.png")
    return scenes


@pytest.mark.parametrize("same", [False, True])
def test_known_model_picks_the_objects_it_must(tmp_path, same):
    root = tmp_path / "data"
    scenes = colour_scenes(root)
    model = write_colour_vit(tmp_path / "model", same)
    result = run_same_object(str(model), root, tmp_path / "out", selection=ModeSelection(heads=[0], modes=[0], top=5))
    rows = read_csv(tmp_path / "out" / "same_object.csv")
    red = {n: next(i for i, c, _ in objs if c == RED) for n, objs in scenes.items() if len(objs) >= 2}
    blue = {n: next(i for i, c, _ in objs if c == BLUE) for n, objs in scenes.items() if len(objs) >= 2}
    # Every eligible scene holds a whole red and a whole blue (or red) patch: equal scores, so path order.
    assert [r["image"] for r in rows] == ["images/s0.png", "images/s1.png", "images/s2.png"]
    for r in rows:
        name = Path(r["image"]).stem
        assert int(r["sign"]) == 1
        assert int(r["query_object"]) == red[name]
        assert int(r["key_object"]) == (red if same else blue)[name]
        assert int(r["same"]) == int(same)
        assert r["query_class"] == "" and r["key_class"] == ""
    assert [int(r["n_objects"]) for r in rows] == [3, 2, 3]
    layer = result.doc["layers"][0]
    assert layer["probability"] == float(same) and layer["heads"][0]["modes"][0]["probability"] == float(same)
    assert layer["chance"] == pytest.approx((1 / 3 + 1 / 2 + 1 / 3) / 3)
    reasons = {s["image"]: s["reason"] for s in result.skipped}
    assert set(reasons) == {"images/s3.png", "images/s4.png", "images/s5.png"}
    assert reasons["images/s4.png"].startswith(
        "not eligible: 1 object(s) cover at least one patch (2 on the model input"
    )
    assert result.doc["dataset"]["n_eligible"] == 3 and result.doc["dataset"]["n_ineligible"] == 3


# ----------------------------------------------------------------------------- brute force on a fixture model


def random_dataset(root: Path, n: int, seed: int) -> None:
    """Generic layout: n images of varying size and aspect with random rectangles as instances (16-bit ids)."""
    rng = np.random.default_rng(seed)
    for i in range(n):
        h, w = int(rng.integers(36, 60)), int(rng.integers(36, 60))
        img = rng.integers(0, 256, (h, w, 3)).astype(np.uint8)
        ids = np.zeros((h, w), np.uint16)
        for _ in range(int(rng.integers(1, 6))):
            y0, x0 = int(rng.integers(0, h - 8)), int(rng.integers(0, w - 8))
            y1, x1 = y0 + int(rng.integers(4, h - y0 + 1)), x0 + int(rng.integers(4, w - x0 + 1))
            oid = int(rng.integers(1, 60000))
            ids[y0:y1, x0:x1] = oid
            img[y0:y1, x0:x1] = (img[y0:y1, x0:x1] // 3 + rng.integers(0, 170, 3)).astype(np.uint8)
        save_png(img, root / "images" / f"r{i:02d}.png")
        save_png(ids, root / "instances" / f"r{i:02d}.png")


def brute_force(model, root: Path, layers, heads, modes, top):
    """The protocol in plain loops: {(l, h, n): [(image, sign, score, q_obj, k_obj, n_obj) ranked]} and σ."""
    prep = model.preprocessing
    p = model.weights.embeddings.patch_size
    per_image = []
    for path in sorted((root / "images").iterdir()):
        name = path.relative_to(root).as_posix()
        ids = np.asarray(Image.open(root / "instances" / path.name)).astype(np.int64)
        h0, w0 = ids.shape
        # put the labels on the model input through PIL's NEAREST resize of a coordinate-encoded RGB image
        rows, cols = np.mgrid[:h0, :w0]
        coord = np.stack([rows, cols, np.full_like(rows, 255)], -1).astype(np.uint8)
        geo = prep.geometry(w0, h0)
        small = np.asarray(
            Image.fromarray(coord).resize(geo.resized_hw[::-1], Image.Resampling.NEAREST).crop(geo.box)
        ).astype(int)
        labels = np.where(small[..., 2] == 255, ids[small[..., 0], small[..., 1]], 0)
        gh, gw = labels.shape[0] // p, labels.shape[1] // p
        objs = {}
        for o in sorted(set(labels.ravel().tolist()) - {0}):
            a = [
                float(np.mean(labels[r * p : (r + 1) * p, c * p : (c + 1) * p] == o))
                for r in range(gh)
                for c in range(gw)
            ]
            if sum(a) >= 1:
                objs[o] = a
        if len(objs) < 2:
            continue
        out = model.forward(model.preprocess(Image.open(path)), layers=layers)
        per_image.append(
            (name, objs, {l: out.attention_inputs[l][0, out.layout.patches].astype(np.float64) for l in layers})
        )
    ranked, sigma = {}, {}
    for l in layers:
        qk = model.checkpoint.qk(l)
        for h in heads:
            u, s, vt = np.linalg.svd(qk.wq[h].astype(np.float64).T @ qk.wk[h].astype(np.float64))
            for n in modes:
                sigma[l, h, n] = s[n]
                cands = []
                for pos, (name, objs, xs) in enumerate(per_image):
                    q, k = xs[l] @ u[:, n], xs[l] @ vt[n]
                    plus, minus = max(q) * max(k), max(-q) * max(-k)
                    sg = 1 if plus >= minus else -1
                    mean = lambda m, a: sum(ai * mi for ai, mi in zip(a, m)) / sum(a)
                    qo = max(objs, key=lambda o: (mean(sg * q, objs[o]), -o))
                    ko = max(objs, key=lambda o: (mean(sg * k, objs[o]), -o))
                    cands.append((-max(plus, minus), pos, name, qo, ko, len(objs)))
                ranked[l, h, n] = sorted(cands)[:top]
    return ranked, sigma


@pytest.mark.numerics
def test_against_brute_force_on_a_fixture_with_crop_and_registers(tmp_path):
    root = tmp_path / "data"
    random_dataset(root, 14, seed=3)
    model = open_vision_model(str(MODELS / "dinov2-reg"))  # shortest edge 36, centre crop 32, register tokens
    layers, heads, modes, top = [0, 1], [0, 1], [0, 1, 2], 4
    result = run_same_object(
        model,
        root,
        tmp_path / "out",
        selection=ModeSelection(layers=layers, heads=heads, modes=modes, top=top),
        settings=SweepSettings(batch_size=5),
    )
    ref, sigma = brute_force(model, root, layers, heads, modes, top)
    got = {}
    for r in result.rows:
        got.setdefault((r["layer"], r["head"], r["mode"]), []).append(r)
    assert set(got) == set(ref)
    checked_diff = 0
    for key, want in ref.items():
        assert [g["image"] for g in got[key]] == [w[2] for w in want]
        assert [(g["query_object"], g["key_object"], g["n_objects"]) for g in got[key]] == [w[3:] for w in want]
        # both in float64 from the same float32 tokens, in other orders: ≲ √D·2⁻⁵³ relative per projection, ≪ 1e-9
        np.testing.assert_allclose([g["score"] for g in got[key]], [-w[0] for w in want], rtol=1e-9)
        checked_diff += sum(g["same"] == 0 for g in got[key])
    assert checked_diff > 0 and any(r["same"] for r in result.rows)  # both outcomes occur
    for e in result.doc["layers"]:
        ps = []
        for hd in e["heads"]:
            pn = [np.mean([w[3] == w[4] for w in ref[e["layer"], hd["head"], n]]) for n in modes]
            s = [sigma[e["layer"], hd["head"], n] for n in modes]
            ps.append(sum(a * b for a, b in zip(s, pn)) / sum(s))
            assert hd["probability"] == pytest.approx(ps[-1], abs=1e-12)
        assert e["probability"] == pytest.approx(np.mean(ps), abs=1e-12)
        assert e["sem"] == pytest.approx(np.std(ps, ddof=1) / math.sqrt(len(ps)), abs=1e-12)


# ----------------------------------------------------------------------------- runs: files, executors, resume, CLI


@pytest.fixture(scope="module")
def full_release(tmp_path_factory):
    """ADE20K-full-release layout of 10 synthetic images (coloured rectangles as instances, random B values)."""
    root = tmp_path_factory.mktemp("ade") / "ADE20K_2021_17_01"
    rng = np.random.default_rng(11)
    for i in range(10):
        h, w = int(rng.integers(40, 70)), int(rng.integers(40, 70))
        img = rng.integers(0, 256, (h, w, 3)).astype(np.uint8)
        seg = np.zeros((h, w, 3), np.uint8)
        for _ in range(4):
            y0, x0 = int(rng.integers(0, h // 2)), int(rng.integers(0, w // 2))
            b, cls = int(rng.integers(1, 256)), int(rng.integers(1, 3000))
            seg[y0 : y0 + h // 2, x0 : x0 + w // 2] = (cls // 256 * 10, cls % 256, b)
            img[y0 : y0 + h // 2, x0 : x0 + w // 2] //= 2
        sub = root / "images" / "ADE" / ("training" if i % 2 else "validation")
        save_jpg(img, sub / f"ADE_{i:04d}.jpg")
        save_png(seg, sub / f"ADE_{i:04d}_seg.png")
    save_jpg(np.zeros((40, 40, 3)), root / "images" / "ADE" / "validation" / "ADE_9999.jpg")  # no seg: skipped
    bad = root / "images" / "ADE" / "validation"
    save_jpg(np.zeros((40, 40, 3)), bad / "ADE_9998.jpg")
    save_png(np.zeros((30, 40, 3), np.uint8), bad / "ADE_9998_seg.png")  # another size than its image
    return root


def test_full_release_run_lists_skips_and_classes(tmp_path, vit, full_release):
    result = run_same_object(
        vit, full_release, tmp_path / "out", selection=ModeSelection(layers=[1], modes=[0, 1], top=3)
    )
    reasons = {s["image"]: s["reason"] for s in result.skipped}
    assert reasons["images/ADE/validation/ADE_9999.jpg"] == "no annotation ADE_9999_seg.png beside it"
    assert reasons["images/ADE/validation/ADE_9998.jpg"].startswith(
        "annotation ADE_9998_seg.png is 40x30 but the image is 40x40"
    )
    assert result.doc["dataset"]["layout"] == FULL and result.doc["dataset"]["n_images"] == 12
    again = SameObjectResult.load(tmp_path / "out")
    assert again.rows == result.rows and again.doc == json.loads(json.dumps(result.doc))
    for r in result.rows:
        assert r["query_class"] is not None and 1 <= r["query_class"] < 3000
    assert len(result.rows) == 4 * 2 * 3


EXECUTORS_SELECTION = ModeSelection(layers=[0, 1], modes=[0, 1, 2], top=3)  # in process, workers, Dask


@pytest.mark.numerics
def test_workers_give_the_same_files(tmp_path, vit, full_release):
    run_same_object(
        vit,
        full_release,
        tmp_path / "here",
        selection=EXECUTORS_SELECTION,
        settings=SweepSettings(batch_size=2, shard_size=3),
    )
    run_same_object(
        vit,
        full_release,
        tmp_path / "pool",
        selection=EXECUTORS_SELECTION,
        settings=SweepSettings(batch_size=2, shard_size=3, workers=2),
    )
    for name in ("same_object.csv", "same_object.json"):
        assert (tmp_path / "here" / name).read_bytes() == (tmp_path / "pool" / name).read_bytes()


@pytest.mark.slow
def test_a_dask_cluster_gives_the_same_files(tmp_path, vit, full_release):
    distributed = pytest.importorskip("distributed")
    run_same_object(
        vit,
        full_release,
        tmp_path / "here",
        selection=EXECUTORS_SELECTION,
        settings=SweepSettings(batch_size=2, shard_size=3),
    )
    with (
        distributed.LocalCluster(
            n_workers=2, threads_per_worker=1, processes=True, host="127.0.0.1", dashboard_address="127.0.0.1:0"
        ) as cluster,
        distributed.Client(cluster) as client,
    ):
        run_same_object(
            vit,
            full_release,
            tmp_path / "dask",
            selection=EXECUTORS_SELECTION,
            settings=SweepSettings(batch_size=2, shard_size=3, client=client),
        )
    for name in ("same_object.csv", "same_object.json"):
        assert (tmp_path / "here" / name).read_bytes() == (tmp_path / "dask" / name).read_bytes()


@pytest.mark.numerics
def test_interrupted_run_resumes_to_the_same_result(tmp_path, vit, full_release):
    run_same_object(
        vit,
        full_release,
        tmp_path / "full",
        selection=ModeSelection(layers=[1], modes=[0, 1], top=3),
        settings=SweepSettings(batch_size=2, shard_size=4),
    )

    def stop(done, total):
        if done >= 4:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_same_object(
            vit,
            full_release,
            tmp_path / "part",
            selection=ModeSelection(layers=[1], modes=[0, 1], top=3),
            settings=SweepSettings(batch_size=2, shard_size=4),
            progress=stop,
        )
    assert (tmp_path / "part" / STATE_NAME).is_file()
    calls, notes = [], []
    run_same_object(
        vit,
        full_release,
        tmp_path / "part",
        selection=ModeSelection(layers=[1], modes=[0, 1], top=3),
        settings=SweepSettings(batch_size=2, shard_size=4),
        progress=lambda d, t: calls.append(d),
        notes=notes.append,
    )
    assert calls == [4, 8, 11] and notes[0].startswith("resuming from")
    for name in ("same_object.csv", "same_object.json"):
        assert (tmp_path / "part" / name).read_bytes() == (tmp_path / "full" / name).read_bytes()
    assert not (tmp_path / "part" / STATE_NAME).exists()


def test_nothing_eligible_is_an_error(tmp_path, vit):
    root = tmp_path / "data"
    save_jpg(np.zeros((32, 32, 3)), root / "images" / "a.jpg")
    save_png(np.ones((32, 32), np.uint8), root / "instances" / "a.png")
    with pytest.raises(
        InputError, match="none of the 1 images is eligible \\(first: images/a.jpg: not eligible: 1 object"
    ):
        run_same_object(vit, root, tmp_path / "out")


def test_cli_with_figures(tmp_path, capsys, full_release):
    out = tmp_path / "out"
    assert (
        main(
            [
                "same-object",
                str(MODELS / "vit"),
                str(full_release),
                "--layers",
                "0-1",
                "--modes",
                "0-2",
                "--top",
                "3",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    text = capsys.readouterr().out
    assert "P(same object)" in text and "ade20k-full: 10 eligible images of 12" in text
    for name in ("same_object_by_layer.png", "same_object_examples.png"):
        with Image.open(out / name) as im:
            assert im.format == "PNG" and im.width > 600
    assert main(["same-object", str(MODELS / "vit"), str(full_release), "--top", "0", "--out", str(out)]) == 2


def test_compare_overlays_same_object_results(tmp_path, vit, full_release):
    from qkweights.figures.compare import write_comparison

    a = run_same_object(
        vit, full_release, tmp_path / "a", selection=ModeSelection(layers=[0, 1], modes=[0, 1], top=3)
    ).doc
    b = run_same_object(vit, full_release, tmp_path / "b", selection=ModeSelection(layers=[1], modes=[2], top=2)).doc
    inputs = [tmp_path / "a", tmp_path / "b" / "same_object.json"]
    written = write_comparison(inputs, tmp_path / "cmp", labels=["A", "B"])
    assert [p.name for p in written] == ["compare_same_object.png", "compare_same_object.csv"]
    rows = read_csv(tmp_path / "cmp" / "compare_same_object.csv")
    want = [(lab, e) for lab, doc in (("A", a), ("B", b)) for e in doc["layers"]]
    assert [(r["model"], int(r["layer"])) for r in rows] == [(lab, e["layer"]) for lab, e in want]
    for r, (_, e) in zip(rows, want):
        assert float(r["depth"]) == e["layer"] / 1 and float(r["probability"]) == e["probability"]
        assert float(r["chance"]) == e["chance"] and (
            r["sem"] == "" if e["sem"] is None else float(r["sem"]) == pytest.approx(e["sem"])
        )


def test_synthetic_instance_maps_are_the_painted_objects(tmp_path):
    from qkweights.datasets.synthetic_o3 import draw_scene, draw_scene_labels, make_o3

    image, target, distractor, _ = draw_scene(np.random.default_rng([4, 1]), (48, 64))
    image2, labels, _ = draw_scene_labels(np.random.default_rng([4, 1]), (48, 64))
    assert np.array_equal(np.asarray(image), np.asarray(image2))
    assert np.array_equal(target, labels == 1) and np.array_equal(distractor, labels > 1) and labels.max() >= 4
    folder = make_o3(tmp_path / "s", n=2, seed=4, size=(48, 64), instances=True, object_scale=2.0)
    _, big, _ = draw_scene_labels(np.random.default_rng([4, 1]), (48, 64), object_scale=2.0)
    assert np.array_equal(np.asarray(Image.open(folder / "instances" / "synth_0001.png")), big)
    assert (big > 0).sum() > 2 * (labels > 0).sum()
    assert open_segmentation(folder).layout == GENERIC


# ----------------------------------------------------------------------------- EXIF orientation

# PIL's inverse of what ImageOps.exif_transpose does for each orientation: the stored pixels of a displayed image.
STORED_FOR = {6: Image.Transpose.ROTATE_90, 8: Image.Transpose.ROTATE_270}


def _exif(orientation):
    exif = Image.Exif()
    exif[0x0112] = orientation  # Orientation
    return exif


def exif_dataset(root: Path, orientation: int, size: tuple[int, int], annotation: str) -> Path:
    """A generic-layout folder with one JPEG of ``size`` (height, width) as displayed, stored turned with its EXIF
    ``orientation``; left half red (object 1), right half blue (object 2). ``annotation``: "displayed" (the ids as
    displayed), "stored" (as stored, untagged) or "tagged" (as stored, with the image's EXIF tag)."""
    h, w = size
    shown = np.zeros((h, w, 3), np.uint8)
    shown[:, : w // 2], shown[:, w // 2 :] = RED, BLUE
    ids = np.where(np.arange(w) < w // 2, 1, 2).astype(np.uint8)[None].repeat(h, 0)  # (H, W) as displayed
    (root / "images").mkdir(parents=True)
    (root / "instances").mkdir()
    turn = STORED_FOR[orientation]
    Image.fromarray(shown).transpose(turn).save(
        root / "images" / "p.jpg", quality=95, subsampling=0, exif=_exif(orientation)
    )
    ann = Image.fromarray(ids)
    if annotation == "displayed":
        ann.save(root / "instances" / "p.png")
    elif annotation == "stored":
        ann.transpose(turn).save(root / "instances" / "p.png")
    else:
        ann.transpose(turn).save(root / "instances" / "p.png", exif=_exif(orientation))
    return root


@pytest.mark.parametrize("orientation", [6, 8])
@pytest.mark.parametrize("size", [(16, 32), (32, 32)])  # (height, width) as displayed: non-square, square
@pytest.mark.parametrize("annotation", ["displayed", "tagged"])
def test_exif_turned_images_and_annotations_are_read_as_displayed(tmp_path, orientation, size, annotation):
    from qkweights.vision.preprocess import open_image

    item = open_segmentation(exif_dataset(tmp_path, orientation, size, annotation)).items[0]
    image = open_image(item.image)
    assert Image.open(item.image).size == size  # stored (width, height) = displayed (height, width): turned
    ids, classes = read_objects(item, image.size)
    assert classes == {1: -1, 2: -1} and ids.shape == size
    rgb = np.asarray(image).astype(int)  # (H, W, 3) as displayed
    # away from the JPEG's edge between the halves, object 1 is red and object 2 blue (JPEG error < 40 of 255)
    inner = np.abs(np.arange(size[1]) - size[1] / 2) > 4
    red = (np.abs(rgb - RED).max(-1) < 40)[:, inner]
    blue = (np.abs(rgb - BLUE).max(-1) < 40)[:, inner]
    assert red.any() and not red.all()
    np.testing.assert_array_equal(red, ids[:, inner] == 1)
    np.testing.assert_array_equal(blue, ids[:, inner] == 2)


@pytest.mark.parametrize("orientation", [6, 8])
def test_exif_turned_square_image_prepared_for_the_model_keeps_its_objects_on_their_colours(tmp_path, orientation):
    from qkweights.analyses.same_object import prepare

    model = open_vision_model(str(MODELS / "vit"))  # 32×32 input, 8×8 patches: a 4×4 grid
    item = open_segmentation(exif_dataset(tmp_path, orientation, (32, 32), "displayed")).items[0]
    got = prepare(model, item, None)
    p = model.weights.embeddings.patch_size
    patch_rgb = got.pixels.reshape(3, 4, p, 4, p).mean((2, 4)).reshape(3, -1)  # (3, N) normalised patch means
    red, blue = patch_rgb[0] > patch_rgb[2], patch_rgb[2] > patch_rgb[0]
    assert got.objects.tolist() == [1, 2] and red.sum() == blue.sum() == 8
    np.testing.assert_array_equal(got.a[0] == 1, red)  # object 1 covers exactly the red patches
    np.testing.assert_array_equal(got.a[1] == 1, blue)


@pytest.mark.parametrize("orientation", [6, 8])
def test_an_annotation_of_the_stored_pixels_of_a_turned_image_is_refused_naming_exif(tmp_path, orientation):
    from qkweights.vision.preprocess import open_image

    item = open_segmentation(exif_dataset(tmp_path, orientation, (16, 32), "stored")).items[0]
    with pytest.raises(InputError) as e:
        read_objects(item, open_image(item.image).size)
    assert str(e.value) == (
        f"annotation p.png is 16x32 but the image is 32x16 (width x height) as displayed: its EXIF orientation "
        f"{orientation} turns the stored 16x32 pixels; the annotation follows the stored pixels, but annotations "
        "follow the image as displayed (EXIF orientation applied, as the model sees it): turn the annotation the "
        "same way, or give it the image's EXIF orientation tag; it must match its image as displayed, pixel for pixel"
    )


@pytest.mark.parametrize("orientation", [None, 3])  # no tag; a half turn, which keeps width and height
def test_a_size_mismatch_without_a_turning_exif_tag_says_nothing_of_it(tmp_path, orientation):
    (tmp_path / "images").mkdir()
    exif = _exif(orientation) if orientation else Image.Exif()
    Image.fromarray(np.zeros((16, 32, 3), np.uint8)).save(tmp_path / "images" / "p.jpg", exif=exif)
    save_png(np.ones((32, 16), np.uint8), tmp_path / "instances" / "p.png")
    with pytest.raises(InputError) as e:
        read_objects(open_segmentation(tmp_path).items[0], (32, 16))
    assert str(e.value) == (
        "annotation p.png is 16x32 but the image is 32x16 (width x height); it must match its image as displayed, "
        "pixel for pixel"
    )


def test_a_turned_image_with_an_annotation_of_neither_orientation_names_exif_only(tmp_path):
    from qkweights.vision.preprocess import open_image

    root = exif_dataset(tmp_path, 6, (16, 32), "displayed")
    save_png(np.ones((20, 20), np.uint8), root / "instances" / "p.png")  # fits neither the stored nor the displayed
    item = open_segmentation(root).items[0]
    with pytest.raises(InputError) as e:
        read_objects(item, open_image(item.image).size)
    assert str(e.value) == (
        "annotation p.png is 20x20 but the image is 32x16 (width x height) as displayed: its EXIF orientation 6 "
        "turns the stored 16x32 pixels; it must match its image as displayed, pixel for pixel"
    )


# ----------------------------------------------------------------------------- ties and letter case


def test_image_score_ties_take_the_plus_sign():
    p = np.zeros((1, 2, 2))  # (B 1, N 2, 2C 2): q = k = [1, −1]: score_+ = 1·1 = score_− = (−1)(−1)
    p[0, :, 0] = p[0, :, 1] = [1, -1]
    score, sign = image_scores(p)
    assert score.tolist() == [[1.0]] and sign.tolist() == [[1]]


def test_full_release_class_ties_go_to_the_lower_class():
    rgb = np.zeros((1, 4, 3), np.uint8)
    rgb[0, :, 2] = 5  # one object (B = 5) of four pixels …
    rgb[0, :, 0] = [10, 10, 0, 0]  # … two of class 1 * 256 + 7 = 263 and two of class 0 * 256 + 9 = 9
    rgb[0, :, 1] = [7, 7, 9, 9]
    ids, classes = full_release_objects(rgb)
    assert ids.tolist() == [[1, 1, 1, 1]] and classes.tolist() == [9]
    rgb[0, :, 0], rgb[0, :, 1] = [0, 0, 10, 10], [9, 9, 7, 7]  # the same tie in the other pixel order
    assert full_release_objects(rgb)[1].tolist() == [9]


def test_a_mode_without_a_selected_image_is_left_out_of_the_weighting():
    same = np.array([[1, 0], [0, 0]], bool)  # (N 2, K 2): mode 1 selected no image
    valid = np.array([[1, 1], [0, 0]], bool)
    p, big = weighted_probability(same, valid, np.array([3.0, 1.0]))
    assert p[0] == 0.5 and np.isnan(p[1])
    assert big == 0.5  # σ_1 is not in the denominator: (3 · 0.5) / 3, not (3 · 0.5) / 4


def test_upper_case_suffixes_are_found_in_every_layout(tmp_path):
    img, ids = np.zeros((8, 8, 3)), np.array([[1, 2]], np.uint8).repeat(8, 0).repeat(4, 1)
    full = tmp_path / "full"
    save_jpg(img, full / "IMG.JPG")
    save_png(np.dstack([ids * 0, ids * 0, ids]), full / "IMG_seg.png")
    save_jpg(img, full / "b" / "x.JPEG")
    save_png(np.dstack([ids * 0, ids * 0, ids]), full / "b" / "x_seg.PNG")
    data = open_segmentation(full)
    assert data.layout == FULL and [it.name for it in data.items] == ["IMG.JPG", "b/x.JPEG"] and not data.missing
    assert open_segmentation(full / "b").layout == FULL  # told by a seg file ending .PNG alone
    for layout, folder, names in (
        (SCENE, "annotations", ["images/IMG.JPG", "images/x.PNG"]),
        (GENERIC, "instances", ["images/IMG.JPG", "images/x.PNG"]),
    ):
        root = tmp_path / layout
        save_jpg(img, root / "images" / "IMG.JPG")
        save_png(ids, root / folder / "IMG.png")
        save_png(img.astype(np.uint8), root / "images" / "x.PNG")
        save_png(ids, root / folder / "x.PNG")
        data = open_segmentation(root)
        assert data.layout == layout and [it.name for it in data.items] == names and not data.missing
        assert [it.annotation.name for it in data.items] == ["IMG.png", "x.PNG"]


@pytest.mark.parametrize(
    "prep", [Preprocess(shortest_edge=19, crop=(16, 16), resample=0), Preprocess(size=(10, 9), crop=(14, 12))]
)
def test_uint8_label_maps_take_the_same_path_as_wide_ones(prep):
    # an 8-bit map goes through PIL mode "L", a wider one through mode "I": NEAREST copies pixels, so the same ids
    ids = np.random.default_rng(5).integers(0, 256, (23, 29)).astype(np.uint8)
    small = prep.transform_labels(ids)
    assert small.dtype == np.int64
    np.testing.assert_array_equal(small, prep.transform_labels(ids.astype(np.int32)))
    np.testing.assert_array_equal(prep.transform_labels(ids > 128), prep.transform_labels((ids > 128).astype(np.int32)))


# Peak bytes a pixel of one large image and its annotation, accounted: the image decoded once (4: Pillow's RGBX),
# then a generic 8-bit map: Pillow's copy, numpy's, np.unique's flattened copy and mask (1 each): 8 in all; a full
# release seg PNG: Pillow's RGBX (4), numpy's RGB (3), the ids (1), the classes (2 + 1 for R // 10), the (object,
# class) keys (4) and np.unique's copy and mask of them (5): 24. Int64 arrays, as before, made these 23 and 77.
@pytest.mark.slow
@pytest.mark.parametrize("layout, bound", [(GENERIC, 9.0), (FULL, 27.0)])
def test_a_large_image_and_its_annotation_stay_within_a_few_bytes_a_pixel(tmp_path, layout, bound):
    w, h = 4000, 3000
    if layout == GENERIC:
        for folder in ("images", "instances"):
            (tmp_path / folder).mkdir()
        big_jpeg(tmp_path / "images" / "p.jpg", w, h)
        ids = Image.new("L", (w, h), 1)
        ids.paste(2, (w // 2, 0, w, h))  # two halves: eligible on any input grid
        ids.save(tmp_path / "instances" / "p.png")
    else:
        big_jpeg(tmp_path / "p.jpg", w, h)
        seg = Image.new("RGB", (w, h), (10, 7, 3))  # B 3: object 1 of class 263
        seg.paste((20, 9, 40), (w // 2, 0, w, h))  # B 40: object 2 of class 521
        seg.save(tmp_path / "p_seg.png")
    setup = (
        "from qkweights.datasets.ade20k import open_segmentation\n"
        "from qkweights.analyses.same_object import prepare\n"
        f"item = open_segmentation({str(tmp_path)!r}).items[0]"
    )
    per_pixel = peak_bytes_per_pixel("prepare(model, item, None)", w * h, setup=setup)
    assert 4.0 < per_pixel < bound
