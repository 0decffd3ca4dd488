"""Arguments and helpers shared by several commands."""

from __future__ import annotations

import argparse
import hashlib
import re
import sys
from contextlib import contextmanager
from pathlib import Path

from qkweights.cli.words import flag_words
from qkweights.errors import InputError
from qkweights.outputs import plural

DEFAULT_MODEL = "google/vit-base-patch16-224"


def add_model_arguments(p: argparse.ArgumentParser, *, optional: bool = False) -> None:
    """MODEL, --revision, --family, --part, --allow-pickle and --spec-dir, as every command that reads a checkpoint
    takes them."""
    if optional:
        p.add_argument(
            "model",
            metavar="MODEL",
            nargs="?",
            default=DEFAULT_MODEL,
            help=f"Hub repo id, local folder, .safetensors or PyTorch file (default: {DEFAULT_MODEL})",
        )
    else:
        p.add_argument(
            "model", metavar="MODEL", help="Hub repo id (org/name), local folder, .safetensors or PyTorch file"
        )
    p.add_argument(
        "--revision", help="Hub branch, tag or commit sha (default: main, or its safetensors conversion branch)"
    )
    p.add_argument("--family", help="checkpoint family, overriding detection (see `python -m qkweights specs`)")
    add_pickle_arguments(p)


def add_pickle_arguments(p: argparse.ArgumentParser) -> None:
    """--part and --allow-pickle, for PyTorch checkpoints, and --spec-dir (every command that opens a model takes
    these)."""
    p.add_argument(
        "--part",
        help=(
            "the network to read from a PyTorch training checkpoint holding several (I-JEPA: encoder (default), "
            "target_encoder, predictor)"
        ),
    )
    p.add_argument(
        "--allow-pickle",
        action="store_true",
        help="let a Hub repo without safetensors fall back to its pytorch_model.bin (read without running code)",
    )
    add_spec_dir_argument(p)


def add_spec_dir_argument(p: argparse.ArgumentParser) -> None:
    """--spec-dir DIR (repeatable): folders of user spec files."""
    p.add_argument(
        "--spec-dir",
        action="append",
        metavar="DIR",
        help="a folder of spec files (.toml) for more checkpoint families; repeatable, earlier folders win, "
        "all of them over QKWEIGHTS_SPEC_PATH and the shipped specs",
    )


def model_options(args, revision: str | None = None) -> dict:
    """The keyword options of qkweights.specs.load.open_model given on the command line."""
    return {
        "revision": revision if revision is not None else getattr(args, "revision", None),
        "family": args.family,
        "part": args.part,
        "allow_pickle": args.allow_pickle,
        "spec_dir": args.spec_dir,
    }


def model_slug(model_id: str, revision: str | None = None, part: str | None = None) -> str:
    """A folder name of its own for a model: ``<name>-<hash>``.

    ``name``: the repo name, or the folder/file stem of a path (Unicode letters kept);
    ``hash``: 6 hex digits of the sha256 of what picks the weights: the absolute path of a
    local model (or its repo id), the revision and the part; so ``run1/final`` and
    ``run2/final`` (or ``a b`` and ``a_b``) never share a folder, and one model has one.
    """
    name = Path(model_id.rstrip("/")).name
    name = name[: -len(".safetensors")] if name.endswith(".safetensors") else name
    slug = re.sub(r"[^\w.-]+", "_", name).strip("._") or "model"  # \w: letters and digits of every script
    local = Path(model_id).expanduser()
    where = str(local.resolve()) if local.exists() else model_id
    key = "\0".join((where, revision or "", part or ""))
    return f"{slug}-{hashlib.sha256(key.encode('utf-8')).hexdigest()[:6]}"


def print_notes(notes) -> None:
    """The library's notes for the user, one ``qkweights: note:`` line each on stderr."""
    for note in notes:
        print(f"qkweights: note: {flag_words(note)}", file=sys.stderr)


def out_dir(args, model_id: str) -> Path:
    """--out, else ``./qkweights-out/<name>-<hash>/`` (:func:`model_slug`) for the model opened from ``model_id``."""
    if args.out:
        return Path(args.out)
    return Path("qkweights-out") / model_slug(model_id, getattr(args, "revision", None), getattr(args, "part", None))


def parse_indices(text: str, limit: int, what: str) -> list[int]:
    """Parse "0-3,8" into [0, 1, 2, 3, 8]; each index must be < limit."""
    out: list[int] = []
    for part in text.split(","):
        part = part.strip()
        m = re.fullmatch(r"(\d+)(?:-(\d+))?", part)
        if not m:
            raise InputError(f"--{what} {text!r}: expected a list of indices and ranges such as 0-3,8")
        lo, hi = int(m.group(1)), int(m.group(2) or m.group(1))
        if hi < lo:
            raise InputError(f"--{what} {text!r}: range {part} runs backwards; write {hi}-{lo}")
        if hi >= limit:
            whose = "a head has" if what == "modes" else "the model has"
            raise InputError(
                f"--{what} {text!r}: {what.rstrip('s')} {hi} is out of range: {whose} "
                f"{plural(limit, what.rstrip('s'))} (0–{limit - 1})"
            )
        out += [i for i in range(lo, hi + 1) if i not in out]
    return out


def add_mode_arguments(p: argparse.ArgumentParser, *, top: int, top_help: str) -> None:
    """--layers, --heads, --modes, --top: which modes an image analysis scans, and how many images it keeps."""
    p.add_argument("--layers", help="layers, e.g. 0-3,8 (default: all)")
    p.add_argument("--heads", help="heads, e.g. 0-3,8 (default: all)")
    p.add_argument(
        "--modes", default="0-9", help="modes, e.g. 0-9 (default: 0-9; indices beyond the head dim are dropped)"
    )
    p.add_argument("--top", type=int, default=top, help=f"{top_help} (default: {top})")


def chosen_modes(args, dims):
    """The :class:`~qkweights.analyses.sweep.ModeSelection` of --layers, --heads, --modes and --top."""
    from qkweights.analyses.sweep import ModeSelection

    return ModeSelection(
        parse_indices(args.layers, dims.layers, "layers") if args.layers else None,
        parse_indices(args.heads, dims.heads, "heads") if args.heads else None,
        parse_indices(args.modes, 1 << 30, "modes"),
        args.top,
    )


def add_output_arguments(p: argparse.ArgumentParser, *, no_plots: str) -> None:
    """--out, --no-plots (``no_plots``: what is written without figures) and --quiet."""
    p.add_argument(
        "--out",
        help="output folder, outside the input folder (default: ./qkweights-out/<model-name>-<hash>/); holds the "
        "resume state while running, and one run at a time",
    )
    p.add_argument("--no-plots", action="store_true", help=no_plots)
    add_quiet(p)


def add_quiet(p: argparse.ArgumentParser) -> None:
    """--quiet: no progress and no summary; errors and ``qkweights: note:`` lines are printed even so."""
    p.add_argument("--quiet", action="store_true", help="print only errors and notes (no progress bars, no summary)")


def add_sweep_arguments(p: argparse.ArgumentParser) -> None:
    """Where the image analyses run: --workers, --scheduler, --scheduler-file, --shard-size."""
    g = p.add_argument_group("where it runs (results are the same whichever is chosen)")
    where = g.add_mutually_exclusive_group()
    where.add_argument(
        "--workers",
        type=int,
        metavar="N",
        help="run shards on N local worker processes, one BLAS thread each (default: in this process)",
    )
    where.add_argument(
        "--scheduler",
        metavar="ADDRESS",
        help='run shards on an existing Dask cluster, e.g. tcp://10.0.0.5:8786 (needs pip install "qkweights[dask]")',
    )
    where.add_argument(
        "--scheduler-file",
        metavar="PATH",
        help="the same, with the scheduler file `dask scheduler --scheduler-file` wrote",
    )
    g.add_argument(
        "--shard-size",
        type=int,
        metavar="S",
        help="images per shard: the unit of work, of resume and of progress (default: about 4 shards per worker, "
        "at most 64 images)",
    )


@contextmanager
def sweep_settings(args):
    """The :class:`~qkweights.analyses.runner.SweepSettings` of --batch-size, --shard-size, --workers, --scheduler
    and --scheduler-file; a Dask client is closed at the end."""
    from qkweights.analyses.executors import dask_client
    from qkweights.analyses.runner import SweepSettings

    if args.workers is not None and args.workers < 1:
        raise InputError(f"--workers {args.workers}: give 1 or more worker processes")
    client = None
    if args.scheduler or args.scheduler_file:
        client = dask_client(args.scheduler, args.scheduler_file)
    try:
        yield SweepSettings(args.batch_size, args.shard_size, args.workers, client)
    finally:
        if client is not None:
            client.close()
