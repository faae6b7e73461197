"""Built-in OAuth 2.0 in the real `smarthost` process: a refresh token rotated just
before a kill -9 is on disk, and the restarted relay uses it; a refused client keeps
the mail (no DSN) until it is fixed; no secret or token in the JSON log."""

from __future__ import annotations

import os
import signal
import smtplib

import pytest

from support.configs import write_config
from support.oauth2 import CLIENT_SECRET, BearerSink, TokenEndpoint, add_to_backend, oauth2_backend
from support.procs import process_tree
from support.waiting import wait_until

DEADLINE = 20.0


@pytest.fixture
def endpoint():
    server = TokenEndpoint(rotate=True)
    yield server
    server.stop()


@pytest.fixture
def upstream(endpoint):
    server = BearerSink(endpoint)
    yield server
    server.stop()


def send(port: int, message_id: str) -> None:
    with smtplib.SMTP("127.0.0.1", port, timeout=10) as client:
        client.sendmail(
            "a@client.test", ["b@dest.test"], f"Message-ID: {message_id}\r\n\r\nbody\r\n"
        )


def test_kill_9_right_after_a_rotation_loses_nothing(tmp_path, endpoint, upstream, relay_process):
    first = endpoint.new_refresh_token()
    backend = oauth2_backend(tmp_path, endpoint, flow="refresh_token", refresh_token=first)
    proc = relay_process(add_to_backend(write_config(tmp_path, upstream.port), backend)).start()
    upstream.handler.hold = True  # the AUTH that uses the new token is held there
    send(proc.port, "<rotated@client.test>")
    # The relay logs in with the access token that came with the rotation: by then the
    # new refresh token must be on disk, for the provider has voided the old one.
    wait_until(lambda: upstream.handler.logins, DEADLINE, "AUTH with the new token")
    for pid in process_tree(proc.proc.pid):
        os.kill(pid, signal.SIGKILL)
    proc.proc.wait()
    upstream.handler.hold = False
    assert upstream.messages == []
    ((old, rotated),) = endpoint.rotations
    assert old == first and first not in endpoint.refresh_tokens
    token_file = tmp_path / "refresh.token"
    assert token_file.read_text() == rotated + "\n"
    # Restarted, the relay refreshes with the rotated token and the mail goes.
    proc.start()
    wait_until(lambda: upstream.messages, DEADLINE, "delivery after the restart")
    assert b"<rotated@client.test>" in upstream.messages[0].content
    assert endpoint.rotations[1][0] == rotated
    assert token_file.read_text() == endpoint.rotations[1][1] + "\n"
    assert proc.stop() == 0
    log = proc.log_path.read_text()
    secrets_ = [CLIENT_SECRET, *endpoint.access_tokens(), first]
    secrets_ += [token for pair in endpoint.rotations for token in pair]
    assert not [s for s in secrets_ if s in log]
    assert '"oauth2_renewed"' in log


def test_a_refused_client_waits_without_a_dsn_and_goes_once_fixed(
    tmp_path, endpoint, upstream, relay_process
):
    wrong = "wrong-secret-0123456789"
    backend = oauth2_backend(tmp_path, endpoint, secret=wrong)
    proc = relay_process(add_to_backend(write_config(tmp_path, upstream.port), backend)).start()
    send(proc.port, "<waits@client.test>")

    def named(event: str) -> list[dict]:
        return [r for r in proc.records() if r.get("event") == event]

    (failed, *_) = wait_until(lambda: named("oauth2_failed"), DEADLINE, "oauth2_failed")
    assert failed["level"] == "warning" and failed["error"] == "invalid_client"
    assert failed["backend"] == "sink" and "client_secret_file" in failed["hint"]
    wait_until(lambda: named("backend_down"), DEADLINE, "backend_down")
    wait_until(lambda: named("deferred"), DEADLINE, "deferred")
    (tmp_path / "client.secret").write_text(CLIENT_SECRET + "\n")
    wait_until(lambda: upstream.messages, DEADLINE, "delivery once the secret is fixed")
    assert b"<waits@client.test>" in upstream.messages[0].content
    assert proc.stop() == 0
    assert not named("dsn_queued") and not named("failed")
    log = proc.log_path.read_text()
    assert not [s for s in (wrong, CLIENT_SECRET, *endpoint.access_tokens()) if s in log]
