"""Which weight source executes a plan: the one module that knows every backend.

The backends import the pipeline, never this module, so choosing one never imports itself.
For an offload-cpu plan it builds both sides of the segmented engine (``build_hybrid``), and it
measures the figures that plan is chosen with (``measure_figures``).
"""

from __future__ import annotations

from types import ModuleType
from typing import Any

from jmoss import layout
from jmoss.config import MossConfig
from jmoss.engine.cpu import CpuBackend, HostWeights, StreamingWeights, kernel_rates
from jmoss.engine.cuda import CudaBackend, CudaResidentWeights, CudaStreamingWeights
from jmoss.engine.segments import HybridWeights, SegmentedModel
from jmoss.errors import DeviceError
from jmoss.placement import Figures, Plan


def build_weights(store, plan: Plan, jt: ModuleType, dtype: str) -> Any:
    """The weight source for a plan: the CPU streaming engine, or on cuda the streaming engine, or
    (nothing streamed) every group read from the store straight into device memory."""
    if plan.hybrid:
        raise DeviceError("an offload-cpu plan runs on two backends: build it with build_hybrid")
    if plan.device == "cuda":
        if not plan.streams:
            return CudaResidentWeights(store, jt, dtype)
        return CudaStreamingWeights(store, plan, jt, dtype)
    return StreamingWeights(store, plan, jt, dtype)


def build_hybrid(store, plan: Plan, jt: ModuleType, dtype: str, *, compute_dtype: str = "float16",
                 device: Any = None, host: CpuBackend | None = None) -> tuple[HybridWeights, SegmentedModel]:
    """The weights and the segmented model of an offload-cpu plan.

    The device side is ``CudaBackend`` with ``CudaStreamingWeights`` (resident groups, the pinned
    cpu-tier buffers the CPU computes from, the slots large chunks stream through), the host side
    ``CpuBackend`` with ``HostWeights`` over those same pinned buffers. ``device`` may be a
    ``CpuBackend`` standing in for the device (the engine's tests): its weights are then the CPU
    streaming engine's, and the host side reads the cpu-tier groups itself.
    """
    if not plan.hybrid:
        raise DeviceError("build_hybrid runs offload-cpu plans (plan.hybrid); use build_weights")
    config = store.config
    host = host or CpuBackend(jt, config)
    if device is None:
        device = CudaBackend(jt, config, plan, compute_dtype=compute_dtype)
    if isinstance(device, CpuBackend):
        device_weights, held, backends = StreamingWeights(store, plan, jt, dtype), None, []
    else:
        device_weights = CudaStreamingWeights(store, plan, jt, dtype)
        held, backends = device_weights.held, [device]
    host_weights = HostWeights(store, plan, host, held)
    net = SegmentedModel.from_plan(config, plan, device, host, device_weights, host_weights)
    return HybridWeights(plan, device_weights, host_weights, backends), net


_measured: dict[Any, Figures] = {}


def measure_figures(jt: ModuleType, config: MossConfig) -> Figures:
    """What the offload choice reads (once per process and weight format): pinned H2D GB/s and the
    device's bandwidth (jmoss.cuda_runtime), the CPU kernels' GEMV GB/s and GEMM GFLOP/s on this
    store's format (jmoss.engine.cpu.kernel_rates). A probe the runtime cannot time (0) is None."""
    key = (layout.packed_bits(config), config.groupsize)
    if key not in _measured:
        from jmoss import cuda_runtime

        link = cuda_runtime.pinned_h2d_gbps()["gbps"]
        device = cuda_runtime.device_gbps()["gbps"]
        cpu = kernel_rates(jt, config)
        _measured[key] = Figures(link_gbps=link or None, cpu_gbps=cpu["gbps"] or None, cpu_gflops=cpu["gflops"] or None,
                                 device_gbps=device or None, source="measured at load")
    return _measured[key]
