"""Errors of qkweights, and the exit codes the CLI maps them to.

Every error carries a one-line message that names the problem and the fix.
Each class also inherits the closest builtin, so callers may catch either
(``except FileNotFoundError`` catches a missing file whatever raised it).
"""

EXIT_OK = 0
EXIT_FINDINGS = 1
EXIT_USAGE = 2


class QkError(Exception):
    """Base class: a problem with the user's input or environment (exit code 2)."""

    exit_code = EXIT_USAGE


class SourceError(QkError, FileNotFoundError):
    """The model could not be found or fetched (repo, revision, cache, folder)."""


class CheckpointError(QkError, ValueError):
    """A weight file is corrupt, truncated, unsafe or lacks a tensor."""


class SpecError(QkError, ValueError):
    """No spec matches the checkpoint, or a spec file is malformed."""


class InputError(QkError, ValueError):
    """A command-line value or an input file (image, mask, profile) is unusable."""
