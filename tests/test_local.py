"""Local submission end to end: `smarthost-sendmail`, the drop area, rewriting and the
queue commands, all from the outside.

`smarthost-sendmail` and `smarthost queue` run as real subprocesses against a config
on disk; the relay runs in-process (`relay_factory`) or as a real process
(`relay_process`), and a real aiosmtpd upstream (the `sink`) receives what it sends.
Nothing is mocked. Deadlines are polled, never slept out: the one kind of wait that
runs to its end is a bounded absence check ("nothing arrives within N s"), and each
such check is paired with a positive control that shows the same path does deliver.
"""

from __future__ import annotations

import asyncio
import email
import email.policy
import hashlib
import json
import os
import pwd
import secrets
import shutil
import smtplib
import socket
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from datetime import datetime
from email.utils import getaddresses
from pathlib import Path

import pytest

import smarthost.scheduler
from smarthost import drop
from smarthost.config import load_config
from smarthost.delivery import Delivery
from smarthost.pickup import Pickup
from smarthost.spool import Spool
from smarthost.watcher import Watcher

from support import ROOT
from support.cli import ok, queue, sendmail, sendmail_entry
from support.configs import write_config
from support.logs import received_locally
from support.relay import RunningRelay, start_amid
from support.sink import Received, Sink
from support.waiting import wait_until

DROP_MAGIC = b"SMARTHOST-DROP 1\n"
HOSTNAME = "relay.test"  # write_config's hostname
PROMPT = 5.0  # "at once": well below the pickup's and the scheduler's 10 s rescans
SENDER = "alice@client.test"
LATER = "451 4.2.0 later"


# -- helpers --------------------------------------------------------------------------


def token() -> str:
    return secrets.token_hex(6)


def message(subject: str, *headers: str, body: str = "hello\n") -> bytes:
    """A message as a local program writes it: LF line ends."""
    return ("".join(f"{h}\n" for h in (*headers, f"Subject: {subject}")) + "\n" + body).encode()


def parsed(received: Received) -> email.message.Message:
    return email.message_from_bytes(received.content, policy=email.policy.compat32)


def header_section(content: bytes) -> bytes:
    return content.split(b"\r\n\r\n", 1)[0]


def wait_message(
    sink: Sink, match: Callable[[Received], bool], timeout: float = PROMPT, what: str = "message"
) -> Received:
    """The first message at the sink that `match`es, waiting up to `timeout`."""
    with sink.handler.cond:
        found = sink.handler.cond.wait_for(
            lambda: next((m for m in sink.messages if match(m)), None), timeout
        )
    if found is None:
        pytest.fail(f"no {what} at the sink within {timeout}s; it has {len(sink.messages)}")
    return found


def absent_for(sink: Sink, match: Callable[[Received], bool], seconds: float) -> bool:
    """True if no message `match`es for `seconds` (a bounded absence check)."""
    with sink.handler.cond:
        return not sink.handler.cond.wait_for(lambda: any(match(m) for m in sink.messages), seconds)


def subject_is(subject: str) -> Callable[[Received], bool]:
    return lambda m: f"Subject: {subject}".encode() in header_section(m.content)


def drop_dir(tmp_path: Path) -> Path:
    return tmp_path / "spool" / "drop"


def drop_files(tmp_path: Path) -> list[Path]:
    """Complete submissions in the drop area (not the .tmp- files being written)."""
    directory = drop_dir(tmp_path)
    if not directory.is_dir():
        return []
    return sorted(p for p in directory.iterdir() if not p.name.startswith(".tmp-"))


def read_drop(path: Path) -> tuple[dict, bytes]:
    """(the record, the message) of a drop file."""
    data = path.read_bytes()
    assert data.startswith(DROP_MAGIC), data[:64]
    record, content = data[len(DROP_MAGIC) :].split(b"\n", 1)
    return json.loads(record), content


def only_drop(tmp_path: Path) -> tuple[dict, bytes]:
    files = drop_files(tmp_path)
    assert len(files) == 1, files
    return read_drop(files[0])


def spool_names(tmp_path: Path) -> list[str]:
    """Every path under the spool, relative to it."""
    root = tmp_path / "spool"
    return [str(p.relative_to(root)) for p in root.rglob("*")]


def config_with(tmp_path: Path, sink: Sink, extra: str = "", **replace: str) -> Path:
    """write_config, then each `old=new` pair of `replace` applied to its text."""
    path = write_config(tmp_path, sink.port, extra)
    text = path.read_text()
    for old, new in replace.values():
        assert old in text, old
        text = text.replace(old, new)
    path.write_text(text)
    return path


def user() -> str:
    return pwd.getpwuid(os.getuid()).pw_name


def hostile_name() -> str:
    """A name the pickup takes for a drop file."""
    return secrets.token_hex(16) + ".drop"


def drop_file(sender: str, recipients: list[str], content: bytes) -> bytes:
    """A drop file as smarthost-sendmail writes one (its format: smarthost.drop)."""
    record = json.dumps({"sender": sender, "recipients": recipients, "time": time.time()})
    return DROP_MAGIC + record.encode() + b"\n" + content.replace(b"\n", b"\r\n")


def dsn_about(subject: str) -> Callable[[Received], bool]:
    """A DSN (null sender) that returns the message with this subject."""
    return lambda m: m.mail_from == "" and f"Subject: {subject}".encode() in m.content


def dsn_text(received: Received) -> str:
    return received.content.decode("utf-8", "replace")


def hops(count: int) -> list[str]:
    """`count` Received: fields, as a message that went round in circles has them."""
    date = "Mon, 1 Jan 2026 00:00:00 +0000"
    return [
        f"Received: from h{n}.client.test by h{n + 1}.client.test; {date}" for n in range(count)
    ]


def place_in_drop(drop: Path, name: str, make: Callable[[Path], None]) -> None:
    """Create an entry as `.tmp-...` with `make`, then rename it to `name` inside drop/:
    atomic (never seen half-written) and a move event that wakes the pickup."""
    tmp = drop / f".tmp-{secrets.token_hex(8)}"
    make(tmp)
    os.rename(tmp, drop / name)


# -- 1. the drop area without and with the relay ----------------------------------------


def test_sendmail_without_relay_is_picked_up_at_start_then_at_once(
    tmp_path: Path, sink: Sink, relay_process
) -> None:
    cfg = write_config(tmp_path, sink.port)
    first = token()
    result = sendmail(cfg, "-i", "bob@dest.test", stdin=message(first, f"From: {SENDER}"))
    ok(result)
    # The relay never ran: the message is durably in the drop area, nothing was sent.
    files = drop_files(tmp_path)
    assert len(files) == 1, spool_names(tmp_path)
    record, content = read_drop(files[0])
    assert record["recipients"] == ["bob@dest.test"]
    assert f"Subject: {first}".encode() in content
    assert sink.messages == []

    proc = relay_process(cfg).start()
    got = wait_message(sink, subject_is(first), 10.0, "the message dropped before the start")
    assert got.rcpt_tos == ["bob@dest.test"]
    wait_until(lambda: not drop_files(tmp_path), 5.0, "the drop file to be removed")
    received = [r for r in proc.records() if r.get("event") == "received"]
    assert len(received) == 1, received
    assert received[0]["client"] == "local"
    assert received[0]["recipients"] == ["bob@dest.test"]

    # With the relay running: the watcher wakes the pickup; no waiting for its rescan.
    second = token()
    submitted = time.monotonic()
    ok(sendmail_entry(cfg, "-oi", "carol@dest.test", stdin=message(second)))
    got = wait_message(sink, subject_is(second), PROMPT, "the message dropped while running")
    assert got.at - submitted < PROMPT
    assert got.rcpt_tos == ["carol@dest.test"]
    wait_until(lambda: not drop_files(tmp_path), 5.0, "the second drop file to be removed")
    assert proc.stop() == 0


# -- 2. options ---------------------------------------------------------------------------


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
    cfg = write_config(tmp_path, 1)
    cfg.write_text(cfg.read_text().replace("[smtp]\n", '[smtp]\nmax_message_size = "10K"\n'))
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


# -- 3. a real mail(1) client ---------------------------------------------------------------


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


# -- 4. rewriting, SMTP and local alike ------------------------------------------------------


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


# -- 5. queue commands on a live relay -------------------------------------------------------


def deferring_config(tmp_path: Path, sink: Sink) -> Path:
    """retry_min 10 m: only a queue command can explain a prompt second attempt. The
    queue commands log to a file (the in-process relay logs to the `events` fixture)."""
    return config_with(
        tmp_path,
        sink,
        retry=('retry_min = "1s"\nretry_max = "2s"', 'retry_min = "10m"\nretry_max = "1h"'),
        log=('level = "debug"', f'level = "debug"\nfile = "{tmp_path / "queue.log"}"'),
    )


def deferring_relay(
    tmp_path: Path, sink: Sink, relay_factory, monkeypatch=None
) -> tuple[Path, RunningRelay]:
    """A relay on deferring_config; its upstream defers later@dest.test. With
    `monkeypatch`, no rescan during the test: only the watcher can explain a prompt
    delivery."""
    if monkeypatch is not None:
        monkeypatch.setattr(smarthost.scheduler, "RESCAN_INTERVAL", 3600.0)
    cfg = deferring_config(tmp_path, sink)
    relay = relay_factory(load_config(cfg))
    sink.handler.rcpt_replies["later@dest.test"] = LATER
    return cfg, relay


def queue_log(tmp_path: Path) -> list[dict]:
    path = tmp_path / "queue.log"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def deferred(events, relay, rcpt: str, subject: str, sender: str = SENDER) -> str:
    """Send a message the sink defers; its queue ID once the deferral is on disk."""
    queue_id = relay.send(sender, [rcpt], message(subject, f"From: {sender}", f"To: {rcpt}"))
    wait_until(lambda: events.events("deferred", queue_id=queue_id), 10.0, "the deferral")
    return queue_id


def listing(cfg: Path) -> dict[str, dict]:
    result = ok(queue(cfg, "list", "--json"))
    entries = [json.loads(line) for line in result.stdout.splitlines()]
    return {e["id"]: e for e in entries}


def test_queue_list_and_show(tmp_path: Path, sink: Sink, relay_factory, events) -> None:
    cfg, relay = deferring_relay(tmp_path, sink, relay_factory)
    subject = token()
    queue_id = deferred(events, relay, "later@dest.test", subject)

    entry = listing(cfg)[queue_id]
    assert entry["state"] == "deferred"
    assert entry["sender"] == SENDER
    assert entry["recipients"] == [
        {"address": "later@dest.test", "state": "deferred", "reply": LATER}
    ]
    assert entry["attempts"] == 1
    assert entry["last_error"] == LATER
    assert entry["size"] > len(message(subject))
    arrived = datetime.fromisoformat(entry["arrival"]).timestamp()
    assert abs(arrived - time.time()) < 60
    next_attempt = datetime.fromisoformat(entry["next_attempt"]).timestamp()
    assert next_attempt - time.time() > 5 * 60  # retry_min 10 m, with jitter
    # `queue` alone and `queue --json` are the same listing.
    assert json.loads(ok(queue(cfg, "--json")).stdout.splitlines()[0])["id"] == queue_id

    for args in ((), ("list",)):  # `queue` alone is `queue list`
        human = ok(queue(cfg, *args)).stdout
        assert queue_id in human and "later@dest.test" in human and "deferred" in human
        assert LATER in human and "-- 1 message in the queue" in human

    shown = ok(queue(cfg, "show", queue_id)).stdout
    assert f"Subject: {subject}" in shown
    assert f"From: {SENDER}" in shown
    assert "Received: from" in shown
    history = shown.split("history:", 1)[1].split("headers:", 1)[0]
    steps = [json.loads(line) for line in history.splitlines() if line.strip()]
    assert len(steps) == 1 and steps[0]["deferred"] == ["later@dest.test"]
    assert steps[0]["reply"] == LATER


def test_queue_hold_survives_flush_release_delivers(
    tmp_path: Path, sink: Sink, relay_factory, events, monkeypatch
) -> None:
    cfg, relay = deferring_relay(tmp_path, sink, relay_factory, monkeypatch)
    held_subject, control_subject = token(), token()
    held = deferred(events, relay, "later@dest.test", held_subject)
    control = deferred(events, relay, "later@dest.test", control_subject)

    assert ok(queue(cfg, "hold", held)).stdout.strip() == f"{held}: held"
    states = {queue_id: entry["state"] for queue_id, entry in listing(cfg).items()}
    assert states == {held: "held", control: "deferred"}
    assert (tmp_path / "spool" / "hold" / held).exists()
    refused = queue(cfg, "flush", held)
    assert refused.returncode == 1 and "release" in refused.stdout

    del sink.handler.rcpt_replies["later@dest.test"]
    ok(queue(cfg, "flush"))
    # The control message, deferred for 10 min, comes at once: the flush works ...
    wait_message(sink, subject_is(control_subject), PROMPT, "the flushed control message")
    # ... and passed the held one by. A bounded absence check: 3 s is far beyond the
    # milliseconds the control needed, and far below the 10 min retry_min.
    assert absent_for(sink, subject_is(held_subject), 3.0), "a held message was sent"
    assert listing(cfg)[held]["state"] == "held"

    released_at = time.monotonic()
    assert ok(queue(cfg, "release", held)).stdout.strip() == f"{held}: released"
    got = wait_message(sink, subject_is(held_subject), PROMPT, "the released message")
    assert got.at - released_at < PROMPT
    wait_until(lambda: held not in listing(cfg), 5.0, "the released message to be done")


def test_queue_delete_without_dsn_and_bounce_with_dsn(
    tmp_path: Path, sink: Sink, relay_factory, events, monkeypatch
) -> None:
    cfg, relay = deferring_relay(tmp_path, sink, relay_factory, monkeypatch)
    deleted_subject, bounced_subject = token(), token()
    deleted = deferred(events, relay, "later@dest.test", deleted_subject)
    bounced = deferred(events, relay, "later@dest.test", bounced_subject, "bob@client.test")

    assert ok(queue(cfg, "delete", deleted)).stdout.strip() == f"{deleted}: deleted"
    assert not [n for n in spool_names(tmp_path) if deleted in n], spool_names(tmp_path)
    assert deleted not in listing(cfg)

    result = ok(queue(cfg, "bounce", bounced))
    assert result.stdout.startswith(f"{bounced}: bounced (DSN ")
    dsn = wait_message(sink, lambda m: m.mail_from == "", PROMPT, "the DSN")
    assert dsn.rcpt_tos == ["bob@client.test"]
    text = dsn.content.decode("utf-8", "replace")
    assert "Action: failed" in text
    assert "Status: 5.0.0" in text
    assert "Final-Recipient: rfc822; later@dest.test" in text
    assert bounced_subject in text
    assert not [n for n in spool_names(tmp_path) if bounced in n]
    wait_until(lambda: not listing(cfg), 5.0, "an empty queue")

    # The deleted message left no DSN: the bounce's DSN, queued after the delete, is the
    # only null-sender message, and no log (the relay's or the commands') tells of one.
    assert [m for m in sink.messages if m.mail_from == ""] == [dsn]
    assert deleted_subject not in text
    assert not events.events("dsn_queued", queue_id=deleted)
    commands = queue_log(tmp_path)
    assert [r["event"] for r in commands if r.get("queue_id") == deleted] == ["deleted"]
    assert [r for r in commands if r["event"] == "dsn_queued" and r["queue_id"] == bounced]
    assert not [m for m in sink.messages if deleted_subject.encode() in m.content]


@pytest.mark.parametrize("action", ["hold", "release", "delete", "bounce", "flush"])
def test_queue_unknown_id_exits_1(tmp_path: Path, sink: Sink, action: str) -> None:
    cfg = write_config(tmp_path, sink.port)
    Spool(str(tmp_path / "spool")).create()
    result = queue(cfg, action, "0000000000NOSUCH")
    assert result.returncode == 1, (result.stdout, result.stderr)
    assert "0000000000NOSUCH: " in result.stdout + result.stderr
    assert "not" in result.stdout + result.stderr
    assert "Traceback" not in result.stderr


def test_queue_show_unknown_id_exits_1_with_a_message(tmp_path: Path, sink: Sink) -> None:
    cfg = write_config(tmp_path, sink.port)
    Spool(str(tmp_path / "spool")).create()
    result = queue(cfg, "show", "0000000000NOSUCH")
    assert result.returncode == 1, (result.stdout, result.stderr)
    assert "Traceback" not in result.stderr
    assert "not in the queue" in result.stdout + result.stderr


def test_queue_hold_waits_for_an_attempt_in_flight(
    tmp_path: Path, sink: Sink, relay_factory, events
) -> None:
    cfg = deferring_config(tmp_path, sink)
    gate = threading.Event()

    async def slow_data(server, session, envelope):
        while not gate.is_set():
            await asyncio.sleep(0.01)
        return "451 4.3.0 not now"

    sink.handler.handle_DATA = slow_data  # read by each new upstream session
    relay = relay_factory(load_config(cfg))
    try:
        queue_id = relay.send(SENDER, ["x@dest.test"], message(token()))
        active = tmp_path / "spool" / "active" / queue_id
        wait_until(active.exists, 5.0, "the attempt to start")
        hold = subprocess.Popen(
            [sys.executable, "-m", "smarthost", "-c", str(cfg), "queue", "hold", queue_id],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            cwd=ROOT,
        )
        # Bounded absence check: while the upstream sits on DATA, hold must not act.
        with pytest.raises(subprocess.TimeoutExpired):
            hold.wait(1.5)
        assert active.exists()
    finally:
        gate.set()
    out, err = hold.communicate(timeout=30)
    assert hold.returncode == 0, (out, err)
    assert out.strip() == f"{queue_id}: held"
    assert events.events("deferred", queue_id=queue_id)  # the attempt ended first
    assert (tmp_path / "spool" / "hold" / queue_id).exists()
    assert listing(cfg)[queue_id]["state"] == "held"


# -- 6. a hostile drop area ----------------------------------------------------------------


def test_hostile_drop_files_are_quarantined_and_good_mail_flows(
    tmp_path: Path, sink: Sink, relay_process
) -> None:
    cfg = config_with(tmp_path, sink, size=("[smtp]\n", '[smtp]\nmax_message_size = "10K"\n'))
    proc = relay_process(cfg).start()
    drop = drop_dir(tmp_path)
    passwd = Path("/etc/passwd")
    passwd_before = (hashlib.sha256(passwd.read_bytes()).hexdigest(), passwd.stat().st_mtime)
    hostile = {
        "symlink": lambda p: os.symlink("/etc/passwd", p),
        "fifo": lambda p: os.mkfifo(p, 0o644),
        "garbage": lambda p: p.write_bytes(b"\x00\xff" + os.urandom(510)),
        "bad-json": lambda p: p.write_bytes(DROP_MAGIC + b'{"sender": "a@b", \n\r\n\r\nhi'),
        "not-an-object": lambda p: p.write_bytes(DROP_MAGIC + b'["a@b", ["x@dest.test"]]\n'),
    }
    # Submissions (a sender, recipients, a message) that the relay refuses: bounced to
    # their sender, not set aside (test_refused_drop_files_are_bounced_to_the_submitter).
    big, dash = token(), token()
    long_body = ("z" * 76 + "\n") * 1100  # 85 KiB
    oversized = drop_file("a@client.test", ["x@dest.test"], message(big, body=long_body))
    injected = drop_file("a@client.test", ["-oQ/tmp"], message(dash))
    refused = {
        "oversized": lambda p: p.write_bytes(oversized),
        "dash-recipient": lambda p: p.write_bytes(injected),
    }
    names = {kind: hostile_name() for kind in (*hostile, *refused)}
    good = token()
    for kind, make in {**hostile, **refused}.items():
        place_in_drop(drop, names[kind], make)
    ok(sendmail(cfg, "x@dest.test", stdin=message(good)))  # at the same time

    got = wait_message(sink, subject_is(good), PROMPT, "the good local message")
    assert got.rcpt_tos == ["x@dest.test"]

    def quarantined() -> dict[str, dict]:
        found = {r["file"]: r for r in proc.records() if r.get("event") == "quarantined"}
        return found if len(found) >= len(hostile) else {}

    events = wait_until(quarantined, PROMPT, "every hostile file to be quarantined")
    assert sorted(events) == sorted(f"drop/{names[kind]}" for kind in hostile)
    for record in events.values():
        assert record["level"] == "warning"
    assert "not a regular file" in events[f"drop/{names['fifo']}"]["reason"]
    assert "no drop record" in events[f"drop/{names['garbage']}"]["reason"]
    assert "not a JSON object" in events[f"drop/{names['not-an-object']}"]["reason"]
    for subject, status in ((big, "5.3.4"), (dash, "5.1.3")):
        dsn = wait_message(sink, dsn_about(subject), PROMPT, f"the DSN for {status}")
        assert dsn.rcpt_tos == ["a@client.test"] and f"Status: {status}" in dsn_text(dsn)
    wait_until(lambda: not drop_files(tmp_path), PROMPT, "the drop area to be empty")

    # Moved aside, not deleted, and the link itself moved, not what it points to.
    corrupt = {p.name.split("-", 2)[2]: p for p in (tmp_path / "spool" / "corrupt").iterdir()}
    assert sorted(corrupt) == sorted(names[kind] for kind in hostile)
    link = corrupt[names["symlink"]]
    assert link.is_symlink() and os.readlink(link) == "/etc/passwd"
    assert stat.S_ISFIFO(corrupt[names["fifo"]].lstat().st_mode)
    after = (hashlib.sha256(passwd.read_bytes()).hexdigest(), passwd.stat().st_mtime)
    assert after == passwd_before
    assert not [m for m in sink.messages if "-oQ/tmp" in m.rcpt_tos]
    assert not [m for m in sink.messages if m.mail_from and big.encode() in m.content]

    # Still alive and still answering SMTP.
    assert proc.proc is not None and proc.proc.poll() is None
    after_subject = token()
    with smtplib.SMTP("127.0.0.1", proc.port, timeout=10) as client:
        assert client.ehlo("client.test")[0] == 250
        client.sendmail(SENDER, ["x@dest.test"], message(after_subject).replace(b"\n", b"\r\n"))
    wait_message(sink, subject_is(after_subject), PROMPT, "mail sent after the attack")
    assert not [r for r in proc.records() if r.get("event") == "<not json>"]
    assert proc.stop() == 0


@pytest.mark.parametrize(
    "record",
    [b"[" * 100_000, b'{"sender": "\\udc80@client.test", "recipients": ["x@dest.test"]}'],
    ids=["deep-json", "lone-surrogate"],
)
def test_a_drop_file_that_breaks_the_parser_does_not_stop_pickup(
    tmp_path: Path, sink: Sink, relay_process, record: bytes
) -> None:
    cfg = write_config(tmp_path, sink.port)
    proc = relay_process(cfg).start()
    name = hostile_name()
    place_in_drop(drop_dir(tmp_path), name, lambda p: p.write_bytes(DROP_MAGIC + record + b"\n"))

    def handled() -> bool:
        records = proc.records()
        return any(r.get("file") == f"drop/{name}" for r in records) or any(
            r.get("event") == "<not json>" and "Error" in r["line"] for r in records
        )

    wait_until(handled, PROMPT, "the pickup to handle the hostile file")
    # A traceback on stderr is the pickup thread dying: fail now, not after a timeout.
    assert not [r["line"] for r in proc.records() if r.get("event") == "<not json>"]
    good = token()
    ok(sendmail(cfg, "x@dest.test", stdin=message(good)))
    wait_message(sink, subject_is(good), PROMPT, "local mail after the hostile file")
    assert [r for r in proc.records() if r.get("file") == f"drop/{name}"]
    assert proc.stop() == 0


def test_quarantine_never_overwrites_an_earlier_file(
    tmp_path: Path, sink: Sink, relay_factory
) -> None:
    cfg = write_config(tmp_path, sink.port)
    relay_factory(load_config(cfg))
    drop, corrupt = drop_dir(tmp_path), tmp_path / "spool" / "corrupt"
    name = hostile_name()
    # Start early in a second so both quarantines fall in it (they take milliseconds).
    wait_until(lambda: time.time() % 1 < 0.2, 2.0, "the start of a second")
    started = int(time.time())
    for n in (1, 2):
        place_in_drop(drop, name, lambda p, n=n: p.write_bytes(f"garbage {n}\n".encode()))
        wait_until(lambda: not (drop / name).exists(), PROMPT, f"bad file {n} to be moved")
    if int(time.time()) != started:
        pytest.skip("crossed a second boundary: cannot show the collision this time")
    kept = sorted(p.read_bytes() for p in corrupt.iterdir() if name in p.name)
    assert kept == [b"garbage 1\n", b"garbage 2\n"]


# -- 7. exit 0 is the promise of 250 ---------------------------------------------------------


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


def test_refused_drop_files_are_bounced_to_the_submitter(
    tmp_path: Path, sink: Sink, relay_process
) -> None:
    """A drop file the relay still refuses at pickup (crafted, or the config changed
    since sendmail checked it) gets a DSN, to its sender or else to the user who dropped
    it; nothing goes to corrupt/, nothing is sent as it was."""
    cfg = config_with(tmp_path, sink, size=("[smtp]\n", '[smtp]\nmax_message_size = "64K"\n'))
    shrunk = token()
    # Accepted under a 64 KiB limit; the relay then starts with 10 KiB.
    ok(sendmail(cfg, "-i", "-f", "carol@client.test", "x@dest.test", stdin=message(
        shrunk, body=("y" * 76 + "\n") * 500
    )))  # fmt: skip
    cfg.write_text(cfg.read_text().replace('max_message_size = "64K"', 'max_message_size = "10K"'))
    Spool(str(tmp_path / "spool")).create()
    loop, null_loop, bad_sender = token(), token(), token()
    crafted = {
        loop: (drop_file("bob@client.test", ["x@dest.test"], message(loop, *hops(51))), "5.4.6"),
        null_loop: (drop_file("", ["x@dest.test"], message(null_loop, *hops(60))), "5.4.6"),
        bad_sender: (drop_file("-oQ/tmp", ["x@dest.test"], message(bad_sender)), "5.1.7"),
    }
    for data, _ in crafted.values():
        place_in_drop(drop_dir(tmp_path), hostile_name(), lambda p, d=data: p.write_bytes(d))
    expected = {
        shrunk: ("carol@client.test", "5.3.4"),
        loop: ("bob@client.test", "5.4.6"),
        null_loop: (f"{user()}@{HOSTNAME}", "5.4.6"),  # no sender: the user who dropped it
        bad_sender: (f"{user()}@{HOSTNAME}", "5.1.7"),
    }
    proc = relay_process(cfg).start()
    for subject, (to, status) in expected.items():
        dsn = wait_message(sink, dsn_about(subject), PROMPT, f"the DSN for {subject}")
        assert dsn.rcpt_tos == [to], (subject, dsn.rcpt_tos)
        text = dsn_text(dsn)
        assert f"Status: {status}" in text and "Action: failed" in text, text
        assert "Final-Recipient: rfc822; x@dest.test" in text
        assert "Remote-MTA" not in text  # the relay's own refusal
    wait_until(lambda: not drop_files(tmp_path), PROMPT, "the drop area to be empty")
    records = proc.records()
    rejected = [r for r in records if r.get("event") == "rejected" and r.get("client") == "local"]
    assert len(rejected) == len(expected), rejected
    assert {r["status"] for r in rejected} == {"5.3.4", "5.4.6", "5.1.7"}
    assert all(r["file"].startswith("drop/") and r["user"] == user() for r in rejected)
    assert not [r for r in records if r.get("event") == "quarantined"]
    assert not list((tmp_path / "spool" / "corrupt").iterdir())
    # Never sent as they were: every message at the sink is a DSN.
    assert all(m.mail_from == "" for m in sink.messages), [m.mail_from for m in sink.messages]
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


def test_mail_dropped_while_the_relay_starts_is_picked_up_at_once(
    tmp_path: Path, sink: Sink, relay_process
) -> None:
    """Submissions throughout the start: every one is taken in at once, none waits for
    the pickup's 10 s rescan (the watch is armed before the first scan)."""
    cfg = write_config(tmp_path, sink.port)
    spool = Spool(str(tmp_path / "spool"))
    spool.create()
    dropped: dict[str, float] = {}  # subject -> when it was durably in drop/ (wall clock)
    failures: list[object] = []
    stop = threading.Event()

    def writer() -> None:
        # As fast as a loop goes, in sendmail's format through its own code: the real
        # command takes ~0.1 s to start, too slow to land in a window of milliseconds.
        while not stop.is_set():
            subject = token()
            drop.write(spool, SENDER, ["x@dest.test"], message(subject).replace(b"\n", b"\r\n"))
            dropped[subject] = time.time()
            stop.wait(0.005)  # a backlog of thousands would test the disk, not the watch

    def command() -> None:
        while not stop.is_set():
            subject = token()
            result = sendmail_entry(cfg, "-i", "x@dest.test", stdin=message(subject))
            if result.returncode != 0:
                failures.append(result)
            dropped[subject] = time.time()

    proc = relay_process(cfg)
    start_amid(proc, [writer, command, command, command], stop, linger=0.5, join_timeout=30)
    assert not failures, failures
    stopped = time.time()

    def received() -> dict[str, float]:
        return received_locally(proc.records())

    # 8 s after the last submission: below the 10 s rescan that would have found a file
    # the pickup missed, far above what a backlog of these files takes (on a busy machine).
    wait_until(lambda: len(received()) >= len(dropped), 8.0, "every dropped file taken in")
    assert time.time() - stopped < 10.0
    assert len(received()) == len(dropped)
    assert drop_files(tmp_path) == []
    got = sink.wait_for(len(dropped), 30.0)
    subjects = {m.content.split(b"Subject: ", 1)[1].split(b"\r\n", 1)[0].decode() for m in got}
    assert subjects >= set(dropped)
    assert proc.stop() == 0


def test_watches_are_armed_before_the_first_scans(tmp_path: Path, sink: Sink, monkeypatch) -> None:
    """The order behind the test above, which a race rarely shows: the delivery half
    arms its watches on drop/ and queue/ before the pickup's and the scheduler's first
    scans. Armed after, a file landing between a scan's listing and the arming waits
    for the 10 s rescan unless some later file wakes the pickup."""
    armed = threading.Event()
    first_scans: dict[str, bool] = {}  # scan -> were the watches armed when it began
    scanned = threading.Condition()
    watcher_start, pickup_scan = Watcher.start, Pickup.scan
    scheduler_scan = smarthost.scheduler.Scheduler._scan

    def start(self) -> None:
        watcher_start(self)
        armed.set()

    def record(name: str, original: Callable) -> Callable:
        def scan(self, *args, **kwargs):
            with scanned:
                first_scans.setdefault(name, armed.is_set())
                scanned.notify_all()
            return original(self, *args, **kwargs)

        return scan

    monkeypatch.setattr(Watcher, "start", start)
    monkeypatch.setattr(Pickup, "scan", record("drop/", pickup_scan))
    monkeypatch.setattr(smarthost.scheduler.Scheduler, "_scan", record("queue/", scheduler_scan))
    config = load_config(write_config(tmp_path, sink.port))
    spool = Spool(config.spool.dir)
    spool.create()
    delivery = Delivery(config, spool)
    delivery.start()
    try:
        with scanned:
            assert scanned.wait_for(lambda: len(first_scans) == 2, 10.0), first_scans
    finally:
        delivery.stop(5.0)
    assert first_scans == {"drop/": True, "queue/": True}


def test_drop_list_entries_lists_submissions_and_names_garbage(tmp_path: Path) -> None:
    """`drop.list_entries`, what `queue list` shows as state `dropped`: every readable
    submission from its record alone, and each bad entry named; never an exception."""
    cfg = write_config(tmp_path, 1)
    first, second = token(), token()
    ok(sendmail(cfg, "-i", "-f", "bob@client.test", "x@dest.test", "y@dest.test",
                stdin=message(first)))  # fmt: skip
    ok(sendmail(cfg, "-i", "z@dest.test", stdin=message(second, body="b" * 300_000 + "\n")))
    directory = drop_dir(tmp_path)
    bad = {name: hostile_name() for name in ("symlink", "fifo", "dir", "truncated", "garbage")}
    os.symlink("/etc/passwd", directory / bad["symlink"])
    os.mkfifo(directory / bad["fifo"])
    (directory / bad["dir"]).mkdir()
    (directory / bad["truncated"]).write_bytes(DROP_MAGIC + b'{"sender": "a@b", "recip')
    (directory / bad["garbage"]).write_bytes(b"\x00" * 64)
    (directory / "not-a-drop-name").write_bytes(b"x")
    (directory / f".tmp-{secrets.token_hex(16)}").write_bytes(b"being written")

    listing = drop.list_entries(Spool(str(tmp_path / "spool")))
    assert [e.recipients for e in listing.entries] == [
        ["x@dest.test", "y@dest.test"],
        ["z@dest.test"],
    ]
    one, two = listing.entries
    assert (one.sender, two.sender) == ("bob@client.test", f"{user()}@{HOSTNAME}")
    assert one.owner == user() and one.id + ".drop" == one.name and len(one.id) == 32
    assert abs(one.arrival - time.time()) < 60 and one.arrival <= two.arrival
    _, content = read_drop(directory / two.name)
    assert two.size == len(content) > 300_000
    problems = dict(listing.problems)
    assert sorted(problems) == sorted([*bad.values(), "not-a-drop-name"]), problems
    assert "cannot open" in problems[bad["symlink"]]
    assert "not a regular file" in problems[bad["fifo"]]
    assert "truncated" in problems[bad["truncated"]]
    # A drop area that does not exist yet is empty, not an error.
    assert drop.list_entries(Spool(str(tmp_path / "nowhere"))) == drop.Listing()


# -- 8. sendmail -bs: SMTP on standard input and output ---------------------------------------


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
    cfg = config_with(tmp_path, sink, size=("[smtp]\n", '[smtp]\nmax_message_size = "10K"\n'))
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
