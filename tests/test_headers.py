"""The one header reader (smarthost.headers): RFC 5322 fields read to the empty line,
tolerant where it must be, never stopping early at a line it does not understand."""

from __future__ import annotations

import pytest

from smarthost import headers


def names(content: bytes) -> list[str]:
    return [f.name for f in headers.read(content).fields]


def test_fields_in_order_with_offsets_and_unfolded_values() -> None:
    content = b"From: a@x.test\r\nSubject: one\r\n\ttwo  three\r\nTo: b@y.test\r\n\r\nbody: no\r\n"
    header = headers.read(content)
    assert [(f.name, f.value) for f in header.fields] == [
        ("from", b"a@x.test"),
        ("subject", b"one two three"),
        ("to", b"b@y.test"),
    ]
    subject = header.fields[1]
    assert content[subject.start : subject.end] == b"Subject: one\r\n\ttwo  three\r\n"
    assert header.end == content.index(b"\r\n\r\n") + 2
    assert not header.doubtful and not header.cut


def test_lf_line_ends_and_a_block_without_empty_line() -> None:
    assert names(b"A: 1\nB: 2\n\nC: 3\n") == ["a", "b"]
    header = headers.read(b"A: 1\r\nB: 2\r\n")  # the receiver's block: no empty line
    assert [f.name for f in header.fields] == ["a", "b"] and header.end == 12
    assert headers.read(b"\r\nA: 1\r\n").fields == []
    last = headers.read(b"A: 1\r\nB: 2").fields[-1]  # no line end at all
    assert (last.name, last.value, last.end) == ("b", b"2", 10)


def test_tolerated_obsolete_syntax_is_not_a_doubt() -> None:
    header = headers.read(b"From : a@x.test\r\nSubject:\xc3\xa9t\xc3\xa9\r\nX-Empty:\r\n\r\n")
    assert [(f.name, f.value) for f in header.fields] == [
        ("from", b"a@x.test"),
        ("subject", b"\xc3\xa9t\xc3\xa9"),
        ("x-empty", b""),
    ]
    assert not header.doubtful


@pytest.mark.parametrize(
    ("line", "reason"),
    [
        (b"not a header", "not a header field"),
        (b"X-\xc3\x9cber: v", "8-bit field name"),
        (b"X Bad: v", "invalid field name"),
        (b"X-A: a\rb", "bare CR"),
        (b" orphan", "continuation line before any field"),
    ],
)
def test_never_stops_early_at_a_malformed_line(line: bytes, reason: str) -> None:
    content = line + b"\r\nFrom: ceo@bank.example\r\nTo: b@y.test\r\n\r\nFrom: body@x.test\r\n"
    header = headers.read(content)
    assert [f.name for f in header.find("from")] == ["from"]
    assert header.find("from")[0].value == b"ceo@bank.example"
    assert header.find("to")
    (doubt,) = header.doubts
    assert reason in doubt.reason
    assert (doubt.start, doubt.end) == (0, len(line) + 2)
    assert header.doubtful and not doubt.hides_from


def test_a_continuation_of_a_malformed_line_is_not_taken_into_a_field() -> None:
    header = headers.read(b"A: 1\r\nbad line\r\n more\r\nB: 2\r\n\r\n")
    assert [(f.name, f.value) for f in header.fields] == [("a", b"1"), ("b", b"2")]
    (doubt,) = header.doubts  # one run of lines that are not fields
    assert (doubt.start, doubt.end) == (6, 23)
    assert "2 lines that are not fields" in doubt.reason


@pytest.mark.parametrize(
    "line",
    [
        b"X-A: a\rFrom: ceo@bank.example",  # a bare CR goes out as a line end
        b"X-A: a\r  from : ceo@bank.example",
        b"\xef\xbb\xbfFrom: ceo@bank.example",  # a byte-order mark
        b"From\x00: ceo@bank.example",
        b"Fr\xc2\xa0om: ceo@bank.example",
        b" From: ceo@bank.example",  # a continuation with no field before it
    ],
)
def test_a_line_another_reader_may_take_for_from_is_flagged(line: bytes) -> None:
    header = headers.read(b"Subject: s\r\n" * (line[:1] != b" ") + line + b"\r\n\r\n")
    assert header.hides_from
    assert not header.find("from")


@pytest.mark.parametrize(
    "line",
    [
        b"From ceo@bank.example Tue Jan  1 10:00:00 2030",  # an mbox separator
        b"X-From-Ish\xff: v",
        b"Fr\xc3\xb6m: ceo@bank.example",
        b"X-A: a\rb",
    ],
)
def test_other_doubts_do_not_hide_a_from(line: bytes) -> None:
    header = headers.read(line + b"\r\nSubject: s\r\n\r\n")
    assert header.doubtful and not header.hides_from


def test_the_block_is_bounded() -> None:
    block = b"X-Pad: " + b"y" * 90 + b"\r\n"
    content = block * 30 + b"From: late@x.test\r\n\r\nbody\r\n"
    header = headers.read(content, limit=len(block) * 30)
    assert header.cut and header.doubtful and not header.find("from")
    assert not headers.read(content).cut  # the default bound is far larger
    exact = headers.read(block * 2 + b"\r\nbody", limit=len(block) * 2)
    assert not exact.cut  # the empty line at the bound: read to its end


def test_compatible_helpers_read_past_malformed_lines() -> None:
    content = b"To: a@x.test\r\nnot a header\r\nBcc: secret@x.test\r\n\r\nBcc: body\r\n"
    assert [f.name for f in headers.fields(content)] == ["to", "bcc"]
    assert [f.value for f in headers.find(content, "BCC")] == [b"secret@x.test"]
    assert headers.remove(content, "bcc") == (b"To: a@x.test\r\nnot a header\r\n\r\nBcc: body\r\n")
    assert headers.section_end(content) == content.index(b"\r\n\r\n") + 2
    assert headers.splice(b"abcdef", [(4, 5, b"E"), (0, 0, b">"), (1, 3, b"")]) == b">adEf"
