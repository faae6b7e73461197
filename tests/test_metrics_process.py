"""`[metrics] listen` against the real relay process (SPEC §10): every family after real
traffic, parsed by prometheus_client's own parser and linted by promtool; counters
across a killed delivery process; the queue's gauges while the upstream is down and
after it returns; /healthz and /readyz, also while draining; and, metrics off, no
endpoint, no prometheus_client and no metrics thread in either process."""

from __future__ import annotations

import json
import os
import pwd
import shutil
import signal
import smtplib
import subprocess
import sys
import tempfile
import textwrap
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from support import ROOT
from support.cli import start_drain
from support.configs import write_config
from support.logs import events_named
from support.messages import RCPT, SENDER
from support.redis_server import REDIS_SERVER, RedisServer
from support.relay import RelayProcess, delivery_pid
from support.sink import Sink, slow_data
from support.smtp import send_message
from support.waiting import wait_until

prometheus_client = pytest.importorskip("prometheus_client")
from prometheus_client.parser import text_string_to_metric_families  # noqa: E402

METRICS = '[metrics]\nlisten = "127.0.0.1:0"\n'
DEADLINE = 20.0
OPENMETRICS = "application/openmetrics-text; version=1.0.0; charset=utf-8"

# SPEC §10: family -> (type, label names). Histograms and counters are named as the
# parser names families (without _total, _bucket...).
FAMILIES = {
    "smarthost_messages_received": ("counter", {"source"}),
    "smarthost_smtp_rejections": ("counter", {"code"}),
    "smarthost_deliveries": ("counter", {"backend", "result"}),
    "smarthost_dsn": ("counter", {"action"}),
    "smarthost_double_bounces": ("counter", set()),
    "smarthost_queue_messages": ("gauge", {"state"}),
    "smarthost_queue_oldest_age_seconds": ("gauge", {"state"}),
    "smarthost_backend_up": ("gauge", {"backend", "group"}),
    "smarthost_delivery_seconds": ("histogram", {"backend"}),
    "smarthost_commit_seconds": ("histogram", set()),
    "smarthost_smtp_sessions": ("gauge", set()),
    "smarthost_spool_free_bytes": ("gauge", set()),
    "smarthost_ready": ("gauge", set()),  # beyond SPEC §10: /readyz for alert rules
}
STATES = {"queued", "deferred", "active", "held", "failed"}


# -- helpers ------------------------------------------------------------------------------


def start_with_metrics(relay_process, config: Path) -> tuple[RelayProcess, str]:
    """The relay and its endpoint's base URL (from the `started` event)."""
    proc = relay_process(config)
    started = proc.wait_started(proc.spawn(), DEADLINE)
    assert started["metrics"], started
    return proc, f"http://{started['metrics']}"


def get(url: str, accept: str | None = None) -> tuple[int, str, str]:
    """(status, content type, body) of a GET; a 503 is an answer, not an error."""
    request = urllib.request.Request(url, headers={"Accept": accept} if accept else {})
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, response.headers["Content-Type"], response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.headers["Content-Type"], exc.read().decode()


def scrape(base: str) -> dict[str, dict]:
    """Family name -> {type, samples: {(name, sorted labels): value}}."""
    status, _, text = get(base + "/metrics")
    assert status == 200
    out = {}
    for family in text_string_to_metric_families(text):
        samples = {(s.name, tuple(sorted(s.labels.items()))): s.value for s in family.samples}
        out[family.name] = {"type": family.type, "samples": samples}
    return out


def value(families: dict[str, dict], sample: str, **labels: str) -> float | None:
    for family in families.values():
        found = family["samples"].get((sample, tuple(sorted(labels.items()))))
        if found is not None:
            return found
    return None


def sample_value(base: str, sample: str, **labels: str) -> float | None:
    return value(scrape(base), sample, **labels)


def sendmail(config: Path, recipient: str) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "smarthost", "-c", str(config), "sendmail", recipient],
        input=b"Subject: local\n\nfrom a cron job\n",
        cwd=ROOT,
        capture_output=True,
        timeout=30,
        check=False,
    )
    assert result.returncode == 0, result.stderr


# -- every family -------------------------------------------------------------------------


def test_every_family_after_real_traffic_with_its_type_and_labels(tmp_path, sink, relay_process):
    config = write_config(tmp_path, sink.port, METRICS)
    sink.handler.rcpt_replies["gone@example.org"] = "550 5.1.1 no such user"
    proc, base = start_with_metrics(relay_process, config)
    send_message(proc.port, "<ok@client.test>")  # delivered
    with smtplib.SMTP("127.0.0.1", proc.port, timeout=10) as client:
        client.ehlo("client.test")
        assert client.mail(SENDER)[0] == 250
        assert client.rcpt("<>")[0] == 501  # rejected
        client.rset()
        client.sendmail(SENDER, ["gone@example.org"], b"Subject: x\r\n\r\nfails\r\n")  # DSN
        client.sendmail("", ["gone@example.org"], b"Subject: y\r\n\r\ndouble\r\n")  # double
    sendmail(config, RCPT)
    wait_until(
        lambda: sample_value(base, "smarthost_double_bounces_total") == 1.0,
        DEADLINE,
        "the double bounce to be counted",
    )
    families = wait_until(
        lambda: (
            (f := scrape(base))
            and value(f, "smarthost_messages_received_total", source="sendmail") == 1.0
            and value(f, "smarthost_deliveries_total", backend="sink", result="delivered")
            == 3.0  # the message, the DSN, the local one
            and f
        ),
        DEADLINE,
        "every delivery to be counted",
    )
    for name, (kind, labels) in FAMILIES.items():
        assert name in families, f"{name} missing"
        assert families[name]["type"] == kind, name
        for sample_name, sample_labels in families[name]["samples"]:
            assert {k for k, _ in sample_labels} - {"le"} == labels, (sample_name, labels)
    assert value(families, "smarthost_messages_received_total", source="smtp") == 3.0
    assert value(families, "smarthost_smtp_rejections_total", code="501") == 1.0
    assert value(families, "smarthost_deliveries_total", backend="sink", result="failed") == 2.0
    assert value(families, "smarthost_dsn_total", action="failed") == 1.0
    assert value(families, "smarthost_backend_up", backend="sink", group="default") == 1.0
    assert value(families, "smarthost_delivery_seconds_count", backend="sink") == 3.0
    assert value(families, "smarthost_commit_seconds_count") == 3.0
    wait_until(
        lambda: sample_value(base, "smarthost_queue_messages", state="failed") == 1.0,
        DEADLINE,
        "the double bounce kept in failed/ to show in the gauges",
    )
    assert value(families, "smarthost_spool_free_bytes") > 0
    assert value(families, "smarthost_ready") == 1
    with smtplib.SMTP("127.0.0.1", proc.port, timeout=10):
        wait_until(
            lambda: sample_value(base, "smarthost_smtp_sessions") == 1.0,
            DEADLINE,
            "the open session to be counted",
        )
    assert proc.stop() == 0


def test_openmetrics_when_asked_and_promtool_finds_nothing_to_lint(tmp_path, sink, relay_process):
    proc, base = start_with_metrics(relay_process, write_config(tmp_path, sink.port, METRICS))
    send_message(proc.port, "<ok@client.test>")
    sink.wait_for(1)
    status, content_type, text = get(base + "/metrics", OPENMETRICS)
    assert status == 200
    assert content_type.startswith("application/openmetrics-text")
    assert text.endswith("# EOF\n")
    status, content_type, text = get(base + "/metrics")
    assert content_type.startswith("text/plain; version=0.0.4")
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool is not installed (Debian package prometheus): no lint")
    lint = subprocess.run(
        [promtool, "check", "metrics"], input=text, capture_output=True, text=True, check=False
    )
    assert lint.returncode == 0 and not lint.stdout.strip(), lint.stdout + lint.stderr
    assert proc.stop() == 0


def test_an_unknown_path_is_404(tmp_path, sink, relay_process):
    proc, base = start_with_metrics(relay_process, write_config(tmp_path, sink.port, METRICS))
    status, _, text = get(base + "/")
    assert status == 404 and "/metrics" in text
    assert proc.stop() == 0


# -- across a killed delivery process -----------------------------------------------------


def test_counters_keep_growing_across_a_killed_delivery_process(tmp_path, sink, relay_process):
    proc, base = start_with_metrics(relay_process, write_config(tmp_path, sink.port, METRICS))
    delivered = {"backend": "sink", "result": "delivered"}
    for n in range(3):
        send_message(proc.port, f"<before.{n}@client.test>")
    wait_until(
        lambda: sample_value(base, "smarthost_deliveries_total", **delivered) == 3.0,
        DEADLINE,
        "three deliveries to be counted",
    )
    assert get(base + "/healthz")[0] == 200
    first = delivery_pid(proc)
    os.kill(first, signal.SIGKILL)
    seen = [sample_value(base, "smarthost_deliveries_total", **delivered)]
    wait_until(
        lambda: [
            r
            for r in events_named(proc.records(), "internal_error")
            if f"delivery process {first} exited" in r["error"]
        ],
        DEADLINE,
        "the relay to replace its delivery process",
    )
    send_message(proc.port, "<after@client.test>")

    def counted_after() -> bool:
        seen.append(sample_value(base, "smarthost_deliveries_total", **delivered))
        return seen[-1] == 4.0

    wait_until(counted_after, DEADLINE, "the new process's delivery to be added")
    assert seen == sorted(seen) and seen[0] == 3.0, seen  # never went down
    assert sample_value(base, "smarthost_messages_received_total", source="smtp") == 4.0
    wait_until(lambda: get(base + "/healthz")[0] == 200, DEADLINE, "/healthz to be 200 again")
    assert get(base + "/readyz")[0] == 200
    assert proc.stop() == 0


# -- the queue's shape --------------------------------------------------------------------


def test_queue_gauges_while_the_upstream_is_down_and_after_it_returns(
    tmp_path, sink, relay_process
):
    port = sink.port
    proc, base = start_with_metrics(relay_process, write_config(tmp_path, port, METRICS))
    sink.stop()
    for n in range(3):
        send_message(proc.port, f"<waiting.{n}@client.test>")

    def waiting() -> dict | None:
        families = scrape(base)
        deferred = value(families, "smarthost_queue_messages", state="deferred")
        return families if deferred == 3.0 else None

    families = wait_until(waiting, DEADLINE, "three deferred messages in the gauges")
    assert value(families, "smarthost_queue_oldest_age_seconds", state="deferred") > 0
    assert value(families, "smarthost_queue_messages", state="queued") == 0
    assert value(families, "smarthost_backend_up", backend="sink", group="default") == 0
    # The first attempt fails on the sink and marks it down; the others find no backend.
    deferrals = families["smarthost_deliveries"]["samples"]
    assert deferrals[("smarthost_deliveries_total", (("backend", "sink"), ("result", "deferred")))]
    assert sum(v for (_, labels), v in deferrals.items() if ("result", "deferred") in labels) >= 3
    back = Sink(port).start()
    try:
        back.wait_for(3, DEADLINE)

        def empty() -> dict | None:
            families = scrape(base)
            counts = [value(families, "smarthost_queue_messages", state=s) for s in STATES]
            return families if counts == [0.0] * len(STATES) else None

        families = wait_until(empty, DEADLINE, "the gauges to show an empty queue")
        assert value(families, "smarthost_queue_oldest_age_seconds", state="deferred") == 0
        assert value(families, "smarthost_backend_up", backend="sink", group="default") == 1
        assert proc.stop() == 0
    finally:
        back.stop()


def test_queue_gauges_count_what_was_spooled_before_the_start(tmp_path, sink, relay_process):
    """A held message (queue command) and mail left by an earlier run: the rescan at
    start counts them, with no event about them."""
    config = write_config(tmp_path, sink.port, METRICS)
    proc, base = start_with_metrics(relay_process, config)
    sink.handler.data_reply = "451 4.3.0 try again later"
    queue_id = send_message(proc.port, "<held@client.test>")
    wait_until(lambda: events_named(proc.records(), "deferred"), DEADLINE, "the deferral")
    assert proc.stop() == 0
    held = subprocess.run(
        [sys.executable, "-m", "smarthost", "-c", str(config), "queue", "hold", queue_id],
        cwd=ROOT,
        capture_output=True,
        timeout=30,
        check=False,
    )
    assert held.returncode == 0, held.stderr
    proc, base = start_with_metrics(relay_process, config)
    families = wait_until(
        lambda: (
            (f := scrape(base)) and value(f, "smarthost_queue_messages", state="held") == 1.0 and f
        ),
        DEADLINE,
        "the held message in the gauges",
    )
    assert value(families, "smarthost_queue_oldest_age_seconds", state="held") > 0
    assert proc.stop() == 0


# -- health and readiness -----------------------------------------------------------------


def test_readyz_is_503_while_draining_then_the_relay_exits_0(tmp_path, sink, relay_process):
    config = write_config(tmp_path, sink.port, METRICS)
    slow_data(sink, 3.0)
    proc, base = start_with_metrics(relay_process, config)
    assert get(base + "/readyz")[:3:2] == (200, "ok\n")
    for n in range(2):
        send_message(proc.port, f"<drain.{n}@client.test>")
    drain = start_drain(config)
    status = wait_until(
        lambda: (answer := get(base + "/readyz"))[0] == 503 and answer,
        DEADLINE,
        "/readyz to say 503 while draining",
    )
    assert status[2] == "draining\n"
    assert sample_value(base, "smarthost_ready") == 0
    assert get(base + "/healthz")[0] == 200  # alive all the same
    out, err = drain.communicate(timeout=60)
    assert drain.returncode == 0, err
    assert "drained" in out
    assert proc.proc is not None and proc.proc.wait(10) == 0
    assert len(sink.messages) == 2


@pytest.mark.skipif(os.geteuid() != 0, reason="a root start needs root")
def test_a_root_start_serves_metrics_as_the_service_user(sink, relay_process):
    """Root binds the endpoint, then both processes run as `nobody` (with a umask that
    keeps every file private): each writes and the relay reads every value file."""
    account = pwd.getpwnam("nobody")
    base = Path(tempfile.mkdtemp(prefix="smarthost-root-", dir="/var/tmp"))
    try:
        base.chmod(0o755)
        config = write_config(base, sink.port, METRICS)
        config.write_text(f'user = "{account.pw_name}"\n' + config.read_text())
        old_umask = os.umask(0o077)
        try:
            proc, base_url = start_with_metrics(relay_process, config)
        finally:
            os.umask(old_umask)
        send_message(proc.port, "<root@client.test>")
        wait_until(
            lambda: (
                sample_value(
                    base_url, "smarthost_deliveries_total", backend="sink", result="delivered"
                )
                == 1.0
            ),
            DEADLINE,
            "the delivery to be counted",
        )
        assert sample_value(base_url, "smarthost_messages_received_total", source="smtp") == 1
        directory = base / "spool" / ".metrics"
        assert os.stat(directory).st_uid == account.pw_uid
        assert {os.stat(p).st_uid for p in directory.iterdir()} == {account.pw_uid}
        assert proc.stop() == 0
    finally:
        shutil.rmtree(base, ignore_errors=True)


# -- metrics off, and without prometheus_client ------------------------------------------

# Imported by every Python process started with this directory on PYTHONPATH (the relay
# and its delivery process): on SIGUSR2 it writes what that process has imported and
# which threads it runs; with SMARTHOST_TEST_BLOCK it makes a module uninstallable.
SITECUSTOMIZE = textwrap.dedent(
    """
    import json, os, signal, sys, threading

    for name in filter(None, os.environ.get("SMARTHOST_TEST_BLOCK", "").split(",")):
        sys.modules[name] = None

    def _report(signum, frame):
        path = os.path.join(os.environ["SMARTHOST_TEST_REPORTS"], str(os.getpid()))
        with open(path + ".tmp", "w") as f:
            json.dump(
                {
                    "prometheus_client": "prometheus_client" in sys.modules,
                    "smarthost.metrics": "smarthost.metrics" in sys.modules,
                    "threads": sorted(t.name for t in threading.enumerate()),
                },
                f,
            )
        os.rename(path + ".tmp", path)

    if os.environ.get("SMARTHOST_TEST_REPORTS"):
        signal.signal(signal.SIGUSR2, _report)
    """
)


def probe_env(tmp_path: Path, **extra: str) -> dict[str, str]:
    site = tmp_path / "site"
    site.mkdir(exist_ok=True)
    (site / "sitecustomize.py").write_text(SITECUSTOMIZE)
    return {"PYTHONPATH": os.pathsep.join([str(site), str(ROOT)]), **extra}


@pytest.mark.parametrize("on", [False, True], ids=["off", "on"])
def test_metrics_off_imports_nothing_and_starts_no_thread(tmp_path, sink, relay_process, on):
    """Off: neither process imports prometheus_client (nor smarthost.metrics) or runs a
    metrics thread, and no port answers. On: the same probe sees them (it works)."""
    reports = tmp_path / "reports"
    reports.mkdir()
    config = write_config(tmp_path, sink.port, METRICS if on else "")
    proc = relay_process(config)
    proc.env = probe_env(tmp_path, SMARTHOST_TEST_REPORTS=str(reports))
    started = proc.wait_started(proc.spawn(), DEADLINE)
    assert bool(started.get("metrics")) is on
    send_message(proc.port, "<probe@client.test>")
    sink.wait_for(1)
    pids = [proc.proc.pid, started["delivery_pid"]]
    for pid in pids:
        os.kill(pid, signal.SIGUSR2)
    seen = {
        pid: json.loads(
            wait_until(
                lambda pid=pid: (reports / str(pid)).exists() and (reports / str(pid)).read_text(),
                DEADLINE,
                f"process {pid} to report",
            )
        )
        for pid in pids
    }
    parent, child = seen[pids[0]], seen[pids[1]]
    for report in (parent, child):
        assert report["prometheus_client"] is on, report
        assert report["smarthost.metrics"] is on, report
    assert ("metrics-http" in parent["threads"]) is on, parent
    assert ("metrics-queue" in child["threads"]) is on, child
    assert not [t for t in parent["threads"] + child["threads"] if "metrics" in t and not on]
    assert proc.stop() == 0


def test_metrics_without_prometheus_client_is_an_error_naming_the_extra(tmp_path, sink):
    config = write_config(tmp_path, sink.port, METRICS)
    env = {**os.environ, **probe_env(tmp_path, SMARTHOST_TEST_BLOCK="prometheus_client")}
    for command, code in (("check", 1), ("serve", 78)):
        result = subprocess.run(
            [sys.executable, "-m", "smarthost", "-c", str(config), command],
            cwd=ROOT,
            capture_output=True,
            text=True,
            env=env,
            timeout=30,
            check=False,
        )
        assert result.returncode == code, (command, result.stderr)
        assert "metrics.listen" in result.stderr and "smarthost[metrics]" in result.stderr


@pytest.mark.skipif(REDIS_SERVER is None, reason="redis-server is not installed")
def test_in_a_fleet_every_family_carries_the_node(tmp_path, sink, relay_process):
    """SPEC §10: in a fleet, every family (the delivery process's too) has `node`."""
    redis = RedisServer(tmp_path).start()
    try:
        fleet = f'[fleet]\nredis = "{redis.url}"\nnode = "relay-7"\n'
        config = write_config(tmp_path, sink.port, METRICS + fleet)
        proc, base = start_with_metrics(relay_process, config)
        send_message(proc.port, "<fleet@client.test>")
        families = wait_until(
            lambda: (
                (f := scrape(base))
                and value(f, "smarthost_deliveries_total", backend="sink", result="delivered",
                          node="relay-7") == 1.0
                and f
            ),
            DEADLINE,
            "the delivery to be counted under the node",
        )  # fmt: skip
        # Both processes' families, and those read at scrape time, are there ...
        for name in ("smarthost_queue_messages", "smarthost_backend_up", "smarthost_ready"):
            assert name in families, name
        for name in ("smarthost_smtp_sessions", "smarthost_spool_free_bytes"):
            assert name in families, name
        # ... and every sample of every family names the node.
        for name, family in families.items():
            for sample_name, sample_labels in family["samples"]:
                assert ("node", "relay-7") in sample_labels, (name, sample_name, sample_labels)
        assert proc.stop() == 0
    finally:
        redis.stop()
