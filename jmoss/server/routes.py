"""The HTTP side: the FastAPI app, its routes, and relaying a worker job's events to the client.

Handlers only parse, validate, tokenize (to enforce limits before queueing) and then relay what
the worker posts to the job's asyncio queue. A client that hangs up cancels its job: a queued job
is dropped and its place freed at once; a running one ends at generation's next step.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import secrets
import time
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any, AsyncIterator, Callable, Sequence

from fastapi import APIRouter, FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from jmoss import dialogue
from jmoss.errors import JmossError
from jmoss.lookup import parse_lookup
from jmoss.server.response_format import constraint_for
from jmoss.server.schemas import (
    MOSS_DEFAULTS, ChatCompletionRequest, CompletionRequest, MossRequest, Sampling, ServerRequestError,
    error_response, messages_to_moss, moss_options, openai_finish_reason, sampling_options, usage,
    validation_error,
)
from jmoss.server.worker import Job, Worker

if TYPE_CHECKING:
    from jmoss.api import Model
    from jmoss.plugins import Plugin

log = logging.getLogger("jmoss.server")

_EOM = "<eom>"


class ClientGone(Exception):
    """The client hung up; the message says when. Logged as one info line, answered with 499."""


@dataclass
class Service:
    """What every route needs: the worker, the model's name and tokenizer, the request limits."""

    worker: Worker
    model_name: str
    tokenizer: Any
    tools: list["Plugin"]
    max_prompt_tokens: int
    max_tokens_limit: int
    max_body_bytes: int
    created: int
    eos_token_id: int | None = None
    context: int = 2048  # positions of the KV cache a request runs in
    default_max_tokens: int = 256  # a reply's length when the request names none (jmoss serve -n)
    page: Any = None  # the chat page (jmoss.web), when served
    metrics: Any = None  # jmoss.server.metrics.Metrics
    lookup: int | str = "auto"  # prompt-lookup decoding for every request (jmoss.lookup; serve --lookup)

    async def parse(self, request: Request, schema: type[BaseModel]) -> Any:
        body = await _read_body(request, self.max_body_bytes)
        try:
            return schema.model_validate_json(body)
        except ValidationError as exc:
            raise validation_error(exc) from None

    def check_model(self, name: str) -> None:
        """Any name is served by the one loaded model (as llama.cpp's server does): clients written
        for another server keep their model string; replies name the model that answered."""

    def options(self, req: Sampling, default_max: int, stop: Sequence[str] = ()):
        opts = sampling_options(req, max_tokens_limit=self.max_tokens_limit, default_max=default_max, stop=stop)
        return replace(opts, lookup=self.lookup)

    async def constraint(self, fmt: Any, *, reply: bool) -> Any:
        """The request's response_format as a token constraint, compiled off the event loop (None: text)."""
        if fmt is None or fmt.type == "text":
            return None
        return await asyncio.to_thread(constraint_for, fmt, self.tokenizer, self.eos_token_id, reply=reply)

    async def grammar(self, lark: str) -> Any:
        from jmoss.constraints import lark as compile_lark

        try:
            return await asyncio.to_thread(compile_lark, self.tokenizer, lark, eos_token_id=self.eos_token_id)
        except JmossError as exc:
            raise ServerRequestError(400, f"tool_choice cannot be enforced: {exc}", param="tool_choice",
                                     code="invalid_value") from None

    async def count_prompt(self, ids_of: Callable[[], list[int]], param: str) -> list[int]:
        ids = await asyncio.to_thread(ids_of)  # the Rust tokenizer is thread-safe and releases the GIL
        if len(ids) > self.max_prompt_tokens:
            raise ServerRequestError(
                400, f"the prompt has {len(ids)} tokens (meta instruction included); this server allows at most "
                     f"{self.max_prompt_tokens}", param=param, code="context_length_exceeded")
        if not ids:
            raise ServerRequestError(400, "the prompt is empty", param=param, code="invalid_value")
        return ids


def _service(request: Request) -> Service:
    return request.app.state.service


router = APIRouter()


# -- MOSS's API ------------------------------------------------------------------------------------
@router.post("/")
async def moss_api(request: Request) -> Any:
    """moss_api_demo.py: ``{"prompt", "uid"?, ...}`` -> ``{"response", "history", "status", "time", "uid"}``."""
    svc = _service(request)
    req: MossRequest = await svc.parse(request, MossRequest)
    turn = await svc.count_prompt(
        lambda: svc.tokenizer.encode(dialogue.human(req.prompt) + dialogue.prefix(dialogue.MOSS)), "prompt")
    worker = svc.worker

    def run(job: Job) -> dict:
        # A request that fails creates no session (and so evicts none): check before creating.
        known = worker.find_conversation(req.uid)
        count = known.token_count if known is not None else worker.meta_tokens
        if req.truncation == "disabled" and count + len(turn) >= req.max_length:
            raise ServerRequestError(
                400, f"this conversation has {count + len(turn)} tokens, max_length is {req.max_length}: "
                     "raise max_length, start a new conversation (send no uid), or leave truncation at \"auto\" "
                     "to drop the oldest turns", param="max_length", code="context_length_exceeded")
        if worker.meta_tokens + len(turn) >= min(req.max_length, svc.context):
            raise ServerRequestError(
                400, f"this message has {len(turn)} tokens; with the meta instruction it leaves no room for a reply "
                     f"in {min(req.max_length, svc.context)} positions: send a shorter message",
                param="prompt", code="context_length_exceeded")
        uid, chat = worker.conversation(req.uid)
        limit = min(req.max_new_tokens or svc.max_tokens_limit, svc.max_tokens_limit)
        try:
            # max_length counts prompt + reply (§5.1): the Chat drops the oldest turns to fit it
            options = {**moss_options(req, limit), "lookup": svc.lookup}
            reply = worker.chat_turn(chat, req.prompt, options, job, max_len=req.max_length)
        except BaseException:
            if known is None:  # its client never learns the uid: the new session is useless
                worker.forget(uid)
            raise
        return {"response": reply.text, "history": [[q, r.text] for q, r in chat.history], "status": 200,
                "time": time.strftime("%Y-%m-%d %H:%M:%S"), "uid": uid, "dropped_turns": reply.dropped_turns}

    try:
        return await _result(worker.submit(run, stream=False), request)
    except ClientGone as exc:
        return _client_gone(request, exc)


async def chat_page(request: Request) -> HTMLResponse:
    page = _service(request).page
    return HTMLResponse(page.html, headers=page.headers)


# -- OpenAI's API ----------------------------------------------------------------------------------
@router.get("/v1/models")
async def list_models(request: Request) -> dict:
    svc = _service(request)
    return {"object": "list",
            "data": [{"id": svc.model_name, "object": "model", "created": svc.created, "owned_by": "jmoss"}]}


@router.get("/health")
async def health(request: Request) -> dict:
    svc = _service(request)
    worker = svc.worker
    return {"status": "ok", "model": svc.model_name, "pending": worker.pending, "capacity": worker.capacity,
            "served": worker.served, "max_batch": len(worker.runner.slots) if worker.runner else 1,
            "cancelled": worker.cancelled, "sessions": len(worker.conversations),
            "limits": {"max_prompt_tokens": svc.max_prompt_tokens, "max_tokens": svc.max_tokens_limit}}


@router.get("/metrics")
async def metrics(request: Request) -> Response:
    """Prometheus' text format (jmoss.server.metrics); needs the key when keys are set, unless --metrics-public."""
    body, content_type = _service(request).metrics.render()
    return Response(body, media_type=content_type)


@router.post("/v1/chat/completions")
async def chat_completions(request: Request) -> Any:
    svc = _service(request)
    req: ChatCompletionRequest = await svc.parse(request, ChatCompletionRequest)
    svc.check_model(req.model)
    constraint = await svc.constraint(req.response_format, reply=True)
    if req.tools:  # the client's functions (jmoss.server.tools); the server's --plugins sit this one out
        return await _client_tools_response(svc, req, constraint, request)
    tools, tokenizer, worker = svc.tools, svc.tokenizer, svc.worker
    meta, turns, last = messages_to_moss(req.messages, tools, worker.meta_instruction)
    opts = svc.options(req, default_max=min(svc.default_max_tokens, svc.max_tokens_limit),
                       stop=() if tools else (_EOM,))
    opts = replace(opts, constraint=constraint)  # with plugins it shapes the reply pass only
    n = req.n or 1
    if tools and (n > 1 or opts.logprobs is not None):
        raise ServerRequestError(400, "with plugins a chat request runs MOSS's tool loop: n and logprobs are not "
                                      "available", param="n" if n > 1 else "logprobs", code="invalid_value")
    reply_prefix = "" if tools else dialogue.prefix(dialogue.MOSS)  # the plugin loop writes its own fields
    dropped = {"turns": 0, "messages": 0}

    def prompt_ids() -> list[int]:
        # Encoded field by field, as Chat does, so a resent conversation matches the cached ids.
        meta_ids, last_ids = tokenizer.encode(meta), tokenizer.encode(dialogue.human(last) + reply_prefix)
        per_turn = [tokenizer.encode(turn) for turn in turns]
        if req.truncation == "auto":
            start, dropped["turns"] = fit_turns(len(meta_ids), [len(t) for t in per_turn],
                                                [t.startswith(dialogue.prefix(dialogue.HUMAN)) for t in turns],
                                                len(last_ids), svc.max_prompt_tokens, svc.context,
                                                min(opts.max_new_tokens, max(1, svc.context // 4)))
            dropped["messages"] = start
            del turns[:start], per_turn[:start]
        return meta_ids + [t for ids in per_turn for t in ids] + last_ids

    ids = await svc.count_prompt(prompt_ids, "messages")
    truncated = ({"jmoss_truncation": {"dropped_turns": dropped["turns"], "dropped_messages": dropped["messages"]}}
                 if dropped["turns"] else {})

    def run_tools(job: Job) -> dict:
        chat = worker.new_chat(meta + "".join(turns))
        if req.jmoss_events and req.stream:
            chat.on_event = lambda kind, text: job.post("event", {"kind": kind, "text": text})
        reply = worker.chat_turn(chat, last, {**opts.__dict__, "stop": tuple(opts.stop)}, job)
        extra = len(tokenizer.encode(reply.results + dialogue.prefix(dialogue.MOSS))) if reply.results else 0
        out = {"index": 0, "text": reply.text, "finish_reason": openai_finish_reason(reply.finish_reason),
               "logprobs": None, "prompt_tokens": len(ids) + extra, "completion_tokens": reply.generated_tokens}
        return {**out, "choices": [out]}

    def run(job: Job) -> dict:
        return worker.complete(ids, opts, job, reply=True, n=n)

    job = worker.submit(run_tools if tools else run, stream=req.stream)
    ident, made, name = f"chatcmpl-{secrets.token_hex(12)}", int(time.time()), svc.model_name

    def logprobs(entries: list | None) -> dict | None:
        return None if entries is None else {"content": entries, "refusal": None}

    if not req.stream:
        try:
            out = await _result(job, request)
        except ClientGone as exc:
            return _client_gone(request, exc)
        return {"id": ident, "object": "chat.completion", "created": made, "model": name,
                "choices": [{"index": c["index"], "message": {"role": "assistant", "content": c["text"]},
                             "logprobs": logprobs(c["logprobs"]), "finish_reason": c["finish_reason"]}
                            for c in out["choices"]],
                "usage": usage(out), **truncated}

    def chunk(delta: dict, finish: str | None, index: int = 0, entries: list | None = None) -> dict:
        return {"id": ident, "object": "chat.completion.chunk", "created": made, "model": name,
                "choices": [{"index": index, "delta": delta,
                             "logprobs": logprobs(entries) if opts.logprobs is not None else None,
                             "finish_reason": finish}]}

    def delta(value: tuple) -> dict:
        index, text, entries = value
        return chunk({"content": text}, None, index, entries)

    return _event_stream(job, first=[{**chunk({"role": "assistant", "content": ""}, None, i), **truncated}
                                     for i in range(n)],
                         delta=delta,
                         last=lambda out: [chunk({}, c["finish_reason"], c["index"]) for c in out["choices"]],
                         usage=(lambda out: {**chunk({}, None), "choices": [], "usage": usage(out)})
                         if req.include_usage else None,
                         event=lambda value: {**chunk({}, None), "jmoss_event": value})


def _prompt_ids(tokenizer: Any, meta: str, pieces: Sequence[str]) -> list[int]:
    # Encoded field by field, as Chat does, so a resent conversation matches the cached ids.
    return tokenizer.encode(meta) + [t for piece in pieces for t in tokenizer.encode(piece)]


async def _client_tools_job(svc: Service, req: ChatCompletionRequest, constraint: Any) -> Callable[[Job], dict]:
    """The client's functions: MOSS's Commands come back as tool_calls, tool messages go in as Results."""
    from jmoss.server import tools as tool_calls

    if (req.n or 1) > 1 or req.logprobs:
        raise ServerRequestError(400, "with tools a chat request runs MOSS's Commands pass: n and logprobs are not "
                                      "available", param="n" if (req.n or 1) > 1 else "logprobs", code="invalid_value")
    tokenizer, worker = svc.tokenizer, svc.worker
    toolset = tool_calls.ToolSet.from_request(req.tools or [])
    rendered = tool_calls.render(req.messages, toolset, worker.meta_instruction or dialogue.base_meta_instruction())
    choice = req.tool_choice or "auto"
    parallel = req.parallel_tool_calls is not False
    base = svc.options(req, default_max=min(svc.default_max_tokens, svc.max_tokens_limit))
    reply_opts = replace(base, stop=tuple(base.stop) + (_EOM,), constraint=constraint)
    pass1_opts = replace(base, stop=tuple(base.stop) + ("<eoc>", _EOM), skip_special_tokens=False)
    forced = tool_calls.tool_choice_name(choice, toolset)
    if choice == "required" or forced:
        grammar = tool_calls.call_grammar(tokenizer, toolset, forced, parallel)
        pass1_opts = replace(pass1_opts, constraint=await svc.grammar(grammar))
    ids = await svc.count_prompt(lambda: _prompt_ids(tokenizer, rendered.meta, rendered.pieces), "messages")

    def run(job: Job) -> dict:
        return worker.passes(ids, job, lambda gen: tool_calls.run_turn(
            gen, tokenizer, rendered, ids, toolset, reply_opts=reply_opts, pass1_opts=pass1_opts,
            none=choice == "none", parallel=parallel, post=lambda delta: job.post("delta", delta)))

    return run


async def _client_tools_response(svc: Service, req: ChatCompletionRequest, constraint: Any, request: Request) -> Any:
    """A tools request answered: tool_calls (finish_reason "tool_calls"), or MOSS's reply."""
    job = svc.worker.submit(await _client_tools_job(svc, req, constraint), stream=req.stream)
    ident, made, name = f"chatcmpl-{secrets.token_hex(12)}", int(time.time()), svc.model_name
    if not req.stream:
        try:
            out = await _result(job, request)
        except ClientGone as exc:
            return _client_gone(request, exc)
        message: dict[str, Any] = {"role": "assistant", "content": out["text"]}
        if out.get("tool_calls"):
            message["tool_calls"] = out["tool_calls"]
        if out.get("reasoning"):
            message["reasoning_content"] = out["reasoning"]
        return {"id": ident, "object": "chat.completion", "created": made, "model": name,
                "choices": [{"index": 0, "message": message, "logprobs": None, "finish_reason": out["finish_reason"]}],
                "usage": usage(out)}

    def chunk(delta: dict, finish: str | None) -> dict:
        return {"id": ident, "object": "chat.completion.chunk", "created": made, "model": name,
                "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}]}

    def delta(value: Any) -> dict:
        if isinstance(value, tuple):  # a reply pass's (choice index, text, logprob entries)
            value = value[1]
        return chunk({"content": value} if isinstance(value, str) else value, None)  # text, or a tool-call delta

    return _event_stream(job, first=chunk({"role": "assistant", "content": ""}, None), delta=delta,
                         last=lambda out: chunk({}, out["finish_reason"]),
                         usage=(lambda out: {**chunk({}, None), "choices": [], "usage": usage(out)})
                         if req.include_usage else None)


def fit_turns(meta: int, turns: list[int], starts: list[bool], last: int, max_prompt: int, context: int,
              reserve: int) -> tuple[int, int]:
    """How many leading messages to drop, and how many whole turns that is, so that the prompt
    (meta instruction + kept messages + the last one) fits ``max_prompt`` and leaves ``reserve``
    positions of ``context`` for the reply. A turn starts at a user message; the meta instruction
    and the last message are always kept (too long alone: the 400 says so, as before)."""
    total = meta + sum(turns) + last
    start = dropped = 0
    while start < len(turns) and (total > max_prompt or total + reserve > context):
        end = start + 1
        while end < len(turns) and not starts[end]:
            end += 1  # a turn is a user message and the replies after it
        total -= sum(turns[start:end])
        start, dropped = end, dropped + 1
    return start, dropped


@router.post("/v1/completions")
async def completions(request: Request) -> Any:
    svc = _service(request)
    req: CompletionRequest = await svc.parse(request, CompletionRequest)
    svc.check_model(req.model)
    if isinstance(req.prompt, list) and len(req.prompt) != 1:
        raise ServerRequestError(400, "prompt must be one string (batches are not served)", param="prompt",
                                 code="invalid_value")
    text = req.prompt if isinstance(req.prompt, str) else req.prompt[0]
    opts = svc.options(req, default_max=min(16, svc.max_tokens_limit))  # OpenAI's default for completions
    opts = replace(opts, constraint=await svc.constraint(req.response_format, reply=False))
    ids = await svc.count_prompt(lambda: svc.tokenizer.encode(text), "prompt")
    n = req.n or 1
    job = svc.worker.submit(lambda job: svc.worker.complete(ids, opts, job, reply=False, n=n), stream=req.stream)
    ident, made = f"cmpl-{secrets.token_hex(12)}", int(time.time())

    def legacy(entries: list | None) -> dict | None:
        """The completions endpoint's older logprobs shape, from the chat shape's entries."""
        if entries is None:
            return None
        offsets, at = [], 0
        for e in entries:
            offsets.append(at)
            at += len(e["token"])
        return {"tokens": [e["token"] for e in entries], "token_logprobs": [e["logprob"] for e in entries],
                "top_logprobs": [{t["token"]: t["logprob"] for t in e["top_logprobs"]} for e in entries],
                "text_offset": offsets}

    def choice(text: str, finish: str | None, index: int = 0, entries: list | None = None) -> dict:
        return {"index": index, "text": text, "logprobs": legacy(entries), "finish_reason": finish}

    def body(choices: list, **extra: Any) -> dict:
        return {"id": ident, "object": "text_completion", "created": made, "model": svc.model_name,
                "choices": choices, **extra}

    if not req.stream:
        try:
            out = await _result(job, request)
        except ClientGone as exc:
            return _client_gone(request, exc)
        return body([choice(c["text"], c["finish_reason"], c["index"], c["logprobs"]) for c in out["choices"]],
                    usage=usage(out))
    return _event_stream(job, first=None, delta=lambda v: body([choice(v[1], None, v[0], v[2] if
                                                                         opts.logprobs is not None else None)]),
                         last=lambda out: [body([choice("", c["finish_reason"], c["index"])]) for c in out["choices"]],
                         usage=(lambda out: body([], usage=usage(out))) if req.include_usage else None)


class _Counted:
    """Starlette middleware shape around Metrics.middleware (requests by route and status)."""

    def __init__(self, app: Any, metrics: Any):
        self._app = metrics.middleware(app)

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        await self._app(scope, receive, send)


# -- errors ----------------------------------------------------------------------------------------
async def _on_request_error(request: Request, exc: ServerRequestError) -> JSONResponse:
    return exc.response()


async def _on_http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    kind = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
    return error_response(exc.status_code, str(exc.detail), code=kind, headers=dict(exc.headers or {}))


async def _on_client_gone(request: Request, exc: ClientGone) -> Response:
    return _client_gone(request, exc)


async def _on_bug(request: Request, exc: Exception) -> JSONResponse:
    log.exception("request failed")
    return error_response(500, "internal server error", type="server_error")


# -- relaying a job --------------------------------------------------------------------------------
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
        raise ClientGone("before its request body was read") from None
    return b"".join(chunks)


async def _wait_for_disconnect(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


def _client_gone(request: Request, exc: ClientGone | None = None) -> Response:
    if not request.scope.get("jmoss.closed"):  # the protocol already logged why it closed it
        client = request.client
        who = f"{client.host}:{client.port}" if client else "a client"
        log.info("%s disconnected %s (%s %s)", who, (exc and str(exc)) or "before the reply was complete",
                 request.method, request.url.path)
    return Response(status_code=499)


async def _result(job: Job, request: Request) -> Any:
    """The job's result; cancels the job if the client hangs up first."""
    watcher = asyncio.ensure_future(_wait_for_disconnect(request))
    try:
        while True:
            getter = asyncio.ensure_future(job.out.get())
            done, _ = await asyncio.wait({getter, watcher}, return_when=asyncio.FIRST_COMPLETED)
            if getter not in done:
                getter.cancel()
                raise ClientGone("before the reply was ready")
            kind, value = getter.result()
            if kind == "error":
                raise value
            if kind == "done":
                return value
    finally:
        watcher.cancel()
        job.cancel()


def _sse(payload: Any) -> str:
    return f"data: {payload if isinstance(payload, str) else json.dumps(payload, ensure_ascii=False)}\n\n"


def _event_stream(job: Job, *, first: dict | list[dict] | None, delta: Callable[[Any], dict],
                  last: Callable[[dict], dict | list[dict]],
                  usage: Callable[[dict], dict] | None,
                  event: Callable[[dict], dict] | None = None) -> StreamingResponse:
    """Server-sent events in OpenAI's chunk shape; closing the connection cancels the job."""

    async def events() -> AsyncIterator[str]:
        finished = False
        try:
            for payload in first if isinstance(first, list) else [first] if first is not None else []:
                yield _sse(payload)
            while True:
                kind, value = await job.out.get()
                if kind == "delta":
                    yield _sse(delta(value))
                elif kind == "event":  # only posted when the request opted in (jmoss_events)
                    if event is not None:
                        yield _sse(event(value))
                elif kind == "error":
                    yield _sse(value.body())
                    break
                else:
                    ends = last(value)
                    for payload in ends if isinstance(ends, list) else [ends]:
                        yield _sse(payload)
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


# -- the app ---------------------------------------------------------------------------------------
def base_app(lifespan: Callable[[FastAPI], Any] | None = None) -> FastAPI:
    """The FastAPI app every jmoss HTTP front starts from (this process's, and a Ray cluster's front,
    jmoss.server.ray_app), so both answer every error in OpenAI's shape."""
    app = FastAPI(title="jmoss", summary="MOSS over HTTP: MOSS's uid API and the OpenAI API", lifespan=lifespan)
    app.add_exception_handler(ServerRequestError, _on_request_error)  # type: ignore[arg-type]
    app.add_exception_handler(StarletteHTTPException, _on_http_error)  # type: ignore[arg-type]
    app.add_exception_handler(ClientGone, _on_client_gone)  # type: ignore[arg-type]
    app.add_exception_handler(Exception, _on_bug)
    return app


def create_app(
    model: "TextModel",
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
    api_keys: Sequence[str] = (),
    metrics_public: bool = False,
    default_max_tokens: int = 256,
    meta_instruction: str | None = None,
    lookup: int | str = "auto",
) -> FastAPI:
    """The ASGI app serving ``model``; its worker thread starts here and stops at shutdown.

    ``max_prompt_tokens`` (default: the model's context minus one) bounds each request's prompt,
    meta instruction included; ``max_tokens_limit`` bounds max_tokens (and MOSS's max_length
    replies); ``session_limit``/``session_ttl`` bound the uid conversations. ``web`` serves the
    chat page at ``GET /``. ``max_batch`` sequences are generated together (continuous batching;
    load the model with ``batch=max_batch`` so its memory plan pays for their KV cache).
    ``default_max_tokens``: a reply's length when a request names none. ``meta_instruction``:
    what a conversation without a system message starts with (default MOSS's).
    ``api_keys``: when given, every route but ``/health`` and the page (and ``/metrics`` with
    ``metrics_public``) needs ``Authorization: Bearer KEY`` (jmoss.server.auth). ``lookup`` is
    every request's prompt-lookup setting (jmoss.lookup: "off", "auto" or a draft length).
    """
    from jmoss.server.auth import ApiKeyMiddleware, check_key
    from jmoss.server.metrics import Metrics

    from jmoss.plugins import Plugin, load_plugins

    names = [p for p in plugins if isinstance(p, str)]
    tools: list[Plugin] = [p for p in plugins if isinstance(p, Plugin)]
    if names:
        tools += load_plugins(names, **(plugin_options or {}))
    worker = Worker(model, tools, queue_size, session_limit, session_ttl, max_batch, meta_instruction)
    context = worker.runner.max_len if worker.runner is not None else worker.session.max_len
    svc = Service(worker, model_name, model.tokenizer, tools,
                  max_prompt_tokens=min(max_prompt_tokens or context - 1, context - 1),
                  max_tokens_limit=max_tokens_limit, max_body_bytes=max_body_bytes, created=int(time.time()),
                  context=context, default_max_tokens=default_max_tokens, eos_token_id=model.config.eos_token_id,
                  lookup=parse_lookup(lookup))
    svc.metrics = Metrics(model, worker)
    keys = [check_key(k) for k in api_keys]

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        yield
        worker.stop()

    app = base_app(lifespan)
    app.state.worker, app.state.service = worker, svc
    app.include_router(router)

    def public(method: str, path: str) -> bool:
        return path == "/health" or (web and path == "/" and method in ("GET", "HEAD")) or \
            (metrics_public and path == "/metrics")

    if keys:
        app.add_middleware(ApiKeyMiddleware, keys=keys, public=public)
    app.add_middleware(_Counted, metrics=svc.metrics)  # outermost: refused keys are counted too
    if web:
        from jmoss.web import render_page

        svc.page = render_page({
            "model": model_name, "meta": meta_instruction or dialogue.base_meta_instruction(), "context": context,
            "plugins": [p.capability or p.name for p in tools], "max_tokens": max_tokens_limit, "auth": bool(keys),
            "defaults": {"temperature": MOSS_DEFAULTS["temperature"], "top_p": MOSS_DEFAULTS["top_p"],
                         "max_tokens": min(default_max_tokens, max_tokens_limit)}})
        app.add_api_route("/", chat_page, methods=["GET"], include_in_schema=False)
    return app
