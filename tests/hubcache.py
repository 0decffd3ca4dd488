"""Build a Hugging Face Hub cache on disk, laid out exactly as huggingface_hub 2.x writes it.

Layout (read from huggingface_hub/file_download.py and _snapshot_download.py, version 2.4.0)::

    <cache_dir>/models--ORG--NAME/
        blobs/<etag>                     file bytes; etag = sha256 for LFS files, git blob sha1 otherwise
        refs/<revision>                  the commit sha, no newline ("refs/pr/2" -> refs/refs/pr/2)
        snapshots/<commit>/<file>        relative symlink to ../../blobs/<etag>
        trees/<commit>.json              tree listing written by snapshot_download (optional here)

The layout is written by hand, not with huggingface_hub, so tests check that the real
huggingface_hub code reads it.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path

# Suffixes stored with Git LFS by the Hub's default .gitattributes; their etag is the sha256 of the content.
LFS_SUFFIXES = (".safetensors", ".bin", ".pth", ".pt", ".h5", ".msgpack", ".onnx", ".ckpt", ".npz")
COMMIT_RE = re.compile(r"[0-9a-f]{40}")


def git_blob_sha1(data: bytes) -> str:
    """git hash-object of data: sha1 over b"blob <len>\\0" + data."""
    return hashlib.sha1(b"blob %d\x00" % len(data) + data).hexdigest()


def make_hub_cache(
    cache_dir: str | os.PathLike,
    repo_id: str,
    files: Mapping[str, Path | bytes],
    *,
    revision: str = "main",
    commit: str | None = None,
    tree: bool = False,
    hub_only: Sequence[str] = (),
) -> Path:
    """Write files as the cached snapshot of model repo_id at revision; returns the snapshot folder.

    files maps repo paths to contents (bytes, or a Path to copy). commit defaults to a sha1 of the
    repo id, revision and contents. tree=True also writes trees/<commit>.json (what snapshot_download
    records after an online call) listing the files plus hub_only: names present on the Hub but not cached.
    """
    contents = {name: data if isinstance(data, bytes) else Path(data).read_bytes() for name, data in files.items()}
    if commit is None:
        seed = hashlib.sha1(f"{repo_id}\n{revision}\n".encode())
        for name in sorted(contents):
            seed.update(name.encode() + b"\x00" + contents[name])
        commit = seed.hexdigest()
    storage = Path(cache_dir) / ("models--" + repo_id.replace("/", "--"))
    snapshot = storage / "snapshots" / commit
    entries = {}
    for name, data in contents.items():
        lfs = name.endswith(LFS_SUFFIXES)
        etag = hashlib.sha256(data).hexdigest() if lfs else git_blob_sha1(data)
        blob = storage / "blobs" / etag
        blob.parent.mkdir(parents=True, exist_ok=True)
        blob.write_bytes(data)
        pointer = snapshot / name
        pointer.parent.mkdir(parents=True, exist_ok=True)
        if pointer.is_symlink():
            pointer.unlink()
        pointer.symlink_to(os.path.relpath(blob, pointer.parent))
        entries[name] = {"size": len(data), "blob_id": git_blob_sha1(data)}
        if lfs:
            entries[name] |= {"lfs_sha256": etag, "lfs_size": len(data)}
    snapshot.mkdir(parents=True, exist_ok=True)
    if not COMMIT_RE.fullmatch(revision):
        ref = storage / "refs" / revision
        ref.parent.mkdir(parents=True, exist_ok=True)
        ref.write_text(commit)
    if tree:
        for name in hub_only:
            entries[name] = {"size": 0, "blob_id": git_blob_sha1(b"")}
        listing = storage / "trees" / f"{commit}.json"
        listing.parent.mkdir(parents=True, exist_ok=True)
        listing.write_text(json.dumps({"format_version": 1, "files": dict(sorted(entries.items()))}, indent=1))
    return snapshot
