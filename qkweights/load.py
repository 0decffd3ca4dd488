"""From a MODEL argument to a spec-bound checkpoint: source → tensors → spec."""

from __future__ import annotations

from qkweights.source import Source, resolve
from qkweights.spec import Checkpoint, open_checkpoint
from qkweights.tensors import TensorStore


def open_model(model: str, *, revision: str | None = None, family: str | None = None,
               progress: bool | None = None) -> tuple[Source, Checkpoint]:
    """Resolve ``model`` (Hub id, folder or file), open its tensors and bind its family's spec."""
    source = resolve(model, revision=revision, progress=progress)
    store = TensorStore.open(source.weight_files)
    return source, open_checkpoint(store, source.config_files, family=family)
