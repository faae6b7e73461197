"""The queue commands (`smarthost queue`, smarthost/queuectl.py): list, show, hold,
release, flush, delete and bounce on a live relay, and the commands as an administrator
meets them (issue #14): garbage in the spool, a closed pipe, a quiet stderr, `-c` after
the command, and a flush while the upstream is still marked down. Real commands, the
relay in-process or as a real process, a real aiosmtpd upstream; nothing mocked."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import threading
import time
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest

from smarthost.config import load_config
from smarthost.queuectl import QueueControl
from smarthost.scheduler import DEFAULT_INTERVALS, Intervals
from smarthost.spool import Envelope, Recipient, Spool, new_id

from support import ROOT
from support.cli import ok, queue, run_cli
from support.configs import write_config
from support.local import (
    PROMPT,
    absent_for,
    config_with,
    message,
    spool_names,
    subject_is,
    token,
    wait_message,
)
from support.relay import RunningRelay
from support.sink import Sink
from support.smtp import free_port, send_one
from support.waiting import wait_until

SENDER = "alice@client.test"
MESSAGE = b"Subject: queue\r\n\r\nbody\r\n"
LATER = "451 4.2.0 later"


def good_message(root: Path, state: str = "queue", recipients: int = 1) -> str:
    """A well-formed message written straight into the spool (content, then envelope)."""
    env = Envelope(
        id=new_id(),
        sender=SENDER,
        recipients=[Recipient(f"r{n}@dest.test") for n in range(recipients)],
        arrival=time.time(),
        size=len(MESSAGE),
    )
    (root / "msg" / env.id).write_bytes(MESSAGE)
    aside = root / "tmp" / f"{env.id}.planted"
    aside.write_bytes(env.to_bytes())
    os.rename(aside, root / state / env.id)
    return env.id


def send(port: int, rcpt: str) -> str:
    return send_one(port, SENDER, [rcpt], MESSAGE)


# -- 1. garbage under queue-ID names ------------------------------------------------------


def test_queue_commands_list_the_good_and_name_each_bad_entry(tmp_path: Path, sink: Sink):
    """Links, a directory, a FIFO, cut and empty envelopes in every state directory:
    `queue list` (both forms) lists the good messages, names each bad entry on stderr,
    exits 0, and follows no link (the link's target keeps its times)."""
    cfg = write_config(tmp_path, sink.port)
    root = tmp_path / "spool"
    Spool(str(root)).create()
    goods = {state: good_message(root, state) for state in ("queue", "active", "hold", "failed")}
    target = tmp_path / "not-the-spools"
    planted = (root / "queue" / goods["queue"]).read_bytes()
    target.write_bytes(planted)
    os.utime(target, (1_000_000, 1_000_000))
    whole = Envelope(new_id(), SENDER, [Recipient("x@dest.test")], arrival=time.time())
    bad = [
        ("active", new_id(), lambda p: os.symlink(target, p)),  # the case
        ("queue", new_id(), lambda p: os.symlink(p.name, p)),  # a loop
        ("queue", new_id(), lambda p: os.mkfifo(p)),  # would block an open()
        ("hold", new_id(), lambda p: p.mkdir()),
        ("failed", new_id(), lambda p: os.mkfifo(p)),
        ("queue", whole.id, lambda p: p.write_bytes(whole.to_bytes()[:20])),  # cut short
        ("hold", new_id(), lambda p: p.write_bytes(b"")),
        ("failed", new_id(), lambda p: p.write_bytes(b"\xff{not json")),
    ]
    for state, queue_id, make in bad:
        make(root / state / queue_id)

    listed = ok(queue(cfg, "list", "--json", timeout=20))
    ids = {json.loads(line)["id"]: json.loads(line)["state"] for line in listed.stdout.splitlines()}
    assert ids == {
        goods["queue"]: "queued",
        goods["active"]: "active",
        goods["hold"]: "held",
        goods["failed"]: "failed",
    }
    for state, queue_id, _ in bad:
        assert f"{state}/{queue_id}" in listed.stderr, (state, queue_id, listed.stderr)
    assert len(listed.stderr.splitlines()) == len(bad), listed.stderr
    assert "symbolic link" in listed.stderr and "FIFO" in listed.stderr
    assert "directory" in listed.stderr and "Traceback" not in listed.stderr

    human = ok(queue(cfg, timeout=20))
    assert all(queue_id in human.stdout for queue_id in goods.values())
    assert f"-- 4 messages in the queue; {len(bad)} unreadable" in human.stdout
    assert len(human.stderr.splitlines()) == len(bad)

    # Acting on everything waiting passes the garbage by; acting on one names it.
    flushed = ok(queue(cfg, "flush", timeout=20))
    assert flushed.stdout.strip() == f"{goods['queue']}: will be tried now"
    (link_id,) = [i for (s, i, _) in bad if s == "active"]
    for action in ("show", "hold", "delete", "bounce", "flush"):
        refused = queue(cfg, action, link_id, timeout=20)
        assert refused.returncode == 1, (action, refused)
        assert "symbolic link" in refused.stdout + refused.stderr, (action, refused)
        assert "Traceback" not in refused.stderr
    assert target.stat().st_mtime == 1_000_000  # never touched through the link
    assert target.read_bytes() == planted
    assert (root / "active" / link_id).is_symlink()  # garbage stays for the relay/admin


# -- 2. a reader that goes away -----------------------------------------------------------


@pytest.mark.parametrize("args", [(), ("--json",)], ids=["human", "json"])
def test_queue_listing_into_a_closed_pipe_ends_quietly(tmp_path: Path, sink: Sink, args):
    """`smarthost queue | head -1`: more output than a pipe holds, the reader takes one
    line and closes. No "Broken pipe", no 75: exit 0."""
    cfg = write_config(tmp_path, sink.port)
    root = tmp_path / "spool"
    Spool(str(root)).create()
    for _ in range(150):
        good_message(root, recipients=20)  # ~150 KiB of listing: more than a 64 KiB pipe
    proc = subprocess.Popen(
        [sys.executable, "-m", "smarthost", "-c", str(cfg), "queue", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        cwd=ROOT,
    )
    assert proc.stdout is not None and proc.stderr is not None
    first = proc.stdout.readline()
    proc.stdout.close()  # what head -1 does once it has its line
    with proc.stderr:
        err = proc.stderr.read().decode()
    code = proc.wait(30)
    assert first.strip(), "no first line"
    assert err == "", err
    assert code == 0, code


def test_queue_into_a_closed_pipe_through_a_shell(tmp_path: Path, sink: Sink):
    """The issue's command line, with pipefail: the pipeline succeeds."""
    cfg = write_config(tmp_path, sink.port)
    root = tmp_path / "spool"
    Spool(str(root)).create()
    for _ in range(150):
        good_message(root, recipients=20)
    command = f"set -o pipefail; '{sys.executable}' -m smarthost -c '{cfg}' queue | head -1"
    done = subprocess.run(
        ["bash", "-c", command], capture_output=True, text=True, timeout=60, cwd=ROOT
    )
    assert done.returncode == 0, (done.returncode, done.stderr)
    assert done.stderr == ""
    assert len(done.stdout.splitlines()) == 1


# -- 3. nothing on stderr but what the command means --------------------------------------


def test_queue_bounce_without_log_file_prints_only_its_result(
    tmp_path: Path, sink: Sink, relay_process
):
    cfg = write_config(tmp_path, sink.port)
    cfg.write_text(cfg.read_text().replace('retry_min = "1s"', 'retry_min = "10m"'))
    cfg.write_text(cfg.read_text().replace('retry_max = "2s"', 'retry_max = "1h"'))
    sink.handler.rcpt_replies["a@dest.test"] = LATER
    sink.handler.rcpt_replies["b@dest.test"] = LATER
    proc = relay_process(cfg).start()
    queue_id = send(proc.port, "a@dest.test")
    other = send(proc.port, "b@dest.test")
    wait_until(
        lambda: (
            {r.get("queue_id") for r in proc.records() if r["event"] == "deferred"}
            >= {queue_id, other}
        ),
        10.0,
        "the deferrals",
    )
    bounced = queue(cfg, "bounce", queue_id)
    assert bounced.returncode == 0, bounced
    assert bounced.stdout.startswith(f"{queue_id}: bounced (DSN ")
    assert bounced.stderr == "", bounced.stderr
    for action in ("hold", "release", "flush", "delete"):
        done = queue(cfg, action, other)
        assert done.returncode == 0 and done.stderr == "", (action, done)
    assert proc.stop() == 0


# -- 5. -c after the command --------------------------------------------------------------


@pytest.mark.parametrize(
    "args",
    [
        ("check", "-c", "{cfg}"),
        ("check", "--config", "{cfg}"),
        ("check", "--config={cfg}"),
        ("queue", "-c", "{cfg}", "list"),
        ("queue", "list", "-c", "{cfg}"),
        ("queue", "-c", "{cfg}"),
        ("queue", "flush", "-c", "{cfg}"),
    ],
    ids=lambda a: " ".join(a).replace("{cfg}", "FILE"),
)
def test_config_option_after_the_command(tmp_path: Path, sink: Sink, monkeypatch, args):
    cfg = write_config(tmp_path, sink.port)
    Spool(str(tmp_path / "spool")).create()
    monkeypatch.setenv("SMARTHOST_CONFIG", str(tmp_path / "no-such.toml"))
    done = run_cli(*(a.replace("{cfg}", str(cfg)) for a in args))
    assert done.returncode == 0, (done.returncode, done.stdout, done.stderr)


def test_config_option_after_the_command_wins_over_the_one_before(tmp_path: Path, sink: Sink):
    cfg = write_config(tmp_path, sink.port)
    done = run_cli("-c", str(tmp_path / "no-such.toml"), "check", "-c", str(cfg))
    assert done.returncode == 0, done
    missing = run_cli("-c", str(cfg), "check", "-c", str(tmp_path / "no-such.toml"))
    assert missing.returncode == 1 and "no-such.toml" in missing.stderr


# -- 4. flush while the group's backends are marked down ----------------------------------


def refused_and_marked_down(tmp_path: Path, relay_process) -> tuple[int, Path, Any, str]:
    """A relay whose upstream port refuses: one message sent, retries and the down mark
    long (10 min) so only a flush moves it. (port, config, relay, queue ID)."""
    port = free_port()
    cfg = write_config(tmp_path, port)
    text = cfg.read_text()
    text = text.replace('retry_min = "1s"', 'retry_min = "10m"').replace(
        'retry_max = "2s"', 'retry_max = "1h"'
    )
    cfg.write_text(text.replace('fail_timeout = "1s"', 'fail_timeout = "10m"'))
    proc = relay_process(cfg).start()
    return port, cfg, proc, send(proc.port, "x@dest.test")


def test_flush_of_everything_passes_by_a_message_the_relay_took_meanwhile(tmp_path: Path):
    """`queue flush` without IDs lists queue/, then makes each due: one the relay
    claimed (or delivered) in between is shown, and is no failure (exit 0); named
    alone, the same message is one."""
    cfg = write_config(tmp_path, free_port())
    root = tmp_path / "spool"
    Spool(str(root)).create()
    waiting, taken = good_message(root), good_message(root)
    out: list[str] = []
    ctl = QueueControl(load_config(cfg), out=out.append, err=out.append)
    listed = ctl.entries

    def relay_claims_one_after_the_listing():
        entries = list(listed())
        assert ctl.spool.move(taken, "queue", "active")  # what a claim does
        return iter(entries)

    ctl.entries = relay_claims_one_after_the_listing  # type: ignore[method-assign]
    assert ctl.flush([]) == 0
    assert sorted(out) == sorted(
        [f"{waiting}: will be tried now", f"{taken}: no longer waiting (taken by the relay)"]
    )
    out.clear()
    assert ctl.flush([taken]) == 1
    assert out == [f"{taken}: is being delivered, not waiting"]


def test_flush_probes_a_down_backend_first_and_sends(tmp_path: Path, relay_process):
    """The upstream refuses connections: the first attempt marks it down (for 10 min) and
    defers the message (next try in 10 min). The upstream comes back; `queue flush`
    sends the message within seconds, and no attempt is spent on "no backend of group
    'default' is available"."""
    port, cfg, proc, queue_id = refused_and_marked_down(tmp_path, relay_process)
    down = wait_until(
        lambda: [r for r in proc.records() if r["event"] == "backend_down"], 10.0, "backend_down"
    )
    assert down[0]["backend"] == "sink"
    wait_until(
        lambda: [r for r in proc.records() if r["event"] == "deferred"], 10.0, "the deferral"
    )
    sink = Sink(port).start()  # the upstream is back; the relay still has it down
    try:
        flushed = ok(queue(cfg, "flush"))
        assert flushed.stdout.strip() == f"{queue_id}: will be tried now"
        (got,) = sink.wait_for(1, timeout=5.0)
        assert got.rcpt_tos == ["x@dest.test"]
        delivered = wait_until(
            lambda: [r for r in proc.records() if r["event"] == "delivered"], 5.0, "delivered"
        )
        assert delivered[0]["queue_id"] == queue_id
        assert delivered[0]["attempt"] == 2  # the refused one, then this one
        deferrals = [r for r in proc.records() if r["event"] == "deferred"]
        assert len(deferrals) == 1, deferrals
        assert not [r for r in deferrals if "no backend" in (r.get("reply") or "")]
        assert [r for r in proc.records() if r["event"] == "backend_up"]
        assert proc.stop() == 0
    finally:
        sink.stop()


def test_flush_while_the_backend_is_still_down_spends_one_attempt(tmp_path: Path, relay_process):
    """The control: the probe fails, so the flushed message gets its attempt (deferred,
    no backend) and stays queued; the relay does not loop on probes."""
    _, cfg, proc, queue_id = refused_and_marked_down(tmp_path, relay_process)
    wait_until(
        lambda: [r for r in proc.records() if r["event"] == "deferred"], 10.0, "the deferral"
    )
    ok(queue(cfg, "flush"))
    second = wait_until(
        lambda: [r for r in proc.records() if r["event"] == "deferred"][1:], 10.0, "a 2nd try"
    )
    assert second[0]["queue_id"] == queue_id and second[0]["attempt"] == 2
    downs = [r for r in proc.records() if r["event"] == "backend_down"]
    assert len(downs) == 2 and downs[1].get("still_down") is True  # one probe, refused
    time.sleep(1.0)  # bounded absence check: no further probe or attempt
    assert len([r for r in proc.records() if r["event"] == "backend_down"]) == 2
    assert len([r for r in proc.records() if r["event"] == "deferred"]) == 2
    entry = json.loads(ok(queue(cfg, "list", "--json")).stdout)
    assert entry["state"] == "deferred" and entry["attempts"] == 2
    proc.proc.send_signal(signal.SIGTERM)
    assert proc.stop() == 0


# -- 7. local submissions still in drop/ --------------------------------------------------


def test_queue_list_shows_mail_waiting_in_drop_as_dropped(
    tmp_path: Path, sink: Sink, relay_process
):
    """With the relay stopped, what `smarthost-sendmail` accepted waits in drop/:
    `queue list` shows it (state `dropped`), names a bad drop file on stderr, and once
    the relay runs the message leaves drop/ and is delivered."""
    cfg = write_config(tmp_path, sink.port)
    Spool(str(tmp_path / "spool")).create()
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "smarthost",
            "-c",
            str(cfg),
            "sendmail",
            "-f",
            SENDER,
            "x@dest.test",
        ],
        input=b"Subject: dropped\n\nwaiting\n",
        capture_output=True,
        timeout=30,
        cwd=ROOT,
    )
    assert done.returncode == 0, done.stderr
    (tmp_path / "spool" / "drop" / ("0" * 32 + ".drop")).write_bytes(b"not a submission")

    listed = ok(queue(cfg, "list", "--json"))
    (entry,) = [json.loads(line) for line in listed.stdout.splitlines()]
    assert entry["state"] == "dropped"
    assert entry["sender"] == SENDER
    assert entry["recipients"] == [{"address": "x@dest.test", "state": "pending", "reply": None}]
    assert entry["attempts"] == 0 and entry["next_attempt"] is None
    assert entry["size"] > 0 and entry["arrival"]
    assert f"drop/{'0' * 32}.drop" in listed.stderr
    human = ok(queue(cfg))
    assert "dropped" in human.stdout and "x@dest.test" in human.stdout
    assert "-- 1 message in the queue" in human.stdout

    proc = relay_process(cfg).start()
    (got,) = sink.wait_for(1)
    assert got.rcpt_tos == ["x@dest.test"]
    wait_until(lambda: ok(queue(cfg, "list", "--json")).stdout == "", 10.0, "an empty queue")
    assert proc.stop() == 0


# -- 8. queue commands on a live relay -------------------------------------------------------


NO_RESCANS = Intervals(rescan=3600.0)  # hints and the start-up scan only


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
    tmp_path: Path, sink: Sink, relay_factory, intervals: Intervals = DEFAULT_INTERVALS
) -> tuple[Path, RunningRelay]:
    """A relay on deferring_config; its upstream defers later@dest.test. With
    NO_RESCANS, only the watcher can explain a prompt delivery."""
    cfg = deferring_config(tmp_path, sink)
    relay = relay_factory(load_config(cfg), intervals)
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
    tmp_path: Path, sink: Sink, relay_factory, events
) -> None:
    cfg, relay = deferring_relay(tmp_path, sink, relay_factory, NO_RESCANS)
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
    tmp_path: Path, sink: Sink, relay_factory, events
) -> None:
    cfg, relay = deferring_relay(tmp_path, sink, relay_factory, NO_RESCANS)
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
