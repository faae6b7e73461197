"""Fleets (SPEC §12): relays that share a provider account's rate through Redis.

With `[fleet] redis` set, a backend's `rate` holds for every relay using a backend of
the same `name`: each message books its slot in Redis with one Lua script run (one
round trip), a GCRA (generic cell rate algorithm, as KumoMTA's shared throttles) whose
only state is the account's theoretical arrival time, in Redis's own clock so the
relays' clocks do not matter. Slots are spaced by `period / count`: the rate is held
smoothly, never as a burst. A slot booked and then not used (the message went to
another backend) is given back as a "hole" the next booking takes first.

Each relay announces itself every second in a sorted set of nodes, scored by the time
it was last seen; a node not seen for NODE_TTL no longer counts. When Redis cannot be
reached, the relay goes on alone: `rate` divided by the relays last seen alive, kept
locally (`fleet_degraded`, once), until a heartbeat gets through again
(`fleet_restored`). Delivery never waits on Redis for longer than a short socket
timeout, and never stops because of it. Nothing durable lives in Redis: an empty one
(restarted without persistence) only forgets bookings a second or so ahead.
"""

from __future__ import annotations

import contextlib
import importlib
import logging
import math
import threading
from collections.abc import Callable
from typing import Any

from . import log
from .config import Config, ConfigError, FleetConfig, redacted_url

KEY_PREFIX = "smarthost:"
NODES_KEY = KEY_PREFIX + "nodes"
HEARTBEAT_INTERVAL = 1.0  # seconds between announcements (and, degraded, between probes)
NODE_TTL = 5.0  # a relay not heard of for this long is no longer counted alive
SOCKET_TIMEOUT = 0.25  # a dead Redis costs a sender thread at most this, once

# KEYS[1]: the account's theoretical arrival time (µs, Redis clock);
# KEYS[2]: slots given back (a sorted set scored by slot).
# ARGV[1]: the emission interval (µs). Returns {slot, slot - now} in µs.
_RESERVE = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local interval = tonumber(ARGV[1])
redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', '(' .. now)
local hole = redis.call('ZRANGE', KEYS[2], 0, 0, 'WITHSCORES')
local slot
if #hole > 0 then
  redis.call('ZREM', KEYS[2], hole[1])
  slot = tonumber(hole[2])
else
  slot = math.max(tonumber(redis.call('GET', KEYS[1]) or '0'), now)
  local tat = slot + interval
  redis.call('SET', KEYS[1], string.format('%d', tat),
             'PX', math.floor((tat - now) / 1000) + 1000)
end
return {string.format('%d', slot), string.format('%d', slot - now)}
"""

# KEYS[2] as above; ARGV[1]: the slot (µs) given back. A slot already past is let go.
_CANCEL = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local slot = tonumber(ARGV[1])
if slot > now then
  redis.call('ZADD', KEYS[1], slot, ARGV[1])
  redis.call('PEXPIRE', KEYS[1], math.floor((slot - now) / 1000) + 1000)
end
return 0
"""

# KEYS[1]: the nodes (sorted set, scored by last seen, seconds); ARGV[1]: this node,
# ARGV[2]: NODE_TTL. Returns how many relays are alive, this one included.
_HEARTBEAT = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
redis.call('ZADD', KEYS[1], now, ARGV[1])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now - tonumber(ARGV[2]))
redis.call('EXPIRE', KEYS[1], math.ceil(tonumber(ARGV[2]) * 2))
return redis.call('ZCARD', KEYS[1])
"""


def load_library() -> None:
    """Import what the fleet uses of redis now, before the delivery process drops root:
    the service user may not reach the interpreter's files (a venv under /root)."""
    for name in ("redis", "redis.backoff", "redis.retry", "redis.exceptions"):
        importlib.import_module(name)


def _client(config: FleetConfig) -> Any:
    """A Redis client with short timeouts and no retries of its own: a failure is
    the fleet's to handle (degraded mode), at once."""
    import redis
    from redis.backoff import NoBackoff
    from redis.retry import Retry

    assert config.redis is not None
    password = redis_password(config)
    kwargs: dict[str, Any] = {
        "socket_timeout": SOCKET_TIMEOUT,
        "socket_connect_timeout": SOCKET_TIMEOUT,
        "retry": Retry(NoBackoff(), 0),
    }
    if password is not None:
        kwargs["password"] = password
    return redis.Redis.from_url(config.redis, **kwargs)


def redis_password(config: FleetConfig) -> str | None:
    """The first line of `redis_password_file`, if set; ConfigError if unreadable."""
    if not config.redis_password_file:
        return None
    try:
        with open(config.redis_password_file, encoding="utf-8") as f:
            return f.readline().strip() or None
    except (OSError, UnicodeDecodeError) as exc:
        reason = getattr(exc, "strerror", None) or str(exc)
        raise ConfigError(
            [f"fleet.redis_password_file: cannot read {config.redis_password_file}: {reason}"]
        ) from None


def _redis_errors() -> tuple[type[BaseException], ...]:
    import redis

    return (redis.RedisError, OSError)


class Fleet:
    """This relay's membership of the fleet: heartbeats, shared slots, degraded mode."""

    def __init__(self, config: FleetConfig) -> None:
        self.config = config
        self.node = config.node
        self._client = _client(config)
        self._reserve = self._client.register_script(_RESERVE)
        self._cancel = self._client.register_script(_CANCEL)
        self._heartbeat = self._client.register_script(_HEARTBEAT)
        self._errors = _redis_errors()
        self._lock = threading.Lock()
        self.degraded = False
        self.alive = 1  # relays last seen alive; until Redis answers, only this one
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # -- membership --------------------------------------------------------------

    def start(self) -> None:
        """Announce this relay (logging `fleet_degraded` if Redis cannot be reached),
        then keep announcing it from a thread of its own."""
        self.beat()
        self._thread = threading.Thread(target=self._run, name="fleet", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(HEARTBEAT_INTERVAL):
            self.beat()

    def beat(self) -> None:
        """One announcement; the count of relays alive comes back with it."""
        try:
            alive = int(self._heartbeat(keys=[NODES_KEY], args=[self.node, NODE_TTL]))
        except self._errors as exc:
            self.lost(exc)
            return
        with self._lock:
            self.alive = max(1, alive)
            was_degraded, self.degraded = self.degraded, False
        if was_degraded:
            log.event("fleet_restored", relays=alive)

    def lost(self, exc: BaseException) -> None:
        """Redis failed us: go on alone until a heartbeat gets through."""
        with self._lock:
            was_degraded, self.degraded = self.degraded, True
            alive = self.alive
        if not was_degraded:
            log.event(
                "fleet_degraded",
                level=logging.WARNING,
                error=_describe(exc),
                relays=alive,
                redis=redacted_url(self.config.redis or ""),
            )

    def stop(self) -> None:
        """Stop announcing, and leave the fleet at once (the others' share grows now,
        not after NODE_TTL) when Redis is there to hear it."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(HEARTBEAT_INTERVAL + SOCKET_TIMEOUT * 4)
        if not self.degraded:
            with contextlib.suppress(*self._errors):
                self._client.zrem(NODES_KEY, self.node)
        self._client.close()

    # -- shared slots ------------------------------------------------------------

    def book(self, account: str, interval: float) -> tuple[int, float] | None:
        """A slot for one message on `account`: (its Redis time in µs, seconds from
        now until it), or None when Redis cannot be asked (degraded)."""
        if self.degraded:
            return None
        try:
            slot, delay = self._reserve(
                keys=_account_keys(account), args=[math.ceil(interval * 1e6)]
            )
        except self._errors as exc:
            self.lost(exc)
            return None
        return int(slot), int(delay) / 1e6

    def give_back(self, account: str, slot: int) -> None:
        """A booked slot that will not be used goes to the next booking."""
        if self.degraded:
            return
        try:
            self._cancel(keys=_account_keys(account)[1:], args=[slot])
        except self._errors as exc:
            self.lost(exc)


def _account_keys(account: str) -> list[str]:
    return [f"{KEY_PREFIX}rate:{account}", f"{KEY_PREFIX}rate:{account}:free"]


def membership(config: Config) -> Fleet | None:
    """This relay's place in the fleet (announced once started); None without
    `[fleet] redis`."""
    return Fleet(config.fleet) if config.fleet.enabled else None


def check_files(config: Config) -> list[str]:
    """For `smarthost check`: the Redis password file can be read."""
    try:
        redis_password(config.fleet)
    except ConfigError as exc:
        return exc.errors
    return []


def check_connection(config: Config, out: Callable[[str], None]) -> bool:
    """`smarthost check --connect`: can this relay reach the fleet's Redis?"""
    if not config.fleet.enabled:
        return True
    where = redacted_url(config.fleet.redis or "")
    out(f"fleet {config.fleet.node} redis {where}")
    # A bad password file or URL is as much a failure to connect as a refusal.
    errors: tuple[type[BaseException], ...] = (*_redis_errors(), ValueError, ConfigError)
    try:
        client = _client(config.fleet)
        info = client.info("server")
        alive = client.zcard(NODES_KEY)
        client.close()
    except errors as exc:
        out(f"  FAILED   {_describe(exc)}")
        return False
    server = info.get("valkey_version") or info.get("redis_version") or "?"
    out(f"  ok       Redis {server}, {alive} relay(s) announced")
    return True


def _describe(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
