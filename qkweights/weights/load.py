"""Reading a saved weight profile: ``profile.json`` and the ``modes.npz`` beside it, every field checked.

:func:`load_profile` returns the :class:`~qkweights.weights.profile.Profile` that
:meth:`~qkweights.weights.profile.Profile.save` wrote (schema ``qkweights.profile/2``, or a
``/1`` without the statistics beyond the paper); a hand-edited or truncated file is an
InputError naming the file, the field and the fix.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np

from qkweights.errors import InputError
from qkweights.weights.modes import OMITTED
from qkweights.weights.profile import SCHEMA, SCHEMAS, ModelInfo, OVProfile, Profile


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
