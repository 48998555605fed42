"""The chat page at ``GET /``, driven in a real headless Chromium (Debian's, through playwright).

Most tests serve a scripted model in-process (uvicorn in a thread, loopback, a free port): the
real tokenizer, server, worker, SSE stream and plugin loop, but next-token logits that spell out
a reply the test chose, one token per decode step with a short sleep, so streaming, Stop and
untrusted-HTML rendering are observable and deterministic. One test runs the real
``jmoss serve`` on a tiny random MOSS to check the page from the CLI and ``--no-web``.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import threading
import time
from pathlib import Path
from typing import Iterator

import httpx
import numpy as np
import pytest

from jmoss import dialogue
from jmoss.config import MossConfig
from jmoss.server import create_app
from jmoss.tokenizer import load_tokenizer
from moss_fixtures import MOSS_EOM, moss_tokenizer_dir
from test_server import MODEL_ID, ServerProcess, build_store, free_port

APT_HINT = "apt-get update && apt-get install -y chromium (Debian's browser; playwright drives it, nothing is downloaded)"
PLUGIN_TURN = "What is 2+3*4?"


# -- a model whose replies the test writes ---------------------------------------------------------


class ScriptedSession:
    """Session-shaped: keeps the fed ids; each prefill picks the script for the latest Human turn."""

    def __init__(self, model: "ScriptedModel"):
        self.model, self.max_len = model, model.config.n_positions
        self.ids: list[int] = []
        self.queue: list[int] = []

    @property
    def length(self) -> int:
        return len(self.ids)

    @property
    def room(self) -> int:
        return self.max_len - len(self.ids)

    def reset(self) -> None:
        self.ids = []

    def truncate(self, length: int) -> None:
        del self.ids[length:]

    def prefill(self, rows, last_only: bool = True) -> np.ndarray:
        self.ids += [int(t) for t in rows[0]]
        self.queue = self.model.tokenizer.encode(self.model.reply_for(self.ids))
        return self._next()

    def decode(self, tokens) -> np.ndarray:
        time.sleep(self.model.delay)  # so that the page sees the reply arrive in steps
        self.ids.append(int(tokens[0]))
        return self._next()

    def _next(self) -> np.ndarray:
        logits = np.zeros((1, self.model.config.vocab_size), dtype=np.float32)
        logits[0, self.queue.pop(0) if self.queue else MOSS_EOM] = 1e4
        return logits


class ScriptedModel:
    """Model-shaped: MOSS's real tokenizer; replies looked up by the last user message.

    ``replies[message]`` is what MOSS writes after ``<|MOSS|>:`` — or, for a plugin turn, a pair:
    pass 1 (Inner Thoughts and Commands up to ``<eoc>``) and pass 2 (after the Results).
    An unknown message is echoed.
    """

    def __init__(self, tokenizer, replies: dict[str, str | tuple[str, str]], delay: float = 0.02):
        self.tokenizer, self.replies, self.delay = tokenizer, replies, delay
        self.config = MossConfig(vocab_size=107008, n_positions=2048, n_embd=64, n_layer=1, n_head=4, rotary_dim=8)

    def session(self, batch: int = 1, max_len: int | None = None) -> ScriptedSession:
        return ScriptedSession(self)

    def reply_for(self, ids: list[int]) -> str:
        turn = self.tokenizer.decode(ids, skip_special_tokens=False).rsplit("<|Human|>:", 1)[-1]
        message = turn.split("<eoh>", 1)[0].strip()
        reply = self.replies.get(message, f" You said: {message}")
        if isinstance(reply, tuple):
            return reply[1] if "<|Results|>" in turn else reply[0]
        return reply


def long_reply(words: int) -> str:
    return " " + " ".join(f"word{i}" for i in range(words))


REPLIES: dict[str, str | tuple[str, str]] = {
    "stream please": " Streaming **works**: one token at a time, then `code` and *emphasis*.",
    "ping": " pong",
    "keep talking": long_reply(200),
    "show html": (' <script>window.__pwned = 1</script> and <img src=x onerror="window.__pwned = 2">\n\n'
                  "[a bad link](javascript:window.__pwned=3) and [a good one](https://example.org/docs)\n\n"
                  "```html\n<b onclick=\"window.__pwned = 4\">bold?</b>\n```"),
    "Write hello world in Python": (" Here is a **Python** version:\n\n```python\ndef hello():\n"
                                    "    print(\"Hello, world!\")\n```\n\nCall `hello()` to run it."),
    "And the steps?": " 1. Save it as `hello.py`\n2. Run `python hello.py`\n3. Read *Hello, world!*",
    PLUGIN_TURN: ('<|Inner Thoughts|>: I should use the calculator for 2+3*4<eot>\n'
                  '<|Commands|>: Calculate("2+3*4")<eoc>', " 2+3*4 = **14**, since multiplication comes first.<eom>"),
    "Now some code": ("<|Inner Thoughts|>: No tool is needed<eot>\n<|Commands|>: None<eoc>",
                      " ```python\nprint(2 + 3 * 4)  # 14\n```<eom>"),
}


class AppServer:
    """A jmoss app under uvicorn in a thread on 127.0.0.1; stopped by the fixture."""

    def __init__(self, app):
        import uvicorn

        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning",
                                                    timeout_graceful_shutdown=5))
        self.thread = threading.Thread(target=self.server.run, name="jmoss-test-uvicorn", daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError("the test server did not start")
            time.sleep(0.05)

    def health(self) -> dict:
        return httpx.get(self.url + "/health", timeout=10).json()

    def wait_idle(self, timeout: float = 15) -> dict:
        deadline = time.monotonic() + timeout
        while (health := self.health())["pending"]:
            assert time.monotonic() < deadline, f"the worker stayed busy: {health}"
            time.sleep(0.05)
        return health

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=20)
        assert not self.thread.is_alive(), "uvicorn did not stop"


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory, shared_dir):
    return load_tokenizer(moss_tokenizer_dir(shared_dir, tmp_path_factory.mktemp("tok")))


@pytest.fixture(scope="module")
def app_server(tokenizer) -> Iterator[AppServer]:
    # queue_size 0: one request at a time, so a second one meets a full queue at once
    srv = AppServer(create_app(ScriptedModel(tokenizer, REPLIES), model_name=MODEL_ID, queue_size=0,
                               max_prompt_tokens=1200, max_tokens_limit=400))
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def plugin_server(tokenizer) -> Iterator[AppServer]:
    srv = AppServer(create_app(ScriptedModel(tokenizer, REPLIES), model_name=MODEL_ID, plugins=["calculator"]))
    yield srv
    srv.stop()


# -- the browser -----------------------------------------------------------------------------------


def chromium_executable() -> str:
    path = os.environ.get("JMOSS_CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")
    if path is None:
        pytest.fail(f"no Chromium found for the browser tests: {APT_HINT}; or set JMOSS_CHROMIUM")
    return path


@pytest.fixture(scope="module")
def browser():
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.fail("playwright is missing: pip install -e '.[test]'")
    executable = chromium_executable()
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=executable, args=["--no-sandbox", "--disable-dev-shm-usage"],
                              timeout=60_000)
        yield b
        b.close()


class ChatPage:
    """The page in one browser tab, with the requests it sent to the chat endpoint."""

    def __init__(self, browser, server: AppServer):
        self.server = server
        self.context = browser.new_context(viewport={"width": 1280, "height": 860})
        self.page = self.context.new_page()
        self.page.set_default_timeout(20_000)
        self.requests: list[dict] = []
        self.console_errors: list[str] = []
        self.page.on("request", self._record)
        self.page.on("pageerror", lambda exc: self.console_errors.append(str(exc)))
        self.page.goto(server.url + "/")
        self.page.wait_for_selector("body[data-state=idle]")

    def _record(self, request) -> None:
        if request.url.endswith("/v1/chat/completions"):
            self.requests.append(json.loads(request.post_data))

    def send(self, text: str, *, wait: bool = True, timeout: float = 20) -> None:
        self.page.fill("#input", text)
        self.page.press("#input", "Enter")
        if wait:
            self.wait_idle(timeout)

    def wait_idle(self, timeout: float = 20) -> None:
        self.page.wait_for_selector("body[data-state=idle]", timeout=timeout * 1000)

    def messages(self) -> list[tuple[str, str]]:
        """(kind, shown text) of each message: kind is user, assistant or error."""
        return [tuple(m) for m in self.page.eval_on_selector_all(
            "#messages .msg", "ms => ms.map(m => [m.className.replace('msg ', '').split(' ')[0], "
                              "m.querySelector('.content').textContent])")]

    def close(self) -> None:
        self.context.close()


@pytest.fixture
def chat(browser, app_server) -> Iterator[ChatPage]:
    app_server.wait_idle()
    page = ChatPage(browser, app_server)
    yield page
    page.close()
    assert not page.console_errors, page.console_errors


def screenshot_path(name: str) -> Path:
    folder = Path(os.environ["JMOSS_HOME"]) / "screenshots"
    folder.mkdir(parents=True, exist_ok=True)
    return folder / name


# -- the page itself, without a browser ------------------------------------------------------------


def test_page_is_one_self_contained_document_with_a_strict_policy(app_server):
    r = httpx.get(app_server.url + "/", timeout=10)
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
    html = r.text
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:)?//""", html), "the page must not load anything remote"
    assert "<link" not in html and "/*JMOSS_" not in html
    csp = r.headers["content-security-policy"]
    assert "default-src 'none'" in csp and "connect-src 'self'" in csp and "'unsafe-inline'" not in csp
    config = json.loads(re.search(r'<script type="application/json" id="jmoss-config">(.*?)</script>', html, re.S)[1])
    assert config["meta"] == dialogue.base_meta_instruction() and config["model"] == MODEL_ID
    # MOSS's uid API keeps POST /
    assert httpx.post(app_server.url + "/", json={}, timeout=10).json()["error"]["code"] == "missing_parameter"


def test_web_false_leaves_get_root_unserved(tokenizer):
    from fastapi.testclient import TestClient

    with TestClient(create_app(ScriptedModel(tokenizer, {}), web=False)) as client:
        r = client.get("/")
        assert r.status_code == 405 and r.json()["error"]["code"] == "method_not_allowed"
        assert client.get("/health").status_code == 200


# -- in the browser --------------------------------------------------------------------------------


def test_reply_streams_in_steps_and_renders_markdown(chat):
    page = chat.page
    page.fill("#input", "line one")
    page.press("#input", "Shift+Enter")
    page.type("#input", "line two")
    assert page.input_value("#input") == "line one\nline two" and chat.messages() == []  # Shift+Enter: newline
    page.fill("#input", "")
    page.evaluate("""() => {
        window.__steps = [];
        new MutationObserver(() => {
            const all = document.querySelectorAll('#messages .msg.assistant .content');
            const text = all.length ? all[all.length - 1].textContent : '';
            if (text && window.__steps[window.__steps.length - 1] !== text) window.__steps.push(text);
        }).observe(document.getElementById('messages'), {subtree: true, childList: true, characterData: true});
    }""")
    chat.send("stream please")
    steps = page.evaluate("window.__steps")
    final = "Streaming works: one token at a time, then code and emphasis."
    assert steps[-1] == final and len(steps) >= 5, steps
    # each step extends the text so far (a Markdown marker shows until its closing one arrives)
    assert all(final.startswith(re.sub(r"[*`]", "", s)) for s in steps), steps
    content = page.locator("#messages .msg.assistant .content")
    assert content.locator("strong").inner_text() == "works" and content.locator("code").inner_text() == "code"
    assert content.locator("em").inner_text() == "emphasis"
    assert chat.messages() == [("user", "stream please"), ("assistant", final)]
    body = chat.requests[-1]
    assert body["stream"] is True and body["model"] == MODEL_ID and "jmoss_events" not in body
    assert body["messages"] == [{"role": "system", "content": dialogue.base_meta_instruction()},
                                {"role": "user", "content": "stream please"}]
    assert (body["temperature"], body["top_p"], body["max_tokens"]) == (0.7, 0.8, 256)


def test_stop_ends_the_stream_and_frees_the_worker(chat, app_server, report):
    page = chat.page
    cancelled = app_server.health()["cancelled"]
    chat.send("keep talking", wait=False)
    page.wait_for_function("() => { const c = document.querySelector('#messages .msg.assistant .content');"
                           " return c && c.textContent.length > 10; }")
    start = time.monotonic()
    page.click("#stop")
    chat.wait_idle()
    stopped_text = chat.messages()[-1][1]
    assert stopped_text.startswith("word0 word1") and len(stopped_text) < len(long_reply(200)) - 100
    assert page.locator("#messages .msg.assistant .note").inner_text() == "stopped"
    while (health := app_server.health())["pending"] or health["cancelled"] == cancelled:
        assert time.monotonic() - start < 5, f"the stopped generation kept the worker: {health}"
        time.sleep(0.02)
    report(f"worker free {1000 * (time.monotonic() - start):.0f} ms after Stop in the browser")
    time.sleep(0.3)
    assert chat.messages()[-1][1] == stopped_text  # nothing arrived after Stop
    chat.send("ping")  # the next request gets the worker (the queue holds none: it would be a 503)
    assert chat.messages()[-1] == ("assistant", "pong")
    assert [m["role"] for m in chat.requests[-1]["messages"]] == ["system", "user", "assistant", "user"]
    assert chat.requests[-1]["messages"][2] == {"role": "assistant", "content": stopped_text}


def test_new_chat_clears_the_history(chat):
    page = chat.page
    chat.send("ping")
    page.fill("#temperature", "0.3")
    chat.send("stream please")
    assert [m["content"] for m in chat.requests[-1]["messages"][1:]] == ["ping", "pong", "stream please"]
    assert chat.requests[-1]["temperature"] == 0.3
    page.click("#new-chat")
    assert chat.messages() == []
    page.fill("#system", "You are a terse assistant.")
    chat.send("ping")
    assert chat.requests[-1]["messages"] == [{"role": "system", "content": "You are a terse assistant."},
                                             {"role": "user", "content": "ping"}]
    assert chat.messages() == [("user", "ping"), ("assistant", "pong")]


def test_model_html_is_shown_as_text(chat):
    page = chat.page
    chat.send("show html")
    content = page.locator("#messages .msg.assistant .content")
    text = content.text_content()
    assert '<script>window.__pwned = 1</script>' in text and '<img src=x onerror="window.__pwned = 2">' in text
    assert "[a bad link](javascript:window.__pwned=3)" in text
    assert page.evaluate("window.__pwned") is None
    assert page.locator("#messages script, #messages img, #messages b, #messages [onclick], "
                        "#messages [onerror]").count() == 0
    links = content.locator("a")
    assert links.count() == 1 and links.get_attribute("href") == "https://example.org/docs"
    assert "noopener" in links.get_attribute("rel").split()
    assert content.locator("pre code").text_content() == '<b onclick="window.__pwned = 4">bold?</b>'
    page.click("#messages pre code")
    assert page.evaluate("window.__pwned") is None


def test_server_errors_appear_in_the_conversation(chat, app_server):
    page = chat.page
    chat.send("word " * 1500)
    kind, text = chat.messages()[-1]
    assert kind == "error" and "400" in text and "allows at most 1200" in text

    # queue full: another client holds the only slot
    body = {"model": MODEL_ID, "messages": [{"role": "user", "content": "keep talking"}], "stream": True,
            "max_tokens": 300}
    started, release = threading.Event(), threading.Event()

    def occupy() -> None:
        with httpx.Client(timeout=60) as c, c.stream("POST", app_server.url + "/v1/chat/completions", json=body) as r:
            for _ in r.iter_lines():
                started.set()
                if release.is_set():
                    break

    holder = threading.Thread(target=occupy)
    holder.start()
    try:
        assert started.wait(20)
        chat.send("ping")
        kind, text = chat.messages()[-1]
        assert kind == "error" and "503" in text and "busy" in text
    finally:
        release.set()
        holder.join(30)
    app_server.wait_idle()
    chat.send("ping")
    assert chat.messages()[-1] == ("assistant", "pong")
    assert chat.requests[-1]["messages"][1:] == [{"role": "user", "content": "ping"}]  # failed turns were not kept


def test_plugin_turns_show_thoughts_commands_and_results(browser, plugin_server, report):
    chat = ChatPage(browser, plugin_server)
    try:
        page = chat.page
        assert page.inner_text("#plugins") == "plugins: Calculator"
        chat.send(PLUGIN_TURN)
        assert chat.requests[-1]["jmoss_events"] is True
        message = page.locator("#messages .msg.assistant").first
        panel = message.locator("details.thoughts")
        assert panel.count() == 1 and panel.get_attribute("open") is None  # collapsed until asked
        assert not message.locator(".event-commands pre").is_visible()
        panel.locator("summary").click()
        assert message.locator(".event-thoughts pre").inner_text() == "I should use the calculator for 2+3*4"
        assert message.locator(".event-commands pre").inner_text() == 'Calculate("2+3*4")'
        assert message.locator(".event-results pre").inner_text() == "Calculate(\"2+3*4\") => '14'"
        assert message.locator(".content").inner_text() == "2+3*4 = 14, since multiplication comes first."
        chat.send("Now some code")
        second = page.locator("#messages .msg.assistant").nth(1)
        second.locator("details.thoughts summary").click()
        assert second.locator(".event-commands pre").inner_text() == "None"
        assert second.locator(".event-results pre").inner_text() == "None"
        assert second.locator(".content pre code").inner_text() == "print(2 + 3 * 4)  # 14"
        shot = screenshot_path("web-chat-two-turns.png")
        page.set_viewport_size({"width": 1280, "height": 1400})  # the whole conversation, panels open
        page.screenshot(path=str(shot), full_page=True)
        assert shot.stat().st_size > 10_000
        report(f"screenshot of a two-turn plugin chat: {shot}")
        assert not chat.console_errors, chat.console_errors
    finally:
        chat.close()


def test_events_are_opt_in_and_leave_the_openai_stream_alone(plugin_server):
    def chunks(**extra) -> list[dict]:
        body = {"model": MODEL_ID, "messages": [{"role": "user", "content": PLUGIN_TURN}], "stream": True, **extra}
        with httpx.stream("POST", plugin_server.url + "/v1/chat/completions", json=body, timeout=60) as r:
            return [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: {")]

    plain, tagged = chunks(), chunks(jmoss_events=True)
    assert not any("jmoss_event" in c for c in plain)
    assert [c["jmoss_event"]["kind"] for c in tagged if "jmoss_event" in c] == ["thoughts", "commands", "results"]
    def text(cs: list[dict]) -> str:
        return "".join(c["choices"][0]["delta"].get("content", "") for c in cs if "jmoss_event" not in c)

    assert text(tagged) == text(plain) == "2+3*4 = **14**, since multiplication comes first."
    assert all(c["choices"][0]["delta"] == {} for c in tagged if "jmoss_event" in c)


# -- the real CLI on a tiny random MOSS ------------------------------------------------------------


def test_jmoss_serve_shows_the_page_and_no_web_turns_it_off(browser, tmp_path, shared_dir):
    store = build_store(tmp_path, shared_dir)
    srv = ServerProcess(store, "--max-tokens", "16", log=tmp_path / "web.log")
    try:
        chat = ChatPage(browser, srv)
        try:
            chat.send("Hello", timeout=300)  # a cold cache compiles jittor's kernels on the first reply
            kinds = [kind for kind, _ in chat.messages()]
            assert kinds == ["user", "assistant"] and not chat.console_errors
            assert chat.requests[-1]["max_tokens"] == 16  # the page's default follows the server's limit
        finally:
            chat.close()
        assert srv.health()["served"] == 1
    finally:
        srv.stop()
    off = ServerProcess(store, "--no-web", log=tmp_path / "noweb.log")
    try:
        r = httpx.get(off.url + "/", timeout=10)
        assert r.status_code == 405 and r.json()["error"]["code"] == "method_not_allowed"
        reply = httpx.post(off.url + "/", json={"prompt": "hi", "max_length": 300}, timeout=60).json()
        assert reply["status"] == 200  # MOSS's uid API is unchanged
    finally:
        off.stop()


# -- API keys: the page asks once and keeps the key in the tab ----------------------------------------


def test_with_api_keys_the_page_asks_for_the_key_once_per_tab(browser, tokenizer):
    key = "page-key-0123456789"
    srv = AppServer(create_app(ScriptedModel(tokenizer, REPLIES), model_name=MODEL_ID, api_keys=[key]))
    try:
        chat = ChatPage(browser, srv)
        page, sent = chat.page, []
        page.on("request", lambda r: sent.append(r.headers.get("authorization"))
                if r.url.endswith("/v1/chat/completions") else None)
        assert page.is_visible("#key-form")  # asked at once: the config says keys are needed
        page.fill("#api-key", key)
        page.press("#api-key", "Enter")
        assert page.is_hidden("#key-form")
        assert page.evaluate("sessionStorage.getItem('jmoss-api-key')") == key
        chat.send("ping")
        assert chat.messages()[-1] == ("assistant", "pong") and sent == [f"Bearer {key}"]
        page.reload()  # the same tab keeps it: not asked again
        page.wait_for_selector("body[data-state=idle]")
        assert page.is_hidden("#key-form")
        chat.send("ping")
        assert chat.messages()[-1] == ("assistant", "pong")
        # a wrong key: the 401 shows, the key is forgotten and asked for again
        page.evaluate("sessionStorage.setItem('jmoss-api-key', 'wrong-key-000000')")
        chat.send("ping")
        kind, text = chat.messages()[-1]
        assert kind == "error" and "401" in text and "API key" in text
        assert page.is_visible("#key-form") and page.evaluate("sessionStorage.getItem('jmoss-api-key')") is None
        assert not chat.console_errors, chat.console_errors
        chat.close()
        other = ChatPage(browser, srv)  # another tab (context) starts without the key
        assert other.page.is_visible("#key-form")
        other.close()
    finally:
        srv.stop()
