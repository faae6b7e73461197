"""The header section of a message, as bytes: where it ends and which fields it has.

Messages are kept byte for byte; these helpers find and edit fields without parsing
and re-generating the whole message (which the email package would re-fold).
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass
from email.utils import formatdate

# One field with its folded continuation lines, and its line end.
_FIELD = re.compile(rb"([!-9;-~]+)[ \t]*:([^\r\n]*(?:\r?\n[ \t][^\r\n]*)*)(?:\r?\n)?")


@dataclass(frozen=True)
class Field:
    name: str  # lower case
    value: bytes  # unfolded, surrounding white space removed
    start: int  # offsets of the whole field, line end included
    end: int

    @property
    def text(self) -> str:
        return self.value.decode("utf-8", "replace")


def section_end(content: bytes) -> int:
    """Offset of the empty line ending the header section (0 if the section is empty)."""
    if content.startswith((b"\r\n", b"\n")):
        return 0
    ends = [i + 1 for i in (content.find(b"\n\r\n"), content.find(b"\n\n")) if i >= 0]
    return min(ends) if ends else len(content)


def fields(content: bytes) -> list[Field]:
    """The fields of the header section, in order; a malformed line ends the section."""
    end, pos, found = section_end(content), 0, []
    while pos < end:
        match = _FIELD.match(content, pos, end)
        if match is None or match.end() == pos:
            break
        value = b" ".join(match.group(2).split())
        found.append(Field(match.group(1).decode("ascii").lower(), value, pos, match.end()))
        pos = match.end()
    return found


def find(content: bytes, name: str) -> list[Field]:
    """Every field called `name` (any case)."""
    return [f for f in fields(content) if f.name == name.lower()]


def remove(content: bytes, name: str) -> bytes:
    """The message without any field called `name` (e.g. Bcc)."""
    out, pos = [], 0
    for field in find(content, name):
        out.append(content[pos : field.start])
        pos = field.end
    out.append(content[pos:])
    return b"".join(out)


_date_cache: tuple[int, str] = (0, "")


def date_now() -> str:
    """The current time as an RFC 5322 date in local time, for Date: and Received:.

    Formatted once a second: every message in a busy second shares the string.
    """
    global _date_cache
    second = int(time.time())
    cached = _date_cache
    if cached[0] != second:
        cached = _date_cache = (second, formatdate(second, localtime=True))
    return cached[1]
