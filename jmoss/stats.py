"""What a model has generated: token counters and latency histograms, for the Python API and /metrics.

Every generation passes :func:`jmoss.generation.generate_ids`, which records into the model's
``stats`` (a :class:`Stats`), so ``model.stats.snapshot()`` in a script and ``GET /metrics`` on a
server read the same numbers. Times are measured inside generation: time to first token runs
from the start of the prefill to the first sampled id (a server's queue wait is measured apart),
time per output token is the mean step time after that first token, one observation per
generation.
"""

from __future__ import annotations

import bisect
import threading
import time
from dataclasses import dataclass, field

# Bucket bounds in seconds: a first token takes ~20 ms (350M, resident) to minutes (16B streamed
# from disk with a long prompt); a decode step ~5 ms to several seconds.
TTFT_BUCKETS = (0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
TPOT_BUCKETS = (0.005, 0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28, 2.56, 5.12, 10.24)


@dataclass
class Histogram:
    """Observations counted per bucket (``counts[i]``: values <= ``bounds[i]``, the last one +Inf)."""

    bounds: tuple[float, ...]
    counts: list[int] = field(default_factory=list)
    sum: float = 0.0

    def __post_init__(self) -> None:
        self.counts = [0] * (len(self.bounds) + 1)

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.bounds, value)] += 1
        self.sum += value

    @property
    def count(self) -> int:
        return sum(self.counts)

    def cumulative(self) -> list[tuple[float, int]]:
        """(upper bound, observations <= it) per bucket, the last bound +Inf: Prometheus' form."""
        out, total = [], 0
        for bound, n in zip((*self.bounds, float("inf")), self.counts):
            total += n
            out.append((bound, total))
        return out


class Run:
    """One generation in progress (a call of generate_ids): when it started, its first and last token."""

    def __init__(self, stats: "Stats", rows: int):
        self.stats, self.rows = stats, rows
        self.start = time.perf_counter()
        self.first: float | None = None
        self.last = 0.0
        self.steps = 0

    def step(self, tokens: int) -> None:
        """A sampling step produced ``tokens`` ids (one per row still generating)."""
        now = time.perf_counter()
        if self.first is None:
            self.first = now
        self.last, self.steps = now, self.steps + 1
        self.stats._tokens_out(tokens, None if self.steps > 1 else now - self.start)

    def end(self) -> None:
        self.stats._end(self)


class Stats:
    """Counters of one model's generations; thread-safe (a batched server generates in many threads).

    ``running``: rows being generated now (the running batch); ``prefix_cache_hits``: generations
    that started on a cache already holding a prefix of their sequence (``prefix_cache_tokens``
    of them in all, positions not computed again); ``constrained``: generations under a
    token mask (jmoss.constraints).
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.generations = 0
        self.running = 0
        self.prompt_tokens = 0
        self.completion_tokens = 0
        self.prefix_cache_hits = 0
        self.prefix_cache_tokens = 0
        self.constrained = 0
        self.ttft = Histogram(TTFT_BUCKETS)
        self.tpot = Histogram(TPOT_BUCKETS)

    def begin(self, rows: int, prompt_tokens: int, cached: int, constrained: bool) -> Run:
        """A generation of ``rows`` sequences starts: ``prompt_tokens`` to prefill after ``cached`` reused."""
        with self._lock:
            self.generations += 1
            self.running += rows
            self.prompt_tokens += prompt_tokens
            self.constrained += constrained
            if cached:
                self.prefix_cache_hits += 1
                self.prefix_cache_tokens += cached
        return Run(self, rows)

    def _tokens_out(self, n: int, ttft: float | None) -> None:
        with self._lock:
            self.completion_tokens += n
            if ttft is not None:
                self.ttft.observe(ttft)

    def _end(self, run: Run) -> None:
        with self._lock:
            self.running -= run.rows
            if run.steps > 1 and run.first is not None:
                self.tpot.observe((run.last - run.first) / (run.steps - 1))

    def snapshot(self) -> dict:
        """Every counter, and each histogram as count, sum and mean, in one consistent read."""
        with self._lock:
            out = {k: getattr(self, k) for k in ("generations", "running", "prompt_tokens", "completion_tokens",
                                                 "prefix_cache_hits", "prefix_cache_tokens", "constrained")}
            for name in ("ttft", "tpot"):
                h: Histogram = getattr(self, name)
                out[f"{name}_count"], out[f"{name}_sum"] = h.count, h.sum
                out[f"{name}_mean"] = h.sum / h.count if h.count else None
            return out

    def histograms(self) -> dict[str, tuple[list[tuple[float, int]], float]]:
        """Each histogram's cumulative buckets and sum (for the Prometheus exporter)."""
        with self._lock:
            return {name: (getattr(self, name).cumulative(), getattr(self, name).sum) for name in ("ttft", "tpot")}
