"""The atlas (``qkweights report``): links, offline rules, embedded data, budget, atomic writes, grouping."""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import warnings
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
from conftest import MODELS, read_csv

import qkweights
from qkweights.atlas import site as site_module
from qkweights.cli import main
from qkweights.errors import InputError, QkWarning


class Refs(HTMLParser):
    """Every href/src/data-src and CSS url() of a page, and the inline JSON blocks."""

    def __init__(self):
        super().__init__()
        self.refs, self.json, self._in = [], {}, None

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        for key in ("href", "src", "data-src"):
            if a.get(key):
                self.refs.append(a[key])
        self.refs += re.findall(r"url\(([^)]+)\)", a.get("style") or "")
        if tag == "script" and a.get("type") == "application/json":
            self._in = a["id"]
        if tag == "style":
            self._in = "<style>"

    def handle_data(self, data):
        if self._in == "<style>":
            self.refs += re.findall(r"url\(([^)]+)\)", data)
            self._in = None
        elif self._in:
            self.json[self._in] = json.loads(data)
            self._in = None


def parse(page: Path) -> Refs:
    p = Refs()
    p.feed(page.read_text(encoding="utf-8"))
    return p


def tree_digest(folder: Path) -> dict[str, str]:
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest() for p in folder.rglob("*") if p.is_file()
    }


def test_demo_writes_an_atlas_and_every_reference_resolves_inside_it(atlas):
    pages = sorted(atlas.rglob("*.html"))
    assert (atlas / "index.html") in pages and len(pages) == 1 + 1 + 16  # index, model page, 4 × 4 heads
    root = atlas.resolve()
    for page in pages:
        for ref in parse(page).refs:
            target = ref.split("#")[0]
            if not target:
                continue
            assert ":" not in target, f"{page}: {ref} is not a relative file reference"
            path = (page.parent / target).resolve()
            assert path.is_file() and root in path.parents, f"{page}: {ref} does not resolve inside the site"


def test_no_network_no_fetch_no_module(atlas):
    for f in atlas.rglob("*"):
        if f.suffix in (".html", ".js", ".css"):
            text = f.read_text(encoding="utf-8")
            for bad in ("http:", "https:", "fetch(", 'type="module"', "XMLHttpRequest", "import("):
                assert bad not in text, f"{f}: contains {bad!r}"
        if f.suffix == ".html":  # without JavaScript: every lazily loaded image has a plain copy in <noscript>
            lazy = re.findall(r'<img class="(\w+) lazy" data-src="([^"]+)"', text)
            plain = re.findall(r'<noscript><img class="(\w+)" src="([^"]+)"', text)
            assert lazy == plain, f"{f}: lazy images without a <noscript> copy"


def test_embedded_data_round_trips_to_the_result_files(demo_out, atlas):
    prof = json.loads((demo_out / "profile" / "profile.json").read_text())
    model_dir = next(p for p in atlas.iterdir() if (p / "L00_H00.html").is_file())
    top = json.loads((demo_out / "top_images" / "top_images.json").read_text())
    same = json.loads((demo_out / "same_object" / "same_object.json").read_text())
    o3_rows = read_csv(demo_out / "o3" / "o3.csv")
    for entry in prof["layers"]:
        for hd in entry["heads"]:
            l, h = entry["layer"], hd["head"]
            data = parse(model_dir / f"L{l:02d}_H{h:02d}.html").json["head-data"]
            assert [m["sigma"] for m in data["modes"]] == hd["singular_values"]  # the same float64, via JSON
            assert [m["cosine"] for m in data["modes"]] == hd["cosines"]
            assert [m["ov_cosine"] for m in data["modes"]] == hd["ov"]["cosines"]
            assert data["stats"]["weighted_cosine"] == hd["weighted_cosine"]
            # O3: the mean over images of o3.csv's ratios from the target token (a mean of 48 values: float64
            # summation-order error ≤ 48 ulp of 1)
            tt = np.mean([float(r["tt"]) for r in o3_rows if (int(r["layer"]), int(r["head"])) == (l, h)])
            assert data["o3"]["target"]["same"] == pytest.approx(tt, abs=1e-13)
            p = next(x["probability"] for e in same["layers"] if e["layer"] == l for x in e["heads"] if x["head"] == h)
            assert data["stats"]["same_object"] == p
            ran = next((e for e in top["heads"] if (e["layer"], e["head"]) == (l, h)), None)
            if ran is None:
                assert data["top_images"] is None
            else:
                for mine, theirs in zip(data["top_images"]["modes"], ran["modes"]):
                    assert mine["signs"]["+"] == [
                        {"path": w["path"], "score": w["score"]} for w in theirs["signs"]["+"][:8]
                    ]
    index = parse(atlas / "index.html").json["heads-data"]
    heads = read_csv(demo_out / "profile" / "heads.csv")
    col = index["columns"].index("weighted_cosine")
    assert [r[col] for r in index["rows"]] == [float(r["weighted_cosine"]) for r in heads]


def test_budget_is_checked_before_writing(demo_out, tmp_path, capsys):
    src = demo_out / "top_images"  # thumbnails and maps, no compare figures: quick
    files = qkweights.report([src], tmp_path / "site")
    size = sum(f.stat().st_size for f in files)
    shutil.rmtree(tmp_path / "site")
    qkweights.report([src], tmp_path / "exact", max_mb=size / 1e6)  # exactly at the budget: written
    with pytest.raises(InputError, match=r"over max_mb=.*: lower top=8 or thumb_px=96, pass thumbs=False"):
        qkweights.report([src], tmp_path / "over", max_mb=(size - 1) / 1e6)
    assert not (tmp_path / "over").exists() and [p.name for p in tmp_path.iterdir()] == ["exact"]
    assert main(["report", str(src), "--out", str(tmp_path / "cli"), "--max-mb", "0.01"]) == 2
    err = capsys.readouterr().err
    assert "over --max-mb 0.01: lower --top 8 or --thumb-px 96, pass --no-thumbs, or raise --max-mb" in err, err
    assert not (tmp_path / "cli").exists()


def test_an_interrupted_write_leaves_the_previous_site_whole(demo_out, tmp_path, monkeypatch):
    out = tmp_path / "site"
    qkweights.report([demo_out / "top_images"], out, top=2)
    before = tree_digest(out)
    real, calls = site_module._write, []

    def failing(path, data):
        calls.append(path)
        if len(calls) > 20:
            raise OSError(28, "No space left on device")
        real(path, data)

    monkeypatch.setattr(site_module, "_write", failing)
    with pytest.raises(OSError):
        qkweights.report([demo_out / "top_images"], out, top=4)
    assert len(calls) == 21 and tree_digest(out) == before
    assert [p.name for p in tmp_path.iterdir()] == ["site"]  # no partial folder left beside it


def test_unknown_schema_is_listed_and_skipped_and_nothing_readable_is_refused(demo_out, tmp_path, capsys):
    newer = tmp_path / "newer"
    shutil.copytree(demo_out / "o3", newer)
    doc = json.loads((newer / "o3_summary.json").read_text())
    (newer / "o3_summary.json").write_text(json.dumps({**doc, "schema": "qkweights.o3/9"}))
    with pytest.warns(QkWarning, match=r"schema 'qkweights.o3/9' is not one this qkweights reads"):
        qkweights.report([demo_out / "profile", newer], tmp_path / "site")
    index = (tmp_path / "site" / "index.html").read_text()
    assert "Not included" in index and "qkweights.o3/9" in index
    assert main(["report", str(newer), "--out", str(tmp_path / "none")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no readable qkweights result" in err[0] and not (tmp_path / "none").exists()


def test_results_are_grouped_by_model(demo_out, tmp_path):
    qkweights.save_profile(qkweights.profile(str(MODELS / "vit")), tmp_path / "runs" / "vit", plots=False)
    shutil.copytree(demo_out / "o3", tmp_path / "runs" / "demo-o3")
    shutil.copytree(demo_out / "profile", tmp_path / "runs" / "demo-profile")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a folder named twice (inside another) is read once: nothing skipped
        qkweights.report([tmp_path / "runs", tmp_path / "runs" / "vit"], tmp_path / "site")
    index = parse(tmp_path / "site" / "index.html").json["heads-data"]
    models = sorted({r[0] for r in index["rows"]})
    assert len(models) == 2
    demo_rows = [r for r in index["rows"] if "demo_model" in r[0]]
    assert len(demo_rows) == 16 and all(r[index["columns"].index("o3_same")] is not None for r in demo_rows)


def test_no_thumbs_keeps_the_source_images_out(demo_out, tmp_path):
    qkweights.report([demo_out / "top_images"], tmp_path / "site", thumbs=False)
    pages = [p.read_text() for p in (tmp_path / "site").rglob("L*_H*.html")]
    assert not any('<img class="th' in p for p in pages)  # maps only, over black
    assert any('class="mp"' in p for p in pages)
    assert all("Source images left out" in p for p in pages if 'class="mp"' in p)
    assert all("Image preprocessing: the checkpoint&#x27;s" in p for p in pages if 'class="mp"' in p)
    assert not list((tmp_path / "site").glob("img/*"))


def test_refuses_to_replace_a_folder_it_did_not_write(demo_out, tmp_path):
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep")
    with pytest.raises(InputError, match="did not write"):
        qkweights.report([demo_out], tmp_path / "mine")
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep"


def test_without_the_model_the_thumbnails_are_only_resized_and_the_page_says_so(demo_out, tmp_path):
    moved = tmp_path / "top_images"
    shutil.copytree(demo_out / "top_images", moved)
    doc = json.loads((moved / "top_images.json").read_text())
    doc["source"]["model_id"] = str(tmp_path / "gone")  # the checkpoint is no longer where the run found it
    (moved / "top_images.json").write_text(json.dumps(doc))
    qkweights.report([moved], tmp_path / "site")
    page = next((tmp_path / "site").rglob("L01_H02.html")).read_text()
    assert "Image preprocessing: unknown: the model could not be opened" in page
    assert list((tmp_path / "site").glob("img/*.webp"))  # thumbnails all the same (48 scenes)
    ours = next((demo_out / "atlas").rglob("L01_H02.html")).read_text()
    assert "Image preprocessing: recorded with the result" in ours  # the same-object result records it


def test_results_of_one_model_share_a_key_by_commit_else_weight_sha256():
    from qkweights.atlas.collect import model_key

    hub = {"model_id": "org/vit", "commit": "abc123", "files": [{"name": "model.safetensors", "sha256": "f00"}]}
    assert model_key(hub) == "org/vit@abc123"
    assert model_key({**hub, "commit": None}) == "sha256:model.safetensors:f00"  # a folder: its weights decide
    moved = {"model_id": "/elsewhere/vit", "commit": None, "files": hub["files"]}
    assert model_key(moved) == model_key({**hub, "commit": None})  # the same weights moved: the same model
    assert model_key({"model_id": "x", "files": []}) == "id:x"


def test_the_grid_marks_the_null_band_of_the_weighted_cosine(atlas, demo_out):
    page = next(p for p in atlas.iterdir() if (p / "L00_H00.html").is_file()) / "index.html"
    cells = re.findall(r'<a href="L(\d+)_H(\d+)\.html" class="cell( null)?"', page.read_text())
    prof = json.loads((demo_out / "profile" / "profile.json").read_text())
    band = 1.959963984540054 / 64**0.5  # 95% band of u·v for random unit vectors in R^64 (the demo's D)
    expected = {(e["layer"], h["head"]): abs(h["weighted_cosine"]) < band for e in prof["layers"] for h in e["heads"]}
    assert len(cells) == 16 and {(int(l), int(h)): bool(n) for l, h, n in cells} == expected
    assert any(expected.values()) and not all(expected.values())  # the demo has heads on both sides
