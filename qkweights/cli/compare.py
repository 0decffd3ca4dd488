"""``compare A B …``: overlay layer curves of several models on the normalised layer axis."""

from __future__ import annotations

from pathlib import Path

from qkweights.cli.common import add_pickle_arguments, model_options
from qkweights.outputs import prepare_dir


def configure(p) -> None:
    p.add_argument("items", metavar="MODEL_OR_JSON", nargs="+", help="checkpoints (profiled now), saved profile.json / o3_summary.json / same_object.json files, or folders holding them")
    add_pickle_arguments(p)
    p.add_argument("--family", help="checkpoint family of the checkpoints given, overriding detection")
    p.add_argument("--labels", help="comma-separated legend labels, one per item")
    p.add_argument("--out", default="qkweights-out/compare", help="output folder (default: ./qkweights-out/compare)")


def run(args) -> int:
    import qkweights
    from qkweights.compare import INPUT_FILES, compare

    prepare_dir(args.out)
    items = []
    for item in args.items:
        path = Path(item)
        if path.suffix == ".json" or (path.is_dir() and any((path / name).exists() for name in INPUT_FILES)):
            items.append(path)
        else:
            items.append(qkweights.profile(item, **model_options(args)))
    labels = args.labels.split(",") if args.labels else None
    written = compare(items, Path(args.out), labels=labels)
    print(f"wrote {', '.join(p.name for p in written)} to {args.out}/")
    return 0
