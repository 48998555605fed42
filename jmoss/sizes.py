"""Memory sizes as users write them ("12GiB", "800MB", "1.5G", 123) and as jmoss prints them.

Units follow IEC, because budgets are compared with what `nvidia-smi` and `free` report and a
silent 7% error between "GB" and "GiB" is exactly the kind of thing that makes a budget fail:

- ``B``; ``KB``/``MB``/``GB``/``TB`` are decimal (10^3, 10^6, 10^9, 10^12 bytes);
- ``KiB``/``MiB``/``GiB``/``TiB`` are binary (2^10 ... 2^40);
- a bare ``K``/``M``/``G``/``T`` is binary, as in ``free -g``, ``docker --memory 12g`` and
  Java's ``-Xmx12g``, which is what people who type "12G" usually mean.

Units are case-insensitive ("12gib" works); a space between number and unit is allowed. A number
without a unit is a count of bytes. Fractions are fine ("1.5GiB"); the result is rounded down to
whole bytes. Arithmetic is exact (Decimal), so "0.1GB" is 100000000 bytes, not 99999999.
"""

from __future__ import annotations

import math
import re
from decimal import Decimal, InvalidOperation

import click

from jmoss.errors import BudgetError

KiB = 1 << 10
MiB = 1 << 20
GiB = 1 << 30
TiB = 1 << 40

_UNITS = {
    "": 1,
    "b": 1,
    "k": KiB,
    "kib": KiB,
    "kb": 10**3,
    "m": MiB,
    "mib": MiB,
    "mb": 10**6,
    "g": GiB,
    "gib": GiB,
    "gb": 10**9,
    "t": TiB,
    "tib": TiB,
    "tb": 10**12,
}

_SIZE_RE = re.compile(r"^\s*([0-9]+(?:\.[0-9]*)?|\.[0-9]+)\s*([a-zA-Z]*)\s*$")

_EXAMPLES = '"12GiB", "12 GiB", "800MB", "1.5G" (G = GiB) or a number of bytes such as 4096'


def parse_size(value: str | int | float | None) -> int | None:
    """Parse a memory size into bytes; ``None`` stays ``None`` (it means "no limit / decide for me").

    Raises BudgetError for negatives, NaN/infinity, booleans, unknown units and other garbage,
    with a message that shows what is accepted.
    """
    if value is None:
        return None
    if isinstance(value, bool):  # bool is an int subclass; True bytes is certainly a mistake
        raise BudgetError(f"a memory size must be a number of bytes or a string like {_EXAMPLES}, got {value!r}")
    if isinstance(value, int):
        if value < 0:
            raise BudgetError(f"a memory size cannot be negative, got {value}; use e.g. {_EXAMPLES}")
        return value
    if isinstance(value, float):
        if not math.isfinite(value) or value < 0:
            raise BudgetError(
                f"a memory size must be a finite, non-negative number, got {value!r}; use e.g. {_EXAMPLES}"
            )
        return int(value)
    if not isinstance(value, str):
        raise BudgetError(f"a memory size must be a string or a number, got {type(value).__name__} {value!r}")

    text = value.strip()
    if text.startswith("-"):
        raise BudgetError(f"a memory size cannot be negative, got {value!r}; use e.g. {_EXAMPLES}")
    match = _SIZE_RE.match(text)
    if match is None:
        raise BudgetError(f"cannot read {value!r} as a memory size; use e.g. {_EXAMPLES}")
    number, unit = match.groups()
    multiplier = _UNITS.get(unit.lower())
    if multiplier is None:
        raise BudgetError(
            f"unknown unit {unit!r} in memory size {value!r}; units are B, KB/MB/GB/TB (powers of 1000), "
            f"KiB/MiB/GiB/TiB or K/M/G/T (powers of 1024); e.g. {_EXAMPLES}"
        )
    try:
        amount = Decimal(number)
    except InvalidOperation:  # pragma: no cover - the regex only lets decimal numbers through
        raise BudgetError(f"cannot read {value!r} as a memory size; use e.g. {_EXAMPLES}") from None
    return int(amount * multiplier)


def format_size(n: int) -> str:
    """Bytes in binary units with one decimal, e.g. ``12.0 GiB``, ``512.0 MiB``, ``300 B``."""
    sign = "-" if n < 0 else ""
    n = abs(int(n))
    if n < KiB:
        return f"{sign}{n} B"
    for unit, scale in (("TiB", TiB), ("GiB", GiB), ("MiB", MiB), ("KiB", KiB)):
        if n >= scale:
            return f"{sign}{n / scale:.1f} {unit}"
    raise AssertionError("unreachable")  # pragma: no cover


def format_gb(n: int) -> str:
    """Bytes in decimal GB with two decimals, e.g. ``21.75 GB``: the unit link speeds (GB/s) use."""
    return f"{n / 1e9:.2f} GB"


class SizeParam(click.ParamType):
    """Click parameter type for ``--device-memory 12GiB`` style options.

    A bad value becomes a normal click usage error ("Invalid value for '--device-memory': ...")
    instead of a traceback. The converted value is an int (bytes), or None when the option is unset.
    """

    name = "size"

    def convert(self, value, param, ctx):  # type: ignore[override]
        if value is None:
            return None
        try:
            return parse_size(value)
        except BudgetError as exc:
            self.fail(str(exc), param, ctx)


SIZE = SizeParam()
