"""`smarthost drain` against the real relay process (SPEC §2): stop taking mail, go on
delivering, exit 0 once nothing is due or when the timeout ends; what is left stays
in the spool."""

from __future__ import annotations

import smtplib
import socket
import subprocess
import time

from support.cli import run_cli, start_drain
from support.configs import edit_config, write_config
from support.logs import events_named
from support.messages import RCPT, SENDER, message
from support.relay import stuck_on
from support.sink import SilentServer, slow_data
from support.smtp import send_message
from support.spool import spool_files
from support.waiting import wait_until

STOP_BOUND = 15.0  # the relay's orderly stop, as in test_process


def refused(port: int) -> bool:
    """A new connection is refused, or gets no 220 greeting."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=2) as sock:
            return not sock.recv(512).startswith(b"220")
    except OSError:
        return True


def test_drain_delivers_what_is_due_then_the_relay_exits_0(tmp_path, sink, relay_process):
    config = write_config(tmp_path, sink.port)
    slow_data(sink, 1.5)
    proc = relay_process(config).start()
    for n in range(5):
        send_message(proc.port, f"<due.{n}@client.test>")
    drain = start_drain(config)
    out, err = drain.communicate(timeout=60)
    assert drain.returncode == 0, err
    assert "drained" in out
    assert len(sink.messages) == 5  # everything due went out before the exit
    assert proc.proc is not None and proc.proc.wait(10) == 0
    files = spool_files(tmp_path / "spool")
    assert not (files["queue"] or files["active"] or files["msg"]), files
    records = proc.records()
    (draining,) = events_named(records, "draining")
    assert draining["timeout"] == 300
    (stopping,) = events_named(records, "stopping")
    assert stopping["reason"] == "drained"
    assert events_named(records, "stopped")


def test_mail_deferred_to_later_does_not_hold_the_drain(tmp_path, sink, relay_process):
    config = write_config(tmp_path, sink.port)
    edit_config(config, 'retry_min = "1s"', 'retry_min = "10m"')
    edit_config(config, 'retry_max = "2s"', 'retry_max = "1h"')
    sink.handler.data_reply = "451 4.3.0 try again later"
    proc = relay_process(config).start()
    queue_id = send_message(proc.port, "<later@client.test>")
    wait_until(lambda: events_named(proc.records(), "deferred"), 20, "the deferral")
    started = time.monotonic()
    result = run_cli("drain", "-c", str(config))
    assert result.returncode == 0, result.stderr
    assert time.monotonic() - started < STOP_BOUND
    assert proc.proc is not None and proc.proc.wait(10) == 0
    files = spool_files(tmp_path / "spool")
    assert queue_id in files["queue"] and queue_id in files["msg"], files
    assert events_named(proc.records(), "stopping")[0]["reason"] == "drained"


def test_drain_timeout_stops_the_relay_and_keeps_the_mail(tmp_path, relay_process):
    with SilentServer() as silent:
        config, proc, queue_id = stuck_on(silent, tmp_path, relay_process)
        started = time.monotonic()
        result = run_cli("drain", "--timeout", "2s", "-c", str(config))
        elapsed = time.monotonic() - started
    assert result.returncode == 0, result.stderr
    assert 2.0 <= elapsed < 2.0 + STOP_BOUND
    assert proc.proc is not None and proc.proc.wait(10) == 0
    records = proc.records()
    assert events_named(records, "draining")[0]["timeout"] == 2
    assert events_named(records, "stopping")[0]["reason"] == "drain_timeout"
    files = spool_files(tmp_path / "spool")
    assert queue_id in files["msg"]
    assert queue_id in files["queue"] + files["active"], files
    assert ".drain" not in {p.name for p in (tmp_path / "spool").iterdir()}


def test_drain_without_a_relay_exits_1_and_signals_no_stale_pid(tmp_path, sink):
    config = write_config(tmp_path, sink.port)
    result = run_cli("drain", "-c", str(config))  # no spool at all
    assert result.returncode == 1
    assert "no relay runs" in result.stderr
    # A lock file left by a relay that is gone, naming a pid that is now another
    # process: that process must not be signalled (SIGUSR1 would kill `sleep`).
    bystander = subprocess.Popen(["sleep", "30"])
    try:
        spool = tmp_path / "spool"
        spool.mkdir()
        (spool / ".lock").write_text(f"{bystander.pid}\n")
        result = run_cli("drain", "-c", str(config))
        assert result.returncode == 1
        assert "no relay runs" in result.stderr
        time.sleep(0.2)
        assert bystander.poll() is None
        assert not (spool / ".drain").exists()
    finally:
        bystander.kill()
        bystander.wait()


def test_new_connections_are_refused_while_draining_and_delivery_goes_on(
    tmp_path, sink, relay_process
):
    config = write_config(tmp_path, sink.port)
    slow_data(sink, 4.0)
    proc = relay_process(config).start()
    open_session = smtplib.SMTP("127.0.0.1", proc.port, timeout=10)
    try:
        open_session.ehlo("client.test")
        send_message(proc.port, "<in-flight@client.test>")
        drain = start_drain(config)
        wait_until(lambda: events_named(proc.records(), "draining"), 10, "the drain to begin")
        assert wait_until(lambda: refused(proc.port), 5, "the listener to close")
        # A session opened before the drain may still hand over its message.
        assert open_session.mail(SENDER)[0] == 250
        assert open_session.rcpt(RCPT)[0] == 250
        assert open_session.data(message("<late@client.test>"))[0] == 250
        assert drain.poll() is None  # still delivering
    finally:
        open_session.close()
    _out, err = drain.communicate(timeout=60)
    assert drain.returncode == 0, err
    assert len(sink.messages) == 2
    assert proc.proc is not None and proc.proc.wait(10) == 0
    assert events_named(proc.records(), "stopping")[0]["reason"] == "drained"
