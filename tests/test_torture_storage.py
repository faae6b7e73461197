"""Torture: storage faults under the real relay process.

ENOSPC and EIO are injected (tests/faults: the relay runs as `python -m faults ...
serve`) on every kind of spool write, fsync and rename: before the commit point the
client must get a 4xx with an enhanced code (SPEC §4: 452 4.3.1 no space, 451 4.3.0),
never 250, and nothing half-written may go out; after it (delivery bookkeeping,
requeue, DSN commit, removal) the message must not be lost and the relay must keep
running; once the fault is gone mail flows again. As root, a real tiny tmpfs is filled
up, and a read-only spool must be refused at start with a clear message.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from smarthost.scheduler import DEFAULT_INTERVALS

from faults.harness import (
    DEADLINE,
    LARGE_SIZES,
    Ledger,
    assert_spool_sane,
    faulty_relays,
    lines_for_size,
    problems,
    resolve,
    try_send,
)
from support import ROOT
from support.configs import write_config
from support.logs import events_named
from support.sink import Sink
from support.spool import spool_drained, spool_files
from support.waiting import wait_until

EXPECTED = {"ENOSPC": (452, "4.3.1"), "EIO": (451, "4.3.0")}


@pytest.fixture
def faulty(tmp_path):
    yield from faulty_relays(tmp_path)


def at_rest(ledger: Ledger, sink: Sink, spool: Path) -> None:
    ledger.wait_settled(sink, spool)
    wait_until(
        lambda: spool_drained(spool, "tmp"), DEADLINE, f"a drained spool: {spool_files(spool)}"
    )
    assert_spool_sane(spool)


# -- 1. faults before the commit point: the client is told 4xx -----------------------------

# (name, rule, past the commit point: the envelope was already in queue/, so a worker
# may have claimed it before the commit was taken back; the client, told 4xx, resends)
COMMIT_FAULTS = [
    ("open-content", {"op": "open", "path": "tmp_msg"}, False),
    ("write-content", {"op": "write", "path": "tmp_msg"}, False),
    ("short-write-content", {"op": "write", "path": "tmp_msg", "partial": True}, False),
    ("syncfs-data", {"op": "syncfs", "path": "queue_dir", "nth": 1}, False),
    ("rename-content", {"op": "rename", "path": "tmp_msg"}, False),
    ("link-into-queue", {"op": "link", "path": "msg", "dst": "queue"}, False),
    ("syncfs-names", {"op": "syncfs", "path": "queue_dir", "nth": 2}, True),
]
# The same for large mail (past spool.IN_MEMORY): its draft is written into tmp/ as DATA
# arrives (a fault there refuses the message at the end of DATA), then the two-file
# commit (the draft renamed into msg/, its envelope written apart, renamed into queue/).
LARGE_COMMIT_FAULTS = [
    ("open-draft", {"op": "open", "path": "tmp_draft"}, False),
    ("write-draft", {"op": "write", "path": "tmp_draft", "nth": 3}, False),
    ("short-write-draft", {"op": "write", "path": "tmp_draft", "nth": 2, "partial": True}, False),
    ("syncfs-data", {"op": "syncfs", "path": "queue_dir", "nth": 1}, False),
    ("rename-draft", {"op": "rename", "path": "tmp_draft"}, False),
    ("write-envelope", {"op": "write", "path": "tmp_env"}, False),
    ("fsync-envelope", {"op": "fsync", "path": "tmp_env"}, False),
    ("rename-envelope", {"op": "rename", "path": "tmp_env", "dst": "queue"}, False),
    ("syncfs-names", {"op": "syncfs", "path": "queue_dir", "nth": 2}, True),
]
# layout: (faults, the message's size in make test and under --torture, report line)
COMMIT_LAYOUTS = {
    # under --torture many writes per file, still in memory (under spool.IN_MEMORY)
    "one-file": (
        COMMIT_FAULTS,
        (2 * 1024, 200 * 1024),
        "storage: ENOSPC/EIO on each commit step (4xx)",
    ),
    "two-file": (
        LARGE_COMMIT_FAULTS,
        (640 * 1024, LARGE_SIZES[1]),  # past the 3rd write into the draft
        "storage: ENOSPC/EIO on each step of a large message's draft and commit (4xx)",
    ),
}


@pytest.mark.parametrize("layout", list(COMMIT_LAYOUTS))
def test_enospc_and_eio_on_every_commit_step_give_4xx(
    tmp_path, sink, faulty, layout, torture_size, torture_report
):
    """One relay process, every commit step, with ENOSPC and with EIO: the client gets 452 4.3.1
    or 451 4.3.0 (never 250), the error is logged, nothing of the message stays in tmp/
    or msg/, the relay keeps running, and the same message is accepted and delivered
    once the disk heals. For large mail the steps start while DATA still arrives: the
    draft's writes into tmp/."""
    faults, sizes, scenario = COMMIT_LAYOUTS[layout]
    spool = tmp_path / "spool"
    proc = faulty(write_config(tmp_path, sink.port)).start()
    ledger = Ledger()
    refused: dict[str, bool] = {}
    rows = 0
    for name, rule, past_commit in faults:
        for error, (code, enhanced) in EXPECTED.items():
            rows += 1
            message_id = f"<{name}.{error}@client.test>"
            lines = lines_for_size(message_id, torture_size(*sizes))
            errors_before = len(events_named(proc.records(), "spool_error"))
            # The relay commits what it receives (the delivery process commits DSNs).
            proc.arm(resolve(rule, spool, action=error, count=0, process="relay"))
            reply = try_send(proc.port, message_id, lines=lines)
            proc.disarm()
            assert (reply.code, reply.text.split(" ", 1)[0]) == (code, enhanced), (name, reply)
            assert proc.struck(), f"{name}: the fault never fired"
            assert proc.alive()
            refused[message_id] = past_commit
            wait_until(
                lambda n=errors_before: len(events_named(proc.records(), "spool_error")) > n,
                DEADLINE,
                f"{name}: a spool_error log line",
            )
            assert spool_files(spool)["tmp"] == [], (name, spool_files(spool))
            # Nothing of it stays (what was acknowledged before has gone out meanwhile;
            # a refused commit a worker claimed past the commit point goes out too).
            wait_until(
                lambda: spool_drained(spool, "tmp"), DEADLINE, f"{name}: {spool_files(spool)}"
            )
            assert spool_files(spool)["corrupt"] == [], (name, spool_files(spool))
            # The disk is healthy again: the client's retry goes through.
            ledger.ack(message_id, try_send(proc.port, message_id, lines=lines), lines=lines)
            ledger.in_flight += past_commit
    at_rest(ledger, sink, spool)
    copies = ledger.copies(sink)
    for message_id, past_commit in refused.items():
        # The refused copy went out only if a worker had claimed it mid-commit.
        assert 1 <= copies[message_id] <= 1 + past_commit, (message_id, copies[message_id])
    assert proc.stop() == 0
    counts = ledger.counts(sink)
    torture_report(
        scenario,
        rounds=rows,
        **counts,
        note=f"{rows} refused with 4xx then resent; in_flight = faults past the commit point",
    )
    ledger.assert_safe(sink, counts)
    assert not [r for r in problems(proc.records()) if r["event"] != "spool_error"]


# -- 2. faults after the commit point: bookkeeping must not lose the message ---------------

# (name, rule, the upstream's RCPT reply while the fault is pending ("" = accepts),
#  the message bounces, the fault may repeat a delivery). All of this is the delivery
# process's work; the rules aim at it alone (the relay's commit of the message writes
# and renames the same kinds of files, and each process counts its calls itself).
AFTER_COMMIT_FAULTS = [
    (
        "remove-after-delivery-EIO",
        {"op": "unlink", "path": "active", "action": "EIO"},
        "",
        False,
        False,  # the attempt's outcome is kept in memory: the retry sends nothing again
    ),
    (
        "requeue-write-ENOSPC",
        {"op": "write", "path": "tmp_env", "action": "ENOSPC"},
        "451 4.3.0 later",
        False,
        False,
    ),
    (
        "requeue-fsync-EIO",
        {"op": "fsync", "path": "tmp_env", "action": "EIO"},
        "451 4.3.0 later",
        False,
        False,
    ),
    (
        "requeue-rename-EIO",
        {"op": "rename", "path": "active", "dst": "queue", "action": "EIO"},
        "451 4.3.0 later",
        False,
        False,
    ),
    (
        "dsn-write-ENOSPC",
        {"op": "write", "path": "tmp_msg", "action": "ENOSPC"},
        "550 5.1.1 no such user",
        True,
        False,
    ),
    (
        "dsn-link-EIO",
        {"op": "link", "path": "msg", "dst": "queue", "action": "EIO"},
        "550 5.1.1 no such user",
        True,
        False,
    ),
    (
        "claim-EIO",
        # Five claims fail in a row: each failed one gets its hint back (a retry after
        # the backoff, 1-2 s), not a wait for the 10 s rescan.
        {"op": "rename", "path": "queue", "dst": "active", "action": "EIO", "count": 5},
        "",
        False,
        False,
    ),
]
DEFAULT_AFTER_COMMIT = {"remove-after-delivery-EIO", "requeue-write-ENOSPC"}


def test_faults_after_the_commit_lose_nothing(tmp_path, sink, faulty, torture_size, torture_report):
    """A fault in delivery bookkeeping (removing a delivered message, requeueing a
    deferred one, committing a DSN, claiming) is logged, the relay keeps running, and
    the message is delivered or bounced once the fault has passed."""
    spool = tmp_path / "spool"
    rows = [r for r in AFTER_COMMIT_FAULTS if torture_size(r[0] in DEFAULT_AFTER_COMMIT, True)]
    proc = faulty(write_config(tmp_path, sink.port)).start()
    ledger = Ledger()
    for name, rule, rcpt_reply, bounces, repeats in rows:
        message_id = f"<after.{name}@client.test>"
        rcpt = f"{name}@dest.test"
        if rcpt_reply:
            sink.handler.rcpt_replies[rcpt] = rcpt_reply
        proc.arm(resolve(rule, spool, process="delivery"))
        reply = try_send(proc.port, message_id, rcpt=rcpt)
        ledger.ack(message_id, reply)
        if bounces:
            ledger.must_bounce.add(message_id)
        times = rule.get("count", 1)
        wait_until(lambda n=times: len(proc.struck()) >= n, DEADLINE, f"{name}: the faults")
        proc.disarm()
        struck = proc.struck()
        # Retried without waiting for rescans (4 of them would take 30 s at least).
        span = struck[times - 1]["time"] - struck[0]["time"]
        assert span < 2.5 * DEFAULT_INTERVALS.rescan, (name, span, struck)
        if not bounces:
            sink.handler.rcpt_replies.pop(rcpt, None)  # the upstream takes it now
        wait_until(
            lambda q=reply.queue_id: any(
                r.get("queue_id") == q for r in events_named(proc.records(), "spool_error")
            ),
            DEADLINE,
            f"{name}: the fault logged as a spool_error",
        )
        ledger.in_flight += repeats
        at_rest(ledger, sink, spool)
        assert proc.alive()
        copies, dsns = ledger.copies(sink)[message_id], ledger.dsns(sink)[message_id]
        if bounces:
            assert (copies, dsns) == (0, 1), (name, copies, dsns)
        else:
            assert 1 <= copies <= 1 + repeats and dsns == 0, (name, copies, dsns)
    assert proc.stop() == 0
    counts = ledger.counts(sink)
    torture_report(
        "storage: ENOSPC/EIO after the commit point",
        rounds=len(rows),
        **counts,
        note="each fault fired once, then the disk healed",
    )
    ledger.assert_safe(sink, counts)
    assert not [r for r in problems(proc.records()) if r["event"] != "spool_error"]


def test_a_disk_full_for_a_while_delays_but_loses_nothing(
    tmp_path, sink, faulty, torture_size, torture_report
):
    """Every spool write fails with ENOSPC for a while: new mail is refused with 452
    4.3.1 (large mail too, whose draft cannot be written), deferred mail cannot be
    rewritten; when space returns, everything that was acknowledged goes out and new
    mail, small and large, is accepted again."""
    spool = tmp_path / "spool"
    full = tmp_path / "disk-is-full"
    proc = faulty(write_config(tmp_path, sink.port)).start()
    ledger = Ledger()
    deferred = [f"<before-full.{n}@client.test>" for n in range(torture_size(3, 20))]
    sink.handler.rcpt_replies["slow@dest.test"] = "451 4.3.0 later"
    for message_id in deferred:
        ledger.ack(message_id, try_send(proc.port, message_id, rcpt="slow@dest.test"))
    full.touch()
    proc.arm(
        *(
            resolve(
                {"op": ["write", "open"], "path": path},
                spool,
                count=0,
                while_exists=str(full),
                action="ENOSPC",
            )
            for path in ("tmp_msg", "tmp_env", "tmp_draft")
        )
    )
    refused = 0
    deadline = time.monotonic() + torture_size(1.0, 8.0)
    n = 0
    while time.monotonic() < deadline:  # clients keep trying while the disk is full
        message_id = f"<while-full.{n}@client.test>"
        lines = lines_for_size(message_id, LARGE_SIZES[0]) if n % 2 else 20
        reply = try_send(proc.port, message_id, lines=lines)
        assert (reply.code, reply.text.split(" ", 1)[0]) == (452, "4.3.1"), (n, reply)
        assert spool_files(spool)["tmp"] == [], spool_files(spool)  # no draft left
        refused += 1
        n += 1
        time.sleep(0.1)  # paces the clients
    # Deferred mail was retried meanwhile and could not be rewritten: rescued, logged.
    wait_until(
        lambda: any(
            r.get("queue_id") in ledger.acked.values()
            for r in events_named(proc.records(), "spool_error")
        ),
        DEADLINE,
        "a failed requeue of deferred mail to be logged",
    )
    full.unlink()
    sink.handler.rcpt_replies.clear()
    for i in range(4):
        message_id = f"<after-full.{i}@client.test>"
        lines = lines_for_size(message_id, LARGE_SIZES[0]) if i % 2 else 20
        ledger.ack(message_id, try_send(proc.port, message_id, lines=lines), lines=lines)
    at_rest(ledger, sink, spool)
    copies = ledger.copies(sink)
    assert not [m for m in copies if m and m.startswith("<while-full.")], copies
    assert proc.stop() == 0
    counts = ledger.counts(sink)
    torture_report(
        "storage: disk full for a while (injected ENOSPC)",
        rounds=1,
        **counts,
        note=f"{refused} submissions (every other one large) refused with 452 4.3.1 while full",
    )
    ledger.assert_safe(sink, counts)


# -- 3. a real tiny filesystem -------------------------------------------------------------


@contextlib.contextmanager
def tmpfs(path: Path, size: str, *options: str):
    """Mount a tmpfs at `path` (root only; skip when it cannot be done); always unmount."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    path.mkdir(parents=True, exist_ok=True)
    opts = ",".join((f"size={size}", *options))
    result = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", opts, "tmpfs", str(path)],
        capture_output=True,
        text=True,
        check=False,
    )
    if result.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {result.stderr.strip()}")
    try:
        yield path
    finally:
        done = subprocess.run(["umount", str(path)], capture_output=True, check=False)
        if done.returncode != 0:
            subprocess.run(["umount", "-l", str(path)], capture_output=True, check=False)


def fill(directory: Path) -> Path:
    """Fill the filesystem of `directory` to the last byte; the filler file."""
    filler = directory / "filler"
    with open(filler, "wb", buffering=0) as f:  # unbuffered: nothing left to flush
        chunk = b"\0" * 4096
        try:
            while True:
                f.write(chunk)
        except OSError as exc:
            assert exc.errno == errno.ENOSPC, exc
        with contextlib.suppress(OSError):
            while f.write(b"\0"):  # the last bytes, below a page
                pass
    return filler


def test_a_full_tmpfs_spool_gives_452_and_recovers(tmp_path, sink, faulty, torture_report):
    """A real 512 KiB filesystem as the spool: once full, DATA gets 452 4.3.1 and nothing
    half-written stays behind (the draft of a large message neither); deferred mail
    survives; with space back, mail flows."""
    spool = tmp_path / "spool"
    with tmpfs(spool, "512k"):
        proc = faulty(write_config(tmp_path, sink.port)).start()
        try:
            ledger = Ledger()
            sink.handler.rcpt_replies["slow@dest.test"] = "451 4.3.0 later"
            waiting = "<tmpfs.deferred@client.test>"
            ledger.ack(waiting, try_send(proc.port, waiting, rcpt="slow@dest.test"))
            filler = fill(spool)
            refused = []
            for n in range(3):
                message_id = f"<tmpfs.full.{n}@client.test>"
                lines = lines_for_size(message_id, LARGE_SIZES[0]) if n == 1 else 1500
                reply = try_send(proc.port, message_id, lines=lines)
                refused.append(reply)
                assert (reply.code, reply.text.split(" ", 1)[0]) == (452, "4.3.1"), reply
                assert proc.alive()
            assert spool_files(spool)["tmp"] == [], spool_files(spool)
            filler.unlink()
            sink.handler.rcpt_replies.clear()
            for n in range(3):
                message_id = f"<tmpfs.after.{n}@client.test>"
                ledger.ack(message_id, try_send(proc.port, message_id, lines=1500), lines=1500)
            at_rest(ledger, sink, spool)
            assert proc.stop() == 0
        finally:
            if proc.alive():
                proc.kill()
    counts = ledger.counts(sink)
    torture_report(
        "storage: real 512 KiB tmpfs spool filled up",
        rounds=1,
        **counts,
        note=f"{len(refused)} refused with 452 4.3.1 while full",
    )
    ledger.assert_whole(sink)
    assert counts["lost"] == 0
    assert not [m for m in ledger.copies(sink) if m and m.startswith("<tmpfs.full.")]


# -- 4. a read-only spool ------------------------------------------------------------------


@pytest.mark.parametrize("existing", [True, False], ids=["existing-spool", "new-spool"])
def test_a_read_only_spool_is_refused_at_start(tmp_path, existing, torture_report):
    """A spool on a read-only filesystem (a tmpfs remounted ro: chmod would not stop
    root) is refused at start: exit 73 (EX_CANTCREAT) and "spool ROOT: cannot set up
    PATH: Read-only file system", no traceback, never started."""
    mount = tmp_path / "ro"
    spool = mount / "spool" if not existing else mount
    config = write_config(tmp_path, 2525)
    config.write_text(config.read_text().replace(str(tmp_path / "spool"), str(spool)))
    with tmpfs(mount, "1m"):
        if existing:
            from smarthost.spool import Spool

            Spool(str(spool)).create()
        remount = subprocess.run(
            ["mount", "-o", "remount,ro", str(mount)], capture_output=True, text=True, check=False
        )
        if remount.returncode != 0:
            pytest.skip(f"cannot remount read-only: {remount.stderr.strip()}")
        result = subprocess.run(
            [sys.executable, "-m", "smarthost", "-c", str(config), "serve"],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
    torture_report(f"storage: read-only spool ({'existing' if existing else 'new'})", rounds=1)
    assert result.returncode == 73, result  # EX_CANTCREAT
    assert "Traceback" not in result.stderr
    # The first thing set-up tries to change: the new spool directory, or the existing
    # root's mode.
    message = re.search(
        rf"spool {re.escape(str(spool))}: cannot set up ({re.escape(str(spool))}\S*): "
        "Read-only file system",
        result.stderr,
    )
    assert message, result.stderr
    assert not [line for line in result.stderr.splitlines() if '"event": "started"' in line]
