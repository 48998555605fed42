"""The sympy solver reproduces MOSS's recorded Solve results, within a hard time bound, executing nothing."""

from __future__ import annotations

import ast
import inspect
import json
import re
import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import SHARED

from jmoss.plugins import parse_commands, render_results, run_calls, solver
from jmoss.plugins.solver import SolverPlugin, solve

REFERENCE = SHARED / "reference"
CONVERSATIONS = [json.loads(line) for line in (REFERENCE / "moss_plugin_conversations.jsonl").open(encoding="utf-8")]
BLOCK = re.compile(r"^(Solve\(.*?\)) =>\n((?:(?!(?:Solve|Search|Calculate)\(|<eor>).*\n)*)", re.M)


def recorded_solves() -> list[tuple[str, tuple[str, ...], str]]:
    """(source, call args, recorded result text) for every Solve block whose header is a real call."""
    out = []
    for record in CONVERSATIONS:
        for turn in record["chat"].values():
            for m in BLOCK.finditer(turn["Tool Responses"]):
                calls = parse_commands(m.group(1))
                if calls:
                    out.append((record["source"].rsplit("/", 1)[-1], calls[0].args, m.group(2).rstrip("\n")))
    return out


@pytest.fixture(scope="module", autouse=True)
def warm_worker():
    solver._default_worker.ensure_started()
    yield


def test_reproduces_at_least_90_percent_of_recorded_results_with_solutions():
    rows = recorded_solves()
    with_solutions = [r for r in rows if r[2] != "No result."]
    misses = [(src, args, want, solve(args[0], args[1:])) for src, args, want in with_solutions]
    misses = [m for m in misses if m[2] != m[3]]
    rate = 1 - len(misses) / len(with_solutions)
    print(f"\nsolver: {len(with_solutions) - len(misses)}/{len(with_solutions)} recorded Solve results with "
          f"solutions reproduced exactly ({rate:.1%})")
    for miss in misses:
        print("  MISS", *miss)
    # Informational: recorded 'No result.' where we do find an answer.
    for src, args, want in rows:
        if want == "No result.":
            got = solve(args[0], args[1:])
            if got != want:
                print(f"  recorded 'No result.' for {args!r} ({src}); we answer {got!r}")
    assert len(with_solutions) >= 30
    assert rate >= 0.90


@pytest.mark.parametrize(
    "equations, text",
    [
        ("x+y=90;x-y=30", "x = 60\ny = 30"),
        ("x/4=(120-x)/5", "x = 160/3"),
        ("(4/3)x - x = 64", "x = 192.000000000000"),  # 4/3 is a Python float, as in MOSS's backend
        ("(x+1)^2=25", "x_0 = -6\nx_1 = 4"),
        ("4*pi*r^2=384; r", "r_0 = -5.52790639154136\nr_1 = 5.52790639154136"),
        ("x*2x*4x=64", "x_0 = 2\nx_1 = -1 - sqrt(3)*I\nx_2 = -1 + sqrt(3)*I"),
        ("2t + 6t + t = 1, t", "t = 1/9"),
        ("l*w=72", "No result."),  # underdetermined
        ("y=2x+1;3y-6x=0", "No result."),  # inconsistent
        ("2*(x+y)=32;x*y=25", "No result."),  # several branches
        ("3x+280", "No result."),  # not an equation
        ("x+y=?", "No result."),
        ("{(x+y)-2=27,x/y=3}", "No result."),
    ],
)
def test_moss_result_format(equations, text):
    assert solve(equations) == text


def test_plugin_renders_the_solve_block():
    results = run_calls(parse_commands('Solve("x+y=48;2x+4y=140")'), [SolverPlugin()])
    assert render_results(results) == '<|Results|>:\nSolve("x+y=48;2x+4y=140") =>\nx = 26\ny = 22\n<eor>\n'


@pytest.mark.parametrize("equations", ["(x+1)^60=(2x+3)^59", "sin(x)^7+cos(x)^5=1"])
def test_a_hanging_sympy_is_killed_at_the_bound(equations):
    start = time.monotonic()
    assert solve(equations, timeout=1.0) == "No result."
    assert time.monotonic() - start < 3.0
    assert solve("6x=30") == "x = 5"  # a fresh worker takes over


def test_hostile_text_runs_nothing(tmp_path):
    marker = tmp_path / "pwned"
    for text in [f"__import__('os').system('touch {marker}')=1", f"x=open('{marker}','w')",
                 "x=().__class__.__bases__[0]", "x=lambda: 1", "x='a'*3", f"exec('open({str(marker)!r},\"w\")')=x"]:
        assert solve(text) == "No result."
    assert not marker.exists()


def test_solver_source_never_hands_text_to_eval_or_sympify():
    tree = ast.parse(inspect.getsource(solver))
    called = {
        n.func.id if isinstance(n.func, ast.Name) else n.func.attr
        for n in ast.walk(tree)
        if isinstance(n, ast.Call) and isinstance(n.func, (ast.Name, ast.Attribute))
    }
    assert not called & {"eval", "exec", "sympify", "parse_expr", "S", "__import__", "literal_eval"}


def test_oversized_requests_are_refused_without_work():
    assert solve("x+" * 400 + "1=0") == "No result."
    assert solve("x^1000=2") == "No result."


EQUATION_TOKENS = st.sampled_from(
    ["x", "y", "z", "2", "3", "0.5", "10", "pi", "sqrt", "(", ")", "+", "-", "*", "/", "^", "=", ";", ",", " ",
     "xy", "2x", "__import__", "'os'", ".", "[", "]", "lambda", "中", "sin", "log", "e", "I", "9^9^9"]
)


@settings(max_examples=120, deadline=None)
@given(st.lists(EQUATION_TOKENS, max_size=25).map("".join) | st.text(max_size=60))
def test_fuzz_no_exception_bounded_time(text):
    start = time.monotonic()
    out = solve(text, timeout=1.0)
    elapsed = time.monotonic() - start
    assert isinstance(out, str) and out
    assert out == "No result." or re.match(r"[A-Za-z_][A-Za-z0-9_]* = |[A-Za-z_][A-Za-z0-9_]*_0 = ", out)
    # 1 s of solving, plus starting a new worker if the previous example had to be killed.
    assert elapsed < 1.0 + 5.0
