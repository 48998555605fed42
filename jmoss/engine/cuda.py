"""CUDA backend of the streaming engine. NOT run on CPU hosts: validated by the GPU issue.

Same pipeline as the CPU engine (jmoss.engine.pipeline.StreamPipeline: a reader thread filling
``prefetch_depth`` slots in plan order, a layer-boundary sync before a slot is reused), with:

- ``host``-tier groups held in pinned host memory (``cupy.cuda.alloc_pinned_memory``), read
  from the store once at load;
- ``disk``-tier groups read each token with ``preadv`` into ``prefetch_depth`` pinned staging
  buffers (one slot each), then copied like host-tier groups;
- device slots: for each slot and tensor name, one jittor Var allocated once (``jt.empty`` +
  sync, so jittor owns the device memory and its allocator accounts for it);
- copies: ``cudaMemcpyAsync`` host->device on a private non-blocking cupy stream, one per
  tensor, followed by an event; the model thread waits on the event before handing the slot out.

How bytes reach jittor Vars without DLPack (jittor-notes §6): Python cannot ask a Var for its
device pointer (``raw_ptr`` migrates it to the host), but a ``jt.code`` CUDA op can: ``_device_ptr``
runs a one-line op whose host code copies ``in0_p`` (the Var's device address) into an int64
output, read back once at start-up. The address stays valid while the Var lives (no save_mem
build, so jittor never moves it) and the copy engine writes straight into jittor's buffer: no
extra device copy. Jittor's kernels run on the legacy default stream; ``jt.sync_all(True)``
before a slot is released guarantees they finished reading it, and ``event.synchronize()``
before it is handed out guarantees the copy landed.

cupy is imported only when this class is built, so ``import jmoss.engine.cuda`` works anywhere.
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

_PTR_SRC = """
    long long address = (long long)in0_p;
    cudaMemcpy(out0_p, &address, sizeof(address), cudaMemcpyHostToDevice);
"""


def _cupy() -> ModuleType:
    try:
        import cupy
    except ImportError:
        raise DeviceError("streaming weights to a GPU needs cupy: pip install 'jmoss[cuda]'") from None
    return cupy


def _device_ptr(jt: ModuleType, var) -> int:
    """The device address of a synced CUDA Var (see the module docstring)."""
    out = jt.code([1], "int64", [var], cuda_src=_PTR_SRC)
    return int(out.numpy()[0])


def pinned_h2d_bound(nbytes: int = 256 << 20, repeats: int = 5) -> dict:
    """Measured pinned host->device copy rate (GB/s, best of ``repeats``): the bench's CUDA bound."""
    cupy = _cupy()
    host = np.frombuffer(cupy.cuda.alloc_pinned_memory(nbytes), np.uint8, nbytes)
    device = cupy.empty(nbytes, np.uint8)
    stream = cupy.cuda.Stream(non_blocking=True)
    best = 0.0
    for _ in range(repeats):
        t0 = time.perf_counter()
        device.set(host, stream=stream)
        stream.synchronize()
        best = max(best, nbytes / (time.perf_counter() - t0) / 1e9)
    return {"what": "pinned host-to-device copy", "gbps": best, "bytes": nbytes}


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
        cupy = _cupy()
        self.store, self.plan, self.jt, self.cupy = store, plan, jt, cupy
        where = {p.group: p.where for p in plan.placements}
        sequence = [g for g in all_groups(store.config) if g != EMBED and where[g] != "device"]
        self._init_pipeline(sequence, plan.prefetch_depth, {g: store.group_data_span(g) for g in sequence})
        self._where = where
        for g in all_groups(store.config):
            if g != EMBED and where[g] == "device":
                self._resident[g] = {n: jt.array(np.array(a)) for n, a in store.group(g).items()}
                for var in self._resident[g].values():
                    var.sync()
        self._offsets = {g: store.tensor_offsets(g) for g in sequence}
        # Pinned host copies of host-tier groups (read once) and pinned staging for disk-tier ones.
        self._host: dict[Group, np.ndarray] = {}
        for g in sequence:
            if where[g] == "host":
                offset, n = self._spans[g]
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
            if any(where[g] == "disk" for g in sequence) else []
        self._fds = {g: os.open(store.group_path(g), os.O_RDONLY) for g in sequence if where[g] == "disk"}
        # Device slots: exactly the Var sets the plan names per slot (placement.slot_allocation).
        self._slot_vars, self._slot_ptrs, self._slot_nbytes = allocate_slots(
            jt, plan, self._offsets, lambda var: _device_ptr(jt, var))
        self._stream = cupy.cuda.Stream(non_blocking=True)
        self._events = [cupy.cuda.Event(disable_timing=True) for _ in range(self.depth)]
        if sequence:
            self._start(0)

    def _pinned(self, nbytes: int) -> np.ndarray:
        return np.frombuffer(self.cupy.cuda.alloc_pinned_memory(nbytes), np.uint8, nbytes)

    def _fill(self, slot: int, g: Group) -> None:
        """Reader thread: (disk) preadv into pinned staging, then async H2D of every tensor."""
        runtime = self.cupy.cuda.runtime
        offset, n = self._spans[g]
        t0 = time.perf_counter()
        if self._where[g] == "disk":
            source = self._staging[slot][:n]
            hasher = self.store.span_hasher(g)  # first read of g only; then None
            read_span(self._fds[g], memoryview(source), offset, hasher=hasher)
            if hasher is not None:
                self.store.finish_span_check(g, hasher)
        else:
            source = self._host[g]
        key = _layout_key(g)
        base = source.ctypes.data
        for name, (abs_offset, shape, dt) in self._offsets[g].items():
            nbytes = int(np.prod(shape)) * np.dtype(dt).itemsize
            runtime.memcpyAsync(self._slot_ptrs[slot][key][name], base + abs_offset - offset, nbytes,
                                runtime.memcpyHostToDevice, self._stream.ptr)
        self._events[slot].record(self._stream)
        self._events[slot].synchronize()  # the staging buffer may be refilled only after the copy
        self.stats.read_seconds += time.perf_counter() - t0
        self.stats.bytes_read += n
        self.stats.groups_read += 1

    def _slot_weights(self, slot: int, g: Group) -> Mapping:
        return self._slot_vars[slot][_layout_key(g)]

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
        self._halt()
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()
