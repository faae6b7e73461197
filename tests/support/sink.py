"""Real upstreams on loopback: `Sink` (aiosmtpd, records each message, replies can be
scripted), `RawUpstream` (a bare socket that records the bytes of each DATA as the wire
carried them), `SilentServer` (accepts and never says a word)."""

from __future__ import annotations

import asyncio
import socket
import threading
import time
from dataclasses import dataclass, field

import pytest
from aiosmtpd.controller import Controller


@dataclass
class Received:
    mail_from: str
    rcpt_tos: list[str]
    content: bytes
    at: float
    mail_options: list[str] = field(default_factory=list)


class SinkHandler:
    """Records what arrives; replies can be scripted per recipient or for DATA."""

    def __init__(self) -> None:
        self.messages: list[Received] = []
        self.rcpt_replies: dict[str, str] = {}
        self.mail_reply: str | None = None
        self.data_reply: str | None = None
        self.pipelining = True  # offered in EHLO, as Postfix and most upstreams do
        self.pipelined: list[bool] = []  # per MAIL: DATA had already arrived with it
        self.cond = threading.Condition()

    async def handle_EHLO(self, server, session, envelope, hostname, responses):
        session.host_name = hostname
        if self.pipelining:
            return [*responses[:-1], "250-PIPELINING", responses[-1]]
        return responses

    async def handle_MAIL(self, server, session, envelope, address, options):
        self.pipelined.append(b"\nDATA\r\n" in bytes(server._reader._buffer))
        if self.mail_reply:
            return self.mail_reply
        # aiosmtpd spells the null sender "<>"; record it as the empty address.
        envelope.mail_from = address
        envelope.mail_options.extend(options)
        return "250 2.1.0 OK"

    async def handle_RCPT(self, server, session, envelope, address, options):
        reply = self.rcpt_replies.get(address)
        if reply:
            return reply
        envelope.rcpt_tos.append(address)
        return "250 2.1.5 OK"

    async def handle_DATA(self, server, session, envelope):
        if self.data_reply:
            return self.data_reply
        with self.cond:
            self.messages.append(
                Received(
                    "" if envelope.mail_from == "<>" else envelope.mail_from,
                    list(envelope.rcpt_tos),
                    envelope.original_content,
                    time.monotonic(),
                    list(envelope.mail_options),
                )
            )
            self.cond.notify_all()
        return "250 2.0.0 OK: stored"


def start_controller(controller: Controller) -> int:
    """Start an aiosmtpd Controller made with port 0 (or a port); the port it got.

    aiosmtpd connects to its own port once started, so it must learn a free port's
    number before that."""
    if controller.port == 0:
        original = controller._trigger_server

        def trigger() -> None:
            controller.port = controller.server.sockets[0].getsockname()[1]
            original()

        controller._trigger_server = trigger  # type: ignore[method-assign]
    controller.start()
    return controller.port


class Sink:
    """A real aiosmtpd server on loopback standing in for the smarthost upstream."""

    def __init__(self, port: int = 0) -> None:
        self.handler = SinkHandler()
        self.port = port
        self.controller: Controller | None = None

    def start(self) -> Sink:
        controller = Controller(self.handler, hostname="127.0.0.1", port=self.port)
        self.port = start_controller(controller)
        self.controller = controller
        return self

    def stop(self) -> None:
        if self.controller is not None:
            self.controller.stop()
            self.controller = None

    @property
    def messages(self) -> list[Received]:
        return self.handler.messages

    def wait_for(self, count: int, timeout: float = 10.0) -> list[Received]:
        with self.handler.cond:
            ok = self.handler.cond.wait_for(lambda: len(self.messages) >= count, timeout)
        if not ok:
            pytest.fail(f"sink got {len(self.messages)} messages, expected {count}")
        return list(self.messages)


@dataclass
class RawTransaction:
    """One transaction as the wire carried it: `data` is every byte between the 354 and
    the CRLF . CRLF that ended it (that CRLF included), dot-stuffing and all."""

    mail: bytes
    rcpts: list[bytes]
    data: bytes


class RawUpstream:
    """An upstream speaking just enough SMTP (220, 250 to EHLO/MAIL/RCPT/RSET/NOOP,
    354, 221) that records the bytes of each DATA exactly as they came, up to the
    first CRLF . CRLF: no library between the relay's bytes and the test."""

    def __init__(self) -> None:
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.listener.settimeout(0.1)
        self.port = self.listener.getsockname()[1]
        self.transactions: list[RawTransaction] = []
        self.commands: list[bytes] = []
        self.cond = threading.Condition()
        self._halt = threading.Event()
        self._threads: list[threading.Thread] = []
        self._acceptor = threading.Thread(target=self._accept, name="raw-upstream")

    def start(self) -> RawUpstream:
        self._acceptor.start()
        return self

    def stop(self) -> None:
        self._halt.set()
        self._acceptor.join(10)
        for thread in self._threads:
            thread.join(10)
        self.listener.close()

    def wait_for(self, count: int, timeout: float = 30.0) -> list[RawTransaction]:
        with self.cond:
            ok = self.cond.wait_for(lambda: len(self.transactions) >= count, timeout)
        if not ok:
            pytest.fail(f"raw upstream got {len(self.transactions)} transactions, not {count}")
        return list(self.transactions)

    def _accept(self) -> None:
        while not self._halt.is_set():
            try:
                conn, _ = self.listener.accept()
            except socket.timeout:
                continue
            thread = threading.Thread(target=self._serve, args=(conn,), name="raw-upstream-conn")
            self._threads.append(thread)
            thread.start()

    def _serve(self, conn: socket.socket) -> None:
        conn.settimeout(0.1)
        buffer = bytearray()

        def until(marker: bytes) -> bytes | None:
            searched = 0  # where the marker may still begin in what is buffered
            while True:
                found = buffer.find(marker, searched)
                if found >= 0:
                    out = bytes(buffer[: found + len(marker)])
                    del buffer[: found + len(marker)]
                    return out
                searched = max(len(buffer) - len(marker) + 1, 0)
                if self._halt.is_set():
                    return None
                try:
                    chunk = conn.recv(65536)
                except socket.timeout:
                    continue
                except OSError:
                    return None
                if not chunk:
                    return None
                buffer.extend(chunk)

        mail, rcpts = b"", []
        try:
            conn.sendall(b"220 raw.test ESMTP\r\n")
            while (line := until(b"\r\n")) is not None:
                line = line[:-2]
                with self.cond:
                    self.commands.append(line)
                verb = line[:4].upper()
                if verb in (b"EHLO", b"HELO"):
                    conn.sendall(b"250-raw.test\r\n250-8BITMIME\r\n250 SMTPUTF8\r\n")
                elif verb == b"MAIL":
                    mail, rcpts = line, []
                    conn.sendall(b"250 2.1.0 Ok\r\n")
                elif verb == b"RCPT":
                    rcpts.append(line)
                    conn.sendall(b"250 2.1.5 Ok\r\n")
                elif verb == b"DATA":
                    conn.sendall(b"354 go ahead\r\n")
                    data = until(b"\r\n.\r\n")
                    if data is None:
                        break
                    with self.cond:
                        self.transactions.append(RawTransaction(mail, rcpts, data[:-3]))
                        self.cond.notify_all()
                    conn.sendall(b"250 2.0.0 Ok: recorded\r\n")
                elif verb == b"QUIT":
                    conn.sendall(b"221 2.0.0 Bye\r\n")
                    break
                else:  # RSET, NOOP
                    conn.sendall(b"250 2.0.0 Ok\r\n")
        except OSError:
            pass
        finally:
            conn.close()


class SilentServer:
    """An upstream that accepts TCP connections and never says a word."""

    def __init__(self) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.sock.settimeout(0.05)
        self.port = self.sock.getsockname()[1]
        self.accepted = threading.Event()
        self._stop = threading.Event()
        self._conns: list[socket.socket] = []
        self._thread = threading.Thread(target=self._run, name="silent-server")

    def __enter__(self) -> SilentServer:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(10)
        for conn in self._conns:
            conn.close()
        self.sock.close()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except TimeoutError:
                continue
            self._conns.append(conn)
            self.accepted.set()


def slow_data(sink: Sink, seconds: float) -> None:
    """The upstream takes `seconds` to answer each DATA: attempts stay in flight."""
    original = sink.handler.handle_DATA

    async def handle_DATA(server, session, envelope):
        await asyncio.sleep(seconds)
        return await original(server, session, envelope)

    sink.handler.handle_DATA = handle_DATA  # type: ignore[method-assign]


def held_data(sink: Sink) -> threading.Event:
    """The upstream holds each DATA reply until the event returned is set: attempts
    stay in flight, waiting on it."""
    release = threading.Event()
    original = sink.handler.handle_DATA

    async def handle_DATA(server, session, envelope):
        while not release.is_set():
            await asyncio.sleep(0.01)
        return await original(server, session, envelope)

    sink.handler.handle_DATA = handle_DATA  # type: ignore[method-assign]
    return release
