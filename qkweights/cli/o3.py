"""``o3 MODEL O3_DIR``: attention allocation on an Odd-One-Out folder (paper Fig. 2 B–D)."""

from __future__ import annotations

import sys

from qkweights.analyses.o3 import SUMMARY_NAME
from qkweights.cli.common import (
    add_model_arguments,
    add_output_arguments,
    add_sweep_arguments,
    model_options,
    out_dir,
    sweep_settings,
)
from qkweights.cli.exits import EXIT_OK
from qkweights.cli.progress import Terminal
from qkweights.workflow import load_vision_model, o3


def configure(p) -> None:
    add_model_arguments(p)
    p.add_argument(
        "data_dir",
        metavar="O3_DIR",
        help="O3 folder holding images/, targ_images/ (or targ_labels/) and dist_images/ (or dist_labels/)",
    )
    p.add_argument("--max-images", type=int, metavar="N", help="use the first N images by name (default: all)")
    p.add_argument("--batch-size", type=int, default=16, metavar="B", help="images per forward pass (default: 16)")
    add_sweep_arguments(p)
    add_output_arguments(p, no_plots="write o3.csv and o3_summary.json only, no o3_by_layer.png")


def run(args) -> int:
    with Terminal(quiet=args.quiet) as reporter:
        model = load_vision_model(args.model, reporter=reporter, **model_options(args))
        out = out_dir(args, model.source.model_id)
        with sweep_settings(args) as settings:
            result = o3(
                model,
                args.data_dir,
                out,
                settings,
                max_images=args.max_images,
                plots=not args.no_plots,
                reporter=reporter,
            )
    summary = result.doc
    if not args.quiet:
        print(format_table(summary))
        print(f"wrote {', '.join(p.name for p in result.files)} to {out}/")
    if summary["skipped"] and not args.quiet:
        print(
            f"qkweights: skipped {len(summary['skipped'])} image(s); the reasons are under 'skipped' in "
            f"{out / SUMMARY_NAME}",
            file=sys.stderr,
        )
    return EXIT_OK


def format_table(summary: dict) -> str:
    """Per layer: mean ± s.e.m. over images of the same-object, different-object and background shares."""
    lines = [
        f"{summary['source'].get('model_id')}  {summary['images_used']} images used, {len(summary['skipped'])} skipped",
        f"{'layer':>5} {'l/(L-1)':>8} {'same object':>17} {'different object':>17} {'background':>17}",
    ]
    for e in summary["layers"]:
        cells = [f"{_num(e[k]['mean'])} ± {_num(e[k]['sem'])}" for k in ("same", "different", "background")]
        lines.append(f"{e['layer']:>5} {e['depth']:>8.3f} " + " ".join(f"{c:>17}" for c in cells))
    u = summary["uniform"]
    lines.append(
        f"uniform attention over the patches would give same = different = {u['same']:.4f}, background = "
        f"{u['background']:.4f}"
    )
    return "\n".join(lines)


def _num(x) -> str:
    return "   nan" if x is None or x != x else f"{x:.4f}"
