"""The fixtures and pytest hooks of the suite. What they are built from (sinks, the relay
in-process and as a process, clients, config writers, log readers) lives in the
`support` package beside this file, which bench/bench.py shares."""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from smarthost import log
from smarthost.config import Config, load_config
from smarthost.scheduler import DEFAULT_INTERVALS, Intervals

from support.configs import write_config
from support.logs import LogCapture
from support.relay import RelayProcess, RunningRelay
from support.sink import RawUpstream, Sink
from support.torture import TortureOutcome

# -- the upstream ---------------------------------------------------------------------


@pytest.fixture
def sink() -> Iterator[Sink]:
    s = Sink().start()
    yield s
    s.stop()


# -- configuration --------------------------------------------------------------------


@pytest.fixture
def config(tmp_path: Path, sink: Sink) -> Config:
    return load_config(write_config(tmp_path, sink.port))


# -- the relay in-process -------------------------------------------------------------


@pytest.fixture
def events() -> Iterator[LogCapture]:
    capture = LogCapture()

    class Handler(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            capture.add(record)

    handler = Handler()
    log.logger.addHandler(handler)
    old_level = log.logger.level
    log.logger.setLevel(logging.DEBUG)
    yield capture
    log.logger.removeHandler(handler)
    log.logger.setLevel(old_level)


@pytest.fixture
def relay_factory() -> Iterator[Callable[..., RunningRelay]]:
    started: list[RunningRelay] = []

    def start(config: Config, intervals: Intervals = DEFAULT_INTERVALS) -> RunningRelay:
        running = RunningRelay(config, intervals)
        started.append(running)
        return running

    yield start
    for running in started:
        if running.relay.listeners is not None and running.relay.listeners.running:
            running.stop()


@pytest.fixture
def relay(config: Config, relay_factory) -> RunningRelay:
    return relay_factory(config)


# -- the relay as a real process ------------------------------------------------------


@pytest.fixture
def relay_process(tmp_path: Path) -> Iterator[Callable[[Path], RelayProcess]]:
    procs: list[RelayProcess] = []

    def make(config_path: Path) -> RelayProcess:
        proc = RelayProcess(config_path, tmp_path / "relay.log")
        procs.append(proc)
        return proc

    yield make
    for proc in procs:
        if proc.proc is not None and proc.proc.poll() is None:
            proc.kill()


# -- raw sockets: an upstream that records bytes as they came -------------------------


@pytest.fixture
def raw_upstream() -> Iterator[RawUpstream]:
    upstream = RawUpstream().start()
    yield upstream
    upstream.stop()


# -- hygiene --------------------------------------------------------------------------


@pytest.fixture(autouse=True)
def no_leaked_threads() -> Iterator[None]:
    """Every test leaves the thread count as it found it (watchdog's own habit)."""
    before = set(threading.enumerate())
    yield
    leaked = lambda: [t for t in threading.enumerate() if t not in before and t.is_alive()]  # noqa: E731
    deadline = time.monotonic() + 10
    while leaked() and time.monotonic() < deadline:
        time.sleep(0.02)
    assert not leaked(), f"threads leaked: {leaked()}"


# -- torture: fault scenarios with counted outcomes -----------------------------------


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--torture",
        action="store_true",
        help="run the long torture rounds (tests marked torture) and use their full sizes",
    )


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if config.getoption("--torture"):
        return
    skip = pytest.mark.skip(reason="long torture round: run with --torture (make torture)")
    for item in items:
        if "torture" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def torture_size(request: pytest.FixtureRequest) -> Callable[[int, int], int]:
    """`torture_size(small, large)`: `large` under --torture, else `small` (make test)."""
    full = request.config.getoption("--torture")
    return lambda small, large: large if full else small


@pytest.fixture
def torture_report() -> Iterator[Callable[..., TortureOutcome]]:
    """`torture_report(scenario, **counts)` records one line of the `make torture` report.

    Lines go to the JSON-lines file named by $SMARTHOST_TORTURE_REPORT (make torture sets
    it; scripts/torture_report.py prints the table). The test itself asserts the counts.
    """
    outcomes: list[TortureOutcome] = []

    def record(scenario: str, **counts: Any) -> TortureOutcome:
        outcome = TortureOutcome(scenario, **counts)
        outcomes.append(outcome)
        return outcome

    yield record
    target = os.environ.get("SMARTHOST_TORTURE_REPORT")
    if target and outcomes:
        with open(target, "a", encoding="utf-8") as f:
            for outcome in outcomes:
                f.write(json.dumps(outcome.__dict__) + "\n")
