"""converters/torch_zip.py: reads real torch.save files without torch, refuses anything but tensors."""

from __future__ import annotations

import collections
import io
import os
import pickle
import subprocess
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

from jmoss.converters.torch_zip import TorchZipCheckpoint, read_state_dict, safe_unpickle
from jmoss.errors import CheckpointError, UnsafeCheckpointError


def _torch_bits(t: torch.Tensor) -> np.ndarray:
    if t.dtype == torch.bfloat16:
        return t.contiguous().view(torch.int16).numpy().view(np.uint16)
    return t.contiguous().numpy()


def test_reads_every_dtype_view_and_layout_torch_writes(tmp_path: Path) -> None:
    base = torch.arange(24, dtype=torch.float32).reshape(4, 6)
    sd = collections.OrderedDict(
        half=torch.randn(3, 5).half(),
        float=torch.randn(2, 3),
        double=torch.randn(3, dtype=torch.float64),
        bf16=torch.randn(4, 2).bfloat16(),
        int32=torch.arange(-3, 3, dtype=torch.int32),
        int64=torch.arange(5, dtype=torch.int64) * 10**12,
        int8=torch.tensor([-128, 0, 127], dtype=torch.int8),
        int16=torch.tensor([-3, 300], dtype=torch.int16),
        uint8_mask=torch.tril(torch.ones(5, 5, dtype=torch.uint8)).view(1, 1, 5, 5),
        bool=torch.tensor([True, False, True]),
        transposed=base.t(),  # non-contiguous: read through strides
        row_view=base[2],  # shares base's storage at an offset
        base=base,
        scalar=torch.tensor(3.5),
        param=torch.nn.Parameter(torch.ones(2)),  # _rebuild_parameter
    )
    path = tmp_path / "odd name-1.bin"  # the archive prefix inside the zip follows the file name
    torch.save(sd, path)
    got = read_state_dict(path)
    assert list(got) == list(sd)
    for name, tensor in sd.items():
        expected = _torch_bits(tensor.detach())
        assert got[name].shape == expected.shape, name
        assert got[name].dtype == expected.dtype, name
        assert np.array_equal(got[name], expected), name


def test_reads_a_module_state_dict_with_metadata(tmp_path: Path) -> None:
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.LayerNorm(4))
    torch.save(model.state_dict(), tmp_path / "sd.bin")  # carries _metadata, set by BUILD
    got = read_state_dict(tmp_path / "sd.bin")
    for name, tensor in model.state_dict().items():
        assert np.array_equal(got[name], tensor.numpy())


def test_tensors_are_read_only_views_of_an_mmap_of_stored_members(tmp_path: Path) -> None:
    torch.save({"w": torch.arange(1000, dtype=torch.float16)}, tmp_path / "a.bin")
    with zipfile.ZipFile(tmp_path / "a.bin") as zf:
        assert all(i.compress_type == zipfile.ZIP_STORED for i in zf.infolist())
    ckpt = TorchZipCheckpoint(tmp_path / "a.bin")
    assert ckpt.tensors["w"].shape == (1000,)
    with ckpt.open_tensor("w") as array:
        assert not array.flags.writeable and not array.flags.owndata
        assert float(array[999]) == 999.0


def _zip_with_pickle(tmp_path: Path, payload: bytes, name: str = "evil.bin") -> Path:
    """A real torch zip file whose data.pkl is replaced by ``payload``."""
    good = tmp_path / "good.bin"
    torch.save({"w": torch.zeros(2)}, good)
    out = tmp_path / name
    with zipfile.ZipFile(good) as src, zipfile.ZipFile(out, "w", zipfile.ZIP_STORED) as dst:
        for info in src.infolist():
            data = payload if info.filename.endswith("/data.pkl") else src.read(info)
            dst.writestr(info.filename, data)
    return out


class _Call:
    """Pickles as fn(*args), the way a malicious checkpoint is written."""

    def __init__(self, fn, *args):
        self.fn, self.args = fn, args

    def __reduce__(self):
        return self.fn, self.args


def _payloads(marker: Path) -> dict[str, bytes]:
    touch = f"touch {marker}"
    write = f"open({str(marker)!r}, 'w').write('pwned')"
    import builtins
    import torch._utils as tu

    class _PidPickler(pickle.Pickler):
        def __init__(self, f, pid):
            super().__init__(f, protocol=2)
            self.pid = pid

        def persistent_id(self, obj):
            return self.pid if obj == "STORAGE" else None

    def with_pid(pid, obj) -> bytes:
        buf = io.BytesIO()
        _PidPickler(buf, pid).dump(obj)
        return buf.getvalue()

    def s(text: str) -> bytes:  # BINUNICODE
        return b"X" + len(text).to_bytes(4, "little") + text.encode()

    def short(text: str) -> bytes:  # SHORT_BINUNICODE
        return b"\x8c" + bytes([len(text)]) + text.encode()

    # {'w': persistent_id(('storage', torch.FakeStorage, '0', 'cpu', 1))}, written opcode by opcode
    fake_storage_pickle = b"\x80\x02}" + s("w") + b"(" + s("storage") + b"ctorch\nFakeStorage\n" + s("0") + s("cpu") + b"K\x01tQs."
    return {
        "os.system via REDUCE": pickle.dumps(_Call(os.system, touch), protocol=2),
        "builtins.eval": pickle.dumps(_Call(builtins.eval, write), protocol=2),
        "builtins.exec": pickle.dumps(_Call(builtins.exec, write), protocol=2),
        "subprocess via STACK_GLOBAL (protocol 4)": pickle.dumps(_Call(subprocess.call, ["touch", str(marker)]), protocol=4),
        "GLOBAL nested in an admitted rebuild's args": pickle.dumps(
            collections.OrderedDict(w=_Call(tu._rebuild_tensor_v2, _Call(os.system, touch), 0, (1,), (1,), False, collections.OrderedDict())),
            protocol=2,
        ),
        "fake storage type in a persistent id": fake_storage_pickle,
        "os.system as the storage type": with_pid(("storage", os.system, "0", "cpu", 1), {"w": "STORAGE"}),
        "admitted function posing as a storage type": with_pid(("storage", tu._rebuild_tensor_v2, "0", "cpu", 1), {"w": "STORAGE"}),
        "dotted attribute walk (protocol 4)": b"\x80\x04" + short("torch._utils") + short("_rebuild_tensor_v2.__globals__") + b"\x93.",
        "BUILD onto an admitted function": b"\x80\x02ctorch._utils\n_rebuild_tensor_v2\n}" + s("evil") + b"K\x01sb.",
        "BUILD attributes onto the state dict": b"\x80\x02ccollections\nOrderedDict\n)R}" + s("__class__") + b"K\x01sb.",
        "calling a storage type": b"\x80\x02ctorch\nHalfStorage\nK\x04\x85R.",
    }


_PAYLOAD_NAMES = list(_payloads(Path("/nonexistent")))


@pytest.mark.parametrize("kind", _PAYLOAD_NAMES)
def test_malicious_pickles_are_refused_and_nothing_runs(tmp_path: Path, kind: str) -> None:
    marker = tmp_path / "marker"
    path = _zip_with_pickle(tmp_path, _payloads(marker)[kind])
    with pytest.raises(UnsafeCheckpointError) as err:
        TorchZipCheckpoint(path)
    assert "refused" in str(err.value)
    assert not marker.exists()


@pytest.mark.parametrize("kind", ["os.system via REDUCE", "builtins.exec", "subprocess via STACK_GLOBAL (protocol 4)"])
def test_the_refused_payloads_are_live_under_plain_pickle(tmp_path: Path, kind: str) -> None:
    # Control: the same bytes given to pickle.loads do run, so the refusal above is what stopped them.
    marker = tmp_path / "marker"
    pickle.loads(_payloads(marker)[kind])
    assert marker.exists()


def test_refusal_names_the_global(tmp_path: Path) -> None:
    marker = tmp_path / "marker"
    with pytest.raises(UnsafeCheckpointError, match=r"posix\.system|os\.system"):
        safe_unpickle(_payloads(marker)["os.system via REDUCE"], where="shard.bin")


def test_legacy_non_zip_file_says_how_to_resave(tmp_path: Path) -> None:
    path = tmp_path / "pytorch_model.bin"
    torch.save({"w": torch.zeros(2)}, path, _use_new_zipfile_serialization=False)
    with pytest.raises(CheckpointError, match=r"(?s)legacy.*torch\.save\(torch\.load\("):
        TorchZipCheckpoint(path)


def test_truncated_file_is_named(tmp_path: Path) -> None:
    path = tmp_path / "pytorch_model-00002-of-00004.bin"
    torch.save({"w": torch.zeros(1000)}, path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=r"pytorch_model-00002-of-00004\.bin is truncated"):
        TorchZipCheckpoint(path)


def test_corrupt_storage_bytes_fail_the_crc(tmp_path: Path) -> None:
    path = tmp_path / "a.bin"
    torch.save({"w": torch.zeros(1000, dtype=torch.float16)}, path)
    ckpt = TorchZipCheckpoint(path)
    offset = ckpt._storage_member(ckpt.tensors["w"].storage)[0]
    data = bytearray(path.read_bytes())
    data[offset + 10] ^= 0xFF
    path.write_bytes(bytes(data))
    ckpt = TorchZipCheckpoint(path)
    with pytest.raises(CheckpointError, match="CRC"):
        with ckpt.open_tensor("w"):
            pass


def test_recompressed_archive_is_refused(tmp_path: Path) -> None:
    good = tmp_path / "good.bin"
    torch.save({"w": torch.zeros(1000)}, good)
    bad = tmp_path / "deflated.bin"
    with zipfile.ZipFile(good) as src, zipfile.ZipFile(bad, "w", zipfile.ZIP_DEFLATED) as dst:
        for info in src.infolist():
            dst.writestr(info.filename, src.read(info))
    with pytest.raises(CheckpointError, match="compressed"):  # refused at open, before any tensor is read
        TorchZipCheckpoint(bad)


def test_a_pickle_holding_something_other_than_tensors_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "a.bin"
    torch.save({"w": torch.zeros(2), "step": 3}, path)
    with pytest.raises(CheckpointError, match="'step' is a int, not a tensor"):
        TorchZipCheckpoint(path)


# ----------------------------------------------------------------------------- crafted zips (issue #26)
# Generated from one real torch.save file: every storage member duplicated, resized (with and without
# a flipped byte past the tensor), corrupted at several places; every storage re-described with
# another dtype or length; local headers renamed. What torch.load refuses (a record whose size is not
# its storage's), jmoss refuses; what torch resolves silently one way (a duplicate member name, one
# storage read with two dtypes), jmoss refuses rather than pick another way.

_SD = collections.OrderedDict(
    half=torch.arange(40, dtype=torch.float16).reshape(5, 8),
    float=torch.linspace(-1, 1, 12),
    int32=torch.arange(-6, 6, dtype=torch.int32),
    bf16=torch.linspace(0, 3, 8).bfloat16(),
    view=None,  # a second tensor on half's storage (filled below)
)


def _source(tmp_path: Path) -> tuple[Path, list[tuple[zipfile.ZipInfo, bytes]], str]:
    sd = collections.OrderedDict((k, v) for k, v in _SD.items() if v is not None)
    sd["view"] = sd["half"][1]
    path = tmp_path / "src.bin"
    torch.save(sd, path)
    with zipfile.ZipFile(path) as zf:
        members = [(info, zf.read(info)) for info in zf.infolist()]
    prefix = members[0][0].filename.split("/")[0]
    return path, members, prefix


def _rezip(path: Path, members: list[tuple[str, bytes]]) -> None:
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # zipfile warns about duplicate names: that is the point
        with zipfile.ZipFile(path, "w") as zf:
            for name, data in members:
                zf.writestr(zipfile.ZipInfo(name), data)


def _zip_cases() -> list[tuple[str, object]]:
    """(name, edit(members, prefix) -> members or raw bytes) for every storage of _SD."""
    cases = []
    for key in ("0", "1", "2", "3"):  # torch numbers storages in order: half, float, int32, bf16
        member = lambda prefix, k=key: f"{prefix}/data/{k}"  # noqa: E731

        def dup(members, prefix, k=key, first=True):
            name = member(prefix, k)
            data = dict(members)[name]
            other = bytes(b ^ 0x5A for b in data)
            extra = [(name, other)]
            return (extra + members) if first else (members + extra)

        cases += [(f"storage {key} duplicated (other copy first)", lambda m, p, f=dup: f(m, p, first=True)),
                  (f"storage {key} duplicated (other copy last)", lambda m, p, f=dup: f(m, p, first=False))]
        for extra in (1, 2, 16, 4096):
            for flip in (False, True):
                def longer(members, prefix, k=key, n=extra, flip=flip):
                    out = []
                    for name, data in members:
                        if name == member(prefix, k):
                            tail = bytearray(n)
                            if flip:
                                tail[n // 2] ^= 0x01
                            data = data + bytes(tail)
                        out.append((name, data))
                    return out

                cases.append((f"storage {key} {extra} bytes longer" + (", a byte past the tensor flipped" if flip else ""), longer))
        for short in (1, 2, 4):
            cases.append((f"storage {key} {short} bytes shorter",
                          lambda m, p, k=key, s=short: [(n, d[:-s] if n == member(p, k) else d) for n, d in m]))
    cases.append(("data.pkl duplicated", lambda m, p: m + [(f"{p}/data.pkl", dict(m)[f"{p}/data.pkl"])]))
    return cases


ZIP_CASES = dict(_zip_cases())


@pytest.mark.parametrize("case", list(ZIP_CASES))
def test_a_crafted_zip_is_refused_where_torch_refuses_or_would_choose(tmp_path: Path, case: str) -> None:
    path, members, prefix = _source(tmp_path)
    edited = ZIP_CASES[case]([(info.filename, data) for info, data in members], prefix)
    _rezip(path, edited)
    with pytest.raises(CheckpointError, match=r"src\.bin"):
        ckpt = TorchZipCheckpoint(path)
        for name in ckpt.tensors:
            with ckpt.open_tensor(name):
                pass


@pytest.mark.parametrize("at", ["first", "middle", "last"])
@pytest.mark.parametrize("key", ["0", "1", "2", "3"])
def test_a_flipped_storage_byte_fails_the_crc_wherever_it_is(tmp_path: Path, key: str, at: str) -> None:
    path, members, prefix = _source(tmp_path)
    out = []
    for info, data in members:
        if info.filename == f"{prefix}/data/{key}":
            data = bytearray(data)
            data[{"first": 0, "middle": len(data) // 2, "last": len(data) - 1}[at]] ^= 0x80
            data = bytes(data)
        out.append((info, data))
    # keep the original CRC in the directory (zipfile would recompute it): patch the bytes in place
    raw = bytearray(path.read_bytes())
    for (info, data), (_, orig) in zip(out, members):
        if data != orig:
            pos = raw.index(orig)
            raw[pos : pos + len(data)] = data
    path.write_bytes(bytes(raw))
    ckpt = TorchZipCheckpoint(path)
    with pytest.raises(CheckpointError, match="CRC"):
        for name in ckpt.tensors:
            with ckpt.open_tensor(name):
                pass


@pytest.mark.parametrize("key", ["0", "3"])
def test_a_member_whose_local_header_names_another_is_refused(tmp_path: Path, key: str) -> None:
    path, members, prefix = _source(tmp_path)
    raw = bytearray(path.read_bytes())
    name = f"{prefix}/data/{key}"
    pos = raw.index(name.encode())
    assert raw[pos - 30 : pos - 26] == b"PK\x03\x04"  # the local header comes first
    raw[pos + len(name) - 1] = ord("9")
    path.write_bytes(bytes(raw))
    with pytest.raises(CheckpointError, match="bad zip local header"):
        TorchZipCheckpoint(path)


_KINDS = {"float16": "HalfStorage", "float32": "FloatStorage", "int32": "IntStorage", "bfloat16": "BFloat16Storage",
          "uint8": "ByteStorage", "int64": "LongStorage"}


class _St:
    def __init__(self, key: str, kind: str, numel: int) -> None:
        self.key, self.kind, self.numel = key, kind, numel


class _T:
    def __init__(self, storage: _St, shape: tuple[int, ...]) -> None:
        self.args = (storage, 0, shape, (1,) if len(shape) == 1 else tuple(shape[1:]) + (1,))

    def __reduce__(self):
        return (torch._utils._rebuild_tensor_v2, (*self.args, False, collections.OrderedDict()))


class _P(pickle.Pickler):
    def persistent_id(self, obj):
        return ("storage", getattr(torch, obj.kind), obj.key, "cpu", obj.numel) if isinstance(obj, _St) else None


def _two_descriptions(path: Path, first: tuple[str, int], second: tuple[str, int]) -> None:
    buf = io.BytesIO()
    a = _St("0", _KINDS[first[0]], first[1])
    b = _St("0", _KINDS[second[0]], second[1])
    _P(buf, protocol=2).dump(collections.OrderedDict(a=_T(a, (first[1],)), b=_T(b, (second[1],))))
    nbytes = first[1] * np.dtype("uint16" if first[0] == "bfloat16" else first[0]).itemsize
    _rezip(path, [("archive/data.pkl", buf.getvalue()), ("archive/data/0", b"\0" * nbytes), ("archive/version", b"3\n")])


_DESCRIPTIONS = [(a, (b, 16)) for a in ("float16", "float32", "uint8") for b in _KINDS if b != a]
_DESCRIPTIONS += [(a, (a, n)) for a in ("float16", "int32") for n in (8, 17, 32)]


@pytest.mark.parametrize("first,second", _DESCRIPTIONS, ids=[f"{a}[16]-then-{b}[{n}]" for a, (b, n) in _DESCRIPTIONS])
def test_one_storage_read_with_two_dtypes_or_lengths_is_refused(tmp_path: Path, first: str, second: tuple[str, int]) -> None:
    path = tmp_path / "two.bin"
    _two_descriptions(path, (first, 16), second)
    with pytest.raises(CheckpointError, match=r"storage '0' is described as .* and again as"):
        TorchZipCheckpoint(path)


def test_one_storage_described_twice_the_same_way_is_one_storage(tmp_path: Path) -> None:
    path = tmp_path / "same.bin"
    _two_descriptions(path, ("float32", 16), ("float32", 16))
    ckpt = TorchZipCheckpoint(path)
    assert ckpt.tensors["a"].storage is ckpt.tensors["b"].storage
