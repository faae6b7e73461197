"""`smarthost-sendmail` end to end: its options, a real mail(1) client, rewriting
(SMTP and local alike), exit 0 as the promise of 250, and `-bs` (SMTP on standard input
and output), all from the outside.

`smarthost-sendmail` runs as a real subprocess against a config on disk; the relay runs
in-process (`relay_factory`) or as a real process (`relay_process`), and a real aiosmtpd
upstream (the `sink`) receives what it sends. Nothing is mocked. Deadlines are polled,
never slept out: the one kind of wait that runs to its end is a bounded absence check
("nothing arrives within N s"), and each such check is paired with a positive control
that shows the same path does deliver.
"""

from __future__ import annotations

import email
import email.policy
import os
import shutil
import smtplib
import socket
import subprocess
import sys
from email.utils import getaddresses
from pathlib import Path

import pytest

from smarthost.config import load_config
from smarthost.spool import Spool

from support import ROOT
from support.cli import ok, sendmail, sendmail_entry
from support.configs import write_config
from support.local import (
    PROMPT,
    drop_dir,
    drop_files,
    header_section,
    hops,
    message,
    only_drop,
    parsed,
    subject_is,
    token,
    user,
    wait_message,
)
from support.sink import Sink

HOSTNAME = "relay.test"  # write_config's hostname
SENDER = "alice@client.test"


# -- 1. options ---------------------------------------------------------------------------


def test_t_takes_to_cc_bcc_and_removes_bcc(
    tmp_path: Path, sink: Sink, relay_factory, events
) -> None:
    cfg = write_config(tmp_path, sink.port)
    relay_factory(load_config(cfg))
    subject = token()
    content = message(
        subject,
        f"From: {SENDER}",
        "To: Bob <bob@dest.test>, carol@dest.test",
        "Cc: dave@dest.test",
        "Bcc: hidden@dest.test,",
        " other-hidden@dest.test",
    )
    ok(sendmail(cfg, "-t", "-i", stdin=content))
    got = wait_message(sink, subject_is(subject))
    assert sorted(got.rcpt_tos) == [
        "bob@dest.test",
        "carol@dest.test",
        "dave@dest.test",
        "hidden@dest.test",
        "other-hidden@dest.test",
    ]
    section = header_section(got.content).lower()
    assert b"bcc:" not in section
    assert b"hidden@dest.test" not in got.content  # the folded line went with it
    assert parsed(got)["To"] == "Bob <bob@dest.test>, carol@dest.test"
    assert events.events("received", client="local")


def test_f_sets_the_envelope_sender_in_both_spellings(
    tmp_path: Path, sink: Sink, relay_factory
) -> None:
    cfg = write_config(tmp_path, sink.port)
    relay_factory(load_config(cfg))
    spaced, joined, default = token(), token(), token()
    ok(sendmail(cfg, "-f", "bob@client.test", "x@dest.test", stdin=message(spaced)))
    ok(sendmail(cfg, "-fcarol@client.test", "x@dest.test", stdin=message(joined)))
    ok(sendmail(cfg, "x@dest.test", stdin=message(default)))
    assert wait_message(sink, subject_is(spaced)).mail_from == "bob@client.test"
    assert wait_message(sink, subject_is(joined)).mail_from == "carol@client.test"
    # Without -f: the invoking user @hostname (no masquerade configured here).
    assert wait_message(sink, subject_is(default)).mail_from == f"{user()}@{HOSTNAME}"
    # The added From: is the envelope sender.
    got = wait_message(sink, subject_is(joined))
    assert getaddresses([parsed(got)["From"]]) == [("", "carol@client.test")]


def test_F_full_name_goes_into_the_added_from(tmp_path: Path, sink: Sink, relay_factory) -> None:
    cfg = write_config(tmp_path, sink.port)
    relay_factory(load_config(cfg))
    subject = token()
    ok(
        sendmail(
            cfg,
            "-F",
            "Cron Daemon",
            "-f",
            "cron@client.test",
            "x@dest.test",
            stdin=message(subject),
        )
    )
    got = wait_message(sink, subject_is(subject))
    froms = parsed(got).get_all("From")
    assert froms == ["Cron Daemon <cron@client.test>"]


def test_F_full_name_is_quoted_and_cannot_inject_headers(tmp_path: Path) -> None:
    cfg = write_config(tmp_path, 1)
    ok(
        sendmail(
            cfg, "-F", "Doe, John", "-f", "j@client.test", "x@dest.test", stdin=message("quoted")
        )
    )
    _, content = only_drop(tmp_path)
    from_value = email.message_from_bytes(content, policy=email.policy.compat32)["From"]
    # One mailbox whose display name is the whole -F value (RFC 5322 quoting).
    assert getaddresses([from_value]) == [("Doe, John", "j@client.test")]
    for path in drop_files(tmp_path):
        path.unlink()
    # A full name with a line break must not become a header field of its own: refused
    # (64), or kept inside the From field.
    result = sendmail(
        cfg, "-F", "Eve\r\nBcc: spy@evil.test", "x@dest.test", stdin=message("inject")
    )
    if result.returncode == 0:
        _, content = only_drop(tmp_path)
        assert b"\nbcc:" not in header_section(content.replace(b"\r\n", b"\n")).lower()
    else:
        assert result.returncode == 64
        assert drop_files(tmp_path) == []


def test_dot_line_ends_input_without_i_but_not_with_i_or_oi(
    tmp_path: Path, sink: Sink, relay_factory
) -> None:
    cfg = write_config(tmp_path, sink.port)
    relay_factory(load_config(cfg))
    body = "first line\n.\nafter the dot\n..two dots\n"
    plain, with_i, with_oi = token(), token(), token()
    ok(sendmail(cfg, "x@dest.test", stdin=message(plain, body=body)))
    ok(sendmail(cfg, "-i", "x@dest.test", stdin=message(with_i, body=body)))
    ok(sendmail(cfg, "-oi", "x@dest.test", stdin=message(with_oi, body=body)))

    got = wait_message(sink, subject_is(plain))
    assert got.content.endswith(b"\r\n\r\nfirst line\r\n"), got.content
    assert b"after the dot" not in got.content
    for subject in (with_i, with_oi):
        got = wait_message(sink, subject_is(subject))
        # SMTP dot-stuffing is transparent: the sink sees the lone "." line as it was.
        assert got.content.endswith(
            b"\r\n\r\nfirst line\r\n.\r\nafter the dot\r\n..two dots\r\n"
        ), got.content


def test_from_date_message_id_added_when_missing_never_duplicated(
    tmp_path: Path, sink: Sink, relay_factory
) -> None:
    cfg = write_config(tmp_path, sink.port)
    relay_factory(load_config(cfg))
    bare, full = token(), token()
    ok(sendmail(cfg, "-f", "bob@client.test", "x@dest.test", stdin=message(bare)))
    complete = message(
        full,
        "From: Alice <alice@client.test>",
        "Date: Wed, 25 Nov 2026 10:00:00 +0000",
        "Message-ID: <kept.1@client.test>",
    )
    ok(sendmail(cfg, "-f", "bob@client.test", "x@dest.test", stdin=complete))

    added = parsed(wait_message(sink, subject_is(bare)))
    assert added.get_all("From") == ["bob@client.test"]
    assert len(added.get_all("Date")) == 1
    assert email.utils.parsedate_to_datetime(added["Date"]) is not None
    message_ids = added.get_all("Message-ID")
    assert len(message_ids) == 1 and message_ids[0].startswith("<") and "@" in message_ids[0]

    kept = parsed(wait_message(sink, subject_is(full)))
    assert kept.get_all("From") == ["Alice <alice@client.test>"]
    assert kept.get_all("Date") == ["Wed, 25 Nov 2026 10:00:00 +0000"]
    assert kept.get_all("Message-ID") == ["<kept.1@client.test>"]


def test_leading_mbox_from_line_keeps_the_header_section(tmp_path: Path) -> None:
    # `formail`, `git format-patch --stdout` and mbox tools write one; Postfix's and
    # sendmail's sendmail skip it.
    cfg = write_config(tmp_path, 1)
    content = b"From bob@client.test Mon Jan  1 00:00:00 2026\n" + message(
        "mbox", "From: bob@client.test", "To: x@dest.test"
    )
    ok(sendmail(cfg, "-t", "-i", stdin=content))
    record, dropped = only_drop(tmp_path)
    assert record["recipients"] == ["x@dest.test"]
    msg = email.message_from_bytes(dropped, policy=email.policy.compat32)
    assert msg.get_all("From") == ["bob@client.test"]
    assert msg["Subject"] == "mbox"


def test_harmless_options_are_accepted(tmp_path: Path) -> None:
    cfg = write_config(tmp_path, 1)
    args = ["-odi", "-oem", "-B8BITMIME", "-bm", "-odb", "-oee", "-oi", "-v"]
    result = ok(sendmail(cfg, *args, "x@dest.test", stdin=message("harmless", body=".\nmore\n")))
    record, content = only_drop(tmp_path)
    assert record["recipients"] == ["x@dest.test"]
    assert content.endswith(b".\r\nmore\r\n")  # -oi among them took effect
    assert b"queued as" in result.stderr  # -v


@pytest.mark.parametrize(
    ("args", "stdin", "says"),
    [
        (["-X", "x@dest.test"], message("usage"), "-X"),
        ([], message("nobody"), "no recipients"),
        (["-t"], message("nobody", "From: a@client.test"), "no recipients"),
        (["x@dest.test\r\nBcc: spy@evil.test"], message("crlf"), "invalid address"),
        (["x@dest.test\nRCPT TO:<spy@evil.test>"], message("lf"), "invalid address"),
        (["--", "-oQ/tmp"], message("option"), "invalid address"),
        (["-f", "-oQ/tmp", "x@dest.test"], message("sender option"), "invalid address"),
        (["-f", "a@b\r\nX-Evil: 1", "x@dest.test"], message("sender crlf"), "invalid address"),
        (["-t"], message("header option", "To: -oQ/tmp@dest.test"), "invalid address"),
    ],
    ids=[
        "unknown-option",
        "no-recipients",
        "t-without-recipients",
        "crlf-recipient",
        "lf-recipient",
        "dash-recipient",
        "dash-sender",
        "crlf-sender",
        "t-dash-recipient",
    ],
)
def test_usage_errors_exit_64_and_drop_nothing(
    tmp_path: Path, args: list[str], stdin: bytes, says: str
) -> None:
    cfg = write_config(tmp_path, 1)
    result = sendmail(cfg, *args, stdin=stdin)
    assert result.returncode == 64, (result.stdout, result.stderr)
    lines = result.stderr.decode().splitlines()
    # One line that says what is wrong (a usage line may follow), never a traceback.
    assert lines and lines[0].startswith("smarthost-sendmail: ") and says in lines[0], lines
    assert "Traceback" not in result.stderr.decode()
    assert drop_files(tmp_path) == []


def test_unwritable_spool_exits_75(tmp_path: Path) -> None:
    # Tests run as root, so modes stop nothing: make the paths impossible instead.
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory\n")
    cfg = write_config(tmp_path, 1)
    cfg.write_text(cfg.read_text().replace(str(tmp_path / "spool"), str(blocker / "spool")))
    result = sendmail(cfg, "x@dest.test", stdin=message("spool under a file"))
    assert result.returncode == 75, (result.stdout, result.stderr)
    assert b"cannot write the drop area" in result.stderr
    assert blocker.read_text() == "not a directory\n"

    # A spool whose drop/ is a regular file.
    cfg = write_config(tmp_path, 1)
    Spool(str(tmp_path / "spool")).create()
    drop = drop_dir(tmp_path)
    drop.rmdir()
    drop.write_text("")
    result = sendmail(cfg, "x@dest.test", stdin=message("drop is a file"))
    assert result.returncode == 75, (result.stdout, result.stderr)
    assert drop.is_file() and drop.read_text() == ""


def test_message_over_max_message_size_exits_65(tmp_path: Path) -> None:
    cfg = write_config(tmp_path, 1, smtp='max_message_size = "10K"')
    small = message("small", body="x" * 1000 + "\n")
    ok(sendmail(cfg, "x@dest.test", stdin=small))
    assert len(drop_files(tmp_path)) == 1
    big = message("big", body=("y" * 76 + "\n") * 200)  # ~15 KiB
    result = sendmail(cfg, "x@dest.test", stdin=big)
    assert result.returncode == 65, (result.stdout, result.stderr)
    assert b"larger than" in result.stderr
    assert len(drop_files(tmp_path)) == 1


def test_bad_config_exits_78(tmp_path: Path) -> None:
    cfg = write_config(tmp_path, 1)
    cfg.write_text(cfg.read_text().replace('level = "debug"', 'level = "debug"\nlevle = "x"'))
    result = sendmail(cfg, "x@dest.test", stdin=message("bad config"))
    assert result.returncode == 78, (result.stdout, result.stderr)
    assert b"levle" in result.stderr
    missing = sendmail_entry(tmp_path / "missing.toml", "x@dest.test", stdin=message("none"))
    assert missing.returncode == 78, (missing.stdout, missing.stderr)
    assert not (tmp_path / "spool").exists()


# -- 2. a real mail(1) client ---------------------------------------------------------------


def test_mail_client_sends_through_sendmail(tmp_path: Path, sink: Sink, relay_factory) -> None:
    # s-nail, also when it is what `mailx`/`mail` point to (Debian's alternatives); the
    # other mail(1)s (bsd-mailx, mailutils) take their MTA from a mailrc: not tested here.
    found = (shutil.which(name) for name in ("s-nail", "mailx", "mail"))
    client = next((p for p in found if p and "s-nail" in os.path.realpath(p)), None)
    if client is None:
        pytest.skip("no mail(1) client: apt-get install s-nail")
    cfg = write_config(tmp_path, sink.port)
    relay_factory(load_config(cfg))
    wrapper = tmp_path / "sendmail-wrapper"
    wrapper.write_text(
        f'#!/bin/sh\nexec "{sys.executable}" -m smarthost -c "{cfg}" sendmail "$@"\n'
    )
    wrapper.chmod(0o755)
    subject = f"from s-nail {token()}"
    home = tmp_path / "home"
    home.mkdir()
    result = subprocess.run(
        # -:/ : no resource files at all; sendwait: its exit status is the MTA's.
        [
            client,
            "-:/",
            "-S",
            f"mta={wrapper}",
            "-S",
            "sendwait",
            "-s",
            subject,
            "bob@dest.test",
        ],
        input=b"Hello from mail(1).\n.\nThe dot above is text.\n",
        capture_output=True,
        timeout=30,
        cwd=ROOT,
        env={**os.environ, "HOME": str(home), "MAILRC": "/dev/null", "LC_ALL": "C"},
    )
    ok(result)
    got = wait_message(sink, subject_is(subject), PROMPT, "the mail(1) message")
    assert got.rcpt_tos == ["bob@dest.test"]
    assert b"Hello from mail(1).\r\n.\r\nThe dot above is text.\r\n" in got.content
    assert parsed(got)["To"] == "bob@dest.test"


# -- 3. rewriting, SMTP and local alike ------------------------------------------------------


def submit(door: str, cfg: Path, relay, sender: str, rcpts: list[str], content: bytes) -> None:
    if door == "smtp":
        relay.send(sender, rcpts, content.replace(b"\n", b"\r\n"))
    else:
        ok(sendmail(cfg, "-i", "-f", sender, *rcpts, stdin=content))


DOORS = pytest.mark.parametrize("door", ["smtp", "local"])


@DOORS
def test_aliases(door: str, tmp_path: Path, sink: Sink, relay_factory, events) -> None:
    cfg = write_config(tmp_path, sink.port, '[rewrite]\naliases = { root = "admin@example.com" }')
    relay = relay_factory(load_config(cfg))
    subject = token()
    rcpts = ["root", f"root@{HOSTNAME}", "root@elsewhere.test"]
    submit(door, cfg, relay, SENDER, rcpts, message(subject, f"From: {SENDER}"))
    got = wait_message(sink, subject_is(subject))
    # Both local spellings go to the alias (once); another domain's root is not ours.
    assert sorted(got.rcpt_tos) == ["admin@example.com", "root@elsewhere.test"]
    changes = [c for r in events.events("rewritten") for c in r["changes"]]
    assert any("root -> admin@example.com" in c for c in changes), changes
    assert any(f"root@{HOSTNAME} -> admin@example.com" in c for c in changes), changes
    assert not any("elsewhere" in c for c in changes), changes


@DOORS
def test_masquerade(door: str, tmp_path: Path, sink: Sink, relay_factory, events) -> None:
    cfg = write_config(tmp_path, sink.port, '[rewrite]\nmasquerade = "example.com"')
    relay = relay_factory(load_config(cfg))
    cases = {"cron": "cron@example.com", f"cron@{HOSTNAME}": "cron@example.com"}
    cases["x@other.test"] = "x@other.test"
    subjects = {}
    for sender in cases:
        subjects[sender] = token()
        submit(door, cfg, relay, sender, ["x@dest.test"], message(subjects[sender]))
    for sender, expected in cases.items():
        assert wait_message(sink, subject_is(subjects[sender])).mail_from == expected, sender
    changes = [c for r in events.events("rewritten") for c in r["changes"]]
    masqueraded = [
        c
        for c in changes
        if c.startswith("sender ") and c.endswith(" -> cron@example.com (masquerade)")
    ]
    assert len(masqueraded) == 2, changes
    assert not any("other.test" in c for c in changes), changes


def test_local_mail_from_header_is_qualified_and_masqueraded(
    tmp_path: Path, sink: Sink, relay_factory
) -> None:
    cfg = write_config(tmp_path, sink.port, '[rewrite]\nmasquerade = "example.com"')
    relay_factory(load_config(cfg))
    subject = token()
    ok(sendmail(cfg, "-f", "cron", "x@dest.test", stdin=message(subject)))
    got = wait_message(sink, subject_is(subject))
    assert got.mail_from == "cron@example.com"
    assert getaddresses([parsed(got)["From"]]) == [("", "cron@example.com")]


@DOORS
def test_force_from(door: str, tmp_path: Path, sink: Sink, relay_factory, events) -> None:
    cfg = write_config(tmp_path, sink.port, '[rewrite]\nforce_from = "relay@example.com"')
    relay = relay_factory(load_config(cfg))
    moved, kept = token(), token()
    submit(
        door, cfg, relay, SENDER, ["x@dest.test"], message(moved, "From: Alice <alice@client.test>")
    )
    submit(
        door,
        cfg,
        relay,
        SENDER,
        ["x@dest.test"],
        message(kept, "From: Alice <alice@client.test>", "Reply-To: list@client.test"),
    )

    got = wait_message(sink, subject_is(moved))
    assert got.mail_from == "relay@example.com"
    msg = parsed(got)
    assert msg.get_all("From") == ["relay@example.com"]
    assert msg.get_all("Reply-To") == ["Alice <alice@client.test>"]

    got = wait_message(sink, subject_is(kept))
    assert got.mail_from == "relay@example.com"
    msg = parsed(got)
    assert msg.get_all("From") == ["relay@example.com"]
    assert msg.get_all("Reply-To") == ["list@client.test"]

    rewritten = events.events("rewritten")
    assert len(rewritten) == 2, rewritten
    for record in rewritten:
        changes = " | ".join(record["changes"])
        assert f"sender {SENDER} -> relay@example.com (force_from)" in changes
        assert "header From: Alice <alice@client.test> -> relay@example.com" in changes


# -- 4. exit 0 is the promise of 250 ---------------------------------------------------------


def test_sendmail_refuses_a_mail_loop_before_it_exits_0(
    tmp_path: Path, sink: Sink, relay_process
) -> None:
    # Issue #14, observation 1: 51 Received: fields, sendmail exited 0, then the pickup
    # quarantined the file and nobody was told. Now sendmail refuses it itself.
    cfg = write_config(tmp_path, sink.port)
    looped, fifty = token(), token()
    result = sendmail(cfg, "-i", "x@dest.test", stdin=message(looped, *hops(51)))
    assert result.returncode == 65, (result.returncode, result.stderr)
    err = result.stderr.decode()
    assert err.startswith("smarthost-sendmail: ") and "mail loop" in err and "5.4.6" in err, err
    assert "Traceback" not in err
    assert drop_files(tmp_path) == []
    # Positive control: 50 hops are not a loop yet; the relay takes and sends it.
    ok(sendmail(cfg, "-i", "x@dest.test", stdin=message(fifty, *hops(50))))
    proc = relay_process(cfg).start()
    wait_message(sink, subject_is(fifty), 10.0, "the message with 50 hops")
    assert not [r for r in proc.records() if r.get("event") in ("quarantined", "rejected")]
    assert not (tmp_path / "spool" / "corrupt").exists() or not list(
        (tmp_path / "spool" / "corrupt").iterdir()
    )
    assert proc.stop() == 0


def test_8bit_local_mail_goes_upstream_with_body_8bitmime(
    tmp_path: Path, sink: Sink, relay_process
) -> None:
    cfg = write_config(tmp_path, sink.port)
    proc = relay_process(cfg).start()
    eight, seven = token(), token()
    ok(sendmail(cfg, "-i", "x@dest.test", stdin=message(eight, body="Grüße, señor\n")))
    ok(sendmail(cfg, "-i", "x@dest.test", stdin=message(seven, body="plain ASCII\n")))
    got = wait_message(sink, subject_is(eight), PROMPT, "the 8-bit message")
    assert "BODY=8BITMIME" in got.mail_options, got.mail_options
    assert "Grüße, señor\r\n".encode() in got.content
    assert "SMTPUTF8" not in got.mail_options  # 8-bit text in the body only
    control = wait_message(sink, subject_is(seven), PROMPT, "the 7-bit message")
    assert not [o for o in control.mail_options if o.upper().startswith("BODY=")]
    assert proc.stop() == 0


def test_local_mail_with_a_utf8_header_goes_upstream_with_smtputf8(
    tmp_path: Path, sink: Sink, relay_process
) -> None:
    """A local program cannot ask for SMTPUTF8; a header in UTF-8 (RFC 6532) needs it."""
    cfg = write_config(tmp_path, sink.port)
    proc = relay_process(cfg).start()
    subject = token()
    ok(sendmail(cfg, "-i", "x@dest.test", stdin=message(subject, "X-Greeting: Grüße")))
    got = wait_message(sink, subject_is(subject), PROMPT, "the UTF-8 header message")
    assert "SMTPUTF8" in got.mail_options, got.mail_options
    assert "X-Greeting: Grüße".encode() in got.content
    assert proc.stop() == 0


# -- 5. sendmail -bs: SMTP on standard input and output ---------------------------------------


def bs_command(cfg: Path) -> list[str]:
    """`smarthost-sendmail -C CFG -bs`, through the console script's entry point."""
    code = "import sys; from smarthost.cli import sendmail_main; sys.exit(sendmail_main())"
    return [sys.executable, "-c", code, "-C", str(cfg), "-bs"]


def bs_client(cfg: Path) -> tuple[smtplib.SMTP, subprocess.Popen]:
    """smtplib speaking to `sendmail -bs` over a socket pair as its stdin and stdout."""
    ours, theirs = socket.socketpair()
    proc = subprocess.Popen(
        bs_command(cfg), stdin=theirs, stdout=theirs, stderr=subprocess.PIPE, cwd=ROOT
    )
    theirs.close()
    ours.settimeout(30)
    client = smtplib.SMTP()
    client.sock = ours
    code, greeting = client.getreply()
    assert code == 220 and greeting.startswith(HOSTNAME.encode()), greeting
    return client, proc


def test_bs_speaks_smtp_and_the_relay_delivers(tmp_path: Path, sink: Sink, relay_process) -> None:
    # Symfony Mailer's and Laravel's default: `sendmail -bs`, then EHLO, MAIL, RCPT, DATA.
    cfg = write_config(tmp_path, sink.port)
    client, proc = bs_client(cfg)
    code, features = client.ehlo("web1.client.test")
    assert code == 250
    for feature in ("pipelining", "size", "8bitmime", "smtputf8", "enhancedstatuscodes"):
        assert client.has_extn(feature), features
    subject = token()
    body = ".leading dot\n..two\n.\nend\n"
    content = message(subject, f"From: {SENDER}", body=body).replace(b"\n", b"\r\n")
    refused = client.sendmail(SENDER, ["bob@dest.test", "carol@dest.test"], content)
    assert refused == {}
    assert client.noop()[0] == 250
    assert client.quit()[0] == 221
    assert proc.wait(30) == 0
    assert b"Traceback" not in proc.stderr.read()
    proc.stderr.close()
    # Durably in the drop area already (the 250 came after the write), relay stopped.
    record, dropped = only_drop(tmp_path)
    assert record["sender"] == SENDER
    assert record["recipients"] == ["bob@dest.test", "carol@dest.test"]
    assert dropped.endswith(b"\r\n\r\n.leading dot\r\n..two\r\n.\r\nend\r\n"), dropped

    relay = relay_process(cfg).start()
    got = wait_message(sink, subject_is(subject), 10.0, "the message given with -bs")
    assert sorted(got.rcpt_tos) == ["bob@dest.test", "carol@dest.test"]
    assert got.mail_from == SENDER
    assert got.content.endswith(b"\r\n\r\n.leading dot\r\n..two\r\n.\r\nend\r\n")
    assert relay.stop() == 0


def test_bs_is_strict_and_makes_the_same_checks(tmp_path: Path, sink: Sink) -> None:
    cfg = write_config(tmp_path, sink.port, smtp='max_message_size = "10K"')
    good, looped, big = token(), token(), token()

    def data(content: bytes) -> bytes:
        return content.replace(b"\n", b"\r\n").replace(b"\r\n.", b"\r\n..") + b".\r\n"

    session = [
        (b"MAIL FROM:<a@client.test>", "503 5.5.1"),  # before EHLO
        (b"EHLO client.test", "250"),
        (b"RCPT TO:<x@dest.test>", "503 5.5.1"),  # before MAIL
        (b"DATA", "503 5.5.1"),
        (b"MAIL FROM:a@client.test", "501 5.5.4"),  # no angle brackets
        (b"MAIL FROM:<a@client.test> FOO=BAR", "555 5.5.4"),
        (b"MAIL FROM:<a@client.test> SIZE=99999999", "552 5.3.4"),
        (b"MAIL FROM:<-oQ/tmp>", "501 5.1.7"),
        (b"MAIL FROM:<a@client.test> BODY=8BITMIME", "250 2.1.0"),
        (b"MAIL FROM:<b@client.test>", "503 5.5.1"),  # nested
        (b"DATA", "554 5.5.1"),  # no recipients
        # A CR LF inside an address: two lines, two syntax errors, no recipient.
        (b"RCPT TO:<x@dest.test", "501 5.5.4"),
        (b"RCPT TO:<spy@evil.test>>", "501 5.5.4"),
        (b"RCPT TO:<>", "501 5.1.3"),
        (b"RCPT TO:<Eve <spy@evil.test>>", "501 5.5.4"),
        (b"RCPT TO:<x@dest.test,spy@evil.test>", "501 5.1.3"),
        (b"RCPT TO:<-oQ/tmp>", "501 5.1.3"),
        ("RCPT TO:<zoë@dest.test>".encode(), "553 5.6.7"),  # no SMTPUTF8 on MAIL
        (b"RCPT TO:<x@dest.test> NOTIFY=NEVER", "555 5.5.4"),
        (b"RCPT TO:<x@dest.test>", "250 2.1.5"),
        (b"NOOP", "250 2.0.0"),
        (b"VRFY root", "502 5.5.1"),
        (b"XYZZY", "500 5.5.2"),
        (b"DATA", "354"),
        (data(message(good, f"From: {SENDER}", body=".dot\n")), "250 2.0.0"),
        (b"MAIL FROM:<a@client.test>", "250"),
        (b"RCPT TO:<x@dest.test>", "250"),
        (b"DATA", "354"),
        (data(message(looped, *hops(51))), "554 5.4.6"),  # the relay's own hop check
        (b"MAIL FROM:<a@client.test>", "250"),
        (b"RCPT TO:<x@dest.test>", "250"),
        (b"DATA", "354"),
        (data(message(big, body=("z" * 70 + "\n") * 200)), "552 5.3.4"),
        (b"RSET", "250 2.0.0"),
        (b"QUIT", "221 2.0.0"),
    ]
    stdin = b"".join(line if line.endswith(b".\r\n") else line + b"\r\n" for line, _ in session)
    done = subprocess.run(bs_command(cfg), input=stdin, capture_output=True, timeout=60, cwd=ROOT)
    assert done.returncode == 0, done
    replies = [line for line in done.stdout.decode().split("\r\n") if line[3:4] == " "]
    assert replies[0].startswith("220 "), replies
    got = replies[1:]
    expected = [want for _, want in session]
    assert len(got) == len(expected), (got, expected)
    for reply, want in zip(got, expected):
        assert reply.startswith(want), (reply, want, got)
    assert "mail loop" in done.stderr.decode()
    # Only the good message is in the drop area.
    record, content = only_drop(tmp_path)
    assert record["recipients"] == ["x@dest.test"] and record["sender"] == "a@client.test"
    assert f"Subject: {good}".encode() in content and content.endswith(b"\r\n\r\n.dot\r\n")


def test_bs_with_recipients_or_t_is_a_usage_error(tmp_path: Path) -> None:
    cfg = write_config(tmp_path, 1)
    for extra in (["x@dest.test"], ["-t"]):
        result = sendmail(cfg, "-bs", *extra, stdin=b"QUIT\r\n")
        assert result.returncode == 64, result
        assert b"-bs" in result.stderr and b"Traceback" not in result.stderr
