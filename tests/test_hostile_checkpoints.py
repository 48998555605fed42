"""Hostile checkpoints (issue #17): every malformed source ends in one JmossError, runs no code,
allocates nothing it has not checked, and leaves no store that verifies.

Each case builds a source folder from a real tiny checkpoint and breaks one thing: the torch zip
and its pickle, a safetensors header, the weight index, config.json, or a symlink. Every case is
converted in-process; a sample also goes through `jmoss convert` in a subprocess, whose peak RSS
is measured from outside (its own RUSAGE_CHILDREN, in a small launcher process).
"""

from __future__ import annotations

import collections
import json
import os
import pickle
import shutil
import struct
import subprocess
import sys
import textwrap
import zipfile
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch

from fixtures_checkpoints import save_gptq_checkpoint, save_safetensors, save_torch_shards, tiny_model, write_tokenizer
from jmoss.converters.convert import convert
from jmoss.errors import JmossError
from jmoss.store import MANIFEST, verify

MARKER = "jmoss-hostile-pwned"
RSS_LIMIT = int(1.5 * 2**30)


# ----------------------------------------------------------------------------- building blocks


@pytest.fixture(scope="module")
def bases(tmp_path_factory) -> dict[str, Path]:
    return build_bases(tmp_path_factory.mktemp("bases"))


def build_bases(root: Path) -> dict[str, Path]:
    """Legit sources: one torch .bin (single file, no index), one safetensors, one sharded index, one GPTQ."""
    model = tiny_model(seed=3)
    out = {
        "torch": save_torch_shards(model, root / "torch", n_shards=1, index=False),
        "st": save_safetensors(model, root / "st"),
        "st_index": save_safetensors(model, root / "st_index", max_shard_size="20KB"),
        "gptq": save_gptq_checkpoint(model, root / "gptq", bits=4)[0],
    }
    for path in out.values():
        if not any(path.glob("vocab.json")):
            write_tokenizer(path)
    return out


def _copy(bases: dict[str, Path], kind: str, tmp: Path) -> Path:
    dst = tmp / "src"
    shutil.copytree(bases[kind], dst, symlinks=True)
    return dst


def _bin(src: Path) -> Path:
    return sorted(src.glob("pytorch_model*.bin"))[0]


class _Storage:
    def __init__(self, key: str, numel: int, kind: str = "HalfStorage") -> None:
        self.key, self.numel, self.kind = key, numel, kind


class _Tensor:
    def __init__(self, storage: _Storage, offset, size, stride) -> None:
        self.args = (storage, offset, size, stride)

    def __reduce__(self):
        return (torch._utils._rebuild_tensor_v2, (*self.args, False, collections.OrderedDict()))


class _Pickler(pickle.Pickler):
    def persistent_id(self, obj):
        if isinstance(obj, _Storage):
            return ("storage", getattr(torch, obj.kind), obj.key, "cpu", obj.numel)
        return None


def _dumps(obj, protocol: int = 2) -> bytes:
    import io

    buf = io.BytesIO()
    _Pickler(buf, protocol=protocol).dump(obj)
    return buf.getvalue()


def write_torch_zip(path: Path, pkl: bytes, storages: dict[str, bytes], *, pkl_compress=zipfile.ZIP_STORED,
                    storage_compress=zipfile.ZIP_STORED) -> None:
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr(zipfile.ZipInfo("archive/data.pkl"), pkl, compress_type=pkl_compress)
        for key, data in storages.items():
            zf.writestr(zipfile.ZipInfo(f"archive/data/{key}"), data, compress_type=storage_compress)
        zf.writestr("archive/version", b"3\n")


def _replace_pkl(src: Path, pkl: bytes, storages: dict[str, bytes] | None = None) -> None:
    write_torch_zip(_bin(src), pkl, storages if storages is not None else {"0": b"\0" * 64})


def _evil(fn, *args) -> bytes:
    class Evil:
        def __reduce__(self):
            return (fn, args)

    return pickle.dumps(collections.OrderedDict(w=Evil()), protocol=2)


def _touch_cmd(tmp: Path) -> str:
    return f"touch {tmp / MARKER}"


def _one(shape, stride, numel, offset=0, name="transformer.wte.weight", kind="HalfStorage", data=None) -> tuple[bytes, dict]:
    st = _Storage("0", numel, kind)
    pkl = _dumps(collections.OrderedDict({name: _Tensor(st, offset, shape, stride)}))
    return pkl, {"0": data if data is not None else b"\0" * min(numel * 2, 1 << 16)}


def _patch_central(path: Path, offset_in_entry: int, fmt: str, value: int) -> None:
    """Overwrite a field of every central directory entry (sizes, flags) after zipfile wrote it."""
    data = bytearray(path.read_bytes())
    pos = data.find(b"PK\x01\x02")
    while pos >= 0:
        struct.pack_into(fmt, data, pos + offset_in_entry, value)
        pos = data.find(b"PK\x01\x02", pos + 4)
    path.write_bytes(bytes(data))


def _bomb(src: Path, size: int, lie: bool) -> None:
    """A data.pkl that deflates to ``size`` bytes of zeros (a few hundred KB on disk)."""
    comp = zlib.compressobj(9, zlib.DEFLATED, -15)
    chunk = b"\0" * (1 << 20)
    raw = b"".join(comp.compress(chunk) for _ in range(size >> 20)) + comp.flush()
    crc = 0
    for _ in range(size >> 20):
        crc = zlib.crc32(chunk, crc)
    path = _bin(src)
    name = b"archive/data.pkl"
    local = struct.pack("<4sHHHHHIIIHH", b"PK\x03\x04", 20, 0, 8, 0, 0, crc, len(raw), 100 if lie else size, len(name), 0)
    central = struct.pack("<4sHHHHHHIIIHHHHHII", b"PK\x01\x02", 20, 20, 0, 8, 0, 0, crc, len(raw),
                          100 if lie else size, len(name), 0, 0, 0, 0, 0, 0)
    body = local + name + raw
    end = struct.pack("<4sHHHHIIH", b"PK\x05\x06", 0, 0, 1, 1, len(central) + len(name), len(body), 0)
    path.write_bytes(body + central + name + end)


# ----------------------------------------------------------------------------- pickles / zip

OS_SYSTEM = os.system


def _pk(fn):
    return ("torch", fn)


PICKLE_CASES = {
    "GLOBAL os.system REDUCE": _pk(lambda s, t: _replace_pkl(s, _evil(os.system, _touch_cmd(t)))),
    "GLOBAL builtins.eval": _pk(lambda s, t: _replace_pkl(s, _evil(eval, f"__import__('os').system('{_touch_cmd(t)}')"))),
    "GLOBAL builtins.exec": _pk(lambda s, t: _replace_pkl(s, _evil(exec, f"import os; os.system('{_touch_cmd(t)}')"))),
    "GLOBAL builtins.__import__": _pk(lambda s, t: _replace_pkl(s, _evil(__import__, "os"))),
    "GLOBAL subprocess.Popen": _pk(lambda s, t: _replace_pkl(s, _evil(subprocess.Popen, ["touch", str(t / MARKER)]))),
    "GLOBAL builtins.getattr": _pk(lambda s, t: _replace_pkl(s, _evil(getattr, "", "join"))),
    "GLOBAL pickle.loads (nested)": _pk(lambda s, t: _replace_pkl(s, _evil(pickle.loads, _evil(os.system, _touch_cmd(t))))),
    "GLOBAL shutil.rmtree": _pk(lambda s, t: _replace_pkl(s, _evil(shutil.rmtree, str(t / "victim")))),
    "GLOBAL numpy reconstruct": _pk(lambda s, t: _replace_pkl(s, pickle.dumps({"w": np.zeros(3)}, protocol=2))),
    "STACK_GLOBAL os.system (protocol 4)": _pk(lambda s, t: _replace_pkl(
        s, pickle.dumps(collections.OrderedDict(w=type("E", (), {"__reduce__": lambda self: (os.system, (_touch_cmd(t),))})()), protocol=4))),
    "protocol 0 text GLOBAL": _pk(lambda s, t: _replace_pkl(s, f"cposix\nsystem\n(V{_touch_cmd(t)}\ntR.".encode())),
    "INST opcode": _pk(lambda s, t: _replace_pkl(s, f"(V{_touch_cmd(t)}\niposix\nsystem\n.".encode())),
    "OBJ opcode": _pk(lambda s, t: _replace_pkl(s, f"\x80\x02(cposix\nsystem\nX{chr(len(_touch_cmd(t)))}\x00\x00\x00{_touch_cmd(t)}o.".encode("latin1"))),
    "NEWOBJ on an admitted class": _pk(lambda s, t: _replace_pkl(s, b"\x80\x02ctorch\nHalfStorage\n)\x81.")),
    "REDUCE on a storage type": _pk(lambda s, t: _replace_pkl(s, b"\x80\x02ctorch\nHalfStorage\n)R.")),
    "BUILD on an admitted function": _pk(lambda s, t: _replace_pkl(s, b"\x80\x02ccollections\nOrderedDict\n}b.")),
    "BUILD extra attributes on the dict": _pk(lambda s, t: _replace_pkl(s, b"\x80\x02ccollections\nOrderedDict\n)R}X\x04\x00\x00\x00evils\x88sb.")),
    "OrderedDict called with odd args": _pk(lambda s, t: _replace_pkl(s, b"\x80\x02ccollections\nOrderedDict\nK\x01K\x02\x86R.")),
    "persistent id not a storage": _pk(lambda s, t: _replace_pkl(s, b"\x80\x02X\x04\x00\x00\x00evilQ.")),
    "persistent id negative numel": _pk(lambda s, t: _replace_pkl(s, *_one((4,), (1,), -1))),
    "storage numel 2**60 over 64 bytes": _pk(lambda s, t: _replace_pkl(s, *_one((300, 64), (64, 1), 1 << 60))),
    "storage member missing": _pk(lambda s, t: _replace_pkl(s, _one((300, 64), (64, 1), 19200)[0], {})),
    "storage member compressed": _pk(lambda s, t: write_torch_zip(_bin(s), _one((300, 64), (64, 1), 19200)[0], {"0": b"\0" * 38400},
                                                           storage_compress=zipfile.ZIP_DEFLATED)),
    "storage member shorter than numel": _pk(lambda s, t: _replace_pkl(s, _one((300, 64), (64, 1), 19200)[0], {"0": b"\0" * 100})),
    "tensor extent past its storage": _pk(lambda s, t: _replace_pkl(s, *_one((300, 64), (64, 1), 100))),
    "storage offset past its storage": _pk(lambda s, t: _replace_pkl(s, *_one((4,), (1,), 32, offset=10**12))),
    "stride-0 huge shape on wte": _pk(lambda s, t: _replace_pkl(s, *_one((1 << 40, 1 << 40), (0, 0), 2))),
    "stride-0 huge shape, 16 dims": _pk(lambda s, t: _replace_pkl(s, *_one((1 << 30,) * 16, (0,) * 16, 2))),
    "17 dims": _pk(lambda s, t: _replace_pkl(s, *_one((1,) * 17, (1,) * 17, 2))),
    "negative dim": _pk(lambda s, t: _replace_pkl(s, *_one((-1, 64), (64, 1), 64))),
    "float dim": _pk(lambda s, t: _replace_pkl(s, *_one((300.0, 64), (64, 1), 19200))),
    "size and stride of different lengths": _pk(lambda s, t: _replace_pkl(s, *_one((300, 64), (64,), 19200))),
    "2**100 dim (LONG1)": _pk(lambda s, t: _replace_pkl(s, *_one((1 << 100, 1), (1, 1), 2))),
    "state dict is a list": _pk(lambda s, t: _replace_pkl(s, pickle.dumps([1, 2, 3], protocol=2))),
    "state dict value is an int": _pk(lambda s, t: _replace_pkl(s, pickle.dumps(collections.OrderedDict(w=3), protocol=2))),
    "state dict key is an int": _pk(lambda s, t: _replace_pkl(s, _dumps({7: _Tensor(_Storage("0", 4), 0, (4,), (1,))}))),
    "memo LONG_BINPUT 2**32-1": _pk(lambda s, t: _replace_pkl(s, b"\x80\x02}r\xff\xff\xff\xff.")),
    "memo BINGET undefined": _pk(lambda s, t: _replace_pkl(s, b"\x80\x02h\x05.")),
    "BINBYTES8 of 2**62 bytes": _pk(lambda s, t: _replace_pkl(s, b"\x80\x04\x8e" + struct.pack("<Q", 1 << 62) + b"xx.")),
    "BINUNICODE of 4 GiB": _pk(lambda s, t: _replace_pkl(s, b"\x80\x02X\xff\xff\xff\xffabc.")),
    "FRAME of 2**60 bytes": _pk(lambda s, t: _replace_pkl(s, b"\x80\x04\x95" + struct.pack("<Q", 1 << 60) + b"}.")),
    "LONG4 of a million bytes": _pk(lambda s, t: _replace_pkl(s, b"\x80\x02\x8b" + struct.pack("<i", 10**6) + b"\x01" * 10**6 + b".")),
    "100000-deep nested tuples": _pk(lambda s, t: _replace_pkl(s, b"\x80\x02" + b")\x85" * 100000 + b".")),
    "data.pkl truncated": _pk(lambda s, t: _replace_pkl(s, _dumps(collections.OrderedDict(w=_Tensor(_Storage("0", 4), 0, (4,), (1,))))[:-7])),
    "data.pkl empty": _pk(lambda s, t: _replace_pkl(s, b"")),
    "data.pkl random bytes": _pk(lambda s, t: _replace_pkl(s, np.random.default_rng(0).bytes(4096))),
    "data.pkl without STOP": _pk(lambda s, t: _replace_pkl(s, b"\x80\x02}")),
    "data.pkl 40 MiB (over the cap)": _pk(lambda s, t: _replace_pkl(s, b"\x80\x02X" + struct.pack("<I", 40 << 20) + b"a" * (40 << 20) + b".")),
    "zip bomb data.pkl, 256 MiB declared": _pk(lambda s, t: _bomb(s, 256 << 20, lie=False)),
    "zip bomb data.pkl, size field lies": _pk(lambda s, t: _bomb(s, 256 << 20, lie=True)),
    "zip cut in half": _pk(lambda s, t: _bin(s).write_bytes(_bin(s).read_bytes()[: _bin(s).stat().st_size // 2])),
    "zip cut to 10 bytes": _pk(lambda s, t: _bin(s).write_bytes(_bin(s).read_bytes()[:10])),
    "not a zip, not a pickle": _pk(lambda s, t: _bin(s).write_bytes(b"hello world" * 100)),
    "legacy (non-zip) torch pickle": _pk(lambda s, t: _bin(s).write_bytes(pickle.dumps({"w": 1}, protocol=2))),
    "empty file": _pk(lambda s, t: _bin(s).write_bytes(b"")),
    "zip without data.pkl": _pk(lambda s, t: zipfile.ZipFile(_bin(s), "w").writestr("archive/other", b"x")),
    "zip with two data.pkl": _pk(lambda s, t: (lambda z: (z.writestr("a/data.pkl", b"."), z.writestr("b/data.pkl", b"."), z.close()))(zipfile.ZipFile(_bin(s), "w"))),
    "zip directory declares 10**9 members": _pk(lambda s, t: _huge_directory(_bin(s))),
    "zip entries flagged encrypted": _pk(lambda s, t: _patch_central(_bin(s), 8, "<H", 1)),
    "zip compression method 99": _pk(lambda s, t: _patch_central(_bin(s), 10, "<H", 99)),
    "storage bytes fail the CRC": _pk(lambda s, t: (lambda p, d: p.write_bytes(d[:200] + bytes([d[200] ^ 0xFF]) + d[201:]))(
        _bin(s), _bin(s).read_bytes()) if False else _flip_storage(_bin(s))),
    "tensor that is not floating point": _pk(lambda s, t: _replace_pkl(s, *_one((300, 64), (64, 1), 19200, kind="IntStorage", data=b"\0" * 76800))),
    "fp32 values beyond fp16 range": _pk(lambda s, t: _replace_pkl(s, *_one((300, 64), (64, 1), 19200, kind="FloatStorage",
                                                                           data=np.full(19200, 1e30, np.float32).tobytes()))),
    "a tensor the config has no place for": _pk(lambda s, t: _replace_pkl(s, *_one((4,), (1,), 4, name="transformer.h.99.ln_1.weight"))),
    "GPTQ qweight stride-0 huge": ("gptq", lambda s, t: _gptq_part(s, "transformer.h.0.mlp.fc_in.qweight", (1 << 20, 1 << 20), (0, 0), "IntStorage")),
    "GPTQ scales huge groups": ("gptq", lambda s, t: _gptq_part(s, "transformer.h.0.mlp.fc_in.scales", (1 << 30, 256), (0, 1), "HalfStorage")),
    "GPTQ g_idx wrong length": ("gptq", lambda s, t: _gptq_part(s, "transformer.h.0.mlp.fc_in.g_idx", (10,), (1,), "IntStorage")),
    "GPTQ qweight as floats": ("gptq", lambda s, t: _gptq_part(s, "transformer.h.0.mlp.fc_in.qweight", (8, 256), (256, 1), "HalfStorage")),
}


def _huge_directory(path: Path) -> None:
    """End records (zip64 and classic) claiming 10**9 members in a 1 GB central directory."""
    data = bytearray(path.read_bytes())
    z64 = data.rfind(b"PK\x06\x06")
    if z64 >= 0:
        struct.pack_into("<QQQ", data, z64 + 24, 10**9, 10**9, 10**9)
    end = data.rfind(b"PK\x05\x06")
    struct.pack_into("<HHI", data, end + 8, 0xFFFF, 0xFFFF, 0xFFFFFFFF)
    path.write_bytes(bytes(data))


def _flip_storage(path: Path) -> None:
    with zipfile.ZipFile(path) as zf:
        info = next(i for i in zf.infolist() if "/data/" in i.filename and i.file_size > 16)
    data = bytearray(path.read_bytes())
    name_len, extra_len = struct.unpack_from("<HH", data, info.header_offset + 26)
    data[info.header_offset + 30 + name_len + extra_len + 5] ^= 0xFF
    path.write_bytes(bytes(data))


def _gptq_part(src: Path, name: str, shape, stride, kind) -> None:
    """Replace one GPTQ part of the checkpoint with a described (not materialized) tensor."""
    from safetensors.numpy import load_file

    files = sorted(src.glob("*.safetensors"))
    tensors = {}
    for f in files:
        tensors.update(load_file(f))
        f.unlink()
    (src / "model.safetensors.index.json").unlink(missing_ok=True)
    storages, state = {}, collections.OrderedDict()
    kinds = {np.dtype("int32"): "IntStorage", np.dtype("float16"): "HalfStorage", np.dtype("float32"): "FloatStorage",
             np.dtype("int64"): "LongStorage", np.dtype("uint8"): "ByteStorage"}
    for i, (key, array) in enumerate(tensors.items()):
        if key == name:
            continue
        storages[str(i)] = np.ascontiguousarray(array).tobytes()
        strides = tuple(s // array.itemsize for s in np.ascontiguousarray(array).strides)
        state[key] = _Tensor(_Storage(str(i), array.size, kinds[array.dtype]), 0, array.shape, strides)
    storages["x"] = b"\0" * 64
    state[name] = _Tensor(_Storage("x", 16, kind), 0, shape, stride)
    write_torch_zip(src / "pytorch_model.bin", _dumps(state), storages)


# ----------------------------------------------------------------------------- safetensors headers


def _st_file(src: Path) -> Path:
    return src / "model.safetensors"


def _read_st(path: Path) -> tuple[dict, bytes]:
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8 : 8 + n]), raw[8 + n :]


def _write_st(path: Path, header: bytes | object, data: bytes, length: int | None = None) -> None:
    text = header if isinstance(header, bytes) else json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(text) if length is None else length) + text + data)


def _st(mutate):
    """A case that edits the parsed header (mutate returns the new header, or raw bytes)."""

    def apply(src: Path, tmp: Path) -> None:
        header, data = _read_st(_st_file(src))
        _write_st(_st_file(src), mutate(header), data)

    return ("st", apply)


def _first(header: dict) -> str:
    return next(k for k in header if k != "__metadata__")


def _second(header: dict) -> str:
    return [k for k in header if k != "__metadata__"][1]


def _set(field, value, which=_first):
    def mutate(h):
        h[which(h)][field] = value
        return h

    return _st(mutate)


def _shift_all(h: dict, by: int) -> dict:
    for k, v in h.items():
        if k != "__metadata__":
            v["data_offsets"] = [v["data_offsets"][0] + by, v["data_offsets"][1] + by]
    return h


def _overlap(h: dict) -> dict:
    a, b = _first(h), _second(h)
    h[b]["data_offsets"] = list(h[a]["data_offsets"]) if h[a]["shape"] == h[b]["shape"] else h[b]["data_offsets"]
    begin = h[a]["data_offsets"][0]
    for k, v in h.items():  # the last tensor moved onto the first one's bytes, same size
        pass
    last = max((k for k in h if k != "__metadata__"), key=lambda k: h[k]["data_offsets"][0])
    size = h[last]["data_offsets"][1] - h[last]["data_offsets"][0]
    h[last]["data_offsets"] = [begin, begin + size]
    return h


SAFETENSORS_CASES = {
    "header is a list": _st(lambda h: [1, 2, 3]),
    "header is a number": _st(lambda h: 42),
    "header is a string": _st(lambda h: "tensors"),
    "header is null": _st(lambda h: None),
    "header is not JSON": _st(lambda h: b"{not json"),
    "header is not UTF-8": _st(lambda h: b'{"\xff\xfe": 1}'),
    "header 100000-deep JSON": _st(lambda h: b"[" * 100000 + b"]" * 100000),
    "header with NaN": _st(lambda h: json.dumps(h).replace('"data_offsets": [0,', '"data_offsets": [NaN,', 1).encode()),
    "header with a duplicate key": _st(lambda h: (json.dumps(h)[:-1] + ', "' + _first(h) + '": ' + json.dumps(h[_first(h)]) + "}").encode()),
    "entry without dtype": _st(lambda h: (h[_first(h)].pop("dtype"), h)[1]),
    "entry without shape": _st(lambda h: (h[_first(h)].pop("shape"), h)[1]),
    "entry without data_offsets": _st(lambda h: (h[_first(h)].pop("data_offsets"), h)[1]),
    "entry is a list": _st(lambda h: {**h, _first(h): [1, 2]}),
    "entry is a number": _st(lambda h: {**h, _first(h): 7}),
    "float shape": _set("shape", [300.0, 64.0]),
    "negative shape": _set("shape", [-300, -64]),
    "bool shape": _set("shape", [True, 64]),
    "shape is a string": _set("shape", "300x64"),
    "shape of 2**40 x 2**40": _set("shape", [1 << 40, 1 << 40]),
    "dtype unknown": _set("dtype", "F128"),
    "dtype a number": _set("dtype", 16),
    "dtype not floating point": _set("dtype", "I16"),
    "data_offsets negative": _set("data_offsets", [-8, 100]),
    "data_offsets reversed": _st(lambda h: (h[_first(h)].__setitem__("data_offsets", h[_first(h)]["data_offsets"][::-1]), h)[1]
                                 if h[_first(h)]["data_offsets"][0] != h[_first(h)]["data_offsets"][1] else h),
    "data_offsets of 3 numbers": _set("data_offsets", [0, 2, 4]),
    "data_offsets floats": _set("data_offsets", [0.0, 2.0]),
    "data_offsets before the data start": _st(lambda h: _shift_all(h, -64)),
    "data_offsets past the end": _st(lambda h: _shift_all(h, 1 << 40)),
    "data_offsets shifted by 2 (a gap)": _st(lambda h: _shift_all(h, 2)),
    "overlapping data_offsets": _st(_overlap),
    "byte count does not match shape": _st(lambda h: (h[_first(h)].__setitem__("shape", [1]), h)[1]),
    "__metadata__ is a list": _st(lambda h: {**h, "__metadata__": ["x"]}),
    "__metadata__ value not a string": _st(lambda h: {**h, "__metadata__": {"format": 1}}),
    "header length 2**63": ("st", lambda s, t: _write_st(_st_file(s), b"{}", b"", length=1 << 63)),
    "header length past the file": ("st", lambda s, t: (lambda h, d: _write_st(_st_file(s), json.dumps(h).encode(), d, length=len(json.dumps(h)) + len(d) + 9))(*_read_st(_st_file(s)))),
    "header length 200 MiB (over the cap)": ("st", lambda s, t: _write_st(_st_file(s), b" " * 16, b"", length=200 << 20)),
    "file of 5 bytes": ("st", lambda s, t: _st_file(s).write_bytes(b"\x01\x02\x03\x04\x05")),
    "data truncated by 100 bytes": ("st", lambda s, t: _st_file(s).write_bytes(_st_file(s).read_bytes()[:-100])),
    "trailing bytes after the data": ("st", lambda s, t: _st_file(s).write_bytes(_st_file(s).read_bytes() + b"\0" * 64)),
    "empty header {} with data": _st(lambda h: {}),
    "tensor shape contradicts config": _st(lambda h: _swap_shapes(h)),
}


def _swap_shapes(h: dict) -> dict:
    key = next(k for k in h if k.endswith("wte.weight"))
    shape = h[key]["shape"]
    h[key]["shape"] = [shape[1], shape[0]]
    return h


# ----------------------------------------------------------------------------- index files


def _index(mutate):
    def apply(src: Path, tmp: Path) -> None:
        path = src / "model.safetensors.index.json"
        data = json.loads(path.read_text())
        new = mutate(data, src, tmp)
        path.write_bytes(new if isinstance(new, bytes) else json.dumps(new).encode())

    return ("st_index", apply)


def _shard(data: dict, value) -> dict:
    key = next(iter(data["weight_map"]))
    data["weight_map"][key] = value
    return data


def _outside_shard(d: dict, s: Path, t: Path) -> dict:
    name = sorted(set(d["weight_map"].values()))[0]
    shutil.move(s / name, t / name)
    os.symlink(t / name, s / name)
    return d


INDEX_CASES = {
    "index is a list": _index(lambda d, s, t: [d]),
    "index without weight_map": _index(lambda d, s, t: {"metadata": {}}),
    "weight_map is a list": _index(lambda d, s, t: {"weight_map": list(d["weight_map"])}),
    "weight_map value is a number": _index(lambda d, s, t: _shard(d, 3)),
    "weight_map value is null": _index(lambda d, s, t: _shard(d, None)),
    "shard ../outside.safetensors": _index(lambda d, s, t: _shard(d, "../outside.safetensors")),
    "shard /etc/passwd": _index(lambda d, s, t: _shard(d, "/etc/passwd")),
    "shard in a subfolder": _index(lambda d, s, t: _shard(d, "sub/model.safetensors")),
    "shard named ..": _index(lambda d, s, t: _shard(d, "..")),
    "shard name empty": _index(lambda d, s, t: _shard(d, "")),
    "shard missing": _index(lambda d, s, t: _shard(d, "model-99999-of-99999.safetensors")),
    "shard is a symlink outside": _index(_outside_shard),
    "20000 distinct shards": _index(lambda d, s, t: {"weight_map": {f"t{i}": f"m{i}.safetensors" for i in range(20000)}}),
    "index not JSON": _index(lambda d, s, t: b"{weight_map"),
    "index not UTF-8": _index(lambda d, s, t: b'{"weight_map": {"\xff": "a"}}'),
    "index 100000-deep": _index(lambda d, s, t: b'{"weight_map": ' + b"[" * 100000 + b"]" * 100000 + b"}"),
    "index with a duplicate key": _index(lambda d, s, t: b'{"weight_map": {}, "weight_map": {}}'),
    "shard listed twice holds a tensor twice": _index(lambda d, s, t: _dup_tensor(d, s)),
}


def _dup_tensor(d: dict, s: Path) -> dict:
    names = sorted(set(d["weight_map"].values()))
    shutil.copy(s / names[0], s / "extra.safetensors")
    d["weight_map"]["duplicate.marker"] = "extra.safetensors"
    return d


# ----------------------------------------------------------------------------- configs


def _cfg(**edits):
    def apply(src: Path, tmp: Path) -> None:
        data = json.loads((src / "config.json").read_text())
        data.update(edits)
        (src / "config.json").write_text(json.dumps(data))

    return ("st", apply)


def _cfg_raw(raw: bytes):
    return ("st", lambda s, t: (s / "config.json").write_bytes(raw))


CONFIG_CASES = {
    "n_layer 10**9": _cfg(n_layer=10**9),
    "n_layer -1": _cfg(n_layer=-1),
    "n_layer 0": _cfg(n_layer=0),
    "n_layer '2'": _cfg(n_layer="2"),
    "n_layer 2.0": _cfg(n_layer=2.0),
    "n_layer true": _cfg(n_layer=True),
    "n_layer 1 (fewer than the weights)": _cfg(n_layer=1),
    "n_embd 10**9": _cfg(n_embd=10**9),
    "vocab_size 10**12": _cfg(vocab_size=10**12),
    "vocab_size 0": _cfg(vocab_size=0),
    "vocab_size null": _cfg(vocab_size=None),
    "n_head 3": _cfg(n_head=3),
    "n_head 10**6": _cfg(n_head=10**6),
    "n_positions 10**12": _cfg(n_positions=10**12, n_ctx=10**12),
    "n_inner -4": _cfg(n_inner=-4),
    "n_inner 10**9": _cfg(n_inner=10**9),
    "rotary_dim 1000": _cfg(rotary_dim=1000),
    "rotary_dim odd": _cfg(rotary_dim=7),
    "eos_token_id 'abc'": _cfg(eos_token_id="abc"),
    "eos_token_id -5": _cfg(eos_token_id=-5),
    "bos_token_id [1]": _cfg(bos_token_id=[1]),
    "eos_token_id 2**40": _cfg(eos_token_id=1 << 40),
    "layer_norm_epsilon NaN": ("st", lambda s, t: (s / "config.json").write_text((s / "config.json").read_text().replace(
        '"layer_norm_epsilon": 1e-05', '"layer_norm_epsilon": NaN'))),
    "layer_norm_epsilon Infinity": ("st", lambda s, t: (s / "config.json").write_text((s / "config.json").read_text().replace(
        '"layer_norm_epsilon": 1e-05', '"layer_norm_epsilon": Infinity'))),
    "layer_norm_epsilon 1e400": ("st", lambda s, t: (s / "config.json").write_text((s / "config.json").read_text().replace(
        '"layer_norm_epsilon": 1e-05', '"layer_norm_epsilon": 1e400'))),
    "layer_norm_epsilon -1": _cfg(layer_norm_epsilon=-1.0),
    "layer_norm_epsilon 'abc'": _cfg(layer_norm_epsilon="abc"),
    "layer_norm_epsilon true": _cfg(layer_norm_epsilon=True),
    "model_type 42": _cfg(model_type=42),
    "model_type gpt2": _cfg(model_type="gpt2"),
    "model_type a dict": _cfg(model_type={"a": 1}),
    "activation_function relu": _cfg(activation_function="relu"),
    "tie_word_embeddings 'no'": _cfg(tie_word_embeddings="no"),
    "wbits '4'": _cfg(wbits="4"),
    "groupsize 'x'": _cfg(groupsize="x"),
    "config is a list": _cfg_raw(b"[1, 2]"),
    "config is not JSON": _cfg_raw(b"{model_type: moss"),
    "config not UTF-8": _cfg_raw(b'{"model_type": "moss\xff\xfe"}'),
    "config UTF-16": _cfg_raw('{"model_type": "codegen"}'.encode("utf-16")),
    "config 100000-deep": _cfg_raw(b'{"model_type": "codegen", "x": ' + b"[" * 100000 + b"]" * 100000 + b"}"),
    "config n_layer of 5000 digits": _cfg_raw(b'{"model_type": "codegen", "n_layer": ' + b"9" * 5000 + b"}"),
    "config 20 MiB": _cfg_raw(b'{"model_type": "codegen", "x": "' + b"a" * (20 << 20) + b'"}'),
    "config empty": _cfg_raw(b""),
    "config without model_type": ("st", lambda s, t: (lambda d: (d.pop("model_type"), (s / "config.json").write_text(json.dumps(d))))(
        json.loads((s / "config.json").read_text()))),
    "config duplicate keys": _cfg_raw(b'{"model_type": "codegen", "n_layer": 2, "n_layer": 1}'),
}


# ----------------------------------------------------------------------------- symlinks and --out


def _link(name: str, target):
    def apply(src: Path, tmp: Path) -> None:
        where = target(src, tmp) if callable(target) else target
        (src / name).unlink(missing_ok=True)
        os.symlink(where, src / name)

    return ("st", apply)


def _outside_copy(name: str):
    def target(src: Path, tmp: Path) -> Path:
        dst = tmp / f"outside-{name}"
        shutil.copy(src / name, dst)
        return dst

    return target


SYMLINK_CASES = {
    "added_tokens.json -> /etc/passwd": _link("added_tokens.json", "/etc/passwd"),
    "vocab.json -> ../outside copy": _link("vocab.json", lambda s, t: Path("..") / _outside_copy("vocab.json")(s, t).name),
    "merges.txt -> absolute outside copy": _link("merges.txt", _outside_copy("merges.txt")),
    "config.json -> outside copy": _link("config.json", _outside_copy("config.json")),
    "model.safetensors -> outside copy": _link("model.safetensors", _outside_copy("model.safetensors")),
    "tokenizer_config.json symlink loop": _link("tokenizer_config.json", lambda s, t: s / "tokenizer_config.json"),
    "special_tokens_map.json dangling": _link("special_tokens_map.json", lambda s, t: t / "nowhere.json"),
    "pytorch_model.bin -> outside copy": ("torch", lambda s, t: (lambda p: (shutil.move(p, t / "o.bin"), os.symlink(t / "o.bin", p)))(_bin(s))),
    "tokenizer.json is a folder": ("st", lambda s, t: (s / "tokenizer.json").mkdir()),
}

ALL_CASES = {
    **{f"pickle/zip: {k}": v for k, v in PICKLE_CASES.items()},
    **{f"safetensors: {k}": v for k, v in SAFETENSORS_CASES.items()},
    **{f"index: {k}": v for k, v in INDEX_CASES.items()},
    **{f"config: {k}": v for k, v in CONFIG_CASES.items()},
    **{f"symlink: {k}": v for k, v in SYMLINK_CASES.items()},
}


def _make(bases, name: str, tmp: Path) -> Path:
    kind, apply = ALL_CASES[name]
    src = _copy(bases, kind, tmp)
    apply(src, tmp)
    return src


@pytest.mark.parametrize("name", list(ALL_CASES))
def test_a_hostile_source_ends_in_one_clear_error(bases, name: str, tmp_path: Path) -> None:
    src = _make(bases, name, tmp_path)
    (tmp_path / "victim").mkdir()
    out = tmp_path / "out"
    with pytest.raises(JmossError) as err:
        convert(str(src), out, progress=False)
    assert str(err.value).strip(), "the error must say something"
    assert not (out / MANIFEST).exists(), "no store may be finished from a hostile source"
    with pytest.raises(JmossError):
        verify(out)
    assert not (tmp_path / MARKER).exists() and (tmp_path / "victim").is_dir(), "code from the file ran"


def test_a_hugging_face_cache_snapshot_links_into_its_blobs_and_converts(bases, tmp_path: Path) -> None:
    """The one kind of link allowed: snapshots/<rev>/<file> -> ../../blobs/<hash>, as the hub lays it out."""
    repo = tmp_path / "models--org--tiny"
    snapshot = repo / "snapshots" / ("a" * 40)
    (repo / "blobs").mkdir(parents=True)
    snapshot.mkdir(parents=True)
    for f in bases["st"].iterdir():
        blob = repo / "blobs" / f"blob-{f.name}"
        shutil.copy(f, blob)
        os.symlink(Path("..") / ".." / "blobs" / blob.name, snapshot / f.name)
    out = convert(str(snapshot), tmp_path / "out", progress=False)
    verify(out)
    # ...but a link from the snapshot to anywhere else is still refused
    os.unlink(snapshot / "vocab.json")
    shutil.copy(bases["st"] / "vocab.json", tmp_path / "elsewhere.json")
    os.symlink(tmp_path / "elsewhere.json", snapshot / "vocab.json")
    with pytest.raises(JmossError, match="outside the checkpoint folder"):
        convert(str(snapshot), tmp_path / "out2", progress=False)


@pytest.mark.parametrize("where", ["the source itself", "a folder inside the source", "deep inside the source"])
def test_out_equal_to_or_inside_the_source_is_refused_and_touches_nothing(bases, where: str, tmp_path: Path) -> None:
    src = _copy(bases, "st", tmp_path)
    out = {"the source itself": src, "a folder inside the source": src / "store", "deep inside the source": src / "a" / "b"}[where]
    (src / "notes.tmp").write_text("mine")
    before = sorted(p.relative_to(src) for p in src.rglob("*"))
    with pytest.raises(JmossError, match="checkpoint folder"):
        convert(str(src), out, progress=False)
    assert sorted(p.relative_to(src) for p in src.rglob("*")) == before and (src / "notes.tmp").read_text() == "mine"


def test_a_users_tmp_files_in_out_survive_a_conversion(bases, tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "draft.tmp").write_text("mine")
    convert(str(bases["st"]), out, progress=False)
    assert (out / "draft.tmp").read_text() == "mine"


# ----------------------------------------------------------------------------- the CLI, from outside

LAUNCHER = textwrap.dedent(
    """
    import resource, subprocess, sys
    rc = subprocess.run(sys.argv[2:]).returncode
    open(sys.argv[1], "w").write(str(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024))
    sys.exit(rc)
    """
)

CLI_SAMPLE = [
    "pickle/zip: GLOBAL os.system REDUCE",
    "pickle/zip: STACK_GLOBAL os.system (protocol 4)",
    "pickle/zip: zip bomb data.pkl, 256 MiB declared",
    "pickle/zip: zip bomb data.pkl, size field lies",
    "pickle/zip: memo LONG_BINPUT 2**32-1",
    "pickle/zip: stride-0 huge shape on wte",
    "pickle/zip: data.pkl 40 MiB (over the cap)",
    "pickle/zip: 100000-deep nested tuples",
    "pickle/zip: GPTQ qweight stride-0 huge",
    "pickle/zip: zip cut in half",
    "safetensors: header is a list",
    "safetensors: header 100000-deep JSON",
    "safetensors: overlapping data_offsets",
    "safetensors: header length 2**63",
    "index: shard ../outside.safetensors",
    "config: n_layer 10**9",
    "config: eos_token_id 'abc'",
    "config: layer_norm_epsilon NaN",
    "config: config not UTF-8",
    "symlink: added_tokens.json -> /etc/passwd",
]


def run_cli(args: list[str], tmp: Path, **kw) -> tuple[subprocess.CompletedProcess, int]:
    """Run `jmoss ARGS` in a child; return it and its peak RSS in bytes, measured by a launcher."""
    rss_file = tmp / "rss.txt"
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    proc = subprocess.run([sys.executable, "-c", LAUNCHER, str(rss_file), sys.executable, "-m", "jmoss.cli", *args],
                          capture_output=True, text=True, env=env, timeout=120, **kw)
    return proc, int(rss_file.read_text())


@pytest.mark.parametrize("name", CLI_SAMPLE)
def test_the_cli_prints_one_error_line_no_traceback_and_stays_in_memory(bases, name: str, tmp_path: Path, report) -> None:
    src = _make(bases, name, tmp_path)
    proc, rss = run_cli(["convert", str(src), "--out", str(tmp_path / "out")], tmp_path)
    output = proc.stdout + proc.stderr
    assert proc.returncode != 0
    assert "Traceback" not in output, output[-2000:]
    assert [line for line in output.splitlines() if line.startswith("error:")] and len(
        [line for line in output.splitlines() if line.startswith("error:")]) == 1, output[-2000:]
    assert not (tmp_path / MARKER).exists()
    assert rss <= RSS_LIMIT, f"peak RSS {rss / 2**20:.0f} MiB"
    report(f"{name}: peak RSS {rss / 2**20:.0f} MiB, {output.strip().splitlines()[-1][:120]}")


EVERY_CASE_IN_ONE_CHILD = textwrap.dedent(
    """
    import shutil, sys
    from pathlib import Path
    sys.path.insert(0, sys.argv[2])
    import test_hostile_checkpoints as t
    root = Path(sys.argv[1])
    bases = t.build_bases(root / "bases")
    for i, name in enumerate(t.ALL_CASES):
        tmp = root / f"case{i}"
        tmp.mkdir()
        try:
            t.convert(str(t._make(bases, name, tmp)), tmp / "out", progress=False)
        except t.JmossError:
            pass
        else:
            sys.exit(f"accepted: {name}")
        shutil.rmtree(tmp)
    print(len(t.ALL_CASES))
    """
)


def test_every_hostile_convert_peaks_below_the_limit_measured_from_outside(tmp_path: Path, report) -> None:
    """All the cases above again, converted one after another in one child whose peak RSS the launcher reads."""
    rss_file = tmp_path / "rss.txt"
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    proc = subprocess.run([sys.executable, "-c", LAUNCHER, str(rss_file), sys.executable, "-c", EVERY_CASE_IN_ONE_CHILD,
                           str(tmp_path), str(Path(__file__).resolve().parent)],
                          capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    rss = int(rss_file.read_text())
    report(f"{proc.stdout.split()[-1]} hostile converts in one child: peak RSS {rss / 2**20:.0f} MiB "
           f"(torch and the test sources included)")
    assert rss <= RSS_LIMIT, f"peak RSS {rss / 2**20:.0f} MiB"


def test_case_counts(report) -> None:
    counts = {"pickle/zip": len(PICKLE_CASES), "safetensors": len(SAFETENSORS_CASES), "index": len(INDEX_CASES),
              "config": len(CONFIG_CASES), "symlink": len(SYMLINK_CASES)}
    report(f"hostile checkpoint cases: {counts}, total {sum(counts.values())} (+3 --out cases)")
    assert sum(counts.values()) >= 100


# ----------------------------------------------------------------------------- issue #26: nothing dropped, memory bounded

QUANT_LINEARS = ("attn.qkv_proj", "attn.out_proj", "mlp.fc_in", "mlp.fc_out")


def _edit_bin(src: Path, edit) -> None:
    path = src / "pytorch_model.bin"
    sd = torch.load(path, weights_only=True)
    edit(sd)
    torch.save(sd, path)


def _stray_weight(layer: int, linear: str):
    def edit(sd: dict) -> None:  # appended last: its layer is complete (and written) before it is seen
        out_features = sd[f"transformer.h.{layer}.{linear}.scales"].shape[1]
        in_features = sd[f"transformer.h.{layer}.{linear}.g_idx"].shape[0]
        sd[f"transformer.h.{layer}.{linear}.weight"] = torch.zeros(out_features, in_features, dtype=torch.float16)

    return edit


def _uneven_g_idx(sd: dict) -> None:
    """One Linear's act-order groups of unequal size: it has no packed form, the converter says --dequantize."""
    g_idx = sd["transformer.h.1.mlp.fc_in.g_idx"].clone()
    g_idx[int((g_idx == 0).nonzero()[0])] = int(g_idx.max())  # group 0 one feature short, the last one over
    sd["transformer.h.1.mlp.fc_in.g_idx"] = g_idx


STRAYS = {
    **{f"fp16 weight beside the GPTQ parts of layer {i} {lin}": _stray_weight(i, lin) for i in (0, 1) for lin in QUANT_LINEARS},
    "GPTQ parts of ln_1 (not a Linear)": lambda sd: sd.__setitem__("transformer.h.0.ln_1.qweight", torch.zeros(8, 64, dtype=torch.int32)),
    "GPTQ parts of wte (not a Linear)": lambda sd: sd.__setitem__("transformer.wte.g_idx", torch.zeros(64, dtype=torch.int32)),
    "a buffer-like name mlp.attn.bias": lambda sd: sd.__setitem__("transformer.h.0.mlp.attn.bias", torch.zeros(4)),
    "a buffer-like name xattn.causal_mask": lambda sd: sd.__setitem__("transformer.h.1.xattn.causal_mask", torch.zeros(4)),
}


@pytest.mark.parametrize("malformed", [False, True], ids=["well-formed", "hint to --dequantize"])
@pytest.mark.parametrize("stray", list(STRAYS))
def test_following_the_dequantize_hint_never_drops_a_stray_tensor(bases, stray: str, malformed: bool, tmp_path: Path) -> None:
    src = _copy(bases, "gptq", tmp_path)
    if malformed:
        _edit_bin(src, _uneven_g_idx)
        with pytest.raises(JmossError, match="--dequantize"):
            convert(str(src), tmp_path / "packed", progress=False)
        convert(str(src), tmp_path / "clean", progress=False, dequantize=True)  # the hint works
    _edit_bin(src, STRAYS[stray])
    for kwargs in ({}, {"dequantize": True}):
        out = tmp_path / f"out{len(kwargs)}"
        with pytest.raises(JmossError) as err:
            convert(str(src), out, progress=False, **kwargs)
        assert "--dequantize" not in str(err.value) or "both give" in str(err.value) or not kwargs, str(err.value)
        assert not (out / MANIFEST).exists()


def _huge_header(path: Path, entries: int) -> int:
    """A safetensors file whose header lists ``entries`` empty fp16 tensors (~58 bytes each; valid:
    zero-size tensors tile nothing), so only its size and count can refuse it."""
    chunks = [b'{"__metadata__":{"format":"pt"}']
    for i in range(entries):
        chunks.append(b',"t%x":{"dtype":"F16","shape":[0],"data_offsets":[0,0]}' % i)
    chunks.append(b"}")
    header = b"".join(chunks)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(header)))
        f.write(header)
    return len(header)


def _huge_string_header(path: Path, nbytes: int) -> int:
    """A valid header of no tensors whose metadata is one string of ``nbytes``: few values, many bytes."""
    header = b'{"__metadata__":{"x":"' + b"a" * nbytes + b'"}}'
    path.write_bytes(struct.pack("<Q", len(header)) + header)
    return len(header)


@pytest.mark.parametrize("shape", ["1.7M entries", "one 95 MiB string"])
def test_a_95_mib_safetensors_header_costs_at_most_500_mib_measured_from_outside(bases, shape: str, tmp_path: Path, report) -> None:
    src = _copy(bases, "st", tmp_path)
    file = src / "model.safetensors"
    size = _huge_header(file, 1_700_000) if shape == "1.7M entries" else _huge_string_header(file, 95 << 20)
    assert 90 << 20 < size < 100 << 20  # under the 100 MiB header cap: what it holds is what costs
    proc, rss = run_cli(["convert", str(src), "--out", str(tmp_path / "out")], tmp_path)
    output = proc.stdout + proc.stderr
    errors = [line for line in output.splitlines() if line.startswith("error:")]
    assert proc.returncode == 1 and len(errors) == 1 and "Traceback" not in output, output[-2000:]
    if shape == "1.7M entries":
        assert "JSON values" in errors[0], errors
    report(f"{size / 2**20:.0f} MiB safetensors header, {shape}: refused, peak RSS {rss / 2**20:.0f} MiB "
           "(jmoss convert in a child, measured by its launcher)")
    assert rss <= 500 << 20
