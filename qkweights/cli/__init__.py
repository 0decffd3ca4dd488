"""Command line: ``python -m qkweights COMMAND …``.

Each command is a module of this package with ``configure(parser)`` and
``run(args) -> int``; this module parses arguments, dispatches, and is the one
place where errors become messages (options worded as flags, :mod:`qkweights.cli.words`)
and exit codes (:mod:`qkweights.cli.exits`): 0 ok, 1 findings (e.g. non-finite weights,
a failed check), 2 usage or input error, 130 interrupted (Ctrl-C), 141 stdout closed before the command
finished writing (a finished command keeps its own code: a closed pipe never turns a failure into 0), 143
terminated (SIGTERM, handled as Ctrl-C).
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import importlib
import os
import signal
import sys
import threading
import traceback

from qkweights.cli.exits import EXIT_BROKEN_PIPE, EXIT_INTERRUPTED, EXIT_TERMINATED, EXIT_USAGE
from qkweights.cli.words import flag_words
from qkweights.errors import QkError
from qkweights.version import __version__

COMMANDS = [
    ("profile", "per-head query-key SVD of a checkpoint: table, profile.json, heads.csv, figures"),
    ("compare", "overlay the layer curves of several models (checkpoints or saved profile.json / o3_summary.json)"),
    ("inspect", "family, dimensions, dtype, tensors used and file sizes (reads headers only)"),
    ("specs", "the checkpoint families qkweights knows, with an example id each"),
    (
        "check",
        "compare a checkpoint with a saved profile.json within tolerances; exit 1 on drift (CI gate, "
        "JSON/JUnit reports)",
    ),
    (
        "diff",
        "how each head's query-key interaction changed between two checkpoints: ranked heads, heatmaps, diff.json",
    ),
    ("maps", "query and key projection maps of one image on one head's modes (red/cyan figure and npz)"),
    (
        "top-images",
        "the images of a folder that drive each query-key mode most (resumable), and the anisotropy control",
    ),
    ("o3", "attention allocation on an Odd-One-Out folder: same object / different object / background per layer"),
    (
        "same-object",
        "do a mode's query and key directions pick the same object in its top images? (ADE20K or instance "
        "maps; Fig. 6)",
    ),
    ("make-o3", "write a synthetic Odd-One-Out folder in the layout of the real O3 dataset"),
    ("report", "the atlas: one static site to browse every head, mode, top image and map of saved results"),
    ("demo", "offline demo on the small trained ViT shipped with qkweights: profile, maps, top images, O3"),
]
RESUMABLE = {"top-images", "o3", "same-object"}  # commands that continue where an interrupted run stopped


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The parser; only ``command``'s module is imported and configured (all of them when None), so startup stays
    fast."""
    parser = argparse.ArgumentParser(
        prog="python -m qkweights",
        description="What the attention heads of a Vision Transformer do, read from their query-key weights.",
    )
    parser.add_argument("--version", action="version", version=f"qkweights {__version__}")
    parser.add_argument("--debug", action="store_true", help="show tracebacks on errors")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, help_text in COMMANDS:
        p = sub.add_parser(name, help=help_text, description=help_text)
        if command is None or name == command:
            module = importlib.import_module(f"qkweights.cli.{name.replace('-', '_')}")
            p.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="show tracebacks on errors")
            module.configure(p)
            p.set_defaults(run=module.run)
    return parser


def _command(argv: list[str]) -> str | None:
    """The command named on the command line, if it is a known one."""
    first = next((a for a in argv if not a.startswith("-")), None)
    return first if first in {name for name, _ in COMMANDS} else None


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised where the command is, so that it stops as on Ctrl-C (state kept, workers stopped)."""


def _terminated(signum, frame):
    raise Terminated


@contextlib.contextmanager
def _sigterm_as_interrupt():
    """SIGTERM raises :class:`Terminated` inside the block (main thread only; elsewhere signals cannot be caught)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, _terminated)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def main(argv: list[str] | None = None) -> int:
    """Run the command line; returns the exit code."""
    argv = sys.argv[1:] if argv is None else argv
    parser = build_parser(_command(argv))
    args = parser.parse_args(argv)
    os.environ.setdefault("MPLBACKEND", "Agg")
    _reuse_freed_memory()
    with _sigterm_as_interrupt():
        return _run(args)


def entry() -> None:
    """The process's entry point (``python -m qkweights``, the ``qkweights`` script): :func:`main`, then exit with
    its code. An interrupted command (130, 143) has saved its state and stopped its workers; it then exits at once,
    its output flushed: a signal raised as an exception can leave a lock held that a stopped worker pool's thread
    waits for, and the interpreter would wait for that thread at exit."""
    code = main()
    if code in (EXIT_INTERRUPTED, EXIT_TERMINATED):
        for stream in (sys.stdout, sys.stderr):
            with contextlib.suppress(OSError, ValueError):
                stream.flush()
        os._exit(code)
    raise SystemExit(code)


def _reuse_freed_memory() -> None:
    """With glibc: serve arrays up to 32 MB from the heap and keep what is freed for the next ones (``mallopt``),
    rather than map fresh pages for every batch's arrays and unmap them when freed. First touches of memory are
    slow on virtual machines: top-images over 160 images ran in 34.9–35.9 s instead of 37.8–38.4 s (ViT-B, 2 cores),
    and the peak RSS of o3 stayed the same. What the command frees stays with it until it exits. Elsewhere (macOS,
    musl) nothing is changed. The command line sets it, for its own process; the library never does."""
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return
    m_trim_threshold, m_mmap_threshold = -1, -3  # malloc.h
    libc.mallopt(m_mmap_threshold, 32 << 20)  # glibc's largest (on 64-bit)
    libc.mallopt(m_trim_threshold, 1 << 30)


def _run(args) -> int:
    code = EXIT_BROKEN_PIPE
    try:
        code = args.run(args)
        sys.stdout.flush()  # a reader that left (`… | head`) shows here, not at exit
        return code
    except QkError as e:
        if args.debug:
            traceback.print_exc()
        print(f"qkweights: error: {flag_words(str(e))}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt as e:
        resume = "; re-run the same command to resume where it stopped" if args.command in RESUMABLE else ""
        how = "terminated" if isinstance(e, Terminated) else "interrupted"
        print(f"qkweights: {how}{resume}", file=sys.stderr)
        return EXIT_TERMINATED if isinstance(e, Terminated) else EXIT_INTERRUPTED
    except BrokenPipeError:  # the command's own code if it finished, else 141
        with contextlib.suppress(OSError, ValueError):  # no second failure when Python flushes stdout at exit
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return code
    except Exception as e:
        if args.debug:
            raise
        print(
            f"qkweights: internal error: {type(e).__name__}: {e} (re-run with --debug for the traceback, and "
            "please report it)",
            file=sys.stderr,
        )
        return EXIT_USAGE
