"""A vision checkpoint as a runnable model: spec roles → :class:`~qkweights.forward.ViTWeights` → forward pass.

Everything here reads weights by the *role* a spec gives them (``model_specs/*.toml``:
``[attention]``, ``[block]``, ``[embeddings]``, ``[dims]``, ``[preprocess]``), never by
tensor or family name, so a new family needs a spec file, not code. Query and key
weights come from :meth:`Checkpoint.qk`, the same accessor the weight profile uses, so
the forward pass and the SVD see identical ``W_q``, ``W_k``.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import numpy as np

from qkweights.errors import CheckpointError, InputError, SpecError
from qkweights.forward import (
    INTERPOLATIONS,
    TOKEN_KINDS,
    BlockWeights,
    EmbeddingWeights,
    ForwardOutput,
    Norm,
    ViTWeights,
    forward,
    relative_position_index,
)
from qkweights.preprocess import Preprocess
from qkweights.runner import ModelRef, remember
from qkweights.source import Source
from qkweights.spec import Checkpoint, Dims

# Config activation names (transformers' ACT2FN keys, open_clip's quick_gelu) → forward.ACTIVATIONS.
ACTIVATION_NAMES = {
    "gelu": "gelu",
    "quick_gelu": "quick_gelu",
    "gelu_new": "gelu_tanh",
    "gelu_pytorch_tanh": "gelu_tanh",
    "gelu_fast": "gelu_tanh",
    "relu": "relu",
}
# spec logit_terms the forward pass adds to the attention logits
FORWARD_LOGIT_TERMS = ("relative position bias",)


def _f32(a: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(a, dtype=np.float32)


def _expect(ck: Checkpoint, a: np.ndarray, shape: tuple[int, ...], what: str) -> np.ndarray:
    if a.shape != shape:
        raise CheckpointError(f"{ck.spec.name}: {what} has shape {a.shape}, expected {shape} from the config (hidden {ck.dims.hidden}); the config does not fit the tensors")
    return a


def _norm(ck: Checkpoint, section: str, role: str, i: int | None = None) -> Norm | None:
    """The LayerNorm a spec names ``role``, or None when the spec or the checkpoint lacks it."""
    if not ck.has_role(section, role, i):
        return None
    w, b = ck.module(section, role, i)
    d = ck.dims.hidden
    where = f"{role}" if i is None else f"layer {i} {role}"
    w = _expect(ck, w, (d,), f"{where} weight")
    return Norm(_f32(w), _f32(np.zeros(d) if b is None else _expect(ck, b, (d,), f"{where} bias")))


def _linear(ck: Checkpoint, section: str, role: str, i: int, rows: int | None, cols: int) -> tuple[np.ndarray, np.ndarray]:
    """(weight (out, in), bias (out,)) of a linear layer, shape-checked (rows None: any), zero bias when absent."""
    w, b = ck.module(section, role, i)
    w = _expect(ck, w, (w.shape[0] if rows is None else rows, cols), f"layer {i} {role} weight")
    b = np.zeros(w.shape[0]) if b is None else _expect(ck, b, (w.shape[0],), f"layer {i} {role} bias")
    return w, b


def value_weights(ck: Checkpoint, i: int) -> tuple[np.ndarray, np.ndarray]:
    """W_v (D, D) stored (out, in) and b_v (D,) of layer ``i``, as :meth:`Checkpoint.qk` reads q and k.

    A separate ``v`` module, or rows 2D…3D of the fused ``qkv``; a spec's ``v_bias``
    tensor overrides the bias (BEiT-style separate biases); no bias reads as zeros.
    """
    att, d = ck.spec.attention, ck.dims.hidden
    if "qkv" in att:
        w, b = _linear(ck, "attention", "qkv", i, 3 * d, d)
        w, b = w[2 * d :], b[2 * d :]
    else:
        w, b = _linear(ck, "attention", "v", i, d, d)
    if "v_bias" in att and ck.has(att["v_bias"], i):
        b = _expect(ck, ck.tensor(att["v_bias"], i), (d,), f"layer {i} v_bias")
    return w, b


def _scale(ck: Checkpoint, role: str, i: int) -> np.ndarray | None:
    """A layer-scale vector (D,), or None when the spec or the checkpoint has none."""
    template = ck.spec.block.get(role)
    if template is None or not ck.has(template, i):
        return None
    return _f32(_expect(ck, ck.tensor(template, i), (ck.dims.hidden,), f"layer {i} {role}"))


def _activation(ck: Checkpoint) -> str:
    if ck.dims.swiglu:
        return "swiglu"
    act = ck.dims.act
    if act not in ACTIVATION_NAMES:
        raise SpecError(f"{ck.spec.name}: activation {act!r} is not supported by the forward pass (supported: {', '.join(ACTIVATION_NAMES)}); fix hidden_act in the config or [dims] act in {ck.spec.path.name}")
    return ACTIVATION_NAMES[act]


def relative_position_table(ck: Checkpoint, i: int, window: tuple[int, int]) -> np.ndarray | None:
    """The relative position bias table of block ``i``, ((2Wh−1)(2Ww−1) + 3, H) float32, or None.

    The sum of the tables named by the spec's ``[attention] relative_position_bias`` that the
    checkpoint holds for block ``i`` (its own and a shared one: their biases add, and the gather
    and the resize are linear). ``window``: the stored patch grid (Wh, Ww) the tables were learnt
    for. Stored ``relative_position_index`` buffers must equal :func:`relative_position_index`.
    """
    att = ck.spec.attention
    if "relative_position_bias" not in att:
        return None
    heads, (wh, ww) = ck.dims.heads, window
    rows = (2 * wh - 1) * (2 * ww - 1) + 3
    tables = [t for t in att["relative_position_bias"] if ck.has(t, i)]
    if not tables:
        raise CheckpointError(f"{ck.spec.name}: layer {i} has none of the relative position tables {', '.join(att['relative_position_bias'])}; the checkpoint is incomplete or of another family (try --family)")
    total = np.zeros((rows, heads), np.float64)
    for t in tables:
        total += _expect(ck, ck.tensor(t, i), (rows, heads), f"relative position table {ck.name(t, i)} (for a {wh}×{ww} patch grid)")
    expected = relative_position_index(window)
    for t in att.get("relative_position_index", []):
        if ck.has(t, i) and not np.array_equal(ck.tensor(t, i), expected):
            raise CheckpointError(f"{ck.spec.name}: {ck.name(t, i)} differs from BEiT's relative position index for a {wh}×{ww} patch grid; the checkpoint was built for another grid or indexes its table differently")
    return _f32(total)


def block_weights(ck: Checkpoint, i: int, window: tuple[int, int]) -> BlockWeights:
    """Block ``i`` as float32 input-major matrices; q columns and bias pre-scaled by 1/√K.

    window: the stored patch grid, for the relative position table (see :func:`relative_position_table`).
    """
    d, k = ck.dims.hidden, ck.dims.head_dim
    qk = ck.qk(i)  # (H, K, D) float64
    wv, bv = value_weights(ck, i)
    scale = 1 / math.sqrt(k)
    wqkv = np.concatenate([qk.wq.reshape(d, d) * scale, qk.wk.reshape(d, d), wv])  # (3D, D) out-major
    bqkv = np.concatenate([qk.bq.reshape(d) * scale, qk.bk.reshape(d), bv])  # (3D,)
    wo, bo = _linear(ck, "attention", "out", i, d, d)
    fc1, fc2 = ("swiglu_in", "swiglu_out") if ck.dims.swiglu else ("fc1", "fc2")
    w1, b1 = _linear(ck, "block", fc1, i, None, d)  # (F, D); SwiGLU (2F, D), gate rows first
    w2, b2 = _linear(ck, "block", fc2, i, d, w1.shape[0] // 2 if ck.dims.swiglu else w1.shape[0])
    norm1, norm2 = _norm(ck, "block", "norm1", i), _norm(ck, "block", "norm2", i)
    if norm1 is None or norm2 is None:
        raise CheckpointError(f"{ck.spec.name}: layer {i} lacks its norm1/norm2 LayerNorm ({ck.spec.block.get('norm1')}, {ck.spec.block.get('norm2')}); the checkpoint is incomplete or of another family")
    return BlockWeights(
        norm1=norm1,
        qkv=_f32(wqkv.T),
        qkv_bias=_f32(bqkv),
        out=_f32(wo.T),
        out_bias=_f32(bo),
        scale1=_scale(ck, "scale1", i),
        norm2=norm2,
        fc1=_f32(w1.T),
        fc1_bias=_f32(b1),
        fc2=_f32(w2.T),
        fc2_bias=_f32(b2),
        scale2=_scale(ck, "scale2", i),
        rel_pos=relative_position_table(ck, i, window),
    )


def patch_size_used(ck: Checkpoint) -> int | None:
    """The patch size the forward pass uses: the side of the patch embedding's kernel (read from the header only)."""
    ref = ck.spec.embeddings.get("patch")
    if ref is None:
        return None
    name = ck.prefix + (ref + ".weight" if isinstance(ref, str) else ref["weight"])
    shape = ck.store.shape(name) if name in ck.store else ()
    return int(shape[2]) if len(shape) == 4 and shape[2] == shape[3] else None


def checkpoint_notes(ck: Checkpoint) -> list[str]:
    """What a user should know about how the checkpoint is read: the config and the tensors disagreeing."""
    used, said = patch_size_used(ck), ck.dims.patch_size
    if used is not None and said is not None and used != said:
        where = ck.spec.config_file or "config"
        return [f"{where} says patch_size {said}, but the patch embedding's kernel is {used}×{used}; the forward pass uses {used}"]
    return []


def _stored_grid(ck: Checkpoint, n: int) -> tuple[int, int]:
    """The patch grid of ``n`` position rows: the config's image size if it fits, else a square."""
    p, image = ck.dims.patch_size, ck.dims.image_size
    if image is not None and p and (image[0] // p) * (image[1] // p) == n:
        return image[0] // p, image[1] // p
    side = math.isqrt(n)
    if side * side != n:
        raise CheckpointError(f"{ck.spec.name}: the position table's {n} patch rows form no square grid and do not match the image size {image} / patch {p}; set image_size in the config")
    return side, side


def _position_cover(ck: Checkpoint, rows: int, n_special: int, listed: tuple[str, ...], p: int) -> tuple[str, ...]:
    """The token kinds a position table of ``rows`` rows covers.

    ``listed``: the spec's position_tokens present in the checkpoint, holding
    ``n_special`` non-patch tokens. A table with exactly one row per patch of the stored
    grid covers the patches only (timm's no_embed_class); otherwise it covers ``listed``.
    When the image size fits neither, the table covers ``listed`` unless only its full row
    count forms a square grid.
    """
    image = ck.dims.image_size
    n_stored = (image[0] // p) * (image[1] // p) if image else None
    if n_special == 0 or rows == n_stored:
        return ("patches",)
    if rows == (n_stored or 0) + n_special or _is_square(rows - n_special) or not _is_square(rows):
        return listed
    return ("patches",)


def _is_square(n: int) -> bool:
    return n > 0 and math.isqrt(n) ** 2 == n


def embedding_weights(ck: Checkpoint) -> EmbeddingWeights:
    """Patch conv, special tokens and positions, read through the spec's ``[embeddings]`` table."""
    table, d = ck.spec.embeddings, ck.dims.hidden
    order = tuple(table.get("tokens", ["patches"]))
    unknown = [t for t in order + tuple(table.get("position_tokens", [])) if t not in TOKEN_KINDS]
    if unknown or "patches" not in order:
        raise SpecError(f"{ck.spec.path.name}: [embeddings] tokens must list 'patches' and only {', '.join(TOKEN_KINDS)} (found {unknown or list(order)})")
    special = {
        kind: _f32(ck.tensor(table[kind]).reshape(-1, d))  # (n, D)
        for kind in order
        if kind != "patches" and kind in table and ck.has(table[kind])
    }
    tokens = tuple(t for t in order if t == "patches" or t in special)
    w, b = ck.module("embeddings", "patch")
    if w.ndim != 4 or w.shape[0] != d or w.shape[2] != w.shape[3]:
        raise CheckpointError(f"{ck.spec.name}: patch embedding weight has shape {w.shape}, expected ({d}, channels, P, P)")
    p = w.shape[2]
    position, covered, grid = None, (), None
    if "position" in table and ck.has(table["position"]):
        position = _f32(ck.tensor(table["position"]).reshape(-1, d))  # (rows, D)
        listed = tuple(t for t in table.get("position_tokens", ["patches"]) if t == "patches" or t in special)
        covered = _position_cover(ck, position.shape[0], sum(len(special[t]) for t in listed if t != "patches"), listed, p)
        n_patch_rows = position.shape[0] - sum(len(special[t]) for t in covered if t != "patches")
        grid = _stored_grid(ck, n_patch_rows)
    else:
        image = ck.dims.image_size or (p, p)
        grid = (image[0] // p, image[1] // p)
    interpolation = ck.dims.extra.get("interpolation", "bicubic")
    if interpolation not in INTERPOLATIONS:
        raise SpecError(f"{ck.spec.path.name}: [dims] interpolation {interpolation!r} is not one of {', '.join(INTERPOLATIONS)}")
    return EmbeddingWeights(
        patch=_f32(w.reshape(d, -1).T),  # (C·P·P, D)
        patch_bias=None if b is None else _f32(_expect(ck, b, (d,), "patch embedding bias")),
        patch_size=p,
        tokens=tokens,
        special=special,
        position=position,
        position_tokens=covered,
        grid=grid,
        interpolation=interpolation,
        pre_norm=_norm(ck, "embeddings", "pre_norm"),
    )


def vit_weights(ck: Checkpoint) -> ViTWeights:
    """All weights of a vision checkpoint in float32, read once (layer by layer)."""
    dims = ck.dims
    if dims.eps is None:
        raise SpecError(f"{ck.spec.path.name}: [dims] gives no LayerNorm eps; add eps")
    emb = embedding_weights(ck)
    if "relative_position_bias" in ck.spec.attention and emb.tokens != ("cls", "patches"):
        raise SpecError(f"{ck.spec.path.name}: a relative position bias needs the tokens [cls, patches] (its 3 extra entries are CLS biases), the checkpoint gives {list(emb.tokens)}")
    return ViTWeights(
        embeddings=emb,
        blocks=tuple(block_weights(ck, i, emb.grid) for i in range(dims.layers)),
        final_norm=_norm(ck, "embeddings", "final_norm"),
        post_norm=_norm(ck, "embeddings", "post_norm"),
        heads=dims.heads,
        head_dim=dims.head_dim,
        eps=dims.eps,
        act=_activation(ck),
    )


def preprocessing_for(ck: Checkpoint) -> tuple[Preprocess, str]:
    """The checkpoint's own preprocessing per the spec's ``[preprocess] format``, and where it came from.

    "hf": preprocessor_config.json; "timm": config.json's pretrained_cfg; "open_clip":
    open_clip_config.json's preprocess_cfg. Without that file, the format's defaults at the
    model's image size: transformers' ViT processor (resize, mean/std 0.5), timm's
    ``resolve_data_config`` (crop_pct 0.875, ImageNet mean/std), open_clip's (OpenAI mean/std).
    """
    fmt = ck.spec.preprocess.get("format", "hf")
    image = ck.dims.image_size or (224, 224)
    if fmt == "timm":
        cfg = ck.config.get("pretrained_cfg")
        if isinstance(cfg, dict):
            return Preprocess.from_timm(cfg), "config.json pretrained_cfg"
        return Preprocess.from_timm({"input_size": [3, *image]}), f"timm defaults at {image[0]}×{image[1]} (no pretrained_cfg)"
    if fmt == "open_clip":
        cfg = ck.configs.get("open_clip_config.json", {}).get("preprocess_cfg")
        origin = "open_clip_config.json preprocess_cfg" if cfg else f"open_clip defaults at {image[0]}×{image[1]} (no preprocess_cfg)"
        return Preprocess.from_open_clip(cfg or {}, image), origin
    if fmt != "hf":
        raise SpecError(f"{ck.spec.path.name}: [preprocess] format {fmt!r} is not one of hf, timm, open_clip")
    if "preprocessor_config.json" in ck.configs:
        return Preprocess.from_hf(ck.configs["preprocessor_config.json"]), "preprocessor_config.json"
    default = {"image_processor_type": "ViTImageProcessor", "size": {"height": image[0], "width": image[1]}}
    return Preprocess.from_hf(default), f"ViT processor defaults at {image[0]}×{image[1]} (no preprocessor_config.json)"


@dataclass(frozen=True)
class VisionModel:
    """A vision checkpoint ready to run: weights in float32 and the checkpoint's preprocessing."""

    checkpoint: Checkpoint
    source: Source | None
    weights: ViTWeights
    preprocessing: Preprocess
    preprocessing_origin: str
    notes: tuple[str, ...] = ()  # for the user: preprocessing defaults, config/tensor disagreements
    ref: ModelRef | None = None  # how worker processes open the same model (None: built from a Checkpoint in memory)

    @property
    def dims(self) -> Dims:
        return self.checkpoint.dims

    def preprocess(self, images, *, size=None) -> np.ndarray:
        """Model input (B, 3, H, W) float32 for one image or a list (paths, PIL images, uint8 arrays).

        size: None for the checkpoint's own resize and crop; an int or (height, width)
        to resize straight to that many pixels instead (no crop; positions are then
        interpolated to the new patch grid by :meth:`forward`).
        """
        prep = self.preprocessing
        if size is not None:
            h, w = (size, size) if isinstance(size, (int, np.integer)) else tuple(size)
            prep = prep.with_size(h, w)
        return prep(images)

    def forward(self, pixel_values, *, attentions: bool = False, layers=None, truncate: bool = False, rows=None,
                hidden: bool = True, inputs: bool = True) -> ForwardOutput:
        """Run the model on preprocessed pixels (B, 3, H, W); see :func:`qkweights.forward.forward`.

        layers: 0-based block indices whose attention inputs, residual streams and (with
        ``attentions=True``) attention probabilities are kept; None keeps all. Uses as many
        threads as numpy's BLAS may (``threadpoolctl.threadpool_limits`` or
        OPENBLAS_NUM_THREADS set the number). truncate, rows: run only the blocks up to the
        deepest of ``layers``; keep only these query rows of the attentions; keep the residual
        streams, the attention inputs (see :func:`qkweights.forward.forward`).
        """
        return forward(self.weights, pixel_values, attentions=attentions, layers=layers, truncate=truncate, rows=rows,
                       hidden=hidden, inputs=inputs)


def vision_model(ck: Checkpoint, source: Source | None = None) -> VisionModel:
    """A :class:`VisionModel` from an opened checkpoint.

    The attention logits are q·k/√K plus the spec's ``logit_terms`` that the forward pass
    implements (:data:`FORWARD_LOGIT_TERMS`); a family with any other term is refused.
    """
    if ck.spec.modality != "vision":
        name = source.model_id if source is not None else ck.spec.name
        raise InputError(f"{name} is a {ck.spec.modality} model: weights-only analysis (profile) is available, not the forward pass")
    missing = [t for t in ck.spec.logit_terms if t not in FORWARD_LOGIT_TERMS]
    if missing:
        raise SpecError(f"{ck.spec.name}: the forward pass does not add {', '.join(missing)} to the attention logits; only the weight profile is available for this family")
    if ("relative position bias" in ck.spec.logit_terms) != ("relative_position_bias" in ck.spec.attention):
        raise SpecError(f"{ck.spec.path.name}: [attention] relative_position_bias and logit_terms \"relative position bias\" go together (the forward pass adds the term, the profile reports it); add the missing one")
    prep, origin = preprocessing_for(ck)
    notes = checkpoint_notes(ck)
    if "defaults" in origin:
        notes.append(f"no preprocessing config beside the weights: images are preprocessed with {origin}; "
                     f"add the model's preprocessing config if it was trained otherwise")
    return VisionModel(ck, source, vit_weights(ck), prep, origin, tuple(notes))


def load_model(model: str, **options) -> VisionModel:
    """Open ``model`` (Hub id, folder, .safetensors or PyTorch file) and load it for the forward pass.

    ``options``: ``revision``, ``family``, ``part``, ``allow_pickle`` (see :func:`qkweights.load.open_model`).
    """
    from qkweights.load import open_model

    source, ck = open_model(model, **options)
    vm = vision_model(ck, source)
    ref = ModelRef.of(model, **{**options, "revision": source.commit or options.get("revision")})
    vm = dataclasses.replace(vm, ref=ref)
    remember(ref, vm)  # workers forked from this process need not open it again
    return vm
