"""Atomic output files: write to a temporary sibling, then rename into place.

An interrupted run never leaves a partial file under the final name.
"""

from __future__ import annotations

import csv
import io
import json
import multiprocessing
import os
import tempfile
import threading
from contextlib import contextmanager
from pathlib import Path

import numpy as np


@contextmanager
def atomic_path(path: str | os.PathLike):
    """Yield a temporary path beside ``path``; on success rename it to ``path``, else delete it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp" + path.suffix, dir=path.parent)
    os.close(fd)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; outputs get the usual permissions
    try:
        yield Path(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_bytes(path, data: bytes) -> Path:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)
    return Path(path)


def write_text(path, text: str) -> Path:
    return write_bytes(path, text.encode("utf-8"))


def _finite(obj):
    """JSON has no NaN/inf: write them as null."""
    if isinstance(obj, float):
        return obj if np.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    return obj


def dumps_json(obj) -> str:
    return json.dumps(_finite(obj), indent=1, allow_nan=False, ensure_ascii=False) + "\n"


def write_json(path, obj) -> Path:
    return write_text(path, dumps_json(obj))


def write_csv(path, header: list[str], rows) -> Path:
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(header)
    writer.writerows(rows)
    return write_text(path, buf.getvalue())


def write_npz(path, **arrays) -> Path:
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            np.savez(f, **arrays)
    return Path(path)


def save_figure(fig, path, dpi: int = 120) -> Path:
    """Save a matplotlib figure as PNG atomically and close it."""
    import matplotlib.pyplot as plt

    with atomic_path(path) as tmp:
        # Constrained layout already fits the figure; "tight" would draw it a second time.
        tight = None if fig.get_layout_engine() is not None else "tight"
        # zlib level 1: about 2× faster to write than the default 6, files about 1.3× larger.
        fig.savefig(tmp, dpi=dpi, format="png", bbox_inches=tight, pil_kwargs={"compress_level": 1})
    plt.close(fig)
    return Path(path)


def draw_in_parallel(draw, jobs: list[tuple], workers: int = 2) -> None:
    """Call ``draw(*job)`` for every job, split over ``workers`` forked processes.

    Drawing figures is single-threaded Python, so two processes draw about twice as fast
    on two cores. Forked children inherit the loaded modules and the jobs (nothing is
    pickled). Without ``fork``, or when other threads run (forking them can deadlock),
    the jobs run here, one after the other.
    """
    forkable = "fork" in multiprocessing.get_all_start_methods() and threading.active_count() == 1
    if workers < 2 or len(jobs) < 2 or not forkable:
        for job in jobs:
            draw(*job)
        return
    ctx = multiprocessing.get_context("fork")
    procs = [ctx.Process(target=_draw_all, args=(draw, jobs[i::workers])) for i in range(workers)]
    for p in procs:
        p.start()
    for p in procs:
        p.join()
    failed = [p.exitcode for p in procs if p.exitcode != 0]
    if failed:
        raise RuntimeError(f"a figure-drawing process failed (exit code {failed[0]}); its error is printed above")


def _draw_all(draw, jobs: list[tuple]) -> None:
    for job in jobs:
        draw(*job)
