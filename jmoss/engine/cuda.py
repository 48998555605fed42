"""CUDA backend of the streaming engine. NOT run on CPU hosts: validated by the GPU issue.

Same pipeline as the CPU engine (jmoss.engine.pipeline.StreamPipeline: a reader thread filling
``prefetch_depth`` slots in plan order, a layer-boundary sync before a slot is reused), with:

- ``device``-tier groups (and every group of an all-resident model, ``CudaResidentWeights``)
  copied straight into device Vars at load: each tensor's Var is allocated on the device first
  (``jt.empty`` + sync, then ``_device_ptr``), and the group's bytes are read from the store
  file through two small reusable pinned bounce buffers (``BOUNCE_BYTES`` each) with
  ``cudaMemcpyAsync``; the process holds no host copy beyond the bounce buffers, and the device
  memory is in use from load on. The read goes through the page cache and leaves the pages there
  (clean, reclaimable, shared with any other process on the store), so a second start reads them
  at memory speed instead of from disk; the next group's file is asked for ahead
  (``POSIX_FADV_WILLNEED``) while one uploads, so a cold disk is read in large requests;
- ``host``-tier groups held in pinned host memory (``cudaHostAlloc``), read from the store once;
- ``disk``-tier groups read each token with ``preadv`` into ``prefetch_depth`` pinned staging
  buffers (one slot each), then copied like host-tier groups;
- device slots: for each slot and tensor name, one jittor Var allocated once (``jt.empty`` +
  sync, so jittor owns the device memory and its allocator accounts for it);
- copies: ``cudaMemcpyAsync`` host->device on a private non-blocking stream, one per tensor,
  then an event recorded on that stream; the reader waits on the slot's event before the slot
  is handed out (and before its staging buffer is refilled).

The CUDA runtime is reached through ctypes (``jmoss.cuda_runtime``), not cupy: on the device
machines the stock cupy needs numpy >= 2, which Jittor 1.3.11 misreads, and a numpy-1 cupy wheel
(54.5 MB) plus numpy 1.26.4 (18 MB) exceed what can be carried there. libcudart is what Jittor's
CUDA build loads anyway, so this path needs no package beyond Jittor and numpy.

How bytes reach jittor Vars without DLPack (jittor-notes §6): Python cannot ask a Var for its
device pointer (``raw_ptr`` migrates it to the host), but a ``jt.code`` CUDA op can: ``_device_ptr``
runs a one-line op whose host code copies ``in0_p`` (the Var's device address) into an int64
output, read back once at start-up. The address stays valid while the Var lives (no save_mem
build, so jittor never moves it) and the copy engine writes straight into jittor's buffer: no
extra device copy. Jittor's kernels run on the legacy default stream; ``jt.sync_all(True)``
before a slot is released guarantees they finished reading it, and ``Event.synchronize()``
before it is handed out guarantees the copy landed.

With offload "cpu" (jmoss.placement) the same engine holds the device's side of the segmented
engine (jmoss.engine.segments): cpu-tier groups sit in pinned host buffers like host-tier ones
(``held``: the CPU computes from them, and large prompt chunks stream them through the slots),
pages-tier groups are read for large chunks like disk-tier ones but without dropping the page
cache the CPU reads them from. ``CudaBackend`` is the device as a backend: the hidden state crosses
through one pinned buffer and one device Var, both allocated at start-up and billed by the plan
(``handoff_host_bytes``, ``handoff_device_bytes``).

Nothing here touches the CUDA runtime at import, so ``import jmoss.engine.cuda`` works anywhere.
"""

from __future__ import annotations

import contextlib
import os
import time
from types import ModuleType
from typing import ContextManager, Mapping

import numpy as np

from jmoss import cuda_runtime
from jmoss.config import MossConfig
from jmoss.engine.pipeline import StreamPipeline, _layout_key, read_span
from jmoss.engine.resident import ResidentWeights
from jmoss.errors import BudgetError, DeviceError
from jmoss.layout import EMBED, HEAD, Group, all_groups
from jmoss.model import JittorOps, MossModel, Step
from jmoss.placement import Plan

PINNED = ("host", "cpu")  # tiers held in pinned host buffers
READ = ("disk", "pages")  # tiers read from the store into pinned staging when they stream

_PTR_SRC = """
    long long address = (long long)in0_p;
    cudaMemcpy(out0_p, &address, sizeof(address), cudaMemcpyHostToDevice);
"""

BOUNCE_BYTES = 32 << 20  # each of the two pinned bounce buffers resident groups are read through


def _device_ptr(jt: ModuleType, var) -> int:
    """The device address of a synced CUDA Var (see the module docstring)."""
    out = jt.code([1], "int64", [var], cuda_src=_PTR_SRC)
    return int(out.numpy()[0])


def pinned_h2d_bound(nbytes: int = 256 << 20, repeats: int = 5) -> dict:
    """Measured pinned host->device copy rate (GB/s, best of ``repeats``, CUDA events): the bench's CUDA bound."""
    return cuda_runtime.pinned_h2d_gbps(nbytes, repeats)


def device_memory_now() -> dict[str, int]:
    """Free and total device bytes as the driver's allocator reports them (cudaMemGetInfo)."""
    free, total = cuda_runtime.mem_info()
    return {"free": free, "total": total}


class _Uploader:
    """Store spans -> device addresses through two reusable pinned bounce buffers.

    Chunk ``k`` is read (preadv, through the page cache, which keeps the pages) into buffer
    ``k % 2`` while the copies of chunk ``k - 1`` run on the stream; a buffer is refilled only
    after the event recorded behind its copies has completed.
    """

    def __init__(self, chunk: int | None = None) -> None:
        self.chunk = chunk or BOUNCE_BYTES
        self.stream = cuda_runtime.Stream()
        self.buffers = [cuda_runtime.PinnedBuffer(self.chunk) for _ in range(2)]
        self.events = [cuda_runtime.Event() for _ in range(2)]
        self._pending = [False, False]
        self._next = 0
        self.bytes_copied = 0

    def upload(self, store, g: Group, targets: list[tuple[int, int, int]]) -> None:
        """Copy group ``g``'s data span to ``targets`` ((absolute file offset, nbytes, device
        address) per tensor), checking the file's hash as it is read; all copies done on return."""
        offset, n = store.group_data_span(g)
        hasher = store.span_hasher(g)
        fd = os.open(store.group_path(g), os.O_RDONLY)
        try:
            pos = 0
            while pos < n:
                size = min(self.chunk, n - pos)
                k = self._next
                self._next ^= 1
                if self._pending[k]:
                    self.events[k].synchronize()  # the copies out of this buffer have finished
                buf = self.buffers[k]
                read_span(fd, memoryview(buf.array)[:size], offset + pos, drop_cache=False, hasher=hasher)
                lo, hi = offset + pos, offset + pos + size
                for t_offset, t_bytes, device_ptr in targets:
                    a, b = max(lo, t_offset), min(hi, t_offset + t_bytes)
                    if a < b:
                        self.stream.copy_h2d(device_ptr + (a - t_offset), buf.ptr + (a - lo), b - a)
                        self.bytes_copied += b - a
                self.events[k].record(self.stream)
                self._pending[k] = True
                pos += size
        finally:
            os.close(fd)
        self.stream.synchronize()  # before any kernel (legacy stream) reads the group
        self._pending = [False, False]
        if hasher is not None:
            store.finish_span_check(g, hasher)

    def close(self) -> None:
        """Free the buffers, after the copies still reading them (an upload that raised) are done."""
        try:
            self.stream.synchronize()
        finally:
            for obj in (*self.buffers, *self.events, self.stream):
                obj.close()


def _read_ahead(path) -> None:
    """Ask the kernel to read a whole file into the page cache now, asynchronously (advice only)."""
    if not hasattr(os, "posix_fadvise"):
        return
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return  # the upload itself will say what is wrong with the file
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_WILLNEED)
    except OSError:
        pass
    finally:
        os.close(fd)


def upload_resident(store, groups: list[Group], jt: ModuleType, dtype: str) -> tuple[dict[Group, dict], int]:
    """(group -> {name: device Var}, bytes copied): every tensor of ``groups`` allocated on the
    device and filled from the store file, never as a host array (see the module docstring).
    Floating tensors are cast to ``dtype`` on the device when the store holds another one."""
    out: dict[Group, dict] = {}
    if not groups:
        return out, 0
    uploader = _Uploader()
    try:
        for k, g in enumerate(groups):
            if k + 1 < len(groups):
                _read_ahead(store.group_path(groups[k + 1]))  # the disk works on it while g uploads
            offsets = store.tensor_offsets(g)
            vars_ = {name: jt.empty(shape, dt) for name, (_, shape, dt) in offsets.items()}  # as stored
            for var in vars_.values():
                var.sync()
            targets = [(off, int(np.prod(shape, dtype=np.int64)) * np.dtype(dt).itemsize, _device_ptr(jt, vars_[name]))
                       for name, (off, shape, dt) in offsets.items()]
            uploader.upload(store, g, targets)
            for name, (_, _, dt) in offsets.items():
                if np.dtype(dt).kind == "f" and np.dtype(dt) != np.dtype(dtype):
                    vars_[name] = vars_[name].astype(dtype)
                    vars_[name].sync()
            out[g] = vars_
    finally:
        uploader.close()
    return out, uploader.bytes_copied


def _measured(before: dict[str, int], resident_bytes: int) -> dict[str, int]:
    after = device_memory_now()
    return {"device_free_before_load": before["free"], "device_free_after_load": after["free"],
            "device_total": after["total"], "device_bytes_added_by_load": before["free"] - after["free"],
            "resident_bytes_copied": resident_bytes}


class CudaResidentWeights(ResidentWeights):
    """Every layer and the head as device Vars, read from the store straight into device memory
    (the all-resident CUDA plan); ``load_memory`` is what cudaMemGetInfo saw load add."""

    def __init__(self, store, jt: ModuleType, dtype: str = "float16") -> None:
        before = device_memory_now()
        n_layer = store.config.n_layer
        groups, copied = upload_resident(store, [*range(n_layer), HEAD], jt, dtype)
        self._layers = [groups[i] for i in range(n_layer)]
        self._head = groups[HEAD]
        self._buffers, self._nbytes = [], copied  # nothing stays on the host; memory() = device bytes
        self.load_memory = _measured(before, copied)


def _tensor_bytes(offsets: Mapping[str, tuple[int, tuple[int, ...], str]]) -> int:
    return sum(int(np.prod(shape, dtype=np.int64)) * np.dtype(dt).itemsize for _, shape, dt in offsets.values())


def allocate_slots(jt: ModuleType, plan: Plan, offsets: Mapping[Group, Mapping], device_ptr):
    """Per slot, one Var set per layout in ``plan.slot_layouts``, shaped like the largest streamed
    group of that layout (``offsets``: streamed group -> ``Store.tensor_offsets``); packed parts
    keep their stored dtype. Returns (vars, device pointers, bytes allocated).

    The plan paid for these buffers (``plan.staging_bytes``); a store whose streamed layouts differ
    from what the plan billed is refused before any device memory is taken.
    """
    chosen: dict[str, Group] = {}
    for g, tensors in offsets.items():
        key = _layout_key(g)
        if key not in chosen or _tensor_bytes(tensors) > _tensor_bytes(offsets[chosen[key]]):
            chosen[key] = g
    needed = {key: _tensor_bytes(offsets[g]) for key, g in chosen.items()}
    if needed != dict(plan.slot_layouts):
        raise BudgetError(
            f"the plan's staging slots ({dict(plan.slot_layouts)} bytes by layout) do not match the streamed "
            f"groups of this store ({needed}): make the plan for this store with weight_itemsize 2"
        )
    slot_vars: list[dict[str, dict]] = []
    slot_ptrs: list[dict[str, dict[str, int]]] = []
    total = 0
    for _ in range(plan.prefetch_depth):
        slot_vars.append({})
        slot_ptrs.append({})
        for key, g in chosen.items():
            vars_ = {n: jt.empty(shape, dt) for n, (_, shape, dt) in offsets[g].items()}
            for var in vars_.values():
                var.sync()
            slot_vars[-1][key] = vars_
            slot_ptrs[-1][key] = {n: device_ptr(v) for n, v in vars_.items()}
            total += needed[key]
    return slot_vars, slot_ptrs, total


class CudaStreamingWeights(StreamPipeline):
    """Resident groups as device Vars; host/disk groups copied into device slots each token."""

    def __init__(self, store, plan: Plan, jt: ModuleType, dtype: str = "float16") -> None:
        if dtype != "float16":
            raise DeviceError("the CUDA engine streams float16 weights as stored")
        before = device_memory_now()
        self.store, self.plan, self.jt = store, plan, jt
        self._buffers: list = []  # the PinnedBuffers behind _host and _staging, freed on close
        where = {p.group: p.where for p in plan.placements}
        off_device = [g for g in all_groups(store.config) if g != EMBED and where[g] != "device"]
        # offload cpu without slots: the CPU computes its groups in every forward, nothing streams
        sequence = [] if plan.hybrid and not plan.prefetch_depth else off_device
        self._init_pipeline(sequence, plan.prefetch_depth, {g: store.group_data_span(g) for g in sequence})
        self._where = where
        resident = [g for g in all_groups(store.config) if g != EMBED and where[g] == "device"]
        self._resident, copied = upload_resident(store, resident, jt, dtype)
        self._offsets = {g: store.tensor_offsets(g) for g in sequence}
        # Pinned host copies of host- and cpu-tier groups (read once), pinned staging for disk and pages.
        self._host: dict[Group, np.ndarray] = {}
        for g in off_device:
            if where[g] in PINNED:
                offset, n = store.group_data_span(g)
                self._host[g] = self._pinned(n)
                fd = os.open(store.group_path(g), os.O_RDONLY)
                try:
                    hasher = store.span_hasher(g)
                    read_span(fd, memoryview(self._host[g]), offset, hasher=hasher)
                finally:
                    os.close(fd)
                if hasher is not None:
                    store.finish_span_check(g, hasher)
        self._staging = [self._pinned(plan.staging_slot_bytes) for _ in range(self.depth)] \
            if any(where[g] in READ for g in sequence) else []
        self._fds = {g: os.open(store.group_path(g), os.O_RDONLY) for g in sequence if where[g] in READ}
        # Device slots: exactly the Var sets the plan names per slot (placement.slot_allocation).
        self._slot_vars, self._slot_ptrs, self._slot_nbytes = allocate_slots(
            jt, plan, self._offsets, lambda var: _device_ptr(jt, var))
        self._stream = cuda_runtime.Stream() if sequence else None
        self._events = [cuda_runtime.Event() for _ in range(self.depth)]
        self.load_memory = _measured(before, copied)
        if sequence:
            self._start(0)

    def _pinned(self, nbytes: int) -> np.ndarray:
        buffer = cuda_runtime.PinnedBuffer(nbytes)
        self._buffers.append(buffer)
        return buffer.array

    def _fill(self, slot: int, g: Group) -> None:
        """Reader thread: (disk) preadv into pinned staging, async H2D of every tensor on the
        side stream, an event recorded behind the copies, then a wait on it: the slot is handed
        out, and its staging buffer refilled, only after the copies landed."""
        offset, n = self._spans[g]
        t0 = time.perf_counter()
        if self._where[g] in READ:
            source = self._staging[slot][:n]
            hasher = self.store.span_hasher(g)  # first read of g only; then None
            # pages-tier groups keep their page cache: the CPU computes from those pages in decode
            read_span(self._fds[g], memoryview(source), offset, hasher=hasher, drop_cache=self._where[g] == "disk")
            if hasher is not None:
                self.store.finish_span_check(g, hasher)
        else:
            source = self._host[g]
        key = _layout_key(g)
        base = source.ctypes.data
        for name, (abs_offset, shape, dt) in self._offsets[g].items():
            nbytes = int(np.prod(shape)) * np.dtype(dt).itemsize
            self._stream.copy_h2d(self._slot_ptrs[slot][key][name], base + abs_offset - offset, nbytes)
        self._events[slot].record(self._stream)
        self._events[slot].synchronize()  # the staging buffer may be refilled only after the copy
        self.stats.read_seconds += time.perf_counter() - t0
        self.stats.bytes_read += n
        self.stats.groups_read += 1

    def _slot_weights(self, slot: int, g: Group) -> Mapping:
        return self._slot_vars[slot][_layout_key(g)]

    @property
    def held(self) -> dict[Group, np.ndarray]:
        """The pinned host copies of cpu-tier groups (their data spans): the CPU computes from these."""
        return {g: a for g, a in self._host.items() if self._where[g] == "cpu"}

    def _sync(self) -> None:
        t0 = time.perf_counter()
        self.jt.sync_all(True)  # device sync: kernels reading the slot have finished
        self.stats.sync_seconds += time.perf_counter() - t0

    def memory(self) -> dict[str, int]:
        """Bytes this engine allocated: device slots (== plan.staging_bytes) and pinned host memory."""
        return {
            "device_slots": self._slot_nbytes,
            "pinned_host_weights": sum(a.nbytes for a in self._host.values()),
            "pinned_staging": sum(a.nbytes for a in self._staging),
        }

    def close(self) -> None:
        """Stop the reader, close the store files and free the pinned buffers, events and stream."""
        self._halt()
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()
        for obj in (*self._buffers, *self._events, *([self._stream] if self._stream else [])):
            obj.close()
        self._buffers, self._events, self._stream = [], [], None
        self._host, self._staging = {}, []


class CudaBackend:
    """The device as a backend of jmoss.engine.segments: Jittor's CUDA ops (JittorOps) in the
    model's compute dtype, the KV cache of the layers it attends for in device memory.

    The hand-off: ``send`` copies a Var's bytes (its device address from ``_device_ptr``, which
    also runs everything the Var depends on) into the pinned buffer on a private stream and waits;
    ``receive`` copies a host array (float32) into the pinned buffer, then into the device Var
    allocated at start-up, and returns a view of it cast to the compute dtype. Both buffers are
    the plan's (``handoff_host_bytes``/``handoff_device_bytes``); nothing is allocated per token
    beyond Jittor's own activations.
    """

    name = "cuda"

    def __init__(self, jt: ModuleType, config: MossConfig, plan: Plan, *, compute_dtype: str = "float16") -> None:
        self.jt, self.kv_dtype = jt, plan.kv_dtype
        self.net = MossModel(jt, config, JittorOps(jt), compute_dtype)
        self._pinned = cuda_runtime.PinnedBuffer(plan.handoff_host_bytes)
        self._inbox = jt.empty((plan.handoff_device_bytes // 4,), "float32")
        self._inbox.sync()
        self._inbox_ptr = _device_ptr(jt, self._inbox)
        self._stream = cuda_runtime.Stream()

    def scope(self) -> ContextManager:
        return contextlib.nullcontext()  # Jittor runs on the device by default in this process

    def receive(self, array: np.ndarray):
        n = int(array.size)
        if 4 * n > self._pinned.nbytes or n > int(self._inbox.shape[0]):
            raise BudgetError(f"a hand-off of {n} values exceeds the plan's buffers ({self._pinned.nbytes} B pinned, "
                              f"{int(self._inbox.shape[0])} values on the device): plan with this batch and prefill chunk")
        self.jt.sync_all(True)  # whatever read the inbox last has run
        staging = self._pinned.array[: 4 * n].view(np.float32).reshape(array.shape)
        np.copyto(staging, array)
        self._stream.copy_h2d(self._inbox_ptr, self._pinned.ptr, 4 * n)
        self._stream.synchronize()
        return self._inbox[:n].reshape(array.shape).cast(self.net.dtype)

    def send(self, var) -> np.ndarray:
        dtype = np.dtype(str(var.dtype))
        nbytes = int(var.numel()) * dtype.itemsize
        if nbytes > self._pinned.nbytes:
            raise BudgetError(f"a hand-off of {nbytes} B exceeds the plan's pinned buffer ({self._pinned.nbytes} B)")
        address = _device_ptr(self.jt, var)  # runs var (and what it depends on) on the legacy stream
        self._stream.copy_d2h(self._pinned.ptr, address, nbytes)
        self._stream.synchronize()
        return self._pinned.array[:nbytes].view(dtype).reshape(tuple(var.shape))

    def step(self, step: Step) -> Step:
        return step

    def zeros(self, shape: tuple[int, ...], dtype: str):
        var = self.jt.zeros(shape, dtype)
        var.sync()
        return var

    def sync(self) -> None:
        self.jt.sync_all(True)

    def memory(self) -> dict[str, int]:
        """The hand-off buffers (== plan.handoff_host_bytes and plan.handoff_device_bytes)."""
        return {"handoff_pinned": self._pinned.nbytes, "handoff_device": int(self._inbox.shape[0]) * 4}

    def close(self) -> None:
        for obj in (self._pinned, self._stream):
            obj.close()

