"""Errors and warnings of qkweights.

Every error carries a one-line message that names the problem and the fix, worded for the
Python API (``family=…``, ``part=…``); the command line words options as flags and maps
errors to exit codes (:mod:`qkweights.cli`). Each class also inherits the closest builtin,
so callers may catch either (``except FileNotFoundError`` catches a missing file whatever
raised it).
"""


class QkError(Exception):
    """Base class: a problem with the user's input or environment."""


class SourceError(QkError, FileNotFoundError):
    """The model could not be found or fetched (repo, revision, cache, folder)."""


class CheckpointError(QkError, ValueError):
    """A weight file is corrupt, truncated, unsafe or lacks a tensor."""


class SpecError(QkError, ValueError):
    """No spec matches the checkpoint, or a spec file is malformed."""


class InputError(QkError, ValueError):
    """An option value or an input file (image, mask, profile) is unusable."""


class QkWarning(UserWarning):
    """A note for the user, not an error: a choice made for them while reading their input.

    :mod:`qkweights.workflow` hands these to its reporter's ``note``; without one they are
    ordinary Python warnings.
    """
