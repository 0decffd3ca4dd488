"""``demo [--out DIR]``: every analysis on the small trained ViT shipped with qkweights, offline."""

from __future__ import annotations

from pathlib import Path

from qkweights.cli.common import add_quiet
from qkweights.cli.exits import EXIT_OK
from qkweights.cli.progress import Terminal

DEFAULT_OUT = Path("qkweights-out") / "demo"


def configure(p) -> None:
    p.add_argument("--out", help=f"output folder (default: ./{DEFAULT_OUT.as_posix()}/)")
    add_quiet(p)


def run(args) -> int:
    from qkweights.demo import SUMMARY_NAME, run_demo

    out = Path(args.out) if args.out else DEFAULT_OUT
    run_demo(out, progress=Terminal(quiet=args.quiet, name="qkweights demo").stage)
    if not args.quiet:
        print((out / SUMMARY_NAME).read_text(encoding="utf-8"), end="")
    return EXIT_OK
