"""Writing a jmoss store: group files (``GroupWriter``), then config, tokenizer and the manifest.

Every file goes to ``<name>.tmp`` first and is renamed only after fsync and a read-back check,
so a reader never sees a half-written file under its final name (docs/store-format.md, "How a
store is written").
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import struct
import zlib
from dataclasses import replace
from pathlib import Path
from typing import Any, Iterable, Mapping

import numpy as np

from jmoss import layout
from jmoss.config import MossConfig
from jmoss.errors import StoreError
from jmoss.store_format import (
    DATA_ALIGNMENT,
    FAST_HASH,
    FORMAT_VERSION,
    IO_CHUNK,
    MANIFEST,
    PACKED_FORMAT_VERSION,
    QKV_LAYOUT,
    SAFETENSORS_DTYPES,
    STORE_DTYPE,
    TOKENIZER_FILES,
    bytes_record,
    fast_hash,
    file_record,
    read_small_file,
    sealed_manifest_bytes,
)

Group = layout.Group


def disk_full_error(path: Path, needed: int | None = None) -> StoreError:
    existing = Path(path)
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    free = shutil.disk_usage(existing).free
    need = f" the store needs {needed / 2**30:.2f} GiB more;" if needed else ""
    return StoreError(
        f"disk full while writing {path}:{need} {free / 2**30:.2f} GiB free. Free some space or pass "
        "--out on another disk, then run the same command again: finished files are kept and resumed"
    )


def _header_bytes(tensors: Mapping[str, tuple[tuple[int, ...], str]], group: Group) -> tuple[bytes, dict[str, tuple[int, int]]]:
    """Safetensors header (length prefix included) padded so data starts 64-aligned; and spans.

    ``tensors`` is ``layout.group_tensors``: name -> (shape, numpy dtype name)."""
    packed = any(dtype != "float16" for _, dtype in tensors.values())
    entries: dict[str, Any] = {"__metadata__": {"format": "jmoss", "group": str(group),
                                                "dtype": "packed" if packed else STORE_DTYPE}}
    spans: dict[str, tuple[int, int]] = {}
    begin = 0
    for name, (shape, dtype) in tensors.items():
        nbytes = int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize
        entries[name] = {"dtype": SAFETENSORS_DTYPES[dtype], "shape": list(shape), "data_offsets": [begin, begin + nbytes]}
        spans[name] = (begin, nbytes)
        begin += nbytes
    text = json.dumps(entries, separators=(",", ":")).encode()
    pad = (-(8 + len(text))) % DATA_ALIGNMENT
    text += b" " * pad
    return struct.pack("<Q", len(text)) + text, spans


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write a small file via ``.tmp`` + fsync + rename."""
    tmp = path.with_name(path.name + ".tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as exc:
        if exc.errno == errno.ENOSPC:
            raise disk_full_error(path, len(data)) from None
        raise


class GroupWriter:
    """Writes one group file: header up front, then tensors in row chunks at known offsets.

    Chunks of one tensor must arrive in row order (a CRC of each tensor is kept as it is
    written); tensors may arrive in any order. ``finish`` fsyncs, reads the file back checking
    each tensor's CRC, hashes it, and renames ``.tmp`` to the final name.
    """

    def __init__(self, out: Path, config: MossConfig, group: Group) -> None:
        self.group = group
        self.path = Path(out) / layout.group_file(group)
        self.tmp = self.path.with_name(self.path.name + ".tmp")
        self.tensors = layout.group_tensors(config, group)
        self.shapes = {name: shape for name, (shape, _) in self.tensors.items()}
        header, spans = _header_bytes(self.tensors, group)
        self.data_start = len(header)
        self.spans = {name: (self.data_start + b, n) for name, (b, n) in spans.items()}
        self.size = self.data_start + sum(n for _, n in spans.values())
        self._rows_done = {name: 0 for name in self.shapes}
        self._crc = {name: 0 for name in self.shapes}
        self._fd = os.open(self.tmp, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            if hasattr(os, "posix_fallocate"):
                os.posix_fallocate(self._fd, 0, self.size)  # ENOSPC now rather than mid-tensor
            self._pwrite(header, 0)
        except BaseException as exc:
            self.abort()
            if isinstance(exc, OSError) and exc.errno == errno.ENOSPC:
                raise disk_full_error(self.path, self.size) from None
            raise

    def _pwrite(self, data: bytes | memoryview | np.ndarray, offset: int) -> None:
        view = memoryview(data).cast("B")
        try:
            while len(view):
                n = os.pwrite(self._fd, view, offset)
                view, offset = view[n:], offset + n
        except OSError as exc:
            if exc.errno == errno.ENOSPC:
                raise disk_full_error(self.path, self.size) from None
            raise

    def rows_written(self, name: str) -> int:
        return self._rows_done[name]

    def row_count(self, name: str) -> int:
        shape = self.shapes[name]
        return shape[0] if shape else 1

    def write_rows(self, name: str, row_start: int, rows: np.ndarray) -> None:
        """Write rows ``row_start..`` of tensor ``name`` (its store dtype, trailing dims exact)."""
        shape = self.shapes[name]
        if rows.dtype != np.dtype(self.tensors[name][1]) or rows.shape[1:] != tuple(shape[1:]):
            raise ValueError(f"{name}: chunk {rows.dtype}{rows.shape} does not fit {shape}")
        if row_start != self._rows_done[name]:
            raise ValueError(f"{name}: chunk at row {row_start}, expected {self._rows_done[name]}")
        rows = np.ascontiguousarray(rows)
        row_bytes = rows.itemsize * int(np.prod(shape[1:], dtype=np.int64))
        offset, _ = self.spans[name]
        self._pwrite(rows, offset + row_start * row_bytes)
        self._crc[name] = zlib.crc32(memoryview(rows).cast("B"), self._crc[name])
        self._rows_done[name] = row_start + rows.shape[0]

    def write_tensor(self, name: str, array: np.ndarray) -> None:
        """Write a whole tensor, cast to its store dtype (fp16 unless packed), in bounded chunks."""
        shape = self.shapes[name]
        if tuple(array.shape) != tuple(shape):
            raise ValueError(f"{name}: shape {tuple(array.shape)}, expected {shape}")
        array = array.reshape(shape[0], -1) if len(shape) > 1 else array
        step = max(1, IO_CHUNK // max(1, array[0].nbytes if array.ndim > 1 else 2))
        for start in range(0, shape[0], step):
            chunk = np.ascontiguousarray(array[start : start + step], dtype=self.tensors[name][1])
            self.write_rows(name, start, chunk.reshape((-1, *shape[1:])))

    def missing(self) -> list[str]:
        return [n for n in self.shapes if self._rows_done[n] != self.row_count(n)]

    @property
    def complete(self) -> bool:
        return not self.missing()

    def finish(self) -> dict[str, Any]:
        """fsync, verify against the write-time CRCs, rename into place; return size and hashes."""
        if not self.complete:
            raise ValueError(f"group {self.group!r} is missing {self.missing()}")
        try:
            os.fsync(self._fd)
            sha, fast = hashlib.sha256(), fast_hash()
            buf = bytearray(IO_CHUNK)
            pos = 0
            bounds = sorted((off, off + n, name) for name, (off, n) in self.spans.items())
            crc = {name: 0 for name in self.spans}
            # header first, then each tensor span (contiguous, so this is one sequential pass)
            for start, end, name in [(0, self.data_start, None), *bounds]:
                pos = start
                while pos < end:
                    n = os.preadv(self._fd, [memoryview(buf)[: min(IO_CHUNK, end - pos)]], pos)
                    if n <= 0:
                        raise StoreError(f"{self.tmp} is shorter than written; the disk may be failing")
                    chunk = memoryview(buf)[:n]
                    sha.update(chunk)
                    fast.update(chunk)
                    if name is not None:
                        crc[name] = zlib.crc32(chunk, crc[name])
                    pos += n
            bad = [name for name in self.spans if crc[name] != self._crc[name]]
            if bad:
                raise StoreError(f"{self.tmp}: read-back of {', '.join(bad)} differs from what was written; check the disk")
            if hasattr(os, "posix_fadvise"):
                # the written pages leave the page cache: cached as written they are 4 KiB pages,
                # and a load would map those; read back from disk they come in 2 MiB folios
                # (Store.mapping), which decode reads faster (fewer TLB misses)
                os.posix_fadvise(self._fd, 0, 0, os.POSIX_FADV_DONTNEED)
            os.close(self._fd)
            self._fd = -1
            os.replace(self.tmp, self.path)
            _fsync_dir(self.path.parent)
        except OSError as exc:
            if exc.errno == errno.ENOSPC:
                raise disk_full_error(self.path, self.size) from None
            raise
        return {"size": self.size, "sha256": sha.hexdigest(), FAST_HASH: fast.hexdigest()}

    def abort(self) -> None:
        """Close and delete the temporary file (a failed or abandoned group)."""
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
        self.tmp.unlink(missing_ok=True)



def store_config_dict(config: MossConfig) -> dict[str, Any]:
    """config.json of a store: wbits 4/8 when its layers are packed, else 32 (fp16 weights)."""
    return layout.resolved(replace(config, wbits=layout.packed_bits(config) or 32)).to_dict()


def finalize_store(
    out: Path,
    config: MossConfig,
    group_files: Mapping[Group, Mapping[str, Any]],
    *,
    tokenizer_dir: Path | None = None,
    tokenizer_files: Iterable[Path] = (),
    source: dict | None = None,
) -> Path:
    """Write config.json, tokenizer files and finally the manifest of a store whose group files exist.

    ``group_files`` maps every group to {"size", "sha256"} from ``GroupWriter.finish``.
    """
    out = Path(out)
    files: dict[str, dict[str, Any]] = {}
    config_bytes = (json.dumps(store_config_dict(config), indent=2, sort_keys=True) + "\n").encode()
    atomic_write_bytes(out / "config.json", config_bytes)
    files["config.json"] = bytes_record(config_bytes)
    sources = list(tokenizer_files)
    if tokenizer_dir is not None:
        sources += [Path(tokenizer_dir) / n for n in TOKENIZER_FILES if (Path(tokenizer_dir) / n).is_file()]
    for src in sources:
        data = read_small_file(Path(src), StoreError)  # tokenizer files are a few MB at most
        atomic_write_bytes(out / Path(src).name, data)
        files[Path(src).name] = bytes_record(data)
    groups = {}
    for group in layout.all_groups(config):
        record = group_files[group]
        name = layout.group_file(group)
        if not record.get(FAST_HASH):  # a group kept from a journal written before the fast hash
            record = file_record(out / name)
        files[name] = {"size": int(record["size"]), "sha256": record["sha256"], FAST_HASH: record[FAST_HASH]}
        groups[str(group)] = name
    bits = layout.packed_bits(config)
    manifest = {
        "format": "jmoss-store",
        "format_version": PACKED_FORMAT_VERSION if bits else FORMAT_VERSION,
        "dtype": STORE_DTYPE,
        "model_type": config.model_type,
        "qkv_layout": QKV_LAYOUT,
        "data_alignment": DATA_ALIGNMENT,
        "source": source or {},
        "groups": groups,
        "files": files,
    }
    if bits:  # the layers' Linear weights are packed integers (docs/store-format.md, format 2)
        manifest["packed"] = {"bits": bits, "group_size": config.groupsize, "layout": "rows n, perm|qweight|scales|zeros",
                              "scheme": (source or {}).get("quantization", {}).get("method", "gptq"),
                              **layout.manifest_entry(config)}
    atomic_write_bytes(out / MANIFEST, sealed_manifest_bytes(manifest))
    _fsync_dir(out)
    return out


def write_store_from_groups(
    out: Path,
    config: MossConfig,
    groups: Mapping[Group, Mapping[str, np.ndarray]],
    *,
    tokenizer_dir: Path | None = None,
    source: dict | None = None,
) -> Path:
    """Write a complete store from in-memory arrays (cast to fp16); same format and atomicity."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / MANIFEST).unlink(missing_ok=True)  # an overwritten store is incomplete until the end
    records = {}
    for group in layout.all_groups(config):
        writer = GroupWriter(out, config, group)
        try:
            for name in writer.shapes:
                if name not in groups[group]:
                    raise StoreError(f"group {group!r} lacks tensor {name}")
                writer.write_tensor(name, np.asarray(groups[group][name]))
            records[group] = writer.finish()
        except BaseException:
            writer.abort()
            raise
    return finalize_store(out, config, records, tokenizer_dir=tokenizer_dir, source=source or {"id": "in-memory"})

