"""Fault injection inside a real relay process, without touching smarthost/.

`serve` runs as two processes: the relay (listeners, commits of received mail) and the
delivery process it forks (named ``smarthost-deliv`` in /proc/PID/comm; a replacement
of it is spawned, ``python -c "...delivery_main()"``: scheduler, claims, sending,
requeue, DSNs, pickup), which inherits the environment and, when forked, this hook: an
at-fork handler then makes it the delivery role, with counters of its own. So the hook is put in
by ``site/sitecustomize.py``: with ``tests/faults/site`` and ``tests`` on PYTHONPATH and
``$SMARTHOST_FAULTS`` set, every interpreter started with that environment (the relay,
its delivery process and any replacement of it, a queue command) wraps the ``os``
functions the spool uses before smarthost is imported. (The venv has no sitecustomize
of its own to shadow it; ``python -m faults ARGS...`` is the same without the site dir.)

Rules come from ``$SMARTHOST_FAULTS``: inline JSON (a list of rules, or one rule), or
the path of a JSON file that the test may rewrite while the process runs (it is
re-read when it changes, and every rule's counter starts again). Each rule::

    {"op": "rename",            # or a list: open write read fsync syncfs rename link
                                # unlink utime chmod mkdir
     "path": "/tmp/.*\\.env$",  # regex searched in the path (rename, link: the source)
     "dst": "/queue/",          # rename and link only: regex searched in the destination
     "nth": 1,                  # fire at the nth matching call (counting from 1) ...
     "count": 1,                # ... and on this many matching calls from there (0: all)
     "action": "kill",          # kill (SIGKILL), ENOSPC, EIO, EROFS, or pause
     "when": "before",          # before the call, or after it (it took effect)
     "partial": false,          # write only: write the first half, then act
     "while_exists": null,      # a path: the rule is live only while this file exists
     "pause_file": null,        # pause: wait until this file exists, then go on
     "process": "any"}          # relay, delivery (the child of serve) or any

"read" is a read of a binary file opened with ``os.fdopen``: how the spool hands a
message's content to the sender, which streams it a block at a time (so "nth" counts
blocks, and a kill there lands in the middle of DATA to the upstream); ``os.read`` is
not wrapped.

A process counts its matching calls itself (the relay's commit of a message and the
delivery process's commit of its DSN are each the 1st in its own process). "kill" kills
the whole relay, as a crash of the machine or the service would: the delivery process
kills its parent then itself, the relay its delivery processes then itself (they would
follow by PR_SET_PDEATHSIG anyway). A queue command kills only itself.

Where the relay has syncfs(2) it commits every batch with it (the spool's choice of
per-file fsyncs, when they seem cheaper, is taken away), so a rule naming syncfs
meets one at every commit.

Every fault that fires (and the installation itself) is appended as one JSON line to
``$SMARTHOST_FAULTS_LOG``, so a test can tell that the hook ran and where it struck.
"""

from __future__ import annotations

import errno
import io
import json
import os
import re
import signal
import sys
import threading
import time
from typing import Any

from support.procs import parent_pid  # builtin open only: nothing it does is wrapped

ENV_RULES = "SMARTHOST_FAULTS"
ENV_LOG = "SMARTHOST_FAULTS_LOG"

_real = {
    name: getattr(os, name)
    for name in (
        "open",
        "close",
        "write",
        "fsync",
        "fdatasync",
        "rename",
        "replace",
        "link",
        "unlink",
        "utime",
        "chmod",
        "mkdir",
        "fdopen",
        "stat",
        "kill",
        "getpid",
        "getppid",
    )
}
ROLES = ("relay", "delivery")


def _cmdline(pid: int | str = "self") -> bytes:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:  # builtin open: not os.open
            return f.read()
    except OSError:
        return b""


DELIVERY_NAME = b"smarthost-deliv"  # delivery_process.PROCESS_NAME, set once it runs


def _role() -> str:
    """delivery in serve's spawned child (`python -c "...delivery_main()" FDS`), else
    relay (a forked child becomes delivery through `_forked`)."""
    cmdline = _cmdline()
    if cmdline:
        return "delivery" if b"delivery_main" in cmdline else "relay"
    return "delivery" if sys.argv[:1] == ["-c"] else "relay"


def is_delivery_process(pid: int | str) -> bool:
    """A delivery process of serve, forked (its name) or spawned (its command line)."""
    try:
        with open(f"/proc/{pid}/comm", "rb") as f:  # builtin open: not os.open
            if f.read().strip() == DELIVERY_NAME:
                return True
    except OSError:
        return False
    return b"delivery_main" in _cmdline(pid)


ROLE = _role()
_ERRNOS = {"ENOSPC": errno.ENOSPC, "EIO": errno.EIO, "EROFS": errno.EROFS, "EDQUOT": errno.EDQUOT}


class _Rule:
    def __init__(self, index: int, raw: dict[str, Any]) -> None:
        ops = raw.get("op", [])
        self.index = index
        self.ops = {ops} if isinstance(ops, str) else set(ops)
        self.path = re.compile(raw["path"]) if raw.get("path") else None
        self.dst = re.compile(raw["dst"]) if raw.get("dst") else None
        self.nth = int(raw.get("nth", 1))
        self.count = int(raw.get("count", 1))
        self.action = raw.get("action", "kill")
        self.when = raw.get("when", "before")
        self.partial = bool(raw.get("partial", False))
        self.while_exists = raw.get("while_exists")
        self.pause_file = raw.get("pause_file")
        self.process = raw.get("process", "any")
        self.seen = 0
        if self.process not in (*ROLES, "any"):
            raise ValueError(f"unknown fault process {self.process!r}")
        if self.action not in ("kill", "pause") and self.action not in _ERRNOS:
            raise ValueError(f"unknown fault action {self.action!r}")
        if self.when not in ("before", "after"):
            raise ValueError(f"unknown fault moment {self.when!r}")

    def matches(self, op: str, path: str, dst: str | None) -> bool:
        if op not in self.ops or self.process not in ("any", ROLE):
            return False
        if self.path is not None and not self.path.search(path):
            return False
        if self.dst is not None and (dst is None or not self.dst.search(dst)):
            return False
        if self.while_exists is not None and not _exists(self.while_exists):
            return False
        self.seen += 1
        if self.seen < self.nth:
            return False
        return self.count == 0 or self.seen < self.nth + self.count


def _exists(path: str) -> bool:
    try:
        _real["stat"](path)
    except OSError:
        return False
    return True


class _Faults:
    def __init__(self, source: str, log_path: str | None) -> None:
        self.source = source
        self.log_path = log_path
        self.lock = threading.Lock()
        self.rules: list[_Rule] = []
        self.stamp: tuple[int, int, int] | None = None
        self.fds: dict[int, str] = {}
        self.local = threading.local()
        self.inline = source.lstrip().startswith(("[", "{"))
        if self.inline:
            self._load(source)

    # -- rules ---------------------------------------------------------------

    def _load(self, text: str) -> None:
        raw = json.loads(text) if text.strip() else []
        if isinstance(raw, dict):
            raw = [raw]
        self.rules = [_Rule(i, r) for i, r in enumerate(raw)]

    def _refresh(self) -> None:
        if self.inline:
            return
        try:
            st = _real["stat"](self.source)
            stamp = (st.st_ino, st.st_mtime_ns, st.st_size)
        except OSError:
            stamp = None
        if stamp == self.stamp:
            return
        self.stamp = stamp
        if stamp is None:
            self.rules = []
            return
        with open(self.source, encoding="utf-8") as f:  # builtin open: not os.open
            self._load(f.read())

    # -- the log -------------------------------------------------------------

    def record(self, **fields: Any) -> None:
        if not self.log_path:
            return
        head = {"pid": _real["getpid"](), "ppid": _real["getppid"](), "role": ROLE}
        line = (json.dumps({**head, "time": time.time(), **fields}) + "\n").encode()
        fd = _real["open"](self.log_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        try:
            _real["write"](fd, line)
        finally:
            _real["close"](fd)

    # -- the check every wrapped call makes -----------------------------------

    def check(self, op: str, path: Any, dst: Any = None) -> _Rule | None:
        if getattr(self.local, "busy", False):
            return None
        self.local.busy = True
        try:
            path = self.fds.get(path, f"<fd {path}>") if isinstance(path, int) else path
            path = os.fsdecode(path) if path is not None else ""
            dst = os.fsdecode(dst) if dst is not None else None
            with self.lock:
                self._refresh()
                for rule in self.rules:
                    if rule.matches(op, path, dst):
                        self.record(rule=rule.index, op=op, path=path, dst=dst, action=rule.action)
                        rule.fired_path = path  # type: ignore[attr-defined]
                        return rule
            return None
        finally:
            self.local.busy = False

    def strike(self, rule: _Rule, op: str, path: Any) -> None:
        """Do what the rule says: die, raise, or wait."""
        if rule.action == "kill":
            _kill_the_relay()
        if rule.action == "pause":
            while rule.pause_file and not _exists(rule.pause_file):
                time.sleep(0.01)
            return
        code = _ERRNOS[rule.action]
        if isinstance(path, int):  # a descriptor: name the file it was opened as
            path = self.fds.get(path)
        raise OSError(code, os.strerror(code), os.fsdecode(path) if path is not None else None)


def _kill_the_relay() -> None:
    """SIGKILL for the whole relay (both processes), never for anything else."""
    me, parent = _real["getpid"](), _real["getppid"]()
    if ROLE == "delivery":
        if parent != 1 and b"smarthost" in _cmdline(parent):
            _real["kill"](parent, signal.SIGKILL)
    else:  # the relay: its delivery processes (they would follow by PDEATHSIG anyway)
        for child in delivery_children(me):
            _real["kill"](child, signal.SIGKILL)
    _real["kill"](me, signal.SIGKILL)
    time.sleep(60)  # never reached: SIGKILL is not delivered later than this


def delivery_children(pid: int) -> list[int]:
    """The live delivery processes (not zombies) whose parent is `pid`."""
    return [
        int(entry)
        for entry in os.listdir("/proc")
        if entry.isdigit() and parent_pid(int(entry)) == pid and is_delivery_process(entry)
    ]


_faults: _Faults | None = None


def _guarded(op: str, call: Any, path: Any, *args: Any, dst: Any = None, **kwargs: Any) -> Any:
    rule = _faults.check(op, path, dst) if _faults is not None else None
    if rule is not None and rule.when == "before":
        _faults.strike(rule, op, path)  # type: ignore[union-attr]
    result = call(*args, **kwargs)
    if rule is not None and rule.when == "after":
        _faults.strike(rule, op, path)  # type: ignore[union-attr]
    return result


# -- the wrappers -------------------------------------------------------------------


def _open(path: Any, flags: int, mode: int = 0o777, *, dir_fd: Any = None) -> int:
    fd = _guarded("open", _real["open"], path, path, flags, mode, dir_fd=dir_fd)
    if _faults is not None and not isinstance(path, int):
        _faults.fds[fd] = os.fsdecode(path)
    return fd


def _close(fd: int) -> None:
    if _faults is not None:
        _faults.fds.pop(fd, None)
    _real["close"](fd)


def _write_through(fd: int, data: Any, raw_write: Any) -> int:
    rule = _faults.check("write", fd) if _faults is not None else None
    if rule is None:
        return raw_write(data)
    if rule.when == "before":
        if rule.partial and len(data) > 1:
            raw_write(bytes(memoryview(data)[: len(data) // 2]))
        _faults.strike(rule, "write", fd)  # type: ignore[union-attr]
    written = raw_write(data)
    _faults.strike(rule, "write", fd)  # type: ignore[union-attr]
    return written


def _write(fd: int, data: Any) -> int:
    return _write_through(fd, data, lambda chunk: _real["write"](fd, chunk))


class _FaultyFileIO(io.FileIO):
    """A raw file whose writes and reads pass the fault check (the spool writes via
    os.fdopen, and hands a message's content to the sender as one)."""

    def write(self, data: Any) -> int:  # type: ignore[override]
        return _write_through(self.fileno(), data, super().write)

    def read(self, size: int = -1) -> Any:
        return _guarded("read", super().read, self.fileno(), size)

    def readinto(self, buffer: Any) -> Any:
        return _guarded("read", super().readinto, self.fileno(), buffer)


def _fdopen(fd: int, mode: str = "r", buffering: int = -1, *args: Any, **kwargs: Any) -> Any:
    if "b" not in mode or args or set(kwargs) - {"closefd"}:
        return _real["fdopen"](fd, mode, buffering, *args, **kwargs)
    writing = any(c in mode for c in "wax+")
    raw = _FaultyFileIO(fd, mode.replace("b", ""), closefd=kwargs.get("closefd", True))
    if buffering == 0:
        return raw
    if writing:
        return io.BufferedWriter(raw)
    return io.BufferedReader(raw, buffering if buffering > 1 else io.DEFAULT_BUFFER_SIZE)


def _fsync(fd: Any) -> None:
    return _guarded("fsync", _real["fsync"], fd, fd)


def _fdatasync(fd: Any) -> None:
    return _guarded("fsync", _real["fdatasync"], fd, fd)


def _rename(src: Any, dst: Any, **kwargs: Any) -> None:
    return _guarded("rename", _real["rename"], src, src, dst, dst=dst, **kwargs)


def _link(src: Any, dst: Any, **kwargs: Any) -> None:
    return _guarded("link", _real["link"], src, src, dst, dst=dst, **kwargs)


def _syncfs(fd: Any) -> None:
    # smarthost takes syncfs from libc, or from os first if os has one: this one.
    return _guarded("syncfs", _real["syncfs"], fd, fd)


def _replace(src: Any, dst: Any, **kwargs: Any) -> None:
    return _guarded("rename", _real["replace"], src, src, dst, dst=dst, **kwargs)


def _unlink(path: Any, **kwargs: Any) -> None:
    return _guarded("unlink", _real["unlink"], path, path, **kwargs)


def _utime(path: Any, *args: Any, **kwargs: Any) -> None:
    return _guarded("utime", _real["utime"], path, path, *args, **kwargs)


def _chmod(path: Any, mode: int, **kwargs: Any) -> None:
    return _guarded("chmod", _real["chmod"], path, path, mode, **kwargs)


def _mkdir(path: Any, mode: int = 0o777, **kwargs: Any) -> None:
    return _guarded("mkdir", _real["mkdir"], path, path, mode, **kwargs)


def _always_syncfs() -> None:
    """A rule naming syncfs must meet one at every commit: the spool's choice of
    per-file fsyncs for a batch (when syncfs seems dearer) is taken away. Imported
    once os is wrapped (the spool finds os.* at each call anyway)."""
    from smarthost.spool import SyncChoice

    SyncChoice.syncfs_cheaper = lambda self, files: True  # type: ignore[method-assign]


def install(source: str | None = None, log_path: str | None = None) -> bool:
    """Wrap the os functions when rules are given (argument or environment)."""
    global _faults
    if _faults is not None:
        return True  # already (sitecustomize, then `python -m faults`)
    source = source if source is not None else os.environ.get(ENV_RULES)
    if not source:
        return False
    _faults = _Faults(source, log_path if log_path is not None else os.environ.get(ENV_LOG))
    os.open = _open  # type: ignore[assignment]
    os.close = _close  # type: ignore[assignment]
    os.write = _write  # type: ignore[assignment]
    os.fdopen = _fdopen  # type: ignore[assignment]
    os.fsync = _fsync  # type: ignore[assignment]
    os.fdatasync = _fdatasync  # type: ignore[assignment]
    os.rename = _rename  # type: ignore[assignment]
    os.replace = _replace  # type: ignore[assignment]
    os.link = _link  # type: ignore[assignment]
    from smarthost.libc import libc_syncfs  # only os and ctypes: nothing to wrap

    real_syncfs = libc_syncfs()
    if real_syncfs is not None:  # else the relay fsyncs
        _real["syncfs"] = real_syncfs
        os.syncfs = _syncfs  # type: ignore[attr-defined]
    os.unlink = _unlink  # type: ignore[assignment]
    os.remove = _unlink  # type: ignore[assignment]
    os.utime = _utime  # type: ignore[assignment]
    os.chmod = _chmod  # type: ignore[assignment]
    os.mkdir = _mkdir  # type: ignore[assignment]
    if real_syncfs is not None:
        _always_syncfs()
    _record_installed()
    os.register_at_fork(after_in_child=_forked)
    return True


def _record_installed() -> None:
    assert _faults is not None
    argv = [a.decode(errors="replace") for a in _cmdline().split(b"\0") if a]
    _faults.record(event="installed", argv=argv or sys.argv)


def _forked() -> None:
    """In a child os.fork() made: the relay forks only its delivery process, which
    counts its own calls from zero, as a spawned one would."""
    global ROLE
    assert _faults is not None
    ROLE = "delivery"
    _faults.lock = threading.Lock()  # a fork copies a lock in whatever state it was
    for rule in _faults.rules:
        rule.seen = 0
    _record_installed()
