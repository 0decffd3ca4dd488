"""Optimal images per mode (qkweights.analyses.top_images): scores, running top-K, resume, odd files, anisotropy.

References: each image run alone through the forward pass and scored by plain Python
loops over tokens in float64 (method.md §5); pairwise cosines by a double loop; the
top-K by one global sort of every score.
"""

import io
import json

import numpy as np
import pytest
from conftest import MODELS
from PIL import Image

from qkweights.analyses.runner import SweepSettings
from qkweights.analyses.sweep import ModeSelection, input_size, list_images, merge_topk, patch_grid
from qkweights.analyses.top_images import (
    STATE_NAME,
    TopImagesAnalysis,
    TopImagesResult,
    mean_pairwise_cosine,
    run_top_images,
    unit_sum,
)
from qkweights.cli import main
from qkweights.datasets.synthetic_o3 import make_o3
from qkweights.errors import InputError
from qkweights.vision.model import open_vision_model
from qkweights.weights.qk import qk_svd

LEFT_OUT = "{}: left out 1 file that Pillow does not read as images: image_properties.txt"  # in the O3 folder


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """9 synthetic scenes (images/ plus their two mask folders: 27 jpg files)."""
    return make_o3(tmp_path_factory.mktemp("o3") / "o3", n=9, seed=1, size=(48, 48))


def brute_force(model, root, paths, layers, heads, modes):
    """{(l, h, n, sign): [(score, stats…, maps, path) per image]} (maps: (2, N), x·u and x·v over the patches) and
    the centre-token embeddings per layer, image by image."""
    rows, centres = {}, {l: [] for l in layers}
    for rel in paths:
        out = model.forward(model.preprocess(root / rel), layers=layers)
        lay = out.layout
        gh, gw = lay.grid
        for l in layers:
            x = out.attention_inputs[l][0].astype(np.float64)
            centres[l].append(x[lay.patches.start + (gh // 2) * gw + gw // 2])
            qk = model.checkpoint.qk(l)
            for h in heads:
                u, _, v = qk_svd(qk.wq[h], qk.wk[h])
                for n in modes:
                    for sign, s in (("+", 1.0), ("-", -1.0)):
                        pq = [s * float(x[t] @ u[:, n]) for t in range(lay.patches.start, lay.patches.stop)]
                        pk = [s * float(x[t] @ v[:, n]) for t in range(lay.patches.start, lay.patches.stop)]
                        top_q, top_k = sorted(pq)[-5:], sorted(pk)[-5:]
                        rows.setdefault((l, h, n, sign), []).append(
                            (
                                max(pq) * max(pk),
                                max(pq),
                                max(pk),
                                sum(pq) / len(pq),
                                sum(pk) / len(pk),
                                sum(top_q) / 5,
                                sum(top_k) / 5,
                                s * np.array([pq, pk]),  # the raw x·u, x·v
                                rel,
                            )
                        )
    return rows, centres


@pytest.mark.parametrize("name", ["vit", "deit", "dinov2-reg"])
@pytest.mark.numerics
def test_scores_against_brute_force(folder, tmp_path, name):
    model = open_vision_model(str(MODELS / name))
    layers, heads, modes = [1], [0, 2], [0, 3]
    paths = list_images(folder)
    result = run_top_images(
        model,
        folder,
        tmp_path,
        selection=ModeSelection(layers=layers, heads=heads, modes=modes, top=len(paths)),
        settings=SweepSettings(batch_size=4),
    )
    doc = result.doc
    # the maps a run returns are the ones its files keep, bit for bit (float16 from the start)
    np.testing.assert_array_equal(TopImagesResult.load(tmp_path).maps, result.maps)
    ref, centres = brute_force(model, folder, paths, layers, heads, modes)
    assert doc["n_images"] == len(paths) == 27 and doc["skipped"] == []
    got = {
        (hd["layer"], hd["head"], m["mode"], sign): winners
        for hd in doc["heads"]
        for m in hd["modes"]
        for sign, winners in m["signs"].items()
    }
    assert set(got) == set(ref)
    for (l, h, n, sign), winners in got.items():
        by_path = {r[-1]: r for r in ref[l, h, n, sign]}
        assert sorted(w["path"] for w in winners) == sorted(by_path)
        for rank, w in enumerate(winners):
            r = by_path[w["path"]]
            maps = result.maps[layers.index(l), heads.index(h) * len(modes) + modes.index(n), "+-".index(sign), rank]
            # the float32 bound below, then float16's rounding (unit roundoff 2⁻¹¹; 2⁻²⁵ absolute below 2⁻¹⁴)
            np.testing.assert_allclose(maps.reshape(2, -1), r[7], rtol=2**-11, atol=2e-5 * (1 + 2**-11) + 2**-25)
            np.testing.assert_allclose(
                [
                    w["score"],
                    w["max_query"],
                    w["max_key"],
                    w["mean_query"],
                    w["mean_key"],
                    w["top5_query"],
                    w["top5_key"],
                ],
                r[:7],
                # float32 projections x·u (D = 32 products, u rounded to float32) against float64 ones of the same x:
                # off by ≲ (√D + 1)·u·|x||u| ≈ 2.3e-6 with |x| ≈ √D after LayerNorm, |u| = 1; a score max_q·max_k
                # (|max| ≲ 3) by ≲ 2·3·2.3e-6 ≈ 1.4e-5
                rtol=2e-5,
                atol=2e-5,
            )
        scores = [w["score"] for w in winners]
        assert scores == sorted(scores, reverse=True)
    # anisotropy: mean over ordered pairs i ≠ j of cos(centre_i, centre_j), by a double loop
    c = centres[1]
    pairs = [
        c[i] @ c[j] / np.linalg.norm(c[i]) / np.linalg.norm(c[j])
        for i in range(len(c))
        for j in range(len(c))
        if i != j
    ]
    assert doc["anisotropy"]["mean_cosine"][0] == pytest.approx(np.mean(pairs), abs=1e-6)


def test_running_topk_equals_global_sort():
    rng = np.random.default_rng(0)
    n, k = 50, 6
    scores = rng.integers(0, 8, size=(3, 2, n)).astype(float)  # many ties
    stats = rng.standard_normal((3, 2, n, 2))
    top_s, top_i, top_x = np.full((3, 2, k), -np.inf), np.full((3, 2, k), -1), np.full((3, 2, k, 2), np.nan)
    for start in range(0, n, 7):
        idx = np.arange(start, min(start + 7, n))
        cat = (
            np.concatenate([top_s, scores[..., idx]], -1),
            np.concatenate([top_i, np.broadcast_to(idx, (3, 2, len(idx)))], -1),
            np.concatenate([top_x, stats[..., idx, :]], -2),
        )
        top_s, top_i, top_x = merge_topk(*cat, k=k)
    for a in range(3):
        for b in range(2):
            order = sorted(range(n), key=lambda i: (-scores[a, b, i], i))[:k]  # score descending, then index
            assert top_i[a, b].tolist() == order
            np.testing.assert_array_equal(top_s[a, b], scores[a, b, order])
            np.testing.assert_array_equal(top_x[a, b], stats[a, b, order])


def test_running_topk_with_fewer_images_than_k():
    top = merge_topk(np.array([[-np.inf] * 4 + [2.0, 5.0]]), np.array([[-1] * 4 + [0, 1]]), np.zeros((1, 6, 1)), k=4)
    assert top[1].tolist() == [[1, 0, -1, -1]]


def test_merging_a_batch_in_place_equals_the_merge_of_its_partial(vit, folder):
    """A shard's in-place top-K (accumulate) and the in-place merge of two shards' (merge_into) give
    merge(partial, compute(batch)) bit for bit, in any order, with exact ties (every image twice) and batches
    larger than K."""
    paths = [p for p in list_images(folder) for _ in range(2)][:22]  # 11 images, each twice in a row
    size = input_size(vit)
    grid = patch_grid(vit, size)
    an = TopImagesAnalysis(
        str(folder.resolve()), (0, 1), (0, 3), (0, 1, 5), 3, size, vit.dims.hidden, grid[0] * grid[1]
    )
    bank = an.setup(vit)
    batches = [an.load(vit, paths[i : i + 5], np.arange(i, min(i + 5, len(paths))))[0] for i in range(0, len(paths), 5)]
    merged, in_place, backwards, first, second = (an.empty() for _ in range(5))
    for batch in batches:
        merged = an.merge(merged, an.compute(vit, bank, batch))
        in_place = an.accumulate(vit, bank, batch, in_place)
    for batch in batches[::-1]:
        backwards = an.accumulate(vit, bank, batch, backwards)
    for batch in batches[:2]:
        first = an.accumulate(vit, bank, batch, first)
    for batch in batches[2:]:
        second = an.accumulate(vit, bank, batch, second)
    halves = an.merge_into(second, first)  # two shards, merged in place
    for got in (in_place, backwards, halves):
        assert got.n_scored == merged.n_scored == len(paths)
        for name, want in an.to_arrays(merged).items():
            np.testing.assert_array_equal(an.to_arrays(got)[name], want, err_msg=name)
    assert (merged.index[..., 0] % 2 == 0).all()  # of two equal copies, the earlier position wins


def test_anisotropy_formula():
    rng = np.random.default_rng(1)
    x = rng.standard_normal((11, 5)) + 0.7  # a shared offset makes the mean cosine clearly positive
    u = x / np.linalg.norm(x, axis=1, keepdims=True)
    brute = np.mean([u[i] @ u[j] for i in range(11) for j in range(11) if i != j])
    s = unit_sum(x[:4]) + unit_sum(x[4:])  # accumulated over two batches
    assert mean_pairwise_cosine(s / 2.0**40, 11) == pytest.approx(brute, rel=1e-10)
    assert brute > 0.2
    assert np.isnan(mean_pairwise_cosine(s, 1))


def interrupt_after(batches):
    calls = []

    def progress(done, total):
        calls.append(done)
        if len(calls) > batches:  # the first call reports the starting point
            raise KeyboardInterrupt

    return progress, calls


@pytest.mark.numerics
def test_resume_gives_the_uninterrupted_result(vit, folder, tmp_path, capsys):
    whole = run_top_images(
        vit,
        folder,
        tmp_path / "whole",
        selection=ModeSelection(layers=[0, 1], heads=[1, 3], modes=range(3), top=4),
        settings=SweepSettings(batch_size=5, shard_size=5),
    )
    out = tmp_path / "resumed"
    progress, calls = interrupt_after(2)
    with pytest.raises(KeyboardInterrupt):
        run_top_images(
            vit,
            folder,
            out,
            selection=ModeSelection(layers=[0, 1], heads=[1, 3], modes=range(3), top=4),
            settings=SweepSettings(batch_size=5, shard_size=5),
            progress=progress,
        )
    assert (out / STATE_NAME).exists() and not (out / "top_images.json").exists()
    assert calls == [0, 5, 10]
    progress, calls = interrupt_after(100)
    notes = []
    resumed = run_top_images(
        vit,
        folder,
        out,
        selection=ModeSelection(layers=[0, 1], heads=[1, 3], modes=range(3), top=4),
        settings=SweepSettings(batch_size=5, shard_size=5),
        progress=progress,
        notes=notes.append,
    )
    assert calls[0] == 10 and calls[-1] == 27  # continued after the last completed shard
    assert notes == [LEFT_OUT.format(folder), f"resuming from {out / STATE_NAME}: 10 of 27 images already done"]
    assert resumed.doc == whole.doc
    np.testing.assert_array_equal(resumed.maps, whole.maps)
    assert json.loads((out / "top_images.json").read_text()) == json.loads(
        (tmp_path / "whole" / "top_images.json").read_text()
    )
    assert not (out / STATE_NAME).exists()


def test_mismatching_state_is_ignored(vit, folder, tmp_path, capsys):
    progress, _ = interrupt_after(1)
    with pytest.raises(KeyboardInterrupt):
        run_top_images(
            vit,
            folder,
            tmp_path / "a",
            selection=ModeSelection(layers=[1], heads=[0], modes=range(2), top=3),
            settings=SweepSettings(batch_size=5, shard_size=5),
            progress=progress,
        )
    progress, calls = interrupt_after(100)
    notes = []
    doc = run_top_images(
        vit,
        folder,
        tmp_path / "a",
        selection=ModeSelection(layers=[1], heads=[0], modes=range(2), top=2),
        settings=SweepSettings(batch_size=5, shard_size=5),
        progress=progress,
        notes=notes.append,
    ).doc  # another --top
    assert notes == [
        LEFT_OUT.format(folder),
        f"{tmp_path / 'a' / STATE_NAME} is from another run (options, model or images differ); ignoring it and "
        "starting over",
    ]
    assert calls[0] == 0
    assert (
        doc
        == run_top_images(
            vit,
            folder,
            tmp_path / "b",
            selection=ModeSelection(layers=[1], heads=[0], modes=range(2), top=2),
            settings=SweepSettings(batch_size=5, shard_size=5),
        ).doc
    )
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / STATE_NAME).write_bytes(b"PK\x03\x04 truncated")
    notes = []
    assert (
        run_top_images(
            vit,
            folder,
            tmp_path / "c",
            selection=ModeSelection(layers=[1], heads=[0], modes=range(2), top=2),
            settings=SweepSettings(batch_size=5, shard_size=5),
            notes=notes.append,
        ).doc
        == doc
    )
    assert len(notes) == 2 and "unreadable" in notes[1]


def _write(im, path, fmt, **kw):
    buf = io.BytesIO()
    im.save(buf, fmt, **kw)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(buf.getvalue())
    return buf.getvalue()


def test_odd_images(vit, folder, tmp_path):
    root = tmp_path / "wild"
    rgb = Image.open(folder / "images" / "synth_0000.jpg").convert("RGB")
    _write(rgb.convert("CMYK"), root / "cmyk.jpg", "JPEG")
    _write(rgb.convert("P"), root / "sub" / "palette.png", "PNG")
    _write(
        Image.fromarray((np.asarray(rgb.convert("L")).astype(np.uint16) * 257)).convert("I;16"),
        root / "deep.png",
        "PNG",
    )
    _write(rgb.convert("L"), root / "sub" / "deeper" / "GREY.PNG", "PNG")
    _write(rgb, root / "photo.WebP", "WEBP")
    _write(rgb, root / "UPPER.JPEG", "JPEG")
    data = _write(rgb, root / "truncated.jpg", "JPEG")
    (root / "truncated.jpg").write_bytes(data[: len(data) // 2])
    (root / "not-an-image.png").write_text("hello")
    (root / "notes.txt").write_text("not listed")
    out = tmp_path / "out"
    doc = run_top_images(
        vit,
        root,
        out,
        selection=ModeSelection(layers=[0], heads=[0], modes=[0], top=10),
        settings=SweepSettings(batch_size=3),
    ).doc
    expected = [
        "UPPER.JPEG",
        "cmyk.jpg",
        "deep.png",
        "not-an-image.png",
        "photo.WebP",
        "sub/deeper/GREY.PNG",
        "sub/palette.png",
        "truncated.jpg",
    ]
    assert list_images(root) == expected  # sorted relative paths, any letter case, recursive
    assert [s["path"] for s in doc["skipped"]] == ["not-an-image.png", "truncated.jpg"]
    assert all("cannot decode" in s["reason"] for s in doc["skipped"])
    assert doc["n_files"] == 8 and doc["n_images"] == 6
    winners = doc["heads"][0]["modes"][0]["signs"]["+"]
    assert sorted(w["path"] for w in winners) == sorted(set(expected) - {"not-an-image.png", "truncated.jpg"})
    # the re-run of the same folder into the same output folder gives the same document
    assert (
        run_top_images(
            vit,
            root,
            out,
            selection=ModeSelection(layers=[0], heads=[0], modes=[0], top=10),
            settings=SweepSettings(batch_size=3),
        ).doc
        == doc
    )


def test_figures_and_cli(folder, tmp_path):
    out = tmp_path / "cli"
    code = main(
        [
            "top-images",
            str(MODELS / "dinov2-reg"),
            str(folder),
            "--layers",
            "1",
            "--heads",
            "2",
            "--modes",
            "0-1",
            "--top",
            "3",
            "--batch-size",
            "8",
            "--out",
            str(out),
            "--quiet",
        ]
    )
    assert code == 0
    doc = json.loads((out / "top_images.json").read_text())
    assert doc["schema"] == "qkweights.top_images/1" and doc["options"]["modes"] == [0, 1]
    assert [len(m["signs"]["+"]) for m in doc["heads"][0]["modes"]] == [3, 3]
    grid = Image.open(out / "top_L1_H2.png")
    assert grid.size[1] > 500  # 4 rows (2 modes × 2 signs) of 1.2-inch cells at 110 dpi, plus title and caption
    assert Image.open(out / "anisotropy.png").size[0] > 600
    assert not (out / STATE_NAME).exists()
    # modes beyond the head dim (8) are dropped, as --modes 0-9 is the default
    assert (
        main(
            [
                "top-images",
                str(MODELS / "vit"),
                str(folder),
                "--layers",
                "0",
                "--heads",
                "0",
                "--modes",
                "6-9",
                "--out",
                str(tmp_path / "clip"),
                "--no-plots",
                "--quiet",
            ]
        )
        == 0
    )
    assert json.loads((tmp_path / "clip" / "top_images.json").read_text())["options"]["modes"] == [6, 7]


def test_empty_folder(vit, tmp_path):
    (tmp_path / "empty").mkdir()
    assert (
        main(["top-images", str(MODELS / "vit"), str(tmp_path / "empty"), "--out", str(tmp_path / "o"), "--quiet"]) == 2
    )


def test_fold_ln_scores_the_folded_modes_on_the_normalised_tokens(vit, folder, tmp_path):
    # Reference: dense SVD of Γ W_qᵀ W_k Γ (D×D, numpy), n = (x − mean)/√(var + eps) of the residual stream by hand,
    # each image alone. A pair's sign is arbitrary, so each image's two scores (+, −) are compared as a set.
    layer, head, modes = 1, 2, [0, 1]
    paths = list_images(folder)
    doc = run_top_images(
        vit,
        folder,
        tmp_path,
        selection=ModeSelection(layers=[layer], heads=[head], modes=modes, top=len(paths)),
        settings=SweepSettings(batch_size=4),
        fold_ln=True,
    ).doc
    assert doc["options"]["fold_ln"] and doc["embedding"].startswith("n: the normalised token")
    ck = vit.checkpoint
    qk = ck.qk(layer)
    norm = ck.norm1(layer)
    m = (norm.gamma[:, None] * (qk.wq[head].T @ qk.wk[head])) * norm.gamma[None, :]  # Γ W_qᵀ W_k Γ (D, D)
    u, s, vt = np.linalg.svd(m)
    for n in modes:
        got = {w["path"]: [] for w in doc["heads"][0]["modes"][n]["signs"]["+"]}
        for sign in ("+", "-"):
            for w in doc["heads"][0]["modes"][n]["signs"][sign]:
                got[w["path"]].append(w["score"])
        for rel in paths:
            out = vit.forward(vit.preprocess(folder / rel), layers=[layer])
            x = out.hidden_states[layer][0, out.layout.patches].astype(np.float64)  # (N, D)
            nt = (x - x.mean(1, keepdims=True)) / np.sqrt(x.var(1, keepdims=True) + vit.weights.eps)
            pq, pk = nt @ u[:, n], nt @ vt[n]
            ref = sorted([pq.max() * pk.max(), (-pq).max() * (-pk).max()])
            np.testing.assert_allclose(sorted(got[rel]), ref, rtol=1e-4, atol=1e-5)


def test_no_readable_image_is_an_error_and_keeps_the_outputs(folder, tmp_path, capsys):
    out = tmp_path / "out"
    args = [str(MODELS / "vit"), "--layers", "0", "--heads", "0", "--modes", "0", "--out", str(out), "--quiet"]
    assert main(["top-images", args[0], str(folder / "images"), *args[1:]]) == 0
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "a.jpg").write_text("not a jpeg")
    (bad / "b.png").symlink_to(tmp_path / "nowhere.png")  # a broken link
    assert main(["top-images", args[0], str(bad), *args[1:]]) == 2
    err = capsys.readouterr().err
    assert (
        err.startswith(f"qkweights: error: {bad}: none of the 2 images could be read (first: a.jpg: ")
        and err.count("\n") == 1
    )
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before


def test_a_broken_link_is_skipped_and_listed(vit, folder, tmp_path):
    root = tmp_path / "imgs"
    root.mkdir()
    for p in sorted((folder / "images").iterdir())[:3]:
        (root / p.name).write_bytes(p.read_bytes())
    (root / "broken.jpg").symlink_to(tmp_path / "nowhere.jpg")
    out = tmp_path / "out"
    doc = run_top_images(vit, root, out, selection=ModeSelection(layers=[0], heads=[0], modes=[0])).doc
    assert doc["n_images"] == 3 and [s["path"] for s in doc["skipped"]] == ["broken.jpg"]
    assert "no such image file" in doc["skipped"][0]["reason"]


def test_images_are_what_pillow_reads_in_any_case_and_the_rest_is_counted(vit, folder, tmp_path):
    from qkweights.analyses.sweep import other_files

    root = tmp_path / "mixed"
    rgb = Image.open(folder / "images" / "synth_0000.jpg").convert("RGB")
    _write(rgb.convert("P"), root / "anim.gif", "GIF")
    _write(rgb, root / "UP.PNG", "PNG")
    _write(rgb, root / "sub" / "b.Bmp", "BMP")
    _write(rgb, root / "c.TIFF", "TIFF")
    (root / "notes.txt").write_text("not an image")
    (root / "sub" / "labels.json").write_text("{}")
    (root / ".DS_Store").write_bytes(b"\0")  # hidden: neither an image nor counted
    assert list_images(root) == ["UP.PNG", "anim.gif", "c.TIFF", "sub/b.Bmp"]
    assert other_files(root) == ["notes.txt", "sub/labels.json"]
    notes = []
    doc = run_top_images(
        vit,
        root,
        tmp_path / "out",
        selection=ModeSelection(layers=[0], heads=[0], modes=[0], top=4),
        notes=notes.append,
    ).doc
    assert (doc["n_files"], doc["n_images"], doc["n_other_files"], doc["skipped"]) == (4, 4, 2, [])
    assert notes == [f"{root}: left out 2 files that Pillow does not read as images: notes.txt, sub/labels.json"]


def test_an_image_folder_that_is_none_says_why(tmp_path):
    (tmp_path / "afile").write_text("x")
    (tmp_path / "loop").symlink_to(tmp_path / "loop")
    (tmp_path / "dangling").symlink_to(tmp_path / "gone")
    for name, why in [
        ("afile", "is a file, not a folder"),
        ("loop", "is a symbolic link that leads nowhere (a loop, or a missing target)"),
        ("dangling", "is a symbolic link that leads nowhere (a loop, or a missing target)"),
        ("gone", "no such folder"),
    ]:
        with pytest.raises(InputError) as e:
            list_images(tmp_path / name)
        assert str(e.value) == f"{tmp_path / name}: {why}; give a folder of images"
