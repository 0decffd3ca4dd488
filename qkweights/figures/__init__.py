"""Figures of a weight profile (paper Fig. 3, S1, S2) and the curve overlays of ``compare``.

Figures are built on pyplot-free :class:`matplotlib.figure.Figure` objects and
written atomically as PNG by :func:`qkweights.outputs.save_figure`. Non-finite
statistics (heads whose weights hold NaN/inf) are left out of curves and
histograms and drawn as hatched cells in the spectrum grid; they never raise.
"""

from __future__ import annotations

import sys
import textwrap
from pathlib import Path
from typing import TYPE_CHECKING

import matplotlib

if "matplotlib.pyplot" not in sys.modules:  # headless by default; never switch a session's chosen backend
    matplotlib.use("Agg")

import numpy as np
from matplotlib.cm import ScalarMappable
from matplotlib.collections import PolyCollection
from matplotlib.colors import Normalize
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.patches import Rectangle
from matplotlib.ticker import MaxNLocator
from PIL import Image

from qkweights.outputs import draw_in_parallel, model_name, plural, save_figure

if TYPE_CHECKING:
    from qkweights.figures.compare import Curve
    from qkweights.weights.profile import Profile

DPI = 120
GRID_MAX_INCHES = 22.0  # longest side of the spectrum grid's plotting area
GRID_CELL_INCHES = (1.4, 0.95)  # (width, height) of one head's cell when the grid fits
GRID_PAD = 0.06  # inner margin of a cell, as a fraction of the cell
MIN_PX_PER_MODE = 2.0  # below this, the spectrum grid draws only the modes carrying 95% of Σσ
HIST_BINS = 50
DEPTH_LABEL = "normalised layer l/(L−1)"
NULL_COLOR = "0.82"
SIGMA_COLOR = "#8fa9bf"
COS_COLOR = "#c0392b"
BAR_WIDTH = 6  # points: the range of a lone layer, drawn as a bar
CHANCE_TICK = 10  # points: the tick marking each layer's chance level, so that a lone layer's shows


def profile_figures(profile: Profile, out_dir: str | Path) -> list[Path]:
    """Write ``cosine_by_layer.png``, ``spectrum_grid.png`` and ``cosine_hist.png`` into ``out_dir``; return the paths.

    Profiles holding the statistics beyond the paper add ``symmetry_by_layer.png`` and (when the
    value-output circuit was computed for some head) ``ov_cosine_by_layer.png``.

    The figures are drawn in two processes (:func:`qkweights.outputs.draw_in_parallel`).
    """
    out = Path(out_dir)
    jobs = [
        (cosine_by_layer_figure, profile, out / "cosine_by_layer.png"),
        (spectrum_grid_figure, profile, out / "spectrum_grid.png"),
        (cosine_hist_figure, profile, out / "cosine_hist.png"),
    ]
    jobs += circuit_figure_jobs(profile, out)
    draw_in_parallel(_draw, jobs)
    return [path for *_, path in jobs]


def _draw(make_figure, profile: Profile, path: Path) -> None:
    save_figure(make_figure(profile), path, dpi=DPI)


def cosine_by_layer_figure(profile: Profile) -> Figure:
    """Paper Fig. 3 for one model: per-layer cosines against l/(L−1).

    Draws the σ-weighted cosine (mean over heads) with its head range (min–max
    over heads) as a band, the unweighted mean cosine, the 95% null band
    ±1.96/√D around 0 and a zero line. Layers whose heads are all non-finite
    leave a gap.
    """
    st = profile.layer_stats()
    return _by_layer_figure(
        profile,
        st["weighted_cosine"],
        st["min"],
        st["max"],
        color="C0",
        label=r"weighted cosine $\Sigma_n \sigma_n \cos_n / \Sigma_n \sigma_n$ (mean over heads)",
        band_label="head range (min–max of the weighted cosine)",
        null_band=profile.null_band_95,
        extra=[(st["mean_cosine"], "C1", r"unweighted cosine $\mathrm{mean}_n \cos_n$ (mean over heads)")],
        note=f"{len(profile.nonfinite)} head(s) with non-finite weights left out" if profile.nonfinite else None,
        ylabel="cosine u·v",
        title=_model_title(profile),
    )


def circuit_figure_jobs(profile: Profile, out: Path) -> list[tuple]:
    """The (figure function, profile, path) jobs of the figures beyond the paper that ``profile`` can draw."""
    jobs = []
    if profile.symmetric is not None and np.isfinite(profile.symmetric).any():
        jobs.append((symmetry_by_layer_figure, profile, out / "symmetry_by_layer.png"))
    if profile.ov is not None and np.isfinite(profile.ov.weighted).any():
        jobs.append((ov_cosine_by_layer_figure, profile, out / "ov_cosine_by_layer.png"))
    return jobs


def symmetry_by_layer_figure(profile: Profile) -> Figure:
    """``symmetric_fraction`` per layer against l/(L−1), in the style of :func:`cosine_by_layer_figure`.

    Mean over heads with the head range (min–max) as a band; the null reference
    ½ + 1/(2D) (independent random factors, derived in :func:`qkweights.weights.qk.symmetric_null`)
    as a dashed line; 1 = symmetric interaction, 0 = antisymmetric.
    """
    from qkweights.weights.qk import symmetric_null

    st = profile.circuit_layer_stats()
    null = symmetric_null(profile.model.hidden, profile.model.head_dim)
    return _by_layer_figure(
        profile,
        st["symmetric_fraction"],
        st["symmetric_min"],
        st["symmetric_max"],
        color="C2",
        label=r"symmetric fraction $\|(M+M^\top)/2\|_F^2 / \|M\|_F^2$ (mean over heads)",
        null_line=(null, f"null: independent random W_q, W_k, ½ + 1/(2D) = {null:.4f} (derived)"),
        ylabel="symmetric fraction (1 symmetric, 0.5 none, 0 antisymmetric)",
        title=_model_title(profile),
        ylim=(-0.02, 1.02),
    )


def ov_cosine_by_layer_figure(profile: Profile) -> Figure:
    """The λ-weighted cosine of the value-output circuit per layer, in the style of :func:`cosine_by_layer_figure`.

    ``Σ_n λ_n (p_n·r_n) / Σ_n λ_n`` of ``W_o,h W_v,h = P Λ Rᵀ``, mean over heads with the head
    range as a band, the 95% null band ±1.96/√D of random unit vectors and a zero line.
    ≈ 1: heads copy what they read; < 0: they suppress it.
    """
    st = profile.circuit_layer_stats()
    missing = int(np.isnan(profile.ov.weighted).sum())
    return _by_layer_figure(
        profile,
        st["ov_weighted_cosine"],
        st["ov_min"],
        st["ov_max"],
        color="C4",
        label=r"OV weighted cosine $\Sigma_n \lambda_n\, p_n \cdot r_n / \Sigma_n \lambda_n$ (mean over heads)",
        null_band=profile.null_band_95,
        note=f"{missing} head(s) without a value-output circuit left out" if missing else None,
        ylabel="value-output cosine p·r (1 copies, < 0 suppresses)",
        title=_model_title(profile, fold=False)
        + (
            "\nvalue-output circuit W_o,h W_v,h Γ (LayerNorm gain folded on its input side)"
            if profile.model.ov_folded
            else "\nvalue-output circuit W_o,h W_v,h (not LayerNorm-folded)"
        ),
    )


def _by_layer_figure(
    profile: Profile,
    values: np.ndarray,
    lo: np.ndarray,
    hi: np.ndarray,
    *,
    color: str,
    label: str,
    ylabel: str,
    title: str,
    band_label: str = "head range (min–max)",
    null_band: float | None = None,
    null_line: tuple[float, str] | None = None,
    extra: list[tuple[np.ndarray, str, str]] = (),
    note: str | None = None,
    ylim: tuple[float, float] | None = None,
) -> Figure:
    """One per-layer statistic (mean over heads, (L,)) against l/(L−1) with its head range ``lo``–``hi`` as a band.

    null_band: the half width of the 95% null band (grey, with a zero line); null_line: (value, label) of a
    dashed reference; extra: (values, colour, label) of further dashed curves; note: a line of text in the
    corner; ylim: bounds the padded y range may not pass.
    """
    x, D = profile.depth, profile.model.hidden  # (L,)
    fig = Figure(figsize=(7.5, 4.8), layout="constrained")
    ax = fig.add_subplot()
    reference = []
    if null_band is not None:
        _null_band(ax, null_band, rf"95% null band $\pm 1.96/\sqrt{{D}}$ = ±{null_band:.3f} (D = {D})")
        reference = [-null_band, null_band]
    if null_line is not None:
        ax.axhline(null_line[0], color="0.45", lw=1.0, ls="--", zorder=1, label=null_line[1])
        reference = [null_line[0]]
    _band(ax, x, lo, hi, color=color, alpha=0.2, label=band_label)
    ax.plot(x, values, "o-", color=color, ms=4, label=label)
    for curve, c, text in extra:
        ax.plot(x, curve, "s--", color=c, ms=3, label=text)
    if note:
        ax.text(0.01, 0.01, note, transform=ax.transAxes, fontsize=8, color="0.3", va="bottom")
    _depth_axes(ax, profile.model.layers)
    _pad_ylim(ax, [lo, hi, *(c for c, _, _ in extra), reference])
    if ylim is not None:
        bottom, top = ax.get_ylim()
        ax.set_ylim(max(bottom, ylim[0]), min(top, ylim[1]))
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=8, loc="best")
    return fig


def modes_carrying(singular_values: np.ndarray, fraction: float = 0.95) -> int:
    """The number of leading modes that carry ``fraction`` of Σσ in every head.

    singular_values: (..., K) descending per head. Heads with non-finite or
    all-zero σ are ignored; returns K when no head is usable.
    """
    s = np.asarray(singular_values, np.float64)
    s = s.reshape(-1, s.shape[-1])  # (heads, K)
    s = s[np.isfinite(s).all(1) & (s.sum(1) > 0)]
    if not len(s):
        return singular_values.shape[-1]
    share = np.cumsum(s, 1) / s.sum(1, keepdims=True)  # (heads, K)
    return int(((share < fraction - 1e-12).sum(1) + 1).max())


def spectrum_grid_figure(profile: Profile) -> Figure:
    """Paper Fig. S2: a layers × heads grid, one cell per head, showing σ_n/σ_0 and cos_n against mode n.

    All cells are drawn on one axes (fast even for 32 × 16 heads). Inside a
    cell the vertical scale runs from −1 (bottom) to +1 (top) with 0 on the
    centre line: grey bars rise from the centre line to σ_n/σ_0, red dots sit
    at cos_n. Cells are at most 1.4 × 0.95 inches and the grid at most
    22 inches on each side; when a cell would get fewer than 2 pixels per
    mode (at 120 dpi), only the first modes carrying 95% of Σσ in every head
    are drawn, and the title says so. Non-finite heads are hatched.
    """
    S, C = profile.singular_values, profile.cosines  # (L, H, K)
    L, H, K = S.shape
    cw = min(GRID_CELL_INCHES[0], GRID_MAX_INCHES / H)
    ch = min(GRID_CELL_INCHES[1], GRID_MAX_INCHES / L)
    inner = 1 - 2 * GRID_PAD
    n = K if cw * DPI * inner / K >= MIN_PX_PER_MODE else min(K, modes_carrying(S))
    shown = f"modes n = 0…{n - 1}" if n == K else f"modes n = 0…{n - 1} of {K} (they carry ≥95% of Σσ in every head)"
    note = (
        f"Each cell: one head; x = {shown}; vertical scale −1 (bottom) … 0 (centre line) … +1 (top), dotted lines "
        f"at ±0.5. Blue-grey bars: σ_n/σ_0 of W_qᵀW_k. Red dots: cos_n = u_n·v_n."
    )
    left, right, bottom = 0.55, 0.15, 0.2  # inches around the grid
    W = cw * H + left + right
    note = textwrap.fill(note, max(40, int(W * 72 / 5.2)))  # ≈ 5.2 pt per character at 8 pt
    top = 0.55 + 0.15 * note.count("\n")  # title, note lines, head labels
    Ht = ch * L + top + bottom
    fig = Figure(figsize=(W, Ht))
    ax = fig.add_axes((left / W, bottom / Ht, cw * H / W, ch * L / Ht))
    ax.set_xlim(0, H)
    ax.set_ylim(0, L)

    with np.errstate(invalid="ignore", divide="ignore"):
        rel = S[..., :n] / S[..., :1]  # (L, H, N) σ_n/σ_0
    cos = C[..., :n]  # (L, H, N)
    ok = np.isfinite(rel).all(-1) & np.isfinite(cos).all(-1)  # (L, H)
    step = inner / n
    x0 = np.arange(H)[:, None] + GRID_PAD + np.arange(n) * step  # (H, N) left edge of each mode's slot
    row = (L - 1 - np.arange(L)).astype(np.float64)  # (L,) bottom of each layer's row; layer 0 on top

    def y(values, rows):
        return rows + GRID_PAD + (values + 1) / 2 * inner

    ll, hh = np.nonzero(ok)
    base = np.broadcast_to(y(0.0, row[ll])[:, None], (len(ll), n))  # (M, N)
    tops = y(rel[ll, hh], row[ll][:, None])  # (M, N)
    xl, xr = x0[hh] + 0.1 * step, x0[hh] + 0.9 * step  # (M, N)
    bars = np.stack([np.stack(p, -1) for p in ((xl, base), (xl, tops), (xr, tops), (xr, base))], -2)  # (M, N, 4, 2)
    ax.add_collection(PolyCollection(bars.reshape(-1, 4, 2), facecolors=SIGMA_COLOR, edgecolors="none"))
    for level in (-0.5, 0.5):
        ax.hlines(y(level, row), 0, H, color="0.88", lw=0.4, ls=":", zorder=0)
    ax.hlines(y(0.0, row[ll]), hh + GRID_PAD, hh + 1 - GRID_PAD, color="0.35", lw=0.5)
    dot = float(np.clip((cw * 72 * step * 0.9) ** 2, 1.0, 16.0))  # marker area (pt²) fitting one mode's slot
    ax.scatter(
        (x0[hh] + step / 2).ravel(), y(cos[ll, hh], row[ll][:, None]).ravel(), s=dot, c=COS_COLOR, lw=0, zorder=3
    )
    for l, h in zip(*np.nonzero(~ok)):
        ax.add_patch(Rectangle((h, row[l]), 1, 1, facecolor="0.93", edgecolor="0.6", hatch="///", lw=0))
        ax.text(h + 0.5, row[l] + 0.5, "non-finite", ha="center", va="center", fontsize=7, color="0.3")

    ax.vlines(np.arange(H + 1), 0, L, color="0.6", lw=0.6, clip_on=False)
    ax.hlines(np.arange(L + 1), 0, H, color="0.6", lw=0.6, clip_on=False)
    ax.set_xticks(np.arange(H) + 0.5, [f"H{h}" for h in range(H)], fontsize=8)
    ax.set_yticks(row + 0.5, [f"L{l}" for l in range(L)], fontsize=8)
    ax.xaxis.tick_top()
    ax.tick_params(length=0, pad=2)
    for side in ax.spines.values():
        side.set_visible(False)
    fig.text(0.5, 1 - 0.05 / Ht, _model_title(profile) + " — per-head spectra", ha="center", va="top", fontsize=10)
    fig.text(0.5, 1 - 0.25 / Ht, note, ha="center", va="top", fontsize=8, color="0.2")
    return fig


def cosine_hist_figure(profile: Profile) -> Figure:
    """Paper Fig. S1: distribution of cos_n per layer, one curve per layer coloured early → late.

    Left panel: all modes of all heads of the layer pooled, unweighted
    (probability density). Right panel: the same modes weighted by σ_n/Σσ of
    their head (each head counts once in total), the distribution behind the
    weighted cosine. The x range is symmetric, covering every finite cosine
    and at least 3× the null band, at most [−1, 1] (cosines past ±1 by
    rounding fall in the end bins); non-finite heads are left out.
    """
    C, S = profile.cosines, profile.singular_values  # (L, H, K)
    L = profile.model.layers
    with np.errstate(invalid="ignore", divide="ignore"):
        w = S / S.sum(-1, keepdims=True)  # (L, H, K), each head sums to 1
    finite = np.isfinite(C) & np.isfinite(w)  # (L, H, K)
    band = profile.null_band_95
    r = _symmetric_range(C[finite], 3 * band)
    edges = np.linspace(-r, r, HIST_BINS + 1)
    centres = (edges[:-1] + edges[1:]) / 2
    cmap = matplotlib.colormaps["viridis"]
    norm = Normalize(0, max(L - 1, 1))
    fig = Figure(figsize=(11, 4.4), layout="constrained")
    axes = fig.subplots(1, 2, sharex=True)
    titles = (
        "unweighted: every mode of every head",
        r"σ-weighted: mode n of a head weighted by $\sigma_n / \Sigma_m \sigma_m$",
    )
    for ax, weighted, title in zip(axes, (False, True), titles):
        ax.axvspan(
            -band,
            band,
            color=NULL_COLOR,
            alpha=0.6,
            lw=0,
            zorder=0,
            label=f"95% null band ±{band:.3f} (D = {profile.model.hidden})",
        )
        ax.axvline(0, color="k", lw=0.7, zorder=1)
        for l in range(L):
            m = finite[l]
            if m.any() and (not weighted or w[l][m].sum() > 0):
                dens, _ = np.histogram(
                    np.clip(C[l][m], -r, r), edges, weights=w[l][m] if weighted else None, density=True
                )
                ax.plot(centres, dens, color=cmap(norm(l)), lw=1.2)
        ax.set_xlim(-r, r)
        ax.set_ylim(bottom=0)
        ax.set_xlabel(r"$\cos_n = u_n \cdot v_n$")
        ax.set_title(title, fontsize=9)
        ax.legend(fontsize=8, loc="upper right")
    axes[0].set_ylabel("probability density")
    bar = fig.colorbar(ScalarMappable(norm, cmap), ax=axes, label="layer l", pad=0.01)
    bar.locator = MaxNLocator(integer=True)
    bar.update_ticks()
    fig.suptitle(_model_title(profile) + " — cosines of the singular-vector pairs per layer", fontsize=10)
    return fig


def curves_figure(
    curves: list[Curve],
    path: str | Path,
    *,
    title: str,
    ylabel: str,
    null_band: float | None = None,
    null_label: str | None = None,
) -> Path:
    """Overlay per-layer curves (each (L,) against its depth l/(L−1)) with their bands; write a PNG.

    ``null_band``: half-width of a grey band around 0 (labelled ``null_label``).
    Returns ``path``.
    """
    fig = Figure(figsize=(10, 5), layout="constrained")
    ax = fig.add_subplot()
    if null_band is not None:
        _null_band(ax, null_band, null_label or f"95% null band ±{null_band:.3f}")
    _draw_curves(ax, curves, _palette([c.label for c in curves]))
    _depth_axes(ax, None)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1))
    return save_figure(fig, path, dpi=DPI)


def curve_panels_figure(panels: dict[str, list[Curve]], path: str | Path, *, title: str, ylabel: str) -> Path:
    """One panel per entry of ``panels`` (panel title → curves), sharing the y axis and one legend; write a PNG.

    A label keeps its colour across panels. Returns ``path``.
    """
    labels = list(dict.fromkeys(c.label for cs in panels.values() for c in cs))
    colours = _palette(labels)
    fig = Figure(figsize=(4.2 * len(panels), 4.4), layout="constrained")
    axes = np.atleast_1d(fig.subplots(1, len(panels), sharey=True))
    for ax, (name, curves) in zip(axes, panels.items()):
        _draw_curves(ax, curves, colours)
        _depth_axes(ax, None)
        ax.set_title(name, fontsize=10)
    axes[0].set_ylabel(ylabel)
    handles = [Line2D([], [], color=colours[lab], marker="o", ms=4) for lab in labels]
    fig.legend(handles, labels, loc="outside lower center", ncols=min(len(labels), 4), fontsize=8)
    fig.suptitle(title, fontsize=10)
    return save_figure(fig, path, dpi=DPI)


def _draw_curves(ax, curves: list[Curve], colours: dict[str, tuple]) -> None:
    for c in curves:
        colour = colours[c.label]
        if c.lo is not None and c.hi is not None:
            _band(ax, c.depth, c.lo, c.hi, color=colour, alpha=0.12)
        ax.plot(c.depth, c.values, "o-", color=colour, ms=3.5, lw=1.5, label=c.label)


def _palette(labels: list[str]) -> dict[str, tuple]:
    """A distinct colour per unique label, in order (tab10, then tab20 beyond ten)."""
    unique = list(dict.fromkeys(labels))
    cmap = matplotlib.colormaps["tab10" if len(unique) <= 10 else "tab20"]
    return {lab: cmap(i % cmap.N) for i, lab in enumerate(unique)}


def _band(ax, x, lo, hi, *, color, alpha: float, label: str | None = None) -> None:
    """The range ``lo``–``hi`` shaded over ``x`` (each (L,)); a point with no finite neighbour (one layer, or one
    between gaps), which a band of zero width would not show, gets a vertical bar of the same colour instead."""
    x, lo, hi = (np.asarray(a, np.float64) for a in (x, lo, hi))
    ok = np.isfinite(lo) & np.isfinite(hi)
    alone = ok & ~np.r_[False, ok[:-1]] & ~np.r_[ok[1:], False]  # (L,)
    runs = bool((ok[1:] & ok[:-1]).any())
    ax.fill_between(x, lo, hi, color=color, alpha=alpha, lw=0, label=label if runs else None)
    if alone.any():
        ax.vlines(x[alone], lo[alone], hi[alone], color=color, alpha=alpha, lw=BAR_WIDTH, label=None if runs else label)


def _null_band(ax, half_width: float, label: str) -> None:
    ax.axhspan(-half_width, half_width, color=NULL_COLOR, alpha=0.6, lw=0, label=label, zorder=0)
    ax.axhline(0, color="k", lw=0.7, zorder=1)


def _depth_axes(ax, layers: int | None) -> None:
    """x axis l/(L−1) on [0, 1]; with ``layers`` also the layer index l on the top axis."""
    ax.set_xlim(-0.03, 1.03)
    ax.set_xlabel(DEPTH_LABEL)
    if layers and layers > 1:
        top = ax.secondary_xaxis("top", functions=(lambda d: d * (layers - 1), lambda l: l / (layers - 1)))
        top.xaxis.set_major_locator(MaxNLocator(integer=True, nbins=min(layers, 12)))
        top.set_xlabel("layer l", fontsize=8)
        top.tick_params(labelsize=8)


def _pad_ylim(ax, arrays, pad: float = 0.06) -> None:
    """y limits spanning the finite values of ``arrays`` with ``pad`` of the span added on both sides."""
    v = np.concatenate([np.ravel(a) for a in arrays])
    v = v[np.isfinite(v)]
    lo, hi = v.min(), v.max()
    ax.set_ylim(lo - pad * (hi - lo), hi + pad * (hi - lo))


def _model_title(profile: Profile, *, fold: bool = True) -> str:
    m = profile.model
    name = profile.name
    folded = "; LayerNorm-folded Γ W_qᵀW_k Γ" if fold and getattr(m, "folded", None) else ""
    return (
        f"{name} ({m.family}; {plural(m.layers, 'layer')} × {plural(m.heads, 'head')}, D = {m.hidden}, K = "
        f"{m.head_dim}{folded})"
    )


def _symmetric_range(values: np.ndarray, at_least: float) -> float:
    """Half-width r ≤ 1 of a symmetric range covering ``values`` and ``at_least``, rounded up to 0.05."""
    top = max(float(np.abs(values).max()) if values.size else 1.0, at_least)
    return float(min(1.0, np.ceil(top * 1.02 / 0.05) * 0.05))


def anisotropy_figure(title: str, layers: list[int], n_layers: int, baseline: np.ndarray, weighted: np.ndarray):
    """Paper Fig. S4: per layer, the profile's weighted cosine, the centre-token baseline and their difference."""
    from matplotlib.figure import Figure

    x = np.asarray(layers) / max(n_layers - 1, 1)
    fig = Figure(figsize=(7.5, 5.2), layout="constrained")
    ax = fig.add_subplot()
    ax.axhline(0, color="0.6", lw=0.8)
    ax.plot(x, weighted, "o-", color="C0", ms=4, label="weighted cosine Σσ·cos/Σσ (profile, mean over heads)")
    ax.plot(
        x,
        baseline,
        "s--",
        color="C2",
        ms=4,
        label="anisotropy: mean cos between centre-token embeddings of different images",
    )
    ax.plot(x, weighted - baseline, "^-", color="C3", ms=4, label="relative cosine = weighted − anisotropy")
    ax.set_xlabel("normalised layer l/(L−1)")
    ax.set_ylabel("cosine")
    ax.set_xlim(-0.03, 1.03)
    ax.set_title(title, fontsize=10)
    fig.legend(fontsize=8, loc="outside lower center")
    return fig


# ----------------------------------------------------------------------------- top-images grids (paper Fig. 4, S5–S19)

CELL_PX = 132  # width of one image cell of the top-images grids
GRID_GAP = 6
LABEL_PX = 190  # the row labels' column
PNG_COMPRESSION = 1  # zlib level of the grid PNGs: level 6 (the default) takes about 3× as long for ~25% smaller files


def _font(size: int):
    """DejaVu Sans, the font matplotlib ships, at ``size`` pixels (Pillow's own default font if it is missing)."""
    from PIL import ImageFont

    path = Path(matplotlib.get_data_path()) / "fonts" / "ttf" / "DejaVuSans.ttf"
    try:
        return ImageFont.truetype(str(path), size)
    except OSError:
        return ImageFont.load_default(size)


def image_grid(title: str, caption: str, rows: list) -> Image.Image:
    """Rows of image cells with labels, composed as one RGB image (no matplotlib figure).

    rows: [(label, [(cell (h, w, 3) uint8 or PIL image, corner text), …]), …], every cell of
    one size. The label is left of each row, the corner text in each cell's lower left corner,
    the rank (#1, #2, …) above each column, the title above and the caption below; text is
    drawn once, directly on the pixels.
    """
    from PIL import ImageDraw

    tiles = [[(c if isinstance(c, Image.Image) else Image.fromarray(c), text) for c, text in row] for _, row in rows]
    first = next((c for row in tiles for c, _ in row), None)
    cw, ch = first.size if first is not None else (CELL_PX, CELL_PX)
    k = max((len(row) for row in tiles), default=1) or 1
    title_font, label_font, small = _font(15), _font(12), _font(10)
    width = LABEL_PX + k * (cw + GRID_GAP) + GRID_GAP
    title_lines = textwrap.wrap(title, width=max(40, width // 9))
    caption_lines = textwrap.wrap(caption, width=max(40, width // 6))
    top = 10 + 19 * len(title_lines) + 18
    height = top + len(rows) * (ch + GRID_GAP) + 8 + 13 * len(caption_lines) + 6
    img = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(img)
    for i, line in enumerate(title_lines):
        draw.text((width // 2, 8 + 19 * i), line, fill="black", font=title_font, anchor="ma")
    for j in range(k):
        draw.text(
            (LABEL_PX + j * (cw + GRID_GAP) + cw // 2, top - 4), f"#{j + 1}", fill="black", font=label_font, anchor="md"
        )
    for r, ((label, _), row) in enumerate(zip(rows, tiles)):
        y = top + r * (ch + GRID_GAP)
        draw.multiline_text(
            (LABEL_PX - 8, y + ch // 2), label, fill="black", font=label_font, anchor="rm", align="right"
        )
        for j, (cell, text) in enumerate(row):
            x = LABEL_PX + j * (cw + GRID_GAP)
            img.paste(cell, (x, y))
            box = draw.textbbox((x + 3, y + ch - 3), text, font=small, anchor="ld")
            draw.rectangle((box[0] - 1, box[1] - 1, box[2] + 1, box[3] + 1), fill=(40, 40, 40))
            draw.text((x + 3, y + ch - 3), text, fill="white", font=small, anchor="ld")
    y = height - 6 - 13 * len(caption_lines)
    for i, line in enumerate(caption_lines):
        draw.text((width // 2, y + 13 * i), line, fill=(80, 80, 80), font=small, anchor="ma")
    return img


def top_images_grid(title: str, rows: list, thumb) -> Image.Image:
    """Rows of top images with their red/cyan overlays (paper Fig. 4, S5–S19), as one RGB image (:func:`image_grid`).

    rows: [(label, [(image path, score, query (gh, gw), key (gh, gw), sign), …]), …];
    thumb(path): the image as the patch grid covers it, ``CELL_PX`` wide, (h, w, 3) in
    [0, 1]. Each cell is the red/cyan overlay of :mod:`qkweights.figures.overlay` on it, its score
    in the corner.
    """
    from qkweights.figures.overlay import CAPTION, DIM, LUMA, blend, scale_map, upsample

    cells = [c for _, row in rows for c in row]
    out, i = [], 0
    if cells:  # every cell's maps scaled in one call (small arrays), then each cell blended on its grey image
        ch, cw = thumb(cells[0][0]).shape[:2]
        signs = np.array([c[4] for c in cells])
        q01 = upsample(scale_map(np.stack([c[2] for c in cells]), signs), (ch, cw)).astype(np.float32)  # (n, h, w)
        k01 = upsample(scale_map(np.stack([c[3] for c in cells]), signs), (ch, cw)).astype(np.float32)
    for label, row in rows:
        tiles = []
        for path, score, *_ in row:
            grey = DIM * (thumb(path) @ LUMA).astype(np.float32)  # (h, w)
            tiles.append(((blend(grey, q01[i], k01[i]) * 255 + 0.5).astype(np.uint8), f"{score:.3g}"))
            i += 1
        out.append((label, tiles))
    caption = CAPTION + "; score (corner) = max_t(s·x·u)·max_t(s·x·v) over patch tokens, s = the row's sign"
    return image_grid(title, caption, out)


def save_png(image, path) -> Path:
    """Save a PIL image as PNG atomically (fast compression)."""
    from qkweights.outputs import atomic_path

    with atomic_path(path) as tmp:
        image.save(tmp, format="PNG", compress_level=PNG_COMPRESSION)
    return Path(path)


# --------------------------------------------------------------------------- O3 attention allocation (paper Fig. 2 B–D)


MEASURE_TITLES = {"same": "same object", "different": "different object", "background": "background"}


def o3_figure(summary: dict, path: str | Path) -> Path:
    """Paper Fig. 2 B–D for one model (:func:`o3_plot`), as a PNG at ``path``."""
    return save_figure(o3_plot(summary), path)


def o3_plot(summary: dict) -> Figure:
    """Paper Fig. 2 B–D for one model.

    Three panels (same object, different object, background) of the mean ± s.e.m.
    over images against the normalised layer l/(L−1) (layer index on the top axis),
    each with the uniform-attention level dashed; the first two share their y axis.
    """
    layers = summary["layers"]
    n_layers = len(layers)
    depth = np.array([e["depth"] for e in layers], np.float64)
    fig = Figure(figsize=(12, 4.4), layout="constrained")
    axes = fig.subplots(1, 3)
    axes[1].sharey(axes[0])
    for ax, (key, title) in zip(axes, MEASURE_TITLES.items()):
        mean, sem = (
            np.array([np.nan if e[key][s] is None else e[key][s] for e in layers], np.float64) for s in ("mean", "sem")
        )
        _band(ax, depth, mean - sem, mean + sem, color="C0", alpha=0.2, label="± s.e.m. over images")
        ax.plot(depth, mean, "o-", color="C0", ms=3.5, lw=1.5, label="mean over images and heads")
        ax.axhline(summary["uniform"][key], color="0.4", ls="--", lw=1, label="uniform attention over the patches")
        ax.set_title(title, fontsize=10)
        ax.set_xlim(-0.03, 1.03)
        ax.set_xlabel(DEPTH_LABEL)
        ax.grid(alpha=0.3, lw=0.5)
        if n_layers > 1:
            top = ax.secondary_xaxis("top", functions=(lambda d: d * (n_layers - 1), lambda l: l / (n_layers - 1)))
            top.xaxis.set_major_locator(MaxNLocator(integer=True, nbins=min(n_layers, 12)))
            top.tick_params(labelsize=8)
    axes[0].set_ylabel("share of the token's attention over the patches")
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside lower center", ncols=3, fontsize=8)
    model = summary["model"]
    name = model_name(summary)
    fig.suptitle(
        f"O3 attention allocation: {name}\n{summary['images_used']} images, {model['layers']} layers × "
        f"{model['heads']} heads; top axis: layer index",
        fontsize=10,
    )
    return fig


# ----------------------------------------------------------------------------- same object (paper Fig. 6)

QUERY_RGB = (235, 40, 40)  # the query object's outline: red, as the query maps
KEY_RGB = (0, 215, 235)  # the key object's outline: cyan, as the key maps


def same_object_figure(doc: dict, path: str | Path) -> Path:
    """Paper Fig. 6 for one model (:func:`same_object_plot`), as a PNG at ``path``."""
    return save_figure(same_object_plot(doc), path, dpi=DPI)


def same_object_plot(doc: dict) -> Figure:
    """Paper Fig. 6 for one model.

    Against the normalised layer l/(L−1) (layer index on the top axis): each head's
    σ-weighted probability P(l, h) as a small dot (the head spread), the mean over heads
    with a ± s.e.m. band, and the chance level (mean of 1/number of objects over the
    selected images) dashed, with a tick at each layer. Only the analysed layers are drawn.
    """
    entries = doc["layers"]
    n_layers = doc["model"]["layers"]
    depth = np.array([e["depth"] for e in entries], np.float64)
    val = lambda x: np.nan if x is None else float(x)
    mean = np.array([val(e["probability"]) for e in entries])
    sem = np.nan_to_num(np.array([val(e["sem"]) for e in entries]))
    chance = np.array([val(e["chance"]) for e in entries])
    fig = Figure(figsize=(7.5, 4.8), layout="constrained")
    ax = fig.add_subplot()
    hx = [d for e, d in zip(entries, depth) for _ in e["heads"]]
    hy = [val(h["probability"]) for e in entries for h in e["heads"]]
    ax.scatter(hx, hy, s=14, color="0.45", alpha=0.55, lw=0, zorder=2, label="one head: P = Σσ_n p_n / Σσ_n")
    _band(ax, depth, mean - sem, mean + sem, color="C0", alpha=0.2, label="± s.e.m. over heads")
    ax.plot(depth, mean, "o-", color="C0", ms=4, lw=1.5, zorder=3, label="mean over heads")
    ax.plot(
        depth, chance, "_--", color="C3", ms=CHANCE_TICK, lw=1.2, label="chance: mean of 1 / (objects in the image)"
    )
    _depth_axes(ax, n_layers)
    ax.set_ylim(-0.03, 1.03)
    ax.set_ylabel("P(query and key pick the same object)")
    ax.grid(alpha=0.3, lw=0.5)
    opts, data = doc["options"], doc["dataset"]
    name = model_name(doc)
    ax.set_title(
        f"Same object in the top {opts['top']} images per mode: {name}\n{data['n_eligible']} eligible images, "
        f"{len(opts['heads'])} heads × modes {_ranges(opts['modes'])}",
        fontsize=10,
    )
    ax.legend(fontsize=8, loc="best")
    return fig


def _ranges(values: list[int]) -> str:
    """[0, 1, 2, 5] → "0–2, 5"."""
    out, start = [], None
    for i, v in enumerate(values):
        if start is None:
            start = v
        if i + 1 == len(values) or values[i + 1] != v + 1:
            out.append(f"{start}" if start == v else f"{start}–{v}")
            start = None
    return ", ".join(out)


def _outline(mask: np.ndarray, width: int = 2) -> np.ndarray:
    """The pixels of ``mask`` (h, w) bool within ``width`` pixels of its edge (4-neighbour erosion, repeated)."""
    inner = mask.copy()
    for _ in range(width):
        e = inner.copy()
        e[1:] &= inner[:-1]
        e[:-1] &= inner[1:]
        e[:, 1:] &= inner[:, :-1]
        e[:, :-1] &= inner[:, 1:]
        e[[0, -1], :] = False
        e[:, [0, -1]] = False
        inner = e
    return mask & ~inner


def same_object_cell(image: np.ndarray, query: np.ndarray, key: np.ndarray, width: int = CELL_PX) -> Image.Image:
    """One image of the examples grid: ``width`` pixels wide, the image dimmed a little, the query object tinted
    and outlined red, the key object outlined cyan (inside the red outline when it is the same object).

    image: (h, w, 3) in [0, 1]; query, key: (h, w) bool masks on it.
    """
    h, w = image.shape[:2]
    size = (width, max(1, round(width * h / w)))
    rgb = Image.fromarray(np.round(image * 255).astype(np.uint8)).resize(size, Image.Resampling.LANCZOS)
    qm = np.asarray(Image.fromarray(query.astype(np.uint8) * 255).resize(size, Image.Resampling.NEAREST)) > 0
    km = np.asarray(Image.fromarray(key.astype(np.uint8) * 255).resize(size, Image.Resampling.NEAREST)) > 0
    px = np.asarray(rgb, np.float64) * 0.7 + 0.3 * 40  # dimmed so the outlines stand out
    px[qm] = 0.75 * px[qm] + 0.25 * np.array(QUERY_RGB)
    px[km & ~qm] = 0.8 * px[km & ~qm] + 0.2 * np.array(KEY_RGB)
    qo = _outline(qm, 2)
    ko = _outline(km, 4 if (qm == km).all() else 2)
    if (qm == km).all():
        ko &= ~qo  # the same object: red outside, cyan inside
    px[qo] = QUERY_RGB
    px[ko] = KEY_RGB
    return Image.fromarray(np.clip(np.round(px), 0, 255).astype(np.uint8))


def same_object_examples(title: str, rows: list) -> Image.Image:
    """Rows of selected images with their query and key objects, as one RGB image (:func:`image_grid`).

    rows: [(label, [(image (h, w, 3) in [0, 1], query mask (h, w), key mask (h, w), caption), …]), …];
    each cell is :func:`same_object_cell`, its caption printed in its corner.
    """
    key_text = (
        "red outline (tinted) = query object: largest mean of s·x·u_n over its area; cyan outline = key object: "
        "largest mean of s·x·v_n; both (red outside, cyan inside) = the same object; s = the image's sign"
    )
    return image_grid(
        title, key_text, [(label, [(same_object_cell(im, q, k), cap) for im, q, k, cap in row]) for label, row in rows]
    )


def same_object_compare_figure(curves: list[Curve], path: str | Path) -> Path:
    """Several models' same-object probability (mean ± s.e.m. over heads) against l/(L−1), each model's chance
    level dashed in its colour; write a PNG at ``path``."""
    fig = Figure(figsize=(10, 5), layout="constrained")
    ax = fig.add_subplot()
    colours = _palette([c.label for c in curves])
    _draw_curves(ax, curves, colours)
    for c in curves:
        ax.plot(c.depth, c.chance, "_--", color=colours[c.label], ms=CHANCE_TICK, lw=1, alpha=0.8)
    ax.plot([], [], "_--", color="0.4", ms=CHANCE_TICK, lw=1, label="chance (dashed, each model's colour)")
    _depth_axes(ax, None)
    ax.set_ylim(-0.03, 1.03)
    ax.grid(alpha=0.3, lw=0.5)
    ax.set_ylabel("P(query and key pick the same object)\nmean ± s.e.m. over heads")
    ax.set_title("Same object in the maximum-attention images, by normalised depth (paper Fig. 6)", fontsize=10)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1))
    return save_figure(fig, path, dpi=DPI)
