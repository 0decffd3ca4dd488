"""Computing the weight profile of a checkpoint: every head's query-key SVD, layer by layer.

:func:`compute_profile` walks the layers one at a time (memory bounded by a few layers' weights)
and returns a :class:`~qkweights.weights.profile.Profile`. Whether it profiles ``W_qᵀW_k`` or the
LayerNorm-folded ``Γ W_qᵀW_k Γ`` is decided once, by the :class:`~qkweights.weights.modes.ModeSource`
it makes.
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Callable

import numpy as np
from threadpoolctl import threadpool_limits

from qkweights.specs.checkpoint import Checkpoint
from qkweights.weights.modes import LayerWeights, ModeSource, mode_source
from qkweights.weights.profile import ModelInfo, OVProfile, Profile
from qkweights.weights.qk import HeadStats, degenerate_blocks, head_stats, ov_svd, qk_svd, symmetric_fraction


@dataclass(frozen=True)
class _Layer:
    """The results of one layer: arrays over its H heads (NaN where the weights are not finite)."""

    ok: np.ndarray  # (H,) finite heads
    stats: HeadStats | None
    s: np.ndarray | None  # (H_ok, K)
    u: np.ndarray | None  # (H_ok, D, K)
    v: np.ndarray | None
    symmetric: np.ndarray | None = None  # (H_ok,)
    salience: np.ndarray | None = None  # (H_ok,) ‖w_h‖ when folded
    ov_ok: np.ndarray | None = None  # (H,) heads with finite W_v, W_o; None: the circuit is unavailable
    ov_stats: HeadStats | None = None
    ov_s: np.ndarray | None = None  # (H_ov_ok, K)
    ov_why: str | None = None  # why the circuit is unavailable


def _profile_layer(source: ModeSource, l: int) -> _Layer:
    w = source.layer(l)
    wq, wk = w.wq, w.wk  # (H, K, D): W_q, W_k, or W Γ for the SVD of Γ W_qᵀW_k Γ
    ok = np.isfinite(wq).all(axis=(1, 2)) & np.isfinite(wk).all(axis=(1, 2))  # (H,)
    extra = _ov_layer(source.checkpoint, l, w)
    if not ok.any():
        return _Layer(ok, None, None, None, None, **extra)
    if not ok.all():
        wq, wk = wq[ok], wk[ok]
    u, s, v = qk_svd(wq, wk)
    salience = w.salience(ok)  # (H_ok, D) w_h, or None
    if salience is not None:
        salience = np.linalg.norm(salience, axis=-1)  # (H_ok,)
    return _Layer(ok, head_stats(u, s, v, wq, wk), s, u, v, symmetric_fraction(s, wq, wk), salience, **extra)


def _ov_layer(ck: Checkpoint, l: int, w: LayerWeights) -> dict:
    """The value-output circuit of layer ``l``'s heads, as keyword fields of :class:`_Layer`.

    Its value weights are read as ``w`` reads the tokens (:meth:`~qkweights.weights.modes.LayerWeights.value`):
    ``W_o,h W_v,h Γ`` for folded modes (the circuit of the normalised tokens n, as the query-key fold), else the
    plain circuit.
    """
    if not hasattr(ck, "ov_unavailable"):  # a duck-typed checkpoint offering W_q/W_k only
        return {"ov_why": "the checkpoint object gives no value/output weights"}
    why = ck.ov_unavailable(l)
    if why is not None:
        return {"ov_why": why}
    ov = ck.ov(l)
    wv = w.value(ov.wv)  # (H, K, D) W_v, or W_v Γ: the SVD of W_o W_v Γ
    ok = np.isfinite(ov.wo).all(axis=(1, 2)) & np.isfinite(wv).all(axis=(1, 2))  # (H,)
    if not ok.any():
        return {"ov_ok": ok}
    wo, wv = (ov.wo, wv) if ok.all() else (ov.wo[ok], wv[ok])  # (H_ok, D, K), (H_ok, K, D)
    p, lam, r = ov_svd(wo, wv)
    return {"ov_ok": ok, "ov_stats": head_stats(p, lam, r, np.swapaxes(wo, -1, -2), wv), "ov_s": lam}


def compute_profile(
    ck: Checkpoint,
    source: dict,
    *,
    save_vectors: bool = False,
    progress: Callable[[int, int], None] | None = None,
    workers: int | None = None,
    fold_ln: bool = False,
) -> Profile:
    """Profile every head of ``ck``, layer by layer.

    Beyond the paper, each head gets its ``symmetric_fraction`` and its value-output circuit
    (``Profile.ov``; unavailable, with the reason in ``model.ov``, when the spec cannot give
    W_v/W_o per head). ``fold_ln``: profile the LayerNorm-folded ``Γ W_qᵀW_k Γ`` instead of
    ``W_qᵀW_k`` and add each head's key-salience norm (:mod:`qkweights.weights.fold`).

    Layers run on ``workers`` threads (default: min(2, CPU count)), each with
    single-threaded BLAS: LAPACK releases the GIL, and small batched LAPACK
    calls are fastest on one BLAS thread (bench/bench_profile.py). Memory stays
    bounded by ``workers`` layers' weights. ``progress(l, L)`` is called after
    each layer, in order. Heads with non-finite weights get NaN statistics and
    are listed in ``Profile.nonfinite``.
    """
    d = ck.dims
    L, H, K, D = d.layers, d.heads, d.head_dim, d.hidden
    S = np.full((L, H, K), np.nan)
    cos = np.full((L, H, K), np.nan)
    per_head = {k: np.full((L, H), np.nan) for k in ("weighted", "mean", "trace", "nuclear", "effective_rank")}
    U = np.full((L, H, D, K), np.nan) if save_vectors else None
    V = np.full((L, H, D, K), np.nan) if save_vectors else None
    degenerate = [[[] for _ in range(H)] for _ in range(L)]
    nonfinite = []
    modes = mode_source(ck, fold_ln=fold_ln)
    circuits = _Circuits.empty(L, H, K, salience=modes.folded is not None)
    workers = workers or min(2, os.cpu_count() or 1)
    with threadpool_limits(1), ThreadPoolExecutor(workers) as pool:
        pending = [pool.submit(_profile_layer, modes, l) for l in range(min(workers, L))]
        for l in range(L):
            layer = pending.pop(0).result()
            if l + workers < L:
                pending.append(pool.submit(_profile_layer, modes, l + workers))
            _merge_circuits(layer, l, circuits)
            ok = layer.ok
            nonfinite += [(l, h) for h in np.flatnonzero(~ok).tolist()]
            if layer.stats is not None:
                S[l, ok], cos[l, ok] = layer.s, layer.stats.cosines
                for key in per_head:
                    per_head[key][l, ok] = getattr(layer.stats, key)
                if save_vectors:
                    U[l, ok], V[l, ok] = layer.u, layer.v
                for j, h in enumerate(np.flatnonzero(ok)):
                    degenerate[l][h] = degenerate_blocks(layer.s[j], layer.stats.cosines[j])
            if progress:
                progress(l + 1, L)
    why = "; ".join(f"layer {l}: {w}" for l, w in circuits.why)
    ov_info = {
        "available": not circuits.why,
        "note": f"value-output circuit not computed ({why})" if why else modes.ov_convention,
    }
    model = ModelInfo(
        ck.spec.name,
        L,
        H,
        D,
        K,
        ck.dtype(),
        modes.omitted + tuple(ck.spec.logit_terms),
        modes.folded,
        modes.description(),
        ov_info,
    )
    return Profile(
        model,
        source,
        S,
        cos,
        per_head["weighted"],
        per_head["mean"],
        per_head["trace"],
        per_head["nuclear"],
        per_head["effective_rank"],
        degenerate,
        nonfinite,
        U,
        V,
        symmetric=circuits.symmetric,
        ov=OVProfile(circuits.ov_s, circuits.ov_cos, circuits.ov_weighted, circuits.ov_degenerate),
        salience=circuits.salience,
    )


@dataclass
class _Circuits:
    """Accumulators of the statistics beyond the paper, filled layer by layer (NaN where undefined)."""

    symmetric: np.ndarray  # (L, H)
    salience: np.ndarray | None  # (L, H)
    ov_s: np.ndarray  # (L, H, K)
    ov_cos: np.ndarray  # (L, H, K)
    ov_weighted: np.ndarray  # (L, H)
    ov_degenerate: list
    why: list  # [(layer, reason)] of layers without a value-output circuit

    @classmethod
    def empty(cls, L: int, H: int, K: int, *, salience: bool) -> _Circuits:
        return cls(
            np.full((L, H), np.nan),
            np.full((L, H), np.nan) if salience else None,
            np.full((L, H, K), np.nan),
            np.full((L, H, K), np.nan),
            np.full((L, H), np.nan),
            [[[] for _ in range(H)] for _ in range(L)],
            [],
        )


def _merge_circuits(layer: _Layer, l: int, c: _Circuits) -> None:
    if layer.symmetric is not None:
        c.symmetric[l, layer.ok] = layer.symmetric
    if layer.salience is not None:
        c.salience[l, layer.ok] = layer.salience
    if layer.ov_why is not None:
        c.why.append((l, layer.ov_why))
    if layer.ov_stats is not None:
        ok = layer.ov_ok
        c.ov_s[l, ok], c.ov_cos[l, ok], c.ov_weighted[l, ok] = (
            layer.ov_s,
            layer.ov_stats.cosines,
            layer.ov_stats.weighted,
        )
        for j, h in enumerate(np.flatnonzero(ok)):
            c.ov_degenerate[l][h] = degenerate_blocks(layer.ov_s[j], layer.ov_stats.cosines[j])
