"""JSON-lines logging: the one list of event names and the one way to emit them.

Every outcome in the relay is one log record whose message is the event name and
whose extra fields (queue_id, sender, backend, reply, ...) become JSON keys, so a
message's whole life can be followed with `jq 'select(.queue_id == "...")'`.
"""

from __future__ import annotations

import itertools
import json
import logging
import os
import sys
import threading
import time
from collections.abc import Callable, Iterable
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any

from pythonjsonlogger.json import JsonEncoder, JsonFormatter

if TYPE_CHECKING:
    from .config import Config

LOGGER_NAME = "smarthost"

# SPEC §8. Events are names, not prose: tools match on them.
EVENTS = frozenset(
    {
        "started",
        "stopping",
        "stopped",
        "received",
        "delivered",
        "deferred",
        "failed",
        "expired",
        "dsn_queued",
        "double_bounce",
        "backend_down",
        "backend_up",
        "oauth2_failed",
        "oauth2_renewed",
        "rejected",
        "config_reloaded",
        "spool_error",
        "quarantined",
        "library",
        "internal_error",
        "released",
        "rewritten",
        "flushed",
        "held",
        "deleted",
        "auth_failed",
        "config_warning",
        "tls_failed",
        "protocol_error",
        "draining",
        "queue_scanned",
        "fleet_degraded",
        "fleet_restored",
    }
)

# Keys that would leak secrets must never reach a log line, even by mistake.
_FORBIDDEN_KEYS = frozenset({"password", "secret", "auth_data", "login_data", "token"})

logger = logging.getLogger(LOGGER_NAME)

# Called with every event, whatever the log level (metrics count events that an
# operator may not want logged); None unless metrics are on (see metrics.py).
_observer: Callable[[str, dict[str, Any]], None] | None = None


def observe(observer: Callable[[str, dict[str, Any]], None] | None) -> None:
    """Have `observer(name, fields)` see every event from now on (None: no one)."""
    global _observer
    _observer = observer


def rfc3339(timestamp: float) -> str:
    """A time in the same form as each log line's `time`."""
    return datetime.fromtimestamp(timestamp, timezone.utc).isoformat()


def event(name: str, level: int = logging.INFO, **fields: Any) -> None:
    """Log the event `name` with `fields` as JSON keys (None values are dropped)."""
    if name not in EVENTS:
        raise ValueError(f"unknown log event {name!r}")
    if _observer is not None:
        _observer(name, fields)
    if not logger.isEnabledFor(level):
        return
    extra = {k: v for k, v in fields.items() if v is not None and k not in _FORBIDDEN_KEYS}
    logger.log(level, name, extra=extra)


# Characters a logfmt value cannot hold bare: a separator, the quote, the key/value
# sign and the escape character (control characters are caught by isprintable()).
_NEEDS_QUOTES = frozenset(' "=\\')
_SHORT_ESCAPES = {'"': '\\"', "\\": "\\\\", "\n": "\\n", "\r": "\\r", "\t": "\\t"}


def _escape_char(char: str) -> str:
    if char in _SHORT_ESCAPES:
        return _SHORT_ESCAPES[char]
    if char.isprintable():
        return char
    # Control, format, separator and lone surrogate characters: visible, and no
    # terminal escape sequence or line break reaches the reader.
    code = ord(char)
    if code < 0x100:
        return f"\\x{code:02x}"
    if code < 0x10000:
        return f"\\u{code:04x}"
    return f"\\U{code:08x}"


def logfmt_value(value: Any) -> str:
    """`value` as one logfmt token: bare if it is safe, else double-quoted and escaped,
    so that a client-supplied string can never add a field or a line (SPEC §8)."""
    if isinstance(value, (list, tuple, dict)):
        text = json.dumps(value, ensure_ascii=False, default=str, separators=(",", ":"))
    else:
        text = str(value)
    if text and not any(c in _NEEDS_QUOTES or not c.isprintable() for c in text):
        return text
    return '"' + "".join(_escape_char(c) for c in text) + '"'


# A LogRecord's own attributes come first in its __dict__, the event's fields after
# (then what formatting adds: the message, which is the event's name).
_STANDARD_ATTRIBUTES = frozenset(vars(logging.makeLogRecord({})))
_RECORD_ATTRIBUTES = len(_STANDARD_ATTRIBUTES)
_FORMATTED = frozenset({"message", "asctime"})


class TextFormatter(logging.Formatter):
    """`time level event key=value ...` (logfmt) for people who read logs without jq.

    Keys and event names are the relay's own; every value is escaped by logfmt_value,
    and a traceback becomes the quoted `exc_info` field, so one record is one line.
    """

    # The line ends in `Z`: the time must be UTC, not the host's local time. Annotated
    # as on logging.Formatter, for mypy: a plain function, not a method (a builtin such
    # as time.gmtime is never bound to `self`).
    converter: Callable[[float | None], time.struct_time] = time.gmtime

    def format(self, record: logging.LogRecord) -> str:
        when = self.formatTime(record, "%Y-%m-%dT%H:%M:%S")
        parts = [f"{when}Z", record.levelname.lower(), logfmt_value(record.getMessage())]
        parts.extend(
            f"{k}={logfmt_value(v)}"
            for k, v in vars(record).items()
            if k not in _STANDARD_ATTRIBUTES and k not in _FORMATTED
        )
        if record.exc_info:
            parts.append(f"exc_info={logfmt_value(self.formatException(record.exc_info))}")
        if record.stack_info:
            parts.append(f"stack_info={logfmt_value(self.formatStack(record.stack_info))}")
        return " ".join(parts)


class EventFormatter(JsonFormatter):
    """python-json-logger's formatter with its fields put together in one pass, in the
    order it would give them: `event`, `level` (lower case, like `log.level`), the
    event's own fields, `time`. The time is a string already (RFC 3339, UTC), so the
    encoder never falls back to its per-object hook, and one encoder serves every line:
    a line costs about half as much.
    """

    def add_fields(
        self, log_data: dict[str, Any], record: logging.LogRecord, message_dict: dict[str, Any]
    ) -> None:
        log_data["event"] = record.message
        log_data["level"] = record.levelname.lower()
        log_data.update(message_dict)  # exc_info, stack_info
        fields: Iterable[tuple[str, Any]] = record.__dict__.items()
        if type(record) is logging.LogRecord:  # its own attributes first: skip them
            fields = itertools.islice(fields, _RECORD_ATTRIBUTES, None)
        else:  # a factory's subclass may add or order attributes otherwise
            fields = ((k, v) for k, v in fields if k not in _STANDARD_ATTRIBUTES)
        for key, value in fields:
            if key not in _FORMATTED and not key.startswith("_"):
                log_data[key] = value
        log_data["time"] = rfc3339(record.created)


_ENCODER = JsonEncoder(ensure_ascii=False)  # python-json-logger's: it encodes what JSON lacks


def _serialize(log_data: dict[str, Any], **options: Any) -> str:
    return _ENCODER.encode(log_data)


def _json_formatter() -> logging.Formatter:
    return EventFormatter(
        "%(message)s %(levelname)s",
        rename_fields={"message": "event", "levelname": "level"},
        json_serializer=_serialize,
    )


class _LibraryRecords(logging.Filter):
    """Warnings from libraries (aiosmtpd, watchdog) become `library` events, so the
    log stays one JSON object per line with an event name tools can match."""

    def filter(self, record: logging.LogRecord) -> bool:
        if not record.name.startswith(LOGGER_NAME):
            record.detail = record.getMessage()
            record.source = record.name
            record.msg, record.args = "library", ()
        return True


class _Node(logging.Filter):
    """In a fleet, every line names the relay that wrote it (SPEC §8)."""

    def __init__(self, node: str) -> None:
        super().__init__()
        self.node = node

    def filter(self, record: logging.LogRecord) -> bool:
        record.node = self.node
        return True


class ReopenableFileHandler(logging.StreamHandler):
    """Appends to a file and reopens it on demand (SIGHUP after logrotate)."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._reopen_lock = threading.Lock()
        super().__init__(self._open())

    def _open(self):
        # Not through a link: the relay may open it as root, in a directory the service
        # user can write.
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW, 0o640)
        return open(fd, "a", encoding="utf-8", buffering=1)

    def reopen(self) -> None:
        """A new file at the same path; if it cannot be opened, the old one stays."""
        with self._reopen_lock:
            new = self._open()
            old, self.stream = self.stream, new
            if old is not None:
                old.close()

    def emit(self, record: logging.LogRecord) -> None:
        if self.stream is None:  # a line that raced a reload's close: reopen, as FileHandler does
            with self._reopen_lock:
                if self.stream is None:
                    self.stream = self._open()
        super().emit(record)

    def close(self) -> None:
        # StreamHandler leaves its stream open (it may be stderr); this file is ours.
        with self.lock, self._reopen_lock:  # type: ignore[union-attr]
            try:
                if self.stream is not None:
                    self.flush()
                    self.stream.close()
            finally:
                self.stream = None
                super().close()


_handler: logging.Handler | None = None


def setup_for(config: Config) -> None:
    """setup() as `[log]` says, with `node` on every line when `[fleet]` is on."""
    setup(config.log.level, config.log.file, config.log.format, config.fleet.member)


def setup(
    level: str = "info", file: str | None = None, fmt: str = "json", node: str | None = None
) -> None:
    """Send the relay's events to stderr or `file` as JSON lines (or text)."""
    global _handler
    handler: logging.Handler = (
        ReopenableFileHandler(file) if file else logging.StreamHandler(sys.stderr)
    )
    handler.addFilter(_LibraryRecords())
    if node is not None:
        handler.addFilter(_Node(node))
    if fmt == "json":
        handler.setFormatter(_json_formatter())
    else:
        handler.setFormatter(TextFormatter())
    root = logging.getLogger()
    if _handler is not None:
        root.removeHandler(_handler)
        _handler.close()
    _handler = handler
    # The root logger carries library warnings; our own events pass through it too.
    root.addHandler(handler)
    root.setLevel(logging.WARNING)
    logger.setLevel(level.upper())
    # aiosmtpd logs every session at INFO.
    logging.getLogger("mail.log").setLevel(logging.WARNING)
    # watchdog 7 logs an ERROR for a race in its own shutdown (emitter read after stop).
    logging.getLogger("watchdog").setLevel(logging.CRITICAL)
    _skip_what_no_line_shows()


def _skip_what_no_line_shows() -> None:
    """No line shows a record's thread, process or source line: not computing them
    takes a fifth off each event (the "Optimization" section of the logging HOWTO)."""
    logging.logThreads = False
    logging.logProcesses = False
    logging.logMultiprocessing = False
    logging._srcfile = None  # no findCaller() per record


def reopen() -> None:
    """Reopen the log file, if logging goes to one."""
    if isinstance(_handler, ReopenableFileHandler):
        _handler.reopen()
