"""`jmoss convert ORG/NAME` says which of three things went wrong: no network, offline and not cached, no such repo.

Every network in these tests is loopback: an unreachable port (127.0.0.1:9, the discard port, closed
here) or a tiny Hub stand-in served by this process on 127.0.0.1.
"""

from __future__ import annotations

import http.server
import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest


def convert_cli(tmp_path: Path, repo: str, timeout: int = 180, **env: str) -> subprocess.CompletedProcess:
    full = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "HF_ENDPOINT", "HF_TOKEN")}
    full.update(HF_HOME=str(tmp_path / "hf"), JMOSS_HOME=str(tmp_path / "home"), HF_HUB_DISABLE_TELEMETRY="1", **env)
    return subprocess.run([sys.executable, "-m", "jmoss.cli", "convert", repo, "--no-progress"],
                          capture_output=True, text=True, timeout=timeout, env=full)


def error_line(run: subprocess.CompletedProcess) -> str:
    assert run.returncode == 1 and "Traceback" not in run.stderr, run.stderr
    lines = [line for line in run.stderr.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1, run.stderr
    return lines[0]


def test_offline_mode_and_not_cached(tmp_path: Path) -> None:
    line = error_line(convert_cli(tmp_path, "fnlp/moss-tiny", HF_HUB_OFFLINE="1"))
    assert "HF_HUB_OFFLINE is set and config.json of fnlp/moss-tiny is not in the Hugging Face cache" in line
    assert str(tmp_path / "hf" / "hub") in line and "unset HF_HUB_OFFLINE" in line
    assert "could not reach" not in line and "no Hugging Face repo" not in line


def test_an_unreachable_hub_says_it_could_not_reach_it(tmp_path: Path) -> None:
    # huggingface_hub retries a refused connection 5 times (about 25 s) before giving up
    line = error_line(convert_cli(tmp_path, "fnlp/moss-tiny", HF_ENDPOINT="http://127.0.0.1:9"))
    assert "could not reach the Hugging Face Hub (http://127.0.0.1:9) to download config.json of fnlp/moss-tiny" in line
    assert "Connection refused" in line and "check the network" in line and "HF_HOME" in line
    assert "not found" not in line and "no Hugging Face repo" not in line


class _Hub(http.server.BaseHTTPRequestHandler):
    """Answers every request as the Hub does for a repo that does not exist, or a file it lacks."""

    error_code = "RepoNotFound"

    def _answer(self) -> None:
        self.send_response(404 if self.error_code != "RepoNotFound" else 401)
        self.send_header("X-Error-Code", self.error_code)
        self.send_header("X-Error-Message", "Repository not found" if self.error_code == "RepoNotFound" else "Entry not found")
        self.send_header("Content-Length", "0")
        self.end_headers()

    do_HEAD = do_GET = _answer

    def log_message(self, *args) -> None:
        pass


@pytest.mark.parametrize("error_code", ["RepoNotFound", "EntryNotFound"])
def test_a_hub_that_answers_no_such_repo_or_file(tmp_path: Path, error_code: str) -> None:
    handler = type("Hub", (_Hub,), {"error_code": error_code})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        endpoint = f"http://127.0.0.1:{server.server_address[1]}"
        line = error_line(convert_cli(tmp_path, "nobody/nothing", timeout=120, HF_ENDPOINT=endpoint))
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)
    if error_code == "RepoNotFound":
        assert "no Hugging Face repo 'nobody/nothing'" in line
    else:
        assert "nobody/nothing has no config.json on the Hugging Face Hub" in line
    assert "could not reach" not in line and "HF_HUB_OFFLINE is set" not in line
