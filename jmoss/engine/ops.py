"""Which code computes a layer: jmoss.kernels (the CPU fp16-weight path) or plain jittor, and on
how many threads.

The one place the kernel path is chosen; the default weight dtype of ``jmoss.load`` follows the
same answer, so the two can never disagree.
"""

from __future__ import annotations

from types import ModuleType
from typing import Any

from jmoss.errors import JmossError
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


def check_threads(threads: Any) -> int | None:
    """``threads`` as given to jmoss.load / --threads: None (the default) or a whole number >= 1."""
    if threads is None:
        return None
    if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
        raise JmossError(f"threads={threads!r}: give a whole number of threads, at least 1 "
                         "(or leave it out: the CPUs this process may run on)")
    return threads


class ThreadedKernels:
    """jmoss.kernels with a thread count of its own: every op is built under
    ``kernels.configured(threads=...)``, so two models in one process keep their own counts and the
    process default (JMOSS_THREADS, else the CPUs this process may run on) is left alone."""

    def __init__(self, kernels: ModuleType, threads: int):
        self.kernels, self.threads = kernels, threads

    def __getattr__(self, name: str) -> Any:
        fn = getattr(self.kernels, name)
        if not callable(fn):
            return fn

        def call(*args, **kwargs):
            with self.kernels.configured(threads=self.threads):
                return fn(*args, **kwargs)

        return call


def uses_kernels(ops: Any) -> bool:
    """True when ``ops`` computes with jmoss.kernels (directly or with its own thread count)."""
    from jmoss import kernels

    return ops is kernels or isinstance(ops, ThreadedKernels)


def pick_ops(jt: ModuleType, device: str, weight_dtype: str, compute_dtype: str, threads: int | None = None) -> ModelOps:
    """The ModelOps a model computes with: jmoss.kernels where ``cpu_kernels`` says so (on
    ``threads`` threads when given), else JittorOps."""
    kernels = cpu_kernels(device, weight_dtype, compute_dtype)
    if kernels is None:
        return JittorOps(jt)
    return kernels if threads is None else ThreadedKernels(kernels, threads)


def default_weight_dtype(device: str) -> str:
    """float16 (as stored) on cuda, and on cpu when jmoss.kernels reads fp16 weights at memory
    speed; float32 otherwise (jittor's own CPU fp16 matmul is unusably slow, jittor-notes §5)."""
    if device == "cuda":
        return "float16"
    return "float16" if cpu_kernels(device) is not None else "float32"
