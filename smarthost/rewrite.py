"""Address rewriting before queuing (`[rewrite]`): qualification, aliases, masquerading,
force_from.

Applied to every message, from SMTP and from the drop area alike, before it is
committed, so the spool holds what will be sent. Pure functions of the config and the
message; the caller logs what changed.

In order, as Postfix does it:

1. Unqualified addresses (no domain) get `@hostname`: the envelope sender and
   recipients, and the addresses in To, Cc and From (`root (Cron Daemon)` becomes
   `root@hostname (Cron Daemon)`); Postfix's `append_at_myorigin`.
2. Aliases apply to recipients at this host (`root@hostname`).
3. Masquerading: senders at this host (envelope and From) get the masquerade domain.
4. force_from: the envelope sender and exactly one `From:` field (see
   `force_header_from`).

Header addresses are edited in place (the rest of the field, its comments and folding
are kept), never re-generated.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

from . import headers
from .config import RewriteConfig

QUALIFIED_FIELDS = ("from", "to", "cc")
_NAMES = {"from": "From", "to": "To", "cc": "Cc"}


class HeaderInDoubt(ValueError):
    """force_from cannot promise one From: a line of the header may be read as a From
    field by an upstream, and is not one to us (submission turns it into a refusal)."""


@dataclass
class Rewritten:
    """The envelope after rewriting, the header block rewritten, and what changed."""

    sender: str
    recipients: list[str]
    content: bytes
    changes: list[str] = field(default_factory=list)


def has_domain(address: str) -> bool:
    """An `@` outside a quoted local part."""
    quoted = escaped = False
    for char in address:
        if escaped:
            escaped = False
        elif char == "\\":
            escaped = True
        elif char == '"':
            quoted = not quoted
        elif char == "@" and not quoted:
            return True
    return False


def qualify(address: str, hostname: str) -> str:
    """`address@hostname` for an address without a domain; others as they are."""
    return address if not address or has_domain(address) else f"{address}@{hostname}"


def is_local(address: str, hostname: str) -> bool:
    """No domain, or this host's own name: an address rewriting may apply to."""
    _, at, domain = address.rpartition("@")
    return not at or domain.lower() == hostname.lower()


def local_part(address: str) -> str:
    return address.rpartition("@")[0] or address


def domain_of(address: str) -> str:
    """The domain, lower-cased; "" for an address without one."""
    _, at, domain = address.rpartition("@")
    return domain.lower() if at else ""


def rewrite(
    config: RewriteConfig,
    hostname: str,
    sender: str,
    recipients: list[str],
    content: bytes,
    header: headers.Header | None = None,
) -> Rewritten:
    """Qualify, then aliases to recipients, then masquerading and force_from to the
    sender. `content` starts with the header block (`header`: it read, if done already).
    Raises HeaderInDoubt (force_from only)."""
    result = Rewritten(sender, [], content)
    aliases = config.alias_map()
    for original in recipients:
        address = qualify(original, hostname)
        target = aliases.get(local_part(address).lower()) if is_local(address, hostname) else None
        if target is not None:
            result.changes.append(f"recipient {original} -> {target} (alias)")
            address = target
        elif address != original:
            result.changes.append(f"recipient {original} -> {address} (qualified)")
        result.recipients.append(address)

    address = qualify(sender, hostname)
    if config.masquerade and address and is_local(address, hostname):
        address = f"{local_part(address)}@{config.masquerade}"
        result.changes.append(f"sender {sender} -> {address} (masquerade)")
    elif address != sender:
        result.changes.append(f"sender {sender} -> {address} (qualified)")
    result.sender = address

    header = header if header is not None else headers.read(content)
    given = len(content)

    def reread(edited: bytes) -> headers.Header:
        # What our own edits added does not count against the block's bound.
        return headers.read(edited, headers.MAX_BLOCK + max(len(edited) - given, 0))

    qualified = qualify_header_addresses(content, hostname, result.changes, header)
    if qualified is not content:
        content, header = qualified, reread(qualified)
    if config.masquerade:
        masqueraded = masquerade_header_from(
            content, config.masquerade, hostname, result.changes, header
        )
        if masqueraded is not content:
            content, header = masqueraded, reread(masqueraded)
    if config.force_from:
        if result.sender and result.sender != config.force_from:
            result.changes.append(f"sender {result.sender} -> {config.force_from} (force_from)")
            result.sender = config.force_from
        content = force_header_from(content, config.force_from, result.changes, header)
    result.content = content
    return result


# -- addresses in header fields --------------------------------------------------------


@dataclass(frozen=True)
class AddrSpec:
    """One mailbox's address in a field, by offsets into the message: `start`-`end` is
    the addr-spec (local part to domain, no comment); `at` is where `@domain` starts
    (None without a domain); `domain` its text without white space or comments."""

    start: int
    end: int
    at: int | None
    domain: str | None


# Postfix's header_address_token_limit: past this many tokens in one field, its
# addresses are left as they are (and the work on a hostile header stays bounded).
TOKEN_LIMIT = 10240
LOGGED_FIELDS = 10  # header fields named one by one in the changes of one step

_TOKEN = re.compile(
    rb"""[ \t\r\n]+
    | (?P<word>[^()<>\[\]:;@\\,."\ \t\r\n]+ | "(?:[^"\\]|\\.)*"? )
    | (?P<literal>\[[^\]]*\]?)
    | (?P<comment>\()
    | (?P<special>.)""",
    re.VERBOSE | re.DOTALL,
)


def _tokens(raw: bytes) -> Iterator[tuple[bytes, int, int]]:
    """RFC 5322 lexical tokens of a field body: ("word" | "literal" | a special, start,
    end); white space and comments are passed over. Lenient: what is left unclosed
    runs to the end. At most TOKEN_LIMIT tokens."""
    pos, count = 0, 0
    while count < TOKEN_LIMIT:
        match = _TOKEN.match(raw, pos)
        if match is None:
            return
        kind, pos = match.lastgroup, match.end()
        if kind == "comment":
            depth = 1
            while pos < len(raw) and depth:
                char = raw[pos : pos + 1]
                pos += 2 if char == b"\\" else 1
                depth += {b"(": 1, b")": -1}.get(char, 0)
        elif kind is not None:
            count += 1
            token = match.group() if kind == "special" else kind.encode()
            yield token, match.start(), pos


def _addr_spec(raw: bytes, tokens: list[tuple[bytes, int, int]]) -> AddrSpec | None:
    """The addr-spec the tokens of one mailbox make (local ["@" domain], words joined by
    dots), or None if they make none (a bare phrase, an empty `<>`)."""
    colons = [k for k, (kind, _, _) in enumerate(tokens) if kind == b":"]
    if colons:  # an obsolete route, <@a,@b:local@domain>: the address follows it
        tokens = tokens[colons[-1] + 1 :]
    kinds = [kind for kind, _, _ in tokens]
    at = kinds.index(b"@") if b"@" in kinds else len(kinds)
    local, domain = kinds[:at], kinds[at + 1 :]

    def dotted(parts: list[bytes], first: tuple[bytes, ...]) -> bool:
        return (
            len(parts) % 2 == 1
            and all(p == b"." for p in parts[1::2])
            and parts[0] in first
            and all(p == b"word" for p in parts[2::2])
        )

    if not local or not dotted(local, (b"word",)):
        return None
    if at == len(kinds):
        return AddrSpec(tokens[0][1], tokens[-1][2], None, None)
    if not domain or not dotted(domain, (b"word", b"literal")):
        return None
    text = b"".join(raw[s:e] for _, s, e in tokens[at + 1 :]).decode("utf-8", "replace")
    return AddrSpec(tokens[0][1], tokens[-1][2], tokens[at][1], text)


def addr_specs(content: bytes, field_: headers.Field) -> list[AddrSpec]:
    """The addresses of an address-list field (mailboxes, angle addresses, groups), with
    offsets into `content`."""
    base = content.index(b":", field_.start, field_.end) + 1
    raw = content[base : field_.end]
    found: list[AddrSpec] = []
    outside: list[tuple[bytes, int, int]] = []
    inside: list[tuple[bytes, int, int]] | None = None
    in_angle = False

    def mailbox_ends() -> None:
        spec = _addr_spec(raw, inside if inside is not None else outside)
        if spec is not None:
            at = None if spec.at is None else spec.at + base
            found.append(AddrSpec(spec.start + base, spec.end + base, at, spec.domain))
        outside.clear()

    for token in _tokens(raw):
        kind = token[0]
        if in_angle:
            if kind == b">":
                in_angle = False
            else:
                assert inside is not None
                inside.append(token)
        elif kind == b"<":
            in_angle, inside = True, []
        elif kind in (b",", b";"):
            mailbox_ends()
            inside = None
        elif kind == b":":  # a group's name ends: its mailboxes follow
            outside.clear()
            inside = None
        elif inside is None:
            outside.append(token)
    mailbox_ends()
    return found


def _edit_addresses(
    content: bytes,
    header: headers.Header,
    names: tuple[str, ...],
    edit: Callable[[AddrSpec], tuple[int, int, bytes] | None],
    reason: str,
    changes: list[str],
) -> bytes:
    """Apply `edit` to every address of the fields called `names`; log each field (the
    first LOGGED_FIELDS of them, then how many more)."""
    edits: list[tuple[int, int, bytes]] = []
    fields_edited = 0
    for found in header.fields:
        if found.name not in names:
            continue
        mine = [e for e in map(edit, addr_specs(content, found)) if e is not None]
        if not mine:
            continue
        edits += mine
        fields_edited += 1
        if fields_edited > LOGGED_FIELDS:
            continue
        raw = headers.splice(
            content[found.start : found.end],
            [(s - found.start, e - found.start, r) for s, e, r in mine],
        )
        value = b" ".join(raw.partition(b":")[2].split()).decode("utf-8", "replace")
        changes.append(f"header {_NAMES[found.name]}: {found.text} -> {value} ({reason})")
    if fields_edited > LOGGED_FIELDS:
        changes.append(f"{fields_edited - LOGGED_FIELDS} more header fields ({reason})")
    return headers.splice(content, edits) if edits else content


# A field body that is one mailbox with a domain, `Name <local@domain>` or
# `local@domain`, and nothing the tokenizer would have to look into (no quotes,
# comments, groups, lists or literals): nearly every From, To and Cc, and nothing to
# qualify in it. Tokenizing it costs ~30 µs a message for nothing.
_PLAIN = rb'[^()<>\[\]:;@\\,"\s]+'
_ONE_QUALIFIED_MAILBOX = re.compile(
    rb'[^()<>\[\]:;@\\,"]*<' + _PLAIN + rb"@" + _PLAIN + rb">\s*\Z"
    rb"|\s*" + _PLAIN + rb"@" + _PLAIN + rb"\s*\Z"
)


def _plainly_qualified(content: bytes, field_: headers.Field) -> bool:
    body = content.index(b":", field_.start, field_.end) + 1
    return _ONE_QUALIFIED_MAILBOX.match(content, body, field_.end) is not None


def qualify_header_addresses(
    content: bytes, hostname: str, changes: list[str], header: headers.Header | None = None
) -> bytes:
    """Addresses without a domain in To, Cc and From get `@hostname`."""
    header = header if header is not None else headers.read(content)
    if all(
        _plainly_qualified(content, found)
        for found in header.fields
        if found.name in QUALIFIED_FIELDS
    ):
        return content
    suffix = b"@" + hostname.encode()

    def edit(spec: AddrSpec) -> tuple[int, int, bytes] | None:
        return (spec.end, spec.end, suffix) if spec.at is None else None

    return _edit_addresses(content, header, QUALIFIED_FIELDS, edit, "qualified", changes)


def masquerade_header_from(
    content: bytes,
    domain: str,
    hostname: str,
    changes: list[str],
    header: headers.Header | None = None,
) -> bytes:
    """Local addresses in `From:` get the masquerade domain, as the envelope sender does
    (Postfix's masquerade_classes include header_sender)."""
    header = header if header is not None else headers.read(content)
    replacement = b"@" + domain.encode()

    def edit(spec: AddrSpec) -> tuple[int, int, bytes] | None:
        if spec.at is None:
            return spec.end, spec.end, replacement
        if spec.domain is not None and spec.domain.lower() == hostname.lower():
            return spec.at, spec.end, replacement
        return None

    return _edit_addresses(content, header, ("from",), edit, "masquerade", changes)


# -- force_from --------------------------------------------------------------------------


def force_header_from(
    content: bytes, address: str, changes: list[str], header: headers.Header | None = None
) -> bytes:
    """Exactly one `From:` leaves: `From: address`. Every From field is removed (the
    first one's value moves to Reply-To when there is none); the new one takes the
    first one's place, or goes first in the block when a doubtful line comes before
    that (a reader that stops there still sees it), or when there was no From at all.

    Refused (HeaderInDoubt) only where an upstream might see a From we did not rewrite:
    - a line another reader may take for a From field that this reader does not: the
      text after a bare CR (which goes out as a line end), or a line that is not a
      field here whose name is "from" once white space, control and 8-bit bytes are
      dropped (`\\ufeffFrom:`, `From\\x00:`, ` From:` before any field);
    - a header block not read to its end (longer than `headers.MAX_BLOCK`).
    Other doubts are not refused: lines that are not fields, 8-bit or invalid field
    names, bare CRs hiding nothing, continuation lines with no field. Whatever a reader
    makes of them, the only From it can find is the forced one.
    """
    header = header if header is not None else headers.read(content)
    hidden = [d for d in header.doubts if d.hides_from]
    if hidden:
        where = "; ".join(f"at byte {d.start}: {d.reason}" for d in hidden[:3])
        raise HeaderInDoubt(f"a line may be read as a From field upstream ({where})")
    if header.cut:
        raise HeaderInDoubt(f"the header block is longer than {headers.MAX_BLOCK} bytes")
    froms = header.find("from")
    new_from = f"From: {address}\r\n".encode()
    if not froms:
        changes.append(f"header From: added {address} (force_from)")
        return new_from + content
    first = froms[0]
    in_doubt = bool(header.doubts_before(first.start))
    if len(froms) == 1 and first.text.strip("<> ") == address and not in_doubt:
        return content
    if first.text.strip("<> ") != address and first.value and not header.find("reply-to"):
        new_from += b"Reply-To: " + first.value + b"\r\n"
    changes.append(f"header From: {first.text} -> {address} (force_from)")
    for extra in froms[1 : LOGGED_FIELDS + 1]:
        changes.append(f"header From: {extra.text} removed (force_from)")
    if len(froms) > LOGGED_FIELDS + 1:
        changes.append(f"{len(froms) - LOGGED_FIELDS - 1} more From fields removed (force_from)")
    if in_doubt:
        return new_from + headers.splice(content, [(f.start, f.end, b"") for f in froms])
    edits = [(first.start, first.end, new_from)] + [(f.start, f.end, b"") for f in froms[1:]]
    return headers.splice(content, edits)
