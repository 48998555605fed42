"""Execution of a placement plan: where each layer's weights come from, and what computes with them.

- ``pipeline``: the device-agnostic streaming core (``StreamPipeline``, ``read_span``, ``EngineStats``);
- ``cpu``: the CPU backend, ``StreamingWeights`` (owned buffers, zero-copy Vars);
- ``cuda``: the CUDA backend, ``CudaStreamingWeights`` (pinned host buffers, copies on a side stream,
  the CUDA runtime through ctypes) and ``CudaResidentWeights`` (an all-resident model read into device memory);
- ``swap``: Jittor's own swap, ``JittorSwapWeights`` (the baseline bench compares against);
- ``resident``: ``ResidentWeights``, every weight a Var for the whole run;
- ``factory``: ``build_weights``, the only module that knows every streaming backend;
- ``ops``: the kernel choice (jmoss.kernels or plain jittor), made once.

Importing this package imports neither jittor nor the CUDA runtime (and jmoss never imports cupy).
"""

from jmoss.engine.cpu import StreamingWeights, widen_in_place, wrap_zero_copy
from jmoss.engine.factory import build_weights
from jmoss.engine.pipeline import EngineStats, StreamPipeline, read_span, rss_bytes, store_files
from jmoss.engine.resident import ResidentWeights
from jmoss.engine.swap import JittorSwapWeights

__all__ = [
    "EngineStats", "JittorSwapWeights", "ResidentWeights", "StreamPipeline", "StreamingWeights", "build_weights",
    "read_span", "rss_bytes", "store_files", "widen_in_place", "wrap_zero_copy",
]
