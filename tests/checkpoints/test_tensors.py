"""Safetensors reading: values, dtypes (BF16 widening), row reads and every kind of corrupt header.

Headers are validated by the safetensors library; the messages below are qkweights' wording of its
rejections (naming the file, and the tensor where the library does not), pinned exactly where the
wording is ours and by pattern where it quotes the library.
"""

import json
import struct

import numpy as np
import pytest
from safetensors.numpy import save_file

from qkweights.checkpoints.tensors import TensorStore, read_header, widen_bf16
from qkweights.errors import CheckpointError


def raw_file(path, header: dict, data: bytes, *, length: int | None = None):
    text = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(text) if length is None else length) + text + data)
    return path


def test_values_and_dtypes_round_trip(tmp_path):
    rng = np.random.default_rng(0)
    arrays = {
        "a": rng.standard_normal((3, 4)).astype(np.float32),
        "b": rng.standard_normal(5).astype(np.float16),
        "c": rng.standard_normal((2, 2)),
        "d": np.arange(4, dtype=np.int64),
    }
    save_file(arrays, tmp_path / "m.safetensors")
    store = TensorStore.open([tmp_path / "m.safetensors"])
    assert sorted(store.names()) == ["a", "b", "c", "d"]
    for k, v in arrays.items():
        got = store.get(k)
        assert got.dtype == v.dtype and np.array_equal(got, v)
    assert store.shape("a") == (3, 4) and store.dtype("b") == "F16"


def test_bf16_is_widened_exactly():
    # bfloat16 1.0 = 0x3F80, -2.5 = 0xC020, smallest subnormal = 0x0001 (9.18e-41), from the IEEE layout.
    raw = np.array([0x3F80, 0xC020, 0x0001], np.uint16)
    got = widen_bf16(raw)
    assert got.dtype == np.float32
    assert got[0] == 1.0 and got[1] == -2.5 and got[2] == np.float32(2.0**-133)


def test_bf16_file(tmp_path):
    bits = np.array([[0x3F80, 0x4000], [0xBF80, 0x3E80]], np.uint16)  # 1, 2, -1, 0.25
    raw_file(
        tmp_path / "b.safetensors", {"w": {"dtype": "BF16", "shape": [2, 2], "data_offsets": [0, 8]}}, bits.tobytes()
    )
    got = TensorStore.open([tmp_path / "b.safetensors"]).get("w")
    assert np.array_equal(got, np.array([[1, 2], [-1, 0.25]], np.float32))


@pytest.mark.parametrize(
    "header, data, length, message",
    [
        (
            {},
            b"",
            2**40,
            "b.safetensors: header length 1099511627776 exceeds the 100000000-byte limit; the file is corrupt "
            "or not safetensors",
        ),
        (
            {},
            b"",
            1000,
            "b.safetensors: header length 1000 exceeds the file size (10 bytes); the file is truncated or not "
            "safetensors",
        ),
        (
            {"w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}},
            b"\0" * 4,
            None,
            "b.safetensors: tensor 'w' offsets [0, 8] lie outside the data section (4 bytes); the file is "
            "truncated or corrupt",
        ),
        (
            {"w": {"dtype": "F32", "shape": [3], "data_offsets": [0, 8]}},
            b"\0" * 8,
            None,
            "b.safetensors: tensor 'w' shape [3] of F32 needs 12 bytes but its offsets span 8; the file is corrupt",
        ),
        (
            {"w": {"dtype": "Q4", "shape": [2], "data_offsets": [0, 8]}},
            b"\0" * 8,
            None,
            "b.safetensors: a tensor has unsupported dtype 'Q4' (known: F64, F32, F16, BF16, I64, I32, I16, "
            "I8, U8, BOOL)",
        ),
        (
            {
                "w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
                "x": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]},
            },
            b"\0" * 12,
            None,
            "b.safetensors: tensor 'x' does not start where the tensor before it ends (overlap or gap); the "
            "file is corrupt",
        ),
        (
            {"w": {"dtype": "U16", "shape": [2], "data_offsets": [0, 4]}},
            b"\0" * 4,
            None,
            "b.safetensors: tensor 'w' has unsupported dtype 'U16' (known: F64, F32, F16, BF16, I64, I32, I16, "
            "I8, U8, BOOL)",
        ),
        (
            {
                "w": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]},
                "x": {"dtype": "F32", "shape": [1], "data_offsets": [8, 12]},
            },
            b"\0" * 12,
            None,
            "b.safetensors: tensor 'x' does not start where the tensor before it ends (overlap or gap); the "
            "file is corrupt",
        ),
    ],
)
def test_corrupt_headers_are_named(tmp_path, header, data, length, message):
    raw_file(tmp_path / "b.safetensors", header, data, length=length)
    with pytest.raises(CheckpointError) as e:
        TensorStore.open([tmp_path / "b.safetensors"])
    assert str(e.value) == message


@pytest.mark.parametrize(
    "header, data, pattern",
    [
        (
            {"w": {"dtype": "F32", "shape": [-2], "data_offsets": [0, 8]}},
            b"\0" * 8,
            r"b\.safetensors: header is not valid JSON for safetensors \(invalid value: integer `-2`.*\); the "
            r"file is corrupt or not safetensors",
        ),
        (
            {"w": [1, 2]},
            b"",
            r"b\.safetensors: header is not valid JSON for safetensors \(invalid type: .*\); the file is "
            r"corrupt or not safetensors",
        ),
        (
            {"__metadata__": {"a": 1}},
            b"",
            r"b\.safetensors: header is not valid JSON for safetensors \(.*\); the file is corrupt or not safetensors",
        ),
        # the format forbids bytes no tensor covers (our former reader allowed them)
        (
            {"w": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}},
            b"\0" * 8,
            r"b\.safetensors: the tensors do not cover the 8-byte data section exactly \(.*\); the file is "
            r"truncated or corrupt",
        ),
        (
            {"w": {"dtype": "F32", "shape": [2**40, 2**40], "data_offsets": [0, 8]}},
            b"\0" * 8,
            r"b\.safetensors: .*overflow.*; the file is corrupt or not safetensors",
        ),
    ],
)
def test_library_rejections_are_one_line(tmp_path, header, data, pattern):
    raw_file(tmp_path / "b.safetensors", header, data)
    with pytest.raises(CheckpointError, match=pattern) as e:
        TensorStore.open([tmp_path / "b.safetensors"])
    assert "\n" not in str(e.value)


def test_control_characters_in_names_stay_on_one_line(tmp_path):
    raw_file(tmp_path / "b.safetensors", {"a\nb": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]}}, b"\0" * 12)
    with pytest.raises(CheckpointError) as e:
        TensorStore.open([tmp_path / "b.safetensors"])
    assert str(e.value) == (
        "b.safetensors: tensor 'a\\nb' does not start where the tensor before it ends (overlap or gap); the file "
        "is corrupt"
    )


def test_not_json_and_too_short(tmp_path):
    (tmp_path / "b.safetensors").write_bytes(struct.pack("<Q", 3) + b"{x}")
    with pytest.raises(CheckpointError, match="header is not valid JSON"):
        read_header(tmp_path / "b.safetensors")
    (tmp_path / "c.safetensors").write_bytes(b"abc")
    with pytest.raises(CheckpointError, match="too short to be safetensors"):
        read_header(tmp_path / "c.safetensors")


def test_truncated_real_file(tmp_path):
    save_file({"a": np.ones((64, 64), np.float32)}, tmp_path / "m.safetensors")
    data = (tmp_path / "m.safetensors").read_bytes()
    (tmp_path / "t.safetensors").write_bytes(data[: len(data) - 100])
    with pytest.raises(CheckpointError, match="t.safetensors: tensor 'a' offsets .* lie outside the data section"):
        TensorStore.open([tmp_path / "t.safetensors"])


def test_missing_tensor_and_overlapping_shards(tmp_path):
    save_file({"a": np.ones(2, np.float32)}, tmp_path / "1.safetensors")
    save_file({"a": np.ones(2, np.float32)}, tmp_path / "2.safetensors")
    store = TensorStore.open([tmp_path / "1.safetensors"])
    with pytest.raises(CheckpointError, match="tensor 'zz' is missing from 1.safetensors"):
        store.get("zz")
    with pytest.raises(CheckpointError, match="tensor 'a' is also in 1.safetensors; the shards overlap"):
        TensorStore.open([tmp_path / "1.safetensors", tmp_path / "2.safetensors"])


def test_rows_read_only_what_is_asked(tmp_path):
    rng = np.random.default_rng(1)
    w = rng.standard_normal((12, 5)).astype(np.float32)
    save_file({"w": w, "s": np.array(2.0, np.float32)}, tmp_path / "m.safetensors")
    store = TensorStore.open([tmp_path / "m.safetensors"])
    for start, stop in [(0, 12), (3, 7), (10, 99), (5, 5), (8, 2), (-4, 12)]:
        got = store.rows("w", start, stop)
        assert got.dtype == np.float32 and np.array_equal(got, w[start:stop]), (start, stop)
    with pytest.raises(CheckpointError, match="is a scalar; it has no rows"):
        store.rows("s", 0, 1)


def test_bf16_rows(tmp_path):
    bits = np.arange(0x3F80, 0x3F80 + 12, dtype=np.uint16).reshape(4, 3)
    raw_file(
        tmp_path / "b.safetensors",
        {
            "pad": {"dtype": "U8", "shape": [2], "data_offsets": [0, 2]},
            "w": {"dtype": "BF16", "shape": [4, 3], "data_offsets": [2, 26]},
        },
        b"\0\0" + bits.tobytes(),
    )
    store = TensorStore.open([tmp_path / "b.safetensors"])
    assert np.array_equal(store.get("w"), widen_bf16(bits))
    assert np.array_equal(store.rows("w", 1, 3), widen_bf16(bits[1:3]))
    assert store.rows("w", 2, 2).shape == (0, 3)


def test_file_changed_after_open(tmp_path):
    """Every read re-validates through the library: a file truncated after open gives a CheckpointError, not garbage."""
    save_file({"a": np.ones((64, 64), np.float32)}, tmp_path / "m.safetensors")
    store = TensorStore.open([tmp_path / "m.safetensors"])
    data = (tmp_path / "m.safetensors").read_bytes()
    (tmp_path / "m.safetensors").write_bytes(data[:-100])
    with pytest.raises(CheckpointError, match="m.safetensors: tensor 'a' offsets .* lie outside the data section"):
        store.get("a")
