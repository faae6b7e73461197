"""Fleets (SPEC §12): relays sharing a backend's `rate` through a real Redis.

redis-server (Debian's `redis-server`) is started by the tests on a free port, without
persistence, and stopped and started again where the test says so. The relays are
real `smarthost serve` processes, each with its own spool, all sending to one real
aiosmtpd sink, whose arrival times are what is measured.
"""

from __future__ import annotations

import smtplib
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from smarthost.config import ConfigError, FleetConfig, parse_config
from smarthost.fleet import NODES_KEY, Fleet
from smarthost.upstream import SharedRate

from support import ROOT
from support.configs import write_config
from support.redis_server import REDIS_SERVER, RedisServer
from support.relay import RelayProcess
from support.sink import Sink
from support.smtp import free_port
from support.waiting import wait_until

pytestmark = pytest.mark.skipif(
    REDIS_SERVER is None, reason="redis-server is not installed (Debian package redis-server)"
)


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path).start()
    yield server
    server.stop()


@pytest.fixture
def relays(tmp_path: Path) -> Iterator[list[RelayProcess]]:
    """Relay processes, each with its own directory (config, spool, log)."""
    started: list[RelayProcess] = []
    yield started
    for relay in started:
        if relay.proc is not None and relay.proc.poll() is None:
            relay.kill()


def start_relay(
    tmp_path: Path, relays: list, sink: Sink, node: str, redis_url: str | None, rate: str
) -> RelayProcess:
    home = tmp_path / node
    home.mkdir()
    fleet = f'[fleet]\nredis = "{redis_url}"\nnode = "{node}"\n' if redis_url else ""
    path = write_config(home, sink.port, fleet)
    path.write_text(path.read_text() + f'rate = "{rate}"\n')  # on the [[backend]]
    relay = RelayProcess(path, home / "relay.log")
    relays.append(relay)
    return relay.start()


def send(relay: RelayProcess, count: int, tag: str) -> None:
    assert relay.port is not None
    with smtplib.SMTP("127.0.0.1", relay.port, timeout=10) as client:
        for i in range(count):
            client.sendmail(
                "app@example.com", ["user@example.org"], f"Subject: {tag}-{i}\r\n\r\nx\r\n"
            )


def most_in_any_window(times: list[float], window: float) -> int:
    times = sorted(times)
    return max(sum(1 for t in times[i:] if t < start + window) for i, start in enumerate(times))


def subjects(sink: Sink) -> set[str]:
    return {
        m.content.split(b"Subject: ", 1)[1].split(b"\r\n", 1)[0].decode() for m in sink.messages
    }


# -- two relays, one rate ------------------------------------------------------------------


def test_two_relays_hold_one_shared_rate_together(tmp_path, sink, redis_server, relays):
    a = start_relay(tmp_path, relays, sink, "a", redis_server.url, "10/s")
    b = start_relay(tmp_path, relays, sink, "b", redis_server.url, "10/s")
    send(a, 12, "a")
    send(b, 12, "b")
    arrivals = [m.at for m in sink.wait_for(24, timeout=20)]

    # Alone, each relay would send at 10/s: 20/s together. Shared: one every 0.1 s.
    assert max(arrivals) - min(arrivals) >= 23 * 0.1 * 0.9
    # 10, and a few messages that left late and bunched with the next (a busy machine).
    assert most_in_any_window(arrivals, 1.0) <= 13
    assert subjects(sink) == {f"{n}-{i}" for n in "ab" for i in range(12)}
    # Every line of a relay in a fleet names its node (SPEC §8).
    for relay, node in ((a, "a"), (b, "b")):
        records = relay.records()
        assert records and all(r.get("node") == node for r in records), records[:3]


def test_without_a_fleet_each_relay_has_the_whole_rate(tmp_path, sink, relays):
    # The control for the test above: the same load, no [fleet], twice the rate.
    a = start_relay(tmp_path, relays, sink, "a", None, "10/s")
    b = start_relay(tmp_path, relays, sink, "b", None, "10/s")
    send(a, 10, "a")
    send(b, 10, "b")
    arrivals = [m.at for m in sink.wait_for(20, timeout=20)]
    assert most_in_any_window(arrivals, 1.0) > 11
    assert "node" not in a.records()[0]


# -- Redis goes away, and comes back -------------------------------------------------------


def nodes_seen(server: RedisServer) -> dict[str, float]:
    with server.client() as client:
        return {k.decode(): v for k, v in client.zrange(NODES_KEY, 0, -1, withscores=True)}


def test_redis_down_each_relay_takes_its_share_and_nothing_is_lost(
    tmp_path, sink, redis_server, relays
):
    a = start_relay(tmp_path, relays, sink, "a", redis_server.url, "5/s")
    start_relay(tmp_path, relays, sink, "b", redis_server.url, "5/s")
    # Both announced, then both announced again: each has counted two relays alive.
    both = wait_until(lambda: len(nodes_seen(redis_server)) == 2 and nodes_seen(redis_server))
    since = max(both.values())
    wait_until(lambda: min(nodes_seen(redis_server).values()) > since, 5, "a second heartbeat")

    redis_server.stop()
    send(a, 8, "down")
    arrivals = [m.at for m in sink.wait_for(8, timeout=20)]
    # At the whole rate (5/s: one every 0.2 s) the eighth message would go 1.4 s after
    # the first; at this relay's share (two relays last seen alive: one every 0.4 s),
    # 2.8 s. The margin is for a first message late on its new session.
    assert arrivals[7] - arrivals[0] >= 2.3
    wait_until(lambda: [r for r in a.records() if r["event"] == "fleet_degraded"])

    redis_server.start()
    wait_until(lambda: [r for r in a.records() if r["event"] == "fleet_restored"], 10)
    send(a, 3, "back")
    sink.wait_for(11)
    assert subjects(sink) == {f"down-{i}" for i in range(8)} | {f"back-{i}" for i in range(3)}
    events = [r["event"] for r in a.records()]
    assert events.count("fleet_degraded") == 1 and events.count("fleet_restored") == 1
    [degraded] = [r for r in a.records() if r["event"] == "fleet_degraded"]
    assert degraded["relays"] == 2 and degraded["level"] == "warning"
    # Back in Redis: the relay announces itself again.
    wait_until(lambda: "a" in nodes_seen(redis_server), 5, "relay a to announce itself")


# -- the shared slots themselves ------------------------------------------------------------


def test_shared_slots_are_spaced_and_a_slot_given_back_is_taken_next(redis_server):
    fleet = Fleet(FleetConfig(redis=redis_server.url, node="t"))
    try:
        rate = SharedRate(fleet, "account", 10, 1.0)
        now = time.time()
        slots = [rate.reserve(now) for _ in range(4)]
        assert slots[0] == now
        gaps = [later - earlier for earlier, later in zip(slots[1:], slots[2:])]
        assert all(0.09 <= gap <= 0.11 for gap in gaps), gaps
        rate.cancel(slots[2])
        again = rate.reserve(now)
        assert abs(again - slots[2]) < 0.01  # the hole, not a fifth slot
        assert rate.reserve(now) - slots[3] >= 0.09
    finally:
        fleet.stop()


def test_a_relay_that_stops_leaves_the_fleet_at_once(redis_server):
    fleet = Fleet(FleetConfig(redis=redis_server.url, node="leaving"))
    fleet.start()
    assert "leaving" in nodes_seen(redis_server)
    fleet.stop()
    assert "leaving" not in nodes_seen(redis_server)


def test_a_dead_redis_costs_a_booking_little_and_never_stops_it(tmp_path):
    fleet = Fleet(FleetConfig(redis=f"redis://127.0.0.1:{free_port()}/0", node="alone"))
    try:
        rate = SharedRate(fleet, "account", 5, 1.0)
        started = time.monotonic()
        now = time.time()
        assert rate.reserve(now) == now  # the local share: still delivering
        assert fleet.degraded
        assert time.monotonic() - started < 1.0
    finally:
        fleet.stop()


# -- configuration and check --------------------------------------------------------------


def test_check_connect_reports_the_redis_connection(tmp_path, sink, redis_server):
    path = write_config(tmp_path, sink.port, f'[fleet]\nredis = "{redis_server.url}"\n')
    result = check_connect(path)
    assert result.returncode == 0, result.stderr
    assert "fleet:" in result.stdout
    assert "  ok       Redis " in result.stdout, result.stdout

    redis_server.stop()
    result = check_connect(path)
    assert result.returncode == 1
    assert "FAILED" in result.stdout.split("fleet ", 1)[1]


def test_fleet_without_the_redis_library_names_the_extra(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "redis" else real(name, *a)
    )
    with pytest.raises(ConfigError) as caught:
        parse_config({"backend": [{"host": "x"}], "fleet": {"redis": "redis://h/0"}})
    assert caught.value.errors == [
        "fleet.redis: needs the redis library: pip install 'smarthost[fleet]'"
    ]


def test_fleet_config_keys_are_checked():
    with pytest.raises(ConfigError) as caught:
        parse_config(
            {
                "backend": [{"host": "x"}],
                "fleet": {"redis": "http://h", "nod": "x"},
                "smtp": {"proxy_protocol": True},
            }
        )
    assert sorted(caught.value.errors) == [
        "fleet.nod: unknown key (did you mean node?)",
        "fleet.redis: must be a redis://, rediss:// or unix:// URL",
        "smtp.proxy_from: required when smtp.proxy_protocol is true"
        " (the proxies allowed to send the PROXY header)",
    ]
    with pytest.raises(ConfigError) as caught:
        parse_config({"backend": [{"host": "x"}], "fleet": {"redis": "redis://:pw@h:99999/0"}})
    assert caught.value.errors == ["fleet.redis: invalid port in redis://***@h:99999/0"]
    config = parse_config({"backend": [{"host": "x"}]})
    assert not config.fleet.enabled and config.fleet.node == socket.gethostname()


def test_fleet_settings_wait_for_a_restart(tmp_path, sink, redis_server, relay_factory):
    from smarthost.config import load_config

    path = write_config(tmp_path, sink.port, f'[fleet]\nredis = "{redis_server.url}"\nnode = "a"\n')
    running = relay_factory(load_config(path))
    wait_until(lambda: "a" in nodes_seen(redis_server), 5, "relay a to announce itself")
    path.write_text(path.read_text().replace('node = "a"', 'node = "renamed"'))
    assert running.relay.reload(load_config(path)) == ["fleet"]
    assert running.relay.config.fleet.node == "a"  # and so every log line still says


def check_connect(path: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "smarthost", "-c", str(path), "check", "--connect"],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=30,
    )


def test_the_redis_password_comes_from_its_file_and_is_never_shown(tmp_path, sink):
    server = RedisServer(tmp_path, "--requirepass", "s3cret-pw").start()
    try:
        secret = tmp_path / "redis.secret"
        secret.write_text("s3cret-pw\n")
        secret.chmod(0o600)
        fleet = f'[fleet]\nredis = "{server.url}"\nredis_password_file = "{secret}"\n'
        path = write_config(tmp_path, sink.port, fleet)
        result = check_connect(path)
        assert result.returncode == 0, result.stdout + result.stderr
        assert "  ok       Redis " in result.stdout

        secret.write_text("wrong\n")
        result = check_connect(path)
        assert result.returncode == 1
        assert "FAILED" in result.stdout.split("fleet ", 1)[1]
        assert "wrong" not in result.stdout + result.stderr

        secret.unlink()
        result = check_connect(path)
        assert result.returncode == 1
        assert f"fleet.redis_password_file: cannot read {secret}" in result.stderr
    finally:
        server.stop()
