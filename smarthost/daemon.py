"""The composition root: start the parts in order, stop them in reverse, handle signals.

Two halves: receiving (listeners, commits) and delivery (scheduler and senders, pickup
of the drop area, watcher). `serve` runs the delivery half in a process of its own, a
second interpreter, so the two don't take turns on one GIL: the receiver hands it each
committed queue ID through a pipe. In-process (tests, `Relay(config)`) both halves
share the process.

Start: spool (lock, recovery) → listeners → privileges dropped → delivery; only then is
the relay announced as started. Stop: listeners first (no new mail), then the commits
in flight, then delivery (attempts in flight get a few seconds; an unfinished message
simply stays spooled and is retried at the next start).
"""

from __future__ import annotations

import contextlib
import errno
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
from typing import TYPE_CHECKING

from . import __version__, log, privileges, process, systemd
from .config import Config, ConfigError, load_config
from .receiver import Receiver, auth_users, start_listeners
from .smtp_server import ClientSlots, Listeners
from .spool import ACTIVE, DROP, QUEUE, TMP, Envelope, Spool

if TYPE_CHECKING:
    from .delivery import Delivery
    from .metrics import MetricsServer
    from .scheduler import Scheduler

STOP_GRACE = 5.0
RESTART_DELAY = 1.0  # before a delivery process that died is started again
START_TIMEOUT = 60.0  # for a delivery process to say it runs
# `smarthost drain` writes its timeout (seconds, one line) into this file in the spool
# root before it sends SIGUSR1; a SIGUSR1 without one (or with one older than
# DRAIN_FILE_MAX_AGE, left by a command that died) drains for DRAIN_TIMEOUT.
DRAIN_FILE = ".drain"
DRAIN_FILE_MAX_AGE = 60.0
DRAIN_TIMEOUT = 300.0


class DeliveryProcess:
    """The delivery half in a child process, fed through a pipe.

    Frames on the pipe: `Q` + queue ID (a committed message) or `C` + a pickled Config
    (at start and on reload), each with a 4-byte length. The child holds the spool lock
    with us; the pipe's end tells it we are gone, and it then exits at once, as a
    kill -9 of the whole relay would: what it had claimed goes back at the next start.
    """

    def __init__(self, config: Config, spool: Spool) -> None:
        self.config = config
        self.spool = spool
        self.proc: subprocess.Popen | None = None
        self._pipe: int | None = None
        self._pipe_lock = threading.Lock()
        self._started_at = 0.0

    def start(self) -> None:
        lock_fd = self.spool.lock_fd
        assert lock_fd is not None, "the spool is locked before delivery starts"
        read_end, write_end = os.pipe()
        ready_read, ready_write = os.pipe()
        child_fds = (read_end, ready_write, lock_fd)
        try:
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
        with self._pipe_lock:
            self._pipe = write_end
        self._send(b"C", pickle.dumps(self.config))
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
        self._send(b"Q", env.id.encode())

    def reload(self, config: Config) -> None:
        self.config = config
        self._send(b"C", pickle.dumps(config))

    def _send(self, kind: bytes, payload: bytes) -> None:
        frame = kind + struct.pack(">I", len(payload)) + payload
        with self._pipe_lock:
            if self._pipe is None:
                return
            # If it died, the next one starts with a scan of the queue.
            with contextlib.suppress(OSError):
                _write_all(self._pipe, frame)

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


_CHILD_MAIN = "from smarthost.delivery import main as delivery_main; delivery_main()"


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


class Relay:
    """One running relay: receiver, spool and the delivery half (in a child process
    with `delivery_process`, as `serve` runs it; else in this one)."""

    def __init__(self, config: Config, *, delivery_process: bool = False) -> None:
        self.config = config
        self.spool = Spool(config.spool.dir)
        self.delivery: Delivery | DeliveryProcess
        if delivery_process:
            self.delivery = DeliveryProcess(config, self.spool)
        else:
            from .delivery import Delivery  # the relay process needs none of it

            self.delivery = Delivery(config, self.spool)
        self.receiver = Receiver(config, self.spool, self.delivery.submit)
        self.slots = ClientSlots(config.smtp.max_clients)
        self.listeners: Listeners | None = None
        self.metrics: MetricsServer | None = None
        self.started = self.draining = self.stopping = False

    @property
    def scheduler(self) -> Scheduler:
        assert not isinstance(self.delivery, DeliveryProcess), "delivery runs in another process"
        return self.delivery.scheduler

    def start(self) -> None:
        self.spool.create()
        self.spool.lock()
        recovered = self.spool.recover()
        account = privileges.service_account(self.config.user)
        if account is not None:
            privileges.hand_over(account, self.spool.root, self.config.log.file)
        # Ports first (port 25 needs root), then no more root; delivery picks up what
        # the listeners commit in between. A delivery process is started before the
        # drop, so that it can still reach the interpreter, and drops its rights itself.
        in_child = isinstance(self.delivery, DeliveryProcess)
        if in_child and self.config.metrics.listen is not None:
            from .metrics import start_server

            self.metrics = start_server(self.config, self, account)
        self.listeners = start_listeners(self.config, self.receiver, self.slots)
        if in_child:
            self.delivery.start()
        if account is not None:
            privileges.drop_to(account)
        if not in_child:
            self.delivery.start()
        log.event(
            "started",
            version=__version__,
            pid=os.getpid(),
            delivery_pid=self.delivery.proc.pid
            if isinstance(self.delivery, DeliveryProcess) and self.delivery.proc
            else None,
            listen=self.listeners.addresses,
            spool=self.spool.root,
            workers=self.config.delivery.workers,
            backends=[b.name for b in self.config.backends],
            recovered=recovered,
            user=account.pw_name if account else None,
            metrics=self.metrics.address if self.metrics else None,
        )
        self.started = True
        systemd.notify("READY=1")

    # -- what the metrics endpoint asks (metrics.RelayState) ---------------------

    def sessions(self) -> int:
        return self.slots.count

    def not_alive(self) -> str | None:
        if isinstance(self.delivery, DeliveryProcess) and not self.delivery.alive():
            return "the delivery process is not running"
        return None

    def not_ready(self) -> str | None:
        if not self.started or self.stopping or self.draining:
            return "starting" if not self.started else "stopping" if self.stopping else "draining"
        if self.listeners is None or not self.listeners.running:
            return "not listening"
        if not os.access(self.spool.dir(TMP), os.W_OK):
            return f"the spool {self.spool.root} is not writable"
        st = os.statvfs(self.spool.root)
        if st.f_bavail == 0:
            return f"the spool's file system ({self.spool.root}) is full"
        return self.not_alive()

    def reload(self, config: Config) -> list[str]:
        """Take a new config for upstreams, routes, rewriting, limits, users and logging,
        without dropping a session; what needs a restart is returned, not applied."""
        needs_restart = [
            key
            for key, old, new in (
                ("smtp.listen", self.config.smtp.listen, config.smtp.listen),
                ("spool.dir", self.config.spool.dir, config.spool.dir),
                ("user", self.config.user, config.user),
                ("delivery.workers", self.config.delivery.workers, config.delivery.workers),
                ("smtp.tls_cert", self.config.smtp.tls_cert, config.smtp.tls_cert),
                ("smtp.tls_key", self.config.smtp.tls_key, config.smtp.tls_key),
                ("smtp.max_clients", self.config.smtp.max_clients, config.smtp.max_clients),
                ("smtp.timeout", self.config.smtp.timeout, config.smtp.timeout),
                (
                    "smtp.bare_newlines",
                    self.config.smtp.bare_newlines,
                    config.smtp.bare_newlines,
                ),
                ("smtp.error_limit", self.config.smtp.error_limit, config.smtp.error_limit),
                ("hostname", self.config.hostname, config.hostname),
                ("metrics.listen", self.config.metrics.listen, config.metrics.listen),
                (
                    "smtp.max_message_size",
                    self.config.smtp.max_message_size,
                    config.smtp.max_message_size,
                ),
            )
            if old != new
        ]
        users = auth_users(config)  # a bad users file refuses the whole reload
        try:
            log.setup(config.log.level, config.log.file, config.log.format)
        except OSError as exc:
            raise ConfigError(
                [f"log.file: cannot open {config.log.file}: {exc.strerror}"]
            ) from None
        self.delivery.reload(config)
        self.receiver.config, self.receiver.users = config, users
        self.config = config
        return needs_restart

    def stop(self, reason: str | None = None) -> None:
        self.stopping = True
        log.event("stopping", pid=os.getpid(), reason=reason)
        systemd.notify("STOPPING=1")
        # Stop accepting, let messages being committed get their 250, then close.
        if self.listeners is not None:
            self.listeners.stop_accepting()
        self.receiver.wait_for_commits(STOP_GRACE)
        if self.listeners is not None:
            self.listeners.stop()
        self.receiver.committer.stop()
        clean = self.delivery.stop(STOP_GRACE)
        self.spool.unlock()
        if self.metrics is not None:
            self.metrics.stop()
        log.event("stopped", pid=os.getpid(), clean=clean)

    def abort_start(self) -> None:
        """Undo a start that failed half-way (a port in use, an unwritable spool)."""
        if self.listeners is not None:
            self.listeners.stop()
        self.delivery.stop(0.0)
        self.receiver.committer.stop(0.0)
        self.spool.unlock()
        if self.metrics is not None:
            self.metrics.stop()


def serve(config: Config) -> int:
    """Run until SIGTERM or SIGINT; SIGHUP reloads the config and reopens the log file;
    SIGUSR1 drains: no new sessions, delivery goes on, stop once nothing is due."""
    process.limit_malloc_arenas()
    if config.metrics.listen is not None:
        from .metrics import requirement_errors

        if requirement_errors(config):
            raise ConfigError(requirement_errors(config))
    relay = Relay(config, delivery_process=True)
    stop, hup, drain = threading.Event(), threading.Event(), threading.Event()
    wake = threading.Event()
    flags: dict[int, threading.Event] = {signal.SIGHUP: hup, signal.SIGUSR1: drain}

    def on_signal(signum: int, frame: object) -> None:
        # Only flags here: the work happens in the main loop, outside the handler.
        flags.get(signum, stop).set()
        wake.set()

    for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGUSR1):
        signal.signal(signum, on_signal)
    try:
        relay.start()
    except BaseException:
        relay.abort_start()
        raise
    drain_until: float | None = None
    reason: str | None = None
    while not stop.is_set():
        wake.wait(1.0)  # also the pace of checks on the delivery process
        wake.clear()
        relay.delivery.healthy()
        if drain.is_set() and not stop.is_set():
            drain.clear()
            drain_until = start_drain(relay, drain_until is None)
        if drain_until is not None:
            if nothing_due(relay.spool):
                reason = "drained"
                break
            if time.monotonic() >= drain_until:
                reason = "drain_timeout"
                break
        if hup.is_set() and not stop.is_set():
            hup.clear()
            reload(relay)
    relay.stop(reason)
    return 0


def start_drain(relay: Relay, first: bool) -> float:
    """SIGUSR1: stop accepting sessions (the first time); the deadline, from the
    timeout `smarthost drain` left in DRAIN_FILE (a later drain sets a new one)."""
    timeout = DRAIN_TIMEOUT
    path = os.path.join(relay.spool.root, DRAIN_FILE)
    with contextlib.suppress(OSError, ValueError):
        fresh = time.time() - os.stat(path).st_mtime < DRAIN_FILE_MAX_AGE
        with open(path, encoding="ascii") as f:
            text = f.read(64)
        os.unlink(path)
        if fresh:
            timeout = max(0.0, float(text.strip()))
    relay.draining = True
    log.event("draining", pid=os.getpid(), timeout=timeout)
    if first and relay.listeners is not None:
        relay.listeners.stop_accepting()
    return time.monotonic() + timeout


def nothing_due(spool: Spool, now: float | None = None) -> bool:
    """Nothing being delivered (active/), nothing due in queue/ (its mtime is its due
    time), nothing waiting in drop/ (files being written, `.tmp-`, aside); from the
    directories and stat() alone."""
    now = time.time() if now is None else now
    for _ in spool.each_name(ACTIVE):
        return False
    for _, due in spool.scan(QUEUE):
        if due <= now:
            return False
    try:
        with os.scandir(spool.dir(DROP)) as entries:
            if any(not entry.name.startswith(".") for entry in entries):
                return False
    except FileNotFoundError:
        pass
    return True


def reload(relay: Relay) -> None:
    """SIGHUP: a new config if it is valid (else the old one stays, loudly); the log
    file is reopened either way (after logrotate)."""
    systemd.notify("RELOADING=1")
    try:
        needs_restart = relay.reload(load_config(relay.config.path))
    except ConfigError as exc:
        try:
            log.reopen()
        except OSError as reopen_error:  # keep writing to the old file rather than die
            exc.errors.append(f"log.file: cannot reopen: {reopen_error.strerror}")
        log.event("config_reloaded", level=logging.ERROR, ok=False, errors=exc.errors)
    else:
        log.event("config_reloaded", ok=True, needs_restart=needs_restart or None)
    systemd.notify("READY=1")
