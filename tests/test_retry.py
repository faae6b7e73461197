"""The retry schedule: tenacity's waits as a pure function, clamped and bounded."""

from __future__ import annotations

import pytest

from smarthost.retry import backoff, next_attempt


def test_backoff_doubles_with_jitter_and_is_capped():
    for attempt, base in [(1, 60), (2, 120), (3, 240), (4, 480)]:
        delays = [backoff(attempt, 60, 3600) for _ in range(200)]
        assert all(base <= d <= base + 30 for d in delays)
        assert len({round(d, 3) for d in delays}) > 50  # jitter spreads a queue out
    assert all(backoff(20, 60, 3600) == 3600 for _ in range(50))


def test_first_attempt_numbering_is_tolerant():
    assert 60 <= backoff(0, 60, 3600) <= 90


def test_next_attempt_never_passes_expiry():
    arrival = 1_000_000.0
    due = next_attempt(arrival + 100, arrival, 10, 60, 3600, retry_for=200)
    assert due == pytest.approx(arrival + 200)


def test_next_attempt_none_once_expired():
    arrival = 1_000_000.0
    assert next_attempt(arrival + 200, arrival, 3, 60, 3600, retry_for=200) is None
    assert next_attempt(arrival + 10, arrival, 1, 60, 3600, retry_for=200) >= arrival + 70
