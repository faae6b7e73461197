"""`smarthost queue summary` (issue 16): the queue's shape by age, as Postfix's qshape.
Real spools on disk written with the Spool API, the real command as a subprocess."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

from smarthost.queuectl import SUMMARY_BUCKETS, _bucket
from smarthost.spool import (
    ACTIVE,
    DEFERRED,
    DELIVERED,
    FAILED,
    HOLD,
    QUEUE,
    Envelope,
    Recipient,
    Spool,
    new_id,
)

from support import ROOT
from support.cli import ok, queue
from support.configs import write_config

MINUTE = 60.0
CONTENT = [b"Subject: shape\r\n\r\nbody\r\n"]


def summary(cfg: Path, *args: str) -> subprocess.CompletedProcess:
    return ok(queue(cfg, "summary", *args))


def envelope(age: float, *rcpts: Recipient | str, sender: str = "a@Client.Test") -> Envelope:
    recipients = [Recipient(r) if isinstance(r, str) else r for r in rcpts]
    return Envelope(new_id(), sender, recipients, arrival=time.time() - age, size=20)


def put(spool: Spool, env: Envelope, state: str = QUEUE) -> str:
    spool.commit(env, CONTENT)
    if state != QUEUE:
        assert spool.move(env.id, QUEUE, state)
    return env.id


def setup(tmp_path: Path) -> tuple[Path, Spool]:
    cfg = write_config(tmp_path, 9)  # no relay runs: the port is never used
    spool = Spool(str(tmp_path / "spool"))
    spool.create()
    return cfg, spool


def mixed_queue(spool: Spool) -> None:
    """Three domains at known ages (30 s away from any bucket edge), a message to two
    domains, a finished recipient, a message being delivered, held and failed mail."""
    put(spool, envelope(1 * MINUTE, "x@one.test"))  # 0-5m
    put(spool, envelope(5 * MINUTE - 30, "y@one.test"))  # 0-5m, just under the edge
    put(spool, envelope(5 * MINUTE + 1, "z@one.test"))  # 5-10m, just over it
    # Two recipients at one.test and one at two.test: once in each row, once in TOTAL.
    put(spool, envelope(25 * MINUTE, "a@one.test", "b@ONE.test", "c@two.test"))  # 20-40m
    deferred = Recipient("d@two.test", state=DEFERRED, backend="sink", reply="451 later")
    done = Recipient("e@three.test", state=DELIVERED, backend="sink")
    put(spool, envelope(320 * MINUTE, deferred, done, sender=""))  # 320m+, a bounce
    put(spool, envelope(100 * MINUTE, "f@two.test"), ACTIVE)  # 80-160m, active
    put(spool, envelope(60 * MINUTE, "g@four.test"), HOLD)
    put(spool, envelope(60 * MINUTE, "h@four.test"), FAILED)
    put(spool, envelope(60 * MINUTE, "i@four.test"), FAILED)


def counts(**buckets: int) -> list[int]:
    names = [name.replace("-", "_").replace("+", "_up") for name in SUMMARY_BUCKETS]
    return [buckets.get(f"b{name}", 0) for name in names]


def test_bucket_edges():
    """0-5m is [0, 5m), each next bucket starts where the last ends; 320m+ is open; a
    future arrival (a clock set back) is 0-5m."""
    assert SUMMARY_BUCKETS[0] == "0-5m" and SUMMARY_BUCKETS[-1] == "320m+"
    edges = [5, 10, 20, 40, 80, 160, 320]
    for index, minutes in enumerate(edges):
        assert _bucket(minutes * MINUTE - 0.001) == index
        assert _bucket(minutes * MINUTE) == index + 1
    assert _bucket(0) == 0 and _bucket(-3600) == 0
    assert _bucket(10**9) == len(SUMMARY_BUCKETS) - 1


def test_summary_by_domain_as_text_and_json(tmp_path: Path):
    cfg, spool = setup(tmp_path)
    mixed_queue(spool)

    data = json.loads(summary(cfg, "--json").stdout)
    assert data["by"] == "domain" and data["buckets"] == list(SUMMARY_BUCKETS)
    rows = {row["key"]: row for row in data["rows"]}
    assert list(rows) == ["one.test", "two.test"]  # by total, descending
    assert rows["one.test"]["counts"] == counts(b0_5m=2, b5_10m=1, b20_40m=1)
    assert rows["one.test"]["total"] == 4
    assert rows["two.test"]["counts"] == counts(b20_40m=1, b80_160m=1, b320m_up=1)
    assert "three.test" not in rows  # its recipient is delivered
    assert "four.test" not in rows  # held and failed are counted apart
    assert data["total"] == {
        "total": 6,
        "counts": counts(b0_5m=2, b5_10m=1, b20_40m=1, b80_160m=1, b320m_up=1),
        "deferred": 1,
    }
    assert (data["held"], data["failed"], data["dropped"]) == (1, 2, 0)

    text = summary(cfg)
    assert text.stderr == ""
    lines = text.stdout.splitlines()
    assert lines[0].split() == ["T", *SUMMARY_BUCKETS]
    assert lines[1].split() == ["TOTAL", "6", "2", "1", "0", "1", "0", "1", "0", "1"]
    assert lines[2].split() == ["one.test", "4", "2", "1", "0", "1", "0", "0", "0", "0"]
    assert lines[3].split() == ["two.test", "3", "0", "0", "0", "1", "0", "1", "0", "1"]
    assert lines[4] == "-- deferred 1, held 1, failed 2, dropped 0"
    assert len({len(line) for line in lines[:4]}) == 1  # columns aligned, right-justified
    assert lines[0].index("320m+") + 5 == len(lines[0])

    top = json.loads(summary(cfg, "--json", "--top", "1").stdout)
    assert [row["key"] for row in top["rows"]] == ["one.test"]
    assert top["total"]["total"] == 6


def test_summary_by_backend_and_by_sender(tmp_path: Path):
    cfg, spool = setup(tmp_path)
    mixed_queue(spool)

    by_backend = json.loads(summary(cfg, "--by", "backend", "--json").stdout)
    assert by_backend["by"] == "backend"
    rows = {row["key"]: row["counts"] for row in by_backend["rows"]}
    assert rows == {
        "-": counts(b0_5m=2, b5_10m=1, b20_40m=1, b80_160m=1),  # never tried
        "sink": counts(b320m_up=1),  # the deferred recipient's last backend
    }

    by_sender = json.loads(summary(cfg, "--json", "--by", "sender").stdout)
    rows = {row["key"]: row["counts"] for row in by_sender["rows"]}
    assert rows == {
        "client.test": counts(b0_5m=2, b5_10m=1, b20_40m=1, b80_160m=1),
        "<>": counts(b320m_up=1),
    }
    text = summary(cfg, "--by", "sender").stdout.splitlines()
    assert [line.split()[0] for line in text[1:3]] == ["TOTAL", "client.test"]


def test_summary_names_garbage_on_stderr_and_exits_0(tmp_path: Path):
    """A FIFO, a cut envelope, a link and a directory under queue-ID names: each named
    on stderr as `queue list` names it; the good mail is counted."""
    cfg, spool = setup(tmp_path)
    root = tmp_path / "spool"
    put(spool, envelope(MINUTE, "x@one.test"))
    put(spool, envelope(MINUTE, "y@one.test"), HOLD)
    cut = envelope(MINUTE, "z@one.test")
    bad = [
        ("queue", new_id(), lambda p: os.mkfifo(p)),
        ("active", cut.id, lambda p: p.write_bytes(cut.to_bytes()[:20])),
        ("hold", new_id(), lambda p: os.symlink("/etc/passwd", p)),
        ("failed", new_id(), lambda p: p.mkdir()),
    ]
    for state, queue_id, make in bad:
        make(root / state / queue_id)

    for args in ((), ("--json",)):
        done = summary(cfg, *args)
        for state, queue_id, _ in bad:
            assert f"smarthost: queue: {state}/{queue_id}: " in done.stderr, done.stderr
        assert len(done.stderr.splitlines()) == len(bad)
        assert "Traceback" not in done.stderr
    data = json.loads(done.stdout)
    assert data["total"]["total"] == 1 and (data["held"], data["failed"]) == (1, 0)
    assert "4 unreadable (named on stderr)" in summary(cfg).stdout


def test_summary_into_a_closed_pipe_ends_quietly(tmp_path: Path):
    """`queue summary | head -1` with more rows than a pipe holds: exit 0, no message."""
    cfg, spool = setup(tmp_path)
    messages = [(envelope(MINUTE, f"x@domain-{n}.test"), CONTENT) for n in range(3000)]
    assert not any(spool.commit_many(messages))
    command = f"set -o pipefail; '{sys.executable}' -m smarthost -c '{cfg}' queue summary | head -1"
    done = subprocess.run(
        ["bash", "-c", command], capture_output=True, text=True, timeout=60, cwd=ROOT
    )
    assert done.returncode == 0, (done.returncode, done.stderr)
    assert done.stderr == ""
    assert done.stdout.split() == ["T", *SUMMARY_BUCKETS]
