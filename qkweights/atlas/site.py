"""Build the whole atlas in memory, check its size against the budget, then write it in one swap."""

from __future__ import annotations

import os
import shutil
import tempfile
import warnings
from importlib import resources
from pathlib import Path

from qkweights.atlas.collect import PROFILE_NAME, ModelResults, find_results
from qkweights.atlas.headpage import head_page
from qkweights.atlas.images import Assets, Renderer, preprocessing_of
from qkweights.atlas.pages import head_name, index_page, model_page
from qkweights.atlas.stats import COLUMNS, centre_band, head_stats
from qkweights.errors import InputError, QkWarning
from qkweights.outputs import dumps_json, output_error
from qkweights.version import __version__

MANIFEST = ".qkweights-report.json"
STATIC = ("atlas.css", "atlas.js")
FIGURES = {  # kind → the figures of its folder shown on the model page, with their captions
    "profile": {
        "cosine_by_layer.png": "σ-weighted cosine per layer",
        "symmetry_by_layer.png": "symmetric fraction per layer",
        "ov_cosine_by_layer.png": "value-output weighted cosine per layer",
        "cosine_hist.png": "cosines of all modes",
        "spectrum_grid.png": "singular-value spectra",
    },
    "top_images": {"anisotropy.png": "anisotropy control"},
    "o3": {"o3_by_layer.png": "O3 attention allocation per layer"},
    "same_object": {
        "same_object_by_layer.png": "same-object probability per layer",
        "same_object_examples.png": "same-object examples",
    },
}
COMPARE_FIGURES = {
    "compare_cosine.png": "weighted cosine by normalised depth",
    "compare_circuits.png": "symmetric fraction and value-output cosine by normalised depth",
    "compare_o3.png": "O3 allocation by normalised depth",
    "compare_same_object.png": "same-object probability by normalised depth",
}


def report(dirs, out, *, thumb_px: int = 96, top: int = 8, max_mb: float = 50.0, thumbs: bool = True) -> list[Path]:
    """Write the atlas of every result under ``dirs`` to the folder ``out``; returns the files written.

    See :mod:`qkweights.atlas`. InputError (nothing written, a previous site left whole) when nothing is
    readable, when ``out`` holds files that no report wrote, or when the site would exceed ``max_mb``.
    """
    if not 16 <= thumb_px <= 512:
        raise InputError(f"thumb_px={thumb_px}: give 16 to 512 pixels")
    if top < 1:
        raise InputError(f"top={top}: give at least 1 image per mode and sign")
    out = Path(out)
    _check_target(out)
    found = find_results([Path(d) for d in (dirs if isinstance(dirs, (list, tuple)) else [dirs])])
    for path, why in found.skipped:
        warnings.warn(f"{path}: skipped: {why}", QkWarning, stacklevel=2)
    files = build(found, thumb_px=thumb_px, top=top, thumbs=thumbs)
    size = sum(len(v) for v in files.values())
    if size > max_mb * 1e6:
        raise InputError(_over_budget(files, size, max_mb, thumb_px, top, thumbs))
    return write_site(files, out)


def build(found, *, thumb_px: int, top: int, thumbs: bool) -> dict[str, bytes]:
    """Every file of the site: site-relative POSIX path → bytes."""
    models = found.models
    assets = Assets()
    texts: dict[str, str] = {}
    stats = {m.key: head_stats(m) for m in models}
    skipped = list(found.skipped)
    compare_figs, compare_files = _compare(models, skipped)
    for m in models:
        s = stats[m.key]
        centres = {c.key: centre_band(m, c.key, s[c.key]) for c in COLUMNS}
        figures = []
        for kind, names in FIGURES.items():
            folder = m.folders.get(kind)
            for name, caption in names.items():
                if folder is not None and (folder / name).is_file():
                    path = f"{m.slug}/fig/{name}"
                    assets.files[path] = (folder / name).read_bytes()
                    figures.append((f"fig/{name}", caption))
        texts[f"{m.slug}/index.html"] = model_page(m, stats, centres, figures)
        prep, origin = preprocessing_of(m) if (m.top_images or m.same_object) else (None, "")
        renderer = Renderer(assets, prep, thumb_px, thumbs, origin)
        for layer in range(m.layers):
            for h in range(m.heads):
                texts[f"{m.slug}/{head_name(layer, h)}.html"] = head_page(m, layer, h, stats, renderer, top)
    texts["index.html"] = index_page(models, stats, compare_figs, skipped)
    files = {p: t.encode("utf-8") for p, t in texts.items()}
    files.update(assets.files)
    files.update(compare_files)
    static = resources.files("qkweights.atlas") / "static"
    for name in STATIC:
        files[f"assets/{name}"] = (static / name).read_bytes()
    return files


def _compare(models: list[ModelResults], skipped: list) -> tuple[list[tuple[str, str]], dict[str, bytes]]:
    """The cross-model curves, drawn by :func:`qkweights.figures.compare.write_comparison` into a scratch folder."""
    from qkweights.analyses.o3 import SUMMARY_NAME
    from qkweights.analyses.same_object import JSON_NAME
    from qkweights.figures.compare import write_comparison

    items, labels = [], []
    names = {m.name for m in models}
    for m in models:
        label = m.name if len(names) == len(models) else f"{m.name} ({m.identity})"
        for kind, name in (("profile", PROFILE_NAME), ("o3", SUMMARY_NAME), ("same_object", JSON_NAME)):
            if kind in m.folders:
                items.append(m.folders[kind] / name)
                labels.append(label)
    if not items:
        return [], {}
    with tempfile.TemporaryDirectory() as tmp:
        try:
            written = write_comparison(items, tmp, labels=labels)
        except InputError as e:
            skipped.append((Path("compare"), str(e)))
            return [], {}
        files = {f"compare/{p.name}": p.read_bytes() for p in written if p.name in COMPARE_FIGURES}
    shown = [(f"compare/{name}", caption) for name, caption in COMPARE_FIGURES.items() if f"compare/{name}" in files]
    return shown, files  # in the order of COMPARE_FIGURES: the weighted cosine first


def _over_budget(files: dict[str, bytes], size: int, max_mb: float, thumb_px: int, top: int, thumbs: bool) -> str:
    parts: dict[str, int] = {}
    for p, b in files.items():
        kind = "thumbnails" if p.startswith("img/") else "maps" if p.startswith("maps/") else "pages and figures"
        parts[kind] = parts.get(kind, 0) + len(b)
    detail = ", ".join(f"{k} {v / 1e6:.1f} MB" for k, v in sorted(parts.items(), key=lambda kv: -kv[1]))
    lower = f"lower top={top} or thumb_px={thumb_px}" + (", pass thumbs=False" if thumbs else "")
    return f"the atlas would take {size / 1e6:.1f} MB ({detail}), over max_mb={max_mb:g}: {lower}, or raise max_mb=…"


def _check_target(out: Path) -> None:
    if out.exists() and not out.is_dir():
        raise InputError(f"{out}: exists and is not a folder; choose another folder for the site")
    if out.is_dir() and any(out.iterdir()) and not (out / MANIFEST).is_file():
        raise InputError(
            f"{out}: holds files that qkweights report did not write; choose a new or empty folder for the site"
        )


def write_site(files: dict[str, bytes], out: Path) -> list[Path]:
    """Write ``files`` into a temporary sibling folder, then swap it into place; a failure leaves ``out`` whole."""
    parent = out.resolve().parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=parent))
    except OSError as e:
        raise output_error(parent, e, folder=True) from e
    try:
        for rel, data in files.items():
            _write(tmp / rel, data)
        _write(
            tmp / MANIFEST,
            dumps_json({"schema": "qkweights.report/1", "tool_version": __version__, "files": sorted(files)}).encode(),
        )
        old = None
        if out.exists():
            old = parent / f".{out.name}.old-{os.getpid()}"
            os.replace(out, old)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    return [out / rel for rel in sorted(files)]


def _write(path: Path, data: bytes) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    except OSError as e:
        raise output_error(path, e) from e
