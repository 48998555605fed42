"""The solver's worker under hostile equations: a memory bomb meets the worker's address-space
limit (RLIMIT_AS) and ends as "No result.", the worker is replaced, the parent is untouched; a
request that runs out of time is killed and the next one is answered by a spare started before it."""

from __future__ import annotations

import os
import time

import psutil
import pytest

from jmoss.plugins import NO_RESULT, parse_commands, render_results, run_calls, solver
from jmoss.plugins.solver import DEFAULT_MEMORY_LIMIT, SolverPlugin, SolverWorker
from jmoss.errors import SolverError

# Each expands (or tries to) into millions of terms: memory, not only time.
BOMBS = ["(a+b+c+d+e+f+g+h+i+j)**64 = 1; a", "(x+y+z+w+v+u)**64*(x-y+z-w+v-u)**64 = 5; x"]


@pytest.fixture
def small_worker():
    worker = SolverWorker(memory_limit=200 << 20)
    yield worker
    worker.stop()


def test_the_default_worker_runs_under_the_memory_limit():
    solver._default_worker.ensure_started()
    proc = psutil.Process(solver._default_worker._proc.pid)
    assert proc.rlimit(psutil.RLIMIT_AS)[0] == DEFAULT_MEMORY_LIMIT
    assert solver.solve("x + 1 = 3") == "x = 2"


@pytest.mark.parametrize("bomb", BOMBS)
def test_a_memory_bomb_ends_as_an_error_and_the_worker_is_replaced(small_worker, bomb):
    parent = psutil.Process(os.getpid())
    rss = parent.memory_info().rss
    small_worker.ensure_started()
    first = small_worker._proc.pid
    with pytest.raises(SolverError, match="MemoryError|SystemError|died"):
        small_worker.solve(bomb, [], 60.0)
    assert small_worker._proc is None or small_worker._proc.poll() is not None  # not reused after running out
    assert small_worker.solve("2x = 8", [], 30.0) == "x = 4"  # a fresh worker answers
    assert small_worker._proc.pid != first
    assert parent.memory_info().rss - rss < 16 << 20  # the parent did not pay for it


def test_a_memory_bomb_through_the_plugin_is_no_result(monkeypatch):
    worker = SolverWorker(memory_limit=200 << 20)
    monkeypatch.setattr(solver, "_default_worker", worker)  # the module's solve() uses this worker
    try:
        results = run_calls(parse_commands(f'Solve("{BOMBS[0]}")'), [SolverPlugin(timeout=60.0)], timeout=120)
        assert render_results(results) == f'<|Results|>:\nSolve("{BOMBS[0]}") =>\n{NO_RESULT}\n<eor>\n'
        assert solver.solve("x^2 = 9") == "x_0 = -3\nx_1 = 3"
    finally:
        worker.stop()


SLOW = "(a+b+c)**30 = 1; a"  # tens of seconds of sympy, little memory


def _workers() -> set[int]:
    """The pids of this process's live sympy workers."""
    return {c.pid for c in psutil.Process().children() if "jmoss.plugins.solver" in " ".join(c.cmdline())
            and c.status() != psutil.STATUS_ZOMBIE}


def test_a_call_right_after_a_timed_out_one_does_not_wait_for_sympys_import(report):
    worker = SolverWorker()
    try:
        worker.ensure_started()  # the serving process and its spare
        with pytest.raises(SolverError, match="no answer within"):
            worker.solve(SLOW, [], 1.0)
        before = _workers()
        start = time.monotonic()
        assert worker.solve("2x = 8", [], 10.0) == "x = 4"
        took = time.monotonic() - start
        assert worker._proc.pid in before, "the answering process was started inside the call"
    finally:
        worker.stop()
    report(f"Solve right after a timed-out one answered in {1000 * took:.0f} ms by the spare started before it")


def test_a_plugin_starts_the_worker_before_its_first_call(monkeypatch):
    worker = SolverWorker()
    monkeypatch.setattr(solver, "_default_worker", worker)
    try:
        plugin = SolverPlugin(timeout=10.0)
        deadline = time.monotonic() + 120
        while not worker.ready:  # sympy is imported in the background while MOSS writes its command
            assert time.monotonic() < deadline, "creating the plugin started no worker"
            time.sleep(0.1)
        before = _workers()
        assert plugin.run(["x + 1 = 3"]) == ["x = 2"]
        assert worker._proc.pid in before
    finally:
        worker.stop()


def test_stop_ends_the_serving_process_and_its_spare():
    worker = SolverWorker()
    worker.ensure_started()
    serving, spare = worker._proc, worker._spare.result(1.0)
    worker.stop()
    assert serving.poll() is not None and spare.poll() is not None
