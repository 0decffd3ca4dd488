"""The query-key interaction of attention heads: exact SVD and its statistics.

For one head, ``W_q,hᵀ W_k,h = U Σ Vᵀ`` (D×D, rank ≤ K). Mode n pairs a query
direction ``u_n`` with a key direction ``v_n``; ``cos_n = u_n·v_n``. The SVD is
computed without forming the D×D product (method.md §3): thin QR of
``A = W_qᵀ`` and ``B = W_kᵀ`` (D×K each), SVD of the K×K core ``R_a R_bᵀ``,
then ``U = Q_a U_c``, ``V = Q_b V_c`` — O(D·K² + K³) per head, batched over
heads, in float64. Both LAPACK calls are numpy's batched ones: the K×K SVD
(gesdd) beats scipy looped (gesdd 0.89–0.96×, gesvd 0.5×); scipy's looped thin
QR is 1.05–1.16× faster on ViT-B/L shapes, a few per cent of a layer's math,
but importing scipy costs 0.4 s, ~13 MiB and a second OpenBLAS whose threads
are not limited with numpy's, so numpy keeps it (bench/bench_lapack.py; README).

Sign convention: the pair (u_n, v_n) is flipped together so that the entry of
largest magnitude of u_n is positive (the first such entry on ties). Flipping
both leaves the product, σ_n and cos_n unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

DEGENERATE_RTOL = 1e-6  # adjacent σ closer than this × σ_0 (the largest) form a degenerate block
SIGN_CONVENTION = "each (u_n, v_n) pair is flipped together so that the largest-magnitude entry of u_n is positive"


def qk_svd(wq: np.ndarray, wk: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """SVD of ``wqᵀ wk`` for a stack of heads, without the D×D product.

    wq, wk: (..., K, D) query and key weights (rows of the (out, in) projection).
    Returns U (..., D, K), S (..., K) descending, V (..., D, K), float64, with
    ``wq[h].T @ wk[h] == U[h] @ diag(S[h]) @ V[h].T`` and the sign convention of
    the module docstring.
    """
    a = np.swapaxes(np.asarray(wq, np.float64), -1, -2)  # (..., D, K)
    b = np.swapaxes(np.asarray(wk, np.float64), -1, -2)  # (..., D, K)
    qa, ra = np.linalg.qr(a)  # (..., D, K), (..., K, K)
    qb, rb = np.linalg.qr(b)
    core = ra @ np.swapaxes(rb, -1, -2)  # (..., K, K)
    uc, s, vct = np.linalg.svd(core)
    u = qa @ uc  # (..., D, K)
    v = qb @ np.swapaxes(vct, -1, -2)  # (..., D, K)
    u, v = _fix_signs(u, v)
    return u, s, v


def _fix_signs(u: np.ndarray, v: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Flip each (u_n, v_n) pair so that u_n's largest-magnitude entry is positive."""
    idx = np.argmax(np.abs(u), axis=-2)[..., None, :]  # (..., 1, K)
    sign = np.where(np.take_along_axis(u, idx, axis=-2) < 0, -1.0, 1.0)  # (..., 1, K)
    return u * sign, v * sign


@dataclass(frozen=True)
class HeadStats:
    """Statistics of a stack of heads (leading axes ``...``, e.g. (H,) or (L, H)).

    cosines: (..., K) ``u_n·v_n``; weighted: (...) σ-weighted mean cosine (the
    paper's cos_avg, NaN for a head with Σσ = 0); mean: (...) unweighted mean (NaN too);
    trace: (...) ``⟨W_q, W_k⟩_F = Σ σ_n cos_n``; nuclear: (...) Σσ_n;
    effective_rank: (...) exp of the entropy of σ/Σσ (Roy & Vetterli, 2007).
    """

    cosines: np.ndarray
    weighted: np.ndarray
    mean: np.ndarray
    trace: np.ndarray
    nuclear: np.ndarray
    effective_rank: np.ndarray


def head_stats(u: np.ndarray, s: np.ndarray, v: np.ndarray, wq: np.ndarray, wk: np.ndarray) -> HeadStats:
    """Per-mode cosines and per-head statistics from an SVD and the weights.

    u, v: (..., D, K); s: (..., K); wq, wk: (..., K, D). ``trace`` comes from the
    weights directly, so ``Σ σ_n cos_n == trace`` is an independent check.
    """
    cos = np.einsum("...dk,...dk->...k", u, v)  # (..., K)
    nuclear = s.sum(-1)
    with np.errstate(invalid="ignore", divide="ignore"):
        weighted = (s * cos).sum(-1) / nuclear
        p = s / nuclear[..., None]
        logp = np.log(np.where(p > 0, p, 1.0))
    effective_rank = np.exp(-(p * logp).sum(-1))
    trace = np.einsum("...kd,...kd->...", np.asarray(wq, np.float64), np.asarray(wk, np.float64))
    mean = np.where(nuclear > 0, cos.mean(-1), np.nan)  # W_qᵀW_k = 0: u, v are arbitrary, their cosines mean nothing
    return HeadStats(cos, weighted, mean, trace, nuclear, effective_rank)


def degenerate_blocks(s: np.ndarray, cos: np.ndarray, rtol: float = DEGENERATE_RTOL) -> list[dict]:
    """Runs of (nearly) equal singular values of one head.

    s, cos: (K,). Adjacent modes n, n+1 are tied when σ_n − σ_{n+1} ≤ rtol·σ_0 (the largest).
    Inside a tied block the individual u_n, v_n (and cos_n) are defined only up
    to a rotation; the block's sum of cosines is. Returns
    ``[{"start", "stop" (exclusive), "sigma" (mean), "cos_sum"}]``.
    """
    tol = rtol * (s[0] if s.size else 0.0)
    tied = np.diff(s) >= -tol  # (K-1,): σ_{n+1} ≥ σ_n − tol
    blocks, n = [], 0
    while n < len(tied):
        if tied[n]:
            stop = n + 1
            while stop < len(tied) and tied[stop]:
                stop += 1
            stop += 1
            blocks.append(
                {"start": n, "stop": stop, "sigma": float(s[n:stop].mean()), "cos_sum": float(cos[n:stop].sum())}
            )
            n = stop
        else:
            n += 1
    return blocks


def null_band(hidden: int, level: float = 0.95) -> float:
    """Half-width of the two-sided band of u·v for independent random unit vectors in R^hidden.

    cos ≈ N(0, 1/hidden), so the band is z/√hidden (z = 1.96 at 95%, 2.576 at 99%).
    """
    z = {0.95: 1.959963984540054, 0.99: 2.5758293035489004}[level]
    return z / np.sqrt(hidden)


# ---------------------------------------------------------------------------- beyond the paper
# Three weight-only analyses in the same exact, factored, float64 style (never a D×D matrix):
# the symmetry of W_qᵀW_k, the value-output circuit W_o,h W_v,h, and the LayerNorm/bias fold.


def symmetric_fraction(s: np.ndarray, wq: np.ndarray, wk: np.ndarray) -> np.ndarray:
    """``‖(M + Mᵀ)/2‖_F² / ‖M‖_F²`` of ``M = wqᵀ wk`` for a stack of heads, in [0, 1].

    s: (..., K) the singular values of M; wq, wk: (..., K, D). With ``‖M‖_F² = Σσ_n²``
    and ``tr(M²) = tr((wk wqᵀ)²)`` (a K×K product): ``(1 + tr(M²)/‖M‖_F²)/2``. 1 for a
    symmetric M (W_q = W_k), 0 for an antisymmetric one, ½ on average for independent
    random factors (up to O(1/D), :func:`symmetric_null`). Basis-free. NaN where M = 0.
    """
    g = np.asarray(wk, np.float64) @ np.swapaxes(np.asarray(wq, np.float64), -1, -2)  # (..., K, K) W_k W_qᵀ
    tr2 = np.einsum("...ij,...ji->...", g, g)  # (...) tr(M²)
    frob2 = (np.asarray(s, np.float64) ** 2).sum(-1)  # (...) ‖M‖_F²
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(frob2 > 0, (1 + tr2 / frob2) / 2, np.nan)


def symmetric_null(hidden: int, head_dim: int) -> float:
    """The null reference of :func:`symmetric_fraction`: independent random factors W_q, W_k.

    Derived, for i.i.d. N(0, 1) entries of W_q, W_k (K×D): ``E tr(M²) = K·D`` and
    ``E ‖M‖_F² = K·D²`` (only the pairings δ_ik δ_jl survive), so the ratio of
    expectations is ``½ + 1/(2D)`` — ½ up to O(1/D), independent of K
    (tests/test_circuits.py checks it by simulation).
    """
    del head_dim  # the leading term does not depend on K
    return 0.5 + 0.5 / hidden


def ov_svd(wo: np.ndarray, wv: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """SVD ``P Λ Rᵀ`` of the value-output circuit ``M_ov = wo wv`` for a stack of heads.

    wo: (..., D, K) the head's columns h·K … (h+1)·K−1 of the output projection (out, in);
    wv: (..., K, D) the head's rows of the value projection. ``M_ov`` (D×D, rank ≤ K)
    maps the token a head reads (input direction r_n) to what it writes (output direction
    p_n): ``cos_n = p_n·r_n`` ≈ 1 copies a feature, < 0 suppresses it. The same QR-core as
    :func:`qk_svd` (``M_ov = (woᵀ)ᵀ wv``) and the same sign convention (p_n plays u_n).
    Returns P (..., D, K), Λ (..., K) descending, R (..., D, K), float64; ``trace(M_ov) =
    ⟨woᵀ, wv⟩_F``, so ``head_stats(P, Λ, R, woᵀ, wv)`` gives its cosines and statistics.
    """
    return qk_svd(np.swapaxes(np.asarray(wo, np.float64), -1, -2), wv)


def fold_gain(w: np.ndarray, gamma: np.ndarray) -> np.ndarray:
    """Rows of ``Wᵀ`` (columns of W) scaled by the LayerNorm gain: ``W Γ`` with Γ = diag(γ).

    w: (..., K, D) query or key weights; gamma: (D,). Then
    ``(W_q Γ)ᵀ (W_k Γ) = Γ W_qᵀ W_k Γ``, the interaction of the normalised tokens n
    (x̃ = γ ⊙ n + β), whose SVD :func:`qk_svd` gives from the folded factors.
    """
    return np.asarray(w, np.float64) * np.asarray(gamma, np.float64)  # (..., K, D)


def key_salience(wq: np.ndarray, wk: np.ndarray, bq: np.ndarray, gamma: np.ndarray, beta: np.ndarray) -> np.ndarray:
    """The key-salience vector ``w_h = Γ W_k,hᵀ (W_q,h β + b_q,h)`` per head.

    wq, wk: (..., K, D); bq: (..., K); gamma, beta: (D,). With x̃ = γ ⊙ n + β,
    ``q_i·k_j = n_iᵀ Γ W_qᵀW_k Γ n_j + w_h·n_j + (terms of i alone) + const``: the
    only term the folded SVD misses that changes a softmax row. Returns (..., D),
    in the unscaled units of σ (the logits carry a further 1/√K).
    """
    wq, wk = np.asarray(wq, np.float64), np.asarray(wk, np.float64)
    c = np.einsum("...kd,d->...k", wq, np.asarray(beta, np.float64)) + np.asarray(
        bq, np.float64
    )  # (..., K) W_q β + b_q
    return np.einsum("...kd,...k->...d", wk, c) * np.asarray(gamma, np.float64)  # (..., D)
