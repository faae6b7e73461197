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

Postfix beside (--postfix auto, the default, when Postfix is installed and this runs as
root; `no`: never; `only`: Postfix's runs alone, no relay): flat out, paced and large
flat out run the same load through a private Postfix instance right after the relay's
run, with the same sink, message count, size and sessions, and print its block and the
two side by side (smarthost / Postfix: end-to-end and CPU per message as ratios,
forward p99 and PSS at rest and at peak beside each other). The instance is the bench's
own (bench/postfix_peer.py): config, queue and data directories in the temp dir, a free
loopback port, relayhost the sink, no local delivery, no DNS, no TLS, Postfix's
defaults for concurrency; started with `postfix -c DIR start` per scenario and stopped
with `postfix -c DIR stop` (then abort and SIGKILL) whatever happens. A system Postfix is
not touched. Without Postfix or root, one line says why it was skipped. Its figures are
those of its whole process tree: the master and its children (smtpd, cleanup, qmgr,
smtp...), which come and go: CPU counts the ones already reaped too (the master's
cutime + cstime), PSS the ones alive at each sample. One run each: read the ratios of
several runs, and the machine's load, before quoting one.

Scenarios:
  flat out  --n messages of --size bytes over --clients sessions, as fast as they go:
            the relay's capacity. A backlog may build, so `forward` includes queueing.
            Postfix beside.
  paced     --rate msgs/s offered for --duration s over --paced-clients sessions, on a
            fixed timetable (a late message does not delay the next one's slot): the
            relay's forwarding delay at a steady load below its capacity. Several
            sessions, so that one slow commit does not hold up the timetable (one
            lock-step session cannot offer more than 1 / its transaction time).
            Postfix beside.
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
            scrape: both relays of this scenario serve `[metrics]`; /metrics is fetched
              every 0.5 s from a thread of the load generator once the backlog is
              loaded (ten scrapes while idle), while new mail comes and during the
              drain: its latency (p50/p99/max; issue 16's target: 50 ms with 100,000
              queued) and how many messages the queue gauges said were waiting
  large     issue 13's large-message scenarios, each on a fresh relay:
            flat out  --large-n messages (600) of --large-size bytes (100 KiB), as the
              flat out scenario (same figures; Postfix beside)
            memory    --big-n messages (4) of --big-mib MiB (25) at once over as many
              sessions, received and forwarded (max_message_size: --big-mib + 1 M)
            no stalls --big-n messages of --big-mib MiB one after another on one
              session, while a second session sends NOOP every 10 ms
            long line one DATA of --long-line-mib MiB (64) with no CRLF before the one
              ending it, at max_message_size 25M (the default; half the line when that
              is smaller): it must be read to the end, discarded, and answered 552
            empty lines one DATA of --empty-lines-mib MiB (8) of CRLF only, received
              and forwarded, at the default max_message_size 25M
            Each starts after --warmup small messages and once the relay settled.

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
               arrival; ms/msg is the relay's per accepted message. Postfix: its whole
               process tree, each process's time with that of the children it reaped.
               Backlog: for the new mail (empty queue, and beside the backlog: accepted
               and deferred, not forwarded) and during the drain (per message drained).
               Large, but flat out: per message sent (the long line: its one DATA)
  PSS          the proportional set size (/proc/PID/smaps_rollup: pages shared
               between processes counted once) of both processes, and each one's:
               flat out, paced, large flat out: at rest (1 s after the start, before
               the warm-up), peak (the highest total of samples taken every 200 ms
               from the start of the load until its last arrival, split as it was
               then) and after the load. Backlog: once loaded (settled), and the peak
               from the start to the end of the drain (no "at rest": the relay is never
               empty). Large, but flat out: idle (when the load began, after the
               warm-up) and peak, beside the finer RSS figures below. At rest also
               its anonymous part (Pss_Anon: heap and stacks, no file behind them),
               which does not depend on what else runs: the pages of the Python
               binary and its libraries are split with every other process that
               maps them (Postfix's libcrypto, the sink's libpython), so the whole
               PSS of the same relay reads several MiB lower beside them. Reading
               smaps_rollup walks the process's page tables under its memory-map lock
               (~0.3 ms of this process's CPU per read), which can delay the relay's
               own mmap/munmap by as much: hence 200 ms, not the 20 ms of RSS
  at rest      flat out, paced, large flat out: the context switches a second of all
               the relay's processes over 5 s after the PSS at rest (its wake-ups);
               not measured elsewhere
  peak RSS     the sum of the two processes' VmHWM, read just before SIGTERM (warm-up
               included; two peaks that may not coincide, so at most their sum); not
               for Postfix, whose workers come and go
  reply        large, but flat out: the replies to the text by code, one of them in
               full, and the code expected (552 for the long line, else 250)
  DATA->reply  the same as DATA->250, whatever the reply
  RSS idle     large, but flat out: VmRSS of the relay process (receiver) and of its
               children (delivery; found afresh at each sample: /proc/PID/task/*/
               children, or a scan of /proc), after the warm-up, once settled
  RSS peak     the highest VmRSS of each, sampled every 20 ms from the start of the
               load until its last message reached the sink; the sum of the two peaks,
               and its growth over idle beside issue 13's target, idle + 32 MiB
  VmHWM        each process's peak as the kernel counts it, reset (clear_refs) when
               the load began: the cross-check of the sampled peak, which can miss a
               spike shorter than 20 ms (the kernel's count lags by a few hundred KiB)
  NOOP         no stalls: round trips of the second session's NOOPs sent while a big
               message was between its DATA command and its reply; how many took over
               50 ms, issue 13's target for p99
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

A benchmark, not a test: it asserts nothing about speed or memory ("OVER" a target is
a figure, not a failure). It exits 1 when something went wrong: the relay did not start,
logged a warning or an error (in the backlog scenario but `backend_down`, which it
causes; in the large ones but `protocol_error` and `rejected`, which a hostile DATA may
cause), refused or lost a message (large: a reply other than the one expected), or did
not exit 0 on SIGTERM; the same of Postfix when it ran beside (its log's warnings, a
`postfix stop` that failed), or it did not start. With --postfix only and no Postfix
to run, it prints why and exits 1.
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
import urllib.request
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from datetime import datetime
from email.utils import formatdate
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any, Callable

import pytest

from smarthost.config import DEFAULT_GROUP, parse_size
from smarthost.spool import DEFERRED, QUEUE, Content, Envelope, Recipient, Spool, new_id

# The relay wrapper and the /proc readers are the tests' own (tests/support/).
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
# This script's directory, bench/, is on sys.path too.
from postfix_peer import PostfixInstance, postfix_version, why_not

from support.procs import (
    PssSampler,
    RssSampler,
    context_switches,
    cpu_seconds,
    proc_status_kib,
    process_tree,
    pss_kib,
    reset_peak_rss,
    tree_cpu_seconds,
)
from support.relay import RelayProcess
from support.smtp import free_port

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
CHUNK = 2**20  # the load sends a message bigger than this in pieces of this size


# -- messages ----------------------------------------------------------------------------


class Messages:
    """Message texts of `size` bytes (header and body, before the final "."), unique by
    Message-ID.

    The body repeats UNIT: a 1 MiB block of it is built once; per message a short
    header is formatted and the block cut to length. No line starts with "." so the text
    needs no dot-stuffing. Subclasses change UNIT to give DATA a hostile line shape.
    """

    UNIT = FILLER

    def __init__(self, run_id: str, size: int) -> None:
        self.run_id = run_id
        self.size = size
        self.date = formatdate(localtime=False).encode()
        self.block = self.UNIT * max(1, CHUNK // len(self.UNIT))

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

    def body(self, length: int) -> Iterator[bytes]:
        """`length` bytes of body, in pieces of at most CHUNK (the block, not copies)."""
        whole, rest = divmod(max(0, length), len(self.block))
        for _ in range(whole):
            yield self.block
        cut = self.block[:rest]
        if cut.endswith(b"\r"):  # no bare CR where the cut falls
            cut = cut[:-1] + b" "
        if cut:
            yield cut

    def chunks(self, scenario: str, seq: int) -> Iterator[bytes]:
        """The DATA payload in pieces, terminating "." included."""
        header = self.header(scenario, seq)
        yield header
        yield from self.body(self.size - len(header) - 2)
        yield b"\r\n.\r\n"

    def text(self, scenario: str, seq: int) -> bytes:
        """The DATA payload, terminating "." included."""
        return b"".join(self.chunks(scenario, seq))

    def pieces(self, scenario: str, seq: int) -> Iterable[bytes]:
        """The DATA payload as the load sends it: in one write up to CHUNK (as a client
        would), else piece by piece, so that a 64 MiB message is never built here."""
        if self.size <= CHUNK:
            return [self.text(scenario, seq)]
        return self.chunks(scenario, seq)


class LongLine(Messages):
    """The whole body one line: no CRLF until the one before the final "."."""

    UNIT = b"x"


class EmptyLines(Messages):
    """The body nothing but empty lines (CRLF CRLF ...): the most lines per byte."""

    UNIT = b"\r\n"


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
    max_message_size: str | None = None,
    metrics: bool = False,
) -> str:
    """A config for one relay: its own spool, log level info, the sink as the backend;
    with `metrics`, the metrics endpoint on a free port."""
    path = os.path.join(directory, f"smarthost-{label}.toml")
    spool = json.dumps(spool_dir(directory, label))  # a TOML basic string
    with open(path, "w", encoding="utf-8") as f:
        f.write(
            f'hostname = "bench.smarthost.test"\n\n'
            f'[smtp]\nlisten = ["{HOST}:{listen_port}"]\n'
            + (f'max_message_size = "{max_message_size}"\n' if max_message_size else "")
            + "\n"
            f"[spool]\ndir = {spool}\n\n"
            f"[delivery]\nworkers = {workers}\n\n"
            f'[log]\nlevel = "info"\n\n'
            + (f'[metrics]\nlisten = "{HOST}:0"\n\n' if metrics else "")
            + f'[[backend]]\nname = "sink"\nhost = "{HOST}"\nport = {sink_port}\ntls = "none"\n'
            + (f'fail_timeout = "{fail_timeout}"\n' if fail_timeout else "")
        )
    return path


REST_SETTLE = 1.0  # seconds after the start before the relay counts as at rest
REST_WINDOW = 5.0  # seconds over which its wake-ups at rest are counted
# Seconds between two samples of the PSS during a load. Reading smaps_rollup walks the
# process's page tables under its memory-map lock (~0.3 ms of this process's CPU per
# read of a relay process), so it is sampled ten times less often than VmRSS.
PSS_INTERVAL = 0.2
RELAY_PARTS = ("receiver", "delivery")  # smarthost's two processes, as figures name them


@dataclass
class Rest:
    """The relay at rest: PSS of each part and the anonymous share of their total,
    wake-ups a second of all its processes."""

    pss_kib: list[int]
    anon_kib: int
    wakeups: float
    processes: int


@dataclass
class RelayEnd:
    """What the relay looked like at the end of a scenario."""

    peak_rss_kib: list[int]  # VmHWM of the relay process, then of its delivery process
    exit_code: int | None  # None: did not exit within STOP_TIMEOUT (then killed)
    stop_seconds: float
    events: Counter[str]
    problems: list[str]  # log records at warning level or above, non-JSON stderr lines
    label: str = "relay"  # Postfix: its instance (no peak RSS: its workers come and go)
    stopped_by: str = "SIGTERM"


class UnderTest:
    """What a scenario measures of the relay under test, smarthost or Postfix: the
    process tree under `root_pid()`, its figures split into `parts`."""

    label = "relay"
    parts: tuple[str, ...] = RELAY_PARTS
    port: int | None

    def root_pid(self) -> int:
        raise NotImplementedError

    def pids(self) -> list[int]:
        return process_tree(self.root_pid())

    def parts_of(self, split: list[int]) -> list[int]:
        """[the root process's, its descendants'] as `parts`."""
        return split

    def cpu_seconds(self) -> list[float]:
        raise NotImplementedError

    def finish(self, expected: frozenset[str] = frozenset()) -> RelayEnd:
        raise NotImplementedError

    def pss_kib(self) -> list[int]:
        """The proportional set size of each part: shared pages counted once."""
        root = self.root_pid()
        others = sum(pss_kib(pid) for pid in self.pids() if pid != root)
        return self.parts_of([pss_kib(root), others])

    def pss_sampler(self) -> PssSampler:
        """Not started: its `at_peak` is the split of the highest total sampled."""
        return PssSampler(self.root_pid(), PSS_INTERVAL)

    def at_rest(self) -> Rest:
        """Its memory and wake-ups once started and idle, over REST_WINDOW."""
        time.sleep(REST_SETTLE)
        pids = self.pids()
        before = sum(context_switches(pid) for pid in pids)
        time.sleep(REST_WINDOW)
        after = sum(context_switches(pid) for pid in pids)
        anon = sum(pss_kib(pid, "Pss_Anon") for pid in pids)
        return Rest(self.pss_kib(), anon, (after - before) / REST_WINDOW, len(pids))


class Relay(RelayProcess, UnderTest):
    """`python -m smarthost -c CFG serve` as a subprocess, its log (stderr) in a file.

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
        super().__init__(Path(config), Path(directory) / f"relay-{label}.log")
        self.delivery_pid = 0
        self.metrics = ""  # host:port of its metrics endpoint, when it serves one
        self.started_at = 0.0  # time.time() of its `started` event
        self.accept_seconds = math.nan
        self.popen_time = time.time()
        offset = self.spawn()
        if port:
            self.accept_seconds = self.wait_accepting(port, timeout)
        try:
            started = self.wait_started(offset, timeout)
        except pytest.fail.Exception as exc:  # what the tests' wait reports
            self.kill()
            raise RuntimeError(f"the relay did not start: {exc}") from None
        self.delivery_pid = int(started.get("delivery_pid") or 0)
        self.metrics = str(started.get("metrics") or "")
        with contextlib.suppress(KeyError, TypeError, ValueError):
            self.started_at = datetime.fromisoformat(started["time"]).timestamp()

    @property
    def process(self) -> subprocess.Popen:
        assert self.proc is not None
        return self.proc

    def kill(self) -> None:
        super().kill()
        if self.delivery_pid:  # it dies with us (PR_SET_PDEATHSIG); this is in case not
            with contextlib.suppress(OSError):
                os.kill(self.delivery_pid, signal.SIGKILL)

    def root_pid(self) -> int:
        return self.process.pid

    def pids(self) -> list[int]:
        """The relay process, then its delivery process (when known)."""
        return [pid for pid in (self.process.pid, self.delivery_pid) if pid]

    def memory_kib(self, key: str) -> list[int]:
        """`VmRSS` (now) or `VmHWM` (peak) of each process, read from /proc."""
        return [proc_status_kib(pid, key) if pid else 0 for pid in self.both()]

    def both(self) -> list[int]:
        """The relay process, then its delivery process (0: not known)."""
        return [self.process.pid, self.delivery_pid]

    def reset_peak_rss(self) -> bool:
        return all(reset_peak_rss(pid) for pid in self.pids())

    def cpu_seconds(self) -> list[float]:
        """User + system CPU time of each process so far. The delivery process is read
        live: its time reaches the relay's cutime only once reaped, at the very end."""
        return [cpu_seconds(pid) if pid else 0.0 for pid in self.both()]

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

    def finish(self, expected: frozenset[str] = frozenset()) -> RelayEnd:
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
        for record in self.records():
            if record["event"] == "<not json>":  # stderr that is not a log record
                record = {"level": "stderr", "": record["line"]}
            events[str(record.get("event", "-"))] += 1
            if record.get("level") not in ("debug", "info") and record.get("event") not in expected:
                record.pop("time", None)
                problems.append(" ".join(f"{k}={v}" if k else str(v) for k, v in record.items()))
        return RelayEnd(rss, code, stop_seconds, events, problems)


class PostfixPeer(UnderTest):
    """A private Postfix instance (postfix_peer.py) in the relay's place, started under
    `directory`/`name` and relaying to the sink; its figures are those of its whole
    process tree (the master and its children, with those already reaped)."""

    label = "Postfix"
    parts = ("its whole process tree",)

    def __init__(self, directory: str, name: str, sink_port: int) -> None:
        self.instance = PostfixInstance(os.path.join(directory, name), sink_port)
        self.instance.write_config()
        self.instance.start()  # RuntimeError with Postfix's words when it fails
        self.port = self.instance.port

    def root_pid(self) -> int:
        return self.instance.master

    def parts_of(self, split: list[int]) -> list[int]:
        return [sum(split)]

    def cpu_seconds(self) -> list[float]:
        return [tree_cpu_seconds(self.instance.master)]

    def finish(self, expected: frozenset[str] = frozenset()) -> RelayEnd:
        """`postfix stop` and wait for its processes; its log's statuses and warnings."""
        code, seconds = self.instance.stop(STOP_TIMEOUT)
        events = self.instance.statuses()
        problems = self.instance.problems()
        return RelayEnd([], code, seconds, events, problems, self.label, "postfix stop")


# -- the load generator --------------------------------------------------------------------


def connect(port: int, name: str, timeout: float = 60.0) -> smtplib.SMTP:
    """An smtplib session to the relay, past EHLO."""
    smtp = smtplib.SMTP(HOST, port, local_hostname=name, timeout=timeout)
    # Our own Nagle/delayed-ACK stalls must not show up as the relay's latency.
    smtp.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    code, reply = smtp.ehlo()
    if code != 250:
        smtp.close()
        raise smtplib.SMTPHeloError(code, reply)
    return smtp


@dataclass
class Sent:
    seq: int
    t_data: float  # just before the DATA command (0.0: not reached)
    t_reply: float  # final reply to the text read (0.0: none)
    code: int  # that reply's code; 0: the session broke
    reply: str = ""  # the final reply to the text, as read


class Load:
    """Sends `n` messages over `clients` threads, each reusing one smtplib session.

    The threads take the next sequence number from a shared counter. With `rate` > 0,
    message `seq` is not sent before start + seq / rate (an absolute timetable).
    Commands go in lock step (no PIPELINING), like most clients.
    """

    def __init__(
        self,
        messages: Messages,
        scenario: str,
        n: int,
        clients: int,
        rate: float = 0.0,
        timeout: float = 60.0,
    ) -> None:
        self.messages = messages
        self.scenario = scenario
        self.n = n
        self.clients = clients
        self.rate = rate
        self.timeout = timeout  # seconds for any one reply
        self.port = 0
        self.start = 0.0
        self.sent: list[Sent] = []  # list.append is atomic: shared by the threads
        self.session_errors: list[str] = []
        self.late = 0  # paced: messages sent more than LATE seconds after their slot
        self._next = 0
        self._lock = threading.Lock()

    def message_id(self, seq: int) -> str:
        return self.messages.message_id(self.scenario, seq)

    def again(self, scenario: str, n: int | None = None, rate: float | None = None) -> Load:
        """A load not yet sent of the same messages over as many sessions, under another
        scenario name (so with Message-IDs of its own)."""
        return Load(
            self.messages,
            scenario,
            self.n if n is None else n,
            self.clients,
            self.rate if rate is None else rate,
            self.timeout,
        )

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

    def _client(self, index: int) -> None:
        smtp: smtplib.SMTP | None = None
        failures = 0
        while (seq := self._take()) is not None:
            try:
                if smtp is None:
                    smtp = connect(self.port, f"load{index}.bench", self.timeout)
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
        for piece in self.messages.pieces(self.scenario, seq):
            smtp.send(piece)
        code, raw = smtp.getreply()
        text = raw.decode("utf-8", "replace").replace("\n", " ")
        self.sent.append(Sent(seq, t_data, time.time(), code, f"{code} {text}"))
        return code != 421


# -- one scenario --------------------------------------------------------------------------


@dataclass
class Cpu:
    """CPU seconds of the relay under test (each of its parts), of the load generator
    (this process) and of the sink."""

    label: str  # "relay", "Postfix"
    names: tuple[str, ...]  # the relay's parts
    parts: list[float]
    load: float
    sink: float

    @classmethod
    def now(cls, relay: UnderTest, sink: Sink) -> Cpu:
        return cls(
            relay.label, relay.parts, relay.cpu_seconds(), time.process_time(), sink.cpu_seconds()
        )

    @property
    def relay(self) -> float:
        return sum(self.parts)

    def __sub__(self, other: Cpu) -> Cpu:
        return Cpu(
            self.label,
            self.names,
            [a - b for a, b in zip(self.parts, other.parts)],
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
    rest: Rest  # before the warm-up
    peak_pss_kib: list[int]  # the highest total sampled during the load, split in parts
    pss_samples: int
    loaded_pss_kib: list[int]  # right after the load, before the stop


def run_scenario(
    args: argparse.Namespace, directory: str, sink: Sink, load: Load, title: str
) -> Result:
    """Start a relay, then measure the load through it."""
    config = write_config(directory, load.scenario, sink.port, args.workers)
    return measure(args, Relay(config, directory, load.scenario), sink, load, title)


def run_postfix(
    args: argparse.Namespace, directory: str, sink: Sink, load: Load, title: str
) -> Result:
    """Start a private Postfix instance, then measure the load through it."""
    return measure(args, PostfixPeer(directory, load.scenario, sink.port), sink, load, title)


def measure(
    args: argparse.Namespace, relay: UnderTest, sink: Sink, load: Load, title: str
) -> Result:
    """The relay at rest, then warm it up, send the load while sampling its PSS, wait for
    the arrivals, stop the relay."""
    try:
        rest = relay.at_rest()
        warmup = None
        if args.warmup > 0:
            warmup = load.again(f"{load.scenario}-warmup", args.warmup, rate=0.0)
            send_and_wait(warmup, relay.port, sink, args.wait)
        pss = relay.pss_sampler().start()
        before = Cpu.now(relay, sink)
        try:
            send_and_wait(load, relay.port, sink, args.wait)
        finally:
            pss.stop()
        cpu = Cpu.now(relay, sink) - before
        loaded = relay.pss_kib()
    finally:
        end = relay.finish()
    sink.poll()
    peak = relay.parts_of(pss.at_peak)
    return Result(title, load, warmup, sink.arrivals, cpu, end, rest, peak, pss.samples, loaded)


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


NO_REPLY = {-1: "never sent", 0: "broken session"}  # Sent.code when there was no reply


def refused_detail(loads: list[Load]) -> tuple[int, str]:
    """How many messages were not answered 250, and why ("3 x 451, 1 x broken session")."""
    refused: Counter[int] = Counter()
    for load in loads:
        refused.update(s.code for s in load.sent if s.code != 250)
        refused[-1] += load.n - len(load.sent)  # never sent: every session gave up
    detail = ", ".join(f"{n} x {NO_REPLY.get(c, c)}" for c, n in sorted(refused.items()) if n)
    return sum(refused.values()), detail


def arrived_pairs(load: Load, arrivals: dict[str, list[float]]) -> list[tuple[Sent, list[float]]]:
    """Each accepted message of `load` that reached the sink, with its arrival times."""
    ids = [(s, load.message_id(s.seq)) for s in load.accepted()]
    return [(s, arrivals[i]) for s, i in ids if i in arrivals]


def forward_seconds(load: Load, arrivals: dict[str, list[float]]) -> list[float]:
    """Per message that arrived: the client's 250 -> the sink has it."""
    return [times[0] - s.t_reply for s, times in arrived_pairs(load, arrivals)]


def load_lines(load: Load, arrivals: dict[str, list[float]]) -> tuple[list[str], bool]:
    """The throughput and latency lines of a load; False when a message was lost or refused."""
    accepted = load.accepted()
    arrived = arrived_pairs(load, arrivals)
    duplicates = sum(len(times) - 1 for _, times in arrived)
    lost = len(accepted) - len(arrived)
    refused, detail = refused_detail([load])
    lines = [
        f"accepted    {accepted_rate(load):7.1f} msgs/s"
        f"   (start -> last 250; {len(accepted)} of {load.n})",
        f"end-to-end  {end_to_end_rate(load, arrivals):7.1f} msgs/s   (start -> last arrival)",
        f"DATA->250   {spread_ms([s.t_reply - s.t_data for s in accepted])}",
        f"forward     {spread_ms(forward_seconds(load, arrivals))}   (client's 250 -> sink has it)",
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


def mib(kib: list[int], names: tuple[str, ...] = RELAY_PARTS) -> str:
    """The total, and each part's share when there are several:
    "52.1 MiB (receiver 30.2 + delivery 21.9)"."""
    total = f"{sum(kib) / 1024:.1f} MiB"
    if len(kib) < 2:
        return total
    return total + " (" + " + ".join(f"{n} {k / 1024:.1f}" for n, k in zip(names, kib)) + ")"


def cpu_per_message_ms(cpu: Cpu, messages: int) -> float:
    return cpu.relay / max(1, messages) * 1000


def cpu_line(cpu: Cpu, messages: int, what: str = "") -> str:
    if len(cpu.parts) > 1:
        parts = " + ".join(f"{n} {s:.2f} s" for n, s in zip(cpu.names, cpu.parts))
    else:
        parts = cpu.names[0]
    return (
        f"CPU         {cpu.label} {cpu.relay:.2f} s = "
        f"{cpu_per_message_ms(cpu, messages):.2f} ms/msg{what}   "
        f"({parts}; load generator {cpu.load:.2f} s, sink {cpu.sink:.2f} s)"
    )


def end_lines(end: RelayEnd) -> list[str]:
    status = "did not exit, killed" if end.exit_code is None else f"exit {end.exit_code}"
    events = ", ".join(f"{name} {n}" for name, n in sorted(end.events.items()))
    memory = f"peak RSS {mib(end.peak_rss_kib)}   " if end.peak_rss_kib else ""
    return [
        f"{end.label:<11} {memory}{end.stopped_by} -> {status} in {end.stop_seconds:.2f} s",
        f"{end.label + ' log':<11} {events}",
    ]


def relay_lines(result: Result) -> list[str]:
    names = result.cpu.names
    return [
        cpu_line(result.cpu, len(result.load.accepted())),
        f"PSS         at rest {mib(result.rest.pss_kib, names)} of which "
        f"{result.rest.anon_kib / 1024:.1f} anonymous, peak "
        f"{mib(result.peak_pss_kib, names)}, after the load {mib(result.loaded_pss_kib, names)}"
        f"   (peak of {result.pss_samples} samples, every {PSS_INTERVAL * 1000:g} ms)",
        f"at rest     {result.rest.wakeups:.1f} wake-ups/s   "
        f"({result.rest.processes} processes, over {REST_WINDOW:g} s)",
        *end_lines(result.relay),
    ]


def versus_lines(ours: Result, theirs: Result) -> list[str]:
    """smarthost's figures beside Postfix's, the same load through each."""
    both = (ours, theirs)
    e2e = [end_to_end_rate(r.load, r.arrivals) for r in both]
    cpu = [cpu_per_message_ms(r.cpu, len(r.load.accepted())) for r in both]
    p99 = [percentile(sorted(forward_seconds(r.load, r.arrivals)), 99) * 1000 for r in both]
    rest = [sum(r.rest.pss_kib) / 1024 for r in both]
    anon = [r.rest.anon_kib / 1024 for r in both]
    peak = [sum(r.peak_pss_kib) / 1024 for r in both]
    return [
        "smarthost / Postfix (the same load, sink and clients, one run each)",
        f"end-to-end  {ratio(*e2e)} x   ({e2e[0]:.1f} vs {e2e[1]:.1f} msgs/s)",
        f"CPU         {ratio(*cpu)} x per message   ({cpu[0]:.2f} vs {cpu[1]:.2f} ms)",
        f"forward     p99 {p99[0]:.1f} vs {p99[1]:.1f} ms",
        f"PSS         at rest {rest[0]:.1f} vs {rest[1]:.1f} MiB "
        f"(anonymous {anon[0]:.1f} vs {anon[1]:.1f}), peak {peak[0]:.1f} vs {peak[1]:.1f} MiB",
    ]


@dataclass
class Beside:
    """Postfix beside the relay (--postfix): whether it runs, and whether it runs alone."""

    run: bool
    only: bool
    version: str = ""


def plan_postfix(args: argparse.Namespace, directory: str) -> Beside:
    """Whether Postfix runs beside the relay; prints a line saying so, or why not."""
    if args.postfix == "no":
        return Beside(False, False)
    reason = why_not()
    if reason:
        print(f"  Postfix skipped: {reason}", flush=True)
        return Beside(False, args.postfix == "only")
    # Postfix's daemons, running as its mail_owner, must reach their directories in here.
    os.chmod(directory, 0o711)
    version = postfix_version()
    print(
        f"  Postfix {version} beside the relay: a private instance per scenario (config, "
        "queue and port of its own), after the relay's run, with the same sink and load",
        flush=True,
    )
    return Beside(True, args.postfix == "only", version)


def run_pair(
    args: argparse.Namespace,
    directory: str,
    sink: Sink,
    load: Load,
    title: str,
    beside: Beside,
) -> tuple[bool, Result | None]:
    """The relay's run of `load` (but with --postfix only), then, when Postfix runs
    beside, its run of the same load and the two side by side. (True when nothing went
    wrong, the relay's result.)"""
    ok, ours = True, None
    if not beside.only:
        print()
        ours = run_scenario(args, directory, sink, load, title)
        ok = report(ours)
    if not beside.run:
        return ok, ours
    print()
    title = f"{title}: Postfix {beside.version}"
    try:
        theirs = run_postfix(args, directory, sink, load.again(f"postfix-{load.scenario}"), title)
    except RuntimeError as exc:  # it did not start: not tried again
        print(f"{title}\n  ! {exc}", flush=True)
        beside.run = False
        return False, ours
    ok &= report(theirs)
    if ours is not None:
        print("\n" + "\n  ".join(versus_lines(ours, theirs)), flush=True)
    return ok, ours


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
BACKLOG_BATCH = 1000  # messages per group commit of the fixture
EXPECTED_WHILE_DOWN = frozenset({"backend_down"})  # warnings that the scenario causes


def build_backlog(root: str, messages: Messages, n: int) -> list[str]:
    """Spool `n` messages as a relay leaves them after one attempt while every backend of
    group "default" was down; returns their Message-IDs.

    Committed through the spool's own group commit, in batches, into the spool of a
    relay that does not run; then each is made due BACKLOG_DUE away, as a deferral
    leaves it.
    """
    spool = Spool(root)
    spool.create()
    now = time.time()
    due = now + BACKLOG_DUE
    error = "sink: ConnectionRefusedError: [Errno 111] Connection refused"
    message_ids = []
    batch: list[tuple[Envelope, Content]] = []
    for seq in range(n):
        content = messages.text("backlog", seq)[:-3]  # without the terminating "."
        message_id = messages.message_id("backlog", seq)
        env = Envelope(
            id=new_id(),
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
        batch.append((env, [content]))
        message_ids.append(message_id)
        if len(batch) == BACKLOG_BATCH or seq == n - 1:
            _commit_deferred(spool, batch, due)
            batch = []
    return message_ids


def _commit_deferred(spool: Spool, batch: list[tuple[Envelope, Content]], due: float) -> None:
    errors = [error for error in spool.commit_many(batch) if error is not None]
    if errors:
        raise errors[0]
    for env, _ in batch:
        spool.set_due(QUEUE, env.id, due)


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
    args: argparse.Namespace, messages: Messages, scenario: str, relay: Relay, sink: Sink
) -> tuple[list[Load], Cpu]:
    """The warm-up (not counted) and the counted load, flat out, and the relay's CPU
    during the counted one; the upstream is down, so nothing is waited for."""
    load = Load(messages, scenario, args.backlog_new, args.clients)
    loads = [load.again(f"{scenario}-warmup", args.warmup)] if args.warmup > 0 else []
    for warmup in loads:
        warmup.run(relay.port)
    before = Cpu.now(relay, sink)
    load.run(relay.port)
    return [*loads, load], Cpu.now(relay, sink) - before


def backlog_relay(
    args: argparse.Namespace,
    directory: str,
    label: str,
    sink: Sink,
    timeout: float = START_TIMEOUT,
    metrics: bool = False,
) -> Relay:
    """A relay on the spool `label`, listening on a port chosen beforehand (so that the
    time to its first 220 is measured), its backend `fail_timeout` short; with
    `metrics`, serving them."""
    port = free_port()
    config = write_config(
        directory, label, sink.port, args.workers, port, BACKLOG_FAIL_TIMEOUT, metrics=metrics
    )
    return Relay(config, directory, label, port, timeout)


def ratio(value: float, reference: float | None) -> str:
    if reference is None or not reference > 0 or math.isnan(value):
        return "-"
    return f"{value / reference:.2f}"


SCRAPE_INTERVAL = 0.5  # seconds between two GETs of /metrics in the backlog scenario
SCRAPE_TARGET_MS = 50.0  # issue 16: a scrape with 100,000 messages queued
_WAITING = re.compile(
    r'^smarthost_queue_messages\{state="(?:queued|deferred|active)"\} (\S+)$', re.M
)


class Scraper:
    """GETs the relay's /metrics every SCRAPE_INTERVAL, as Prometheus would, from a
    thread of its own; each scrape's latency is kept by phase, with how many messages
    the queue gauges said were waiting (queued, deferred or active) at that moment."""

    def __init__(self, address: str) -> None:
        self.url = f"http://{address}/metrics"
        self.phase = "loaded"
        self.scrapes: dict[str, list[tuple[float, int]]] = {}
        self.errors: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="scraper", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()

    def _run(self) -> None:
        while not self._stop.wait(SCRAPE_INTERVAL):
            phase = self.phase
            started = time.perf_counter()
            try:
                with urllib.request.urlopen(self.url, timeout=10) as response:
                    text = response.read().decode()
            except OSError as exc:
                self.errors.append(f"scrape: {exc}")
                continue
            took = time.perf_counter() - started
            waiting = sum(float(v) for v in _WAITING.findall(text))
            self.scrapes.setdefault(phase, []).append((took, int(waiting)))

    def line(self, phase: str, what: str) -> str:
        scrapes = self.scrapes.get(phase, [])
        if not scrapes:
            return f"scrape      {what}: no scrape"
        waiting = [w for _, w in scrapes]
        worst = max(t for t, _ in scrapes) * 1000
        return (
            f"scrape      {what}: {spread_ms([t for t, _ in scrapes])} ({len(scrapes)} scrapes;"
            f" gauges said {max(waiting)}..{min(waiting)} waiting)"
            + ("" if worst <= SCRAPE_TARGET_MS else f"   OVER {SCRAPE_TARGET_MS:.0f} ms")
        )


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
            f"group commits, no relay running), then sync {synced:.1f} s"
        )

        # The same relay and load on an empty queue, for reference.
        relay = backlog_relay(args, directory, "backlog-empty", sink, metrics=True)
        try:
            empty_loads, empty_cpu = send_new_mail(args, messages, "backlog-empty", relay, sink)
        finally:
            empty_end = relay.finish(EXPECTED_WHILE_DOWN)
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
        empty_ms = cpu_per_message_ms(empty_cpu, len(empty.accepted()))
        line(cpu_line(empty_cpu, len(empty.accepted()), " for new mail (accepted, deferred)"))

        # (a) start, (b) memory with the backlog loaded.
        relay = backlog_relay(args, directory, "backlog", sink, BACKLOG_START_TIMEOUT, metrics=True)
        scraper = Scraper(relay.metrics)
        pss = relay.pss_sampler().start()  # from the start to the end of the drain
        try:
            settled = wait_until_settled(relay, BACKLOG_START_TIMEOUT)
            line(
                f"start       first client's 220 after {relay.accept_seconds:.2f} s "
                f"(from Popen); `started` logged after {relay.started_at - relay.popen_time:.2f} s;"
                f" settled after {settled:.2f} s (CPU < {IDLE_CPU:.0%} of a core)"
            )
            loaded_pss = relay.pss_kib()
            line(
                f"loaded      RSS {mib(relay.memory_kib('VmRSS'))}, "
                f"peak so far {mib(relay.memory_kib('VmHWM'))}; PSS {mib(loaded_pss)}"
            )
            scraper.start()
            time.sleep(SCRAPE_INTERVAL * 11)  # ten scrapes of the loaded, idle relay

            # (c) new mail while the backlog waits.
            scraper.phase = "new mail"
            loads, new_cpu = send_new_mail(args, messages, "backlog-new", relay, sink)
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
            new_ms = cpu_per_message_ms(new_cpu, len(load.accepted()))
            line(
                cpu_line(
                    new_cpu,
                    len(load.accepted()),
                    f" for new mail = {ratio(new_ms, empty_ms)} x the empty queue's",
                )
            )

            # (d) the upstream returns: the drain.
            expected = set(backlog_ids)
            expected.update(ld.message_id(s.seq) for ld in loads for s in ld.accepted())
            start_peak = relay.memory_kib("VmHWM")
            peak_reset = relay.reset_peak_rss()
            before = Cpu.now(relay, sink)
            scraper.phase = "drain"
            back = sink.listen()
            sink.wait_for(expected, DRAIN_LIMIT, idle=args.wait)
            cpu = Cpu.now(relay, sink) - before
            drain_peak = relay.memory_kib("VmHWM")
        finally:
            scraper.stop()
            pss.stop()
            end = relay.finish(EXPECTED_WHILE_DOWN)
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
        line(
            f"PSS         once loaded {mib(loaded_pss)}, peak {mib(pss.at_peak)}   (peak of "
            f"{pss.samples} samples every {PSS_INTERVAL * 1000:g} ms, start to drained)"
        )
        refused, detail = refused_detail(loads)
        line(
            f"lost {lost}   duplicates {duplicates}   refused {refused}"
            + (f" ({detail})" if detail else "")
        )
        line(cpu_line(cpu, len(firsts), " during the drain"))
        line(scraper.line("loaded", f"/metrics, {n} queued, idle"))
        line(scraper.line("new mail", "while new mail comes"))
        line(scraper.line("drain", "during the drain"))
        problems += scraper.errors
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


# -- the large-message scenarios --------------------------------------------------------

RSS_INTERVAL = 0.020  # seconds between two samples of both processes' VmRSS
NOOP_INTERVAL = 0.010  # seconds between two NOOPs of the probe session
RSS_TARGET_MIB = 32  # issue 13: peak RSS <= idle + this, in each memory scenario
NOOP_TARGET_MS = 50.0  # issue 13: another session's NOOP answered within this (p99)
SETTLE_LIMIT = 30.0  # seconds for the relay to go idle after the warm-up
BIG_TIMEOUT = 600.0  # seconds for one reply: today's relay takes minutes on hostile DATA
# Events at warning level that a hostile DATA may rightly cause (SPEC §8).
CLIENT_FAILURES = frozenset({"protocol_error", "rejected"})


class NoopProbe:
    """Another client session sending NOOP every NOOP_INTERVAL, in a thread: how long a
    session waits on the relay while another one sends a big message."""

    def __init__(self, port: int) -> None:
        self.smtp = connect(port, "probe.bench", BIG_TIMEOUT)
        self.times: list[tuple[float, float]] = []  # (time.time() sent, round trip s)
        self.error = ""
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._run, name="noop", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        due = time.monotonic()
        while not self._done.is_set():
            sent, began = time.time(), time.perf_counter()
            try:
                code, _ = self.smtp.docmd("NOOP")
            except (smtplib.SMTPException, OSError) as exc:
                self.error = f"NOOP probe: {exc!r}"
                return
            if code != 250:
                self.error = f"NOOP probe: answered {code}"
                return
            self.times.append((sent, time.perf_counter() - began))
            # A fixed timetable; after a stall, the next NOOP goes at once.
            due = max(due + NOOP_INTERVAL, time.monotonic())
            self._done.wait(due - time.monotonic())

    def stop(self) -> None:
        self._done.set()
        self._thread.join()
        try:
            self.smtp.quit()
        except (smtplib.SMTPException, OSError):
            self.smtp.close()

    def round_trips(self, start: float, end: float) -> list[float]:
        """Round trips of the NOOPs sent from `start` to `end` (time.time())."""
        return [rtt for sent, rtt in self.times if start <= sent <= end]


@dataclass
class MemoryResult:
    title: str
    load: Load
    warmup: Load | None
    expect: int  # the reply the text must get: 250, or 552 when over max_message_size
    arrivals: dict[str, list[float]]
    idle_kib: list[int]  # VmRSS of [receiver, delivery] when the load began
    peak_kib: list[int]  # the highest VmRSS sampled of each
    hwm_kib: list[int]  # VmHWM of each at the end (reset when the load began)
    hwm_reset: bool
    samples: int
    noop: NoopProbe | None
    cpu: Cpu
    relay: RelayEnd
    pss: PssSampler  # both processes' PSS, from the start of the load to its end


def run_memory(
    args: argparse.Namespace,
    directory: str,
    sink: Sink,
    small: Messages,
    load: Load,
    title: str,
    max_message_size: str,
    probe: bool = False,
) -> MemoryResult:
    """Start a relay, warm it up with small messages, let it settle, then send the load
    while sampling both processes' RSS (and timing another session's NOOPs)."""
    config = write_config(
        directory, load.scenario, sink.port, args.workers, max_message_size=max_message_size
    )
    relay = Relay(config, directory, load.scenario)
    noop = None
    try:
        warmup = None
        if args.warmup > 0:
            warmup = Load(small, f"{load.scenario}-warmup", args.warmup, load.clients)
            send_and_wait(warmup, relay.port, sink, args.wait)
        wait_until_settled(relay, SETTLE_LIMIT)
        hwm_reset = relay.reset_peak_rss()
        sampler = RssSampler(relay.process.pid, RSS_INTERVAL).start()
        pss = relay.pss_sampler().start()
        before = Cpu.now(relay, sink)
        try:
            noop = NoopProbe(relay.port) if probe else None
            send_and_wait(load, relay.port, sink, args.wait)
        finally:
            sampler.stop()
            pss.stop()
            if noop is not None:
                noop.stop()
        cpu = Cpu.now(relay, sink) - before
        hwm = relay.memory_kib("VmHWM")
    finally:
        end = relay.finish(CLIENT_FAILURES)
    sink.poll()
    expect = 552 if load.messages.size > parse_size(max_message_size) else 250
    return MemoryResult(
        title,
        load,
        warmup,
        expect,
        sink.arrivals,
        sampler.idle_split,
        sampler.peak_split,
        hwm,
        hwm_reset,
        sampler.samples,
        noop,
        cpu,
        end,
        pss,
    )


def mib_delta(peak: list[int], idle: list[int]) -> str:
    growth = [p - i for p, i in zip(peak, idle)]
    return (
        f"idle + {sum(growth) / 1024:.1f} MiB "
        f"(receiver +{growth[0] / 1024:.1f} + delivery +{growth[1] / 1024:.1f})"
    )


def replies_line(load: Load, expect: int) -> str:
    """ "4 x 250 ("250 2.0.0 Ok: queued as ...")" and what was expected."""
    codes = Counter(s.code for s in load.sent)
    codes[-1] += load.n - len(load.sent)
    counted = ", ".join(f"{n} x {NO_REPLY.get(c, c)}" for c, n in sorted(codes.items()) if n)
    example = next((s.reply for s in load.sent if s.reply), "")
    return (
        f"reply       {counted}"
        + (f' ("{example}")' if example else "")
        + (f"   expected {expect}")
    )


def memory_lines(result: MemoryResult) -> tuple[list[str], bool]:
    """The reply, RSS and NOOP lines of a memory scenario; False when a reply was not
    the expected one or an accepted message was lost."""
    load = result.load
    replied = [s for s in load.sent if s.code]
    lines = [
        replies_line(load, result.expect),
        f"DATA->reply {spread_ms([s.t_reply - s.t_data for s in replied])}",
    ]
    ok = len(load.sent) == load.n and all(s.code == result.expect for s in load.sent)
    accepted = load.accepted()
    if accepted:
        arrived = arrived_pairs(load, result.arrivals)
        lost = len(accepted) - len(arrived)
        duplicates = sum(len(times) - 1 for _, times in arrived)
        lines += [
            f"forward     {spread_ms(forward_seconds(load, result.arrivals))}"
            "   (client's 250 -> sink has it)",
            f"lost {lost}   duplicates {duplicates}",
        ]
        ok &= lost == 0
    within = sum(result.peak_kib) - sum(result.idle_kib) <= RSS_TARGET_MIB * 1024
    lines += [
        f"RSS idle    {mib(result.idle_kib)}   (after the warm-up, when the load began)",
        f"RSS peak    {mib(result.peak_kib)} = {mib_delta(result.peak_kib, result.idle_kib)}"
        f"   {'within' if within else 'OVER'} the target idle + {RSS_TARGET_MIB} MiB"
        f"   ({result.samples} samples, every {RSS_INTERVAL * 1000:g} ms)",
        f"VmHWM       {mib(result.hwm_kib)} = {mib_delta(result.hwm_kib, result.idle_kib)}"
        + (
            "   (the kernel's peak since the load began)"
            if result.hwm_reset
            else "   (could not be reset: since start)"
        ),
        f"PSS         idle {mib(result.pss.idle_split)}, peak {mib(result.pss.at_peak)}"
        f"   (peak of {result.pss.samples} samples, every {PSS_INTERVAL * 1000:g} ms)",
    ]
    if result.noop is not None:
        lines.append(noop_line(result.noop, replied))
        ok &= not result.noop.error
    return lines, ok


def noop_line(noop: NoopProbe, replied: list[Sent]) -> str:
    """The probe's round trips while a big message was sent and committed: from each
    one's DATA command to its reply (they go one after another)."""
    trips = [t for s in replied for t in noop.round_trips(s.t_data, s.t_reply)]
    window = sum(s.t_reply - s.t_data for s in replied)
    if not trips:
        return f"NOOP        none sent from DATA to its reply ({window:.2f} s)"
    p99 = percentile(sorted(trips), 99) * 1000
    return (
        f"NOOP        {spread_ms(trips)}   ({len(trips)} sent in the {window:.2f} s "
        f"from DATA to reply, {sum(t * 1000 > NOOP_TARGET_MS for t in trips)} over "
        f"{NOOP_TARGET_MS:g} ms; p99 {'within' if p99 <= NOOP_TARGET_MS else 'OVER'} "
        f"the target {NOOP_TARGET_MS:g} ms)"
    )


def report_memory(result: MemoryResult) -> bool:
    """Print one memory scenario's block; True when nothing went wrong."""
    lines, ok = memory_lines(result)
    if result.warmup is not None:
        lines.insert(0, warmup_line(result.warmup, result.arrivals))
        ok &= load_lines(result.warmup, result.arrivals)[1]
    lines.append(cpu_line(result.cpu, len(result.load.accepted())))
    lines += end_lines(result.relay)
    problems = result.load.session_errors + result.relay.problems
    unexpected = [s for s in result.load.sent if s.code != result.expect]
    if unexpected:
        problems.append(f"expected {result.expect}, got: {unexpected[0].reply or 'no reply'}")
    if result.noop is not None and result.noop.error:
        problems.append(result.noop.error)
    lines += [f"! {problem}" for problem in problems[:SHOWN_PROBLEMS]]
    if len(problems) > SHOWN_PROBLEMS:
        lines.append(f"! ... and {len(problems) - SHOWN_PROBLEMS} more")
    print("\n  ".join([result.title, *lines]), flush=True)
    return ok and result.relay.exit_code == 0 and not problems


def run_large(
    args: argparse.Namespace, directory: str, sink: Sink, small: Messages, beside: Beside
) -> bool:
    """100 KiB flat out (Postfix too when beside), then the memory and stall scenarios,
    each on a fresh relay (but with --postfix only)."""
    run_id = small.run_id
    flat = Load(Messages(run_id, args.large_size), "large", args.large_n, args.clients)
    title = f"large flat out: {args.large_n} msgs x {args.large_size} B, {args.clients} clients"
    ok = run_pair(args, directory, sink, flat, title, beside)[0]
    if beside.only:
        return ok

    big = Messages(run_id, args.big_mib * 2**20)
    # Room for the relay's own count of a message of exactly --big-mib.
    big_limit = f"{args.big_mib + 1}M"
    # Over max_message_size, so that the whole line must be read and discarded (552):
    # the default 25M for the 64 MiB line.
    line_limit = f"{min(25, args.long_line_mib // 2)}M"
    cases = [
        (
            Load(big, "big", args.big_n, args.big_n, timeout=BIG_TIMEOUT),
            f"memory: {args.big_n} msgs x {args.big_mib} MiB at once, {args.big_n} clients,"
            f" received and forwarded; max_message_size {big_limit}",
            big_limit,
            False,
        ),
        (
            Load(big, "noop", args.big_n, 1, timeout=BIG_TIMEOUT),
            f"no stalls: {args.big_n} msgs x {args.big_mib} MiB one after another on one "
            f"session, another sending NOOP every {NOOP_INTERVAL * 1000:g} ms; "
            f"max_message_size {big_limit}",
            big_limit,
            True,
        ),
        (
            Load(LongLine(run_id, args.long_line_mib * 2**20), "line", 1, 1, timeout=BIG_TIMEOUT),
            f"memory: one DATA of {args.long_line_mib} MiB without a CRLF (one line); "
            f"max_message_size {line_limit}: read to the end, discarded, 552",
            line_limit,
            False,
        ),
        (
            Load(
                EmptyLines(run_id, args.empty_lines_mib * 2**20),
                "empty",
                1,
                1,
                timeout=BIG_TIMEOUT,
            ),
            f"memory: one DATA of {args.empty_lines_mib} MiB of empty lines (CRLF only), "
            "received and forwarded; max_message_size 25M",
            "25M",
            False,
        ),
    ]
    for load, title, limit, probe in cases:
        print()
        ok &= report_memory(run_memory(args, directory, sink, small, load, title, limit, probe))
    return ok


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
    p.add_argument(
        "--large-n", type=int, default=600, help="large: messages of --large-size flat out (600)"
    )
    p.add_argument(
        "--large-size", type=int, default=100 * 1024, help="large: bytes per message (102400)"
    )
    p.add_argument("--big-mib", type=int, default=25, help="large: MiB per big message (25)")
    p.add_argument("--big-n", type=int, default=4, help="large: big messages at once (4)")
    p.add_argument(
        "--long-line-mib", type=int, default=64, help="large: MiB of DATA in one line (64)"
    )
    p.add_argument(
        "--empty-lines-mib", type=int, default=8, help="large: MiB of DATA of empty lines (8)"
    )
    p.add_argument("--only", choices=SCENARIOS, help="run one scenario only")
    p.add_argument(
        "--postfix",
        choices=("auto", "no", "only"),
        default="auto",
        help="auto: run a private Postfix instance beside the relay in flat out, paced and "
        "large flat out when Postfix is installed and this runs as root; no; only: "
        "Postfix's runs alone (auto)",
    )
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
            args.large_n,
            args.large_size,
            args.big_mib,
            args.big_n,
            args.empty_lines_mib,
        )
        < 1
    ):
        p.error(
            "--n, --size, --clients, --paced-clients, --workers, --backlog, --backlog-new, "
            "--large-n, --large-size, --big-mib, --big-n and --empty-lines-mib must be positive"
        )
    if args.long_line_mib < 2:
        p.error("--long-line-mib must be at least 2 (the line is over max_message_size)")
    if args.rate <= 0 or args.duration <= 0:
        p.error("--rate and --duration must be positive")
    return args


SCENARIOS = ("flat", "paced", "backlog", "large")


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
    beside = plan_postfix(args, directory)
    if beside.only and not beside.run:
        return False
    ok = True
    flat = None
    chosen = scenarios(args, messages)
    if chosen:
        sink = Sink()
        try:
            for load, title in chosen:
                pair_ok, result = run_pair(args, directory, sink, load, title, beside)
                ok &= pair_ok
                if load.scenario == "flat":
                    flat = result
        finally:
            sink.stop()
    if args.only in (None, "backlog") and not beside.only:
        print()
        ok &= run_backlog(args, directory, messages, flat)
    if args.only in (None, "large"):
        sink = Sink()
        try:
            ok &= run_large(args, directory, sink, messages, beside)
        finally:
            sink.stop()
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
