"""Torture: spool faults (issue #8). Bad files planted into a real spool, before the
relay starts and while it runs, and more new files at once than inotify can queue.

The spool is laid out by a first run of the relay; the test then writes files the way
a crash, a disk error or a careless administrator would leave them, next to good
messages in the spool's own format (`Envelope.to_bytes`, content in msg/). Expected:
every bad file is moved to corrupt/ (never deleted) with a `quarantined` log line, a
half-written file in tmp/ from a dead process is cleared (it was never acknowledged),
and every good message keeps flowing and is delivered.
"""

from __future__ import annotations

import collections
import json
import os
import smtplib
import subprocess
import threading
import time
from pathlib import Path

import pytest

from smarthost.config import load_config
from smarthost.spool import Envelope, Recipient, is_queue_id, new_id

from support.cli import queue
from support.configs import write_config
from support.logs import events_named
from support.messages import RCPT, SENDER, header_message_id
from support.relay import RelayProcess
from support.sink import Sink
from support.spool import spool_files
from support.torture import arrival_counts
from support.waiting import wait_until

DEADLINE = 60.0  # generous: two busy cores, and the 10 s rescan
INOTIFY_QUEUE = Path("/proc/sys/fs/inotify/max_queued_events")


# -- writing spool files ----------------------------------------------------------------


def content(tag: str, size: int = 0) -> bytes:
    return (
        f"From: {SENDER}\r\nTo: {RCPT}\r\nSubject: spool torture\r\n"
        f"Message-ID: <{tag}@client.test>\r\nDate: Wed, 25 Nov 2026 10:00:00 +0000\r\n"
        f"\r\nbody of {tag}\r\n"
    ).encode() + b"y" * size


def envelope(tag: str, body: bytes, queue_id: str | None = None) -> Envelope:
    return Envelope(
        id=queue_id or new_id(),
        sender=SENDER,
        recipients=[Recipient(RCPT)],
        arrival=time.time(),
        size=len(body),
        message_id=f"<{tag}@client.test>",
    )


class Planter:
    """Writes files straight into a spool's directories, as a crash or a human would."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.good: dict[str, str] = {}  # Message-ID -> queue ID of well-formed messages
        self.bad: dict[str, str] = {}  # queue ID -> what is wrong with it
        self.planted: dict[Path, bytes] = {}  # every bad file written, with its bytes

    def write(self, where: str, name: str, data: bytes) -> None:
        path = self.root / where / name
        path.write_bytes(data)
        if where != "tmp":
            self.planted[path] = data

    def good_message(self, tag: str, where: Path | None = None) -> str:
        """A well-formed message: content in msg/, then its envelope in queue/."""
        body = content(tag)
        env = envelope(tag, body)
        base = where or self.root
        (base / "msg" / env.id).write_bytes(body)
        # The envelope last, by a rename (a commit's order): never seen half-written.
        aside = base / f".{env.id}.env"
        aside.write_bytes(env.to_bytes())
        os.rename(aside, base / "queue" / env.id)
        self.good[f"<{tag}@client.test>"] = env.id
        return env.id

    def bad_envelope(self, kind: str, data: bytes) -> str:
        """Message content with an unreadable envelope beside it in queue/."""
        body = content(kind)
        queue_id = new_id()
        self.write("msg", queue_id, body)
        self.write("queue", queue_id, data)
        self.bad[queue_id] = kind
        return queue_id

    def corrupt_envelopes(self) -> None:
        """One of each kind of envelope that cannot be read."""
        whole = envelope("whole", content("whole")).to_bytes()
        self.bad_envelope("corrupt JSON", b'{"id": "X", "sender": "a@b", "recipients": [{')
        self.bad_envelope("truncated envelope", whole[: len(whole) // 2])
        self.bad_envelope("empty envelope", b"")
        self.bad_envelope("JSON, not an envelope", b"[1, 2, 3]")
        self.bad_envelope("envelope without recipients", b'{"id": "X", "sender": ""}')
        self.bad_envelope("binary envelope", bytes(range(256)) * 4)

    def orphans(self) -> None:
        """Content without an envelope, and an envelope without content."""
        queue_id = new_id()
        self.write("msg", queue_id, content("orphan content"))
        self.bad[queue_id] = "content without an envelope"
        env = envelope("orphan envelope", content("orphan envelope"))
        self.write("queue", env.id, env.to_bytes())
        self.bad[env.id] = "envelope without content"

    def envelope_without_content(self) -> str:
        env = envelope("no content", content("no content"))
        self.write("queue", env.id, env.to_bytes())
        self.bad[env.id] = "envelope without content"
        return env.id


def dead_pid() -> int:
    """The pid of a process that has exited (so its tmp/ files are dead writes)."""
    proc = subprocess.Popen(["true"])
    proc.wait()
    return proc.pid


def first_run(tmp_path: Path, sink: Sink, relay_factory, relay_process) -> RelayProcess:
    """Run the relay once (in-process: quicker) so that the spool's layout is its own;
    return the real process that will run on it."""
    config = write_config(tmp_path, sink.port)
    relay_factory(load_config(config)).stop()
    assert (tmp_path / "spool" / "queue").is_dir()
    return relay_process(config)


def arrived(sink: Sink) -> collections.Counter[str | None]:
    return collections.Counter(header_message_id(m.content) for m in list(sink.messages))


def quarantined_ids(records: list[dict]) -> set[str]:
    return {r.get("queue_id") for r in events_named(records, "quarantined")}


def kept_in_corrupt(root: Path, planted: dict[Path, bytes]) -> list[str]:
    """Planted bad files that are neither where they were nor, byte for byte, in corrupt/."""
    corrupt = [p.read_bytes() for p in (root / "corrupt").iterdir() if p.is_file()]
    missing = []
    for path, data in planted.items():
        if path.exists() and path.read_bytes() == data:
            continue  # left in place (a name the relay does not own)
        if data in corrupt:
            corrupt.remove(data)
            continue
        missing.append(f"{path.parent.name}/{path.name}")
    return missing


def drained(root: Path) -> bool:
    """No message left where a delivery could come from (names the relay owns only)."""
    files = spool_files(root)
    return not [n for d in ("msg", "queue", "active") for n in files[d] if is_queue_id(n)]


def no_errors(records: list[dict]) -> None:
    bad = [r for r in records if r.get("level") in ("error", "critical")]
    bad += [r for r in records if r.get("event") == "<not json>"]
    assert not bad, bad[:5]


# -- 1. bad files planted while the relay is stopped -------------------------------------


def test_bad_files_planted_while_stopped_are_quarantined_and_good_mail_flows(
    tmp_path, sink, relay_factory, relay_process, torture_size, torture_report
):
    """Corrupt, truncated and empty envelopes, content without an envelope and the
    reverse, a half-written file in tmp/ and names the relay does not own: at start the
    bad files go to corrupt/ (byte for byte, with a `quarantined` line each), the dead
    write is cleared, and every good message is delivered."""
    root = tmp_path / "spool"
    proc = first_run(tmp_path, sink, relay_factory, relay_process)
    plant = Planter(root)
    goods = torture_size(10, 200)
    for i in range(goods // 2):
        plant.good_message(f"before.{i}")
    plant.corrupt_envelopes()
    plant.orphans()
    # A commit cut short by a crash: half the content, in tmp/, of a process now dead.
    dead = dead_pid()
    (root / "tmp" / f"{new_id()}.{dead}.msg").write_bytes(content("half")[:40])
    (root / "tmp" / f"{new_id()}.{dead}.env").write_bytes(b'{"id": "')
    # Names no queue ID has: not the relay's to touch, so they stay (never deleted).
    plant.write("queue", "garbage.txt", b"not an envelope")
    plant.write("queue", "0123456789abcdef", b"lower case is not a queue ID")
    plant.write("msg", "README", b"not a message")
    plant.write("queue", os.fsdecode(b"\xff\xfe-bytes"), b"a name that is not UTF-8")
    for i in range(goods // 2, goods):
        plant.good_message(f"after.{i}")

    proc.start()
    wait_until(lambda: set(plant.good) <= set(arrived(sink)), DEADLINE, "every good message")
    wait_until(
        lambda: set(plant.bad) <= quarantined_ids(proc.records()),
        DEADLINE,
        "a quarantined line for every bad file",
    )
    wait_until(lambda: drained(root), DEADLINE, "the queue to empty")
    files = spool_files(root)
    assert proc.stop() == 0

    records = proc.records()
    no_errors(records)
    (started,) = events_named(records, "started")
    assert started["recovered"]["tmp_removed"] == 2, started
    assert files["tmp"] == []
    assert kept_in_corrupt(root, plant.planted) == [], files["corrupt"]
    assert {"garbage.txt", "0123456789abcdef"} <= set(files["queue"]), files
    assert "README" in files["msg"]
    for r in events_named(records, "quarantined"):
        assert r.get("reason") and r.get("level") == "warning", r
    got = arrived(sink)
    assert len(got) == len(plant.good), got  # nothing bad went out
    counts = arrival_counts(plant.good, got)
    torture_report(
        "spool: bad files at start",
        rounds=1,
        note=f"{len(plant.bad)} bad files quarantined, 2 dead tmp/ writes cleared",
        **counts,
    )
    assert counts["lost"] == 0
    assert max(got.values()) == 1


# -- 2. bad files planted while it runs, and an inotify overflow ------------------------


@pytest.fixture
def small_inotify_queue():
    """Lower inotify's per-instance queue to 64 events while the relay starts (the limit
    is taken when an instance is created), and put it back at once."""
    try:
        old = INOTIFY_QUEUE.read_text()
        INOTIFY_QUEUE.write_text("64\n")
    except OSError as exc:
        pytest.skip(f"cannot lower {INOTIFY_QUEUE}: {exc}")
    restored = False

    def restore() -> None:
        nonlocal restored
        if not restored:
            INOTIFY_QUEUE.write_text(old)
            restored = True

    try:
        yield restore
    finally:
        restore()


def test_bad_files_while_running_and_more_files_than_inotify_holds(
    tmp_path, sink, relay_factory, relay_process, small_inotify_queue, torture_size, torture_report
):
    """With the relay running, bad envelopes dropped into queue/ are quarantined (the
    watcher sees them); then hundreds of messages (and a few bad ones) land in queue/ at
    once, more than the relay's 64-event inotify queue holds: the 10 s rescan still
    finds every one, and all good mail is delivered."""
    root = tmp_path / "spool"
    flood = torture_size(300, 3000)
    proc = first_run(tmp_path, sink, relay_factory, relay_process)
    proc.start()
    small_inotify_queue()  # the relay's watcher has its 64-event queue: restore for others
    plant = Planter(root)

    # Bad files, one by one, while it runs.
    plant.corrupt_envelopes()
    plant.envelope_without_content()
    early = set(plant.bad)
    wait_until(
        lambda: early <= quarantined_ids(proc.records()),
        DEADLINE,
        "the watcher's quarantine of bad envelopes",
    )
    plant.good_message("between")
    wait_until(lambda: "<between@client.test>" in arrived(sink), DEADLINE, "a message between")

    # The flood: written aside, then renamed into queue/ in one burst (each rename is a
    # commit), with a few bad envelopes among them.
    staging = tmp_path / "staging"
    for name in ("msg", "queue"):
        (staging / name).mkdir(parents=True)
    ids = [plant.good_message(f"flood.{i}", where=staging) for i in range(flood)]
    for queue_id in ids:
        os.rename(staging / "msg" / queue_id, root / "msg" / queue_id)
    started = time.monotonic()
    for n, queue_id in enumerate(ids):
        os.rename(staging / "queue" / queue_id, root / "queue" / queue_id)
        if n % (flood // 3) == 0:
            plant.bad_envelope(f"corrupt JSON in the flood {n}", b"{{{{")
    wait_until(
        lambda: set(plant.good) <= set(arrived(sink)),
        DEADLINE,
        "every flooded message (the rescan must find what inotify dropped)",
    )
    took = time.monotonic() - started
    wait_until(
        lambda: set(plant.bad) <= quarantined_ids(proc.records()),
        DEADLINE,
        "a quarantined line for every bad file",
    )
    wait_until(lambda: drained(root), DEADLINE, "the queue to empty")
    assert proc.stop() == 0

    records = proc.records()
    no_errors(records)
    assert kept_in_corrupt(root, plant.planted) == [], spool_files(root)["corrupt"]
    got = arrived(sink)
    assert len(got) == len(plant.good), "something bad went out"
    delivered = collections.Counter(r["queue_id"] for r in events_named(records, "delivered"))
    assert set(delivered.values()) == {1}, delivered.most_common(3)
    counts = arrival_counts(plant.good, got)
    torture_report(
        "spool: bad files while running + inotify overflow",
        rounds=1,
        note=f"{flood} files in one burst, max_queued_events=64, all out in {took:.1f}s; "
        f"{len(plant.bad)} bad files quarantined",
        **counts,
    )
    assert counts["lost"] == 0
    assert max(got.values()) == 1


# -- 3. faults the relay does not survive yet (in-process: recovery is the same code) ------


def planted_spool(tmp_path: Path, sink: Sink, relay_factory) -> Path:
    """A spool laid out by a first (in-process) run of the relay."""
    running = relay_factory(load_config(write_config(tmp_path, sink.port)))
    running.stop()
    return tmp_path / "spool"


def first_outcome(events, queue_id: str) -> dict:
    names = ("delivered", "quarantined", "spool_error", "deferred", "failed")
    found = wait_until(
        lambda: [
            r for r in events.records if r["event"] in names and r.get("queue_id") == queue_id
        ],
        DEADLINE,
        f"an outcome for {queue_id}",
    )
    return found[0]


@pytest.mark.parametrize(
    "cut",
    [
        pytest.param(lambda body: body[: len(body) // 2], id="truncated"),
        pytest.param(lambda body: b"", id="empty"),
    ],
)
def test_truncated_message_file_is_quarantined_not_sent(tmp_path, sink, relay_factory, events, cut):
    root = planted_spool(tmp_path, sink, relay_factory)
    body = content("cut")
    env = envelope("cut", body)
    (root / "msg" / env.id).write_bytes(cut(body))
    (root / "queue" / env.id).write_bytes(env.to_bytes())
    relay_factory(load_config(write_config(tmp_path, sink.port)))
    outcome = first_outcome(events, env.id)
    assert outcome["event"] == "quarantined", outcome
    assert not sink.messages, "half a message went out"


@pytest.mark.parametrize("where", ["queue", "msg", "active"])
def test_directory_where_a_spool_file_should_be_is_quarantined(
    tmp_path, sink, relay_factory, events, where
):
    root = planted_spool(tmp_path, sink, relay_factory)
    body = content("dir")
    env = envelope("dir", body)
    (root / "msg" / env.id).write_bytes(body)
    (root / "queue" / env.id).write_bytes(env.to_bytes())
    if where == "active":
        (root / "queue" / env.id).unlink()
    (root / where / env.id).unlink(missing_ok=True)
    (root / where / env.id).mkdir()
    (root / where / env.id / "inside").write_bytes(b"kept")
    relay_factory(load_config(write_config(tmp_path, sink.port)))
    outcome = first_outcome(events, env.id)
    assert outcome["event"] == "quarantined", outcome
    assert any((root / "corrupt").iterdir()), "nothing in corrupt/"


def test_directory_in_tmp_does_not_stop_the_relay(tmp_path, sink, relay_factory, events):
    root = planted_spool(tmp_path, sink, relay_factory)
    (root / "tmp" / f"{new_id()}.{dead_pid()}.msg").mkdir()
    plant = Planter(root)
    plant.good_message("after-tmp-dir")
    relay_factory(load_config(write_config(tmp_path, sink.port)))
    (got,) = sink.wait_for(1, timeout=DEADLINE)
    assert header_message_id(got.content) == "<after-tmp-dir@client.test>"


def test_envelope_naming_another_id_is_quarantined(tmp_path, sink, relay_factory, events):
    root = planted_spool(tmp_path, sink, relay_factory)
    body = content("misnamed")
    env = envelope("misnamed", body)
    file_id = new_id()
    (root / "msg" / file_id).write_bytes(body)
    (root / "queue" / file_id).write_bytes(env.to_bytes())  # says env.id, not file_id
    relay_factory(load_config(write_config(tmp_path, sink.port)))
    (line,) = wait_until(lambda: events.events("quarantined"), DEADLINE, "a quarantined line")
    assert line["files"], line  # what was set aside
    assert not (root / "active" / file_id).exists()
    assert not (root / "msg" / file_id).exists()
    assert len(list((root / "corrupt").iterdir())) == 2


# -- 4. queue commands with garbage in the spool, while mail flows (issue #14) -----------


def queue_command(config: Path, *args: str) -> subprocess.CompletedProcess:
    return queue(
        config, *args, timeout=30
    )  # a FIFO opened by mistake would block: fail, do not hang


def plant_garbage(root: Path, states: tuple[str, ...], kinds: tuple[str, ...]) -> dict[str, str]:
    """One entry of each kind under a fresh queue-ID name in each state directory;
    {"state/ID": kind}. Content in msg/ beside each, as if a message were there."""
    whole = envelope("garbage", content("garbage")).to_bytes()
    makers = {
        "symlink": lambda p: os.symlink("/etc/passwd", p),
        "symlink loop": lambda p: os.symlink(p.name.rsplit("-", 1)[1], p),  # its own name
        "fifo": lambda p: os.mkfifo(p),
        "directory": lambda p: p.mkdir(),
        "truncated envelope": lambda p: p.write_bytes(whole[: len(whole) // 2]),
        "empty envelope": lambda p: p.write_bytes(b""),
        "corrupt envelope": lambda p: p.write_bytes(b"\xff{{{{"),
    }
    planted = {}
    for state in states:
        for kind in kinds:
            queue_id = new_id()
            (root / "msg" / queue_id).write_bytes(content(kind))
            aside = root / "tmp" / f".garbage-{queue_id}"
            makers[kind](aside)
            os.rename(aside, root / state / queue_id)  # appears whole
            planted[f"{state}/{queue_id}"] = kind
    return planted


def check_listing(result: subprocess.CompletedProcess, garbage: dict[str, str], root: Path) -> set:
    """A `queue list --json` run: exit 0, no traceback, every garbage entry still in
    place named on stderr; the IDs it listed."""
    assert result.returncode == 0, (result.returncode, result.stderr[-2000:])
    assert "Traceback" not in result.stderr, result.stderr[-2000:]
    for where in garbage:
        if os.path.lexists(root / where):  # still there after the run: there during it
            assert f"{where}:" in result.stderr, (where, result.stderr[-2000:])
    return {json.loads(line)["id"] for line in result.stdout.splitlines()}


def test_queue_commands_with_garbage_in_every_state_while_mail_flows(
    tmp_path, sink, relay_factory, relay_process, torture_size, torture_report
):
    """Links, a link loop, FIFOs, directories, cut, empty and corrupt envelopes under
    queue-ID names in hold/ and failed/ (which the relay leaves to the administrator),
    and the regular-file and directory kinds in queue/ (which it quarantines), while
    messages flow and `queue list`, `queue list --json` and `queue flush` run over and
    over: every run exits 0 and names the garbage on stderr; 0 lost."""
    root = tmp_path / "spool"
    count = torture_size(30, 500)
    proc = first_run(tmp_path, sink, relay_factory, relay_process)
    config = proc.config_path
    everything = (
        "symlink",
        "symlink loop",
        "fifo",
        "directory",
        "truncated envelope",
        "empty envelope",
        "corrupt envelope",
    )
    garbage = plant_garbage(root, ("hold", "failed"), everything)
    proc.start()
    garbage.update(
        plant_garbage(
            root,
            ("queue",),
            ("directory", "truncated envelope", "empty envelope", "corrupt envelope"),
        )
    )
    acknowledged: dict[str, str] = {}  # Message-ID -> queue ID

    def send_all() -> None:
        with smtplib.SMTP("127.0.0.1", proc.port, timeout=30) as client:
            for i in range(count):
                client.sendmail(SENDER, [RCPT], content(f"queue.{i}"))
                acknowledged[f"<queue.{i}@client.test>"] = ""

    sender = threading.Thread(target=send_all, name="queue-torture-sender")
    sender.start()
    runs = 0
    try:
        while sender.is_alive() or not set(acknowledged) <= set(arrived(sink)):
            for args in (("list", "--json"), ("list",), ("flush",)):
                result = queue_command(config, *args)
                if args[-1] == "--json":
                    check_listing(result, garbage, root)
                else:
                    assert result.returncode == 0, (args, result.stderr[-2000:])
                    assert "Traceback" not in result.stderr
                runs += 1
            if runs > 3000:
                pytest.fail("mail did not flow")
    finally:
        sender.join(60)
    wait_until(lambda: set(acknowledged) <= set(arrived(sink)), DEADLINE, "every message")
    # The relay's own garbage (hold/, failed/) is left for the administrator, and still
    # named by a last listing; the queue/ garbage was quarantined.
    final = queue_command(config, "list", "--json")
    assert final.returncode == 0, final.stderr
    for where, kind in garbage.items():
        if where.startswith(("hold/", "failed/")):
            assert f"{where}:" in final.stderr, (where, kind, final.stderr)
    wait_until(
        lambda: not [w for w in garbage if w.startswith("queue/") and os.path.lexists(root / w)],
        DEADLINE,
        "the queue/ garbage to be quarantined",
    )
    assert proc.stop() == 0
    records = proc.records()
    no_errors(records)
    got = arrived(sink)
    counts = arrival_counts(acknowledged, got)
    torture_report(
        "spool: queue commands with garbage",
        rounds=runs,
        note=f"{len(garbage)} garbage entries in 3 states; {runs} queue command runs, all exit 0",
        **counts,
    )
    assert counts["lost"] == 0


def test_links_and_fifos_in_queue_and_active_are_quarantined_while_running(
    tmp_path, sink, relay_factory, relay_process
):
    """What the relay itself must do with the garbage the queue commands name: a link,
    a link loop and a FIFO under queue-ID names in queue/ and active/ (with content in
    msg/, as if a message were there) go to corrupt/ with a `quarantined` line, no
    `spool_error`, and mail keeps flowing; the queue commands exit 0 meanwhile."""
    root = tmp_path / "spool"
    proc = first_run(tmp_path, sink, relay_factory, relay_process)
    proc.start()
    garbage = plant_garbage(root, ("queue", "active"), ("symlink", "symlink loop", "fifo"))
    for where in garbage:  # touched: the watcher wakes the relay for queue/ at once
        if where.startswith("queue/") and not os.path.islink(root / where):
            os.utime(root / where)
    listed = queue_command(proc.config_path, "list", "--json")
    assert listed.returncode == 0, listed.stderr
    plant = Planter(root)
    plant.good_message("after-garbage")
    wait_until(lambda: "<after-garbage@client.test>" in arrived(sink), DEADLINE, "good mail")
    ids = {where.split("/", 1)[1] for where in garbage}
    wait_until(lambda: ids <= quarantined_ids(proc.records()), 25.0, "a quarantined line for each")
    assert not events_named(proc.records(), "spool_error")
    assert proc.stop() == 0
