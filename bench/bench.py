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
block of figures.

Scenarios:
  flat out  --n messages of --size bytes over --clients sessions, as fast as they go:
            the relay's capacity. A backlog may build, so `forward` includes queueing.
  paced     --rate msgs/s offered for --duration s over --paced-clients sessions, on a
            fixed timetable (a late message does not delay the next one's slot): the
            relay's forwarding delay at a steady load below its capacity. Several
            sessions, so that one slow commit does not hold up the timetable (one
            lock-step session cannot offer more than 1 / its transaction time).

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
  CPU          user+system time of the relay, the load generator (this process) and the
               sink, from the start of the load until the last arrival; ms/msg is the
               relay's per accepted message
  peak RSS     the relay's VmHWM, read just before SIGTERM (warm-up included)
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
wrong: the relay did not start, logged a warning or an error, refused or lost a message,
or did not exit 0 on SIGTERM.
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
from email.utils import formatdate
from multiprocessing.connection import Connection
from typing import Any

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
    """Records (Message-ID, arrival time) of every message and answers 250."""

    def __init__(self) -> None:
        self.arrivals: list[tuple[str, float]] = []

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        now = time.time()
        content: bytes = envelope.content
        end = content.find(b"\r\n\r\n")
        found = MESSAGE_ID.search(content, 0, end if end >= 0 else len(content))
        self.arrivals.append((found.group(1).decode("ascii", "replace") if found else "-", now))
        return "250 2.0.0 Ok"


def sink_main(conn: Connection) -> None:
    """Child process: serve SMTP on a free port and send the port, then answer requests:
    "poll" -> the arrivals since the last poll; anything else (or EOF) -> exit."""
    import logging

    from aiosmtpd.smtp import SMTP

    logging.getLogger("mail.log").setLevel(logging.WARNING)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent stops us (Ctrl-C reaches both)
    handler = SinkHandler()

    async def serve() -> None:
        loop = asyncio.get_running_loop()
        server = await loop.create_server(
            lambda: SMTP(handler, hostname="bench-sink", data_size_limit=None),
            HOST,
            0,
            backlog=1024,
        )
        stopped = loop.create_future()

        def on_request() -> None:
            try:
                request = conn.recv()
            except EOFError:
                request = "stop"
            if request == "poll":
                conn.send(handler.arrivals)
                handler.arrivals = []
            elif not stopped.done():
                stopped.set_result(None)

        loop.add_reader(conn.fileno(), on_request)
        conn.send(server.sockets[0].getsockname()[1])
        await stopped
        loop.remove_reader(conn.fileno())
        server.close()

    asyncio.run(serve())


class Sink:
    """The parent's handle on the sink process; accumulates arrivals by Message-ID."""

    def __init__(self) -> None:
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

    def poll(self) -> None:
        self.conn.send("poll")
        for message_id, when in self.conn.recv():
            self.arrivals.setdefault(message_id, []).append(when)

    def wait_for(self, message_ids: set[str], timeout: float) -> None:
        """Poll until every one of `message_ids` arrived, or `timeout` seconds passed."""
        deadline = time.monotonic() + timeout
        missing = set(message_ids)
        while True:
            self.poll()
            missing.difference_update(self.arrivals)
            if not missing or time.monotonic() > deadline:
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


def write_config(directory: str, label: str, sink_port: int, workers: int) -> str:
    """A config for one relay: its own spool, log level info, the sink as the backend."""
    path = os.path.join(directory, f"smarthost-{label}.toml")
    spool = json.dumps(os.path.join(directory, f"spool-{label}"))  # a TOML basic string
    with open(path, "w", encoding="utf-8") as f:
        f.write(
            f'hostname = "bench.smarthost.test"\n\n'
            f'[smtp]\nlisten = ["{HOST}:0"]\n\n'
            f"[spool]\ndir = {spool}\n\n"
            f"[delivery]\nworkers = {workers}\n\n"
            f'[log]\nlevel = "info"\n\n'
            f'[[backend]]\nname = "sink"\nhost = "{HOST}"\nport = {sink_port}\ntls = "none"\n'
        )
    return path


@dataclass
class RelayEnd:
    """What the relay looked like at the end of a scenario."""

    peak_rss_kib: int
    exit_code: int | None  # None: did not exit within STOP_TIMEOUT (then killed)
    stop_seconds: float
    events: Counter[str]
    problems: list[str]  # log records at warning level or above, non-JSON stderr lines


class Relay:
    """`python -m smarthost -c CFG serve` as a subprocess, its stderr (the log) to a file."""

    def __init__(self, config: str, directory: str, label: str) -> None:
        self.log_path = os.path.join(directory, f"relay-{label}.log")
        with open(self.log_path, "wb") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "smarthost", "-c", config, "serve"],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
            )
        self.port = self._wait_started()

    def _wait_started(self) -> int:
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            for record in self._records():
                if record.get("event") == "started":
                    return int(record["listen"][0].rsplit(":", 1)[1])
            if self.process.poll() is not None:
                break
            time.sleep(POLL_INTERVAL)
        self.process.kill()
        self.process.wait()
        log = "\n".join(self._lines()[-20:])
        raise RuntimeError(f"the relay did not start (exit {self.process.returncode}):\n{log}")

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

    def peak_rss_kib(self) -> int:
        try:
            with open(f"/proc/{self.process.pid}/status", encoding="ascii") as f:
                for line in f:
                    if line.startswith("VmHWM:"):
                        return int(line.split()[1])
        except OSError:
            pass
        return 0

    def cpu_seconds(self) -> float:
        return cpu_seconds(self.process.pid)

    def stop(self) -> RelayEnd:
        rss = self.peak_rss_kib()
        started = time.monotonic()
        self.process.send_signal(signal.SIGTERM)
        try:
            code: int | None = self.process.wait(STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            code = None
            self.process.kill()
            self.process.wait()
        stop_seconds = time.monotonic() - started
        events: Counter[str] = Counter()
        problems = []
        for record in self._records():
            events[str(record.get("event", "-"))] += 1
            if record.get("level") not in ("debug", "info"):
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
    relay: float
    load: float
    sink: float

    @classmethod
    def now(cls, relay: Relay, sink: Sink) -> Cpu:
        return cls(relay.cpu_seconds(), time.process_time(), sink.cpu_seconds())

    def __sub__(self, other: Cpu) -> Cpu:
        return Cpu(self.relay - other.relay, self.load - other.load, self.sink - other.sink)


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


def load_lines(load: Load, arrivals: dict[str, list[float]]) -> tuple[list[str], bool]:
    """The throughput and latency lines of a load; False when a message was lost or refused."""
    accepted = load.accepted()
    arrived = [
        (s, arrivals[load.message_id(s.seq)])
        for s in accepted
        if load.message_id(s.seq) in arrivals
    ]
    last_reply = max((s.t_reply for s in accepted), default=0.0)
    last_arrival = max((times[0] for _, times in arrived), default=0.0)
    duplicates = sum(len(times) - 1 for _, times in arrived)
    lost = len(accepted) - len(arrived)
    refused = Counter(s.code for s in load.sent if s.code != 250)
    refused[-1] = load.n - len(load.sent)  # never sent: every session gave up
    kinds = {-1: "never sent", 0: "broken session"}
    detail = ", ".join(f"{n} x {kinds.get(c, c)}" for c, n in sorted(refused.items()) if n)
    lines = [
        f"accepted    {per_second(len(accepted), load.start, last_reply):7.1f} msgs/s"
        f"   (start -> last 250; {len(accepted)} of {load.n})",
        f"end-to-end  {per_second(len(arrived), load.start, last_arrival):7.1f} msgs/s"
        "   (start -> last arrival)",
        f"DATA->250   {spread_ms([s.t_reply - s.t_data for s in accepted])}",
        f"forward     {spread_ms([times[0] - s.t_reply for s, times in arrived])}"
        "   (client's 250 -> sink has it)",
        f"lost {lost}   duplicates {duplicates}   refused {sum(refused.values())}"
        + (f" ({detail})" if detail else ""),
    ]
    if load.rate > 0:
        lines.insert(
            0,
            f"on time     {load.n - load.late} of {load.n} msgs sent within "
            f"{LATE * 1000:g} ms of their slot",
        )
    return lines, lost == 0 and not detail


def relay_lines(result: Result) -> list[str]:
    end, cpu = result.relay, result.cpu
    per_msg = cpu.relay / max(1, len(result.load.accepted())) * 1000
    status = "did not exit, killed" if end.exit_code is None else f"exit {end.exit_code}"
    events = ", ".join(f"{name} {n}" for name, n in sorted(end.events.items()))
    return [
        f"CPU         relay {cpu.relay:.2f} s = {per_msg:.2f} ms/msg   "
        f"(load generator {cpu.load:.2f} s, sink {cpu.sink:.2f} s)",
        f"relay       peak RSS {end.peak_rss_kib / 1024:.1f} MiB   "
        f"SIGTERM -> {status} in {end.stop_seconds:.2f} s",
        f"relay log   {events}",
    ]


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


# -- main ---------------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--n", type=int, default=2000, help="flat out: messages (2000)")
    p.add_argument("--size", type=int, default=4096, help="bytes per message (4096)")
    p.add_argument("--clients", type=int, default=8, help="flat out: client sessions (8)")
    p.add_argument("--rate", type=float, default=100.0, help="paced: offered msgs/s (100)")
    p.add_argument("--duration", type=float, default=10.0, help="paced: seconds (10)")
    p.add_argument("--paced-clients", type=int, default=4, help="paced: client sessions (4)")
    p.add_argument("--warmup", type=int, default=100, help="messages before each scenario (100)")
    p.add_argument("--workers", type=int, default=8, help="the relay's delivery.workers (8)")
    p.add_argument("--only", choices=("flat", "paced"), help="run one scenario only")
    p.add_argument("--wait", type=float, default=120.0, help="seconds to wait for arrivals (120)")
    p.add_argument("--dir", help="where to make the temp dir (the spool's disk matters)")
    p.add_argument("--keep", action="store_true", help="keep the temp dir: config, spool, logs")
    args = p.parse_args(argv)
    if min(args.n, args.size, args.clients, args.paced_clients, args.workers) < 1:
        p.error("--n, --size, --clients, --paced-clients and --workers must be positive")
    if args.rate <= 0 or args.duration <= 0:
        p.error("--rate and --duration must be positive")
    return args


def scenarios(args: argparse.Namespace, messages: Messages) -> list[tuple[Load, str]]:
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
    sink = Sink()
    try:
        ops, p50 = durable_writes(directory)
        print(
            f"smarthost bench: {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.2f}, "
            f"Python {sys.version.split()[0]}\n"
            f"  spool in {directory}: {ops:.0f} durable 4 KiB writes/s, p50 {p50:.1f} ms "
            "(write, fsync, rename, fsync dir; one loop)",
            flush=True,
        )
        ok = True
        for load, title in scenarios(args, messages):
            print()
            ok &= report(run_scenario(args, directory, sink, load, title))
        return ok
    finally:
        sink.stop()


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
