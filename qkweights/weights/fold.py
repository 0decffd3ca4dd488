"""LayerNorm- and bias-aware query-key interaction: the fold of ``profile --fold-ln``.

With the block's pre-attention LayerNorm ``x̃ = γ ⊙ n + β`` (n the normalised token,
``(x − mean)/√(var + eps)``) and the attention biases, for head h::

    q_i·k_j = n_iᵀ Γ W_qᵀ W_k Γ n_j  +  w_h·n_j  +  (terms of i alone)  +  const
    w_h = Γ W_kᵀ (W_q β + b_q)                          (the key-salience vector)

with Γ = diag(γ). Terms of the query token alone cancel in the softmax. The folded
matrix ``Γ W_qᵀ W_k Γ`` is the query-key interaction of n; its SVD comes from the factors
``W_q Γ``, ``W_k Γ`` (:func:`qkweights.weights.qk.fold_gain`) by the same QR-core as the plain one.

The value-output circuit reads the same x̃ through W_v, so head h writes::

    W_o,h (W_v,h x̃_j + b_v,h) = W_o,h W_v,h Γ n_j  +  W_o,h (W_v,h β + b_v,h)

The folded circuit is ``W_o,h W_v,h Γ`` (Γ on its input side only: its output is the
residual stream, not normalised); the second term is the same for every token, and as each
attention row sums to 1 it is a constant the head adds, not part of the circuit.

Families without a pre-attention LayerNorm in their spec (``[block] norm1``: post-norm
BERT, weights-only predictors) fold what exists: Γ = I, β = 0, and ``w_h = W_kᵀ b_q``;
:func:`fold_description` says so. A norm stored without bias folds γ only (β = 0).

For ``top-images --fold-ln`` (and any other image analysis) :func:`folded_modes` gives
the folded (u, σ, v) and w_h of chosen heads of a layer, and :func:`normalised_tokens`
the n they apply to, from the LayerNorm output or from the residual stream.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from qkweights.errors import InputError
from qkweights.specs.checkpoint import Checkpoint
from qkweights.weights.qk import fold_gain, key_salience, qk_svd

FOLDED = "layernorm"


@dataclass(frozen=True)
class FoldedModes:
    """Folded query-key modes of some heads of one layer (float64).

    ``heads``: (H',) head indices; ``u``, ``v``: (H', D, K) and ``s``: (H', K), the SVD of
    ``Γ W_q,hᵀ W_k,h Γ`` in the profiles' sign convention; ``salience``: (H', D) the
    key-salience vectors w_h; ``gamma``, ``beta``: (D,) the LayerNorm folded (ones and
    zeros when the layer has none: then ``layernorm`` is False).
    """

    layer: int
    heads: np.ndarray
    u: np.ndarray
    s: np.ndarray
    v: np.ndarray
    salience: np.ndarray
    gamma: np.ndarray
    beta: np.ndarray
    layernorm: bool


def layer_fold(ck: Checkpoint, layer: int) -> tuple[np.ndarray, np.ndarray, bool, bool]:
    """(γ (D,), β (D,), has LayerNorm, has LayerNorm bias) of ``layer``'s pre-attention norm; γ = 1, β = 0 without
    one."""
    norm = ck.norm1(layer)
    d = ck.dims.hidden
    if norm is None:
        return np.ones(d), np.zeros(d), False, False
    return norm.gamma, norm.beta, True, norm.has_bias


def folded_modes(ck: Checkpoint, layer: int, heads=None) -> FoldedModes:
    """The folded modes and key-salience vectors of ``heads`` (default all) of ``layer``.

    The decomposition of head h's logits (before the 1/√K scale) of normalised tokens
    n_i, n_j is exact: ``Σ_n σ_n (n_i·u_n)(v_n·n_j) + w_h·n_j`` plus terms constant along
    each softmax row. This is what ``top-images --fold-ln`` should score, on n from
    :func:`normalised_tokens`.
    """
    qk = ck.qk(layer)  # (H, K, D)
    H = ck.dims.heads
    heads = np.arange(H) if heads is None else np.asarray(heads, dtype=int).reshape(-1)
    if heads.size and (heads.min() < 0 or heads.max() >= H):
        raise InputError(
            f"head {int(heads[(heads < 0) | (heads >= H)][0])} is out of range: the model has {H} heads (0–{H - 1})"
        )
    gamma, beta, has_norm, _ = layer_fold(ck, layer)
    wq, wk, bq = qk.wq[heads], qk.wk[heads], qk.bq[heads]
    u, s, v = qk_svd(fold_gain(wq, gamma), fold_gain(wk, gamma))
    return FoldedModes(layer, heads, u, s, v, key_salience(wq, wk, bq, gamma, beta), gamma, beta, has_norm)


def normalised_tokens(
    x: np.ndarray, *, gamma: np.ndarray | None = None, beta: np.ndarray | None = None, eps: float | None = None
) -> np.ndarray:
    """The normalised tokens n (…, D) the folded modes apply to, float64.

    Either from the LayerNorm output x̃ (``attention_inputs[l]`` of the forward pass) with
    its γ, β: ``n = (x̃ − β)/γ`` (inexact where γ ≈ 0); or, with ``eps`` and no γ/β, from the
    residual stream entering the block (``hidden_states[l]``): ``n = (x − mean)/√(var + eps)``
    over the last axis, biased variance, as the LayerNorm computes it (exact for every γ).
    """
    x = np.asarray(x, np.float64)
    if eps is not None:
        if gamma is not None or beta is not None:
            raise InputError(
                "normalised_tokens: give either gamma and beta (from the LayerNorm output) or eps (from the "
                "residual stream)"
            )
        mean = x.mean(-1, keepdims=True)
        var = ((x - mean) ** 2).mean(-1, keepdims=True)
        return (x - mean) / np.sqrt(var + eps)
    if gamma is None or beta is None:
        raise InputError(
            "normalised_tokens: give gamma and beta (from the LayerNorm output) or eps (from the residual stream)"
        )
    return (x - beta) / gamma


def fold_description(ck: Checkpoint) -> dict:
    """What ``--fold-ln`` folds for this checkpoint: ``model.fold`` of profile.json.

    ``{"layernorm_gain": bool, "layernorm_bias": bool, "query_bias": bool, "value_output": true,
    "layers_without_norm": [l…], "includes": [text…], "notes": [text…]}``, judged over every layer.
    ``value_output``: the value-output circuit is folded too (``W_o,h W_v,h Γ``); profiles written
    before it was lack the key, and their value-output circuit is the plain one.
    """
    L = ck.dims.layers
    found = [layer_fold(ck, l)[2:] for l in range(L)]  # (has norm, has bias) per layer
    without = [l for l, (n, _) in enumerate(found) if not n]
    no_bias = [l for l, (n, b) in enumerate(found) if n and not b]
    qbias = any(ck.qk(l).bq.any() for l in range(L))
    includes, notes = [], []
    if len(without) < L:
        includes.append("LayerNorm gain γ in the bilinear term Γ W_qᵀW_k Γ (σ, cosines and every query-key statistic)")
        includes.append(
            "LayerNorm gain γ on the input side of the value-output circuit W_o,h W_v,h Γ (λ, cosines, weighted cosine)"
        )
        includes.append(
            "LayerNorm bias β in the key-salience term w_h = Γ W_kᵀ(W_q β + b_q)"
            if len(no_bias) < L - len(without)
            else "no LayerNorm bias (the norm stores none: β = 0)"
        )
    includes.append(
        "query bias b_q in the key-salience term" if qbias else "query bias (zero or absent in this checkpoint)"
    )
    if without:
        where = "any layer" if len(without) == L else "layers " + ", ".join(map(str, without))
        notes.append(
            f"{ck.spec.label}: the spec gives no pre-attention LayerNorm ([block] norm1) for {where} "
            f"(post-norm or weights-only family): γ = 1, β = 0 there, only the query bias is folded (w_h = W_kᵀ b_q)"
        )
    if no_bias:
        notes.append("norm without bias (RMSNorm-style) in layers " + ", ".join(map(str, no_bias)) + ": β = 0")
    notes.append("key bias b_k and terms of the query token alone are constant along each softmax row and are left out")
    notes.append(
        "the value-output circuit's constant W_o,h(W_v,h β + b_v,h), the same for every token, is left out of it"
    )
    return {
        "layernorm_gain": len(without) < L,
        "layernorm_bias": len(no_bias) < L - len(without),
        "query_bias": bool(qbias),
        "value_output": True,
        "layers_without_norm": without,
        "includes": includes,
        "notes": notes,
    }
