"""The smarthost commands run as the tests' child processes."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from support import ROOT

# The `smarthost-sendmail` console script's entry point, run as that script runs it.
SENDMAIL_ENTRY = "import sys; from smarthost.cli import sendmail_main; sys.exit(sendmail_main())"


def run_cli(
    *args: str,
    stdin: bytes | None = None,
    timeout: float = 60,
    env: dict[str, str] | None = None,
) -> subprocess.CompletedProcess:
    """`python -m smarthost ARGS` to completion, its output captured: as text, or as
    bytes when `stdin` (bytes) is given."""
    return subprocess.run(
        [sys.executable, "-m", "smarthost", *args],
        input=stdin,
        capture_output=True,
        text=stdin is None,
        timeout=timeout,
        cwd=ROOT,
        env=env,
        check=False,
    )


def queue(config: Path, *args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    """`smarthost -c CONFIG queue ARGS`, output as text."""
    return run_cli("-c", str(config), "queue", *args, timeout=timeout)


def sendmail(config: Path, *args: str, stdin: bytes = b"") -> subprocess.CompletedProcess:
    """`smarthost -c CONFIG sendmail ARGS`, the message on stdin, output as bytes."""
    return run_cli("-c", str(config), "sendmail", *args, stdin=stdin)


def sendmail_entry(
    config: Path, *args: str, stdin: bytes = b"", timeout: float = 60
) -> subprocess.CompletedProcess:
    """The `smarthost-sendmail` console script's entry point, with `-C CONFIG`."""
    return subprocess.run(
        [sys.executable, "-c", SENDMAIL_ENTRY, "-C", str(config), *args],
        input=stdin,
        capture_output=True,
        timeout=timeout,
        cwd=ROOT,
        check=False,
    )


def ok(result: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    """`result`, once it is known to have exited 0."""
    assert result.returncode == 0, (result.returncode, result.stdout, result.stderr)
    return result


def start_drain(config: Path, *args: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "smarthost", "drain", "-c", str(config), *args],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
