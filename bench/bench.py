#!/usr/bin/env python3
"""End-to-end benchmark of the real relay: client -> smarthost -> sink, all on 127.0.0.1.

    load (threads, smtplib) --SMTP--> smarthost serve (subprocess) --SMTP--> sink (aiosmtpd)
      t_data:  DATA sent                   spool: temp dir, fsynced       t_arrival: message in
      t_reply: final reply read

`python bench/bench.py` starts a sink (an aiosmtpd server in a child process), writes a
throw-away config (spool in a temp dir, `[delivery] workers = 8`, one backend: the
sink), and for each scenario starts the relay with `python -m smarthost -c CFG serve`,
sends a warm-up (not counted), then the load, waits until every accepted message
reached the sink, reads the relay's peak memory, stops it with SIGTERM and prints one
block of figures. `serve` is two processes: the relay (listeners, spool commits; called
"receiver" below) and the delivery process it starts (scheduler, senders; `delivery_pid`
in its `started` event): memory and CPU figures are the sum of both, each shown too.

Scenarios:
  flat out  --n messages of --size bytes over --clients sessions, as fast as they go:
            the relay's capacity. A backlog may build, so `forward` includes queueing.
  paced     --rate msgs/s offered for --duration s over --paced-clients sessions, on a
            fixed timetable (a late message does not delay the next one's slot): the
            relay's forwarding delay at a steady load below its capacity. Several
            sessions, so that one slow commit does not hold up the timetable (one
            lock-step session cannot offer more than 1 / its transaction time).
  backlog   --backlog messages (100,000) waiting in the spool for an upstream that is
            down. First the fixture: written straight into a spool (msg/ID, then
            queue/ID with the spool's own Envelope: 1 attempt, next attempt an hour
            away, waiting for group "default", as a relay leaves mail when every backend
            was down; no fsync, no relay running), then `sync`. The sink's port is bound
            but not listening (connections refused) until the drain; the config has it
            as the only backend, with `fail_timeout = "1s"` (so that the relay tries it
            again a second after it failed, not 30 s). Then:
            empty queue: the same config on an empty spool, --backlog-new messages
              (1000) flat out over --clients sessions after the warm-up: the reference
            start: Popen -> a client connecting to the listen port reads a 220 greeting
              (polled every 5 ms); when `started` was logged; when the relay settled
              (both processes under 10 % of a core for 0.5 s: its queue is loaded)
            loaded: RSS (VmRSS) of both processes once settled, and the peak so far
            new mail: warm-up, then --backlog-new messages as for the empty queue, while
              the backlog waits (deferred too: the upstream is down); `accepted` and its
              ratio to the empty queue's (and to flat out's when it ran: that one
              forwarded at the same time, so the empty-queue ratio is the fair one)
            drain: the sink starts listening; msgs/s from then until every message
              (backlog and new) arrived, or nothing arrived for --wait s; when the first,
              10 %, 50 %, 90 % arrived; the peak RSS of the drain (VmHWM reset just
              before, through /proc/PID/clear_refs); the relay's CPU during the drain

Figures (times are time.time() of this machine, which the processes share):
  on time      paced: messages whose MAIL went out within 10 ms of their slot; fewer
               than all means the offered rate was not met
  warm-up      --warmup messages sent flat out over the scenario's sessions before it,
               not counted; shown: how long the relay took to forward the first one
               (a cold start: the upstream session is opened then)
  accepted     messages answered 250 / (last 250 - start of the load)
  end-to-end   accepted messages that reached the sink / (last arrival - start of the
               load): the sustained throughput; below `accepted` when a backlog builds
  DATA->250    per message, DATA command sent -> final reply read: the 354 round trip,
               the text, and the relay's durable commit (write, fsync, rename)
  forward      per message, 250 read by the client -> the sink has the whole message
  lost         answered 250 but not arrived (by Message-ID) within --wait seconds
  duplicates   arrivals beyond the first of a Message-ID (delivery is at-least-once)
  refused      messages not answered 250: a 4xx/5xx reply, a broken session, or never
               sent because every session gave up
  CPU          user+system time of the relay (both processes, read live from
               /proc/PID/stat: the delivery process's time reaches the relay's cutime
               only when it is reaped, at the very end), the load generator (this
               process) and the sink, from the start of the load until the last
               arrival; ms/msg is the relay's per accepted message
  peak RSS     the sum of the two processes' VmHWM, read just before SIGTERM (warm-up
               included; two peaks that may not coincide, so at most their sum)
  SIGTERM      the relay's exit status and how long it took to exit; `log` counts the
               relay's log events; lines marked `!` are its log records at warning level
               or above (or non-JSON stderr), and the load generator's session errors

The header line gives the machine's load average (other work on the machine skews every
figure) and the spool disk's durable-write rate, measured for one second: it bounds the
relay's accept rate, and on a virtual disk it varies by several times from run to run.

Percentiles are nearest-rank. The relay logs at level "info", the shipped default (the
`started` event, an info event, says which port it bound), to a file in the temp dir.
The load generator (~0.3 ms CPU per message) and the sink (~1.5 ms: aiosmtpd) share the
machine's cores with the relay, as they would with any relay under test.

A benchmark, not a test: it asserts nothing about speed. It exits 1 when something went
wrong: the relay did not start, logged a warning or an error (in the backlog scenario
but `backend_down`, which it causes), refused or lost a message, or did not exit 0 on
SIGTERM.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import multiprocessing
import os
import re
import shutil
import signal
import smtplib
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from dataclasses import dataclass
from datetime import datetime
from email.utils import formatdate
from multiprocessing.connection import Connection
from typing import Any, Callable

from smarthost.config import DEFAULT_GROUP
from smarthost.spool import DEFERRED, QUEUE, Envelope, Recipient, Spool, new_id

HOST = "127.0.0.1"
SENDER = "load@client.example"
RECIPIENT = "sink@upstream.example"
FILLER = (
    b"The quick brown fox jumps over the lazy dog; "
    b"0123456789 ABCDEFGHIJKLMNOPQRSTUVWXYZ abcdefghijklmnopqrstuvwxyz.\r\n"
)
MESSAGE_ID = re.compile(rb"(?im)^message-id:[ \t]*(<[^>\r\n]*>)")
START_TIMEOUT = 15.0  # seconds for the relay (or the sink) to announce itself
STOP_TIMEOUT = 30.0  # seconds for the relay to exit after SIGTERM
POLL_INTERVAL = 0.05
MAX_SESSION_FAILURES = 5  # in a row, then a client thread gives up
LATE = 0.010  # paced: a message sent this much after its slot counts as late
SHOWN_PROBLEMS = 10


# -- messages ----------------------------------------------------------------------------


class Messages:
    """Message texts of `size` bytes (header and body, before the final "."), unique by
    Message-ID.

    The filler is built once; per message a short header is formatted and the filler
    cut to length. No line starts with "." so the text needs no dot-stuffing.
    """

    def __init__(self, run_id: str, size: int) -> None:
        self.run_id = run_id
        self.size = size
        self.date = formatdate(localtime=False).encode()
        self.filler = FILLER * (size // len(FILLER) + 1)

    def message_id(self, scenario: str, seq: int) -> str:
        return f"<{self.run_id}.{scenario}.{seq}@bench.smarthost>"

    def header(self, scenario: str, seq: int) -> bytes:
        return (
            b"From: <%s>\r\nTo: <%s>\r\nDate: %s\r\nSubject: bench %s #%d\r\n"
            % (
                SENDER.encode(),
                RECIPIENT.encode(),
                self.date,
                scenario.encode(),
                seq,
            )
            + b"Message-ID: %s\r\n\r\n" % self.message_id(scenario, seq).encode()
        )

    def text(self, scenario: str, seq: int) -> bytes:
        """The DATA payload, terminating "." included."""
        header = self.header(scenario, seq)
        body = self.filler[: max(0, self.size - len(header) - 2)]
        if body.endswith(b"\r"):  # no bare CR where the cut falls
            body = body[:-1] + b" "
        return header + body + b"\r\n.\r\n"


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a live process, from /proc (0.0 once it is gone)."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii") as f:
            # Fields after the ")" closing the command name: utime is the 12th, stime the 13th.
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def proc_status_kib(pid: int, key: str) -> int:
    """A size line of /proc/PID/status (`VmRSS`, `VmHWM`) in KiB; 0 once the process is gone."""
    try:
        with open(f"/proc/{pid}/status", encoding="ascii") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def reset_peak_rss(pid: int) -> bool:
    """Set a process's VmHWM back to its current RSS (Linux 4.0+: "5" to clear_refs)."""
    try:
        with open(f"/proc/{pid}/clear_refs", "w", encoding="ascii") as f:
            f.write("5")
    except OSError:
        return False
    return True


def free_port() -> int:
    """A port nothing listens on now (the relay binds it a moment later)."""
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        return int(sock.getsockname()[1])


def durable_writes(directory: str, seconds: float = 1.0) -> tuple[float, float]:
    """(ops/s, p50 ms) of one loop of: write 4 KiB, fsync, rename, fsync the directory.

    The disk's durable-write rate bounds any relay that fsyncs before its 250; on a
    shared or virtual disk it varies from minute to minute, so it is measured each run.
    """
    probe = os.path.join(directory, "disk-probe")
    os.mkdir(probe)
    data, took = b"x" * 4096, []
    dir_fd = os.open(probe, os.O_RDONLY)
    try:
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            began = time.monotonic()
            tmp = os.path.join(probe, "tmp")
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            try:
                os.write(fd, data)
                os.fsync(fd)
            finally:
                os.close(fd)
            os.rename(tmp, os.path.join(probe, f"f{len(took) % 16}"))
            os.fsync(dir_fd)
            took.append(time.monotonic() - began)
    finally:
        os.close(dir_fd)
        shutil.rmtree(probe, ignore_errors=True)
    return len(took) / sum(took), percentile(sorted(took), 50) * 1000


# -- the sink: an aiosmtpd server in a child process --------------------------------------


class SinkHandler:
    """Records (Message-ID, arrival time) of every message and answers 250. Offers
    PIPELINING, as Postfix, Exim and the big providers' submission servers do."""

    def __init__(self) -> None:
        self.arrivals: list[tuple[str, float]] = []

    async def handle_EHLO(
        self, server: Any, session: Any, envelope: Any, hostname: str, responses: list
    ) -> list:
        session.host_name = hostname
        return [*responses[:-1], "250-PIPELINING", responses[-1]]

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        now = time.time()
        content: bytes = envelope.content
        end = content.find(b"\r\n\r\n")
        found = MESSAGE_ID.search(content, 0, end if end >= 0 else len(content))
        self.arrivals.append((found.group(1).decode("ascii", "replace") if found else "-", now))
        return "250 2.0.0 Ok"


def sink_main(conn: Connection) -> None:
    """Child process: bind a free port and send it, then answer requests: "listen" ->
    serve SMTP on it, then say "listening" (until then a connection is refused: an
    upstream that is down); "poll" -> the arrivals since the last poll; anything else
    (or EOF) -> exit."""
    import logging

    from aiosmtpd.smtp import SMTP

    logging.getLogger("mail.log").setLevel(logging.WARNING)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent stops us (Ctrl-C reaches both)
    handler = SinkHandler()

    async def serve() -> None:
        loop = asyncio.get_running_loop()
        # Bound but not listening: the port is ours, and a connection to it is refused.
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((HOST, 0))
        servers: list[asyncio.AbstractServer] = []
        starting: list[asyncio.Task[None]] = []
        stopped = loop.create_future()

        async def listen() -> None:
            servers.append(
                await loop.create_server(
                    lambda: SMTP(handler, hostname="bench-sink", data_size_limit=None),
                    sock=sock,
                    backlog=1024,
                )
            )
            conn.send("listening")

        def on_request() -> None:
            try:
                request = conn.recv()
            except EOFError:
                request = "stop"
            if request == "poll":
                conn.send(handler.arrivals)
                handler.arrivals = []
            elif request == "listen" and not starting:
                starting.append(loop.create_task(listen()))
            elif not stopped.done():
                stopped.set_result(None)

        loop.add_reader(conn.fileno(), on_request)
        conn.send(sock.getsockname()[1])
        await stopped
        loop.remove_reader(conn.fileno())
        for server in servers:
            server.close()
        sock.close()

    asyncio.run(serve())


class Sink:
    """The parent's handle on the sink process; accumulates arrivals by Message-ID.

    With `listening=False` the sink's port refuses connections until `listen()`.
    """

    def __init__(self, listening: bool = True) -> None:
        ctx = multiprocessing.get_context("spawn")
        self.conn, child = ctx.Pipe()
        self.process = ctx.Process(target=sink_main, args=(child,), name="bench-sink")
        self.process.start()
        child.close()
        if not self.conn.poll(START_TIMEOUT):
            self.stop()
            raise RuntimeError("the sink did not start")
        self.port: int = self.conn.recv()
        self.arrivals: dict[str, list[float]] = {}
        if listening:
            self.listen()

    def listen(self) -> float:
        """Start serving; returns the time.time() from which connections are accepted."""
        self.conn.send("listen")
        if not self.conn.poll(START_TIMEOUT) or self.conn.recv() != "listening":
            raise RuntimeError("the sink did not start listening")
        return time.time()

    def poll(self) -> list[str]:
        """Collect the arrivals since the last poll; returns their Message-IDs."""
        self.conn.send("poll")
        new = self.conn.recv()
        for message_id, when in new:
            self.arrivals.setdefault(message_id, []).append(when)
        return [message_id for message_id, _ in new]

    def wait_for(
        self,
        message_ids: set[str],
        timeout: float,
        idle: float | None = None,
        on_poll: Callable[[], None] | None = None,
    ) -> None:
        """Poll until every one of `message_ids` arrived, `timeout` seconds passed, or
        (with `idle`) nothing new arrived for `idle` seconds."""
        now = time.monotonic()
        deadline, last_new = now + timeout, now
        missing = set(message_ids).difference(self.arrivals)
        while missing:
            arrived = self.poll()
            now = time.monotonic()
            if arrived:
                missing.difference_update(arrived)
                last_new = now
            if on_poll is not None:
                on_poll()
            if not missing or now > deadline or (idle is not None and now - last_new > idle):
                return
            time.sleep(POLL_INTERVAL)

    def cpu_seconds(self) -> float:
        return cpu_seconds(self.process.pid or 0)

    def stop(self) -> None:
        with contextlib.suppress(OSError):
            self.conn.send("stop")
        self.process.join(5)
        if self.process.is_alive():
            self.process.kill()
            self.process.join()


# -- the relay under test ------------------------------------------------------------------


def spool_dir(directory: str, label: str) -> str:
    return os.path.join(directory, f"spool-{label}")


def write_config(
    directory: str,
    label: str,
    sink_port: int,
    workers: int,
    listen_port: int = 0,
    fail_timeout: str | None = None,
) -> str:
    """A config for one relay: its own spool, log level info, the sink as the backend."""
    path = os.path.join(directory, f"smarthost-{label}.toml")
    spool = json.dumps(spool_dir(directory, label))  # a TOML basic string
    with open(path, "w", encoding="utf-8") as f:
        f.write(
            f'hostname = "bench.smarthost.test"\n\n'
            f'[smtp]\nlisten = ["{HOST}:{listen_port}"]\n\n'
            f"[spool]\ndir = {spool}\n\n"
            f"[delivery]\nworkers = {workers}\n\n"
            f'[log]\nlevel = "info"\n\n'
            f'[[backend]]\nname = "sink"\nhost = "{HOST}"\nport = {sink_port}\ntls = "none"\n'
            + (f'fail_timeout = "{fail_timeout}"\n' if fail_timeout else "")
        )
    return path


@dataclass
class RelayEnd:
    """What the relay looked like at the end of a scenario."""

    peak_rss_kib: list[int]  # VmHWM of the relay process, then of its delivery process
    exit_code: int | None  # None: did not exit within STOP_TIMEOUT (then killed)
    stop_seconds: float
    events: Counter[str]
    problems: list[str]  # log records at warning level or above, non-JSON stderr lines


class Relay:
    """`python -m smarthost -c CFG serve` as a subprocess, its stderr (the log) to a file.

    `serve` runs as two processes: this one (listeners, spool commits) and a delivery
    process it starts (scheduler, senders), named `delivery_pid` in its `started` event.
    Memory and CPU figures are the sum of both.
    """

    def __init__(
        self,
        config: str,
        directory: str,
        label: str,
        port: int = 0,
        timeout: float = START_TIMEOUT,
    ) -> None:
        """With `port` (the config's listen port), `accept_seconds` is the time from
        Popen until a client connecting there was greeted."""
        self.log_path = os.path.join(directory, f"relay-{label}.log")
        self.delivery_pid = 0
        self.started_at = 0.0  # time.time() of its `started` event
        self.accept_seconds = math.nan
        with open(self.log_path, "wb") as log:
            self.popen_time = time.time()
            self.process = subprocess.Popen(
                [sys.executable, "-m", "smarthost", "-c", config, "serve"],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
            )
        if port:
            self.accept_seconds = self.wait_accepting(port, timeout)
        self.port = self._wait_started(timeout)

    def _wait_started(self, timeout: float) -> int:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for record in self._records():
                if record.get("event") == "started":
                    self.delivery_pid = int(record.get("delivery_pid") or 0)
                    with contextlib.suppress(KeyError, TypeError, ValueError):
                        self.started_at = datetime.fromisoformat(record["time"]).timestamp()
                    return int(record["listen"][0].rsplit(":", 1)[1])
            if self.process.poll() is not None:
                break
            time.sleep(POLL_INTERVAL)
        self.kill()
        log = "\n".join(self._lines()[-20:])
        raise RuntimeError(f"the relay did not start (exit {self.process.returncode}):\n{log}")

    def kill(self) -> None:
        self.process.kill()
        self.process.wait()
        if self.delivery_pid:  # it dies with us (PR_SET_PDEATHSIG); this is in case not
            with contextlib.suppress(OSError):
                os.kill(self.delivery_pid, signal.SIGKILL)

    def _lines(self) -> list[str]:
        with open(self.log_path, encoding="utf-8", errors="replace") as f:
            return f.read().splitlines()

    def _records(self) -> list[dict[str, Any]]:
        records = []
        for line in self._lines():
            try:
                record = json.loads(line)
            except ValueError:
                record = None
            records.append(record if isinstance(record, dict) else {"level": "stderr", "": line})
        return records

    def pids(self) -> list[int]:
        """The relay process, then its delivery process (0: not known)."""
        return [self.process.pid, self.delivery_pid]

    def memory_kib(self, key: str) -> list[int]:
        """`VmRSS` (now) or `VmHWM` (peak) of each process, read from /proc."""
        return [proc_status_kib(pid, key) if pid else 0 for pid in self.pids()]

    def reset_peak_rss(self) -> bool:
        return all(reset_peak_rss(pid) for pid in self.pids() if pid)

    def cpu_seconds(self) -> list[float]:
        """User + system CPU time of each process so far. The delivery process is read
        live: its time reaches the relay's cutime only once reaped, at the very end."""
        return [cpu_seconds(pid) if pid else 0.0 for pid in self.pids()]

    def wait_accepting(self, port: int, timeout: float) -> float:
        """Connect to `port` until the relay greets with 220; seconds since its Popen."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                with socket.create_connection((HOST, port), timeout=timeout) as sock:
                    greeting = sock.makefile("rb").readline()
                    greeted = time.time()
                    with contextlib.suppress(OSError):
                        sock.sendall(b"QUIT\r\n")
            except OSError as exc:
                if self.process.poll() is not None or time.monotonic() > deadline:
                    self.kill()
                    raise RuntimeError(f"the relay did not accept a client: {exc}") from None
                time.sleep(0.005)
                continue
            if not greeting.startswith(b"220"):
                self.kill()
                raise RuntimeError(f"the relay greeted with {greeting!r}")
            return greeted - self.popen_time

    def stop(self, expected: frozenset[str] = frozenset()) -> RelayEnd:
        """SIGTERM, wait, and read the log; warnings of `expected` events are no problem."""
        rss = self.memory_kib("VmHWM")
        started = time.monotonic()
        self.process.send_signal(signal.SIGTERM)
        try:
            code: int | None = self.process.wait(STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            code = None
            self.kill()
        stop_seconds = time.monotonic() - started
        events: Counter[str] = Counter()
        problems = []
        for record in self._records():
            events[str(record.get("event", "-"))] += 1
            if record.get("level") not in ("debug", "info") and record.get("event") not in expected:
                record.pop("time", None)
                problems.append(" ".join(f"{k}={v}" if k else str(v) for k, v in record.items()))
        return RelayEnd(rss, code, stop_seconds, events, problems)


# -- the load generator --------------------------------------------------------------------


@dataclass
class Sent:
    seq: int
    t_data: float  # just before the DATA command (0.0: not reached)
    t_reply: float  # final reply to the text read (0.0: none)
    code: int  # that reply's code; 0: the session broke


class Load:
    """Sends `n` messages over `clients` threads, each reusing one smtplib session.

    The threads take the next sequence number from a shared counter. With `rate` > 0,
    message `seq` is not sent before start + seq / rate (an absolute timetable).
    Commands go in lock step (no PIPELINING), like most clients.
    """

    def __init__(
        self, messages: Messages, scenario: str, n: int, clients: int, rate: float = 0.0
    ) -> None:
        self.messages = messages
        self.scenario = scenario
        self.n = n
        self.clients = clients
        self.rate = rate
        self.port = 0
        self.start = 0.0
        self.sent: list[Sent] = []  # list.append is atomic: shared by the threads
        self.session_errors: list[str] = []
        self.late = 0  # paced: messages sent more than LATE seconds after their slot
        self._next = 0
        self._lock = threading.Lock()

    def message_id(self, seq: int) -> str:
        return self.messages.message_id(self.scenario, seq)

    def accepted(self) -> list[Sent]:
        return [s for s in self.sent if s.code == 250]

    def run(self, port: int) -> None:
        self.port = port
        threads = [
            threading.Thread(target=self._client, args=(i,), name=f"load-{i}")
            for i in range(self.clients)
        ]
        self.start = time.time()
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        self.sent.sort(key=lambda s: s.seq)

    def _take(self) -> int | None:
        with self._lock:
            if self._next >= self.n:
                return None
            self._next += 1
            return self._next - 1

    def _connect(self, index: int) -> smtplib.SMTP:
        smtp = smtplib.SMTP(HOST, self.port, local_hostname=f"load{index}.bench", timeout=60)
        # Our own Nagle/delayed-ACK stalls must not show up as the relay's latency.
        smtp.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        code, reply = smtp.ehlo()
        if code != 250:
            raise smtplib.SMTPHeloError(code, reply)
        return smtp

    def _client(self, index: int) -> None:
        smtp: smtplib.SMTP | None = None
        failures = 0
        while (seq := self._take()) is not None:
            try:
                if smtp is None:
                    smtp = self._connect(index)
                self._pace(seq)
                if not self._send(smtp, seq):
                    smtp.close()
                    smtp = None
                failures = 0
            except (smtplib.SMTPException, OSError) as exc:
                self.session_errors.append(f"client {index}, message {seq}: {exc!r}")
                self.sent.append(Sent(seq, 0.0, 0.0, 0))
                if smtp is not None:
                    smtp.close()
                smtp = None
                failures += 1
                if failures >= MAX_SESSION_FAILURES:
                    self.session_errors.append(f"client {index} gives up")
                    return
                time.sleep(0.2)
        if smtp is not None:
            try:
                smtp.quit()
            except (smtplib.SMTPException, OSError):
                smtp.close()

    def _pace(self, seq: int) -> None:
        if self.rate > 0:
            delay = self.start + seq / self.rate - time.time()
            if delay > 0:
                time.sleep(delay)
            elif delay < -LATE:
                with self._lock:
                    self.late += 1

    def _send(self, smtp: smtplib.SMTP, seq: int) -> bool:
        """One transaction; False when the session should be renewed (after a 421)."""
        t_data = 0.0
        for command, ok in (
            (f"MAIL FROM:<{SENDER}>", (250,)),
            (f"RCPT TO:<{RECIPIENT}>", (250, 251)),
            ("DATA", (354,)),
        ):
            if command == "DATA":
                t_data = time.time()
            code, _ = smtp.docmd(command)
            if code not in ok:
                self.sent.append(Sent(seq, t_data, time.time(), code))
                if code == 421:
                    return False
                smtp.rset()
                return True
        smtp.send(self.messages.text(self.scenario, seq))
        code, _ = smtp.getreply()
        self.sent.append(Sent(seq, t_data, time.time(), code))
        return code != 421


# -- one scenario --------------------------------------------------------------------------


@dataclass
class Cpu:
    receiver: float  # the relay process
    delivery: float  # its delivery process
    load: float
    sink: float

    @classmethod
    def now(cls, relay: Relay, sink: Sink) -> Cpu:
        receiver, delivery = relay.cpu_seconds()
        return cls(receiver, delivery, time.process_time(), sink.cpu_seconds())

    @property
    def relay(self) -> float:
        return self.receiver + self.delivery

    def __sub__(self, other: Cpu) -> Cpu:
        return Cpu(
            self.receiver - other.receiver,
            self.delivery - other.delivery,
            self.load - other.load,
            self.sink - other.sink,
        )


@dataclass
class Result:
    title: str
    load: Load
    warmup: Load | None
    arrivals: dict[str, list[float]]
    cpu: Cpu
    relay: RelayEnd


def run_scenario(
    args: argparse.Namespace, directory: str, sink: Sink, load: Load, title: str
) -> Result:
    """Start a relay, warm it up, send the load, wait for the arrivals, stop the relay."""
    config = write_config(directory, load.scenario, sink.port, args.workers)
    relay = Relay(config, directory, load.scenario)
    try:
        warmup = None
        if args.warmup > 0:
            warmup = Load(load.messages, f"{load.scenario}-warmup", args.warmup, load.clients)
            send_and_wait(warmup, relay.port, sink, args.wait)
        before = Cpu.now(relay, sink)
        send_and_wait(load, relay.port, sink, args.wait)
        cpu = Cpu.now(relay, sink) - before
    finally:
        end = relay.stop()
    sink.poll()
    return Result(title, load, warmup, sink.arrivals, cpu, end)


def send_and_wait(load: Load, port: int, sink: Sink, wait: float) -> None:
    load.run(port)
    sink.wait_for({load.message_id(s.seq) for s in load.accepted()}, wait)


# -- figures ------------------------------------------------------------------------------


def percentile(sorted_values: list[float], q: float) -> float:
    """Nearest-rank percentile of an already sorted list (q in 0..100)."""
    if not sorted_values:
        return math.nan
    k = math.ceil(q / 100 * len(sorted_values)) - 1
    return sorted_values[max(0, min(len(sorted_values) - 1, k))]


def per_second(count: int, start: float, end: float) -> float:
    return count / (end - start) if count and end > start else math.nan


def spread_ms(seconds: list[float]) -> str:
    ms = sorted(v * 1000 for v in seconds)
    worst = ms[-1] if ms else math.nan
    return f"p50 {percentile(ms, 50):.1f} ms   p99 {percentile(ms, 99):.1f} ms   max {worst:.1f} ms"


def warmup_line(warmup: Load, arrivals: dict[str, list[float]]) -> str:
    first = next((s for s in warmup.sent if s.seq == 0 and s.code == 250), None)
    arrived = arrivals.get(warmup.message_id(0)) if first else None
    if first is None or not arrived:
        return f"warm-up {warmup.n} msgs: the first was not forwarded"
    return (
        f"warm-up {warmup.n} msgs (not counted): the first forwarded in "
        f"{(arrived[0] - first.t_reply) * 1000:.1f} ms"
    )


def accepted_rate(load: Load) -> float:
    """msgs/s answered 250, from the start of the load to the last 250."""
    accepted = load.accepted()
    return per_second(len(accepted), load.start, max((s.t_reply for s in accepted), default=0.0))


def end_to_end_rate(load: Load, arrivals: dict[str, list[float]]) -> float:
    """msgs/s of accepted messages that arrived, from the start of the load to the last."""
    ids = [load.message_id(s.seq) for s in load.accepted()]
    times = [arrivals[i][0] for i in ids if i in arrivals]
    return per_second(len(times), load.start, max(times, default=0.0))


def refused_detail(loads: list[Load]) -> tuple[int, str]:
    """How many messages were not answered 250, and why ("3 x 451, 1 x broken session")."""
    refused: Counter[int] = Counter()
    for load in loads:
        refused.update(s.code for s in load.sent if s.code != 250)
        refused[-1] += load.n - len(load.sent)  # never sent: every session gave up
    kinds = {-1: "never sent", 0: "broken session"}
    detail = ", ".join(f"{n} x {kinds.get(c, c)}" for c, n in sorted(refused.items()) if n)
    return sum(refused.values()), detail


def load_lines(load: Load, arrivals: dict[str, list[float]]) -> tuple[list[str], bool]:
    """The throughput and latency lines of a load; False when a message was lost or refused."""
    accepted = load.accepted()
    arrived = [
        (s, arrivals[load.message_id(s.seq)])
        for s in accepted
        if load.message_id(s.seq) in arrivals
    ]
    duplicates = sum(len(times) - 1 for _, times in arrived)
    lost = len(accepted) - len(arrived)
    refused, detail = refused_detail([load])
    lines = [
        f"accepted    {accepted_rate(load):7.1f} msgs/s"
        f"   (start -> last 250; {len(accepted)} of {load.n})",
        f"end-to-end  {end_to_end_rate(load, arrivals):7.1f} msgs/s   (start -> last arrival)",
        f"DATA->250   {spread_ms([s.t_reply - s.t_data for s in accepted])}",
        f"forward     {spread_ms([times[0] - s.t_reply for s, times in arrived])}"
        "   (client's 250 -> sink has it)",
        f"lost {lost}   duplicates {duplicates}   refused {refused}"
        + (f" ({detail})" if detail else ""),
    ]
    if load.rate > 0:
        lines.insert(
            0,
            f"on time     {load.n - load.late} of {load.n} msgs sent within "
            f"{LATE * 1000:g} ms of their slot",
        )
    return lines, lost == 0 and not detail


def mib(kib: list[int]) -> str:
    """Total and each process's share: "52.1 MiB (receiver 30.2 + delivery 21.9)"."""
    return (
        f"{sum(kib) / 1024:.1f} MiB (receiver {kib[0] / 1024:.1f} + delivery {kib[1] / 1024:.1f})"
    )


def cpu_line(cpu: Cpu, messages: int, what: str = "") -> str:
    per_msg = cpu.relay / max(1, messages) * 1000
    return (
        f"CPU         relay {cpu.relay:.2f} s = {per_msg:.2f} ms/msg{what}   "
        f"(receiver {cpu.receiver:.2f} s + delivery {cpu.delivery:.2f} s; "
        f"load generator {cpu.load:.2f} s, sink {cpu.sink:.2f} s)"
    )


def end_lines(end: RelayEnd) -> list[str]:
    status = "did not exit, killed" if end.exit_code is None else f"exit {end.exit_code}"
    events = ", ".join(f"{name} {n}" for name, n in sorted(end.events.items()))
    return [
        f"relay       peak RSS {mib(end.peak_rss_kib)}   "
        f"SIGTERM -> {status} in {end.stop_seconds:.2f} s",
        f"relay log   {events}",
    ]


def relay_lines(result: Result) -> list[str]:
    return [cpu_line(result.cpu, len(result.load.accepted())), *end_lines(result.relay)]


def report(result: Result) -> bool:
    """Print one scenario's block; True when nothing went wrong."""
    lines, delivered = load_lines(result.load, result.arrivals)
    if result.warmup is not None:
        lines.insert(0, warmup_line(result.warmup, result.arrivals))
        delivered &= load_lines(result.warmup, result.arrivals)[1]
    lines += relay_lines(result)
    problems = result.load.session_errors + result.relay.problems
    lines += [f"! {problem}" for problem in problems[:SHOWN_PROBLEMS]]
    if len(problems) > SHOWN_PROBLEMS:
        lines.append(f"! ... and {len(problems) - SHOWN_PROBLEMS} more")
    print("\n  ".join([result.title, *lines]), flush=True)
    return delivered and result.relay.exit_code == 0 and not problems


# -- the backlog scenario -------------------------------------------------------------------

BACKLOG_DUE = 3600.0  # the fixture's next attempt: an hour from now
BACKLOG_AGE = 600.0  # its arrival: ten minutes ago (far from retry_for and warn_after)
# How soon the relay tries a down upstream again (default 30s): it bounds the wait from
# the sink's return to the first arrival, which the drain rate then includes.
BACKLOG_FAIL_TIMEOUT = "1s"
BACKLOG_START_TIMEOUT = 300.0  # for the first 220, and for the relay to settle
DRAIN_LIMIT = 3600.0
IDLE_CPU = 0.1  # settled: relay and delivery process use less than this share of a core ...
IDLE_WINDOW = 0.5  # ... over this many seconds
EXPECTED_WHILE_DOWN = frozenset({"backend_down"})  # warnings that the scenario causes


def _write_new(path: str, data: bytes, mtime: float | None = None) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
        if mtime is not None:
            os.utime(fd, (mtime, mtime))
    finally:
        os.close(fd)


def build_backlog(root: str, messages: Messages, n: int) -> list[str]:
    """Spool `n` messages as a relay leaves them after one attempt while every backend of
    group "default" was down; returns their Message-IDs.

    Written straight into the spool of a relay that does not run, with the spool's own
    types: msg/ID, then queue/ID whose mtime (the next attempt) is BACKLOG_DUE away.
    Not fsynced: the fixture is not what is measured.
    """
    spool = Spool(root)
    spool.create()
    now = time.time()
    due = now + BACKLOG_DUE
    error = "sink: ConnectionRefusedError: [Errno 111] Connection refused"
    message_ids = []
    for seq in range(n):
        content = messages.text("backlog", seq)[:-3]  # without the terminating "."
        while True:
            queue_id = new_id()
            try:
                _write_new(spool.message_path(queue_id), content)
                break
            except FileExistsError:
                continue
        message_id = messages.message_id("backlog", seq)
        env = Envelope(
            id=queue_id,
            sender=SENDER,
            recipients=[
                Recipient(RECIPIENT, state=DEFERRED, reply=error, status="4.4.1", updated=now)
            ],
            arrival=now - BACKLOG_AGE,
            size=len(content),
            client=HOST,
            helo="load.bench",
            message_id=message_id,
            attempts=1,
            next_attempt=due,
            last_error=error,
            waiting_groups=[DEFAULT_GROUP],
        )
        _write_new(spool.path(QUEUE, queue_id), env.to_bytes(), due)
        message_ids.append(message_id)
    return message_ids


def wait_until_settled(relay: Relay, limit: float) -> float:
    """Seconds from Popen until the relay's two processes together used less than
    IDLE_CPU of a core over IDLE_WINDOW (the start of that window): its queue is loaded."""
    deadline = time.monotonic() + limit
    before = sum(relay.cpu_seconds())
    while True:
        time.sleep(IDLE_WINDOW)
        now = sum(relay.cpu_seconds())
        if now - before < IDLE_CPU * IDLE_WINDOW or time.monotonic() > deadline:
            return time.time() - IDLE_WINDOW - relay.popen_time
        before = now


def send_new_mail(
    args: argparse.Namespace, messages: Messages, scenario: str, port: int
) -> list[Load]:
    """The warm-up (not counted) and the counted load, flat out; the upstream is down,
    so nothing is waited for."""
    loads = []
    if args.warmup > 0:
        loads.append(Load(messages, f"{scenario}-warmup", args.warmup, args.clients))
    loads.append(Load(messages, scenario, args.backlog_new, args.clients))
    for load in loads:
        load.run(port)
    return loads


def ratio(value: float, reference: float | None) -> str:
    if reference is None or not reference > 0 or math.isnan(value):
        return "-"
    return f"{value / reference:.2f}"


def run_backlog(
    args: argparse.Namespace, directory: str, messages: Messages, flat: Result | None
) -> bool:
    """Print the backlog block, line by line as it goes; True when nothing went wrong."""
    n, new = args.backlog, args.backlog_new
    print(
        f"backlog: {n} msgs x {args.size} B queued while the upstream is down; "
        f"{new} new msgs over {args.clients} clients; then the upstream returns",
        flush=True,
    )

    def line(text: str) -> None:
        print(f"  {text}", flush=True)

    problems: list[str] = []
    ok = True
    sink = Sink(listening=False)  # the backend's port refuses connections until listen()
    try:
        began = time.monotonic()
        backlog_ids = build_backlog(spool_dir(directory, "backlog"), messages, n)
        took = time.monotonic() - began
        began = time.monotonic()
        os.sync()  # its writeback must not slow the commits measured next
        synced = time.monotonic() - began
        line(
            f"fixture     {n} msgs spooled in {took:.1f} s ({n / took:.0f} msgs/s; "
            f"files written directly, no relay running), then sync {synced:.1f} s"
        )

        # The same relay and load on an empty queue, for reference.
        port = free_port()
        config = write_config(
            directory, "backlog-empty", sink.port, args.workers, port, BACKLOG_FAIL_TIMEOUT
        )
        relay = Relay(config, directory, "backlog-empty", port)
        try:
            empty_loads = send_new_mail(args, messages, "backlog-empty", relay.port)
        finally:
            empty_end = relay.stop(EXPECTED_WHILE_DOWN)
        empty = empty_loads[-1]
        empty_accept = accepted_rate(empty)
        problems += [p for load in empty_loads for p in load.session_errors]
        problems += [f"empty queue: {p}" for p in empty_end.problems]
        ok &= empty_end.exit_code == 0 and refused_detail(empty_loads)[0] == 0
        line(
            f"empty queue first client's 220 after {relay.accept_seconds:.2f} s; "
            f"peak RSS {mib(empty_end.peak_rss_kib)}"
        )
        line(
            f"            new mail accepted {empty_accept:.1f} msgs/s, "
            f"DATA->250 {spread_ms([s.t_reply - s.t_data for s in empty.accepted()])}"
        )

        # (a) start, (b) memory with the backlog loaded.
        port = free_port()
        config = write_config(
            directory, "backlog", sink.port, args.workers, port, BACKLOG_FAIL_TIMEOUT
        )
        relay = Relay(config, directory, "backlog", port, BACKLOG_START_TIMEOUT)
        try:
            settled = wait_until_settled(relay, BACKLOG_START_TIMEOUT)
            line(
                f"start       first client's 220 after {relay.accept_seconds:.2f} s "
                f"(from Popen); `started` logged after {relay.started_at - relay.popen_time:.2f} s;"
                f" settled after {settled:.2f} s (CPU < {IDLE_CPU:.0%} of a core)"
            )
            line(
                f"loaded      RSS {mib(relay.memory_kib('VmRSS'))}, "
                f"peak so far {mib(relay.memory_kib('VmHWM'))}"
            )

            # (c) new mail while the backlog waits.
            loads = send_new_mail(args, messages, "backlog-new", relay.port)
            load = loads[-1]
            accept = accepted_rate(load)
            flat_accept = accepted_rate(flat.load) if flat else None
            line(
                f"new mail    accepted {accept:.1f} msgs/s   (start -> last 250; "
                f"{len(load.accepted())} of {load.n}) = {ratio(accept, empty_accept)} x the "
                f"empty queue's {empty_accept:.1f}"
                + (f", {ratio(accept, flat_accept)} x flat out's {flat_accept:.1f}" if flat else "")
            )
            line(f"DATA->250   {spread_ms([s.t_reply - s.t_data for s in load.accepted()])}")

            # (d) the upstream returns: the drain.
            expected = set(backlog_ids)
            expected.update(ld.message_id(s.seq) for ld in loads for s in ld.accepted())
            start_peak = relay.memory_kib("VmHWM")
            peak_reset = relay.reset_peak_rss()
            before = Cpu.now(relay, sink)
            back = sink.listen()
            sink.wait_for(expected, DRAIN_LIMIT, idle=args.wait)
            cpu = Cpu.now(relay, sink) - before
            drain_peak = relay.memory_kib("VmHWM")
        finally:
            end = relay.stop(EXPECTED_WHILE_DOWN)
        # The whole run's peak, each process's: its VmHWM was reset for the drain.
        end.peak_rss_kib = [max(a, b) for a, b in zip(start_peak, end.peak_rss_kib)]
        sink.poll()
        firsts = sorted(sink.arrivals[i][0] for i in expected if i in sink.arrivals)
        duplicates = sum(len(sink.arrivals[i]) - 1 for i in expected if i in sink.arrivals)
        lost = len(expected) - len(firsts)
        drain = per_second(len(firsts), back, firsts[-1] if firsts else 0.0)
        flat_e2e = end_to_end_rate(flat.load, flat.arrivals) if flat else None

        def after(q: float) -> str:
            return f"{firsts[max(0, math.ceil(q * len(firsts)) - 1)] - back:.1f} s"

        line(
            f"drain       {drain:.1f} msgs/s   (upstream back -> last arrival; "
            f"{len(firsts)} of {len(expected)} msgs in {after(1.0) if firsts else '-'})"
            + (
                f" = {ratio(drain, flat_e2e)} x flat out's end-to-end {flat_e2e:.1f}"
                if flat
                else ""
            )
        )
        if firsts:
            line(
                f"            first arrival after {after(0.0)}, 10 % after {after(0.1)}, "
                f"50 % after {after(0.5)}, 90 % after {after(0.9)}; first -> last arrival "
                f"{per_second(len(firsts), firsts[0], firsts[-1]):.1f} msgs/s"
            )
        line(
            f"drain RSS   peak {mib(drain_peak)}"
            + ("" if peak_reset else "   (VmHWM could not be reset: the whole run's peak)")
        )
        refused, detail = refused_detail(loads)
        line(
            f"lost {lost}   duplicates {duplicates}   refused {refused}"
            + (f" ({detail})" if detail else "")
        )
        line(cpu_line(cpu, len(firsts), " during the drain"))
        for text in end_lines(end):
            line(text)
        problems += [p for ld in loads for p in ld.session_errors] + end.problems
        for problem in problems[:SHOWN_PROBLEMS]:
            line(f"! {problem}")
        if len(problems) > SHOWN_PROBLEMS:
            line(f"! ... and {len(problems) - SHOWN_PROBLEMS} more")
        return ok and lost == 0 and refused == 0 and end.exit_code == 0 and not problems
    finally:
        sink.stop()


# -- main ---------------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--n", type=int, default=2000, help="flat out: messages (2000)")
    p.add_argument("--size", type=int, default=4096, help="bytes per message (4096)")
    p.add_argument(
        "--clients", type=int, default=8, help="flat out and backlog: client sessions (8)"
    )
    p.add_argument("--rate", type=float, default=100.0, help="paced: offered msgs/s (100)")
    p.add_argument("--duration", type=float, default=10.0, help="paced: seconds (10)")
    p.add_argument("--paced-clients", type=int, default=4, help="paced: client sessions (4)")
    p.add_argument("--warmup", type=int, default=100, help="messages before each scenario (100)")
    p.add_argument("--workers", type=int, default=8, help="the relay's delivery.workers (8)")
    p.add_argument("--backlog", type=int, default=100_000, help="backlog: messages queued (100000)")
    p.add_argument(
        "--backlog-new",
        type=int,
        default=1000,
        help="backlog: new messages sent while it waits (1000)",
    )
    p.add_argument("--only", choices=SCENARIOS, help="run one scenario only")
    p.add_argument(
        "--wait",
        type=float,
        default=120.0,
        help="seconds to wait for arrivals; backlog: without a new arrival (120)",
    )
    p.add_argument("--dir", help="where to make the temp dir (the spool's disk matters)")
    p.add_argument("--keep", action="store_true", help="keep the temp dir: config, spool, logs")
    args = p.parse_args(argv)
    if (
        min(
            args.n,
            args.size,
            args.clients,
            args.paced_clients,
            args.workers,
            args.backlog,
            args.backlog_new,
        )
        < 1
    ):
        p.error(
            "--n, --size, --clients, --paced-clients, --workers, --backlog and "
            "--backlog-new must be positive"
        )
    if args.rate <= 0 or args.duration <= 0:
        p.error("--rate and --duration must be positive")
    return args


SCENARIOS = ("flat", "paced", "backlog")


def scenarios(args: argparse.Namespace, messages: Messages) -> list[tuple[Load, str]]:
    """The flat out and paced loads chosen (the backlog scenario runs on its own)."""
    chosen = []
    if args.only in (None, "flat"):
        title = f"flat out: {args.n} msgs x {args.size} B, {args.clients} clients"
        chosen.append((Load(messages, "flat", args.n, args.clients), title))
    if args.only in (None, "paced"):
        n = max(1, round(args.rate * args.duration))
        title = (
            f"paced: {args.rate:g} msgs/s offered for {args.duration:g} s "
            f"({n} msgs x {args.size} B), {args.paced_clients} client(s)"
        )
        chosen.append((Load(messages, "paced", n, args.paced_clients, args.rate), title))
    return chosen


def run_all(args: argparse.Namespace, directory: str) -> bool:
    """Print the header and every chosen scenario's block; True when nothing went wrong."""
    messages = Messages(f"b{os.getpid()}x{int(time.time())}", args.size)
    ops, p50 = durable_writes(directory)
    print(
        f"smarthost bench: {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.2f}, "
        f"Python {sys.version.split()[0]}\n"
        f"  spool in {directory}: {ops:.0f} durable 4 KiB writes/s, p50 {p50:.1f} ms "
        "(write, fsync, rename, fsync dir; one loop)",
        flush=True,
    )
    ok = True
    flat = None
    chosen = scenarios(args, messages)
    if chosen:
        sink = Sink()
        try:
            for load, title in chosen:
                print()
                result = run_scenario(args, directory, sink, load, title)
                ok &= report(result)
                if load.scenario == "flat":
                    flat = result
        finally:
            sink.stop()
    if args.only in (None, "backlog"):
        print()
        ok &= run_backlog(args, directory, messages, flat)
    return ok


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    directory = tempfile.mkdtemp(prefix="smarthost-bench-", dir=args.dir)
    try:
        return 0 if run_all(args, directory) else 1
    except RuntimeError as exc:  # the relay or the sink did not start
        print(f"bench: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    finally:
        if args.keep:
            print(f"\nkept {directory}")
        else:
            shutil.rmtree(directory, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
