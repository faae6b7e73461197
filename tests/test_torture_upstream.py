"""Torture: upstream faults (issue #8). The real relay process against upstreams that
refuse, hang, drop, lie and flap, on real loopback sockets.

Each fault runs against a scriptable fake upstream (`FakeUpstream`: a thread with a
listening socket; its `mode` decides what every new connection gets). When it behaves
("good"), the fake is a minimal SMTP server that hands each message to the real aiosmtpd
`Sink` and answers with the sink's reply, so every copy that "reached the upstream" is
counted in one place. In the hang-after-dot and drop-after-dot modes the fake also hands
the message on before withholding its reply: the upstream took it without the relay
seeing the answer, so a second copy is allowed (at-least-once, SPEC §1.1) and counted as
in flight.

What every scenario checks: the timeouts fire, the relay logs `deferred` with the reason
and `backend_down`/`backend_up` (SPEC §8), no acknowledged message is lost or delivered
in a loop, duplicates never exceed what was in flight, and once the upstream is good
everything is delivered and the spool drains.
"""

from __future__ import annotations

import collections
import contextlib
import re
import smtplib
import socket
import threading
import time
from pathlib import Path

import pytest

from smarthost.config import load_config

from support.configs import edit_config, write_config
from support.logs import events_named
from support.messages import SENDER, header_message_id
from support.messages import message as counted_message
from support.relay import RelayProcess
from support.sink import Sink
from support.smtp import free_port, transaction
from support.spool import spool_drained, spool_files
from support.torture import arrival_counts
from support.waiting import wait_until

DEADLINE = 60.0  # generous: two busy cores


# -- the scriptable upstream ----------------------------------------------------------


class FakeUpstream:
    """An SMTP upstream on a real socket whose behaviour per connection is `mode`:

    - ``good``: a minimal SMTP server; each message goes on to the real `Sink`;
    - ``refuse``: nothing listens on the port (set it with `refuse()`);
    - ``hang_greeting``: accepts and never says a word;
    - ``hang_data``: answers up to DATA's 354, then reads the message and never replies;
    - ``hang_dot``: takes the message (hands it to the sink), then never replies;
    - ``drop_dot``: takes the message (hands it to the sink), then closes without a reply;
    - ``garbage_greeting``: binary junk instead of a greeting;
    - ``long_line``: answers MAIL with one 1 MB line;
    - ``data_250``: answers DATA with 250 instead of 354 (a wrong code);
    - ``dot_garbage``: answers the final dot with a line that is no SMTP reply.
    """

    def __init__(self, sink_port: int, mode: str = "good") -> None:
        self.sink_port = sink_port
        self.mode = mode
        self.port = 0
        self.swallowed: list[str | None] = []  # Message-IDs taken with the reply withheld
        self.connections: collections.Counter[str] = collections.Counter()
        self._lock = threading.Lock()
        self._listener: socket.socket | None = None
        self._conns: list[socket.socket] = []
        self._threads: list[threading.Thread] = []
        self._closed = threading.Event()

    # -- listening -----------------------------------------------------------

    def listen(self) -> FakeUpstream:
        """Listen (again) on the same port; the first call picks a free one."""
        sock = socket.create_server(("127.0.0.1", self.port))
        sock.settimeout(0.05)
        self.port = sock.getsockname()[1]
        self._listener = sock
        self._spawn(self._accept_loop, sock, name=f"fake-upstream-{self.port}")
        return self

    def refuse(self) -> None:
        """Stop listening: connections to the port are refused."""
        self.mode = "refuse"
        sock, self._listener = self._listener, None
        if sock is not None:
            sock.close()

    def set_mode(self, mode: str) -> None:
        """Behave as `mode` from now on. Turning bad is a restart of the upstream: the
        sessions the relay keeps open (it reuses them) are cut too."""
        if mode != "good":
            self.drop_connections()
        if mode == "refuse":
            self.refuse()
            return
        self.mode = mode
        if self._listener is None:
            self.listen()

    def drop_connections(self) -> None:
        with self._lock:
            conns, self._conns = self._conns, []
        for conn in conns:
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)
            conn.close()

    def close(self) -> None:
        self._closed.set()
        self.refuse()
        self.drop_connections()
        for thread in self._threads:
            thread.join(10)

    def _spawn(self, target, *args, name: str) -> None:
        thread = threading.Thread(target=target, args=args, name=name, daemon=True)
        with self._lock:
            self._threads = [t for t in self._threads if t.is_alive()] + [thread]
        thread.start()

    def _accept_loop(self, sock: socket.socket) -> None:
        while not self._closed.is_set() and self._listener is sock:
            try:
                conn, _ = sock.accept()
            except TimeoutError:
                continue
            except OSError:
                return  # closed: refusing now
            conn.settimeout(None)
            mode = self.mode
            with self._lock:
                self._conns.append(conn)
                self.connections[mode] += 1
            self._spawn(self._serve, conn, mode, name=f"fake-upstream-{mode}")

    # -- one connection ------------------------------------------------------

    def _serve(self, conn: socket.socket, mode: str) -> None:
        try:
            with conn, conn.makefile("rb") as reader:
                self._dialogue(conn, reader, mode)
        except OSError:
            pass  # the relay gave up on us: that is the point

    def _dialogue(self, conn: socket.socket, reader, mode: str) -> None:
        if mode == "hang_greeting":
            return _drain(reader)
        if mode == "garbage_greeting":
            conn.sendall(b"\x00\xff\xfeHTTP/1.1 400 Bad Request\r\n\x80\x81 junk\r\n")
            return _drain(reader)
        conn.sendall(b"220 fake.test ESMTP\r\n")
        sender, rcpts = "", []
        while True:
            line = reader.readline(100_000)
            if not line:
                return
            verb = line[:4].upper()
            if verb in (b"EHLO", b"HELO"):
                conn.sendall(b"250 fake.test\r\n")
            elif verb == b"MAIL":
                if mode == "long_line":
                    conn.sendall(b"250 " + b"x" * (1 << 20) + b"\r\n")
                    return _drain(reader)
                sender, rcpts = _address(line), []
                conn.sendall(b"250 2.1.0 ok\r\n")
            elif verb == b"RCPT":
                rcpts.append(_address(line))
                conn.sendall(b"250 2.1.5 ok\r\n")
            elif verb == b"DATA":
                if mode == "data_250":
                    conn.sendall(b"250 2.0.0 ok\r\n")  # a wrong code: 354 was due
                    continue
                conn.sendall(b"354 go ahead\r\n")
                content = _read_data(reader)
                if mode == "hang_data":
                    return _drain(reader)
                code, reply = self._hand_on(sender, rcpts, content)
                if mode in ("hang_dot", "drop_dot"):
                    with self._lock:
                        self.swallowed.append(header_message_id(content))
                    return _drain(reader) if mode == "hang_dot" else None
                if mode == "dot_garbage":
                    conn.sendall(b"thank you, message received\r\n")
                    continue
                conn.sendall(f"{code} {reply}\r\n".encode())
            elif verb in (b"RSET", b"NOOP"):
                conn.sendall(b"250 2.0.0 ok\r\n")
            elif verb == b"QUIT":
                conn.sendall(b"221 2.0.0 bye\r\n")
                return
            else:
                conn.sendall(b"502 5.5.2 unknown command\r\n")

    def _hand_on(self, sender: str, rcpts: list[str], content: bytes) -> tuple[int, str]:
        """Give the message to the real upstream, as a relay of our own would."""
        with smtplib.SMTP("127.0.0.1", self.sink_port, timeout=30) as smtp:
            smtp.sendmail(sender, rcpts, content)
        return 250, "2.0.0 ok: stored"


def _drain(reader) -> None:
    """Read (and ignore) until the relay closes the connection."""
    while reader.read1(65536):
        pass


def _address(line: bytes) -> str:
    match = re.search(rb"<([^>]*)>", line)
    return match.group(1).decode() if match else ""


def _read_data(reader) -> bytes:
    lines = []
    while True:
        line = reader.readline(1 << 20)
        if not line or line == b".\r\n":
            return b"".join(lines)
        lines.append(line[1:] if line.startswith(b".") else line)


# -- helpers ------------------------------------------------------------------------


def message(message_id: str, rcpt: str, size: int = 0) -> bytes:
    return counted_message(message_id, "upstream torture", rcpt) + (b"z" * 76 + b"\r\n") * (
        size // 78
    )


def send_batch(port: int, items: list[tuple[str, str, int]]) -> dict[str, str]:
    """Send (message_id, recipient, size) items in one session; Message-ID → queue ID."""
    with smtplib.SMTP("127.0.0.1", port, timeout=30) as client:
        client.ehlo("client.test")
        return {
            message_id: transaction(client, SENDER, [rcpt], message(message_id, rcpt, size))
            for message_id, rcpt, size in items
        }


def copies(sinks: list[Sink]) -> collections.Counter[str | None]:
    """How many copies of each Message-ID the upstream(s) received."""
    return collections.Counter(
        header_message_id(m.content) for sink in sinks for m in list(sink.messages)
    )


def domain(mode: str) -> str:
    return mode.replace("_", "-") + ".test"


def fault_config(tmp_path: Path, sink_port: int, fakes: dict[str, FakeUpstream]) -> Path:
    """One backend and group per fake (routed by recipient domain), short timeouts."""
    extra = "".join(
        f"""
[[backend]]
name = "{mode}"
host = "127.0.0.1"
port = {fake.port}
tls = "none"
fail_timeout = "1s"
group = "{mode}"

[[route]]
recipient_domain = ["{domain(mode)}"]
group = "{mode}"
"""
        for mode, fake in fakes.items()
    )
    config = write_config(tmp_path, sink_port, extra)
    edit_config(config, "workers = 4", "workers = 16")
    edit_config(config, 'connect_timeout = "3s"', 'connect_timeout = "1s"')
    edit_config(config, 'timeout = "5s"', 'timeout = "2s"')
    return config


def deferred_ids(records: list[dict]) -> set[str]:
    return {r["queue_id"] for r in events_named(records, "deferred")}


def no_trouble_in_the_log(records: list[dict]) -> None:
    """Faults upstream are warnings at most: no error, no traceback, no non-JSON line."""
    bad = [r for r in records if r.get("level") in ("error", "critical")]
    bad += [r for r in records if r.get("event") == "<not json>"]
    assert not bad, bad[:5]


# -- 1. each fault, in parallel groups, then a good upstream ---------------------------

# The fault modes, with what the relay must say about each in its `deferred` line.
FAULTS = {
    "refuse": "refused",
    "hang_greeting": "timed out",
    "hang_data": "timed out",
    "hang_dot": "timed out",
    "drop_dot": "connection lost",
    "garbage_greeting": "-1 ",  # no reply code: smtplib's -1, and the junk itself
    "long_line": "Line too long",
}


def test_upstream_faults_time_out_defer_and_deliver_once_good(
    tmp_path, sink, relay_process, torture_size, torture_report
):
    """Every fault of the brief at once (one backend and group per fault, routed by
    recipient domain), for several rounds: each message is deferred with the reason,
    never delivered while its upstream misbehaves (except a copy the upstream took while
    withholding its reply), and delivered once the upstream is good."""
    rounds = torture_size(1, 4)
    per_fault = torture_size(2, 12)
    fakes = {mode: FakeUpstream(sink.port).listen() for mode in FAULTS}
    proc: RelayProcess | None = None
    try:
        proc = relay_process(fault_config(tmp_path, sink.port, fakes))
        for mode, fake in fakes.items():
            fake.set_mode(mode)
        proc.start()
        assert proc.port is not None
        acked: dict[str, str] = {}
        modes_of: dict[str, str] = {}
        for round_no in range(rounds):
            offset = proc.log_path.stat().st_size
            for mode, fake in fakes.items():
                fake.set_mode(mode)
            batch: dict[str, str] = {}
            for mode in FAULTS:
                items = [
                    (f"<r{round_no}.{mode}.{i}@client.test>", f"rcpt{i}@{domain(mode)}", 0)
                    for i in range(per_fault)
                ]
                items[0] = (items[0][0], items[0][1], 300_000)  # one that spans many reads
                sent = send_batch(proc.port, items)
                batch.update(sent)
                modes_of.update(dict.fromkeys(sent.values(), mode))
            acked.update(batch)

            # Every message is tried and deferred; the timeouts fire (else no deferral).
            wait_until(
                lambda batch=batch, offset=offset: (
                    set(batch.values()) <= deferred_ids(proc.records(offset))
                ),
                DEADLINE,
                "a deferral of every message while the upstreams misbehave",
            )
            records = proc.records(offset)
            delivered_now = {r["queue_id"] for r in events_named(records, "delivered")}
            assert not delivered_now & set(batch.values()), "delivered by a faulty upstream"

            def unexplained(offset: int = offset) -> list[str]:
                """Faults whose reason is in no `deferred` or `backend_down` line yet (a
                deferral may only say "reused sessions lost" when an upstream restarted
                into its fault; the probe that follows says what is wrong)."""
                records = proc.records(offset)
                missing = []
                for mode, reason in FAULTS.items():
                    said = [
                        " ".join(r.get("backend_errors") or [])
                        for r in events_named(records, "deferred")
                        if modes_of[r["queue_id"]] == mode
                    ] + [
                        r.get("reply") or ""
                        for r in events_named(records, "backend_down")
                        if r["backend"] == mode
                    ]
                    if not any(reason in text for text in said):
                        missing.append(f"{mode}: {said[:3]}")
                return missing

            wait_until(lambda: not unexplained(), DEADLINE, "the reason of every fault logged")
            down = {r["backend"] for r in events_named(proc.records(offset), "backend_down")}
            assert set(FAULTS) <= down, down

            # The upstreams are good again: everything goes, once.
            for fake in fakes.values():
                fake.set_mode("good")
            wait_until(
                lambda: set(acked) <= set(copies([sink])),
                DEADLINE,
                "every acknowledged message at the upstream",
            )
            wait_until(lambda: spool_drained(tmp_path / "spool"), DEADLINE, "an empty spool")
            records = proc.records(offset)
            up = {r["backend"] for r in events_named(records, "backend_up")}
            assert set(FAULTS) <= up, up
        assert proc.stop() == 0
    finally:
        for fake in fakes.values():
            fake.close()

    records = proc.records()
    no_trouble_in_the_log(records)
    got = copies([sink])
    swallowed = collections.Counter(m for fake in fakes.values() for m in fake.swallowed)
    for message_id, n in got.items():
        # One copy, plus at most one per attempt the upstream took without answering.
        assert n <= 1 + swallowed[message_id], (message_id, n, swallowed[message_id])
    delivered = collections.Counter(
        r["queue_id"] for r in events_named(records, "delivered") if r["queue_id"] in modes_of
    )
    assert set(delivered.values()) == {1}, delivered.most_common(3)  # no loop
    assert set(delivered) == set(acked.values())
    files = spool_files(tmp_path / "spool")
    assert files["corrupt"] == files["failed"] == [], files
    counts = arrival_counts(acked, got)
    in_flight = sum(swallowed.values())
    torture_report(
        "upstream: refuse/hang/drop/garbage",
        rounds=rounds,
        in_flight=in_flight,
        note=f"{len(FAULTS)} faults in parallel; in_flight = attempts taken without a reply",
        **counts,
    )
    assert counts["lost"] == 0
    assert counts["duplicated"] <= in_flight


# -- 2. wrong codes: a reply that is no SMTP reply, or the wrong one -------------------


@pytest.mark.parametrize(
    "mode",
    [
        "data_250",
        "dot_garbage",
    ],
)
def test_wrong_reply_codes_defer_the_message(
    tmp_path, sink, relay_factory, events, mode, torture_report
):
    """An upstream that answers DATA with 250 (354 was due) never got the message; one
    that answers the final dot with a line that is no reply said neither yes nor no.
    Neither is a delivery nor a permanent failure: the message is deferred, and goes
    out once the upstream is good. (In-process: the sender's code is the same.)"""
    fake = FakeUpstream(sink.port).listen()
    try:
        fake.set_mode(mode)
        relay = relay_factory(load_config(fault_config(tmp_path, sink.port, {mode: fake})))
        message_id = f"<{mode}@client.test>"
        acked = send_batch(relay.port, [(message_id, f"rcpt@{domain(mode)}", 0)])
        queue_id = acked[message_id]
        outcome = wait_until(
            lambda: [
                r
                for r in list(events.records)
                if r.get("queue_id") == queue_id and r["event"] in OUTCOMES
            ],
            DEADLINE,
            "the first attempt's outcome",
        )
        first = outcome[0]["event"]
        if first == "deferred":
            fake.set_mode("good")
            wait_until(lambda: message_id in copies([sink]), DEADLINE, "the delivery")
        relay.stop()
    finally:
        fake.close()
    got = copies([sink])
    swallowed = len(fake.swallowed) + (1 if mode == "dot_garbage" else 0)
    lost = 0 if message_id in got else 1
    torture_report(
        f"upstream: wrong code ({mode})",
        rounds=1,
        acknowledged=1,
        delivered=1 - lost,
        bounced=int(first == "failed"),
        lost=lost,
        duplicated=max(0, got[message_id] - 1),
        in_flight=swallowed,
        note=f"first outcome: {first}",
    )
    assert first == "deferred", outcome[0]["event"]
    assert lost == 0


OUTCOMES = ("delivered", "deferred", "failed")


# -- 3. a flapping upstream ----------------------------------------------------------


class Sender(threading.Thread):
    """Sends messages, one per session, until told to stop; records what got 250."""

    def __init__(self, port: int) -> None:
        super().__init__(name="flap-sender", daemon=True)
        self.port = port
        self.acked: dict[str, str] = {}
        self.problems: list[str] = []
        self.halt = threading.Event()

    def run(self) -> None:
        n = 0
        while not self.halt.is_set():
            message_id = f"<flap.{n}@client.test>"
            n += 1
            try:
                self.acked.update(send_batch(self.port, [(message_id, "rcpt@dest.test", 0)]))
            except (OSError, smtplib.SMTPException, AssertionError) as exc:
                self.problems.append(f"{message_id}: {exc!r}")
                return
            self.halt.wait(0.02)  # pace: a steady stream, not a flood


# aiosmtpd's Controller.stop drops live sessions and leaves their transports to the
# garbage collector: that is the outage we want, and its ResourceWarning is expected.
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_flapping_upstream_loses_nothing(tmp_path, relay_process, torture_size, torture_report):
    """The real aiosmtpd upstream goes up and down on a fixed port every second or so
    while mail streams in: everything acknowledged arrives, duplicates only for attempts
    the outage cut off mid-session, and the relay reports the backend down and up."""
    flaps = torture_size(2, 12)
    up_for, down_for = (0.8, 0.8) if flaps <= 2 else (1.5, 1.5)
    port = free_port()
    config = write_config(tmp_path, port)
    edit_config(config, 'connect_timeout = "3s"', 'connect_timeout = "1s"')
    edit_config(config, 'timeout = "5s"', 'timeout = "2s"')
    proc = relay_process(config).start()
    assert proc.port is not None
    sinks: list[Sink] = []
    sender = Sender(proc.port)
    sender.start()
    try:
        for _ in range(flaps):
            sinks.append(Sink(port).start())
            time.sleep(up_for)  # pacing the fault, not waiting for an outcome
            sinks[-1].stop()
            time.sleep(down_for)
        sender.halt.set()
        sender.join(30)
        assert not sender.is_alive()
        assert not sender.problems, sender.problems
        sinks.append(Sink(port).start())
        acked = dict(sender.acked)
        wait_until(
            lambda: set(acked) <= set(copies(sinks)),
            DEADLINE,
            "every acknowledged message at the upstream after the flapping",
        )
        wait_until(lambda: spool_drained(tmp_path / "spool"), DEADLINE, "an empty spool")
        assert proc.stop() == 0
    finally:
        sender.halt.set()
        for s in sinks:
            s.stop()

    records = proc.records()
    no_trouble_in_the_log(records)
    assert events_named(records, "backend_down") and events_named(records, "backend_up")
    assert events_named(records, "deferred"), "no attempt met the upstream down"
    got = copies(sinks)
    # An attempt the outage cut off mid-session (not a refused connection) may have
    # left a copy upstream: those bound the duplicates.
    in_flight = sum(
        1
        for r in events_named(records, "deferred")
        for error in r.get("backend_errors") or []
        if "refused" not in error
    )
    counts = arrival_counts(acked, got)
    torture_report(
        "upstream: flapping",
        rounds=flaps,
        in_flight=in_flight,
        note=f"up {up_for}s / down {down_for}s; in_flight = attempts cut mid-session",
        **counts,
    )
    assert len(acked) >= 10 * flaps, len(acked)
    assert counts["lost"] == 0
    assert counts["duplicated"] <= in_flight
