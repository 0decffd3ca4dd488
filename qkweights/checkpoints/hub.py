"""The Hub path of :func:`qkweights.checkpoints.source.resolve`: fetch a repo's files through huggingface_hub.

Files go through ``huggingface_hub.snapshot_download`` into the normal cache, so HF_HOME,
HF_HUB_CACHE, HF_HUB_OFFLINE and HF_TOKEN mean what they mean for every other Hugging Face
tool. Only the files qkweights reads are fetched (configs, the safetensors index and weights);
when ``main`` has no safetensors, the safetensors conversion branch is used as transformers
does; PyTorch pickles only with ``allow_pickle``. Every Hub error becomes one SourceError line.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator
from pathlib import Path

from huggingface_hub import HfApi, constants, get_cached_repo_tree, snapshot_download
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

from qkweights.checkpoints.folders import (
    CONFIG_NAMES,
    INDEX_NAME,
    PICKLE_NOTE,
    SUFFIX,
    Source,
    configs_in,
    folder_names,
    listing,
    pickle_names,
    weight_names,
)
from qkweights.errors import QkError, QkWarning, SourceError

# Title and author of the safetensors conversion PRs, as in transformers' safetensors_conversion.py.
CONVERSION_PR_TITLE = "Adding `safetensors` variant of this model"
CONVERSION_PR_AUTHOR = "SFconvertbot"


def hub_source(
    repo_id: str, *, revision: str | None = None, progress: bool | None = None, allow_pickle: bool = False
) -> Source:
    """The local files of Hub repo ``repo_id`` (downloaded into the cache if needed); see
    :func:`qkweights.checkpoints.source.resolve`."""
    with _progress_bars(progress), _hub_errors(repo_id, revision or constants.DEFAULT_REVISION):
        return _hub_source(repo_id, revision, allow_pickle)


def _hub_source(repo_id: str, revision: str | None, allow_pickle: bool = False) -> Source:
    rev = revision or constants.DEFAULT_REVISION
    folder, weights = _hub_files(repo_id, rev)
    if not weights and revision is None:
        offline = constants.is_offline_mode()
        pr_ref = _cached_conversion_ref(repo_id) if offline else _conversion_ref(repo_id, folder.name)
        if pr_ref is not None:
            warnings.warn(f"main has no safetensors; using {pr_ref} (safetensors conversion)", QkWarning, stacklevel=2)
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
        config_files=configs_in(folder, folder_names(folder)),
        revision=rev,
        commit=folder.name,
    )


def _hub_files(repo_id: str, rev: str) -> tuple[Path, list[str]]:
    """Fetch configs and index, then the chosen weight files; (snapshot folder, weight names or [])."""
    folder = _download(repo_id, rev, [*CONFIG_NAMES, INDEX_NAME])
    names, complete = _hub_listing(repo_id, folder)
    weights = weight_names(folder, [n for n in names if "/" not in n], f"{repo_id}@{rev}")
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
    weights = pickle_names(names)
    if weights:
        folder = _download(repo_id, rev, weights, cached=folder)
        warnings.warn(
            f"{repo_id} has no safetensors; reading {', '.join(weights)} with the restricted unpickler",
            QkWarning,
            stacklevel=2,
        )
    return folder, weights


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
        return folder_names(folder), False


def _no_hub_safetensors(repo_id: str, rev: str, folder: Path) -> SourceError:
    names, complete = _hub_listing(repo_id, folder)
    if not complete and constants.is_offline_mode():
        return _offline_error(repo_id, rev, ["*.safetensors"])
    return SourceError(
        f"{repo_id}@{rev} (commit {folder.name}) has no .safetensors weights (files: {listing(names)}); "
        f"{PICKLE_NOTE}, or pass revision=REF of a safetensors branch (e.g. refs/pr/N)"
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
    """huggingface_hub's own bars when ``progress`` is True (the caller decides: the command line, on a terminal);
    silenced otherwise.

    HF_HUB_DISABLE_PROGRESS_BARS, when set, keeps priority as in huggingface_hub.
    """
    show = progress is True
    if show or constants.HF_HUB_DISABLE_PROGRESS_BARS is not None:
        yield
        return
    with disable_progress_bars():
        yield
