"""jmoss serve --ray: the front and 2 model replicas on a real local Ray cluster, replicas killed.

One cluster for the module: two Ray node processes on 127.0.0.1 (one CPU each, as CI's 2 cores),
Ray Serve's controller, and 2 ModelReplicas (one per node) of a tiny converted MOSS with MOSS's
real tokenizer, each with its own worker and continuous batching (max_batch 2); the front
(jmoss.server.ray_app.create_front) under uvicorn in this process. Replicas are killed by their
pid (SIGKILL, as the OOM killer would); Ray Serve's controller restarts them.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import time
from typing import Iterator

import httpx
import openai
import psutil
import pytest

ray = pytest.importorskip("ray", reason="the Ray tests need ray[serve] (pip install '.[test]')")

from ray.cluster_utils import Cluster  # noqa: E402

from jmoss import dialogue  # noqa: E402
from jmoss.server import ray_app  # noqa: E402
from jmoss.server.ray_app import PREFILL_HEADER, REPLICA_HEADER  # noqa: E402
from jmoss.tokenizer import load_tokenizer  # noqa: E402
from moss_fixtures import moss_tokenizer_dir  # noqa: E402
from test_server import MODEL_ID, build_store  # noqa: E402
from test_web import AppServer  # noqa: E402

MAX_TOKENS = 24
PROMPTS = ["你好", "What is 2 + 3?", "Tell me about Fudan University.", "谢谢，再见"]


def _footprint() -> int:
    """Proportional set size of every Ray process of this test's cluster (GCS, raylets, workers,
    replicas), children of this process: shared pages are counted once."""
    total = 0
    for child in psutil.Process().children(recursive=True):
        try:
            total += child.memory_full_info().pss
        except psutil.Error:
            pass
    return total


@pytest.fixture(scope="module")
def cluster(tmp_path_factory, shared_dir) -> Iterator[dict]:
    store = build_store(tmp_path_factory.mktemp("ray"), shared_dir)
    started = time.monotonic()
    # the nodes take this machine's address as Ray picks it: a driver given 127.0.0.1 is sent to that
    # address anyway (ray._private.services.resolve_ip_for_localhost), where nodes bound to loopback are not
    nodes = Cluster(initialize_head=True, head_node_args={
        "num_cpus": 1, "include_dashboard": False, "object_store_memory": 80 << 20})
    nodes.add_node(num_cpus=1, object_store_memory=80 << 20)
    try:
        ray.init(address=nodes.address, logging_level="warning", log_to_driver=False)
        up = time.monotonic()
        handle = ray_app.deploy(str(store), replicas=2, replica_cpus=1, load={"device": "cpu", "batch": 2},
                                app={"model_name": MODEL_ID, "max_tokens_limit": 64, "max_batch": 2,
                                     "queue_size": 16})
        deployed = time.monotonic()
        front = AppServer(ray_app.create_front(handle, model_name=MODEL_ID, replicas=2,
                                               status=ray_app.replica_states))
        yield {"front": front, "store": store, "handle": handle, "started": up - started, "deployed": deployed - up,
               "footprint": _footprint(), "tokenizer": load_tokenizer(store)}
        front.stop()
    finally:
        from ray import serve

        try:
            if ray.is_initialized():  # else serve.shutdown() would start a Ray of its own and wait on it
                serve.shutdown()
        finally:
            ray.shutdown()
            nodes.shutdown()


def test_cluster_figures(cluster, report):
    """Ray's version, how long the cluster and the replicas took to start, and its memory."""
    report(f"ray {ray.__version__}: 2 nodes up in {cluster['started']:.1f} s, 2 replicas loaded in "
           f"{cluster['deployed']:.1f} s, cluster PSS {cluster['footprint'] / 2**20:.0f} MiB "
           f"(load average {os.getloadavg()[0]:.1f})")
    health = httpx.get(cluster["front"].url + "/health", timeout=30).json()
    assert health["status"] == "ok" and health["replicas"]["up"] == 2 and health["replicas"]["target"] == 2
    assert health["per_replica"]["max_batch"] == 2 and health["per_replica"]["limits"]["max_tokens"] == 64


def test_openai_client_and_uid_api_through_the_front(cluster):
    url = cluster["front"].url
    client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)
    assert [m.id for m in client.models.list().data] == [MODEL_ID]
    chat = client.chat.completions.create(model="any", messages=[{"role": "user", "content": "hi"}],
                                          max_tokens=8, temperature=0)
    assert chat.choices[0].finish_reason in ("stop", "length") and chat.usage.completion_tokens <= 8
    pieces, finish = [], None
    for chunk in client.chat.completions.create(model="any", messages=[{"role": "user", "content": "hi"}],
                                                max_tokens=8, temperature=0, stream=True):
        if chunk.choices:
            pieces.append(chunk.choices[0].delta.content or "")
            finish = chunk.choices[0].finish_reason or finish
    assert "".join(pieces) == chat.choices[0].message.content and finish == chat.choices[0].finish_reason
    text = client.completions.create(model="any", prompt="def add(a, b):", max_tokens=5, temperature=0)
    assert text.usage.completion_tokens <= 5
    # the same limits and error shapes as one server: a max_tokens past --max-tokens
    with pytest.raises(openai.BadRequestError) as refused:
        client.chat.completions.create(model="any", messages=[{"role": "user", "content": "hi"}], max_tokens=65)
    assert refused.value.body["code"] == "invalid_value" and refused.value.body["param"] == "max_tokens"
    bad = httpx.post(url + "/v1/chat/completions", content=b"{", timeout=30)
    assert bad.status_code == 400 and bad.json()["error"]["code"] == "invalid_json"
    assert httpx.get(url + "/nowhere", timeout=30).json()["error"]["code"] == "not_found"
    assert "<html" in httpx.get(url + "/", timeout=30).text.lower()  # the chat page
    # MOSS's uid API: a new conversation, then its second turn
    first = httpx.post(url + "/", json={"prompt": "你好", "temperature": 0, "max_new_tokens": 8}, timeout=60).json()
    second = httpx.post(url + "/", json={"prompt": "再见", "uid": first["uid"], "temperature": 0,
                                          "max_new_tokens": 8}, timeout=60).json()
    assert second["uid"] == first["uid"] and [q for q, _ in second["history"]] == ["你好", "再见"]


def test_the_front_checks_api_keys_and_serves_its_metrics(cluster):
    """--api-key with --ray: the front refuses a request without the key before any replica sees it
    (401 in OpenAI's shape), forwards one with it; /metrics are the front's, behind the key."""
    key = "front-key-0123456789"
    front = AppServer(ray_app.create_front(cluster["handle"], model_name=MODEL_ID, replicas=2,
                                           status=ray_app.replica_states, api_keys=[key]))
    try:
        refused = httpx.post(front.url + "/v1/chat/completions", timeout=30,
                             json={"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2})
        assert refused.status_code == 401 and refused.json()["error"]["code"] == "invalid_api_key"
        assert front.health()["served"] == 0  # nothing reached a replica
        assert httpx.get(front.url + "/metrics", timeout=30).status_code == 401
        client = openai.OpenAI(base_url=front.url + "/v1", api_key=key, max_retries=0)
        reply = client.chat.completions.create(model="m", messages=[{"role": "user", "content": "hi"}], max_tokens=2)
        assert reply.usage.completion_tokens <= 2
        scraped = httpx.get(front.url + "/metrics", headers={"Authorization": f"Bearer {key}"}, timeout=30).text
        assert 'jmoss_ray_replicas{state="RUNNING"} 2.0' in scraped and "jmoss_ray_served_total 1.0" in scraped
        assert 'jmoss_requests_total{route="/v1/chat/completions",status="401"} 1.0' in scraped
    finally:
        front.stop()


def _turn(url: str, prompt: str, uid: str | None) -> httpx.Response:
    r = httpx.post(url + "/", json={"prompt": prompt, "uid": uid, "temperature": 0, "max_new_tokens": MAX_TOKENS},
                   timeout=120)
    assert r.status_code == 200, r.text
    return r


def _own_tokens(tokenizer, prompt: str) -> int:
    return len(tokenizer.encode(dialogue.human(prompt) + dialogue.prefix(dialogue.MOSS)))


def _pid_of(replica: str) -> int:
    actor = ray.get_actor(f"SERVE_REPLICA::{ray_app.APP_NAME}#ModelReplica#{replica}", namespace="serve")
    return ray.get(actor.__ray_call__.remote(lambda self: os.getpid()))


def _wait_for_replicas(url: str, count: int, timeout: float = 120) -> float:
    started = time.monotonic()
    while True:
        health = httpx.get(url + "/health", timeout=30).json()
        if health["replicas"]["up"] == count:
            return time.monotonic() - started
        assert time.monotonic() - started < timeout, health
        time.sleep(0.5)


def test_uid_conversation_survives_its_replica_killed(cluster, report):
    url, tokenizer = cluster["front"].url, cluster["tokenizer"]
    # uninterrupted: 4 turns on one replica, each prefilling only its own tokens
    ref, uid = [], None
    for i, prompt in enumerate(PROMPTS):
        r = _turn(url, prompt, uid)
        uid = r.json()["uid"]
        ref.append(r)
    assert len({r.headers[REPLICA_HEADER] for r in ref}) == 1
    for i, (prompt, r) in enumerate(zip(PROMPTS, ref)):
        prefilled, own = int(r.headers[PREFILL_HEADER]), _own_tokens(tokenizer, prompt)
        if i:  # this turn, and the previous reply's closing: its last token (never fed) and "<eom>\n"
            assert own <= prefilled <= own + 3, (i, prefilled, own)
    # the same conversation, its replica killed by pid after turn 2
    got, uid = [], None
    for prompt in PROMPTS[:2]:
        r = _turn(url, prompt, uid)
        uid = r.json()["uid"]
        got.append(r)
    replica = got[0].headers[REPLICA_HEADER]
    assert got[1].headers[REPLICA_HEADER] == replica
    os.kill(_pid_of(replica), signal.SIGKILL)
    killed = time.monotonic()
    for prompt in PROMPTS[2:]:
        got.append(_turn(url, prompt, uid))
    after = time.monotonic() - killed
    third, fourth = got[2], got[3]
    assert third.headers[REPLICA_HEADER] != replica and fourth.headers[REPLICA_HEADER] == third.headers[REPLICA_HEADER]
    history_tokens = sum(_own_tokens(tokenizer, p) for p in PROMPTS[:2])
    assert int(third.headers[PREFILL_HEADER]) > history_tokens  # the new replica read the whole history once
    own = _own_tokens(tokenizer, PROMPTS[3])
    assert own <= int(fourth.headers[PREFILL_HEADER]) <= own + 3  # then only its own tokens again
    assert [r.json()["response"] for r in got] == [r.json()["response"] for r in ref]
    assert got[3].json()["history"] == ref[3].json()["history"]
    assert len(got[3].json()["history"]) == 4
    restart = _wait_for_replicas(url, 2)
    report(f"turns 3-4 answered {after:.2f} s after the kill; Ray had the replica back {restart:.1f} s later")


def test_20_concurrent_requests_during_a_replica_kill(cluster, report):
    url = cluster["front"].url
    _wait_for_replicas(url, 2)

    async def uid_turn(client: httpx.AsyncClient, i: int) -> str:
        r = await client.post("/", json={"prompt": f"count to {i}", "temperature": 0, "max_new_tokens": 48})
        return _outcome(r)

    async def chat(client: httpx.AsyncClient, i: int) -> str:
        r = await client.post("/v1/chat/completions", json={
            "model": "m", "messages": [{"role": "user", "content": f"story {i}"}], "max_tokens": 48, "temperature": 0})
        return _outcome(r)

    async def streamed(client: httpx.AsyncClient, i: int) -> str:
        async with client.stream("POST", "/v1/chat/completions", json={
                "model": "m", "messages": [{"role": "user", "content": f"poem {i}"}], "max_tokens": 48,
                "temperature": 0, "stream": True}) as r:
            if r.status_code != 200:
                return _outcome(r, await r.aread())
            events = [line[6:] async for line in r.aiter_lines() if line.startswith("data: ")]
        if events[-1] == "[DONE]":
            finishes = [c["choices"][0]["finish_reason"] for c in map(json.loads, events[:-1]) if c["choices"]]
            assert finishes[-1] in ("stop", "length")
            return "answered"
        last = json.loads(events[-1])  # no [DONE]: it must end with an error event
        assert last["error"]["code"] == "replica_failed", events[-3:]
        return "stream ended with an error event"

    async def main() -> list[str]:
        async with httpx.AsyncClient(base_url=url, timeout=120) as client:
            kinds = [uid_turn, chat, streamed, uid_turn, chat]
            tasks = [asyncio.ensure_future(kinds[i % 5](client, i)) for i in range(20)]
            await asyncio.sleep(0.5)
            replica = (await client.post("/v1/completions", json={"model": "m", "prompt": "x", "max_tokens": 1})
                       ).headers[REPLICA_HEADER]
            os.kill(await asyncio.to_thread(_pid_of, replica), signal.SIGKILL)
            return await asyncio.gather(*tasks)

    before = httpx.get(url + "/health", timeout=30).json()
    outcomes = asyncio.run(main())
    after = httpx.get(url + "/health", timeout=30).json()
    counts = {o: outcomes.count(o) for o in set(outcomes)}
    report(f"20 concurrent requests, a replica killed: {counts}; the front retried "
           f"{after['retried'] - before['retried']} (load average {os.getloadavg()[0]:.1f})")
    assert set(outcomes) <= {"answered", "refused (503)", "stream ended with an error event"}
    assert counts.get("answered", 0) >= 10
    _wait_for_replicas(url, 2)


def _outcome(r: httpx.Response, raw: bytes | None = None) -> str:
    body = json.loads(raw if raw is not None else r.content)
    if r.status_code == 200:
        assert "response" in body or body["choices"][0]["finish_reason"] in ("stop", "length")
        return "answered"
    assert r.status_code == 503 and body["error"]["type"] in ("server_error", "server_busy"), (r.status_code, body)
    return "refused (503)"


def test_chat_requests_that_extend_a_cached_prompt_go_to_its_replica(cluster):
    url = cluster["front"].url
    _wait_for_replicas(url, 2)
    client = httpx.Client(base_url=url, timeout=60)
    messages = [{"role": "user", "content": "Name three rivers."}]
    first = client.post("/v1/chat/completions", json={"model": "m", "messages": messages, "max_tokens": 12,
                                                       "temperature": 0})
    replica = first.headers[REPLICA_HEADER]
    messages += [{"role": "assistant", "content": first.json()["choices"][0]["message"]["content"]},
                 {"role": "user", "content": "And three mountains?"}]
    for _ in range(3):  # whatever the two-choice draw would have said
        second = client.post("/v1/chat/completions", json={"model": "m", "messages": messages, "max_tokens": 12,
                                                            "temperature": 0})
        assert second.headers[REPLICA_HEADER] == replica
        assert second.json()["usage"]["prompt_tokens_details"]["cached_tokens"] > first.json()["usage"]["prompt_tokens"] // 2


def test_the_cli_flags_reach_serve_ray(monkeypatch, tmp_path):
    """`jmoss serve MODEL --ray [ADDRESS] --replicas N --replica-cpus/--replica-gpus` is serve_ray(...)."""
    from click.testing import CliRunner

    from jmoss import cli

    calls = []
    monkeypatch.setattr(ray_app, "serve_ray", lambda *a, **k: calls.append((a, k)))
    runner = CliRunner()
    out = runner.invoke(cli.main, ["serve", str(tmp_path), "--ray", "--replicas", "3", "--replica-cpus", "2",
                                   "--max-batch", "4", "--port", "0"])
    assert out.exit_code == 0, out.output
    out = runner.invoke(cli.main, ["serve", str(tmp_path), "--ray", "10.0.0.1:6379", "--replica-gpus", "1",
                                   "--device", "cuda", "--port", "0", "--session-limit", "9", "-t", "3", "-c", "512",
                                   "--api-key", "k" * 16, "--metrics-public", "--system", "Be brief.",
                                   "--max-tokens-limit", "99", "--plugins", "text2image", "--text2image-cmd",
                                   "draw --fast"], env={"JMOSS_API_KEY": "e" * 16})
    assert out.exit_code == 0, out.output
    (args1, local), (_, joined) = calls
    assert args1[0] == str(tmp_path) and local["address"] is None and local["replicas"] == 3
    assert local["replica_cpus"] == 2 and local["replica_gpus"] is None and local["max_batch"] == 4
    assert local["api_keys"] == [] and not local["metrics_public"] and local["meta_instruction"] is None
    assert joined["address"] == "10.0.0.1:6379" and joined["replica_gpus"] == 1 and joined["device"] == "cuda"
    assert joined["session_limit"] == 9 and joined["replicas"] == 2 and joined["threads"] == 3
    assert joined["ctx_size"] == 512 and joined["api_keys"] == ["k" * 16, "e" * 16] and joined["metrics_public"]
    assert joined["meta_instruction"] == "Be brief.\n" and joined["max_tokens_limit"] == 99
    assert joined["plugins"] == ["text2image"] and joined["plugin_options"]["text2image"]["command"] == ["draw", "--fast"]
    # --pull converts into one machine's store; the replicas load on theirs
    refused = runner.invoke(cli.main, ["serve", "fnlp/moss-moon-003-sft", "--ray", "--pull", "--port", "0"])
    assert refused.exit_code == 2 and "--pull cannot be used with --ray" in refused.output and len(calls) == 2
    # the replica flags mean nothing without --ray: refused before any model loads, not ignored
    ignored = runner.invoke(cli.main, ["serve", str(tmp_path), "--replicas", "4", "--replica-gpus", "1", "--port", "0"])
    assert ignored.exit_code == 2 and "--replicas, --replica-gpus only apply with --ray" in ignored.output
    # --offload and --lookup reach the replicas' jmoss.load and app
    assert runner.invoke(cli.main, ["serve", str(tmp_path), "--ray", "--offload", "cpu", "--lookup", "off",
                                    "--port", "0"]).exit_code == 0
    assert calls[2][1]["offload"] == "cpu" and calls[2][1]["lookup"] == 0  # "off": no drafts


def test_replicas_get_an_absolute_path_or_a_name(monkeypatch, tmp_path):
    """A relative store path is made absolute (a replica's working directory is its node's); a
    converted name stays a name, for each node to resolve; a missing path fails once, in the front."""
    from jmoss.errors import ModelNotFoundError

    (tmp_path / "store").mkdir()
    monkeypatch.chdir(tmp_path)
    assert ray_app._replica_model("store") == str(tmp_path / "store")
    assert ray_app._replica_model("fnlp/moss-moon-003-sft:int4") == "fnlp/moss-moon-003-sft:int4"
    with pytest.raises(ModelNotFoundError):
        ray_app._replica_model("./no-such-store")
