"""A sweep's resume state: what the finished shards merged, saved atomically under a fingerprint, and the BLAS
kernels they ran on (:func:`blas_record`, :func:`kernels`).

The runner (:mod:`qkweights.analyses.runner`) writes it to ``<out>/.<name>_state.npz``; the same command run again
resumes from it. ``an`` is the sweep's :class:`~qkweights.analyses.runner.Analysis` (its ``name``, ``key``,
``item_files`` and ``to_arrays``/``from_arrays``).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from qkweights.outputs import plural, write_npz
from qkweights.version import __version__


def fingerprint(an, source: dict, ck, items: Sequence) -> str:
    """sha256 of everything that decides a sweep's numbers: the tool version, the model's provenance (weights), the
    content of the spec bound to its checkpoint ``ck`` (as resolved from the spec folders, whatever its name; its
    fields, not where its file lies, so that another checkout or environment of the same version gives the same
    fingerprint) and of the configs read, the options and each item's files (name, size, mtime). Not the shard cut:
    the state records which items are done, so a run resumes whatever shard size or executor the next one has; nor
    the batch size, since an image's numbers do not depend on its batch."""
    files = []
    for it in items:
        for f in an.item_files(it):
            try:
                st = f.stat()
                files.append([str(f), st.st_size, st.st_mtime_ns])
            except OSError:
                files.append([str(f), None, None])
    doc = {
        "tool": __version__,
        "analysis": an.name,
        "key": an.key(),
        "source": source,
        "spec": _spec_content(ck.spec),
        "configs": ck.configs,
        "files": files,
    }
    return hashlib.sha256(json.dumps(doc, sort_keys=True, default=str).encode()).hexdigest()


def _spec_content(spec) -> dict:
    """The spec's fields as a dict, without those about its file (path, user folder, the specs it shadows…)."""
    content = dataclasses.asdict(spec)
    for f in dataclasses.fields(spec):
        if f.metadata.get("kind") == "internal":
            del content[f.name]
    return content


@dataclass
class SweepState:
    """The merged result of the finished shards."""

    partial: Any
    done: set[int] = field(default_factory=set)  # positions of the items consumed (scored or skipped)
    skipped: list[dict] = field(default_factory=list)
    blas: list[dict] = field(default_factory=list)  # each finished shard's BLAS (blas_record)


def save_state(path: Path, an, fp: str, st: SweepState) -> None:
    arrays = {f"p_{k}": v for k, v in an.to_arrays(st.partial).items()}
    write_npz(
        path,
        fingerprint=np.array(fp),
        done=np.array(sorted(st.done), np.int64),
        skipped=np.array(json.dumps(st.skipped)),
        blas=np.array(json.dumps(st.blas)),
        **arrays,
    )


def load_state(path: Path, an, fp: str, n: int) -> tuple[SweepState | None, str | None]:
    """(the saved state, None) if ``path`` holds one of this fingerprint (over ``n`` items); else (None, a note
    saying why it was ignored, or None)."""
    if not path.exists():
        return None, None
    try:
        with np.load(path, allow_pickle=False) as z:
            if str(z["fingerprint"]) != fp:
                return (
                    None,
                    f"{path} is from another run (options, model or images differ); ignoring it and starting over",
                )
            partial = an.from_arrays({k[2:]: z[k] for k in z.files if k.startswith("p_")})
            done = [int(i) for i in z["done"]]
            if any(not 0 <= i < n for i in done):
                raise ValueError(f"done positions outside 0–{n - 1}")
            st = SweepState(partial, set(done), json.loads(str(z["skipped"])), json.loads(str(z["blas"])))
    except (OSError, ValueError, KeyError, EOFError, TypeError, zipfile.BadZipFile) as e:
        return None, f"{path} is unreadable ({type(e).__name__}); ignoring it and starting over"
    return st, None


# ----------------------------------------------------------------------------- the BLAS the shards ran on


# what decides a shard's rounding (not its thread count): the BLAS, its kernel, and how the forward's linear layers
# multiply (qkweights.vision.gemm.gemm_route)
KERNEL_KEYS = ("internal_api", "architecture", "version", "gemm")


def blas_record() -> dict:
    """numpy's BLAS in this process: threadpoolctl's ``internal_api``, ``architecture``, ``version`` and
    ``num_threads`` (numpy's build configuration where threadpoolctl finds no BLAS: architecture and threads then
    None), and ``gemm``, the forward's GEMM route ("packed" or "numpy")."""
    from threadpoolctl import threadpool_info

    from qkweights.vision.gemm import gemm_route

    libs = [i for i in threadpool_info() if i.get("user_api") == "blas"]
    lib = next((i for i in libs if "numpy" in str(i.get("filepath", ""))), libs[0] if libs else None)
    if lib is None:
        blas = np.show_config(mode="dicts").get("Build Dependencies", {}).get("blas", {})
        lib = {"internal_api": blas.get("name"), "version": blas.get("version")}
    return {k: lib.get(k) for k in ("internal_api", "architecture", "version", "num_threads")} | {"gemm": gemm_route()}


def kernels(records: list[dict]) -> list[dict]:
    """The distinct BLAS kernels (:data:`KERNEL_KEYS`) of the shards' ``records``, sorted; each with the thread
    counts it ran at and its number of shards."""
    out: dict[str, dict] = {}
    for r in records:
        kernel = {key: r.get(key) for key in KERNEL_KEYS}
        entry = out.setdefault(json.dumps(kernel, sort_keys=True), {**kernel, "num_threads": [], "shards": 0})
        entry["shards"] += 1
        if r.get("num_threads") not in entry["num_threads"]:
            entry["num_threads"] = sorted([*entry["num_threads"], r.get("num_threads")], key=str)
    return [out[key] for key in sorted(out)]


def kernel_name(k: dict) -> str:
    """A kernel (:data:`KERNEL_KEYS`) in words: "openblas SkylakeX 0.3.31, packed GEMMs"."""
    name = " ".join(str(k[key]) for key in KERNEL_KEYS[:3] if k.get(key) is not None)
    return name + (f", {k['gemm']} GEMMs" if k.get("gemm") else "")


def kernels_note(blas: list[dict]) -> str:
    """The note of a sweep whose shards ran on several BLAS kernels (``blas``: :func:`kernels` of their records)."""
    mixed = "; ".join(f"{kernel_name(k)}: {plural(k['shards'], 'shard')}" for k in blas)
    return (
        f"the shards ran on {len(blas)} BLAS kernels ({mixed}); their numbers may differ in the last digits from a "
        "run on one kernel (see Sweeps at scale in the README)"
    )
