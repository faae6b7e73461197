"""Running as the service user (`user = ...`): ports bound as root, then root is dropped.

Before dropping, the spool (and the log file) are handed to that user, so that a spool
first created by root, or by an earlier run as root, stays usable.
"""

from __future__ import annotations

import os
import pwd

from .spool import DROP


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
    """chown the spool tree and the log file to the account, never through a link.

    Bottom-up, by file descriptor: a directory already handed over cannot be swapped
    for a link to somewhere else, and root without CAP_DAC_OVERRIDE (a hardened unit)
    never needs to enter a directory it has given away.
    """
    uid, gid = account.pw_uid, account.pw_gid
    for directory, subdirs, files, dir_fd in os.fwalk(spool_root, topdown=False):
        # The drop area's files belong to the local users who submitted them.
        names = subdirs if os.path.basename(directory) == DROP else subdirs + files
        for name in names:
            os.chown(name, uid, gid, dir_fd=dir_fd, follow_symlinks=False)
    os.chown(spool_root, uid, gid, follow_symlinks=False)
    if log_file and os.path.lexists(log_file):
        if os.path.islink(log_file):
            raise PrivilegeError(f"log.file: {log_file} is a symbolic link; refusing to chown it")
        os.chown(log_file, uid, gid, follow_symlinks=False)


def drop_to(account: pwd.struct_passwd) -> None:
    """Become the account for good: groups, gid, then uid (glibc applies it to every
    thread)."""
    os.setgroups([])
    os.setgid(account.pw_gid)
    os.setuid(account.pw_uid)
