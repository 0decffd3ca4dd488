"""The forward pass of a Vision Transformer in numpy: arrays in, arrays out, float32 throughout.

:class:`ViTWeights` holds one model's weights, read once (``qkweights.vision.model`` builds
it from a checkpoint through its spec) and laid out for speed: every linear layer is a
:class:`~qkweights.vision.gemm.Linear`, its input-major ``(in, out)`` weight packed once for
OpenBLAS's kernel where numpy's BLAS allows it, q/k/v are fused into one ``(D, 3D)`` layer,
and the query weights carry the logit scale 1/√K.
:func:`forward` is the pre-norm ViT block, as transformers, timm and open_clip run it::

    x = embed(pixels)                                    # (B, T, D)  [+ pre_norm]
    for each block:
        h = LN1(x);  q, k, v = h W_q, h W_k, h W_v       # attention_inputs[l] = h
        a = softmax(q kᵀ / √K [+ R]) v                   # attentions[l] = softmax(...)
        x = x + s1 ⊙ (a W_o)
        x = x + s2 ⊙ MLP(LN2(x))
    last_hidden_state = final_norm(x)

Numerics follow torch on CPU: LayerNorm with the biased variance and eps inside the
square root, softmax with the row maximum subtracted, GELU with the same erf
approximation as torch's vectorised CPU kernel (see :func:`gelu_erf`), QuickGELU
``x·sigmoid(1.702x)``. Position tables are resampled to other patch grids with torch's
bicubic ``interpolate`` (:func:`qkweights.vision.positions.resize_bicubic`). ``R`` is BEiT's
relative position bias (SimMIM), R[h, i, j] = table[index[i, j], h]
(:func:`qkweights.vision.positions.relative_position_bias`), added after the
1/√K scale as BEiT, SimMIM and transformers' BeitModel add it.

Axis letters: B batch, T tokens, D width, H heads, K head dim, F MLP width, N patches.
"""

from __future__ import annotations

import math
import queue
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np

from qkweights.errors import InputError
from qkweights.specs.schema import ACTIVATIONS
from qkweights.vision.gemm import Linear, scratch
from qkweights.vision.positions import relative_position_bias, resize_bicubic
from qkweights.vision.threads import blas_threads, side_by_side

CHUNK = 65536  # elements per chunk of the GELU (the chunk and its 3 scratch arrays fit in a 2 MB L2 cache)


# ---------------------------------------------------------------------------- weights


@dataclass(frozen=True)
class Norm:
    """LayerNorm gain and bias, (D,) float32 each."""

    weight: np.ndarray
    bias: np.ndarray


@dataclass(frozen=True)
class BlockWeights:
    """One transformer block, float32; each linear layer a :class:`~qkweights.vision.gemm.Linear`, its weight
    input-major ``(in, out)`` and its bias.

    qkv: (D, 3D) columns [q | k | v], head-major inside each (head h = columns h·K…(h+1)·K−1);
    the q columns and q bias are pre-multiplied by 1/√K.
    out: (D, D). scale1, scale2: layer-scale (D,) or None.
    fc1: (D, F) — for SwiGLU (D, 2F), gate columns first; fc2: (F, D).
    rel_pos: relative position bias table ((2gh−1)(2gw−1) + 3, H) for the stored patch grid
    ``EmbeddingWeights.grid`` (gh, gw), the sum of the block's own and a shared table; None
    when the block has none.
    """

    norm1: Norm
    qkv: Linear
    out: Linear
    scale1: np.ndarray | None
    norm2: Norm
    fc1: Linear
    fc2: Linear
    scale2: np.ndarray | None
    rel_pos: np.ndarray | None = None


@dataclass(frozen=True)
class EmbeddingWeights:
    """Patch, special-token and position embeddings, float32.

    patch: (C·P·P, D) input-major, inputs ordered (channel, row, column) like the conv
    kernel; patch_bias: (D,) or None. tokens: the token kinds in sequence order (from
    ``qkweights.specs.schema.TOKEN_KINDS``, only those the model has). special: kind → (n, D) vectors (cls and
    dist: n = 1; registers: n = R). position: (rows, D) or None; position_tokens: the
    kinds its rows cover, in order (patches at the stored ``grid`` (gh, gw)).
    interpolation: how the patch rows are resampled to another grid ("bicubic" as
    torch's ``interpolate(mode="bicubic", align_corners=False)``; "bicubic_antialias"
    adds ``antialias=True``). pre_norm: LayerNorm applied to the embeddings, or None.
    """

    patch: np.ndarray
    patch_bias: np.ndarray | None
    patch_size: int
    tokens: tuple[str, ...]
    special: dict[str, np.ndarray]
    position: np.ndarray | None
    position_tokens: tuple[str, ...]
    grid: tuple[int, int]
    interpolation: str
    pre_norm: Norm | None


@dataclass(frozen=True)
class ViTWeights:
    """A whole vision transformer: embeddings, blocks, optional final and post norms.

    final_norm forms ``last_hidden_state``; post_norm applies to the pooled CLS token only
    (CLIP's post_layernorm, open_clip's ln_post). act: one of ``qkweights.specs.schema.ACTIVATIONS``.
    """

    embeddings: EmbeddingWeights
    blocks: tuple[BlockWeights, ...]
    final_norm: Norm | None
    post_norm: Norm | None
    heads: int
    head_dim: int
    eps: float
    act: str


# ---------------------------------------------------------------------------- outputs


@dataclass(frozen=True)
class TokenLayout:
    """Where each kind of token sits in the sequence (0-based indices into T)."""

    cls: int | None
    dist: int | None
    registers: tuple[int, ...]
    patches: slice
    grid: tuple[int, int]  # (gh, gw): patches are row-major over this grid
    n_tokens: int

    @property
    def special(self) -> list[int]:
        """All non-patch token indices, ascending."""
        return sorted([i for i in (self.cls, self.dist) if i is not None] + list(self.registers))


@dataclass(frozen=True)
class ForwardOutput:
    """Named intermediates of one forward pass (float32).

    hidden_states: L+1 entries (B, T, D); [l] is the residual stream entering block l
    (after the embeddings' pre_norm for l = 0), [L] the output of the last block. When
    the forward was asked for some ``layers`` only, the entries of the other layers
    below L are None (memory stays bounded by the layers asked).
    attention_inputs: layer → (B, T, D), the LayerNorm output that feeds W_q, W_k, W_v.
    attentions: layer → (B, H, T, T) softmax probabilities (query row, key column);
    empty unless ``attentions=True``.
    last_hidden_state: (B, T, D), hidden_states[L] after the final norm (if any).
    pooled: (B, D) post-norm of the CLS token when the model has a post norm, else None.
    """

    hidden_states: list
    attention_inputs: dict[int, np.ndarray]
    attentions: dict[int, np.ndarray]
    last_hidden_state: np.ndarray
    layout: TokenLayout
    pooled: np.ndarray | None = None


@dataclass(frozen=True)
class Keep:
    """What a forward pass keeps besides its last hidden state (the defaults: every residual stream and attention
    input, no attention).

    layers: block indices whose attention inputs (and attentions, with ``attentions``) and residual streams are
    kept; None keeps all. truncate: run only the blocks up to the deepest of ``layers`` (the last block too), and of
    the deepest only what is kept of it (its attention input, its attention); ``hidden_states`` then ends there and
    ``last_hidden_state`` and ``pooled`` are None. hidden=False, inputs=False: keep no
    residual streams, no attention inputs (``hidden_states`` entries and ``attention_inputs`` stay empty), so that an
    analysis holds only what it reads.
    """

    attentions: bool = False
    layers: Iterable[int] | None = None
    truncate: bool = False
    hidden: bool = True
    inputs: bool = True


# ---------------------------------------------------------------------------- elementwise math


def layer_norm(x: np.ndarray, norm: Norm, eps: float, out: np.ndarray | None = None) -> np.ndarray:
    """LayerNorm over the last axis as torch computes it: (x − mean)/√(var + eps)·w + b, biased variance.

    x: (..., D) float32 → (..., D) float32, written into ``out`` (same shape) when given, else a new array.
    """
    xc = np.subtract(x, x.mean(axis=-1, keepdims=True), out=out)  # (..., D)
    var = np.einsum("...d,...d->...", xc, xc)[..., None] / np.float32(x.shape[-1])  # (..., 1)
    xc *= 1 / np.sqrt(var + np.float32(eps))
    xc *= norm.weight
    xc += norm.bias
    return xc


def softmax_(z: np.ndarray) -> np.ndarray:
    """Softmax over the last axis, in place (torch's order: subtract the row max, exp, divide by the sum)."""
    z -= z.max(axis=-1, keepdims=True)
    np.exp(z, out=z)
    z *= 1 / z.sum(axis=-1, keepdims=True)
    return z


# erf(z) = 1 − (a1 t + a2 t² + a3 t³ + a4 t⁴ + a5 t⁵) e^{−z²}, t = 1/(1 + p z), z ≥ 0, |error| ≤ 1.5e-7:
# Abramowitz & Stegun 7.1.26, the approximation of torch's vectorised CPU erf (aten/src/ATen/cpu/vec).
# For z = |x|/√2, p absorbs the 1/√2 and the a_i are halved, so the polynomial times e^{−x²/2} is
# h = ½(1 − erf(|x|/√2)): Φ(x) = 1 − h for x ≥ 0, h for x < 0.
_AS_P = np.float32(0.3275911 / math.sqrt(2))
_AS_A = tuple(np.float32(0.5 * a) for a in (0.254829592, -0.284496736, 1.421413741, -1.453152027, 1.061405429))


def _gelu_erf_chunk(x: np.ndarray, a: np.ndarray, t: np.ndarray, r: np.ndarray) -> None:
    """x·Φ(x) in place on a 1-D chunk; a, t, r: scratch of the same size."""
    a1, a2, a3, a4, a5 = _AS_A
    np.abs(x, out=a)  # |x|
    np.multiply(a, _AS_P, out=t)
    t += 1
    np.reciprocal(t, out=t)  # t
    np.multiply(t, a5, out=r)  # Horner: r = t(a1 + t(a2 + t(a3 + t(a4 + t a5))))
    for c in (a4, a3, a2, a1):
        r += c
        r *= t
    np.multiply(x, np.float32(-0.5), out=t)
    t *= x
    np.exp(t, out=t)  # e^{−x²/2}
    r *= t  # h
    r *= a  # |x|·h
    np.maximum(x, 0, out=x)
    x -= r  # x·Φ(x) = max(x, 0) − |x|·h


def gelu_erf(x: np.ndarray, scratch: np.ndarray | None = None) -> np.ndarray:
    """Exact-form GELU x·½(1 + erf(x/√2)) in float32, any shape; in place when x is C-contiguous float32.

    erf is torch's CPU approximation (Abramowitz & Stegun 7.1.26, |error| ≤ 1.5e-7), so
    the result agrees with torch's GELU to float32 rounding; computed in L2-sized chunks.
    scratch: (3, n) float32 to work in (n ≥ 1; chunks of at most n elements), else one is made.
    """
    x = np.ascontiguousarray(x, dtype=np.float32)
    flat = x.reshape(-1)
    if scratch is None or scratch.shape[1] == 0:
        scratch = np.empty((3, CHUNK), np.float32)
    chunk = scratch.shape[1]
    for start in range(0, flat.size, chunk):
        n = min(chunk, flat.size - start)
        _gelu_erf_chunk(flat[start : start + n], *scratch[:, :n])
    return x


def activation_(x: np.ndarray, act: str, scratch: np.ndarray | None = None) -> np.ndarray:
    """The MLP activation ``act`` applied to x (F columns; SwiGLU: 2F, gate first), in place where it can. Returns
    (..., F). scratch: the GELU's work space (see :func:`gelu_erf`)."""
    with np.errstate(over="ignore"):  # e^{−v} → inf for v ≪ 0 gives the right limit, 0
        return _activation(x, act, scratch)


def _activation(x: np.ndarray, act: str, scratch: np.ndarray | None) -> np.ndarray:
    if act == "gelu":
        return gelu_erf(x, scratch)
    if act == "quick_gelu":  # x·sigmoid(1.702x) = x / (1 + e^{−1.702x})
        s = np.exp(x * np.float32(-1.702))
        s += 1
        x /= s
        return x
    if act == "gelu_tanh":  # ½x(1 + tanh(√(2/π)(x + 0.044715x³)))
        u = x * x
        u *= np.float32(0.044715)
        u += 1
        u *= x
        u *= np.float32(math.sqrt(2 / math.pi))
        np.tanh(u, out=u)
        u += 1
        u *= np.float32(0.5)
        x *= u
        return x
    if act == "relu":
        return np.maximum(x, 0, out=x)
    if act == "swiglu":  # silu(gate)·up, silu(g) = g / (1 + e^{−g})
        f = x.shape[-1] // 2
        gate, up = x[..., :f], x[..., f:]
        s = np.exp(-gate)
        s += 1
        out = gate / s
        out *= up
        return out
    raise InputError(f"activation {act!r} is not supported; use one of {', '.join(ACTIVATIONS)}")


# ---------------------------------------------------------------------------- embeddings


def token_layout(emb: EmbeddingWeights, grid: tuple[int, int]) -> TokenLayout:
    """Indices of each token kind for a patch grid (gh, gw)."""
    where, start = {}, 0
    for kind in emb.tokens:
        n = grid[0] * grid[1] if kind == "patches" else len(emb.special[kind])
        where[kind] = range(start, start + n)
        start += n
    patches = where["patches"]
    return TokenLayout(
        cls=where["cls"][0] if "cls" in where else None,
        dist=where["dist"][0] if "dist" in where else None,
        registers=tuple(where.get("registers", ())),
        patches=slice(patches.start, patches.stop),
        grid=grid,
        n_tokens=start,
    )


def position_rows(emb: EmbeddingWeights, grid: tuple[int, int]) -> dict[str, np.ndarray]:
    """Position vectors per token kind for a patch grid: kind → (n, D); patches resampled if the grid differs."""
    if emb.position is None:
        return {}
    rows, start = {}, 0
    for kind in emb.position_tokens:
        n = emb.grid[0] * emb.grid[1] if kind == "patches" else len(emb.special[kind])
        rows[kind] = emb.position[start : start + n]
        start += n
    if "patches" in rows and grid != emb.grid:
        d = emb.position.shape[1]
        table = rows["patches"].reshape(*emb.grid, d)  # (gh, gw, D)
        resized = resize_bicubic(table, grid, antialias=emb.interpolation == "bicubic_antialias")
        rows["patches"] = resized.reshape(-1, d)  # (N, D)
    return rows


def embed(emb: EmbeddingWeights, pixels: np.ndarray, eps: float) -> tuple[np.ndarray, TokenLayout]:
    """Token embeddings of images: pixels (B, C, H, W) float32 → x (B, T, D) and the layout.

    The patch conv (stride P) is one matmul over non-overlapping P×P patches; rows and
    columns beyond the last whole patch are dropped, as the conv does.
    """
    b, c, h, w = pixels.shape
    p = emb.patch_size
    gh, gw = h // p, w // p
    d = emb.patch.shape[1]
    patches = pixels[:, :, : gh * p, : gw * p].reshape(b, c, gh, p, gw, p).transpose(0, 2, 4, 1, 3, 5)
    patches = patches.reshape(b * gh * gw, c * p * p)  # (B·N, C·P·P)
    x_patch = patches @ emb.patch  # (B·N, D)
    if emb.patch_bias is not None:
        x_patch += emb.patch_bias
    layout = token_layout(emb, (gh, gw))
    pos = position_rows(emb, (gh, gw))
    x = np.empty((b, layout.n_tokens, d), np.float32)  # (B, T, D)
    start = 0
    for kind in emb.tokens:
        tokens = x_patch.reshape(b, gh * gw, d) if kind == "patches" else emb.special[kind][None]  # (B|1, n, D)
        n = tokens.shape[1]
        x[:, start : start + n] = tokens + pos[kind] if kind in pos else tokens
        start += n
    if emb.pre_norm is not None:
        x = layer_norm(x, emb.pre_norm, eps)
    return x, layout


# ---------------------------------------------------------------------------- the forward pass


def check_layers(layers: Iterable[int] | None, n_layers: int) -> list[int]:
    """The requested layer indices (0-based, sorted, unique); None means all."""
    if layers is None:
        return list(range(n_layers))
    out = sorted({int(l) for l in layers})
    bad = [l for l in out if not 0 <= l < n_layers]
    if bad:
        raise InputError(f"layer {bad[0]} is out of range: the model has {n_layers} layers (0–{n_layers - 1})")
    return out


def check_pixels(pixels, channels: int, patch_size: int) -> np.ndarray:
    """pixel_values as a C-contiguous float32 (B, C, H, W) array, or an InputError."""
    x = np.ascontiguousarray(pixels, dtype=np.float32)
    if x.ndim != 4 or x.shape[1] != channels:
        raise InputError(f"pixel_values has shape {x.shape}; expected (batch, {channels}, height, width)")
    if x.shape[0] == 0 or x.shape[2] < patch_size or x.shape[3] < patch_size:
        raise InputError(
            f"pixel_values has shape {x.shape}; give at least one image of at least {patch_size}×{patch_size} pixels"
        )
    if not np.isfinite(x).all():
        raise InputError("pixel_values holds NaN or infinite values; check the images and their preprocessing")
    return x


class _Workspace:
    """The scratch arrays of one image's pass through the blocks, carved from one allocation and reused for every
    block and every image a thread runs: fresh arrays per operation cost page faults (about 5% of the forward
    pass, measured), one block of several MB is backed by huge pages where the kernel offers them.

    x: the residual stream (T, D); mid: it after the attention; h: a LayerNorm output (T, D); qkv (T, 3D);
    logits (H, T, T); ctx (T, D) laid out (T, H, K); mlp (T, F′) with F′ the widest fc1 of ``blocks``; gelu: the
    activation's scratch; pack: the linear layers' (:func:`qkweights.vision.gemm.scratch`).
    """

    def __init__(self, t: int, d: int, heads: int, blocks: tuple[BlockWeights, ...], act: str):
        f1 = max((blk.fc1.shape[1] for blk in blocks), default=0)
        shapes = {
            "x": (t, d),
            "mid": (t, d),
            "h": (t, d),
            "qkv": (t, 3 * d),
            "logits": (heads, t, t),
            "ctx": (t, d),
            "mlp": (t, f1),
            "gelu": (3, min(CHUNK, t * f1) if act == "gelu" else 0),
        }
        # each view starts a multiple of 16 floats (64 bytes, a cache line) into the block
        sizes = {name: -(-math.prod(shape) // 16) * 16 for name, shape in shapes.items()}
        flat = np.empty(sum(sizes.values()), np.float32)
        start = 0
        for name, shape in shapes.items():
            setattr(self, name, flat[start : start + math.prod(shape)].reshape(shape))
            start += sizes[name]
        self.pack = scratch(t, blocks[0].qkv.route if blocks else "numpy")


@dataclass(frozen=True)
class _Plan:
    """What one forward call keeps and where: the batch's output arrays, which each image's pass fills at its
    index. hidden[l], inputs[l], attentions[l]: (B, T, D), (B, T, D), (B, H, T|Q, T) arrays, None when not kept;
    hidden has depth + 1 entries, the last the output of the last block (None when the pass stops early).
    last, pooled: (B, T, D) after the final norm, (B, D) after the post norm, or None. rows: (B, Q) query rows
    of the attentions, or None. bias: layer → relative position bias (H, T, T) for this grid.
    """

    depth: int
    hidden: list
    inputs: list
    attentions: list
    last: np.ndarray | None
    pooled: np.ndarray | None
    rows: np.ndarray | None
    bias: dict


def _plan(wt: ViTWeights, b: int, layout: TokenLayout, layers: set[int], keep: Keep, rows) -> _Plan:
    t, d, heads = layout.n_tokens, wt.embeddings.patch.shape[1], wt.heads
    depth = max(layers, default=-1) + 1 if keep.truncate else len(wt.blocks)
    whole = not keep.truncate

    def kept(flag: bool, shape: tuple) -> list:
        return [np.empty(shape, np.float32) if flag and l in layers else None for l in range(depth)]

    hidden = kept(keep.hidden, (b, t, d)) + [np.empty((b, t, d), np.float32) if whole else None]
    return _Plan(
        depth=depth,
        hidden=hidden,
        inputs=kept(keep.inputs, (b, t, d)),
        attentions=kept(keep.attentions, (b, heads, t if rows is None else rows.shape[1], t)),
        last=(np.empty((b, t, d), np.float32) if wt.final_norm is not None else hidden[-1]) if whole else None,
        pooled=np.empty((b, d), np.float32) if whole and wt.post_norm is not None and layout.cls is not None else None,
        rows=rows,
        bias={
            l: relative_position_bias(blk.rel_pos, wt.embeddings.grid, layout.grid)
            for l, blk in enumerate(wt.blocks[:depth])
            if blk.rel_pos is not None
        },
    )


def _block(wt: ViTWeights, l: int, x: np.ndarray, plan: _Plan, i: int, ws: _Workspace) -> np.ndarray:
    """Block l on image i's residual stream x (T, D); returns the next residual stream (plan.hidden[l + 1][i]
    when kept, else ws.x). The last block of a truncated pass, whose output nobody keeps, stops once its attention
    input and (when kept) its attention are computed, and returns x."""
    blk, heads, k, t = wt.blocks[l], wt.heads, wt.head_dim, len(x)
    tail = l + 1 == plan.depth and plan.hidden[l + 1] is None
    h = layer_norm(x, blk.norm1, wt.eps, out=plan.inputs[l][i] if plan.inputs[l] is not None else ws.h)
    if tail and plan.attentions[l] is None:
        return x
    qkv = blk.qkv(h, ws.qkv, ws.pack)  # (T, 3D)
    q, key, v = qkv.reshape(t, 3, heads, k).transpose(1, 2, 0, 3)  # 3 × (H, T, K); q already scaled by 1/√K
    att = np.matmul(q, key.swapaxes(-1, -2), out=ws.logits)  # (H, T, T)
    if l in plan.bias:
        att += plan.bias[l]
    softmax_(att)
    if plan.attentions[l] is not None:
        plan.attentions[l][i] = att if plan.rows is None else att[:, plan.rows[i]]  # (H, T|Q, T)
    if tail:
        return x
    np.matmul(att, v, out=ws.ctx.reshape(t, heads, k).transpose(1, 0, 2))  # (H, T, K) into (T, H·K)
    mid = blk.out(ws.ctx, ws.mid, ws.pack)  # (T, D)
    if blk.scale1 is not None:
        mid *= blk.scale1
    mid += x
    m = blk.fc1(layer_norm(mid, blk.norm2, wt.eps, out=ws.h), ws.mlp[:, : blk.fc1.shape[1]], ws.pack)
    m = activation_(m, wt.act, scratch=ws.gelu)  # (T, F)
    nxt = plan.hidden[l + 1][i] if plan.hidden[l + 1] is not None else ws.x
    blk.fc2(m, nxt, ws.pack)  # (T, D)
    if blk.scale2 is not None:
        nxt *= blk.scale2
    nxt += mid
    return nxt


def _run(wt: ViTWeights, pixels: np.ndarray, plan: _Plan, i: int, ws: _Workspace) -> None:
    """Image i of pixels alone through the embeddings, plan.depth blocks and the norms, into the plan's arrays."""
    x, layout = embed(wt.embeddings, pixels[i : i + 1], wt.eps)
    x = x[0]  # (T, D)
    if plan.hidden[0] is not None:
        plan.hidden[0][i] = x
    for l in range(plan.depth):
        x = _block(wt, l, x, plan, i, ws)
    if plan.last is not None and wt.final_norm is not None:
        layer_norm(x, wt.final_norm, wt.eps, out=plan.last[i])
    if plan.pooled is not None:
        layer_norm(plan.last[i, layout.cls], wt.post_norm, wt.eps, out=plan.pooled[i])


def forward(
    weights: ViTWeights,
    pixels: np.ndarray,
    keep: Keep = Keep(),
    *,
    rows: np.ndarray | None = None,
    threads: int | None = None,
) -> ForwardOutput:
    """Run the model on pixels (B, C, H, W) (already preprocessed), keeping what ``keep`` (:class:`Keep`) says.

    One arithmetic per image: every image runs through the model alone, (T, D) arrays
    and one-thread BLAS, so its outputs are bit-identical whatever the batch, its position
    in it, the thread count or the executor (a batched ``(B·T, D) @ W`` rounds a row
    according to where its image sits among the kernel's tiles on some BLAS kernels, e.g.
    OpenBLAS's Haswell one). They depend on the machine's BLAS kernel (the
    ``OPENBLAS_CORETYPE``) and GEMM route (:func:`qkweights.vision.gemm.gemm_route`), in
    the last digits. Each thread works in one scratch block
    reused from image to image, and what is kept is written straight into the batch's
    output arrays (no per-operation arrays, no concatenation at the end).

    rows: (B, Q) token indices; ``attentions[l]`` then holds only those query rows, (B, H, Q, T), so
    that memory does not grow with T². threads: how many images run side by side,
    one per Python thread (numpy releases the GIL; default: as many as numpy's BLAS may use
    threads). Returns a :class:`ForwardOutput`.
    """
    layers = set(check_layers(keep.layers, len(weights.blocks)))
    emb = weights.embeddings
    x = check_pixels(pixels, emb.patch.shape[0] // emb.patch_size**2, emb.patch_size)  # (B, C, H, W)
    if rows is not None:
        rows = np.asarray(rows, np.int64).reshape(len(x), -1)  # (B, Q)
    layout = token_layout(emb, (x.shape[2] // emb.patch_size, x.shape[3] // emb.patch_size))
    plan = _plan(weights, len(x), layout, layers, keep, rows)
    n = min(threads or blas_threads(), len(x))
    spaces = queue.SimpleQueue()  # one workspace per thread, handed from image to image
    for _ in range(n):
        spaces.put(_Workspace(layout.n_tokens, emb.patch.shape[1], weights.heads, weights.blocks, weights.act))

    def one(i: int) -> None:  # image i alone
        ws = spaces.get()
        _run(weights, x, plan, i, ws)
        spaces.put(ws)

    side_by_side(one, range(len(x)), n)
    return ForwardOutput(
        hidden_states=plan.hidden if plan.hidden[-1] is not None else plan.hidden[:-1],
        attention_inputs={l: a for l, a in enumerate(plan.inputs) if a is not None},
        attentions={l: a for l, a in enumerate(plan.attentions) if a is not None},
        last_hidden_state=plan.last,
        layout=layout,
        pooled=plan.pooled,
    )
