"""Equation-solver plugin: ``Solve("x+y=500;5x+8y=4000")`` with sympy, in MOSS's result format.

What the SFT data tells about MOSS's backend (moss-spec §4.6, and the 54 recorded Solve results):

- equations are separated by ";" or ","; a piece that is a bare name ("…; r") names the unknown;
  a piece without "=" that is not a name makes the request fail ("3x+280" -> No result.);
- "3x", "(4/3)x", ")(" are implicit products; "^" is power; "xy" is one unknown, not x*y;
- arithmetic follows Python with sympy symbols: 4/3 is the float 1.333…, so "(4/3)x - x = 64"
  answers "x = 192.000000000000", while "x/4" stays exact ("x = 160/3"); pi is math.pi;
- one equation gives a list of roots: "x = 5", or "x_0 = -6\\nx_1 = 4" for several;
- several equations give one line per unknown, "x = 19\\ny = 11", only when the solution is unique;
  underdetermined, inconsistent or multi-branch systems give "No result.";
- values print as sympy prints them: 160/3, 130.000000000000, -sqrt(15), -1 - sqrt(3)*I.

The text is never passed to ``sympify``/``parse_expr`` (they call ``eval``): it is parsed with
``ast`` and rebuilt from a whitelist, as in the calculator. sympy can take unbounded time and memory, so all
work happens in a worker process that runs under an address-space limit (RLIMIT_AS) and is killed
when a request runs past its time limit. Importing sympy takes seconds, so a spare process is kept
started and the plugin starts the first one when it is created: no call pays for the import.
"""

from __future__ import annotations

import ast
import atexit
import json
import math
import os
import re
import select
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, Sequence

from jmoss.errors import SolverError
from jmoss.plugins.base import LINES, NO_RESULT, Plugin

MAX_REQUEST_CHARS = 500
MAX_EQUATIONS = 12
MAX_NODES = 300
MAX_SYMBOLIC_EXPONENT = 64
DEFAULT_TIMEOUT = 5.0
DEFAULT_MEMORY_LIMIT = 1 << 30  # address space of the worker (RLIMIT_AS); sympy itself needs ~100 MB
STARTUP_TIMEOUT = 60.0  # importing sympy in a fresh process; paid once per worker

_TOKEN = re.compile(r"\s+|\d+(?:\.\d*)?(?:[eE][+-]?\d+)?|\.\d+|[A-Za-z_][A-Za-z0-9_]*|\*\*|.", re.S)
_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")


def _implicit_products(text: str) -> str:
    """Insert '*' where MOSS writes products by juxtaposition: 3x, 2.5y, (4/3)x, 3(x+1), )(."""
    out: list[str] = []
    prev = ""
    for m in _TOKEN.finditer(text):
        tok = m.group(0)
        if tok.isspace():
            out.append(tok)
            prev = ""
            continue
        prev_is_value = bool(prev) and (prev[0].isdigit() or prev[0] == "." or prev == ")")
        starts_value = tok[0].isalpha() or tok[0] == "_" or tok[0].isdigit() or tok == "("
        if prev_is_value and starts_value and not (prev[0].isdigit() and tok[0].isdigit()):
            out.append("*")
        out.append(tok)
        prev = tok
    return "".join(out)


def _split_top_level(text: str) -> list[str]:
    """Split on ';' and ',' outside parentheses (so "log(x, 2)" stays whole)."""
    parts, depth, cur = [], 0, []
    for c in text:
        if c in "([{":
            depth += 1
        elif c in ")]}":
            depth -= 1
        if c in ";," and depth == 0:
            parts.append("".join(cur))
            cur = []
        else:
            cur.append(c)
    parts.append("".join(cur))
    return parts


class _Builder:
    """Rebuilds a parsed expression from numbers, symbols and whitelisted functions only."""

    def __init__(self, sympy: Any, deadline: float):
        self.sp = sympy
        self.deadline = deadline
        self.nodes = 0
        self.functions = {
            "sqrt": (math.sqrt, sympy.sqrt),
            "exp": (math.exp, sympy.exp),
            "log": (math.log, sympy.log),
            "sin": (math.sin, sympy.sin),
            "cos": (math.cos, sympy.cos),
            "tan": (math.tan, sympy.tan),
            "abs": (abs, sympy.Abs),
        }

    def build(self, node: ast.AST) -> Any:
        self.nodes += 1
        if self.nodes > MAX_NODES:
            raise SolverError(f"equations have more than {MAX_NODES} parts")
        if time.monotonic() > self.deadline:
            raise SolverError("timed out while reading the equations")
        if isinstance(node, ast.Expression):
            return self.build(node.body)
        if isinstance(node, ast.Constant) and type(node.value) in (int, float):
            if isinstance(node.value, int) and node.value.bit_length() > 2000:
                raise SolverError("number too large")
            return node.value
        if isinstance(node, ast.Name):
            if node.id == "pi":
                return math.pi
            if node.id == "e":
                return math.e
            return self.sp.Symbol(node.id)
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.UAdd, ast.USub)):
            v = self.build(node.operand)
            return v if isinstance(node.op, ast.UAdd) else -v
        if isinstance(node, ast.BinOp) and isinstance(node.op, (ast.Add, ast.Sub, ast.Mult, ast.Div, ast.Pow)):
            a, b = self.build(node.left), self.build(node.right)
            if isinstance(node.op, ast.Add):
                return a + b
            if isinstance(node.op, ast.Sub):
                return a - b
            if isinstance(node.op, ast.Mult):
                return a * b
            if isinstance(node.op, ast.Div):
                return a / b
            return self._power(a, b)
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and len(node.args) == 1 and not node.keywords:
            fns = self.functions.get(node.func.id)
            if fns is None:
                raise SolverError(f"unknown function {node.func.id!r}")
            arg = self.build(node.args[0])
            # Python numbers go through math (as MOSS's backend did), symbolic ones through sympy.
            return fns[0](arg) if isinstance(arg, (int, float)) else fns[1](arg)
        raise SolverError(f"{type(node).__name__} is not allowed in an equation")

    def _power(self, a: Any, b: Any) -> Any:
        if isinstance(a, (int, float)) and isinstance(b, (int, float)):
            big = isinstance(a, int) and isinstance(b, int) and b > 0 and abs(a) > 1
            if big and (abs(a).bit_length() - 1) * b > 2000:  # size before computing, as in the calculator
                raise SolverError("number too large")
            result = a**b
            if isinstance(result, complex):
                raise SolverError("complex power")
            return result
        if not isinstance(b, (int, float)) or abs(b) > MAX_SYMBOLIC_EXPONENT:
            raise SolverError(f"exponents must be numbers no larger than {MAX_SYMBOLIC_EXPONENT}")
        return a**b


def _to_sympy(sympy: Any, value: Any) -> Any:
    # Python numbers from the builder become sympy numbers; text never reaches sympy's parser.
    if isinstance(value, int):
        return sympy.Integer(value)
    if isinstance(value, float):
        return sympy.Float(value)
    return value


def _parse_request(sympy: Any, equations: str, targets: Sequence[str], deadline: float) -> tuple[list, list]:
    text = _implicit_products(equations.replace("^", "**"))
    eqs, names = [], [t.strip() for t in targets]
    for piece in _split_top_level(text):
        piece = piece.strip()
        if not piece:
            continue
        if _NAME.match(piece) and piece not in ("pi", "e"):
            names.append(piece)
            continue
        sides = piece.replace("==", "=").split("=")
        if len(sides) != 2:
            raise SolverError(f"{piece!r} is not an equation 'left = right'")
        try:
            lhs, rhs = (ast.parse(s.strip(), mode="eval") for s in sides)
        except (SyntaxError, ValueError, MemoryError, RecursionError) as exc:
            raise SolverError(f"cannot read {piece!r}: {type(exc).__name__}") from None
        b = _Builder(sympy, deadline)
        eqs.append(_to_sympy(sympy, b.build(lhs)) - _to_sympy(sympy, b.build(rhs)))
    if not eqs:
        raise SolverError("no equation")
    if len(eqs) > MAX_EQUATIONS:
        raise SolverError(f"more than {MAX_EQUATIONS} equations")
    if any(not _NAME.match(n) for n in names):
        raise SolverError("unknowns must be names")
    return eqs, [sympy.Symbol(n) for n in names]


def _format(sympy: Any, eqs: list, symbols: list) -> str:
    """Solve and print like MOSS's backend; anything but a definite answer is 'No result.'."""
    if len(eqs) == 1 and len(symbols) <= 1:
        eq = eqs[0]
        free = eq.free_symbols
        if not symbols and len(free) != 1:
            return NO_RESULT
        sym = symbols[0] if symbols else next(iter(free))
        roots = sympy.solve(eq, sym)
        if not isinstance(roots, list) or not roots or any(isinstance(r, (dict, tuple)) for r in roots):
            return NO_RESULT
        if len(roots) == 1:
            return f"{sym} = {roots[0]}"
        return "\n".join(f"{sym}_{i} = {r}" for i, r in enumerate(roots))
    sol = sympy.solve(eqs, *symbols, dict=False)
    if not isinstance(sol, dict) or not sol:
        return NO_RESULT
    if any(getattr(v, "free_symbols", None) for v in sol.values()):
        return NO_RESULT  # underdetermined: values still depend on other unknowns
    return "\n".join(f"{k} = {sol[k]}" for k in sorted(sol, key=sympy.default_sort_key))


def solve_now(equations: str, targets: Sequence[str] = (), timeout: float = DEFAULT_TIMEOUT) -> str:
    """Solve in this process, with no hard time limit; the worker calls this. Raises ``SolverError``."""
    import sympy

    if len(equations) > MAX_REQUEST_CHARS:
        raise SolverError(f"request longer than {MAX_REQUEST_CHARS} characters")
    deadline = time.monotonic() + timeout
    eqs, symbols = _parse_request(sympy, equations, targets, deadline)
    return _format(sympy, eqs, symbols)


def _serve(stdin: Any, stdout: Any) -> None:
    """Worker loop: one JSON request per line in, one JSON answer per line out."""
    import sympy  # noqa: F401 - pay the import before saying ready

    stdout.write("ready\n")
    stdout.flush()
    for line in stdin:
        try:
            equations, targets, timeout = json.loads(line)
            answer = {"ok": solve_now(equations, targets, timeout)}
        except Exception as exc:  # noqa: BLE001 - every failure is an answer
            answer = {"error": f"{type(exc).__name__}: {exc}"}
        stdout.write(json.dumps(answer) + "\n")
        stdout.flush()


def _read_line(proc: subprocess.Popen, timeout: float) -> str | None:
    """One line from the worker, or None if it says nothing within ``timeout`` (or has closed)."""
    assert proc.stdout is not None
    ready, _, _ = select.select([proc.stdout], [], [], timeout)
    if not ready:
        return None
    line = proc.stdout.readline()
    return line.rstrip("\n") if line else None


def _kill(proc: subprocess.Popen) -> None:
    proc.kill()
    proc.wait(5)
    for stream in (proc.stdin, proc.stdout):
        if stream is not None:
            stream.close()


class _Launch:
    """One worker process being started in a background thread, until it says "ready"."""

    def __init__(self, argv: list[str], env: dict[str, str]) -> None:
        self._lock = threading.Lock()
        self._done = threading.Event()
        self._proc: subprocess.Popen | None = None
        self._error = ""
        self._cancelled = False
        threading.Thread(target=self._run, args=(argv, env), daemon=True, name="jmoss-solver-start").start()

    def _run(self, argv: list[str], env: dict[str, str]) -> None:
        try:
            proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                                    text=True, env=env)
        except OSError as exc:
            self._error = f"the sympy worker could not be started: {exc}"
            self._done.set()
            return
        ready = _read_line(proc, STARTUP_TIMEOUT) == "ready"
        with self._lock:
            if ready and not self._cancelled:
                self._proc = proc
            else:
                exited = proc.poll()
                _kill(proc)
                self._error = (f"the sympy worker exited with code {exited} while starting (is sympy installed?)"
                               if exited is not None else f"the sympy worker did not start within {STARTUP_TIMEOUT:g} s")
            self._done.set()

    def result(self, timeout: float) -> subprocess.Popen:
        """The ready process; raises ``SolverError`` if it failed or is not ready within ``timeout``."""
        if not self._done.wait(timeout):
            self.cancel()
            raise SolverError(f"the sympy worker did not start within {timeout:g} s")
        if self._proc is None:
            raise SolverError(self._error)
        return self._proc

    @property
    def ready(self) -> bool:
        return self._done.is_set() and self._proc is not None

    def cancel(self) -> None:
        with self._lock:
            self._cancelled = True
            if self._proc is not None:
                _kill(self._proc)
                self._proc = None


class SolverWorker:
    """A sympy process reused across requests, killed when one runs too long, with a spare ready.

    It is a plain ``python -m jmoss.plugins.solver`` child speaking JSON lines, not a
    multiprocessing child, so the user's main script is never re-imported in it. Importing sympy
    takes seconds (6-11 s on a loaded machine), so no request waits for it if it can be helped:
    :meth:`prestart` starts a process in the background (a plugin calls it when it is created),
    and once a process serves requests a spare is started beside it. A request that runs past its
    time limit (or out of memory) kills its process; the next request is answered by the spare,
    and a new spare starts in the background. The spare costs one idle process (~80 MB).
    """

    def __init__(self, memory_limit: int | None = DEFAULT_MEMORY_LIMIT) -> None:
        self._lock = threading.Lock()  # one request at a time
        self._slot = threading.Lock()  # guards _spare, which prestart touches from any thread
        self._proc: subprocess.Popen | None = None  # the process that answers requests
        self._spare: _Launch | None = None
        self.memory_limit = memory_limit  # None: no limit beyond the time limit

    def _launch(self) -> _Launch:
        env = dict(os.environ)
        root = str(Path(__file__).resolve().parents[2])  # so a source checkout works uninstalled
        env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
        argv = [sys.executable, "-m", "jmoss.plugins.solver", *([str(self.memory_limit)] if self.memory_limit else [])]
        return _Launch(argv, env)

    def prestart(self) -> None:
        """Start a process in the background (returns at once) unless one is running or starting."""
        with self._slot:
            if self._spare is None and (self._proc is None or self._proc.poll() is not None):
                self._spare = self._launch()

    @property
    def ready(self) -> bool:
        """Whether a request now would be answered without waiting for a process to start."""
        with self._slot:
            spare = self._spare
        return (self._proc is not None and self._proc.poll() is None) or (spare is not None and spare.ready)

    def _take_spare(self) -> subprocess.Popen:
        """Make the spare (started now if there is none) the serving process; start a new spare."""
        with self._slot:
            launch = self._spare or self._launch()
            self._spare = None
        try:
            proc = launch.result(STARTUP_TIMEOUT)
        finally:
            with self._slot:
                if self._spare is None:
                    self._spare = self._launch()
        return proc

    def stop(self) -> None:
        """Kill the worker process and its spare, if any."""
        with self._slot:
            spare, self._spare = self._spare, None
        if spare is not None:
            spare.cancel()
        self._stop_serving()

    def _stop_serving(self) -> None:
        if self._proc is not None:
            _kill(self._proc)
        self._proc = None

    def _ensure_started(self) -> None:
        if self._proc is None or self._proc.poll() is not None:
            self._stop_serving()
            self._proc = self._take_spare()

    def ensure_started(self, spare: bool = True) -> None:
        """Start the worker now and wait until it (and, with ``spare``, its spare) is ready."""
        with self._lock:
            self._ensure_started()
        with self._slot:
            launch = self._spare
        if spare and launch is not None:
            launch.result(STARTUP_TIMEOUT)

    def solve(self, equations: str, targets: Sequence[str], timeout: float) -> str:
        """The answer text; raises ``SolverError`` (with the reason) for failures and time-outs."""
        with self._lock:
            self._ensure_started()
            assert self._proc is not None and self._proc.stdin is not None
            try:
                self._proc.stdin.write(json.dumps([equations, list(targets), timeout]) + "\n")
                self._proc.stdin.flush()
                line = _read_line(self._proc, timeout)
            except (OSError, ValueError) as exc:
                self._stop_serving()
                raise SolverError(f"the sympy worker failed: {exc}") from None
            if line is None:
                died = self._proc.poll() is not None  # e.g. killed for memory outside Python's reach
                self._stop_serving()  # still computing (or dead): kill it, the spare takes the next request
                raise SolverError("the sympy worker died (out of memory?)" if died else f"no answer within {timeout:g} s")
            answer = json.loads(line)
            if answer.get("error", "").startswith(("MemoryError", "SystemError")):  # sympy's C parts wrap it
                self._stop_serving()  # a fresh process rather than one whose heap ran out mid-computation
        if "error" in answer:
            raise SolverError(answer["error"])
        return answer["ok"]


_default_worker = SolverWorker()
atexit.register(_default_worker.stop)


def solve(equations: str, targets: Sequence[str] = (), timeout: float = DEFAULT_TIMEOUT) -> str:
    """MOSS's result text for ``Solve(equations)``: "x = 19\\ny = 11", "x_0 = -6\\nx_1 = 4" or "No result.".

    Never raises. ``timeout`` bounds the solving itself; a call that finds no worker process ready
    (the first one, unless ``SolverPlugin`` pre-started it) waits for one (up to ``STARTUP_TIMEOUT``).
    """
    if not isinstance(equations, str) or len(equations) > MAX_REQUEST_CHARS:
        return NO_RESULT
    try:
        return _default_worker.solve(equations, targets, timeout)
    except SolverError:
        return NO_RESULT
    except Exception:  # noqa: BLE001
        return NO_RESULT


class SolverPlugin(Plugin):
    """``Solve(equation)``; rendered as ``Solve("…") =>`` and one line per unknown."""

    name = "Solve"
    capability = "Equation solver"
    signature = "Solve(equation)"
    style = LINES

    def __init__(self, timeout: float = DEFAULT_TIMEOUT):
        self._solve_timeout = timeout
        self.timeout = timeout + STARTUP_TIMEOUT
        _default_worker.prestart()  # sympy's import is paid now, in the background, not by MOSS's first call

    def run(self, args: Sequence[str]) -> list[str]:
        """Result lines; extra arguments name the unknowns (``Solve("…", "x")``)."""
        if not args:
            return [NO_RESULT]
        return solve(args[0], args[1:], self._solve_timeout).split("\n")


def _limit_memory(limit: int) -> None:
    """Cap this process's address space: a request that expands without bound gets a MemoryError
    (answered as an error, so "No result.") long before it could take the machine's memory."""
    import resource

    _, hard = resource.getrlimit(resource.RLIMIT_AS)
    if hard != resource.RLIM_INFINITY:
        limit = min(limit, hard)
    resource.setrlimit(resource.RLIMIT_AS, (limit, hard if hard != resource.RLIM_INFINITY else limit))


if __name__ == "__main__":
    if len(sys.argv) > 1:
        _limit_memory(int(sys.argv[1]))
    _serve(sys.stdin, sys.stdout)
