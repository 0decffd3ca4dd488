"""Turn the MODEL argument into local files: a Hub repo id, a folder or a weight file.

Hub repos go through ``huggingface_hub.snapshot_download`` into the normal cache, so
HF_HOME, HF_HUB_CACHE, HF_HUB_OFFLINE and HF_TOKEN mean what they mean for every other
Hugging Face tool. Only the files this package reads are fetched: the JSON configs, the
safetensors index and the .safetensors weights; PyTorch pickles (``pytorch_model.bin``) only
with ``allow_pickle`` and only when the repo has no safetensors on main nor on a conversion
branch; never .h5, .msgpack or .onnx. Local PyTorch files (.bin, .pt, .pth, .pth.tar) are
accepted as they are: :mod:`qkweights.torch_pickle` reads them without running code.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path, PurePosixPath

from huggingface_hub import constants

from qkweights.errors import CheckpointError, InputError, SourceError

CONFIG_NAMES = ("config.json", "preprocessor_config.json", "open_clip_config.json")
INDEX_NAME = "model.safetensors.index.json"
PREFERRED_WEIGHTS = ("model.safetensors", "open_clip_model.safetensors")
SUFFIX = ".safetensors"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pth.tar", ".ckpt")
PICKLE_WEIGHTS = ("pytorch_model.bin", "open_clip_pytorch_model.bin")
HASH_CHUNK = 1 << 20
LISTED_NAMES = 10
PICKLE_NOTE = "PyTorch pickles are fetched from the Hub only with --allow-pickle (they are read without running code)"
_COMMIT = re.compile(r"[0-9a-f]{40}")


@dataclass(frozen=True)
class Source:
    """Local files of one model, and where they came from.

    ``weight_files`` are the .safetensors files to read: every shard named by the index, in
    index order, or the single file. ``commit`` is the resolved commit sha for Hub repos and
    cache snapshot folders, None for other local files.
    """

    model_id: str
    kind: str
    folder: Path
    weight_files: tuple[Path, ...]
    config_files: dict[str, Path]
    revision: str | None
    commit: str | None

    @cached_property
    def _digests(self) -> tuple[tuple[str, int, str], ...]:
        """(name relative to folder, size in bytes, sha256 hex) of each weight file, computed once."""
        return tuple(
            (path.relative_to(self.folder).as_posix(), path.stat().st_size, _sha256(path))
            for path in self.weight_files
        )

    def to_json(self) -> dict:
        """Provenance record: model id, kind, revision, commit, and name/bytes/sha256 of each weight file."""
        return {
            "model_id": self.model_id,
            "kind": self.kind,
            "revision": self.revision,
            "commit": self.commit,
            "files": [{"name": n, "bytes": b, "sha256": h} for n, b, h in self._digests],
        }


def resolve(model: str, *, revision: str | None = None, progress: bool | None = None, allow_pickle: bool = False) -> Source:
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
            raise InputError(f"{model}: --revision applies to Hub repo ids only; drop it for a local path")
        return _folder_source(path.absolute()) if path.is_dir() else _file_source(path.absolute())
    if _looks_like_path(model):
        raise SourceError(f"{model}: no such file or folder; check the path")
    from qkweights.hub import hub_source  # huggingface_hub's download stack loads only for Hub ids

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
        raise SourceError(f"{path}: not a weight file (.safetensors, or a PyTorch {', '.join(PICKLE_SUFFIXES)}); pass the checkpoint file or its folder")
    _check_readable(path)
    folder = path.parent
    names = _folder_names(folder)
    return Source(
        model_id=str(path),
        kind="file",
        folder=folder,
        weight_files=(path,),
        config_files=_configs(folder, names),
        revision=None,
        commit=None,
    )


def _folder_source(folder: Path) -> Source:
    names = _folder_names(folder)
    weights = _weight_names(folder, names, str(folder)) or _pickle_names(names)
    if not weights:
        raise SourceError(
            f"{folder}: no weight file (.safetensors or pytorch_model.bin) among its files ({_listing(names)}); pass the folder that holds the checkpoint"
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
    for name in weights + list(_configs(folder, names)):
        _check_inside(folder / name, root)
    for name in weights:
        _check_readable(folder / name)
    return Source(
        model_id=repo_id or str(folder),
        kind="folder",
        folder=folder,
        weight_files=tuple(folder / n for n in weights),
        config_files=_configs(folder, names),
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


def _pickle_names(names: list[str]) -> list[str]:
    """The one PyTorch weight file among ``names`` (the usual names first), or []."""
    for preferred in PICKLE_WEIGHTS:
        if preferred in names:
            return [preferred]
    candidates = [n for n in names if n.endswith(PICKLE_SUFFIXES) and "/" not in n and not n.startswith(("training_args", "optimizer", "scheduler"))]
    return candidates if len(candidates) == 1 else []


def _weight_names(folder: Path, names: list[str], where: str) -> list[str]:
    """Weight file names relative to folder: the index's shards, else the one .safetensors to read, else []."""
    if (folder / INDEX_NAME).is_file():
        return _index_shards(folder / INDEX_NAME)
    candidates = sorted(n for n in names if n.endswith(SUFFIX))
    if len(candidates) <= 1:
        return candidates
    for preferred in PREFERRED_WEIGHTS:
        if preferred in candidates:
            return [preferred]
    raise SourceError(
        f"{where}: several .safetensors files and no {INDEX_NAME} ({', '.join(candidates)}); "
        "pass the path of the one to read as MODEL"
    )


def _index_shards(index_path: Path) -> list[str]:
    """Shard file names of a safetensors index, in order of first appearance in weight_map."""
    try:
        weight_map = json.loads(index_path.read_text(encoding="utf-8"))["weight_map"]
        shards = list(dict.fromkeys(weight_map.values()))
    except (ValueError, KeyError, TypeError, AttributeError) as err:
        raise CheckpointError(
            f"{index_path}: not a safetensors index ({type(err).__name__}: {err}); re-download it"
        ) from err
    for shard in shards:
        parts = PurePosixPath(shard).parts if isinstance(shard, str) else ()
        if not parts or not shard.endswith(SUFFIX) or parts[0] == "/" or ".." in parts:
            raise CheckpointError(
                f"{index_path}: shard {shard!r} is not a .safetensors file inside the folder; re-download the index"
            )
    return shards


def _folder_names(folder: Path) -> list[str]:
    """Sorted names of the files directly in folder (symlinks followed)."""
    try:
        return sorted(p.name for p in folder.iterdir() if p.is_file())
    except PermissionError as err:
        raise SourceError(
            f"{folder}: permission denied listing the folder; grant read access (chmod u+rx) or copy the model elsewhere"
        ) from err


def _check_inside(path: Path, root: Path) -> None:
    """Refuse a file that is a symlink leading out of the model's folder."""
    if path.is_symlink() and not path.resolve().is_relative_to(root.resolve()):
        raise SourceError(f"{path}: is a symlink to {path.resolve()}, outside the model folder; copy the file into the folder if it is really part of the model")


def _check_readable(path: Path) -> None:
    if not os.access(path, os.R_OK):
        raise SourceError(f"{path}: permission denied reading the file; grant read access (chmod u+r)")


def _configs(folder: Path, names: list[str]) -> dict[str, Path]:
    return {name: folder / name for name in CONFIG_NAMES if name in names}


def _listing(names: list[str]) -> str:
    shown = ", ".join(names[:LISTED_NAMES]) or "none"
    return shown + (f", ... ({len(names) - LISTED_NAMES} more)" if len(names) > LISTED_NAMES else "")


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(HASH_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()
