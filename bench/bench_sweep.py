"""Throughput, memory and figure time of the image-analysis sweeps, measured side by side in one run.

Run from the repository root:

    python bench/bench_sweep.py                      # this machine: serial, --workers 1 and 2, a loopback Dask cluster
    python bench/bench_sweep.py --scaling 1,2,4,8,16 # the scaling table of --workers on a many-core machine
    python bench/bench_sweep.py --no-dask --no-o3 --no-figures   # throughput only

What it measures (ViT-B/16-shaped random hf-vit checkpoint, D 768, 12 layers × 12 heads,
224², the one bench_profile.py writes; synthetic photos of 500×375 px; every head, modes
0–9, top 8, --batch-size 16, the shard size the runner chooses: about 4 shards per worker):

- **bare forward**: the images decoded and preprocessed once (not timed), then
  ``model.forward`` over batches of 16 at this machine's BLAS thread count — the
  numpy forward pass alone, the reference every ratio divides by;
- **top-images --no-plots** end to end (decoding, forward, scores, running top-K, state
  file after each shard): in this process, with ``--workers N`` local processes, and on a
  loopback Dask cluster of one single-threaded worker per core (started before the
  clock); images/s and the ratio to the bare forward, all in one run;
- **the whole command**: ``python -m qkweights top-images … --no-plots`` in a child process, wall
  time from its start to its exit (interpreter, imports, model load, the SVD of the heads,
  forking, the sweep, its tail, the outputs), in process and with ``--workers N``; and the
  start-up alone, split into imports, model load and the SVD (``setup``), measured here;
- **o3 peak RSS** of ``python -m qkweights o3 … --batch-size 32`` on 64 synthetic O3
  images (a child process; its ru_maxrss);
- **figures**: ``draw_top_images`` of the saved result (one grid per head, 144, plus the
  anisotropy figure), seconds per figure beyond the scan.

Rounds alternate between the measures so that changes in machine load hit them alike;
medians (and bests) over ``--reps`` rounds are printed.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from threadpoolctl import threadpool_info

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench_profile import make_vit  # noqa: E402

OUT = ROOT / "bench" / "out"
BATCH = 16
# The children's environment, taken before anything runs: a Dask LocalCluster sets OMP_NUM_THREADS and
# OPENBLAS_NUM_THREADS to 1 in this process's os.environ, which would make every later child single-threaded.
CHILD_ENV = {**os.environ, "PYTHONPATH": str(ROOT)}


def photos(n: int) -> Path:
    """``n`` synthetic photos of 500×375 px (the size of many ImageNet photos) in bench/out/ (written once)."""
    from qkweights.datasets.synthetic_o3 import make_o3

    folder = OUT / f"photos-500x375-n{n}"
    if not folder.is_dir():
        make_o3(folder, n=n, seed=7, size=(375, 500))
    return folder / "images"


def o3_set(n: int) -> Path:
    from qkweights.datasets.synthetic_o3 import make_o3

    folder = OUT / f"o3-synth-512-n{n}"
    return folder if folder.is_dir() else make_o3(folder, n=n, seed=0, size=(512, 512))


def bare_forward(model, root: Path) -> float:
    """Seconds of the forward passes alone over every image, in batches of BATCH (decoding not timed)."""
    from qkweights.analyses.sweep import input_size, list_images, load_batch

    paths = list_images(root)
    batches = [load_batch(model, root, paths[i : i + BATCH], input_size(model))[0] for i in range(0, len(paths), BATCH)]
    t0 = time.perf_counter()
    for x in batches:
        model.forward(x, layers=range(model.dims.layers), truncate=True)
    return time.perf_counter() - t0


def sweep(model, root: Path, out: Path, **where) -> float:
    from qkweights.analyses.runner import SweepSettings
    from qkweights.analyses.top_images import run_top_images

    t0 = time.perf_counter()
    run_top_images(model, root, out, settings=SweepSettings(batch_size=BATCH, **where))
    return time.perf_counter() - t0


def whole_command(model_dir: Path, root: Path, out: Path, *where: str) -> float:
    """Seconds of ``python -m qkweights top-images … --no-plots`` in a child process, start to exit."""
    cmd = [sys.executable, "-m", "qkweights", "top-images", str(model_dir), str(root), "--batch-size", str(BATCH)]
    t0 = time.perf_counter()
    subprocess.run(
        [*cmd, *where, "--no-plots", "--quiet", "--out", str(out)],
        env=CHILD_ENV,
        check=True,
    )
    return time.perf_counter() - t0


START_CHILD = """import sys, time
t0 = time.perf_counter()
import qkweights.cli.top_images, qkweights.analyses.top_images, qkweights.analyses.sweep as sweep
t1 = time.perf_counter()
from qkweights.vision.model import open_vision_model
from qkweights.weights.modes import mode_source
model = open_vision_model(sys.argv[1])
d = model.dims
t2 = time.perf_counter()
sweep.mode_bank(mode_source(model.checkpoint), list(range(d.layers)), list(range(d.heads)), list(range(10)))
t3 = time.perf_counter()
print(t1 - t0, t2 - t1, t3 - t2)
"""


def start_up(model_dir: Path) -> tuple[float, float, float]:
    """(imports, model load, SVD of every head) in seconds, in a fresh child process."""
    out = subprocess.run(
        [sys.executable, "-c", START_CHILD, str(model_dir)],
        env=CHILD_ENV,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    return tuple(float(x) for x in out.split())


# The o3 command in a child process that reports its own peak RSS (RUSAGE_SELF: this benchmark's other children,
# the forked top-images workers, do not count).
O3_CHILD = """import resource, sys
from qkweights.cli import main
code = main(sys.argv[1:])
print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, file=sys.stderr)
sys.exit(code)
"""


def o3_peak_rss(model_dir: Path, data: Path, batch: int) -> tuple[float, float]:
    """(peak RSS in MB, seconds) of the command ``o3 … --batch-size batch --no-plots`` in a child process."""
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        proc = subprocess.run(
            [
                sys.executable,
                "-c",
                O3_CHILD,
                "o3",
                str(model_dir),
                str(data),
                "--batch-size",
                str(batch),
                "--no-plots",
                "--quiet",
                "--out",
                tmp,
            ],
            env=CHILD_ENV,
            capture_output=True,
            text=True,
        )
        seconds = time.perf_counter() - t0
    if proc.returncode:
        raise SystemExit(proc.stderr)
    return int(proc.stderr.split()[-1]) / 1024, seconds


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=160, help="photos in the top-images set (default: 160)")
    parser.add_argument("--reps", type=int, default=2, help="timed rounds (default: 2)")
    parser.add_argument("--workers", default="1,2", help="--workers values to time (default: 1,2)")
    parser.add_argument(
        "--scaling", metavar="LIST", help="instead: only the bare forward and --workers N for each N, e.g. 1,2,4,8,16"
    )
    parser.add_argument("--no-dask", action="store_true", help="skip the loopback Dask cluster")
    parser.add_argument("--no-o3", action="store_true", help="skip the o3 memory measurement")
    parser.add_argument("--no-figures", action="store_true", help="skip the figure timing")
    return parser.parse_args()


def time_figures(model, root: Path) -> None:
    """Print the seconds per figure of ``draw_top_images`` on a saved result of ``root``."""
    from qkweights.analyses.top_images import TopImagesResult
    from qkweights.figures.top_images import draw_top_images

    with tempfile.TemporaryDirectory() as tmp:
        saved = Path(tmp) / "figures"
        sweep(model, root, saved)
        result = TopImagesResult.load(saved)
        t0 = time.perf_counter()
        draw_top_images(model, result, saved)
        seconds = time.perf_counter() - t0
    k = len(result.doc["heads"]) + 1
    print(
        f"figures: {k} PNGs ({k - 1} top-images grids + anisotropy) in {seconds:.1f} s = {seconds / k:.3f} s per "
        "figure beyond the scan"
    )


def plan(args, model, vit_dir: Path, root: Path, client, cores: int) -> dict[str, Callable[[Path], float]]:
    """The timed runs, in the order they are printed: label -> a function of a fresh output folder giving seconds."""
    workers = [int(w) for w in (args.scaling or args.workers).split(",")]
    runs: dict[str, Callable[[Path], float]] = {"bare forward": lambda out: bare_forward(model, root)}
    if not args.scaling:
        runs["top-images, in process"] = lambda out: sweep(model, root, out)
    for w in workers:
        runs[f"top-images --workers {w}"] = lambda out, w=w: sweep(model, root, out, workers=w)
    if not args.scaling:
        runs["whole command, in process"] = lambda out: whole_command(vit_dir, root, out)
        for w in workers:
            runs[f"whole command --workers {w}"] = lambda out, w=str(w): whole_command(
                vit_dir, root, out, "--workers", w
            )
    if client is not None:
        label = f"top-images --scheduler (loopback Dask, {cores} workers × 1 thread)"
        runs[label] = lambda out: sweep(model, root, out, client=client)
    return runs


def main() -> None:
    args = parse_args()

    from qkweights.vision.model import open_vision_model

    blas = [(i["internal_api"], i.get("version"), i["num_threads"]) for i in threadpool_info()]
    cores = os.cpu_count()
    print(f"machine: {cores} cores, load average {os.getloadavg()[0]:.1f}; BLAS {blas}")
    vit_dir = make_vit(OUT / "vit-b-random", 768, 12, 12)
    if not args.no_o3 and not args.scaling:
        rss, seconds = o3_peak_rss(vit_dir, o3_set(64), 32)
        print(
            f"o3 --batch-size 32, 64 synthetic O3 images 512×512, ViT-B/16 shape: peak RSS {rss:.0f} MB, "
            f"{64 / seconds:.2f} img/s (a child process, import and model load included)"
        )
    model = open_vision_model(str(vit_dir))
    root = photos(args.images)
    if not args.no_figures and not args.scaling:
        time_figures(model, root)  # before any worker thread or cluster: figures draw in forked processes
    n = args.images
    client = cluster = None
    if not args.no_dask and not args.scaling:
        from distributed import Client, LocalCluster

        cluster = LocalCluster(
            n_workers=cores, threads_per_worker=1, processes=True, host="127.0.0.1", dashboard_address="127.0.0.1:0"
        )
        client = Client(cluster)
    runs = plan(args, model, vit_dir, root, client, cores)
    print(
        f"top-images --no-plots: {n} photos 500×375, ViT-B/16 shape, all 12 layers × 12 heads, modes 0-9, top 8, "
        f"batch {BATCH}, shards chosen by the runner; {args.reps} rounds"
    )
    if not args.scaling:
        parts = [start_up(vit_dir) for _ in range(args.reps)]
        imports, load, svd = (statistics.median(p[i] for p in parts) for i in range(3))
        print(f"start-up of a command: imports {imports:.2f} s, model load {load:.2f} s, SVD of the heads {svd:.2f} s")
    times: dict[str, list[float]] = {label: [] for label in runs}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.reps):
            for label, run in runs.items():
                times[label].append(run(Path(tmp) / f"r{r}-{len(os.listdir(tmp))}"))
        if client is not None:
            client.close()
            cluster.close()
    ref = statistics.median(times["bare forward"])
    for label, seconds in times.items():
        med = statistics.median(seconds)
        print(
            f"  {label:58s} {n / med:7.2f} img/s (best {n / min(seconds):.2f})   ratio to the bare forward "
            f"{ref / med:5.2f}"
        )


if __name__ == "__main__":
    main()
