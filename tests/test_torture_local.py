"""Torture: hostile local input (issues #8 and #14). smarthost-sendmail arguments and -t
headers that try option, header or SMTP injection; hypothesis-generated drop files
thrown into a running relay's drop area (garbage is quarantined, a submission the relay
refuses is bounced to its submitter, 0 lost); files dropped while the relay starts
(picked up at once, never left for the 10 s rescan).

tests/test_pickup.py and tests/test_sendmail.py already cover the fixed drop-area
attacks (symlinks, FIFOs, oversized, deep JSON...) and a list of injection arguments;
this file fuzzes. The fuzzed sendmail calls go through `smarthost.sendmail.main`
in-process (a subprocess per example would blow the time budget); a handful also run as
the real command. A running in-process relay picks up every accepted submission, and
the upstream (the `sink`) shows what would have gone out.
"""

from __future__ import annotations

import contextlib
import email
import email.policy
import io
import json
import re
import secrets
import subprocess
import threading
import time
from datetime import datetime
from pathlib import Path

import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from smarthost import drop, headers, sendmail
from smarthost.config import load_config
from smarthost.spool import Spool

from support.cli import sendmail_entry
from support.configs import write_config
from support.fuzz import fuzz_settings
from support.local import drop_dir, place_in_drop
from support.logs import received_locally
from support.relay import start_amid
from support.sink import Sink
from support.waiting import wait_until

DROP_MAGIC = drop.MAGIC
DEADLINE = 60.0
EX_USAGE, EX_DATAERR = 64, 65
DSN_MARK = b"report-type=delivery-status"


def run_sendmail(cfg: Path, argv: list[str], stdin: bytes) -> tuple[int, str]:
    """smarthost-sendmail's main in-process: (exit code, stderr)."""
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        code = sendmail.main(["-C", str(cfg), *argv], stdin=io.BytesIO(stdin))
    return code, err.getvalue()


def run_sendmail_process(cfg: Path, argv: list[str], stdin: bytes) -> subprocess.CompletedProcess:
    """The real `smarthost-sendmail` (its console entry point)."""
    return sendmail_entry(cfg, *argv, stdin=stdin)


def squash(text: str) -> str:
    """Text without RFC 5322 comments, quoting (quotes, backslashes) and white space."""
    return re.sub(r'[\s"\\]', "", re.sub(r"\([^()]*\)", "", text))


def with_token(sink: Sink, token: str) -> list:
    return [m for m in list(sink.messages) if token.encode() in m.content]


def bounce_settled(sink: Sink, events, refused_id: str) -> tuple[str, list[str]]:
    """The DSN for a refused drop file settled: ("dsn", its recipients at the sink), or
    ("double bounce", ...) when the upstream refused the DSN too (kept in failed/)."""
    (queued,) = wait_until(
        lambda: events.events("dsn_queued", queue_id=refused_id), DEADLINE, "the DSN queued"
    )
    dsn_id = queued["dsn_queue_id"]
    mark = f"Message-ID: <{dsn_id}@relay.test>".encode()

    def settled():
        got = [m for m in list(sink.messages) if m.mail_from == "" and mark in m.content]
        if got:
            return "dsn", got[0].rcpt_tos
        if events.events("double_bounce", queue_id=dsn_id):
            return "double bounce", [queued["sender"]]
        return None

    return wait_until(settled, DEADLINE, f"the DSN {dsn_id} to be delivered")


@pytest.fixture
def local_relay(tmp_path: Path, sink: Sink, relay_factory):
    cfg = write_config(tmp_path, sink.port, smtp='max_message_size = "64K"')
    relay = relay_factory(load_config(cfg))
    return cfg, relay


# -- strategies --------------------------------------------------------------------------

FRAGMENTS = st.sampled_from(
    ["\r\n", "\n", "\r", "\0", "-", "--", "-oQ/tmp", "-X", "<>", "<", ">", '"', "'", " ",
     "\t", ",", ";", ":", "(c)", "\\", "RCPT TO:<spy@evil.test>", "Bcc: spy@evil.test",
     "NOTIFY=NEVER", "ORCPT=rfc822;spy@evil.test", "\u00e9", "\u202e", "@", "@@",
     "x" * 1000, "spy@evil.test", "evil.test", "%", "!", "\x1b[2J", "\x7f", "\x0b", "\x85",
     "\udcff", "\udcc3"]
)  # fmt: skip
# Text with every control character (ESC, DEL, VT...); FRAGMENTS adds the surrogate
# escapes a real argv holds for bytes that are not UTF-8.
TEXT = st.text(st.characters(blacklist_categories=("Cs",), max_codepoint=0x2FFF), max_size=12)


def hostile_text(text: str) -> bool:
    """A control character, or something that is not UTF-8 (a surrogate escape)."""
    return any(ord(c) < 32 or 127 <= ord(c) < 160 or 0xD800 <= ord(c) < 0xE000 for c in text)


def meant_values(argv: list[str]) -> list[str]:
    """The arguments sendmail's option syntax makes an address or the full name: the
    recipients, and the last -f/-r and -F values (-o/-B options are ignored)."""
    values, sender, name, args = [], None, None, list(argv)
    while args:
        arg = args.pop(0)
        if arg == "--":
            values += args
            break
        if not arg.startswith("-") or arg == "-":
            values.append(arg)
        elif arg[:2] in ("-f", "-r", "-F") and (len(arg) > 2 or args):
            value = arg[2:] or args.pop(0)
            sender, name = (sender, value) if arg[:2] == "-F" else (value, name)
    return [*values, *(v for v in (sender, name) if v is not None)]


def qualified(address: str) -> str:
    return address if "@" in address else f"{address}@relay.test"


@st.composite
def addresses(draw: st.DrawFn) -> str:
    """An address, mostly plausible, with hostile fragments spliced in."""
    base = draw(st.sampled_from(["x@dest.test", "y@dest.test", "local", "<z@dest.test>"]))
    for _ in range(draw(st.integers(0, 3))):
        at = draw(st.integers(0, len(base)))
        piece = draw(st.one_of(FRAGMENTS, TEXT))
        base = base[:at] + piece + base[at:]
    return base


@st.composite
def invocations(draw: st.DrawFn) -> tuple[list[str], bytes]:
    """(argv, the header lines of stdin) for smarthost-sendmail."""
    argv: list[str] = []
    full_name = draw(st.booleans())
    if draw(st.booleans()):
        sender = draw(addresses())
        argv += ["-f", sender] if draw(st.booleans()) else ["-f" + sender]
    if full_name:
        name = draw(st.one_of(TEXT, FRAGMENTS))
        argv += ["-F", name]
    header_lines: list[str] = []
    use_t = draw(st.booleans())
    if use_t:
        argv.append("-t")
        for name in draw(st.lists(st.sampled_from(["To", "Cc", "Bcc", "bcc", "BCC"]), max_size=3)):
            value = draw(addresses())
            fold = draw(st.sampled_from(["", "\n ", "\n\t", ",\n "]))
            header_lines.append(f"{name}: {value}{fold}{draw(addresses()) if fold else ''}")
    if draw(st.booleans()):
        argv.append("--")
    argv += draw(st.lists(addresses(), max_size=3))
    body_headers = "".join(f"{h}\n" for h in header_lines)
    return argv, body_headers.encode("utf-8", "surrogateescape")


# -- 1. sendmail arguments and -t headers ---------------------------------------------------


def test_fuzzed_sendmail_arguments_never_inject(request, local_relay, sink, events, torture_report):
    cfg, _ = local_relay
    counts = {"rounds": 0, "refused": 0}
    accepted: list[tuple[str, list[str], bytes]] = []  # (token, argv, stdin)

    @given(call=invocations())
    @example(call=(["x@dest.test\r\nRCPT TO:<spy@evil.test>"], b""))
    @example(call=(["-f", "a@b\nBcc: spy@evil.test", "x@dest.test"], b""))
    @example(call=(["-t"], b"To: x@dest.test\nBcc: spy@evil.test,\n other@evil.test\n"))
    @example(call=(["-t"], b"To: x@dest.test\r\nBcc: <spy@evil.test\r\n>\r\n"))
    @example(call=(["--", "-oQ/tmp"], b""))
    @example(call=(["-F", "Eve\r\nBcc: spy@evil.test", "x@dest.test"], b""))
    @example(call=(["x" * 5000 + "@dest.test"], b""))
    @example(call=(["x\0@dest.test"], b""))
    @example(call=(["x\x1b[2J@dest.test"], b""))
    @example(call=(["-f", "a\x7f@b.test", "x@dest.test"], b""))
    @example(call=(["x\udcff@dest.test"], b""))
    @example(call=(["-F", "Zo\u00e9", "-f", "zo\u00e9@client.test", "x@dest.test"], b""))
    @example(call=(["x@dest.test, spy@evil.test"], b""))
    @example(call=(["Eve <spy@evil.test>"], b""))
    @example(call=(["a<b@c@d>"], b""))
    @example(call=(["-t"], b"To: x\x11@dest.test\n"))
    def inner(call: tuple[list[str], bytes]) -> None:
        argv, header_block = call
        counts["rounds"] += 1
        token = f"tok{secrets.token_hex(8)}"
        # The token's Message-ID first: hostile header lines cannot hide it.
        stdin = f"Message-ID: <{token}@local.test>\nSubject: {token}\n".encode()
        stdin += header_block + f"\n{token}\n".encode()
        code, err = run_sendmail(cfg, argv, stdin)
        assert code in (0, EX_USAGE, EX_DATAERR), (code, err)
        assert "Traceback" not in err
        if any(hostile_text(value) for value in meant_values(argv)):
            # A control character or non-UTF-8 in an address or the full name: a usage
            # error, and nothing written to the drop area.
            assert code == EX_USAGE, (argv, code, err)
        if code == 0:
            accepted.append((token, argv, stdin))
        else:
            counts["refused"] += 1
            first = err.splitlines()[0] if err else ""
            assert first.startswith("smarthost-sendmail: "), err  # a clear error

    fuzz_settings(request, 25, 1000)(inner)()

    def outcome(token: str) -> str | None:
        """The outcome: delivered, bounced (failed upstream: a DSN, none for <>) or None."""
        if [m for m in with_token(sink, token) if DSN_MARK not in m.content]:
            return "delivered"
        for received in events.events("received", message_id=f"<{token}@local.test>"):
            if events.events("failed", queue_id=received["queue_id"]):
                return "bounced"
        return None

    def unsettled() -> list:
        return [(argv, stdin) for t, argv, stdin in accepted if not outcome(t)]

    deadline = time.monotonic() + DEADLINE
    while unsettled() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not unsettled(), unsettled()
    for token, argv, stdin in accepted:
        opts = sendmail.parse_args(argv)
        from_args = set(opts.recipients)
        header_text = squash(stdin.decode("utf-8", "replace"))
        # Spooled as given: an argument's address exactly, -f's sender likewise (but
        # qualified with the relay's hostname when it has no domain); with -t, the header
        # block's addresses as RFC 5322 reads them (unfolded, comments dropped), and
        # never anything conjured from elsewhere.
        # An address without a domain is spooled at the relay's hostname.
        (received,) = events.events("received", message_id=f"<{token}@local.test>")
        spooled = set(received["recipients"])
        given_args = {qualified(a) for a in from_args}
        for rcpt in spooled:
            in_header = {squash(rcpt), squash(rcpt).removesuffix("@relay.test")}
            from_header = opts.from_headers and any(a in header_text for a in in_header)
            assert rcpt in given_args or from_header, (rcpt, argv, stdin)
        if not opts.from_headers:
            assert spooled == given_args, (argv, spooled)
        if opts.sender is not None:
            want = "" if opts.sender == "<>" else qualified(opts.sender)
            assert received["sender"] == want, (argv, received["sender"])
        for got in with_token(sink, token):
            if DSN_MARK in got.content:
                continue  # a DSN quoting the original: not the original's envelope
            # Nothing smuggled into SMTP: no control character or non-UTF-8 in the
            # envelope, only what was spooled.
            envelope = [got.mail_from, *got.rcpt_tos]
            assert not [a for a in envelope if hostile_text(a)], (argv, envelope)
            assert set(got.rcpt_tos) <= spooled, (argv, got.rcpt_tos, spooled)
            assert got.mail_from == received["sender"], (argv, got.mail_from)
            # -t removes Bcc: no reader of the delivered message finds one in its header
            # section (as the relay reads it, and as Python's parser does). A "Bcc:" line
            # after a line that is not a header field is body text, as with sendmail -t.
            if opts.from_headers:
                fields = headers.fields(got.content)
                assert not [f for f in fields if f.name == "bcc"], (argv, got.content[:400])
                parsed = email.message_from_bytes(got.content, policy=email.policy.compat32)
                assert not parsed.get_all("Bcc"), (argv, stdin, got.content[:400])
    assert not events.events("internal_error")
    torture_report(
        "local: fuzzed sendmail arguments",
        rounds=counts["rounds"],
        acknowledged=len(accepted),
        delivered=sum(1 for t, _, _ in accepted if outcome(t) == "delivered"),
        bounced=sum(1 for t, _, _ in accepted if outcome(t) == "bounced"),
        lost=sum(1 for t, _, _ in accepted if outcome(t) is None),
        note=f"{counts['refused']} refused with exit 64/65",
    )


HOSTILE_ARGS = [
    (["x@dest.test\r\nRCPT TO:<spy@evil.test>"], "invalid address"),
    (["-f", "-oQ/tmp", "x@dest.test"], "invalid address"),
    (["-fa@b\nX-Evil: 1", "x@dest.test"], "invalid address"),
    (["-F", "Eve\r\nBcc: spy@evil.test", "x@dest.test"], "invalid full name"),
    (["--", "-oQ/tmp"], "invalid address"),
    (["x" * 5000 + "@dest.test"], "invalid address"),
]


def test_hostile_arguments_to_the_real_command_exit_64(tmp_path, torture_size):
    cfg = write_config(tmp_path, 1)
    for argv, says in HOSTILE_ARGS[: torture_size(3, len(HOSTILE_ARGS))]:
        done = run_sendmail_process(cfg, argv, b"Subject: x\n\nbody\n")
        err = done.stderr.decode()
        assert done.returncode == EX_USAGE, (argv, done)
        assert err.startswith("smarthost-sendmail: ") and says in err.splitlines()[0], err
        assert "Traceback" not in err
    drop = drop_dir(tmp_path)
    assert not drop.is_dir() or not [p for p in drop.iterdir()]


def test_a_recipient_is_relayed_as_given_or_refused(local_relay, sink):
    cfg, _ = local_relay
    cases = ["x@dest.test, spy@evil.test", "Eve <spy@evil.test>", "x@dest.test (note)"]
    for rcpt in [*cases, "a<b@c@d>"]:  # the last one once went out as RCPT TO:<>
        token = f"tok{secrets.token_hex(8)}"
        code, err = run_sendmail(cfg, [rcpt], f"Subject: {token}\n\nbody\n".encode())
        if code != 0:
            assert code == EX_USAGE and "invalid address" in err
            continue
        (got,) = wait_until(lambda t=token: with_token(sink, t), DEADLINE, "the message")
        assert got.rcpt_tos == [rcpt], (rcpt, got.rcpt_tos)


def test_control_characters_never_reach_the_upstream(local_relay, sink):
    cfg, _ = local_relay
    cases = [
        (["x\x1b[2J@dest.test"], ""),
        (["-t"], "To: x\x11@dest.test\n"),
        (["x\x7f@d.test"], ""),
    ]
    for argv, header_lines in cases:
        token = f"tok{secrets.token_hex(8)}"
        code, err = run_sendmail(cfg, argv, f"{header_lines}Subject: {token}\n\nhi\n".encode())
        if code == 0:
            (got,) = wait_until(lambda t=token: with_token(sink, t), DEADLINE, "the message")
            envelope = [got.mail_from, *got.rcpt_tos]
            assert not [a for a in envelope if any(ord(c) < 32 or ord(c) == 127 for c in a)]
        else:
            assert code == EX_USAGE and "invalid address" in err, (code, err)


def test_unicode_space_c1_controls_and_colons_in_addresses_exit_64(local_relay, sink):
    cfg, _ = local_relay
    cases = [
        ["-f", "a\u00a0b@client.test", "x@dest.test"],  # NO-BREAK SPACE
        ["x\u2028y@dest.test"],  # LINE SEPARATOR
        ["x\u3000y@dest.test"],  # IDEOGRAPHIC SPACE
        ["x\x85y@dest.test"],  # NEL, a C1 control and a line break to Python
        ["x\x9b2Jy@dest.test"],  # CSI, a C1 control (terminal escapes)
        ["@evil.test:x@dest.test"],  # RCPT TO:<@evil.test:x@dest.test>: a source route
        [":loca:l"],  # read by aiosmtpd as RCPT TO:<l>
    ]
    codes = [run_sendmail(cfg, argv, b"Subject: x\n\nhi\n")[0] for argv in cases]
    assert codes == [EX_USAGE] * len(cases), list(zip(cases, codes))


def test_full_name_with_a_non_ascii_sender_is_no_traceback(tmp_path):
    cfg = write_config(tmp_path, 1)
    done = run_sendmail_process(
        cfg, ["-F", "Zo\u00e9", "-f", "zo\u00e9@client.test", "x@dest.test"], b"Subject: x\n\nhi\n"
    )
    err = done.stderr.decode()
    assert "Traceback" not in err, err
    assert done.returncode in (0, EX_USAGE, EX_DATAERR), done


# -- 2. fuzzed drop files --------------------------------------------------------------------


def _json_containers(children: st.SearchStrategy) -> st.SearchStrategy:
    return st.one_of(st.lists(children, max_size=3), st.dictionaries(TEXT, children, max_size=3))


JSONISH = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(), st.floats(allow_nan=False), TEXT),
    _json_containers,
    max_leaves=6,
)
ADDRESS_VALUES = st.one_of(addresses(), JSONISH)


@st.composite
def drop_files(draw: st.DrawFn) -> bytes:
    kind = draw(st.sampled_from(["garbage", "magic", "record", "huge", "truncated"]))
    if kind == "garbage":
        return draw(st.binary(max_size=300))
    if kind == "magic":
        magic = bytearray(DROP_MAGIC)
        at = draw(st.integers(0, len(magic) - 1))
        magic[at] = draw(st.integers(0, 255).filter(lambda b, at=at: b != DROP_MAGIC[at]))
        record = json.dumps({"sender": "a@client.test", "recipients": ["x@dest.test"]})
        return bytes(magic) + record.encode() + b"\nSubject: magic\r\n\r\nx\r\n"
    record: object
    if kind == "huge":
        n = draw(st.sampled_from([1_000, 100_000]))
        record = {"sender": "a@client.test", "recipients": [f"r{i}@dest.test" for i in range(n)]}
        if draw(st.booleans()):
            record["padding"] = "p" * (2 << 20)  # over the size limit
    else:
        record = draw(
            st.one_of(
                st.fixed_dictionaries(
                    {"sender": ADDRESS_VALUES, "recipients": st.lists(ADDRESS_VALUES, max_size=4)}
                ),
                st.fixed_dictionaries(
                    {"sender": ADDRESS_VALUES, "recipients": ADDRESS_VALUES, "time": JSONISH}
                ),
                JSONISH,
            )
        )
    raw = json.dumps(record).encode()
    if kind == "truncated":
        raw = raw[: draw(st.integers(0, len(raw)))]
        return DROP_MAGIC + raw
    return DROP_MAGIC + raw + b"\n" + draw(st.sampled_from([b"", b"Subject: s\r\n\r\nx\r\n"]))


def test_fuzzed_drop_files_are_quarantined_and_valid_drops_flow(
    request, local_relay, sink, events, tmp_path, torture_report
):
    cfg, _ = local_relay
    drop = drop_dir(tmp_path)
    counts = {"rounds": 0, "quarantined": 0, "bounced": 0, "taken": 0}
    valid: list[str] = []

    @given(data=drop_files())
    @example(data=b"")
    @example(data=DROP_MAGIC)
    @example(data=DROP_MAGIC + b'{"sender": "a@b", "recipients": ["x@dest.test\\r\\nRCPT"]}\n')
    @example(data=DROP_MAGIC + b'{"sender": "a@b", "recipients": [["x@dest.test"]]}\n')
    @example(data=DROP_MAGIC + b"\xff\xfe{}\n")
    def inner(data: bytes) -> None:
        counts["rounds"] += 1
        name = secrets.token_hex(16) + ".drop"
        place_in_drop(drop, name, data)
        # A valid local message at the same time.
        token = f"tok{secrets.token_hex(8)}"
        code, err = run_sendmail(cfg, ["x@dest.test"], f"Subject: {token}\n\nok\n".encode())
        assert code == 0, err
        valid.append(token)
        wait_until(lambda: not (drop / name).exists(), DEADLINE, "the pickup to handle it")
        quarantined = events.events("quarantined", file=f"drop/{name}")
        rejected = events.events("rejected", file=f"drop/{name}")
        assert len(quarantined) + len(rejected) <= 1, (quarantined, rejected)
        if quarantined:
            counts["quarantined"] += 1
            corrupt = [p for p in (tmp_path / "spool" / "corrupt").iterdir() if name in p.name]
            assert len(corrupt) == 1 and corrupt[0].read_bytes() == data  # kept, not deleted
        elif rejected:
            counts["bounced"] += 1  # a submission the relay refuses: its submitter is told
            bounce_settled(sink, events, rejected[0]["queue_id"])
        else:
            counts["taken"] += 1  # it was a valid submission after all
        wait_until(lambda: with_token(sink, token), DEADLINE, "the valid local message")

    fuzz_settings(request, 6, 60)(inner)()
    assert not events.events("internal_error")
    assert not events.events("spool_error")  # every bad file was the file's fault
    assert not [p for p in drop.iterdir() if not p.name.startswith(".")]
    torture_report(
        "local: fuzzed drop files",
        rounds=counts["rounds"],
        acknowledged=len(valid),
        delivered=sum(1 for t in valid if with_token(sink, t)),
        lost=sum(1 for t in valid if not with_token(sink, t)),
        note=(
            f"{counts['quarantined']} hostile files quarantined, {counts['bounced']} refused"
            f" and bounced, {counts['taken']} valid"
        ),
    )


# -- 3. submissions the relay refuses at pickup: bounced, never set aside --------------------

HOPS_DATE = "Mon, 1 Jan 2026 00:00:00 +0000"


@st.composite
def refused_submissions(draw: st.DrawFn) -> tuple[str, list[str], int, int]:
    """(sender, recipients, Received: count, body size) for a drop file that parses:
    plausible and hostile addresses, hop counts around the limit of 50, sizes around
    the relay's 64 KiB limit."""
    sender = draw(st.one_of(st.sampled_from(["", "a@client.test", "local"]), addresses()))
    plain = st.sampled_from(["x@dest.test", "y@dest.test", "root"])
    recipients = draw(st.lists(st.one_of(plain, addresses()), min_size=1, max_size=3))
    hops = draw(st.sampled_from([0, 3, 50, 51, 120]))
    size = draw(st.sampled_from([10, 30 * 1024, 80 * 1024]))
    return sender, recipients, hops, size


def test_refused_drop_files_are_bounced_to_the_submitter_never_lost(
    request, local_relay, sink, events, tmp_path, torture_report
):
    """Crafted drop files that parse but that the relay refuses (a mail loop, too big,
    an address no submission may carry): a DSN to the file's sender, or to the user
    who dropped it; nothing quarantined, nothing lost, nothing sent as it was."""
    del local_relay  # the relay runs in-process; only its drop area is used here
    drop_area = drop_dir(tmp_path)
    me = f"{sendmail.invoking_user()}@relay.test"
    outcomes = {"delivered": 0, "bounced": 0, "refused": 0, "double bounce": 0}
    rounds = 0

    @given(submission=refused_submissions())
    @example(submission=("bob@client.test", ["x@dest.test"], 51, 10))  # issue #14's loop
    @example(submission=("", ["x@dest.test"], 80, 10))  # null sender: to the user
    @example(submission=("a@client.test", ["x@dest.test"], 0, 80 * 1024))  # too big
    @example(submission=("-oQ/tmp", ["x@dest.test"], 0, 10))  # a bad sender: to the user
    @example(submission=("a@client.test", ["x@dest.test\r\nRCPT TO:<spy@evil.test>"], 0, 10))
    def inner(submission: tuple[str, list[str], int, int]) -> None:
        nonlocal rounds
        rounds += 1
        sender, recipients, hops, size = submission
        token = f"tok{secrets.token_hex(8)}"
        lines = [f"Received: from h{n}.test by relay.client.test; {HOPS_DATE}" for n in range(hops)]
        lines += [f"Message-ID: <{token}@local.test>", f"Subject: {token}"]
        body = ("b" * 75 + "\r\n") * (size // 77) + "end\r\n"
        content = ("\r\n".join(lines) + "\r\n\r\n" + body).encode()
        name = secrets.token_hex(16) + ".drop"
        place_in_drop(drop_area, name, drop.encode(sender, recipients, content))
        wait_until(lambda: not (drop_area / name).exists(), DEADLINE, "the pickup to handle it")
        assert not events.events("quarantined", file=f"drop/{name}")
        rejected = events.events("rejected", file=f"drop/{name}")
        if hops > 50 or size > 64 * 1024:
            assert rejected, (sender, recipients, hops, size)
        if not rejected:
            (received,) = wait_until(
                lambda: events.events("received", message_id=f"<{token}@local.test>"),
                DEADLINE,
                "the queued submission",
            )

            def settled():
                if [m for m in with_token(sink, token) if DSN_MARK not in m.content]:
                    return "delivered"
                if events.events("failed", queue_id=received["queue_id"]):
                    return "bounced"  # taken, refused upstream: the usual DSN
                return None

            outcomes[wait_until(settled, DEADLINE, "the queued submission to settle")] += 1
            return
        assert rejected[0]["reply"][:1] in "45", rejected
        kind, rcpts = bounce_settled(sink, events, rejected[0]["queue_id"])
        outcomes["refused" if kind == "dsn" else kind] += 1
        if sender in ("a@client.test", "bob@client.test"):
            assert rcpts == [sender], (submission, rcpts)
        elif sender in ("", "-oQ/tmp"):
            assert rcpts == [me], (submission, rcpts)
        elif sender == "local":
            assert rcpts == ["local@relay.test"], (submission, rcpts)
        else:
            assert rcpts[0] in (sender, f"{sender}@relay.test", me), (submission, rcpts)
        # Never sent as it was.
        assert not [m for m in with_token(sink, token) if DSN_MARK not in m.content]

    fuzz_settings(request, 12, 120)(inner)()
    assert not [p for p in drop_area.iterdir() if not p.name.startswith(".")]
    corrupt = tmp_path / "spool" / "corrupt"
    assert not corrupt.exists() or not list(corrupt.iterdir())
    assert not events.events("internal_error") and not events.events("spool_error")
    torture_report(
        "local: refused drop files",
        rounds=rounds,
        acknowledged=rounds,
        delivered=outcomes["delivered"],
        bounced=outcomes["bounced"] + outcomes["refused"] + outcomes["double bounce"],
        lost=rounds - sum(outcomes.values()),
        note=(
            f"{outcomes['refused']} refused at pickup and bounced to the submitter,"
            f" {outcomes['double bounce']} of whose DSNs the upstream refused (kept)"
        ),
    )
    assert rounds == sum(outcomes.values())


# -- 4. files dropped while the relay starts -------------------------------------------------


def test_files_dropped_during_start_up_are_picked_up_at_once(
    tmp_path, sink, relay_process, torture_size, torture_report
):
    """Restart the relay while submissions pour in, through the real command and the
    format's own writer: every file is taken in at once after the start (well within the
    10 s rescan), none lost across the restarts."""
    cfg = write_config(tmp_path, sink.port)
    spool = Spool(str(tmp_path / "spool"))
    spool.create()
    proc = relay_process(cfg)
    dropped: dict[str, float] = {}  # Message-ID -> when it was durably in drop/
    failures: list[object] = []
    stop = threading.Event()

    def writer() -> None:
        while not stop.is_set():
            token = f"tok{secrets.token_hex(8)}"
            content = f"Message-ID: <{token}@local.test>\r\nSubject: {token}\r\n\r\nx\r\n"
            drop.write(spool, "a@client.test", ["x@dest.test"], content.encode())
            dropped[f"<{token}@local.test>"] = time.time()
            time.sleep(0.002)

    def command() -> None:
        while not stop.is_set():
            token = f"tok{secrets.token_hex(8)}"
            stdin = f"Message-ID: <{token}@local.test>\nSubject: {token}\n\nx\n".encode()
            done = run_sendmail_process(cfg, ["-i", "x@dest.test"], stdin)
            if done.returncode != 0:
                failures.append(done)
            dropped[f"<{token}@local.test>"] = time.time()

    def taken() -> dict[str, float]:
        return received_locally(proc.records())

    rounds = torture_size(2, 8)
    worst = 0.0
    for _ in range(rounds):
        stop.clear()
        started = start_amid(proc, [writer, command, command], stop, linger=0.3, join_timeout=60)
        assert not failures, failures
        wait_until(lambda: set(taken()) >= set(dropped), 5.0, "every dropped file taken in")
        start = datetime.fromisoformat(started["time"]).timestamp()
        found = taken()
        # From when the file was there, or from the start for one dropped before it.
        worst = max([worst, *(found[m] - max(t, start) for m, t in dropped.items())])
        assert proc.stop() == 0
    assert worst < 5.0, worst
    # What the last stop left in the queue goes out at the next start.
    proc.start()

    def delivered_ids() -> set[str]:
        return {
            m.content.split(b"Message-ID: ", 1)[1].split(b"\r\n", 1)[0].decode()
            for m in list(sink.messages)
        }

    with contextlib.suppress(pytest.fail.Exception):
        wait_until(lambda: delivered_ids() >= set(dropped), 60.0, "every message delivered")
    assert proc.stop() == 0
    delivered = delivered_ids()
    lost = set(dropped) - delivered
    torture_report(
        "local: files dropped during start-up",
        rounds=rounds,
        acknowledged=len(dropped),
        delivered=len(set(dropped) & delivered),
        lost=len(lost),
        note=f"slowest pickup after the start {worst:.2f}s (the rescan: 10 s)",
    )
    assert not lost, sorted(lost)[:5]
