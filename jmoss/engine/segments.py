"""The segmented engine: a model run as segments on backends, the hidden state handed across.

Modelled on ggml's backend scheduler (ggml_backend_sched): the forward pass is split into
segments, each assigned to one backend, with the copies between them explicit and counted.

- A ``Segment`` is a run of consecutive layers (or the head) that one backend computes with the
  weights of one source. The segment is the unit: a second GPU would be one more segment in a
  route, not a new engine.
- A backend is one file behind one small interface (``Backend``): ``jmoss.engine.cpu.CpuBackend``
  (jmoss.kernels, float32 activations, host memory) and ``jmoss.engine.cuda.CudaBackend`` (Jittor's
  CUDA ops, the device's memory). Each has its own ``MossModel`` (the same math, its own ops and
  dtype), allocates the KV cache of the layers whose attention it runs, and moves the hidden state
  in and out (``receive``/``send``: the two halves of a hand-off).
- ``SegmentedModel._hand_off`` is the one place data crosses between backends, counted in
  ``HandoffStats``: the hidden state, one row per token (B x T rows of n_embd), and in a large
  chunk the attention inputs and outputs of each layer whose KV cache is on the other side.

Routes. A plan with offload "cpu" (jmoss.placement) has two. A forward of fewer than
``plan.cpu_min_rows`` rows (batch x tokens: decode, short prompt chunks) takes the small route:
the device computes its resident layers, the CPU the cpu/pages-tier layers from host memory,
the head is computed where it lives. A forward of at least that many rows takes the large route:
the device computes every layer, the cpu-tier ones with weights streamed through the device
engine's staging slots (as offload "stream" does every token), while their attention runs on the
CPU against their KV cache, which lives in host RAM whatever the route.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any, Callable, ContextManager, Mapping, Protocol

import numpy as np

from jmoss.config import MossConfig
from jmoss.layout import EMBED, HEAD, Group
from jmoss.model import KVCache, MossModel, Step
from jmoss.placement import CPU_TIERS, Plan
from jmoss.protocols import Weights


class Backend(Protocol):
    """What the engine asks of a backend (see the module docstring)."""

    name: str
    jt: Any
    net: MossModel  # the model's math with this backend's ops and compute dtype
    kv_dtype: str

    def scope(self) -> ContextManager: ...  # the Jittor flags its ops are built and run under

    def receive(self, array: np.ndarray) -> Any: ...  # a host array as one of its Vars

    def send(self, var: Any) -> np.ndarray: ...  # one of its Vars as a host array

    def step(self, step: Step) -> Step: ...  # the per-forward rotary and mask tensors, on it

    def zeros(self, shape: tuple[int, ...], dtype: str) -> Any: ...  # a KV buffer in its memory

    def sync(self) -> None: ...  # everything built so far has run


@dataclasses.dataclass(frozen=True)
class Segment:
    """Layers ``layers`` (and/or the head) computed by ``backend`` with ``weights``; ``kv`` is the
    backend whose memory holds these layers' KV cache when it is not ``backend`` (their attention
    then runs there)."""

    backend: Backend
    weights: Weights
    layers: tuple[int, ...] = ()
    head: bool = False
    kv: Backend | None = None

    def describe(self) -> str:
        what = []
        if self.layers:
            first, last = self.layers[0], self.layers[-1]
            what.append(f"layer {first}" if first == last else f"layers {first}-{last}")
        if self.head:
            what.append("head")
        attend = f" (attention on {self.kv.name})" if self.kv is not None else ""
        return f"{' + '.join(what)} on {self.backend.name}{attend}"


@dataclasses.dataclass
class HandoffStats:
    """What crossed between backends since the last ``reset``, and where the time went.

    ``segment_seconds`` (by backend name) is filled only when the engine is ``timed``: each segment
    is then synced at its end, so its time is its own compute (on the device, through the D2H copy
    of the next hand-off).
    """

    handoffs: int = 0
    bytes: int = 0
    seconds: float = 0.0
    small_forwards: int = 0
    large_forwards: int = 0
    segment_seconds: dict[str, float] = dataclasses.field(default_factory=dict)

    def reset(self) -> None:
        self.__init__()

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _group_segments(entries: list[tuple[Group, Backend, Weights, Backend | None]]) -> list[Segment]:
    """Consecutive layers with the same backend, weights and KV home become one segment; the head
    is always a segment of its own (the engine slices to the last position before it)."""
    segments: list[Segment] = []
    for g, backend, weights, kv in entries:
        last = segments[-1] if segments else None
        if g == HEAD:
            segments.append(Segment(backend, weights, head=True))
        elif last is not None and not last.head and (last.backend, last.weights, last.kv) == (backend, weights, kv):
            segments[-1] = dataclasses.replace(last, layers=last.layers + (g,))
        else:
            segments.append(Segment(backend, weights, layers=(g,), kv=kv))
    return segments


class _AttentionAt:
    """A backend's ops, with attention run on the backend that holds the layer's KV cache.

    Used in the large route for cpu-tier layers: the device computes their Linears with streamed
    weights, the CPU their attention on its float32 cache; the qkv and the merged heads cross
    through the engine's hand-off. ``decode_block`` is absent: the fused layer would attend here.
    """

    decode_block = None

    def __init__(self, ops, engine: "SegmentedModel", here: Backend, home: Backend) -> None:
        self._ops, self._engine, self._here, self._home = ops, engine, here, home

    def __getattr__(self, name: str):
        return getattr(self._ops, name)

    def attention(self, qkv, keys, values, sin, cos, attn_bias, start: int, rotary_dim: int):
        engine, home = self._engine, self._home
        qkv_home = engine._hand_off(qkv, self._here, home)
        step = engine._step_for(home)
        with home.scope():
            merged = home.net.ops.attention(qkv_home, keys, values, step.sin, step.cos, step.attn_bias, start,
                                            rotary_dim)
        return engine._hand_off(merged, home, self._here)


class SegmentedModel:
    """MossModel's forward run as segments on backends; ``forward`` and ``new_cache`` are what a
    Session and the batch runner call (jmoss.protocols.Net)."""

    def __init__(self, config: MossConfig, device: Backend, small: list[Segment], large: list[Segment] | None,
                 min_rows: int | None, kv_home: Mapping[int, Backend]) -> None:
        self.config, self.device = config, device
        self.routes = {"small": small, "large": large or []}
        self.min_rows = min_rows if large else None
        self.kv_home = dict(kv_home)
        self.stats = HandoffStats()
        self.timed = False  # sync each segment at its end and record its time (benchmarks)
        self._nets: dict[tuple[int, int], MossModel] = {}
        self._steps: dict[int, Step] = {}
        self._step: Step | None = None

    @classmethod
    def from_plan(cls, config: MossConfig, plan: Plan, device: Backend, host: Backend, device_weights: Weights,
                  host_weights: Weights) -> "SegmentedModel":
        """Both routes of an offload-cpu plan: who computes each group, with which weights."""
        where = {p.group: p.where for p in plan.placements}
        layers = list(range(config.n_layer))

        def on_cpu(g: Group) -> bool:
            return where[g] in CPU_TIERS

        small = _group_segments([(g, host, host_weights, None) if on_cpu(g) else (g, device, device_weights, None)
                                 for g in layers + [HEAD]])
        large = None
        if plan.cpu_min_rows is not None:
            large = _group_segments([(g, device, device_weights, host if g != HEAD and on_cpu(g) else None)
                                     for g in layers + [HEAD]])
        return cls(config, device, small, large, plan.cpu_min_rows, {i: host if on_cpu(i) else device for i in layers})

    # ---- what a Session calls -------------------------------------------------------------
    def new_cache(self, batch: int, max_len: int, dtype: str) -> KVCache:
        """Each layer's keys and values in the memory of the backend that runs its attention: the
        device's in ``dtype``, the CPU's in its own (float32, what its kernels read)."""
        shape_of = (batch, self.config.n_head, max_len, self.config.head_dim)
        keys, values = [], []
        for i in range(self.config.n_layer):
            home = self.kv_home[i]
            kv_dtype = dtype if home is self.device else home.kv_dtype
            keys.append(home.zeros(shape_of, kv_dtype))
            values.append(home.zeros(shape_of, kv_dtype))
        return KVCache.of_layers(keys, values, batch, max_len, dtype)

    def forward(self, embeddings: np.ndarray, layer_weights: Callable | None, head_weights: Callable | None,
                cache: KVCache, step: Step, last_only: bool = False, logits: bool = True, tail: int | None = None):
        """MossModel.forward's contract, by segments (``tail``: the last positions a batch step
        with verify passes keeps, jmoss.lookup). ``layer_weights``/``head_weights`` (the Model's
        ``HybridWeights``) are not used: each segment reads its own source."""
        batch, length = embeddings.shape[:2]
        large = self.min_rows is not None and batch * length >= self.min_rows
        route = self.routes["large" if large else "small"]
        if large:
            self.stats.large_forwards += 1
        else:
            self.stats.small_forwards += 1
        self._step, self._steps = step, {}
        h, at = embeddings, None
        for segment in route:
            backend = segment.backend
            if segment.head and (tail or last_only):
                with at.scope():
                    h = h[:, -(tail or 1):, :]  # only the rows the head must read cross to it, not the chunk
            if backend is not at:
                h = self._hand_off(h, at, backend)
                at = backend
            t0 = time.perf_counter()
            net = self._net(segment)
            seg_step = self._step_for(backend)
            with backend.scope():
                for i in segment.layers:
                    h = net.block(h, segment.weights.layer(i), i, cache, seg_step)
                if segment.head:
                    w = segment.weights.head()  # taken even without logits: a streaming source's order holds
                    if logits:
                        h = net.head(h, w)
                if self.timed:
                    backend.sync()
            if self.timed:
                self.stats.segment_seconds[backend.name] = (self.stats.segment_seconds.get(backend.name, 0.0)
                                                            + time.perf_counter() - t0)
        self._step, self._steps = None, {}
        return h

    # ---- internals ------------------------------------------------------------------------
    def _net(self, segment: Segment) -> MossModel:
        """The backend's own model, or (attention elsewhere) one whose ops send attention home."""
        if segment.kv is None:
            return segment.backend.net
        key = (id(segment.backend), id(segment.kv))
        if key not in self._nets:
            here = segment.backend
            ops = _AttentionAt(here.net.ops, self, here, segment.kv)
            self._nets[key] = MossModel(here.jt, self.config, ops, here.net.dtype)
        return self._nets[key]

    def _step_for(self, backend: Backend) -> Step:
        if id(backend) not in self._steps:
            self._steps[id(backend)] = backend.step(self._step)
        return self._steps[id(backend)]

    def _hand_off(self, value, source: Backend | None, target: Backend):
        """The one crossing between backends: ``source``'s Var (or, from the host, an array) to
        ``target``'s Var, counted."""
        t0 = time.perf_counter()
        array = value if source is None else source.send(value)
        out = target.receive(array)
        self.stats.handoffs += 1
        self.stats.bytes += int(array.nbytes)
        self.stats.seconds += time.perf_counter() - t0
        return out

    def describe(self) -> str:
        lines = []
        for name, route in self.routes.items():
            if route:
                when = (f"forwards of {self.min_rows}+ rows" if name == "large" else
                        f"forwards under {self.min_rows} rows" if self.min_rows else "every forward")
                lines.append(f"{when}: " + " -> ".join(s.describe() for s in route))
        return "\n".join(lines)


class HybridWeights:
    """The weight sources of an offload-cpu model seen as one (jmoss.protocols.Weights): ``layer``
    and ``head`` give what the small route computes with; ``memory``, ``stats`` and ``close`` cover
    both sides and the backends' hand-off buffers. ``device`` is the device engine (resident groups,
    and the slots large chunks stream through), ``host`` the CPU's (jmoss.engine.cpu.HostWeights)."""

    def __init__(self, plan: Plan, device: Any, host: Any, backends: list | None = None) -> None:
        self.device, self.host = device, host
        self._backends = list(backends or [])  # backends holding buffers of their own (the hand-off)
        self._on_cpu = {p.group for p in plan.placements if p.where in CPU_TIERS and p.group != EMBED}

    def layer(self, i: int) -> Mapping:
        return (self.host if i in self._on_cpu else self.device).layer(i)

    def head(self) -> Mapping:
        return (self.host if HEAD in self._on_cpu else self.device).head()

    @property
    def stats(self):
        """The device engine's streaming figures (large chunks); the hand-offs are the net's."""
        return self.device.stats

    @property
    def load_memory(self) -> dict | None:
        return getattr(self.device, "load_memory", None)

    def memory(self) -> dict[str, int]:
        out = {**self.device.memory(), **self.host.memory()}
        for backend in self._backends:
            out.update(backend.memory())
        return out

    def close(self) -> None:
        for side in (self.device, self.host, *self._backends):
            close = getattr(side, "close", None)
            if close is not None:
                close()
