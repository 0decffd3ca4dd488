"""Long mutational fuzz run of qkweights.checkpoints.pytorch (a script: pytest does not collect it).

Run from the repository root:
    python tests/fuzz_torch_pickle.py --inputs 200000 --seed 1          # 3 minutes per 100k inputs on an idle core
    python tests/fuzz_torch_pickle.py --seed 1 --start 4711 --inputs 1  # replay input 4711 of seed 1

Input i of seed s comes from random.Random(f"{s}:{i}") and is one of:
- random bytes;
- a fixture archive (tests/pickle_fixtures/*.pt, benign and malicious; TorchScript left out) with random byte edits;
- a fixture archive whose data.pkl gets random edits (opcode fragments inserted, bytes set, spans deleted or
  duplicated, chunks spliced from another fixture's pickle, truncation), re-zipped with valid CRCs so that the
  edits reach the unpickler;
- the same with only integer operands (shapes, strides, offsets, numels), storage classes and torch dtype objects
  (_rebuild_tensor_v3) swapped, so that the pickle stays well-formed and the edits reach tensor validation and reading;
- a fixture with storage entries cut, grown or dropped, or its byteorder record changed.
Each input is read with read_torch_checkpoint and every tensor is materialised and, up to 1e5 elements,
compared with an independent read (the whole storage entry via zipfile, elements picked by bounds-checked
fancy indexing instead of as_strided).

A finding is: any exception other than CheckpointError; values differing from the independent read (an
IndexError there means a view reached outside its storage); a message spanning lines; an input slower than
--timeout seconds; an allocation the capped address space (--max-gb) refuses (MemoryError); a file appearing
in /tmp/qkweights-pwned (a payload ran; so do not regenerate the fixtures during a run: their liveness
check creates those markers). A crash of the interpreter ends the run: the last "input i" line
printed says where to --start a replay. Findings are saved to --out as <seed>-<index>.pt and summarised at the end.
"""

from __future__ import annotations

import argparse
import io
import pickletools
import random
import resource
import signal
import sys
import tempfile
import time
import traceback
import zipfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402

from qkweights.checkpoints.pytorch.archive import LazyTensor  # noqa: E402
from qkweights.checkpoints.pytorch.store import flatten_tensors  # noqa: E402
from qkweights.checkpoints.pytorch.unpickler import read_torch_checkpoint  # noqa: E402
from qkweights.checkpoints.tensors import DTYPES, widen_bf16  # noqa: E402
from qkweights.errors import CheckpointError  # noqa: E402

FIX = Path(__file__).resolve().parent / "pickle_fixtures"
MARKERS = Path("/tmp/qkweights-pwned")
FRAGMENTS = [
    b"(",
    b")",
    b"t",
    b"R",
    b"b",
    b"s",
    b"u",
    b"e",
    b"a",
    b"l",
    b"d",
    b"0",
    b"1",
    b"2",
    b"\x85",
    b"\x86",
    b"\x87",
    b"}",
    b"]",
    b"N",
    b"\x88",
    b"\x89",
    b"\x81",
    b"\x92",
    b"Q",
    b"P0\n",
    b"h\x00",
    b"h\x05",
    b"j\xff\xff\xff\x7f",
    b"q\x07",
    b"r\xff\xff\xff\x7f",
    b"\x94",
    b"\x8f",
    b"\x90",
    b"\x91",
    b"\x95\x00\x00\x00\x00\x00\x00\x00\x00",
    b"J\xff\xff\xff\x7f",
    b"J\xff\xff\xff\xff",
    b"K\x00",
    b"M\xff\xff",
    b"\x8a\x09" + b"\xff" * 9,
    b"\x8a\x08" + b"\x7f" * 8,
    b"\x8b\xff\xff\x00\x00" + b"\x01" * 10,
    b"X\x01\x00\x00\x000",
    b"X\xff\xff\xff\x7f",
    b"B\x04\x00\x00\x00abcd",
    b"G\x7f\xf0\x00\x00\x00\x00\x00\x00",
    b"ctorch\nFloatStorage\n",
    b"ctorch\nBFloat16Storage\n",
    b"ctorch\nBoolStorage\n",
    b"ctorch.storage\nUntypedStorage\n",
    b"ctorch\nfloat16\n",
    b"ctorch._utils\n_rebuild_tensor_v2\n",
    b"ctorch._utils\n_rebuild_tensor_v3\n",
    b"ctorch._utils\n_rebuild_parameter\n",
    b"ccollections\nOrderedDict\n",
    b"c__builtin__\nset\n",
    b"c_codecs\nencode\n",
    b"cargparse\nNamespace\n",
    b"cyacs.config\nCfgNode\n",
    b"cnumpy\ndtype\n",
    b"cnumpy._core.multiarray\nscalar\n",
    b"\x8c\x05torch\x8c\x05Size\x93",
    b"(X\x07\x00\x00\x00storagectorch\nFloatStorage\nX\x01\x00\x00\x000X\x03\x00\x00\x00cpuK\x06tQ",
]
INTS = [0, 1, 2, 3, 6, 7, -1, 2**31 - 1, -(2**31), 2**30, 255, 65535]
INT_OPERANDS = {"BININT1": 1, "BININT2": 2, "BININT": 4}
STORAGES = [
    b"FloatStorage",
    b"HalfStorage",
    b"BFloat16Storage",
    b"DoubleStorage",
    b"LongStorage",
    b"IntStorage",
    b"ShortStorage",
    b"CharStorage",
    b"ByteStorage",
    b"BoolStorage",
    b"ComplexFloatStorage",
]
TORCH_DTYPE_NAMES = [
    b"uint16",
    b"float32",
    b"float16",
    b"bfloat16",
    b"float64",
    b"int64",
    b"int8",
    b"uint8",
    b"bool",
    b"complex64",
]


def mutate_bytes(rng: random.Random, data: bytes, donors: list[bytes], rounds: int) -> bytes:
    out = bytearray(data)
    for _ in range(rounds):
        pos = rng.randrange(len(out) + 1)
        kind = rng.randrange(9)
        if kind == 0 and out:
            out[min(pos, len(out) - 1)] = rng.randrange(256)
        elif kind == 1 and out:
            out[min(pos, len(out) - 1)] ^= 1 << rng.randrange(8)
        elif kind == 2:
            del out[pos : pos + rng.randint(1, 64)]
        elif kind == 3:
            out[pos:pos] = rng.choice(FRAGMENTS)
        elif kind == 4:
            out[pos:pos] = out[pos : pos + rng.randint(1, 256)]
        elif kind == 5:
            donor = rng.choice(donors)
            start = rng.randrange(len(donor))
            out[pos:pos] = donor[start : start + rng.randint(1, 128)]
        elif kind == 6:
            hits = [j for j in range(len(out)) if out[j] == ord("J")]
            if hits:
                j = rng.choice(hits)
                out[j + 1 : j + 5] = rng.choice(INTS).to_bytes(4, "little", signed=True)
        elif kind == 7:
            del out[pos:]
        else:
            out[pos:pos] = rng.randbytes(rng.randint(1, 16))
    return bytes(out)


def mutate_operands(rng: random.Random, pkl: bytes, rounds: int) -> bytes:
    """Keep the pickle well-formed: change integer operands (shapes, strides, offsets, numels), storage types and
    dtypes."""
    out = bytearray(pkl)
    try:
        ints = [(pos, INT_OPERANDS[op.name]) for op, _, pos in pickletools.genops(pkl) if op.name in INT_OPERANDS]
    except ValueError:
        ints = []
    for _ in range(rounds):
        if ints and rng.random() < 0.8:
            pos, size = rng.choice(ints)
            value = rng.choice(INTS + [rng.randrange(256**size)]) % 256**size
            out[pos + 1 : pos + 1 + size] = value.to_bytes(size, "little")
        else:
            old, new = rng.sample(rng.choice([STORAGES, TORCH_DTYPE_NAMES]), 2)
            out = bytearray(bytes(out).replace(b"ctorch\n" + old + b"\n", b"ctorch\n" + new + b"\n", 1))
    return bytes(out)


def rezip(rng: random.Random, archive: bytes, pkl: bytes, edit_entries: bool) -> bytes:
    """The archive with ``pkl`` as data.pkl and valid CRCs; optionally storages cut, grown or dropped, byteorder
    changed."""
    out = io.BytesIO()
    with zipfile.ZipFile(io.BytesIO(archive)) as zin, zipfile.ZipFile(out, "w", zipfile.ZIP_STORED) as zout:
        for info in zin.infolist():
            raw = pkl if info.filename.endswith("/data.pkl") else zin.read(info)
            if edit_entries and rng.random() < 0.3:
                choice = rng.randrange(4)
                if choice == 0:
                    continue
                raw = (
                    raw[: rng.randrange(len(raw) + 1)],
                    raw + rng.randbytes(rng.randint(1, 8)),
                    rng.choice([b"big", b"little", b"middle"]),
                )[choice - 1]
            zout.writestr(info.filename, raw)
    return out.getvalue()


def data_pkl(archive: bytes) -> bytes:
    with zipfile.ZipFile(io.BytesIO(archive)) as z:
        return z.read(next(n for n in z.namelist() if n.endswith("/data.pkl")))


def make_input(rng: random.Random, corpus: list[bytes], pickles: list[bytes]) -> bytes:
    kind = rng.random()
    if kind < 0.05:
        return rng.randbytes(rng.randint(0, 4096))
    source = rng.randrange(len(corpus))
    if kind < 0.25:
        return mutate_bytes(rng, corpus[source], pickles, rng.randint(1, 8))
    if kind < 0.60:
        return rezip(rng, corpus[source], mutate_bytes(rng, pickles[source], pickles, rng.randint(1, 8)), False)
    if kind < 0.90:
        return rezip(rng, corpus[source], mutate_operands(rng, pickles[source], rng.randint(1, 4)), False)
    return rezip(rng, corpus[source], pickles[source], True)


class Timeout(Exception):
    pass


def on_alarm(signum, frame):
    raise Timeout


def expected_values(path: Path, t: LazyTensor) -> np.ndarray:
    """The tensor read independently: the whole storage entry via zipfile, elements picked by bounds-checked
    fancy indexing (offset + sum(index * stride)) rather than as_strided."""
    archive = t.storage.archive
    with zipfile.ZipFile(path) as z, z.open(archive.members[f"data/{t.storage.key}"]) as f:
        f._expected_crc = None  # qkweights does not check storage CRCs (torch does not either); neither does this read
        raw = f.read()
    dtype = DTYPES[t.dtype].newbyteorder(">" if archive.byteorder == "big" else "<")
    full = np.frombuffer(raw[: len(raw) // dtype.itemsize * dtype.itemsize], dtype=dtype)
    index = t.offset + sum(np.indices(t.shape, dtype=np.int64)[d] * t.stride[d] for d in range(len(t.shape)))
    values = full[index] if t.shape else full[np.int64(t.offset)]
    values = np.asarray(values)
    if t.dtype == "BF16":
        return widen_bf16(values)
    if t.dtype == "BOOL":
        return values.view(np.uint8) != 0
    return values.astype(values.dtype.newbyteorder("="))


def run_one(path: Path) -> str | None:
    """None if the input was read or refused cleanly, else a one-line description of the finding."""
    try:
        for t in flatten_tensors(read_torch_checkpoint(path)).values():
            got = t.numpy()
            if got.shape != t.shape:
                return f"numpy() shape differs from {t.shape}"
            if got.size > 10**5:
                continue
            try:
                expected = expected_values(path, t)
            except Exception as e:  # IndexError: the accepted view reaches outside its storage
                return f"independent read failed for an accepted tensor ({type(e).__name__}: {str(e)[:120]})"
            if not np.array_equal(got, expected, equal_nan=got.dtype.kind == "f"):
                return f"numpy() values differ from an independent read ({t.dtype}, shape {t.shape})"
    except CheckpointError as e:
        if "\n" in str(e):
            return f"multi-line message: {str(e)[:200]!r}"
    except Timeout:
        return "timeout"
    except BaseException as e:  # a finding whatever it is: the report must go on
        return f"{type(e).__name__}: {str(e)[:200]} @ {traceback.extract_tb(e.__traceback__)[-1].name}"
    if MARKERS.exists() and any(MARKERS.iterdir()):
        return f"payload ran: {sorted(p.name for p in MARKERS.iterdir())}"
    return None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--inputs", type=int, default=100000)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--start", type=int, default=0)
    parser.add_argument("--timeout", type=float, default=5.0)
    parser.add_argument("--max-gb", type=float, default=4.0)
    parser.add_argument("--out", type=Path, default=Path(tempfile.gettempdir()) / "qkweights-fuzz")
    args = parser.parse_args()

    limit = int(args.max_gb * 2**30)
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    signal.signal(signal.SIGALRM, on_alarm)
    args.out.mkdir(parents=True, exist_ok=True)
    corpus = [p.read_bytes() for p in sorted(FIX.glob("*.pt")) if zipfile.is_zipfile(p)]
    corpus = [
        c
        for c in corpus
        if any(n.endswith("/data.pkl") for n in zipfile.ZipFile(io.BytesIO(c)).namelist())
        and not any(n.endswith("/constants.pkl") for n in zipfile.ZipFile(io.BytesIO(c)).namelist())
    ]
    pickles = [data_pkl(c) for c in corpus]
    findings: dict[str, list[int]] = {}
    slowest = (0.0, -1)
    work = Path(tempfile.mkdtemp(prefix="fuzz-", dir=args.out)) / "input.pt"
    began = time.monotonic()
    for index in range(args.start, args.start + args.inputs):
        if index % 5000 == 0:
            print(
                f"input {index} ({time.monotonic() - began:.0f} s, {sum(map(len, findings.values()))} findings)",
                flush=True,
            )
        data = make_input(random.Random(f"{args.seed}:{index}"), corpus, pickles)
        work.write_bytes(data)
        t0 = time.monotonic()
        signal.setitimer(signal.ITIMER_REAL, args.timeout)
        finding = run_one(work)
        signal.setitimer(signal.ITIMER_REAL, 0)
        took = time.monotonic() - t0
        slowest = max(slowest, (took, index))
        if finding:
            findings.setdefault(finding, []).append(index)
            (args.out / f"{args.seed}-{index}.pt").write_bytes(data)
    print(
        f"{args.inputs} inputs (seed {args.seed}, from {args.start}) in {time.monotonic() - began:.0f} s; "
        f"slowest input {slowest[1]} took {slowest[0]:.2f} s"
    )
    for finding, indices in sorted(findings.items(), key=lambda kv: -len(kv[1])):
        print(f"{len(indices):6d} x {finding}   e.g. --start {indices[0]}")
    if not findings:
        print("no findings")
    sys.exit(1 if findings else 0)


if __name__ == "__main__":
    main()
