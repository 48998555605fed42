"""Execution of a placement plan: where each layer's weights come from, and what computes with them.

- ``pipeline``: the device-agnostic streaming core (``StreamPipeline``, ``read_span``, ``EngineStats``);
- ``cpu``: the CPU backend, ``StreamingWeights`` (owned buffers, zero-copy Vars), and the CPU side of
  the segmented engine (``CpuBackend``, ``HostWeights``, the ``kernel_rates`` probe);
- ``cuda``: the CUDA backend, ``CudaStreamingWeights`` (pinned host buffers, copies on a side stream,
  the CUDA runtime through ctypes), ``CudaResidentWeights`` (an all-resident model read into device
  memory) and ``CudaBackend`` (the device's side of the segmented engine);
- ``swap``: Jittor's own swap, ``JittorSwapWeights`` (the baseline bench compares against);
- ``resident``: ``ResidentWeights``, every weight a Var for the whole run;
- ``segments``: ``SegmentedModel``, a model run as segments on backends (offload "cpu": the CPU
  computes the layers the card cannot hold), the hand-off between them in one place;
- ``factory``: ``build_weights`` and ``build_hybrid``, the only module that knows every backend, and
  ``measure_figures``, the probes an offload choice is made from;
- ``ops``: the kernel choice (jmoss.kernels or plain jittor), made once.

Importing this package imports neither jittor nor the CUDA runtime (and jmoss never imports cupy).
"""

from jmoss.engine.cpu import CpuBackend, HostWeights, StreamingWeights, widen_in_place, wrap_zero_copy
from jmoss.engine.factory import build_hybrid, build_weights, measure_figures
from jmoss.engine.segments import HybridWeights, SegmentedModel
from jmoss.engine.pipeline import EngineStats, StreamPipeline, read_span, rss_bytes, store_files
from jmoss.engine.resident import ResidentWeights
from jmoss.engine.swap import JittorSwapWeights

__all__ = [
    "CpuBackend", "EngineStats", "HostWeights", "HybridWeights", "JittorSwapWeights", "ResidentWeights",
    "SegmentedModel", "StreamPipeline", "StreamingWeights", "build_hybrid", "build_weights", "measure_figures",
    "read_span", "rss_bytes", "store_files", "widen_in_place", "wrap_zero_copy",
]
