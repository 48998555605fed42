"""Hostile chat input: bytes that are not UTF-8, lone surrogates and messages too long for the
context, through the Python API (Chat.send/stream, Tokenizer.encode) and `jmoss chat` in a
pseudo-terminal. Every input must give a reply or a one-line error, never a traceback, and the
conversation must go on; a message refused for length must leave no trace in the history.
"""

from __future__ import annotations

import io
import os
import subprocess
import sys

import pexpect
import pytest

from jmoss import dialogue
from jmoss import layout
from jmoss.api import Model
from jmoss.errors import ContextLengthError
from jmoss.store import write_store_from_groups
from jmoss.tokenizer import clean_text
from moss_fixtures import moss_tokenizer_dir, tiny_moss
from torch_reference import state_dict_numpy

JMOSS = [sys.executable, "-m", "jmoss.cli"]

# Strings no UTF-8 encoder accepts as they are (lone/reversed surrogates, surrogateescape'd bytes).
BAD_STRINGS = [
    "\ud800", "\udfff", "a\ud800b", "\udc80\udcff", "\udfff\ud800", "x" * 50 + "\udbff", "你好\udc9f",
    "\ud83d", "\ude00", "\ud83d\ud83d\ude00", "<eoh>\ud800<|MOSS|>:", "\udcc3\udca9",
]
# Byte strings that are not valid UTF-8 (truncated, overlong, stray continuation, CESU surrogates, > U+10FFFF).
BAD_BYTES = [
    b"\xff", b"\xfe\xff", b"\xc3", b"\xe4\xbd", b"\xc0\xaf", b"\xe0\x80\xaf", b"\x80\x80", b"\xed\xa0\x80",
    b"\xf4\x90\x80\x80", b"\xf8\x88\x80\x80\x80", b"ok \xff\xfe then \xc3(", "你好".encode() + b"\xe4",
]


@pytest.fixture(scope="module")
def model(tmp_path_factory, shared_dir):
    torch_model, config = tiny_moss(seed=3)
    tok = moss_tokenizer_dir(shared_dir, tmp_path_factory.mktemp("tok"))
    return Model.from_state_dict(state_dict_numpy(torch_model), config, device="cpu", tokenizer_path=tok)


@pytest.fixture(scope="module")
def store(tmp_path_factory, shared_dir):
    torch_model, config = tiny_moss(seed=11)
    root = tmp_path_factory.mktemp("hostile-chat")
    groups = layout.split_state_dict(state_dict_numpy(torch_model), config)
    return write_store_from_groups(root / "store", config, groups, tokenizer_dir=moss_tokenizer_dir(shared_dir, root / "tok"))


@pytest.mark.parametrize("text", BAD_STRINGS + BAD_BYTES, ids=range(len(BAD_STRINGS + BAD_BYTES)))
def test_clean_text_gives_valid_unicode_and_counts_replacements(text):
    fixed, replaced = clean_text(text)
    fixed.encode("utf-8")  # valid now
    assert replaced >= 1
    assert fixed.count("\ufffd") == replaced + (text.count("\ufffd") if isinstance(text, str) else 0)


def test_clean_text_leaves_valid_text_alone_and_joins_surrogate_pairs():
    for good in ["", "hello", "你好 😀", "\ufffd already", "<|Human|>: hi<eoh>\n"]:
        assert clean_text(good) == (good, 0)
        assert clean_text(good.encode()) == (good, 0)
    assert clean_text("\ud83d\ude00") == ("😀", 0)  # a pair written as two code points is one character


def test_tokenizer_encodes_lone_surrogates_instead_of_raising(model):
    tok = model.tokenizer
    for text in BAD_STRINGS:
        assert tok.encode(text) == tok.encode(clean_text(text)[0])


def test_api_chat_survives_every_bad_string_and_byte_string(model):
    chat = model.chat(do_sample=False, max_new_tokens=2)
    for i, text in enumerate(BAD_STRINGS + BAD_BYTES):
        reply = chat.send(text)
        assert reply.generated_tokens >= 1
        assert any("not valid UTF-8" in n for n in reply.notices), (i, reply.notices)
        question, _ = chat.history[-1]
        question.encode("utf-8")  # the history holds only valid text
    chat.send("still here?")  # and the conversation goes on
    assert chat.history[-1][0] == "still here?" and not chat.last_reply.notices


def test_stream_accepts_bytes_and_emits_a_notice(model):
    events = []
    chat = model.chat(do_sample=False, max_new_tokens=3, on_event=lambda kind, text: events.append((kind, text)))
    deltas = list(chat.stream(b"caf\xe9 au lait"))
    assert "".join(deltas) == chat.last_reply.text
    assert chat.history[0][0] == "caf\ufffd au lait"
    assert events and events[0][0] == "notice" and "1 character" in events[0][1]


@pytest.mark.parametrize("plugins", [[], ["calculator"]], ids=["plain", "plugins"])
def test_a_message_refused_for_length_is_not_left_in_the_history(model, plugins):
    chat = model.chat(do_sample=False, max_new_tokens=4, max_len=512, plugins=plugins)
    chat.send("first question")
    ids, history, cached = list(chat._ids), list(chat.history), chat.session.length
    for text in ["很长的问题 " * 300, b"\xff" * 2000, "\ud800" * 2000]:
        with pytest.raises(ContextLengthError, match="Send a shorter message"):
            chat.send(text)
        assert chat.history == history and chat._ids == ids and chat.session.length == cached
    second = chat.send("second question")
    assert [q for q, _ in chat.history] == ["first question", "second question"]
    # the refused turns left nothing behind: the conversation is exactly its two turns
    text = model.tokenizer.decode(chat._ids, skip_special_tokens=False)
    assert text.count("<|Human|>:") == 2 and second.generated_tokens >= 1


def _spawn(store) -> pexpect.spawn:
    child = pexpect.spawn(JMOSS[0], [*JMOSS[1:], "chat", str(store), "--greedy", "--max-new-tokens", "3"],
                          timeout=240, env=os.environ.copy(), dimensions=(40, 200))  # bytes mode: raw stdin
    child.logfile_read = io.BytesIO()
    return child


def _quit_cleanly(child) -> None:
    """At the next prompt, `stop` ends the chat with exit 0 and no traceback anywhere in its output."""
    child.expect_exact(b"<|Human|>: ")
    child.sendline(b"stop")
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0
    assert b"Traceback" not in child.logfile_read.getvalue()


def test_jmoss_chat_in_a_terminal_survives_invalid_utf8_lines(store):
    child = _spawn(store)
    child.expect(b"Welcome to MOSS")
    lines = [b"\xff\xfe hello", b"\xc3", b"caf\xe9", b"\xed\xa0\x80 surrogate", b"ok \xf8\x88\x80\x80\x80", "你好".encode() + b"\xe4\xbd"]
    for line in lines:
        child.expect_exact(b"<|Human|>: ")
        child.sendline(line)
        child.expect_exact(b"not valid UTF-8")
        child.expect_exact(b"<|MOSS|>: ")
    child.expect_exact(b"<|Human|>: ")
    child.sendline("a normal message".encode())
    child.expect_exact(b"<|MOSS|>: ")
    _quit_cleanly(child)


def test_jmoss_chat_refuses_a_too_long_message_and_goes_on(store):
    child = _spawn(store)
    child.expect_exact(b"<|Human|>: ")
    child.sendline("long " * 3000)
    child.expect_exact(b"error: this message needs")
    child.expect_exact(b"<|Human|>: ")
    child.sendline(b"short")
    child.expect_exact(b"<|MOSS|>: ")
    _quit_cleanly(child)


def test_jmoss_chat_reads_invalid_utf8_from_a_pipe(store):
    lines = b"\xff\xfe\n\xc3\ncaf\xe9\n" + "\ud800".encode("utf-8", "surrogatepass") + b"\nstop\n"
    out = subprocess.run([*JMOSS, "chat", str(store), "--greedy", "--max-new-tokens", "2", "--quiet"], input=lines,
                         capture_output=True, timeout=240, env=os.environ.copy())
    assert out.returncode == 0, out.stderr.decode(errors="replace")[-2000:]
    assert b"Traceback" not in out.stderr
    assert out.stdout.count(b"<|MOSS|>: ") == 4 and out.stderr.count(b"not valid UTF-8") == 4
