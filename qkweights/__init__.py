"""qkweights: what the attention heads of a Vision Transformer do, read from their query-key weights.

The functions here are the Python API; each is a thin door into :mod:`qkweights.workflow`,
imported on first use so that ``import qkweights`` stays light.
"""

from qkweights.version import __version__

__all__ = ["__version__", "load_model", "load_profile", "profile", "report", "save_profile"]


def profile(
    model: str,
    *,
    save_vectors: bool = False,
    progress: bool | None = None,
    fold_ln: bool = False,
    reporter=None,
    **options,
):
    """Profile every head of ``model`` (Hub id, local folder, .safetensors or PyTorch file).

    ``options``: ``revision``, ``family``, ``part``, ``allow_pickle``, ``spec_dir`` (a folder, or a
    list of folders, of user spec files; see :func:`qkweights.specs.load.open_model`). Returns a
    :class:`qkweights.weights.profile.Profile`:
    per-head SVD statistics of ``W_q,hᵀW_k,h`` as numpy arrays plus metadata;
    ``.save(dir)`` writes its data files, :func:`save_profile` its figures too; ``.to_json()``.
    ``fold_ln``: profile the LayerNorm-folded ``Γ W_qᵀW_k Γ`` and add the key-salience norms
    (:mod:`qkweights.weights.fold`). ``progress``: True lets huggingface_hub draw its download bars
    on stderr (the library draws none of its own). ``reporter``: a :class:`qkweights.workflow.Reporter` for per-layer
    progress and notes (its ``downloads`` then replaces ``progress``).
    """
    from qkweights import workflow

    return workflow.profile(
        model,
        save_vectors=save_vectors,
        fold_ln=fold_ln,
        reporter=reporter or workflow.Reporter(downloads=progress),
        **options,
    )


def save_profile(prof, out, *, plots: bool = True):
    """Write ``prof`` into the folder ``out``: profile.json, heads.csv, modes.npz (with vectors) and, with ``plots``,
    the figures."""
    from qkweights import workflow

    return workflow.save_profile(prof, out, plots=plots)


def load_profile(path, *, vectors: bool = True):
    """Read a saved ``profile.json`` (or the folder holding it; ``vectors``: with its ``modes.npz`` if present)."""
    from qkweights.weights import load

    return load.load_profile(path, vectors=vectors)


def load_model(model: str, **options):
    """Load the vision tower of ``model`` for the numpy forward pass (:class:`qkweights.vision.model.VisionModel`).

    ``options``: ``revision``, ``family``, ``part``, ``allow_pickle``, ``spec_dir`` (see
    :func:`qkweights.specs.load.open_model`).
    """
    from qkweights.vision.model import open_vision_model

    return open_vision_model(model, **options)


def report(dirs, out, *, thumb_px: int = 96, top: int = 8, max_mb: float = 50.0, thumbs: bool = True):
    """Write the atlas of the results under ``dirs`` (output folders of qkweights commands) into the folder ``out``:
    ``out/index.html``, a page per model and per head. Returns the files written. See :mod:`qkweights.atlas`."""
    from qkweights import atlas

    return atlas.report(dirs, out, thumb_px=thumb_px, top=top, max_mb=max_mb, thumbs=thumbs)
