"""The diverging colour map of the model page: ColorBrewer PuOr (colour-blind safe), orange below the centre,
purple above, near-white at the centre; text colour chosen for contrast."""

from __future__ import annotations

import math

PUOR = (
    "#7f3b08", "#b35806", "#e08214", "#fdb863", "#fee0b6", "#f7f7f7",
    "#d8daeb", "#b2abd2", "#8073ac", "#542788", "#2d004b",
)  # fmt: skip
MISSING = "#e4e4e4"


def _rgb(h: str) -> tuple[int, int, int]:
    return int(h[1:3], 16), int(h[3:5], 16), int(h[5:7], 16)


def colour(t: float) -> str:
    """t in [-1, 1] (NaN: missing) → "#rrggbb", interpolated between the PuOr stops."""
    if not math.isfinite(t):
        return MISSING
    x = (min(max(t, -1.0), 1.0) + 1) / 2 * (len(PUOR) - 1)
    i = min(int(x), len(PUOR) - 2)
    a, b, f = _rgb(PUOR[i]), _rgb(PUOR[i + 1]), x - i
    return "#" + "".join(f"{round(u + (v - u) * f):02x}" for u, v in zip(a, b))


def ink(background: str) -> str:
    """Black or white text, whichever contrasts more with ``background`` (WCAG relative luminance)."""

    def lin(c: int) -> float:
        c = c / 255
        return c / 12.92 if c <= 0.03928 else ((c + 0.055) / 1.055) ** 2.4

    r, g, b = (lin(c) for c in _rgb(background))
    lum = 0.2126 * r + 0.7152 * g + 0.0722 * b
    return "#000" if (lum + 0.05) / 0.05 > 1.05 / (lum + 0.05) else "#fff"


def gradient() -> str:
    """The CSS linear-gradient of the map, left (−1) to right (+1)."""
    return "linear-gradient(to right, " + ", ".join(PUOR) + ")"
