"""Every weight held as a jittor Var for the whole run: the source when no budget is given, or
the plan keeps every layer and the head on the device.

Loaded from a store (``ResidentWeights.from_store``) on the CPU in float16 (the kernels read the
stored bytes as they are), the weights are the store's own pages: every group file is mapped
read-only and checked (``Store.map_groups``: hashed on the mapped pages, several files at once),
and each tensor is wrapped as a Var over its mapped bytes without a copy. The page cache is then
the one copy of the weights: the process holds no anonymous memory for them, a second start (or a
second process on the same store) finds them in the cache and maps them in well under a second
per GB, and the mapping is ``PROT_READ``, so nothing can write into the file through it (a write
would fault; nothing in jmoss writes a weight Var in place). Each forward starts by checking that
no mapped file was written since it was checked (``Store.check_unchanged``: one fstat per file).
Where the weights fit in RAM twice over, a thread then copies the mapped bytes into 2 MiB pages of
this process (``weight_pages``: decode reads every weight once a token, and 4 KiB pages cost it TLB
misses), and the next forward takes the copy; ``JMOSS_WEIGHT_PAGES`` overrides the choice.

In float32 (a CPU without the fp16 kernels) the bytes must be widened, so each group is read once
into a buffer this object owns instead (``read_group``: hashed, widened in place, dropped from the
page cache) and the Vars share it: peak RSS is the weights plus one group, never twice them. On
cuda ``engine.cuda.CudaResidentWeights`` copies each group from the file into device memory.
"""

from __future__ import annotations

import os
import threading
from typing import Any, Mapping

import numpy as np

from jmoss import layout
from jmoss.engine.cpu import _group_layout, read_group, read_huge_page_span, wrap_zero_copy
from jmoss.errors import DeviceError, JmossError


# JMOSS_WEIGHT_PAGES: how resident float16 weights are held on the CPU (``weight_pages``).
WEIGHT_PAGES = ("auto", "mapped", "copied")


def transparent_huge_pages() -> bool:
    """Whether anonymous memory advised MADV_HUGEPAGE can get 2 MiB pages ("always" or "madvise")."""
    try:
        with open("/sys/kernel/mm/transparent_hugepage/enabled") as f:
            return "[never]" not in f.read()
    except OSError:
        return False


def weight_pages(weight_bytes: int, available: int | None, mode: str | None = None) -> str:
    """How resident float16 CPU weights are held: "mapped" (the page cache's pages), "copied" (read
    into 2 MiB pages at load) or "copy later" (mapped at load, copied by a thread after it).

    A mapped store is read through 4 KiB pages unless the page cache holds it in 2 MiB folios
    (ext4 and XFS since Linux 6.16, and only for files read after the mapping asked for them), and
    on 4 KiB pages decode loses to TLB misses: MOSS-16B int4 on a 2-vCPU Xeon VM decoded at 1.01-1.11
    tok/s copied (1 thread) against 0.67-0.68 mapped in 4 KiB pages and 0.90-0.98 mapped as cached,
    56% in 2 MiB folios (benchmarks/bench_hugepages.py). The copy costs RAM
    the page cache would otherwise share, and time: ``auto`` copies later (a load takes what mapping
    takes) and only where transparent huge pages are on and the weights fit in RAM twice over (the
    copy, and the page cache keeping the file for the next start) with 1 GiB to spare (``available``:
    the host bytes free now, as jmoss.load measured them; None: unknown, no copy). ``mode``:
    "auto", "mapped" or "copied"; default ``$JMOSS_WEIGHT_PAGES``, else auto.
    """
    mode = mode or os.environ.get("JMOSS_WEIGHT_PAGES") or "auto"
    if mode not in WEIGHT_PAGES:
        raise JmossError(f"JMOSS_WEIGHT_PAGES={mode!r}: choose one of {', '.join(WEIGHT_PAGES)}")
    if mode != "auto":
        return mode
    fits = available is not None and 2 * weight_bytes + (1 << 30) <= available
    return "copy later" if fits and transparent_huge_pages() else "mapped"


def read_huge_pages(store, groups, workers: int | None = None) -> dict:
    """group -> (buffer, name -> view) for ``groups``, each read into ``huge_page_buffer`` memory,
    hashed and checked as it is read (``read_group``); preadv and the hash release the GIL, so
    ``workers`` groups are read at once (default ``jmoss.store.MAP_WORKERS``, as for mapping)."""
    from concurrent.futures import ThreadPoolExecutor

    from jmoss.store import MAP_WORKERS

    groups = list(groups)
    with ThreadPoolExecutor(max(1, min(workers or MAP_WORKERS, len(groups))), thread_name_prefix="jmoss-read") as pool:
        return dict(zip(groups, pool.map(lambda g: read_group(store, g, 2, huge_pages=True), groups)))


class ResidentWeights:
    """Every layer's weights held as jittor Vars for the whole run (no budget, or it all fits)."""

    def __init__(self, jt, groups: Mapping[Any, Mapping[str, np.ndarray]], n_layer: int, dtype: str):
        def to_vars(tensors: Mapping[str, np.ndarray]) -> dict:
            out = {}
            for name, array in tensors.items():
                # no copy when already fp16/contiguous; packed codes and perms keep their integer dtype
                array = np.ascontiguousarray(array, dtype=dtype if array.dtype.kind == "f" else None)
                out[name] = jt.array(array)
            return out

        self._buffers: list[np.ndarray] = []  # owned host buffers the Vars share (cpu, from_store)
        self._nbytes = 0
        self._store = None  # the Store whose mapped pages the Vars are (from_store, float16)
        self._layers = [to_vars(groups[i]) for i in range(n_layer)]
        self._head = to_vars(groups[layout.HEAD])
        for tensors in self._layers + [self._head]:
            for var in tensors.values():
                var.sync()
                self._nbytes += int(var.nbytes)

    @classmethod
    def from_store(cls, jt, store, dtype: str, copied: Mapping[Any, tuple[np.ndarray, Mapping]] | None = None,
                   copy_later: bool = False) -> "ResidentWeights":
        """Every layer and the head of ``store`` on the CPU, never two copies (module docstring):
        float16 as the store's mapped pages, or, given ``copied`` (``read_huge_pages``), as those
        buffers; float32 read once into memory shared with jittor. ``copy_later`` (float16,
        mapped): copy the mapped bytes into 2 MiB pages on a thread and use them once done
        (``_copy_in_background``)."""
        if dtype not in ("float16", "float32"):
            raise DeviceError(f"resident weights are float16 or float32, not {dtype!r}")
        if dtype != "float16" and layout.packed_bits(store.config):
            raise DeviceError("a packed store's layers are used as stored: load it with dtype float16")
        if getattr(jt.flags, "use_cuda", 0):
            raise DeviceError("resident CUDA weights are read into device memory by jmoss.engine.cuda "
                              "(CudaResidentWeights, through jmoss.engine.factory.build_weights)")
        self = cls.__new__(cls)
        self._buffers, self._nbytes, self._store, self._jt = [], 0, None, jt
        self._pending: dict | None = None
        n_layer = store.config.n_layer
        if dtype == "float16" and copied is not None:  # as stored, in this process's 2 MiB pages
            self._take(copied)
            self._nbytes = sum(int(b.nbytes) for b in self._buffers)
            self._store = store  # the embedding is still mapped: each forward checks it is unchanged
            return self
        if dtype == "float16":  # used as stored: the mapped pages themselves
            groups = store.map_groups([*range(n_layer), layout.HEAD])
            self._store = store  # each forward checks the mapped files are unchanged
            self._nbytes = sum(store.group_data_span(g)[1] for g in groups)
            self._layers = [{n: wrap_zero_copy(jt, a) for n, a in groups[i].items()} for i in range(n_layer)]
            self._head = {n: wrap_zero_copy(jt, a) for n, a in groups[layout.HEAD].items()}
            if copy_later:
                self._copy_in_background(store, list(groups))
            return self
        itemsize = 4

        def load(g) -> dict:
            buf, arrays = read_group(store, g, itemsize)
            self._buffers.append(buf)  # alive as long as the Vars that share it
            self._nbytes += buf.nbytes
            return {name: wrap_zero_copy(jt, a) for name, a in arrays.items()}

        self._layers = [load(i) for i in range(n_layer)]
        self._head = load(layout.HEAD)
        return self

    def _take(self, copied: Mapping[Any, tuple[np.ndarray, Mapping]]) -> None:
        """Use ``copied`` (group -> (buffer, views), every layer and the head) from now on."""
        groups = [*range(len(copied) - 1), layout.HEAD]
        self._layers = [{n: wrap_zero_copy(self._jt, a) for n, a in copied[g][1].items()} for g in groups[:-1]]
        self._head = {n: wrap_zero_copy(self._jt, a) for n, a in copied[layout.HEAD][1].items()}
        self._buffers = [copied[g][0] for g in groups]

    def _copy_in_background(self, store, groups: list) -> None:
        """Copy the mapped groups into ``huge_page_buffer`` memory on a daemon thread, so a load
        starts as fast as mapping does and decode gets 2 MiB pages a few seconds later
        (``weight_pages`` says why). The thread only reads bytes; the next forward that finds the
        copy done takes it (``layer(0)``, after that forward's unchanged-file check: the mapped
        bytes were hashed, and an unchanged file since means the copy is of the hashed bytes).
        The files are still checked every forward after that, so whether a write to the store
        after the load is refused never depends on when the copy finished. Any failure (no
        memory) keeps the mapped pages."""

        # what the thread reads, taken here: the mapped inodes (not through the mapping: a file
        # truncated meanwhile is a short read, dropping the copy, where touching the mapping past
        # the new end would be SIGBUS), spans and layouts; the thread calls nothing of the Store
        spans = {g: (store.mapped_file(g), *store.group_data_span(g)) for g in groups}
        layouts = {g: _group_layout(store.tensor_offsets(g), spans[g][1], 2) for g in groups}

        def copy() -> None:
            try:
                self._pending = {g: read_huge_page_span(file.fileno(), start, nbytes, layouts[g])
                                 for g, (file, start, nbytes) in spans.items()}
            except Exception:  # noqa: BLE001 -- an optimisation: whatever stops it, the mapped pages serve
                pass

        self._copier = threading.Thread(target=copy, name="jmoss-huge-pages", daemon=True)
        self._copier.start()

    def wait_for_copy(self, timeout: float | None = None) -> bool:
        """Wait for a background copy (``copy_later``) to finish; True when the next forward will
        use it (or already does). Benchmarks call it so that every round measures the same memory."""
        copier = getattr(self, "_copier", None)
        if copier is not None:
            copier.join(timeout)
        return getattr(self, "_pending", None) is not None or not self.mapped

    @property
    def mapped(self) -> bool:
        """Whether the weights are the store's mapped pages (page cache) rather than owned memory."""
        return getattr(self, "_store", None) is not None and not self._buffers

    def layer(self, i: int) -> Mapping:
        if i == 0 and getattr(self, "_store", None) is not None:
            self._store.check_unchanged()  # a forward starts: its weights must still be the checked bytes
            pending, self._pending = self._pending, None
            if pending is not None:
                self._take(pending)
        return self._layers[i]

    def head(self) -> Mapping:
        return self._head

    def memory(self) -> dict[str, int]:
        """Bytes of weights held (the plan's resident_bytes when loaded under a plan); when
        ``mapped`` they are the store's pages in the page cache, not memory this process allocated."""
        return {"resident_weights": self._nbytes}
