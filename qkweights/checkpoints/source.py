"""Turn the MODEL argument into local files: a Hub repo id, a folder or a weight file.

Hub repos go through ``huggingface_hub.snapshot_download`` into the normal cache, so
HF_HOME, HF_HUB_CACHE, HF_HUB_OFFLINE and HF_TOKEN mean what they mean for every other
Hugging Face tool. Only the files this package reads are fetched: the JSON configs, the
safetensors index and the .safetensors weights; PyTorch pickles (``pytorch_model.bin``) only
with ``allow_pickle`` and only when the repo has no safetensors on main nor on a conversion
branch; never .h5, .msgpack or .onnx. Local PyTorch files (.bin, .pt, .pth, .pth.tar) are
accepted as they are: :mod:`qkweights.checkpoints.pytorch` reads them without running code.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from huggingface_hub import constants

from qkweights.checkpoints.folders import (
    INDEX_NAME,
    PICKLE_SUFFIXES,
    SUFFIX,
    Source,
    configs_in,
    folder_names,
    listing,
    pickle_names,
    weight_names,
)
from qkweights.errors import InputError, SourceError

_COMMIT = re.compile(r"[0-9a-f]{40}")


def resolve(
    model: str, *, revision: str | None = None, progress: bool | None = None, allow_pickle: bool = False
) -> Source:
    """Find or fetch the files of MODEL.

    MODEL is an existing folder (save_pretrained output, Hub cache snapshot, open_clip folder),
    an existing .safetensors or PyTorch file, or else a Hub repo id (``org/name`` or ``name``).
    ``revision`` applies to Hub ids only; ``allow_pickle`` lets a Hub repo without safetensors
    fall back to its ``pytorch_model.bin``. Download progress bars are shown only when stderr is a terminal and
    ``progress`` is not False. Raises SourceError with a one-line message naming the fix.
    """
    if not model.strip():
        raise InputError("MODEL is empty; give a Hub repo id (ORG/NAME), a folder or a .safetensors file")
    path = Path(model).expanduser()
    if path.is_dir() or path.is_file():
        if revision is not None:
            raise InputError(f"{model}: revision=… applies to Hub repo ids only; drop it for a local path")
        return _folder_source(path.absolute()) if path.is_dir() else _file_source(path.absolute())
    if _looks_like_path(model):
        raise SourceError(f"{model}: no such file or folder; check the path")
    from qkweights.checkpoints.hub import (
        hub_source,  # huggingface_hub's download stack loads only for Hub ids
    )

    return hub_source(model, revision=revision, progress=progress, allow_pickle=allow_pickle)


def _looks_like_path(model: str) -> bool:
    """True when MODEL can only be a path: a repo id is ``name`` or ``org/name``."""
    return (
        model.startswith((".", "~", "/", os.sep))
        or model.endswith((SUFFIX, *PICKLE_SUFFIXES))
        or (os.sep != "/" and os.sep in model)
        or model.count("/") > 1
    )


def _file_source(path: Path) -> Source:
    if not path.name.endswith((SUFFIX, *PICKLE_SUFFIXES)):
        raise SourceError(
            f"{path}: not a weight file (.safetensors, or a PyTorch {', '.join(PICKLE_SUFFIXES)}); pass the "
            "checkpoint file or its folder"
        )
    _check_readable(path)
    folder = path.parent
    names = folder_names(folder)
    return Source(
        model_id=str(path),
        kind="file",
        folder=folder,
        weight_files=(path,),
        config_files=configs_in(folder, names),
        revision=None,
        commit=None,
    )


def _folder_source(folder: Path) -> Source:
    names = folder_names(folder)
    weights = weight_names(folder, names, str(folder)) or pickle_names(names)
    if not weights:
        raise SourceError(
            f"{folder}: no weight file (.safetensors or pytorch_model.bin) among its files ({listing(names)}); "
            "pass the folder that holds the checkpoint"
        )
    missing = [n for n in weights if not (folder / n).is_file()]
    if missing:
        raise SourceError(
            f"{folder / INDEX_NAME}: names shard(s) missing from the folder: {', '.join(missing)}; "
            "download every shard listed in the index next to it"
        )
    repo_id, commit = _snapshot_identity(folder)
    # A Hub cache snapshot links into ../../blobs; anything else must stay inside the folder.
    root = folder.parent.parent if repo_id else folder
    for name in weights + list(configs_in(folder, names)):
        _check_inside(folder / name, root)
    for name in weights:
        _check_readable(folder / name)
    return Source(
        model_id=repo_id or str(folder),
        kind="folder",
        folder=folder,
        weight_files=tuple(folder / n for n in weights),
        config_files=configs_in(folder, names),
        revision=None,
        commit=commit,
    )


def _snapshot_identity(folder: Path) -> tuple[str | None, str | None]:
    """(repo id, commit) when folder is ``models--ORG--NAME/snapshots/<sha>`` of a Hub cache, else (None, None)."""
    repo_folder = folder.parent.parent.name
    in_snapshots = folder.parent.name == "snapshots" and _COMMIT.fullmatch(folder.name) is not None
    if not (in_snapshots and repo_folder.startswith("models--")):
        return None, None
    return "/".join(repo_folder.split(constants.REPO_ID_SEPARATOR)[1:]), folder.name


def _check_inside(path: Path, root: Path) -> None:
    """Refuse a file that is a symlink leading out of the model's folder."""
    if path.is_symlink() and not path.resolve().is_relative_to(root.resolve()):
        raise SourceError(
            f"{path}: is a symlink to {path.resolve()}, outside the model folder; copy the file into the "
            "folder if it is really part of the model"
        )


def _check_readable(path: Path) -> None:
    if not os.access(path, os.R_OK):
        raise SourceError(f"{path}: permission denied reading the file; grant read access (chmod u+r)")
