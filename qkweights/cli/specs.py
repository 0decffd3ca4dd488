"""``specs``: the checkpoint families, one line each."""

from __future__ import annotations

from qkweights.spec import load_specs


def configure(p) -> None:
    pass


def run(args) -> int:
    specs = load_specs()
    width = max(len(n) for n in specs)
    for name, spec in specs.items():
        kind = "" if spec.modality == "vision" else f" [{spec.modality}: weights only]"
        print(f"{name:<{width}}  {spec.example:<48} {spec.description}{kind}")
    return 0
