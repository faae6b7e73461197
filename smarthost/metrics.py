"""Metrics and health (SPEC §10): one HTTP endpoint for both halves of the relay.

Made with prometheus_client in its documented multiprocess mode: each process writes
its values into files of a private directory (PROMETHEUS_MULTIPROC_DIR, under the
spool, emptied at each start), and the relay process serves the sum of them all. A
delivery process that dies leaves its counters' file behind, so counters keep growing
across a restart of the delivery half; gauges use the "mostrecent" mode, so the new
delivery process's values replace the old one's.

Counters and histograms are fed by events (log.observe sees every event, whatever the
log level). The queue's gauges are kept by QueueShape as the spool changes (the
Spool tells it of every move) and corrected by a rescan of the spool's directories
every RESCAN_INTERVAL: a scrape never walks the spool. Gauges that are cheap to read
when asked (client sessions, free space) are read at scrape time.

Nothing here imports prometheus_client before the directory is set in the
environment, and nothing imports this module while `[metrics] listen` is unset:
metrics off costs no import, no thread and no observer.
"""

from __future__ import annotations

import contextlib
import heapq
import http.server
import importlib
import importlib.util
import logging
import os
import shutil
import socket
import threading
import time
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any, Protocol

from . import log
from .config import Config, format_hostport
from .spool import ACTIVE, FAILED, HOLD, QUEUE, Spool, id_time

if TYPE_CHECKING:
    import pwd

PREFIX = "smarthost_"
MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
DIRECTORY = ".metrics"  # in the spool's root
EXTRA = "smarthost[metrics]"
STATES = ("queued", "deferred", "active", "held", "failed")
RESULTS = ("delivered", "deferred", "failed")
DSN_ACTIONS = ("failed", "delayed", "relayed", "expired")
SOURCES = ("smtp", "sendmail")
PUBLISH_INTERVAL = 1.0  # seconds between two writes of the queue gauges
RESCAN_INTERVAL = 30.0  # seconds between two corrections of the counts from the spool
# Latency buckets (seconds): a commit takes milliseconds; a delivery from milliseconds
# (forwarded at once) to days (retried).
COMMIT_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
DELIVERY_BUCKETS = (
    *(0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 30.0, 60.0, 300.0, 900.0),
    *(3600.0, 4 * 3600.0, 86400.0, 5 * 86400.0),
)


def requirement_errors(config: Config) -> list[str]:
    """For `check` and the start: metrics asked for without prometheus_client."""
    if config.metrics.listen is None or importlib.util.find_spec("prometheus_client"):
        return []
    return [
        "metrics.listen: needs the Python package prometheus_client, "
        f"which is not installed: install {EXTRA} (pip install '{EXTRA}')"
    ]


def load_library() -> None:
    """Import what the metrics use of prometheus_client now, before a process drops
    root: the service user may not reach the interpreter's files (a venv under /root).
    The values' directory must be in the environment already."""
    for name in ("core", "exposition", "multiprocess"):
        importlib.import_module(f"prometheus_client.{name}")


def prepare_directory(spool_root: str, account: pwd.struct_passwd | None) -> str:
    """Create (or empty) the spool's metrics directory for the service user and name
    it in the environment, which the delivery process inherits. Before any import of
    prometheus_client: it reads the variable when it is imported."""
    path = os.path.join(spool_root, DIRECTORY)
    if os.path.islink(path) or (os.path.lexists(path) and not os.path.isdir(path)):
        os.unlink(path)
    with contextlib.suppress(FileNotFoundError):
        shutil.rmtree(path)  # the values of the previous run: counters start again
    os.mkdir(path, 0o700)
    if account is not None and os.geteuid() == 0:
        os.chown(path, account.pw_uid, account.pw_gid)
    os.environ[MULTIPROC_ENV] = path
    return path


# -- the queue's shape ----------------------------------------------------------------


class QueueShape:
    """How many messages each queue state holds and the arrival of the oldest, kept as
    the spool changes (a Spool observer), without reading any directory.

    Every change bumps a version; a rescan applies what it found only to messages no
    change touched since it began, so a listing that raced a move never undoes it.
    Small per message (about 100 bytes: 100,000 messages are a few MiB): one int holds
    a message's state and version, and the oldest of a state is its smallest queue ID
    (IDs sort by arrival), kept in a heap of the ID strings themselves.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._version = 0
        self._where: dict[str, int] = {}  # queue ID -> version * _SLOTS + state index
        self._counts = [0] * len(STATES)
        # Per state: its queue IDs, oldest first; IDs of messages that left the state
        # are dropped when they come to the top (or at the next rescan).
        self._oldest: list[list[str]] = [[] for _ in STATES]

    # -- Spool observer ---------------------------------------------------------

    def moved(self, queue_id: str, src: str | None, dst: str | None) -> None:
        """An envelope went from spool directory `src` to `dst` (None: new / gone)."""
        with self._lock:
            if src is None and queue_id in self._where:
                return  # told twice of an arrival (committed, then the pipe's hint)
            self._version += 1
            self._put(queue_id, _state_of(src, dst), self._version)

    def _put(self, queue_id: str, state: int | None, version: int) -> None:
        old = self._where.pop(queue_id, None)
        if old is not None:
            self._counts[old % _SLOTS] -= 1
        if state is None:
            return
        self._where[queue_id] = version * _SLOTS + state
        self._counts[state] += 1
        if old is None or old % _SLOTS != state:
            heapq.heappush(self._oldest[state], queue_id)

    # -- corrections ------------------------------------------------------------

    def rescan(self, spool: Spool, now: float | None = None) -> None:
        """Correct the counts from the spool's directories (names, and a stat of
        queued mail seen for the first time: due later means deferred)."""
        with self._lock:
            began = self._version
        found: dict[str, int] = {}
        for directory in (ACTIVE, HOLD, FAILED):
            found.update(dict.fromkeys(spool.each_name(directory), _STATE_OF_DIRECTORY[directory]))
        now = time.time() if now is None else now
        for queue_id in spool.each_name(QUEUE):
            known = self._where.get(queue_id)
            if known is not None and known % _SLOTS in (_QUEUED, _DEFERRED):
                found[queue_id] = known % _SLOTS
                continue
            try:
                due = os.stat(spool.path(QUEUE, queue_id), follow_symlinks=False).st_mtime
            except FileNotFoundError:
                continue  # moved while we looked
            found[queue_id] = _DEFERRED if due > now else _QUEUED
        with self._lock:
            self._apply(found, began)

    def _apply(self, found: dict[str, int], began: int) -> None:
        for queue_id, packed in list(self._where.items()):
            if packed // _SLOTS <= began and queue_id not in found:
                self._put(queue_id, None, 0)
        for queue_id, state in found.items():
            old = self._where.get(queue_id)
            if old is None or (old // _SLOTS <= began and old % _SLOTS != state):
                self._put(queue_id, state, began if old is None else old // _SLOTS)
        # Rebuilt from what is there: no stale entries pile up.
        rebuilt: list[list[str]] = [[] for _ in STATES]
        for queue_id, packed in self._where.items():
            rebuilt[packed % _SLOTS].append(queue_id)
        for entries in rebuilt:
            heapq.heapify(entries)
        self._oldest = rebuilt

    # -- readings ---------------------------------------------------------------

    def counts(self) -> dict[str, int]:
        with self._lock:
            return dict(zip(STATES, self._counts))

    def oldest_ages(self, now: float | None = None) -> dict[str, float]:
        """Per state, the age of its oldest message (0 when it holds none)."""
        now = time.time() if now is None else now
        ages = {}
        with self._lock:
            for state, heap in enumerate(self._oldest):
                while heap and self._where.get(heap[0], -1) % _SLOTS != state:
                    heapq.heappop(heap)
                ages[STATES[state]] = max(0.0, now - id_time(heap[0])) if heap else 0.0
        return ages


_SLOTS = 8  # more than len(STATES): a state index fits below it
_QUEUED, _DEFERRED = STATES.index("queued"), STATES.index("deferred")
_STATE_OF_DIRECTORY: dict[str, int] = {
    ACTIVE: STATES.index("active"),
    HOLD: STATES.index("held"),
    FAILED: STATES.index("failed"),
}


def _state_of(src: str | None, dst: str | None) -> int | None:
    """The queue state (index) of an envelope moved from directory `src` to `dst`."""
    if dst == QUEUE:
        return _QUEUED if src is None else _DEFERRED  # back from an attempt
    return _STATE_OF_DIRECTORY.get(dst or "")


# -- the families -----------------------------------------------------------------------


class Families:
    """The metric families of SPEC §10 written by this process, fed by its events.

    `node` (a fleet's node name) adds a `node` label to every family when set.
    """

    def __init__(self, node: str | None = None) -> None:
        from prometheus_client import Counter, Gauge, Histogram

        self.node = node
        extra = ("node",) if node else ()

        def labels(*names: str) -> tuple[str, ...]:
            return (*names, *extra)

        def counter(name: str, doc: str, *names: str) -> Any:
            return Counter(PREFIX + name, doc, labels(*names), registry=None)

        def gauge(name: str, doc: str, *names: str) -> Any:
            return Gauge(
                PREFIX + name, doc, labels(*names), registry=None, multiprocess_mode="mostrecent"
            )

        self.received = counter("messages_received", "Messages accepted (250 / exit 0).", "source")
        self.rejections = counter("smtp_rejections", "Refused client commands.", "code")
        self.deliveries = counter(
            "deliveries", "Recipient outcomes of delivery attempts.", "backend", "result"
        )
        self.dsns = counter("dsn", "DSNs queued.", "action")
        self.double_bounces = counter("double_bounces", "Bounces that could not be delivered.")
        self.queue_messages = gauge("queue_messages", "Messages in the spool now.", "state")
        self.queue_oldest = gauge(
            "queue_oldest_age_seconds",
            "Age of the oldest message in that state (0 when none).",
            "state",
        )
        self.backend_up = gauge("backend_up", "1 healthy, 0 marked down.", "backend", "group")
        self.delivery_seconds = Histogram(
            PREFIX + "delivery_seconds",
            "From acceptance to the upstream's 250, per message.",
            labels("backend"),
            buckets=DELIVERY_BUCKETS,
            registry=None,
        )
        self.commit_seconds = Histogram(
            PREFIX + "commit_seconds",
            "DATA end to durable commit.",
            labels(),
            buckets=COMMIT_BUCKETS,
            registry=None,
        )
        self._on_event: dict[str, Callable[[dict[str, Any]], None]] = {
            "received": self._received,
            "rejected": self._rejected,
            "delivered": self._delivered,
            "deferred": self._deferred,
            "failed": self._failed,
            "dsn_queued": self._dsn_queued,
            "double_bounce": self._double_bounce,
            "backend_down": self._backend_down,
            "backend_up": self._backend_up,
        }

    def _of(self, metric: Any, *values: str) -> Any:
        """The child of `metric` for these label values (and this node)."""
        if self.node:
            return metric.labels(*values, self.node)
        return metric.labels(*values) if values else metric

    def start_at_zero(self, config: Config, receiving: bool) -> None:
        """Series that exist before their first event, so that rates start at zero:
        the receiving half's, or the delivery half's for every configured backend."""
        if receiving:
            self._of(self.received, "smtp")
            self._of(self.commit_seconds)
            return
        self._of(self.received, "sendmail")
        self._of(self.double_bounces)
        for action in DSN_ACTIONS:
            self._of(self.dsns, action)
        for backend in config.backends:
            for result in RESULTS:
                self._of(self.deliveries, backend.name, result)
            self._of(self.delivery_seconds, backend.name)
            self._of(self.backend_up, backend.name, backend.group).set(1)

    def observe(self, name: str, fields: dict[str, Any]) -> None:
        """A log.observe observer: count event `name`. Never raises: a bug here must
        not cost a delivery."""
        handler = self._on_event.get(name)
        if handler is None:
            return
        try:
            handler(fields)
        except Exception as exc:
            log.event("internal_error", level=logging.ERROR, error=f"metrics: {exc!r}")

    def _received(self, fields: dict[str, Any]) -> None:
        self._of(self.received, fields.get("source", "smtp")).inc()
        if fields.get("commit_seconds") is not None:
            self._of(self.commit_seconds).observe(fields["commit_seconds"])

    def _rejected(self, fields: dict[str, Any]) -> None:
        if fields.get("source") == "sendmail":
            return  # a drop file refused: no SMTP command
        self._of(self.rejections, str(fields.get("reply") or "")[:3]).inc()

    def _count(self, fields: dict[str, Any], result: str) -> None:
        recipients = len(fields.get("recipients") or ()) or 1
        # A deferral by backends that failed without a transaction names them in
        # `tried`; none at all (every backend marked down): the empty label.
        backend = fields.get("backend") or (fields.get("tried") or [""])[-1]
        self._of(self.deliveries, backend, result).inc(recipients)

    def _delivered(self, fields: dict[str, Any]) -> None:
        self._count(fields, "delivered")
        if fields.get("delay") is not None:
            backend = fields.get("backend") or ""
            self._of(self.delivery_seconds, backend).observe(fields["delay"])

    def _deferred(self, fields: dict[str, Any]) -> None:
        self._count(fields, "deferred")

    def _failed(self, fields: dict[str, Any]) -> None:
        self._count(fields, "failed")

    def _dsn_queued(self, fields: dict[str, Any]) -> None:
        action = fields.get("action") or ""
        if action == "failed" and fields.get("status") == "4.4.7":
            action = "expired"  # retry_for ran out
        self._of(self.dsns, action).inc()

    def _double_bounce(self, fields: dict[str, Any]) -> None:
        self._of(self.double_bounces).inc()

    def _backend_down(self, fields: dict[str, Any]) -> None:
        self._of(self.backend_up, fields["backend"], fields["group"]).set(0)

    def _backend_up(self, fields: dict[str, Any]) -> None:
        self._of(self.backend_up, fields["backend"], fields["group"]).set(1)

    def publish_queue(self, shape: QueueShape) -> None:
        counts, ages = shape.counts(), shape.oldest_ages()
        for state in STATES:
            self._of(self.queue_messages, state).set(counts[state])
            self._of(self.queue_oldest, state).set(round(ages[state], 3))


# -- the delivery half ----------------------------------------------------------------


class DeliveryMetrics:
    """The delivery process's part: its families fed by its events, and the queue's
    shape, written every PUBLISH_INTERVAL and corrected every RESCAN_INTERVAL by one
    thread of its own."""

    def __init__(self, config: Config, spool: Spool, node: str | None = None) -> None:
        self.spool = spool
        self.families = Families(node)
        self.families.start_at_zero(config, receiving=False)
        self.shape = QueueShape()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="metrics-queue", daemon=True)

    def start(self) -> None:
        """Count before the first scan of the spool, so that no move is missed."""
        self.spool.observer = self.shape
        log.observe(self.families.observe)
        self._thread.start()

    def use(self, config: Config) -> None:
        """A reloaded config: series for its backends."""
        self.families.start_at_zero(config, receiving=False)

    def stop(self) -> None:
        self._stop.set()

    def _run(self) -> None:
        next_rescan = 0.0
        while not self._stop.is_set():
            try:
                if time.monotonic() >= next_rescan:
                    self.shape.rescan(self.spool)
                    next_rescan = time.monotonic() + RESCAN_INTERVAL
                self.families.publish_queue(self.shape)
            except Exception as exc:  # EMFILE, EIO: the next round tries again
                log.event("internal_error", level=logging.ERROR, error=f"metrics: {exc!r}")
            self._stop.wait(PUBLISH_INTERVAL)


# -- the relay process: the endpoint ----------------------------------------------------


class RelayState(Protocol):
    """What the endpoint asks the relay process (relay.Relay provides it)."""

    spool: Spool

    def sessions(self) -> int: ...

    def not_alive(self) -> str | None:
        """Why the relay's processes do not all live; None when they do."""

    def not_ready(self) -> str | None:
        """Why the relay does not accept mail now; None when it does."""


class _ReadAtScrape:
    """Gauges of the relay process read when scraped: sessions and spool free space."""

    def __init__(self, relay: RelayState, node: str | None) -> None:
        self.relay = relay
        self.node = node

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import GaugeMetricFamily

        labels, values = (["node"], [self.node]) if self.node else ([], [])
        sessions = GaugeMetricFamily(
            PREFIX + "smtp_sessions", "Client sessions open now.", labels=labels
        )
        sessions.add_metric(values, self.relay.sessions())
        yield sessions
        free = GaugeMetricFamily(
            PREFIX + "spool_free_bytes",
            "Free space on the spool's file system.",
            labels=labels,
        )
        st = os.statvfs(self.relay.spool.root)
        free.add_metric(values, st.f_bavail * st.f_frsize)
        yield free
        ready = GaugeMetricFamily(
            PREFIX + "ready",
            "1 when the relay accepts mail (as /readyz says 200), else 0.",
            labels=labels,
        )
        ready.add_metric(values, 0 if self.relay.not_ready() else 1)
        yield ready


class MetricsServer:
    """The relay process's part: its families fed by its events, and the HTTP
    endpoint (/metrics, /healthz, /readyz) that serves every process's values."""

    def __init__(self, config: Config, relay: RelayState, node: str | None = None) -> None:
        from prometheus_client import CollectorRegistry
        from prometheus_client.multiprocess import MultiProcessCollector

        assert config.metrics.listen is not None
        self.families = Families(node)
        self.families.start_at_zero(config, receiving=True)
        self.registry = CollectorRegistry()
        MultiProcessCollector(self.registry)
        self.registry.register(_ReadAtScrape(relay, node))
        self.relay = relay
        host, port = config.metrics.listen
        self.httpd = _server_class(host)((host, port), _handler(self))
        self._thread = threading.Thread(
            target=self.httpd.serve_forever, name="metrics-http", daemon=True
        )

    @property
    def address(self) -> str:
        host, port = self.httpd.server_address[:2]
        return format_hostport(str(host), int(port))

    def start(self) -> None:
        log.observe(self.families.observe)
        self._thread.start()

    def stop(self) -> None:
        log.observe(None)
        if self._thread.is_alive():
            self.httpd.shutdown()
        self.httpd.server_close()

    def answer(self, path: str, accept: str | None) -> tuple[int, str, bytes]:
        """(status, content type, body) for a GET of `path`."""
        if path == "/metrics":
            from prometheus_client.exposition import choose_encoder

            encoder, content_type = choose_encoder(accept or "")
            return 200, content_type, encoder(self.registry)
        if path in ("/healthz", "/readyz"):
            check = self.relay.not_alive if path == "/healthz" else self.relay.not_ready
            reason = check()
            text = "ok" if reason is None else reason
            return (
                (200 if reason is None else 503),
                "text/plain; charset=utf-8",
                (text + "\n").encode(),
            )
        return 404, "text/plain; charset=utf-8", b"not found: try /metrics, /healthz, /readyz\n"


def _server_class(host: str) -> type[http.server.ThreadingHTTPServer]:
    class Server(http.server.ThreadingHTTPServer):
        address_family = socket.AF_INET6 if ":" in host else socket.AF_INET
        daemon_threads = True

    return Server


def _handler(server: MetricsServer) -> type[http.server.BaseHTTPRequestHandler]:
    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            path = self.path.split("?", 1)[0]
            status, content_type, body = server.answer(path, self.headers.get("Accept"))
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: Any) -> None:
            pass  # scrapes every few seconds are not events

    return Handler


def start_server(
    config: Config,
    relay: RelayState,
    account: pwd.struct_passwd | None,
    directory: str,
    node: str | None = None,
) -> MetricsServer:
    """Bind the endpoint (before the relay drops root) and serve it; `directory` is the
    values' directory, prepared before the delivery process started (it inherits it)."""
    server = MetricsServer(config, relay, node)
    if account is not None and os.geteuid() == 0:
        # The files this process just wrote its first values into, as root: readable
        # by it once it runs as the service user, whatever the umask.
        for name in os.listdir(directory):
            path = os.path.join(directory, name)
            os.chown(path, account.pw_uid, account.pw_gid, follow_symlinks=False)
    server.start()
    return server
