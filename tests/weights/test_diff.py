"""diff: per-head change between two checkpoints, on the tiny ViT fixture and edited copies.

The fixture (tests/fixtures/models/vit) has 2 layers, 4 heads, D = 32, K = 8. Edited heads get
weights whose SVD is known by hand: with orthonormal rows e_i (standard basis vectors),
W_q = diag(c) E and W_k = diag(c) E give W_qᵀW_k = Σ c_i² e_i e_iᵀ (σ = c², U = V = span E,
every cos_n = 1). Rotating the rows, f_i = cos θ e_i + sin θ e_{8+i}, turns U into span F,
whose principal angles with span E are all θ. Principal angles are also checked against
scipy.linalg.subspace_angles.
"""

import json

import numpy as np
import pytest
import scipy.linalg
from conftest import MODELS, edited_fixture, read_csv, vit_qk_name
from PIL import Image
from safetensors.numpy import load_file

import qkweights
from qkweights.cli import main
from qkweights.figures.diff import heatmaps_figure
from qkweights.weights.diff import diff_profiles, principal_angles

VIT = MODELS / "vit"
D, K = 32, 8


name = vit_qk_name


def edited(tmp_path, label, heads):
    """A copy of the vit fixture whose heads are replaced: heads = {(l, h): (wq (K, D), wk (K, D))}."""

    def replace(t):
        for (l, h), (wq, wk) in heads.items():
            t[name(l, "query")][h * K : (h + 1) * K] = wq
            t[name(l, "key")][h * K : (h + 1) * K] = wk

    return edited_fixture(tmp_path, label, replace)


def rows(c, angle=0.0, offset=K):
    """diag(c) @ R: row i = c_i (cos(angle) e_i + sin(angle) e_{offset+i}), (K, D) float32."""
    r = np.zeros((K, D))
    r[np.arange(K), np.arange(K)] = np.cos(angle)
    r[np.arange(K), offset + np.arange(K)] = np.sin(angle)
    return (np.asarray(c, np.float64)[:, None] * r).astype(np.float32)


C = np.sqrt(np.arange(8, 0, -1.0))  # σ = c² = 8, 7, …, 1 (distinct)
THETA, PHI = np.radians(30.0), np.radians(60.0)


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    """A and B: in L1 H2, B's query rows are rotated by 30° and key rows by 60° (into different directions);
    in L0 H1, both have U = V = span E, A with σ = 8…1, B with σ all 1; every other head is the fixture's."""
    tmp = tmp_path_factory.mktemp("diff")
    a = edited(tmp, "a", {(1, 2): (rows(C), rows(C)), (0, 1): (rows(C), rows(C))})
    b = edited(tmp, "b", {(1, 2): (rows(C, THETA, 8), rows(C, PHI, 16)), (0, 1): (rows(np.ones(K)), rows(np.ones(K)))})
    return a, b


def test_same_model_twice_is_all_zero(tmp_path, capsys):
    assert main(["diff", str(VIT), str(VIT), "--out", str(tmp_path), "--quiet", "--no-plots"]) == 0
    assert capsys.readouterr().out == ""
    doc = json.loads((tmp_path / "diff.json").read_text())
    assert doc["schema"] == "qkweights.diff/1" and doc["k"] == 8 and doc["notes"] == []
    for row in doc["heads"]:
        assert row["delta_weighted_cosine"] == 0 and row["spectrum_tv"] == 0 and row["sigma_ratio"] == 1
        assert max(row["angles_u_deg"] + row["angles_v_deg"]) < 1e-6
        assert row["overlap_u"] == pytest.approx(1, abs=1e-12) and row["overlap_v"] == pytest.approx(1, abs=1e-12)
    assert sorted(p.name for p in tmp_path.iterdir()) == [".qkweights-diff.json", "diff.json", "diff_heads.csv"]


def test_known_rotations_and_spectrum(pair, tmp_path, capsys):
    a, b = pair
    assert main(["diff", str(a), str(b), "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out.splitlines()
    rows_ = json.loads((tmp_path / "diff.json").read_text())["heads"]
    top, second = rows_[0], rows_[1]
    # L1 H2: U rotated by θ = 30°, V by φ = 60°; cos_n = f_i·g_i = cos θ cos φ in B, 1 in A; σ unchanged.
    assert (top["rank"], top["layer"], top["head"]) == (1, 1, 2)
    assert top["angles_u_deg"] == pytest.approx([30.0] * 8, abs=1e-4)  # float32 storage of the weights
    assert top["angles_v_deg"] == pytest.approx([60.0] * 8, abs=1e-4)
    assert top["overlap_u"] == pytest.approx(0.75, abs=1e-6) and top["overlap_v"] == pytest.approx(0.25, abs=1e-6)
    assert top["weighted_cosine_a"] == pytest.approx(1, abs=1e-6)
    assert top["delta_weighted_cosine"] == pytest.approx(np.cos(THETA) * np.cos(PHI) - 1, abs=1e-6)
    assert top["spectrum_tv"] == pytest.approx(0, abs=1e-6) and top["sigma_ratio"] == pytest.approx(1, abs=1e-6)
    score = (abs(np.cos(THETA) * np.cos(PHI) - 1) / 2 + 0 + 0.25 + 0.75) / 4
    assert top["score"] == pytest.approx(score, abs=1e-6)
    # L0 H1: σ 8…1 → all 1: p_A = n/36, p_B = 1/8; TV = ½ Σ |n/36 − 4.5/36| = ½ · 16/36 = 2/9. Σσ 36 → 8.
    assert (second["layer"], second["head"]) == (0, 1)
    assert second["spectrum_tv"] == pytest.approx(2 / 9, abs=1e-6) and second["sigma_ratio"] == pytest.approx(
        8 / 36, abs=1e-6
    )
    assert second["max_angle_u_deg"] == pytest.approx(0, abs=1e-3)  # k = K: the whole row space, unchanged
    assert second["score"] == pytest.approx(2 / 9 / 4, abs=1e-6)
    for row in rows_[2:]:  # untouched heads, in (layer, head) order
        assert row["score"] == pytest.approx(0, abs=1e-9)
    assert [(r["layer"], r["head"]) for r in rows_[2:]] == [(0, 0), (0, 2), (0, 3), (1, 0), (1, 1), (1, 3)]
    assert out[1].split() == [
        "1",
        "L1",
        "H2",
        f"{np.cos(THETA) * np.cos(PHI) - 1:+.4f}",
        "0.0000",
        "30.0",
        "60.0",
        f"{score:.4f}",
    ]
    table = read_csv(tmp_path / "diff_heads.csv")
    assert list(table[0])[:3] == ["rank", "layer", "head"] and (table[0]["layer"], table[0]["head"]) == ("1", "2")
    for png in ("diff_heatmaps.png", "diff_cosine.png"):
        with Image.open(tmp_path / png) as im:
            assert im.size[0] > 600 and im.size[1] > 300


def test_top_k_subspaces(pair):
    a, b = (qkweights.profile(str(p), save_vectors=True) for p in pair)
    d = diff_profiles(a, b, k=3)
    assert d.k == 3 and d.angles_u.shape == (2, 4, 3)
    np.testing.assert_allclose(d.angles_u[1, 2], 30.0, atol=1e-4)  # span(f_0…f_2) vs span(e_0…e_2): all θ
    np.testing.assert_allclose(d.angles_v[1, 2], 60.0, atol=1e-4)
    assert any("top-3 subspace not unique" in n and "L0 H1 (B)" in n for n in d.notes)  # B's σ are all tied
    assert diff_profiles(a, b, k=20).k == K


def test_saved_profiles_without_vectors(pair, tmp_path):
    a, b = pair
    qkweights.profile(str(a), save_vectors=True).save(tmp_path / "pa")
    qkweights.profile(str(b)).save(tmp_path / "pb")
    assert (
        main(
            [
                "diff",
                str(tmp_path / "pa"),
                str(tmp_path / "pb" / "profile.json"),
                "--out",
                str(tmp_path / "d"),
                "--quiet",
                "--no-plots",
            ]
        )
        == 0
    )
    doc = json.loads((tmp_path / "d" / "diff.json").read_text())
    assert doc["notes"] == [
        "no singular vectors for B (profile without modes.npz): subspace angles omitted; "
        "profile with save_vectors=True or pass the checkpoints"
    ]
    top = doc["heads"][0]
    assert top["max_angle_u_deg"] is None and "angles_u_deg" not in top
    # Without angles the score is the mean of |Δw|/2 and the spectrum TV; L1 H2 still ranks first.
    assert (top["layer"], top["head"]) == (1, 2)
    assert top["score"] == pytest.approx(abs(np.cos(THETA) * np.cos(PHI) - 1) / 4, abs=1e-6)


def test_nonfinite_and_collapsed_heads_rank_first(tmp_path, capsys):
    # A head that became NaN or all-zero is the largest change of all: it must not rank below unchanged heads.
    nan, zero = np.full((K, D), np.nan, np.float32), np.zeros((K, D), np.float32)
    wk = load_file(VIT / "model.safetensors")[name(1, "key")][K : 2 * K]
    changed = {lh: (rows(C), rows(C)) for lh in ((0, 1), (0, 2), (0, 3), (1, 0), (1, 2))}  # 5 measured changes
    pa = edited(tmp_path, "a", {(0, 0): (nan, nan), (1, 1): (zero, wk), **changed})
    a = qkweights.profile(str(pa), save_vectors=True)
    b = qkweights.profile(str(VIT), save_vectors=True)
    d = diff_profiles(a, b)
    assert d.ranking()[:2] == [(0, 0), (1, 1)]
    assert sorted(d.ranking()[2:7]) == sorted(changed) and all(np.isfinite(d.score[lh]) for lh in d.ranking()[2:])
    for l, h in ((0, 0), (1, 1)):
        assert np.isnan(d.angles_u[l, h]).all() and np.isnan(d.score[l, h])
    assert d.notes == (
        "non-finite weights, measures undefined: L0 H0",
        "collapsed heads (σ_0 = 0), measures undefined: L1 H1 (A)",
    )
    written = d.save(tmp_path / "out")
    assert [p.name for p in written] == ["diff.json", "diff_heads.csv"]
    texts = [t.get_text() for ax in heatmaps_figure(d).axes for t in ax.texts]
    # both heads grey-labelled in each of the six query-key panels, and in the Δ symmetric fraction panel
    # (undefined for M = 0 or NaN); their value-output circuits are intact, so the Δ OV panel has values.
    assert texts.count("n/a") == 2 * 6 + 2
    # the score panel marks measured heads with their rank in the table: #3 … #7 (ranks 1, 2 are the undefined heads)
    assert [t for t in texts if t.startswith("#")] == ["#3", "#4", "#5", "#6", "#7"]
    first = read_csv(tmp_path / "out" / "diff_heads.csv")[0]
    assert (first["rank"], first["layer"], first["head"], first["score"], first["max_angle_u_deg"]) == (
        "1",
        "0",
        "0",
        "",
        "",
    )
    assert main(["diff", str(pa), str(VIT), "--out", str(tmp_path / "cli"), "--no-plots"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[1].split() == ["1", "L0", "H0", "n/a", "n/a", "n/a", "n/a", "n/a"]
    assert out[2].split() == ["2", "L1", "H1", "n/a", "n/a", "n/a", "n/a", "n/a"]
    assert "note: collapsed heads (σ_0 = 0), measures undefined: L1 H1 (A)" in out


def test_families_of_the_same_shape_get_a_note(tmp_path, capsys):
    # vit (hf-vit) and dinov2 (hf-dinov2) fixtures: both 2 layers × 4 heads, D = 32, K = 8
    assert main(["diff", str(VIT), str(VIT.parent / "dinov2"), "--out", str(tmp_path), "--no-plots"]) == 0
    note = "families differ (A: hf-vit, B: hf-dinov2); the shapes match, so heads are compared by index"
    assert f"note: {note}" in capsys.readouterr().out.splitlines()
    assert json.loads((tmp_path / "diff.json").read_text())["notes"] == [note]


def test_architecture_mismatch_exits_2(tmp_path, capsys):
    h3 = VIT.parent / "vit-h3"
    assert main(["diff", str(VIT), str(h3), "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "hf-vit, 2 layers × 4 heads, D = 32, K = 8" in err and "hf-vit, 2 layers × 3 heads, D = 48, K = 16" in err
    assert not tmp_path.exists() or not any(tmp_path.iterdir())


def test_principal_angles_match_scipy():
    rng = np.random.default_rng(0)
    qa = np.linalg.qr(rng.standard_normal((20, 4)))[0]
    qb = np.linalg.qr(rng.standard_normal((20, 4)))[0]
    tiny = np.linalg.qr(qa + 1e-9 * rng.standard_normal((20, 4)))[0]  # angles ~1e-9 rad: arccos alone would give ~1e-8
    ortho = np.linalg.qr(np.hstack([qa, rng.standard_normal((20, 4))]))[0][:, 4:]  # all angles 90°
    for b in (qb, tiny, ortho):
        ours = principal_angles(qa[None], b[None])[0]  # ascending
        ref = np.sort(scipy.linalg.subspace_angles(qa, b))
        np.testing.assert_allclose(ours, ref, rtol=1e-6, atol=1e-15)
    np.testing.assert_allclose(principal_angles(qa, ortho), np.pi / 2, atol=1e-12)


def test_rerun_with_no_plots_removes_the_old_figures(tmp_path, capsys):
    out = str(tmp_path / "d")
    assert main(["diff", str(VIT), str(VIT), "--out", out, "--quiet"]) == 0
    assert sorted(p.name for p in (tmp_path / "d").glob("*.png")) == ["diff_cosine.png", "diff_heatmaps.png"]
    assert main(["diff", str(VIT), str(VIT), "--out", out, "--quiet", "--no-plots"]) == 0
    assert sorted(p.name for p in (tmp_path / "d").iterdir()) == [".qkweights-diff.json", "diff.json", "diff_heads.csv"]
