"""What each relay process sets up about itself (Linux, glibc; elsewhere nothing)."""

from __future__ import annotations

import contextlib
import signal


def _libc():  # a ctypes.CDLL
    import ctypes

    return ctypes.CDLL(None, use_errno=True)


def limit_malloc_arenas(arenas: int = 2) -> None:
    """glibc gives threads malloc arenas of their own, up to eight per core: with a
    dozen threads passing 4 KiB messages around, megabytes of RSS for nothing."""
    with contextlib.suppress(OSError, AttributeError):
        _libc().mallopt(-8, arenas)  # M_ARENA_MAX


def die_with_parent() -> None:
    """Be killed by the kernel when the parent process dies (PR_SET_PDEATHSIG)."""
    with contextlib.suppress(OSError, AttributeError):
        _libc().prctl(1, signal.SIGKILL)
