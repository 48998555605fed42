"""Multi-turn MOSS chat with the KV cache kept across turns, and MOSS's two-pass plugin loop.

The conversation is one growing list of token ids in MOSS's SFT format (jmoss.dialogue): the meta
instruction, then per turn ``<|Human|>: …<eoh>\\n`` (plugins: Inner Thoughts, Commands, Results)
and ``<|MOSS|>: …<eom>\\n``. The session caches a prefix of that list, so a new turn prefills
only the ids after the cached prefix: its own prompt (and the closing ``<eom>\\n`` of the
previous reply), never the history. When a turn would pass the model's n_positions, the oldest
turns are dropped (the meta instruction is kept), the cache is rebuilt once, and the reply says so.

With plugins, a turn is generated in two passes over the same cache: pass 1 writes Inner
Thoughts and Commands until ``<eoc>``; the calls run (each bounded in time; failures become
result text); their Results and ``<|MOSS|>:`` are appended; pass 2 writes the reply until ``<eom>``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Callable, Iterable, Iterator

from jmoss import dialogue
from jmoss.errors import ContextLengthError
from jmoss.generation import Finish, GenerationOptions, StopCheck, fit_to_context, shared_prefix, stream_steps
from jmoss.tokenizer import clean_text

if TYPE_CHECKING:
    from jmoss.plugins import Call, CallResult, Plugin
    from jmoss.session import Session, TextModel

EOM, EOC = "<eom>", "<eoc>"


@dataclass
class Reply:
    """One MOSS turn: the reply text and, with plugins, what happened before it."""

    text: str = ""
    inner_thoughts: str | None = None
    commands: list["Call"] = field(default_factory=list)
    results: str | None = None
    # generation's reason ("stop", "length", "context", "time", "cancelled"), or "interrupted" (an exception)
    finish_reason: str = "stop"
    prefilled_tokens: int = 0
    generated_tokens: int = 0
    notices: list[str] = field(default_factory=list)
    dropped_turns: int = 0  # oldest turns dropped so that this one fits the context


Event = Callable[[str, str], None]  # (kind, text): kind in "thoughts", "commands", "results", "notice"


class Chat:
    """A MOSS conversation on one model; ``send`` a message, get a ``Reply``.

    The KV cache is a Session of the model's (``max_len`` positions), or ``session`` when the
    caller owns one: a server shares one cache among many conversations, so a Chat must not
    allocate its own. ``stream``/``send`` can also run one turn on another session (a batch slot
    leased for the turn); it must hold a prefix of this conversation's ids, or nothing.
    """

    def __init__(
        self,
        model: "TextModel",
        meta_instruction: str | None = None,
        *,
        plugins: Iterable["Plugin"] | Iterable[str] | None = None,
        plugin_options: dict | None = None,
        plugin_timeout: float = 20.0,
        max_len: int | None = None,
        on_event: Event | None = None,
        session: "Session | None" = None,
        **defaults,
    ):
        from jmoss.plugins import capability_lines, load_plugins

        self.model = model
        self.tokenizer = model.tokenizer
        names = [p for p in (plugins or []) if isinstance(p, str)]
        self.plugins: list[Plugin] = [p for p in (plugins or []) if not isinstance(p, str)]
        if names:
            self.plugins += load_plugins(names, **(plugin_options or {}))
        if meta_instruction is None:
            meta_instruction = dialogue.base_meta_instruction()
            if self.plugins:
                meta_instruction += capability_lines(self.plugins)
        self.meta_instruction = meta_instruction
        self.plugin_timeout = plugin_timeout
        self.defaults = defaults
        self.on_event = on_event
        self.session = session if session is not None else model.session(max_len=max_len)
        self.max_len = self.session.max_len
        self.history: list[tuple[str, Reply]] = []
        self.last_reply: Reply | None = None
        self._meta_ids = self.tokenizer.encode(meta_instruction)
        if len(self._meta_ids) >= self.max_len:
            raise ContextLengthError(f"the meta instruction alone has {len(self._meta_ids)} tokens, past {self.max_len}")
        self.clear()

    def clear(self) -> None:
        """Forget the conversation (the meta instruction stays); the cache buffers are reused."""
        self.session.reset()
        self._ids: list[int] = list(self._meta_ids)
        self._turn_starts: list[int] = []
        self.history = []

    @property
    def token_count(self) -> int:
        return len(self._ids)

    def send(self, text: str | bytes, *, session: "Session | None" = None, should_stop: StopCheck | None = None,
             max_len: int | None = None, **options) -> Reply:
        for _ in self.stream(text, session=session, should_stop=should_stop, max_len=max_len, **options):
            pass
        assert self.last_reply is not None
        return self.last_reply

    def stream(self, text: str | bytes, *, session: "Session | None" = None, should_stop: StopCheck | None = None,
               max_len: int | None = None, **options) -> Iterator[str]:
        """Yield the reply's text deltas; ``last_reply`` holds the whole Reply afterwards.

        ``text`` may be any str or bytes: invalid UTF-8 and lone surrogates become U+FFFD (with a
        notice). A message refused for length (ContextLengthError) leaves the conversation as it was.
        ``session``: run this turn on it instead of the chat's own. ``should_stop``: a cancel
        callback; once true the reply ends ("cancelled") and the turn is closed as shown so far.
        ``max_len``: this turn's context, below the session's (MOSS's API ``max_length``): the
        conversation is fitted into it as into the session, oldest turns dropped first.
        """
        own, limit = self.session, self.max_len
        self.session = session if session is not None else own
        self.max_len = min(max_len, self.session.max_len) if max_len else self.session.max_len
        try:
            yield from self._turn(text, should_stop, options)
        finally:
            self.session, self.max_len = own, limit

    def _turn(self, text: str | bytes, should_stop: StopCheck | None, options: dict) -> Iterator[str]:
        opts = GenerationOptions.from_kwargs(**{**self.defaults, **options})
        text, replaced = clean_text(text)
        reply = Reply()
        self.last_reply = reply
        if replaced:
            notice = f"replaced {replaced} character(s) of the message that were not valid UTF-8 with U+FFFD"
            reply.notices.append(notice)
            self._emit("notice", notice)
        self._turn_starts.append(len(self._ids))
        refused = False
        try:
            if self.plugins:
                self._ids += self.tokenizer.encode(dialogue.human(text))
                yield from self._plugin_turn(reply, opts, should_stop)
            else:
                self._ids += self.tokenizer.encode(dialogue.human(text) + dialogue.prefix(dialogue.MOSS))
                yield from self._reply_pass(reply, opts, should_stop)
        except ContextLengthError:
            refused = True
            self._undo_turn()
            raise
        finally:  # an interrupted reply stays in the conversation, closed with <eom>
            if not refused:
                self.history.append((text, reply))

    def _undo_turn(self) -> None:
        """Take the current turn out of the ids (and the cache) as if it had never been sent."""
        start = self._turn_starts.pop()  # _fit keeps the current turn last, shifted if it dropped any
        del self._ids[start:]
        if self.session.length > start:
            self.session.truncate(start)

    # -- passes ------------------------------------------------------------------------------
    def _reply_pass(self, reply: Reply, opts: GenerationOptions, should_stop: StopCheck | None) -> Iterator[str]:
        """Generate ``<|MOSS|>:``'s continuation until <eom>; close the turn whatever happens."""
        tokens: list[int] = []
        first = True
        try:
            for delta in self._generate(reply, opts, (EOM,), tokens, should_stop, len(self._closing_ids(EOM))):
                if first:  # the model writes "<|MOSS|>: text"; the reply is the text
                    delta, first = delta.lstrip(" "), not delta.strip(" ")
                if delta:
                    reply.text += delta
                    yield delta
        except BaseException:
            reply.finish_reason = "interrupted"
            raise
        finally:
            self._close(tokens, EOM, reply)

    def _plugin_turn(self, reply: Reply, opts: GenerationOptions, should_stop: StopCheck | None) -> Iterator[str]:
        from jmoss.plugins import parse_commands, render_results, run_calls

        tokens: list[int] = []
        # a constraint (a JSON reply) shapes the reply, not MOSS's thoughts and commands
        pass1 = replace(opts, stop=(EOC, EOM), skip_special_tokens=False, constraint=None)
        try:
            # pass 1 gets half the room at most: the Results and the reply must still fit after it
            closing = max(len(self._closing_ids(EOC)), len(self._closing_ids(EOM)))
            for _ in self._generate(reply, pass1, (), tokens, should_stop, closing, share=0.5):
                pass
        except BaseException:
            reply.finish_reason = "interrupted"
            self._close(tokens, EOM, reply)
            raise
        if reply.finish_reason == "cancelled":  # no tools run for a caller that has gone
            self._close(tokens, EOM, reply)
            return
        written = self.tokenizer.decode(tokens, skip_special_tokens=False)
        eom_id = self.tokenizer.token_to_id(EOM)
        if tokens and tokens[-1] == eom_id or dialogue.prefix(dialogue.MOSS) in written:
            # the model skipped the tools and answered: keep its text as the reply
            reply.text = _field(written, dialogue.prefix(dialogue.MOSS), EOM) or written.replace(EOM, "").strip()
            self._close(tokens, EOM, reply)
            yield reply.text
            return
        reply.inner_thoughts = _field(written, dialogue.prefix(dialogue.INNER_THOUGHTS), "<eot>")
        command_text = _field(written, dialogue.prefix(dialogue.COMMANDS), EOC) or "None"
        self._emit("thoughts", reply.inner_thoughts or "")
        self._emit("commands", command_text)
        self._close(tokens, EOC, reply)  # "<eoc>\n" ends the Commands field, as in training
        reply.commands = parse_commands(command_text)
        results: list[CallResult] = run_calls(reply.commands, self.plugins, timeout=self.plugin_timeout)
        reply.results = render_results(results)
        self._emit("results", reply.results)
        self._ids += self.tokenizer.encode(reply.results + dialogue.prefix(dialogue.MOSS))
        yield from self._reply_pass(reply, opts, should_stop)

    def _generate(self, reply: Reply, opts: GenerationOptions, stop: tuple, tokens: list[int],
                  should_stop: StopCheck | None, closing: int, share: float = 1.0) -> Iterator[str]:
        """Generate into ``tokens``, leaving ``closing`` positions for what :meth:`_close` appends and
        taking at most ``share`` of the room left."""
        room_needed = min(opts.max_new_tokens, max(1, self.max_len // 4))
        self._fit(room_needed + closing, reply)
        row = self._ids[self.session.length:]
        reply.prefilled_tokens += len(row)
        budget = fit_to_context(opts.max_new_tokens, len(self._ids) + closing, self.max_len)
        budget = min(budget, max(1, int((self.max_len - len(self._ids) - closing) * share)))
        if budget < opts.max_new_tokens:
            reply.notices.append(f"reply limited to {budget} tokens by the {self.max_len}-position context")
        run = replace(opts, stop=tuple(opts.stop) + stop, max_new_tokens=budget)  # budget: max_len may be below the session's
        history = self._ids[: self.session.length]
        finish = Finish()
        for step in stream_steps(self.model, self.session, row, run, history=history, should_stop=should_stop,
                                 fit_context=True):
            if step.token is not None:
                tokens.append(step.token)
            finish = step.finish or finish
            if step.text:
                yield step.text
        if finish.stop_string is not None:
            self._keep_shown(tokens, finish.text)
        reply.generated_tokens += len(tokens)
        reason = finish.reason or "stop"
        reply.finish_reason = "context" if reason == "length" and budget < opts.max_new_tokens else reason

    def _closing_ids(self, marker: str) -> list[int]:
        """What :meth:`_close` appends after a field: its end marker (unless generated) and a newline."""
        marker_id = self.tokenizer.token_to_id(marker)
        return ([marker_id] if marker_id is not None else self.tokenizer.encode(marker)) + self.tokenizer.encode("\n")

    def _keep_shown(self, tokens: list[int], text: str) -> None:
        """After a stop string cut the text, keep the ids of what was shown, not of the stop string.

        The conversation then reads as the user saw it; the cache is rewound to where the kept
        ids part from what it processed, so the next turn prefills the difference.
        """
        shown = self.tokenizer.encode(text) if text else []
        self.session.truncate(min(self.session.length, len(self._ids) + shared_prefix(shown, tokens)))
        tokens[:] = shown

    def _close(self, tokens: list[int], marker: str, reply: Reply) -> None:
        """Append what was generated and the field's end marker + newline to the conversation.

        A tokenizer without the marker as one token (a CodeGen model in a MOSS chat) gets its text.
        """
        closing = self._closing_ids(marker)
        newline = len(self.tokenizer.encode("\n"))
        marker_ids = closing[:-newline]
        if tokens[-len(marker_ids):] == marker_ids:
            closing = closing[len(marker_ids):]
        # _generate left room for the closing ids; a stop string's re-encoded text may still be a
        # token longer than what was generated, and the conversation must fit the positions.
        over = len(self._ids) + len(tokens) + len(closing) - self.max_len
        if over > 0:
            del tokens[max(0, len(tokens) - over):]
            kept = len(self._ids) + len(tokens)
            if self.session.length > kept:
                self.session.truncate(kept)
        self._ids += tokens + closing
        del tokens[:]

    def _fit(self, room_needed: int, reply: Reply) -> None:
        """Drop oldest turns (never the meta instruction or this turn) until ``room_needed`` fits."""
        if len(self._ids) + room_needed <= self.max_len:
            return
        current = self._turn_starts[-1]
        if len(self._meta_ids) + (len(self._ids) - current) + 1 > self.max_len:
            raise ContextLengthError(
                f"this message needs {len(self._ids) - current} tokens; with the meta instruction it cannot fit in "
                f"{self.max_len} positions. Send a shorter message."
            )
        dropped = 0
        starts = self._turn_starts
        while len(starts) > 1:
            keep_from = starts[1]
            kept = len(self._meta_ids) + len(self._ids) - keep_from
            self._ids = self._meta_ids + self._ids[keep_from:]
            shift = keep_from - len(self._meta_ids)
            starts = [s - shift for s in starts[1:]]
            dropped += 1
            if kept + room_needed <= self.max_len:
                break
        if not dropped:  # only this turn is left: the reply gets the room there is (fit_to_context)
            return
        self._turn_starts = starts
        self.history = self.history[dropped:]
        self.session.reset()  # positions shift: the cache is rebuilt from the kept turns
        reply.dropped_turns += dropped
        notice = f"dropped the {dropped} oldest turn(s) to stay within {self.max_len} positions (meta instruction kept)"
        reply.notices.append(notice)
        self._emit("notice", notice)

    def _emit(self, kind: str, text: str) -> None:
        if self.on_event is not None:
            self.on_event(kind, text)


def _field(text: str, start: str, end: str) -> str | None:
    """The body of a field ``start …end`` inside generated text (without the leading space)."""
    m = re.search(re.escape(start) + r" ?(.*?)(?:" + re.escape(end) + r"|$)", text, flags=re.S)
    return m.group(1).strip("\n") if m else None
