"""Reply classification (SPEC §5) and the pieces of a session that need no network."""

from __future__ import annotations

import smtplib
import ssl
import sys

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from smarthost.config import BackendConfig
from smarthost.sender import (
    BackendFailure,
    Outcome,
    classify,
    enhanced_status,
    format_reply,
    read_secret,
)
from smarthost.upstream import make_tls_context


@pytest.mark.parametrize(
    ("stage", "code", "outcome"),
    [
        ("connect", 220, Outcome.OK),
        ("connect", 554, Outcome.BACKEND_FAILURE),
        ("ehlo", 500, Outcome.BACKEND_FAILURE),
        ("starttls", 454, Outcome.BACKEND_FAILURE),
        ("auth", 535, Outcome.BACKEND_FAILURE),
        ("auth", 454, Outcome.BACKEND_FAILURE),
        ("mail", 250, Outcome.OK),
        ("mail", 421, Outcome.BACKEND_FAILURE),
        ("mail", 451, Outcome.DEFER_MESSAGE),
        ("mail", 553, Outcome.FAIL_MESSAGE),
        ("rcpt", 250, Outcome.OK),
        ("rcpt", 251, Outcome.OK),
        ("rcpt", 421, Outcome.BACKEND_FAILURE),
        ("rcpt", 450, Outcome.DEFER_RECIPIENT),
        ("rcpt", 550, Outcome.FAIL_RECIPIENT),
        ("data", 354, Outcome.OK),
        ("data", 250, Outcome.OK),
        ("data", 421, Outcome.BACKEND_FAILURE),
        ("data", 452, Outcome.DEFER_MESSAGE),
        ("data", 554, Outcome.FAIL_MESSAGE),
        ("rset", 500, Outcome.BACKEND_FAILURE),
    ],
)
def test_classify(stage, code, outcome):
    assert classify(stage, code) is outcome


def test_enhanced_status_from_reply_or_class():
    assert enhanced_status(550, "5.1.1 no such user") == "5.1.1"
    assert enhanced_status(451, "try later") == "4.0.0"
    assert enhanced_status(250, "ok") == "2.0.0"
    assert enhanced_status(-1, "") == "4.0.0"


def test_format_reply_joins_multiline_text():
    assert (
        format_reply(550, b"5.7.1 first line\n5.7.1 second") == "550 5.7.1 first line 5.7.1 second"
    )


def test_tls_verifies_by_default():
    ctx = make_tls_context(BackendConfig(host="smtp.example.com"))
    assert ctx.verify_mode == ssl.CERT_REQUIRED and ctx.check_hostname
    lax = make_tls_context(BackendConfig(host="smtp.example.com", tls_verify=False))
    assert lax.verify_mode == ssl.CERT_NONE


def test_secret_from_file_and_command(tmp_path):
    secret = tmp_path / "secret"
    secret.write_text("s3cret\nignored\n")
    assert read_secret(BackendConfig(host="h", username="u", password_file=str(secret))) == "s3cret"
    command = f"{sys.executable} -c 'print(\"tok3n\")'"
    assert read_secret(BackendConfig(host="h", username="u", password_command=command)) == "tok3n"


def test_failing_password_command_is_a_backend_failure_without_its_output():
    command = f"{sys.executable} -c 'print(\"half-secret\"); raise SystemExit(3)'"
    with pytest.raises(BackendFailure) as info:
        read_secret(BackendConfig(host="h", username="u", password_command=command))
    assert "exited 3" in info.value.reply and "half-secret" not in info.value.reply


# -- the transaction's commands say what smtplib's would -----------------------------


@settings(max_examples=300, deadline=None, database=None)
@given(st.data())
def test_simple_paths_are_quoted_as_smtplib_quotes_them(data):
    from smarthost.sender import _SIMPLE_ADDRESS, _path

    address = data.draw(st.from_regex(_SIMPLE_ADDRESS, fullmatch=True))
    assert _path(address) == smtplib.quoteaddr(address)


@pytest.mark.parametrize("address", ["", "<>", '"a b"@c', "é@x", "a@[1.2.3.4]", "Eve <e@x>"])
def test_other_paths_go_through_smtplib(address):
    from smarthost.sender import _path

    assert _path(address) == smtplib.quoteaddr(address)


class _Recorder:
    """Enough of smtplib.SMTP for send_content: what goes on the wire."""

    def __init__(self) -> None:
        self.sent = b""
        self.replies = [(354, b"go ahead"), (250, b"ok")]
        self.debuglevel = 0

    def putcmd(self, cmd, args=""):
        self.sent += f"{cmd}{' ' + args if args else ''}\r\n".encode()

    def getreply(self):
        return self.replies.pop(0)

    def send(self, data):
        self.sent += data


@settings(max_examples=300, deadline=None, database=None)
@given(st.lists(st.sampled_from([b".", b"\r\n", b"\n", b"\r", b"a", b"..", b"\r\n.\r\n"])))
def test_send_content_puts_smtplibs_bytes_on_the_wire(parts):
    from smarthost.sender import send_content

    content = b"".join(parts)
    ours, theirs = _Recorder(), _Recorder()
    ours.replies.pop(0)  # DATA and its 354 are the Exchange's
    assert send_content(ours, content) == (250, b"ok")
    assert smtplib.SMTP.data(theirs, content) == (250, b"ok")
    assert b"data\r\n" + ours.sent == theirs.sent
