"""OAuth 2.0 to upstreams (SPEC §11): the relay gets, caches and renews its own tokens.

A `TokenSource` per backend with `[backend.oauth2]` asks the provider's token
endpoint for an access token (client credentials, or a refresh token read from its
file), keeps it in memory and renews it before it expires. A refresh token the
provider rotates replaces its file atomically and durably before the new access token
is used: a crash right after a rotation leaves the new one on disk. A refused client
or grant is logged as `oauth2_failed` with the provider's error code (never a secret
or a token) and reported to the sender, which marks the backend down.

`authorize` is `smarthost oauth2 authorize BACKEND`: the administrator's one-time
sign-in that writes the first refresh token, by the device-code flow (RFC 8628,
Microsoft) or the installed-app flow with PKCE (RFC 8252/7636, Google).

HTTP goes through the standard library's urllib: certificates verified, a timeout on
every request, a proxy from the environment (never for a loopback endpoint).
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import json
import logging
import os
import secrets
import selectors
import smtplib
import ssl
import tempfile
import threading
import time
import urllib.error
import urllib.parse
from collections.abc import Callable
from typing import IO, TYPE_CHECKING, Any

from . import log
from .config import BackendConfig, Config, OAuth2Config, is_loopback
from .spool import fsync_dir

if TYPE_CHECKING:
    import urllib.request

REQUEST_TIMEOUT = 30.0
MAX_RESPONSE = 1 << 20  # a token response is a few KiB; more is not a token endpoint
RENEW_MARGIN = 300.0  # renew this long before expiry (or a tenth of a short lifetime)
DEFAULT_LIFETIME = 3600  # a response without expires_in
DEVICE_GRANT = "urn:ietf:params:oauth:grant-type:device_code"
# A refresh token not used for this long is used anyway (Microsoft voids one unused
# for 90 days, Google one unused for six months), checked this often.
KEEPALIVE_AFTER = 7 * 86400.0
KEEPALIVE_CHECK = 3600.0

# Errors (RFC 6749 §5.2) that say the relay's credentials are refused: retrying the
# same request cannot help until an administrator fixes them.
REFUSED = frozenset(
    {"invalid_client", "invalid_grant", "unauthorized_client", "invalid_scope", "invalid_request"}
)


class TokenError(Exception):
    """No token: `error` is the provider's error code (or what broke the request),
    `description` its explanation, never a secret."""

    def __init__(self, error: str, description: str = "") -> None:
        super().__init__(f"{error}: {description}" if description else error)
        self.error = error
        self.description = description

    @property
    def refused(self) -> bool:
        """The provider refused the credentials (not a network or server failure)."""
        return self.error in REFUSED


# -------------------------------------------------------------------------- HTTP


def post_form(url: str, fields: dict[str, str], timeout: float = REQUEST_TIMEOUT) -> dict:
    """POST `fields` form-encoded to `url`; the JSON object answered, or TokenError
    with the provider's error code. Secrets in `fields` never reach the error."""
    # Imported here: only a relay with a [backend.oauth2] pays for the HTTP client.
    import http.client
    import urllib.request

    data = urllib.parse.urlencode(fields).encode("ascii")
    request = urllib.request.Request(
        url,
        data=data,
        headers={
            "Accept": "application/json",
            "Content-Type": "application/x-www-form-urlencoded",
        },
    )
    try:
        with _opener(url).open(request, timeout=timeout) as response:
            body = response.read(MAX_RESPONSE)
    except urllib.error.HTTPError as exc:
        with exc:
            document = _json(exc.read(MAX_RESPONSE))
        error = document.get("error")
        if isinstance(error, str) and error:
            raise TokenError(error, _clean(document.get("error_description"), fields)) from None
        if exc.code == 401:
            raise TokenError("invalid_client", f"HTTP 401 {exc.reason}") from None
        raise TokenError(f"http_{exc.code}", _clean(exc.reason, fields)) from None
    except (urllib.error.URLError, OSError, http.client.HTTPException, ValueError) as exc:
        reason = getattr(exc, "reason", None) or exc
        raise TokenError("unreachable", _clean(f"{url}: {reason}", fields)) from None
    document = _json(body)
    if not document:
        raise TokenError("bad_response", f"{url} did not answer a JSON object")
    return document


def _opener(url: str) -> urllib.request.OpenerDirector:
    """Verified TLS; the environment's proxy, except for a loopback endpoint."""
    import urllib.request

    https = urllib.request.HTTPSHandler(context=ssl.create_default_context())
    host = urllib.parse.urlsplit(url).hostname or ""
    if is_loopback(host):
        return urllib.request.build_opener(https, urllib.request.ProxyHandler({}))
    return urllib.request.build_opener(https)


def _json(body: bytes) -> dict:
    try:
        document = json.loads(body.decode("utf-8", "replace"))
    except ValueError:
        return {}
    return document if isinstance(document, dict) else {}


def _clean(text: Any, fields: dict[str, str]) -> str:
    """A provider's or library's words, on one line, short, with no secret we sent."""
    line = str(text or "")
    for name in ("client_secret", "refresh_token", "code", "device_code", "code_verifier"):
        value = fields.get(name)
        if value:
            line = line.replace(value, "***")
    return " ".join(line.split())[:300]  # cut after masking: never half a secret


# -------------------------------------------------------------------------- secrets on disk


def read_first_line(path: str) -> str:
    """A secret file's first line (as `password_file`)."""
    with open(path, encoding="utf-8") as f:
        return f.readline().strip()


def write_secret_file(path: str, secret: str) -> None:
    """Replace `path` by a file holding `secret`, mode 0600, atomically and durably:
    a temporary file in the same directory, written and fsynced, renamed over it, the
    directory fsynced. A crash at any point leaves the old or the new file whole."""
    directory = os.path.dirname(os.path.abspath(path))
    fd, temporary = tempfile.mkstemp(dir=directory, prefix=f".{os.path.basename(path)}.")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:  # mkstemp: mode 0600
            f.write(secret + "\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(temporary, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(temporary)
        raise
    fsync_dir(directory)


# -------------------------------------------------------------------------- the relay's tokens


class TokenSource:
    """The access token of one backend: fetched when first needed, kept in memory,
    renewed before it expires; one renewal at a time (the other senders wait for it)."""

    def __init__(self, backend: BackendConfig) -> None:
        assert backend.oauth2 is not None
        self.backend = backend.name
        self.config: OAuth2Config = backend.oauth2
        self._lock = threading.Lock()
        self._token: str | None = None
        self._renew_at = 0.0  # time.monotonic() after which the token is renewed
        self.expires_in = 0.0  # the lifetime the provider gave the current token
        self._unsaved: str | None = None  # a rotated refresh token its file could not take

    def get(self) -> tuple[str, bool]:
        """(the access token, whether it was fetched just now)."""
        with self._lock:
            if self._token is not None and time.monotonic() < self._renew_at:
                return self._token, False
            return self._renew(), True

    def renew_now(self) -> str:
        """A new token now, whatever the cache holds (the refresh token gets used)."""
        with self._lock:
            return self._renew()

    def renew(self, refused: str) -> str:
        """A new token in place of `refused`, which the upstream did not take (unless
        another sender has renewed it meanwhile)."""
        with self._lock:
            token = self._token
            if token is not None and token != refused and time.monotonic() < self._renew_at:
                return token
            self._token = None
            return self._renew()

    def _renew(self) -> str:
        try:
            fields = self._request()
            document = post_form(self.config.token_url, fields)
            token = document.get("access_token")
            if not isinstance(token, str) or not token:
                raise TokenError("bad_response", "no access_token in the answer")
            rotated = self._keep_rotated_refresh_token(document, fields)
        except TokenError as exc:
            self._token = None
            log.event(
                "oauth2_failed",
                level=logging.WARNING,
                backend=self.backend,
                error=exc.error,
                description=exc.description or None,
                token_url=self.config.token_url,
                flow=self.config.flow,
                hint=hint(exc, self.config, self.backend),
            )
            raise
        if not rotated and self.config.refresh_token_file:
            # The file's mtime says when its token was last used (see RefreshTokenKeeper).
            with contextlib.suppress(OSError):
                os.utime(self.config.refresh_token_file)
        lifetime = _seconds(document.get("expires_in"), DEFAULT_LIFETIME)
        self._token, self.expires_in = token, lifetime
        self._renew_at = time.monotonic() + lifetime - min(RENEW_MARGIN, lifetime / 10)
        log.event(
            "oauth2_renewed",
            backend=self.backend,
            flow=self.config.flow,
            expires_in=lifetime,
            refresh_token_rotated=rotated or None,
        )
        return token

    def _request(self) -> dict[str, str]:
        """The token request's form fields; secrets read fresh from their files, so a
        fixed file is used at the next try without a reload."""
        config = self.config
        fields = {"client_id": config.client_id}
        try:
            if config.client_secret_file:
                fields["client_secret"] = read_first_line(config.client_secret_file)
            if config.flow == "refresh_token":
                assert config.refresh_token_file is not None
                fields["grant_type"] = "refresh_token"
                fields["refresh_token"] = self._unsaved or read_first_line(
                    config.refresh_token_file
                )
            else:
                fields["grant_type"] = "client_credentials"
        except FileNotFoundError as exc:
            error = "not_authorized" if exc.filename == config.refresh_token_file else None
            raise TokenError(
                error or "unreadable_secret", f"{exc.filename}: no such file"
            ) from None
        except OSError as exc:
            raise TokenError(
                "unreadable_secret", f"{exc.filename}: {exc.strerror or exc}"
            ) from None
        if config.scope:
            fields["scope"] = config.scope
        return fields

    def _keep_rotated_refresh_token(self, document: dict, fields: dict[str, str]) -> bool:
        """A new refresh token replaces its file before its access token is used: the
        old one may already be void at the provider. One that cannot be written is
        kept in memory for the next renewal (which writes it, or a newer one) and is
        the backend's failure until then."""
        path = self.config.refresh_token_file
        new = document.get("refresh_token")
        candidate = new if isinstance(new, str) and new else self._unsaved
        if not path or candidate is None:
            return False
        if candidate == fields.get("refresh_token") and self._unsaved is None:
            return False
        self._unsaved = candidate
        try:
            write_secret_file(path, candidate)
        except OSError as exc:
            raise TokenError(
                "unwritable_refresh_token_file", f"{path}: {exc.strerror or exc}"
            ) from None
        self._unsaved = None
        return True


class RefreshTokenKeeper:
    """Uses each refresh token at least every KEEPALIVE_AFTER, even when no mail goes
    out for months: a relay that is idle must not find its token void on the day it
    has something to send. The token file's mtime is when it was last used."""

    def __init__(self, config: Config) -> None:
        self.backends: list[BackendConfig] = []
        self._running = False
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None
        self.use(config)

    def use(self, config: Config) -> None:
        """A (re)loaded config: the backends whose refresh tokens to keep alive."""
        self.backends = [
            b for b in config.backends if b.oauth2 is not None and b.oauth2.refresh_token_file
        ]
        self._start_thread()

    def start(self) -> None:
        self._running = True
        self._start_thread()

    def _start_thread(self) -> None:
        # A thread only once there is a refresh token to keep.
        if self._running and self.backends and self._thread is None:
            self._thread = threading.Thread(target=self._run, name="oauth2-keeper", daemon=True)
            self._thread.start()

    def stop(self, grace: float | None = None) -> None:
        """Stop; wait up to `grace` seconds (None: as long as it takes) for a renewal
        in flight, which saves a rotated refresh token before it ends."""
        self._stopping.set()
        if self._thread is not None:
            self._thread.join(grace)

    def _run(self) -> None:
        while True:
            self.check(time.time())
            if self._stopping.wait(KEEPALIVE_CHECK):
                return

    def check(self, now: float) -> list[str]:
        """Renew through every refresh token unused for KEEPALIVE_AFTER; the names of
        the backends it renewed for (a failure is logged as `oauth2_failed`)."""
        renewed = []
        for backend in list(self.backends):
            assert backend.oauth2 is not None and backend.oauth2.refresh_token_file
            try:
                age = now - os.stat(backend.oauth2.refresh_token_file).st_mtime
            except OSError:
                continue  # not authorized yet: `check --connect` and deliveries say so
            if age < KEEPALIVE_AFTER or self._stopping.is_set():
                continue
            with contextlib.suppress(TokenError):
                source_for(backend).renew_now()
                renewed.append(backend.name)
        return renewed


def _seconds(value: Any, default: float, minimum: float = 1.0) -> float:
    """A number of seconds a provider gave (maybe as a string), else `default`."""
    try:
        seconds = float(value)
    except (TypeError, ValueError):
        return default
    return seconds if minimum <= seconds < 10**9 else default


def hint(exc: TokenError, config: OAuth2Config, backend: str) -> str | None:
    """What the administrator should fix for this token error."""
    if exc.error == "invalid_grant" and config.flow == "refresh_token":
        return (
            f"the refresh token is expired or revoked: run `smarthost oauth2 authorize {backend}`"
        )
    if exc.error == "not_authorized":
        return f"no refresh token yet: run `smarthost oauth2 authorize {backend}`"
    return {
        "invalid_client": "the client ID or secret is wrong or expired:"
        " check client_id and client_secret_file",
        "invalid_grant": "the grant was refused: check tenant and the app's permissions",
        "unauthorized_client": "the app registration may not use this flow",
        "invalid_scope": "the scope is not granted to the app: check scope and its API permissions",
        "unreachable": "the token endpoint cannot be reached: check the network and any proxy",
        "unreadable_secret": "the secret file cannot be read by the relay",
        "unwritable_refresh_token_file": "the relay must be able to write the refresh"
        " token file and its directory",
    }.get(exc.error)


_sources: dict[tuple[str, OAuth2Config], TokenSource] = {}
_sources_lock = threading.Lock()


def source_for(backend: BackendConfig) -> TokenSource:
    """The backend's token source, kept across config reloads that leave its table as
    it was (so a reload does not throw a valid token away)."""
    assert backend.oauth2 is not None
    key = (backend.name, backend.oauth2)
    with _sources_lock:
        source = _sources.get(key)
        if source is None:
            source = _sources[key] = TokenSource(backend)
        return source


def authenticate(
    backend: BackendConfig, login: Callable[[str], None], note: Callable[[str, str], None]
) -> None:
    """Run `login(access_token)`; when the upstream refuses a token from the cache
    (it may have been revoked, or the clock is off), renew it once and log in again.
    Raises TokenError when there is no token, or what `login` raised."""
    source = source_for(backend)
    token, fresh = source.get()
    oauth2 = backend.oauth2
    assert oauth2 is not None
    note(
        "oauth2",
        f"{oauth2.flow} token from {oauth2.token_url}: "
        + (f"new, valid {source.expires_in:.0f} s" if fresh else "cached"),
    )
    try:
        login(token)
    except smtplib.SMTPAuthenticationError:
        if fresh:
            raise
        note("oauth2", "the upstream refused the cached token: renewing it once")
        login(source.renew(token))


# Why an upstream refuses a token the provider issued: the account may not send.
REFUSED_TOKEN_HINT = (
    "the upstream refused a token its provider issued: check that the account may send"
    " by SMTP (Microsoft 365: New-ServicePrincipal and Add-MailboxPermission for the app,"
    " SMTP AUTH enabled for the mailbox)"
)


def sasl_response(mechanism: str, user: str, token: str, host: str, port: int) -> str:
    """The initial client response of XOAUTH2 (Google's and Microsoft's format) or
    OAUTHBEARER (RFC 7628 §3.1: a GS2 header, then host, port and the bearer token)."""
    if mechanism == "XOAUTH2":
        return f"user={user}\x01auth=Bearer {token}\x01\x01"
    authzid = user.replace("=", "=3D").replace(",", "=2C")
    return f"n,a={authzid},\x01host={host}\x01port={port}\x01auth=Bearer {token}\x01\x01"


def sasl_error_reply(mechanism: str) -> str:
    """The answer to the server's error challenge, after which it sends its failure
    reply: empty for XOAUTH2, a lone %x01 for OAUTHBEARER (RFC 7628 §3.2.3)."""
    return "\x01" if mechanism == "OAUTHBEARER" else ""


# -------------------------------------------------------------------------- oauth2 authorize


class AuthorizeError(Exception):
    """`oauth2 authorize` cannot go on; the message says why and what to do."""


def authorize(
    config: Config,
    name: str,
    stdin: IO[str],
    out: Callable[[str], None],
) -> None:
    """Sign in once for backend `name` and write its first refresh token."""
    backend = _backend_named(config, name)
    oauth2 = backend.oauth2
    assert oauth2 is not None and oauth2.refresh_token_file is not None
    directory = os.path.dirname(os.path.abspath(oauth2.refresh_token_file))
    if not os.path.isdir(directory):
        # Said before the sign-in, not after it.
        owner = f"-o {config.user} " if config.user else ""
        raise AuthorizeError(
            f"{directory} (of refresh_token_file) does not exist:"
            f" install -d {owner}-m 0700 {directory}"
        )
    client_secret = read_first_line(oauth2.client_secret_file) if oauth2.client_secret_file else ""
    if oauth2.device_code_url:
        document = _device_code_flow(oauth2, client_secret, out)
    elif oauth2.authorize_url:
        document = _installed_app_flow(oauth2, client_secret, stdin, out)
    else:
        raise AuthorizeError(
            f"backend {name!r}: set oauth2.device_code_url or oauth2.authorize_url"
            " (or a provider) to sign in"
        )
    refresh_token = document.get("refresh_token")
    if not isinstance(refresh_token, str) or not refresh_token:
        raise AuthorizeError(
            "the provider answered without a refresh token: check that the scope asks"
            " for offline access (Microsoft: offline_access)"
        )
    write_secret_file(oauth2.refresh_token_file, refresh_token)
    owner = _hand_to_service_user(config, oauth2.refresh_token_file)
    out(f"Refresh token written to {oauth2.refresh_token_file} (mode 0600{owner}).")
    out("Next:")
    out(f"  smarthost -c {config.path} check --connect   # shows the token step and AUTH")
    out(
        "A running relay reads the file at its next try (no reload needed). It renews"
        " access tokens itself and saves a rotated refresh token in the same file: it"
        " must be able to write that file and its directory."
    )


def _backend_named(config: Config, name: str) -> BackendConfig:
    for backend in config.backends:
        if backend.name == name:
            if backend.oauth2 is None or backend.oauth2.flow != "refresh_token":
                raise AuthorizeError(
                    f'backend {name!r} has no [backend.oauth2] with flow = "refresh_token";'
                    " client_credentials needs no sign-in"
                )
            return backend
    names = ", ".join(b.name for b in config.backends)
    raise AuthorizeError(f"no backend named {name!r} (backends: {names})")


def _hand_to_service_user(config: Config, path: str) -> str:
    """Run as root for a relay that runs as `user`: the file becomes that user's."""
    if not config.user or os.geteuid() != 0:
        return ""
    from . import privileges

    account = privileges.service_account(config.user)
    if account is None:
        return ""
    os.chown(path, account.pw_uid, account.pw_gid)
    return f", owned by {account.pw_name}"


def _with_secret(fields: dict[str, str], client_secret: str) -> dict[str, str]:
    return {**fields, "client_secret": client_secret} if client_secret else fields


def _device_code_flow(
    oauth2: OAuth2Config,
    client_secret: str,
    out: Callable[[str], None],
) -> dict:
    """RFC 8628: a code the administrator enters at a URL on any device; poll until done."""
    assert oauth2.device_code_url is not None
    grant = post_form(
        oauth2.device_code_url, {"client_id": oauth2.client_id, "scope": oauth2.scope}
    )
    device_code = grant.get("device_code")
    uri = grant.get("verification_uri") or grant.get("verification_url")
    user_code = grant.get("user_code")
    if not (isinstance(device_code, str) and uri and user_code):
        raise AuthorizeError("the device-code endpoint answered without a code and a URL")
    out(f"To sign in, open {uri} on any device and enter the code {user_code}")
    out("(sign in as the mailbox this backend sends as). Waiting...")
    interval = _seconds(grant.get("interval"), 5.0, minimum=0.0)
    deadline = time.monotonic() + _seconds(grant.get("expires_in"), 900.0)
    fields = _with_secret(
        {"grant_type": DEVICE_GRANT, "device_code": device_code, "client_id": oauth2.client_id},
        client_secret,
    )
    while time.monotonic() < deadline:
        time.sleep(interval)  # RFC 8628 §3.5: no faster than the server asks
        try:
            return post_form(oauth2.token_url, fields)
        except TokenError as exc:
            if exc.error == "authorization_pending":
                continue
            if exc.error == "slow_down":
                interval += 5
                continue
            raise AuthorizeError(f"sign-in failed: {exc}") from None
    raise AuthorizeError("the code expired before the sign-in was done: run the command again")


def _installed_app_flow(
    oauth2: OAuth2Config, client_secret: str, stdin: IO[str], out: Callable[[str], None]
) -> dict:
    """The installed-app flow (RFC 8252) with PKCE: the browser is sent back to a
    loopback port; on a headless server that page does not load, and its address,
    pasted here, carries the code just as well."""
    assert oauth2.authorize_url is not None
    verifier = secrets.token_urlsafe(64)
    challenge = base64.urlsafe_b64encode(hashlib.sha256(verifier.encode()).digest())
    state = secrets.token_urlsafe(16)
    with _RedirectCatcher() as catcher:
        redirect_uri = f"http://127.0.0.1:{catcher.port}/"
        query = {
            "client_id": oauth2.client_id,
            "redirect_uri": redirect_uri,
            "response_type": "code",
            "scope": oauth2.scope,
            "state": state,
            "code_challenge": challenge.decode().rstrip("="),
            "code_challenge_method": "S256",
            "access_type": "offline",  # Google: give a refresh token
            "prompt": "consent",  # Google: ... also to an account that consented before
        }
        separator = "&" if "?" in oauth2.authorize_url else "?"
        out("Open this URL in a browser and allow access:")
        out(f"  {oauth2.authorize_url}{separator}{urllib.parse.urlencode(query)}")
        out(
            "On a server without a browser: open it on any computer; it ends on a page"
            f" that does not load ({redirect_uri}...). Paste that page's address here:"
        )
        answer = catcher.wait(stdin)
    if answer.get("state") != state:
        raise AuthorizeError("the answer does not belong to this sign-in (state differs)")
    if answer.get("error"):
        raise AuthorizeError(f"sign-in refused: {answer['error']}")
    code = answer.get("code")
    if not code:
        raise AuthorizeError("no code in the answer: paste the whole address")
    fields = {
        "grant_type": "authorization_code",
        "code": code,
        "redirect_uri": redirect_uri,
        "client_id": oauth2.client_id,
        "code_verifier": verifier,
    }
    try:
        return post_form(oauth2.token_url, _with_secret(fields, client_secret))
    except TokenError as exc:
        raise AuthorizeError(f"the code was refused: {exc}") from None


AUTHORIZE_TIMEOUT = 600.0


class _RedirectCatcher:
    """A one-shot HTTP server on a loopback port for the browser's redirect, and the
    terminal for a pasted address: whichever brings the answer first."""

    def __init__(self) -> None:
        import http.server  # `oauth2 authorize` only

        answers: list[dict[str, str]] = []

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                query = dict(urllib.parse.parse_qsl(urllib.parse.urlsplit(self.path).query))
                found = "code" in query or "error" in query
                if found:
                    answers.append(query)
                self.send_response(200 if found else 404)
                self.send_header("Content-Type", "text/plain; charset=utf-8")
                self.end_headers()
                if found:
                    self.wfile.write(b"smarthost: done, you may close this window.\n")

            def log_message(self, format: str, *args: Any) -> None:
                pass  # the query holds the code: not for the terminal

        self.answers = answers
        self.server = http.server.HTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]

    def __enter__(self) -> _RedirectCatcher:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.server.server_close()

    def wait(self, stdin: IO[str]) -> dict[str, str]:
        deadline = time.monotonic() + AUTHORIZE_TIMEOUT
        with selectors.DefaultSelector() as selector:
            selector.register(self.server.socket, selectors.EVENT_READ, "http")
            # Without a stdin to paste into: the loopback redirect only.
            with contextlib.suppress(ValueError, OSError):
                selector.register(stdin, selectors.EVENT_READ, "stdin")
            while time.monotonic() < deadline:
                for key, _ in selector.select(timeout=1.0):
                    if key.data == "http":
                        self.server.handle_request()
                        if self.answers:
                            return self.answers[0]
                        continue
                    line = stdin.readline()
                    if not line:
                        selector.unregister(stdin)
                        continue
                    query = urllib.parse.urlsplit(line.strip()).query
                    return dict(urllib.parse.parse_qsl(query))
        raise AuthorizeError("no answer within 10 minutes: run the command again")
