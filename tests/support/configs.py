"""Relay configs written to disk for the tests."""

from __future__ import annotations

from pathlib import Path


def write_config(
    tmp_path: Path, sink_port: int, extra: str = "", *, listen: str = "127.0.0.1:0"
) -> Path:
    """A relay config: listen on a free port, spool under tmp_path, forward to the sink."""
    path = tmp_path / "smarthost.toml"
    spool = tmp_path / "spool"
    path.write_text(
        f"""
hostname = "relay.test"
[smtp]
listen = ["{listen}"]
[spool]
dir = "{spool}"
[delivery]
workers = 4
retry_min = "1s"
retry_max = "2s"
connect_timeout = "3s"
timeout = "5s"
[log]
level = "debug"
{extra}
[[backend]]
name = "sink"
host = "127.0.0.1"
port = {sink_port}
tls = "none"
fail_timeout = "1s"
"""
    )
    return path


def edit_config(path: Path, old: str, new: str) -> None:
    """Replace `old` (which must be there) by `new` in the config file at `path`."""
    text = path.read_text()
    assert old in text, f"{old!r} not in the config"
    path.write_text(text.replace(old, new))
