"""Beyond the paper: symmetric_fraction, the value-output circuit and the LayerNorm/bias fold.

Every statistic is held against dense D×D computations (numpy's full SVD of the D×D products)
from an independent reading of the fixture files (tensor names as transformers / timm /
open_clip / the research code write them, not model_specs/), and the fold against the
attention probabilities of the forward pass.
"""

import dataclasses
import math

import numpy as np
import pytest
from conftest import MODELS, VISION_FIXTURES, edited_fixture, flip_value_head
from safetensors.numpy import load_file

import qkweights
import qkweights.errors
from qkweights.specs.load import open_model
from qkweights.vision.positions import relative_position_bias
from qkweights.weights.compute import compute_profile
from qkweights.weights.fold import fold_description, folded_modes, normalised_tokens
from qkweights.weights.load import load_profile
from qkweights.weights.qk import head_stats, ov_svd, qk_svd, symmetric_fraction, symmetric_null

PICKLES = MODELS.parent / "pickles"


def _hf(prefix="", norm="layernorm_before"):
    a = prefix + "encoder.layer.{i}.attention."
    return {
        "q": a + "attention.query",
        "k": a + "attention.key",
        "v": a + "attention.value",
        "out": a + "output.dense",
        "norm": prefix + "encoder.layer.{i}." + norm,
    }


_CLIP = {
    "q": "vision_model.encoder.layers.{i}.self_attn.q_proj",
    "k": "vision_model.encoder.layers.{i}.self_attn.k_proj",
    "v": "vision_model.encoder.layers.{i}.self_attn.v_proj",
    "out": "vision_model.encoder.layers.{i}.self_attn.out_proj",
    "norm": "vision_model.encoder.layers.{i}.layer_norm1",
}
_BERT = {
    "q": "encoder.layer.{i}.attention.self.query",
    "k": "encoder.layer.{i}.attention.self.key",
    "v": "encoder.layer.{i}.attention.self.value",
    "out": "encoder.layer.{i}.attention.output.dense",
    "norm": None,
}
_TIMM = {"qkv": "blocks.{i}.attn.qkv", "out": "blocks.{i}.attn.proj", "norm": "blocks.{i}.norm1"}
# Independent of model_specs/: tensor names per fixture (tests/fixtures/make_fixtures.py, make_pickle_models.py,
# make_simmim_fixtures.py); "norm": the LayerNorm feeding the attention (None: post-norm BERT), "heads".
REFERENCE = {
    "vit": _hf(),
    "vit-bf16": _hf(),
    "vit-f16": _hf(),
    "vit-h3": {**_hf(), "heads": 3},
    "vit-cls": _hf("vit."),
    "deit": _hf("deit."),
    "ijepa": _hf(),
    "dinov2": _hf(norm="norm1"),
    "dinov2-reg": _hf(norm="norm1"),
    "dinov2-swiglu": _hf(norm="norm1"),
    "clip": _CLIP,
    "clip-vision": _CLIP,
    "bert": _BERT,
    "roberta-mlm": {k: v and "roberta." + v for k, v in _BERT.items()},
    "timm-vit": {**_TIMM, "heads": 3},
    "timm-vit-reg": _TIMM,
    "deit-h3": {**_hf("deit."), "heads": 3},
    "timm-deit": {**_TIMM, "heads": 3},
    "timm-beit": {
        "qkv": {"weight": "blocks.{i}.attn.qkv.weight", "bias": "(none)"},
        "q_bias": "blocks.{i}.attn.q_bias",
        "out": "blocks.{i}.attn.proj",
        "norm": "blocks.{i}.norm1",
    },
    "open-clip": {
        "qkv": {
            "weight": "visual.transformer.resblocks.{i}.attn.in_proj_weight",
            "bias": "visual.transformer.resblocks.{i}.attn.in_proj_bias",
        },
        "out": "visual.transformer.resblocks.{i}.attn.out_proj",
        "norm": "visual.transformer.resblocks.{i}.ln_1",
    },
}
# PyTorch research fixtures, read with torch.load: (path, part, key prefix, names, heads)
PICKLE_REFERENCE = {
    "simmim-pretrain": (
        "simmim-pretrain/ckpt_epoch_5.pth",
        "model",
        "encoder.",
        {
            "qkv": "blocks.{i}.attn.qkv",
            "q_bias": "blocks.{i}.attn.q_bias",
            "v_bias": "blocks.{i}.attn.v_bias",
            "out": "blocks.{i}.attn.proj",
            "norm": "blocks.{i}.norm1",
        },
        4,
    ),
    "ijepa-predictor": (
        "ijepa-research/IN1K-vit-tiny.pth.tar",
        "predictor",
        "module.",
        {
            "qkv": "predictor_blocks.{i}.attn.qkv",
            "out": "predictor_blocks.{i}.attn.proj",
            "norm": "predictor_blocks.{i}.norm1",
        },
        2,
    ),
}


def _read(name):
    """(tensors as float64 numpy, names, heads, model path, part) of a fixture."""
    if name in PICKLE_REFERENCE:
        torch = pytest.importorskip("torch")
        path, part, prefix, names, heads = PICKLE_REFERENCE[name]
        obj = torch.load(PICKLES / path, map_location="cpu", weights_only=False)[part]
        tensors = {
            k[len(prefix) :]: v.double().numpy()
            for k, v in obj.items()
            if k.startswith(prefix) and hasattr(v, "double")
        }
        return tensors, names, heads, PICKLES / path, (part if part == "predictor" else None)
    folder = MODELS / name
    tensors = {}
    for f in sorted(folder.glob("*.safetensors")):
        if name == "vit-bf16":
            from safetensors.torch import load_file as load_torch  # safetensors.numpy cannot read BF16

            tensors.update({k: v.double().numpy() for k, v in load_torch(str(f)).items()})
        else:
            tensors.update({k: v.astype(np.float64) for k, v in load_file(str(f)).items()})
    names = REFERENCE[name]
    return tensors, names, names.get("heads", 4), folder, None


def reference_layer(name, i):
    """Dense-reference weights of layer i: wq, wk, wv (D, D) (out, in), wo (D, D), bq (D,), gamma, beta (D,) or None."""
    t, names, heads, *_ = _read(name)

    def module(ref, what):
        w = ref["weight"] if isinstance(ref, dict) else ref + ".weight"
        b = ref["bias"] if isinstance(ref, dict) else ref + ".bias"
        return t[w.format(i=i)] if what == "weight" else t.get(b.format(i=i))

    if "qkv" in names:
        w, b = module(names["qkv"], "weight"), module(names["qkv"], "bias")
        d = w.shape[1]
        wq, wk, wv = w[:d], w[d : 2 * d], w[2 * d :]
        bq = b[:d] if b is not None else t.get(names.get("q_bias", "-").format(i=i), np.zeros(d))
    else:
        wq, wk, wv = (module(names[r], "weight") for r in ("q", "k", "v"))
        bq = module(names["q"], "bias")
    d = wq.shape[1]
    gamma = beta = None
    if names["norm"]:
        gamma, beta = t[names["norm"].format(i=i) + ".weight"], t[names["norm"].format(i=i) + ".bias"]
    wo = t.get(names["out"].format(i=i) + ".weight")  # None: the fixture has no output projection
    return {
        "wq": wq,
        "wk": wk,
        "wv": wv,
        "wo": wo,
        "bq": np.zeros(d) if bq is None else bq,
        "gamma": gamma,
        "beta": beta,
        "heads": heads,
    }


def _profile(name, fold_ln=False):
    _, _, _, path, part = _read(name)
    _, ck = open_model(str(path), part=part)
    return compute_profile(ck, {}, fold_ln=fold_ln), ck


def _dense_svd(m, K):
    u, s, vt = np.linalg.svd(m)  # the dense D×D SVD
    return s[:K], np.sum(u[:, :K] * vt[:K].T, 0)


def _untied(blocks, K):
    tied = np.zeros(K, bool)
    for b in blocks:
        tied[b["start"] : b["stop"]] = True
    return ~tied


ALL = sorted(REFERENCE) + sorted(PICKLE_REFERENCE)


@pytest.mark.parametrize("name", ALL)
@pytest.mark.numerics
def test_symmetry_and_ov_match_dense(name):
    if name == "vit-bf16":
        pytest.importorskip("torch")
    prof, _ = _profile(name)
    K = prof.model.head_dim
    assert prof.model.folded is None and prof.salience is None
    if (
        name == "ijepa-predictor"
    ):  # the fixture holds the query-key path only: no attn.proj, so no circuit, and it says so
        assert not prof.model.ov["available"] and "lacks predictor_blocks.0.attn.proj.weight" in prof.model.ov["note"]
        assert np.isnan(prof.ov.weighted).all() and all(hd["ov"] is None for hd in prof.to_json()["layers"][0]["heads"])
    else:
        assert prof.model.ov["available"]
    for l in range(prof.model.layers):
        r = reference_layer(name, l)
        for h in range(r["heads"]):
            rows = slice(h * K, (h + 1) * K)
            m = r["wq"][rows].T @ r["wk"][rows]  # (D, D) the query-key matrix
            sym = np.sum(((m + m.T) / 2) ** 2) / np.sum(m**2)
            assert prof.symmetric[l, h] == pytest.approx(sym, abs=1e-10)
            if name == "ijepa-predictor":
                continue
            mov = r["wo"][:, rows] @ r["wv"][rows]  # (D, D) the value-output circuit
            s, cos = _dense_svd(mov, K)
            np.testing.assert_allclose(prof.ov.singular_values[l, h], s, rtol=1e-9)
            keep = _untied(prof.ov.degenerate[l][h], K)
            np.testing.assert_allclose(prof.ov.cosines[l, h][keep], cos[keep], atol=1e-8)
            assert prof.ov.weighted[l, h] == pytest.approx(np.trace(mov) / s.sum(), abs=1e-10)  # trace(M_ov)/‖M_ov‖_*
            assert prof.weighted[l, h] == pytest.approx(
                np.trace(m) / np.linalg.svd(m, compute_uv=False).sum(), abs=1e-10
            )


@pytest.mark.parametrize("name", ALL)
@pytest.mark.numerics
def test_fold_matches_dense(name):
    if name == "vit-bf16":
        pytest.importorskip("torch")
    prof, _ = _profile(name, fold_ln=True)
    K = prof.model.head_dim
    assert prof.model.folded == "layernorm"
    for l in range(prof.model.layers):
        r = reference_layer(name, l)
        d = r["wq"].shape[1]
        gamma = np.ones(d) if r["gamma"] is None else r["gamma"]
        beta = np.zeros(d) if r["beta"] is None else r["beta"]
        for h in range(r["heads"]):
            rows = slice(h * K, (h + 1) * K)
            m = np.diag(gamma) @ r["wq"][rows].T @ r["wk"][rows] @ np.diag(gamma)  # (D, D) Γ W_qᵀW_k Γ
            s, cos = _dense_svd(m, K)
            np.testing.assert_allclose(prof.singular_values[l, h], s, rtol=1e-9)
            keep = _untied(prof.degenerate[l][h], K)
            np.testing.assert_allclose(prof.cosines[l, h][keep], cos[keep], atol=1e-8)
            assert prof.symmetric[l, h] == pytest.approx(np.sum(((m + m.T) / 2) ** 2) / np.sum(m**2), abs=1e-10)
            w = gamma * (r["wk"][rows].T @ (r["wq"][rows] @ beta + r["bq"][rows]))  # (D,) Γ W_kᵀ(W_q β + b_q)
            assert prof.salience[l, h] == pytest.approx(np.linalg.norm(w), rel=1e-10, abs=1e-12)
            if r["wo"] is None:  # the I-JEPA predictor fixture stores no output projection: no circuit to fold
                continue
            mov = r["wo"][:, rows] @ r["wv"][rows] @ np.diag(gamma)  # (D, D) W_o,h W_v,h Γ: Γ on the input side
            s, cos = _dense_svd(mov, K)
            np.testing.assert_allclose(prof.ov.singular_values[l, h], s, rtol=1e-9)  # as the plain OV check
            keep = _untied(prof.ov.degenerate[l][h], K)
            np.testing.assert_allclose(prof.ov.cosines[l, h][keep], cos[keep], atol=1e-8)
            assert prof.ov.weighted[l, h] == pytest.approx(np.trace(mov) / s.sum(), abs=1e-10)


def test_fold_description_per_family():
    bert = _profile("bert", fold_ln=True)[0].model.fold
    assert not bert["layernorm_gain"] and bert["query_bias"] and bert["layers_without_norm"] == [0, 1]
    assert bert["layernorm_bias"] is False  # post-norm: no pre-attention norm, so no β folded either
    assert "no LayerNorm bias" not in " ".join(bert["includes"])  # nor a β line: there is no norm to have one
    assert not any("RMSNorm" in n for n in bert["notes"])  # a missing norm is not a norm without bias
    assert "no pre-attention LayerNorm" in bert["notes"][0]
    vit = _profile("vit", fold_ln=True)[0].model
    assert vit.fold["layernorm_gain"] and vit.fold["layernorm_bias"] and vit.fold["layers_without_norm"] == []
    assert vit.to_json()["folded"] == "layernorm" and not any("LayerNorm gain" in o for o in vit.omitted)


def test_folded_value_output_circuit_is_said_everywhere_it_is_shown(tmp_path):
    import json

    from qkweights.figures.compare import curves_from

    folded, _ = _profile("vit", fold_ln=True)
    m = folded.model
    assert m.fold["value_output"] is True and m.ov_folded
    assert any("W_o,h W_v,h Γ" in i for i in m.fold["includes"])
    folded.save(tmp_path / "f")
    doc = json.loads((tmp_path / "f" / "profile.json").read_text())
    assert "W_v[hK:(h+1)K, :] Γ" in doc["ov_convention"] and "W_v[hK:(h+1)K, :] Γ" in doc["model"]["ov"]["note"]
    labels = {c.kind: c.label for c in curves_from(tmp_path / "f")}
    assert labels["ov_weighted_cosine"].endswith(" [LN-folded]") and labels["weighted_cosine"].endswith(" [LN-folded]")
    # a folded profile written before the value-output circuit was folded: its circuit is the plain one, and says so
    del doc["model"]["fold"]["value_output"]
    (tmp_path / "old").mkdir()
    (tmp_path / "old" / "profile.json").write_text(json.dumps(doc))
    old = load_profile(tmp_path / "old")
    assert old.model.folded == "layernorm" and not old.model.ov_folded
    assert {c.label for c in curves_from(old)} == {f"{old.name} [LN-folded query-key only]"}
    plain, _ = _profile("vit")
    assert not plain.model.ov_folded and "Γ" not in plain.model.ov["note"]
    assert plain.to_json()["ov_convention"].startswith("M_ov = W_o[:, hK:(h+1)K] W_v[hK:(h+1)K, :] = P")
    from qkweights.figures.profiles import ov_cosine_by_layer_figure

    folded_title, old_title, plain_title = (
        ov_cosine_by_layer_figure(p).axes[0].get_title().split("\n")[1] for p in (folded, old, plain)
    )
    assert folded_title == "value-output circuit W_o,h W_v,h Γ (LayerNorm gain folded on its input side)"
    assert old_title == plain_title == "value-output circuit W_o,h W_v,h (not LayerNorm-folded)"


def test_fold_description_of_norms_without_bias(tmp_path):
    def drop(layers):
        def edit(t):
            for i in layers:
                del t[f"encoder.layer.{i}.layernorm_before.bias"]

        return edit

    _, ck = open_model(str(edited_fixture(tmp_path, "none", drop([0, 1]))))  # RMSNorm-style in every layer: β = 0
    none = fold_description(ck)
    assert none["layernorm_gain"] and none["layernorm_bias"] is False
    assert "no LayerNorm bias (the norm stores none: β = 0)" in none["includes"]
    assert "norm without bias (RMSNorm-style) in layers 0, 1: β = 0" in none["notes"]
    _, ck = open_model(str(edited_fixture(tmp_path, "one", drop([1]))))  # layer 0 keeps its β: β is folded
    one = fold_description(ck)
    assert one["layernorm_bias"] is True and "norm without bias (RMSNorm-style) in layers 1: β = 0" in one["notes"]
    assert any(i.startswith("LayerNorm bias β in the key-salience term") for i in one["includes"])


def test_folded_modes_refuses_an_out_of_range_head():
    _, ck = open_model(str(MODELS / "vit"))
    H = ck.dims.heads
    assert folded_modes(ck, 0, [H - 1]).heads.tolist() == [H - 1]  # the last head is in range
    for bad in (H, -1):
        with pytest.raises(qkweights.errors.InputError) as e:
            folded_modes(ck, 0, [0, bad])
        assert str(e.value) == f"head {bad} is out of range: the model has {H} heads (0–{H - 1})"


def test_fold_with_identity_layernorm_and_no_query_bias_is_the_plain_profile(tmp_path):
    def identity(t):
        for i in range(2):
            t[f"encoder.layer.{i}.layernorm_before.weight"][:] = 1
            t[f"encoder.layer.{i}.layernorm_before.bias"][:] = 0
            t[f"encoder.layer.{i}.attention.attention.query.bias"][:] = 0

    folder = edited_fixture(tmp_path, "identity", identity)
    _, ck = open_model(str(folder))
    plain, folded = compute_profile(ck, {}), compute_profile(ck, {}, fold_ln=True)
    for field in ("singular_values", "cosines", "weighted", "trace", "symmetric"):
        np.testing.assert_array_equal(getattr(folded, field), getattr(plain, field))
    np.testing.assert_array_equal(folded.salience, 0.0)


def test_symmetric_fraction_boundaries():
    rng = np.random.default_rng(1)
    w = rng.standard_normal((3, 8, 32))  # (H, K, D)
    _, s, _ = qk_svd(w, w)
    np.testing.assert_allclose(symmetric_fraction(s, w, w), 1.0, rtol=0, atol=1e-14)  # W_q = W_k: M symmetric
    a, b = rng.standard_normal((2, 3, 4, 32))  # (H, K/2, D) each
    wq, wk = np.concatenate([a, b], 1), np.concatenate([b, -a], 1)  # M = aᵀb − bᵀa: antisymmetric
    m = np.swapaxes(wq, -1, -2) @ wk
    np.testing.assert_allclose(m, -np.swapaxes(m, -1, -2), atol=1e-12)
    _, s, _ = qk_svd(wq, wk)
    np.testing.assert_allclose(symmetric_fraction(s, wq, wk), 0.0, rtol=0, atol=1e-14)
    assert np.isnan(symmetric_fraction(np.zeros(8), np.zeros((8, 32)), np.zeros((8, 32))))  # M = 0: undefined


def test_symmetric_null_is_half_plus_one_over_2d_by_simulation():
    rng = np.random.default_rng(2)
    K, D, n = 8, 32, 4000
    wq, wk = rng.standard_normal((2, n, K, D))
    s = np.linalg.svd(np.swapaxes(wq, -1, -2) @ wk, compute_uv=False)[:, :K]  # (n, K) dense
    f = symmetric_fraction(s, wq, wk)
    assert symmetric_null(D, K) == 0.5 + 1 / 64
    assert abs(f.mean() - symmetric_null(D, K)) < 4 * f.std() / math.sqrt(
        n
    )  # simulated mean within 4 s.e. (s.e. ≈ 3.5e-4)


def test_ov_svd_hand_computed_and_trace_identity():
    # W_o,h = e_0 (D×1), W_v,h = 2 e_0ᵀ: M_ov = 2 e_0 e_0ᵀ copies feature 0: λ = 2, cos = 1.
    D = 5
    wo, wv = np.zeros((D, 1)), np.zeros((1, D))
    wo[0, 0], wv[0, 0] = 1.0, 2.0
    p, lam, r = ov_svd(wo, wv)
    assert lam.tolist() == [2.0] and np.einsum("dk,dk->k", p, r).tolist() == [1.0]
    wv = -wv  # suppresses it: cos = −1
    p, lam, r = ov_svd(wo, wv)
    assert lam.tolist() == [2.0] and np.einsum("dk,dk->k", p, r).tolist() == [-1.0] and p[0, 0] == 1.0
    rng = np.random.default_rng(3)
    wo, wv = rng.standard_normal((4, 32, 8)), rng.standard_normal((4, 8, 32))
    p, lam, r = ov_svd(wo, wv)
    st = head_stats(p, lam, r, np.swapaxes(wo, -1, -2), wv)
    np.testing.assert_allclose((lam * st.cosines).sum(-1), np.trace(wo @ wv, axis1=-2, axis2=-1), rtol=1e-12)
    np.testing.assert_allclose(st.trace, np.trace(wo @ wv, axis1=-2, axis2=-1), rtol=1e-12)


@pytest.mark.parametrize("name", VISION_FIXTURES)
@pytest.mark.numerics
def test_folded_bilinear_plus_salience_reproduces_the_softmax(name):
    if name == "vit-bf16":
        pytest.importorskip("torch")
    model = qkweights.load_model(str(MODELS / name))
    d = model.dims
    p = model.weights.embeddings.patch_size
    gh, gw = model.weights.embeddings.grid
    pixels = np.random.default_rng(4).standard_normal((2, 3, gh * p, gw * p)).astype(np.float32)
    out = model.forward(pixels, attentions=True)
    for l in range(d.layers):
        fm = folded_modes(model.checkpoint, l)
        n = normalised_tokens(out.hidden_states[l], eps=d.eps)  # (B, T, D) from the residual stream
        # the same n from the LayerNorm output, where γ is away from 0
        np.testing.assert_allclose(
            normalised_tokens(out.attention_inputs[l], gamma=fm.gamma, beta=fm.beta), n, atol=2e-4
        )
        a = np.einsum("btd,hdk->bhtk", n, fm.u)  # (B, H, T, K) n_i·u_n
        b = np.einsum("btd,hdk->bhtk", n, fm.v)  # (B, H, T, K) n_j·v_n
        logits = np.einsum("bhik,hk,bhjk->bhij", a, fm.s, b) + np.einsum("btd,hd->bht", n, fm.salience)[:, :, None, :]
        logits /= math.sqrt(d.head_dim)
        rel = model.weights.blocks[l].rel_pos
        if (
            rel is not None
        ):  # BEiT's relative position bias (timm-beit): the logit term the weight SVD omits, after 1/√K
            logits += relative_position_bias(rel, model.weights.embeddings.grid, out.layout.grid)  # (H, T, T)
        logits -= logits.max(-1, keepdims=True)
        probs = np.exp(logits)
        probs /= probs.sum(-1, keepdims=True)
        np.testing.assert_allclose(probs, out.attentions[l], rtol=0, atol=1e-5)


def test_profile1_is_read_with_the_new_statistics_absent(tmp_path):
    prof = qkweights.profile(str(MODELS / "vit"))
    prof.save(tmp_path / "p2")
    doc = (tmp_path / "p2" / "profile.json").read_text()
    import json

    old = json.loads(doc)
    old["schema"] = "qkweights.profile/1"
    for key in ("folded", "ov"):
        old["model"].pop(key, None)
    for ly in old["layers"]:
        for key in ("symmetric_fraction", "ov_weighted_cosine"):
            ly.pop(key)
        for hd in ly["heads"]:
            hd.pop("symmetric_fraction"), hd.pop("ov")
    (tmp_path / "p1").mkdir()
    (tmp_path / "p1" / "profile.json").write_text(json.dumps(old))
    back = load_profile(tmp_path / "p1")
    assert back.symmetric is None and back.ov is None and back.salience is None and back.model.folded is None
    np.testing.assert_array_equal(back.weighted, prof.weighted)
    new = load_profile(tmp_path / "p2")
    np.testing.assert_array_equal(new.symmetric, prof.symmetric)


def test_check_new_tolerances(tmp_path):
    from qkweights.weights.check import HEAD_OV, HEAD_SYMMETRY, Tolerances
    from qkweights.workflow import check as check_model

    base = tmp_path / "base"
    qkweights.profile(str(MODELS / "vit")).save(base)
    same = check_model(str(MODELS / "vit"), base, tolerances=Tolerances(symmetry=1e-12, ov=1e-12))
    assert same.passed and same.tolerances["symmetry"] == 1e-12
    assert sum(c.name == HEAD_SYMMETRY for c in same.checks) == 8 and sum(c.name == HEAD_OV for c in same.checks) == 8
    flipped = edited_fixture(tmp_path, "flipped", flip_value_head)
    report = check_model(str(flipped), base, tolerances=Tolerances(symmetry=1e-12, ov=1e-12))
    assert [(c.name, c.layer, c.head) for c in report.failures] == [(HEAD_OV, 1, 2)]
    ov = qkweights.profile(str(MODELS / "vit")).ov.weighted[1, 2]
    assert report.failures[0].measured == pytest.approx(2 * abs(ov), abs=1e-12)  # weighted cosine w → −w
    plain = check_model(str(flipped), base)  # without the new tolerances: not checked
    assert plain.passed and not any(c.name in (HEAD_OV, HEAD_SYMMETRY) for c in plain.checks)


def test_check_with_a_profile1_baseline_and_a_folded_one(tmp_path):
    import json

    from qkweights.weights.check import FOLDING, HEAD_OV, Tolerances, check_profile
    from qkweights.workflow import check as check_model

    qkweights.profile(str(MODELS / "vit")).save(tmp_path / "b1")
    doc = json.loads((tmp_path / "b1" / "profile.json").read_text())
    doc["schema"] = "qkweights.profile/1"
    for ly in doc["layers"]:
        for hd in ly["heads"]:
            del hd["symmetric_fraction"], hd["ov"]
    (tmp_path / "b1" / "profile.json").write_text(json.dumps(doc))
    report = check_model(str(MODELS / "vit"), tmp_path / "b1", tolerances=Tolerances(symmetry=0.01, ov=0.01))
    assert report.passed and not any(c.name == HEAD_OV for c in report.checks)
    assert any("tol_symmetry=0.01: not checked: the baseline has no symmetric fraction" in n for n in report.notes)
    assert any("tol_ov=0.01: not checked: the baseline has no OV weighted cosine" in n for n in report.notes)
    # a folded baseline: check_model folds the current model too
    _, ck = open_model(str(MODELS / "vit"))
    folded = compute_profile(ck, {"model_id": "vit"}, fold_ln=True)
    folded.save(tmp_path / "bf")
    assert check_model(str(MODELS / "vit"), tmp_path / "bf", tolerances=Tolerances(symmetry=1e-12)).passed
    mixed = check_profile(compute_profile(ck, {"model_id": "vit"}), load_profile(tmp_path / "bf"))
    assert [(c.name, c.measured, c.allowed) for c in mixed.failures] == [(FOLDING, "plain", "layernorm")]


def test_diff_reports_the_new_statistics(tmp_path):
    import json

    from qkweights.weights.diff import diff_profiles

    a = qkweights.profile(str(MODELS / "vit"))
    b = qkweights.profile(str(edited_fixture(tmp_path, "flipped", flip_value_head)))
    d = diff_profiles(a, b)
    rows = {(r["layer"], r["head"]): r for r in d.head_rows()}
    assert rows[1, 2]["delta_ov_weighted_cosine"] == pytest.approx(-2 * a.ov.weighted[1, 2], abs=1e-12)
    assert all(r["delta_ov_weighted_cosine"] == pytest.approx(0, abs=1e-12) for k, r in rows.items() if k != (1, 2))
    assert all(
        r["delta_symmetric_fraction"] == 0 and r["salience_norm_a"] is None and r["salience_ratio"] is None
        for r in rows.values()
    )
    assert not any("absent" in n or "folding" in n for n in d.notes)
    d.save(tmp_path / "out")
    doc = json.loads((tmp_path / "out" / "diff.json").read_text())
    assert doc["layers"][1]["ov_weighted_cosine_b"] == pytest.approx(np.mean(b.ov.weighted[1]))
    # B folded, A plain: the salience is absent from A, and the notes say so
    _, ck = open_model(str(MODELS / "vit"))
    f = diff_profiles(a, compute_profile(ck, {}, fold_ln=True))
    assert any("folding differs" in n for n in f.notes) and any("salience_norm absent from A" in n for n in f.notes)
    # both folded, A written before the value-output circuit was folded: said, as its OV delta compares other matrices
    folded = compute_profile(ck, {}, fold_ln=True)
    old = dataclasses.replace(folded.model, fold={k: v for k, v in folded.model.fold.items() if k != "value_output"})
    g = diff_profiles(dataclasses.replace(folded, model=old), folded)
    assert [n for n in g.notes if "value-output" in n] == [
        "the value-output circuit is LayerNorm-folded in B only (the other profile was written before it was folded): "
        "delta_ov_weighted_cosine compares different matrices"
    ]
    assert not any("value-output circuit is LayerNorm-folded" in n for n in diff_profiles(folded, folded).notes)


@pytest.mark.numerics
def test_maps_fold_ln_decomposes_the_logits_exactly(tmp_path):
    from qkweights.analyses.maps import projection_maps
    from qkweights.datasets.synthetic_o3 import make_o3
    from qkweights.workflow import save_maps

    img = make_o3(tmp_path / "o3", n=1, seed=3, size=(48, 48)) / "images" / "synth_0000.jpg"
    model = qkweights.load_model(str(MODELS / "vit"))
    layer, head, K = 1, 2, model.dims.head_dim
    maps = projection_maps(model, img, layer=layer, head=head, modes=range(K), fold_ln=True)
    assert maps.embedding == "normalised"
    out = model.forward(model.preprocess(img), attentions=True, layers=[layer])
    n = normalised_tokens(out.hidden_states[layer][0], eps=model.dims.eps)  # (T, D)
    r = reference_layer("vit", layer)
    rows = slice(head * K, (head + 1) * K)
    x = r["gamma"] * n + r["beta"]  # (T, D) the LayerNorm output, float64
    bk = load_file(MODELS / "vit" / "model.safetensors")[f"encoder.layer.{layer}.attention.attention.key.bias"].astype(
        np.float64
    )[rows]
    q = x @ r["wq"][rows].T + r["bq"][rows]  # (T, K)
    k = x @ r["wk"][rows].T + bk
    # the logits minus their terms of the query token alone and constants: q_i·k_j − q_i·(W_k β + b_k)
    kept = q @ (k - (r["wk"][rows] @ r["beta"] + bk)).T  # (T, T)
    a = out.attentions[layer][0, head].astype(np.float64)
    assert maps.contributions.sum() + maps.salience_contribution == pytest.approx(
        np.sum(a * kept) / math.sqrt(K), rel=1e-9
    )
    with pytest.raises(qkweights.errors.InputError, match="drop embedding=residual"):
        projection_maps(model, img, layer=layer, head=head, fold_ln=True, embedding="residual")
    names = {p.name for p in save_maps(maps, tmp_path / "m")}
    assert names == {"maps_L1_H2_normalised.png", "maps_L1_H2_normalised.npz"}  # the embedding names the files
    with np.load(tmp_path / "m" / "maps_L1_H2_normalised.npz") as z:
        assert float(z["salience_contribution"]) == maps.salience_contribution and str(z["embedding"]) == "normalised"
