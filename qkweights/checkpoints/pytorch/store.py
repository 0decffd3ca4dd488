"""The tensors of a ``torch.save`` checkpoint as a :class:`qkweights.checkpoints.tensors.Store`.

:class:`TorchStore` names each tensor of the unpickled object graph by its dotted path
(:func:`flatten_tensors`), strips DistributedDataParallel's ``module.`` prefix, and selects one
network (a *part*) of a multi-network training checkpoint.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from qkweights.checkpoints.pytorch.archive import LazyTensor, printable
from qkweights.checkpoints.pytorch.unpickler import RECORD_CLASSES, load_archive
from qkweights.checkpoints.tensors import Store
from qkweights.errors import CheckpointError


def flatten_tensors(obj, source: str = "checkpoint") -> dict[str, LazyTensor]:
    """Every LazyTensor under ``obj`` by dotted path ("model.blocks.0.attn.qkv.weight").

    Descends dicts (str and int64 keys; entries with other keys are skipped),
    lists and tuples (by index); other leaves are ignored. A container
    reached twice is expanded once (its first path wins), which bounds the
    work on graphs that share containers. ``source`` names the file in errors.
    """
    out: dict[str, LazyTensor] = {}
    seen: set[int] = set()
    todo = [("", obj)]
    while todo:
        prefix, node = todo.pop()
        if isinstance(node, LazyTensor):
            if prefix in out:
                raise CheckpointError(
                    f"{source}: tensor name {printable(prefix)} occurs twice in the checkpoint (a key holds a "
                    "dot); the file is ambiguous"
                )
            out[prefix] = node
            continue
        if not isinstance(node, (dict, list, tuple)) or id(node) in seen:
            continue
        seen.add(id(node))
        if isinstance(node, dict):
            items = [(k, v) for k, v in node.items() if type(k) is str or (type(k) in (int, bool) and abs(k) < 2**63)]
        else:
            items = list(enumerate(node))
        todo.extend((f"{prefix}.{k}" if prefix else str(k), v) for k, v in reversed(items))
    return out


def _strip_module(tensors: dict[str, LazyTensor]) -> dict[str, LazyTensor]:
    """Drop a ``module.`` prefix shared by every name (DistributedDataParallel)."""
    if all(n.startswith("module.") for n in tensors):
        return {n[len("module.") :]: t for n, t in tensors.items()}
    return tensors


class TorchStore(Store):
    """Tensors of a torch.save checkpoint, with the interface of :class:`qkweights.checkpoints.tensors.Store`.

    Names are dotted paths in the nested dict; ``get(name)`` reads one tensor
    into a fresh array (BF16 -> float32).
    """

    def __init__(
        self,
        tensors: dict[str, LazyTensor],
        files: tuple[Path, ...],
        metadata: dict | None = None,
        parts: tuple[str, ...] = (),
    ):
        super().__init__(tensors, files, metadata)
        self._parts = list(parts)

    @classmethod
    def open(cls, path, *, part: str | None = None) -> "TorchStore":
        """Index the tensors of ``path``; with ``part``, only those under it (see :meth:`select`).

        A ``module.`` prefix shared by every name (DistributedDataParallel) is stripped.
        """
        path = Path(path)
        obj, archive = load_archive(path, RECORD_CLASSES)
        tensors = flatten_tensors(obj, path.name)
        if not tensors:
            raise CheckpointError(f"{path.name}: holds no tensors; the file is not a model checkpoint")
        # The networks of a training checkpoint: top-level keys holding a dict of tensors (a flat state dict has none).
        parts = (
            tuple(
                sorted(
                    k
                    for k, v in obj.items()
                    if type(k) is str and isinstance(v, dict) and flatten_tensors(v, path.name)
                )
            )
            if isinstance(obj, dict)
            else ()
        )
        store = cls(
            _strip_module(tensors),
            (path,),
            {"format": "pt", "byteorder": archive.byteorder, "version": archive.version},
            parts,
        )
        return store.select(part) if part is not None else store

    def parts(self) -> list[str]:
        """The top-level keys of the checkpoint that hold a dict (e.g. encoder, predictor, target_encoder), sorted."""
        return self._parts

    def select(self, part: str) -> "TorchStore":
        """The tensors named ``part.…``, without that prefix (nor a ``module.`` below it)."""
        head = part + "."
        tensors = {n[len(head) :]: t for n, t in self._entries.items() if n.startswith(head)}
        if part not in self.parts() or not tensors:
            if not self.parts():
                raise CheckpointError(f"{self.files[0].name}: is a flat state dict with no parts; drop part={part}")
            shown = ", ".join(printable(p, 40) for p in self.parts()[:20])
            raise CheckpointError(f"{self.files[0].name}: has no part {part!r} (parts: {shown}); choose one of those")
        return TorchStore(_strip_module(tensors), self.files, {**self.metadata, "part": part})

    def get(self, name: str) -> np.ndarray:
        """The tensor ``name`` as a new numpy array (BF16 -> float32)."""
        return self.info(name).numpy()
