"""Reply classification (SPEC §5), the pieces of a session that need no network, and
large mail streamed from the spool to a real upstream."""

from __future__ import annotations

import hashlib
import os
import random
import re
import smtplib
import socket
import ssl
import sys
import threading
import time
import tracemalloc
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from smarthost.config import BackendConfig, Config, load_config
from smarthost.sender import (
    DATA_BLOCK,
    BackendFailure,
    Sender,
    Verdict,
    classify,
    enhanced_status,
    format_reply,
    read_secret,
)
from smarthost.spool import CorruptEnvelope, Envelope, Recipient, Spool, new_id
from smarthost.upstream import Upstreams, make_tls_context

from support.configs import write_config


@pytest.mark.parametrize(
    ("stage", "code", "outcome"),
    [
        ("connect", 220, Verdict.OK),
        ("connect", 554, Verdict.BACKEND_FAILURE),
        ("ehlo", 500, Verdict.BACKEND_FAILURE),
        ("starttls", 454, Verdict.BACKEND_FAILURE),
        ("auth", 535, Verdict.BACKEND_FAILURE),
        ("auth", 454, Verdict.BACKEND_FAILURE),
        ("mail", 250, Verdict.OK),
        ("mail", 421, Verdict.BACKEND_FAILURE),
        ("mail", 451, Verdict.DEFER_MESSAGE),
        ("mail", 553, Verdict.FAIL_MESSAGE),
        ("rcpt", 250, Verdict.OK),
        ("rcpt", 251, Verdict.OK),
        ("rcpt", 421, Verdict.BACKEND_FAILURE),
        ("rcpt", 450, Verdict.DEFER_RECIPIENT),
        ("rcpt", 550, Verdict.FAIL_RECIPIENT),
        ("data", 354, Verdict.OK),
        ("data", 250, Verdict.OK),
        ("data", 421, Verdict.BACKEND_FAILURE),
        ("data", 452, Verdict.DEFER_MESSAGE),
        ("data", 554, Verdict.FAIL_MESSAGE),
        ("rset", 500, Verdict.BACKEND_FAILURE),
    ],
)
def test_classify(stage, code, outcome):
    assert classify(stage, code) is outcome


def test_enhanced_status_from_reply_or_class():
    assert enhanced_status(550, "5.1.1 no such user") == "5.1.1"
    assert enhanced_status(451, "try later") == "4.0.0"
    assert enhanced_status(250, "ok") == "2.0.0"
    assert enhanced_status(-1, "") == "4.0.0"


def test_format_reply_joins_multiline_text():
    assert (
        format_reply(550, b"5.7.1 first line\n5.7.1 second") == "550 5.7.1 first line 5.7.1 second"
    )


def test_tls_verifies_by_default():
    ctx = make_tls_context(BackendConfig(host="smtp.example.com"))
    assert ctx.verify_mode == ssl.CERT_REQUIRED and ctx.check_hostname
    lax = make_tls_context(BackendConfig(host="smtp.example.com", tls_verify=False))
    assert lax.verify_mode == ssl.CERT_NONE


def test_secret_from_file_and_command(tmp_path):
    secret = tmp_path / "secret"
    secret.write_text("s3cret\nignored\n")
    assert read_secret(BackendConfig(host="h", username="u", password_file=str(secret))) == "s3cret"
    command = f"{sys.executable} -c 'print(\"tok3n\")'"
    assert read_secret(BackendConfig(host="h", username="u", password_command=command)) == "tok3n"


def test_failing_password_command_is_a_backend_failure_without_its_output():
    command = f"{sys.executable} -c 'print(\"half-secret\"); raise SystemExit(3)'"
    with pytest.raises(BackendFailure) as info:
        read_secret(BackendConfig(host="h", username="u", password_command=command))
    assert "exited 3" in info.value.reply and "half-secret" not in info.value.reply


# -- the transaction's commands say what smtplib's would -----------------------------


@settings(max_examples=300, deadline=None, database=None)
@given(st.data())
def test_simple_paths_are_quoted_as_smtplib_quotes_them(data):
    from smarthost.sender import _SIMPLE_ADDRESS, _path

    address = data.draw(st.from_regex(_SIMPLE_ADDRESS, fullmatch=True))
    assert _path(address) == smtplib.quoteaddr(address)


@pytest.mark.parametrize("address", ["", "<>", '"a b"@c', "é@x", "a@[1.2.3.4]", "Eve <e@x>"])
def test_other_paths_go_through_smtplib(address):
    from smarthost.sender import _path

    assert _path(address) == smtplib.quoteaddr(address)


class _Recorder:
    """Enough of smtplib.SMTP for send_content: what goes on the wire."""

    def __init__(self) -> None:
        self.sent = b""
        self.replies = [(354, b"go ahead"), (250, b"ok")]
        self.debuglevel = 0

    def putcmd(self, cmd, args=""):
        self.sent += f"{cmd}{' ' + args if args else ''}\r\n".encode()

    def getreply(self):
        return self.replies.pop(0)

    def send(self, data):
        self.sent += data


PIECES = st.lists(st.sampled_from([b".", b"\r\n", b"\n", b"\r", b"a", b"..", b"\r\n.\r\n"]))


@settings(max_examples=300, deadline=None, database=None)
@given(PIECES)
def test_send_content_puts_smtplibs_bytes_on_the_wire(parts):
    """What smtplib sends for the content with its line endings fixed (as it fixes a
    str message's): every bare CR and bare LF is CRLF on the wire."""
    from smarthost.sender import UpstreamWaits, send_content

    content = b"".join(parts)
    ours, theirs = _Recorder(), _Recorder()
    ours.replies.pop(0)  # DATA and its 354 are the Exchange's
    assert send_content(ours, content, False, UpstreamWaits()) == (250, b"ok")
    fixed = smtplib._fix_eols(content.decode("latin-1")).encode("latin-1")
    assert smtplib.SMTP.data(theirs, fixed) == (250, b"ok")
    assert b"data\r\n" + ours.sent == theirs.sent


@settings(max_examples=500, deadline=None, database=None)
@given(st.lists(PIECES.map(b"".join)))
def test_content_in_pieces_goes_out_as_the_whole_would(pieces):
    """Wherever the pieces (a file's blocks) are cut, even between CR and LF or right
    before a dot, the wire bytes are those of the whole content."""
    from smarthost.sender import DataStream

    whole = DataStream()
    expected = whole.feed(b"".join(pieces)) + whole.end()
    stream = DataStream()
    assert b"".join(stream.feed(piece) for piece in pieces) + stream.end() == expected


# -- delivery streamed from the spool (real Spool, real Sender, real sockets) ----------


class RawUpstream:
    """An SMTP server on loopback that keeps each DATA as it came over the wire, dot
    stuffing, line endings and final dot included (the aiosmtpd Sink takes the stuffing
    out), or with `keep=False` only its length and digest, never holding more than a
    block: in the same process, whatever it holds counts in tracemalloc too."""

    def __init__(self, keep: bool = True) -> None:
        self.keep = keep
        self.data: list[bytes] = []
        self.digests: list[tuple[int, str]] = []
        self.mail: list[bytes] = []
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.listener.settimeout(0.05)  # to notice close()
        self.port = self.listener.getsockname()[1]
        self.closed = threading.Event()
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.closed.set()
        self.thread.join(5)
        self.listener.close()

    def _serve(self) -> None:
        while not self.closed.is_set():
            try:
                conn, _ = self.listener.accept()
            except socket.timeout:
                continue
            conn.settimeout(None)
            threading.Thread(target=self._session, args=(conn,), daemon=True).start()

    def _session(self, conn: socket.socket) -> None:
        with conn, conn.makefile("rb") as lines:
            conn.sendall(b"220 raw.test ESMTP\r\n")
            while line := lines.readline():
                verb = line[:4].upper()
                if verb == b"EHLO":
                    conn.sendall(b"250-raw.test\r\n250-PIPELINING\r\n250 SIZE 100000000\r\n")
                elif verb == b"DATA":
                    conn.sendall(b"354 go ahead\r\n")
                    if not self._take_data(lines):
                        return
                    conn.sendall(b"250 2.0.0 stored\r\n")
                elif verb == b"QUIT":
                    conn.sendall(b"221 bye\r\n")
                    return
                else:
                    if verb == b"MAIL":
                        self.mail.append(line)
                    conn.sendall(b"250 ok\r\n")

    def _take_data(self, lines) -> bool:
        digest, length, kept = hashlib.sha256(), 0, []
        tail = b"\r\n"  # DATA starts a line
        while True:
            block = lines.read1(65536)
            if not block:
                return False  # the client went away mid-DATA
            window = tail + block
            end = window.find(b"\r\n.\r\n")
            if end >= 0:
                block = block[: end + 5 - len(tail)]
            digest.update(block)
            length += len(block)
            if self.keep:
                kept.append(block)
            if end >= 0:
                break
            tail = window[-4:]
        self.digests.append((length, digest.hexdigest()))
        if self.keep:
            self.data.append(b"".join(kept))
        return True


@pytest.fixture
def raw_upstream() -> Iterator[RawUpstream]:
    upstream = RawUpstream()
    yield upstream
    upstream.close()


def new_envelope(size: int) -> Envelope:
    return Envelope(
        id=new_id(),
        sender="a@client.test",
        recipients=[Recipient("b@dest.test")],
        arrival=time.time(),
        size=size,
    )


def spool_and_sender(config: Config) -> tuple[Spool, Sender]:
    spool = Spool(config.spool.dir)
    spool.create()
    return spool, Sender(config, spool, Upstreams(config))


def dotted_content(size: int) -> bytes:
    """CRLF lines of many lengths, many of them starting with "." (a lone "." too),
    the first byte a dot, and at each edge of a DATA_BLOCK in turn: a dot line that
    starts on it, a CR before it and LF after it, then a dot line, or a dot line
    that goes across it."""
    rng = random.Random(13)
    out = bytearray(b".the first byte is a dot\r\n")
    edge = DATA_BLOCK
    while len(out) < size:
        while len(out) < edge - 300:
            start = rng.choice([b".", b"..", b".x", b"", b"word", b"From "])
            out += start + b"y" * rng.randrange(0, 200) + b"\r\n"
        room = edge - len(out)
        kind = edge // DATA_BLOCK % 3
        if kind == 0:
            out += b"f" * (room - 2) + b"\r\n.starts on the edge\r\n"
            assert out[edge - 1 : edge + 1] == b"\n."
        elif kind == 1:
            out += b"f" * (room - 1) + b"\r\n.after a CRLF cut in two\r\n"
            assert out[edge - 1 : edge + 2] == b"\r\n."
        else:
            out += b"f" * (room - 12) + b"\r\n.across the edge\r\n"
        edge += DATA_BLOCK
    return bytes(out)


def test_a_large_message_is_streamed_from_the_spool_byte_for_byte(config, sink, monkeypatch):
    spool, sender = spool_and_sender(config)
    content = dotted_content(3 << 20)
    env = new_envelope(len(content))
    spool.commit(env, [content])
    writes: list[tuple[int, bytes]] = []  # (length, the last bytes) of each write
    real_send = smtplib.SMTP.send

    def send(smtp, data):
        end = data[-5:]  # smtplib sends its own commands as str
        writes.append((len(data), end.encode() if isinstance(end, str) else end))
        return real_send(smtp, data)

    monkeypatch.setattr(smtplib.SMTP, "send", send)
    try:
        result = sender.attempt(env)  # no content: the claim left it to the file
        sent = list(writes)
    finally:
        sender.upstreams.close_all()
    assert [r.address for r in result.delivered] == ["b@dest.test"]
    (received,) = sink.wait_for(1)
    assert received.content == content
    assert f"SIZE={len(content)}" in received.mail_options
    # Block by block (DATA_BLOCK and its dots), and the final dot with the last one.
    assert len(sent) > len(content) // DATA_BLOCK
    assert max(size for size, _ in sent) < 2 * DATA_BLOCK
    size, last = sent[-1]
    assert last == b"\r\n.\r\n" and size > len(last)


def bare_line_endings() -> bytes:
    """Content-only spool file of an earlier version: bare LF, bare CR, a CR that ends
    the first block before the LF that starts the second, a bare CR that ends the
    second before a dot, and no line ending at the end."""
    head = b"Subject: bare\nX-A: cr\rX-B: crlf\r\n\r\n.dot\n..dots\r.cr dot\r\r\n\n"
    filler = b"z" * 70 + b"\n"
    first = head + filler * ((DATA_BLOCK - len(head)) // len(filler))
    first += b"w" * (DATA_BLOCK - 1 - len(first)) + b"\r"
    second = b"\n.after the cut CRLF\r\n" + filler * 800
    second += b"v" * (DATA_BLOCK - 1 - len(second)) + b"\r"
    content = first + second + b".after a bare CR on the edge\n" + b"tail\rlast line"
    assert content[DATA_BLOCK - 1 : DATA_BLOCK + 2] == b"\r\n."
    assert content[2 * DATA_BLOCK - 1 : 2 * DATA_BLOCK + 2] == b"\r.a"
    return content


def test_bare_line_endings_go_upstream_as_crlf(tmp_path, raw_upstream):
    config = load_config(write_config(tmp_path, raw_upstream.port))
    spool, sender = spool_and_sender(config)
    content = bare_line_endings()
    streamed, whole = new_envelope(len(content)), new_envelope(len(content))
    for env in (streamed, whole):
        Path(spool.message_path(env.id)).write_bytes(content)  # two-file layout
    try:
        assert sender.attempt(streamed).delivered  # from the file, block by block
        assert sender.attempt(whole, content).delivered  # bytes a claim read
    finally:
        sender.upstreams.close_all()
    wire, again = raw_upstream.data
    assert wire == again
    assert wire.endswith(b"\r\n.\r\n")
    body = wire[: -len(b".\r\n")]
    assert body.count(b"\r") == body.count(b"\n") == body.count(b"\r\n")  # CRLF only
    lines = body.split(b"\r\n")[:-1]
    assert b"." not in lines  # no early end of DATA
    unstuffed = [line[1:] if line.startswith(b".") else line for line in lines]
    assert unstuffed == re.split(rb"\r\n|\r|\n", content)
    assert raw_upstream.mail[0].rstrip().endswith(f"SIZE={len(content)}".encode())


def test_streaming_a_large_message_costs_a_few_blocks_of_memory(tmp_path):
    upstream = RawUpstream(keep=False)  # in this process: it must hold nothing either
    config = load_config(write_config(tmp_path, upstream.port))
    spool, sender = spool_and_sender(config)
    lines = (b"%s line %d\r\n" % (b"." if n % 7 == 0 else b"a", n) for n in range(1, 6001))
    block = b"".join(lines)  # a dot line every 7, none at the start
    count = (20 << 20) // len(block) + 1
    env = new_envelope(len(block) * count)
    spool.commit(env, [block] * count)
    wire = hashlib.sha256()
    for _ in range(count):
        wire.update(block.replace(b"\n.", b"\n.."))
    wire.update(b".\r\n")
    small = new_envelope(len(block))
    spool.commit(small, [block])
    try:
        sender.attempt(small)  # the session, and anything done once, before measuring
        tracemalloc.start()
        try:
            result = sender.attempt(env)
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
    finally:
        sender.upstreams.close_all()
        upstream.close()
    assert result.delivered
    assert upstream.digests[-1] == (
        len(block) * count + count * block.count(b"\n.") + len(b".\r\n"),
        wire.hexdigest(),
    )
    assert env.size > 20 << 20
    assert peak < 2 << 20, f"peak {peak} bytes"


@pytest.mark.parametrize("damage", ["cut short", "missing"])
def test_unreadable_content_is_the_messages_problem_not_the_backends(config, sink, damage):
    """As when the content was read before the attempt: the caller quarantines it."""
    spool, sender = spool_and_sender(config)
    content = dotted_content(200_000)
    env, good = new_envelope(len(content)), new_envelope(len(content))
    spool.commit(env, [content[:-10] if damage == "cut short" else content])
    spool.commit(good, [content])
    if damage == "missing":
        os.unlink(spool.message_path(env.id))
    try:
        with pytest.raises(CorruptEnvelope if damage == "cut short" else FileNotFoundError):
            sender.attempt(env)
        (backend,) = sender.upstreams.backends
        assert not backend.down and not backend.fails
        assert sender.attempt(good).delivered  # the next message goes as ever
    finally:
        sender.upstreams.close_all()
    (received,) = sink.wait_for(1)
    assert received.content == content
    assert env.recipients[0].state == "pending"


# -- SMTPUTF8 per transaction on a reused session (SPEC §4) -------------------------------


def utf8_envelope(sender: str, rcpt: str, smtputf8: bool) -> Envelope:
    return Envelope(
        id=new_id(),
        sender=sender,
        recipients=[Recipient(rcpt)],
        arrival=time.time(),
        smtputf8=smtputf8,
    )


def test_nothing_of_a_utf8_transaction_carries_over_on_a_reused_session(config, sink):
    """Issue #14 item 3: after an SMTPUTF8 message, smtplib's session-wide
    `command_encoding = "utf-8"` sent a later `RCPT TO:<pläin@...>` raw under a MAIL
    without SMTPUTF8. Each transaction now says SMTPUTF8 exactly when its own addresses
    need it (an envelope from before the listener checked, smtputf8 unset, included)."""
    spool, sender = spool_and_sender(config)
    ehlos: list[str] = []
    original = sink.handler.handle_EHLO

    async def counting(server, session, envelope, hostname, responses):
        ehlos.append(hostname)
        return await original(server, session, envelope, hostname, responses)

    sink.handler.handle_EHLO = counting  # type: ignore[method-assign]
    body = b"From: a@client.test\r\nSubject: s\r\n\r\nhi\r\n"
    envelopes = [
        utf8_envelope("ü@client.test", "b@dest.test", True),
        utf8_envelope("a@client.test", "pläin@dest.test", False),
        utf8_envelope("a@client.test", "b@dest.test", False),
        utf8_envelope("a@client.test", "b@dest.test", True),  # asked, needs nothing
    ]
    try:
        for env in envelopes:
            spool.commit(env, [body])
            assert sender.attempt(env, body).delivered, env.recipients[0]
    finally:
        sender.upstreams.close_all()
    got = sink.wait_for(4)
    assert [m.rcpt_tos for m in got] == [[e.recipients[0].address] for e in envelopes]
    assert [("SMTPUTF8" in m.mail_options) for m in got] == [True, True, False, False]
    assert len(ehlos) == 1, ehlos  # all on one session


def test_the_header_is_read_for_smtputf8_only_when_the_client_asked(config, sink, monkeypatch):
    """Streamed from the spool (no content in memory): a UTF-8 header makes SMTPUTF8
    only for mail whose client asked for it, and costs a header read only then."""
    spool, sender = spool_and_sender(config)
    reads: list[str] = []
    real = Spool.read_message_head
    monkeypatch.setattr(
        Spool, "read_message_head", lambda self, qid, *a: reads.append(qid) or real(self, qid, *a)
    )
    body = "From: a@client.test\r\nSubject: Grüße\r\n\r\nhi\r\n".encode()
    asked = utf8_envelope("a@client.test", "b@dest.test", True)
    not_asked = utf8_envelope("a@client.test", "b@dest.test", False)
    try:
        for env in (asked, not_asked):
            spool.commit(env, [body])
            env.size = len(body)
            assert sender.attempt(env).delivered
    finally:
        sender.upstreams.close_all()
    first, second = sink.wait_for(2)
    assert "SMTPUTF8" in first.mail_options and "SMTPUTF8" not in second.mail_options
    assert reads == [asked.id]
