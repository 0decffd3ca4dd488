"""The shipped demo model (qkweights/demo_model) and the ``demo`` command.

The accuracy claims checked here are the ones tests/fixtures/train_demo_model.py measured on
2000 held-out scenes and stored under ``qkweights_demo`` in the model's config.json; they are
re-measured on scenes of a stream the training never drew (stream 3: training used 0, the
held-out set 1, the demo image 2), with qkweights' own numpy forward pass and preprocessing.
"""

import json

import numpy as np
import pytest
from safetensors.numpy import load_file

import qkweights
from qkweights.cli import main
from qkweights.datasets.synthetic_o3 import FEATURES, draw_scene, make_o3
from qkweights.demo import N_SCENES, SCENE_SEED, demo_model_folder, extreme_heads, scene_folder
from qkweights.errors import InputError
from qkweights.vision.model import open_vision_model

FRESH_STREAM = 3
N_CHECK = 200
# Binomial standard error at n = 200 is at most 0.035; 0.1 is about three of them.
MARGIN = 0.1


@pytest.fixture(scope="module")
def folder():
    return demo_model_folder()


@pytest.fixture(scope="module")
def card(folder):
    return json.loads((folder / "config.json").read_text())["qkweights_demo"]


@pytest.fixture(scope="module")
def model(folder):
    return open_vision_model(str(folder))


@pytest.fixture(scope="module")
def fresh(model, folder):
    """Predictions of both heads on N_CHECK fresh scenes: (cell hits, feature hits, features, objects per scene)."""
    h, w = model.dims.image_size
    patch = model.dims.patch_size
    scenes = [draw_scene(np.random.default_rng([FRESH_STREAM, 0, i]), size=(h, w)) for i in range(N_CHECK)]
    tensors = load_file(folder / "model.safetensors")
    last = np.concatenate(
        [
            model.forward(model.preprocess([s[0] for s in scenes[i : i + 50]])).last_hidden_state
            for i in range(0, N_CHECK, 50)
        ]
    )  # (B, T, D)
    cell_logits = last[:, 1:] @ tensors["token_classifier.weight"][0] + tensors["token_classifier.bias"][0]  # (B, N)
    feature_logits = last[:, 0] @ tensors["classifier.weight"].T + tensors["classifier.bias"]  # (B, 4)
    gw = w // patch
    cells = np.array(
        [int(s[3]["target_centre"][1] // patch) * gw + int(s[3]["target_centre"][0] // patch) for s in scenes]
    )
    features = np.array([FEATURES.index(s[3]["feature"]) for s in scenes])
    objects = np.array([s[3]["num_distractors"] + 1 for s in scenes])
    return cell_logits.argmax(1) == cells, feature_logits.argmax(1) == features, features, objects


def test_shipped_files_are_small_hf_vit(folder, model):
    size = (folder / "model.safetensors").stat().st_size
    assert size < 2_000_000
    assert model.checkpoint.spec.name == "hf-vit"
    d = model.dims
    assert (d.layers, d.heads, d.hidden, d.patch_size) == (4, 4, 64, 8)
    assert model.preprocessing_origin == "preprocessor_config.json"
    image = model.preprocess(folder / "demo.jpg")
    assert image.shape == (1, 3, *d.image_size)


def test_profile_is_finite_and_trained(folder):
    prof = qkweights.profile(str(folder), progress=False)
    assert prof.weighted.shape == (4, 4)
    assert np.isfinite(prof.singular_values).all() and np.isfinite(prof.weighted).all()
    assert (prof.singular_values[..., 0] > 0).all()
    # Reference: |weighted cosine| of heads with independent Gaussian W_q, W_k (K, D) as at initialisation,
    # brute force over 500 draws with the identity cos_avg = <W_q, W_k>_F / ||W_q^T W_k||_* (method.md §2);
    # the largest is about 0.11 for K = 16, D = 64. Training moved most heads well past it.
    rng = np.random.default_rng(0)
    k, d = prof.model.head_dim, prof.model.hidden
    draws = [
        (q * w).sum() / np.linalg.svd(q.T @ w, compute_uv=False).sum()
        for q, w in (rng.standard_normal((2, k, d)) for _ in range(500))
    ]
    assert np.median(np.abs(prof.weighted)) > np.abs(draws).max()


def test_where_accuracy_claim_holds(fresh, card):
    hits, _, _, objects = fresh
    claim = card["held_out"]["where_accuracy"]
    assert hits.mean() >= claim - MARGIN
    # Far above both chance levels: a uniform guess over the cells, and a random pick among the objects.
    chance_object = float(np.mean(1 / objects))
    assert hits.mean() > 2 * chance_object
    assert chance_object == pytest.approx(card["held_out"]["chance_where_random_object"], abs=0.03)


def test_where_accuracy_by_feature(fresh, card):
    hits, _, features, _ = fresh
    colour = hits[features == FEATURES.index("color")]
    assert colour.mean() >= card["held_out"]["where_accuracy_by_feature"]["color"] - 2 * MARGIN


def test_what_accuracy_claim_holds(fresh, card):
    _, hits, _, _ = fresh
    assert hits.mean() >= card["held_out"]["what_accuracy"] - MARGIN


def test_extreme_heads_hand_computed():
    weighted = np.array([[0.1, np.nan, -0.3], [0.5, 0.2, 0.0]])
    assert extreme_heads(weighted) == [(0, 2), (1, 0)]


def test_scene_folder_refuses_a_foreign_folder(tmp_path):
    (tmp_path / "scenes").mkdir()
    (tmp_path / "scenes" / "holiday.jpg").write_bytes(b"not ours")
    with pytest.raises(InputError, match="not the demo's"):
        scene_folder(tmp_path, (64, 64))


def test_scene_folder_reuses_its_own_scenes(tmp_path):
    made = make_o3(tmp_path / "scenes", n=N_SCENES, seed=SCENE_SEED, size=(64, 64))
    before = (made / "images" / "synth_0000.jpg").stat().st_mtime_ns
    assert scene_folder(tmp_path, (64, 64)) == made
    assert (made / "images" / "synth_0000.jpg").stat().st_mtime_ns == before


def test_demo_command_writes_everything(tmp_path, capsys):
    # About 10 s on the 2-core reference machine (the whole demo), so it stays in the default suite.
    out = tmp_path / "demo"
    assert main(["demo", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert printed == (out / "summary.txt").read_text()
    assert str(out / "maps") in printed and "held-out: target cell" in printed
    assert f"{out / 'atlas' / 'index.html'}  the atlas" in printed
    for name in (
        "atlas/index.html",
        "profile/profile.json",
        "profile/heads.csv",
        "profile/cosine_by_layer.png",
        "top_images/top_images.json",
        "top_images/anisotropy.png",
        "o3/o3_summary.json",
        "o3/o3.csv",
        "o3/o3_by_layer.png",
        "same_object/same_object.json",
        "same_object/same_object.csv",
        "same_object/same_object_by_layer.png",
        "same_object/same_object_examples.png",
        "summary.txt",
    ):
        assert (out / name).is_file(), name
    prof = json.loads((out / "profile" / "profile.json").read_text())
    weighted = np.array([[h["weighted_cosine"] for h in layer["heads"]] for layer in prof["layers"]])
    (l0, h0), (l1, h1) = extreme_heads(weighted)
    for l, h in ((l0, h0), (l1, h1)):
        maps = np.load(out / "maps" / f"maps_L{l}_H{h}_ln.npz")
        assert maps["query"].shape == (4, 8, 8)  # top 4 modes on the 8×8 patch grid of a 64×64 input
        assert (out / "top_images" / f"top_L{l}_H{h}.png").is_file()
    assert weighted[l0, h0] == weighted.min() and weighted[l1, h1] == weighted.max()
    assert len(list((out / "scenes" / "images").glob("*.jpg"))) == N_SCENES
    o3 = json.loads((out / "o3" / "o3_summary.json").read_text())
    assert o3["images_used"] == N_SCENES
    top = json.loads((out / "top_images" / "top_images.json").read_text())
    assert top["n_images"] == N_SCENES
    same = json.loads((out / "same_object" / "same_object.json").read_text())
    assert same["dataset"]["layout"] == "generic" and same["dataset"]["n_eligible"] == N_SCENES
    assert len(same["layers"]) == 4 and all(
        0 <= e["probability"] <= 1 and 0 < e["chance"] < 0.5 for e in same["layers"]
    )
    assert "same_object_by_layer.png" in printed


@pytest.mark.slow
def test_transformers_reads_the_shipped_model(folder, model):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    hf = transformers.ViTForImageClassification.from_pretrained(folder, attn_implementation="eager").eval()
    pixels = model.preprocess(folder / "demo.jpg")
    with torch.no_grad():
        want = hf(pixel_values=torch.from_numpy(pixels)).logits.numpy()  # transformers: classifier on CLS
    tensors = load_file(folder / "model.safetensors")
    got = model.forward(pixels).last_hidden_state[:, 0] @ tensors["classifier.weight"].T + tensors["classifier.bias"]
    np.testing.assert_allclose(got, want, atol=1e-4)
