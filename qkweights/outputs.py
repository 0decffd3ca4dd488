"""Atomic output files: write to a temporary sibling, then rename into place.

An interrupted run never leaves a partial file under the final name. A path that
cannot be written (an existing file where a folder belongs, a folder where a file
belongs, no permission, a full disk) is an :class:`~qkweights.errors.InputError`
naming the path, never a bare OSError. :func:`record_outputs` keeps a small
manifest per command in an output folder, so a re-run removes the files of the
previous run that it does not write again. :func:`claim_dir` holds an output folder
for one run at a time, and never inside the folders the run reads.
"""

from __future__ import annotations

import contextlib
import csv
import fcntl
import functools
import inspect
import io
import json
import multiprocessing
import os
import tempfile
import threading
import warnings
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from qkweights.errors import InputError, QkError

MANIFEST_SCHEMA = "qkweights.outputs/1"
LOCK_NAME = ".qkweights.lock"  # in a claimed output folder while a run holds it; holds the holder's PID


def _why(path: Path, err: OSError, *, folder: bool) -> str:
    """A one-line reason and fix for an OSError met while writing ``path`` (the message names ``path`` before it)."""
    for parent in [path, *path.parents] if folder else list(path.parents):
        if parent.exists() and not parent.is_dir():
            where = "" if parent == path else f"{parent} "
            return f"{where}is a file, not a folder; remove it or choose another output folder"
        if parent.is_dir():
            break
    if not folder and path.is_dir():
        return "is a folder; give a file name"
    if isinstance(err, PermissionError):
        return "permission denied; choose a folder you can write to"
    return f"cannot be written ({err.strerror or type(err).__name__}); choose another place"


def output_error(path, err: OSError, *, folder: bool = False) -> InputError:
    """The InputError for an OSError met while writing ``path`` (a file, or a folder with ``folder``)."""
    path = Path(path)
    return InputError(f"{path}: {_why(path, err, folder=folder)}")


def prepare_dir(path) -> Path:
    """Create output folder ``path`` (and its parents) and check that files can be created in it.

    Commands call this before their long work, so a bad ``--out`` fails at once.
    Raises InputError naming the path and the fix.
    """
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".qkweights-probe.", dir=path)
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise output_error(path, e, folder=True) from None
    return path


def _inside(out: Path, inputs) -> InputError | None:
    """The refusal of output folder ``out`` when it is, or lies inside, one of the ``inputs`` folders; else None."""
    where = out.resolve()
    for folder in inputs:
        if where == Path(folder).resolve():
            return InputError(
                f"{out}: is the input folder, whose files a run reads; choose an output folder outside it"
            )
        if where.is_relative_to(Path(folder).resolve()):
            return InputError(
                f"{out}: lies inside the input folder {folder}, whose files a run reads; choose an output folder "
                "outside it"
            )
    return None


def _lock(folder: Path) -> int:
    """An open descriptor of ``folder``'s lock file, holding an exclusive flock; InputError naming the holder's PID
    when another run (process, or open claim) holds it."""
    path = folder / LOCK_NAME
    while True:
        try:
            folder.mkdir(parents=True, exist_ok=True)  # a holder that made the folder removes it when left empty
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
        except OSError as e:
            raise output_error(path, e) from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode("ascii", "replace").strip() or "unknown"
            os.close(fd)
            raise InputError(
                f"{folder}: another qkweights run (PID {holder}) is writing into this folder; wait for it to "
                "finish, or choose another output folder"
            ) from None
        except OSError as e:  # a filesystem without locks (some network mounts)
            os.close(fd)
            raise output_error(path, e) from None
        try:  # the holder before us may have removed the file between our open and our lock: lock the new one
            if os.path.samestat(os.fstat(fd), os.stat(path)):
                break
        except FileNotFoundError:
            pass
        os.close(fd)
    os.ftruncate(fd, 0)
    os.write(fd, f"{os.getpid()}\n".encode("ascii"))
    return fd


@contextmanager
def claim_dir(path, *, inputs=()):
    """Prepare output folder ``path`` (:func:`prepare_dir`) and hold it for this run alone while the block runs.

    Refused (InputError, before anything is created) when ``path`` is, or lies inside, one
    of the ``inputs`` folders: a run reading them would read its own outputs, or have to
    leave them out. While held, the folder's ``.qkweights.lock`` holds an exclusive
    ``flock`` and this process's PID; a second claim, from another process or from this
    one, is refused with an InputError naming the holder's PID. The system releases the lock
    when its holder exits, even when killed; the file is removed at the end of the block
    (a killed holder's file stays, unlocked, and is taken over). Yields ``path`` as a Path.
    """
    path = Path(path)
    refusal = _inside(path, inputs)
    if refusal is not None:
        raise refusal
    created = not path.exists()
    fd = _lock(prepare_dir(path))
    try:
        yield path
    finally:
        (path / LOCK_NAME).unlink(missing_ok=True)  # while still locked: the next claim makes a new file
        os.close(fd)
        if created:  # a run refused before it wrote anything leaves no empty folder behind
            with contextlib.suppress(OSError):
                path.rmdir()


def holds_output(out: str, *, inputs: tuple[str, ...] = ()):
    """Decorator: each call of the function holds the output folder its parameter ``out`` names (:func:`claim_dir`),
    refused inside the folders its parameters ``inputs`` name, for as long as the call runs."""

    def decorate(fn):
        signature = inspect.signature(fn)

        @functools.wraps(fn)
        def holding(*args, **kwargs):
            given = signature.bind(*args, **kwargs).arguments
            with claim_dir(given[out], inputs=[given[name] for name in inputs]):
                return fn(*args, **kwargs)

        return holding

    return decorate


def check_file_target(path) -> Path:
    """Check that file ``path`` can be written (its folder is created); raises InputError otherwise."""
    path = Path(path)
    if path.is_dir():
        raise InputError(f"{path}: is a folder; give a file name")
    prepare_dir(path.parent)  # the file is replaced by a rename, which needs only the folder writable
    return path


@contextmanager
def atomic_path(path: str | os.PathLike):
    """Yield a temporary path beside ``path``; on success rename it to ``path``, else delete it."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp" + path.suffix, dir=path.parent)
    except OSError as e:
        raise output_error(path.parent, e, folder=True) from None
    os.close(fd)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; outputs get the usual permissions
    try:
        yield Path(tmp)
        os.replace(tmp, path)
    except BaseException as e:
        Path(tmp).unlink(missing_ok=True)
        if isinstance(e, OSError) and not isinstance(e, QkError):  # a full disk, a folder in the way, …
            raise output_error(path, e) from None
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


def dumps_json(obj, indent: int | None = 1) -> str:
    """JSON text of ``obj`` with non-finite numbers as null; ``indent=None``: one line (Python's C encoder, many
    times faster on large documents)."""
    try:  # most documents hold no NaN/inf: skip the walk that replaces them
        return json.dumps(obj, indent=indent, allow_nan=False, ensure_ascii=False) + "\n"
    except ValueError:
        return json.dumps(_finite(obj), indent=indent, allow_nan=False, ensure_ascii=False) + "\n"


def write_json(path, obj, indent: int | None = 1) -> Path:
    return write_text(path, dumps_json(obj, indent))


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
        with warnings.catch_warnings():
            # Names in scripts the default font lacks (CJK, Arabic, …) draw as boxes; one warning per glyph is noise.
            warnings.filterwarnings("ignore", message=r"Glyph \d+ .*missing from", category=UserWarning)
            fig.savefig(tmp, dpi=dpi, format="png", bbox_inches=tight, pil_kwargs={"compress_level": 1})
    plt.close(fig)
    return Path(path)


def plural(n: int, noun: str) -> str:
    """ "1 layer", "12 layers": a count with its noun, for messages and titles."""
    return f"{n} {noun}" if n == 1 else f"{n} {noun}s"


def csv_number(x: float) -> str:
    """A CSV cell: the shortest exact text of a finite float (repr), empty for NaN/inf."""
    return repr(float(x)) if np.isfinite(x) else ""


def model_name(doc: dict) -> str:
    """The name of the model a result is about: its model id, or its spec (family) name when the source has none.

    ``doc``: a result's {"source": …, "model": {"family": …}} (profile sides, O3 summaries, same-object results).
    """
    return (doc.get("source") or {}).get("model_id") or doc["model"]["family"]


def manifest_path(out_dir, command: str) -> Path:
    """The manifest of ``command``'s outputs in ``out_dir``: ``.qkweights-<command>.json``."""
    return Path(out_dir) / f".qkweights-{command}.json"


def record_outputs(out_dir, command: str, written, *, keep=()) -> list[Path]:
    """Record the files a run of ``command`` wrote into ``out_dir``, and remove its previous run's leftovers.

    ``written``: the paths this run wrote (all inside ``out_dir``). Files that the
    previous run of the same command recorded and this run did not write again are
    deleted (``keep``: names never deleted), so an output folder never mixes two runs
    (a ``modes.npz`` of another model, figures after ``--no-plots``, grids of heads no
    longer asked for). Other commands' files and files qkweights did not record are
    left alone. Call it after the run's files are written. Returns the paths removed.
    """
    out = Path(out_dir)
    names = sorted({Path(p).name for p in written})
    manifest = manifest_path(out, command)
    try:
        doc = json.loads(manifest.read_text(encoding="utf-8"))
        old = doc["files"] if isinstance(doc, dict) and isinstance(doc.get("files"), list) else []
    except (OSError, ValueError):
        old = []
    removed = []
    for name in old:
        # Only plain names inside the folder: a hand-edited manifest cannot delete anything else.
        if (
            not isinstance(name, str)
            or name in names
            or name in keep
            or Path(name).name != name
            or name in ("", ".", "..")
        ):
            continue
        stale = out / name
        if stale.is_file() and not stale.is_symlink():
            try:
                stale.unlink()
            except OSError as e:
                raise output_error(stale, e) from None
            removed.append(stale)
    write_json(manifest, {"schema": MANIFEST_SCHEMA, "command": command, "files": names})
    return removed


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
