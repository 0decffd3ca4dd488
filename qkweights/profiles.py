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

from qkweights import __version__
from qkweights.errors import InputError
from qkweights.outputs import dumps_json, record_outputs, write_csv, write_npz, write_text
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
        """Write profile.json, heads.csv, modes.npz (if vectors) and the figures into ``out``.

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
                rows.append([l, h, _num(self.weighted[l, h]), _num(self.mean[l, h]), _num(self.trace[l, h]),
                             _num(self.nuclear[l, h]), _num(self.effective_rank[l, h]),
                             _num(self.singular_values[l, h, 0]), len(self.degenerate[l][h])])
        written.append(write_csv(out / "heads.csv", ["layer", "head", "weighted_cosine", "mean_cosine", "trace", "nuclear_norm", "effective_rank", "sigma_0", "degenerate_blocks"], rows))
        if self.U is not None:
            written.append(write_npz(out / "modes.npz", U=self.U, V=self.V, S=self.singular_values,
                                     profile_sha256=np.array(_sha256(text))))
        if plots:
            from qkweights import figures

            written += figures.profile_figures(self, out)
        record_outputs(out, "profile", written)
        return written

    def json_text(self) -> str:
        return dumps_json(self.to_json())


def _num(x: float) -> str:
    return repr(float(x)) if np.isfinite(x) else ""


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
        raise InputError(f"{path}: no such profile; write one with `python -m qkweights profile MODEL --out DIR`") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise InputError(f"{path}: not a readable profile.json ({e}); re-run `python -m qkweights profile`") from None
    if not isinstance(doc, dict) or doc.get("schema") != SCHEMA:
        raise InputError(f"{path}: not a qkweights profile (schema {doc.get('schema') if isinstance(doc, dict) else None!r}, expected {SCHEMA!r})")
    p = _ProfileReader(path, doc)
    U = V = None
    npz = path.parent / "modes.npz"
    if vectors and npz.exists():
        U, V = _read_modes(npz, path, raw, p.model)
    return Profile(p.model, p.source, p.singular_values, p.cosines, p.grid("weighted_cosine"), p.grid("mean_cosine"),
                   p.grid("trace"), p.grid("nuclear_norm"), p.grid("effective_rank"), p.degenerate, p.nonfinite, U, V,
                   p.tool_version)


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
        self.model = ModelInfo(self.field(m, "family", str, "model.family"), ints["layers"], ints["heads"], ints["hidden"],
                               ints["head_dim"], self.field(m, "dtype", str, "model.dtype"), tuple(omits))
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
            if not (isinstance(x, dict) and _is_int(x.get("layer")) and _is_int(x.get("head"))
                    and 0 <= x["layer"] < L and 0 <= x["head"] < H):
                self.fail(f"nonfinite_heads[{i}]", f"must be {{\"layer\": 0…{L - 1}, \"head\": 0…{H - 1}}}")
            self.nonfinite.append((x["layer"], x["head"]))

    def fail(self, field: str, problem: str):
        raise InputError(f"{self.path}: field {field} {problem}; re-run `python -m qkweights profile` to rewrite the file")

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
        return np.array([[self.number(self.field(hd, key, object, f"layers[{l}].heads[{h}].{key}"), f"layers[{l}].heads[{h}].{key}")
                          for h, hd in enumerate(hs)] for l, hs in enumerate(self.heads)], dtype=np.float64).reshape(
            self.model.layers, self.model.heads)

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
            if not (isinstance(b, dict) and _is_int(b.get("start")) and _is_int(b.get("stop")) and 0 <= b["start"] < b["stop"] <= K):
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
    fix = f"re-run `python -m qkweights profile MODEL --save-vectors --out {path.parent}`, or delete {npz.name}"
    try:
        with np.load(npz) as z:
            owner = str(z["profile_sha256"]) if "profile_sha256" in z.files else None
            if owner != hashlib.sha256(raw).hexdigest():
                raise InputError(f"{npz}: belongs to another run than {path.name} beside it (its vectors would be paired with "
                                 f"another profile's statistics); {fix}")
            U, V = z["U"], z["V"]
    except InputError:
        raise
    except (OSError, ValueError, KeyError, EOFError) as e:
        raise InputError(f"{npz}: not a readable modes.npz ({type(e).__name__}: {e}); {fix}") from None
    L, H, D = model.layers, model.heads, model.hidden
    for name, a in (("U", U), ("V", V)):
        if a.ndim != 4 or a.shape[:3] != (L, H, D) or not 1 <= a.shape[3] <= model.head_dim:
            raise InputError(f"{npz}: {name} has shape {a.shape}, expected ({L}, {H}, {D}, ≤{model.head_dim}) from {path.name}; {fix}")
    return U, V
