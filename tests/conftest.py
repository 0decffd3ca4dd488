"""Shared fixtures: the committed tiny checkpoints, and an offline Hub cache; helpers used by several test folders."""

import csv
import shutil
from pathlib import Path

import pytest
from huggingface_hub import constants
from safetensors.numpy import load_file, save_file

FIXTURES = Path(__file__).parent / "fixtures"
MODELS = FIXTURES / "models"
GOLDEN = FIXTURES / "golden"
VISION_FIXTURES = sorted(p.name for p in MODELS.iterdir() if p.name not in ("bert", "roberta-mlm"))


@pytest.fixture
def hub_cache(tmp_path, monkeypatch) -> Path:
    """An empty Hub cache, with huggingface_hub in offline mode pointed at it.

    huggingface_hub reads HF_HUB_CACHE / HF_HUB_OFFLINE into its constants at import
    time, so both the environment and the constants are set (as its own tests do).
    """
    cache = tmp_path / "hub"
    cache.mkdir()
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    return cache


def vit_qk_name(l: int, which: str) -> str:
    """The name of layer l's query/key/value weight in the `vit` fixture (transformers' names)."""
    return f"encoder.layer.{l}.attention.attention.{which}.weight"


def flip_value_head(tensors, l: int = 1, h: int = 2, k: int = 8) -> None:
    """Negate head h's rows of layer l's value weight in the `vit` fixture's tensors (heads of width k): its OV circuit
    flips sign, its query-key part is unchanged."""
    tensors[vit_qk_name(l, "value")][h * k : (h + 1) * k] *= -1


def read_csv(path) -> list[dict[str, str]]:
    """The rows of a CSV file, as dicts keyed by its header."""
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def vit():
    """The `vit` fixture loaded for the forward pass, once per test module."""
    from qkweights.vision.model import open_vision_model

    return open_vision_model(str(MODELS / "vit"))


@pytest.fixture(scope="module")
def baseline(tmp_path_factory) -> Path:
    """The `vit` fixture's profile.json, saved once per test module (a baseline for `check`)."""
    import qkweights

    out = tmp_path_factory.mktemp("baseline")
    qkweights.profile(str(MODELS / "vit")).save(out)
    return out / "profile.json"


def edited_fixture(tmp_path: Path, label: str, edit, name: str = "vit") -> Path:
    """A copy of fixture ``name`` in tmp_path/label whose tensors were changed in place by ``edit(tensors)``."""
    out = shutil.copytree(MODELS / name, tmp_path / label)
    tensors = load_file(out / "model.safetensors")
    edit(tensors)
    save_file(tensors, str(out / "model.safetensors"))
    return out


def one_layer_vit(folder: Path, *, wq, wk, bq=None, pos=None, conv=None, conv_bias=None, resample: int = 2) -> Path:
    """A one-layer hf-vit of width d (2 heads, image 32, patch 8: CLS + 16 patches) with the given query/key
    weights (d, d), query bias, position table (1, 17, d), patch conv (d, 3, 8, 8) and its bias; every other weight is
    zero, the LayerNorms are identities. For tests whose attention or modes are known by hand."""
    import json

    import numpy as np

    def zero(*s):
        return np.zeros(s, np.float32)

    folder.mkdir(parents=True)
    d = wq.shape[1]
    f, p = d, "encoder.layer.0."
    tensors = {
        "embeddings.cls_token": zero(1, 1, d),
        "embeddings.position_embeddings": zero(1, 17, d) if pos is None else pos,
        "embeddings.patch_embeddings.projection.weight": zero(d, 3, 8, 8) if conv is None else conv,
        "embeddings.patch_embeddings.projection.bias": zero(d) if conv_bias is None else conv_bias,
        p + "attention.attention.query.weight": wq,
        p + "attention.attention.query.bias": zero(d) if bq is None else bq,
        p + "attention.attention.key.weight": wk,
        p + "attention.attention.key.bias": zero(d),
        p + "attention.attention.value.weight": zero(d, d),
        p + "attention.attention.value.bias": zero(d),
        p + "attention.output.dense.weight": zero(d, d),
        p + "attention.output.dense.bias": zero(d),
        p + "intermediate.dense.weight": zero(f, d),
        p + "intermediate.dense.bias": zero(f),
        p + "output.dense.weight": zero(d, f),
        p + "output.dense.bias": zero(d),
        p + "layernorm_before.weight": np.ones(d, np.float32),
        p + "layernorm_before.bias": zero(d),
        p + "layernorm_after.weight": np.ones(d, np.float32),
        p + "layernorm_after.bias": zero(d),
        "layernorm.weight": np.ones(d, np.float32),
        "layernorm.bias": zero(d),
    }
    save_file(tensors, str(folder / "model.safetensors"))
    config = {
        "model_type": "vit",
        "architectures": ["ViTModel"],
        "hidden_size": d,
        "num_hidden_layers": 1,
        "num_attention_heads": 2,
        "intermediate_size": f,
        "hidden_act": "gelu",
        "layer_norm_eps": 1e-12,
        "image_size": 32,
        "patch_size": 8,
        "num_channels": 3,
        "qkv_bias": True,
    }
    (folder / "config.json").write_text(json.dumps(config))
    (folder / "preprocessor_config.json").write_text(
        json.dumps(
            {"image_processor_type": "ViTImageProcessor", "size": {"height": 32, "width": 32}, "resample": resample}
        )
    )
    return folder


def quadrant_scenes(folder: Path, n: int = 2) -> Path:
    """``n`` synthetic O3 scenes (48×48) in ``folder`` whose instance maps are four quadrants: each object covers
    whole patches of the 32-pixel fixture ViTs, so every image is eligible for same-object."""
    import numpy as np
    from PIL import Image

    from qkweights.datasets.synthetic_o3 import make_o3

    make_o3(folder, n=n, seed=1, size=(48, 48), instances=True)
    quadrants = np.kron(np.array([[1, 2], [3, 4]], np.uint8), np.ones((24, 24), np.uint8))  # (48, 48) labels 1–4
    for path in (folder / "instances").iterdir():
        Image.fromarray(quadrants).save(path)
    return folder


@pytest.fixture(scope="session")
def demo_out(tmp_path_factory) -> Path:
    """The demo's outputs, with its atlas (``demo_out / "atlas"``), run once per session."""
    from qkweights.demo import run_demo

    out = tmp_path_factory.mktemp("demo")
    run_demo(out)
    return out


@pytest.fixture(scope="module")
def atlas(demo_out) -> Path:
    """The demo's atlas folder."""
    return demo_out / "atlas"


# The peak RSS of a call in a fresh interpreter (Linux's VmHWM), for the memory tests of large images.
PEAK_SCRIPT = """
import gc, re, sys
from pathlib import Path
from qkweights.vision.model import open_vision_model

def peak():
    return int(re.search(r"VmHWM:\\s+(\\d+) kB", Path("/proc/self/status").read_text()).group(1)) * 1024

model = open_vision_model(sys.argv[1])
{setup}
gc.collect()
base = peak()
{call}
print(peak() - base)
"""


def peak_bytes_per_pixel(call: str, pixels: int, setup: str = "", model: str = "vit") -> float:
    """The growth of peak RSS while ``call`` runs (a fresh interpreter; ``model`` loaded first), per image pixel."""
    import subprocess
    import sys

    if not Path("/proc/self/status").is_file():
        pytest.skip("needs Linux's /proc/self/status (VmHWM)")

    script = PEAK_SCRIPT.format(setup=setup, call=call)
    out = subprocess.run(
        [sys.executable, "-c", script, str(MODELS / model)], capture_output=True, text=True, check=True
    ).stdout
    return int(out.split()[-1]) / pixels


def big_jpeg(path: Path, width: int = 4000, height: int = 3000, exif=None) -> Path:
    """A photo-like JPEG of width × height: Pillow's Gaussian noise image, in colour."""
    from PIL import Image

    noise = Image.effect_noise((width, height), 40)  # L, mean 128
    Image.merge("RGB", (noise, noise.transpose(Image.Transpose.FLIP_LEFT_RIGHT), noise)).save(
        path, quality=90, **({"exif": exif} if exif is not None else {})
    )
    return path


U32 = 2.0**-24  # float32 unit roundoff
# float32 forward vs transformers' float32 forward, two summation orders: a float32 sum of n terms is off by
# ≲ √n·u·Σ|terms| (Higham & Mary's probabilistic bound, the worst case being n·u), two orders by twice that. Each of
# the L = 2 blocks of the fixtures adds two such sums (attention output; MLP, width F ≤ 192) to a residual stream of
# size |h| < 10, so |Δ| ≲ L·2·2·√F·u·10 ≈ 6.6e-5; the attentions (p ≤ 1, moved by ≤ 2|Δlogit|) stay below it.
FORWARD_ATOL = 2 * 2 * 2 * 192**0.5 * U32 * 10


def attention_atol(x, wq, wk, bq, bk, probs):
    """Elementwise bound (B, T, T) on |float32 attention of one head − its float64 recomputation ``probs``.

    x: (B, T, D) the float32 LayerNorm output (as float64); wq, wk: (K, D); bq, bk: (K,). A float32 sum of n products
    is off by ≲ √n·u·Σ|products| (Higham & Mary's probabilistic bound; the worst case is n·u): the q and k entries
    (n = D, plus the bias), then each logit (n = K), then its scale and bias additions, so
    |Δz_ij| ≲ (√D + √K + 3)·u·(|x||W_q|ᵀ + |b_q|)_i·(|x||W_k|ᵀ + |b_k|)_j/√K. Softmax moves p_j by
    p_j·(|Δz_j| + Σ_k p_k|Δz_k|), and rounds by ≲ (T + 3)·u·p_j itself (exp, the T-term sum, the divide).
    """
    import math

    import numpy as np

    k, d = wq.shape
    qa = np.abs(x) @ np.abs(wq.T) + np.abs(bq)  # (B, T, K) Σ|terms| of each q entry
    ka = np.abs(x) @ np.abs(wk.T) + np.abs(bk)
    dz = (math.sqrt(d) + math.sqrt(k) + 3) * U32 * (qa @ ka.swapaxes(-1, -2)) / math.sqrt(k)  # (B, T, T)
    return probs * (dz + (probs * dz).sum(-1, keepdims=True) + (x.shape[1] + 3) * U32)
