"""Reading tensors from safetensors files, validated and lazy.

A :class:`TensorStore` maps tensor names to their place in one or more files.
Headers are validated before anything is trusted (bounded length, JSON, known
dtype, offsets inside the file, no overlap, size consistent with shape); a
tensor's bytes are read only when :meth:`TensorStore.get` asks for it, with a
positioned read into a fresh array, so memory stays bounded by what the caller
keeps (one layer at a time), not by the checkpoint size.
"""

from __future__ import annotations

import json
import os
from abc import ABC, abstractmethod
from dataclasses import dataclass
from math import prod
from pathlib import Path

import numpy as np

from qkweights.errors import CheckpointError

MAX_HEADER_BYTES = 100 * 1024 * 1024  # safetensors' own limit

# safetensors dtype -> (numpy dtype of the stored bytes, itemsize)
DTYPES = {
    "F64": np.dtype("<f8"),
    "F32": np.dtype("<f4"),
    "F16": np.dtype("<f2"),
    "BF16": np.dtype("<u2"),  # widened to float32 on read
    "I64": np.dtype("<i8"),
    "I32": np.dtype("<i4"),
    "I16": np.dtype("<i2"),
    "I8": np.dtype("i1"),
    "U8": np.dtype("u1"),
    "BOOL": np.dtype("?"),
}


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor lives: ``dtype`` is the safetensors name ("F32", "BF16", …)."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    file: Path
    offset: int  # absolute byte offset of the data in ``file``
    nbytes: int


def widen_bf16(raw: np.ndarray) -> np.ndarray:
    """bfloat16 bit patterns (uint16) -> float32, exactly: the top half of a float32."""
    return (raw.astype(np.uint32) << 16).view(np.float32)


def read_header(path: Path) -> tuple[list[TensorInfo], dict]:
    """Parse and validate the header of a safetensors file.

    Returns the tensors (in data order) and the ``__metadata__`` dict.
    Raises :class:`CheckpointError` naming the file and the problem.
    """
    name = path.name
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise CheckpointError(f"{name}: file is {size} bytes, too short to be safetensors (8-byte header length expected); the file is truncated")
            n = int.from_bytes(head, "little")
            if n > MAX_HEADER_BYTES:
                raise CheckpointError(f"{name}: header length {n} exceeds the {MAX_HEADER_BYTES}-byte limit; the file is corrupt or not safetensors")
            if 8 + n > size:
                raise CheckpointError(f"{name}: header length {n} exceeds the file size ({size} bytes); the file is truncated or not safetensors")
            text = f.read(n)
    except OSError as e:
        raise CheckpointError(f"{name}: cannot read ({e.strerror}); check the path and permissions") from None
    try:
        header = json.loads(text.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{name}: header is not valid JSON ({e}); the file is corrupt or not safetensors") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{name}: header is not a JSON object; the file is corrupt or not safetensors")
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict):
        raise CheckpointError(f"{name}: __metadata__ is not a JSON object; the file is corrupt")
    data_start = 8 + n
    data_size = size - data_start
    infos = []
    for key, entry in header.items():
        infos.append(_check_entry(name, key, entry, path, data_start, data_size))
    infos.sort(key=lambda t: t.offset)
    end = data_start
    for t in infos:
        if t.offset < end:
            raise CheckpointError(f"{name}: tensor {t.name!r} overlaps the tensor before it; the file is corrupt")
        end = t.offset + t.nbytes
    return infos, metadata


def _check_entry(fname: str, key: str, entry, path: Path, data_start: int, data_size: int) -> TensorInfo:
    if not isinstance(entry, dict) or not {"dtype", "shape", "data_offsets"} <= entry.keys():
        raise CheckpointError(f"{fname}: tensor {key!r} lacks dtype/shape/data_offsets; the file is corrupt")
    dtype, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
    if dtype not in DTYPES:
        raise CheckpointError(f"{fname}: tensor {key!r} has unsupported dtype {dtype!r} (known: {', '.join(DTYPES)})")
    if not (isinstance(shape, list) and all(type(s) is int and s >= 0 for s in shape)):
        raise CheckpointError(f"{fname}: tensor {key!r} has an invalid shape {shape!r}; the file is corrupt")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(type(o) is int for o in offsets)):
        raise CheckpointError(f"{fname}: tensor {key!r} has invalid data_offsets {offsets!r}; the file is corrupt")
    begin, end = offsets
    if not 0 <= begin <= end <= data_size:
        raise CheckpointError(f"{fname}: tensor {key!r} offsets [{begin}, {end}] lie outside the data section ({data_size} bytes); the file is truncated or corrupt")
    nbytes = prod(shape) * DTYPES[dtype].itemsize
    if nbytes != end - begin:
        raise CheckpointError(f"{fname}: tensor {key!r} shape {shape} of {dtype} needs {nbytes} bytes but its offsets span {end - begin}; the file is corrupt")
    return TensorInfo(key, dtype, tuple(shape), path, data_start + begin, nbytes)


class Store(ABC):
    """Named tensors of one checkpoint: the interface every reader offers to :mod:`qkweights.spec`.

    ``entries`` maps each name to an object with ``shape`` and ``dtype`` (safetensors
    dtype names, "F32", "BF16", …); subclasses read the values in :meth:`get`.
    """

    def __init__(self, entries: dict, files: tuple[Path, ...], metadata: dict | None = None):
        self._entries = entries
        self.files = files
        self.metadata = metadata or {}

    def names(self) -> list[str]:
        return list(self._entries)

    def __contains__(self, name: str) -> bool:
        return name in self._entries

    def info(self, name: str):
        try:
            return self._entries[name]
        except KeyError:
            raise CheckpointError(f"tensor {name!r} is missing from {', '.join(f.name for f in self.files)}; the checkpoint is incomplete or of another family (try family=NAME)") from None

    def shape(self, name: str) -> tuple[int, ...]:
        return self.info(name).shape

    def dtype(self, name: str) -> str:
        return self.info(name).dtype

    def dtypes(self) -> list[str]:
        """The distinct stored dtypes, in first-seen order."""
        return list(dict.fromkeys(t.dtype for t in self._entries.values()))

    @abstractmethod
    def get(self, name: str) -> np.ndarray:
        """The tensor ``name`` as a new numpy array (BF16 -> float32)."""


class TensorStore(Store):
    """Tensors of safetensors files (one, or the shards of an index).

    ``get(name)`` reads one tensor into a fresh array in its stored numeric
    type (BF16 widened to float32). Names are the files' own names.
    """

    @classmethod
    def open(cls, files: list[Path] | tuple[Path, ...]) -> "TensorStore":
        """Validate the headers of ``files`` (safetensors) and index their tensors."""
        infos: dict[str, TensorInfo] = {}
        metadata: dict = {}
        for path in files:
            path = Path(path)
            tensors, meta = read_header(path)
            metadata.update(meta)
            for t in tensors:
                if t.name in infos:
                    raise CheckpointError(f"{path.name}: tensor {t.name!r} is also in {infos[t.name].file.name}; the shards overlap")
                infos[t.name] = t
        return cls(infos, tuple(Path(f) for f in files), metadata)

    def get(self, name: str) -> np.ndarray:
        """The tensor ``name`` as a new numpy array (BF16 -> float32)."""
        t = self.info(name)
        raw = np.empty(t.shape, dtype=DTYPES[t.dtype])
        buf = raw.reshape(-1).view(np.uint8)
        with open(t.file, "rb") as f:
            got = os.preadv(f.fileno(), [buf], t.offset) if t.nbytes else 0
        if got != t.nbytes:
            raise CheckpointError(f"{t.file.name}: tensor {name!r} is cut short ({got} of {t.nbytes} bytes); the file is truncated")
        if t.dtype == "BF16":
            return widen_bf16(raw)
        return raw.astype(raw.dtype.newbyteorder("="), copy=False)
