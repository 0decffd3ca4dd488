"""Regenerate the torch.save fixtures of tests/checkpoints/test_torch_pickle.py.

Run from the repository root:  python tests/pickle_fixtures/make_pickle_fixtures.py
Needs torch and yacs (fixture generation only; qkweights never imports them).

Writes into tests/pickle_fixtures/ (each file atomically):
- state_dict.pt / .npz   float32 state dict: a transposed (non-contiguous) tensor, a view with a storage
                         offset sharing its storage with its base, a tensor stored twice (tied weights), a
                         stride-0 expanded tensor, a 0-d and an empty tensor, an nn.Parameter.
- training.pt / .npz     {'model', 'args' (argparse.Namespace holding a PosixPath and a torch.device),
                         'config' (yacs CfgNode), 'optimizer' (Adam state after one step), 'epoch',
                         'best_acc' (np.float64), 'step' (np.int64)}.
- ddp.pt                 flat state dict whose names all start with `module.` (DistributedDataParallel).
- ijepa.pt / .npz        I-JEPA layout: {'encoder', 'predictor', 'target_encoder'} of `module.` names,
                         'opt', 'epoch', ...
- dtypes.pt / .npz       F32 F16 BF16 F64 I64 I32 I16 I8 U8 BOOL, plus a transposed BF16 view.
                         The npz holds torch's values (BF16 as float32 via tensor.float()).
- bigendian.pt           dtypes.pt rewritten as torch writes on a big-endian machine: every storage byte-swapped
                         and the `byteorder` record set to "big" (crafted here: this machine is little-endian).
- uint16.pt              a uint16 tensor (torch writes _rebuild_tensor_v3 + UntypedStorage + torch.uint16).
- legacy.pt              torch.save(..., _use_new_zipfile_serialization=False).
- torchscript.pt         torch.jit.save of a traced nn.Linear(2, 2).
- evil_*.pt / evil_*.pkl malicious checkpoints, as torch zip archives and as bare pickles. Each payload, if
                         run, creates /tmp/qkweights-pwned/<name>; this script loads every archive with
                         torch.load(weights_only=False) in a subprocess and checks that it does create its
                         marker (so the payloads are live), then removes the markers. The bare .pkl is the
                         archive's data.pkl. The tests assert refusal and no marker.

Deterministic values (torch.manual_seed); the archives' serialization ids are random, as torch writes them.
"""

from __future__ import annotations

import argparse
import io
import os
import pathlib
import pickle
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path

import numpy as np
import torch
from yacs.config import CfgNode

HERE = Path(__file__).resolve().parent
MARKERS = Path("/tmp/qkweights-pwned")
NPZ_DATE = (2024, 1, 1, 0, 0, 0)


def shell(name: str) -> str:
    return f"mkdir -p {MARKERS} && touch {MARKERS / name}"


class SystemPayload:
    """os.system(cmd) on unpickling (pickled as GLOBAL 'posix system')."""

    def __init__(self, name):
        self.name = name

    def __reduce__(self):
        return os.system, (shell(self.name),)


class EvalPayload(SystemPayload):
    def __reduce__(self):
        return eval, (f"__import__('os').system({shell(self.name)!r})",)


class PopenPayload(SystemPayload):
    def __reduce__(self):
        return subprocess.Popen, (["sh", "-c", shell(self.name)],)


def write_atomic(path: Path, data: bytes) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.chmod(tmp, 0o644)
    os.replace(tmp, path)


def torch_bytes(obj, name: str, **kwargs) -> bytes:
    """torch.save(obj) as the bytes of a file called ``name`` (the archive's top folder is its stem)."""
    with tempfile.TemporaryDirectory() as d:
        torch.save(obj, Path(d) / name, **kwargs)
        return (Path(d) / name).read_bytes()


def save(name: str, obj, **kwargs) -> None:
    write_atomic(HERE / name, torch_bytes(obj, name, **kwargs))


def save_npz(name: str, arrays: dict[str, np.ndarray]) -> None:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_STORED) as z:
        for key, a in arrays.items():
            member = io.BytesIO()
            np.lib.format.write_array(member, np.array(a, order="C"), allow_pickle=False)
            z.writestr(zipfile.ZipInfo(f"{key}.npy", NPZ_DATE), member.getvalue())
    write_atomic(HERE / name, buf.getvalue())


def reference(sd: dict, prefix: str = "") -> dict[str, np.ndarray]:
    """torch's own values of every tensor under ``sd`` (BF16 as float32), by dotted name."""
    out = {}
    for k, v in sd.items():
        if isinstance(v, dict):
            out.update(reference(v, f"{prefix}{k}."))
        elif isinstance(v, torch.Tensor):
            v = v.detach()
            out[f"{prefix}{k}"] = (v.float() if v.dtype == torch.bfloat16 else v).numpy()
    return out


def rewrite_zip(data: bytes, edit) -> bytes:
    """Copy a torch archive entry by entry (stored), replacing each entry's bytes by edit(name, bytes)."""
    out = io.BytesIO()
    with zipfile.ZipFile(io.BytesIO(data)) as src, zipfile.ZipFile(out, "w", zipfile.ZIP_STORED) as dst:
        for info in src.infolist():
            dst.writestr(zipfile.ZipInfo(info.filename, info.date_time), edit(info.filename, src.read(info)))
    return out.getvalue()


def state_dict() -> dict:
    torch.manual_seed(0)
    base = torch.randn(4, 5)
    qkv = torch.randn(6, 4)
    tied = torch.randn(3, 4)
    return {
        "blocks.0.attn.qkv.weight": qkv,
        "blocks.0.attn.qkv.bias": torch.randn(6),
        "transposed": qkv.t(),
        "base": base,
        "view": base[1:3, 2:],
        "embed.weight": tied,
        "head.weight": tied,
        "expanded": torch.arange(3, dtype=torch.float32).expand(2, 3),
        "scalar": torch.tensor(2.5),
        "empty": torch.zeros(0, 3),
        "param": torch.nn.Parameter(torch.randn(2, 2)),
    }


def training() -> dict:
    torch.manual_seed(1)
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.LayerNorm(3))
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    model(torch.randn(2, 4)).sum().backward()
    opt.step()
    args = argparse.Namespace(
        lr=1e-3,
        model="vit_tiny",
        epochs=300,
        output_dir=pathlib.PosixPath("/runs/1"),
        device=torch.device("cpu"),
        tags={"ssl"},
    )
    config = CfgNode()
    config.MODEL = CfgNode()
    config.MODEL.TYPE = "vit"
    config.TRAIN = CfgNode()
    config.TRAIN.BASE_LR = 5e-4
    config.freeze()
    return {
        "model": model.state_dict(),
        "args": args,
        "config": config,
        "optimizer": opt.state_dict(),
        "epoch": 3,
        "best_acc": np.float64(0.625),
        "step": np.int64(7),
    }


def ijepa() -> dict:
    torch.manual_seed(2)
    part = lambda: {f"module.{k}": torch.randn(2, 3) for k in ("patch_embed.proj.weight", "blocks.0.attn.qkv.weight")}  # noqa: E731
    return {
        "encoder": part(),
        "predictor": {"module.predictor_embed.weight": torch.randn(3, 2)},
        "target_encoder": part(),
        "opt": {"state": {}, "param_groups": [{"lr": 0.001, "params": [0, 1]}]},
        "epoch": 1,
        "loss": 0.5,
        "batch_size": 128,
        "world_size": 1,
        "lr": 0.001,
    }


def dtypes() -> dict:
    torch.manual_seed(3)
    x = torch.randn(3, 4) * 100
    bf = (x / 7).to(torch.bfloat16)
    return {
        "f32": x,
        "f16": (x / 10).half(),
        "bf16": bf,
        "bf16_t": bf.t(),
        "f64": x.double() / 3,
        "i64": torch.arange(-5, 7).reshape(3, 4) * 10**12,
        "i32": torch.arange(-6, 6, dtype=torch.int32) * 99999,
        "i16": torch.arange(-6, 6, dtype=torch.int16) * 999,
        "i8": torch.arange(-6, 6, dtype=torch.int8) * 20,
        "u8": torch.arange(0, 240, 20, dtype=torch.uint8),
        "bool": torch.tensor([True, False, True]),
    }


class StorageSizes(pickle.Unpickler):
    """Unpickles a trusted archive's data.pkl (written just above), noting each storage key's element size."""

    def __init__(self, file):
        super().__init__(file)
        self.itemsizes: dict[str, int] = {}

    def persistent_load(self, pid):
        _, storage_type, key, _, numel = pid
        storage = storage_type(numel)  # torch warns that TypedStorage is deprecated; it is what data.pkl names
        self.itemsizes[key] = storage.element_size()
        return storage


def big_endian(data: bytes) -> bytes:
    """The archive as a big-endian machine writes it: byteorder "big", each storage byte-swapped per element."""
    reader = StorageSizes(io.BytesIO(bare_pickle(data)))
    reader.load()
    itemsizes = reader.itemsizes

    def edit(name, raw):
        if name.endswith("/byteorder"):
            return b"big"
        key = name.rsplit("/", 1)[1]
        if "/data/" in name and itemsizes[key] > 1:
            return np.frombuffer(raw, dtype=f"<u{itemsizes[key]}").byteswap().tobytes()
        return raw

    return rewrite_zip(data, edit)


def storage_slot_payload(data: bytes, name: str) -> bytes:
    """A valid archive whose first storage's type slot is os.system(cmd) instead of torch.FloatStorage."""
    cmd = shell(name).encode()
    payload = b"cposix\nsystem\nX" + len(cmd).to_bytes(4, "little") + cmd + b"\x85R"
    return rewrite_zip(
        data, lambda n, raw: raw.replace(b"ctorch\nFloatStorage\n", payload, 1) if n.endswith("/data.pkl") else raw
    )


def bare_pickle(data: bytes) -> bytes:
    with zipfile.ZipFile(io.BytesIO(data)) as z:
        return z.read(next(n for n in z.namelist() if n.endswith("/data.pkl")))


def evil() -> dict[str, bytes]:
    """name -> torch zip archive with a payload that creates /tmp/qkweights-pwned/<name>."""
    sd = {"w": torch.ones(2, 3)}
    cmd = shell("evil_os_system").encode()
    raw = b"\x80\x02}X\x01\x00\x00\x00xcos\nsystem\nX" + len(cmd).to_bytes(4, "little") + cmd + b"\x85Rs."
    return {
        # hand-written opcodes: GLOBAL 'os system', spelled as an attacker writes it
        "evil_os_system": rewrite_zip(
            torch_bytes(sd, "evil_os_system.pt"), lambda n, b: raw if n.endswith("/data.pkl") else b
        ),
        # protocol 4: STACK_GLOBAL 'builtins' 'eval'
        "evil_builtins_eval": torch_bytes(
            {**sd, "x": EvalPayload("evil_builtins_eval")}, "evil_builtins_eval.pt", pickle_protocol=4
        ),
        # protocol 3: GLOBAL 'subprocess Popen' (protocol 2 would spell it 'commands Popen', the Python 2 name)
        "evil_popen": torch_bytes({"model": sd, "x": PopenPayload("evil_popen")}, "evil_popen.pt", pickle_protocol=3),
        # a __reduce__ payload in a dict inside the state dict
        "evil_nested": torch_bytes(
            {"model": {**sd, "meta": {"info": SystemPayload("evil_nested")}}, "epoch": 1}, "evil_nested.pt"
        ),
        "evil_storage_type": storage_slot_payload(torch_bytes(sd, "evil_storage_type.pt"), "evil_storage_type"),
    }


def check_live(name: str, archive: bytes) -> None:
    """torch.load(weights_only=False) of the archive, in a subprocess, must create the payload's marker."""
    marker = MARKERS / name
    marker.unlink(missing_ok=True)
    code = "import io, sys, torch; torch.load(io.BytesIO(sys.stdin.buffer.read()), weights_only=False)"
    subprocess.run([sys.executable, "-c", code], input=archive, check=False, capture_output=True, timeout=120)
    deadline = time.monotonic() + 10  # Popen's child may finish after its parent
    while not marker.exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    if not marker.exists():
        raise SystemExit(f"payload {name} did not create {marker}: it is not live")
    marker.unlink()


def main() -> None:
    save("state_dict.pt", state_dict())
    save_npz("state_dict.npz", reference(state_dict()))
    train = training()
    save("training.pt", train)
    save_npz("training.npz", reference(train))
    save("ddp.pt", {f"module.{k}": v for k, v in state_dict().items() if k.startswith("blocks")})
    save("ijepa.pt", ijepa())
    save_npz("ijepa.npz", reference(ijepa()))
    save("dtypes.pt", dtypes())
    save_npz("dtypes.npz", reference(dtypes()))
    write_atomic(HERE / "bigendian.pt", big_endian(torch_bytes(dtypes(), "bigendian.pt")))
    save("uint16.pt", {"u16": torch.tensor([1, 2, 3, 4], dtype=torch.uint16)})
    save("legacy.pt", {"w": torch.ones(2)}, _use_new_zipfile_serialization=False)
    with tempfile.TemporaryDirectory() as d:
        torch.jit.save(torch.jit.trace(torch.nn.Linear(2, 2), torch.ones(1, 2)), Path(d) / "torchscript.pt")
        write_atomic(HERE / "torchscript.pt", (Path(d) / "torchscript.pt").read_bytes())
    for name, archive in evil().items():
        check_live(name, archive)
        write_atomic(HERE / f"{name}.pt", archive)
        write_atomic(HERE / f"{name}.pkl", bare_pickle(archive))
    shutil.rmtree(MARKERS, ignore_errors=True)
    total = sum(p.stat().st_size for p in HERE.iterdir() if p.suffix in (".pt", ".pkl", ".npz"))
    print(f"wrote {HERE} ({total} bytes of fixtures)")


if __name__ == "__main__":
    main()
