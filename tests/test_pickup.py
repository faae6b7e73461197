"""The pickup end to end: mail dropped by `smarthost-sendmail` (or placed in the drop
area directly) taken into the queue at start and at once while running, a hostile drop
area quarantined without stopping the flow, refused drop files bounced to their
submitter, and the watches armed before the first scans.

The relay runs as a real process (`relay_process`) against a config on disk, a real
aiosmtpd upstream (the `sink`) receives what it sends; nothing is mocked.
"""

from __future__ import annotations

import hashlib
import os
import stat
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest

import smarthost.scheduler
from smarthost import drop
from smarthost.config import load_config
from smarthost.delivery import Delivery
from smarthost.pickup import Pickup
from smarthost.spool import Spool
from smarthost.watcher import Watcher

from support.cli import ok, sendmail, sendmail_entry
from support.configs import write_config
from support.local import (
    DROP_MAGIC,
    PROMPT,
    drop_dir,
    drop_file,
    drop_files,
    dsn_about,
    dsn_text,
    hops,
    hostile_name,
    message,
    place_in_drop,
    read_drop,
    spool_names,
    subject_is,
    token,
    user,
    wait_message,
)
from support.logs import received_locally
from support.relay import start_amid
from support.sink import Sink
from support.smtp import send_one
from support.waiting import wait_until

HOSTNAME = "relay.test"  # write_config's hostname
SENDER = "alice@client.test"


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


# -- 2. a hostile drop area ----------------------------------------------------------------


def test_hostile_drop_files_are_quarantined_and_good_mail_flows(
    tmp_path: Path, sink: Sink, relay_process
) -> None:
    cfg = write_config(tmp_path, sink.port, smtp='max_message_size = "10K"')
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
    send_one(proc.port, SENDER, ["x@dest.test"], message(after_subject).replace(b"\n", b"\r\n"))
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


# -- 3. what the pickup still refuses, and the start-up -------------------------------------


def test_refused_drop_files_are_bounced_to_the_submitter(
    tmp_path: Path, sink: Sink, relay_process
) -> None:
    """A drop file the relay still refuses at pickup (crafted, or the config changed
    since sendmail checked it) gets a DSN, to its sender or else to the user who dropped
    it; nothing goes to corrupt/, nothing is sent as it was."""
    cfg = write_config(tmp_path, sink.port, smtp='max_message_size = "64K"')
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


def test_a_stop_just_before_the_loop_clears_its_wake_ends_the_thread(tmp_path):
    """`stop` sets the flag and then the wake: if both came between the loop's look at
    the flag and its clearing of the wake, the thread must not sleep until the next
    rescan (an hour here), keeping the delivery process past its grace."""
    config = load_config(write_config(tmp_path, 9))
    spool = Spool(config.spool.dir)
    spool.create()
    pickup = Pickup(config, spool, lambda env: None, rescan=3600.0)
    clear = pickup._wake.clear
    cleared = threading.Event()

    def stopped_just_before_the_clear() -> None:
        if not cleared.is_set():
            pickup._stopping.set()  # what stop() does ...
            pickup._wake.set()
            cleared.set()
        clear()

    pickup._wake.clear = stopped_just_before_the_clear  # type: ignore[method-assign]
    pickup.start()
    assert cleared.wait(5)
    assert pickup._thread is not None
    pickup._thread.join(3.0)
    assert not pickup._thread.is_alive(), "the pickup slept through the stop"
