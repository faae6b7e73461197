"""The retry schedule: tenacity's waits as a pure function, clamped and bounded."""

from __future__ import annotations

import contextlib
import threading

import pytest

from smarthost.retry import backoff, failover, next_attempt


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


def test_one_failover_policy_serves_threads_at_once():
    """failover() is built once and shared by the sender threads: each loop over it
    must keep its own count (tenacity keeps that state per thread; this fails loudly if
    a tenacity release stops doing so)."""
    stopping = threading.Event()
    policy = failover(3, stopping, ConnectionError)
    assert failover(3, stopping, ConnectionError) is policy
    both_inside = threading.Barrier(2, timeout=5)
    tries: dict[str, int] = {}

    def loop(name: str, failures: int) -> None:
        count = 0
        with contextlib.suppress(ConnectionError):
            for attempt in policy:
                with attempt:
                    count += 1
                    if count == 1:
                        both_inside.wait()  # the two loops overlap here
                    if count <= failures:
                        raise ConnectionError(name)
        tries[name] = count

    threads = [
        threading.Thread(target=loop, args=("fails-over", 5)),
        threading.Thread(target=loop, args=("succeeds", 0)),
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(10)
    assert tries == {"fails-over": 3, "succeeds": 1}
