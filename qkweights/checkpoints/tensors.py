"""Reading tensors from safetensors files, validated and lazy.

The ``safetensors`` library (its Rust parser is the format's reference, fuzzed
upstream) validates each header and reads the values: a file is accepted only if
it accepts it. This module adds what the library does not do: a bounded header
length checked from the first 8 bytes before anything else, the dtypes qkweights
reads (:data:`DTYPES`), one-line :class:`CheckpointError` messages naming the file
(and the tensor, where the library's message does not), and bfloat16, which numpy
cannot hold: BF16 bytes are read with a positioned read and widened to float32.

A :class:`TensorStore` maps tensor names to their file. A tensor's bytes are read
only when :meth:`TensorStore.get` (or :meth:`TensorStore.rows`) asks for it, each
read through a short-lived ``safe_open`` whose memory map is closed on return, so
memory stays bounded by what the caller keeps (one layer at a time), not by the
checkpoint size.
"""

from __future__ import annotations

import json
import os
import re
from abc import ABC, abstractmethod
from contextlib import contextmanager
from dataclasses import dataclass
from math import prod
from pathlib import Path

import numpy as np
from safetensors import SafetensorError, safe_open

from qkweights.errors import CheckpointError

MAX_HEADER_BYTES = 100_000_000  # safetensors' own limit (MAX_HEADER_SIZE in its Rust parser)

# safetensors dtype -> numpy dtype of the stored bytes: the dtypes qkweights reads
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

_LIBRARY_PREFIX = "Error while deserializing header: "


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor lives: ``dtype`` is the safetensors name ("F32", "BF16", …)."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    file: Path

    @property
    def nbytes(self) -> int:
        return prod(self.shape) * DTYPES[self.dtype].itemsize


def widen_bf16(raw: np.ndarray) -> np.ndarray:
    """bfloat16 bit patterns (uint16) -> float32, exactly: the top half of a float32."""
    return (raw.astype(np.uint32) << 16).view(np.float32)


def _one_line(text: str, limit: int = 200) -> str:
    """``text`` with control characters escaped and cut to ``limit`` characters (library messages quote file
    content)."""
    text = "".join(c if c.isprintable() else ascii(c)[1:-1] for c in text[: limit + 1])
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _prefix(path: Path) -> tuple[int, int]:
    """(file size, header length) from the first 8 bytes, within the hostile-input limits."""
    name = path.name
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
    except OSError as e:
        raise CheckpointError(f"{name}: cannot read ({e.strerror}); check the path and permissions") from None
    if len(head) < 8:
        raise CheckpointError(
            f"{name}: file is {size} bytes, too short to be safetensors (8-byte header length expected); the "
            "file is truncated"
        )
    n = int.from_bytes(head, "little")
    if n > MAX_HEADER_BYTES:
        raise CheckpointError(
            f"{name}: header length {n} exceeds the {MAX_HEADER_BYTES}-byte limit; the file is corrupt or not "
            "safetensors"
        )
    if 8 + n > size:
        raise CheckpointError(
            f"{name}: header length {n} exceeds the file size ({size} bytes); the file is truncated or not safetensors"
        )
    return size, n


def _header_json(path: Path, n: int):
    """The header as parsed by :mod:`json` (None if it is not JSON): only to name a tensor or find a BF16 offset."""
    try:
        with open(path, "rb") as f:
            f.seek(8)
            return json.loads(f.read(n).decode("utf-8"))
    except (OSError, UnicodeDecodeError, ValueError):
        return None


def _explain(path: Path, n: int, data_size: int) -> str | None:
    """The first tensor whose offsets run past the data or disagree with its shape, for messages the library words
    without a name."""
    header = _header_json(path, n)
    if not isinstance(header, dict):
        return None
    for key, e in header.items():
        try:
            (begin, end), dtype, shape = e["data_offsets"], e["dtype"], e["shape"]
            if not 0 <= begin <= end <= data_size:
                return (
                    f"tensor {key!r} offsets [{begin}, {end}] lie outside the data section ({data_size} bytes); the "
                    "file is truncated or corrupt"
                )
            need = prod(shape) * DTYPES[dtype].itemsize
            if need != end - begin:
                return (
                    f"tensor {key!r} shape {shape} of {dtype} needs {need} bytes but its offsets span {end - begin}; "
                    "the file is corrupt"
                )
        except (KeyError, TypeError, ValueError):
            continue
    return None


def _library_message(path: Path, reason: str) -> str:
    """A one-line message naming ``path`` for the safetensors library's rejection ``reason``.

    The 8-byte prefix is checked first (its own messages give the lengths); the
    library's reasons are then worded with the file's name, and the tensor's where
    the library does not name it.
    """
    name = path.name
    size, n = _prefix(path)
    data_size = size - 8 - n
    reason = reason.removeprefix(_LIBRARY_PREFIX)
    if m := re.search(r"unknown variant `(.*?)`, expected one of", reason, re.DOTALL):
        return _one_line(f"{name}: a tensor has unsupported dtype {m.group(1)!r} (known: {', '.join(DTYPES)})", 400)
    if m := re.fullmatch(r"invalid offset for tensor `(.*)`", reason, re.DOTALL):
        return _one_line(
            f"{name}: tensor {m.group(1)!r} does not start where the tensor before it ends (overlap or gap); "
            "the file is corrupt",
            400,
        )
    if reason.startswith(("incomplete metadata", "invalid shape, data type, or offset")):
        if (why := _explain(path, n, data_size)) is not None:
            return _one_line(f"{name}: {why}", 400)
        return (
            f"{name}: the tensors do not cover the {data_size}-byte data section exactly ({_one_line(reason)}); the "
            "file is truncated or corrupt"
        )
    if reason.startswith("invalid JSON in header: "):
        return (
            f"{name}: header is not valid JSON for safetensors "
            f"({_one_line(reason.removeprefix('invalid JSON in header: '))}); the file is corrupt or not safetensors"
        )
    return f"{name}: {_one_line(reason)}; the file is corrupt or not safetensors"


@contextmanager
def _open(path: Path):
    """``safe_open(path)`` (numpy; the header validated again), its errors as :class:`CheckpointError`; the memory map
    closes on exit."""
    try:
        f = safe_open(path, framework="numpy")
    except SafetensorError as e:
        raise CheckpointError(_library_message(path, str(e))) from None
    except OSError as e:
        raise CheckpointError(f"{path.name}: cannot read ({e.strerror}); check the path and permissions") from None
    with f:
        yield f


def read_header(path: Path) -> tuple[list[TensorInfo], dict]:
    """Validate a safetensors file's header (the library's parser, after the length limit).

    Returns the tensors (in data order) and the ``__metadata__`` dict.
    Raises :class:`CheckpointError` naming the file and the problem.
    """
    path = Path(path)
    _prefix(path)  # the hostile-input limits, before the library reads the header
    with _open(path) as f:
        metadata = f.metadata() or {}
        infos = []
        for key in f.offset_keys():
            view = f.get_slice(key)
            dtype = view.get_dtype()
            if dtype not in DTYPES:
                raise CheckpointError(
                    _one_line(
                        f"{path.name}: tensor {key!r} has unsupported dtype {dtype!r} (known: {', '.join(DTYPES)})", 400
                    )
                )
            infos.append(TensorInfo(key, dtype, tuple(view.get_shape()), path))
    return infos, metadata


class Store(ABC):
    """Named tensors of one checkpoint: the interface every reader offers to :mod:`qkweights.specs.checkpoint`.

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
            raise CheckpointError(
                f"tensor {name!r} is missing from {', '.join(f.name for f in self.files)}; the checkpoint is "
                "incomplete or of another family (try family=NAME)"
            ) from None

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

    def rows(self, name: str, start: int, stop: int) -> np.ndarray:
        """Rows ``start:stop`` (axis 0, clipped as a slice is) of ``name`` as a new array (BF16 -> float32).

        This default reads the whole tensor; readers that can read part of one override it.
        """
        return np.array(self.get(name)[start:stop])


class TensorStore(Store):
    """Tensors of safetensors files (one, or the shards of an index).

    ``get(name)`` reads one tensor into a fresh array in its stored numeric
    type (BF16 widened to float32). Names are the files' own names.
    """

    @classmethod
    def open(cls, files: list[Path] | tuple[Path, ...]) -> TensorStore:
        """Validate the headers of ``files`` (safetensors) and index their tensors."""
        infos: dict[str, TensorInfo] = {}
        metadata: dict = {}
        for path in files:
            path = Path(path)
            tensors, meta = read_header(path)
            metadata.update(meta)
            for t in tensors:
                if t.name in infos:
                    raise CheckpointError(
                        f"{path.name}: tensor {t.name!r} is also in {infos[t.name].file.name}; the shards overlap"
                    )
                infos[t.name] = t
        return cls(infos, tuple(Path(f) for f in files), metadata)

    def get(self, name: str) -> np.ndarray:
        """The tensor ``name`` as a new numpy array (BF16 -> float32)."""
        t = self.info(name)
        if t.dtype == "BF16":
            return self._bf16(t, None)
        with _open(t.file) as f:
            return f.get_tensor(name)

    def rows(self, name: str, start: int, stop: int) -> np.ndarray:
        """Rows ``start:stop`` of ``name`` (axis 0, clipped as a slice is): only their bytes are read
        (``get_slice``)."""
        t = self.info(name)
        if not t.shape:
            raise CheckpointError(f"{t.file.name}: tensor {name!r} is a scalar; it has no rows")
        start, stop, _ = slice(start, stop).indices(t.shape[0])
        stop = max(start, stop)
        if t.dtype == "BF16":
            return self._bf16(t, (start, stop))
        if start == stop:  # the library refuses empty slices
            return np.empty((0, *t.shape[1:]), DTYPES[t.dtype].newbyteorder("="))
        with _open(t.file) as f:
            return f.get_slice(name)[start:stop]

    def _bf16(self, t: TensorInfo, rows: tuple[int, int] | None) -> np.ndarray:
        """BF16 tensor ``t`` (or its rows ``[start, stop)``) by a positioned read of its bytes, widened to float32.

        numpy has no bfloat16, so the library cannot give these values; its header
        validation still runs first, and the offset comes from the header's JSON.
        """
        with _open(t.file):  # validates the header as for any other tensor
            _, n = _prefix(t.file)
            header = _header_json(t.file, n)
        entry = header.get(t.name) if isinstance(header, dict) else None
        try:
            begin, end = entry["data_offsets"]
            same = entry["dtype"] == t.dtype and tuple(entry["shape"]) == t.shape and end - begin == t.nbytes
        except (KeyError, TypeError, ValueError):
            same = False
        if not same:
            raise CheckpointError(
                f"{t.file.name}: tensor {t.name!r} changed since the file was opened; open the checkpoint again"
            )
        shape, offset = t.shape, 8 + n + begin
        if rows is not None:
            row = prod(t.shape[1:]) * DTYPES["BF16"].itemsize  # bytes per row
            shape, offset = (rows[1] - rows[0], *t.shape[1:]), offset + rows[0] * row
        raw = np.empty(shape, DTYPES["BF16"])
        buf = raw.reshape(-1).view(np.uint8)
        with open(t.file, "rb") as f:
            got = os.preadv(f.fileno(), [buf], offset) if buf.size else 0
        if got != buf.size:
            raise CheckpointError(
                f"{t.file.name}: tensor {t.name!r} is cut short ({got} of {buf.size} bytes); the file is truncated"
            )
        return widen_bf16(raw)
