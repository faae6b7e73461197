"""RFC 3464 reports: structure, fields, the returned original, xtext, NOTIFY, and a real
bounce processor (flufl.bounce) reading what dsn.py writes."""

from __future__ import annotations

import email
import email.policy
from email.message import Message
from email.utils import parsedate_to_datetime

import pytest
from flufl.bounce import all_failures, scan_message

from smarthost.dsn import (
    DELAYED,
    FAILED,
    RELAYED,
    build_dsn,
    wants_dsn,
    xtext_decode,
    xtext_encode,
)
from smarthost.spool import Envelope, Recipient

NOW = 1_700_000_200.0
ARRIVAL = 1_700_000_000.0
UPDATED = 1_700_000_100.0
RETRY_UNTIL = 1_700_400_000.0
MTA = "relay.example.com"
DAEMON = "MAILER-DAEMON@relay.example.com"
BODY_LINE = "Grüße aus Köln — 8-bit body".encode()
ORIGINAL = (
    b"Received: from client.example ([192.0.2.1])\r\n"
    b"\tby relay.example.com; Tue, 14 Nov 2023 22:13:20 +0000\r\n"
    b"From: Alice <alice@sender.example>\r\n"
    b"To: user@example.com\r\n"
    b"Subject: quarterly report\r\n"
    b"Message-ID: <orig-1@sender.example>\r\n"
    b"MIME-Version: 1.0\r\n"
    b"Content-Type: text/plain; charset=utf-8\r\n"
    b"Content-Transfer-Encoding: 8bit\r\n"
    b"\r\n" + BODY_LINE + b"\r\n"
    b"From the start of a line\r\n"
)
ASCII_ORIGINAL = b"From: a@sender.example\r\nSubject: plain\r\n\r\njust ascii\r\n"
ORCPT = "rfc822;User@Example.COM"

# What each outcome looks like on a recipient, as the scheduler records it.
OUTCOMES = {
    FAILED: ("failed", "550 5.1.1 <user@example.com>: no such user", "5.1.1"),
    DELAYED: ("deferred", "450 4.2.0 mailbox busy, try later", "4.2.0"),
    RELAYED: ("delivered", "250 2.0.0 Ok: queued as 4Fq2", "2.0.0"),
}
STATUS = {FAILED: "5.1.1", DELAYED: "4.2.0", RELAYED: "2.0.0"}
SUBJECT = {
    FAILED: "Undelivered Mail Returned to Sender",
    DELAYED: "Delayed Mail (still being retried)",
    RELAYED: "Successful Mail Delivery Report (relayed)",
}


def envelope(ret: str | None = None, envid: str | None = None, **kw) -> Envelope:
    fields = dict(
        id="0123456789ABCDEF",
        sender="alice@sender.example",
        recipients=[Recipient("user@example.com")],
        arrival=ARRIVAL,
        message_id="<orig-1@sender.example>",
        ret=ret,
        envid=envid,
    )
    fields.update(kw)
    return Envelope(**fields)


def recipient(
    action: str, address: str = "user@example.com", orcpt: str | None = None, **kw
) -> Recipient:
    state, reply, status = OUTCOMES[action]
    fields = dict(
        state=state,
        reply=reply,
        status=status,
        backend="primary",
        remote_mta="mx1.upstream.example",
        orcpt=orcpt,
        updated=UPDATED,
    )
    fields.update(kw)
    return Recipient(address, **fields)


def build(env: Envelope, rcpts: list[Recipient], action: str, original=ORIGINAL, **kw) -> bytes:
    args = dict(
        reporting_mta=MTA,
        from_address=DAEMON,
        return_max=1_000_000,
        now=NOW,
        dsn_id="DSNID0123456789A",
        will_retry_until=RETRY_UNTIL if action == DELAYED else None,
    )
    args.update(kw)
    return build_dsn(env, rcpts, action, original, **args)


def parse(data: bytes) -> Message:
    return email.message_from_bytes(data, policy=email.policy.default)


def report(msg: Message) -> tuple[Message, list[Message]]:
    """The per-message block and the per-recipient blocks of the delivery-status part."""
    status = msg.get_payload()[1]
    assert status.get_content_type() == "message/delivery-status"
    blocks = status.get_payload()
    return blocks[0], blocks[1:]


def epoch(value: str) -> float:
    return parsedate_to_datetime(str(value)).timestamp()


# -- the whole matrix: action x RET x ORCPT x ENVID ----------------------------------


@pytest.mark.parametrize("envid", [None, "QQ+314159 batch=7"])
@pytest.mark.parametrize("orcpt", [None, ORCPT])
@pytest.mark.parametrize("ret", ["FULL", "HDRS", None])
@pytest.mark.parametrize("action", [FAILED, DELAYED, RELAYED])
def test_report_structure_and_fields(action, ret, orcpt, envid):
    data = build(envelope(ret=ret, envid=envid), [recipient(action, orcpt=orcpt)], action)
    assert b"\n" not in data.replace(b"\r\n", b""), "every line ends in CRLF"
    msg = parse(data)

    assert msg.get_content_type() == "multipart/report"
    assert msg.get_param("report-type") == "delivery-status"
    assert [p.get_content_type() for p in msg.get_payload()] == [
        "text/plain",
        "message/delivery-status",
        "text/rfc822-headers" if ret == "HDRS" else "message/rfc822",
    ]
    assert msg["From"] == f"Mail Delivery System <{DAEMON}>"
    assert msg["To"].addresses[0].addr_spec == "alice@sender.example"
    assert msg["Subject"] == SUBJECT[action]
    assert msg["Auto-Submitted"] == "auto-replied"
    assert msg["MIME-Version"] == "1.0"
    assert all("MIME-Version" not in part for part in msg.get_payload())  # top level only
    assert msg["Message-ID"] == f"<DSNID0123456789A@{MTA}>"
    assert msg["In-Reply-To"] == msg["References"] == "<orig-1@sender.example>"
    assert epoch(msg["Date"]) == NOW

    per_message, (block,) = report(msg)
    assert per_message["Reporting-MTA"] == f"dns; {MTA}"
    assert epoch(per_message["Arrival-Date"]) == ARRIVAL
    if envid is None:
        assert "Original-Envelope-Id" not in per_message
    else:  # RFC 3461 §6.3 (a): the ENVID as the client meant it, xtext decoded
        assert per_message["Original-Envelope-Id"] == "QQ+314159 batch=7"

    if orcpt is None:
        assert "Original-Recipient" not in block
    else:
        assert block["Original-Recipient"] == "rfc822;User@Example.COM"
    assert block["Final-Recipient"] == "rfc822; user@example.com"
    assert block["Action"] == action
    assert block["Status"] == STATUS[action]
    assert block["Remote-MTA"] == "dns; mx1.upstream.example"
    assert block["Diagnostic-Code"] == f"smtp; {OUTCOMES[action][1]}"
    assert epoch(block["Last-Attempt-Date"]) == UPDATED
    if action == DELAYED:
        assert epoch(block["Will-Retry-Until"]) == RETRY_UNTIL
    else:
        assert "Will-Retry-Until" not in block

    returned = msg.get_payload()[2]
    if ret == "HDRS":
        headers = returned.get_payload(decode=True)
        assert b"Subject: quarterly report\r\n" in headers
        assert BODY_LINE not in headers and BODY_LINE not in data
    else:
        inner = returned.get_payload()[0]
        assert inner["Subject"] == "quarterly report"
        assert ORIGINAL in data, "the original is returned byte for byte"


@pytest.mark.parametrize("action", [FAILED, DELAYED, RELAYED])
def test_larger_than_return_max_goes_back_as_headers_only(action):
    rcpts = [recipient(action)]
    at_limit = parse(build(envelope(ret="FULL"), rcpts, action, return_max=len(ORIGINAL)))
    assert at_limit.get_payload()[2].get_content_type() == "message/rfc822"

    data = build(envelope(ret="FULL"), rcpts, action, return_max=len(ORIGINAL) - 1)
    msg = parse(data)
    returned = msg.get_payload()[2]
    assert returned.get_content_type() == "text/rfc822-headers"
    assert b"Message-ID: <orig-1@sender.example>" in returned.get_payload(decode=True)
    if action == FAILED:
        text = " ".join(msg.get_payload()[0].get_content().split())
        assert "Its header section is attached below." in text
    assert BODY_LINE not in data


def test_human_part_explains_each_outcome():
    def text(action, **kw):
        rcpts = [recipient(action, **kw)]
        part = parse(build(envelope(), rcpts, action)).get_payload()[0]
        assert part.get_content_type() == "text/plain"
        assert part.get_content_charset() == "utf-8"
        content = part.get_content()
        prose = content.split("The mail system\r\n")[0]
        assert all(len(line) <= 72 for line in prose.splitlines())
        return " ".join(content.split())  # paragraphs are wrapped

    failed = text(FAILED)
    assert "could not be delivered" in failed and "It is attached below." in failed
    assert "<user@example.com>: host mx1.upstream.example said: 550 5.1.1" in failed
    delayed = text(DELAYED)
    assert "# THIS IS A WARNING ONLY. YOU DO NOT NEED TO RESEND YOUR MESSAGE. #" in delayed
    assert "until Sun, 19 Nov 2023 13:20:00 +0000" in delayed
    assert "mailbox busy" in delayed
    assert "successfully relayed" in text(RELAYED)
    expired = text(FAILED, status="4.4.7", reply="451 4.3.0 try again later")
    assert "delivery time expired" in expired and "451 4.3.0 try again later" in expired
    assert "no reply from any server" in text(FAILED, reply=None, remote_mta=None)
    assert "said: 550 5.7.1 a? b" in text(FAILED, reply="550 5.7.1 a\x00 b")


def test_the_relays_own_refusal_names_no_remote_mta():
    """A recipient the relay refused itself (no SMTPUTF8 upstream): the reporting MTA
    said it, so no Remote-MTA and no "host ... said", but still an SMTP diagnostic."""
    own = "553 5.6.7 the upstream does not offer SMTPUTF8, which this message needs"
    rcpt = recipient(FAILED, reply=own, status="5.6.7", remote_mta=None)
    msg = parse(build(envelope(), [rcpt], FAILED))
    _, (block,) = report(msg)
    assert "Remote-MTA" not in block
    assert block["Diagnostic-Code"] == f"smtp; {own}"
    assert block["Status"] == "5.6.7"
    text = " ".join(msg.get_payload()[0].get_content().split())
    assert f"<user@example.com>: this mail system ({MTA}) refused it itself: {own}" in text
    assert " said:" not in text


def test_expiry_keeps_4_4_7_and_the_last_reply():
    rcpt = recipient(FAILED, status="4.4.7", reply="421 4.4.2 connection dropped")
    _, (block,) = report(parse(build(envelope(), [rcpt], FAILED)))
    assert block["Action"] == "failed"
    assert block["Status"] == "4.4.7"
    assert block["Diagnostic-Code"] == "smtp; 421 4.4.2 connection dropped"


# -- several recipients, optional fields ---------------------------------------------


def test_one_block_per_recipient_in_order():
    rcpts = [
        recipient(FAILED, "first@example.com", orcpt="rfc822;First@Example.com"),
        recipient(FAILED, "second@example.com", remote_mta=None, updated=None),
        recipient(FAILED, "third@example.net", reply=None, status=None, remote_mta=None),
    ]
    data = build(envelope(), rcpts, FAILED)
    _, blocks = report(parse(data))
    assert [b["Final-Recipient"] for b in blocks] == [
        "rfc822; first@example.com",
        "rfc822; second@example.com",
        "rfc822; third@example.net",
    ]
    first, second, third = blocks
    assert first["Original-Recipient"] == "rfc822;First@Example.com"
    assert "Original-Recipient" not in second and "Original-Recipient" not in third
    assert "Remote-MTA" not in second
    assert second["Diagnostic-Code"] == "smtp; 550 5.1.1 <user@example.com>: no such user"
    assert epoch(second["Last-Attempt-Date"]) == NOW  # never tried: the report's time
    assert "Diagnostic-Code" not in third and "Remote-MTA" not in third
    assert third["Status"] == "5.0.0"
    assert all(b["Action"] == "failed" for b in blocks)


@pytest.mark.parametrize(
    ("action", "status", "reply", "expected"),
    [
        (FAILED, None, "554 transaction failed", "5.0.0"),
        (FAILED, "bogus", "550 no", "5.0.0"),
        (DELAYED, None, "451 local problem", "4.0.0"),
        (DELAYED, None, None, "4.0.0"),
        (RELAYED, None, "250 ok", "2.0.0"),
        (RELAYED, "2.1.5", "250 2.1.5 ok", "2.1.5"),
        (RELAYED, "5.1.1", None, "2.0.0"),
    ],
)
def test_status_falls_back_to_the_reply_class_or_the_action(action, status, reply, expected):
    rcpt = recipient(action, status=status, reply=reply)
    _, (block,) = report(parse(build(envelope(), [rcpt], action)))
    assert block["Status"] == expected


def test_delayed_without_a_deadline_has_no_will_retry_until():
    data = build(envelope(), [recipient(DELAYED)], DELAYED, will_retry_until=None)
    _, (block,) = report(parse(data))
    assert "Will-Retry-Until" not in block
    text = parse(data).get_payload()[0].get_content()
    assert "keep trying for a while" in " ".join(text.split())


def test_no_threading_headers_without_a_usable_message_id():
    for message_id in (None, "", "no brackets here"):
        msg = parse(build(envelope(message_id=message_id), [recipient(FAILED)], FAILED))
        assert "In-Reply-To" not in msg and "References" not in msg
    msg = parse(build(envelope(message_id="(comment) <x@y>"), [recipient(FAILED)], FAILED))
    assert msg["In-Reply-To"] == "<x@y>"


# -- field values: decoding, sanitising, folding -------------------------------------


def test_envid_and_orcpt_are_written_decoded_or_xtext_when_unprintable():
    env = envelope(envid="id\x01é")
    rcpts = [
        recipient(FAILED, "a+tag@example.com", orcpt="rfc822;a+tag=x@example.com"),
        recipient(FAILED, "b@example.com", orcpt="rfc822;b\tc@example.com"),
        recipient(FAILED, "c@example.com", orcpt="no-type-here"),
    ]
    per_message, blocks = report(parse(build(env, rcpts, FAILED)))
    assert per_message["Original-Envelope-Id"] == "id+01+C3+A9"
    assert [b["Original-Recipient"] for b in blocks] == [
        "rfc822;a+tag=x@example.com",
        "rfc822;b+09c@example.com",
        "unknown;no-type-here",
    ]
    assert blocks[0]["Final-Recipient"] == "rfc822; a+tag@example.com"


def test_replies_cannot_break_the_report():
    reply = "550-5.7.1 first line\r\n550 5.7.1 second\x00 line é\r\nInjected: yes"
    data = build(envelope(), [recipient(FAILED, reply=reply)], FAILED)
    _, (block,) = report(parse(data))
    assert block["Diagnostic-Code"] == (
        "smtp; 550-5.7.1 first line 550 5.7.1 second? line ? Injected: yes"
    )
    assert "Injected" not in block


def test_a_local_error_is_not_called_an_smtp_reply():
    reply = "ConnectionRefusedError: [Errno 111] Connection refused"
    data = build(envelope(), [recipient(FAILED, reply=reply)], FAILED)
    _, (block,) = report(parse(data))
    assert block["Diagnostic-Code"] == f"X-Smarthost; {reply}"


def test_long_fields_are_folded_and_unfold_to_the_same_text():
    reply = "550 5.1.1 " + " ".join(f"word{i}" for i in range(60))
    data = build(envelope(), [recipient(FAILED, reply=reply)], FAILED)
    start = data.index(b"Content-Type: message/delivery-status")
    status_text = data[start : data.index(b"message/rfc822")]
    assert all(len(line) <= 78 for line in status_text.split(b"\r\n"))
    _, (block,) = report(parse(data))
    assert block["Diagnostic-Code"] == f"smtp; {reply}"


def test_smtputf8_addresses():
    env = envelope(sender="jörg@bücher.example")
    rcpt = recipient(FAILED, "λ+x@例え.jp")
    data = build(env, [rcpt], FAILED)
    assert "To: <jörg@bücher.example>\r\n".encode() in data  # RFC 6532, not RFC 2047
    _, (block,) = report(parse(data))
    # RFC 6533 utf-8-addr-xtext keeps the delivery-status part US-ASCII.
    assert block["Final-Recipient"] == "utf-8; \\x{3BB}\\x{2B}x@\\x{4F8B}\\x{3048}.jp"
    assert (
        parse(data)
        .get_payload()[0]
        .get_content()
        .endswith(
            "<λ+x@例え.jp>: host mx1.upstream.example said: 550 5.1.1 "
            "<user@example.com>: no such user\r\n"
        )
    )


# -- the returned original -----------------------------------------------------------


def test_8bit_original_survives_byte_for_byte():
    data = build(envelope(), [recipient(FAILED)], FAILED)
    assert BODY_LINE in data
    assert b"\r\n\r\n" + ORIGINAL + b"\r\n--" in data  # whole, unchanged, not ">From"-mangled
    msg = parse(data)
    assert msg["Content-Transfer-Encoding"] == "8bit"
    returned = msg.get_payload()[2]
    assert returned["Content-Transfer-Encoding"] == "8bit"
    assert returned.get_payload()[0].get_payload(decode=True).startswith(BODY_LINE)


def test_ascii_original_gives_a_7bit_report():
    data = build(envelope(), [recipient(FAILED)], FAILED, original=ASCII_ORIGINAL)
    assert data.isascii()
    assert b"Content-Transfer-Encoding: 8bit" not in data
    assert b"\r\n\r\n" + ASCII_ORIGINAL + b"\r\n--" in data


def test_headers_only_keeps_8bit_headers_and_drops_the_body():
    original = "Subject: Grüße\r\nFrom: a@b.example\r\n\r\nbody line\r\n".encode()
    data = build(envelope(ret="HDRS"), [recipient(FAILED)], FAILED, original=original)
    returned = parse(data).get_payload()[2]
    assert returned["Content-Transfer-Encoding"] == "8bit"
    assert "Subject: Grüße\r\nFrom: a@b.example\r\n".encode() in data
    assert b"body line" not in data


@pytest.mark.parametrize(
    ("original", "headers"),
    [
        (b"Subject: headers only\r\n", b"Subject: headers only\r\n"),
        (b"Subject: lf\n\nbody\n", b"Subject: lf\r\n"),
        (b"\r\nbody without header\r\n", b""),
        # An mbox "From " line (sendmail -t): kept as it is, not ">From".
        (
            b"From alice Tue Nov 14\r\nSubject: s\r\n\r\nbody\r\n",
            b"From alice Tue Nov 14\r\nSubject: s\r\n",
        ),
    ],
)
def test_header_section_edge_cases(original, headers):
    data = build(envelope(ret="HDRS"), [recipient(FAILED)], FAILED, original=original)
    returned = parse(data).get_payload()[2]
    assert returned.get_content_type() == "text/rfc822-headers"
    assert returned.get_payload(decode=True) == headers
    assert b"body" not in data.split(b"text/rfc822-headers", 1)[1]


def test_boundary_never_occurs_in_the_returned_message():
    first = build(envelope(), [recipient(FAILED)], FAILED)
    boundary = parse(first).get_boundary()
    tricky = ORIGINAL + b"--" + boundary.encode() + b"--\r\n"
    data = build(envelope(), [recipient(FAILED)], FAILED, original=tricky)
    msg = parse(data)
    assert msg.get_boundary() != boundary
    assert len(msg.get_payload()) == 3
    assert b"\r\n\r\n" + tricky + b"\r\n--" in data


def test_same_inputs_same_bytes():
    rcpts = [recipient(DELAYED)]
    assert build(envelope(), rcpts, DELAYED) == build(envelope(), rcpts, DELAYED)


# -- refusals ------------------------------------------------------------------------


def test_refuses_what_must_not_be_reported():
    with pytest.raises(ValueError, match="null sender"):
        build(envelope(sender=""), [recipient(FAILED)], FAILED)
    with pytest.raises(ValueError, match="at least one recipient"):
        build(envelope(), [], FAILED)
    with pytest.raises(ValueError, match="unknown DSN action"):
        build(envelope(), [recipient(FAILED)], "delivered")


# -- xtext ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("plain", "encoded"),
    [
        ("", ""),
        ("user@example.com", "user@example.com"),
        ("a+b=c", "a+2Bb+3Dc"),
        ("sp ace", "sp+20ace"),
        ("é", "+C3+A9"),
        ("\x00\x1f\x7f\r\n", "+00+1F+7F+0D+0A"),
        ("~!\\", "~!\\"),
    ],
)
def test_xtext_round_trip(plain, encoded):
    assert xtext_encode(plain) == encoded
    assert xtext_decode(encoded) == plain
    assert all(33 <= ord(c) <= 126 and c != "=" for c in encoded)


def test_xtext_decode_accepts_lower_case_hex():
    assert xtext_decode("a+2bb+3dc") == "a+b=c"


@pytest.mark.parametrize(
    "bad", ["+", "+4", "ab+4G", "+-1", "a=b", "sp ace", "é", "tab\t", "\x7f", "+FF", "+C3"]
)
def test_xtext_decode_rejects_malformed(bad):
    with pytest.raises(ValueError, match="malformed xtext"):
        xtext_decode(bad)


# -- NOTIFY --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("notify", "failed", "delayed", "relayed"),
    [
        (None, True, True, False),
        ("NEVER", False, False, False),
        ("never", False, False, False),
        ("NEVER,FAILURE", False, False, False),  # illegal (RFC 3461 §4.1): NEVER wins
        ("SUCCESS", False, False, True),
        ("FAILURE", True, False, False),
        ("DELAY", False, True, False),
        ("SUCCESS,FAILURE", True, False, True),
        ("FAILURE,DELAY", True, True, False),
        ("success, delay", False, True, True),
        ("SUCCESS,FAILURE,DELAY", True, True, True),
    ],
)
def test_wants_dsn(notify, failed, delayed, relayed):
    rcpt = Recipient("user@example.com", notify=notify)
    assert wants_dsn(rcpt, FAILED) is failed
    assert wants_dsn(rcpt, DELAYED) is delayed
    assert wants_dsn(rcpt, RELAYED) is relayed


def test_wants_dsn_refuses_an_unknown_action():
    with pytest.raises(ValueError):
        wants_dsn(Recipient("user@example.com"), "delivered")


# -- a real bounce processor ---------------------------------------------------------

PARSERS = {
    "compat32": email.message_from_bytes,
    "default": parse,
}


@pytest.mark.parametrize("parser", sorted(PARSERS))
@pytest.mark.parametrize("ret", ["FULL", "HDRS"])
def test_flufl_bounce_reads_a_failure(parser, ret):
    rcpts = [
        recipient(FAILED, "user@example.com"),
        recipient(FAILED, "gone@example.net", orcpt="rfc822;Gone@Example.NET"),
    ]
    msg = PARSERS[parser](build(envelope(ret=ret), rcpts, FAILED))
    temporary, permanent = all_failures(msg)
    # flufl.bounce prefers Original-Recipient, as the sender wrote it, to Final-Recipient.
    assert permanent == {b"user@example.com", b"Gone@Example.NET"}
    assert temporary == set()
    assert scan_message(msg) == {b"user@example.com", b"Gone@Example.NET"}


@pytest.mark.parametrize("parser", sorted(PARSERS))
def test_flufl_bounce_reads_a_delay_as_temporary(parser):
    msg = PARSERS[parser](build(envelope(), [recipient(DELAYED)], DELAYED))
    assert all_failures(msg) == ({b"user@example.com"}, set())
    assert scan_message(msg) == set()


@pytest.mark.parametrize("parser", sorted(PARSERS))
def test_flufl_bounce_sees_no_failure_in_a_relayed_report(parser):
    msg = PARSERS[parser](build(envelope(), [recipient(RELAYED)], RELAYED))
    assert all_failures(msg) == (set(), set())
    assert scan_message(msg) == set()
