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

import contextlib
import hashlib
import json
import os
import re
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path, PurePosixPath

from huggingface_hub import (
    HfApi,
    constants,
    get_cached_repo_tree,
    snapshot_download,
)
from huggingface_hub.errors import (
    CachedRepoTreeNotFoundError,
    DisabledRepoError,
    GatedRepoError,
    HfHubHTTPError,
    HFValidationError,
    IncompleteSnapshotError,
    LocalEntryNotFoundError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)
from huggingface_hub.file_download import repo_folder_name
from huggingface_hub.utils import disable_progress_bars, httpx

from qkweights.errors import CheckpointError, InputError, QkError, SourceError

CONFIG_NAMES = ("config.json", "preprocessor_config.json", "open_clip_config.json")
INDEX_NAME = "model.safetensors.index.json"
PREFERRED_WEIGHTS = ("model.safetensors", "open_clip_model.safetensors")
SUFFIX = ".safetensors"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pth.tar", ".ckpt")
PICKLE_WEIGHTS = ("pytorch_model.bin", "open_clip_pytorch_model.bin")
# Title and author of the safetensors conversion PRs, as in transformers' safetensors_conversion.py.
CONVERSION_PR_TITLE = "Adding `safetensors` variant of this model"
CONVERSION_PR_AUTHOR = "SFconvertbot"
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
    with _progress_bars(progress), _hub_errors(model, revision or constants.DEFAULT_REVISION):
        return _hub_source(model, revision, allow_pickle)


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


def _hub_source(repo_id: str, revision: str | None, allow_pickle: bool = False) -> Source:
    rev = revision or constants.DEFAULT_REVISION
    folder, weights = _hub_files(repo_id, rev)
    if not weights and revision is None:
        offline = constants.is_offline_mode()
        pr_ref = _cached_conversion_ref(repo_id) if offline else _conversion_ref(repo_id, folder.name)
        if pr_ref is not None:
            print(f"qkweights: main has no safetensors; using {pr_ref} (safetensors conversion)", file=sys.stderr)
            rev = pr_ref
            folder, weights = _hub_files(repo_id, rev)
    if not weights and allow_pickle:
        rev = revision or constants.DEFAULT_REVISION
        folder, weights = _hub_pickles(repo_id, rev)
    if not weights:
        raise _no_hub_safetensors(repo_id, rev, folder)
    return Source(
        model_id=repo_id,
        kind="hub",
        folder=folder,
        weight_files=tuple(folder / n for n in weights),
        config_files=_configs(folder, _folder_names(folder)),
        revision=rev,
        commit=folder.name,
    )


def _hub_files(repo_id: str, rev: str) -> tuple[Path, list[str]]:
    """Fetch configs and index, then the chosen weight files; (snapshot folder, weight names or [])."""
    folder = _download(repo_id, rev, [*CONFIG_NAMES, INDEX_NAME])
    names, complete = _hub_listing(repo_id, folder)
    weights = _weight_names(folder, [n for n in names if "/" not in n], f"{repo_id}@{rev}")
    if not weights:
        return folder, []
    # By commit when the tree listing is cached (no network call for cached files); otherwise the
    # Hub was not reached, and a commit would make huggingface_hub retry the listing for ~20 s.
    folder = _download(repo_id, rev, weights, cached=folder if complete else None)
    missing = [n for n in weights if not (folder / n).is_file()]
    if missing and constants.is_offline_mode():
        raise _offline_error(repo_id, rev, missing)
    if missing:
        raise SourceError(
            f"{repo_id}@{rev} (commit {folder.name}): {INDEX_NAME} names shard(s) the repo does not hold: "
            f"{', '.join(missing)}; the checkpoint is incomplete on the Hub, pick another revision"
        )
    return folder, weights


def _hub_pickles(repo_id: str, rev: str) -> tuple[Path, list[str]]:
    """Fetch the PyTorch weights of a repo without safetensors; (snapshot folder, weight names or [])."""
    folder = _download(repo_id, rev, list(CONFIG_NAMES))
    names, _ = _hub_listing(repo_id, folder)
    weights = _pickle_names(names)
    if weights:
        folder = _download(repo_id, rev, weights, cached=folder)
        print(f"qkweights: {repo_id} has no safetensors; reading {', '.join(weights)} with the restricted unpickler", file=sys.stderr)
    return folder, weights


def _pickle_names(names: list[str]) -> list[str]:
    """The one PyTorch weight file among ``names`` (the usual names first), or []."""
    for preferred in PICKLE_WEIGHTS:
        if preferred in names:
            return [preferred]
    candidates = [n for n in names if n.endswith(PICKLE_SUFFIXES) and "/" not in n and not n.startswith(("training_args", "optimizer", "scheduler"))]
    return candidates if len(candidates) == 1 else []


def _download(repo_id: str, rev: str, names: list[str], cached: Path | None = None) -> Path:
    """snapshot_download of the exact file names; returns the snapshot folder (named by the commit sha).

    cached: the snapshot folder already resolved for rev; the files are then fetched by its commit,
    so every file comes from the commit the configs came from.
    """
    try:
        return Path(snapshot_download(repo_id, revision=cached.name if cached else rev, allow_patterns=names))
    except LocalEntryNotFoundError as err:
        if not constants.is_offline_mode():
            raise _network_error(repo_id, rev, err.__cause__ or err) from err
        if isinstance(err, IncompleteSnapshotError):
            cached = Path(err.snapshot_path)
            listed = {f.path for f in get_cached_repo_tree(repo_id, revision=cached.name)}
            names = [n for n in names if n in listed]
        if cached is None:
            raise _offline_error(repo_id, rev, ["the whole snapshot"]) from err
        raise _offline_error(repo_id, rev, [n for n in names if not (cached / n).is_file()]) from err


def _hub_listing(repo_id: str, folder: Path) -> tuple[list[str], bool]:
    """File paths of the repo at the snapshot's commit, and whether the list is the full repo.

    The full list is the tree listing snapshot_download caches; without it, the cached files.
    """
    try:
        return sorted(f.path for f in get_cached_repo_tree(repo_id, revision=folder.name)), True
    except CachedRepoTreeNotFoundError:
        return _folder_names(folder), False


def _no_hub_safetensors(repo_id: str, rev: str, folder: Path) -> SourceError:
    names, complete = _hub_listing(repo_id, folder)
    if not complete and constants.is_offline_mode():
        return _offline_error(repo_id, rev, ["*.safetensors"])
    return SourceError(
        f"{repo_id}@{rev} (commit {folder.name}) has no .safetensors weights (files: {_listing(names)}); "
        f"{PICKLE_NOTE}, or pass --revision with a safetensors branch (e.g. refs/pr/N)"
    )


def _conversion_ref(repo_id: str, main_commit: str) -> str | None:
    """``refs/pr/N`` of the open SFconvertbot conversion PR built on the current main, or None.

    Same rule as transformers' ``get_conversion_pr_reference``: title, open pull request, author,
    and the PR's parent commit is main's head. A Hub refusal (e.g. discussions disabled) means
    no usable conversion branch.
    """
    api = HfApi()
    try:
        for pr in api.get_repo_discussions(
            repo_id, author=CONVERSION_PR_AUTHOR, discussion_type="pull_request", discussion_status="open"
        ):
            if pr.title != CONVERSION_PR_TITLE or pr.author != CONVERSION_PR_AUTHOR or not pr.is_pull_request:
                continue
            commits = api.list_repo_commits(repo_id, revision=pr.git_reference)
            if len(commits) > 1 and commits[1].commit_id == main_commit:
                return pr.git_reference
    except HfHubHTTPError:
        return None
    return None


def _cached_conversion_ref(repo_id: str) -> str | None:
    """Highest cached ``refs/pr/N`` whose snapshot holds .safetensors files, or None (no network)."""
    storage = Path(constants.HF_HUB_CACHE) / repo_folder_name(repo_id=repo_id, repo_type="model")
    pr_refs = storage / "refs" / "refs" / "pr"
    found = []
    for ref in pr_refs.glob("*") if pr_refs.is_dir() else ():
        if not (ref.name.isdigit() and ref.is_file()):
            continue
        snapshot = storage / "snapshots" / ref.read_text().strip()
        if any(p.is_file() for p in snapshot.glob(f"*{SUFFIX}")):
            found.append(int(ref.name))
    return f"refs/pr/{max(found)}" if found else None


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


def _revision_flag(rev: str) -> str:
    return "" if rev == constants.DEFAULT_REVISION else f" --revision {rev}"


def _offline_error(repo_id: str, rev: str, missing: list[str]) -> SourceError:
    flag = _revision_flag(rev)
    return SourceError(
        f"{repo_id}@{rev}: missing from the Hugging Face cache ({constants.HF_HUB_CACHE}): {', '.join(missing)}; "
        "HF_HUB_OFFLINE=1 blocks downloads, so fetch them on a connected machine sharing this HF_HUB_CACHE with "
        f"`HF_HUB_OFFLINE=0 python -m qkweights profile {repo_id}{flag}` "
        f"or `hf download {repo_id}{flag} --include '*.json' '*.safetensors'`"
    )


def _network_error(repo_id: str, rev: str, err: BaseException) -> SourceError:
    detail = str(err).strip().splitlines()[0] if str(err).strip() else ""
    return SourceError(
        f"{repo_id}@{rev}: cannot reach the Hugging Face Hub ({type(err).__name__}: {detail}); "
        f"check the network or proxy, or set HF_HUB_OFFLINE=1 to use the files already in {constants.HF_HUB_CACHE}"
    )


@contextlib.contextmanager
def _hub_errors(repo_id: str, rev: str) -> Iterator[None]:
    """Turn huggingface_hub and network exceptions into one-line SourceErrors."""
    page = f"{constants.ENDPOINT}/{repo_id}"
    try:
        yield
    except QkError:
        raise
    except GatedRepoError as err:
        raise SourceError(f"{repo_id}: gated repo; request access on the Hub page ({page}) and set HF_TOKEN") from err
    except RepositoryNotFoundError as err:
        raise SourceError(
            f"{repo_id}: no such model repo on the Hub; check the id, "
            "or for a private repo set HF_TOKEN to a token that can read it"
        ) from err
    except RevisionNotFoundError as err:
        raise SourceError(
            f"{repo_id}: revision {rev!r} not found; use a branch, tag, commit or refs/pr/N listed at {page}"
        ) from err
    except DisabledRepoError as err:
        raise SourceError(f"{repo_id}: the repo is disabled on the Hub; use another copy of the model") from err
    except HFValidationError as err:
        raise SourceError(
            f"{repo_id}: not an existing file or folder, nor a valid Hub repo id (ORG/NAME); check the spelling"
        ) from err
    except (HfHubHTTPError, httpx.HTTPError) as err:
        raise _network_error(repo_id, rev, err) from err
    except PermissionError as err:
        raise SourceError(
            f"{repo_id}: permission denied in the Hugging Face cache ({err.filename}); "
            "fix its permissions or set HF_HUB_CACHE to a writable folder"
        ) from err


@contextlib.contextmanager
def _progress_bars(progress: bool | None) -> Iterator[None]:
    """huggingface_hub's own bars when stderr is a terminal and progress is not False; silenced otherwise.

    HF_HUB_DISABLE_PROGRESS_BARS, when set, keeps priority as in huggingface_hub.
    """
    show = progress is not False and sys.stderr is not None and sys.stderr.isatty()
    if show or constants.HF_HUB_DISABLE_PROGRESS_BARS is not None:
        yield
        return
    with disable_progress_bars():
        yield
