"""Named evaluation day ranges (issue 17): one run evaluates validation and test days, each under
its own metric prefix; specs are relative ("+1", "+2..+3") or absolute; ranges never overlap the
training days; bad names and specs stop at config load, naming the key."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from jobs.config import TrainConfig, load_config
from jobs.train import eval_ranges
from pipeline.days import parse_days, parse_range

ROOT = Path(__file__).resolve().parents[2]
D = dt.date


def test_relative_and_absolute_specs() -> None:
    last = D(2026, 1, 3)
    assert parse_range("+1", last) == [D(2026, 1, 4)]
    assert parse_range("+2..+3", last) == [D(2026, 1, 5), D(2026, 1, 6)]
    assert parse_range("2026-02-01..2026-02-02", last) == [D(2026, 2, 1), D(2026, 2, 2)]
    for bad in ("+0", "+3..+2", "+a", "+1..2", "2026-13-01"):
        with pytest.raises(ValueError):
            parse_range(bad, last)


@given(st.integers(1, 30), st.integers(0, 10), st.integers(0, 400))
def test_relative_ranges_follow_the_last_training_day(a: int, extra: int, start: int) -> None:
    last = D(2026, 1, 1) + dt.timedelta(days=start)
    days = parse_range(f"+{a}..+{a + extra}", last)
    assert len(days) == extra + 1 and days[0] == last + dt.timedelta(days=a)
    assert all((y - x).days == 1 for x, y in zip(days, days[1:]))


def test_default_is_one_range_named_eval() -> None:
    train = parse_days("2026-01-01..2026-01-03")
    assert eval_ranges(TrainConfig(eval_offset=2, eval_days=2), train) == {
        "eval": [D(2026, 1, 5), D(2026, 1, 6)]}


def test_named_ranges_in_declared_order() -> None:
    tc = TrainConfig(eval_ranges={"validation": "+1", "test": "+2..+3"})
    got = eval_ranges(tc, parse_days("2026-01-01..2026-01-03"))
    assert list(got) == ["validation", "test"]
    assert got["test"] == [D(2026, 1, 5), D(2026, 1, 6)]


def test_a_range_overlapping_the_training_days_is_refused() -> None:
    tc = TrainConfig(eval_ranges={"test": "2026-01-02..2026-01-04"})
    with pytest.raises(ValueError, match=r"evaluation range 'test' \(2026-01-02..2026-01-04\) overlaps the "
                                         r"training days 2026-01-01..2026-01-03"):
        eval_ranges(tc, parse_days("2026-01-01..2026-01-03"))


@pytest.mark.parametrize("assignment, message", [
    ('train.eval_ranges.Test="+1"', "'Test' is not a valid range name"),
    ('train.eval_ranges.train="+1"', "'train' is not a valid range name"),
    ('train.eval_ranges.test="+0"', r"\[train.eval_ranges\].test: bad relative day range '\+0'"),
    ("train.eval_ranges.test=3", r"\[train.eval_ranges\].test: expected a day range string"),
])
def test_bad_ranges_stop_at_config_load(assignment: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        load_config(ROOT / "configs/tiny.toml", [assignment])
