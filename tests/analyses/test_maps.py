"""Projection maps of one image on one head (qkweights.analyses.maps) and the red/cyan overlay
(qkweights.figures.overlay).

References are computed here from the weights themselves (``Checkpoint.qk``: W_q, W_k,
b_q, b_k in float64) and from the forward pass's token embeddings, by plain loops or
dense products that never use the SVD.
"""

import hashlib
import json
import math

import numpy as np
import pytest
from conftest import MODELS
from PIL import Image

from qkweights.analyses.maps import choose_signs, projection_maps
from qkweights.cli import main
from qkweights.datasets.synthetic_o3 import make_o3
from qkweights.errors import InputError
from qkweights.figures.overlay import composite, scale_map
from qkweights.vision.model import open_vision_model
from qkweights.vision.preprocess import display_image
from qkweights.workflow import save_maps


@pytest.fixture(scope="module")
def image(tmp_path_factory):
    return make_o3(tmp_path_factory.mktemp("o3") / "o3", n=1, seed=3, size=(48, 48)) / "images" / "synth_0000.jpg"


@pytest.fixture(scope="module", params=["vit", "deit", "dinov2-reg"])
def model(request):
    return open_vision_model(str(MODELS / request.param))


def embeddings(model, image, layer):
    """(x_ln (T, D), x_residual (T, D), attention (H, T, T), layout) of one image, float64."""
    out = model.forward(model.preprocess(image), attentions=True, layers=[layer])
    return (
        out.attention_inputs[layer][0].astype(np.float64),
        out.hidden_states[layer][0].astype(np.float64),
        out.attentions[layer][0].astype(np.float64),
        out.layout,
    )


@pytest.mark.numerics
def test_decomposition_reproduces_bilinear_logits(model, image):
    # Σ_n σ_n query_n ⊗ key_n over all K modes = x_iᵀ W_qᵀ W_k x_j (method.md §1), W from the checkpoint.
    layer, head, k = 1, 2, model.dims.head_dim
    maps = projection_maps(model, image, layer=layer, head=head, modes=range(k))
    x, _, _, lay = embeddings(model, image, layer)
    qk = model.checkpoint.qk(layer)
    xp = x[lay.patches]  # (N, D)
    reference = (xp @ qk.wq[head].T) @ (qk.wk[head] @ xp.T)  # (N, N)
    q = maps.query.reshape(k, -1)
    kk = maps.key.reshape(k, -1)
    got = np.einsum("n,ni,nj->ij", maps.singular_values, q, kk)
    np.testing.assert_allclose(got, reference, rtol=1e-10, atol=1e-10 * np.abs(reference).max())
    assert maps.query.shape == (k, *lay.grid)


def test_residual_embedding_projects_hidden_states(image):
    model = open_vision_model(str(MODELS / "vit"))
    maps = projection_maps(model, image, layer=1, head=0, modes=[0, 3], embedding="residual")
    _, h, _, lay = embeddings(model, image, 1)
    from qkweights.weights.qk import qk_svd

    qk = model.checkpoint.qk(1)
    u, _, v = qk_svd(qk.wq[0], qk.wk[0])
    np.testing.assert_allclose(maps.query.reshape(2, -1), (h[lay.patches] @ u[:, [0, 3]]).T, rtol=1e-12)
    np.testing.assert_allclose(maps.key.reshape(2, -1), (h[lay.patches] @ v[:, [0, 3]]).T, rtol=1e-12)


def test_choose_signs_by_hand():
    # mode 0: + gives max q·max k = 3·2 = 6, − gives (−min q)(−min k) = 1·1 = 1 → "+"
    # mode 1: + gives 1·0.5 = 0.5, − gives 4·3 = 12 → "−"
    # mode 2: + gives 2·2 = 4, − gives 2·2 = 4 → tie → "+"
    # mode 3: + gives (−1)·5 = −5 (every x·u < 0), − gives 3·(−2) = −6 → "+"
    q = np.array([[3.0, -1.0, 0.0], [1.0, -4.0, 0.0], [2.0, -2.0, 0.0], [-1.0, -3.0, -2.0]])
    k = np.array([[2.0, -1.0, 0.0], [0.5, -3.0, 0.0], [2.0, -2.0, 1.0], [5.0, 2.0, 3.0]])
    np.testing.assert_array_equal(choose_signs(q, k), [1, -1, 1, 1])


def test_signs_follow_the_maps(image):
    model = open_vision_model(str(MODELS / "vit"))
    maps = projection_maps(model, image, layer=1, head=1, modes=range(8))
    for n in range(8):
        q, k = maps.query[n].ravel(), maps.key[n].ravel()
        plus, minus = q.max() * k.max(), (-q).max() * (-k).max()  # the two responses, spelled out
        assert maps.signs[n] == (-1 if minus > plus else 1)
    assert set(maps.signs.tolist()) == {1, -1}  # this head shows both signs among its modes


@pytest.mark.numerics
def test_top_ordering_against_brute_force(model, image):
    layer, head, k = 1, 3, model.dims.head_dim
    maps = projection_maps(model, image, layer=layer, head=head, top=k)
    x, _, att, _ = embeddings(model, image, layer)
    a = att[head]  # (T, T)
    qk = model.checkpoint.qk(layer)
    # The attention the forward pass used is the softmax of the full logits, biases included (method.md §1).
    logits = (x @ qk.wq[head].T + qk.bq[head]) @ (x @ qk.wk[head].T + qk.bk[head]).T / math.sqrt(k)
    p = np.exp(logits - logits.max(1, keepdims=True))
    np.testing.assert_allclose(a, p / p.sum(1, keepdims=True), atol=2e-6)
    from qkweights.weights.qk import qk_svd

    u, s, v = qk_svd(qk.wq[head], qk.wk[head])
    t = x.shape[0]
    brute = np.zeros(k)
    for n in range(k):
        for i in range(t):
            for j in range(t):
                brute[n] += a[i, j] * (x[i] @ u[:, n]) * (v[:, n] @ x[j])
        brute[n] *= s[n] / math.sqrt(k)
    order = sorted(range(k), key=lambda n: -abs(brute[n]))
    assert maps.modes.tolist() == order
    np.testing.assert_allclose(maps.contributions, brute[order], rtol=1e-9, atol=1e-12)
    # Σ_n c_n = Σ_ij a_ij x_iᵀW_qᵀW_k x_j / √K, from the weights without the SVD
    bilinear = (x @ qk.wq[head].T) @ (qk.wk[head] @ x.T) / math.sqrt(k)
    assert maps.contributions.sum() == pytest.approx((a * bilinear).sum(), rel=1e-9)


def test_scale_map_and_composite():
    m = np.array([[-2.0, 0.0, 1.0, 100.0]] + [[0.5, 0.5, 0.5, 0.5]] * 3)  # one outlier token
    scale = np.percentile(np.abs(m), 99)  # 97.03 by numpy's linear interpolation
    np.testing.assert_allclose(scale_map(m, 1), np.clip(np.maximum(m, 0) / scale, 0, 1))
    np.testing.assert_allclose(scale_map(m, -1)[0, 0], 2.0 / scale)
    assert scale_map(np.zeros((2, 2))).max() == 0
    img = np.full((4, 4, 3), 0.5)
    q = np.array([[1.0, 0.0], [1.0, 0.0]])
    k = np.array([[1.0, 1.0], [0.0, 0.0]])
    c = composite(img, q, k)  # 2×2 patches of 2×2 pixels
    grey = 0.45 * 0.5  # DIM × luminance of mid-grey
    np.testing.assert_allclose(c[0, 0], [1, 1, 1])  # both high: white
    np.testing.assert_allclose(c[2, 0], [1, grey, grey])  # query only: red
    np.testing.assert_allclose(c[0, 2], [grey, 1, 1])  # key only: cyan
    np.testing.assert_allclose(c[2, 2], [grey] * 3)  # neither: the dimmed image


def test_display_image_inverts_preprocessing(image):
    model = open_vision_model(str(MODELS / "deit"))
    prep = model.preprocessing
    px = model.preprocess(image)[0]
    resized = (
        Image.open(image).convert("RGB").resize((36, 36), resample=3).crop((2, 2, 34, 34))
    )  # DeiT: resize 36, crop 32
    np.testing.assert_allclose(
        display_image(px, prep.mean, prep.std, prep.rescale), np.asarray(resized) / 255, atol=1e-5
    )


def test_save_maps_and_cli(image, tmp_path):
    model = open_vision_model(str(MODELS / "vit"))
    maps = projection_maps(model, image, layer=0, head=1, top=3)
    png, npz = save_maps(maps, tmp_path / "lib")
    assert png.name == "maps_L0_H1_ln.png" and Image.open(png).size[0] > 600
    with np.load(npz) as z:
        assert str(z["embedding"]) == "ln"
        np.testing.assert_array_equal(z["query"], maps.query)
        np.testing.assert_array_equal(z["signs"], maps.signs)
        assert z["key"].shape == (3, 4, 4) and z["modes"].tolist() == maps.modes.tolist()
    code = main(
        [
            "maps",
            str(MODELS / "vit"),
            str(image),
            "--layer",
            "0",
            "--head",
            "1",
            "--top",
            "3",
            "--out",
            str(tmp_path / "cli"),
        ]
    )
    assert code == 0
    with np.load(tmp_path / "cli" / "maps_L0_H1_ln.npz") as z:
        np.testing.assert_array_equal(z["query"], maps.query)


def test_maps_record_the_weights_and_the_image(image, tmp_path):
    """As every output: the model id, the files read and their sha256; and the image the maps are of."""
    model = open_vision_model(str(MODELS / "vit"))
    npz = save_maps(projection_maps(model, image, layer=1, head=0), tmp_path)[1]
    with np.load(npz) as z:
        source = json.loads(str(z["source"]))
        assert str(z["model_id"]) == str(MODELS / "vit") == source["model_id"]
        assert str(z["image_path"]) == str(image)
    digest = hashlib.sha256((MODELS / "vit" / "model.safetensors").read_bytes()).hexdigest()
    assert source["files"] == [
        {"name": "model.safetensors", "bytes": (MODELS / "vit" / "model.safetensors").stat().st_size, "sha256": digest}
    ]


def test_ln_and_residual_maps_do_not_overwrite_each_other(image, tmp_path, capsys):
    for embedding in ("ln", "residual"):
        assert (
            main(
                [
                    "maps",
                    str(MODELS / "vit"),
                    str(image),
                    "--layer",
                    "0",
                    "--head",
                    "1",
                    "--embedding",
                    embedding,
                    "--out",
                    str(tmp_path),
                ]
            )
            == 0
        )
    capsys.readouterr()
    assert sorted(p.name for p in tmp_path.glob("maps_*")) == [
        "maps_L0_H1_ln.npz",
        "maps_L0_H1_ln.png",
        "maps_L0_H1_residual.npz",
        "maps_L0_H1_residual.png",
    ]
    with np.load(tmp_path / "maps_L0_H1_ln.npz") as z:
        assert str(z["embedding"]) == "ln"


def test_folder_or_huge_image_is_one_line_saying_so(image, tmp_path, capsys, monkeypatch):
    assert (
        main(["maps", str(MODELS / "vit"), str(image.parent), "--layer", "0", "--head", "0", "--out", str(tmp_path)])
        == 2
    )
    assert (
        capsys.readouterr().err
        == f"qkweights: error: {image.parent}: is a folder; give one image file (PNG, JPEG, …)\n"
    )
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)  # the 48×48 image is then a "decompression bomb"
    assert main(["maps", str(MODELS / "vit"), str(image), "--layer", "0", "--head", "0", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err == (
        f"qkweights: error: {image}: the image is larger than the 200 pixels Pillow decodes (a guard against "
        f"decompression bombs); downscale it (the model sees at most a few hundred pixels a side)\n"
    )


def test_bad_arguments(image):
    model = open_vision_model(str(MODELS / "vit"))
    with pytest.raises(InputError, match="layer 2 is out of range"):
        projection_maps(model, image, layer=2, head=0)
    with pytest.raises(InputError, match="mode 8 is out of range"):
        projection_maps(model, image, layer=0, head=0, modes=[8])
    with pytest.raises(InputError, match="either modes or top"):
        projection_maps(model, image, layer=0, head=0, modes=[1], top=2)
    with pytest.raises(SystemExit):
        main(["maps", str(MODELS / "vit"), str(image), "--layer", "0", "--head", "0", "--modes", "0", "--top", "2"])
