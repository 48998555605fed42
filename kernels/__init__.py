"""jmoss's own compute kernels, installed as ``jmoss.kernels``.

``cpu`` holds the fp16-weight linear layers (GEMV for decode, blocked GEMM for prefill, fused
bias + gelu_new) that make CPU decoding run at memory speed; its docstring is the API contract.
"""

from jmoss.kernels.cpu import available, configured, info, isa_path, linear, memory_read_probe, threads_used

__all__ = ["available", "configured", "info", "isa_path", "linear", "memory_read_probe", "threads_used"]
