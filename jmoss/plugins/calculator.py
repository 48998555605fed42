"""Calculator plugin: ``Calculate("expr")`` evaluated the way MOSS's training backend did, but safely.

The SFT data shows what MOSS learned to read (moss-spec §4.6): Python float semantics with ``^``
meaning power, ``/`` true division, ints kept as ints ('3100', '10000000000000000'), floats as
Python's shortest repr ('270.0', '4.300000000000001'), ``math`` functions in radians ('45.9487903248424'
for ``1/2*9*12*sin(45)``), ``p=…;expr`` assignments, and 'No result.' for everything else
(unknown names, ``7!``, comparisons, units).

Nothing is ever executed: the text is parsed with ``ast`` and walked by a small interpreter that
accepts only numbers, arithmetic operators, a fixed table of ``math`` functions and constants, and
names assigned earlier in the same expression. Input size, integer size, exponents and wall time
are bounded, so any input returns promptly.
"""

from __future__ import annotations

import ast
import math
import re
import time
from typing import Callable, Sequence

from jmoss.errors import CalculationError
from jmoss.plugins import INLINE, NO_RESULT, Plugin

MAX_EXPRESSION_CHARS = 1000
MAX_NODES = 400
MAX_INT_BITS = 10_000  # ~3000 digits: well under Python's 4300-digit str() limit
MAX_FACTORIAL = 1000
DEFAULT_TIMEOUT = 1.0

Number = int | float


def _factorial(n: Number) -> int:
    if isinstance(n, float):
        if not n.is_integer():
            raise CalculationError("factorial() needs a whole number")
        n = int(n)
    if not 0 <= n <= MAX_FACTORIAL:
        raise CalculationError(f"factorial() is limited to 0..{MAX_FACTORIAL}")
    return math.factorial(n)


def _round(x: Number, ndigits: Number | None = None) -> Number:
    if ndigits is None:
        return round(x)
    if not isinstance(ndigits, int) or abs(ndigits) > 400:
        raise CalculationError("round() needs an integer number of digits")
    return round(x, ndigits)


def _log(x: Number, base: Number | None = None) -> float:
    return math.log(x) if base is None else math.log(x, base)


# Python's math module as MOSS's backend exposed it (no "ln": MOSS saw 'No result.' for unknown names).
FUNCTIONS: dict[str, tuple[Callable[..., Number], int, int]] = {  # name: (function, min args, max args)
    "sqrt": (math.sqrt, 1, 1),
    "exp": (math.exp, 1, 1),
    "log": (_log, 1, 2),
    "log10": (math.log10, 1, 1),
    "log2": (math.log2, 1, 1),
    "sin": (math.sin, 1, 1),
    "cos": (math.cos, 1, 1),
    "tan": (math.tan, 1, 1),
    "asin": (math.asin, 1, 1),
    "acos": (math.acos, 1, 1),
    "atan": (math.atan, 1, 1),
    "atan2": (math.atan2, 2, 2),
    "sinh": (math.sinh, 1, 1),
    "cosh": (math.cosh, 1, 1),
    "tanh": (math.tanh, 1, 1),
    "degrees": (math.degrees, 1, 1),
    "radians": (math.radians, 1, 1),
    "hypot": (math.hypot, 1, 8),
    "fabs": (math.fabs, 1, 1),
    "abs": (abs, 1, 1),
    "ceil": (math.ceil, 1, 1),
    "floor": (math.floor, 1, 1),
    "trunc": (math.trunc, 1, 1),
    "round": (_round, 1, 2),
    "factorial": (_factorial, 1, 1),
    "min": (min, 1, 32),
    "max": (max, 1, 32),
}
CONSTANTS: dict[str, float] = {"pi": math.pi, "e": math.e, "tau": math.tau}

# "p = (1300+700+1100)/2" before a ';'. A plain pattern string (with re.match) keeps the word
# "compile" out of this file, which the tests check for eval/exec/compile.
_ASSIGNMENT = r"(?s)\s*([A-Za-z_][A-Za-z0-9_]*)\s*=(?!=)(.*)\Z"


class _Evaluator:
    """Walks a parsed expression; every node kind it does not know is refused."""

    def __init__(self, variables: dict[str, Number], deadline: float):
        self.variables = variables
        self.deadline = deadline
        self.nodes = 0

    def value(self, node: ast.AST) -> Number:
        self.nodes += 1
        if self.nodes > MAX_NODES:
            raise CalculationError(f"expression has more than {MAX_NODES} parts")
        if time.monotonic() > self.deadline:
            raise CalculationError("calculation took too long")
        if isinstance(node, ast.Expression):
            return self.value(node.body)
        if isinstance(node, ast.Constant):
            if type(node.value) in (int, float):
                return _checked(node.value)
            raise CalculationError(f"{type(node.value).__name__} constants are not numbers")
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.UAdd, ast.USub)):
            operand = self.value(node.operand)
            return operand if isinstance(node.op, ast.UAdd) else -operand
        if isinstance(node, ast.BinOp):
            return _binary(node.op, self.value(node.left), self.value(node.right))
        if isinstance(node, ast.Name):
            if node.id in self.variables:
                return self.variables[node.id]
            if node.id in CONSTANTS:
                return CONSTANTS[node.id]
            raise CalculationError(f"unknown name {node.id!r}")
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and not node.keywords:
            entry = FUNCTIONS.get(node.func.id)
            if entry is None:
                raise CalculationError(f"unknown function {node.func.id!r}")
            fn, lo, hi = entry
            if not lo <= len(node.args) <= hi or any(isinstance(a, ast.Starred) for a in node.args):
                raise CalculationError(f"{node.func.id}() takes {lo}..{hi} arguments")
            args = [self.value(a) for a in node.args]
            return _checked(fn(*args))
        raise CalculationError(f"{type(node).__name__} is not allowed in a calculation")


def _checked(x: object) -> Number:
    if isinstance(x, bool) or not isinstance(x, (int, float)):
        raise CalculationError(f"result is {type(x).__name__}, not a real number")
    if isinstance(x, int) and x.bit_length() > MAX_INT_BITS:
        raise CalculationError("integer too large")
    if isinstance(x, float) and not math.isfinite(x):
        raise CalculationError("result is not finite")
    return x


def _binary(op: ast.operator, a: Number, b: Number) -> Number:
    if isinstance(op, ast.Add):
        return _checked(a + b)
    if isinstance(op, ast.Sub):
        return _checked(a - b)
    if isinstance(op, ast.Mult):
        if isinstance(a, int) and isinstance(b, int) and a.bit_length() + b.bit_length() > MAX_INT_BITS + 1:
            raise CalculationError("integer too large")
        return _checked(a * b)
    if isinstance(op, ast.Div):
        return _checked(a / b)
    if isinstance(op, ast.FloorDiv):
        return _checked(a // b)
    if isinstance(op, ast.Mod):
        return _checked(a % b)
    if isinstance(op, ast.Pow):
        return _checked(_power(a, b))
    raise CalculationError(f"operator {type(op).__name__} is not allowed")


def _power(a: Number, b: Number) -> Number:
    # Estimate the size before computing: 10**10**10 must be refused, not attempted.
    if isinstance(a, int) and isinstance(b, int) and b > 0 and abs(a) > 1:
        if (abs(a).bit_length() - 1) * b > MAX_INT_BITS:
            raise CalculationError("integer too large")
    if isinstance(a, int) and isinstance(b, int) and b < 0 and a == 0:
        raise CalculationError("zero to a negative power")
    result = a**b  # floats overflow with OverflowError, handled by the caller
    if isinstance(result, complex):
        raise CalculationError("result is complex")
    return result


def _parse(expression: str) -> ast.Expression:
    try:
        return ast.parse(expression.strip(), mode="eval")
    except (SyntaxError, ValueError, MemoryError, RecursionError) as exc:
        raise CalculationError(f"not an arithmetic expression: {exc.__class__.__name__}") from None


def evaluate(expression: str, timeout: float = DEFAULT_TIMEOUT) -> Number:
    """The numeric value of ``expression`` (``^`` is power; ``a=…;b=…;expr`` assignments allowed).

    Raises ``CalculationError`` with a reason for anything that is not a bounded real arithmetic
    expression.
    """
    if not isinstance(expression, str):
        raise CalculationError("expression must be text")
    if len(expression) > MAX_EXPRESSION_CHARS:
        raise CalculationError(f"expression longer than {MAX_EXPRESSION_CHARS} characters")
    deadline = time.monotonic() + timeout
    statements = [s for s in expression.replace("^", "**").split(";")]
    while len(statements) > 1 and not statements[-1].strip():  # "x=2;x*3;" ends with an empty part
        statements.pop()
    variables: dict[str, Number] = {}
    try:
        for stmt in statements[:-1]:
            m = re.match(_ASSIGNMENT, stmt)
            if m is None:
                raise CalculationError("only 'name = expression' may come before ';'")
            name = m.group(1)
            if name in FUNCTIONS or name in CONSTANTS:
                raise CalculationError(f"{name!r} cannot be reassigned")
            variables[name] = _Evaluator(variables, deadline).value(_parse(m.group(2)))
        return _Evaluator(variables, deadline).value(_parse(statements[-1]))
    except CalculationError:
        raise
    except (ArithmeticError, ValueError, TypeError, RecursionError, MemoryError) as exc:
        raise CalculationError(f"{type(exc).__name__}: {exc}") from None


def format_number(value: Number) -> str:
    """MOSS's rendering: ints as digits, floats as Python's shortest repr ('270.0')."""
    return str(value) if isinstance(value, int) else repr(float(value))


def calculate(expression: str, timeout: float = DEFAULT_TIMEOUT) -> str:
    """The text MOSS's data records after ``=>`` for ``Calculate(expression)``: '338', '4.300000000000001',
    or 'No result.' when the expression cannot be evaluated. Never raises.
    """
    try:
        return format_number(evaluate(expression, timeout))
    except CalculationError:
        return NO_RESULT
    except Exception:  # noqa: BLE001 - a calculator answer, never a crash
        return NO_RESULT


class CalculatorPlugin(Plugin):
    """``Calculate(expression)``; rendered inline as ``Calculate("…") => '…'``."""

    name = "Calculate"
    capability = "Calculator"
    signature = "Calculate(expression)"
    style = INLINE

    def __init__(self, timeout: float = DEFAULT_TIMEOUT):
        self.timeout = timeout + 1.0
        self._eval_timeout = timeout

    def run(self, args: Sequence[str]) -> list[str]:
        """One value; a wrong number of arguments is 'No result.' like any other bad input."""
        if len(args) != 1:
            return [NO_RESULT]
        return [calculate(args[0], self._eval_timeout)]
