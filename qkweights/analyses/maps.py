"""Projection maps of one image onto the query-key modes of one head (paper Fig. 1, 4, 5).

For head h of layer l with ``W_q,hᵀW_k,h = U Σ Vᵀ`` (:func:`qkweights.weights.qk.qk_svd`, the
profiles' sign convention) and the embeddings x_t of the patch tokens t:

* query map of mode n: ``x_t·u_n``; key map: ``x_t·v_n``, on the patch grid (gh, gw).
* x is the LayerNorm output that feeds W_q/W_k (``embedding="ln"``, the default; for it
  ``x_iᵀW_qᵀW_k x_j = Σ_n σ_n (x_i·u_n)(v_n·x_j)`` exactly) or the residual stream entering
  the block (``"residual"``, what the paper's public code projects).
* Shown sign: (u_n, v_n) and (−u_n, −v_n) are the same mode, and both signs are
  features. The sign shown is the one with the larger response
  ``max_t(s·x_t·u_n) · max_t(s·x_t·v_n)`` (s = ±1, patch tokens; + on ties) — the score
  that ``top-images`` ranks images by.
* Contribution of mode n to this image's attention logits in the head (``--top``, paper
  Fig. 5): ``c_n = σ_n · Σ_{i,j} a_ij (x_i·u_n)(v_n·x_j) / √K`` with the model's attention
  probabilities a_ij of the head, i over all query tokens (patches and special tokens),
  j over all key tokens, and x always the LayerNorm output (the logits' own input). Then
  ``Σ_n c_n = Σ_{i,j} a_ij · x_iᵀW_qᵀW_k x_j / √K``, the attention-weighted bilinear logit
  summed over query rows. Modes are ranked by ``|c_n|``.
* ``fold_ln`` (``maps --fold-ln``): the modes of the LayerNorm-folded ``Γ W_qᵀW_k Γ``
  (:mod:`qkweights.weights.fold`) projected on the normalised tokens n (the residual stream entering
  the block, normalised as the LayerNorm does before its gain and bias), so the decomposition
  stays exact: ``x̃_iᵀW_qᵀW_k x̃_j`` plus the bias terms = ``Σ_n σ_n (n_i·u_n)(v_n·n_j) + w_h·n_j``
  + terms constant along each softmax row. ``c_n`` uses n and the folded modes; the key-salience
  term's share ``Σ_{i,j} a_ij w_h·n_j / √K`` is ``Maps.salience_contribution``.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from qkweights.errors import InputError
from qkweights.outputs import write_npz
from qkweights.vision.preprocess import display_image
from qkweights.vision.threads import one_blas_thread
from qkweights.weights.modes import mode_source

EMBEDDINGS = {
    "ln": "LayerNorm output feeding W_q/W_k (attention_inputs[l])",
    "residual": "residual stream entering the block (hidden_states[l])",
    "normalised": "normalised token n = (x̃ − β)/γ entering the LayerNorm-folded modes of Γ W_qᵀW_k Γ",
}
DEFAULT_MODES = 6
SIGN_CHARS = {1: "+", -1: "−"}


@dataclass(frozen=True)
class Maps:
    """Projection maps of one image on N modes of one head.

    query, key: (N, gh, gw) float64 raw projections x_t·u_n and x_t·v_n (u, v in the
    profiles' sign convention; the sign shown is ``signs``). modes: (N,) mode indices;
    signs: (N,) ±1; singular_values, cosines: (N,) σ_n (of the unscaled W_qᵀW_k) and
    u_n·v_n; contributions: (N,) c_n (module docstring). image: (H, W, 3) the model input
    in [0, 1]; patch_size: pixels per patch. ranked: True when the modes are the top |c_n|.
    source: the provenance record of the weights (model id, commit, files and sha256, as in
    profile.json); image_path: the image file, None for an image given as an array or PIL image.
    """

    model_id: str
    layer: int
    head: int
    embedding: str
    modes: np.ndarray
    signs: np.ndarray
    singular_values: np.ndarray
    cosines: np.ndarray
    contributions: np.ndarray
    query: np.ndarray
    key: np.ndarray
    image: np.ndarray
    patch_size: int
    ranked: bool
    source: dict = field(default_factory=dict)
    image_path: str | None = None
    salience_contribution: float | None = None  # Σ_ij a_ij w_h·n_j / √K with fold_ln, else None

    @property
    def stem(self) -> str:
        """``maps_L{l}_H{h}_{embedding}``: the name of the saved maps and of their figure, without the suffix."""
        return f"maps_L{self.layer}_H{self.head}_{self.embedding}"

    def save(self, out_dir) -> list[Path]:
        """Write ``maps_L{l}_H{h}_{embedding}.npz`` into ``out_dir`` (the figure is
        :func:`qkweights.figures.maps.draw_maps`'s); return its path in a list.

        The embedding is part of the name, so ``ln`` and ``residual`` maps of one head never
        overwrite each other. The npz holds query, key (N, gh, gw), modes, signs,
        singular_values, cosines, contributions (N,), embedding (str), layer, head,
        patch_size, image (H, W, 3), the provenance: model_id, source (the JSON record of
        the weights: commit, files, sha256) and image_path ("" for an in-memory image); with
        ``fold_ln`` also salience_contribution.
        """
        return [
            write_npz(
                Path(out_dir) / f"{self.stem}.npz",
                query=self.query,
                key=self.key,
                modes=self.modes,
                signs=self.signs,
                singular_values=self.singular_values,
                cosines=self.cosines,
                contributions=self.contributions,
                embedding=np.array(self.embedding),
                layer=np.array(self.layer),
                head=np.array(self.head),
                patch_size=np.array(self.patch_size),
                image=self.image.astype(np.float32),
                model_id=np.array(self.model_id),
                source=np.array(json.dumps(self.source, ensure_ascii=False)),
                image_path=np.array(self.image_path or ""),
                **(
                    {}
                    if self.salience_contribution is None
                    else {"salience_contribution": np.array(self.salience_contribution)}
                ),
            )
        ]


def choose_signs(query: np.ndarray, key: np.ndarray) -> np.ndarray:
    """The sign each mode is shown in: −1 where ``min_t q · min_t k > max_t q · max_t k``, else +1.

    query, key: (N, T) projections x_t·u_n, x_t·v_n over patch tokens. The two
    products are ``max_t(s·q)·max_t(s·k)`` for s = +1 and s = −1. Returns (N,) int.
    """
    plus = query.max(axis=1) * key.max(axis=1)  # (N,)
    minus = query.min(axis=1) * key.min(axis=1)  # (N,) = max(−q)·max(−k)
    return np.where(minus > plus, -1, 1)


def contributions(x: np.ndarray, attn: np.ndarray, u: np.ndarray, s: np.ndarray, v: np.ndarray) -> np.ndarray:
    """c_n = σ_n · Σ_{i,j} a_ij (x_i·u_n)(v_n·x_j) / √K for every mode of one head.

    x: (T, D) LayerNorm output; attn: (T, T) attention probabilities (rows = queries);
    u, v: (D, K); s: (K,). Returns (K,) float64.
    """
    p = x @ u  # (T, K) x_i·u_n
    q = x @ v  # (T, K) x_j·v_n
    return s * np.einsum("in,in->n", p, attn @ q) / math.sqrt(u.shape[1])


def _check(model, layer: int, head: int, modes, top, embedding: str) -> None:
    d = model.dims
    if embedding not in EMBEDDINGS:
        raise InputError(f"embedding {embedding!r} is not one of {', '.join(EMBEDDINGS)}")
    if not 0 <= layer < d.layers:
        raise InputError(f"layer {layer} is out of range: the model has {d.layers} layers (0–{d.layers - 1})")
    if not 0 <= head < d.heads:
        raise InputError(f"head {head} is out of range: the model has {d.heads} heads (0–{d.heads - 1})")
    if modes is not None and top is not None:
        raise InputError("give either modes or top, not both")
    if top is not None and not 1 <= top <= d.head_dim:
        raise InputError(f"top {top} is out of range: a head has {d.head_dim} modes; give 1–{d.head_dim}")
    bad = [n for n in (modes or ()) if not 0 <= n < d.head_dim]
    if bad:
        raise InputError(f"mode {bad[0]} is out of range: a head has {d.head_dim} modes (0–{d.head_dim - 1})")


def projection_maps(
    model,
    image,
    *,
    layer: int,
    head: int,
    modes=None,
    top: int | None = None,
    embedding: str = "ln",
    fold_ln: bool = False,
) -> Maps:
    """Query and key maps of ``image`` on modes of head ``head`` of layer ``layer`` (0-based).

    model: a :class:`qkweights.vision.model.VisionModel`; image: a path, PIL image or uint8
    array (preprocessed with the model's own preprocessing). modes: mode indices (default
    the first 6, clipped to the head dim) or top: the ``top`` modes of largest |c_n|, in
    that order. embedding: "ln" or "residual" (module docstring). fold_ln: the LayerNorm-folded
    modes on the normalised tokens n (module docstring; embedding must stay "ln").
    """
    modes = None if modes is None else [int(n) for n in modes]
    _check(model, layer, head, modes, top, embedding)
    if fold_ln and embedding != "ln":
        raise InputError("fold_ln=True projects the normalised tokens n onto the folded modes; drop embedding=residual")
    source = mode_source(model.checkpoint, fold_ln=fold_ln)
    with one_blas_thread():  # the float64 math of the maps, whatever the thread count
        pixels = model.preprocess(image)  # (1, 3, H, W)
        out = model.forward(pixels, attentions=True, layers=[layer])
        x_ln = source.tokens_of(out, layer)[0].astype(np.float64)  # (T, D) the logits' input: x̃, or n when folded
        x = x_ln if embedding == "ln" else out.hidden_states[layer][0].astype(np.float64)
        embedding = source.tokens if embedding == "ln" else embedding
        attn = out.attentions[layer][0, head].astype(np.float64)  # (T, T)
        m = source.head(layer, head)
        u, s, v = m.u, m.s, m.v  # (D, K), (K,), (D, K)
        salience = None
        if m.salience is not None:  # folded modes: the key-salience term's share, Σ_ij a_ij w·n_j / √K
            salience = float(attn.sum(0) @ (x @ m.salience) / math.sqrt(u.shape[1]))
        c = contributions(x_ln, attn, u, s, v)  # (K,)
        if top is not None:
            chosen = np.argsort(-np.abs(c), kind="stable")[:top]
        else:
            chosen = np.array(modes if modes is not None else range(min(DEFAULT_MODES, s.size)), dtype=int)
        lay = out.layout
        gh, gw = lay.grid
        xp = x[lay.patches]  # (N_patches, D)
        query = (xp @ u[:, chosen]).T  # (N, N_patches)
        key = (xp @ v[:, chosen]).T
        prep = model.preprocessing
        from qkweights.specs.load import source_record

        return Maps(
            model_id=model.source.model_id if model.source is not None else model.checkpoint.spec.name,
            layer=layer,
            head=head,
            embedding=embedding,
            modes=chosen,
            signs=choose_signs(query, key),
            singular_values=s[chosen],
            cosines=np.einsum("dn,dn->n", u[:, chosen], v[:, chosen]),
            contributions=c[chosen],
            query=query.reshape(-1, gh, gw),
            key=key.reshape(-1, gh, gw),
            image=display_image(pixels[0], prep.mean, prep.std, prep.rescale),
            patch_size=model.weights.embeddings.patch_size,
            ranked=top is not None,
            source=source_record(model.source, model.checkpoint) if model.source is not None else {},
            image_path=str(Path(image).absolute()) if isinstance(image, (str, os.PathLike)) else None,
            salience_contribution=salience,
        )
