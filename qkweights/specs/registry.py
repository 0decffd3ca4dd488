"""The registry of families: the shipped spec files, the user's spec folders, and what the specs declare.

Adding a family means adding a spec file, in ``model_specs/`` or in a user folder (``spec_dir=``,
``QKWEIGHTS_SPEC_PATH``): :func:`load_specs` reads them all, each parsed by :func:`qkweights.specs.schema.parse_spec`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import sys
from importlib import resources
from pathlib import Path

from qkweights.errors import SpecError
from qkweights.specs.schema import Spec, parse_spec

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

SPEC_PATH_ENV = "QKWEIGHTS_SPEC_PATH"  # user spec folders, os.pathsep-separated


def builtin_spec_dir() -> Path:
    """The folder of the shipped spec files: ``model_specs/`` of a source checkout, else the installed copy."""
    checkout = Path(__file__).resolve().parents[2] / "model_specs"
    if checkout.is_dir():
        return checkout
    return Path(str(resources.files("qkweights.model_specs")))


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
    specs = _read_folder(Path(folder) if folder is not None else builtin_spec_dir(), user=False)
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
