"""The relay as a real process: kill -9 under load, restarts, signals, exit codes, logs.

Everything here runs `python -m smarthost ... serve` for real and talks to it over
loopback sockets, with a real aiosmtpd upstream (the `sink`). Nothing is mocked: these
tests check the promise of SPEC §1 (an acknowledged message is never lost), the
commands and exit codes of §2 and the log format of §8 from the outside.
"""

from __future__ import annotations

import datetime
import json
import os
import signal
import smtplib
import socket
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from smarthost import __version__
from smarthost.delivery_process import PROCESS_NAME

from faults.harness import delivery_children
from support.cli import run_cli
from support.configs import edit_config, write_config
from support.load import LoadClient, clients_running
from support.logs import events_named
from support.messages import RCPT, SENDER, arrived, header_message_id, message
from support.relay import RelayProcess, delivery_pid, stuck_on
from support.sink import SilentServer, Sink
from support.smtp import port_is_closed, send_message
from support.spool import spool_drained, spool_files
from support.waiting import eventually, wait_until

CLIENTS = 4  # sending threads in the crash test
ROUNDS = 3  # kill -9 / restart rounds in the crash test
ACKS_PER_ROUND = 30  # acknowledged messages before each kill
DELIVERY_DEADLINE = 30.0  # generous: two busy cores, retry_max 2 s
STOP_BOUND = 15.0  # sanity bound for a clean stop (the relay's own grace is 5 s)


# -- helpers ------------------------------------------------------------------------


class SendingClient(LoadClient):
    """Sends messages in a loop (5 per session) until halted or the relay goes away.

    A Message-ID is recorded in `acked` only once DATA got 250. Any error is expected
    once `killing` is set (the relay is being killed) and ends the thread; before that
    it is a problem the test reports.
    """

    def __init__(self, port: int, tag: str, acked: list[str], killing: threading.Event):
        super().__init__(port, tag)
        self.name = f"sending-client-{tag}"
        self.acked = acked
        self.killing = killing
        self.problems: list[str] = []

    def acknowledged(self, message_id: str, queue_id: str) -> None:
        self.acked.append(message_id)  # list.append is atomic

    def failed(self, exc: Exception) -> None:
        super().failed(exc)
        if not self.killing.is_set():
            self.problems.append(f"{self.name}: {self.error}")


# -- 1. kill -9 under load ----------------------------------------------------------


def interrupt_under_load(
    proc: RelayProcess, tag: str, acked: list[str], interrupt: Callable[[], object]
) -> None:
    """Run CLIENTS sending threads; `interrupt` the relay (kill -9 or a signal) once
    ACKS_PER_ROUND more messages were acknowledged, while every client is still sending."""
    killing = threading.Event()
    before = len(acked)
    assert proc.port is not None
    clients = [SendingClient(proc.port, f"{tag}c{i}", acked, killing) for i in range(CLIENTS)]
    with clients_running(clients, 15):
        eventually(
            lambda: len(acked) - before >= ACKS_PER_ROUND or not all(c.is_alive() for c in clients),
            DELIVERY_DEADLINE,
        )
        assert all(c.is_alive() for c in clients), [p for c in clients for p in c.problems]
        assert len(acked) - before >= ACKS_PER_ROUND, f"only {len(acked) - before} acked"
        killing.set()
        interrupt()
    assert not [c for c in clients if c.is_alive()], "a client hung after the interruption"
    assert not [p for c in clients for p in c.problems]


def all_arrived(sink: Sink, wanted: set[str], spool: Path) -> None:
    delivered = eventually(lambda: wanted <= set(arrived(sink)), DELIVERY_DEADLINE)
    missing = sorted(wanted - set(arrived(sink)))
    assert delivered, (
        f"{len(missing)} of {len(wanted)} acknowledged messages never reached the "
        f"upstream: {missing[:10]}; spool: {spool_files(spool)}"
    )


@pytest.mark.slow
def test_kill_9_under_load_loses_no_acknowledged_message(tmp_path, sink, relay_process):
    """SPEC §1.1: every message that got 250 reaches the upstream across kill -9 and
    restart, three times over; only messages in flight at a kill may go out twice."""
    spool = tmp_path / "spool"
    proc = relay_process(write_config(tmp_path, sink.port)).start()
    acked: list[str] = []
    duplicates_so_far = 0
    for round_no in range(ROUNDS):
        interrupt_under_load(proc, f"r{round_no}", acked, proc.kill)
        proc.start()  # the same config and spool; the log is appended
        all_arrived(sink, set(acked), spool)
        assert eventually(lambda: spool_drained(spool), DELIVERY_DEADLINE), spool_files(spool)

        # At-least-once: extra copies only for what was in flight at this kill.
        duplicates = sum(n - 1 for n in arrived(sink).values())
        assert duplicates - duplicates_so_far <= CLIENTS * 2, arrived(sink).most_common(12)
        duplicates_so_far = duplicates
        files = spool_files(spool)
        assert files["tmp"] == []  # dead writes were cleared at the restart
        # A crash may leave content whose envelope is gone (delivered, or never
        # acknowledged), never an envelope without content.
        assert not [f for f in files["corrupt"] if ".envelope" in f], files["corrupt"]

    assert None not in arrived(sink)  # every upstream copy carries its Message-ID
    assert len(acked) >= ROUNDS * ACKS_PER_ROUND
    assert proc.stop() == 0
    records = proc.records()
    assert len(events_named(records, "started")) == ROUNDS + 1  # one log, appended
    assert not [r for r in records if r.get("level") in ("error", "critical")]


def test_sigterm_under_load_loses_nothing(tmp_path, sink, relay_process):
    """A graceful stop while clients are sending: exit 0 in a few seconds, and every
    acknowledged message goes out (before the stop, or after the next start)."""
    spool = tmp_path / "spool"
    proc = relay_process(write_config(tmp_path, sink.port)).start()
    acked: list[str] = []
    stop: dict[str, float] = {}

    def sigterm() -> None:
        started = time.monotonic()
        stop["code"] = proc.stop(signal.SIGTERM)
        stop["elapsed"] = time.monotonic() - started

    interrupt_under_load(proc, "term", acked, sigterm)
    assert stop["code"] == 0
    assert stop["elapsed"] < STOP_BOUND
    assert events_named(proc.records(), "stopped")
    proc.start()
    all_arrived(sink, set(acked), spool)
    assert eventually(lambda: spool_drained(spool), DELIVERY_DEADLINE), spool_files(spool)
    assert proc.stop() == 0


def test_sigterm_during_a_commit_answers_the_client_or_discards_the_message(
    tmp_path, sink, relay_process
):
    """A graceful stop is not a crash (SPEC §1.1: only mail in flight at a *crash* may go
    out twice): a message is spooled if and only if its client got 250, and every
    queue_id in the log has its `received` line (SPEC §8)."""
    spool = tmp_path / "spool"
    proc = relay_process(write_config(tmp_path, sink.port)).start()
    assert proc.port is not None
    # 20 MB: writing and fsyncing it takes long enough to signal the relay meanwhile.
    big = message("<big@client.test>") + (b"y" * 998 + b"\r\n") * 20_000
    outcome: dict[str, Any] = {}

    def client() -> None:
        try:
            with smtplib.SMTP("127.0.0.1", proc.port, timeout=30) as smtp:
                smtp.ehlo("client.test")
                smtp.mail(SENDER)
                smtp.rcpt(RCPT)
                outcome["reply"] = smtp.data(big)
        except (OSError, smtplib.SMTPException) as exc:
            outcome["error"] = repr(exc)

    thread = threading.Thread(target=client, name="big-client")
    thread.start()
    try:
        # Signal the relay the moment the commit's first file appears in tmp/.
        deadline = time.monotonic() + DELIVERY_DEADLINE
        while not any((spool / "tmp").iterdir()) and thread.is_alive():
            assert time.monotonic() < deadline, "the relay never started the commit"
            time.sleep(0.001)
        if not thread.is_alive():
            pytest.skip(f"the commit ended before it could be interrupted: {outcome}")
        code = proc.stop(signal.SIGTERM)
    finally:
        thread.join(30)
    assert code == 0

    files = spool_files(spool)
    spooled = bool(files["queue"] or files["active"]) or "<big@client.test>" in arrived(sink)
    acknowledged = outcome.get("reply", (0,))[0] == 250
    records = proc.records()
    logged_ids = {r["queue_id"] for r in records if r.get("queue_id")}
    received_ids = {r["queue_id"] for r in events_named(records, "received")}
    assert (acknowledged, logged_ids - received_ids) == (spooled, set()), (
        f"client: {outcome}; spool: {files}; events: {[r['event'] for r in records]}"
    )


@pytest.mark.slow
def test_kill_9_with_the_upstream_down_delivers_after_restart(tmp_path, sink, relay_process):
    """Deferred mail survives kill -9: after a restart and the upstream's return, all of
    it arrives and the spool ends empty."""
    spool = tmp_path / "spool"
    port = sink.port
    sink.stop()  # the upstream is down; its port number is kept for later
    proc = relay_process(write_config(tmp_path, port)).start()
    message_ids = [f"<down.{i}@client.test>" for i in range(20)]
    queue_ids = [send_message(proc.port, message_id) for message_id in message_ids]
    assert len(set(queue_ids)) == 20
    # Let every message be tried and deferred, so its retry schedule is on disk.
    wait_until(
        lambda: (
            set(queue_ids)
            <= {r.get("queue_id") for r in proc.records() if r.get("event") == "deferred"}
        ),
        DELIVERY_DEADLINE,
        "a deferred attempt for each message",
    )
    proc.kill()
    assert set(queue_ids) <= set(spool_files(spool)["msg"])

    proc.start()
    upstream = Sink(port).start()
    try:
        got = eventually(lambda: set(message_ids) <= set(arrived(upstream)), DELIVERY_DEADLINE)
        assert got, f"missing: {sorted(set(message_ids) - set(arrived(upstream)))}"
        assert eventually(lambda: spool_drained(spool), DELIVERY_DEADLINE), spool_files(spool)
        files = spool_files(spool)
        assert files["msg"] == files["queue"] == files["active"] == []
        assert proc.stop() == 0
    finally:
        upstream.stop()


# -- 2b. the delivery process ------------------------------------------------------------


def process_gone(pid: int) -> bool:
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except FileNotFoundError:
        return True
    return "\nState:\tZ" in status  # a zombie has exited; its parent reaps it later


def smaps_rollup_kib(pid: int, key: str) -> int:
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    raise AssertionError(f"no {key} in /proc/{pid}/smaps_rollup")


def test_the_delivery_process_is_forked_and_shares_the_relays_pages(tmp_path, sink, relay_process):
    """Forked after the imports, it holds their pages with the relay (copy on write)
    instead of a copy of its own; ps shows its name."""
    proc = relay_process(write_config(tmp_path, sink.port)).start()
    child = delivery_pid(proc)
    assert Path(f"/proc/{child}/comm").read_text().strip() == PROCESS_NAME
    assert b"delivery_main" not in Path(f"/proc/{child}/cmdline").read_bytes()
    assert os.readlink(f"/proc/{child}/fd/0") == os.devnull  # as a spawned one: not the relay's
    # A spawned interpreter shares no anonymous pages with its parent (a few KiB at most).
    shared = smaps_rollup_kib(child, "Shared_Dirty")
    assert shared > 4096, f"only {shared} KiB shared with the relay"
    send_message(proc.port, "<forked@client.test>")
    sink.wait_for(1)
    assert proc.stop() == 0


def test_a_killed_delivery_process_is_replaced_and_mail_flows(tmp_path, sink, relay_process):
    """The replacement is spawned, not forked: the relay now runs threads."""
    proc = relay_process(write_config(tmp_path, sink.port)).start()
    first = delivery_pid(proc)
    assert first != proc.proc.pid
    send_message(proc.port, "<before@client.test>")
    sink.wait_for(1)
    os.kill(first, signal.SIGKILL)
    replaced = wait_until(
        lambda: [
            r
            for r in events_named(proc.records(), "internal_error")
            if f"delivery process {first} exited" in r["error"]
        ],
        DELIVERY_DEADLINE,
        "the relay to notice its delivery process died",
    )
    assert replaced[0]["level"] == "error"
    (second,) = wait_until(
        lambda: delivery_children(proc.proc.pid), DELIVERY_DEADLINE, "a new delivery process"
    )
    assert b"delivery_main" in Path(f"/proc/{second}/cmdline").read_bytes()
    wait_until(
        lambda: Path(f"/proc/{second}/comm").read_text().strip() == PROCESS_NAME,
        DELIVERY_DEADLINE,
        "the new delivery process to take its name",
    )
    # Mail accepted meanwhile and after is delivered by the new one.
    send_message(proc.port, "<after@client.test>")
    wanted = {"<before@client.test>", "<after@client.test>"}
    assert eventually(lambda: wanted <= set(arrived(sink)), DELIVERY_DEADLINE), arrived(sink)
    assert proc.stop() == 0


def test_kill_9_of_the_relay_takes_its_delivery_process_along(tmp_path, sink, relay_process):
    """No orphan keeps sending (or holds the spool) after the relay is gone, and a new
    relay starts on the same spool at once."""
    proc = relay_process(write_config(tmp_path, sink.port)).start()
    child = delivery_pid(proc)
    proc.kill()
    assert eventually(lambda: process_gone(child), 10.0), f"delivery process {child} lives on"
    offset = proc.log_path.stat().st_size
    proc.start()
    assert delivery_pid(proc, offset) != child
    send_message(proc.port, "<after-restart@client.test>")
    sink.wait_for(1)
    assert proc.stop() == 0


def test_sigterm_stops_the_delivery_process_too(tmp_path, sink, relay_process):
    proc = relay_process(write_config(tmp_path, sink.port)).start()
    child = delivery_pid(proc)
    assert proc.stop() == 0
    assert process_gone(child), f"delivery process {child} outlived the relay"


# -- 3. stopping on a signal ----------------------------------------------------------


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_stop_signal_exits_0_after_stopping_and_stopped(tmp_path, sink, relay_process, sig):
    proc = relay_process(write_config(tmp_path, sink.port)).start()
    send_message(proc.port, "<before-stop@client.test>")
    sink.wait_for(1)
    offset = proc.log_path.stat().st_size
    started = time.monotonic()
    code = proc.stop(sig)
    elapsed = time.monotonic() - started
    assert code == 0
    assert elapsed < STOP_BOUND
    events = [r.get("event") for r in proc.records(offset)]
    assert "stopping" in events and "stopped" in events, events
    assert events.index("stopping") < events.index("stopped")
    assert port_is_closed(proc.port)


def test_sigterm_with_a_client_session_open_exits_0(tmp_path, sink, relay_process):
    """A client idling in a session (and one half-way through a transaction) must not
    hold up the stop."""
    proc = relay_process(write_config(tmp_path, sink.port)).start()
    idle = smtplib.SMTP("127.0.0.1", proc.port, timeout=10)
    busy = smtplib.SMTP("127.0.0.1", proc.port, timeout=10)
    try:
        idle.ehlo("idle.test")
        busy.ehlo("busy.test")
        assert busy.mail(SENDER)[0] == 250
        assert busy.rcpt(RCPT)[0] == 250
        started = time.monotonic()
        code = proc.stop(signal.SIGTERM)
        elapsed = time.monotonic() - started
    finally:
        idle.close()
        busy.close()
    assert code == 0
    assert elapsed < STOP_BOUND
    assert [r["event"] for r in proc.records() if r.get("event") in ("stopping", "stopped")] == [
        "stopping",
        "stopped",
    ]
    assert port_is_closed(proc.port)


def test_sigterm_with_a_stuck_upstream_exits_0_and_keeps_the_message(tmp_path, sink, relay_process):
    """SPEC §2: in-flight attempts get a few seconds; an unfinished message simply stays
    spooled and goes out after the next start."""
    spool = tmp_path / "spool"
    with SilentServer() as silent:
        _, proc, queue_id = stuck_on(silent, tmp_path, relay_process)
        started = time.monotonic()
        code = proc.stop(signal.SIGTERM)
        elapsed = time.monotonic() - started
    assert code == 0
    assert elapsed < STOP_BOUND
    assert events_named(proc.records(), "stopped")
    files = spool_files(spool)
    assert queue_id in files["msg"]
    assert queue_id in files["queue"] + files["active"], files

    write_config(tmp_path, sink.port)  # same spool, a working upstream
    offset = proc.log_path.stat().st_size
    proc.start()
    (got,) = sink.wait_for(1, timeout=DELIVERY_DEADLINE)
    assert header_message_id(got.content) == "<stuck@client.test>"
    assert eventually(lambda: spool_drained(spool), DELIVERY_DEADLINE), spool_files(spool)
    assert events_named(proc.records(offset), "delivered")[0]["queue_id"] == queue_id
    assert proc.stop() == 0


# -- 4. forwarding is an event, not a poll ---------------------------------------------


def test_forwarding_starts_at_once_not_on_a_poll(tmp_path, sink, relay_process):
    """SPEC §1.2. The rescan runs every 10 s and the first retry would be 30 s away, so
    arrival within 1 s of the 250 shows that acceptance itself starts the delivery."""
    config = write_config(tmp_path, sink.port)
    edit_config(config, 'retry_min = "1s"', 'retry_min = "30s"')
    edit_config(config, 'retry_max = "2s"', 'retry_max = "60s"')
    proc = relay_process(config).start()
    latencies = []
    for i in range(5):
        message_id = f"<event.{i}@client.test>"
        send_message(proc.port, message_id)
        acknowledged = time.monotonic()
        got = sink.wait_for(i + 1, timeout=DELIVERY_DEADLINE)[i]
        assert header_message_id(got.content) == message_id
        latencies.append(got.at - acknowledged)
    assert max(latencies) < 1.0, latencies
    assert not events_named(proc.records(), "deferred")
    assert proc.stop() == 0


# -- 5. configuration errors and the command line ----------------------------------------


@pytest.mark.parametrize(
    ("old", "new", "key"),
    [
        ("[smtp]\n", "[smtp]\nmax_client = 5\n", "smtp.max_client"),
        ('retry_min = "1s"', 'retry_min = "soon"', "delivery.retry_min"),
    ],
    ids=["unknown-key", "bad-value"],
)
def test_serve_with_a_bad_config_exits_78_naming_the_key(tmp_path, old, new, key):
    config = write_config(tmp_path, 2525)
    edit_config(config, old, new)
    result = run_cli("-c", str(config), "serve")
    assert result.returncode == 78, result
    assert key in result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "spool").exists()  # nothing was started


def test_check_prints_a_summary_for_a_good_config(tmp_path):
    config = write_config(tmp_path, 2525)
    result = run_cli("-c", str(config), "check")
    assert result.returncode == 0, result
    assert str(tmp_path / "spool") in result.stdout
    assert "sink" in result.stdout  # the backend's name
    assert "Traceback" not in result.stderr


def test_check_lists_every_error_of_a_bad_config(tmp_path):
    config = write_config(tmp_path, 2525)
    edit_config(config, "[smtp]\n", "[smtp]\nmax_client = 5\n")
    edit_config(config, 'retry_min = "1s"', 'retry_min = "soon"')
    result = run_cli("-c", str(config), "check")
    assert result.returncode == 1, result
    output = result.stdout + result.stderr
    assert "smtp.max_client" in output
    assert "delivery.retry_min" in output
    assert "Traceback" not in output


def test_version():
    result = run_cli("--version")
    assert result.returncode == 0, result
    assert __version__ in result.stdout


def test_missing_config_file_exits_78_naming_it(tmp_path):
    missing = tmp_path / "nowhere" / "smarthost.toml"
    result = run_cli("-c", str(missing), "serve")
    assert result.returncode == 78, result
    assert str(missing) in result.stderr
    assert "Traceback" not in result.stderr


def test_config_path_from_the_environment(tmp_path):
    """No -c: $SMARTHOST_CONFIG names the file (SPEC §2)."""
    missing = tmp_path / "from-env.toml"
    env = {**os.environ, "SMARTHOST_CONFIG": str(missing)}
    result = run_cli("serve", env=env)
    assert result.returncode == 78, result
    assert str(missing) in result.stderr


def test_usage_errors_exit_64(tmp_path):
    config = str(write_config(tmp_path, 2525))
    assert run_cli("-c", config).returncode == 64  # no command
    assert run_cli("-c", config, "frobnicate").returncode == 64


# -- 6. one relay per spool -------------------------------------------------------------


def test_a_second_serve_on_the_same_spool_exits_75(tmp_path, sink, relay_process):
    config = write_config(tmp_path, sink.port)
    first = relay_process(config).start()
    assert first.proc is not None
    result = run_cli("-c", str(config), "serve")
    assert result.returncode == 75, result
    assert "in use" in result.stderr
    assert str(first.proc.pid) in result.stderr  # who holds it
    assert "Traceback" not in result.stderr
    # The first relay is untouched and still relays.
    assert first.proc.poll() is None
    send_message(first.port, "<still-works@client.test>")
    (got,) = sink.wait_for(1)
    assert header_message_id(got.content) == "<still-works@client.test>"
    assert first.stop() == 0


# -- 7. the log -------------------------------------------------------------------------


def test_every_log_line_is_a_json_object_with_time_level_event(tmp_path, sink, relay_process):
    """SPEC §8: one JSON object per line; a message's life follows its queue_id."""
    proc: RelayProcess = relay_process(write_config(tmp_path, sink.port)).start()
    queue_id = send_message(proc.port, "<logged@client.test>")
    sink.wait_for(1)
    wait_until(lambda: events_named(proc.records(), "delivered"), 10, "the delivered event")
    assert proc.stop() == 0

    lines = proc.log_path.read_text(encoding="utf-8").splitlines()
    assert lines
    records = []
    for line in lines:
        record = json.loads(line)  # fails the test on any line that is not JSON
        assert isinstance(record, dict), line
        assert {"time", "level", "event"} <= record.keys(), line
        when = datetime.datetime.fromisoformat(record["time"].replace("Z", "+00:00"))
        assert when.utcoffset() == datetime.timedelta(0), line  # RFC 3339, UTC
        assert record["level"] in ("debug", "info", "warning", "error", "critical"), line
        records.append(record)

    names = [r["event"] for r in records]
    for name in ("started", "received", "delivered", "stopping", "stopped"):
        assert name in names, names
    assert (
        names.index("started")
        < names.index("received")
        < names.index("delivered")
        < names.index("stopping")
        < names.index("stopped")
    ), names
    (received,) = events_named(records, "received")
    (delivered,) = events_named(records, "delivered")
    assert received["queue_id"] == delivered["queue_id"] == queue_id
    assert received["message_id"] == "<logged@client.test>"
    assert received["sender"] == SENDER
    assert delivered["backend"] == "sink"
    assert delivered["reply"].startswith("250")


def test_a_listen_address_in_use_is_named(tmp_path):
    """A port another program holds: the error says which of the addresses it is."""
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        config = write_config(tmp_path, 2525, listen=f"127.0.0.1:{port}")
        result = run_cli("-c", str(config), "serve")
    assert result.returncode == 75, result
    assert f"smtp.listen 127.0.0.1:{port}" in result.stderr
    assert "in use" in result.stderr
    assert "Traceback" not in result.stderr
