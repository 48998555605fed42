"""The HTTP side: the FastAPI app, its routes, and relaying a worker job's events to the client.

Handlers only parse, validate, tokenize (to enforce limits before queueing) and then relay what
the worker posts to the job's asyncio queue. A client that hangs up cancels its job: a queued job
is dropped and its place freed at once; a running one ends at generation's next step.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import secrets
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, AsyncIterator, Callable, Sequence

from fastapi import APIRouter, FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from jmoss import dialogue
from jmoss.lookup import parse_lookup
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
    page: Any = None  # the chat page (jmoss.web), when served
    lookup: int | str = "auto"  # prompt-lookup decoding for every request (jmoss.lookup; serve --lookup)

    async def parse(self, request: Request, schema: type[BaseModel]) -> Any:
        body = await _read_body(request, self.max_body_bytes)
        try:
            return schema.model_validate_json(body)
        except ValidationError as exc:
            raise validation_error(exc) from None

    def check_model(self, name: str) -> None:
        if name != self.model_name:
            raise ServerRequestError(404, f"The model `{name}` does not exist; this server serves `{self.model_name}`",
                                     param="model", code="model_not_found")

    def options(self, req: Sampling, default_max: int, stop: Sequence[str] = ()):
        opts = sampling_options(req, max_tokens_limit=self.max_tokens_limit, default_max=default_max, stop=stop)
        return dataclasses.replace(opts, lookup=self.lookup)

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
        room = req.max_length - count - len(turn)  # max_length counts prompt + reply (§5.1)
        if room < 1:
            raise ServerRequestError(
                400, f"this conversation has {count + len(turn)} tokens, max_length is {req.max_length}: "
                     "raise max_length or start a new conversation (send no uid)", param="max_length",
                code="context_length_exceeded")
        uid, chat = worker.conversation(req.uid)
        try:
            options = {**moss_options(req, min(room, svc.max_tokens_limit)), "lookup": svc.lookup}
            reply = worker.chat_turn(chat, req.prompt, options, job)
        except BaseException:
            if known is None:  # its client never learns the uid: the new session is useless
                worker.forget(uid)
            raise
        return {"response": reply.text, "history": [[q, r.text] for q, r in chat.history], "status": 200,
                "time": time.strftime("%Y-%m-%d %H:%M:%S"), "uid": uid}

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


@router.post("/v1/chat/completions")
async def chat_completions(request: Request) -> Any:
    svc = _service(request)
    req: ChatCompletionRequest = await svc.parse(request, ChatCompletionRequest)
    svc.check_model(req.model)
    tools, tokenizer, worker = svc.tools, svc.tokenizer, svc.worker
    meta, turns, last = messages_to_moss(req.messages, tools)
    opts = svc.options(req, default_max=min(256, svc.max_tokens_limit), stop=() if tools else (_EOM,))
    reply_prefix = "" if tools else dialogue.prefix(dialogue.MOSS)  # the plugin loop writes its own fields

    def prompt_ids() -> list[int]:
        # Encoded field by field, as Chat does, so a resent conversation matches the cached ids.
        ids = tokenizer.encode(meta) + [t for turn in turns for t in tokenizer.encode(turn)]
        return ids + tokenizer.encode(dialogue.human(last) + reply_prefix)

    ids = await svc.count_prompt(prompt_ids, "messages")

    def run_tools(job: Job) -> dict:
        chat = worker.new_chat(meta + "".join(turns))
        if req.jmoss_events and req.stream:
            chat.on_event = lambda kind, text: job.post("event", {"kind": kind, "text": text})
        reply = worker.chat_turn(chat, last, {**opts.__dict__, "stop": tuple(opts.stop)}, job)
        extra = len(tokenizer.encode(reply.results + dialogue.prefix(dialogue.MOSS))) if reply.results else 0
        return {"text": reply.text, "finish_reason": openai_finish_reason(reply.finish_reason),
                "prompt_tokens": len(ids) + extra, "completion_tokens": reply.generated_tokens}

    def run(job: Job) -> dict:
        return worker.complete(ids, opts, job, reply=True)

    job = worker.submit(run_tools if tools else run, stream=req.stream)
    ident, made, name = f"chatcmpl-{secrets.token_hex(12)}", int(time.time()), svc.model_name
    if not req.stream:
        try:
            out = await _result(job, request)
        except ClientGone as exc:
            return _client_gone(request, exc)
        return {"id": ident, "object": "chat.completion", "created": made, "model": name,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": out["text"]},
                             "logprobs": None, "finish_reason": out["finish_reason"]}],
                "usage": usage(out)}

    def chunk(delta: dict, finish: str | None) -> dict:
        return {"id": ident, "object": "chat.completion.chunk", "created": made, "model": name,
                "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}]}

    return _event_stream(job, first=chunk({"role": "assistant", "content": ""}, None),
                         delta=lambda text: chunk({"content": text}, None),
                         last=lambda out: chunk({}, out["finish_reason"]),
                         usage=(lambda out: {**chunk({}, None), "choices": [], "usage": usage(out)})
                         if req.include_usage else None,
                         event=lambda value: {**chunk({}, None), "jmoss_event": value})


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
    ids = await svc.count_prompt(lambda: svc.tokenizer.encode(text), "prompt")
    job = svc.worker.submit(lambda job: svc.worker.complete(ids, opts, job, reply=False), stream=req.stream)
    ident, made = f"cmpl-{secrets.token_hex(12)}", int(time.time())

    def choice(text: str, finish: str | None) -> dict:
        return {"index": 0, "text": text, "logprobs": None, "finish_reason": finish}

    def body(choices: list, **extra: Any) -> dict:
        return {"id": ident, "object": "text_completion", "created": made, "model": svc.model_name,
                "choices": choices, **extra}

    if not req.stream:
        try:
            out = await _result(job, request)
        except ClientGone as exc:
            return _client_gone(request, exc)
        return body([choice(out["text"], out["finish_reason"])], usage=usage(out))
    return _event_stream(job, first=None, delta=lambda t: body([choice(t, None)]),
                         last=lambda out: body([choice("", out["finish_reason"])]),
                         usage=(lambda out: body([], usage=usage(out))) if req.include_usage else None)


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


def _event_stream(job: Job, *, first: dict | None, delta: Callable[[str], dict], last: Callable[[dict], dict],
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
                    yield _sse(value.body())
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


# -- the app ---------------------------------------------------------------------------------------
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
    lookup: int | str = "auto",
) -> FastAPI:
    """The ASGI app serving ``model``; its worker thread starts here and stops at shutdown.

    ``max_prompt_tokens`` (default: the model's context minus one) bounds each request's prompt,
    meta instruction included; ``max_tokens_limit`` bounds max_tokens (and MOSS's max_length
    replies); ``session_limit``/``session_ttl`` bound the uid conversations. ``web`` serves the
    chat page at ``GET /``. ``max_batch`` sequences are generated together (continuous batching;
    load the model with ``batch=max_batch`` so its memory plan pays for their KV cache). ``lookup``
    is every request's prompt-lookup setting (jmoss.lookup: "off", "auto" or a draft length).
    """
    from jmoss.plugins import Plugin, load_plugins

    names = [p for p in plugins if isinstance(p, str)]
    tools: list[Plugin] = [p for p in plugins if isinstance(p, Plugin)]
    if names:
        tools += load_plugins(names, **(plugin_options or {}))
    n_positions = model.config.n_positions
    worker = Worker(model, tools, queue_size, session_limit, session_ttl, max_batch)
    svc = Service(worker, model_name, model.tokenizer, tools,
                  max_prompt_tokens=min(max_prompt_tokens or n_positions - 1, n_positions - 1),
                  max_tokens_limit=max_tokens_limit, max_body_bytes=max_body_bytes, created=int(time.time()),
                  lookup=parse_lookup(lookup))

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        yield
        worker.stop()

    app = FastAPI(title="jmoss", summary="MOSS over HTTP: MOSS's uid API and the OpenAI API", lifespan=lifespan)
    app.state.worker, app.state.service = worker, svc
    app.add_exception_handler(ServerRequestError, _on_request_error)  # type: ignore[arg-type]
    app.add_exception_handler(StarletteHTTPException, _on_http_error)  # type: ignore[arg-type]
    app.add_exception_handler(ClientGone, _on_client_gone)  # type: ignore[arg-type]
    app.add_exception_handler(Exception, _on_bug)
    app.include_router(router)
    if web:
        from jmoss.web import render_page

        svc.page = render_page({
            "model": model_name, "meta": dialogue.base_meta_instruction(),
            "plugins": [p.capability or p.name for p in tools], "max_tokens": max_tokens_limit,
            "defaults": {"temperature": MOSS_DEFAULTS["temperature"], "top_p": MOSS_DEFAULTS["top_p"],
                         "max_tokens": min(256, max_tokens_limit)}})
        app.add_api_route("/", chat_page, methods=["GET"], include_in_schema=False)
    return app
