"""A vision checkpoint as a runnable model: spec roles → :class:`~qkweights.vision.forward.ViTWeights` → forward pass.

Everything here reads weights by the *role* a spec gives them (``model_specs/*.toml``:
``[attention]``, ``[block]``, ``[embeddings]``, ``[dims]``, ``[preprocess]``), never by
tensor or family name, so a new family needs a spec file, not code. Query and key
weights come from :meth:`Checkpoint.qk`, the same accessor the weight profile uses, so
the forward pass and the SVD see identical ``W_q``, ``W_k``.
"""

from __future__ import annotations

import dataclasses
import math
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from qkweights.checkpoints.source import Source
from qkweights.errors import CheckpointError, InputError, SpecError
from qkweights.specs.checkpoint import Checkpoint
from qkweights.specs.dims import Dims
from qkweights.specs.schema import Spec
from qkweights.vision.forward import (
    BlockWeights,
    EmbeddingWeights,
    ForwardOutput,
    Keep,
    Norm,
    ViTWeights,
    forward,
)
from qkweights.vision.gemm import Linear, gemm_route
from qkweights.vision.positions import relative_position_index
from qkweights.vision.preprocess import Preprocess

# Config activation names (transformers' ACT2FN keys, open_clip's quick_gelu) → qkweights.specs.schema.ACTIVATIONS.
ACTIVATION_NAMES = {
    "gelu": "gelu",
    "quick_gelu": "quick_gelu",
    "gelu_new": "gelu_tanh",
    "gelu_pytorch_tanh": "gelu_tanh",
    "gelu_fast": "gelu_tanh",
    "relu": "relu",
}


def _f32(a: np.ndarray | None) -> np.ndarray | None:
    return None if a is None else np.ascontiguousarray(a, dtype=np.float32)


def _input_major(w: np.ndarray, rows: int = 64) -> np.ndarray:
    """A linear layer's out-major weight (O, I) as a C-contiguous float32 (I, O), transposed ``rows`` output rows at a
    time: a block stays in cache while it is scattered, 2.5× faster than one strided copy of the whole (measured,
    3072 × 768)."""
    out = np.empty(w.shape[::-1], np.float32)  # (I, O)
    for r in range(0, w.shape[0], rows):
        out[:, r : r + rows] = w[r : r + rows].T
    return out


def _norm(ck: Checkpoint, role: str, i: int | None = None) -> Norm | None:
    """The LayerNorm the spec names ``role`` as float32, or None when the spec or the checkpoint lacks it."""
    n = ck.norm(role, i)
    return None if n is None else Norm(_f32(n.gamma), _f32(n.beta))


def _activation(ck: Checkpoint) -> str:
    if ck.dims.swiglu:
        return "swiglu"
    act = ck.dims.act
    if act not in ACTIVATION_NAMES:
        raise SpecError(
            f"{ck.spec.label}: activation {act!r} is not supported by the forward pass (supported: "
            f"{', '.join(ACTIVATION_NAMES)}); fix hidden_act in the config or [dims] act in {ck.spec.file}"
        )
    return ACTIVATION_NAMES[act]


def relative_position_table(ck: Checkpoint, i: int, window: tuple[int, int]) -> np.ndarray | None:
    """The relative position bias table of block ``i``, ((2Wh−1)(2Ww−1) + 3, H) float32, or None.

    The sum of the tables named by the spec's ``[attention] relative_position_bias`` that the
    checkpoint holds for block ``i`` (its own and a shared one: their biases add, and the gather
    and the resize are linear). ``window``: the stored patch grid (Wh, Ww) the tables were learnt
    for. Stored ``relative_position_index`` buffers must equal :func:`relative_position_index`.
    """
    att = ck.spec.attention
    if not att.relative_position_bias:
        return None
    heads, (wh, ww) = ck.dims.heads, window
    rows = (2 * wh - 1) * (2 * ww - 1) + 3
    tables = ck.relative_position_tables(i)
    if not tables:
        raise CheckpointError(
            f"{ck.spec.label}: layer {i} has none of the relative position tables "
            f"{', '.join(att.relative_position_bias)}; the checkpoint is incomplete or of another family (try "
            "family=NAME)"
        )
    total = np.zeros((rows, heads), np.float64)
    for name, table in tables:
        if table.shape != (rows, heads):
            origin = ck.origins["heads"]
            raise CheckpointError(
                f"{ck.spec.label}: relative position table {name} has shape {table.shape}, expected {(rows, heads)}: "
                f"{rows} rows for a {wh}×{ww} patch grid, {heads} heads ({origin.text}); {origin.fix} or choose "
                "another family=NAME"
            )
        total += table
    expected = relative_position_index(window)
    for name, index in ck.relative_position_indices(i):
        if not np.array_equal(index, expected):
            raise CheckpointError(
                f"{ck.spec.label}: {name} differs from BEiT's relative position index for a {wh}×{ww} patch "
                "grid; the checkpoint was built for another grid or indexes its table differently"
            )
    return _f32(total)


def block_weights(ck: Checkpoint, i: int, window: tuple[int, int], route: str | None = None) -> BlockWeights:
    """Block ``i`` in float32, its linear layers input-major; q columns and bias pre-scaled by 1/√K.

    window: the stored patch grid, for the relative position table (see :func:`relative_position_table`).
    route: how the linear layers multiply (:class:`~qkweights.vision.gemm.Linear`; default: this machine's).
    """
    d, k = ck.dims.hidden, ck.dims.head_dim
    qk = ck.qk(i)  # (H, K, D) float64
    wv, bv = ck.value(i)
    scale = 1 / math.sqrt(k)
    wqkv = np.concatenate([qk.wq.reshape(d, d) * scale, qk.wk.reshape(d, d), wv])  # (3D, D) out-major
    bqkv = np.concatenate([qk.bq.reshape(d) * scale, qk.bk.reshape(d), bv])  # (3D,)
    wo, bo = ck.out(i)
    w1, b1, w2, b2 = ck.mlp(i)  # (F, D) / SwiGLU (2F, D), (D, F)
    norm1, norm2 = _norm(ck, "norm1", i), _norm(ck, "norm2", i)
    if norm1 is None or norm2 is None:
        names = ", ".join(
            ck.name(ref.weight.removesuffix(".weight"), i) for ref in (ck.spec.block.norm1, ck.spec.block.norm2)
        )
        raise CheckpointError(
            f"{ck.spec.label}: layer {i} lacks its norm1/norm2 LayerNorm ({names}); the checkpoint is "
            "incomplete or of another family"
        )
    return BlockWeights(
        norm1=norm1,
        qkv=Linear(_input_major(wqkv), bqkv, route),
        out=Linear(_input_major(wo), bo, route),
        scale1=_f32(ck.layer_scale("scale1", i)),
        norm2=norm2,
        fc1=Linear(_input_major(w1), b1, route),
        fc2=Linear(_input_major(w2), b2, route),
        scale2=_f32(ck.layer_scale("scale2", i)),
        rel_pos=relative_position_table(ck, i, window),
    )


def patch_size_used(ck: Checkpoint) -> int | None:
    """The patch size the forward pass uses: the side of the patch embedding's kernel (read from the header only)."""
    return ck.patch_size_stored()


def checkpoint_notes(ck: Checkpoint) -> list[str]:
    """What a user should know about how the checkpoint is read: the config and the tensors disagreeing."""
    used, said = patch_size_used(ck), ck.dims.patch_size
    if used is not None and said is not None and used != said:
        where = ck.spec.config_file or "config"
        return [
            f"{where} says patch_size {said}, but the patch embedding's kernel is {used}×{used}; the forward "
            f"pass uses {used}"
        ]
    return []


def _stored_grid(ck: Checkpoint, n: int) -> tuple[int, int]:
    """The patch grid of ``n`` position rows: the config's image size if it fits, else a square."""
    p, image = ck.dims.patch_size, ck.dims.image_size
    if image is not None and p and (image[0] // p) * (image[1] // p) == n:
        return image[0] // p, image[1] // p
    side = math.isqrt(n)
    if side * side != n:
        raise CheckpointError(
            f"{ck.spec.label}: the position table's {n} patch rows form no square grid and do not match the "
            f"image size {image} / patch {p}; set image_size in the config"
        )
    return side, side


def _position_cover(ck: Checkpoint, rows: int, n_special: int, listed: tuple[str, ...], p: int) -> tuple[str, ...]:
    """The token kinds a position table of ``rows`` rows covers, as ``[embeddings] no_embed_class`` says.

    ``listed``: the spec's position_tokens present in the checkpoint, holding ``n_special``
    non-patch tokens. false: ``listed``; true: the patches only (timm's no_embed_class);
    "rows": the patches only when the table has exactly one row per patch of the stored grid,
    else ``listed`` (when the image size fits neither, ``listed`` unless only its full row count
    forms a square grid).
    """
    mode = ck.spec.embeddings.no_embed_class
    if n_special == 0 or mode is True:
        return ("patches",)
    if mode is False:
        return listed
    image = ck.dims.image_size
    n_stored = (image[0] // p) * (image[1] // p) if image else None
    if rows == n_stored:
        return ("patches",)
    if rows == (n_stored or 0) + n_special or _is_square(rows - n_special) or not _is_square(rows):
        return listed
    return ("patches",)


def _is_square(n: int) -> bool:
    return n > 0 and math.isqrt(n) ** 2 == n


def embedding_weights(ck: Checkpoint) -> EmbeddingWeights:
    """Patch conv, special tokens and positions, read through the checkpoint's embedding roles."""
    emb = ck.spec.embeddings
    special = {kind: _f32(v) for kind, v in ck.special_tokens().items()}  # kind → (n, D)
    tokens = tuple(t for t in emb.tokens if t == "patches" or t in special)
    w, b = ck.patch_embedding()  # (D, C, P, P), (D,) or None
    d, p = w.shape[0], w.shape[2]
    position, covered = _f32(ck.position_embedding()), ()  # (rows, D)
    if position is not None:
        listed = tuple(t for t in emb.position_tokens if t == "patches" or t in special)
        covered = _position_cover(
            ck, position.shape[0], sum(len(special[t]) for t in listed if t != "patches"), listed, p
        )
        grid = _stored_grid(ck, position.shape[0] - sum(len(special[t]) for t in covered if t != "patches"))
    else:
        image = ck.dims.image_size or (p, p)
        grid = (image[0] // p, image[1] // p)
    return EmbeddingWeights(
        patch=_f32(w.reshape(d, -1).T),  # (C·P·P, D)
        patch_bias=_f32(b),
        patch_size=p,
        tokens=tokens,
        special=special,
        position=position,
        position_tokens=covered,
        grid=grid,
        interpolation=ck.dims.interpolation,
        pre_norm=_norm(ck, "pre_norm"),
    )


def vit_weights(ck: Checkpoint, route: str | None = None) -> ViTWeights:
    """All weights of a vision checkpoint in float32, read once, the layers on two threads (reading, widening and
    transposing release the GIL: a ViT-B loads in 0.27–0.36 s instead of 0.37–0.74 s here). route: how the linear
    layers multiply (see :func:`block_weights`)."""
    dims = ck.dims
    emb = embedding_weights(ck)
    if ck.spec.attention.relative_position_bias and emb.tokens != ("cls", "patches"):
        raise CheckpointError(
            f"{ck.spec.label}: a relative position bias needs the tokens [cls, patches] (its 3 extra entries "
            f"are CLS biases), the checkpoint gives {list(emb.tokens)}"
        )
    route = route or gemm_route()  # decided (and checked) once, before the threads
    with ThreadPoolExecutor(2) as pool:
        blocks = pool.map(lambda i: block_weights(ck, i, emb.grid, route), range(dims.layers))
    return ViTWeights(
        embeddings=emb,
        blocks=tuple(blocks),
        final_norm=_norm(ck, "final_norm"),
        post_norm=_norm(ck, "post_norm"),
        heads=dims.heads,
        head_dim=dims.head_dim,
        eps=dims.eps,
        act=_activation(ck),
    )


# The defaults of each [preprocess] format without its config: what it calls them, and the config they stand for.
_DEFAULT_PREPROCESS = {
    "hf": (
        "ViT processor defaults",
        lambda image: Preprocess.from_hf(
            {"image_processor_type": "ViTImageProcessor", "size": {"height": image[0], "width": image[1]}}
        ),
    ),
    "timm": ("timm defaults", lambda image: Preprocess.from_timm({"input_size": [3, *image]})),
    "open_clip": ("open_clip defaults", lambda image: Preprocess.from_open_clip({}, image)),
}
_FROM_CONFIG = {
    "hf": lambda cfg, image: Preprocess.from_hf(cfg),
    "timm": lambda cfg, image: Preprocess.from_timm(cfg),
    "open_clip": lambda cfg, image: Preprocess.from_open_clip(cfg, image),
}


def preprocessing_for(ck: Checkpoint) -> tuple[Preprocess, str]:
    """The checkpoint's own preprocessing per the spec's ``[preprocess]`` (format, config file, key), and where
    it came from. Without that config, the format's defaults at the model's image size: transformers' ViT
    processor (resize, mean/std 0.5), timm's ``resolve_data_config`` (crop_pct 0.875, ImageNet mean/std),
    open_clip's (OpenAI mean/std).
    """
    fmt, image = ck.spec.preprocess.format, ck.dims.image_size
    cfg, origin = ck.preprocess_config()
    if cfg is not None:
        return _FROM_CONFIG[fmt](cfg, image), origin
    what, default = _DEFAULT_PREPROCESS[fmt]
    return default(image), f"{what} at {image[0]}×{image[1]} (no {origin})"


@dataclass(frozen=True)
class ModelRef:
    """How a worker opens the model: the MODEL argument (absolute path or Hub id), the load options and the spec.

    Workers open the model by this reference, so MODEL must be reachable from every
    worker by the same path or Hub id (shared filesystem, or each worker's own HF cache).
    ``spec`` is the family's spec as the client resolved it (``spec_dir``,
    ``QKWEIGHTS_SPEC_PATH``, the shipped files): a worker binds exactly it, whatever its own
    environment and spec folders say.
    """

    model: str
    revision: str | None = None
    family: str | None = None
    part: str | None = None
    allow_pickle: bool = False
    spec: Spec | None = field(default=None, hash=False, repr=False)  # compared, not hashed (a Spec holds lists)

    @classmethod
    def of(cls, model: str, **options) -> ModelRef:
        """A reference to MODEL as given on the command line; local paths are made absolute."""
        path = Path(model).expanduser()
        text = str(path.resolve()) if path.exists() else str(model)
        return cls(text, **{k: v for k, v in options.items() if v is not None})

    def open(self):
        """The :class:`~qkweights.vision.model.VisionModel`, loaded once per process."""
        model = _MODELS.get(self)
        if model is None:
            model = _MODELS[self] = open_vision_model(
                self.model,
                revision=self.revision,
                family=self.family,
                part=self.part,
                allow_pickle=self.allow_pickle,
                spec=self.spec,
            )
        return model


_MODELS: dict[ModelRef, VisionModel] = {}  # this process's open models


def remember(ref: ModelRef, model) -> None:
    """Make ``model`` the open model of ``ref`` in this process (and in workers forked from it)."""
    _MODELS[ref] = model


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

    def forward(
        self,
        pixel_values,
        *,
        attentions: bool = False,
        layers=None,
        truncate: bool = False,
        rows=None,
        hidden: bool = True,
        inputs: bool = True,
    ) -> ForwardOutput:
        """Run the model on preprocessed pixels (B, 3, H, W); see :func:`qkweights.vision.forward.forward`.

        layers: 0-based block indices whose attention inputs, residual streams and (with
        ``attentions=True``) attention probabilities are kept; None keeps all. Runs as many
        images side by side as numpy's BLAS may use threads (``threadpoolctl.threadpool_limits``
        or OPENBLAS_NUM_THREADS set the number), each alone with one BLAS thread, so that an
        image's outputs do not depend on its batch or the thread count. truncate, rows: run only the blocks up to the
        deepest of ``layers`` (no ``last_hidden_state`` then); keep only these query rows of the attentions; hidden,
        inputs: keep the residual streams, the attention inputs (see :func:`qkweights.vision.forward.forward`).
        """
        keep = Keep(attentions=attentions, layers=layers, truncate=truncate, hidden=hidden, inputs=inputs)
        return forward(self.weights, pixel_values, keep, rows=rows)


def vision_model(ck: Checkpoint, source: Source | None = None) -> VisionModel:
    """A :class:`VisionModel` from an opened checkpoint.

    The attention logits are q·k/√K plus the relative position bias when the spec names one
    (``[attention] relative_position_bias``, the only logit term a spec can declare).
    """
    if not ck.spec.is_vision:
        name = source.model_id if source is not None else ck.spec.name
        raise InputError(
            f"{name} is a {ck.spec.modality} model: weights-only analysis (profile) is available, not the forward pass"
        )
    prep, origin = preprocessing_for(ck)
    notes = checkpoint_notes(ck)
    if "defaults" in origin:
        notes.append(
            f"no preprocessing config beside the weights: images are preprocessed with {origin}; "
            f"add the model's preprocessing config if it was trained otherwise"
        )
    return VisionModel(ck, source, vit_weights(ck), prep, origin, tuple(notes))


def _part_read(ck: Checkpoint) -> str | None:
    """The network read from a PyTorch training checkpoint holding several (chosen by the specs' default_part)."""
    from qkweights.checkpoints.pytorch.store import TorchStore

    return ck.store.metadata.get("part") if isinstance(ck.store, TorchStore) else None


def open_vision_model(model: str, *, spec: Spec | None = None, **options) -> VisionModel:
    """Open ``model`` (Hub id, folder, .safetensors or PyTorch file) and load it for the forward pass.

    ``options``: ``revision``, ``family``, ``part``, ``allow_pickle``, ``spec_dir`` (see
    :func:`qkweights.specs.load.open_model`). ``spec``: bind this spec, resolved already (as a
    :class:`ModelRef` carries it), instead of resolving one from the spec folders.
    """
    from qkweights.specs.load import open_model

    if spec is not None:
        options = {**options, "family": spec.name, "specs": {spec.name: spec}, "spec_dir": None}
    source, ck = open_model(model, **options)
    vm = vision_model(ck, source)
    ref = ModelRef.of(
        model,
        revision=source.commit or options.get("revision"),
        family=options.get("family"),
        part=options.get("part") or _part_read(ck),
        allow_pickle=options.get("allow_pickle"),
        spec=ck.spec,
    )
    vm = dataclasses.replace(vm, ref=ref)
    remember(ref, vm)  # workers forked from this process need not open it again
    return vm
