"""Shared test set-up: jmoss's caches inside the checkout, and a report of measured numbers.

Tests record what they measured (parity errors, rates, speeds) with the ``report`` fixture; the
numbers are printed in pytest's terminal summary so every CI log states them.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SHARED = Path(os.environ.get("JMOSS_SHARED", ROOT.parent / "shared"))

# Never cache outside the clone/dev cache: jittor's compiled kernels and converted test models.
os.environ.setdefault("JMOSS_HOME", str(ROOT / ".cache" / "jmoss"))

_REPORT: list[str] = []


@pytest.fixture
def report(request):
    """Call ``report("text")`` to have a measured figure printed at the end of the run."""

    def add(line: str) -> None:
        _REPORT.append(f"{request.node.nodeid}: {line}")

    return add


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    if not SHARED.is_dir():
        pytest.fail(f"the shared reference folder is missing: expected {SHARED} (set JMOSS_SHARED)")
    return SHARED


def pytest_terminal_summary(terminalreporter):
    if _REPORT:
        terminalreporter.section("jmoss measurements")
        for line in _REPORT:
            terminalreporter.write_line(line)
