"""Reading the relay's events: captured in-process (`LogCapture`), from a JSON log
(`events_named`), or from a logfmt line (`parse_logfmt`)."""

from __future__ import annotations

import re
import threading
from datetime import datetime
from typing import Any


class LogCapture:
    """Collects the relay's events (the same records the JSON formatter sees)."""

    def __init__(self) -> None:
        self.records: list[dict] = []
        self._lock = threading.Lock()

    def add(self, record: Any) -> None:
        with self._lock:
            self.records.append({"event": record.getMessage(), **record.__dict__})

    def events(self, name: str, **match: Any) -> list[dict]:
        with self._lock:
            return [
                r
                for r in self.records
                if r["event"] == name and all(r.get(k) == v for k, v in match.items())
            ]


_LOGFMT_KEY = re.compile(r"[a-z_][a-z0-9_]*")
_LOGFMT_ESCAPES = {'"': '"', "\\": "\\", "n": "\n", "r": "\r", "t": "\t"}
_LOGFMT_HEX = {"x": 2, "u": 4, "U": 8}


def _logfmt_token(line: str, pos: int) -> tuple[str, int]:
    """One value starting at `pos`: bare up to the next space, or quoted with escapes."""
    if line[pos : pos + 1] != '"':
        end = line.find(" ", pos)
        end = len(line) if end < 0 else end
        bare = line[pos:end]
        assert bare and '"' not in bare and "=" not in bare and "\\" not in bare, bare
        return bare, end
    out, pos = [], pos + 1
    while True:
        char = line[pos]
        if char == '"':
            return "".join(out), pos + 1
        if char != "\\":
            out.append(char)
            pos += 1
            continue
        kind = line[pos + 1]
        if kind in _LOGFMT_ESCAPES:
            out.append(_LOGFMT_ESCAPES[kind])
            pos += 2
        else:
            width = _LOGFMT_HEX[kind]
            out.append(chr(int(line[pos + 2 : pos + 2 + width], 16)))
            pos += 2 + width


def parse_logfmt(line: str) -> tuple[list[str], list[tuple[str, str]]]:
    """`time level event key=value ...` as (the three positional words, the pairs in
    order). Strict: anything a logfmt reader could take two ways fails the test."""
    words = line.split(" ", 3)
    positional, rest = words[:3], words[3] if len(words) > 3 else ""
    pairs, pos = [], 0
    while pos < len(rest):
        key = _LOGFMT_KEY.match(rest, pos)
        assert key and rest[key.end()] == "=", f"no key at {rest[pos:]!r}"
        value, pos = _logfmt_token(rest, key.end() + 1)
        pairs.append((key.group(), value))
        if pos < len(rest):
            assert rest[pos] == " ", f"junk after a value: {rest[pos:]!r}"
            pos += 1
    return positional, pairs


def events_named(records: list[dict], name: str) -> list[dict]:
    """The records of one event, in order (`records`: a relay process's JSON log)."""
    return [r for r in records if r.get("event") == name]


def received_locally(records: list[dict]) -> dict[str, float]:
    """Message-ID → when (epoch seconds) the relay took in each message submitted
    locally (its `received` event with client "local")."""
    return {
        r["message_id"]: datetime.fromisoformat(r["time"]).timestamp()
        for r in records
        if r.get("event") == "received" and r.get("client") == "local"
    }
