"""Which code computes a layer: jmoss.kernels (the CPU fp16-weight path) or plain jittor.

The one place the kernel path is chosen; the default weight dtype of ``jmoss.load`` follows the
same answer, so the two can never disagree.
"""

from __future__ import annotations

from types import ModuleType

from jmoss.model import JittorOps, ModelOps


def cpu_kernels(device: str, weight_dtype: str = "float16", compute_dtype: str = "float32") -> ModuleType | None:
    """jmoss.kernels when it computes this combination here (CPU, fp16 weights, fp32 activations,
    and its self-check passes on this CPU), else None."""
    if device != "cpu" or weight_dtype != "float16" or compute_dtype != "float32":
        return None
    try:
        from jmoss import kernels  # an install without the compiled kernels still runs plain jittor
    except ImportError:
        return None
    return kernels if hasattr(kernels, "linear") and kernels.available() else None


def pick_ops(jt: ModuleType, device: str, weight_dtype: str, compute_dtype: str) -> ModelOps:
    """The ModelOps a model computes with: jmoss.kernels where ``cpu_kernels`` says so, else JittorOps."""
    return cpu_kernels(device, weight_dtype, compute_dtype) or JittorOps(jt)


def default_weight_dtype(device: str) -> str:
    """float16 (as stored) on cuda, and on cpu when jmoss.kernels reads fp16 weights at memory
    speed; float32 otherwise (jittor's own CPU fp16 matmul is unusably slow, jittor-notes §5)."""
    if device == "cuda":
        return "float16"
    return "float16" if cpu_kernels(device) is not None else "float32"
