"""Weight profiles: the per-head query-key SVD of a whole checkpoint, and its files.

``compute_profile`` walks the layers one at a time (memory bounded by one
layer's weights), ``Profile`` holds the results as arrays with their metadata,
``Profile.save`` writes ``profile.json``, ``heads.csv`` and (with vectors)
``modes.npz``; ``load_profile`` reads them back.
"""

from __future__ import annotations

import hashlib
import json
import os
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
from threadpoolctl import threadpool_limits

from qkweights.errors import InputError
from qkweights.outputs import (
    csv_number,
    dumps_json,
    model_name,
    plural,
    record_outputs,
    write_csv,
    write_npz,
    write_text,
)
from qkweights.specs.checkpoint import Checkpoint
from qkweights.version import __version__
from qkweights.weights.qk import (
    DEGENERATE_RTOL,
    HeadStats,
    degenerate_blocks,
    fold_gain,
    head_stats,
    key_salience,
    null_band,
    ov_svd,
    qk_svd,
    symmetric_fraction,
    symmetric_null,
)

SCHEMA = "qkweights.profile/2"
SCHEMAS = ("qkweights.profile/1", SCHEMA)  # what load_profile reads; /1 lacks symmetric_fraction, ov, salience_norm
OMITTED = (
    "query and key biases (b_qᵀW_k x_j is a per-key salience term)",
    "LayerNorm gain and bias (they act before W_q/W_k)",
)
SIGN_CONVENTION = "each (u_n, v_n) pair is flipped together so that the largest-magnitude entry of u_n is positive"
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
    folded: str | None = None  # "layernorm" for a profile of Γ W_qᵀW_k Γ (profile --fold-ln), else None
    fold: dict | None = None  # what the fold includes (qkweights.weights.fold.fold_description)
    ov: dict | None = None  # {"available": bool, "note": text}; None for a profile/1 (not computed)

    @property
    def ov_folded(self) -> bool:
        """Whether the value-output circuit is LayerNorm-folded, ``W_o,h W_v,h Γ``: every ``--fold-ln`` profile
        but those written before it was (``fold`` without ``value_output``), whose circuit is the plain one."""
        return bool(self.folded) and bool((self.fold or {}).get("value_output"))

    @property
    def shape(self) -> tuple[int, int, int, int]:
        """(layers L, heads H, width D, head dim K): what two profiles must share to be compared head by head."""
        return self.layers, self.heads, self.hidden, self.head_dim

    def shape_text(self) -> str:
        """ "vit, 12 layers × 12 heads, D = 768, K = 64"."""
        return (
            f"{self.family}, {plural(self.layers, 'layer')} × {plural(self.heads, 'head')}, D = {self.hidden}, K = "
            f"{self.head_dim}"
        )

    def to_json(self) -> dict:
        doc = {
            "family": self.family,
            "layers": self.layers,
            "heads": self.heads,
            "hidden": self.hidden,
            "head_dim": self.head_dim,
            "dtype": self.dtype,
            "logit_scale": 1 / np.sqrt(self.head_dim),
            "weight_svd_omits": list(self.omitted),
        }
        doc["folded"] = self.folded
        if self.fold is not None:
            doc["fold"] = self.fold
        if self.ov is not None:
            doc["ov"] = self.ov
        return doc


@dataclass(frozen=True)
class OVProfile:
    """The value-output circuit ``M_ov = W_o,h W_v,h = P Λ Rᵀ`` of every head (L layers, H heads, K modes).

    ``singular_values`` (L, H, K) Λ; ``cosines`` (L, H, K) ``p_n·r_n``; ``weighted`` (L, H)
    the λ-weighted cosine ``trace(M_ov)/‖M_ov‖_*``; ``degenerate[l][h]`` tied-λ blocks as
    :func:`qkweights.weights.qk.degenerate_blocks`. NaN where the weights are not finite or the
    circuit is unavailable (``ModelInfo.ov``).
    """

    singular_values: np.ndarray
    cosines: np.ndarray
    weighted: np.ndarray
    degenerate: list


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
    symmetric: np.ndarray | None = None  # (L, H) symmetric_fraction; None: absent (profile/1)
    ov: OVProfile | None = None  # None: absent (profile/1)
    salience: np.ndarray | None = None  # (L, H) ‖w_h‖ of a folded profile; None unless --fold-ln

    def side(self) -> dict:
        """{"source": …, "model": …}: what reports and figures say about this profile's model."""
        return {"source": self.source, "model": self.model.to_json()}

    @property
    def name(self) -> str:
        """The model id, or the family when the source has none."""
        return model_name(self.side())

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
                "weighted_cosine": np.nanmean(w, 1),
                "mean_cosine": np.nanmean(self.mean, 1),
                "min": np.nanmin(w, 1),
                "max": np.nanmax(w, 1),
                "std": np.nanstd(w, 1),
            }

    def circuit_layer_stats(self) -> dict[str, np.ndarray]:
        """Per-layer mean/min/max over heads of the statistics beyond the paper, each (L,); only those the profile
        holds.

        Keys: ``symmetric_fraction``/``symmetric_min``/``symmetric_max``,
        ``ov_weighted_cosine``/``ov_min``/``ov_max``, ``salience_norm``/``salience_min``/``salience_max``.
        """
        out = {}
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN layers stay NaN
            for name, short, a in (
                ("symmetric_fraction", "symmetric", self.symmetric),
                ("ov_weighted_cosine", "ov", None if self.ov is None else self.ov.weighted),
                ("salience_norm", "salience", self.salience),
            ):
                if a is not None:
                    out[name], out[short + "_min"], out[short + "_max"] = (
                        np.nanmean(a, 1),
                        np.nanmin(a, 1),
                        np.nanmax(a, 1),
                    )
        return out

    def _circuit_head(self, l: int, h: int) -> dict:
        doc = {}
        if self.symmetric is not None:
            doc["symmetric_fraction"] = float(self.symmetric[l, h])
        if self.ov is not None:
            doc["ov"] = (
                None
                if not (self.model.ov or {}).get("available", True)
                else {
                    "singular_values": self.ov.singular_values[l, h].tolist(),
                    "cosines": self.ov.cosines[l, h].tolist(),
                    "weighted_cosine": float(self.ov.weighted[l, h]),
                    "degenerate_blocks": self.ov.degenerate[l][h],
                }
            )
        if self.salience is not None:
            doc["salience_norm"] = float(self.salience[l, h])
        return doc

    def to_json(self) -> dict:
        """The ``profile.json`` document (schema ``qkweights.profile/2``)."""
        stats = self.layer_stats()
        extra = {
            k: v
            for k, v in self.circuit_layer_stats().items()
            if k in ("symmetric_fraction", "ov_weighted_cosine", "salience_norm")
        }
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
                    **self._circuit_head(l, h),
                }
                for h in range(self.model.heads)
            ]
            layers.append(
                {
                    "layer": l,
                    **{k: float(v[l]) for k, v in stats.items()},
                    **{k: float(v[l]) for k, v in extra.items()},
                    "heads": heads,
                }
            )
        return {
            "schema": SCHEMA,
            "tool_version": self.tool_version,
            "source": self.source,
            "model": self.model.to_json(),
            "null_band_95": self.null_band_95,
            "sign_convention": SIGN_CONVENTION,
            "degenerate_rtol": DEGENERATE_RTOL,
            **(
                {"symmetric_null": symmetric_null(self.model.hidden, self.model.head_dim)}
                if self.symmetric is not None
                else {}
            ),
            **(
                {"ov_convention": OV_CONVENTION_FOLDED if self.model.ov_folded else OV_CONVENTION}
                if self.ov is not None
                else {}
            ),
            "nonfinite_heads": [{"layer": l, "head": h} for l, h in self.nonfinite],
            "layers": layers,
        }

    def save(self, out: str | Path) -> list[Path]:
        """Write profile.json, heads.csv and modes.npz (if vectors) into ``out``; return their paths.

        Figures are the caller's: :func:`qkweights.workflow.save_profile` draws them too.
        modes.npz records the sha256 of the profile.json it belongs to (``load_profile``
        checks it); files of an earlier profile run into ``out`` that this one does not
        write again (modes.npz, figures) are removed (:func:`qkweights.outputs.record_outputs`).
        """
        out = Path(out)
        text = self.json_text()
        written = [write_text(out / "profile.json", text)]
        rows = []
        for l in range(self.model.layers):
            for h in range(self.model.heads):
                rows.append(
                    [
                        l,
                        h,
                        csv_number(self.weighted[l, h]),
                        csv_number(self.mean[l, h]),
                        csv_number(self.trace[l, h]),
                        csv_number(self.nuclear[l, h]),
                        csv_number(self.effective_rank[l, h]),
                        csv_number(self.singular_values[l, h, 0]),
                        len(self.degenerate[l][h]),
                    ]
                )
        header = [
            "layer",
            "head",
            "weighted_cosine",
            "mean_cosine",
            "trace",
            "nuclear_norm",
            "effective_rank",
            "sigma_0",
            "degenerate_blocks",
        ]
        header, rows = self._circuit_columns(header, rows)
        written.append(write_csv(out / "heads.csv", header, rows))
        if self.U is not None:
            written.append(
                write_npz(
                    out / "modes.npz",
                    U=self.U,
                    V=self.V,
                    S=self.singular_values,
                    profile_sha256=np.array(_sha256(text)),
                )
            )
        record_outputs(out, "profile", written)
        return written

    def json_text(self) -> str:
        return dumps_json(self.to_json())

    def _circuit_columns(self, header: list[str], rows: list[list]) -> tuple[list[str], list[list]]:
        """heads.csv columns beyond the paper, appended in (layer, head) order: the ones this profile holds."""
        H = self.model.heads
        if self.symmetric is not None:
            header = header + ["symmetric_fraction"]
            rows = [r + [csv_number(self.symmetric[i // H, i % H])] for i, r in enumerate(rows)]
        if self.ov is not None:
            header = header + ["ov_weighted_cosine", "ov_lambda_0", "ov_degenerate_blocks"]
            rows = [
                r
                + [
                    csv_number(self.ov.weighted[i // H, i % H]),
                    csv_number(self.ov.singular_values[i // H, i % H, 0]),
                    len(self.ov.degenerate[i // H][i % H]),
                ]
                for i, r in enumerate(rows)
            ]
        if self.salience is not None:
            header = header + ["salience_norm"]
            rows = [r + [csv_number(self.salience[i // H, i % H])] for i, r in enumerate(rows)]
        return header, rows


def _sha256(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


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


def _profile_layer(ck: Checkpoint, l: int, fold_ln: bool = False) -> _Layer:
    qk = ck.qk(l)
    wq, wk = qk.wq, qk.wk  # (H, K, D)
    gamma = None
    if fold_ln:
        from qkweights.weights.fold import layer_fold

        gamma, beta, _, _ = layer_fold(ck, l)
        wq, wk = fold_gain(wq, gamma), fold_gain(wk, gamma)  # W Γ: the SVD of Γ W_qᵀW_k Γ
    ok = np.isfinite(wq).all(axis=(1, 2)) & np.isfinite(wk).all(axis=(1, 2))  # (H,)
    extra = _ov_layer(ck, l, gamma)
    if not ok.any():
        return _Layer(ok, None, None, None, None, **extra)
    if not ok.all():
        wq, wk = wq[ok], wk[ok]
    u, s, v = qk_svd(wq, wk)
    salience = None
    if fold_ln:
        salience = np.linalg.norm(key_salience(qk.wq[ok], qk.wk[ok], qk.bq[ok], gamma, beta), axis=-1)  # (H_ok,)
    return _Layer(ok, head_stats(u, s, v, wq, wk), s, u, v, symmetric_fraction(s, wq, wk), salience, **extra)


def _ov_layer(ck: Checkpoint, l: int, gamma: np.ndarray | None = None) -> dict:
    """The value-output circuit of layer ``l``'s heads, as keyword fields of :class:`_Layer`.

    ``gamma`` (D,): the LayerNorm gain to fold on the circuit's input side, ``W_o,h W_v,h Γ``
    (the circuit of the normalised tokens n, as the query-key fold); None: the plain circuit.
    """
    if not hasattr(ck, "ov_unavailable"):  # a duck-typed checkpoint offering W_q/W_k only
        return {"ov_why": "the checkpoint object gives no value/output weights"}
    why = ck.ov_unavailable(l)
    if why is not None:
        return {"ov_why": why}
    ov = ck.ov(l)
    wv = ov.wv if gamma is None else fold_gain(ov.wv, gamma)  # (H, K, D) W_v Γ: the SVD of W_o W_v Γ
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
    circuits = _Circuits.empty(L, H, K, fold_ln)
    workers = workers or min(2, os.cpu_count() or 1)
    with threadpool_limits(1), ThreadPoolExecutor(workers) as pool:
        pending = [pool.submit(_profile_layer, ck, l, fold_ln) for l in range(min(workers, L))]
        for l in range(L):
            layer = pending.pop(0).result()
            if l + workers < L:
                pending.append(pool.submit(_profile_layer, ck, l + workers, fold_ln))
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
    omitted = OMITTED_FOLDED if fold_ln else OMITTED
    fold = None
    if fold_ln:
        from qkweights.weights.fold import FOLDED, fold_description

        fold = fold_description(ck)
    why = "; ".join(f"layer {l}: {w}" for l, w in circuits.why)
    ov_info = {
        "available": not circuits.why,
        "note": (
            f"value-output circuit not computed ({why})" if why else OV_CONVENTION_FOLDED if fold_ln else OV_CONVENTION
        ),
    }
    model = ModelInfo(
        ck.spec.name,
        L,
        H,
        D,
        K,
        ck.dtype(),
        omitted + tuple(ck.spec.logit_terms),
        FOLDED if fold_ln else None,
        fold,
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
    def empty(cls, L: int, H: int, K: int, fold_ln: bool) -> _Circuits:
        return cls(
            np.full((L, H), np.nan),
            np.full((L, H), np.nan) if fold_ln else None,
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


def load_profile(path: str | Path, *, vectors: bool = True) -> Profile:
    """Read a saved profile: ``profile.json`` or the folder holding it (with ``modes.npz`` if present).

    Every field is checked (types, one entry per layer and head, K values per head),
    so a hand-edited or truncated file is an InputError naming the field. With
    ``vectors``, a ``modes.npz`` beside the file is read only if it belongs to this
    profile.json (it records the file's sha256) and has its shapes; otherwise
    InputError. ``vectors=False`` ignores modes.npz.
    """
    path = Path(path)
    if path.is_dir():
        path = path / "profile.json"
    try:
        raw = path.read_bytes()
        doc = json.loads(raw.decode("utf-8"))
    except FileNotFoundError:
        raise InputError(
            f"{path}: no such profile; write one with the profile command or qkweights.save_profile"
        ) from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise InputError(f"{path}: not a readable profile.json ({e}); re-run `python -m qkweights profile`") from None
    if not isinstance(doc, dict) or doc.get("schema") not in SCHEMAS:
        raise InputError(
            f"{path}: not a qkweights profile (schema "
            f"{doc.get('schema') if isinstance(doc, dict) else None!r}, expected {SCHEMA!r})"
        )
    p = _ProfileReader(path, doc)
    U = V = None
    npz = path.parent / "modes.npz"
    if vectors and npz.exists():
        U, V = _read_modes(npz, path, raw, p.model)
    return Profile(
        p.model,
        p.source,
        p.singular_values,
        p.cosines,
        p.grid("weighted_cosine"),
        p.grid("mean_cosine"),
        p.grid("trace"),
        p.grid("nuclear_norm"),
        p.grid("effective_rank"),
        p.degenerate,
        p.nonfinite,
        U,
        V,
        p.tool_version,
        **_load_circuits(p),
    )


class _ProfileReader:
    """The fields of a profile.json document, type-checked; errors name the file and the field."""

    def __init__(self, path: Path, doc: dict):
        self.path, self.doc = path, doc
        m = self.field(doc, "model", dict)
        ints = {k: self.field(m, k, int, f"model.{k}") for k in ("layers", "heads", "hidden", "head_dim")}
        for k, v in ints.items():
            if v < 1:
                self.fail(f"model.{k}", f"is {v}; it must be ≥ 1")
        omits = m.get("weight_svd_omits", list(OMITTED))
        if not isinstance(omits, list) or not all(isinstance(x, str) for x in omits):
            self.fail("model.weight_svd_omits", "must be a list of texts")
        for key, kind in (("folded", str), ("fold", dict), ("ov", dict)):
            if m.get(key) is not None and not isinstance(m[key], kind):
                self.fail(f"model.{key}", f"is {_short(m[key])}; expected {_KINDS[kind]} (or null)")
        self.model = ModelInfo(
            self.field(m, "family", str, "model.family"),
            ints["layers"],
            ints["heads"],
            ints["hidden"],
            ints["head_dim"],
            self.field(m, "dtype", str, "model.dtype"),
            tuple(omits),
            m.get("folded"),
            m.get("fold"),
            m.get("ov"),
        )
        self.source = self.field(doc, "source", dict)
        self.tool_version = str(doc.get("tool_version", "?"))
        L, H, K = self.model.layers, self.model.heads, self.model.head_dim
        layers = self.field(doc, "layers", list)
        if len(layers) != L:
            self.fail("layers", f"has {len(layers)} entries; model.layers says {L}")
        self.heads = []  # [l][h] the head dicts
        for l, ly in enumerate(layers):
            where = f"layers[{l}]"
            if not isinstance(ly, dict):
                self.fail(where, "must be an object")
            if ly.get("layer", l) != l:
                self.fail(f"{where}.layer", f"is {ly.get('layer')!r}; layers must be listed in order from 0")
            hs = self.field(ly, "heads", list, f"{where}.heads")
            if len(hs) != H:
                self.fail(f"{where}.heads", f"has {len(hs)} entries; model.heads says {H}")
            for h, hd in enumerate(hs):
                if not isinstance(hd, dict):
                    self.fail(f"{where}.heads[{h}]", "must be an object")
            self.heads.append(hs)
        self.singular_values = self.modes("singular_values", K)
        self.cosines = self.modes("cosines", K)
        self.degenerate = [[self.blocks(l, h) for h in range(H)] for l in range(L)]
        self.nonfinite = []
        for i, x in enumerate(self.field(doc, "nonfinite_heads", list) if "nonfinite_heads" in doc else []):
            if not (
                isinstance(x, dict)
                and _is_int(x.get("layer"))
                and _is_int(x.get("head"))
                and 0 <= x["layer"] < L
                and 0 <= x["head"] < H
            ):
                self.fail(f"nonfinite_heads[{i}]", f'must be {{"layer": 0…{L - 1}, "head": 0…{H - 1}}}')
            self.nonfinite.append((x["layer"], x["head"]))

    def fail(self, field: str, problem: str):
        raise InputError(
            f"{self.path}: field {field} {problem}; re-run `python -m qkweights profile` to rewrite the file"
        )

    def field(self, obj: dict, key: str, kind: type, where: str | None = None):
        where = where or key
        if key not in obj:
            self.fail(where, "is missing")
        value = obj[key]
        if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
            self.fail(where, f"is {_short(value)}; expected {_KINDS[kind]}")
        return value

    def number(self, value, where: str) -> float:
        """A JSON number, or null for a non-finite value."""
        if value is None:
            return np.nan
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            self.fail(where, f"is {_short(value)}; expected a number (or null)")
        return float(value)

    def grid(self, key: str) -> np.ndarray:
        """(L, H) one number per head."""
        return np.array(
            [
                [
                    self.number(
                        self.field(hd, key, object, f"layers[{l}].heads[{h}].{key}"), f"layers[{l}].heads[{h}].{key}"
                    )
                    for h, hd in enumerate(hs)
                ]
                for l, hs in enumerate(self.heads)
            ],
            dtype=np.float64,
        ).reshape(self.model.layers, self.model.heads)

    def modes(self, key: str, K: int) -> np.ndarray:
        """(L, H, K) K numbers per head."""
        out = np.full((self.model.layers, self.model.heads, K), np.nan)
        for l, hs in enumerate(self.heads):
            for h, hd in enumerate(hs):
                where = f"layers[{l}].heads[{h}].{key}"
                values = self.field(hd, key, list, where)
                if len(values) != K:
                    self.fail(where, f"has {len(values)} values; model.head_dim says {K}")
                out[l, h] = [self.number(x, f"{where}[{n}]") for n, x in enumerate(values)]
        return out

    def blocks(self, l: int, h: int) -> list:
        where = f"layers[{l}].heads[{h}].degenerate_blocks"
        blocks = self.field(self.heads[l][h], "degenerate_blocks", list, where)
        K = self.model.head_dim
        for i, b in enumerate(blocks):
            if not (
                isinstance(b, dict)
                and _is_int(b.get("start"))
                and _is_int(b.get("stop"))
                and 0 <= b["start"] < b["stop"] <= K
            ):
                self.fail(f"{where}[{i}]", f"must hold integers start < stop ≤ {K}")
        return blocks


_KINDS = {dict: "an object", list: "a list", int: "an integer", str: "a text", object: "a value"}


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _short(value) -> str:
    text = json.dumps(value, ensure_ascii=False)
    return text if len(text) <= 40 else text[:37] + "..."


def _read_modes(npz: Path, path: Path, raw: bytes, model: ModelInfo) -> tuple[np.ndarray, np.ndarray]:
    """U, V of ``npz``, refused unless it was written with this profile.json (``raw``) and has its shapes."""
    fix = f"profile again with save_vectors=True into {path.parent}, or delete {npz.name}"
    try:
        with np.load(npz) as z:
            owner = str(z["profile_sha256"]) if "profile_sha256" in z.files else None
            if owner != hashlib.sha256(raw).hexdigest():
                raise InputError(
                    f"{npz}: belongs to another run than {path.name} beside it (its vectors would be paired with "
                    f"another profile's statistics); {fix}"
                )
            U, V = z["U"], z["V"]
    except InputError:
        raise
    except (OSError, ValueError, KeyError, EOFError) as e:
        raise InputError(f"{npz}: not a readable modes.npz ({type(e).__name__}: {e}); {fix}") from None
    L, H, D = model.layers, model.heads, model.hidden
    for name, a in (("U", U), ("V", V)):
        if a.ndim != 4 or a.shape[:3] != (L, H, D) or not 1 <= a.shape[3] <= model.head_dim:
            raise InputError(
                f"{npz}: {name} has shape {a.shape}, expected ({L}, {H}, {D}, ≤{model.head_dim}) from "
                f"{path.name}; {fix}"
            )
    return U, V


def _load_circuits(p: _ProfileReader) -> dict:
    """The statistics beyond the paper of a saved profile, type-checked; a /1 profile (or one without them) leaves them
    None (absent)."""
    heads = [hd for hs in p.heads for hd in hs]
    out = {}
    if heads and all("symmetric_fraction" in hd for hd in heads):
        out["symmetric"] = p.grid("symmetric_fraction")
    if heads and all("salience_norm" in hd for hd in heads):
        out["salience"] = p.grid("salience_norm")
    if heads and all("ov" in hd for hd in heads):
        L, H, K = p.model.layers, p.model.heads, p.model.head_dim

        def ov(l: int, h: int) -> dict:
            value = p.heads[l][h]["ov"]
            if value is not None and not isinstance(value, dict):
                p.fail(f"layers[{l}].heads[{h}].ov", f"is {_short(value)}; expected an object (or null)")
            return value or {}

        def numbers(l: int, h: int, key: str, n: int) -> list[float]:
            value, where = ov(l, h).get(key), f"layers[{l}].heads[{h}].ov.{key}"
            if value is None:
                return [np.nan] * n
            if not isinstance(value, list) or len(value) != n:
                p.fail(where, f"must be a list of {n} numbers")
            return [p.number(x, f"{where}[{i}]") for i, x in enumerate(value)]

        def number(l: int, h: int, key: str) -> float:
            return p.number(ov(l, h).get(key), f"layers[{l}].heads[{h}].ov.{key}")

        grid = [(l, h) for l in range(L) for h in range(H)]
        out["ov"] = OVProfile(
            np.array([numbers(l, h, "singular_values", K) for l, h in grid]).reshape(L, H, K),
            np.array([numbers(l, h, "cosines", K) for l, h in grid]).reshape(L, H, K),
            np.array([number(l, h, "weighted_cosine") for l, h in grid]).reshape(L, H),
            [[ov(l, h).get("degenerate_blocks", []) for h in range(H)] for l in range(L)],
        )
    return out
