"""Shared fixtures: the committed tiny checkpoints, and an offline Hub cache."""

from pathlib import Path

import pytest
from huggingface_hub import constants

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
