"""The zip layer of a ``torch.save`` file, and its tensors read lazily.

A ``torch.save`` file is a zip archive with one top folder holding ``data.pkl``
(the pickled object graph, protocol 2), ``data/<key>`` (raw storage bytes),
``byteorder`` and ``version``. :class:`Archive` lists the entries (refusing legacy,
TorchScript and ambiguous layouts) and reads them with positioned reads: a
:class:`LazyTensor` reads only the span of its storage it covers, so a 10 GB
checkpoint is never read whole. Compressed zip entries (torch writes none) are
refused above :data:`MAX_INFLATED_BYTES`. Storage bytes carry no checksum check
(torch does not check them either); ``data.pkl``'s CRC is checked.
"""

from __future__ import annotations

import os
import pickle
import struct
import zipfile
import zlib
from contextlib import contextmanager, nullcontext
from math import prod
from pathlib import Path

import numpy as np

from qkweights.checkpoints.tensors import DTYPES, widen_bf16
from qkweights.errors import CheckpointError

MAX_INFLATED_BYTES = 256 * 2**20  # largest compressed entry inflated in memory
_LEGACY_MAGIC = b"\x80\x02\x8a\x0al\xfc\x9cF\xf9 j\xa8P\x19."  # pickle of torch's legacy magic number
NO_SETSTATE = "a tensor-building object cannot take pickled state"


class LazyStorage:
    """One ``data/<key>`` entry of the archive: ``numel`` elements of ``dtype``, read on demand."""

    __slots__ = ("archive", "key", "dtype", "numel")

    def __init__(self, archive: "Archive", key: str, dtype: str, numel: int):
        self.archive = archive
        self.key = key
        self.dtype = dtype
        self.numel = numel

    def __setstate__(self, state):
        raise pickle.UnpicklingError(NO_SETSTATE)

    def __repr__(self):
        return f"LazyStorage(data/{self.key}, {self.dtype}, {self.numel})"


class LazyTensor:
    """A tensor of a torch checkpoint, read only when :meth:`numpy` is called.

    ``shape`` and ``stride`` are in elements (torch's convention), ``offset``
    the first element in ``storage``; ``dtype`` a safetensors name ("F32",
    "BF16", …). Views, transposes and shared storages are kept as torch wrote them.
    """

    __slots__ = ("storage", "offset", "shape", "stride", "dtype")

    def __init__(self, storage: LazyStorage, offset: int, shape: tuple[int, ...], stride: tuple[int, ...], dtype: str):
        self.storage = storage
        self.offset = offset
        self.shape = shape
        self.stride = stride
        self.dtype = dtype

    def __setstate__(self, state):
        raise pickle.UnpicklingError(NO_SETSTATE)

    def __repr__(self):
        return f"LazyTensor({self.dtype}, shape={self.shape})"

    @property
    def nbytes(self) -> int:
        """Bytes of the tensor's elements as stored (numel × itemsize)."""
        return prod(self.shape) * DTYPES[self.dtype].itemsize

    def numpy(self) -> np.ndarray:
        """The tensor as a new C-contiguous array of ``shape``: BF16 widened to float32, native byte order."""
        raw = DTYPES[self.dtype]
        if prod(self.shape) == 0:
            out = np.zeros(self.shape, dtype=raw)
        else:
            span = 1 + sum((n - 1) * s for n, s in zip(self.shape, self.stride))
            flat = self.storage.archive.read_elements(self.storage, self.dtype, self.offset, span)  # (span,)
            strides = tuple(s * raw.itemsize if n > 1 else 0 for n, s in zip(self.shape, self.stride))
            out = np.array(np.lib.stride_tricks.as_strided(flat, self.shape, strides, writeable=False), order="C")
        if self.dtype == "BF16":
            return widen_bf16(out)
        if self.dtype == "BOOL":
            return out.view(np.uint8) != 0
        return out.astype(out.dtype.newbyteorder("="), copy=False)


class Archive:
    """The zip entries of one torch.save file, with positioned reads of their bytes."""

    def __init__(self, path: Path, size: int, prefix: str, members: dict[str, zipfile.ZipInfo]):
        self.path = path
        self.name = path.name
        self.size = size
        self.prefix = prefix
        self.members = members  # name below the top folder -> ZipInfo
        self.byteorder = "little"
        self.version = ""
        self._file = None  # an open handle while data.pkl is unpickled (many small header reads)

    @classmethod
    def open(cls, path: Path) -> "Archive":
        """List the archive's entries; refuse non-zip, legacy, TorchScript and ambiguous layouts."""
        name = path.name
        try:
            size = path.stat().st_size
            with open(path, "rb") as f:
                head = f.read(len(_LEGACY_MAGIC))
                infos = zipfile.ZipFile(f).infolist()
        except zipfile.BadZipFile:
            raise CheckpointError(_not_zip_message(name, head)) from None
        except OSError as e:
            raise CheckpointError(f"{name}: cannot read ({e.strerror or e}); check the path and permissions") from None
        except (ValueError, EOFError, struct.error, NotImplementedError, OverflowError, UnicodeError) as e:
            raise CheckpointError(
                f"{name}: the zip directory is corrupt ({describe(e)}); the file is truncated or not written by "
                "torch.save"
            ) from None
        names = [i.filename for i in infos]
        if len(set(names)) != len(names):
            raise CheckpointError(
                f"{name}: the zip archive lists an entry twice; the file is corrupt or was tampered with"
            )
        pickles = [n for n in names if n.count("/") == 1 and n.endswith("/data.pkl")]
        if len(pickles) != 1:
            if any(n.endswith("/constants.pkl") or "/code/" in n for n in names):
                raise CheckpointError(_torchscript_message(name))
            found = "no" if not pickles else f"{len(pickles)}"
            raise CheckpointError(
                f"{name}: zip archive with {found} top-level <folder>/data.pkl; not a torch.save checkpoint "
                "(re-save with torch.save or convert to safetensors)"
            )
        prefix = pickles[0][: -len("data.pkl")]
        members = {n[len(prefix) :]: i for n, i in zip(names, infos) if n.startswith(prefix)}
        if "constants.pkl" in members or any(n.startswith("code/") for n in members):
            raise CheckpointError(_torchscript_message(name))
        archive = cls(path, size, prefix, members)
        if "byteorder" in members:
            order = archive.read_member("byteorder", 64)
            if order not in (b"little", b"big"):
                raise CheckpointError(
                    f"{name}: byteorder record is {order[:16]!r}, not b'little' or b'big'; the file is corrupt"
                )
            archive.byteorder = order.decode()
        if "version" in members:
            archive.version = archive.read_member("version", 64).decode("ascii", "replace").strip()
        return archive

    def read_member(self, member: str, limit: int) -> bytes:
        """The whole entry ``member`` (name below the top folder), at most ``limit`` bytes, CRC-checked."""
        info = self.members[member]
        if info.file_size > limit:
            raise CheckpointError(
                f"{self.name}: {member} is {info.file_size} bytes, over the {limit}-byte limit; the file is "
                "corrupt or not a plain checkpoint"
            )
        data = bytes(self._read(info, 0, info.file_size))
        if zlib.crc32(data) != info.CRC:
            raise CheckpointError(f"{self.name}: {member} fails its CRC check; the file is corrupt")
        return data

    def storage(self, key: str, dtype: str, numel: int) -> LazyStorage:
        """Check that ``data/<key>`` exists, is readable and holds ``numel`` elements of ``dtype``."""
        info = self.members.get(f"data/{key}")
        if info is None:
            raise CheckpointError(
                f"{self.name}: data.pkl refers to storage data/{printable(key)}, which the archive lacks; the "
                "file is truncated or corrupt"
            )
        need = numel * DTYPES[dtype].itemsize
        if info.file_size < need:
            raise CheckpointError(
                f"{self.name}: storage data/{printable(key)} holds {info.file_size} bytes but data.pkl "
                f"declares {numel} {dtype} elements ({need} bytes); the file is corrupt"
            )
        if info.compress_type == zipfile.ZIP_STORED:
            self._data_offset(info)
        return LazyStorage(self, key, dtype, numel)

    def read_elements(self, storage: LazyStorage, dtype: str, first: int, count: int) -> np.ndarray:
        """Elements ``first`` to ``first + count`` of ``storage`` viewed as ``dtype``: a raw (count,) array in the
        file's byte order."""
        raw = DTYPES[dtype]
        if self.byteorder == "big" and raw.itemsize > 1:
            raw = raw.newbyteorder(">")
        buf = self._read(self.members[f"data/{storage.key}"], first * raw.itemsize, count * raw.itemsize)
        if len(buf) != count * raw.itemsize:
            raise CheckpointError(
                f"{self.name}: storage data/{printable(storage.key)} is shorter than its tensors need; the "
                "file is corrupt"
            )
        return np.frombuffer(buf, dtype=raw)

    def _read(self, info: zipfile.ZipInfo, start: int, count: int) -> bytearray | bytes:
        if info.flag_bits & 0x61:  # encrypted (bits 0, 6) or patched data (bit 5)
            raise CheckpointError(
                f"{self.name}: entry {printable(info.filename)} is encrypted or patched (zip flags "
                f"{info.flag_bits:#x}), which torch.save never writes; the file is not a plain checkpoint"
            )
        if info.compress_type == zipfile.ZIP_STORED:
            if info.compress_size != info.file_size:
                raise CheckpointError(
                    f"{self.name}: stored entry {printable(info.filename)} has sizes {info.compress_size} and "
                    f"{info.file_size}; the zip directory is corrupt"
                )
            return self._pread(self._data_offset(info) + start, count, info.filename)
        if info.compress_type != zipfile.ZIP_DEFLATED:
            raise CheckpointError(
                f"{self.name}: entry {printable(info.filename)} uses zip compression method "
                f"{info.compress_type}; torch.save writes entries uncompressed (re-save with torch.save)"
            )
        if info.file_size > MAX_INFLATED_BYTES:
            raise CheckpointError(
                f"{self.name}: compressed entry {printable(info.filename)} declares {info.file_size} bytes, "
                f"over the {MAX_INFLATED_BYTES}-byte limit (a zip bomb?); torch.save writes entries "
                "uncompressed (re-save with torch.save)"
            )
        try:
            with zipfile.ZipFile(self.path) as z, z.open(info) as f:
                data = f.read(info.file_size + 1)
        except (
            zipfile.BadZipFile,
            OSError,
            ValueError,
            EOFError,
            zlib.error,
            struct.error,
            NotImplementedError,
            RuntimeError,
        ) as e:
            raise CheckpointError(
                f"{self.name}: compressed entry {printable(info.filename)} cannot be inflated ({describe(e)}); "
                "the file is corrupt"
            ) from None
        if len(data) != info.file_size:
            raise CheckpointError(
                f"{self.name}: compressed entry {printable(info.filename)} inflates to {len(data)} bytes, not "
                f"the declared {info.file_size}; the file is corrupt"
            )
        return data[start : start + count]

    def _data_offset(self, info: zipfile.ZipInfo) -> int:
        """Absolute offset of a stored entry's bytes: after its local header, name and extra field."""
        head = self._pread(info.header_offset, 30, info.filename)
        signature, _, _, _, _, _, _, _, _, n_name, n_extra = struct.unpack("<4s5H3L2H", head)
        if signature != b"PK\x03\x04":
            raise CheckpointError(
                f"{self.name}: entry {printable(info.filename)} has no local header at offset "
                f"{info.header_offset}; the file is truncated or corrupt"
            )
        raw_name = self._pread(info.header_offset + 30, n_name, info.filename)
        if raw_name.decode("utf-8" if info.flag_bits & 0x800 else "cp437", "replace") != info.orig_filename:
            raise CheckpointError(
                f"{self.name}: entry {printable(info.filename)} is named differently in its local header; the "
                "file is corrupt or was tampered with"
            )
        start = info.header_offset + 30 + n_name + n_extra
        if start + info.file_size > self.size:
            raise CheckpointError(
                f"{self.name}: entry {printable(info.filename)} ends at byte {start + info.file_size}, past "
                f"the end of the file ({self.size} bytes); the file is truncated"
            )
        return start

    @contextmanager
    def held_open(self):
        """Keep one file handle for the reads made inside the ``with`` block."""
        with open(self.path, "rb") as f:
            self._file = f
            try:
                yield self
            finally:
                self._file = None

    def _pread(self, offset: int, count: int, what: str) -> bytearray:
        if not 0 <= offset <= self.size:
            raise CheckpointError(
                f"{self.name}: {printable(what)} lies at offset {offset}, outside the file ({self.size} "
                "bytes); the zip directory is corrupt"
            )
        buf = bytearray(count)
        view = memoryview(buf)
        got = 0
        try:
            with nullcontext(self._file) if self._file is not None else open(self.path, "rb") as f:
                while got < count:
                    n = os.preadv(f.fileno(), [view[got:]], offset + got)
                    if n == 0:
                        break
                    got += n
        except OSError as e:
            raise CheckpointError(
                f"{self.name}: cannot read {printable(what)} ({e.strerror or e}); check the file"
            ) from None
        if got != count:
            raise CheckpointError(
                f"{self.name}: {printable(what)} is cut short ({got} of {count} bytes); the file is truncated"
            )
        return buf


def _not_zip_message(name: str, head: bytes) -> str:
    if head.startswith(_LEGACY_MAGIC):
        return (
            f"{name}: legacy (pre-zip) torch.save format, which qkweights does not read; re-save it with "
            f"torch.save(torch.load(...), ..., _use_new_zipfile_serialization=True) or convert it to safetensors"
        )
    if head[:1] == b"\x80":
        return (
            f"{name}: a bare pickle, not a torch.save zip archive; qkweights reads only zip checkpoints (re-save with "
            "torch.save or convert to safetensors)"
        )
    return (
        f"{name}: not a zip archive (no end-of-central-directory record); the file is truncated or not written by "
        "torch.save"
    )


def _torchscript_message(name: str) -> str:
    return (
        f"{name}: a TorchScript archive (torch.jit.save), which qkweights does not read; save the weights with "
        f"torch.save(model.state_dict(), ...) or convert them to safetensors"
    )


def printable(text: str, limit: int = 120) -> str:
    return text if text.isprintable() and len(text) <= limit else repr(text[:limit])


def describe(e: BaseException) -> str:
    try:
        text = str(e)  # str(KeyError(x)) is repr(x): hostile objects could make it fail
    except (RecursionError, ValueError):
        text = ""
    return printable(text.replace("\n", " "), 200) or type(e).__name__
