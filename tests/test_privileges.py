"""A root start with `user = ...` (SPEC §6, issue #14 item 4): the spool is handed to the
service user, but only the spool's own directories and the files the relay itself
wrote; nothing a local user placed under drop/, no hard link to a file elsewhere.

Run as root (CI does); skipped otherwise. The service user is `nobody`."""

from __future__ import annotations

import os
import pwd
import shutil
import stat
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from smarthost import privileges
from smarthost.spool import DIRECTORIES, DROP, HOLD, MSG, QUEUE, Envelope, Recipient, Spool, new_id

from support.configs import write_config
from support.waiting import wait_until

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="a root start needs root")

LOCAL_USER = 4242  # a local user who owns no account here: only its numbers matter


@pytest.fixture
def service() -> pwd.struct_passwd:
    try:
        return pwd.getpwnam("nobody")
    except KeyError:
        pytest.skip("no 'nobody' account to run the relay as")


@pytest.fixture
def base() -> Iterator[Path]:
    """A directory the service user can reach (tmp_path's parents are root's alone), on
    one file system with the spool, so that hard links into the spool can be made."""
    path = Path(tempfile.mkdtemp(prefix="smarthost-root-", dir="/var/tmp"))
    path.chmod(0o755)
    yield path
    shutil.rmtree(path, ignore_errors=True)


def root_file(path: Path) -> Path:
    """A root-owned file outside the spool: what must never be handed over."""
    path.write_bytes(b"root's secret\n")
    os.chown(path, 0, 0)
    path.chmod(0o600)
    return path


def owner(path: Path) -> tuple[int, int]:
    st = os.lstat(path)
    return st.st_uid, st.st_gid


def held_message(spool: Spool) -> str:
    """A message the relay wrote as root, held: msg/ID and hold/ID, one file (two links)
    until the envelope changes, as a commit leaves it."""
    env = Envelope(new_id(), "a@client.test", [Recipient("b@dest.test")], time.time())
    spool.commit(env, [b"Subject: held\r\n\r\nhi\r\n"])
    assert spool.move(env.id, QUEUE, HOLD)
    assert os.stat(spool.path(HOLD, env.id)).st_nlink == 2
    return env.id


def test_a_root_start_hands_over_nothing_a_local_user_planted(base, sink, relay_process, service):
    """Hard links to a root-owned file outside the spool, under drop/ (in a
    subdirectory, under a pickup name that gets it quarantined, under any name) and in
    msg/: after two root starts (the second one sees what pickup set aside), the file
    is root's still; the spool's own directories and files are the service user's."""
    secret = root_file(base / "secret")
    path = write_config(base, sink.port)
    path.write_text(f'user = "{service.pw_name}"\n' + path.read_text())
    spool_dir = base / "spool"
    spool = Spool(str(spool_dir))
    spool.create()
    held = held_message(spool)
    drop = spool_dir / DROP
    subdir = drop / "sub"
    subdir.mkdir()
    os.chown(subdir, LOCAL_USER, LOCAL_USER)
    planted = [
        subdir / "link",  # a subdirectory of drop/
        drop / f"{'ab' * 16}.drop",  # a name pickup takes, then sets aside as not a drop
        drop / "any-name",
        spool_dir / MSG / "0123456789ABCDEF",  # content without an envelope: set aside too
    ]
    for link in planted:
        os.link(secret, link)
    assert os.stat(secret).st_nlink == 1 + len(planted)
    lone = drop / "a-users-own-file"  # a local user's file: never handed over either
    lone.write_bytes(b"mine")
    os.chown(lone, LOCAL_USER, LOCAL_USER)

    proc = relay_process(path)
    proc.log_path = base / "relay.log"
    proc.start()
    # Pickup sets aside the .drop link (it has other names) before we stop.
    wait_until(
        lambda: [r for r in proc.records() if r.get("event") == "quarantined"],
        what="pickup to set the planted .drop aside",
    )
    assert owner(secret) == (0, 0), "the first root start handed the planted file over"
    assert proc.stop() == 0
    proc.start()  # the second root start: corrupt/ now holds what pickup set aside
    assert proc.stop() == 0

    assert owner(secret) == (0, 0), "a root start handed the planted file over"
    assert stat.S_IMODE(os.stat(secret).st_mode) == 0o600
    assert owner(subdir) == (LOCAL_USER, LOCAL_USER)
    # Pickup set the user's own file aside (not a drop file): still the user's there.
    (aside,) = [p for p in (spool_dir / "corrupt").iterdir() if p.name.endswith(lone.name)]
    assert owner(aside) == (LOCAL_USER, LOCAL_USER)
    # The spool's own directories and what the relay wrote are the service user's.
    mine = (service.pw_uid, service.pw_gid)
    for name in (*DIRECTORIES, DROP):
        assert owner(spool_dir / name) == mine, name
    assert owner(spool_dir) == mine
    assert owner(spool_dir / MSG / held) == mine  # both names of the held message
    assert owner(spool_dir / HOLD / held) == mine
    assert owner(spool_dir / ".lock") == mine


def test_hand_over_counts_every_name_and_never_follows_one(base, service):
    """hand_over itself: a file changes owner only if all its names are the spool's
    own; links, FIFOs and directories in state directories are left as they are."""
    secret = root_file(base / "secret")
    other_dir = base / "elsewhere"
    other_dir.mkdir()
    spool = Spool(str(base / "spool"))
    spool.create()
    held = held_message(spool)
    root = Path(spool.root)
    (root / "queue" / "LINKTOSECRET0000").symlink_to(secret)
    os.link(secret, root / "corrupt" / "X.message")
    os.link(secret, root / "tmp" / "X.1.env")
    os.mkfifo(root / "tmp" / "fifo")
    (root / "corrupt" / "adir").mkdir()
    os.link(secret, root / "corrupt" / "adir" / "inner")
    (root / "corrupt" / "drop-1-users").write_bytes(b"a user's file, set aside")
    # A state directory swapped for a link: nothing through it.
    (root / "failed").rmdir()
    (root / "failed").symlink_to(other_dir)
    log_file = base / "relay.log"
    log_file.write_text("")

    privileges.hand_over(service, spool.root, str(log_file))

    mine = (service.pw_uid, service.pw_gid)
    assert owner(secret) == (0, 0)
    assert owner(other_dir) == (0, 0)
    assert owner(root / "tmp" / "fifo") == (0, 0)
    assert owner(root / "corrupt" / "adir") == (0, 0)
    assert owner(root / "corrupt" / "drop-1-users") == (0, 0)
    assert owner(root / MSG / held) == mine and owner(root / HOLD / held) == mine
    assert owner(root / "queue") == mine and owner(root) == mine
    assert owner(log_file) == mine


def test_a_hard_linked_log_file_is_refused(base, service):
    secret = root_file(base / "secret")
    spool = Spool(str(base / "spool"))
    spool.create()
    log_file = base / "relay.log"
    os.link(secret, log_file)
    with pytest.raises(privileges.PrivilegeError, match="hard links"):
        privileges.hand_over(service, spool.root, str(log_file))
    assert owner(secret) == (0, 0)
