"""The CPU backend: ``StreamingWeights`` executes a placement plan with buffers allocated once;
``CpuBackend`` and ``HostWeights`` are the CPU's side of the segmented engine (jmoss.engine.segments).

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

With offload "cpu" on a GPU (jmoss.placement), the CPU computes the layers the card cannot hold:
``CpuBackend`` is that backend (jmoss.kernels on float32 activations, host memory) and
``HostWeights`` its weights (the plan's cpu-tier groups in pinned RAM shared with the CUDA engine,
pages-tier groups mapped from the store). In a process whose Jittor runs CUDA, all of it is built
and run under ``use_cuda=0`` (``CpuBackend.scope``): Jittor runs whatever is pending each time that
flag flips, so device work queued before a CPU segment runs on the device and the segment's ops
run on the CPU; Vars made there live in host memory, and only there does Jittor wrap numpy memory
without a copy (py_array_op.cc: zero-copy is off under use_cuda). ``kernel_rates`` is the probe
the offload choice reads the CPU's speed from.
"""

from __future__ import annotations

import contextlib
import mmap
import os
import time
from types import ModuleType
from typing import Any, ContextManager, Mapping

import numpy as np

from jmoss import layout
from jmoss.config import MossConfig
from jmoss.engine.ops import pick_ops
from jmoss.engine.pipeline import StreamPipeline, _layout_key, read_span
from jmoss.errors import BudgetError, DeviceError
from jmoss.jittor_setup import wrap_zero_copy
from jmoss.layout import EMBED, HEAD, Group, all_groups
from jmoss.model import ModelOps, MossModel, Step
from jmoss.placement import CPU_TIERS, Plan

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


HUGE_PAGE = 2 << 20


def huge_page_buffer(nbytes: int) -> np.ndarray:
    """A uint8 array of ``nbytes`` that starts on a 2 MiB boundary of a private anonymous mapping
    advised ``MADV_HUGEPAGE`` before anything touches it, so the kernel backs it with 2 MiB pages
    where transparent huge pages are enabled ("always" or "madvise"): decode reads every weight
    once a token, and on 4 KiB pages the TLB misses cost a share of the read rate (numbers:
    ``weight_pages`` in jmoss.engine.resident). The array keeps the mapping alive."""
    size = -(-max(nbytes, 1) // HUGE_PAGE) * HUGE_PAGE
    mm = mmap.mmap(-1, size + HUGE_PAGE, flags=mmap.MAP_PRIVATE)  # private: shmem THP is off by default
    advice = getattr(mmap, "MADV_HUGEPAGE", None)
    if advice is not None:
        with contextlib.suppress(OSError):  # advice only
            mm.madvise(advice)
    whole = np.frombuffer(mm, dtype=np.uint8)
    skip = -whole.ctypes.data % HUGE_PAGE
    return whole[skip : skip + nbytes]


def read_huge_page_span(fd: int, start: int, nbytes: int, tensors: Mapping, *,
                        hasher: Any = None) -> tuple[np.ndarray, dict]:
    """``nbytes`` of float16-as-stored data at ``start`` of ``fd`` read into ``huge_page_buffer``
    memory, made read-only (like mapped pages) before its views are made: (buffer, name -> view).
    By ``preadv`` from the file, never through a mapping of it, so a file truncated meanwhile is a
    short read (StoreError), not SIGBUS. ``hasher`` as in ``read_span``; the caller checks it."""
    buf = huge_page_buffer(nbytes)
    read_span(fd, memoryview(buf), start, drop_cache=False, hasher=hasher)
    buf.flags.writeable = False
    return buf, group_views(buf, tensors, 2)


def read_group(store, g: Group, itemsize: int, *, huge_pages: bool = False) -> tuple[np.ndarray, dict]:
    """One group read into a buffer this process owns: (buffer, name -> view).

    One ``preadv`` of the group's data span, hashed as it is read (first read only) and checked
    before any byte is used. For ``itemsize`` 4 the fp16 data lands in the upper half and is
    widened in place, and the span is dropped from the page cache: the weights exist once in RAM,
    as anonymous memory RSS reports honestly, never as a memmap copy plus a jittor copy. With
    ``huge_pages`` (float16 as stored) the buffer is ``read_huge_page_span``'s and the page cache
    keeps the file for the next start (the kernel reclaims it first).
    """
    start, nbytes = store.group_data_span(g)
    tensors = _group_layout(store.tensor_offsets(g), start, itemsize)
    hasher = store.span_hasher(g)
    fd = os.open(store.group_path(g), os.O_RDONLY)
    try:
        if huge_pages:
            if itemsize != 2:
                raise ValueError("huge-page groups hold float16 as stored (itemsize 2)")
            buf, views = read_huge_page_span(fd, start, nbytes, tensors, hasher=hasher)
        else:
            buf = np.empty(nbytes // 2 * itemsize, dtype=np.uint8)
            target = memoryview(buf)[nbytes:] if itemsize == 4 else memoryview(buf)
            read_span(fd, target, start, drop_cache=True, hasher=hasher)
    finally:
        os.close(fd)
    if hasher is not None:
        store.finish_span_check(g, hasher)  # before any byte is used
    if huge_pages:
        return buf, views
    if itemsize == 4:
        widen_in_place(buf, nbytes // 2, np.empty(_WIDEN_CHUNK, np.float16))
    return buf, group_views(buf, tensors, itemsize)


class StreamingWeights(StreamPipeline):
    """Weights for ``MossModel.forward`` under a plan: resident groups held, the rest streamed.

    Build it from an opened ``Store``, the ``Plan`` made for it and the process's jittor. The
    object owns every weight byte it uses: ``memory()`` lists them. Call ``close()`` (or let the
    Model go) to stop the reader thread.
    """

    def __init__(self, store, plan: Plan, jt: ModuleType, dtype: str = "float16") -> None:
        if plan.device != "cpu" and not plan.hybrid:
            # (an offload-cpu plan may run here with the CPU standing in for the device: the engine's tests)
            raise DeviceError("StreamingWeights is the CPU backend; CUDA plans use jmoss.engine.cuda")
        if dtype not in ("float16", "float32"):
            raise DeviceError(f"the streaming engine holds weights as float16 or float32, not {dtype!r}")
        if dtype != "float16" and store.config.wbits in (4, 8):
            raise DeviceError("a packed store's layers are streamed as stored: use dtype float16")
        self.store, self.plan, self.jt, self.dtype = store, plan, jt, dtype
        self.itemsize = 2 if dtype == "float16" else 4
        where = {p.group: p.where for p in plan.placements}
        sequence = [g for g in all_groups(store.config) if g != EMBED and where[g] != "device"]
        if plan.hybrid and not plan.prefetch_depth:
            sequence = []  # offload cpu without slots: the CPU computes those groups in every forward
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


# ------------------------------------------------------------------------------ the segmented engine's CPU side


class CpuBackend:
    """The CPU as a backend of jmoss.engine.segments: its own MossModel on ``ops`` (jmoss.kernels
    where they run here) in ``compute_dtype``, its KV cache in host memory.

    ``ops``/``compute_dtype``/``kv_dtype`` are only overridden where a CPU stands in for the device
    (tests: the device's plain Jittor fp16 math on the CPU).
    """

    name = "cpu"

    def __init__(self, jt: ModuleType, config: MossConfig, *, weight_dtype: str = "float16",
                 ops: ModelOps | None = None, compute_dtype: str = "float32", kv_dtype: str = "float32",
                 name: str = "cpu") -> None:
        self.jt, self.name, self.kv_dtype = jt, name, kv_dtype
        self._flip = bool(getattr(jt.flags, "use_cuda", 0))  # a CUDA process: run under use_cuda=0
        with self.scope():
            ops = ops or pick_ops(jt, "cpu", weight_dtype, compute_dtype)  # the kernels' self-check runs here
        self.net = MossModel(jt, config, ops, compute_dtype)

    def scope(self) -> ContextManager:
        return self.jt.flag_scope(use_cuda=0) if self._flip else contextlib.nullcontext()

    def receive(self, array: np.ndarray):
        with self.scope():
            return self.jt.array(np.ascontiguousarray(array, dtype=self.net.dtype))

    def send(self, var) -> np.ndarray:
        with self.scope():
            return var.numpy()

    def step(self, step: Step) -> Step:
        """The step's Vars made here from their host values (in a CUDA process; elsewhere shared)."""
        if not self._flip:
            return step
        with self.scope():
            sin, cos, bias = (self.jt.array(v.numpy()) for v in (step.sin, step.cos, step.attn_bias))
        return Step(step.start, step.length, sin, cos, bias)

    def zeros(self, shape: tuple[int, ...], dtype: str):
        with self.scope():
            var = self.jt.zeros(shape, dtype)
            var.sync()
        return var

    def sync(self) -> None:
        with self.scope():
            self.jt.sync_all()


class HostWeights:
    """The groups a plan has the CPU compute, as Vars over host memory (never copied).

    cpu tier: a pinned buffer of the CUDA engine (``held``: group -> its data span, read and
    hash-checked there), or where no device engine holds one (a CPU standing in for the device)
    one read here like resident groups (``read_group``). pages tier: the store's memory map
    (``Store.group`` hashes the file first), so the OS page cache decides what stays in RAM.
    """

    def __init__(self, store, plan: Plan, backend: CpuBackend, held: Mapping[Group, np.ndarray] | None = None) -> None:
        self.backend = backend
        self._groups: dict[Group, dict] = {}
        self._owned: list[np.ndarray] = []
        self._shared = 0
        self._mapped = 0
        jt = backend.jt
        for p in plan.placements:
            if p.where not in CPU_TIERS or p.group == EMBED:
                continue
            g = p.group
            if p.where == "pages":
                arrays = {name: np.asarray(a) for name, a in store.group(g).items()}
                self._mapped += p.nbytes
            elif held is not None and g in held:
                start, _ = store.group_data_span(g)
                arrays = group_views(held[g], _group_layout(store.tensor_offsets(g), start, 2), 2)
                self._shared += p.nbytes
            else:
                buf, arrays = read_group(store, g, 2)
                self._owned.append(buf)
            with backend.scope():
                self._groups[g] = {name: wrap_zero_copy(jt, a) for name, a in arrays.items()}

    def layer(self, i: int) -> Mapping:
        return self._groups[i]

    def head(self) -> Mapping:
        return self._groups[HEAD]

    def memory(self) -> dict[str, int]:
        """Host bytes of the CPU's weights: read here, shared with the device engine's pinned
        buffers (allocated there), and mapped from the store (the page cache's, not allocated)."""
        return {"host_weights_owned": sum(b.nbytes for b in self._owned), "host_weights_shared": self._shared,
                "host_weights_mapped": self._mapped}

    def close(self) -> None:
        self._groups.clear()
        self._owned.clear()


def kernel_rates(jt: ModuleType, config: MossConfig, nbytes: int = 256 << 20, repeats: int = 5,
                 gemm_rows: int = 64) -> dict[str, Any]:
    """The CPU kernels' speed on this store's weight format, for the offload choice.

    ``gbps``: weight bytes per second of a one-row GEMV over ``nbytes`` of weights (decode; beyond
    the last-level cache, so it is the kernels against DRAM); ``gflops``: fp32 FLOP/s of a
    ``gemm_rows``-row GEMM on a 4096 x 4096 weight (prompt chunks, batches). Both best of
    ``repeats`` after a first call; the buffers are freed on return. Runs under the CPU's scope.
    """
    backend = CpuBackend(jt, config)
    ops = backend.net.ops
    bits = layout.packed_bits(config)
    k_in = 4096

    def weight(n_out: int) -> dict:
        if bits is None:
            return {"weight": jt.array(np.full((n_out, k_in), 0.01, np.float16))}
        parts = layout.packed_parts("w", (n_out, k_in), bits, config.groupsize)
        values = {"w.perm": np.arange(k_in, dtype=np.int32)}
        return {name[2:]: jt.array(values.get(name, np.ones(shape, dtype))) for name, (shape, dtype) in parts.items()}

    def run(w: dict, x):
        if bits is None:
            return ops.linear(x, w["weight"])
        return ops.quant_linear(x, w["perm"], w["qweight"], w["scales"], w["zeros"], bits=bits,
                                group_size=config.groupsize)

    def best(w: dict, rows: int) -> float:
        x = jt.array(np.full((rows, k_in), 0.5, np.float32))
        times = []
        for i in range(repeats + 1):
            t0 = time.perf_counter()
            run(w, x).sync()
            if i:  # the first call compiles and faults pages in
                times.append(time.perf_counter() - t0)
        return min(times)

    row_bytes = 2 * k_in if bits is None else (layout.packed_row_bytes(k_in, bits)
                                                + 4 * layout.packed_groups(k_in, config.groupsize))
    with backend.scope():
        big = weight(max(1, nbytes // max(1, row_bytes)))
        weight_bytes = sum(int(v.nbytes) for v in big.values())
        gemv = best(big, 1)
        del big
        small = weight(4096)
        gemm = best(small, gemm_rows)
        del small
        jt.gc()
    return {"what": f"jmoss.kernels {'fp16' if bits is None else f'int{bits}'} GEMV over "
                    f"{weight_bytes >> 20} MiB and a {gemm_rows}-row GEMM (best of {repeats})",
            "gbps": weight_bytes / gemv / 1e9, "gflops": 2 * gemm_rows * 4096 * k_in / gemm / 1e9}
