"""`jmoss chat`'s terminal output: the loading/prompt status, the tok/s line, --quiet, clean Results."""

from __future__ import annotations

import io
import os
import re
import sys

import pexpect
import pytest

from jmoss import dialogue
from jmoss import layout
from jmoss.chat_cli import Status, TurnMeter, _show_event, clean_typed_line, field_body
from jmoss.store import write_store_from_groups
from moss_fixtures import moss_tokenizer_dir, tiny_moss
from torch_reference import state_dict_numpy

JMOSS = [sys.executable, "-m", "jmoss.cli"]
SPEED = re.compile(r"\[prompt (\d+) tokens, ([0-9.]+) tok/s · reply (\d+) tokens, ([0-9.]+|–) tok/s\]")


@pytest.fixture(scope="module")
def store(tmp_path_factory, shared_dir):
    torch_model, config = tiny_moss(seed=11)
    root = tmp_path_factory.mktemp("chatcli")
    groups = layout.split_state_dict(state_dict_numpy(torch_model), config)
    return write_store_from_groups(root / "store", config, groups, tokenizer_dir=moss_tokenizer_dir(shared_dir, root / "tok"))


def _spawn(store, *flags: str) -> pexpect.spawn:
    return pexpect.spawn(JMOSS[0], [*JMOSS[1:], "chat", str(store), "--greedy", "--max-new-tokens", "6", *flags],
                         encoding="utf-8", timeout=240, env=os.environ.copy(), dimensions=(40, 200))


def test_chat_shows_loading_status_and_a_speed_line_after_each_reply(store):
    child = _spawn(store)
    child.expect_exact("loading model…")
    child.expect("Welcome to MOSS")
    for message in ("你好", "Tell me more"):
        child.expect_exact("<|Human|>: ")
        child.sendline(message)
        child.expect_exact("reading prompt… ")
        child.expect_exact("<|MOSS|>: ")
        child.expect(SPEED)
        prompt_tokens, prompt_rate, reply_tokens, _ = child.match.groups()
        assert int(prompt_tokens) > 0 and float(prompt_rate) > 0 and int(reply_tokens) == 6
    child.expect_exact("<|Human|>: ")
    child.sendline("stop")
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0


def test_quiet_chat_prints_no_status_and_no_speed_line(store):
    child = _spawn(store, "--quiet")
    child.expect("Welcome to MOSS")
    shown = child.before
    child.expect_exact("<|Human|>: ")
    child.sendline("你好")
    child.expect_exact("<|MOSS|>: ")
    shown += child.before
    child.expect_exact("<|Human|>: ")
    shown += child.before
    child.sendline("stop")
    child.expect(pexpect.EOF)
    shown += child.before
    child.close()
    assert child.exitstatus == 0
    assert "tok/s" not in shown and "loading model" not in shown and "reading prompt" not in shown, shown


# Control characters a terminal passes through in a typed line (not its own line-editing keys:
# ^C ^D ^H ^O ^Q ^R ^S ^U ^V ^W ^Z ^\\ DEL), one line each, the NUL first.
TYPED_CONTROLS = [chr(c) for c in range(0x20) if chr(c) not in "\t\n\r\x03\x04\x08\x0f\x11\x12\x13\x15\x16\x17\x1a\x1c"]


def test_a_typed_line_with_a_control_character_is_answered_at_once(store):
    """On a terminal, input() reads with fgets + strlen: a NUL hid the newline and the chat waited
    for another line (main). Each such line is now answered at once, the characters removed."""
    child = _spawn(store, "--quiet")
    child.expect("Welcome to MOSS")
    child.expect_exact("<|Human|>: ")
    child.send("你\x00好\r")
    child.expect("removed 1 control character", timeout=30)
    child.expect_exact("<|MOSS|>: ", timeout=30)
    for control in TYPED_CONTROLS + ["\x1b[A", "\x1b[1;5C"]:  # arrow keys without line editing
        child.expect_exact("<|Human|>: ")
        child.send(f"cle{control}ar\r")  # the command `clear` once cleaned: answered without generating
        child.expect("removed 1 control character", timeout=30)
        child.expect("Welcome to MOSS", timeout=30)
    child.expect_exact("<|Human|>: ")
    child.send("\x00\x07\r")  # nothing left: no turn, the prompt again
    child.expect("removed 2 control character")
    child.expect_exact("<|Human|>: ")
    child.sendline("stop")
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0


def test_clean_typed_line_removes_every_control_character_and_escape_sequence():
    controls = [chr(c) for c in [*range(0x20), *range(0x7f, 0xa0)] if chr(c) != "\t"]
    for c in controls:
        assert clean_typed_line(f"你{c}好") == ("你好", 1), repr(c)
    for seq in ["\x1b[A", "\x1b[1;5D", "\x1b[200~", "\x1bO", "\x1b"]:
        assert clean_typed_line(f"x{seq}y") == ("xy", 1), repr(seq)
    assert clean_typed_line("tab\tand 😀 stay") == ("tab\tand 😀 stay", 0)


def test_results_are_shown_without_their_markers(capsys):
    block = dialogue.results('Calculator("2+3") => 5\nCalculator("2*3") => 6')
    inline = dialogue.results_inline("Image generated successfully.")
    assert "<|Results|>" in block and "<eor>" in block  # what the Chat's "results" event carries
    assert field_body("results", block) == 'Calculator("2+3") => 5\nCalculator("2*3") => 6'
    assert field_body("results", inline) == "Image generated successfully."
    on_event = _show_event(show_thoughts=True)
    on_event("results", block)
    on_event("results", inline)
    on_event("thoughts", "I should calculate.")
    out = capsys.readouterr().out
    assert "<|Results|>" not in out and "<eor>" not in out
    assert '[Results]\n  Calculator("2+3") => 5\n  Calculator("2*3") => 6\n' in out
    assert "[Results] Image generated successfully.\n" in out
    assert "[Inner Thoughts] I should calculate.\n" in out


class _Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_status_redraws_in_place_on_a_terminal_and_stays_off_a_log():
    tty = _Tty()
    status = Status(stream=tty)
    status.show("reading prompt… 12 tokens")
    status.show("reading prompt… 13 tokens")
    status.clear()
    status.line("[prompt 13 tokens, 1.0 tok/s · reply 2 tokens, 3.0 tok/s]")
    assert tty.getvalue() == ("\r\x1b[K\x1b[2mreading prompt… 12 tokens\x1b[0m\r\x1b[K\x1b[2mreading prompt… 13 tokens"
                              "\x1b[0m\r\x1b[K\x1b[2m[prompt 13 tokens, 1.0 tok/s · reply 2 tokens, 3.0 tok/s]\x1b[0m\n")
    log = io.StringIO()
    status = Status(stream=log)
    status.show("loading model… 1.0 s")
    status.line("[prompt 13 tokens, 1.0 tok/s · reply 2 tokens, 3.0 tok/s]")
    assert log.getvalue() == "[prompt 13 tokens, 1.0 tok/s · reply 2 tokens, 3.0 tok/s]\n"
    quiet = _Tty()
    status = Status(quiet=True, stream=quiet)
    with status.ticking("loading model", interval=0.01):
        status.show("reading prompt… 1 tokens")
    status.line("x")
    assert quiet.getvalue() == ""


def test_turn_meter_counts_what_the_session_really_ran(shared_dir, tmp_path):
    from jmoss.api import Model

    torch_model, config = tiny_moss(seed=3)
    model = Model.from_state_dict(state_dict_numpy(torch_model), config, device="cpu",
                                  tokenizer_path=moss_tokenizer_dir(shared_dir, tmp_path / "tok"))
    chat = model.chat(do_sample=False, max_new_tokens=5)
    screen = _Tty()
    meter = TurnMeter(chat.session, Status(stream=screen))
    reply = chat.send("Hello")
    assert meter.prompt_tokens == reply.prefilled_tokens and meter.decodes == reply.generated_tokens - 1
    assert meter.prefill_seconds > 0 and meter.decode_seconds > 0
    assert f"reading prompt… {reply.prefilled_tokens} tokens" in screen.getvalue()
    line = meter.summary(reply.generated_tokens)
    match = SPEED.fullmatch(line)
    assert match and int(match.group(1)) == reply.prefilled_tokens and int(match.group(3)) == 5
    assert float(match.group(4)) == pytest.approx(meter.decodes / meter.decode_seconds, rel=0.06)
