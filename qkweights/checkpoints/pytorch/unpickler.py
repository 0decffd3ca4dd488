"""Unpickling ``data.pkl`` of a ``torch.save`` archive without torch, safely.

Unpickling normally imports and calls whatever the pickle names, so a checkpoint
can run code. Here ``data.pkl`` is unpickled by :class:`pickle.Unpickler` whose
``find_class`` resolves only an allow-list, each name mapped to our own inert
function or sentinel (never the real one):

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
whose hashes an attacker can make collide); tensor views are checked against
their storage before any byte is read (the bytes themselves are read lazily by
:mod:`qkweights.checkpoints.pytorch.archive`).
"""

from __future__ import annotations

import io
import pickle
import pickletools
import re
import struct
from collections import OrderedDict
from math import prod
from pathlib import Path

import numpy as np

from qkweights.checkpoints.pytorch.archive import (
    NO_SETSTATE,
    Archive,
    LazyStorage,
    LazyTensor,
    describe,
    printable,
)
from qkweights.checkpoints.tensors import DTYPES
from qkweights.errors import CheckpointError

MAX_PICKLE_BYTES = 32 * 2**20  # data.pkl of a ViT-H checkpoint with optimizer state is < 1 MB
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

_NUMPY_DTYPE = re.compile(r"(b1|[iu][1248]|f[248]|c8|c16)")


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
        raise pickle.UnpicklingError(NO_SETSTATE)

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
        raise pickle.UnpicklingError(NO_SETSTATE)


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

    def __init__(self, file, archive: Archive, records: frozenset[str]):
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
            f"{self._archive.name}: refuses to load global {printable(full)} (not a tensor or a known "
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
                f"{self._archive.name}: storage data/{printable(key)} is declared as both {known.dtype} and "
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
        if name in _PUT_OPS or name in _GET_OPS:
            _memo_op(name, arg, stack, marks, memo)
        elif name == "MARK":
            marks.append(len(stack))
        else:
            popped = _pop_operands(name, stack, marks)
            unsafe_keys += _unsafe_keys(name, popped)
            if unsafe_keys > MAX_UNSAFE_KEYS:
                raise pickle.UnpicklingError(
                    f"over {MAX_UNSAFE_KEYS} dictionary keys are not strings or small integers"
                )
            _push_result(name, arg, popped, stack)


def _memo_op(name: str, arg, stack: list, marks: list[int], memo: dict) -> None:
    """A memo write (PUT, BINPUT, LONG_BINPUT, MEMOIZE) of the top item, in sequence, or a read (GET...) of a
    written index."""
    if name in _PUT_OPS:
        fence = marks[-1] if marks else 0
        index = len(memo) if name == "MEMOIZE" else arg
        if len(stack) <= fence or index > len(memo):
            raise pickle.UnpicklingError(f"memo index {index} is out of sequence (memo holds {len(memo)})")
        memo[index] = stack[-1]
        return
    if arg not in memo:
        raise pickle.UnpicklingError(f"memo index {arg} is read before it is written")
    stack.append(memo[arg])


def _pop_operands(name: str, stack: list, marks: list[int]) -> list[tuple[int, bool]]:
    """Pop what opcode ``name`` consumes (``_SHAPES``: the items above its MARK, then ``below`` items), never
    through a MARK's fence."""
    to_mark, below, _after = _SHAPES[name]
    fence = marks[-1] if marks else 0
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
    return popped


def _unsafe_keys(name: str, popped: list[tuple[int, bool]]) -> int:
    """How many of the dict/set keys opcode ``name`` inserts (from ``popped``) are collidable."""
    if name not in _KEY_OPS:
        return 0
    first = _KEY_OPS[name]
    keys = popped[first::2] if name in ("SETITEM", "SETITEMS", "DICT") else popped[first:]
    return sum(not safe for _, safe in keys)


def _push_result(name: str, arg, popped: list[tuple[int, bool]], stack: list) -> None:
    """Push what opcode ``name`` leaves on the stack: its tuple depth (at most MAX_TUPLE_DEPTH) and key safety."""
    after = _SHAPES[name][2]
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


def load_archive(path: Path, records: frozenset[str]) -> tuple[object, Archive]:
    archive = Archive.open(path)
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
            f"{archive.name}: data.pkl is not a valid checkpoint pickle ({type(e).__name__}: {describe(e)}); the "
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
    return load_archive(Path(path), records)[0]
