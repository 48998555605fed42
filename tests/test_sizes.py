"""Memory sizes: what users may type for a budget, what they get back, and how errors read."""

from __future__ import annotations

import click
import pytest
from click.testing import CliRunner

from jmoss.errors import BudgetError
from jmoss.sizes import GiB, KiB, MiB, SIZE, SizeParam, format_gb, format_size, parse_size


@pytest.mark.parametrize(
    "text, expected",
    [
        ("12GiB", 12 * 2**30),
        ("12 GiB", 12 * 2**30),
        ("12gib", 12 * 2**30),
        ("  12GiB  ", 12 * 2**30),
        ("800MB", 800 * 10**6),
        ("800MiB", 800 * 2**20),
        ("1.5G", 3 * 2**29),  # bare G is GiB, as in `free -g` and `docker --memory`
        ("1.5g", 3 * 2**29),
        ("24GB", 24 * 10**9),
        ("0.1GB", 10**8),  # exact, not 99999999
        ("1K", 1024),
        ("1KB", 1000),
        ("2TB", 2 * 10**12),
        ("1TiB", 2**40),
        ("123", 123),
        ("123B", 123),
        ("0", 0),
        (".5GiB", 2**29),
        ("1.0000000001B", 1),  # rounded down to whole bytes
    ],
)
def test_parse_size_reads_iec_and_decimal_units(text, expected):
    assert parse_size(text) == expected


def test_parse_size_passes_numbers_and_none_through():
    assert parse_size(4096) == 4096
    assert parse_size(0) == 0
    assert parse_size(2048.0) == 2048
    assert parse_size(None) is None


@pytest.mark.parametrize(
    "bad",
    ["-1GiB", " -5", "abc", "", "   ", "12 GB GB", "12XB", "1e9", "GiB", "1,5G", "12 G iB", "1.2.3G", "nan", "inf"],
)
def test_parse_size_rejects_garbage_with_examples(bad):
    with pytest.raises(BudgetError) as info:
        parse_size(bad)
    assert "12GiB" in str(info.value)  # every message shows what would have worked


@pytest.mark.parametrize("bad", [-1, -0.5, float("nan"), float("inf"), True, [12], {"GiB": 12}])
def test_parse_size_rejects_bad_numbers_and_types(bad):
    with pytest.raises(BudgetError):
        parse_size(bad)


def test_unknown_unit_message_lists_the_units():
    with pytest.raises(BudgetError, match="KiB/MiB/GiB/TiB"):
        parse_size("12XB")


@pytest.mark.parametrize(
    "n, text",
    [
        (12 * GiB, "12.0 GiB"),
        (300, "300 B"),
        (0, "0 B"),
        (1536, "1.5 KiB"),
        (800 * MiB, "800.0 MiB"),
        (3 * 2**40, "3.0 TiB"),
        (-2 * GiB, "-2.0 GiB"),
        (KiB - 1, "1023 B"),
    ],
)
def test_format_size_uses_binary_units(n, text):
    assert format_size(n) == text


def test_format_gb_uses_decimal_units_like_link_speeds():
    assert format_gb(23_557_459_968) == "23.56 GB"


def test_format_size_round_trips_through_parse_size():
    for n in (12 * GiB, 800 * MiB, 1536):
        assert parse_size(format_size(n)) == n


@click.command()
@click.option("--device-memory", type=SIZE, default=None)
def _info(device_memory):
    click.echo(repr(device_memory))


def test_size_param_converts_cli_values():
    result = CliRunner().invoke(_info, ["--device-memory", "12GiB"])
    assert result.exit_code == 0, result.output
    assert result.output.strip() == str(12 * 2**30)
    result = CliRunner().invoke(_info, [])
    assert result.output.strip() == "None"


def test_size_param_turns_bad_values_into_usage_errors():
    result = CliRunner().invoke(_info, ["--device-memory", "twelve"])
    assert result.exit_code == 2  # click's usage error, not a traceback
    assert "Invalid value for '--device-memory'" in result.output
    assert "12GiB" in result.output
    assert isinstance(SIZE, SizeParam) and SIZE.name == "size"
