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
    """main read with input(): on a terminal fgets + strlen, so a NUL hid the newline and the chat
    waited for another line. The line editor takes a typed control character as a key (never text),
    pasted ones are removed with a note, and each line is answered at once."""
    child = _spawn(store, "--quiet")
    child.expect("Welcome to MOSS")
    child.expect_exact("<|Human|>: ")
    child.send("你\x00好\r")
    child.expect_exact("<|MOSS|>: ", timeout=30)
    for control in TYPED_CONTROLS + ["\x1b[A", "\x1b[1;5C"]:  # pasted (bracketed paste), arrow keys too
        child.expect_exact("<|Human|>: ")
        child.send(f"\x1b[200~cle{control}ar\x1b[201~\r")  # `clear` once cleaned: answered without generating
        child.expect("removed 1 control character", timeout=30)
        child.expect("Welcome to MOSS", timeout=30)
    child.expect_exact("<|Human|>: ")
    child.sendline("stop")
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0


def test_a_piped_line_with_a_nul_is_answered_and_its_control_characters_removed(store):
    """Off a terminal (a script feeding the chat) lines are read whole, NUL included."""
    import subprocess

    run = subprocess.run([*JMOSS, "chat", str(store), "--greedy", "--max-new-tokens", "4", "--quiet"],
                         input="你\x00好\ncle\x07ar\n\x00\x07\nstop\n".encode(), capture_output=True, timeout=240)
    err = run.stderr.decode()
    assert run.returncode == 0, err
    assert "removed 1 control character" in err and "removed 2 control character" in err
    assert run.stdout.decode().count("<|MOSS|>:") == 1  # `clear` and the empty line generate nothing


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
    # printed to one decimal: on a loaded machine (0.16 tok/s shown as 0.2) that rounding is the error
    assert float(match.group(4)) == pytest.approx(meter.decodes / meter.decode_seconds, rel=0.06, abs=0.05)


# -- the prompt of a chat program (issue #30, finding 3) --------------------------------------------


def _own_home(tmp_path) -> dict[str, str]:
    """An environment whose JMOSS_HOME is new (its chat history empty) but shares the compiled Jittor."""
    from pathlib import Path

    home = tmp_path / "home"
    home.mkdir()
    jittor = Path(os.environ.get("JMOSS_HOME", Path.home() / ".cache/jmoss")) / "jittor"
    return {**os.environ, "JMOSS_HOME": str(home), "JITTOR_HOME": str(jittor.resolve())}


def test_the_prompt_edits_lines_and_recalls_history(store, tmp_path):
    env = _own_home(tmp_path)
    child = pexpect.spawn(JMOSS[0], [*JMOSS[1:], "chat", str(store), "--greedy", "-n", "2", "-q"], encoding="utf-8",
                          timeout=240, env=env, dimensions=(40, 200))
    child.expect("Welcome to MOSS")
    child.expect_exact("<|Human|>: ")
    child.send("abc")
    child.send("\x1b[D")  # Left: the cursor moves back, nothing is sent to the model
    child.send("X\r")
    child.expect_exact("<|MOSS|>: ")
    child.expect_exact("<|Human|>: ")
    child.sendline("second")
    child.expect_exact("<|MOSS|>: ")
    child.expect_exact("<|Human|>: ")
    child.send("\x1b[A\x1b[A")  # Up, Up: the message before the last one again
    child.send("\r")
    child.expect_exact("<|MOSS|>: ")
    child.expect_exact("<|Human|>: ")
    child.sendline("/bye")
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0
    history = (tmp_path / "home" / "chat_history").read_text(encoding="utf-8")
    assert [line for line in history.splitlines() if line.startswith("+")] == ["+abXc", "+second", "+abXc", "+/bye"]


def test_ctrl_c_at_an_empty_prompt_says_how_to_quit_and_help_lists_the_commands(store, tmp_path):
    child = pexpect.spawn(JMOSS[0], [*JMOSS[1:], "chat", str(store), "--greedy", "-n", "2", "-q"], encoding="utf-8",
                          timeout=240, env=_own_home(tmp_path), dimensions=(40, 200))
    child.expect_exact("<|Human|>: ")
    child.sendintr()
    child.expect_exact("(to quit, type /bye or press Ctrl-D)")
    child.expect_exact("<|Human|>: ")
    child.sendline("/help")
    child.expect_exact("/clear")
    child.expect_exact("/bye")
    child.expect_exact("<|Human|>: ")
    child.sendline("/clear")
    child.expect("Welcome to MOSS")
    child.expect_exact("<|Human|>: ")
    child.sendline("stop")  # MOSS's word still quits
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0


SCRIPTED_CHAT = """
import sys
sys.path.insert(0, sys.argv[1])
from jmoss.chat_cli import run_chat
from jmoss.tokenizer import load_tokenizer
from test_web import ScriptedModel
model = ScriptedModel(load_tokenizer(sys.argv[2]), {"show me": " title\\x1b]0;pwned\\x07 clear\\x1b[2J bell\\x07 csi\\u009b1m done"},
                      delay=0)
run_chat(model, [], {}, False, {"max_new_tokens": 64})
"""


def test_control_characters_in_model_output_are_shown_not_executed(shared_dir, tmp_path):
    from pathlib import Path

    tok = moss_tokenizer_dir(shared_dir, tmp_path / "tok")
    child = pexpect.spawn(sys.executable, ["-c", SCRIPTED_CHAT, str(Path(__file__).parent), str(tok)],
                          encoding="utf-8", timeout=120, env=_own_home(tmp_path), dimensions=(40, 200))
    child.expect_exact("<|Human|>: ")
    child.sendline("show me")
    child.expect_exact("done")
    shown = child.before
    child.expect_exact("<|Human|>: ")
    child.sendline("/bye")
    child.expect(pexpect.EOF)
    assert "title^[]0;pwned^G clear^[[2J bell^G csi\\x9b1m" in shown, repr(shown)
    assert "\x1b]0;" not in shown and "\x1b[2J" not in shown and "\x07" not in shown and "\x9b" not in shown


def test_chat_on_a_codegen_store_says_it_is_not_a_dialogue_model(tmp_path, shared_dir):
    from dataclasses import replace

    torch_model, config = tiny_moss(seed=11)
    groups = layout.split_state_dict(state_dict_numpy(torch_model), config)
    codegen = write_store_from_groups(tmp_path / "cg", replace(config, model_type="codegen"), groups,
                                      tokenizer_dir=moss_tokenizer_dir(shared_dir, tmp_path / "tok"))
    child = pexpect.spawn(JMOSS[0], [*JMOSS[1:], "chat", str(codegen), "-n", "2", "-q"], encoding="utf-8",
                          timeout=240, env=_own_home(tmp_path), dimensions=(40, 200))
    child.expect_exact("is a CodeGen model, not a dialogue model")
    child.expect_exact("<|Human|>: ")
    child.sendline("/bye")
    child.expect(pexpect.EOF)


def test_compile_notices_are_held_during_a_reply_and_off_with_quiet():
    from jmoss.jittor_setup import CompileProgressFilter

    progress = b"\nCompiling Operators(1/5) used: 2s eta: 3s \rCompiling Operators(5/5) used: 4s eta: 0s \r\n"
    held = CompileProgressFilter(tty=True)
    held.control(b"h")  # a reply is on the screen
    assert held.feed(b"reply text goes on" + progress) == b"reply text goes on\n"
    held.control(b"H")
    assert b"jmoss: compiling 5 kernels" in held.feed(progress)  # after the reply: shown
    quiet = CompileProgressFilter(tty=False, quiet=True)
    assert quiet.feed(progress + b"other\n") == b"other\n"
    live = CompileProgressFilter(tty=True)
    out = live.feed(b"\nCompiling Operators(2/9) used: 2s eta: 3s \r")
    assert b"compiling kernels 2/9" in out and live.busy() and b"compiling kernels 2/9" in live.tick()
    assert live.feed(b"\n") == b"\r\x1b[K" and not live.busy()  # the live line is erased when the burst ends
    log = CompileProgressFilter(tty=False)
    log.LOG_EVERY = 0.05  # (30 s in use)
    log.feed(b"\nCompiling Operators(3/9) used: 2s eta: 3s \r")
    import time

    time.sleep(0.1)
    assert log.tick().startswith(b"jmoss: still compiling kernels, 3/9 after") and log.tick() == b""


HELD_PROBE = """
import sys, time, uuid
from jmoss.jittor_setup import get_jittor, hold_compile_notices, set_compile_notices
quiet = sys.argv[1] == "quiet"
if quiet:
    set_compile_notices(False)
jt = get_jittor("cpu")
import numpy as np
run = uuid.uuid4().int % 10**6
x = jt.array(np.arange(4, dtype="float32"))

def burst(tag, n):
    outs = [jt.code(x.shape, x.dtype, [x], cpu_src=f"for (int i=0; i<in0_shape0; i++) "
                    f"@out(i) = @in0(i) * {k} + {tag};  // run {run}") for k in range(n)]
    jt.sync(outs)

hold_compile_notices(True)
print("REPLY-START", file=sys.stderr, flush=True)
burst(1, 8)
print("REPLY-END", file=sys.stderr, flush=True)
time.sleep(0.5)
hold_compile_notices(False)
burst(2, 8)
print("AFTER", file=sys.stderr, flush=True)
"""


@pytest.mark.parametrize("mode", ["held", "quiet"])
def test_a_compile_during_a_reply_never_lands_in_it(mode):
    import subprocess

    proc = subprocess.run([sys.executable, "-c", HELD_PROBE, mode], capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    during = proc.stderr.split("REPLY-START", 1)[1].split("REPLY-END", 1)[0]
    assert "compiling" not in during and "Compiling" not in during, proc.stderr
    after = proc.stderr.split("REPLY-END", 1)[1]
    assert ("jmoss: compiling 8 kernels" in after) == (mode == "held"), proc.stderr
