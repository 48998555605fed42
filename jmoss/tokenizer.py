"""Tokenizer: MOSS's and CodeGen's GPT-2 byte-level BPE, run by the `tokenizers` library.

A folder is read in one of two ways (moss-spec §3):

- It has a ``tokenizer.json`` (CodeGen's Hugging Face repos): that file is loaded as is. It is the
  fast tokenizer that transformers itself builds for CodeGen today, so ids agree with it by
  construction, including its added whitespace tokens, which strip nothing.
- It has no ``tokenizer.json`` (MOSS: no fast tokenizer exists): ``vocab.json`` + ``merges.txt``
  make a ``models.BPE`` behind the GPT-2 ``ByteLevel`` pre-tokenizer. The added tokens are split off
  the way MOSS's slow ``MossTokenizer`` splits them under transformers 4.25.1, the version MOSS
  pins: every entry of ``added_tokens.json`` and every special token is split off before BPE,
  longest match first. A split-off token that is not an ``AddedToken`` special then strips the
  whitespace off the neighbouring piece on each side ("x = 1\\n    return x" loses the "\\n"). The
  ``tokenizers`` AddedToken lstrip/rstrip flags cannot express this: they also swallow a following
  added token ("a   \\n  b" must stay [a, 3 spaces, 2 spaces, b]). So that one step, a regex split and
  two ``str.strip`` calls, is done in Python here. BPE itself always runs in ``tokenizers``.
  Which specials keep their neighbours is read from the files as 4.25.1 reads them: a special token
  given as a plain string in ``special_tokens_map.json`` replaces the ``AddedToken`` from
  ``tokenizer_config.json`` and strips like a plain added token. For MOSS's files that is
  ``<|endoftext|>`` (bos and unk are plain strings there): "a <|endoftext|> b" encodes as
  [a, <|endoftext|>, b], as it does under 4.25.1, while the five markers keep their neighbours.

Decoding is the exact byte-level inverse of the tokens: the bytes of every token are concatenated
and decoded as UTF-8, with ``errors="replace"`` only for invalid or incomplete sequences. MOSS's
reference ``decode`` instead joins the text around each added token with a single space
("hi <eoh> \\n", "x = 1      return x") because of ``spaces_between_special_tokens`` in transformers
4.25.1. That is a display quirk of the library, not what the model saw, and text fed back into a
prompt must not grow spaces, so it is deliberately not reproduced. Whitespace the encoder stripped
cannot come back: decode(encode(text)) equals text exactly when no stripping token has whitespace
next to it.
"""

from __future__ import annotations

import codecs
import json
import re
from pathlib import Path
from typing import Any, Iterable, Sequence

from jmoss.errors import TokenizerError

VOCAB_FILE = "vocab.json"
MERGES_FILE = "merges.txt"
ADDED_TOKENS_FILE = "added_tokens.json"
SPECIAL_TOKENS_MAP_FILE = "special_tokens_map.json"
TOKENIZER_CONFIG_FILE = "tokenizer_config.json"
TOKENIZER_JSON_FILE = "tokenizer.json"

# The special-token attributes of a transformers tokenizer, in the order 4.25.1 lists them.
_SPECIAL_KEYS = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")
_ADDITIONAL_KEY = "additional_special_tokens"
# MossTokenizer.__init__ (like GPT2Tokenizer's) wraps these in AddedToken(lstrip=False, rstrip=False)
# when tokenizer_config.json gives them as plain strings.
_WRAPPED_BY_INIT = ("bos_token", "eos_token", "unk_token", "pad_token")


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character table (moss-spec §3.1 step 3)."""
    bs = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {b: chr(c) for b, c in zip(bs, cs)}


_BYTE_DECODER = {c: b for b, c in _bytes_to_unicode().items()}


class _Special:
    """A special token as transformers 4.25.1 holds it: an AddedToken (with strip flags) or a plain str."""

    __slots__ = ("content", "is_added_token", "lstrip", "rstrip")

    def __init__(self, content: str, is_added_token: bool, lstrip: bool = False, rstrip: bool = False) -> None:
        self.content = content
        self.is_added_token = is_added_token
        self.lstrip = lstrip
        self.rstrip = rstrip


def _read_json(path: Path) -> Any:
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, ValueError) as e:
        raise TokenizerError(f"cannot read tokenizer file {path}: {e}") from e


def _as_special(value: Any, key: str, from_init: bool) -> _Special | None:
    """One special-token entry of tokenizer_config.json / special_tokens_map.json."""
    if value is None:
        return None
    if isinstance(value, dict):
        if "content" not in value:
            raise TokenizerError(f"special token {key} has no 'content': {value!r}")
        return _Special(str(value["content"]), True, bool(value.get("lstrip", False)), bool(value.get("rstrip", False)))
    if isinstance(value, str):
        return _Special(value, from_init and key in _WRAPPED_BY_INIT)
    raise TokenizerError(f"special token {key} must be a string or an object, got {value!r}")


def _resolve_specials(config: dict, special_map: dict) -> dict[str, list[_Special]]:
    """The special tokens a 4.25.1 slow tokenizer ends up with after from_pretrained.

    tokenizer_config.json feeds __init__; special_tokens_map.json is then applied with setattr, so
    its entries win, and a plain string there stays a plain string (no AddedToken, no strip flags).
    """
    resolved: dict[str, list[_Special]] = {}
    for source, from_init in ((config, True), (special_map, False)):
        for key in (*_SPECIAL_KEYS, _ADDITIONAL_KEY):
            if key not in source or source[key] is None:
                continue
            values = source[key] if key == _ADDITIONAL_KEY else [source[key]]
            if not isinstance(values, list):
                raise TokenizerError(f"{_ADDITIONAL_KEY} must be a list, got {values!r}")
            specials = [s for s in (_as_special(v, key, from_init) for v in values) if s is not None]
            resolved[key] = specials
    return resolved


def clean_text(text: str | bytes) -> tuple[str, int]:
    """``text`` as valid Unicode, and how many characters were replaced by U+FFFD.

    Bytes are decoded as UTF-8 with invalid sequences replaced; in a str, surrogate pairs are
    joined and lone surrogates (from JSON escapes, ``surrogateescape``-decoded stdin) replaced.
    Valid text costs one UTF-8 encode in C and is returned as is.
    """
    if isinstance(text, (bytes, bytearray, memoryview)):
        raw = bytes(text)
        fixed = raw.decode("utf-8", "replace")
        return fixed, fixed.count("\ufffd") - raw.count("\ufffd".encode())
    try:
        text.encode("utf-8")
        return text, 0
    except UnicodeEncodeError:
        fixed = text.encode("utf-16-le", "surrogatepass").decode("utf-16-le", "replace")
        return fixed, fixed.count("\ufffd") - text.count("\ufffd")


class Tokenizer:
    """GPT-2 byte-level BPE plus added tokens; encode/decode/stream-decode MOSS and CodeGen ids.

    Build one with :func:`load_tokenizer`.
    """

    def __init__(
        self,
        backend: Any,
        added_tokens: dict[str, int],
        specials: dict[str, list[_Special]],
        reference_split: bool,
        source: Path,
    ) -> None:
        self._tok = backend
        self._added = dict(added_tokens)
        self._source = source
        self._reference_split = reference_split
        self._id_to_added = {i: t for t, i in self._added.items()}
        self._bytes_cache: dict[int, bytes] = {}

        def id_of(key: str) -> int | None:
            found = specials.get(key)
            return self.token_to_id(found[0].content) if found else None

        self._bos_id = id_of("bos_token")
        self._eos_id = id_of("eos_token")
        special_contents = {s.content for found in specials.values() for s in found}
        unknown = sorted(t for t in special_contents if self.token_to_id(t) is None)
        if unknown:
            raise TokenizerError(f"special tokens {unknown} of {source} are neither in the vocabulary nor added tokens")
        self._special_ids = frozenset(self.token_to_id(t) for t in special_contents)
        self._vocab_size = max([backend.get_vocab_size(with_added_tokens=True), *(i + 1 for i in self._added.values())])

        # Reference splitting: (lstrip, rstrip) per split-off token, meaning "strips the whitespace
        # of its left / right neighbour". AddedToken specials use their flags; everything else
        # (plain added tokens, specials given as plain strings) strips both sides (4.25.1 default).
        flags: dict[str, tuple[bool, bool]] = {t: (True, True) for t in self._added}
        for found in specials.values():
            for s in found:
                flags[s.content] = (True, True)
        for found in specials.values():
            for s in found:
                if s.is_added_token:
                    flags[s.content] = (s.lstrip, s.rstrip)
        self._strip_flags = flags
        # Longest first, so the regex's leftmost match is also the longest one there (the trie's rule).
        alternatives = sorted(flags, key=len, reverse=True)
        self._split_re = re.compile("|".join(re.escape(t) for t in alternatives)) if alternatives else None
        # The Rust backend imports numpy's C API the first time it is handed a list; a Ctrl-C landing
        # in that import turns into a pyo3 PanicException that nothing can catch as an interrupt.
        # Do that import now, while loading, rather than in the first encode of a chat turn.
        backend.encode(["a"], is_pretokenized=True, add_special_tokens=False)

    # ---- encoding -------------------------------------------------------------------------------

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text`` (no BOS is added; MOSS's add_bos_token is false).

        Lone surrogates (which the Rust side refuses with a TypeError) are encoded as U+FFFD.
        """
        if not isinstance(text, str):
            raise TokenizerError(f"encode takes a str, got {type(text).__name__}")
        text, _ = clean_text(text)
        if not self._reference_split or self._split_re is None or self._split_re.search(text) is None:
            return self._tok.encode(text, add_special_tokens=False).ids
        pieces = self._reference_pieces(text)
        if not pieces:
            return []
        # Each piece is one "word"; ByteLevel's regex still splits inside it, and split-off tokens
        # (registered in the backend) map to their single id.
        return self._tok.encode(pieces, is_pretokenized=True, add_special_tokens=False).ids

    def _reference_pieces(self, text: str) -> list[str]:
        """Split ``text`` at split-off tokens and strip their neighbours, as transformers 4.25.1 does."""
        pieces: list[str] = []
        pos = 0
        assert self._split_re is not None
        for m in self._split_re.finditer(text):
            if m.start() > pos:
                pieces.append(text[pos : m.start()])
            pieces.append(m.group())
            pos = m.end()
        if pos < len(text):
            pieces.append(text[pos:])
        # A piece emptied by an earlier neighbour's strip no longer counts as a token (it is "" then).
        for i, piece in enumerate(pieces):
            if piece in self._strip_flags:
                strips_left, strips_right = self._strip_flags[piece]
                if strips_right and i + 1 < len(pieces) and pieces[i + 1]:
                    pieces[i + 1] = pieces[i + 1].lstrip()
                if strips_left and i > 0 and pieces[i - 1]:
                    pieces[i - 1] = pieces[i - 1].rstrip()
        return [p for p in pieces if p]

    # ---- decoding -------------------------------------------------------------------------------

    def _token_bytes(self, token_id: int) -> bytes:
        cached = self._bytes_cache.get(token_id)
        if cached is not None:
            return cached
        if isinstance(token_id, bool) or not 0 <= token_id < self._vocab_size:
            raise TokenizerError(
                f"token id {token_id!r} is outside the tokenizer's range [0, {self._vocab_size}); "
                "a model's embedding may have more rows than the tokenizer has tokens, and those ids decode to nothing"
            )
        if token_id in self._id_to_added:
            data = self._id_to_added[token_id].encode("utf-8")
        else:
            token = self._tok.id_to_token(token_id)
            if token is None:
                raise TokenizerError(f"token id {token_id} has no token in {self._source}")
            try:
                data = bytes(_BYTE_DECODER[c] for c in token)
            except KeyError as e:
                raise TokenizerError(f"vocabulary token {token!r} (id {token_id}) is not a byte-level token") from e
        self._bytes_cache[token_id] = data
        return data

    def decode_bytes(self, ids: Iterable[int], skip_special_tokens: bool = False) -> bytes:
        """The raw bytes of ``ids``, concatenated; what streaming and exact decoding are built on."""
        special = self._special_ids if skip_special_tokens else frozenset()
        return b"".join(self._token_bytes(int(i)) for i in ids if int(i) not in special)

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = False) -> str:
        """Text of ``ids``: the exact inverse of the token bytes (see the module docstring)."""
        return self.decode_bytes(ids, skip_special_tokens).decode("utf-8", errors="replace")

    def stream_decoder(self, skip_special_tokens: bool = True) -> StreamDecoder:
        """A decoder fed one id at a time whose deltas never split a UTF-8 character."""
        return StreamDecoder(self, skip_special_tokens)

    # ---- vocabulary -----------------------------------------------------------------------------

    def token_to_id(self, token: str) -> int | None:
        """Id of an added token ("<eom>") or of a vocabulary token in byte-level form ("Ġthe")."""
        if token in self._added:
            return self._added[token]
        return self._tok.token_to_id(token)

    @property
    def vocab_size(self) -> int:
        """Number of ids the tokenizer can produce (base vocabulary + added tokens), e.g. 106072 for MOSS."""
        return self._vocab_size

    @property
    def eos_token_id(self) -> int | None:
        return self._eos_id

    @property
    def bos_token_id(self) -> int | None:
        return self._bos_id

    @property
    def special_ids(self) -> frozenset[int]:
        """Ids dropped by skip_special_tokens: bos, eos, unk, pad and the additional special tokens."""
        return self._special_ids

    @property
    def added_tokens(self) -> dict[str, int]:
        """Every token split off before BPE (added tokens and specials), content -> id."""
        return dict(self._added)

    def __repr__(self) -> str:
        return f"Tokenizer({str(self._source)!r}, vocab_size={self._vocab_size})"


class StreamDecoder:
    """Turns ids arriving one by one into text deltas, holding back incomplete UTF-8 tails.

    Chinese characters and emoji often span several byte-level tokens; emitting each token's bytes
    as soon as it arrives would print U+FFFD halves. The deltas concatenated (plus ``flush()``)
    equal ``tokenizer.decode(ids, skip_special_tokens)`` exactly, because Python's incremental
    UTF-8 decoder replaces invalid bytes the same way a one-shot decode does.
    """

    def __init__(self, tokenizer: Tokenizer, skip_special_tokens: bool = True) -> None:
        self._tokenizer = tokenizer
        self._skip = tokenizer.special_ids if skip_special_tokens else frozenset()
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def push(self, token_id: int) -> str:
        """Add one id; return the text that is now complete (possibly "")."""
        token_id = int(token_id)
        data = self._tokenizer._token_bytes(token_id)
        if token_id in self._skip:
            return ""
        return self._decoder.decode(data)

    def flush(self) -> str:
        """End of stream: return what was held back (U+FFFD for an incomplete character) and reset."""
        return self._decoder.decode(b"", final=True)


def _missing_error(folder: Path, missing: list[str]) -> TokenizerError:
    present = sorted(p.name for p in folder.iterdir()) if folder.is_dir() else []
    return TokenizerError(
        f"tokenizer files missing in {folder}: {', '.join(missing)} "
        f"(need {TOKENIZER_JSON_FILE}, or {VOCAB_FILE} + {MERGES_FILE}, with optional {ADDED_TOKENS_FILE}, "
        f"{SPECIAL_TOKENS_MAP_FILE}, {TOKENIZER_CONFIG_FILE}; found: {', '.join(present) or 'nothing'})"
    )


def _optional_json(folder: Path, name: str) -> dict:
    path = folder / name
    if not path.is_file():
        return {}
    data = _read_json(path)
    if not isinstance(data, dict):
        raise TokenizerError(f"{path} must hold a JSON object")
    return data


def _read_merges(path: Path) -> list[tuple[str, str]]:
    """merges.txt as MossTokenizer reads it: drop the first line ("#version") and the last element.

    The last element is "" when the file ends with a newline, as it should; a file without one loses
    its last merge in the reference, and here too. A pair listed twice ranks at its last position.
    """
    try:
        with open(path, encoding="utf-8") as f:
            lines = f.read().split("\n")[1:-1]
    except (OSError, UnicodeDecodeError) as e:
        raise TokenizerError(f"cannot read {path}: {e}") from e
    ranks = {tuple(line.split()): rank for rank, line in enumerate(lines)}
    # Lines that are not a pair never match in the reference; dropping them keeps the relative order.
    return [pair for pair in sorted(ranks, key=ranks.__getitem__) if len(pair) == 2]  # type: ignore[misc]


def _load_reference_style(folder: Path) -> Tokenizer:
    """MOSS: vocab.json + merges.txt + added_tokens.json (+ special maps), split the 4.25.1 way."""
    from tokenizers import AddedToken, decoders, models, pre_tokenizers
    from tokenizers import Tokenizer as Backend

    vocab = _read_json(folder / VOCAB_FILE)
    if not isinstance(vocab, dict) or not all(isinstance(v, int) for v in vocab.values()):
        raise TokenizerError(f"{folder / VOCAB_FILE} must map token strings to integer ids")
    merges = _read_merges(folder / MERGES_FILE)
    added = _optional_json(folder, ADDED_TOKENS_FILE)
    config = _optional_json(folder, TOKENIZER_CONFIG_FILE)
    specials = _resolve_specials(config, _optional_json(folder, SPECIAL_TOKENS_MAP_FILE))

    unk = specials.get("unk_token")
    unk_token = unk[0].content if unk and unk[0].content in vocab else None
    try:
        model = models.BPE(vocab, merges, unk_token=unk_token)
    except Exception as e:  # the Rust side raises plain Exception for inconsistent files
        raise TokenizerError(f"vocab.json and merges.txt of {folder} do not form a BPE model: {e}") from e
    backend = Backend(model)
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    backend.decoder = decoders.ByteLevel()

    # added_tokens.json must continue the vocabulary without gaps, in id order (4.25.1 refuses
    # anything else); the backend assigns ids the same way, which is checked below.
    special_contents = {s.content for found in specials.values() for s in found}
    for content, index in sorted(added.items(), key=lambda kv: kv[1]):
        if not isinstance(index, int):
            raise TokenizerError(f"{folder / ADDED_TOKENS_FILE}: id of {content!r} must be an integer")
        if content in special_contents:
            backend.add_special_tokens([AddedToken(content, special=True, normalized=False)])
        else:
            backend.add_tokens([AddedToken(content, special=False, normalized=False)])
        if backend.token_to_id(content) != index:
            raise TokenizerError(
                f"{folder / ADDED_TOKENS_FILE}: {content!r} has id {index}, but added tokens must continue the "
                f"vocabulary in order (expected {backend.token_to_id(content)})"
            )
    # The other specials: split off too, keeping their vocabulary id (<|endoftext|>), or, if new,
    # taking the next ids (4.25.1 adds them after added_tokens.json).
    for content in sorted(special_contents - set(added)):
        backend.add_special_tokens([AddedToken(content, special=True, normalized=False)])

    split_off = dict(added)
    for content in special_contents:
        token_id = backend.token_to_id(content)
        if token_id is not None:
            split_off[content] = token_id
    return Tokenizer(backend, split_off, specials, reference_split=True, source=folder)


def _load_tokenizer_json(folder: Path) -> Tokenizer:
    """CodeGen-style folder with tokenizer.json: load the fast tokenizer it describes, unchanged."""
    from tokenizers import Tokenizer as Backend
    from tokenizers import decoders

    try:
        backend = Backend.from_file(str(folder / TOKENIZER_JSON_FILE))
    except Exception as e:
        raise TokenizerError(f"cannot load {folder / TOKENIZER_JSON_FILE}: {e}") from e
    if not isinstance(backend.decoder, decoders.ByteLevel):
        raise TokenizerError(
            f"{folder / TOKENIZER_JSON_FILE} is not a byte-level BPE tokenizer (jmoss needs GPT-2 style)"
        )
    config = _optional_json(folder, TOKENIZER_CONFIG_FILE)
    specials = _resolve_specials(config, _optional_json(folder, SPECIAL_TOKENS_MAP_FILE))
    added = {t.content: i for i, t in backend.get_added_tokens_decoder().items()}
    return Tokenizer(backend, added, specials, reference_split=False, source=folder)


def load_tokenizer(path: str | Path) -> Tokenizer:
    """Load the tokenizer of a jmoss store or a Hugging Face-style folder, without any weights.

    A folder with tokenizer.json is loaded from it; otherwise vocab.json and merges.txt are needed,
    and added_tokens.json, special_tokens_map.json, tokenizer_config.json are read when present.
    """
    folder = Path(path).expanduser()
    if not folder.is_dir():
        raise TokenizerError(f"tokenizer folder {folder} does not exist or is not a directory")
    if (folder / TOKENIZER_JSON_FILE).is_file():
        return _load_tokenizer_json(folder)
    missing = [name for name in (VOCAB_FILE, MERGES_FILE) if not (folder / name).is_file()]
    if missing:
        raise _missing_error(folder, missing)
    return _load_reference_style(folder)
