"""Deadline polls instead of fixed sleeps."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import pytest


def poll(predicate: Callable[[], Any], timeout: float) -> Any:
    """Call `predicate` until it returns something truthy or `timeout` passes; its last
    result."""
    deadline = time.monotonic() + timeout
    while True:
        result = predicate()
        if result or time.monotonic() > deadline:
            return result
        time.sleep(0.01)


def wait_until(predicate: Callable[[], Any], timeout: float = 10.0, what: str = "condition") -> Any:
    """Poll `predicate` until it is truthy or `timeout` passes (then fail the test)."""
    result = poll(predicate, timeout)
    if not result:
        pytest.fail(f"timed out after {timeout}s waiting for {what}")
    return result


def eventually(predicate: Callable[[], Any], timeout: float) -> bool:
    """Poll `predicate` until it holds or `timeout` passes; the caller asserts with detail."""
    return bool(poll(predicate, timeout))
