"""From a MODEL argument to a spec-bound checkpoint: source → tensors → spec."""

from __future__ import annotations

import warnings

from qkweights.checkpoints.folders import SUFFIX, Source
from qkweights.checkpoints.pytorch.store import TorchStore
from qkweights.checkpoints.source import resolve
from qkweights.checkpoints.tensors import TensorStore
from qkweights.errors import CheckpointError, QkWarning
from qkweights.specs.checkpoint import Checkpoint, open_checkpoint
from qkweights.specs.registry import config_names, default_parts, load_specs


def open_store(source: Source, *, part: str | None = None, defaults: tuple[str, ...] = ()):
    """The tensors of ``source``: safetensors files, or one PyTorch file read by the restricted unpickler.

    A research checkpoint holding several networks (I-JEPA: encoder, target_encoder, predictor) is read
    through ``part``, else through the first of ``defaults`` it holds (the specs' ``default_part``).
    """
    files = source.weight_files
    if all(f.name.endswith(SUFFIX) for f in files):
        if part is not None:
            raise CheckpointError(
                f"part={part} applies to PyTorch training checkpoints; {files[0].name} is safetensors, drop part={part}"
            )
        return TensorStore.open(files)
    if len(files) != 1:
        raise CheckpointError(
            f"{source.model_id}: sharded PyTorch checkpoints ({', '.join(f.name for f in files)}) are not "
            "supported; convert them to safetensors"
        )
    store = TorchStore.open(files[0])
    if part is not None:
        return store.select(part)
    default = next((p for p in defaults if p in store.parts()), None)
    if default is not None and len(store.parts()) > 1:
        warnings.warn(
            f"{files[0].name} holds {', '.join(store.parts())}; reading {default!r} (choose another with part=NAME)",
            QkWarning,
            stacklevel=2,
        )
        store = store.select(default)
    return store


def source_record(source: Source, ck: Checkpoint) -> dict:
    """The provenance written into every output: the source's record, plus the part read from a training checkpoint,
    and the spec that read it (``spec``: :meth:`qkweights.specs.schema.Spec.provenance`, its file and sha256)."""
    part = ck.store.metadata.get("part")
    return {**source.to_json(), **({"part": part} if part else {}), "spec": ck.spec.provenance()}


def open_model(
    model: str,
    *,
    revision: str | None = None,
    family: str | None = None,
    part: str | None = None,
    allow_pickle: bool = False,
    progress: bool | None = None,
    spec_dir=None,
    specs: dict | None = None,
) -> tuple[Source, Checkpoint]:
    """Resolve ``model`` (Hub id, folder or file), open its tensors and bind its family's spec.

    ``spec_dir``: a folder (or a list of folders) of user spec files, searched before ``QKWEIGHTS_SPEC_PATH``
    and the shipped specs (see :func:`qkweights.specs.registry.load_specs`). ``specs``: the families to choose from,
    resolved already (a worker opening the model its client resolved); ``spec_dir`` and ``QKWEIGHTS_SPEC_PATH``
    are then unread.
    """
    specs = specs if specs is not None else load_specs(spec_dir=spec_dir)
    source = resolve(model, revision=revision, progress=progress, allow_pickle=allow_pickle)
    store = open_store(source, part=part, defaults=default_parts(specs))
    return source, open_checkpoint(
        store, {**_declared_configs(source, specs), **source.config_files}, family=family, specs=specs
    )


def _declared_configs(source: Source, specs) -> dict:
    """Config files that (user) specs name beyond the usual ones, found inside a local checkpoint folder."""
    folder = source.folder.resolve()
    found = {}
    for name in config_names(specs):
        path = source.folder / name
        if name not in source.config_files and path.is_file() and path.resolve().is_relative_to(folder):
            found[name] = path
    return found
