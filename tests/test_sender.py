"""Reply classification (SPEC §5) and the pieces of a session that need no network."""

from __future__ import annotations

import ssl
import sys

import pytest

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
