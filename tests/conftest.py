"""Shared fixtures: a real aiosmtpd upstream, configs on disk, the relay in-process and
as a real process. Everything talks over real loopback sockets."""

from __future__ import annotations

import functools
import json
import os
import re
import signal
import smtplib
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from aiosmtpd.controller import Controller

from smarthost import log
from smarthost.config import Config, load_config
from smarthost.delivery import Delivery
from smarthost.relay import Relay
from smarthost.scheduler import DEFAULT_INTERVALS, Intervals

ROOT = Path(__file__).resolve().parent.parent


def wait_until(predicate: Callable[[], Any], timeout: float = 10.0, what: str = "condition") -> Any:
    """Poll `predicate` until it is truthy or `timeout` passes (then fail the test)."""
    deadline = time.monotonic() + timeout
    while True:
        result = predicate()
        if result:
            return result
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.01)


# -- the upstream ---------------------------------------------------------------------


@dataclass
class Received:
    mail_from: str
    rcpt_tos: list[str]
    content: bytes
    at: float
    mail_options: list[str] = field(default_factory=list)


class SinkHandler:
    """Records what arrives; replies can be scripted per recipient or for DATA."""

    def __init__(self) -> None:
        self.messages: list[Received] = []
        self.rcpt_replies: dict[str, str] = {}
        self.mail_reply: str | None = None
        self.data_reply: str | None = None
        self.pipelining = True  # offered in EHLO, as Postfix and most upstreams do
        self.pipelined: list[bool] = []  # per MAIL: DATA had already arrived with it
        self.cond = threading.Condition()

    async def handle_EHLO(self, server, session, envelope, hostname, responses):
        session.host_name = hostname
        if self.pipelining:
            return [*responses[:-1], "250-PIPELINING", responses[-1]]
        return responses

    async def handle_MAIL(self, server, session, envelope, address, options):
        self.pipelined.append(b"\nDATA\r\n" in bytes(server._reader._buffer))
        if self.mail_reply:
            return self.mail_reply
        # aiosmtpd spells the null sender "<>"; record it as the empty address.
        envelope.mail_from = address
        envelope.mail_options.extend(options)
        return "250 2.1.0 OK"

    async def handle_RCPT(self, server, session, envelope, address, options):
        reply = self.rcpt_replies.get(address)
        if reply:
            return reply
        envelope.rcpt_tos.append(address)
        return "250 2.1.5 OK"

    async def handle_DATA(self, server, session, envelope):
        if self.data_reply:
            return self.data_reply
        with self.cond:
            self.messages.append(
                Received(
                    "" if envelope.mail_from == "<>" else envelope.mail_from,
                    list(envelope.rcpt_tos),
                    envelope.original_content,
                    time.monotonic(),
                    list(envelope.mail_options),
                )
            )
            self.cond.notify_all()
        return "250 2.0.0 OK: stored"


class Sink:
    """A real aiosmtpd server on loopback standing in for the smarthost upstream."""

    def __init__(self, port: int = 0) -> None:
        self.handler = SinkHandler()
        self.port = port
        self.controller: Controller | None = None

    def start(self) -> Sink:
        controller = Controller(self.handler, hostname="127.0.0.1", port=self.port)
        if self.port == 0:
            # aiosmtpd connects to its own port once started; learn it first.
            original = controller._trigger_server

            def trigger() -> None:
                controller.port = controller.server.sockets[0].getsockname()[1]
                original()

            controller._trigger_server = trigger  # type: ignore[method-assign]
        controller.start()
        self.port = controller.port
        self.controller = controller
        return self

    def stop(self) -> None:
        if self.controller is not None:
            self.controller.stop()
            self.controller = None

    @property
    def messages(self) -> list[Received]:
        return self.handler.messages

    def wait_for(self, count: int, timeout: float = 10.0) -> list[Received]:
        with self.handler.cond:
            ok = self.handler.cond.wait_for(lambda: len(self.messages) >= count, timeout)
        if not ok:
            pytest.fail(f"sink got {len(self.messages)} messages, expected {count}")
        return list(self.messages)


@pytest.fixture
def sink() -> Iterator[Sink]:
    s = Sink().start()
    yield s
    s.stop()


# -- configuration --------------------------------------------------------------------


def write_config(
    tmp_path: Path, sink_port: int, extra: str = "", *, listen: str = "127.0.0.1:0"
) -> Path:
    """A relay config: listen on a free port, spool under tmp_path, forward to the sink."""
    path = tmp_path / "smarthost.toml"
    spool = tmp_path / "spool"
    path.write_text(
        f"""
hostname = "relay.test"
[smtp]
listen = ["{listen}"]
[spool]
dir = "{spool}"
[delivery]
workers = 4
retry_min = "1s"
retry_max = "2s"
connect_timeout = "3s"
timeout = "5s"
[log]
level = "debug"
{extra}
[[backend]]
name = "sink"
host = "127.0.0.1"
port = {sink_port}
tls = "none"
fail_timeout = "1s"
"""
    )
    return path


@pytest.fixture
def config(tmp_path: Path, sink: Sink) -> Config:
    return load_config(write_config(tmp_path, sink.port))


# -- the relay in-process -------------------------------------------------------------


class LogCapture:
    """Collects the relay's events (the same records the JSON formatter sees)."""

    def __init__(self) -> None:
        self.records: list[dict] = []
        self._lock = threading.Lock()

    def add(self, record: Any) -> None:
        with self._lock:
            self.records.append({"event": record.getMessage(), **record.__dict__})

    def events(self, name: str, **match: Any) -> list[dict]:
        with self._lock:
            return [
                r
                for r in self.records
                if r["event"] == name and all(r.get(k) == v for k, v in match.items())
            ]


@pytest.fixture
def events() -> Iterator[LogCapture]:
    import logging

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
            client.mail(sender)
            for rcpt in recipients:
                code, msg = client.rcpt(rcpt)
                assert code == 250, (code, msg)
            code, msg = client.data(content)
            assert code == 250, (code, msg)
            return msg.decode().rsplit(" ", 1)[-1]

    def stop(self) -> None:
        self.relay.stop()


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
                out.append(json.loads(line))
            except ValueError:
                out.append({"event": "<not json>", "line": line})
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


# -- raw sockets: a client that sends bytes as given, an upstream that records them ------


class RawSMTP:
    """An SMTP client on a bare socket: sends exactly the bytes it is given and reads
    replies line by line, for dialogues smtplib would refuse or fix up. `greeting` is
    the first reply's last line (`421 4.7.0 ...` when the relay is full)."""

    def __init__(self, port: int, host: str = "127.0.0.1", timeout: float = 30.0) -> None:
        self.sock = socket.create_connection((host, port), timeout=timeout)
        self._buffer = b""
        self.lines: list[bytes] = []  # every reply line received, without CRLF
        self.greeting = self.reply()

    def send(self, data: bytes | str) -> None:
        self.sock.sendall(data.encode() if isinstance(data, str) else data)

    def command(self, line: bytes | str) -> bytes:
        """Send `line` + CRLF; the last line of its reply."""
        self.send((line.encode() if isinstance(line, str) else line) + b"\r\n")
        return self.reply()

    def reply(self) -> bytes:
        """The last line of the next (possibly multi-line) reply; b"" if the peer closed."""
        while True:
            line = self._line()
            if not line:
                return b""
            self.lines.append(line)
            if line[3:4] != b"-":
                return line

    def _line(self) -> bytes:
        while b"\r\n" not in self._buffer:
            try:
                chunk = self.sock.recv(65536)
            except ConnectionResetError:
                chunk = b""
            if not chunk:
                return b""
            self._buffer += chunk
        line, self._buffer = self._buffer.split(b"\r\n", 1)
        return line

    def wait_closed(self, timeout: float = 30.0) -> bytes:
        """Read until the peer closes (a reset counts); what came before. Fails the test
        if the connection is still open after `timeout`."""
        self.sock.settimeout(timeout)
        rest = self._buffer
        self._buffer = b""
        try:
            while True:
                chunk = self.sock.recv(65536)
                if not chunk:
                    return rest
                rest += chunk
        except ConnectionResetError:
            return rest
        except socket.timeout:
            pytest.fail(f"the peer kept the connection open for {timeout}s; got {rest[-200:]!r}")

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> RawSMTP:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


@dataclass
class RawTransaction:
    """One transaction as the wire carried it: `data` is every byte between the 354 and
    the CRLF . CRLF that ended it (that CRLF included), dot-stuffing and all."""

    mail: bytes
    rcpts: list[bytes]
    data: bytes


class RawUpstream:
    """An upstream speaking just enough SMTP (220, 250 to EHLO/MAIL/RCPT/RSET/NOOP,
    354, 221) that records the bytes of each DATA exactly as they came, up to the
    first CRLF . CRLF: no library between the relay's bytes and the test."""

    def __init__(self) -> None:
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.listener.settimeout(0.1)
        self.port = self.listener.getsockname()[1]
        self.transactions: list[RawTransaction] = []
        self.commands: list[bytes] = []
        self.cond = threading.Condition()
        self._halt = threading.Event()
        self._threads: list[threading.Thread] = []
        self._acceptor = threading.Thread(target=self._accept, name="raw-upstream")

    def start(self) -> RawUpstream:
        self._acceptor.start()
        return self

    def stop(self) -> None:
        self._halt.set()
        self._acceptor.join(10)
        for thread in self._threads:
            thread.join(10)
        self.listener.close()

    def wait_for(self, count: int, timeout: float = 30.0) -> list[RawTransaction]:
        with self.cond:
            ok = self.cond.wait_for(lambda: len(self.transactions) >= count, timeout)
        if not ok:
            pytest.fail(f"raw upstream got {len(self.transactions)} transactions, not {count}")
        return list(self.transactions)

    def _accept(self) -> None:
        while not self._halt.is_set():
            try:
                conn, _ = self.listener.accept()
            except socket.timeout:
                continue
            thread = threading.Thread(target=self._serve, args=(conn,), name="raw-upstream-conn")
            self._threads.append(thread)
            thread.start()

    def _serve(self, conn: socket.socket) -> None:
        conn.settimeout(0.1)
        buffer = bytearray()

        def until(marker: bytes) -> bytes | None:
            searched = 0  # where the marker may still begin in what is buffered
            while True:
                found = buffer.find(marker, searched)
                if found >= 0:
                    out = bytes(buffer[: found + len(marker)])
                    del buffer[: found + len(marker)]
                    return out
                searched = max(len(buffer) - len(marker) + 1, 0)
                if self._halt.is_set():
                    return None
                try:
                    chunk = conn.recv(65536)
                except socket.timeout:
                    continue
                except OSError:
                    return None
                if not chunk:
                    return None
                buffer.extend(chunk)

        mail, rcpts = b"", []
        try:
            conn.sendall(b"220 raw.test ESMTP\r\n")
            while (line := until(b"\r\n")) is not None:
                line = line[:-2]
                with self.cond:
                    self.commands.append(line)
                verb = line[:4].upper()
                if verb in (b"EHLO", b"HELO"):
                    conn.sendall(b"250-raw.test\r\n250-8BITMIME\r\n250 SMTPUTF8\r\n")
                elif verb == b"MAIL":
                    mail, rcpts = line, []
                    conn.sendall(b"250 2.1.0 Ok\r\n")
                elif verb == b"RCPT":
                    rcpts.append(line)
                    conn.sendall(b"250 2.1.5 Ok\r\n")
                elif verb == b"DATA":
                    conn.sendall(b"354 go ahead\r\n")
                    data = until(b"\r\n.\r\n")
                    if data is None:
                        break
                    with self.cond:
                        self.transactions.append(RawTransaction(mail, rcpts, data[:-3]))
                        self.cond.notify_all()
                    conn.sendall(b"250 2.0.0 Ok: recorded\r\n")
                elif verb == b"QUIT":
                    conn.sendall(b"221 2.0.0 Bye\r\n")
                    break
                else:  # RSET, NOOP
                    conn.sendall(b"250 2.0.0 Ok\r\n")
        except OSError:
            pass
        finally:
            conn.close()


@pytest.fixture
def raw_upstream() -> Iterator[RawUpstream]:
    upstream = RawUpstream().start()
    yield upstream
    upstream.stop()


# -- memory of the relay's processes --------------------------------------------------


def process_tree(pid: int) -> list[int]:
    """`pid` and its live descendants (the relay and its delivery process), from
    /proc/PID/task/*/children."""
    found, todo = [], [pid]
    while todo:
        current = todo.pop()
        found.append(current)
        for children in Path(f"/proc/{current}/task").glob("*/children"):
            try:
                todo.extend(int(child) for child in children.read_text().split())
            except OSError:
                continue  # the thread or the process ended meanwhile
    return found


def vm_rss_kib(pid: int) -> int:
    """The resident memory of one process in KiB (0 once it is gone)."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


class RssSampler:
    """Samples the RSS of a process tree every `every` seconds in a thread while the
    `with` block runs: `baseline` (KiB per pid, taken on entry), `peak` (the largest
    total), `peaks` (per pid). Figures in MiB through `growth_mib`/`summary`."""

    def __init__(self, pid: int, every: float = 0.02) -> None:
        self.pid = pid
        self.every = every
        self.baseline: dict[int, int] = {}
        self.peaks: dict[int, int] = {}
        self.peak = 0
        self._halt = threading.Event()
        self._thread = threading.Thread(target=self._run, name="rss-sampler")

    def sample(self) -> dict[int, int]:
        return {p: vm_rss_kib(p) for p in process_tree(self.pid)}

    def _record(self, rss: dict[int, int]) -> None:
        for p, kib in rss.items():
            self.peaks[p] = max(self.peaks.get(p, 0), kib)
        self.peak = max(self.peak, sum(rss.values()))

    def _run(self) -> None:
        while not self._halt.wait(self.every):
            self._record(self.sample())

    def __enter__(self) -> RssSampler:
        self.baseline = self.sample()
        self._record(self.baseline)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._halt.set()
        self._thread.join(10)
        self._record(self.sample())

    @property
    def growth_mib(self) -> float:
        """Peak total minus the baseline total, in MiB."""
        return (self.peak - sum(self.baseline.values())) / 1024

    def summary(self) -> str:
        parts = [
            f"{p}: {self.baseline.get(p, 0) / 1024:.1f}->{kib / 1024:.1f}"
            for p, kib in sorted(self.peaks.items())
        ]
        return f"RSS +{self.growth_mib:.1f} MiB peak over idle (MiB per pid {', '.join(parts)})"


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


def spool_files(root: Path) -> dict[str, list[str]]:
    """Names in each spool directory, for assertions."""
    return {
        d.name: sorted(p.name for p in d.iterdir()) for d in sorted(root.iterdir()) if d.is_dir()
    }


def env_value(name: str, default: str) -> str:
    return os.environ.get(name, default)


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


@dataclass
class TortureOutcome:
    """What one scenario did to the messages it sent: the counts of the torture report."""

    scenario: str
    rounds: int = 0
    acknowledged: int = 0  # answered 250 (or accepted by smarthost-sendmail)
    delivered: int = 0  # distinct messages the upstream got
    bounced: int = 0  # distinct messages whose sender got a DSN instead
    lost: int = 0  # acknowledged, neither delivered nor bounced: must be 0
    duplicated: int = 0  # extra copies the upstream got
    in_flight: int = 0  # messages an attempt was on when the fault hit (bounds duplicated)
    note: str = ""


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


# -- logfmt (log.format = "text") -----------------------------------------------------

_LOGFMT_KEY = re.compile(r"[a-z_][a-z0-9_]*")
_LOGFMT_ESCAPES = {'"': '"', "\\": "\\", "n": "\n", "r": "\r", "t": "\t"}
_LOGFMT_HEX = {"x": 2, "u": 4, "U": 8}


def _logfmt_token(line: str, pos: int) -> tuple[str, int]:
    """One value starting at `pos`: bare up to the next space, or quoted with escapes."""
    if line[pos : pos + 1] != '"':
        end = line.find(" ", pos)
        end = len(line) if end < 0 else end
        bare = line[pos:end]
        assert bare and '"' not in bare and "=" not in bare and "\\" not in bare, bare
        return bare, end
    out, pos = [], pos + 1
    while True:
        char = line[pos]
        if char == '"':
            return "".join(out), pos + 1
        if char != "\\":
            out.append(char)
            pos += 1
            continue
        kind = line[pos + 1]
        if kind in _LOGFMT_ESCAPES:
            out.append(_LOGFMT_ESCAPES[kind])
            pos += 2
        else:
            width = _LOGFMT_HEX[kind]
            out.append(chr(int(line[pos + 2 : pos + 2 + width], 16)))
            pos += 2 + width


def parse_logfmt(line: str) -> tuple[list[str], list[tuple[str, str]]]:
    """`time level event key=value ...` as (the three positional words, the pairs in
    order). Strict: anything a logfmt reader could take two ways fails the test."""
    words = line.split(" ", 3)
    positional, rest = words[:3], words[3] if len(words) > 3 else ""
    pairs, pos = [], 0
    while pos < len(rest):
        key = _LOGFMT_KEY.match(rest, pos)
        assert key and rest[key.end()] == "=", f"no key at {rest[pos:]!r}"
        value, pos = _logfmt_token(rest, key.end() + 1)
        pairs.append((key.group(), value))
        if pos < len(rest):
            assert rest[pos] == " ", f"junk after a value: {rest[pos:]!r}"
            pos += 1
    return positional, pairs
