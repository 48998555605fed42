"""Plugins MOSS can call: command parsing, the plugin registry, running calls, rendering results.

The plugin model (moss-moon-003-sft-plugin) writes a Commands line such as
``Search("黑暗荣耀 主演"), Calculate("2^10")``; the runtime parses it into ``Call``s, runs each on
its plugin with a time bound, and renders the answers in the exact ``<|Results|>`` shapes of the
SFT data (moss-spec §4.6), because those are the only shapes the model has learned to read:

- Search: ``Search("q") =>`` then ``<|n|>: 'snippet'`` items, n numbered 1..N across the whole turn;
- Calculate: one inline line ``Calculate("expr") => 'value'``;
- Solve: ``Solve("eqs") =>`` then ``x = 19`` lines, or ``No result.``;
- Text2Image: the single line ``<|Results|>: Image generated successfully.<eor>``;
- no calls at all: ``<|Results|>:\\nNone\\n<eor>``.

Users add plugins through the Python entry-point group ``jmoss.plugins``: each entry point is named
after the command (e.g. ``Weather``) and loads a ``Plugin`` subclass (or factory) taking keyword
options.
"""

from __future__ import annotations

import re
import threading
from dataclasses import dataclass, field
from importlib import metadata
from typing import Any, Callable, Iterable, Mapping, Sequence

from jmoss import dialogue
from jmoss.errors import DialogueError, PluginError
from jmoss.plugins.base import IMAGE, INLINE, ITEMS, LINES, NO_RESULT, Plugin

ENTRY_POINT_GROUP = "jmoss.plugins"
IMAGE_SUCCESS = "Image generated successfully."

# ---------------------------------------------------------------------------------------------
# Command parsing
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Call:
    """One plugin call as MOSS wrote it: ``Search("q")`` -> name "Search", args ("q",).

    ``text`` is the call exactly as written (quotes and escapes included); results echo it as
    their header, as MOSS's own backend did.
    """

    name: str
    args: tuple[str, ...]
    text: str
    offset: int = 0


@dataclass(frozen=True)
class MalformedCall:
    """A piece of a Commands line that looks like a call but cannot be read as one."""

    text: str
    reason: str
    offset: int


@dataclass
class CommandParse:
    """Everything read from a Commands line: the calls, the malformed pieces, and whether it said None."""

    calls: list[Call] = field(default_factory=list)
    errors: list[MalformedCall] = field(default_factory=list)
    none: bool = False


_CALL_START = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\(")
# "None", "None.", "None (no API needed)", "None. <worked solution>", and the truncated "Non".
_NONE_LIKE = re.compile(r"\s*Non(?:e)?\b")
_MAX_COMMAND_CHARS = 100_000


def _commands_text(text: str) -> str:
    # Accept the whole field ("<|Commands|>: …<eoc>\n") or the model's pass-1 output, not only the body.
    tag = dialogue.prefix(dialogue.COMMANDS)
    if tag in text:
        text = text.split(tag, 1)[1]
        text = text[1:] if text.startswith(" ") else text
    end = text.find(dialogue.end_marker(dialogue.COMMANDS))
    return text if end < 0 else text[:end]


def _read_string(text: str, i: int) -> tuple[str, int] | None:
    """Read a quoted string starting at text[i]; returns (value, index after the quote) or None if unterminated."""
    quote, out, j = text[i], [], i + 1
    while j < len(text):
        c = text[j]
        if c == "\\" and j + 1 < len(text) and text[j + 1] in (quote, "\\"):
            out.append(text[j + 1])
            j += 2
        elif c == quote:
            return "".join(out), j + 1
        else:
            out.append(c)
            j += 1
    return None


def _matching_paren(text: str, open_index: int) -> int:
    """Index of the ')' closing text[open_index], skipping double-quoted strings; -1 when there is none."""
    depth, j = 0, open_index
    while j < len(text):
        c = text[j]
        if c == '"':
            s = _read_string(text, j)
            if s is None:
                return -1
            j = s[1]
            continue
        if c == "(":
            depth += 1
        elif c == ")":
            depth -= 1
            if depth == 0:
                return j
        j += 1
    return -1


def _read_bare(text: str, i: int) -> int:
    """End of an unquoted argument: the ',' or ')' at depth 0 (or the end of the text)."""
    depth, j = 0, i
    while j < len(text):
        c = text[j]
        if c == '"':
            s = _read_string(text, j)
            if s is None:
                return len(text)
            j = s[1]
            continue
        if c in "([{":
            depth += 1
        elif c in ")]}":
            if depth == 0:
                return j
            depth -= 1
        elif c == "," and depth == 0:
            return j
        j += 1
    return j


def _skip_ws(text: str, j: int) -> int:
    while j < len(text) and text[j].isspace():
        j += 1
    return j


def _read_call(text: str, start: int, open_index: int) -> tuple[Call | MalformedCall, int]:
    """Parse the call whose name starts at ``start`` and whose '(' is at ``open_index``."""
    name = text[start:open_index]
    args: list[str] = []
    j = _skip_ws(text, open_index + 1)
    if j < len(text) and text[j] == ")":
        return Call(name, (), text[start : j + 1], start), j + 1
    while True:
        j = _skip_ws(text, j)
        if j >= len(text):
            return MalformedCall(text[start:], "call is not closed with ')'", start), len(text)
        if text[j] in "\"'":
            s = _read_string(text, j)
            if s is None:
                return MalformedCall(text[start:], "unterminated string", start), len(text)
            args.append(s[0])
            j = s[1]
        else:
            end = _read_bare(text, j)
            value = text[j:end].strip()
            if not value:
                return _malformed(text, start, open_index, "empty argument")
            args.append(value)
            j = end
        j = _skip_ws(text, j)
        if j >= len(text):
            return MalformedCall(text[start:], "call is not closed with ')'", start), len(text)
        if text[j] == ",":
            j = _skip_ws(text, j + 1)
            if j < len(text) and text[j] == ")":  # trailing comma: f("a",)
                return Call(name, tuple(args), text[start : j + 1], start), j + 1
            continue
        if text[j] == ")":
            return Call(name, tuple(args), text[start : j + 1], start), j + 1
        return _malformed(text, start, open_index, f"unexpected {text[j]!r} after argument {len(args)}")


def _malformed(text: str, start: int, open_index: int, reason: str) -> tuple[MalformedCall, int]:
    close = _matching_paren(text, open_index)
    if close < 0:
        nl = text.find("\n", open_index)
        close = (nl if nl >= 0 else len(text)) - 1
    return MalformedCall(text[start : close + 1], reason, start), close + 1


def scan_commands(text: str) -> CommandParse:
    """Read a Commands line into calls and malformed pieces; never raises on any input.

    Handles several calls per line (", ", newlines, "1. … # comment" lists, trailing ", None"),
    double- or single-quoted arguments with escaped quotes, unquoted arguments with nested
    parentheses, and None-like lines ("None", "None.", "Non", "None (…)"), which mean no call.
    Text between calls is ignored, as MOSS's backend did.
    """
    text = _commands_text(text)[:_MAX_COMMAND_CHARS]
    out = CommandParse()
    if _NONE_LIKE.match(text):
        out.none = True
        return out
    i = 0
    while i < len(text):
        if text[i] == "#":  # "2. Calculate(…)  # 计算…" comments run to the end of the line
            nl = text.find("\n", i)
            i = len(text) if nl < 0 else nl + 1
            continue
        m = _CALL_START.match(text, i)
        if m and (i == 0 or not (text[i - 1].isalnum() or text[i - 1] in "_.")):
            item, i = _read_call(text, i, m.end() - 1)
            (out.calls if isinstance(item, Call) else out.errors).append(item)
            continue
        i += 1
    out.none = not out.calls and not out.errors
    return out


def parse_commands(text: str) -> list[Call]:
    """The calls in a Commands line; malformed pieces are left out (``scan_commands`` reports them)."""
    return scan_commands(text).calls


def format_call(name: str, args: Sequence[str]) -> str:
    """A call as MOSS writes one, ``Search("q")``: double-quoted arguments, ``\\`` and ``\"`` escaped.

    The inverse of the parser: ``scan_commands(format_call(n, a)).calls[0]`` has name ``n`` and args ``a``.
    """
    quoted = ('"' + a.replace("\\", "\\\\").replace('"', '\\"') + '"' for a in args)
    return f"{name}({', '.join(quoted)})"


# ---------------------------------------------------------------------------------------------
# Plugins and the registry
# ---------------------------------------------------------------------------------------------

def builtin_plugins() -> dict[str, Callable[..., Plugin]]:
    """The four tools MOSS was trained on, by command name. Imported lazily (sympy is slow to import)."""
    from jmoss.plugins.calculator import CalculatorPlugin
    from jmoss.plugins.search import SearchPlugin
    from jmoss.plugins.solver import SolverPlugin
    from jmoss.plugins.text2image import Text2ImagePlugin

    return {p.name: p for p in (SearchPlugin, CalculatorPlugin, SolverPlugin, Text2ImagePlugin)}


def entry_point_plugins() -> dict[str, Callable[..., Plugin]]:
    """User plugins registered under the entry-point group ``jmoss.plugins``, by entry-point name."""
    found: dict[str, Callable[..., Plugin]] = {}
    for ep in metadata.entry_points(group=ENTRY_POINT_GROUP):
        try:
            found[ep.name] = ep.load()
        except Exception as exc:  # a broken third-party package must not take the runtime down
            raise PluginError(f"plugin entry point {ep.name!r} ({ep.value}) failed to load: {exc}") from exc
    return found


# The names the CLI documents (`--plugins calculator,solver,search,text2image`).
_ALIASES = {"calculator": "Calculate", "solver": "Solve", "search": "Search", "text2image": "Text2Image"}


def _lookup(name: str, registry: Mapping[str, Callable[..., Plugin]]) -> str | None:
    name = _ALIASES.get(name.strip().lower(), name)
    if name in registry:
        return name
    try:  # "calculator", "Web search" -> the command name
        cap = dialogue.capability_name(name)
    except DialogueError:
        cap = None
    for key, factory in registry.items():
        if key.lower() == name.lower() or (cap and getattr(factory, "capability", None) == cap):
            return key
    return None


# How a built-in plugin that needs a backend gets one, on the command line and in Python.
_CONFIGURE = {
    "search": "pass --search-docs DIR (a folder of .txt/.md files it answers from), or in Python "
              "search={'folder': DIR} or search={'url': URL} (an HTTP endpoint)",
    "text2image": "pass --text2image-cmd COMMAND (run with the description as its last argument, it prints the path "
                  "of the image it made), or in Python text2image={'command': [...]}",
}


def load_plugins(names: Iterable[str], **options: Mapping[str, Any]) -> list[Plugin]:
    """Instantiate plugins by command or capability name, built-ins first, then entry points.

    Options go per plugin under its lower-cased command name, e.g.
    ``load_plugins(["Search", "Text2Image"], search={"folder": "docs/"}, text2image={"command": [...]})``.
    A plugin that cannot run as configured (Text2Image without a backend) raises ``PluginError``
    rather than being offered to the model.
    """
    registry: dict[str, Callable[..., Plugin]] = dict(builtin_plugins())
    names = list(names)
    if any(_lookup(n, registry) is None for n in names):
        registry.update({k: v for k, v in entry_point_plugins().items() if k not in registry})
    plugins = []
    for n in names:
        key = _lookup(n, registry)
        if key is None:
            import difflib

            # named as --plugins and --help write them: calculator, solver, search, text2image, then user plugins
            by_key = {v: k for k, v in _ALIASES.items()}
            known = [by_key.get(k, k) for k in ("Calculate", "Solve", "Search", "Text2Image") if k in registry]
            known += [k for k in registry if k not in by_key]
            near = difflib.get_close_matches(n.strip().lower(), known, n=1, cutoff=0.6)
            raise PluginError(f"unknown plugin {n!r}" + (f" (did you mean {near[0]}?)" if near else "")
                              + f"; known: {', '.join(known)}")
        opts = dict(options.get(key.lower(), {}))
        try:
            plugin = registry[key](**opts)
        except PluginError:
            raise
        except Exception as exc:  # a bad option must read as a plugin problem, not a traceback
            raise PluginError(f"plugin {key!r} could not be created with options {opts}: {exc}") from exc
        if not plugin.available():
            how = _CONFIGURE.get(key.lower(), "pass its options in Python: load_plugins([...], "
                                              f"{key.lower()}={{...}})")
            shown = {v: k for k, v in _ALIASES.items()}.get(key, key)
            raise PluginError(f"plugin {shown!r} needs configuring: {how}")
        plugins.append(plugin)
    return plugins


def capability_lines(enabled: Iterable[Plugin], inner_thoughts: bool = True) -> str:
    """The switch lines for a set of plugins: MOSS's seven, then one line per user plugin.

    Plugins that are not available are not offered to the model.
    """
    std = {cap for cap, sig in dialogue.SWITCHES if sig}
    on, extra = [], []
    for p in enabled:
        if not p.available():
            continue
        if p.capability in std:
            on.append(p.capability)
        else:
            extra.append((p.capability, p.signature))
    return dialogue.switch_lines(on, inner_thoughts, extra)


# ---------------------------------------------------------------------------------------------
# Running calls and rendering results
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class CallResult:
    """What one call produced. ``ok`` False means ``error`` says why and the model sees "No result.".

    ``plugin`` is None when no enabled plugin has the call's name; such calls get no result block,
    as with MOSS's own backend (e.g. ``Count(…)`` in search_plugin_conversation_9).
    """

    call: Call
    plugin: Plugin | None
    values: tuple[str, ...] = ()
    ok: bool = True
    error: str | None = None


def _run_bounded(plugin: Plugin, args: Sequence[str], timeout: float) -> list[str]:
    box: dict[str, Any] = {}

    def target() -> None:
        try:
            box["values"] = plugin.run(args)
        except BaseException as exc:  # noqa: BLE001 - every failure becomes result text
            box["error"] = exc

    # A daemon thread bounds how long the chat waits; plugins that can hang inside a computation
    # (the sympy solver) also enforce their own hard limit by killing a worker process.
    t = threading.Thread(target=target, name=f"jmoss-plugin-{plugin.name}", daemon=True)
    t.start()
    t.join(timeout)
    if t.is_alive():
        raise TimeoutError(f"{plugin.name} took longer than {timeout:g} s")
    if "error" in box:
        raise box["error"]
    values = box.get("values")
    if isinstance(values, str):
        values = [values]
    if not isinstance(values, (list, tuple)) or not all(isinstance(v, str) for v in values):
        raise PluginError(f"{plugin.name} returned {type(values).__name__}, not a list of str")
    return list(values)


def run_calls(calls: Iterable[Call], plugins: Iterable[Plugin], timeout: float | None = None) -> list[CallResult]:
    """Run each call on the plugin of that name, in order; never raises.

    ``timeout`` (seconds) caps every call; without it each plugin's own ``timeout`` applies.
    """
    by_name = {p.name: p for p in plugins if p.available()}
    out = []
    for call in calls:
        plugin = by_name.get(call.name)
        if plugin is None:
            out.append(CallResult(call, None, (), False, f"no enabled plugin is called {call.name!r}"))
            continue
        try:
            values = _run_bounded(plugin, call.args, plugin.timeout if timeout is None else timeout)
            out.append(CallResult(call, plugin, tuple(values)))
        except Exception as exc:  # noqa: BLE001
            out.append(CallResult(call, plugin, (), False, f"{type(exc).__name__}: {exc}"))
    return out


def result_block(result: CallResult, first_item: int = 1) -> tuple[list[str], int]:
    """The result lines of one call and the next Search item number.

    Items of several Search calls are numbered on across the turn, hence ``first_item``.
    """
    style = result.plugin.style if result.plugin else LINES
    header = result.call.text
    if not result.ok:
        if style == INLINE:
            return [f"{header} => {NO_RESULT!r}"], first_item
        return [f"{header} =>", NO_RESULT], first_item
    if style == INLINE:
        value = result.values[0] if result.values else NO_RESULT
        return [f"{header} => {value!r}"], first_item
    if style == IMAGE:
        return [f"{header} => {IMAGE_SUCCESS}"], first_item
    if style == ITEMS:
        if not result.values:
            return [f"{header} =>", NO_RESULT], first_item
        lines = [f"{header} =>"]
        for k, item in enumerate(result.values, start=first_item):
            lines.append(f"<|{k}|>: {item}")
        return lines, first_item + len(result.values)
    return [f"{header} =>", *(result.values or (NO_RESULT,))], first_item


def render_results(results: Iterable[CallResult]) -> str:
    """The whole ``<|Results|>`` field for a turn's call results, in MOSS's trained shapes.

    No calls (or only calls to unknown plugins) give "<|Results|>:\\nNone\\n<eor>\\n"; a turn whose
    only results are successful images gives text2img's one-liner. Failures are rendered as
    "No result.", never as success.
    """
    shown = [r for r in results if r.plugin is not None]
    if not shown:
        return dialogue.results("None")
    if all(r.ok and r.plugin.style == IMAGE for r in shown):
        return dialogue.results_inline(IMAGE_SUCCESS)
    lines: list[str] = []
    n = 1
    for r in shown:
        block, n = result_block(r, n)
        lines.extend(block)
    return dialogue.results("\n".join(lines))
