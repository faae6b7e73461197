"""Retry policies: the next backend within an attempt, and when a deferred message
is tried again.

Within one attempt, a backend failure moves on to the next backend at once, at most
once per backend of the group, and not at all once the relay is stopping.

tenacity's wait strategies are used outside tenacity's loop: the delay for attempt N
is computed once and stamped on disk as the message's next-attempt time, so the
schedule survives restarts. The jitter keeps a whole queue deferred by one outage
from coming due in the same second.
"""

from __future__ import annotations

import functools
import threading

from tenacity import (
    RetryCallState,
    Retrying,
    retry_if_exception_type,
    stop_after_attempt,
    stop_when_event_set,
    wait_exponential,
    wait_none,
    wait_random,
)


def backoff(attempts: int, retry_min: float, retry_max: float) -> float:
    """Seconds to wait after the `attempts`-th failed attempt (1-based)."""
    wait = wait_exponential(multiplier=retry_min, max=retry_max) + wait_random(0, retry_min / 2)
    state = RetryCallState(retry_object=Retrying(wait=wait), fn=None, args=(), kwargs={})
    state.attempt_number = max(1, attempts)
    return min(float(wait(state)), retry_max)


def next_attempt(
    now: float, arrival: float, attempts: int, retry_min: float, retry_max: float, retry_for: float
) -> float | None:
    """The next attempt time, or None when the message has been tried for `retry_for`.

    The last attempt is made right at expiry rather than skipped, so a message gets
    its full `retry_for` before it is given up.
    """
    expiry = arrival + retry_for
    if now >= expiry:
        return None
    return min(now + backoff(attempts, retry_min, retry_max), expiry)


@functools.lru_cache(maxsize=64)
def failover(backends: int, stopping: threading.Event, on: type[BaseException]) -> Retrying:
    """Try up to `backends` backends in a row while `on` is raised; stop on shutdown.

    Built once per set of arguments and shared: a Retrying keeps the state of each
    loop over it in thread-local storage, so sender threads may run it at once."""
    return Retrying(
        stop=stop_after_attempt(max(1, backends)) | stop_when_event_set(stopping),
        retry=retry_if_exception_type(on),
        wait=wait_none(),
        reraise=True,
    )
