"""``diff MODEL_A MODEL_B``: how the query-key interaction of each head changed between two checkpoints."""

from __future__ import annotations

import math
from pathlib import Path

from qkweights.cli.common import add_pickle_arguments, add_quiet, model_options
from qkweights.cli.exits import EXIT_OK
from qkweights.cli.progress import Terminal
from qkweights.cli.words import flag_words
from qkweights.outputs import prepare_dir
from qkweights.workflow import diff, save_diff

SHOWN = 10  # ranked heads printed


def configure(p) -> None:
    p.add_argument(
        "model_a",
        metavar="MODEL_A",
        help="checkpoint (Hub id, folder, .safetensors) or saved profile.json / its folder",
    )
    p.add_argument("model_b", metavar="MODEL_B", help="the same for the second model (same layers, heads and widths)")
    p.add_argument("--revision-a", help="Hub revision of MODEL_A")
    p.add_argument("--revision-b", help="Hub revision of MODEL_B")
    p.add_argument("--family", help="checkpoint family of both, overriding detection (see `python -m qkweights specs`)")
    add_pickle_arguments(p)
    p.add_argument(
        "--k",
        type=int,
        default=8,
        help="size of the top singular subspaces whose principal angles are compared (default: 8)",
    )
    p.add_argument(
        "--fold-ln",
        action="store_true",
        help="profile checkpoints LayerNorm-folded, as `profile --fold-ln` (saved profiles are read as they are)",
    )
    p.add_argument("--out", default="qkweights-out/diff", help="output folder (default: ./qkweights-out/diff)")
    p.add_argument("--no-plots", action="store_true", help="skip the PNG figures")
    add_quiet(p)


def run(args) -> int:
    prepare_dir(args.out)
    with Terminal(quiet=args.quiet) as reporter:
        result = diff(
            args.model_a,
            args.model_b,
            k=args.k,
            fold_ln=args.fold_ln,
            reporter=reporter,
            options_a=model_options(args, args.revision_a),
            options_b=model_options(args, args.revision_b),
        )
    written = save_diff(result, Path(args.out), plots=not args.no_plots)
    if not args.quiet:
        print(format_ranking(result.head_rows()[:SHOWN]))
        for note in result.notes:
            print(f"note: {flag_words(note)}")
        print(f"wrote {', '.join(p.name for p in written)} to {args.out}/")
    return EXIT_OK


def format_ranking(rows: list[dict]) -> str:
    """The most-changed heads: rank, L H, Δ weighted cosine, spectrum TV, largest angles (° or "-"), score."""
    lines = [f"{'rank':>4} {'head':>7} {'Δ wcos':>8} {'spec TV':>8} {'∠u max':>7} {'∠v max':>7} {'score':>7}"]
    for r in rows:
        # "-": no singular vectors; "n/a": undefined, the head is collapsed or non-finite in A or B (see the notes)
        cell = {
            k: f"{r[k]:{sign}{width}.{digits}f}"
            if r[k] is not None and math.isfinite(r[k])
            else f"{'-' if r[k] is None else 'n/a':>{width}}"
            for k, sign, width, digits in (
                ("delta_weighted_cosine", "+", 8, 4),
                ("spectrum_tv", "", 8, 4),
                ("max_angle_u_deg", "", 7, 1),
                ("max_angle_v_deg", "", 7, 1),
                ("score", "", 7, 4),
            )
        }
        lines.append(
            f"{r['rank']:>4} {'L%d H%d' % (r['layer'], r['head']):>7} {cell['delta_weighted_cosine']} "
            f"{cell['spectrum_tv']} {cell['max_angle_u_deg']} {cell['max_angle_v_deg']} {cell['score']}"
        )
    return "\n".join(lines)
