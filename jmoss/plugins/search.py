"""Web-search plugin: ``Search("query")`` answered by a backend, in MOSS's result format.

MOSS was trained on results like ``<|1|>: 'snippet text…'`` (moss-spec §4.6): each item is the
Python repr of a snippet (inner newlines as "\\n"), cut at 400 characters counting the opening
quote with no closing quote, or a knowledge card ``Title: 'value'``. The items are numbered across
the whole turn by ``render_results``; this module produces the item strings.

Backends:

- ``LocalFolderBackend`` (the default, offline): BM25 (the ``bm25s`` library) over the paragraphs of
  the ``.txt``/``.md`` files in a folder the user points to.
- ``HTTPBackend``: a user-configured endpoint with this JSON contract:

      POST {url}   {"query": "<text>", "k": <int>}
      200          {"results": [{"text": "<snippet>", "title": "<optional card title>",
                                  "url": "<optional source>"}, ...]}

  A result with a ``title`` is shown as a knowledge card ``title: 'text'``.
"""

from __future__ import annotations

import json
import re
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Protocol, Sequence

from jmoss.errors import PluginError
from jmoss.plugins.base import ITEMS, Plugin

DEFAULT_K = 3
MAX_ITEM_CHARS = 400  # MOSS's snippets stop at 300 or 400 characters; 400 keeps more context
MAX_RESPONSE_BYTES = 2 * 1024 * 1024


@dataclass(frozen=True)
class SearchHit:
    """One search result. ``title`` makes it a knowledge card; ``source`` is for the user, not the model."""

    text: str
    title: str | None = None
    source: str | None = None


class SearchBackend(Protocol):
    """Anything that answers a query with up to ``k`` hits, best first."""

    def search(self, query: str, k: int) -> list[SearchHit]: ...


def format_item(hit: SearchHit, max_chars: int = MAX_ITEM_CHARS) -> str:
    """A hit as MOSS saw it: ``'snippet'`` (repr, cut at ``max_chars``) or ``Title: 'value'``."""
    if hit.title is not None:
        return f"{hit.title}: {hit.text!r}"
    quoted = repr(hit.text)
    return quoted if len(quoted) <= max_chars else quoted[:max_chars]


# --- local BM25 --------------------------------------------------------------------------------

_WORD = re.compile(r"[0-9a-z]+(?:['’][a-z]+)?|[\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\uac00-\ud7af]+")
_CJK_START = "\u3040"


def tokenize(text: str) -> list[str]:
    """Lower-cased words for Latin scripts; characters and character bigrams for CJK runs.

    Chinese has no spaces, so a whitespace tokenizer would make a whole sentence one token;
    unigrams + bigrams is the standard cheap substitute for a word segmenter.
    """
    tokens: list[str] = []
    for m in _WORD.finditer(text.lower()):
        w = m.group(0)
        if w[0] >= _CJK_START:
            tokens.extend(w)
            tokens.extend(w[i : i + 2] for i in range(len(w) - 1))
        else:
            tokens.append(w)
    return tokens


def split_passages(text: str, max_chars: int = 1200) -> list[str]:
    """Paragraphs (blank-line separated), with long ones cut into ``max_chars`` pieces."""
    out = []
    for para in re.split(r"\n\s*\n", text):
        para = para.strip()
        while len(para) > max_chars:
            out.append(para[:max_chars])
            para = para[max_chars:]
        if para:
            out.append(para)
    return out


class LocalFolderBackend:
    """BM25 over the paragraphs of the text files under ``folder`` (indexed once, at construction)."""

    def __init__(self, folder: str | Path, extensions: Iterable[str] = (".txt", ".md"), max_files: int = 10_000):
        import bm25s  # optional dependency: pip install "jmoss[search]"

        self.folder = Path(folder).expanduser()
        if not self.folder.is_dir():
            raise PluginError(f"search folder {str(self.folder)!r} is not a directory")
        exts = {e.lower() for e in extensions}
        files = sorted(p for p in self.folder.rglob("*") if p.is_file() and p.suffix.lower() in exts)[:max_files]
        self.passages: list[tuple[str, str]] = []  # (text, source path)
        for path in files:
            try:
                text = path.read_text(encoding="utf-8", errors="replace")
            except OSError as exc:
                raise PluginError(f"cannot read search document {str(path)!r}: {exc}") from exc
            self.passages.extend((p, str(path)) for p in split_passages(text))
        if not self.passages:
            raise PluginError(f"no {'/'.join(sorted(exts))} documents with text under {str(self.folder)!r}")
        self._bm25 = bm25s.BM25()
        self._bm25.index([tokenize(t) for t, _ in self.passages], show_progress=False)

    def search(self, query: str, k: int) -> list[SearchHit]:
        """Up to ``k`` passages that share at least one term with the query, best first."""
        tokens = tokenize(query)
        if not tokens or k <= 0:
            return []
        k = min(k, len(self.passages))
        result = self._bm25.retrieve([tokens], k=k, show_progress=False)
        hits = []
        for idx, score in zip(result.documents[0], result.scores[0]):
            if score > 0:
                text, source = self.passages[int(idx)]
                hits.append(SearchHit(text=text, source=source))
        return hits


# --- HTTP ----------------------------------------------------------------------------------------


class HTTPBackend:
    """A search service the user runs or trusts; see the module docstring for the JSON contract."""

    def __init__(self, url: str, timeout: float = 10.0, headers: dict[str, str] | None = None):
        if not url.startswith(("http://", "https://")):
            raise PluginError(f"search url must start with http:// or https://, got {url!r}")
        self.url = url
        self.timeout = timeout
        self.headers = {"Content-Type": "application/json", **(headers or {})}

    def search(self, query: str, k: int) -> list[SearchHit]:
        """POST the query; raises ``PluginError`` for network errors or a reply off the contract."""
        body = json.dumps({"query": query, "k": k}).encode()
        request = urllib.request.Request(self.url, data=body, headers=self.headers, method="POST")
        try:
            with urllib.request.urlopen(request, timeout=self.timeout) as response:
                raw = response.read(MAX_RESPONSE_BYTES + 1)
        except (urllib.error.URLError, OSError, ValueError) as exc:
            raise PluginError(f"search endpoint {self.url} failed: {exc}") from exc
        if len(raw) > MAX_RESPONSE_BYTES:
            raise PluginError(f"search endpoint {self.url} sent more than {MAX_RESPONSE_BYTES} bytes")
        try:
            items = json.loads(raw)["results"]
            hits = [
                SearchHit(text=str(it["text"]), title=it.get("title"), source=it.get("url"))
                for it in items[:k]
            ]
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise PluginError(f"search endpoint {self.url} reply is not {{'results': [{{'text': …}}]}}: {exc}") from exc
        return hits


class SearchPlugin(Plugin):
    """``Search(query)``. Configure with ``folder=`` (local BM25), ``url=`` (HTTP) or ``backend=``."""

    name = "Search"
    capability = "Web search"
    signature = "Search(query)"
    style = ITEMS

    def __init__(
        self,
        backend: SearchBackend | None = None,
        folder: str | Path | None = None,
        url: str | None = None,
        k: int = DEFAULT_K,
        max_chars: int = MAX_ITEM_CHARS,
        timeout: float = 15.0,
    ):
        if backend is None and folder is not None:
            backend = LocalFolderBackend(folder)
        elif backend is None and url is not None:
            backend = HTTPBackend(url, timeout=timeout)
        self.backend = backend
        self.k = k
        self.max_chars = max_chars
        self.timeout = timeout

    def available(self) -> bool:
        """Only with a backend: there is nothing to search otherwise."""
        return self.backend is not None

    def run(self, args: Sequence[str]) -> list[str]:
        """Formatted items for the query (the first argument); no hits gives an empty list."""
        if self.backend is None:
            raise PluginError("Search has no backend: pass folder=, url= or backend=")
        if not args or not args[0].strip():
            return []
        return [format_item(h, self.max_chars) for h in self.backend.search(args[0], self.k)]
