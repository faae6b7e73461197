"""SMTP clients for the tests: `RawSMTP` sends exactly the bytes it is given,
`send_one` one message through smtplib with every reply checked; free ports."""

from __future__ import annotations

import re
import smtplib
import socket
from collections.abc import Sequence

import pytest

from support.messages import RCPT, SENDER, message


class RawSMTP:
    """An SMTP client on a bare socket: sends exactly the bytes it is given and reads
    replies line by line, for dialogues smtplib would refuse or fix up. `greeting` is
    the first reply's last line (`421 4.7.0 ...` when the relay is full)."""

    def __init__(self, port: int, host: str = "127.0.0.1", timeout: float = 30.0) -> None:
        self.sock = socket.create_connection((host, port), timeout=timeout)
        self._buffer = b""
        self.lines: list[bytes] = []  # every reply line received, without CRLF
        self.greeting = self.reply()

    def send(self, data: bytes | str) -> None:
        self.sock.sendall(data.encode() if isinstance(data, str) else data)

    def command(self, line: bytes | str) -> bytes:
        """Send `line` + CRLF; the last line of its reply."""
        self.send((line.encode() if isinstance(line, str) else line) + b"\r\n")
        return self.reply()

    def reply(self) -> bytes:
        """The last line of the next (possibly multi-line) reply; b"" if the peer closed."""
        while True:
            line = self._line()
            if not line:
                return b""
            self.lines.append(line)
            if line[3:4] != b"-":
                return line

    def _line(self) -> bytes:
        while b"\r\n" not in self._buffer:
            try:
                chunk = self.sock.recv(65536)
            except ConnectionResetError:
                chunk = b""
            if not chunk:
                return b""
            self._buffer += chunk
        line, self._buffer = self._buffer.split(b"\r\n", 1)
        return line

    def wait_closed(self, timeout: float = 30.0) -> bytes:
        """Read until the peer closes (a reset counts); what came before. Fails the test
        if the connection is still open after `timeout`."""
        self.sock.settimeout(timeout)
        rest = self._buffer
        self._buffer = b""
        try:
            while True:
                chunk = self.sock.recv(65536)
                if not chunk:
                    return rest
                rest += chunk
        except ConnectionResetError:
            return rest
        except socket.timeout:
            pytest.fail(f"the peer kept the connection open for {timeout}s; got {rest[-200:]!r}")

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> RawSMTP:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# -- smtplib: one message, every reply checked ------------------------------------------

QUEUED = re.compile(r"^2\.0\.0 Ok: queued as ([0-9A-Z]{16})$")


def transaction(
    client: smtplib.SMTP,
    sender: str,
    recipients: list[str],
    content: bytes | str,
    *,
    mail_options: Sequence[str] = (),
    rcpt_options: dict[str, Sequence[str]] | None = None,
) -> str:
    """MAIL, a RCPT per recipient and DATA on an open session, each answered 250; the
    queue ID from the final reply."""
    code, msg = client.mail(sender, list(mail_options))
    assert code == 250, (code, msg)
    for rcpt in recipients:
        code, msg = client.rcpt(rcpt, list((rcpt_options or {}).get(rcpt, ())))
        assert code == 250, (rcpt, code, msg)
    code, msg = client.data(content)
    assert code == 250, (code, msg)
    match = QUEUED.match(msg.decode())
    assert match, msg
    return match.group(1)


def send_one(
    port: int,
    sender: str,
    recipients: list[str],
    content: bytes | str,
    *,
    timeout: float = 10.0,
    mail_options: Sequence[str] = (),
    rcpt_options: dict[str, Sequence[str]] | None = None,
) -> str:
    """Send one message to the relay on `port` in a session of its own; its queue ID."""
    with smtplib.SMTP("127.0.0.1", port, timeout=timeout) as client:
        code, msg = client.ehlo("client.test")
        assert code == 250, (code, msg)
        return transaction(
            client,
            sender,
            recipients,
            content,
            mail_options=mail_options,
            rcpt_options=rcpt_options,
        )


# -- ports ------------------------------------------------------------------------------


def free_port() -> int:
    """A loopback port nothing listens on now (connections refused until someone binds it)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def port_is_closed(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=2):
            return False
    except ConnectionRefusedError:
        return True


def send_message(port: int, message_id: str) -> str:
    """Send `messages.message(message_id)` from SENDER to RCPT; its queue ID."""
    return send_one(port, SENDER, [RCPT], message(message_id))
