"""End to end on loopback: a real smtplib client → the relay in-process → a real upstream."""

from __future__ import annotations

import asyncio
import socket
import threading
import time
from pathlib import Path

import pytest
from aiosmtpd.smtp import SMTP

from smarthost.config import load_config
from smarthost.spool import DEFERRED, DELIVERED, FAILED_RCPT, QUEUE

from support.configs import write_config
from support.sink import Sink, SinkHandler
from support.spool import spool_files
from support.waiting import wait_until

BODY = (
    b"From: a@client.test\r\nTo: b@dest.test\r\nSubject: bytes\r\n"
    b"Message-ID: <fixed@client.test>\r\nDate: Wed, 25 Nov 2026 10:00:00 +0000\r\n\r\n"
    b"line one\r\n.leading dot\r\n\xc3\xa9 eight-bit\r\ntrailing spaces   \r\n"
)


def spool_empty(relay) -> bool:
    files = spool_files(Path(relay.relay.spool.root))
    return not any(files[d] for d in ("msg", "queue", "active", "tmp"))


@pytest.fixture(params=["pipelined", "lock-step"])
def upstream_mode(request, sink) -> str:
    """The upstream offers PIPELINING (the commands go in one write) or does not."""
    sink.handler.pipelining = request.param == "pipelined"
    return request.param


def test_message_goes_through_with_body_bytes_intact(relay, sink, events, upstream_mode):
    queue_id = relay.send("a@client.test", ["b@dest.test"], BODY)
    (msg,) = sink.wait_for(1)
    assert msg.mail_from == "a@client.test"
    assert msg.rcpt_tos == ["b@dest.test"]
    # Exactly one Received header is prepended; every byte of the original follows.
    head, tail = msg.content.split(BODY)
    assert tail == b""
    assert head.startswith(b"Received: from client.test ([127.0.0.1])")
    assert head.count(b"\r\n") == 3 and queue_id.encode() in head
    wait_until(lambda: events.events("delivered", queue_id=queue_id), what="delivered event")
    received = events.events("received", queue_id=queue_id)[0]
    assert received["sender"] == "a@client.test"
    assert received["message_id"] == "<fixed@client.test>"
    delivered = events.events("delivered", queue_id=queue_id)[0]
    assert delivered["backend"] == "sink" and delivered["recipients"] == ["b@dest.test"]
    wait_until(lambda: spool_empty(relay), what="the spool to empty")


def test_many_messages_many_sessions(relay, sink):
    ids = {relay.send("a@client.test", [f"r{i}@dest.test"], BODY) for i in range(20)}
    assert len(ids) == 20
    got = sink.wait_for(20)
    assert sorted(m.rcpt_tos[0] for m in got) == sorted(f"r{i}@dest.test" for i in range(20))
    wait_until(lambda: spool_empty(relay), what="the spool to empty")


def test_per_recipient_state_only_unfinished_are_retried(relay, sink, events, upstream_mode):
    sink.handler.rcpt_replies["later@dest.test"] = "451 4.2.0 try later"
    sink.handler.rcpt_replies["gone@dest.test"] = "550 5.1.1 no such user"
    queue_id = relay.send(
        "a@client.test", ["ok@dest.test", "later@dest.test", "gone@dest.test"], BODY
    )
    (first,) = sink.wait_for(1)
    assert first.rcpt_tos == ["ok@dest.test"]
    deferred = wait_until(lambda: events.events("deferred", queue_id=queue_id), what="deferral")
    assert deferred[0]["recipients"] == ["later@dest.test"]
    assert deferred[0]["status"] == "4.2.0"
    failed = events.events("failed", queue_id=queue_id)
    assert [f["recipient"] for f in failed] == ["gone@dest.test"]
    assert failed[0]["reply"] == "550 5.1.1 no such user"
    env = relay.relay.spool.read_envelope(QUEUE, queue_id)
    states = {r.address: r.state for r in env.recipients}
    assert states == {
        "ok@dest.test": DELIVERED,
        "later@dest.test": DEFERRED,
        "gone@dest.test": FAILED_RCPT,
    }
    # The failure is reported at once, to the sender, from the null sender.
    dsn = wait_until(lambda: [m for m in sink.messages if m.mail_from == ""], what="the DSN")
    assert dsn[0].rcpt_tos == ["a@client.test"]
    assert b"Final-Recipient: rfc822; gone@dest.test" in dsn[0].content
    assert b"later@dest.test" not in dsn[0].content.split(b"\r\n\r\n", 1)[1].split(b"--")[0]
    # The retry (retry_min = 1s) carries only the deferred recipient.
    del sink.handler.rcpt_replies["later@dest.test"]
    retried = wait_until(
        lambda: [m for m in sink.messages if m.rcpt_tos == ["later@dest.test"]], what="retry"
    )
    assert retried[0].mail_from == "a@client.test"
    # Every recipient has its outcome: the message leaves the spool.
    wait_until(lambda: relay.relay.spool.locate(queue_id) is None, what="the spool to empty")
    assert len(events.events("dsn_queued", queue_id=queue_id)) == 1


def test_data_5xx_fails_every_recipient_with_one_dsn(relay, sink, events, upstream_mode):
    sink.handler.data_reply = "554 5.6.0 content rejected"
    queue_id = relay.send("a@client.test", ["x@dest.test", "y@dest.test"], BODY)
    wait_until(lambda: len(events.events("failed", queue_id=queue_id)) == 2, what="failures")
    (queued,) = wait_until(lambda: events.events("dsn_queued", queue_id=queue_id), what="DSN")
    assert queued["recipients"] == ["x@dest.test", "y@dest.test"]
    wait_until(lambda: relay.relay.spool.locate(queue_id) is None, what="the spool to empty")
    # The DSN itself is refused by the same upstream: a double bounce, kept and logged.
    dsn_id = queued["dsn_queue_id"]
    wait_until(lambda: events.events("double_bounce", queue_id=dsn_id), what="double bounce")
    wait_until(lambda: relay.relay.spool.locate(dsn_id) == "failed", what="kept in failed/")
    assert sink.messages == []


def test_mail_4xx_defers_the_message(relay, sink, events, upstream_mode):
    sink.handler.mail_reply = "452 4.3.1 mailbox full for now"
    queue_id = relay.send("a@client.test", ["x@dest.test"], BODY)
    deferred = wait_until(lambda: events.events("deferred", queue_id=queue_id), what="deferral")
    assert deferred[0]["reply"] == "452 4.3.1 mailbox full for now"
    assert deferred[0]["next_attempt"].endswith("+00:00")
    sink.handler.mail_reply = None
    assert sink.wait_for(1)[0].rcpt_tos == ["x@dest.test"]


def test_mail_rcpt_and_data_go_in_one_write_when_the_upstream_offers_pipelining(
    relay, sink, upstream_mode
):
    relay.send("a@client.test", ["x@dest.test", "y@dest.test"], BODY)
    (msg,) = sink.wait_for(1)
    assert msg.rcpt_tos == ["x@dest.test", "y@dest.test"]
    assert sink.handler.pipelined == [upstream_mode == "pipelined"]


def test_a_transaction_with_every_recipient_refused_leaves_the_session_usable(
    relay, sink, events, upstream_mode
):
    """Pipelined, DATA was sent with the RCPTs: its refusal is read, so the next message
    on the same session gets its own replies."""
    sink.handler.rcpt_replies["gone@dest.test"] = "550 5.1.1 no such user"
    sink.handler.rcpt_replies["also-gone@dest.test"] = "550 5.1.1 no such user"
    refused = relay.send("a@client.test", ["gone@dest.test", "also-gone@dest.test"], BODY)
    wait_until(lambda: len(events.events("failed", queue_id=refused)) == 2, what="failures")
    assert not [m for m in sink.messages if "gone@dest.test" in m.rcpt_tos]
    delivered = relay.send("a@client.test", ["ok@dest.test"], BODY)
    (msg,) = wait_until(
        lambda: [m for m in sink.messages if m.rcpt_tos == ["ok@dest.test"]], what="delivery"
    )
    assert delivered.encode() in msg.content
    (event,) = wait_until(lambda: events.events("delivered", queue_id=delivered), what="event")
    assert event["recipients"] == ["ok@dest.test"]


def test_backend_down_then_back(tmp_path, relay_factory, events):
    sink = Sink().start()
    port = sink.port
    sink.stop()
    relay = relay_factory(load_config(write_config(tmp_path, port)))
    queue_id = relay.send("a@client.test", ["x@dest.test"], BODY)
    deferred = wait_until(lambda: events.events("deferred", queue_id=queue_id), what="deferral")
    assert "sink" in deferred[0]["backend_errors"][0]
    back = Sink(port).start()
    try:
        assert back.wait_for(1, timeout=15)[0].rcpt_tos == ["x@dest.test"]
    finally:
        back.stop()


def test_failover_to_the_next_backend(tmp_path, sink, relay_factory, events):
    dead = Sink().start()
    dead_port = dead.port
    dead.stop()
    path = write_config(tmp_path, dead_port)
    path.write_text(
        path.read_text()
        + f'\n[[backend]]\nname = "second"\nhost = "127.0.0.1"\nport = {sink.port}\ntls = "none"\n'
    )
    relay = relay_factory(load_config(path))
    queue_id = relay.send("a@client.test", ["x@dest.test"], BODY)
    sink.wait_for(1)
    delivered = wait_until(lambda: events.events("delivered", queue_id=queue_id), what="delivery")
    assert delivered[0]["backend"] == "second"
    assert delivered[0]["attempt"] == 1
    assert not events.events("deferred", queue_id=queue_id)


def test_smtputf8_addresses_pass_through(relay, sink):
    content = "Subject: utf8\r\n\r\nhéllo\r\n".encode()
    with relay.client() as client:
        client.ehlo("client.test")
        client.sendmail("expéditeur@client.test", ["用户@dest.test"], content, ["SMTPUTF8"])
    (msg,) = sink.wait_for(1)
    assert msg.mail_from == "expéditeur@client.test"
    assert msg.rcpt_tos == ["用户@dest.test"]
    assert "SMTPUTF8" in msg.mail_options
    assert msg.content.endswith(content)


def test_a_mail_loop_is_refused(relay, sink):
    looped = b"".join(
        b"Received: from hop%d by x; Wed, 25 Nov 2026 10:00:00 +0000\r\n" % i for i in range(51)
    )
    with relay.client() as client:
        client.ehlo("client.test")
        client.mail("a@client.test")
        client.rcpt("b@dest.test")
        code, msg = client.data(looped + b"Subject: loop\r\n\r\nbody\r\n")
    assert code == 554 and msg.startswith(b"5.4.6")
    assert sink.messages == []


class NagleSink:
    """The test sink's handler behind a server that leaves Nagle's algorithm on (as a
    listening socket made without IPPROTO_TCP does in asyncio) and writes each reply
    on its own: it holds a pipelined group's later replies until our ACK."""

    def __init__(self) -> None:
        self.handler = SinkHandler()
        self.loop = asyncio.new_event_loop()
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)  # proto 0
        self.sock.bind(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.sessions: list[SMTP] = []
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)

    def _session(self) -> SMTP:
        self.sessions.append(SMTP(self.handler))
        return self.sessions[-1]

    def start(self) -> NagleSink:
        self.thread.start()
        self.server = self._run(self.loop.create_server(self._session, sock=self.sock))
        return self

    def _run(self, coro):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(5)

    async def _close(self) -> None:
        self.server.close()
        for session in self.sessions:
            if session.transport is not None:
                session.transport.close()
        await asyncio.sleep(0.1)  # let the sessions see their end

    def stop(self) -> None:
        self._run(self._close())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)
        self.loop.close()


@pytest.fixture
def nagle_sink():
    sink = NagleSink().start()
    yield sink
    sink.stop()


def test_pipelining_to_a_server_that_holds_replies_for_an_ack_costs_no_delayed_ack(
    nagle_sink, tmp_path, relay_factory
):
    """Without an ACK at once, each message would wait for the kernel's delayed ACK
    (40 ms): 30 messages on one session, over a second."""
    path = write_config(tmp_path, nagle_sink.port)
    path.write_text(path.read_text() + "max_connections = 1\n")
    relay = relay_factory(load_config(path))
    relay.send("a@client.test", ["first@dest.test"], BODY)  # the session is open
    wait_until(lambda: len(nagle_sink.handler.messages) == 1, what="the first message")
    assert nagle_sink.handler.pipelined == [True]
    started = time.monotonic()
    for n in range(30):
        relay.send("a@client.test", [f"r{n}@dest.test"], BODY)
    wait_until(lambda: len(nagle_sink.handler.messages) == 31, what="30 more messages")
    assert time.monotonic() - started < 1.0  # ~0.1 s; stalled, 30 x 40 ms at least
