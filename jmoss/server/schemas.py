"""What the server accepts and answers: request bodies, their validation, errors in OpenAI's shape.

Unknown fields are refused (extra="forbid") as OpenAI itself does ("Unrecognized request
argument"): a silently ignored field would hide a client bug. Fields OpenAI defines that only
have a meaning we cannot honour are accepted at their neutral value and refused otherwise.
strict: "0.5" is not a number, 1 is not a bool, 8.0 is not an int. NaN/Infinity are not numbers
either. Every number has a lower and an upper bound: a count at most ``MAX_COUNT``, a float
within the range where sampling's arithmetic stays finite.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated, Any, Literal, Sequence

from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from jmoss import dialogue
from jmoss.errors import ContextLengthError, JmossError
from jmoss.generation import GenerationOptions

if TYPE_CHECKING:
    from jmoss.plugins import Plugin

MAX_CHOICES = 16  # OpenAI's ``n``: choices per request (each one a reply's worth of generation)
TRUNCATION = Literal["auto", "disabled"]  # OpenAI's name (Responses API) for dropping the oldest turns or not
MOSS_DEFAULTS = dict(max_length=2048, top_p=0.8, temperature=0.7, top_k=40, repetition_penalty=1.02)  # §5.1
# No count a request names (tokens, positions, top_k) is meaningful past a C int; the server's own
# limits (max_tokens, the context) are checked after parsing, with messages that name them.
MAX_COUNT = 2**31 - 1
# Below this a temperature divides logits past float32's range; the limit T -> 0 is greedy, which
# is what a client sending 1e-8 "for determinism" means (vLLM treats such values alike).
GREEDY_BELOW = 1e-2


class ServerRequestError(JmossError):
    """A request the server refuses; rendered as OpenAI's error object with ``status``."""

    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = headers or {}

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


def error_response(status: int, message: str, **kwargs: Any) -> JSONResponse:
    return ServerRequestError(status, message, **kwargs).response()


def request_error(exc: JmossError) -> ServerRequestError:
    """A JmossError raised for a request's content, as the 400 the client gets."""
    if isinstance(exc, ServerRequestError):
        return exc
    code = "context_length_exceeded" if isinstance(exc, ContextLengthError) else "invalid_value"
    return ServerRequestError(400, str(exc), code=code)


def openai_finish_reason(reason: str | None) -> str:
    """Generation's finish reason in OpenAI's words: only a stop is "stop"; any limit is "length"."""
    return "stop" if reason == "stop" else "length"


# -- request bodies ------------------------------------------------------------------------------


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)


class _TextPart(_Body):
    type: Literal["text"]
    text: str


class Message(_Body):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[_TextPart] | None = None
    name: str | None = None
    # OpenAI tool calling (jmoss.server.tools): an assistant's calls, a tool's answer to one of them,
    # and MOSS's Inner Thoughts of a turn that called no tool (as vLLM and DeepSeek name them).
    tool_calls: list["ToolCall"] | None = Field(default=None, max_length=64)
    tool_call_id: str | None = Field(default=None, max_length=256)
    reasoning_content: str | None = None
    refusal: None = None  # echoed back by clients that resend the assistant message as they got it

    def text(self) -> str:
        if self.content is None:
            return ""
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)


class _StreamOptions(_Body):
    include_usage: bool = False


class Sampling(_Body):
    """Fields shared by both OpenAI endpoints; top_k and repetition_penalty are common extensions."""

    model: str
    max_tokens: int | None = Field(default=None, ge=1, le=MAX_COUNT)
    temperature: float | None = Field(default=None, ge=0, le=2)
    top_p: float | None = Field(default=None, ge=0, le=1)
    top_k: int | None = Field(default=None, ge=0, le=MAX_COUNT)
    repetition_penalty: float | None = Field(default=None, ge=0.01, le=10)  # a logit x100 at most
    stop: str | list[str] | None = None
    seed: int | None = Field(default=None, ge=0, lt=2**63)
    stream: bool = False
    stream_options: _StreamOptions | None = None
    n: int | None = Field(default=None, ge=1, le=MAX_CHOICES)  # not Literal: that takes true (true == 1)
    user: str | None = None
    presence_penalty: float | None = Field(default=None, ge=-2, le=2)
    frequency_penalty: float | None = Field(default=None, ge=-2, le=2)
    response_format: "ResponseFormat | None" = None  # enforced token by token (jmoss.server.response_format)

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


class ChatCompletionRequest(Sampling):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1, le=MAX_COUNT)  # newer clients' name for max_tokens
    logprobs: bool | None = None
    top_logprobs: int | None = Field(default=None, ge=0, le=20)
    # "auto" (jmoss's default): a conversation past the context loses its oldest whole turns, and the
    # reply says how many (jmoss_truncation); "disabled": OpenAI's 400 context_length_exceeded instead
    truncation: TRUNCATION = "auto"
    # jmoss's opt-in (the chat page sends it): with plugins, a streamed reply also carries chunks
    # {"jmoss_event": {"kind", "text"}} for the turn's Inner Thoughts, Commands, Results, notices.
    jmoss_events: bool = False
    tools: list["ToolDef"] | None = Field(default=None, max_length=64)  # jmoss.server.tools
    tool_choice: Literal["none", "auto", "required"] | "NamedToolChoice" | None = None
    parallel_tool_calls: bool | None = None


class CompletionRequest(Sampling):
    prompt: str | list[str] = Field(min_length=1)
    echo: Literal[False] | None = None
    logprobs: int | None = Field(default=None, ge=0, le=5)  # the legacy endpoint's: how many alternatives


class MossRequest(_Body):
    """moss_api_demo.py's body (moss-spec §5.4); ``stop`` (up to 4 strings) is jmoss's addition."""

    prompt: str = Field(min_length=1)
    uid: str | None = None
    max_length: int = Field(default=MOSS_DEFAULTS["max_length"], ge=1, le=MAX_COUNT)
    top_p: float = Field(default=MOSS_DEFAULTS["top_p"], gt=0, le=1)
    temperature: float = Field(default=MOSS_DEFAULTS["temperature"], ge=0, le=2)
    stop: list[Annotated[str, Field(min_length=1, max_length=256)]] = Field(default_factory=list, max_length=4)
    max_new_tokens: int | None = Field(default=None, ge=1, le=MAX_COUNT)  # jmoss's: caps the reply (max_length caps the whole)
    seed: int | None = Field(default=None, ge=0, lt=2**63)
    truncation: TRUNCATION = "auto"  # as in ChatCompletionRequest


# -- structured output and tools (their behaviour: jmoss.server.response_format, jmoss.server.tools) --


class _JsonSchemaFormat(_Body):
    name: str = Field(min_length=1, max_length=64)
    description: str | None = None
    schema_: dict[str, Any] | None = Field(default=None, alias="schema")
    strict: bool | None = None


class ResponseFormat(_Body):
    """OpenAI's ``response_format``: plain text, any JSON object, or JSON valid under a schema."""

    type: Literal["text", "json_object", "json_schema"]
    json_schema: _JsonSchemaFormat | None = None


class _Function(_Body):
    name: str = Field(pattern=r"^[A-Za-z_][A-Za-z0-9_]{0,63}$")  # what MOSS's command syntax can name
    description: str | None = Field(default=None, max_length=4096)
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class ToolDef(_Body):
    type: Literal["function"]
    function: _Function


class _FunctionName(_Body):
    name: str


class NamedToolChoice(_Body):
    type: Literal["function"]
    function: _FunctionName


class _CalledFunction(_Body):
    name: str
    arguments: str


class ToolCall(_Body):
    id: str = Field(max_length=256)
    type: Literal["function"]
    function: _CalledFunction


Message.model_rebuild()
Sampling.model_rebuild()
ChatCompletionRequest.model_rebuild()
CompletionRequest.model_rebuild()


def validation_error(exc: ValidationError) -> ServerRequestError:
    """pydantic's first complaint as OpenAI's 400 (the parameter named in ``param``)."""
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


def sampling_options(req: Sampling, *, max_tokens_limit: int, default_max: int,
                     stop: Sequence[str] = ()) -> GenerationOptions:
    """An OpenAI request's sampling fields as GenerationOptions (MOSS's defaults where it names none)."""
    max_tokens = getattr(req, "max_completion_tokens", None) or req.max_tokens or default_max
    if max_tokens > max_tokens_limit:
        raise ServerRequestError(400, f"max_tokens is {max_tokens}; this server allows at most {max_tokens_limit}",
                                 param="max_tokens", code="invalid_value")
    user_stop = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
    if len(user_stop) > 4 or any(len(s) > 256 for s in user_stop):
        raise ServerRequestError(400, "stop takes at most 4 sequences of at most 256 characters each",
                                 param="stop", code="invalid_value")
    if isinstance(req, ChatCompletionRequest):
        if req.top_logprobs is not None and not req.logprobs:
            raise ServerRequestError(400, "top_logprobs needs logprobs: true", param="top_logprobs", code="invalid_value")
        logprobs = (req.top_logprobs or 0) if req.logprobs else None
    else:
        logprobs = getattr(req, "logprobs", None)
    temperature = MOSS_DEFAULTS["temperature"] if req.temperature is None else req.temperature
    top_p = MOSS_DEFAULTS["top_p"] if req.top_p is None else req.top_p
    greedy = temperature < GREEDY_BELOW or top_p == 0  # OpenAI's "deterministic" settings
    try:
        return GenerationOptions.from_kwargs(
            max_new_tokens=max_tokens, do_sample=not greedy, temperature=temperature if not greedy else 1.0,
            top_p=top_p if not greedy else 1.0, top_k=req.top_k or 0,
            repetition_penalty=req.repetition_penalty or MOSS_DEFAULTS["repetition_penalty"],
            seed=req.seed, stop=tuple(stop) + tuple(s for s in user_stop if s),
            presence_penalty=req.presence_penalty or 0.0, frequency_penalty=req.frequency_penalty or 0.0,
            logprobs=logprobs)
    except JmossError as exc:
        raise request_error(exc) from None


def moss_options(req: MossRequest, max_new_tokens: int) -> dict:
    """moss_api_demo.py's sampling (temperature 0, or below ``GREEDY_BELOW``: greedy) as Chat options."""
    greedy = req.temperature < GREEDY_BELOW
    return dict(max_new_tokens=max_new_tokens, do_sample=not greedy, temperature=req.temperature if not greedy else 1.0,
                top_p=req.top_p, top_k=MOSS_DEFAULTS["top_k"], repetition_penalty=MOSS_DEFAULTS["repetition_penalty"],
                stop=tuple(req.stop), seed=req.seed)


# -- conversations in MOSS's format --------------------------------------------------------------


def default_meta_instruction(plugins: Sequence["Plugin"], meta: str | None = None) -> str:
    """MOSS's base meta instruction (or ``meta``, a server's --system), plus the capability switch
    lines when tools are enabled."""
    return _with_capabilities(meta or dialogue.base_meta_instruction(), plugins)


def _with_capabilities(meta: str, plugins: Sequence["Plugin"]) -> str:
    if not plugins:
        return meta
    from jmoss.plugins import capability_lines

    return meta + capability_lines(plugins)


def messages_to_moss(messages: list[Message], plugins: Sequence["Plugin"],
                     default_meta: str | None = None) -> tuple[str, list[str], str]:
    """(meta instruction, rendered earlier turns, last user text) in MOSS's SFT format (moss-spec §4.3).

    System/developer messages (only before the first turn) replace the meta instruction; the
    capability lines follow them when tools are on, or MOSS would not know it may call them.
    """
    system: list[str] = []
    turns: list[str] = []
    for i, m in enumerate(messages):
        if m.role == "tool" or m.tool_calls:
            raise ServerRequestError(400, f"messages.{i} carries tool calls or results but the request has no tools",
                                     param=f"messages.{i}", code="invalid_value")
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
        meta = default_meta_instruction(plugins, default_meta)
    turns.pop()  # the last user message is the turn to answer
    return meta, turns, messages[-1].text()


def usage(out: dict) -> dict:
    """OpenAI's usage object from a job's result (cached prompt tokens when the cache served some)."""
    counts = {"prompt_tokens": out["prompt_tokens"], "completion_tokens": out["completion_tokens"],
              "total_tokens": out["prompt_tokens"] + out["completion_tokens"]}
    if "cached_tokens" in out:
        counts["prompt_tokens_details"] = {"cached_tokens": out["cached_tokens"]}
    return counts
