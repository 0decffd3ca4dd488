"""Checkpoint families as data: ``model_specs/*.toml`` → per-head ``W_q``/``W_k``.

A spec names a family's tensors with ``{i}`` templates and says where the
dimensions come from. :func:`open_checkpoint` detects the family of a
checkpoint (config ``model_type``/``architecture`` and signature tensors),
resolves the dimensions, and returns a :class:`Checkpoint` through which every
other module reads weights by *role* (``"q"``, ``"norm1"``, ``"patch"``, …),
never by name. Adding a family means adding a spec file.

Dimension resolvers (values in a spec's ``[dims]`` table):

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

import difflib
import json
import math
import sys
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

import numpy as np

from qkweights.errors import CheckpointError, SpecError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

CONFIG_FILES = ("config.json", "preprocessor_config.json", "open_clip_config.json")


@dataclass(frozen=True)
class Spec:
    """One family, as its TOML file says (see ``model_specs/README.md``)."""

    name: str
    description: str
    example: str
    modality: str  # "vision" (forward pass available) or "text" (weights only)
    config_file: str | None
    config_root: str
    prefixes: tuple[str, ...]
    detect: dict
    dims: dict
    attention: dict
    block: dict
    embeddings: dict
    preprocess: dict
    logit_terms: tuple[str, ...]  # additive logit terms the weight SVD does not see
    path: Path


def _spec_from_toml(path: Path, data: dict) -> Spec:
    try:
        return Spec(
            name=data["name"],
            description=data["description"],
            example=data["example"],
            modality=data.get("modality", "vision"),
            config_file=data.get("config_file"),
            config_root=data.get("config_root", ""),
            prefixes=tuple(data.get("prefixes", [""])),
            detect=data.get("detect", {}),
            dims=data["dims"],
            attention=data["attention"],
            block=data.get("block", {}),
            embeddings=data.get("embeddings", {}),
            preprocess=data.get("preprocess", {}),
            logit_terms=tuple(data.get("logit_terms", [])),
            path=path,
        )
    except KeyError as e:
        raise SpecError(f"{path.name}: missing required key {e.args[0]!r}; see model_specs/README.md") from None


def spec_dir() -> Path:
    """The folder of the spec files: ``model_specs/`` of a source checkout, else the installed copy."""
    checkout = Path(__file__).resolve().parent.parent / "model_specs"
    if checkout.is_dir():
        return checkout
    return Path(str(resources.files("qkweights.model_specs")))


def load_specs(folder: Path | None = None) -> dict[str, Spec]:
    """All specs in ``folder`` (default: the shipped ones), by name, in file-name order."""
    folder = folder or spec_dir()
    specs = {}
    for path in sorted(Path(folder).glob("*.toml")):
        try:
            data = tomllib.loads(path.read_text())
        except tomllib.TOMLDecodeError as e:
            raise SpecError(f"{path.name}: invalid TOML ({e})") from None
        spec = _spec_from_toml(path, data)
        if spec.name != path.stem:
            raise SpecError(f"{path.name}: name {spec.name!r} differs from the file name; rename one of them")
        specs[spec.name] = spec
    return specs


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
    extra: dict = field(default_factory=dict)


# The type of each resolved dimension: (check, what the message asks for). Others (spec extras) pass as they are.
_INT = (lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 1, "a positive integer")
_DIM_TYPES = {
    "layers": _INT, "hidden": _INT, "heads": _INT, "head_dim": _INT, "patch_size": _INT,
    "eps": (lambda v: isinstance(v, (int, float)) and not isinstance(v, bool) and 0 < v < 1, "a number between 0 and 1"),
    "act": (lambda v: isinstance(v, str), "a text such as \"gelu\""),
    "swiglu": (lambda v: isinstance(v, bool), "true or false"),
    "image_size": (lambda v: _INT[0](v) or (isinstance(v, list) and 2 <= len(v) <= 3 and all(_INT[0](x) for x in v)),
                   "a positive integer or a list [height, width]"),
}


def _config_key(r) -> str | None:
    """The first config key a dimension resolver reads, for messages ("num_attention_heads")."""
    if isinstance(r, str):
        return r
    if isinstance(r, list):
        return next((k for k in map(_config_key, r) if k), None)
    return r.get("config") if isinstance(r, dict) else None


def _typed(spec: Spec, key: str, value, origin: str):
    """``value`` of dimension ``key`` if it has the right type (a float that is a whole number counts as an
    integer); otherwise a CheckpointError naming where it came from."""
    check, wanted = _DIM_TYPES.get(key, (lambda v: True, ""))
    if isinstance(value, float) and value.is_integer() and check is _INT[0]:
        value = int(value)
    if isinstance(value, list):
        value = [int(x) if isinstance(x, float) and x.is_integer() else x for x in value]
    if not check(value):
        shown = json.dumps(value, ensure_ascii=False) if value is not None else "not usable"
        raise CheckpointError(f"{spec.name}: {origin} is {shown}; it must be {wanted} ({key}); fix the config")
    return value


def _get_path(cfg: dict, dotted: str):
    cur = cfg
    for part in dotted.split("."):
        if not isinstance(cur, dict) or part not in cur:
            raise KeyError(dotted)
        cur = cur[part]
    return cur


class _Resolver:
    """Evaluates dimension resolvers against a config and a tensor store."""

    def __init__(self, spec: Spec, config: dict, store, prefix: str):
        self.spec, self.config, self.store, self.prefix = spec, config, store, prefix
        self.read: list[str] = []  # the config keys read, for messages about their values

    def __call__(self, r):
        if isinstance(r, bool) or isinstance(r, (int, float)):
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
        if isinstance(r, dict):
            if "value" in r:
                return r["value"]
            if "config" in r:
                return self.config_value(r["config"], root=r.get("root", True))
            if "shape" in r:
                name = self.prefix + r["shape"].format(i=0)
                if name not in self.store:
                    raise KeyError(name)
                return self.store.shape(name)[r.get("axis", 0)]
            if "count" in r:
                n = 0
                while self.prefix + r["count"].format(i=n) in self.store:
                    n += 1
                if n == 0:
                    raise KeyError(r["count"])
                return n
            if "div" in r:
                a, b = (self(x) for x in r["div"])
                return a // b
            if "mul" in r:
                a, b = (self(x) for x in r["mul"])
                return a * b
            if "relative_window" in r:
                return relative_window(int(self(r["relative_window"])))
            if "lookup" in r:
                key = str(self(r["lookup"]))
                if key not in r["table"]:
                    raise KeyError(f"{key} (not among {', '.join(r['table'])})")
                return r["table"][key]
            if "match" in r:
                value = str(self(r["match"])).lower()
                for key in sorted(r["table"], key=len, reverse=True):
                    if key.lower() in value:
                        return r["table"][key]
                raise KeyError(f"{value} (none of {', '.join(r['table'])})")
        raise SpecError(f"{self.spec.path.name}: cannot read dimension resolver {r!r}; see model_specs/README.md")

    def config_value(self, dotted: str, root: bool):
        base = self.config
        if root and self.spec.config_root:
            base = _get_path(self.config, self.spec.config_root)
        value = _get_path(base, dotted)
        self.read.append(f"{self.spec.config_root}.{dotted}" if root and self.spec.config_root else dotted)
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


def _signature_prefix(spec: Spec, store) -> str | None:
    """The first prefix under which all of the spec's signature tensors exist, at least one of its
    ``require_any`` ones (when listed), and none of its forbidden ones."""
    require = [t.format(i=0) for t in spec.detect.get("require", [])]
    require_any = [t.format(i=0) for t in spec.detect.get("require_any", [])]
    forbid = [t.format(i=0) for t in spec.detect.get("forbid", [])]
    for prefix in spec.prefixes:
        if (all(prefix + t in store for t in require) and not any(prefix + t in store for t in forbid)
                and (not require_any or any(prefix + t in store for t in require_any))):
            return prefix
    return None


def _signature_text(spec: Spec) -> str:
    """The signature tensors of a spec for messages: "a, b" or "a, b, one of c | d"."""
    names = list(spec.detect.get("require", []))
    if spec.detect.get("require_any"):
        names.append("one of " + " | ".join(spec.detect["require_any"]))
    return ", ".join(names)


def _config_matches(spec: Spec, configs: dict[str, dict]) -> bool:
    det = spec.detect
    cfg = configs.get(spec.config_file or "", None)
    if cfg is None:
        return False
    if "model_type" in det and cfg.get("model_type") not in det["model_type"]:
        return False
    if "config_has" in det and not all(k in cfg for k in det["config_has"]):
        return False
    return any(k in det for k in ("model_type", "config_has"))


def detect_family(store, configs: dict[str, dict], specs: dict[str, Spec], family: str | None = None) -> tuple[Spec, str]:
    """Choose the spec (and tensor-name prefix) for a checkpoint.

    With ``family`` given, only that spec is tried. Otherwise a spec matches
    when its config test passes (if the checkpoint has that config file) and
    its signature tensors are present; config matches win over signature-only
    matches. Raises :class:`SpecError` listing the families and the names
    looked for.
    """
    if family is not None:
        if family not in specs:
            close = difflib.get_close_matches(family, list(specs), n=3, cutoff=0.0)
            raise SpecError(f"unknown family {family!r} (closest: {', '.join(close)}); `python -m qkweights specs` lists them all")
        candidates = [specs[family]]
    else:
        candidates = list(specs.values())
    by_config, by_signature = [], []
    for spec in candidates:
        prefix = _signature_prefix(spec, store)
        if prefix is None:
            continue
        (by_config if _config_matches(spec, configs) else by_signature).append((spec, prefix))
    found = by_config or by_signature
    if len(found) == 1 or (found and family is not None):
        return found[0]
    if len(found) > 1:
        names = ", ".join(s.name for s, _ in found)
        raise SpecError(f"the checkpoint matches several families ({names}); choose one with --family")
    in_memory = _in_memory_match(store, [specs[family]] if family is not None else list(specs.values()))
    if in_memory is not None:
        raise SpecError(f"transformers ≥ 5 in-memory names ({in_memory}), not the names save_pretrained writes; "
                        f"save the model with save_pretrained() instead of torch.save(state_dict)")
    if family is not None:
        looked = _signature_text(specs[family])
        raise SpecError(f"the checkpoint is not of family {family!r}: it lacks one of {looked} (with prefixes {', '.join(repr(p) for p in specs[family].prefixes)})")
    close = _closest(store, specs)
    spec, prefix = close[0]
    missing = [prefix + t.format(i=0) for t in spec.detect.get("require", []) if prefix + t.format(i=0) not in store]
    extra = [prefix + t.format(i=0) for t in spec.detect.get("forbid", []) if prefix + t.format(i=0) in store]
    why = (f"which lacks {missing[0]}" if missing else f"which must not hold {extra[0]}" if extra
           else f"which lacks {_signature_text(spec)}")
    others = "".join(f", {s.name}" for s, _ in close[1:])
    raise SpecError(f"unknown checkpoint: no family matches its tensors (closest: {spec.name}, {why}{others}); "
                    f"pass --family (`python -m qkweights specs` lists them) or add a spec file")


def _in_memory_match(store, specs: list[Spec]) -> str | None:
    """The first ``detect.in_memory`` tensor name of the first spec whose in-memory names (transformers ≥ 5
    module names, as ``torch.save(model.state_dict())`` writes them) all exist under one of its prefixes, else None."""
    for spec in specs:
        names = [t.format(i=0) for t in spec.detect.get("in_memory", [])]
        for prefix in spec.prefixes if names else ():
            if all(prefix + t in store for t in names):
                return prefix + names[0]
    return None


def _closest(store, specs: dict[str, Spec], n: int = 3) -> list[tuple[Spec, str]]:
    """The ``n`` specs whose tensor names share the most name parts with the checkpoint's, best first (ties by
    name), each with the prefix under which most of its signature tensors exist."""
    have = {part for name in store.names() for part in name.split(".") if not part.isdigit()}
    scored = []
    for spec in specs.values():
        templates = list(spec.detect.get("require", []))
        for section in (spec.attention, spec.block, spec.embeddings):
            for ref in section.values():
                templates += [ref] if isinstance(ref, str) else [ref.get("weight", "")] if isinstance(ref, dict) else []
        parts = {p for t in templates for p in t.split(".") if p and p not in ("{i}", "weight", "bias")}
        share = len(parts & have) / max(len(parts), 1)
        require = [t.format(i=0) for t in spec.detect.get("require", [])]
        prefix = max(spec.prefixes, key=lambda p: sum(p + t in store for t in require))
        scored.append((-share, spec.name, spec, prefix))
    return [(spec, prefix) for _, _, spec, prefix in sorted(scored, key=lambda x: x[:2])[:n]]


def _module(ref, i: int | None) -> tuple[str, str | None]:
    """A spec module reference → (weight name, bias name) with ``{i}`` filled."""
    fmt = (lambda s: s.format(i=i)) if i is not None else (lambda s: s)
    if isinstance(ref, str):
        return fmt(ref + ".weight"), fmt(ref + ".bias")
    return fmt(ref["weight"]), (fmt(ref["bias"]) if ref.get("bias") else None)


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


class Checkpoint:
    """A checkpoint read through its family's spec: weights by role, dims resolved."""

    def __init__(self, spec: Spec, store, config: dict, configs: dict[str, dict], prefix: str):
        self.spec, self.store, self.config, self.configs, self.prefix = spec, store, config, configs, prefix
        self.dims = self._resolve_dims()

    def _resolve_dims(self) -> Dims:
        resolve = _Resolver(self.spec, self.config, self.store, self.prefix)
        values, unresolved, origin = {}, {}, {}
        where = self.spec.config_file or "config"
        for key, r in self.spec.dims.items():
            resolve.read = []
            try:
                value = resolve(r)
            except KeyError as e:
                unresolved[key] = e.args[0]
                continue
            except (TypeError, ValueError, ZeroDivisionError):  # e.g. {div = [hidden, heads]} of a text
                value = None
            origin[key] = f"{where} {resolve.read[-1]}" if resolve.read else "the tensors"
            values[key] = _typed(self.spec, key, value, origin[key])
        if unresolved:
            key, looked = next(iter(unresolved.items()))
            if self.spec.config_file and self.spec.config_file not in self.configs:
                heads = _config_key(self.spec.dims.get("heads"))
                raise SpecError(f"{self.spec.name}: no {where} beside the weights; the head count ({heads or 'heads'}) cannot be read "
                                f"from the tensors: put the model's {where} next to the weight file, or pass the folder that holds both")
            raise SpecError(f"{self.spec.name}: cannot determine {key!r} (looked for {looked} in {where} and the tensors); add it to {where} or pass --family")
        for key in ("layers", "hidden", "heads"):
            if key not in values:
                raise SpecError(f"{self.spec.path.name}: [dims] must give {key!r}")
        self._check_layer_count(values["layers"], origin["layers"])
        hidden, heads = values.pop("hidden"), values.pop("heads")
        if hidden % heads:
            raise CheckpointError(f"{self.spec.name}: {heads} heads do not divide the width {hidden}; fix num_heads in the config or choose another --family")
        image = values.pop("image_size", None)
        if isinstance(image, (list, tuple)):
            image = tuple(image[-2:])  # (H, W), or timm's (C, H, W)
        elif image is not None:
            image = (image, image)
        known = {"layers", "eps", "act", "patch_size", "swiglu", "head_dim"}
        head_dim = values.pop("head_dim", hidden // heads)
        if head_dim * heads != hidden:
            raise CheckpointError(f"{self.spec.name}: {heads} heads of width {head_dim} do not make the width {hidden}; the config disagrees with the tensors")
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
            extra={k: v for k, v in values.items() if k not in known},
        )

    def _check_layer_count(self, layers: int, origin: str) -> None:
        """Refuse a layer count that disagrees with the layers whose attention weights are in the files."""
        att = self.spec.attention
        role = "qkv" if "qkv" in att else "q"
        if role not in att:
            return
        template = _module(att[role], None)[0]
        held = 0
        while self.prefix + template.format(i=held) in self.store:
            held += 1
        if held != layers:
            raise CheckpointError(f"{self.spec.name}: {origin} is {layers}, but the weight files hold {held} layer{'s' * (held != 1)} "
                                  f"({self.prefix + template.format(i='N')}); fix the config or choose another --family")

    # names -----------------------------------------------------------------

    def name(self, template: str, i: int | None = None) -> str:
        """The full tensor name of ``template`` for layer ``i``."""
        return self.prefix + (template.format(i=i) if i is not None else template)

    def has(self, template: str, i: int | None = None) -> bool:
        return self.name(template, i) in self.store

    def tensor(self, template: str, i: int | None = None) -> np.ndarray:
        return self.store.get(self.name(template, i))

    def module(self, section: str, role: str, i: int | None = None) -> tuple[np.ndarray, np.ndarray | None]:
        """(weight, bias or None) of the module the spec names ``role`` in ``section``."""
        table = getattr(self.spec, section)
        if role not in table:
            raise SpecError(f"{self.spec.path.name}: [{section}] has no {role!r}")
        w, b = _module(table[role], i)
        bias = self.store.get(self.prefix + b) if b and self.prefix + b in self.store else None
        return self.store.get(self.prefix + w), bias

    def has_role(self, section: str, role: str, i: int | None = None) -> bool:
        """Whether the spec names ``role`` and its weight is in the checkpoint."""
        table = getattr(self.spec, section)
        return role in table and self.prefix + _module(table[role], i)[0] in self.store

    def attention_names(self, i: int) -> list[str]:
        """The tensor names read by :meth:`qk` for layer ``i`` (present ones)."""
        att = self.spec.attention
        roles = ["qkv"] if "qkv" in att else ["q", "k"]
        names = []
        for role in roles:
            names += [self.prefix + n for n in _module(att[role], i) if n]
        names += [self.prefix + att[r].format(i=i) for r in ("q_bias", "k_bias") if r in att]
        return [n for n in names if n in self.store]

    # attention ---------------------------------------------------------------

    def qk(self, i: int) -> QK:
        """Per-head query and key weights and biases of layer ``i`` (float64).

        Separate projections are stored (out, in) = (D, D), head h in rows
        h·K … (h+1)·K−1; fused ones are (3D, D) with rows [q | k | v].
        """
        d, h, k = self.dims.hidden, self.dims.heads, self.dims.head_dim
        att = self.spec.attention
        if "qkv" in att:
            w, b = self.module("attention", "qkv", i)
            self._check_shape(w, (3 * d, d), "qkv", i)
            wq, wk = w[:d], w[d : 2 * d]
            bq, bk = (b[:d], b[d : 2 * d]) if b is not None else (None, None)
        else:
            wq, bq = self.module("attention", "q", i)
            wk, bk = self.module("attention", "k", i)
            self._check_shape(wq, (d, d), "q", i)
            self._check_shape(wk, (d, d), "k", i)
        if "q_bias" in att and self.has(att["q_bias"], i):
            bq = self.tensor(att["q_bias"], i)
        if "k_bias" in att and self.has(att["k_bias"], i):
            bk = self.tensor(att["k_bias"], i)
        zeros = np.zeros(d)
        return QK(
            wq=np.asarray(wq, np.float64).reshape(h, k, d),  # (H, K, D)
            wk=np.asarray(wk, np.float64).reshape(h, k, d),
            bq=np.asarray(zeros if bq is None else bq, np.float64).reshape(h, k),  # (H, K)
            bk=np.asarray(zeros if bk is None else bk, np.float64).reshape(h, k),
        )

    def ov_unavailable(self, i: int) -> str | None:
        """Why :meth:`ov` cannot give layer ``i``'s per-head value/output weights, or None when it can."""
        att, d = self.spec.attention, self.dims.hidden
        for role in ("qkv",) if "qkv" in att else ("v",):
            if role not in att:
                return f"the spec names no value projection ([attention] v or qkv in {self.spec.path.name})"
        if "out" not in att:
            return f"the spec names no attention output projection ([attention] out in {self.spec.path.name})"
        for role, shape in (("qkv" if "qkv" in att else "v", (3 * d, d) if "qkv" in att else (d, d)), ("out", (d, d))):
            if not self.has_role("attention", role, i):
                return f"the checkpoint lacks {self.prefix + _module(att[role], i)[0]}"
            got = self.store.shape(self.prefix + _module(att[role], i)[0])
            if tuple(got) != shape:
                return f"layer {i} {role} weight has shape {tuple(got)}, not {shape}: the spec cannot give it per head"
        return None

    def ov(self, i: int) -> OV:
        """Per-head value and output weights and biases of layer ``i`` (float64), read as the forward pass reads them.

        The value rows are those of :func:`qkweights.vision.value_weights` (a separate ``v``
        module, or rows 2D…3D of the fused ``qkv``; a ``v_bias`` tensor overrides the bias);
        ``out`` is stored (out, in) = (D, D), head h's input columns h·K … (h+1)·K−1.
        Raises CheckpointError when :meth:`ov_unavailable` gives a reason.
        """
        why = self.ov_unavailable(i)
        if why is not None:
            raise CheckpointError(f"{self.spec.name}: no value-output circuit for layer {i}: {why}")
        d, h, k = self.dims.hidden, self.dims.heads, self.dims.head_dim
        att = self.spec.attention
        if "qkv" in att:
            w, b = self.module("attention", "qkv", i)
            wv, bv = w[2 * d :], (b[2 * d :] if b is not None else None)
        else:
            wv, bv = self.module("attention", "v", i)
        if "v_bias" in att and self.has(att["v_bias"], i):
            bv = self.tensor(att["v_bias"], i)
        wo, bo = self.module("attention", "out", i)
        zeros = np.zeros(d)
        return OV(
            # (H, D, K) as a view of the contiguous (H, K, D) W_o,hᵀ: the layout the QR of the SVD reads fastest
            wo=np.ascontiguousarray(np.asarray(wo, np.float64).reshape(d, h, k).transpose(1, 2, 0)).transpose(0, 2, 1),
            wv=np.asarray(wv, np.float64).reshape(h, k, d),  # (H, K, D)
            bv=np.asarray(zeros if bv is None else bv, np.float64).reshape(h, k),  # (H, K)
            bo=np.asarray(zeros if bo is None else bo, np.float64),  # (D,)
        )

    def norm1(self, i: int) -> LayerNormWeights | None:
        """The LayerNorm feeding layer ``i``'s attention (``[block] norm1``), or None when the spec or the checkpoint has none.

        Post-norm families (BERT: the LayerNorm sits after the attention) and weights-only
        specs without a ``[block]`` table have none.
        """
        if not self.has_role("block", "norm1", i):
            return None
        w, b = self.module("block", "norm1", i)
        d = self.dims.hidden
        if w.shape != (d,) or (b is not None and b.shape != (d,)):
            raise CheckpointError(f"{self.spec.name}: layer {i} norm1 has shape {w.shape}/{None if b is None else b.shape}, expected ({d},); the config does not fit the tensors")
        return LayerNormWeights(np.asarray(w, np.float64), np.zeros(d) if b is None else np.asarray(b, np.float64), b is not None)

    def _check_shape(self, w: np.ndarray, expected: tuple[int, ...], role: str, i: int) -> None:
        if w.shape != expected:
            raise CheckpointError(f"{self.spec.name}: layer {i} {role} weight has shape {w.shape}, expected {expected} from the config (hidden {self.dims.hidden}); the config does not fit the tensors")

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


def open_checkpoint(store, config_files: dict[str, Path], *, family: str | None = None, specs: dict[str, Spec] | None = None) -> Checkpoint:
    """Detect the family of ``store`` (with its config files) and bind the spec."""
    specs = specs or load_specs()
    configs = read_configs(config_files)
    spec, prefix = detect_family(store, configs, specs, family)
    return Checkpoint(spec, store, configs.get(spec.config_file or "", {}), configs, prefix)
