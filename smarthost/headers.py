"""The header section of a message, as bytes: the one header reader of the relay.

Messages are kept byte for byte; these helpers find and edit fields without parsing
and re-generating the whole message (which the email package would re-fold).

`read` reads a header block as an upstream would: RFC 5322 fields with their folded
continuation lines, lines ending in CRLF or LF, up to the empty line. It tolerates
what it must (white space before the colon, 8-bit bytes in values) and never stops
early: a line it does not take for a field (no colon, an 8-bit or otherwise invalid
field name, a continuation line with no field before it) and a bare CR inside a line
are recorded as doubts, and the reading goes on to the empty line. The receiver, the
drop area's pickup, sendmail and rewriting all read headers through it.
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass, field
from email.utils import formatdate

# The most of a header block that is read (the SMTP receiver holds no more either):
# lines that start past it are not read, and the block is then `cut`.
MAX_BLOCK = 256 * 1024

# A field's first line: its name (RFC 5322 ftext), obsolete white space, the colon.
_NAME = re.compile(rb"([!-9;-~]+)[ \t]*:")
# A field without a doubt: its lines (folded continuations included) hold no bare CR.
_CLEAN_FIELD = re.compile(rb"([!-9;-~]+)[ \t]*:([^\r\n]*(?:\r?\n[ \t][^\r\n]*)*)(?:\r?\n|\Z)")
# A run of lines that are neither empty nor the start of a field.
_NOT_FIELDS = re.compile(rb"(?:(?!\r?\n|[!-9;-~]+[ \t]*:)[^\n]+(?:\n|\Z))+")
# What a lenient reader may take for a From field, at a line start or after a bare CR
# (which goes out as a line end): "from" before a colon, with any bytes such a reader
# may drop or not see around its letters (white space, controls, 8-bit bytes such as
# a byte-order mark or a no-break space).
_X = rb"[^!-~\r\n]*"
_LOOKS_LIKE_FROM = re.compile(
    rb"(?:^|\r)" + _X + rb"f" + _X + rb"r" + _X + rb"o" + _X + rb"m" + _X + rb":",
    re.IGNORECASE | re.MULTILINE,
)
_BARE_CR = re.compile(rb"\r(?!\n)")


@dataclass(frozen=True)
class Field:
    name: str  # lower case
    value: bytes  # unfolded, runs of white space made one space, ends stripped
    start: int  # offsets of the whole field, line end included
    end: int

    @property
    def text(self) -> str:
        return self.value.decode("utf-8", "replace")


@dataclass(frozen=True)
class Doubt:
    """A line of the block, or a run of lines that are not fields (offsets, line end
    included), not read without doubt; `reason` says why.

    `hides_from`: another reader may take it, or part of it, for a `From:` field that
    this reader does not see as one (see `_LOOKS_LIKE_FROM`)."""

    start: int
    end: int
    reason: str
    hides_from: bool = False


@dataclass(frozen=True)
class Header:
    """A header block as read: every field in order, every doubtful line, where it ends.

    `end` is the offset of the empty line that ends the block (the length of what was
    given if it has none); `cut` means the block went on past the bound (`MAX_BLOCK`
    unless told otherwise) and was not read to its end."""

    fields: list[Field]
    doubts: list[Doubt] = field(default_factory=list)
    end: int = 0
    cut: bool = False

    @property
    def doubtful(self) -> bool:
        """Anything not read without doubt (a doubtful line, or a block not read whole)."""
        return bool(self.doubts) or self.cut

    @property
    def hides_from(self) -> bool:
        """Some line may be read as a From field elsewhere and is not one here."""
        return any(d.hides_from for d in self.doubts)

    def find(self, name: str) -> list[Field]:
        """Every field called `name` (any case), in order."""
        name = name.lower()
        return [f for f in self.fields if f.name == name]

    def doubts_before(self, offset: int) -> list[Doubt]:
        return [d for d in self.doubts if d.start < offset]


def read(content: bytes, limit: int = MAX_BLOCK) -> Header:
    """Read the header block at the start of `content` (the whole message, or the block
    alone) up to its empty line, never stopping early; lines that start at or past
    `limit` are not read. A run of lines that are not fields is one Doubt."""
    found: list[Field] = []
    doubts: list[Doubt] = []
    size = len(content)
    pos = 0
    current: tuple[bytes, int, list[bytes]] | None = None  # the field being read
    in_doubt = False  # the previous line was not part of a field

    def close(end: int) -> None:
        nonlocal current
        if current is not None:
            name, start, parts = current
            value = b" ".join(b" ".join(parts).split())
            found.append(Field(name.decode("ascii").lower(), value, start, end))
            current = None

    while pos < size:
        if pos >= limit:
            close(pos)
            return Header(found, doubts, pos, cut=not content.startswith((b"\r\n", b"\n"), pos))
        continuation = content[pos] in b" \t"
        if not continuation:  # the common case first: a field without a doubt
            clean = _CLEAN_FIELD.match(content, pos)
            if clean is not None and clean.end() <= limit:
                close(pos)
                current = (clean.group(1), pos, [clean.group(2)])
                in_doubt = False
                pos = clean.end()
                continue
        newline = content.find(b"\n", pos)
        line_end = size if newline < 0 else newline + 1
        text = content[pos:line_end]
        if text.endswith(b"\n"):
            text = text[:-2] if text.endswith(b"\r\n") else text[:-1]
        if not text:
            close(pos)
            return Header(found, doubts, pos)
        name = None if continuation else _NAME.match(text)
        if continuation and current is not None and not in_doubt:
            current[2].append(text)
        elif name is not None:
            close(pos)
            current = (name.group(1), pos, [text[name.end() :]])
            in_doubt = False
        else:
            close(pos)
            doubts.append(_not_fields(content, pos, text, continuation, in_doubt, limit))
            in_doubt = True
            pos = doubts[-1].end
            continue
        bare_cr = text.find(b"\r")
        if bare_cr >= 0:  # it goes out as a line end: what follows it is a line upstream
            hides = _LOOKS_LIKE_FROM.search(text, bare_cr) is not None
            doubts.append(Doubt(pos, line_end, "a bare CR inside a line", hides))
        pos = line_end
    close(pos)
    return Header(found, doubts, pos)


def _not_fields(
    content: bytes, pos: int, text: bytes, continuation: bool, in_doubt: bool, limit: int
) -> Doubt:
    """The run of lines at `pos` (the first one `text`) that are not fields: up to the
    next field, the empty line, or the end of the line that crosses `limit`."""
    stop = content.find(b"\n", max(limit - 1, pos))
    stop = len(content) if stop < 0 else stop + 1
    run = _NOT_FIELDS.match(content, pos, stop)
    end = run.end() if run is not None else stop
    if continuation:
        reason = "a continuation line " + (
            "after a line that is not a field" if in_doubt else "before any field"
        )
    elif b":" not in text:
        reason = "a line that is not a header field (no colon)"
    elif not text.partition(b":")[0].isascii():
        reason = "an 8-bit field name"
    else:
        reason = "an invalid field name"
    more = content.count(b"\n", pos, end - 1)
    if more:
        reason += f" ({more + 1} lines that are not fields)"
    if _BARE_CR.search(content, pos, end):
        reason += "; a bare CR inside a line"
    return Doubt(pos, end, reason, _LOOKS_LIKE_FROM.search(content, pos, end) is not None)


def section_end(content: bytes) -> int:
    """Offset of the empty line ending the header section (0 if the section is empty)."""
    found = empty_line(content)
    return len(content) if found is None else found[0]


def empty_line(content: bytes | bytearray, start: int = 0) -> tuple[int, int] | None:
    """(where the empty line that ends the header section begins, where it ends), or
    None if it is not in `content` yet; searched from `start` (content read so far
    and searched before need not be searched again). CRLF or LF line endings."""
    for blank in (b"\r\n", b"\n"):
        if content.startswith(blank):
            return 0, len(blank)  # no header section at all
    crlf, lf = content.find(b"\n\r\n", start), content.find(b"\n\n", start)
    if crlf >= 0 and (lf < 0 or crlf < lf):
        return crlf + 1, crlf + 3
    return (lf + 1, lf + 2) if lf >= 0 else None


def fields(content: bytes) -> list[Field]:
    """The fields of the header section, in order, to its empty line: a line that is
    not a field is passed over, never taken for the end of the section."""
    return read(content).fields


def find(content: bytes, name: str) -> list[Field]:
    """Every field called `name` (any case)."""
    return read(content).find(name)


def remove(content: bytes, name: str) -> bytes:
    """The message without any field called `name` (e.g. Bcc)."""
    return splice(content, [(f.start, f.end, b"") for f in find(content, name)])


def splice(content: bytes, edits: list[tuple[int, int, bytes]]) -> bytes:
    """`content` with each (start, end, replacement) applied; edits must not overlap."""
    out, pos = [], 0
    for start, end, replacement in sorted(edits, key=lambda e: (e[0], e[1])):
        out += [content[pos:start], replacement]
        pos = end
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
