"""Rewriting (smarthost.rewrite, submission.prepare): unqualified addresses completed
with @hostname before aliases and masquerading, and the force_from guarantee (exactly
one From leaves, or the message is refused with 554 5.6.0 / exit 65).

Unit tests on the functions, then end to end: the relay in-process, a real aiosmtpd
upstream (the `sink`), SMTP clients on real sockets and `smarthost sendmail` as a real
subprocess."""

from __future__ import annotations

import email
import email.policy
import os
import pwd
import re
import secrets
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from smarthost import headers
from smarthost.config import RewriteConfig, load_config
from smarthost.rewrite import (
    HeaderInDoubt,
    _plainly_qualified,
    addr_specs,
    force_header_from,
    qualify_header_addresses,
    rewrite,
)
from smarthost.spool import Envelope, Recipient
from smarthost.submission import Refused, UnreadableHeader, prepare

from support.cli import sendmail
from support.configs import write_config
from support.sink import Received, Sink
from support.smtp import RawSMTP

HOST = "relay.test"  # write_config's hostname
FORCED = "relay@example.com"
CEO = b"ceo@bank.example"
REFUSAL = "554 5.6.0 Error: the message header cannot be read without doubt (force_from)"

# Issue 14 item 2: the four layouts that left the client's own From upstream.
LAYOUTS = {
    "two-from-fields": [b"From: Alice <alice@client.test>", b"From: " + CEO],
    "bare-cr-in-an-earlier-header": [b"X-Note: one\rtwo", b"From: " + CEO],
    "non-header-line-before-from": [b"this line is no header field", b"From: " + CEO],
    "8bit-header-name-before-from": [b"X-\xc3\x9cbersicht: ja", b"From: " + CEO],
}
# Lines another reader may take for a From field that ours does not: refused.
HIDDEN_FROM = {
    "from-after-a-bare-cr": b"X-Note: one\rFrom: " + CEO,
    "byte-order-mark": b"\xef\xbb\xbfFrom: " + CEO,
    "nul-in-the-name": b"From\x00: " + CEO,
}


def token() -> str:
    return secrets.token_hex(6)


def block(lines: list[bytes], end: bytes = b"\r\n") -> bytes:
    return b"".join(line + end for line in lines)


# -- what each kind of reader finds ------------------------------------------------------


def lenient_froms(content: bytes) -> list[bytes]:
    """From fields as the most lenient reader finds them: every CR, LF or CRLF a line
    end, the header to the first empty line, every line with a colon a field whose name
    is read without white space, controls or 8-bit bytes."""
    found = []
    for line in re.split(rb"\r\n|\r|\n", content):
        if not line:
            break
        name, colon, value = line.partition(b":")
        if colon and re.sub(rb"[^!-~]", b"", name).lower() == b"from":
            found.append(value.strip())
    return found


def strict_froms(content: bytes) -> list[str]:
    """From fields as Python's parser finds them: it stops at the first line that is
    not a field (a reader that stops early)."""
    return email.message_from_bytes(content, policy=email.policy.compat32).get_all("From") or []


def assert_one_forced_from(content: bytes) -> None:
    assert lenient_froms(content) == [FORCED.encode()], content[:600]
    assert strict_froms(content) == [FORCED], content[:600]
    assert [f.value for f in headers.read(content).find("from")] == [FORCED.encode()]


# -- unit: force_from ----------------------------------------------------------------------


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_force_from_leaves_exactly_one_from_for_each_layout(layout: str) -> None:
    content = block([b"Subject: s", *LAYOUTS[layout], b"To: x@dest.test"]) + b"\r\nbody\r\n"
    changes: list[str] = []
    out = force_header_from(content, FORCED, changes)
    assert_one_forced_from(out)
    # The first From's value moves to Reply-To; the rest of the header is kept.
    first = LAYOUTS[layout][0] if layout == "two-from-fields" else b"From: " + CEO
    assert [f.value for f in headers.read(out).find("reply-to")] == [first[6:]]
    assert out.endswith(b"To: x@dest.test\r\n\r\nbody\r\n")
    assert b"Subject: s\r\n" in out
    assert any(c.endswith(f"-> {FORCED} (force_from)") for c in changes), changes


def test_several_from_fields_are_all_removed_and_reply_to_is_kept() -> None:
    content = block([b"From: a@x.test", b"Reply-To: list@x.test", b"From: b@x.test"])
    out = force_header_from(content, FORCED, [])
    assert out == block([b"From: " + FORCED.encode(), b"Reply-To: list@x.test"])


def test_force_from_where_the_only_from_is_already_the_forced_one() -> None:
    content = block([b"From: <relay@example.com>", b"Subject: s"])
    assert force_header_from(content, FORCED, []) is content
    added = force_header_from(b"Subject: s\r\n", FORCED, [])
    assert added == b"From: relay@example.com\r\nSubject: s\r\n"
    # Also when the header has no field at all (the receiver's block may be empty).
    assert force_header_from(b"", FORCED, []) == b"From: relay@example.com\r\n"


def test_the_forced_from_goes_before_a_doubtful_line() -> None:
    content = block([b"Subject: s", b"no field here", b"From: " + CEO]) + b"\r\nbody"
    out = force_header_from(content, FORCED, [])
    assert out.startswith(b"From: relay@example.com\r\nReply-To: ceo@bank.example\r\n")
    clean = block([b"Subject: s", b"From: " + CEO, b"To: t@x.test"])
    assert force_header_from(clean, FORCED, []) == block(
        [b"Subject: s", b"From: relay@example.com", b"Reply-To: ceo@bank.example", b"To: t@x.test"]
    )  # nothing doubtful before it: in the old one's place


@pytest.mark.parametrize("layout", list(HIDDEN_FROM))
def test_a_from_we_cannot_read_without_doubt_is_refused(layout: str) -> None:
    content = block([b"Subject: s", HIDDEN_FROM[layout], b"From: a@x.test"]) + b"\r\nbody"
    with pytest.raises(HeaderInDoubt, match="may be read as a From field"):
        force_header_from(content, FORCED, [])
    config = RewriteConfig(force_from=FORCED)
    with pytest.raises(HeaderInDoubt):
        rewrite(config, HOST, "a@x.test", ["b@y.test"], content)
    # Without force_from, nothing is refused for the way the header is written.
    assert rewrite(RewriteConfig(), HOST, "a@x.test", ["b@y.test"], content).content is content


def test_a_header_block_not_read_to_its_end_is_refused() -> None:
    pad = b"X-Pad: " + b"y" * 1000 + b"\r\n"
    content = pad * (headers.MAX_BLOCK // len(pad) + 1) + b"From: " + CEO + b"\r\n\r\nbody"
    with pytest.raises(HeaderInDoubt, match="longer than"):
        force_header_from(content, FORCED, [])


def test_what_rewriting_adds_does_not_count_against_the_bound() -> None:
    pad = b"X-Pad: " + b"y" * 1000 + b"\r\n"
    to = b"To: a\r\n" * 300
    content = pad * ((headers.MAX_BLOCK - len(to) - 1000) // len(pad)) + to + b"From: a@x.test\r\n"
    assert not headers.read(content).cut
    out = rewrite(RewriteConfig(force_from=FORCED), HOST, "a@x.test", ["b@y.test"], content)
    assert len(out.content) > headers.MAX_BLOCK
    assert out.content.count(b"To: a@relay.test\r\n") == 300
    assert [f.value for f in headers.read(out.content, len(out.content)).find("from")] == [
        FORCED.encode()
    ]
    assert "290 more header fields (qualified)" in out.changes  # ten named, then a count
    assert out.changes[-1] == f"header From: a@x.test -> {FORCED} (force_from)"


# -- unit: submission.prepare --------------------------------------------------------------


def submitted(sender: str = "alice@client.test", *rcpts: str) -> Envelope:
    return Envelope(
        id="1TESTQUEUEID0000",
        sender=sender,
        recipients=[Recipient(address=a) for a in (rcpts or ("x@dest.test",))],
        arrival=0.0,
        source="local",
    )


@pytest.fixture
def forcing(tmp_path: Path) -> object:
    return load_config(write_config(tmp_path, 25, f'[rewrite]\nforce_from = "{FORCED}"'))


@pytest.mark.parametrize("layout", list(HIDDEN_FROM))
def test_prepare_refuses_with_554_5_6_0_and_exit_65(forcing, layout: str) -> None:
    content = block([b"Subject: s", HIDDEN_FROM[layout]]) + b"\r\nbody\r\n"
    with pytest.raises(UnreadableHeader) as caught:
        prepare(forcing, submitted(), b"Received: x\r\n", content)
    assert isinstance(caught.value, Refused)
    assert caught.value.reply == REFUSAL
    assert caught.value.exit_code == 65


def test_prepare_refuses_a_block_the_door_cut_short_only_with_force_from(forcing, config) -> None:
    content = block([b"Subject: s", b"From: a@x.test"])
    with pytest.raises(UnreadableHeader):
        prepare(forcing, submitted(), b"Received: x\r\n", content, complete=False)
    _, parts = prepare(config, submitted(), b"Received: x\r\n", content, complete=False)
    assert parts[1] == content


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_prepare_whole_local_message_with_bare_cr_and_lf(forcing, layout: str) -> None:
    """The drop area's content is the whole message, and may hold bare CRs and LFs."""
    content = block([b"Subject: s", *LAYOUTS[layout]], b"\n") + b"\nbody\nFrom: body@x.test\n"
    env, parts = prepare(forcing, submitted(), b"Received: x\r\n", content)
    out = b"".join(parts)
    assert env.sender == FORCED
    assert_one_forced_from(out)
    assert out.endswith(b"\nbody\nFrom: body@x.test\n")  # the body is not the header


# -- unit: unqualified addresses ----------------------------------------------------------


def test_unqualified_envelope_addresses_get_the_hostname() -> None:
    out = rewrite(RewriteConfig(), HOST, "cron", ["root", "bob@x.test", '"a@b"'], b"")
    assert out.sender == "cron@relay.test"
    assert out.recipients == ["root@relay.test", "bob@x.test", '"a@b"@relay.test']
    assert "sender cron -> cron@relay.test (qualified)" in out.changes
    assert "recipient root -> root@relay.test (qualified)" in out.changes
    assert rewrite(RewriteConfig(), HOST, "", ["a@x.test"], b"").sender == ""  # null sender


# Field bodies built from what matters to the address parser: specials, quotes,
# comments, white space, words with and without "@".
_FIELD_PIECES = st.sampled_from(
    [
        b"a",
        b"bob",
        b"x.test",
        b"@",
        b"<",
        b">",
        b" ",
        b"\r\n\t",
        b",",
        b";",
        b":",
        b'"',
        b"(c)",
        b"\\",
        b".",
        b"[1.2.3.4]",
        b"\x0b",
        b"J\xc3\xb6rg",
        b"=?utf-8?q?a?=",
    ]
)


@settings(max_examples=400, deadline=None)
@given(st.lists(_FIELD_PIECES, max_size=12).map(b"".join))
def test_a_field_taken_as_plainly_qualified_is_one_the_parser_leaves_alone(body: bytes) -> None:
    """The fast path (one `Name <local@domain>` or `local@domain`) may only skip what
    the full parse would not have qualified."""
    content = b"To:" + body + b"\r\n\r\n"
    (field_,) = headers.read(content).fields
    if _plainly_qualified(content, field_):
        changes: list[str] = []
        edits = [spec for spec in addr_specs(content, field_) if spec.at is None]
        assert edits == [], (body, edits)
        assert qualify_header_addresses(content, "relay.test", changes) == content


def test_common_fields_take_the_fast_path_and_unqualified_ones_do_not() -> None:
    for body in (b" Bench Load <load@client.example>", b" load@client.example", b" <a@b>"):
        content = b"From:" + body + b"\r\n\r\n"
        assert _plainly_qualified(content, headers.read(content).fields[0]), body
    for body in (b" Bob <bob>", b" root", b" a@b, c", b' "a@b" <c>', b" a@b (c)"):
        content = b"From:" + body + b"\r\n\r\n"
        assert not _plainly_qualified(content, headers.read(content).fields[0]), body


def test_unqualified_header_addresses_get_the_hostname_in_place() -> None:
    content = block(
        [
            b"From: root (Cron Daemon)",
            b'To: root, Bob <bob>, "Q, Z" <q@x.test>, undisclosed-recipients:;',
            b"Cc: team: ann, ben@x.test;,",
            b"\tcarl",
            b"Reply-To: nobody",
            b"Subject: root",
        ]
    )
    out = rewrite(RewriteConfig(), HOST, "a@x.test", ["b@y.test"], content)
    assert out.content == block(
        [
            b"From: root@relay.test (Cron Daemon)",
            b'To: root@relay.test, Bob <bob@relay.test>, "Q, Z" <q@x.test>,'
            b" undisclosed-recipients:;",
            b"Cc: team: ann@relay.test, ben@x.test;,",
            b"\tcarl@relay.test",
            b"Reply-To: nobody",
            b"Subject: root",
        ]
    )
    assert (
        "header From: root (Cron Daemon) -> root@relay.test (Cron Daemon) (qualified)"
        in out.changes
    )
    # A bare phrase is no address: left as it is.
    phrase = block([b"To: Cron Daemon", b"Cc: <>"])
    assert rewrite(RewriteConfig(), HOST, "a@x.test", [], phrase).content is phrase


def test_qualification_comes_before_aliases_and_masquerading() -> None:
    config = RewriteConfig(aliases=(("root", "admin@example.com"),), masquerade="example.com")
    content = block([b"From: root (Cron Daemon)", b"To: root"])
    out = rewrite(config, HOST, "cron", ["root", "root@relay.test", "root@other.test"], content)
    assert out.recipients == ["admin@example.com", "admin@example.com", "root@other.test"]
    assert out.sender == "cron@example.com"
    assert out.content == block([b"From: root@example.com (Cron Daemon)", b"To: root@relay.test"])
    assert "recipient root -> admin@example.com (alias)" in out.changes
    assert "sender cron -> cron@example.com (masquerade)" in out.changes


# -- end to end ------------------------------------------------------------------------------


def smtp_raw(port: int, sender: str, rcpt: str, content: bytes) -> bytes:
    """One transaction with the bytes of `content` as given (bare CRs and all); the
    reply to the end of DATA."""
    with RawSMTP(port) as client:
        assert client.command("EHLO client.test").startswith(b"250")
        assert client.command(f"MAIL FROM:<{sender}>").startswith(b"250")
        assert client.command(f"RCPT TO:<{rcpt}>").startswith(b"250")
        assert client.command("DATA").startswith(b"354")
        client.send(content + b".\r\n")
        reply = client.reply()
        client.command("QUIT")
        return reply


def arrived(sink: Sink, mark: str, timeout: float = 10.0) -> Received:
    with sink.handler.cond:
        found = sink.handler.cond.wait_for(
            lambda: next((m for m in sink.messages if mark.encode() in m.content), None),
            timeout,
        )
    assert found is not None, f"{mark} did not arrive; the sink has {len(sink.messages)}"
    return found


@pytest.fixture
def forced_relay(tmp_path: Path, sink: Sink, relay_factory):
    cfg = write_config(tmp_path, sink.port, f'[rewrite]\nforce_from = "{FORCED}"')
    relay = relay_factory(load_config(cfg))
    relay.cfg = cfg
    return relay


def test_each_layout_leaves_one_from_upstream_over_smtp(forced_relay, sink: Sink) -> None:
    marks = {}
    for layout, lines in LAYOUTS.items():
        marks[layout] = token()
        content = block([f"Subject: {marks[layout]}".encode(), *lines]) + b"\r\nbody\r\n"
        reply = smtp_raw(forced_relay.port, "alice@client.test", "x@dest.test", content)
        assert reply.startswith(b"250 2.0.0"), (layout, reply)
    for layout, mark in marks.items():
        got = arrived(sink, mark)
        assert got.mail_from == FORCED, layout
        assert_one_forced_from(got.content)


def test_each_layout_leaves_one_from_upstream_from_sendmail(forced_relay, sink: Sink) -> None:
    marks = {}
    for layout, lines in LAYOUTS.items():
        marks[layout] = token()
        stdin = block([f"Subject: {marks[layout]}".encode(), *lines], b"\n") + b"\nbody\n"
        done = sendmail(
            forced_relay.cfg, "-i", "-f", "alice@client.test", "x@dest.test", stdin=stdin
        )
        assert done.returncode == 0, (layout, done.stderr)
    for layout, mark in marks.items():
        got = arrived(sink, mark)
        assert got.mail_from == FORCED, layout
        assert_one_forced_from(got.content)


def test_a_doubtful_header_is_refused_over_smtp_with_554_5_6_0(forced_relay, sink: Sink) -> None:
    refused = token()
    for line in HIDDEN_FROM.values():
        content = block([f"Subject: {refused}".encode(), line]) + b"\r\nbody\r\n"
        reply = smtp_raw(forced_relay.port, "alice@client.test", "x@dest.test", content)
        # Over SMTP a bare CR has become CRLF by now: that From is simply rewritten.
        if b"\r" in line:
            assert reply.startswith(b"250"), reply
        else:
            assert reply.decode() == REFUSAL
    control = token()
    content = block([f"Subject: {control}".encode(), b"From: a@client.test"]) + b"\r\nhi\r\n"
    assert smtp_raw(forced_relay.port, "alice@client.test", "x@dest.test", content)[:3] == b"250"
    arrived(sink, control)
    for got in sink.messages:
        assert_one_forced_from(got.content)
    assert len([m for m in sink.messages if refused.encode() in m.content]) == 1  # the bare CR


def test_a_doubtful_header_is_refused_by_sendmail_with_exit_65(forced_relay, sink: Sink) -> None:
    refused = token()
    for line in HIDDEN_FROM.values():
        stdin = block([f"Subject: {refused}".encode(), line], b"\n") + b"\nbody\n"
        done = sendmail(forced_relay.cfg, "-i", "x@dest.test", stdin=stdin)
        assert done.returncode == 65, (line, done.returncode, done.stderr)
    control = token()
    done = sendmail(
        forced_relay.cfg, "-i", "x@dest.test", stdin=f"Subject: {control}\n\nhi\n".encode()
    )
    assert done.returncode == 0, done.stderr
    arrived(sink, control)
    assert not [m for m in sink.messages if refused.encode() in m.content]


def invoking_user() -> str:
    return pwd.getpwuid(os.getuid()).pw_name


CRON = b"From: root (Cron Daemon)\nTo: root\nSubject: Cron <root@relay> run %s\n\nout\n"


@pytest.mark.parametrize(
    ("extra", "rcpt", "sender_domain", "from_domain"),
    [
        ("", "root@relay.test", "relay.test", "relay.test"),
        (
            '[rewrite]\naliases = { root = "admin@example.com" }\nmasquerade = "example.com"',
            "admin@example.com",
            "example.com",
            "example.com",
        ),
    ],
    ids=["plain", "alias-and-masquerade"],
)
def test_cron_mail_leaves_qualified(
    tmp_path: Path, sink: Sink, relay_factory, extra, rcpt, sender_domain, from_domain
) -> None:
    """Issue 14 item 8: cron's exact arguments and header, in the five-minute config.
    Over SMTP too where the listener takes `root` (it refuses an address without a
    domain unless an alias or masquerading applies to it)."""
    cfg = write_config(tmp_path, sink.port, extra)
    relay = relay_factory(load_config(cfg))
    local, remote = token(), token()
    done = sendmail(
        cfg, "-FCronDaemon", "-i", "-B8BITMIME", "-oem", "root", stdin=CRON % local.encode()
    )
    assert done.returncode == 0, done.stderr
    sent = [(local, invoking_user())]
    if extra:
        relay.send("root", ["root"], (CRON % remote.encode()).replace(b"\n", b"\r\n"))
        sent.append((remote, "root"))
    for mark, sender in sent:
        got = arrived(sink, mark)
        assert got.rcpt_tos == [rcpt]
        assert got.mail_from == f"{sender}@{sender_domain}"
        msg = email.message_from_bytes(got.content, policy=email.policy.compat32)
        assert msg.get_all("From") == [f"root@{from_domain} (Cron Daemon)"]
        assert msg.get_all("To") == ["root@relay.test"]
