"""Test messages whose arrival can be counted: each carries its own Message-ID."""

from __future__ import annotations

import collections
import re
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from support.sink import Sink

SENDER = "client@client.test"
RCPT = "rcpt@dest.test"
DATE = "Wed, 25 Nov 2026 10:00:00 +0000"

_MESSAGE_ID = re.compile(rb"^Message-ID:[ \t]*(\S+)", re.MULTILINE | re.IGNORECASE)


def header(message_id: str, subject: str, rcpt: str = RCPT) -> bytes:
    """The header section of a message from SENDER, with the empty line that ends it."""
    return (
        f"From: {SENDER}\r\nTo: {rcpt}\r\nSubject: {subject}\r\n"
        f"Message-ID: {message_id}\r\nDate: {DATE}\r\n\r\n"
    ).encode()


def message(message_id: str, subject: str = "process test", rcpt: str = RCPT) -> bytes:
    """A small message from SENDER, its body naming `message_id`."""
    return header(message_id, subject, rcpt) + f"body of {message_id}\r\n".encode()


def header_message_id(content: bytes) -> str | None:
    """The Message-ID header of a message as the upstream received it."""
    end = content.find(b"\r\n\r\n")  # the header only: no copy of a large body
    match = _MESSAGE_ID.search(content if end < 0 else content[:end])
    return match.group(1).decode("utf-8", "replace") if match else None


def arrived(sink: Sink) -> collections.Counter[str | None]:
    """How many copies of each Message-ID the upstream has received."""
    return collections.Counter(header_message_id(m.content) for m in list(sink.messages))
