"""Images (or layers) side by side on Python threads, every BLAS call at one thread: the one arithmetic per item that
makes an image's numbers independent of its batch, the thread count and the executor (issue 15).

numpy's BLAS is found once at import (threadpoolctl). :func:`side_by_side` is how the forward pass runs the images
of a batch and how top-images runs the layers of a batch's projections.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

from threadpoolctl import ThreadpoolController

from qkweights.errors import QkWarning

_BLAS = ThreadpoolController()  # numpy's BLAS, found once at import
T, R = TypeVar("T"), TypeVar("R")


def blas_threads() -> int:
    """The thread count numpy's BLAS may use now (OPENBLAS_NUM_THREADS, threadpoolctl limits, …)."""
    return max([lib["num_threads"] for lib in _BLAS.select(user_api="blas").info()] or [1])


def one_blas_thread():
    """A context in which numpy's BLAS runs on one thread (threadpoolctl; the limit is process-wide).

    A multi-threaded BLAS call splits its output among threads, and the split moves the
    kernel's edge tiles (OpenBLAS's Haswell kernel then rounds otherwise); on one thread a
    call's rounding depends on its operands alone. Enter and leave it in one thread, best the
    main one: OpenBLAS (0.3.31 here) may ignore a thread count set from another thread once
    the main thread has set one, so a process that runs analyses on several threads at once
    (a Dask worker with ``--nthreads 2``) should start with OPENBLAS_NUM_THREADS=1, as
    Dask's nanny does; :func:`forward` warns when the limit did not take.
    """
    return _BLAS.limit(limits=1, user_api="blas")


def side_by_side(fn: Callable[[T], R], items: Iterable[T], threads: int | None = None) -> list[R]:
    """``[fn(item) for item in items]``, the items side by side on ``threads`` Python threads (default: as many as
    numpy's BLAS may use now) and every BLAS call inside at one thread (:func:`one_blas_thread`), so that what fn
    computes of an item does not depend on the thread count. numpy releases the GIL in its BLAS calls and its
    ufuncs on large arrays, so the items run in parallel. Call it from the main thread (see :func:`one_blas_thread`).
    """
    items = list(items)
    n = min(threads or blas_threads(), len(items))
    with one_blas_thread():
        if blas_threads() > 1:
            warnings.warn(
                f"numpy's BLAS could not be limited to one thread from this thread (it runs {blas_threads()}): "
                "results may differ in the last digits with the thread count; set OPENBLAS_NUM_THREADS=1 "
                "(or threadpoolctl limits in the main thread) for the same numbers whatever the threads",
                QkWarning,
                stacklevel=3,
            )
        if n <= 1:
            return [fn(item) for item in items]
        with ThreadPoolExecutor(n) as pool:
            return list(pool.map(fn, items))
