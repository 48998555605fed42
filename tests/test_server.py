"""jmoss serve, end to end: a real server process on a tiny converted MOSS, real clients.

The OpenAI API is exercised with the official ``openai`` package (chat, streaming, completions,
models); MOSS's uid API and the error shapes with plain HTTP. The model's weights are random, so
the tests check the protocol and exact token counts (from MOSS's real tokenizer), not the prose.
"""

from __future__ import annotations

import asyncio
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Iterator

import httpx
import openai
import pytest

from jmoss import dialogue
from jmoss.layout import split_state_dict
from jmoss.store import write_store_from_groups
from jmoss.tokenizer import load_tokenizer
from moss_fixtures import moss_tokenizer_dir, tiny_moss
from torch_reference import state_dict_numpy

MODEL_ID = "tiny-moss"


def build_store(out: Path, shared_dir: Path) -> Path:
    """A converted store of a tiny random MOSS with MOSS's real tokenizer."""
    torch_model, config = tiny_moss(seed=3)
    groups = split_state_dict(state_dict_numpy(torch_model), config)
    return write_store_from_groups(out / "store", config, groups, tokenizer_dir=moss_tokenizer_dir(shared_dir, out / "tok"))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    """``jmoss serve`` as a subprocess on loopback; stopped (and checked alive) by the fixture."""

    def __init__(self, store: Path, *flags: str, log: Path):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self._log = open(log, "wb")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "jmoss.cli", "serve", str(store), "--port", str(self.port), "--model-name", MODEL_ID,
             "--device", "cpu", "--log-level", "warning", *flags],
            stdout=self._log, stderr=subprocess.STDOUT, env={**os.environ})
        self.log_path = log
        deadline = time.monotonic() + 240  # first start may compile jittor's kernels
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n{log.read_text()[-3000:]}")
            try:
                if httpx.get(self.url + "/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"server did not come up:\n{log.read_text()[-3000:]}")
            time.sleep(0.3)

    def health(self) -> dict:
        return httpx.get(self.url + "/health", timeout=10).json()

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self._log.close()


@pytest.fixture(scope="module")
def store(tmp_path_factory, shared_dir) -> Path:
    return build_store(tmp_path_factory.mktemp("serve"), shared_dir)


@pytest.fixture(scope="module")
def server(store, tmp_path_factory) -> Iterator[ServerProcess]:
    srv = ServerProcess(store, "--max-prompt-tokens", "600", "--max-tokens", "256", "--queue-size", "4",
                        "--session-limit", "3", log=tmp_path_factory.mktemp("log") / "server.log")
    yield srv
    alive = srv.proc.poll() is None
    srv.stop()
    assert alive, "the server died during the tests"


@pytest.fixture(scope="module")
def tokenizer(store):
    return load_tokenizer(store)


@pytest.fixture
def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=60)


def chat_prompt_tokens(tokenizer, user: str, meta: str | None = None) -> int:
    meta = dialogue.base_meta_instruction() if meta is None else meta
    return len(tokenizer.encode(meta)) + len(tokenizer.encode(dialogue.human(user) + "<|MOSS|>:"))


# -- OpenAI API through the official client ------------------------------------------------------


def test_models_lists_the_served_model(client):
    models = client.models.list()
    assert [m.id for m in models.data] == [MODEL_ID]
    assert models.data[0].object == "model"


def test_chat_completion_answers_in_openai_shape_with_exact_usage(client, tokenizer):
    out = client.chat.completions.create(model=MODEL_ID, messages=[{"role": "user", "content": "你好"}],
                                         max_tokens=8, seed=1)
    assert out.object == "chat.completion" and out.id.startswith("chatcmpl-")
    choice = out.choices[0]
    assert choice.message.role == "assistant" and isinstance(choice.message.content, str)
    assert choice.finish_reason in ("stop", "length")
    assert out.usage.prompt_tokens == chat_prompt_tokens(tokenizer, "你好")
    assert 1 <= out.usage.completion_tokens <= 8
    assert out.usage.total_tokens == out.usage.prompt_tokens + out.usage.completion_tokens


def test_system_message_replaces_the_meta_instruction(client, tokenizer):
    out = client.chat.completions.create(
        model=MODEL_ID, max_tokens=4, temperature=0,
        messages=[{"role": "system", "content": "You are a terse assistant."}, {"role": "user", "content": "Hi"}])
    assert out.usage.prompt_tokens == chat_prompt_tokens(tokenizer, "Hi", meta="You are a terse assistant.\n")


def test_earlier_turns_are_in_mosss_format_and_reuse_the_cache(client, tokenizer):
    messages = [{"role": "user", "content": "What is 2+2?"}, {"role": "assistant", "content": "4"},
                {"role": "user", "content": "And 3+3?"}]
    first = client.chat.completions.create(model=MODEL_ID, messages=messages, max_tokens=4, temperature=0)
    again = client.chat.completions.create(model=MODEL_ID, messages=messages, max_tokens=4, temperature=0)
    expected = (len(tokenizer.encode(dialogue.base_meta_instruction())) + len(tokenizer.encode(dialogue.human("What is 2+2?")))
                + len(tokenizer.encode(dialogue.moss("4"))) + len(tokenizer.encode(dialogue.human("And 3+3?") + "<|MOSS|>:")))
    assert first.usage.prompt_tokens == again.usage.prompt_tokens == expected
    assert again.choices[0].message.content == first.choices[0].message.content  # greedy
    assert again.usage.prompt_tokens_details.cached_tokens == expected - 1  # only the last prompt token recomputed


def test_streamed_chat_equals_the_whole_reply(client):
    kwargs = dict(model=MODEL_ID, messages=[{"role": "user", "content": "Tell me a story"}], max_tokens=12,
                  temperature=0)
    whole = client.chat.completions.create(**kwargs)
    chunks = list(client.chat.completions.create(**kwargs, stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert all(c.object == "chat.completion.chunk" and c.id == chunks[0].id for c in chunks)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == [whole.choices[0].finish_reason]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == whole.usage.completion_tokens


def test_completions_plain_and_streamed(client, tokenizer):
    whole = client.completions.create(model=MODEL_ID, prompt="def fibonacci(n):", max_tokens=6, temperature=0)
    assert whole.object == "text_completion" and whole.choices[0].finish_reason in ("stop", "length")
    assert whole.usage.prompt_tokens == len(tokenizer.encode("def fibonacci(n):"))
    streamed = client.completions.create(model=MODEL_ID, prompt="def fibonacci(n):", max_tokens=6, temperature=0,
                                         stream=True)
    assert "".join(c.choices[0].text for c in streamed) == whole.choices[0].text


def test_seed_makes_sampling_reproducible(client):
    kwargs = dict(model=MODEL_ID, prompt="Once upon a time", max_tokens=8, temperature=1.0, seed=1234)
    assert client.completions.create(**kwargs).choices[0].text == client.completions.create(**kwargs).choices[0].text


def test_stop_sequence_cuts_the_completion(client):
    whole = client.completions.create(model=MODEL_ID, prompt="1, 2, 3,", max_tokens=12, temperature=0).choices[0].text
    assert len(whole) > 2
    stop = whole[1:3]
    cut = client.completions.create(model=MODEL_ID, prompt="1, 2, 3,", max_tokens=12, temperature=0, stop=[stop])
    assert cut.choices[0].text == whole[: whole.index(stop)] and cut.choices[0].finish_reason == "stop"


def test_client_errors_reach_the_openai_client_as_typed_exceptions(client):
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=MODEL_ID, messages=[{"role": "user", "content": "hi"}],
                                       extra_body={"frobnicate": True})
    assert e.value.code == "unrecognized_argument" and e.value.param == "frobnicate"
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=MODEL_ID, messages=[{"role": "user", "content": "hi"}], max_tokens=100000)
    assert e.value.param == "max_tokens"


# -- MOSS's uid API ----------------------------------------------------------------------------


def test_moss_api_uid_continues_the_history(server):
    first = httpx.post(server.url + "/", json={"prompt": "你好", "max_length": 400}, timeout=60).json()
    assert set(first) == {"response", "history", "status", "time", "uid", "dropped_turns"}
    assert first["status"] == 200 and first["history"] == [["你好", first["response"]]]
    assert len(first["uid"]) == 36  # a uuid4, as moss_api_demo.py returns
    # room for the reply beside the whole history (at 500 the first turn would be dropped to leave the reply
    # a quarter of the context, as jmoss chat does)
    second = httpx.post(server.url + "/", json={"prompt": "再说一遍", "uid": first["uid"], "max_length": 1000,
                                                "max_new_tokens": 32}, timeout=60).json()
    assert second["uid"] == first["uid"]
    assert second["history"] == [["你好", first["response"]], ["再说一遍", second["response"]]]


def test_moss_api_unknown_uid_starts_a_new_conversation(server):
    out = httpx.post(server.url + "/", json={"prompt": "hi", "uid": "not-a-session", "max_length": 300}, timeout=60).json()
    assert out["uid"] != "not-a-session" and len(out["history"]) == 1


def test_moss_api_sessions_are_bounded_lru(server):
    uids = [httpx.post(server.url + "/", json={"prompt": f"hi {i}", "max_length": 260}, timeout=60).json()["uid"]
            for i in range(4)]  # the server keeps 3
    assert len(set(uids)) == 4 and server.health()["sessions"] == 3
    evicted = httpx.post(server.url + "/", json={"prompt": "back", "uid": uids[0], "max_length": 260}, timeout=60).json()
    assert evicted["uid"] != uids[0] and len(evicted["history"]) == 1
    # (max_length 300 would now drop the first turn to leave the reply room: the history would be 1 long)
    kept = httpx.post(server.url + "/", json={"prompt": "back", "uid": uids[3], "max_length": 300, "max_new_tokens": 8,
                                              "truncation": "disabled"}, timeout=60).json()
    assert kept["uid"] == uids[3] and len(kept["history"]) == 2


# -- errors: always JSON in OpenAI's shape --------------------------------------------------------


def _assert_error(response: httpx.Response, status: int, code: str | None = None) -> dict:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}
    assert body["error"]["message"]
    if code is not None:
        assert body["error"]["code"] == code
    return body["error"]


@pytest.mark.parametrize("path, body, status, code", [
    ("/v1/chat/completions", b'{"model": "tiny-moss", "messages": [', 400, "invalid_json"),
    ("/v1/chat/completions", b'\xff\xfe garbage', 400, "invalid_json"),
    ("/v1/chat/completions", b'[]', 400, "invalid_value"),
    ("/v1/chat/completions", b'{"model": "tiny-moss"}', 400, "missing_parameter"),
    ("/v1/chat/completions", b'{"model": "tiny-moss", "messages": []}', 400, "invalid_value"),
    ("/v1/chat/completions", b'{"model": "tiny-moss", "messages": [{"role": "robot", "content": "x"}]}', 400, "invalid_value"),
    ("/v1/chat/completions", b'{"model": "tiny-moss", "messages": [{"role": "user", "content": "x"}], "max_tokens": "8"}', 400, "invalid_value"),
    ("/v1/chat/completions", b'{"model": "tiny-moss", "messages": [{"role": "user", "content": "x"}], "temperature": NaN}', 400, None),
    ("/v1/chat/completions", b'{"model": "tiny-moss", "messages": [{"role": "user", "content": "x"}], "n": 0}', 400, "invalid_value"),
    ("/v1/chat/completions", b'{"model": "tiny-moss", "messages": [{"role": "assistant", "content": "x"}]}', 400, "invalid_value"),
    ("/v1/completions", b'{"model": "tiny-moss", "prompt": "x", "seed": -1}', 400, "invalid_value"),
    ("/v1/completions", b'{"model": "tiny-moss", "prompt": "x", "stream": "yes"}', 400, "invalid_value"),
    ("/v1/completions", b'{"model": "tiny-moss", "prompt": "x", "stop": ["a", "b", "c", "d", "e"]}', 400, "invalid_value"),
    ("/", b'{"uid": "x"}', 400, "missing_parameter"),
    ("/", b'{"prompt": 5}', 400, "invalid_value"),
    ("/", b'{"prompt": "hi", "history": []}', 400, "unrecognized_argument"),
    ("/", b'{"prompt": "hi", "max_length": 3}', 400, "context_length_exceeded"),
    ("/", b'[' * 100000 + b']' * 100000, 400, None),
])
def test_malformed_requests_get_a_json_4xx(server, path, body, status, code):
    _assert_error(httpx.post(server.url + path, content=body, timeout=30), status, code)


def test_prompt_and_body_limits(server):
    long = "word " * 2000
    _assert_error(httpx.post(server.url + "/v1/completions", json={"model": MODEL_ID, "prompt": long}, timeout=30),
                  400, "context_length_exceeded")
    _assert_error(httpx.post(server.url + "/", json={"prompt": long}, timeout=30), 400, "context_length_exceeded")
    _assert_error(httpx.post(server.url + "/v1/completions", content=b"x" * (2 << 20), timeout=30), 413, "body_too_large")


def test_unknown_routes_and_methods_are_json(server):
    _assert_error(httpx.get(server.url + "/v2/anything", timeout=10), 404)
    _assert_error(httpx.get(server.url + "/v1/chat/completions", timeout=10), 405)


# -- load behaviour: the bounded queue and disconnects ---------------------------------------------


def test_full_queue_answers_503_with_retry_after(server):
    async def burst() -> list[httpx.Response]:
        async with httpx.AsyncClient(base_url=server.url, timeout=120) as c:
            body = {"model": MODEL_ID, "prompt": "count:", "max_tokens": 48}
            return await asyncio.gather(*(c.post("/v1/completions", json=body) for _ in range(12)))

    responses = asyncio.run(burst())
    codes = sorted(r.status_code for r in responses)
    busy = [r for r in responses if r.status_code == 503]
    assert codes.count(200) >= 5 and busy, codes  # capacity 5 = 4 waiting + 1 running
    assert all(r.headers["retry-after"] == "1" and r.json()["error"]["code"] == "queue_full" for r in busy)
    assert all(r.json()["choices"][0]["text"] is not None for r in responses if r.status_code == 200)


def test_disconnecting_mid_stream_stops_the_generation(server, report):
    before = server.health()["cancelled"]
    body = {"model": MODEL_ID, "prompt": "Once", "max_tokens": 256, "stream": True, "temperature": 1.0}
    with httpx.Client(timeout=60) as c, c.stream("POST", server.url + "/v1/completions", json=body) as r:
        assert r.status_code == 200
        for line in r.iter_lines():
            if line.startswith("data: ") and json.loads(line[6:])["choices"][0]["text"]:
                break  # one token received: hang up
    start = time.monotonic()
    while server.health()["pending"] or server.health()["cancelled"] == before:
        assert time.monotonic() - start < 5, "the abandoned generation kept its slot"
        time.sleep(0.02)
    report(f"slot freed {1000 * (time.monotonic() - start):.0f} ms after a mid-stream disconnect (of 256 tokens asked)")


def test_a_client_that_times_out_frees_its_slot(server):
    before = server.health()["cancelled"]
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(server.url + "/v1/completions", json={"model": MODEL_ID, "prompt": "Once", "max_tokens": 256},
                   timeout=httpx.Timeout(10, read=0.3))
    start = time.monotonic()
    while server.health()["cancelled"] == before or server.health()["pending"]:
        assert time.monotonic() - start < 5
        time.sleep(0.02)


# -- plugins: chat requests run MOSS's two-pass tool loop ------------------------------------------


def test_with_plugins_chat_requests_run_the_tool_loop(store, tmp_path, tokenizer):
    from jmoss.plugins import capability_lines, load_plugins

    srv = ServerProcess(store, "--plugins", "calculator", "--max-tokens", "16", log=tmp_path / "plugins.log")
    try:
        client = openai.OpenAI(base_url=srv.url + "/v1", api_key="unused", max_retries=0, timeout=60)
        out = client.chat.completions.create(model=MODEL_ID, messages=[{"role": "user", "content": "2^10?"}],
                                             max_tokens=8, temperature=0)
        streamed = client.chat.completions.create(model=MODEL_ID, messages=[{"role": "user", "content": "2^10?"}],
                                                  max_tokens=8, temperature=0, stream=True)
        streamed_text = "".join(c.choices[0].delta.content or "" for c in streamed)
    finally:
        alive = srv.proc.poll() is None
        srv.stop()
    assert alive
    meta = dialogue.base_meta_instruction() + capability_lines(load_plugins(["calculator"]))
    assert "Calculator: enabled" in meta
    # pass 1 reads meta (with the switch lines) + the Human turn; pass 2 also reads the Results
    assert out.usage.prompt_tokens >= len(tokenizer.encode(meta)) + len(tokenizer.encode(dialogue.human("2^10?")))
    assert out.choices[0].finish_reason in ("stop", "length") and streamed_text == out.choices[0].message.content


def test_health_answers_when_idle_sockets_fill_the_connection_limit(server, report):
    """1000 idle sockets (the --max-connections default) get other requests a 503; /health still answers."""
    idle = []
    try:
        for _ in range(1000):
            idle.append(socket.create_connection(("127.0.0.1", server.port), timeout=10))

        def get(path: str) -> tuple[int, float]:
            start = time.monotonic()
            with socket.create_connection(("127.0.0.1", server.port), timeout=10) as s:
                s.sendall(b"GET %s HTTP/1.1\r\nHost: x\r\n\r\n" % path.encode())
                head = s.recv(65536)
            return int(head.split(b" ")[1]), time.monotonic() - start

        deadline = time.monotonic() + 8  # within the server's 10 s header timeout, which would free them
        while get("/v1/models")[0] != 503:  # the server has accepted them all: the limit is reached
            assert time.monotonic() < deadline, "the idle sockets never filled the connection limit"
            time.sleep(0.1)
        status, seconds = get("/health")
        assert status == 200
    finally:
        for s in idle:
            s.close()
    report(f"/health answered 200 in {1000 * seconds:.0f} ms beside 1000 idle sockets (other paths: 503)")
