"""qkweights: what the attention heads of a Vision Transformer do, read from their query-key weights."""

__version__ = "0.1.0"


def profile(model: str, *, save_vectors: bool = False, progress: bool | None = None, fold_ln: bool = False, **options):
    """Profile every head of ``model`` (Hub id, local folder, .safetensors or PyTorch file).

    ``options``: ``revision``, ``family``, ``part``, ``allow_pickle``, ``spec_dir`` (a folder, or a
    list of folders, of user spec files; see :func:`qkweights.load.open_model`). Returns a :class:`qkweights.profiles.Profile`:
    per-head SVD statistics of ``W_q,hᵀW_k,h`` as numpy arrays plus metadata;
    ``.save(dir)``, ``.to_json()``. ``fold_ln``: profile the LayerNorm-folded ``Γ W_qᵀW_k Γ``
    and add the key-salience norms (:mod:`qkweights.fold`).
    """
    from qkweights.load import open_model, source_record
    from qkweights.profiles import compute_profile

    source, ck = open_model(model, progress=progress, **options)
    return compute_profile(ck, source_record(source, ck), save_vectors=save_vectors, fold_ln=fold_ln)


def load_profile(path, *, vectors: bool = True):
    """Read a saved ``profile.json`` (or the folder holding it; ``vectors``: with its ``modes.npz`` if present)."""
    from qkweights.profiles import load_profile as _load

    return _load(path, vectors=vectors)


def load_model(model: str, **options):
    """Load the vision tower of ``model`` for the numpy forward pass (:class:`qkweights.vision.VisionModel`).

    ``options``: ``revision``, ``family``, ``part``, ``allow_pickle``, ``spec_dir`` (see :func:`qkweights.load.open_model`).
    """
    from qkweights.vision import load_model as _load

    return _load(model, **options)
