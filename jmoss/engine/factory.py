"""Which weight source executes a plan: the one module that knows every backend.

The backends import the pipeline, never this module, so choosing one never imports itself.
"""

from __future__ import annotations

from types import ModuleType
from typing import Any

from jmoss.engine.cpu import StreamingWeights
from jmoss.engine.cuda import CudaStreamingWeights
from jmoss.placement import Plan


def build_weights(store, plan: Plan, jt: ModuleType, dtype: str) -> Any:
    """The streaming weight source for a plan: the CPU engine, or the CUDA one (cupy is imported
    only when that one is built)."""
    if plan.device == "cuda":
        return CudaStreamingWeights(store, plan, jt, dtype)
    return StreamingWeights(store, plan, jt, dtype)
