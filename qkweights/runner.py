"""One loop for every image analysis: shards, executors, merge, resume, progress.

An image analysis (``top-images``, ``o3``, ``same-object``) is four small things: pure
math on arrays; a per-shard partial result with an associative, commutative merge; a
typed result; figures. :class:`Analysis` is the interface the first two implement; this
module owns the loop they share:

1. The inputs (a sorted list of picklable items) are cut into shards of ``shard_size``
   consecutive items. The cut depends on nothing else — not on the executor nor on the
   number of workers — and each shard is cut into the same batches wherever it runs, so
   every image goes through the same forward pass and the floats are identical
   whichever executor ran the sweep.
2. Shards are submitted to a :class:`concurrent.futures.Executor`: none (in-process),
   local worker processes (:func:`local_executor`, one BLAS thread each), or a Dask
   cluster (a ``distributed.Client``, :func:`dask_client`, whose ``get_executor()`` is one).
   A worker opens the model once (per-process cache keyed by :class:`ModelRef`) and
   prepares the analysis once (its ``setup``, e.g. the SVD of the chosen heads); inside a
   shard, the next batch is decoded on a thread while the current one runs the model.
3. Partial results are merged as they complete. As the merge is associative and
   commutative (partials carry the list positions of their images), the completion
   order does not matter. After each merge the merged state and the set of finished
   shards are written atomically to ``<out>/.<name>_state.npz`` with a fingerprint
   (model weights' sha256, options, the images' names, sizes and modification times);
   the same command run again resumes from it. A state of another fingerprint, or an
   unreadable one, is ignored and reported through ``notes``.
4. Faults: a local worker that dies (killed, out of memory) breaks the process pool;
   the pool is rebuilt and the unfinished shards are submitted again (after
   :data:`MAX_POOL_RESTARTS` broken pools in a row with no shard finished, the run
   stops). Dask reschedules the tasks of a lost worker itself. A shard that raises stops the run with
   :class:`ShardError` naming its images; what was merged stays in the state file.
   Unreadable images are not errors: each analysis's ``load`` skips them, and the
   runner lists them (``path``, ``reason``) in list order.

The runner never prints: it reports through ``progress(done, total)`` (images consumed)
and returns notes for the caller to show.
"""

from __future__ import annotations

import concurrent.futures as cf
import dataclasses
import hashlib
import json
import os
import threading
import zipfile
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from qkweights.errors import InputError, QkError
from qkweights.outputs import write_npz
from qkweights.version import __version__
from qkweights.vision import ModelRef, remember

MAX_POOL_RESTARTS = 3  # process pools that may break in a row, with no shard finished, before the run stops
DASK_INSTALL = 'pip install "qkweights[dask]"'


class ShardError(QkError, RuntimeError):
    """A shard raised an error that is not a bad image (a bug, or a worker that keeps dying)."""


# ----------------------------------------------------------------------------- per-process caches
# The open models live in qkweights.vision (ModelRef.open, remember); the analyses' contexts here.

_CONTEXTS: dict[tuple, Any] = {}  # this process's analysis contexts: (ModelRef, Analysis.key()) → setup(model)


# ----------------------------------------------------------------------------- the interface of an analysis


@dataclass(frozen=True)
class Batch:
    """Images of a shard decoded and ready for the model: ``positions`` in the input list, ``data`` as ``load`` made
    it."""

    positions: np.ndarray
    data: Any


class Analysis(ABC):
    """An image analysis, as the runner drives it. Subclasses are small frozen dataclasses (they travel to workers).

    Items are whatever the analysis lists (relative paths, dataset records): picklable,
    in a fixed sorted order. A partial result is any picklable value that ``to_arrays``
    turns into named arrays and ``from_arrays`` back.
    """

    name: str = "analysis"  # the state file is .<name>_state.npz

    def key(self) -> str:
        """A string that identifies the options the results depend on (for the fingerprint and per-process caches):
        by default every field of the (dataclass) analysis, as JSON."""
        return json.dumps(dataclasses.asdict(self), sort_keys=True, default=str)

    def setup(self, model) -> Any:
        """Per-process preparation from the model (e.g. the SVD of the chosen heads); cached by the runner."""
        return None

    @abstractmethod
    def load(self, model, items: Sequence, positions: np.ndarray) -> tuple[Batch | None, list[dict]]:
        """Decode and preprocess ``items``; returns the batch (None when no item is usable) and ``{"path", "reason"}``
        of each skipped."""

    @abstractmethod
    def compute(self, model, ctx, batch: Batch) -> Any:
        """The partial result of one batch (runs the model)."""

    @abstractmethod
    def empty(self) -> Any:
        """The partial result of no images: the neutral element of ``merge``."""

    @abstractmethod
    def merge(self, a, b) -> Any:
        """Associative and commutative merge of two partial results (of disjoint images)."""

    @abstractmethod
    def to_arrays(self, partial) -> dict[str, np.ndarray]:
        """The partial result as named arrays (saved in the state file)."""

    @abstractmethod
    def from_arrays(self, arrays: dict[str, np.ndarray]) -> Any:
        """Inverse of ``to_arrays``."""

    def item_files(self, item) -> list[Path]:
        """The files an item is read from (their sizes and modification times enter the fingerprint)."""
        return [Path(item)]

    def item_name(self, item) -> str:
        """How an item is named in messages and in the list of skipped images."""
        return str(item)


# ----------------------------------------------------------------------------- shards


@dataclass(frozen=True)
class Task:
    """One shard as sent to a worker: everything it needs, nothing more."""

    analysis: Analysis
    ref: ModelRef
    shard: int
    items: tuple
    first: int  # list position of items[0]
    batch_size: int


@dataclass
class ShardResult:
    shard: int
    partial: Any
    skipped: list[dict]  # {"path", "reason"} of the images its analysis could not use
    n_items: int


def context(an: Analysis, ref: ModelRef, model):
    """``an.setup(model)``, computed once per process (and inherited by workers forked after it)."""
    key = (ref, an.key())
    if key not in _CONTEXTS:
        _CONTEXTS[key] = an.setup(model)
    return _CONTEXTS[key]


def run_shard(task: Task) -> ShardResult:
    """Run one shard in this process: batches of ``batch_size``, the next one decoded while the current one runs."""
    model = task.ref.open()
    an = task.analysis
    ctx = context(an, task.ref, model)
    slices = [(i, min(i + task.batch_size, len(task.items))) for i in range(0, len(task.items), task.batch_size)]

    def load(lo_hi):
        lo, hi = lo_hi
        return an.load(model, task.items[lo:hi], np.arange(task.first + lo, task.first + hi))

    partial, skipped = an.empty(), []
    with cf.ThreadPoolExecutor(1) as reader:
        ahead = reader.submit(load, slices[0]) if slices else None
        for j in range(len(slices)):
            batch, bad = ahead.result()
            ahead = reader.submit(load, slices[j + 1]) if j + 1 < len(slices) else None
            skipped += bad
            if batch is not None:
                partial = an.merge(partial, an.compute(model, ctx, batch))
    return ShardResult(task.shard, partial, skipped, len(task.items))


def _positioned(skipped: list[dict], items: Sequence, first: int, an: Analysis) -> list[dict]:
    """Skipped records with their list positions (``load`` names them by path; positions order the list)."""
    where = {an.item_name(it): first + i for i, it in enumerate(items)}
    return [{"position": int(where.get(s["path"], -1)), **s} for s in skipped]


# ----------------------------------------------------------------------------- state


def fingerprint(an: Analysis, source: dict, ck, items: Sequence, shard_size: int, batch_size: int) -> str:
    """sha256 of everything that decides a sweep's numbers: the tool version, the model's provenance (weights), the
    content of the spec bound to its checkpoint ``ck`` (as resolved from the spec folders, whatever its name) and of
    the configs read, the options, the shard cut and each item's files (name, size, mtime)."""
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
        "spec": dataclasses.asdict(ck.spec),
        "configs": ck.configs,
        "shard_size": shard_size,
        "batch_size": batch_size,
        "files": files,
    }
    return hashlib.sha256(json.dumps(doc, sort_keys=True, default=str).encode()).hexdigest()


@dataclass
class SweepState:
    """The merged result of the finished shards."""

    partial: Any
    done: set[int] = field(default_factory=set)
    skipped: list[dict] = field(default_factory=list)
    n_done: int = 0  # items consumed (scored or skipped)


def save_state(path: Path, an: Analysis, fp: str, st: SweepState) -> None:
    arrays = {f"p_{k}": v for k, v in an.to_arrays(st.partial).items()}
    write_npz(
        path,
        fingerprint=np.array(fp),
        done=np.array(sorted(st.done), np.int64),
        n_done=np.array(st.n_done),
        skipped=np.array(json.dumps(st.skipped)),
        **arrays,
    )


def load_state(path: Path, an: Analysis, fp: str) -> tuple[SweepState | None, str | None]:
    """(the saved state, None) if ``path`` holds one of this fingerprint; else (None, a note saying why it was ignored,
    or None)."""
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
            st = SweepState(partial, set(int(i) for i in z["done"]), json.loads(str(z["skipped"])), int(z["n_done"]))
    except (OSError, ValueError, KeyError, EOFError, TypeError, zipfile.BadZipFile) as e:
        return None, f"{path} is unreadable ({type(e).__name__}); ignoring it and starting over"
    return st, None


# ----------------------------------------------------------------------------- executors


def local_executor(workers: int) -> cf.ProcessPoolExecutor:
    """``workers`` local processes, each with one BLAS thread.

    Forked where the platform allows and no other thread runs, so that the models this
    process has open (:func:`remember`) are shared copy-on-write instead of being read
    again; otherwise spawned, and each worker opens the model itself on its first shard.
    """
    import multiprocessing

    if workers < 1:
        raise InputError(f"{workers} workers: give at least 1")
    forkable = "fork" in multiprocessing.get_all_start_methods() and threading.active_count() == 1
    ctx = multiprocessing.get_context("fork" if forkable else "spawn")
    return cf.ProcessPoolExecutor(workers, mp_context=ctx, initializer=_one_blas_thread)


def _one_blas_thread() -> None:
    from threadpoolctl import threadpool_limits

    os.environ["OMP_NUM_THREADS"] = os.environ["OPENBLAS_NUM_THREADS"] = "1"
    threadpool_limits(1)


def dask_client(address: str | None = None, scheduler_file: str | None = None):
    """A ``distributed.Client`` of an existing Dask cluster (address ``tcp://host:port`` or a scheduler file)."""
    try:
        from distributed import Client
    except ImportError as e:
        raise InputError(
            f"a Dask scheduler needs the optional 'distributed' package; install it with: {DASK_INSTALL}"
        ) from e
    try:
        if scheduler_file is not None:
            if not Path(scheduler_file).is_file():
                raise InputError(
                    f"{scheduler_file}: no such scheduler file; give the file `dask scheduler --scheduler-file` wrote"
                )
            return Client(scheduler_file=scheduler_file, timeout="20s")
        return Client(address, timeout="20s")
    except (OSError, TimeoutError) as e:
        raise InputError(
            f"could not reach the Dask scheduler {address or scheduler_file} ({type(e).__name__}: {e}); "
            "start it with `dask scheduler` and check the address"
        ) from e


# ----------------------------------------------------------------------------- the sweep


@dataclass
class Sweep:
    """What :func:`run_sweep` returns: the merged partial result, the skipped images (in list order) and notes."""

    partial: Any
    skipped: list[dict]
    notes: list[str]
    n_items: int
    fingerprint: str
    ref: ModelRef  # how workers opened the model (also for drawing figures on them)


def model_ref(model, *, workers: int | None = None, client=None) -> ModelRef:
    """How worker processes open ``model`` (a :class:`~qkweights.vision.VisionModel`): its ``ref``, or, for a model
    built in memory, a reference only this process (and workers forked from it) can open. Remembered here."""
    if (workers or client is not None) and model.ref is None:
        raise InputError("worker processes open the model by its path or Hub id: load it with qkweights.load_model")
    ref = model.ref or ModelRef(f"<in-memory model {id(model):x}>")
    remember(ref, model)
    return ref


def run_sweep(
    an: Analysis,
    model,
    items: Sequence,
    *,
    state_path: str | Path,
    source: dict,
    shard_size: int = 64,
    batch_size: int = 16,
    workers: int | None = None,
    client=None,
    progress: Callable[[int, int], object] | None = None,
    notes: Callable[[str], object] | None = None,
) -> Sweep:
    """Run ``an`` over ``items`` (see the module docstring) and return the merged result.

    model: the :class:`~qkweights.vision.VisionModel`, open here; its ``setup`` is computed
    here first, so forked workers share both. Where shards run: ``client`` (a
    ``distributed.Client``) on its Dask cluster; else ``workers`` local processes; else
    here, one after another. progress(done, total): items consumed, at the start and after
    each shard; notes(text): a resumed or ignored state. The state file is kept; the caller
    removes it once its outputs are written.
    """
    if shard_size < 1 or batch_size < 1:
        raise InputError(f"shard size {shard_size}, batch size {batch_size}: both must be at least 1")
    ref = model_ref(model, workers=workers, client=client)
    context(an, ref, model)
    state_path = Path(state_path)
    n = len(items)
    fp = fingerprint(an, source, model.checkpoint, items, shard_size, batch_size)
    st, note = load_state(state_path, an, fp)
    told = [note] if note else []
    if st is None:
        st = SweepState(an.empty())
    elif st.done:
        told.append(f"resuming from {state_path}: {st.n_done} of {n} images already done")
    for text in told if notes else ():
        notes(text)
    shards = [
        Task(an, ref, j, tuple(items[i : i + shard_size]), i, batch_size) for j, i in enumerate(range(0, n, shard_size))
    ]
    todo = [t for t in shards if t.shard not in st.done]
    if progress:
        progress(st.n_done, n)

    def absorb(res: ShardResult) -> None:
        st.partial = an.merge(st.partial, res.partial)
        task = shards[res.shard]
        st.skipped = sorted(
            st.skipped + _positioned(res.skipped, task.items, task.first, an), key=lambda s: s["position"]
        )
        st.done.add(res.shard)
        st.n_done += res.n_items
        save_state(state_path, an, fp, st)
        if progress:
            progress(st.n_done, n)

    if client is not None:
        _run_on(client.get_executor(), None, todo, absorb, an)
    elif workers:
        _run_on(None, lambda: local_executor(min(workers, max(1, len(todo)))), todo, absorb, an)
    else:
        for task in todo:
            absorb(_guarded(task, an))
    skipped = [{k: v for k, v in s.items() if k != "position"} for s in st.skipped]
    return Sweep(st.partial, skipped, told, n, fp, ref)


def _guarded(task: Task, an: Analysis) -> ShardResult:
    try:
        return run_shard(task)
    except (QkError, KeyboardInterrupt):
        raise
    except Exception as e:
        raise ShardError(_shard_failure(task, an, e)) from e


def _shard_failure(task: Task, an: Analysis, e: BaseException) -> str:
    names = [an.item_name(it) for it in task.items]
    shown = ", ".join(names[:3]) + (f" … ({len(names)} images)" if len(names) > 3 else "")
    return (
        f"shard {task.shard} (images {task.first}–{task.first + len(names) - 1}: {shown}) failed: "
        f"{type(e).__name__}: {' '.join(str(e).split())}; the shards finished before it are kept, a re-run resumes"
    )


def _run_on(executor: cf.Executor | None, make_executor, todo: list[Task], absorb, an: Analysis) -> None:
    """Submit every task and merge results as they complete.

    With ``make_executor`` (local pools) the executor is made here, shut down at the end,
    and rebuilt when a worker dies (BrokenProcessPool), the unfinished tasks submitted again.
    """
    from concurrent.futures.process import BrokenProcessPool

    pending = {t.shard: t for t in todo}
    breaks = 0  # pools broken since the last shard finished
    own = make_executor is not None
    try:
        while pending:
            if own and executor is None:
                executor = make_executor()
            futures = {executor.submit(run_shard, t): t for t in pending.values()}
            broken = False
            try:
                for fut in cf.as_completed(futures):
                    task = futures[fut]
                    try:
                        res = fut.result()
                    except BrokenProcessPool:
                        broken = True
                        continue
                    except (QkError, KeyboardInterrupt):
                        raise
                    except Exception as e:  # a bug in the shard, or Dask's KilledWorker after repeated worker deaths
                        raise ShardError(_shard_failure(task, an, e)) from e
                    del pending[task.shard]
                    breaks = 0
                    absorb(res)
            except BaseException:
                for fut in futures:
                    fut.cancel()
                raise
            if broken and pending:  # a worker died: start a new pool for what is left
                breaks += 1
                if breaks >= MAX_POOL_RESTARTS:
                    first = pending[min(pending)]
                    raise ShardError(
                        _shard_failure(
                            first,
                            an,
                            RuntimeError(
                                f"worker processes died {breaks} times in a row with no shard finished (out of memory?)"
                            ),
                        )
                    )
                executor.shutdown(wait=False, cancel_futures=True)
                executor = None
    finally:
        if own and executor is not None:
            executor.shutdown(wait=True, cancel_futures=True)


def run_jobs(fn: Callable[[Any], Any], jobs: list, *, workers: int | None = None, client=None) -> None:
    """Call ``fn(job)`` for every job where a sweep runs: on ``client``'s Dask cluster, on ``workers`` local
    processes, or else in two forked processes (:func:`qkweights.outputs.draw_in_parallel`, made for figures)."""
    if client is not None:
        list(client.get_executor().map(fn, jobs))
    elif workers and len(jobs) > 1:
        with local_executor(min(workers, len(jobs))) as pool:
            list(pool.map(fn, jobs))
    else:
        from qkweights.outputs import draw_in_parallel

        draw_in_parallel(fn, [(job,) for job in jobs])
