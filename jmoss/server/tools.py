"""OpenAI tool calls on MOSS's plugin protocol: ``tools`` in, ``tool_calls`` out, ``role: "tool"`` back in.

MOSS (moss-moon-003-sft-plugin) was trained on one protocol (moss-spec §4.2-4.6): switch lines in
the meta instruction enable tools, a turn is Human, Inner Thoughts, Commands (``Search("q")``),
Results, MOSS. An OpenAI request's conversation is rendered into exactly that form:

- ``tools`` become switch lines. A function named as one of MOSS's four trained commands
  (``Search``, ``Calculate``, ``Solve``, ``Text2Image``) enables that trained line, word for word;
  any other function gets a line of the same shape after the seven, ``- {description}: enabled.
  API: {name}({parameter}, ...)``, which MOSS has never seen filled in (see the README).
- An assistant message with ``tool_calls`` is a turn's Inner Thoughts (its ``content``) and
  Commands (each call ``name("arg", ...)``, the JSON arguments in the function's parameter order);
  the ``tool`` messages answering it are the Results, in the shapes the plugin path renders
  (jmoss.plugins.render_results: Search items numbered, Calculate inline, ...); the assistant
  message after them is MOSS's reply. A turn that called nothing may carry its thoughts as
  ``reasoning_content``: it is rendered with ``Commands: None`` and ``Results: None``.

So a conversation's prompt is what the plugin path (``--plugins``) builds for the same calls and
results. Generation runs the plugin loop's first pass (until ``<eoc>``); MOSS's Commands for
declared functions come back as ``tool_calls`` (finish_reason "tool_calls", thoughts as content)
and the client runs them; a turn with no call goes on to MOSS's reply in the same request, its
thoughts in ``reasoning_content``. ``tool_choice``: "auto" lets MOSS decide; "none" writes the
placeholder fields of MOSS's non-plugin training data (no call, no thoughts) and answers;
"required" or a named function constrains the first pass with a grammar (jmoss.constraints) so
it must call a declared function (that one).
"""

from __future__ import annotations

import json
import re
import secrets
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Sequence

from jmoss import dialogue
from jmoss.generation import GenerationOptions
from jmoss.plugins import Call, CallResult, format_call, render_results, scan_commands
from jmoss.plugins.base import IMAGE, INLINE, ITEMS, LINES
from jmoss.server.schemas import Message, NamedToolChoice, ServerRequestError, ToolDef

if TYPE_CHECKING:
    from jmoss.tokenizer import Tokenizer

# MOSS's trained commands: (switch-line capability, result shape). Their signatures are dialogue.SWITCHES'.
TRAINED = {"Search": ("Web search", ITEMS), "Calculate": ("Calculator", INLINE), "Solve": ("Equation solver", LINES),
           "Text2Image": ("Text-to-image", IMAGE)}
EOT, EOC, EOM = "<eot>", "<eoc>", "<eom>"
# tool_choice "none": the three middle fields as MOSS's non-plugin SFT data writes them (moss-spec §4.3)
NO_TOOLS_FIELDS = "<|Inner Thoughts|>: None<eot>\n<|Commands|>: None<eoc>\n<|Results|>: None<eor>\n"


@dataclass(frozen=True)
class Tool:
    """One client function as MOSS sees it: its command name, positional parameters and result shape."""

    name: str
    capability: str
    params: tuple[str, ...]
    types: dict[str, Any]
    style: str

    @property
    def trained(self) -> bool:
        return self.name in TRAINED

    @property
    def signature(self) -> str:
        return f"{self.name}({', '.join(self.params)})"


@dataclass(frozen=True)
class _Shape:
    """What render_results needs of a plugin: its result shape."""

    style: str


def tool_from(defn: ToolDef, index: int) -> Tool:
    f = defn.function
    params_schema = f.parameters or {}
    props = params_schema.get("properties") or {}
    if not isinstance(props, dict):
        raise ServerRequestError(400, "tools: parameters.properties must be an object", param=f"tools.{index}",
                                 code="invalid_value")
    types = {name: (spec.get("type") if isinstance(spec, dict) else None) for name, spec in props.items()}
    if f.name in TRAINED:
        capability, style = TRAINED[f.name]
    else:
        first = (f.description or "").strip().split("\n", 1)[0].strip().rstrip(".")
        capability, style = (first[:100] or f.name), LINES
    return Tool(f.name, capability, tuple(props), types, style)


@dataclass
class ToolSet:
    """The request's functions, by name."""

    tools: dict[str, Tool]

    @classmethod
    def from_request(cls, defs: Sequence[ToolDef]) -> "ToolSet":
        tools: dict[str, Tool] = {}
        for i, d in enumerate(defs):
            if d.function.name in tools:
                raise ServerRequestError(400, f"two tools are named {d.function.name!r}", param=f"tools.{i}",
                                         code="invalid_value")
            tools[d.function.name] = tool_from(d, i)
        return cls(tools)

    def switch_lines(self) -> str:
        """MOSS's seven switch lines with the trained tools enabled, then a line per other function."""
        trained = [t.name for t in self.tools.values() if t.trained]
        extra = [(t.capability, t.signature) for t in self.tools.values() if not t.trained]
        return dialogue.switch_lines(trained, inner_thoughts=True, extra=extra)

    # -- calls: MOSS's positional strings <-> OpenAI's JSON arguments --------------------------------
    def arguments(self, call: Call) -> str:
        """A MOSS call's arguments as OpenAI's JSON object, by parameter order and the schema's types."""
        tool = self.tools[call.name]
        return json.dumps({p: _typed(a, tool.types.get(p)) for p, a in zip(tool.params, call.args)},
                          ensure_ascii=False)

    def call_text(self, name: str, arguments: str, where: str) -> Call:
        """A client's tool call as the Call MOSS would have written (positional, parameter order)."""
        try:
            args = json.loads(arguments) if arguments.strip() else {}
        except ValueError:
            raise ServerRequestError(400, f"{where}.function.arguments is not JSON", param=where,
                                     code="invalid_value") from None
        if not isinstance(args, dict):
            raise ServerRequestError(400, f"{where}.function.arguments must be a JSON object", param=where,
                                     code="invalid_value")
        tool = self.tools.get(name)
        order = [p for p in (tool.params if tool else ()) if p in args] + [k for k in args if not tool or k not in tool.params]
        values = [v if isinstance(v, str) else json.dumps(v, ensure_ascii=False) for v in (args[k] for k in order)]
        return Call(name, tuple(values), format_call(name, values))

    def style(self, name: str) -> str:
        tool = self.tools.get(name)
        return tool.style if tool else TRAINED.get(name, ("", LINES))[1]


def _typed(arg: str, kind: Any) -> Any:
    """MOSS writes every argument as a string; a parameter typed otherwise gets the JSON value it spells."""
    if kind in (None, "string") or isinstance(kind, list):
        return arg
    try:
        value = json.loads(arg)
    except ValueError:
        return arg
    ok = {"integer": lambda v: isinstance(v, int) and not isinstance(v, bool),
          "number": lambda v: isinstance(v, (int, float)) and not isinstance(v, bool),
          "boolean": lambda v: isinstance(v, bool), "array": lambda v: isinstance(v, list),
          "object": lambda v: isinstance(v, dict), "null": lambda v: v is None}.get(kind)
    return value if ok is not None and ok(value) else arg


# -- rendering a conversation ---------------------------------------------------------------------


@dataclass
class Rendered:
    """A tool conversation in MOSS's format: meta instruction, earlier fields, and the prompt's tail.

    ``ending`` is "commands" (the last message is the user's: the model writes Inner Thoughts and
    Commands next) or "answer" (tool results are in: the model writes its reply after "<|MOSS|>:").
    """

    meta: str
    pieces: list[str] = field(default_factory=list)
    ending: str = "commands"

    def text(self) -> str:
        return self.meta + "".join(self.pieces)


def render(messages: list[Message], tools: ToolSet, base_meta: str) -> Rendered:
    """The conversation as the plugin path would hold it (see the module docstring); 400s on a bad shape."""
    system: list[str] = []
    out = Rendered("")
    i, n = 0, len(messages)
    last_field = None  # the field the rendered text ends with: human, results, moss
    while i < n:
        m, where = messages[i], f"messages.{i}"
        if m.role in ("system", "developer"):
            if out.pieces:
                raise ServerRequestError(400, "system messages must come before the conversation",
                                         param=f"{where}.role", code="invalid_value")
            system.append(m.text())
        elif m.role == "user":
            out.pieces.append(dialogue.human(m.text()))
            last_field = "human"
        elif m.role == "tool":
            raise ServerRequestError(400, f"{where} is a tool result with no assistant tool_calls before it",
                                     param=where, code="invalid_value")
        elif m.tool_calls:
            if last_field != "human":
                raise ServerRequestError(400, f"{where}: tool calls must answer a user message", param=where,
                                         code="invalid_value")
            calls = [tools.call_text(c.function.name, c.function.arguments, f"{where}.tool_calls.{k}")
                     for k, c in enumerate(m.tool_calls)]
            thoughts = m.reasoning_content if m.reasoning_content is not None else m.text()
            out.pieces.append(dialogue.inner_thoughts(thoughts) + dialogue.commands(", ".join(c.text for c in calls)))
            answers: dict[str, str] = {}
            while i + 1 < n and messages[i + 1].role == "tool":
                i += 1
                answers[messages[i].tool_call_id or ""] = messages[i].text()
            missing = [c.id for c in m.tool_calls if c.id not in answers]
            if missing:
                raise ServerRequestError(400, f"{where}: no tool message answers tool_call_id {missing[0]!r}",
                                         param="messages", code="invalid_value")
            results = [_result(call, answers[c.id], tools) for call, c in zip(calls, m.tool_calls)]
            out.pieces.append(render_results(results))
            last_field = "results"
        else:  # an assistant's reply
            if last_field == "human" and m.reasoning_content is not None:
                out.pieces.append(dialogue.inner_thoughts(m.reasoning_content) + dialogue.commands("None")
                                  + dialogue.results("None"))
            elif last_field not in ("human", "results"):
                raise ServerRequestError(400, f"{where}: an assistant reply must follow a user message or tool results",
                                         param=where, code="invalid_value")
            out.pieces.append(dialogue.moss(m.text()))
            last_field = "moss"
        i += 1
    if last_field == "human":
        out.ending = "commands"
    elif last_field == "results":
        out.ending = "answer"
    else:
        raise ServerRequestError(400, "the last message must be from the user or a tool", param="messages",
                                 code="invalid_value")
    meta = "\n".join(system) if system else base_meta
    meta = meta if meta.endswith("\n") else meta + "\n"
    out.meta = meta + tools.switch_lines()
    return out


def _result(call: Call, content: str, tools: ToolSet) -> CallResult:
    """A client's tool answer as the plugin path's CallResult (its lines are the result values)."""
    style = tools.style(call.name)
    if not content.strip():
        return CallResult(call, _Shape(style), (), False, "empty tool result")  # type: ignore[arg-type]
    values = (content,) if style in (INLINE, IMAGE) else tuple(content.split("\n"))
    return CallResult(call, _Shape(style), values)  # type: ignore[arg-type]


# -- MOSS's first pass, read as tool calls -------------------------------------------------------


@dataclass
class Pass1:
    """What MOSS wrote before Results: its thoughts, the declared calls, or a direct answer."""

    thoughts: str = ""
    calls: list[Call] = field(default_factory=list)
    answer: str | None = None  # MOSS skipped the tools and wrote "<|MOSS|>: …" itself


def _field(text: str, start: str, end: str) -> str | None:
    m = re.search(re.escape(start) + r" ?(.*?)(?:" + re.escape(end) + r"|$)", text, flags=re.S)
    return m.group(1).strip("\n") if m else None


def read_pass1(written: str, tools: ToolSet, parallel: bool = True) -> Pass1:
    """Parse the first pass (special tokens kept) as the plugin loop does; calls to undeclared names are dropped."""
    moss = dialogue.prefix(dialogue.MOSS)
    if written.endswith(EOM) or moss in written:
        return Pass1(answer=_field(written, moss, EOM) or written.replace(EOM, "").strip())
    thoughts = _field(written, dialogue.prefix(dialogue.INNER_THOUGHTS), EOT) or ""
    commands = _field(written, dialogue.prefix(dialogue.COMMANDS), EOC) or "None"
    calls = [c for c in scan_commands(commands).calls if c.name in tools.tools]
    return Pass1(thoughts, calls[:1] if not parallel else calls)


def call_grammar(tokenizer: "Tokenizer", tools: ToolSet, only: str | None, parallel: bool) -> str:
    """A Lark grammar (llguidance's dialect) for a first pass that must call ``only`` (or any declared tool)."""
    eot, eoc = tokenizer.token_to_id(EOT), tokenizer.token_to_id(EOC)
    if eot is None or eoc is None:
        raise ServerRequestError(400, "tool_choice needs MOSS's <eot> and <eoc> tokens; this model has none",
                                 param="tool_choice", code="invalid_value")
    names = [only] if only else list(tools.tools)
    calls = "call (\", \" call)*" if parallel else "call"
    return "\n".join([
        f'start: "<|Inner Thoughts|>: " THOUGHT <[{eot}]> "\\n<|Commands|>: " {calls} <[{eoc}]>',
        'call: NAME "(" (ARG (", " ARG)*)? ")"',
        "NAME: " + " | ".join(json.dumps(n) for n in names),
        r'ARG: /"([^"\\\n]|\\.)*"/',
        r"THOUGHT: /[^<]*/",
    ])


def tool_choice_name(choice: Any, tools: ToolSet) -> str | None:
    """The function a named tool_choice forces (checked to be declared), or None."""
    if not isinstance(choice, NamedToolChoice):
        return None
    if choice.function.name not in tools.tools:
        raise ServerRequestError(400, f"tool_choice names {choice.function.name!r}, which is not in tools",
                                 param="tool_choice", code="invalid_value")
    return choice.function.name


def tool_call_objects(calls: list[Call], tools: ToolSet) -> list[dict]:
    return [{"id": f"call_{secrets.token_hex(12)}", "type": "function",
             "function": {"name": c.name, "arguments": tools.arguments(c)}} for c in calls]


def stream_deltas(tool_calls: list[dict]) -> list[dict]:
    """OpenAI's streamed form: per call, a delta with id, name and empty arguments, then the arguments."""
    out = []
    for k, tc in enumerate(tool_calls):
        out.append({"tool_calls": [{"index": k, "id": tc["id"], "type": "function",
                                    "function": {"name": tc["function"]["name"], "arguments": ""}}]})
        out.append({"tool_calls": [{"index": k, "function": {"arguments": tc["function"]["arguments"]}}]})
    return out


# -- the job: one request's passes on one cache ----------------------------------------------------


def run_turn(run: Callable[..., dict], tokenizer: "Tokenizer", rendered: Rendered, ids: list[int], tools: ToolSet, *,
             reply_opts: GenerationOptions, pass1_opts: GenerationOptions, none: bool, parallel: bool,
             post: Callable[[Any], None]) -> dict:
    """Generate the turn's next step on ``run`` (Worker.passes): tool calls, or MOSS's reply.

    ``post`` streams a delta (text, or a dict such as a tool call). Returns the chat result: text,
    finish_reason, tool_calls, reasoning, token counts.
    """
    prefix = dialogue.prefix(dialogue.MOSS)
    if rendered.ending == "answer":
        return run(ids + tokenizer.encode(prefix), reply_opts, reply=True)
    if none:
        return run(ids + tokenizer.encode(NO_TOOLS_FIELDS + prefix), reply_opts, reply=True)
    first = run(ids, pass1_opts, reply=False, stream=False)
    written = tokenizer.decode(first["tokens"], skip_special_tokens=False)
    parsed = read_pass1(written, tools, parallel)
    counts = {"prompt_tokens": first["prompt_tokens"], "completion_tokens": first["completion_tokens"],
              "cached_tokens": first["cached_tokens"]}
    if parsed.answer is not None:
        if parsed.answer:
            post(parsed.answer)
        return {**counts, "text": parsed.answer, "finish_reason": first["finish_reason"]}
    if parsed.calls:
        calls = tool_call_objects(parsed.calls, tools)
        if parsed.thoughts:
            post(parsed.thoughts)  # the content before the calls, streamed as the reply's text
        for delta in stream_deltas(calls):
            post(delta)
        return {**counts, "text": parsed.thoughts or None, "tool_calls": calls, "finish_reason": "tool_calls"}
    if first["finish_reason"] != "stop":  # cut before its Commands were complete: nothing to run, no room left
        return {**counts, "text": "", "reasoning": parsed.thoughts, "finish_reason": first["finish_reason"]}
    # No call (Commands: None, or only undeclared names): Results None, then MOSS answers, as the plugin loop does.
    eoc = tokenizer.token_to_id(EOC)
    closed = first["tokens"] if first["tokens"][-1:] == [eoc] else first["tokens"] + [eoc]
    follow = tokenizer.encode("\n") + tokenizer.encode(dialogue.results("None") + prefix)
    if parsed.thoughts:
        post({"reasoning_content": parsed.thoughts})
    second = run(ids + closed + follow, reply_opts, reply=True)
    return {**second, "reasoning": parsed.thoughts,
            "prompt_tokens": first["prompt_tokens"] + len(follow) + len(closed) - len(first["tokens"]),
            "completion_tokens": first["completion_tokens"] + second["completion_tokens"],
            "cached_tokens": first["cached_tokens"]}
