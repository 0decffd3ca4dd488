"""Shared fixtures: the committed tiny checkpoints, and an offline Hub cache."""

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


def edited_fixture(tmp_path: Path, label: str, edit, name: str = "vit") -> Path:
    """A copy of fixture ``name`` in tmp_path/label whose tensors were changed in place by ``edit(tensors)``."""
    out = shutil.copytree(MODELS / name, tmp_path / label)
    tensors = load_file(out / "model.safetensors")
    edit(tensors)
    save_file(tensors, str(out / "model.safetensors"))
    return out
