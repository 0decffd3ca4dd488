"""The mode source: plain or LayerNorm-folded modes, decided once, read with the tokens they apply to.

References: the attention probabilities of the numpy forward pass (held against torch in
tests/vision/test_forward.py) and, for the key-bias term that plain modes leave out of their
SVD, the query bias and key weights read from the fixture file directly (transformers' tensor
names, not model_specs/).
"""

import math

import numpy as np
import pytest
from conftest import MODELS
from safetensors.numpy import load_file

import qkweights
from qkweights.specs.load import open_model
from qkweights.weights.modes import FoldedSource, PlainSource, mode_source


@pytest.mark.numerics
@pytest.mark.parametrize("fold_ln", [False, True])
def test_the_modes_on_their_own_tokens_reproduce_the_forward_attention(fold_ln):
    # For either source, on the tokens t it reads from a forward pass that keeps only what it asks for:
    # logits_ij = Σ_n σ_n (t_i·u_n)(v_n·t_j) + (key term of j) + (terms of i alone, which the softmax cancels),
    # the key term being w_h·n_j (folded: the source's salience) or b_q,hᵀW_k,h x̃_j (plain: from the file).
    model = qkweights.load_model(str(MODELS / "vit"))
    d = model.dims
    H, K, D = d.heads, d.head_dim, d.hidden
    source = mode_source(model.checkpoint, fold_ln=fold_ln)
    assert type(source) is (FoldedSource if fold_ln else PlainSource)
    p = model.weights.embeddings.patch_size
    gh, gw = model.weights.embeddings.grid
    pixels = np.random.default_rng(5).standard_normal((2, 3, gh * p, gw * p)).astype(np.float32)
    out = model.forward(pixels, attentions=True, **source.keep)
    tensors = load_file(MODELS / "vit" / "model.safetensors")
    for l in range(d.layers):
        t = source.tokens_of(out, l).astype(np.float64)  # (B, T, D)
        m = source.modes(l)
        a = np.einsum("btd,hdk->bhtk", t, m.u)  # (B, H, T, K) t_i·u_n
        b = np.einsum("btd,hdk->bhtk", t, m.v)  # (B, H, T, K) t_j·v_n
        logits = np.einsum("bhik,hk,bhjk->bhij", a, m.s, b)  # (B, H, T, T)
        if fold_ln:
            key = np.einsum("btd,hd->bht", t, m.salience)  # (B, H, T) w_h·n_j
        else:
            assert m.salience is None
            att = f"encoder.layer.{l}.attention.attention."
            wk = tensors[att + "key.weight"].astype(np.float64).reshape(H, K, D)
            bq = tensors[att + "query.bias"].astype(np.float64).reshape(H, K)
            key = np.einsum("btd,hkd,hk->bht", t, wk, bq)  # (B, H, T) b_q,hᵀW_k,h x̃_j
        logits = (logits + key[:, :, None, :]) / math.sqrt(K)
        logits -= logits.max(-1, keepdims=True)
        probs = np.exp(logits)
        probs /= probs.sum(-1, keepdims=True)
        # The forward pass runs in float32: its logits carry relative errors of a few 1e-7 (|logit| ≲ 10 here),
        # so its probabilities (≤ 1) differ from these float64 ones by well under 1e-5.
        np.testing.assert_allclose(probs, out.attentions[l], rtol=0, atol=1e-5)


@pytest.mark.parametrize("fold_ln", [False, True])
def test_one_head_is_that_head_of_its_layer(fold_ln):
    _, ck = open_model(str(MODELS / "vit"))
    source = mode_source(ck, fold_ln=fold_ln)
    layer = source.modes(1)
    for h in range(ck.dims.heads):
        one = source.head(1, h)
        # The same float64 QR and SVD of the same K×K core, one head alone or stacked: equal to rounding, ~1e-15
        # relative to σ_0 for σ, and for u, v (unit vectors) to ~1e-15 over the gap between adjacent σ (≥ 1e-2 σ_0
        # in this fixture), so 1e-10.
        np.testing.assert_allclose(one.s, layer.s[h], rtol=0, atol=1e-12 * layer.s[h, 0])
        np.testing.assert_allclose(one.u, layer.u[h], rtol=0, atol=1e-10)
        np.testing.assert_allclose(one.v, layer.v[h], rtol=0, atol=1e-10)
        if fold_ln:
            np.testing.assert_allclose(one.salience, layer.salience[h], rtol=1e-12)
        else:
            assert one.salience is None and layer.salience is None


def test_the_words_follow_the_source():
    _, ck = open_model(str(MODELS / "vit"))
    plain, folded = mode_source(ck), mode_source(ck, fold_ln=True)
    assert (plain.folded, plain.tokens, plain.description()) == (None, "ln", None)
    assert (folded.folded, folded.tokens, folded.description()["value_output"]) == ("layernorm", "normalised", True)
    assert plain.tokens_text.startswith("attention_inputs[l]") and folded.tokens_text.startswith("n: the normalised")
    assert "LayerNorm gain and bias" in " ".join(plain.omitted) and "key-salience" in " ".join(folded.omitted)
    assert "Γ" in folded.ov_convention and "Γ" not in plain.ov_convention
