"""``compare A B …``: overlay layer curves of several models on the normalised layer axis."""

from __future__ import annotations

from pathlib import Path

from qkweights.cli.common import add_pickle_arguments, model_options
from qkweights.cli.exits import EXIT_OK
from qkweights.cli.progress import Terminal
from qkweights.outputs import prepare_dir
from qkweights.workflow import compare


def configure(p) -> None:
    p.add_argument(
        "items",
        metavar="MODEL_OR_JSON",
        nargs="+",
        help=(
            "checkpoints (profiled now), saved profile.json / o3_summary.json / same_object.json files, or folders "
            "holding them"
        ),
    )
    add_pickle_arguments(p)
    p.add_argument("--family", help="checkpoint family of the checkpoints given, overriding detection")
    p.add_argument("--labels", help="comma-separated legend labels, one per item")
    p.add_argument("--out", default="qkweights-out/compare", help="output folder (default: ./qkweights-out/compare)")


def run(args) -> int:
    prepare_dir(args.out)
    labels = args.labels.split(",") if args.labels else None
    with Terminal() as reporter:
        written = compare(args.items, Path(args.out), labels=labels, reporter=reporter, **model_options(args))
    print(f"wrote {', '.join(p.name for p in written)} to {args.out}/")
    return EXIT_OK
