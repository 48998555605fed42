"""The interactive chat loop behind ``jmoss chat`` and ``demos/cli_demo_jittor.py``.

It keeps MOSS's demo habits (``clear`` resets the conversation, ``stop`` quits) beside the
commands users of other chat CLIs type (``/help``, ``/clear``, ``/bye``), and fixes what MOSS's
demo lacked: replies stream as they are generated, Ctrl-C stops the current reply and keeps the
conversation (at an empty prompt it says how to quit instead of quitting), the KV cache is reused
across turns, and on a terminal the prompt has line editing and history (prompt_toolkit; history
kept in ``$JMOSS_HOME/chat_history``). Model output is untrusted: control characters in it are
shown as visible escapes (``^[``, ``\\x9b``), never executed by the terminal.
"""

from __future__ import annotations

import os
import re
import signal
import sys
import threading
import time
from contextlib import contextmanager
from typing import Iterator

import click

from jmoss import dialogue
from jmoss.chat import Chat
from jmoss.errors import JmossError
from jmoss.jittor_setup import hold_compile_notices

WELCOME = "Welcome to MOSS (jmoss). Type your message; /help lists the commands, /clear starts over, /bye quits."
HELP = """commands:
  /help          this list
  /clear         start a new conversation (MOSS's `clear` too)
  /bye           quit (MOSS's `stop`, Ctrl-D at an empty prompt)
keys: Ctrl-C stops a reply (the conversation is kept); Up/Down recall earlier messages, Left/Right edit the line"""
QUIT_HINT = "(to quit, type /bye or press Ctrl-D)"
NOT_DIALOGUE = ("note: {name} is a {kind} model, not a dialogue model: it continues text and was not trained on "
                "MOSS's turns, so expect code-like continuations; `jmoss generate` suits it better")
HUMAN = click.style("<|Human|>: ", fg="green", bold=True)
MOSS = click.style("<|MOSS|>: ", fg="cyan", bold=True)
_KIND_STYLE = {"thoughts": ("Inner Thoughts", "yellow"), "commands": ("Commands", "magenta"),
               "results": ("Results", "blue"), "notice": ("note", "bright_black")}
_FIELD_OF_KIND = {"thoughts": dialogue.INNER_THOUGHTS, "commands": dialogue.COMMANDS, "results": dialogue.RESULTS}
_MARKERS = {name: (tag, end) for name, tag, end in dialogue.FIELDS}


def _is_interrupt(exc: BaseException) -> bool:
    """Ctrl-C, also when native code that ran Python wrapped it: jittor's C++ (its JIT compiler) in
    a RuntimeError, the Rust tokenizer (pyo3) in a PanicException."""
    if isinstance(exc, KeyboardInterrupt):
        return True
    wrapped = isinstance(exc, RuntimeError) or type(exc).__name__ == "PanicException"
    return wrapped and "KeyboardInterrupt" in str(exc)


def field_body(kind: str, text: str) -> str:
    """The readable body of an event's text: the Results event carries the whole
    ``<|Results|>:\n…\n<eor>\n`` field as the model reads it; a person wants what is inside."""
    body = text.strip()
    name = _FIELD_OF_KIND.get(kind)
    if name is not None:
        tag, end = _MARKERS[name]
        if body.startswith(tag):
            body = body[len(tag):]
        if body.endswith(end):
            body = body[: -len(end)]
    return body.strip()


class Status:
    """One transient line on stderr ("loading model… 3.2 s") redrawn in place on a terminal, and
    the per-reply speed line; both off with ``quiet``. Off a terminal only the speed line is
    printed (as a plain line): redraws would litter a log."""

    def __init__(self, quiet: bool = False, stream=None):
        self.quiet = quiet
        self._stream = stream
        self.visible = False
        self._lock = threading.Lock()

    @property
    def stream(self):
        return self._stream or sys.stderr  # looked up each time: jittor_setup may re-point stderr

    @property
    def tty(self) -> bool:
        try:
            return self.stream.isatty()
        except (AttributeError, ValueError):
            return False

    def show(self, text: str) -> None:
        if self.quiet or not self.tty:
            return
        with self._lock:
            self.stream.write("\r\033[K" + click.style(text, dim=True))
            self.stream.flush()
            self.visible = True

    def clear(self) -> None:
        with self._lock:
            if self.visible:
                self.stream.write("\r\033[K")
                self.stream.flush()
                self.visible = False

    def line(self, text: str) -> None:
        """A permanent dim line (the speed after a reply)."""
        if self.quiet:
            return
        self.clear()
        click.echo(click.style(text, dim=True) if self.tty else text, file=self.stream, color=self.tty)

    @contextmanager
    def ticking(self, label: str, interval: float = 0.1) -> Iterator[None]:
        """Show ``label… N.N s`` counting up while the block runs (a daemon thread redraws it)."""
        if self.quiet or not self.tty:
            yield
            return
        start = time.perf_counter()
        done = threading.Event()

        def tick() -> None:
            while not done.wait(interval):
                self.show(f"{label}… {time.perf_counter() - start:.1f} s")

        self.show(f"{label}… 0.0 s")
        thread = threading.Thread(target=tick, daemon=True, name="jmoss-status")
        thread.start()
        try:
            yield
        finally:
            done.set()
            thread.join()
            self.clear()


class TurnMeter:
    """Times a chat session's prefills and decodes (wrapping the Session's methods) for the speed
    line, and shows "reading prompt… N tokens" while a prompt is prefilled."""

    def __init__(self, session, status: Status):
        self.status = status
        self.replying = False  # reply text is on screen: no transient status on its line
        self.reset()
        prefill, decode = session.prefill, session.decode

        def timed_prefill(rows, *args, **kwargs):
            tokens = sum(len(r) for r in rows)
            if not self.replying:
                self.status.show(f"reading prompt… {tokens} tokens")
            t = time.perf_counter()
            try:
                return prefill(rows, *args, **kwargs)
            finally:
                self.prefill_seconds += time.perf_counter() - t
                self.prompt_tokens += tokens

        def timed_decode(tokens, *args, **kwargs):
            t = time.perf_counter()
            try:
                return decode(tokens, *args, **kwargs)
            finally:
                self.decode_seconds += time.perf_counter() - t
                self.decodes += 1

        session.prefill, session.decode = timed_prefill, timed_decode

    def reset(self) -> None:
        self.prompt_tokens = self.decodes = 0
        self.prefill_seconds = self.decode_seconds = 0.0

    def summary(self, generated_tokens: int) -> str:
        """llama.cpp-style figures: prompt tokens and their rate, generated tokens and the decode rate."""
        def rate(n: int, seconds: float) -> str:
            return f"{n / seconds:.1f} tok/s" if n and seconds > 0 else "– tok/s"

        return (f"[prompt {self.prompt_tokens} tokens, {rate(self.prompt_tokens, self.prefill_seconds)} · "
                f"reply {generated_tokens} tokens, {rate(self.decodes, self.decode_seconds)}]")


def _show_event(show_thoughts: bool, status: Status | None = None):
    def on_event(kind: str, text: str) -> None:
        if kind == "notice" or show_thoughts:
            if status is not None:
                status.clear()
            label, colour = _KIND_STYLE[kind]
            body = visible(field_body(kind, text))
            if "\n" in body:  # multi-line Results: one indented block under the label
                body = "\n" + "\n".join("  " + line for line in body.splitlines())
            else:
                body = " " + body
            click.secho(f"[{label}]{body}", fg=colour, err=kind == "notice")

    return on_event


_OUTPUT_CONTROL = {c: f"^{chr(c + 64)}" for c in range(32) if c not in (9, 10)}  # tab and newline are text
_OUTPUT_CONTROL[127] = "^?"
_OUTPUT_CONTROL.update({c: f"\\x{c:02x}" for c in range(0x80, 0xA0)})  # C1 controls (0x9b is a CSI on many terminals)


def visible(text: str) -> str:
    """``text`` with its control characters written out (ESC as ``^[``, CR as ``^M``…): model output
    reaches the terminal as characters, never as cursor moves, colour changes or title sets."""
    return text.translate(_OUTPUT_CONTROL)


def _reader():
    """A function reading one message: prompt_toolkit's editing prompt on a terminal, else input()."""
    if not (sys.stdin.isatty() and sys.stdout.isatty()):
        return lambda: read_line(HUMAN if sys.stdin.isatty() else "<|Human|>: ")
    os.environ.setdefault("PROMPT_TOOLKIT_NO_CPR", "1")  # no cursor-position query a terminal may never answer
    from prompt_toolkit import PromptSession
    from prompt_toolkit.formatted_text import ANSI
    from prompt_toolkit.history import FileHistory, InMemoryHistory

    from jmoss.home import jmoss_home

    try:
        jmoss_home().mkdir(parents=True, exist_ok=True)
        history = FileHistory(str(jmoss_home() / "chat_history"))
    except OSError:
        history = InMemoryHistory()
    session = PromptSession(history=history)
    prompt = ANSI(HUMAN)
    return lambda: session.prompt(prompt)


# What a terminal lets through in a typed line that is no text: ANSI escape sequences (arrow keys
# without line editing send "\x1b[A") and the other C0/C1 control characters (tab is text).
_TYPED_CONTROL = re.compile(r"\x1b\[[0-?]*[ -/]*[@-~]|\x1b[@-_]?|[\x00-\x08\x0a-\x1f\x7f-\x9f]")


def clean_typed_line(text: str) -> tuple[str, int]:
    """``text`` without escape sequences and control characters, and how many were removed."""
    return _TYPED_CONTROL.subn("", text)


def read_line(prompt: str) -> str:
    """One typed line, without its line ending (\\n or \\r\\n); ``EOFError`` at end of input.

    Not ``input()``: on a terminal it reads through C's fgets and measures the line with strlen,
    so a NUL byte hides the newline after it and the chat would wait for another line.
    """
    click.echo(prompt, nl=False)
    sys.stdout.flush()
    line = sys.stdin.readline()
    if not line:
        raise EOFError
    return line.removesuffix("\n").removesuffix("\r")


def _tolerant_stdin() -> None:
    """Read stdin with ``surrogateescape``: a line that is not UTF-8 reaches Chat (which replaces
    the bad bytes and says so) instead of ending the chat with a UnicodeDecodeError."""
    reconfigure = getattr(sys.stdin, "reconfigure", None)
    if reconfigure is not None:
        try:
            reconfigure(errors="surrogateescape")
        except (ValueError, OSError):  # a detached or closed stream: input() reports EOF itself
            pass


def run_chat(model, plugins: list[str], plugin_options: dict, show_thoughts: bool, gen_kwargs: dict,
             meta_instruction: str | None = None, status: Status | None = None) -> None:
    """Read messages from stdin until `/bye` (`stop`) or end of input; stream MOSS's replies to stdout.

    A ``meta_instruction`` of the user's (``--system``) gets the plugins' capability lines too, as
    MOSS's own does: without them the model would not know it may call the tools."""
    status = status or Status()
    if meta_instruction is not None and plugins:
        from jmoss.plugins import capability_lines, load_plugins

        plugins = load_plugins(plugins, **(plugin_options or {}))
        meta_instruction += capability_lines(plugins)
    chat = Chat(model, meta_instruction, plugins=plugins, plugin_options=plugin_options,
                on_event=_show_event(show_thoughts, status), **gen_kwargs)
    meter = TurnMeter(chat.session, status)
    if sys.stdin.isatty() and threading.current_thread() is threading.main_thread():
        # an interactive chat always answers Ctrl-C, even when started from a shell that handed
        # SIGINT down ignored (background jobs do)
        signal.signal(signal.SIGINT, signal.default_int_handler)
    _tolerant_stdin()
    read = _reader()
    click.echo(WELCOME)
    kind = getattr(model.config, "model_type", "moss")
    if kind != "moss" or model.tokenizer.token_to_id("<eoh>") is None:
        name = getattr(model, "path", None)
        click.secho(NOT_DIALOGUE.format(name=name.name if name else "this", kind="CodeGen" if kind == "codegen"
                                        else kind), fg="yellow", err=True)
    while True:
        try:
            text = read()
        except EOFError:
            click.echo()
            return
        except KeyboardInterrupt:  # at the prompt: a reply's Ctrl-C pressed late must not end the chat
            click.secho(QUIT_HINT, fg="bright_black", err=True)
            continue
        text, removed = clean_typed_line(text)
        if removed:
            click.secho(f"[note] removed {removed} control character(s) or escape sequence(s) from the message",
                        fg="bright_black", err=True)
        command = text.strip()
        if command in ("stop", "/bye", "/exit", "/quit"):
            return
        if command in ("clear", "/clear"):
            chat.clear()
            click.clear()
            click.echo(WELCOME)
            continue
        if command in ("/help", "/?"):
            click.echo(HELP)
            continue
        if command.startswith("/") and " " not in command and len(command) < 20:
            click.secho(f"unknown command {command}; /help lists them (a message starting with / is sent "
                        "as typed when it has a space)", fg="bright_black", err=True)
            continue
        if not command:
            continue
        meter.reset()
        replies = chat.stream(text)
        started = False  # "<|MOSS|>: " waits for the first text: the status line is on screen till then

        def start() -> None:
            nonlocal started
            if not started:
                status.clear()
                click.echo(MOSS, nl=False)
                meter.replying = started = True
                hold_compile_notices(True)

        try:
            for delta in replies:
                start()
                click.echo(visible(delta), nl=False)
            start()
            click.echo()
            reply = chat.last_reply
            status.line(meter.summary(reply.generated_tokens if reply else 0))
        except JmossError as exc:
            replies.close()
            status.clear()
            click.secho(f"\nerror: {exc}", fg="red", err=True)
        except BaseException as exc:
            if not _is_interrupt(exc):
                raise
            replies.close()
            start()
            click.secho(" [stopped]", fg="bright_black")
        finally:
            meter.replying = False
            hold_compile_notices(False)
