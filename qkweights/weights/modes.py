"""Which query-key modes are read: those of ``W_qᵀW_k`` or the LayerNorm-folded ``Γ W_qᵀW_k Γ``, decided once.

``--fold-ln`` changes what every consumer of the modes reads, in the same few ways: the factors
whose product is decomposed (W_q, W_k or W_q Γ, W_k Γ), the key-salience vectors (folded
only), the value weights of the value-output circuit (W_v or W_v Γ), the tokens the modes
apply to in a forward pass (the LayerNorm output x̃, or the normalised tokens n), and the
words that say so in the outputs. :func:`mode_source` makes a :class:`PlainSource` or a
:class:`FoldedSource` from a checkpoint once; the profile (:mod:`qkweights.weights.compute`)
and the image analyses ask it, and never test the flag again. The math of the fold is
:mod:`qkweights.weights.fold`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import numpy as np

from qkweights.specs.checkpoint import QK, Checkpoint
from qkweights.weights.fold import FOLDED, fold_description, folded_modes, layer_fold, normalised_tokens
from qkweights.weights.qk import fold_gain, key_salience, qk_svd

OMITTED = (
    "query and key biases (b_qᵀW_k x_j is a per-key salience term)",
    "LayerNorm gain and bias (they act before W_q/W_k)",
)
OMITTED_FOLDED = (
    "key bias and terms of the query token alone (constant along each softmax row)",
    "the key-salience term w_h·n_j (reported as salience_norm = ‖w_h‖, not in the SVD)",
)
OV_CONVENTION = (
    "M_ov = W_o[:, hK:(h+1)K] W_v[hK:(h+1)K, :] = P Λ Rᵀ; cos_n = p_n·r_n; pairs (p_n, r_n) flipped together as (u_n, "
    "v_n)"
)
OV_CONVENTION_FOLDED = OV_CONVENTION.replace(
    "W_v[hK:(h+1)K, :]", "W_v[hK:(h+1)K, :] Γ (Γ = diag(γ) of the pre-attention LayerNorm: --fold-ln)"
)
LN_TOKENS = "attention_inputs[l]: the LayerNorm output feeding W_q/W_k"
NORMALISED_TOKENS = (
    "n: the normalised token (x − mean)/√(var + eps) of the residual stream entering block l, scored on the "
    "LayerNorm-folded modes of Γ W_qᵀW_k Γ (profile --fold-ln)"
)


@dataclass(frozen=True)
class Modes:
    """Query-key modes of one head or a stack of heads, float64, in the profiles' sign convention.

    ``u``, ``v``: (…, D, K); ``s``: (…, K) descending; ``salience``: (…, D) the key-salience
    vectors w_h of folded modes (:func:`qkweights.weights.fold.folded_modes`), None for plain ones.
    """

    u: np.ndarray
    s: np.ndarray
    v: np.ndarray
    salience: np.ndarray | None = None


@dataclass(frozen=True)
class LayerWeights:
    """One layer's weights as its modes read them.

    ``wq``, ``wk``: (H, K, D) the factors whose product ``wqᵀwk`` the modes decompose: W_q, W_k
    (plain) or W_q Γ, W_k Γ (folded). ``qk``: the layer's stored weights and biases. ``gamma``,
    ``beta``: (D,) the pre-attention LayerNorm folded (γ = 1, β = 0 where the layer has none;
    :func:`qkweights.weights.fold.layer_fold`), None for plain modes.
    """

    qk: QK
    wq: np.ndarray
    wk: np.ndarray
    gamma: np.ndarray | None = None
    beta: np.ndarray | None = None

    def salience(self, heads) -> np.ndarray | None:
        """(H', D) the key-salience vectors w_h of ``heads`` (an index or mask over H); None for plain modes, whose
        SVD keeps the biases out without a separate term."""
        if self.gamma is None:
            return None
        qk = self.qk
        return key_salience(qk.wq[heads], qk.wk[heads], qk.bq[heads], self.gamma, self.beta)

    def value(self, wv: np.ndarray) -> np.ndarray:
        """The value weights (H, K, D) as the value-output circuit reads the same tokens: W_v, or W_v Γ when folded."""
        return wv if self.gamma is None else fold_gain(wv, self.gamma)


@dataclass(frozen=True)
class ModeSource:
    """The query-key modes of a checkpoint's heads, and how to read them (made by :func:`mode_source`).

    Class attributes, the words and choices that follow from plain or folded: ``folded``
    (``model.folded`` of profile.json), ``omitted`` (what the SVD leaves out of the logits),
    ``ov_convention`` (what the value-output circuit is), ``tokens`` (the name of the tokens
    the modes apply to: "ln" or "normalised"), ``tokens_text`` (the same, in words) and
    ``keep`` (the forward-pass outputs :meth:`tokens_of` reads, as keyword options of
    :meth:`qkweights.vision.model.VisionModel.forward`).
    """

    checkpoint: Checkpoint

    folded: ClassVar[str | None]
    omitted: ClassVar[tuple[str, ...]]
    ov_convention: ClassVar[str]
    tokens: ClassVar[str]
    tokens_text: ClassVar[str]
    keep: ClassVar[dict[str, bool]]

    def layer(self, layer: int) -> LayerWeights:
        """The weights of ``layer`` as its modes read them."""
        raise NotImplementedError

    def modes(self, layer: int) -> Modes:
        """The modes of every head of ``layer``: (H, D, K), (H, K), (H, D, K)."""
        raise NotImplementedError

    def head(self, layer: int, head: int) -> Modes:
        """The modes of one head: (D, K), (K,), (D, K); ``salience`` (D,) or None."""
        raise NotImplementedError

    def tokens_of(self, out, layer: int) -> np.ndarray:
        """(B, T, D) the tokens of a forward pass's output ``out`` that the modes of ``layer`` apply to."""
        raise NotImplementedError

    def description(self) -> dict | None:
        """What the fold includes (``model.fold`` of profile.json), None for plain modes."""
        return None


class PlainSource(ModeSource):
    """The modes of ``W_q,hᵀW_k,h``, applied to the LayerNorm output x̃ that feeds W_q/W_k."""

    folded = None
    omitted = OMITTED
    ov_convention = OV_CONVENTION
    tokens = "ln"
    tokens_text = LN_TOKENS
    keep = {"hidden": False, "inputs": True}

    def layer(self, layer: int) -> LayerWeights:
        qk = self.checkpoint.qk(layer)
        return LayerWeights(qk, qk.wq, qk.wk)

    def modes(self, layer: int) -> Modes:
        qk = self.checkpoint.qk(layer)
        return Modes(*qk_svd(qk.wq, qk.wk))

    def head(self, layer: int, head: int) -> Modes:
        qk = self.checkpoint.qk(layer)
        return Modes(*qk_svd(qk.wq[head], qk.wk[head]))

    def tokens_of(self, out, layer: int) -> np.ndarray:
        return out.attention_inputs[layer]


class FoldedSource(ModeSource):
    """The modes of the LayerNorm-folded ``Γ W_q,hᵀW_k,h Γ`` and the key-salience vectors, applied to the normalised
    tokens n of the residual stream (exact whatever γ; :mod:`qkweights.weights.fold`)."""

    folded = FOLDED
    omitted = OMITTED_FOLDED
    ov_convention = OV_CONVENTION_FOLDED
    tokens = "normalised"
    tokens_text = NORMALISED_TOKENS
    keep = {"hidden": True, "inputs": False}

    def layer(self, layer: int) -> LayerWeights:
        qk = self.checkpoint.qk(layer)
        gamma, beta, _, _ = layer_fold(self.checkpoint, layer)
        return LayerWeights(qk, fold_gain(qk.wq, gamma), fold_gain(qk.wk, gamma), gamma, beta)

    def modes(self, layer: int) -> Modes:
        f = folded_modes(self.checkpoint, layer)
        return Modes(f.u, f.s, f.v, f.salience)

    def head(self, layer: int, head: int) -> Modes:
        f = folded_modes(self.checkpoint, layer, [head])
        return Modes(f.u[0], f.s[0], f.v[0], f.salience[0])

    def tokens_of(self, out, layer: int) -> np.ndarray:
        return normalised_tokens(out.hidden_states[layer], eps=self.checkpoint.dims.eps)

    def description(self) -> dict:
        return fold_description(self.checkpoint)


def mode_source(ck: Checkpoint, *, fold_ln: bool = False) -> ModeSource:
    """The modes of ``ck``'s heads: LayerNorm-folded with ``fold_ln`` (``--fold-ln``), else plain."""
    return FoldedSource(ck) if fold_ln else PlainSource(ck)
