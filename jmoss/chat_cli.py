"""The interactive chat loop behind ``jmoss chat`` and ``demos/cli_demo_jittor.py``.

It keeps MOSS's demo habits (``clear`` resets the conversation, ``stop`` quits) and fixes what
they lacked: replies stream as they are generated, Ctrl-C stops the current reply and keeps the
conversation, and the KV cache is reused across turns.
"""

from __future__ import annotations

import signal
import sys
import threading

import click

from jmoss.chat import Chat
from jmoss.errors import JmossError

WELCOME = "Welcome to MOSS (jmoss). Type your message; `clear` clears the history, `stop` quits."
HUMAN = click.style("<|Human|>: ", fg="green", bold=True)
MOSS = click.style("<|MOSS|>: ", fg="cyan", bold=True)
_KIND_STYLE = {"thoughts": ("Inner Thoughts", "yellow"), "commands": ("Commands", "magenta"),
               "results": ("Results", "blue"), "notice": ("note", "bright_black")}


def _is_interrupt(exc: BaseException) -> bool:
    """Ctrl-C, also when native code that ran Python wrapped it: jittor's C++ (its JIT compiler) in
    a RuntimeError, the Rust tokenizer (pyo3) in a PanicException."""
    if isinstance(exc, KeyboardInterrupt):
        return True
    wrapped = isinstance(exc, RuntimeError) or type(exc).__name__ == "PanicException"
    return wrapped and "KeyboardInterrupt" in str(exc)


def _show_event(show_thoughts: bool):
    def on_event(kind: str, text: str) -> None:
        if kind == "notice" or show_thoughts:
            label, colour = _KIND_STYLE[kind]
            click.secho(f"[{label}] {text.rstrip()}", fg=colour, err=kind == "notice")

    return on_event


def run_chat(model, plugins: list[str], plugin_options: dict, show_thoughts: bool, gen_kwargs: dict,
             meta_instruction: str | None = None) -> None:
    """Read messages from stdin until `stop` or end of input; stream MOSS's replies to stdout."""
    chat = Chat(model, meta_instruction, plugins=plugins, plugin_options=plugin_options,
                on_event=_show_event(show_thoughts), **gen_kwargs)
    if sys.stdin.isatty() and threading.current_thread() is threading.main_thread():
        # an interactive chat always answers Ctrl-C, even when started from a shell that handed
        # SIGINT down ignored (background jobs do)
        signal.signal(signal.SIGINT, signal.default_int_handler)
    click.echo(WELCOME)
    while True:
        try:
            text = input(HUMAN if sys.stdin.isatty() else "<|Human|>: ")
        except (EOFError, KeyboardInterrupt):
            click.echo()
            return
        command = text.strip()
        if command == "stop":
            return
        if command == "clear":
            chat.clear()
            click.clear()
            click.echo(WELCOME)
            continue
        if not command:
            continue
        click.echo(MOSS, nl=False)
        replies = chat.stream(text)
        try:
            for delta in replies:
                click.echo(delta, nl=False)
            click.echo()
        except JmossError as exc:
            replies.close()
            click.secho(f"\nerror: {exc}", fg="red", err=True)
        except BaseException as exc:
            if not _is_interrupt(exc):
                raise
            replies.close()
            click.secho(" [stopped]", fg="bright_black")
