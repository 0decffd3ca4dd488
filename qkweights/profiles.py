"""Weight profiles: the per-head query-key SVD of a whole checkpoint, and its files.

``compute_profile`` walks the layers one at a time (memory bounded by one
layer's weights), ``Profile`` holds the results as arrays with their metadata,
``Profile.save`` writes ``profile.json``, ``heads.csv`` and (with vectors)
``modes.npz``; ``load_profile`` reads them back.
"""

from __future__ import annotations

import json
import os
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
from threadpoolctl import threadpool_limits

from qkweights import __version__
from qkweights.errors import InputError
from qkweights.outputs import dumps_json, write_csv, write_json, write_npz
from qkweights.qk import DEGENERATE_RTOL, HeadStats, degenerate_blocks, head_stats, null_band, qk_svd
from qkweights.spec import Checkpoint

SCHEMA = "qkweights.profile/1"
OMITTED = ("query and key biases (b_qᵀW_k x_j is a per-key salience term)", "LayerNorm gain and bias (they act before W_q/W_k)")
SIGN_CONVENTION = "each (u_n, v_n) pair is flipped together so that the largest-magnitude entry of u_n is positive"


@dataclass(frozen=True)
class ModelInfo:
    """What was profiled: family and dimensions (``dtype`` as stored, e.g. "F32")."""

    family: str
    layers: int
    heads: int
    hidden: int
    head_dim: int
    dtype: str
    omitted: tuple[str, ...] = OMITTED

    def to_json(self) -> dict:
        return {
            "family": self.family, "layers": self.layers, "heads": self.heads, "hidden": self.hidden,
            "head_dim": self.head_dim, "dtype": self.dtype, "logit_scale": 1 / np.sqrt(self.head_dim),
            "weight_svd_omits": list(self.omitted),
        }


@dataclass(frozen=True)
class Profile:
    """Query-key SVD statistics of every head of a model.

    Arrays (L layers, H heads, K = head_dim modes), float64:
    ``singular_values`` (L, H, K) of the unscaled ``W_qᵀW_k`` (the logits carry a
    further 1/√K, ``model.to_json()["logit_scale"]``); ``cosines`` (L, H, K);
    ``weighted`` (L, H) σ-weighted cosine; ``mean`` (L, H); ``trace`` (L, H)
    ``⟨W_q, W_k⟩_F``; ``nuclear`` (L, H); ``effective_rank`` (L, H).
    ``degenerate[l][h]`` lists tied-σ blocks; ``nonfinite`` the (layer, head)
    pairs whose weights hold NaN/inf (their statistics are NaN).
    ``U``, ``V`` (L, H, D, K) only when computed with ``save_vectors``.
    """

    model: ModelInfo
    source: dict
    singular_values: np.ndarray
    cosines: np.ndarray
    weighted: np.ndarray
    mean: np.ndarray
    trace: np.ndarray
    nuclear: np.ndarray
    effective_rank: np.ndarray
    degenerate: list
    nonfinite: list = field(default_factory=list)
    U: np.ndarray | None = None
    V: np.ndarray | None = None
    tool_version: str = __version__

    @property
    def null_band_95(self) -> float:
        return float(null_band(self.model.hidden))

    @property
    def depth(self) -> np.ndarray:
        """Normalised layer index l/(L−1), (L,) — 0 for a one-layer model."""
        n = self.model.layers
        return np.arange(n) / max(n - 1, 1)

    def layer_stats(self) -> dict[str, np.ndarray]:
        """Per-layer mean/min/max/std over heads of the weighted cosine, and the mean unweighted cosine, each (L,)."""
        w = self.weighted
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN layers (non-finite weights) stay NaN
            return {
                "weighted_cosine": np.nanmean(w, 1), "mean_cosine": np.nanmean(self.mean, 1),
                "min": np.nanmin(w, 1), "max": np.nanmax(w, 1), "std": np.nanstd(w, 1),
            }

    def to_json(self) -> dict:
        """The ``profile.json`` document (schema ``qkweights.profile/1``)."""
        stats = self.layer_stats()
        layers = []
        for l in range(self.model.layers):
            heads = [
                {
                    "head": h,
                    "weighted_cosine": float(self.weighted[l, h]),
                    "mean_cosine": float(self.mean[l, h]),
                    "trace": float(self.trace[l, h]),
                    "nuclear_norm": float(self.nuclear[l, h]),
                    "effective_rank": float(self.effective_rank[l, h]),
                    "singular_values": self.singular_values[l, h].tolist(),
                    "cosines": self.cosines[l, h].tolist(),
                    "degenerate_blocks": self.degenerate[l][h],
                }
                for h in range(self.model.heads)
            ]
            layers.append({"layer": l, **{k: float(v[l]) for k, v in stats.items()}, "heads": heads})
        return {
            "schema": SCHEMA,
            "tool_version": self.tool_version,
            "source": self.source,
            "model": self.model.to_json(),
            "null_band_95": self.null_band_95,
            "sign_convention": SIGN_CONVENTION,
            "degenerate_rtol": DEGENERATE_RTOL,
            "nonfinite_heads": [{"layer": l, "head": h} for l, h in self.nonfinite],
            "layers": layers,
        }

    def save(self, out: str | Path, *, plots: bool = True) -> list[Path]:
        """Write profile.json, heads.csv, modes.npz (if vectors) and the figures into ``out``."""
        out = Path(out)
        written = [write_json(out / "profile.json", self.to_json())]
        rows = []
        for l in range(self.model.layers):
            for h in range(self.model.heads):
                rows.append([l, h, _num(self.weighted[l, h]), _num(self.mean[l, h]), _num(self.trace[l, h]),
                             _num(self.nuclear[l, h]), _num(self.effective_rank[l, h]),
                             _num(self.singular_values[l, h, 0]), len(self.degenerate[l][h])])
        written.append(write_csv(out / "heads.csv", ["layer", "head", "weighted_cosine", "mean_cosine", "trace", "nuclear_norm", "effective_rank", "sigma_0", "degenerate_blocks"], rows))
        if self.U is not None:
            written.append(write_npz(out / "modes.npz", U=self.U, V=self.V, S=self.singular_values))
        if plots:
            from qkweights import figures

            written += figures.profile_figures(self, out)
        return written

    def json_text(self) -> str:
        return dumps_json(self.to_json())


def _num(x: float) -> str:
    return repr(float(x)) if np.isfinite(x) else ""


@dataclass(frozen=True)
class _Layer:
    """The results of one layer: arrays over its H heads (NaN where the weights are not finite)."""

    ok: np.ndarray  # (H,) finite heads
    stats: HeadStats | None
    s: np.ndarray | None  # (H_ok, K)
    u: np.ndarray | None  # (H_ok, D, K)
    v: np.ndarray | None


def _profile_layer(ck: Checkpoint, l: int) -> _Layer:
    qk = ck.qk(l)
    ok = np.isfinite(qk.wq).all(axis=(1, 2)) & np.isfinite(qk.wk).all(axis=(1, 2))  # (H,)
    if not ok.any():
        return _Layer(ok, None, None, None, None)
    wq, wk = (qk.wq, qk.wk) if ok.all() else (qk.wq[ok], qk.wk[ok])
    u, s, v = qk_svd(wq, wk)
    return _Layer(ok, head_stats(u, s, v, wq, wk), s, u, v)


def compute_profile(ck: Checkpoint, source: dict, *, save_vectors: bool = False,
                    progress: Callable[[int, int], None] | None = None, workers: int | None = None) -> Profile:
    """Profile every head of ``ck``, layer by layer.

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
    workers = workers or min(2, os.cpu_count() or 1)
    with threadpool_limits(1), ThreadPoolExecutor(workers) as pool:
        pending = [pool.submit(_profile_layer, ck, l) for l in range(min(workers, L))]
        for l in range(L):
            layer = pending.pop(0).result()
            if l + workers < L:
                pending.append(pool.submit(_profile_layer, ck, l + workers))
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
    model = ModelInfo(ck.spec.name, L, H, D, K, ck.dtype(), OMITTED + tuple(ck.spec.logit_terms))
    return Profile(model, source, S, cos, per_head["weighted"], per_head["mean"], per_head["trace"],
                   per_head["nuclear"], per_head["effective_rank"], degenerate, nonfinite, U, V)


def load_profile(path: str | Path) -> Profile:
    """Read a saved profile: ``profile.json`` or the folder holding it (with ``modes.npz`` if present)."""
    path = Path(path)
    if path.is_dir():
        path = path / "profile.json"
    try:
        doc = json.loads(path.read_text())
    except FileNotFoundError:
        raise InputError(f"{path}: no such profile; write one with `python -m qkweights profile MODEL --out DIR`") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise InputError(f"{path}: not a readable profile.json ({e}); re-run `python -m qkweights profile`") from None
    if not isinstance(doc, dict) or doc.get("schema") != SCHEMA:
        raise InputError(f"{path}: not a qkweights profile (schema {doc.get('schema') if isinstance(doc, dict) else None!r}, expected {SCHEMA!r})")
    m = doc["model"]
    model = ModelInfo(m["family"], m["layers"], m["heads"], m["hidden"], m["head_dim"], m["dtype"], tuple(m.get("weight_svd_omits", OMITTED)))

    def grid(key):
        return np.array([[np.nan if hd[key] is None else hd[key] for hd in ly["heads"]] for ly in doc["layers"]], dtype=np.float64)

    def modes(key):
        return np.array([[[np.nan if x is None else x for x in hd[key]] for hd in ly["heads"]] for ly in doc["layers"]], dtype=np.float64)

    U = V = None
    npz = path.parent / "modes.npz"
    if npz.exists():
        with np.load(npz) as z:
            U, V = z["U"], z["V"]
    return Profile(
        model, doc["source"], modes("singular_values"), modes("cosines"), grid("weighted_cosine"), grid("mean_cosine"),
        grid("trace"), grid("nuclear_norm"), grid("effective_rank"),
        [[hd["degenerate_blocks"] for hd in ly["heads"]] for ly in doc["layers"]],
        [(x["layer"], x["head"]) for x in doc.get("nonfinite_heads", [])], U, V, doc.get("tool_version", "?"),
    )
