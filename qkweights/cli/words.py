"""The library words options as the Python API does (``part=encoder``, ``fold_ln=True``); the command line as flags.

:func:`flag_words` turns the first into the second in every error and note the command line
writes, so the library never spells a flag and the user always reads one. An option is
recognised with its value (``name=value``), or alone when its name has an underscore
(``(from spec_dir)``): no English word has one.
"""

from __future__ import annotations

import re

# The keyword options of the API that the command line offers as flags (``name`` → ``--name`` with - for _).
OPTIONS = (
    "allow_pickle",
    "batch_size",
    "embedding",
    "family",
    "fold_ln",
    "heads",
    "k",
    "labels",
    "layers",
    "max_images",
    "max_mb",
    "modes",
    "part",
    "revision",
    "save_vectors",
    "shard_size",
    "spec_dir",
    "tol_head",
    "tol_layer",
    "tol_ov",
    "tol_sigma",
    "thumb_px",
    "thumbs",
    "tol_symmetry",
    "top",
    "top_sigma",
    "workers",
)
_OPTION = re.compile(r"(?<![\w.'\"-])(" + "|".join(sorted(OPTIONS, key=len, reverse=True)) + r")=([^\s,;:)]*)")
# Alone: not inside a path, a quoted key, a longer name or a file name ("spec_dir.toml"); a full stop may follow.
_ALONE = re.compile(
    r"(?<![\w.'\"/-])("
    + "|".join(sorted((o for o in OPTIONS if "_" in o), key=len, reverse=True))
    + r")(?![\w/'\"-]|\.\w)"
)


def flag_words(text: str) -> str:
    """``part=encoder`` → ``--part encoder``; ``fold_ln=True`` → ``--fold-ln``; ``thumbs=False`` → ``--no-thumbs``;
    ``revision=…`` → ``--revision``; ``(from spec_dir)`` → ``(from --spec-dir)``."""

    def flag(m: re.Match) -> str:
        name, value = "--" + m.group(1).replace("_", "-"), m.group(2)
        if value == "False":
            return "--no-" + name[2:]
        return name if value in ("", "…", "True") else f"{name} {value}"

    return _ALONE.sub(lambda m: "--" + m.group(1).replace("_", "-"), _OPTION.sub(flag, text))
