"""TLS and AUTH to the upstream, against a real aiosmtpd server with a test CA."""

from __future__ import annotations

import ssl

import pytest
import trustme
from aiosmtpd.controller import Controller
from aiosmtpd.smtp import AuthResult
from conftest import SinkHandler, wait_until, write_config

from smarthost.config import load_config

BODY = b"Subject: tls\r\n\r\nsecret body\r\n"


class TLSSink:
    """An upstream offering STARTTLS (optional) and AUTH after it."""

    def __init__(self, ca: trustme.CA, *, starttls: bool = True, users=None) -> None:
        cert = ca.issue_cert("127.0.0.1", "localhost")
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        cert.configure_cert(context)
        self.handler = SinkHandler()
        self.logins: list[tuple[str, str]] = []
        users = users or {}

        def authenticator(server, session, envelope, mechanism, auth_data):
            login = auth_data.login.decode(), auth_data.password.decode()
            self.logins.append(login)
            return AuthResult(success=users.get(login[0]) == login[1], handled=False)

        self.controller = Controller(
            self.handler,
            hostname="127.0.0.1",
            port=0,
            tls_context=context if starttls else None,
            require_starttls=starttls,
            authenticator=authenticator,
            auth_require_tls=True,
        )
        original = self.controller._trigger_server

        def trigger() -> None:
            self.controller.port = self.controller.server.sockets[0].getsockname()[1]
            original()

        self.controller._trigger_server = trigger
        self.controller.start()
        self.port = self.controller.port

    def stop(self) -> None:
        self.controller.stop()


@pytest.fixture
def ca(tmp_path):
    authority = trustme.CA()
    authority.cert_pem.write_to_path(str(tmp_path / "ca.pem"))
    return authority


def relay_config(tmp_path, port: int, backend: str):
    path = write_config(tmp_path, port)
    text = path.read_text().replace('tls = "none"', backend)
    path.write_text(text)
    return load_config(path)


def test_starttls_with_a_verified_certificate_and_auth(tmp_path, ca, relay_factory, events):
    upstream = TLSSink(ca, users={"relayuser": "pa55word"})
    try:
        secret = tmp_path / "secret"
        secret.write_text("pa55word\n")
        secret.chmod(0o600)
        backend = (
            f'tls = "starttls"\ntls_ca = "{tmp_path / "ca.pem"}"\n'
            f'username = "relayuser"\npassword_file = "{secret}"'
        )
        relay = relay_factory(relay_config(tmp_path, upstream.port, backend))
        queue_id = relay.send("a@client.test", ["b@dest.test"], BODY)
        wait_until(lambda: upstream.handler.messages, what="delivery over TLS")
        assert upstream.handler.messages[0].content.endswith(BODY)
        assert upstream.logins == [("relayuser", "pa55word")]
        wait_until(lambda: events.events("delivered", queue_id=queue_id), what="delivered")
        # The secret appears in no log record.
        assert not [r for r in events.records if "pa55word" in repr(r)]
    finally:
        upstream.stop()


# aiosmtpd (the test upstream here) leaks the transport of a failed STARTTLS handshake.
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_unverifiable_certificate_is_a_backend_failure(tmp_path, ca, relay_factory, events):
    upstream = TLSSink(ca)
    try:
        relay = relay_factory(relay_config(tmp_path, upstream.port, 'tls = "starttls"'))
        queue_id = relay.send("a@client.test", ["b@dest.test"], BODY)
        deferred = wait_until(lambda: events.events("deferred", queue_id=queue_id), what="defer")
        assert "CERTIFICATE_VERIFY_FAILED" in deferred[0]["backend_errors"][0]
        assert upstream.handler.messages == []
    finally:
        upstream.stop()


def test_starttls_required_but_not_offered_sends_nothing_in_clear(
    tmp_path, ca, relay_factory, events
):
    upstream = TLSSink(ca, starttls=False)
    try:
        relay = relay_factory(relay_config(tmp_path, upstream.port, 'tls = "starttls"'))
        queue_id = relay.send("a@client.test", ["b@dest.test"], BODY)
        deferred = wait_until(lambda: events.events("deferred", queue_id=queue_id), what="defer")
        assert "does not offer STARTTLS" in deferred[0]["backend_errors"][0]
        assert upstream.handler.messages == []
    finally:
        upstream.stop()


def test_auth_failure_defers_and_never_bounces(tmp_path, ca, relay_factory, events):
    upstream = TLSSink(ca, users={"relayuser": "right"})
    try:
        backend = (
            f'tls = "starttls"\ntls_ca = "{tmp_path / "ca.pem"}"\n'
            'username = "relayuser"\npassword = "wrong"'
        )
        relay = relay_factory(relay_config(tmp_path, upstream.port, backend))
        queue_id = relay.send("a@client.test", ["b@dest.test"], BODY)
        deferred = wait_until(lambda: events.events("deferred", queue_id=queue_id), what="defer")
        assert deferred[0]["backend_errors"][0].startswith("sink: 535")
        assert not events.events("failed", queue_id=queue_id)
        assert not [r for r in events.records if "wrong" in str(r.get("backend_errors"))]
    finally:
        upstream.stop()
