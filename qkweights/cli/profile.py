"""``profile MODEL``: per-head query-key SVD, a per-layer table, and the output files."""

from __future__ import annotations

import sys

import numpy as np

from qkweights.cli.common import add_model_arguments, add_quiet, model_options, out_dir
from qkweights.cli.exits import EXIT_FINDINGS, EXIT_OK
from qkweights.cli.progress import Terminal
from qkweights.outputs import plural, prepare_dir
from qkweights.weights.profile import Profile
from qkweights.workflow import open_checkpoint, profile_checkpoint, save_profile


def configure(p) -> None:
    add_model_arguments(p, optional=True)
    p.add_argument("--out", help="output folder (default: ./qkweights-out/<model-name>-<hash>/)")
    p.add_argument("--json", action="store_true", help="print profile.json to stdout instead of the table")
    p.add_argument("--no-plots", action="store_true", help="skip the PNG figures")
    p.add_argument("--save-vectors", action="store_true", help="also write modes.npz with U, V [L,H,D,K] and S")
    p.add_argument(
        "--fold-ln",
        action="store_true",
        help="profile the LayerNorm-folded Γ W_qᵀW_k Γ (the interaction of the normalised tokens) and each head's "
        "key-salience norm ‖Γ W_kᵀ(W_q β + b_q)‖; also draws fold_cosine_by_layer.png against the plain profile",
    )
    add_quiet(p)


def run(args) -> int:
    with Terminal(quiet=args.quiet) as reporter:
        source, ck = open_checkpoint(args.model, reporter=reporter, **model_options(args))
        out = prepare_dir(out_dir(args, source.model_id))
        prof = profile_checkpoint(
            source,
            ck,
            save_vectors=args.save_vectors,
            fold_ln=args.fold_ln,
            reporter=reporter,
            warm_figures=not args.no_plots,
        )
    written = save_profile(prof, out, plots=not args.no_plots, checkpoint=ck)
    if args.json:
        sys.stdout.write(prof.json_text())
    elif not args.quiet:
        print(format_table(prof))
        print(f"wrote {', '.join(p.name for p in written)} to {out}/")
    if prof.nonfinite:
        where = ", ".join(f"L{l} H{h}" for l, h in prof.nonfinite)
        print(f"qkweights: non-finite weights in {len(prof.nonfinite)} head(s): {where}", file=sys.stderr)
        return EXIT_FINDINGS
    return EXIT_OK


def format_table(prof: Profile) -> str:
    """The per-layer table: weighted cosine (mean over heads) with the head range, and the null band."""
    m = prof.model
    stats = prof.layer_stats()
    lines = [
        f"{prof.source.get('model_id', '?')}  family {m.family}  {plural(m.layers, 'layer')} × "
        f"{plural(m.heads, 'head')}  width {m.hidden}  head dim {m.head_dim}  {m.dtype}",
        f"{'layer':>5} {'l/(L-1)':>8} {'weighted cos':>13} {'head min':>9} {'head max':>9} {'mean cos':>9}",
    ]
    for l in range(m.layers):
        lines.append(
            f"{l:>5} {prof.depth[l]:>8.3f} {stats['weighted_cosine'][l]:>13.4f} {stats['min'][l]:>9.4f} "
            f"{stats['max'][l]:>9.4f} {stats['mean_cosine'][l]:>9.4f}"
        )
    lines.append(f"null band (95%, random unit vectors in R^{m.hidden}): ±{prof.null_band_95:.4f}")
    lines += _circuit_lines(prof)
    n_deg = sum(len(b) for row in prof.degenerate for b in row)
    if n_deg:
        lines.append(
            f"{n_deg} degenerate σ block(s): individual cosines inside them are not meaningful (see "
            "degenerate_blocks in profile.json)"
        )
    if not np.isfinite(prof.weighted).all():
        lines.append("some heads have no statistics (non-finite weights or Σσ = 0)")
    return "\n".join(lines)


def _circuit_lines(prof: Profile) -> list[str]:
    """Per-layer means of the statistics beyond the paper, and what the fold includes or why the OV circuit is
    absent."""
    extra = prof.circuit_layer_stats()
    m = prof.model
    if not extra:
        return []
    cols = [("symmetric_fraction", "sym frac"), ("ov_weighted_cosine", "OV cos"), ("salience_norm", "‖w_h‖")]
    cols = [(k, t) for k, t in cols if k in extra]
    lines = [f"{'layer':>5} " + " ".join(f"{t:>9}" for _, t in cols) + "   (means over heads)"]
    for l in range(m.layers):
        lines.append(f"{l:>5} " + " ".join(f"{extra[k][l]:>9.4f}" for k, _ in cols))
    if m.ov is not None and not m.ov.get("available", True):
        lines.append(m.ov["note"])
    if m.folded:
        lines.append("--fold-ln folds: " + "; ".join(m.fold["includes"]))
        lines += [f"note: {n}" for n in m.fold["notes"]]
    return lines
