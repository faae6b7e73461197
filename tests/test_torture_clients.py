"""Torture: hostile SMTP clients (issue #8). Fuzzed dialogues over raw sockets, slowloris
clients and connection floods past `smtp.max_clients`; the relay keeps answering well
formed replies, never acknowledges a message it has not spooled, keeps serving valid
clients, and its memory stays bounded.

The fuzz runs against one in-process relay (fast); the slowloris/flood scenario runs the
real process, whose RSS is read from /proc/PID/status. After every fuzzed dialogue a
valid client sends one message: those are counted (acknowledged/delivered/lost) for the
torture report, as are the messages the fuzz itself got acknowledged.
"""

from __future__ import annotations

import contextlib
import re
import select
import smtplib
import socket
import threading
from pathlib import Path

import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from smarthost.config import load_config

from support.configs import write_config
from support.fuzz import fuzz_settings
from support.messages import RCPT, SENDER, arrived
from support.sink import Sink
from support.smtp import send_one
from support.waiting import wait_until

DEADLINE = 60.0  # generous: a busy two-core machine
SYNC = b"\r\n.\r\nQUIT\r\n"  # ends a line, a DATA in progress, then the session

# A reply line: never a control character, even where the relay echoes what the client
# sent (an unknown verb, a VRFY argument).
REPLY_LINE = re.compile(rb"^[2-5]\d\d[ -][^\x00-\x1f\x7f]*$")
ENHANCED = re.compile(rb"^([45])\d\d[ -]([45])\.\d{1,3}\.\d{1,3} ")
# RFC 2034 §3: replies to EHLO and HELO themselves carry no enhanced status code.
EHLO_REPLY = re.compile(rb"^50\d Syntax: (EHLO|HELO) hostname$")
# What an envelope address must never hold once accepted: a control character, or the
# surrogate escapes aiosmtpd decodes bytes that are not UTF-8 to.
UNSAFE = re.compile(r"[\x00-\x1f\x7f-\x9f\udc80-\udcff]")
QUEUED = re.compile(rb"^250 2\.0\.0 Ok: queued as ([0-9A-Z]{16})$")


# -- a raw SMTP dialogue ------------------------------------------------------------------


class Dialogue(bytes):
    """The bytes the relay sent; `reset` if the session ended in a TCP reset."""

    reset = False


def dialogue(port: int, payload: bytes, timeout: float = DEADLINE) -> Dialogue:
    """Send `payload` (pipelined, in one go) then SYNC, and read every reply until the
    relay closes. A reader thread drains the replies while we write, so a long burst
    never deadlocks on full socket buffers."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
    received = bytearray()
    reset = []

    def read() -> None:
        while True:
            try:
                chunk = sock.recv(65536)
            except ConnectionResetError:
                # The relay closed with our pipelined input unread (after "502 ...
                # goodbye"): the kernel then resets, and may drop the last replies.
                reset.append(True)
                return
            except OSError:
                return
            if not chunk:
                return
            received.extend(chunk)

    reader = threading.Thread(target=read, name="fuzz-reader")
    reader.start()
    # The relay may close first (QUIT in the payload, too many bad commands).
    with contextlib.suppress(OSError):
        sock.sendall(payload + SYNC)
    reader.join(timeout)
    alive = reader.is_alive()
    sock.close()
    reader.join(5)
    assert not alive, f"no end of session within {timeout}s; got {bytes(received[-300:])!r}"
    out = Dialogue(bytes(received))
    out.reset = bool(reset)
    return out


def check_replies(out: Dialogue) -> list[bytes]:
    """Every reply line well formed; 4xx/5xx with an enhanced code of the same class;
    the session ends on a complete final reply (unless a reset cut what followed the
    relay's close). Returns the lines."""
    if out.reset:
        lines = out.split(b"\r\n")[:-1]  # what arrived whole before the reset
        assert lines, "reset before the greeting"
    else:
        assert out.endswith(b"\r\n"), f"the relay closed mid-reply: {out[-200:]!r}"
        lines = out[:-2].split(b"\r\n")
    assert lines[0].startswith(b"220 "), lines[0]
    for line in lines:
        assert REPLY_LINE.match(line), f"malformed reply {line!r}"
        if line[:1] in (b"4", b"5") and not EHLO_REPLY.match(line):
            match = ENHANCED.match(line)
            assert match and match.group(1) == match.group(2), f"no enhanced code: {line!r}"
    if not out.reset:
        assert lines[-1][3:4] == b" ", f"the session ended inside a reply: {lines[-1]!r}"
        assert lines[-1][:3] in (b"221", b"421", b"502"), f"unexpected last reply {lines[-1]!r}"
    return lines


def valid_message(tag: str) -> bytes:
    return (
        f"From: {SENDER}\r\nTo: {RCPT}\r\nSubject: valid {tag}\r\n"
        f"Message-ID: <{tag}@client.test>\r\n\r\nbody {tag}\r\n"
    ).encode()


def send_valid(port: int, tag: str) -> str:
    """One message from a well-behaved client; its queue ID."""
    return send_one(port, SENDER, [RCPT], valid_message(tag), timeout=DEADLINE)


def message_ids(sink: Sink) -> set[str]:
    return {message_id for message_id in arrived(sink) if message_id}


def queue_ids_seen(sink: Sink) -> str:
    """All the upstream has received, as text: a queue ID is in its Received: header."""
    return "\n".join(m.content.decode("utf-8", "replace") for m in list(sink.messages))


# -- strategies: hostile dialogues -----------------------------------------------------------


def _is_utf8(data: bytes) -> bool:
    try:
        data.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


EOL = st.sampled_from([b"\r\n"] * 6 + [b"\n", b"\r", b"\r\r\n", b"\n\r"])
VERBS = st.sampled_from(
    [b"EHLO", b"HELO", b"MAIL", b"RCPT", b"DATA", b"RSET", b"NOOP", b"VRFY", b"EXPN",
     b"HELP", b"STARTTLS", b"AUTH", b"BDAT", b"ETRN", b"XCLIENT", b"mail", b"rcpt",
     b"ehlo", b"QUIT", b"X" * 20, b"\x00", b"\xff\xfe", b""]
)  # fmt: skip
# Envelope arguments: text with control characters (NUL, CR, ESC, DEL...), and raw bytes
# that are mostly not UTF-8; the relay must refuse both at the command.
ADDRESS_TEXT = st.text(
    st.characters(blacklist_categories=("Cs",), max_codepoint=0x2FFF), max_size=40
)
ADDRESS_BYTES = st.one_of(ADDRESS_TEXT.map(lambda t: t.encode()), st.binary(max_size=40))
# One piece that makes an envelope argument unacceptable: a control character (not LF,
# which ends the command line), or a byte sequence that is not UTF-8.
CONTROL_BYTE = st.sampled_from([bytes([b]) for b in [*range(10), *range(11, 32), 127]])
NOT_UTF8 = st.one_of(
    st.sampled_from(
        [b"\xff", b"\xfe", b"\xc3", b"\xc3\x28", b"\xa0\xa1", b"\xed\xa0\x80", b"\xc0\xaf",
         b"\xe2\x82", b"\xf4\x90\x80\x80", b"\xf8\x88\x80\x80\x80", b"\x80"]
    ),
    st.binary(min_size=1, max_size=6).filter(lambda b: b"\n" not in b and not _is_utf8(b)),
)  # fmt: skip
HOSTILE_PIECE = st.one_of(CONTROL_BYTE, NOT_UTF8)
ADDRESS = st.one_of(
    st.sampled_from(
        [b"<a@client.test>", b"<>", b"<b@dest.test>", b"a@client.test", b"<a@@b>", b"<a",
         b"<\xc3\xa9@dest.test>", b"<" + b"l" * 300 + b"@dest.test>", b"<a@b> <c@d>", b""]
    ),
    ADDRESS_BYTES.map(lambda b: b"<" + b + b">"),
    ADDRESS_BYTES,
)  # fmt: skip
PARAMS = st.lists(
    st.sampled_from(
        [b"SIZE=100", b"SIZE=99999999999", b"SIZE=x", b"BODY=8BITMIME", b"BODY=BINARYMIME",
         b"BODY=junk", b"SMTPUTF8", b"RET=FULL", b"RET=hdrs", b"RET=no", b"ENVID=a+2Bb",
         b"ENVID=", b"ENVID=" + b"e" * 200, b"NOTIFY=NEVER", b"NOTIFY=SUCCESS,FAILURE",
         b"NOTIFY=NEVER,DELAY", b"NOTIFY=", b"ORCPT=rfc822;x+40y", b"ORCPT=junk",
         b"ORCPT=rfc822;", b"AUTH=<>", b"FOO=BAR", b"=", b"RET=FULL RET=HDRS"]
    ),
    max_size=4,
).map(lambda ps: b"".join(b" " + p for p in ps))  # fmt: skip
JUNK = st.binary(max_size=60)


@st.composite
def commands(draw: st.DrawFn) -> bytes:
    verb = draw(VERBS)
    kind = draw(st.sampled_from(["envelope", "junk", "none", "text"]))
    if verb.upper() in (b"MAIL", b"RCPT") and kind == "envelope":
        prefix = b" FROM:" if verb.upper() == b"MAIL" else b" TO:"
        arg = prefix + draw(ADDRESS) + draw(PARAMS)
    elif kind == "junk":
        arg = b" " + draw(JUNK)
    elif kind == "text":
        arg = b" " + draw(ADDRESS_BYTES)
    else:
        arg = b""
    return verb + arg + draw(EOL)


@st.composite
def data_blocks(draw: st.DrawFn) -> bytes:
    """A DATA command and a body (with hostile lines), ended or not."""
    body = draw(
        st.lists(
            st.one_of(
                st.sampled_from(
                    [b"Subject: fuzz", b"", b".", b"..", b".\n", b"\r", b"\x00", b"\xff\xfe",
                     b"Received: x", b"Message-ID: <m@x>", b"A" * 2000, b"\n.\n", b"\r.\r"]
                ),
                JUNK,
            ),
            max_size=8,
        )
    )  # fmt: skip
    end = draw(st.sampled_from([b"\r\n.\r\n", b"\n.\n", b"\r.\r", b""]))
    return b"DATA\r\n" + b"\r\n".join(body) + end


BIG = st.sampled_from([1001, 4096, 70_000, 1 << 20])
PARTS = st.one_of(
    commands(),
    commands(),
    commands(),
    data_blocks(),
    st.builds(lambda n, eol: b"X" * n + eol, BIG, EOL),  # long lines
    st.builds(lambda n, eol: b"MAIL FROM:<" + b"a" * n + b"@x>" + eol, BIG, EOL),
    st.integers(50, 3000).map(
        lambda n: b"".join(b"RCPT TO:<r%d@dest.test>\r\n" % i for i in range(n))
    ),
    JUNK,
)
DIALOGUES = st.lists(PARTS, min_size=1, max_size=12).map(b"".join)

VALID = b"EHLO fuzz.test\r\nMAIL FROM:<f@client.test>\r\nRCPT TO:<f@dest.test>\r\n"
EXAMPLES = {
    "pipelined-burst": VALID
    + b"DATA\r\nSubject: p\r\n\r\nx\r\n.\r\n"
    + (VALID[16:] + b"DATA\r\nSubject: p\r\n\r\nx\r\n.\r\n") * 50,
    "bare-lf": b"EHLO x\nMAIL FROM:<a@client.test>\nRCPT TO:<b@dest.test>\n"
    b"DATA\nSubject: x\n\nhi\n.\n",
    "bare-cr": b"EHLO x\rMAIL FROM:<a@client.test>\rRCPT TO:<b@dest.test>\rDATA\r\r.\r",
    "nul-bytes": b"EHLO x\r\nNOOP \x00\r\n\x00\x00\r\n" + VALID + b"DATA\r\nA\x00B\r\n.\r\n",
    "1mb-lines": b"EHLO x\r\n" + b"A" * (1 << 20) + b"\r\n" + VALID + b"DATA\r\n"
    + b"B" * (1 << 20) + b"\r\n.\r\n",
    "non-utf8-commands": b"EHLO x\r\n\xff\xfe\r\nNOOP \xff\r\nVRFY \xc3\r\n" + VALID
    + b"DATA\r\nSubject: \xff\xfe\r\n\r\n\xc3\x28\r\n.\r\n",
    "smtputf8-valid": b"EHLO x\r\nMAIL FROM:<\xc3\xa9@client.test> SMTPUTF8\r\n"
    b"RCPT TO:<b@dest.test>\r\nDATA\r\nSubject: x\r\n\r\n.\r\n",
    "3000-rcpts": b"EHLO x\r\nMAIL FROM:<a@client.test>\r\n"
    + b"".join(b"RCPT TO:<r%d@dest.test>\r\n" % i for i in range(3000))
    + b"DATA\r\nSubject: many\r\n\r\nx\r\n.\r\n",
    "out-of-order": b"DATA\r\nRCPT TO:<b@dest.test>\r\nMAIL FROM:<a@client.test>\r\n"
    b"MAIL FROM:<a@client.test>\r\nEHLO x\r\nDATA\r\n",
    "bogus-flood": b"EHLO x\r\n" + b"BOGUS\r\n" * 20,
    "quit-then-more": b"EHLO x\r\nQUIT\r\nMAIL FROM:<a@client.test>\r\n",
}  # fmt: skip


# -- 1. fuzzed dialogues --------------------------------------------------------------------


def test_fuzzed_dialogues_get_well_formed_replies_and_valid_mail_flows(
    request, relay, sink, events, torture_report
):
    port = relay.port
    counts = {"rounds": 0, "fuzz_acked": 0}
    fuzz_acked: list[str] = []  # queue IDs the fuzz itself got a 250 for
    valid: list[str] = []  # Message-IDs of the valid messages sent alongside

    def inner(payload: bytes) -> None:
        counts["rounds"] += 1
        lines = check_replies(dialogue(port, payload))
        for line in lines:
            match = QUEUED.match(line)
            if match:
                queue_id = match.group(1).decode()
                # Never 250 to DATA unless the message is in the spool.
                (received,) = events.events("received", queue_id=queue_id)
                # ... and never with a control character or non-UTF-8 in the envelope.
                envelope = [received["helo"] or "", received["sender"], *received["recipients"]]
                assert not [a for a in envelope if UNSAFE.search(a)], (envelope, payload[:300])
                fuzz_acked.append(queue_id)
        tag = f"valid-{counts['rounds']}"
        send_valid(port, tag)
        valid.append(f"<{tag}@client.test>")

    fuzzer = given(payload=DIALOGUES)(inner)
    for payload in EXAMPLES.values():
        fuzzer = example(payload=payload)(fuzzer)
    fuzz_settings(request, 8, 200)(fuzzer)()

    wait_until(
        lambda: set(valid) <= message_ids(sink), DEADLINE, "every valid message at the upstream"
    )

    def settled(queue_id: str) -> bool:
        return queue_id in queue_ids_seen(sink) or bool(
            events.events("failed", queue_id=queue_id)
            or events.events("expired", queue_id=queue_id)
        )

    wait_until(
        lambda: all(settled(q) for q in fuzz_acked), DEADLINE, "every acknowledged fuzz message"
    )
    delivered = [q for q in fuzz_acked if q in queue_ids_seen(sink)]
    smuggled = [
        (m.mail_from, m.rcpt_tos)
        for m in list(sink.messages)
        if any(UNSAFE.search(a) for a in [m.mail_from, *m.rcpt_tos])
    ]
    assert not smuggled, smuggled  # nothing unsafe in an envelope upstream
    internal = events.events("internal_error")
    assert not internal, internal[:3]
    torture_report(
        "clients: fuzzed SMTP dialogues",
        rounds=counts["rounds"],
        acknowledged=len(valid) + len(fuzz_acked),
        delivered=len(valid) + len(delivered),
        bounced=len(fuzz_acked) - len(delivered),
        lost=0,
        note=f"{len(fuzz_acked)} of them acknowledged inside the fuzz",
    )


# -- 2. bytes in envelope arguments ----------------------------------------------------------


@st.composite
def hostile_envelopes(draw: st.DrawFn) -> tuple[str, list[bytes]]:
    """(where, the session's lines): one of EHLO, HELO, MAIL or RCPT carries a control
    character or bytes that are not UTF-8, inside its argument; the rest is valid."""
    where = draw(st.sampled_from(["EHLO", "HELO", "MAIL", "RCPT"]))
    clean = st.text(st.characters(whitelist_categories=("Ll", "Nd")), max_size=8)
    piece = draw(HOSTILE_PIECE)
    # Something before and after the piece: aiosmtpd strips white space (TAB, VT...) around
    # an argument.
    hostile = b"a" + draw(clean).encode() + piece + b"x" + draw(clean).encode()
    params = draw(st.sampled_from([b"", b" SMTPUTF8", b" BODY=8BITMIME", b" SIZE=10"]))
    greet = b"EHLO client.test"
    mail = b"MAIL FROM:<a@client.test>"
    rcpt = b"RCPT TO:<b@dest.test>"
    if where in ("EHLO", "HELO"):
        greet = where.encode() + b" " + hostile + b".test"
    elif where == "MAIL":
        mail = b"MAIL FROM:<" + hostile + b"@client.test>" + params
    else:
        rcpt = b"RCPT TO:<" + hostile + b"@dest.test>" + params.replace(b"SMTPUTF8", b"")
    if where == "RCPT" and params == b" SMTPUTF8":
        mail += params
    return where, [greet, mail, rcpt, b"DATA", b"Subject: hostile\r\n\r\nhi\r\n."]


def test_fuzzed_hostile_envelope_is_refused_at_the_command(
    request, relay, sink, events, torture_report
):
    """A control character or non-UTF-8 in EHLO/HELO, MAIL or RCPT: that command gets
    501/553 (with an enhanced code, except EHLO/HELO's own), the message is never
    acknowledged, never spooled, nothing reaches the upstream; valid mail flows on."""
    counts = {"rounds": 0}

    @given(case=hostile_envelopes())
    @example(
        case=(
            "MAIL",
            [
                b"EHLO x",
                b"MAIL FROM:<a\x00@client.test>",
                b"RCPT TO:<b@d.test>",
                b"DATA",
                b"Subject: x\r\n\r\n.",
            ],
        )
    )
    @example(  # inside a comment: the RFC 5322 parser dropped it and took `a`
        case=(
            "MAIL",
            [
                b"EHLO x",
                b"MAIL FROM:<a(\x80x@client.test>",
                b"RCPT TO:<b@d.test>",
                b"DATA",
                b"Subject: x\r\n\r\n.",
            ],
        )
    )
    @example(
        case=(
            "RCPT",
            [
                b"EHLO x",
                b"MAIL FROM:<a@client.test>",
                b"RCPT TO:<b\rc@d.test>",
                b"DATA",
                b"Subject: x\r\n\r\n.",
            ],
        )
    )
    @example(
        case=(
            "EHLO",
            [
                b"EHLO a\x1b[2Jb",
                b"MAIL FROM:<a@client.test>",
                b"RCPT TO:<b@d.test>",
                b"DATA",
                b"Subject: x\r\n\r\n.",
            ],
        )
    )
    def inner(case: tuple[str, list[bytes]]) -> None:
        where, lines = case
        counts["rounds"] += 1
        replies = session(relay.port, *lines)
        finals = [line for line in replies if line[3:4] == b" "]  # one per command
        at = {"EHLO": 1, "HELO": 1, "MAIL": 2, "RCPT": 3}[where]
        assert finals[at][:3] in (b"501", b"553"), (lines, finals)
        if where in ("EHLO", "HELO"):
            assert finals[2][:1] == b"5", (lines, finals)  # no MAIL without a greeting
        assert not [line for line in replies if QUEUED.match(line)], (lines, replies)

    fuzz_settings(request, 12, 500)(inner)()
    assert not events.events("received"), events.events("received")[:3]
    send_valid(relay.port, "after-hostile-envelopes")
    wait_until(lambda: "<after-hostile-envelopes@client.test>" in message_ids(sink), DEADLINE)
    assert len(sink.messages) == 1, [(m.mail_from, m.rcpt_tos) for m in sink.messages]
    assert not events.events("internal_error")
    torture_report(
        "clients: control chars / non-UTF-8 in the envelope",
        rounds=counts["rounds"],
        acknowledged=1,
        delivered=1,
        lost=0,
        note="every hostile EHLO/HELO/MAIL/RCPT refused at the command",
    )


def session(port: int, *lines: bytes) -> list[bytes]:
    """A dialogue of `lines` (each CRLF-ended here), its reply lines checked."""
    return check_replies(dialogue(port, b"".join(line + b"\r\n" for line in lines)))


NON_UTF8 = [
    (b"EHLO \xff\xfe", b"MAIL FROM:<a@client.test>", b"RCPT TO:<b@dest.test>"),
    (b"EHLO x", b"MAIL FROM:<\xc3@client.test> SMTPUTF8", b"RCPT TO:<b@dest.test>"),
    (b"EHLO x", b"MAIL FROM:<a@client.test>", b"RCPT TO:<\xff\xfe@dest.test>"),
]


def test_non_utf8_envelope_is_refused_at_the_command(relay, sink, events):
    for n, (ehlo, mail, rcpt) in enumerate(NON_UTF8):
        lines = session(relay.port, ehlo, mail, rcpt, b"DATA", b"Subject: x\r\n\r\nhi\r\n.")
        internal = events.events("internal_error")
        assert not internal, (ehlo, mail, rcpt, internal)
        # Refused where the bad bytes are (501/553), not at the end of DATA with a 451.
        assert not [line for line in lines if line.startswith(b"451")], lines
        assert [line for line in lines if line[:1] == b"5"], lines
        # And a valid message in a new session still goes through.
        send_valid(relay.port, f"after-non-utf8-{n}")
        wait_until(lambda n=n: f"<after-non-utf8-{n}@client.test>" in message_ids(sink), DEADLINE)


def test_control_characters_in_addresses_are_refused(relay, sink):
    for command in (b"MAIL FROM:<a\x00@client.test>", b"MAIL FROM:<a\x1b@client.test>"):
        lines = session(
            relay.port,
            b"EHLO x",
            command,
            b"RCPT TO:<b@dest.test>",
            b"DATA",
            b"Subject: c\r\n\r\n.",
        )
        finals = [line for line in lines if line[3:4] == b" "]  # 220, EHLO's last, MAIL's...
        tag = f"after-control-{command[12]}"
        send_valid(relay.port, tag)
        wait_until(lambda tag=tag: f"<{tag}@client.test>" in message_ids(sink), DEADLINE)
        smuggled = [
            (m.mail_from, m.rcpt_tos)
            for m in sink.messages
            if any(ord(c) < 32 for c in m.mail_from + "".join(m.rcpt_tos))
        ]
        assert not smuggled, smuggled  # nothing with a control character reached upstream
        assert finals[2][:1] == b"5", finals  # MAIL refused: 501/553 with an enhanced code


def test_c1_control_characters_in_the_envelope_are_refused(relay, events):
    cases = [
        (1, [b"EHLO a\xc2\x9b2Jb.test", b"MAIL FROM:<a@client.test>"]),  # CSI
        (2, [b"EHLO x", b"MAIL FROM:<a\xc2\x9b2J@client.test> SMTPUTF8"]),
        (3, [b"EHLO x", b"MAIL FROM:<a@client.test> SMTPUTF8", b"RCPT TO:<b\xc2\x80@dest.test>"]),
    ]
    wrong = []
    for at, lines in cases:
        finals = [line for line in session(relay.port, *lines) if line[3:4] == b" "]
        if finals[at][:3] not in (b"501", b"553"):
            wrong.append((lines[at - 1], finals[at]))
    assert not wrong, wrong


def test_replies_never_echo_control_characters(relay):
    commands = [b"EHLO\rEHLO", b"X\x00Y", b"X\x1b[2JY", b"VRFY a\rb", b"VRFY \x00\rX"]
    out = dialogue(relay.port, b"EHLO x\r\n" + b"".join(c + b"\r\n" for c in commands))
    lines = out[:-2].split(b"\r\n")
    bad = [line for line in lines if any(c < 32 for c in line)]
    assert not bad, bad


def test_help_error_has_enhanced_code(relay):
    lines = check_replies(dialogue(relay.port, b"EHLO x\r\nHELP FROB\r\n"))
    (error,) = [line for line in lines if line.startswith(b"501")]
    assert ENHANCED.match(error), error


# -- 3. slowloris and floods past max_clients, on the real process ------------------------


def rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise AssertionError("no VmRSS")


def greeting(sock: socket.socket) -> bytes:
    """The first reply line on a fresh connection ("" if closed without one)."""
    data = b""
    while not data.endswith(b"\r\n"):
        chunk = sock.recv(4096)
        if not chunk:
            break
        data += chunk
    return data.split(b"\r\n", 1)[0]


class Slowloris(threading.Thread):
    """Drips one byte every `pace` seconds (a paced fault) and never finishes a line;
    when the relay cuts the session it connects again, for as long as it runs."""

    def __init__(self, port: int, pace: float) -> None:
        super().__init__(name="slowloris")
        self.port = port
        self.pace = pace
        self.halt = threading.Event()
        self.sessions = 0  # sessions it got (220)
        self.cut = 0  # sessions the relay closed
        self.refused = 0  # connections refused with 421 4.7.0
        self.problems: list[str] = []

    def run(self) -> None:
        while not self.halt.is_set():
            with socket.create_connection(("127.0.0.1", self.port), timeout=DEADLINE) as sock:
                first = greeting(sock)
                if first.startswith(b"421 4.7.0 "):
                    self.refused += 1
                    self.halt.wait(self.pace)
                    continue
                if not first.startswith(b"220 "):
                    self.problems.append(f"greeting {first!r}")
                    return
                self.sessions += 1
                self.drip(sock)

    def drip(self, sock: socket.socket) -> None:
        while not self.halt.wait(self.pace):
            try:
                sock.sendall(b"E")
                readable, _, _ = select.select([sock], [], [], 0)
                if readable:
                    rest = sock.recv(4096)
                    if rest and not REPLY_LINE.match(rest.rstrip(b"\r\n")):
                        self.problems.append(f"reply {rest!r}")
                    if not rest or rest.startswith(b"421"):
                        self.cut += 1
                        return
            except OSError:
                self.cut += 1
                return

    def stop(self) -> None:
        self.halt.set()
        self.join(DEADLINE)


class ValidSender(threading.Thread):
    """Sends valid messages one session at a time for as long as it runs; a 421 at the
    greeting (all slots taken) is an answer, counted, and tried again later."""

    def __init__(self, port: int) -> None:
        super().__init__(name="valid-sender")
        self.port = port
        self.halt = threading.Event()
        self.acked: list[str] = []
        self.refused = 0
        self.problems: list[str] = []

    def run(self) -> None:
        n = 0
        while not self.halt.is_set():
            n += 1
            tag = f"during-{n}"
            try:
                send_valid(self.port, tag)
                self.acked.append(f"<{tag}@client.test>")
            except smtplib.SMTPConnectError as exc:
                if exc.smtp_code != 421 or not exc.smtp_error.startswith(b"4.7.0"):
                    self.problems.append(f"refused with {exc.smtp_code} {exc.smtp_error!r}")
                self.refused += 1
                self.halt.wait(0.05)  # pace the retries
            except (OSError, smtplib.SMTPException) as exc:
                self.problems.append(repr(exc))
                return


def test_slowloris_and_flood_past_max_clients(
    tmp_path: Path, sink, relay_process, torture_size, torture_report
):
    max_clients = 5
    config = write_config(tmp_path, sink.port)
    text = config.read_text().replace(
        "[smtp]\n", f'[smtp]\nmax_clients = {max_clients}\ntimeout = "2s"\n', 1
    )
    config.write_text(text)
    load_config(config)  # the test's own config is valid
    proc = relay_process(config).start()
    assert proc.proc is not None and proc.port is not None
    port, pid = proc.port, proc.proc.pid
    rounds = torture_size(2, 10)

    for n in range(5):  # warm up (imports, threads, sessions) before the baseline
        send_valid(port, f"warm-{n}")
    sink.wait_for(5, DEADLINE)
    baseline = rss_kib(pid)

    # An idle session is closed by smtp.timeout (2 s here), freeing its slot; if the
    # relay says anything first, it is a well-formed 421.
    idle = socket.create_connection(("127.0.0.1", port), timeout=DEADLINE)
    assert greeting(idle).startswith(b"220 ")
    rest = b""
    while True:
        chunk = idle.recv(4096)
        if not chunk:
            break
        rest += chunk
    idle.close()
    assert not rest or (rest.startswith(b"421 ") and rest.endswith(b"\r\n")), rest

    slow = [Slowloris(port, 0.2) for _ in range(max_clients - 2)]
    for s in slow:
        s.start()
    sender = ValidSender(port)
    sender.start()
    refused_at_flood = 0
    try:
        for _ in range(rounds):
            # The flood: many connections at once, each holding what it gets, and the
            # ones that got a session throwing 1 MB of junk without a line end.
            flood = []
            for _ in range(100):
                try:
                    flood.append(socket.create_connection(("127.0.0.1", port), timeout=DEADLINE))
                except OSError as exc:
                    pytest.fail(f"the listener stopped accepting: {exc}")
            firsts = [greeting(s) for s in flood]
            for s, first in zip(flood, firsts):
                assert first.startswith((b"220 ", b"421 4.7.0 ")), first
                if first.startswith(b"220 "):
                    s.sendall(b"X" * (1 << 20))
            refused_at_flood += sum(1 for f in firsts if f.startswith(b"421 4.7.0 "))
            assert sum(1 for f in firsts if f.startswith(b"220 ")) <= max_clients
            for s in flood:
                s.close()
            # Slots free again: the valid sender gets served once more.
            before = len(sender.acked)
            wait_until(lambda b=before: len(sender.acked) > b, DEADLINE, "service after a flood")
        wait_until(lambda: len(sender.acked) >= 3, DEADLINE, "valid messages beside slowloris")
        # smtp.timeout runs from the last complete command: dripping bytes does not
        # hold a slot for ever.
        wait_until(lambda: all(s.cut for s in slow), DEADLINE, "the relay to cut slowloris")
    finally:
        sender.halt.set()
        sender.join(DEADLINE)
        for s in slow:
            s.stop()
    assert not sender.problems, sender.problems
    assert not [p for s in slow for p in s.problems], [s.problems for s in slow]
    assert refused_at_flood > 0  # the flood went past the limit and was told so

    acked = set(sender.acked)
    wait_until(lambda: acked <= message_ids(sink), DEADLINE, "every acknowledged message")
    after = rss_kib(pid)
    assert after - baseline < 50 * 1024, (baseline, after)
    records = proc.records()
    assert not [r for r in records if r.get("event") in ("internal_error", "<not json>")]
    assert [r for r in records if r.get("event") == "rejected" and r.get("status") == "4.7.0"]
    assert proc.stop() == 0
    torture_report(
        "clients: slowloris + connection floods",
        rounds=rounds,
        acknowledged=len(acked),
        delivered=len(acked & message_ids(sink)),
        lost=len(acked - message_ids(sink)),
        note=f"{refused_at_flood} flood connections got 421 4.7.0, "
        f"{sum(s.cut for s in slow)} slowloris sessions cut; "
        f"RSS {baseline // 1024}->{after // 1024} MiB",
    )
