"""Several models' per-layer curves on one normalised layer axis l/(L−1): the figures of ``compare``.

:class:`Curve` is what :mod:`qkweights.figures.compare` reads from profiles and saved results and
what the figures here draw.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import matplotlib
import numpy as np
from matplotlib.figure import Figure
from matplotlib.lines import Line2D

from qkweights.figures import DPI
from qkweights.figures.common import CHANCE_TICK, depth_axes, draw_band, draw_null_band
from qkweights.outputs import save_figure


@dataclass(frozen=True, eq=False)
class Curve:
    """One model's per-layer curve.

    ``depth`` (L,) normalised layer index l/(L−1); ``values`` (L,); ``lo``, ``hi``
    (L,) a band around the values or None — the head range (min–max over heads
    of the weighted cosine) for a profile, mean ± s.e.m. for an O3 measure or the
    same-object probability; ``kind``: "weighted_cosine", "mean_cosine", "symmetric_fraction",
    "ov_weighted_cosine", "o3_same", "o3_different", "o3_background" or "same_object" (its
    ``chance`` (L,) the chance level, ``layers`` the layer indices of the points); ``hidden``:
    the model's width D (for the null band ±1.96/√D), None for O3 and same-object curves;
    ``source``: the provenance record of the weights (model id, commit, files with sha256), as
    the profile or summary holds it.
    """

    label: str
    depth: np.ndarray
    values: np.ndarray
    lo: np.ndarray | None
    hi: np.ndarray | None
    kind: str
    hidden: int | None = None
    source: dict | None = None
    chance: np.ndarray | None = None
    layers: np.ndarray | None = None  # the layer indices of the points (None: 0 … L−1)


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
        draw_null_band(ax, null_band, null_label or f"95% null band ±{null_band:.3f}")
    _draw_curves(ax, curves, _palette([c.label for c in curves]))
    depth_axes(ax, None)
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
        depth_axes(ax, None)
        ax.set_title(name, fontsize=10)
    axes[0].set_ylabel(ylabel)
    handles = [Line2D([], [], color=colours[lab], marker="o", ms=4) for lab in labels]
    fig.legend(handles, labels, loc="outside lower center", ncols=min(len(labels), 4), fontsize=8)
    fig.suptitle(title, fontsize=10)
    return save_figure(fig, path, dpi=DPI)


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
    depth_axes(ax, None)
    ax.set_ylim(-0.03, 1.03)
    ax.grid(alpha=0.3, lw=0.5)
    ax.set_ylabel("P(query and key pick the same object)\nmean ± s.e.m. over heads")
    ax.set_title("Same object in the maximum-attention images, by normalised depth (paper Fig. 6)", fontsize=10)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1))
    return save_figure(fig, path, dpi=DPI)


def _draw_curves(ax, curves: list[Curve], colours: dict[str, tuple]) -> None:
    for c in curves:
        colour = colours[c.label]
        if c.lo is not None and c.hi is not None:
            draw_band(ax, c.depth, c.lo, c.hi, color=colour, alpha=0.12)
        ax.plot(c.depth, c.values, "o-", color=colour, ms=3.5, lw=1.5, label=c.label)


def _palette(labels: list[str]) -> dict[str, tuple]:
    """A distinct colour per unique label, in order (tab10, then tab20 beyond ten)."""
    unique = list(dict.fromkeys(labels))
    cmap = matplotlib.colormaps["tab10" if len(unique) <= 10 else "tab20"]
    return {lab: cmap(i % cmap.N) for i, lab in enumerate(unique)}
