"""Which weight source executes a plan: the one module that knows every backend.

The backends import the pipeline, never this module, so choosing one never imports itself.
"""

from __future__ import annotations

from types import ModuleType
from typing import Any

from jmoss.engine.cpu import StreamingWeights
from jmoss.engine.cuda import CudaResidentWeights, CudaStreamingWeights
from jmoss.placement import Plan


def build_weights(store, plan: Plan, jt: ModuleType, dtype: str) -> Any:
    """The weight source for a plan: the CPU streaming engine, or on cuda the streaming engine, or
    (nothing streamed) every group read from the store straight into device memory."""
    if plan.device == "cuda":
        if not plan.streams:
            return CudaResidentWeights(store, jt, dtype)
        return CudaStreamingWeights(store, plan, jt, dtype)
    return StreamingWeights(store, plan, jt, dtype)
