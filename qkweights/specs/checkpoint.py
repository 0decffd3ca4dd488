"""A checkpoint read through its family's spec: weights by *role*, never by name.

:func:`open_checkpoint` detects the family of a checkpoint (config ``model_type``/``architecture`` and
signature tensors, :mod:`qkweights.specs.detect`), resolves the dimensions (:mod:`qkweights.specs.dims`),
and returns a :class:`Checkpoint` through which every other module reads weights by role
(:meth:`Checkpoint.qk`, :meth:`~Checkpoint.value`, :meth:`~Checkpoint.norm`,
:meth:`~Checkpoint.patch_embedding`, …). The specs package is the only one that gives TOML meaning.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from qkweights.errors import CheckpointError, SpecError
from qkweights.specs.detect import detect_family
from qkweights.specs.dims import resolve_dims
from qkweights.specs.registry import load_specs
from qkweights.specs.resolvers import get_dotted
from qkweights.specs.schema import ModuleRef, Spec, fill


@dataclass(frozen=True)
class QK:
    """Query/key weights of one layer, per head, in float64.

    ``wq``, ``wk``: (H, K, D); ``bq``, ``bk``: (H, K) (zeros where the checkpoint has no bias).
    """

    wq: np.ndarray
    wk: np.ndarray
    bq: np.ndarray
    bk: np.ndarray


@dataclass(frozen=True)
class OV:
    """Value and output weights of one layer, per head, in float64.

    ``wo``: (H, D, K) head h's columns h·K … (h+1)·K−1 of the output projection (out, in);
    ``wv``: (H, K, D) head h's rows of the value projection; ``bv``: (H, K); ``bo``: (D,)
    (zeros where the checkpoint has no bias).
    """

    wo: np.ndarray
    wv: np.ndarray
    bv: np.ndarray
    bo: np.ndarray


@dataclass(frozen=True)
class LayerNormWeights:
    """The pre-attention LayerNorm of one layer, float64: ``x̃ = γ ⊙ n + β``.

    ``gamma``, ``beta``: (D,); ``has_bias``: whether the checkpoint stores β (an RMSNorm-style
    norm without bias reads β = 0).
    """

    gamma: np.ndarray
    beta: np.ndarray
    has_bias: bool


# The section of each LayerNorm role (:meth:`Checkpoint.norm`).
NORM_ROLES = {
    "norm1": "block",
    "norm2": "block",
    "pre_norm": "embeddings",
    "final_norm": "embeddings",
    "post_norm": "embeddings",
}


class Checkpoint:
    """A checkpoint read through its family's spec: weights by role, dims resolved.

    Roles: :meth:`qk` (per-head q/k and biases), :meth:`value`, :meth:`out`, :meth:`ov`
    (per-head value/output), :meth:`mlp`, :meth:`norm` / :meth:`norm1` (LayerNorms),
    :meth:`layer_scale`, :meth:`relative_position_tables`, :meth:`patch_embedding`,
    :meth:`special_tokens`, :meth:`position_embedding`. Shapes are checked against the dims;
    a mismatch is a one-line CheckpointError.
    """

    def __init__(self, spec: Spec, store, config: dict, configs: dict[str, dict], prefix: str):
        self.spec, self.store, self.config, self.configs, self.prefix = spec, store, config, configs, prefix
        self.dims, self.origins = resolve_dims(spec, store, config, configs, prefix)  # origins: where each came from

    # names -----------------------------------------------------------------

    def name(self, template: str, i: int | None = None) -> str:
        """The full tensor name of ``template`` for layer ``i``."""
        return self.prefix + fill(template, i)

    def has(self, template: str | None, i: int | None = None) -> bool:
        return template is not None and self.name(template, i) in self.store

    def tensor(self, template: str, i: int | None = None) -> np.ndarray:
        return self.store.get(self.name(template, i))

    def _ref(self, section: str, role: str):
        table = getattr(self.spec, section)
        if not any(f.name == role for f in dataclasses.fields(table)):
            raise SpecError(f"{self.spec.file}: [{section}] has no role {role!r}")
        return getattr(table, role)

    def module(self, section: str, role: str, i: int | None = None) -> tuple[np.ndarray, np.ndarray | None]:
        """(weight, bias or None) of the module the spec names ``role`` in ``section``."""
        ref = self._ref(section, role)
        if ref is None:
            raise SpecError(f"{self.spec.file}: [{section}] has no {role!r}")
        w, b = ref.names(i)
        bias = self.store.get(self.prefix + b) if b and self.prefix + b in self.store else None
        return self.store.get(self.prefix + w), bias

    def has_role(self, section: str, role: str, i: int | None = None) -> bool:
        """Whether the spec names ``role`` and its weight (a module's) or the tensor itself is in the checkpoint."""
        ref = self._ref(section, role)
        if isinstance(ref, ModuleRef):
            return self.prefix + ref.names(i)[0] in self.store
        return isinstance(ref, str) and self.has(ref, i)

    def attention_names(self, i: int) -> list[str]:
        """The tensor names read by :meth:`qk` for layer ``i`` (present ones)."""
        att = self.spec.attention
        names = []
        for ref in (att.qkv,) if att.qkv else (att.q, att.k):
            names += [self.prefix + n for n in ref.names(i) if n]
        names += [self.name(t, i) for t in (att.q_bias, att.k_bias) if t]
        return [n for n in names if n in self.store]

    def misfit(self, what: str, shape, expected, key: str = "hidden") -> CheckpointError:
        """The error for ``what`` of ``shape`` where dimension ``key`` (hidden: the width, heads: the head count)
        makes ``expected``, naming where that dimension came from and what to fix."""
        origin, noun = self.origins[key], {"hidden": "the width", "heads": "the head count"}[key]
        return CheckpointError(
            f"{self.spec.label}: {what} has shape {shape}, expected {expected} from {noun} "
            f"{getattr(self.dims, key)} ({origin.text}); {origin.fix} or choose another family=NAME"
        )

    def _expect(self, a: np.ndarray, shape: tuple[int, ...], what: str) -> np.ndarray:
        if a.shape != shape:
            raise self.misfit(what, a.shape, shape)
        return a

    def linear(
        self, section: str, role: str, i: int | None, rows: int | None, cols: int
    ) -> tuple[np.ndarray, np.ndarray]:
        """(weight (out, in), bias (out,)) of a linear module, shape-checked (rows None: any), zero bias when absent."""
        w, b = self.module(section, role, i)
        where = role if i is None else f"layer {i} {role}"
        w = self._expect(w, (w.shape[0] if rows is None else rows, cols), f"{where} weight")
        b = np.zeros(w.shape[0]) if b is None else self._expect(b, (w.shape[0],), f"{where} bias")
        return w, b

    # attention ---------------------------------------------------------------

    def _projections(self, i: int, roles: str) -> list[tuple[np.ndarray, np.ndarray]]:
        """(weight (D, D) stored (out, in), bias (D,)) of layer ``i``'s projection for each of ``roles`` ("qk", "v").

        Separate ``q``/``k``/``v`` modules, or their rows of the fused ``qkv`` (3D, D), rows [q | k | v];
        a spec's ``q_bias`` / ``k_bias`` / ``v_bias`` tensor overrides the module's bias (BEiT-style
        separate biases); no bias reads as zeros. Shapes are checked against the width.
        """
        att, d = self.spec.attention, self.dims.hidden
        if att.qkv is not None:
            w, b = self.linear("attention", "qkv", i, 3 * d, d)
            rows = [slice(j * d, (j + 1) * d) for j in map("qkv".index, roles)]
            pairs = [(w[r], b[r]) for r in rows]
        else:
            pairs = [self.linear("attention", role, i, d, d) for role in roles]
        out = []
        for role, (w, b) in zip(roles, pairs):
            override = getattr(att, f"{role}_bias")
            if self.has(override, i):
                b = self._expect(self.tensor(override, i), (d,), f"layer {i} {role}_bias")
            out.append((w, b))
        return out

    def qk(self, i: int) -> QK:
        """Per-head query and key weights and biases of layer ``i`` (float64).

        Separate projections are stored (out, in) = (D, D), head h in rows
        h·K … (h+1)·K−1; fused ones are (3D, D) with rows [q | k | v]. A spec's
        ``q_bias`` / ``k_bias`` tensor overrides the module's bias.
        """
        d, h, k = self.dims.hidden, self.dims.heads, self.dims.head_dim
        (wq, bq), (wk, bk) = self._projections(i, "qk")
        return QK(
            wq=np.asarray(wq, np.float64).reshape(h, k, d),  # (H, K, D)
            wk=np.asarray(wk, np.float64).reshape(h, k, d),
            bq=np.asarray(bq, np.float64).reshape(h, k),  # (H, K)
            bk=np.asarray(bk, np.float64).reshape(h, k),
        )

    def value(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        """W_v (D, D) stored (out, in) and b_v (D,) of layer ``i``, as :meth:`qk` reads q and k.

        A separate ``v`` module, or rows 2D…3D of the fused ``qkv``; a spec's ``v_bias``
        tensor overrides the bias (BEiT-style separate biases); no bias reads as zeros.
        """
        return self._projections(i, "v")[0]

    def out(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        """W_o (D, D) stored (out, in) and b_o (D,) of layer ``i``'s attention output projection."""
        d = self.dims.hidden
        return self.linear("attention", "out", i, d, d)

    def ov_unavailable(self, i: int) -> str | None:
        """Why :meth:`ov` cannot give layer ``i``'s per-head value/output weights, or None when it can."""
        att, d = self.spec.attention, self.dims.hidden
        v_role = "qkv" if att.qkv is not None else "v"
        if getattr(att, v_role) is None:
            return f"the spec names no value projection ([attention] v or qkv in {self.spec.file})"
        if att.out is None:
            return f"the spec names no attention output projection ([attention] out in {self.spec.file})"
        for role, shape in ((v_role, (3 * d, d) if v_role == "qkv" else (d, d)), ("out", (d, d))):
            name = self.prefix + getattr(att, role).names(i)[0]
            if name not in self.store:
                return f"the checkpoint lacks {name}"
            got = self.store.shape(name)
            if tuple(got) != shape:
                return f"layer {i} {role} weight has shape {tuple(got)}, not {shape}: the spec cannot give it per head"
        return None

    def ov(self, i: int) -> OV:
        """Per-head value and output weights and biases of layer ``i`` (float64), read as the forward pass reads them.

        The value rows are those of :meth:`value`; ``out`` is stored (out, in) = (D, D),
        head h's input columns h·K … (h+1)·K−1. Raises CheckpointError when
        :meth:`ov_unavailable` gives a reason.
        """
        why = self.ov_unavailable(i)
        if why is not None:
            raise CheckpointError(f"{self.spec.label}: no value-output circuit for layer {i}: {why}")
        d, h, k = self.dims.hidden, self.dims.heads, self.dims.head_dim
        wv, bv = self.value(i)
        wo, bo = self.out(i)
        return OV(
            # (H, D, K) as a view of the contiguous (H, K, D) W_o,hᵀ: the layout the QR of the SVD reads fastest
            wo=np.ascontiguousarray(np.asarray(wo, np.float64).reshape(d, h, k).transpose(1, 2, 0)).transpose(0, 2, 1),
            wv=np.asarray(wv, np.float64).reshape(h, k, d),  # (H, K, D)
            bv=np.asarray(bv, np.float64).reshape(h, k),  # (H, K)
            bo=np.asarray(bo, np.float64),  # (D,)
        )

    def relative_position_tables(self, i: int) -> list[tuple[str, np.ndarray]]:
        """(name, table) of every ``[attention] relative_position_bias`` table the checkpoint holds for layer ``i``."""
        return [
            (self.name(t, i), self.tensor(t, i)) for t in self.spec.attention.relative_position_bias if self.has(t, i)
        ]

    def relative_position_indices(self, i: int) -> list[tuple[str, np.ndarray]]:
        """(name, index) of every stored ``[attention] relative_position_index`` buffer of layer ``i``."""
        return [
            (self.name(t, i), self.tensor(t, i)) for t in self.spec.attention.relative_position_index if self.has(t, i)
        ]

    # block -------------------------------------------------------------------

    def mlp(self, i: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """(W_1 (F, D), b_1, W_2 (D, F), b_2) of layer ``i``'s MLP, stored (out, in); SwiGLU (``dims.swiglu``):
        W_1 (2F, D) with the gate rows first and W_2 (D, F)."""
        d = self.dims.hidden
        fc1, fc2 = ("swiglu_in", "swiglu_out") if self.dims.swiglu else ("fc1", "fc2")
        w1, b1 = self.linear("block", fc1, i, None, d)
        w2, b2 = self.linear("block", fc2, i, d, w1.shape[0] // 2 if self.dims.swiglu else w1.shape[0])
        return w1, b1, w2, b2

    def norm(self, role: str, i: int | None = None) -> LayerNormWeights | None:
        """The LayerNorm the spec names ``role`` (``norm1``, ``norm2`` of layer ``i``; ``pre_norm``, ``final_norm``,
        ``post_norm``), float64, shape-checked; None when the spec or the checkpoint has none."""
        section = NORM_ROLES[role]
        if not self.has_role(section, role, i):
            return None
        w, b = self.module(section, role, i)
        d = self.dims.hidden
        where = role if i is None else f"layer {i} {role}"
        w = self._expect(w, (d,), f"{where} weight")
        b = None if b is None else self._expect(b, (d,), f"{where} bias")
        return LayerNormWeights(
            np.asarray(w, np.float64), np.zeros(d) if b is None else np.asarray(b, np.float64), b is not None
        )

    def norm1(self, i: int) -> LayerNormWeights | None:
        """The LayerNorm feeding layer ``i``'s attention (``[block] norm1``), or None when the spec or the checkpoint
        has none.

        Post-norm families (BERT: the LayerNorm sits after the attention) and weights-only
        specs without a ``[block]`` table have none.
        """
        return self.norm("norm1", i)

    def layer_scale(self, role: str, i: int) -> np.ndarray | None:
        """Layer ``i``'s layer-scale vector (D,) ``scale1`` (attention branch) or ``scale2`` (MLP), or None."""
        template = self._ref("block", role)
        if not self.has(template, i):
            return None
        return self._expect(self.tensor(template, i), (self.dims.hidden,), f"layer {i} {role}")

    # embeddings --------------------------------------------------------------

    def patch_embedding(self) -> tuple[np.ndarray, np.ndarray | None]:
        """The patch-embedding convolution: weight (D, C, P, P) and bias (D,) or None."""
        w, b = self.module("embeddings", "patch")
        d = self.dims.hidden
        if w.ndim != 4 or w.shape[0] != d or w.shape[2] != w.shape[3]:
            raise CheckpointError(
                f"{self.spec.label}: patch embedding weight has shape {w.shape}, expected ({d}, channels, P, P)"
            )
        return w, None if b is None else self._expect(b, (d,), "patch embedding bias")

    def patch_size_stored(self) -> int | None:
        """The side of the patch embedding's square kernel, from the header only (None: not a square conv)."""
        ref = self.spec.embeddings.patch
        if ref is None:
            return None
        name = self.prefix + ref.names()[0]
        shape = self.store.shape(name) if name in self.store else ()
        return int(shape[2]) if len(shape) == 4 and shape[2] == shape[3] else None

    def special_tokens(self) -> dict[str, np.ndarray]:
        """Each non-patch token of ``[embeddings] tokens`` the checkpoint holds: kind → (n, D) (cls, dist: n = 1)."""
        emb, d = self.spec.embeddings, self.dims.hidden
        return {
            kind: self.tensor(getattr(emb, kind)).reshape(-1, d)  # (n, D)
            for kind in emb.tokens
            if kind != "patches" and self.has(getattr(emb, kind))
        }

    def position_embedding(self) -> np.ndarray | None:
        """The absolute position table (rows, D), or None when the spec or the checkpoint has none."""
        emb = self.spec.embeddings
        return self.tensor(emb.position).reshape(-1, self.dims.hidden) if self.has(emb.position) else None

    # other -------------------------------------------------------------------

    def preprocess_config(self) -> tuple[dict | None, str]:
        """The preprocessing config of ``[preprocess]`` (``key`` of ``config_file``) and its origin text, or
        (None, what is missing) when the checkpoint has none."""
        pre = self.spec.preprocess
        missing = pre.key or pre.config_file or "preprocessing config"
        if pre.config_file is None or pre.config_file not in self.configs:
            return None, missing
        cfg = self.configs[pre.config_file]
        if pre.key:
            try:
                cfg = get_dotted(cfg, pre.key)
            except KeyError:
                return None, missing
        if not isinstance(cfg, dict) or not cfg:
            return None, missing
        return cfg, f"{pre.config_file} {pre.key}" if pre.key else pre.config_file

    def dtype(self) -> str:
        """The stored dtype of the attention weights ("F32", "BF16", …)."""
        return self.store.dtype(self.attention_names(0)[0])


def read_configs(files: dict[str, Path]) -> dict[str, dict]:
    """Parse the JSON config files of a checkpoint; a broken one is a CheckpointError."""
    configs = {}
    for name, path in files.items():
        try:
            configs[name] = json.loads(Path(path).read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise CheckpointError(f"{name}: not readable JSON ({e}); re-download it or fix the file") from None
    return configs


def open_checkpoint(
    store,
    config_files: dict[str, Path],
    *,
    family: str | None = None,
    specs: dict[str, Spec] | None = None,
    spec_dir=None,
) -> Checkpoint:
    """Detect the family of ``store`` (with its config files) and bind the spec.

    ``specs``: the families to choose from (default: :func:`load_specs` with ``spec_dir``).
    """
    specs = specs or load_specs(spec_dir=spec_dir)
    configs = read_configs(config_files)
    spec, prefix = detect_family(store, configs, specs, family)
    return Checkpoint(spec, store, configs.get(spec.config_file or "", {}), configs, prefix)
