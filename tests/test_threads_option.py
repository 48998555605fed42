"""How many threads the CPU kernels use: ``threads=`` in jmoss.load, ``--threads`` on every command
that computes, ``JMOSS_THREADS``, else the CPUs this process may run on; in that order."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

import jmoss
from jmoss import kernels
from jmoss.cli import main
from jmoss.engine.ops import ThreadedKernels, check_threads, uses_kernels
from jmoss.errors import JmossError
from test_engine import write_random_store

SHAPE = dict(n_embd=64, n_head=4, rotary_dim=8, n_layer=2, vocab_size=256, n_positions=32)


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> Path:
    return write_random_store(tmp_path_factory.mktemp("threads") / "store", SHAPE)


def _logits_and_threads_seen(model, monkeypatch) -> tuple[np.ndarray, set[int]]:
    """A prefill and two decode steps, and the thread counts the kernels were asked for meanwhile."""
    seen = set()
    real = kernels.cpu.decode_block

    def spy(*args, **kwargs):
        seen.add(kernels.cpu._threads())
        return real(*args, **kwargs)

    monkeypatch.setattr(kernels, "decode_block", spy)
    session = model.session(max_len=16)
    out = [session.prefill([[3, 4, 5]]), session.decode([6]), session.decode([7])]
    monkeypatch.undo()
    return np.concatenate([o.reshape(-1) for o in out]), seen


def test_load_threads_is_the_models_own_count(store, monkeypatch):
    default = jmoss.load(store, device="cpu")
    assert default.threads is None and default.ops is kernels  # the process default
    one, three = jmoss.load(store, device="cpu", threads=1), jmoss.load(store, device="cpu", threads=3)
    assert isinstance(one.ops, ThreadedKernels) and uses_kernels(one.ops) and uses_kernels(default.ops)
    want, seen_default = _logits_and_threads_seen(default, monkeypatch)
    got1, seen1 = _logits_and_threads_seen(one, monkeypatch)
    got3, seen3 = _logits_and_threads_seen(three, monkeypatch)
    assert seen1 == {1} and seen3 == {3} and seen_default == {kernels.cpu._threads()}
    assert np.array_equal(got1, want) and np.array_equal(got3, want)  # the pool: same bits on any count
    assert kernels.cpu._threads() == kernels.cpu._default_threads()  # the process default is left alone


@pytest.mark.parametrize("bad", [0, -2, 1.5, True, "2"])
def test_bad_thread_counts_are_clear_errors(store, bad):
    with pytest.raises(JmossError, match="whole number of threads"):
        check_threads(bad)
    with pytest.raises(JmossError, match="whole number of threads"):
        jmoss.load(store, device="cpu", threads=bad)


@pytest.mark.parametrize("command", ["generate", "chat", "serve", "bench", "demo"])
def test_every_computing_command_takes_threads(command):
    result = CliRunner().invoke(main, [command, "--help"])
    assert result.exit_code == 0 and "--threads" in result.output and "JMOSS_THREADS" in result.output
    args = {"generate": ["m", "p"], "chat": ["m"], "serve": ["m"], "bench": ["m"], "demo": []}[command]
    result = CliRunner().invoke(main, [command, *args, "--threads", "0"])
    assert result.exit_code == 2 and "0 is not in the range x>=1" in result.output


def test_argument_beats_environment_beats_affinity(store):
    code = ("import sys, jmoss; from jmoss import kernels\n"
            "m = jmoss.load(sys.argv[1], device='cpu', threads=int(sys.argv[2]) if sys.argv[2] != '-' else None)\n"
            "print('THREADS', m.threads or kernels.cpu._threads())")

    def threads(arg: str, env: dict[str, str]) -> int:
        full = {k: v for k, v in os.environ.items() if k not in ("JMOSS_THREADS", "OMP_NUM_THREADS")}
        proc = subprocess.run([sys.executable, "-c", code, str(store), arg], env={**full, **env}, capture_output=True,
                              text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-2000:]
        return int(next(l for l in proc.stdout.splitlines() if l.startswith("THREADS")).split()[1])

    assert threads("-", {}) == len(os.sched_getaffinity(0))
    assert threads("-", {"JMOSS_THREADS": "3"}) == 3
    assert threads("1", {"JMOSS_THREADS": "3"}) == 1


def test_info_and_bench_say_which_path_runs_and_why(store, monkeypatch):
    result = CliRunner().invoke(main, ["info", str(store), "--device", "cpu"], env={"JMOSS_THREADS": "3"})
    assert result.exit_code == 0, result.output
    line = next(l for l in result.output.splitlines() if l.startswith("CPU kernels:"))
    assert "3 threads ($JMOSS_THREADS" in line and "one fused op per layer" in line
    wide = CliRunner().invoke(main, ["info", str(store), "--device", "cpu", "--max-batch", "17"])
    assert "op by op (17 rows > FUSED_MAX_ROWS 16)" in wide.output
    model = jmoss.load(store, device="cpu")
    session = model.session(max_len=16)
    session.prefill([[3, 4]])
    kernels.cpu.reset_decode_path()
    session.decode([5])
    assert kernels.cpu.describe_decode_path() == "every layer one fused op (decode_block)"
    monkeypatch.setattr(kernels.cpu, "FUSED_MAX_ROWS", 0)
    kernels.cpu.reset_decode_path()
    session.decode([6])
    assert kernels.cpu.describe_decode_path() == "every layer op by op: 1 rows (batch x tokens) > FUSED_MAX_ROWS 0"
