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
from conftest import ROOT, Received, Sink, wait_until, write_config

import smarthost.scheduler
from smarthost.config import load_config
from smarthost.spool import Spool

DROP_MAGIC = b"SMARTHOST-DROP 1\n"
HOSTNAME = "relay.test"  # write_config's hostname
PROMPT = 5.0  # "at once": well below the pickup's and the scheduler's 10 s rescans
SENDER = "alice@client.test"
LATER = "451 4.2.0 later"


# -- helpers --------------------------------------------------------------------------


def sendmail(cfg: Path, *args: str, stdin: bytes = b"") -> subprocess.CompletedProcess:
    """`smarthost -c CFG sendmail ARGS...`, the message on stdin."""
    return subprocess.run(
        [sys.executable, "-m", "smarthost", "-c", str(cfg), "sendmail", *args],
        input=stdin,
        capture_output=True,
        timeout=30,
        cwd=ROOT,
    )


def sendmail_entry(cfg: Path, *args: str, stdin: bytes = b"") -> subprocess.CompletedProcess:
    """The `smarthost-sendmail` console script's entry point, with `-C CFG`."""
    code = "import sys; from smarthost.cli import sendmail_main; sys.exit(sendmail_main())"
    return subprocess.run(
        [sys.executable, "-c", code, "-C", str(cfg), *args],
        input=stdin,
        capture_output=True,
        timeout=30,
        cwd=ROOT,
    )


def queue(cfg: Path, *args: str) -> subprocess.CompletedProcess:
    """`smarthost -c CFG queue ARGS...`, output as text."""
    return subprocess.run(
        [sys.executable, "-m", "smarthost", "-c", str(cfg), "queue", *args],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
    )


def ok(result: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert result.returncode == 0, (result.returncode, result.stdout, result.stderr)
    return result


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
    cfg = deferring_config(tmp_path, sink)
    relay = relay_factory(load_config(cfg))
    sink.handler.rcpt_replies["later@dest.test"] = LATER
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
    # No rescan during the test: only the watcher can explain a prompt delivery.
    monkeypatch.setattr(smarthost.scheduler, "RESCAN_INTERVAL", 3600.0)
    cfg = deferring_config(tmp_path, sink)
    relay = relay_factory(load_config(cfg))
    sink.handler.rcpt_replies["later@dest.test"] = LATER
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
    # No rescan during the test: only the watcher can explain a prompt delivery.
    monkeypatch.setattr(smarthost.scheduler, "RESCAN_INTERVAL", 3600.0)
    cfg = deferring_config(tmp_path, sink)
    relay = relay_factory(load_config(cfg))
    sink.handler.rcpt_replies["later@dest.test"] = LATER
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
    record = json.dumps({"sender": "a@client.test", "recipients": ["x@dest.test"]}).encode()
    oversized = DROP_MAGIC + record + b"\n" + b"Subject: big\r\n\r\n" + b"z" * (80 * 1024)
    injected = json.dumps({"sender": "a@client.test", "recipients": ["-oQ/tmp"]}).encode()
    hostile = {
        "symlink": lambda p: os.symlink("/etc/passwd", p),
        "fifo": lambda p: os.mkfifo(p, 0o644),
        "oversized": lambda p: p.write_bytes(oversized),
        "garbage": lambda p: p.write_bytes(b"\x00\xff" + os.urandom(510)),
        "bad-json": lambda p: p.write_bytes(DROP_MAGIC + b'{"sender": "a@b", \n\r\n\r\nhi'),
        "dash-recipient": lambda p: p.write_bytes(DROP_MAGIC + injected + b"\n\r\nhi\r\n"),
    }
    names = {kind: hostile_name() for kind in hostile}
    good = token()
    for kind, make in hostile.items():
        place_in_drop(drop, names[kind], make)
    ok(sendmail(cfg, "x@dest.test", stdin=message(good)))  # at the same time

    got = wait_message(sink, subject_is(good), PROMPT, "the good local message")
    assert got.rcpt_tos == ["x@dest.test"]

    def quarantined() -> dict[str, dict]:
        found = {r["file"]: r for r in proc.records() if r.get("event") == "quarantined"}
        return found if len(found) >= len(names) else {}

    events = wait_until(quarantined, PROMPT, "every hostile file to be quarantined")
    for kind, name in names.items():
        assert f"drop/{name}" in events, (kind, events)
        assert events[f"drop/{name}"]["level"] == "warning"
    assert "not a regular file" in events[f"drop/{names['fifo']}"]["reason"]
    assert "larger than" in events[f"drop/{names['oversized']}"]["reason"]
    assert "no drop record" in events[f"drop/{names['garbage']}"]["reason"]
    assert "bad drop record" in events[f"drop/{names['dash-recipient']}"]["reason"]
    assert drop_files(tmp_path) == []

    # Moved aside, not deleted, and the link itself moved, not what it points to.
    corrupt = {p.name.split("-", 2)[2]: p for p in (tmp_path / "spool" / "corrupt").iterdir()}
    assert sorted(corrupt) == sorted(names.values())
    link = corrupt[names["symlink"]]
    assert link.is_symlink() and os.readlink(link) == "/etc/passwd"
    assert stat.S_ISFIFO(corrupt[names["fifo"]].lstat().st_mode)
    assert corrupt[names["oversized"]].read_bytes() == oversized
    after = (hashlib.sha256(passwd.read_bytes()).hexdigest(), passwd.stat().st_mtime)
    assert after == passwd_before
    assert not [m for m in sink.messages if b"-oQ" in m.content or "-oQ/tmp" in m.rcpt_tos]

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
