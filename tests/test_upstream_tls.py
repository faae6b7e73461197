"""TLS and AUTH to the upstream, against a real aiosmtpd server with a test CA."""

from __future__ import annotations

import gc
import ssl
import subprocess

import pytest
import trustme
from aiosmtpd.controller import Controller
from aiosmtpd.smtp import AuthResult

from smarthost.config import load_config

from support.cli import run_cli
from support.configs import write_config
from support.sink import SinkHandler, start_controller
from support.waiting import wait_until

# aiosmtpd, as the test upstream here, leaks sockets of TLS sessions that end early
# (a failed STARTTLS handshake, its own implicit-TLS start-up probe). Not ours to fix.
pytestmark = pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")

BODY = b"Subject: tls\r\n\r\nsecret body\r\n"


class XOAuthSinkHandler(SinkHandler):
    """Also speaks AUTH XOAUTH2 (Gmail, Microsoft 365): a bearer token, not a password."""

    async def auth_XOAUTH2(self, server, args):
        import base64

        if len(args) < 2:
            return AuthResult(success=False, handled=False)
        fields = dict(
            part.split("=", 1)
            for part in base64.b64decode(args[1]).decode().split("\x01")
            if "=" in part
        )
        user, token = fields.get("user", ""), fields.get("auth", "").removeprefix("Bearer ")
        self.logins.append(("XOAUTH2", user, token))
        return AuthResult(success=self.users.get(user) == token, handled=False)


class TLSSink:
    """An upstream offering STARTTLS (optional) and AUTH after it."""

    def __init__(
        self, ca: trustme.CA, *, starttls: bool = True, implicit: bool = False, users=None
    ) -> None:
        cert = ca.issue_cert("127.0.0.1", "localhost")
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        cert.configure_cert(context)
        self.handler = XOAuthSinkHandler()
        self.logins: list[tuple[str, str, str]] = []
        users = users or {}

        def authenticator(server, session, envelope, mechanism, auth_data):
            login = auth_data.login.decode(), auth_data.password.decode()
            self.logins.append((mechanism, *login))
            return AuthResult(success=users.get(login[0]) == login[1], handled=False)

        self.handler.logins = self.logins
        self.handler.users = users
        self.controller = Controller(
            self.handler,
            hostname="127.0.0.1",
            port=0,
            ssl_context=context if implicit else None,
            tls_context=context if starttls and not implicit else None,
            require_starttls=starttls and not implicit,
            authenticator=authenticator,
            auth_require_tls=not implicit,
        )
        self.port = start_controller(self.controller)

    def stop(self) -> None:
        self.controller.stop()
        gc.collect()  # collect aiosmtpd's leaked sockets while this module ignores them


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
        assert upstream.logins == [("PLAIN", "relayuser", "pa55word")]
        wait_until(lambda: events.events("delivered", queue_id=queue_id), what="delivered")
        # The secret appears in no log record.
        assert not [r for r in events.records if "pa55word" in repr(r)]
    finally:
        upstream.stop()


def starttls_refused(tmp_path, upstream: TLSSink, relay_factory, events) -> str:
    """Send one message through a relay that requires STARTTLS of `upstream`, which must
    get nothing; the error of the deferred attempt."""
    relay = relay_factory(relay_config(tmp_path, upstream.port, 'tls = "starttls"'))
    queue_id = relay.send("a@client.test", ["b@dest.test"], BODY)
    deferred = wait_until(lambda: events.events("deferred", queue_id=queue_id), what="defer")
    assert upstream.handler.messages == []
    return deferred[0]["backend_errors"][0]


def test_unverifiable_certificate_is_a_backend_failure(tmp_path, ca, relay_factory, events):
    upstream = TLSSink(ca)
    try:
        error = starttls_refused(tmp_path, upstream, relay_factory, events)
        assert "CERTIFICATE_VERIFY_FAILED" in error
    finally:
        upstream.stop()


def test_starttls_required_but_not_offered_sends_nothing_in_clear(
    tmp_path, ca, relay_factory, events
):
    upstream = TLSSink(ca, starttls=False)
    try:
        error = starttls_refused(tmp_path, upstream, relay_factory, events)
        assert "does not offer STARTTLS" in error
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


@pytest.mark.parametrize(
    ("auth", "mechanism"), [("login", "LOGIN"), ("plain", "PLAIN"), ("xoauth2", "XOAUTH2")]
)
def test_implicit_tls_with_each_auth_mechanism(tmp_path, ca, relay_factory, auth, mechanism):
    upstream = TLSSink(ca, implicit=True, users={"relayuser": "t0ken"})
    try:
        backend = (
            f'tls = "implicit"\ntls_ca = "{tmp_path / "ca.pem"}"\nauth = "{auth}"\n'
            f'username = "relayuser"\npassword_command = "echo t0ken"'
        )
        relay = relay_factory(relay_config(tmp_path, upstream.port, backend))
        relay.send("a@client.test", ["b@dest.test"], BODY)
        wait_until(lambda: upstream.handler.messages, what="delivery over implicit TLS")
        assert upstream.logins == [(mechanism, "relayuser", "t0ken")]
    finally:
        upstream.stop()


def run_check_connect(config_path) -> subprocess.CompletedProcess:
    return run_cli("-c", str(config_path), "check", "--connect")


def test_check_connect_reports_tls_ehlo_and_auth(tmp_path, ca):
    upstream = TLSSink(ca, users={"relayuser": "pa55word"})
    try:
        backend = (
            f'tls = "starttls"\ntls_ca = "{tmp_path / "ca.pem"}"\n'
            'username = "relayuser"\npassword = "pa55word"'
        )
        path = write_config(tmp_path, upstream.port)
        path.write_text(path.read_text().replace('tls = "none"', backend))
        path.chmod(0o600)
        done = run_check_connect(path)
        assert done.returncode == 0, done.stdout + done.stderr
        report = done.stdout.split("backend[0]", 1)[1]
        assert "greeting 220" in report
        assert "TLSv1." in report and "verified" in report and "NOT verified" not in report
        assert "STARTTLS" in report.split("ehlo", 1)[1].splitlines()[0] or "AUTH" in report
        assert "PLAIN as relayuser: accepted" in report
        assert "session ready" in report
        assert "pa55word" not in done.stdout + done.stderr
    finally:
        upstream.stop()


def test_check_connect_fails_on_an_unverifiable_certificate(tmp_path, ca):
    upstream = TLSSink(ca)
    try:
        path = write_config(tmp_path, upstream.port)
        path.write_text(path.read_text().replace('tls = "none"', 'tls = "starttls"'))
        done = run_check_connect(path)
        assert done.returncode == 1
        assert "FAILED" in done.stdout and "CERTIFICATE_VERIFY_FAILED" in done.stdout
    finally:
        upstream.stop()
