"""Search: BM25 over a local folder and an HTTP endpoint, answered in MOSS's result format."""

from __future__ import annotations

import ast
import json
import re
import threading
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path

import pytest

from conftest import SHARED

from jmoss.errors import PluginError
from jmoss.plugins import load_plugins, parse_commands, render_results, run_calls
from jmoss.plugins.search import HTTPBackend, LocalFolderBackend, SearchHit, SearchPlugin, format_item, tokenize

REFERENCE = SHARED / "reference"
CONVERSATIONS = [json.loads(line) for line in (REFERENCE / "moss_plugin_conversations.jsonl").open(encoding="utf-8")]

DOCS = {
    "jupiter.txt": "Jupiter is the largest planet in the Solar System.\nIt is a gas giant with a Great Red Spot.",
    "python.md": "# Python\n\nPython is a programming language created by Guido van Rossum.\n\n"
                 "It was first released in 1991.",
    "glory.txt": "《黑暗荣耀》是一部韩国电视剧，由宋慧乔主演，讲述了复仇的故事。",
    "tea.txt": "Green tea is made from Camellia sinensis leaves that have not been oxidised.",
    "notes.csv": "Jupiter,ignored because csv is not indexed",
}


@pytest.fixture()
def corpus(tmp_path: Path) -> Path:
    for name, text in DOCS.items():
        (tmp_path / name).write_text(text, encoding="utf-8")
    return tmp_path


def test_query_returns_the_expected_document_in_moss_format(corpus):
    (plugin,) = load_plugins(["Search"], search={"folder": corpus, "k": 1})
    results = run_calls(parse_commands('Search("largest planet solar system")'), [plugin])
    assert render_results(results) == (
        '<|Results|>:\nSearch("largest planet solar system") =>\n'
        "<|1|>: 'Jupiter is the largest planet in the Solar System.\\nIt is a gas giant with a Great Red Spot.'\n"
        "<eor>\n"
    )


def test_chinese_query_and_numbering_across_two_searches(corpus):
    plugin = SearchPlugin(folder=corpus, k=1)
    calls = parse_commands('Search("黑暗荣耀 主演"), Search("who created Python")')
    text = render_results(run_calls(calls, [plugin]))
    assert text == (
        '<|Results|>:\nSearch("黑暗荣耀 主演") =>\n'
        "<|1|>: '《黑暗荣耀》是一部韩国电视剧，由宋慧乔主演，讲述了复仇的故事。'\n"
        'Search("who created Python") =>\n'
        "<|2|>: 'Python is a programming language created by Guido van Rossum.'\n<eor>\n"
    )


def test_only_matching_passages_are_returned(corpus):
    backend = LocalFolderBackend(corpus)
    assert backend.search("zebra quantum", 3) == []
    hits = backend.search("Jupiter", 3)
    assert [Path(h.source).name for h in hits] == ["jupiter.txt"]  # the .csv is not indexed


def test_no_hits_render_no_result(corpus):
    results = run_calls(parse_commands('Search("zebra quantum")'), [SearchPlugin(folder=corpus)])
    assert render_results(results) == '<|Results|>:\nSearch("zebra quantum") =>\nNo result.\n<eor>\n'


def test_tokenize_splits_cjk_into_characters_and_bigrams():
    assert tokenize("Hello 黑暗荣耀!") == ["hello", "黑", "暗", "荣", "耀", "黑暗", "暗荣", "荣耀"]


def test_items_are_python_repr_cut_without_closing_quote_and_cards_keep_their_title():
    assert format_item(SearchHit("it's\nfine")) == '"it\'s\\nfine"'
    long = format_item(SearchHit("a" * 1000))
    assert len(long) == 400 and long.startswith("'a") and not long.endswith("'")
    assert format_item(SearchHit("67.57 million (2020)", title="France / Population (2020)")) == (
        "France / Population (2020): '67.57 million (2020)'"
    )


def test_format_item_matches_every_complete_snippet_in_the_fixture():
    checked = 0
    for record in CONVERSATIONS:
        for turn in record["chat"].values():
            for item in re.findall(r"^<\|\d+\|>: (.*)$", turn["Tool Responses"], re.M):
                if item[:1] in "'\"" and len(item) > 1 and item[-1] == item[0]:
                    snippet = ast.literal_eval(item)  # literal parsing of the fixture, no code runs
                    assert format_item(SearchHit(snippet)) == item
                    checked += 1
    assert checked > 300


def test_missing_or_empty_folder_is_a_plugin_error(tmp_path):
    with pytest.raises(PluginError, match="not a directory"):
        LocalFolderBackend(tmp_path / "missing")
    with pytest.raises(PluginError, match="no .md/.txt documents"):
        LocalFolderBackend(tmp_path)


class _Handler(BaseHTTPRequestHandler):
    def do_POST(self):  # noqa: N802 - http.server's naming
        request = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        if request["query"] == "broken":
            body = b"not json"
        else:
            body = json.dumps({"results": [
                {"text": f"about {request['query']}", "url": "http://example/1"},
                {"text": "26.32 million (2019)", "title": "Shanghai / Population"},
                {"text": "third"},
            ][: request["k"]]}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


@pytest.fixture()
def endpoint():
    server = HTTPServer(("127.0.0.1", 0), _Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_port}/search"
    server.shutdown()


def test_http_backend_follows_the_json_contract(endpoint):
    (plugin,) = load_plugins(["Search"], search={"url": endpoint, "k": 2})
    results = run_calls(parse_commands('Search("上海人口")'), [plugin])
    assert render_results(results) == (
        '<|Results|>:\nSearch("上海人口") =>\n<|1|>: \'about 上海人口\'\n'
        "<|2|>: Shanghai / Population: '26.32 million (2019)'\n<eor>\n"
    )


def test_http_failures_become_no_result(endpoint):
    plugin = SearchPlugin(url=endpoint)
    (bad,) = run_calls(parse_commands('Search("broken")'), [plugin])
    assert not bad.ok and "reply is not" in bad.error
    down = SearchPlugin(backend=HTTPBackend("http://127.0.0.1:9/none", timeout=1.0))
    (failed,) = run_calls(parse_commands('Search("q")'), [down])
    assert not failed.ok
    assert render_results([failed]) == '<|Results|>:\nSearch("q") =>\nNo result.\n<eor>\n'
    with pytest.raises(PluginError):
        HTTPBackend("file:///etc/passwd")
