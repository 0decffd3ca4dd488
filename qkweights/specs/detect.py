"""Family detection: which spec (and tensor-name prefix) reads a checkpoint.

A spec's ``[detect]`` table names its signature tensors and the config ``model_type`` or keys it expects;
:func:`detect_family` tries every spec, and when none matches names the closest families and why.
"""

from __future__ import annotations

import dataclasses
import difflib

from qkweights.errors import SpecError
from qkweights.specs.schema import Spec


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
