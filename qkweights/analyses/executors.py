"""Where the shards of a sweep run: local worker processes that die with their client, or a Dask cluster.

:func:`local_executor` starts ``workers`` processes with one BLAS thread each, forked where the platform allows
(so that the models already open here are shared), which die with the process that started them even when it is
killed with SIGKILL (:func:`_worker_start`); :func:`stop_workers` ends such a pool at once. :func:`dask_client`
connects to an existing Dask cluster, whose ``get_executor()`` runs shards the same way. :func:`cores` is what
this process may use.
"""

from __future__ import annotations

import concurrent.futures as cf
import json
import os
import sys
import threading
import time
from pathlib import Path

from qkweights.errors import InputError

DASK_INSTALL = 'pip install "qkweights[dask]"'


def cores() -> int:
    """The cores this process may run on (its CPU affinity where the platform says, else the machine's count)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def local_executor(workers: int) -> cf.ProcessPoolExecutor:
    """``workers`` local processes, each with one BLAS thread, that die with this process (:func:`_worker_start`).

    Forked where the platform allows and no other thread runs, so that the models this
    process has open (:func:`remember`) are shared copy-on-write instead of being read
    again; otherwise spawned, and each worker opens the model itself on its first shard.
    """
    import multiprocessing

    if workers < 1:
        raise InputError(f"{workers} workers: give at least 1")
    forkable = "fork" in multiprocessing.get_all_start_methods() and threading.active_count() == 1
    ctx = multiprocessing.get_context("fork" if forkable else "spawn")
    return cf.ProcessPoolExecutor(workers, mp_context=ctx, initializer=_worker_start, initargs=(os.getpid(),))


PR_SET_PDEATHSIG = 1  # <linux/prctl.h>
PARENT_POLL_S = 1.0  # how often a worker without PR_SET_PDEATHSIG checks that its client still runs


def _worker_start(parent: int) -> None:
    """A local worker's set-up: one BLAS thread, and death with its client ``parent`` (killed, even with SIGKILL).

    Linux: the kernel sends SIGKILL when the parent dies (prctl PR_SET_PDEATHSIG); elsewhere a
    daemon thread checks every :data:`PARENT_POLL_S` s that the parent is still this process's parent.
    """
    import signal

    from threadpoolctl import threadpool_limits

    os.environ["OMP_NUM_THREADS"] = os.environ["OPENBLAS_NUM_THREADS"] = "1"
    threadpool_limits(1)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)  # not the client's handler, if it was forked with one
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the whole process group: the client stops us
    if not _die_with_parent():
        threading.Thread(target=_watch_parent, args=(parent,), daemon=True).start()
    if os.getppid() != parent:  # the client died before the death signal was armed
        os._exit(1)


def _die_with_parent() -> bool:
    """Ask the kernel for SIGKILL when the parent dies (Linux prctl PR_SET_PDEATHSIG); False where unavailable."""
    import ctypes
    import signal

    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)  # this process's own symbols: libc's among them
        return libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False


def _watch_parent(parent: int) -> None:
    while os.getppid() == parent:
        time.sleep(PARENT_POLL_S)
    os._exit(1)


def stop_workers(executor: cf.ProcessPoolExecutor) -> None:
    """Stop a local pool now: cancel what has not started and terminate the worker processes (their shards are
    not merged; a re-run runs them again).

    A worker terminated while it sends its result leaves the pool's thread waiting for the rest of it, and the
    interpreter waits for that thread at exit: once the workers are gone, this process's own copy of the result
    pipe's writing end is closed, so that the thread reads the end of the pipe instead, marks the pool broken and
    ends (the futures must not have been cancelled by hand before: Python 3.11's thread fails on those)."""
    processes = list((getattr(executor, "_processes", None) or {}).values())
    results = getattr(executor, "_result_queue", None)  # shutdown(wait=False) drops it
    executor.shutdown(wait=False, cancel_futures=True)
    for proc in processes:
        proc.terminate()
    for proc in processes:
        proc.join(5)
    writer = getattr(results, "_writer", None)
    if writer is not None and not any(proc.is_alive() for proc in processes):
        writer.close()


def dask_client(address: str | None = None, scheduler_file: str | None = None):
    """A ``distributed.Client`` of an existing Dask cluster (address ``tcp://host:port`` or a scheduler file).

    InputError, in one line, for an address Dask cannot parse, a scheduler file that is not
    the JSON ``dask scheduler --scheduler-file`` writes, and a scheduler that does not answer.
    """
    try:
        from distributed import Client
    except ImportError as e:
        raise InputError(
            f"a Dask scheduler needs the optional 'distributed' package; install it with: {DASK_INSTALL}"
        ) from e
    if scheduler_file is not None:
        address = _scheduler_file_address(Path(scheduler_file))
    try:
        return Client(address, timeout="20s")
    except ValueError as e:  # distributed's words for an address it cannot parse
        raise InputError(f"Dask scheduler address {address!r}: {e}; give one such as tcp://10.0.0.5:8786") from e
    except (OSError, TimeoutError) as e:
        raise InputError(
            f"could not reach the Dask scheduler {address} ({type(e).__name__}: {e}); "
            "start it with `dask scheduler` and check the address"
        ) from e


def _scheduler_file_address(path: Path) -> str:
    """The scheduler address a ``dask scheduler --scheduler-file`` file holds (its JSON ``address``)."""
    if not path.is_file():
        raise InputError(f"{path}: no such scheduler file; give the file `dask scheduler --scheduler-file` wrote")
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise InputError(
            f"{path}: not a Dask scheduler file ({type(e).__name__}: {e}); give the file `dask scheduler "
            "--scheduler-file` wrote"
        ) from e
    address = doc.get("address") if isinstance(doc, dict) else None
    if not isinstance(address, str) or not address:
        raise InputError(
            f'{path}: not a Dask scheduler file (no "address" in it); give the file `dask scheduler '
            "--scheduler-file` wrote"
        )
    return address
