"""Benchmarks of the weight profile (issue: weight profiling, §7).

Run: ``python bench/bench_profile.py [--skip-large]`` from the repository root.

1. Math on a ViT-B-shaped checkpoint (D 768, 12 layers × 12 heads, random F32):
   qkweights' QR-core SVD + statistics against the paper's dense SVD of each
   D×D product, in the same process, at 1 and 2 BLAS threads (threadpoolctl).
2. ``python -m qkweights profile`` end to end on that file, plots included
   (wall time of the subprocess, best of 3).
3. Peak RSS of ``profile`` on a ViT-L-shaped file (D 1024, 24 layers, F32 ≈ 1.2 GB),
   from the child's ``ru_maxrss``.
Checkpoints are written once into ``bench/out/`` (git-ignored) and reused.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from safetensors.numpy import save_file
from threadpoolctl import threadpool_info, threadpool_limits

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from qkweights.checkpoints.tensors import TensorStore  # noqa: E402
from qkweights.specs.checkpoint import open_checkpoint  # noqa: E402
from qkweights.weights.compute import compute_profile  # noqa: E402


def make_vit(folder: Path, hidden: int, layers: int, heads: int) -> Path:
    """A random hf-vit checkpoint (config.json + model.safetensors, F32) with every tensor of the real layout."""
    if (folder / "model.safetensors").exists():
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    mlp, patch, image = 4 * hidden, 16, 224

    def w(*shape):
        return (rng.standard_normal(shape, dtype=np.float32) * 0.02).astype(np.float32)

    t = {
        "embeddings.cls_token": w(1, 1, hidden),
        "embeddings.position_embeddings": w(1, 1 + (image // patch) ** 2, hidden),
        "embeddings.patch_embeddings.projection.weight": w(hidden, 3, patch, patch),
        "embeddings.patch_embeddings.projection.bias": w(hidden),
        "layernorm.weight": 1 + w(hidden),
        "layernorm.bias": w(hidden),
    }
    for i in range(layers):
        p = f"encoder.layer.{i}."
        for name in (
            "attention.attention.query",
            "attention.attention.key",
            "attention.attention.value",
            "attention.output.dense",
        ):
            t[p + name + ".weight"], t[p + name + ".bias"] = w(hidden, hidden), w(hidden)
        t[p + "intermediate.dense.weight"], t[p + "intermediate.dense.bias"] = w(mlp, hidden), w(mlp)
        t[p + "output.dense.weight"], t[p + "output.dense.bias"] = w(hidden, mlp), w(hidden)
        for ln in ("layernorm_before", "layernorm_after"):
            t[p + ln + ".weight"], t[p + ln + ".bias"] = 1 + w(hidden), w(hidden)
    save_file(t, str(folder / "model.safetensors"))
    config = {
        "model_type": "vit",
        "architectures": ["ViTModel"],
        "hidden_size": hidden,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "intermediate_size": mlp,
        "hidden_act": "gelu",
        "layer_norm_eps": 1e-12,
        "image_size": image,
        "patch_size": patch,
        "num_channels": 3,
        "qkv_bias": True,
    }
    (folder / "config.json").write_text(json.dumps(config))
    return folder


def best_of(fn, repeat: int) -> float:
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def bench_math(folder: Path) -> None:
    """compute_profile (weights read from the file included) against the dense SVD of each D×D product it profiles,
    the query-key W_qᵀW_k and the value-output W_o W_v of every head (weights in memory)."""
    ck = open_checkpoint(TensorStore.open([folder / "model.safetensors"]), {"config.json": folder / "config.json"})
    products = [(qk.wq.swapaxes(1, 2), qk.wk) for qk in map(ck.qk, range(ck.dims.layers))]  # (H, D, K), (H, K, D)
    products += [(ov.wo, ov.wv) for ov in map(ck.ov, range(ck.dims.layers))]
    k = ck.dims.head_dim

    def dense():
        for a, b in products:
            for h in range(a.shape[0]):
                u, s, vt = np.linalg.svd(a[h] @ b[h])  # (D, D)
                np.sum(u[:, :k] * vt[:k].T, 0)

    print(f"math, ViT-B shape ({ck.dims.layers} layers × {ck.dims.heads} heads, D {ck.dims.hidden}, K {k}), float64:")
    for cores in (1, 2):
        t_ours = best_of(lambda: compute_profile(ck, {}, workers=cores), 5)  # its own setting: 1 BLAS thread per worker
        with threadpool_limits(cores):
            t_dense = best_of(dense, 1)
        print(
            f"  {cores} core(s): qkweights {t_ours * 1e3:8.1f} ms ({cores} worker(s) × 1 BLAS thread)   "
            f"dense SVDs {t_dense * 1e3:9.1f} ms ({cores} BLAS thread(s))   speed-up {t_dense / t_ours:6.1f}x"
        )


def bench_end_to_end(folder: Path) -> None:
    with tempfile.TemporaryDirectory() as out:
        cmd = [sys.executable, "-m", "qkweights", "profile", str(folder), "--out", out, "--quiet"]
        times = []
        for _ in range(3):
            t0 = time.perf_counter()
            subprocess.run(cmd, check=True, cwd=ROOT)
            times.append(time.perf_counter() - t0)
    print(
        f"end to end `python -m qkweights profile` (ViT-B F32, plots included): best {min(times):.2f} s, runs "
        f"{', '.join(f'{t:.2f}' for t in times)} s"
    )


def bench_rss(folder: Path) -> None:
    size = (folder / "model.safetensors").stat().st_size
    with tempfile.TemporaryDirectory() as out:
        code = (
            "import resource, subprocess, sys; subprocess.run(sys.argv[1:], check=True); "
            "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)"
        )
        res = subprocess.run(
            [
                sys.executable,
                "-c",
                code,
                sys.executable,
                "-m",
                "qkweights",
                "profile",
                str(folder),
                "--out",
                out,
                "--quiet",
            ],
            check=True,
            cwd=ROOT,
            capture_output=True,
            text=True,
        )
    print(
        f"peak RSS of `profile` on a ViT-L-shaped file ({size / 2**30:.2f} GiB F32, 24 layers, D 1024): "
        f"{int(res.stdout.split()[-1]) / 1024:.0f} MiB"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--skip-large", action="store_true", help="skip the 1.2 GB ViT-L file")
    args = parser.parse_args()
    out = ROOT / "bench" / "out"
    blas = [(i["internal_api"], i.get("version"), i["num_threads"]) for i in threadpool_info()]
    print(f"machine: {os.cpu_count()} cores; BLAS {blas}; OPENBLAS_CORETYPE={os.environ.get('OPENBLAS_CORETYPE')}")
    vit_b = make_vit(out / "vit-b-random", 768, 12, 12)
    bench_math(vit_b)
    bench_end_to_end(vit_b)
    if not args.skip_large:
        bench_rss(make_vit(out / "vit-l-random", 1024, 24, 16))


if __name__ == "__main__":
    main()
