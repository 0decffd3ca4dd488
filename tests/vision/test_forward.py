"""The numpy forward pass (qkweights.vision.forward, qkweights.vision.model) against independent references.

References:
- goldens tests/fixtures/golden/<name>.npz: transformers 5.24 outputs (eval, eager attention) of the
  tiny fixtures, written by tests/fixtures/make_fixtures.py (timm / open_clip fixtures: the same
  weights renamed, checked there against an independent torch forward); *_interp keys: ViT with
  interpolate_pos_encoding=True and DINOv2 at 48×40 pixels;
- method.md §1: the bilinear logits x_iᵀW_qᵀW_k x_j rebuilt from the SVD modes of
  qkweights.weights.qk.qk_svd, plus the bias terms, scaled and soft-maxed in float64;
- closed forms evaluated in float64 (erf from scipy, LayerNorm, Keys' bicubic kernel written out
  per output pixel) and PIL's float resize (its bicubic filter, a = −0.5, is the one torch's
  antialiased resize copies);
- optional: torch / transformers live, when installed.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import scipy.special
from conftest import FIXTURES, FORWARD_ATOL, GOLDEN, MODELS, attention_atol
from PIL import Image

from qkweights.errors import InputError
from qkweights.vision.forward import Keep, Norm, activation_, forward, gelu_erf, layer_norm
from qkweights.vision.model import open_vision_model
from qkweights.vision.positions import resize_bicubic
from qkweights.weights.qk import qk_svd

GOLDEN_NAMES = sorted(p.stem for p in GOLDEN.glob("*.npz"))
TEXT_FIXTURES = ("bert", "roberta-mlm")
LOW_PRECISION = ("vit-bf16", "vit-f16")  # profile fixtures: no golden (their weights are rounded copies)
ATOL = FORWARD_ATOL  # float32 forward vs transformers' float32 forward (conftest.py derives it)


def golden(name: str) -> dict[str, np.ndarray]:
    with np.load(GOLDEN / f"{name}.npz") as z:
        return {k: z[k] for k in z.files}


@pytest.fixture(scope="module")
def models():
    cache = {}

    def get(name):
        if name not in cache:
            cache[name] = open_vision_model(str(MODELS / name))
        return cache[name]

    return get


def test_every_vision_fixture_has_a_golden():
    vision = sorted(p.name for p in MODELS.iterdir() if p.name not in TEXT_FIXTURES + LOW_PRECISION)
    assert vision == GOLDEN_NAMES


@pytest.mark.parametrize("name", GOLDEN_NAMES)
@pytest.mark.numerics
def test_matches_transformers_golden(name, models):
    g, model = golden(name), models(name)
    out = model.forward(g["pixel_values"], attentions=True)
    n_layers = g["attentions"].shape[0]
    np.testing.assert_allclose(np.stack(out.hidden_states), g["hidden_states"], rtol=0, atol=ATOL)
    np.testing.assert_allclose(
        np.stack([out.attentions[l] for l in range(n_layers)]), g["attentions"], rtol=0, atol=ATOL
    )
    np.testing.assert_allclose(out.last_hidden_state, g["last_hidden_state"], rtol=0, atol=ATOL)
    t = out.attentions[0].shape[-1]  # each p rounded twice (exp, the divide), then a T-term float32 sum: (T + 2)·u
    np.testing.assert_allclose(out.attentions[0].sum(-1), 1, rtol=0, atol=(t + 2) * 2.0**-24)


@pytest.mark.parametrize("name", [n for n in GOLDEN_NAMES if "pixel_values_interp" in golden(n)])
@pytest.mark.numerics
def test_interpolated_positions_match_transformers(name, models):
    g, model = golden(name), models(name)
    assert g["pixel_values_interp"].shape[2:] == (48, 40)  # a 6×5 grid from the stored 4×4
    out = model.forward(g["pixel_values_interp"], attentions=True)
    assert out.layout.grid == (6, 5)
    np.testing.assert_allclose(np.stack(out.hidden_states), g["hidden_states_interp"], rtol=0, atol=ATOL)
    np.testing.assert_allclose(np.stack(list(out.attentions.values())), g["attentions_interp"], rtol=0, atol=ATOL)
    np.testing.assert_allclose(out.last_hidden_state, g["last_hidden_state_interp"], rtol=0, atol=ATOL)


@pytest.mark.parametrize("name", LOW_PRECISION)
def test_low_precision_checkpoints_run_in_float32(name, models):
    out = models(name).forward(golden("vit")["pixel_values"])
    assert out.last_hidden_state.dtype == np.float32 and out.last_hidden_state.shape == (2, 17, 32)
    assert np.isfinite(out.last_hidden_state).all()


@pytest.mark.parametrize(
    "name, cls, dist, registers, patches",
    [
        ("vit", 0, None, (), slice(1, 17)),
        ("deit", 0, 1, (), slice(2, 18)),
        ("dinov2-reg", 0, None, (1, 2, 3, 4), slice(5, 21)),  # registers after CLS (checkpoints.md)
        ("timm-vit-reg", 0, None, (1, 2, 3, 4), slice(5, 21)),
        ("ijepa", None, None, (), slice(0, 16)),  # no CLS token
    ],
)
def test_token_layout(name, cls, dist, registers, patches, models):
    lay = models(name).forward(golden("vit")["pixel_values"][:1]).layout
    assert (lay.cls, lay.dist, lay.registers, lay.patches, lay.grid) == (cls, dist, registers, patches, (4, 4))
    assert lay.special == sorted([i for i in (cls, dist) if i is not None] + list(registers))
    assert lay.n_tokens == patches.stop


def test_position_table_coverage(models):
    # timm-vit-reg was written with no_embed_class: 16 position rows, patches only (make_fixtures.py)
    emb = models("timm-vit-reg").weights.embeddings
    assert emb.position.shape == (16, 32) and emb.position_tokens == ("patches",)
    # DINOv2 with registers: 1 + 16 rows covering CLS and patches; registers get none (checkpoints.md)
    emb = models("dinov2-reg").weights.embeddings
    assert emb.position.shape == (17, 32) and emb.position_tokens == ("cls", "patches")
    assert models("deit").weights.embeddings.position_tokens == ("cls", "dist", "patches")


@pytest.mark.numerics
def test_position_table_covering_cls_and_registers(tmp_path, models):
    """timm without no_embed_class: pos_embed rows [CLS | registers | patches] (timm _pos_embed).

    Moving the patch-only table of timm-vit-reg into a full table, with rows p for CLS and the
    registers subtracted from those tokens, must leave every output unchanged.
    """
    from safetensors.numpy import load_file, save_file

    src = MODELS / "timm-vit-reg"
    t = load_file(str(src / "model.safetensors"))
    p_special = np.random.default_rng(10).standard_normal((1, 5, 32)).astype(np.float32)  # CLS + 4 registers
    t["pos_embed"] = np.concatenate([p_special, t["pos_embed"]], 1)  # (1, 21, 32)
    t["cls_token"] = t["cls_token"] - p_special[:, :1]
    t["reg_token"] = t["reg_token"] - p_special[:, 1:]
    save_file(t, str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_bytes((src / "config.json").read_bytes())
    moved = open_vision_model(str(tmp_path))
    assert moved.weights.embeddings.position_tokens == ("cls", "registers", "patches")
    px = golden("timm-vit-reg")["pixel_values"]
    np.testing.assert_allclose(
        moved.forward(px).last_hidden_state, models("timm-vit-reg").forward(px).last_hidden_state, rtol=0, atol=ATOL
    )  # (c − p) + p is c up to one rounding of each token, which the blocks carry as they carry their own (ATOL)


@pytest.mark.parametrize(
    "name, layer, head", [("vit", 1, 2), ("open-clip", 0, 3), ("dinov2-reg", 1, 0), ("deit", 0, 1)]
)
@pytest.mark.numerics
def test_svd_modes_reproduce_the_attention(name, layer, head, models):
    """method.md §1: projections on the profile's modes give the logits, and with the biases the attention."""
    model = models(name)
    out = model.forward(golden(name)["pixel_values"], attentions=True, layers=[layer])
    x = out.attention_inputs[layer].astype(np.float64)  # (B, T, D), the LayerNorm output feeding W_q/W_k
    qk = model.checkpoint.qk(layer)
    wq, wk, bq, bk = qk.wq[head], qk.wk[head], qk.bq[head], qk.bk[head]  # (K, D), (K,)
    u, s, v = qk_svd(wq, wk)  # (D, K), (K,), (D, K)
    bilinear = np.einsum("bin,n,bjn->bij", x @ u, s, x @ v)  # Σ_n (x_i·u_n) σ_n (v_n·x_j)
    direct = np.einsum("bid,de,bje->bij", x, wq.T @ wk, x)  # x_iᵀ W_qᵀ W_k x_j
    np.testing.assert_allclose(bilinear, direct, rtol=0, atol=1e-10 * np.abs(direct).max())
    terms = (
        (x @ (wk.T @ bq))[:, None, :] + (x @ (wq.T @ bk))[:, :, None] + bq @ bk
    )  # b_qᵀW_k x_j + x_iᵀW_qᵀb_k + b_q·b_k
    logits = (bilinear + terms) / math.sqrt(wq.shape[0])
    probs = np.exp(logits - logits.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    assert (np.abs(out.attentions[layer][:, head] - probs) <= attention_atol(x, wq, wk, bq, bk, probs)).all()
    # the key-salience term b_qᵀW_k x_j is not constant along a row: without it the attention changes
    if np.abs(bq).max() > 0:
        assert np.ptp(terms[:, 0, :]) > 1e-3


def test_layers_keep_only_what_was_asked(models):
    model, px = models("vit-h3"), golden("vit-h3")["pixel_values"]
    full = model.forward(px, attentions=True)
    some = model.forward(px, attentions=True, layers=[1])
    assert sorted(some.attention_inputs) == [1] and sorted(some.attentions) == [1]
    assert some.hidden_states[0] is None and some.hidden_states[1] is not None and some.hidden_states[2] is not None
    np.testing.assert_array_equal(some.attentions[1], full.attentions[1])
    np.testing.assert_array_equal(some.attention_inputs[1], full.attention_inputs[1])
    np.testing.assert_array_equal(some.last_hidden_state, full.last_hidden_state)
    assert model.forward(px).attentions == {}


@pytest.mark.parametrize("name", ["dinov2-reg", "timm-beit", "dinov2-swiglu", "clip"])
@pytest.mark.parametrize(
    "keep",
    [
        Keep(hidden=False, inputs=False),
        Keep(attentions=True, layers=[0], truncate=True),
        Keep(layers=[0], truncate=True, hidden=False),  # the deepest block stops after its attention input
        Keep(layers=[1], truncate=True),  # the deepest asked is the last: it stops there too
        Keep(attentions=True, layers=[1], hidden=False),
        Keep(layers=[0], inputs=False),
    ],
)
def test_keeping_less_gives_the_same_arrays(name, keep, models):
    # The residual stream runs in the pass's own scratch unless kept, straight in the output array if kept, and a
    # truncated pass computes of its deepest block only what is kept: whichever, every array kept equals the full
    # pass's, bit for bit (layer scale, relative position bias, SwiGLU and the post norm covered by the models).
    model = models(name)
    px = np.concatenate([golden(name)["pixel_values"][:1]] * 3)  # (3, 3, H, W)
    px[1] += 0.5
    full = forward(model.weights, px, Keep(attentions=True), threads=2)
    some = forward(model.weights, px, keep, threads=2)
    depth = max(keep.layers) + 1 if keep.truncate else len(model.weights.blocks)
    layers = range(depth) if keep.layers is None else keep.layers
    assert len(some.hidden_states) == depth + (not keep.truncate)
    for l in range(depth):
        kept = keep.hidden and l in layers
        assert (some.hidden_states[l] is not None) == kept
        if kept:
            np.testing.assert_array_equal(some.hidden_states[l], full.hidden_states[l])
    assert sorted(some.attention_inputs) == (sorted(layers) if keep.inputs else [])
    assert sorted(some.attentions) == (sorted(layers) if keep.attentions else [])
    for l in some.attention_inputs:
        np.testing.assert_array_equal(some.attention_inputs[l], full.attention_inputs[l])
    for l in some.attentions:
        np.testing.assert_array_equal(some.attentions[l], full.attentions[l])
    if keep.truncate:
        assert some.last_hidden_state is None and some.pooled is None
    else:
        np.testing.assert_array_equal(some.hidden_states[-1], full.hidden_states[-1])
        np.testing.assert_array_equal(some.last_hidden_state, full.last_hidden_state)
        assert (some.pooled is None) == (full.pooled is None)
        if some.pooled is not None:
            np.testing.assert_array_equal(some.pooled, full.pooled)


def test_attention_rows_are_the_rows_of_the_full_attention(models):
    model = models("dinov2-reg")
    px = np.concatenate([golden("dinov2-reg")["pixel_values"][:1]] * 2)  # (2, 3, H, W)
    px[1] *= -1
    rows = np.array([[0, 5, 5], [7, 1, 2]])
    full = forward(model.weights, px, Keep(attentions=True), threads=2)
    some = forward(model.weights, px, Keep(attentions=True, layers=[1]), rows=rows, threads=2)
    assert some.attentions[1].shape == (2, model.weights.heads, 3, full.attentions[1].shape[-1])
    for b in range(2):
        np.testing.assert_array_equal(some.attentions[1][b], full.attentions[1][b][:, rows[b]])


def _outputs(out) -> list[np.ndarray]:
    """Every array a ForwardOutput holds, in a fixed order."""
    arrays = [h for h in out.hidden_states if h is not None] + [out.last_hidden_state, out.pooled]
    arrays += [out.attention_inputs[l] for l in sorted(out.attention_inputs)]
    return [a for a in arrays + [out.attentions[l] for l in sorted(out.attentions)] if a is not None]


@pytest.mark.numerics
@pytest.mark.parametrize("name", GOLDEN_NAMES)
def test_an_image_has_the_same_outputs_whatever_its_batch_and_threads(name, models):
    # One arithmetic per image (issue 15): bit-identical by construction, since every image runs alone;
    # before, a batched (B·T, D) @ W rounded a row by its place among the BLAS kernel's tiles (OpenBLAS Haswell).
    from threadpoolctl import threadpool_limits

    model = models(name)
    px = golden(name)["pixel_values"][:1]  # (1, 3, H, W)
    rng = np.random.default_rng(5)
    images = px + rng.standard_normal((6, *px.shape[1:])).astype(np.float32)  # (6, 3, H, W), distinct
    alone = [_outputs(forward(model.weights, images[i : i + 1], Keep(attentions=True), threads=1)) for i in range(6)]
    order = [4, 0, 5, 1, 3, 2]
    for blas in (1, 2):
        with threadpool_limits(blas, user_api="blas"):
            for threads in (None, 1, 2, 3):
                batch = _outputs(forward(model.weights, images[order], Keep(attentions=True), threads=threads))
                for j, i in enumerate(order):  # image i sits at position j of the batch
                    for got, want in zip(batch, alone[i], strict=True):
                        np.testing.assert_array_equal(got[j], want[0])


@pytest.mark.numerics
def test_copies_of_an_image_have_identical_outputs(models):
    model = models("dinov2-reg")
    px = np.repeat(np.random.default_rng(2).standard_normal((1, 3, 32, 32)).astype(np.float32), 7, axis=0)
    for threads in (1, 2, 3):
        out = forward(model.weights, px, Keep(attentions=True, layers=[0]), threads=threads)
        for a in _outputs(out):
            assert (a == a[:1]).all()  # every copy exactly as the first


@pytest.mark.numerics
def test_clip_pooled_is_the_post_norm_of_cls(models):
    model = models("clip")
    out = model.forward(golden("clip")["pixel_values"])
    w, b = model.checkpoint.module("embeddings", "post_norm")
    cls = out.last_hidden_state[:, 0].astype(np.float64)
    mean, var = cls.mean(-1, keepdims=True), cls.var(-1, keepdims=True)
    want = (cls - mean) / np.sqrt(var + 1e-5) * w + b  # CLIP's post_layernorm, eps from vision_config
    # float32 LayerNorm of D = 32 values: its mean and variance sums are off by ≲ √D·u relative (Higham & Mary), the
    # subtraction, the reciprocal square root and the affine map by a few u more, all relative to the output's size
    np.testing.assert_allclose(out.pooled, want, rtol=0, atol=2 * (math.sqrt(32) + 4) * 2.0**-24 * np.abs(want).max())
    assert models("vit").forward(golden("vit")["pixel_values"]).pooled is None


def test_preprocess_gives_model_input(models):
    model = models("vit")
    image = np.random.default_rng(3).integers(0, 256, (40, 50, 3), dtype=np.uint8)
    assert model.preprocess(image).shape == (1, 3, 32, 32)  # preprocessor_config.json: resize to 32×32
    px = model.preprocess([image, image], size=(48, 40))
    assert px.shape == (2, 3, 48, 40) and px.dtype == np.float32
    assert model.forward(px).layout.grid == (6, 5)


@pytest.mark.parametrize(
    "name, origin, crop, mean",
    [
        ("dinov2", "preprocessor_config.json", (32, 32), (0.485, 0.456, 0.406)),  # the fixture's BiT processor config
        ("timm-vit", "config.json pretrained_cfg", (32, 32), (0.485, 0.456, 0.406)),
        ("open-clip", "open_clip_config.json preprocess_cfg", (32, 32), (0.48145466, 0.4578275, 0.40821073)),
    ],
)
def test_preprocessing_comes_from_the_spec_format(name, origin, crop, mean, models):
    model = models(name)
    assert model.preprocessing_origin == origin
    assert model.preprocessing.crop == crop and model.preprocessing.mean == pytest.approx(mean)


def test_preprocessing_defaults_without_a_config(tmp_path):
    for f in ("config.json", "model.safetensors"):
        (tmp_path / f).write_bytes((MODELS / "vit" / f).read_bytes())
    model = open_vision_model(str(tmp_path))
    assert model.preprocessing_origin == "ViT processor defaults at 32×32 (no preprocessor_config.json)"
    assert model.preprocessing.size == (32, 32) and model.preprocessing.mean == (0.5, 0.5, 0.5)
    assert model.notes == (
        (
            "no preprocessing config beside the weights: images are preprocessed with ViT processor defaults at "
            "32×32 (no preprocessor_config.json); add the model's preprocessing config if it was trained otherwise"
        ),
    )
    assert open_vision_model(str(MODELS / "vit")).notes == ()


def test_maps_says_once_that_preprocessing_defaults_are_used(tmp_path, capsys):
    from qkweights.cli import main

    for f in ("config.json", "model.safetensors"):
        (tmp_path / f).write_bytes((MODELS / "vit" / f).read_bytes())
    image = Path(__file__).parents[2] / "qkweights" / "demo_model" / "demo.jpg"
    assert main(["maps", str(tmp_path), str(image), "--layer", "0", "--head", "0", "--out", str(tmp_path / "o")]) == 0
    err = capsys.readouterr().err
    assert err.startswith("qkweights: note: no preprocessing config beside the weights") and err.count("\n") == 1


def test_inspect_reports_the_patch_size_the_forward_pass_uses(tmp_path, capsys):
    from qkweights.cli import main

    for f in ("config.json", "model.safetensors", "preprocessor_config.json"):
        (tmp_path / f).write_bytes((MODELS / "vit" / f).read_bytes())
    cfg = (tmp_path / "config.json").read_text().replace('"patch_size": 8', '"patch_size": 16')
    (tmp_path / "config.json").write_text(cfg)
    assert main(["inspect", str(tmp_path)]) == 0
    out, err = capsys.readouterr()
    assert "2 layers, 4 heads × 8 = width 32, patch 8, image 32×32" in out
    assert err == (
        "qkweights: note: config.json says patch_size 16, but the patch embedding's kernel is 8×8; the forward "
        "pass uses 8\n"
    )
    assert open_vision_model(str(tmp_path)).notes == (err.removeprefix("qkweights: note: ").strip(),)


# ---------------------------------------------------------------------------- errors


@pytest.mark.parametrize("name", TEXT_FIXTURES)
def test_text_models_have_no_forward_pass(name):
    with pytest.raises(
        InputError, match=r"is a text model: weights-only analysis \(profile\) is available, not the forward pass"
    ):
        open_vision_model(str(MODELS / name))


@pytest.mark.parametrize(
    "pixels, message",
    [
        (
            np.zeros((2, 32, 32), np.float32),
            r"pixel_values has shape \(2, 32, 32\); expected \(batch, 3, height, width\)",
        ),
        (np.zeros((1, 3, 7, 32), np.float32), r"at least 8×8 pixels"),
        (np.full((1, 3, 32, 32), np.nan, np.float32), r"NaN or infinite"),
    ],
)
def test_bad_pixels(pixels, message, models):
    with pytest.raises(InputError, match=message):
        models("vit").forward(pixels)


def test_layer_out_of_range(models):
    with pytest.raises(InputError, match=r"layer 2 is out of range: the model has 2 layers \(0–1\)"):
        models("vit").forward(golden("vit")["pixel_values"], layers=[0, 2])


# ---------------------------------------------------------------------------- elementwise math


def test_gelu_matches_erf():
    x = np.linspace(-12, 12, 400_001, dtype=np.float32)
    exact = x.astype(np.float64) * 0.5 * (1 + scipy.special.erf(x.astype(np.float64) / math.sqrt(2)))
    got = gelu_erf(x.copy())
    # Abramowitz & Stegun 7.1.26 is within 1.5e-7 of erf, so within 0.75e-7·|x| of GELU; plus float32 rounding
    err = np.abs(got - exact)
    assert (err <= 1e-7 + 1.5e-7 * np.abs(x)).all(), err.max()
    assert gelu_erf(np.float32([-30, 0, 30])).tolist() == [0, 0, 30]  # no overflow, exact at the tails


@pytest.mark.parametrize(
    "act, formula",
    [
        ("quick_gelu", lambda x: x / (1 + np.exp(-1.702 * x))),  # x·sigmoid(1.702x)
        ("gelu_tanh", lambda x: 0.5 * x * (1 + np.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x**3)))),
        ("relu", lambda x: np.maximum(x, 0)),
    ],
)
def test_activations(act, formula):
    x = np.linspace(-9, 9, 10_001, dtype=np.float32)
    np.testing.assert_allclose(activation_(x.copy(), act), formula(x.astype(np.float64)), rtol=2e-6, atol=1e-6)


def test_swiglu_gates_with_the_first_half():
    g, u = np.float32([[-2.0, 0.5, 3.0]]), np.float32([[1.5, -1.0, 2.0]])
    want = g / (1 + np.exp(-g.astype(np.float64))) * u  # silu(gate)·up, DINOv2 SwiGLUFFN
    np.testing.assert_allclose(activation_(np.concatenate([g, u], 1), "swiglu"), want, rtol=1e-6)


def test_layer_norm_float64_reference():
    rng = np.random.default_rng(4)
    x = (3 + 2 * rng.standard_normal((5, 7, 96))).astype(np.float32)
    norm = Norm(rng.standard_normal(96).astype(np.float32), rng.standard_normal(96).astype(np.float32))
    x64 = x.astype(np.float64)
    want = (x64 - x64.mean(-1, keepdims=True)) / np.sqrt(x64.var(-1, keepdims=True) + 1e-6) * norm.weight + norm.bias
    np.testing.assert_allclose(layer_norm(x, norm, 1e-6), want, rtol=0, atol=2e-5)


# ---------------------------------------------------------------------------- position resampling


def keys_bicubic_reference(grid: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """torch's bicubic (align_corners=False) written out per output pixel in float64.

    Source coordinate (i + ½)·in/out − ½; taps floor−1 … floor+2 clamped to the border;
    Keys' kernel with A = −0.75 (aten UpSample.h cubic_convolution1/2).
    """

    def kernel(t):
        t, a = abs(t), -0.75
        return (
            ((a + 2) * t - (a + 3)) * t * t + 1
            if t <= 1
            else ((a * t - 5 * a) * t + 8 * a) * t - 4 * a
            if t < 2
            else 0.0
        )

    def taps(n_in, n_out, i):
        src = (i + 0.5) * n_in / n_out - 0.5
        f = math.floor(src)
        return [(min(max(f + j, 0), n_in - 1), kernel(src - (f + j))) for j in (-1, 0, 1, 2)]

    (gh, gw), (oh, ow) = grid.shape[:2], size
    out = np.zeros((oh, ow) + grid.shape[2:])
    for y in range(oh):
        for x in range(ow):
            out[y, x] = sum(wy * wx * grid[iy, ix] for iy, wy in taps(gh, oh, y) for ix, wx in taps(gw, ow, x))
    return out


@pytest.mark.parametrize("grid, size", [((4, 4), (6, 5)), ((4, 4), (3, 3)), ((3, 5), (10, 7)), ((14, 14), (16, 12))])
def test_bicubic_matches_keys_kernel(grid, size):
    # torch (and resize_bicubic) compute the source coordinate in float32: weights move by ~1e-6
    g = np.random.default_rng(5).standard_normal(grid + (3,)).astype(np.float32)
    np.testing.assert_allclose(
        resize_bicubic(g, size), keys_bicubic_reference(g.astype(np.float64), size), rtol=0, atol=5e-6
    )


@pytest.mark.parametrize(
    "grid, size", [((4, 4), (6, 5)), ((16, 16), (24, 20)), ((37, 37), (14, 14)), ((3, 5), (10, 7))]
)
def test_antialiased_bicubic_matches_pil(grid, size):
    g = np.random.default_rng(6).standard_normal(grid).astype(np.float32)
    pil = np.asarray(Image.fromarray(g, mode="F").resize(size[::-1], Image.BICUBIC))  # PIL's a = −0.5 filter
    np.testing.assert_allclose(resize_bicubic(g[:, :, None], size, antialias=True)[:, :, 0], pil, rtol=0, atol=5e-6)


INTERP_GOLDEN = FIXTURES / "interp_golden"


def interp_golden() -> dict[str, np.ndarray]:
    """timm's resample_abs_pos_embed (torch bicubic, antialias) of the timm fixtures' pos_embed:
    make_interp_golden.py."""
    with np.load(INTERP_GOLDEN / "timm_pos_embed.npz") as z:
        return {k: z[k] for k in z.files}


def timm_position_table(model, grid):
    """The position rows qkweights adds at a patch grid, in pos_embed order: (P + gh·gw, D)."""
    from qkweights.vision.forward import position_rows

    emb = model.weights.embeddings
    rows = position_rows(emb, grid)
    return np.concatenate([rows[kind] for kind in emb.position_tokens])


@pytest.mark.parametrize("key", sorted(interp_golden()))
def test_timm_position_interpolation_matches_the_antialiased_golden(key, models):
    name, grid = key.rsplit("_", 1)
    grid = tuple(int(n) for n in grid.split("x"))
    want = interp_golden()[key]
    np.testing.assert_allclose(timm_position_table(models(name), grid), want, rtol=0, atol=1e-6)
    if grid[0] < 4 or grid[1] < 4:  # shrinking a side: without antialias the rows differ, so the golden can tell
        emb = models(name).weights.embeddings
        prefix = len(emb.position) - 16
        plain = resize_bicubic(emb.position[prefix:].reshape(4, 4, -1), grid).reshape(-1, emb.position.shape[1])
        assert np.abs(plain - want[prefix:]).max() > 1e-2


def test_timm_interpolation_golden_is_what_torch_computes():
    pytest.importorskip("torch")
    import importlib.util

    spec = importlib.util.spec_from_file_location("make_interp_golden", INTERP_GOLDEN / "make_interp_golden.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    fresh, stored = module.golden(), interp_golden()
    assert sorted(fresh) == sorted(stored)
    for key in fresh:
        np.testing.assert_array_equal(fresh[key], stored[key])


def test_same_grid_is_untouched():
    g = np.random.default_rng(7).standard_normal((4, 5, 3)).astype(np.float32)
    np.testing.assert_array_equal(resize_bicubic(g, (4, 5)), g)
    np.testing.assert_array_equal(resize_bicubic(g, (4, 5), antialias=True), g)


# ---------------------------------------------------------------------------- optional: torch and transformers live


@pytest.mark.parametrize("antialias", [False, True])
def test_resize_matches_torch_interpolate(antialias):
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(8)
    for grid, size in [
        ((4, 4), (6, 5)),
        ((16, 16), (24, 24)),
        ((37, 37), (64, 80)),
        ((14, 14), (6, 5)),
        ((3, 5), (14, 14)),
    ]:
        g = rng.standard_normal(grid + (8,)).astype(np.float32)
        t = torch.nn.functional.interpolate(
            torch.from_numpy(g).permute(2, 0, 1)[None],
            size=size,
            mode="bicubic",
            align_corners=False,
            antialias=antialias,
        )
        np.testing.assert_allclose(
            resize_bicubic(g, size, antialias=antialias), t[0].permute(1, 2, 0).numpy(), rtol=0, atol=1e-6
        )


def test_gelu_matches_torch():
    torch = pytest.importorskip("torch")
    x = np.linspace(-10, 10, 200_001, dtype=np.float32)
    want = torch.nn.functional.gelu(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(gelu_erf(x.copy()), want, rtol=0, atol=1.5e-6)  # torch's own error is ~1.2e-6 at |x|≈10


LIVE = [
    ("vit", "ViTModel", dict(interpolate_pos_encoding=True)),
    ("deit", "DeiTModel", dict(interpolate_pos_encoding=True)),
    ("clip-vision", "CLIPVisionModel", dict(interpolate_pos_encoding=True)),
    ("clip-vision-bare", "CLIPVisionModel", dict(interpolate_pos_encoding=True)),
    ("deit-model", "DeiTModel", dict(interpolate_pos_encoding=True)),
    ("dinov2", "Dinov2Model", {}),
    ("dinov2-swiglu", "Dinov2Model", {}),
    ("dinov2-reg", "Dinov2WithRegistersModel", {}),
    ("ijepa", "IJepaModel", dict(interpolate_pos_encoding=True)),
]


@pytest.mark.parametrize("name, cls, kwargs", LIVE)
def test_live_transformers_at_another_size(name, cls, kwargs, models):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    ref = getattr(transformers, cls).from_pretrained(str(MODELS / name), attn_implementation="eager").eval()
    px = np.random.default_rng(9).standard_normal((2, 3, 40, 56)).astype(np.float32)  # 5×7 patches
    with torch.inference_mode():
        want = ref(pixel_values=torch.from_numpy(px), output_hidden_states=True, output_attentions=True, **kwargs)
    out = models(name).forward(px, attentions=True)
    np.testing.assert_allclose(
        np.stack(out.hidden_states), np.stack([h.numpy() for h in want.hidden_states]), rtol=0, atol=ATOL
    )
    np.testing.assert_allclose(
        np.stack(list(out.attentions.values())), np.stack([a.numpy() for a in want.attentions]), rtol=0, atol=ATOL
    )
    np.testing.assert_allclose(out.last_hidden_state, want.last_hidden_state.numpy(), rtol=0, atol=ATOL)
    if out.pooled is not None:
        np.testing.assert_allclose(out.pooled, want.pooler_output.numpy(), rtol=0, atol=ATOL)
