"""Tests of qkweights.checkpoints.pytorch: torch.save archives read without torch, and hostile files refused.

Reference values: tests/pickle_fixtures/*.npz, written by make_pickle_fixtures.py from the tensors torch
saved (BF16 as torch's tensor.float()). Malicious fixtures: evil_*.pt / evil_*.pkl, whose payloads the
same script checked to be live (torch.load(weights_only=False) creates /tmp/qkweights-pwned/<name>).
Other hostile inputs are written here opcode by opcode, inside the torch zip layout (`_archive`).
"""

from __future__ import annotations

import os
import struct
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from qkweights.checkpoints.pytorch import archive, unpickler
from qkweights.checkpoints.pytorch.archive import LazyTensor
from qkweights.checkpoints.pytorch.store import TorchStore, flatten_tensors
from qkweights.checkpoints.pytorch.unpickler import Record, read_torch_checkpoint
from qkweights.errors import CheckpointError

FIX = Path(__file__).resolve().parents[1] / "pickle_fixtures"
MARKERS = Path("/tmp/qkweights-pwned")
VALUE_FIXTURES = ("state_dict", "training", "dtypes", "ijepa")
EVIL = {
    "evil_os_system": "os.system",
    "evil_builtins_eval": "builtins.eval",
    "evil_popen": "subprocess.Popen",
    "evil_nested": "posix.system",
    "evil_storage_type": "posix.system",
}
REFUSAL = (
    "{file}: refuses to load global {name} (not a tensor or a known checkpoint container); qkweights never runs code "
    "from checkpoints"
)


# ---- writing pickles opcode by opcode (protocol 2), in the torch.save zip layout


def s(text: str) -> bytes:
    raw = text.encode()
    return b"X" + len(raw).to_bytes(4, "little") + raw


def i(n: int) -> bytes:
    if -(2**31) <= n < 2**31:
        return b"J" + n.to_bytes(4, "little", signed=True)
    raw = n.to_bytes((n.bit_length() + 8) // 8, "little", signed=True)
    return b"\x8a" + bytes([len(raw)]) + raw


def tup(*items: bytes) -> bytes:
    return b"(" + b"".join(items) + b"t"


def glob(module: str, name: str) -> bytes:
    return f"c{module}\n{name}\n".encode()


def tensor(key="0", stype="FloatStorage", numel=6, offset=0, size=(2, 3), stride=(3, 1)) -> bytes:
    """_rebuild_tensor_v2(storage pid, offset, size, stride, False, OrderedDict()), as torch writes it."""
    pid = tup(s("storage"), glob("torch", stype), s(key), s("cpu"), i(numel))
    return (
        glob("torch._utils", "_rebuild_tensor_v2")
        + b"("
        + pid
        + b"Q"
        + i(offset)
        + tup(*map(i, size))
        + tup(*map(i, stride))
        + b"\x89"
        + glob("collections", "OrderedDict")
        + b")RtR"
    )


def pdict(**items: bytes) -> bytes:
    return b"}(" + b"".join(s(k) + v for k, v in items.items()) + b"u"


def pickle_of(body: bytes) -> bytes:
    return b"\x80\x02" + body + b"."


F32_0_TO_5 = np.arange(6, dtype="<f4").tobytes()


def _archive(
    path: Path,
    pkl: bytes,
    storages: dict[str, bytes] | None = None,
    *,
    byteorder: bytes = b"little",
    compression: int = zipfile.ZIP_STORED,
    extra: dict[str, bytes] | None = None,
) -> Path:
    """A zip in torch.save's layout: archive/{data.pkl, data/<key>, byteorder, version}."""
    storages = {"0": F32_0_TO_5} if storages is None else storages
    with zipfile.ZipFile(path, "w", compression) as z:
        z.writestr("archive/data.pkl", pkl)
        for key, raw in storages.items():
            z.writestr(f"archive/data/{key}", raw)
        z.writestr("archive/byteorder", byteorder)
        z.writestr("archive/version", b"3\n")
        for name, raw in (extra or {}).items():
            z.writestr(name, raw)
    return path


def _data_pkl(path: Path) -> bytes:
    with zipfile.ZipFile(path) as z:
        return z.read(next(n for n in z.namelist() if n.endswith("/data.pkl")))


def _rezip(src: Path, dst: Path, *, pkl: bytes | None = None, compression: int = zipfile.ZIP_STORED) -> Path:
    """Copy a torch archive entry by entry, optionally replacing data.pkl and compressing entries."""
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w", compression) as zout:
        for info in zin.infolist():
            raw = pkl if pkl is not None and info.filename.endswith("/data.pkl") else zin.read(info)
            zout.writestr(info.filename, raw)
    return dst


def _central_entry(raw: bytes, name: str) -> int:
    """Offset of ``name``'s central-directory header in zip bytes ``raw``."""
    pos = raw.index(b"PK\x01\x02")
    while True:
        n = struct.unpack_from("<H", raw, pos + 28)[0]
        if raw[pos + 46 : pos + 46 + n] == name.encode():
            return pos
        pos = raw.index(b"PK\x01\x02", pos + 4)


def _refused(path: Path) -> str:
    with pytest.raises(CheckpointError) as e:
        read_torch_checkpoint(path)
    return str(e.value)


# ---- values and layout


@pytest.mark.parametrize("fixture", VALUE_FIXTURES)
def test_every_tensor_matches_what_torch_saved(fixture):
    expected = np.load(FIX / f"{fixture}.npz")
    tensors = flatten_tensors(read_torch_checkpoint(FIX / f"{fixture}.pt"))
    assert sorted(tensors) == sorted(expected.files)
    for name in expected.files:
        got = tensors[name].numpy()
        assert got.dtype == expected[name].dtype, name
        assert got.shape == expected[name].shape == tensors[name].shape, name
        np.testing.assert_array_equal(got, expected[name], err_msg=name)


def test_big_endian_archive_matches_little_endian_values():
    expected = np.load(FIX / "dtypes.npz")
    store = TorchStore.open(FIX / "bigendian.pt")
    assert store.metadata["byteorder"] == "big"
    for name in expected.files:
        got = store.get(name)
        assert got.dtype == expected[name].dtype and got.dtype.isnative, name
        np.testing.assert_array_equal(got, expected[name], err_msg=name)


def test_views_strides_and_shared_storage_are_kept():
    sd = read_torch_checkpoint(FIX / "state_dict.pt")
    qkv, t = sd["blocks.0.attn.qkv.weight"], sd["transposed"]
    assert (qkv.shape, qkv.stride) == ((6, 4), (4, 1))
    assert (t.shape, t.stride, t.storage) == ((4, 6), (1, 4), qkv.storage)  # torch: qkv.t()
    view, base = sd["view"], sd["base"]
    assert (view.offset, view.shape, view.stride) == (7, (2, 3), (5, 1))  # base[1:3, 2:] of a (4, 5) tensor
    assert view.storage is base.storage
    assert sd["embed.weight"] is sd["head.weight"]  # one tensor under two names (tied weights)
    assert sd["expanded"].stride == (0, 1)
    np.testing.assert_array_equal(sd["view"].numpy(), sd["base"].numpy()[1:3, 2:])
    np.testing.assert_array_equal(sd["transposed"].numpy(), sd["blocks.0.attn.qkv.weight"].numpy().T)


def test_numpy_returns_a_fresh_contiguous_array_each_time():
    t = read_torch_checkpoint(FIX / "state_dict.pt")["transposed"]
    a, b = t.numpy(), t.numpy()
    assert a.flags.c_contiguous and a.flags.writeable and not np.shares_memory(a, b)
    a[...] = 0
    assert b.any()


def _storage_offsets(path: Path) -> dict[str, int]:
    """Entry name -> absolute offset of its data: local header (30 bytes) + name + extra field, per the zip spec."""
    raw = path.read_bytes()
    out = {}
    with zipfile.ZipFile(path) as z:
        for info in z.infolist():
            n_name, n_extra = struct.unpack_from("<HH", raw, info.header_offset + 26)
            out[info.filename] = info.header_offset + 30 + n_name + n_extra
    return out


def test_reads_only_the_bytes_a_tensor_spans(monkeypatch):
    reads = []
    real = os.preadv

    def spy(fd, buffers, offset):
        reads.append((offset, sum(len(b) for b in buffers)))
        return real(fd, buffers, offset)

    monkeypatch.setattr(archive.os, "preadv", spy)
    path = FIX / "state_dict.pt"
    offsets = _storage_offsets(path)
    sd = read_torch_checkpoint(path)
    with zipfile.ZipFile(path) as z:
        storages = {offsets[i.filename] for i in z.infolist() if "/data/" in i.filename and i.file_size}
    assert not {offset for offset, _ in reads} & storages  # headers and data.pkl only: no storage byte read yet
    reads.clear()
    sd["view"].numpy()  # base[1:3, 2:] of a (4, 5) float32 storage: elements 7 .. 7 + (2-1)*5 + (3-1)*1 = 14
    base = offsets[f"state_dict/data/{sd['base'].storage.key}"]
    assert [r for r in reads if r[1] > 30] == [(base + 7 * 4, 8 * 4)]


def test_training_checkpoint_records_and_numpy_scalars():
    ck = read_torch_checkpoint(FIX / "training.pt")
    args = ck["args"]
    assert isinstance(args, Record) and args.cls == "argparse.Namespace"
    assert {k: args.state[k] for k in ("lr", "model", "epochs", "tags")} == {
        "lr": 1e-3,
        "model": "vit_tiny",
        "epochs": 300,
        "tags": {"ssl"},
    }
    assert (args.state["output_dir"].cls, args.state["output_dir"].args) == ("pathlib.PosixPath", ("/", "runs", "1"))
    assert (args.state["device"].cls, args.state["device"].args) == ("torch.device", ("cpu",))
    config = ck["config"]
    assert config.cls == "yacs.config.CfgNode" and config.state["__immutable__"] is True
    assert config.items["MODEL"].items == {"TYPE": "vit"} and config.items["TRAIN"].items == {"BASE_LR": 5e-4}
    assert ck["epoch"] == 3
    assert type(ck["best_acc"]) is np.float64 and ck["best_acc"] == 0.625
    assert type(ck["step"]) is np.int64 and ck["step"] == 7
    assert ck["optimizer"]["param_groups"][0]["lr"] == 1e-3 and ck["optimizer"]["param_groups"][0]["params"] == [
        0,
        1,
        2,
        3,
    ]
    assert isinstance(ck["optimizer"]["state"][0]["exp_avg"], LazyTensor)


def test_records_is_the_allow_list_of_inert_classes(tmp_path):
    assert _refused_records(FIX / "training.pt", frozenset()) == REFUSAL.format(
        file="training.pt", name="argparse.Namespace"
    )
    pkl = pickle_of(pdict(cfg=glob("mylib.config", "Config") + b")\x81" + pdict(depth=i(12)) + b"b"))
    ck = read_torch_checkpoint(_archive(tmp_path / "c.pt", pkl), records=frozenset({"mylib.config.Config"}))
    assert (ck["cfg"].cls, ck["cfg"].args, ck["cfg"].state) == ("mylib.config.Config", (), {"depth": 12})


def _refused_records(path, records):
    with pytest.raises(CheckpointError) as e:
        read_torch_checkpoint(path, records=records)
    return str(e.value)


def test_crafted_tensor_pickle_reads_its_storage(tmp_path):
    pkl = pickle_of(
        pdict(w=tensor(), t=tensor(size=(3, 2), stride=(1, 3)), tail=tensor(offset=4, size=(2,), stride=(1,)))
    )
    sd = read_torch_checkpoint(_archive(tmp_path / "a.pt", pkl))
    np.testing.assert_array_equal(sd["w"].numpy(), np.arange(6, dtype=np.float32).reshape(2, 3))
    np.testing.assert_array_equal(sd["t"].numpy(), np.arange(6, dtype=np.float32).reshape(2, 3).T)
    np.testing.assert_array_equal(sd["tail"].numpy(), [4, 5])


def tensor_v3(dtype: str, size: tuple[int, ...], stride: tuple[int, ...]) -> bytes:
    """_rebuild_tensor_v3 over a 24-byte untyped storage, as torch writes it for its newer dtypes."""
    pid = tup(s("storage"), glob("torch.storage", "UntypedStorage"), s("0"), s("cpu"), i(24))
    return (
        glob("torch._utils", "_rebuild_tensor_v3")
        + b"("
        + pid
        + b"Q"
        + i(0)
        + tup(*map(i, size))
        + tup(*map(i, stride))
        + b"\x89"
        + glob("collections", "OrderedDict")
        + b")R"
        + glob("torch", dtype)
        + b"tR"
    )


def test_untyped_storage_is_viewed_with_the_tensor_dtype(tmp_path):
    sd = read_torch_checkpoint(_archive(tmp_path / "v3.pt", pickle_of(pdict(w=tensor_v3("float32", (2, 3), (3, 1))))))
    assert (sd["w"].dtype, sd["w"].storage.dtype, sd["w"].storage.numel) == ("F32", "U8", 24)
    np.testing.assert_array_equal(sd["w"].numpy(), np.arange(6, dtype=np.float32).reshape(2, 3))
    too_long = _archive(tmp_path / "v3long.pt", pickle_of(pdict(w=tensor_v3("float64", (2, 3), (3, 1)))))
    assert _refused(too_long) == (
        "v3long.pt: tensor view (offset 0, shape (2, 3), stride (3, 1)) reaches element 5 of a 3-element storage; "
        "the file is corrupt"
    )


def test_deflated_archive_reads_like_the_stored_one(tmp_path):
    path = _rezip(FIX / "state_dict.pt", tmp_path / "deflated.pt", compression=zipfile.ZIP_DEFLATED)
    expected = np.load(FIX / "state_dict.npz")
    tensors = flatten_tensors(read_torch_checkpoint(path))
    for name in expected.files:
        np.testing.assert_array_equal(tensors[name].numpy(), expected[name])


# ---- TorchStore


def test_store_part_strips_the_ddp_prefix():
    store = TorchStore.open(FIX / "ijepa.pt", part="encoder")
    assert store.names() == ["patch_embed.proj.weight", "blocks.0.attn.qkv.weight"]
    expected = np.load(FIX / "ijepa.npz")
    np.testing.assert_array_equal(
        store.get("blocks.0.attn.qkv.weight"), expected["encoder.module.blocks.0.attn.qkv.weight"]
    )
    assert store.shape("patch_embed.proj.weight") == (2, 3) and store.dtype("patch_embed.proj.weight") == "F32"
    assert store.files == (FIX / "ijepa.pt",)
    assert store.metadata == {"format": "pt", "byteorder": "little", "version": "3", "part": "encoder"}
    assert TorchStore.open(FIX / "ijepa.pt", part="predictor").names() == ["predictor_embed.weight"]
    assert TorchStore.open(FIX / "ddp.pt").names() == ["blocks.0.attn.qkv.weight", "blocks.0.attn.qkv.bias"]


def test_store_keeps_names_when_not_all_share_module_prefix():
    names = TorchStore.open(FIX / "ijepa.pt").names()
    assert "encoder.module.patch_embed.proj.weight" in names and "predictor.module.predictor_embed.weight" in names


def test_store_interface_matches_tensor_store():
    store = TorchStore.open(FIX / "dtypes.pt")
    assert store.dtypes() == ["F32", "F16", "BF16", "F64", "I64", "I32", "I16", "I8", "U8", "BOOL"]
    assert "bf16" in store and "nope" not in store
    a = store.get("bf16")
    a[...] = 0
    assert store.get("bf16").any()
    with pytest.raises(
        CheckpointError,
        match=(
            r"^tensor 'nope' is missing from dtypes.pt; the checkpoint is incomplete or of another family \(try "
            r"family=NAME\)$"
        ),
    ):
        store.get("nope")


def test_store_part_errors():
    with pytest.raises(CheckpointError) as e:
        TorchStore.open(FIX / "ijepa.pt", part="model")
    assert (
        str(e.value) == "ijepa.pt: has no part 'model' (parts: encoder, predictor, target_encoder); choose one of those"
    )
    with pytest.raises(CheckpointError) as e:
        TorchStore.open(FIX / "training.pt", part="args")
    assert str(e.value) == "training.pt: has no part 'args' (parts: model, optimizer); choose one of those"
    # a part is a name prefix: nested dicts and flat dotted names select alike, `module.` below it is dropped
    enc = TorchStore.open(FIX / "ijepa.pt", part="encoder")
    assert enc.names() == ["patch_embed.proj.weight", "blocks.0.attn.qkv.weight"] and enc.metadata["part"] == "encoder"


# ---- refusals: formats


def test_legacy_format_is_refused():
    assert _refused(FIX / "legacy.pt") == (
        "legacy.pt: legacy (pre-zip) torch.save format, which qkweights does not read; re-save it with "
        "torch.save(torch.load(...), ..., _use_new_zipfile_serialization=True) or convert it to safetensors"
    )


def test_torchscript_is_refused():
    assert _refused(FIX / "torchscript.pt") == (
        "torchscript.pt: a TorchScript archive (torch.jit.save), which qkweights does not read; "
        "save the weights with torch.save(model.state_dict(), ...) or convert them to safetensors"
    )


def test_unsupported_dtype_is_named():
    assert _refused(FIX / "uint16.pt") == (
        "uint16.pt: holds a tensor of dtype torch.uint16, which qkweights does not read "
        "(F64, F32, F16, BF16, I64, I32, I16, I8, U8, BOOL); convert it with torch (tensor.float()) and re-save"
    )


def test_not_a_zip_and_truncated_zip(tmp_path):
    (tmp_path / "text.pt").write_text("hello")
    assert _refused(tmp_path / "text.pt") == (
        "text.pt: not a zip archive (no end-of-central-directory record); the file is truncated or not written by "
        "torch.save"
    )
    raw = (FIX / "state_dict.pt").read_bytes()
    (tmp_path / "cut.pt").write_bytes(raw[: len(raw) // 2])
    assert _refused(tmp_path / "cut.pt") == (
        "cut.pt: not a zip archive (no end-of-central-directory record); the file is truncated or not written by "
        "torch.save"
    )
    assert _refused(tmp_path / "missing.pt").startswith("missing.pt: cannot read (No such file or directory)")


def test_storage_past_the_end_of_the_file(tmp_path):
    raw = bytearray((FIX / "state_dict.pt").read_bytes())
    pos = _central_entry(bytes(raw), "state_dict/data/0")
    struct.pack_into("<LL", raw, pos + 20, 10**6, 10**6)  # compressed and uncompressed sizes
    (tmp_path / "long.pt").write_bytes(bytes(raw))
    msg = _refused(tmp_path / "long.pt")
    assert msg.startswith("long.pt: entry state_dict/data/0 ends at byte ") and msg.endswith(
        f"past the end of the file ({len(raw)} bytes); the file is truncated"
    )


def test_entry_offsets_outside_the_file(tmp_path):
    # found by tests/fuzz_torch_pickle.py (seed 5, input 172997): zipfile shifts every header offset by the
    # end record's claimed directory offset, which can make them negative; os.preadv then overflowed
    raw = bytearray((FIX / "state_dict.pt").read_bytes())
    end = raw.rindex(b"PK\x06\x06")  # torch writes a zip64 end record; its central directory offset is at +48
    shift = 2**64 - 1 - struct.unpack_from("<Q", raw, end + 48)[0]
    struct.pack_into("<Q", raw, end + 48, 2**64 - 1)  # offsets move by -shift, below the C long range
    (tmp_path / "shifted.pt").write_bytes(bytes(raw))
    with zipfile.ZipFile(FIX / "state_dict.pt") as z:
        first = z.getinfo("state_dict/byteorder").header_offset - shift  # the first entry read
    assert _refused(tmp_path / "shifted.pt") == (
        f"shifted.pt: state_dict/byteorder lies at offset {first}, outside the file ({len(raw)} bytes); the zip "
        "directory is corrupt"
    )


def test_corrupt_data_pkl_fails_its_crc(tmp_path):
    raw = bytearray((FIX / "state_dict.pt").read_bytes())
    raw[raw.index(b"_rebuild_tensor_v2")] ^= 1
    (tmp_path / "crc.pt").write_bytes(bytes(raw))
    assert _refused(tmp_path / "crc.pt") == "crc.pt: data.pkl fails its CRC check; the file is corrupt"


def test_zip_bomb_declared_size_is_refused_before_inflating(tmp_path):
    path = _archive(
        tmp_path / "bomb.pt", pickle_of(pdict(w=tensor())), {"0": bytes(4096)}, compression=zipfile.ZIP_DEFLATED
    )
    raw = bytearray(path.read_bytes())
    struct.pack_into("<L", raw, _central_entry(bytes(raw), "archive/data/0") + 24, 3 * 10**9)  # declared inflated size
    path.write_bytes(bytes(raw))
    tensors = read_torch_checkpoint(path)
    with pytest.raises(CheckpointError) as e:
        tensors["w"].numpy()
    assert str(e.value) == (
        "bomb.pt: compressed entry archive/data/0 declares 3000000000 bytes, over the 268435456-byte limit (a "
        "zip bomb?); "
        "torch.save writes entries uncompressed (re-save with torch.save)"
    )


def test_zip_bomb_stream_longer_than_declared_is_cut(tmp_path):
    path = _archive(
        tmp_path / "bomb.pt", pickle_of(pdict(w=tensor())), {"0": bytes(10**7)}, compression=zipfile.ZIP_DEFLATED
    )
    raw = bytearray(path.read_bytes())
    struct.pack_into(
        "<L", raw, _central_entry(bytes(raw), "archive/data/0") + 24, 24
    )  # claims 24 bytes, inflates to 10 MB
    path.write_bytes(bytes(raw))
    with pytest.raises(
        CheckpointError, match=r"^bomb.pt: compressed entry archive/data/0 cannot be inflated \(Bad CRC-32"
    ):
        read_torch_checkpoint(path)["w"].numpy()


def test_encrypted_or_patched_entries_are_refused(tmp_path):
    raw = bytearray((FIX / "state_dict.pt").read_bytes())
    struct.pack_into(
        "<H", raw, _central_entry(bytes(raw), "state_dict/data/0") + 8, 0x808 | 0x1
    )  # general purpose flags
    (tmp_path / "enc.pt").write_bytes(bytes(raw))
    with pytest.raises(CheckpointError) as e:
        read_torch_checkpoint(tmp_path / "enc.pt")["blocks.0.attn.qkv.weight"].numpy()
    assert str(e.value) == (
        "enc.pt: entry state_dict/data/0 is encrypted or patched (zip flags 0x809), which torch.save never writes; "
        "the file is not a plain checkpoint"
    )


def test_duplicate_entries_are_refused(tmp_path):
    with pytest.warns(UserWarning, match="Duplicate name"):
        path = _archive(tmp_path / "dup.pt", pickle_of(pdict(w=tensor())), extra={"archive/data.pkl": pickle_of(b"N")})
    assert _refused(path) == "dup.pt: the zip archive lists an entry twice; the file is corrupt or was tampered with"


# ---- refusals: code in pickles


@pytest.mark.parametrize("name", EVIL)
def test_malicious_archive_is_refused_and_runs_nothing(name):
    marker = MARKERS / name
    marker.unlink(missing_ok=True)
    assert _refused(FIX / f"{name}.pt") == REFUSAL.format(file=f"{name}.pt", name=EVIL[name])
    assert _refused(FIX / f"{name}.pkl") == (
        f"{name}.pkl: a bare pickle, not a torch.save zip archive; qkweights reads only zip checkpoints "
        f"(re-save with torch.save or convert to safetensors)"
    )
    assert not marker.exists()


def short(text: str) -> bytes:
    raw = text.encode()
    return b"\x8c" + bytes([len(raw)]) + raw


PAYLOADS = [
    ("inst", lambda cmd: f"(S'{cmd}'\nios\nsystem\n.".encode(), "os.system"),  # protocol 0 INST
    ("obj", lambda cmd: pickle_of(b"(" + glob("os", "system") + s(cmd) + b"o"), "os.system"),  # OBJ
    (
        "stack_global",
        lambda cmd: (
            b"\x80\x04"
            + short("builtins")
            + short("exec")
            + b"\x93"
            + short(f"__import__('os').system({cmd!r})")
            + b"\x85R."
        ),
        "builtins.exec",
    ),
    ("copyreg", lambda cmd: pickle_of(glob("copyreg", "_reconstructor")), "copyreg._reconstructor"),
    ("torch_load", lambda cmd: pickle_of(glob("torch", "load")), "torch.load"),
]


@pytest.mark.parametrize("name, payload, written", PAYLOADS, ids=[c[0] for c in PAYLOADS])
def test_payloads_in_any_opcode_are_refused(tmp_path, name, payload, written):
    marker = tmp_path / f"pwned-{name}"
    path = _archive(tmp_path / f"{name}.pt", payload(f"touch {marker}"))
    assert _refused(path) == REFUSAL.format(file=path.name, name=written)
    assert not marker.exists()


# The allow-list, written out in full: any addition or removal must be made here too, on purpose.
ALLOWED_GLOBALS = {
    "torch._utils._rebuild_tensor_v2",
    "torch._utils._rebuild_tensor_v3",
    "torch._utils._rebuild_parameter",
    "torch._utils._rebuild_parameter_with_state",
    "collections.OrderedDict",
    "builtins.set",
    "__builtin__.set",
    "_codecs.encode",
    "numpy.dtype",
    "numpy.core.multiarray.scalar",
    "numpy._core.multiarray.scalar",
    # storage classes
    "torch.FloatStorage",
    "torch.HalfStorage",
    "torch.BFloat16Storage",
    "torch.DoubleStorage",
    "torch.LongStorage",
    "torch.IntStorage",
    "torch.ShortStorage",
    "torch.CharStorage",
    "torch.ByteStorage",
    "torch.BoolStorage",
    "torch.storage.UntypedStorage",
    # dtypes (inert names)
    "torch.float32",
    "torch.float16",
    "torch.bfloat16",
    "torch.float64",
    "torch.int64",
    "torch.int32",
    "torch.int16",
    "torch.int8",
    "torch.uint8",
    "torch.bool",
    "torch.uint16",
    "torch.uint32",
    "torch.uint64",
    "torch.complex32",
    "torch.complex64",
    "torch.complex128",
    "torch.float8_e4m3fn",
    "torch.float8_e4m3fnuz",
    "torch.float8_e5m2",
    "torch.float8_e5m2fnuz",
    "torch.float8_e8m0fnu",
    "torch.float4_e2m1fn_x2",
    "torch.bits1x8",
    "torch.bits2x4",
    "torch.bits4x2",
    "torch.bits8",
    "torch.bits16",
    "torch.qint8",
    "torch.quint8",
    "torch.qint32",
    "torch.quint4x2",
    "torch.quint2x4",
}
ALLOWED_RECORDS = {
    "argparse.Namespace",
    "yacs.config.CfgNode",
    "pathlib.PosixPath",
    "pathlib.WindowsPath",
    "torch.device",
}


def test_allow_list_is_exactly_the_expected_set():
    assert set(unpickler._GLOBALS) == ALLOWED_GLOBALS
    assert unpickler.RECORD_CLASSES == frozenset(ALLOWED_RECORDS)
    # every allowed global resolves to qkweights' own inert stand-in, never to a function of another module
    for name, value in unpickler._GLOBALS.items():
        assert type(value) in (unpickler._Safe, unpickler._Sentinel), name
        if isinstance(value, unpickler._Safe):
            assert value.fn.__module__ == "qkweights.checkpoints.pytorch.unpickler", name


def call(module: str, name: str, *args: bytes) -> bytes:
    """module.name(*args) as REDUCE."""
    return glob(module, name) + tup(*args) + b"R"


# getattr(getattr('', '__class__'), '__base__') is `object`: the first step of the `__subclasses__()` escape.
ESCAPES = {
    f"{m}.getattr": pickle_of(call(m, "getattr", call(m, "getattr", s(""), s("__class__")), s("__base__")))
    for m in ("builtins", "__builtin__")
}
HOSTILE_GLOBALS = [
    "builtins.eval",
    "builtins.exec",
    "builtins.compile",
    "builtins.__import__",
    "builtins.open",
    "builtins.type",
    "builtins.object",
    "builtins.globals",
    "builtins.vars",
    "builtins.setattr",
    "builtins.breakpoint",
    "__builtin__.eval",
    "__builtin__.getattr",
    "__builtin__.__import__",
    "operator.attrgetter",
    "operator.methodcaller",
    "operator.itemgetter",
    "operator.getitem",
    "functools.partial",
    "functools.reduce",
    "_functools.partial",
    "functools.cached_property",
    "copyreg._reconstructor",
    "copyreg.__newobj__",
    "pickle.loads",
    "_pickle.loads",
    "types.FunctionType",
    "types.CodeType",
    "importlib.import_module",
    "runpy.run_path",
    "subprocess.run",
    "os.system",
    "posix.system",
    "nt.system",
    "numpy.load",
    "numpy.core.multiarray._reconstruct",
    "numpy.lib.npyio.load",
    "torch.load",
    "torch._utils._rebuild_tensor",
    "torch.storage._load_from_bytes",
    "torch.serialization._get_restore_location",
    "collections.defaultdict",
    "collections.namedtuple",
]


@pytest.mark.parametrize("name", sorted(ESCAPES))
def test_getattr_escape_to_object_is_refused(tmp_path, name):
    assert _refused(_archive(tmp_path / "esc.pt", ESCAPES[name])) == REFUSAL.format(file="esc.pt", name=name)


@pytest.mark.parametrize("full", HOSTILE_GLOBALS)
def test_hostile_globals_are_refused_by_name(tmp_path, full):
    module, name = full.rsplit(".", 1)
    path = _archive(tmp_path / "h.pt", pickle_of(pdict(x=call(module, name, s("print(1)")))))
    assert _refused(path) == REFUSAL.format(file="h.pt", name=full)
    assert full not in ALLOWED_GLOBALS | ALLOWED_RECORDS


def test_storage_type_slot_must_be_a_storage_class(tmp_path):
    pkl = pickle_of(pdict(w=tensor().replace(glob("torch", "FloatStorage"), glob("_codecs", "encode"))))
    assert _refused(_archive(tmp_path / "slot.pt", pkl)) == (
        "slot.pt: a storage's type slot holds _codecs.encode, not a torch storage class; the file is corrupt or hostile"
    )


MALFORMED = [
    ("extension", pickle_of(b"\x82\x01"), "unregistered extension code 1"),
    ("text_persid", pickle_of(b"P0\n"), "persistent id is not ('storage', type, key, location, numel)"),
    (
        "build_on_tensor",
        pickle_of(tensor() + pdict(shape=i(1)) + b"b"),
        "a tensor-building object cannot take pickled state",
    ),
    (
        "build_on_function",
        pickle_of(glob("torch._utils", "_rebuild_tensor_v2") + b"}b"),
        "a tensor-building object cannot take pickled state",
    ),
    (
        "set_state_on_record_class",
        pickle_of(glob("argparse", "Namespace") + b"}b"),
        "Record.__setstate__() missing 1 required positional argument: 'state'",
    ),
    (
        "numpy_object_dtype",
        pickle_of(glob("numpy", "dtype") + tup(s("O8"), b"\x89\x88") + b"R"),
        "numpy dtype 'O8' is not a plain numeric dtype",
    ),
    (
        "ordered_dict_args",
        pickle_of(glob("collections", "OrderedDict") + tup(b"]") + b"R"),
        "_ordered_dict() takes 0 positional arguments but 1 was given",
    ),
    ("huge_memo_index", pickle_of(b"Nr\xff\xff\xff\x0f"), "memo index 268435455 is out of sequence (memo holds 0)"),
    ("memo_read_first", pickle_of(b"h\x03"), "memo index 3 is read before it is written"),
    ("deep_tuples", pickle_of(b"N" + b"\x85" * 200), "tuples nest deeper than 100"),
    (
        "colliding_keys",
        pickle_of(b"}(" + b"".join(tup(i(k), i(0)) + b"N" for k in range(1001)) + b"u"),
        "over 1000 dictionary keys are not strings or small integers",
    ),
    ("truncated", pickle_of(pdict(w=tensor()))[:-1], "pickle exhausted before seeing STOP"),
]


@pytest.mark.parametrize("name, pkl, cause", MALFORMED, ids=[c[0] for c in MALFORMED])
def test_malformed_pickles_are_refused_with_the_cause(tmp_path, name, pkl, cause):
    msg = _refused(_archive(tmp_path / f"{name}.pt", pkl))
    assert msg.startswith(f"{name}.pt: data.pkl is not a valid checkpoint pickle (") and cause in msg
    assert msg.endswith("); the file is corrupt or not written by torch.save")


BAD_VIEWS = [
    (
        dict(offset=1),
        "tensor view (offset 1, shape (2, 3), stride (3, 1)) reaches element 6 of a 6-element storage; the "
        "file is corrupt",
    ),
    (
        dict(stride=(4, 1)),
        "tensor view (offset 0, shape (2, 3), stride (4, 1)) reaches element 6 of a 6-element storage; the "
        "file is corrupt",
    ),
    (
        dict(size=(10**6, 10**6), stride=(0, 0)),
        "tensor of shape (1000000, 1000000) with stride (0, 0) expands 1 stored elements to 1000000000000, "
        "over 268435456 bytes; the file is corrupt or hostile",
    ),
    (
        dict(numel=7),
        "storage data/0 holds 24 bytes but data.pkl declares 7 F32 elements (28 bytes); the file is corrupt",
    ),
    (dict(key="9"), "data.pkl refers to storage data/9, which the archive lacks; the file is truncated or corrupt"),
    (
        dict(size=(0, 2**60), stride=(1, 1)),
        "empty tensor of shape (0, 1152921504606846976) at offset 0 of a 6-element storage; the file is corrupt",
    ),
]


@pytest.mark.parametrize("kwargs, message", BAD_VIEWS, ids=["offset", "stride", "expanded", "numel", "key", "empty"])
def test_tensor_views_are_checked_against_their_storage(tmp_path, kwargs, message):
    assert _refused(_archive(tmp_path / "v.pt", pickle_of(pdict(w=tensor(**kwargs))))) == f"v.pt: {message}"


def test_deeply_nested_tuple_key_does_not_crash_the_interpreter(tmp_path):
    # Unguarded, CPython 3.11 overflows the C stack hashing this key (segfault, exit -11).
    path = _archive(tmp_path / "deep.pt", pickle_of(b"}" + b"N" + b"\x85" * 10**6 + b"Ns"))
    code = (
        "from qkweights.checkpoints.pytorch.unpickler import read_torch_checkpoint as r\n"
        f"try:\n    r({str(path)!r})\nexcept Exception as e:\n    print(type(e).__name__, e)"
    )
    run = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=Path(__file__).parents[2]
    )
    assert (
        run.returncode == 0
        and run.stdout.startswith("CheckpointError deep.pt: data.pkl is not a valid checkpoint pickle")
        and "tuples nest deeper than 100" in run.stdout
    )


# ---- fuzzing: only CheckpointError, ever


CORPUS = [FIX / f"{n}.pt" for n in ("state_dict", "training", "dtypes", "bigendian", "ijepa")]
PICKLE_VOCAB = [
    b"(",
    b")",
    b"t",
    b"R",
    b"b",
    b"s",
    b"u",
    b"e",
    b"a",
    b"0",
    b"2",
    b"\x85",
    b"\x86",
    b"\x87",
    b"}",
    b"]",
    b"N",
    b"\x88",
    b"\x81",
    b"Q",
    b"h\x00",
    b"h\x05",
    b"q\x07",
    b"r\xff\xff\xff\x7f",
    b"J\xff\xff\xff\x7f",
    b"K\x00",
    b"\x8a\x09" + b"\xff" * 9,
    b"X\x01\x00\x00\x000",
    b"X\xff\xff\xff\x7f",
    b"ctorch\nFloatStorage\n",
    b"ctorch\nBFloat16Storage\n",
    b"ctorch._utils\n_rebuild_tensor_v2\n",
    b"ccollections\nOrderedDict\n",
    b"c__builtin__\nset\n",
    b"cargparse\nNamespace\n",
    b"\x8c\x05torch\x93",
    b"\x95\x00\x00\x00\x00\x00\x00\x00\x00",
]
mutation = st.one_of(
    st.tuples(st.just("set"), st.integers(0, 2**20), st.integers(0, 255)),
    st.tuples(st.just("del"), st.integers(0, 2**20), st.integers(1, 64)),
    st.tuples(st.just("ins"), st.integers(0, 2**20), st.sampled_from(PICKLE_VOCAB)),
    st.tuples(st.just("cut"), st.integers(0, 2**20), st.just(0)),
)


def mutate(data: bytes, ops) -> bytes:
    """Apply (kind, position, value) edits; positions wrap around the current length."""
    out = bytearray(data)
    for kind, pos, value in ops:
        pos %= max(len(out), 1)
        if kind == "set" and out:
            out[pos] = value
        elif kind == "del":
            del out[pos : pos + value]
        elif kind == "ins":
            out[pos:pos] = value
        elif kind == "cut":
            del out[pos:]
    return bytes(out)


def load_everything(path: Path) -> None:
    """Read the checkpoint and materialise every tensor; anything but CheckpointError fails the test."""
    try:
        for t in flatten_tensors(read_torch_checkpoint(path)).values():
            assert t.numpy().shape == t.shape
    except CheckpointError as e:
        assert "\n" not in str(e)


FUZZ = settings(
    max_examples=70, deadline=2000, database=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow]
)


@pytest.fixture(scope="module")
def fuzz_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("fuzz")


@FUZZ
@given(data=st.binary(max_size=4096))
def test_fuzz_arbitrary_bytes(fuzz_dir, data):
    (fuzz_dir / "bytes.pt").write_bytes(data)
    load_everything(fuzz_dir / "bytes.pt")


@FUZZ
@given(source=st.sampled_from(CORPUS), ops=st.lists(mutation, min_size=1, max_size=6))
def test_fuzz_mutated_archives(fuzz_dir, source, ops):
    (fuzz_dir / "zip.pt").write_bytes(mutate(source.read_bytes(), ops))
    load_everything(fuzz_dir / "zip.pt")


@FUZZ
@given(source=st.sampled_from(CORPUS), ops=st.lists(mutation, min_size=1, max_size=6))
def test_fuzz_mutated_pickles_in_valid_archives(fuzz_dir, source, ops):
    _rezip(source, fuzz_dir / "pkl.pt", pkl=mutate(_data_pkl(source), ops))
    load_everything(fuzz_dir / "pkl.pt")
