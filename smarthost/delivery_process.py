"""The delivery half in a process of its own, and the pipe between it and the relay.

`serve` runs delivery in a second process, so the two halves don't take turns on one
GIL. The relay (`DeliveryProcess`, here) starts it and writes frames into a pipe; the
child (`run_child`, here too) reads them.

The first delivery process is forked from the relay while it is still single-threaded,
after the delivery modules are imported and with the imported objects frozen out of
the garbage collector (`gc.freeze`): the two processes then share those pages copy on
write instead of holding a copy each. A later one (the first died, the relay now runs
threads) is a fresh interpreter (`python -c "...delivery_main()" FDS`), since forking a
process that runs threads is not safe. A frame is a kind byte and a 4-byte length:
`Q` + a committed queue ID, or `C` + the pickled Config (at start and on reload).

The child holds the spool lock with the relay. The pipe's end tells it the relay is
gone, and it then exits at once, as a kill -9 of the whole relay would: what it had
claimed goes back to the queue at the next start.
"""

from __future__ import annotations

import contextlib
import errno
import gc
import logging
import os
import pickle
import select
import signal
import struct
import subprocess
import sys
import threading
import time
import traceback
from typing import TYPE_CHECKING, Protocol

from . import libc, log, privileges
from .config import Config
from .spool import Envelope, Spool

STOP_GRACE = 5.0
RESTART_DELAY = 1.0  # before a delivery process that died is started again
START_TIMEOUT = 60.0  # for a delivery process to say it runs
SEND_TIMEOUT = 5.0  # for room in the pipe: the child reads it at once when it is well

QUEUED = b"Q"  # + a committed queue ID
CONFIG = b"C"  # + a pickled Config
_HEAD = struct.Struct(">cI")

if TYPE_CHECKING:
    from .delivery import Delivery

_CHILD_MAIN = "from smarthost.delivery_process import main as delivery_main; delivery_main()"
PROCESS_NAME = "smarthost-deliv"  # /proc/PID/comm, as ps and top show it (15 bytes at most)


# -- the frames ------------------------------------------------------------------


def frame(kind: bytes, payload: bytes) -> bytes:
    return _HEAD.pack(kind, len(payload)) + payload


def read_frame(fd: int) -> tuple[bytes, bytes] | None:
    """The next frame, or None once the writer is gone."""
    head = _read_exactly(fd, _HEAD.size)
    if head is None:
        return None
    kind, size = _HEAD.unpack(head)
    payload = _read_exactly(fd, size)
    return None if payload is None else (kind, payload)


def _read_exactly(fd: int, size: int) -> bytes | None:
    chunks, left = [], size
    while left:
        chunk = os.read(fd, left)
        if not chunk:
            return None
        chunks.append(chunk)
        left -= len(chunk)
    return b"".join(chunks)


# -- the relay's end ---------------------------------------------------------------


class DeliveryProcess:
    """The delivery half in a child process, fed through a pipe (a `DeliveryHalf`)."""

    own_process = True

    def __init__(self, config: Config, spool: Spool) -> None:
        self.config = config
        self.spool = spool
        self.proc: Child | None = None
        self._pipe: int | None = None
        self._pipe_lock = threading.Lock()
        self._started_at = 0.0

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None else None

    def start(self) -> None:
        lock_fd = self.spool.lock_fd
        assert lock_fd is not None, "the spool is locked before delivery starts"
        read_end, write_end = os.pipe()
        ready_read, ready_write = os.pipe()
        child_fds = (read_end, ready_write, lock_fd)
        try:
            if _may_fork():
                self.proc = _fork_child(child_fds, parent_ends=(write_end, ready_read))
            else:
                self.proc = subprocess.Popen(
                    [sys.executable, "-c", _CHILD_MAIN, *map(str, child_fds)],
                    pass_fds=child_fds,
                    stdin=subprocess.DEVNULL,
                )
        except BaseException:
            os.close(write_end)
            os.close(ready_read)
            raise
        finally:
            os.close(read_end)
            os.close(ready_write)
        self._started_at = time.monotonic()
        os.set_blocking(write_end, False)  # a child that stops reading must not stop commits
        with self._pipe_lock:
            # The config first: a queue ID the committer sends meanwhile comes after it.
            self._pipe = write_end
            self._write(CONFIG, pickle.dumps(self.config))
        self._wait_until_ready(ready_read)

    def _wait_until_ready(self, ready_read: int) -> None:
        """Block until the child says it delivers (one byte), or fail the start."""
        try:
            readable, _, _ = select.select([ready_read], [], [], START_TIMEOUT)
            if not readable or os.read(ready_read, 1) != b"1":
                assert self.proc is not None
                code = self.proc.poll()
                raise OSError(
                    errno.ECHILD,
                    "the delivery process did not start"
                    + (f" (exit status {code})" if code is not None else ""),
                )
        finally:
            os.close(ready_read)

    def submit(self, env: Envelope) -> None:
        self._send(QUEUED, env.id.encode())

    def reload(self, config: Config) -> None:
        self.config = config
        self._send(CONFIG, pickle.dumps(config))

    def _send(self, kind: bytes, payload: bytes) -> None:
        with self._pipe_lock:
            if self._pipe is not None:
                self._write(kind, payload)

    def _write(self, kind: bytes, payload: bytes) -> None:
        """One frame into the pipe (`_pipe_lock` held). A queue ID that finds the pipe
        full is dropped: the message is in queue/, and the rescan finds it. A frame
        that cannot be finished within SEND_TIMEOUT means the child no longer reads:
        it is killed, and the new one starts with a scan of the queue. A child that
        died (EPIPE) is replaced the same way."""
        assert self._pipe is not None
        whole = frame(kind, payload)
        data = memoryview(whole)
        deadline = time.monotonic() + SEND_TIMEOUT
        try:
            while data:
                try:
                    data = data[os.write(self._pipe, data) :]
                except BlockingIOError:
                    if kind == QUEUED and len(data) == len(whole):
                        return  # nothing written (a short frame is all or nothing)
                    remaining = deadline - time.monotonic()
                    if remaining <= 0 or not select.select([], [self._pipe], [], remaining)[1]:
                        self._give_up_on_child()
                        return
        except OSError:
            pass

    def _give_up_on_child(self) -> None:
        """The child stopped reading its pipe (`_pipe_lock` held): kill it, so that the
        relay starts a new one."""
        log.event(
            "internal_error",
            level=logging.ERROR,
            error="the delivery process stopped reading its pipe; starting a new one",
        )
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
        if self._pipe is not None:
            os.close(self._pipe)
            self._pipe = None

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def healthy(self) -> bool:
        """False once the child has died; a new one is started after RESTART_DELAY."""
        if self.proc is None or self.proc.poll() is None:
            return True
        if time.monotonic() - self._started_at < RESTART_DELAY:
            return False
        log.event(
            "internal_error",
            level=logging.ERROR,
            error=f"delivery process {self.proc.pid} exited with {self.proc.returncode}; "
            "starting a new one",
        )
        self._close_pipe()
        try:
            self.start()
        except OSError as exc:
            log.event("internal_error", level=logging.ERROR, error=f"{exc}; trying again")
            self._started_at = time.monotonic()
            return False
        return True

    def stop(self, grace: float) -> bool:
        if self.proc is None:
            return True
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            code = self.proc.wait(grace + 5.0)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            code = self.proc.wait()
        self._close_pipe()
        return code == 0

    def _close_pipe(self) -> None:
        with self._pipe_lock:
            if self._pipe is not None:
                os.close(self._pipe)
                self._pipe = None


# -- the child process ---------------------------------------------------------------


class Child(Protocol):
    """What the relay uses of its delivery process: a subprocess.Popen's interface."""

    pid: int
    returncode: int | None

    def poll(self) -> int | None: ...
    def wait(self, timeout: float | None = None) -> int: ...
    def send_signal(self, sig: int) -> None: ...
    def kill(self) -> None: ...


class ForkedChild:
    """A child this process forked, with the part of Popen's interface `Child` names
    (Popen only runs programs). It is reaped under a lock, as Popen does, and signalled
    under the same lock: its pid cannot be reused while a signal is on its way."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.returncode: int | None = None
        self._waitpid_lock = threading.Lock()

    def poll(self) -> int | None:
        if self.returncode is None and self._waitpid_lock.acquire(blocking=False):
            try:  # else another thread is reaping it: still running, as far as we know
                self._reap(os.WNOHANG)
            finally:
                self._waitpid_lock.release()
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        if timeout is None:
            with self._waitpid_lock:
                if self.returncode is None:
                    self._reap(0)
        else:
            self._poll_until(time.monotonic() + timeout, timeout)
        assert self.returncode is not None
        return self.returncode

    def send_signal(self, sig: int) -> None:
        with self._waitpid_lock:
            if self.returncode is None:
                self._reap(os.WNOHANG)
            if self.returncode is None:
                os.kill(self.pid, sig)

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)

    def _reap(self, options: int) -> None:
        try:
            pid, status = os.waitpid(self.pid, options)
        except ChildProcessError:  # reaped elsewhere: its status is lost
            self.returncode = -signal.SIGKILL
            return
        if pid:
            self.returncode = os.waitstatus_to_exitcode(status)

    def _poll_until(self, deadline: float, timeout: float) -> None:
        delay = 0.0005  # as Popen.wait(timeout): short sleeps, growing to 50 ms
        while self.poll() is None:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise subprocess.TimeoutExpired(PROCESS_NAME, timeout)
            delay = min(delay * 2, remaining, 0.05)
            time.sleep(delay)


def _may_fork() -> bool:
    """Fork only a process that runs no other thread (a fork copies no thread, and
    whatever lock one held stays locked); what both halves import comes first."""
    from . import delivery  # noqa: F401  # before the fork: its pages are shared

    return threading.active_count() == 1


def _fork_child(child_fds: tuple[int, int, int], parent_ends: tuple[int, int]) -> ForkedChild:
    """Fork the delivery process from this single-threaded relay (see the module
    docstring): what both halves import, and every object made so far, are shared."""
    gc.collect()
    libc.release_free_memory()
    gc.freeze()  # the collector then never writes to the shared objects' pages
    pid = os.fork()
    if pid:
        return ForkedChild(pid)
    code = 1
    try:
        try:
            _start_afresh(parent_ends)
            run_child(*child_fds)
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else 1
        except BaseException:
            traceback.print_exc()
        with contextlib.suppress(Exception):
            logging.shutdown()
            sys.stderr.flush()
    finally:
        os._exit(code)  # never back into the relay's own code: this process ends here


def _start_afresh(parent_ends: tuple[int, int]) -> None:
    """What a spawned delivery process starts with: the relay's signal handlers and
    its stdin are not the child's; its own handlers come once it is set up."""
    for fd in parent_ends:
        os.close(fd)
    for signum in (signal.SIGTERM, signal.SIGHUP, signal.SIGUSR1, signal.SIGCHLD):
        signal.signal(signum, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    devnull = os.open(os.devnull, os.O_RDONLY)
    os.dup2(devnull, 0)
    os.close(devnull)


# -- the child's end ---------------------------------------------------------------


def main() -> None:
    """The delivery process as a fresh interpreter:
    `python -c "...; main()" PIPE_FD READY_FD LOCK_FD`."""
    pipe_fd, ready_fd, lock_fd = (int(arg) for arg in sys.argv[1:4])
    libc.limit_malloc_arenas()
    run_child(pipe_fd, ready_fd, lock_fd)


def run_child(pipe_fd: int, ready_fd: int, lock_fd: int) -> None:
    """The delivery process: read the config from the pipe, deliver until told to stop
    (SIGTERM) or the relay is gone (the pipe's end); exits through SystemExit."""
    from .delivery import Delivery  # the relay imports it only to fork this process

    libc.name_process(PROCESS_NAME)
    first = read_frame(pipe_fd)
    if first is None or first[0] != CONFIG:
        os._exit(1)  # the relay died before it could say anything
    config: Config = pickle.loads(first[1])
    account = privileges.service_account(config.user)
    if config.metrics.listen is not None:
        from . import metrics  # before the drop, like what it imports

        metrics.load_library()
    if config.fleet.enabled:
        from . import fleet  # before the drop, like what it imports

        fleet.load_library()
    if account is not None and os.geteuid() == 0:
        "localhost".encode("idna")  # loaded on first use: maybe unreachable once dropped
        privileges.drop_to(account)
    libc.die_with_parent()  # after the drop: a change of credentials clears it
    log.setup_for(config)
    spool = Spool(config.spool.dir)
    spool.adopt_lock(lock_fd)
    delivery = Delivery(config, spool)
    if config.metrics.listen is not None:
        from .metrics import DeliveryMetrics  # its files: the service user's

        delivery.metrics = DeliveryMetrics(config, spool, config.fleet.member)
        delivery.metrics.start()
    stop = threading.Event()

    def on_signal(signum: int, frame: object) -> None:
        stop.set()

    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, on_signal)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)  # the relay forwards reloads as frames
    signal.signal(signal.SIGUSR1, signal.SIG_IGN)  # the relay's drain, not ours
    delivery.start()
    os.write(ready_fd, b"1")
    os.close(ready_fd)
    reader = threading.Thread(
        target=_follow_relay, args=(pipe_fd, delivery, stop), name="relay-pipe", daemon=True
    )
    reader.start()
    stop.wait()
    sys.exit(0 if delivery.stop(STOP_GRACE) else 1)


def _follow_relay(pipe_fd: int, delivery: Delivery, stop: threading.Event) -> None:
    while True:
        received = read_frame(pipe_fd)
        if received is None:
            if not stop.is_set():
                os._exit(1)  # the relay is gone: so are we, at once
            return
        kind, payload = received
        try:
            _follow_frame(delivery, kind, payload)
        except Exception as exc:  # this thread must not die: the relay would block on us
            with contextlib.suppress(Exception):
                log.event("internal_error", level=logging.ERROR, error=f"relay pipe: {exc!r}")
            if kind == CONFIG:
                os._exit(1)  # the relay starts a new delivery process, with this config


def _follow_frame(delivery: Delivery, kind: bytes, payload: bytes) -> None:
    if kind == QUEUED:
        queue_id = payload.decode()
        delivery.spool.committed_elsewhere(queue_id)
        delivery.scheduler.committed(queue_id)
    elif kind == CONFIG:
        config = pickle.loads(payload)
        log.setup_for(config)
        delivery.reload(config)
