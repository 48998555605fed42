"""jmoss serve under load on loopback: 200 requests from 20 concurrent clients, hostile ones included.

Every client sends the same mix in a different order: OpenAI chat (plain and streamed, via the
official async client), completions, MOSS uid calls (the second continues the first's history),
malformed bodies, oversized prompts and streams it abandons after the first token. Every
well-formed request must be answered correctly, every malformed one with a 4xx JSON error, the
server must stay up with its queue drained, and its resident memory must stay flat.
"""

from __future__ import annotations

import asyncio
import json
import statistics
import time
from collections import Counter, defaultdict
from typing import Iterator

import httpx
import openai
import psutil
import pytest

from test_server import MODEL_ID, ServerProcess, build_store

CLIENTS, PER_CLIENT = 20, 10
MAX_TOKENS = 16  # the server's per-request limit; requests ask for 8
RSS_GROWTH_BOUND = 48 * 2**20
KINDS = ["chat", "chat_stream", "completion", "moss", "malformed", "chat", "oversized", "disconnect", "moss_again",
         "completion_stream"]
MALFORMED = [
    b'{"model": "tiny-moss", "messages": [{"role": "user", "content": "hi"}',  # truncated JSON
    b'{"model": "tiny-moss", "messages": [{"role": "user", "content": 7}]}',  # wrong type
    b'{"model": "tiny-moss", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 8, "best_of": 3}',
    b'\x00\x01\x02 not json at all',
    b'{"model": "tiny-moss", "messages": [{"role": "user", "content": "hi"}], "max_tokens": -5}',
    b'"just a string"',
    b'{"model": "tiny-moss", "messages": [{"role": "user", "content": "hi"}], "temperature": Infinity}',
    b'[' * 50000,
]


@pytest.fixture(scope="module")
def server(tmp_path_factory, shared_dir) -> Iterator[ServerProcess]:
    folder = tmp_path_factory.mktemp("load")
    srv = ServerProcess(build_store(folder, shared_dir), "--max-prompt-tokens", "600", "--max-tokens", str(MAX_TOKENS),
                        "--queue-size", "32", "--max-batch", "4", log=folder / "server.log")
    yield srv
    srv.stop()


async def _client(n: int, url: str, results: list, uids: dict) -> None:
    oa = openai.AsyncOpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=60)
    async with httpx.AsyncClient(base_url=url, timeout=60) as http:
        for i in range(PER_CLIENT):
            kind = KINDS[(i + n) % len(KINDS)]
            if kind == "moss_again" and n not in uids:
                kind = "moss"  # this client's order put the continuation first
            start = time.monotonic()
            ok, detail = await _one(kind, n, i, oa, http, uids)
            results.append((kind, ok, time.monotonic() - start, detail))
    await oa.close()


async def _one(kind: str, n: int, i: int, oa: openai.AsyncOpenAI, http: httpx.AsyncClient, uids: dict) -> tuple[bool, str]:
    messages = [{"role": "user", "content": f"client {n} request {i}: say something"}]
    if kind == "chat":
        out = await oa.chat.completions.create(model=MODEL_ID, messages=messages, max_tokens=8)
        return (out.object == "chat.completion" and isinstance(out.choices[0].message.content, str)
                and out.choices[0].finish_reason in ("stop", "length") and 1 <= out.usage.completion_tokens <= 8), ""
    if kind == "chat_stream":
        chunks = [c async for c in await oa.chat.completions.create(model=MODEL_ID, messages=messages, max_tokens=8,
                                                                      stream=True)]
        finishes = [c.choices[0].finish_reason for c in chunks if c.choices[0].finish_reason]
        return chunks[0].choices[0].delta.role == "assistant" and finishes in (["stop"], ["length"]), ""
    if kind == "completion":
        out = await oa.completions.create(model=MODEL_ID, prompt=f"{n}, {i}, ", max_tokens=8)
        return isinstance(out.choices[0].text, str) and out.usage.completion_tokens <= 8, ""
    if kind == "completion_stream":
        chunks = [c async for c in await oa.completions.create(model=MODEL_ID, prompt="Hello", max_tokens=8, stream=True)]
        return chunks[-1].choices[0].finish_reason in ("stop", "length"), ""
    if kind in ("moss", "moss_again"):
        body = {"prompt": f"你好 {i}", **({"uid": uids[n]} if kind == "moss_again" else {})}
        r = await http.post("/", json=body)
        out = r.json()
        if kind == "moss":
            uids[n] = out.get("uid")
            return r.status_code == 200 and len(out["history"]) == 1 and out["history"][0][1] == out["response"], ""
        return r.status_code == 200 and out["uid"] == uids[n] and len(out["history"]) == 2, ""
    if kind == "malformed":
        body = MALFORMED[(n + i) % len(MALFORMED)]
        r = await http.post("/v1/chat/completions", content=body)
        return 400 <= r.status_code < 500 and set(r.json()["error"]) == {"message", "type", "param", "code"}, str(r.status_code)
    if kind == "oversized":
        r = await http.post("/v1/chat/completions", json={"model": MODEL_ID, "messages": [
            {"role": "user", "content": "很长的问题 " * 400}], "max_tokens": 8})
        return r.status_code == 400 and r.json()["error"]["code"] == "context_length_exceeded", str(r.status_code)
    if kind == "disconnect":
        body = {"model": MODEL_ID, "messages": messages, "max_tokens": MAX_TOKENS, "stream": True}
        async with http.stream("POST", "/v1/chat/completions", json=body) as r:
            async for line in r.aiter_lines():
                if line.startswith("data: ") and json.loads(line[6:])["choices"][0]["delta"].get("content"):
                    break  # hang up after the first token
        return r.status_code == 200, ""
    raise AssertionError(kind)


async def _run(url: str, clients: int) -> tuple[list, float]:
    results: list = []
    uids: dict = {}
    start = time.monotonic()
    await asyncio.wait_for(asyncio.gather(*(_client(n, url, results, uids) for n in range(clients))), timeout=150)
    return results, time.monotonic() - start


def test_200_requests_from_20_clients_with_hostile_ones(server, report):
    proc = psutil.Process(server.proc.pid)
    asyncio.run(_run(server.url, clients=4))  # warm-up: every kind of request, jittor kernels compiled
    rss_before = proc.memory_info().rss
    results, wall = asyncio.run(_run(server.url, clients=CLIENTS))
    rss_after = proc.memory_info().rss

    assert len(results) == CLIENTS * PER_CLIENT == 200
    failed = [(k, d) for k, ok, _, d in results if not ok]
    assert not failed, failed
    assert server.proc.poll() is None, "the server died"
    health = server.health()
    assert health["pending"] == 0
    after = httpx.post(server.url + "/v1/completions", json={"model": MODEL_ID, "prompt": "still there?", "max_tokens": 4},
                       timeout=30)
    assert after.status_code == 200 and after.json()["choices"][0]["text"] is not None
    growth = rss_after - rss_before
    assert growth < RSS_GROWTH_BOUND, f"server RSS grew {growth / 2**20:.1f} MiB under load"

    counts = Counter(k for k, *_ in results)
    latency = defaultdict(list)
    for kind, _, seconds, _ in results:
        latency[kind].append(seconds)
    report(f"{len(results)} requests from {CLIENTS} concurrent clients in {wall:.1f} s "
           f"({len(results) / wall:.1f} req/s); all answered correctly; kinds: {dict(sorted(counts.items()))}")
    for kind in sorted(latency):
        values = sorted(latency[kind])
        p95 = values[min(len(values) - 1, int(0.95 * len(values)))]
        report(f"  {kind:18s} n={len(values):3d} latency p50 {1000 * statistics.median(values):6.0f} ms, "
               f"p95 {1000 * p95:6.0f} ms")
    report(f"server RSS {rss_before / 2**20:.1f} MiB after warm-up -> {rss_after / 2**20:.1f} MiB after the run "
           f"(growth {growth / 2**20:+.1f} MiB, bound {RSS_GROWTH_BOUND / 2**20:.0f} MiB); "
           f"served {health['served']}, cancelled by clients {health['cancelled']}, uid sessions {health['sessions']}")
