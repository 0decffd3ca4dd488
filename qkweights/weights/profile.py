"""The weight profile of a checkpoint: every head's query-key SVD statistics, and its files.

:class:`Profile` holds the results as (L, H, …) arrays with their metadata (:class:`ModelInfo`,
:class:`OVProfile`); :meth:`Profile.save` writes ``profile.json``, ``heads.csv`` and (with vectors)
``modes.npz``. :func:`qkweights.weights.compute.compute_profile` computes one,
:func:`qkweights.weights.load.load_profile` reads the files back.
"""

from __future__ import annotations

import hashlib
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

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
from qkweights.version import __version__
from qkweights.weights.modes import OMITTED, OV_CONVENTION, OV_CONVENTION_FOLDED
from qkweights.weights.qk import DEGENERATE_RTOL, SIGN_CONVENTION, null_band, symmetric_null

SCHEMA = "qkweights.profile/2"
SCHEMAS = ("qkweights.profile/1", SCHEMA)  # what load_profile reads; /1 lacks symmetric_fraction, ov, salience_norm


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
