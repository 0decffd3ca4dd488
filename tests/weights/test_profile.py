"""Profiles of every fixture against the paper's dense SVD, computed from an independent reading of the files."""

import hashlib
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import MODELS, edited_fixture, vit_qk_name
from hubcache import make_hub_cache
from safetensors.numpy import load_file, save_file

import qkweights
from qkweights.cli import main
from qkweights.errors import InputError
from qkweights.weights.load import load_profile

# Independent of model_specs/: each fixture's query/key tensor names as written by transformers / timm / open_clip
# (tests/fixtures/make_fixtures.py), and how the (out, in) rows split into q and k.
HF = ("encoder.layer.{i}.attention.attention.{p}.weight", "query", "key")
CLIP = ("vision_model.encoder.layers.{i}.self_attn.{p}_proj.weight", "q", "k")
REFERENCE_NAMES = {
    "vit": HF,
    "vit-bf16": HF,
    "vit-f16": HF,
    "vit-h3": HF,
    "dinov2": HF,
    "dinov2-reg": HF,
    "dinov2-swiglu": HF,
    "ijepa": HF,
    "vit-cls": ("vit." + HF[0], "query", "key"),
    "deit": ("deit." + HF[0], "query", "key"),
    "clip": CLIP,
    "clip-vision": CLIP,
    "bert": ("encoder.layer.{i}.attention.self.{p}.weight", "query", "key"),
    "roberta-mlm": ("roberta.encoder.layer.{i}.attention.self.{p}.weight", "query", "key"),
    "timm-vit": ("blocks.{i}.attn.qkv.weight", None, None),
    "timm-vit-reg": ("blocks.{i}.attn.qkv.weight", None, None),
    "open-clip": ("visual.transformer.resblocks.{i}.attn.in_proj_weight", None, None),
    "deit-h3": ("deit." + HF[0], "query", "key"),
    "timm-deit": ("blocks.{i}.attn.qkv.weight", None, None),
    "timm-beit": ("blocks.{i}.attn.qkv.weight", None, None),
}
HEADS = {"vit-h3": 3, "timm-vit": 3, "deit-h3": 3, "timm-deit": 3}


def reference_weights(name):
    """(L, H, K, D) query and key weights read with the safetensors package itself (BF16 via torch-free widening)."""
    folder = MODELS / name
    tensors = {}
    for f in sorted(folder.glob("*.safetensors")):
        if name == "vit-bf16":
            from safetensors.torch import load_file as load_torch  # safetensors.numpy cannot read BF16

            tensors.update({k: v.float().numpy() for k, v in load_torch(str(f)).items()})
        else:
            tensors.update(load_file(str(f)))
    (template, qname, kname), heads = REFERENCE_NAMES[name], HEADS.get(name, 4)
    wq, wk = [], []
    for i in range(2):
        if qname:
            q, k = tensors[template.format(i=i, p=qname)], tensors[template.format(i=i, p=kname)]
        else:  # fused rows [q | k | v]
            qkv = tensors[template.format(i=i)]
            d = qkv.shape[1]
            q, k = qkv[:d], qkv[d : 2 * d]
        d = q.shape[1]
        wq.append(q.astype(np.float64).reshape(heads, d // heads, d))
        wk.append(k.astype(np.float64).reshape(heads, d // heads, d))
    return np.array(wq), np.array(wk)


@pytest.mark.parametrize("name", sorted(REFERENCE_NAMES))
@pytest.mark.numerics
def test_profile_matches_dense_svd(name):
    if name == "vit-bf16":
        pytest.importorskip("torch")
    prof = qkweights.profile(str(MODELS / name), save_vectors=True)
    wq, wk = reference_weights(name)
    L, H, K, D = wq.shape
    assert prof.singular_values.shape == (L, H, K) and prof.U.shape == (L, H, D, K)
    for l in range(L):
        for h in range(H):
            u, s, vt = np.linalg.svd(wq[l, h].T @ wk[l, h])  # the paper's method: dense D×D SVD
            s, cos = s[:K], np.sum(u[:, :K] * vt[:K].T, 0)
            np.testing.assert_allclose(prof.singular_values[l, h], s, rtol=1e-9)
            tied = np.zeros(K, bool)
            for b in prof.degenerate[l][h]:
                tied[b["start"] : b["stop"]] = True
            np.testing.assert_allclose(prof.cosines[l, h][~tied], cos[~tied], atol=1e-8)
            frob = np.sum(wq[l, h] * wk[l, h])
            assert np.sum(prof.singular_values[l, h] * prof.cosines[l, h]) == pytest.approx(frob, rel=1e-10, abs=1e-12)
            assert prof.weighted[l, h] == pytest.approx(np.sum(s * cos) / s.sum(), abs=1e-8)


@pytest.mark.numerics
def test_bf16_and_f16_profiles_are_close_to_f32():
    f32, bf16, f16 = (qkweights.profile(str(MODELS / n)) for n in ("vit", "vit-bf16", "vit-f16"))
    assert bf16.model.dtype == "BF16" and f16.model.dtype == "F16"
    np.testing.assert_allclose(bf16.singular_values, f32.singular_values, rtol=2e-2)
    np.testing.assert_allclose(f16.singular_values, f32.singular_values, rtol=2e-3)


def test_save_and_load_round_trip(tmp_path):
    prof = qkweights.profile(str(MODELS / "deit"), save_vectors=True)
    written = prof.save(tmp_path)
    assert sorted(p.name for p in written) == ["heads.csv", "modes.npz", "profile.json"]
    doc = json.loads((tmp_path / "profile.json").read_text())
    assert doc["schema"] == "qkweights.profile/2"
    assert doc["model"] == {
        **doc["model"],
        "family": "hf-deit",
        "layers": 2,
        "heads": 4,
        "hidden": 32,
        "head_dim": 8,
        "dtype": "F32",
    }
    assert doc["null_band_95"] == pytest.approx(1.959963984540054 / np.sqrt(32))
    assert set(doc["layers"][0]) == {
        "layer",
        "weighted_cosine",
        "mean_cosine",
        "min",
        "max",
        "std",
        "symmetric_fraction",
        "ov_weighted_cosine",
        "heads",
    }
    head = doc["layers"][1]["heads"][3]
    assert set(head) >= {
        "head",
        "weighted_cosine",
        "mean_cosine",
        "trace",
        "nuclear_norm",
        "singular_values",
        "cosines",
        "degenerate_blocks",
    }
    assert head["head"] == 3 and len(head["cosines"]) == 8
    assert doc["layers"][1]["weighted_cosine"] == pytest.approx(np.mean(prof.weighted[1]))
    assert doc["source"]["files"][0]["name"] == "model.safetensors" and len(doc["source"]["files"][0]["sha256"]) == 64
    back = load_profile(tmp_path)
    for field in (
        "singular_values",
        "cosines",
        "weighted",
        "mean",
        "trace",
        "nuclear",
        "effective_rank",
        "U",
        "V",
        "symmetric",
    ):
        np.testing.assert_array_equal(getattr(back, field), getattr(prof, field))
    for field in ("singular_values", "cosines", "weighted", "degenerate"):
        np.testing.assert_array_equal(getattr(back.ov, field), getattr(prof.ov, field))
    assert back.salience is None and doc["model"]["folded"] is None
    assert back.model == prof.model and back.degenerate == prof.degenerate
    rows = (tmp_path / "heads.csv").read_text().splitlines()
    assert rows[0].startswith("layer,head,weighted_cosine") and len(rows) == 1 + 2 * 4


def test_cli_profile_table_and_files(tmp_path, capsys):
    assert main(["profile", str(MODELS / "vit"), "--out", str(tmp_path), "--no-plots"]) == 0
    out = capsys.readouterr().out
    assert "family hf-vit  2 layers × 4 heads  width 32  head dim 8  F32" in out
    assert "null band (95%, random unit vectors in R^32): ±0.3465" in out
    assert (tmp_path / "profile.json").exists() and not list(tmp_path.glob(".*tmp*"))


def test_cli_json_to_stdout(tmp_path, capsys):
    assert main(["profile", str(MODELS / "timm-vit"), "--out", str(tmp_path), "--json", "--no-plots"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["model"]["family"] == "timm-vit" and doc["model"]["heads"] == 3


def test_nonfinite_weights_exit_1(tmp_path, capsys):
    folder = shutil.copytree(MODELS / "vit", tmp_path / "vit")
    t = load_file(str(folder / "model.safetensors"))
    t["encoder.layer.1.attention.attention.key.weight"][9, 3] = np.nan  # row 9 = head 1 (K = 8)
    save_file(t, str(folder / "model.safetensors"))
    assert main(["profile", str(folder), "--out", str(tmp_path / "out"), "--no-plots"]) == 1
    err = capsys.readouterr().err
    assert err.strip() == "qkweights: non-finite weights in 1 head(s): L1 H1"
    doc = json.loads((tmp_path / "out" / "profile.json").read_text())
    assert doc["nonfinite_heads"] == [{"layer": 1, "head": 1}]
    assert (
        doc["layers"][1]["heads"][1]["weighted_cosine"] is None
        and doc["layers"][1]["heads"][0]["weighted_cosine"] is not None
    )


@pytest.mark.parametrize(
    "args, message",
    [
        (["profile", "/no/such/folder"], "qkweights: error: /no/such/folder: no such file or folder"),
        (
            ["profile", str(MODELS / "vit"), "--family", "hf-clip"],
            "qkweights: error: the checkpoint is not of family 'hf-clip'",
        ),
    ],
)
def test_input_errors_exit_2_with_one_line(args, message, capsys):
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.startswith(message) and err.count("\n") == 1


def test_hub_repo_from_offline_cache(tmp_path, hub_cache, capsys):
    files = {p.name: p for p in (MODELS / "vit-cls").iterdir()}
    make_hub_cache(hub_cache, "qkw-test/tiny-vit", files, commit="c" * 40)
    prof = qkweights.profile("qkw-test/tiny-vit")
    assert (
        prof.source["model_id"] == "qkw-test/tiny-vit"
        and prof.source["commit"] == "c" * 40
        and prof.source["kind"] == "hub"
    )
    assert sorted(f["name"] for f in prof.source["files"]) == sorted(n for n in files if n.endswith(".safetensors"))
    np.testing.assert_array_equal(prof.singular_values, qkweights.profile(str(MODELS / "vit-cls")).singular_values)


def test_default_model_offline_not_cached_is_one_clear_line(tmp_path):
    env = {"HF_HUB_CACHE": str(tmp_path), "HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"}
    res = subprocess.run(
        [sys.executable, "-m", "qkweights", "profile", "--out", str(tmp_path / "o")],
        capture_output=True,
        text=True,
        env=env,
        cwd=MODELS.parents[2],
    )
    assert res.returncode == 2
    assert res.stderr.startswith("qkweights: error: google/vit-base-patch16-224") and res.stderr.count("\n") == 1
    assert "Traceback" not in res.stderr


def test_rerun_without_vectors_removes_the_old_modes_npz(tmp_path, capsys):
    out = str(tmp_path / "o")
    assert main(["profile", str(MODELS / "vit"), "--out", out, "--save-vectors", "--no-plots"]) == 0
    assert main(["profile", str(MODELS / "vit-h3"), "--out", out, "--no-plots"]) == 0
    assert sorted(p.name for p in (tmp_path / "o").iterdir()) == [
        ".qkweights-profile.json",
        "heads.csv",
        "profile.json",
    ]
    assert main(["diff", out, out, "--out", str(tmp_path / "d"), "--no-plots", "--quiet"]) == 0
    capsys.readouterr()


def test_rerun_with_no_plots_removes_the_old_figures(tmp_path, capsys):
    assert main(["profile", str(MODELS / "vit"), "--out", str(tmp_path), "--quiet"]) == 0
    assert (tmp_path / "cosine_by_layer.png").exists()
    assert main(["profile", str(MODELS / "vit"), "--out", str(tmp_path), "--quiet", "--no-plots"]) == 0
    assert not list(tmp_path.glob("*.png"))


def test_modes_npz_of_another_run_is_refused(tmp_path, capsys):
    """A modes.npz beside a profile.json it was not written with (copied, or an older qkweights) is never paired with
    it."""
    a, b = tmp_path / "a", tmp_path / "b"
    qkweights.profile(str(MODELS / "vit"), save_vectors=True).save(a)
    qkweights.profile(str(MODELS / "vit-cls"), save_vectors=True).save(b)
    shutil.copy(a / "modes.npz", b / "modes.npz")
    with pytest.raises(
        InputError,
        match=rf"^{b / 'modes.npz'}: belongs to another run than profile.json beside it .*; "
        rf"profile again with save_vectors=True into {b}, or delete modes.npz$",
    ):
        load_profile(b)
    assert load_profile(b, vectors=False).U is None
    assert main(["diff", str(b), str(a), "--out", str(tmp_path / "d"), "--no-plots"]) == 2
    assert capsys.readouterr().err.startswith(f"qkweights: error: {b / 'modes.npz'}: belongs to another run")
    assert main(["check", str(MODELS / "vit-cls"), "--baseline", str(b), "--quiet"]) == 0  # check needs no vectors


@pytest.mark.parametrize(
    "edit, message",
    [
        (
            lambda d: d["layers"][0]["heads"][1].update(weighted_cosine="0.5"),
            'field layers[0].heads[1].weighted_cosine is "0.5"; expected a number (or null)',
        ),
        (
            lambda d: d["layers"][1]["heads"][0].update(singular_values=[]),
            "field layers[1].heads[0].singular_values has 0 values; model.head_dim says 8",
        ),
        (lambda d: d["layers"].pop(), "field layers has 1 entries; model.layers says 2"),
        (lambda d: d["layers"][0]["heads"][2].pop("cosines"), "field layers[0].heads[2].cosines is missing"),
        (lambda d: d["model"].update(heads="4"), 'field model.heads is "4"; expected an integer'),
        (lambda d: d.update(nonfinite_heads=[{"layer": 7, "head": 0}]), "field nonfinite_heads[0] must be"),
        (
            lambda d: d["layers"][0]["heads"][0].update(degenerate_blocks=[{"start": 3}]),
            "field layers[0].heads[0].degenerate_blocks[0] must hold integers",
        ),
    ],
)
def test_hand_edited_baseline_is_one_line_naming_the_field(tmp_path, capsys, edit, message):
    qkweights.profile(str(MODELS / "vit")).save(tmp_path)
    doc = json.loads((tmp_path / "profile.json").read_text())
    edit(doc)
    (tmp_path / "profile.json").write_text(json.dumps(doc))
    assert main(["check", str(MODELS / "vit"), "--baseline", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"qkweights: error: {tmp_path / 'profile.json'}: {message}") and err.count("\n") == 1
    assert err.rstrip().endswith("re-run `python -m qkweights profile` to rewrite the file")


def test_all_zero_head_has_no_mean_cosine(tmp_path):
    def zero_head(t):
        t[vit_qk_name(0, "query")][0:8] = 0  # rows 0-7 = head 0 (K = 8)

    prof = qkweights.profile(str(edited_fixture(tmp_path, "zero", zero_head)))
    assert np.isnan(prof.weighted[0, 0]) and np.isnan(prof.mean[0, 0])
    assert np.isfinite(prof.mean[0, 1:]).all()
    prof.save(tmp_path / "out")
    assert json.loads((tmp_path / "out" / "profile.json").read_text())["layers"][0]["heads"][0]["mean_cosine"] is None


def test_one_layer_one_head_table_is_singular(tmp_path, capsys):
    folder = edited_fixture(tmp_path, "one", lambda t: [t.pop(k) for k in list(t) if k.startswith("encoder.layer.1.")])
    cfg = json.loads((folder / "config.json").read_text())
    cfg.update(num_hidden_layers=1, num_attention_heads=1)
    (folder / "config.json").write_text(json.dumps(cfg))
    assert main(["profile", str(folder), "--out", str(tmp_path / "o"), "--no-plots"]) == 0
    assert f"{folder}  family hf-vit  1 layer × 1 head  width 32  head dim 32  F32" in capsys.readouterr().out


@pytest.mark.parametrize("a, b", [("./模型", "./模型"), ("./模型", "./机器"), ("./a b", "./a_b")])
def test_default_output_folders_keep_names_apart(a, b):
    from qkweights.cli.common import model_slug

    assert (model_slug(a) == model_slug(b)) == (a == b)
    # the readable name, then the first 6 hex digits of sha256 of what picks the weights (here the repo id alone)
    assert (
        model_slug("google/vit-base-patch16-224")
        == "vit-base-patch16-224-" + hashlib.sha256(b"google/vit-base-patch16-224\0\0").hexdigest()[:6]
        == "vit-base-patch16-224-7b4e8c"  # the README's example
    )
    assert model_slug("./模型").startswith("模型-")
    assert (
        len({model_slug("org/m"), model_slug("other/m"), model_slug("org/m", "v2"), model_slug("org/m", None, "p")})
        == 4
    )


def test_two_models_of_one_name_get_their_own_default_folders(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    for run in ("run1", "run2"):
        shutil.copytree(MODELS / "vit", tmp_path / run / "final")
    assert main(["profile", "run1/final", "--no-plots", "--quiet"]) == 0
    assert main(["profile", "run2/final", "--no-plots", "--quiet"]) == 0
    assert main(["profile", str(tmp_path / "run1" / "final"), "--no-plots", "--quiet"]) == 0  # the same model again
    folders = sorted((tmp_path / "qkweights-out").iterdir())
    assert [f.name.rsplit("-", 1)[0] for f in folders] == ["final", "final"]  # one folder per model, both kept
    models = {json.loads((f / "profile.json").read_text())["source"]["model_id"] for f in folders}
    assert {str(Path(m).resolve()) for m in models} == {str(tmp_path / r / "final") for r in ("run1", "run2")}


@pytest.mark.numerics
def test_profile_is_the_same_whatever_the_threads():
    # Each layer's float64 QR and SVD run in one Python thread on one BLAS thread (compute_profile pins it), on the
    # same data: bit-identical by construction whatever the number of layer threads or the BLAS threads outside.
    from threadpoolctl import threadpool_limits

    from qkweights.specs.load import open_model
    from qkweights.weights.compute import compute_profile

    _, ck = open_model(str(MODELS / "deit"))
    ref = compute_profile(ck, {}, save_vectors=True, workers=1)
    for blas in (1, 2):
        with threadpool_limits(blas, user_api="blas"):
            for workers in (2, 3):
                got = compute_profile(ck, {}, save_vectors=True, workers=workers)
                assert got.json_text() == ref.json_text()
                np.testing.assert_array_equal(got.U, ref.U)
                np.testing.assert_array_equal(got.V, ref.V)
