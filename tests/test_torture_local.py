"""Torture: hostile local input (issue #8). smarthost-sendmail arguments and -t headers
that try option, header or SMTP injection, and hypothesis-generated drop files thrown
into a running relay's drop area.

tests/test_local.py already covers the fixed drop-area attacks (symlinks, FIFOs,
oversized, deep JSON...) and a list of injection arguments; this file fuzzes. The
fuzzed sendmail calls go through `smarthost.sendmail.main` in-process (a subprocess per
example would blow the time budget); a handful also run as the real command. A running
in-process relay picks up every accepted submission, and the upstream (the `sink`)
shows what would have gone out.
"""

from __future__ import annotations

import contextlib
import email
import email.policy
import io
import json
import os
import re
import secrets
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import ROOT, Sink, wait_until, write_config
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from smarthost import headers, sendmail
from smarthost.config import load_config

DROP_MAGIC = sendmail.DROP_MAGIC
DEADLINE = 60.0
EX_USAGE, EX_DATAERR = 64, 65
DSN_MARK = b"report-type=delivery-status"


def fuzz_settings(request: pytest.FixtureRequest, small: int, large: int) -> settings:
    """`small` derandomized examples in make test, `large` random ones under --torture."""
    torture = request.config.getoption("--torture")
    return settings(
        max_examples=large if torture else small,
        deadline=None,
        database=None,
        derandomize=not torture,
        suppress_health_check=[
            HealthCheck.function_scoped_fixture,
            HealthCheck.too_slow,
            HealthCheck.data_too_large,
        ],
    )


def run_sendmail(cfg: Path, argv: list[str], stdin: bytes) -> tuple[int, str]:
    """smarthost-sendmail's main in-process: (exit code, stderr)."""
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        code = sendmail.main(["-C", str(cfg), *argv], stdin=io.BytesIO(stdin))
    return code, err.getvalue()


def run_sendmail_process(cfg: Path, argv: list[str], stdin: bytes) -> subprocess.CompletedProcess:
    """The real `smarthost-sendmail` (its console entry point)."""
    code = "import sys; from smarthost.cli import sendmail_main; sys.exit(sendmail_main())"
    return subprocess.run(
        [sys.executable, "-c", code, "-C", str(cfg), *argv],
        input=stdin,
        capture_output=True,
        timeout=60,
        cwd=ROOT,
        check=False,
    )


def squash(text: str) -> str:
    """Text without RFC 5322 comments, quoting (quotes, backslashes) and white space."""
    return re.sub(r'[\s"\\]', "", re.sub(r"\([^()]*\)", "", text))


def with_token(sink: Sink, token: str) -> list:
    return [m for m in list(sink.messages) if token.encode() in m.content]


def drop_dir(tmp_path: Path) -> Path:
    return tmp_path / "spool" / "drop"


def place_in_drop(drop: Path, name: str, data: bytes) -> None:
    """Written as .tmp-..., then renamed: atomic, and a move event wakes the pickup."""
    tmp = drop / f".tmp-{secrets.token_hex(8)}"
    tmp.write_bytes(data)
    os.rename(tmp, drop / name)


@pytest.fixture
def local_relay(tmp_path: Path, sink: Sink, relay_factory):
    cfg = write_config(tmp_path, sink.port)
    text = cfg.read_text().replace("[smtp]\n", '[smtp]\nmax_message_size = "64K"\n', 1)
    cfg.write_text(text)
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
        (received,) = events.events("received", message_id=f"<{token}@local.test>")
        spooled = set(received["recipients"])
        for rcpt in spooled:
            assert rcpt in from_args or (opts.from_headers and squash(rcpt) in header_text), (
                rcpt,
                argv,
                stdin,
            )
        if not opts.from_headers:
            assert spooled == from_args, (argv, spooled)
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
    counts = {"rounds": 0, "quarantined": 0, "taken": 0}
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
        if events.events("quarantined", file=f"drop/{name}"):
            counts["quarantined"] += 1
            corrupt = [p for p in (tmp_path / "spool" / "corrupt").iterdir() if name in p.name]
            assert len(corrupt) == 1 and corrupt[0].read_bytes() == data  # kept, not deleted
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
        note=f"{counts['quarantined']} hostile files quarantined, {counts['taken']} valid",
    )
