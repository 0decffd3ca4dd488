"""Figures of a weight profile: what they draw, and that every figure survives NaN heads.

Profiles come from ``compute_profile`` run on a small in-memory checkpoint
(an object with ``dims``, ``qk(l)``, ``spec`` and ``dtype()``, the interface
``compute_profile`` reads), or are filled directly where a test needs exact σ.
"""

import json
from types import SimpleNamespace

import numpy as np
import pytest
from matplotlib.collections import PathCollection, PolyCollection
from matplotlib.patches import Rectangle
from PIL import Image

from qkweights.figures import DPI, profiles
from qkweights.figures.o3 import o3_plot
from qkweights.figures.same_object import same_object_plot
from qkweights.weights.compute import compute_profile
from qkweights.weights.profile import ModelInfo, Profile


def checkpoint(L, H, K, D, *, seed=0, sign=None, nan=()):
    """Random Gaussian W_q per head; W_k = sign[l]·W_q when ``sign`` is given, else independent Gaussian.

    ``nan``: (layer, head) pairs whose W_q gets one NaN entry.
    """
    rng = np.random.default_rng(seed)
    wq = rng.standard_normal((L, H, K, D))
    wk = rng.standard_normal((L, H, K, D)) if sign is None else np.asarray(sign, float)[:, None, None, None] * wq
    wq = wq.copy()
    for l, h in nan:
        wq[l, h, 0, 0] = np.nan
    return SimpleNamespace(
        dims=SimpleNamespace(layers=L, heads=H, head_dim=K, hidden=D),
        qk=lambda l: SimpleNamespace(wq=wq[l], wk=wk[l]),
        spec=SimpleNamespace(name="test-family", logit_terms=()),
        dtype=lambda: "F64",
    )


def profile_of(L, H, K, D, **kw):
    return compute_profile(checkpoint(L, H, K, D, **kw), {"model_id": f"test/{L}x{H}"})


def filled_profile(S, C, hidden=16):
    """A Profile with the given σ (L, H, K) and cos (L, H, K); per-head statistics from them."""
    S, C = np.asarray(S, float), np.asarray(C, float)
    L, H, K = S.shape
    nuclear = S.sum(-1)
    with np.errstate(invalid="ignore", divide="ignore"):
        weighted = (S * C).sum(-1) / nuclear
    nonfinite = [(l, h) for l, h in zip(*np.nonzero(~np.isfinite(weighted)))]
    return Profile(
        ModelInfo("test-family", L, H, hidden, K, "F64"),
        {"model_id": "test/filled"},
        S,
        C,
        weighted,
        C.mean(-1),
        (S * C).sum(-1),
        nuclear,
        np.ones((L, H)),
        [[[] for _ in range(H)] for _ in range(L)],
        nonfinite,
    )


def line(ax, prefix):
    return next(ln for ln in ax.lines if ln.get_label().startswith(prefix))


def test_cosine_by_layer_draws_known_values():
    # W_k = +W_q in layers 0-2 and −W_q in 3-5: W_qᵀW_k = ±W_qᵀW_q, so u_n = ±v_n and every cos_n = ±1 (method.md §2).
    p = profile_of(6, 3, 4, 16, sign=[1, 1, 1, -1, -1, -1])
    ax = profiles.cosine_by_layer_figure(p).axes[0]
    expected = [1, 1, 1, -1, -1, -1]
    np.testing.assert_allclose(line(ax, "weighted cosine").get_ydata(), expected, atol=1e-12)
    np.testing.assert_allclose(line(ax, "unweighted cosine").get_ydata(), expected, atol=1e-12)
    np.testing.assert_allclose(line(ax, "weighted cosine").get_xdata(), np.arange(6) / 5)  # l/(L−1)
    labels = [t.get_text() for t in ax.get_legend().get_texts()]
    assert any("±0.490" in t for t in labels)  # 1.96/√16 = 0.49
    assert ax.get_title().startswith("test/6x3 (test-family")


def test_profile_figures_write_pngs(tmp_path):
    p = profile_of(12, 12, 8, 32, seed=1)
    paths = profiles.profile_figures(p, tmp_path)
    # the test checkpoint offers W_q/W_k only: no value-output circuit, so no ov_cosine_by_layer.png
    assert [x.name for x in paths] == [
        "cosine_by_layer.png",
        "spectrum_grid.png",
        "cosine_hist.png",
        "symmetry_by_layer.png",
    ]
    for path in paths:
        with Image.open(path) as im:
            assert im.format == "PNG"
            w, h = im.size
            assert 600 <= w <= 24 * DPI and 400 <= h <= 24 * DPI, (path.name, im.size)
    assert sorted(x.name for x in tmp_path.iterdir()) == sorted(x.name for x in paths)  # no temporary files left


def test_nan_heads_do_not_crash(tmp_path):
    # head 1 of layer 2 and all of layer 4 have a NaN weight: their statistics are NaN.
    bad = [(2, 1)] + [(4, h) for h in range(3)]
    p = profile_of(6, 3, 4, 16, seed=2, nan=bad)
    assert sorted(p.nonfinite) == bad
    assert len(profiles.profile_figures(p, tmp_path)) == 4
    ax = profiles.cosine_by_layer_figure(p).axes[0]
    y = line(ax, "weighted cosine").get_ydata()
    assert np.isnan(y[4]) and np.isfinite(np.delete(y, 4)).all()
    grid = profiles.spectrum_grid_figure(p).axes[0]
    assert sum(isinstance(a, Rectangle) and bool(a.get_hatch()) for a in grid.patches) == len(bad)
    hist = profiles.cosine_hist_figure(p).axes[0]
    assert len(hist.lines) == 5 + 1  # five finite layers, plus the zero line


def test_all_heads_nan(tmp_path):
    p = profile_of(2, 2, 4, 16, nan=[(0, 0), (0, 1), (1, 0), (1, 1)])
    assert len(profiles.profile_figures(p, tmp_path)) == 3  # no finite symmetric fraction: no symmetry_by_layer.png


def test_modes_carrying():
    # σ = [4, 3, 2, 1]: cumulative shares 0.4, 0.7, 0.9, 1.0 (hand-computed).
    s = np.array([[4.0, 3, 2, 1]])
    assert profiles.modes_carrying(s, 0.95) == 4
    assert profiles.modes_carrying(s, 0.9) == 3
    assert profiles.modes_carrying(s, 0.4) == 1
    # the largest count over heads; NaN and all-zero heads are ignored.
    s = np.array([[10.0, 0, 0, 0], [4, 3, 2, 1], [np.nan] * 4, [0.0] * 4])
    assert profiles.modes_carrying(s, 0.8) == 3
    assert profiles.modes_carrying(np.full((2, 5), np.nan)) == 5


def bars(ax):
    return sum(len(c.get_paths()) for c in ax.collections if isinstance(c, PolyCollection))


def test_spectrum_grid_draws_every_mode_for_vit_b():
    # ViT-B: 12 × 12 heads, K = 64 — cells are 1.4 in wide, ≥ 2 px per mode: every mode is drawn.
    S = np.broadcast_to(np.linspace(2, 1, 64), (12, 12, 64))
    fig = profiles.spectrum_grid_figure(filled_profile(S, np.zeros_like(S), hidden=768))
    ax = fig.axes[0]
    assert bars(ax) == 12 * 12 * 64
    assert [t.get_text() for t in ax.get_xticklabels()] == [f"H{h}" for h in range(12)]
    assert [t.get_text() for t in ax.get_yticklabels()] == [f"L{l}" for l in range(12)]
    assert max(fig.get_size_inches()) <= 24


def test_spectrum_grid_truncates_a_huge_grid():
    # 32 × 16 heads, K = 80: cells of 22/16 in give < 2 px per mode, so only the modes carrying 95% of Σσ are drawn.
    # σ = 1 for modes 0-9 and 0 after: 95% of Σσ = 10 needs all ten (9 modes carry 90%).
    S = np.zeros((32, 16, 80))
    S[..., :10] = 1.0
    fig = profiles.spectrum_grid_figure(filled_profile(S, np.zeros_like(S), hidden=1280))
    assert bars(fig.axes[0]) == 32 * 16 * 10
    assert max(fig.get_size_inches()) <= 24
    assert any("0…9 of 80" in t.get_text() for t in fig.texts)


def test_spectrum_grid_places_values():
    # One head, σ = [2, 1], cos = [1, −1]: bar heights σ_n/σ_0 = 1, 0.5; dots at the cell's top (+1) and bottom (−1).
    fig = profiles.spectrum_grid_figure(filled_profile([[[2.0, 1.0]]], [[[1.0, -1.0]]]))
    ax = fig.axes[0]
    pad, inner = profiles.GRID_PAD, 1 - 2 * profiles.GRID_PAD
    heights = [
        np.ptp(p.vertices[:, 1]) for p in next(c for c in ax.collections if isinstance(c, PolyCollection)).get_paths()
    ]
    np.testing.assert_allclose(heights, [inner / 2, inner / 4])  # half the cell's inner height is the range 0…1
    dots = next(c for c in ax.collections if isinstance(c, PathCollection)).get_offsets()
    np.testing.assert_allclose(np.asarray(dots)[:, 1], [1 - pad, pad])


def test_cosine_hist_known_distributions():
    # Layers 0-2 have every cos_n = +1, layers 3-5 −1: all mass in the last (resp. first) bin of [−1, 1].
    p = profile_of(6, 3, 4, 16, sign=[1, 1, 1, -1, -1, -1])
    left, right = profiles.cosine_hist_figure(p).axes[:2]
    width = 2 / profiles.HIST_BINS
    for ax in (left, right):
        curves = [ln for ln in ax.lines if len(ln.get_xdata()) == profiles.HIST_BINS]
        assert len(curves) == 6
        for l, ln in enumerate(curves):
            y = ln.get_ydata()
            assert y[-1 if l < 3 else 0] * width == pytest.approx(1.0)


def test_cosine_hist_sigma_weighting():
    # One head, σ = [3, 1], cos = [0.5, −0.5]: unweighted mass 1/2 at each; σ-weighted 3/4 at +0.5, 1/4 at −0.5.
    p = filled_profile([[[3.0, 1.0]]], [[[0.5, -0.5]]])
    left, right = profiles.cosine_hist_figure(p).axes[:2]
    for ax, (lo, hi) in ((left, (0.5, 0.5)), (right, (0.25, 0.75))):
        ln = next(ln for ln in ax.lines if len(ln.get_xdata()) == profiles.HIST_BINS)
        x, y = np.asarray(ln.get_xdata()), np.asarray(ln.get_ydata())
        width = x[1] - x[0]
        assert y[x < 0].sum() * width == pytest.approx(lo)
        assert y[x > 0].sum() * width == pytest.approx(hi)


# ---- one analysed layer: every legend entry must put something on the axes (a one-point dashed line or a one-point
# band draws nothing)


def draws_something(artist) -> bool:
    """Whether a legend entry's artist leaves ink on its axes."""
    from matplotlib.collections import LineCollection
    from matplotlib.container import ErrorbarContainer
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch

    if isinstance(artist, ErrorbarContainer):
        return any(draws_something(a) for a in (artist.lines[0], *artist.lines[2]) if a is not None)
    if isinstance(artist, Line2D):
        x, y = np.asarray(artist.get_xdata(), float), np.asarray(artist.get_ydata(), float)
        ok = np.isfinite(x) & np.isfinite(y)
        marker = artist.get_marker() not in (None, "", "None", " ", ",")
        return bool((marker and ok.any()) or (artist.get_linestyle() != "None" and (ok[1:] & ok[:-1]).any()))
    if isinstance(artist, LineCollection):
        return any(np.isfinite(s).all() and np.ptp(s, axis=0).any() for s in artist.get_segments())
    if isinstance(artist, PolyCollection):  # fill_between: a polygon of non-zero width and height
        return any(np.ptp(p.vertices, axis=0).all() for p in artist.get_paths())
    if isinstance(artist, PathCollection):
        return bool(np.isfinite(artist.get_offsets()).all(axis=1).any())
    return isinstance(artist, Patch)


def empty_legend_entries(fig) -> list[str]:
    return [label for ax in fig.axes for a, label in zip(*ax.get_legend_handles_labels()) if not draws_something(a)]


@pytest.mark.parametrize("layers", [1, 3])
def test_per_layer_profile_figures_draw_every_legend_entry(layers):
    p = profile_of(layers, 3, 4, 16, seed=2)
    for make in (profiles.cosine_by_layer_figure, profiles.symmetry_by_layer_figure):
        assert empty_legend_entries(make(p)) == [], make.__name__


@pytest.fixture(scope="module")
def one_layer_results(tmp_path_factory):
    """Same-object and O3 results of the fixture ViT on 2 quadrant scenes, for one analysed layer (same-object) and
    for a one-layer model (O3)."""
    from conftest import MODELS, edited_fixture, quadrant_scenes

    from qkweights.analyses.o3 import run_o3
    from qkweights.analyses.same_object import run_same_object
    from qkweights.analyses.sweep import ModeSelection

    tmp = tmp_path_factory.mktemp("one")
    scenes = quadrant_scenes(tmp / "scenes")
    one = edited_fixture(tmp, "one", lambda t: [t.pop(k) for k in list(t) if k.startswith("encoder.layer.1.")])
    cfg = json.loads((one / "config.json").read_text())
    (one / "config.json").write_text(json.dumps(cfg | {"num_hidden_layers": 1}))
    same = run_same_object(
        str(MODELS / "vit"), scenes, tmp / "so", selection=ModeSelection(layers=[1], modes=[0], top=2)
    )
    o3 = run_o3(str(one), scenes, tmp / "o3")
    return same.doc, o3.doc


def test_one_layer_same_object_and_o3_figures_draw_every_legend_entry(one_layer_results):
    same, o3 = one_layer_results
    assert len(same["layers"]) == 1 and len(o3["layers"]) == 1
    assert empty_legend_entries(same_object_plot(same)) == []
    assert empty_legend_entries(o3_plot(o3)) == []
