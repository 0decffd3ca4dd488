"""``maps MODEL IMAGE --layer L --head H``: query and key projection maps of one image on one head's modes."""

from __future__ import annotations

from qkweights.cli.common import (
    add_model_arguments,
    model_options,
    out_dir,
    parse_indices,
)
from qkweights.cli.exits import EXIT_OK
from qkweights.cli.progress import Terminal
from qkweights.outputs import prepare_dir


def configure(p) -> None:
    add_model_arguments(p)
    p.add_argument("image", metavar="IMAGE", help="image file (jpg, png, webp, …)")
    p.add_argument("--layer", type=int, required=True, help="layer index (0-based)")
    p.add_argument("--head", type=int, required=True, help="head index (0-based)")
    which = p.add_mutually_exclusive_group()
    which.add_argument("--modes", help="modes to draw, e.g. 0-5 or 0,3,7 (default: 0-5)")
    which.add_argument(
        "--top",
        type=int,
        help=(
            "draw the TOP modes of largest |c_n|, c_n = the mode's contribution to this image's attention logits in "
            "the head (paper Fig. 5)"
        ),
    )
    p.add_argument(
        "--embedding",
        choices=("ln", "residual"),
        default="ln",
        help=(
            "x projected: ln = the LayerNorm output feeding W_q/W_k (default, exact logit decomposition); residual = "
            "the residual stream entering the block (the paper's public code)"
        ),
    )
    p.add_argument(
        "--fold-ln",
        action="store_true",
        help=(
            "use the LayerNorm-folded modes of Γ W_qᵀW_k Γ on the normalised tokens n (exact with the biases' "
            "key-salience term, printed too)"
        ),
    )
    p.add_argument("--out", help="output folder (default: ./qkweights-out/<model-name>-<hash>/)")


def run(args) -> int:
    from qkweights.analyses.maps import SIGN_CHARS, projection_maps
    from qkweights.workflow import load_vision_model, save_maps

    model = load_vision_model(args.model, reporter=Terminal(), **model_options(args))
    prepare_dir(out_dir(args, model.source.model_id))
    modes = parse_indices(args.modes, model.dims.head_dim, "modes") if args.modes else None
    maps = projection_maps(
        model,
        args.image,
        layer=args.layer,
        head=args.head,
        modes=modes,
        top=args.top,
        embedding=args.embedding,
        fold_ln=args.fold_ln,
    )
    out = out_dir(args, model.source.model_id)
    written = save_maps(maps, out)
    print(f"layer {maps.layer} head {maps.head}, x = {maps.embedding}")
    print(f"{'mode':>4} {'sign':>4} {'sigma':>10} {'cos':>8} {'c_n':>10}")
    for i, n in enumerate(maps.modes):
        print(
            f"{int(n):>4} {SIGN_CHARS[int(maps.signs[i])]:>4} {maps.singular_values[i]:>10.4g} "
            f"{maps.cosines[i]:>+8.4f} {maps.contributions[i]:>+10.4g}"
        )
    if maps.salience_contribution is not None:
        print(f"key-salience term Σ_ij a_ij w_h·n_j / √K: {maps.salience_contribution:+.4g}")
    print(f"wrote {', '.join(p.name for p in written)} to {out}/")
    return EXIT_OK
