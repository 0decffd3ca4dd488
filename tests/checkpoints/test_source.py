"""qkweights.checkpoints.source: MODEL argument -> local files, through huggingface_hub's real offline code path.

Hub cases run offline against caches written by tests/hubcache.py; huggingface_hub reads
HF_HUB_CACHE and HF_HUB_OFFLINE into huggingface_hub.constants at import time, so the tests set
the environment and patch those constants (as huggingface_hub's own tests do); one test runs
in a fresh interpreter with the environment only.
"""

import hashlib
import http.server
import json
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from hubcache import git_blob_sha1, make_hub_cache
from huggingface_hub import constants
from safetensors.numpy import save_file

from qkweights.checkpoints.hub import _progress_bars
from qkweights.checkpoints.source import Source, resolve
from qkweights.errors import CheckpointError, InputError, QkWarning, SourceError

REPO = "acme/tiny-vit"
CONFIG = b'{"model_type": "vit"}'
PREPROCESSOR = b'{"size": {"height": 224, "width": 224}}'
MAIN_SHA = "a" * 40
PR_SHA = "b" * 40
REPO_ROOT = Path(__file__).resolve().parents[2]


def weights_bytes(tmp_path: Path, name: str, value: float) -> bytes:
    """A real safetensors file {"x": [value] * 3} (float32), as bytes."""
    path = tmp_path / f"_{name}"
    save_file({"x": np.full(3, value, np.float32)}, str(path))
    return path.read_bytes()


def write(folder: Path, files: dict[str, bytes]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for name, data in files.items():
        (folder / name).write_bytes(data)
    return folder


def index_bytes(weight_map: dict[str, str]) -> bytes:
    return json.dumps({"metadata": {"total_size": 24}, "weight_map": weight_map}).encode()


# ---- local folders and files ----


def test_save_pretrained_folder_reads_safetensors_and_configs_only(tmp_path):
    folder = write(
        tmp_path / "vit",
        {
            "config.json": CONFIG,
            "preprocessor_config.json": PREPROCESSOR,
            "model.safetensors": weights_bytes(tmp_path, "m", 1.0),
            "pytorch_model.bin": b"pickle",
            "README.md": b"# vit",
        },
    )
    src = resolve(str(folder))
    assert src == Source(
        model_id=str(folder),
        kind="folder",
        folder=folder,
        weight_files=(folder / "model.safetensors",),
        config_files={
            "config.json": folder / "config.json",
            "preprocessor_config.json": folder / "preprocessor_config.json",
        },
        revision=None,
        commit=None,
    )


def test_relative_folder_becomes_absolute(tmp_path, monkeypatch):
    write(tmp_path / "vit", {"model.safetensors": weights_bytes(tmp_path, "m", 1.0)})
    monkeypatch.chdir(tmp_path)
    src = resolve("vit")
    assert src.model_id == str(tmp_path / "vit")
    assert src.weight_files == (tmp_path / "vit" / "model.safetensors",)


def test_open_clip_folder(tmp_path):
    folder = write(
        tmp_path / "clip",
        {
            "open_clip_config.json": b'{"model_cfg": {"quick_gelu": true}}',
            "open_clip_model.safetensors": weights_bytes(tmp_path, "oc", 2.0),
            "open_clip_pytorch_model.bin": b"pickle",
        },
    )
    src = resolve(str(folder))
    assert src.weight_files == (folder / "open_clip_model.safetensors",)
    assert src.config_files == {"open_clip_config.json": folder / "open_clip_config.json"}


def test_model_safetensors_preferred_over_open_clip_and_variants(tmp_path):
    folder = write(
        tmp_path / "both",
        {
            "open_clip_model.safetensors": weights_bytes(tmp_path, "oc", 2.0),
            "model.fp16.safetensors": weights_bytes(tmp_path, "h", 3.0),
            "model.safetensors": weights_bytes(tmp_path, "m", 1.0),
        },
    )
    assert resolve(str(folder)).weight_files == (folder / "model.safetensors",)
    (folder / "model.safetensors").unlink()
    assert resolve(str(folder)).weight_files == (folder / "open_clip_model.safetensors",)


def test_lone_safetensors_with_any_name_is_used(tmp_path):
    folder = write(
        tmp_path / "vit", {"vit_b16.safetensors": weights_bytes(tmp_path, "m", 1.0), "vit_b16.pth": b"pickle"}
    )
    assert resolve(str(folder)).weight_files == (folder / "vit_b16.safetensors",)


def test_several_unrelated_safetensors_is_an_error(tmp_path):
    folder = write(tmp_path / "odd", {"b.safetensors": b"", "a.safetensors": b""})
    with pytest.raises(SourceError) as err:
        resolve(str(folder))
    assert str(err.value) == (
        f"{folder}: several .safetensors files and no model.safetensors.index.json "
        "(a.safetensors, b.safetensors); pass the path of the one to read as MODEL"
    )


def test_single_file_with_configs_beside_it(tmp_path):
    folder = write(
        tmp_path / "vit",
        {"config.json": CONFIG, "weights.safetensors": weights_bytes(tmp_path, "m", 1.0), "other.safetensors": b""},
    )
    src = resolve(str(folder / "weights.safetensors"))
    assert (src.kind, src.model_id, src.folder) == ("file", str(folder / "weights.safetensors"), folder)
    assert src.weight_files == (folder / "weights.safetensors",)
    assert src.config_files == {"config.json": folder / "config.json"}
    assert (src.revision, src.commit) == (None, None)


def test_local_pytorch_files_are_accepted_and_others_refused(tmp_path):
    path = write(tmp_path, {"pytorch_model.bin": b"pickle", "model.h5": b"h5"}) / "pytorch_model.bin"
    src = resolve(str(path))
    assert src.kind == "file" and src.weight_files == (path,)
    with pytest.raises(
        SourceError,
        match=r"model\.h5: not a weight file \(\.safetensors, or a PyTorch \.bin, \.pt, \.pth, \.pth\.tar, \.ckpt\)",
    ):
        resolve(str(tmp_path / "model.h5"))


def test_sharded_index_lists_shards_in_index_order(tmp_path):
    shard1, shard2 = "model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"
    folder = write(
        tmp_path / "big",
        {
            "config.json": CONFIG,
            # the first tensor in weight_map lives in shard 2: index order puts shard 2 first
            "model.safetensors.index.json": index_bytes({"a": shard2, "b": shard1, "c": shard2}),
            shard1: weights_bytes(tmp_path, "s1", 1.0),
            shard2: weights_bytes(tmp_path, "s2", 2.0),
            "stray.safetensors": b"",
        },
    )
    assert resolve(str(folder)).weight_files == (folder / shard2, folder / shard1)


def test_sharded_index_with_missing_shard(tmp_path):
    shard1, shard2 = "model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"
    folder = write(
        tmp_path / "big",
        {"model.safetensors.index.json": index_bytes({"a": shard1, "b": shard2}), shard1: b""},
    )
    with pytest.raises(SourceError) as err:
        resolve(str(folder))
    assert str(err.value) == (
        f"{folder}/model.safetensors.index.json: names shard(s) missing from the folder: {shard2}; "
        "download every shard listed in the index next to it"
    )


@pytest.mark.parametrize(
    "index",
    [b"{not json", b'{"metadata": {}}', index_bytes({"a": "../outside.safetensors"}), index_bytes({"a": "model.bin"})],
)
def test_bad_index_is_a_checkpoint_error(tmp_path, index):
    folder = write(tmp_path / "big", {"model.safetensors.index.json": index})
    with pytest.raises(CheckpointError, match=r"model\.safetensors\.index\.json: .*re-download"):
        resolve(str(folder))


def test_folder_without_safetensors_falls_back_to_its_pytorch_file(tmp_path):
    folder = write(tmp_path / "old", {"config.json": CONFIG, "pytorch_model.bin": b"pickle", "training_args.bin": b"x"})
    assert resolve(str(folder)).weight_files == (folder / "pytorch_model.bin",)
    empty = write(tmp_path / "empty", {"config.json": CONFIG, "notes.txt": b""})
    with pytest.raises(SourceError) as err:
        resolve(str(empty))
    assert str(err.value) == (
        f"{empty}: no weight file (.safetensors or pytorch_model.bin) among its files (config.json, notes.txt); "
        "pass the folder that holds the checkpoint"
    )


@pytest.mark.parametrize("arg", ["./missing", "~/missing-qkweights-folder", "/no/such/dir", "x.safetensors", "a/b/c"])
def test_path_looking_argument_that_does_not_exist(tmp_path, monkeypatch, arg):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SourceError) as err:
        resolve(arg)
    assert str(err.value) == f"{arg}: no such file or folder; check the path"


def test_revision_with_a_local_path_is_refused(tmp_path):
    folder = write(tmp_path / "vit", {"model.safetensors": b""})
    with pytest.raises(InputError, match="revision=… applies to Hub repo ids only"):
        resolve(str(folder), revision="main")


def test_cache_snapshot_folder_given_as_a_path(tmp_path):
    snapshot = make_hub_cache(
        tmp_path / "hub",
        REPO,
        {"config.json": CONFIG, "model.safetensors": weights_bytes(tmp_path, "m", 1.0)},
        commit=MAIN_SHA,
    )
    src = resolve(str(snapshot))
    assert (src.model_id, src.kind, src.folder, src.revision, src.commit) == (REPO, "folder", snapshot, None, MAIN_SHA)
    assert src.weight_files == (snapshot / "model.safetensors",)
    assert src.config_files == {"config.json": snapshot / "config.json"}


# ---- provenance ----


def test_to_json_sha256_against_hashlib(tmp_path):
    data = weights_bytes(tmp_path, "m", 1.0)
    folder = write(tmp_path / "vit", {"model.safetensors": data})
    src = resolve(str(folder))
    expected = {
        "model_id": str(folder),
        "kind": "folder",
        "revision": None,
        "commit": None,
        "files": [{"name": "model.safetensors", "bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}],
    }
    assert src.to_json() == expected
    # digests are computed once per Source: rewriting the file does not change this Source's record
    (folder / "model.safetensors").write_bytes(b"changed")
    assert src.to_json() == expected
    assert resolve(str(folder)).to_json()["files"][0]["sha256"] == hashlib.sha256(b"changed").hexdigest()


def test_sha256_spans_several_hash_chunks(tmp_path):
    # 2.5 MiB crosses two 1 MiB chunk boundaries; reference is hashlib over the whole bytes at once
    data = np.random.default_rng(0).integers(0, 256, 5 << 19, dtype=np.uint8).tobytes()
    folder = write(tmp_path / "vit", {"model.safetensors": data})
    assert resolve(str(folder)).to_json()["files"] == [
        {"name": "model.safetensors", "bytes": 5 << 19, "sha256": hashlib.sha256(data).hexdigest()}
    ]


# ---- Hub ids, offline, through huggingface_hub.snapshot_download ----


def test_hubcache_blob_names_follow_git_and_lfs():
    # reference: huggingface_hub.utils.sha.git_hash docstring, also `printf 'Hello, World!' | git hash-object --stdin`
    assert git_blob_sha1(b"Hello, World!") == "b45ef6fec89518d314f546fd6c3025367b721684"


def test_hub_id_offline_from_cache(tmp_path, hub_cache):
    weights = weights_bytes(tmp_path, "m", 1.0)
    snapshot = make_hub_cache(
        hub_cache,
        REPO,
        {"config.json": CONFIG, "preprocessor_config.json": PREPROCESSOR, "model.safetensors": weights},
        commit=MAIN_SHA,
    )
    src = resolve(REPO)
    assert (src.model_id, src.kind, src.folder, src.revision, src.commit) == (REPO, "hub", snapshot, "main", MAIN_SHA)
    assert src.weight_files == (snapshot / "model.safetensors",)
    assert src.config_files == {
        "config.json": snapshot / "config.json",
        "preprocessor_config.json": snapshot / "preprocessor_config.json",
    }
    assert src.to_json() == {
        "model_id": REPO,
        "kind": "hub",
        "revision": "main",
        "commit": MAIN_SHA,
        "files": [{"name": "model.safetensors", "bytes": len(weights), "sha256": hashlib.sha256(weights).hexdigest()}],
    }


def test_hub_id_offline_sharded_and_explicit_revision(tmp_path, hub_cache):
    shard1, shard2 = "model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"
    files = {
        "config.json": CONFIG,
        "model.safetensors.index.json": index_bytes({"a": shard1, "b": shard2}),
        shard1: weights_bytes(tmp_path, "s1", 1.0),
        shard2: weights_bytes(tmp_path, "s2", 2.0),
    }
    snapshot = make_hub_cache(hub_cache, REPO, files, revision="v1.0", commit=PR_SHA)
    src = resolve(REPO, revision="v1.0")
    assert (src.revision, src.commit) == ("v1.0", PR_SHA)
    assert src.weight_files == (snapshot / shard1, snapshot / shard2)
    assert [f["name"] for f in src.to_json()["files"]] == [shard1, shard2]


def test_hub_id_offline_not_cached(hub_cache):
    with pytest.raises(SourceError) as err:
        resolve(REPO)
    assert str(err.value) == (
        f"{REPO}@main: missing from the Hugging Face cache ({hub_cache}): the whole snapshot; "
        "HF_HUB_OFFLINE=1 blocks downloads, so fetch them on a connected machine sharing this HF_HUB_CACHE with "
        f"`HF_HUB_OFFLINE=0 python -m qkweights profile {REPO}` "
        f"or `hf download {REPO} --include '*.json' '*.safetensors'`"
    )


def test_hub_id_offline_snapshot_without_weights_cached(hub_cache):
    make_hub_cache(hub_cache, REPO, {"config.json": CONFIG}, commit=MAIN_SHA)
    with pytest.raises(SourceError) as err:
        resolve(REPO, revision="main")
    assert str(err.value).startswith(f"{REPO}@main: missing from the Hugging Face cache ({hub_cache}): *.safetensors; ")


@pytest.mark.parametrize(
    ("hub_only", "missing"),
    [
        # configs complete, weights not cached: hf_hub_download of the weights by commit fails offline
        (["model.safetensors"], "model.safetensors"),
        # a config not cached: snapshot_download raises IncompleteSnapshotError before the weights are chosen
        (["preprocessor_config.json", "model.safetensors"], "preprocessor_config.json"),
    ],
)
def test_hub_id_offline_incomplete_snapshot_names_missing_file(hub_cache, hub_only, missing):
    # the tree listing (as written by an earlier online snapshot_download) names files that were not cached
    make_hub_cache(
        hub_cache, REPO, {"config.json": CONFIG}, revision="v2", commit=MAIN_SHA, tree=True, hub_only=hub_only
    )
    with pytest.raises(SourceError) as err:
        resolve(REPO, revision="v2")
    assert str(err.value).startswith(f"{REPO}@v2: missing from the Hugging Face cache ({hub_cache}): {missing}; ")
    assert f"python -m qkweights profile {REPO} --revision v2`" in str(err.value)


def test_hub_id_offline_main_without_safetensors_uses_cached_conversion_pr(tmp_path, hub_cache, capsys):
    make_hub_cache(hub_cache, REPO, {"config.json": CONFIG, "pytorch_model.bin": b"pickle"}, commit=MAIN_SHA)
    weights = weights_bytes(tmp_path, "m", 1.0)
    pr_snapshot = make_hub_cache(
        hub_cache, REPO, {"config.json": CONFIG, "model.safetensors": weights}, revision="refs/pr/1", commit=PR_SHA
    )
    # huggingface_hub stores the ref "refs/pr/1" at refs/refs/pr/1
    assert (hub_cache / "models--acme--tiny-vit" / "refs" / "refs" / "pr" / "1").read_text() == PR_SHA
    with pytest.warns(QkWarning) as caught:  # a note for the user: the library says it, the command line prints it
        src = resolve(REPO)
    assert (src.revision, src.commit, src.folder) == ("refs/pr/1", PR_SHA, pr_snapshot)
    assert src.weight_files == (pr_snapshot / "model.safetensors",)
    assert [str(w.message) for w in caught] == ["main has no safetensors; using refs/pr/1 (safetensors conversion)"]
    assert capsys.readouterr().err == ""


def test_conversion_pr_not_used_when_revision_is_explicit(hub_cache):
    make_hub_cache(hub_cache, REPO, {"config.json": CONFIG, "pytorch_model.bin": b"pickle"}, commit=MAIN_SHA, tree=True)
    make_hub_cache(hub_cache, REPO, {"model.safetensors": b""}, revision="refs/pr/1", commit=PR_SHA)
    with pytest.raises(SourceError, match=r"@main \(commit a{40}\) has no \.safetensors"):
        resolve(REPO, revision="main")


def test_hub_repo_without_safetensors_lists_its_files(hub_cache):
    make_hub_cache(
        hub_cache,
        REPO,
        {"config.json": CONFIG, "pytorch_model.bin": b"pickle"},
        commit=MAIN_SHA,
        tree=True,
        hub_only=["tf_model.h5"],
    )
    with pytest.raises(SourceError) as err:
        resolve(REPO)
    assert str(err.value) == (
        f"{REPO}@main (commit {MAIN_SHA}) has no .safetensors weights (files: config.json, pytorch_model.bin, "
        "tf_model.h5); "
        "PyTorch pickles are fetched from the Hub only with allow_pickle=True (they are read without running code), "
        "or pass revision=REF of a safetensors branch (e.g. refs/pr/N)"
    )


def test_hub_repo_without_safetensors_with_allow_pickle(hub_cache, capsys):
    make_hub_cache(hub_cache, REPO, {"config.json": CONFIG, "pytorch_model.bin": b"pickle"}, commit=MAIN_SHA, tree=True)
    with pytest.warns(QkWarning, match="has no safetensors; reading pytorch_model.bin with the restricted unpickler"):
        src = resolve(REPO, allow_pickle=True)
    assert (
        [p.name for p in src.weight_files] == ["pytorch_model.bin"]
        and src.commit == MAIN_SHA
        and src.revision == "main"
    )


def test_invalid_repo_id(hub_cache):
    with pytest.raises(SourceError, match=r"^bad id!: not an existing file or folder, nor a valid Hub repo id"):
        resolve("bad id!")


def test_hub_id_resolved_from_environment_in_a_fresh_interpreter(tmp_path):
    """HF_HUB_CACHE / HF_HUB_OFFLINE set in the environment only, read by huggingface_hub at import."""
    weights = weights_bytes(tmp_path, "m", 1.0)
    make_hub_cache(tmp_path / "hub", REPO, {"config.json": CONFIG, "model.safetensors": weights}, commit=MAIN_SHA)
    env = {**os.environ, "HF_HUB_CACHE": str(tmp_path / "hub"), "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO_ROOT)}
    code = (
        f"import json; from qkweights.checkpoints.source import resolve; print(json.dumps(resolve({REPO!r}).to_json()))"
    )
    run = subprocess.run(
        [sys.executable, "-c", code], env=env, cwd=tmp_path, capture_output=True, text=True, check=True
    )
    assert json.loads(run.stdout) == {
        "model_id": REPO,
        "kind": "hub",
        "revision": "main",
        "commit": MAIN_SHA,
        "files": [{"name": "model.safetensors", "bytes": len(weights), "sha256": hashlib.sha256(weights).hexdigest()}],
    }
    assert run.stderr == ""


def _closed_local_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.parametrize("cached", [False, True])
def test_hub_unreachable_online(tmp_path, cached):
    """HF_ENDPOINT on a closed loopback port: connection refused at once, no outside network involved.

    huggingface_hub falls back to a cached snapshot; without one the error suggests HF_HUB_OFFLINE=1.
    """
    cache = tmp_path / "hub"
    cache.mkdir()
    if cached:
        make_hub_cache(cache, REPO, {"model.safetensors": weights_bytes(tmp_path, "m", 1.0)}, commit=MAIN_SHA)
    env = {
        **{k: v for k, v in os.environ.items() if not k.lower().endswith("_proxy")},
        "HF_HUB_CACHE": str(cache),
        "HF_HUB_OFFLINE": "0",
        "HF_ENDPOINT": f"http://127.0.0.1:{_closed_local_port()}",
        "PYTHONPATH": str(REPO_ROOT),
    }
    code = (
        "from qkweights.errors import SourceError\n"
        "from qkweights.checkpoints.source import resolve\n"
        f"try: print(resolve({REPO!r}).commit)\n"
        "except SourceError as err: print(err)\n"
    )
    start = time.monotonic()
    run = subprocess.run(
        [sys.executable, "-c", code], env=env, cwd=tmp_path, capture_output=True, text=True, timeout=60
    )
    # fetching by commit without a cached tree listing would sit through huggingface_hub's ~23 s retry backoff
    assert time.monotonic() - start < 10
    if cached:
        assert run.stdout == MAIN_SHA + "\n"
    else:
        assert run.stdout == (
            f"{REPO}@main: cannot reach the Hugging Face Hub (ConnectError: [Errno 111] Connection refused); "
            f"check the network or proxy, or set HF_HUB_OFFLINE=1 to use the files already in {cache}\n"
        )


class _FakeHub(http.server.BaseHTTPRequestHandler):
    """Answers every request with the status and X-Error-Code header the Hub sends for one failure."""

    status = 404
    error_code = "RepoNotFound"

    def do_GET(self):
        self.send_response(self.status)
        self.send_header("X-Error-Code", self.error_code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", "2")
        self.end_headers()
        self.wfile.write(b"{}")

    do_HEAD = do_GET

    def log_message(self, *args):
        pass


@pytest.mark.parametrize(
    ("status", "error_code", "expected"),
    [
        # headers as sent by the Hub; huggingface_hub.utils._http.hf_raise_for_status maps them to its errors
        (
            404,
            "RepoNotFound",
            "{repo}: no such model repo on the Hub; check the id, "
            "or for a private repo set HF_TOKEN to a token that can read it",
        ),
        (403, "GatedRepo", "{repo}: gated repo; request access on the Hub page ({endpoint}/{repo}) and set HF_TOKEN"),
        (
            404,
            "RevisionNotFound",
            "{repo}: revision 'v9' not found; use a branch, tag, commit or refs/pr/N listed at {endpoint}/{repo}",
        ),
    ],
)
def test_hub_errors_from_a_loopback_fake_hub(hub_cache, monkeypatch, status, error_code, expected):
    handler = type("Handler", (_FakeHub,), {"status": status, "error_code": error_code})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.01}, daemon=True)
    thread.start()
    endpoint = f"http://127.0.0.1:{server.server_address[1]}"
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "ENDPOINT", endpoint)
    try:
        with pytest.raises(SourceError) as err:
            resolve(REPO, revision="v9" if error_code == "RevisionNotFound" else None)
    finally:
        server.shutdown()
        server.server_close()
    assert str(err.value) == expected.format(repo=REPO, endpoint=endpoint)


# ---- progress bars ----


class _Terminal:
    def isatty(self) -> bool:
        return True


@pytest.mark.skipif(
    constants.HF_HUB_DISABLE_PROGRESS_BARS is not None, reason="HF_HUB_DISABLE_PROGRESS_BARS has priority"
)
@pytest.mark.parametrize(("tty", "quiet", "shown"), [(False, False, False), (True, False, True), (True, True, False)])
def test_progress_bars_only_on_a_terminal(monkeypatch, tty, quiet, shown):
    """The command line decides (a terminal, not --quiet); the library shows huggingface_hub's bars only when told."""
    from huggingface_hub.utils import are_progress_bars_disabled

    from qkweights.cli.progress import Terminal

    if tty:
        monkeypatch.setattr(sys, "stderr", _Terminal())
    with _progress_bars(Terminal(quiet=quiet).downloads):
        assert are_progress_bars_disabled() is not shown
    assert not are_progress_bars_disabled()
    with _progress_bars(None):
        assert are_progress_bars_disabled()


def test_symlink_out_of_the_folder_is_refused(tmp_path):
    outside = tmp_path / "elsewhere.safetensors"
    outside.write_bytes(weights_bytes(tmp_path, "w", 1.0))
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "model.safetensors").symlink_to(outside)
    with pytest.raises(
        SourceError, match=r"model.safetensors: is a symlink to .*elsewhere.safetensors, outside the model folder"
    ):
        resolve(str(folder))
    (folder / "model.safetensors").unlink()
    inside = folder / "weights" / "w.safetensors"
    inside.parent.mkdir()
    inside.write_bytes(outside.read_bytes())
    (folder / "model.safetensors").symlink_to(inside)
    assert resolve(str(folder)).weight_files == (folder / "model.safetensors",)
