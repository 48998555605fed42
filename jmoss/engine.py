"""The streaming engine: executes a placement plan with buffers allocated once.

A ``Plan`` (jmoss.placement) says which groups of the store stay resident and which are read
from disk for every forward pass. ``StreamingWeights`` is the weight source the model reads
from (same interface as ``api.ResidentWeights``: ``.layer(i)`` and ``.head()``):

- resident groups are read once with ``preadv`` into arrays this object owns (not memmaps, so
  the process RSS reports them honestly and the page cache does not keep a second copy) and
  wrapped as jittor Vars without a copy;
- every group file is checked against the manifest's fast hash on its first read (resident groups
  at load, streamed groups on their first pass through the reader thread), before a byte is used;
- streamed groups are read by one background thread, each group's contiguous data span in one
  ``preadv``, into ``prefetch_depth`` slot buffers allocated at start-up and sized for the
  largest streamed group; ``posix_fadvise(DONTNEED)`` after each read drops the pages from the
  OS cache, so the cache never becomes hidden residency beside the budget;
- the tensors of a slot are numpy views wrapped as jittor Vars once per slot (every layer has the
  same layout, so the same Vars serve every layer that passes through the slot); nothing is
  allocated per token.

Jittor is lazy (jittor-notes §7): ops built for layer ``i`` run at the next sync, so a slot may be
refilled only after the computation that read it has executed. When a streamed group is
requested the engine therefore calls ``jt.sync_all()`` first, which runs everything built so far
(the previous layer), and only then hands the previous slot back to the reader thread. With two
slots this is double buffering: the read of layer ``i+1`` overlaps the compute of layer ``i``.
The cost of those syncs is measured and kept in ``stats.sync_seconds``.

The reader runs ahead cyclically, across forward passes: while the resident layers, the head and
sampling run, the first streamed layers of the next token are already being read.

With ``dtype="float32"`` (CPU without the fp16 kernels) each slot is a float32 buffer: the fp16
data is read into its upper half and widened in place, front to back, through a 1 MiB scratch
(the float32 write of element ``j`` never reaches fp16 data not yet converted), so there is no
second staging buffer.

The CUDA backend (pinned host buffers, copies on a separate stream) is ``jmoss.engine_cuda``;
it is imported only when a CUDA plan streams, so CPU use never needs cupy.
"""

from __future__ import annotations

import dataclasses
import os
import queue
import threading
import time
from pathlib import Path
from types import ModuleType
from typing import Any, Mapping

import numpy as np

from jmoss.errors import BudgetError, DeviceError, StoreError
from jmoss.layout import EMBED, HEAD, Group, all_groups
from jmoss.placement import Plan

_WIDEN_CHUNK = 1 << 20  # elements per in-place fp16 -> fp32 widening step (4 MiB of output)
_STOP = -1


# ------------------------------------------------------------------------------ file reading


def _fadvise_dontneed(fd: int, offset: int, nbytes: int) -> None:
    """Drop a range from the page cache (clean pages only; a no-op where unsupported)."""
    if hasattr(os, "posix_fadvise"):
        try:
            os.posix_fadvise(fd, offset, nbytes, os.POSIX_FADV_DONTNEED)
        except OSError:
            pass


_HASH_CHUNK = 4 << 20  # with a hasher, read this much at a time and hash it while it is in cache


def read_span(fd: int, out: memoryview, offset: int, *, drop_cache: bool = True, hasher: Any = None) -> int:
    """Fill ``out`` from ``fd`` at ``offset`` with preadv (the GIL is released while the kernel
    copies), then drop the range from the page cache. Raises StoreError on a short file.

    With ``hasher`` (``Store.span_hasher``) each chunk is fed to it right after it is read."""
    done, total = 0, len(out)
    while done < total:
        stop = total if hasher is None else min(total, done + _HASH_CHUNK)
        n = os.preadv(fd, [out[done:stop]], offset + done)
        if n <= 0:
            raise StoreError(f"unexpected end of store file at byte {offset + done}; run `jmoss verify` on the store")
        if hasher is not None:
            hasher.update(out[done : done + n])
        done += n
    if drop_cache:
        _fadvise_dontneed(fd, offset, total)
    return total


def widen_in_place(buf: np.ndarray, n_elements: int, scratch: np.ndarray) -> None:
    """Turn fp16 data stored at byte ``2 * n_elements`` of ``buf`` into fp32 at byte 0.

    ``buf`` is uint8 with at least ``4 * n_elements`` bytes. Chunk [a, b) is copied to
    ``scratch`` first because its own fp32 output can overlap its fp16 input near the end;
    the output of chunk [a, b) ends at byte 4b <= 2n + 2b, so it never touches later input.
    """
    f16 = buf[2 * n_elements : 4 * n_elements].view(np.float16)
    f32 = buf[: 4 * n_elements].view(np.float32)
    for a in range(0, n_elements, len(scratch)):
        b = min(n_elements, a + len(scratch))
        part = scratch[: b - a]
        np.copyto(part, f16[a:b])
        np.copyto(f32[a:b], part, casting="safe")


# ------------------------------------------------------------------------------ accounting


@dataclasses.dataclass
class EngineStats:
    """What the engine measured since the last ``reset`` (all times in seconds).

    ``bytes_consumed`` counts the streamed bytes handed to the model (exactly the plan's
    ``disk_bytes_per_token`` per forward); ``bytes_read`` counts the reader's I/O, which runs up to
    ``prefetch_depth`` groups ahead. ``read_seconds`` is time inside preadv (and widening),
    ``wait_seconds`` time the model waited for a group not yet read, ``sync_seconds`` time in
    the layer-boundary ``jt.sync_all()`` (it includes the compute of the previous layer).
    """

    forwards: int = 0
    groups_consumed: int = 0
    bytes_consumed: int = 0
    groups_read: int = 0
    bytes_read: int = 0
    read_seconds: float = 0.0
    wait_seconds: float = 0.0
    sync_seconds: float = 0.0

    def reset(self) -> None:
        for field in dataclasses.fields(self):
            setattr(self, field.name, field.default)

    @property
    def bytes_per_forward(self) -> float:
        """Streamed bytes per forward pass (= per decode token at batch 1)."""
        return self.bytes_consumed / self.forwards if self.forwards else 0.0

    @property
    def read_gbps(self) -> float:
        """Decimal GB/s while the reader was inside preadv: the disk path's own speed."""
        return self.bytes_read / self.read_seconds / 1e9 if self.read_seconds else 0.0

    def as_dict(self) -> dict[str, float]:
        out = dataclasses.asdict(self)
        out["bytes_per_forward"] = self.bytes_per_forward
        out["read_gbps"] = self.read_gbps
        return out


def _group_layout(offsets: Mapping[str, tuple[int, tuple[int, ...], str]], start: int, itemsize: int):
    """name -> (byte offset inside the slot, shape, dtype) for a group read at ``start``, in ``itemsize``
    (packed stores, whose uint8/int32 parts are never widened, are always read with itemsize 2)."""
    return {name: ((off - start) // 2 * itemsize, shape, dtype) for name, (off, shape, dtype) in offsets.items()}


def _layout_key(group: Group) -> str:
    return "layer" if isinstance(group, int) else str(group)


def wrap_zero_copy(jt: ModuleType, array: np.ndarray):
    """A jittor Var over ``array``'s memory (no copy; CPU only, jittor-notes §4)."""
    if not (type(array) is np.ndarray and array.flags.c_contiguous):
        raise ValueError("zero-copy wrapping needs a C-contiguous plain ndarray")
    reuse = getattr(jt, "reuse_np_array", None)
    if reuse is not None:
        return reuse(array)
    saved = jt.flags.reuse_array
    jt.flags.reuse_array = 1
    try:
        return jt.array(array)
    finally:
        jt.flags.reuse_array = saved


# ------------------------------------------------------------------------------ the engine


class StreamPipeline:
    """The device-agnostic core: a reader thread filling ``depth`` slots in plan order.

    Subclasses own the buffers and say how to fill a slot (``_fill``), how a filled slot looks to
    the model (``_slot_weights``) and how to make sure the compute that read a slot has executed
    (``_sync``). Sequence numbers count streamed groups handed out; group ``sequence[s % len]``
    lives in slot ``s % depth``.
    """

    def _init_pipeline(self, sequence: list[Group], depth: int, spans: dict[Group, tuple[int, int]]) -> None:
        self.stats = EngineStats()
        self._sequence = sequence
        self._seq_index = {g: k for k, g in enumerate(sequence)}
        self._spans = spans
        self.depth = depth if sequence else 0
        self._resident: dict[Group, Mapping] = {}
        self._consumed = 0  # next sequence number the model will take
        self._held = 0  # sequence numbers below this have had their slots released
        self._thread: threading.Thread | None = None
        self._free: threading.Semaphore | None = None
        self._ready: queue.Queue | None = None
        self._stop = threading.Event()
        self._error: BaseException | None = None

    def _fill(self, slot: int, g: Group) -> None:  # pragma: no cover - abstract
        raise NotImplementedError

    def _slot_weights(self, slot: int, g: Group) -> Mapping:  # pragma: no cover - abstract
        raise NotImplementedError

    def _sync(self) -> None:  # pragma: no cover - abstract
        raise NotImplementedError

    # ---- the reader thread -------------------------------------------------------------
    def _reader(self, first: int, free: threading.Semaphore, ready: queue.Queue) -> None:
        """Background loop: read sequence numbers first, first+1, ... into free slots, in order."""
        seq = first
        try:
            while not self._stop.is_set():
                while not free.acquire(timeout=0.1):
                    if self._stop.is_set():
                        return
                if self._stop.is_set():
                    return
                self._fill(seq % self.depth, self._sequence[seq % len(self._sequence)])
                ready.put(seq)
                seq += 1
        except BaseException as exc:  # surfaced to the model thread at its next request
            self._error = exc
            ready.put(_STOP)

    def _start(self, base: int) -> None:
        """(Re)start the reader at sequence number ``base`` (group ``sequence[base % len]``)."""
        self._stop.clear()
        self._free = threading.Semaphore(self.depth)
        self._ready = queue.Queue()
        self._consumed = self._held = base
        self._thread = threading.Thread(target=self._reader, args=(base, self._free, self._ready),
                                        name="jmoss-reader", daemon=True)
        self._thread.start()

    def _halt(self) -> None:
        if self._thread is not None:
            self._stop.set()
            self._thread.join()
            self._thread = None

    # ---- what the model calls ----------------------------------------------------------
    def layer(self, i: int) -> Mapping:
        """Weights of layer ``i`` as jittor Vars (valid until the next streamed group is requested)."""
        return self._get(i)

    def head(self) -> Mapping:
        """Final LayerNorm and lm_head; one call per forward pass."""
        self.stats.forwards += 1
        return self._get(HEAD)

    def _get(self, g: Group) -> Mapping:
        if g in self._resident:
            return self._resident[g]
        k, n = self._seq_index[g], len(self._sequence)
        if self._consumed % n != k:
            # An earlier forward stopped half-way (an exception): restart the pipeline at g.
            self._sync()
            self._halt()
            self._start(self._consumed + (k - self._consumed) % n)
        # Everything built so far reads slots of earlier groups: run it, then free those slots.
        self._sync()
        while self._held < self._consumed:
            self._free.release()
            self._held += 1
        t0 = time.perf_counter()
        seq = self._ready.get()
        self.stats.wait_seconds += time.perf_counter() - t0
        if seq == _STOP:
            error, self._error = self._error, None
            self._halt()
            self._start(self._consumed)
            raise StoreError(f"reading streamed weights failed: {error}") from error
        assert seq == self._consumed, (seq, self._consumed)
        self._consumed += 1
        self.stats.groups_consumed += 1
        self.stats.bytes_consumed += self._spans[g][1]
        return self._slot_weights(seq % self.depth, g)


class StreamingWeights(StreamPipeline):
    """Weights for ``MossModel.forward`` under a plan: resident groups held, the rest streamed.

    Build it from an opened ``Store``, the ``Plan`` made for it and the process's jittor. The
    object owns every weight byte it uses: ``memory()`` lists them. Call ``close()`` (or let the
    Model go) to stop the reader thread.
    """

    def __init__(self, store, plan: Plan, jt: ModuleType, dtype: str = "float16") -> None:
        if plan.device != "cpu":
            raise DeviceError("StreamingWeights is the CPU backend; CUDA plans use jmoss.engine_cuda")
        if dtype not in ("float16", "float32"):
            raise DeviceError(f"the streaming engine holds weights as float16 or float32, not {dtype!r}")
        if dtype != "float16" and store.config.wbits in (4, 8):
            raise DeviceError("a packed store's layers are streamed as stored: use dtype float16")
        self.store, self.plan, self.jt, self.dtype = store, plan, jt, dtype
        self.itemsize = 2 if dtype == "float16" else 4
        where = {p.group: p.where for p in plan.placements}
        sequence = [g for g in all_groups(store.config) if g != EMBED and where[g] != "device"]
        self._init_pipeline(sequence, plan.prefetch_depth, {g: store.group_data_span(g) for g in sequence})
        self._fds: dict[Group, int] = {}

        # Resident groups: one owned buffer each, read once.
        self._resident_arrays: list[np.ndarray] = []
        for g in all_groups(store.config):
            if g != EMBED and where[g] == "device":
                self._resident[g] = self._read_resident(g)

        # Streamed groups: fixed slots (fp16 bytes of the largest group, doubled for float32).
        slot_bytes = max((n for _, n in self._spans.values()), default=0) // 2 * self.itemsize
        if sequence and slot_bytes > plan.staging_slot_bytes:
            raise BudgetError(
                f"the plan's staging slot ({plan.staging_slot_bytes} B) is smaller than the largest streamed "
                f"group in {dtype} ({slot_bytes} B): plan with weight_itemsize={self.itemsize}"
            )
        self._slots = [np.empty(slot_bytes, dtype=np.uint8) for _ in range(self.depth)]
        self._scratch = np.empty(_WIDEN_CHUNK if dtype == "float32" and sequence else 0, np.float16)
        self._slot_vars: list[dict[str, dict]] = [{} for _ in range(self.depth)]
        self._layouts = {
            _layout_key(g): _group_layout(store.tensor_offsets(g), self._spans[g][0], self.itemsize) for g in sequence
        }
        for g in sequence:
            self._fds[g] = os.open(store.group_path(g), os.O_RDONLY)
        if sequence:
            self._start(0)

    # ---- reading ---------------------------------------------------------------------------
    def _read_resident(self, g: Group) -> dict:
        start, nbytes = self.store.group_data_span(g)
        buf = np.empty(nbytes // 2 * self.itemsize, dtype=np.uint8)
        fd = os.open(self.store.group_path(g), os.O_RDONLY)
        try:
            target = memoryview(buf)[nbytes:] if self.itemsize == 4 else memoryview(buf)
            hasher = self.store.span_hasher(g)
            read_span(fd, target, start, hasher=hasher)
        finally:
            os.close(fd)
        if hasher is not None:
            self.store.finish_span_check(g, hasher)  # before any byte is used
        if self.itemsize == 4:
            widen_in_place(buf, nbytes // 2, np.empty(_WIDEN_CHUNK, np.float16))
        self._resident_arrays.append(buf)
        layout = _group_layout(self.store.tensor_offsets(g), start, self.itemsize)
        return self._wrap(buf, layout)

    def _wrap(self, buf: np.ndarray, layout: Mapping[str, tuple[int, tuple[int, ...]]]) -> dict:
        out = {}
        np_dtype = np.float16 if self.itemsize == 2 else np.float32
        for name, (offset, shape, dtype) in layout.items():
            view_dtype = np_dtype if dtype == "float16" else np.dtype(dtype)  # packed parts: as stored
            n = int(np.prod(shape, dtype=np.int64)) * np.dtype(view_dtype).itemsize
            out[name] = wrap_zero_copy(self.jt, buf[offset : offset + n].view(view_dtype).reshape(shape))
        return out

    def _fill(self, slot: int, g: Group) -> None:
        offset, nbytes = self._spans[g]
        buf = self._slots[slot]
        t0 = time.perf_counter()
        hasher = self.store.span_hasher(g)  # first read of g only; afterwards None (a set lookup)
        target = memoryview(buf)[:nbytes] if self.itemsize == 2 else memoryview(buf)[nbytes : 2 * nbytes]
        read_span(self._fds[g], target, offset, hasher=hasher)
        if hasher is not None:
            self.store.finish_span_check(g, hasher)  # before the model sees the slot
        if self.itemsize == 4:
            widen_in_place(buf, nbytes // 2, self._scratch)
        self.stats.read_seconds += time.perf_counter() - t0
        self.stats.bytes_read += nbytes
        self.stats.groups_read += 1

    def _slot_weights(self, slot: int, g: Group) -> Mapping:
        key = _layout_key(g)
        if key not in self._slot_vars[slot]:  # made once per slot and layout, then reused
            self._slot_vars[slot][key] = self._wrap(self._slots[slot], self._layouts[key])
        return self._slot_vars[slot][key]

    def _sync(self) -> None:
        t0 = time.perf_counter()
        self.jt.sync_all()
        self.stats.sync_seconds += time.perf_counter() - t0

    # ---- bookkeeping -------------------------------------------------------------------------
    @property
    def streamed_groups(self) -> list[Group]:
        return list(self._sequence)

    def memory(self) -> dict[str, int]:
        """Bytes this engine allocated, by purpose (the weight part of the plan's device total)."""
        return {
            "resident_weights": sum(a.nbytes for a in self._resident_arrays),
            "staging_slots": sum(s.nbytes for s in self._slots),
            "widen_scratch": int(self._scratch.nbytes),
        }

    def close(self) -> None:
        """Stop the reader and close the store files; the Vars handed out become invalid."""
        self._halt()
        for fd in self._fds.values():
            try:
                os.close(fd)
            except OSError:
                pass
        self._fds.clear()

    def __del__(self) -> None:  # pragma: no cover - best effort at interpreter exit
        try:
            self.close()
        except Exception:
            pass


# ------------------------------------------------------------------------------ jittor swap


class JittorSwapWeights:
    """The baseline: every weight an ordinary jittor Var, under Jittor's own swap.

    Only valid in a process whose jittor was built with ``-DJT_SAVE_MEM=1``
    (``JMOSS_JITTOR_SAVE_MEM=1``, see jmoss.jittor_setup); ``jmoss bench --compare jittor``
    starts such a process. ``jt.flags.cpu_mem_limit`` is set to the budget *before* any weight is
    created, and each group is synced as it is created because ``jt.array`` allocates outside the
    limit and only later allocations evict (jittor-notes §2.2).
    """

    def __init__(self, store, jt: ModuleType, dtype: str, cpu_mem_limit: int) -> None:
        from jmoss.jittor_setup import save_mem_requested

        if not save_mem_requested():
            raise DeviceError(
                "swap='jittor' needs Jittor's swap build: start the process with JMOSS_JITTOR_SAVE_MEM=1 "
                "(`jmoss bench --compare jittor` does this for you)"
            )
        self.jt = jt
        self.stats = EngineStats()
        jt.flags.cpu_mem_limit = int(cpu_mem_limit)
        self._groups: dict[Group, dict] = {}
        for g in all_groups(store.config):
            if g == EMBED:
                continue
            self._groups[g] = {name: jt.array(np.array(a, dtype=dtype)) for name, a in store.group(g).items()}
            jt.sync_all()

    def layer(self, i: int) -> Mapping:
        return self._groups[i]

    def head(self) -> Mapping:
        self.stats.forwards += 1
        return self._groups[HEAD]

    def memory(self) -> dict[str, int]:
        return {}

    def close(self) -> None:
        self._groups.clear()


def build_weights(store, plan: Plan, jt: ModuleType, dtype: str) -> Any:
    """The weight source for a plan: the CPU engine, or the CUDA one (imported only here)."""
    if plan.device == "cuda":
        from jmoss.engine_cuda import CudaStreamingWeights

        return CudaStreamingWeights(store, plan, jt, dtype)
    return StreamingWeights(store, plan, jt, dtype)


def rss_bytes() -> int:
    """This process's resident set size now (psutil)."""
    import psutil

    return int(psutil.Process().memory_info().rss)


def store_files(store) -> list[Path]:
    """The layer and head files of a store (what the engine streams)."""
    return [store.group_path(g) for g in all_groups(store.config) if g != EMBED]
