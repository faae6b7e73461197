"""Relay configs written to disk for the tests."""

from __future__ import annotations

from pathlib import Path


def relay_settings(
    tmp_path: Path,
    extra: str = "",
    *,
    listen: str = "127.0.0.1:0",
    smtp: str = "",
    workers: int = 4,
    retry_min: str = "1s",
    retry_max: str = "2s",
) -> str:
    """The text of a test config up to its backends: listen on a free port, spool under
    tmp_path, short timeouts, debug log. `smtp`: lines added to [smtp]; `extra`: lines
    after [log]'s level (more [log] keys, then any tables)."""
    return f"""
hostname = "relay.test"
[smtp]
listen = ["{listen}"]
{smtp}
[spool]
dir = "{tmp_path / "spool"}"
[delivery]
workers = {workers}
retry_min = "{retry_min}"
retry_max = "{retry_max}"
connect_timeout = "3s"
timeout = "5s"
[log]
level = "debug"
{extra}
"""


def write_config(
    tmp_path: Path,
    sink_port: int,
    extra: str = "",
    *,
    listen: str = "127.0.0.1:0",
    smtp: str = "",
) -> Path:
    """A relay config (`relay_settings`) that forwards to the sink on `sink_port`."""
    path = tmp_path / "smarthost.toml"
    path.write_text(
        relay_settings(tmp_path, extra, listen=listen, smtp=smtp)
        + f"""[[backend]]
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
