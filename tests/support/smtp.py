"""SMTP clients for the tests: `RawSMTP` sends exactly the bytes it is given."""

from __future__ import annotations

import socket

import pytest


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
