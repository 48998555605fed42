"""The store format's constants, its hashes and its bounded readers, shared by the store's reader
(``jmoss.store``), writer (``jmoss.store_write``), checker (``jmoss.store_check``) and the converters.

The format itself is documented in docs/store-format.md; what a store must satisfy to be used is
in ``jmoss.store_check``.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import struct
from pathlib import Path
from typing import Any, Mapping

import xxhash

from jmoss.config import parse_json_bytes
from jmoss.errors import StoreError

FORMAT_VERSION = 1  # what an all-fp16 store is written as (unchanged since version 1)
PACKED_FORMAT_VERSION = 2  # stores with packed int8/int4 layers (docs/store-format.md "Packed layers")
READABLE_VERSIONS = (FORMAT_VERSION, PACKED_FORMAT_VERSION)
SAFETENSORS_DTYPES = {"float16": "F16", "uint8": "U8", "int32": "I32"}
NUMPY_DTYPES = {v: k for k, v in SAFETENSORS_DTYPES.items()}
MANIFEST = "jmoss.json"
JOURNAL = ".jmoss-progress.json"  # the converter's resume journal; present only mid-conversion
STORE_DTYPE = "float16"
DATA_ALIGNMENT = 64
QKV_LAYOUT = "q|k|v heads"  # see layout.qkv_row_order
TOKENIZER_FILES = (
    "vocab.json",
    "merges.txt",
    "added_tokens.json",
    "special_tokens_map.json",
    "tokenizer_config.json",
    "tokenizer.json",
)
IO_CHUNK = 16 << 20
# The fast per-file hash checked the first time a file is read (xxh3 runs at ~20 GB/s, sha256 at
# ~1.7 GB/s): sha256 stays for `jmoss verify`, which a user runs on purpose.
FAST_HASH = "xxh3_128"
MAX_HEADER_BYTES = 100 << 20  # what the safetensors library itself allows
# JSON values a safetensors header may hold, counted as its bytes ',', '[' and '{' before it is
# parsed (a tensor entry has 8): 2^20 bounds what json.loads allocates to ~150 MB, where a 95 MiB
# header of 1.7M one-element tensors cost ~1.5 GB. A MOSS/CodeGen file holds at most a few thousand.
MAX_HEADER_VALUES = 1 << 20
MAX_MANIFEST_BYTES = 16 << 20
MAX_SMALL_FILE_BYTES = 256 << 20  # config and tokenizer files are read whole
# safetensors dtype -> bytes per element
SAFETENSORS_ITEMSIZE = {
    "F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1,
    "U64": 8, "U32": 4, "U16": 2, "U8": 1, "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1,
}


def sha256_file(path: Path, progress: Any = None) -> str:
    sha = hashlib.sha256()
    buf = bytearray(IO_CHUNK)
    with open(path, "rb", buffering=0) as f:
        while n := f.readinto(buf):
            sha.update(memoryview(buf)[:n])
            if progress is not None:
                progress.update(n)
    return sha.hexdigest()


def fast_hash() -> "xxhash.xxh3_128":
    """A new incremental fast hash (see FAST_HASH)."""
    return xxhash.xxh3_128()


def fast_hash_bytes(data: bytes | memoryview) -> str:
    return xxhash.xxh3_128_hexdigest(data)


_HASH_CHUNK = 1 << 20  # small enough that each chunk is hashed while still in the CPU cache


def fast_hash_file(path: Path) -> str:
    h = fast_hash()
    buf = bytearray(_HASH_CHUNK)
    with open(path, "rb", buffering=0) as f:
        while n := f.readinto(buf):
            h.update(memoryview(buf)[:n])
    return h.hexdigest()


def file_hashes(path: Path, progress: Any = None) -> tuple[str, str]:
    """(sha256, fast hash) of a file, in one read (``progress.update(n)`` per chunk when given)."""
    sha, fast = hashlib.sha256(), fast_hash()
    with open(path, "rb", buffering=0) as f:
        # a buffer no bigger than the file: config and tokenizer files are a few KB, not 16 MiB
        buf = bytearray(min(IO_CHUNK, os.fstat(f.fileno()).st_size + 1))
        while n := f.readinto(buf):
            chunk = memoryview(buf)[:n]
            sha.update(chunk)
            fast.update(chunk)
            if progress is not None:
                progress.update(n)
    return sha.hexdigest(), fast.hexdigest()


def file_record(path: Path) -> dict[str, Any]:
    """{"size", "sha256", FAST_HASH} of a file, in one read."""
    sha, fast = file_hashes(path)
    return {"size": Path(path).stat().st_size, "sha256": sha, FAST_HASH: fast}


def bytes_record(data: bytes) -> dict[str, Any]:
    return {"size": len(data), "sha256": hashlib.sha256(data).hexdigest(), FAST_HASH: fast_hash_bytes(data)}



def sealed_manifest_bytes(manifest: Mapping[str, Any]) -> bytes:
    """The manifest as written: its canonical JSON plus a fast hash of that JSON without it."""
    body = {k: v for k, v in manifest.items() if k != "checksum"}
    seal = fast_hash_bytes(json.dumps(body, indent=2).encode())
    return (json.dumps({**body, "checksum": {FAST_HASH: seal}}, indent=2) + "\n").encode()



def read_small_file(path: Path, error: type[Exception] = StoreError, limit: int = MAX_SMALL_FILE_BYTES) -> bytes:
    """The bytes of a config/tokenizer/manifest file, refusing one too big to be real."""
    chunks, total = [], 0
    try:
        with open(path, "rb") as f:  # in 1 MiB reads: f.read(limit + 1) would allocate the limit up front
            while total <= limit:
                chunk = f.read(min(1 << 20, limit + 1 - total))
                if not chunk:
                    break
                chunks.append(chunk)
                total += len(chunk)
    except OSError as exc:
        raise error(f"cannot read {path}: {exc.strerror or exc}") from None
    if total > limit:
        raise error(f"{path} is over {limit >> 20} MiB, far more than such a file holds; refused")
    return b"".join(chunks)


def inside(root: Path, file: Path) -> bool:
    """Whether ``file``, symlinks resolved, stays inside ``root`` (also resolved)."""
    try:
        return Path(file).resolve().is_relative_to(Path(root).resolve())
    except (OSError, RuntimeError):  # a symlink loop
        return False


_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,200}")


def safe_name(name: Any) -> bool:
    """A plain file name of a store: no separators, no '..', nothing hidden."""
    return isinstance(name, str) and _NAME.fullmatch(name) is not None and ".." not in name


def parse_safetensors_header(
    path: Path, error: type[Exception] = StoreError, hint: str = ""
) -> tuple[int, dict[str, tuple[str, tuple[int, ...], int, int]], dict[str, str]]:
    """(data start, {name: (dtype, shape, begin, end)} in file order, metadata) of a safetensors file.

    Checks everything the safetensors library checks, before anything is sized by it: header
    length within the file and at most 100 MiB, at most MAX_HEADER_VALUES JSON values (counted
    before parsing, so a huge header cannot make the parser allocate gigabytes), a UTF-8 JSON object without duplicate keys,
    string dtypes it knows, shapes of non-negative ints, ``data_offsets`` pairs whose byte count
    matches dtype x shape, and spans that tile the data from byte 0 to the end of the file with
    no gap and no overlap.
    """
    tail = f"; {hint}" if hint else ""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            raw = f.read(8)
            if len(raw) < 8:
                raise error(f"{path} is truncated ({size} bytes, no safetensors header){tail}")
            (n,) = struct.unpack("<Q", raw)
            if n > MAX_HEADER_BYTES or 8 + n > size:
                raise error(f"{path}: safetensors header length {n} does not fit the file ({size} bytes); the file is corrupt or truncated{tail}")
            text = f.read(n)
    except OSError as exc:
        raise error(f"cannot read {path}: {exc.strerror or exc}{tail}") from None
    if len(text) < n:
        raise error(f"{path} is truncated (header cut short){tail}")
    values = text.count(b",") + text.count(b"[") + text.count(b"{")
    if values > MAX_HEADER_VALUES:
        raise error(f"{path}: the safetensors header holds about {values} JSON values, more than any model file "
                    f"(limit {MAX_HEADER_VALUES}); refused before parsing it{tail}")
    header = parse_json_bytes(text, f"{path} (safetensors header)", error)
    del text
    if not isinstance(header, dict):
        raise error(f"{path}: the safetensors header is a JSON {type(header).__name__}, not an object; corrupt file{tail}")
    metadata = header.pop("__metadata__", {})
    if not isinstance(metadata, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()):
        raise error(f"{path}: safetensors __metadata__ must map strings to strings; corrupt file{tail}")
    start, data_bytes = 8 + n, size - 8 - n
    entries: dict[str, tuple[str, tuple[int, ...], int, int]] = {}
    for name, entry in header.items():
        what = f"{path}: tensor {name[:100]!r}"
        if not isinstance(entry, dict) or not {"dtype", "shape", "data_offsets"} <= set(entry):
            raise error(f"{what} needs dtype, shape and data_offsets; corrupt header{tail}")
        dtype, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
        if not isinstance(dtype, str) or dtype not in SAFETENSORS_ITEMSIZE:
            raise error(f"{what} has dtype {str(dtype)[:40]!r}, which is not a safetensors dtype jmoss reads{tail}")
        if not isinstance(shape, list) or len(shape) > 16 or not all(_nonneg_int(d) for d in shape):
            raise error(f"{what} has shape {str(shape)[:80]}, not a list of non-negative integers{tail}")
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(_nonneg_int(o) for o in offsets)) or offsets[0] > offsets[1]:
            raise error(f"{what} has data_offsets {str(offsets)[:80]}, not [begin, end] with 0 <= begin <= end{tail}")
        nbytes = SAFETENSORS_ITEMSIZE[dtype]
        for d in shape:
            nbytes *= d
        if offsets[1] - offsets[0] != nbytes:
            raise error(f"{what}: shape {shape} of {dtype} needs {nbytes} bytes, data_offsets span {offsets[1] - offsets[0]}; corrupt header{tail}")
        entries[name] = (dtype, tuple(shape), offsets[0], offsets[1])
    ordered = dict(sorted(entries.items(), key=lambda kv: (kv[1][2], kv[1][3])))
    pos = 0
    for name, (_, _, begin, end) in ordered.items():
        if begin != pos:
            kind = "overlaps the tensor before it" if begin < pos else f"leaves a gap of {begin - pos} bytes before it"
            raise error(f"{path}: tensor {name[:100]!r} at data_offsets [{begin}, {end}] {kind}; corrupt header{tail}")
        pos = end
    if pos > data_bytes:
        raise error(f"{path} is truncated (expected at least {start + pos} bytes, found {size}){tail}")
    if pos != data_bytes:
        raise error(f"{path}: the header's tensors span {pos} bytes of data but the file holds {data_bytes}; the file is corrupt{tail}")
    return start, ordered, metadata


def _nonneg_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value < 1 << 62


def read_safetensors_header(path: Path) -> tuple[int, dict[str, Any]]:
    """(data start offset, header dict) of a safetensors file, checked (see parse_safetensors_header)."""
    start, entries, metadata = parse_safetensors_header(path)
    header: dict[str, Any] = {"__metadata__": metadata}
    for name, (dtype, shape, begin, end) in entries.items():
        header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [begin, end]}
    return start, header

