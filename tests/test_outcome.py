"""outcome.py without threads: a real spool on disk, an attempt as the sender leaves
it, and what `Outcome.settle` makes of the message, its DSNs and the log."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from smarthost.bounce import Bouncer
from smarthost.config import Config, load_config
from smarthost.outcome import HISTORY_KEPT, Outcome
from smarthost.sender import Attempt
from smarthost.spool import (
    ACTIVE,
    DEFERRED,
    DELIVERED,
    FAILED,
    FAILED_RCPT,
    QUEUE,
    Envelope,
    Recipient,
    Spool,
    new_id,
)
from smarthost.upstream import Upstreams

from support.configs import write_config

CONTENT = b"From: a@client.test\r\nSubject: outcome\r\n\r\nbody\r\n"


class Settling:
    """A spool, an Outcome over it, and the DSNs it queues."""

    def __init__(self, tmp_path: Path, **delivery: str) -> None:
        path = write_config(tmp_path, 9)
        if delivery:
            text = "".join(f'{key} = "{value}"\n' for key, value in delivery.items())
            path.write_text(path.read_text().replace("[delivery]\n", "[delivery]\n" + text, 1))
        self.config: Config = load_config(path)
        self.spool = Spool(self.config.spool.dir)
        self.spool.create()
        self.upstreams = Upstreams(self.config)
        self.notices: list[Envelope] = []
        bouncer = Bouncer(self.config, self.spool, self.notices.append)
        self.outcome = Outcome(self.config, self.spool, self.upstreams, bouncer)

    def claimed(self, sender: str, *rcpts: str, arrival: float | None = None) -> Envelope:
        """A committed message, claimed for an attempt (in active/)."""
        recipients = [Recipient(address) for address in rcpts]
        env = Envelope(new_id(), sender, recipients, arrival or time.time(), len(CONTENT))
        self.spool.commit(env, [CONTENT])
        claimed = self.spool.claim_message(env.id)
        assert claimed is not None
        return claimed[0]


def tried(env: Envelope, **states: str) -> Attempt:
    """An attempt that left each named recipient (local part) in a state."""
    attempt = Attempt(backend="primary")
    for rcpt in env.recipients:
        state = states.get(rcpt.address.split("@")[0])
        if state is None:
            continue
        rcpt.state, rcpt.backend = state, "primary"
        rcpt.reply = {DELIVERED: "250 ok", DEFERRED: "451 4.3.0 later"}.get(state, "550 no")
        rcpt.status = {DELIVERED: "2.0.0", DEFERRED: "4.3.0"}.get(state, "5.1.1")
        {DELIVERED: attempt.delivered, DEFERRED: attempt.deferred}.get(
            state, attempt.failed
        ).append(rcpt)
    return attempt


def test_all_delivered_finishes_the_message_and_logs_it(tmp_path, events):
    s = Settling(tmp_path)
    env = s.claimed("a@client.test", "x@dest.test", "y@dest.test")
    assert s.outcome.settle(env, tried(env, x=DELIVERED, y=DELIVERED)) is None
    assert s.spool.locate(env.id) is None
    assert not Path(s.spool.message_path(env.id)).exists()
    (delivered,) = events.events("delivered", queue_id=env.id)
    assert delivered["recipients"] == ["x@dest.test", "y@dest.test"]
    assert delivered["attempt"] == 1 and delivered["backend"] == "primary"
    assert s.notices == []


def test_a_deferral_requeues_with_the_backoff_stamped_on_disk(tmp_path, events):
    s = Settling(tmp_path)
    env = s.claimed("a@client.test", "x@dest.test", "y@dest.test")
    now = time.time()
    requeued = s.outcome.settle(env, tried(env, x=DELIVERED, y=DEFERRED), now)
    assert requeued is not None and not requeued.group_came_back
    delivery = s.config.delivery
    low = now + delivery.retry_min * 0.5  # the backoff's jitter, either side
    assert low <= requeued.due <= now + delivery.retry_min * 1.5
    assert s.spool.locate(env.id) == QUEUE
    assert s.spool.due(QUEUE, env.id) == pytest.approx(requeued.due, abs=0.01)
    on_disk = s.spool.read_envelope(QUEUE, env.id)
    assert [r.state for r in on_disk.recipients] == [DELIVERED, DEFERRED]
    assert on_disk.attempts == 1 and on_disk.last_error == "451 4.3.0 later"
    assert on_disk.history[-1]["deferred"] == ["y@dest.test"]
    (deferred,) = events.events("deferred", queue_id=env.id)
    assert deferred["recipients"] == ["y@dest.test"]


def test_a_failure_is_reported_once_and_the_rest_goes_on(tmp_path):
    s = Settling(tmp_path)
    env = s.claimed("a@client.test", "x@dest.test", "y@dest.test")
    s.outcome.settle(env, tried(env, x=FAILED_RCPT, y=DEFERRED))
    (notice,) = s.notices
    assert notice.sender == "" and [r.address for r in notice.recipients] == ["a@client.test"]
    assert s.spool.locate(notice.id) == QUEUE  # committed before the original moved on
    again = s.spool.claim_message(env.id)
    assert again is not None
    env = again[0]
    assert [r.reported for r in env.recipients] == [True, False]
    s.outcome.settle(env, tried(env, y=DELIVERED))
    assert len(s.notices) == 1, "a failure already reported is not reported again"
    assert s.spool.locate(env.id) is None


def test_past_retry_for_the_rest_expires_with_4_4_7(tmp_path, events):
    s = Settling(tmp_path, retry_for="1h")
    env = s.claimed("a@client.test", "x@dest.test", arrival=time.time() - 7200)
    assert s.outcome.settle(env, tried(env, x=DEFERRED)) is None
    assert s.spool.locate(env.id) is None
    (expired,) = events.events("expired", queue_id=env.id)
    assert expired["status"] == "4.4.7"
    (notice,) = s.notices
    assert b"4.4.7" in s.spool.read_message(notice.id)


def test_a_failed_bounce_is_parked_in_failed_for_a_human(tmp_path, events):
    s = Settling(tmp_path)
    env = s.claimed("", "x@dest.test")
    assert s.outcome.settle(env, tried(env, x=FAILED_RCPT)) is None
    assert s.spool.locate(env.id) == FAILED
    assert events.events("double_bounce", queue_id=env.id)
    assert s.notices == []  # nobody to tell but the log (no postmaster configured)


def test_one_delayed_dsn_after_warn_after(tmp_path):
    s = Settling(tmp_path, warn_after="1h", retry_for="5d")
    env = s.claimed("a@client.test", "x@dest.test", arrival=time.time() - 7200)
    s.outcome.settle(env, tried(env, x=DEFERRED))
    assert len(s.notices) == 1 and b"Action: delayed" in s.spool.read_message(s.notices[0].id)
    again = s.spool.claim_message(env.id)
    assert again is not None and again[0].warned
    s.outcome.settle(again[0], tried(again[0], x=DEFERRED))
    assert len(s.notices) == 1, "the delayed DSN goes out once"


def test_a_rate_limit_hold_is_not_an_attempt(tmp_path):
    s = Settling(tmp_path)
    env = s.claimed("a@client.test", "x@dest.test")
    slot = time.time() + 3.0
    requeued = s.outcome.settle(env, Attempt(rate_wait=slot))
    assert requeued is not None and requeued.due == slot
    assert s.spool.read_envelope(QUEUE, env.id).attempts == 0


def test_mail_that_waited_for_a_group_is_due_now_once_it_answered(tmp_path):
    s = Settling(tmp_path)
    env = s.claimed("a@client.test", "x@dest.test")
    attempt = tried(env, x=DEFERRED)
    attempt.waiting_groups = {"default"}
    s.upstreams.last_success["default"] = attempt.started + 1  # a probe succeeded meanwhile
    now = time.time()
    requeued = s.outcome.settle(env, attempt, now)
    assert requeued is not None and requeued.group_came_back
    assert requeued.due == now and requeued.waiting_groups == {"default"}


def test_history_keeps_the_latest_attempts(tmp_path):
    s = Settling(tmp_path, retry_for="5d")
    env = s.claimed("a@client.test", "x@dest.test")
    for _ in range(HISTORY_KEPT + 3):
        s.outcome.settle(env, tried(env, x=DEFERRED))
        claimed = s.spool.claim_message(env.id)
        assert claimed is not None
        env = claimed[0]
    assert len(env.history) == HISTORY_KEPT and env.attempts == HISTORY_KEPT + 3
    assert s.spool.locate(env.id) == ACTIVE
