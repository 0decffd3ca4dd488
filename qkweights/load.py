"""From a MODEL argument to a spec-bound checkpoint: source → tensors → spec."""

from __future__ import annotations

import warnings

from qkweights.errors import CheckpointError, QkWarning
from qkweights.folders import SUFFIX, Source
from qkweights.source import resolve
from qkweights.spec import Checkpoint, open_checkpoint
from qkweights.tensors import TensorStore
from qkweights.torch_pickle import TorchStore

# Research checkpoints that hold several networks (I-JEPA: encoder, target_encoder, predictor) are
# read through this part unless part= names another.
DEFAULT_PART = "encoder"


def open_store(source: Source, *, part: str | None = None):
    """The tensors of ``source``: safetensors files, or one PyTorch file read by the restricted unpickler."""
    files = source.weight_files
    if all(f.name.endswith(SUFFIX) for f in files):
        if part is not None:
            raise CheckpointError(f"part={part} applies to PyTorch training checkpoints; {files[0].name} is safetensors, drop part={part}")
        return TensorStore.open(files)
    if len(files) != 1:
        raise CheckpointError(f"{source.model_id}: sharded PyTorch checkpoints ({', '.join(f.name for f in files)}) are not supported; convert them to safetensors")
    store = TorchStore.open(files[0])
    if part is not None:
        return store.select(part)
    if DEFAULT_PART in store.parts() and len(store.parts()) > 1:
        warnings.warn(f"{files[0].name} holds {', '.join(store.parts())}; reading {DEFAULT_PART!r} (choose another with part=NAME)",
                      QkWarning, stacklevel=2)
        store = store.select(DEFAULT_PART)
    return store


def source_record(source: Source, ck: Checkpoint) -> dict:
    """The provenance written into every output: the source's record, plus the part read from a training checkpoint."""
    part = ck.store.metadata.get("part")
    return {**source.to_json(), **({"part": part} if part else {})}


def open_model(model: str, *, revision: str | None = None, family: str | None = None, part: str | None = None,
               allow_pickle: bool = False, progress: bool | None = None) -> tuple[Source, Checkpoint]:
    """Resolve ``model`` (Hub id, folder or file), open its tensors and bind its family's spec."""
    source = resolve(model, revision=revision, progress=progress, allow_pickle=allow_pickle)
    return source, open_checkpoint(open_store(source, part=part), source.config_files, family=family)
