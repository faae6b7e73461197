"""`smarthost.drop`, the drop area's format, as `queue list` reads it: submissions listed
from their records alone, bad entries named, never an exception."""

from __future__ import annotations

import os
import secrets
import time
from pathlib import Path

from smarthost import drop
from smarthost.spool import Spool

from support.cli import ok, sendmail
from support.configs import write_config
from support.local import (
    DROP_MAGIC,
    drop_dir,
    hostile_name,
    message,
    read_drop,
    token,
    user,
)

HOSTNAME = "relay.test"  # write_config's hostname


def test_drop_list_entries_lists_submissions_and_names_garbage(tmp_path: Path) -> None:
    """`drop.list_entries`, what `queue list` shows as state `dropped`: every readable
    submission from its record alone, and each bad entry named; never an exception."""
    cfg = write_config(tmp_path, 1)
    first, second = token(), token()
    ok(sendmail(cfg, "-i", "-f", "bob@client.test", "x@dest.test", "y@dest.test",
                stdin=message(first)))  # fmt: skip
    ok(sendmail(cfg, "-i", "z@dest.test", stdin=message(second, body="b" * 300_000 + "\n")))
    directory = drop_dir(tmp_path)
    bad = {name: hostile_name() for name in ("symlink", "fifo", "dir", "truncated", "garbage")}
    os.symlink("/etc/passwd", directory / bad["symlink"])
    os.mkfifo(directory / bad["fifo"])
    (directory / bad["dir"]).mkdir()
    (directory / bad["truncated"]).write_bytes(DROP_MAGIC + b'{"sender": "a@b", "recip')
    (directory / bad["garbage"]).write_bytes(b"\x00" * 64)
    (directory / "not-a-drop-name").write_bytes(b"x")
    (directory / f".tmp-{secrets.token_hex(16)}").write_bytes(b"being written")

    listing = drop.list_entries(Spool(str(tmp_path / "spool")))
    assert [e.recipients for e in listing.entries] == [
        ["x@dest.test", "y@dest.test"],
        ["z@dest.test"],
    ]
    one, two = listing.entries
    assert (one.sender, two.sender) == ("bob@client.test", f"{user()}@{HOSTNAME}")
    assert one.owner == user() and one.id + ".drop" == one.name and len(one.id) == 32
    assert abs(one.arrival - time.time()) < 60 and one.arrival <= two.arrival
    _, content = read_drop(directory / two.name)
    assert two.size == len(content) > 300_000
    problems = dict(listing.problems)
    assert sorted(problems) == sorted([*bad.values(), "not-a-drop-name"]), problems
    assert "cannot open" in problems[bad["symlink"]]
    assert "not a regular file" in problems[bad["fifo"]]
    assert "truncated" in problems[bad["truncated"]]
    # A drop area that does not exist yet is empty, not an error.
    assert drop.list_entries(Spool(str(tmp_path / "nowhere"))) == drop.Listing()
