"""``report DIR… --out SITE``: one static site (the atlas) to browse every head of the results in DIR…"""

from __future__ import annotations

import warnings

from qkweights.cli.exits import EXIT_OK
from qkweights.errors import QkWarning


def configure(p) -> None:
    p.add_argument("dirs", metavar="DIR", nargs="+", help="output folders of qkweights commands, or folders of them")
    p.add_argument(
        "--out", required=True, help="the site's folder (SITE/index.html); a previous site there is replaced"
    )
    p.add_argument("--top", type=int, default=8, help="top images shown per mode and sign (default 8)")
    p.add_argument("--thumb-px", type=int, default=96, help="thumbnail width in pixels (default 96)")
    p.add_argument("--max-mb", type=float, default=50.0, help="refuse to write a site larger than this (default 50)")
    p.add_argument(
        "--no-thumbs", action="store_true", help="leave the source images out (maps only), for data not to redistribute"
    )


def run(args) -> int:
    from qkweights.atlas import report

    with warnings.catch_warnings(record=True) as notes:
        warnings.simplefilter("always", QkWarning)
        files = report(
            args.dirs, args.out, thumb_px=args.thumb_px, top=args.top, max_mb=args.max_mb, thumbs=not args.no_thumbs
        )
    for w in notes:
        print(f"qkweights report: {w.message}")
    size = sum(f.stat().st_size for f in files)
    print(f"wrote {len(files)} files ({size / 1e6:.1f} MB) to {args.out}/; open {args.out}/index.html")
    return EXIT_OK
