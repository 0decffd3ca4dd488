"""numpy.linalg vs scipy.linalg for the LAPACK calls of ``qk.qk_svd`` (and ``ov_svd``, the same calls).

Run: ``python bench/bench_lapack.py [--rounds 7]`` from the repository root.

One layer's heads, float64, at 1 BLAS thread (threadpoolctl; how ``compute_profile``
runs them): the thin QR of the H stacked D×K factors ``W_qᵀ``/``W_kᵀ`` and the SVD
of the H K×K cores, each as

- numpy, batched: one ``np.linalg.qr`` / ``np.linalg.svd`` call on the (H, D, K) / (H, K, K) stack;
- scipy, looped: ``scipy.linalg.qr(mode="economic")`` / ``scipy.linalg.svd(full_matrices=False)``
  per head, ``check_finite=False``, with and without ``overwrite_a`` (on our own copy),
  and for the SVD both drivers (``gesdd``, ``gesvd``);
- scipy, batched: the same functions on the whole stack (scipy ≥ 1.15 loops in Python);
- scipy.linalg.lapack, looped: ``dgeqrf`` + ``dorgqr`` / ``dgesdd`` directly, the least overhead.

Shapes: ViT-B (H 12, D 768, K 64) and ViT-L (H 16, D 1024, K 64). Variants run
interleaved, ``--rounds`` rounds, each timing ``--reps`` repetitions; the figure is
the median per call over rounds (the machine is shared: noisy). Every variant's
result is checked against numpy's first (σ to 1e-12 relative, R up to the sign of
its rows, Q·R against A), so a faster variant is also an exact one.
"""

from __future__ import annotations

import argparse
import os
import time

import numpy as np
import scipy
import scipy.linalg as sl
from scipy.linalg import lapack
from threadpoolctl import threadpool_info, threadpool_limits

SHAPES = {"ViT-B": (12, 768, 64), "ViT-L": (16, 1024, 64)}


def factors(h: int, d: int, k: int, seed: int = 0) -> np.ndarray:
    """(H, D, K) float64: W_qᵀ of H heads, as qk_svd sees it (a transposed view of (H, K, D) rows)."""
    w = np.random.default_rng(seed).standard_normal((h, k, d)).astype(np.float32) * 0.02  # (H, K, D), as stored
    return np.swapaxes(w.astype(np.float64), -1, -2)  # (H, D, K) view


# ---------------------------------------------------------------- QR variants: (H, D, K) -> Q (H, D, K), R (H, K, K)
def qr_numpy(a):
    return np.linalg.qr(a)


def qr_scipy_loop(a):
    out = [sl.qr(a[i], mode="economic", check_finite=False) for i in range(a.shape[0])]
    return np.stack([q for q, _ in out]), np.stack([r for _, r in out])


def qr_scipy_loop_overwrite(a):
    a = np.swapaxes(
        np.swapaxes(a, -1, -2).copy(), -1, -2
    )  # our own copy (the caller's W still serves head_stats); a[i] F-contiguous
    out = [sl.qr(a[i], mode="economic", check_finite=False, overwrite_a=True) for i in range(a.shape[0])]
    return np.stack([q for q, _ in out]), np.stack([r for _, r in out])


def qr_scipy_batched(a):
    return sl.qr(a, mode="economic", check_finite=False)


def qr_lapack_loop(a):
    h, d, k = a.shape
    q, r = np.empty((h, d, k)), np.empty((h, k, k))
    for i in range(h):
        qr_, tau, _, _info = lapack.dgeqrf(a[i], overwrite_a=False)
        r[i] = np.triu(qr_[:k])
        q[i], _, _info = lapack.dorgqr(qr_, tau, overwrite_a=True)
    return q, r


# ---------------------------------------------------------------- SVD variants: (H, K, K) -> U, S, Vᵀ
def svd_numpy(c):
    return np.linalg.svd(c)


def svd_scipy_loop(driver, overwrite):
    def run(c):
        c = c.copy() if overwrite else c
        out = [
            sl.svd(c[i], full_matrices=False, check_finite=False, overwrite_a=overwrite, lapack_driver=driver)
            for i in range(c.shape[0])
        ]
        return np.stack([o[0] for o in out]), np.stack([o[1] for o in out]), np.stack([o[2] for o in out])

    return run


def svd_scipy_batched(c):
    return sl.svd(c, full_matrices=False, check_finite=False)


def svd_lapack_loop(c):
    h, k, _ = c.shape
    u, s, vt = np.empty((h, k, k)), np.empty((h, k)), np.empty((h, k, k))
    for i in range(h):
        u[i], s[i], vt[i], _info = lapack.dgesdd(c[i], full_matrices=0)
    return u, s, vt


def check_qr(a, ref, got) -> float:
    """max |R − R_ref| after matching row signs, and ‖Q R − A‖ (both relative)."""
    q, r = got
    sign = np.sign(np.diagonal(r, axis1=-2, axis2=-1) * np.diagonal(ref[1], axis1=-2, axis2=-1))[
        ..., :, None
    ]  # (H, K, 1)
    err_r = np.abs(r * sign - ref[1]).max() / np.abs(ref[1]).max()
    err_a = np.abs(q @ r - a).max() / np.abs(a).max()
    return max(err_r, err_a)


def check_svd(ref, got) -> float:
    return float(np.abs(got[1] - ref[1]).max() / ref[1].max())


def timed(fn, arg, reps: int) -> float:
    t0 = time.perf_counter()
    for _ in range(reps):
        fn(arg)
    return (time.perf_counter() - t0) / reps


def run(variants: dict, arg, rounds: int, reps: int) -> dict:
    times = {k: [] for k in variants}
    for _ in range(rounds):
        for name, fn in variants.items():  # interleaved: each round runs every variant once
            times[name].append(timed(fn, arg, reps))
    return {k: float(np.median(v)) for k, v in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--reps", type=int, default=10)
    args = parser.parse_args()
    blas = [(i["internal_api"], i.get("version"), os.path.basename(i["filepath"])) for i in threadpool_info()]
    print(f"machine: {os.cpu_count()} cores; numpy {np.__version__}, scipy {scipy.__version__}; BLAS {blas}")
    print(
        f"1 BLAS thread; median over {args.rounds} interleaved rounds of {args.reps} calls; times per layer "
        "(all heads)\n"
    )
    qr_variants = {
        "numpy batched": qr_numpy,
        "scipy looped": qr_scipy_loop,
        "scipy looped, overwrite_a": qr_scipy_loop_overwrite,
        "scipy batched": qr_scipy_batched,
        "scipy.linalg.lapack looped": qr_lapack_loop,
    }
    svd_variants = {
        "numpy batched (gesdd)": svd_numpy,
        "scipy looped gesdd": svd_scipy_loop("gesdd", False),
        "scipy looped gesdd, overwrite_a": svd_scipy_loop("gesdd", True),
        "scipy looped gesvd": svd_scipy_loop("gesvd", False),
        "scipy batched gesdd": svd_scipy_batched,
        "scipy.linalg.lapack dgesdd looped": svd_lapack_loop,
    }
    with threadpool_limits(1):
        for label, (h, d, k) in SHAPES.items():
            a = factors(h, d, k)
            ref_qr = qr_numpy(a)
            core = ref_qr[1] @ np.swapaxes(qr_numpy(factors(h, d, k, seed=1))[1], -1, -2)  # (H, K, K) R_a R_bᵀ
            ref_svd = svd_numpy(core)
            qr_err = {n: check_qr(a, ref_qr, f(a)) for n, f in qr_variants.items()}
            svd_err = {n: check_svd(ref_svd, f(core)) for n, f in svd_variants.items()}
            qr_t = run(qr_variants, a, args.rounds, args.reps)
            svd_t = run(svd_variants, core, args.rounds, args.reps)
            print(f"{label}: {h} heads, D {d}, K {k}")
            base = qr_t["numpy batched"]
            print(f"  thin QR of the {h} D×K factors (one of W_qᵀ, W_kᵀ):")
            for n, t in qr_t.items():
                print(f"    {n:36s} {t * 1e3:7.2f} ms  {base / t:5.2f}× numpy   max rel. error {qr_err[n]:.1e}")
            base = svd_t["numpy batched (gesdd)"]
            print(f"  SVD of the {h} K×K cores:")
            for n, t in svd_t.items():
                print(f"    {n:36s} {t * 1e3:7.2f} ms  {base / t:5.2f}× numpy   σ max rel. error {svd_err[n]:.1e}")
            print()


if __name__ == "__main__":
    main()
