"""The relay under test: in-process (`RunningRelay`) or as a real process
(`RelayProcess`, `python -m smarthost -c CONFIG serve` with its JSON log in a file)."""

from __future__ import annotations

import functools
import json
import os
import signal
import smtplib
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from smarthost.config import Config
from smarthost.delivery import Delivery
from smarthost.relay import Relay
from smarthost.scheduler import DEFAULT_INTERVALS, Intervals

from support import ROOT
from support.configs import edit_config, write_config
from support.logs import events_named
from support.sink import SilentServer
from support.smtp import send_message, transaction
from support.waiting import wait_until


class RunningRelay:
    """A relay in this process, its delivery half too (`intervals` may be shorter)."""

    def __init__(self, config: Config, intervals: Intervals = DEFAULT_INTERVALS) -> None:
        self.config = config
        self.relay = Relay(config, functools.partial(Delivery, intervals=intervals))
        self.relay.start()
        self.host, self.port = "127.0.0.1", self.relay.listeners.ports[0]

    def client(self) -> smtplib.SMTP:
        return smtplib.SMTP(self.host, self.port, timeout=10)

    def send(self, sender: str, recipients: list[str], content: bytes | str) -> str:
        """Send one message; return the queue ID from the 250 reply."""
        with self.client() as client:
            client.ehlo("client.test")
            return transaction(client, sender, recipients, content)

    def stop(self) -> None:
        self.relay.stop()


class RelayProcess:
    """`python -m smarthost -c CONFIG serve` with its JSON log in a file."""

    def __init__(self, config_path: Path, log_path: Path) -> None:
        self.config_path = config_path
        self.log_path = log_path
        self.proc: subprocess.Popen | None = None
        self.port: int | None = None
        self.env: dict[str, str] | None = None  # extra environment variables

    def start(self, timeout: float = 20.0) -> RelayProcess:
        self.wait_started(self.spawn(), timeout)
        return self

    def spawn(self) -> int:
        """Start the process; the log offset its records start at."""
        offset = self.log_path.stat().st_size if self.log_path.exists() else 0
        with open(self.log_path, "ab") as log_file:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "smarthost", "-c", str(self.config_path), "serve"],
                stderr=log_file,
                cwd=ROOT,
                env={**os.environ, **(self.env or {})},
            )
        return offset

    def wait_started(self, offset: int, timeout: float) -> dict:
        """Its `started` record (logged after `offset`); `port` is set from it."""
        started = wait_until(
            lambda: self._started_since(offset), timeout, "the relay process to start"
        )
        self.port = int(started["listen"][0].rsplit(":", 1)[1])
        return started

    def _started_since(self, offset: int) -> dict | None:
        if self.proc is not None and self.proc.poll() is not None:
            pytest.fail(f"relay exited with {self.proc.returncode}:\n{self.log_path.read_text()}")
        for record in self.records(offset):
            if record.get("event") == "started":
                return record
        return None

    def records(self, offset: int = 0) -> list[dict]:
        if not self.log_path.exists():
            return []
        with open(self.log_path, "rb") as f:
            f.seek(offset)
            lines = f.read().decode("utf-8", "replace").splitlines()
        out = []
        for line in lines:
            try:
                record = json.loads(line)
            except ValueError:
                record = None
            out.append(
                record if isinstance(record, dict) else {"event": "<not json>", "line": line}
            )
        return out

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 20.0) -> int:
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            return self.proc.wait(timeout)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
                self.proc.wait()

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.kill()
        self.proc.wait()


def stuck_on(silent: SilentServer, tmp_path: Path, relay_process: Any) -> tuple[Path, Any, str]:
    """A relay process (from the `relay_process` fixture) whose one message's attempt is
    stuck on `silent` (timeouts of 60 s, long enough to outlast what the test does
    meanwhile): (config, relay, queue ID)."""
    config = write_config(tmp_path, silent.port)
    edit_config(config, 'connect_timeout = "3s"', 'connect_timeout = "60s"')
    edit_config(config, 'timeout = "5s"', 'timeout = "60s"')
    proc = relay_process(config).start()
    queue_id = send_message(proc.port, "<stuck@client.test>")
    wait_until(silent.accepted.is_set, 10, "the relay to connect to the silent upstream")
    return config, proc, queue_id


def start_amid(
    proc: RelayProcess,
    work: list[Callable[[], None]],
    stop: threading.Event,
    linger: float,
    join_timeout: float,
) -> dict:
    """Start the relay process while each of `work` runs in a thread of its own (until
    `stop` is set); stop them `linger` seconds after the relay's `started` record,
    which is returned."""
    threads = [threading.Thread(target=f) for f in work]
    for thread in threads:
        thread.start()
    try:
        started = proc.wait_started(proc.spawn(), 20.0)
        time.sleep(linger)  # keep the work going for a while after the start
    finally:
        stop.set()
        for thread in threads:
            thread.join(join_timeout)
    return started


def delivery_pid(proc: RelayProcess, offset: int = 0) -> int:
    started = wait_until(lambda: events_named(proc.records(offset), "started"), what="started")
    return started[-1]["delivery_pid"]
