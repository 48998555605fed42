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
