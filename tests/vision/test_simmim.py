"""SimMIM ViT research checkpoints (family simmim-vit): BEiT-style attention with relative position bias.

Fixtures: tests/fixtures/pickles/simmim-{pretrain,finetune}/ and their goldens pickles/simmim-*/golden.npz,
written by tests/fixtures/make_simmim_fixtures.py (torch.save files in SimMIM's layout holding transformers
BeitModel weights; the goldens are BeitModel 5.24 outputs, eval, eager attention; the script checks them
against its own torch forward from the SimMIM names).

References used here:
- tensors read straight from the files with qkweights.checkpoints.pytorch.unpickler.read_torch_checkpoint
  (no spec involved);
- dense numpy SVD of each D×D product W_q,hᵀW_k,h (method.md §1);
- BEiT's relative_position_index rebuilt by loops over token pairs from its definition (SimMIM
  models/vision_transformer.py), and the index buffers the fixtures store (transformers'
  BeitRelativePositionBias.generate_relative_position_index);
- torch's bilinear interpolate (align_corners=False) written out per output pixel in float64.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
from conftest import FIXTURES, FORWARD_ATOL, attention_atol

from qkweights.checkpoints.pytorch.store import TorchStore
from qkweights.checkpoints.pytorch.unpickler import read_torch_checkpoint
from qkweights.cli import main
from qkweights.errors import CheckpointError, SpecError
from qkweights.specs.checkpoint import open_checkpoint
from qkweights.specs.load import open_model
from qkweights.specs.registry import builtin_spec_dir, load_specs
from qkweights.specs.resolvers import relative_window
from qkweights.vision.model import open_vision_model, vision_model
from qkweights.vision.positions import relative_position_bias, relative_position_index, resize_bilinear
from qkweights.weights.compute import compute_profile
from qkweights.weights.qk import qk_svd

PICKLES = FIXTURES / "pickles"
# flavour -> (file, tensor-name prefix inside the 'model' state dict, prefix the spec must choose)
FLAVOURS = {
    "simmim-pretrain": ("ckpt_epoch_5.pth", "encoder.", "model.encoder."),
    "simmim-finetune": ("ckpt.pth", "", "model."),
}
SHARED_TABLE = "rel_pos_bias.relative_position_bias_table"
ATOL = FORWARD_ATOL  # float32 forward vs transformers' float32 forward (conftest.py derives it)


def path(flavour: str) -> Path:
    return PICKLES / flavour / FLAVOURS[flavour][0]


def golden(flavour: str) -> dict[str, np.ndarray]:
    with np.load(PICKLES / flavour / "golden.npz") as z:
        return {k: z[k] for k in z.files}


def raw(flavour: str) -> dict[str, np.ndarray]:
    """The flavour's encoder tensors by their SimMIM names (no prefix), read without any spec."""
    sd = read_torch_checkpoint(path(flavour))["model"]
    prefix = FLAVOURS[flavour][1]
    return {k[len(prefix) :]: v.numpy() for k, v in sd.items() if k.startswith(prefix)}


def loop_index(gh: int, gw: int) -> np.ndarray:
    """BEiT's relative position index (T, T) by its definition, one token pair at a time (CLS = token 0)."""
    n = (2 * gh - 1) * (2 * gw - 1)
    t = gh * gw + 1
    index = np.zeros((t, t), np.int64)
    for i in range(t):
        for j in range(t):
            if i == 0:
                index[i, j] = n + 2 if j == 0 else n  # CLS→CLS, CLS→patch
            elif j == 0:
                index[i, j] = n + 1  # patch→CLS
            else:
                (ri, ci), (rj, cj) = divmod(i - 1, gw), divmod(j - 1, gw)
                index[i, j] = (ri - rj + gh - 1) * (2 * gw - 1) + (ci - cj + gw - 1)
    return index


@pytest.fixture(scope="module")
def models():
    cache = {}

    def get(flavour):
        if flavour not in cache:
            cache[flavour] = open_vision_model(str(path(flavour)))
        return cache[flavour]

    return get


@pytest.mark.parametrize("flavour", sorted(FLAVOURS))
def test_detection_and_dims(flavour):
    # make_simmim_fixtures.py: width 32, 4 heads of 8, 2 blocks, patch 8, image 32, eps 1e-6 (SimMIM's build_vit)
    _, ck = open_model(str(path(flavour)))
    assert (ck.spec.name, ck.prefix) == ("simmim-vit", FLAVOURS[flavour][2])
    d = ck.dims
    assert (d.layers, d.hidden, d.heads, d.head_dim, d.patch_size, d.image_size) == (2, 32, 4, 8, 8, (32, 32))
    assert (d.eps, d.act) == (1e-6, "gelu")


def test_relative_window():
    assert relative_window(52) == 4  # (2·4 − 1)² + 3: the fixtures' 4×4 grid
    assert relative_window(732) == 14  # SimMIM ViT-B/16 at 224: (2·14 − 1)² + 3
    assert relative_window(28) == 3  # 5² + 3
    for rows in (51, 53, 19, 2):  # 19 = 4² + 3: an even side is no 2W − 1
        with pytest.raises(KeyError):
            relative_window(rows)


@pytest.mark.parametrize("flavour", sorted(FLAVOURS))
@pytest.mark.numerics
def test_profile_matches_dense_svd(flavour):
    _, ck = open_model(str(path(flavour)))
    prof = compute_profile(ck, {"model_id": flavour})
    t = raw(flavour)
    for l in range(2):
        w = t[f"blocks.{l}.attn.qkv.weight"].astype(np.float64)  # (3D, D) rows [q | k | v]
        for h in range(4):
            wq, wk = w[h * 8 : (h + 1) * 8], w[32 + h * 8 : 32 + (h + 1) * 8]  # (K, D)
            u, s, vt = np.linalg.svd(wq.T @ wk)  # dense D×D, method.md §1
            np.testing.assert_allclose(prof.singular_values[l, h], s[:8], rtol=1e-10)
            np.testing.assert_allclose(prof.cosines[l, h], np.einsum("dn,nd->n", u[:, :8], vt[:8]), atol=1e-9)


@pytest.mark.parametrize("flavour", sorted(FLAVOURS))
def test_cli_profile_reports_the_relative_position_bias(flavour, tmp_path, capsys):
    assert main(["profile", str(path(flavour)), "--out", str(tmp_path), "--no-plots"]) == 0
    doc = json.loads((tmp_path / "profile.json").read_text())
    assert doc["model"]["family"] == "simmim-vit"
    assert "relative position bias" in doc["model"]["weight_svd_omits"]
    assert "family simmim-vit  2 layers × 4 heads" in capsys.readouterr().out


def test_key_bias_is_zero_and_q_v_biases_are_separate():
    # SimMIM's Attention: qkv has no bias; the logits use [q_bias, 0, v_bias]
    _, ck = open_model(str(path("simmim-finetune")))
    t = raw("simmim-finetune")
    qk = ck.qk(1)
    np.testing.assert_array_equal(qk.bq.reshape(-1), t["blocks.1.attn.q_bias"])
    assert not qk.bk.any()


@pytest.mark.parametrize("flavour", sorted(FLAVOURS))
@pytest.mark.numerics
def test_forward_matches_transformers_golden(flavour, models):
    g, model = golden(flavour), models(flavour)
    out = model.forward(g["pixel_values"], attentions=True)
    np.testing.assert_allclose(np.stack(out.hidden_states), g["hidden_states"], rtol=0, atol=ATOL)
    np.testing.assert_allclose(np.stack([out.attentions[l] for l in range(2)]), g["attentions"], rtol=0, atol=ATOL)
    np.testing.assert_allclose(out.last_hidden_state, g["last_hidden_state"], rtol=0, atol=ATOL)


@pytest.mark.numerics
def test_forward_on_another_grid_resizes_the_table_as_transformers(models):
    # golden: BeitModel at 40×16 pixels, a 5×2 grid: the 7×7 table part is resized to 9×3
    g, model = golden("simmim-pretrain"), models("simmim-pretrain")
    out = model.forward(g["pixel_values_interp"], attentions=True)
    assert out.layout.grid == (5, 2) and out.layout.n_tokens == 11
    np.testing.assert_allclose(np.stack(out.hidden_states), g["hidden_states_interp"], rtol=0, atol=ATOL)
    np.testing.assert_allclose(
        np.stack([out.attentions[l] for l in range(2)]), g["attentions_interp"], rtol=0, atol=ATOL
    )
    np.testing.assert_allclose(out.last_hidden_state, g["last_hidden_state_interp"], rtol=0, atol=ATOL)


def test_final_norm_only_in_the_pretrained_encoder(models):
    # SimMIM: `norm` is a LayerNorm in pretraining, nn.Identity under mean pooling (fine-tuned)
    assert models("simmim-pretrain").weights.final_norm is not None
    assert models("simmim-finetune").weights.final_norm is None
    out = models("simmim-finetune").forward(golden("simmim-finetune")["pixel_values"])
    np.testing.assert_array_equal(out.last_hidden_state, out.hidden_states[-1])


def test_tables_shared_or_per_block(models):
    t = raw("simmim-pretrain")
    for blk in models("simmim-pretrain").weights.blocks:
        np.testing.assert_array_equal(blk.rel_pos, t[SHARED_TABLE])
    t = raw("simmim-finetune")
    for l, blk in enumerate(models("simmim-finetune").weights.blocks):
        np.testing.assert_array_equal(blk.rel_pos, t[f"blocks.{l}.attn.relative_position_bias_table"])


@pytest.mark.parametrize("grid", [(4, 4), (5, 2), (2, 3), (1, 1)])
def test_relative_position_index_by_definition(grid):
    np.testing.assert_array_equal(relative_position_index(grid), loop_index(*grid))


def test_relative_position_index_equals_the_stored_buffers():
    # the fixtures store transformers' own index (BeitRelativePositionBias.generate_relative_position_index)
    stored = [raw("simmim-pretrain")["rel_pos_bias.relative_position_index"]]
    stored += [raw("simmim-finetune")[f"blocks.{l}.attn.relative_position_index"] for l in range(2)]
    for index in stored:
        np.testing.assert_array_equal(relative_position_index((4, 4)), index)


def bilinear_closed_form(x: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """torch's bilinear interpolate (align_corners=False) per output pixel, float64: x (h, w, C)."""

    def taps(n_in, n_out, i):
        src = max((i + 0.5) * n_in / n_out - 0.5, 0.0)
        i0 = min(int(math.floor(src)), n_in - 1)
        lam = src - i0
        return i0, min(i0 + 1, n_in - 1), lam

    out = np.zeros((*size, x.shape[2]))
    for i in range(size[0]):
        a0, a1, la = taps(x.shape[0], size[0], i)
        for j in range(size[1]):
            b0, b1, lb = taps(x.shape[1], size[1], j)
            out[i, j] = (1 - la) * ((1 - lb) * x[a0, b0] + lb * x[a0, b1]) + la * (
                (1 - lb) * x[a1, b0] + lb * x[a1, b1]
            )
    return out


@pytest.mark.parametrize("size", [(9, 3), (11, 13), (7, 7), (2, 5)])
def test_resize_bilinear_closed_form(size):
    x = np.random.default_rng(3).standard_normal((7, 7, 4)).astype(np.float32)
    # float32 arithmetic (the scale in/out is rounded to float32, as in torch) vs float64: a few ulps of |x| ≤ 4
    np.testing.assert_allclose(
        resize_bilinear(x, size), bilinear_closed_form(x.astype(np.float64), size), rtol=0, atol=3e-6
    )
    if size == (7, 7):
        np.testing.assert_array_equal(resize_bilinear(x, size), x)


def test_relative_position_bias_keeps_the_cls_entries_on_another_grid():
    table = np.random.default_rng(4).standard_normal((52, 3)).astype(np.float32)  # 4×4 window, 3 heads
    same = relative_position_bias(table, (4, 4), (4, 4))  # (H, T, T)
    np.testing.assert_array_equal(same, table[loop_index(4, 4)].transpose(2, 0, 1))
    other = relative_position_bias(table, (4, 4), (5, 2))  # (3, 11, 11)
    assert other.shape == (3, 11, 11)
    np.testing.assert_array_equal(other[:, 0, 1:], np.broadcast_to(table[49][:, None], (3, 10)))  # CLS→patch
    np.testing.assert_array_equal(other[:, 1:, 0], np.broadcast_to(table[50][:, None], (3, 10)))  # patch→CLS
    np.testing.assert_array_equal(other[:, 0, 0], table[51])  # CLS→CLS
    resized = bilinear_closed_form(table[:49].reshape(7, 7, 3).astype(np.float64), (9, 3)).reshape(27, 3)
    np.testing.assert_allclose(
        other[:, 1:, 1:], resized[loop_index(5, 2)[1:, 1:]].transpose(2, 0, 1), rtol=0, atol=3e-6
    )


@pytest.mark.parametrize(
    "flavour, layer, head", [("simmim-pretrain", 1, 2), ("simmim-finetune", 0, 3), ("simmim-finetune", 1, 1)]
)
@pytest.mark.numerics
def test_svd_modes_plus_biases_reproduce_the_attention(flavour, layer, head, models):
    """method.md §1 with a relative position bias: softmax((Σ_n (x_i·u_n)σ_n(v_n·x_j) + bias terms)/√K + R)."""
    model, t = models(flavour), raw(flavour)
    out = model.forward(golden(flavour)["pixel_values"], attentions=True, layers=[layer])
    x = out.attention_inputs[layer].astype(np.float64)  # (B, T, D), the LayerNorm output feeding W_q/W_k
    qk = model.checkpoint.qk(layer)
    wq, wk, bq, bk = qk.wq[head], qk.wk[head], qk.bq[head], qk.bk[head]  # (K, D), (K,)
    u, s, v = qk_svd(wq, wk)  # (D, K), (K,), (D, K)
    bilinear = np.einsum("bin,n,bjn->bij", x @ u, s, x @ v)
    terms = (x @ (wk.T @ bq))[:, None, :] + (x @ (wq.T @ bk))[:, :, None] + bq @ bk
    table = t.get(SHARED_TABLE, t.get(f"blocks.{layer}.attn.relative_position_bias_table"))  # ((2W−1)²+3, H)
    r = table[loop_index(4, 4), head].astype(np.float64)  # (T, T) R[h, i, j] = table[index[i, j], h]
    logits = (bilinear + terms) / math.sqrt(wq.shape[0]) + r
    probs = np.exp(logits - logits.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    assert (np.abs(out.attentions[layer][:, head] - probs) <= attention_atol(x, wq, wk, bq, bk, probs)).all()
    # the relative position bias is not constant along a row: without it the attention differs
    without = np.exp((bilinear + terms) / math.sqrt(wq.shape[0]))
    without /= without.sum(-1, keepdims=True)
    assert np.abs(without - probs).max() > 1e-2


class EditedStore:
    """A TorchStore whose tensor ``name`` reads as ``value`` (everything else passes through)."""

    def __init__(self, store: TorchStore, name: str, value: np.ndarray):
        self.store, self.name, self.value = store, name, value

    def __contains__(self, name):
        return name in self.store

    def shape(self, name):
        return self.value.shape if name == self.name else self.store.shape(name)

    def get(self, name):
        return self.value.copy() if name == self.name else self.store.get(name)

    def dtype(self, name):
        return self.store.dtype(name)


def test_stored_index_of_another_layout_is_refused():
    store = TorchStore.open(path("simmim-pretrain"))
    name = "model.encoder.rel_pos_bias.relative_position_index"
    index = store.get(name)
    ck = open_checkpoint(EditedStore(store, name, index.T), {})  # index[j, i]: keys and queries swapped
    with pytest.raises(
        CheckpointError,
        match=(
            r"^simmim-vit: model.encoder.rel_pos_bias.relative_position_index differs from BEiT's relative position "
            r"index for a 4×4 patch grid"
        ),
    ):
        vision_model(ck)


def test_logit_terms_follow_the_relative_position_fields(tmp_path):
    # The logit terms the weight SVD omits are derived from [attention] relative_position_bias, which the forward
    # pass adds; a spec cannot declare free-text terms (it would be refused as an unknown key).
    specs = load_specs()
    assert specs["simmim-vit"].logit_terms == ("relative position bias",) and specs["timm-vit"].logit_terms == ()
    folder = shutil.copytree(builtin_spec_dir(), tmp_path / "specs")
    spec = folder / "simmim-vit.toml"
    spec.write_text('logit_terms = ["rotary embedding"]\n' + spec.read_text())
    with pytest.raises(SpecError, match=r"^simmim-vit.toml: unknown key 'logit_terms' in the top level; known: name, "):
        load_specs(folder)
    spec.write_text(
        spec.read_text()
        .replace('logit_terms = ["rotary embedding"]\n', "")
        .replace('\ntokens = ["cls", "patches"]', '\ntokens = ["cls", "dist", "patches"]\ndist = "dist_token"')
    )
    with pytest.raises(
        SpecError, match=r"^simmim-vit.toml: \[attention\] relative_position_bias needs \[embeddings\] tokens"
    ):
        load_specs(folder)
