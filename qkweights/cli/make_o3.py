"""``make-o3 DIR``: a synthetic Odd-One-Out folder in the layout of the real O3 dataset."""

from __future__ import annotations

import re

from qkweights.cli.exits import EXIT_OK
from qkweights.datasets.synthetic_o3 import make_o3
from qkweights.errors import InputError


def configure(p) -> None:
    p.add_argument("dir", metavar="DIR", help="folder to create (must not exist, or be empty)")
    p.add_argument("--n", type=int, default=40, help="number of images (default: 40)")
    p.add_argument(
        "--seed", type=int, default=0, help="random seed; image i of seed S is the same in every folder (default: 0)"
    )
    p.add_argument(
        "--size",
        default="224",
        help="image size in pixels: one number for a square, or HEIGHTxWIDTH such as 480x640 (default: 224)",
    )


def parse_size(text: str) -> tuple[int, int]:
    """ "224" → (224, 224); "480x640" → (480, 640) as (height, width)."""
    m = re.fullmatch(r"\s*(\d+)\s*(?:[x×]\s*(\d+)\s*)?", text)
    if not m:
        raise InputError(f"--size {text!r}: give one number (a square) or HEIGHTxWIDTH such as 480x640")
    h = int(m.group(1))
    return h, int(m.group(2) or h)


def run(args) -> int:
    out = make_o3(args.dir, n=args.n, seed=args.seed, size=parse_size(args.size))
    print(f"wrote {args.n} synthetic O3 images to {out}/")
    return EXIT_OK
