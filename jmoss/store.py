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
import os
import re
import shlex
import shutil
import struct
import zlib
from dataclasses import replace
from pathlib import Path
from typing import Any, Iterable, Mapping

import numpy as np

from jmoss.config import MossConfig
from jmoss.converters import layout
from jmoss.errors import ModelNotFoundError, StoreError
from jmoss.jittor_setup import jmoss_home

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
        """fsync, verify against the write-time CRCs, rename into place; return size and sha256."""
        if not self.complete:
            raise ValueError(f"group {self.group!r} is missing {self.missing()}")
        try:
            os.fsync(self._fd)
            sha = hashlib.sha256()
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
        return {"size": self.size, "sha256": sha.hexdigest()}

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


def store_config_dict(config: MossConfig) -> dict[str, Any]:
    """config.json of a store: wbits 4/8 when its layers are packed, else 32 (fp16 weights)."""
    return replace(config, wbits=layout.packed_bits(config) or 32).to_dict()


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
    files["config.json"] = {"size": len(config_bytes), "sha256": hashlib.sha256(config_bytes).hexdigest()}
    sources = list(tokenizer_files)
    if tokenizer_dir is not None:
        sources += [Path(tokenizer_dir) / n for n in TOKENIZER_FILES if (Path(tokenizer_dir) / n).is_file()]
    for src in sources:
        data = Path(src).read_bytes()  # tokenizer files are a few MB at most
        atomic_write_bytes(out / Path(src).name, data)
        files[Path(src).name] = {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    groups = {}
    for group in layout.all_groups(config):
        record = group_files[group]
        name = layout.group_file(group)
        files[name] = {"size": int(record["size"]), "sha256": record["sha256"]}
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
                              "scheme": (source or {}).get("quantization", {}).get("method", "gptq")}
    atomic_write_bytes(out / MANIFEST, (json.dumps(manifest, indent=2) + "\n").encode())
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


def read_safetensors_header(path: Path) -> tuple[int, dict[str, Any]]:
    """(data start offset, header dict) of a safetensors file."""
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) < 8:
            raise StoreError(f"{path} is truncated (no safetensors header)")
        (n,) = struct.unpack("<Q", raw)
        if n > 100 << 20:
            raise StoreError(f"{path}: safetensors header of {n} bytes is not plausible; the file is corrupt")
        text = f.read(n)
    if len(text) < n:
        raise StoreError(f"{path} is truncated (header cut short)")
    try:
        return 8 + n, json.loads(text)
    except json.JSONDecodeError as exc:
        raise StoreError(f"{path}: corrupt safetensors header ({exc})") from None


class Store:
    """An opened, complete jmoss store. Group arrays are read-only views of np.memmap (no copy)."""

    def __init__(self, path: Path, config: MossConfig, manifest: dict) -> None:
        self.path = path
        self.config = config
        self.manifest = manifest
        self._offsets: dict[Group, dict[str, tuple[int, tuple[int, ...], str]]] = {}
        self._data_start: dict[Group, int] = {}

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
        version = manifest.get("format_version")
        if version not in READABLE_VERSIONS:
            raise StoreError(
                f"{path} is jmoss store format {version!r}, this jmoss reads formats {FORMAT_VERSION} and {PACKED_FORMAT_VERSION}; "
                f"convert the model again with this jmoss: {repair_hint(path, manifest, 'to rewrite it')}"
            )
        problems = check_files(path, manifest, hashes=False)
        if problems:
            raise StoreError(
                f"store {path} is damaged: {'; '.join(f'{n}: {p}' for n, p in problems.items())}; "
                f"{repair_hint(path, manifest)} (only the damaged files are rewritten)"
            )
        config = MossConfig.from_json_file(path / "config.json")
        return cls(path, config, manifest)

    def groups(self) -> list[Group]:
        return layout.all_groups(self.config)

    def group_path(self, group: Group) -> Path:
        return self.path / layout.group_file(_group_key(group))

    def tensor_offsets(self, group: Group) -> dict[str, tuple[int, tuple[int, ...], str]]:
        """name -> (absolute byte offset, shape, numpy dtype str), in file order."""
        group = _group_key(group)
        if group not in self._offsets:
            path = self.group_path(group)
            start, header = read_safetensors_header(path)
            tensors = layout.group_tensors(self.config, group)
            expected = {name: shape for name, (shape, _) in tensors.items()}
            names = [n for n in header if n != "__metadata__"]
            offsets: dict[str, tuple[int, tuple[int, ...], str]] = {}
            for name in sorted(names, key=lambda n: header[n]["data_offsets"][0]):
                entry = header[name]
                dtype = _NUMPY_DTYPES.get(entry.get("dtype"))
                offsets[name] = (start + entry["data_offsets"][0], tuple(entry["shape"]), dtype or "float16")
                if dtype is None or (name in tensors and dtype != tensors[name][1]):
                    raise StoreError(f"{path}: tensor {name} is {entry.get('dtype')}, this store's format says "
                                     f"{SAFETENSORS_DTYPES[tensors[name][1]] if name in tensors else 'F16'}")
            if list(offsets) != list(expected) or any(offsets[n][1] != expected[n] for n in expected):
                raise StoreError(
                    f"{path} does not hold the tensors config.json describes for group {group!r} "
                    f"(found {[(n, o[1]) for n, o in offsets.items()]}); {repair_hint(self.path, self.manifest)}"
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
        """Read-only arrays of one group (fp16; packed parts uint8/int32), backed by np.memmap."""
        group = _group_key(group)
        offsets = self.tensor_offsets(group)
        start, nbytes = self.group_data_span(group)
        data = np.memmap(self.group_path(group), dtype=np.uint8, mode="r", offset=start, shape=(nbytes,))
        out = {}
        for name, (offset, shape, dtype) in offsets.items():
            n = int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize
            out[name] = data[offset - start : offset - start + n].view(dtype).reshape(shape)
        return out


def read_manifest(path: str | Path) -> dict[str, Any]:
    """The parsed jmoss.json of a store; errors name the command that finishes or repairs it."""
    path = Path(path).expanduser()
    try:
        manifest = json.loads((path / MANIFEST).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise _not_finished(path) from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise StoreError(f"{path / MANIFEST} is corrupt ({exc}); {repair_hint(path)}") from None
    if not isinstance(manifest, dict) or not isinstance(manifest.get("files"), dict):
        raise StoreError(f"{path / MANIFEST} is not a jmoss manifest (no file list); {repair_hint(path)}")
    return manifest


def check_files(path: str | Path, manifest: Mapping[str, Any], *, hashes: bool = True, progress: Any = None) -> dict[str, str]:
    """Problems of the files a manifest lists, by file name: presence and size, then sha256.

    Sizes are checked for every file first (cheap: a stat each); only files of the right size
    are hashed, and only with ``hashes`` (sha256 runs at ~1.7 GiB/s per core with SHA-NI, so a
    whole 32 GB moss-moon-003 store costs ~20 s of CPU plus the disk read).
    """
    path = Path(path)
    problems: dict[str, str] = {}
    to_hash = []
    for name, record in manifest.get("files", {}).items():
        file = path / name
        expected = record.get("size") if isinstance(record, dict) else None
        if not file.is_file():
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
    """Re-hash every file the manifest lists; raise StoreError naming each bad or missing file."""
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
    if problems:
        raise StoreError(
            f"store {path} failed verification:\n  " + "\n  ".join(f"{n}: {p}" for n, p in problems.items())
            + f"\nTo repair it, {repair_hint(path, manifest)} (only the damaged files are rewritten)"
        )
