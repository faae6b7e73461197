"""Test doubles for OAuth 2.0 that are real servers on loopback: a token endpoint
(http.server) and an SMTP upstream (aiosmtpd) that accepts only a token the endpoint
issued and that is still valid, over XOAUTH2 and OAUTHBEARER."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import secrets
import threading
import time
import urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from aiosmtpd.controller import Controller
from aiosmtpd.smtp import AuthResult

from support.sink import SinkHandler, start_controller

CLIENT_ID = "relay-app"
CLIENT_SECRET = "s3cret-client-value"
USER = "relay@contoso.test"


class TokenEndpoint:
    """An OAuth 2.0 token endpoint (RFC 6749) with a device-code endpoint (RFC 8628).

    Grants: client_credentials, refresh_token (rotating each refresh token when
    `rotate`), the device code (answering `authorization_pending` `pending` times
    first) and authorization_code (for `code`, recording the PKCE verifier).
    """

    def __init__(self, lifetime: float = 3600, rotate: bool = False) -> None:
        self.lifetime = lifetime
        self.rotate = rotate
        self.client_secret = CLIENT_SECRET
        self.refresh_tokens: set[str] = set()
        self.issued: dict[str, float] = {}  # access token -> monotonic expiry
        self.requests: list[dict[str, str]] = []  # every form posted, by path in "_path"
        self.rotations: list[tuple[str, str]] = []  # (old, new) refresh tokens
        self.pending = 0
        self.code = "auth-code-1"
        self.lock = threading.Lock()
        endpoint = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length", "0"))
                form = dict(urllib.parse.parse_qsl(self.rfile.read(length).decode()))
                status, document = endpoint.answer(self.path, form)
                body = json.dumps(document).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def stop(self) -> None:
        if self.thread.is_alive():
            self.server.shutdown()
            self.server.server_close()
            self.thread.join()

    # -- what the test sets up and asks --------------------------------------------

    def new_refresh_token(self) -> str:
        token = "rt-" + secrets.token_hex(8)
        with self.lock:
            self.refresh_tokens.add(token)
        return token

    def valid(self, token: str) -> bool:
        with self.lock:
            expiry = self.issued.get(token)
        return expiry is not None and time.monotonic() < expiry

    def revoke_access_tokens(self) -> None:
        with self.lock:
            self.issued.clear()

    def token_requests(self) -> list[dict[str, str]]:
        with self.lock:
            return [r for r in self.requests if r["_path"] == "/token"]

    def access_tokens(self) -> list[str]:
        with self.lock:
            return list(self.issued)

    # -- the protocol ----------------------------------------------------------------

    def answer(self, path: str, form: dict[str, str]) -> tuple[int, dict]:
        with self.lock:
            self.requests.append({**form, "_path": path})
            if path == "/devicecode":
                return 200, {
                    "device_code": "dev-code-1",
                    "user_code": "ABCD-EFGH",
                    "verification_uri": "https://microsoft.com/devicelogin",
                    "expires_in": 900,
                    "interval": 0,
                }
            if form.get("client_id") != CLIENT_ID:
                return 400, {"error": "invalid_client", "error_description": "unknown client"}
            grant = form.get("grant_type")
            if grant == "client_credentials":
                if form.get("client_secret") != self.client_secret:
                    return 401, {
                        "error": "invalid_client",
                        "error_description": "AADSTS7000215: Invalid client secret provided.",
                    }
                return 200, self._issue()
            if grant == "refresh_token":
                old = form.get("refresh_token", "")
                if old not in self.refresh_tokens:
                    return 400, {
                        "error": "invalid_grant",
                        "error_description": "Token has been expired or revoked.",
                    }
                if not self.rotate:
                    return 200, self._issue()
                self.refresh_tokens.discard(old)
                new = "rt-" + secrets.token_hex(8)
                self.refresh_tokens.add(new)
                self.rotations.append((old, new))
                return 200, self._issue(refresh_token=new)
            if grant == "urn:ietf:params:oauth:grant-type:device_code":
                if self.pending > 0:
                    self.pending -= 1
                    return 400, {"error": "authorization_pending"}
                return 200, self._issue(refresh_token=self._refresh_token())
            if grant == "authorization_code" and form.get("code") == self.code:
                return 200, self._issue(refresh_token=self._refresh_token())
            return 400, {"error": "unsupported_grant_type"}

    def _refresh_token(self) -> str:
        token = "rt-" + secrets.token_hex(8)
        self.refresh_tokens.add(token)
        return token

    def _issue(self, **extra: str) -> dict:
        token = "at-" + secrets.token_hex(12)
        self.issued[token] = time.monotonic() + self.lifetime
        return {"access_token": token, "token_type": "Bearer", "expires_in": self.lifetime, **extra}


def s256(verifier: str) -> str:
    return base64.urlsafe_b64encode(hashlib.sha256(verifier.encode()).digest()).decode().rstrip("=")


class BearerHandler(SinkHandler):
    """An upstream that takes a bearer token over XOAUTH2 or OAUTHBEARER and accepts it
    only if the endpoint issued it and it has not expired. A refused token gets the
    error challenge first, as Gmail and Microsoft 365 send it."""

    def __init__(self, endpoint: TokenEndpoint) -> None:
        super().__init__()
        self.endpoint = endpoint
        self.logins: list[dict[str, Any]] = []  # per AUTH: mechanism, fields, accepted
        self.hold = False  # True: each AUTH is recorded, then answered only once False

    async def auth_XOAUTH2(self, server, args):
        return await self._bearer(server, "XOAUTH2", args, _xoauth2_fields)

    async def auth_OAUTHBEARER(self, server, args):
        return await self._bearer(server, "OAUTHBEARER", args, _oauthbearer_fields)

    async def _bearer(self, server, mechanism, args, parse):
        if len(args) < 2:
            return AuthResult(success=False, handled=False)
        fields = parse(base64.b64decode(args[1]).decode())
        token = fields.get("auth", "").removeprefix("Bearer ")
        ok = fields.get("user") == USER and self.endpoint.valid(token)
        login = {"mechanism": mechanism, "token": token, "accepted": ok, **fields}
        self.logins.append(login)
        while self.hold:
            await asyncio.sleep(0.01)
        if not ok:
            error = json.dumps({"status": "401", "schemes": "bearer", "scope": "mail"})
            login["error_reply"] = await server.challenge_auth(error)
            return AuthResult(success=False, handled=False, message="535 5.7.8 Not accepted")
        return AuthResult(success=True, handled=False)


def _xoauth2_fields(text: str) -> dict[str, str]:
    return dict(part.split("=", 1) for part in text.split("\x01") if "=" in part)


def _oauthbearer_fields(text: str) -> dict[str, str]:
    gs2, _, rest = text.partition("\x01")
    fields = _xoauth2_fields(rest)
    parts = gs2.split(",")
    fields["gs2"] = gs2
    if len(parts) >= 2 and parts[1].startswith("a="):
        fields["user"] = parts[1][2:].replace("=2C", ",").replace("=3D", "=")
    return fields


class BearerSink:
    """The upstream on a free loopback port (AUTH without TLS: it is loopback)."""

    def __init__(self, endpoint: TokenEndpoint) -> None:
        self.handler = BearerHandler(endpoint)
        self.controller = Controller(
            self.handler, hostname="127.0.0.1", port=0, auth_require_tls=False
        )
        self.port = start_controller(self.controller)

    @property
    def messages(self):
        return self.handler.messages

    def stop(self) -> None:
        self.controller.stop()


def oauth2_backend(
    tmp_path: Path,
    endpoint: TokenEndpoint,
    auth: str = "xoauth2",
    flow: str = "client_credentials",
    secret: str = CLIENT_SECRET,
    refresh_token: str | None = None,
) -> str:
    """The keys that make conftest's sink backend one with [backend.oauth2] against
    `endpoint`; the secret files are written, mode 0600."""
    secret_file = tmp_path / "client.secret"
    secret_file.write_text(secret + "\n")
    secret_file.chmod(0o600)
    lines = [
        f'username = "{USER}"',
        f'auth = "{auth}"',
        "[backend.oauth2]",
        f'flow = "{flow}"',
        f'client_id = "{CLIENT_ID}"',
        f'client_secret_file = "{secret_file}"',
        f'token_url = "{endpoint.url}/token"',
        'scope = "https://outlook.office365.com/.default"',
    ]
    if flow == "refresh_token":
        token_file = tmp_path / "refresh.token"
        if refresh_token is not None:
            token_file.write_text(refresh_token + "\n")
            token_file.chmod(0o600)
        lines.append(f'refresh_token_file = "{token_file}"')
        lines.append(f'device_code_url = "{endpoint.url}/devicecode"')
    return "\n".join(lines)


def add_to_backend(config_path: Path, backend: str) -> Path:
    """conftest's config file with `backend` appended to its sink backend (the file's
    last table, so the keys and the oauth2 table may simply follow)."""
    config_path.write_text(config_path.read_text().rstrip() + "\n" + backend + "\n")
    config_path.chmod(0o600)
    return config_path
