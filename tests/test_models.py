"""Models that manage themselves (issue #30, finding 2): pull, list, rm, variants side by side,
readable names for local conversions, offers to pull, and info from a Hub config alone.

The Hub is a stand-in served by this process on 127.0.0.1 (huggingface_hub honours HF_ENDPOINT):
it answers ``resolve/<revision>/<file>`` for two repos, ``org/tiny`` (a small MOSS-architecture
checkpoint with its tokenizer, built by jmoss.demo) and ``org/big`` (only MOSS's real config.json),
and records every path asked for.
"""

from __future__ import annotations

import hashlib
import http.server
import os
import shutil
import subprocess
import sys
import threading
from pathlib import Path
from typing import Iterator

import pexpect
import pytest

from jmoss.demo import build_checkpoint

SMALL = dict(n_embd=128, n_head=4, rotary_dim=8, n_layer=2, n_positions=256)
COMMIT = "0123456789abcdef0123456789abcdef01234567"


class FakeHub(http.server.BaseHTTPRequestHandler):
    repos: dict[str, Path] = {}
    asked: list[str] = []

    def _answer(self, body: bool) -> None:
        parts = self.path.split("?")[0].lstrip("/").split("/")
        self.asked.append(self.path)
        if len(parts) < 5 or parts[2] != "resolve":
            return self._error(404, "EntryNotFound")
        repo, filename = "/".join(parts[:2]), "/".join(parts[4:])
        if repo not in self.repos:
            return self._error(401, "RepoNotFound")
        file = self.repos[repo] / filename
        if not file.is_file():
            return self._error(404, "EntryNotFound")
        data = file.read_bytes()
        start = 0
        if self.headers.get("Range", "").startswith("bytes="):
            start = int(self.headers["Range"][6:].split("-")[0] or 0)
        self.send_response(206 if start else 200)
        self.send_header("X-Repo-Commit", COMMIT)
        self.send_header("ETag", f'"{hashlib.sha256(data).hexdigest()}"')
        self.send_header("Content-Length", str(len(data) - start))
        self.end_headers()
        if body:
            self.wfile.write(data[start:])

    def _error(self, status: int, code: str) -> None:
        self.send_response(status)
        self.send_header("X-Error-Code", code)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def do_HEAD(self) -> None:  # noqa: N802
        self._answer(False)

    def do_GET(self) -> None:  # noqa: N802
        self._answer(True)

    def log_message(self, *args) -> None:
        pass


@pytest.fixture(scope="module")
def hub(tmp_path_factory, shared_dir) -> Iterator[tuple[str, type]]:
    root = tmp_path_factory.mktemp("hub")
    build_checkpoint(root / "tiny", shape=SMALL)
    (root / "big").mkdir()
    shutil.copy(shared_dir / "assets/moss-moon-003-sft/config.json", root / "big" / "config.json")
    handler = type("Hub", (FakeHub,), {"repos": {"org/tiny": root / "tiny", "org/other": root / "tiny",
                                                 "org/big": root / "big"}, "asked": []})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}", handler
    server.shutdown()
    server.server_close()


@pytest.fixture(scope="module")
def env(hub, tmp_path_factory) -> dict[str, str]:
    home = tmp_path_factory.mktemp("home")
    (home / "jmoss").mkdir()
    full = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "HF_TOKEN")}
    # the compiled Jittor core is shared: only the models folder is this test's own
    jittor = Path(os.environ.get("JMOSS_HOME", Path.home() / ".cache/jmoss")) / "jittor"
    full.update(HF_ENDPOINT=hub[0], HF_HOME=str(home / "hf"), JMOSS_HOME=str(home / "jmoss"),
                JITTOR_HOME=str(jittor.resolve()), HF_HUB_DISABLE_TELEMETRY="1", HF_HUB_DISABLE_XET="1")
    return full


def jmoss_cli(env: dict, *args: str, timeout: int = 600, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "jmoss.cli", *args], capture_output=True, text=True, timeout=timeout,
                          env=env, cwd=cwd)


def test_pull_converts_with_byte_progress_and_variants_sit_side_by_side(env):
    fp16 = jmoss_cli(env, "pull", "org/tiny")
    assert fp16.returncode == 0, fp16.stderr
    assert "B/s" in fp16.stderr or "kB" in fp16.stderr or "MB" in fp16.stderr  # bytes, as they arrive
    int4 = jmoss_cli(env, "pull", "org/tiny:int4")
    assert int4.returncode == 0, int4.stderr
    models = Path(env["JMOSS_HOME"]) / "models"
    assert (models / "org--tiny" / "jmoss.json").is_file() and (models / "org--tiny--int4" / "jmoss.json").is_file()
    listed = jmoss_cli(env, "list")
    assert listed.returncode == 0, listed.stderr
    rows = {line.split()[0]: line.split() for line in listed.stdout.splitlines()[1:]}
    assert rows["org/tiny"][1] == "fp16" and rows["org/tiny:int4"][1] == "int4"
    assert rows["org/tiny"][-1] == str(models / "org--tiny") and "ok" in rows["org/tiny:int4"]
    info = jmoss_cli(env, "info", "org/tiny:int4")
    assert info.returncode == 0 and "int4" in info.stdout, info.stdout + info.stderr
    again = jmoss_cli(env, "pull", "org/tiny")  # already there: verified, not downloaded again
    assert again.returncode == 0 and "already converted" in again.stdout + again.stderr

    removed = jmoss_cli(env, "rm", "org/tiny:int4")
    assert removed.returncode == 0 and not (models / "org--tiny--int4").exists()
    assert (models / "org--tiny").is_dir()
    assert [line.split()[0] for line in jmoss_cli(env, "list").stdout.splitlines()[1:]] == ["org/tiny"]
    missing = jmoss_cli(env, "rm", "org/nothing")
    assert missing.returncode == 1 and "error: no converted model 'org/nothing'" in missing.stderr


def test_info_plans_a_hub_model_from_its_config_alone(env, hub):
    _, handler = hub
    handler.asked.clear()
    out = jmoss_cli(env, "info", "org/big", "--device", "cuda", "--device-memory", "12GiB", "--host-memory", "64GiB")
    assert out.returncode == 0, out.stderr
    assert "34 layers" in out.stdout and "streamed per token" in out.stdout
    assert {p.split("/resolve/main/")[-1] for p in handler.asked} == {"config.json"}  # no weights, no tokenizer
    packed = jmoss_cli(env, "info", "org/big:int4")
    assert packed.returncode == 0 and "4" in packed.stdout


def test_a_name_not_converted_yet_is_pulled_on_request(env):
    quiet = jmoss_cli(env, "generate", "org/other", "hi", "-n", "2")
    assert quiet.returncode == 1 and "jmoss pull org/other" in quiet.stderr and "--pull" in quiet.stderr
    pulled = jmoss_cli(env, "generate", "org/other", "hi", "-n", "2", "--greedy", "--pull")
    assert pulled.returncode == 0, pulled.stderr
    assert (Path(env["JMOSS_HOME"]) / "models" / "org--other" / "jmoss.json").is_file()


def test_chat_on_a_terminal_offers_to_pull(env):
    child = pexpect.spawn(sys.executable, ["-m", "jmoss.cli", "chat", "org/tiny:int8", "-n", "2", "--greedy"],
                          encoding="utf-8", timeout=600, env=env, dimensions=(40, 200))
    child.expect_exact("org/tiny:int8 is not converted yet. Download it from Hugging Face and convert it now")
    child.sendline("y")
    child.expect("Welcome to MOSS")
    child.sendline("/bye")
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0
    assert (Path(env["JMOSS_HOME"]) / "models" / "org--tiny--int8" / "jmoss.json").is_file()


def test_local_conversions_get_readable_names(env, tmp_path):
    first, second = tmp_path / "a" / "cg-st", tmp_path / "b" / "cg-st"
    for folder in (first, second):
        build_checkpoint(folder, shape=SMALL)
        out = jmoss_cli(env, "convert", str(folder), "--no-progress")
        assert out.returncode == 0, out.stderr
    models = Path(env["JMOSS_HOME"]) / "models"
    assert (models / "cg-st" / "jmoss.json").is_file() and (models / "cg-st-2" / "jmoss.json").is_file()
    again = jmoss_cli(env, "convert", str(first), "--no-progress")  # the same source finds its store again
    assert again.returncode == 0 and str(models / "cg-st") in again.stdout
    quant = jmoss_cli(env, "convert", str(first), "--quantize", "int4", "--no-progress")
    assert quant.returncode == 0 and str(models / "cg-st--int4") in quant.stdout  # beside the fp16 one
    info = jmoss_cli(env, "info", "cg-st")  # the name works from anywhere
    assert info.returncode == 0, info.stderr
    names = [line.split()[0] for line in jmoss_cli(env, "list").stdout.splitlines()[1:]]
    assert {"cg-st", "cg-st-2", "cg-st:int4"} <= set(names)
