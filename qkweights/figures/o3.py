"""The figure of the O3 attention allocation (paper Fig. 2 B–D): ``o3_by_layer.png``."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from qkweights.figures.common import DEPTH_LABEL, draw_band
from qkweights.outputs import model_name, save_figure

FIGURE_NAME = "o3_by_layer.png"
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
        draw_band(ax, depth, mean - sem, mean + sem, color="C0", alpha=0.2, label="± s.e.m. over images")
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
