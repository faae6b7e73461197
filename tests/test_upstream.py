"""Upstreams (SPEC §3 [[backend]]/[[route]], §5 Delivery): the choice of backend by
weight, backups, health and probes, fast recovery after an outage (also across a
restart), the retry schedule on disk, session reuse, rate limits and routes.

Everything runs against real aiosmtpd upstreams on loopback; the relay runs
in-process (or as a real process where a restart is the point)."""

from __future__ import annotations

import asyncio
import email
import email.message
import json
import os
import random
import smtplib
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import pytest

from smarthost.config import BackendConfig, load_config
from smarthost.scheduler import DEFAULT_INTERVALS
from smarthost.spool import QUEUE, Spool
from smarthost.upstream import Backend, RateWindow, Upstreams, _smooth_weighted_pick

from support.configs import relay_settings
from support.sink import Sink, SinkHandler
from support.smtp import free_port
from support.waiting import wait_until

BODY = b"From: a@client.test\r\nTo: b@dest.test\r\nSubject: upstreams\r\n\r\nhello\r\n"


# -- helpers --------------------------------------------------------------------------


@dataclass
class Up:
    """One `[[backend]]` of a generated config (all on 127.0.0.1, tls = "none")."""

    name: str
    port: int
    weight: int = 1
    backup: bool = False
    group: str = "default"
    rate: str | None = None
    max_fails: int = 1
    fail_timeout: str = "1s"


def make_config(
    tmp_path: Path,
    backends: list[Up],
    *,
    routes: tuple[dict, ...] = (),
    workers: int = 4,
    retry_min: str = "1s",
    retry_max: str = "2s",
) -> Path:
    """A relay config with several backends and routes (listen on a free port)."""
    lines = [relay_settings(tmp_path, workers=workers, retry_min=retry_min, retry_max=retry_max)]
    for b in backends:
        lines += [
            "[[backend]]",
            f'name = "{b.name}"',
            'host = "127.0.0.1"',
            f"port = {b.port}",
            'tls = "none"',
            f"weight = {b.weight}",
            f"backup = {'true' if b.backup else 'false'}",
            f'group = "{b.group}"',
            f"max_fails = {b.max_fails}",
            f'fail_timeout = "{b.fail_timeout}"',
        ]
        if b.rate:
            lines.append(f'rate = "{b.rate}"')
    for route in routes:
        lines.append("[[route]]")
        # A JSON array of strings is a valid TOML array.
        lines += [f"{key} = {json.dumps(value)}" for key, value in route.items()]
    path = tmp_path / "smarthost.toml"
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture
def sinks() -> Iterator[Callable[..., Sink]]:
    """Start upstreams (on a given port, or with a given handler); all stopped at the end."""
    started: list[Sink] = []

    def start(port: int = 0, handler: SinkHandler | None = None) -> Sink:
        s = Sink(port)
        if handler is not None:
            s.handler = handler
        started.append(s)
        return s.start()

    yield start
    for s in started:
        s.stop()


def send_batch(port: int, rcpts: list[str], sender: str = "a@client.test") -> None:
    """One client session carrying one message per recipient."""
    with smtplib.SMTP("127.0.0.1", port, timeout=10) as client:
        client.ehlo("client.test")
        for rcpt in rcpts:
            assert client.sendmail(sender, [rcpt], BODY) == {}


class EhloCountingHandler(SinkHandler):
    """A sink that notes each session's EHLO (time.time()) and can refuse it."""

    def __init__(self, refuse: bool = False) -> None:
        super().__init__()
        self.ehlos: list[float] = []
        self.refuse = refuse

    async def handle_EHLO(self, server, session, envelope, hostname, responses):
        self.ehlos.append(time.time())
        if self.refuse:
            return ["554 5.3.2 not accepting mail now"]
        session.host_name = hostname
        return responses


def delivered(events, queue_id: str) -> dict:
    return wait_until(
        lambda: events.events("delivered", queue_id=queue_id), what=f"{queue_id} delivered"
    )[0]


def backend(name: str, weight: int = 1, **kwargs) -> Backend:
    return Backend(BackendConfig(host="127.0.0.1", name=name, weight=weight, **kwargs))


# -- 1, 2: the algorithms, as units ---------------------------------------------------


def test_smooth_weighted_pick_gives_exact_shares_interleaved():
    pool = [backend("a", 3), backend("b", 1)]
    picks = [_smooth_weighted_pick(pool).name for _ in range(400)]
    assert Counter(picks) == {"a": 300, "b": 100}
    assert picks[:4] == ["a", "a", "b", "a"]  # nginx: interleaved, not a a a b
    longest = max(len(run) for run in "".join(picks).split("b"))
    assert longest <= 3

    pool = [backend("a", 5), backend("b", 1), backend("c", 1)]
    picks = [_smooth_weighted_pick(pool).name for _ in range(7)]
    assert picks == ["a", "a", "b", "a", "c", "a", "a"]  # nginx's documented sequence
    # ...and the cycle repeats exactly.
    assert [_smooth_weighted_pick(pool).name for _ in range(7)] == picks


def test_rate_window_books_later_slots_and_never_overfills_a_window():
    window = RateWindow(3, 10.0)
    assert [window.reserve(0.0) for _ in range(3)] == [0.0, 0.0, 0.0]
    # Over the rate: the next slots, in booking order, three per 10 s.
    assert [window.reserve(0.0) for _ in range(4)] == [10.0, 10.0, 10.0, 20.0]
    assert window.reserve(25.0) == 25.0  # the window [15, 25] holds only the two at 20

    rng = random.Random(1234)
    for count, period in [(3, 10.0), (1, 1.0), (4, 1.0), (5, 60.0)]:
        window = RateWindow(count, period)
        nows = sorted(rng.uniform(0, 5 * period) for _ in range(50))
        slots = [window.reserve(now) for now in nows]
        assert all(slot >= now for slot, now in zip(slots, nows))
        for start in slots:  # every window [start, start + period)
            inside = [s for s in slots if start <= s < start + period]
            assert len(inside) <= count, (count, period, start, inside)


def test_a_rate_limited_backend_keeps_its_rate_share_under_sustained_load(tmp_path):
    # A: 1 message/s; B: unlimited; equal weights. Offered 10 messages/s for 20 s, A
    # can carry 1/s, so it should carry about 20 and B the rest. Each pick of A while
    # A is full books a slot (reservation) that nobody ever uses, pushing A's next
    # free slot further out with every pick: A gets its first message and then none.
    config = load_config(make_config(tmp_path, [Up("a", 2501, rate="1/s"), Up("b", 2502)]))
    upstreams = Upstreams(config)
    carried: Counter[str] = Counter()
    t0 = 1_000_000.0
    for i in range(200):
        choice = upstreams.choose("default", set(), f"q{i}", t0 + i / 10)
        assert choice.backend is not None  # B is always free
        carried[choice.backend.name] += 1
    assert carried["a"] >= 15, carried


# -- 3..6: choice and health, end to end ----------------------------------------------


def test_weights_share_the_mail_exactly(tmp_path, sinks, relay_factory):
    heavy, light = sinks(), sinks()
    config = make_config(tmp_path, [Up("heavy", heavy.port, weight=3), Up("light", light.port)])
    relay = relay_factory(load_config(config))
    rcpts = [f"r{i}@dest.test" for i in range(80)]
    send_batch(relay.port, rcpts[:40])
    send_batch(relay.port, rcpts[40:])
    wait_until(lambda: len(heavy.messages) + len(light.messages) == 80, what="80 deliveries")
    # Picks are made under one lock, one per message: 20 rounds of a a b a.
    assert (len(heavy.messages), len(light.messages)) == (60, 20)
    got = sorted(r for m in heavy.messages + light.messages for r in m.rcpt_tos)
    assert got == sorted(rcpts)


def test_backup_only_while_the_primary_is_down(tmp_path, sinks, relay_factory, events):
    primary, spare = sinks(), sinks()
    config = make_config(
        tmp_path,
        [Up("primary", primary.port, fail_timeout="30s"), Up("spare", spare.port, backup=True)],
    )
    relay = relay_factory(load_config(config))
    ids = [relay.send("a@client.test", [f"p{i}@dest.test"], BODY) for i in range(10)]
    primary.wait_for(10)
    for queue_id in ids:
        assert delivered(events, queue_id)["backend"] == "primary"
    assert spare.messages == []

    primary.stop()  # its idle sessions are dropped, new ones refused
    later = [relay.send("a@client.test", [f"s{i}@dest.test"], BODY) for i in range(3)]
    spare.wait_for(3)
    for queue_id in later:
        event = delivered(events, queue_id)
        assert (event["backend"], event["attempt"]) == ("spare", 1)
    (down,) = events.events("backend_down", backend="primary")
    assert down["group"] == "default"
    assert not events.events("deferred")
    assert not events.events("backend_down", backend="spare")


def test_421_fails_over_to_the_next_backend_in_the_same_attempt(
    tmp_path, sinks, relay_factory, events
):
    closing, good = sinks(), sinks()
    closing.handler.mail_reply = "421 4.3.2 shutting down"
    # Equal weights: the first pick is the first backend listed, the closing one.
    config = make_config(
        tmp_path, [Up("closing", closing.port, fail_timeout="30s"), Up("good", good.port)]
    )
    relay = relay_factory(load_config(config))
    queue_id = relay.send("a@client.test", ["x@dest.test"], BODY)
    assert good.wait_for(1)[0].rcpt_tos == ["x@dest.test"]
    event = delivered(events, queue_id)
    assert (event["backend"], event["attempt"]) == ("good", 1)
    (down,) = events.events("backend_down", backend="closing")
    assert down["reply"] == "421 4.3.2 shutting down"
    assert closing.messages == []
    assert not events.events("deferred", queue_id=queue_id)


def test_max_fails_marks_down_for_fail_timeout_then_a_probe_brings_it_back(
    tmp_path, sinks, relay_factory, events
):
    # "dead" answers every session's EHLO with 554 (a backend failure): unlike a
    # refused connection, each try of it can be counted and timed.
    refusing = EhloCountingHandler(refuse=True)
    dead, live = sinks(handler=refusing), sinks()
    config = make_config(
        tmp_path,
        [
            Up("dead", dead.port, max_fails=2, fail_timeout="2s"),
            Up("live", live.port, max_fails=2, fail_timeout="2s"),
        ],
    )
    relay = relay_factory(load_config(config))
    # One message at a time until "dead" is marked down: with equal weights it is
    # picked every other message, and each failure fails over to "live" at once.
    for i in range(8):
        queue_id = relay.send("a@client.test", [f"a{i}@dest.test"], BODY)
        event = delivered(events, queue_id)
        assert (event["backend"], event["attempt"]) == ("live", 1)
        if events.events("backend_down", backend="dead"):
            break
    before_down = i + 1
    (down,) = events.events("backend_down", backend="dead")
    assert len(refusing.ehlos) == 2  # not down after one failure: max_fails = 2
    assert down["reply"].startswith("554 5.3.2")
    t_down = down["created"]

    # While down it gets no tries at all; mail goes to "live" in its first attempt.
    later = [relay.send("a@client.test", [f"b{i}@dest.test"], BODY) for i in range(6)]
    later_events = [delivered(events, q) for q in later]
    assert all((e["backend"], e["attempt"]) == ("live", 1) for e in later_events)
    assert min(e["created"] for e in later_events) < t_down + 2.0  # the window was used
    early = [t for t in refusing.ehlos[2:] if t < t_down + 2.0 - 0.05]
    assert early == [], "tried while marked down"

    # Back in service on the same port: the probe after fail_timeout finds it.
    dead.stop()
    revived = sinks(port=dead.port)
    up = wait_until(lambda: events.events("backend_up", backend="dead"), what="backend_up")
    assert up[0]["created"] >= t_down + 2.0 - 0.05
    # Equal weights alternate strictly: it gets every other message again.
    send_batch(relay.port, [f"c{i}@dest.test" for i in range(4)])
    total = before_down + 6 + 4
    wait_until(lambda: len(live.messages) + len(revived.messages) == total, what="all mail")
    assert len(revived.messages) == 2


# -- 7..9: fast recovery and the schedule on disk -------------------------------------


def test_outage_then_recovery_releases_the_queue_at_once(tmp_path, sinks, relay_factory, events):
    port = free_port()
    config = make_config(tmp_path, [Up("only", port)], retry_min="10m", retry_max="1h")
    relay = relay_factory(load_config(config))
    ids = [relay.send("a@client.test", [f"r{i}@dest.test"], BODY) for i in range(10)]
    wait_until(lambda: len(events.events("deferred")) >= 10, what="10 deferrals")
    for queue_id in ids:
        (deferred,) = events.events("deferred", queue_id=queue_id)
        next_attempt = datetime.fromisoformat(deferred["next_attempt"]).timestamp()
        assert next_attempt - time.time() > 9 * 60  # the backoff alone would wait 10 min

    upstream = sinks(port=port)
    # Generous: with retry_min = 10m only fast recovery can deliver within this.
    got = upstream.wait_for(10, timeout=10)
    assert sorted(m.rcpt_tos[0] for m in got) == sorted(f"r{i}@dest.test" for i in range(10))
    released = events.events("released", group="default")
    # One event per release (with a count) or one per message: either way, all ten.
    assert released and sum(r.get("messages", 1) for r in released) == 10
    for queue_id in ids:
        assert delivered(events, queue_id)["attempt"] <= 2


def test_fast_recovery_after_a_restart_of_the_process(tmp_path, sinks, relay_process):
    port = free_port()
    config = make_config(tmp_path, [Up("only", port)], retry_min="10m", retry_max="1h")
    proc = relay_process(config).start()
    rcpts = [f"r{i}@dest.test" for i in range(10)]
    send_batch(proc.port, rcpts)
    wait_until(
        lambda: len([r for r in proc.records() if r.get("event") == "deferred"]) >= 10,
        what="10 deferrals",
    )
    assert proc.stop() == 0
    spool = Spool(str(tmp_path / "spool"))
    waiting = [spool.read_envelope(QUEUE, q) for q, _ in spool.scan(QUEUE)]
    assert len(waiting) == 10
    assert all(env.waiting_groups == ["default"] for env in waiting)

    upstream = sinks(port=port)
    offset = proc.log_path.stat().st_size
    proc.start()
    got = upstream.wait_for(10, timeout=15)
    assert sorted(m.rcpt_tos[0] for m in got) == sorted(rcpts)
    released = [r for r in proc.records(offset) if r.get("event") == "released"]
    assert released and released[0]["group"] == "default"
    assert proc.stop() == 0


def deferred_by_the_upstream(tmp_path, sink, relay_factory, events):
    """A relay (retry_min 10m) holding one message whose recipient got 451 4.2.0."""
    sink.handler.rcpt_replies["later@dest.test"] = "451 4.2.0 try later"
    config = load_config(
        make_config(tmp_path, [Up("only", sink.port)], retry_min="10m", retry_max="1h")
    )
    relay = relay_factory(config)
    queue_id = relay.send("a@client.test", ["later@dest.test"], BODY)
    wait_until(lambda: events.events("deferred", queue_id=queue_id), what="deferral")
    return config, relay, queue_id, relay.relay.spool.path(QUEUE, queue_id)


def test_retry_schedule_survives_a_restart_and_touch_flushes_it(
    tmp_path, sink, relay_factory, events
):
    config, first, queue_id, path = deferred_by_the_upstream(tmp_path, sink, relay_factory, events)
    due = os.stat(path).st_mtime_ns
    assert 590 <= due / 1e9 - time.time() <= 901  # retry_min 10m plus up to 50% jitter
    first.stop()

    second = relay_factory(config)
    assert os.stat(path).st_mtime_ns == due
    # Proving that nothing happens needs a bounded wait: 3 s is far longer than a
    # due message takes (milliseconds), and far shorter than the 10 min schedule.
    deadline = time.monotonic() + 3.0
    while time.monotonic() < deadline:
        assert sink.messages == []
        time.sleep(0.05)
    assert os.stat(path).st_mtime_ns == due
    assert len(events.events("deferred", queue_id=queue_id)) == 1

    # An admin's `touch` makes it due now: picked up by the watcher or, at the
    # latest, by the next rescan of queue/; the watcher sees the touch at once.
    del sink.handler.rcpt_replies["later@dest.test"]
    now = time.time()
    os.utime(path, (now, now))
    assert sink.wait_for(1, timeout=5)[0].rcpt_tos == ["later@dest.test"]
    assert delivered(events, queue_id)["attempt"] == 2
    second.stop()


def test_touching_a_queue_file_sends_it_at_once(tmp_path, sink, relay_factory, events):
    config, first, _, path = deferred_by_the_upstream(tmp_path, sink, relay_factory, events)
    first.stop()
    # A fresh relay, so that no watcher event about the file is still in flight (one
    # would stat the file and see the touch); once its start-up scan has indexed the
    # message, only the watcher or the next rescan (10 s away) can see it.
    scans_before = len(events.events("queue_scanned", indexed=1))
    relay_factory(config)
    wait_until(
        lambda: len(events.events("queue_scanned", indexed=1)) > scans_before,
        what="the start-up scan",
    )
    del sink.handler.rcpt_replies["later@dest.test"]
    now = time.time()
    os.utime(path, (now, now))
    sink.wait_for(1, timeout=DEFAULT_INTERVALS.rescan / 5)


# -- 10, 11: sessions and rates -------------------------------------------------------


def test_sessions_are_reused_across_messages(tmp_path, sinks, relay_factory):
    counting = EhloCountingHandler()
    upstream = sinks(handler=counting)
    config = make_config(tmp_path, [Up("only", upstream.port)], workers=8)
    relay = relay_factory(load_config(config))
    rcpts = [f"r{i}@dest.test" for i in range(40)]
    send_batch(relay.port, rcpts[:20])
    send_batch(relay.port, rcpts[20:])
    got = upstream.wait_for(40)
    assert sorted(m.rcpt_tos[0] for m in got) == sorted(rcpts)
    # max_connections = 4 (default), plus slack for a session the upstream dropped.
    assert 1 <= len(counting.ehlos) <= 4 + 2


class SlowDataHandler(EhloCountingHandler):
    async def handle_DATA(self, server, session, envelope):
        await asyncio.sleep(0.3)
        return await super().handle_DATA(server, session, envelope)


def test_an_upstream_restart_costs_no_attempt_and_no_backend_down(
    tmp_path, sinks, relay_factory, events
):
    """Every idle session dies with the upstream; the first dead one tells the relay to
    drop the others and connect afresh, within the same attempt."""
    slow = SlowDataHandler()
    upstream = sinks(handler=slow)
    port = upstream.port
    config = make_config(tmp_path, [Up("only", port)], workers=8)
    relay = relay_factory(load_config(config))
    # Slow replies and four clients at once: the relay opens all four sessions it may.
    batches = [[f"r{c}.{i}@dest.test" for i in range(4)] for c in range(4)]
    clients = [threading.Thread(target=send_batch, args=(relay.port, b)) for b in batches]
    for client in clients:
        client.start()
    for client in clients:
        client.join()
    upstream.wait_for(16)
    assert len(slow.ehlos) == 4, slow.ehlos
    upstream.stop()
    restarted = sinks(port=port)
    send_batch(relay.port, ["after@dest.test"])
    assert restarted.wait_for(1)[0].rcpt_tos == ["after@dest.test"]
    wait_until(lambda: len(events.events("delivered")) == 17, what="17 delivered events")
    assert all(e["attempt"] == 1 for e in events.events("delivered"))
    assert not events.events("backend_down")
    assert not events.events("deferred")


def test_rate_limit_is_held_without_errors(tmp_path, sinks, relay_factory, events):
    upstream = sinks()
    config = make_config(tmp_path, [Up("limited", upstream.port, rate="4/s")])
    relay = relay_factory(load_config(config))
    send_batch(relay.port, [f"r{i}@dest.test" for i in range(16)])
    got = upstream.wait_for(16, timeout=15)
    arrivals = sorted(m.at for m in got)
    # The relay books send times 4 per second; arrivals lag them a little: 0.9 s.
    for start in arrivals:
        inside = [t for t in arrivals if start <= t < start + 0.9]
        assert len(inside) <= 4, [round(t - arrivals[0], 3) for t in arrivals]
    wait_until(lambda: len(events.events("delivered")) == 16, what="16 delivered events")
    # Waiting for the rate is not an error, and is not an attempt.
    assert all(e["attempt"] == 1 for e in events.events("delivered"))
    assert not events.events("deferred")
    assert not events.events("backend_down")


# -- 12: routes -----------------------------------------------------------------------

ROUTES = (
    {"recipient_domain": ["shop.test"], "group": "shop"},
    {"sender_domain": ["shop.example"], "group": "shop"},
)


def routed_relay(tmp_path, sinks, relay_factory):
    default, shop = sinks(), sinks()
    config = make_config(
        tmp_path, [Up("main", default.port), Up("shop", shop.port, group="shop")], routes=ROUTES
    )
    return relay_factory(load_config(config)), default, shop


def test_routes_split_recipients_by_group(tmp_path, sinks, relay_factory):
    relay, default, shop = routed_relay(tmp_path, sinks, relay_factory)
    relay.send("x@client.test", ["a@other.test", "b@SHOP.test"], BODY)
    (to_default,) = default.wait_for(1)
    (to_shop,) = shop.wait_for(1)
    assert (to_default.mail_from, to_default.rcpt_tos) == ("x@client.test", ["a@other.test"])
    assert (to_shop.mail_from, to_shop.rcpt_tos) == ("x@client.test", ["b@SHOP.test"])

    relay.send("y@shop.example", ["c@other.test"], BODY)
    second = shop.wait_for(2)[1]
    assert (second.mail_from, second.rcpt_tos) == ("y@shop.example", ["c@other.test"])
    assert len(default.messages) == 1


def test_delivered_events_name_the_backend_of_each_recipient(
    tmp_path, sinks, relay_factory, events
):
    relay, default, shop = routed_relay(tmp_path, sinks, relay_factory)
    queue_id = relay.send("x@client.test", ["a@other.test", "b@shop.test"], BODY)
    default.wait_for(1)
    shop.wait_for(1)

    def carried_by() -> dict[str, str]:
        return {
            rcpt: event["backend"]
            for event in events.events("delivered", queue_id=queue_id)
            for rcpt in event["recipients"]
        }

    # One event per group, logged one after the other: wait for both.
    wait_until(lambda: len(carried_by()) == 2, what="both delivered events")
    assert carried_by() == {"a@other.test": "main", "b@shop.test": "shop"}


def test_mail_deferred_while_its_group_comes_back_is_still_released(
    tmp_path, sinks, relay_factory, events
):
    class SlowHandler(SinkHandler):
        """Takes 2.5 s over the DATA of slow@other.test; everything else is quick."""

        async def handle_DATA(self, server, session, envelope):
            if "slow@other.test" in envelope.rcpt_tos:
                await asyncio.sleep(2.5)
            return await super().handle_DATA(server, session, envelope)

    shop_port = free_port()
    default = sinks(handler=SlowHandler())
    config = make_config(
        tmp_path,
        [Up("main", default.port), Up("shop", shop_port, group="shop")],
        routes=ROUTES,
        retry_min="10m",
        retry_max="1h",
    )
    relay = relay_factory(load_config(config))
    # The shop group is tried first (down: b@shop.test deferred, waiting for "shop"),
    # then the default group's slow DATA keeps the attempt running...
    queue_id = relay.send("x@client.test", ["b@shop.test", "slow@other.test"], BODY)
    wait_until(lambda: events.events("backend_down", backend="shop"), what="shop down")
    shop = sinks(port=shop_port)
    # ...while "shop" is back and its probe succeeds (on a busy relay other mail wakes
    # the scheduler, which starts the probe once fail_timeout is over).
    deadline = time.monotonic() + 10
    n = 0
    while not events.events("backend_up", backend="shop"):
        assert time.monotonic() < deadline, "no backend_up for shop"
        relay.send("x@client.test", [f"w{n}@other.test"], BODY)
        n += 1
        wait_until(lambda n=n: len(default.messages) >= n, what="a quick message")
    assert not events.events("deferred", queue_id=queue_id)  # the attempt still runs
    wait_until(lambda: events.events("deferred", queue_id=queue_id), what="the deferral")
    # Fast recovery should carry b@shop.test within seconds, not after 10 min.
    wait_until(lambda: shop.messages, timeout=3, what="b@shop.test released")


# -- SMTPUTF8 (SPEC §4), and the relay's own refusals in DSNs (SPEC §7) ------------------


class NoSmtpUtf8Handler(EhloCountingHandler):
    """An upstream that does not offer SMTPUTF8 (as Postfix with smtputf8_enable = no)."""

    async def handle_EHLO(self, server, session, envelope, hostname, responses):
        responses = await super().handle_EHLO(server, session, envelope, hostname, responses)
        return [r for r in responses if "SMTPUTF8" not in r.upper()]


def submit(port: int, sender: str, rcpts: list[str], content: bytes, utf8: bool) -> None:
    with smtplib.SMTP("127.0.0.1", port, timeout=10) as client:
        client.ehlo("client.test")
        options = ["SMTPUTF8"] if utf8 else []
        assert client.sendmail(sender, rcpts, content, mail_options=options) == {}


def subject(text: str) -> bytes:
    return f"From: a@client.test\r\nSubject: {text}\r\n\r\nhello\r\n".encode()


def test_smtputf8_only_for_mail_that_needs_it_on_one_reused_session(tmp_path, sinks, relay_factory):
    """One upstream session carries them all, one at a time: SMTPUTF8 goes with the
    messages that have a UTF-8 address or (asked for by the client) a UTF-8 header, and
    nothing of one transaction is left for the next."""
    counting = EhloCountingHandler()
    upstream = sinks(handler=counting)
    relay = relay_factory(load_config(make_config(tmp_path, [Up("only", upstream.port)])))
    cases = [  # (sender, recipients, content, client asks SMTPUTF8, expected upstream)
        ("ü@client.test", ["b@dest.test"], subject("1"), True, True),
        ("a@client.test", ["b@dest.test"], subject("2"), True, False),  # needs nothing
        ("a@client.test", ["b@dest.test"], subject("3 Grüße"), True, True),  # the header
        ("a@client.test", ["用户@dest.test"], subject("4"), True, True),
        ("a@client.test", ["b@dest.test"], subject("5"), False, False),
    ]
    for n, (sender, rcpts, content, asked, _) in enumerate(cases, 1):
        submit(relay.port, sender, rcpts, content, asked)
        upstream.wait_for(n)  # one at a time: the idle session is taken again
    got = {m.content.split(b"Subject: ")[1][:1]: m for m in upstream.messages}
    for n, (sender, rcpts, _, _, expected) in enumerate(cases, 1):
        msg = got[str(n).encode()]
        assert (msg.mail_from, msg.rcpt_tos) == (sender, rcpts)
        assert ("SMTPUTF8" in msg.mail_options) is expected, (n, msg.mail_options)
    assert len(counting.ehlos) == 1, counting.ehlos


def dsn_parts(content: bytes) -> tuple[str, list[email.message.Message]]:
    """A DSN's human text and its per-recipient delivery-status blocks."""
    report = email.message_from_bytes(content)
    text, status, _ = report.get_payload()
    _, *recipients = status.get_payload()
    return text.get_payload(decode=True).decode(), recipients


def test_without_smtputf8_upstream_the_relay_itself_refuses_with_5_6_7(
    tmp_path, sinks, relay_factory, events
):
    """The ASCII recipient still goes (without SMTPUTF8); the UTF-8 one fails with
    5.6.7, and the DSN says that the relay refused it, not the upstream: no Remote-MTA,
    no "host 127.0.0.1 said" (issue #14 item 8)."""
    upstream = sinks(handler=NoSmtpUtf8Handler())
    relay = relay_factory(load_config(make_config(tmp_path, [Up("only", upstream.port)])))
    submit(relay.port, "a@client.test", ["ok@dest.test", "ü@dest.test"], subject("mixed"), True)
    failed = wait_until(lambda: events.events("failed", recipient="ü@dest.test"), what="failed")
    assert failed[0]["reply"].startswith("553 5.6.7 "), failed
    assert failed[0]["status"] == "5.6.7" and failed[0]["backend"] == "only"
    wait_until(lambda: len(upstream.messages) == 2, what="the original and the DSN")
    (original,) = [m for m in upstream.messages if m.mail_from]
    assert original.rcpt_tos == ["ok@dest.test"]
    assert "SMTPUTF8" not in original.mail_options
    (dsn,) = [m for m in upstream.messages if not m.mail_from]
    assert dsn.rcpt_tos == ["a@client.test"]
    text, (block,) = dsn_parts(dsn.content)
    assert block["Final-Recipient"] == "utf-8; \\x{FC}@dest.test"  # RFC 6533 utf-8-addr-xtext
    assert block["Status"] == "5.6.7"
    assert block["Remote-MTA"] is None, block["Remote-MTA"]
    assert block["Diagnostic-Code"].startswith("smtp; 553 5.6.7 "), block["Diagnostic-Code"]
    assert "127.0.0.1" not in text and " said:" not in text, text
    assert "this mail system (relay.test) refused it itself: 553 5.6.7" in " ".join(text.split())


def test_a_utf8_header_needs_smtputf8_too(tmp_path, sinks, relay_factory, events):
    """The client asked for SMTPUTF8 and the header is UTF-8: an upstream without it
    cannot take the message (the relay does not downgrade headers); a DSN says so."""
    upstream = sinks(handler=NoSmtpUtf8Handler())
    relay = relay_factory(load_config(make_config(tmp_path, [Up("only", upstream.port)])))
    submit(relay.port, "a@client.test", ["b@dest.test"], subject("Grüße"), True)
    wait_until(lambda: events.events("failed", recipient="b@dest.test"), what="failed")
    (dsn,) = upstream.wait_for(1)
    assert dsn.mail_from == "" and dsn.rcpt_tos == ["a@client.test"]
    _, (block,) = dsn_parts(dsn.content)
    assert block["Status"] == "5.6.7" and block["Remote-MTA"] is None
    assert block["Diagnostic-Code"].startswith("smtp; 553 5.6.7 ")
    # The same message without a UTF-8 header goes through this upstream.
    submit(relay.port, "a@client.test", ["b@dest.test"], subject("plain"), True)
    assert upstream.wait_for(2)[1].rcpt_tos == ["b@dest.test"]


def test_an_upstreams_own_reply_keeps_its_remote_mta(tmp_path, sinks, relay_factory, events):
    """A backend failure with an upstream's reply (421 at MAIL) names that upstream:
    the relay's own refusals are the only ones without a Remote-MTA."""
    handler = EhloCountingHandler()
    handler.mail_reply = "421 4.3.2 going down"
    upstream = sinks(handler=handler)
    relay = relay_factory(load_config(make_config(tmp_path, [Up("only", upstream.port)])))
    queue_id = relay.send("a@client.test", ["b@dest.test"], BODY)
    wait_until(lambda: events.events("deferred", queue_id=queue_id), what="deferred")
    spool = relay.relay.spool

    def envelope():
        state = spool.locate(queue_id)
        try:
            return spool.read_envelope(state, queue_id) if state else None
        except FileNotFoundError:
            return None

    env = wait_until(envelope, what="the envelope")
    (rcpt,) = env.recipients
    assert rcpt.reply == "421 4.3.2 going down"
    assert rcpt.remote_mta == "127.0.0.1"
