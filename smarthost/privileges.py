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
    """chown the spool tree (not through links) and the log file to the account.

    The whole tree is listed first: once a directory belongs to the account, root
    without CAP_DAC_OVERRIDE (a hardened unit) could no longer look inside it.
    """
    for path in reversed(list(_spool_paths(spool_root))):
        os.chown(path, account.pw_uid, account.pw_gid, follow_symlinks=False)
    if log_file and os.path.exists(log_file):
        os.chown(log_file, account.pw_uid, account.pw_gid)


def _spool_paths(root: str):
    yield root
    for directory, subdirs, files in os.walk(root):
        # The drop area's files belong to the local users who submitted them.
        if os.path.basename(directory) == DROP:
            subdirs.clear()
            continue
        for name in subdirs + files:
            yield os.path.join(directory, name)


def drop_to(account: pwd.struct_passwd) -> None:
    """Become the account for good: groups, gid, then uid (glibc applies it to every
    thread)."""
    os.setgroups([])
    os.setgid(account.pw_gid)
    os.setuid(account.pw_uid)
