"""The CPU backend: ``StreamingWeights`` executes a placement plan with buffers allocated once.

``StreamingWeights`` is the weight source the model reads from (the ``jmoss.protocols.Weights``
interface, like ``jmoss.engine.resident.ResidentWeights``: ``.layer(i)`` and ``.head()``):

- resident groups are read once with ``preadv`` into arrays this object owns (not memmaps, so
  the process RSS reports them honestly and the page cache does not keep a second copy) and
  wrapped as jittor Vars without a copy;
- every group file is checked against the manifest's fast hash on its first read (resident groups
  at load, streamed groups on their first pass through the reader thread), before a byte is used;
- streamed groups are read by the pipeline's background thread (``jmoss.engine.pipeline``), each
  group's contiguous data span in one ``preadv``, into ``prefetch_depth`` slot buffers allocated
  at start-up and sized for the largest streamed group; ``posix_fadvise(DONTNEED)`` after each
  read drops the pages from the OS cache, so the cache never becomes hidden residency beside the
  budget;
- the tensors of a slot are numpy views wrapped as jittor Vars once per slot (every layer has the
  same layout, so the same Vars serve every layer that passes through the slot); nothing is
  allocated per token.

With ``dtype="float32"`` (CPU without the fp16 kernels) each slot is a float32 buffer: the fp16
data is read into its upper half and widened in place, front to back, through a 1 MiB scratch
(the float32 write of element ``j`` never reaches fp16 data not yet converted), so there is no
second staging buffer.
"""

from __future__ import annotations

import os
import time
from types import ModuleType
from typing import Mapping

import numpy as np

from jmoss.engine.pipeline import StreamPipeline, _layout_key, read_span
from jmoss.errors import BudgetError, DeviceError
from jmoss.layout import EMBED, Group, all_groups
from jmoss.placement import Plan

_WIDEN_CHUNK = 1 << 20  # elements per in-place fp16 -> fp32 widening step (4 MiB of output)


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


def _group_layout(offsets: Mapping[str, tuple[int, tuple[int, ...], str]], start: int, itemsize: int):
    """name -> (byte offset inside the slot, shape, dtype) for a group read at ``start``, in ``itemsize``
    (packed stores, whose uint8/int32 parts are never widened, are always read with itemsize 2)."""
    return {name: ((off - start) // 2 * itemsize, shape, dtype) for name, (off, shape, dtype) in offsets.items()}


def group_views(buf: np.ndarray, layout: Mapping[str, tuple[int, tuple[int, ...], str]], itemsize: int) -> dict:
    """name -> a numpy view of ``buf`` per tensor (fp16 tensors in ``itemsize``, packed parts as stored)."""
    out = {}
    np_dtype = np.float16 if itemsize == 2 else np.float32
    for name, (offset, shape, dtype) in layout.items():
        view_dtype = np_dtype if dtype == "float16" else np.dtype(dtype)
        n = int(np.prod(shape, dtype=np.int64)) * np.dtype(view_dtype).itemsize
        out[name] = buf[offset : offset + n].view(view_dtype).reshape(shape)
    return out


def read_group(store, g: Group, itemsize: int) -> tuple[np.ndarray, dict]:
    """One group read into a buffer this process owns: (buffer, name -> view).

    One ``preadv`` of the group's data span, hashed as it is read (first read only) and checked
    before any byte is used, then dropped from the page cache: the weights exist once in RAM, as
    anonymous memory RSS reports honestly, never as a memmap copy plus a jittor copy. For
    ``itemsize`` 4 the fp16 data lands in the upper half and is widened in place.
    """
    start, nbytes = store.group_data_span(g)
    buf = np.empty(nbytes // 2 * itemsize, dtype=np.uint8)
    fd = os.open(store.group_path(g), os.O_RDONLY)
    try:
        target = memoryview(buf)[nbytes:] if itemsize == 4 else memoryview(buf)
        hasher = store.span_hasher(g)
        read_span(fd, target, start, hasher=hasher)
    finally:
        os.close(fd)
    if hasher is not None:
        store.finish_span_check(g, hasher)  # before any byte is used
    if itemsize == 4:
        widen_in_place(buf, nbytes // 2, np.empty(_WIDEN_CHUNK, np.float16))
    return buf, group_views(buf, _group_layout(store.tensor_offsets(g), start, itemsize), itemsize)


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


class StreamingWeights(StreamPipeline):
    """Weights for ``MossModel.forward`` under a plan: resident groups held, the rest streamed.

    Build it from an opened ``Store``, the ``Plan`` made for it and the process's jittor. The
    object owns every weight byte it uses: ``memory()`` lists them. Call ``close()`` (or let the
    Model go) to stop the reader thread.
    """

    def __init__(self, store, plan: Plan, jt: ModuleType, dtype: str = "float16") -> None:
        if plan.device != "cpu":
            raise DeviceError("StreamingWeights is the CPU backend; CUDA plans use jmoss.engine.cuda")
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

        # Streamed groups: the plan's slots, allocated as billed (one buffer each, the largest group
        # in this dtype: fp16 bytes, doubled for float32).
        needed = max((n for _, n in self._spans.values()), default=0) // 2 * self.itemsize
        slot_bytes = plan.device_slot_bytes if sequence else 0
        if needed > slot_bytes:
            raise BudgetError(
                f"the plan's staging slot ({slot_bytes} B) is smaller than the largest streamed "
                f"group in {dtype} ({needed} B): plan with weight_itemsize={self.itemsize}"
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
        buf, arrays = read_group(self.store, g, self.itemsize)
        self._resident_arrays.append(buf)
        return {name: wrap_zero_copy(self.jt, a) for name, a in arrays.items()}

    def _wrap(self, buf: np.ndarray, layout: Mapping[str, tuple[int, tuple[int, ...]]]) -> dict:
        return {name: wrap_zero_copy(self.jt, a) for name, a in group_views(buf, layout, self.itemsize).items()}

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
