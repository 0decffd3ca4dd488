"""The figures of a diff: ``diff_heatmaps.png`` (a layer × head map of each measure) and ``diff_cosine.png``.

Drawn from a :class:`~qkweights.weights.diff.DiffResult` (:func:`diff_figures`); the
measures themselves are :mod:`qkweights.weights.diff`'s.
"""

from __future__ import annotations

from pathlib import Path

import matplotlib
import numpy as np
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle

from qkweights.figures import DPI
from qkweights.figures.compare import curves_from
from qkweights.figures.curves import curves_figure
from qkweights.outputs import plural, save_figure
from qkweights.weights.diff import CIRCUIT_FIELDS, DiffResult
from qkweights.weights.profile import Profile
from qkweights.weights.qk import null_band

ANNOTATE_MAX_CELLS = 256  # heatmap cells carry their value when a panel has at most this many
TOP_MARKED = 5  # the score panel labels the top-ranked heads #1 … #5 …
MARK_MIN_SCORE = 1e-6  # … whose score exceeds this (unchanged heads score ≈ 1e-16 from rounding)


def diff_figures(d: DiffResult, out_dir: str | Path) -> list[Path]:
    """Write ``diff_heatmaps.png`` and ``diff_cosine.png`` of ``d`` into ``out_dir``; return their paths."""
    out = Path(out_dir)
    return [
        save_figure(heatmaps_figure(d), out / "diff_heatmaps.png", dpi=DPI),
        cosine_figure(d.a, d.b, out / "diff_cosine.png"),
    ]


def heatmaps_figure(d: DiffResult) -> Figure:
    """A layer × head map of each measure (layer 0 on top); non-finite cells grey.

    Colours: white/pale = unchanged (diverging maps centred on 0 for signed
    measures). The score panel frames the top-ranked heads and labels them #n.
    """
    L, H = d.spectrum_tv.shape
    panels = [
        ("Δ weighted cosine (B − A)", d.delta_weighted, "RdBu_r", _symmetric(d.delta_weighted), "{:+.2f}"),
        ("spectrum change: total variation of σ/Σσ", d.spectrum_tv, "YlOrRd", (0, _top(d.spectrum_tv)), "{:.3f}"),
        (
            "strength: log₂(Σσ_B / Σσ_A)",
            np.log2(d.sigma_ratio),
            "PuOr_r",
            _symmetric(np.log2(d.sigma_ratio)),
            "{:+.2f}",
        ),
    ]
    if d.angles_u is not None:
        panels += [
            (
                f"largest principal angle, query subspace (top {d.k} u), °",
                d.angles_u[..., -1],
                "YlOrRd",
                (0, 90),
                "{:.0f}",
            ),
            (
                f"largest principal angle, key subspace (top {d.k} v), °",
                d.angles_v[..., -1],
                "YlOrRd",
                (0, 90),
                "{:.0f}",
            ),
        ]
    for key, title in (
        ("symmetric_fraction", "Δ symmetric fraction (B − A)"),
        ("ov_weighted_cosine", "Δ OV weighted cosine (B − A)"),
    ):
        fa, fb = CIRCUIT_FIELDS[key](d.a), CIRCUIT_FIELDS[key](d.b)
        if fa is not None and fb is not None:
            panels.append((title, fb - fa, "RdBu_r", _symmetric(fb - fa), "{:+.2f}"))
    panels.append(("combined score (ranking; #n = rank)", d.score, "YlOrRd", (0, _top(d.score)), "{:.3f}"))
    cols = 3 if len(panels) > 4 else 2
    rows = -(-len(panels) // cols)
    cw, ch = max(3.2, 0.42 * H + 1.6), max(2.4, 0.34 * L + 1.0)
    fig = Figure(figsize=(cw * cols, ch * rows + 0.6), layout="constrained")
    axes = fig.subplots(rows, cols, squeeze=False).ravel()
    annotate = L * H <= ANNOTATE_MAX_CELLS
    top = [(rank, lh) for rank, lh in enumerate(d.ranking(), 1) if np.isfinite(d.score[lh])][
        :TOP_MARKED
    ]  # measured heads
    for i, (ax, (title, values, cmap_name, (lo, hi), fmt)) in enumerate(zip(axes, panels)):
        cmap = matplotlib.colormaps[cmap_name].with_extremes(bad="0.85")
        im = ax.imshow(
            np.ma.masked_invalid(values), cmap=cmap, vmin=lo, vmax=hi, aspect="auto", interpolation="nearest"
        )
        fig.colorbar(im, ax=ax, shrink=0.9, pad=0.02)
        ax.set_title(title, fontsize=9)
        ax.set_xticks(range(H), [f"H{h}" for h in range(H)], fontsize=7, rotation=90 if H > 12 else 0)
        ax.set_yticks(range(L), [f"L{l}" for l in range(L)], fontsize=7)
        if annotate:
            norm = im.norm
            for l in range(L):
                for h in range(H):
                    v = values[l, h]
                    rgba = cmap(norm(v)) if np.isfinite(v) else (0.85, 0.85, 0.85, 1)
                    dark = 0.299 * rgba[0] + 0.587 * rgba[1] + 0.114 * rgba[2] < 0.5
                    ax.text(
                        h,
                        l,
                        fmt.format(v) if np.isfinite(v) else "n/a",
                        ha="center",
                        va="center",
                        fontsize=6 if H > 8 else 7,
                        color="white" if dark else "black",
                    )
        if i == len(panels) - 1:
            for rank, (l, h) in top:
                if values[l, h] > MARK_MIN_SCORE:
                    ax.add_patch(_cell_box(h, l))
                    ax.text(
                        h - 0.42,
                        l - 0.42,
                        f"#{rank}",
                        ha="left",
                        va="top",
                        fontsize=6,
                        color="#08306b",
                        bbox={"boxstyle": "square,pad=0.1", "facecolor": "white", "edgecolor": "none", "alpha": 0.8},
                    )
    for ax in axes[len(panels) :]:
        ax.set_visible(False)
    names = f"A = {d.a.name}   B = {d.b.name}"
    fig.suptitle(
        f"How each head changed from A to B ({plural(L, 'layer')} × {plural(H, 'head')})\n{names}", fontsize=10
    )
    return fig


def cosine_figure(a: Profile, b: Profile, path: str | Path) -> Path:
    """Paper Fig. 3 for both models: per-layer weighted cosine with head-range bands, against l/(L−1)."""
    curves = [
        c
        for p, side in ((a, "A"), (b, "B"))
        for c in curves_from(p, label=f"{side}: {p.name}")
        if c.kind == "weighted_cosine"
    ]
    D = a.model.hidden
    return curves_figure(
        curves,
        path,
        title="Weighted query-key cosine by normalised depth, A vs B",
        ylabel="weighted cosine u·v (mean over heads)",
        null_band=float(null_band(D)),
        null_label=f"95% null band ±1.96/√D = ±{null_band(D):.3f} (D = {D})",
    )


def _cell_box(h: int, l: int) -> Rectangle:
    return Rectangle((h - 0.5, l - 0.5), 1, 1, fill=False, edgecolor="#08306b", lw=1.5)


def _symmetric(values: np.ndarray) -> tuple[float, float]:
    v = values[np.isfinite(values)]
    r = float(np.abs(v).max()) if v.size else 0.0
    r = r if r > 0 else 1e-3
    return -r, r


def _top(values: np.ndarray) -> float:
    v = values[np.isfinite(values)]
    t = float(v.max()) if v.size else 0.0
    return t if t > 0 else 1e-3
