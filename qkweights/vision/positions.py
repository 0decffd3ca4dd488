"""Position tables on other patch grids, in numpy as torch computes them.

:func:`resize_bicubic` and :func:`resize_bilinear` are torch's ``interpolate`` (bicubic, with or without
antialias; bilinear), float32, separable (width pass, then height); :func:`relative_position_index` and
:func:`relative_position_bias` are BEiT's relative position bias (SimMIM), R[h, i, j] = table[index[i, j], h],
resampled to the input's grid. :mod:`qkweights.vision.forward` applies them.
"""

from __future__ import annotations

import math

import numpy as np

# ---------------------------------------------------------------------------- position resampling


def _fma(a, b, c) -> np.ndarray:
    """a·b + c in float32 with a single rounding, like an FMA instruction (the float32 product is exact in float64)."""
    return (np.asarray(a, np.float64) * b + c).astype(np.float32)


def _cubic(x: np.ndarray, a: float, *, fuse_last: bool) -> np.ndarray:
    """Keys' cubic convolution kernel with parameter ``a`` at x (float32), as aten's x86-64 build rounds it.

    |x| ≤ 1: ((a + 2)|x| − (a + 3))|x|² + 1;  1 < |x| < 2: ((a|x| − 5a)|x| + 8a)|x| − 4a;  else 0.
    The compiler fuses the Horner steps into FMAs; in the plain bicubic kernel the last
    step is a separate multiply and add (``fuse_last=False``), in the antialiased one it
    is fused too. Matching this makes the weights bit-identical to torch's.
    """
    a, x = np.float32(a), np.abs(np.asarray(x, np.float32))
    near = (_fma(a + 2, x, -(a + 3)) * x).astype(np.float32)
    far = _fma(_fma(a, x, -5 * a), x, 8 * a)
    if fuse_last:
        near, far = _fma(near, x, np.float32(1)), _fma(far, x, -4 * a)
    else:
        near, far = near * x + np.float32(1), far * x - 4 * a
    return np.where(x <= 1, near, np.where(x < 2, far, np.float32(0))).astype(np.float32)


def _bicubic_taps(n_in: int, n_out: int) -> tuple[np.ndarray, np.ndarray]:
    """Source indices and weights of torch's bicubic resize along one axis (align_corners=False).

    Returns idx (n_out, 4) int, w (n_out, 4) float32. As aten's ``upsample_bicubic2d``:
    scale = in/out, src = scale·(i + ½) − ½ (one FMA), A = −0.75, taps clamped to the border.
    """
    scale = np.float32(n_in) / np.float32(n_out)
    src = _fma(scale, np.arange(n_out) + 0.5, -0.5)  # (n_out,)
    i0 = np.minimum(np.floor(src).astype(np.int64), n_in - 1)
    t = np.clip(src - i0.astype(np.float32), 0, 1).astype(np.float32)
    one = np.float32(1)
    taps = (t + one, t, one - t, (one - t) + one)
    w = np.stack([_cubic(x, -0.75, fuse_last=False) for x in taps], 1)  # (n_out, 4)
    idx = np.clip(i0[:, None] - 1 + np.arange(4), 0, n_in - 1)
    return idx, w


def _antialias_taps(n_in: int, n_out: int) -> tuple[np.ndarray, np.ndarray]:
    """Source indices and weights of torch's antialiased bicubic resize along one axis.

    As aten's ``_upsample_bicubic2d_aa`` (PIL's filter, a = −0.5): support 2 (×scale when
    shrinking), taps inside the image only, weights divided by their sum. Returns idx
    (n_out, S), w (n_out, S) float32 with zero weights on unused taps.
    """
    f32 = np.float32
    scale = f32(n_in) / f32(n_out)
    support = f32(2) * scale if scale >= 1 else f32(2)
    invscale = f32(1) / scale if scale >= 1 else f32(1)
    size = int(math.ceil(support)) * 2 + 1
    idx = np.zeros((n_out, size), np.int64)
    w = np.zeros((n_out, size), f32)
    for i in range(n_out):
        center = scale * f32(i + 0.5)
        lo = max(int(center - support + f32(0.5)), 0)
        n = min(int(center + support + f32(0.5)), n_in) - lo
        x = ((np.arange(lo, lo + n, dtype=f32) - center) + f32(0.5)) * invscale
        k = _cubic(x, -0.5, fuse_last=True)
        total = f32(0)
        for v in k:  # sequential float32 sum, as aten
            total = f32(total + v)
        idx[i, :n] = np.arange(lo, lo + n)
        w[i, :n] = k / total if total != 0 else k
    return idx, w


def _resample_axis(x: np.ndarray, axis: int, idx: np.ndarray, w: np.ndarray) -> np.ndarray:
    """Σ_j w[:, j] · x[idx[:, j]] along ``axis``, accumulated tap by tap in float32 (torch's order)."""
    x = np.moveaxis(x, axis, 0)
    shape = (-1,) + (1,) * (x.ndim - 1)
    out = x[idx[:, 0]] * w[:, 0].reshape(shape)
    for j in range(1, idx.shape[1]):
        out += x[idx[:, j]] * w[:, j].reshape(shape)
    return np.moveaxis(out, 0, axis)


def resize_bicubic(grid: np.ndarray, size: tuple[int, int], *, antialias: bool = False) -> np.ndarray:
    """torch.nn.functional.interpolate(mode="bicubic", align_corners=False, size=size) in numpy.

    grid: (gh, gw, D) float32 (channels last) → (size[0], size[1], D) float32. Without
    antialias: Keys' kernel A = −0.75 with border clamping, width interpolated inside
    each height tap as aten does. With antialias: PIL's a = −0.5 filter, width pass then
    height pass, axes whose size does not change are left untouched (as aten).
    """
    grid = np.asarray(grid, np.float32)
    (gh, gw), (oh, ow) = grid.shape[:2], size
    if antialias:
        out = grid
        if gw != ow:
            out = _resample_axis(out, 1, *_antialias_taps(gw, ow))
        if gh != oh:
            out = _resample_axis(out, 0, *_antialias_taps(gh, oh))
        return out
    rows = _resample_axis(grid, 1, *_bicubic_taps(gw, ow))  # (gh, ow, D)
    return _resample_axis(rows, 0, *_bicubic_taps(gh, oh))  # (oh, ow, D)


def _bilinear_taps(n_in: int, n_out: int) -> tuple[np.ndarray, np.ndarray]:
    """Source indices and weights of torch's bilinear resize along one axis (align_corners=False).

    Returns idx (n_out, 2) int, w (n_out, 2) float32. As aten's ``upsample_bilinear2d``:
    scale = in/out, src = max(scale·(i + ½) − ½, 0), i0 = ⌊src⌋, i1 = min(i0 + 1, in − 1),
    weights (1 − λ, λ) with λ = src − i0.
    """
    scale = np.float32(n_in) / np.float32(n_out)
    src = np.maximum(_fma(scale, np.arange(n_out) + 0.5, -0.5), 0)  # (n_out,)
    i0 = np.minimum(np.floor(src).astype(np.int64), n_in - 1)
    lam = np.clip(src - i0.astype(np.float32), 0, 1).astype(np.float32)
    idx = np.stack([i0, np.minimum(i0 + 1, n_in - 1)], 1)
    return idx, np.stack([np.float32(1) - lam, lam], 1)


def resize_bilinear(grid: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """torch.nn.functional.interpolate(mode="bilinear", align_corners=False, size=size) in numpy.

    grid: (h, w, C) float32 (channels last) → (size[0], size[1], C) float32; width pass, then height.
    """
    grid = np.asarray(grid, np.float32)
    rows = _resample_axis(grid, 1, *_bilinear_taps(grid.shape[1], size[1]))  # (h, size[1], C)
    return _resample_axis(rows, 0, *_bilinear_taps(grid.shape[0], size[0]))


# ---------------------------------------------------------------------------- relative position bias


def relative_position_index(grid: tuple[int, int]) -> np.ndarray:
    """BEiT's relative_position_index for a (gh, gw) patch grid with CLS first: (T, T) int64, T = gh·gw + 1.

    Patches i = (ri, ci), j = (rj, cj) in raster order: (ri − rj + gh − 1)(2gw − 1) + (ci − cj + gw − 1),
    in [0, n) with n = (2gh − 1)(2gw − 1); CLS → patch: n; patch → CLS: n + 1; CLS → CLS: n + 2
    (rows are queries, columns keys; SimMIM models/vision_transformer.py, unilm beit).
    """
    gh, gw = grid
    n = (2 * gh - 1) * (2 * gw - 1)
    r, c = np.divmod(np.arange(gh * gw), gw)  # (N,) row and column of each patch
    index = np.empty((gh * gw + 1,) * 2, np.int64)  # (T, T)
    index[1:, 1:] = (r[:, None] - r[None, :] + gh - 1) * (2 * gw - 1) + (c[:, None] - c[None, :] + gw - 1)
    index[0, :] = n
    index[:, 0] = n + 1
    index[0, 0] = n + 2
    return index


def relative_position_bias(table: np.ndarray, window: tuple[int, int], grid: tuple[int, int]) -> np.ndarray:
    """The bias R (H, T, T) float32 that BEiT adds to the attention logits: R[h, i, j] = table[index[i, j], h].

    table: ((2Wh−1)(2Ww−1) + 3, H), learnt for the patch grid ``window`` (Wh, Ww); grid: the input's
    patch grid (gh, gw), T = gh·gw + 1 with CLS first. For another grid the (2Wh−1)×(2Ww−1)
    part is resized to (2gh−1)×(2gw−1) with torch's bilinear ``interpolate`` (align_corners=False)
    and the 3 CLS entries are kept, as transformers' BeitRelativePositionBias does (it reshapes
    the part as (2Ww−1, 2Wh−1), the same thing for the square windows BEiT and SimMIM are trained
    on; SimMIM's own code accepts only the training size).
    """
    table = np.asarray(table, np.float32)
    if tuple(grid) != tuple(window):
        n, heads = (2 * window[0] - 1) * (2 * window[1] - 1), table.shape[1]
        sub = table[:n].reshape(2 * window[0] - 1, 2 * window[1] - 1, heads)  # (2Wh−1, 2Ww−1, H)
        sub = resize_bilinear(sub, (2 * grid[0] - 1, 2 * grid[1] - 1)).reshape(-1, heads)
        table = np.concatenate([sub, table[n:]])
    return np.ascontiguousarray(table[relative_position_index(grid)].transpose(2, 0, 1))  # (H, T, T)
