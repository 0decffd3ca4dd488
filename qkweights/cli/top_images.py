"""``top-images MODEL IMAGE_DIR``: the images of a folder that drive each query-key mode most (resumable)."""

from __future__ import annotations

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
from qkweights.outputs import plural


def configure(p) -> None:
    add_model_arguments(p)
    p.add_argument(
        "data_dir", metavar="IMAGE_DIR", help="folder of images (jpg, jpeg, png, webp; searched recursively)"
    )
    add_mode_arguments(p, top=8, top_help="images kept per layer, head, mode and sign")
    p.add_argument("--batch-size", type=int, default=16, help="images per forward pass (default: 16)")
    p.add_argument(
        "--fold-ln",
        action="store_true",
        help="score the LayerNorm-folded modes of Γ W_qᵀW_k Γ on the normalised tokens (as profile --fold-ln)",
    )
    add_sweep_arguments(p)
    add_output_arguments(p, no_plots="write top_images.json and top_images_maps.npz only, no figures")


def run(args) -> int:
    from qkweights.workflow import load_vision_model, top_images

    reporter = Terminal(quiet=args.quiet)
    model = load_vision_model(args.model, reporter=reporter, **model_options(args))
    out = out_dir(args, model.source.model_id)
    with sweep_settings(args) as settings, reporter:
        result = top_images(
            model,
            args.data_dir,
            out,
            chosen_modes(args, model.dims),
            settings,
            fold_ln=args.fold_ln,
            plots=not args.no_plots,
            reporter=reporter,
        )
    doc = result.doc
    if not args.quiet:
        opts = doc["options"]
        print(
            f"scored {doc['n_images']} of {plural(doc['n_files'], 'image')} ({len(doc['skipped'])} skipped) on "
            f"{plural(len(opts['layers']), 'layer')} × {plural(len(opts['heads']), 'head')} × modes {opts['modes']}"
        )
        for s in doc["skipped"][:10]:
            print(f"  skipped {s['path']}: {s['reason']}")
        names = sorted({"top_L*_H*.png" if p.name.startswith("top_L") else p.name for p in result.files})
        print(f"wrote {', '.join(names)} to {out}/")
    return EXIT_OK
