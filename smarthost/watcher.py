"""Filesystem hints: watchdog wakes the scheduler when a message in queue/ is touched
and the pickup when something lands in the drop area.

`start()` returns once the watches are armed (watchdog's emitters add their inotify
watches before its threads start): the delivery half starts the watcher before the
scheduler and the pickup make their first scans, so a file that arrives while they
scan is either seen by the scan or wakes them. Armed after a scan, a file dropped in
between would wait for the next rescan.

Events only wake; they are never the truth. inotify drops events when its queue
overflows and watchdog does not say so (watchdog issue #654), so the scheduler also
rescans the spool on a timer, and every event is answered by looking at the file itself.
"""

from __future__ import annotations

import os
from collections.abc import Callable

from watchdog.events import (
    FileAttribEvent,
    FileClosedEvent,
    FileCreatedEvent,
    FileModifiedEvent,
    FileMovedEvent,
    FileSystemEvent,
    FileSystemEventHandler,
)
from watchdog.observers import Observer

from .spool import DROP, QUEUE, Spool, is_queue_id


class _QueueEvents(FileSystemEventHandler):
    def __init__(self, on_queue_file: Callable[[str], None]) -> None:
        self.on_queue_file = on_queue_file

    def on_any_event(self, event: FileSystemEvent) -> None:
        if event.is_directory or event.event_type not in ("created", "moved", "modified", "attrib"):
            return
        path = getattr(event, "dest_path", "") or event.src_path
        name = os.path.basename(os.fsdecode(path))
        if is_queue_id(name):
            self.on_queue_file(name)


class _DropEvents(FileSystemEventHandler):
    def __init__(self, on_drop: Callable[[], None]) -> None:
        self.on_drop = on_drop

    def on_any_event(self, event: FileSystemEvent) -> None:
        if not event.is_directory:
            self.on_drop()


class Watcher:
    """Watches queue/ and calls `on_queue_file(queue_id)` for each file that appears;
    calls `on_drop()` when something arrives in the drop area."""

    def __init__(
        self, spool: Spool, on_queue_file: Callable[[str], None], on_drop: Callable[[], None]
    ) -> None:
        self.spool = spool
        self._observer = Observer()
        self._observer.daemon = True
        self._observer.schedule(
            _DropEvents(on_drop),
            spool.dir(DROP),
            recursive=False,
            event_filter=[FileCreatedEvent, FileMovedEvent, FileClosedEvent],
        )
        # Only attribute and content changes: `touch` (a queue command's flush, or
        # Spool.announce after it renamed a message in) and files written in place.
        # Not renames: the relay's own, a commit and a claim per message, would cost a
        # thread hop each, and IN_MOVED_FROM events wait in watchdog's move grouper,
        # which every later rename searches. The relay hands its own commits to the
        # scheduler directly; anything else the rescan finds.
        self._observer.schedule(
            _QueueEvents(on_queue_file),
            spool.dir(QUEUE),
            recursive=False,
            event_filter=[FileModifiedEvent, FileAttribEvent],
        )

    def start(self) -> None:
        """Arm the watches (before this returns) and start dispatching their events."""
        self._observer.start()

    def stop(self) -> None:
        self._observer.stop()
        self._observer.join(timeout=5)
