"""The group commit: one thread makes received mail durable, a batch at a time.

Sessions on the event loop hand over a message whose DATA has ended (its envelope and
its content: chunks, or a spool Draft already written as it arrived) and await a
future; the commit thread writes and syncs a whole batch through `Spool.commit_many`
and resolves each future on its own loop. Messages whose DATA ends while a batch is
being written join the next one (group commit, as databases do). One thread, not a
pool: fewer threads taking turns on the GIL with the event loop. The thread starts with
the first message: until then the relay stays single-threaded, so that `serve` can fork
its delivery process (delivery_process.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import threading
import time
from collections.abc import Callable
from typing import Any

from . import log
from .spool import Content, Envelope, Spool, SpoolError


class GroupCommitter:
    """The one thread that makes received mail durable (see the module docstring)."""

    def __init__(
        self,
        spool: Spool,
        committed: Callable[[Envelope, SpoolError | None, float], None],
    ) -> None:
        self.spool = spool
        self.committed = committed
        # (envelope, content, loop, future, time.monotonic() at submission)
        self._waiting: list[tuple[Envelope, Content, asyncio.AbstractEventLoop, Any, float]] = []
        self._wake = threading.Condition()
        self._stopping = False
        self._thread: threading.Thread | None = None

    def submit(
        self,
        env: Envelope,
        content: Content,
        loop: asyncio.AbstractEventLoop,
        done: asyncio.Future,
    ) -> None:
        """Commit `env`; `done` (a future of `loop`) then gets None or the SpoolError.
        `committed` is told how long the commit took, from here (the end of DATA)."""
        with self._wake:
            if self._thread is None:
                thread = threading.Thread(target=self._run, name="commit", daemon=True)
                thread.start()  # may raise (no thread to be had): the next submit tries again
                self._thread = thread
            self._waiting.append((env, content, loop, done, time.monotonic()))
            self._wake.notify()

    def stop(self, timeout: float | None = None) -> None:
        """Commit what was submitted, then end the thread."""
        with self._wake:
            self._stopping = True
            self._wake.notify()
            thread = self._thread
        if thread is not None:
            thread.join(timeout)

    def _run(self) -> None:
        while True:
            with self._wake:
                self._wake.wait_for(lambda: self._waiting or self._stopping)
                batch, self._waiting = self._waiting, []
            if not batch:
                return
            self._commit(batch)

    def _commit(self, batch: list) -> None:
        try:
            errors = self.spool.commit_many([(env, content) for env, content, *_ in batch])
        except Exception as exc:  # a bug: the sessions must still get their 4xx
            log.event("internal_error", level=logging.ERROR, error=repr(exc))
            errors = [SpoolError(errno.EIO, f"commit failed: {exc!r}")] * len(batch)
        durable = time.monotonic()
        by_loop: dict[asyncio.AbstractEventLoop, list] = {}
        for (env, _, loop, done, submitted), error in zip(batch, errors):
            try:
                self.committed(env, error, durable - submitted)
            except Exception as exc:  # spooled all the same: the scheduler's rescan finds it
                log.event("internal_error", level=logging.ERROR, error=repr(exc))
            by_loop.setdefault(loop, []).append((done, error))
        for loop, outcomes in by_loop.items():
            with contextlib.suppress(RuntimeError):  # that loop has closed
                loop.call_soon_threadsafe(_resolve, outcomes)


def _resolve(outcomes: list[tuple[asyncio.Future, SpoolError | None]]) -> None:
    for done, error in outcomes:
        if done.done():
            continue  # the session was cancelled meanwhile: its commit stands
        if error is None:
            done.set_result(None)
        else:
            done.set_exception(error)
