"""The model worker: one thread owns the model and its KV cache; jobs run in arrival order.

The model (its one KV cache, jittor) is not thread-safe, so all model work runs here. Admission is
bounded: at most ``queue_size`` jobs wait behind the running ones; the next request gets 503 at
once. A job whose client left before it started is dropped; a running one stops at the next
step, as generation checks its cancel callback (``Job.should_stop``) between steps.

Memory. The worker owns one KV cache for the server's lifetime, shared by every request and every
uid conversation (each Chat runs on it), so memory does not grow with clients or sessions. What
the cache holds is remembered (:class:`CacheState`): a stateless request that shares a prefix with
the previous one prefills only its new tokens, and a uid conversation whose cache was not
displaced continues without re-reading its history. uid sessions keep only ids and text, bounded
in number (LRU) and age.

Batching. With ``max_batch`` > 1 up to that many jobs run at once, each on its own thread and its
own slot of a :class:`jmoss.batching.BatchRunner`; a Chat runs a turn on the slot leased for it.
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
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any, Callable, Iterator

from jmoss.batching import BatchRunner, DetachedSession, StepCancelled
from jmoss.errors import JmossError
from jmoss.generation import Finish, GenerationOptions, fit_to_context, shared_prefix, stream_steps
from jmoss.server.schemas import ServerRequestError, default_meta_instruction, openai_finish_reason, request_error
from jmoss.stats import TTFT_BUCKETS, Histogram

if TYPE_CHECKING:
    from jmoss.api import Model
    from jmoss.chat import Chat, Reply
    from jmoss.plugins import Plugin

log = logging.getLogger("jmoss.server")


class Cancelled(Exception):
    """A job's generation ended because its client had gone: no reply to deliver."""


@dataclass
class Job:
    run: Callable[["Job"], Any]  # runs on the worker; calls job.post("delta", text) when streaming
    loop: asyncio.AbstractEventLoop
    stream: bool
    release: Callable[["Job"], None]
    out: asyncio.Queue = field(default_factory=asyncio.Queue)
    cancelled: threading.Event = field(default_factory=threading.Event)
    started: bool = False
    released: bool = False
    created: float = field(default_factory=time.monotonic)

    def post(self, kind: str, value: Any) -> None:
        """From the worker thread: hand an event to the handler's event loop."""
        if kind == "delta" and not self.stream:
            return
        with contextlib.suppress(RuntimeError):  # the loop is closed: the server is stopping
            self.loop.call_soon_threadsafe(self.out.put_nowait, (kind, value))

    def should_stop(self) -> bool:
        """Generation's cancel callback: the client has gone."""
        return self.cancelled.is_set()

    def cancel(self) -> None:
        """From the handler: the client is gone (or the reply was delivered)."""
        self.cancelled.set()
        self.release(self)  # a no-op once the worker has started it: the worker releases then


@dataclass
class Conversation:
    chat: "Chat"
    last_used: float


@dataclass
class CacheState:
    """What a cache holds: the ids of the last stateless request (``ids``), or the Chat that last ran
    (``owner``). The single worker keeps one; a batch Slot carries the same two attributes."""

    ids: list[int] = field(default_factory=list)
    owner: Any = None


def _serialized(method: Callable) -> Callable:
    """Run ``method`` under the worker's conversation lock (batched jobs call it from many threads)."""

    def locked(self: "Worker", *args: Any, **kwargs: Any) -> Any:
        with self._conv_lock:
            return method(self, *args, **kwargs)

    return locked


class Worker:
    """Owns the model, its KV cache, the uid conversations and the admission counter.

    ``max_batch`` 1: one thread runs one job at a time on one cache. More: up to ``max_batch`` jobs
    run at once, each in its own thread on a slot of a :class:`jmoss.batching.BatchRunner`, whose
    thread runs one forward per step for all of them (continuous batching).
    """

    def __init__(self, model: "TextModel", plugins: list["Plugin"], queue_size: int, session_limit: int,
                 session_ttl: float, max_batch: int = 1, meta_instruction: str | None = None):
        self.model, self.plugins = model, plugins
        self.meta_instruction = meta_instruction  # a server's --system (None: MOSS's)
        self.capacity = queue_size + max_batch  # waiting + the ones running
        self.session_limit, self.session_ttl = session_limit, session_ttl
        self.runner = BatchRunner(model, max_batch) if max_batch > 1 else None
        # The cache a Chat is built on: the single worker's one session (allocated once), or, batched,
        # none until a turn leases it a slot.
        self.session = model.session() if self.runner is None else DetachedSession(self.runner.max_len)
        self._running = threading.Semaphore(max_batch)
        self._conv_lock = threading.RLock()
        self._turn_locks: dict[int, threading.Lock] = {}  # one turn at a time per Chat (same uid twice)
        self.conversations: OrderedDict[str, Conversation] = OrderedDict()
        self._jobs: queue.SimpleQueue[Job | None] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self.pending = 0
        self.running = 0  # jobs started and not finished (pending - running wait in the queue)
        self.queue_wait = Histogram(TTFT_BUCKETS)  # seconds from submit to start, per job started
        self.served = 0
        self.cancelled = 0  # jobs dropped or stopped because their client left
        self._state = CacheState()  # what the single cache holds (max_batch 1)
        self._meta_tokens: int | None = None
        self._thread = threading.Thread(target=self._loop, name="jmoss-model-worker", daemon=True)
        self._thread.start()

    # -- admission (event-loop side) ---------------------------------------------------------
    def submit(self, run: Callable[[Job], Any], *, stream: bool) -> Job:
        with self._lock:
            if self.pending >= self.capacity:
                raise ServerRequestError(
                    503, f"the server is busy ({self.pending} requests queued or running); retry shortly",
                    type="server_busy", code="queue_full", headers={"Retry-After": "1"})
            self.pending += 1
        job = Job(run=run, loop=asyncio.get_running_loop(), stream=stream, release=self._release)
        self._jobs.put(job)
        return job

    def _release(self, job: Job, *, finished: bool = False) -> None:
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
                self.running += 1
                self.queue_wait.observe(time.monotonic() - job.created)
            if self.runner is None:
                self._run_job(job)
            else:
                threading.Thread(target=self._run_job, args=(job,), name="jmoss-job", daemon=True).start()

    def _run_job(self, job: Job) -> None:
        try:
            job.post("done", job.run(job))
            with self._lock:
                self.served += 1
        except (Cancelled, StepCancelled):
            with self._lock:
                self.cancelled += 1
        except JmossError as exc:
            job.post("error", request_error(exc))
        except Exception:  # a bug must cost one request, never the server
            log.exception("generation failed")
            if self.runner is None:
                self._forget_cache()
            job.post("error", ServerRequestError(500, "internal error during generation", type="server_error"))
        finally:
            with self._lock:
                self.running -= 1
            self._release(job, finished=True)
            self._running.release()

    @property
    def waiting(self) -> int:
        """Requests admitted and not yet started."""
        with self._lock:
            return self.pending - self.running

    def kv_positions(self) -> tuple[int, int]:
        """(positions the KV caches hold tokens in, positions allocated for them)."""
        if self.runner is None:
            return self.session.length, self.session.max_len
        return sum(s.length for s in self.runner.slots), self.runner.max_len * len(self.runner.slots)

    def _forget_cache(self) -> None:
        self.session.reset()
        self._state.ids, self._state.owner = [], None

    @contextlib.contextmanager
    def _cache(self, job: Job, score: Callable[[Any], float]) -> Iterator[tuple[Any, Any]]:
        """(session, what it holds) for one job: the single cache, or a batch slot leased for the job
        (the free slot with the best ``score``: one that already holds this job's tokens)."""
        if self.runner is None:
            yield self.session, self._state
            return
        slot = self.runner.acquire(score)
        slot.cancel = job.cancelled  # a step it waits for is dropped once its client has gone
        try:
            yield slot, slot
        except (Cancelled, StepCancelled, JmossError):
            raise
        except BaseException:
            slot.reset()
            slot.ids, slot.owner = [], None
            raise
        finally:
            self.runner.release(slot)

    # -- jobs (run on the worker thread) -----------------------------------------------------
    def complete(self, ids: list[int], opts: GenerationOptions, job: Job, *, reply: bool, n: int = 1) -> dict:
        """Continue ``ids`` ``n`` times (OpenAI's ``n``); with ``reply`` the text is MOSS's reply (leading
        space of "<|MOSS|>: " dropped). Deltas are posted as ``(choice index, text, token entries)``.

        The cache is truncated to the longest prefix shared with what it holds, so a request that
        repeats the meta instruction or the previous conversation prefills only its new tokens
        (so do the 2nd..nth choices). With a batch runner the choices run at once, each on a slot.
        """
        fit_to_context(opts.max_new_tokens, len(ids), self.runner.max_len if self.runner else self.session.max_len)
        seeds = [opts.seed + i if opts.seed is not None else None for i in range(n)]  # reproducible, not equal
        score = lambda held: -1 if held.owner is not None else shared_prefix(held.ids, ids)  # noqa: E731

        def one(i: int) -> dict:
            with self._cache(job, score) as (session, state):
                return self._complete(session, state, ids, replace(opts, seed=seeds[i]), job, reply=reply, index=i)

        if n == 1 or self.runner is None:
            outs = [one(i) for i in range(n)]
        else:
            outs = [None] * n
            errors: list[BaseException] = []

            def work(i: int) -> None:
                try:
                    outs[i] = one(i)
                except BaseException as exc:  # noqa: BLE001 - re-raised below, on the job's thread
                    errors.append(exc)
                    job.cancelled.set()  # the others stop at their next step: the request has failed

            threads = [threading.Thread(target=work, args=(i,), name="jmoss-choice", daemon=True) for i in range(n)]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            if errors:
                raise next((e for e in errors if not isinstance(e, (Cancelled, StepCancelled))), errors[0])
        first = outs[0]
        return {**first, "choices": outs, "completion_tokens": sum(o["completion_tokens"] for o in outs)}

    def passes(self, ids: list[int], job: Job, body: Callable[[Callable[..., dict]], Any]) -> Any:
        """``body(run)`` on one cache leased for the job, where ``run(ids, opts, reply=, stream=True)``
        is one :meth:`complete` pass: several passes of one reply (OpenAI tool calls: MOSS's Commands,
        then its answer) continue each other on the same cache. ``ids`` picks the cache."""
        score = lambda held: -1 if held.owner is not None else shared_prefix(held.ids, ids)  # noqa: E731
        with self._cache(job, score) as (session, state):
            def run(ids: list[int], opts: GenerationOptions, *, reply: bool, stream: bool = True) -> dict:
                return self._complete(session, state, ids, opts, job, reply=reply, stream=stream)

            return body(run)

    def _complete(self, session: Any, state: Any, ids: list[int], opts: GenerationOptions, job: Job, *,
                  reply: bool, index: int = 0, stream: bool = True) -> dict:
        if state.owner is not None:  # a uid conversation's tokens: nothing to share
            session.reset()
            state.ids, state.owner = [], None
        fit_to_context(opts.max_new_tokens, len(ids), session.max_len)  # refused before the cache is touched
        keep = min(shared_prefix(state.ids, ids), len(ids) - 1, session.length)
        session.truncate(keep)
        tokens: list[int] = []
        entries: list[dict] = []
        text, first = "", reply
        finish = Finish()
        try:
            for step in stream_steps(self.model, session, ids[keep:], opts, history=ids[:keep],
                                     should_stop=job.should_stop, fit_context=True):
                if step.token is not None:
                    tokens.append(step.token)
                finish = step.finish or finish
                new = self._entries(step) if opts.logprobs is not None and not step.stop else []
                entries += new
                delta = step.text
                if first and delta:  # the model writes "<|MOSS|>: text"; the reply is the text
                    delta, first = delta.lstrip(" "), not delta.strip(" ")
                if delta or new:
                    text += delta
                    if stream:
                        job.post("delta", (index, delta, new))
        finally:
            state.ids = (ids + tokens)[: session.length]
        if finish.reason == "cancelled":
            raise Cancelled()
        return {"index": index, "text": text, "finish_reason": openai_finish_reason(finish.reason),
                "logprobs": entries if opts.logprobs is not None else None,
                "prompt_tokens": len(ids), "completion_tokens": len(tokens), "cached_tokens": keep, "tokens": tokens}

    def _entries(self, step: Any) -> list[dict]:
        """OpenAI's logprobs entry of a step's token: text, logprob, UTF-8 bytes, most likely alternatives."""
        if step.token is None or step.logprob is None:
            return []
        tok = self.model.tokenizer

        def entry(token: int, logprob: float) -> dict:
            raw = tok.decode_bytes([token])
            return {"token": raw.decode("utf-8", errors="replace"), "logprob": logprob, "bytes": list(raw)}

        return [{**entry(step.token, step.logprob),
                 "top_logprobs": [entry(t, lp) for t, lp in step.top_logprobs or []]}]

    def chat_turn(self, chat: "Chat", text: str, options: dict, job: Job, max_len: int | None = None) -> "Reply":
        """One turn of a Chat on the shared cache (MOSS's plugin loop runs here when enabled);
        ``max_len`` caps the turn's context below the cache's (MOSS's ``max_length``)."""
        if max_len is not None:
            options = {**options, "max_len": max_len}
        if self.runner is not None:
            reply = self._batched_turn(chat, text, options, job)
        else:
            if self._state.owner is not chat:
                self.session.reset()  # the cache holds someone else's tokens: this chat re-reads its own
            self._state.owner, self._state.ids = chat, []
            try:
                reply = self._stream_turn(chat, text, options, job)
            except JmossError:
                raise  # Chat closed the turn; the cache still matches it
            except BaseException:
                self._forget_cache()
                raise
        if reply.finish_reason == "cancelled":
            raise Cancelled()  # Chat closed the turn as far as it went
        return reply

    def _batched_turn(self, chat: "Chat", text: str, options: dict, job: Job) -> "Reply":
        """chat_turn on a batch slot: the chat's own slot when its cache is still there (uid KV kept)."""
        with self._conv_lock:
            turn_lock = self._turn_locks.setdefault(id(chat), threading.Lock())
        score = lambda held: 1 if held.owner is chat else -1 if held.owner is not None else 0  # noqa: E731
        with turn_lock, self._cache(job, score) as (slot, _):
            if slot.owner is not chat:
                slot.reset()
                slot.owner, slot.ids = chat, []
            return self._stream_turn(chat, text, options, job, session=slot)

    @staticmethod
    def _stream_turn(chat: "Chat", text: str, options: dict, job: Job, session: Any = None) -> "Reply":
        for delta in chat.stream(text, session=session, should_stop=job.should_stop, **options):
            job.post("delta", (0, delta, []))
        assert chat.last_reply is not None
        return chat.last_reply

    def new_chat(self, meta_instruction: str) -> "Chat":
        from jmoss.chat import Chat

        chat = Chat(self.model, meta_instruction, plugins=self.plugins, session=self.session)  # resets the cache
        if self.runner is None:
            self._state.owner, self._state.ids = chat, []
        return chat

    # -- uid conversations -------------------------------------------------------------------
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
            self._meta_tokens = len(self.model.tokenizer.encode(default_meta_instruction(self.plugins, self.meta_instruction)))
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
        chat = self.new_chat(default_meta_instruction(self.plugins, self.meta_instruction))
        self.conversations[uid] = Conversation(chat, now)
        return uid, chat

    def _drop(self, uid: str) -> None:
        gone = self.conversations.pop(uid)
        self._turn_locks.pop(id(gone.chat), None)
        if self.runner is None and self._state.owner is gone.chat:
            self._forget_cache()
