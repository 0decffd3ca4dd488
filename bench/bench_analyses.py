"""Benchmark of the O3 analysis's overhead over the forward pass (``bench_o3``); the sweeps' throughput,
executors, memory and figures are measured by ``bench_sweep.py``.

Run from the repository root:  python bench/bench_analyses.py [o3] [--reps N]
(no name runs every ``bench_*`` function of this file). Checkpoints and synthetic datasets are
written once into ``bench/out/`` (git-ignored) and reused; the ViT-B-shaped random hf-vit
checkpoint is the one bench_profile.py writes (``make_vit``), shared here.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from threadpoolctl import threadpool_info

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench_profile import make_vit  # noqa: E402

OUT = ROOT / "bench" / "out"
TINY_VIT = ROOT / "tests" / "fixtures" / "models" / "vit"


def vit_b_random() -> Path:
    """The ViT-B/16-shaped random hf-vit checkpoint (D 768, 12 layers × 12 heads, 224², F32) in bench/out/."""
    return make_vit(OUT / "vit-b-random", 768, 12, 12)


def synthetic_o3(n: int, size: int, seed: int = 0) -> Path:
    """A synthetic O3 folder of ``n`` square images of ``size`` pixels in bench/out/ (written once)."""
    from qkweights.datasets.synthetic_o3 import make_o3

    folder = OUT / f"o3-synth-{size}-n{n}-s{seed}"
    return folder if folder.is_dir() else make_o3(folder, n=n, seed=seed, size=(size, size))


def bench_o3(args) -> None:
    """images/s of ``o3`` against the forward pass alone (attentions=True) on the same batches.

    Per model: every image is prepared once (preprocessing + masks, timed separately), then
    ``--reps`` rounds alternate (a) the forward passes alone over the same batches of
    ``--batch`` images and (b) ``run_o3`` end to end into a fresh folder. Fixed costs
    of a run are timed once on their own and left out of the rounds: the figure, and the
    sha256 of the weight files that the resume fingerprint needs (cached on the model).
    Overhead = median(o3) / median(forward) − 1.
    """
    from qkweights.analyses.o3 import SUMMARY_NAME, prepare, run_o3, select_items
    from qkweights.analyses.runner import SweepSettings
    from qkweights.figures.o3 import FIGURE_NAME, o3_figure
    from qkweights.vision.model import open_vision_model

    data = synthetic_o3(args.o3_images, args.o3_size)
    print(
        f"o3: {args.o3_images} synthetic images of {args.o3_size}×{args.o3_size} px (JPEG), batch {args.batch}, "
        f"{args.reps} rounds; median (best) over rounds"
    )
    for label, folder in (
        ("tiny vit fixture (D 32, 2 layers × 4 heads, 32², T 17)", TINY_VIT),
        ("ViT-B/16 random (D 768, 12 layers × 12 heads, 224², T 197)", vit_b_random()),
    ):
        model = open_vision_model(str(folder))
        t0 = time.perf_counter()
        model.source.to_json()  # sha256 of the weight files for the resume fingerprint: once per run, cached
        t_digest = time.perf_counter() - t0
        items, _, _ = select_items(data, None)
        t0 = time.perf_counter()
        prepared = [prepare(model, item) for item in items]
        t_prepare = time.perf_counter() - t0
        batches = [
            np.stack([p.pixels for p in prepared[i : i + args.batch]]) for i in range(0, len(prepared), args.batch)
        ]
        forward, o3 = [], []
        with tempfile.TemporaryDirectory() as tmp:
            for r in range(args.reps):
                t0 = time.perf_counter()
                for x in batches:
                    model.forward(x, attentions=True)
                forward.append(time.perf_counter() - t0)
                t0 = time.perf_counter()
                run_o3(model, data, Path(tmp) / f"run{r}", SweepSettings(batch_size=args.batch))
                o3.append(time.perf_counter() - t0)
            summary = Path(tmp) / "run0" / SUMMARY_NAME
            t0 = time.perf_counter()
            o3_figure(json.loads(summary.read_text()), Path(tmp) / FIGURE_NAME)
            t_figure = time.perf_counter() - t0
        n = len(items)
        f_med, o_med = statistics.median(forward), statistics.median(o3)
        print(f"  {label}")
        print(
            f"    forward alone : {n / f_med:8.2f} images/s ({n / min(forward):.2f})   {f_med / n * 1e3:9.1f} ms/image"
        )
        print(f"    o3 end to end : {n / o_med:8.2f} images/s ({n / min(o3):.2f})   {o_med / n * 1e3:9.1f} ms/image")
        print(
            f"    overhead      : {o_med / f_med - 1:+8.1%} of the forward time (best/best "
            f"{min(o3) / min(forward) - 1:+.1%}); "
            f"of it, preparing images and masks {t_prepare / n * 1e3:.1f} ms/image"
        )
        print(
            f"    once per run  : figure {t_figure:.2f} s, weight digest for the fingerprint {t_digest:.2f} s "
            "(not in the rounds)"
        )


def main() -> None:
    benches = {
        name[len("bench_") :].replace("_", "-"): fn
        for name, fn in globals().items()
        if name.startswith("bench_") and callable(fn)
    }
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "names", nargs="*", metavar="NAME", help=f"benchmarks to run: {', '.join(sorted(benches))} (default: all)"
    )
    parser.add_argument("--reps", type=int, default=3, help="timed rounds per measurement (default: 3)")
    parser.add_argument("--batch", type=int, default=8, help="images per forward pass (default: 8)")
    parser.add_argument("--o3-images", type=int, default=16, help="images in the synthetic O3 set (default: 16)")
    parser.add_argument(
        "--o3-size",
        type=int,
        default=1024,
        help="side of the synthetic O3 images, px (default: 1024, as the public O3 example)",
    )
    args = parser.parse_args()
    unknown = [n for n in args.names if n not in benches]
    if unknown:
        parser.error(f"unknown benchmark {unknown[0]!r}; choose from {', '.join(sorted(benches))}")
    blas = [(i["internal_api"], i.get("version"), i["num_threads"]) for i in threadpool_info()]
    print(f"machine: {os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f}; BLAS {blas}")
    for name in args.names or sorted(benches):
        benches[name](args)


if __name__ == "__main__":
    main()
