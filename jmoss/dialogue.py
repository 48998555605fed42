"""MOSS's dialogue format: the meta instruction, its switch lines and the five fields of a turn.

The ground truth is the SFT data moss-moon-003-sft-plugin was trained on (moss-spec §4.3, §4.6):

    <|Human|>: {text}<eoh>\\n
    <|Inner Thoughts|>: {thought}<eot>\\n
    <|Commands|>: {calls or None}<eoc>\\n
    <|Results|>:\\n{result blocks}\\n<eor>\\n      (block form; text2img uses "<|Results|>: {text}<eor>\\n")
    <|MOSS|>: {reply}<eom>\\n

A prompt is the meta instruction followed by the fields of every turn, with nothing in between.
``parse`` and ``render`` are exact inverses on that format, so a prompt built here is byte for byte
what the model saw in training; anything else is refused with a ``DialogueError`` rather than
silently normalised.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import lru_cache
from importlib import resources
from typing import Iterable

from jmoss.errors import DialogueError

# Field tags and end markers in the order they appear inside a turn.
HUMAN, INNER_THOUGHTS, COMMANDS, RESULTS, MOSS = "human", "inner_thoughts", "commands", "results", "moss"
FIELDS: tuple[tuple[str, str, str], ...] = (
    (HUMAN, "<|Human|>:", "<eoh>"),
    (INNER_THOUGHTS, "<|Inner Thoughts|>:", "<eot>"),
    (COMMANDS, "<|Commands|>:", "<eoc>"),
    (RESULTS, "<|Results|>:", "<eor>"),
    (MOSS, "<|MOSS|>:", "<eom>"),
)
_TAG = {name: tag for name, tag, _ in FIELDS}
_END = {name: end for name, _, end in FIELDS}
_ORDER = {name: i for i, (name, _, _) in enumerate(FIELDS)}

# The seven switch lines of the SFT data, in order: (capability name, API signature when enabled).
# Image edition and Text-to-speech are never enabled in MOSS's data, so no signature is known for them.
SWITCHES: tuple[tuple[str, str | None], ...] = (
    ("Inner thoughts", None),
    ("Web search", "Search(query)"),
    ("Calculator", "Calculate(expression)"),
    ("Equation solver", "Solve(equation)"),
    ("Text-to-image", "Text2Image(description)"),
    ("Image edition", None),
    ("Text-to-speech", None),
)
# Users may name a tool by its command ("Search") or its capability ("Web search").
_CAPABILITY_BY_NAME = {
    **{cap.lower(): cap for cap, _ in SWITCHES[1:]},
    **{sig.split("(")[0].lower(): cap for cap, sig in SWITCHES if sig},
}


@dataclass
class Turn:
    """One exchange; a field is None when the turn stops before it (e.g. a prompt awaiting MOSS).

    ``results_inline`` marks the one-line Results form "<|Results|>: {results}<eor>\\n" that the
    text2img data (and the non-plugin placeholder "None") use instead of the block form.
    """

    human: str
    inner_thoughts: str | None = None
    commands: str | None = None
    results: str | None = None
    moss: str | None = None
    results_inline: bool = False

    def fields(self) -> list[str]:
        """The rendered field strings present in this turn, in order."""
        out = [human(self.human)]
        if self.inner_thoughts is not None:
            out.append(inner_thoughts(self.inner_thoughts))
        if self.commands is not None:
            out.append(commands(self.commands))
        if self.results is not None:
            out.append(results_inline(self.results) if self.results_inline else results(self.results))
        if self.moss is not None:
            out.append(moss(self.moss))
        return out

    def render(self) -> str:
        """The turn as prompt text."""
        return "".join(self.fields())


@dataclass
class Conversation:
    """A meta instruction (switch lines included) and the turns that follow it."""

    meta_instruction: str
    turns: list[Turn] = field(default_factory=list)

    def render(self) -> str:
        """The whole prompt text; same as ``render(self)``."""
        return self.meta_instruction + "".join(t.render() for t in self.turns)


def _spaced(name: str, text: str) -> str:
    return f"{_TAG[name]} {text}{_END[name]}\n"


def human(text: str) -> str:
    """``<|Human|>: {text}<eoh>\\n``."""
    return _spaced(HUMAN, text)


def inner_thoughts(text: str) -> str:
    """``<|Inner Thoughts|>: {text}<eot>\\n``."""
    return _spaced(INNER_THOUGHTS, text)


def commands(text: str) -> str:
    """``<|Commands|>: {text}<eoc>\\n``; text is the calls as written, or "None"."""
    return _spaced(COMMANDS, text)


def results(blocks: str) -> str:
    """Block form ``<|Results|>:\\n{blocks}\\n<eor>\\n`` used for every tool except Text2Image."""
    return f"{_TAG[RESULTS]}\n{blocks}\n{_END[RESULTS]}\n"


def results_inline(text: str) -> str:
    """One-line form ``<|Results|>: {text}<eor>\\n`` (text2img's "Image generated successfully.")."""
    return _spaced(RESULTS, text)


def moss(text: str) -> str:
    """``<|MOSS|>: {text}<eom>\\n``."""
    return _spaced(MOSS, text)


def prefix(name: str) -> str:
    """The opening of a field as the model continues it, e.g. ``"<|MOSS|>:"`` for pass 2."""
    return _TAG[name]


def end_marker(name: str) -> str:
    """The end marker of a field, e.g. ``"<eoc>"``: the stop string of plugin pass 1."""
    return _END[name]


@lru_cache(maxsize=1)
def base_meta_instruction() -> str:
    """MOSS's base meta instruction (1029 bytes, typo "mutiple" kept), shipped as package data."""
    return resources.files("jmoss").joinpath("data/meta_instruction.txt").read_text(encoding="utf-8")


def capability_name(name: str) -> str:
    """Map "Search" / "web search" / "Web search" to the switch-line name "Web search"."""
    cap = _CAPABILITY_BY_NAME.get(name.strip().lower())
    if cap is None:
        known = ", ".join(sorted({c for c, s in SWITCHES[1:] if s}))
        raise DialogueError(f"unknown MOSS tool {name!r}; MOSS knows {known} (or their command names)")
    return cap


def switch_lines(
    enabled: Iterable[str],
    inner_thoughts: bool = True,
    extra: Iterable[tuple[str, str]] = (),
) -> str:
    """The seven switch lines of the SFT plugin data, e.g. "- Calculator: enabled. API: Calculate(expression)\\n".

    ``enabled`` names standard tools (command or capability names). ``extra`` appends
    (capability, signature) lines for user plugins MOSS was never trained on, after the seven.
    """
    on = {capability_name(n) for n in enabled}
    lines = ["- Inner thoughts: enabled.\n" if inner_thoughts else "- Inner thoughts: disabled.\n"]
    for cap, sig in SWITCHES[1:]:
        if cap in on:
            if sig is None:
                raise DialogueError(f"{cap} has no API MOSS was trained on; it cannot be enabled")
            lines.append(f"- {cap}: enabled. API: {sig}\n")
        else:
            lines.append(f"- {cap}: disabled.\n")
    lines.extend(f"- {cap}: enabled. API: {sig}\n" for cap, sig in extra)
    return "".join(lines)


def meta_instruction(enabled_plugins: Iterable[str], base: str | None = None, inner_thoughts: bool = True) -> str:
    """The base meta instruction plus switch lines, as in moss-moon-003-sft-plugin's training data."""
    return (base_meta_instruction() if base is None else base) + switch_lines(enabled_plugins, inner_thoughts)


def _field_at(text: str, pos: int) -> str | None:
    for name, tag, _ in FIELDS:
        if text.startswith(tag, pos):
            return name
    return None


def parse(text: str) -> Conversation:
    """Split prompt text into meta instruction and turns; ``render(parse(t)) == t`` for valid text.

    The meta instruction is everything before the first ``<|Human|>:``. Each field must carry its
    end marker and the newline after it; a turn starts at every Human field and its other fields
    must follow in the training order, each at most once.
    """
    start = text.find(_TAG[HUMAN])
    if start < 0:
        return Conversation(text, [])
    conv = Conversation(text[:start], [])
    pos, turn, last = start, None, -1
    while pos < len(text):
        name = _field_at(text, pos)
        if name is None:
            found = text[pos : pos + 30]
            raise DialogueError(f"expected a field tag such as <|Human|>: at offset {pos}, found {found!r}")
        body_start = pos + len(_TAG[name])
        end = text.find(_END[name] + "\n", body_start)
        if end < 0:
            raise DialogueError(f"field {_TAG[name]} at offset {pos} has no closing {_END[name]} + newline")
        body = text[body_start:end]
        pos = end + len(_END[name]) + 1
        if name == HUMAN:
            turn = Turn(human=_spaced_body(body, name, body_start))
            conv.turns.append(turn)
            last = 0
            continue
        if _ORDER[name] <= last:
            raise DialogueError(f"field {_TAG[name]} at offset {body_start} is out of order or repeated in its turn")
        last = _ORDER[name]
        if name == RESULTS and len(body) >= 2 and body[0] == "\n" and body[-1] == "\n":
            turn.results = body[1:-1]
        elif name == RESULTS:
            turn.results = _spaced_body(body, name, body_start)
            turn.results_inline = True
        else:
            setattr(turn, name, _spaced_body(body, name, body_start))
    return conv


def _spaced_body(body: str, name: str, offset: int) -> str:
    if not body.startswith(" "):
        raise DialogueError(f"field {_TAG[name]} at offset {offset} must be followed by a space")
    return body[1:]


def render(conversation: Conversation) -> str:
    """Prompt text of a conversation: meta instruction, then every turn's fields."""
    return conversation.render()


def from_sft_record(record: dict) -> Conversation:
    """A Conversation from one SFT json record (``meta_instruction`` + ``chat.turn_k`` field strings).

    Each record field is already rendered text, so this parses their concatenation; a record whose
    fields are not in the training format raises ``DialogueError``.
    """
    chat = record["chat"]
    text = record["meta_instruction"] + "".join(
        "".join(chat[f"turn_{k}"].values()) for k in range(1, len(chat) + 1)
    )
    return parse(text)
