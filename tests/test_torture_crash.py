"""Torture: kill -9 the real relay (and queue commands) at random and at precise moments,
restart it on the same spool, and count what became of every acknowledged message.

The precise moments come from the fault hook in tests/faults: the relay runs as
`python -m faults ... serve`, which wraps the os calls the spool makes and sends the
process SIGKILL at the Nth call matching a rule (a rename into queue/, an fsync of a
file in tmp/, the first unlink in active/...). After every restart: each acknowledged
message reached the upstream whole (or its sender got a DSN), tmp/ is clean, every
envelope has its content, and corrupt/ holds at most the content a crash left between
two steps of one message's life. Counts go to the `make torture` report.
"""

from __future__ import annotations

import contextlib
import os
import random
import signal
import threading
import time
from pathlib import Path

import pytest

from smarthost.config import load_config
from smarthost.delivery import Delivery
from smarthost.sender import DATA_BLOCK
from smarthost.spool import EMBEDDED, Envelope, Recipient, Spool, new_id

from faults.harness import (
    DEADLINE,
    LARGE_SIZES,
    FaultyRelay,
    HoldingHandler,
    Ledger,
    assert_leftovers_whole,
    assert_spool_sane,
    body,
    delivery_children,
    faulty_relays,
    holding_sink,
    lines_for_size,
    message,
    problems,
    queue_command,
    read_fault_log,
    resolve,
    try_send,
)
from support.configs import write_config
from support.load import LoadClient, clients_running
from support.logs import events_named
from support.messages import RCPT, SENDER
from support.procs import running
from support.sink import Sink
from support.spool import spool_drained, spool_files
from support.waiting import wait_until


@pytest.fixture
def faulty(tmp_path):
    yield from faulty_relays(tmp_path)


def queue_id_of(path: str) -> str:
    return Path(path).name.split(".")[0]


def wait_at_rest(ledger: Ledger, sink: Sink, spool: Path, leftovers: set[str] | None) -> None:
    """Every acknowledged message settled, nothing left to send, the spool consistent."""
    ledger.wait_settled(sink, spool)
    wait_until(
        lambda: spool_drained(spool, "tmp"), DEADLINE, f"a drained spool: {spool_files(spool)}"
    )
    assert_spool_sane(spool, leftovers)


# -- 1. kill -9 at random moments under load ----------------------------------------------


class LedgerClient(LoadClient):
    """Sends messages (5 per session) until halted; records each acknowledged one.
    A `large` share of them is large mail (LARGE_SIZES: a Draft, the two-file commit)."""

    def __init__(
        self,
        port: int,
        tag: str,
        ledger: Ledger,
        lock: threading.Lock,
        large: float = 0.0,
        seed: int = 0,
    ) -> None:
        super().__init__(port, tag, timeout=15)
        self.ledger, self.lock = ledger, lock
        self.large = large
        self.rng = random.Random(f"{seed}.{tag}")

    def lines(self, message_id: str) -> int:
        if self.large and self.rng.random() < self.large:
            return lines_for_size(message_id, self.rng.randint(*LARGE_SIZES))
        return 20

    def content(self, message_id: str) -> bytes:
        lines = self.lines(message_id)
        with self.lock:  # known before the 250: a commit killed before
            self.ledger.lines[message_id] = lines  # it may go out too
        return message(message_id, lines)

    def acknowledged(self, message_id: str, queue_id: str) -> None:
        with self.lock:
            self.ledger.acked[message_id] = queue_id


# mix: (share of large mail, rounds in make test and under --torture, report line)
RANDOM_MIXES = {
    "small": (0.0, (2, 30), "crash: kill -9 at random moments under load"),
    "large": (0.25, (2, 16), "crash: kill -9 at random moments under load, large mail mix"),
}


@pytest.mark.parametrize(
    "mix",
    [
        # In `make test`, test_process.py kills the relay under small-mail load.
        pytest.param("small", marks=pytest.mark.torture),
        "large",
    ],
)
def test_kill_9_at_random_moments_under_load(
    tmp_path, sink, faulty, mix, torture_size, torture_report
):
    """SPEC §1.1 over many rounds: clients send, the relay is killed after a random
    number of acknowledgements and a random pause, then restarted on the same spool.
    Every acknowledged message arrives whole; extra copies are bounded by the envelopes
    that were in active/ (claimed by an attempt) at each kill.

    The large mix makes a quarter of the messages large mail (300 KiB - 2 MiB: written
    into a Draft in tmp/ as it arrives, committed in two files, streamed from its file
    to the upstream), and every other round the kill comes from the fault hook at a
    random write into a draft: a session is then mid-DATA of a large message. What the
    dead relay left in tmp/ (its drafts) is cleared at the next start, and nothing
    acknowledged is quarantined."""
    large, sizes, scenario = RANDOM_MIXES[mix]
    rounds = torture_size(*sizes)
    seed = random.randrange(2**32)
    rng = random.Random(seed)
    spool = tmp_path / "spool"
    proc = faulty(write_config(tmp_path, sink.port))
    ledger, lock = Ledger(), threading.Lock()
    drafts = hook_kills = 0
    proc.start()
    for round_no in range(rounds):
        clients = [
            LedgerClient(proc.port, f"r{round_no}c{i}", ledger, lock, large, seed) for i in range(3)
        ]
        in_a_draft = bool(large) and round_no % 2 == 1
        before = len(ledger.acked)
        target = before + rng.randint(1, 25)
        with clients_running(clients, 30):
            wait_until(
                lambda t=target, cs=clients: (
                    len(ledger.acked) >= t or not all(c.is_alive() for c in cs)
                ),
                DEADLINE,
                "acknowledgements before the kill",
            )
            assert all(c.is_alive() for c in clients), [c.error for c in clients]
            if in_a_draft:
                nth = rng.randint(1, 30)  # a write of 64 KiB at most: mid-DATA
                rule = {"op": "write", "path": "tmp_draft", "process": "relay"}
                proc.arm(resolve(rule, spool, nth=nth, action="kill"))
                proc.wait_killed()
                proc.disarm()
                hook_kills += 1
            else:
                time.sleep(rng.uniform(0, 0.25))  # paces the fault: a random moment
                proc.kill()
            files = spool_files(spool)
            ledger.in_flight += len(files["active"])
        assert not [c for c in clients if c.is_alive()], "a client hung after the kill"
        assert not [c.error for c in clients if c.refused], (seed, [c.error for c in clients])
        left = [name for name in files["tmp"] if name.endswith(".draft")]
        assert left or not in_a_draft, (seed, files)  # the hook struck inside one
        drafts += len(left)
        proc.start()  # the restart: same config, same spool
        started = events_named(proc.records(), "started")[-1]
        # Every tmp file of the dead processes (drafts too) is cleared before listening.
        assert started["recovered"]["tmp_removed"] == len(files["tmp"]), (seed, started, files)
        # A kill between a commit's two renames, or between a removal's two unlinks,
        # leaves content without envelope: set aside whole, never an envelope.
        wait_at_rest(ledger, sink, spool, leftovers=None)
        assert_leftovers_whole(spool, ledger.lines)
    assert proc.stop() == 0
    assert_no_acknowledged_mail_quarantined(proc, ledger)
    counts = ledger.counts(sink)
    note = f"seed {seed}; in_flight = envelopes in active/ at the kills"
    if large:
        big = sum(ledger.lines[m] > 20 for m in ledger.acked)
        note += (
            f"; {big} large acknowledged; {hook_kills} kills inside a draft write; "
            f"{drafts} drafts left in tmp/, cleared at restart"
        )
    torture_report(scenario, rounds=rounds, **counts, note=note)
    ledger.assert_safe(sink, counts, seed)
    assert not problems(proc.records())


def assert_no_acknowledged_mail_quarantined(proc: FaultyRelay, ledger: Ledger) -> None:
    """Of an acknowledged message, recovery sets aside at most the content its removal
    left (the envelope goes first, once delivered or bounced): never its envelope, never
    a message that still had to go out (that one would also count as lost)."""
    acked = set(ledger.acked.values())
    wrong = [
        r
        for r in events_named(proc.records(), "quarantined")
        if r.get("queue_id") in acked and r.get("state") != "msg"
    ]
    assert not wrong, wrong


# -- 1b. kill -9 of the delivery process alone ----------------------------------------------


def active_claims(spool: Path) -> set[tuple[str, int]]:
    """The envelopes in active/, each with the time of its claim (the rename's ctime):
    the same message claimed again later is another claim."""
    claims = set()
    for name in spool_files(spool)["active"]:
        with contextlib.suppress(FileNotFoundError):
            claims.add((name, (spool / "active" / name).stat().st_ctime_ns))
    return claims


def test_kill_9_of_the_delivery_process_alone(tmp_path, sink, faulty, torture_size, torture_report):
    """The delivery process (serve's child: scheduler, senders) is killed at random
    moments under load, round after round, while the relay lives on: each time the relay
    logs an internal_error naming it and starts another (the fault hook in it too),
    receiving never stops, and mail sent after the replacement goes out. In the end
    every acknowledged message went out whole; extra copies only of claimed ones."""
    rounds = torture_size(2, 20)
    seed = random.randrange(2**32)
    rng = random.Random(seed)
    spool = tmp_path / "spool"
    proc = faulty(write_config(tmp_path, sink.port)).start()
    relay_pid = proc.proc.pid
    ledger, lock = Ledger(), threading.Lock()
    claims_seen: set[tuple[str, int]] = set()
    victim = proc.delivery_pid
    for round_no in range(rounds):
        # Clients for this round only: a backlog that grows round after round would
        # make the new process's first message wait behind it.
        clients = [
            LedgerClient(proc.port, f"alone.r{round_no}c{i}", ledger, lock) for i in range(3)
        ]
        with clients_running(clients, 30):
            target = len(ledger.acked) + rng.randint(1, 25)
            wait_until(
                lambda t=target, cs=clients: (
                    len(ledger.acked) >= t or not all(c.is_alive() for c in cs)
                ),
                DEADLINE,
                "acknowledgements before the kill",
            )
            assert all(c.is_alive() for c in clients), [c.error for c in clients]
            time.sleep(rng.uniform(0, 0.25))  # paces the fault: a random moment
            errors = len(events_named(proc.records(), "internal_error"))
            os.kill(victim, signal.SIGKILL)
            wait_until(lambda v=victim: not running(v), DEADLINE, "the delivery process to die")
            claims = active_claims(spool)  # nobody claims until a new process runs
            ledger.in_flight += len(claims - claims_seen)
            claims_seen |= claims
            acked_at_kill = len(ledger.acked)
            (error,) = wait_until(
                lambda n=errors: events_named(proc.records(), "internal_error")[n:],
                DEADLINE,
                "the relay to log the death of its delivery process",
            )
            assert f"delivery process {victim} exited" in error["error"], error
            (victim,) = wait_until(
                lambda v=victim: [p for p in delivery_children(relay_pid) if p != v],
                DEADLINE,
                "a new delivery process",
            )
            wait_until(
                lambda v=victim: proc.installed(v) == "delivery",
                DEADLINE,
                "the fault hook in the new delivery process",
            )
            assert proc.alive()
            # Receiving went on all along.
            wait_until(
                lambda n=acked_at_kill: len(ledger.acked) > n, DEADLINE, "a 250 after the kill"
            )
        assert not [c for c in clients if c.is_alive()], "a client hung"
        assert not [c.error for c in clients if c.error], [c.error for c in clients]
        # What is sent now goes out through the new process.
        marker = f"<alone.marker.{round_no}@client.test>"
        reply = try_send(proc.port, marker)
        ledger.ack(marker, reply)
        try:
            wait_until(
                lambda m=marker: ledger.copies(sink)[m] >= 1,
                DEADLINE,
                "mail to flow through the new delivery process",
            )
        except pytest.fail.Exception:
            records = [r for r in proc.records() if r.get("queue_id") == reply.queue_id]
            pytest.fail(
                f"round {round_no} (seed {seed}): {marker} {reply.queue_id} not sent by "
                f"{victim}; its log: {records}; spool: {spool_files(spool)}"
            )
    assert len(events_named(proc.records(), "internal_error")) == rounds
    # Each replacement handed the killed one's claims back (see
    # test_mail_claimed_by_a_killed_delivery_process_goes_out_soon); a restart on top
    # finds nothing more to do. A kill between a removal's two unlinks leaves content
    # aside, whole.
    assert proc.stop() == 0
    proc.start()
    wait_at_rest(ledger, sink, spool, leftovers=None)
    assert_leftovers_whole(spool)
    assert proc.stop() == 0
    counts = ledger.counts(sink)
    torture_report(
        "crash: kill -9 of the delivery process alone, under load",
        rounds=rounds,
        **counts,
        note=f"seed {seed}; replaced by the relay each time; in_flight = claims at the kills",
    )
    ledger.assert_safe(sink, counts, seed)
    assert not [r for r in problems(proc.records()) if r["event"] != "internal_error"]


def test_mail_claimed_by_a_killed_delivery_process_goes_out_soon(tmp_path, faulty):
    """The delivery process dies holding a claim (DATA sent, the upstream's reply not
    back; the upstream keeps nothing). A restart of the relay hands claims back at once;
    the relay's replacement of its delivery process should too, not minutes later."""
    spool = tmp_path / "spool"
    sink = holding_sink()
    handler: HoldingHandler = sink.handler  # type: ignore[assignment]
    handler.holding, handler.accept_held = True, False
    ledger = Ledger()
    try:
        proc = faulty(write_config(tmp_path, sink.port)).start()
        message_id = "<claimed-by-the-dead@client.test>"
        reply = try_send(proc.port, message_id)
        ledger.ack(message_id, reply)
        handler.wait_held(1)
        os.kill(proc.delivery_pid, signal.SIGKILL)
        wait_until(lambda: not running(proc.delivery_pid), DEADLINE, "the delivery process to die")
        assert spool_files(spool)["active"] == [reply.queue_id]
        handler.holding = False
        handler.release.set()
        wait_until(
            lambda: [p for p in delivery_children(proc.proc.pid) if p != proc.delivery_pid],
            DEADLINE,
            "a new delivery process",
        )
        ledger.wait_settled(sink, spool, timeout=15)  # at the new one's start, not 120 s
    finally:
        handler.release.set()
        sink.stop()
    assert ledger.counts(sink)["lost"] == 0


def test_a_live_queue_commands_claim_stays_in_active(tmp_path):
    """What the delivery process hands back at once is a dead process's claim only:
    an envelope a running queue command took into active/ stays there."""
    config = load_config(write_config(tmp_path, 9))
    spool = Spool(config.spool.dir)
    spool.create()
    queue_id = new_id()
    spool.commit(
        Envelope(queue_id, "a@client.test", [Recipient(RCPT)], time.time()),
        [body("<live-claim@client.test>")],
    )
    assert spool.claim_message(queue_id) is not None
    scheduler = Delivery(config, spool).scheduler  # not started: no threads of its own
    with spool.command_claims():
        scheduler._reclaim_stray_active(time.time())
        assert spool.locate(queue_id) == "active"
    scheduler._reclaim_stray_active(time.time())
    assert spool.locate(queue_id) == "queue"


# -- 2. kill -9 at precise moments of a commit --------------------------------------------

# (name, rule, the envelope is in queue/ after the kill). Every step of Spool.commit,
# here with syncfs (Linux 5.8+): the one file (envelope, then content) written in tmp/,
# the data made durable (the first syncfs), renamed into msg/, hard-linked into queue/
# (the commit point), then the names made durable (the second syncfs).
COMMIT_MOMENTS = [
    ("open-content", {"op": "open", "path": "tmp_msg"}, False),
    ("content-half-written", {"op": "write", "path": "tmp_msg", "partial": True}, False),
    ("before-data-syncfs", {"op": "syncfs", "path": "queue_dir", "nth": 1}, False),
    ("after-rename-into-msg", {"op": "rename", "path": "tmp_msg", "when": "after"}, False),
    ("before-link-into-queue", {"op": "link", "path": "msg", "dst": "queue"}, False),
    (
        "after-link-into-queue",
        {"op": "link", "path": "msg", "dst": "queue", "when": "after"},
        True,
    ),
    ("before-names-syncfs", {"op": "syncfs", "path": "queue_dir", "nth": 2}, True),
]
DEFAULT_COMMIT_MOMENTS = {"content-half-written", "after-link-into-queue"}

# The same for large mail (past spool.IN_MEMORY), the two-file layout: the content is
# written into a draft in tmp/ as it arrives, made durable (the first syncfs), the draft
# renamed into msg/, the envelope written into a file of its own (fsynced) and renamed
# into queue/ (the commit point), then the names made durable (the second syncfs).
LARGE_COMMIT_MOMENTS = [
    ("open-draft", {"op": "open", "path": "tmp_draft"}, False),
    (
        "draft-half-written",  # mid-DATA: the 4th piece of 64 KiB at most
        {"op": "write", "path": "tmp_draft", "nth": 4, "partial": True},
        False,
    ),
    ("before-data-syncfs", {"op": "syncfs", "path": "queue_dir", "nth": 1}, False),
    ("before-rename-into-msg", {"op": "rename", "path": "tmp_draft", "dst": "msg"}, False),
    (
        "after-rename-into-msg",
        {"op": "rename", "path": "tmp_draft", "dst": "msg", "when": "after"},
        False,
    ),
    ("envelope-half-written", {"op": "write", "path": "tmp_env", "partial": True}, False),
    ("before-rename-into-queue", {"op": "rename", "path": "tmp_env", "dst": "queue"}, False),
    (
        "after-rename-into-queue",
        {"op": "rename", "path": "tmp_env", "dst": "queue", "when": "after"},
        True,
    ),
    ("before-names-syncfs", {"op": "syncfs", "path": "queue_dir", "nth": 2}, True),
]
DEFAULT_LARGE_COMMIT_MOMENTS = {
    "before-rename-into-msg",
    "after-rename-into-msg",
    "before-names-syncfs",
}
LARGE_COMMIT = 1 << 20  # bytes: 16 pieces of DATA, 16 writes into the draft

# layout: (moments, those run in make test, the message's body lines, report line)
COMMIT_LAYOUTS = {
    "one-file": (
        COMMIT_MOMENTS,
        DEFAULT_COMMIT_MOMENTS,
        lambda message_id: 2000,  # ~130 KB: several writes, still in memory
        "crash: kill -9 at each step of a commit",
    ),
    "two-file": (
        LARGE_COMMIT_MOMENTS,
        DEFAULT_LARGE_COMMIT_MOMENTS,
        lambda message_id: lines_for_size(message_id, LARGE_COMMIT),
        "crash: kill -9 at each step of a large commit (draft, two files)",
    ),
}


@pytest.mark.parametrize("layout", list(COMMIT_LAYOUTS))
def test_kill_9_at_each_step_of_a_commit(
    tmp_path, sink, faulty, layout, torture_size, torture_report
):
    """The client never has a 250 from a commit that was killed. Before the commit point
    the message never goes out (a half-written file is never sent); from the commit
    point on it goes out whole after the restart. The client then sends again, as it
    would after a lost connection, and that copy is acknowledged and delivered. What
    the dead relay left in tmp/ (a draft, an envelope) is cleared at the restart; a
    large message committed is two files (content in msg/, its envelope apart)."""
    all_moments, defaults, body_lines, scenario = COMMIT_LAYOUTS[layout]
    spool = tmp_path / "spool"
    moments = [m for m in all_moments if torture_size(m[0] in defaults, True)]
    proc = faulty(write_config(tmp_path, sink.port))
    ledger = Ledger()
    leftovers: set[str] = set()
    uncommitted: list[str] = []
    tmp_cleared = 0
    proc.start()
    for name, rule, committed in moments:
        message_id = f"<commit.{name}@client.test>"
        lines = body_lines(message_id)
        # The relay commits what it receives (the delivery process commits DSNs).
        proc.arm(resolve(rule, spool, action="kill", process="relay"))
        reply = try_send(proc.port, message_id, lines=lines)
        pid = proc.proc.pid
        proc.wait_killed()
        proc.disarm()
        assert not reply.ok, f"{name}: a killed commit was acknowledged: {reply}"
        (fired,) = proc.fired(pid)
        assert fired["op"] == rule["op"], (name, fired)
        files = spool_files(spool)
        if fired["op"] == "syncfs" or fired["path"].endswith(("/msg", "/queue")):
            in_tmp = [queue_id_of(n) for n in files["tmp"]]
            queue_id = (files["queue"] or files["active"] or in_tmp or ["?"])[0]
        else:
            queue_id = queue_id_of(fired["path"])
        # Once in queue/ a worker may claim it (active/) before the kill lands.
        claimed = queue_id in files["active"]
        assert (queue_id in files["queue"] or claimed) == committed, (name, files)
        if queue_id in files["msg"] and not committed:
            leftovers.add(queue_id)  # content without envelope: set aside at the restart
        in_tmp = fired["path"].startswith(f"{spool}/tmp/")
        if in_tmp and fired["op"] != "open" and rule.get("when") != "after":
            assert Path(fired["path"]).name in files["tmp"], (name, files)  # for recovery
        if layout == "two-file" and committed:
            assert_two_files(spool, "active" if claimed else "queue", queue_id)
        ledger.lines[message_id] = lines  # what goes out of a killed commit, too

        proc.start()
        started = events_named(proc.records(), "started")[-1]
        assert started["recovered"]["tmp_removed"] == len(files["tmp"]), (name, started, files)
        tmp_cleared += len(files["tmp"])
        if committed:
            # The commit may go out (twice if it was being delivered at the kill), and
            # so does the client's resend.
            ledger.in_flight += 1 + claimed
            wait_until(
                lambda mid=message_id: ledger.copies(sink)[mid] >= 1,
                DEADLINE,
                f"{name}: the committed message to go out after the restart",
            )
        else:
            uncommitted.append(message_id)
        retry = try_send(proc.port, message_id, lines=lines)
        ledger.ack(message_id, retry, lines=lines)
        wait_at_rest(ledger, sink, spool, leftovers)
    # An uncommitted message goes out only as the client's resend.
    copies = ledger.copies(sink)
    assert all(copies[mid] == 1 for mid in uncommitted), copies
    assert proc.stop() == 0
    counts = ledger.counts(sink)
    torture_report(
        scenario,
        rounds=len(moments),
        **counts,
        note="in_flight = kills after the commit point (client had no 250, resends); "
        f"{tmp_cleared} tmp/ files of the dead relay cleared at restart",
    )
    ledger.assert_safe(sink, counts)
    assert not problems(proc.records())


def assert_two_files(spool: Path, state: str, queue_id: str) -> None:
    """A large message committed: its content alone in msg/, its envelope in a file of
    its own (not the one-file layout, where the two names share one file)."""
    content, envelope = spool / "msg" / queue_id, spool / state / queue_id
    assert not content.read_bytes().startswith(EMBEDDED), f"{queue_id}: one file, not two"
    assert not os.path.samefile(content, envelope), queue_id
    assert Envelope.from_bytes(envelope.read_bytes()).id == queue_id


# -- 3. kill -9 during a delivery: DATA sent, the upstream's reply not yet back ------------


def test_kill_9_after_data_before_the_upstream_replies(
    tmp_path, faulty, torture_size, torture_report
):
    """The upstream holds its reply to DATA while the relay is killed. After the restart
    the message goes out again: exactly one extra copy for each message the upstream
    had kept (its 250 lost with the crash), none when it had kept nothing."""
    rounds = torture_size(1, 8)
    spool = tmp_path / "spool"
    sink = holding_sink()
    handler: HoldingHandler = sink.handler  # type: ignore[assignment]
    ledger = Ledger()
    try:
        proc = faulty(write_config(tmp_path, sink.port)).start()
        for round_no in range(rounds):
            handler.held, handler.accept_held = 0, round_no % 2 == 0
            handler.release.clear()
            handler.holding = True
            before = ledger.copies(sink)
            batch = [f"<deliver.{round_no}.{i}@client.test>" for i in range(1 + round_no % 3)]
            for message_id in batch:
                ledger.ack(message_id, try_send(proc.port, message_id))
            handler.wait_held(1)
            proc.kill()
            active = len(spool_files(spool)["active"])
            ledger.in_flight += active
            handler.holding = False
            handler.release.set()
            proc.start()
            wait_at_rest(ledger, sink, spool, set())
            after = ledger.copies(sink)
            extra = sum(after[m] - before[m] - 1 for m in batch)
            # Each message the upstream kept goes out again; nothing beyond what was
            # claimed at the kill (a DATA still in the upstream's buffer may add one).
            kept = handler.held if handler.accept_held else 0
            assert kept <= extra <= active, (round_no, handler.held, active, after)
        assert proc.stop() == 0
    finally:
        handler.release.set()
        sink.stop()
    counts = ledger.counts(sink)
    torture_report(
        "crash: kill -9 after DATA, before the upstream's reply",
        rounds=rounds,
        **counts,
        note="the upstream kept the message in every other round (its 250 lost)",
    )
    ledger.assert_safe(sink, counts)
    assert counts["duplicated"] > 0
    assert not problems(proc.records())


def test_kill_9_while_a_large_message_streams_to_the_upstream(
    tmp_path, sink, faulty, torture_size, torture_report
):
    """Large mail goes to the upstream straight from its spool file, a block at a time.
    The relay is killed (the fault hook, at a random block's read, once the client has
    its 250) in the middle of that DATA: the upstream has part of the message and no end
    of it, so keeps nothing. After
    the restart the message is sent again, whole, once: at-least-once, never lost."""
    rounds = torture_size(2, 8)
    seed = random.randrange(2**32)
    rng = random.Random(seed)
    spool = tmp_path / "spool"
    proc = faulty(write_config(tmp_path, sink.port)).start()
    ledger = Ledger()
    for round_no in range(rounds):
        message_id = f"<streamed.{round_no}@client.test>"
        size = rng.randint(*LARGE_SIZES)
        # Block n is read while block n-1 waits to be sent (the final dot goes with the
        # last): a kill before the 3rd read or later, and before the last, is mid-DATA.
        nth = rng.randint(3, size // DATA_BLOCK)
        # The first block's read waits for the client's 250 (the delivery process may
        # start before the relay has answered); every read counts towards the kill's.
        go_on = tmp_path / f"go-on-{round_no}"
        rule = {"op": "read", "path": "msg", "process": "delivery"}
        proc.arm(
            resolve(rule, spool, nth=nth, action="kill"),
            resolve(rule, spool, action="pause", pause_file=str(go_on)),
        )
        pid = proc.proc.pid
        reply = try_send(proc.port, message_id, lines=lines_for_size(message_id, size))
        ledger.ack(message_id, reply, lines=lines_for_size(message_id, size))
        go_on.touch()
        proc.wait_killed()
        proc.disarm()
        paused, fired = proc.fired(pid)
        assert paused["action"] == "pause", paused
        assert (fired["action"], fired["role"], fired["path"]) == (
            "kill",
            "delivery",
            str(spool / "msg" / reply.queue_id),
        ), fired
        files = spool_files(spool)
        assert reply.queue_id in files["active"], (round_no, files)  # its attempt's claim
        assert_two_files(spool, "active", reply.queue_id)
        ledger.in_flight += 1
        proc.start()
        wait_at_rest(ledger, sink, spool, set())
        # The interrupted DATA was no message: only the attempt after the restart counts.
        assert ledger.copies(sink)[message_id] == 1, (seed, round_no, nth, size)
    assert proc.stop() == 0
    counts = ledger.counts(sink)
    torture_report(
        "crash: kill -9 mid-DATA of a large message streamed to the upstream",
        rounds=rounds,
        **counts,
        note=f"seed {seed}; killed at a random 64 KiB block read; in_flight = the claims",
    )
    ledger.assert_safe(sink, counts, seed)
    assert counts["duplicated"] == 0
    assert not problems(proc.records())


# -- 4. kill -9 while a DSN is generated ---------------------------------------------------

# The recipient is refused with 550: the delivery process commits a DSN, then removes
# the message. The rules aim at that process alone: the relay's commit of the message
# itself writes and renames the same kinds of files (each process counts for itself).
# (name, rule)
DSN_MOMENTS = [
    ("dsn-content-half-written", {"op": "write", "path": "tmp_msg", "partial": True}),
    ("before-dsn-link-into-queue", {"op": "link", "path": "msg", "dst": "queue"}),
    (
        "dsn-committed-message-still-active",
        {"op": "link", "path": "msg", "dst": "queue", "when": "after"},
    ),
    ("before-the-message-is-removed", {"op": "unlink", "path": "active"}),
    ("between-the-two-unlinks", {"op": "unlink", "path": "active", "when": "after"}),
]
DEFAULT_DSN_MOMENTS = {"dsn-committed-message-still-active"}


def test_kill_9_while_a_dsn_is_generated(tmp_path, sink, faulty, torture_size, torture_report):
    """SPEC §1.1 for bounces: the sender gets its DSN after the restart; a second copy
    only when the kill came after the DSN was committed and before the message was
    removed (the attempt is repeated, and so is its report)."""
    spool = tmp_path / "spool"
    moments = [m for m in DSN_MOMENTS if torture_size(m[0] in DEFAULT_DSN_MOMENTS, True)]
    sink.handler.rcpt_replies[RCPT] = "550 5.1.1 <rcpt@dest.test>: no such user"
    proc = faulty(write_config(tmp_path, sink.port))
    ledger = Ledger()
    leftovers: set[str] = set()
    proc.start()
    for name, rule in moments:
        message_id = f"<dsn.{name}@client.test>"
        proc.arm(resolve(rule, spool, action="kill", process="delivery"))
        pid = proc.proc.pid
        reply = try_send(proc.port, message_id)
        ledger.ack(message_id, reply)
        ledger.must_bounce.add(message_id)
        proc.wait_killed()
        proc.disarm()
        (fired,) = proc.fired(pid)
        files = spool_files(spool)
        dsn_ids = [q for q in files["queue"] + files["active"] if q != reply.queue_id]
        dsn_committed = bool(dsn_ids) or ledger.dsns(sink)[message_id] >= 1
        # Sent again: the message's attempt (still active), and a DSN that was itself
        # being delivered at the kill.
        repeat = (reply.queue_id in files["active"] and dsn_committed) + sum(
            q in files["active"] for q in dsn_ids
        )
        if reply.queue_id not in files["active"] and reply.queue_id in files["msg"]:
            leftovers.add(reply.queue_id)  # removed between its two unlinks
        for queue_id in files["msg"]:
            if not any(queue_id in files[s] for s in ("queue", "active")):
                leftovers.add(queue_id)  # a DSN's file renamed into msg/, not linked into queue/
        ledger.in_flight += repeat
        proc.start()
        wait_at_rest(ledger, sink, spool, leftovers)
        dsns = ledger.dsns(sink)[message_id]
        assert 1 <= dsns <= 1 + repeat, (name, fired, dsns)
        assert ledger.copies(sink)[message_id] == 0, name
    assert proc.stop() == 0
    counts = ledger.counts(sink)
    torture_report(
        "crash: kill -9 while a DSN is generated",
        rounds=len(moments),
        **counts,
        note="in_flight = kills between the DSN's commit and the message's removal",
    )
    assert counts["lost"] == 0
    assert counts["bounced"] == len(moments)
    assert counts["duplicated"] <= counts["in_flight"]
    assert not problems(proc.records())


# -- 5. queue commands killed at precise moments, and the relay killed during one ----------

# (name, command, rule, what the message must end as once the relay runs again:
#  "delivered", "held" (stays held until released), "deleted", "bounced" (one DSN),
#  "bounced-twice" (the bounce was recorded in the envelope and its DSN committed, but
#  the message not yet removed: the relay finds failed, unreported recipients and
#  reports them again). `queue bounce` records the cancellation (rewrites the envelope
#  in active/) before it commits the DSN: from then on the message is never delivered.
QUEUE_MOMENTS = [
    ("hold-before-rename", "hold", {"op": "rename", "path": "queue", "dst": "hold"}, "delivered"),
    (
        "hold-after-rename",
        "hold",
        {"op": "rename", "path": "queue", "dst": "hold", "when": "after"},
        "held",
    ),
    ("release-before-rename", "release", {"op": "rename", "path": "hold"}, "held"),
    (
        "release-after-rename",
        "release",
        {"op": "rename", "path": "hold", "when": "after"},
        "delivered",
    ),
    ("flush-before-touch", "flush", {"op": "utime", "path": "queue"}, "delivered"),
    (
        "delete-after-taking-it",
        "delete",
        {"op": "rename", "path": "queue", "dst": "tmp", "when": "after"},
        "deleted",
    ),
    (
        "delete-between-unlinks",
        "delete",
        {"op": "unlink", "path": "tmp", "when": "after"},
        "deleted",
    ),
    (
        "bounce-after-taking-it",
        "bounce",
        {"op": "rename", "path": "queue", "dst": "active", "when": "after"},
        "delivered",
    ),
    (
        "bounce-before-recording",
        "bounce",
        {"op": "rename", "path": "tmp_env", "dst": "active"},
        "delivered",
    ),
    (
        "bounce-recorded",
        "bounce",
        {"op": "rename", "path": "tmp_env", "dst": "active", "when": "after"},
        "bounced",
    ),
    (
        "bounce-dsn-committed",
        "bounce",
        {"op": "link", "path": "msg", "dst": "queue", "when": "after"},
        "bounced-twice",
    ),
    ("bounce-before-finish", "bounce", {"op": "unlink", "path": "active"}, "bounced-twice"),
    (
        "bounce-between-unlinks",
        "bounce",
        {"op": "unlink", "path": "active", "when": "after"},
        "bounced",
    ),
]
DEFAULT_QUEUE_MOMENTS = {"bounce-recorded", "bounce-dsn-committed"}


def deferred_messages(proc: FaultyRelay, sink: Sink, count: int, tag: str) -> list[tuple[str, str]]:
    """`count` acknowledged messages, each deferred once (the upstream said 451)."""
    sink.handler.rcpt_replies[RCPT] = "451 4.3.0 try again later"
    sent = []
    for n in range(count):
        message_id = f"<{tag}.{n}@client.test>"
        reply = try_send(proc.port, message_id)
        assert reply.ok, reply
        sent.append((message_id, reply.queue_id))
    wait_until(
        lambda: (
            {q for _, q in sent}
            <= {r.get("queue_id") for r in proc.records() if r.get("event") == "deferred"}
        ),
        DEADLINE,
        "a deferred attempt for each message",
    )
    return sent


def run_queue(config: Path, work: Path, *args: str, rules: list[dict] | None = None):
    command = queue_command(config, work, *args, rules=rules)
    out, err = command.communicate(timeout=60)
    return command.returncode, out + err


def test_queue_commands_killed_at_precise_moments(
    tmp_path, sink, faulty, torture_size, torture_report
):
    """A queue command killed half-way leaves every message in exactly one state: the
    relay delivers it, keeps it held, or it is gone because it was deleted or bounced.
    A message is never lost to a killed command: it was delivered or its sender got a
    DSN, unless the administrator deleted it."""
    spool = tmp_path / "spool"
    moments = [m for m in QUEUE_MOMENTS if torture_size(m[0] in DEFAULT_QUEUE_MOMENTS, True)]
    config = write_config(tmp_path, sink.port)
    proc = faulty(config).start()
    sent = deferred_messages(proc, sink, len(moments), "qcmd")
    assert proc.stop() == 0  # the commands act on the spool alone: deterministic
    assert spool_files(spool)["active"] == [], "a clean stop left claimed mail"
    sink.handler.rcpt_replies.clear()

    ledger = Ledger()
    leftovers: set[str] = set()
    expected: dict[str, str] = {}
    for (name, action, rule, outcome), (message_id, queue_id) in zip(moments, sent):
        if action == "release":
            assert run_queue(config, tmp_path, "hold", queue_id)[0] == 0
        rules = [resolve(rule, spool, action="kill")]
        code, output = run_queue(config, tmp_path, action, queue_id, rules=rules)
        assert code == -signal.SIGKILL, (name, code, output)
        expected[message_id] = outcome
        if outcome != "deleted":
            ledger.acked[message_id], ledger.lines[message_id] = queue_id, 20
        if outcome.startswith("bounced"):
            ledger.must_bounce.add(message_id)
        files = spool_files(spool)
        if queue_id in files["msg"] and not any(
            queue_id in files[s] for s in ("queue", "active", "hold")
        ):
            leftovers.add(queue_id)  # its envelope went first: content set aside at start
    files = spool_files(spool)
    for message_id, queue_id in sent[: len(moments)]:
        states = [s for s in ("queue", "active", "hold", "tmp") if queue_id in files[s]]
        assert len(states) <= 1, (message_id, files)

    proc.start()
    held = [q for m, q in sent if expected.get(m) == "held"]
    ledger_now = Ledger({m: q for m, q in ledger.acked.items() if q not in held})
    ledger_now.must_bounce = ledger.must_bounce
    ledger_now.wait_settled(sink, spool)
    assert sorted(spool_files(spool)["hold"]) == sorted(held)  # held stays held
    for queue_id in held:
        assert run_queue(config, tmp_path, "release", queue_id)[0] == 0
    wait_at_rest(ledger, sink, spool, leftovers)
    copies, dsns = ledger.copies(sink), ledger.dsns(sink)
    for message_id, outcome in expected.items():
        got = (copies[message_id], dsns[message_id])
        want = {
            "delivered": (1, 0),
            "held": (1, 0),
            "deleted": (0, 0),
            "bounced": (0, 1),
            "bounced-twice": (0, 2),
        }[outcome]
        assert got == want, (message_id, outcome, got)
        ledger.in_flight += outcome == "bounced-twice"
    assert proc.stop() == 0
    counts = ledger.counts(sink)
    torture_report(
        "crash: queue commands killed at precise moments",
        rounds=len(moments),
        **counts,
        note=f"{sum(o == 'deleted' for o in expected.values())} deleted by the command "
        "(not counted); in_flight = bounces killed after the DSN, before the removal",
    )
    assert counts["lost"] == 0
    assert not problems(proc.records())


# (name, command, rule of the command's pause, what the message ends as)
RELAY_KILLED_DURING = [
    (
        "bounce-paused-after-dsn-commit",
        "bounce",
        {"op": "link", "path": "msg", "dst": "queue", "when": "after"},
        "bounced",
    ),
    (
        "hold-paused-after-rename",
        "hold",
        {"op": "rename", "path": "queue", "dst": "hold", "when": "after"},
        "held",
    ),
    ("delete-paused-after-taking-it", "delete", {"op": "unlink", "path": "tmp"}, "deleted"),
]


def test_relay_killed_while_a_queue_command_runs(
    tmp_path, sink, faulty, torture_size, torture_report
):
    """The relay dies (kill -9) while a queue command is half-way; the command finishes
    and says so, and the restarted relay honours what it did."""
    spool = tmp_path / "spool"
    cases = RELAY_KILLED_DURING[: torture_size(1, len(RELAY_KILLED_DURING))]
    config = write_config(tmp_path, sink.port)
    proc = faulty(config).start()
    ledger = Ledger()
    outcomes = {}
    for n, (name, action, rule, outcome) in enumerate(cases):
        ((message_id, queue_id),) = deferred_messages(proc, sink, 1, f"during.{n}")
        go_on = tmp_path / f"go-on-{n}"
        rules = [resolve(rule, spool, action="pause", pause_file=str(go_on))]
        command = queue_command(config, tmp_path, action, queue_id, rules=rules)
        try:
            wait_until(
                lambda c=command: any(
                    r.get("pid") == c.pid and "rule" in r for r in read_fault_log(proc.fault_log)
                ),
                DEADLINE,
                f"{name}: the command to reach its pause",
            )
            proc.kill()
            go_on.touch()
            out, err = command.communicate(timeout=60)
        finally:
            if command.poll() is None:
                command.kill()
                command.communicate()
        assert command.returncode == 0, (name, out, err)
        sink.handler.rcpt_replies.clear()
        outcomes[message_id] = (queue_id, outcome)
        if outcome != "deleted":
            ledger.acked[message_id], ledger.lines[message_id] = queue_id, 20
        if outcome == "bounced":
            ledger.must_bounce.add(message_id)
        proc.start()
        if outcome == "held":
            wait_until(lambda: spool_drained_but_held(spool), DEADLINE, "the rest to go out")
            assert spool_files(spool)["hold"] == [queue_id]
            assert run_queue(config, tmp_path, "release", queue_id)[0] == 0
        wait_at_rest(ledger, sink, spool, {queue_id} if outcome != "held" else set())
    copies, dsns = ledger.copies(sink), ledger.dsns(sink)
    for message_id, (_, outcome) in outcomes.items():
        if outcome == "bounced":
            assert copies[message_id] == 0 and 1 <= dsns[message_id] <= 2, message_id
            ledger.in_flight += 1  # the DSN may have been in flight at the kill
        elif outcome == "deleted":
            assert (copies[message_id], dsns[message_id]) == (0, 0), message_id
        else:
            assert (copies[message_id], dsns[message_id]) == (1, 0), message_id
    assert proc.stop() == 0
    counts = ledger.counts(sink)
    torture_report(
        "crash: relay killed while a queue command runs",
        rounds=len(cases),
        **counts,
        note="commands: " + ", ".join(c[1] for c in cases),
    )
    assert counts["lost"] == 0
    assert counts["duplicated"] <= counts["in_flight"]


def spool_drained_but_held(spool: Path) -> bool:
    files = spool_files(spool)
    return not (files["queue"] or files["active"] or files["tmp"])


# -- 6. kill -9 during start-up recovery ---------------------------------------------------


def claimed_spool(spool: Path, count: int, ledger: Ledger) -> None:
    """A spool as a crash leaves it under load: `count` committed messages, every
    envelope in active/ (claimed by workers that died). Written with the spool's own
    commit, then each envelope renamed as a claim does."""
    from smarthost.spool import Envelope, Recipient, Spool, new_id

    store = Spool(str(spool))
    store.create()
    for n in range(count):
        message_id = f"<recovery.{n}@client.test>"
        content = message(message_id)
        env = Envelope(
            id=new_id(),
            sender=SENDER,
            recipients=[Recipient(RCPT)],
            arrival=time.time(),
            size=len(content),
            message_id=message_id,
        )
        store.commit(env, [content])
        assert store.move(env.id, "queue", "active", durable=False)
        ledger.acked[message_id], ledger.lines[message_id] = env.id, 20


def test_kill_9_during_start_up_recovery(tmp_path, sink, faulty, torture_size, torture_report):
    """recover() hands claimed mail back to the queue one rename at a time; a kill in
    the middle (at a random rename, several times over) loses nothing: the next start
    finishes the job and everything is delivered once."""
    count = torture_size(20, 300)
    kills = torture_size(1, 5)
    seed = random.randrange(2**32)
    rng = random.Random(seed)
    spool = tmp_path / "spool"
    ledger = Ledger()
    claimed_spool(spool, count, ledger)
    proc = faulty(write_config(tmp_path, sink.port))
    for _ in range(kills):
        active = len(spool_files(spool)["active"])
        if active == 0:
            break
        nth = rng.randint(1, active)
        proc.arm(
            resolve(
                {"op": "rename", "path": "active", "dst": "queue"}, spool, nth=nth, action="kill"
            )
        )
        assert proc.start_and_die() == -signal.SIGKILL
        files = spool_files(spool)
        assert len(files["active"]) == active - (nth - 1), (nth, active, files)
        assert len(files["active"]) + len(files["queue"]) == count
    proc.disarm()
    proc.start()
    (started,) = events_named(proc.records(), "started")
    assert started["recovered"]["orphans"] == 0
    wait_at_rest(ledger, sink, spool, set())
    assert proc.stop() == 0
    counts = ledger.counts(sink)
    torture_report(
        "crash: kill -9 during start-up recovery",
        rounds=kills,
        **counts,
        note=f"seed {seed}; {count} envelopes in active/ at the first start",
    )
    ledger.assert_whole(sink)
    assert counts["lost"] == 0
    assert counts["duplicated"] == 0  # nothing was in flight: each goes out once
