"""The calculator reproduces MOSS's recorded Calculate results, reads the whole family of inputs MOSS
wrote (functions, unit and magnitude words, full-width forms, thousands separators, percents), and
cannot be made to execute anything."""

from __future__ import annotations

import ast
import builtins
import inspect
import json
import math
import re
import time
from typing import NamedTuple

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from jmoss.errors import CalculationError
from jmoss.plugins import NO_RESULT, parse_commands
from jmoss.plugins import calculator
from jmoss.plugins.calculator import calculate, evaluate, normalise

NUMBER = re.compile(r"-?\d+(?:\.\d+)?(?:e[-+]?\d+)?\Z")


class Recorded(NamedTuple):
    source: str  # file name of the conversation, e.g. "mix_plugin_conversation_3.json"
    expression: str
    value: str  # what MOSS's backend answered, quotes removed: '51.0', 'No result.', 'No calculation results.'


@pytest.fixture(scope="module")
def recorded(shared_dir) -> list[Recorded]:
    """Every Calculate result line in the 246 recorded conversations, in order."""
    out = []
    with (shared_dir / "reference" / "moss_plugin_conversations.jsonl").open(encoding="utf-8") as f:
        for record in map(json.loads, f):
            for turn in record["chat"].values():
                for line in turn["Tool Responses"].split("\n"):
                    if not line.startswith("Calculate("):
                        continue
                    header, _, value = line.partition(" => ")
                    # The header echoes the parsed call. In calculator 4 it reads 'Calculate("(")+ str(2) + …':
                    # MOSS's parser took the first string, "(", and that call is replayed like the others.
                    call = parse_commands(header)[0]
                    assert call.name == "Calculate"
                    value = value[1:-1] if value.startswith("'") else value
                    out.append(Recorded(record["source"].rsplit("/", 1)[-1], call.args[0], value))
    return out


# Recorded answers that are not numbers but where we answer one, each with the reason. All are the mix
# folder's "No calculation results.", a backend that also failed "2+2", "2^10" and "699*2" in the full
# data (mix 39, 34, 27), so it says nothing about what MOSS's calculator accepted.
BACKEND_FAILURES = {
    "67570000-64102140": "plain arithmetic",
    "1000000/500": "plain arithmetic",
    "6e8-4e8": "plain arithmetic",
    "94885/(94885+108818)": "plain arithmetic",
    "108818/(94885+108818)": "plain arithmetic",
    "2^100": "plain arithmetic (a 31-digit int)",
    "2^1000": "plain arithmetic (a 302-digit int, under the 10000-bit bound)",
    "209366亿美元/328.2万人": "unit words dropped (rule 2), as in the answered 147227.31亿美元*6.474 (mix 33)",
    "6.6%-6.7%": "percents (rule 5): 0.066-0.067",
    "3.0%-2.8%": "percents (rule 5): 0.030-0.028",
}


def test_replays_every_recorded_calculate_call(recorded, report):
    numeric = [r for r in recorded if NUMBER.match(r.value)]
    misses = [(r, calculate(r.expression)) for r in numeric if calculate(r.expression) != r.value]
    report(f"calculator: {len(numeric) - len(misses)}/{len(numeric)} recorded numeric Calculate results "
           f"reproduced exactly; {len(recorded) - len(numeric)} recorded non-numeric answers replayed too")
    assert len(numeric) == 112 and len(recorded) == 150
    assert misses == []
    answered = {r.expression: calculate(r.expression) for r in recorded if not NUMBER.match(r.value)}
    unexplained = {e: got for e, got in answered.items() if got != NO_RESULT and e not in BACKEND_FAILURES}
    assert unexplained == {}
    for expression in BACKEND_FAILURES:  # every entry is a recorded failure we now answer, none stale
        recorded_value = next(r.value for r in recorded if r.expression == expression)
        assert recorded_value == "No calculation results." and NUMBER.match(answered[expression]), expression


@pytest.mark.parametrize(
    "source, expr, text",
    [
        ("mix_plugin_conversation_33.json turn 3", "147227.31亿美元*6.474", "953149.60494"),
        ("mix_plugin_conversation_74.json turn 2", "pow(12, 1/3)", "2.2894284851066637"),
        ("mix_plugin_conversation_45.json turn 2", "1坦桑尼亚先令等于多少美元", "1"),  # recorded bare: => 1
    ],
)
def test_numeric_results_of_the_full_sft_data_that_the_fixture_lacks(source, expr, text):
    """The three numeric answers of the full SFT data (OpenMOSS/MOSS SFT_data/conversations/
    conversation_with_plugins) that the 246-conversation fixture lacks and the earlier calculator missed.
    Replayed against a clone of that repository, all 244 numeric answers among its 323 Calculate results
    are reproduced; the tests cannot assume the clone, so these three stand here."""
    assert calculate(expr) == text


def test_recorded_no_result_cases_that_are_not_arithmetic_stay_no_result():
    for expr in ["7!/(4!*(7-4)!)", "3*(7-3*y)-2*y", "1700>=1600", "(18 kg) / ( (40 cm)^3 )", "鸡蛋单价*10",
                 "sqrt[(41-10)(41-20)]", "b=14-c;a=10-c-b", "max([<|1|>], [<|2|>])", "None", "2*CubeRoot(12)^2"]:
        assert calculate(expr) == "No result.", expr


@pytest.mark.parametrize(
    "expr, text",
    [
        ("60*0.85", "51.0"), ("1300+700+1100", "3100"), ("0^15", "0"), ("10^16", "10000000000000000"),
        ("29-24.7", "4.300000000000001"), ("1/2*9*12*sin(45)", "45.9487903248424"), ("ceil(100/30)", "4"),
        ("0b01101000", "104"), ("30 // 1^2", "30"), ("p=(1300+700+1100)/2;sqrt(p*(p-1300)*(p-700)*(p-1100))", "384991.88303131796"),
        ("-2^2", "-4"), ("2^-1", "0.5"), ("x=2;x*3;", "6"), ("round(2.675, 2)", "2.67"), ("log(8, 2)", "3.0"),
    ],
)
def test_python_float_semantics_with_caret_as_power(expr, text):
    assert calculate(expr) == text


# --- the families of input MOSS wrote, each read by a rule of the calculator module's docstring ---


@pytest.mark.parametrize(
    "expr, text",
    [
        ("pow(12, 1/3)", "2.2894284851066637"), ("pow(2, 10)", "1024"), ("pow(2, 0.5)", repr(math.sqrt(2))),
        ("pow(2, -1)", "0.5"), ("pow(3, 200, 1000)", str(pow(3, 200, 1000))), ("sqrt(2)", "1.4142135623730951"),
        ("cbrt(27)", "3.0"), ("cbrt(-8)", "-2.0"), ("ln(e)", "1.0"), ("log(100, 10)", "2.0"), ("log10(1000)", "3.0"),
        ("log2(8)", "3.0"), ("exp(0)", "1.0"), ("sin(pi/2)", "1.0"), ("cos(0)", "1.0"), ("tan(0)", "0.0"),
        ("acos(1)", "0.0"), ("atan2(1, 1)", repr(math.pi / 4)), ("abs(-3)", "3"), ("fabs(-3)", "3.0"),
        ("round(3.14159, 2)", "3.14"), ("floor(-2.5)", "-3"), ("ceil(2.1)", "3"), ("trunc(-2.7)", "-2"),
        ("int(3.7)", "3"), ("float(3)", "3.0"), ("factorial(5)", "120"), ("comb(5, 2)", "10"), ("perm(5, 2)", "20"),
        ("gcd(12, 18)", "6"), ("lcm(4, 6)", "12"), ("isqrt(17)", "4"), ("hypot(3, 4)", "5.0"),
        ("degrees(pi)", "180.0"), ("max(1, 5, 3)", "5"), ("min(2, -1)", "-1"), ("fmod(7, 3)", "1.0"),
        ("(5*15^2)/(4*tan(pi/5))", "387.10741513251753"), ("floor((500-80-90-95)/110)+3", "5"),
    ],
)
def test_math_functions_and_builtins(expr, text):
    assert calculate(expr) == text


@pytest.mark.parametrize(
    "expr, text",
    [
        ("147227.31亿美元*6.474", "953149.60494"),  # recorded: the words are labels, not multipliers
        ("209366亿美元/328.2万人", repr(209366 / 328.2)),
        ("3.5万元+1.5万元", "5.0"), ("2亿-1亿", "1"), ("100元*3", "300"), ("100 美元 * 7", "700"),
        ("30平方米*2", "60"), ("5 个 * 3", "15"), ("3.5万元*12个月", "42.0"), ("sqrt(16平方米)", "4.0"),
        ("$19.99*3", repr(19.99 * 3)), ("¥100+€50", "150"), ("￥ 80 * 0.5", "40.0"), ("100$-20$", "80"),
        ("25℃+5", "30"), ("1坦桑尼亚先令等于多少美元", "1"), ("单价=5元;单价*3", "15"),
    ],
)
def test_unit_currency_and_magnitude_words_after_a_number_are_dropped(expr, text):
    assert calculate(expr) == text


@pytest.mark.parametrize(
    "expr, why",
    [
        ("鸡蛋单价*10", r"unknown name '鸡蛋单价' \(unit words are dropped only right after a number\)"),
        ("边长-3", "unknown name '边长'"),
        ("3个5个", "cannot read '3 5'"),
        ("3万5千", r"one unit at two magnitudes \(万 and 千\)"),
        ("1亿+5000万", r"one unit at two magnitudes \(万 and 亿\)"),
        ("1.5万元-3000元", r"one unit at two magnitudes \(万元 and 元\)"),
        ("5千克+500克", r"one unit at two magnitudes \(克 and 千克\)"),
        ("(18 kg) / ( (40 cm)^3 )", "cannot read"),  # recorded 'No result.' (mix 52)
        ("5km*3", "cannot read"), ("4x+2", "cannot read"), ("三万+1", "unknown name '三万'"),
        ("100㎡*2", "cannot read '100m2"), ("US$5", "cannot read 'US 5'"),
    ],
)
def test_words_that_are_not_labels_of_a_number_are_refused_with_a_reason(expr, why):
    with pytest.raises(CalculationError, match=why):
        evaluate(expr)


@pytest.mark.parametrize(
    "expr, text",
    [
        ("３×４", "12"), ("１２÷４", "3.0"), ("（1+2）×3", "9"), ("pow(2，10)", "1024"), ("2＾10", "1024"),
        ("10－3", "7"), ("5 − 2", "3"), ("5 – 2", "3"), ("３．５＊２", "7.0"), ("max（1，2）", "2"), ("2·3", "6"),
        ("p＝2；p*3", "6"), ("１０％", "0.1"), ("3²+4²", "25"), ("10⁻²", "0.01"), ("2π", repr(2 * math.pi)),
        ("π*3^2", repr(math.pi * 9)), ("√16", "4.0"), ("2√3", repr(2 * math.sqrt(3))), ("√(9+16)", "5.0"),
        ("∛27", "3.0"), ("√√16", "2.0"), ("sin(30°)", repr(math.sin(math.radians(30)))), ("cos(60 °)", repr(math.cos(math.radians(60)))),
        ("③+④", "7"),
    ],
)
def test_full_width_forms_and_math_symbols(expr, text):
    assert calculate(expr) == text


@pytest.mark.parametrize(
    "expr, text",
    [
        ("1,000,000/500", "2000.0"), ("1,234.5+0.5", "1235.0"), ("(1,000+2,000)*3", "9000"), ("1，000*2", "2000"),
        ("$1,200*3", "3600"), ("12,345,678", "12345678"),
        ("max(1,200)", "200"), ("hypot(3,400)", repr(math.hypot(3, 400))), ("pow(2,10)", "1024"),  # arguments
    ],
)
def test_thousands_separators_outside_function_arguments(expr, text):
    assert calculate(expr) == text


@pytest.mark.parametrize("expr", ["1,0000", "1,23", "0,500", "(1,2)", "1, 000"])
def test_commas_that_are_not_thousands_separators_are_refused(expr):
    with pytest.raises(CalculationError, match="Tuple is not allowed"):
        evaluate(expr)


@pytest.mark.parametrize(
    "expr, text",
    [
        ("50%*200", "100.0"), ("200*(1-15%)", repr(200 * (1 - 0.15))), ("1+5%", "1.05"), ("12.5%", "0.125"),
        ("100%", "1.0"), ("-5%", "-0.05"), ("5% * 2", "0.1"), ("7‰*1000", "7.0"), ("3‱", "0.0003"),
        ("6.6%-6.7%", repr(0.066 - 0.067)), ("5.9%-(-3.5%)", repr(0.059 - -0.035)), ("3.0%-2.8%", repr(0.03 - 0.028)),
        ("6.7%-6.9%", repr(0.067 - 0.069)),  # mix 26, recorded 'No result.'
        ("10%3", "1"), ("10 % 3", "1"), ("10%-3", "-2"), ("20%3+5%", "2.05"),  # Python's modulo where it reads
    ],
)
def test_percent_is_a_hundredth_where_python_cannot_read_modulo(expr, text):
    assert calculate(expr) == text


@pytest.mark.parametrize(
    "expr, text",
    [
        ("３×４", "3*4"), ("147227.31亿美元*6.474", "147227.31 *6.474"), ("3²", "3**(2)"), ("2π", "2*pi "),
        ("√16", " sqrt(16)"), ("1,234,567.5", "1234567.5"), ("max(1,234)", "max(1,234)"), ("sin(30°)", "sin(radians(30))"),
        ("$5", " 5"), ("6.6%-6.7%", "6.6%-6.7%"),
    ],
)
def test_normalise_shows_the_python_each_form_becomes(expr, text):
    assert normalise(expr) == text


def test_normalise_reads_percents_only_when_asked():
    assert normalise("6.6%-6.7%", percent=True) == "0.066-0.067"
    assert normalise("10%3", percent=True) == "10%3"


@pytest.mark.parametrize(
    "expr",
    [
        "9**9**9", "10^10^10", "2^100000", "factorial(100000)", "(10**500)*(10**500)*(10**500)*(10**500)*(10**500)*(10**500)*(10**500)",
        "1e308*10", "1/0", "sqrt(-1)", "(-8)^(1/3)", "1" * 2000, "(" * 300 + "1" + ")" * 300, "-" * 900 + "1",
        "__import__('os').system('echo hi')", "().__class__.__bases__[0].__subclasses__()", "open('/etc/passwd').read()",
        "lambda: 1", "[1,2][0]", "'a'*3", "x if 1 else 2", "pi.real", "abs(x=1)", "max(*[1,2])", "pi=3;pi",
        "pow(9, 9**9)", "pow(2, 100000)", "pow(3, 10**3000, 10**2000)", "comb(100000, 50000)", "perm(10**6, 10**5)",
        "comb(2**70, 3)", "lcm(" + ",".join(["2**9000+1", "2**9000+3", "2**9000+7"]) + ")", "factorial(1001)",
        "²" * 1000, "﷽" * 1000, "9" * 999 + "%", "1e308%*1e308", "√" * 500 + "2",
        "2¼", "7!", "10**5000", "float(10**400)", "int(1e308)*int(1e308)*int(1e308)*int(1e308)*int(1e308)*int(1e308)"
        "*int(1e308)*int(1e308)*int(1e308)*int(1e308)",
    ],
)
def test_hostile_or_unbounded_input_is_no_result_quickly(expr):
    start = time.monotonic()
    assert calculate(expr) == "No result."
    assert time.monotonic() - start < 1.5


def test_evaluate_says_why():
    with pytest.raises(CalculationError, match="unknown name 'y'"):
        evaluate("3*y")
    with pytest.raises(CalculationError, match="integer too large"):
        evaluate("10^10^10")


def test_calculator_source_never_uses_eval_exec_or_compile():
    source = inspect.getsource(calculator)
    tree = ast.parse(source)
    forbidden = {"eval", "exec", "compile", "__import__", "literal_eval", "getattr", "globals", "locals"}
    called = {
        n.func.id if isinstance(n.func, ast.Name) else n.func.attr
        for n in ast.walk(tree)
        if isinstance(n, ast.Call) and isinstance(n.func, (ast.Name, ast.Attribute))
    }
    assert not called & forbidden
    assert not re.search(r"\b(eval|exec|compile)\(", source)


def _forbid_execution(monkeypatch):
    """eval/exec raise; compile only builds ASTs (ast.parse needs that, and it runs nothing)."""
    real_compile = builtins.compile

    def refuse(*args, **kwargs):
        raise AssertionError("the calculator tried to execute code")

    def ast_only(source, filename, mode, flags=0, *args, **kwargs):
        if not flags & ast.PyCF_ONLY_AST:
            raise AssertionError("the calculator compiled code to run it")
        return real_compile(source, filename, mode, flags, *args, **kwargs)

    monkeypatch.setattr(builtins, "eval", refuse)
    monkeypatch.setattr(builtins, "exec", refuse)
    monkeypatch.setattr(builtins, "compile", ast_only)


def test_guard_still_lets_the_calculator_work():
    with pytest.MonkeyPatch.context() as mp:
        _forbid_execution(mp)
        assert calculate("(1/4)*12^2*sqrt(3)") == "62.35382907247958"
        assert calculate("147227.31亿美元*6.474") == "953149.60494"
        assert calculate("（1,000×5%）²") == "2500.0"


# Arithmetic-shaped text: numbers, names, operators, parentheses, the odd hostile token.
TOKENS = st.sampled_from(
    ["1", "2", "0", "9", "10", "0.5", "1e3", "99999999999", "pi", "e", "x", "sqrt", "sin", "log", "factorial",
     "+", "-", "*", "/", "//", "%", "^", "**", "(", ")", ",", ";", "=", " ", "__import__", "'os'", ".", "[", "]",
     "lambda", ":", "中", "!", "==", "<", "x=", "9^9^9",
     "万", "亿美元", "元", "$", "¥", "%", "‰", "°", "℃", "×", "÷", "（", "）", "，", "１２", "√", "∛", "π", "²", "⁻",
     "1,000", "pow", "comb", "perm", "lcm", "cbrt", "ln"]
)
EXPRESSIONS = st.lists(TOKENS, max_size=40).map("".join)


@settings(max_examples=400, deadline=None)
@given(EXPRESSIONS | st.text(max_size=200))
def test_fuzz_no_exception_bounded_time_nothing_executed(expr):
    with pytest.MonkeyPatch.context() as mp:
        _forbid_execution(mp)
        start = time.monotonic()
        out = calculate(expr, timeout=0.5)
        elapsed = time.monotonic() - start
    assert isinstance(out, str)
    assert out == "No result." or NUMBER.match(out) or out in ("inf", "-inf") or re.match(r"-?\d+(\.\d+)?(e[-+]\d+)?\Z", out)
    assert elapsed < 1.5


@settings(max_examples=200, deadline=None)
@given(st.recursive(
    st.integers(-10**6, 10**6).map(str) | st.floats(-1e6, 1e6, allow_nan=False).map(repr),
    lambda inner: st.tuples(inner, st.sampled_from(["+", "-", "*", "/", "^", "//", "%"]), inner).map(lambda t: f"({t[0]}{t[1]}{t[2]})"),
    max_leaves=25,
))
def test_fuzz_well_formed_arithmetic_always_answers_in_bound(expr):
    start = time.monotonic()
    out = calculate(expr, timeout=0.5)
    assert isinstance(out, str) and out
    assert time.monotonic() - start < 1.5
