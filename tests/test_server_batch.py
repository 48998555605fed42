"""jmoss serve with --max-batch: concurrent requests are generated together and answer as if alone.

The same 8 greedy requests (completions and chat, streamed and not, different prompt lengths,
max_tokens and stop strings, and a two-turn uid conversation) are sent one at a time to a
max_batch 1 app (today's worker) and all at once to a max_batch 8 app on the same tiny MOSS; every
answer must be identical, and the batched worker must have run fewer forward steps than tokens.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

import httpx
import pytest

import jmoss
from jmoss.server import create_app
from test_server import MODEL_ID, build_store
from test_web import AppServer

REQUESTS: list[tuple[str, dict]] = [
    ("/v1/completions", {"prompt": "def fib(n):", "max_tokens": 24}),
    ("/v1/completions", {"prompt": "Once upon a time, in a land far away, there lived", "max_tokens": 9,
                         "stream": True}),
    ("/v1/completions", {"prompt": "1, 2, 3,", "max_tokens": 30, "stop": [" the", "\n"]}),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "你好"}], "max_tokens": 16}),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "Write a haiku about the sea."}],
                              "max_tokens": 20, "stream": True}),
    ("/v1/chat/completions", {"messages": [{"role": "system", "content": "Be brief."},
                                           {"role": "user", "content": "hi"}, {"role": "assistant", "content": "Hello!"},
                                           {"role": "user", "content": "What is 2+2?"}], "max_tokens": 12,
                              "stop": ["4"]}),
    ("/", {"prompt": "Tell me about Fudan University.", "max_length": 400}),
    ("/v1/completions", {"prompt": "x", "max_tokens": 3}),
]


@pytest.fixture(scope="module")
def model(tmp_path_factory, shared_dir):
    return jmoss.load(build_store(tmp_path_factory.mktemp("batch"), shared_dir), device="cpu")


async def _send(http: httpx.AsyncClient, path: str, body: dict) -> Any:
    """The answer's text (streamed answers joined); a uid request also sends a second turn."""
    if path == "/":
        first = (await http.post("/", json={**body, "temperature": 0})).json()
        second = (await http.post("/", json={"prompt": "And then?", "uid": first["uid"], "temperature": 0,
                                              "max_length": 600})).json()
        return [first["response"], second["response"], second["history"]]
    body = {"model": MODEL_ID, "temperature": 0, **body}
    if not body.get("stream"):
        r = await http.post(path, json=body)
        assert r.status_code == 200, r.text
        choice = r.json()["choices"][0]
        return [choice.get("text") or choice["message"]["content"], choice["finish_reason"], r.json()["usage"]]
    text, finish = "", None
    async with http.stream("POST", path, json=body) as r:
        assert r.status_code == 200
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            choice = json.loads(line[6:])["choices"][0]
            text += choice.get("text") or choice.get("delta", {}).get("content") or ""
            finish = choice["finish_reason"] or finish
    return [text, finish]


async def _all(url: str, concurrent: bool) -> list:
    async with httpx.AsyncClient(base_url=url, timeout=120) as http:
        if concurrent:
            return list(await asyncio.gather(*(_send(http, p, b) for p, b in REQUESTS)))
        return [await _send(http, p, b) for p, b in REQUESTS]


def test_eight_concurrent_requests_answer_as_each_alone(model, report):
    alone_server = AppServer(create_app(model, model_name=MODEL_ID, web=False, max_tokens_limit=32))
    try:
        alone = asyncio.run(_all(alone_server.url, concurrent=False))
    finally:
        alone_server.stop()
    batched_server = AppServer(create_app(model, model_name=MODEL_ID, web=False, max_tokens_limit=32, max_batch=8,
                                            queue_size=8))
    try:
        health = batched_server.health()
        assert health["max_batch"] == 8 and health["capacity"] == 16
        together = asyncio.run(_all(batched_server.url, concurrent=True))
        worker = batched_server.server.config.app.state.worker
        uid_chat = next(iter(worker.conversations.values())).chat
        assert any(s.owner is uid_chat and s.length for s in worker.runner.slots), "the uid conversation lost its KV"
        steps, row_steps = worker.runner.steps, worker.runner.row_steps
        assert batched_server.wait_idle()["pending"] == 0
    finally:
        batched_server.stop()
    for i, (got, want) in enumerate(zip(together, alone)):
        assert got == want, f"request {i} {REQUESTS[i][0]}: batched {got!r} != alone {want!r}"
    assert row_steps > 1.5 * steps, f"{row_steps} sequence steps in {steps} forwards: the requests were not batched"
    report(f"8 concurrent requests (9 turns) on max_batch 8 = each alone on max_batch 1; {steps} batched forwards "
           f"advanced {row_steps} sequence steps (mean batch {row_steps / steps:.1f})")


def test_admission_counts_the_batch_and_the_queue(model):
    server = AppServer(create_app(model, model_name=MODEL_ID, web=False, max_batch=2, queue_size=0,
                                  max_tokens_limit=400))

    async def run() -> list[int]:
        async with httpx.AsyncClient(base_url=server.url, timeout=120) as http:
            body = {"model": MODEL_ID, "prompt": "count:", "max_tokens": 400, "temperature": 0}
            rs = await asyncio.gather(*(http.post("/v1/completions", json=body) for _ in range(3)))
            return sorted(r.status_code for r in rs)

    try:
        assert asyncio.run(run()) == [200, 200, 503]
        assert server.wait_idle()["pending"] == 0
    finally:
        server.stop()
