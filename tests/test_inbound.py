"""Inbound STARTTLS and AUTH with a real TLS client and certificates made at test time."""

from __future__ import annotations

import smtplib
import ssl
import subprocess
import sys
import threading

import pytest
import trustme

from smarthost.auth import hash_password, verify_password
from smarthost.config import load_config

from support.configs import write_config

MESSAGE = b"Subject: auth\r\n\r\nbody\r\n"


@pytest.fixture
def tls_relay(tmp_path, sink, relay_factory):
    """A relay that offers STARTTLS and AUTH, and lets nobody relay without AUTH."""
    ca = trustme.CA()
    cert = ca.issue_cert("127.0.0.1", "localhost")
    cert.private_key_and_cert_chain_pem.write_to_path(str(tmp_path / "server.pem"))
    users = tmp_path / "users"
    users.write_text(f"# test users\nalice:{hash_password('wonderland')}\n")
    smtp = (
        f'allow = []\ntls_cert = "{tmp_path / "server.pem"}"\n'
        f'tls_key = "{tmp_path / "server.pem"}"\nauth_users = "{users}"\n'
    )
    path = write_config(tmp_path, sink.port, smtp=smtp)
    relay = relay_factory(load_config(path))
    client_context = ssl.create_default_context()
    ca.configure_trust(client_context)
    return relay, client_context


def test_passwords_hash_and_verify():
    stored = hash_password("correct horse")
    assert stored.startswith("$scrypt$n=16384,r=8,p=1$")
    assert verify_password(stored, "correct horse")
    assert not verify_password(stored, "wrong horse")
    assert hash_password("correct horse") != stored  # salted
    assert not verify_password("garbage", "x")


def test_passwd_command_prints_a_line_for_auth_users():
    done = subprocess.run(
        [sys.executable, "-m", "smarthost", "passwd", "bob"],
        input="hunter2\n",
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert done.returncode == 0, done.stderr
    user, _, stored = done.stdout.strip().partition(":")
    assert user == "bob" and verify_password(stored, "hunter2")
    assert "hunter2" not in done.stdout


def test_auth_is_offered_only_after_starttls(tls_relay):
    relay, context = tls_relay
    with relay.client() as client:
        client.ehlo("client.test")
        assert client.has_extn("starttls") and not client.has_extn("auth")
        code, msg = client.docmd("AUTH", "PLAIN AGFsaWNlAHdvbmRlcmxhbmQ=")
        assert code == 538 and msg.startswith(b"5.7.11"), (code, msg)
        client.starttls(context=context)
        client.ehlo("client.test")
        assert "PLAIN" in client.esmtp_features["auth"]
        assert "LOGIN" in client.esmtp_features["auth"]


def test_no_relay_without_auth_outside_allow(tls_relay, events):
    relay, context = tls_relay
    with relay.client() as client:
        client.starttls(context=context)
        client.ehlo("client.test")
        client.mail("a@client.test")
        code, msg = client.rcpt("b@dest.test")
    assert code == 554 and b"5.7.1" in msg and b"Relay access denied" in msg


@pytest.mark.parametrize("mechanism", ["PLAIN", "LOGIN"])
def test_authenticated_client_relays_over_tls(tls_relay, sink, mechanism):
    relay, context = tls_relay
    with relay.client() as client:
        client.starttls(context=context)
        client.ehlo("client.test")
        client.user, client.password = "alice", "wonderland"
        code, _ = client.auth(mechanism, getattr(client, f"auth_{mechanism.lower()}"))
        assert code == 235
        client.sendmail("a@client.test", ["b@dest.test"], MESSAGE)
    (got,) = sink.wait_for(1)
    assert got.content.endswith(MESSAGE)
    assert b"with ESMTPSA" in got.content.split(b"\r\n\r\n")[0]


def test_failed_auth_is_logged_without_the_secret_and_braked(tls_relay, events):
    relay, context = tls_relay
    with relay.client() as client:
        client.starttls(context=context)
        client.ehlo("client.test")
        client.user, client.password = "alice", "guess-Xy9"
        for _ in range(5):
            with pytest.raises(smtplib.SMTPAuthenticationError) as failure:
                client.auth("PLAIN", client.auth_plain)
            assert failure.value.smtp_code == 535
        # The sixth try is refused without checking the password at all.
        client.password = "wonderland"
        with pytest.raises(smtplib.SMTPAuthenticationError) as braked:
            client.auth("PLAIN", client.auth_plain)
        assert braked.value.smtp_code == 454
    failures = events.events("auth_failed")
    assert len(failures) >= 5 and failures[0]["user"] == "alice"
    assert not [r for r in events.records if "guess-Xy9" in repr(r)]


@pytest.mark.parametrize("mechanism", ["PLAIN", "LOGIN"])
def test_the_slow_password_check_runs_off_the_event_loop(tls_relay, mechanism):
    """scrypt takes tens of milliseconds on purpose: on the loop it would hold up every
    other session for as long."""
    relay, context = tls_relay
    receiver = relay.relay.receiver
    threads: list[str] = []
    check = receiver.authenticate

    def recording(*args):
        threads.append(threading.current_thread().name)
        return check(*args)

    receiver.authenticate = recording
    with relay.client() as client:
        client.starttls(context=context)
        client.ehlo("client.test")
        client.user, client.password = "alice", "wonderland"
        assert client.auth(mechanism, getattr(client, f"auth_{mechanism.lower()}"))[0] == 235
    assert threads and all(name != "smtp" for name in threads), threads
