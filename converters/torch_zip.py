"""A torch-free, safe reader for ``torch.save`` zip checkpoints (``pytorch_model*.bin``).

A torch checkpoint is a zip archive: ``<prefix>/data.pkl`` (a pickle describing the tensors)
and ``<prefix>/data/<key>`` (one raw, stored-not-compressed member per storage). ``torch.load``
runs the pickle, which can execute arbitrary code. Here the pickle goes through a restricted
unpickler that admits only the globals a state dict of tensors needs (see ``_ADMITTED``); any
other global is refused *before* it is looked up, so nothing from the file is ever executed.
Tensors come back as ``TensorRef`` descriptions; their bytes are read later, one tensor at a
time, through an mmap of the zip at the storage member's data offset, so memory stays bounded.

What torch 2.x writes (checked with ``pickletools.dis`` on torch 2.13): a
``collections.OrderedDict`` (state dicts carry a ``_metadata`` OrderedDict applied by BUILD)
whose values are ``torch._utils._rebuild_tensor_v2(storage, offset, size, stride,
requires_grad, backward_hooks)`` calls; storages are persistent ids
``('storage', torch.HalfStorage, '<key>', 'cpu', numel)``; ``nn.Parameter`` adds
``torch._utils._rebuild_parameter``; a bare untyped storage uses ``torch.storage.UntypedStorage``.
"""

from __future__ import annotations

import contextlib
import io
import math
import mmap
import pickle
import pickletools
import struct
import zipfile
import zlib
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from jmoss.errors import CheckpointError, UnsafeCheckpointError

# Sizes checked before anything is allocated. A state dict's data.pkl is ~150 bytes per tensor
# (moss-moon-003's shards: well under 1 MiB), so these bound a hostile file, not a real one.
MAX_PICKLE_BYTES = 32 << 20
MAX_ZIP_MEMBERS = 200_000
MAX_CENTRAL_DIRECTORY_BYTES = 64 << 20
MAX_NDIM = 16
# Opcodes a torch state dict never uses and that only serve to build arbitrary objects.
_REFUSED_OPCODES = {"INST", "OBJ", "NEWOBJ", "NEWOBJ_EX", "EXT1", "EXT2", "EXT4", "NEXT_BUFFER", "READONLY_BUFFER"}

# numpy dtype of each storage type; bfloat16 has no numpy dtype and is read as raw uint16.
STORAGE_DTYPES: dict[str, str] = {
    "HalfStorage": "float16",
    "FloatStorage": "float32",
    "DoubleStorage": "float64",
    "BFloat16Storage": "bfloat16",
    "ByteStorage": "uint8",
    "CharStorage": "int8",
    "ShortStorage": "int16",
    "IntStorage": "int32",
    "LongStorage": "int64",
    "BoolStorage": "bool",
}


def numpy_dtype(dtype: str) -> np.dtype:
    """The numpy dtype that holds ``dtype``'s bytes (bfloat16 is carried as uint16)."""
    return np.dtype("uint16" if dtype == "bfloat16" else dtype)


class _Frozen:
    """Base of the objects the unpickler hands out: no __dict__, and BUILD on them is refused.

    Without this a pickle could BUILD (setattr) onto an admitted object and change how later
    code treats it.
    """

    __slots__ = ()

    def __setstate__(self, state: Any) -> None:
        raise UnsafeCheckpointError(f"checkpoint pickle tries to set state on {self!r}; refused")

    def __reduce__(self):  # never re-pickled
        raise TypeError("not picklable")


class StorageType(_Frozen):
    """Stands for ``torch.HalfStorage`` & co. inside a persistent id; not callable."""

    __slots__ = ("name", "dtype")

    def __init__(self, name: str, dtype: str) -> None:
        object.__setattr__(self, "name", name)
        object.__setattr__(self, "dtype", dtype)

    def __repr__(self) -> str:
        return f"<storage type {self.name}>"


class StorageRef(_Frozen):
    """One storage: the zip member ``data/<key>`` holding ``numel`` elements of ``dtype``."""

    __slots__ = ("key", "dtype", "numel")

    def __init__(self, key: str, dtype: str, numel: int) -> None:
        object.__setattr__(self, "key", key)
        object.__setattr__(self, "dtype", dtype)
        object.__setattr__(self, "numel", numel)

    def __repr__(self) -> str:
        return f"<storage {self.key} {self.dtype}[{self.numel}]>"


@dataclass(frozen=True)
class TensorRef:
    """A tensor described by the pickle: a strided view into one storage (bytes not read yet)."""

    storage: StorageRef
    offset: int  # in elements
    shape: tuple[int, ...]
    stride: tuple[int, ...]

    @property
    def dtype(self) -> str:
        return self.storage.dtype

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        return self.numel * numpy_dtype(self.dtype).itemsize

    def is_contiguous(self) -> bool:
        expected, step = [], 1
        for dim in reversed(self.shape):
            expected.append(step)
            step *= dim
        return all(s == e for s, e, d in zip(self.stride, reversed(expected), self.shape) if d > 1)

    def extent(self) -> int:
        """Elements of the storage the view touches, counted from ``offset``."""
        if self.numel == 0:
            return 0
        return 1 + sum((d - 1) * s for d, s in zip(self.shape, self.stride))


class _Admitted(_Frozen):
    """An admitted global: a callable wrapper that checks its arguments before building anything."""

    __slots__ = ("qualname", "fn")

    def __init__(self, qualname: str, fn) -> None:
        object.__setattr__(self, "qualname", qualname)
        object.__setattr__(self, "fn", fn)

    def __call__(self, *args: Any) -> Any:
        return self.fn(*args)

    def __repr__(self) -> str:
        return f"<admitted {self.qualname}>"


def _int_tuple(value: Any, what: str) -> tuple[int, ...]:
    if (
        not isinstance(value, tuple)
        or len(value) > MAX_NDIM
        or not all(isinstance(v, int) and not isinstance(v, bool) and 0 <= v < 1 << 62 for v in value)
    ):
        raise UnsafeCheckpointError(
            f"checkpoint pickle passes {what}={_short(value)} to a tensor rebuild; expected a tuple of at most "
            f"{MAX_NDIM} non-negative ints"
        )
    return value


def _short(value: Any) -> str:
    try:
        text = repr(value)
    except Exception:  # e.g. an int too long to print
        return f"<{type(value).__name__}>"
    return text if len(text) <= 100 else text[:97] + "..."


def _rebuild_tensor(storage: Any, storage_offset: Any, size: Any, stride: Any, *rest: Any) -> TensorRef:
    """Accepts both ``_rebuild_tensor`` and ``_rebuild_tensor_v2`` argument lists."""
    if not isinstance(storage, StorageRef):
        raise UnsafeCheckpointError(f"checkpoint pickle rebuilds a tensor from {type(storage).__name__}, not a storage")
    if not isinstance(storage_offset, int) or isinstance(storage_offset, bool) or not 0 <= storage_offset < 1 << 62:
        raise UnsafeCheckpointError(f"checkpoint pickle gives storage offset {_short(storage_offset)}")
    shape, strides = _int_tuple(size, "size"), _int_tuple(stride, "stride")
    if len(shape) != len(strides):
        raise UnsafeCheckpointError(f"checkpoint pickle gives size {shape} and stride {strides} of different lengths")
    # rest: requires_grad, backward_hooks (an OrderedDict), optional metadata; none of them matter.
    ref = TensorRef(storage, storage_offset, shape, strides)
    if storage_offset + ref.extent() > storage.numel:
        raise CheckpointError(
            f"a tensor of shape {shape} at offset {storage_offset} runs past its storage "
            f"{storage.key} of {storage.numel} elements; the checkpoint is corrupt"
        )
    return ref


def _rebuild_parameter(data: Any, requires_grad: Any = False, backward_hooks: Any = None, *rest: Any) -> TensorRef:
    if not isinstance(data, TensorRef):
        raise UnsafeCheckpointError(f"checkpoint pickle wraps {type(data).__name__} as a Parameter; expected a tensor")
    return data


class _StateDict(OrderedDict):
    """The OrderedDict the pickle builds; BUILD may only attach torch's ``_metadata`` dict."""

    def __setstate__(self, state: Any) -> None:
        if not (isinstance(state, dict) and set(state) <= {"_metadata"}):
            raise UnsafeCheckpointError("checkpoint pickle sets unexpected attributes on a dict; refused")


def _ordered_dict(*args: Any) -> OrderedDict:
    if args and not (len(args) == 1 and isinstance(args[0], (list, tuple, dict))):
        raise UnsafeCheckpointError("checkpoint pickle calls OrderedDict with unexpected arguments")
    return _StateDict(*args)


_STORAGE_TYPES = {name: StorageType(name, dtype) for name, dtype in STORAGE_DTYPES.items()}
_UNTYPED = StorageType("UntypedStorage", "uint8")

# (module, name) -> object. Everything else is refused without importing or calling it.
_ADMITTED: dict[tuple[str, str], Any] = {
    ("collections", "OrderedDict"): _Admitted("collections.OrderedDict", _ordered_dict),
    ("torch._utils", "_rebuild_tensor"): _Admitted("torch._utils._rebuild_tensor", _rebuild_tensor),
    ("torch._utils", "_rebuild_tensor_v2"): _Admitted("torch._utils._rebuild_tensor_v2", _rebuild_tensor),
    ("torch._utils", "_rebuild_parameter"): _Admitted("torch._utils._rebuild_parameter", _rebuild_parameter),
    ("torch.storage", "UntypedStorage"): _UNTYPED,
    ("torch", "UntypedStorage"): _UNTYPED,
    **{("torch", name): st for name, st in _STORAGE_TYPES.items()},
}


class _RestrictedUnpickler(pickle.Unpickler):
    def __init__(self, data: bytes, where: str) -> None:
        super().__init__(io.BytesIO(data))
        self._where = where
        self._storages: dict[str, StorageRef] = {}

    def find_class(self, module: str, name: str) -> Any:
        try:
            return _ADMITTED[(module, name)]
        except KeyError:
            raise UnsafeCheckpointError(
                f"{self._where}: the pickle asks for the global {module}.{name}, which is not a tensor "
                "or storage; refused without executing anything. A plain state-dict checkpoint never "
                "needs it: do not trust this file"
            ) from None

    def persistent_load(self, pid: Any) -> StorageRef:
        if not (
            isinstance(pid, tuple)
            and len(pid) == 5
            and pid[0] == "storage"
            and isinstance(pid[1], StorageType)
            and isinstance(pid[2], str)
            and isinstance(pid[3], str)
            and isinstance(pid[4], int)
            and not isinstance(pid[4], bool)
            and 0 <= pid[4] < 1 << 62
        ):
            raise UnsafeCheckpointError(
                f"{self._where}: the pickle has a persistent id {_short(pid)} that is not a torch storage; refused"
            )
        key, dtype, numel = pid[2], pid[1].dtype, pid[4]
        seen = self._storages.get(key)
        if seen is None:
            seen = self._storages[key] = StorageRef(key, dtype, numel)
        elif (seen.dtype, seen.numel) != (dtype, numel):
            # torch.load keeps the first description of a storage for every later tensor on it:
            # converting each tensor with its own dtype would give weights torch never loads
            raise CheckpointError(
                f"{self._where}: storage {key[:40]!r} is described as {seen.dtype}[{seen.numel}] and again as "
                f"{dtype}[{numel}]; torch reads one storage with one dtype: the file is corrupt or crafted"
            )
        return seen


def _prescan(data: bytes, where: str) -> None:
    """Walk the opcodes before unpickling: refuse object-building opcodes, and memo indexes or
    integers no state dict has (``LONG_BINPUT 4294967295`` makes the C unpickler allocate and zero
    a 32 GiB memo table). Lengths of strings/bytes are checked against the data by genops, which
    reads no more than is there."""
    ops = 0
    try:
        for op, arg, pos in pickletools.genops(data):
            ops += 1
            if op.name in _REFUSED_OPCODES:
                raise UnsafeCheckpointError(
                    f"{where}: the pickle uses the {op.name} opcode at byte {pos}, which builds arbitrary objects "
                    "and which no tensor checkpoint uses; refused without executing anything. Do not trust this file"
                )
            if op.name in ("PUT", "BINPUT", "LONG_BINPUT", "GET", "BINGET", "LONG_BINGET"):
                if not isinstance(arg, int) or not 0 <= arg <= ops:
                    raise CheckpointError(f"{where}: data.pkl has memo index {_short(arg)} at byte {pos}; the file is corrupt or hostile")
            elif op.name in ("INT", "LONG", "LONG1", "LONG4") and isinstance(arg, int) and abs(arg) >= 1 << 64:
                raise CheckpointError(f"{where}: data.pkl has an integer of {arg.bit_length()} bits at byte {pos}; no tensor needs it")
            if op.name == "STOP":
                return
    except (UnsafeCheckpointError, CheckpointError):
        raise
    except Exception as exc:  # truncated or garbled stream
        raise CheckpointError(f"{where}: data.pkl is corrupt ({type(exc).__name__}: {str(exc)[:200]}); re-download the file") from None
    raise CheckpointError(f"{where}: data.pkl ends without a STOP opcode; the file is truncated")


def safe_unpickle(data: bytes, where: str = "checkpoint") -> Any:
    """Unpickle torch's ``data.pkl`` admitting only tensor/storage globals; never executes code."""
    if len(data) > MAX_PICKLE_BYTES:
        raise CheckpointError(f"{where}: data.pkl is {len(data)} bytes, over the {MAX_PICKLE_BYTES >> 20} MiB any state dict needs; refused")
    _prescan(data, where)
    try:
        return _RestrictedUnpickler(data, where).load()
    except (UnsafeCheckpointError, CheckpointError):
        raise
    except TypeError as exc:
        # e.g. a REDUCE on a storage type, or wrong arguments to an admitted rebuild function
        raise UnsafeCheckpointError(f"{where}: the pickle makes a call that no tensor checkpoint makes ({exc}); refused") from None
    except Exception as exc:  # truncated or garbled pickle stream
        raise CheckpointError(f"{where}: data.pkl is corrupt ({type(exc).__name__}: {str(exc)[:200]}); re-download the file") from None


_LOCAL_HEADER = struct.Struct("<4sHHHHHIIIHH")
_ZIP_ERRORS = (
    zipfile.BadZipFile, zipfile.LargeZipFile, OSError, EOFError, ValueError, RuntimeError, NotImplementedError,
    zlib.error, struct.error, UnicodeDecodeError, OverflowError, KeyError,
)


def _legacy_hint(path: Path) -> str:
    return (
        f"{path.name} is a legacy (pre-1.6, non-zip) torch file, which jmoss does not read because "
        "its pickle cannot be inspected safely. Re-save it in the zip format with torch>=1.6:\n"
        f"    python -c \"import torch; torch.save(torch.load('{path}', weights_only=True), '{path}')\""
    )


class TorchZipCheckpoint:
    """One ``torch.save`` zip file: its tensor descriptions, and mmap reads of their bytes."""

    def __init__(self, path: str | Path, *, hint: str = "") -> None:
        self.path = Path(path)
        self._hint = hint or "re-download it"
        try:
            self._size = self.path.stat().st_size
        except FileNotFoundError:
            raise CheckpointError(f"checkpoint file {self.path} is missing; {self._hint}") from None
        self._check_directory()
        try:
            zf = zipfile.ZipFile(self.path)
        except zipfile.BadZipFile:
            self._raise_not_zip()
        except _ZIP_ERRORS as exc:
            raise CheckpointError(f"{self.path.name} is a corrupt zip file ({type(exc).__name__}: {str(exc)[:200]}); {self._hint}") from None
        with zf:
            infos = zf.infolist()
            self._members = {info.filename: info for info in infos}
            if len(self._members) != len(infos):
                seen: set[str] = set()
                twice = next(i.filename for i in infos if i.filename in seen or seen.add(i.filename))
                # which copy a reader takes is the reader's choice (torch's and zipfile's differ)
                raise CheckpointError(
                    f"{self.path.name}: the zip holds two members named {twice[:100]!r}; a torch checkpoint "
                    f"names each once, so which one is meant is ambiguous: refused; {self._hint}"
                )
            pkl = [n for n in self._members if n.endswith("/data.pkl") and n.count("/") == 1]
            if len(pkl) != 1:
                raise CheckpointError(
                    f"{self.path.name} is a zip file but not a torch checkpoint (no <archive>/data.pkl); "
                    f"members: {[n[:60] for n in sorted(self._members)[:5]]}"
                )
            self._prefix = pkl[0][: -len("data.pkl")]
            if self._members[pkl[0]].file_size > MAX_PICKLE_BYTES:
                raise CheckpointError(
                    f"{self.path.name}: data.pkl declares {self._members[pkl[0]].file_size} bytes, over the "
                    f"{MAX_PICKLE_BYTES >> 20} MiB any state dict needs; refused (a zip bomb or not a checkpoint)"
                )
            try:
                with zf.open(pkl[0]) as member:  # read at most the cap, whatever the header claims
                    data = member.read(MAX_PICKLE_BYTES + 1)
            except _ZIP_ERRORS as exc:
                raise CheckpointError(f"{self.path.name}: cannot read data.pkl ({type(exc).__name__}: {str(exc)[:200]}); the file is corrupt; {self._hint}") from None
        obj = safe_unpickle(data, where=self.path.name)
        if not isinstance(obj, dict):
            raise CheckpointError(f"{self.path.name} holds a {type(obj).__name__}, not a state dict of tensors")
        self.tensors: dict[str, TensorRef] = {}
        for name, value in obj.items():
            if not isinstance(name, str) or not isinstance(value, TensorRef):
                raise CheckpointError(
                    f"{self.path.name}: entry {_short(name)} is a {type(value).__name__}, not a tensor; "
                    "expected a plain state dict"
                )
            self.tensors[name] = value
        self._data_offsets: dict[str, int] = {}
        self._crc_checked: set[str] = set()
        # Every storage's member, compression and size checked now, before any tensor is used.
        for ref in self.tensors.values():
            self._storage_member(ref.storage)

    def _check_directory(self) -> None:
        """Refuse a zip whose central directory is sized beyond any checkpoint, before zipfile
        builds an object per entry (millions of entries would cost gigabytes)."""
        try:
            with open(self.path, "rb") as f:
                end = zipfile._EndRecData(f)  # the end-of-central-directory record (zip64-aware)
        except (OSError, ValueError, struct.error, EOFError):
            end = None
        if not end:
            return  # not a zip: ZipFile raises BadZipFile, handled by the caller
        entries, size = end[zipfile._ECD_ENTRIES_TOTAL], end[zipfile._ECD_SIZE]
        if entries > MAX_ZIP_MEMBERS or size > MAX_CENTRAL_DIRECTORY_BYTES or size > self._size:
            raise CheckpointError(
                f"{self.path.name}: the zip directory declares {entries} members in {size} bytes; a torch "
                f"checkpoint has one per tensor (limit {MAX_ZIP_MEMBERS}); refused"
            )

    def _raise_not_zip(self) -> None:
        with open(self.path, "rb") as f:
            head = f.read(64)
        if head[:1] == b"\x80":  # a bare pickle stream: torch's legacy format starts with its magic number
            raise CheckpointError(_legacy_hint(self.path))
        if head[:2] == b"PK":
            raise CheckpointError(
                f"{self.path.name} is truncated or corrupt: it starts like a zip file but has no zip "
                f"directory at its end (file size {self._size} bytes); {self._hint}"
            )
        raise CheckpointError(f"{self.path.name} is neither a torch zip checkpoint nor a legacy torch file; {self._hint}")

    def _storage_member(self, storage: StorageRef) -> tuple[int, zipfile.ZipInfo]:
        """Absolute data offset of ``data/<key>`` in the file, after checking it can be mmapped."""
        name = f"{self._prefix}data/{storage.key}"
        info = self._members.get(name)
        if info is None:
            raise CheckpointError(f"{self.path.name}: storage member {name[:100]} is missing; the checkpoint is corrupt; {self._hint}")
        if info.compress_type != zipfile.ZIP_STORED:
            raise CheckpointError(
                f"{self.path.name}: storage {name} is compressed; torch never compresses storages, so this "
                "file was re-zipped. Re-save it with torch.save or re-download it"
            )
        need = storage.numel * numpy_dtype(storage.dtype).itemsize
        if info.file_size != need:  # torch.load refuses any other size ("record size ... does not match")
            raise CheckpointError(f"{self.path.name}: storage {name} has {info.file_size} bytes, its "
                                  f"{storage.numel} {storage.dtype} elements are {need}; corrupt file; {self._hint}")
        offset = self._data_offsets.get(name)
        if offset is None:
            with open(self.path, "rb") as f:
                f.seek(info.header_offset)
                header = f.read(_LOCAL_HEADER.size)
                fields = _LOCAL_HEADER.unpack(header) if len(header) == _LOCAL_HEADER.size else None
                local_name = f.read(fields[9]) if fields else b""
            if fields is None or header[:4] != b"PK\x03\x04" or local_name != info.orig_filename.encode("utf-8", "replace"):
                raise CheckpointError(f"{self.path.name}: bad zip local header for {name}; the file is corrupt; {self._hint}")
            offset = info.header_offset + _LOCAL_HEADER.size + fields[9] + fields[10]
            self._data_offsets[name] = offset
        if offset + info.file_size > self._size:
            raise CheckpointError(
                f"{self.path.name} is truncated: storage {name} ends at byte {offset + info.file_size} "
                f"but the file has {self._size} bytes; {self._hint}"
            )
        return offset, info

    @contextlib.contextmanager
    def open_tensor(self, name: str) -> Iterator[np.ndarray]:
        """The tensor as a read-only numpy view of an mmap of just its bytes (bf16 as uint16).

        The view is valid inside the ``with`` block; on exit its pages are dropped from this
        process (madvise DONTNEED), so reading a whole checkpoint never holds more than the
        tensor being processed. The storage's zip CRC is checked the first time it is read.
        """
        ref = self.tensors[name]
        offset, info = self._storage_member(ref.storage)
        dtype = numpy_dtype(ref.dtype)
        with map_region(self.path, offset, ref.storage.numel * dtype.itemsize) as buf:
            if ref.storage.key not in self._crc_checked:
                self._check_crc(buf, info)
                self._crc_checked.add(ref.storage.key)
            flat = np.frombuffer(buf, dtype=dtype)
            if ref.is_contiguous():
                array = flat[ref.offset : ref.offset + ref.numel].reshape(ref.shape)
            else:
                array = np.lib.stride_tricks.as_strided(
                    flat[ref.offset :], shape=ref.shape, strides=[s * dtype.itemsize for s in ref.stride], writeable=False
                )
            try:
                yield array
            finally:
                del array, flat

    def _check_crc(self, buf: memoryview, info: zipfile.ZipInfo) -> None:
        """The member's CRC-32 over all its bytes (``_storage_member`` made them the storage's)."""
        if len(buf) != info.file_size or zlib.crc32(buf) != info.CRC:
            raise CheckpointError(
                f"{self.path.name}: storage {info.filename} fails its CRC check; the file is corrupt; {self._hint}"
            )


@contextlib.contextmanager
def map_region(path: str | Path, offset: int, nbytes: int) -> Iterator[memoryview]:
    """mmap ``nbytes`` of ``path`` at ``offset`` (any alignment); pages dropped on exit.

    The mapping is unmapped when the last numpy view of it dies; ``MADV_DONTNEED`` on exit
    releases its resident pages at once even if a caller still holds a view.
    """
    if nbytes == 0:
        yield memoryview(b"")
        return
    start = offset - offset % mmap.ALLOCATIONGRANULARITY
    with open(path, "rb") as f:
        mm = mmap.mmap(f.fileno(), nbytes + offset - start, access=mmap.ACCESS_READ, offset=start)
    view = memoryview(mm)[offset - start :]
    try:
        yield view
    finally:
        view.release()
        if hasattr(mmap, "MADV_DONTNEED"):
            try:
                mm.madvise(mmap.MADV_DONTNEED)
            except OSError:
                pass
        try:
            mm.close()
        except BufferError:  # a caller kept a view; the mapping goes when that view does
            pass


def read_state_dict(path: str | Path) -> dict[str, np.ndarray]:
    """Every tensor of a small checkpoint, copied into memory (tests and tools; bf16 as uint16)."""
    ckpt = TorchZipCheckpoint(path)
    out: dict[str, np.ndarray] = {}
    for name in ckpt.tensors:
        with ckpt.open_tensor(name) as array:
            out[name] = np.array(array)
    return out


__all__ = [
    "STORAGE_DTYPES",
    "TensorRef",
    "StorageRef",
    "TorchZipCheckpoint",
    "map_region",
    "numpy_dtype",
    "read_state_dict",
    "safe_unpickle",
]
