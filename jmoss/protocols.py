"""The small interfaces lower stages need from a loaded model, so none imports the facade above.

``jmoss.api.Model`` satisfies them; a Session, the batch runner and the engine's weight sources
are written against these, never against ``Model`` (STYLE: a module imports only from the stages
before it). ``TextModel``, the text-level view that also opens sessions, is in ``jmoss.session``
beside the ``Session`` it returns.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Mapping, Protocol

import numpy as np

if TYPE_CHECKING:
    from types import ModuleType

    from jmoss.config import MossConfig
    from jmoss.model import KVCache, Step
    from jmoss.placement import Plan


class Weights(Protocol):
    """A weight source (``jmoss.engine``): one layer's, or the head's, tensors as jittor Vars."""

    def layer(self, i: int) -> Mapping[str, Any]: ...

    def head(self) -> Mapping[str, Any]: ...


class Net(Protocol):
    """The model's forward over a KV cache: ``jmoss.model.MossModel``, or the segmented engine
    (``jmoss.engine.segments.SegmentedModel``) that runs it on two backends."""

    def new_cache(self, batch: int, max_len: int, dtype: str) -> KVCache: ...

    def forward(self, embeddings: np.ndarray, layer_weights: Any, head_weights: Any, cache: KVCache, step: Step,
                last_only: bool = False, logits: bool = True, tail: int | None = None) -> Any: ...


class ForwardModel(Protocol):
    """What running a forward pass over a KV cache reads of a model (Session, BatchRunner)."""

    config: MossConfig
    jt: ModuleType
    compute_dtype: str
    rotary: tuple[np.ndarray, np.ndarray]
    net: Net
    weights: Weights
    plan: Plan | None  # the memory plan the KV cache must stay inside; None: built without one

    def embed(self, ids: np.ndarray) -> np.ndarray: ...
