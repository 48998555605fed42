"""``jmoss serve``: MOSS's uid-history JSON API and an OpenAI-compatible API over one loaded model.

    app = create_app(jmoss.load("fnlp/moss-moon-003-sft"), plugins=["calculator"])
    serve(model, host="127.0.0.1", port=19324)

Endpoints: ``POST /`` (moss_api_demo.py's request and reply, moss-spec §5.4), ``GET /`` (a chat page
for browsers, jmoss.web; off with ``web=False``), ``GET /v1/models``,
``POST /v1/chat/completions``, ``POST /v1/completions`` (both optionally streamed as server-sent
events ending in ``data: [DONE]``) and ``GET /health``. Every error is a 4xx/5xx JSON body in
OpenAI's shape ``{"error": {"message", "type", "param", "code"}}``.

Concurrency. The model (its one KV cache, jittor) is not thread-safe, so all model work runs on one
worker thread that takes jobs in arrival order. Admission is bounded: at most ``queue_size`` jobs
wait behind the running one; the next request gets 503 with ``Retry-After`` at once instead of a
growing backlog. Async handlers only parse, validate, tokenize (to enforce limits before queueing)
and then relay what the worker posts to an asyncio queue (``call_soon_threadsafe``). A client that
hangs up sets its job's cancel flag: a queued job is dropped and its slot freed immediately; a
running one stops at the next prefill/decode step (checked by the session wrapper below), so the
worker moves on after at most one more token.

Memory. The worker owns one KV cache of ``n_positions`` for the server's lifetime, shared by every
request and every uid conversation, so memory does not grow with clients or sessions. What is in
the cache is remembered: a stateless request that shares a prefix with the previous one (the meta
instruction, an OpenAI client resending a conversation) prefills only the new tokens, and a uid
conversation whose cache was not displaced continues without re-reading its history. uid sessions
keep only token ids and text, bounded in number (LRU) and age.

Batching. With ``max_batch`` > 1 up to that many jobs run at once, each on its own thread and its
own slot of a :class:`jmoss.batching.BatchRunner` (KV cache rows of ``n_positions``), whose thread
runs one forward per step for every job waiting on it: the weights are read once per step for
all of them. A job's sampling, stop strings, streaming, plugin passes and cancellation are its
own code, unchanged; the prefix/uid cache reuse above applies per slot (a uid conversation gets
its slot back while no other job displaced it). Admission counts ``queue_size`` + ``max_batch``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import queue
import secrets
import threading
import time
import uuid
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Annotated, Any, AsyncIterator, Callable, Iterator, Literal, Sequence

from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from jmoss import dialogue
from jmoss.batching import BatchRunner, DetachedSession, StepCancelled
from jmoss.errors import ContextLengthError, JmossError
from jmoss.generation import Finish, GenerationOptions, shared_prefix, stream_tokens

if TYPE_CHECKING:
    from jmoss.api import Model
    from jmoss.chat import Chat, Reply
    from jmoss.plugins import Plugin
    from jmoss.session import Session

log = logging.getLogger("jmoss.server")

DEFAULT_PORT = 19324  # moss_api_demo.py's port
MOSS_DEFAULTS = dict(max_length=2048, top_p=0.8, temperature=0.7, top_k=40, repetition_penalty=1.02)  # §5.1
_EOM = "<eom>"


class ServerRequestError(JmossError):
    """A request the server refuses; rendered as OpenAI's error object with ``status``."""

    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = headers or {}

    def response(self) -> JSONResponse:
        body = {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}
        return JSONResponse(body, status_code=self.status, headers=self.headers)


def _error(status: int, message: str, **kwargs: Any) -> JSONResponse:
    return ServerRequestError(status, message, **kwargs).response()


# ----------------------------------------------------------------------------------------------
# Request bodies. Unknown fields are refused (extra="forbid") as OpenAI itself does ("Unrecognized
# request argument"): a silently ignored field would hide a client bug. Fields OpenAI defines that
# only have a meaning we cannot honour are accepted at their neutral value and refused otherwise.
# strict: "0.5" is not a number, 1 is not a bool. NaN/Infinity are not numbers either.
# ----------------------------------------------------------------------------------------------


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)


class _TextPart(_Body):
    type: Literal["text"]
    text: str


class _Message(_Body):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[_TextPart] | None = None
    name: str | None = None

    def text(self) -> str:
        if self.content is None:
            return ""
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)


class _StreamOptions(_Body):
    include_usage: bool = False


class _Sampling(_Body):
    """Fields shared by both OpenAI endpoints; top_k and repetition_penalty are common extensions."""

    model: str
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0, le=2)
    top_p: float | None = Field(default=None, ge=0, le=1)
    top_k: int | None = Field(default=None, ge=0)
    repetition_penalty: float | None = Field(default=None, gt=0, le=10)
    stop: str | list[str] | None = None
    seed: int | None = Field(default=None, ge=0, lt=2**63)
    stream: bool = False
    stream_options: _StreamOptions | None = None
    n: Literal[1] | None = None
    user: str | None = None
    presence_penalty: Literal[0] | None = None
    frequency_penalty: Literal[0] | None = None


class ChatCompletionRequest(_Sampling):
    messages: list[_Message] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)  # newer clients' name for max_tokens
    logprobs: Literal[False] | None = None
    # jmoss's opt-in (the chat page sends it): with plugins, a streamed reply also carries chunks
    # {"jmoss_event": {"kind", "text"}} for the turn's Inner Thoughts, Commands, Results, notices.
    jmoss_events: bool = False


class CompletionRequest(_Sampling):
    prompt: str | list[str] = Field(min_length=1)
    echo: Literal[False] | None = None
    logprobs: None = None


class MossRequest(_Body):
    """moss_api_demo.py's body (moss-spec §5.4); ``stop`` (up to 4 strings) is jmoss's addition."""

    prompt: str = Field(min_length=1)
    uid: str | None = None
    max_length: int = Field(default=MOSS_DEFAULTS["max_length"], ge=1)
    top_p: float = Field(default=MOSS_DEFAULTS["top_p"], gt=0, le=1)
    temperature: float = Field(default=MOSS_DEFAULTS["temperature"], ge=0, le=2)
    stop: list[Annotated[str, Field(min_length=1, max_length=256)]] = Field(default_factory=list, max_length=4)


def _validation_error(exc: ValidationError) -> ServerRequestError:
    first = exc.errors(include_url=False)[0]
    loc = ".".join(str(p) for p in first.get("loc", ()))
    kind = first.get("type", "")
    if kind == "json_invalid":
        return ServerRequestError(400, f"the body is not valid JSON: {first.get('msg')}", code="invalid_json")
    if kind == "extra_forbidden":
        return ServerRequestError(400, f"Unrecognized request argument supplied: {loc}", param=loc,
                                  code="unrecognized_argument")
    if kind == "missing":
        return ServerRequestError(400, f"missing required parameter: {loc}", param=loc or None, code="missing_parameter")
    where = f"{loc}: " if loc else "body: "
    return ServerRequestError(400, f"{where}{first.get('msg')}", param=loc or None, code="invalid_value")


# ----------------------------------------------------------------------------------------------
# The worker: one thread, one KV cache, jobs in arrival order.
# ----------------------------------------------------------------------------------------------


class _Cancelled(Exception):
    """Raised inside generation when the client that asked for it has gone."""


class _CancellableSession:
    """The worker's Session, refusing to run another step once the current job is cancelled.

    Generation (``generate_ids``) and Chat call only prefill/decode to advance, so checking here
    stops any kind of job between two tokens without those modules knowing about servers.
    """

    def __init__(self, session: "Session", cancel: threading.Event | None = None):
        self._session = session
        self.cancel = cancel

    def __getattr__(self, name: str) -> Any:
        return getattr(self._session, name)

    def _check(self) -> None:
        if self.cancel is not None and self.cancel.is_set():
            raise _Cancelled()

    def prefill(self, *args: Any, **kwargs: Any):
        self._check()
        return self._session.prefill(*args, **kwargs)

    def decode(self, *args: Any, **kwargs: Any):
        self._check()
        return self._session.decode(*args, **kwargs)


class _SharedCacheModel:
    """The model as a Chat sees it: ``session()`` hands out the worker's one cache.

    A Chat would otherwise allocate its own KV cache (1.7 GB at 2048 positions for the 16B model)
    per conversation; sharing one makes memory independent of the number of uids.
    """

    def __init__(self, model: "Model", session: "_CancellableSession | DetachedSession"):
        self._model, self._session = model, session

    def session(self, batch: int = 1, max_len: int | None = None) -> "_CancellableSession | DetachedSession":
        return self._session

    def __getattr__(self, name: str) -> Any:
        return getattr(self._model, name)


Post = Callable[[str, Any], None]


@dataclass
class _Job:
    run: Callable[[Post], Any]  # runs on the worker; calls post("delta", text) when streaming
    loop: asyncio.AbstractEventLoop
    stream: bool
    release: Callable[["_Job"], None]
    out: asyncio.Queue = field(default_factory=asyncio.Queue)
    cancelled: threading.Event = field(default_factory=threading.Event)
    started: bool = False
    released: bool = False

    def post(self, kind: str, value: Any) -> None:
        """From the worker thread: hand an event to the handler's event loop."""
        if kind == "delta" and not self.stream:
            return
        with contextlib.suppress(RuntimeError):  # the loop is closed: the server is stopping
            self.loop.call_soon_threadsafe(self.out.put_nowait, (kind, value))

    def cancel(self) -> None:
        """From the handler: the client is gone (or the reply was delivered)."""
        self.cancelled.set()
        self.release(self)  # a no-op once the worker has started it: the worker releases then


@dataclass
class _Conversation:
    chat: "Chat"
    last_used: float


@dataclass
class _CacheState:
    """What a cache holds: the ids of the last stateless request (``ids``), or the Chat that last ran
    (``owner``). The single worker keeps one; a batch Slot carries the same two attributes."""

    ids: list[int] = field(default_factory=list)
    owner: Any = None


def _serialized(method: Callable) -> Callable:
    """Run ``method`` under the worker's conversation lock (batched jobs call it from many threads)."""

    def locked(self: "_Worker", *args: Any, **kwargs: Any) -> Any:
        with self._conv_lock:
            return method(self, *args, **kwargs)

    return locked


class _Worker:
    """Owns the model, its KV cache, the uid conversations and the admission counter.

    ``max_batch`` 1: one thread runs one job at a time on one cache. More: up to ``max_batch`` jobs
    run at once, each in its own thread on a slot of a :class:`jmoss.batching.BatchRunner`, whose
    thread runs one forward per step for all of them (continuous batching).
    """

    def __init__(self, model: "Model", plugins: list["Plugin"], queue_size: int, session_limit: int,
                 session_ttl: float, max_batch: int = 1):
        self.model, self.plugins = model, plugins
        self.capacity = queue_size + max_batch  # waiting + the ones running
        self.session_limit, self.session_ttl = session_limit, session_ttl
        self.runner = BatchRunner(model, max_batch) if max_batch > 1 else None
        if self.runner is None:
            self.session = _CancellableSession(model.session())  # allocated once, n_positions long
            self.chat_model = _SharedCacheModel(model, self.session)
        else:
            self._detached = DetachedSession(self.runner.max_len)
            self.chat_model = _SharedCacheModel(model, self._detached)
        self._running = threading.Semaphore(max_batch)
        self._local = threading.local()  # the running job's cancel flag, per job thread
        self._conv_lock = threading.RLock()
        self._turn_locks: dict[int, threading.Lock] = {}  # one turn at a time per Chat (same uid twice)
        self.conversations: OrderedDict[str, _Conversation] = OrderedDict()
        self._jobs: queue.SimpleQueue[_Job | None] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self.pending = 0
        self.served = 0
        self.cancelled = 0  # jobs dropped or stopped because their client left
        self._state = _CacheState()  # what the single cache holds (max_batch 1)
        self._meta_tokens: int | None = None
        self._thread = threading.Thread(target=self._loop, name="jmoss-model-worker", daemon=True)
        self._thread.start()

    # -- admission (event-loop side) ---------------------------------------------------------
    def submit(self, run: Callable[[Post], Any], *, stream: bool) -> _Job:
        with self._lock:
            if self.pending >= self.capacity:
                raise ServerRequestError(
                    503, f"the server is busy ({self.pending} requests queued or running); retry shortly",
                    type="server_busy", code="queue_full", headers={"Retry-After": "1"})
            self.pending += 1
        job = _Job(run=run, loop=asyncio.get_running_loop(), stream=stream, release=self._release)
        self._jobs.put(job)
        return job

    def _release(self, job: _Job, *, finished: bool = False) -> None:
        with self._lock:
            if job.released or (job.started and not finished):
                return
            job.released = True
            self.pending -= 1

    def stop(self) -> None:
        self._jobs.put(None)
        if self.runner is not None:
            self.runner.stop()

    # -- the worker thread -------------------------------------------------------------------
    def _loop(self) -> None:
        while True:
            job = self._jobs.get()
            if job is None:
                return
            self._running.acquire()  # batched: wait for one of the max_batch places
            with self._lock:
                if job.cancelled.is_set() or job.released:
                    self.cancelled += 1
                    self._running.release()
                    continue  # its client left while it waited; the slot was freed then
                job.started = True
            if self.runner is None:
                self._run_job(job)
            else:
                threading.Thread(target=self._run_job, args=(job,), name="jmoss-job", daemon=True).start()

    def _run_job(self, job: _Job) -> None:
        if self.runner is None:
            self.session.cancel = job.cancelled
        self._local.cancel = job.cancelled
        try:
            job.post("done", job.run(job.post))
            with self._lock:
                self.served += 1
        except (_Cancelled, StepCancelled):
            with self._lock:
                self.cancelled += 1
        except JmossError as exc:
            job.post("error", _jmoss_error(exc))
        except Exception:  # a bug must cost one request, never the server
            log.exception("generation failed")
            if self.runner is None:
                self._forget_cache()
            job.post("error", ServerRequestError(500, "internal error during generation", type="server_error"))
        finally:
            if self.runner is None:
                self.session.cancel = None
            self._local.cancel = None
            self._release(job, finished=True)
            self._running.release()

    def _forget_cache(self) -> None:
        self.session.reset()
        self._state.ids, self._state.owner = [], None

    @contextlib.contextmanager
    def _cache(self, score: Callable[[Any], float]) -> Iterator[tuple[Any, Any]]:
        """(session, what it holds) for one job: the single cache, or a batch slot leased for the job
        (the free slot with the best ``score``: one that already holds this job's tokens)."""
        if self.runner is None:
            yield self.session, self._state
            return
        slot = self.runner.acquire(score)
        slot.cancel = getattr(self._local, "cancel", None)
        try:
            yield _CancellableSession(slot, slot.cancel), slot
        except (_Cancelled, StepCancelled, JmossError):
            raise
        except BaseException:
            slot.reset()
            slot.ids, slot.owner = [], None
            raise
        finally:
            self.runner.release(slot)

    # -- jobs (run on the worker thread) -----------------------------------------------------
    def complete(self, ids: list[int], opts: GenerationOptions, post: Post, *, reply: bool) -> dict:
        """Continue ``ids``; with ``reply`` the text is MOSS's reply (leading space of "<|MOSS|>: " dropped).

        The cache is truncated to the longest prefix shared with what it holds, so a request that
        repeats the meta instruction or the previous conversation prefills only its new tokens.
        """
        with self._cache(lambda held: -1 if held.owner is not None else shared_prefix(held.ids, ids)) as (session, state):
            return self._complete(session, state, ids, opts, post, reply=reply)

    def _complete(self, session: Any, state: Any, ids: list[int], opts: GenerationOptions, post: Post, *,
                  reply: bool) -> dict:
        if state.owner is not None:  # a uid conversation's tokens: nothing to share
            session.reset()
            state.ids, state.owner = [], None
        keep = min(shared_prefix(state.ids, ids), len(ids) - 1, session.length)
        session.truncate(keep)
        budget = min(opts.max_new_tokens, session.max_len - len(ids))
        run = GenerationOptions.from_kwargs(**{**opts.__dict__, "max_new_tokens": budget})
        tokens: list[int] = []
        text, first = "", reply
        finish = Finish()
        try:
            for delta in stream_tokens(self.model, session, ids[keep:], run, history=ids[:keep], tokens_out=tokens,
                                       finish=finish):
                if first:  # the model writes "<|MOSS|>: text"; the reply is the text
                    delta, first = delta.lstrip(" "), not delta.strip(" ")
                if delta:
                    text += delta
                    post("delta", delta)
        finally:
            state.ids = (ids + tokens)[: session.length]
        return {"text": text, "finish_reason": "stop" if finish.reason == "stop" else "length",
                "prompt_tokens": len(ids), "completion_tokens": len(tokens), "cached_tokens": keep}

    def chat_turn(self, chat: "Chat", text: str, options: dict, post: Post) -> "Reply":
        """One turn of a Chat on the shared cache (MOSS's plugin loop runs here when enabled)."""
        if self.runner is not None:
            return self._batched_turn(chat, text, options, post)
        if self._state.owner is not chat:
            self.session.reset()  # the cache holds someone else's tokens: this chat re-reads its own
        self._state.owner, self._state.ids = chat, []
        try:
            for delta in chat.stream(text, **options):
                post("delta", delta)
        except (_Cancelled, JmossError):
            raise  # Chat closed the turn; the cache still matches it
        except BaseException:
            self._forget_cache()
            raise
        assert chat.last_reply is not None
        return chat.last_reply

    def _batched_turn(self, chat: "Chat", text: str, options: dict, post: Post) -> "Reply":
        """chat_turn on a batch slot: the chat's own slot when its cache is still there (uid KV kept)."""
        with self._conv_lock:
            turn_lock = self._turn_locks.setdefault(id(chat), threading.Lock())
        with turn_lock, self._cache(lambda held: 1 if held.owner is chat else -1 if held.owner is not None else 0) \
                as (session, slot):
            if slot.owner is not chat:
                session.reset()
                slot.owner, slot.ids = chat, []
            chat.session = session
            try:
                for delta in chat.stream(text, **options):
                    post("delta", delta)
            finally:
                chat.session = self._detached
        assert chat.last_reply is not None
        return chat.last_reply

    def new_chat(self, meta_instruction: str) -> "Chat":
        from jmoss.chat import Chat

        chat = Chat(self.chat_model, meta_instruction, plugins=self.plugins)  # resets the shared cache
        if self.runner is None:
            self._state.owner, self._state.ids = chat, []
        return chat

    @_serialized
    def find_conversation(self, uid: str | None) -> "Chat | None":
        """The live conversation of ``uid``, or None; creates nothing (expired ones are dropped)."""
        now = time.monotonic()
        while self.conversations:  # LRU order is also last-use order: the oldest are in front
            oldest_uid, oldest = next(iter(self.conversations.items()))
            if now - oldest.last_used <= self.session_ttl:
                break
            self._drop(oldest_uid)
        found = self.conversations.get(uid) if uid is not None else None
        return found.chat if found is not None else None

    @property
    def meta_tokens(self) -> int:
        """Tokens of a new conversation before its first turn (its meta instruction)."""
        if self._meta_tokens is None:
            self._meta_tokens = len(self.model.tokenizer.encode(default_meta_instruction(self.plugins)))
        return self._meta_tokens

    @_serialized
    def forget(self, uid: str) -> None:
        if uid in self.conversations:
            self._drop(uid)

    @_serialized
    def conversation(self, uid: str | None) -> tuple[str, "Chat"]:
        """MOSS's uid rule: a known uid continues; an absent, unknown or expired one starts anew."""
        now = time.monotonic()
        if self.find_conversation(uid) is not None:
            assert uid is not None
            found = self.conversations[uid]
            found.last_used = now
            self.conversations.move_to_end(uid)
            return uid, found.chat
        while len(self.conversations) >= self.session_limit:
            self._drop(next(iter(self.conversations)))
        uid = str(uuid.UUID(bytes=secrets.token_bytes(16), version=4))  # 122 random bits from the OS CSPRNG
        chat = self.new_chat(default_meta_instruction(self.plugins))
        self.conversations[uid] = _Conversation(chat, now)
        return uid, chat

    def _drop(self, uid: str) -> None:
        gone = self.conversations.pop(uid)
        self._turn_locks.pop(id(gone.chat), None)
        if self.runner is None and self._state.owner is gone.chat:
            self._forget_cache()


def _jmoss_error(exc: JmossError) -> ServerRequestError:
    if isinstance(exc, ServerRequestError):
        return exc
    code = "context_length_exceeded" if isinstance(exc, ContextLengthError) else "invalid_value"
    return ServerRequestError(400, str(exc), code=code)


def default_meta_instruction(plugins: Sequence["Plugin"]) -> str:
    """MOSS's base meta instruction, plus the capability switch lines when tools are enabled."""
    return _with_capabilities(dialogue.base_meta_instruction(), plugins)


def _with_capabilities(meta: str, plugins: Sequence["Plugin"]) -> str:
    if not plugins:
        return meta
    from jmoss.plugins import capability_lines

    return meta + capability_lines(plugins)


# ----------------------------------------------------------------------------------------------
# The app
# ----------------------------------------------------------------------------------------------


@dataclass
class _Limits:
    max_prompt_tokens: int
    max_tokens_limit: int
    max_body_bytes: int


async def _read_body(request: Request, limit: int) -> bytes:
    """The body, refused past ``limit`` bytes before it is all in memory."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise ServerRequestError(413, f"the body is larger than {limit} bytes", code="body_too_large")
    chunks, size = [], 0
    try:
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise ServerRequestError(413, f"the body is larger than {limit} bytes", code="body_too_large")
            chunks.append(chunk)
    except ClientDisconnect:
        raise _ClientGone("before its request body was read") from None
    return b"".join(chunks)


async def _wait_for_disconnect(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


class _ClientGone(Exception):
    """The client hung up; the message says when. Logged as one info line, answered with 499."""


def _client_gone(request: Request, exc: _ClientGone | None = None) -> Response:
    if not request.scope.get("jmoss.closed"):  # the protocol already logged why it closed it
        client = request.client
        who = f"{client.host}:{client.port}" if client else "a client"
        log.info("%s disconnected %s (%s %s)", who, (exc and str(exc)) or "before the reply was complete",
                 request.method, request.url.path)
    return Response(status_code=499)


async def _result(job: _Job, request: Request) -> Any:
    """The job's result; cancels the job if the client hangs up first."""
    watcher = asyncio.ensure_future(_wait_for_disconnect(request))
    try:
        while True:
            getter = asyncio.ensure_future(job.out.get())
            done, _ = await asyncio.wait({getter, watcher}, return_when=asyncio.FIRST_COMPLETED)
            if getter not in done:
                getter.cancel()
                raise _ClientGone("before the reply was ready")
            kind, value = getter.result()
            if kind == "error":
                raise value
            if kind == "done":
                return value
    finally:
        watcher.cancel()
        job.cancel()


def _sse(payload: Any) -> str:
    import json

    return f"data: {payload if isinstance(payload, str) else json.dumps(payload, ensure_ascii=False)}\n\n"


def create_app(
    model: "Model",
    *,
    model_name: str = "moss",
    plugins: Sequence[str] | Sequence["Plugin"] = (),
    plugin_options: dict | None = None,
    queue_size: int = 16,
    max_prompt_tokens: int | None = None,
    max_tokens_limit: int = 512,
    session_limit: int = 64,
    session_ttl: float = 3600.0,
    max_body_bytes: int = 1 << 20,
    web: bool = True,
    max_batch: int = 1,
) -> FastAPI:
    """The ASGI app serving ``model``; its worker thread starts here and stops at shutdown.

    ``max_prompt_tokens`` (default: the model's context minus one) bounds each request's prompt,
    meta instruction included; ``max_tokens_limit`` bounds max_tokens (and MOSS's max_length
    replies); ``session_limit``/``session_ttl`` bound the uid conversations. ``web`` serves the
    chat page at ``GET /``. ``max_batch`` sequences are generated together (continuous batching;
    load the model with ``batch=max_batch`` so its memory plan pays for their KV cache).
    """
    from jmoss.plugins import Plugin, load_plugins

    names = [p for p in plugins if isinstance(p, str)]
    tools: list[Plugin] = [p for p in plugins if isinstance(p, Plugin)]
    if names:
        tools += load_plugins(names, **(plugin_options or {}))
    n_positions = model.config.n_positions
    limits = _Limits(min(max_prompt_tokens or n_positions - 1, n_positions - 1), max_tokens_limit, max_body_bytes)
    tokenizer = model.tokenizer
    worker = _Worker(model, tools, queue_size, session_limit, session_ttl, max_batch)
    created = int(time.time())

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        yield
        worker.stop()

    app = FastAPI(title="jmoss", summary="MOSS over HTTP: MOSS's uid API and the OpenAI API", lifespan=lifespan)
    app.state.worker = worker

    @app.exception_handler(ServerRequestError)
    async def _on_request_error(request: Request, exc: ServerRequestError) -> JSONResponse:
        return exc.response()

    @app.exception_handler(StarletteHTTPException)
    async def _on_http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        kind = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
        return _error(exc.status_code, str(exc.detail), code=kind, headers=dict(exc.headers or {}))

    @app.exception_handler(_ClientGone)
    async def _on_client_gone(request: Request, exc: _ClientGone) -> Response:
        return _client_gone(request, exc)

    @app.exception_handler(Exception)
    async def _on_bug(request: Request, exc: Exception) -> JSONResponse:
        log.exception("request failed")
        return _error(500, "internal server error", type="server_error")

    async def parse(request: Request, schema: type[BaseModel]) -> Any:
        body = await _read_body(request, limits.max_body_bytes)
        try:
            return schema.model_validate_json(body)
        except ValidationError as exc:
            raise _validation_error(exc) from None

    def check_model(name: str) -> None:
        if name != model_name:
            raise ServerRequestError(404, f"The model `{name}` does not exist; this server serves `{model_name}`",
                                     param="model", code="model_not_found")

    def options(req: _Sampling, default_max: int, stop: Sequence[str] = ()) -> GenerationOptions:
        max_tokens = getattr(req, "max_completion_tokens", None) or req.max_tokens or default_max
        if max_tokens > limits.max_tokens_limit:
            raise ServerRequestError(400, f"max_tokens is {max_tokens}; this server allows at most "
                                          f"{limits.max_tokens_limit}", param="max_tokens", code="invalid_value")
        user_stop = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
        if len(user_stop) > 4 or any(len(s) > 256 for s in user_stop):
            raise ServerRequestError(400, "stop takes at most 4 sequences of at most 256 characters each",
                                     param="stop", code="invalid_value")
        temperature = MOSS_DEFAULTS["temperature"] if req.temperature is None else req.temperature
        top_p = MOSS_DEFAULTS["top_p"] if req.top_p is None else req.top_p
        greedy = temperature == 0 or top_p == 0  # OpenAI's "deterministic" settings
        try:
            return GenerationOptions.from_kwargs(
                max_new_tokens=max_tokens, do_sample=not greedy, temperature=temperature if not greedy else 1.0,
                top_p=top_p if not greedy else 1.0, top_k=req.top_k or 0,
                repetition_penalty=req.repetition_penalty or MOSS_DEFAULTS["repetition_penalty"],
                seed=req.seed, stop=tuple(stop) + tuple(s for s in user_stop if s))
        except JmossError as exc:
            raise _jmoss_error(exc) from None

    async def count_prompt(ids_of: Callable[[], list[int]], param: str) -> list[int]:
        ids = await asyncio.to_thread(ids_of)  # the Rust tokenizer is thread-safe and releases the GIL
        if len(ids) > limits.max_prompt_tokens:
            raise ServerRequestError(
                400, f"the prompt has {len(ids)} tokens (meta instruction included); this server allows at most "
                     f"{limits.max_prompt_tokens}", param=param, code="context_length_exceeded")
        if not ids:
            raise ServerRequestError(400, "the prompt is empty", param=param, code="invalid_value")
        return ids

    # -- MOSS's API ------------------------------------------------------------------------------
    @app.post("/")
    async def moss_api(request: Request) -> Any:
        """moss_api_demo.py: ``{"prompt", "uid"?, ...}`` -> ``{"response", "history", "status", "time", "uid"}``."""
        req: MossRequest = await parse(request, MossRequest)
        turn = await count_prompt(lambda: tokenizer.encode(dialogue.human(req.prompt) + dialogue.prefix(dialogue.MOSS)),
                                  "prompt")

        def run(post: Post) -> dict:
            # A request that fails creates no session (and so evicts none): check before creating.
            known = worker.find_conversation(req.uid)
            count = known.token_count if known is not None else worker.meta_tokens
            room = req.max_length - count - len(turn)  # max_length counts prompt + reply (§5.1)
            if room < 1:
                raise ServerRequestError(
                    400, f"this conversation has {count + len(turn)} tokens, max_length is {req.max_length}: "
                         "raise max_length or start a new conversation (send no uid)", param="max_length",
                    code="context_length_exceeded")
            uid, chat = worker.conversation(req.uid)
            greedy = req.temperature == 0
            try:
                reply = worker.chat_turn(chat, req.prompt, dict(
                    max_new_tokens=min(room, limits.max_tokens_limit), do_sample=not greedy,
                    temperature=req.temperature if not greedy else 1.0, top_p=req.top_p,
                    top_k=MOSS_DEFAULTS["top_k"], repetition_penalty=MOSS_DEFAULTS["repetition_penalty"],
                    stop=tuple(req.stop)), post)
            except BaseException:
                if known is None:  # its client never learns the uid: the new session is useless
                    worker.forget(uid)
                raise
            return {"response": reply.text, "history": [[q, r.text] for q, r in chat.history], "status": 200,
                    "time": time.strftime("%Y-%m-%d %H:%M:%S"), "uid": uid}

        try:
            return await _result(worker.submit(run, stream=False), request)
        except _ClientGone as exc:
            return _client_gone(request, exc)

    # -- the chat page ---------------------------------------------------------------------------
    if web:
        from jmoss.web import render_page

        page = render_page({
            "model": model_name, "meta": dialogue.base_meta_instruction(), "plugins": [p.capability or p.name for p in tools],
            "max_tokens": limits.max_tokens_limit,
            "defaults": {"temperature": MOSS_DEFAULTS["temperature"], "top_p": MOSS_DEFAULTS["top_p"],
                         "max_tokens": min(256, limits.max_tokens_limit)}})

        @app.get("/", include_in_schema=False)
        async def chat_page() -> HTMLResponse:
            return HTMLResponse(page.html, headers=page.headers)

    # -- OpenAI's API ----------------------------------------------------------------------------
    @app.get("/v1/models")
    async def list_models() -> dict:
        return {"object": "list", "data": [{"id": model_name, "object": "model", "created": created, "owned_by": "jmoss"}]}

    @app.get("/health")
    async def health() -> dict:
        return {"status": "ok", "model": model_name, "pending": worker.pending, "capacity": worker.capacity,
                "served": worker.served, "max_batch": len(worker.runner.slots) if worker.runner else 1,
                "cancelled": worker.cancelled, "sessions": len(worker.conversations),
                "limits": {"max_prompt_tokens": limits.max_prompt_tokens, "max_tokens": limits.max_tokens_limit}}

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Any:
        req: ChatCompletionRequest = await parse(request, ChatCompletionRequest)
        check_model(req.model)
        meta, turns, last = _messages_to_moss(req.messages, tools)
        opts = options(req, default_max=min(256, limits.max_tokens_limit), stop=() if tools else (_EOM,))
        reply_prefix = "" if tools else dialogue.prefix(dialogue.MOSS)  # the plugin loop writes its own fields
        history_ids: list[int] = []

        def prompt_ids() -> list[int]:
            # Encoded field by field, as Chat does, so a resent conversation matches the cached ids.
            ids = tokenizer.encode(meta) + [t for turn in turns for t in tokenizer.encode(turn)]
            history_ids[:] = ids
            return ids + tokenizer.encode(dialogue.human(last) + reply_prefix)

        ids = await count_prompt(prompt_ids, "messages")
        if tools:
            def run(post: Post) -> dict:
                chat = worker.new_chat(meta + "".join(turns))
                if req.jmoss_events and req.stream:
                    chat.on_event = lambda kind, text: post("event", {"kind": kind, "text": text})
                reply = worker.chat_turn(chat, last, {**opts.__dict__, "stop": tuple(opts.stop)}, post)
                extra = len(tokenizer.encode(reply.results + dialogue.prefix(dialogue.MOSS))) if reply.results else 0
                return {"text": reply.text, "finish_reason": "stop" if reply.finish_reason == "stop" else "length",
                        "prompt_tokens": len(ids) + extra, "completion_tokens": reply.generated_tokens}
        else:
            def run(post: Post) -> dict:
                return worker.complete(ids, opts, post, reply=True)

        job = worker.submit(run, stream=req.stream)
        ident, made = f"chatcmpl-{secrets.token_hex(12)}", int(time.time())
        if not req.stream:
            try:
                out = await _result(job, request)
            except _ClientGone as exc:
                return _client_gone(request, exc)
            return {"id": ident, "object": "chat.completion", "created": made, "model": model_name,
                    "choices": [{"index": 0, "message": {"role": "assistant", "content": out["text"]},
                                 "logprobs": None, "finish_reason": out["finish_reason"]}],
                    "usage": _usage(out)}

        def chunk(delta: dict, finish: str | None) -> dict:
            return {"id": ident, "object": "chat.completion.chunk", "created": made, "model": model_name,
                    "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}]}

        include_usage = bool(req.stream_options and req.stream_options.include_usage)
        return _event_stream(job, first=chunk({"role": "assistant", "content": ""}, None),
                             delta=lambda text: chunk({"content": text}, None),
                             last=lambda out: chunk({}, out["finish_reason"]),
                             usage=(lambda out: {**chunk({}, None), "choices": [], "usage": _usage(out)})
                             if include_usage else None,
                             event=lambda value: {**chunk({}, None), "jmoss_event": value})

    @app.post("/v1/completions")
    async def completions(request: Request) -> Any:
        req: CompletionRequest = await parse(request, CompletionRequest)
        check_model(req.model)
        if isinstance(req.prompt, list) and len(req.prompt) != 1:
            raise ServerRequestError(400, "prompt must be one string (batches are not served)", param="prompt",
                                     code="invalid_value")
        text = req.prompt if isinstance(req.prompt, str) else req.prompt[0]
        opts = options(req, default_max=min(16, limits.max_tokens_limit))  # OpenAI's default for completions
        ids = await count_prompt(lambda: tokenizer.encode(text), "prompt")
        job = worker.submit(lambda post: worker.complete(ids, opts, post, reply=False), stream=req.stream)
        ident, made = f"cmpl-{secrets.token_hex(12)}", int(time.time())

        def choice(text: str, finish: str | None) -> dict:
            return {"index": 0, "text": text, "logprobs": None, "finish_reason": finish}

        def body(choices: list, **extra: Any) -> dict:
            return {"id": ident, "object": "text_completion", "created": made, "model": model_name,
                    "choices": choices, **extra}

        if not req.stream:
            try:
                out = await _result(job, request)
            except _ClientGone as exc:
                return _client_gone(request, exc)
            return body([choice(out["text"], out["finish_reason"])], usage=_usage(out))
        include_usage = bool(req.stream_options and req.stream_options.include_usage)
        return _event_stream(job, first=None, delta=lambda t: body([choice(t, None)]),
                             last=lambda out: body([choice("", out["finish_reason"])]),
                             usage=(lambda out: body([], usage=_usage(out))) if include_usage else None)

    return app


def _usage(out: dict) -> dict:
    usage = {"prompt_tokens": out["prompt_tokens"], "completion_tokens": out["completion_tokens"],
             "total_tokens": out["prompt_tokens"] + out["completion_tokens"]}
    if "cached_tokens" in out:
        usage["prompt_tokens_details"] = {"cached_tokens": out["cached_tokens"]}
    return usage


def _event_stream(job: _Job, *, first: dict | None, delta: Callable[[str], dict], last: Callable[[dict], dict],
                  usage: Callable[[dict], dict] | None,
                  event: Callable[[dict], dict] | None = None) -> StreamingResponse:
    """Server-sent events in OpenAI's chunk shape; closing the connection cancels the job."""

    async def events() -> AsyncIterator[str]:
        finished = False
        try:
            if first is not None:
                yield _sse(first)
            while True:
                kind, value = await job.out.get()
                if kind == "delta":
                    yield _sse(delta(value))
                elif kind == "event":  # only posted when the request opted in (jmoss_events)
                    if event is not None:
                        yield _sse(event(value))
                elif kind == "error":
                    err: ServerRequestError = value
                    yield _sse({"error": {"message": err.message, "type": err.type, "param": err.param,
                                          "code": err.code}})
                    break
                else:
                    yield _sse(last(value))
                    if usage is not None:
                        yield _sse(usage(value))
                    break
            yield _sse("[DONE]")
            finished = True
        finally:  # normal end, or Starlette cancelled us because the client disconnected
            job.cancel()
            if not finished:
                log.info("a client disconnected before its streamed reply was complete")

    return StreamingResponse(events(), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


def _messages_to_moss(messages: list[_Message], plugins: Sequence["Plugin"]) -> tuple[str, list[str], str]:
    """(meta instruction, rendered earlier turns, last user text) in MOSS's SFT format (moss-spec §4.3).

    System/developer messages (only before the first turn) replace the meta instruction; the
    capability lines follow them when tools are on, or MOSS would not know it may call them.
    """
    system: list[str] = []
    turns: list[str] = []
    for i, m in enumerate(messages):
        if m.role in ("system", "developer"):
            if turns:
                raise ServerRequestError(400, "system messages must come before the conversation",
                                         param=f"messages.{i}.role", code="invalid_value")
            system.append(m.text())
        elif m.role == "user":
            turns.append(dialogue.human(m.text()))
        else:
            turns.append(dialogue.moss(m.text()))
    if messages[-1].role != "user":
        raise ServerRequestError(400, "the last message must be from the user", param="messages", code="invalid_value")
    if system:
        meta = "\n".join(system)
        meta = meta if meta.endswith("\n") else meta + "\n"
        meta = _with_capabilities(meta, plugins)
    else:
        meta = default_meta_instruction(plugins)
    turns.pop()  # the last user message is the turn to answer
    return meta, turns, messages[-1].text()


DEFAULT_HEADER_TIMEOUT = 10.0  # nginx's client_header_timeout is 60 s; a JSON API needs far less
DEFAULT_BODY_TIMEOUT = 30.0
DEFAULT_IDLE_TIMEOUT = 30.0
DEFAULT_MAX_CONNECTIONS = 1000


def _canned(status: bytes, text: bytes) -> bytes:
    return (b"HTTP/1.1 %s\r\ncontent-type: text/plain; charset=utf-8\r\nconnection: close\r\n"
            b"content-length: %d\r\n\r\n%s" % (status, len(text), text))


def timed_protocol(header_timeout: float = DEFAULT_HEADER_TIMEOUT, body_timeout: float = DEFAULT_BODY_TIMEOUT,
                   max_header_bytes: int = 16 * 1024) -> type:
    """uvicorn's h11 protocol plus the two client timeouts uvicorn lacks (it only times keep-alive).

    A connection must deliver a request's headers within ``header_timeout`` of connecting (or of
    the first byte after an idle keep-alive wait), and its whole body within ``body_timeout`` of
    the headers. Otherwise it is answered 408 (if no reply has started) and closed, with one info
    line: slow-loris clients cannot hold sockets or buffers. While the app works on a request
    nothing is timed (generating a reply may take minutes). Request line + headers longer than
    ``max_header_bytes`` get 431 (h11 bounds only an incomplete head; one that arrives whole in a
    single read passes it), an HTTP version other than 1.0/1.1 gets 505, as nginx answers.
    """
    import h11
    from uvicorn.protocols.http.h11_impl import H11Protocol

    class TimedH11Protocol(H11Protocol):
        _timer: asyncio.TimerHandle | None = None
        _phase = ""
        _checked: Any = None  # the request cycle whose head was checked

        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            self._arm("headers", header_timeout)

        def data_received(self, data: bytes) -> None:
            super().data_received(data)
            self._update()

        def on_response_complete(self) -> None:
            super().on_response_complete()
            self._update()

        def connection_lost(self, exc: Exception | None) -> None:
            self._disarm()
            super().connection_lost(exc)

        def _check_head(self) -> bool:
            """Refuse an oversized head or an unknown HTTP version before the app runs (its task is
            scheduled but has not started: marked disconnected, it sends nothing)."""
            cycle = self.cycle
            if cycle is None or cycle is self._checked:
                return True
            self._checked = cycle
            scope = cycle.scope
            size = len(scope["raw_path"]) + len(scope["query_string"]) + sum(len(k) + len(v) + 4 for k, v in scope["headers"])
            if size > max_header_bytes:
                answer, why = _canned(b"431 Request Header Fields Too Large", b"request headers too large\n"), \
                    f"its request line and headers are {size} bytes, over {max_header_bytes}"
            elif scope["http_version"] not in ("1.0", "1.1"):
                answer, why = _canned(b"505 HTTP Version Not Supported", b"HTTP/1.0 or HTTP/1.1 only\n"), \
                    f"it spoke HTTP/{scope['http_version'][:8]}"
            else:
                return True
            scope["jmoss.closed"] = True  # type: ignore[typeddict-unknown-key]
            cycle.disconnected = True
            cycle.message_event.set()
            self.transport.write(answer)
            self.transport.close()
            log.info("refused a request from %s: %s", self._who(), why)
            return False

        def _who(self) -> str:
            return "%s:%d" % tuple(self.client[:2]) if self.client else "a client"

        def _update(self) -> None:
            their = self.conn.their_state
            if not self._check_head() or self.transport.is_closing():
                self._disarm()
            elif their is h11.IDLE:  # waiting for a request line and headers
                if self.timeout_keep_alive_task is not None:
                    self._disarm()  # nothing sent since the last reply: uvicorn's keep-alive timer runs
                elif self._phase != "headers":
                    self._arm("headers", header_timeout)
            elif their is h11.SEND_BODY:
                if self._phase != "body":
                    self._arm("body", body_timeout)
            else:
                self._disarm()  # the request is in; the app answers in its own time

        def _arm(self, phase: str, seconds: float) -> None:
            self._disarm()
            self._phase = phase
            self._timer = self.loop.call_later(seconds, self._expired)

        def _disarm(self) -> None:
            if self._timer is not None:
                self._timer.cancel()
            self._timer, self._phase = None, ""

        def _expired(self) -> None:
            phase, seconds = self._phase, header_timeout if self._phase == "headers" else body_timeout
            self._timer, self._phase = None, ""
            if self.transport.is_closing():
                return
            log.info("closed the connection from %s: its request %s did not arrive within %g s", self._who(), phase,
                     seconds)
            cycle = self.cycle
            answering = cycle is not None and not cycle.response_complete
            if answering:
                cycle.scope["jmoss.closed"] = True  # type: ignore[typeddict-unknown-key]
                cycle.disconnected = True  # the app's receive() returns http.disconnect; a late reply is dropped
                cycle.message_event.set()
            if self.conn.our_state in (h11.IDLE, h11.SEND_RESPONSE) and not (answering and cycle.response_started):
                self.transport.write(_canned(b"408 Request Timeout", b"the request did not arrive in time\n"))
            self.transport.close()

    return TimedH11Protocol


def serve(model: "Model", host: str = "127.0.0.1", port: int = DEFAULT_PORT, *, log_level: str = "info",
          web: bool = True, header_timeout: float = DEFAULT_HEADER_TIMEOUT, body_timeout: float = DEFAULT_BODY_TIMEOUT,
          idle_timeout: float = DEFAULT_IDLE_TIMEOUT, max_connections: int = DEFAULT_MAX_CONNECTIONS,
          max_header_bytes: int = 16 * 1024, **limits: Any) -> None:
    """Serve ``model`` with uvicorn until interrupted; ``web`` and ``limits`` go to :func:`create_app`.

    ``header_timeout``/``body_timeout`` bound how long a request may take to arrive (see
    :func:`timed_protocol`), ``idle_timeout`` how long a keep-alive connection may sit idle between
    requests; past ``max_connections`` open connections new requests get 503. ``max_header_bytes``
    bounds the request line plus headers (431 and close).
    """
    import copy

    import uvicorn
    from uvicorn.config import LOGGING_CONFIG

    app = create_app(model, web=web, **limits)
    log_config = copy.deepcopy(LOGGING_CONFIG)  # jmoss.server's info lines (disconnects, timeouts) beside uvicorn's
    log_config["loggers"]["jmoss"] = {"handlers": ["default"], "level": log_level.upper(), "propagate": False}
    uvicorn.run(app, host=host, port=port, log_level=log_level, log_config=log_config, timeout_graceful_shutdown=5,
                http=timed_protocol(header_timeout, body_timeout, max_header_bytes), timeout_keep_alive=idle_timeout,  # type: ignore[arg-type]
                limit_concurrency=max_connections, h11_max_incomplete_event_size=max_header_bytes)
