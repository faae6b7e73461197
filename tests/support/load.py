"""Load on the relay: client threads that send counted messages until halted."""

from __future__ import annotations

import contextlib
import smtplib
import threading
from collections.abc import Iterator

from support.messages import RCPT, SENDER, message


class LoadClient(threading.Thread):
    """Sends messages in sessions of 5 until halted or an error ends it; each is
    `content(message_id)`, message `n` being `<TAG.n@client.test>`, and each 250 to
    its DATA goes to `acknowledged`. What ended the thread: `failed(exc)`, which keeps
    it in `error` (and `refused`: it was a reply other than 250, not a broken session)."""

    per_session = 5

    def __init__(self, port: int, tag: str, timeout: float = 10.0) -> None:
        super().__init__(name=f"load-{tag}")
        self.port = port
        self.tag = tag
        self.timeout = timeout
        self.halt = threading.Event()
        self.error: str | None = None
        self.refused = False

    def content(self, message_id: str) -> bytes:
        return message(message_id)

    def acknowledged(self, message_id: str, queue_id: str) -> None:
        """Called once DATA got 250 (from this thread)."""

    def failed(self, exc: Exception) -> None:
        self.refused = isinstance(exc, smtplib.SMTPResponseException)
        self.error = f"{type(exc).__name__}: {exc}"

    def run(self) -> None:
        n = 0
        try:
            while not self.halt.is_set():
                with smtplib.SMTP("127.0.0.1", self.port, timeout=self.timeout) as client:
                    client.ehlo("client.test")
                    for _ in range(self.per_session):
                        if self.halt.is_set():
                            break
                        message_id = f"<{self.tag}.{n}@client.test>"
                        n += 1
                        self._send(client, message_id)
        except (OSError, smtplib.SMTPException) as exc:
            self.failed(exc)

    def _send(self, client: smtplib.SMTP, message_id: str) -> None:
        content = self.content(message_id)
        for code, reply in (client.mail(SENDER), client.rcpt(RCPT)):
            if code != 250:
                raise smtplib.SMTPResponseException(code, reply)
        code, reply = client.data(content)
        if code != 250:
            raise smtplib.SMTPResponseException(code, reply)
        self.acknowledged(message_id, reply.decode().rsplit(" ", 1)[-1])


@contextlib.contextmanager
def clients_running(clients: list[LoadClient], join_timeout: float) -> Iterator[list[LoadClient]]:
    """`clients` started for the `with` block, then halted and joined (each given
    `join_timeout` seconds: the caller asserts that none is still alive)."""
    for client in clients:
        client.start()
    try:
        yield clients
    finally:
        for client in clients:
            client.halt.set()
        for client in clients:
            client.join(join_timeout)
