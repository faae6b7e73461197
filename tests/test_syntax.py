"""Envelope and greeting syntax at the command (SPEC §4, issue #14 item 7): what RFC 5321
rules out is refused where it is said (`501 5.1.3` for an address, `501 5.5.4` for a
HELO/EHLO argument), never accepted only to bounce later; what real clients send
sloppily still works; and nothing a client chose can inject syntax into `Received:`."""

from __future__ import annotations

import re
from types import SimpleNamespace

import pytest

from smarthost.config import load_config
from smarthost.receiver import received_header

from support.configs import write_config
from support.smtp import RawSMTP

MESSAGE = b"From: a@client.test\r\nTo: b@dest.test\r\nSubject: syntax\r\n\r\nHello.\r\n"
RULED_OUT = [
    "x@[999.1.1.1]",  # not an IPv4 address
    "x@[IPv6:zzzz]",  # not an IPv6 address
    "x@[1.2.3]",
    "x@[foo]",  # no such address-literal tag
    "x@-bad-.example",  # a label begins or ends with a hyphen
    "x@bad_.example",  # underscore: not LDH
    "x@" + "l" * 64 + ".example",  # a label over 63 octets
    ".x@example.com",  # dot-string: no leading dot
    "x.@example.com",  # ... nor trailing
    "x..y@example.com",  # ... nor two in a row
    ".no-domain",  # unqualified, and a bad dot-string even with @hostname
]


def dialogue(port: int, *commands: str) -> list[bytes]:
    """The last reply line to each command, after EHLO."""
    with RawSMTP(port, timeout=10) as client:
        assert client.command("EHLO client.test").startswith(b"250 ")
        return [client.command(c) for c in commands]


@pytest.mark.parametrize("address", RULED_OUT)
def test_ruled_out_recipients_are_refused_at_rcpt(relay, sink, address):
    mail, rcpt, good = dialogue(
        relay.port, "MAIL FROM:<a@client.test>", f"RCPT TO:<{address}>", "RCPT TO:<b@dest.test>"
    )
    assert mail.startswith(b"250 ")
    assert rcpt.startswith(b"501 5.1.3 "), rcpt
    assert good.startswith(b"250 "), good  # the transaction goes on


@pytest.mark.parametrize("address", RULED_OUT)
def test_ruled_out_senders_are_refused_at_mail(relay, sink, address):
    mail, again = dialogue(relay.port, f"MAIL FROM:<{address}>", "MAIL FROM:<a@client.test>")
    assert mail.startswith(b"501 5.1.3 "), mail
    assert again.startswith(b"250 "), again  # no transaction was opened


def test_nothing_ruled_out_reaches_the_upstream(relay, sink):
    """Refused at the command, so never relayed (nor bounced later)."""
    with relay.client() as client:
        client.ehlo("client.test")
        assert client.mail("a@client.test")[0] == 250
        for address in RULED_OUT:
            assert client.rcpt(address)[0] == 501, address
        assert client.rcpt("ok@dest.test")[0] == 250
        assert client.data(MESSAGE)[0] == 250
    (received,) = sink.wait_for(1)
    assert received.rcpt_tos == ["ok@dest.test"]


@pytest.mark.parametrize(
    "address",
    [
        '"a b"@dest.test',  # a quoted local part stays allowed...
        '"x..y"@dest.test',  # ... and stays quoted, also where only dots needed it
        '".x"@dest.test',
        '"a\\"b"@dest.test',  # a quoted pair
        "x@[192.0.2.1]",
        "x@[IPv6:2001:db8::1]",
        "x@[ipv6:::1]",
        "o'brien+tag@dest.test",
        "x@a-b.c-d.test",
        "x@1.2.3.4",  # all-numeric labels are LDH
    ],
)
def test_valid_addresses_are_taken_and_relayed_as_written(
    tmp_path, raw_upstream, relay_factory, address
):
    """On the wire upstream as the client wrote them (aiosmtpd would show `"x..y"@...`
    as `x..y@...`: the raw upstream shows the bytes)."""
    relay = relay_factory(load_config(write_config(tmp_path, raw_upstream.port)))
    with relay.client() as client:
        client.ehlo("client.test")
        assert client.mail("a@client.test")[0] == 250
        code, msg = client.rcpt(address)
        assert code == 250, (code, msg)
        assert client.data(MESSAGE)[0] == 250
    (received,) = raw_upstream.wait_for(1)
    assert received.rcpts == [f"rcpt TO:<{address}>".encode()]


def test_a_source_route_and_a_bare_address_still_work(relay, sink):
    """Old or sloppy forms that name a valid mailbox: the route is dropped (RFC 5321
    §4.1.1.3), the brackets forgiven (as Postfix without strict_rfc821_envelopes)."""
    mail, rcpt, data = dialogue(
        relay.port, "MAIL FROM:a@client.test", "RCPT TO:<@hop.test,@hop2.test:b@dest.test>", "DATA"
    )
    assert mail.startswith(b"250 ") and rcpt.startswith(b"250 "), (mail, rcpt)
    assert data.startswith(b"354 ")


def test_a_tab_around_a_quoted_path_is_white_space(relay, sink):
    """TAB separates the path from its parameters as a space does; only where it is
    inside the address is it refused."""
    mail, rcpt, bad = dialogue(
        relay.port,
        'MAIL FROM:<"a b"@client.test>\tSIZE=100',
        'RCPT TO:\t<"c d"@dest.test>',
        'RCPT TO:<"c\td"@dest.test>',
    )
    assert mail.startswith(b"250 ") and rcpt.startswith(b"250 "), (mail, rcpt)
    assert bad[:3] in (b"501", b"553"), bad


def test_unicode_addresses_are_checked_too(relay, sink):
    with RawSMTP(relay.port, timeout=10) as client:
        client.command("EHLO client.test")
        assert client.command("MAIL FROM:<ü@client.test> SMTPUTF8".encode()).startswith(b"250 ")
        assert client.command("RCPT TO:<用户@例え.jp>".encode()).startswith(b"250 ")
        assert client.command("RCPT TO:<用户..x@例え.jp>".encode()).startswith(b"501 5.1.3 ")
        assert client.command("RCPT TO:<x@-例え.jp>".encode()).startswith(b"501 5.1.3 ")


def test_unqualified_addresses_are_taken_with_this_hosts_name(relay, sink):
    """As Postfix does (append_at_myorigin): an address without a domain is queued, and
    relayed, as user@hostname; aliases and masquerading then see that address."""
    null, _, mail, rcpt = dialogue(
        relay.port, "MAIL FROM:<>", "RSET", "MAIL FROM:<cron>", "RCPT TO:<somebody>"
    )
    assert null.startswith(b"250 ")
    assert mail.startswith(b"250 ") and rcpt.startswith(b"250 "), (mail, rcpt)
    with RawSMTP(relay.port, timeout=10) as client:
        client.command("EHLO client.test")
        client.command("MAIL FROM:<cron>")
        client.command("RCPT TO:<somebody>")
        client.command("DATA")
        assert client.command(b"Subject: x\r\n\r\nbody\r\n.").startswith(b"250 ")
    (got,) = sink.wait_for(1)
    hostname = relay.config.hostname
    assert (got.mail_from, got.rcpt_tos) == (f"cron@{hostname}", [f"somebody@{hostname}"])


def test_unqualified_addresses_that_rewriting_qualifies_are_taken(tmp_path, sink, relay_factory):
    """An alias for a recipient, masquerading for a sender."""
    path = write_config(
        tmp_path,
        sink.port,
        '[rewrite]\naliases = { root = "admin@example.com" }\nmasquerade = "example.com"',
    )
    relay = relay_factory(load_config(path))
    mail, alias = dialogue(relay.port, "MAIL FROM:<cron>", "RCPT TO:<Root>")
    assert mail.startswith(b"250 ") and alias.startswith(b"250 "), (mail, alias)


# -- HELO and EHLO --------------------------------------------------------------------


@pytest.mark.parametrize("verb", ["EHLO", "HELO"])
@pytest.mark.parametrize(
    "argument",
    [
        "[IPv6:zzzz]",
        "[999.1.1.1]",
        "[1.2.3.4",
        "[foo]",
        "a b",
        "x(y)",
        "a;b",
        "<x>",
        "a@b",
        "é.test",
    ],
)
def test_ruled_out_greetings_are_refused(relay, verb, argument):
    with RawSMTP(relay.port, timeout=10) as client:
        reply = client.command(f"{verb} {argument}".encode())
        assert reply.startswith(b"501 5.5.4 "), reply
        # No greeting took: MAIL still wants one; then a good greeting works.
        assert client.command("MAIL FROM:<a@client.test>")[:1] == b"5"
        assert client.command(f"{verb} client.test").startswith(b"250")


@pytest.mark.parametrize(
    "argument",
    [
        "client.test",
        "localhost",  # no dot: what many clients send
        "my_laptop",  # an underscore: Windows and container names
        "DESKTOP-7QK2ABC",
        "mail.example.com.",  # a trailing dot
        "[192.0.2.1]",
        "[IPv6:2001:db8::1]",
        "192.0.2.1",  # an address without brackets: sloppy but plain
        "2001:db8::1",
    ],
)
def test_sloppy_but_real_greetings_are_taken(relay, sink, argument):
    with relay.client() as client:
        code, _ = client.ehlo(argument)
        assert code == 250, argument
        assert client.sendmail("a@client.test", ["b@dest.test"], MESSAGE) == {}
    (received,) = sink.wait_for(1)
    first = received.content.split(b"\r\n\t", 1)[0]
    assert first.startswith(b"Received: from "), first
    assert argument.encode() in first


def test_a_refused_greeting_does_not_undo_the_one_before(relay, sink):
    with relay.client() as client:
        client.ehlo("client.test")
        code, _ = client.docmd("EHLO [999.1.1.1]")
        assert code == 501
        assert client.sendmail("a@client.test", ["b@dest.test"], MESSAGE) == {}
    (received,) = sink.wait_for(1)
    assert b"Received: from client.test " in received.content
    assert b"999" not in received.content


# -- Received: ------------------------------------------------------------------------


def _received(helo: str | None, rcpts: list[str], peer: object = ("192.0.2.7", 25)) -> str:
    session = SimpleNamespace(
        extended_smtp=True, ssl=None, authenticated=False, host_name=helo, peer=peer
    )
    envelope = SimpleNamespace(rcpt_tos=rcpts)
    return received_header(session, envelope, "QUEUEID", "relay.test").decode()  # type: ignore[arg-type]


FIELD = re.compile(r"Received: from (\S+|\"(?:[^\"\\]|\\.)*\") \(\[[^\]]*\]\)\r\n\tby ")


@pytest.mark.parametrize(
    "helo",
    [
        "x) by forged.example (y",
        "a; Tue, 1 Jan 2030 00:00:00 +0000",
        'quote" (comment',
        "back\\slash",
        "é\u2028x",
        "[IPv6:zzzz] by forged",
    ],
)
def test_received_quotes_whatever_the_helo_was(helo):
    """The listener refuses these; the header builder does not rely on it."""
    text = _received(helo, ["b@dest.test"])
    match = FIELD.match(text)
    assert match, text
    token = match.group(1)
    assert token.startswith('"') and token.isascii(), token
    lines = text.split("\r\n")
    assert len(lines) == 4 and lines[-1] == "", text  # from, by, for: nothing more
    assert not any(c in line for line in lines for c in "\r\n\u2028"), text
    assert text.rsplit(";", 1)[0].endswith("for <b@dest.test>"), text


def test_received_keeps_plain_names_and_literals_as_they_are():
    assert _received("client.test", []).startswith("Received: from client.test ([192.0.2.7])")
    assert _received("[IPv6:::1]", [], ("::1", 25, 0, 0)).startswith(
        "Received: from [IPv6:::1] ([::1])"
    )
    assert _received(None, [], None).startswith("Received: from unknown ([unknown])")


def test_received_for_only_with_an_address_that_is_safe_to_show():
    assert 'for <"a b"@dest.test>;' in _received("c.test", ['"a b"@dest.test'])
    assert "for <" not in _received("c.test", ["a b@dest.test"])
    assert "for <" not in _received("c.test", ['"a@dest.test'])


def test_checks_are_what_rfc_5321_says():
    from smarthost.smtp_server import address_problem, helo_problem

    for address in RULED_OUT:
        assert address_problem(address), address
    for address in ['"a b"@x.test', "x@[IPv6:::1]", "ü@bücher.example", "a@b"]:
        assert address_problem(address) is None, address
    assert helo_problem("[IPv6:zzzz]") and helo_problem("[999.1.1.1]")
    assert helo_problem("my_laptop") is None and helo_problem("localhost") is None
