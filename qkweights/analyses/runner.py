"""One loop for every image analysis: shards, executors, merge, resume, progress.

An image analysis (``top-images``, ``o3``, ``same-object``) is four small things: pure
math on arrays; a per-shard partial result with an associative, commutative merge; a
typed result; figures. :class:`Analysis` is the interface the first two implement; this
module owns the loop they share:

1. The inputs (a sorted list of picklable items) not done yet are cut into shards of
   ``shard_size`` consecutive items; by default the size follows the work, about
   :data:`SHARDS_PER_WORKER` shards per worker (:func:`shard_size_for`), so that every
   worker stays busy to the end. An image's numbers depend on the image, the model and
   the machine's BLAS kernel only (not on its shard or batch), so the cut is free; the
   kernels the shards ran on are recorded (:func:`~qkweights.analyses.state.blas_record`) and more than one noted.
   Local workers are at most one per shard; more than the cores is noted.
2. Shards are submitted to a :class:`concurrent.futures.Executor`: none (in-process),
   local worker processes (:func:`~qkweights.analyses.executors.local_executor`, one BLAS thread each), or
   a Dask cluster (a ``distributed.Client``, :func:`~qkweights.analyses.executors.dask_client`, whose
   ``get_executor()`` is one).
   A worker opens the model once (per-process cache keyed by :class:`ModelRef`) and
   prepares the analysis once (its ``setup``, e.g. the SVD of the chosen heads); inside a
   shard, the next batch is decoded on a thread while the current one runs the model and
   is merged into the shard's partial (``Analysis.accumulate``, in place where the analysis can).
3. Partial results are merged as they complete. As the merge is associative and
   commutative (partials carry the list positions of their images), the completion
   order does not matter. The merged state and the items done are written atomically to
   ``<out>/.<name>_state.npz`` (:mod:`qkweights.analyses.state`) after the first finished shard, then at most every
   :data:`SAVE_EVERY_S` seconds (a state is tens of MB for a ViT-B), and when the sweep
   ends, fails or is interrupted, with a fingerprint (model weights' sha256, the resolved
   spec's content, the configs, options, the images' names, sizes and modification
   times); the same command run again resumes from it, whatever its shard size or
   executor (a ``kill -9`` loses at most the last few seconds of work). A state of another
   fingerprint, or an unreadable one, is ignored and reported through ``notes``.
4. Faults: a local worker that dies (killed, out of memory) breaks the process pool;
   the pool is rebuilt and the unfinished shards are submitted again (after
   :data:`MAX_POOL_RESTARTS` broken pools in a row with no shard finished, the run
   stops). Local workers die with their client, even on ``kill -9`` (:mod:`qkweights.analyses.executors`),
   and are terminated when the sweep stops early. Dask reschedules the tasks of a lost
   worker itself; a cluster with no worker is noted, and the sweep stops after
   :data:`NO_WORKER_TIMEOUT_S` seconds without one. A shard that raises stops the run
   with :class:`ShardError` naming its images; what was merged stays in the state file.
   Unreadable images are not errors: each analysis's ``load`` skips them, and the
   runner lists them (``path``, ``reason``) in list order.

The runner never prints: it reports through ``progress(done, total)`` (images consumed)
and returns notes for the caller to show.
"""

from __future__ import annotations

import concurrent.futures as cf
import dataclasses
import json
import math
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from qkweights.analyses.executors import cores, local_executor, stop_workers
from qkweights.analyses.state import (
    KERNEL_KEYS,
    SweepState,
    blas_record,
    fingerprint,
    kernels,
    kernels_note,
    load_state,
    save_state,
)
from qkweights.errors import InputError, QkError
from qkweights.vision.model import ModelRef, remember

MAX_POOL_RESTARTS = 3  # process pools that may break in a row, with no shard finished, before the run stops


class DocumentResult:
    """What the image analyses' typed results share: ``doc``, their JSON document (a dataclass field of each), its
    ``skipped`` images, and ``to_json``; each adds ``save``, ``load`` and ``files``."""

    @property
    def skipped(self) -> list[dict]:
        return self.doc["skipped"]

    def to_json(self) -> dict:
        return self.doc


class ShardError(QkError, RuntimeError):
    """A shard raised an error that is not a bad image (a bug, or a worker that keeps dying)."""


# ----------------------------------------------------------------------------- per-process caches
# The open models live in qkweights.vision.model (ModelRef.open, remember); the analyses' contexts here.

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

    def accumulate(self, model, ctx, batch: Batch, partial) -> Any:
        """``merge(partial, compute(model, ctx, batch))``, bit for bit; an analysis may override it to update
        ``partial`` in place without building the batch's own partial (the runner passes only the partial of the
        shard it runs, which an interrupted shard drops)."""
        return self.merge(partial, self.compute(model, ctx, batch))

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
    positions: tuple[int, ...]  # the items' positions in the input list
    batch_size: int


@dataclass
class ShardResult:
    shard: int
    partial: Any
    skipped: list[dict]  # {"path", "reason"} of the images its analysis could not use
    n_items: int
    blas: dict = field(default_factory=dict)  # the BLAS it ran on (:func:`blas_record`)


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
        return an.load(model, task.items[lo:hi], np.asarray(task.positions[lo:hi], np.int64))

    partial, skipped = an.empty(), []
    with cf.ThreadPoolExecutor(1) as reader:
        ahead = reader.submit(load, slices[0]) if slices else None
        for j in range(len(slices)):
            batch, bad = ahead.result()
            ahead = reader.submit(load, slices[j + 1]) if j + 1 < len(slices) else None
            skipped += bad
            if batch is not None:
                partial = an.accumulate(model, ctx, batch, partial)
    return ShardResult(task.shard, partial, skipped, len(task.items), blas_record())


def _positioned(skipped: list[dict], task: Task, an: Analysis) -> list[dict]:
    """Skipped records with their list positions (``load`` names them by path; positions order the list)."""
    where = {an.item_name(it): p for it, p in zip(task.items, task.positions)}
    return [{"position": int(where.get(s["path"], -1)), **s} for s in skipped]


# ----------------------------------------------------------------------------- the sweep


SHARDS_PER_WORKER = 4  # shards per worker when the shard size is chosen here: the last ones keep every worker busy
MAX_SHARD = 64  # images per chosen shard at most: resume and progress stay fine-grained on big inputs
SAVE_EVERY_S = 5.0  # the state is written after the first finished shard, then at most this often, and at the end
NO_WORKER_TIMEOUT_S = 60.0  # how long a sweep waits on a Dask cluster that has no worker before it stops


def shard_size_for(n: int, workers: int) -> int:
    """Images per shard for ``n`` images on ``workers`` workers: about :data:`SHARDS_PER_WORKER` shards per worker
    (so that no worker idles while another finishes a long last shard), at most :data:`MAX_SHARD` images, at least
    one."""
    return max(1, min(MAX_SHARD, math.ceil(n / (SHARDS_PER_WORKER * max(1, workers)))))


@dataclass
class Sweep:
    """What :func:`run_sweep` returns: the merged partial result, the skipped images (in list order) and notes."""

    partial: Any
    skipped: list[dict]
    notes: list[str]
    n_items: int
    fingerprint: str
    ref: ModelRef  # how workers opened the model (also for drawing figures on them)
    blas: list[dict] = field(default_factory=list)  # the BLAS kernels the shards ran on (:func:`kernels`)

    def kernels(self) -> list[dict]:
        """The BLAS kernels the shards ran on (:data:`KERNEL_KEYS`), for a result's provenance: the same whatever
        the executor and thread counts on one machine type (those are in :attr:`blas`)."""
        return [{key: k[key] for key in KERNEL_KEYS} for k in self.blas]


def model_ref(model, *, workers: int | None = None, client=None) -> ModelRef:
    """How worker processes open ``model`` (a :class:`~qkweights.vision.model.VisionModel`): its ``ref``, or, for a
    model built in memory, a reference only this process (and workers forked from it) can open. Remembered here."""
    if (workers or client is not None) and model.ref is None:
        raise InputError("worker processes open the model by its path or Hub id: load it with qkweights.load_model")
    ref = model.ref or ModelRef(f"<in-memory model {id(model):x}>")
    remember(ref, model)
    return ref


def _dask_threads(client) -> int:
    """The worker threads of ``client``'s cluster now (0: no worker)."""
    return sum(client.nthreads().values())


@dataclass(frozen=True)
class SweepSettings:
    """Where and how a sweep runs (:func:`run_sweep`); its results are the same whatever these are.

    batch_size: images per forward pass (16 for every analysis: a batch's images run side by side, one BLAS
    thread each, so a larger batch keeps more cores busy, and the images' numbers do not depend on it);
    shard_size: images per shard, the unit of work, resume and progress (None: chosen, :func:`shard_size_for`);
    workers: local worker processes (None: this process); client: a ``distributed.Client``, whose Dask cluster
    runs the shards instead.
    """

    batch_size: int = 16
    shard_size: int | None = None
    workers: int | None = None
    client: Any = None


def run_sweep(
    an: Analysis,
    model,
    items: Sequence,
    settings: SweepSettings = SweepSettings(),
    *,
    state_path: str | Path,
    source: dict,
    progress: Callable[[int, int], object] | None = None,
    notes: Callable[[str], object] | None = None,
) -> Sweep:
    """Run ``an`` over ``items`` (see the module docstring) and return the merged result.

    model: the :class:`~qkweights.vision.model.VisionModel`, open here; with local workers its
    ``setup`` is computed here first, so forked workers share both. Where shards run (``settings``,
    :class:`SweepSettings`): ``client`` (a ``distributed.Client``) on its Dask cluster; else ``workers``
    local processes (at most one per shard; more than this machine's cores is noted); else here, one
    after another. ``shard_size``: images per shard; None chooses it from the images left and the workers
    (:func:`shard_size_for`). progress(done, total): items consumed, at the start and after
    each shard; notes(text): a resumed or ignored state, more workers than cores, a Dask
    cluster without workers. The state file is kept; the caller removes it once its outputs
    are written.
    """
    _check_settings(settings)
    ref = model_ref(model, workers=settings.workers, client=settings.client)
    if settings.workers and settings.client is None:  # before forking, so that local workers share it
        context(an, ref, model)  # (a Dask client's: meanwhile)
    state_path = Path(state_path)
    n = len(items)
    fp = fingerprint(an, source, model.checkpoint, items)
    st, told = _resume(state_path, an, fp, n)
    shards, workers = _cut(an, ref, items, st, settings, told)
    for text in told if notes else ():
        notes(text)
    if progress:
        progress(len(st.done), n)
    merge = _Merge(an, shards, st, state_path, fp, progress, n)
    _run_shards(merge, model, ref, workers, settings.client, notes)
    skipped = [{k: v for k, v in s.items() if k != "position"} for s in st.skipped]
    blas = kernels(st.blas)
    if len(blas) > 1:
        told.append(kernels_note(blas))
        if notes:
            notes(told[-1])
    return Sweep(st.partial, skipped, told, n, fp, ref, blas)


def _check_settings(settings: SweepSettings) -> None:
    shard_size, batch_size, workers = settings.shard_size, settings.batch_size, settings.workers
    if (shard_size is not None and shard_size < 1) or batch_size < 1:
        raise InputError(f"shard size {shard_size}, batch size {batch_size}: both must be at least 1")
    if workers is not None and workers < 1:
        raise InputError(f"workers={workers}: give 1 or more worker processes")


def _resume(state_path: Path, an: Analysis, fp: str, n: int) -> tuple[SweepState, list[str]]:
    """The state saved at ``state_path`` for this fingerprint, or an empty one; and the notes saying which."""
    st, note = load_state(state_path, an, fp, n)
    told = [note] if note else []
    if st is None:
        st = SweepState(an.empty())
    elif st.done:
        told.append(f"resuming from {state_path}: {len(st.done)} of {n} images already done")
    return st, told


def _cut(
    an: Analysis, ref: ModelRef, items: Sequence, st: SweepState, settings: SweepSettings, told: list[str]
) -> tuple[list[Task], int | None]:
    """The items not done cut into shards, and the local workers to run them on (at most one per shard; more than
    the cores is added to ``told``)."""
    workers, client = settings.workers, settings.client
    left = [i for i in range(len(items)) if i not in st.done]
    # local workers beyond the cores would multiply the shards, and so the processes: size for the cores at most
    width = _dask_threads(client) if client is not None else min(workers, cores()) if workers else 1
    size = settings.shard_size or shard_size_for(len(left), width)
    shards = [
        Task(an, ref, j, tuple(items[i] for i in pos), tuple(pos), settings.batch_size)
        for j, pos in enumerate(left[i : i + size] for i in range(0, len(left), size))
    ]
    if workers and client is None:
        workers = min(workers, max(1, len(shards)))
        if workers > cores():
            told.append(
                f"{workers} worker processes on {cores()} cores: more workers than cores slow the run down; "
                f"give workers={cores()} or fewer"
            )
    return shards, workers


@dataclass
class _Merge:
    """The merging side of a sweep: folds each finished shard into ``st``, reports progress and writes the state
    after the first shard, then at most every :data:`SAVE_EVERY_S` seconds."""

    an: Analysis
    shards: list[Task]
    st: SweepState
    path: Path
    fp: str
    progress: Callable[[int, int], object] | None
    n: int
    saved_at: float = -math.inf  # when the state was last written
    clean: bool = True  # whether the written state holds every merged shard

    def save(self) -> None:
        save_state(self.path, self.an, self.fp, self.st)
        self.saved_at, self.clean = time.monotonic(), True

    def absorb(self, res: ShardResult) -> None:
        task, st = self.shards[res.shard], self.st
        st.partial = self.an.merge(st.partial, res.partial)  # a new one: an interrupt mid-merge leaves the state whole
        st.skipped = sorted(st.skipped + _positioned(res.skipped, task, self.an), key=lambda s: s["position"])
        st.done.update(task.positions)
        st.blas.append(res.blas)
        self.clean = False
        if time.monotonic() - self.saved_at >= SAVE_EVERY_S:
            self.save()
        if self.progress:
            self.progress(len(st.done), self.n)


def _run_shards(merge: _Merge, model, ref: ModelRef, workers: int | None, client, notes) -> None:
    """Run ``merge.shards`` on ``client``'s cluster, ``workers`` local processes or here, merging them as they
    finish; whatever happens (finished, failed, interrupted, terminated), what was merged is saved."""
    an, shards = merge.an, merge.shards
    try:
        if client is not None:
            with cf.ThreadPoolExecutor(1) as background:  # the client's own setup, for the caller, meanwhile
                setup = background.submit(context, an, ref, model)
                _run_on(client.get_executor(), None, shards, merge.absorb, an, idle=_no_workers(client, notes))
                setup.result()
        elif workers:
            _run_on(None, lambda: local_executor(workers), shards, merge.absorb, an)
        else:
            for task in shards:
                merge.absorb(_guarded(task, an))
    finally:
        if not merge.clean:
            merge.save()


def _no_workers(client, notes) -> Callable[[], None]:
    """A check, called while the sweep waits on ``client``'s cluster: it notes once when the cluster has no worker
    and raises InputError after :data:`NO_WORKER_TIMEOUT_S` s without one (a worker joining resets the clock)."""
    since: list[float] = []

    def check() -> None:
        if _dask_threads(client):
            since.clear()
            return
        if not since:
            since.append(time.monotonic())
            if notes:
                notes(
                    f"the Dask scheduler {client.scheduler.address} has no workers; waiting up to "
                    f"{NO_WORKER_TIMEOUT_S:g} s for one (start one with `dask worker {client.scheduler.address}`)"
                )
        elif time.monotonic() - since[0] > NO_WORKER_TIMEOUT_S:
            raise InputError(
                f"the Dask scheduler {client.scheduler.address} has had no workers for {NO_WORKER_TIMEOUT_S:g} s; "
                f"start workers with `dask worker {client.scheduler.address}` and re-run to resume"
            )

    return check


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
        f"shard {task.shard} (images {task.positions[0]}–{task.positions[-1]}: {shown}) failed: "
        f"{type(e).__name__}: {' '.join(str(e).split())}; the shards finished before it are kept, a re-run resumes"
    )


def _run_on(executor: cf.Executor | None, make_executor, todo: list[Task], absorb, an: Analysis, *, idle=None) -> None:
    """Submit every task and merge results as they complete.

    With ``make_executor`` (local pools) the executor is made here, shut down at the end,
    rebuilt when a worker dies (BrokenProcessPool), the unfinished tasks submitted again,
    and its workers terminated when the run stops early (an error, Ctrl-C, SIGTERM).
    ``idle()``: called about once a second while no result comes (it may raise).
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
                for fut in _completed(futures, idle):
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
                if not own:  # a local pool is stopped below (stop_workers), which cancels what has not started
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
    except BaseException:
        if own and executor is not None:
            stop_workers(executor)
            executor = None
        raise
    finally:
        if own and executor is not None:
            executor.shutdown(wait=True, cancel_futures=True)


def _completed(futures, idle):
    """The futures as they complete (as :func:`concurrent.futures.as_completed`), calling ``idle()`` each second
    none does."""
    left = set(futures)
    while left:
        done, left = cf.wait(left, timeout=1.0 if idle else None, return_when=cf.FIRST_COMPLETED)
        if not done:
            idle()
        yield from done


def run_jobs(fn: Callable[[Any], Any], jobs: list, *, workers: int | None = None, client=None) -> None:
    """Call ``fn(job)`` for every job where a sweep runs: on ``client``'s Dask cluster, on ``workers`` local
    processes (no more than the jobs and the cores: figures are work for a CPU each), or else in two forked
    processes (:func:`qkweights.outputs.draw_in_parallel`, made for figures)."""
    if client is not None:
        list(client.get_executor().map(fn, jobs))
    elif workers and len(jobs) > 1:
        with local_executor(min(workers, len(jobs), cores())) as pool:
            list(pool.map(fn, jobs))
    else:
        from qkweights.outputs import draw_in_parallel

        draw_in_parallel(fn, [(job,) for job in jobs])
