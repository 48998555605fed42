"""README's commands, as a newcomer pastes them (issue #30, finding 5).

The first command (`jmoss demo`) must leave a model that the next command in the README uses, and
the Python API example must run pasted as written on that model. The demo here is the real
``run_demo`` at a small shape (the README's own demo is the same code at a larger one), in a
JMOSS_HOME of the test's own that shares the compiled Jittor.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"
SMALL = dict(n_embd=128, n_head=4, rotary_dim=8, n_layer=2, n_positions=512)


def blocks(kind: str) -> list[str]:
    return re.findall(rf"```{kind}\n(.*?)```", README.read_text(encoding="utf-8"), flags=re.S)


def test_the_first_command_leaves_the_model_the_next_command_uses():
    first, *_ = blocks("bash")
    lines = [line for line in first.splitlines() if line.strip()]
    assert lines[0].endswith("&& jmoss demo"), lines
    assert lines[1].split()[:3] == ["jmoss", "chat", "demo"]  # `demo` is the name the demo's store gets
    from jmoss.demo import DEMO_NAME

    assert DEMO_NAME == "demo"


def test_the_python_example_runs_pasted_as_written(tmp_path):
    home = tmp_path / "home"
    home.mkdir()
    jittor = Path(os.environ.get("JMOSS_HOME", Path.home() / ".cache/jmoss")) / "jittor"
    env = {**os.environ, "JMOSS_HOME": str(home), "JITTOR_HOME": str(jittor.resolve())}
    make_demo = ("from jmoss.demo import run_demo\n"
                 f"run_demo(None, max_new_tokens=2, echo=lambda s: None, write=lambda s: None, shape={SMALL!r})\n")
    made = subprocess.run([sys.executable, "-c", make_demo], capture_output=True, text=True, timeout=900, env=env)
    assert made.returncode == 0, made.stderr[-3000:]
    example = next(b for b in blocks("python") if b.startswith("import jmoss"))
    ran = subprocess.run([sys.executable, "-c", example], capture_output=True, text=True, timeout=900, env=env)
    assert ran.returncode == 0, ran.stderr[-3000:]
    assert "Traceback" not in ran.stderr
