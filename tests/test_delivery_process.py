"""delivery_process.py: the relay's end of the pipe to the delivery process, with a
real child process and real pipes."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from smarthost import delivery_process
from smarthost.config import load_config
from smarthost.delivery_process import CONFIG, DeliveryProcess, ForkedChild, read_frame
from smarthost.spool import Envelope, Recipient, Spool, new_id

from support.configs import write_config


def relay_end(tmp_path: Path) -> DeliveryProcess:
    config = load_config(write_config(tmp_path, 9))
    spool = Spool(config.spool.dir)
    spool.create()
    spool.lock()
    return DeliveryProcess(config, spool)


def envelope() -> Envelope:
    return Envelope(new_id(), "a@client.test", [Recipient("b@dest.test")], time.time())


def test_the_config_goes_first_whatever_is_committed_meanwhile(tmp_path, monkeypatch):
    """A commit while the delivery process starts must not put a queue ID before the
    config in the pipe: the child would exit and the relay's start fail. The commit is
    made at the worst moment: while the config is being pickled for the pipe."""
    proc = relay_end(tmp_path)
    dumps = delivery_process.pickle.dumps
    commits: list[threading.Thread] = []

    def dumps_amid_a_commit(obj: object) -> bytes:
        commit = threading.Thread(target=proc.submit, args=(envelope(),))
        commit.start()
        commit.join(0.5)  # done at once unless the pipe is held for the config
        commits.append(commit)
        return dumps(obj)

    monkeypatch.setattr(delivery_process.pickle, "dumps", dumps_amid_a_commit)
    try:
        proc.start()  # raises if the child saw a queue ID first
        assert proc.alive() and commits
    finally:
        for commit in commits:
            commit.join(5)
        assert proc.stop(5.0)


def full_pipe() -> tuple[int, int]:
    read_end, write_end = os.pipe()
    os.set_blocking(write_end, False)
    while True:
        try:
            os.write(write_end, b"x" * 65536)
        except BlockingIOError:
            break
    return read_end, write_end


def test_a_child_that_stops_reading_never_blocks_the_relay(tmp_path):
    """Queue IDs that find the pipe full are dropped at once (the messages are in
    queue/: the rescan finds them); a config that cannot get through within the
    timeout gets the child killed, so that the relay starts a new one."""
    proc = relay_end(tmp_path)
    read_end, write_end = full_pipe()
    proc.proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    proc._pipe = write_end
    try:
        started = time.monotonic()
        for _ in range(100):
            proc.submit(envelope())
        assert time.monotonic() - started < 1.0, "a full pipe held up the commits"
        assert proc.alive()
        proc.reload(proc.config)  # cannot get through
        assert time.monotonic() - started < 10.0
        assert proc.proc.wait(5) != 0 and not proc.alive()
        assert proc._pipe is None
    finally:
        os.close(read_end)
        if proc.proc.poll() is None:
            proc.proc.kill()
            proc.proc.wait()


def test_frames_arrive_whole_and_in_order(tmp_path):
    proc = relay_end(tmp_path)
    read_end, write_end = os.pipe()
    os.set_blocking(write_end, False)
    proc._pipe = write_end
    ids = [envelope() for _ in range(3)]
    proc.reload(proc.config)
    for env in ids:
        proc.submit(env)
    os.close(write_end)
    frames = []
    while (received := read_frame(read_end)) is not None:
        frames.append(received)
    os.close(read_end)
    assert frames[0][0] == CONFIG
    assert [payload.decode() for _, payload in frames[1:]] == [env.id for env in ids]


def test_a_drain_request_that_is_no_file_is_no_timeout(tmp_path):
    proc = relay_end(tmp_path)
    (Path(proc.spool.root) / ".drain").mkdir()
    assert proc.spool.take_drain_request() is None


def test_a_forked_child_is_waited_for_in_time_and_reaped_once():
    """ForkedChild as Popen: wait(timeout) gives up in time; threads waiting at once
    all get its real exit status (one reaps it, none takes another's loss for a
    kill); once reaped it is never signalled again (its pid may be another's)."""
    told, tell = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        os.close(tell)
        os.read(told, 1)
        os._exit(3)
    os.close(told)
    child = ForkedChild(pid)
    assert child.poll() is None
    started = time.monotonic()
    with pytest.raises(subprocess.TimeoutExpired):
        child.wait(0.2)
    assert 0.2 <= time.monotonic() - started < 2
    seen: list[int] = []
    waiters = [threading.Thread(target=lambda: seen.append(child.wait(10))) for _ in range(4)]
    for waiter in waiters:
        waiter.start()
    os.close(tell)  # the child exits 3
    for waiter in waiters:
        waiter.join(10)
    assert seen == [3] * 4
    assert child.wait(1) == child.poll() == 3
    child.kill()  # reaped: nothing is sent (no ProcessLookupError, no stranger killed)
