#!/usr/bin/env python3
"""Fleet benchmark: several relays, one shared `rate`, one Redis, all on 127.0.0.1.

    load (threads) --SMTP--> relay 1..N (smarthost serve, own spools) --SMTP--> sink
                                  \\---- redis-server (shared GCRA, heartbeats) ----/

`python bench/fleet.py` (or `make bench-fleet`) starts bench.py's sink (an aiosmtpd
server in a child process), a redis-server on a free port (no persistence), and runs
three scenarios, each on fresh relays whose one backend, the sink, has
`rate = "<--rate>/s"`:

  fleet      `[fleet] redis` set: the rate is the relays' together
  no fleet   the same relays without `[fleet]`: each has the whole rate (the control)
  degraded   `[fleet]` set, Redis stopped once every relay has seen all the others
             alive: each falls back to rate / relays (SPEC §12)

Each scenario offers --n messages, split evenly over the relays, as fast as they are
accepted, and waits until all reached the sink. Figures:

  achieved   messages / (last arrival - first arrival), in msgs/s
  ratio      achieved / the configured rate: 1.00 is the rate held exactly; the no-fleet
             control shows what N relays do without sharing (about N)
  peak 1 s   the most arrivals in any 1-second window, against the rate
  redis      round trips to Redis (script runs) per message: one booking per message,
             plus one heartbeat per relay per second
  lost       accepted but not arrived within --wait seconds
"""

from __future__ import annotations

import argparse
import shutil
import smtplib
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass

from bench import HOST, Relay, Sink, free_port, write_config


@dataclass
class Outcome:
    name: str
    sent: int
    arrivals: list[float]
    redis_commands: int | None
    events: dict[str, int]


class RedisServer:
    """redis-server on a free port, in the foreground, without persistence."""

    def __init__(self, directory: str) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            raise SystemExit("redis-server is not installed (Debian: apt install redis-server)")
        self.binary, self.directory, self.port = binary, directory, free_port()
        self.url = f"redis://{HOST}:{self.port}/0"
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        no_persistence = ["--save", "", "--appendonly", "no", "--dir", self.directory]
        self.proc = subprocess.Popen(
            [self.binary, "--port", str(self.port), "--bind", HOST, *no_persistence],
            stdout=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 10
        while self.command("PING") != "PONG":
            if time.monotonic() > deadline:
                raise RuntimeError("redis-server did not start")
            time.sleep(0.02)

    def command(self, *words: str) -> str | None:
        """One command through redis-cli (no client library needed here)."""
        result = subprocess.run(
            ["redis-cli", "-h", HOST, "-p", str(self.port), *words],
            capture_output=True,
            text=True,
            check=False,
        )
        return result.stdout.strip() if result.returncode == 0 else None

    def scripts_run(self) -> int | None:
        """Round trips that ran one of the fleet's scripts (EVALSHA, or EVAL once)."""
        info = self.command("INFO", "commandstats")
        if info is None:
            return None
        total = 0
        for line in info.splitlines():
            if line.startswith(("cmdstat_evalsha:", "cmdstat_eval:")):
                total += int(line.split("calls=", 1)[1].split(",", 1)[0])
        return total

    def nodes(self) -> int:
        return int(self.command("ZCARD", "smarthost:nodes") or 0)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(10)


def start_relays(
    directory: str, label: str, count: int, sink: Sink, rate: int, redis_url: str | None
) -> list[Relay]:
    relays = []
    for i in range(count):
        name = f"{label}-{i}"
        path = write_config(directory, name, sink.port, workers=8)
        with open(path, "a", encoding="utf-8") as f:
            f.write(f'rate = "{rate}/s"\n')
            if redis_url:
                f.write(f'\n[fleet]\nredis = "{redis_url}"\nnode = "{name}"\n')
        relays.append(Relay(path, directory, name))
    return relays


def offer(relays: list[Relay], n: int, label: str) -> set[str]:
    """--n messages split over the relays, one session each, all at once."""
    ids: set[str] = set()
    lock = threading.Lock()

    def send(relay: Relay, share: int, index: int) -> None:
        with smtplib.SMTP(HOST, relay.port, timeout=60) as client:
            for i in range(share):
                message_id = f"<{label}.{index}.{i}@bench.test>"
                content = f"Message-ID: {message_id}\r\nSubject: fleet\r\n\r\nx\r\n"
                client.sendmail("bench@example.com", ["sink@example.org"], content)
                with lock:
                    ids.add(message_id)

    threads = [
        threading.Thread(target=send, args=(relay, n // len(relays), i))
        for i, relay in enumerate(relays)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return ids


def run(
    name: str,
    args: argparse.Namespace,
    directory: str,
    sink: Sink,
    redis: RedisServer | None,
    stop_redis: bool = False,
) -> Outcome:
    relays = start_relays(directory, name, args.relays, sink, args.rate, redis and redis.url)
    try:
        if redis is not None and stop_redis:
            # Every relay must have counted all of them alive: two heartbeats after all
            # announced themselves.
            deadline = time.monotonic() + 10
            while redis.nodes() < args.relays and time.monotonic() < deadline:
                time.sleep(0.05)
            time.sleep(2.5)
            redis.stop()
        before = redis.scripts_run() if redis and not stop_redis else None
        ids = offer(relays, args.n, name)
        sink.wait_for(ids, args.wait)
        after = redis.scripts_run() if redis and not stop_redis else None
    finally:
        events: dict[str, int] = {}
        for relay in relays:
            for event, count in relay.stop(frozenset({"fleet_degraded"})).events.items():
                events[event] = events.get(event, 0) + count
        if redis is not None and stop_redis:
            redis.start()
    arrivals = sorted(t for i in ids if i in sink.arrivals for t in sink.arrivals[i][:1])
    commands = after - before if before is not None and after is not None else None
    return Outcome(name, len(ids), arrivals, commands, events)


def most_in_one_second(times: list[float]) -> int:
    best, start = 0, 0
    for end, t in enumerate(times):
        while times[start] <= t - 1.0:
            start += 1
        best = max(best, end - start + 1)
    return best


def report(outcome: Outcome, args: argparse.Namespace) -> None:
    arrived = outcome.arrivals
    span = arrived[-1] - arrived[0] if len(arrived) > 1 else float("nan")
    achieved = (len(arrived) - 1) / span if span else float("nan")
    print(f"{outcome.name}:")
    print(f"  relays       {args.relays}, rate {args.rate}/s configured on each")
    print(f"  messages     {outcome.sent} accepted, {len(arrived)} arrived in {span:.2f} s")
    print(f"  achieved     {achieved:.1f} msgs/s together")
    print(f"  ratio        {achieved / args.rate:.2f} of the configured rate")
    print(f"  peak 1 s     {most_in_one_second(arrived)} arrivals (rate {args.rate})")
    if outcome.redis_commands is not None:
        per = outcome.redis_commands / max(1, outcome.sent)
        print(f"  redis        {outcome.redis_commands} script runs, {per:.2f} per message")
    fleet_events = {k: v for k, v in outcome.events.items() if k.startswith("fleet_")}
    if fleet_events:
        print(f"  events       {fleet_events}")
    print(f"  lost         {outcome.sent - len(arrived)}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--relays", type=int, default=3)
    parser.add_argument("--rate", type=int, default=50, help="the shared rate, msgs/s")
    parser.add_argument("--n", type=int, default=300, help="messages per scenario")
    parser.add_argument("--wait", type=float, default=120.0)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="smarthost-fleet-") as directory:
        redis = RedisServer(directory)
        redis.start()
        sink = Sink()
        try:
            outcomes = [
                run("fleet", args, directory, sink, redis),
                run("no fleet", args, directory, sink, None),
                run("degraded (Redis stopped)", args, directory, sink, redis, stop_redis=True),
            ]
        finally:
            sink.stop()
            redis.stop()
    for outcome in outcomes:
        report(outcome, args)
    return 0 if all(len(o.arrivals) == o.sent for o in outcomes) else 1


if __name__ == "__main__":
    sys.exit(main())
