"""A conversation longer than the context keeps going on every chat route (issue #30, finding 1).

The server's chat routes (OpenAI chat, which the page uses, and MOSS's uid API) keep the meta
instruction, drop the oldest whole turns so that the prompt and room for a reply fit, and say so
(``jmoss_truncation`` / ``dropped_turns``); ``"truncation": "disabled"`` gets OpenAI's 400 instead.
The model is test_web's scripted one (MOSS's real tokenizer, replies the test chose) with 512
positions, as the demo model has: the routes, the worker and the Chat are the real ones.
"""

from __future__ import annotations

import dataclasses
from typing import Iterator

import httpx
import openai
import pytest

from jmoss import dialogue
from jmoss.server import create_app
from jmoss.tokenizer import load_tokenizer
from moss_fixtures import moss_tokenizer_dir
from test_server import MODEL_ID
from test_web import AppServer, ScriptedModel, browser, long_reply  # noqa: F401 (browser: test_web's fixture)

CONTEXT = 512
TURNS = 12


class ShortModel(ScriptedModel):
    """The scripted model with a 512-position context (the demo model's)."""

    def __init__(self, tokenizer, replies, delay: float = 0.0):
        super().__init__(tokenizer, replies, delay)
        self.config = dataclasses.replace(self.config, n_positions=CONTEXT)


def question(i: int) -> str:
    return f"question {i}: " + " ".join(f"detail{i}x{k}" for k in range(25))


REPLIES = {question(i): long_reply(30) for i in range(TURNS)}


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory, shared_dir):
    return load_tokenizer(moss_tokenizer_dir(shared_dir, tmp_path_factory.mktemp("tok")))


@pytest.fixture(scope="module")
def server(tokenizer) -> Iterator[AppServer]:
    srv = AppServer(create_app(ShortModel(tokenizer, REPLIES), model_name=MODEL_ID, web=False, max_tokens_limit=128))
    yield srv
    srv.stop()


def test_openai_chat_drops_the_oldest_turns_and_says_so(server, tokenizer):
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=60)
    messages: list[dict] = []
    dropped = []
    for i in range(TURNS):
        messages.append({"role": "user", "content": question(i)})
        out = client.chat.completions.create(model=MODEL_ID, messages=messages, max_tokens=64, temperature=0)
        assert out.choices[0].message.content == long_reply(30).strip()  # every turn answered, to the last
        truncation = (out.model_extra or {}).get("jmoss_truncation")
        dropped.append(truncation["dropped_messages"] if truncation else 0)
        assert out.usage.prompt_tokens + 64 <= CONTEXT  # the prompt leaves the reply its room
        messages.append({"role": "assistant", "content": out.choices[0].message.content})
    assert dropped[0] == 0 and max(dropped) > 0, dropped
    assert all(d % 2 == 0 for d in dropped)  # whole turns: a user message and its reply together
    # the meta instruction stays: the prompt still starts with it (its tokens are counted)
    meta = len(tokenizer.encode(dialogue.base_meta_instruction()))
    assert out.usage.prompt_tokens > meta


def test_streamed_chat_carries_the_truncation_in_its_first_chunk(server):
    messages = []
    for i in range(TURNS):
        messages += [{"role": "user", "content": question(i)}, {"role": "assistant", "content": long_reply(30)}]
    messages.pop()
    with httpx.stream("POST", server.url + "/v1/chat/completions", timeout=60,
                      json={"model": MODEL_ID, "messages": messages, "stream": True, "max_tokens": 64}) as r:
        chunks = [line for line in r.iter_lines() if line.startswith("data: {")]
    import json

    first = json.loads(chunks[0][6:])
    assert first["jmoss_truncation"]["dropped_turns"] >= 1
    assert first["jmoss_truncation"]["dropped_messages"] == 2 * first["jmoss_truncation"]["dropped_turns"]
    text = "".join(json.loads(c[6:])["choices"][0]["delta"].get("content") or "" for c in chunks)
    assert text == long_reply(30).strip()


def test_truncation_disabled_answers_openais_400(server):
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=60)
    messages = []
    for i in range(TURNS):
        messages += [{"role": "user", "content": question(i)}, {"role": "assistant", "content": long_reply(30)}]
    messages.pop()
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(model=MODEL_ID, messages=messages, max_tokens=64,
                                       extra_body={"truncation": "disabled"})
    assert caught.value.body["code"] == "context_length_exceeded"


def test_a_message_too_long_alone_is_still_a_400(server):
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=60)
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(model=MODEL_ID, messages=[{"role": "user", "content": "word " * 600}])
    assert caught.value.body["code"] == "context_length_exceeded"


def test_moss_uid_api_keeps_a_long_conversation_going(server):
    uid, dropped = None, []
    for i in range(TURNS):
        body = {"prompt": question(i), **({"uid": uid} if uid else {})}
        r = httpx.post(server.url + "/", json=body, timeout=60)
        assert r.status_code == 200, r.text
        reply = r.json()
        assert reply["response"] == long_reply(30).strip()
        assert reply["uid"] == (uid or reply["uid"])
        uid = reply["uid"]
        dropped.append(reply["dropped_turns"])
        assert reply["history"][-1] == [question(i), reply["response"]]
    assert sum(dropped) > 0 and dropped[0] == 0, dropped
    assert len(reply["history"]) == TURNS - sum(dropped)  # the history is what the model still sees


def test_moss_uid_api_can_refuse_instead(server):
    uid = None
    for i in range(TURNS):
        r = httpx.post(server.url + "/", json={"prompt": question(i), "truncation": "disabled",
                                               "max_length": CONTEXT, **({"uid": uid} if uid else {})}, timeout=60)
        if r.status_code == 400:
            assert r.json()["error"]["code"] == "context_length_exceeded" and i >= 1
            return
        uid = r.json()["uid"]
    pytest.fail("a conversation past max_length was not refused with truncation disabled")


def test_moss_uid_api_caps_a_reply_with_max_new_tokens(server):
    reply = httpx.post(server.url + "/", json={"prompt": question(0), "max_new_tokens": 5}, timeout=60).json()
    full = long_reply(30).strip()
    assert 0 < len(reply["response"]) < len(full) // 2 and full.startswith(reply["response"])


def test_the_page_continues_a_12_turn_conversation_on_a_512_position_model(tokenizer, browser, report):
    """The chat page, in Chromium: every turn answered, the dropped turns greyed, the note visible."""
    from test_web import ChatPage, screenshot_path

    replies = {f"turn {i}: " + question(i): long_reply(30) for i in range(TURNS)}
    srv = AppServer(create_app(ShortModel(tokenizer, replies), model_name=MODEL_ID, max_tokens_limit=128))
    page = None
    try:
        page = ChatPage(browser, srv)
        page.page.fill("#max-tokens", "64")
        for i in range(TURNS):
            page.send(f"turn {i}: " + question(i))
            kind, text = page.messages()[-1]
            assert (kind, text) == ("assistant", long_reply(30).strip()), (i, kind, text)
        notes = page.page.locator("#messages .context-note")
        assert notes.count() >= 1 and notes.last.is_visible()
        note = notes.last.inner_text()
        assert f"{CONTEXT}-position context" in note and "dropped" in note
        dropped = page.page.locator("#messages .msg.dropped").count()
        assert dropped >= 2 and dropped % 2 == 0
        sent = page.requests[-1]["messages"]
        assert sent[0]["role"] == "system" and len(sent) < 2 * TURNS  # the dropped turns are not sent again
        assert not page.console_errors, page.console_errors
        shot = screenshot_path("web-chat-12-turns-512-positions.png")
        page.page.screenshot(path=str(shot))
        assert shot.stat().st_size > 10_000
        report(f"12-turn chat on a {CONTEXT}-position model: {dropped} messages greyed as dropped; screenshot {shot}")
    finally:
        if page is not None:
            page.close()
        srv.stop()

