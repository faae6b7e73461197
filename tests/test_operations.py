"""Operations on the real process: reload, log rotation, readiness, privilege drop,
client limits and timeouts."""

from __future__ import annotations

import os
import pwd
import signal
import smtplib
import socket
import tempfile
import time
from pathlib import Path

import pytest

from support.cli import run_cli
from support.configs import write_config
from support.logs import events_named
from support.sink import Sink
from support.smtp import send_one
from support.waiting import wait_until

MESSAGE = b"Subject: ops\r\n\r\nbody\r\n"


def send(port: int, rcpt: str = "b@dest.test") -> str:
    return send_one(port, "a@client.test", [rcpt], MESSAGE)


def test_sighup_reloads_upstreams_without_dropping_a_session(tmp_path, sink, relay_process):
    other = Sink().start()
    try:
        path = write_config(tmp_path, sink.port)
        proc = relay_process(path).start()
        held = smtplib.SMTP("127.0.0.1", proc.port, timeout=10)  # open across the reload
        held.ehlo("client.test")
        send(proc.port)
        sink.wait_for(1)
        path.write_text(path.read_text().replace(f"port = {sink.port}", f"port = {other.port}"))
        proc.proc.send_signal(signal.SIGHUP)
        reloaded = wait_until(
            lambda: events_named(proc.records(), "config_reloaded"), what="reload"
        )
        assert reloaded[0]["ok"] is True
        # The session opened before the reload still works, and uses the new upstream.
        held.sendmail("a@client.test", ["c@dest.test"], MESSAGE)
        held.quit()
        assert other.wait_for(1)[0].rcpt_tos == ["c@dest.test"]
        assert len(sink.messages) == 1
        assert proc.stop() == 0
    finally:
        other.stop()


def test_a_bad_config_on_sighup_is_refused_and_the_old_one_kept(tmp_path, sink, relay_process):
    path = write_config(tmp_path, sink.port)
    proc = relay_process(path).start()
    good = path.read_text()
    path.write_text(good.replace("[smtp]\n", "[smtp]\nmax_client = 3\n", 1))
    proc.proc.send_signal(signal.SIGHUP)
    refused = wait_until(lambda: events_named(proc.records(), "config_reloaded"), what="refusal")
    assert refused[0]["ok"] is False and refused[0]["level"] == "error"
    assert any("smtp.max_client" in error for error in refused[0]["errors"])
    send(proc.port)  # still relaying with the old config
    sink.wait_for(1)
    assert proc.stop() == 0


def test_log_file_is_reopened_after_rotation(tmp_path, sink, relay_process):
    log_file = tmp_path / "smarthost.log"
    path = write_config(tmp_path, sink.port, f'file = "{log_file}"')
    proc = relay_process(path)
    proc.log_path = log_file
    proc.start()
    rotated = tmp_path / "smarthost.log.1"
    os.rename(log_file, rotated)  # what logrotate does, then it sends SIGHUP
    proc.proc.send_signal(signal.SIGHUP)
    wait_until(log_file.exists, what="a new log file")
    queue_id = send(proc.port)
    # Both processes reopened it: the delivery process logs `delivered` there too.
    wait_until(
        lambda: any(
            r.get("queue_id") == queue_id and r["event"] == "delivered" for r in proc.records()
        ),
        what="the message's events in the new file",
    )
    assert '"started"' in rotated.read_text() and queue_id not in rotated.read_text()
    assert proc.stop() == 0


def test_systemd_readiness_is_notified(tmp_path, sink, relay_process):
    address = str(tmp_path / "notify.sock")
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as listener:
        listener.bind(address)
        listener.settimeout(20)
        proc = relay_process(write_config(tmp_path, sink.port))
        proc.env = {"NOTIFY_SOCKET": address}
        proc.start()
        assert listener.recv(100) == b"READY=1"
        proc.proc.send_signal(signal.SIGHUP)
        assert listener.recv(100) == b"RELOADING=1"
        assert listener.recv(100) == b"READY=1"
        proc.proc.send_signal(signal.SIGTERM)
        assert listener.recv(100) == b"STOPPING=1"
        assert proc.stop() == 0


@pytest.mark.skipif(os.geteuid() != 0, reason="dropping privileges needs root")
def test_privileges_are_dropped_after_binding(sink, relay_process):
    account = pwd.getpwnam("nobody")
    # A spool the unprivileged user can reach: tmp_path's parents are private to root.
    base = Path(tempfile.mkdtemp(prefix="smarthost-user-", dir="/var/tmp"))
    base.chmod(0o755)
    try:
        path = write_config(base, sink.port)
        path.write_text('user = "nobody"\n' + path.read_text())
        proc = relay_process(path)
        proc.log_path = base / "relay.log"
        proc.start()
        started = next(r for r in proc.records() if r["event"] == "started")
        assert started["delivery_pid"] != proc.proc.pid
        for pid in (proc.proc.pid, started["delivery_pid"]):  # the relay and its delivery
            status = Path(f"/proc/{pid}/status").read_text()
            uids = next(line for line in status.splitlines() if line.startswith("Uid:")).split()
            assert {int(u) for u in uids[1:]} == {account.pw_uid}
        send(proc.port)
        sink.wait_for(1)
        spool = base / "spool"
        assert os.stat(spool).st_uid == account.pw_uid
        assert os.stat(spool / "queue").st_uid == account.pw_uid
        assert proc.stop() == 0
    finally:
        import shutil

        shutil.rmtree(base, ignore_errors=True)


def test_an_idle_client_is_timed_out(tmp_path, sink, relay_process):
    path = write_config(tmp_path, sink.port, smtp='timeout = "1s"')
    proc = relay_process(path).start()
    with socket.create_connection(("127.0.0.1", proc.port), timeout=10) as slow:
        assert slow.recv(100).startswith(b"220")
        slow.sendall(b"EHLO slow")  # half a command, then nothing: a slowloris
        started = time.monotonic()
        while slow.recv(100):
            pass  # until the server closes
        assert time.monotonic() - started < 8  # generous: the timeout is 1 s
    send(proc.port)  # a normal client is still served
    assert proc.stop() == 0


def test_a_bad_users_file_is_a_config_error_at_start_and_on_reload(tmp_path, sink, relay_process):

    import trustme

    cert = trustme.CA().issue_cert("127.0.0.1")
    cert.private_key_and_cert_chain_pem.write_to_path(str(tmp_path / "server.pem"))
    users = tmp_path / "users"
    users.write_text("not a users line\n")
    smtp = (
        f'tls_cert = "{tmp_path / "server.pem"}"\ntls_key = "{tmp_path / "server.pem"}"\n'
        f'auth_users = "{users}"\n'
    )
    path = write_config(tmp_path, sink.port, smtp=smtp)
    done = run_cli("-c", str(path), "serve", timeout=30)
    assert done.returncode == 78 and "smtp.auth_users" in done.stderr
    assert "Traceback" not in done.stderr
    checked = run_cli("-c", str(path), "check", timeout=30)
    assert checked.returncode == 1 and "smtp.auth_users" in checked.stderr
    # With a good file it starts; a broken one on SIGHUP is refused, the relay lives on.
    from smarthost.auth import hash_password

    users.write_text(f"alice:{hash_password('x')}\n")
    proc = relay_process(path).start()
    users.write_text("broken\n")
    proc.proc.send_signal(signal.SIGHUP)
    refused = wait_until(lambda: events_named(proc.records(), "config_reloaded"), what="refusal")
    assert refused[0]["ok"] is False
    assert proc.proc.poll() is None
    assert proc.stop() == 0


@pytest.mark.skipif(os.geteuid() != 0, reason="submitting as another user needs root")
def test_any_local_user_can_submit_and_the_relay_can_read_it(sink):
    import shutil
    import subprocess
    import sys

    from smarthost.config import load_config
    from smarthost.spool import DROP, Spool

    from support import ROOT

    account = pwd.getpwnam("nobody")
    interpreter = Path(os.path.realpath(sys.executable))
    if any(not d.stat().st_mode & 0o001 for d in interpreter.parents):
        pytest.skip(f"other users cannot reach this Python ({interpreter})")
    base = Path(tempfile.mkdtemp(prefix="smarthost-drop-", dir="/var/tmp"))
    base.chmod(0o755)
    try:
        path = write_config(base, sink.port)
        path.chmod(0o644)
        Spool(load_config(path).spool.dir).create()

        def as_nobody() -> None:
            os.setgroups([])
            os.setgid(account.pw_gid)
            os.setuid(account.pw_uid)
            os.umask(0o077)  # a strict umask must not make the file unreadable

        done = subprocess.run(
            [sys.executable, "-m", "smarthost", "-c", str(path), "sendmail", "b@dest.test"],
            input=b"Subject: from nobody\n\nhi\n",
            capture_output=True,
            preexec_fn=as_nobody,
            cwd=ROOT,
            env={**os.environ, "PYTHONPATH": str(ROOT)},
            timeout=30,
        )
        assert done.returncode == 0, done.stderr
        (dropped,) = [p for p in (base / "spool" / DROP).iterdir()]
        assert dropped.stat().st_uid == account.pw_uid
        assert dropped.stat().st_mode & 0o777 == 0o644
        # Nobody else can list the drop area.
        assert (base / "spool" / DROP).stat().st_mode & 0o7777 == 0o1733
    finally:
        shutil.rmtree(base, ignore_errors=True)


def test_a_strict_umask_still_leaves_the_drop_file_readable_by_the_relay(tmp_path, sink):
    import subprocess
    import sys

    from smarthost.spool import DROP

    path = write_config(tmp_path, sink.port)
    done = subprocess.run(
        [sys.executable, "-m", "smarthost", "-c", str(path), "sendmail", "b@dest.test"],
        input=b"Subject: umask\n\nhi\n",
        capture_output=True,
        preexec_fn=lambda: os.umask(0o077),
        timeout=30,
    )
    assert done.returncode == 0, done.stderr
    (dropped,) = list((tmp_path / "spool" / DROP).iterdir())
    assert dropped.stat().st_mode & 0o777 == 0o644


def test_check_warns_when_the_service_user_cannot_run_the_interpreter(tmp_path, sink):
    """The README's trap: a venv whose Python the service user cannot reach (made with
    a python3 under /root). `check` names the path; with a reachable one it is quiet."""
    import shutil
    import subprocess
    import sys

    from support import ROOT

    venv = Path(sys.prefix)
    if venv == Path(sys.base_prefix):
        pytest.skip("not running in a virtualenv")
    private = Path(tempfile.mkdtemp(prefix="smarthost-private-", dir="/var/tmp"))
    try:
        private.chmod(0o700)  # like /root: other users cannot search it
        (private / "venv").symlink_to(venv, target_is_directory=True)
        path = write_config(tmp_path, sink.port)
        path.write_text('user = "nobody"\n' + path.read_text())

        def check(python: str) -> subprocess.CompletedProcess:
            return subprocess.run(
                [python, "-m", "smarthost", "-c", str(path), "check"],
                capture_output=True,
                text=True,
                timeout=30,
                cwd=ROOT,
            )

        done = check(str(private / "venv" / "bin" / "python"))
        assert done.returncode == 0, done.stderr
        assert "warning: user nobody cannot use the Python interpreter" in done.stderr
        assert f"{private} is not searchable by it" in done.stderr
        assert "/usr/bin/python3 -m venv" in done.stderr
        # Without `user`, the spool's owner is the service user: here that is us.
        path.write_text(path.read_text().replace('user = "nobody"\n', ""))
        quiet = check(str(private / "venv" / "bin" / "python"))
        assert quiet.returncode == 0 and "cannot use" not in quiet.stderr, quiet.stderr
    finally:
        shutil.rmtree(private, ignore_errors=True)
