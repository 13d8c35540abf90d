"""Durations as people write them: ``500ms``, ``30s``, ``5m``, ``1h30m`` — and the text that
must be refused because a guess would be wrong (a bare number, a YAML boolean)."""

from __future__ import annotations

from datetime import timedelta

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from singleton.durations import format_duration, parse_duration
from singleton.errors import ConfigError


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        pytest.param("500ms", 0.5, id="milliseconds"),
        pytest.param("30s", 30.0, id="seconds"),
        pytest.param("5m", 300.0, id="minutes"),
        pytest.param("2h", 7200.0, id="hours"),
        pytest.param("1d", 86400.0, id="days"),
        pytest.param("1h30m", 5400.0, id="hours-and-minutes"),
        pytest.param("1m30s", 90.0, id="minutes-and-seconds"),
        pytest.param("1s500ms", 1.5, id="seconds-and-milliseconds"),
        pytest.param("1.5s", 1.5, id="decimal-seconds"),
        pytest.param("0s", 0.0, id="zero-with-unit"),
        pytest.param(" 30s ", 30.0, id="surrounding-blanks"),
        pytest.param("1h 30m", 5400.0, id="blank-between-parts"),
    ],
)
def test_duration_text_with_units_is_read_as_seconds(text: str, seconds: float) -> None:
    assert parse_duration(text) == pytest.approx(seconds)


def test_minutes_and_milliseconds_are_not_confused() -> None:
    assert parse_duration("1m") == 60.0
    assert parse_duration("1ms") == pytest.approx(0.001)


def test_timedelta_is_read_as_its_total_seconds() -> None:
    assert parse_duration(timedelta(minutes=1, milliseconds=500)) == 60.5


@pytest.mark.parametrize("number", [30, 2.5], ids=["int", "float"])
def test_a_number_object_is_seconds(number: float) -> None:
    """In code (``@job(lock_ttl=30)``) a number is unambiguous: seconds."""
    assert parse_duration(number) == float(number)


@pytest.mark.parametrize(
    ("text", "hint"),
    [
        pytest.param("500", "write 500s or 500ms", id="integer-text"),
        pytest.param("1.5", "write 1.5s or 1.5ms", id="decimal-text"),
        pytest.param(" 90 ", "write 90s or 90ms", id="padded-integer-text"),
    ],
)
def test_bare_number_text_is_refused_with_the_unit_hint(text: str, hint: str) -> None:
    with pytest.raises(ConfigError, match="has no unit") as caught:
        parse_duration(text)
    assert hint in str(caught.value)


@pytest.mark.parametrize("value", [True, False], ids=["yaml-yes", "yaml-no"])
def test_bool_is_refused_although_it_is_an_int(value: bool) -> None:
    """YAML reads ``no`` as False, and False is an int in Python: it must not become 0 s."""
    with pytest.raises(ConfigError, match=f"expected a duration such as 30s, got {value}"):
        parse_duration(value)


@pytest.mark.parametrize(
    "text",
    [
        pytest.param("", id="empty"),
        pytest.param("   ", id="blank"),
        pytest.param("5 minutes", id="unit-in-words"),
        pytest.param("1h30", id="trailing-number-without-unit"),
        pytest.param("s", id="unit-without-number"),
        pytest.param("ms500", id="unit-before-number"),
        pytest.param("-5s", id="negative"),
        pytest.param("5x", id="unknown-unit"),
        pytest.param("1e3s", id="exponent"),
        pytest.param("30s!", id="trailing-garbage"),
    ],
)
def test_malformed_duration_text_is_refused_with_examples(text: str) -> None:
    with pytest.raises(ConfigError, match=r"bad duration .*use units ms, s, m, h, d"):
        parse_duration(text)


@pytest.mark.parametrize("value", [None, [30], {"s": 30}], ids=["none", "list", "mapping"])
def test_other_types_are_refused(value: object) -> None:
    with pytest.raises(ConfigError, match="expected a duration such as 30s"):
        parse_duration(value)


def test_refusal_message_is_one_line() -> None:
    with pytest.raises(ConfigError) as caught:
        parse_duration("5 minutes")
    assert "\n" not in str(caught.value)


@pytest.mark.parametrize(
    ("seconds", "text"),
    [
        pytest.param(0.0, "0s", id="zero"),
        pytest.param(0.5, "500ms", id="sub-second"),
        pytest.param(30.0, "30s", id="seconds"),
        pytest.param(300.0, "5m", id="minutes"),
        pytest.param(5400.0, "1h30m", id="hours-and-minutes"),
        pytest.param(90061.0, "1d1h1m1s", id="every-unit"),
        pytest.param(1.5, "1.5s", id="fractional-seconds"),
    ],
)
def test_format_duration_writes_the_shortest_text(seconds: float, text: str) -> None:
    assert format_duration(seconds) == text


@settings(database=None, max_examples=200)
@given(st.integers(min_value=0, max_value=400 * 86400))
def test_formatted_whole_seconds_parse_back_to_the_same_value(seconds: int) -> None:
    assert parse_duration(format_duration(seconds)) == seconds


@settings(database=None, max_examples=200)
@given(st.integers(min_value=1, max_value=999))
def test_formatted_milliseconds_parse_back_to_the_same_value(millis: int) -> None:
    assert parse_duration(format_duration(millis / 1000)) == pytest.approx(millis / 1000)
