"""O3 attention allocation (qkweights.analyses.o3): the ratios, the masks, the runs, resumption and the CLI.

References: ratios worked out by hand for small cases; golden attentions of the tiny
fixtures computed by transformers (tests/fixtures/golden, see its README); the exact
object masks that synth_o3.draw_scene paints (not the JPEG files); a one-layer ViT
written here whose attention pattern is known in closed form.
"""

import json
import math
import shutil
import statistics
from pathlib import Path

import numpy as np
import pytest
from conftest import FORWARD_ATOL, GOLDEN, MODELS, one_layer_vit, read_csv
from PIL import Image

from qkweights import workflow
from qkweights.analyses.o3 import (
    RATIOS,
    STATE_NAME,
    allocation,
    forward_rows,
    layer_statistics,
    patch_masks,
    run_o3,
    token_choice,
)
from qkweights.analyses.runner import SweepSettings
from qkweights.cli import main
from qkweights.datasets.synthetic_o3 import draw_scene, make_o3
from qkweights.errors import InputError
from qkweights.vision.model import open_vision_model

# Index of the first patch token in each fixture's sequence (fixtures README, "tokens T (order)").
PATCH_START = {"vit": 1, "deit": 2, "dinov2-reg": 5, "ijepa": 0}


@pytest.fixture(scope="module")
def square(tmp_path_factory):
    """12 synthetic scenes of 64×64 pixels, seed 5."""
    return make_o3(tmp_path_factory.mktemp("o3") / "square", n=12, seed=5, size=(64, 64))


@pytest.fixture(scope="module")
def wide(tmp_path_factory):
    """10 synthetic scenes of 48×80 pixels (height × width), seed 2."""
    return make_o3(tmp_path_factory.mktemp("o3") / "wide", n=10, seed=2, size=(48, 80))


# ----------------------------------------------------------------------------- pure functions


def test_allocation_by_hand():
    # 2×2 patch grid. target [[1, 0], [0, 0]], distractor [[0, .5], [0, 1]], so background
    # clip(1 − t − d) = [[0, .5], [1, 0]]. The target row puts 0.4 of its mass on special
    # tokens: [.2, .1, .1, .2] over the patches renormalises to [1/3, 1/6, 1/6, 1/3], so
    # tt = 1/3, td = .5/6 + 1/3 = 5/12, tb = .5/6 + 1/6 = 3/12. The distractor row
    # [0, 0, 0, .5] renormalises to the last patch: dt = 0, dd = 1, db = 0.
    masks = patch_masks(np.array([[1.0, 0], [0, 0]]), np.array([[0, 0.5], [0, 1]]), 1)
    np.testing.assert_array_equal(masks[2], [[0, 0.5], [1, 0]])
    rows = np.array([[[[0.2, 0.1, 0.1, 0.2], [0, 0, 0, 0.5]]]])  # (L=1, H=1, 2, N=4)
    np.testing.assert_allclose(allocation(rows, masks)[0, 0], [1 / 3, 5 / 12, 3 / 12, 0, 1, 0], rtol=1e-15)


def test_allocation_renormalises_a_full_softmax_row():
    # A softmax over T = 6 tokens (CLS + 5 patches); dropping the CLS and renormalising
    # equals the softmax of the patch logits alone (the CLS term cancels).
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(3, 4, 2, 6)) * 3  # (L, H, 2, T)
    full = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
    masks = np.stack([rng.uniform(0, 0.5, 5), rng.uniform(0, 0.5, 5)])  # (2, N)
    masks = np.concatenate([masks, 1 - masks.sum(0, keepdims=True)]).reshape(3, 1, 5)
    patch_only = np.exp(logits[..., 1:]) / np.exp(logits[..., 1:]).sum(-1, keepdims=True)
    expected = np.einsum("lhrn,mn->lhrm", patch_only, masks.reshape(3, 5)).reshape(3, 4, 6)
    got = allocation(full[..., 1:], masks)
    np.testing.assert_allclose(got, expected, rtol=1e-12)
    np.testing.assert_allclose(got[..., :3].sum(-1), 1, rtol=1e-12)  # tt + td + tb = 1 as t + d + b = 1


def test_allocation_rejects_mismatched_shapes():
    with pytest.raises(InputError, match=r"do not fit masks"):
        allocation(np.ones((1, 1, 2, 5)), np.ones((3, 2, 2)))


def test_patch_masks_area_average_and_remainder():
    # 5×7 pixels with patch 2: a 2×3 grid; the last row and column fall outside it (as in the patch conv).
    t = np.zeros((5, 7))
    t[0, 0] = t[1, 1] = 1.0  # patch (0, 0): 2 of 4 pixels
    t[2:4, 4:6] = 0.5  # patch (1, 2): all 4 pixels at 0.5
    t[4, :] = t[:, 6] = 1.0  # outside the grid
    d = np.zeros((5, 7))
    d[0:2, 2] = 1.0  # patch (0, 1): 2 of 4 pixels
    m = patch_masks(t, d, 2)
    np.testing.assert_array_equal(m[0], [[0.5, 0, 0], [0, 0, 0.5]])
    np.testing.assert_array_equal(m[1], [[0, 0.5, 0], [0, 0, 0]])
    np.testing.assert_array_equal(m[2], [[0.5, 0.5, 1], [1, 1, 0.5]])


def test_patch_masks_overlapping_target_and_distractor_clip_the_background():
    # Masks that overlap (annotations of touching objects, or resampling blur) sum to more than 1 on a patch:
    # 1 − t − d goes negative there, and the background must be clipped to 0, never below; elsewhere it is
    # the plain remainder. Patch 2 on 4×6 pixels: a 2×3 grid; expected values are the 2×2 means by hand.
    t = np.zeros((4, 6))
    t[0:2, 0:3] = 1.0  # patch (0, 0) fully, patch (0, 1) half
    t[2:4, 4:6] = 0.75  # patch (1, 2): 0.75
    d = np.zeros((4, 6))
    d[0:2, 1:4] = 1.0  # overlaps t in column 1-2: patch (0, 0) half, patch (0, 1) fully
    d[2:4, 4:6] = 0.5  # patch (1, 2): 0.5, t + d = 1.25
    m = patch_masks(t, d, 2)
    np.testing.assert_array_equal(m[0], [[1.0, 0.5, 0], [0, 0, 0.75]])
    np.testing.assert_array_equal(m[1], [[0.5, 1.0, 0], [0, 0, 0.5]])
    unclipped = 1 - m[0] - m[1]  # [[-0.5, -0.5, 1], [1, 1, -0.25]]
    assert unclipped.min() == -0.5
    np.testing.assert_array_equal(m[2], [[0, 0, 1], [1, 1, 0]])
    assert m[2].min() >= 0 and m[2].max() <= 1
    # fully overlapping masks: t = d = 1 everywhere leaves no background at all (1 − 2 = −1 → 0)
    np.testing.assert_array_equal(patch_masks(np.ones((4, 4)), np.ones((4, 4)), 2)[2], np.zeros((2, 2)))


def test_token_choice_first_in_raster_order():
    m = np.zeros((3, 3, 4))
    m[0, 1, 0] = m[0, 0, 2] = 0.7  # tie: (0, 2) comes first in raster order → flat index 2
    m[0, 2, 3] = 0.6
    m[1, 2, 1] = m[1, 2, 3] = 1.0  # tie within a row: (2, 1) → flat index 9
    np.testing.assert_array_equal(token_choice(m), [2, 9])


def test_layer_statistics_by_hand():
    # Two images, one layer, two heads. Image 0: same = mean(tt, dd) over heads = mean(.2, .4, .6, .8) = .5;
    # image 1: .3. Mean .4, sem = std([.5, .3], ddof=1)/√2 = .1414…/1.414… = .1.
    v = np.zeros((2, 1, 2, 6))
    v[0, 0, :, 0], v[0, 0, :, 4] = [0.2, 0.4], [0.6, 0.8]
    v[1, 0, :, 0], v[1, 0, :, 4] = [0.3, 0.3], [0.3, 0.3]
    mean, sem = layer_statistics(v)["same"]
    np.testing.assert_allclose([mean[0], sem[0]], [0.4, 0.1], rtol=1e-12)
    assert np.isnan(layer_statistics(v[:1])["same"][1][0])  # one image: no s.e.m.


@pytest.mark.parametrize("name", sorted(PATCH_START))
@pytest.mark.numerics
def test_rows_from_the_forward_match_transformers(name):
    # Golden attentions (transformers, eager) of the fixture on its golden pixels: the target and
    # distractor rows, restricted to the 16 patches and renormalised by hand, dotted with random masks.
    golden = np.load(GOLDEN / f"{name}.npz")
    model = open_vision_model(str(MODELS / name))
    tokens = np.array([[5, 10], [15, 0]])
    rng = np.random.default_rng(1)
    t, d = rng.uniform(0, 0.5, (2, 2, 16))  # (B, N) each
    masks = np.stack([t, d, np.clip(1 - t - d, 0, 1)], axis=1).reshape(2, 3, 4, 4)  # (B, 3, gh, gw)
    s = PATCH_START[name]
    got = forward_rows(model, golden["pixel_values"], tokens)  # (B, L, H, 2, N)
    for b in range(2):
        ratios = allocation(got[b], masks[b])  # (L, H, 6)
        for l in range(golden["attentions"].shape[0]):
            for h in range(golden["attentions"].shape[2]):
                for r in range(2):
                    a = golden["attentions"][l, b, h, s + tokens[b, r], s : s + 16].astype(np.float64)
                    expected = [a @ masks[b, k].ravel() / a.sum() for k in range(3)]
                    # ratio = Σ_j a_j m_j / Σ_j a_j, 0 ≤ m_j ≤ 1: off by ≤ Σ_j |Δa_j| / Σ_j a_j, |Δa_j| ≤ FORWARD_ATOL
                    atol = 16 * FORWARD_ATOL / a.sum()
                    np.testing.assert_allclose(ratios[l, h, 3 * r : 3 * r + 3], expected, rtol=0, atol=atol)


@pytest.mark.numerics
def test_forward_rows_equal_the_rows_of_the_full_attention(vit):
    # the forward pass that keeps only two query rows per layer against the full (B, H, T, T) maps
    golden = np.load(GOLDEN / "vit.npz")
    tokens = np.array([[3, 12], [7, 7]])
    full = vit.forward(golden["pixel_values"], attentions=True)
    start, n = full.layout.patches.start, 16
    expected = np.stack(
        [np.stack([full.attentions[l][b][:, start + tokens[b], start : start + n] for l in range(2)]) for b in range(2)]
    )  # (B, L, H, 2, N)
    np.testing.assert_array_equal(forward_rows(vit, golden["pixel_values"], tokens), expected)


# ----------------------------------------------------------------------------- a model with a known attention pattern


def write_known_vit(folder: Path, z: np.ndarray) -> Path:
    """A one-layer hf-vit (D 64, 2 heads of 32, image 32, patch 8, so CLS + 16 patches) whose attention is known.

    The patch conv is zero, so token j (0 = CLS, 1..16 = patches) enters the block as the
    one-hot position vector e_j, and the LayerNorm makes it x_j = c·(e_j − 1/64), c = 8/√(63/64).
    Head 0 (dims 0–31): q = k = 2·x, so q_i·k_j/√32 = 4c²(δ_ij − 2/64 + 32/64²)/√32: the diagonal
    wins by 4c²/√32 ≈ 46 nats, each token attends to itself (off-diagonal mass < 16·e^-46).
    Head 1 (dims 32–63): q = bias u, k = x on dims 0–16, so the logit of key j is
    c·(u_j − Σu/64)/√32: with u = z·√32/c every query's row is softmax(z) over the 17 tokens.
    """
    d, c = 64, 8 / math.sqrt(63 / 64)
    wq, wk, bq = np.zeros((d, d), np.float32), np.zeros((d, d), np.float32), np.zeros(d, np.float32)
    wq[:32, :32] = wk[:32, :32] = 2 * np.eye(32)
    wk[32:49, :17] = np.eye(17)
    bq[32:49] = z * math.sqrt(32) / c
    pos = np.zeros((1, 17, d), np.float32)
    pos[0, np.arange(17), np.arange(17)] = 1.0
    return one_layer_vit(folder, wq=wq, wk=wk, bq=bq, pos=pos, resample=2)


def reference_masks(seed: int, i: int, size: tuple[int, int]) -> np.ndarray:
    """(3, 4, 4) patch masks of scene i of make_o3(seed) at ``size``, from the masks draw_scene paints
    (no JPEG): resized to 32×32 with PIL's bilinear filter on float32, then 8×8 block means."""
    _, target, distractor, _ = draw_scene(np.random.default_rng([seed, i]), size)
    small = [
        np.asarray(Image.fromarray(m.astype(np.float32)).resize((32, 32), Image.Resampling.BILINEAR), np.float64)
        for m in (target, distractor)
    ]
    t, d = (s.reshape(4, 8, 4, 8).mean(axis=(1, 3)).ravel() for s in small)
    return np.stack([t, d, np.clip(1 - t - d, 0, 1)])  # (3, 16)


@pytest.mark.parametrize("dataset, seed, size", [("square", 5, (64, 64)), ("wide", 2, (48, 80))])
@pytest.mark.numerics
def test_known_model_end_to_end(tmp_path, request, dataset, seed, size):
    root = request.getfixturevalue(dataset)
    z = np.random.default_rng(7).normal(size=17) * 2
    z[0] = 5.0  # the CLS takes about half of head 1's softmax, which renormalisation removes
    model = write_known_vit(tmp_path / "known", z)
    summary = run_o3(str(model), root, tmp_path / "out").doc
    rows = read_csv(tmp_path / "out" / "o3.csv")
    assert summary["images_used"] == len(rows) // 2 == 10 + 2 * (dataset == "square") - len(summary["skipped"])
    p = np.exp(z[1:]) / np.exp(z[1:]).sum()  # head 1's row over the patches, renormalised
    checked = 0
    for i in range(12 if dataset == "square" else 10):
        name = f"synth_{i:04d}"
        m = reference_masks(seed, i, size)
        if not (m[0].any() and m[1].any()):
            assert name in [s["image"] for s in summary["skipped"]]
            continue
        tt_tok, dd_tok = np.argmax(m[0]), np.argmax(m[1])
        head0 = [*m[:, tt_tok], *m[:, dd_tok]]  # each token attends to itself only
        head1 = [*(m @ p), *(m @ p)]  # both tokens' rows are p
        got = {int(r["head"]): [float(r[k]) for k in RATIOS] for r in rows if r["image"] == name}
        np.testing.assert_allclose(got[0], head0, atol=1e-6)
        np.testing.assert_allclose(got[1], head1, atol=1e-6)
        checked += 1
    assert checked >= 6


# ----------------------------------------------------------------------------- folders, masks, skips


def test_both_mask_folder_spellings_give_the_same_result(tmp_path, vit, square):
    labels = make_o3(tmp_path / "labels", n=12, seed=5, size=(64, 64), mask_dirs=("targ_labels", "dist_labels"))
    run_o3(vit, square, tmp_path / "a")
    run_o3(vit, labels, tmp_path / "b")
    assert (tmp_path / "a" / "o3.csv").read_bytes() == (tmp_path / "b" / "o3.csv").read_bytes()


def _jpeg(array: np.ndarray, path: Path) -> None:
    Image.fromarray(array.astype(np.uint8), "L").save(path, quality=95)


def test_unusable_images_are_skipped_and_listed(tmp_path, wide):
    root = Path(shutil.copytree(wide, tmp_path / "o3"))
    h, w = 48, 80
    _jpeg(np.zeros((h, w)), root / "targ_images" / "synth_0000.jpg")  # empty target
    edge = np.zeros((h, w))
    edge[20:28, :8] = 255  # only in the 8 leftmost columns
    _jpeg(edge, root / "dist_images" / "synth_0001.jpg")
    _jpeg(np.zeros((10, 10)), root / "targ_images" / "synth_0002.jpg")  # wrong size
    data = (root / "images" / "synth_0003.jpg").read_bytes()
    (root / "images" / "synth_0003.jpg").write_bytes(data[: len(data) // 2])  # truncated JPEG
    (root / "dist_images" / "synth_0004.jpg").unlink()  # no distractor mask
    # dinov2-reg resizes the shortest edge to 36 (48×80 → 36×60) and centre-crops 32×32: columns
    # 14–45 of 60, i.e. original columns ≥ 18.7, so the 8 leftmost columns fall outside.
    summary = run_o3(str(MODELS / "dinov2-reg"), root, tmp_path / "out", max_images=6).doc
    reasons = {s["image"]: s["reason"] for s in summary["skipped"]}
    assert reasons["synth_0000"] == "target mask is empty: no pixel >= 128"
    assert reasons["synth_0001"] == (
        "distractor mask is empty on the 4×4 patch grid (the object lies outside the model's 32×32 input)"
    )
    assert reasons["synth_0002"].startswith(f"{root / 'targ_images' / 'synth_0002.jpg'}: mask is 10x10 but image")
    assert reasons["synth_0003"].startswith("cannot decode the image (")  # the record names the image already
    assert reasons["synth_0004"] == "no mask in dist_images/"
    used = {r["image"] for r in read_csv(tmp_path / "out" / "o3.csv")}
    assert used == {"synth_0005"} and summary["images_used"] == 1  # untouched, and its objects lie inside the crop
    assert summary["dataset"] == {"root": str(root.resolve()), "images_found": 10, "images_selected": 6}


def test_nothing_usable_is_an_error(tmp_path, wide):
    root = Path(shutil.copytree(wide, tmp_path / "o3"))
    for i in range(2):
        _jpeg(np.zeros((48, 80)), root / "targ_images" / f"synth_{i:04d}.jpg")
    with pytest.raises(
        InputError, match=r"none of the 2 selected images is usable \(first: synth_0000: target mask is empty"
    ):
        run_o3(str(MODELS / "vit"), root, tmp_path / "out", max_images=2)


@pytest.mark.parametrize("name", ["vit", "deit", "dinov2-reg", "ijepa"])
def test_fixture_models_on_non_square_images(tmp_path, wide, name):
    summary = run_o3(str(MODELS / name), wide, tmp_path / "out", settings=SweepSettings(batch_size=4)).doc
    rows = read_csv(tmp_path / "out" / "o3.csv")
    v = np.array([[float(r[k]) for k in RATIOS] for r in rows])
    assert len(rows) == summary["images_used"] * 2 * 4 and summary["images_used"] + len(summary["skipped"]) == 10
    assert np.all((v >= 0) & (v <= 1 + 1e-12))
    np.testing.assert_allclose(v[:, :3].sum(1), 1, atol=1e-6)  # tt + td + tb = 1 (t + d + b = 1)
    np.testing.assert_allclose(v[:, 3:].sum(1), 1, atol=1e-6)


# ----------------------------------------------------------------------------- summary, figure, resumption


def test_summary_matches_a_hand_computation_from_the_csv(tmp_path, vit, square):
    summary = workflow.o3(vit, square, tmp_path / "out").doc
    doc = json.loads((tmp_path / "out" / "o3_summary.json").read_text())
    assert doc == json.loads(json.dumps(summary))
    assert doc["schema"] == "qkweights.o3/1" and doc["source"]["model_id"].endswith("models/vit")
    assert doc["protocol"]["input_size"] == [32, 32] and doc["protocol"]["mask_threshold"] == 128
    rows = read_csv(tmp_path / "out" / "o3.csv")
    images = sorted({r["image"] for r in rows})
    assert doc["images_used"] == len(images)
    pairs = {"same": ("tt", "dd"), "different": ("td", "dt"), "background": ("tb", "db")}
    for entry in doc["layers"]:
        assert entry["depth"] == entry["layer"] / 1
        for key, (a, b) in pairs.items():
            per_image = [
                statistics.fmean(
                    float(r[a]) / 2 + float(r[b]) / 2
                    for r in rows
                    if r["image"] == im and int(r["layer"]) == entry["layer"]
                )
                for im in images
            ]
            assert entry[key]["mean"] == pytest.approx(statistics.fmean(per_image), abs=1e-14)
            assert entry[key]["sem"] == pytest.approx(statistics.stdev(per_image) / math.sqrt(len(images)), abs=1e-14)
    with Image.open(tmp_path / "out" / "o3_by_layer.png") as im:
        assert im.format == "PNG" and im.width > 1000


class Interrupt:
    """A progress callback that raises KeyboardInterrupt once ``after`` images are done beyond the start."""

    def __init__(self, after: int):
        self.after, self.calls = after, []

    def __call__(self, done, total):
        self.calls.append((done, total))
        if done >= self.after and len(self.calls) > 1:
            raise KeyboardInterrupt


@pytest.mark.numerics
def test_interrupted_run_resumes_to_the_same_result(tmp_path, vit, square, capsys):
    run_o3(vit, square, tmp_path / "full", settings=SweepSettings(batch_size=3, shard_size=3))
    stop = Interrupt(6)
    with pytest.raises(KeyboardInterrupt):
        run_o3(vit, square, tmp_path / "part", settings=SweepSettings(batch_size=3, shard_size=3), progress=stop)
    assert (tmp_path / "part" / STATE_NAME).is_file()
    assert not (tmp_path / "part" / "o3.csv").exists()
    calls, notes = [], []
    run_o3(
        vit,
        square,
        tmp_path / "part",
        settings=SweepSettings(batch_size=3, shard_size=3),
        progress=lambda d, t: calls.append(d),
        notes=notes.append,
    )
    assert calls == [6, 9, 12]  # resumed after the two saved shards
    assert notes == [f"resuming from {tmp_path / 'part' / STATE_NAME}: 6 of 12 images already done"]
    for name in ("o3.csv", "o3_summary.json"):
        assert (tmp_path / "part" / name).read_bytes() == (tmp_path / "full" / name).read_bytes()
    assert not (tmp_path / "part" / STATE_NAME).exists()


@pytest.mark.numerics
def test_state_of_other_images_is_ignored_and_another_batch_size_resumes(tmp_path, vit, square, capsys):
    with pytest.raises(KeyboardInterrupt):
        run_o3(vit, square, tmp_path / "out", settings=SweepSettings(batch_size=4, shard_size=4), progress=Interrupt(4))
    calls, notes = [], []
    settings = SweepSettings(batch_size=5, shard_size=4)
    run_o3(
        vit,
        square,
        tmp_path / "out",
        settings,
        max_images=10,
        progress=lambda d, t: calls.append(d),
        notes=notes.append,
    )
    assert calls[0] == 0
    assert notes == [
        f"{tmp_path / 'out' / STATE_NAME} is from another run (options, model or images differ); ignoring it "
        "and starting over"
    ]
    run_o3(vit, square, tmp_path / "fresh", SweepSettings(batch_size=5), max_images=10)
    assert (tmp_path / "out" / "o3.csv").read_bytes() == (tmp_path / "fresh" / "o3.csv").read_bytes()
    # the batch size is not an option of the numbers: a state saved at batch 4 resumes at batch 5 (issue 15)
    with pytest.raises(KeyboardInterrupt):
        run_o3(
            vit, square, tmp_path / "part", settings=SweepSettings(batch_size=4, shard_size=4), progress=Interrupt(4)
        )
    calls.clear()
    notes.clear()
    run_o3(vit, square, tmp_path / "part", settings=settings, progress=lambda d, t: calls.append(d), notes=notes.append)
    assert calls[0] == 4 and notes == [f"resuming from {tmp_path / 'part' / STATE_NAME}: 4 of 12 images already done"]
    run_o3(vit, square, tmp_path / "whole", settings=SweepSettings(batch_size=3))
    for name in ("o3.csv", "o3_summary.json"):
        assert (tmp_path / "part" / name).read_bytes() == (tmp_path / "whole" / name).read_bytes()


def test_unreadable_state_is_ignored(tmp_path, vit, square, capsys):
    with pytest.raises(KeyboardInterrupt):
        run_o3(vit, square, tmp_path / "out", settings=SweepSettings(batch_size=4, shard_size=4), progress=Interrupt(4))
    (tmp_path / "out" / STATE_NAME).write_bytes(b"not a zip")
    notes = []
    run_o3(vit, square, tmp_path / "out", settings=SweepSettings(batch_size=4, shard_size=4), notes=notes.append)
    assert len(notes) == 1 and "unreadable" in notes[0]


# ----------------------------------------------------------------------------- command line


def test_cli_make_o3_and_o3(tmp_path, capsys):
    assert main(["make-o3", str(tmp_path / "data"), "--n", "5", "--seed", "4", "--size", "48x80"]) == 0
    with Image.open(tmp_path / "data" / "images" / "synth_0000.jpg") as im:
        assert im.size == (80, 48)
    assert (
        main(
            [
                "o3",
                str(MODELS / "ijepa"),
                str(tmp_path / "data"),
                "--max-images",
                "3",
                "--out",
                str(tmp_path / "out"),
                "--no-plots",
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    assert "layer  l/(L-1)" in out and "wrote o3.csv, o3_summary.json to" in out
    doc = json.loads((tmp_path / "out" / "o3_summary.json").read_text())
    assert doc["images_used"] + len(doc["skipped"]) == 3
    assert main(["make-o3", str(tmp_path / "bad"), "--size", "48x"]) == 2
    assert main(["o3", str(MODELS / "vit"), str(tmp_path / "data"), "--batch-size", "0"]) == 2


def test_a_broken_link_is_skipped_and_listed(tmp_path, vit, square):
    import shutil

    root = tmp_path / "o3"
    shutil.copytree(square, root)
    for sub in ("targ_images", "dist_images"):
        shutil.copy(root / sub / "synth_0000.jpg", root / sub / "broken.jpg")
    (root / "images" / "broken.jpg").symlink_to(tmp_path / "nowhere.jpg")
    summary = run_o3(vit, root, tmp_path / "out").doc
    assert [s["image"] for s in summary["skipped"]] == ["broken"]
    assert "no such image file" in summary["skipped"][0]["reason"]
