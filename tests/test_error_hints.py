"""Errors that point the right way (issue #30, finding 4): each message names what to do, and
what it names works. Everything runs offline (an unreachable Hub is a closed loopback port)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from jmoss.demo import build_checkpoint

SMALL = dict(n_embd=128, n_head=4, rotary_dim=8, n_layer=2, n_positions=256)


def cli(*args: str, cwd: Path | None = None, timeout: int = 300, **env: str) -> subprocess.CompletedProcess:
    full = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "HF_ENDPOINT", "HF_TOKEN")}
    full.update(env)
    return subprocess.run([sys.executable, "-m", "jmoss.cli", *args], capture_output=True, text=True,
                          timeout=timeout, env=full, cwd=cwd)


def one_error(run: subprocess.CompletedProcess) -> str:
    assert run.returncode == 1 and "Traceback" not in run.stderr, run.stderr
    lines = [line for line in run.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), run.stderr
    return lines[0]


def test_a_mistyped_local_folder_is_not_tried_as_a_hub_id(tmp_path):
    (tmp_path / "ckpt" / "cg-st").mkdir(parents=True)
    line = one_error(cli("convert", "ckpt/cg-stt", "--no-progress", cwd=tmp_path, HF_ENDPOINT="http://127.0.0.1:9",
                         HF_HOME=str(tmp_path / "hf")))
    assert "no folder ckpt/cg-stt" in line and "did you mean ckpt/cg-st?" in line and "hf.co/ckpt/cg-stt" in line


def test_an_unreachable_hub_is_said_at_once_without_retry_lines(tmp_path):
    run = cli("convert", "fnlp/moss-tiny", "--no-progress", HF_ENDPOINT="http://127.0.0.1:9",
              HF_HOME=str(tmp_path / "hf"))
    line = one_error(run)  # huggingface_hub alone prints six "Retrying in Ns" lines over ~25 s first
    assert "could not reach the Hugging Face Hub" in line and "Retrying" not in run.stderr


def test_verify_on_a_converted_checkpoint_folder_names_its_store(tmp_path):
    source = tmp_path / "ckpt"
    build_checkpoint(source, shape=SMALL)
    home = {"JMOSS_HOME": str(tmp_path / "home")}
    assert cli("convert", str(source), "--no-progress", **home).returncode == 0
    line = one_error(cli("verify", str(source), **home))
    store = tmp_path / "home" / "models" / "ckpt"
    assert "is a checkpoint folder, not a jmoss store" in line and f"jmoss verify {store}" in line
    assert cli("verify", str(store), **home).returncode == 0  # what it names works
    fresh = tmp_path / "fresh"
    build_checkpoint(fresh, shape=SMALL)
    assert f"convert it first: `jmoss convert {fresh}`" in one_error(cli("verify", str(fresh), **home))


def test_the_repair_hint_is_said_once(tmp_path):
    store = tmp_path / "store"
    source = tmp_path / "ckpt"
    build_checkpoint(source, shape=SMALL)
    assert cli("convert", str(source), "--out", str(store), "--no-progress").returncode == 0
    layer = store / "layer_001.safetensors"
    data = bytearray(layer.read_bytes())
    data[-1] ^= 0xFF
    layer.write_bytes(bytes(data))
    bad = cli("verify", str(store))
    assert bad.returncode == 1 and bad.stderr.count("to repair it") == 1, bad.stderr
    assert f"Run `jmoss convert {source} --out {store}` to repair it" in bad.stderr


def test_a_checkpoint_without_tokenizer_files_warns_at_conversion_and_says_why_at_use(tmp_path):
    source = tmp_path / "ckpt"
    build_checkpoint(source, shape=SMALL)
    for name in ("vocab.json", "merges.txt", "added_tokens.json", "special_tokens_map.json", "tokenizer_config.json"):
        (source / name).unlink()
    out = cli("convert", str(source), "--out", str(tmp_path / "store"), "--no-progress")
    assert out.returncode == 0 and "jmoss: warning:" in out.stderr and "no tokenizer files" in out.stderr
    assert f"copy them into {source}" in out.stderr
    import jmoss
    from jmoss.errors import TokenizerError

    model = jmoss.load(tmp_path / "store", device="cpu")
    with pytest.raises(TokenizerError, match="the checkpoint it was converted from had none"):
        model.tokenizer


def test_a_budget_below_the_minimum_suggests_flags_that_exist(shared_dir):
    out = cli("info", str(shared_dir / "assets/moss-moon-003-sft/config.json"), "--device", "cuda",
              "--device-memory", "100MB")
    line = one_error(out)
    assert "prefetch_depth" not in line and "--ctx-size" in line and "--device-memory" in line


def test_a_busy_port_fails_before_loading_and_before_saying_it_serves(tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        run = cli("serve", str(tmp_path / "never-loaded"), "--port", str(port), timeout=120)
    line = one_error(run)  # not "does not exist": the port is checked before the model is even looked for
    assert f"port {port} on 127.0.0.1 is already in use" in line and "--port" in line
    assert "serving" not in run.stderr and "startup complete" not in run.stderr


@pytest.mark.parametrize("plugins, expected", [
    ("search", "pass --search-docs DIR"),
    ("text2image", "pass --text2image-cmd COMMAND"),
    ("calculater", "unknown plugin 'calculater' (did you mean calculator?); known: calculator, solver, search, "
                   "text2image"),
])
def test_plugin_errors_name_the_flags_the_help_lists(plugins, expected):
    from jmoss.errors import PluginError
    from jmoss.plugins import load_plugins

    with pytest.raises(PluginError) as caught:
        load_plugins([plugins])
    assert expected in str(caught.value) and "documentation" not in str(caught.value)
    shown = cli("chat", "--help").stdout
    assert "calculator,solver,search,text2image" in shown and "--search-docs" in shown and "--text2image-cmd" in shown


def test_doctor_on_a_cpu_only_machine_is_short_and_aligned(monkeypatch):
    from jmoss import doctor

    monkeypatch.setattr(doctor, "cuda_device_count", lambda: 0)
    lines = doctor.report()
    labels = [label for label, _ in lines]
    assert not any("CUDA 13" in label or label.startswith("download:") for label in labels), labels
    assert dict(lines)["device auto"] == "cpu" and "jmoss runs on the CPU" in dict(lines)["GPU"]
    assert len(lines) <= 10
    shown = cli("doctor").stdout.splitlines()
    assert len({line.index(": ") for line in shown}) == 1, shown  # one column of labels
