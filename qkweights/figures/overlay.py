"""The red/cyan composite of a query map and a key map over a dimmed image (paper Fig. 1, 4, 5).

Colour scaling, per map (query and key separately), for the chosen sign s = ±1:

1. keep the positive side of the signed map, ``m⁺ = max(s·m, 0)``;
2. divide by the 99th percentile of ``|m|`` over the patch grid (robust to a few
   outlier tokens; the scale is never below 1e-12 of the map's largest |value|);
3. clip to [0, 1].

The two scaled maps ``q, k ∈ [0, 1]`` become the overlay colour ``(q, k, k)``: red
where only the query map is high, cyan (green + blue) where only the key map is
high, white where both are. The image is shown in grey, dimmed to ``DIM`` of its
luminance, and the overlay is screen-blended on top, ``1 − (1 − image)(1 − overlay)``,
so unlit patches show the dimmed image and lit patches their colour. Maps are drawn
as patch-sized blocks (nearest-neighbour upsampling): the resolution of a map is the
patch grid, and the figure does not pretend otherwise.
"""

from __future__ import annotations

import numpy as np

CLIP_PERCENTILE = 99.0
DIM = 0.45  # luminance factor of the grey background image
LUMA = np.array([0.299, 0.587, 0.114])  # ITU-R BT.601 weights of R, G, B
CAPTION = (
    f"red = query map x·u, cyan = key map x·v, white = both; each map: positive side of the shown sign, "
    f"÷ its {CLIP_PERCENTILE:g}th percentile of |value|, clipped to [0, 1]; image dimmed to grey"
)


def scale_map(values: np.ndarray, sign=1) -> np.ndarray:
    """Maps scaled to [0, 1] for display (module docstring, steps 1–3).

    values: (..., gh, gw) raw projections x_t·u (or x_t·v); sign: +1 or −1, or one per map
    (...). Returns (..., gh, gw) float64 in [0, 1]; all zeros where a map has no positive side.
    """
    m = np.asarray(values, np.float64)
    mag = np.abs(m).reshape(*m.shape[:-2], -1)  # (..., gh·gw)
    top = mag.max(-1) if mag.shape[-1] else np.zeros(mag.shape[:-1])
    scale = np.maximum(np.percentile(mag, CLIP_PERCENTILE, axis=-1), 1e-12 * top) if mag.shape[-1] else top
    scale = np.where(top > 0, scale, 1.0)[..., None, None]
    s = np.asarray(sign, np.float64)[..., None, None]
    return np.clip(np.maximum(s * m, 0.0) / scale, 0.0, 1.0)


def upsample(grid: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """Nearest-neighbour upsampling of (..., gh, gw) maps to ``shape`` (H, W) pixels: pixel (y, x) shows patch
    (y·gh//H, x·gw//W)."""
    gh, gw = grid.shape[-2:]
    rows = np.arange(shape[0]) * gh // shape[0]
    cols = np.arange(shape[1]) * gw // shape[1]
    return grid[..., rows[:, None], cols[None, :]]


def blend(grey: np.ndarray, query01: np.ndarray, key01: np.ndarray) -> np.ndarray:
    """Screen-blend the overlay colour (q, k, k) on a dimmed grey image: grey (H, W), query01, key01 (H, W) in [0, 1]
    (scaled maps already upsampled); returns (H, W, 3) in [0, 1], in the dtype of the inputs."""
    dark = 1 - grey  # (H, W)
    out = np.empty(
        grey.shape + (3,), np.result_type(grey, query01, key01)
    )  # (H, W, 3): red = query, green = blue = key
    out[..., 0] = 1 - dark * (1 - query01)
    out[..., 1] = out[..., 2] = 1 - dark * (1 - key01)
    return out


def composite(image: np.ndarray, query: np.ndarray, key: np.ndarray, sign: int = 1) -> np.ndarray:
    """The red/cyan overlay of one mode on one image.

    image: (H, W, 3) in [0, 1], the part of the model input the patch grid covers
    (:func:`qkweights.vision.preprocess.display_image` cropped to gh·P × gw·P, possibly resized); query, key: (gh, gw)
    raw maps; sign: ±1, the sign shown. Returns (H, W, 3) float64 in [0, 1].
    """
    shape = image.shape[:2]
    return blend(DIM * (image @ LUMA), upsample(scale_map(query, sign), shape), upsample(scale_map(key, sign), shape))
