"""Find the qkweights results under some folders, read them with their own loaders, and group them by model.

A result is recognised by its document's ``schema``: ``profile.json`` (:mod:`qkweights.weights.profile`),
``top_images.json`` (:mod:`qkweights.analyses.top_images`), ``o3_summary.json`` (:mod:`qkweights.analyses.o3`) and
``same_object.json`` (:mod:`qkweights.analyses.same_object`). A file of one of these names whose schema this
version does not read (a newer one, say), or that its loader refuses, is listed in ``skipped`` with
the reason, and the rest is used.

Results belong to the same model when their ``source`` records name the same weights: the Hub id and
commit when there is a commit, else the sha256 of every weight file, else the model id.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from qkweights.analyses.o3 import SCHEMA as O3_SCHEMA
from qkweights.analyses.o3 import SUMMARY_NAME as O3_NAME
from qkweights.analyses.o3 import O3Result
from qkweights.analyses.same_object import JSON_NAME as SAME_NAME
from qkweights.analyses.same_object import SCHEMA as SAME_SCHEMA
from qkweights.analyses.same_object import SameObjectResult
from qkweights.analyses.top_images import JSON_NAME as TOP_NAME
from qkweights.analyses.top_images import SCHEMA as TOP_SCHEMA
from qkweights.analyses.top_images import TopImagesResult
from qkweights.errors import InputError
from qkweights.weights.load import load_profile
from qkweights.weights.profile import SCHEMAS as PROFILE_SCHEMAS
from qkweights.weights.profile import Profile

PROFILE_NAME = "profile.json"
KINDS = {  # file name → (kind, schemas read, loader of the folder)
    PROFILE_NAME: ("profile", PROFILE_SCHEMAS, lambda d: load_profile(d / PROFILE_NAME, vectors=False)),
    TOP_NAME: ("top_images", (TOP_SCHEMA,), TopImagesResult.load),
    O3_NAME: ("o3", (O3_SCHEMA,), O3Result.load),
    SAME_NAME: ("same_object", (SAME_SCHEMA,), SameObjectResult.load),
}


@dataclass
class ModelResults:
    """Everything found about one model: at most one result of each kind (the first found, in path order)."""

    key: str
    slug: str  # the model's folder in the site
    source: dict
    model: dict  # the "model" block of the first result found (family, layers, heads, hidden, …)
    profile: Profile | None = None
    top_images: TopImagesResult | None = None
    o3: O3Result | None = None
    same_object: SameObjectResult | None = None
    folders: dict[str, Path] = field(default_factory=dict)  # kind → the folder it was read from
    duplicates: list[Path] = field(default_factory=list)  # further results of a kind already held

    @property
    def name(self) -> str:
        """The Hub id; for a local folder or file, its name (the full path is in ``source``)."""
        model_id = self.source.get("model_id")
        if model_id and self.source.get("kind") in ("folder", "file"):
            return Path(model_id).name
        return model_id or self.model.get("family") or "model"

    @property
    def layers(self) -> int:
        return int(self.model["layers"])

    @property
    def heads(self) -> int:
        return int(self.model["heads"])

    @property
    def identity(self) -> str:
        """Commit, else the weight files' sha256 (shortened), else "unknown"."""
        if self.source.get("commit"):
            return f"commit {self.source['commit'][:12]}"
        shas = [f.get("sha256") for f in self.source.get("files") or [] if isinstance(f, dict) and f.get("sha256")]
        return "sha256 " + ", ".join(s[:12] for s in shas) if shas else "weights not fingerprinted"


@dataclass
class Found:
    models: list[ModelResults]
    skipped: list[tuple[Path, str]]  # (file, why)


def model_key(source: dict) -> str:
    """The identity of the weights a result was computed on (module docstring)."""
    files = [f for f in source.get("files") or [] if isinstance(f, dict)]
    if source.get("commit"):
        return f"{source.get('model_id')}@{source['commit']}"
    shas = sorted(f"{f.get('name')}:{f['sha256']}" for f in files if f.get("sha256"))
    if shas:
        return "sha256:" + ";".join(shas)
    return f"id:{source.get('model_id')}"


def _slug(key: str, name: str) -> str:
    stem = re.sub(r"[^A-Za-z0-9]+", "-", Path(str(name)).name).strip("-")[:40] or "model"
    return f"{stem}-{hashlib.sha256(key.encode()).hexdigest()[:8]}"


def _candidates(dirs: list[Path]) -> list[Path]:
    """Every file named like a result under ``dirs`` (recursive, sorted; the site's own folders skipped)."""
    out = []
    for d in dirs:
        if d.is_file():
            out += [d] if d.name in KINDS else []
            continue
        for root, sub, files in os.walk(d):
            sub[:] = sorted(s for s in sub if not s.startswith("."))
            out += [Path(root) / f for f in sorted(files) if f in KINDS]
    unique: dict[Path, Path] = {}  # a folder given twice, or inside another given folder: read once
    for p in out:
        unique.setdefault(p.resolve(), p)
    return list(unique.values())


def _doc_of(result) -> dict:
    if isinstance(result, Profile):
        return result.side()
    return result.to_json()


def find_results(dirs) -> Found:
    """Read every result under ``dirs`` (folders or result files); InputError when none is readable."""
    paths = [Path(d) for d in dirs]
    missing = [p for p in paths if not p.exists()]
    if missing:
        raise InputError(f"{missing[0]}: no such folder; pass output folders of qkweights commands")
    models: dict[str, ModelResults] = {}
    skipped: list[tuple[Path, str]] = []
    for f in _candidates(paths):
        kind, schemas, load = KINDS[f.name]
        try:
            schema = json.loads(f.read_text(encoding="utf-8")).get("schema")
        except (OSError, UnicodeDecodeError, ValueError, AttributeError) as e:
            skipped.append((f, f"not readable JSON ({type(e).__name__})"))
            continue
        if not (isinstance(schema, str) and schema.startswith("qkweights.")):
            continue  # a file that only shares the name
        if schema not in schemas:
            skipped.append((f, f"schema {schema!r} is not one this qkweights reads ({', '.join(schemas)})"))
            continue
        try:
            result = load(f.parent)
        except InputError as e:
            skipped.append((f, str(e)))
            continue
        doc = _doc_of(result)
        source, key = doc.get("source") or {}, model_key(doc.get("source") or {})
        if key not in models:
            model = doc.get("model") or {}
            models[key] = ModelResults(key, _slug(key, source.get("model_id") or model.get("family")), source, model)
        m = models[key]
        if getattr(m, kind) is not None:
            m.duplicates.append(f)
            skipped.append((f, f"a second {kind} result of {m.name}; the first ({m.folders[kind]}) is shown"))
            continue
        setattr(m, kind, result)
        m.folders[kind] = f.parent
        if kind == "profile":
            m.model = {**m.model, **result.model.to_json()}  # the profile's block is the fullest
    if not models:
        names = ", ".join(KINDS)
        why = f" ({len(skipped)} unreadable: {skipped[0][0]}: {skipped[0][1]})" if skipped else ""
        raise InputError(
            f"{', '.join(map(str, paths))}: no readable qkweights result{why}; pass output folders of profile, "
            f"top-images, o3 or same-object (holding {names})"
        )
    return Found(sorted(models.values(), key=lambda m: (m.name, m.key)), skipped)
