"""OpenAI tool calls on MOSS's plugin protocol (jmoss.server.tools).

First MOSS's 246 recorded plugin conversations, each turned into what an OpenAI client would send
(``tools``, assistant ``tool_calls``, ``tool`` results) and rendered through the tool path: the
prompt must be byte for byte what the plugin path (MOSS's own Commands text, jmoss's Results
rendering) holds for the same conversation. Then a round trip through the server and the official
client, with a model whose logits are forced to write a Command.
"""

from __future__ import annotations

import json
from typing import Iterator

import numpy as np
import openai
import pytest

from jmoss import dialogue
from jmoss.constraints import lark
from jmoss.plugins import CallResult, format_call, parse_commands, render_results, scan_commands
from jmoss.server import create_app
from jmoss.server import tools as tool_path
from jmoss.server.schemas import Message
from moss_fixtures import MOSS_EOM
from test_plugins_commands import CONVERSATIONS, STYLES, Stub, _results_from_record
from test_server import MODEL_ID
from test_web import AppServer, ScriptedModel

# MOSS's trained tools as an OpenAI client would declare them
TRAINED_TOOLS = {
    "Search": ("Search the web", "query"), "Calculate": ("Evaluate an arithmetic expression", "expression"),
    "Solve": ("Solve equations", "equation"), "Text2Image": ("Draw an image", "description"),
}


def function(name: str, about: str, **params: str) -> dict:
    return {"type": "function", "function": {"name": name, "description": about, "parameters": {
        "type": "object", "properties": {p: {"type": t} for p, t in params.items()}, "required": list(params)}}}


def trained_tool(name: str) -> dict:
    description, param = TRAINED_TOOLS[name]
    return function(name, description, **{param: "string"})


# -- the recorded conversations: tool path == plugin path ----------------------------------------


def _enabled(meta: str) -> list[str]:
    return [line.split("API: ", 1)[1].split("(")[0] for line in meta.split("\n") if ": enabled. API: " in line]


def _plugin_path(record: dict) -> str:
    """The conversation as the plugin loop holds it: MOSS's own Commands text, jmoss's rendering of the Results."""
    conv = dialogue.from_sft_record(record)
    out = conv.meta_instruction
    for turn in conv.turns:
        results = render_results(_results_from_record(dialogue.commands(turn.commands), _recorded_results(turn)))
        out += (dialogue.human(turn.human) + dialogue.inner_thoughts(turn.inner_thoughts)
                + dialogue.commands(turn.commands) + results + dialogue.moss(turn.moss))
    return out


def _recorded_results(turn: dialogue.Turn) -> str:
    return dialogue.results_inline(turn.results) if turn.results_inline else dialogue.results(turn.results)


def _as_openai(record: dict) -> tuple[list[dict], list[dict]]:
    """(tools, messages) an OpenAI client would send for the recorded conversation."""
    conv = dialogue.from_sft_record(record)
    names = _enabled(conv.meta_instruction)
    tools = [trained_tool(n) for n in names]
    toolset = tool_path.ToolSet.from_request([tool_path.ToolDef.model_validate(t) for t in tools])
    messages: list[dict] = []
    for t, turn in enumerate(conv.turns):
        messages.append({"role": "user", "content": turn.human})
        calls = [c for c in parse_commands(turn.commands) if c.name in names]
        if not calls:
            messages.append({"role": "assistant", "content": turn.moss, "reasoning_content": turn.inner_thoughts})
            continue
        results = {r.call: r for r in _results_from_record(dialogue.commands(turn.commands), _recorded_results(turn))}
        ids = [f"call_{t}_{k}" for k in range(len(calls))]
        messages.append({"role": "assistant", "content": turn.inner_thoughts, "tool_calls": [
            {"id": i, "type": "function", "function": {"name": c.name, "arguments": toolset.arguments(c)}}
            for i, c in zip(ids, calls)]})
        for i, c in zip(ids, calls):
            r = results.get(c)
            messages.append({"role": "tool", "tool_call_id": i, "content": "\n".join(r.values) if r else ""})
        messages.append({"role": "assistant", "content": turn.moss})
    return tools, messages


def _tool_path(record: dict) -> str:
    tools, messages = _as_openai(record)
    toolset = tool_path.ToolSet.from_request([tool_path.ToolDef.model_validate(t) for t in tools])
    # the last reply is what the model would write next: render up to it, then append it as the plugin path does
    rendered = tool_path.render([Message.model_validate(m) for m in messages[:-1]], toolset,
                                dialogue.base_meta_instruction())
    assert rendered.ending == "answer" or messages[-1].get("reasoning_content") is not None
    return rendered.text() + dialogue.moss(messages[-1]["content"]) if rendered.ending == "answer" else \
        _tool_path_no_call_last(rendered, messages[-1])


def _tool_path_no_call_last(rendered: tool_path.Rendered, last: dict) -> str:
    return (rendered.text() + dialogue.inner_thoughts(last["reasoning_content"]) + dialogue.commands("None")
            + dialogue.results("None") + dialogue.moss(last["content"]))


def _why_not_canonical(turn: dialogue.Turn, names: list[str]) -> str | None:
    """Why the tool path cannot write this turn's Commands line as MOSS did, or None when it can."""
    parsed = scan_commands(turn.commands)
    if parsed.none:
        return None if turn.commands == "None" else "a None-like line other than 'None'"
    if parsed.errors:
        return "a malformed call"
    if any(c.name not in names for c in parsed.calls):
        return "a call to a tool the meta instruction does not enable"
    params = {"Search": 1, "Calculate": 1, "Solve": 1, "Text2Image": 1}
    if any(len(c.args) > params[c.name] for c in parsed.calls):
        return "more arguments than the function has parameters"
    if ", ".join(format_call(c.name, c.args) for c in parsed.calls) != turn.commands:
        return "calls laid out otherwise (numbered list, comments, line breaks, trailing comma)"
    answered = {r.call for r in _results_from_record(dialogue.commands(turn.commands), _recorded_results(turn))}
    if any(c not in answered for c in parsed.calls):
        return "MOSS's backend recorded no result for a call (a client must answer every call)"
    return None


# The ten conversations where the tool path writes a turn differently from MOSS, and why: it writes
# Commands canonically from tool_calls (MOSS laid out 8 turns its own way, or called an undeclared
# tool), and a client answers every call (MOSS's backend dropped two results).
NOT_CANONICAL = {
    "calculator_plugin_conversation_20": "a malformed call",
    "calculator_plugin_conversation_4": "a malformed call",
    "calculator_plugin_conversation_77": "a None-like line other than 'None'",
    "calculator_plugin_conversation_93": "calls laid out otherwise (numbered list, comments, line breaks, trailing comma)",
    "solver_plugin_conversation_59": "more arguments than the function has parameters",
    "solver_plugin_conversation_60": "a None-like line other than 'None'",
    "mix_plugin_conversation_20": "calls laid out otherwise (numbered list, comments, line breaks, trailing comma)",
    "mix_plugin_conversation_93": "MOSS's backend recorded no result for a call (a client must answer every call)",
    "mix_plugin_conversation_95": "MOSS's backend recorded no result for a call (a client must answer every call)",
    "search_plugin_conversation_9": "a call to a tool the meta instruction does not enable",
}


def test_recorded_conversations_render_byte_equal_through_the_tool_path(report):
    equal, differ = 0, {}
    for record in CONVERSATIONS:
        conv = dialogue.from_sft_record(record)
        names = _enabled(conv.meta_instruction)
        plugin, tools = _plugin_path(record), _tool_path(record)
        assert tools.startswith(conv.meta_instruction)  # `tools` become MOSS's own switch lines
        reasons = {r for t in conv.turns if (r := _why_not_canonical(t, names))}
        if plugin == tools:
            assert not reasons, record["source"]
            equal += 1
            continue
        assert len(reasons) == 1, (record["source"], reasons)
        differ[record["source"].rsplit("/", 1)[-1][:-5]] = reasons.pop()
        # the turns that differ differ only in their Commands and Results fields
        a, b = dialogue.parse(plugin).turns, dialogue.parse(tools).turns
        assert [(t.human, t.inner_thoughts, t.moss) for t in a] == [(t.human, t.inner_thoughts, t.moss) for t in b]
    report(f"tool path: {equal}/{len(CONVERSATIONS)} recorded plugin conversations byte-equal to the plugin path "
           f"(the other {len(differ)}: non-canonical Commands lines or results MOSS's backend dropped)")
    assert differ == NOT_CANONICAL and equal == len(CONVERSATIONS) - len(NOT_CANONICAL)


# -- a round trip through the server, with a model forced to write a Command ---------------------

WEATHER = function("get_weather", "Current weather for a city.\nReturns degrees.", city="string", days="integer")
ASK = "What's the weather in Paris?"
REPLIES = {
    ASK: ('<|Inner Thoughts|>: I should ask the weather tool<eot>\n<|Commands|>: get_weather("Paris", "3")<eoc>',
          " It is 21 degrees in Paris.<eom>"),
    "Two cities": ('<|Inner Thoughts|>: two calls<eot>\n<|Commands|>: get_weather("Rome"), Search("Oslo weather")<eoc>',
                   " Rome is warm, Oslo is not.<eom>"),
    "Just chat": ("<|Inner Thoughts|>: no tool is needed<eot>\n<|Commands|>: None<eoc>", " Hello there!<eom>"),
    "Plain": " A plain reply.",
}


@pytest.fixture(scope="module")
def tools_server(tokenizer) -> Iterator[AppServer]:
    srv = AppServer(create_app(ScriptedModel(tokenizer, REPLIES, delay=0.0), model_name=MODEL_ID))
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory, shared_dir):
    from jmoss.tokenizer import load_tokenizer
    from moss_fixtures import moss_tokenizer_dir

    return load_tokenizer(moss_tokenizer_dir(shared_dir, tmp_path_factory.mktemp("tok")))


def _client(srv: AppServer) -> openai.OpenAI:
    return openai.OpenAI(base_url=srv.url + "/v1", api_key="unused", max_retries=0, timeout=60)


def _seen(srv: AppServer, tokenizer) -> str:
    """What the model has been fed so far on the server's one cache."""
    return tokenizer.decode(srv.server.config.app.state.worker.session.ids, skip_special_tokens=False)


def test_a_tool_round_trip_tools_calls_results_answer(tools_server, tokenizer):
    c = _client(tools_server)
    messages: list = [{"role": "user", "content": ASK}]
    first = c.chat.completions.create(model=MODEL_ID, messages=messages, tools=[WEATHER], temperature=0)
    choice = first.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert choice.message.content == "I should ask the weather tool"  # MOSS's Inner Thoughts
    (call,) = choice.message.tool_calls
    assert call.type == "function" and call.id.startswith("call_") and call.function.name == "get_weather"
    assert json.loads(call.function.arguments) == {"city": "Paris", "days": 3}  # typed by the schema
    prompt = _seen(tools_server, tokenizer)
    assert "- Current weather for a city: enabled. API: get_weather(city, days)\n<|Human|>: " + ASK in prompt
    assert "- Web search: disabled.\n" in prompt  # MOSS's seven trained lines come first

    messages += [choice.message, {"role": "tool", "tool_call_id": call.id, "content": "21 degrees, sunny"}]
    final = c.chat.completions.create(model=MODEL_ID, messages=messages, tools=[WEATHER], temperature=0)
    assert final.choices[0].finish_reason == "stop" and not final.choices[0].message.tool_calls
    assert final.choices[0].message.content == "It is 21 degrees in Paris."
    assert _seen(tools_server, tokenizer).endswith(
        "<|Human|>: " + ASK + "<eoh>\n<|Inner Thoughts|>: I should ask the weather tool<eot>\n"
        '<|Commands|>: get_weather("Paris", "3")<eoc>\n<|Results|>:\nget_weather("Paris", "3") =>\n'
        "21 degrees, sunny\n<eor>\n<|MOSS|>: It is 21 degrees in Paris.")
    assert final.usage.prompt_tokens > first.usage.prompt_tokens


def test_tool_calls_stream_the_way_openai_streams_them(tools_server):
    c = _client(tools_server)
    search = trained_tool("Search")
    chunks = list(c.chat.completions.create(model=MODEL_ID, messages=[{"role": "user", "content": "Two cities"}],
                                            tools=[WEATHER, search], temperature=0, stream=True))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert chunks[-1].choices[0].finish_reason == "tool_calls"
    calls: dict[int, dict] = {}
    for chunk in chunks:
        for d in chunk.choices[0].delta.tool_calls or []:
            slot = calls.setdefault(d.index, {"id": None, "name": "", "arguments": ""})
            slot["id"] = d.id or slot["id"]
            slot["name"] += (d.function.name or "") if d.function else ""
            slot["arguments"] += (d.function.arguments or "") if d.function else ""
    assert [(v["name"], json.loads(v["arguments"])) for _, v in sorted(calls.items())] == [
        ("get_weather", {"city": "Rome"}), ("Search", {"query": "Oslo weather"})]
    assert all(v["id"].startswith("call_") for v in calls.values())
    assert "".join(ch.choices[0].delta.content or "" for ch in chunks) == "two calls"  # the thoughts, as content


def test_a_turn_without_a_call_answers_with_its_thoughts_as_reasoning(tools_server, tokenizer):
    c = _client(tools_server)
    out = c.chat.completions.create(model=MODEL_ID, messages=[{"role": "user", "content": "Just chat"}],
                                    tools=[WEATHER], temperature=0)
    message = out.choices[0].message
    assert out.choices[0].finish_reason == "stop" and message.content == "Hello there!" and not message.tool_calls
    assert message.model_extra["reasoning_content"] == "no tool is needed"
    assert _seen(tools_server, tokenizer).endswith(
        "<|Commands|>: None<eoc>\n<|Results|>:\nNone\n<eor>\n<|MOSS|>: Hello there!")
    streamed = list(c.chat.completions.create(model=MODEL_ID, messages=[{"role": "user", "content": "Just chat"}],
                                              tools=[WEATHER], temperature=0, stream=True))
    assert "".join(ch.choices[0].delta.content or "" for ch in streamed) == "Hello there!"
    assert any((ch.choices[0].delta.model_extra or {}).get("reasoning_content") == "no tool is needed"
               for ch in streamed)
    # sent back, the turn renders with its thoughts, Commands None and Results None, as the plugin path holds it
    follow = [{"role": "user", "content": "Just chat"},
              {"role": "assistant", "content": "Hello there!", "reasoning_content": "no tool is needed"},
              {"role": "user", "content": "Plain"}]
    c.chat.completions.create(model=MODEL_ID, messages=follow, tools=[WEATHER], temperature=0)
    assert ("<|Inner Thoughts|>: no tool is needed<eot>\n<|Commands|>: None<eoc>\n<|Results|>:\nNone\n<eor>\n"
            "<|MOSS|>: Hello there!<eom>\n<|Human|>: Plain<eoh>\n") in _seen(tools_server, tokenizer)


def test_tool_choice_none_writes_the_no_tool_fields_and_answers(tools_server, tokenizer):
    out = _client(tools_server).chat.completions.create(
        model=MODEL_ID, messages=[{"role": "user", "content": ASK}], tools=[WEATHER], tool_choice="none", temperature=0)
    assert out.choices[0].finish_reason == "stop" and out.choices[0].message.content == "It is 21 degrees in Paris."
    assert _seen(tools_server, tokenizer).endswith(
        ASK + "<eoh>\n" + tool_path.NO_TOOLS_FIELDS + "<|MOSS|>: It is 21 degrees in Paris.")


def test_required_and_named_tool_choice_are_grammars_over_the_commands(tokenizer):
    toolset = tool_path.ToolSet.from_request([tool_path.ToolDef.model_validate(t) for t in (WEATHER, trained_tool("Search"))])
    ok = '<|Inner Thoughts|>: check it<eot>\n<|Commands|>: get_weather("Paris", "3")<eoc>'
    grammar = lark(tokenizer, tool_path.call_grammar(tokenizer, toolset, "get_weather", parallel=False),
                   eos_token_id=MOSS_EOM)
    mask = grammar.start()
    for token in tokenizer.encode(ok):
        assert mask.mask()[token], tokenizer.decode([token])
        mask.advance(token)
    assert mask.done
    # a named choice forbids MOSS's "None" and any other tool where the call begins
    mask = grammar.start()
    for token in tokenizer.encode("<|Inner Thoughts|>: x<eot>\n<|Commands|>: "):
        mask.advance(token)
    allowed = mask.mask()
    for text in ("None", "Search", "get_weather"):
        assert allowed[tokenizer.encode(text)[0]] == (text == "get_weather"), text
    mask.rollback(2)  # a verifier that rejected a draft rolls the matcher back
    any_tool = lark(tokenizer, tool_path.call_grammar(tokenizer, toolset, None, parallel=True), eos_token_id=MOSS_EOM)
    mask = any_tool.start()
    for token in tokenizer.encode('<|Inner Thoughts|>: x<eot>\n<|Commands|>: Search("a"), get_weather("b")<eoc>'):
        mask.advance(token)
    assert mask.done


def test_required_tool_choice_through_the_server(tools_server):
    out = _client(tools_server).chat.completions.create(
        model=MODEL_ID, messages=[{"role": "user", "content": ASK}], tools=[WEATHER],
        tool_choice={"type": "function", "function": {"name": "get_weather"}}, temperature=0)
    assert out.choices[0].finish_reason == "tool_calls"
    assert out.choices[0].message.tool_calls[0].function.name == "get_weather"


@pytest.mark.parametrize("messages,tools,fragment", [
    ([{"role": "tool", "tool_call_id": "x", "content": "r"}], [WEATHER], "no assistant tool_calls"),
    ([{"role": "user", "content": "q"}, {"role": "assistant", "content": None, "tool_calls": [
        {"id": "c1", "type": "function", "function": {"name": "get_weather", "arguments": "{}"}}]}],
     [WEATHER], "c1"),
    ([{"role": "user", "content": "q"}, {"role": "assistant", "content": None, "tool_calls": [
        {"id": "c1", "type": "function", "function": {"name": "get_weather", "arguments": "not json"}}]},
      {"role": "tool", "tool_call_id": "c1", "content": "r"}], [WEATHER], "not JSON"),
    ([{"role": "user", "content": "q"}, {"role": "tool", "tool_call_id": "c1", "content": "r"}], None, "no tools"),
])
def test_malformed_tool_conversations_are_400s(tools_server, messages, tools, fragment):
    kwargs = {"tools": tools} if tools else {}
    with pytest.raises(openai.BadRequestError) as info:
        _client(tools_server).chat.completions.create(model=MODEL_ID, messages=messages, **kwargs)
    assert fragment in info.value.body["message"]


def test_an_undeclared_tool_choice_is_a_400(tools_server):
    with pytest.raises(openai.BadRequestError) as info:
        _client(tools_server).chat.completions.create(
            model=MODEL_ID, messages=[{"role": "user", "content": ASK}], tools=[WEATHER],
            tool_choice={"type": "function", "function": {"name": "nope"}})
    assert info.value.body["param"] == "tool_choice"


def test_server_plugins_still_run_when_no_tools_are_passed(tokenizer):
    from test_web import PLUGIN_TURN, REPLIES as WEB_REPLIES

    srv = AppServer(create_app(ScriptedModel(tokenizer, WEB_REPLIES, delay=0.0), model_name=MODEL_ID,
                               plugins=["calculator"]))
    try:
        out = _client(srv).chat.completions.create(model=MODEL_ID, messages=[{"role": "user", "content": PLUGIN_TURN}],
                                                   temperature=0)
        assert "14" in out.choices[0].message.content and out.choices[0].finish_reason == "stop"
        # with `tools` the client's functions are used instead: the Calculate command comes back to the client
        calc = trained_tool("Calculate")
        out = _client(srv).chat.completions.create(model=MODEL_ID, messages=[{"role": "user", "content": PLUGIN_TURN}],
                                                   tools=[calc], temperature=0)
        assert out.choices[0].finish_reason == "tool_calls"
        assert json.loads(out.choices[0].message.tool_calls[0].function.arguments) == {"expression": "2+3*4"}
    finally:
        srv.stop()
