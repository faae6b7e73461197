"""Test-side helpers for the fault scenarios: the relay launched with the fault hook,
rules armed at run time, messages whose arrival can be counted, spool sanity checks.

Imported by the torture tests only (never inside the relay process).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import ctypes
import json
import os
import re
import signal
import smtplib
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from smarthost.spool import ENVELOPE_STATES, Envelope

from . import delivery_children
from support import ROOT
from support.messages import RCPT, SENDER, header, header_message_id
from support.relay import RelayProcess
from support.sink import Sink, SinkHandler
from support.smtp import QUEUED
from support.spool import spool_files
from support.waiting import wait_until

TESTS = Path(__file__).resolve().parent.parent
SITE = Path(__file__).resolve().parent / "site"  # its sitecustomize installs the hook
DEADLINE = 45.0  # generous: two busy cores, retry_max 2 s

_PR_SET_CHILD_SUBREAPER = 36


# -- the relay with the fault hook ------------------------------------------------------


def fault_env(rules: str, fault_log: Path) -> dict[str, str]:
    """The environment that installs `rules` in every Python process started with it
    (through site/sitecustomize.py): the relay, its delivery process, queue commands."""
    path = os.environ.get("PYTHONPATH")
    return {
        **os.environ,
        "PYTHONPATH": os.pathsep.join((str(SITE), str(TESTS), *([path] if path else []))),
        "SMARTHOST_FAULTS": rules,
        "SMARTHOST_FAULTS_LOG": str(fault_log),
    }


def spool_patterns(spool: Path) -> dict[str, str]:
    """Regexes for the spool paths the rules aim at, by name."""
    root = re.escape(str(spool))
    return {
        "tmp_msg": rf"^{root}/tmp/[^/]*\.msg$",
        "tmp_env": rf"^{root}/tmp/[^/]*\.env$",
        "tmp_draft": rf"^{root}/tmp/[^/]*\.draft$",  # large mail, written as it arrives
        "tmp": rf"^{root}/tmp/",
        "msg": rf"^{root}/msg/",
        "queue": rf"^{root}/queue/",
        "active": rf"^{root}/active/",
        "hold": rf"^{root}/hold/",
        "msg_dir": rf"^{root}/msg$",
        "queue_dir": rf"^{root}/queue$",
        "active_dir": rf"^{root}/active$",
    }


def resolve(rule: dict, spool: Path, **extra) -> dict:
    """A rule with its path keys (names of `spool_patterns`) turned into regexes."""
    out = {**rule, **extra}
    patterns = spool_patterns(spool)
    for key in ("path", "dst"):
        if key in out:
            out[key] = patterns[out[key]]
    return out


def assert_leftovers_whole(spool: Path, lines: dict[str, int] | None = None) -> None:
    """What a kill set aside in corrupt/ is the whole content of a message it sent
    (`lines`: the body lines of each Message-ID, as `Ledger.lines`; 20 if not given)."""
    for leftover in (spool / "corrupt").iterdir():
        content = leftover.read_bytes()
        message_id = header_message_id(content)
        assert message_id, leftover.name
        expected = body(message_id, (lines or {}).get(message_id, 20))
        assert content.endswith(expected), (leftover.name, len(content), len(expected))


def write_rules(path: Path, rules: Iterable[dict[str, Any]]) -> None:
    """Replace a rules file atomically (a new inode: the hook sees the change)."""
    tmp = path.with_suffix(".new")
    tmp.write_text(json.dumps(list(rules)))
    os.replace(tmp, path)


def read_fault_log(path: Path) -> list[dict]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _stat_fields(pid: str) -> list[str] | None:
    """state, ppid, pgrp, ... of a process (from /proc), None once it is gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return f.read().rsplit(b")", 1)[1].decode().split()
    except (OSError, IndexError):
        return None


@contextlib.contextmanager
def subreaper() -> Iterator[None]:
    """Make this process the reaper of the relay's orphans while the block runs.

    When the relay dies its delivery process is orphaned; init here reaps orphans only
    every second or two, and until then the zombie's pid looks alive (to the next
    relay's recover() too, which then keeps its tmp files). systemd reaps at once: so
    do we (Linux PR_SET_CHILD_SUBREAPER; without it, waiting for init still works).
    """
    libc = None
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)
    try:
        yield
    finally:
        if libc is not None:
            libc.prctl(_PR_SET_CHILD_SUBREAPER, 0, 0, 0, 0)


def faulty_relays(tmp_path: Path) -> Iterator[Callable[[Path], FaultyRelay]]:
    """For a fixture: a FaultyRelay(config) factory; the relays still running at the
    end are killed, and their orphans reaped."""
    started: list[FaultyRelay] = []

    def make(config: Path) -> FaultyRelay:
        proc = FaultyRelay(config, tmp_path)
        started.append(proc)
        return proc

    with subreaper():
        yield make
        for proc in started:
            if proc.alive():
                proc.kill()


class FaultyRelay(RelayProcess):
    """`python -m smarthost -c CONFIG serve` with the fault hook in both of its processes
    (the relay and its delivery process); a kill (ours or the hook's) takes both, as a
    crash would.

    Rules live in a file the hook re-reads when it changes: `arm()` them once the relay
    has started (start-up itself renames and fsyncs), `disarm()` to heal the disk.
    """

    def __init__(self, config_path: Path, work: Path) -> None:
        super().__init__(config_path, work / "relay.log")
        self.rules_path = work / "faults.json"
        self.fault_log = work / "faults.log"
        write_rules(self.rules_path, [])
        self.env = fault_env(str(self.rules_path), self.fault_log)

    def spawn(self) -> int:
        offset = super().spawn()
        assert self.proc is not None
        self.family = {self.proc.pid}  # the relay and the delivery processes seen
        return offset

    def start(self, timeout: float = DEADLINE) -> FaultyRelay:
        started = self.wait_started(self.spawn(), timeout)
        assert self.proc is not None
        self.delivery_pid = started["delivery_pid"]
        assert self.delivery_pid, started
        self.family.add(self.delivery_pid)
        for pid, role in ((self.proc.pid, "relay"), (self.delivery_pid, "delivery")):
            assert self.installed(pid) == role, f"the fault hook did not run in the {role} process"
        return self

    def installed(self, pid: int) -> str | None:
        """The role the hook found itself in, in process `pid` (None: not installed)."""
        for r in read_fault_log(self.fault_log):
            if r.get("event") == "installed" and r["pid"] == pid:
                return r["role"]
        return None

    def kill(self) -> None:
        """kill -9 of the whole relay (both processes); returns when both are gone."""
        assert self.proc is not None
        children = delivery_children(self.proc.pid)
        self.family.update(children)
        if self.proc.poll() is None:
            self.proc.kill()
        for pid in children:  # it would follow by PR_SET_PDEATHSIG: a moment later
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        self.proc.wait()
        self.wait_gone()

    def wait_gone(self, timeout: float = DEADLINE) -> None:
        """Until no process of the relay is left, not even a zombie: its delivery
        process, orphaned, is reaped here (see `subreaper`), else by init."""
        assert self.proc is not None

        def gone() -> bool:
            self.family.update(delivery_children(self.proc.pid))
            self.family.update(delivery_children(os.getpid()))  # orphans, reparented
            left = [pid for pid in self.family if _stat_fields(str(pid)) is not None]
            for pid in left:
                with contextlib.suppress(ChildProcessError):  # not (yet) ours to reap
                    os.waitpid(pid, os.WNOHANG)
            self.family = set(left)
            return not left

        wait_until(gone, timeout, "the relay's processes to end")

    def start_and_die(self, timeout: float = DEADLINE) -> int:
        """Start a relay expected to be killed by a rule before it is up; its exit code."""
        self.spawn()
        assert self.proc is not None
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            pytest.fail("the relay survived the fault that should have killed it")

    def arm(self, *rules: dict[str, Any]) -> None:
        self._mark = len(self.fired())
        write_rules(self.rules_path, rules)

    def struck(self) -> list[dict]:
        """The faults fired in this process since the last `arm()`."""
        return self.fired()[getattr(self, "_mark", 0) :]

    def disarm(self) -> None:
        write_rules(self.rules_path, [])

    def fired(self, pid: int | None = None) -> list[dict]:
        """Faults fired in the relay `pid` (default: the last one started) or in one of
        its delivery processes."""
        pid = pid if pid is not None else (self.proc.pid if self.proc else None)
        return [
            r
            for r in read_fault_log(self.fault_log)
            if "rule" in r and pid in (r["pid"], r.get("ppid"))
        ]

    def wait_killed(self, timeout: float = DEADLINE) -> None:
        """The hook's SIGKILL: the process must end by signal 9."""
        assert self.proc is not None
        try:
            code = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            pytest.fail(f"no fault fired in {timeout}s; fired: {self.fired()}")
        assert code == -signal.SIGKILL, f"relay exited with {code}, not by the fault's SIGKILL"
        self.wait_gone()

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None


def queue_command(
    config: Path, work: Path, *args: str, rules: list[dict] | None = None, timeout: float = 60
) -> subprocess.Popen:
    """`smarthost -c CONFIG queue ARGS` (with the fault hook when `rules` are given)."""
    fault_log = work / "faults.log"
    return subprocess.Popen(
        [sys.executable, "-m", "smarthost", "-c", str(config), "queue", *args],
        cwd=ROOT,
        env=fault_env(json.dumps(rules or []), fault_log),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


# -- an upstream that holds its reply to DATA --------------------------------------------


class HoldingHandler(SinkHandler):
    """While `holding`, the reply to DATA waits (the message sent, the reply not) until
    `release`: the relay is killed meanwhile, which drops the connection.

    With `accept_held` the upstream has already kept the message (its 250 is what the
    crash loses), else it keeps nothing and would have answered 451.
    """

    def __init__(self) -> None:
        super().__init__()
        self.holding = False
        self.accept_held = True
        self.held = 0
        self.release = threading.Event()

    async def handle_DATA(self, server, session, envelope):
        if not self.holding:
            return await super().handle_DATA(server, session, envelope)
        if self.accept_held:
            reply = await super().handle_DATA(server, session, envelope)
        else:
            reply = "451 4.3.0 not kept"
        with self.cond:
            self.held += 1
            self.cond.notify_all()
        while not self.release.is_set():  # cancelled when the relay's connection drops
            await asyncio.sleep(0.01)
        return reply

    def wait_held(self, count: int, timeout: float = DEADLINE) -> None:
        with self.cond:
            ok = self.cond.wait_for(lambda: self.held >= count, timeout)
        if not ok:
            pytest.fail(f"the upstream holds {self.held} DATA commands, expected {count}")


def holding_sink() -> Sink:
    sink = Sink()
    sink.handler = HoldingHandler()
    return sink.start()


# -- messages ---------------------------------------------------------------------------


def body(message_id: str, lines: int = 20) -> bytes:
    """A body that shows at once whether it arrived whole: numbered lines, an end mark."""
    text = "".join(f"line {n:05d} of {message_id} {'x' * 40}\r\n" for n in range(lines))
    return f"{text}END OF {message_id}\r\n".encode()


# Large mail: past spool.IN_MEMORY (256 KiB), so it is written into a Draft in tmp/ as it
# arrives, committed in two files (msg/ID, and its envelope renamed into queue/ID), and
# streamed to the upstream from its file.
LARGE_SIZES = (300 * 1024, 2 * 1024 * 1024)


def lines_for_size(message_id: str, size: int) -> int:
    """The body lines that make `message(message_id, lines)` about `size` bytes."""
    line = len(body(message_id, 1)) - len(body(message_id, 0))
    return max(1, size // line)


def message(message_id: str, lines: int = 20) -> bytes:
    return header(message_id, "torture") + body(message_id, lines)


@dataclass
class Reply:
    code: int | None  # None: the connection broke before a reply to DATA
    text: str
    queue_id: str | None = None

    @property
    def ok(self) -> bool:
        return self.code == 250


def try_send(
    port: int, message_id: str, lines: int = 20, rcpt: str = RCPT, timeout: float = 30
) -> Reply:
    """One message; the reply to DATA, or what broke. Never raises for relay trouble."""
    try:
        with smtplib.SMTP("127.0.0.1", port, timeout=timeout) as client:
            client.ehlo("client.test")
            for code, text in (client.mail(SENDER), client.rcpt(rcpt)):
                if code != 250:
                    return Reply(code, text.decode(errors="replace"))
            code, text = client.data(message(message_id, lines))
    except (OSError, smtplib.SMTPException) as exc:
        return Reply(None, f"{type(exc).__name__}: {exc}")
    reply = text.decode(errors="replace")
    match = QUEUED.match(reply)
    return Reply(code, reply, match.group(1) if match and code == 250 else None)


# -- counting what arrived ---------------------------------------------------------------


@dataclass
class Ledger:
    """What was acknowledged, and what the upstream has of it."""

    acked: dict[str, str] = field(default_factory=dict)  # Message-ID -> queue ID
    lines: dict[str, int] = field(default_factory=dict)  # Message-ID -> body lines
    must_bounce: set[str] = field(default_factory=set)  # acked, recipient refused for good
    in_flight: int = 0

    def ack(self, message_id: str, reply: Reply, lines: int = 20) -> None:
        assert reply.ok and reply.queue_id, reply
        self.acked[message_id] = reply.queue_id
        self.lines[message_id] = lines

    def copies(self, sink: Sink) -> collections.Counter[str | None]:
        """Copies of each original message the upstream received (DSNs excluded)."""
        return collections.Counter(
            header_message_id(m.content) for m in list(sink.messages) if m.mail_from
        )

    def dsns(self, sink: Sink) -> collections.Counter[str]:
        """DSNs received, by the Message-ID of the message each reports on."""
        found: collections.Counter[str] = collections.Counter()
        for m in list(sink.messages):
            if m.mail_from:
                continue
            for message_id in self.acked:
                if message_id.encode() in m.content:
                    found[message_id] += 1
        return found

    def settled(self, sink: Sink) -> bool:
        copies, dsns = self.copies(sink), self.dsns(sink)
        return all(
            (dsns[mid] if mid in self.must_bounce else copies[mid]) >= 1 for mid in self.acked
        )

    def wait_settled(self, sink: Sink, spool: Path, timeout: float = DEADLINE) -> None:
        deadline = time.monotonic() + timeout
        while not self.settled(sink):
            if time.monotonic() > deadline:
                copies, dsns = self.copies(sink), self.dsns(sink)
                missing = [
                    mid
                    for mid in self.acked
                    if not (dsns[mid] if mid in self.must_bounce else copies[mid])
                ]
                pytest.fail(
                    f"{len(missing)} acknowledged messages neither delivered nor bounced: "
                    f"{missing[:10]}; spool: {spool_files(spool)}"
                )
            time.sleep(0.02)

    def counts(self, sink: Sink) -> dict[str, int]:
        copies, dsns = self.copies(sink), self.dsns(sink)
        delivered = sum(1 for mid in self.acked if copies[mid])
        bounced = sum(1 for mid in self.acked if not copies[mid] and dsns[mid])
        duplicated = sum(n - 1 for n in copies.values() if n > 1) + sum(
            n - 1 for n in dsns.values() if n > 1
        )
        return {
            "acknowledged": len(self.acked),
            "delivered": delivered,
            "bounced": bounced,
            "lost": len(self.acked) - delivered - bounced,
            "duplicated": duplicated,
            "in_flight": self.in_flight,
        }

    def assert_safe(self, sink: Sink, counts: dict[str, int], *context: object) -> None:
        """The promise, from one scenario's counts: every copy whole, nothing lost, and
        no more extra copies than messages were in flight at the faults."""
        self.assert_whole(sink)
        assert counts["lost"] == 0, context
        assert counts["duplicated"] <= counts["in_flight"], (
            *context,
            self.copies(sink).most_common(5),
        )

    def assert_whole(self, sink: Sink) -> None:
        """Nothing half-written went out: every copy of a message carries its whole body."""
        for m in list(sink.messages):
            if not m.mail_from:
                continue
            mid = header_message_id(m.content)
            assert mid is not None, m.content[:300]
            expected = body(mid, self.lines.get(mid, 20))
            got = m.content.split(b"\r\n\r\n", 1)[1]
            assert got == expected, f"{mid} arrived damaged: {len(got)} of {len(expected)} bytes"


# -- the spool at rest -------------------------------------------------------------------


def assert_spool_sane(spool: Path, leftover_content: Iterable[str] | None = ()) -> None:
    """At rest after a restart: no dead write in tmp/, every envelope readable and with
    its content, no content without an envelope, and in corrupt/ only the content of
    the messages named in `leftover_content` (what a crash between two unlinks or two
    renames may leave; an envelope never goes there). `None`: any message's content,
    when kills at random moments make the IDs unknowable (a client never told 250)."""
    files = spool_files(spool)
    assert files["tmp"] == [], files
    envelopes = set()
    for state in ENVELOPE_STATES:
        for name in files[state]:
            env = Envelope.from_bytes((spool / state / name).read_bytes())
            assert env.id == name
            assert name in files["msg"], f"{state}/{name} has no content"
            envelopes.add(name)
    assert set(files["msg"]) <= envelopes, f"content without envelope: {files}"
    if leftover_content is None:
        unexpected = [name for name in files["corrupt"] if not name.endswith(".message")]
    else:
        allowed = {f"{qid}.message" for qid in leftover_content}
        unexpected = [name for name in files["corrupt"] if name not in allowed]
    assert not unexpected, f"corrupt/ holds {unexpected}; spool: {files}"


def problems(records: list[dict]) -> list[dict]:
    """Error-level records and lines that are not JSON (a traceback on stderr)."""
    return [
        r for r in records if r.get("level") in ("error", "critical") or r["event"] == "<not json>"
    ]
