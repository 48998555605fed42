"""The CUDA runtime through ctypes: pinned memory, streams, events, async copies, memory info.

Why not cupy: on the device machines the stock cupy (cupy-cuda13x 14.x) needs numpy >= 2, Jittor
1.3.11 needs numpy 1.x (its pyjt reads numpy 1 struct layouts), and a numpy-1 cupy wheel plus
numpy 1.26.4 exceed what can be carried. libcudart is already loaded by Jittor's CUDA build, so
these few calls cost no dependency. Only what jmoss's streaming engine and the GPU record use.

``JMOSS_CUDART`` names the library explicitly; otherwise the one Jittor loaded (found next to the
nvcc jmoss uses) or ``libcudart.so`` on the loader path.

The hybrid engine's hand-off (jmoss.engine.cuda.CudaBackend) crosses through one ``PinnedBuffer``:
``Stream.copy_d2h`` brings a device Var's bytes into it, ``Stream.copy_h2d`` takes them back.
``device_gbps`` and ``pinned_h2d_gbps`` are the device figures the offload choice is made with.
"""

from __future__ import annotations

import ctypes
import os
from pathlib import Path

import numpy as np

from jmoss.errors import DeviceError

MEMCPY_HOST_TO_DEVICE = 1
MEMCPY_DEVICE_TO_HOST = 2
MEMCPY_DEVICE_TO_DEVICE = 3
STREAM_NON_BLOCKING = 0x01
EVENT_DISABLE_TIMING = 0x02
HOST_ALLOC_DEFAULT = 0

_lib: ctypes.CDLL | None = None


def _candidates() -> list[str]:
    explicit = os.environ.get("JMOSS_CUDART")
    if explicit:
        return [explicit]
    names = []
    from jmoss.jittor_setup import find_nvcc

    nvcc = find_nvcc()
    if nvcc:
        root = Path(nvcc).resolve().parent.parent
        for sub in ("lib64", "lib"):
            names += [str(p) for p in sorted((root / sub).glob("libcudart.so*"))]
    return names + ["libcudart.so", "libcudart.so.13", "libcudart.so.12"]


def runtime() -> ctypes.CDLL:
    """libcudart with argument types set; DeviceError when none can be loaded."""
    global _lib
    if _lib is not None:
        return _lib
    errors = []
    for name in _candidates():
        try:
            lib = ctypes.CDLL(name, mode=ctypes.RTLD_GLOBAL)
            break
        except OSError as exc:
            errors.append(str(exc))
    else:
        raise DeviceError("the CUDA runtime (libcudart) cannot be loaded: install the CUDA toolkit or set "
                          f"JMOSS_CUDART=/path/to/libcudart.so ({'; '.join(errors[-2:])})")
    vp, sz = ctypes.c_void_p, ctypes.c_size_t
    signatures = {
        "cudaMemGetInfo": [ctypes.POINTER(sz), ctypes.POINTER(sz)],
        "cudaHostAlloc": [ctypes.POINTER(vp), sz, ctypes.c_uint],
        "cudaFreeHost": [vp],
        "cudaMalloc": [ctypes.POINTER(vp), sz],
        "cudaFree": [vp],
        "cudaMemcpyAsync": [vp, vp, sz, ctypes.c_int, vp],
        "cudaStreamCreateWithFlags": [ctypes.POINTER(vp), ctypes.c_uint],
        "cudaStreamSynchronize": [vp],
        "cudaStreamDestroy": [vp],
        "cudaEventCreateWithFlags": [ctypes.POINTER(vp), ctypes.c_uint],
        "cudaEventRecord": [vp, vp],
        "cudaEventSynchronize": [vp],
        "cudaEventElapsedTime": [ctypes.POINTER(ctypes.c_float), vp, vp],
        "cudaEventDestroy": [vp],
        "cudaDeviceSynchronize": [],
    }
    for fn, args in signatures.items():
        getattr(lib, fn).argtypes = args
        getattr(lib, fn).restype = ctypes.c_int
    lib.cudaGetErrorString.restype = ctypes.c_char_p
    lib.cudaGetErrorString.argtypes = [ctypes.c_int]
    _lib = lib
    return lib


def check(code: int, what: str) -> None:
    if code != 0:
        message = runtime().cudaGetErrorString(code) or b"unknown error"
        raise DeviceError(f"{what} failed: CUDA error {code} ({message.decode(errors='replace')})")


def mem_info() -> tuple[int, int]:
    """(free, total) device bytes as the driver reports them now (cudaMemGetInfo)."""
    free, total = ctypes.c_size_t(0), ctypes.c_size_t(0)
    check(runtime().cudaMemGetInfo(ctypes.byref(free), ctypes.byref(total)), "cudaMemGetInfo")
    return free.value, total.value


class PinnedBuffer:
    """Page-locked host memory (cudaHostAlloc) viewed as a uint8 numpy array; freed on close()."""

    def __init__(self, nbytes: int) -> None:
        ptr = ctypes.c_void_p()
        check(runtime().cudaHostAlloc(ctypes.byref(ptr), max(1, nbytes), HOST_ALLOC_DEFAULT), f"pinning {nbytes} bytes")
        self.ptr, self.nbytes = ptr.value, nbytes
        self.array = np.ctypeslib.as_array((ctypes.c_uint8 * max(1, nbytes)).from_address(self.ptr))[:nbytes]

    def close(self) -> None:
        if self.ptr:
            runtime().cudaFreeHost(self.ptr)
            self.ptr = None


class DeviceBuffer:
    """Raw device memory (cudaMalloc), for the bandwidth probe; Jittor owns the model's memory."""

    def __init__(self, nbytes: int) -> None:
        ptr = ctypes.c_void_p()
        check(runtime().cudaMalloc(ctypes.byref(ptr), max(1, nbytes)), f"cudaMalloc of {nbytes} bytes")
        self.ptr, self.nbytes = ptr.value, nbytes

    def close(self) -> None:
        if self.ptr:
            runtime().cudaFree(self.ptr)
            self.ptr = None


class Stream:
    """A non-blocking stream: copies on it overlap the legacy default stream Jittor's kernels use."""

    def __init__(self) -> None:
        handle = ctypes.c_void_p()
        check(runtime().cudaStreamCreateWithFlags(ctypes.byref(handle), STREAM_NON_BLOCKING), "cudaStreamCreate")
        self.ptr = handle.value

    def copy_h2d(self, device_ptr: int, host_ptr: int, nbytes: int) -> None:
        check(runtime().cudaMemcpyAsync(device_ptr, host_ptr, nbytes, MEMCPY_HOST_TO_DEVICE, self.ptr), "cudaMemcpyAsync")

    def copy_d2h(self, host_ptr: int, device_ptr: int, nbytes: int) -> None:
        check(runtime().cudaMemcpyAsync(host_ptr, device_ptr, nbytes, MEMCPY_DEVICE_TO_HOST, self.ptr), "cudaMemcpyAsync")

    def copy_d2d(self, dst_ptr: int, src_ptr: int, nbytes: int) -> None:
        check(runtime().cudaMemcpyAsync(dst_ptr, src_ptr, nbytes, MEMCPY_DEVICE_TO_DEVICE, self.ptr), "cudaMemcpyAsync")

    def synchronize(self) -> None:
        check(runtime().cudaStreamSynchronize(self.ptr), "cudaStreamSynchronize")

    def close(self) -> None:
        if self.ptr:
            runtime().cudaStreamDestroy(self.ptr)
            self.ptr = None


class Event:
    def __init__(self, timing: bool = False) -> None:
        handle = ctypes.c_void_p()
        check(runtime().cudaEventCreateWithFlags(ctypes.byref(handle), 0 if timing else EVENT_DISABLE_TIMING),
              "cudaEventCreate")
        self.ptr = handle.value

    def record(self, stream: Stream) -> None:
        check(runtime().cudaEventRecord(self.ptr, stream.ptr), "cudaEventRecord")

    def synchronize(self) -> None:
        check(runtime().cudaEventSynchronize(self.ptr), "cudaEventSynchronize")

    def elapsed_ms(self, start: "Event") -> float:
        ms = ctypes.c_float(0)
        check(runtime().cudaEventElapsedTime(ctypes.byref(ms), start.ptr, self.ptr), "cudaEventElapsedTime")
        return ms.value

    def close(self) -> None:
        if self.ptr:
            runtime().cudaEventDestroy(self.ptr)
            self.ptr = None


def pinned_h2d_gbps(nbytes: int = 256 << 20, repeats: int = 5) -> dict:
    """Best-of-``repeats`` pinned host->device copy rate, timed with CUDA events (decimal GB/s)."""
    host, device, stream = PinnedBuffer(nbytes), DeviceBuffer(nbytes), Stream()
    start, stop = Event(timing=True), Event(timing=True)
    try:
        host.array[:] = 1
        best = 0.0
        for _ in range(repeats):
            start.record(stream)
            stream.copy_h2d(device.ptr, host.ptr, nbytes)
            stop.record(stream)
            stop.synchronize()
            ms = stop.elapsed_ms(start)
            if ms > 0:
                best = max(best, nbytes / (ms / 1e3) / 1e9)
        return {"what": "pinned host-to-device copy (cudaMemcpyAsync, CUDA events)", "gbps": best, "bytes": nbytes}
    finally:
        for obj in (host, device, stream, start, stop):
            obj.close()


def device_gbps(nbytes: int = 256 << 20, repeats: int = 5) -> dict:
    """Best-of-``repeats`` device memory bandwidth: a device-to-device copy reads and writes each
    byte, so the rate is 2 x nbytes / time (decimal GB/s, CUDA events). What a resident layer's
    decode, which reads its weights once, is bounded by."""
    src, dst, stream = DeviceBuffer(nbytes), DeviceBuffer(nbytes), Stream()
    start, stop = Event(timing=True), Event(timing=True)
    try:
        best = 0.0
        for _ in range(repeats):
            start.record(stream)
            stream.copy_d2d(dst.ptr, src.ptr, nbytes)
            stop.record(stream)
            stop.synchronize()
            ms = stop.elapsed_ms(start)
            if ms > 0:
                best = max(best, 2 * nbytes / (ms / 1e3) / 1e9)
        return {"what": "device-to-device copy (cudaMemcpyAsync, CUDA events; read + write)", "gbps": best,
                "bytes": nbytes}
    finally:
        for obj in (src, dst, stream, start, stop):
            obj.close()
