"""``GET /metrics``: the server and its model in Prometheus' text format, through prometheus-client.

Each app has its own registry (two servers in one process do not mix). Requests are counted by
route and status in a middleware that sits outside authentication, so refused keys are counted
too; the route label is one of the server's own routes or "other", so a scanner cannot grow the
label set. Everything else is read when scraped: the model's generation counters and latency
histograms (jmoss.stats, the same object a Python API user reads as ``model.stats``), the worker's
queue and batch, the KV positions its caches hold, and the engine's streamed bytes.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Awaitable, Callable, Iterator

if TYPE_CHECKING:
    from jmoss.server.worker import Worker
    from jmoss.session import TextModel

ROUTES = frozenset({"/", "/health", "/metrics", "/v1/models", "/v1/chat/completions", "/v1/completions"})


class Metrics:
    """The app's registry: a request counter fed by :meth:`middleware`, the rest collected from the model."""

    def __init__(self, model: "TextModel", worker: "Worker"):
        from prometheus_client import CollectorRegistry, Counter

        self.registry = CollectorRegistry(auto_describe=True)
        self.requests = Counter("jmoss_requests", "HTTP requests answered, by route and status",
                                ["route", "status"], registry=self.registry)
        self.registry.register(_ModelCollector(model, worker))

    def render(self) -> tuple[bytes, str]:
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        return generate_latest(self.registry), CONTENT_TYPE_LATEST

    def middleware(self, app: Any) -> Callable:
        """ASGI middleware counting every HTTP response by route and status (500 for an exception)."""
        requests = self.requests

        async def counted(scope: dict, receive: Callable[[], Awaitable[dict]], send: Callable) -> None:
            if scope["type"] != "http":
                await app(scope, receive, send)
                return
            route = scope["path"] if scope["path"] in ROUTES else "other"
            status: list[int] = []

            async def watch(message: dict) -> None:
                if message["type"] == "http.response.start" and not status:
                    status.append(message["status"])
                    requests.labels(route, str(message["status"])).inc()
                await send(message)

            try:
                await app(scope, receive, watch)
            except BaseException:
                if not status:
                    requests.labels(route, "500").inc()
                raise

        return counted


class _ModelCollector:
    """Reads the model's stats, the worker and the engine at scrape time."""

    def __init__(self, model: "TextModel", worker: "Worker"):
        self.model, self.worker = model, worker

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
        from prometheus_client.utils import floatToGoString

        def histogram(name: str, doc: str, buckets: list[tuple[float, int]], total: float) -> Any:
            return HistogramMetricFamily(name, doc, buckets=[(floatToGoString(b), n) for b, n in buckets],
                                         sum_value=total)

        stats = getattr(self.model, "stats", None)
        if stats is not None:
            s = stats.snapshot()
            for name, key, doc in (
                ("jmoss_prompt_tokens", "prompt_tokens", "prompt tokens prefilled (cached prefixes not counted)"),
                ("jmoss_completion_tokens", "completion_tokens", "tokens generated"),
                ("jmoss_generations", "generations", "generation passes run (a plugin turn runs two)"),
                ("jmoss_constrained_generations", "constrained", "generations under a token mask (JSON schema, tool choice)"),
                ("jmoss_prefix_cache_hits", "prefix_cache_hits", "generations that reused cached positions of their prefix"),
                ("jmoss_prefix_cache_tokens", "prefix_cache_tokens", "prompt positions served from the cache, not computed"),
            ):
                yield CounterMetricFamily(name, doc, value=s[key])
            yield GaugeMetricFamily("jmoss_running_sequences", "sequences being generated now (the running batch)",
                                    value=s["running"])
            hist = stats.histograms()
            yield histogram("jmoss_time_to_first_token_seconds", "prefill start to the first sampled token",
                            *hist["ttft"])
            yield histogram("jmoss_time_per_output_token_seconds", "mean time per token after the first, per generation",
                            *hist["tpot"])
        w = self.worker
        yield histogram("jmoss_queue_wait_seconds", "time a request waited for the model before it started",
                        w.queue_wait.cumulative(), w.queue_wait.sum)
        yield GaugeMetricFamily("jmoss_queue_depth", "requests waiting for the model", value=w.waiting)
        yield GaugeMetricFamily("jmoss_running_requests", "requests the model is working on", value=w.running)
        used, capacity = w.kv_positions()
        yield GaugeMetricFamily("jmoss_kv_positions_in_use", "KV cache positions holding a sequence's tokens", value=used)
        yield GaugeMetricFamily("jmoss_kv_positions_capacity", "KV cache positions the memory plan allocated",
                                value=capacity)
        engine = getattr(getattr(self.model, "weights", None), "stats", None)
        streamed = float(getattr(engine, "bytes_per_forward", 0.0) or 0.0)
        yield GaugeMetricFamily("jmoss_streamed_bytes_per_token",
                                "weight bytes streamed to the device per forward (0: every weight resident)",
                                value=streamed)
        yield CounterMetricFamily("jmoss_streamed_bytes", "weight bytes streamed to the device",
                                  value=float(getattr(engine, "bytes_consumed", 0) or 0))
