"""Reading PyTorch checkpoints (``torch.save`` zip archives) without torch, safely.

A ``torch.save`` file is a zip archive with one top folder holding ``data.pkl``
(the pickled object graph, protocol 2), ``data/<key>`` (raw storage bytes),
``byteorder`` and ``version``. Unpickling normally imports and calls whatever
the pickle names, so a checkpoint can run code. Here ``data.pkl`` is unpickled
by :class:`pickle.Unpickler` whose ``find_class`` resolves only an allow-list,
each name mapped to our own inert function or sentinel (never the real one):

- tensors: ``torch._utils._rebuild_tensor_v2`` / ``_rebuild_tensor_v3`` ->
  :class:`LazyTensor`; ``_rebuild_parameter`` / ``_rebuild_parameter_with_state``
  -> the tensor itself; ``torch.{Float,Half,BFloat16,Double,Long,Int,Short,
  Char,Byte,Bool}Storage`` and ``torch.storage.UntypedStorage`` as the type
  slot of a persistent id ``('storage', type, key, location, numel)``; dtype
  objects ``torch.float32`` etc. (torch writes them for ``_rebuild_tensor_v3``).
- containers: ``collections.OrderedDict`` (called without arguments, as torch
  writes it), ``builtins.set`` (yacs configs hold sets), ``_codecs.encode``
  (protocol 2 writes ``bytes`` as ``encode(str, "latin1")``).
- numpy scalars (``numpy.dtype`` + ``numpy[._]core.multiarray.scalar``), as
  training scripts save accuracies and step counts: numeric dtypes only, the
  value decoded with ``np.frombuffer``.
- :data:`RECORD_CLASSES` (``argparse.Namespace``, ``yacs.config.CfgNode``,
  ``pathlib.PosixPath``, ``pathlib.WindowsPath``, ``torch.device``): each
  becomes an inert :class:`Record` holding the arguments and state the pickle
  gives it; nothing is imported.

Any other global raises :class:`CheckpointError` before anything runs.

Hostile files are bounded: ``data.pkl`` is at most :data:`MAX_PICKLE_BYTES`
and is scanned before unpickling (well-formed opcodes, memo indices in
sequence, tuple nesting at most :data:`MAX_TUPLE_DEPTH` since hashing deeper
tuples overflows the C stack, at most :data:`MAX_UNSAFE_KEYS` dictionary keys
whose hashes an attacker can make collide); compressed zip entries (torch
writes none) are refused above :data:`MAX_INFLATED_BYTES`; tensor views are
checked against their storage before any byte is read. Tensor bytes are read
lazily, with positioned reads of only the span a tensor covers, so a 10 GB
checkpoint is never read whole. Storage bytes carry no checksum check (torch
does not check them either); ``data.pkl``'s CRC is checked.
"""

from __future__ import annotations

import io
import os
import pickle
import pickletools
import re
import struct
import zipfile
import zlib
from collections import OrderedDict
from contextlib import contextmanager, nullcontext
from math import prod
from pathlib import Path

import numpy as np

from qkweights.checkpoints.tensors import DTYPES, Store, widen_bf16
from qkweights.errors import CheckpointError

MAX_PICKLE_BYTES = 32 * 2**20  # data.pkl of a ViT-H checkpoint with optimizer state is < 1 MB
MAX_INFLATED_BYTES = 256 * 2**20  # largest compressed entry inflated in memory
MAX_TUPLE_DEPTH = 100  # torch writes depth 3 (args -> shape)
# keys other than str/bytes/small ints can be made to collide (CPython's tuple hash is invertible): inserting
# 1000 colliding 2-tuples of ints takes 0.09 s, 10000 take 9 s, so n keys cost O(n^2)
MAX_UNSAFE_KEYS = 1000
MAX_EXPANDED_BYTES = 256 * 2**20  # a stride-0 view may exceed its storage by at most this
MAX_NDIM = 64

# torch storage class name -> our dtype name (the dtypes qkweights reads, see tensors.DTYPES)
STORAGE_TYPES = {
    "FloatStorage": "F32",
    "HalfStorage": "F16",
    "BFloat16Storage": "BF16",
    "DoubleStorage": "F64",
    "LongStorage": "I64",
    "IntStorage": "I32",
    "ShortStorage": "I16",
    "CharStorage": "I8",
    "ByteStorage": "U8",
    "BoolStorage": "BOOL",
}
TORCH_DTYPES = {
    "float32": "F32",
    "float16": "F16",
    "bfloat16": "BF16",
    "float64": "F64",
    "int64": "I64",
    "int32": "I32",
    "int16": "I16",
    "int8": "I8",
    "uint8": "U8",
    "bool": "BOOL",
}
# dtypes torch 2.13 can write that qkweights does not read: inert names, for a clear message
OTHER_TORCH_DTYPES = (
    "uint16",
    "uint32",
    "uint64",
    "complex32",
    "complex64",
    "complex128",
    "float8_e4m3fn",
    "float8_e4m3fnuz",
    "float8_e5m2",
    "float8_e5m2fnuz",
    "float8_e8m0fnu",
    "float4_e2m1fn_x2",
    "bits1x8",
    "bits2x4",
    "bits4x2",
    "bits8",
    "bits16",
    "qint8",
    "quint8",
    "qint32",
    "quint4x2",
    "quint2x4",
)
RECORD_CLASSES = frozenset(
    {
        "argparse.Namespace",
        "yacs.config.CfgNode",
        "pathlib.PosixPath",
        "pathlib.WindowsPath",
        "torch.device",
    }
)

_LEGACY_MAGIC = b"\x80\x02\x8a\x0al\xfc\x9cF\xf9 j\xa8P\x19."  # pickle of torch's legacy magic number
_NUMPY_DTYPE = re.compile(r"(b1|[iu][1248]|f[248]|c8|c16)")
_NO_SETSTATE = "a tensor-building object cannot take pickled state"


class Record:
    """Inert stand-in for an allowed non-tensor class (argparse.Namespace, yacs CfgNode, …).

    ``cls`` is the class as the pickle names it ("argparse.Namespace");
    ``args`` the constructor arguments; ``state`` what the pickle sets with
    BUILD (a Namespace's attribute dict), None if nothing; ``items`` the
    entries set by item assignment (a CfgNode's keys). Nothing is imported or run.
    """

    __slots__ = ("cls", "args", "state", "items")
    _qualname = "?"

    def __new__(cls, *args):
        self = object.__new__(cls)
        self.cls = cls._qualname
        self.args = args
        self.state = None
        self.items = {}
        return self

    def __init__(self, *args):
        pass

    def __setstate__(self, state):
        self.state = state

    def __setitem__(self, key, value):
        self.items[key] = value

    def __repr__(self):
        return f"Record({self.cls})"


class _Sentinel:
    """A named inert value standing in for a torch storage class or dtype object."""

    __slots__ = ("name", "dtype")

    def __init__(self, name: str, dtype: str | None):
        self.name = name
        self.dtype = dtype

    def __setstate__(self, state):
        raise pickle.UnpicklingError(_NO_SETSTATE)

    def __repr__(self):
        return self.name


class _Safe:
    """Our own function standing in for an allowed global; refuses pickled state."""

    __slots__ = ("name", "fn")

    def __init__(self, name: str, fn):
        self.name = name
        self.fn = fn

    def __call__(self, *args):
        return self.fn(*args)

    def __setstate__(self, state):
        raise pickle.UnpicklingError(_NO_SETSTATE)


class _NumpyDtype:
    """A numeric numpy dtype rebuilt from a pickle (byte order set by BUILD)."""

    __slots__ = ("dtype",)

    def __init__(self, dtype: np.dtype):
        self.dtype = dtype

    def __setstate__(self, state):
        if not (
            type(state) is tuple
            and len(state) in (8, 9)
            and state[1] in ("<", ">", "|", "=")
            and state[2:5] == (None, None, None)
        ):
            raise pickle.UnpicklingError("numpy dtype state is not that of a plain numeric dtype")
        self.dtype = self.dtype.newbyteorder(state[1]) if self.dtype.itemsize > 1 else self.dtype

    def __repr__(self):
        return f"dtype({self.dtype.str})"


class LazyStorage:
    """One ``data/<key>`` entry of the archive: ``numel`` elements of ``dtype``, read on demand."""

    __slots__ = ("archive", "key", "dtype", "numel")

    def __init__(self, archive: "_Archive", key: str, dtype: str, numel: int):
        self.archive = archive
        self.key = key
        self.dtype = dtype
        self.numel = numel

    def __setstate__(self, state):
        raise pickle.UnpicklingError(_NO_SETSTATE)

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
        raise pickle.UnpicklingError(_NO_SETSTATE)

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


class _Archive:
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
    def open(cls, path: Path) -> "_Archive":
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
                f"{name}: the zip directory is corrupt ({_short(e)}); the file is truncated or not written by "
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
                f"{self.name}: data.pkl refers to storage data/{_printable(key)}, which the archive lacks; the "
                "file is truncated or corrupt"
            )
        need = numel * DTYPES[dtype].itemsize
        if info.file_size < need:
            raise CheckpointError(
                f"{self.name}: storage data/{_printable(key)} holds {info.file_size} bytes but data.pkl "
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
                f"{self.name}: storage data/{_printable(storage.key)} is shorter than its tensors need; the "
                "file is corrupt"
            )
        return np.frombuffer(buf, dtype=raw)

    def _read(self, info: zipfile.ZipInfo, start: int, count: int) -> bytearray | bytes:
        if info.flag_bits & 0x61:  # encrypted (bits 0, 6) or patched data (bit 5)
            raise CheckpointError(
                f"{self.name}: entry {_printable(info.filename)} is encrypted or patched (zip flags "
                f"{info.flag_bits:#x}), which torch.save never writes; the file is not a plain checkpoint"
            )
        if info.compress_type == zipfile.ZIP_STORED:
            if info.compress_size != info.file_size:
                raise CheckpointError(
                    f"{self.name}: stored entry {_printable(info.filename)} has sizes {info.compress_size} and "
                    f"{info.file_size}; the zip directory is corrupt"
                )
            return self._pread(self._data_offset(info) + start, count, info.filename)
        if info.compress_type != zipfile.ZIP_DEFLATED:
            raise CheckpointError(
                f"{self.name}: entry {_printable(info.filename)} uses zip compression method "
                f"{info.compress_type}; torch.save writes entries uncompressed (re-save with torch.save)"
            )
        if info.file_size > MAX_INFLATED_BYTES:
            raise CheckpointError(
                f"{self.name}: compressed entry {_printable(info.filename)} declares {info.file_size} bytes, "
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
                f"{self.name}: compressed entry {_printable(info.filename)} cannot be inflated ({_short(e)}); "
                "the file is corrupt"
            ) from None
        if len(data) != info.file_size:
            raise CheckpointError(
                f"{self.name}: compressed entry {_printable(info.filename)} inflates to {len(data)} bytes, not "
                f"the declared {info.file_size}; the file is corrupt"
            )
        return data[start : start + count]

    def _data_offset(self, info: zipfile.ZipInfo) -> int:
        """Absolute offset of a stored entry's bytes: after its local header, name and extra field."""
        head = self._pread(info.header_offset, 30, info.filename)
        signature, _, _, _, _, _, _, _, _, n_name, n_extra = struct.unpack("<4s5H3L2H", head)
        if signature != b"PK\x03\x04":
            raise CheckpointError(
                f"{self.name}: entry {_printable(info.filename)} has no local header at offset "
                f"{info.header_offset}; the file is truncated or corrupt"
            )
        raw_name = self._pread(info.header_offset + 30, n_name, info.filename)
        if raw_name.decode("utf-8" if info.flag_bits & 0x800 else "cp437", "replace") != info.orig_filename:
            raise CheckpointError(
                f"{self.name}: entry {_printable(info.filename)} is named differently in its local header; the "
                "file is corrupt or was tampered with"
            )
        start = info.header_offset + 30 + n_name + n_extra
        if start + info.file_size > self.size:
            raise CheckpointError(
                f"{self.name}: entry {_printable(info.filename)} ends at byte {start + info.file_size}, past "
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
                f"{self.name}: {_printable(what)} lies at offset {offset}, outside the file ({self.size} "
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
                f"{self.name}: cannot read {_printable(what)} ({e.strerror or e}); check the file"
            ) from None
        if got != count:
            raise CheckpointError(
                f"{self.name}: {_printable(what)} is cut short ({got} of {count} bytes); the file is truncated"
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


def _printable(text: str, limit: int = 120) -> str:
    return text if text.isprintable() and len(text) <= limit else repr(text[:limit])


def _short(e: BaseException) -> str:
    try:
        text = str(e)  # str(KeyError(x)) is repr(x): hostile objects could make it fail
    except (RecursionError, ValueError):
        text = ""
    return _printable(text.replace("\n", " "), 200) or type(e).__name__


# ---- the allow-list: our own functions standing in for the globals a checkpoint names


def _int64s(v) -> bool:
    """A tuple of at most MAX_NDIM ints in [0, 2**63), as torch writes sizes and strides."""
    return type(v) is tuple and len(v) <= MAX_NDIM and all(type(x) is int and 0 <= x < 2**63 for x in v)


def _rebuild_tensor(storage, offset, size, stride, dtype: str) -> LazyTensor:
    """Validate a view (elements) of ``storage`` and return it lazily."""
    if not isinstance(storage, LazyStorage):
        raise pickle.UnpicklingError(f"tensor storage is a {type(storage).__name__}, not a storage")
    if not (
        type(offset) is int and 0 <= offset < 2**63 and _int64s(size) and _int64s(stride) and len(size) == len(stride)
    ):
        raise pickle.UnpicklingError("tensor offset/size/stride are not int64 values >= 0 of matching length")
    name = storage.archive.name
    itemsize = DTYPES[dtype].itemsize
    elements = storage.numel * DTYPES[storage.dtype].itemsize // itemsize
    numel = prod(size)
    if numel == 0:
        if offset > elements or prod(n for n in size if n) * itemsize >= 2**62:
            raise CheckpointError(
                f"{name}: empty tensor of shape {size} at offset {offset} of a {elements}-element storage; the "
                "file is corrupt"
            )
        return LazyTensor(storage, offset, size, stride, dtype)
    span = 1 + sum((n - 1) * s for n, s in zip(size, stride))
    if offset + span > elements:
        raise CheckpointError(
            f"{name}: tensor view (offset {offset}, shape {size}, stride {stride}) reaches element "
            f"{offset + span - 1} of a {elements}-element storage; the file is corrupt"
        )
    if numel > span and numel * itemsize > MAX_EXPANDED_BYTES:
        raise CheckpointError(
            f"{name}: tensor of shape {size} with stride {stride} expands {span} stored elements to {numel}, "
            f"over {MAX_EXPANDED_BYTES} bytes; the file is corrupt or hostile"
        )
    return LazyTensor(storage, offset, size, stride, dtype)


def _rebuild_tensor_v2(storage, offset, size, stride, requires_grad, hooks, metadata=None):
    """torch._utils._rebuild_tensor_v2: a tensor of the storage's own dtype."""
    if not isinstance(storage, LazyStorage):
        raise pickle.UnpicklingError(f"tensor storage is a {type(storage).__name__}, not a storage")
    return _rebuild_tensor(storage, offset, size, stride, storage.dtype)


def _rebuild_tensor_v3(storage, offset, size, stride, requires_grad, hooks, dtype, metadata=None):
    """torch._utils._rebuild_tensor_v3: an untyped storage viewed with ``dtype``."""
    if not (isinstance(dtype, _Sentinel) and dtype.name in _DTYPE_SENTINELS):
        raise pickle.UnpicklingError("tensor dtype is not a torch dtype")
    if dtype.dtype is None:
        name = storage.archive.name if isinstance(storage, LazyStorage) else "checkpoint"
        raise CheckpointError(
            f"{name}: holds a tensor of dtype {dtype.name}, which qkweights does not read "
            f"({', '.join(DTYPES)}); convert it with torch (tensor.float()) and re-save"
        )
    return _rebuild_tensor(storage, offset, size, stride, dtype.dtype)


def _rebuild_parameter(data, requires_grad, hooks, state=None):
    """torch._utils._rebuild_parameter[_with_state]: a Parameter is its tensor."""
    if not isinstance(data, LazyTensor):
        raise pickle.UnpicklingError(f"parameter data is a {type(data).__name__}, not a tensor")
    return data


def _ordered_dict():
    """collections.OrderedDict as torch pickles it: built empty, filled by SETITEMS."""
    return OrderedDict()


def _is_safe_key(x) -> bool:
    """Keys whose hashes an attacker cannot make collide cheaply (str/bytes hashes are salted)."""
    return x is None or type(x) in (str, bytes, bool) or (type(x) is int and abs(x) < 2**61)


def _set(items=()):
    """builtins.set over a list; at most MAX_UNSAFE_KEYS members of collidable types."""
    if type(items) not in (list, tuple):
        raise pickle.UnpicklingError("set() argument is not a list")
    if sum(not _is_safe_key(x) for x in items) > MAX_UNSAFE_KEYS:
        raise pickle.UnpicklingError(f"set has over {MAX_UNSAFE_KEYS} members that are not strings or small integers")
    return set(items)


def _codecs_encode(text, encoding):
    """_codecs.encode(str, "latin1"): how protocol 2 writes bytes."""
    if type(text) is not str or encoding not in ("latin1", "latin-1"):
        raise pickle.UnpicklingError("_codecs.encode is allowed only as encode(str, 'latin1')")
    return text.encode("latin1")


def _numpy_dtype(spec, align=False, copy=True):
    """numpy.dtype(spec) for plain numeric specs ("f8", "i8", "b1", …) only."""
    if type(spec) is not str or not _NUMPY_DTYPE.fullmatch(spec):
        raise pickle.UnpicklingError(f"numpy dtype {spec!r:.40} is not a plain numeric dtype")
    return _NumpyDtype(np.dtype(spec))


def _numpy_scalar(dtype, data):
    """numpy scalar from its dtype and raw bytes, decoded with np.frombuffer."""
    if not isinstance(dtype, _NumpyDtype) or type(data) is not bytes or len(data) != dtype.dtype.itemsize:
        raise pickle.UnpicklingError("numpy scalar is not a numeric dtype with matching raw bytes")
    return np.frombuffer(data, dtype=dtype.dtype)[0]


def _safe_globals() -> dict:
    table = {
        "torch._utils._rebuild_tensor_v2": _rebuild_tensor_v2,
        "torch._utils._rebuild_tensor_v3": _rebuild_tensor_v3,
        "torch._utils._rebuild_parameter": _rebuild_parameter,
        "torch._utils._rebuild_parameter_with_state": _rebuild_parameter,
        "collections.OrderedDict": _ordered_dict,
        "builtins.set": _set,
        "__builtin__.set": _set,
        "_codecs.encode": _codecs_encode,
        "numpy.dtype": _numpy_dtype,
        "numpy.core.multiarray.scalar": _numpy_scalar,
        "numpy._core.multiarray.scalar": _numpy_scalar,
    }
    out: dict = {k: _Safe(k, fn) for k, fn in table.items()}
    for cls, dtype in STORAGE_TYPES.items():
        out[f"torch.{cls}"] = _Sentinel(f"torch.{cls}", dtype)
    out["torch.storage.UntypedStorage"] = _Sentinel("torch.storage.UntypedStorage", "U8")
    for name in (*TORCH_DTYPES, *OTHER_TORCH_DTYPES):
        out[f"torch.{name}"] = _Sentinel(f"torch.{name}", TORCH_DTYPES.get(name))
    return out


_GLOBALS = _safe_globals()
_STORAGE_SENTINELS = {f"torch.{c}" for c in STORAGE_TYPES} | {"torch.storage.UntypedStorage"}
_DTYPE_SENTINELS = {f"torch.{d}" for d in (*TORCH_DTYPES, *OTHER_TORCH_DTYPES)}


class _SafeUnpickler(pickle.Unpickler):
    """Unpickler that resolves only the allow-list and reads storages lazily from ``archive``."""

    def __init__(self, file, archive: _Archive, records: frozenset[str]):
        super().__init__(file)
        self._archive = archive
        self._records = records
        self._record_types: dict[str, type] = {}
        self._storages: dict[str, LazyStorage] = {}

    def find_class(self, module, name):
        full = f"{module}.{name}"
        if full in _GLOBALS:
            return _GLOBALS[full]
        if full in self._records:
            if full not in self._record_types:
                self._record_types[full] = type(name, (Record,), {"__slots__": (), "_qualname": full})
            return self._record_types[full]
        raise CheckpointError(
            f"{self._archive.name}: refuses to load global {_printable(full)} (not a tensor or a known "
            "checkpoint container); qkweights never runs code from checkpoints"
        )

    def persistent_load(self, pid):
        if not (type(pid) is tuple and len(pid) == 5 and pid[0] == "storage"):
            raise pickle.UnpicklingError("persistent id is not ('storage', type, key, location, numel)")
        _, stype, key, _location, numel = pid
        if not (isinstance(stype, _Sentinel) and stype.name in _STORAGE_SENTINELS):
            what = stype.name if isinstance(stype, (_Safe, _Sentinel)) else f"a {type(stype).__name__}"
            raise CheckpointError(
                f"{self._archive.name}: a storage's type slot holds {what}, not a torch storage class; the "
                "file is corrupt or hostile"
            )
        if type(key) is not str or type(numel) is not int or not 0 <= numel < 2**63:
            raise pickle.UnpicklingError("storage key is not a string or its size not an int64 value >= 0")
        known = self._storages.get(key)
        if known is None:
            known = self._storages[key] = self._archive.storage(key, stype.dtype, numel)
        elif known.dtype != stype.dtype:
            raise CheckpointError(
                f"{self._archive.name}: storage data/{_printable(key)} is declared as both {known.dtype} and "
                f"{stype.dtype}; the file is corrupt"
            )
        return known


# ---- the pre-scan: bounds the C unpickler cannot enforce itself

_TUPLE_OPS = {"EMPTY_TUPLE", "TUPLE", "TUPLE1", "TUPLE2", "TUPLE3"}
_CALL_OPS = {"REDUCE", "BUILD", "NEWOBJ", "NEWOBJ_EX", "INST", "OBJ", "BINPERSID"}  # may return an argument
_KEY_OPS = {"SETITEM": 1, "SETITEMS": 1, "DICT": 0, "ADDITEMS": 1, "FROZENSET": 0}  # first key, step 2 for dicts
_SAFE_PUSH_OPS = {
    "STRING",
    "BINSTRING",
    "SHORT_BINSTRING",
    "BINBYTES",
    "SHORT_BINBYTES",
    "BINBYTES8",
    "UNICODE",
    "SHORT_BINUNICODE",
    "BINUNICODE",
    "BINUNICODE8",
    "NONE",
    "NEWTRUE",
    "NEWFALSE",
    "BININT",
    "BININT1",
    "BININT2",
}
_INT_OPS = {"INT", "LONG", "LONG1", "LONG4"}
_PUT_OPS = {"PUT", "BINPUT", "LONG_BINPUT", "MEMOIZE"}
_GET_OPS = {"GET", "BINGET", "LONG_BINGET"}
# opcode -> (pops down to a MARK?, items popped below the mark, items pushed), from pickletools' descriptions
_SHAPES = {
    op.name: (
        pickletools.markobject in op.stack_before,
        op.stack_before.index(pickletools.markobject)
        if pickletools.markobject in op.stack_before
        else len(op.stack_before),
        len(op.stack_after),
    )
    for op in pickletools.opcodes
}


def _scan_pickle(data: bytes) -> None:
    """Check ``data`` (a pickle) opcode by opcode before it is unpickled.

    Simulates the unpickler's stack (MARKs as fences, as the C unpickler
    does) with, per item, its tuple nesting depth and whether it is a
    collision-safe dict key. Raises :class:`pickle.UnpicklingError` for
    malformed opcodes, stack misuse, memo indices out of sequence (the C
    unpickler sizes its memo to the largest index: 10 bytes could claim
    gigabytes), tuples nested deeper than MAX_TUPLE_DEPTH, or more than
    MAX_UNSAFE_KEYS collidable dict/set keys.
    """
    stack: list[tuple[int, bool]] = []  # (tuple depth, safe key) per item
    marks: list[int] = []  # stack lengths at each MARK
    memo: dict[int, tuple[int, bool]] = {}
    unsafe_keys = 0
    for op, arg, _pos in pickletools.genops(data):
        name = op.name
        fence = marks[-1] if marks else 0
        if name in _PUT_OPS:
            index = len(memo) if name == "MEMOIZE" else arg
            if len(stack) <= fence or index > len(memo):
                raise pickle.UnpicklingError(f"memo index {index} is out of sequence (memo holds {len(memo)})")
            memo[index] = stack[-1]
            continue
        if name in _GET_OPS:
            if arg not in memo:
                raise pickle.UnpicklingError(f"memo index {arg} is read before it is written")
            stack.append(memo[arg])
            continue
        if name == "MARK":
            marks.append(len(stack))
            continue
        to_mark, below, after = _SHAPES[name]
        popped: list[tuple[int, bool]] = []
        if to_mark:
            if not marks:
                raise pickle.UnpicklingError(f"{name} without a MARK")
            fence = marks.pop()
            popped = stack[fence:]
            del stack[fence:]
            fence = marks[-1] if marks else 0
        if below:
            if len(stack) - below < fence:
                raise pickle.UnpicklingError(f"{name} on an empty stack")
            popped = stack[-below:] + popped
            del stack[-below:]
        if name in _KEY_OPS:
            first = _KEY_OPS[name]
            keys = popped[first::2] if name in ("SETITEM", "SETITEMS", "DICT") else popped[first:]
            unsafe_keys += sum(not safe for _, safe in keys)
            if unsafe_keys > MAX_UNSAFE_KEYS:
                raise pickle.UnpicklingError(
                    f"over {MAX_UNSAFE_KEYS} dictionary keys are not strings or small integers"
                )
        if name == "DUP":
            stack.extend(popped * 2)
        elif name in _TUPLE_OPS:
            depth = 1 + max((d for d, _ in popped), default=0)
            if depth > MAX_TUPLE_DEPTH:
                raise pickle.UnpicklingError(f"tuples nest deeper than {MAX_TUPLE_DEPTH}")
            stack.append((depth, False))
        elif name in _CALL_OPS:
            stack.append((max(d for d, _ in popped), False))
        elif after:
            stack.append((0, name in _SAFE_PUSH_OPS or (name in _INT_OPS and abs(arg) < 2**61)))


def _load(path: Path, records: frozenset[str]) -> tuple[object, _Archive]:
    archive = _Archive.open(path)
    data = archive.read_member("data.pkl", MAX_PICKLE_BYTES)
    try:
        _scan_pickle(data)
        with archive.held_open():
            return _SafeUnpickler(io.BytesIO(data), archive, records).load(), archive
    except CheckpointError:
        raise
    except (
        pickle.UnpicklingError,
        ValueError,
        TypeError,
        AttributeError,
        KeyError,
        IndexError,
        EOFError,
        RecursionError,
        OverflowError,
        UnicodeError,
        struct.error,
    ) as e:
        raise CheckpointError(
            f"{archive.name}: data.pkl is not a valid checkpoint pickle ({type(e).__name__}: {_short(e)}); the "
            "file is corrupt or not written by torch.save"
        ) from None


def read_torch_checkpoint(path, *, records: frozenset[str] = RECORD_CLASSES) -> object:
    """Unpickle a ``torch.save`` zip archive without torch and without running its code.

    Returns the object graph: dicts, lists, tuples and scalars as pickled,
    a :class:`LazyTensor` per tensor (no bytes read yet), a :class:`Record`
    per instance of a class named in ``records`` ("module.QualName"), numpy
    scalars for numpy scalars. Raises :class:`CheckpointError` for anything
    else, and for corrupt, truncated, legacy (pre-zip) or TorchScript files.
    """
    return _load(Path(path), records)[0]


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
                    f"{source}: tensor name {_printable(prefix)} occurs twice in the checkpoint (a key holds a "
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
        obj, archive = _load(path, RECORD_CLASSES)
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
            shown = ", ".join(_printable(p, 40) for p in self.parts()[:20])
            raise CheckpointError(f"{self.files[0].name}: has no part {part!r} (parts: {shown}); choose one of those")
        return TorchStore(_strip_module(tensors), self.files, {**self.metadata, "part": part})

    def get(self, name: str) -> np.ndarray:
        """The tensor ``name`` as a new numpy array (BF16 -> float32)."""
        return self.info(name).numpy()
