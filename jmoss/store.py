"""The jmoss store reader: open a store, check each file before it is used, and verify one.

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

The store is split by responsibility: ``jmoss.store_format`` (constants, hashes, bounded readers),
``jmoss.store_paths`` (names, resolution, repair hints), ``jmoss.store_write`` (the writer) and
this module (the reader and `jmoss verify`). The names most callers need are importable from here.
"""

from __future__ import annotations

import hashlib
import mmap
import os
import shlex
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Iterable, Mapping

import numpy as np

from jmoss import layout, store_check
from jmoss.config import MossConfig, parse_json_bytes
from jmoss.errors import ConfigError, ModelNotFoundError, StoreError
from jmoss.store_format import (  # noqa: F401  (also re-exported: the store's public names)
    DATA_ALIGNMENT,
    FAST_HASH,
    FORMAT_VERSION,
    JOURNAL,
    MANIFEST,
    MAX_HEADER_BYTES,
    MAX_MANIFEST_BYTES,
    MAX_SMALL_FILE_BYTES,
    NUMPY_DTYPES,
    PACKED_FORMAT_VERSION,
    QKV_LAYOUT,
    READABLE_VERSIONS,
    SAFETENSORS_DTYPES,
    SAFETENSORS_ITEMSIZE,
    STORE_DTYPE,
    TOKENIZER_FILES,
    _nonneg_int,
    bytes_record,
    fast_hash,
    fast_hash_bytes,
    fast_hash_file,
    file_hashes,
    file_record,
    inside,
    parse_safetensors_header,
    read_safetensors_header,
    read_small_file,
    safe_name,
    sealed_manifest_bytes,
    sha256_file,
)
from jmoss.store_paths import (  # noqa: F401  (re-exported)
    VARIANTS,
    default_store_dir,
    default_store_dir_for_local,
    is_checkpoint_dir,
    not_finished,
    repair_command,
    repair_hint,
    resolve_model,
    split_variant,
    store_variant,
    stores_of_source,
)
from jmoss.store_write import (  # noqa: F401  (re-exported)
    GroupWriter,
    atomic_write_bytes,
    disk_full_error,
    finalize_store,
    store_config_dict,
    write_store_from_groups,
)

Group = layout.Group


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


def _group_key(group: Group | str) -> Group:
    if isinstance(group, str) and group.isdigit():
        return int(group)
    return group


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
    ``map_groups``) or, for the engines that read spans themselves, by ``check_group_span`` /
    ``span_hasher`` on the bytes they read. What this guarantees, and what not:
    docs/store-format.md. Then
    ``jmoss.store_check`` checks what the bytes say: the manifest and config at ``open``, each
    group's header when it is first parsed, and the values the kernels depend on (perm, scales,
    zeros) in the bytes the reader hands on, on the group's first read.
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
        try:
            store_check.check_config(config, manifest)
        except store_check.CheckFailed as failure:
            raise refused(path, manifest, "config.json", failure) from None
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
        file, whose size ``open`` checked; then the values in ``data`` are checked. A no-op once
        the file passed.
        """
        h = self.span_hasher(group)
        if h is None:
            return
        view = memoryview(data).cast("B")
        if len(view) != self.group_data_span(group)[1]:
            raise ValueError(f"check_group_span: {len(view)} bytes given, the span has {self.group_data_span(group)[1]}")
        h.update(view)
        self.finish_span_check(group, h)

    def span_hasher(self, group: Group) -> "SpanCheck | None":
        """What a reader feeds the group's data span to as it reads it, in order (hashing each chunk
        while it is in the CPU cache, copying the values ``store_check`` checks); None when the file
        was checked already. Finish with finish_span_check before any byte is used."""
        group = _group_key(group)
        name = layout.group_file(group)
        record = self.manifest["files"].get(name, {})
        if name in self._verified or not isinstance(record.get(FAST_HASH), str):
            return None
        start, _ = self.group_data_span(group)
        h = fast_hash()
        with open(self.group_path(group), "rb") as f:
            h.update(f.read(start))
        names = store_check.value_tensors(self.config, group)
        return SpanCheck(h, store_check.SpanValues(self.tensor_offsets(group), start, names))

    def finish_span_check(self, group: Group, hasher: "SpanCheck") -> None:
        """Compare a span_hasher fed the whole data span with the manifest, then check the values it
        collected; raise naming the file and the check on a mismatch."""
        group = _group_key(group)
        name = layout.group_file(group)
        if hasher.hexdigest() != self.manifest["files"][name][FAST_HASH]:
            raise self._mismatch(name)
        self._check_values(group, hasher.values.arrays(self.group_data_span(group)[1]))

    def mapping(self, group: Group) -> mmap.mmap:
        """The whole group file mapped read-only (``PROT_READ``, ``MAP_SHARED``), checked first.

        The pages are the page cache's own: nothing is copied, a second process (or a second start)
        maps the same pages, and a write through the mapping is impossible (it would fault). On the
        first mapping the fast hash is computed over the mapped bytes themselves, header included,
        so the bytes checked are the bytes the model reads; the file's identity (device, inode,
        size, mtime, ctime) is taken before and after, and a write in between is a mismatch too.
        Then ``store_check`` checks the values the kernels depend on. ``MADV_HUGEPAGE`` asks for
        2 MiB page-cache folios and mappings where the file is read in, ``MADV_WILLNEED`` first asks
        the kernel to read the whole file ahead of the hash (a cold cache is read in large requests,
        not page fault by page fault). The descriptor stays open so ``changed_files`` can tell later
        whether the mapped file was written since.
        """
        group = _group_key(group)
        with self._lock:
            if group in self._maps:
                return self._maps[group][1]
        self.tensor_offsets(group)  # the header parsed and checked before any data is used
        name = layout.group_file(group)
        record = self.manifest["files"][name]
        file = open(self.group_path(group), "rb", buffering=0)  # closed with the Store (garbage collected)
        mm = None
        try:
            before = os.fstat(file.fileno())
            if before.st_size != record["size"]:
                raise self._mismatch(name)
            mm = mmap.mmap(file.fileno(), before.st_size, flags=mmap.MAP_SHARED, prot=mmap.PROT_READ)
            # 2 MiB folios where the file is read from disk (ext4 and XFS on Linux >= 6.16 cache in
            # large folios): decode streams every weight once a token, and on 4 KiB pages the TLB
            # misses cost ~15% of the read rate (a 241 MB layer summed at 17 vs 20 GB/s, 1 thread)
            _advise(mm, getattr(mmap, "MADV_HUGEPAGE", None))
            if name not in self._verified and isinstance(record.get(FAST_HASH), str):
                _advise(mm, getattr(mmap, "MADV_WILLNEED", None))
                digest = fast_hash_mapping(mm)
                if digest != record[FAST_HASH] or file_identity(os.fstat(file.fileno())) != file_identity(before):
                    raise self._mismatch(name)
                # copies (perm, scales, zeros, vectors: a few MB): a refused file leaves no view
                # of its mapping behind, so the mapping closes now
                values = {k: v.copy() for k, v in
                          self._arrays(mm, group, store_check.value_tensors(self.config, group)).items()}
                self._check_values(group, values)
        except BaseException:
            if mm is not None:
                mm.close()
            file.close()
            raise
        with self._lock:
            if group in self._maps:  # another thread mapped it meanwhile: keep one
                mm.close()
                file.close()
                return self._maps[group][1]
            self._maps[group] = (file, mm)
            self._identity[name] = file_identity(before)
        return mm

    def mapped_file(self, group: Group):
        """The open file ``mapping(group)`` mapped (the same inode, whatever happened to the path since)."""
        self.mapping(group)
        with self._lock:
            return self._maps[_group_key(group)][0]

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

    def _check_values(self, group: Group, arrays: Mapping[str, np.ndarray]) -> None:
        name = layout.group_file(group)
        try:
            store_check.check_group_values(self.config, group, arrays)
        except store_check.CheckFailed as failure:
            raise refused(self.path, self.manifest, name, failure) from None
        with self._lock:
            self._verified.add(name)

    def tensor_offsets(self, group: Group) -> dict[str, tuple[int, tuple[int, ...], str]]:
        """name -> (absolute byte offset, shape, numpy dtype str), in file order; the header is
        parsed once, and checked (``store_check.check_group_header``) before anything uses it."""
        group = _group_key(group)
        if group not in self._offsets:
            try:
                self._parse_header(group)
            except StoreError as exc:  # the hint resolves paths: only worth it when there is an error
                raise StoreError(f"{exc}; {repair_hint(self.path, self.manifest)}") from None
            except store_check.CheckFailed as failure:
                raise refused(self.path, self.manifest, self.group_path(group).name, failure) from None
        return self._offsets[group]

    def _parse_header(self, group: Group) -> None:
        """Parse and check a group file's header (StoreError, store_check.CheckFailed), then keep it."""
        start, entries, metadata = parse_safetensors_header(self.group_path(group), StoreError)
        store_check.check_group_header(self.config, group, entries, metadata, start)
        self._offsets[group] = {name: (start + begin, shape, NUMPY_DTYPES[dtype])
                                for name, (dtype, shape, begin, _end) in entries.items()}
        self._data_start[group] = start

    def group_data_span(self, group: Group) -> tuple[int, int]:
        """(absolute offset, nbytes) of the group's tensor data: one contiguous read."""
        group = _group_key(group)
        self.tensor_offsets(group)
        return self._data_start[group], self.group_nbytes(group)

    def group_nbytes(self, group: Group) -> int:
        return layout.group_nbytes(self.config, _group_key(group))

    def group(self, group: Group) -> dict[str, np.ndarray]:
        """Read-only arrays of one group (fp16; packed parts uint8/int32): views of the file's
        mapped pages (``mapping``), no copy. The file is hashed and its values checked first (once
        per Store), so no byte of a tampered file is used. The arrays are plain ndarrays (jittor can
        wrap them as Vars without a copy); they keep the mapping alive."""
        group = _group_key(group)
        return self._arrays(self.mapping(group), group)

    def _arrays(self, mm: mmap.mmap, group: Group, names: list[str] | None = None) -> dict[str, np.ndarray]:
        """Arrays of a group's tensors (``names``, default all) over its mapping."""
        offsets = self.tensor_offsets(group)
        out = {}
        for name in offsets if names is None else names:
            offset, shape, dtype = offsets[name]
            count = int(np.prod(shape, dtype=np.int64))
            out[name] = np.frombuffer(mm, dtype=dtype, count=count, offset=offset).reshape(shape)
        return out

    def _mapped(self, group: Group, names: list[str] | None = None) -> dict[str, np.ndarray]:
        """Arrays of a group's tensors over a private read-only mapping of its file, unhashed: for `verify`,
        which has hashed the file with sha256 itself and keeps no mapping open (the arrays hold it)."""
        with open(self.group_path(group), "rb") as f:
            mm = mmap.mmap(f.fileno(), 0, flags=mmap.MAP_SHARED, prot=mmap.PROT_READ)
        return self._arrays(mm, group, names)


class SpanCheck:
    """A group's first read in progress: the file's fast hash (its header already fed) and the
    copies of the values ``store_check`` checks (``SpanValues``). A reader calls ``update`` with
    each chunk of the data span, in order, and ``Store.finish_span_check`` at the end."""

    def __init__(self, hasher: Any, values: store_check.SpanValues) -> None:
        self.hasher, self.values = hasher, values

    def update(self, chunk: memoryview | np.ndarray) -> None:
        self.hasher.update(chunk)
        self.values.feed(chunk)

    def hexdigest(self) -> str:
        return self.hasher.hexdigest()


def refused(path: Path, manifest: Mapping[str, Any] | None, file: str, failure: store_check.CheckFailed) -> StoreError:
    """The one-line error for a store that breaks a rule of ``store_check``: the file, the check, why."""
    return StoreError(
        f"store check \"{failure.check}\" ({store_check.CHECKS[failure.check]}) failed for {path / file}: "
        f"{failure.detail}; the store was altered or damaged after conversion, or written by another tool: "
        f"{repair_hint(path, manifest, 'to rewrite it')}"
    )


def store_config(path: Path, manifest: Mapping[str, Any], config: MossConfig) -> MossConfig:
    """The config a store's files follow: a format-2 store written before lm_head/wte could be
    packed (no ``packed.lm_head`` in its manifest, no head_wbits in config.json) has them fp16."""
    packed = manifest.get("packed")
    if not layout.packed_bits(config) or not isinstance(packed, dict):
        return config
    if "lm_head" not in packed and config.head_wbits is None and config.embed_wbits is None:
        return layout.resolved(config, keep_head_fp16=True)
    return config  # store_check.check_config compares the two records


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


def _check_manifest(path: Path, raw: bytes, manifest: dict) -> None:
    """Refuse a manifest whose entries do not make sense, or that was edited after it was sealed."""
    where = path / MANIFEST
    if "checksum" in manifest:
        if raw != sealed_manifest_bytes(manifest):
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
        raise not_finished(path)
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
    try:
        store_check.check_manifest(manifest)
    except store_check.CheckFailed as failure:
        raise refused(path, manifest, MANIFEST, failure) from None
    return manifest


def check_files(path: str | Path, manifest: Mapping[str, Any], *, hashes: bool = True, progress: Any = None) -> dict[str, str]:
    """Problems of the files a manifest lists, by file name: presence and size, then both hashes.

    Sizes are checked for every file first (cheap: a stat each); only files of the right size
    are hashed, and only with ``hashes``: sha256 and the fast hash in one read, so a file whose
    sha256 alone was recomputed still fails (sha256 runs at ~1.7 GiB/s per core with SHA-NI, so a
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
            sha, fast = file_hashes(file, progress)
            if sha != record.get("sha256"):
                problems[name] = "sha256 mismatch (the file changed or the disk corrupted it)"
            elif FAST_HASH in record and fast != record[FAST_HASH]:
                problems[name] = f"{FAST_HASH} mismatch (the file changed, or its manifest entry was edited)"
    return problems


def verify(path: str | Path, *, progress: bool = False) -> None:
    """Re-hash every file the manifest lists (sha256 and the fast hash), check they are exactly the
    files the store's config implies, and apply every ``store_check`` rule to what they hold, as a
    load would; raise StoreError naming each bad, missing or unexpected file and what it fails."""
    path = Path(path).expanduser()
    if is_checkpoint_dir(path):  # a source folder: its store is elsewhere (or not made yet)
        stores = [s for s in stores_of_source(path) if (s / MANIFEST).is_file()]
        raise StoreError(
            f"{path} is a checkpoint folder, not a jmoss store; " + (
                f"it was converted to {', '.join(map(str, stores))}: `jmoss verify {shlex.quote(str(stores[0]))}` "
                "checks that" if stores else f"convert it first: `jmoss convert {shlex.quote(str(path))}`"))
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
            try:
                store_check.check_config(config, manifest)
            except store_check.CheckFailed as failure:
                problems["config.json"] = _failed(failure)
            else:
                store = Store(path, config, manifest)
                for group in layout.all_groups(config):
                    name = layout.group_file(group)
                    if name not in problems:
                        problem = _group_problem(store, group)
                        if problem:
                            problems[name] = problem
    if len(problems) == 1:
        (name, problem), = problems.items()
        raise StoreError(f"store {path} failed verification: {name}: {problem}. "
                         f"R{repair_hint(path, manifest)[1:]} (only the damaged files are rewritten)")
    if problems:
        raise StoreError(
            f"store {path} failed verification:\n  " + "\n  ".join(f"{n}: {p}" for n, p in problems.items())
            + "\nR" + repair_hint(path, manifest)[1:] + " (only the damaged files are rewritten)"
        )


def _failed(failure: store_check.CheckFailed) -> str:
    return f"store check \"{failure.check}\" ({store_check.CHECKS[failure.check]}) failed: {failure.detail}"


def _group_problem(store: Store, group: Group) -> str | None:
    """What a group file whose hashes matched fails of ``store_check`` (header, then values)."""
    try:
        store._parse_header(group)
        store_check.check_group_values(store.config, group, store._mapped(group, store_check.value_tensors(store.config, group)))
    except store_check.CheckFailed as failure:
        return _failed(failure)
    except StoreError as exc:  # the header does not parse
        return str(exc).split(": ", 1)[-1]
    return None
