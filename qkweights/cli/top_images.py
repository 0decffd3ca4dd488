"""``top-images MODEL IMAGE_DIR``: the images of a folder that drive each query-key mode most (resumable)."""

from __future__ import annotations

from qkweights.cli.common import add_model_arguments, add_sweep_arguments, model_options, out_dir, parse_indices, sweep_options
from qkweights.cli.exits import EXIT_OK
from qkweights.cli.progress import Terminal
from qkweights.outputs import plural


def configure(p) -> None:
    add_model_arguments(p)
    p.add_argument("image_dir", metavar="IMAGE_DIR", help="folder of images (jpg, jpeg, png, webp; searched recursively)")
    p.add_argument("--layers", help="layers, e.g. 0-3,8 (default: all)")
    p.add_argument("--heads", help="heads, e.g. 0-3,8 (default: all)")
    p.add_argument("--modes", default="0-9", help="modes, e.g. 0-9 (default: 0-9; indices beyond the head dim are dropped)")
    p.add_argument("--top", type=int, default=8, help="images kept per layer, head, mode and sign (default: 8)")
    p.add_argument("--batch-size", type=int, default=16, help="images per forward pass (default: 16)")
    p.add_argument("--fold-ln", action="store_true", help="score the LayerNorm-folded modes of Γ W_qᵀW_k Γ on the normalised tokens (as profile --fold-ln)")
    add_sweep_arguments(p)
    p.add_argument("--out", help="output folder (default: ./qkweights-out/<model-name>/); holds the resume state while running")
    p.add_argument("--no-plots", action="store_true", help="write top_images.json only, no figures")
    p.add_argument("--quiet", action="store_true", help="print nothing but errors")


def run(args) -> int:
    from qkweights.workflow import load_model, top_images

    reporter = Terminal(quiet=args.quiet)
    model = load_model(args.model, reporter=reporter, **model_options(args))
    d = model.dims
    layers = parse_indices(args.layers, d.layers, "layers") if args.layers else None
    heads = parse_indices(args.heads, d.heads, "heads") if args.heads else None
    modes = parse_indices(args.modes, 1 << 30, "modes")
    out = out_dir(args, model.source.model_id)
    with sweep_options(args) as where, reporter:
        result = top_images(model, args.image_dir, out, reporter=reporter, layers=layers, heads=heads, modes=modes,
                            top=args.top, batch_size=args.batch_size, plots=not args.no_plots, fold_ln=args.fold_ln, **where)
    doc = result.doc
    if not args.quiet:
        opts = doc["options"]
        print(f"scored {doc['n_images']} of {plural(doc['n_files'], 'image')} ({len(doc['skipped'])} skipped) on "
              f"{plural(len(opts['layers']), 'layer')} × {plural(len(opts['heads']), 'head')} × modes {opts['modes']}")
        for s in doc["skipped"][:10]:
            print(f"  skipped {s['path']}: {s['reason']}")
        print(f"wrote {', '.join(sorted({p.name if not p.name.startswith('top_L') else 'top_L*_H*.png' for p in result.files}))} to {out}/")
    return EXIT_OK
