"""``jmoss serve MODEL --ray [ADDRESS] --replicas N``: jmoss as a Ray Serve application.

    serve_ray("fnlp/moss-moon-003-sft", replicas=4, replica_gpus=1, device="cuda")   # blocks, like serve()

N replicas of :class:`ModelReplica` (a Ray Serve deployment), each one loaded model with its own
budget, worker and continuous batching, and the single-process app (:func:`create_app`) answering
the requests forwarded to it, so limits, error shapes, streaming and the page are the same code.
One HTTP front (:func:`create_front`, on the same :func:`base_app` and the same uvicorn protocol,
:func:`jmoss.server.transport.run_app`) reads each request, names its affinity keys and forwards
it through a Ray Serve handle, whose router (:class:`jmoss.server.ray_router.AffinityRouter`)
picks the replica: a uid conversation's, or the one whose cache holds the prompt's prefix.

Failures. The front keeps every uid conversation's transcript (ids and texts, bounded like the
worker's sessions) and ships it with each turn; a replica whose copy differs rebuilds the
conversation from it (one prefill of the history), so a killed replica loses KV caches, never a
conversation. A non-streamed request whose replica dies is sent once more (the router no longer
offers the dead replica); a streamed one whose replica dies after its first event ends with an
SSE error event and no ``[DONE]``. Ray Serve's controller restarts dead replicas; ``/health``
says how many are up. Ray itself (the cluster, health checks, restarts, queue-length probes,
back-pressure) is used as it is: this module adds no cluster manager and no failure detector.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import math
import os
import secrets
import time
import uuid
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, AsyncIterator, Sequence

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from jmoss.errors import JmossError
from jmoss.server.ray_router import Routed
from jmoss.server.routes import ClientGone, _client_gone, _Counted, _read_body, _wait_for_disconnect, base_app
from jmoss.server.schemas import ServerRequestError, error_response

if TYPE_CHECKING:
    from ray.serve.handle import DeploymentHandle

log = logging.getLogger("jmoss.server")

APP_NAME = "jmoss"  # the Ray Serve application; its deployment is ModelReplica
REPLICA_HEADER = "x-jmoss-replica"  # which replica answered (Ray Serve's replica id)
PREFILL_HEADER = "x-jmoss-prefilled-tokens"  # a uid turn's prefilled tokens (its own, or the history too)
_BODY_SLACK = 256  # the front may write a uid into a body it has already bounded


class RayClusterError(JmossError):
    """Ray is not installed, the cluster cannot be reached, or the deployment failed."""


@dataclass
class Forwarded:
    """One HTTP request as the front hands it to a replica (plain data: Ray pickles it)."""

    method: str
    path: str
    query_string: bytes
    headers: list[tuple[bytes, bytes]]
    client: tuple[str, int] | None
    body: bytes
    uid: str | None = None  # a uid turn: the conversation the replica continues (or creates, transcript None)
    transcript: dict | None = None
    routed: Routed = field(default_factory=Routed)  # what AffinityRouter reads


# -- the replica -------------------------------------------------------------------------------------
class ModelReplica:
    """One Ray Serve replica: a model loaded under its budget and the single-process app over it.

    ``model`` is a store path or a converted name (resolved on the replica's node), ``load`` the
    keywords of :func:`jmoss.load`, ``app`` those of :func:`create_app`. ``threads`` sets the
    kernels' thread count (the CPUs Ray granted the replica, by default).
    """

    def __init__(self, model: str, load: dict, app: dict, threads: int | None = None):
        from ray import serve

        import jmoss
        from jmoss.server.routes import create_app

        if threads:
            os.environ["JMOSS_THREADS"] = str(threads)
        self.app = create_app(jmoss.load(model, **load), **app)
        self.worker = self.app.state.worker
        self.replica = serve.get_replica_context().replica_id.unique_id
        self._header = (REPLICA_HEADER.encode(), self.replica.encode())

    async def __call__(self, request: Forwarded) -> AsyncIterator[dict]:
        """Run the app on ``request``; yield its ASGI messages, then a ``jmoss.trailer`` message
        with the uid conversation's transcript (when it was one)."""
        new = False
        if request.uid is not None:
            new = self.worker.offer(request.uid, request.transcript) and request.transcript is None
        messages: asyncio.Queue = asyncio.Queue()
        gone = asyncio.Event()
        sent_body = False
        status = 0

        async def receive() -> dict:
            nonlocal sent_body
            if not sent_body:
                sent_body = True
                return {"type": "http.request", "body": request.body, "more_body": False}
            await gone.wait()  # the front cancelled us: its client has gone
            return {"type": "http.disconnect"}

        async def send(message: dict) -> None:
            await messages.put(message)

        scope = {"type": "http", "asgi": {"version": "3.0", "spec_version": "2.3"}, "http_version": "1.1",
                 "method": request.method, "scheme": "http", "path": request.path,
                 "raw_path": request.path.encode(), "root_path": "", "query_string": request.query_string,
                 "headers": request.headers, "client": request.client, "server": None, "state": {}}
        task = asyncio.ensure_future(self.app(scope, receive, send))
        task.add_done_callback(lambda _: messages.put_nowait(None))
        try:
            while (message := await messages.get()) is not None:
                if message["type"] == "http.response.start":
                    status = message["status"]
                    message = {**message, "headers": [*message.get("headers", ()), self._header]}
                yield message
            with contextlib.suppress(Exception):  # the app answered 500 and logged it already
                task.result()
        finally:
            if not task.done():
                gone.set()  # the app's handlers see a disconnect and cancel their job
                await asyncio.wait({task}, timeout=2)
                task.cancel()
        if request.uid is not None:
            if status != 200 and new:
                self.worker.forget(request.uid)  # the client never learns this uid
            found = self.worker.transcript(request.uid) if status == 200 else None
            yield {"type": "jmoss.trailer", "transcript": found[0] if found else None,
                   "prefilled_tokens": found[1].prefilled_tokens if found and found[1] else None}

    def __del__(self) -> None:
        worker = getattr(self, "worker", None)
        if worker is not None:
            worker.stop()


# -- the front ---------------------------------------------------------------------------------------
class Transcripts:
    """uid -> the conversation's transcript, LRU-bounded and dropped after ``ttl`` idle seconds, as
    the single-process worker bounds its sessions (so the same --session-limit/--session-ttl)."""

    def __init__(self, limit: int, ttl: float):
        self.limit, self.ttl = limit, ttl
        self._items: OrderedDict[str, tuple[dict, float]] = OrderedDict()

    def get(self, uid: str) -> dict | None:
        now = time.monotonic()
        while self._items and now - next(iter(self._items.values()))[1] > self.ttl:
            self._items.popitem(last=False)
        found = self._items.get(uid)
        return found[0] if found is not None else None

    def put(self, uid: str, transcript: dict) -> None:
        self._items[uid] = (transcript, time.monotonic())
        self._items.move_to_end(uid)
        while len(self._items) > self.limit:
            self._items.popitem(last=False)

    def __len__(self) -> int:
        return len(self._items)


def _digest(*parts: Any) -> str:
    return hashlib.blake2b(json.dumps(parts, ensure_ascii=False).encode(), digest_size=12).hexdigest()


def _text(content: Any) -> Any:
    if isinstance(content, list):
        return "".join(p.get("text", "") if isinstance(p, dict) else str(p) for p in content)
    return content


def chat_keys(body: dict) -> Routed:
    """An OpenAI chat request's affinity keys: its messages hashed up to each earlier assistant reply
    (what an earlier request's prompt was, and so what a replica's cache may hold), longest first;
    the whole prompt is recorded for the next turn, which extends it."""
    messages = body.get("messages")
    if not isinstance(messages, list) or not all(isinstance(m, dict) for m in messages):
        return Routed()
    seed = ("chat", body.get("tools"))  # tools change the rendered prompt (jmoss.server.tools)
    digests, running = [], seed
    for m in messages:
        running = (_digest(running, m.get("role"), _text(m.get("content"))),)
        digests.append(running[0])
    whole = digests[-1] if digests else _digest(seed)
    before_replies = [digests[k - 1] for k in range(len(messages) - 1, 0, -1) if messages[k].get("role") == "assistant"]
    return Routed(keys=[whole, *before_replies], record=[whole])


def completion_keys(body: dict, block: int = 256) -> Routed:
    """A completion prompt's keys: its text hashed at every ``block`` characters, longest first."""
    prompt = body.get("prompt")
    prompt = prompt[0] if isinstance(prompt, list) and len(prompt) == 1 else prompt
    if not isinstance(prompt, str) or not prompt:
        return Routed()
    cuts = [*range(block, len(prompt), block), len(prompt)]
    keys = [_digest("completion", prompt[:cut]) for cut in cuts]
    return Routed(keys=keys[::-1], record=keys)


@dataclass
class FrontState:
    handle: Any  # the model deployment's handle (stream=True)
    model_name: str
    replicas: int
    max_body_bytes: int
    transcripts: Transcripts
    status: Any = None  # () -> Ray Serve's application status (blocking; called in a thread)
    limits: dict = field(default_factory=dict)  # a replica's /health limits, asked once
    pending: int = 0
    served: int = 0
    retried: int = 0
    failed: int = 0
    _health: tuple[float, dict] = (0.0, {})

    async def replica_states(self) -> dict:
        """Ray Serve's replica states of the deployment ({"RUNNING": 2, ...}), re-read at most once a second."""
        at, states = self._health
        if time.monotonic() - at > 1.0 and self.status is not None:
            states = await asyncio.to_thread(self.status)
            self._health = (time.monotonic(), states)
        return states


def _replica_failed(exc: BaseException) -> bool:
    from ray.exceptions import RayActorError
    from ray.serve.exceptions import ReplicaUnavailableError

    return isinstance(exc, (RayActorError, ReplicaUnavailableError))


def _busy(exc: BaseException) -> ServerRequestError | None:
    from ray.serve.exceptions import BackPressureError

    if isinstance(exc, BackPressureError):
        return ServerRequestError(503, "the cluster is busy (every replica's queue and the front's are full); retry "
                                       "shortly", type="server_busy", code="queue_full", headers={"Retry-After": "1"})
    return None


def _lost(retried: bool) -> ServerRequestError:
    return ServerRequestError(503, "the replica serving this request failed" + (" twice" if retried else "") +
                              "; retry (Ray is restarting it, and the conversation is kept)", type="server_error",
                              code="replica_failed", headers={"Retry-After": "1"})


async def _watching(request: Request, work: Any) -> Any:
    """``await work``, cancelled (ClientGone) when the client hangs up first."""
    watcher = asyncio.ensure_future(_wait_for_disconnect(request))
    task = asyncio.ensure_future(work)
    try:
        done, _ = await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
        if task not in done:
            task.cancel()
            raise ClientGone("before the reply was ready")
        return task.result()
    finally:
        watcher.cancel()


class _FrontCollector:
    """The front's own figures at scrape time: replicas up, requests pending, served, retried, failed."""

    def __init__(self, state: FrontState):
        self.state = state

    def collect(self) -> Any:
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        state = self.state
        up = GaugeMetricFamily("jmoss_ray_replicas", "the deployment's replicas by Ray Serve state", labels=["state"])
        for name, count in state._health[1].items():
            up.add_metric([getattr(name, "value", str(name))], count)
        yield up
        yield GaugeMetricFamily("jmoss_ray_replicas_target", "replicas asked for", value=state.replicas)
        yield GaugeMetricFamily("jmoss_ray_pending", "requests the front is waiting on", value=state.pending)
        yield GaugeMetricFamily("jmoss_ray_sessions", "uid transcripts the front keeps", value=len(state.transcripts))
        yield CounterMetricFamily("jmoss_ray_served", "requests a replica answered", value=state.served)
        yield CounterMetricFamily("jmoss_ray_retried", "requests sent again after their replica failed",
                                  value=state.retried)
        yield CounterMetricFamily("jmoss_ray_failed", "requests lost with a replica (answered 503 or an error event)",
                                  value=state.failed)


def create_front(handle: "DeploymentHandle", *, model_name: str, replicas: int, status: Any = None,
                 max_body_bytes: int = 1 << 20, session_limit: int = 64, session_ttl: float = 3600.0,
                 api_keys: Sequence[str] = (), metrics_public: bool = False, web: bool = True) -> FastAPI:
    """The cluster's HTTP front: :func:`base_app` plus a route that forwards every request through
    ``handle`` (the ModelReplica deployment's), and its own ``/health`` and ``/metrics``.

    ``status``: a function returning the deployment's replica states (for /health);
    ``max_body_bytes``, ``session_limit``, ``session_ttl``, ``api_keys``, ``metrics_public``, ``web``:
    as :func:`create_app`'s (give the replicas the same). The front checks the key itself, so a
    request without one is refused before its body is read or any replica sees it. Its
    ``/metrics`` are the front's (replicas, requests by route and status, retries, failures); each
    replica's model figures stay in that replica.
    """
    from jmoss.server.auth import ApiKeyMiddleware, check_key
    from jmoss.server.metrics import Metrics

    state = FrontState(handle.options(stream=True), model_name, replicas, max_body_bytes,
                       Transcripts(session_limit, session_ttl), status)
    keys = [check_key(k) for k in api_keys]
    metrics = Metrics(collector=_FrontCollector(state))

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        with contextlib.suppress(Exception):  # the limits are informative: /health works without them
            status_, _, body = await _exchange(state, Forwarded("GET", "/health", b"", [], None, b""))
            if status_ == 200:
                state.limits = {k: v for k, v in json.loads(body).items()
                                if k in ("limits", "capacity", "max_batch")}
        yield

    app = base_app(lifespan)
    app.state.front = state

    @app.get("/health")
    async def health() -> Response:
        states = {getattr(k, "value", str(k)): v for k, v in (await state.replica_states()).items()}
        up = states.get("RUNNING", 0)
        body = {"status": "ok" if up else "unavailable", "model": state.model_name,
                "replicas": {"up": up, "target": state.replicas, "states": states},
                "pending": state.pending, "served": state.served, "retried": state.retried, "failed": state.failed,
                "sessions": len(state.transcripts), "per_replica": state.limits}
        return JSONResponse(body, status_code=200 if up else 503)

    async def forward(request: Request) -> Response:
        body = await _read_body(request, state.max_body_bytes)
        fwd = Forwarded(request.method, request.url.path, request.scope.get("query_string", b""),
                        list(request.scope["headers"]), tuple(request.client) if request.client else None, body)
        _route(fwd, state)
        state.pending += 1
        try:
            return await _answer(request, fwd, state)
        except ClientGone as exc:
            return _client_gone(request, exc)
        finally:
            state.pending -= 1

    @app.get("/metrics")
    async def front_metrics() -> Response:
        await state.replica_states()
        body, content_type = metrics.render()
        return Response(body, media_type=content_type)

    def public(method: str, path: str) -> bool:
        return path == "/health" or (web and path == "/" and method in ("GET", "HEAD")) or \
            (metrics_public and path == "/metrics")

    if keys:
        app.add_middleware(ApiKeyMiddleware, keys=keys, public=public)
    app.add_middleware(_Counted, metrics=metrics)  # outermost: refused keys are counted too
    app.add_api_route("/{path:path}", forward, methods=["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"],
                      include_in_schema=False)
    return app


def _route(fwd: Forwarded, state: FrontState) -> None:
    """Name the request's affinity keys; a uid turn also gets its uid and transcript."""
    if fwd.method != "POST" or fwd.path not in ("/", "/v1/chat/completions", "/v1/completions"):
        return
    try:
        body = json.loads(fwd.body)
    except ValueError:
        return  # the replica's app answers it (400, in its words)
    if not isinstance(body, dict):
        return
    if fwd.path == "/v1/chat/completions":
        fwd.routed = chat_keys(body)
    elif fwd.path == "/v1/completions":
        fwd.routed = completion_keys(body)
    elif "uid" not in body or body["uid"] is None or isinstance(body["uid"], str):
        uid = body.get("uid")
        transcript = state.transcripts.get(uid) if uid else None
        if transcript is None:  # MOSS's rule: an absent, unknown or expired uid starts a new conversation
            uid = str(uuid.UUID(bytes=secrets.token_bytes(16), version=4))
            fwd.body = json.dumps({**body, "uid": uid}, ensure_ascii=False).encode()
        fwd.uid, fwd.transcript = uid, transcript
        fwd.routed = Routed(keys=[f"uid:{uid}"], record=[f"uid:{uid}"], sticky=True)


async def _exchange(state: FrontState, fwd: Forwarded) -> tuple[int, list, bytes]:
    """A whole non-streamed answer (status, headers, body), the trailer applied."""
    stream = state.handle.remote(fwd)
    return await _collect(await stream.__anext__(), stream, fwd, state)


async def _collect(first: dict, stream: Any, fwd: Forwarded, state: FrontState) -> tuple[int, list, bytes]:
    status, headers, chunks = 0, [], []

    def take(message: dict) -> None:
        nonlocal status, headers
        kind = message["type"]
        if kind == "http.response.start":
            status, headers = message["status"], list(message.get("headers", ()))
        elif kind == "http.response.body":
            chunks.append(message.get("body", b""))
        elif kind == "jmoss.trailer" and fwd.uid is not None:
            if message["transcript"] is not None:
                state.transcripts.put(fwd.uid, message["transcript"])
            if message["prefilled_tokens"] is not None:
                headers.append((PREFILL_HEADER.encode(), str(message["prefilled_tokens"]).encode()))

    take(first)
    async for message in stream:
        take(message)
    return status, headers, b"".join(chunks)


async def _answer(request: Request, fwd: Forwarded, state: FrontState) -> Response:
    """Forward ``fwd``; answer from what comes back. A replica that dies before its answer is
    complete (non-streamed) or has started (streamed) costs one retry on another replica."""
    for attempt in (0, 1):
        stream = state.handle.remote(fwd)
        try:
            first = await _watching(request, stream.__anext__())
            if _is_event_stream(first):
                return _relay(first, stream, state)
            status, headers, body = await _watching(request, _collect(first, stream, fwd, state))
        except ClientGone:
            stream.cancel()
            raise
        except StopAsyncIteration:
            log.error("a replica answered %s %s with nothing", fwd.method, fwd.path)
            return error_response(500, "internal server error", type="server_error")
        except Exception as exc:  # noqa: BLE001 - sorted below: a dead replica, back-pressure, or a bug
            busy = _busy(exc)
            if busy is not None:
                return busy.response()
            if not _replica_failed(exc):
                raise
            if attempt:
                state.failed += 1
                return _lost(retried=True).response()
            state.retried += 1
            log.warning("a replica failed before its answer to %s %s was complete; sending it to another",
                        fwd.method, fwd.path)
            continue
        state.served += 1
        response = Response(body, status_code=status)
        response.raw_headers = [(k, v) for k, v in headers if k.lower() != b"content-length"]
        response.raw_headers.append((b"content-length", str(len(body)).encode()))
        return response
    raise AssertionError("unreachable")


def _is_event_stream(message: dict) -> bool:
    return message["type"] == "http.response.start" and any(
        k.lower() == b"content-type" and v.startswith(b"text/event-stream") for k, v in message.get("headers", ()))


def _relay(start: dict, stream: Any, state: FrontState) -> Response:
    """A streamed reply relayed event by event; a replica that dies mid-stream ends it with an
    error event and no ``[DONE]``, so no client reads it as complete."""

    async def body() -> AsyncIterator[bytes]:
        finished = False
        try:
            async for message in stream:
                if message["type"] == "http.response.body" and message.get("body"):
                    yield message["body"]
            finished = True
            state.served += 1
        except Exception as exc:  # noqa: BLE001
            if not _replica_failed(exc):
                log.exception("relaying a streamed reply failed")
            state.failed += 1
            error = _lost(retried=False).body()
            error["error"]["message"] = ("the replica generating this reply failed; the reply is incomplete: "
                                         "send the request again")
            yield f"data: {json.dumps(error)}\n\n".encode()
        finally:
            if not finished:
                stream.cancel()

    headers = [(k, v) for k, v in start.get("headers", ()) if k.lower() not in (b"content-length",)]
    response = StreamingResponse(body(), status_code=start["status"])
    response.raw_headers = headers
    return response


# -- deploying ---------------------------------------------------------------------------------------
def _ray() -> Any:
    try:
        import ray
        from ray import serve  # noqa: F401
    except ImportError:
        raise RayClusterError("jmoss serve --ray needs Ray Serve: pip install 'jmoss[ray]' "
                              "(or pip install 'ray[serve]')") from None
    return ray


def connect(address: str | None = None, **init: Any) -> Any:
    """Join the Ray cluster at ``address`` ("auto", "HOST:PORT" of a `ray start --head`), or start a
    local one (None); a process already connected keeps its connection."""
    ray = _ray()
    if ray.is_initialized():
        return ray
    try:
        ray.init(address=address, **init)
    except (ConnectionError, ValueError, RuntimeError) as exc:
        raise RayClusterError(f"cannot reach the Ray cluster at {address}: {exc}; start one with "
                              "`ray start --head` there, or leave out the address to start a local one") from None
    return ray


def deploy(model: str, *, replicas: int = 2, replica_cpus: float = 1.0, replica_gpus: float = 0.0,
           threads: int | None = None, load: dict | None = None, app: dict | None = None,
           queued: int = 16, name: str = APP_NAME, health_check_period_s: float = 2.0) -> "DeploymentHandle":
    """Deploy ``replicas`` ModelReplicas of ``model`` on the connected cluster; returns the handle
    once every replica has loaded its model. ``load``/``app``: :func:`jmoss.load`'s and
    :func:`create_app`'s keywords; ``queued``: requests the front holds when every replica is full
    (more get 503 queue_full, as one server's full queue does)."""
    _ray()
    from ray import serve
    from ray.serve.config import RequestRouterConfig

    app = dict(app or {})
    queue_size, max_batch = app.get("queue_size", 16), app.get("max_batch", 1)
    app["max_body_bytes"] = app.get("max_body_bytes", 1 << 20) + _BODY_SLACK
    deployment = serve.deployment(ModelReplica, name="ModelReplica").options(
        num_replicas=replicas,
        ray_actor_options={"num_cpus": replica_cpus, "num_gpus": replica_gpus},
        # a replica holds what its worker admits; past it the router waits (bounded by max_queued_requests)
        max_ongoing_requests=queue_size + max_batch, max_queued_requests=queued,
        health_check_period_s=health_check_period_s, graceful_shutdown_timeout_s=5,
        request_router_config=RequestRouterConfig(request_router_class="jmoss.server.ray_router:AffinityRouter"),
    )
    threads = threads or max(1, math.ceil(replica_cpus))
    serve.start(proxy_location="Disabled")  # the front is ours (jmoss's protocol, limits and timeouts)
    try:
        return serve.run(deployment.bind(model, load or {}, app, threads), name=name, route_prefix=None)
    except Exception as exc:  # noqa: BLE001 - Ray wraps a replica's failure (a missing store, a budget) in its own
        raise RayClusterError(f"the replicas of {model} did not start: {exc}") from None


def replica_states(name: str = APP_NAME) -> dict:
    """How many of the application's replicas are in each state (Ray Serve's status)."""
    from ray import serve

    app = serve.status().applications.get(name)
    if app is None:
        return {}
    return {getattr(k, "value", str(k)): v for d in app.deployments.values() for k, v in d.replica_states.items()}


def serve_ray(model: str, host: str = "127.0.0.1", port: int = 19324, *, address: str | None = None,
              replicas: int = 2, replica_cpus: float = 1.0, replica_gpus: float | None = None,
              threads: int | None = None, device: str = "auto", dtype: str | None = None,
              device_memory: Any = None, host_memory: Any = None, offload: str = "auto",
              ctx_size: int | None = None, model_name: str | None = None, web: bool = True, log_level: str = "info",
              header_timeout: float | None = None, body_timeout: float | None = None,
              idle_timeout: float | None = None, max_connections: int | None = None,
              keep_cluster: bool = False, **limits: Any) -> None:
    """``jmoss serve MODEL --ray``: deploy ``replicas`` replicas of ``model`` on the cluster at
    ``address`` (None: a local one) and serve the front on ``host:port`` until interrupted, then
    delete the application (and stop a cluster it started, unless ``keep_cluster``).

    ``replica_gpus`` defaults to 1 per replica when ``device`` is cuda (or auto on a cluster with
    GPUs), else 0; ``limits`` are :func:`create_app`'s (max_batch, queue_size, session_limit, ...).
    """
    from jmoss.server.transport import (
        DEFAULT_BODY_TIMEOUT, DEFAULT_HEADER_TIMEOUT, DEFAULT_IDLE_TIMEOUT, DEFAULT_MAX_CONNECTIONS, run_app,
    )

    target = _replica_model(model)
    if limits.get("plugin_options"):  # a folder a plugin reads is opened on each replica's node, from its own cwd
        limits["plugin_options"] = {name: {k: Path(v).expanduser().resolve() if isinstance(v, Path) else v
                                           for k, v in opts.items()} for name, opts in limits["plugin_options"].items()}
    started = time.monotonic()
    ray = connect(address)
    from ray import serve

    if replica_gpus is None:
        gpus = ray.cluster_resources().get("GPU", 0)
        replica_gpus = 1.0 if device == "cuda" or (device == "auto" and gpus >= 1) else 0.0
    if replica_gpus and device == "auto":
        device = "cuda"
    load = dict(device=device, dtype=dtype, device_memory=device_memory, host_memory=host_memory,
                offload=offload, max_seq_len=ctx_size, batch=limits.get("max_batch", 1))
    app = dict(limits, model_name=model_name or model, web=web)
    try:
        handle = deploy(target, replicas=replicas, replica_cpus=replica_cpus, replica_gpus=replica_gpus,
                        threads=threads, load=load, app=app, queued=limits.get("queue_size", 16))
        log.warning("jmoss: %d replicas of %s up on Ray %s in %.1f s", replicas, model, ray.__version__,
                    time.monotonic() - started)
        front = create_front(handle, model_name=model_name or model, replicas=replicas,
                             status=replica_states, max_body_bytes=limits.get("max_body_bytes", 1 << 20),
                             session_limit=limits.get("session_limit", 64),
                             session_ttl=limits.get("session_ttl", 3600.0), api_keys=limits.get("api_keys", ()),
                             metrics_public=limits.get("metrics_public", False), web=web)
        run_app(front, host, port, log_level=log_level, header_timeout=header_timeout or DEFAULT_HEADER_TIMEOUT,
                body_timeout=body_timeout or DEFAULT_BODY_TIMEOUT, idle_timeout=idle_timeout or DEFAULT_IDLE_TIMEOUT,
                max_connections=max_connections or DEFAULT_MAX_CONNECTIONS, api_keys=limits.get("api_keys", ()))
    finally:
        with contextlib.suppress(Exception):
            serve.delete(APP_NAME)
        if address is None and not keep_cluster:
            with contextlib.suppress(Exception):
                serve.shutdown()
            ray.shutdown()


def _replica_model(model: str) -> str:
    """``model`` as the replicas should open it: a path that exists here made absolute (a replica's
    working directory is its node's, not the front's); a converted name kept as a name, for each
    node to resolve under its own JMOSS_HOME (boxes need the same name, not the same path). A
    mistyped path fails here, once, not on every replica."""
    from jmoss.api import check_model_path

    check_model_path(model)
    path = Path(model).expanduser()
    return str(path.resolve()) if path.exists() else model
