"""Local submission as the tests see it: messages as a local program writes them, the
drop area and its files, waiting for a message at the sink by what it says."""

from __future__ import annotations

import email
import email.policy
import json
import os
import pwd
import secrets
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from support.configs import write_config
from support.sink import Received, Sink

DROP_MAGIC = b"SMARTHOST-DROP 1\n"
PROMPT = 5.0  # "at once": well below the pickup's and the scheduler's 10 s rescans


# -- helpers --------------------------------------------------------------------------


def token() -> str:
    return secrets.token_hex(6)


def message(subject: str, *headers: str, body: str = "hello\n") -> bytes:
    """A message as a local program writes it: LF line ends."""
    return ("".join(f"{h}\n" for h in (*headers, f"Subject: {subject}")) + "\n" + body).encode()


def parsed(received: Received) -> email.message.Message:
    return email.message_from_bytes(received.content, policy=email.policy.compat32)


def header_section(content: bytes) -> bytes:
    return content.split(b"\r\n\r\n", 1)[0]


def wait_message(
    sink: Sink, match: Callable[[Received], bool], timeout: float = PROMPT, what: str = "message"
) -> Received:
    """The first message at the sink that `match`es, waiting up to `timeout`."""
    with sink.handler.cond:
        found = sink.handler.cond.wait_for(
            lambda: next((m for m in sink.messages if match(m)), None), timeout
        )
    if found is None:
        pytest.fail(f"no {what} at the sink within {timeout}s; it has {len(sink.messages)}")
    return found


def absent_for(sink: Sink, match: Callable[[Received], bool], seconds: float) -> bool:
    """True if no message `match`es for `seconds` (a bounded absence check)."""
    with sink.handler.cond:
        return not sink.handler.cond.wait_for(lambda: any(match(m) for m in sink.messages), seconds)


def subject_is(subject: str) -> Callable[[Received], bool]:
    return lambda m: f"Subject: {subject}".encode() in header_section(m.content)


def drop_dir(tmp_path: Path) -> Path:
    return tmp_path / "spool" / "drop"


def drop_files(tmp_path: Path) -> list[Path]:
    """Complete submissions in the drop area (not the .tmp- files being written)."""
    directory = drop_dir(tmp_path)
    if not directory.is_dir():
        return []
    return sorted(p for p in directory.iterdir() if not p.name.startswith(".tmp-"))


def read_drop(path: Path) -> tuple[dict, bytes]:
    """(the record, the message) of a drop file."""
    data = path.read_bytes()
    assert data.startswith(DROP_MAGIC), data[:64]
    record, content = data[len(DROP_MAGIC) :].split(b"\n", 1)
    return json.loads(record), content


def only_drop(tmp_path: Path) -> tuple[dict, bytes]:
    files = drop_files(tmp_path)
    assert len(files) == 1, files
    return read_drop(files[0])


def spool_names(tmp_path: Path) -> list[str]:
    """Every path under the spool, relative to it."""
    root = tmp_path / "spool"
    return [str(p.relative_to(root)) for p in root.rglob("*")]


def config_with(tmp_path: Path, sink: Sink, extra: str = "", **replace: str) -> Path:
    """write_config, then each `old=new` pair of `replace` applied to its text."""
    path = write_config(tmp_path, sink.port, extra)
    text = path.read_text()
    for old, new in replace.values():
        assert old in text, old
        text = text.replace(old, new)
    path.write_text(text)
    return path


def user() -> str:
    return pwd.getpwuid(os.getuid()).pw_name


def hostile_name() -> str:
    """A name the pickup takes for a drop file."""
    return secrets.token_hex(16) + ".drop"


def drop_file(sender: str, recipients: list[str], content: bytes) -> bytes:
    """A drop file as smarthost-sendmail writes one (its format: smarthost.drop)."""
    record = json.dumps({"sender": sender, "recipients": recipients, "time": time.time()})
    return DROP_MAGIC + record.encode() + b"\n" + content.replace(b"\n", b"\r\n")


def dsn_about(subject: str) -> Callable[[Received], bool]:
    """A DSN (null sender) that returns the message with this subject."""
    return lambda m: m.mail_from == "" and f"Subject: {subject}".encode() in m.content


def dsn_text(received: Received) -> str:
    return received.content.decode("utf-8", "replace")


def hops(count: int) -> list[str]:
    """`count` Received: fields, as a message that went round in circles has them."""
    date = "Mon, 1 Jan 2026 00:00:00 +0000"
    return [
        f"Received: from h{n}.client.test by h{n + 1}.client.test; {date}" for n in range(count)
    ]


def place_in_drop(drop: Path, name: str, content: bytes | Callable[[Path], None]) -> None:
    """Create an entry as `.tmp-...` (`content`: its bytes, or a function that creates it
    at the path given), then rename it to `name` inside drop/: atomic (never seen
    half-written) and a move event that wakes the pickup."""
    tmp = drop / f".tmp-{secrets.token_hex(8)}"
    if callable(content):
        content(tmp)
    else:
        tmp.write_bytes(content)
    os.rename(tmp, drop / name)
