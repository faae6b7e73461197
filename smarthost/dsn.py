"""Delivery Status Notifications (RFC 3464): envelope + outcomes + original → bytes.

A pure module: no I/O and no clock (the caller passes `now`). `build_dsn` returns a
complete RFC 5322 message with CRLF line endings, ready to be spooled with the null
sender and the original sender as its only recipient:

    multipart/report; report-type=delivery-status
      1. text/plain               a short explanation for a human
      2. message/delivery-status  the machine-readable report (RFC 3464)
      3. message/rfc822           the original, byte for byte, or only its header
         or text/rfc822-headers   section (RET=HDRS, or larger than `return_max`)

The original is embedded as it was spooled, not re-serialised: its bytes (8-bit ones
included) come back intact, and the part is labelled `Content-Transfer-Encoding: 8bit`
when it has any. The rest is 7-bit, except the To field for an SMTPUTF8 sender.

ENVID and ORCPT are stored xtext-decoded, and RFC 3461 §6.3 asks for the decoded values
in Original-Envelope-Id and Original-Recipient (Postfix writes them so too). A value
that is not printable US-ASCII cannot appear in a delivery-status field as it is, so
it is written xtext-encoded instead. `xtext_encode` and `xtext_decode` are also what
the receiver uses for the ENVID and ORCPT parameters.
"""

from __future__ import annotations

import re
import textwrap
from collections.abc import Iterable
from datetime import datetime, timezone
from email import charset as _charset
from email import policy
from email.generator import BytesGenerator
from email.message import Message
from email.utils import format_datetime
from io import BytesIO

from .spool import Envelope, Recipient

FAILED, DELAYED, RELAYED = "failed", "delayed", "relayed"
ACTIONS = (FAILED, DELAYED, RELAYED)

_NOTIFY_KEYWORD = {FAILED: "FAILURE", DELAYED: "DELAY", RELAYED: "SUCCESS"}
_SUBJECTS = {
    FAILED: "Undelivered Mail Returned to Sender",
    DELAYED: "Delayed Mail (still being retried)",
    RELAYED: "Successful Mail Delivery Report (relayed)",
}
_DEFAULT_STATUS = {FAILED: "5.0.0", DELAYED: "4.0.0", RELAYED: "2.0.0"}
_WARNING_BANNER = (
    "#" * 68,
    "# THIS IS A WARNING ONLY.  YOU DO NOT NEED TO RESEND YOUR MESSAGE. #",
    "#" * 68,
)
_RETURNED = {FAILED: "Undelivered Message", DELAYED: "Delayed Message", RELAYED: "Message"}

# No folding by the email package (compat32 would fold at ";" first, cutting
# "Diagnostic-Code: smtp;" from its text): `_set` folds at spaces only.
_POLICY = policy.compat32.clone(linesep="\r\n", max_line_length=0)
_MAX_LINE = 78
_CRLF = "\r\n"
_STATUS_CODE = re.compile(r"[245]\.\d{1,3}\.\d{1,3}")
_MSG_ID = re.compile(r"<[!-;=?-~]+>")  # printable ASCII without < > or spaces
_BCHARS = re.compile(r"[^0-9A-Za-z'()+_,./:=?-]")  # RFC 2046 bchars, less the space
_HEX = "0123456789ABCDEFabcdef"


# -- xtext (RFC 3461 §4) -------------------------------------------------------------


def xtext_encode(s: str) -> str:
    """`s` as xtext: "+XX" for every byte of its UTF-8 form outside 33..126, and for
    "+" and "="."""
    out = []
    for byte in s.encode("utf-8"):
        if 33 <= byte <= 126 and byte not in (0x2B, 0x3D):
            out.append(chr(byte))
        else:
            out.append(f"+{byte:02X}")
    return "".join(out)


def xtext_decode(s: str) -> str:
    """Decode xtext. Raises ValueError for a "+" not followed by two hex digits, a bare
    "=", any character outside 33..126, or a result that is not UTF-8. Lower-case hex
    digits are accepted (the RFC writes upper case; the meaning is unambiguous)."""
    out = bytearray()
    i = 0
    while i < len(s):
        char = s[i]
        if char == "+":
            pair = s[i + 1 : i + 3]
            if len(pair) != 2 or any(c not in _HEX for c in pair):
                raise ValueError(f"malformed xtext: bad hexchar at offset {i}")
            out.append(int(pair, 16))
            i += 3
            continue
        if char == "=" or not 33 <= ord(char) <= 126:
            raise ValueError(f"malformed xtext: {char!r} at offset {i}")
        out.append(ord(char))
        i += 1
    try:
        return out.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ValueError(f"malformed xtext: not UTF-8 ({exc.reason})") from None


# -- NOTIFY (RFC 3461 §4.1) ----------------------------------------------------------


def _check_action(action: str) -> None:
    if action not in ACTIONS:
        raise ValueError(f"unknown DSN action {action!r}")


def wants_dsn(rcpt: Recipient, action: str) -> bool:
    """Whether the sender asked for a DSN of this kind for this recipient: NEVER never,
    an explicit list only its kinds, and without NOTIFY failures and delays only."""
    _check_action(action)
    if rcpt.notify is None or not rcpt.notify.strip():
        return action in (FAILED, DELAYED)
    keywords = {word.strip().upper() for word in rcpt.notify.split(",")}
    if "NEVER" in keywords:
        return False
    return _NOTIFY_KEYWORD[action] in keywords


# -- field values --------------------------------------------------------------------


def _date(epoch: float) -> str:
    """An RFC 5322 date-time, in UTC so that the result depends on nothing else."""
    return format_datetime(datetime.fromtimestamp(epoch, tz=timezone.utc))


def _printable(s: str) -> bool:
    return all(32 <= ord(c) <= 126 for c in s)


def _field_text(s: str) -> str:
    """One line of printable US-ASCII for a report field: breaks become spaces,
    anything else unprintable becomes "?" (a reply may carry anything)."""
    s = " ".join(s.split())
    return "".join(c if 32 <= ord(c) <= 126 else "?" for c in s)


def _xtext_if_needed(value: str) -> str:
    """A decoded ENVID or ORCPT address as a field value: itself when it is printable
    US-ASCII (RFC 3461 §6.3), else its xtext form, which always is."""
    return value if _printable(value) else xtext_encode(value)


def _utf8_addr_xtext(address: str) -> str:
    """RFC 6533 utf-8-addr-xtext: the address in US-ASCII, "\\x{HEX}" for the rest."""
    return "".join(
        c if 33 <= ord(c) <= 126 and c not in "+=\\" else f"\\x{{{ord(c):X}}}" for c in address
    )


def _final_recipient(address: str) -> str:
    if address.isascii() and _printable(address):
        return f"rfc822; {address}"
    return f"utf-8; {_utf8_addr_xtext(address)}"  # an SMTPUTF8 address (RFC 6533)


def _original_recipient(orcpt: str) -> str:
    addr_type, sep, address = orcpt.partition(";")
    addr_type = addr_type.strip()
    if not sep or not addr_type or not _printable(addr_type):
        addr_type, address = "unknown", orcpt  # RFC 3464 §2.3.1
    return f"{addr_type};{_xtext_if_needed(address)}"


def _status(rcpt: Recipient, action: str) -> str:
    """The enhanced status code: the recipient's own if well formed (of class 2 for a
    relayed one), else the class of its reply, else the action's default."""
    status = (rcpt.status or "").strip()
    if _STATUS_CODE.fullmatch(status) and (action != RELAYED or status[0] == "2"):
        return status
    if action != RELAYED and rcpt.reply and rcpt.reply[:1] in ("4", "5"):
        return f"{rcpt.reply[0]}.0.0"
    return _DEFAULT_STATUS[action]


def _message_id(value: str | None) -> str | None:
    """The msg-id in a Message-ID field's value, when there is a usable one."""
    match = _MSG_ID.search(value or "")
    return match.group(0) if match else None


def _header_value(value: str) -> str:
    """A header value for compat32: 8-bit (RFC 6532) text is carried as surrogates,
    which the generator writes out as the original bytes instead of RFC 2047 words."""
    value = " ".join(value.split())
    if value.isascii():
        return value
    return value.encode("utf-8").decode("ascii", "surrogateescape")


# -- the three parts -----------------------------------------------------------------


def _set(msg: Message, name: str, value: str) -> None:
    """Add a header field, folded at spaces to lines of at most 78 characters where
    it can be (a long word stays whole)."""
    lines = textwrap.wrap(
        f"{name}: {value}",
        width=_MAX_LINE,
        subsequent_indent=" ",
        break_long_words=False,
        break_on_hyphens=False,
    )
    msg[name] = _CRLF.join(lines)[len(name) + 2 :]


def _block(fields: Iterable[tuple[str, str]]) -> Message:
    block = Message()
    for name, value in fields:
        _set(block, name, value)
    return block


def _message_fields(env: Envelope, reporting_mta: str) -> list[tuple[str, str]]:
    fields = [("Reporting-MTA", f"dns; {_field_text(reporting_mta)}")]
    fields.append(("X-Smarthost-Queue-ID", _field_text(env.id)))
    if env.envid is not None:
        fields.append(("Original-Envelope-Id", _xtext_if_needed(env.envid)))
    fields.append(("Arrival-Date", _date(env.arrival)))
    return fields


def _recipient_fields(
    rcpt: Recipient, action: str, now: float, will_retry_until: float | None
) -> list[tuple[str, str]]:
    fields = []
    if rcpt.orcpt is not None:
        fields.append(("Original-Recipient", _original_recipient(rcpt.orcpt)))
    fields.append(("Final-Recipient", _final_recipient(rcpt.address)))
    fields.append(("Action", action))
    fields.append(("Status", _status(rcpt, action)))
    if rcpt.remote_mta:
        fields.append(("Remote-MTA", f"dns; {_field_text(rcpt.remote_mta)}"))
    if rcpt.reply:
        # RFC 3464 §2.3.6: "smtp" only for an SMTP reply; a local error is our own type.
        kind = "smtp" if _is_smtp_reply(rcpt.reply) else "X-Smarthost"
        fields.append(("Diagnostic-Code", f"{kind}; {_field_text(rcpt.reply)}"))
    fields.append(("Last-Attempt-Date", _date(rcpt.updated if rcpt.updated else now)))
    if action == DELAYED and will_retry_until is not None:
        fields.append(("Will-Retry-Until", _date(will_retry_until)))
    return fields


def _status_part(
    env: Envelope,
    recipients: list[Recipient],
    action: str,
    reporting_mta: str,
    now: float,
    will_retry_until: float | None,
) -> Message:
    part = Message()
    part["Content-Description"] = "Delivery report"
    part["Content-Type"] = "message/delivery-status"
    blocks: list[Message | str] = [_block(_message_fields(env, reporting_mta))]
    blocks += [_block(_recipient_fields(r, action, now, will_retry_until)) for r in recipients]
    part.set_payload(blocks)
    return part


def _one_line(s: str) -> str:
    """Text for the human part: one line, no control characters (UTF-8 is fine)."""
    return "".join("?" if ord(c) < 32 or ord(c) == 127 else c for c in " ".join(s.split()))


def is_own_reply(rcpt: Recipient) -> bool:
    """The reply is the relay's own (it refused the recipient itself, e.g. for want of
    SMTPUTF8 upstream): an SMTP reply that no remote host gave. The report then names
    no Remote-MTA, and the reporting MTA, the relay, is the one that said it."""
    return bool(rcpt.reply) and not rcpt.remote_mta and _is_smtp_reply(rcpt.reply or "")


def _is_smtp_reply(text: str) -> bool:
    return re.match(r"[2-5]\d\d([\s-]|$)", text) is not None


def _explain(rcpt: Recipient, reporting_mta: str) -> str:
    """One recipient's line in the human part, like Postfix's."""
    line = f"<{_one_line(rcpt.address)}>: "
    if rcpt.status == "4.4.7":
        line += "delivery time expired; "
    if rcpt.reply and rcpt.remote_mta:
        return line + f"host {_one_line(rcpt.remote_mta)} said: {_one_line(rcpt.reply)}"
    if is_own_reply(rcpt):
        mta = _one_line(reporting_mta)
        return line + f"this mail system ({mta}) refused it itself: {_one_line(rcpt.reply or '')}"
    if rcpt.reply:
        return line + _one_line(rcpt.reply)
    return line + "no reply from any server"


def _human_text(
    env: Envelope,
    recipients: list[Recipient],
    action: str,
    reporting_mta: str,
    headers_only: bool,
    will_retry_until: float | None,
) -> str:
    lines = [f"This is the mail system at host {reporting_mta}.", ""]
    if action == FAILED:
        returned = "Its header section is" if headers_only else "It is"
        paragraphs = [
            "Your message could not be delivered to the recipients below, and the mail "
            f"system has given up. {returned} attached below.",
            "For further assistance, please send mail to postmaster, and include this report.",
        ]
    elif action == DELAYED:
        lines += [*_WARNING_BANNER, ""]
        until = "for a while"
        if will_retry_until is not None:
            until = f"until {_date(will_retry_until)}"
        paragraphs = [
            f"Your message, received {_date(env.arrival)}, could not be delivered yet to "
            f"the recipients below. The mail system will keep trying {until}; there is "
            "nothing you need to do yet.",
        ]
    else:
        paragraphs = [
            "Your message was successfully relayed to the recipients below. The next system "
            "does not send delivery notifications, so this is the last one you will get "
            "from here; other systems may still report errors.",
        ]
    for paragraph in paragraphs:
        lines += [*textwrap.wrap(paragraph, width=72, break_on_hyphens=False), ""]
    lines += ["                   The mail system", ""]
    lines += [_explain(r, reporting_mta) for r in recipients]
    return _CRLF.join(lines) + _CRLF


def _text_part(text: str) -> Message:
    part = Message()
    part["Content-Description"] = "Notification"
    utf8 = _charset.Charset("utf-8")
    # 7bit when it is plain ASCII, else quoted-printable: never 8-bit, never base64.
    # typeshed types body_encoding as int, but None (no transfer encoding) is what the
    # stdlib itself uses for us-ascii and 8bit charsets.
    utf8.body_encoding = None if text.isascii() else _charset.QP  # type: ignore[assignment]
    part.set_payload(text, utf8)
    del part["MIME-Version"]  # set_payload adds one; it belongs on the top level only
    return part


def _header_section(original: bytes) -> bytes:
    """The original's header section, through the line ending of its last field."""
    if original.startswith((b"\r\n", b"\n")):
        return b""  # no header section at all
    ends = [i for i in (original.find(b"\r\n\r\n"), original.find(b"\n\n")) if i >= 0]
    if not ends:
        return original  # no body: all of it is header
    end = min(ends)
    return original[: end + (2 if original[end : end + 2] == b"\r\n" else 1)]


def _returned_part(original: bytes, action: str, headers_only: bool) -> Message:
    part = Message()
    content = _header_section(original) if headers_only else original
    if headers_only:
        part["Content-Description"] = f"{_RETURNED[action]} Headers"
        part["Content-Type"] = "text/rfc822-headers"
    else:
        part["Content-Description"] = _RETURNED[action]
        part["Content-Type"] = "message/rfc822"
    if not content.isascii():
        part["Content-Transfer-Encoding"] = "8bit"
    # A str payload is written out as it is, bytes included (surrogateescape): the
    # original is embedded, never re-parsed and re-folded.
    part.set_payload(content.decode("ascii", "surrogateescape"))
    return part


def _boundary(dsn_id: str, now: float, reporting_mta: str, contents: Iterable[bytes]) -> str:
    """A boundary like Postfix's (ID.time/host), unique against every part's text."""
    base = _BCHARS.sub("", f"{dsn_id}.{int(now)}/{reporting_mta}")[:60] or "dsn"
    texts = list(contents)
    boundary, n = base, 0
    while any(boundary.encode() in text for text in texts):
        n += 1
        boundary = f"{base}.{n}"
    return boundary


class _Generator(BytesGenerator):
    """A BytesGenerator that writes an embedded message given as a str payload with
    its 8-bit bytes (surrogateescape), as `BytesGenerator.write` does for the rest;
    the stock one insists on ASCII there."""

    def _encode(self, s: str) -> bytes:
        return s.encode("ascii", "surrogateescape")


# -- the report ----------------------------------------------------------------------


def build_dsn(
    env: Envelope,
    recipients: list[Recipient],
    action: str,
    original: bytes,
    *,
    reporting_mta: str,
    from_address: str,
    return_max: int,
    now: float,
    dsn_id: str,
    will_retry_until: float | None = None,
    headers_only: bool | None = None,
) -> bytes:
    """The DSN for `recipients` of `env`, which all reached `action` in one event.

    `headers_only` says that `original` is (at least) the original's header section
    and only that is to be returned, whatever its length: a caller that read only the
    head of a large message says so. By default it follows RET and `return_max`.
    """
    _check_action(action)
    if env.sender == "":
        raise ValueError("no DSN for a message from the null sender")
    if not recipients:
        raise ValueError("a DSN needs at least one recipient")
    if headers_only is None:
        headers_only = env.ret == "HDRS" or len(original) > return_max

    text = _human_text(env, recipients, action, reporting_mta, headers_only, will_retry_until)
    parts = [
        _text_part(text),
        _status_part(env, recipients, action, reporting_mta, now, will_retry_until),
        _returned_part(original, action, headers_only),
    ]
    eight_bit = any(p["Content-Transfer-Encoding"] == "8bit" for p in parts)

    msg = Message()
    _set(msg, "From", _header_value(f"Mail Delivery System <{from_address}>"))
    _set(msg, "To", _header_value(f"<{env.sender}>"))
    _set(msg, "Subject", _SUBJECTS[action])
    _set(msg, "Date", _date(now))
    _set(msg, "Message-ID", f"<{dsn_id}@{reporting_mta}>")
    original_id = _message_id(env.message_id)
    if original_id is not None:
        _set(msg, "In-Reply-To", original_id)
        _set(msg, "References", original_id)
    _set(msg, "Auto-Submitted", "auto-replied")  # RFC 3834: no auto-reply to this
    _set(msg, "MIME-Version", "1.0")
    boundary = _boundary(dsn_id, now, reporting_mta, [original, text.encode()])
    # Written out rather than by add_header, which would quote "delivery-status".
    _set(
        msg,
        "Content-Type",
        f'multipart/report; report-type=delivery-status; boundary="{boundary}"',
    )
    if eight_bit:
        _set(msg, "Content-Transfer-Encoding", "8bit")
    payload: list[Message | str] = [*parts]  # set_payload's list type, which is invariant
    msg.set_payload(payload)

    out = BytesIO()
    _Generator(out, mangle_from_=False, policy=_POLICY).flatten(msg)
    return out.getvalue()


# -- RFC 3461 parameters as clients give them ------------------------------------------

_DSN_PARAMS = {"MAIL": ("RET", "ENVID"), "RCPT": ("NOTIFY", "ORCPT")}
_COMMAND_ADDRESS = re.compile(r"\s*(?:FROM|TO)\s*:\s*(?:<[^>]*>|\S*)", re.I)
_NOTIFY_KINDS = ("SUCCESS", "FAILURE", "DELAY")
_ATEXT = re.compile(r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+")  # RFC 5322 atext


def take_dsn_params(command: str, arg: str | None) -> tuple[str | None, dict[str, str]]:
    """Split RFC 3461 parameters off a MAIL/RCPT argument, validated and xtext-decoded.

    Returns the argument without them (for aiosmtpd) and {name: value}. Raises
    ValueError with the reply text for a malformed or repeated parameter.
    """
    if not arg:
        return arg, {}
    match = _COMMAND_ADDRESS.match(arg)
    if match is None:
        return arg, {}
    kept, params = [arg[: match.end()]], {}
    for token in arg[match.end() :].split():
        name, _, value = token.partition("=")
        key = name.upper()
        if key not in _DSN_PARAMS[command]:
            kept.append(token)
            continue
        if key in params:
            raise ValueError(f"{key} given twice")
        params[key] = _dsn_value(key, value)
    return " ".join(kept), params


def _dsn_value(key: str, value: str) -> str:
    if key == "RET":
        if value.upper() not in ("FULL", "HDRS"):
            raise ValueError("RET must be FULL or HDRS")
        return value.upper()
    if key == "NOTIFY":
        kinds = value.upper().split(",")
        if kinds != ["NEVER"] and (
            not set(kinds) <= set(_NOTIFY_KINDS) or len(set(kinds)) != len(kinds)
        ):
            raise ValueError("NOTIFY must be NEVER or a list of SUCCESS, FAILURE, DELAY")
        return ",".join(kinds)
    if key == "ENVID":
        envid = xtext_decode(value)
        if not envid or len(value) > 100:
            raise ValueError("ENVID must be 1 to 100 characters of xtext")
        return envid
    addr_type, sep, address = value.partition(";")  # ORCPT
    if not sep or not _ATEXT.fullmatch(addr_type) or not address:
        raise ValueError("ORCPT must be addr-type;xtext, e.g. rfc822;user@example.com")
    return f"{addr_type};{xtext_decode(address)}"
