"""compare: overlay of several profiles and O3 summaries on the normalised layer axis.

Profiles come from ``compute_profile`` on a small in-memory checkpoint (the
interface ``compute_profile`` reads: ``dims``, ``qk(l)``, ``spec``, ``dtype()``).
Reference values are either exact by construction (W_k = ±W_q gives every
cos_n = ±1) or brute force (dense SVD of the D×D product W_qᵀW_k).
"""

import hashlib
import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from conftest import read_csv
from PIL import Image

from qkweights.errors import InputError
from qkweights.figures.compare import curves_from, write_comparison
from qkweights.figures.curves import Curve
from qkweights.weights.compute import compute_profile


def weights(L, H, K, D, *, seed=0, sign=None):
    """(wq, wk), each (L, H, K, D): Gaussian W_q; W_k = sign[l]·W_q if ``sign`` is given, else independent Gaussian."""
    rng = np.random.default_rng(seed)
    wq = rng.standard_normal((L, H, K, D))
    wk = rng.standard_normal((L, H, K, D)) if sign is None else np.asarray(sign, float)[:, None, None, None] * wq
    return wq, wk


def profile_of(wq, wk, model_id, nan=()):
    L, H, K, D = wq.shape
    wq = wq.copy()
    for l, h in nan:
        wq[l, h, 0, 0] = np.nan
    ck = SimpleNamespace(
        dims=SimpleNamespace(layers=L, heads=H, head_dim=K, hidden=D),
        qk=lambda l: SimpleNamespace(wq=wq[l], wk=wk[l]),
        spec=SimpleNamespace(name="test-family", logit_terms=()),
        dtype=lambda: "F64",
    )
    return compute_profile(ck, {"model_id": model_id})


def column(rows, model, key):
    return np.array([float(r[key]) if r[key] else np.nan for r in rows if r["model"] == model])


def o3_doc(L, *, model_id="test/o3", depth=False):
    """An O3 summary whose means are 0.1·l (same), 0.2 (different), 0.5 − 0.01·l (background), s.e.m. 0.01/0.02/0.03."""
    layers = []
    for l in range(L):
        entry = {
            "layer": l,
            "same": {"mean": 0.1 * l, "sem": 0.01},
            "different": {"mean": 0.2, "sem": 0.02},
            "background": {"mean": 0.5 - 0.01 * l, "sem": 0.03},
        }
        if depth:
            entry["depth"] = l / (2 * L)
        layers.append(entry)
    return {"schema": "qkweights.o3/1", "source": {"model_id": model_id}, "layers": layers}


def write(path, doc):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(doc))
    return path


def test_depths_6_and_12_and_known_values(tmp_path):
    # 6 layers: W_k = +W_q in layers 0-2, −W_q in 3-5; 12 layers: + in 0-3, − in 4-11. Every cos_n = ±1 (method.md §2).
    sign6, sign12 = [1] * 3 + [-1] * 3, [1] * 4 + [-1] * 8
    p6 = profile_of(*weights(6, 3, 4, 16, sign=sign6), "test/six")
    p12 = profile_of(*weights(12, 2, 4, 24, seed=1, sign=sign12), "test/twelve")
    paths = write_comparison([p6, p12], tmp_path)
    assert [p.name for p in paths] == [
        "compare_cosine.png",
        "compare_cosine.csv",
        "compare_circuits.png",
        "compare_circuits.csv",
    ]
    rows = read_csv(tmp_path / "compare_cosine.csv")
    assert list(rows[0]) == [
        "model",
        "layer",
        "depth",
        "weighted_cosine",
        "mean_cosine",
        "min",
        "max",
        "model_id",
        "commit",
        "weight_files",
    ]
    for model, sign, L in (("test/six", sign6, 6), ("test/twelve", sign12, 12)):
        np.testing.assert_allclose(column(rows, model, "depth"), np.arange(L) / (L - 1))
        np.testing.assert_array_equal(column(rows, model, "layer"), np.arange(L))
        for key in ("weighted_cosine", "mean_cosine", "min", "max"):
            np.testing.assert_allclose(column(rows, model, key), sign, atol=1e-12)
    with Image.open(tmp_path / "compare_cosine.png") as im:
        assert im.format == "PNG" and im.size[0] >= 800 and im.size[1] >= 400


def test_random_weights_match_dense_svd(tmp_path):
    wq, wk = weights(3, 4, 3, 10, seed=2)
    write_comparison([profile_of(wq, wk, "test/random")], tmp_path)
    rows = read_csv(tmp_path / "compare_cosine.csv")
    weighted = np.empty((3, 4))
    mean = np.empty((3, 4))
    for l in range(3):
        for h in range(4):
            u, s, vt = np.linalg.svd(wq[l, h].T @ wk[l, h])  # dense 10×10, the paper notebook's way
            weighted[l, h] = np.sum(wq[l, h] * wk[l, h]) / s[:3].sum()  # ⟨W_q, W_k⟩_F / ‖W_qᵀW_k‖_*
            mean[l, h] = np.mean(np.sum(u[:, :3] * vt[:3].T, axis=0))  # mean_n u_n·v_n over the rank-3 modes
    np.testing.assert_allclose(column(rows, "test/random", "weighted_cosine"), weighted.mean(1), atol=1e-10)
    np.testing.assert_allclose(column(rows, "test/random", "mean_cosine"), mean.mean(1), atol=1e-10)
    np.testing.assert_allclose(column(rows, "test/random", "min"), weighted.min(1), atol=1e-10)
    np.testing.assert_allclose(column(rows, "test/random", "max"), weighted.max(1), atol=1e-10)


def test_round_trip_via_profile_json(tmp_path):
    p = profile_of(*weights(4, 2, 3, 12, seed=3), "test/saved")
    p.save(tmp_path / "saved")
    write_comparison([p], tmp_path / "a")
    write_comparison([tmp_path / "saved" / "profile.json"], tmp_path / "b")
    write_comparison([str(tmp_path / "saved")], tmp_path / "c")  # the folder holding profile.json
    first = (tmp_path / "a" / "compare_cosine.csv").read_text()
    assert first == (tmp_path / "b" / "compare_cosine.csv").read_text()
    assert first == (tmp_path / "c" / "compare_cosine.csv").read_text()


def test_curves_from_profile():
    p = profile_of(*weights(5, 2, 3, 12, seed=4), "test/curves")
    weighted, mean, sym = curves_from(p)  # no value-output circuit from a W_q/W_k-only checkpoint
    assert isinstance(weighted, Curve)
    assert sym.kind == "symmetric_fraction"
    np.testing.assert_allclose(sym.values, np.mean(p.symmetric, 1))
    np.testing.assert_allclose(sym.hi, np.max(p.symmetric, 1))
    assert (weighted.label, weighted.kind, weighted.hidden) == ("test/curves", "weighted_cosine", 12)
    assert mean.kind == "mean_cosine" and mean.lo is None
    np.testing.assert_allclose(weighted.depth, [0, 0.25, 0.5, 0.75, 1])
    np.testing.assert_allclose(weighted.lo, np.min(p.weighted, 1))
    assert curves_from(p, label="mine")[0].label == "mine"


def test_nan_layer_leaves_empty_cells(tmp_path):
    bad = [(1, h) for h in range(2)]
    p = profile_of(*weights(3, 2, 3, 12, seed=5), "test/nan", nan=bad)
    write_comparison([p], tmp_path)
    row = read_csv(tmp_path / "compare_cosine.csv")[1]
    assert [row[k] for k in ("weighted_cosine", "mean_cosine", "min", "max")] == ["", "", "", ""]
    assert row["depth"] == "0.5"


def test_o3_summaries(tmp_path):
    a = write(tmp_path / "a" / "o3_summary.json", o3_doc(4, model_id="test/o3-a"))
    write(tmp_path / "b" / "o3_summary.json", o3_doc(3, model_id="test/o3-b", depth=True))
    paths = write_comparison([a, tmp_path / "b"], tmp_path / "out")  # b given as its folder
    assert [p.name for p in paths] == ["compare_o3.png", "compare_o3.csv"]
    rows = read_csv(tmp_path / "out" / "compare_o3.csv")
    # depth: l/(L−1) when absent (a), the file's own values l/(2L) when present (b)
    np.testing.assert_allclose(column(rows, "test/o3-a", "depth"), [0, 1 / 3, 2 / 3, 1])
    np.testing.assert_allclose(column(rows, "test/o3-b", "depth"), [0, 1 / 6, 2 / 6])
    np.testing.assert_allclose(column(rows, "test/o3-a", "same_mean"), [0, 0.1, 0.2, 0.3])
    np.testing.assert_allclose(column(rows, "test/o3-a", "same_lo"), [-0.01, 0.09, 0.19, 0.29])
    np.testing.assert_allclose(column(rows, "test/o3-a", "different_hi"), [0.22] * 4)
    np.testing.assert_allclose(column(rows, "test/o3-a", "background_lo"), [0.47, 0.46, 0.45, 0.44])
    with Image.open(tmp_path / "out" / "compare_o3.png") as im:
        assert im.format == "PNG" and im.size[0] > im.size[1]  # three panels side by side


def test_folder_with_profile_and_o3(tmp_path):
    p = profile_of(*weights(3, 2, 3, 12, seed=6), "test/both")
    p.save(tmp_path / "both")
    write(tmp_path / "both" / "o3_summary.json", o3_doc(3, model_id="test/both"))
    assert [c.kind for c in curves_from(tmp_path / "both")] == [
        "weighted_cosine",
        "mean_cosine",
        "symmetric_fraction",
        "o3_same",
        "o3_different",
        "o3_background",
    ]
    assert [p.name for p in write_comparison([tmp_path / "both"], tmp_path / "out")] == [
        "compare_cosine.png",
        "compare_cosine.csv",
        "compare_circuits.png",
        "compare_circuits.csv",
        "compare_o3.png",
        "compare_o3.csv",
    ]


def test_labels_and_duplicates(tmp_path):
    p = profile_of(*weights(2, 2, 3, 12, seed=7), "test/dup")
    write_comparison([p, p], tmp_path / "dup")
    assert {r["model"] for r in read_csv(tmp_path / "dup" / "compare_cosine.csv")} == {"test/dup", "test/dup #2"}
    write_comparison([p, p], tmp_path / "named", labels=["first", "second"])
    assert {r["model"] for r in read_csv(tmp_path / "named" / "compare_cosine.csv")} == {"first", "second"}
    with pytest.raises(InputError, match="1 label"):
        write_comparison([p, p], tmp_path, labels=["only"])
    with pytest.raises(InputError, match="nothing to compare"):
        write_comparison([], tmp_path)


def test_rejects_what_is_not_a_profile(tmp_path):
    other = write(tmp_path / "other.json", {"schema": "something/1"})
    with pytest.raises(
        InputError,
        match=(
            r"other\.json: not a qkweights profile, O3 summary or same-object result "
            r".*qkweights\.profile/2.*qkweights\.same_object/1"
        ),
    ):
        curves_from(other)
    text = tmp_path / "notes.txt"
    text.write_text("hello")
    with pytest.raises(InputError, match=r"notes\.txt: not a JSON file"):
        write_comparison([text], tmp_path / "out")
    with pytest.raises(InputError, match=r"missing\.json: no such file"):
        curves_from(tmp_path / "missing.json")
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="empty: holds no profile.json, o3_summary.json or same_object.json"):
        curves_from(tmp_path / "empty")
    bad = o3_doc(2)
    del bad["layers"][1]["same"]["sem"]
    with pytest.raises(InputError, match=r"bad\.json: malformed O3 layer entry"):
        curves_from(write(tmp_path / "bad.json", bad))
    gap = o3_doc(3)
    del gap["layers"][1]
    with pytest.raises(InputError, match=r"gap\.json: O3 summary layers \[0, 2\]"):
        curves_from(write(tmp_path / "gap.json", gap))
    assert not (tmp_path / "out").exists()


def test_csvs_record_the_weights_they_come_from(tmp_path, capsys):
    """As every output: the repo id, commit, files and sha256 of the weights of each row's model."""
    from qkweights.cli import main

    vit = Path(__file__).parents[1] / "fixtures" / "models" / "vit"
    assert main(["compare", str(vit), "--out", str(tmp_path)]) == 0
    capsys.readouterr()
    digest = hashlib.sha256((vit / "model.safetensors").read_bytes()).hexdigest()
    for row in read_csv(tmp_path / "compare_cosine.csv"):
        assert (row["model_id"], row["commit"], row["weight_files"]) == (str(vit), "", f"model.safetensors:{digest}")
    src = {"model_id": "org/m", "commit": "c" * 40, "files": [{"name": "a.safetensors", "sha256": "d" * 64}]}
    layers = [
        {"layer": l, **{k: {"mean": 0.1, "sem": 0.01} for k in ("same", "different", "background")}} for l in range(2)
    ]
    write_comparison(
        [write(tmp_path / "o3" / "o3_summary.json", {"schema": "qkweights.o3/1", "source": src, "layers": layers})],
        tmp_path / "o",
    )
    rows = read_csv(tmp_path / "o" / "compare_o3.csv")
    assert [(r["model_id"], r["commit"], r["weight_files"]) for r in rows] == [
        ("org/m", "c" * 40, "a.safetensors:" + "d" * 64)
    ] * 2
