"""Built-in OAuth 2.0 (SPEC §11): tokens from a real token endpoint on loopback, used
over XOAUTH2 and OAUTHBEARER with a real aiosmtpd upstream that accepts only a token
that endpoint issued and that has not expired."""

from __future__ import annotations

import os
import subprocess
import sys
import time
import urllib.parse
import urllib.request

import pytest

from smarthost import oauth2
from smarthost.config import ConfigError, load_config, parse_config

from support.configs import write_config
from support.oauth2 import (
    CLIENT_ID,
    CLIENT_SECRET,
    USER,
    BearerSink,
    TokenEndpoint,
    add_to_backend,
    oauth2_backend,
    s256,
)
from support.spool import spool_files
from support.waiting import wait_until

BODY = b"Subject: oauth\r\n\r\nbody\r\n"


@pytest.fixture
def endpoint():
    server = TokenEndpoint()
    yield server
    server.stop()


@pytest.fixture
def upstream(endpoint):
    server = BearerSink(endpoint)
    yield server
    server.stop()


def start_relay(tmp_path, relay_factory, upstream, endpoint, **backend):
    path = add_to_backend(
        write_config(tmp_path, upstream.port), oauth2_backend(tmp_path, endpoint, **backend)
    )
    return relay_factory(load_config(path))


def new_sessions(relay) -> None:
    """Close the relay's idle upstream sessions: the next message logs in afresh."""
    relay.relay.delivery.upstreams.close_all()


def leaked(records, *secrets_: str) -> list:
    """Log records that hold any of `secrets_`."""
    return [r for r in records if any(s in repr(r) for s in secrets_)]


# -- the config ----------------------------------------------------------------------


def config_with(oauth2_table: str, backend: str = 'username = "u@x.test"\nauth = "xoauth2"'):
    import tomllib

    text = f'[[backend]]\nhost = "smtp.test"\n{backend}\n[backend.oauth2]\n{oauth2_table}'
    return parse_config(tomllib.loads(text))


@pytest.mark.parametrize(
    ("table", "error"),
    [
        (
            'flow = "client_credentials"\nprovider = "microsoft"\ntenant = "contoso.test"\n'
            'client_secret_file = "/s"',
            'backend[0].oauth2.client_id: required for flow "client_credentials"',
        ),
        (
            'flow = "client_credentials"\nprovider = "microsoft"\ntenant = "contoso.test"\n'
            'client_id = "c"',
            'backend[0].oauth2.client_secret_file: required for flow "client_credentials"',
        ),
        (
            'flow = "refresh_token"\nprovider = "google"\nclient_id = "c"\n'
            'client_secret_file = "/s"',
            'backend[0].oauth2.refresh_token_file: required for flow "refresh_token"',
        ),
        (
            'flow = "client_credentials"\nprovider = "google"\nclient_id = "c"\n'
            'client_secret_file = "/s"',
            'backend[0].oauth2.flow: provider "google" offers "refresh_token" only',
        ),
        (
            'flow = "client_credentials"\nprovider = "microsoft"\nclient_id = "c"\n'
            'client_secret_file = "/s"',
            'backend[0].oauth2.tenant: required for provider "microsoft"',
        ),
        (
            'flow = "client_credentials"\nclient_id = "c"\nclient_secret_file = "/s"\n'
            'token_url = "http://login.example.com/token"',
            "backend[0].oauth2.token_url: must be https (http only to a loopback host)",
        ),
        (
            'flow = "client_credentials"\nclient_id = "c"\nclient_secret_file = "/s"',
            "backend[0].oauth2.token_url: required without a provider",
        ),
        ('flow = "password"', "backend[0].oauth2.flow: must be one of"),
        (
            'flow = "client_credentials"\nclient_id = "c"\nclient_secret_file = "/s"\n'
            'token_url = "https://x.test/t"\nclient_secert = "x"',
            "backend[0].oauth2.client_secert: unknown key (did you mean client_secret_file?)",
        ),
    ],
)
def test_a_bad_oauth2_table_is_reported_by_key_path(table, error):
    with pytest.raises(ConfigError) as caught:
        config_with(table)
    assert any(e.startswith(error) for e in caught.value.errors), caught.value.errors


def test_oauth2_needs_a_bearer_mechanism_a_username_and_no_password():
    table = 'flow = "client_credentials"\nclient_id = "c"\nclient_secret_file = "/s"\n'
    table += 'token_url = "https://x.test/t"'
    with pytest.raises(ConfigError) as caught:
        config_with(table, backend='password = "p"')
    assert caught.value.errors == [
        "backend[0].username: required when password is set",
        'backend[0].auth: must be "xoauth2" or "oauthbearer" with [backend.oauth2]',
        "backend[0].password: not with [backend.oauth2], which gets the token",
        "backend[0].username: required with [backend.oauth2] (the mailbox to send as)",
    ]


def test_providers_fill_in_their_token_url_and_scope():
    microsoft = config_with(
        'provider = "microsoft"\ntenant = "contoso.onmicrosoft.com"\n'
        'flow = "client_credentials"\nclient_id = "c"\nclient_secret_file = "/s"'
    ).backends[0]
    assert microsoft.oauth2 is not None
    assert microsoft.oauth2.token_url == (
        "https://login.microsoftonline.com/contoso.onmicrosoft.com/oauth2/v2.0/token"
    )
    assert microsoft.oauth2.scope == "https://outlook.office365.com/.default"
    delegated = config_with(
        'provider = "microsoft"\ntenant = "organizations"\nflow = "refresh_token"\n'
        'client_id = "c"\nrefresh_token_file = "/t"'
    ).backends[0]
    assert delegated.oauth2 is not None
    assert delegated.oauth2.scope == "https://outlook.office.com/SMTP.Send offline_access"
    assert delegated.oauth2.device_code_url == (
        "https://login.microsoftonline.com/organizations/oauth2/v2.0/devicecode"
    )
    google = config_with(
        'provider = "google"\nflow = "refresh_token"\nclient_id = "c"\n'
        'client_secret_file = "/s"\nrefresh_token_file = "/t"',
        backend='username = "u@gmail.test"\nauth = "oauthbearer"',
    ).backends[0]
    assert google.oauth2 is not None
    assert google.oauth2.token_url == "https://oauth2.googleapis.com/token"
    assert google.oauth2.scope == "https://mail.google.com/"


def test_check_prints_the_key_path_and_exits_1(tmp_path):
    path = tmp_path / "bad.toml"
    path.write_text(
        '[[backend]]\nhost = "smtp.office365.com"\nusername = "u@x.test"\nauth = "xoauth2"\n'
        '[backend.oauth2]\nprovider = "microsoft"\ntenant = "contoso.test"\n'
        'flow = "client_credentials"\nclient_secret_file = "/s"\n'
    )
    done = subprocess.run(
        [sys.executable, "-m", "smarthost", "-c", str(path), "check"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 1
    assert 'backend[0].oauth2.client_id: required for flow "client_credentials"' in done.stderr


# -- SASL ------------------------------------------------------------------------------


def test_sasl_initial_responses():
    assert oauth2.sasl_response("XOAUTH2", "u@x.test", "tok", "smtp.test", 587) == (
        "user=u@x.test\x01auth=Bearer tok\x01\x01"
    )
    # RFC 7628 §3.1: GS2 header (a "," or "=" in the authzid escaped), host, port.
    assert oauth2.sasl_response("OAUTHBEARER", "a,b=c@x.test", "tok", "smtp.test", 587) == (
        "n,a=a=2Cb=3Dc@x.test,\x01host=smtp.test\x01port=587\x01auth=Bearer tok\x01\x01"
    )


# -- delivery with tokens ------------------------------------------------------------


@pytest.mark.parametrize("auth", ["xoauth2", "oauthbearer"])
def test_first_token_then_reused_within_its_lifetime(
    tmp_path, relay_factory, events, endpoint, upstream, auth
):
    relay = start_relay(tmp_path, relay_factory, upstream, endpoint, auth=auth)
    first = relay.send("a@client.test", ["b@dest.test"], BODY)
    wait_until(lambda: events.events("delivered", queue_id=first), what="first delivery")
    new_sessions(relay)
    second = relay.send("a@client.test", ["c@dest.test"], BODY)
    wait_until(lambda: events.events("delivered", queue_id=second), what="second delivery")
    assert len(endpoint.token_requests()) == 1  # the second login reused the token
    request = endpoint.token_requests()[0]
    assert request["grant_type"] == "client_credentials"
    assert request["client_secret"] == CLIENT_SECRET
    assert request["scope"] == "https://outlook.office365.com/.default"
    logins = upstream.handler.logins
    assert [login["mechanism"] for login in logins] == [auth.upper()] * 2
    assert all(login["accepted"] and login["user"] == USER for login in logins)
    assert logins[0]["token"] == logins[1]["token"] == endpoint.access_tokens()[0]
    if auth == "oauthbearer":
        assert logins[0]["gs2"] == f"n,a={USER},"
        assert logins[0]["host"] == "127.0.0.1" and logins[0]["port"] == str(upstream.port)
    assert len(events.events("oauth2_renewed", backend="sink")) == 1
    assert not leaked(events.records, CLIENT_SECRET, logins[0]["token"])


def test_a_reload_keeps_the_cached_token(tmp_path, relay_factory, events, endpoint, upstream):
    relay = start_relay(tmp_path, relay_factory, upstream, endpoint)
    first = relay.send("a@client.test", ["b@dest.test"], BODY)
    wait_until(lambda: events.events("delivered", queue_id=first), what="first delivery")
    relay.relay.reload(load_config(tmp_path / "smarthost.toml"))  # as SIGHUP does
    second = relay.send("a@client.test", ["c@dest.test"], BODY)
    wait_until(lambda: events.events("delivered", queue_id=second), what="second delivery")
    assert len(upstream.handler.logins) == 2  # a new session after the reload ...
    assert len(endpoint.token_requests()) == 1  # ... with the token it had


def test_a_token_is_renewed_when_it_expires(tmp_path, relay_factory, events, endpoint, upstream):
    endpoint.lifetime = 1.5  # renewed a tenth of its lifetime early: after 1.35 s
    relay = start_relay(tmp_path, relay_factory, upstream, endpoint)
    first = relay.send("a@client.test", ["b@dest.test"], BODY)
    wait_until(lambda: events.events("delivered", queue_id=first), what="first delivery")
    token = upstream.handler.logins[0]["token"]
    wait_until(lambda: not endpoint.valid(token), what="the first token to expire")
    new_sessions(relay)
    second = relay.send("a@client.test", ["c@dest.test"], BODY)
    wait_until(lambda: events.events("delivered", queue_id=second), what="second delivery")
    assert len(endpoint.token_requests()) == 2
    logins = upstream.handler.logins
    assert [login["accepted"] for login in logins] == [True, True]  # never a stale token
    assert logins[1]["token"] != token


@pytest.mark.parametrize("auth", ["xoauth2", "oauthbearer"])
def test_a_535_for_a_cached_token_renews_it_once_and_retries(
    tmp_path, relay_factory, events, endpoint, upstream, auth
):
    relay = start_relay(tmp_path, relay_factory, upstream, endpoint, auth=auth)
    first = relay.send("a@client.test", ["b@dest.test"], BODY)
    wait_until(lambda: events.events("delivered", queue_id=first), what="first delivery")
    endpoint.revoke_access_tokens()  # valid by its lifetime, refused by the upstream
    new_sessions(relay)
    second = relay.send("a@client.test", ["c@dest.test"], BODY)
    wait_until(lambda: events.events("delivered", queue_id=second), what="second delivery")
    logins = upstream.handler.logins
    assert [login["accepted"] for login in logins] == [True, False, True]
    # The error challenge got the mechanism's answer: nothing (XOAUTH2), %x01 (RFC 7628).
    assert logins[1]["error_reply"] == (b"\x01" if auth == "oauthbearer" else b"")
    assert len(endpoint.token_requests()) == 2
    assert not events.events("deferred", queue_id=second)
    assert not events.events("backend_down")


def test_a_fresh_token_the_upstream_refuses_is_not_renewed_and_says_what_to_check(
    tmp_path, relay_factory, events, endpoint, upstream
):
    backend = oauth2_backend(tmp_path, endpoint).replace(USER, "nobody@contoso.test")
    path = add_to_backend(write_config(tmp_path, upstream.port), backend)
    # Down for an hour once refused: no probe logs in again while this test looks.
    path.write_text(path.read_text().replace('fail_timeout = "1s"', 'fail_timeout = "1h"'))
    relay = relay_factory(load_config(path))
    queue_id = relay.send("a@client.test", ["b@dest.test"], BODY)
    deferred = wait_until(lambda: events.events("deferred", queue_id=queue_id), what="defer")
    reply = deferred[0]["backend_errors"][0]
    assert "535 5.7.8" in reply and "Add-MailboxPermission" in reply
    assert [login["accepted"] for login in upstream.handler.logins] == [False]
    assert len(endpoint.token_requests()) == 1  # a token just issued is not renewed
    assert not events.events("failed", queue_id=queue_id)


def test_a_refused_client_marks_the_backend_down_keeps_the_mail_and_recovers(
    tmp_path, relay_factory, events, endpoint, upstream
):
    wrong = "wrong-secret-value"
    relay = start_relay(tmp_path, relay_factory, upstream, endpoint, secret=wrong)
    queue_id = relay.send("a@client.test", ["b@dest.test"], BODY)
    failed = wait_until(lambda: events.events("oauth2_failed"), what="oauth2_failed")[0]
    assert failed["backend"] == "sink" and failed["error"] == "invalid_client"
    assert "AADSTS7000215" in failed["description"]
    assert "client_secret_file" in failed["hint"]
    down = wait_until(lambda: events.events("backend_down", backend="sink"), what="down")
    assert "invalid_client" in down[0]["reply"]
    deferred = wait_until(lambda: events.events("deferred", queue_id=queue_id), what="defer")
    assert "invalid_client" in deferred[0]["backend_errors"][0]
    assert upstream.handler.logins == []  # no token, no AUTH
    files = spool_files(tmp_path / "spool")
    assert any(name.startswith(queue_id) for name in files["queue"] + files["active"]), files
    # Fixed: the probe after fail_timeout gets a token and the waiting mail goes.
    (tmp_path / "client.secret").write_text(CLIENT_SECRET + "\n")
    wait_until(lambda: events.events("delivered", queue_id=queue_id), 15, "delivery after fix")
    assert events.events("backend_up", backend="sink")
    assert not events.events("failed", queue_id=queue_id)
    assert not events.events("dsn_queued")
    assert not leaked(events.records, wrong, CLIENT_SECRET, *endpoint.access_tokens())


def test_a_refused_refresh_token_says_to_authorize_again_and_recovers(
    tmp_path, relay_factory, events, endpoint, upstream
):
    endpoint.rotate = True
    relay = start_relay(
        tmp_path, relay_factory, upstream, endpoint, flow="refresh_token", refresh_token="rt-old"
    )
    queue_id = relay.send("a@client.test", ["b@dest.test"], BODY)
    failed = wait_until(lambda: events.events("oauth2_failed"), what="oauth2_failed")[0]
    assert failed["error"] == "invalid_grant"
    assert "smarthost oauth2 authorize sink" in failed["hint"]
    wait_until(lambda: events.events("deferred", queue_id=queue_id), what="defer")
    assert events.events("backend_down", backend="sink")
    good = endpoint.new_refresh_token()
    (tmp_path / "refresh.token").write_text(good + "\n")
    wait_until(lambda: events.events("delivered", queue_id=queue_id), 15, "delivery after fix")
    assert not events.events("failed", queue_id=queue_id) and not events.events("dsn_queued")
    assert not leaked(events.records, good, "rt-old", CLIENT_SECRET, *endpoint.access_tokens())


def test_a_rotated_refresh_token_replaces_its_file_before_it_is_used(
    tmp_path, relay_factory, events, endpoint, upstream
):
    endpoint.rotate, endpoint.lifetime = True, 1.0
    first_token = endpoint.new_refresh_token()
    relay = start_relay(
        tmp_path, relay_factory, upstream, endpoint, flow="refresh_token", refresh_token=first_token
    )
    token_file = tmp_path / "refresh.token"
    for n in range(2):
        queue_id = relay.send("a@client.test", [f"r{n}@dest.test"], BODY)
        wait_until(lambda: events.events("delivered", queue_id=queue_id), what="delivery")  # noqa: B023
        token = upstream.handler.logins[-1]["token"]
        wait_until(lambda: not endpoint.valid(token), what="the token to expire")  # noqa: B023
        new_sessions(relay)
    assert [old for old, _ in endpoint.rotations] == [
        first_token,
        endpoint.rotations[0][1],
    ]
    assert token_file.read_text() == endpoint.rotations[-1][1] + "\n"
    assert oct(token_file.stat().st_mode & 0o777) == "0o600"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".refresh.token.")]
    assert events.events("oauth2_renewed", refresh_token_rotated=True)


def test_a_token_endpoint_that_cannot_be_reached_defers_without_a_secret_in_sight(
    tmp_path, relay_factory, events, endpoint, upstream
):
    endpoint.stop()  # its port now refuses connections
    relay = start_relay(tmp_path, relay_factory, upstream, endpoint)
    queue_id = relay.send("a@client.test", ["b@dest.test"], BODY)
    failed = wait_until(lambda: events.events("oauth2_failed"), what="oauth2_failed")[0]
    assert failed["error"] == "unreachable"
    deferred = wait_until(lambda: events.events("deferred", queue_id=queue_id), what="defer")
    assert "unreachable" in deferred[0]["backend_errors"][0]
    assert not events.events("failed", queue_id=queue_id)


def test_a_rotated_refresh_token_its_file_cannot_take_is_kept_and_saved_later(
    tmp_path, events, endpoint, monkeypatch
):
    endpoint.rotate = True
    first = endpoint.new_refresh_token()
    backend = oauth2_backend(tmp_path, endpoint, flow="refresh_token", refresh_token=first)
    config = load_config(add_to_backend(write_config(tmp_path, 2525), backend))
    source = oauth2.source_for(config.backends[0])
    token_file = tmp_path / "refresh.token"

    def disk_full(path: str, secret: str) -> None:  # tests run as root: no EACCES
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(oauth2, "write_secret_file", disk_full)
    with pytest.raises(oauth2.TokenError) as caught:
        source.get()
    assert caught.value.error == "unwritable_refresh_token_file"
    assert events.events("oauth2_failed", error="unwritable_refresh_token_file")
    assert token_file.read_text() == first + "\n"  # the old file is whole
    monkeypatch.undo()
    ((_, rotated),) = endpoint.rotations
    source.get()  # uses the token kept in memory, and saves the one it gets
    assert endpoint.rotations[1][0] == rotated
    assert token_file.read_text() == endpoint.rotations[1][1] + "\n"


def test_an_idle_refresh_token_is_used_before_the_provider_voids_it(
    tmp_path, events, endpoint, upstream
):
    token = endpoint.new_refresh_token()
    backend = oauth2_backend(tmp_path, endpoint, flow="refresh_token", refresh_token=token)
    config = load_config(add_to_backend(write_config(tmp_path, upstream.port), backend))
    keeper = oauth2.RefreshTokenKeeper(config)
    token_file = tmp_path / "refresh.token"
    assert keeper.check(time.time()) == []  # just written: used recently enough
    assert endpoint.token_requests() == []
    unused_since = time.time() - 8 * 86400
    os.utime(token_file, (unused_since, unused_since))
    keeper.start()  # its thread looks at once, then every hour
    try:
        wait_until(endpoint.token_requests, what="the idle refresh token to be used")
    finally:
        keeper.stop()
    assert [r["refresh_token"] for r in endpoint.token_requests()] == [token]
    assert token_file.stat().st_mtime > unused_since + 86400  # marked as used
    assert keeper.check(time.time()) == []
    assert events.events("oauth2_renewed", backend="sink")


# -- check --connect --------------------------------------------------------------------


def check_connect(path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "smarthost", "-c", str(path), "check", "--connect"],
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_check_connect_shows_the_token_step_and_no_secret(tmp_path, endpoint, upstream):
    path = add_to_backend(write_config(tmp_path, upstream.port), oauth2_backend(tmp_path, endpoint))
    done = check_connect(path)
    assert done.returncode == 0, done.stdout + done.stderr
    report = done.stdout.split("backend[0]", 1)[1]
    assert f"oauth2   client_credentials token from {endpoint.url}/token: new" in report
    assert f"XOAUTH2 as {USER}: accepted" in report
    output = done.stdout + done.stderr
    assert CLIENT_SECRET not in output
    assert endpoint.access_tokens() and not [t for t in endpoint.access_tokens() if t in output]


def test_check_summary_and_warnings_name_the_oauth2_files_never_their_content(
    tmp_path, endpoint, upstream
):
    backend = oauth2_backend(tmp_path, endpoint, flow="refresh_token", refresh_token="rt-x")
    path = add_to_backend(write_config(tmp_path, upstream.port), backend)
    (tmp_path / "client.secret").chmod(0o644)
    done = subprocess.run(
        [sys.executable, "-m", "smarthost", "-c", str(path), "check"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    assert f"oauth2=refresh_token client_id={CLIENT_ID} token_url={endpoint.url}/token" in (
        done.stdout
    )
    assert "backend[0].oauth2.client_secret_file" in done.stderr
    assert "readable by other users" in done.stderr
    assert CLIENT_SECRET not in done.stdout + done.stderr and "rt-x" not in done.stdout


def test_check_connect_before_authorize_says_to_authorize(tmp_path, endpoint, upstream):
    backend = oauth2_backend(tmp_path, endpoint, flow="refresh_token")
    done = check_connect(add_to_backend(write_config(tmp_path, upstream.port), backend))
    assert done.returncode == 1
    assert "not_authorized" in done.stdout
    assert "run `smarthost oauth2 authorize sink`" in done.stdout


def test_check_connect_says_what_to_fix_when_the_client_is_refused(tmp_path, endpoint, upstream):
    backend = oauth2_backend(tmp_path, endpoint, secret="not-the-secret")
    path = add_to_backend(write_config(tmp_path, upstream.port), backend)
    done = check_connect(path)
    assert done.returncode == 1
    failed = [line for line in done.stdout.splitlines() if "FAILED" in line]
    assert failed and "invalid_client" in failed[0] and "client_secret_file" in failed[0]
    assert "not-the-secret" not in done.stdout + done.stderr


# -- oauth2 authorize ---------------------------------------------------------------------


def authorize(path, backend: str = "sink") -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "smarthost", "-c", str(path), "oauth2", "authorize", backend],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def test_authorize_by_device_code_writes_the_refresh_token(tmp_path, endpoint, upstream):
    endpoint.pending = 2  # the administrator is still signing in, twice
    backend = oauth2_backend(tmp_path, endpoint, flow="refresh_token")
    path = add_to_backend(write_config(tmp_path, upstream.port), backend)
    proc = authorize(path)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, out + err
    assert "https://microsoft.com/devicelogin" in out and "ABCD-EFGH" in out
    token_file = tmp_path / "refresh.token"
    written = token_file.read_text().strip()
    assert written in endpoint.refresh_tokens
    assert oct(token_file.stat().st_mode & 0o777) == "0o600"
    assert "check --connect" in out
    polls = [r for r in endpoint.token_requests() if r["grant_type"].endswith("device_code")]
    assert len(polls) == 3 and polls[0]["device_code"] == "dev-code-1"
    device = [r for r in endpoint.requests if r["_path"] == "/devicecode"]
    assert device[0]["client_id"] == CLIENT_ID and device[0]["scope"]
    assert written not in out + err


def test_authorize_refuses_a_backend_without_a_refresh_token_flow(tmp_path, endpoint, upstream):
    path = add_to_backend(write_config(tmp_path, upstream.port), oauth2_backend(tmp_path, endpoint))
    proc = authorize(path)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 1
    assert "client_credentials needs no sign-in" in err
    proc = authorize(path, "nosuch")
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 1 and "no backend named 'nosuch'" in err


def test_authorize_asks_for_the_token_directory_before_the_sign_in(tmp_path, endpoint, upstream):
    backend = oauth2_backend(tmp_path, endpoint, flow="refresh_token").replace(
        str(tmp_path / "refresh.token"), str(tmp_path / "state" / "refresh.token")
    )
    proc = authorize(add_to_backend(write_config(tmp_path, upstream.port), backend))
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 1
    assert f"install -d -m 0700 {tmp_path / 'state'}" in err
    assert endpoint.requests == []  # nobody was asked to sign in for nothing


def google_config(tmp_path, endpoint, upstream):
    backend = oauth2_backend(tmp_path, endpoint, flow="refresh_token").replace(
        f'device_code_url = "{endpoint.url}/devicecode"',
        f'authorize_url = "{endpoint.url}/auth"',
    )
    return add_to_backend(write_config(tmp_path, upstream.port), backend)


def read_authorize_url(proc) -> dict[str, str]:
    """The query of the sign-in URL the command prints."""
    while True:
        line = proc.stdout.readline()
        assert line, proc.stderr.read()
        if "/auth?" in line:
            return dict(urllib.parse.parse_qsl(urllib.parse.urlsplit(line.strip()).query))


@pytest.mark.parametrize("answer", ["pasted", "loopback"])
def test_authorize_installed_app_flow(tmp_path, endpoint, upstream, answer):
    proc = authorize(google_config(tmp_path, endpoint, upstream))
    try:
        query = read_authorize_url(proc)
        assert query["response_type"] == "code" and query["code_challenge_method"] == "S256"
        assert query["access_type"] == "offline" and query["client_id"] == CLIENT_ID
        redirect = f"{query['redirect_uri']}?state={query['state']}&code={endpoint.code}&scope=x"
        if answer == "pasted":  # the browser's page did not load: its address, pasted
            proc.stdin.write(redirect + "\n")
            proc.stdin.flush()
        else:
            with urllib.request.urlopen(redirect, timeout=10) as page:
                assert b"done" in page.read()
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, out + err
    exchange = [r for r in endpoint.token_requests() if r["grant_type"] == "authorization_code"]
    assert exchange[0]["redirect_uri"] == query["redirect_uri"]
    assert s256(exchange[0]["code_verifier"]) == query["code_challenge"]  # PKCE
    assert exchange[0]["client_secret"] == CLIENT_SECRET
    assert (tmp_path / "refresh.token").read_text().strip() in endpoint.refresh_tokens


def test_authorize_refuses_an_answer_with_another_state(tmp_path, endpoint, upstream):
    proc = authorize(google_config(tmp_path, endpoint, upstream))
    query = read_authorize_url(proc)
    _, err = proc.communicate(
        f"{query['redirect_uri']}?state=forged&code={endpoint.code}\n", timeout=60
    )
    assert proc.returncode == 1 and "state differs" in err
    assert not (tmp_path / "refresh.token").exists()
    assert not [r for r in endpoint.token_requests() if r["grant_type"] == "authorization_code"]


# -- the token file ---------------------------------------------------------------------


def test_write_secret_file_replaces_atomically_with_mode_0600(tmp_path):
    path = tmp_path / "token"
    path.write_text("old\n")
    path.chmod(0o644)
    oauth2.write_secret_file(str(path), "new")
    assert path.read_text() == "new\n"
    assert oct(path.stat().st_mode & 0o777) == "0o600"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["token"]


def test_a_provider_message_that_repeats_a_secret_is_masked():
    fields = {"client_secret": "abc123secret"}
    cleaned = oauth2._clean("bad secret\nabc123secret given", fields)
    assert cleaned == "bad secret *** given"
    # Cut to 300 characters after masking: not half a secret at the cut either.
    assert "abc123" not in oauth2._clean("x" * 295 + "abc123secret", fields)
