"""What a model's files are: the weight and config files to read from a folder, and the :class:`Source` record.

Shared by the local path (:mod:`qkweights.checkpoints.source`) and the Hub path (:mod:`qkweights.checkpoints.hub`),
which pick files from a listing the same way; neither imports the other's helpers. Also which files of a folder are
images (:func:`image_suffixes`), and why a path given as a folder is none (:func:`not_a_folder`)."""

from __future__ import annotations

import functools
import hashlib
import json
import os
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path, PurePosixPath

from qkweights.errors import CheckpointError, SourceError

CONFIG_NAMES = ("config.json", "preprocessor_config.json", "open_clip_config.json")
INDEX_NAME = "model.safetensors.index.json"
PREFERRED_WEIGHTS = ("model.safetensors", "open_clip_model.safetensors")
SUFFIX = ".safetensors"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pth.tar", ".ckpt")
PICKLE_WEIGHTS = ("pytorch_model.bin", "open_clip_pytorch_model.bin")
HASH_CHUNK = 1 << 20
LISTED_NAMES = 10
PICKLE_NOTE = (
    "PyTorch pickles are fetched from the Hub only with allow_pickle=True (they are read without running code)"
)


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
            (path.relative_to(self.folder).as_posix(), path.stat().st_size, sha256(path)) for path in self.weight_files
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


def pickle_names(names: list[str]) -> list[str]:
    """The one PyTorch weight file among ``names`` (the usual names first), or []."""
    for preferred in PICKLE_WEIGHTS:
        if preferred in names:
            return [preferred]
    candidates = [
        n
        for n in names
        if n.endswith(PICKLE_SUFFIXES)
        and "/" not in n
        and not n.startswith(("training_args", "optimizer", "scheduler"))
    ]
    return candidates if len(candidates) == 1 else []


def weight_names(folder: Path, names: list[str], where: str) -> list[str]:
    """Weight file names relative to folder: the index's shards, else the one .safetensors to read, else []."""
    if (folder / INDEX_NAME).is_file():
        return index_shards(folder / INDEX_NAME)
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


def index_shards(index_path: Path) -> list[str]:
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


def folder_names(folder: Path) -> list[str]:
    """Sorted names of the files directly in folder (symlinks followed)."""
    try:
        return sorted(p.name for p in folder.iterdir() if p.is_file())
    except PermissionError as err:
        raise SourceError(
            f"{folder}: permission denied listing the folder; grant read access (chmod u+rx) or copy the model "
            "elsewhere"
        ) from err


def configs_in(folder: Path, names: list[str]) -> dict[str, Path]:
    return {name: folder / name for name in CONFIG_NAMES if name in names}


def listing(names: list[str]) -> str:
    shown = ", ".join(names[:LISTED_NAMES]) or "none"
    return shown + (f", ... ({len(names) - LISTED_NAMES} more)" if len(names) > LISTED_NAMES else "")


@functools.cache
def image_suffixes() -> frozenset[str]:
    """The suffixes (lower case, with the dot) of the image formats Pillow opens.

    An image file is one whose suffix, in any letter case, is among them (.jpg, .PNG, .gif,
    .tiff, …); one Pillow then cannot decode is skipped with its reason, never dropped.
    """
    from PIL import Image

    Image.init()  # every format plugin, not only the common ones Pillow registers first
    return frozenset(ext for ext, fmt in Image.registered_extensions().items() if fmt in Image.OPEN)


def not_a_folder(path: Path) -> str | None:
    """Why ``path`` is no folder ("no such folder", "is a file, not a folder", a link that leads nowhere); None if it
    is one."""
    if path.is_dir():
        return None
    if os.path.lexists(path) and not path.exists():
        return "is a symbolic link that leads nowhere (a loop, or a missing target)"
    return "is a file, not a folder" if path.exists() else "no such folder"


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(HASH_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()
