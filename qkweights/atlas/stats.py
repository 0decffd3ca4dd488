"""The per-head numbers the atlas shows, taken from the results of one model (:class:`ModelResults`).

Every statistic is a (L, H) float array with NaN where no result holds it; :data:`COLUMNS` names
them, with how the model page colours them: the centre of the diverging map (the value a head
without structure would have) and, where one is defined, the null band around it.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from qkweights.analyses.o3 import MEASURES as O3_MEASURES
from qkweights.analyses.o3 import RATIOS as O3_RATIOS
from qkweights.atlas.collect import ModelResults
from qkweights.weights.qk import null_band, symmetric_null


@dataclass(frozen=True)
class Column:
    key: str
    title: str  # table header
    help: str  # what it is (the header's tooltip and the legend)
    digits: int = 3


COLUMNS = (
    Column("weighted_cosine", "weighted cos", "σ-weighted cosine Σσ_n u_n·v_n / Σσ_n of W_qᵀW_k"),
    Column("symmetric_fraction", "symmetric", "symmetric fraction ‖sym(W_qᵀW_k)‖²/‖W_qᵀW_k‖²"),
    Column("ov_weighted_cosine", "OV cos", "value-output λ-weighted cosine p·r"),
    Column("salience_norm", "key salience", "‖w_h‖ of the key-salience term (LayerNorm-folded profile only)"),
    Column("o3_same", "O3 same", "O3: attention to the same object (mean of target and distractor tokens)"),
    Column("o3_different", "O3 other", "O3: attention to the other object"),
    Column("o3_background", "O3 bg", "O3: attention to the background"),
    Column("same_object", "same-object P", "P(query and key directions pick the same object), σ-weighted"),
    Column("effective_rank", "eff. rank", "effective rank exp(entropy of σ/Σσ)", 2),
)


def head_stats(m: ModelResults) -> dict[str, np.ndarray]:
    """column key → (L, H) values (NaN where absent)."""
    shape = (m.layers, m.heads)
    out = {c.key: np.full(shape, np.nan) for c in COLUMNS}
    p = m.profile
    if p is not None:
        out["weighted_cosine"] = p.weighted
        out["effective_rank"] = p.effective_rank
        if p.symmetric is not None:
            out["symmetric_fraction"] = p.symmetric
        if p.ov is not None:
            out["ov_weighted_cosine"] = p.ov.weighted
        if p.salience is not None:
            out["salience_norm"] = p.salience
    if m.o3 is not None:
        v = m.o3.values  # (I, L, H, 6)
        for name, pair in O3_MEASURES.items():
            out[f"o3_{name}"] = v[..., list(pair)].mean(axis=(0, 3))
    if m.same_object is not None:
        for e in m.same_object.doc["layers"]:
            for h in e["heads"]:
                out["same_object"][e["layer"], h["head"]] = _num(h.get("probability"))
    return out


def centre_band(m: ModelResults, key: str, values: np.ndarray) -> tuple[float, float | None]:
    """(centre of the colour map, null-band half-width or None) of a statistic for this model."""
    hidden = m.model.get("hidden")
    if key in ("weighted_cosine", "ov_weighted_cosine"):
        return 0.0, float(null_band(hidden)) if hidden else None
    if key == "symmetric_fraction" and hidden and m.model.get("head_dim"):
        return float(symmetric_null(hidden, m.model["head_dim"])), None
    if key.startswith("o3_") and m.o3 is not None:
        return float(m.o3.doc["uniform"][key[3:]]), None
    if key == "same_object" and m.same_object is not None:
        chance = [_num(e.get("chance")) for e in m.same_object.doc["layers"]]
        return float(np.nanmean(chance)) if chance else 0.0, None
    finite = values[np.isfinite(values)]
    return (float(np.median(finite)) if finite.size else 0.0), None


def o3_head(m: ModelResults, layer: int, head: int) -> dict[str, dict[str, float]] | None:
    """This head's O3 ratios: {"target": {"same", "different", "background"}, "distractor": {…}} (means over images)."""
    if m.o3 is None:
        return None
    v = m.o3.values[:, layer, head, :].mean(axis=0)  # (6,)
    r = dict(zip(O3_RATIOS, v))
    return {
        "target": {"same": r["tt"], "different": r["td"], "background": r["tb"]},
        "distractor": {"same": r["dd"], "different": r["dt"], "background": r["db"]},
    }


def _num(x) -> float:
    return np.nan if x is None else float(x)
