"""Address rewriting before queuing (`[rewrite]`): aliases, masquerading, force_from.

Applied to every message, from SMTP and from the drop area alike, before it is
committed, so the spool holds what will be sent. Pure functions of the config and the
message; the caller logs what changed.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from email.utils import formataddr, getaddresses

from . import headers
from .config import RewriteConfig


@dataclass
class Rewritten:
    """The envelope after rewriting, the header prefix to add, and what changed."""

    sender: str
    recipients: list[str]
    content: bytes
    changes: list[str] = field(default_factory=list)


def is_local(address: str, hostname: str) -> bool:
    """No domain, or this host's own name: an address rewriting may apply to."""
    _, at, domain = address.rpartition("@")
    return not at or domain.lower() == hostname.lower()


def local_part(address: str) -> str:
    return address.rpartition("@")[0] or address


def rewrite(
    config: RewriteConfig, hostname: str, sender: str, recipients: list[str], content: bytes
) -> Rewritten:
    """Apply aliases to recipients, then masquerading and force_from to the sender."""
    result = Rewritten(sender, list(recipients), content)
    aliases = config.alias_map()
    if aliases:
        result.recipients = [_alias(aliases, hostname, r, result.changes) for r in recipients]
    if config.masquerade and sender and is_local(sender, hostname):
        masqueraded = f"{local_part(sender)}@{config.masquerade}"
        result.changes.append(f"sender {sender} -> {masqueraded} (masquerade)")
        result.sender = masqueraded
    if config.masquerade:
        result.content = masquerade_header_from(
            result.content, config.masquerade, hostname, result.changes
        )
    if config.force_from:
        if result.sender and result.sender != config.force_from:
            result.changes.append(f"sender {result.sender} -> {config.force_from} (force_from)")
            result.sender = config.force_from
        result.content = force_header_from(result.content, config.force_from, result.changes)
    return result


def _alias(aliases: dict[str, str], hostname: str, address: str, changes: list[str]) -> str:
    if not is_local(address, hostname):
        return address
    target = aliases.get(local_part(address).lower())
    if target is None:
        return address
    changes.append(f"recipient {address} -> {target} (alias)")
    return target


def masquerade_header_from(content: bytes, domain: str, hostname: str, changes: list[str]) -> bytes:
    """Local addresses in `From:` get the masquerade domain, as the envelope sender does
    (Postfix's masquerade_classes include header_sender)."""
    froms = headers.find(content, "from")
    if not froms:
        return content
    field = froms[0]
    addresses = getaddresses([field.text])
    if not any(addr and is_local(addr, hostname) for _, addr in addresses):
        return content
    rewritten = [
        (name, f"{local_part(addr)}@{domain}" if addr and is_local(addr, hostname) else addr)
        for name, addr in addresses
    ]
    value = ", ".join(_format(name, addr) for name, addr in rewritten)
    changes.append(f"header From: {field.text} -> {value} (masquerade)")
    return content[: field.start] + f"From: {value}\r\n".encode() + content[field.end :]


def _format(name: str, address: str) -> str:
    try:
        return formataddr((name, address))
    except UnicodeEncodeError:  # an RFC 6532 (UTF-8) address: keep it as it is
        return f'"{name}" <{address}>' if name else address


def force_header_from(content: bytes, address: str, changes: list[str]) -> bytes:
    """`From:` becomes `address`; the old From moves to Reply-To when there is none."""
    froms = headers.find(content, "from")
    new_from = f"From: {address}\r\n".encode()
    if not froms:
        changes.append(f"header From: added {address} (force_from)")
        return new_from + content
    old = froms[0]
    if old.text.strip("<> ") == address:
        return content
    reply_to = b"" if headers.find(content, "reply-to") else b"Reply-To: " + old.value + b"\r\n"
    changes.append(f"header From: {old.text} -> {address} (force_from)")
    return content[: old.start] + new_from + reply_to + content[old.end :]
