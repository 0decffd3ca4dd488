"""The workflows: open a model, report through one callback protocol, compute, return results.

``qkweights.profile`` and every command of :mod:`qkweights.cli` call these functions; the
command line only parses arguments, draws progress bars, prints and picks exit codes.

**The callback protocol** is :class:`Reporter`. A workflow calls

- ``reporter.progress(task, done, total, unit)`` as work finishes: ``done`` of ``total``
  ``unit``\\ s of ``task`` ("profile", "check", "o3", "top-images", "same-object"), ``total``
  None while unknown;
- ``reporter.note(text)`` with one line the user should know: a choice made for them (the
  part read from a training checkpoint, the safetensors conversion branch used), a
  disagreement between config and tensors, a skipped input;
- ``reporter.stage(text)`` at the start of each stage of a long run (the demo).

``reporter.downloads`` says whether huggingface_hub may draw its own download bars (True) or
not (False, None). The base class is silent. Library modules that have something
to say while opening a model (:mod:`qkweights.specs.load`, :mod:`qkweights.checkpoints.hub`) issue a
:class:`~qkweights.errors.QkWarning`; the workflows hand those to ``reporter.note`` when the
reporter takes notes, and otherwise let them through as ordinary Python warnings.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib
import warnings
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from qkweights.checkpoints.folders import Source
from qkweights.errors import QkWarning
from qkweights.outputs import holds_output, record_outputs
from qkweights.specs.checkpoint import Checkpoint
from qkweights.specs.load import open_model, source_record
from qkweights.weights.compute import compute_profile
from qkweights.weights.load import load_profile
from qkweights.weights.profile import Profile

if TYPE_CHECKING:
    from qkweights.analyses.runner import SweepSettings
    from qkweights.analyses.sweep import ModeSelection
    from qkweights.weights.check import Tolerances

PROFILE_FILE = "profile.json"


class Reporter:
    """How a workflow reports while it works (see the module docstring); this base class is silent."""

    def __init__(self, *, downloads: bool | None = None):
        self.downloads = downloads

    def progress(self, task: str, done: int, total: int | None, unit: str) -> None:
        """``done`` of ``total`` ``unit``\\ s of ``task`` are finished."""

    def note(self, text: str) -> None:
        """One line the user should know."""

    def stage(self, text: str) -> None:
        """A long run starts the stage ``text``."""

    def counter(self, task: str, unit: str):
        """``update(done, total=None)`` for the analyses' ``progress`` callbacks, reporting as ``task``."""
        return lambda done, total=None: self.progress(task, done, total, unit)

    def takes_notes(self) -> bool:
        """Whether :meth:`note` does anything (a subclass overrides it)."""
        return type(self).note is not Reporter.note


QUIET = Reporter()


@contextlib.contextmanager
def notes_to(reporter: Reporter | None) -> Iterator[None]:
    """Hand the :class:`QkWarning` notes issued inside the block to ``reporter.note``; other warnings pass on."""
    reporter = reporter or QUIET
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", QkWarning)
        yield
    for w in caught:
        if issubclass(w.category, QkWarning) and reporter.takes_notes():
            reporter.note(str(w.message))
        else:
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno, source=w.source)


def open_checkpoint(model: str, *, reporter: Reporter | None = None, **options) -> tuple[Source, Checkpoint]:
    """Resolve ``model`` (Hub id, folder or file) and bind its spec; notes go to ``reporter``.

    ``options``: ``revision``, ``family``, ``part``, ``allow_pickle`` (see :func:`qkweights.specs.load.open_model`).
    """
    reporter = reporter or QUIET
    with notes_to(reporter):
        return open_model(model, progress=reporter.downloads, **options)


def load_vision_model(model: str, *, reporter: Reporter | None = None, **options):
    """The vision tower of ``model`` for the forward pass (:class:`qkweights.vision.model.VisionModel`).

    Its notes (preprocessing defaults, config and tensors disagreeing) go to ``reporter`` too.
    """
    from qkweights.vision.model import open_vision_model

    reporter = reporter or QUIET
    with notes_to(reporter):
        vm = open_vision_model(model, **options)
    if reporter.takes_notes():
        for text in vm.notes:
            reporter.note(text)
    return vm


def profile_checkpoint(
    source: Source,
    ck: Checkpoint,
    *,
    save_vectors: bool = False,
    fold_ln: bool = False,
    reporter: Reporter | None = None,
    task: str = "profile",
    warm_figures: bool = False,
) -> Profile:
    """Profile every head of an opened checkpoint; ``progress(task, l, L, "layers")`` after each layer.

    The weight files are hashed (for the provenance record) while the math runs;
    ``warm_figures``: also import matplotlib meanwhile, for a caller about to draw.
    """
    reporter = reporter or QUIET
    with ThreadPoolExecutor(2) as background:  # hashing and importing release the GIL or wait on it
        record = background.submit(source_record, source, ck)
        if warm_figures:
            background.submit(importlib.import_module, "qkweights.figures.profiles")
        prof = compute_profile(
            ck, {}, save_vectors=save_vectors, progress=reporter.counter(task, "layers"), fold_ln=fold_ln
        )
        return dataclasses.replace(prof, source=record.result())


def profile(
    model: str, *, save_vectors: bool = False, fold_ln: bool = False, reporter: Reporter | None = None, **options
) -> Profile:
    """Open ``model`` and profile every head (:func:`profile_checkpoint`); ``options`` as :func:`open_checkpoint`."""
    source, ck = open_checkpoint(model, reporter=reporter, **options)
    return profile_checkpoint(source, ck, save_vectors=save_vectors, fold_ln=fold_ln, reporter=reporter)


def save_profile(
    prof: Profile, out: str | Path, *, plots: bool = True, checkpoint: Checkpoint | None = None
) -> list[Path]:
    """Write ``prof`` (:meth:`Profile.save`) and, with ``plots``, its figures into ``out``; return the paths.

    ``checkpoint``: the one ``prof`` was computed from; with it, a LayerNorm-folded profile also
    gets ``fold_cosine_by_layer.png`` against the plain profile of the same weights.
    """
    out = Path(out)
    written = prof.save(out)
    if plots:
        from qkweights.figures.profiles import profile_figures

        written += profile_figures(prof, out)
        if prof.model.folded and checkpoint is not None:
            from qkweights.figures.compare import fold_comparison

            plain = dataclasses.replace(compute_profile(checkpoint, {}), source=prof.source)
            written += fold_comparison(prof, plain, out)
        record_outputs(out, "profile", written)
    return written


def saved_file(item: str | Path, names: tuple[str, ...] = (PROFILE_FILE,)) -> Path | None:
    """``item`` as a saved result: a ``.json`` file, or a folder holding one of ``names``; None for a model."""
    path = Path(item)
    if path.suffix == ".json" or (path.is_dir() and any((path / name).is_file() for name in names)):
        return path
    return None


def check(
    model: str,
    baseline: str | Path,
    *,
    reporter: Reporter | None = None,
    model_options: dict | None = None,
    tolerances: Tolerances | None = None,
):
    """Profile ``model`` and check it against the saved ``baseline`` (:func:`qkweights.weights.check.check_profile`).

    ``baseline``: a profile.json or the folder holding it, read first so a bad path, or a
    baseline with non-finite or collapsed heads, fails before the weights are read; the current
    profile is LayerNorm-folded when the baseline is. ``model_options``: as :func:`open_checkpoint`;
    ``tolerances``: a :class:`~qkweights.weights.check.Tolerances` (None: its defaults).
    """
    from qkweights.weights.check import Tolerances, check_baseline, check_profile, collapse_causes

    base = load_profile(baseline, vectors=False)
    check_baseline(base)
    source, ck = open_checkpoint(model, reporter=reporter, **(model_options or {}))
    current = profile_checkpoint(source, ck, fold_ln=bool(base.model.folded), reporter=reporter, task="check")
    bad = set(current.nonfinite)
    collapsed = [
        (int(l), int(h)) for l, h in zip(*np.nonzero(current.singular_values[..., 0] <= 0)) if (l, h) not in bad
    ]
    return check_profile(current, base, tolerances or Tolerances(), causes=collapse_causes(ck, collapsed))


def diff_input(
    item: str | Path, *, k: int = 8, reporter: Reporter | None = None, fold_ln: bool = False, **options
) -> Profile:
    """One side of a diff: a saved profile as it is, or a checkpoint profiled now with its top ``k`` singular vectors.

    For a checkpoint the vectors are kept for the top ``k`` modes only, (L, H, D, k) each; while
    profiling all K are held ((L, H, D, K) float64 twice). ``fold_ln`` applies to checkpoints only.
    """
    saved = saved_file(item)
    if saved is not None:
        return load_profile(saved)
    prof = profile(str(item), save_vectors=True, fold_ln=fold_ln, reporter=reporter, **options)
    return dataclasses.replace(prof, U=prof.U[..., :k].copy(), V=prof.V[..., :k].copy())


def diff(
    a: str | Path,
    b: str | Path,
    *,
    k: int = 8,
    fold_ln: bool = False,
    reporter: Reporter | None = None,
    options_a: dict | None = None,
    options_b: dict | None = None,
):
    """How each head changed from ``a`` to ``b`` (:class:`qkweights.weights.diff.DiffResult`); each a checkpoint or a
    saved profile.

    ``options_a``/``options_b``: the options of :func:`open_checkpoint` for each side.
    """
    from qkweights.weights.diff import diff_profiles

    pa = diff_input(a, k=k, reporter=reporter, fold_ln=fold_ln, **(options_a or {}))
    pb = diff_input(b, k=k, reporter=reporter, fold_ln=fold_ln, **(options_b or {}))
    return diff_profiles(pa, pb, k=k)


def save_diff(result, out: str | Path, *, plots: bool = True) -> list[Path]:
    """Write ``result`` (:meth:`~qkweights.weights.diff.DiffResult.save`) and, with ``plots``, its figures
    (:func:`qkweights.figures.diff.diff_figures`) into ``out``; return the paths."""
    out = Path(out)
    written = result.save(out)
    if plots:
        from qkweights.figures.diff import diff_figures
        from qkweights.outputs import record_outputs

        written += diff_figures(result, out)
        record_outputs(out, "diff", written)
    return written


def compare(
    items: list, out: str | Path, *, labels: list[str] | None = None, reporter: Reporter | None = None, **options
) -> list[Path]:
    """Overlay the layer curves of ``items`` (:func:`qkweights.figures.compare.write_comparison`): saved results
    are read, checkpoints profiled now with ``options`` (as :func:`open_checkpoint`)."""
    from qkweights.figures.compare import INPUT_FILES, write_comparison

    inputs = [saved_file(item, INPUT_FILES) or profile(str(item), reporter=reporter, **options) for item in items]
    return write_comparison(inputs, Path(out), labels=labels)


def _reported(reporter: Reporter | None, task: str) -> dict:
    """The ``progress`` and ``notes`` keyword options of an image analysis, reporting to ``reporter`` as ``task``."""
    reporter = reporter or QUIET
    return {"progress": reporter.counter(task, "images"), "notes": reporter.note if reporter.takes_notes() else None}


def _given(**options) -> dict:
    """The options given (not None): the others keep the analysis's own defaults."""
    return {key: value for key, value in options.items() if value is not None}


@holds_output("out", inputs=("data_dir",))
def o3(
    model,
    data_dir,
    out,
    settings: SweepSettings | None = None,
    *,
    max_images: int | None = None,
    plots: bool = True,
    reporter: Reporter | None = None,
):
    """:func:`qkweights.analyses.o3.run_o3` into ``out`` and, with ``plots``, ``o3_by_layer.png``
    (:func:`qkweights.figures.o3.o3_figure`); progress as "o3" images and notes to ``reporter``.

    The output folder is held for this call alone and may not lie inside the input folder
    (:func:`qkweights.outputs.claim_dir`; InputError otherwise). Returns the :class:`~qkweights.analyses.o3.O3Result`,
    its ``files`` every file written.
    """
    from qkweights.analyses.o3 import run_o3

    if isinstance(model, str):
        model = load_vision_model(model, reporter=reporter)
    options = _given(settings=settings, max_images=max_images)
    result = run_o3(model, data_dir, out, **options, **_reported(reporter, "o3"))
    if plots:
        from qkweights.figures.o3 import FIGURE_NAME, o3_figure

        result.files.append(o3_figure(result.doc, Path(out) / FIGURE_NAME))
    record_outputs(out, "o3", result.files)  # o3_by_layer.png of an earlier run, after --no-plots, goes
    return result


@holds_output("out", inputs=("data_dir",))
def top_images(
    model,
    data_dir,
    out,
    selection: ModeSelection | None = None,
    settings: SweepSettings | None = None,
    *,
    fold_ln: bool = False,
    plots: bool = True,
    reporter: Reporter | None = None,
):
    """:func:`qkweights.analyses.top_images.run_top_images` into ``out`` and, with ``plots``, its figures
    (:func:`qkweights.figures.top_images.draw_top_images`, drawn where the sweep ran); progress as "top-images"
    images and notes to ``reporter``.

    The output folder is held as by :func:`o3`. Returns the
    :class:`~qkweights.analyses.top_images.TopImagesResult`, its ``files`` every file written.
    """
    from qkweights.analyses.top_images import run_top_images

    if isinstance(model, str):
        model = load_vision_model(model, reporter=reporter)
    options = _given(selection=selection, settings=settings)
    result = run_top_images(model, data_dir, out, **options, fold_ln=fold_ln, **_reported(reporter, "top-images"))
    if plots:
        from qkweights.figures.top_images import draw_top_images

        where = {"workers": settings.workers, "client": settings.client} if settings is not None else {}
        result.files += draw_top_images(model, result, Path(out), **where)
    record_outputs(out, "top-images", result.files)  # grids of heads no longer asked for, figures after --no-plots, go
    return result


@holds_output("out", inputs=("data_dir",))
def same_object(
    model,
    data_dir,
    out,
    selection: ModeSelection | None = None,
    settings: SweepSettings | None = None,
    *,
    plots: bool = True,
    reporter: Reporter | None = None,
):
    """:func:`qkweights.analyses.same_object.run_same_object` into ``out`` and, with ``plots``, its figures
    (:func:`qkweights.figures.same_object.draw_same_object`); progress as "same-object" images and notes to
    ``reporter``.

    The output folder is held as by :func:`o3`. Returns the
    :class:`~qkweights.analyses.same_object.SameObjectResult`, its ``files`` every file written.
    """
    from qkweights.analyses.same_object import run_same_object

    if isinstance(model, str):
        model = load_vision_model(model, reporter=reporter)
    options = _given(selection=selection, settings=settings)
    result = run_same_object(model, data_dir, out, **options, **_reported(reporter, "same-object"))
    if plots:
        from qkweights.figures.same_object import draw_same_object

        result.files += draw_same_object(model, result, Path(out))
    record_outputs(out, "same-object", result.files)  # figures of an earlier run, after --no-plots, go
    return result


def save_maps(maps, out) -> list[Path]:
    """Write the figure (:func:`qkweights.figures.maps.draw_maps`) and the data (:meth:`Maps.save
    <qkweights.analyses.maps.Maps.save>`) of projection maps into ``out``; return their paths (png, npz)."""
    from qkweights.figures.maps import draw_maps

    return [draw_maps(maps, out), *maps.save(out)]
