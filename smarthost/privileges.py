"""Running as the service user (`user = ...`): ports bound as root, then root is dropped.

Before dropping, the spool (and the log file) are handed to that user, so that a spool
first created by root, or by an earlier run as root, stays usable: only what the relay
itself made, never what a local user placed (see `hand_over`).
"""

from __future__ import annotations

import errno
import os
import pwd
import stat

from .spool import CORRUPT, DIRECTORIES, DROP


class PrivilegeError(Exception):
    """The service account is missing, or root is needed to become it."""


def service_account(user: str | None) -> pwd.struct_passwd | None:
    """The account to run as, or None when the relay stays who it is."""
    if not user:
        return None
    try:
        account = pwd.getpwnam(user)
    except KeyError:
        raise PrivilegeError(f"user: no such account {user!r}") from None
    if os.geteuid() == account.pw_uid:
        return None  # already that user (e.g. systemd's User=)
    if os.geteuid() != 0:
        raise PrivilegeError(f"user: only root can become {user!r}")
    return account


def hand_over(account: pwd.struct_passwd, spool_root: str, log_file: str | None) -> None:
    """chown the spool's own directories and files, and the log file, to the account.

    Only what the relay itself made: the spool's root, its state directories (the drop
    area's directory itself, never anything in it: that is the local users'), and the
    regular files in them, except what pickup set aside from the drop area (corrupt/
    drop-*). Nothing in a subdirectory a state directory should not have. A file
    changes owner only if every name it has is one of those (one link, or the names
    msg/ID and queue/ID that a commit gives one file): a hard link to a file elsewhere
    (planted by a local user, or by a subverted service account to get it at the next
    root start) keeps its owner. Each is opened without following links, checked on
    its descriptor to be the file that was counted, and changed through it (fchown),
    so that a name swapped meanwhile changes nothing. A directory's entries are done
    before the directory itself: root without CAP_DAC_OVERRIDE (a hardened unit) never
    needs to enter a directory it has given away.
    """
    uid, gid = account.pw_uid, account.pw_gid
    root_fd = os.open(spool_root, os.O_RDONLY | os.O_DIRECTORY)
    try:
        dirs: list[tuple[str, int, list[tuple[str, os.stat_result]]]] = []
        try:
            names: dict[tuple[int, int], int] = {}  # (dev, ino) of a file with links: its names
            for name in (*DIRECTORIES, DROP, ""):
                fd = root_fd if not name else _open_dir(root_fd, name)
                if fd is None:
                    continue
                files = [] if name == DROP else _own_files(fd, name)
                dirs.append((name, fd, files))
                for _, st in files:
                    if st.st_nlink > 1:
                        key = (st.st_dev, st.st_ino)
                        names[key] = names.get(key, 0) + 1
            for _, fd, files in dirs:
                for filename, st in files:
                    if st.st_nlink == 1 or names.get((st.st_dev, st.st_ino)) == st.st_nlink:
                        _chown_file(fd, filename, st, uid, gid)
                _fchown(fd, uid, gid)  # the directory itself, after its files
        finally:
            for _, fd, _ in dirs:
                if fd != root_fd:
                    os.close(fd)
    finally:
        os.close(root_fd)
    if log_file and os.path.lexists(log_file):
        _chown_log_file(log_file, uid, gid)


# Pickup renames what it sets aside from drop/ to corrupt/drop-TIME-NAME: a local
# user's file, or link, or directory.
_FROM_DROP = "drop-"


def _open_dir(parent_fd: int, name: str) -> int | None:
    """One of the spool's directories, never through a link (None if it is not one)."""
    try:
        fd = os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=parent_fd)
    except (FileNotFoundError, NotADirectoryError):
        return None
    except OSError as exc:
        if exc.errno == errno.ELOOP:  # a symbolic link where a directory should be
            return None
        raise
    return fd


def _own_files(dir_fd: int, dirname: str) -> list[tuple[str, os.stat_result]]:
    """The regular files in a spool directory (not following links), with their lstat;
    in the root, the relay's lock files."""
    found = []
    with os.scandir(dir_fd) as entries:
        for entry in entries:
            if dirname == CORRUPT and entry.name.startswith(_FROM_DROP):
                continue
            try:
                st = entry.stat(follow_symlinks=False)
            except FileNotFoundError:
                continue
            if stat.S_ISREG(st.st_mode):
                found.append((entry.name, st))
    return found


def _chown_file(dir_fd: int, name: str, seen: os.stat_result, uid: int, gid: int) -> None:
    """fchown the file `name` if it is still the regular file that was counted."""
    if (seen.st_uid, seen.st_gid) == (uid, gid):
        return
    flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC
    try:
        fd = os.open(name, flags, dir_fd=dir_fd)
    except OSError as exc:
        if exc.errno in (errno.ENOENT, errno.ELOOP, errno.EACCES, errno.ENXIO):
            return  # gone, now a link or a FIFO, or unreadable: not known to be ours
        raise
    try:
        now = os.fstat(fd)
        same = (now.st_dev, now.st_ino, now.st_nlink) == (seen.st_dev, seen.st_ino, seen.st_nlink)
        if same and stat.S_ISREG(now.st_mode):
            os.fchown(fd, uid, gid)
    finally:
        os.close(fd)


def _fchown(fd: int, uid: int, gid: int) -> None:
    st = os.fstat(fd)
    if (st.st_uid, st.st_gid) != (uid, gid):
        os.fchown(fd, uid, gid)


def _chown_log_file(path: str, uid: int, gid: int) -> None:
    """The log file, if it is a regular file with no other name (a symbolic link or a
    hard link is refused: it would hand its target to the account)."""
    flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC
    try:
        fd = os.open(path, flags)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise PrivilegeError(
                f"log.file: {path} is a symbolic link; refusing to chown it"
            ) from None
        raise
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            return  # a FIFO or a device: not a file to own
        if st.st_nlink != 1:
            raise PrivilegeError(
                f"log.file: {path} has other names (hard links); refusing to chown it"
            )
        _fchown(fd, uid, gid)
    finally:
        os.close(fd)


def drop_to(account: pwd.struct_passwd) -> None:
    """Become the account for good: groups, gid, then uid (glibc applies it to every
    thread)."""
    os.setgroups([])
    os.setgid(account.pw_gid)
    os.setuid(account.pw_uid)
