"""Throughput of qkweights' numpy forward pass: per image (now), batched (before), torch CPU; same run, same threads.

Builds a ViT-B/16 (224×224, 12 layers, width 768, 12 heads, MLP 3072) with random weights in the
Hugging Face ViT file layout (config.json + model.safetensors, written with numpy and
safetensors.numpy) in a temporary folder, then for each thread count N:

- qkweights: ``open_vision_model(folder).forward(pixels)`` with OpenBLAS limited to N threads (threadpoolctl):
  every image runs alone, N images side by side on Python threads, one BLAS thread each, the linear layers on
  this machine's GEMM route (``qkweights.vision.gemm``: weights packed once where numpy's OpenBLAS allows);
- numpy GEMMs: the same per-image forward with every linear layer an ``np.matmul`` (the route
  ``QKWEIGHTS_GEMM=numpy`` and machines without the packed route take), which repacks the weights on every call;
- batched: the forward pass before issue 15, kept here only as the baseline (:func:`batched_forward`):
  the batch cut in N shards of consecutive images, each shard's ``(B·T, D) @ W`` one BLAS call, so
  that an image's rounding depended on its neighbours on some BLAS kernels; the column
  ``== per image`` says whether its outputs happen to be bit-identical to the per-image ones (numpy GEMMs) here;
- torch (when installed): ``ViTModel.from_pretrained(folder)`` (default attention, sdpa) and eager
  attention, with ``torch.set_num_threads(N)``; torch is imported only here, never by qkweights;
- numpy's float32 matmul peak: (B·T × 768) @ (768 × 3072) in GFLOP/s, the ceiling of the forward pass;
- the price of one GEMM per image: a block's four linear layers (q/k/v, out, fc1, fc2) at one BLAS thread
  with 197 rows per call (one image, as the per-image forward calls them) and with B/N·197 rows (a shard of
  the batched forward), in GFLOP/s, alternating; numpy's BLAS repacks the weights on every call, so that fewer
  rows per call spend a larger share of the time packing. Beside them, the same 197-row GEMMs on the packed route
  (:class:`qkweights.vision.gemm.Linear`), where this machine has it.

Timings alternate between the implementations (other load on the machine hits both alike) and
report the median and the best of ``--reps`` runs. Peak memory of ``forward(attentions=True)``
over all 12 layers is measured in a fresh subprocess (tracemalloc peak of the forward call, and
the process's peak RSS during the call).

Run from the repository root:  python bench/bench_forward.py [--batch 8] [--threads 1 2] [--reps 5]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from safetensors.numpy import save_file
from threadpoolctl import threadpool_info, threadpool_limits

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from qkweights.vision.forward import (  # noqa: E402
    ForwardOutput,
    activation_,
    check_pixels,
    embed,
    forward,
    layer_norm,
    softmax_,
)
from qkweights.vision.gemm import Linear, gemm_route, scratch  # noqa: E402
from qkweights.vision.model import open_vision_model, vit_weights  # noqa: E402
from qkweights.vision.threads import blas_threads  # noqa: E402

VIT_B16 = dict(
    hidden_size=768,
    num_hidden_layers=12,
    num_attention_heads=12,
    intermediate_size=3072,
    image_size=224,
    patch_size=16,
    num_channels=3,
)


def write_vit(folder: Path, cfg: dict, seed: int = 0) -> None:
    """config.json + model.safetensors of a ViTModel with random weights (HF key names, (out, in) layout)."""
    rng = np.random.default_rng(seed)
    d, f, p, n = (
        cfg["hidden_size"],
        cfg["intermediate_size"],
        cfg["patch_size"],
        (cfg["image_size"] // cfg["patch_size"]) ** 2,
    )

    def normal(*shape, std=0.02):
        return (std * rng.standard_normal(shape)).astype(np.float32)

    t = {
        "embeddings.cls_token": normal(1, 1, d),
        "embeddings.position_embeddings": normal(1, n + 1, d),
        "embeddings.patch_embeddings.projection.weight": normal(d, 3, p, p),
        "embeddings.patch_embeddings.projection.bias": normal(d),
        "layernorm.weight": 1 + normal(d),
        "layernorm.bias": normal(d),
    }
    for i in range(cfg["num_hidden_layers"]):
        pre = f"encoder.layer.{i}."
        for name in ("query", "key", "value"):
            t[pre + f"attention.attention.{name}.weight"] = normal(d, d)
            t[pre + f"attention.attention.{name}.bias"] = normal(d)
        t[pre + "attention.output.dense.weight"], t[pre + "attention.output.dense.bias"] = normal(d, d), normal(d)
        t[pre + "intermediate.dense.weight"], t[pre + "intermediate.dense.bias"] = normal(f, d), normal(f)
        t[pre + "output.dense.weight"], t[pre + "output.dense.bias"] = normal(d, f), normal(d)
        for norm in ("layernorm_before", "layernorm_after"):
            t[pre + norm + ".weight"], t[pre + norm + ".bias"] = 1 + normal(d), normal(d)
    save_file(t, str(folder / "model.safetensors"))
    config = {
        "model_type": "vit",
        "architectures": ["ViTModel"],
        "hidden_act": "gelu",
        "layer_norm_eps": 1e-12,
        "qkv_bias": True,
        "hidden_dropout_prob": 0.0,
        "attention_probs_dropout_prob": 0.0,
        **cfg,
    }
    (folder / "config.json").write_text(json.dumps(config))


def batched_forward(weights, pixels: np.ndarray, threads: int) -> ForwardOutput:
    """The forward pass as qkweights ran it before issue 15 (its code, kept here only as the baseline): the batch
    cut in ``threads`` shards of consecutive images, each shard one ``(B·T, D) @ W`` BLAS call per linear layer at
    one BLAS thread, the shards side by side on Python threads; every intermediate kept, as the default forward."""
    x = check_pixels(pixels, 3, weights.embeddings.patch_size)
    n = min(threads, len(x))
    if n <= 1:
        return _batched_run(weights, x)
    cuts = np.array_split(np.arange(len(x)), n)
    with threadpool_limits(1, user_api="blas"), ThreadPoolExecutor(n) as pool:
        return _concat(list(pool.map(lambda i: _batched_run(weights, x[i]), cuts)))


def _linear(x: np.ndarray, lin: Linear) -> np.ndarray:
    """x (..., I) @ weight + bias of a linear layer on the numpy route, as one BLAS call."""
    y = x.reshape(-1, x.shape[-1]) @ lin.weight  # (B·T, O)
    y += lin.bias
    return y.reshape(*x.shape[:-1], lin.shape[1])


def _batched_run(wt, pixels: np.ndarray) -> ForwardOutput:
    """One shard (B, C, H, W) through the whole model, batched (the baseline's ``_run``; no relative position bias:
    the bench model has none)."""
    heads, k = wt.heads, wt.head_dim
    x, layout = embed(wt.embeddings, pixels, wt.eps)  # (B, T, D)
    b, t, d = x.shape
    residual, normed = [], {}
    for l, blk in enumerate(wt.blocks):
        residual.append(x)
        h = layer_norm(x, blk.norm1, wt.eps)  # (B, T, D)
        normed[l] = h
        qkv = _linear(h, blk.qkv).reshape(b, t, 3, heads, k)  # (B, T, 3, H, K)
        q, key, v = qkv.transpose(2, 0, 3, 1, 4)  # 3 × (B, H, T, K)
        att = softmax_(q @ key.swapaxes(-1, -2))  # (B, H, T, T)
        ctx = (att @ v).transpose(0, 2, 1, 3).reshape(b, t, d)  # (B, T, H·K)
        a = _linear(ctx, blk.out)
        a += x
        x = a
        m = activation_(_linear(layer_norm(x, blk.norm2, wt.eps), blk.fc1), wt.act)  # (B, T, F)
        m = _linear(m, blk.fc2)
        m += x
        x = m
    residual.append(x)
    last = layer_norm(x, wt.final_norm, wt.eps)
    return ForwardOutput(residual, normed, {}, last, layout, None)


def _concat(parts: list[ForwardOutput]) -> ForwardOutput:
    """Join the shards' outputs along B."""
    if len(parts) == 1:
        return parts[0]
    return ForwardOutput(
        hidden_states=[np.concatenate([p.hidden_states[l] for p in parts]) for l in range(len(parts[0].hidden_states))],
        attention_inputs={l: np.concatenate([p.attention_inputs[l] for p in parts]) for l in parts[0].attention_inputs},
        attentions={},
        last_hidden_state=np.concatenate([p.last_hidden_state for p in parts]),
        layout=parts[0].layout,
    )


def forward_flops(cfg: dict, batch: int) -> float:
    """Multiply-add FLOPs (2 per MAC) of one forward pass: patch conv, q/k/v, logits, context, out, MLP."""
    d, f, p, h = cfg["hidden_size"], cfg["intermediate_size"], cfg["patch_size"], cfg["num_attention_heads"]
    n = (cfg["image_size"] // p) ** 2
    t, k = n + 1, d // h
    per_layer = 2 * t * d * 3 * d + 2 * 2 * h * t * t * k + 2 * t * d * d + 2 * 2 * t * d * f
    return batch * (2 * n * 3 * p * p * d + cfg["num_hidden_layers"] * per_layer)


def matmul_peak(rows: int, d: int, f: int, reps: int) -> float:
    """Best GFLOP/s of numpy's float32 (rows × d) @ (d × f) under the current thread limits."""
    rng = np.random.default_rng(1)
    a, b = rng.standard_normal((rows, d), dtype=np.float32), rng.standard_normal((d, f), dtype=np.float32)
    a @ b
    best = min(_time(lambda: a @ b) for _ in range(reps))
    return 2 * rows * d * f / best / 1e9


def rows_per_call(rows: tuple[int, ...], reps: int) -> dict:
    """Median GFLOP/s at one BLAS thread of a ViT-B block's four GEMMs, (rows × in) @ (in × out) each, for each row
    count, and (key "packed", where this machine has the packed route) at the first row count on it
    (:class:`~qkweights.vision.gemm.Linear`, no bias; its max |difference| from numpy's products under key
    "packed_diff"); all alternate within every repetition."""
    rng = np.random.default_rng(2)
    shapes = [(768, 3 * 768), (768, 768), (768, 3072), (3072, 768)]  # q/k/v, out, fc1, fc2
    ws = [rng.standard_normal(s, dtype=np.float32) for s in shapes]
    xs = {m: {k: rng.standard_normal((m, k), dtype=np.float32) for k in (768, 3072)} for m in rows}
    runs = {m: lambda m=m: [xs[m][w.shape[0]] @ w for w in ws] for m in rows}
    diff = None
    if gemm_route() == "packed":
        packed, one, work = [Linear(w, np.zeros(w.shape[1])) for w in ws], xs[rows[0]], scratch(rows[0])
        outs = [np.empty((rows[0], w.shape[1]), np.float32) for w in ws]
        runs["packed"] = lambda: [g(one[g.shape[0]], o, work) for g, o in zip(packed, outs)]
    times: dict = {key: [] for key in runs}
    with threadpool_limits(1, user_api="blas"):
        ref = [run() for run in runs.values()]  # warm-up
        if "packed" in runs:
            diff = max(float(np.abs(a - b).max()) for a, b in zip(ref[0], ref[-1]))
        for _ in range(reps):
            for key, run in runs.items():
                times[key].append(_time(run))
    flops = {key: 2 * (rows[0] if key == "packed" else key) * sum(a * b for a, b in shapes) for key in runs}
    return {key: flops[key] / statistics.median(ts) / 1e9 for key, ts in times.items()} | {"packed_diff": diff}


def print_rows_per_call(shard: int, reps: int) -> None:
    """Print :func:`rows_per_call` at 197 rows (one image) and ``shard`` rows (a shard of the batched forward)."""
    gemm = rows_per_call((197, shard), reps)
    print(
        f"  a block's GEMMs at one BLAS thread: {gemm[197]:.0f} GFLOP/s at 197 rows per call (one image), "
        f"{gemm[shard]:.0f} at {shard} (a shard of the batched forward): {gemm[197] / gemm[shard]:.2f}x"
    )
    if "packed" in gemm:
        print(
            f"  the same 197-row GEMMs on the packed route (weights packed once): {gemm['packed']:.0f} GFLOP/s, "
            f"{gemm['packed'] / gemm[shard]:.2f}x of {shard} rows (max |difference| from numpy's products "
            f"{gemm['packed_diff']:.1e})"
        )


def _time(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def peak_memory(folder: Path, batch: int, threads: int) -> dict:
    """Peak memory of forward(attentions=True, all layers) in a fresh process (MB).

    tracemalloc peak of the forward call (numpy's allocations); the process's peak RSS during
    the call (VmHWM, reset just before it through /proc/self/clear_refs) minus its RSS before.
    """
    code = f"""
import json, sys, tracemalloc
import numpy as np
from threadpoolctl import threadpool_limits
sys.path.insert(0, {str(ROOT)!r})
from qkweights.vision.model import open_vision_model

def status(key):
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) / 1024 for line in f if line.startswith(key))

m = open_vision_model({str(folder)!r})
x = np.random.default_rng(0).standard_normal(({batch}, 3, 224, 224)).astype(np.float32)
with threadpool_limits({threads}):
    m.forward(x[:1])
    weights_rss = status("VmRSS:")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset the peak RSS to the current RSS
    tracemalloc.start()
    out = m.forward(x, attentions=True)
    _, peak = tracemalloc.get_traced_memory()
    hwm = status("VmHWM:")
kept = sum(a.nbytes for a in out.hidden_states) + sum(a.nbytes for a in out.attention_inputs.values())
kept += sum(a.nbytes for a in out.attentions.values()) + out.last_hidden_state.nbytes
print(json.dumps({{"tracemalloc_peak_mb": peak / 2**20, "rss_before_mb": weights_rss, "rss_peak_mb": hwm,
                  "outputs_mb": kept / 2**20}}))
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return json.loads(out.stdout)


def print_times(times: dict, flops: float, batch: int, peak: float) -> None:
    """Each runner's median and best time, throughput and share of the matmul peak; qkweights' throughput over each
    other runner's."""
    for name, ts in times.items():
        med, best = statistics.median(ts), min(ts)
        gflops = flops / med / 1e9
        print(
            f"  {name:11s} median {med * 1e3:7.0f} ms  best {best * 1e3:7.0f} ms  "
            f"{batch / med:6.2f} img/s  {gflops:6.1f} GFLOP/s ({gflops / peak:4.0%} of peak)"
        )
    q = statistics.median(times["qkweights"])
    for name in [n for n in times if n != "qkweights"]:
        print(f"  qkweights / {name} throughput: {statistics.median(times[name]) / q:.2f}x")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--no-torch", action="store_true", help="skip the torch comparison (skipped too without torch)")
    args = ap.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        write_vit(folder, VIT_B16)
        model = open_vision_model(str(folder))
        pixels = np.random.default_rng(0).standard_normal((args.batch, 3, 224, 224)).astype(np.float32)
        flops = forward_flops(VIT_B16, args.batch)
        plain = vit_weights(model.checkpoint, route="numpy")  # every linear layer an np.matmul
        runners = {"qkweights": lambda: model.forward(pixels)}
        if gemm_route() == "packed":
            runners["numpy GEMMs"] = lambda: forward(plain, pixels)
        runners["batched"] = lambda: batched_forward(plain, pixels, blas_threads())
        if not args.no_torch:
            # torch's OpenMP threads otherwise spin for a while after each of its runs, taking the cores from the
            # numpy run that follows it in the rotation (measured: qkweights 0.84x of batched with torch in the
            # rotation, 0.98x without); set before torch is imported, which reads it once.
            os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
            try:
                import torch  # noqa: F401
            except ImportError:
                print("torch is not installed: no torch comparison (pip install torch==2.13.0 transformers)")
                args.no_torch = True
        if not args.no_torch:
            import torch
            from transformers import ViTModel

            tm = {
                impl: ViTModel.from_pretrained(str(folder), attn_implementation=impl, add_pooling_layer=False).eval()
                for impl in ("sdpa", "eager")
            }
            tx = torch.from_numpy(pixels)

            def torch_runner(m):
                def run():
                    with torch.inference_mode():
                        return m(pixel_values=tx).last_hidden_state

                return run

            runners |= {f"torch-{impl}": torch_runner(m) for impl, m in tm.items()}
            with torch.inference_mode():
                ref = tm["eager"](pixel_values=tx).last_hidden_state.numpy()
            diff = float(np.abs(model.forward(pixels).last_hidden_state - ref).max())
            print(f"check: max |qkweights - torch eager| on last_hidden_state = {diff:.2e}")

        blas = sorted(
            {(i["internal_api"], i.get("version"), i.get("architecture")) for i in threadpool_info()}, key=str
        )
        print(
            f"numpy {np.__version__}, BLAS {blas}; GEMM route {gemm_route()}; batch {args.batch}, ViT-B/16 "
            f"224x224, {flops / args.batch / 1e9:.1f} GFLOP/image"
        )
        for n in args.threads:
            if not args.no_torch:
                torch.set_num_threads(n)
            with threadpool_limits(n):
                same = np.array_equal(runners["batched"]().last_hidden_state, forward(plain, pixels).last_hidden_state)
                for fn in runners.values():
                    fn()  # warm-up
                times = {name: [] for name in runners}
                for _ in range(args.reps):
                    for name, fn in runners.items():
                        times[name].append(_time(fn))
                peak = matmul_peak(args.batch * 197, 768, 3072, args.reps)
            print(f"\nthreads = {n}: numpy float32 matmul peak {peak:.0f} GFLOP/s; batched == per image: {same}")
            shard = 197 * -(-args.batch // n)
            if shard > 197:
                print_rows_per_call(shard, 3 * args.reps)
            print_times(times, flops, args.batch, peak)
        mem = peak_memory(folder, args.batch, args.threads[0])
        print(
            f"\nmemory, forward(attentions=True, all 12 layers), batch {args.batch}: "
            f"tracemalloc peak {mem['tracemalloc_peak_mb']:.0f} MB (outputs kept {mem['outputs_mb']:.0f} MB), "
            f"RSS {mem['rss_before_mb']:.0f} MB before (weights loaded) -> peak {mem['rss_peak_mb']:.0f} MB "
            "during the call"
        )


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    main()
