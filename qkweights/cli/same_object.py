"""``same-object MODEL DATA_DIR``: do a mode's query and key directions pick the same object? (paper Fig. 6)."""

from __future__ import annotations

import sys

from qkweights.cli.common import (
    add_mode_arguments,
    add_model_arguments,
    add_output_arguments,
    add_sweep_arguments,
    chosen_modes,
    model_options,
    out_dir,
    sweep_settings,
)
from qkweights.cli.exits import EXIT_OK
from qkweights.cli.progress import Terminal


def configure(p) -> None:
    add_model_arguments(p)
    p.add_argument(
        "data_dir",
        metavar="DATA_DIR",
        help="ADE20K full release (NAME.jpg + NAME_seg.png), ADE20K SceneParsing "
        "(images/ + annotations/) or generic (images/ + instances/) folder",
    )
    add_mode_arguments(p, top=5, top_help="images selected per layer, head and mode")
    p.add_argument("--batch-size", type=int, default=16, metavar="B", help="images per forward pass (default: 16)")
    add_sweep_arguments(p)
    add_output_arguments(p, no_plots="write same_object.csv and same_object.json only, no figures")


def run(args) -> int:
    from qkweights.analyses.same_object import JSON_NAME
    from qkweights.workflow import load_vision_model, same_object

    reporter = Terminal(quiet=args.quiet)
    model = load_vision_model(args.model, reporter=reporter, **model_options(args))
    out = out_dir(args, model.source.model_id)
    with sweep_settings(args) as settings, reporter:
        result = same_object(
            model,
            args.data_dir,
            out,
            chosen_modes(args, model.dims),
            settings,
            plots=not args.no_plots,
            reporter=reporter,
        )
    if not args.quiet:
        print(format_table(result.doc))
        print(f"wrote {', '.join(p.name for p in result.files)} to {out}/")
        if result.skipped:
            print(
                f"qkweights: skipped {len(result.skipped)} image(s); the reasons are under 'skipped' in "
                f"{out / JSON_NAME}",
                file=sys.stderr,
            )
    return EXIT_OK


def format_table(doc: dict) -> str:
    """Per layer: P(same object) mean ± s.e.m. over heads, and the chance level."""
    data = doc["dataset"]
    lines = [
        (
            f"{doc['source'].get('model_id')}  {data['layout']}: {data['n_eligible']} eligible images of "
            f"{data['n_images']} "
            f"({data['n_ineligible']} with fewer than 2 objects, {data['n_unusable']} unusable); top "
            f"{doc['options']['top']} per mode"
        ),
        f"{'layer':>5} {'l/(L-1)':>8} {'P(same object)':>17} {'chance':>7}",
    ]
    for e in doc["layers"]:
        p = "nan" if e["probability"] is None else f"{e['probability']:.4f}"
        sem = "nan" if e["sem"] is None or e["sem"] != e["sem"] else f"{e['sem']:.4f}"
        lines.append(f"{e['layer']:>5} {e['depth']:>8.3f} {p + ' ± ' + sem:>17} {e['chance']:>7.4f}")
    return "\n".join(lines)
