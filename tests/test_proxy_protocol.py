"""The PROXY protocol on the listener (SPEC §4), through a real HAProxy.

HAProxy (Debian's `haproxy`) listens on two free ports, one per header version
(`send-proxy`, `send-proxy-v2`), in front of an in-process relay whose `proxy_from` is
the proxy (127.0.0.1) and whose `allow` is only 127.0.0.2: a client connecting to
HAProxy from 127.0.0.2 may relay, one from 127.0.0.1 may not, which shows `allow` sees
the client named in the header, not the proxy.
"""

from __future__ import annotations

import shutil
import smtplib
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from smarthost.config import load_config

from support.configs import write_config
from support.sink import Sink
from support.waiting import wait_until

HAPROXY = shutil.which("haproxy") or shutil.which("haproxy", path="/usr/sbin:/sbin")
REAL_CLIENT = "127.0.0.2"  # another loopback address: the client the proxy stands for

pytestmark = pytest.mark.skipif(
    HAPROXY is None, reason="haproxy is not installed (Debian package haproxy)"
)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def accepts(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
    except OSError:
        return False
    return True


class HAProxy:
    """haproxy in the foreground, one frontend per PROXY header version."""

    def __init__(self, tmp_path: Path, relay_port: int) -> None:
        self.v1_port, self.v2_port = free_port(), free_port()
        self.config = tmp_path / "haproxy.cfg"
        self.config.write_text(
            f"""
defaults
    mode tcp
    timeout connect 2s
    timeout client 10s
    timeout server 10s
frontend smtp_v1
    bind 127.0.0.1:{self.v1_port}
    default_backend relay_v1
frontend smtp_v2
    bind 127.0.0.1:{self.v2_port}
    default_backend relay_v2
backend relay_v1
    server relay 127.0.0.1:{relay_port} send-proxy
backend relay_v2
    server relay 127.0.0.1:{relay_port} send-proxy-v2
"""
        )
        assert HAPROXY is not None
        self.proc = subprocess.Popen(
            [HAPROXY, "-db", "-f", str(self.config)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        wait_until(lambda: accepts(self.v1_port) and accepts(self.v2_port), 10, "haproxy to listen")

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(5)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        assert self.proc.stderr is not None
        self.proc.stderr.close()


def proxied_relay(tmp_path: Path, sink: Sink, relay_factory, smtp: str = ""):
    """A relay that takes connections only through the PROXY protocol, from 127.0.0.1."""
    extra = f"""
[smtp]
listen = ["127.0.0.1:0"]
allow = ["{REAL_CLIENT}/32"]
proxy_protocol = true
proxy_from = ["127.0.0.1/32"]
{smtp}
"""
    path = write_config(tmp_path, sink.port)
    # write_config has its own [smtp]: replace it with the proxied listener.
    text = path.read_text().replace('[smtp]\nlisten = ["127.0.0.1:0"]\n', extra)
    path.write_text(text)
    return relay_factory(load_config(path))


@pytest.fixture
def proxied(tmp_path: Path, sink: Sink, relay_factory) -> Iterator[tuple[object, HAProxy]]:
    """A proxied relay, and HAProxy in front of it."""
    relay = proxied_relay(tmp_path, sink, relay_factory)
    haproxy = HAProxy(tmp_path, relay.port)
    yield relay, haproxy
    haproxy.stop()


def send_through(port: int, source: str) -> tuple[int, bytes]:
    """One message through the proxy from `source`; the RCPT reply (and the message
    is sent when it was accepted)."""
    with smtplib.SMTP("127.0.0.1", port, timeout=10, source_address=(source, 0)) as client:
        client.ehlo("client.test")
        client.mail("app@example.com")
        code, reply = client.rcpt("user@example.org")
        if code == 250:
            assert client.data(b"Subject: proxied\r\n\r\nhello\r\n")[0] == 250
        return code, reply


@pytest.mark.parametrize("version", ["v1", "v2"])
def test_the_header_names_the_client_allow_logs_and_received_use(proxied, sink, events, version):
    _, haproxy = proxied
    port = haproxy.v1_port if version == "v1" else haproxy.v2_port

    code, _ = send_through(port, REAL_CLIENT)
    assert code == 250
    [message] = sink.wait_for(1)
    received = message.content.split(b"\r\n", 1)[0]
    assert f"[{REAL_CLIENT}]".encode() in received, received
    wait_until(lambda: events.events("received", client=REAL_CLIENT), 5, "the received event")

    # The proxy itself (127.0.0.1) is not in `allow`: as a client, it may not relay.
    code, reply = send_through(port, "127.0.0.1")
    assert code == 554 and b"5.7.1" in reply
    assert events.events("rejected", client="127.0.0.1")
    assert len(sink.messages) == 1


def test_a_connection_without_the_header_is_closed_and_logged(proxied, events):
    relay, _ = proxied
    sock = socket.create_connection(("127.0.0.1", relay.port), timeout=5)
    with sock:
        sock.sendall(b"EHLO client.test\r\n")  # no PROXY header first
        sock.settimeout(5)
        assert sock.recv(1024) == b""  # closed without a greeting
    wait_until(lambda: events.events("protocol_error", client="127.0.0.1"), 5, "the protocol_error")
    [record] = events.events("protocol_error", client="127.0.0.1")
    assert "PROXY" in record["error"]


def test_a_connection_from_outside_proxy_from_is_refused(proxied, events):
    relay, _ = proxied
    with socket.create_connection(
        ("127.0.0.1", relay.port), timeout=5, source_address=(REAL_CLIENT, 0)
    ) as sock:
        # Refused on connect, before any header could be read (and believed).
        said = b""
        while chunk := sock.recv(1024):  # until the relay closes
            said += chunk
    assert said.startswith(b"554 5.7.1") and said.count(b"\r\n") == 1, said
    [record] = events.events("rejected", client=REAL_CLIENT)
    assert record["error"] == "not in proxy_from"
    assert not events.events("received")


def test_a_proxy_that_sends_no_header_in_time_is_closed(tmp_path, sink, relay_factory, events):
    # The header must come within smtp.timeout, here 3 s (at most 10 s, at least 3).
    relay = proxied_relay(tmp_path, sink, relay_factory, smtp='timeout = "3s"')
    started = time.monotonic()
    with socket.create_connection(("127.0.0.1", relay.port), timeout=10) as sock:
        assert sock.recv(1024) == b""  # no greeting, then closed
    assert 2.5 < time.monotonic() - started < 6
    wait_until(lambda: events.events("protocol_error", client="127.0.0.1"), 5)
    [record] = events.events("protocol_error", client="127.0.0.1")
    assert record["error"] == "no PROXY header within the timeout"
