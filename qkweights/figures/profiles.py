"""Figures of a weight profile (paper Fig. 3, S1, S2) and of the statistics beyond the paper.

Non-finite statistics (heads whose weights hold NaN/inf) are left out of curves and histograms
and drawn as hatched cells in the spectrum grid; they never raise.
"""

from __future__ import annotations

import textwrap
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import matplotlib
import numpy as np
from matplotlib.cm import ScalarMappable
from matplotlib.collections import PolyCollection
from matplotlib.colors import Normalize
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle
from matplotlib.ticker import MaxNLocator

from qkweights.figures import DPI
from qkweights.figures.common import NULL_COLOR, depth_axes, draw_band, draw_null_band
from qkweights.outputs import draw_in_parallel, plural, save_figure

if TYPE_CHECKING:
    from qkweights.weights.profile import Profile

GRID_MAX_INCHES = 22.0  # longest side of the spectrum grid's plotting area
GRID_CELL_INCHES = (1.4, 0.95)  # (width, height) of one head's cell when the grid fits
GRID_PAD = 0.06  # inner margin of a cell, as a fraction of the cell
MIN_PX_PER_MODE = 2.0  # below this, the spectrum grid draws only the modes carrying 95% of Σσ
HIST_BINS = 50
SIGMA_COLOR = "#8fa9bf"
COS_COLOR = "#c0392b"


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
        LayerCurve(
            st["weighted_cosine"],
            st["min"],
            st["max"],
            color="C0",
            label=r"weighted cosine $\Sigma_n \sigma_n \cos_n / \Sigma_n \sigma_n$ (mean over heads)",
            band_label="head range (min–max of the weighted cosine)",
        ),
        LayerPanel(
            ylabel="cosine u·v",
            title=_model_title(profile),
            null_band=profile.null_band_95,
            extra=((st["mean_cosine"], "C1", r"unweighted cosine $\mathrm{mean}_n \cos_n$ (mean over heads)"),),
            note=f"{len(profile.nonfinite)} head(s) with non-finite weights left out" if profile.nonfinite else None,
        ),
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
        LayerCurve(
            st["symmetric_fraction"],
            st["symmetric_min"],
            st["symmetric_max"],
            color="C2",
            label=r"symmetric fraction $\|(M+M^\top)/2\|_F^2 / \|M\|_F^2$ (mean over heads)",
        ),
        LayerPanel(
            ylabel="symmetric fraction (1 symmetric, 0.5 none, 0 antisymmetric)",
            title=_model_title(profile),
            null_line=(null, f"null: independent random W_q, W_k, ½ + 1/(2D) = {null:.4f} (derived)"),
            ylim=(-0.02, 1.02),
        ),
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
        LayerCurve(
            st["ov_weighted_cosine"],
            st["ov_min"],
            st["ov_max"],
            color="C4",
            label=r"OV weighted cosine $\Sigma_n \lambda_n\, p_n \cdot r_n / \Sigma_n \lambda_n$ (mean over heads)",
        ),
        LayerPanel(
            ylabel="value-output cosine p·r (1 copies, < 0 suppresses)",
            title=_model_title(profile, fold=False)
            + (
                "\nvalue-output circuit W_o,h W_v,h Γ (LayerNorm gain folded on its input side)"
                if profile.model.ov_folded
                else "\nvalue-output circuit W_o,h W_v,h (not LayerNorm-folded)"
            ),
            null_band=profile.null_band_95,
            note=f"{missing} head(s) without a value-output circuit left out" if missing else None,
        ),
    )


@dataclass(frozen=True)
class LayerCurve:
    """A per-layer statistic: its mean over heads ``values`` (L,) as a line of ``color`` with ``label``, and its head
    range ``lo``–``hi`` (L,) as a band with ``band_label``."""

    values: np.ndarray
    lo: np.ndarray
    hi: np.ndarray
    color: str
    label: str
    band_label: str = "head range (min–max)"


@dataclass(frozen=True)
class LayerPanel:
    """The axes around a :class:`LayerCurve`.

    null_band: the half width of the 95% null band (grey, with a zero line); null_line: (value, label) of a
    dashed reference; extra: (values, colour, label) of further dashed curves; note: a line of text in the
    corner; ylim: bounds the padded y range may not pass.
    """

    ylabel: str
    title: str
    null_band: float | None = None
    null_line: tuple[float, str] | None = None
    extra: tuple[tuple[np.ndarray, str, str], ...] = ()
    note: str | None = None
    ylim: tuple[float, float] | None = None


def _by_layer_figure(profile: Profile, curve: LayerCurve, panel: LayerPanel) -> Figure:
    """One per-layer statistic ``curve`` against l/(L−1) with its head range as a band, on the axes of ``panel``."""
    x, D = profile.depth, profile.model.hidden  # (L,)
    fig = Figure(figsize=(7.5, 4.8), layout="constrained")
    ax = fig.add_subplot()
    reference = []
    if panel.null_band is not None:
        draw_null_band(ax, panel.null_band, rf"95% null band $\pm 1.96/\sqrt{{D}}$ = ±{panel.null_band:.3f} (D = {D})")
        reference = [-panel.null_band, panel.null_band]
    if panel.null_line is not None:
        ax.axhline(panel.null_line[0], color="0.45", lw=1.0, ls="--", zorder=1, label=panel.null_line[1])
        reference = [panel.null_line[0]]
    draw_band(ax, x, curve.lo, curve.hi, color=curve.color, alpha=0.2, label=curve.band_label)
    ax.plot(x, curve.values, "o-", color=curve.color, ms=4, label=curve.label)
    for values, c, text in panel.extra:
        ax.plot(x, values, "s--", color=c, ms=3, label=text)
    if panel.note:
        ax.text(0.01, 0.01, panel.note, transform=ax.transAxes, fontsize=8, color="0.3", va="bottom")
    depth_axes(ax, profile.model.layers)
    _pad_ylim(ax, [curve.lo, curve.hi, *(c for c, _, _ in panel.extra), reference])
    if panel.ylim is not None:
        bottom, top = ax.get_ylim()
        ax.set_ylim(max(bottom, panel.ylim[0]), min(top, panel.ylim[1]))
    ax.set_ylabel(panel.ylabel)
    ax.set_title(panel.title, fontsize=10)
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
