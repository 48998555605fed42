"""What a plugin is: the ``Plugin`` base class and the result shapes, importing nothing of jmoss.

The built-in plugins (calculator, search, solver, text2image) and user plugins subclass
``Plugin``; the package (``jmoss.plugins``) parses commands, keeps the registry and runs calls.
Keeping the base here lets the registry import the built-ins without an import cycle.
"""

from __future__ import annotations

from typing import ClassVar, Sequence

NO_RESULT = "No result."
INLINE, LINES, ITEMS, IMAGE = "inline", "lines", "items", "image"


class Plugin:
    """A tool MOSS can call.

    Subclasses set ``name`` (the command MOSS writes, e.g. "Calculate"), ``capability`` (the
    switch-line name, e.g. "Calculator"), ``signature`` (e.g. "Calculate(expression)") and
    ``style``, the result shape: INLINE ``=> 'v'``, LINES (header + lines), ITEMS (header +
    ``<|n|>:`` items), IMAGE (the one-line success). ``run`` returns the result values or raises
    ``PluginError`` with a reason; ``run_calls`` turns any failure into a result, never an error.
    """

    name: ClassVar[str] = ""
    capability: ClassVar[str] = ""
    signature: ClassVar[str] = ""
    style: ClassVar[str] = LINES
    timeout: float = 10.0

    def available(self) -> bool:
        """Whether the plugin can run at all (Text2Image is not without a configured backend)."""
        return True

    def run(self, args: Sequence[str]) -> list[str]:
        """Result values for one call's arguments."""
        raise NotImplementedError
