"""A checkpoint's dimensions: its spec's ``[dims]`` resolved against its config and tensors, typed and checked.

:func:`resolve_dims` gives the :class:`Dims` and, for each dimension, its :class:`Origin` (the config key,
the tensor or the spec entry it came from, for messages that say what to fix).
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass

from qkweights.errors import CheckpointError, SpecError
from qkweights.specs.resolvers import CONFIG, TENSORS, Resolver, config_key
from qkweights.specs.schema import INTERPOLATIONS, Spec


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
        """The origin of dimension ``key`` whose resolver last read ``read`` (an entry of
        :attr:`qkweights.specs.resolvers.Resolver.read`)."""
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


def resolve_dims(
    spec: Spec, store, config: dict, configs: dict[str, dict], prefix: str
) -> tuple[Dims, dict[str, Origin]]:
    """The dimensions of the checkpoint ``store`` (tensor names under ``prefix``) with config ``config`` (of the
    ``configs`` beside the weights), as ``spec``'s ``[dims]`` resolvers give them, checked against each other and
    the tensors; and where each came from (dimension → :class:`Origin`). Raises SpecError (a dimension that cannot
    be resolved) or CheckpointError (one of the wrong type, or dimensions that do not fit together)."""
    resolve = Resolver(spec.config_root, config, store, prefix)
    values, unresolved, origin = {}, {}, {}
    where = spec.config_file or "config"
    label = spec.label
    for f in dataclasses.fields(spec.dims):
        key, r = f.name, getattr(spec.dims, f.name)
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
        origin[key] = Origin.of(spec, key, resolve.read[-1])  # every resolver that gives a value reads
        values[key] = _typed(spec, key, value, origin[key])
    if unresolved:
        key, looked = next(iter(unresolved.items()))
        if spec.config_file and spec.config_file not in configs:
            heads = config_key(spec.dims.heads)
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
    _check_layer_count(spec, store, prefix, values["layers"], origin["layers"])
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
    dims = Dims(
        layers=values.pop("layers"),
        hidden=hidden,
        heads=heads,
        head_dim=head_dim,
        eps=values.get("eps"),
        act=values.get("act"),
        patch_size=values.get("patch_size"),
        image_size=image,
        swiglu=values.get("swiglu", False),
        interpolation=values.get("interpolation", "bicubic"),
    )
    return dims, origin


def _check_layer_count(spec: Spec, store, prefix: str, layers: int, origin: Origin) -> None:
    """Refuse a layer count that disagrees with the layers whose attention weights are in the files."""
    att = spec.attention
    template = (att.qkv or att.q).weight
    held = 0
    while prefix + template.format(i=held) in store:
        held += 1
    if held != layers:
        raise CheckpointError(
            f"{spec.label}: {origin.text} is {layers}, but the weight files hold {held} "
            f"layer{'s' * (held != 1)} ({prefix + template.format(i='N')}); {origin.fix} or choose another "
            "family=NAME"
        )
