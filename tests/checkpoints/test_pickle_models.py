"""PyTorch checkpoints give the same results as the safetensors route (no torch needed).

Fixtures: tests/fixtures/pickles/<name>/, written by tests/fixtures/make_pickle_models.py with torch.save from the
weights of the committed safetensors fixtures (tests/fixtures/models/), loaded with safetensors.torch.load_file.
So the reference for every PyTorch file is the safetensors fixture it was made from: its tensors bit for bit,
its profile array for array (the safetensors profiles are checked against the dense SVD in test_profile.py),
and (dino-like, a whole timm-vit state dict) the transformers golden of timm-vit.
"""

import hashlib
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import FIXTURES, GOLDEN, MODELS
from hubcache import make_hub_cache

import qkweights
from qkweights.checkpoints.pytorch.store import TorchStore
from qkweights.checkpoints.tensors import TensorStore
from qkweights.errors import CheckpointError, InputError, QkWarning, SourceError
from qkweights.specs.load import open_model

PICKLES = FIXTURES / "pickles"
DINO = PICKLES / "dino-like" / "dino_vit_pretrain.pth"
IJEPA = PICKLES / "ijepa-research" / "IN1K-vit-tiny.pth.tar"
EVIL = FIXTURES.parent / "pickle_fixtures" / "evil_os_system.pt"
MARKER = Path(
    "/tmp/qkweights-pwned/evil_os_system"
)  # what its payload touches (tests/pickle_fixtures/make_pickle_fixtures.py)
PROFILE_ARRAYS = ("singular_values", "cosines", "weighted", "mean", "trace", "nuclear", "effective_rank", "U", "V")
# PyTorch file -> (safetensors fixture holding the same weights, part to read, prefix the file adds to each name)
SAME_WEIGHTS = {
    "dino-like/dino_vit_pretrain.pth": ("timm-vit", None, ""),
    "vit-training/checkpoint.pth": ("vit", None, "model."),
    "vit-ddp/pytorch_model.bin": ("vit", None, ""),  # the reader strips DistributedDataParallel's module.
    "vit-strided/pytorch_model.bin": ("vit", None, ""),
    "vit-bf16-pt/pytorch_model.bin": ("vit-bf16", None, ""),
    "ijepa-research/IN1K-vit-tiny.pth.tar": ("ijepa", "encoder", ""),
}


@pytest.fixture(scope="module")
def reference_profiles():
    cache = {}

    def get(name):
        if name not in cache:
            cache[name] = qkweights.profile(str(MODELS / name), save_vectors=True)
        return cache[name]

    return get


def assert_same_profile(got, want):
    for field in PROFILE_ARRAYS:
        np.testing.assert_array_equal(getattr(got, field), getattr(want, field), err_msg=field)
    assert got.degenerate == want.degenerate
    assert (got.model.layers, got.model.heads, got.model.head_dim, got.model.dtype) == (
        want.model.layers,
        want.model.heads,
        want.model.head_dim,
        want.model.dtype,
    )


def sha256(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.mark.parametrize("name", sorted(SAME_WEIGHTS))
@pytest.mark.numerics
def test_profile_equals_the_safetensors_profile(name, reference_profiles):
    fixture, _, _ = SAME_WEIGHTS[name]
    path = PICKLES / name
    prof = qkweights.profile(str(path), save_vectors=True)
    assert_same_profile(prof, reference_profiles(fixture))
    assert prof.model.family == ("timm-vit" if fixture in ("timm-vit", "ijepa") else "hf-vit")
    assert prof.source["kind"] == "file" and prof.source["model_id"] == str(path.absolute())
    assert prof.source["files"] == [{"name": path.name, "bytes": path.stat().st_size, "sha256": sha256(path)}]


def ijepa_in_timm_names(hf):
    """The HF ijepa fixture's tensors under I-JEPA's (timm) names, as make_pickle_models.py renames them."""
    out = {
        "patch_embed.proj.weight": hf.get("embeddings.patch_embeddings.projection.weight"),
        "patch_embed.proj.bias": hf.get("embeddings.patch_embeddings.projection.bias"),
        "pos_embed": hf.get("embeddings.position_embeddings"),
        "norm.weight": hf.get("layernorm.weight"),
        "norm.bias": hf.get("layernorm.bias"),
    }
    for i in range(2):
        for p in ("weight", "bias"):
            out[f"blocks.{i}.norm1.{p}"] = hf.get(f"encoder.layer.{i}.layernorm_before.{p}")
            rows = [hf.get(f"encoder.layer.{i}.attention.attention.{r}.{p}") for r in ("query", "key", "value")]
            out[f"blocks.{i}.attn.qkv.{p}"] = np.concatenate(rows)  # timm's fused rows [q | k | v]
    return out


@pytest.mark.parametrize("name", sorted(SAME_WEIGHTS))
def test_every_stored_tensor_equals_the_safetensors_tensor(name):
    # dino-like holds every timm-vit tensor; the others the tensors a profile reads (make_pickle_models.py).
    fixture, part, prefix = SAME_WEIGHTS[name]
    pt = TorchStore.open(PICKLES / name, part=part)
    st = TensorStore.open(sorted((MODELS / fixture).glob("*.safetensors")))
    want = ijepa_in_timm_names(st) if fixture == "ijepa" else {n: st.get(n) for n in st.names()}
    names = [n for n in pt.names() if n.startswith(prefix)]
    assert len(names) == (
        len(want) if fixture in ("timm-vit", "ijepa") else 13
    )  # 13: CLS + 2 × (LN, q, k weights and biases)
    assert pt.dtypes() == st.dtypes()
    for n in names:
        np.testing.assert_array_equal(pt.get(n), want[n[len(prefix) :]], err_msg=n)


def test_strided_file_really_holds_views():
    # Guards the fixture: the strided checkpoint's 2-D weights are transposed views, one a slice at an offset.
    store = TorchStore.open(PICKLES / "vit-strided" / "pytorch_model.bin")
    weights = {n: store.info(n) for n in store.names() if len(store.shape(n)) == 2}
    assert {n: t.stride for n, t in weights.items()} == {
        "encoder.layer.0.attention.attention.query.weight": (1, 32),
        "encoder.layer.0.attention.attention.key.weight": (1, 32),
        "encoder.layer.1.attention.attention.query.weight": (1, 64),
        "encoder.layer.1.attention.attention.key.weight": (1, 64),
    }
    key1 = store.info("encoder.layer.1.attention.attention.key.weight")
    assert key1.offset == 32 and key1.storage is store.info("encoder.layer.1.attention.attention.query.weight").storage
    assert store.info("encoder.layer.0.attention.attention.key.bias").offset == 32


def test_dino_like_forward_matches_the_timm_vit_golden():
    with np.load(GOLDEN / "timm-vit.npz") as z:
        g = {k: z[k] for k in z.files}  # transformers outputs of vit-h3, whose weights timm-vit renames
    model = qkweights.load_model(str(DINO))
    out = model.forward(g["pixel_values"], attentions=True)
    np.testing.assert_allclose(np.stack(out.hidden_states), g["hidden_states"], rtol=0, atol=1e-5)
    np.testing.assert_allclose(np.stack([out.attentions[l] for l in range(2)]), g["attentions"], rtol=0, atol=1e-5)
    np.testing.assert_allclose(out.last_hidden_state, g["last_hidden_state"], rtol=0, atol=1e-5)
    assert model.checkpoint.spec.name == "timm-vit" and model.dims.heads == 3


def test_folder_with_pytorch_model_bin(reference_profiles):
    folder = PICKLES / "vit-ddp"  # an HF folder holding config.json and pytorch_model.bin instead of model.safetensors
    prof = qkweights.profile(str(folder), save_vectors=True)
    assert_same_profile(prof, reference_profiles("vit"))
    assert prof.source["kind"] == "folder" and [f["name"] for f in prof.source["files"]] == ["pytorch_model.bin"]


def test_training_checkpoint_part_model_equals_the_whole_file(reference_profiles):
    prof = qkweights.profile(str(PICKLES / "vit-training" / "checkpoint.pth"), part="model", save_vectors=True)
    assert_same_profile(prof, reference_profiles("vit"))
    assert prof.source["part"] == "model"


# ---- I-JEPA research checkpoint: parts


def test_ijepa_default_part_is_the_encoder(capsys, reference_profiles):
    with pytest.warns(QkWarning) as caught:
        prof = qkweights.profile(str(IJEPA), save_vectors=True)
    note = (
        "IN1K-vit-tiny.pth.tar holds encoder, opt, predictor, target_encoder; reading 'encoder' (choose another with "
        "part=NAME)"
    )
    assert [str(w.message) for w in caught] == [note] and capsys.readouterr().err == ""
    from qkweights.cli import main  # the command line prints the note, with the option as a flag

    assert main(["inspect", str(IJEPA)]) == 0
    assert capsys.readouterr().err.splitlines()[0] == (
        "qkweights: note: IN1K-vit-tiny.pth.tar holds encoder, opt, predictor, "
        "target_encoder; reading 'encoder' (choose another with --part NAME)"
    )
    assert prof.source["part"] == "encoder" and prof.model.family == "timm-vit"
    assert_same_profile(prof, reference_profiles("ijepa"))  # hf ijepa fixture: the same weights
    explicit = qkweights.profile(str(IJEPA), part="encoder", save_vectors=True)
    assert capsys.readouterr().err == ""
    assert_same_profile(explicit, prof)


def dense_singular_values(store, template, layers, heads, k):
    """(L, H, K) reference: the dense SVD of W_q,hᵀ W_k,h from timm's fused rows [q | k | v], head-major."""
    out = []
    for l in range(layers):
        qkv = store.get(template.format(l)).astype(np.float64)
        d = qkv.shape[1]
        out.append(
            [
                np.linalg.svd(qkv[k * h : k * (h + 1)].T @ qkv[d + k * h : d + k * (h + 1)], compute_uv=False)[:k]
                for h in range(heads)
            ]
        )
    return np.array(out)


def test_ijepa_target_encoder_differs():
    enc, tgt = qkweights.profile(str(IJEPA), part="encoder"), qkweights.profile(str(IJEPA), part="target_encoder")
    assert tgt.source["part"] == "target_encoder" and tgt.model.family == "timm-vit"
    want = dense_singular_values(TorchStore.open(IJEPA, part="target_encoder"), "blocks.{}.attn.qkv.weight", 2, 4, 8)
    np.testing.assert_allclose(tgt.singular_values, want, rtol=1e-9)
    assert tgt.singular_values.shape == enc.singular_values.shape == (2, 4, 8)
    assert not np.allclose(tgt.singular_values, enc.singular_values, rtol=1e-3)


def test_ijepa_predictor_is_detected_with_heads_of_width_24():
    prof = qkweights.profile(str(IJEPA), part="predictor", save_vectors=True)
    m = prof.model
    assert (m.family, m.layers, m.hidden, m.heads, m.head_dim, m.dtype) == ("ijepa-predictor", 3, 48, 2, 24, "F32")
    want = dense_singular_values(
        TorchStore.open(IJEPA, part="predictor"), "predictor_blocks.{}.attn.qkv.weight", 3, 2, 24
    )
    np.testing.assert_allclose(prof.singular_values, want, rtol=1e-9)


def test_ijepa_predictor_has_no_forward_pass():
    with pytest.raises(InputError) as err:
        qkweights.load_model(str(IJEPA), part="predictor")
    message = str(err.value)
    assert "predictor" in message and "forward pass" in message and "text" not in message and "\n" not in message


def test_ijepa_unknown_part_lists_the_parts():
    with pytest.raises(CheckpointError) as err:
        open_model(str(IJEPA), part="nope")
    assert str(err.value) == (
        "IN1K-vit-tiny.pth.tar: has no part 'nope' (parts: encoder, opt, predictor, target_encoder); choose one "
        "of those"
    )


# ---- the Hub: pytorch_model.bin only with allow_pickle


def test_hub_pickle_needs_allow_pickle(hub_cache, reference_profiles):
    files = {
        "config.json": MODELS / "vit" / "config.json",
        "pytorch_model.bin": PICKLES / "vit-ddp" / "pytorch_model.bin",
    }
    make_hub_cache(hub_cache, "qkw-test/vit-pickle", files, commit="d" * 40, tree=True)
    with pytest.raises(SourceError) as err:
        qkweights.profile("qkw-test/vit-pickle")
    assert "allow_pickle=True" in str(err.value) and "\n" not in str(err.value)
    prof = qkweights.profile("qkw-test/vit-pickle", allow_pickle=True, save_vectors=True)
    assert_same_profile(prof, reference_profiles("vit"))
    assert prof.source["kind"] == "hub" and prof.source["commit"] == "d" * 40
    bin_file = PICKLES / "vit-ddp" / "pytorch_model.bin"
    assert prof.source["files"] == [
        {"name": "pytorch_model.bin", "bytes": bin_file.stat().st_size, "sha256": sha256(bin_file)}
    ]


# ---- the command line


def run_cli(*args):
    env = {"PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1", "MPLBACKEND": "Agg"}
    # this process's BLAS kernel and threads (OPENBLAS_CORETYPE, …): the CLI's numbers are then this process's, bit
    # for bit, by construction; under another kernel they would differ in the last digits
    env |= {k: v for k, v in os.environ.items() if k.startswith(("OPENBLAS_", "OMP_", "MKL_"))}
    return subprocess.run(
        [sys.executable, "-m", "qkweights", *args], capture_output=True, text=True, cwd=FIXTURES.parents[1], env=env
    )


@pytest.mark.numerics
def test_cli_profile_of_a_part(tmp_path):
    res = run_cli("profile", str(IJEPA), "--part", "target_encoder", "--out", str(tmp_path), "--no-plots")
    assert res.returncode == 0, res.stderr
    assert res.stderr == ""  # an explicit part: no note about the default
    doc = json.loads((tmp_path / "profile.json").read_text())
    assert doc["source"]["part"] == "target_encoder" and doc["model"]["family"] == "timm-vit"
    want = qkweights.profile(str(IJEPA), part="target_encoder")
    np.testing.assert_array_equal(
        [[h["weighted_cosine"] for h in layer["heads"]] for layer in doc["layers"]], want.weighted
    )
    assert doc == json.loads(want.json_text())  # every digit profile.json prints: the API's, on the same BLAS kernel


def test_cli_refuses_a_malicious_pickle_without_running_it(tmp_path):
    MARKER.unlink(missing_ok=True)
    res = run_cli("profile", str(EVIL), "--out", str(tmp_path / "o"))
    assert res.returncode == 2
    assert re.fullmatch(
        r"qkweights: error: evil_os_system\.pt: refuses to load global (posix|os)\.system \(not a tensor or a known "
        r"checkpoint container\); qkweights never runs code from checkpoints\n",
        res.stderr,
    ), res.stderr
    assert not MARKER.exists() and not (tmp_path / "o").exists()
