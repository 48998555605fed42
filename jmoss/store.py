"""The jmoss store: a converted model on disk, and how to write, open and verify one.

A store is a directory (format described in docs/store-format.md):

    jmoss.json              manifest, written LAST: its presence means the store is complete
    config.json             MossConfig.to_dict() (wbits 32: fp16 layers; 4/8: packed layers, format 2)
    vocab.json, merges.txt, ...   tokenizer files copied from the source, when it has them
    embed.safetensors       wte.weight
    layer_000.safetensors   one transformer layer: 8 tensors, one contiguous span of data
    ...
    head.safetensors        ln_f.*, lm_head.*

Group files are standard safetensors, fp16, tensors in ``layout.group_shapes`` order with no
gaps, and the JSON header padded with spaces so the data starts at a 64-byte boundary: a
layer's weights are one contiguous, aligned read, and every tensor can be memory-mapped.
Every file goes to ``<name>.tmp`` first and is renamed only after fsync and a read-back check,
so a reader never sees a half-written file under its final name.
"""

from __future__ import annotations

import errno
import hashlib
import json
import mmap
import os
import re
import shlex
import shutil
import struct
import threading
import zlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path
from typing import Any, Iterable, Mapping

import numpy as np
import xxhash

from jmoss import layout
from jmoss.config import MossConfig, parse_json_bytes
from jmoss.errors import ConfigError, ModelNotFoundError, StoreError
from jmoss.home import jmoss_home

FORMAT_VERSION = 1  # what an all-fp16 store is written as (unchanged since version 1)
PACKED_FORMAT_VERSION = 2  # stores with packed int8/int4 layers (docs/store-format.md "Packed layers")
READABLE_VERSIONS = (FORMAT_VERSION, PACKED_FORMAT_VERSION)
SAFETENSORS_DTYPES = {"float16": "F16", "uint8": "U8", "int32": "I32"}
_NUMPY_DTYPES = {v: k for k, v in SAFETENSORS_DTYPES.items()}
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
_CHUNK = 16 << 20
# The fast per-file hash checked the first time a file is read (xxh3 runs at ~20 GB/s, sha256 at
# ~1.7 GB/s): sha256 stays for `jmoss verify`, which a user runs on purpose.
FAST_HASH = "xxh3_128"
MAX_HEADER_BYTES = 100 << 20  # what the safetensors library itself allows
MAX_MANIFEST_BYTES = 16 << 20
MAX_SMALL_FILE_BYTES = 256 << 20  # config and tokenizer files are read whole
# safetensors dtype -> bytes per element
SAFETENSORS_ITEMSIZE = {
    "F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1,
    "U64": 8, "U32": 4, "U16": 2, "U8": 1, "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1,
}

Group = layout.Group


# ----------------------------------------------------------------------------------- names


def default_store_dir(repo_id: str) -> Path:
    """``<jmoss home>/models/<org>--<name>`` for a Hugging Face repo id."""
    parts = repo_id.strip("/").split("/")
    if not 1 <= len(parts) <= 2 or not all(re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", p) for p in parts):
        raise ModelNotFoundError(f"{repo_id!r} is not a Hugging Face repo id (expected 'org/name') nor an existing path")
    return jmoss_home() / "models" / "--".join(parts)


def default_store_dir_for_local(path: str | Path) -> Path:
    """Store dir for a local checkpoint directory: named after it, plus a hash of its full path."""
    path = Path(path).expanduser().resolve()
    tag = hashlib.sha1(str(path).encode()).hexdigest()[:8]
    name = re.sub(r"[^A-Za-z0-9._-]", "_", path.name) or "model"
    return jmoss_home() / "models" / f"local--{name}-{tag}"


def _looks_like_store(path: Path) -> bool:
    """A folder jmoss wrote into (finished or not): a store's own files, not a checkpoint's."""
    return any((path / name).exists() for name in (MANIFEST, JOURNAL, "embed.safetensors", "head.safetensors", layout.layer_file(0)))


def _is_checkpoint_dir(path: Path) -> bool:
    return (path / "config.json").is_file() and not _looks_like_store(path) and any(
        path.glob(pattern) for pattern in ("*.safetensors", "pytorch_model*.bin", "*.index.json")
    )


def _same_path(a: str | Path, b: str | Path) -> bool:
    return Path(a).expanduser().resolve() == Path(b).expanduser().resolve()


def _recorded_source(path: Path, manifest: Mapping[str, Any] | None = None) -> Mapping[str, Any] | None:
    """The source a store was converted from: its manifest's record, else its resume journal's."""
    if manifest is not None and isinstance(manifest.get("source"), dict) and manifest["source"].get("id"):
        return manifest["source"]
    try:
        journal = json.loads((path / JOURNAL).read_text(encoding="utf-8"))
        source = journal["identity"]["source"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return source if isinstance(source, dict) and source.get("id") else None


def repair_command(path: str | Path, manifest: Mapping[str, Any] | None = None) -> str:
    """The `jmoss convert` command that finishes or repairs the store at ``path``.

    ``--out`` is added only when ``path`` is not where that source converts by default, so the
    command never writes into the source folder or anywhere else than this store. Without a
    recorded source, a store at the default place of a Hub repo still names the repo; otherwise
    the command says SOURCE.
    """
    path = Path(path).expanduser()
    source = _recorded_source(path, manifest)
    if source is None:
        models = jmoss_home() / "models"
        if _same_path(path.parent, models) and "--" in path.name and not path.name.startswith("local--"):
            repo = path.name.replace("--", "/", 1)
            return f"jmoss convert {repo}"
        return f"jmoss convert SOURCE --out {shlex.quote(str(path))}"
    source_id = str(source["id"])
    hub = not Path(source_id).is_absolute()
    try:
        default = default_store_dir(source_id) if hub else default_store_dir_for_local(source_id)
    except ModelNotFoundError:
        default = None
    command = f"jmoss convert {shlex.quote(source_id)}"
    revision = source.get("revision")
    if hub and isinstance(revision, str) and re.fullmatch(r"[0-9a-f]{40}", revision):
        command += f" --revision {revision}"  # the exact commit: the branch may have moved since
    if default is None or not _same_path(default, path):
        command += f" --out {shlex.quote(str(path))}"
    return command


def repair_hint(path: str | Path, manifest: Mapping[str, Any] | None = None, purpose: str = "to repair it") -> str:
    """"run `jmoss convert ...` to repair it", explaining SOURCE when the store does not record it."""
    command = repair_command(path, manifest)
    hint = f"run `{command}` {purpose}"
    if command.startswith("jmoss convert SOURCE "):
        hint += " (SOURCE: the Hugging Face repo id or checkpoint folder it was converted from)"
    return hint


def _not_finished(path: Path) -> ModelNotFoundError:
    if (path / JOURNAL).exists():
        why = "a conversion into it was interrupted"
    else:
        why = "it has no jmoss.json manifest"
    return ModelNotFoundError(
        f"{path} exists but is not a finished jmoss store ({why}); {repair_hint(path, purpose='to finish it')}"
    )


def resolve_model(name_or_path: str) -> Path:
    """The store directory for a store path, a converted local checkpoint, or a converted repo id."""
    path = Path(name_or_path).expanduser()
    if path.exists():
        if not path.is_dir():
            raise ModelNotFoundError(
                f"{path} is a file; a jmoss store is the folder `jmoss convert SOURCE` writes (SOURCE: a "
                "Hugging Face repo id or a checkpoint folder)"
            )
        if (path / MANIFEST).is_file():
            return path
        if _is_checkpoint_dir(path):
            converted = default_store_dir_for_local(path)
            if (converted / MANIFEST).is_file():
                return converted
            if converted.exists():
                raise _not_finished(converted)
            raise ModelNotFoundError(
                f"{path} is a Hugging Face checkpoint, not a jmoss store; convert it first: "
                f"`jmoss convert {name_or_path}` (writes {converted})"
            )
        if _looks_like_store(path):
            raise _not_finished(path)
        raise ModelNotFoundError(
            f"{path} is neither a jmoss store nor a Hugging Face checkpoint folder (no jmoss.json, no "
            "config.json with weights); give a store, or convert a checkpoint with `jmoss convert SOURCE`"
        )
    store = default_store_dir(name_or_path)
    if (store / MANIFEST).is_file():
        return store
    if store.exists():
        raise _not_finished(store)
    raise ModelNotFoundError(
        f"model {name_or_path!r} has not been converted yet; run `jmoss convert {name_or_path}` "
        f"(downloads it from Hugging Face and writes {store})"
    )


def _group_key(group: Group | str) -> Group:
    if isinstance(group, str) and group.isdigit():
        return int(group)
    return group


# ----------------------------------------------------------------------------------- writing


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
        step = max(1, _CHUNK // max(1, array[0].nbytes if array.ndim > 1 else 2))
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
            buf = bytearray(_CHUNK)
            pos = 0
            bounds = sorted((off, off + n, name) for name, (off, n) in self.spans.items())
            crc = {name: 0 for name in self.spans}
            # header first, then each tensor span (contiguous, so this is one sequential pass)
            for start, end, name in [(0, self.data_start, None), *bounds]:
                pos = start
                while pos < end:
                    n = os.preadv(self._fd, [memoryview(buf)[: min(_CHUNK, end - pos)]], pos)
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


def sha256_file(path: Path, progress: Any = None) -> str:
    sha = hashlib.sha256()
    buf = bytearray(_CHUNK)
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


def fast_hash_mapping(mm: mmap.mmap) -> str:
    """The fast hash of a whole mapped file, computed on the mapped pages (GIL released throughout)."""
    h = fast_hash()
    with memoryview(mm) as view:
        h.update(view)
    return h.hexdigest()


def file_identity(st: os.stat_result) -> tuple[int, int, int, int, int]:
    """(device, inode, size, mtime ns, ctime ns): every write to a file changes its ctime, and
    nothing but the kernel sets ctime, so an unchanged identity means an unwritten file."""
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


def _advise(mm: mmap.mmap, advice: int | None) -> None:
    if advice is not None and hasattr(mm, "madvise"):
        try:
            mm.madvise(advice)
        except OSError:  # advice only: a kernel that refuses it still maps and reads the file
            pass


# Group files mapped and hashed at once by Store.map_groups: xxh3 runs at ~7 GB/s per core, so
# two threads per core keep every core hashing while others wait on a cold disk.
MAP_WORKERS = max(2, 2 * (len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)))


def file_record(path: Path) -> dict[str, Any]:
    """{"size", "sha256", FAST_HASH} of a file, in one read."""
    sha, fast, size = hashlib.sha256(), fast_hash(), 0
    buf = bytearray(_CHUNK)
    with open(path, "rb", buffering=0) as f:
        while n := f.readinto(buf):
            chunk = memoryview(buf)[:n]
            sha.update(chunk)
            fast.update(chunk)
            size += n
    return {"size": size, "sha256": sha.hexdigest(), FAST_HASH: fast.hexdigest()}


def _bytes_record(data: bytes) -> dict[str, Any]:
    return {"size": len(data), "sha256": hashlib.sha256(data).hexdigest(), FAST_HASH: fast_hash_bytes(data)}


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
    files["config.json"] = _bytes_record(config_bytes)
    sources = list(tokenizer_files)
    if tokenizer_dir is not None:
        sources += [Path(tokenizer_dir) / n for n in TOKENIZER_FILES if (Path(tokenizer_dir) / n).is_file()]
    for src in sources:
        data = read_small_file(Path(src), StoreError)  # tokenizer files are a few MB at most
        atomic_write_bytes(out / Path(src).name, data)
        files[Path(src).name] = _bytes_record(data)
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
    atomic_write_bytes(out / MANIFEST, _sealed_manifest_bytes(manifest))
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


# ----------------------------------------------------------------------------------- reading


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
    length within the file and at most 100 MiB, a UTF-8 JSON object without duplicate keys,
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
    header = parse_json_bytes(text, f"{path} (safetensors header)", error)
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


def expected_files(path: Path, config: MossConfig) -> tuple[set[str], set[str]]:
    """(files a store of ``config`` must list, files it may list): groups and config are required;
    a tokenizer file is required when it is in the folder (a manifest may not drop it)."""
    required = {layout.group_file(g) for g in layout.all_groups(config)} | {"config.json"}
    required |= {n for n in TOKENIZER_FILES if os.path.lexists(path / n)}
    return required, required | set(TOKENIZER_FILES)


class Store:
    """An opened, complete jmoss store. Group arrays are read-only views of the files' mapped
    pages (``mapping``: no copy; the page cache is the one copy).

    Every file is checked against the manifest's fast hash the first time it is read: config,
    tokenizer and manifest at ``open``, a group file when it is mapped (``group()``,
    ``map_groups``) or, for the engines that read spans themselves, as they read it
    (``span_hasher``/``check_group_span``). Stores written before the fast hash existed have no
    such record: their small files are checked by sha256 at open, their group files only by
    `jmoss verify`. What this guarantees, and what not: docs/store-format.md.
    """

    def __init__(self, path: Path, config: MossConfig, manifest: dict) -> None:
        self.path = path
        self.config = config
        self.manifest = manifest
        self._offsets: dict[Group, dict[str, tuple[int, tuple[int, ...], str]]] = {}
        self._data_start: dict[Group, int] = {}
        self._verified: set[str] = set()
        self._lock = threading.Lock()
        self._maps: dict[Group, tuple[Any, mmap.mmap]] = {}  # group -> (open file, read-only mapping)
        self._identity: dict[str, tuple[int, ...]] = {}  # mapped file -> its file_identity when checked

    @classmethod
    def open(cls, path: str | Path) -> "Store":
        """Open a finished store; raises ModelNotFoundError / StoreError saying what to do."""
        path = Path(path).expanduser()
        if path.is_file():
            raise ModelNotFoundError(f"{path} is a file; a jmoss store is the folder `jmoss convert SOURCE` writes")
        if not path.is_dir():
            raise ModelNotFoundError(
                f"no jmoss store at {path}; convert a model with `jmoss convert SOURCE --out {shlex.quote(str(path))}` "
                "(SOURCE: a Hugging Face repo id or a checkpoint folder)"
            )
        manifest = read_manifest(path)
        problems = check_files(path, manifest, hashes=False)
        if problems:
            raise _damaged(path, manifest, problems)
        # The small files are read whole now: check them by hash before parsing or copying them.
        small = [n for n in manifest["files"] if n == "config.json" or n in TOKENIZER_FILES]
        for name in small:
            data = read_small_file(path / name)
            problem = _hash_problem(manifest["files"][name], data)
            if problem:
                problems[name] = problem
        if problems:
            raise _damaged(path, manifest, problems)
        if "config.json" not in manifest["files"]:
            raise _damaged(path, manifest, {"config.json": "not in the manifest"})
        config = store_config(path, manifest, MossConfig.from_json_file(path / "config.json"))
        problems = _file_set_problems(path, manifest, config)
        if problems:
            raise _damaged(path, manifest, problems)
        store = cls(path, config, manifest)
        store._verified.update(small)
        return store

    @property
    def fast_hashed(self) -> bool:
        """Whether the manifest records fast hashes (stores converted before them do not)."""
        return all(isinstance(r.get(FAST_HASH), str) for r in self.manifest["files"].values())

    def groups(self) -> list[Group]:
        return layout.all_groups(self.config)

    def group_path(self, group: Group) -> Path:
        return self.path / layout.group_file(_group_key(group))

    def _mismatch(self, name: str) -> StoreError:
        return StoreError(
            f"store {self.path} is damaged: {name} does not match the hash its manifest records "
            f"(the file changed or the disk corrupted it), so it was not used; "
            f"{repair_hint(self.path, self.manifest)} (only the damaged files are rewritten)"
        )

    def check_group_span(self, group: Group, data: memoryview | np.ndarray) -> None:
        """Check a group file whose data span the caller read into ``data`` (before using it).

        Header bytes are re-read (a few KB) and hashed with ``data``: together they are the whole
        file, whose size ``open`` checked. A no-op once the file passed, and for old stores.
        """
        h = self.span_hasher(group)
        if h is None:
            return
        view = memoryview(data).cast("B")
        if len(view) != self.group_data_span(group)[1]:
            raise ValueError(f"check_group_span: {len(view)} bytes given, the span has {self.group_data_span(group)[1]}")
        h.update(view)
        self.finish_span_check(group, h)

    def span_hasher(self, group: Group) -> Any:
        """A fast hasher already fed the group file's header, for a reader to feed the data span
        to as it reads it (hashing each chunk while it is in the CPU cache); None when the file
        was checked already or the manifest records no fast hash. Finish with finish_span_check."""
        group = _group_key(group)
        name = layout.group_file(group)
        record = self.manifest["files"].get(name, {})
        if name in self._verified or not isinstance(record.get(FAST_HASH), str):
            return None
        start, _ = self.group_data_span(group)
        h = fast_hash()
        with open(self.group_path(group), "rb") as f:
            h.update(f.read(start))
        return h

    def finish_span_check(self, group: Group, hasher: Any) -> None:
        """Compare a span_hasher fed the whole data span; raise naming the file on a mismatch."""
        name = layout.group_file(_group_key(group))
        if hasher.hexdigest() != self.manifest["files"][name][FAST_HASH]:
            raise self._mismatch(name)
        with self._lock:
            self._verified.add(name)

    def mapping(self, group: Group) -> mmap.mmap:
        """The whole group file mapped read-only (``PROT_READ``, ``MAP_SHARED``), checked first.

        The pages are the page cache's own: nothing is copied, a second process (or a second start)
        maps the same pages, and a write through the mapping is impossible (it would fault). On the
        first mapping the fast hash is computed over the mapped bytes themselves, header included,
        so the bytes checked are the bytes the model reads; the file's identity (device, inode,
        size, mtime, ctime) is taken before and after, and a write in between is a mismatch too.
        ``MADV_WILLNEED`` first asks the kernel to read the whole file ahead of the hash (a cold
        cache is read in large requests, not page fault by page fault). The descriptor stays open
        so ``changed_files`` can tell later whether the mapped file was written since.
        """
        group = _group_key(group)
        with self._lock:
            if group in self._maps:
                return self._maps[group][1]
        name = layout.group_file(group)
        record = self.manifest["files"][name]
        file = open(self.group_path(group), "rb", buffering=0)  # closed with the Store (garbage collected)
        try:
            before = os.fstat(file.fileno())
            if before.st_size != record["size"]:
                raise self._mismatch(name)
            mm = mmap.mmap(file.fileno(), before.st_size, flags=mmap.MAP_SHARED, prot=mmap.PROT_READ)
            if isinstance(record.get(FAST_HASH), str):
                _advise(mm, getattr(mmap, "MADV_WILLNEED", None))
                digest = fast_hash_mapping(mm)
                if digest != record[FAST_HASH] or file_identity(os.fstat(file.fileno())) != file_identity(before):
                    mm.close()
                    raise self._mismatch(name)
        except BaseException:
            file.close()
            raise
        with self._lock:
            if group in self._maps:  # another thread mapped it meanwhile: keep one
                mm.close()
                file.close()
                return self._maps[group][1]
            self._maps[group] = (file, mm)
            self._identity[name] = file_identity(before)
            if isinstance(record.get(FAST_HASH), str):
                self._verified.add(name)
        return mm

    def map_groups(self, groups: Iterable[Group], workers: int | None = None) -> dict[Group, dict[str, np.ndarray]]:
        """``group(g)`` for each of ``groups``, ``workers`` files mapped and checked at once.

        xxhash releases the GIL, so the hashes run on every core, and on a cold cache several
        files are read from the disk at once (each asked for whole). The first damaged file
        stops the rest and is raised. Default workers: ``MAP_WORKERS``.
        """
        groups = [_group_key(g) for g in groups]
        for g in groups:
            self.tensor_offsets(g)  # headers parsed (and refused) before any data is read
        pool = ThreadPoolExecutor(max(1, workers or MAP_WORKERS), thread_name_prefix="jmoss-map")
        try:
            for future in [pool.submit(self.mapping, g) for g in groups]:
                future.result()
        except BaseException:
            pool.shutdown(wait=True, cancel_futures=True)
            raise
        pool.shutdown(wait=True)
        return {g: self.group(g) for g in groups}

    def changed_files(self) -> list[str]:
        """Mapped group files written since their bytes were checked (their identity differs).

        Strict: a file replaced by rename is among them too (unlinking the mapped inode changes
        its ctime), although the mapping keeps the old, checked bytes; `jmoss convert` replaces
        only files that no longer match, so that happens only to a store already damaged."""
        with self._lock:
            mapped = [(layout.group_file(g), file) for g, (file, _) in self._maps.items()]
        return [name for name, file in mapped if file_identity(os.fstat(file.fileno())) != self._identity[name]]

    def check_unchanged(self) -> None:
        """Raise StoreError when a mapped group file was written since it was checked (see
        ``changed_files``): its pages, which the model reads in place, may no longer be the checked bytes."""
        changed = self.changed_files()
        if changed:
            raise StoreError(
                f"store {self.path}: {', '.join(changed)} changed on disk after jmoss checked and mapped "
                f"{'it' if len(changed) == 1 else 'them'}, so the weights in use may no longer be the ones the manifest "
                f"records; nothing more is computed with them. Load the model again (the files are re-checked), "
                f"or {repair_hint(self.path, self.manifest)}"
            )

    def tensor_offsets(self, group: Group) -> dict[str, tuple[int, tuple[int, ...], str]]:
        """name -> (absolute byte offset, shape, numpy dtype str), in file order."""
        group = _group_key(group)
        if group not in self._offsets:
            path = self.group_path(group)
            hint = repair_hint(self.path, self.manifest)
            start, entries, _ = parse_safetensors_header(path, StoreError, hint)
            tensors = layout.group_tensors(self.config, group)
            expected = {name: shape for name, (shape, _) in tensors.items()}
            offsets: dict[str, tuple[int, tuple[int, ...], str]] = {}
            for name, (dtype, shape, begin, _end) in entries.items():
                numpy_dtype = _NUMPY_DTYPES.get(dtype)
                want = tensors[name][1] if name in tensors else "float16"
                if numpy_dtype != want:
                    raise StoreError(f"{path}: tensor {name[:100]} is {dtype}, this store's format says "
                                     f"{SAFETENSORS_DTYPES[want]}; {hint}")
                offsets[name] = (start + begin, shape, numpy_dtype)
            if list(offsets) != list(expected) or any(offsets[n][1] != expected[n] for n in expected):
                raise StoreError(
                    f"{path} does not hold the tensors config.json describes for group {group!r} "
                    f"(found {[(n[:100], o[1]) for n, o in list(offsets.items())[:20]]}); {hint}"
                )
            self._offsets[group] = offsets
            self._data_start[group] = start
        return self._offsets[group]

    def group_data_span(self, group: Group) -> tuple[int, int]:
        """(absolute offset, nbytes) of the group's tensor data: one contiguous read."""
        group = _group_key(group)
        self.tensor_offsets(group)
        return self._data_start[group], self.group_nbytes(group)

    def group_nbytes(self, group: Group) -> int:
        return layout.group_nbytes(self.config, _group_key(group))

    def group(self, group: Group) -> dict[str, np.ndarray]:
        """Read-only arrays of one group (fp16; packed parts uint8/int32): views of the file's
        mapped pages (``mapping``), no copy. The file is hashed first (once per Store), so no byte
        of a tampered file is used. The arrays are plain ndarrays (jittor can wrap them as Vars
        without a copy); they keep the mapping alive."""
        group = _group_key(group)
        mm = self.mapping(group)
        offsets = self.tensor_offsets(group)
        out = {}
        for name, (offset, shape, dtype) in offsets.items():
            count = int(np.prod(shape, dtype=np.int64))
            out[name] = np.frombuffer(mm, dtype=dtype, count=count, offset=offset).reshape(shape)
        return out


def store_config(path: Path, manifest: Mapping[str, Any], config: MossConfig) -> MossConfig:
    """The config a store's files follow: a format-2 store written before lm_head/wte could be
    packed (no ``packed.lm_head`` in its manifest) has them fp16; otherwise the manifest's record of
    them must agree with config.json."""
    packed = manifest.get("packed")
    if not layout.packed_bits(config) or not isinstance(packed, dict):
        return config
    if "lm_head" not in packed and config.head_wbits is None and config.embed_wbits is None:
        return layout.resolved(config, keep_head_fp16=True)
    recorded = {k: packed.get(k) for k in ("lm_head", "wte")}
    if recorded != layout.manifest_entry(config):
        raise StoreError(f"{path / MANIFEST}: lm_head/wte are recorded as {recorded}, config.json says "
                         f"{layout.manifest_entry(config)}; {repair_hint(path)}")
    return config


def _damaged(path: Path, manifest: Mapping[str, Any], problems: Mapping[str, str]) -> StoreError:
    return StoreError(
        f"store {path} is damaged: {'; '.join(f'{n}: {p}' for n, p in problems.items())}; "
        f"{repair_hint(path, manifest)} (only the damaged files are rewritten)"
    )


def _hash_problem(record: Mapping[str, Any], data: bytes) -> str | None:
    """What is wrong with ``data`` against its manifest record (fast hash, else sha256)."""
    if isinstance(record.get(FAST_HASH), str):
        if fast_hash_bytes(data) != record[FAST_HASH]:
            return "fast hash mismatch (the file changed or the disk corrupted it)"
    elif hashlib.sha256(data).hexdigest() != record.get("sha256"):
        return "sha256 mismatch (the file changed or the disk corrupted it)"
    return None


def _file_set_problems(path: Path, manifest: Mapping[str, Any], config: MossConfig) -> dict[str, str]:
    """Files the config implies that the manifest lacks, and entries it has that no store has."""
    required, allowed = expected_files(path, config)
    listed = set(manifest["files"])
    problems = {name: "not in the manifest" for name in sorted(required - listed)}
    problems.update({name: "listed in the manifest but not part of this store" for name in sorted(listed - allowed)})
    groups = manifest.get("groups")
    if groups is not None and groups != {str(g): layout.group_file(g) for g in layout.all_groups(config)}:
        problems["jmoss.json"] = "its groups do not match config.json"
    return problems


def _sealed_manifest_bytes(manifest: Mapping[str, Any]) -> bytes:
    """The manifest as written: its canonical JSON plus a fast hash of that JSON without it."""
    body = {k: v for k, v in manifest.items() if k != "checksum"}
    seal = fast_hash_bytes(json.dumps(body, indent=2).encode())
    return (json.dumps({**body, "checksum": {FAST_HASH: seal}}, indent=2) + "\n").encode()


def _check_manifest(path: Path, raw: bytes, manifest: dict) -> None:
    """Refuse a manifest whose entries do not make sense, or that was edited after it was sealed."""
    where = path / MANIFEST
    if "checksum" in manifest:
        if raw != _sealed_manifest_bytes(manifest):
            raise StoreError(f"{where} was edited or corrupted after conversion (its checksum does not match); {repair_hint(path)}")
    if (manifest.get("format_version") == PACKED_FORMAT_VERSION) != isinstance(manifest.get("packed"), dict):
        raise StoreError(f"{where}: format {manifest.get('format_version')} and the packed-weights entry disagree "
                         f"(format {PACKED_FORMAT_VERSION} means packed layers, and only it); {repair_hint(path)}")
    for name, record in manifest["files"].items():
        if not safe_name(name) or name in (MANIFEST, JOURNAL):
            raise StoreError(f"{where} lists the file {str(name)[:100]!r}, which is not a store file name; refused. {repair_hint(path)}")
        if not (
            isinstance(record, dict)
            and _nonneg_int(record.get("size"))
            and isinstance(record.get("sha256"), str)
            and isinstance(record.get(FAST_HASH, ""), str)
        ):
            raise StoreError(f"{where}: the entry for {name} is not {{size, sha256}}; {repair_hint(path)}")


def read_manifest(path: str | Path) -> dict[str, Any]:
    """The parsed, checked jmoss.json of a store; errors name the command that finishes or repairs it."""
    path = Path(path).expanduser()
    where = path / MANIFEST
    if not os.path.lexists(where):
        raise _not_finished(path)
    if not inside(path, where):
        raise StoreError(f"{where} is a link to outside the store; refused. {repair_hint(path)}")
    try:
        raw = read_small_file(where, StoreError, MAX_MANIFEST_BYTES)
        manifest = parse_json_bytes(raw, where, StoreError)
    except StoreError as exc:
        raise StoreError(f"{where} is corrupt ({exc}); {repair_hint(path)}") from None
    if not isinstance(manifest, dict) or not isinstance(manifest.get("files"), dict):
        raise StoreError(f"{where} is not a jmoss manifest (no file list); {repair_hint(path)}")
    version = manifest.get("format_version")
    if version not in READABLE_VERSIONS:
        raise StoreError(
            f"{path} is jmoss store format {str(version)[:20]}, this jmoss reads formats "
            f"{' and '.join(map(str, READABLE_VERSIONS))}; "
            f"convert the model again with this jmoss: {repair_hint(path, manifest, 'to rewrite it')}"
        )
    _check_manifest(path, raw, manifest)
    return manifest


def check_files(path: str | Path, manifest: Mapping[str, Any], *, hashes: bool = True, progress: Any = None) -> dict[str, str]:
    """Problems of the files a manifest lists, by file name: presence and size, then sha256.

    Sizes are checked for every file first (cheap: a stat each); only files of the right size
    are hashed, and only with ``hashes`` (sha256 runs at ~1.7 GiB/s per core with SHA-NI, so a
    whole 32 GB moss-moon-003 store costs ~20 s of CPU plus the disk read). A name that is not a
    plain file name, or a file that resolves outside the store (a symlink), is a problem and is
    never opened.
    """
    path = Path(path)
    problems: dict[str, str] = {}
    to_hash = []
    for name, record in manifest.get("files", {}).items():
        if not safe_name(name):
            problems[str(name)[:100]] = "not a store file name (refused, never opened)"
            continue
        file = path / name
        expected = record.get("size") if isinstance(record, dict) else None
        if os.path.lexists(file) and not inside(path, file):
            problems[name] = "a link to outside the store (refused, never opened)"
        elif not file.is_file():
            problems[name] = "missing"
        elif file.stat().st_size != expected:
            problems[name] = f"{file.stat().st_size} bytes, manifest says {expected}"
        else:
            to_hash.append((name, file, record))
    if hashes:
        for name, file, record in to_hash:
            if sha256_file(file, progress) != record.get("sha256"):
                problems[name] = "sha256 mismatch (the file changed or the disk corrupted it)"
    return problems


def verify(path: str | Path, *, progress: bool = False) -> None:
    """Re-hash every file the manifest lists, and check they are exactly the files the store's
    config implies; raise StoreError naming each bad, missing or unexpected file."""
    path = Path(path).expanduser()
    manifest = read_manifest(path)
    files = manifest["files"]
    bar = None
    if progress:
        from tqdm import tqdm

        total = sum(int(r.get("size", 0)) for r in files.values() if isinstance(r, dict))
        bar = tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc=f"verify {path.name}")
    try:
        problems = check_files(path, manifest, progress=bar)
    finally:
        if bar is not None:
            bar.close()
    if "config.json" not in files:
        problems["config.json"] = "not in the manifest"
    elif "config.json" not in problems:  # its hash matched: it says which files the store must have
        try:
            config = store_config(path, manifest, MossConfig.from_json_file(path / "config.json"))
        except (ConfigError, StoreError) as exc:  # the recorded config itself is not valid
            problems["config.json"] = f"not a valid config ({exc})"
        else:
            problems.update(_file_set_problems(path, manifest, config))
    if problems:
        raise StoreError(
            f"store {path} failed verification:\n  " + "\n  ".join(f"{n}: {p}" for n, p in problems.items())
            + f"\nTo repair it, {repair_hint(path, manifest)} (only the damaged files are rewritten)"
        )
