"""Reading attention weights: ``TensorStore`` (the safetensors library) against a bare positioned read.

Run: ``python bench/bench_read.py [--rounds 7]`` from the repository root, after
``bench/bench_profile.py`` has written ``bench/out/vit-{b,l}-random`` (random F32 checkpoints).

Per layer, the q, k, v and out-projection weights (what ``profile`` reads), three ways, interleaved:

- ``TensorStore.get`` (the library's ``safe_open(...).get_tensor``, a memory map opened and closed per read,
  the header re-validated each time);
- a bare ``os.preadv`` into a fresh array at the header's offset (qkweights' reader before it used the
  library; the lower bound: no validation per read);
- ``TensorStore.rows`` of one head (``get_slice``: only that head's K rows of each tensor).

Median per layer over ``--rounds`` rounds (the files are in the page cache after the first round).
Peak RSS of the whole read in a fresh process for each way, from ``ru_maxrss``.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from qkweights.checkpoints.tensors import TensorStore

ROLES = ("attention.attention.query", "attention.attention.key", "attention.attention.value", "attention.output.dense")


def names(layers: int) -> list[list[str]]:
    return [[f"encoder.layer.{i}.{r}.weight" for r in ROLES] for i in range(layers)]


def pread_reader(path: Path):
    """The former reader, reduced to its read: offsets from the JSON header, one positioned read per tensor."""
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(n))

    def get(name: str) -> np.ndarray:
        e = header[name]
        begin, end = e["data_offsets"]
        out = np.empty(e["shape"], np.float32)
        with open(path, "rb") as f:
            assert os.preadv(f.fileno(), [out.reshape(-1).view(np.uint8)], 8 + n + begin) == end - begin
        return out

    return get


def ways(path: Path, layers: int, head_rows: int):
    store = TensorStore.open([path])
    get = pread_reader(path)
    return {
        "TensorStore.get (safetensors)": lambda i: [store.get(t) for t in names(layers)[i]],
        "bare os.preadv (former reader)": lambda i: [get(t) for t in names(layers)[i]],
        "TensorStore.rows, one head": lambda i: [store.rows(t, 0, head_rows) for t in names(layers)[i]],
    }


def rss_child(path: str, layers: int, head_rows: int, way: str) -> None:
    read = ways(Path(path), layers, head_rows)[way]
    for i in range(layers):
        read(i)
    print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--child", nargs=4, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        path, layers, rows, way = args.child
        return rss_child(path, int(layers), int(rows), way)
    for label, layers, hidden in (("ViT-B", 12, 768), ("ViT-L", 24, 1024)):
        path = ROOT / "bench" / "out" / f"vit-{label[-1].lower()}-random" / "model.safetensors"
        if not path.exists():
            print(f"{path} missing: run bench/bench_profile.py first")
            continue
        todo = ways(path, layers, 64)
        times = {k: [] for k in todo}
        for _ in range(args.rounds):
            for way, read in todo.items():
                t0 = time.perf_counter()
                for i in range(layers):
                    read(i)
                times[way].append((time.perf_counter() - t0) / layers)
        print(
            f"{label} ({layers} layers, D {hidden}, F32, {path.stat().st_size / 2**20:.0f} MiB): q, k, v, out "
            "weights per layer"
        )
        for way, t in times.items():
            rss = subprocess.run(
                [sys.executable, __file__, "--child", str(path), str(layers), "64", way],
                check=True,
                capture_output=True,
                text=True,
            ).stdout.split()[-1]
            print(
                f"  {way:32s} median {np.median(t) * 1e3:6.2f} ms/layer   peak RSS of the whole read "
                f"{int(rss) / 1024:5.0f} MiB"
            )


if __name__ == "__main__":
    main()
