"""``demo [--out DIR]``: every analysis on the small trained ViT shipped with qkweights, offline."""

from __future__ import annotations

import sys
from pathlib import Path

DEFAULT_OUT = Path("qkweights-out") / "demo"


def configure(p) -> None:
    p.add_argument("--out", help=f"output folder (default: ./{DEFAULT_OUT.as_posix()}/)")
    p.add_argument("--quiet", action="store_true", help="print nothing but errors")


def run(args) -> int:
    from qkweights.demo import SUMMARY_NAME, run_demo

    out = Path(args.out) if args.out else DEFAULT_OUT
    report = None if args.quiet else (lambda text: print(f"qkweights demo: {text}", file=sys.stderr, flush=True))
    run_demo(out, progress=report)
    if not args.quiet:
        print((out / SUMMARY_NAME).read_text(encoding="utf-8"), end="")
    return 0
