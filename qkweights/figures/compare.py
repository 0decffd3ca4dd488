"""Overlay several models' per-layer curves on the normalised layer axis l/(L−1) (paper Fig. 3 and Fig. 2).

Inputs are :class:`~qkweights.weights.profile.Profile` objects, saved ``profile.json``
files (read with :func:`~qkweights.weights.load.load_profile`, never recomputed),
``o3_summary.json`` files (schema ``qkweights.o3/1``), ``same_object.json`` files
(schema ``qkweights.same_object/1``: the probability per analysed layer, mean ± s.e.m.
over heads, paper Fig. 6), or folders holding any of them. Models of different depths
share the x axis because every curve is drawn against l/(L−1).

``o3_summary.json`` as read here::

    {"schema": "qkweights.o3/1", "source": {"model_id": ...},
     "layers": [{"layer": 0, "depth": 0.0,              # depth optional: l/(L−1)
                 "same": {"mean": m, "sem": s}, "different": {...}, "background": {...}}, ...]}

with one entry for every layer 0 … L−1; the legend label is ``source.model_id``,
else the name of the folder holding the file.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np

from qkweights.analyses.o3 import MEASURES as O3_RATIOS
from qkweights.analyses.o3 import SCHEMA as O3_SCHEMA
from qkweights.analyses.same_object import SCHEMA as SAME_SCHEMA
from qkweights.errors import InputError
from qkweights.figures.curves import Curve, curve_panels_figure, curves_figure, same_object_compare_figure
from qkweights.outputs import csv_number, record_outputs, write_csv
from qkweights.weights.load import load_profile
from qkweights.weights.profile import SCHEMA as PROFILE_SCHEMA
from qkweights.weights.profile import SCHEMAS as PROFILE_SCHEMAS
from qkweights.weights.profile import Profile
from qkweights.weights.qk import null_band

PROVENANCE = ("model_id", "commit", "weight_files")  # the last columns of every CSV
INPUT_FILES = ("profile.json", "o3_summary.json", "same_object.json")
O3_MEASURES = {key: key if key == "background" else f"{key} object" for key in O3_RATIOS}  # measure → panel title


def curves_from(item: Profile | str | Path, *, label: str | None = None) -> list[Curve]:
    """The curves of one input: a Profile, a profile.json, an o3_summary.json, a same_object.json, or a folder
    holding any of them.

    A profile gives two curves (``weighted_cosine`` with its head range,
    ``mean_cosine``), plus ``symmetric_fraction`` and ``ov_weighted_cosine`` (head ranges) when
    it holds them (profile/2; a LayerNorm-folded profile is labelled "… [LN-folded]": its query-key circuit
    Γ W_qᵀW_k Γ and its value-output circuit W_o,h W_v,h Γ; one written before the value-output circuit was folded,
    "… [LN-folded query-key only]"); an O3 summary gives three
    (``o3_same``, ``o3_different``, ``o3_background``); a same-object result one (``same_object``). ``label`` overrides
    the model id as legend label.
    Anything else raises InputError naming the file and what was expected.
    """
    if isinstance(item, Profile):
        return _profile_curves(item, label)
    path = Path(item)
    if path.is_dir():
        found = [path / name for name in INPUT_FILES if (path / name).is_file()]
        if not found:
            raise InputError(
                f"{path}: holds no profile.json, o3_summary.json or same_object.json; pass a folder written by "
                "the profile, o3 or same-object workflow or one of those files"
            )
        return [c for f in found for c in curves_from(f, label=label)]
    doc = _read_json(path)
    schema = doc.get("schema") if isinstance(doc, dict) else None
    if schema in PROFILE_SCHEMAS:
        return _profile_curves(load_profile(path, vectors=False), label)
    if schema == O3_SCHEMA:
        return _o3_curves(doc, path, label)
    if schema == SAME_SCHEMA:
        return [_same_curve(doc, path, label)]
    raise InputError(
        f"{path}: not a qkweights profile, O3 summary or same-object result (schema {schema!r}); expected "
        f"a profile.json (schema {PROFILE_SCHEMA!r}), an o3_summary.json (schema {O3_SCHEMA!r}) or a "
        f"same_object.json (schema {SAME_SCHEMA!r})"
    )


def write_comparison(items: list, out_dir: str | Path, *, labels: list[str] | None = None) -> list[Path]:
    """Overlay the curves of ``items`` (see :func:`curves_from`) and write figures and tables into ``out_dir``.

    Profiles give ``compare_cosine.png`` (weighted cosine per layer with a light
    head-range band; the grey null band is the widest, ±1.96/√D of the smallest
    D, which contains the others — every D is named in the legend) and
    ``compare_cosine.csv`` (model, layer, depth, weighted_cosine, mean_cosine,
    min, max). O3 summaries give ``compare_o3.png`` (panels same / different /
    background, mean ± s.e.m. bands) and ``compare_o3.csv`` (model, layer,
    depth, then mean/lo/hi of each measure). Profiles holding the statistics beyond the paper
    also give ``compare_circuits.png`` (panels: symmetric fraction, value-output weighted cosine)
    and ``compare_circuits.csv`` (model, layer, depth, then value/min/max of each). Every CSV ends
    with the provenance of each model's weights: model_id, commit, weight_files ("name:sha256;…").
    ``labels``: one per item. Models
    given twice under one label get " #2", " #3" appended. Returns the paths written.
    """
    if not items:
        raise InputError(
            "compare: nothing to compare; pass one or more models, profile.json, o3_summary.json or "
            "same_object.json files"
        )
    if labels is not None and len(labels) != len(items):
        raise InputError(f"labels=…: {len(labels)} label(s) for {len(items)} item(s); give one label per item")
    groups = _distinct_labels([curves_from(it, label=lab) for it, lab in zip(items, labels or [None] * len(items))])
    out = Path(out_dir)
    written = []
    cosine = [g for g in groups if any(c.kind == "weighted_cosine" for c in g)]
    if cosine:
        written += _write_cosine(cosine, out)
    circuits = [g for g in groups if any(c.kind in CIRCUIT_KINDS for c in g)]
    if circuits:
        written += _write_circuits(circuits, out)
    o3 = [g for g in groups if any(c.kind.startswith("o3_") for c in g)]
    if o3:
        written += _write_o3(o3, out)
    same = [g for g in groups if any(c.kind == "same_object" for c in g)]
    if same:
        written += _write_same(same, out)
    record_outputs(out, "compare", written)  # an earlier run's O3 (or cosine) overlay does not linger
    return written


CIRCUIT_KINDS = {
    "symmetric_fraction": "symmetric fraction of W_qᵀW_k",
    "ov_weighted_cosine": "value-output weighted cosine p·r",
}


def _write_circuits(groups: list[list[Curve]], out: Path) -> list[Path]:
    """compare_circuits.png (panels: symmetric fraction, OV weighted cosine) and compare_circuits.csv.

    Profiles without a statistic (profile/1, or no value-output circuit) are left out of that panel
    and their cells are empty in the table.
    """
    panels = {title: [c for g in groups for c in g if c.kind == kind] for kind, title in CIRCUIT_KINDS.items()}
    panels = {t: cs for t, cs in panels.items() if cs}
    png = curve_panels_figure(
        panels,
        out / "compare_circuits.png",
        title="Beyond the paper: symmetry and value-output circuit by normalised depth",
        ylabel="mean over heads (band: head range)",
    )
    header = (
        ["model", "layer", "depth"]
        + [f"{kind}{part}" for kind in CIRCUIT_KINDS for part in ("", "_min", "_max")]
        + list(PROVENANCE)
    )
    rows = []
    for g in groups:
        first = g[0]
        found = {c.kind: c for c in g}
        for l in range(len(first.depth)):
            row = [first.label, l, csv_number(first.depth[l])]
            for kind in CIRCUIT_KINDS:
                c = found.get(kind)
                row += (
                    [csv_number(c.values[l]), csv_number(c.lo[l]), csv_number(c.hi[l])]
                    if c is not None
                    else ["", "", ""]
                )
            rows.append(row + _provenance(first))
    return [png, write_csv(out / "compare_circuits.csv", header, rows)]


def fold_comparison(folded: Profile, plain: Profile, out_dir: str | Path) -> list[Path]:
    """``fold_cosine_by_layer.png``: the weighted cosine of the LayerNorm-folded and of the plain profile of one model.

    ``folded``: a profile computed with ``fold_ln``; ``plain``: without. Both per layer against
    l/(L−1) with head-range bands and the 95% null band. Returns the paths written.
    """
    if not folded.model.folded or plain.model.folded:
        raise InputError("fold_comparison: pass a LayerNorm-folded profile first and a plain one second")
    curves = [
        c
        for p, lab in ((plain, "plain W_qᵀW_k"), (folded, "LayerNorm-folded Γ W_qᵀW_k Γ"))
        for c in _profile_curves(p, lab)
        if c.kind == "weighted_cosine"
    ]
    D = plain.model.hidden
    name = folded.name
    name = name if len(name) <= 60 else "…" + name[-59:]
    png = curves_figure(
        curves,
        Path(out_dir) / "fold_cosine_by_layer.png",
        title=f"{name}\nweighted query-key cosine, LayerNorm-folded vs plain",
        ylabel="weighted cosine u·v (mean over heads)",
        null_band=float(null_band(D)),
        null_label=f"95% null band ±1.96/√D = ±{null_band(D):.3f} (D = {D})",
    )
    return [png]


def _write_same(groups: list[list[Curve]], out: Path) -> list[Path]:
    curves = [_kind(g, "same_object") for g in groups]
    png = same_object_compare_figure(curves, out / "compare_same_object.png")
    rows = [
        [
            c.label,
            int(l),
            csv_number(c.depth[i]),
            csv_number(c.values[i]),
            csv_number(c.values[i] - c.lo[i]),
            csv_number(c.chance[i]),
        ]
        + _provenance(c)
        for c in curves
        for i, l in enumerate(c.layers)
    ]
    header = ["model", "layer", "depth", "probability", "sem", "chance", *PROVENANCE]
    return [png, write_csv(out / "compare_same_object.csv", header, rows)]


def _same_curve(doc: dict, path: Path, label: str | None) -> Curve:
    try:
        entries = sorted(doc["layers"], key=lambda e: int(e["layer"]))
        n_layers = int(doc["model"]["layers"])
        layers = np.array([int(e["layer"]) for e in entries])
        mean = np.array([_float(e["probability"]) for e in entries])
        sem = np.array([_float(e["sem"]) for e in entries])  # NaN for one head: no band
        chance = np.array([_float(e["chance"]) for e in entries])
    except (KeyError, TypeError, ValueError) as e:
        raise InputError(
            f"{path}: malformed same-object result ({type(e).__name__}: {e}); each layer entry needs "
            "'layer', 'probability', 'sem' and 'chance', and 'model' needs 'layers'"
        ) from None
    if not len(layers):
        raise InputError(f"{path}: same-object result without layers; re-run same-object to rewrite it")
    depth = layers / max(n_layers - 1, 1)
    name = label or (doc.get("source") or {}).get("model_id") or path.resolve().parent.name
    source = doc.get("source") if isinstance(doc.get("source"), dict) else None
    return Curve(name, depth, mean, mean - sem, mean + sem, "same_object", source=source, chance=chance, layers=layers)


def _write_cosine(groups: list[list[Curve]], out: Path) -> list[Path]:
    weighted = [_kind(g, "weighted_cosine") for g in groups]
    widths = sorted({c.hidden for c in weighted})
    label = f"95% null band ±1.96/√D = ±{null_band(widths[0]):.3f} (D = {widths[0]})"
    if len(widths) > 1:
        label += "\n(the widest; also " + ", ".join(f"D = {d}: ±{null_band(d):.3f}" for d in widths[1:]) + ")"
    png = curves_figure(
        weighted,
        out / "compare_cosine.png",
        title="Weighted query-key cosine by normalised depth",
        ylabel="weighted cosine u·v (mean over heads)",
        null_band=null_band(widths[0]),
        null_label=label,
    )
    rows = []
    for g in groups:
        w, m = _kind(g, "weighted_cosine"), _kind(g, "mean_cosine")
        for l in range(len(w.depth)):
            rows.append(
                [
                    w.label,
                    l,
                    csv_number(w.depth[l]),
                    csv_number(w.values[l]),
                    csv_number(m.values[l]),
                    csv_number(w.lo[l]),
                    csv_number(w.hi[l]),
                ]
                + _provenance(w)
            )
    csv = write_csv(
        out / "compare_cosine.csv",
        ["model", "layer", "depth", "weighted_cosine", "mean_cosine", "min", "max", *PROVENANCE],
        rows,
    )
    return [png, csv]


def _write_o3(groups: list[list[Curve]], out: Path) -> list[Path]:
    panels = {title: [_kind(g, f"o3_{key}") for g in groups] for key, title in O3_MEASURES.items()}
    png = curve_panels_figure(
        panels,
        out / "compare_o3.png",
        title="O3 attention allocation by normalised depth",
        ylabel="share of attention (mean ± s.e.m.)",
    )
    header = (
        ["model", "layer", "depth"]
        + [f"{key}_{part}" for key in O3_MEASURES for part in ("mean", "lo", "hi")]
        + list(PROVENANCE)
    )
    rows = []
    for g in groups:
        curves = [_kind(g, f"o3_{key}") for key in O3_MEASURES]
        for l in range(len(curves[0].depth)):
            rows.append(
                [curves[0].label, l, csv_number(curves[0].depth[l])]
                + [csv_number(a[l]) for c in curves for a in (c.values, c.lo, c.hi)]
                + _provenance(curves[0])
            )
    return [png, write_csv(out / "compare_o3.csv", header, rows)]


def _profile_curves(profile: Profile, label: str | None) -> list[Curve]:
    st = profile.layer_stats()
    name = label or profile.name
    if label is None and profile.model.folded:
        # folded profiles written before the value-output circuit was folded too fold the query-key circuit only
        name += " [LN-folded]" if profile.model.ov_folded else " [LN-folded query-key only]"
    D = profile.model.hidden
    curves = [
        Curve(name, profile.depth, st["weighted_cosine"], st["min"], st["max"], "weighted_cosine", D, profile.source),
        Curve(name, profile.depth, st["mean_cosine"], None, None, "mean_cosine", D, profile.source),
    ]
    extra = profile.circuit_layer_stats()
    if "symmetric_fraction" in extra:
        curves.append(
            Curve(
                name,
                profile.depth,
                extra["symmetric_fraction"],
                extra["symmetric_min"],
                extra["symmetric_max"],
                "symmetric_fraction",
                D,
                profile.source,
            )
        )
    if "ov_weighted_cosine" in extra and np.isfinite(extra["ov_weighted_cosine"]).any():
        curves.append(
            Curve(
                name,
                profile.depth,
                extra["ov_weighted_cosine"],
                extra["ov_min"],
                extra["ov_max"],
                "ov_weighted_cosine",
                D,
                profile.source,
            )
        )
    return curves


def _o3_curves(doc: dict, path: Path, label: str | None) -> list[Curve]:
    entries = doc.get("layers")
    if not isinstance(entries, list) or not entries:
        raise InputError(f"{path}: O3 summary without a 'layers' list; re-run the O3 analysis to rewrite it")
    try:
        entries = sorted(entries, key=lambda e: int(e["layer"]))
        layers = [int(e["layer"]) for e in entries]
        stats = {
            key: np.array([[_float(e[key]["mean"]), _float(e[key]["sem"])] for e in entries]) for key in O3_MEASURES
        }  # (L, 2)
        given = [e.get("depth") for e in entries]
        depth = np.array(given, np.float64) if all(d is not None for d in given) else None
    except (KeyError, TypeError, ValueError) as e:
        raise InputError(
            f"{path}: malformed O3 layer entry ({type(e).__name__}: {e}); each needs 'layer' and "
            f"'same'/'different'/'background' with 'mean' and 'sem'"
        ) from None
    if layers != list(range(len(layers))):
        raise InputError(
            f"{path}: O3 summary layers {layers} are not 0…{len(layers) - 1}; it must hold every layer once"
        )
    if depth is None:
        depth = np.arange(len(layers)) / max(len(layers) - 1, 1)
    name = label or (doc.get("source") or {}).get("model_id") or path.resolve().parent.name
    source = doc.get("source") if isinstance(doc.get("source"), dict) else None
    return [
        Curve(name, depth, s[:, 0], s[:, 0] - s[:, 1], s[:, 0] + s[:, 1], f"o3_{key}", source=source)
        for key, s in stats.items()
    ]


def _read_json(path: Path):
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise InputError(
            f"{path}: no such file; expected a profile.json, an o3_summary.json or a folder holding one"
        ) from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise InputError(
            f"{path}: not a JSON file ({type(e).__name__}); expected a profile.json or an o3_summary.json "
            "written by qkweights"
        ) from None


def _distinct_labels(groups: list[list[Curve]]) -> list[list[Curve]]:
    """Rename a later item whose (label, kind) pairs clash with an earlier one's: "name #2", "name #3", …"""
    seen: set[tuple[str, str]] = set()
    out = []
    for g in groups:
        base, k, name = g[0].label, 1, g[0].label
        while any((name, c.kind) in seen for c in g):
            k += 1
            name = f"{base} #{k}"
        g = [dataclasses.replace(c, label=name) for c in g]
        seen |= {(c.label, c.kind) for c in g}
        out.append(g)
    return out


def _provenance(curve: Curve) -> list[str]:
    """model_id, commit, weight_files ("name:sha256;…") of a curve's source record; empty where unknown."""
    src = curve.source or {}
    files = src.get("files") if isinstance(src.get("files"), list) else []
    names = ";".join(f"{f.get('name')}:{f.get('sha256')}" for f in files if isinstance(f, dict))
    return [str(src.get("model_id") or ""), str(src.get("commit") or ""), names]


def _kind(group: list[Curve], kind: str) -> Curve:
    return next(c for c in group if c.kind == kind)


def _float(x) -> float:
    return np.nan if x is None else float(x)
