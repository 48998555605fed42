"""MOSS's uid API continues a conversation however its previous reply ended.

The model is a real tiny MOSS (converted store, real Session: KV cache, positions, id checks) whose
next-token logits are overridden to spell a reply the test chose, so each ending is deterministic:
``<eom>``, the server's max_tokens cut (length), a stop string, and a client that hangs up mid-reply.
After each, the next turn with the same uid must answer, the history must hold both turns as the
client saw them, and the worker's KV cache must hold a prefix of the conversation's ids.
"""

from __future__ import annotations

import time
from typing import Iterator

import httpx
import numpy as np
import pytest

import jmoss
from jmoss.chat import Chat
from jmoss.server import create_app
from test_server import build_store
from test_web import AppServer

MAX_TOKENS = 24  # the server's --max-tokens: a longer scripted reply ends by length
SLOW = "talk slowly"
SCRIPT = {
    "end with eom": " Hello there.<eom>",
    "end by length": " " + " ".join(f"w{i}" for i in range(60)) + "<eom>",
    "end by a stop string": " The answer is 42. ### this part is not shown<eom>",
    SLOW: " " + " ".join(f"s{i}" for i in range(300)) + "<eom>",
    "ping": " pong<eom>",
}


class ForcedSession:
    """The real Session; its logits after each step are replaced to spell the scripted reply."""

    def __init__(self, session, tokenizer, vocab: int):
        self._session, self._tokenizer, self._vocab = session, tokenizer, vocab
        self.ids: list[int] = []  # what the real cache holds
        self._queue: list[int] = []

    def __getattr__(self, name):
        return getattr(self._session, name)

    def reset(self) -> None:
        self._session.reset()
        self.ids = []

    def truncate(self, length: int) -> None:
        self._session.truncate(length)
        del self.ids[length:]

    def prefill(self, rows, last_only: bool = True) -> np.ndarray:
        self._session.prefill(rows, last_only)  # the real thing: a None or bad id fails here
        self.ids += [int(t) for t in rows[0]]
        turn = self._tokenizer.decode(self.ids, skip_special_tokens=False).rsplit("<|Human|>:", 1)[-1]
        self._queue = self._tokenizer.encode(SCRIPT[turn.split("<eoh>", 1)[0].strip()])
        return self._next()

    def decode(self, tokens) -> np.ndarray:
        self._session.decode(tokens)
        self.ids.append(int(tokens[0]))
        if self._slow:
            time.sleep(0.05)
        return self._next()

    @property
    def _slow(self) -> bool:
        text = self._tokenizer.decode(self.ids, skip_special_tokens=False)
        return text.rsplit("<|Human|>:", 1)[-1].startswith(f" {SLOW}")

    def _next(self) -> np.ndarray:
        logits = np.zeros((1, self._vocab), dtype=np.float32)
        logits[0, self._queue.pop(0) if self._queue else self._tokenizer.token_to_id("<eom>")] = 100.0
        return logits


class ForcedModel:
    """A loaded jmoss model whose sessions are ForcedSessions."""

    def __init__(self, model):
        self._model = model

    def __getattr__(self, name):
        return getattr(self._model, name)

    def session(self, batch: int = 1, max_len: int | None = None) -> ForcedSession:
        return ForcedSession(self._model.session(batch, max_len), self._model.tokenizer, self._model.config.vocab_size)


@pytest.fixture(scope="module")
def model(tmp_path_factory, shared_dir):
    return jmoss.load(build_store(tmp_path_factory.mktemp("uid"), shared_dir), device="cpu")


@pytest.fixture(scope="module")
def server(model) -> Iterator[AppServer]:
    srv = AppServer(create_app(ForcedModel(model), model_name="tiny-moss", max_tokens_limit=MAX_TOKENS))
    yield srv
    srv.stop()


def post(server: AppServer, prompt: str, uid: str | None = None, **extra) -> dict:
    r = httpx.post(server.url + "/", json={"prompt": prompt, "uid": uid, "temperature": 0, **extra}, timeout=60)
    assert r.status_code == 200, r.text
    return r.json()


def assert_cache_is_a_prefix_of_the_conversation(server: AppServer, uid: str) -> None:
    worker = server.server.config.app.state.worker
    chat = worker.conversations[uid].chat
    cached = worker.session.ids  # the worker runs every Chat on its one (here: forced) session
    assert cached == chat._ids[: len(cached)]


@pytest.mark.parametrize("prompt, extra, shown", [
    ("end with eom", {}, "Hello there."),
    ("end by length", {}, " ".join(f"w{i}" for i in range(60))[:20]),  # checked as a prefix below
    ("end by a stop string", {"stop": ["###"]}, "The answer is 42. "),
])
def test_a_uid_conversation_continues_after_each_kind_of_ending(server, model, prompt, extra, shown):
    first = post(server, prompt, **extra)
    if prompt == "end by length":
        assert first["response"].startswith(shown) and not first["response"].endswith("w59")
    else:
        assert first["response"] == shown
    assert_cache_is_a_prefix_of_the_conversation(server, first["uid"])
    second = post(server, "ping", first["uid"])
    assert second["uid"] == first["uid"] and second["response"] == "pong"
    assert second["history"] == [[prompt, first["response"]], ["ping", "pong"]]
    # the conversation reads as the client saw it: the shown reply, then <eom>
    chat = server.server.config.app.state.worker.conversations[first["uid"]].chat
    text = model.tokenizer.decode(chat._ids, skip_special_tokens=False)
    assert f"<|MOSS|>: {first['response']}<eom>\n<|Human|>: ping<eoh>\n" in text
    assert "### this part is not shown" not in text
    assert_cache_is_a_prefix_of_the_conversation(server, first["uid"])
    third = post(server, "ping", first["uid"], max_length=4000)
    assert len(third["history"]) == 3


def test_a_uid_conversation_continues_after_the_client_hung_up(server):
    start = post(server, "end with eom")
    uid = start["uid"]
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(server.url + "/", json={"prompt": SLOW, "uid": uid, "temperature": 0}, timeout=1.0)
    deadline = time.monotonic() + 20
    while server.health()["pending"]:
        assert time.monotonic() < deadline, "the hung-up request kept the worker busy"
        time.sleep(0.05)
    after = post(server, "ping", uid)
    assert after["uid"] == uid and after["response"] == "pong"
    (q1, _), (q2, partial), (q3, r3) = after["history"]
    assert (q1, q2, q3, r3) == ("end with eom", SLOW, "ping", "pong")
    assert partial.startswith("s0 s1") and not partial.endswith("s299")  # cut where the client left
    assert_cache_is_a_prefix_of_the_conversation(server, uid)


def test_a_chat_on_a_tokenizer_without_eom_closes_turns_with_its_text(model):
    """A CodeGen-style vocabulary has no <eom> token: the turn is closed with the marker's text ids."""

    class NoMarkers:
        def __init__(self, tokenizer):
            self._t = tokenizer

        def __getattr__(self, name):
            return getattr(self._t, name)

        def token_to_id(self, token: str):
            return None if token in ("<eom>", "<eoc>") else self._t.token_to_id(token)

    forced = ForcedModel(model)

    class Model:
        def __getattr__(self, name):
            return getattr(forced, name)

        tokenizer = NoMarkers(model.tokenizer)

        def session(self, batch: int = 1, max_len: int | None = None):
            return forced.session(batch, max_len)

    chat = Chat(Model(), max_new_tokens=MAX_TOKENS, do_sample=False)
    chat.send("end by length")
    assert all(isinstance(t, int) for t in chat._ids)
    assert chat.send("ping").text == "pong"
    assert chat.last_reply.finish_reason == "stop"
