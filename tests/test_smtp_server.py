"""The aiosmtpd adaptation: DATA read as a stream, and the internals it relies on.

`read_data` and `DataDecoder` are checked against a plain reference (find CRLF.CRLF,
normalise line endings, unstuff dots) over generated streams cut into arbitrary
pieces, with a tiny reader limit so that every read path is taken. The canary at the
end fails loudly when an aiosmtpd release changes an internal smtp_server.py touches.
"""

from __future__ import annotations

import asyncio
import asyncio.selector_events
import inspect
import re
from pathlib import Path

import aiosmtpd
import pytest
from aiosmtpd.smtp import SMTP
from hypothesis import example, given, settings
from hypothesis import strategies as st

from smarthost.smtp_server import READ_LIMIT, BareNewline, DataDecoder, LineTooLong, read_data

ROOT = Path(__file__).resolve().parent.parent

# Pieces that make the awkward cases likely: dots at line starts, CR and LF apart,
# an end of DATA split anywhere.
_ATOMS = [b"a", b"bc", b".", b"..", b"\r", b"\n", b"\r\n", b".\r\n", b"\r\n.", b"x.\r\n"]


def reference(stream: bytes) -> tuple[bytes, bytes]:
    """(the message, what follows the end of DATA) by the book."""
    framed = b"\r\n" + stream
    end = framed.find(b"\r\n.\r\n")
    assert end >= 0
    raw, rest = framed[2 : end + 2], framed[end + 5 :]
    text = raw.replace(b"\r\n", b"\n").replace(b"\r", b"\n").replace(b"\n", b"\r\n")
    lines = [line[1:] if line.startswith(b".") else line for line in text.split(b"\r\n")]
    return b"\r\n".join(lines), rest


async def _decode(stream: bytes, cuts: list[int], limit: int) -> tuple[bytes, bytes]:
    reader = asyncio.StreamReader(limit=limit)
    decoder = DataDecoder()
    out: list[bytes] = []

    async def feed() -> None:
        position = 0
        for cut in [*sorted(cuts), len(stream)]:
            reader.feed_data(stream[position:cut])
            position = cut
            await asyncio.sleep(0)
        reader.feed_eof()

    feeding = asyncio.ensure_future(feed())
    await read_data(reader, lambda piece: out.append(decoder.feed(piece)), lambda: None)
    out.append(decoder.close())
    await feeding
    return b"".join(out), await reader.read()


@settings(max_examples=1000, deadline=None, database=None, derandomize=True)
@given(
    content=st.lists(st.sampled_from(_ATOMS), max_size=40).map(b"".join),
    after=st.sampled_from([b"", b"QUIT\r\n", b"RSET\r\nMAIL FROM:<a@b>\r\n"]),
    cuts=st.lists(st.integers(0, 200), max_size=6),
    limit=st.sampled_from([8, 16, 64 * 1024]),
)
@example(content=b"", after=b"QUIT\r\n", cuts=[], limit=8)
@example(content=b"a\r\n", after=b"", cuts=[1, 2], limit=8)
@example(content=b"\r\n\r\n.\r\n..\r\n", after=b"", cuts=[3], limit=8)
@example(content=b"x.\r\naabcbc\r..\r\n", after=b"", cuts=[], limit=8)  # a piece ends in a dot
def test_stream_decodes_as_the_reference(content, after, cuts, limit):
    stream = content + (b"\r\n" if content else b"") + b".\r\n" + after
    expected, rest = reference(stream)
    message, left = asyncio.run(_decode(stream, [c for c in cuts if c < len(stream)], limit))
    assert message == expected
    assert left == rest  # commands pipelined after the dot are the session's


def test_a_long_message_is_read_in_large_pieces():
    """Reading costs per piece, not per line: a message of short lines and dots comes
    in pieces near the reader's limit."""
    body = b"line of text.\r\n..stuffed\r\n" * 20_000
    pieces: list[bytes] = []

    async def run() -> None:
        reader = asyncio.StreamReader(limit=64 * 1024)
        reader.feed_data(b"Subject: x\r\n\r\n" + body + b".\r\n")
        reader.feed_eof()
        await read_data(reader, pieces.append, lambda: None)

    asyncio.run(run())
    assert len(pieces) < len(body) // 32_000
    decoded = DataDecoder().feed(b"".join(pieces))
    assert decoded.endswith(b"line of text.\r\n.stuffed\r\n")


def test_bare_line_endings_are_refused_when_asked():
    decoder = DataDecoder(normalize=False)
    assert decoder.feed(b"fine\r\n") == b"fine\r\n"
    with pytest.raises(BareNewline):
        decoder.feed(b"bare\nline\r\n")
    held = DataDecoder(normalize=False)
    held.feed(b"ends in CR\r")
    with pytest.raises(BareNewline):
        held.feed(b"x")


@pytest.mark.parametrize(
    ("pieces", "too_long"),
    [
        ([b"." + b"a" * 998 + b"\r\n"], False),  # 998 and a transparency dot
        ([b"a" * 1000 + b"\r\n"], True),
        ([b"a" * 500, b"a" * 499 + b"\r", b"\nb\r\n"], False),  # 999 across three pieces
        ([b"x\r\n" + b"a" * 500, b"a" * 500], True),  # still open, already too long
        ([b"x\r\n" + b"a" * 1000 + b"\r\nb\r\n"], True),  # a middle line
    ],
)
def test_line_length_is_checked_across_pieces(pieces, too_long):
    decoder = DataDecoder()
    try:
        for piece in pieces:
            decoder.feed(piece)
    except LineTooLong:
        assert too_long
    else:
        assert not too_long


# -- the canary: aiosmtpd internals smtp_server.py relies on --------------------------


def test_aiosmtpd_internals_are_what_smtp_server_expects():
    """If this fails, an aiosmtpd release changed what smarthost/smtp_server.py touches:
    read the new smtp.py, adapt smtp_server.py, then move the range in setup.py."""
    init = inspect.getsource(SMTP.__init__)
    for attribute in ("_timeout_handle", "_original_transport", "_tls_protocol"):
        assert f"self.{attribute}" in init, attribute
    assert "limit=self.line_length_limit" in init  # the reader's limit is ours to set
    for method in ("_timeout_cb", "_reset_timeout", "_getaddr", "_set_post_data_state"):
        assert callable(getattr(SMTP, method, None)), method
    assert "self._handler_coroutine = self.loop.create_task" in inspect.getsource(
        SMTP.connection_made
    )
    assert "await waiter" in inspect.getsource(SMTP.smtp_STARTTLS)
    assert "_reader" in inspect.getsource(SMTP._cb_client_connected)
    # asyncio's socket transport reads `max_size` bytes at a time (smtp_server.py sets it).
    transport = asyncio.selector_events._SelectorSocketTransport
    assert transport.max_size > READ_LIMIT
    assert "recv(self.max_size)" in inspect.getsource(transport)
    pinned = re.search(r'"aiosmtpd>=([\d.]+),<([\d.]+)"', (ROOT / "setup.py").read_text())
    assert pinned, "setup.py pins aiosmtpd to a range"
    low, high = (tuple(int(p) for p in v.split(".")) for v in pinned.groups())
    version = tuple(int(p) for p in aiosmtpd.__version__.split(".")[:3])
    assert low <= version < high


@pytest.mark.parametrize("lines", [10, 5000])  # joined, or counted (thousands of lines)
def test_a_bare_line_ending_is_found_among_few_or_many_lines(lines):
    piece = b"x\r\n" * lines + b"bare\nend\r\n"
    assert DataDecoder().feed(piece) == b"x\r\n" * lines + b"bare\r\nend\r\n"
    with pytest.raises(BareNewline):
        DataDecoder(normalize=False).feed(piece)
    assert DataDecoder(normalize=False).feed(b"x\r\n" * lines) == b"x\r\n" * lines
