"""``specs``: the checkpoint families, one line each, with the file each comes from."""

from __future__ import annotations

from qkweights.cli.common import add_spec_dir_argument
from qkweights.specs.registry import load_specs


def configure(p) -> None:
    add_spec_dir_argument(p)


def run(args) -> int:
    specs = load_specs(spec_dir=args.spec_dir)
    width = max(len(n) for n in specs)
    for name, spec in specs.items():
        kind = "" if spec.modality == "vision" else f" [{spec.modality}: weights only]"
        print(f"{name:<{width}}  {spec.example:<48} {spec.description}{kind}  ({spec.origin()})")
    return 0
