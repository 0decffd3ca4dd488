"""The figure of the projection maps of one image (paper Fig. 1, 4, 5): ``maps_L{l}_H{h}_{embedding}.png``."""

from __future__ import annotations

import textwrap
from pathlib import Path

from matplotlib.figure import Figure

from qkweights.analyses.maps import EMBEDDINGS, SIGN_CHARS, Maps
from qkweights.figures import DPI
from qkweights.figures.overlay import CAPTION, composite
from qkweights.outputs import save_figure

CONTRIBUTION = (
    "c_n = σ_n · Σ_ij a_ij (x_i·u_n)(v_n·x_j) / √K, a = the head's attention probabilities, i and j over all tokens, "
    "x = LayerNorm output"
)


def mode_title(layer: int, head: int, mode: int, sign: int, sigma: float, cos: float) -> str:
    """``L{l} H{h} M{n} ±`` and ``σ … cos …`` on a second line (0-based indices)."""
    return f"L{layer} H{head} M{mode} {SIGN_CHARS[int(sign)]}\nσ {sigma:.3g}   cos {cos:+.3f}"


def maps_figure(maps: Maps):
    """The image, then one red/cyan composite per mode (``qkweights.figures.overlay``), at most 5 panels a row."""
    n = len(maps.modes)
    rows = -(-(n + 1) // 5)  # at most 5 panels a row, rows as even as possible
    cols = -(-(n + 1) // rows)
    fig = Figure(figsize=(2.6 * cols, 2.75 * rows + 0.9), layout="constrained")
    axes = fig.subplots(rows, cols, squeeze=False).ravel()
    gh, gw = maps.query.shape[1:]
    p = maps.patch_size
    axes[0].imshow(maps.image[: gh * p, : gw * p], interpolation="antialiased")
    axes[0].set_title(f"input {gw * p}×{gh * p} px\n{gh}×{gw} patches", fontsize=9)
    for i in range(n):
        ax = axes[i + 1]
        ax.imshow(
            composite(maps.image[: gh * p, : gw * p], maps.query[i], maps.key[i], int(maps.signs[i])),
            interpolation="nearest",
        )
        title = mode_title(
            maps.layer,
            maps.head,
            int(maps.modes[i]),
            int(maps.signs[i]),
            float(maps.singular_values[i]),
            float(maps.cosines[i]),
        )
        if maps.ranked:
            title += f"   c {maps.contributions[i]:+.3g}"
        ax.set_title(title, fontsize=9)
    for ax in axes:
        ax.set_xticks([])
        ax.set_yticks([])
    for ax in axes[n + 1 :]:
        ax.set_axis_off()
    order = f"top {n} modes by |c_n|" if maps.ranked else "modes " + ",".join(str(int(m)) for m in maps.modes)
    folded = ", LayerNorm-folded modes" if maps.embedding == "normalised" else ""
    fig.suptitle(
        f"{maps.model_id} — layer {maps.layer}, head {maps.head}, {order}{folded}\nx = {EMBEDDINGS[maps.embedding]}",
        fontsize=10,
    )
    caption = CAPTION + "; sign shown (+/−) = larger max(x·u)·max(x·v)"
    if maps.ranked:
        caption += f"\n{CONTRIBUTION}" + (" (here n and the folded modes)" if maps.embedding == "normalised" else "")
    if maps.salience_contribution is not None:
        caption += f"\nkey-salience term Σ_ij a_ij w_h·n_j / √K = {maps.salience_contribution:+.3g} (not in any mode)"
    caption = "\n".join(textwrap.fill(part, width=int(2.6 * cols * 72 / (7 * 0.55))) for part in caption.split("\n"))
    fig.text(0.5, 0.0, caption, ha="center", va="top", fontsize=7, color="0.3")
    return fig


def draw_maps(maps: Maps, out_dir) -> Path:
    """Write ``maps_L{l}_H{h}_{embedding}.png`` (:func:`maps_figure`) into ``out_dir``; return its path."""
    return save_figure(maps_figure(maps), Path(out_dir) / f"{maps.stem}.png", dpi=DPI)
