"""``jmoss serve`` for deployments: API keys, /metrics, and JSON-schema output, through the official client.

One tiny random MOSS (MOSS's real tokenizer, random weights) is served in-process twice: one
sequence at a time, and with continuous batching (max_batch 4). The weights are random, so
whatever JSON comes out was shaped by the token masks alone: every one must validate.
"""

from __future__ import annotations

import json
import string
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Iterator

import httpx
import jsonschema
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from jmoss.api import Model
from jmoss.server import create_app, default_meta_instruction
from jmoss.server.auth import ApiKeyError, exposure_warning, load_keys
from moss_fixtures import moss_tokenizer_dir, tiny_moss
from test_server import MODEL_ID
from test_web import AppServer
from torch_reference import state_dict_numpy

KEYS = ["sk-jmoss-test-key-1", "second-key-for-rotation"]


@pytest.fixture(scope="module")
def model(tmp_path_factory, shared_dir) -> Model:
    torch_model, config = tiny_moss(seed=3)
    return Model.from_state_dict(state_dict_numpy(torch_model), config, device="cpu",
                                 tokenizer_path=moss_tokenizer_dir(shared_dir, tmp_path_factory.mktemp("tok")))


@pytest.fixture(scope="module")
def single(model) -> Iterator[AppServer]:
    srv = AppServer(create_app(model, model_name=MODEL_ID, api_keys=KEYS, max_tokens_limit=256))
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def batched(model) -> Iterator[AppServer]:
    srv = AppServer(create_app(model, model_name=MODEL_ID, api_keys=KEYS[:1], max_batch=4, max_tokens_limit=256))
    yield srv
    srv.stop()


def client(server: AppServer, key: str = KEYS[0]) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key=key, max_retries=0, timeout=120)


# -- API keys ----------------------------------------------------------------------------------------

ROUTES = [("GET", "/v1/models"), ("POST", "/v1/chat/completions"), ("POST", "/v1/completions"), ("POST", "/"),
          ("GET", "/metrics"), ("GET", "/no/such/route"), ("DELETE", "/v1/models")]


@pytest.mark.parametrize("method,path", ROUTES)
@pytest.mark.parametrize("auth", [None, "Bearer wrong-key-123", f"Basic {KEYS[0]}", f"Bearer {KEYS[0]}x",
                                  f"Bearer {KEYS[0][:-1]}"])
def test_every_route_but_health_and_the_page_needs_a_key(single, method, path, auth):
    headers = {"Authorization": auth} if auth else {}
    r = httpx.request(method, single.url + path, headers=headers, json={"model": MODEL_ID, "prompt": "x"}, timeout=30)
    assert r.status_code == 401
    error = r.json()["error"]
    assert error["code"] == "invalid_api_key" and error["type"] == "invalid_request_error" and error["message"]
    assert r.headers["www-authenticate"].startswith("Bearer")


def test_health_and_the_page_need_no_key_and_every_key_works(single):
    assert httpx.get(single.url + "/health", timeout=10).json()["status"] == "ok"
    page = httpx.get(single.url + "/", timeout=10)
    assert page.status_code == 200 and "<html" in page.text and '"auth": true' in page.text
    for key in KEYS:
        r = httpx.get(single.url + "/v1/models", headers={"Authorization": f"Bearer {key}"}, timeout=10)
        assert r.status_code == 200 and r.json()["data"][0]["id"] == MODEL_ID
    room = len(single.server.config.app.state.worker.model.tokenizer.encode(default_meta_instruction([]))) + 24
    r = httpx.post(single.url + "/", json={"prompt": "你好", "max_length": room},  # a short reply
                   headers={"Authorization": f"bearer {KEYS[1]}"}, timeout=60)
    assert r.status_code == 200 and r.json()["uid"]


def test_the_openai_client_is_refused_without_the_key_and_served_with_it(single):
    ask = dict(model=MODEL_ID, messages=[{"role": "user", "content": "Hi"}], max_tokens=4)
    # a wrong key, and no key at all (the client sends none when its Authorization header is omitted)
    for c, extra in ((client(single, "sk-wrong-key-0000"), {}),
                     (client(single), {"extra_headers": {"Authorization": openai.omit}})):
        with pytest.raises(openai.AuthenticationError):
            c.models.list(**extra)
        with pytest.raises(openai.AuthenticationError):
            c.chat.completions.create(**ask, **extra)
        with pytest.raises(openai.AuthenticationError):
            list(c.chat.completions.create(**ask, stream=True, **extra))
        with pytest.raises(openai.AuthenticationError):
            c.completions.create(model=MODEL_ID, prompt="x", max_tokens=2, **extra)
    c = client(single)
    assert c.chat.completions.create(**ask).choices[0].finish_reason in ("stop", "length")
    chunks = list(c.chat.completions.create(**ask, stream=True))
    assert chunks[-1].choices[0].finish_reason in ("stop", "length")
    assert c.completions.create(model=MODEL_ID, prompt="x", max_tokens=2).usage.completion_tokens >= 1
    assert client(single, KEYS[1]).models.list().data[0].id == MODEL_ID  # the second key works as well


def test_keys_come_from_flags_the_environment_and_a_file(tmp_path):
    f = tmp_path / "keys.txt"
    f.write_text("# deployment keys\nfile-key-aaaaaaaa\n\n  file-key-bbbbbbbb  \n")
    assert load_keys(["flag-key-1234"], f, environ={"JMOSS_API_KEY": "env-key-1234 env-key-5678"}) == [
        "flag-key-1234", "env-key-1234", "env-key-5678", "file-key-aaaaaaaa", "file-key-bbbbbbbb"]
    with pytest.raises(ApiKeyError):
        load_keys(["short"], environ={})
    with pytest.raises(ApiKeyError):
        load_keys(["has a space in it"], environ={})
    with pytest.raises(ApiKeyError):
        load_keys([], tmp_path / "missing.txt", environ={})
    assert exposure_warning("0.0.0.0", []) and "--api-key" in exposure_warning("0.0.0.0", [])
    assert exposure_warning("192.0.2.7", []) is not None and exposure_warning("example.org", []) is not None
    for quiet in (("127.0.0.1", []), ("localhost", []), ("::1", []), ("127.0.0.9", []), ("0.0.0.0", ["k" * 8])):
        assert exposure_warning(*quiet) is None


def test_metrics_parse_and_count_five_requests(single, model):
    def scrape() -> dict[tuple[str, tuple], float]:
        r = httpx.get(single.url + "/metrics", headers={"Authorization": f"Bearer {KEYS[0]}"}, timeout=10)
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
        return {(s.name, tuple(sorted(s.labels.items()))): s.value
                for family in text_string_to_metric_families(r.text) for s in family.samples}

    before = scrape()
    before_stats = model.stats.snapshot()
    c = client(single)
    for i in range(5):
        c.chat.completions.create(model=MODEL_ID, messages=[{"role": "user", "content": f"count {i}"}], max_tokens=3,
                                  stream=i % 2 == 1)
    httpx.get(single.url + "/v1/models", headers={"Authorization": "Bearer nope-nope-nope"}, timeout=10)
    after = scrape()

    def moved(name: str, **labels: str) -> float:
        key = (name, tuple(sorted(labels.items())))
        return after.get(key, 0.0) - before.get(key, 0.0)

    assert moved("jmoss_requests_total", route="/v1/chat/completions", status="200") == 5
    assert moved("jmoss_requests_total", route="/v1/models", status="401") == 1
    assert moved("jmoss_generations_total") == 5
    assert 5 <= moved("jmoss_completion_tokens_total") <= 15
    assert moved("jmoss_prompt_tokens_total") > 0
    assert moved("jmoss_time_to_first_token_seconds_count") == 5
    assert moved("jmoss_time_to_first_token_seconds_bucket", le="+Inf") == 5
    assert moved("jmoss_time_per_output_token_seconds_count") >= 1
    assert moved("jmoss_queue_wait_seconds_count") == 5
    assert moved("jmoss_prefix_cache_hits_total") >= 4  # the meta instruction stays cached between requests
    for gauge in ("jmoss_queue_depth", "jmoss_running_requests", "jmoss_running_sequences",
                  "jmoss_streamed_bytes_per_token"):
        assert (gauge, ()) in after
    assert 0 < after[("jmoss_kv_positions_in_use", ())] <= after[("jmoss_kv_positions_capacity", ())] == 1024
    # the Python API reads the same object
    stats = model.stats.snapshot()
    assert stats["generations"] - before_stats["generations"] == 5 and stats["running"] == 0


def test_metrics_public_needs_no_key_but_the_api_still_does(model):
    srv = AppServer(create_app(model, model_name=MODEL_ID, api_keys=KEYS, metrics_public=True, web=False))
    try:
        assert httpx.get(srv.url + "/metrics", timeout=10).status_code == 200
        assert httpx.get(srv.url + "/v1/models", timeout=10).status_code == 401
        assert httpx.get(srv.url + "/", timeout=10).status_code == 401  # no page: GET / is a route like any other
    finally:
        srv.stop()


# -- JSON-schema output ----------------------------------------------------------------------------
# Short, bounded schemas: strings have a maxLength, arrays maxItems, numbers a multipleOf (an unbounded
# fraction lets a random model write digits until max_tokens; see the README).

SCHEMAS = [
    {"type": "object", "properties": {"name": {"type": "string", "maxLength": 12},
                                      "age": {"type": "integer", "minimum": 0, "maximum": 150}},
     "required": ["name", "age"], "additionalProperties": False},
    {"type": "object", "properties": {"point": {"type": "object", "properties": {
        "x": {"type": "number", "multipleOf": 0.25, "minimum": -10, "maximum": 10},
        "y": {"type": "integer", "minimum": -5, "maximum": 5}}, "required": ["x", "y"], "additionalProperties": False},
        "label": {"enum": ["origin", "edge \"quoted\"", "back\\slash", "新"]}},
     "required": ["point", "label"], "additionalProperties": False},
    {"type": "object", "properties": {"tags": {"type": "array", "items": {"type": "string", "maxLength": 6},
                                               "minItems": 1, "maxItems": 3},
                                      "ok": {"type": "boolean"}, "note": {"type": ["string", "null"], "maxLength": 8}},
     "required": ["tags", "ok", "note"], "additionalProperties": False},
    {"type": "object", "properties": {"matrix": {"type": "array", "maxItems": 2, "items": {
        "type": "array", "maxItems": 2, "items": {"type": "integer", "minimum": 0, "maximum": 99}}},
        # a newline, tab, quote or backslash inside: the JSON must write an escape
        "escaped": {"type": "string", "pattern": "^[a-z]{1,3}[\\n\\t\"\\\\][a-z]{0,2}$"}},
     "required": ["matrix", "escaped"], "additionalProperties": False},
    {"type": "object", "properties": {"items": {"type": "array", "maxItems": 2, "items": {
        "type": "object", "properties": {"id": {"type": "integer", "minimum": 1, "maximum": 9},
                                         "kind": {"enum": ["a", "b"]}},
        "required": ["id", "kind"], "additionalProperties": False}}},
     "required": ["items"], "additionalProperties": False},
]


def _ask(c: openai.OpenAI, i: int, stream: bool) -> tuple[str, str, dict]:
    schema = SCHEMAS[i % len(SCHEMAS)]
    kwargs = dict(model=MODEL_ID, messages=[{"role": "user", "content": f"JSON please, case {i}"}], max_tokens=120,
                  temperature=1.0, top_p=1.0, seed=i,
                  response_format={"type": "json_schema", "json_schema": {"name": f"case{i % len(SCHEMAS)}",
                                                                          "schema": schema, "strict": True}})
    if not stream:
        out = c.chat.completions.create(**kwargs)
        return out.choices[0].message.content, out.choices[0].finish_reason, schema
    text, finish = "", None
    for chunk in c.chat.completions.create(**kwargs, stream=True):
        if chunk.choices:
            text += chunk.choices[0].delta.content or ""
            finish = chunk.choices[0].finish_reason or finish
    return text, finish, schema


def _check_all(results: list[tuple[str, str, dict]]) -> None:
    for text, finish, schema in results:
        assert finish == "stop", (text, finish)
        jsonschema.validate(json.loads(text), schema)  # parses and validates, or says why not


def test_json_schema_output_validates_one_at_a_time(single, report):
    c = client(single)
    results = [_ask(c, i, stream=i % 2 == 1) for i in range(25)]
    _check_all(results)
    report(f"json_schema, batch 1: {len(results)}/25 outputs valid, e.g. {results[1][0]}")


def test_json_schema_output_validates_four_at_a_time(batched, report):
    c = client(batched)
    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(lambda i: _ask(c, i, stream=i % 2 == 0), range(25, 50)))
    _check_all(results)
    report(f"json_schema, batch 4: {len(results)}/25 outputs valid, e.g. {results[0][0]}")


def test_json_object_and_completions_and_greedy(single):
    c = client(single)
    out = c.chat.completions.create(model=MODEL_ID, messages=[{"role": "user", "content": "any object"}],
                                    max_tokens=200, temperature=0, response_format={"type": "json_object"})
    if out.choices[0].finish_reason == "stop":
        assert isinstance(json.loads(out.choices[0].message.content), dict)
    else:  # an unconstrained object may outrun max_tokens: then it is cut, as OpenAI does
        assert out.choices[0].finish_reason == "length"
    schema = SCHEMAS[0]
    done = c.completions.create(model=MODEL_ID, prompt="Person:", max_tokens=60, temperature=0,
                                extra_body={"response_format": {"type": "json_schema",
                                                                "json_schema": {"name": "p", "schema": schema}}})
    assert done.choices[0].finish_reason == "stop"
    jsonschema.validate(json.loads(done.choices[0].text), schema)
    assert not done.choices[0].text.startswith(" ")  # a completion is the JSON alone


def test_max_tokens_cuts_the_json_and_says_length(single):
    c = client(single)
    out = c.chat.completions.create(
        model=MODEL_ID, messages=[{"role": "user", "content": "x"}], max_tokens=3, temperature=0,
        response_format={"type": "json_schema", "json_schema": {"name": "s", "schema": SCHEMAS[1]}})
    text = out.choices[0].message.content
    assert out.choices[0].finish_reason == "length" and text.startswith("{")
    with pytest.raises(json.JSONDecodeError):
        json.loads(text)


@pytest.mark.parametrize("schema,feature", [
    ({"type": "array", "uniqueItems": True}, "uniqueItems"),
    ({"type": "object", "properties": {"a": {"not": {"type": "string"}}}}, "not"),
    ({"type": "string", "format": "no-such-format"}, "no-such-format"),
    ({"$ref": "#/definitions/missing"}, "/definitions/missing"),
])
def test_an_unsupported_schema_is_a_400_naming_the_feature(single, schema, feature):
    with pytest.raises(openai.BadRequestError) as info:
        client(single).chat.completions.create(
            model=MODEL_ID, messages=[{"role": "user", "content": "x"}], max_tokens=4,
            response_format={"type": "json_schema", "json_schema": {"name": "bad", "schema": schema}})
    error = info.value.body
    assert feature in error["message"] and error["param"] == "response_format.json_schema.schema"


def test_the_cli_refuses_a_malformed_key_before_loading_anything(tmp_path):
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-m", "jmoss.cli", "serve", str(tmp_path / "no-model"), "--api-key", "short"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode != 0 and "API key must be" in out.stderr


def test_the_cli_takes_keys_from_flags_the_environment_and_a_file(tmp_path, shared_dir, monkeypatch):
    from test_server import ServerProcess, build_store

    keys = tmp_path / "keys.txt"
    keys.write_text("# rotated monthly\nfile-key-aaaaaaaa\n")
    monkeypatch.setenv("JMOSS_API_KEY", "env-key-bbbbbbbb")
    srv = ServerProcess(build_store(tmp_path, shared_dir), "--api-key", "flag-key-cccccccc", "--api-key-file", str(keys),
                        "--metrics-public", "--no-web", log=tmp_path / "server.log")
    try:
        for key in ("flag-key-cccccccc", "env-key-bbbbbbbb", "file-key-aaaaaaaa"):
            assert client(srv, key).models.list().data[0].id == MODEL_ID
        with pytest.raises(openai.AuthenticationError):
            client(srv, "not-a-key-at-all").models.list()
        assert httpx.get(srv.url + "/metrics", timeout=10).status_code == 200  # --metrics-public
        assert httpx.get(srv.url + "/", timeout=10).status_code == 401  # --no-web: no public page
    finally:
        srv.stop()
    assert "3 API key(s)" in (tmp_path / "server.log").read_text()


def test_serving_beyond_loopback_without_a_key_warns_at_start_up(model, monkeypatch, capsys):
    import uvicorn

    from jmoss.server import serve

    ran = []
    monkeypatch.setattr(uvicorn, "run", lambda app, **kw: ran.append(kw["host"]))  # nothing is bound
    serve(model, host="0.0.0.0", port=0, model_name=MODEL_ID)
    assert "warning: serving on 0.0.0.0 without an API key" in capsys.readouterr().err
    serve(model, host="0.0.0.0", port=0, model_name=MODEL_ID, api_keys=KEYS)
    serve(model, host="127.0.0.1", port=0, model_name=MODEL_ID)
    assert capsys.readouterr().err == "" and ran == ["0.0.0.0", "0.0.0.0", "127.0.0.1"]
