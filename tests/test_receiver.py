"""The SMTP listener (SPEC §4): real smtplib clients and raw sockets against the relay."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import gc
import os
import re
import smtplib
import socket
import threading
import time
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import smarthost.spool
from smarthost.config import Config, load_config
from smarthost.smtp_server import READ_LIMIT, RelaySMTP
from smarthost.spool import is_queue_id

from support.configs import write_config
from support.spool import spool_files
from support.waiting import wait_until

MESSAGE = b"From: a@client.test\r\nTo: b@dest.test\r\nSubject: test\r\n\r\nHello.\r\n"
QUEUED = re.compile(rb"^2\.0\.0 Ok: queued as ([0-9A-Z]{16})$")
ENHANCED = re.compile(rb"^[245]\.\d{1,3}\.\d{1,3} ")


def smtp_config(tmp_path: Path, sink_port: int, smtp: str) -> Config:
    """A test config with extra `[smtp]` keys."""
    return load_config(write_config(tmp_path, sink_port, smtp=smtp))


def spool_dirs(relay, *names: str) -> dict[str, list[str]]:
    found = spool_files(Path(relay.relay.spool.root))
    return {name: found.get(name, []) for name in names}


def headers(content: bytes) -> list[bytes]:
    """The header lines (folded lines joined) of a message, before the blank line."""
    block = content.split(b"\r\n\r\n", 1)[0]
    return re.split(rb"\r\n(?![ \t])", block)


def header_values(content: bytes, name: bytes) -> list[bytes]:
    prefix = name.lower() + b":"
    return [h[len(prefix) :].strip() for h in headers(content) if h.lower().startswith(prefix)]


def session(relay) -> smtplib.SMTP:
    client = relay.client()
    client.ehlo("client.test")
    return client


# -- EHLO -----------------------------------------------------------------------------


def test_ehlo_advertises_extensions(tmp_path, sink, relay_factory):
    relay = relay_factory(smtp_config(tmp_path, sink.port, 'max_message_size = "1K"'))
    with relay.client() as client:
        code, _ = client.ehlo("client.test")
        assert code == 250
        features = client.esmtp_features
    assert features["size"] == "1024"
    for name in ("8bitmime", "smtputf8", "pipelining", "enhancedstatuscodes"):
        assert name in features, features
    assert "auth" not in features  # never without TLS
    assert "starttls" not in features  # no certificate configured


def test_ehlo_advertises_dsn(relay):
    with session(relay) as client:
        assert "dsn" in client.esmtp_features


def test_rfc3461_parameters_are_accepted_and_kept(relay, sink, events):
    """RET/ENVID on MAIL and NOTIFY/ORCPT on RCPT get 250 and reach the envelope as given."""
    sink.handler.mail_reply = "451 4.3.0 not now"  # keep the message spooled to look at it
    with session(relay) as client:
        code, msg = client.mail("a@client.test", ["RET=HDRS", "ENVID=Abc123"])
        assert code == 250, msg
        code, msg = client.rcpt(
            "b@dest.test", ["NOTIFY=SUCCESS,FAILURE", "ORCPT=rfc822;B@Dest.test"]
        )
        assert code == 250, msg
        code, msg = client.data(MESSAGE)
        assert code == 250, msg
    queue_id = QUEUED.match(msg).group(1).decode()
    wait_until(lambda: events.events("deferred", queue_id=queue_id), what="a deferral")
    spool = relay.relay.spool
    env = spool.read_envelope(wait_until(lambda: spool.locate(queue_id)), queue_id)
    assert (env.ret, env.envid) == ("HDRS", "Abc123")
    assert env.recipients[0].notify == "SUCCESS,FAILURE"
    assert env.recipients[0].orcpt == "rfc822;B@Dest.test"


# -- accepting a message --------------------------------------------------------------


def test_data_reply_names_the_queue_id(relay, sink, events):
    with session(relay) as client:
        client.mail("a@client.test")
        client.rcpt("b@dest.test")
        client.rcpt("c@dest.test")
        code, msg = client.data(MESSAGE)
    assert code == 250
    match = QUEUED.match(msg)
    assert match, msg
    queue_id = match.group(1).decode()
    assert is_queue_id(queue_id)
    (received,) = events.events("received", queue_id=queue_id)
    assert received["client"] == "127.0.0.1"
    assert received["sender"] == "a@client.test"
    assert received["recipients"] == ["b@dest.test", "c@dest.test"]
    (delivered,) = sink.wait_for(1)
    assert received["size"] == len(delivered.content)
    assert delivered.rcpt_tos == ["b@dest.test", "c@dest.test"]


def test_each_message_gets_its_own_queue_id(relay, sink):
    ids = [relay.send("a@client.test", ["b@dest.test"], MESSAGE) for _ in range(3)]
    assert len(set(ids)) == 3
    assert all(is_queue_id(i) for i in ids)
    sink.wait_for(3)


# -- relay permission -----------------------------------------------------------------


@pytest.mark.parametrize("allow", ['["10.0.0.0/8"]', "[]"])
def test_relay_denied_outside_allow(tmp_path, sink, relay_factory, events, allow):
    relay = relay_factory(smtp_config(tmp_path, sink.port, f"allow = {allow}"))
    with session(relay) as client:
        assert client.mail("a@client.test")[0] == 250
        code, msg = client.rcpt("b@dest.test")
        assert (code, msg) == (554, b"5.7.1 <b@dest.test>: Relay access denied")
        rejected = events.events("rejected", client="127.0.0.1", status="5.7.1")
        assert rejected and "Relay access denied" in rejected[0]["reply"]
        assert client.rset()[0] == 250  # the session goes on
        code, msg = client.docmd("DATA")
        assert code == 503  # no recipient was accepted
        assert ENHANCED.match(msg), msg
        assert client.noop()[0] == 250
    assert spool_dirs(relay, "msg", "queue") == {"msg": [], "queue": []}
    assert sink.messages == []


# -- limits ---------------------------------------------------------------------------


def test_size_limit(tmp_path, sink, relay_factory, events):
    relay = relay_factory(smtp_config(tmp_path, sink.port, 'max_message_size = "1K"'))
    with session(relay) as client:
        code, msg = client.mail("a@client.test", ["SIZE=999999"])
        assert code == 552
        assert msg.startswith(b"5.3.4 "), msg
        assert client.rset()[0] == 250
        client.mail("a@client.test")
        client.rcpt("b@dest.test")
        big = MESSAGE + b"".join(b"%075d\r\n" % i for i in range(4096 // 77 + 1))
        assert len(big) >= 4096
        code, msg = client.data(big)
        assert code == 552
        assert msg.startswith(b"5.3.4 "), msg
        assert spool_dirs(relay, "tmp", "msg", "queue") == {"tmp": [], "msg": [], "queue": []}
        # The session goes on and a small message is accepted.
        assert client.mail("a@client.test")[0] == 250
        assert client.rcpt("b@dest.test")[0] == 250
        code, msg = client.data(MESSAGE)
        assert code == 250, msg
    (received,) = sink.wait_for(1)
    assert received.content.endswith(MESSAGE)
    assert [e["status"] for e in events.events("rejected", client="127.0.0.1")] == [
        "5.3.4",
        "5.3.4",
    ]


def test_too_many_recipients(tmp_path, sink, relay_factory):
    relay = relay_factory(smtp_config(tmp_path, sink.port, "max_recipients = 2"))
    with session(relay) as client:
        client.mail("a@client.test")
        assert client.rcpt("b@dest.test")[0] == 250
        assert client.rcpt("c@dest.test")[0] == 250
        code, msg = client.rcpt("d@dest.test")
        assert code == 452
        assert msg.startswith(b"4.5.3 "), msg
        assert client.data(MESSAGE)[0] == 250
    (received,) = sink.wait_for(1)
    assert received.rcpt_tos == ["b@dest.test", "c@dest.test"]


def test_too_many_clients(tmp_path, sink, relay_factory, events):
    relay = relay_factory(smtp_config(tmp_path, sink.port, "max_clients = 2"))

    def connect() -> smtplib.SMTP | None:
        try:
            return session(relay)
        except smtplib.SMTPConnectError:
            return None  # a slot of an earlier connection is not released yet

    with contextlib.ExitStack() as open_sessions:
        first = open_sessions.enter_context(wait_until(connect, what="a first session"))
        open_sessions.enter_context(wait_until(connect, what="a second session"))
        with pytest.raises(smtplib.SMTPConnectError) as caught:
            relay.client()
        assert caught.value.smtp_code == 421
        assert caught.value.smtp_error.startswith(b"4.7.0 "), caught.value.smtp_error
        assert events.events("rejected", status="4.7.0")
        assert first.noop()[0] == 250  # the sessions in progress are untouched
        first.quit()
        third = open_sessions.enter_context(wait_until(connect, what="a session after a quit"))
        assert third.mail("a@client.test")[0] == 250


# -- malformed commands ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("command", "codes", "enhanced"),
    [
        pytest.param("MAIL FROM:<bad", (501, 553), None),
        pytest.param("MAIL FROM:bad@", (501, 553), None),
        ("MAIL FROM:<a@@client.test>", (501, 553), None),
        ("MAIL TO:<a@client.test>", (501,), None),
        ("RCPT TO:<b@dest.test>", (503,), b"5.5.1"),
        ("FROBNICATE now", (500,), b"5.5.2"),
        ("MAIL FROM:<a@client.test> SIZE=many", (501,), None),
    ],
)
def test_malformed_commands_get_enhanced_codes(relay, sink, command, codes, enhanced):
    with session(relay) as client:
        code, msg = client.docmd(command)
        assert code in codes, (code, msg)
        assert ENHANCED.match(msg), msg
        assert msg[:1] == str(code)[:1].encode()
        if enhanced:
            assert msg.startswith(enhanced + b" "), msg
        # The session goes on: a whole message still goes through.
        assert client.mail("a@client.test")[0] == 250
        assert client.rcpt("b@dest.test")[0] == 250
        assert client.data(MESSAGE)[0] == 250
    sink.wait_for(1)


@pytest.mark.parametrize(
    "address",
    [
        pytest.param("<b@dest.test"),
        pytest.param("b@"),
        "<b@@dest.test>",
        "<b@dest.test> BOGUS",
    ],
)
def test_malformed_recipients_are_refused(relay, sink, address):
    with session(relay) as client:
        assert client.mail("a@client.test")[0] == 250
        code, msg = client.docmd(f"RCPT TO:{address}")
        assert code in (501, 553, 555), (code, msg)
        assert ENHANCED.match(msg), msg
        assert client.rcpt("c@dest.test")[0] == 250  # the transaction goes on
        assert client.data(MESSAGE)[0] == 250
    (received,) = sink.wait_for(1)
    assert received.rcpt_tos == ["c@dest.test"]


# -- headers the relay adds -----------------------------------------------------------


@pytest.mark.parametrize(
    "body",
    [
        b"From: a@client.test\r\nSubject: s\r\n\r\nMessage-ID: <in-body@x>\r\nDate: no\r\n",
        b"Subject: s\r\nX-Note: Message-ID: <in-value@x>\r\n\r\nHi.\r\n",
        pytest.param(
            b"\r\nMessage-ID: <in-body@x>\r\nDate: no\r\n",
        ),
    ],
    ids=["body", "in-a-value", "empty-header-section"],
)
def test_message_id_and_date_added_when_missing(relay, sink, body):
    """Only header fields count: not a field in the body, nor text inside another field."""
    queue_id = relay.send("a@client.test", ["b@dest.test"], body)
    (msg,) = sink.wait_for(1)
    (message_id,) = header_values(msg.content, b"Message-ID")
    assert queue_id.encode() in message_id
    assert message_id.endswith(b"@relay.test>")
    assert len(header_values(msg.content, b"Date")) == 1
    assert msg.content.endswith(body)


@pytest.mark.parametrize(
    "existing",
    [
        b"Message-ID: <given@client.test>\r\nDate: Wed, 25 Nov 2026 10:00:00 +0000\r\n",
        b"message-id: <given@client.test>\r\ndate: Wed, 25 Nov 2026 10:00:00 +0000\r\n",
        b"MESSAGE-ID:<given@client.test>\r\nDATE:Wed, 25 Nov 2026 10:00:00 +0000\r\n",
        pytest.param(
            b"Message-ID:\r\n <given@client.test>\r\nDate:\r\n Wed, 25 Nov 2026 10:00:00 +0000\r\n",
        ),
    ],
    ids=["canonical", "lowercase", "uppercase-no-space", "folded"],
)
def test_message_id_and_date_left_alone_when_present(relay, sink, events, existing):
    body = b"From: a@client.test\r\n" + existing + b"Subject: s\r\n\r\nHi.\r\n"
    queue_id = relay.send("a@client.test", ["b@dest.test"], body)
    (msg,) = sink.wait_for(1)
    assert header_values(msg.content, b"Message-ID") == [b"<given@client.test>"]
    assert len(header_values(msg.content, b"Date")) == 1
    assert msg.content.endswith(body)
    (received,) = events.events("received", queue_id=queue_id)
    assert received["message_id"] == "<given@client.test>"


@pytest.mark.parametrize(
    ("recipients", "has_for"),
    [(["b@dest.test"], True), (["b@dest.test", "c@dest.test"], False)],
)
def test_received_header(relay, sink, recipients, has_for):
    queue_id = relay.send("a@client.test", recipients, MESSAGE)
    (msg,) = sink.wait_for(1)
    first = headers(msg.content)[0]
    assert first.startswith(b"Received: from client.test ([127.0.0.1])")
    assert f"by relay.test (smarthost) with ESMTP id {queue_id}".encode() in first
    assert (b"for <b@dest.test>" in first) is has_for
    assert len(header_values(msg.content, b"Received")) == 1


# -- the null sender ------------------------------------------------------------------


def test_null_sender_is_accepted_and_forwarded(relay, sink, events):
    with session(relay) as client:
        assert client.mail("<>")[0] == 250
        code, msg = client.rcpt("b@dest.test")
        assert code == 250, msg
        code, msg = client.data(MESSAGE)
        assert code == 250, msg
    queue_id = QUEUED.match(msg).group(1).decode()
    (received,) = sink.wait_for(1)
    assert received.mail_from == ""  # the null sender
    assert events.events("received", queue_id=queue_id)[0]["sender"] == ""


# -- spool failures -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("err", "code", "status"), [(errno.ENOSPC, 452, b"4.3.1"), (errno.EIO, 451, b"4.3.0")]
)
def test_spool_failure_is_never_250(relay, sink, events, monkeypatch, err, code, status):
    def fsync(fd: int) -> None:
        raise OSError(err, os.strerror(err))

    monkeypatch.setattr(smarthost.spool.os, "fsync", fsync)
    if relay.relay.spool._syncfs is not None:  # a commit's only sync call, then
        monkeypatch.setattr(relay.relay.spool, "_syncfs", fsync)
    with session(relay) as client:
        client.mail("a@client.test")
        client.rcpt("b@dest.test")
        reply = client.data(MESSAGE)
        assert reply[0] == code, reply
        assert reply[1].startswith(status + b" "), reply
        (error,) = events.events("spool_error")
        assert error["levelname"] == "ERROR"
        assert spool_dirs(relay, "tmp", "msg", "queue", "active") == {
            "tmp": [],
            "msg": [],
            "queue": [],
            "active": [],
        }
        assert not events.events("received")

        monkeypatch.undo()  # the disk has room again: the same session goes on
        client.mail("a@client.test")
        client.rcpt("c@dest.test")
        code, msg = client.data(MESSAGE)
        assert code == 250, msg
    (received,) = sink.wait_for(1)
    assert received.rcpt_tos == ["c@dest.test"]  # the refused message never went out


# -- pipelining -----------------------------------------------------------------------


def read_reply(lines) -> bytes:
    """One (possibly multi-line) SMTP reply; returns its last line."""
    while True:
        line = lines.readline()
        assert line.endswith(b"\r\n"), line
        if line[3:4] != b"-":
            return line.rstrip(b"\r\n")


def test_pipelined_commands_are_answered_in_order(relay, sink):
    with socket.create_connection((relay.host, relay.port), timeout=10) as sock:
        lines = sock.makefile("rb")
        assert read_reply(lines).startswith(b"220 ")
        sock.sendall(b"EHLO client.test\r\n")
        assert read_reply(lines).startswith(b"250 ")
        sock.sendall(
            b"MAIL FROM:<a@client.test>\r\n"
            b"RCPT TO:<b@dest.test>\r\n"
            b"RCPT TO:<c@dest.test>\r\n"
            b"DATA\r\n"
        )
        replies = [read_reply(lines)[:3] for _ in range(4)]
        assert replies == [b"250", b"250", b"250", b"354"]
        sock.sendall(MESSAGE + b".\r\nQUIT\r\n")
        assert QUEUED.match(read_reply(lines)[4:])
        assert read_reply(lines).startswith(b"221 ")
    (received,) = sink.wait_for(1)
    assert received.rcpt_tos == ["b@dest.test", "c@dest.test"]
    assert received.content.endswith(MESSAGE)


# -- the fast address parser agrees with aiosmtpd's ------------------------------------


@settings(max_examples=300, deadline=None, database=None)
@given(st.data())
def test_fast_address_path_gives_aiosmtpds_answer(data):
    """`<dot-atom@host>` skips aiosmtpd's RFC 5322 parser; whenever it does, the result
    must be the parser's, so the shortcut changes speed and nothing else."""
    from aiosmtpd.smtp import SMTP

    from smarthost.smtp_server import SIMPLE_PATH as _SIMPLE_PATH
    from smarthost.smtp_server import RelaySMTP

    arg = data.draw(st.from_regex(_SIMPLE_PATH, fullmatch=True))
    ours = RelaySMTP.__new__(RelaySMTP)
    theirs = SMTP.__new__(SMTP)
    ours.local_part_limit = theirs.local_part_limit = 0
    assert RelaySMTP._getaddr(ours, arg) == SMTP._getaddr(theirs, arg)


@pytest.mark.parametrize(
    "arg", ["<a@b.c>", " <x.y+z@example.com>  BODY=8BITMIME", "<A!#$%&'*+/=?^_`{|}~-@E-x.COM> x"]
)
def test_fast_address_path_covers_ordinary_addresses(arg):
    from aiosmtpd.smtp import SMTP

    from smarthost.smtp_server import SIMPLE_PATH as _SIMPLE_PATH
    from smarthost.smtp_server import RelaySMTP

    assert _SIMPLE_PATH.match(arg)
    ours = RelaySMTP.__new__(RelaySMTP)
    theirs = SMTP.__new__(SMTP)
    ours.local_part_limit = theirs.local_part_limit = 0
    assert RelaySMTP._getaddr(ours, arg) == SMTP._getaddr(theirs, arg)


# -- session bookkeeping ------------------------------------------------------------


def test_each_command_pushes_the_session_timeout_out_and_idling_ends_it(
    tmp_path, sink, relay_factory
):
    relay = relay_factory(smtp_config(tmp_path, sink.port, 'timeout = "1s"'))
    with contextlib.closing(session(relay)) as client:
        started = time.monotonic()
        while time.monotonic() - started < 2.5:  # 2.5 timeouts, a command every 0.3 s
            assert client.noop()[0] == 250
            time.sleep(0.3)
        idle_from = time.monotonic()
        # The relay closes the idle session: the next read sees the end.
        client.sock.settimeout(10)
        end = client.sock.recv(1024)
        assert end == b"" or end.startswith(b"421"), end
        assert 0.7 < time.monotonic() - idle_from < 5


def test_long_lines_are_refused_and_cost_no_more_than_others(relay, sink):
    """A line over 998 octets gets 500 5.5.2 once DATA ends, however long it is: the
    stream is read in pieces, so it is no dearer than many short lines."""
    with contextlib.closing(session(relay)) as client:
        client.mail("a@client.test")
        client.rcpt("b@dest.test")
        code, msg = client.data(b"Subject: long\r\n\r\n" + b"x" * 200_000 + b"\r\n")
        assert (code, msg[:5]) == (500, b"5.5.2")
        client.rset()
        big = (b"Subject: big\r\n\r\n" + b"y" * 998 + b"\r\n") * 600  # ~600 KB
        assert client.sendmail("a@client.test", ["b@dest.test"], big) == {}
    (msg,) = sink.wait_for(1, timeout=30)
    assert msg.content.endswith(big)


# -- the commit thread ----------------------------------------------------------------


class GatedSpool(smarthost.spool.Spool):
    """A real spool whose first group commit waits for a gate, recording batch sizes."""

    def __init__(self, root: str) -> None:
        super().__init__(root)
        self.batches: list[int] = []
        self.first_started = threading.Event()
        self.gate = threading.Event()

    def commit_many(self, messages):
        self.batches.append(len(messages))
        if len(self.batches) == 1:
            self.first_started.set()
            assert self.gate.wait(10)
        return super().commit_many(messages)


def commit_through(committer, envs) -> list[BaseException | None]:
    """Submit every envelope from one event loop and collect each outcome."""

    async def submit_all():
        loop = asyncio.get_running_loop()
        futures = []
        for env in envs:
            done = loop.create_future()
            committer.submit(env, [b"Subject: x\r\n\r\nbody\r\n"], loop, done)
            futures.append(done)
        return await asyncio.wait_for(asyncio.gather(*futures, return_exceptions=True), 10)

    return asyncio.run(submit_all())


def test_messages_that_end_while_a_batch_commits_share_the_next_one(tmp_path):
    from smarthost.commit import GroupCommitter

    spool = GatedSpool(str(tmp_path / "spool"))
    spool.create()
    logged = []
    committer = GroupCommitter(spool, lambda env, error, seconds: logged.append((env.id, error)))
    envs = [make_env() for _ in range(6)]
    outcome: list = []
    first = threading.Thread(target=lambda: outcome.extend(commit_through(committer, envs[:1])))
    first.start()
    assert spool.first_started.wait(10)
    rest = threading.Thread(target=lambda: outcome.extend(commit_through(committer, envs[1:])))
    rest.start()
    wait_until(lambda: len(committer._waiting) == 5, 10, "five messages waiting")
    spool.gate.set()
    first.join(10)
    rest.join(10)
    committer.stop(10)
    assert spool.batches == [1, 5]
    assert outcome == [None] * 6
    assert sorted(spool.each_name("queue")) == sorted(env.id for env in envs)
    assert [queue_id for queue_id, _ in logged] == [env.id for env in envs]


def test_a_bug_in_a_commit_gives_4xx_and_the_thread_goes_on(tmp_path, events):
    from smarthost.commit import GroupCommitter

    class BrokenOnce(smarthost.spool.Spool):
        calls = 0

        def commit_many(self, messages):
            self.calls += 1
            if self.calls == 1:
                raise RuntimeError("a bug")
            return super().commit_many(messages)

    spool = BrokenOnce(str(tmp_path / "spool"))
    spool.create()
    committer = GroupCommitter(spool, lambda env, error, seconds: None)
    (failed,) = commit_through(committer, [make_env()])
    assert isinstance(failed, smarthost.spool.SpoolError)
    assert events.events("internal_error")
    assert commit_through(committer, [make_env()]) == [None]
    committer.stop(10)


def test_a_commit_thread_that_could_not_start_is_started_by_the_next_submit(tmp_path, monkeypatch):
    """The thread starts with the first message; if the system has no thread to give
    (RuntimeError), that submit fails and the next one starts it: no later message
    waits for a thread that never ran, and stop() still ends cleanly."""
    from smarthost.commit import GroupCommitter

    spool = smarthost.spool.Spool(str(tmp_path / "spool"))
    spool.create()
    committer = GroupCommitter(spool, lambda env, error, seconds: None)
    start = threading.Thread.start

    def no_thread(self):
        monkeypatch.setattr(threading.Thread, "start", start)  # once
        raise RuntimeError("can't start new thread")

    monkeypatch.setattr(threading.Thread, "start", no_thread)
    with pytest.raises(RuntimeError):
        commit_through(committer, [make_env()])
    assert commit_through(committer, [make_env()]) == [None]
    committer.stop(10)
    assert committer._thread is not None and not committer._thread.is_alive()


def make_env() -> smarthost.spool.Envelope:
    from smarthost.spool import Envelope, Recipient, new_id

    return Envelope(
        id=new_id(), sender="a@client.test", recipients=[Recipient("b@dest.test")], arrival=0.0
    )


# -- large header blocks -------------------------------------------------------------


def test_a_large_header_block_is_prepared_off_the_loop(relay, sink, monkeypatch):
    """A header block past PREPARE_ON_LOOP is rewritten in a thread (a hostile one can
    cost a large fraction of a second); the message comes out the same."""
    threads: list[str] = []
    prepare = relay.relay.receiver.prepare

    def recording(*args, **kwargs):
        threads.append(threading.current_thread().name)
        return prepare(*args, **kwargs)

    monkeypatch.setattr(relay.relay.receiver, "prepare", recording)
    small = b"Subject: small\r\n\r\nbody\r\n"
    long_body = b"Subject: long body\r\n\r\n" + (b"b" * 78 + b"\r\n") * 500  # 40 KB, one piece
    large = b"".join(b"X-Filler-%05d: %s\r\n" % (i, b"f" * 60) for i in range(1000))
    large += b"Subject: large\r\n\r\nbody\r\n"
    with contextlib.closing(session(relay)) as client:
        for content in (small, long_body, large):
            assert client.sendmail("a@client.test", ["b@dest.test"], content) == {}
    got = sink.wait_for(3, timeout=30)
    assert [m.content.endswith(c) for m, c in zip(got, (small, long_body, large))] == [True] * 3
    assert threads[:2] == ["smtp", "smtp"]  # small blocks (a long body is no matter): on the loop
    assert threads[2] != "smtp"  # a large block: not


def test_force_from_refuses_a_header_block_cut_at_its_bound(tmp_path, sink, relay_factory):
    """A header block longer than HEADER_MAX is not read to its end: a From after the
    bound could reach the upstream unrewritten, so force_from refuses the message."""
    path = write_config(tmp_path, sink.port, '[rewrite]\nforce_from = "relay@example.com"')
    relay = relay_factory(load_config(path))
    header = b"".join(b"X-Filler-%06d: %s\r\n" % (i, b"f" * 60) for i in range(4000))
    content = header + b"From: ceo@bank.example\r\n\r\nbody\r\n"
    with contextlib.closing(session(relay)) as client:
        client.mail("a@client.test")
        client.rcpt("b@dest.test")
        code, msg = client.data(content)
        assert (code, msg[:5]) == (554, b"5.6.0"), msg
        assert client.noop()[0] == 250  # the session goes on
    assert sink.messages == []


def test_a_session_reads_its_socket_in_pieces_of_read_limit(relay):
    """Not asyncio's 256 KiB, which glibc maps and unmaps at every read (smtp_server.py)."""
    with smtplib.SMTP("127.0.0.1", relay.port, timeout=10) as client:
        client.ehlo("client.test")
        me = client.sock.getsockname()
        sessions = [o for o in gc.get_objects() if isinstance(o, RelaySMTP)]
        (session,) = [s for s in sessions if s.session and s.session.peer == me]
        assert session.transport.max_size == READ_LIMIT
