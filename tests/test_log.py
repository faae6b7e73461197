"""Log lines: the text (logfmt) format cannot be forged by a client-supplied string, and
the JSON format stays one object per event (SPEC §8)."""

from __future__ import annotations

import io
import json
import logging
import re
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from smarthost import log

from support.logs import parse_logfmt


def _capture(formatter: logging.Formatter, *filters: logging.Filter) -> Iterator[io.StringIO]:
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(formatter)
    for f in filters:
        handler.addFilter(f)
    old_level = log.logger.level
    log.logger.addHandler(handler)
    log.logger.setLevel(logging.DEBUG)
    try:
        yield stream
    finally:
        log.logger.removeHandler(handler)
        log.logger.setLevel(old_level)


@pytest.fixture
def text_log() -> Iterator[io.StringIO]:
    yield from _capture(log.TextFormatter())


@pytest.fixture
def json_log() -> Iterator[io.StringIO]:
    yield from _capture(log._json_formatter())


def _one_line(stream: io.StringIO) -> str:
    text = stream.getvalue()
    stream.seek(0)
    stream.truncate()
    assert text.endswith("\n") and text.count("\n") == 1, text
    return text[:-1]


HOSTILE = [
    "x event=delivered status=2.0.0",
    'x" event="delivered',
    "a\\",
    'a\\" event=x',
    "",
    "line\nnext 2024-01-01T00:00:00Z info delivered queue_id=forged",
    "cr\r\nlf\ttab",
    "\x1b[2Jterminal\x07\x00\x7f",
    "\u2028sep\u0085nel\u200bzw",
    "surrogate\udcff",
    "plain",
    "ünïcödé",
    "=",
    '"',
]


@pytest.mark.parametrize("value", HOSTILE)
def test_text_value_cannot_forge_a_field(text_log: io.StringIO, value: str) -> None:
    log.event("rejected", client=value, reply="554 5.7.1 denied")
    line = _one_line(text_log)
    (_, level, event), pairs = parse_logfmt(line)
    assert (level, event) == ("info", "rejected")
    assert pairs == [("client", value), ("reply", "554 5.7.1 denied")]
    # Nothing a terminal or a line-oriented reader would act on is written raw.
    assert all(c == " " or c.isprintable() for c in line), line


@given(st.text())
def test_any_text_round_trips(value: str) -> None:
    field = f"k={log.logfmt_value(value)}"
    _, pairs = parse_logfmt(f"t info e {field} after=1")
    assert pairs == [("k", value), ("after", "1")]


def test_safe_values_stay_bare(text_log: io.StringIO) -> None:
    log.event("delivered", queue_id="ABC123", size=512, status="2.0.0")
    line = _one_line(text_log)
    assert re.fullmatch(
        r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ info delivered queue_id=ABC123 size=512 status=2\.0\.0",
        line,
    ), line


def test_lists_and_dicts_are_json_then_quoted(text_log: io.StringIO) -> None:
    rcpts = ["a@example.org", 'b" x=1@example.org']
    log.event("received", recipients=rcpts, extra={"k": "v w"})
    _, pairs = parse_logfmt(_one_line(text_log))
    assert pairs == [
        ("recipients", json.dumps(rcpts, ensure_ascii=False, separators=(",", ":"))),
        ("extra", '{"k":"v w"}'),
    ]


def test_traceback_stays_on_the_line(text_log: io.StringIO) -> None:
    try:
        raise ValueError("bad\nnext line event=forged")
    except ValueError:
        log.logger.exception("internal_error", extra={"where": "test"})
    (_, level, event), pairs = parse_logfmt(_one_line(text_log))
    assert (level, event) == ("error", "internal_error")
    assert [k for k, _ in pairs] == ["where", "exc_info"]
    assert "ValueError: bad\nnext line event=forged" in dict(pairs)["exc_info"]


def test_json_format_unchanged(json_log: io.StringIO) -> None:
    value = "x event=delivered\n\x1b"
    log.event("rejected", client=value, recipients=["a@b"])
    record = json.loads(_one_line(json_log))
    assert record["event"] == "rejected"
    assert record["level"] == "info"
    assert record["client"] == value
    assert record["recipients"] == ["a@b"]
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT[\d:.]+\+00:00", record["time"])


def test_event_formatter_writes_what_the_stock_formatter_writes() -> None:
    """EventFormatter builds python-json-logger's line its own faster way: the same keys
    in the same order, the same values (the level in lower case), with or without a
    traceback; this fails loudly if a python-json-logger or Python release changes what
    it relies on (a LogRecord's own attributes first in its __dict__)."""
    from pythonjsonlogger.json import JsonFormatter

    stock = JsonFormatter(
        "%(message)s %(levelname)s",
        rename_fields={"message": "event", "levelname": "level"},
        timestamp="time",
        json_ensure_ascii=False,
    )
    ours = log._json_formatter()
    records: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = records.append  # type: ignore[method-assign]
    log.logger.addHandler(handler)
    old_level = log.logger.level
    log.logger.setLevel(logging.INFO)
    try:
        log.event("delivered", queue_id="Q", recipients=["a@b", "ü@x"], attempt=1, delay=0.5)
        try:
            raise ValueError("broken")
        except ValueError:
            log.logger.exception("internal_error", extra={"error": "x"})
    finally:
        log.logger.removeHandler(handler)
        log.logger.setLevel(old_level)
    assert len(records) == 2
    for record in records:
        expected = json.loads(stock.format(record))
        expected["level"] = expected["level"].lower()
        got = json.loads(ours.format(record))
        assert list(got.items()) == list(expected.items())


@pytest.mark.parametrize("name", ["tls_failed", "protocol_error"])
def test_client_failure_events_exist(name: str) -> None:
    assert name in log.EVENTS


def test_a_record_skips_what_no_line_shows(tmp_path: Path) -> None:
    """Thread, process and caller are never shown: setup() has logging skip them."""
    log.setup("info", str(tmp_path / "relay.log"))
    records: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = records.append  # type: ignore[method-assign]
    log.logger.addHandler(handler)
    try:
        log.event("delivered", queue_id="Q")
    finally:
        log.logger.removeHandler(handler)
        log.setup("info")  # the file closes before tmp_path goes
    (record,) = records
    assert (record.thread, record.process, record.lineno) == (None, None, 0)
    assert json.loads((tmp_path / "relay.log").read_text())["queue_id"] == "Q"


def test_a_new_setup_closes_the_log_file_it_replaces(tmp_path: Path) -> None:
    """StreamHandler leaves its stream open; the relay's own file must not leak."""
    log.setup("info", str(tmp_path / "relay.log"))
    replaced = log._handler
    assert isinstance(replaced, log.ReopenableFileHandler)
    stream = replaced.stream
    log.setup("info")
    assert stream.closed


def test_a_line_that_races_a_reload_still_reaches_the_file(tmp_path: Path) -> None:
    """A thread that took the handler before a reload closed it writes after: the
    file is opened again for that line, as logging.FileHandler does."""
    path = tmp_path / "relay.log"
    handler = log.ReopenableFileHandler(str(path))
    handler.close()
    handler.handle(logging.makeLogRecord({"msg": "late line"}))
    handler.close()
    assert path.read_text() == "late line\n"
