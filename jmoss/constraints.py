"""Constrained output: text that must match a JSON schema (or a grammar), enforced at every sampled token.

    constraint = json_schema(model.tokenizer, {"type": "object", ...}, eos_token_id=model.config.eos_token_id)
    model.generate(prompt, constraint=constraint)      # each row gets its own mask (jmoss.generation)

The masks come from llguidance (guidance-ai's low-level grammar engine, a Rust extension with no
Python dependencies): given a JSON schema it knows, before every step, which token ids keep the
output a prefix of some valid document, and it refuses a schema feature it cannot enforce by
name ("Unimplemented keys: ["uniqueItems"]"), which becomes the ConstraintError message. It was
chosen over xgrammar by measurement (``benchmarks/bench_constraints.py``, results/constraints-cpu-350m.txt):
on MOSS's 106k-token vocabulary both compute a mask in 0.02-0.04 ms, but xgrammar compiled a nested
schema in 0.70 s against llguidance's 11 ms (every request brings its own schema) and silently
ignored a ``multipleOf``; and xgrammar needs torch, transformers and triton at run time, which jmoss
keeps to its tests. llguidance can also roll a matcher back, which a caller verifying drafted tokens
needs.

The JSON is written compactly in Python's ``json.dumps`` style: ", " between items, ": " after
keys, no other whitespace. One layout keeps outputs bounded (no runs of blank lines from a weak
model) and is the form MOSS saw most in its training text. With ``leading_space`` (a MOSS reply,
which follows ``<|MOSS|>:``) one optional space may come first, as in every trained reply.

When the output completes, the row ends at once (GenerationOptions' stop reason "stop"); an
output cut by max_new_tokens before it completes is returned as it stands (reason "length"),
as OpenAI does: check the finish reason before parsing.
"""

from __future__ import annotations

import json
import threading
import weakref
from typing import TYPE_CHECKING, Any

import numpy as np

from jmoss.errors import ConstraintError, GenerationError

if TYPE_CHECKING:
    from jmoss.tokenizer import Tokenizer

JSON_LAYOUT = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}
MAX_SCHEMA_BYTES = 64 * 1024  # a schema is compiled per request; far larger ones are not response formats

_lock = threading.Lock()
_tokenizers: "weakref.WeakKeyDictionary[Tokenizer, dict[int | None, Any]]" = weakref.WeakKeyDictionary()


def _llguidance():
    try:
        import llguidance
    except ImportError as exc:  # a runtime dependency (setup.py); missing only in a broken install
        raise ConstraintError("constrained output needs the llguidance package: pip install llguidance") from exc
    return llguidance


class _Vocabulary:
    """jmoss's tokenizer as llguidance reads one: each id's bytes, the specials, an encoder."""

    def __init__(self, tokenizer: "Tokenizer", eos_token_id: int | None):
        self._tokenizer = tokenizer
        special = tokenizer.special_ids
        self.tokens: list[bytes] = []
        for i in range(tokenizer.vocab_size):
            try:
                data = tokenizer.decode_bytes([i])
            except Exception:  # an id the vocabulary skips: a token no text can match
                data = b""
            # llguidance's convention for specials: a 0xFF first byte, which no UTF-8 text contains,
            # so "<eom>" in the output can only ever be the special token, never its letters.
            self.tokens.append(b"\xff" + data if i in special else data)
        self.eos_token_id = eos_token_id if eos_token_id is not None else tokenizer.eos_token_id
        self.bos_token_id = None
        self.special_token_ids = sorted(special)

    def __call__(self, text: str | bytes) -> list[int]:
        if isinstance(text, bytes):
            text = text.decode("utf-8", errors="replace")
        return self._tokenizer.encode(text)


def grammar_tokenizer(tokenizer: "Tokenizer", eos_token_id: int | None = None) -> Any:
    """llguidance's view of ``tokenizer`` (built once per tokenizer and eos: ~2 s for MOSS's 106k ids)."""
    llg = _llguidance()
    with _lock:
        per_eos = _tokenizers.setdefault(tokenizer, {})
        found = per_eos.get(eos_token_id)
        if found is None:
            vocab = _Vocabulary(tokenizer, eos_token_id)
            if vocab.eos_token_id is None:
                raise ConstraintError("constrained output needs an end-of-sequence token; this tokenizer has none")
            found = llg.LLTokenizer(llg.TokenizerWrapper(vocab), n_vocab=tokenizer.vocab_size)
            per_eos[eos_token_id] = found
        return found


class GrammarMask:
    """One row's matcher: the TokenMask of jmoss.generation (mask / advance / rollback / done)."""

    def __init__(self, matcher: Any, vocab_size: int):
        self._matcher, self._n = matcher, vocab_size
        self._mask: np.ndarray | None = None

    @property
    def done(self) -> bool:
        """Nothing but the end of the sequence may follow (the document is complete)."""
        return self._matcher.is_stopped()

    def mask(self) -> np.ndarray:
        if self._mask is None:
            bits = np.frombuffer(self._matcher.compute_bitmask(), dtype=np.uint8)
            self._mask = np.unpackbits(bits, bitorder="little")[: self._n].view(bool)
        return self._mask

    def advance(self, token: int) -> None:
        self._mask = None
        if not self._matcher.consume_token(int(token)):
            raise GenerationError(f"token {token} breaks the output constraint: {self._matcher.get_error()}")

    def rollback(self, n: int) -> None:
        self._mask = None
        if n and not self._matcher.rollback(n):
            raise GenerationError(f"cannot roll the output constraint back {n} tokens: {self._matcher.get_error()}")


class Grammar:
    """A compiled constraint (GenerationOptions.constraint): checked once, then one matcher per row."""

    def __init__(self, tokenizer: "Tokenizer", grammar: str, *, eos_token_id: int | None = None, what: str = "grammar"):
        llg = _llguidance()
        self._tokenizer = grammar_tokenizer(tokenizer, eos_token_id)
        self._vocab_size = tokenizer.vocab_size
        failed, messages = llg.LLMatcher.validate_grammar_with_warnings(grammar, self._tokenizer)
        if failed:
            raise ConstraintError(f"this {what} cannot be enforced: {_first_line(messages[0])}")
        self.grammar = grammar

    def start(self) -> GrammarMask:
        llg = _llguidance()
        matcher = llg.LLMatcher(self._tokenizer, self.grammar, log_level=0)
        if matcher.is_error():
            raise ConstraintError(f"the output constraint failed to start: {_first_line(matcher.get_error())}")
        return GrammarMask(matcher, self._vocab_size)


def _first_line(message: str) -> str:
    # llguidance appends its parser state and the grammar after the first line
    return message.strip().split("\n<state>", 1)[0].strip()


def json_schema(tokenizer: "Tokenizer", schema: dict | None = None, *, eos_token_id: int | None = None,
                leading_space: bool = False) -> Grammar:
    """Output that is one JSON document valid under ``schema`` (None: any JSON object).

    Raises ConstraintError naming what cannot be enforced (e.g. ``uniqueItems``) or what is malformed.
    """
    if schema is None:
        schema = {"type": "object"}
    if not isinstance(schema, dict):
        raise ConstraintError(f"a JSON schema must be a JSON object, got {type(schema).__name__}")
    # the layout is jmoss's; a schema's own x-guidance (e.g. "lenient", which skips what it cannot
    # enforce) is replaced, so a schema is either enforced whole or refused
    body = {k: v for k, v in schema.items() if k != "x-guidance"}
    text = json.dumps({**body, "x-guidance": JSON_LAYOUT}, ensure_ascii=False)
    if len(text.encode("utf-8")) > MAX_SCHEMA_BYTES:
        raise ConstraintError(f"the JSON schema is larger than {MAX_SCHEMA_BYTES} bytes")
    start = 'start: " "? document\n' if leading_space else "start: document\n"
    grammar = _llguidance().LLMatcher.grammar_from_lark(start + "document: %json " + text)
    return Grammar(tokenizer, grammar, eos_token_id=eos_token_id, what="JSON schema")


def lark(tokenizer: "Tokenizer", grammar: str, *, eos_token_id: int | None = None) -> Grammar:
    """Output matching a Lark grammar in llguidance's dialect (``<[id]>`` is the token with that id)."""
    return Grammar(tokenizer, _llguidance().LLMatcher.grammar_from_lark(grammar), eos_token_id=eos_token_id)
