"""Calculator plugin: ``Calculate("expr")`` evaluated the way MOSS's training backend did, but safely.

What MOSS learned to read (the 325 Calculate calls of the SFT plugin data, moss-spec §4.6):

- Python float semantics with ``^`` meaning power, ``/`` true division, ``%`` modulo, ints kept as
  ints ('3100', '10000000000000000'), floats as Python's shortest repr ('270.0', '4.300000000000001');
  ``p=…;expr`` assignments.
- Functions of Python's ``math`` module and builtins, in radians: ``sqrt``, ``sin(45)`` (read as 45
  radians: '45.9487903248424' for ``1/2*9*12*sin(45)``), ``tan``, ``acos``, ``ceil``, ``floor``,
  ``max``, ``pi``, ``pow(12, 1/3)`` ('2.2894284851066637'). ``pow`` is the builtin, the same as ``^``
  (``pow(2, 10)`` is '1024'). The table also has math's other real functions (``comb``, ``perm``,
  ``gcd``, ``lcm``, ``isqrt``, ``gamma``, ``erf``…), ``int``/``float``, and two names Python lacks:
  ``ln`` and ``cbrt``.
- Numbers with words attached: ``147227.31亿美元*6.474`` gave '953149.60494' (mix conversation 33),
  i.e. 147227.31 × 6.474: the unit word, magnitude word included, is a **label that is dropped**, not
  a multiplier, and the answer is in the same unit (亿美元). ``1坦桑尼亚先令等于多少美元`` gave 1.

So an expression is first rewritten into Python arithmetic (``normalise``), then evaluated:

1. Superscripts are powers (``3²`` is ``3^(2)``); then NFKC folds full-width forms (``３``, ``（）``,
   ``，``, ``＋``, ``％``, ``＝``…) to ASCII, and ``×`` ``·`` are ``*``, ``÷`` is ``/``, ``−`` ``–``
   are ``-``.
2. Unit words after a number are dropped: a run of Chinese/Japanese/Korean characters (万, 亿, 美元,
   元, 个, 平方米…), currency signs ($, ¥, €, £…, also before the number) and °C/°F. A word that does
   not follow a number stays a name, so ``鸡蛋单价*10`` and ``边长-3`` are unknown names, not ``*10`` or
   ``-3``. Dropped words leave a space, so ``3个5个`` reads "3 5" and is refused, never 35. One unit
   at two magnitudes (``1亿+5000万``, ``1.5万元-3000元``, ``5千克+500克``) is refused: labels are not
   converted, so the answer would be wrong. Different units are left to the caller
   (``3.5万元*12个月`` is 42.0, in 万元).
3. ASCII unit words are not dropped: MOSS's backend answered 'No result.' for
   ``(18 kg) / ( (40 cm)^3 )``, and in MOSS's data a letter after a number is algebra (``4x``,
   ``0.8x``, ``8A+5B``), which must stay 'No result.'.
4. ``1,234,567.5`` is one number outside a function's parentheses; inside them commas separate
   arguments as in Python (``max(1,200)`` is 200).
5. ``x%`` is x/100 (``‰`` x/1000, ``‱`` x/10000) when it follows a number and is not followed by
   an operand. ``%`` stays Python's modulo wherever Python can read it (``10%3`` is 1, ``10%-3``
   is -2); only an expression Python cannot read is read again with percents, so ``6.6%-6.7%`` is
   0.066-0.067. MOSS's backend answered none of the four percent expressions in its data, so
   nothing recorded pins this; x/100 is the reading that is never numerically wrong.
6. ``π`` is ``pi``, ``√x``/``∛x`` are ``sqrt(x)``/``cbrt(x)``, ``2π`` and ``2√3`` multiply, and ``30°``
   is ``radians(30)`` (the bare ``sin(30)`` stays radians, as MOSS's backend read it).

Everything else is 'No result.', as in MOSS's data: unknown names, ``7!``, comparisons, equations.

Nothing is ever executed: the text is parsed with ``ast`` and walked by a small interpreter that
accepts only numbers, arithmetic operators, a fixed table of functions and constants, and names
assigned earlier in the same expression. Input size, integer size, exponents, factorials and
combinations, and wall time are bounded, so any input returns promptly.
"""

from __future__ import annotations

import ast
import math
import re
import time
import unicodedata
from decimal import Decimal
from typing import Callable, Sequence

from jmoss.errors import CalculationError
from jmoss.plugins.base import INLINE, NO_RESULT, Plugin

MAX_EXPRESSION_CHARS = 1000
MAX_NORMALISED_CHARS = 4 * MAX_EXPRESSION_CHARS  # NFKC and "²" -> "^(2)" lengthen the text
MAX_NODES = 400
MAX_INT_BITS = 10_000  # ~3000 digits: well under Python's 4300-digit str() limit
MAX_FACTORIAL = 1000
MAX_MODULUS_BITS = 4096  # pow(a, b, m) costs about bits(b) multiplications of bits(m)-bit numbers
DEFAULT_TIMEOUT = 1.0

Number = int | float


def _whole(x: Number, name: str) -> int:
    if isinstance(x, float):
        if not x.is_integer():
            raise CalculationError(f"{name}() needs whole numbers")
        x = int(x)
    return x


def _factorial(n: Number) -> int:
    n = _whole(n, "factorial")
    if not 0 <= n <= MAX_FACTORIAL:
        raise CalculationError(f"factorial() is limited to 0..{MAX_FACTORIAL}")
    return math.factorial(n)


def _choices(name: str, ordered: bool) -> Callable[[Number, Number], int]:
    """comb/perm, refused before computing when the answer would pass MAX_INT_BITS."""

    def count(n: Number, k: Number) -> int:
        n, k = _whole(n, name), _whole(k, name)
        if n < 0 or k < 0:
            raise CalculationError(f"{name}() needs non-negative numbers")
        if k > n:
            return 0
        if n.bit_length() > 64:
            raise CalculationError("integer too large")
        log_size = math.lgamma(n + 1) - math.lgamma(n - k + 1) - (0 if ordered else math.lgamma(k + 1))
        if log_size / math.log(2) > MAX_INT_BITS:
            raise CalculationError("integer too large")
        return math.perm(n, k) if ordered else math.comb(n, k)

    return count


def _pow(base: Number, exponent: Number, modulus: Number | None = None) -> Number:
    if modulus is None:
        return _power(base, exponent)
    if not all(isinstance(v, int) for v in (base, exponent, modulus)):
        raise CalculationError("pow() with a modulus needs whole numbers")
    if modulus.bit_length() > MAX_MODULUS_BITS:
        raise CalculationError(f"pow() modulus is limited to {MAX_MODULUS_BITS} bits")
    return pow(base, exponent, modulus)


def _lcm(*values: Number) -> int:
    out = 1
    for v in values:
        out = math.lcm(out, _whole(v, "lcm"))
        _checked(out)
    return out


def _cbrt(x: Number) -> float:
    # Not math.cbrt: it is 3.11+ only and glibc's gives 3.0000000000000004 for cbrt(27).
    r = math.copysign(abs(x) ** (1 / 3), x)
    return r - (r * r * r - x) / (3 * r * r) if r else r  # one Newton step


def _round(x: Number, ndigits: Number | None = None) -> Number:
    if ndigits is None:
        return round(x)
    if not isinstance(ndigits, int) or abs(ndigits) > 400:
        raise CalculationError("round() needs an integer number of digits")
    return round(x, ndigits)


def _log(x: Number, base: Number | None = None) -> float:
    return math.log(x) if base is None else math.log(x, base)


# Python's math module and builtins as MOSS's backend exposed them, plus ln and cbrt.
# Unknown names (CubeRoot, y(...)) stay 'No result.' as MOSS saw them.
FUNCTIONS: dict[str, tuple[Callable[..., Number], int, int]] = {  # name: (function, min args, max args)
    "sqrt": (math.sqrt, 1, 1),
    "cbrt": (_cbrt, 1, 1),
    "isqrt": (lambda x: math.isqrt(_whole(x, "isqrt")), 1, 1),
    "pow": (_pow, 2, 3),
    "exp": (math.exp, 1, 1),
    "expm1": (math.expm1, 1, 1),
    "log": (_log, 1, 2),
    "ln": (math.log, 1, 1),
    "log10": (math.log10, 1, 1),
    "log2": (math.log2, 1, 1),
    "log1p": (math.log1p, 1, 1),
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
    "asinh": (math.asinh, 1, 1),
    "acosh": (math.acosh, 1, 1),
    "atanh": (math.atanh, 1, 1),
    "degrees": (math.degrees, 1, 1),
    "radians": (math.radians, 1, 1),
    "hypot": (math.hypot, 1, 8),
    "fabs": (math.fabs, 1, 1),
    "abs": (abs, 1, 1),
    "copysign": (math.copysign, 2, 2),
    "fmod": (math.fmod, 2, 2),
    "ceil": (math.ceil, 1, 1),
    "floor": (math.floor, 1, 1),
    "trunc": (math.trunc, 1, 1),
    "int": (int, 1, 1),
    "float": (float, 1, 1),
    "round": (_round, 1, 2),
    "factorial": (_factorial, 1, 1),
    "comb": (_choices("comb", ordered=False), 2, 2),
    "perm": (_choices("perm", ordered=True), 2, 2),
    "gcd": (lambda *v: math.gcd(*(_whole(x, "gcd") for x in v)), 1, 32),
    "lcm": (_lcm, 1, 32),
    "gamma": (math.gamma, 1, 1),
    "lgamma": (math.lgamma, 1, 1),
    "erf": (math.erf, 1, 1),
    "erfc": (math.erfc, 1, 1),
    "min": (min, 1, 32),
    "max": (max, 1, 32),
}
CONSTANTS: dict[str, float] = {"pi": math.pi, "e": math.e, "tau": math.tau}

# "p = (1300+700+1100)/2" before a ';'. Plain pattern strings (with re.match/re.finditer) keep the
# word "compile" out of this file, which the tests check for eval/exec/compile.
_ASSIGNMENT = r"(?s)\s*([^\W\d]\w*)\s*=(?!=)(.*)\Z"

# ---------------------------------------------------------------------------------------------
# Rewriting MOSS's written arithmetic into Python (module docstring, rules 1-6)
# ---------------------------------------------------------------------------------------------

_SUPERSCRIPT_RUN = r"[⁰¹²³⁴⁵⁶⁷⁸⁹⁺⁻]+"
_SUPERSCRIPTS = str.maketrans("⁰¹²³⁴⁵⁶⁷⁸⁹⁺⁻", "0123456789+-")
# What NFKC leaves alone. Not "⁄": NFKC turns "2¼" into "21⁄4", which must stay unreadable.
_OPERATORS = str.maketrans({"×": "*", "✕": "*", "✖": "*", "⨯": "*", "∗": "*", "·": "*", "⋅": "*",
                            "÷": "/", "∕": "/", "−": "-", "‐": "-", "‒": "-", "–": "-"})
# Chinese, Japanese and Korean characters: unit words after a number (万, 亿美元, 平方米, 个).
_WORD = r"[\u3005\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uac00-\ud7af\uf900-\ufaff\U00020000-\U0003ffff]"
_TOKEN = (
    r"(?s)(?P<space>\s+)"
    r"|(?P<num>0[xX][0-9a-fA-F_]+|0[oO][0-7_]+|0[bB][01_]+"
    r"|(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9][0-9_]*)(?:[eE][+-]?[0-9][0-9_]*)?)"
    rf"|(?P<word>{_WORD}+)"
    r"|(?P<currency>[$¢£¤¥฿₠-₿])"
    r"|(?P<temperature>°[CF](?![0-9A-Za-z_]))"
    r"|(?P<name>[^\W\dπ][^\Wπ]*)"
    r"|(?P<other>.)"
)
_UNIT_KINDS = ("word", "currency", "temperature")
_PERCENT_PLACES = {"%": 2, "‰": 3, "‱": 4}
_MAGNITUDE = r"[十百千万亿兆]+"
_FIRST_GROUP, _GROUP, _LAST_GROUP = r"[1-9][0-9]{0,2}\Z", r"[0-9]{3}\Z", r"[0-9]{3}\.[0-9]+\Z"


def _scaled(literal: str, places: int) -> str:
    """The Python literal for ``literal`` × 10**-places, rounded once: '6.7' % -> '0.067'."""
    text = literal.replace("_", "")
    exact = Decimal(int(text, 0)) if text[:2].lower() in ("0x", "0o", "0b") else Decimal(text)
    value = float(exact.scaleb(-places))
    if not math.isfinite(value):
        raise CalculationError("number too large")
    return repr(value)


Token = tuple[str, str]  # (kind, text): a group name of _TOKEN and the characters it matched


def _next(tokens: list[Token], j: int) -> int:
    """The index of the first token at or after j that is not a space."""
    while j < len(tokens) and tokens[j][0] == "space":
        j += 1
    return j


def _at(tokens: list[Token], j: int) -> Token:
    return tokens[j] if j < len(tokens) else ("end", "")


def _starts_operand(token: Token) -> bool:
    return token[0] in ("num", "name", "word", "currency") or token[1] in ("(", "π", "√", "∛")


def _thousands(tokens: list[Token], i: int) -> tuple[str, int]:
    """'1,234,567.5' at tokens[i:] as one literal '1234567.5', and the index after it."""
    literal, j = tokens[i][1], i + 1
    if not re.match(_FIRST_GROUP, literal):
        return literal, j
    while j + 1 < len(tokens) and tokens[j] == ("other", ",") and tokens[j + 1][0] == "num":
        group = tokens[j + 1][1]
        if not (re.match(_GROUP, group) or re.match(_LAST_GROUP, group)):
            break
        literal, j = literal + group, j + 2
        if "." in group:
            break
    return literal, j


def _number(tokens: list[Token], i: int, grouping: bool, percent: bool) -> tuple[str, list[str], int]:
    """The number at tokens[i] with what is attached to it: (Python text, unit words dropped, next index).

    ``grouping``: commas may be thousands separators (not inside a function's arguments).
    """
    literal, i = _thousands(tokens, i) if grouping else (tokens[i][1], i + 1)
    j = _next(tokens, i)
    sign = _at(tokens, j)[1]
    if sign == "°":
        literal, i = f"radians({literal})", j + 1
    elif sign in _PERCENT_PLACES and (sign != "%" or percent):
        if not _starts_operand(_at(tokens, _next(tokens, j + 1))):  # "50%*2" and "5%)", not "10%3"
            literal, i = _scaled(literal, _PERCENT_PLACES[sign]), j + 1
    words = []
    j = _next(tokens, i)
    while _at(tokens, j)[0] in _UNIT_KINDS:
        words.append(tokens[j][1])
        i = j + 1
        j = _next(tokens, i)
    return literal + (" " if words else ""), words, i  # the space keeps "3万5" from reading 35


def _check_magnitudes(words: list[str]) -> None:
    """Refuse one unit written at two magnitudes (1亿 and 5000万, 1.5万元 and 3000元)."""
    seen: dict[str, set[str]] = {}  # unit word without its magnitude -> magnitudes
    for word in words:
        magnitude = re.match(_MAGNITUDE, word)
        magnitude = magnitude.group() if magnitude else ""
        seen.setdefault(word[len(magnitude):], set()).add(magnitude)
    for unit, magnitudes in seen.items():
        if len(magnitudes) > 1:
            written = " and ".join(sorted(m + unit for m in magnitudes))
            raise CalculationError(f"one unit at two magnitudes ({written}): unit words are labels that are "
                                   "dropped, not converted, so write the numbers in one unit")


def normalise(expression: str, percent: bool = False) -> str:
    """``expression`` rewritten into the Python arithmetic the evaluator parses (docstring rules 1-6).

    ``percent`` reads ``%`` after a number, not followed by an operand, as x/100; without it ``%``
    is left to Python. Raises ``CalculationError`` for one unit at two magnitudes.
    """
    text = re.sub(_SUPERSCRIPT_RUN, lambda m: "^(" + m.group().translate(_SUPERSCRIPTS) + ")", expression)
    text = unicodedata.normalize("NFKC", text).translate(_OPERATORS)
    if len(text) > MAX_NORMALISED_CHARS:
        raise CalculationError(f"expression longer than {MAX_NORMALISED_CHARS} characters once normalised")
    tokens: list[Token] = [(m.lastgroup, m.group()) for m in re.finditer(_TOKEN, text)]
    out: list[str] = []
    in_call: list[bool] = []  # one per open '(': whether it opens a function's arguments
    dropped: list[str] = []
    prev = ""  # the kind of the last output: "num", "name", ")", "op"
    owed = 0  # ')' owed by √ or ∛ written without parentheses, closed after the next operand
    i = 0
    while i < len(tokens):
        kind, tok = tokens[i]
        adjoins = "*" if prev in ("num", ")") else " "  # 2π and 2√3 multiply; " " keeps "rπ" from reading "rpi"
        if kind == "space":
            out.append(tok)
            i += 1
            continue
        if kind == "currency" and _at(tokens, _next(tokens, i + 1))[0] == "num":  # "$19.99", "¥ 100"
            out.append(" ")
            i += 1
            continue
        if tok in ("√", "∛"):
            out.append(adjoins + ("sqrt" if tok == "√" else "cbrt"))
            prev, i = "name", i + 1
            operand = _at(tokens, _next(tokens, i))
            if operand[1] != "(" and _starts_operand(operand):
                out.append("(")
                owed += 1
            continue
        if kind == "num":
            literal, words, i = _number(tokens, i, not (in_call and in_call[-1]), percent)
            out.append(literal)
            dropped += words
            prev = "num"
        elif tok == "π":
            out.append(adjoins + "pi ")  # the trailing space keeps "πr" from reading as the name "pir"
            prev, i = "name", i + 1
        elif kind in ("name", "word"):  # a word that follows no number stays a name: 鸡蛋单价 is unknown
            out.append(tok)
            prev, i = "name", i + 1
        else:
            if tok == "(":
                in_call.append(prev in ("name", ")"))
            elif tok == ")" and in_call:
                in_call.pop()
            out.append(tok)
            prev, i = (")" if tok == ")" else "op"), i + 1
            continue
        out.append(")" * owed)
        owed = 0
    _check_magnitudes(dropped)
    return "".join(out).replace("^", "**")


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
            hint = " (unit words are dropped only right after a number)" if re.search(_WORD, node.id) else ""
            raise CalculationError(f"unknown name {node.id!r}{hint}")
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


class _Unreadable(CalculationError):
    """The rewritten text is not Python syntax (the one failure a percent reading may cure)."""


def _parse(expression: str) -> ast.Expression:
    source = expression.strip()
    try:
        return ast.parse(source, mode="eval")
    except SyntaxError as exc:
        shown = source if len(source) <= 60 else source[:57] + "..."
        raise _Unreadable(f"cannot read {shown!r} as arithmetic: {exc.msg}") from None
    except (ValueError, MemoryError, RecursionError) as exc:
        raise _Unreadable(f"cannot read the expression as arithmetic: {exc.__class__.__name__}") from None


def _run(text: str, deadline: float) -> Number:
    """Evaluate normalised text: ``name = …;`` assignments, then the final expression."""
    statements = text.split(";")
    while len(statements) > 1 and not statements[-1].strip():  # "x=2;x*3;" ends with an empty part
        statements.pop()
    variables: dict[str, Number] = {}
    for stmt in statements[:-1]:
        m = re.match(_ASSIGNMENT, stmt)
        if m is None:
            raise CalculationError("only 'name = expression' may come before ';'")
        name = m.group(1)
        if name in FUNCTIONS or name in CONSTANTS:
            raise CalculationError(f"{name!r} cannot be reassigned")
        variables[name] = _Evaluator(variables, deadline).value(_parse(m.group(2)))
    return _Evaluator(variables, deadline).value(_parse(statements[-1]))


def evaluate(expression: str, timeout: float = DEFAULT_TIMEOUT) -> Number:
    """The numeric value of ``expression``, read by the rules of the module docstring.

    Raises ``CalculationError`` with a reason for anything that is not a bounded real arithmetic
    expression.
    """
    if not isinstance(expression, str):
        raise CalculationError("expression must be text")
    if len(expression) > MAX_EXPRESSION_CHARS:
        raise CalculationError(f"expression longer than {MAX_EXPRESSION_CHARS} characters")
    deadline = time.monotonic() + timeout
    try:
        text = normalise(expression)
        try:
            return _run(text, deadline)
        except _Unreadable:
            with_percent = normalise(expression, percent=True)
            if with_percent == text:
                raise
            return _run(with_percent, deadline)
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
