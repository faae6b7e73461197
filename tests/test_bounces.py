"""Bounces end to end (SPEC §4 RFC 3461 parameters, §7 DSNs): real smtplib clients → the
relay in-process → a real aiosmtpd upstream, and the DSNs it gets read back by a real
bounce processor (flufl.bounce). The report builder itself is unit-tested in test_dsn.py."""

from __future__ import annotations

import email
import logging
import re
import time
import tracemalloc
from collections.abc import Callable
from email.message import Message
from email.utils import parsedate_to_datetime
from pathlib import Path
from typing import Any

import pytest
from aiosmtpd.controller import Controller
from aiosmtpd.smtp import SMTP, syntax
from flufl.bounce import all_failures, scan_message

from smarthost.bounce import Bouncer
from smarthost.config import Config, load_config
from smarthost.dsn import take_dsn_params
from smarthost.scheduler import Intervals
from smarthost.spool import MSG, Envelope, Recipient, Spool, new_id

from support.configs import write_config
from support.sink import Received, Sink, SinkHandler
from support.smtp import send_one
from support.waiting import wait_until

SENDER = "s@client.test"
BODY_MARK = b"the body of the original, which a headers-only report leaves out"
BODY = (
    b"From: Sender <s@client.test>\r\nTo: people@dest.test\r\nSubject: bounce me\r\n"
    b"Message-ID: <orig-1@client.test>\r\nDate: Wed, 25 Nov 2026 10:00:00 +0000\r\n\r\n"
    + BODY_MARK
    + b"\r\n"
)
QUEUED = re.compile(rb"^2\.0\.0 Ok: queued as ([0-9A-Z]{16})$")


# -- helpers ---------------------------------------------------------------------------


def relay_config(
    tmp_path: Path,
    port: int,
    *,
    delivery: dict[str, str] | None = None,
    dsn: dict[str, str] | None = None,
) -> Config:
    """write_config's relay, with [delivery] keys set or replaced and a [dsn] table."""
    extra = "".join(f'{k} = "{v}"\n' for k, v in (dsn or {}).items())
    path = write_config(tmp_path, port, f"[dsn]\n{extra}" if extra else "")
    text = path.read_text()
    for key, value in (delivery or {}).items():
        line = re.compile(rf"^{key} = .*$", re.M)
        if line.search(text):
            text = line.sub(f'{key} = "{value}"', text, count=1)
        else:
            text = text.replace("[delivery]\n", f'[delivery]\n{key} = "{value}"\n', 1)
    path.write_text(text)
    return load_config(path)


def send(
    relay,
    sender: str,
    recipients: list[str],
    content: bytes = BODY,
    *,
    mail_options: tuple[str, ...] = (),
    rcpt_options: dict[str, tuple[str, ...]] | None = None,
) -> str:
    """One message with RFC 3461 parameters; the queue ID from the 250 reply."""
    return send_one(
        relay.port,
        sender,
        recipients,
        content,
        mail_options=mail_options,
        rcpt_options=rcpt_options,
    )


def bounces(sink: Sink) -> list[Received]:
    """Everything that reached the upstream from the null sender."""
    return [m for m in list(sink.messages) if m.mail_from == ""]


def dsn_arrival(sink: Sink, events, dsn_id: str) -> Received:
    """The DSN `dsn_id` as the upstream got it, once the relay logged its delivery."""
    wait_until(lambda: events.events("delivered", queue_id=dsn_id), what=f"DSN {dsn_id} delivered")
    marker = f"<{dsn_id}@relay.test>".encode()
    (found,) = wait_until(
        lambda: [m for m in bounces(sink) if marker in m.content], what=f"DSN {dsn_id} at the sink"
    )
    return found


def queued_dsn(events, queue_id: str, action: str | None = None) -> dict:
    """The one dsn_queued event for `queue_id` (waiting for it)."""
    match = {"queue_id": queue_id} if action is None else {"queue_id": queue_id, "action": action}
    (queued,) = wait_until(lambda: events.events("dsn_queued", **match), what="dsn_queued")
    return queued


def gone(relay, queue_id: str) -> None:
    """Wait for `queue_id` to leave the spool: envelope (the commit point) and content."""
    spool = relay.relay.spool
    wait_until(
        lambda: spool.locate(queue_id) is None and not Path(spool.message_path(queue_id)).exists(),
        what=f"{queue_id} to leave the spool",
    )


def spooled_envelope(relay, queue_id: str) -> Envelope | None:
    """The envelope wherever it is now (None if it moved while we looked: poll again)."""
    spool = relay.relay.spool
    state = spool.locate(queue_id)
    try:
        return spool.read_envelope(state, queue_id) if state else None
    except FileNotFoundError:
        return None


def value(block: Message, name: str) -> str | None:
    """A report field, unfolded."""
    raw = block[name]
    return None if raw is None else " ".join(str(raw).split())


class Report:
    """A received DSN taken apart: the top level, the delivery-status blocks, the original."""

    def __init__(self, content: bytes) -> None:
        self.msg = email.message_from_bytes(content)
        assert self.msg.get_content_type() == "multipart/report"
        assert self.msg.get_param("report-type") == "delivery-status"
        text, status, returned = self.msg.get_payload()
        assert text.get_content_type() == "text/plain"
        assert status.get_content_type() == "message/delivery-status"
        self.per_message, *self.recipients = status.get_payload()
        self.returned = returned

    def field(self, name: str) -> list[str | None]:
        return [value(block, name) for block in self.recipients]

    def failures(self) -> tuple[set[bytes], set[bytes]]:
        return all_failures(self.msg)


def scan_counter(events) -> Callable[[], int]:
    """Count the scheduler's rescans of queue/ (FAST_RESCANS apart)."""
    return lambda: len(events.events("queue_scanned"))


def holds_over_rescans(scans: Callable[[], int], check: Callable[[], None], rescans=3) -> None:
    """Assert `check` at every poll until the scheduler has rescanned queue/ `rescans` times.

    A bounded wait for something NOT to happen: each rescan is a moment the scheduler
    could pick anything up again, so a few of them (at 0.2 s each) are the evidence."""
    target = scans() + rescans
    deadline = time.monotonic() + 10
    while scans() < target:
        check()
        assert time.monotonic() < deadline, "the scheduler stopped rescanning"
        time.sleep(0.02)
    check()


FAST_RESCANS = Intervals(rescan=0.2)


# -- 1. the listener -------------------------------------------------------------------


def test_ehlo_dsn_and_parameters_kept_xtext_decoded_case_preserved(relay, sink, events):
    sink.handler.mail_reply = "451 4.3.0 not now"  # keep the message spooled to look at it
    with relay.client() as client:
        client.ehlo("client.test")
        assert client.has_extn("dsn")
        code, msg = client.mail(SENDER, ["RET=hdrs", "ENVID=QQ+2B314159"])
        assert (code, msg) == (250, b"2.1.0 Ok")
        code, msg = client.rcpt(
            "b@dest.test", ["NOTIFY=success,failure", "ORCPT=rfc822;Bob+2BTag@Dest.Test"]
        )
        assert (code, msg) == (250, b"2.1.5 Ok")
        code, msg = client.rcpt("c@dest.test", ["NOTIFY=never"])
        assert code == 250, msg
        assert client.rcpt("d@dest.test")[0] == 250
        code, msg = client.data(BODY)
        assert code == 250, msg
    queue_id = QUEUED.match(msg).group(1).decode()
    wait_until(lambda: events.events("deferred", queue_id=queue_id), what="a deferral")
    env = wait_until(lambda: spooled_envelope(relay, queue_id), what="the envelope")
    assert env.ret == "HDRS"
    assert env.envid == "QQ+314159"  # "+2B" is "+"
    notify = {r.address: r.notify for r in env.recipients}
    orcpt = {r.address: r.orcpt for r in env.recipients}
    assert notify == {"b@dest.test": "SUCCESS,FAILURE", "c@dest.test": "NEVER", "d@dest.test": None}
    assert orcpt == {
        "b@dest.test": "rfc822;Bob+Tag@Dest.Test",
        "c@dest.test": None,
        "d@dest.test": None,
    }


@pytest.mark.parametrize(
    "command, params",
    [
        ("MAIL", ["RET=BOTH"]),
        ("MAIL", ["RET=FULL", "RET=HDRS"]),
        ("MAIL", ["ENVID=+ZZ"]),
        ("RCPT", ["NOTIFY=NEVER,SUCCESS"]),
        ("RCPT", ["NOTIFY=SOMETIMES"]),
        ("RCPT", ["ORCPT=b@dest.test"]),
    ],
)
def test_bad_dsn_parameters_get_501_and_the_session_goes_on(relay, sink, events, command, params):
    with relay.client() as client:
        client.ehlo("client.test")
        if command == "MAIL":
            code, msg = client.mail(SENDER, params)
            assert code == 501, (code, msg)
            assert msg.startswith(b"5.5.4 "), msg
            assert client.mail(SENDER)[0] == 250
        else:
            assert client.mail(SENDER)[0] == 250
        code, msg = client.rcpt("b@dest.test", params if command == "RCPT" else [])
        if command == "RCPT":
            assert code == 501, (code, msg)
            assert msg.startswith(b"5.5.4 "), msg
            assert client.rcpt("b@dest.test")[0] == 250
        else:
            assert code == 250, msg
        code, msg = client.data(BODY)
        assert code == 250, msg
    (received,) = sink.wait_for(1)
    assert received.mail_from == SENDER and received.rcpt_tos == ["b@dest.test"]
    assert [e["status"] for e in events.events("rejected")] == ["5.5.4"]


# -- 2. a failure reported end to end ---------------------------------------------------


def test_rejected_recipient_gets_a_dsn_a_bounce_processor_understands(relay, sink, events):
    sink.handler.rcpt_replies["gone@dest.test"] = "550 5.1.1 <gone@dest.test>: no such user"
    queue_id = send(relay, SENDER, ["ok@dest.test", "gone@dest.test"])
    queued = queued_dsn(events, queue_id)
    assert queued["action"] == "failed" and queued["recipients"] == ["gone@dest.test"]
    assert queued["sender"] == SENDER
    dsn_id = queued["dsn_queue_id"]
    assert dsn_id != queue_id
    arrived = dsn_arrival(sink, events, dsn_id)
    assert arrived.mail_from == ""  # the null sender
    assert arrived.rcpt_tos == [SENDER]
    report = Report(arrived.content)
    assert report.msg["Auto-Submitted"] == "auto-replied"
    assert report.msg["To"] == f"<{SENDER}>"
    assert report.msg["From"] == "Mail Delivery System <MAILER-DAEMON@relay.test>"
    assert report.msg["In-Reply-To"] == "<orig-1@client.test>"
    # A real bounce processor names the failed recipient, and only it.
    assert report.failures() == (set(), {b"gone@dest.test"})
    assert scan_message(report.msg) == {b"gone@dest.test"}
    assert value(report.per_message, "Reporting-MTA") == "dns; relay.test"
    assert report.field("Final-Recipient") == ["rfc822; gone@dest.test"]
    assert report.field("Action") == ["failed"]
    assert report.field("Status") == ["5.1.1"]
    assert report.field("Remote-MTA") == ["dns; 127.0.0.1"]
    assert report.field("Diagnostic-Code") == ["smtp; 550 5.1.1 <gone@dest.test>: no such user"]
    assert report.returned.get_content_type() == "message/rfc822"
    assert BODY in arrived.content  # the original comes back whole
    # The original went to the accepted recipient, and then left the spool.
    originals = [m for m in sink.messages if m.mail_from == SENDER]
    assert [m.rcpt_tos for m in originals] == [["ok@dest.test"]]
    gone(relay, queue_id)
    gone(relay, dsn_id)
    assert len(events.events("dsn_queued")) == 1


# -- 3. one DSN per message per event ---------------------------------------------------


def test_three_rejections_in_one_attempt_make_one_dsn(relay, sink, events):
    rcpts = ["x@dest.test", "y@dest.test", "z@dest.test"]
    for rcpt in rcpts:
        sink.handler.rcpt_replies[rcpt] = f"550 5.1.1 <{rcpt}>: no such user"
    queue_id = send(relay, SENDER, rcpts)
    gone(relay, queue_id)
    queued = queued_dsn(events, queue_id)
    assert queued["recipients"] == rcpts
    arrived = dsn_arrival(sink, events, queued["dsn_queue_id"])
    report = Report(arrived.content)
    assert report.field("Final-Recipient") == [f"rfc822; {r}" for r in rcpts]
    assert report.field("Action") == ["failed"] * 3
    assert report.failures() == (set(), {r.encode() for r in rcpts})
    assert len(events.events("failed", queue_id=queue_id)) == 3
    assert len(events.events("dsn_queued")) == 1
    assert len(bounces(sink)) == 1


# -- 4. expiry ---------------------------------------------------------------------------


def test_expiry_fails_with_4_4_7_and_the_last_reply(tmp_path, sink, relay_factory, events):
    config = relay_config(
        tmp_path, sink.port, delivery={"retry_for": "3s", "retry_min": "1s", "retry_max": "1s"}
    )
    relay = relay_factory(config)
    reply = "451 4.2.1 <slow@dest.test>: mailbox busy, try later"
    sink.handler.rcpt_replies["slow@dest.test"] = reply
    queue_id = send(relay, SENDER, ["slow@dest.test"])
    (expired,) = wait_until(
        lambda: events.events("expired", queue_id=queue_id), timeout=15, what="expiry"
    )
    assert expired["status"] == "4.4.7" and expired["recipients"] == ["slow@dest.test"]
    assert expired["reply"] == reply
    assert expired["attempt"] >= 2
    queued = queued_dsn(events, queue_id)
    assert queued["action"] == "failed"
    report = Report(dsn_arrival(sink, events, queued["dsn_queue_id"]).content)
    assert report.field("Action") == ["failed"]
    assert report.field("Status") == ["4.4.7"]
    assert report.field("Diagnostic-Code") == [f"smtp; {reply}"]
    assert report.field("Will-Retry-Until") == [None]
    assert report.failures() == (set(), {b"slow@dest.test"})
    gone(relay, queue_id)
    assert not [m for m in sink.messages if m.mail_from == SENDER]


# -- 5. the delayed DSN -----------------------------------------------------------------


def warning_relay(tmp_path: Path, sink: Sink, relay_factory):
    """A relay that warns of a delay after 1 s (retrying every second for an hour), and
    an upstream that defers slow@dest.test."""
    config = relay_config(
        tmp_path,
        sink.port,
        delivery={"warn_after": "1s", "retry_for": "1h", "retry_min": "1s", "retry_max": "1s"},
    )
    sink.handler.rcpt_replies["slow@dest.test"] = "451 4.2.1 mailbox busy, try later"
    return relay_factory(config)


def test_delayed_dsn_goes_out_exactly_once(tmp_path, sink, relay_factory, events):
    relay = warning_relay(tmp_path, sink, relay_factory)
    queue_id = send(relay, SENDER, ["slow@dest.test"])
    (received,) = events.events("received", queue_id=queue_id)
    wait_until(
        lambda: len(events.events("deferred", queue_id=queue_id)) >= 3,
        timeout=15,
        what="three deferrals",
    )
    queued = queued_dsn(events, queue_id, "delayed")
    arrived = dsn_arrival(sink, events, queued["dsn_queue_id"])
    report = Report(arrived.content)
    assert report.field("Action") == ["delayed"]
    assert report.field("Status") == ["4.2.1"]
    (until,) = report.field("Will-Retry-Until")
    assert until is not None
    # The deadline is arrival + retry_for (1h).
    deadline = parsedate_to_datetime(until).timestamp()
    assert abs(deadline - (received["created"] + 3600)) < 5, until
    assert report.failures() == ({b"slow@dest.test"}, set())  # temporary, not permanent
    # Let it through: delivered, and still only the one delayed DSN.
    del sink.handler.rcpt_replies["slow@dest.test"]
    wait_until(lambda: events.events("delivered", queue_id=queue_id), what="delivery")
    gone(relay, queue_id)
    assert len(events.events("deferred", queue_id=queue_id)) >= 3
    assert len(events.events("dsn_queued", queue_id=queue_id)) == 1
    assert len(bounces(sink)) == 1


# -- 6. NOTIFY is honoured --------------------------------------------------------------


@pytest.mark.parametrize("notify", ["NEVER", "SUCCESS", "DELAY", "success,delay"])
def test_no_failure_dsn_unless_notify_asks(relay, sink, events, notify):
    sink.handler.rcpt_replies["gone@dest.test"] = "550 5.1.1 no such user"
    queue_id = send(
        relay, SENDER, ["gone@dest.test"], rcpt_options={"gone@dest.test": (f"NOTIFY={notify}",)}
    )
    wait_until(lambda: events.events("failed", queue_id=queue_id), what="the failure")
    # Reports are queued before the message leaves the spool (scheduler.settle): once
    # it is gone, a DSN would already have been logged.
    gone(relay, queue_id)
    assert events.events("dsn_queued") == []
    assert bounces(sink) == []
    assert relay.relay.spool.locate(queue_id) is None


def test_notify_is_per_recipient(relay, sink, events):
    for rcpt in ("never@dest.test", "plain@dest.test", "asked@dest.test"):
        sink.handler.rcpt_replies[rcpt] = f"550 5.1.1 <{rcpt}>: no such user"
    queue_id = send(
        relay,
        SENDER,
        ["never@dest.test", "plain@dest.test", "asked@dest.test"],
        rcpt_options={
            "never@dest.test": ("NOTIFY=NEVER",),
            "asked@dest.test": ("NOTIFY=FAILURE,DELAY",),
        },
    )
    queued = queued_dsn(events, queue_id)
    assert queued["recipients"] == ["plain@dest.test", "asked@dest.test"]
    report = Report(dsn_arrival(sink, events, queued["dsn_queue_id"]).content)
    assert report.field("Final-Recipient") == ["rfc822; plain@dest.test", "rfc822; asked@dest.test"]
    gone(relay, queue_id)


def test_notify_failure_gets_no_delayed_dsn(tmp_path, sink, relay_factory, events):
    relay = warning_relay(tmp_path, sink, relay_factory)
    queue_id = send(
        relay, SENDER, ["slow@dest.test"], rcpt_options={"slow@dest.test": ("NOTIFY=FAILURE",)}
    )
    # A deferral logged at least warn_after after arrival: the warning was considered
    # (it is decided before the deferral is logged) and, without DELAY, not sent.
    wait_until(
        lambda: [e for e in events.events("deferred", queue_id=queue_id) if e["delay"] >= 1.0],
        timeout=15,
        what="a deferral past warn_after",
    )
    assert events.events("dsn_queued") == []
    assert bounces(sink) == []
    # FAILURE is still honoured: the same recipient failing gets its report.
    sink.handler.rcpt_replies["slow@dest.test"] = "550 5.1.1 no such user"
    queued = queued_dsn(events, queue_id)
    assert queued["action"] == "failed"
    report = Report(dsn_arrival(sink, events, queued["dsn_queue_id"]).content)
    assert report.field("Action") == ["failed"]
    gone(relay, queue_id)
    assert len(events.events("dsn_queued")) == 1


# -- 7. the null sender is never bounced -------------------------------------------------


def test_null_sender_failure_is_a_double_bounce_kept_in_failed(config, relay_factory, sink, events):
    relay = relay_factory(config, FAST_RESCANS)
    sink.handler.rcpt_replies["gone@dest.test"] = "550 5.1.1 no such user"
    queue_id = send(relay, "", ["gone@dest.test"])
    (double,) = wait_until(
        lambda: events.events("double_bounce", queue_id=queue_id), what="the double bounce"
    )
    assert double["levelno"] == logging.ERROR
    assert double["recipients"] == ["gone@dest.test"]
    assert double["reply"] == "550 5.1.1 no such user"
    spool = relay.relay.spool
    wait_until(lambda: spool.locate(queue_id) == "failed", what="kept in failed/")
    env = spool.read_envelope("failed", queue_id)
    assert env.sender == "" and env.recipients[0].state == "failed"
    assert events.events("dsn_queued") == []
    # Never deleted, and never tried again: it stays through several rescans.
    scans = scan_counter(events)

    def still_kept() -> None:
        assert spool.locate(queue_id) == "failed"
        assert Path(spool.path(MSG, queue_id)).exists()
        assert events.events("dsn_queued") == []

    holds_over_rescans(scans, still_kept)
    assert sink.messages == []
    assert len(events.events("failed", queue_id=queue_id)) == 1


# -- 8. double bounces and the postmaster -----------------------------------------------

POSTMASTER = "pm@admin.test"


def test_failed_dsn_is_kept_and_copied_to_the_postmaster(tmp_path, sink, relay_factory, events):
    relay = relay_factory(relay_config(tmp_path, sink.port, dsn={"postmaster": POSTMASTER}))
    sink.handler.rcpt_replies["gone@dest.test"] = "550 5.1.1 no such user"
    sink.handler.rcpt_replies[SENDER] = "550 5.1.1 no such sender"
    queue_id = send(relay, SENDER, ["gone@dest.test"])
    dsn_id = queued_dsn(events, queue_id)["dsn_queue_id"]
    gone(relay, queue_id)
    (double,) = wait_until(
        lambda: events.events("double_bounce", queue_id=dsn_id), what="the double bounce"
    )
    assert double["levelno"] == logging.ERROR
    assert double["recipients"] == [SENDER]
    spool = relay.relay.spool
    wait_until(lambda: spool.locate(dsn_id) == "failed", what="the DSN kept in failed/")
    copy = queued_dsn(events, dsn_id)
    assert copy["sender"] == POSTMASTER
    arrived = dsn_arrival(sink, events, copy["dsn_queue_id"])
    assert arrived.mail_from == "" and arrived.rcpt_tos == [POSTMASTER]
    report = Report(arrived.content)
    assert report.msg["To"] == f"<{POSTMASTER}>"
    assert report.field("Final-Recipient") == [f"rfc822; {SENDER}"]
    assert report.field("Diagnostic-Code") == ["smtp; 550 5.1.1 no such sender"]
    gone(relay, copy["dsn_queue_id"])
    assert spool.locate(dsn_id) == "failed"
    assert len(events.events("dsn_queued")) == 2
    assert len(bounces(sink)) == 1


def test_failed_postmaster_copy_is_kept_and_not_copied_again(tmp_path, sink, relay_factory, events):
    config = relay_config(tmp_path, sink.port, dsn={"postmaster": POSTMASTER})
    relay = relay_factory(config, FAST_RESCANS)
    sink.handler.rcpt_replies["gone@dest.test"] = "550 5.1.1 no such user"
    sink.handler.rcpt_replies[SENDER] = "550 5.1.1 no such sender"
    sink.handler.rcpt_replies[POSTMASTER] = "550 5.1.1 no such postmaster"
    queue_id = send(relay, SENDER, ["gone@dest.test"])
    dsn_id = queued_dsn(events, queue_id)["dsn_queue_id"]
    copy_id = queued_dsn(events, dsn_id)["dsn_queue_id"]
    (double,) = wait_until(
        lambda: events.events("double_bounce", queue_id=copy_id), what="the copy's double bounce"
    )
    assert double["levelno"] == logging.ERROR and double["recipients"] == [POSTMASTER]
    spool = relay.relay.spool
    wait_until(lambda: spool.locate(copy_id) == "failed", what="the copy kept in failed/")
    assert spool.locate(dsn_id) == "failed"
    gone(relay, queue_id)
    # No loop: the DSN and one postmaster copy, and nothing more however long we look.
    scans = scan_counter(events)

    def no_more_copies() -> None:
        assert len(events.events("dsn_queued")) == 2
        assert len(events.events("double_bounce")) == 2

    holds_over_rescans(scans, no_more_copies)
    assert {spool.locate(dsn_id), spool.locate(copy_id)} == {"failed"}
    assert sink.messages == []


# -- 9. pass-through to an upstream that speaks DSN --------------------------------------


class DsnSinkHandler(SinkHandler):
    """The sink's handler, advertising DSN in its EHLO reply."""

    async def handle_EHLO(self, server, session, envelope, hostname, responses):
        session.host_name = hostname
        return [*responses[:-1], "250-DSN", responses[-1]]


class DsnSMTP(SMTP):
    """aiosmtpd's SMTP taking the RFC 3461 parameters off MAIL and RCPT, recording them."""

    def __init__(self, handler: Any, *, seen: list, **kwargs: Any) -> None:
        super().__init__(handler, **kwargs)
        self.seen = seen

    async def _strip(self, command: str, arg: str | None, parse: Any) -> None:
        try:
            rest, params = take_dsn_params(command, arg)
        except ValueError as exc:
            self.seen.append((command, arg, exc))
            await self.push(f"501 5.5.4 {exc}")
            return
        self.seen.append((command, arg, params))
        await parse(rest)

    @syntax("MAIL FROM: <address>", extended=" [SP <mail-parameters>]")
    async def smtp_MAIL(self, arg: str | None) -> None:
        await self._strip("MAIL", arg, super().smtp_MAIL)

    @syntax("RCPT TO: <address>", extended=" [SP <mail-parameters>]")
    async def smtp_RCPT(self, arg: str | None) -> None:
        await self._strip("RCPT", arg, super().smtp_RCPT)


class DsnUpstream(Controller):
    def __init__(self) -> None:
        self.handler = DsnSinkHandler()
        super().__init__(self.handler, hostname="127.0.0.1", port=0)
        self.seen: list[tuple[str, str | None, Any]] = []

    def factory(self) -> SMTP:
        return DsnSMTP(self.handler, seen=self.seen, **self.SMTP_kwargs)

    def _trigger_server(self) -> None:
        if self.port == 0 and self.server is not None:
            self.port = self.server.sockets[0].getsockname()[1]
        super()._trigger_server()


@pytest.fixture
def dsn_upstream():
    upstream = DsnUpstream()
    upstream.start()
    yield upstream
    upstream.stop()


def test_dsn_parameters_pass_through_to_an_upstream_that_speaks_dsn(
    tmp_path, dsn_upstream, relay_factory, events
):
    relay = relay_factory(relay_config(tmp_path, dsn_upstream.port))
    queue_id = send(
        relay,
        SENDER,
        ["b@dest.test", "c@dest.test"],
        mail_options=("RET=HDRS", "ENVID=QQ+2B314159"),
        rcpt_options={"b@dest.test": ("NOTIFY=SUCCESS", "ORCPT=rfc822;Bob+2BTag@Dest.Test")},
    )
    wait_until(lambda: events.events("delivered", queue_id=queue_id), what="delivery")
    gone(relay, queue_id)
    (received,) = dsn_upstream.handler.messages
    assert received.mail_from == SENDER and received.rcpt_tos == ["b@dest.test", "c@dest.test"]
    seen = list(dsn_upstream.seen)
    mails = [(arg, params) for command, arg, params in seen if command == "MAIL"]
    rcpts = [(arg, params) for command, arg, params in seen if command == "RCPT"]
    # The ENVID goes out xtext-encoded again, and decodes to what the client gave.
    ((mail_arg, mail_params),) = mails
    assert mail_params == {"RET": "HDRS", "ENVID": "QQ+314159"}, mail_arg
    assert "ENVID=QQ+2B314159" in mail_arg.split()
    (b_arg, b_params), (c_arg, c_params) = rcpts
    assert b_params == {"NOTIFY": "SUCCESS", "ORCPT": "rfc822;Bob+Tag@Dest.Test"}, b_arg
    assert "ORCPT=rfc822;Bob+2BTag@Dest.Test" in b_arg.split()
    assert c_params == {}, c_arg
    # NOTIFY=SUCCESS, and the next hop speaks DSN: it reports, not us.
    assert events.events("dsn_queued") == []
    assert [m for m in dsn_upstream.handler.messages if m.mail_from == ""] == []


def test_upstream_that_speaks_dsn_refusing_a_recipient_still_gets_our_dsn(
    tmp_path, dsn_upstream, relay_factory, events
):
    """Pass-through hands reporting over only for what the next hop accepted."""
    relay = relay_factory(relay_config(tmp_path, dsn_upstream.port))
    dsn_upstream.handler.rcpt_replies["gone@dest.test"] = "550 5.1.1 no such user"
    queue_id = send(
        relay,
        SENDER,
        ["gone@dest.test"],
        rcpt_options={"gone@dest.test": ("NOTIFY=SUCCESS,FAILURE",)},
    )
    queued = queued_dsn(events, queue_id)
    assert queued["action"] == "failed" and queued["recipients"] == ["gone@dest.test"]
    wait_until(lambda: events.events("delivered", queue_id=queued["dsn_queue_id"]), what="DSN")
    (arrived,) = dsn_upstream.handler.messages
    assert arrived.mail_from == "" and arrived.rcpt_tos == [SENDER]
    assert Report(arrived.content).failures() == (set(), {b"gone@dest.test"})
    # The DSN itself carries no RFC 3461 parameters (nothing asked for them).
    dsn_mails = [
        params
        for command, arg, params in dsn_upstream.seen
        if command == "MAIL" and arg.startswith("FROM:<>")
    ]
    assert dsn_mails == [{}]
    gone(relay, queue_id)


def test_relayed_dsn_when_the_upstream_lacks_dsn(relay, sink, events):
    queue_id = send(
        relay,
        SENDER,
        ["b@dest.test"],
        mail_options=("ENVID=QQ+2B314159",),
        rcpt_options={
            "b@dest.test": ("NOTIFY=SUCCESS,FAILURE", "ORCPT=rfc822;Bob+2BTag@Dest.Test")
        },
    )
    queued = queued_dsn(events, queue_id)
    assert queued["action"] == "relayed" and queued["recipients"] == ["b@dest.test"]
    wait_until(lambda: events.events("delivered", queue_id=queue_id), what="delivery")
    arrived = dsn_arrival(sink, events, queued["dsn_queue_id"])
    assert arrived.rcpt_tos == [SENDER]
    report = Report(arrived.content)
    assert report.field("Action") == ["relayed"]
    assert report.field("Status") == ["2.0.0"]
    assert report.field("Final-Recipient") == ["rfc822; b@dest.test"]
    assert report.field("Original-Recipient") == ["rfc822;Bob+Tag@Dest.Test"]
    assert value(report.per_message, "Original-Envelope-Id") == "QQ+314159"
    assert report.failures() == (set(), set())
    # Nothing of RFC 3461 went to an upstream that did not ask for it.
    (original,) = [m for m in sink.messages if m.mail_from == SENDER]
    assert original.rcpt_tos == ["b@dest.test"]
    assert not [o for o in original.mail_options if o.startswith(("RET=", "ENVID="))]
    gone(relay, queue_id)
    assert len(events.events("dsn_queued")) == 1


# -- 10. what comes back of the original ------------------------------------------------

BIG = BODY + b"".join(b"%075d\r\n" % i for i in range(4096 // 77 + 1))


@pytest.mark.parametrize(
    "ret, content, return_max, headers_only",
    [
        ("RET=HDRS", BODY, None, True),
        (None, BIG, "1K", True),
        ("RET=FULL", BIG, "1K", True),  # too large: headers only even with RET=FULL
        ("RET=FULL", BODY, "1K", False),
        (None, BIG, None, False),
    ],
)
def test_returned_original_headers_only_for_ret_hdrs_or_size(
    tmp_path, sink, relay_factory, events, ret, content, return_max, headers_only
):
    assert len(BIG) >= 4096
    dsn = {"return_max": return_max} if return_max else None
    relay = relay_factory(relay_config(tmp_path, sink.port, dsn=dsn))
    sink.handler.rcpt_replies["gone@dest.test"] = "550 5.1.1 no such user"
    mail_options = (ret,) if ret else ()
    queue_id = send(relay, SENDER, ["gone@dest.test"], content, mail_options=mail_options)
    queued = queued_dsn(events, queue_id)
    arrived = dsn_arrival(sink, events, queued["dsn_queue_id"])
    report = Report(arrived.content)
    returned = report.returned
    if headers_only:
        assert returned.get_content_type() == "text/rfc822-headers"
        text = returned.get_payload(decode=True)
        assert b"Subject: bounce me" in text and b"Message-ID: <orig-1@client.test>" in text
        assert BODY_MARK not in arrived.content
    else:
        assert returned.get_content_type() == "message/rfc822"
        assert content in arrived.content
    assert report.failures() == (set(), {b"gone@dest.test"})
    gone(relay, queue_id)


# -- bugs ------------------------------------------------------------------------------


def first_outcome(events, queue_id: str) -> str:
    """ "delivered" or "deferred": how the first attempt at `queue_id` ended."""
    return wait_until(
        lambda: next(
            (
                name
                for name in ("delivered", "deferred", "failed")
                if events.events(name, queue_id=queue_id)
            ),
            None,
        ),
        what=f"the first attempt at {queue_id}",
    )


def test_dsn_to_an_smtputf8_sender_is_relayed_with_smtputf8(relay, sink, events):
    sender = "expéditeur@client.test"
    sink.handler.rcpt_replies["gone@dest.test"] = "550 5.1.1 no such user"
    with relay.client() as client:
        client.ehlo("client.test")
        assert client.mail(sender, ["SMTPUTF8"])[0] == 250
        assert client.rcpt("gone@dest.test")[0] == 250
        code, msg = client.data(BODY)
        assert code == 250, msg
    dsn_id = queued_dsn(events, QUEUED.match(msg).group(1).decode())["dsn_queue_id"]
    outcome = first_outcome(events, dsn_id)
    downs = events.events("backend_down")
    assert not downs, [d["reply"] for d in downs]
    assert outcome == "delivered", events.events("deferred", queue_id=dsn_id)
    arrived = dsn_arrival(sink, events, dsn_id)
    assert arrived.rcpt_tos == [sender]
    assert "SMTPUTF8" in arrived.mail_options


def test_orcpt_addr_type_must_be_an_atom(relay, sink):
    with relay.client() as client:
        client.ehlo("client.test")
        assert client.mail(SENDER)[0] == 250
        client.send("RCPT TO:<b@dest.test> ORCPT=rfc822é;b@dest.test\r\n".encode())
        code, msg = client.getreply()
        assert code == 501, (code, msg)
        assert msg.startswith(b"5.5.4 "), msg


def test_an_orcpt_never_takes_a_backend_down(tmp_path, dsn_upstream, relay_factory, events):
    relay = relay_factory(relay_config(tmp_path, dsn_upstream.port))
    with relay.client() as client:
        client.ehlo("client.test")
        assert client.mail(SENDER)[0] == 250
        client.send("RCPT TO:<b@dest.test> ORCPT=rfc822é;b@dest.test\r\n".encode())
        code, _ = client.getreply()
        if code != 250:
            return  # refused at the door (the fix above): nothing can go wrong later
        assert client.rcpt("c@dest.test")[0] == 250
        code, msg = client.data(BODY)
        assert code == 250, msg
    queue_id = QUEUED.match(msg).group(1).decode()
    outcome = first_outcome(events, queue_id)
    downs = events.events("backend_down")
    assert not downs, [d["reply"] for d in downs]
    assert outcome == "delivered", events.events("deferred", queue_id=queue_id)


def test_dsn_returning_an_8bit_original_declares_8bitmime(relay, sink, events):
    sink.handler.rcpt_replies["gone@dest.test"] = "550 5.1.1 no such user"
    content = BODY + "Grüße aus Köln\r\n".encode()
    queue_id = send(relay, SENDER, ["gone@dest.test"], content, mail_options=("BODY=8BITMIME",))
    arrived = dsn_arrival(sink, events, queued_dsn(events, queue_id)["dsn_queue_id"])
    assert content in arrived.content  # returned whole, 8-bit bytes and all
    assert b"Content-Transfer-Encoding: 8bit" in arrived.content
    assert "BODY=8BITMIME" in arrived.mail_options, arrived.mail_options


def test_a_dsn_for_a_large_message_reads_only_its_header_section(tmp_path):
    """A failed message above return_max gets its headers back, and the DSN is built
    from a read of its header section alone: never the whole original in memory."""
    config = relay_config(tmp_path, 9, dsn={"return_max": "1M"})  # nothing is sent
    spool = Spool(config.spool.dir)
    spool.create()
    head = BODY[: BODY.index(b"\r\n\r\n") + 4]
    content = head + BODY_MARK + b"\r\n" + (b"x" * 998 + b"\r\n") * 8000  # 8 MB
    failed = Recipient(
        "gone@dest.test", state="failed", reply="550 5.1.1 no such user", status="5.1.1"
    )
    env = Envelope(new_id(), SENDER, [failed], time.time(), size=len(content))
    spool.commit(env, [content])
    queued: list[Envelope] = []
    tracemalloc.start()
    try:
        dsn_id = Bouncer(config, spool, queued.append).report(env, "failed", [failed])
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert [notice.id for notice in queued] == [dsn_id]
    report = Report(spool.read_message(dsn_id))
    assert report.returned.get_content_type() == "text/rfc822-headers"
    assert report.returned.get_payload(decode=True) == head[:-2]
    assert BODY_MARK not in spool.read_message(dsn_id)
    assert report.failures() == (set(), {b"gone@dest.test"})
    assert peak < len(content) // 8, f"peak {peak} bytes"
