"""scheduler.py: the dispatcher alone (a Scheduler, its Sender and a real aiosmtpd
upstream, no watcher, no listener): hints, due times, rescans, stray claims, the pool's
bound, how many workers it keeps busy, and what it remembers of messages that left the
queue."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from smarthost.config import load_config
from smarthost.scheduler import Intervals, Scheduler
from smarthost.sender import Sender, UpstreamWaits
from smarthost.spool import ACTIVE, HOLD, QUEUE, Envelope, Recipient, Spool, new_id
from smarthost.upstream import Upstreams

from support.configs import write_config
from support.sink import Sink, held_data
from support.waiting import wait_until

NO_RESCANS = Intervals(rescan=3600.0)  # only hints and the start-up scan
CONTENT = b"From: a@client.test\r\nSubject: dispatch\r\n\r\nbody\r\n"


class Dispatch:
    """A spool and a running Scheduler over it, sending to `sink`."""

    def __init__(self, tmp_path: Path, sink: Sink, intervals: Intervals, workers: int = 4):
        path = write_config(tmp_path, sink.port)
        path.write_text(path.read_text().replace("workers = 4", f"workers = {workers}"))
        self.config = load_config(path)
        self.spool = Spool(self.config.spool.dir)
        self.spool.create()
        self.upstreams = Upstreams(self.config)
        sender = Sender(self.config, self.spool, self.upstreams)
        self.scheduler = Scheduler(self.config, self.spool, sender, intervals)

    def hold_first_attempt(
        self, monkeypatch: pytest.MonkeyPatch
    ) -> tuple[threading.Event, threading.Event]:
        """The first attempt waits (not on its upstream) until the second event is set;
        the first event says it has begun."""
        in_attempt, release = threading.Event(), threading.Event()
        attempt = self.scheduler.sender.attempt

        def held_attempt(env, content=None):
            if not in_attempt.is_set():
                in_attempt.set()
                release.wait(10)
            return attempt(env, content)

        monkeypatch.setattr(self.scheduler.sender, "attempt", held_attempt)
        return in_attempt, release

    def commit(self, due: float = 0.0, rcpt: str = "x@dest.test") -> str:
        env = Envelope(new_id(), "a@client.test", [Recipient(rcpt)], time.time(), len(CONTENT))
        env.next_attempt = due
        self.spool.commit(env, [CONTENT])
        if due:
            self.spool.set_due(QUEUE, env.id, due)
        return env.id


@pytest.fixture
def dispatch(tmp_path: Path, sink: Sink) -> Iterator[Dispatch]:
    started: list[Dispatch] = []

    def make(intervals: Intervals = NO_RESCANS, workers: int = 4) -> Dispatch:
        d = Dispatch(tmp_path, sink, intervals, workers)
        started.append(d)
        return d

    yield make  # type: ignore[misc]
    for d in started:
        assert d.scheduler.stop(5.0)
        d.upstreams.close_all()


def test_a_hint_sends_a_committed_message_at_once(dispatch, sink):
    d = dispatch()
    d.scheduler.start()
    queue_id = d.commit()
    d.scheduler.hint(queue_id, 0.0)
    assert sink.wait_for(1, 5.0)[0].rcpt_tos == ["x@dest.test"]
    wait_until(lambda: d.spool.locate(queue_id) is None, 5.0, "the message to be done")


def test_a_message_waits_for_its_due_time_on_disk(dispatch, sink):
    d = dispatch()
    due = time.time() + 1.0
    queue_id = d.commit(due)
    d.scheduler.start()  # the start-up scan finds it
    d.scheduler.hint(queue_id, 0.0)  # an early hint: the file's due time wins
    got = sink.wait_for(1, 5.0)
    assert time.time() >= due - 0.05, "sent before its due time"
    assert got[0].rcpt_tos == ["x@dest.test"]


def test_the_rescan_finds_what_no_hint_announced(dispatch, sink):
    d = dispatch(Intervals(rescan=0.2))
    d.scheduler.start()
    time.sleep(0.05)  # let the start-up scan pass before the file appears
    d.commit()
    assert sink.wait_for(1, 3.0)  # no hint, no watcher: only a rescan can find it


def test_an_unclaimed_message_in_active_goes_back_and_out(dispatch, sink):
    d = dispatch()
    queue_id = d.commit()
    assert d.spool.move(queue_id, QUEUE, ACTIVE)  # left by a delivery process that died
    d.scheduler.start()
    assert sink.wait_for(1, 5.0)
    wait_until(lambda: d.spool.locate(queue_id) is None, 5.0, "the message to be done")


def test_never_more_claimed_than_workers(dispatch, sink):
    release = held_data(sink)  # every session held until the count is taken
    d = dispatch(workers=2)
    ids = [d.commit() for _ in range(6)]
    d.scheduler.start()
    wait_until(lambda: len(set(d.spool.each_name(ACTIVE))) == 2, 5.0, "two claims")
    time.sleep(0.2)  # a bounded look for a third claim that must not come
    assert len(set(d.spool.each_name(ACTIVE))) == 2
    release.set()
    sink.wait_for(6, 10.0)
    wait_until(lambda: not any(d.spool.locate(q) for q in ids), 5.0, "all done")


def test_a_slow_upstream_soon_has_every_worker(dispatch, sink):
    """Mail waits first for the busy worker; while the busy ones wait on their
    upstream, one more worker is woken after each `Intervals.more_workers`."""
    release = held_data(sink)
    d = dispatch(workers=4)
    ids = [d.commit() for _ in range(6)]
    d.scheduler.start()
    try:
        wait_until(lambda: len(set(d.spool.each_name(ACTIVE))) == 4, 5.0, "four claims")
        assert d.scheduler.sender.waits.total()[1] > 0
    finally:
        release.set()
    sink.wait_for(6, 10.0)
    wait_until(lambda: not any(d.spool.locate(q) for q in ids), 5.0, "all done")


def test_a_fast_upstream_keeps_one_worker_busy(dispatch, sink, monkeypatch):
    """Attempts that end quickly and hardly wait on their upstream: one worker takes
    message after message, and no second one is woken to take turns on the GIL."""
    d = dispatch(Intervals(rescan=3600.0, more_workers=2.0), workers=4)
    busy, most = [0], [0]
    lock = threading.Lock()
    attempt = d.scheduler.sender.attempt

    def counted_attempt(env, content=None):
        with lock:
            busy[0] += 1
            most[0] = max(most[0], busy[0])
        try:
            return attempt(env, content)
        finally:
            with lock:
                busy[0] -= 1

    monkeypatch.setattr(d.scheduler.sender, "attempt", counted_attempt)
    ids = [d.commit() for _ in range(20)]
    d.scheduler.start()  # its first scan finds all 20 due at once
    assert len(sink.wait_for(20, 10.0)) == 20
    wait_until(lambda: not any(d.spool.locate(q) for q in ids), 5.0, "all done")
    assert most[0] == 1, f"{most[0]} attempts at once"


def test_an_attempt_that_does_not_end_leaves_the_next_message_to_another_worker(
    dispatch, sink, monkeypatch
):
    """A busy worker stuck on something that is not its upstream (a backend's
    connection slots, a slow disk) ends no attempt: after `more_workers` another
    worker takes the next message."""
    d = dispatch(Intervals(rescan=3600.0, more_workers=0.3), workers=4)
    in_attempt, release = d.hold_first_attempt(monkeypatch)
    d.scheduler.start()
    first = d.commit()
    d.scheduler.committed(first)
    try:
        assert in_attempt.wait(5)
        second = d.commit()
        committed = time.monotonic()
        d.scheduler.committed(second)
        assert len(sink.wait_for(1, 5.0)) == 1  # the second, while the first is stuck
        assert time.monotonic() - committed >= 0.3, "a second worker was woken at once"
    finally:
        release.set()
    assert len(sink.wait_for(2, 5.0)) == 2
    wait_until(lambda: d.spool.locate(first) is None, 5.0, "the first to be done")


def test_upstream_waits_are_thread_seconds_waited():
    waits = UpstreamWaits()
    start = waits.total()
    with waits, waits:  # two threads' waits, as it counts them
        time.sleep(0.05)
        during = waits.total()
    after = waits.total()
    assert during[1] - start[1] >= 2 * 0.05
    time.sleep(0.02)
    assert waits.total()[1] == after[1], "it counts on while nobody waits"


def test_a_stop_during_a_scan_ends_the_dispatch_loop(dispatch, monkeypatch):
    """`stop` sets the flag, then notifies: if that came while the loop scanned, before
    it went to sleep, the loop must not sleep on until its next scan."""
    d = dispatch()  # rescans an hour apart
    scanned = threading.Event()

    def scan_that_a_stop_interrupts() -> None:
        wait_until(lambda: d.scheduler._rebuilder is not None, 5.0, "the index rebuilder")
        d.scheduler._rebuilder.join(5.0)  # its last notify must not be what wakes the loop
        d.scheduler._stopping.set()  # what stop() does first ...
        with d.scheduler._cond:
            d.scheduler._cond.notify_all()  # ... and then, while nobody waits yet
        scanned.set()

    monkeypatch.setattr(d.scheduler, "_scan", scan_that_a_stop_interrupts)
    d.scheduler.start()
    assert scanned.wait(5)
    assert d.scheduler._thread is not None
    d.scheduler._thread.join(3.0)
    assert not d.scheduler._thread.is_alive(), "the loop slept through the stop"


def test_what_it_remembers_of_a_deleted_message_goes_at_the_rescan(dispatch, sink):
    d = dispatch(Intervals(rescan=0.2))
    later = d.commit(time.time() + 3600)
    held = d.commit(time.time() + 3600)
    d.scheduler._wait_for_groups(later, ["default"])  # as a deferral while all were down
    d.scheduler._wait_for_groups(held, ["default"])
    assert d.spool.move(held, QUEUE, HOLD)
    d.spool.discard(later, QUEUE)  # `queue delete`
    d.scheduler.start()
    wait_until(
        lambda: d.scheduler._waiting.get("default") == {held},
        3.0,
        "the deleted message forgotten, the held one kept",
    )


def test_a_failed_second_claim_leaves_the_first_claim_alone(dispatch, sink, monkeypatch):
    """Two workers may be handed one ID (a second hint before the first claim); the
    one whose claim fails must not clear the claim of the one that is sending, or the
    stray-claim check moves a message in flight back to queue/."""
    d = dispatch(Intervals(rescan=3600.0, stray_active=0.0))  # any stray claim is stale
    queue_id = d.commit()
    in_attempt, release = d.hold_first_attempt(monkeypatch)
    first = threading.Thread(target=d.scheduler._process, args=(queue_id,))
    first.start()
    try:
        assert in_attempt.wait(5)
        assert d.spool.locate(queue_id) == ACTIVE
        d.scheduler.committed(queue_id)  # a second worker, told it is due now ...
        d.scheduler._process(queue_id)  # ... whose claim fails: the first one has it
        d.scheduler._reclaim_stray_active(time.time())
        assert d.spool.locate(queue_id) == ACTIVE, "a message in flight went back"
    finally:
        release.set()
        first.join(10)
    assert sink.wait_for(1, 5.0)
    wait_until(lambda: d.spool.locate(queue_id) is None, 5.0, "the message to be done")
