"""The spec schema: ``model_specs/*.toml`` → a checked :class:`Spec`.

A spec names a family's tensors with ``{i}`` templates and says where the
dimensions come from. It is parsed once, when the specs load, into one frozen
dataclass per section (:class:`DetectSection`, :class:`DimsSection`,
:class:`AttentionSection`, :class:`BlockSection`, :class:`EmbeddingsSection`,
:class:`PreprocessSection`); an unknown key or a value of the wrong kind is a
one-line :class:`SpecError` naming the file, the section and the key. The schema
says which values are *module* references (``"path"`` = ``path.weight`` and
``path.bias``, or ``{weight = …, bias = …}``: :class:`ModuleRef`), which are
*tensor* templates, and which are dimension *resolvers* (:mod:`qkweights.specs.resolvers`).
"""

from __future__ import annotations

import dataclasses
import difflib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from qkweights.errors import SpecError
from qkweights.specs.resolvers import RESOLVERS

PREPROCESS_FORMATS = ("hf", "timm", "open_clip")
TOKEN_KINDS = ("cls", "dist", "registers", "patches")  # [embeddings] tokens, in sequence order
INTERPOLATIONS = ("bicubic", "bicubic_antialias")  # [dims] interpolation: how position tables are resampled
ACTIVATIONS = ("gelu", "quick_gelu", "gelu_tanh", "relu", "swiglu")  # the MLP activations of the forward pass
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
        return fill(self.weight, i), (fill(self.bias, i) if self.bias else None)


def fill(template: str, i: int | None) -> str:
    """``template`` with ``{i}`` = ``i`` (left as it is when ``i`` is None)."""
    return template.format(i=i) if i is not None else template


# ----------------------------------------------------------------------------- resolvers in [dims]

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
    _check_resolver_table(r, where)


def _check_resolver_table(r: dict, where: str) -> None:
    """Refuse a resolver table ``{head = argument, option = …}`` that breaks its :class:`ResolverKind` (SpecError)."""
    heads = [k for k in r if k in RESOLVERS]
    if len(heads) != 1:
        found = ", ".join(r) or "nothing"
        raise SpecError(f"{where}: a resolver table needs exactly one of {', '.join(RESOLVERS)} (found {found}); {SEE}")
    head = heads[0]
    kind = RESOLVERS[head]
    allowed = dict(kind.options)
    for key in r:
        if key != head and key not in allowed:
            raise SpecError(
                f"{where}: unknown key {key!r} in {{{head} = …}}{_did_you_mean(key, [head, *allowed])}; {SEE}"
            )
    for key in kind.required:
        if key not in r:
            raise SpecError(f"{where}: {{{head} = …}} needs {key!r}; {SEE}")
    for key, option in allowed.items():
        check, wanted = _OPTION_KINDS[option]
        if key in r and not check(r[key]):
            raise SpecError(f"{where}: {key} is {_show(r[key])}; it must be {wanted}")
    _ARGUMENT_CHECKS[kind.argument](head, r[head], where)


def _argument_text(head: str, arg, where: str) -> None:
    if not isinstance(arg, str):
        raise SpecError(f"{where}: {head} is {_show(arg)}; it must be a text")


def _argument_literal(head: str, arg, where: str) -> None:
    if not isinstance(arg, (str, int, float, bool)):
        raise SpecError(f"{where}: value is {_show(arg)}; it must be a text, number or boolean")


def _argument_pair(head: str, arg, where: str) -> None:
    if not (isinstance(arg, list) and len(arg) == 2):
        raise SpecError(f"{where}: {head} is {_show(arg)}; it must be a list of two resolvers")
    for x in arg:
        _check_resolver(x, where)


def _argument_resolver(head: str, arg, where: str) -> None:
    _check_resolver(arg, where)


# ResolverKind.argument → the check of the head's value (head, value, where)
_ARGUMENT_CHECKS = {
    "text": _argument_text,
    "literal": _argument_literal,
    "pair": _argument_pair,
    "resolver": _argument_resolver,
}


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
    return _PARSERS[kind](v, where, meta)


def _parse_text(v, where: str, meta) -> str:
    if not isinstance(v, str):
        raise SpecError(f"{where} is {_show(v)}; it must be a text")
    return v


def _parse_texts(v, where: str, meta) -> tuple[str, ...]:
    return _texts(v, where)


def _parse_tensor(v, where: str, meta) -> str:
    if not isinstance(v, str):
        raise SpecError(f"{where} is {_show(v)}; it must be a tensor name (a text; {{i}} = the block)")
    return v


def _parse_module(v, where: str, meta) -> ModuleRef:
    return _module(v, where)


def _parse_resolver(v, where: str, meta) -> Any:
    _check_resolver(v, where)
    return v


def _parse_bool(v, where: str, meta) -> bool:
    if not isinstance(v, bool):
        raise SpecError(f"{where} is {_show(v)}; it must be true or false")
    return v


def _parse_tokens(v, where: str, meta) -> tuple[str, ...]:
    tokens = _texts(v, where)
    unknown = [t for t in tokens if t not in TOKEN_KINDS]
    if unknown:
        raise SpecError(f"{where}: unknown token kind {unknown[0]!r}; use {', '.join(TOKEN_KINDS)}")
    return tokens


def _parse_choice(v, where: str, meta) -> Any:
    if v not in meta["choices"]:
        raise SpecError(f"{where} is {_show(v)}; it must be one of {', '.join(meta['choices'])}")
    return v


def _parse_no_embed_class(v, where: str, meta) -> bool | str:
    if not (isinstance(v, bool) or v == "rows"):
        raise SpecError(f'{where} is {_show(v)}; it must be true, false or "rows"')
    return v


# a field's metadata["kind"] → its parser (TOML value, where, the field's metadata)
_PARSERS = {
    "text": _parse_text,
    "texts": _parse_texts,
    "tensors": _parse_texts,
    "tensor": _parse_tensor,
    "module": _parse_module,
    "resolver": _parse_resolver,
    "bool": _parse_bool,
    "tokens": _parse_tokens,
    "choice": _parse_choice,
    "no_embed_class": _parse_no_embed_class,
}


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
