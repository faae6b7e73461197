"""What each relay process sets up about itself (Linux, glibc; elsewhere nothing)."""

from __future__ import annotations

import contextlib
import os
import re
import signal
import sys
from collections.abc import Callable


def _libc():  # a ctypes.CDLL
    import ctypes

    return ctypes.CDLL(None, use_errno=True)


def limit_malloc_arenas(arenas: int = 2) -> None:
    """glibc gives threads malloc arenas of their own, up to eight per core: with a
    dozen threads passing 4 KiB messages around, megabytes of RSS for nothing."""
    with contextlib.suppress(OSError, AttributeError):
        _libc().mallopt(-8, arenas)  # M_ARENA_MAX


def release_free_memory() -> None:
    """Give the pages malloc holds free back to the kernel (malloc_trim): what the
    imports and the start-up freed would otherwise stay resident in both processes
    after the fork (about 1 MB of PSS at rest)."""
    with contextlib.suppress(OSError, AttributeError):
        _libc().malloc_trim(0)


def die_with_parent() -> None:
    """Be killed by the kernel when the parent process dies (PR_SET_PDEATHSIG)."""
    with contextlib.suppress(OSError, AttributeError):
        _libc().prctl(1, signal.SIGKILL)


def name_process(name: str) -> None:
    """Set the name ps and top show (/proc/PID/comm, PR_SET_NAME; 15 bytes kept)."""
    with contextlib.suppress(OSError, AttributeError):
        _libc().prctl(15, name.encode()[:15])


def syncfs_call() -> Callable[[int], None] | None:
    """syncfs(2), which makes a whole file system durable at once, where it reports
    write errors (Linux 5.8 and later); None elsewhere. Python has no os.syncfs: one
    there (a later Python, or a test's fault hook) is used first."""
    given = getattr(os, "syncfs", None)
    if given is not None:
        return given
    release = re.match(r"(\d+)\.(\d+)", os.uname().release) if sys.platform == "linux" else None
    if release is None or tuple(map(int, release.groups())) < (5, 8):
        return None
    return libc_syncfs()


def libc_syncfs() -> Callable[[int], None] | None:
    """libc's syncfs, raising OSError as os functions do; None if libc has none."""
    try:
        function = _libc().syncfs
    except (OSError, AttributeError):
        return None
    import ctypes

    function.argtypes = [ctypes.c_int]
    function.restype = ctypes.c_int

    def syncfs(fd: int) -> None:
        if function(fd) != 0:  # ctypes lets go of the GIL meanwhile
            code = ctypes.get_errno()
            raise OSError(code, os.strerror(code))

    return syncfs
