"""The training loop's input helpers: the early-started stream and the data-wait clock."""

from __future__ import annotations

import time

import pytest

from jobs.worker import EarlyStart, Timed


def test_early_start_pulls_the_first_item_before_iteration() -> None:
    pulled = []

    def items():
        for i in range(3):
            pulled.append(i)
            yield i

    early = EarlyStart(items())
    deadline = time.time() + 5
    while not pulled and time.time() < deadline:  # the thread takes the first item on its own
        time.sleep(0.01)
    assert pulled == [0]
    assert list(early) == [0, 1, 2] and early.ready_at >= early.opened_at


def test_early_start_hands_errors_and_empty_streams_to_the_loop() -> None:
    def broken():
        raise OSError("read task failed")
        yield  # pragma: no cover

    with pytest.raises(OSError, match="read task failed"):
        list(EarlyStart(broken()))
    assert list(EarlyStart(iter([]))) == []


def test_timed_adds_up_the_wait_for_each_item() -> None:
    def slow():
        for i in range(3):
            time.sleep(0.05)
            yield i

    t = Timed(slow())
    assert list(t) == [0, 1, 2] and 0.14 <= t.seconds < 1.0
