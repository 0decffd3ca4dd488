"""Checkpoint families as data: ``model_specs/*.toml`` → per-head weights by role.

A spec names a family's tensors with ``{i}`` templates and says where the
dimensions come from. It is parsed once, when the specs load, into one frozen
dataclass per section (:class:`DetectSection`, :class:`DimsSection`,
:class:`AttentionSection`, :class:`BlockSection`, :class:`EmbeddingsSection`,
:class:`PreprocessSection`); an unknown key or a value of the wrong kind is a
one-line :class:`SpecError` naming the file, the section and the key. The schema
says which values are *module* references (``"path"`` = ``path.weight`` and
``path.bias``, or ``{weight = …, bias = …}``: :class:`ModuleRef`), which are
*tensor* templates, and which are dimension *resolvers*.

:func:`open_checkpoint` detects the family of a checkpoint (config
``model_type``/``architecture`` and signature tensors), resolves the dimensions,
and returns a :class:`Checkpoint` through which every other module reads weights
by *role* (:meth:`Checkpoint.qk`, :meth:`~Checkpoint.value`, :meth:`~Checkpoint.norm`,
:meth:`~Checkpoint.patch_embedding`, …), never by name. This is the only module
that gives TOML meaning; adding a family means adding a spec file, in
``model_specs/`` or in a user folder (``spec_dir=``, ``QKWEIGHTS_SPEC_PATH``).

Dimension resolvers (values in a spec's ``[dims]`` table), one small function each
(:data:`RESOLVERS`):

- ``"key.path"``: a (dotted) key of the config, below ``config_root``;
- a number or boolean, or ``{value = "text"}``: that literal;
- a list: the first alternative that resolves;
- ``{config = "key.path", root = false}``: a config key from the top of the file;
- ``{shape = "tensor {i}", axis = n}``: a dimension of a tensor (``{i}`` = 0);
- ``{count = "tensor {i}"}``: how many consecutive layers hold that tensor;
- ``{div = [a, b]}``: a // b of two resolvers; ``{mul = [a, b]}``: a · b;
- ``{relative_window = resolver}``: the side W of the square patch window whose BEiT-style
  relative position table has the resolved number of rows, (2W − 1)² + 3;
- ``{lookup = resolver, table = {key = value}}``: the value of the resolved key;
- ``{match = resolver, table = {substring = value}}``: the value of the longest
  key contained in the resolved string (e.g. timm's ``vit_base_…`` → 12 heads).
"""

from __future__ import annotations

import dataclasses
import difflib
import hashlib
import json
import math
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np

from qkweights.errors import CheckpointError, SpecError
from qkweights.vision.forward import INTERPOLATIONS, TOKEN_KINDS

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

SPEC_PATH_ENV = "QKWEIGHTS_SPEC_PATH"  # user spec folders, os.pathsep-separated
PREPROCESS_FORMATS = ("hf", "timm", "open_clip")
RELATIVE_POSITION_BIAS = "relative position bias"  # the logit term named by [attention] relative_position_bias
SEE = "see model_specs/README.md"


# ----------------------------------------------------------------------------- references


@dataclass(frozen=True)
class ModuleRef:
    """A module of a checkpoint: the templates of its weight and bias (None: the module has no bias).

    In TOML, ``"path"`` means ``path.weight`` and ``path.bias`` (a bias the checkpoint lacks
    reads as absent); ``{weight = "…", bias = "…"}`` names them (bias optional).
    """

    weight: str
    bias: str | None = None

    def names(self, i: int | None = None) -> tuple[str, str | None]:
        """(weight name, bias name or None) with ``{i}`` filled (left as a template when ``i`` is None)."""
        return _fill(self.weight, i), (_fill(self.bias, i) if self.bias else None)


def _fill(template: str, i: int | None) -> str:
    return template.format(i=i) if i is not None else template


# ----------------------------------------------------------------------------- resolvers

# What a resolver read, in _Resolver.read: (TENSORS, tensor name), (CONFIG, config key) or SPEC_VALUE (a literal or a
# table entry of the spec itself); the last entry is where a dimension's value came from (:class:`Origin`).
TENSORS, CONFIG = "tensors", "config"
SPEC_VALUE = ("spec", None)


def _r_value(ctx: _Resolver, r: dict):
    ctx.read.append(SPEC_VALUE)
    return r["value"]


def _r_config(ctx: _Resolver, r: dict):
    return ctx.config_value(r["config"], root=r.get("root", True))


def _r_shape(ctx: _Resolver, r: dict):
    name = ctx.prefix + r["shape"].format(i=0)
    if name not in ctx.store:
        raise KeyError(name)
    ctx.read.append((TENSORS, f"{name} shape[{r.get('axis', 0)}]"))
    return ctx.store.shape(name)[r.get("axis", 0)]


def _r_count(ctx: _Resolver, r: dict):
    n = 0
    while ctx.prefix + r["count"].format(i=n) in ctx.store:
        n += 1
    if n == 0:
        raise KeyError(r["count"])
    ctx.read.append((TENSORS, f"the number of layers holding {ctx.prefix + r['count']}"))
    return n


def _r_div(ctx: _Resolver, r: dict):
    a, b = (ctx(x) for x in r["div"])
    return a // b


def _r_mul(ctx: _Resolver, r: dict):
    a, b = (ctx(x) for x in r["mul"])
    return a * b


def _r_relative_window(ctx: _Resolver, r: dict):
    return relative_window(int(ctx(r["relative_window"])))


def _r_lookup(ctx: _Resolver, r: dict):
    key = str(ctx(r["lookup"]))
    if key not in r["table"]:
        raise KeyError(f"{key} (not among {', '.join(r['table'])})")
    ctx.read.append(SPEC_VALUE)  # the value is the spec's table entry
    return r["table"][key]


def _r_match(ctx: _Resolver, r: dict):
    value = str(ctx(r["match"])).lower()
    for key in sorted(r["table"], key=len, reverse=True):
        if key.lower() in value:
            ctx.read.append(SPEC_VALUE)  # the value is the spec's table entry
            return r["table"][key]
    raise KeyError(f"{value} (none of {', '.join(r['table'])})")


@dataclass(frozen=True)
class ResolverKind:
    """One resolver of the ``[dims]`` language: ``{head = argument, option = …}``.

    ``argument``: what the head's value must be ("literal", "text" (a config key or a tensor
    template), "resolver", "pair" of resolvers); ``options``: the other keys allowed, with
    their kind ("bool", "int", "table"); ``required``: options that must be given.
    """

    evaluate: Callable[[_Resolver, dict], Any]
    argument: str
    options: tuple[tuple[str, str], ...] = ()
    required: tuple[str, ...] = ()


RESOLVERS: dict[str, ResolverKind] = {
    "value": ResolverKind(_r_value, "literal"),
    "config": ResolverKind(_r_config, "text", (("root", "bool"),)),
    "shape": ResolverKind(_r_shape, "text", (("axis", "int"),)),
    "count": ResolverKind(_r_count, "text"),
    "div": ResolverKind(_r_div, "pair"),
    "mul": ResolverKind(_r_mul, "pair"),
    "relative_window": ResolverKind(_r_relative_window, "resolver"),
    "lookup": ResolverKind(_r_lookup, "resolver", (("table", "table"),), ("table",)),
    "match": ResolverKind(_r_match, "resolver", (("table", "table"),), ("table",)),
}

_OPTION_KINDS = {
    "bool": (lambda v: isinstance(v, bool), "true or false"),
    "int": (lambda v: isinstance(v, int) and not isinstance(v, bool), "an integer"),
    "table": (lambda v: isinstance(v, dict) and bool(v), "a table { key = value }"),
}


def _check_resolver(r, where: str) -> None:
    """Refuse a ``[dims]`` value that is not a resolver, naming where it is (SpecError)."""
    if isinstance(r, (bool, int, float, str)):
        return
    if isinstance(r, list):
        if not r:
            raise SpecError(f"{where}: an empty list of alternatives; give at least one resolver ({SEE})")
        for alt in r:
            _check_resolver(alt, where)
        return
    if not isinstance(r, dict):
        raise SpecError(f"{where}: {_show(r)} is not a resolver ({SEE})")
    heads = [k for k in r if k in RESOLVERS]
    if len(heads) != 1:
        found = ", ".join(r) or "nothing"
        raise SpecError(f"{where}: a resolver table needs exactly one of {', '.join(RESOLVERS)} (found {found}); {SEE}")
    kind = RESOLVERS[heads[0]]
    allowed = dict(kind.options)
    for key in r:
        if key != heads[0] and key not in allowed:
            raise SpecError(
                f"{where}: unknown key {key!r} in {{{heads[0]} = …}}{_did_you_mean(key, [heads[0], *allowed])}; {SEE}"
            )
    for key in kind.required:
        if key not in r:
            raise SpecError(f"{where}: {{{heads[0]} = …}} needs {key!r}; {SEE}")
    for key, option in allowed.items():
        check, wanted = _OPTION_KINDS[option]
        if key in r and not check(r[key]):
            raise SpecError(f"{where}: {key} is {_show(r[key])}; it must be {wanted}")
    arg = r[heads[0]]
    if kind.argument == "text" and not isinstance(arg, str):
        raise SpecError(f"{where}: {heads[0]} is {_show(arg)}; it must be a text")
    if kind.argument == "literal" and not isinstance(arg, (str, int, float, bool)):
        raise SpecError(f"{where}: value is {_show(arg)}; it must be a text, number or boolean")
    if kind.argument == "pair":
        if not (isinstance(arg, list) and len(arg) == 2):
            raise SpecError(f"{where}: {heads[0]} is {_show(arg)}; it must be a list of two resolvers")
        for x in arg:
            _check_resolver(x, where)
    if kind.argument == "resolver":
        _check_resolver(arg, where)


def _config_key(r) -> str | None:
    """The first config key a dimension resolver reads, for messages ("num_attention_heads")."""
    if isinstance(r, str):
        return r
    if isinstance(r, list):
        return next((k for k in map(_config_key, r) if k), None)
    return r.get("config") if isinstance(r, dict) else None


# ----------------------------------------------------------------------------- the schema
#
# Every field of a section carries its kind in ``metadata["kind"]``; :func:`_parse_value` reads each kind.


@dataclass(frozen=True)
class DetectSection:
    """``[detect]``: how a checkpoint of the family is recognised (templates with ``{i}`` = 0)."""

    require: tuple[str, ...] = field(metadata={"kind": "tensors"})  # signature tensors that must all exist
    model_type: tuple[str, ...] = field(default=(), metadata={"kind": "texts"})  # accepted config model_type values
    config_has: tuple[str, ...] = field(default=(), metadata={"kind": "texts"})  # keys the config must hold
    require_any: tuple[str, ...] = field(default=(), metadata={"kind": "tensors"})  # at least one of these must exist
    forbid: tuple[str, ...] = field(default=(), metadata={"kind": "tensors"})  # none of these may exist
    in_memory: tuple[str, ...] = field(
        default=(), metadata={"kind": "tensors"}
    )  # transformers ≥ 5 in-memory names: refused with a hint
    config_required: bool = field(
        default=False, metadata={"kind": "bool"}
    )  # match only when the config test passes, never by tensors alone


@dataclass(frozen=True)
class DimsSection:
    """``[dims]``: a resolver for each dimension (None: the family has no such thing)."""

    layers: Any = field(metadata={"kind": "resolver"})
    hidden: Any = field(metadata={"kind": "resolver"})
    heads: Any = field(metadata={"kind": "resolver"})
    head_dim: Any = field(default=None, metadata={"kind": "resolver"})  # default: hidden / heads
    eps: Any = field(default=None, metadata={"kind": "resolver"})
    act: Any = field(default=None, metadata={"kind": "resolver"})
    patch_size: Any = field(default=None, metadata={"kind": "resolver"})
    image_size: Any = field(
        default=None, metadata={"kind": "resolver"}
    )  # an int, [H, W] or timm's [C, H, W]: the stored grid and preprocessing defaults
    swiglu: Any = field(default=None, metadata={"kind": "resolver"})
    interpolation: Any = field(
        default=None, metadata={"kind": "resolver"}
    )  # position-table resampling: one of INTERPOLATIONS (default "bicubic")


@dataclass(frozen=True)
class AttentionSection:
    """``[attention]``: separate ``q``/``k``/``v`` or one fused ``qkv`` (rows [q | k | v], head-major), and ``out``."""

    q: ModuleRef | None = field(default=None, metadata={"kind": "module"})
    k: ModuleRef | None = field(default=None, metadata={"kind": "module"})
    v: ModuleRef | None = field(default=None, metadata={"kind": "module"})
    qkv: ModuleRef | None = field(default=None, metadata={"kind": "module"})
    out: ModuleRef | None = field(default=None, metadata={"kind": "module"})
    q_bias: str | None = field(
        default=None, metadata={"kind": "tensor"}
    )  # separate bias tensors overriding the module's (BEiT-style)
    k_bias: str | None = field(default=None, metadata={"kind": "tensor"})
    v_bias: str | None = field(default=None, metadata={"kind": "tensor"})
    relative_position_bias: tuple[str, ...] = field(
        default=(), metadata={"kind": "tensors"}
    )  # tables ((2Wh−1)(2Ww−1) + 3, H) added to the logits
    relative_position_index: tuple[str, ...] = field(
        default=(), metadata={"kind": "tensors"}
    )  # stored index buffers, checked

    def check(self, where: str) -> None:
        if self.qkv is not None and any(r is not None for r in (self.q, self.k, self.v)):
            raise SpecError(f"{where}: give either a fused qkv or separate q, k, v, not both")
        if self.qkv is None and (self.q is None or self.k is None):
            raise SpecError(f"{where}: give a fused qkv, or separate q and k (and v); {SEE}")
        if self.relative_position_index and not self.relative_position_bias:
            raise SpecError(f"{where}: relative_position_index without relative_position_bias; name the tables too")


@dataclass(frozen=True)
class BlockSection:
    """``[block]``: the LayerNorms, MLP and layer scales of block ``{i}``."""

    norm1: ModuleRef | None = field(
        default=None, metadata={"kind": "module"}
    )  # feeds the attention (also read by profile --fold-ln)
    norm2: ModuleRef | None = field(default=None, metadata={"kind": "module"})
    fc1: ModuleRef | None = field(default=None, metadata={"kind": "module"})
    fc2: ModuleRef | None = field(default=None, metadata={"kind": "module"})
    swiglu_in: ModuleRef | None = field(
        default=None, metadata={"kind": "module"}
    )  # used when dims.swiglu is true: (2F, D), gate rows first
    swiglu_out: ModuleRef | None = field(default=None, metadata={"kind": "module"})
    scale1: str | None = field(
        default=None, metadata={"kind": "tensor"}
    )  # layer-scale vectors (D,) multiplying the attention and MLP branches
    scale2: str | None = field(default=None, metadata={"kind": "tensor"})


@dataclass(frozen=True)
class EmbeddingsSection:
    """``[embeddings]``: tokens, patch embedding, positions and the norms around the blocks."""

    tokens: tuple[str, ...] = field(default=("patches",), metadata={"kind": "tokens"})  # sequence order
    patch: ModuleRef | None = field(default=None, metadata={"kind": "module"})
    cls: str | None = field(default=None, metadata={"kind": "tensor"})
    dist: str | None = field(default=None, metadata={"kind": "tensor"})
    registers: str | None = field(default=None, metadata={"kind": "tensor"})
    position: str | None = field(default=None, metadata={"kind": "tensor"})
    position_tokens: tuple[str, ...] = field(
        default=("patches",), metadata={"kind": "tokens"}
    )  # the tokens the position table covers, in order
    no_embed_class: bool | str = field(
        default=False, metadata={"kind": "no_embed_class"}
    )  # true: patches only; "rows": decided by the row count
    pre_norm: ModuleRef | None = field(default=None, metadata={"kind": "module"})
    final_norm: ModuleRef | None = field(default=None, metadata={"kind": "module"})
    post_norm: ModuleRef | None = field(default=None, metadata={"kind": "module"})

    def check(self, where: str) -> None:
        if "patches" not in self.tokens:
            raise SpecError(f"{where}: tokens must list 'patches' (found {list(self.tokens)})")
        for kind in self.tokens:
            if kind != "patches" and getattr(self, kind) is None:
                raise SpecError(f'{where}: tokens lists {kind!r} but no {kind} tensor is named; add {kind} = "…"')
        stray = [t for t in self.position_tokens if t not in self.tokens]
        if stray:
            raise SpecError(f"{where}: position_tokens {stray} are not in tokens {list(self.tokens)}")


@dataclass(frozen=True)
class PreprocessSection:
    """``[preprocess]``: which preprocessing the family's checkpoints carry, and where.

    ``config_file``: the JSON file beside the weights holding it; ``key``: the dotted key
    inside it (None: the whole file). Without it, the format's defaults at the model's image size.
    """

    format: str = field(default="hf", metadata={"kind": "choice", "choices": PREPROCESS_FORMATS})
    config_file: str | None = field(default=None, metadata={"kind": "text"})
    key: str | None = field(default=None, metadata={"kind": "text"})


SECTIONS = {
    "detect": DetectSection,
    "dims": DimsSection,
    "attention": AttentionSection,
    "block": BlockSection,
    "embeddings": EmbeddingsSection,
    "preprocess": PreprocessSection,
}
_REQUIRED_SECTIONS = ("detect", "dims", "attention")


@dataclass(frozen=True)
class Spec:
    """One family, as its TOML file says (see ``model_specs/README.md``), parsed and checked."""

    name: str = field(metadata={"kind": "text"})
    description: str = field(metadata={"kind": "text"})
    example: str = field(metadata={"kind": "text"})
    detect: DetectSection = field(metadata={"kind": "section"})
    dims: DimsSection = field(metadata={"kind": "section"})
    attention: AttentionSection = field(metadata={"kind": "section"})
    modality: str = field(
        default="vision", metadata={"kind": "text"}
    )  # "vision" (forward pass available), or a weights-only kind ("text", …)
    config_file: str | None = field(default=None, metadata={"kind": "text"})  # the JSON config beside the weights
    config_root: str = field(
        default="", metadata={"kind": "text"}
    )  # dotted path inside it where bare dimension keys are looked up
    prefixes: tuple[str, ...] = field(default=("",), metadata={"kind": "texts"})  # tensor-name prefixes, tried in order
    default_part: str | None = field(
        default=None, metadata={"kind": "text"}
    )  # the network read from a multi-network training checkpoint
    block: BlockSection = field(default_factory=BlockSection, metadata={"kind": "section"})
    embeddings: EmbeddingsSection = field(default_factory=EmbeddingsSection, metadata={"kind": "section"})
    preprocess: PreprocessSection = field(default_factory=PreprocessSection, metadata={"kind": "section"})
    path: Path = field(default=Path(), metadata={"kind": "internal"})
    user: bool = field(default=False, metadata={"kind": "internal"})  # from a user folder, not model_specs/
    overrides: Path | None = field(default=None, metadata={"kind": "internal"})  # the built-in spec it replaces
    sha256: str = field(default="", metadata={"kind": "internal"})  # of the file's bytes, as read and parsed
    shadows: tuple[Path, ...] = field(
        default=(), metadata={"kind": "internal"}
    )  # user spec files of the same family in later folders, which this one wins over

    @property
    def file(self) -> str:
        """The spec file for messages: its name for the shipped specs, its path for a user's."""
        return str(self.path) if self.user else self.path.name

    @property
    def label(self) -> str:
        """The family for messages: ``hf-vit`` for a shipped spec, ``hf-vit (/path/hf-vit.toml)`` for a user's (which
        may replace the shipped one of that name)."""
        return f"{self.name} ({self.path})" if self.user else self.name

    def origin(self) -> str:
        """Where the spec comes from, for listings: its file, the shipped one it replaces, the user files of the same
        family it wins over ("/a/hf-vit.toml, replacing the built-in hf-vit.toml; wins over /b/hf-vit.toml")."""
        text = self.file + (f", replacing the built-in {self.overrides.name}" if self.overrides is not None else "")
        return text + ("; wins over " + ", ".join(map(str, self.shadows)) if self.shadows else "")

    def provenance(self) -> dict:
        """The spec's record in every output's provenance (``source.spec``): ``{"family", "file" (the user's path, or
        the shipped file's name), "sha256" (of the file's bytes, as parsed), "user", "replaces" (the shipped file a
        user spec replaces, or None)}``."""
        return {
            "family": self.name,
            "file": self.file,
            "sha256": self.sha256,
            "user": self.user,
            "replaces": self.overrides.name if self.overrides is not None else None,
        }

    @property
    def logit_terms(self) -> tuple[str, ...]:
        """Additive attention-logit terms the weight SVD does not see, derived from the fields."""
        return (RELATIVE_POSITION_BIAS,) if self.attention.relative_position_bias else ()

    @property
    def is_vision(self) -> bool:
        return self.modality == "vision"


def _show(v) -> str:
    return json.dumps(v, ensure_ascii=False) if isinstance(v, (str, int, float, bool, list, dict)) else repr(v)


def _did_you_mean(key: str, known) -> str:
    close = difflib.get_close_matches(key, list(known), n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _texts(v, where: str) -> tuple[str, ...]:
    if not (isinstance(v, list) and all(isinstance(x, str) for x in v)):
        raise SpecError(f"{where} is {_show(v)}; it must be a list of texts")
    return tuple(v)


def _module(v, where: str) -> ModuleRef:
    if isinstance(v, str):
        return ModuleRef(v + ".weight", v + ".bias")
    if isinstance(v, dict):
        stray = [k for k in v if k not in ("weight", "bias")]
        if stray:
            raise SpecError(
                f'{where}: unknown key {stray[0]!r} in a module table; give weight = "…" and optionally bias = "…"'
            )
        if not isinstance(v.get("weight"), str) or not isinstance(v.get("bias", ""), str):
            raise SpecError(
                f'{where} is {_show(v)}; a module table needs weight = "…" (and optionally bias = "…") as texts'
            )
        return ModuleRef(v["weight"], v.get("bias") or None)
    raise SpecError(
        f'{where} is {_show(v)}; it must be a module: "path" (path.weight, path.bias) or {{ weight = "…", bias = "…" }}'
    )


def _parse_value(kind: str, v, where: str, meta) -> Any:
    """The value of a field of ``kind`` from TOML ``v``, or a SpecError naming ``where``."""
    if kind == "text":
        if not isinstance(v, str):
            raise SpecError(f"{where} is {_show(v)}; it must be a text")
        return v
    if kind in ("texts", "tensors"):
        return _texts(v, where)
    if kind == "tensor":
        if not isinstance(v, str):
            raise SpecError(f"{where} is {_show(v)}; it must be a tensor name (a text; {{i}} = the block)")
        return v
    if kind == "module":
        return _module(v, where)
    if kind == "resolver":
        _check_resolver(v, where)
        return v
    if kind == "bool":
        if not isinstance(v, bool):
            raise SpecError(f"{where} is {_show(v)}; it must be true or false")
        return v
    if kind == "tokens":
        tokens = _texts(v, where)
        unknown = [t for t in tokens if t not in TOKEN_KINDS]
        if unknown:
            raise SpecError(f"{where}: unknown token kind {unknown[0]!r}; use {', '.join(TOKEN_KINDS)}")
        return tokens
    if kind == "choice":
        if v not in meta["choices"]:
            raise SpecError(f"{where} is {_show(v)}; it must be one of {', '.join(meta['choices'])}")
        return v
    if kind == "no_embed_class":
        if not (isinstance(v, bool) or v == "rows"):
            raise SpecError(f'{where} is {_show(v)}; it must be true, false or "rows"')
        return v
    raise AssertionError(kind)  # pragma: no cover - a field without a known kind


def _parse_fields(cls, data: dict, file: str, section: str | None) -> dict:
    """Field values of dataclass ``cls`` from TOML table ``data``; unknown keys and wrong kinds refused."""
    label = f"{file}: [{section}]" if section else f"{file}:"
    if not isinstance(data, dict):
        raise SpecError(f"{label} must be a table ({SEE})")
    fields = {f.name: f for f in dataclasses.fields(cls) if f.metadata.get("kind") not in ("internal",)}
    for key, value in data.items():
        if key not in fields or (
            section is None and fields[key].metadata["kind"] == "section" and not isinstance(value, dict)
        ):
            if key in fields:
                raise SpecError(f"{file}: {key} must be a table [{key}] ({SEE})")
            where = f"[{section}]" if section else "the top level"
            raise SpecError(
                f"{file}: unknown key {key!r} in {where}{_did_you_mean(key, fields)}; known: {', '.join(fields)}"
            )
    values = {}
    for name, f in fields.items():
        kind = f.metadata["kind"]
        if kind == "section":
            continue
        if name in data:
            values[name] = _parse_value(
                kind, data[name], f"{label} {name}" if section else f"{file}: {name}", f.metadata
            )
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise SpecError(f"{label} missing required key {name!r}; {SEE}")
    return values


def parse_spec(path: Path, data: dict, *, user: bool = False, sha256: str = "") -> Spec:
    """A :class:`Spec` from the TOML ``data`` of file ``path`` (``sha256``: of its bytes): every key checked against
    the schema."""
    file = str(path) if user else path.name
    if "name" in data and data["name"] != path.stem:
        raise SpecError(f"{file}: name {data['name']!r} differs from the file name; rename one of them")
    values = _parse_fields(Spec, data, file, None)
    for name, cls in SECTIONS.items():
        if name in data:
            section = cls(**_parse_fields(cls, data[name], file, name))
            if hasattr(section, "check"):
                section.check(f"{file}: [{name}]")
            values[name] = section
        elif name in _REQUIRED_SECTIONS:
            raise SpecError(f"{file}: missing required key {name!r}; {SEE}")
    spec = Spec(**values, path=path, user=user, sha256=sha256)
    _check_spec(spec)
    return spec


def _check_spec(spec: Spec) -> None:
    """Cross-section rules: what the forward pass needs of a vision family."""
    if spec.embeddings.tokens != ("cls", "patches") and spec.logit_terms:
        raise SpecError(
            f'{spec.file}: [attention] relative_position_bias needs [embeddings] tokens = ["cls", "patches"] '
            f"(its 3 extra entries are CLS biases)"
        )
    if not spec.is_vision:
        return
    needs = [
        ("block", "norm1"),
        ("block", "norm2"),
        ("embeddings", "patch"),
        ("dims", "eps"),
        ("dims", "act"),
        ("dims", "image_size"),
    ]
    needs += (
        [("block", "swiglu_in"), ("block", "swiglu_out")]
        if spec.block.fc1 is None
        else [("block", "fc1"), ("block", "fc2")]
    )
    for section, key in needs:
        if getattr(getattr(spec, section), key) is None:
            raise SpecError(
                f"{spec.file}: [{section}] lacks {key!r}, which the forward pass of a vision family needs; "
                f'add it, or set modality to a weights-only kind such as "text"'
            )


def spec_dir() -> Path:
    """The folder of the shipped spec files: ``model_specs/`` of a source checkout, else the installed copy."""
    checkout = Path(__file__).resolve().parents[2] / "model_specs"  # qkweights/specs/spec.py -> the checkout
    if checkout.is_dir():
        return checkout
    return Path(str(resources.files("qkweights.model_specs")))


_builtin_dir = spec_dir  # load_specs' own argument is called spec_dir


def _read_folder(folder: Path, *, user: bool) -> dict[str, Spec]:
    specs = {}
    for path in sorted(Path(folder).glob("*.toml")):
        shown = str(path) if user else path.name
        try:
            raw = path.read_bytes()
            data = tomllib.loads(raw.decode("utf-8"))
        except tomllib.TOMLDecodeError as e:
            raise SpecError(f"{shown}: invalid TOML ({e})") from None
        except (OSError, UnicodeDecodeError) as e:
            raise SpecError(f"{shown}: cannot be read ({e}); fix the file or its permissions") from None
        specs[path.stem] = parse_spec(path, data, user=user, sha256=hashlib.sha256(raw).hexdigest())
    return specs


def user_spec_dirs(spec_dir=None) -> tuple[Path, ...]:
    """The user spec folders: ``spec_dir`` (a path or a list of paths) then those of ``QKWEIGHTS_SPEC_PATH``.

    Earlier folders win over later ones, all of them over the shipped specs. A folder that does not
    exist is a SpecError naming where it was given.
    """
    given = [] if spec_dir is None else [spec_dir] if isinstance(spec_dir, (str, os.PathLike)) else list(spec_dir)
    dirs = [(Path(d).expanduser(), "spec_dir") for d in given]
    dirs += [
        (Path(d).expanduser(), SPEC_PATH_ENV) for d in os.environ.get(SPEC_PATH_ENV, "").split(os.pathsep) if d.strip()
    ]
    for d, origin in dirs:
        if not d.is_dir():
            raise SpecError(
                f"spec folder {d} (from {origin}) does not exist or is not a folder; give a folder of .toml spec files"
            )
    return tuple(dict.fromkeys(d for d, _ in dirs))


def load_specs(folder: Path | None = None, *, spec_dir=None) -> dict[str, Spec]:
    """All specs by name: the shipped ones (or those of ``folder``), then the user folders' (``spec_dir``,
    ``QKWEIGHTS_SPEC_PATH``; see :func:`user_spec_dirs`). A user spec with a built-in's name replaces it
    (its ``overrides`` names the file it replaces); of one family in several user folders the earliest wins
    (its ``shadows`` lists the files it wins over)."""
    specs = _read_folder(Path(folder) if folder is not None else _builtin_dir(), user=False)
    user: dict[str, list[Spec]] = {}
    for d in user_spec_dirs(spec_dir):
        for name, spec in _read_folder(d, user=True).items():
            user.setdefault(name, []).append(spec)  # earlier folders first
    for name, (spec, *later) in sorted(user.items()):
        base = specs.get(name)
        specs[name] = dataclasses.replace(
            spec, overrides=base.path if base is not None else None, shadows=tuple(s.path for s in later)
        )
    return specs


def config_names(specs: dict[str, Spec]) -> tuple[str, ...]:
    """Every JSON file name the specs read beside the weights (``config_file``, ``[preprocess] config_file``)."""
    names = [n for s in specs.values() for n in (s.config_file, s.preprocess.config_file) if n]
    return tuple(dict.fromkeys(names))


def default_parts(specs: dict[str, Spec]) -> tuple[str, ...]:
    """The parts of multi-network training checkpoints read by default, as the specs declare them (``default_part``)."""
    return tuple(dict.fromkeys(s.default_part for s in specs.values() if s.default_part))


@dataclass(frozen=True)
class Dims:
    """Resolved dimensions of a checkpoint (``None`` where a family has no such thing)."""

    layers: int
    hidden: int
    heads: int
    head_dim: int
    eps: float | None = None
    act: str | None = None
    patch_size: int | None = None
    image_size: tuple[int, int] | None = None
    swiglu: bool = False
    extra: dict = field(default_factory=dict)  # {"interpolation": …} when the spec gives one
    interpolation: str = "bicubic"


# The type of each resolved dimension: (check, what the message asks for).
_INT = (lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 1, "a positive integer")
_DIM_TYPES = {
    "layers": _INT,
    "hidden": _INT,
    "heads": _INT,
    "head_dim": _INT,
    "patch_size": _INT,
    "eps": (
        lambda v: isinstance(v, (int, float)) and not isinstance(v, bool) and 0 < v < 1,
        "a number between 0 and 1",
    ),
    "act": (lambda v: isinstance(v, str), 'a text such as "gelu"'),
    "swiglu": (lambda v: isinstance(v, bool), "true or false"),
    "image_size": (
        lambda v: _INT[0](v) or (isinstance(v, list) and 2 <= len(v) <= 3 and all(_INT[0](x) for x in v)),
        "a positive integer or a list [height, width]",
    ),
    "interpolation": (lambda v: v in INTERPOLATIONS, "one of " + ", ".join(INTERPOLATIONS)),
}


@dataclass(frozen=True)
class Origin:
    """Where a resolved dimension came from, for messages: ``text`` names it ("config.json hidden_size",
    "patch_embed.proj.weight shape[0]", "[dims] heads in the spec"), ``fix`` says what to change ("fix the config",
    …)."""

    text: str
    fix: str

    @classmethod
    def of(cls, spec: Spec, key: str, read: tuple[str, str | None]) -> Origin:
        """The origin of dimension ``key`` whose resolver last read ``read`` (an entry of ``_Resolver.read``)."""
        kind, detail = read
        in_spec = "the spec" if spec.user else spec.file  # a user spec's label already names its file
        if kind == CONFIG:
            return cls(f"{spec.config_file or 'config'} {detail}", "fix the config")
        if kind == TENSORS:
            return cls(detail, f"fix [dims] {key} in {in_spec}")
        return cls(f"[dims] {key} in {in_spec}", "fix the spec file")


def _typed(spec: Spec, key: str, value, origin: Origin):
    """``value`` of dimension ``key`` if it has the right type (a float that is a whole number counts as an
    integer); otherwise a CheckpointError naming where it came from."""
    check, wanted = _DIM_TYPES[key]
    if isinstance(value, float) and value.is_integer() and check is _INT[0]:
        value = int(value)
    if isinstance(value, list):
        value = [int(x) if isinstance(x, float) and x.is_integer() else x for x in value]
    if not check(value):
        shown = json.dumps(value, ensure_ascii=False) if value is not None else "not usable"
        raise CheckpointError(f"{spec.label}: {origin.text} is {shown}; it must be {wanted} ({key}); {origin.fix}")
    return value


def _get_path(cfg: dict, dotted: str):
    cur = cfg
    for part in dotted.split("."):
        if not isinstance(cur, dict) or part not in cur:
            raise KeyError(dotted)
        cur = cur[part]
    return cur


class _Resolver:
    """Evaluates dimension resolvers (checked when the spec loaded) against a config and a tensor store."""

    def __init__(self, spec: Spec, config: dict, store, prefix: str):
        self.spec, self.config, self.store, self.prefix = spec, config, store, prefix
        self.read: list[tuple[str, str | None]] = []  # what was read (TENSORS, CONFIG, SPEC_VALUE), for messages

    def __call__(self, r):
        if isinstance(r, (bool, int, float)):
            self.read.append(SPEC_VALUE)
            return r
        if isinstance(r, str):
            return self.config_value(r, root=True)
        if isinstance(r, list):
            for alt in r:
                try:
                    return self(alt)
                except KeyError:
                    continue
            raise KeyError(" or ".join(map(str, r)))
        head = next(k for k in r if k in RESOLVERS)
        return RESOLVERS[head].evaluate(self, r)

    def config_value(self, dotted: str, root: bool):
        base = self.config
        if root and self.spec.config_root:
            base = _get_path(self.config, self.spec.config_root)
        value = _get_path(base, dotted)
        self.read.append((CONFIG, f"{self.spec.config_root}.{dotted}" if root and self.spec.config_root else dotted))
        return value


def relative_window(rows: int) -> int:
    """W such that a relative position table of ``rows`` rows covers a W×W patch window: rows = (2W − 1)² + 3.

    The 3 extra rows are BEiT's CLS→token, token→CLS and CLS→CLS biases. Raises KeyError
    (an unresolved dimension) when ``rows`` has no such form.
    """
    side = math.isqrt(max(rows - 3, 0))
    if side * side != rows - 3 or side % 2 == 0:
        raise KeyError(f"a relative position table of {rows} rows ((2W−1)²+3 for a square W×W window)")
    return (side + 1) // 2


# ----------------------------------------------------------------------------- detection


def _signature_prefix(spec: Spec, store) -> str | None:
    """The first prefix under which all of the spec's signature tensors exist, at least one of its
    ``require_any`` ones (when listed), and none of its forbidden ones."""
    det = spec.detect
    require = [t.format(i=0) for t in det.require]
    require_any = [t.format(i=0) for t in det.require_any]
    forbid = [t.format(i=0) for t in det.forbid]
    for prefix in spec.prefixes:
        if (
            all(prefix + t in store for t in require)
            and not any(prefix + t in store for t in forbid)
            and (not require_any or any(prefix + t in store for t in require_any))
        ):
            return prefix
    return None


def _signature_text(spec: Spec) -> str:
    """The signature tensors of a spec for messages: "a, b" or "a, b, one of c | d"."""
    names = list(spec.detect.require)
    if spec.detect.require_any:
        names.append("one of " + " | ".join(spec.detect.require_any))
    return ", ".join(names)


def _config_matches(spec: Spec, configs: dict[str, dict]) -> bool:
    det = spec.detect
    cfg = configs.get(spec.config_file or "", None)
    if cfg is None:
        return False
    if det.model_type and cfg.get("model_type") not in det.model_type:
        return False
    if det.config_has and not all(k in cfg for k in det.config_has):
        return False
    return bool(det.model_type or det.config_has)


def detect_family(
    store, configs: dict[str, dict], specs: dict[str, Spec], family: str | None = None
) -> tuple[Spec, str]:
    """Choose the spec (and tensor-name prefix) for a checkpoint.

    With ``family`` given, only that spec is tried. Otherwise a spec matches
    when its config test passes (if the checkpoint has that config file) and
    its signature tensors are present; config matches win over signature-only
    matches, and a spec with ``[detect] config_required`` matches only by its config.
    Raises :class:`SpecError` listing the families and the names looked for.
    """
    if family is not None:
        if family not in specs:
            close = difflib.get_close_matches(family, list(specs), n=3, cutoff=0.0)
            raise SpecError(
                f"unknown family {family!r} (closest: {', '.join(close)}); `python -m qkweights specs` lists them all"
            )
        candidates = [specs[family]]
    else:
        candidates = list(specs.values())
    by_config, by_signature = [], []
    for spec in candidates:
        prefix = _signature_prefix(spec, store)
        if prefix is None:
            continue
        if _config_matches(spec, configs):
            by_config.append((spec, prefix))
        elif not spec.detect.config_required or family is not None:
            by_signature.append((spec, prefix))
    found = by_config or by_signature
    if len(found) == 1 or (found and family is not None):
        return found[0]
    if len(found) > 1:
        names = ", ".join(s.name for s, _ in found)
        raise SpecError(f"the checkpoint matches several families ({names}); choose one with family=NAME")
    in_memory = _in_memory_match(store, [specs[family]] if family is not None else list(specs.values()))
    if in_memory is not None:
        raise SpecError(
            f"transformers ≥ 5 in-memory names ({in_memory}), not the names save_pretrained writes; "
            f"save the model with save_pretrained() instead of torch.save(state_dict)"
        )
    if family is not None:
        looked = _signature_text(specs[family])
        raise SpecError(
            f"the checkpoint is not of family {family!r}{f' ({specs[family].path})' if specs[family].user else ''}: "
            f"it lacks one of {looked} (with prefixes "
            f"{', '.join(repr(p) for p in specs[family].prefixes)})"
        )
    close = _closest(store, specs)
    spec, prefix = close[0]
    missing = [prefix + t.format(i=0) for t in spec.detect.require if prefix + t.format(i=0) not in store]
    extra = [prefix + t.format(i=0) for t in spec.detect.forbid if prefix + t.format(i=0) in store]
    why = (
        f"which lacks {missing[0]}"
        if missing
        else f"which must not hold {extra[0]}"
        if extra
        else f"which lacks {_signature_text(spec)}"
    )
    others = "".join(f", {s.name}" for s, _ in close[1:])
    raise SpecError(
        f"unknown checkpoint: no family matches its tensors (closest: {spec.name}, {why}{others}); "
        f"pass family=NAME (`python -m qkweights specs` lists them) or add a spec file"
    )


def _in_memory_match(store, specs: list[Spec]) -> str | None:
    """The first ``detect.in_memory`` tensor name of the first spec whose in-memory names (transformers ≥ 5
    module names, as ``torch.save(model.state_dict())`` writes them) all exist under one of its prefixes, else None."""
    for spec in specs:
        names = [t.format(i=0) for t in spec.detect.in_memory]
        for prefix in spec.prefixes if names else ():
            if all(prefix + t in store for t in names):
                return prefix + names[0]
    return None


def _templates(spec: Spec) -> list[str]:
    """The weight templates a spec names in [attention], [block] and [embeddings] (modules and tensors)."""
    out = []
    for section in (spec.attention, spec.block, spec.embeddings):
        for f in dataclasses.fields(section):
            value, kind = getattr(section, f.name), f.metadata["kind"]
            if kind == "module" and value is not None:
                out.append(value.weight)
            elif kind == "tensor" and value is not None:
                out.append(value)
    return out


def _closest(store, specs: dict[str, Spec], n: int = 3) -> list[tuple[Spec, str]]:
    """The ``n`` specs whose tensor names share the most name parts with the checkpoint's, best first (ties by
    name), each with the prefix under which most of its signature tensors exist."""
    have = {part for name in store.names() for part in name.split(".") if not part.isdigit()}
    scored = []
    for spec in specs.values():
        templates = list(spec.detect.require) + _templates(spec)
        parts = {p for t in templates for p in t.split(".") if p and p not in ("{i}", "weight", "bias")}
        share = len(parts & have) / max(len(parts), 1)
        require = [t.format(i=0) for t in spec.detect.require]
        prefix = max(spec.prefixes, key=lambda p: sum(p + t in store for t in require))
        scored.append((-share, spec.name, spec, prefix))
    return [(spec, prefix) for _, _, spec, prefix in sorted(scored, key=lambda x: x[:2])[:n]]


# ----------------------------------------------------------------------------- weights by role


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
        self.origins: dict[str, Origin] = {}  # where each dimension given by the spec came from
        self.dims = self._resolve_dims()

    def _resolve_dims(self) -> Dims:
        resolve = _Resolver(self.spec, self.config, self.store, self.prefix)
        values, unresolved, origin = {}, {}, self.origins
        where = self.spec.config_file or "config"
        label = self.spec.label
        for f in dataclasses.fields(self.spec.dims):
            key, r = f.name, getattr(self.spec.dims, f.name)
            if r is None:
                continue
            resolve.read = []
            try:
                value = resolve(r)
            except KeyError as e:
                unresolved[key] = e.args[0]
                continue
            except (TypeError, ValueError, ZeroDivisionError, IndexError):  # {div = [a, b]} of a text, an axis too many
                value = None
            origin[key] = Origin.of(self.spec, key, resolve.read[-1])  # every resolver that gives a value reads
            values[key] = _typed(self.spec, key, value, origin[key])
        if unresolved:
            key, looked = next(iter(unresolved.items()))
            if self.spec.config_file and self.spec.config_file not in self.configs:
                heads = _config_key(self.spec.dims.heads)
                raise SpecError(
                    f"{label}: no {where} beside the weights; the head count ({heads or 'heads'}) "
                    "cannot be read "
                    f"from the tensors: put the model's {where} next to the weight file, or pass the folder "
                    "that holds both"
                )
            raise SpecError(
                f"{label}: cannot determine {key!r} (looked for {looked} in {where} and the tensors); "
                f"add it to {where} or pass family=NAME"
            )
        self._check_layer_count(values["layers"], origin["layers"])
        hidden, heads = values.pop("hidden"), values.pop("heads")
        if hidden % heads:
            raise CheckpointError(
                f"{label}: {heads} heads ({origin['heads'].text}) do not divide the width {hidden} "
                f"({origin['hidden'].text}); {origin['heads'].fix} or choose another family=NAME"
            )
        image = values.pop("image_size", None)
        if isinstance(image, (list, tuple)):
            image = tuple(image[-2:])  # (H, W), or timm's (C, H, W)
        elif image is not None:
            image = (image, image)
        head_dim = values.pop("head_dim", hidden // heads)
        if head_dim * heads != hidden:
            raise CheckpointError(
                f"{label}: {heads} heads ({origin['heads'].text}) of width {head_dim} ({origin['head_dim'].text}) "
                f"do not make the width {hidden} ({origin['hidden'].text}); {origin['head_dim'].fix} or choose "
                "another family=NAME"
            )
        interpolation = values.get("interpolation")
        return Dims(
            layers=values.pop("layers"),
            hidden=hidden,
            heads=heads,
            head_dim=head_dim,
            eps=values.get("eps"),
            act=values.get("act"),
            patch_size=values.get("patch_size"),
            image_size=image,
            swiglu=values.get("swiglu", False),
            extra={"interpolation": interpolation} if interpolation is not None else {},
            interpolation=interpolation or "bicubic",
        )

    def _check_layer_count(self, layers: int, origin: Origin) -> None:
        """Refuse a layer count that disagrees with the layers whose attention weights are in the files."""
        att = self.spec.attention
        template = (att.qkv or att.q).weight
        held = 0
        while self.prefix + template.format(i=held) in self.store:
            held += 1
        if held != layers:
            raise CheckpointError(
                f"{self.spec.label}: {origin.text} is {layers}, but the weight files hold {held} "
                f"layer{'s' * (held != 1)} ({self.prefix + template.format(i='N')}); {origin.fix} or choose another "
                "family=NAME"
            )

    # names -----------------------------------------------------------------

    def name(self, template: str, i: int | None = None) -> str:
        """The full tensor name of ``template`` for layer ``i``."""
        return self.prefix + _fill(template, i)

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

    def qk(self, i: int) -> QK:
        """Per-head query and key weights and biases of layer ``i`` (float64).

        Separate projections are stored (out, in) = (D, D), head h in rows
        h·K … (h+1)·K−1; fused ones are (3D, D) with rows [q | k | v]. A spec's
        ``q_bias`` / ``k_bias`` tensor overrides the module's bias.
        """
        d, h, k = self.dims.hidden, self.dims.heads, self.dims.head_dim
        att = self.spec.attention
        if att.qkv is not None:
            w, b = self.module("attention", "qkv", i)
            self._check_shape(w, (3 * d, d), "qkv", i)
            wq, wk = w[:d], w[d : 2 * d]
            bq, bk = (b[:d], b[d : 2 * d]) if b is not None else (None, None)
        else:
            wq, bq = self.module("attention", "q", i)
            wk, bk = self.module("attention", "k", i)
            self._check_shape(wq, (d, d), "q", i)
            self._check_shape(wk, (d, d), "k", i)
        if self.has(att.q_bias, i):
            bq = self.tensor(att.q_bias, i)
        if self.has(att.k_bias, i):
            bk = self.tensor(att.k_bias, i)
        zeros = np.zeros(d)
        return QK(
            wq=np.asarray(wq, np.float64).reshape(h, k, d),  # (H, K, D)
            wk=np.asarray(wk, np.float64).reshape(h, k, d),
            bq=np.asarray(zeros if bq is None else bq, np.float64).reshape(h, k),  # (H, K)
            bk=np.asarray(zeros if bk is None else bk, np.float64).reshape(h, k),
        )

    def value(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        """W_v (D, D) stored (out, in) and b_v (D,) of layer ``i``, as :meth:`qk` reads q and k.

        A separate ``v`` module, or rows 2D…3D of the fused ``qkv``; a spec's ``v_bias``
        tensor overrides the bias (BEiT-style separate biases); no bias reads as zeros.
        """
        att, d = self.spec.attention, self.dims.hidden
        if att.qkv is not None:
            w, b = self.linear("attention", "qkv", i, 3 * d, d)
            w, b = w[2 * d :], b[2 * d :]
        else:
            w, b = self.linear("attention", "v", i, d, d)
        if self.has(att.v_bias, i):
            b = self._expect(self.tensor(att.v_bias, i), (d,), f"layer {i} v_bias")
        return w, b

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
        att = self.spec.attention
        if att.qkv is not None:
            w, b = self.module("attention", "qkv", i)
            wv, bv = w[2 * d :], (b[2 * d :] if b is not None else None)
        else:
            wv, bv = self.module("attention", "v", i)
        if self.has(att.v_bias, i):
            bv = self.tensor(att.v_bias, i)
        wo, bo = self.module("attention", "out", i)
        zeros = np.zeros(d)
        return OV(
            # (H, D, K) as a view of the contiguous (H, K, D) W_o,hᵀ: the layout the QR of the SVD reads fastest
            wo=np.ascontiguousarray(np.asarray(wo, np.float64).reshape(d, h, k).transpose(1, 2, 0)).transpose(0, 2, 1),
            wv=np.asarray(wv, np.float64).reshape(h, k, d),  # (H, K, D)
            bv=np.asarray(zeros if bv is None else bv, np.float64).reshape(h, k),  # (H, K)
            bo=np.asarray(zeros if bo is None else bo, np.float64),  # (D,)
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
        if not self.has_role("block", "norm1", i):
            return None
        w, b = self.module("block", "norm1", i)
        d = self.dims.hidden
        if w.shape != (d,) or (b is not None and b.shape != (d,)):
            raise self.misfit(f"layer {i} norm1", f"{w.shape}/{None if b is None else b.shape}", (d,))
        return LayerNormWeights(
            np.asarray(w, np.float64), np.zeros(d) if b is None else np.asarray(b, np.float64), b is not None
        )

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
                cfg = _get_path(cfg, pre.key)
            except KeyError:
                return None, missing
        if not isinstance(cfg, dict) or not cfg:
            return None, missing
        return cfg, f"{pre.config_file} {pre.key}" if pre.key else pre.config_file

    def _check_shape(self, w: np.ndarray, expected: tuple[int, ...], role: str, i: int) -> None:
        if w.shape != expected:
            raise self.misfit(f"layer {i} {role} weight", w.shape, expected)

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
