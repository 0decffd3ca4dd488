"""The ``[dims]`` language of spec files: resolvers, and their evaluation against a config and a tensor store.

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

:mod:`qkweights.specs.schema` checks a spec's resolvers against this table when the spec loads;
:class:`Resolver` evaluates them when a checkpoint is opened (:mod:`qkweights.specs.dims`).
An unresolved dimension is a KeyError here; the callers word the message.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

# What a resolver read, in Resolver.read: (TENSORS, tensor name), (CONFIG, config key) or SPEC_VALUE (a literal or a
# table entry of the spec itself); the last entry is where a dimension's value came from
# (:class:`qkweights.specs.dims.Origin`).
TENSORS, CONFIG = "tensors", "config"
SPEC_VALUE = ("spec", None)


def _r_value(ctx: Resolver, r: dict):
    ctx.read.append(SPEC_VALUE)
    return r["value"]


def _r_config(ctx: Resolver, r: dict):
    return ctx.config_value(r["config"], root=r.get("root", True))


def _r_shape(ctx: Resolver, r: dict):
    name = ctx.prefix + r["shape"].format(i=0)
    if name not in ctx.store:
        raise KeyError(name)
    ctx.read.append((TENSORS, f"{name} shape[{r.get('axis', 0)}]"))
    return ctx.store.shape(name)[r.get("axis", 0)]


def _r_count(ctx: Resolver, r: dict):
    n = 0
    while ctx.prefix + r["count"].format(i=n) in ctx.store:
        n += 1
    if n == 0:
        raise KeyError(r["count"])
    ctx.read.append((TENSORS, f"the number of layers holding {ctx.prefix + r['count']}"))
    return n


def _r_div(ctx: Resolver, r: dict):
    a, b = (ctx(x) for x in r["div"])
    return a // b


def _r_mul(ctx: Resolver, r: dict):
    a, b = (ctx(x) for x in r["mul"])
    return a * b


def _r_relative_window(ctx: Resolver, r: dict):
    return relative_window(int(ctx(r["relative_window"])))


def _r_lookup(ctx: Resolver, r: dict):
    key = str(ctx(r["lookup"]))
    if key not in r["table"]:
        raise KeyError(f"{key} (not among {', '.join(r['table'])})")
    ctx.read.append(SPEC_VALUE)  # the value is the spec's table entry
    return r["table"][key]


def _r_match(ctx: Resolver, r: dict):
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

    evaluate: Callable[[Resolver, dict], Any]
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


def config_key(r) -> str | None:
    """The first config key a dimension resolver reads, for messages ("num_attention_heads")."""
    if isinstance(r, str):
        return r
    if isinstance(r, list):
        return next((k for k in map(config_key, r) if k), None)
    return r.get("config") if isinstance(r, dict) else None


def get_dotted(cfg: dict, dotted: str):
    """The value at the dotted key path ``dotted`` of ``cfg`` ("vision_config.hidden_size"); KeyError when absent."""
    cur = cfg
    for part in dotted.split("."):
        if not isinstance(cur, dict) or part not in cur:
            raise KeyError(dotted)
        cur = cur[part]
    return cur


class Resolver:
    """Evaluates dimension resolvers (checked when the spec loaded) against a config and a tensor store."""

    def __init__(self, config_root: str, config: dict, store, prefix: str):
        self.config_root, self.config, self.store, self.prefix = config_root, config, store, prefix
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
        if root and self.config_root:
            base = get_dotted(self.config, self.config_root)
        value = get_dotted(base, dotted)
        self.read.append((CONFIG, f"{self.config_root}.{dotted}" if root and self.config_root else dotted))
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
