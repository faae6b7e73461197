"""metrics.py in-process: the queue's shape kept from spool moves and corrected by a
rescan, events counted into the families, the endpoint's answers, the `[metrics]`
config; and the operators' kit in examples/ (alert rules checked and unit-tested by
promtool, every dashboard expression naming a family the relay serves)."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from smarthost.config import ConfigError, load_config, parse_config
from smarthost.metrics import STATES, QueueShape, requirement_errors
from smarthost.spool import ACTIVE, FAILED, HOLD, QUEUE, Spool, new_id

from support import ROOT

prometheus_client = pytest.importorskip("prometheus_client")

EXAMPLES = ROOT / "examples"
BACKEND = {"backend": [{"host": "127.0.0.1", "name": "sink"}]}


# -- the queue's shape ------------------------------------------------------------------


def ids(count: int, age: float = 0.0) -> list[str]:
    """`count` queue IDs that arrived `age` seconds ago (their time is in the ID)."""
    from smarthost.spool import _base32

    micros = int((time.time() - age) * 1e6)
    return [_base32(micros + n, 11) + new_id()[11:] for n in range(count)]


def test_moves_keep_counts_and_the_oldest_arrival_per_state():
    shape = QueueShape()
    old, new = ids(1, age=600.0)[0], ids(1)[0]
    for queue_id in (old, new):
        shape.moved(queue_id, None, QUEUE)
    shape.moved(old, None, QUEUE)  # the pipe's hint after the commit: not twice
    assert shape.counts()["queued"] == 2
    assert 599 < shape.oldest_ages()["queued"] < 660
    shape.moved(old, QUEUE, ACTIVE)
    assert shape.counts() == {**dict.fromkeys(STATES, 0), "queued": 1, "active": 1}
    assert shape.oldest_ages()["queued"] < 60  # the old one left
    shape.moved(old, ACTIVE, QUEUE)  # back after an attempt
    assert shape.counts()["deferred"] == 1
    shape.moved(old, QUEUE, ACTIVE)
    shape.moved(old, ACTIVE, FAILED)
    shape.moved(new, QUEUE, HOLD)
    assert shape.counts() == {**dict.fromkeys(STATES, 0), "failed": 1, "held": 1}
    shape.moved(new, HOLD, None)
    assert shape.counts()["held"] == 0 and shape.oldest_ages()["held"] == 0.0


def spool_with(tmp_path: Path, layout: dict[str, list[str]], due: float = 0.0) -> Spool:
    spool = Spool(str(tmp_path / "spool"))
    spool.create()
    for state, queue_ids in layout.items():
        for queue_id in queue_ids:
            path = spool.path(state, queue_id)
            Path(path).write_bytes(b"{}")
            if due:
                os.utime(path, (due, due))
    return spool


def test_a_rescan_counts_what_no_event_told_and_forgets_what_left(tmp_path):
    queued, held, failed = ids(3, age=60.0), ids(2), ids(1)
    spool = spool_with(tmp_path, {QUEUE: queued, HOLD: held, FAILED: failed})
    later = ids(2)
    for queue_id in later:  # deferred: due in an hour
        Path(spool.path(QUEUE, queue_id)).write_bytes(b"{}")
        os.utime(spool.path(QUEUE, queue_id), (time.time() + 3600,) * 2)
    shape = QueueShape()
    gone = ids(1)[0]
    shape.moved(gone, None, QUEUE)  # deleted by a queue command since
    shape.rescan(spool)
    assert shape.counts() == {"queued": 3, "deferred": 2, "active": 0, "held": 2, "failed": 1}
    assert shape.oldest_ages()["queued"] >= 59


def test_a_rescan_never_undoes_a_move_made_while_it_listed(tmp_path):
    (queue_id,) = ids(1)
    spool = spool_with(tmp_path, {QUEUE: [queue_id]})
    shape = QueueShape()
    shape.moved(queue_id, None, QUEUE)
    listing = spool.each_name

    def racing(state: str):
        names = list(listing(state))
        if state == QUEUE:  # listed in queue/, then claimed before the rescan ends
            shape.moved(queue_id, QUEUE, ACTIVE)
        return iter(names)

    spool.each_name = racing  # type: ignore[method-assign]
    shape.rescan(spool)
    assert shape.counts()["active"] == 1 and shape.counts()["queued"] == 0


def test_the_shape_of_100k_messages_costs_no_time_to_read():
    shape = QueueShape()
    for queue_id in ids(100_000, age=3600.0):
        shape.moved(queue_id, None, QUEUE)
    started = time.perf_counter()
    for _ in range(10):
        shape.counts(), shape.oldest_ages()
    assert (time.perf_counter() - started) / 10 < 0.005


# -- events into families -------------------------------------------------------------


def families_registry(node: str | None = None):
    from prometheus_client import CollectorRegistry

    from smarthost.metrics import Families

    families = Families(node)
    registry = CollectorRegistry()
    for name, metric in vars(families).items():
        if hasattr(metric, "collect") and name != "node":
            registry.register(metric)
    return families, registry


def test_events_are_counted_with_the_labels_they_carry():
    from smarthost import log

    families, registry = families_registry()
    log.observe(families.observe)
    try:
        log.event("received", queue_id="Q", source="smtp", commit_seconds=0.002)
        log.event("rejected", reply="554 5.7.1 <x@y>: Relay access denied")
        log.event("rejected", source="sendmail", reply="550 5.1.3 bad")  # a drop file
        log.event("delivered", backend="primary", recipients=["a@x", "b@x"], delay=0.5)
        log.event("deferred", backend=None, tried=["primary", "backup"], recipients=["c@x"])
        log.event("failed", backend="primary", recipient="d@x")
        log.event("dsn_queued", action="failed", status="4.4.7")
        log.event("dsn_queued", action="delayed", status="4.4.1")
        log.event("double_bounce", queue_id="Q")
        log.event("backend_down", backend="primary", group="default")
    finally:
        log.observe(None)
    get = registry.get_sample_value
    assert get("smarthost_messages_received_total", {"source": "smtp"}) == 1
    assert get("smarthost_commit_seconds_count") == 1
    assert get("smarthost_smtp_rejections_total", {"code": "554"}) == 1
    assert get("smarthost_smtp_rejections_total", {"code": "550"}) is None
    delivered = {"backend": "primary", "result": "delivered"}
    assert get("smarthost_deliveries_total", delivered) == 2  # recipients, not events
    assert get("smarthost_deliveries_total", {"backend": "backup", "result": "deferred"}) == 1
    assert get("smarthost_deliveries_total", {"backend": "primary", "result": "failed"}) == 1
    assert get("smarthost_delivery_seconds_count", {"backend": "primary"}) == 1
    assert get("smarthost_dsn_total", {"action": "expired"}) == 1
    assert get("smarthost_dsn_total", {"action": "delayed"}) == 1
    assert get("smarthost_double_bounces_total") == 1
    assert get("smarthost_backend_up", {"backend": "primary", "group": "default"}) == 0


def test_events_are_counted_whatever_the_log_level(events):
    from smarthost import log

    families, registry = families_registry()
    log.logger.setLevel("ERROR")
    log.observe(families.observe)
    try:
        log.event("delivered", backend="primary", recipients=["a@x"], delay=0.1)
    finally:
        log.observe(None)
    assert not events.events("delivered")  # not logged...
    labels = {"backend": "primary", "result": "delivered"}
    assert registry.get_sample_value("smarthost_deliveries_total", labels) == 1  # counted


def test_a_node_name_labels_every_family():
    families, registry = families_registry(node="web1")
    families.observe("double_bounce", {})
    assert registry.get_sample_value("smarthost_double_bounces_total", {"node": "web1"}) == 1


def test_a_bug_in_counting_never_reaches_the_caller(events):
    families, _ = families_registry()
    families.observe("backend_down", {})  # no backend: a KeyError inside
    assert "metrics" in events.events("internal_error")[0]["error"]


# -- the endpoint's answers -----------------------------------------------------------


class FakeRelay:
    def __init__(self, spool: Spool) -> None:
        self.spool = spool
        self.alive: str | None = None
        self.ready: str | None = None

    def sessions(self) -> int:
        return 2

    def not_alive(self) -> str | None:
        return self.alive

    def not_ready(self) -> str | None:
        return self.ready


def test_health_and_readiness_answers(tmp_path, monkeypatch):
    from smarthost.metrics import MetricsServer

    monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", str(tmp_path))
    config = parse_config({**BACKEND, "metrics": {"listen": "127.0.0.1:0"}})
    relay = FakeRelay(spool_with(tmp_path, {}))
    server = MetricsServer(config, relay)  # type: ignore[arg-type]
    try:
        assert server.answer("/healthz", None)[::2] == (200, b"ok\n")
        relay.alive = relay.ready = "the delivery process is not running"
        assert server.answer("/healthz", None)[::2] == (503, relay.alive.encode() + b"\n")
        assert server.answer("/readyz", None)[0] == 503
        status, content_type, body = server.answer("/metrics", None)
        assert status == 200 and content_type.startswith("text/plain")
        assert b"smarthost_smtp_sessions 2.0" in body and b"smarthost_ready 0.0" in body
        assert server.answer("/nope", None)[0] == 404
    finally:
        server.stop()


# -- configuration --------------------------------------------------------------------


def test_metrics_listen_is_parsed_and_off_by_default():
    assert parse_config(BACKEND).metrics.listen is None
    assert parse_config({**BACKEND, "metrics": {"listen": ""}}).metrics.listen is None
    config = parse_config({**BACKEND, "metrics": {"listen": "[::1]:9325"}})
    assert config.metrics.listen == ("::1", 9325)


@pytest.mark.parametrize(
    "table, error",
    [
        ({"listen": "127.0.0.1"}, "metrics.listen: invalid address '127.0.0.1': a port"),
        ({"listen": 9325}, "metrics.listen:"),
        ({"port": 9325}, "metrics.port: unknown key"),
    ],
)
def test_metrics_config_errors_name_the_key(table, error):
    with pytest.raises(ConfigError) as caught:
        parse_config({**BACKEND, "metrics": table})
    assert any(e.startswith(error) for e in caught.value.errors), caught.value.errors


def test_without_prometheus_client_the_error_names_the_extra(monkeypatch, tmp_path):
    import importlib.util

    config = parse_config({**BACKEND, "metrics": {"listen": "127.0.0.1:9325"}})
    assert requirement_errors(config) == []
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda name, *a: None if name == "prometheus_client" else real(name, *a),
    )
    (error,) = requirement_errors(config)
    assert error.startswith("metrics.listen:") and "smarthost[metrics]" in error
    assert requirement_errors(parse_config(BACKEND)) == []  # off: no requirement


def test_the_example_config_documents_metrics():
    text = (EXAMPLES / "smarthost.toml").read_text()
    assert "[metrics]" in text
    assert load_config(EXAMPLES / "smarthost.toml").metrics.listen is None  # off as shipped


# -- the operators' kit ---------------------------------------------------------------


def promtool() -> str:
    found = shutil.which("promtool")
    if found is None:
        pytest.skip("promtool is not installed (Debian package prometheus)")
    return found


def test_the_alert_rules_pass_promtool_check_and_their_unit_tests():
    rules = EXAMPLES / "prometheus"
    for args in (
        ["check", "rules", "smarthost-rules.yml"],
        ["test", "rules", "smarthost-rules.test.yml"],
    ):
        result = subprocess.run(
            [promtool(), *args], cwd=rules, capture_output=True, text=True, check=False
        )
        assert result.returncode == 0, result.stdout + result.stderr
        assert "SUCCESS" in result.stdout


def served_names() -> set[str]:
    """Every series name the relay serves (counters with _total, histograms with
    _bucket/_sum/_count), from the families themselves and the scrape-time gauges."""
    families, registry = families_registry()
    families.start_at_zero(parse_config(BACKEND), receiving=False)  # labelled series
    families.start_at_zero(parse_config(BACKEND), receiving=True)
    names = {s.name for metric in registry.collect() for s in metric.samples}
    names |= {f.name + suffix for f in registry.collect() for suffix in ("", "_total")}
    return names | {"smarthost_smtp_sessions", "smarthost_spool_free_bytes", "smarthost_ready"}


def test_every_dashboard_and_rule_expression_names_a_family_that_exists():
    served = served_names()
    dashboard = json.loads((EXAMPLES / "grafana" / "smarthost-dashboard.json").read_text())
    exprs = [t["expr"] for p in dashboard["panels"] for t in p["targets"]]
    exprs += re.findall(
        r"expr: (.+)", (EXAMPLES / "prometheus" / "smarthost-rules.yml").read_text()
    )
    assert len(exprs) > 10
    used = set()
    for expr in exprs:
        names = set(re.findall(r"\bsmarthost_[a-z_]+", expr))
        assert names or "up{" in expr, expr
        assert names <= served, (expr, names - served)
        used |= names
    panels = " ".join(p["title"].lower() for p in dashboard["panels"])
    for wanted in ("queue depth", "oldest", "deliveries by backend", "latency", "backend health"):
        assert wanted in panels
    families = {n.removesuffix("_total").removesuffix("_bucket") for n in used}
    assert "smarthost_queue_oldest_age_seconds" in families
    assert "smarthost_delivery_seconds" in families
