"""Text-to-image plugin: ``Text2Image("description")``, off unless the user configures a backend.

MOSS's data shows one result for this tool, "<|Results|>: Image generated successfully.<eor>"
(moss-spec §4.6). That line is only rendered when a backend really produced an image file; without
a backend the plugin is not offered to the model, and any failure is rendered as "No result.".

``CommandBackend`` runs a user-given program: the description is passed as its last argument,
and the program prints the path of the image it wrote on the last line of its stdout.
"""

from __future__ import annotations

import shlex
import subprocess
from pathlib import Path
from typing import Protocol, Sequence

from jmoss.errors import PluginError
from jmoss.plugins.base import IMAGE, Plugin

DEFAULT_TIMEOUT = 120.0
MAX_DESCRIPTION_CHARS = 2000


class ImageBackend(Protocol):
    """Turns a description into an image file and returns its path; raises ``PluginError`` on failure."""

    def generate(self, description: str) -> Path: ...


class CommandBackend:
    """Runs ``command + [description]`` (no shell) and reads the image path from its last stdout line."""

    def __init__(self, command: str | Sequence[str], timeout: float = DEFAULT_TIMEOUT):
        self.command = shlex.split(command) if isinstance(command, str) else list(command)
        if not self.command:
            raise PluginError("text2image command is empty")
        self.timeout = timeout

    def generate(self, description: str) -> Path:
        """The image path; the program's exit status, output and the file itself are all checked."""
        try:
            done = subprocess.run(
                [*self.command, description],
                capture_output=True,
                text=True,
                timeout=self.timeout,
                stdin=subprocess.DEVNULL,
            )
        except subprocess.TimeoutExpired:
            raise PluginError(f"text2image command ran longer than {self.timeout:g} s") from None
        except OSError as exc:
            raise PluginError(f"text2image command {self.command[0]!r} could not run: {exc}") from exc
        if done.returncode != 0:
            raise PluginError(f"text2image command exited with {done.returncode}: {done.stderr.strip()[-300:]}")
        lines = done.stdout.strip().splitlines()
        path = Path(lines[-1].strip()) if lines else None
        if path is None or not path.is_file() or path.stat().st_size == 0:
            raise PluginError(f"text2image command did not print the path of a non-empty image file (got {lines[-1:]})")
        return path


class Text2ImagePlugin(Plugin):
    """``Text2Image(description)``. Pass ``command=`` (a ``CommandBackend``) or ``backend=``.

    The result value is the image path, for the chat front end to show; the model sees only
    "Image generated successfully.".
    """

    name = "Text2Image"
    capability = "Text-to-image"
    signature = "Text2Image(description)"
    style = IMAGE

    def __init__(
        self,
        backend: ImageBackend | None = None,
        command: str | Sequence[str] | None = None,
        timeout: float = DEFAULT_TIMEOUT,
    ):
        if backend is None and command is not None:
            backend = CommandBackend(command, timeout)
        self.backend = backend
        self.timeout = timeout + 5.0

    def available(self) -> bool:
        """Only with a backend: MOSS must never be told an image exists when none was made."""
        return self.backend is not None

    def run(self, args: Sequence[str]) -> list[str]:
        """``[image path]``; raises ``PluginError`` when there is no backend or it fails."""
        if self.backend is None:
            raise PluginError("Text2Image is not configured: pass command= or backend=")
        if len(args) != 1 or not args[0].strip():
            raise PluginError("Text2Image takes one non-empty description")
        if len(args[0]) > MAX_DESCRIPTION_CHARS:
            raise PluginError(f"description longer than {MAX_DESCRIPTION_CHARS} characters")
        return [str(self.backend.generate(args[0]))]
