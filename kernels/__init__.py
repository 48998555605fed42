"""jmoss's own compute kernels, installed as ``jmoss.kernels``.

``cpu`` holds the fp16-weight linear layers (GEMV for decode; for prefill an AMX-BF16 "bf16x3" GEMM
where the CPU has AMX, else a blocked fp32 GEMM; fused bias + gelu_new) that make CPU decoding run at
memory speed, plus the fused LayerNorm and attention, and ``decode_block``, a whole layer as one op for decode steps;
its docstring is the API contract.
"""

from jmoss.kernels.cpu import (amx_prefill, amx_ready, attention, available, configured, decode_block, info, isa_path,
                               layer_norm, linear, memory_read_probe, q8_decode_ready, q8_vnni_ready, quant_compute,
                               quant_linear, threads_used, vnni_ready)

__all__ = ["amx_prefill", "amx_ready", "attention", "available", "configured", "decode_block", "info", "isa_path",
           "layer_norm", "linear", "memory_read_probe", "q8_decode_ready", "q8_vnni_ready", "quant_compute",
           "quant_linear", "threads_used", "vnni_ready"]
