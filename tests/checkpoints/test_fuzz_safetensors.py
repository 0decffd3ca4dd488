"""Fuzzing the safetensors reader: any bytes give either tensors or one CheckpointError, quickly.

The default suite runs a bounded number of examples; a longer run:
``QKW_FUZZ_EXAMPLES=20000 python -m pytest tests/checkpoints/test_fuzz_safetensors.py``.
"""

import json
import os
import struct
import time

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.numpy import save

from qkweights.checkpoints.tensors import TensorStore
from qkweights.errors import CheckpointError

EXAMPLES = int(os.environ.get("QKW_FUZZ_EXAMPLES", "200"))
FUZZ = settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck))
VALID = save(
    {"a": np.arange(6, dtype=np.float32).reshape(2, 3), "b": np.ones(4, np.float16), "c": np.zeros((1, 2), np.float64)}
)


def read_all(tmp_path, data: bytes) -> None:
    """Open and read every tensor; only CheckpointError may escape, and within a second."""
    path = tmp_path / "f.safetensors"
    path.write_bytes(data)
    start = time.monotonic()
    try:
        store = TensorStore.open([path])
        for name in store.names():
            arr = store.get(name)
            assert arr.nbytes <= len(data)  # never allocates more than the file holds
    except CheckpointError as e:
        assert "\n" not in str(e) and str(e).startswith("f.safetensors")
    assert time.monotonic() - start < 1.0


@FUZZ
@given(st.binary(max_size=512))
def test_arbitrary_bytes(tmp_path_factory, data):
    read_all(tmp_path_factory.mktemp("fz"), data)


@FUZZ
@given(st.lists(st.tuples(st.integers(0, len(VALID) - 1), st.integers(0, 255)), min_size=1, max_size=8))
def test_mutated_valid_file(tmp_path_factory, edits):
    data = bytearray(VALID)
    for pos, byte in edits:
        data[pos] = byte
    read_all(tmp_path_factory.mktemp("fz"), bytes(data))


entry = st.fixed_dictionaries(
    {
        "dtype": st.sampled_from(["F32", "F16", "BF16", "F64", "I64", "U8", "BOOL", "X9"]),
        "shape": st.lists(st.integers(-2, 2**62), max_size=4),
        "data_offsets": st.lists(st.integers(-2, 2**63), min_size=0, max_size=3),
    }
)


@FUZZ
@given(
    st.dictionaries(st.text(max_size=8), entry, max_size=4),
    st.binary(max_size=64),
    st.integers(0, 2**64 - 1) | st.none(),
)
def test_hostile_headers(tmp_path_factory, header, data, length):
    """Huge declared shapes and lengths, offsets past the end, overlaps, unknown dtypes."""
    text = json.dumps(header).encode()
    raw = struct.pack("<Q", len(text) if length is None else length) + text + data
    read_all(tmp_path_factory.mktemp("fz"), raw)
