"""The spool on its own: IDs, the atomic commit, state moves, recovery and the lock."""

from __future__ import annotations

import errno
import io
import os
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

import smarthost.spool
from smarthost.spool import (
    ACTIVE,
    CORRUPT,
    DEFERRED,
    DIRECTORIES,
    DROP,
    EMBEDDED,
    FAILED,
    FSYNC,
    MSG,
    PENDING,
    QUEUE,
    SYNCFS,
    TMP,
    TRIAL_SHARE,
    CorruptEnvelope,
    Envelope,
    Recipient,
    Spool,
    SpoolError,
    SyncChoice,
    is_queue_id,
    new_id,
)

from support.spool import spool_files
from support.waiting import wait_until

CONTENT = [b"Subject: hi\r\nMessage-ID: <x@y>\r\n", b"\r\nbody \xc3\xa9\r\n.dot\r\n"]


def claim(spool: Spool, queue_id: str) -> Envelope | None:
    """The claimed envelope alone (the content is checked elsewhere)."""
    claimed = spool.claim_message(queue_id)
    return claimed[0] if claimed else None


class AlwaysSyncfs(SyncChoice):
    """The choice pinned: a test that counts syncfs calls must meet them, however slow
    the shared disk makes them."""

    def syncfs_cheaper(self, files: int) -> bool:
        return True


def make_spool(tmp_path: Path, sync: str) -> Spool:
    s = Spool(str(tmp_path / "spool"))
    if sync == "fsync":
        s._syncfs = None
    elif s._syncfs is None:
        pytest.skip("no syncfs(2) that reports errors here (Linux 5.8+)")
    elif sync == "syncfs":
        s.sync_choice = AlwaysSyncfs()
    s.create()
    return s


@pytest.fixture(params=["syncfs", "fsync"])
def spool(tmp_path: Path, request) -> Spool:
    """A spool that commits with syncfs(2) (Linux 5.8+), or with fsyncs, as elsewhere."""
    return make_spool(tmp_path, request.param)


@pytest.fixture
def syncfs_spool(tmp_path: Path) -> Spool:
    return make_spool(tmp_path, "syncfs")


@pytest.fixture
def choosing_spool(tmp_path: Path) -> Spool:
    """A spool with syncfs(2) that chooses per batch, on a clock of its own
    (`spool.sync_choice._clock`, a FakeClock)."""
    spool = make_spool(tmp_path, "choosing")
    spool.sync_choice = SyncChoice(clock=FakeClock())
    return spool


@pytest.fixture
def fsync_spool(tmp_path: Path) -> Spool:
    return make_spool(tmp_path, "fsync")


def uses_syncfs(spool: Spool) -> bool:
    return spool._syncfs is not None


def failing_sync(spool: Spool, monkeypatch, err: int, *, call: int = 1, then=None) -> list:
    """Make the `call`-th step that makes the commit durable fail with `err`: with syncfs
    1 is the data and 2 the names; with fsyncs, the `call`-th fsync. `then` runs first."""
    calls: list = []

    def failing(real):
        def sync(fd: int) -> None:
            calls.append(fd)
            if len(calls) == call:
                if then:
                    then()
                raise OSError(err, os.strerror(err))
            real(fd)

        return sync

    if uses_syncfs(spool):
        monkeypatch.setattr(spool, "_syncfs", failing(spool._syncfs))
    else:
        monkeypatch.setattr(smarthost.spool.os, "fsync", failing(os.fsync))
    return calls


def make_envelope(**changes) -> Envelope:
    fields = {
        "id": new_id(),
        "sender": "a@client.test",
        "recipients": [
            Recipient("b@dest.test"),
            Recipient("c@dest.test", state=DEFERRED, reply="451 4.3.0 later", status="4.3.0"),
        ],
        "arrival": time.time(),
        "size": sum(map(len, CONTENT)),
        "client": "127.0.0.1",
        "message_id": "<x@y>",
    }
    fields.update(changes)
    return Envelope(**fields)


def committed(spool: Spool, **changes) -> Envelope:
    env = make_envelope(**changes)
    spool.commit(env, CONTENT)
    return env


def files(spool: Spool) -> dict[str, list[str]]:
    return spool_files(Path(spool.root))


def visible(spool: Spool) -> dict[str, list[str]]:
    """Every spool directory that holds something (so empty ones compare as absent)."""
    return {name: names for name, names in files(spool).items() if names}


def mode(path: str | Path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


# -- queue IDs ------------------------------------------------------------------------


def test_new_id_is_unique_and_well_formed():
    ids = [new_id() for _ in range(10000)]
    assert len(set(ids)) == len(ids)
    assert all(len(i) == 16 and is_queue_id(i) for i in ids)


def test_new_ids_sort_in_creation_order():
    """IDs made a millisecond or more apart sort as text in the order they were made."""
    ids = []
    for _ in range(5):
        ids.append(new_id())
        start = time.time_ns()
        wait_until(lambda start=start: time.time_ns() - start >= 1_000_000, what="a millisecond")
    assert sorted(ids) == ids
    assert len(set(ids)) == len(ids)


@pytest.mark.parametrize(
    "junk",
    [
        "",
        "short",
        "0123456789ABCDEFG",  # 17 characters
        "0123456789ABCDE",  # 15 characters
        "0123456789abcdef",  # lower case
        "0123456789ABCDEI",  # I is not in Crockford's alphabet
        "0123456789ABCDEU",  # nor is U
        "0123456789ABCD.E",
        ".lock",
        "0123456789ABCDEF.12345.msg",
    ],
)
def test_is_queue_id_rejects_junk(junk):
    assert not is_queue_id(junk)


# -- commit ---------------------------------------------------------------------------


def test_commit_writes_content_and_envelope(spool):
    env = committed(spool)
    assert spool.read_message(env.id, env.size) == b"".join(CONTENT)
    stored = Envelope.from_bytes(Path(spool.path(QUEUE, env.id)).read_bytes())
    assert stored == env
    assert spool.read_envelope(QUEUE, env.id) == env
    assert [(r.address, r.state) for r in stored.recipients] == [
        ("b@dest.test", PENDING),
        ("c@dest.test", DEFERRED),
    ]
    assert stored.recipients[1].reply == "451 4.3.0 later"
    assert visible(spool) == {MSG: [env.id], QUEUE: [env.id]}


def test_a_commit_is_one_file_with_its_envelope_first_and_two_names(spool):
    env = committed(spool)
    data = Path(spool.message_path(env.id)).read_bytes()
    assert data == EMBEDDED + env.to_bytes() + b"\n" + b"".join(CONTENT)
    assert os.path.samefile(spool.message_path(env.id), spool.path(QUEUE, env.id))


def count_fsyncs(monkeypatch) -> dict[str, int]:
    real_fsync = os.fsync
    counts = {"files": 0, "directories": 0}

    def fsync(fd: int) -> None:
        counts["directories" if stat.S_ISDIR(os.fstat(fd).st_mode) else "files"] += 1
        real_fsync(fd)

    monkeypatch.setattr(smarthost.spool.os, "fsync", fsync)
    return counts


def count_syncfs(spool: Spool, monkeypatch) -> list[int]:
    calls: list[int] = []
    real = spool._syncfs

    def syncfs(fd: int) -> None:
        calls.append(fd)
        real(fd)

    if real is not None:
        monkeypatch.setattr(spool, "_syncfs", syncfs)
    return calls


@pytest.mark.parametrize("batch", [1, 5])
def test_a_group_commit_makes_its_data_then_its_names_durable_once(spool, monkeypatch, batch):
    counts = count_fsyncs(monkeypatch)
    syncs = count_syncfs(spool, monkeypatch)
    envs = [make_envelope() for _ in range(batch)]
    assert spool.commit_many([(env, CONTENT) for env in envs]) == [None] * batch
    if uses_syncfs(spool):
        assert (counts, len(syncs)) == ({"files": 0, "directories": 0}, 2)
    else:  # each file's data, then msg/ and queue/
        assert (counts, len(syncs)) == ({"files": batch, "directories": 2}, 0)
    assert sorted(visible(spool)[QUEUE]) == sorted(env.id for env in envs)
    for env in envs:
        assert spool.read_envelope(QUEUE, env.id) == env


# -- syncfs or per-file fsyncs, chosen per batch ----------------------------------------


class FakeClock:
    """time.monotonic for a SyncChoice: moved by the test, and by the sync calls it
    stands in for (`ticking`)."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def simulate(choice: SyncChoice, files: int, syncfs: float, fsync: float, seconds: float):
    """Batches of `files` messages, one every 0.1 s for `seconds` of the choice's
    FakeClock, each made durable the way the choice takes, a call of that way taking
    `syncfs` or `fsync` seconds. The ways taken, in order, and the seconds they cost
    more than the cheaper way would have."""
    clock = choice._clock
    ways, lost = [], 0.0
    batch = {SYNCFS: (2, syncfs), FSYNC: (files + 2, fsync)}
    cheaper = min(calls * each for calls, each in batch.values())
    end = clock.now + seconds
    while clock.now < end:
        way = SYNCFS if choice.syncfs_cheaper(files) else FSYNC
        ways.append(way)
        calls, each = batch[way]
        for _ in range(calls):
            with choice.timing(way):
                clock.now += each
        lost += calls * each - cheaper
        clock.now += 0.1
    return ways, lost


@pytest.mark.parametrize("files", [1, 8, 32])
def test_the_choice_leaves_syncfs_beside_a_busy_writer_and_comes_back_when_quiet(files):
    choice = SyncChoice(clock=FakeClock())
    # A quiet disk: a syncfs costs what an fsync does (each a journal commit), and the
    # batch needs two of them, not files + 2. Trying fsyncs now and then costs little.
    quiet, lost = simulate(choice, files, syncfs=0.0005, fsync=0.0005, seconds=60)
    assert quiet[0] == SYNCFS and quiet.count(SYNCFS) > len(quiet) / 2
    assert quiet.count(FSYNC) > 0 and lost < 2 * TRIAL_SHARE * 60
    # A writer fills the page cache: a syncfs flushes it (300 ms), an fsync does not.
    busy, lost = simulate(choice, files, syncfs=0.3, fsync=0.002, seconds=300)
    assert busy[-3:] == [FSYNC] * 3 and busy.index(FSYNC) < 2  # learnt at once
    trials = busy.count(SYNCFS)
    assert 2 <= trials <= 15, trials  # about once a minute: neither stale nor costly
    assert lost < 2 * TRIAL_SHARE * 300 + 0.6  # the first syncfs is how it learns
    # The writer stops: syncfs is found cheap again at its next trial.
    after, lost = simulate(choice, files, syncfs=0.0005, fsync=0.0005, seconds=300)
    back = after.index(SYNCFS)
    assert back < 700, back  # within 70 s
    assert after[back:].count(SYNCFS) >= len(after[back:]) / 2


def test_the_choice_is_made_per_batch():
    """A syncfs costs a few fsyncs (a writer whose own fsyncs keep the disk busy):
    fsyncs for a small batch, syncfs for a large one."""
    choice = SyncChoice(clock=FakeClock())
    for _ in range(20):
        choice.timed(SYNCFS, 0.010)
        choice.timed(FSYNC, 0.002)
    assert [choice.syncfs_cheaper(files) for files in (1, 4, 8, 32)] == [False, False, True, True]


def ticking(spool: Spool, monkeypatch, seconds: dict[str, float]) -> dict[str, int]:
    """Make each syncfs and fsync take `seconds[way]` (the test may change them) of the
    spool's FakeClock; they still run. Counts the calls."""
    clock = spool.sync_choice._clock
    calls = {SYNCFS: 0, FSYNC: 0}
    real = {SYNCFS: spool._syncfs, FSYNC: os.fsync}

    def call(way: str):
        def sync(fd: int) -> None:
            calls[way] += 1
            clock.now += seconds[way]
            real[way](fd)

        return sync

    monkeypatch.setattr(spool, "_syncfs", call(SYNCFS))
    monkeypatch.setattr(smarthost.spool.os, "fsync", call(FSYNC))
    return calls


def test_a_slow_syncfs_gives_way_to_fsyncs_until_it_is_cheap_again(choosing_spool, monkeypatch):
    spool = choosing_spool
    clock = spool.sync_choice._clock
    seconds = {SYNCFS: 0.25, FSYNC: 0.002}  # a busy writer on the same file system
    calls = ticking(spool, monkeypatch, seconds)
    committed(spool)
    assert calls == {SYNCFS: 2, FSYNC: 0}  # syncfs first: nothing was timed yet
    committed(spool)
    assert calls == {SYNCFS: 2, FSYNC: 3}  # never timed, so tried: the file, msg/, queue/
    committed(spool)
    assert calls == {SYNCFS: 2, FSYNC: 6}  # and kept: cheaper
    seconds[SYNCFS] = 0.001  # the writer stopped
    calls.update({SYNCFS: 0, FSYNC: 0})
    batches = 0
    while True:  # a batch every 0.2 s
        assert batches < 400, "syncfs was never tried again"
        committed(spool)
        batches += 1
        if calls[SYNCFS]:
            break
        clock.now += 0.2
    # Tried once its 0.5 s more a batch is a small share (TRIAL_SHARE) of the time since.
    assert 0.5 / TRIAL_SHARE / 2 < batches * 0.2 < 0.5 / TRIAL_SHARE * 2
    calls[FSYNC] = 0
    for _ in range(5):
        committed(spool)
    assert calls[FSYNC] == 0  # syncfs again: it was cheap
    assert len(visible(spool)[QUEUE]) == batches + 8


def test_the_batch_size_decides_between_syncfs_and_fsyncs(choosing_spool, monkeypatch):
    spool = choosing_spool
    for _ in range(20):
        spool.sync_choice.timed(SYNCFS, 0.010)
        spool.sync_choice.timed(FSYNC, 0.002)
    calls = ticking(spool, monkeypatch, {SYNCFS: 0.010, FSYNC: 0.002})
    assert spool.commit_many([(make_envelope(), CONTENT)]) == [None]
    assert calls == {SYNCFS: 0, FSYNC: 3}
    assert spool.commit_many([(make_envelope(), CONTENT) for _ in range(32)]) == [None] * 32
    assert calls == {SYNCFS: 2, FSYNC: 3}
    assert len(visible(spool)[QUEUE]) == 33


def steer(spool: Spool, way: str) -> None:
    """Have the spool's choice take `way` for the next batches (timings that say so)."""
    for _ in range(20):
        spool.sync_choice.timed(SYNCFS, 0.001 if way == SYNCFS else 1.0)
        spool.sync_choice.timed(FSYNC, 1.0 if way == SYNCFS else 0.001)


@pytest.mark.parametrize("way", [SYNCFS, FSYNC])
def test_the_way_chosen_makes_data_then_names_durable(choosing_spool, monkeypatch, way):
    """Whichever way the choice takes, each file's data is durable before its names
    exist, and the names after they all do: syncfs on the spool's file system, or an
    fsync of each file and of msg/ and queue/."""
    spool = choosing_spool
    steer(spool, way)
    envs = [make_envelope() for _ in range(4)]
    named = lambda: [os.path.exists(spool.path(QUEUE, env.id)) for env in envs]  # noqa: E731
    synced = []
    real_syncfs, real_fsync = spool._syncfs, os.fsync

    def syncfs(fd: int) -> None:
        synced.append((SYNCFS, os.fstat(fd).st_dev, named()))
        real_syncfs(fd)

    def fsync(fd: int) -> None:
        synced.append((FSYNC, os.fstat(fd).st_ino, named()))
        real_fsync(fd)

    monkeypatch.setattr(spool, "_syncfs", syncfs)
    monkeypatch.setattr(smarthost.spool.os, "fsync", fsync)
    assert spool.commit_many([(env, CONTENT) for env in envs]) == [None] * 4
    inode = lambda *path: os.stat(os.path.join(*path)).st_ino  # noqa: E731
    none, every = [False] * 4, [True] * 4
    if way == SYNCFS:
        device = os.stat(spool.root).st_dev
        assert synced == [(SYNCFS, device, none), (SYNCFS, device, every)]
    else:  # each file (queue/ID is its other name) before any name, then both directories
        assert synced == [
            *[(FSYNC, inode(spool.path(QUEUE, env.id)), none) for env in envs],
            (FSYNC, inode(spool.dir(MSG)), every),
            (FSYNC, inode(spool.dir(QUEUE)), every),
        ]
    for env in envs:
        assert spool.read_envelope(QUEUE, env.id) == env


def test_syncfs_chosen_but_queue_dir_not_opened_fsyncs_each_file(choosing_spool, monkeypatch):
    """syncfs needs queue/ open; when that open fails (EMFILE in a flood) the batch
    falls back to per-file fsyncs, and its files must have been written with them."""
    spool = choosing_spool
    steer(spool, SYNCFS)
    real_open, fsynced, refused = os.open, [], []

    def open_(path, flags, *args, **kwargs):
        if flags & os.O_DIRECTORY and os.fspath(path) == spool.dir(QUEUE) and not refused:
            refused.append(path)  # the batch's own open only
            raise OSError(errno.EMFILE, os.strerror(errno.EMFILE))
        return real_open(path, flags, *args, **kwargs)

    def fsync(fd: int) -> None:
        fsynced.append(os.fstat(fd).st_ino)

    monkeypatch.setattr(smarthost.spool.os, "open", open_)
    monkeypatch.setattr(smarthost.spool.os, "fsync", fsync)
    envs = [make_envelope() for _ in range(2)]
    assert spool.commit_many([(env, CONTENT) for env in envs]) == [None, None]
    assert refused
    for env in envs:
        assert os.stat(spool.path(QUEUE, env.id)).st_ino in fsynced
    assert fsynced[-2:] == [os.stat(spool.dir(MSG)).st_ino, os.stat(spool.dir(QUEUE)).st_ino]


def test_a_large_messages_file_is_fsynced_even_when_the_batch_syncfs(choosing_spool, monkeypatch):
    """A Draft's file was written during DATA, before the batch opened the descriptor
    its syncfs reports errors through: it is fsynced on its own descriptor."""
    spool = choosing_spool
    steer(spool, SYNCFS)
    env = make_envelope()
    draft = spool.draft(env.id)
    draft._in_memory = 16
    for chunk in CONTENT:
        draft.write(chunk)
    assert draft.path is not None  # on disk, not in memory
    fsynced = []
    real_fsync = os.fsync

    def fsync(fd: int) -> None:
        fsynced.append(os.fstat(fd).st_ino)
        real_fsync(fd)

    monkeypatch.setattr(smarthost.spool.os, "fsync", fsync)
    assert spool.commit_many([(env, draft)]) == [None]
    assert os.stat(spool.message_path(env.id)).st_ino in fsynced
    assert spool.read_envelope(QUEUE, env.id) == env


@pytest.mark.parametrize("way", [SYNCFS, FSYNC])
@pytest.mark.parametrize("call", [1, 2], ids=["data", "names"])
def test_a_failing_sync_of_the_way_chosen_is_an_error(choosing_spool, monkeypatch, way, call):
    spool = choosing_spool
    steer(spool, way)
    calls: list[str] = []
    real = {SYNCFS: spool._syncfs, FSYNC: os.fsync}
    step = {SYNCFS: call, FSYNC: 2 if call == 1 else 4}[way]  # the 2nd file's, or msg/'s

    def failing(kind: str):
        def sync(fd: int) -> None:
            calls.append(kind)
            if len(calls) == step:
                raise OSError(errno.EIO, os.strerror(errno.EIO))
            real[kind](fd)

        return sync

    monkeypatch.setattr(spool, "_syncfs", failing(SYNCFS))
    monkeypatch.setattr(smarthost.spool.os, "fsync", failing(FSYNC))
    results = spool.commit_many([(make_envelope(), CONTENT) for _ in range(3)])
    assert set(calls) == {way} and len(calls) >= step  # that way, and the fault was hit
    if way == FSYNC and call == 1:  # the 2nd file's own fsync: the others go on
        assert [type(r) for r in results] == [type(None), SpoolError, type(None)]
        assert len(visible(spool)[QUEUE]) == 2
    else:
        assert all(isinstance(r, SpoolError) and r.errno == errno.EIO for r in results)
        assert visible(spool) == {}


def test_one_failed_message_of_a_group_commit_leaves_the_others(spool, monkeypatch):
    envs = [make_envelope() for _ in range(3)]
    real_write_tmp = spool._write_tmp

    def write_tmp(queue_id, *args, **kwargs):
        if queue_id == envs[1].id:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_write_tmp(queue_id, *args, **kwargs)

    monkeypatch.setattr(spool, "_write_tmp", write_tmp)
    first, second, third = spool.commit_many([(env, CONTENT) for env in envs])
    assert first is None and third is None
    assert isinstance(second, SpoolError) and second.no_space
    assert sorted(visible(spool)[QUEUE]) == sorted([envs[0].id, envs[2].id])


def test_a_file_system_without_hard_links_gets_the_envelope_in_a_file_of_its_own(
    spool, monkeypatch
):
    def link(src, dst):
        raise OSError(errno.EPERM, os.strerror(errno.EPERM))

    monkeypatch.setattr(smarthost.spool.os, "link", link)
    env = committed(spool)
    assert not os.path.samefile(spool.message_path(env.id), spool.path(QUEUE, env.id))
    assert spool.read_envelope(QUEUE, env.id) == env
    assert spool.read_message(env.id, env.size) == b"".join(CONTENT)
    assert visible(spool) == {MSG: [env.id], QUEUE: [env.id]}


def test_the_first_change_of_the_envelope_gives_it_a_file_of_its_own(spool):
    env = committed(spool)
    claimed = claim(spool, env.id)
    claimed.attempts = 1
    spool.requeue(claimed)
    assert not os.path.samefile(spool.message_path(env.id), spool.path(QUEUE, env.id))
    assert Path(spool.path(QUEUE, env.id)).read_bytes() == claimed.to_bytes()
    assert spool.read_envelope(QUEUE, env.id).attempts == 1
    assert spool.read_message(env.id, env.size) == b"".join(CONTENT)


def test_the_envelope_is_read_without_the_content_after_it(spool):
    big = [b"Subject: big\r\n\r\n", b"x" * 1_000_000 + b"\r\n"]
    env = make_envelope(size=sum(map(len, big)))
    spool.commit(env, big)
    assert spool.envelope_bytes(QUEUE, env.id) == env.to_bytes()
    assert spool.read_message(env.id, env.size) == b"".join(big)


def test_a_claim_brings_the_content_it_read_with_the_envelope(spool):
    env = committed(spool)
    claimed, content = spool.claim_message(env.id)
    assert claimed == env
    assert content == b"".join(CONTENT)


def test_a_claim_of_a_big_message_leaves_the_content_to_read_message(spool):
    big = [b"Subject: big\r\n\r\n", b"x" * 200_000 + b"\r\n"]
    env = make_envelope(size=sum(map(len, big)))
    spool.commit(env, big)
    claimed, content = spool.claim_message(env.id)
    assert (claimed, content) == (env, None)
    assert spool.read_message(env.id, env.size) == b"".join(big)


def test_a_claim_of_content_cut_short_quarantines_it(spool, events):
    env = make_envelope(size=sum(map(len, CONTENT)) + 10)  # the envelope says 10 more
    spool.commit(env, CONTENT)
    assert spool.claim_message(env.id) is None
    assert visible(spool)[CORRUPT] == sorted([f"{env.id}.envelope", f"{env.id}.message"])
    (event,) = events.events("quarantined", queue_id=env.id)
    assert "bytes, not" in event["reason"]


def test_a_spool_of_the_earlier_two_file_format_is_read(spool):
    """Mail queued by an earlier version: content and envelope in files of their own."""
    env = make_envelope()
    Path(spool.message_path(env.id)).write_bytes(b"".join(CONTENT))
    Path(spool.path(QUEUE, env.id)).write_bytes(env.to_bytes())
    assert spool.read_envelope(QUEUE, env.id) == env
    assert spool.read_message(env.id, env.size) == b"".join(CONTENT)
    assert spool.recover()["orphans"] == 0


def test_an_embedded_envelope_without_its_end_is_corrupt(spool):
    env = make_envelope()
    Path(spool.path(QUEUE, env.id)).write_bytes(EMBEDDED + env.to_bytes())
    with pytest.raises(CorruptEnvelope):
        spool.read_envelope(QUEUE, env.id)


# -- reading a message in blocks (delivery and DSNs of large mail) ---------------------

HEAD = b"Subject: big\r\nMessage-ID: <big@client.test>\r\n\r\n"


def test_open_message_is_at_the_content_of_either_layout(spool):
    content = HEAD + b"x" * 200_000 + b"\r\n"
    env = make_envelope(size=len(content))
    spool.commit(env, [content])
    with spool.open_message(env.id, env.size) as file:
        assert file.read() == content
    # The two-file layout: msg/ID holds the content only.
    Path(spool.message_path(env.id)).unlink()
    Path(spool.message_path(env.id)).write_bytes(content)
    with spool.open_message(env.id, env.size) as file:
        assert file.read() == content


def test_open_message_finds_an_envelope_longer_than_a_block(spool):
    history = [
        {"at": float(i), "event": "deferred", "reply": "451 " + "w" * 60} for i in range(2000)
    ]
    env = make_envelope(history=history)
    assert len(env.to_bytes()) > 2 * 65536
    spool.commit(env, CONTENT)
    with spool.open_message(env.id, env.size) as file:
        assert file.read() == b"".join(CONTENT)


@pytest.mark.parametrize("error", [-1, +1, +100_000])
def test_open_message_of_the_wrong_size_is_corrupt(spool, error):
    env = make_envelope(size=sum(map(len, CONTENT)) + error)
    spool.commit(env, CONTENT)
    with pytest.raises(CorruptEnvelope, match="bytes, not"):
        spool.open_message(env.id, env.size)
    with spool.open_message(env.id) as file:  # no size: nothing to check against
        assert file.read() == b"".join(CONTENT)


def test_open_message_refuses_what_is_not_a_file(spool, tmp_path):
    env = committed(spool)
    path = Path(spool.message_path(env.id))
    path.unlink()
    target = tmp_path / "elsewhere"
    target.write_bytes(b"".join(CONTENT))
    path.symlink_to(target)
    with pytest.raises(CorruptEnvelope, match="symbolic link"):
        spool.open_message(env.id, env.size)
    path.unlink()
    path.mkdir()
    with pytest.raises(CorruptEnvelope, match="directory"):
        spool.open_message(env.id, env.size)
    path.rmdir()
    with pytest.raises(FileNotFoundError):
        spool.open_message(env.id, env.size)


def test_open_message_of_an_envelope_without_its_end_is_corrupt(spool):
    env = make_envelope()
    Path(spool.message_path(env.id)).write_bytes(EMBEDDED + env.to_bytes() + b"x" * 100_000)
    with pytest.raises(CorruptEnvelope, match="no end"):
        spool.open_message(env.id)


@pytest.mark.parametrize(
    ("head", "body"),
    [
        (HEAD, b"body\r\n" * 100_000),
        (b"Subject: lf\n\n", b"body\n"),
        (b"Subject: bare lf then crlf\n\r\n", b"body\r\n\r\nmore\r\n"),
        (b"\r\n", b"no header section\r\n\r\n"),
        (b"Subject: all header, no body\r\n", b""),
    ],
)
def test_read_message_head_is_the_header_section(spool, head, body):
    env = make_envelope(size=len(head + body))
    spool.commit(env, [head, body])
    assert spool.read_message_head(env.id) == head


@pytest.mark.parametrize("split", [0, 1, 2, 3])  # bytes of "\n\r\n" in the first block
def test_read_message_head_finds_the_end_across_blocks(spool, split):
    field = b"X-Long: " + b"y" * (65536 - split + 3 - 24) + b"\r\n"
    head = b"Subject: s\r\n" + field + b"\r\n"
    assert head[65536 - split : 65536 - split + 3] == b"\n\r\n"  # the end, at the block edge
    env = make_envelope(size=len(head) + 6)
    spool.commit(env, [head, b"body\r\n"])
    assert spool.read_message_head(env.id) == head


def test_read_message_head_is_bounded(spool):
    endless = b"X-Field: " + b"z" * 3_000_000  # no end to the header section
    env = make_envelope(size=len(endless))
    spool.commit(env, [endless])
    assert spool.read_message_head(env.id, limit=100_000) == endless[:100_000]
    assert spool.read_message_head(env.id) == endless[: 1 << 20]


def test_commit_files_and_directories_are_private(spool):
    old_umask = os.umask(0)  # a permissive umask must not widen anything
    try:
        env = committed(spool)
    finally:
        os.umask(old_umask)
    assert mode(spool.message_path(env.id)) == 0o600
    assert mode(spool.path(QUEUE, env.id)) == 0o600
    # The root only lets local users through to the drop area: nothing to list or read.
    assert mode(spool.root) == 0o711
    for name in DIRECTORIES:
        assert mode(spool.dir(name)) == 0o700, name
    assert mode(spool.dir(DROP)) == 0o1733


def test_commit_sets_next_attempt_as_mtime(spool):
    due = time.time() + 600
    env = committed(spool, next_attempt=due)
    assert dict(spool.scan()) == pytest.approx({env.id: due}, abs=1e-3)


def failing_write(monkeypatch, err: int) -> None:
    """Writes into spool files get half their bytes on disk, then fail with `err`."""

    class HalfWriter(io.FileIO):
        def write(self, data) -> int:
            super().write(bytes(data)[: len(data) // 2])
            raise OSError(err, os.strerror(err))

    def fdopen(fd: int, mode: str = "r", *args, closefd: bool = True, **kwargs):
        return HalfWriter(fd, "wb", closefd=closefd)

    monkeypatch.setattr(smarthost.spool.os, "fdopen", fdopen)


@pytest.mark.parametrize(
    ("err", "no_space"), [(errno.ENOSPC, True), (errno.EDQUOT, True), (errno.EIO, False)]
)
@pytest.mark.parametrize("call", [1, 2], ids=["data", "names"])
def test_commit_sync_failure_leaves_nothing(spool, monkeypatch, err, no_space, call):
    calls = failing_sync(spool, monkeypatch, err, call=call)
    env = make_envelope()
    with pytest.raises(SpoolError) as caught:
        spool.commit(env, CONTENT)
    assert len(calls) == call  # the fault really was hit
    assert caught.value.errno == err
    assert caught.value.no_space is no_space
    assert env.id in str(caught.value)
    assert visible(spool) == {}


def test_a_failed_sync_fails_the_whole_batch_and_leaves_nothing(spool, monkeypatch):
    # syncfs: the batch's data; fsyncs: msg/, after the four files' own.
    failing_sync(spool, monkeypatch, errno.EIO, call=1 if uses_syncfs(spool) else 5)
    envs = [make_envelope() for _ in range(4)]
    results = spool.commit_many([(env, CONTENT) for env in envs])
    assert all(isinstance(r, SpoolError) for r in results)
    assert visible(spool) == {}


@pytest.mark.parametrize(("err", "no_space"), [(errno.ENOSPC, True), (errno.EIO, False)])
def test_commit_write_failure_leaves_nothing(spool, monkeypatch, err, no_space):
    failing_write(monkeypatch, err)
    with pytest.raises(SpoolError) as caught:
        spool.commit(make_envelope(), CONTENT)
    assert caught.value.errno == err
    assert caught.value.no_space is no_space
    assert visible(spool) == {}


@pytest.mark.parametrize("call", [2, 3], ids=["msg-dir-fsync", "queue-dir-fsync"])
def test_commit_directory_fsync_failure_leaves_nothing(fsync_spool, monkeypatch, call):
    """The client gets 4xx for this message, so no half of it may stay in the spool."""
    spool = fsync_spool
    calls = failing_sync(spool, monkeypatch, errno.EIO, call=call)
    env = make_envelope()
    with pytest.raises(SpoolError):
        spool.commit(env, CONTENT)
    assert len(calls) == call
    assert visible(spool) == {}


def test_commit_names_sync_failure_after_a_claim_keeps_the_message(spool, monkeypatch):
    """A worker that claimed the envelope in the meantime keeps its content (at-least-once)."""
    env = make_envelope()

    def a_sender_thread_gets_there_first():
        assert claim(spool, env.id) == env

    failing_sync(spool, monkeypatch, errno.EIO, call=2, then=a_sender_thread_gets_there_first)
    with pytest.raises(SpoolError):
        spool.commit(env, CONTENT)
    assert visible(spool) == {ACTIVE: [env.id], MSG: [env.id]}
    assert spool.read_message(env.id) == b"".join(CONTENT)


def test_commit_works_again_after_the_fault_is_gone(spool, monkeypatch):
    failing_sync(spool, monkeypatch, errno.ENOSPC)
    with pytest.raises(SpoolError):
        spool.commit(make_envelope(), CONTENT)
    monkeypatch.undo()
    env = committed(spool)
    assert visible(spool) == {MSG: [env.id], QUEUE: [env.id]}


# -- claim, requeue, finish, park -----------------------------------------------------


def test_claim_moves_to_active_once(spool):
    env = committed(spool)
    claimed = claim(spool, env.id)
    assert claimed == env
    assert visible(spool) == {ACTIVE: [env.id], MSG: [env.id]}
    assert claim(spool, env.id) is None
    assert spool.locate(env.id) == ACTIVE


def test_claim_of_unknown_id_is_none(spool):
    assert claim(spool, new_id()) is None
    assert visible(spool) == {}


def replace_envelope(spool: Spool, queue_id: str, data: bytes) -> None:
    """Put another file in queue/ (writing into it would change the content too: until
    the envelope's first change both are one file)."""
    path = Path(spool.path(QUEUE, queue_id))
    path.unlink()
    path.write_bytes(data)


@pytest.mark.parametrize(
    "garbage",
    [
        b"\x00\xff\xfe not json at all",
        b"{truncated",
        b"",
        b"null",
        b"[]",
        b'"a string"',
        b"{}",
        b'{"id": "X", "sender": "", "recipients": [], "arrival": 0}',
        b'{"id": 5, "sender": "", "recipients": [{"address": "b@x"}], "arrival": 0}',
        b'{"id": "X", "sender": "", "recipients": ["b@x"], "arrival": 0}',
    ],
    ids=lambda g: repr(g[:20]),
)
def test_claim_quarantines_a_corrupt_envelope(spool, events, garbage):
    env = committed(spool)
    replace_envelope(spool, env.id, garbage)
    assert claim(spool, env.id) is None
    assert visible(spool) == {CORRUPT: sorted([f"{env.id}.envelope", f"{env.id}.message"])}
    corrupt = Path(spool.dir(CORRUPT))
    assert (corrupt / f"{env.id}.envelope").read_bytes() == garbage  # kept, not deleted
    assert (corrupt / f"{env.id}.message").read_bytes().endswith(b"".join(CONTENT))
    (event,) = events.events("quarantined", queue_id=env.id)
    assert event["levelname"] == "WARNING"
    assert event["reason"]


def test_claim_quarantines_deeply_nested_json(spool, events):
    """Garbage that makes json recurse is still just a corrupt envelope."""
    env = committed(spool)
    replace_envelope(spool, env.id, b"[" * 100_000)
    assert claim(spool, env.id) is None
    assert f"{env.id}.envelope" in files(spool)[CORRUPT]


def test_quarantine_never_overwrites_earlier_corrupt_files(spool, events):
    env = committed(spool)
    replace_envelope(spool, env.id, b"first")
    claim(spool, env.id)
    spool.commit(env, CONTENT)  # the same ID again (a restored backup, say)
    replace_envelope(spool, env.id, b"second")
    claim(spool, env.id)
    corrupt = Path(spool.dir(CORRUPT))
    assert (corrupt / f"{env.id}.envelope").read_bytes() == b"first"
    assert (corrupt / f"{env.id}.envelope.1").read_bytes() == b"second"
    assert len(events.events("quarantined", queue_id=env.id)) == 2


def watch_renames(spool: Spool, monkeypatch, queue_id: str) -> list[list[str]]:
    """After every rename, record the envelope states holding `queue_id`."""
    real_rename = os.rename
    seen: list[list[str]] = []

    def rename(src, dst) -> None:
        real_rename(src, dst)
        seen.append([s for s in (QUEUE, ACTIVE, FAILED) if os.path.exists(spool.path(s, queue_id))])

    monkeypatch.setattr(smarthost.spool.os, "rename", rename)
    return seen


def test_requeue_keeps_one_envelope_with_next_attempt_as_mtime(spool, monkeypatch):
    env = claim(spool, committed(spool).id)
    assert env is not None
    env.attempts = 1
    env.next_attempt = time.time() + 3600
    env.recipients[0].state = DEFERRED
    env.last_error = "451 4.3.0 try later"
    seen = watch_renames(spool, monkeypatch, env.id)
    spool.requeue(env)
    assert seen, "requeue renamed nothing"
    assert all(len(states) == 1 for states in seen), seen  # never in two states at once
    assert visible(spool) == {MSG: [env.id], QUEUE: [env.id]}
    assert spool.read_envelope(QUEUE, env.id) == env
    assert dict(spool.scan()) == pytest.approx({env.id: env.next_attempt}, abs=1e-3)


def test_finish_removes_envelope_and_content(spool):
    env = claim(spool, committed(spool).id)
    assert env is not None
    spool.finish(env)
    assert visible(spool) == {}
    assert spool.locate(env.id) is None


def test_park_failed_keeps_the_message_in_failed(spool, monkeypatch):
    env = claim(spool, committed(spool).id)
    assert env is not None
    env.recipients[0].state = smarthost.spool.FAILED_RCPT
    env.last_error = "550 5.1.1 no such user"
    seen = watch_renames(spool, monkeypatch, env.id)
    spool.park_failed(env)
    assert all(len(states) == 1 for states in seen), seen
    assert visible(spool) == {FAILED: [env.id], MSG: [env.id]}
    assert spool.read_envelope(FAILED, env.id) == env
    assert spool.read_message(env.id) == b"".join(CONTENT)


# -- recovery -------------------------------------------------------------------------


def dead_pid() -> int:
    """The pid of a process that has exited and been reaped."""
    proc = subprocess.Popen(["true"])
    proc.wait()
    return proc.pid


def test_recover(spool, events):
    tmp = Path(spool.dir(TMP))
    claimed = committed(spool)
    claim(spool, claimed.id)
    waiting = committed(spool)
    no_content = committed(spool)
    os.unlink(spool.message_path(no_content.id))
    no_envelope = committed(spool)
    os.unlink(spool.path(QUEUE, no_envelope.id))
    dead = tmp / f"{new_id()}.{dead_pid()}.msg"
    mine = tmp / f"{new_id()}.{os.getpid()}.env"  # this process is (re)starting: stale
    live = tmp / f"{new_id()}.{os.getppid()}.msg"  # another live writer: not ours to touch
    junk = tmp / "junk"
    for path in (dead, mine, live, junk):
        path.write_bytes(b"partial")

    counts = spool.recover()

    assert counts == {"tmp_removed": 3, "requeued": 1, "orphans": 2}
    assert visible(spool) == {
        TMP: [live.name],
        MSG: sorted([claimed.id, waiting.id]),
        QUEUE: sorted([claimed.id, waiting.id]),
        CORRUPT: sorted([f"{no_content.id}.envelope", f"{no_envelope.id}.message"]),
    }
    assert spool.read_envelope(QUEUE, claimed.id) == claimed
    assert len(events.events("quarantined", queue_id=no_content.id)) == 1
    assert len(events.events("quarantined", queue_id=no_envelope.id)) == 1


def test_recover_quarantines_orphans_in_every_state(spool, events):
    """An envelope without content is set aside whether held, failed or active."""
    ids = {}
    for state in (ACTIVE, "hold", FAILED):
        env = committed(spool)
        spool.move(env.id, QUEUE, state)
        os.unlink(spool.message_path(env.id))
        ids[state] = env.id
    assert spool.recover()["orphans"] == 3
    assert visible(spool) == {CORRUPT: sorted(f"{i}.envelope" for i in ids.values())}


def test_recover_on_a_clean_spool_changes_nothing(spool):
    env = committed(spool)
    assert spool.recover() == {"tmp_removed": 0, "requeued": 0, "orphans": 0}
    assert visible(spool) == {MSG: [env.id], QUEUE: [env.id]}


# -- the lock -------------------------------------------------------------------------


def test_lock_excludes_a_second_relay(spool):
    spool.lock()
    try:
        other = Spool(spool.root)
        with pytest.raises(SpoolError) as caught:
            other.lock(wait=0.2)
        assert caught.value.errno == errno.EBUSY
        assert str(os.getpid()) in str(caught.value)
    finally:
        spool.unlock()
    other.lock()
    try:
        with pytest.raises(SpoolError):
            Spool(spool.root).lock(wait=0.2)
    finally:
        other.unlock()


def test_lock_waits_for_a_holder_that_lets_go(spool):
    """A killed relay's delivery process needs a moment to exit: the next start waits."""
    import threading

    spool.lock()
    threading.Timer(0.3, spool.unlock).start()
    other = Spool(spool.root)
    other.lock(wait=10.0)  # would raise EBUSY had it not waited
    other.unlock()


def test_no_command_claims_while_nobody_holds_the_claims_lock(spool):
    with spool.no_command_claims() as nobody:
        assert nobody
    with spool.command_claims(), spool.no_command_claims() as nobody:
        assert not nobody
    with spool.no_command_claims() as nobody:
        assert nobody


def test_a_killed_command_leaves_no_claims_lock_behind(spool):
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, time; from smarthost.spool import Spool\n"
            f"with Spool({spool.root!r}).command_claims():\n"
            "    print('held', flush=True); time.sleep(60)",
        ],
        stdout=subprocess.PIPE,
    )
    try:
        assert holder.stdout.readline() == b"held\n"
        with spool.no_command_claims() as nobody:
            assert not nobody
    finally:
        holder.kill()
        holder.wait()
        holder.stdout.close()
    with spool.no_command_claims() as nobody:
        assert nobody


@pytest.mark.skipif(os.geteuid() != 0, reason="files given to the spool's owner: needs root")
def test_a_claims_lock_made_by_root_belongs_to_the_spools_owner(spool):
    os.chown(spool.root, 65534, 65534)
    with spool.command_claims():
        pass
    assert os.stat(os.path.join(spool.root, ".commands")).st_uid == 65534
