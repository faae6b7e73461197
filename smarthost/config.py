"""Configuration: the TOML file (SPEC §3) parsed into frozen dataclasses.

Every default lives in the dataclass definitions below; every value is parsed and
validated here, once (one duration parser, one size parser, one type check). A small
declarative schema per table maps each TOML key to a converter; cross-key rules run
after conversion. All errors are collected, each prefixed with its key path
(`backend[1].weight: must be a positive integer`), and raised together as one
ConfigError, so that `smarthost check` can show every problem in one run.
"""

from __future__ import annotations

import contextlib
import difflib
import importlib.util
import ipaddress
import math
import os
import re
import socket
import stat
import sys
import urllib.parse
from dataclasses import dataclass, field, replace
from typing import Any, Callable

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on Python < 3.11 only
    import tomli as tomllib

DEFAULT_CONFIG_PATH = "/etc/smarthost/smarthost.toml"
CONFIG_ENV = "SMARTHOST_CONFIG"

DEFAULT_GROUP = "default"
TLS_MODES = ("starttls", "implicit", "none")
AUTH_MECHANISMS = ("auto", "plain", "login", "xoauth2", "oauthbearer")
BEARER_MECHANISMS = ("xoauth2", "oauthbearer")  # SASL mechanisms that carry an OAuth 2.0 token
OAUTH2_FLOWS = ("client_credentials", "refresh_token")
LOG_LEVELS = ("debug", "info", "warning", "error")
LOG_FORMATS = ("json", "text")
BARE_NEWLINES = ("normalize", "reject")
SECRET_KEYS = ("password", "password_file", "password_command")
_DEFAULT_PORTS = {"starttls": 587, "implicit": 465, "none": 25}


@dataclass(frozen=True)
class OAuth2Provider:
    """What `[backend.oauth2] provider` fills in. `{tenant}` is the Microsoft tenant."""

    token_url: str
    scopes: dict[str, str]  # flow -> default scope (a flow absent here is not offered)
    device_code_url: str | None = None  # `oauth2 authorize`: the device-code flow (RFC 8628)
    authorize_url: str | None = None  # `oauth2 authorize`: the installed-app flow


# The providers' documented endpoints and SMTP scopes.
OAUTH2_PROVIDERS = {
    "microsoft": OAuth2Provider(
        token_url="https://login.microsoftonline.com/{tenant}/oauth2/v2.0/token",
        scopes={
            "client_credentials": "https://outlook.office365.com/.default",
            "refresh_token": "https://outlook.office.com/SMTP.Send offline_access",
        },
        device_code_url="https://login.microsoftonline.com/{tenant}/oauth2/v2.0/devicecode",
    ),
    "google": OAuth2Provider(
        token_url="https://oauth2.googleapis.com/token",
        scopes={"refresh_token": "https://mail.google.com/"},
        authorize_url="https://accounts.google.com/o/oauth2/v2/auth",
    ),
}


class ConfigError(Exception):
    """The configuration is invalid; `errors` holds one "key.path: message" per problem."""

    def __init__(self, errors: list[str]) -> None:
        self.errors = list(errors)
        super().__init__("\n".join(self.errors))


# --------------------------------------------------------------------------- dataclasses


@dataclass(frozen=True)
class SmtpConfig:
    """`[smtp]`: the listener."""

    listen: tuple[tuple[str, int], ...] = (("127.0.0.1", 25),)
    allow: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...] = (
        ipaddress.ip_network("127.0.0.0/8"),
        ipaddress.ip_network("::1/128"),
    )
    max_message_size: int = 25 * 2**20
    max_recipients: int = 100
    max_clients: int = 100
    timeout: float = 300.0
    tls_cert: str | None = None
    tls_key: str | None = None
    auth_users: str | None = None
    bare_newlines: str = "normalize"  # bare LF / CR in DATA: "normalize" or "reject"
    error_limit: int = 20  # error replies in one session before 421 and disconnect
    proxy_protocol: bool = False  # every connection starts with a PROXY v1/v2 header
    proxy_from: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...] = ()


@dataclass(frozen=True)
class SpoolConfig:
    """`[spool]`: where accepted mail lives until it is delivered or bounced."""

    dir: str = "/var/spool/smarthost"


@dataclass(frozen=True)
class DeliveryConfig:
    """`[delivery]`: sending threads and the retry schedule (all times in seconds)."""

    workers: int = 8
    retry_min: float = 60.0
    retry_max: float = 3600.0
    retry_for: float = 5 * 86400.0
    warn_after: float = 4 * 3600.0  # 0 disables the "delayed" DSN
    connect_timeout: float = 30.0
    timeout: float = 300.0


@dataclass(frozen=True)
class DsnConfig:
    """`[dsn]`: bounces. TOML `from` is `from_address` here (a Python keyword)."""

    # "" means "MAILER-DAEMON@<hostname>"; Config fills it in, since only it knows hostname.
    from_address: str = ""
    return_max: int = 2**20
    postmaster: str | None = None


@dataclass(frozen=True)
class RewriteConfig:
    """`[rewrite]`: aliases (lowercased local part -> address, sorted), masquerading, force_from."""

    aliases: tuple[tuple[str, str], ...] = ()
    masquerade: str | None = None
    force_from: str | None = None

    def alias_map(self) -> dict[str, str]:
        """The aliases as a dict, keyed by lowercased local part."""
        return dict(self.aliases)


@dataclass(frozen=True)
class OAuth2Config:
    """`[backend.oauth2]`: how the relay gets its own access tokens (SPEC §11).

    After parsing, `token_url`, `scope`, `device_code_url` and `authorize_url` hold
    the provider's defaults where the file did not set them.
    """

    flow: str
    client_id: str
    provider: str | None = None
    tenant: str | None = None
    client_secret_file: str | None = None
    refresh_token_file: str | None = None
    scope: str = ""
    token_url: str = ""
    device_code_url: str | None = None
    authorize_url: str | None = None


@dataclass(frozen=True)
class BackendConfig:
    """One `[[backend]]`: an upstream relay. `name` and `port` default from host and tls."""

    host: str
    name: str = ""  # "" -> "host:port"
    port: int = 0  # 0 -> by tls: starttls 587, implicit 465, none 25
    tls: str = "starttls"
    tls_verify: bool = True
    tls_ca: str | None = None
    username: str | None = None
    password: str | None = field(default=None, repr=False)
    password_file: str | None = None
    password_command: str | None = None
    auth: str = "auto"
    oauth2: OAuth2Config | None = None
    weight: int = 1
    backup: bool = False
    max_connections: int = 4
    rate: tuple[int, float] | None = None  # (messages, per seconds)
    max_fails: int = 1  # 0: never marked down
    fail_timeout: float = 30.0
    group: str = DEFAULT_GROUP

    def __post_init__(self) -> None:
        # Defaults that depend on other fields; object.__setattr__ because we are frozen.
        if not self.port:
            object.__setattr__(self, "port", _DEFAULT_PORTS.get(self.tls, 25))
        if not self.name:
            object.__setattr__(self, "name", format_hostport(self.host, self.port))


@dataclass(frozen=True)
class RouteConfig:
    """One `[[route]]`: mail whose sender or recipient domain matches goes to `group`."""

    group: str
    sender_domain: tuple[str, ...] = ()
    recipient_domain: tuple[str, ...] = ()


@dataclass(frozen=True)
class LogConfig:
    """`[log]`: level (lowercase), file (None: stderr) and format."""

    level: str = "info"
    file: str | None = None
    format: str = "json"


@dataclass(frozen=True)
class MetricsConfig:
    """`[metrics]`: the HTTP endpoint's (host, port); None: no endpoint at all."""

    listen: tuple[str, int] | None = None


def _default_hostname() -> str:
    # Looked up at call time (not bound at import) so it is only paid when needed.
    return socket.getfqdn()


@dataclass(frozen=True)
class FleetConfig:
    """`[fleet]`: relays sharing provider limits through Redis (SPEC §12); off without
    `redis`. `node` names this relay in the fleet and in every log line."""

    redis: str | None = None  # redis://, rediss:// or unix:// URL
    redis_password_file: str | None = None
    node: str = field(default_factory=socket.gethostname)

    @property
    def enabled(self) -> bool:
        return self.redis is not None

    @property
    def member(self) -> str | None:
        """`node` in a fleet (on every log line and metric), else None."""
        return self.node if self.enabled else None


@dataclass(frozen=True)
class Config:
    """The whole configuration file."""

    hostname: str = field(default_factory=_default_hostname)
    user: str | None = None
    smtp: SmtpConfig = field(default_factory=SmtpConfig)
    spool: SpoolConfig = field(default_factory=SpoolConfig)
    delivery: DeliveryConfig = field(default_factory=DeliveryConfig)
    dsn: DsnConfig = field(default_factory=DsnConfig)
    rewrite: RewriteConfig = field(default_factory=RewriteConfig)
    backends: tuple[BackendConfig, ...] = ()
    routes: tuple[RouteConfig, ...] = ()
    log: LogConfig = field(default_factory=LogConfig)
    fleet: FleetConfig = field(default_factory=FleetConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    path: str = "<config>"

    def __post_init__(self) -> None:
        if not self.dsn.from_address:
            dsn = replace(self.dsn, from_address=f"MAILER-DAEMON@{self.hostname}")
            object.__setattr__(self, "dsn", dsn)


# What a reload (SIGHUP) leaves as it is until the next start: the listening sockets and
# what their sessions were set up with, the spool, the service user, the sender pool.
RESTART_ONLY = (
    "hostname",
    "user",
    "smtp.listen",
    "smtp.tls_cert",
    "smtp.tls_key",
    "smtp.max_clients",
    "smtp.timeout",
    "smtp.bare_newlines",
    "smtp.error_limit",
    "smtp.max_message_size",
    "smtp.proxy_protocol",
    "smtp.proxy_from",
    "spool.dir",
    "delivery.workers",
    "fleet",  # Redis, and the node that every line names
    "metrics.listen",
)


def for_reload(running: Config, new: Config) -> tuple[Config, list[str]]:
    """What a reload applies: `new`, with each RESTART_ONLY key as `running` has it; and
    the keys whose new value waits for a restart. Every part of the relay then sees one
    config (pickup's size limit is the listener's)."""
    applied, waiting = new, []
    for key in RESTART_ONLY:
        value = _get(running, key)
        if _get(new, key) != value:
            waiting.append(key)
            applied = _with(applied, key, value)
    return applied, waiting


def _get(config: Any, key: str) -> Any:
    for name in key.split("."):
        config = getattr(config, name)
    return config


def _with(config: Any, key: str, value: Any) -> Any:
    """A copy of the frozen `config` with `key` (dotted) set to `value`."""
    name, _, rest = key.partition(".")
    inner = _with(getattr(config, name), rest, value) if rest else value
    return replace(config, **{name: inner})


# --------------------------------------------------------------------------- value parsers

_TYPE_NAMES = (
    (bool, "boolean"),  # before int: bool is a subclass of int
    (int, "integer"),
    (float, "float"),
    (str, "string"),
    (list, "array"),
    (dict, "table"),
)
_EXPECTED = {bool: "a boolean", int: "an integer", str: "a string", list: "an array"}


def _type_name(value: Any) -> str:
    for kind, name in _TYPE_NAMES:
        if isinstance(value, kind):
            return name
    return type(value).__name__  # TOML dates and times


def _expect(value: Any, kind: type, key: str, what: str | None = None) -> Any:
    """The one type check: TOML booleans are never integers, floats never integers."""
    if isinstance(value, kind) and (kind is bool or not isinstance(value, bool)):
        return value
    raise ValueError(f"{key}: expected {what or _EXPECTED[kind]}, got {_type_name(value)}")


_DURATION_RE = re.compile(r"(-?\d+(?:\.\d+)?)\s*([smhdw]?)")
_DURATION_UNITS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


def parse_duration(value: Any, key: str = "duration") -> float:
    """Seconds from integer/float seconds or a string like "30s", "5m", "4h", "5d", "2w"."""
    what = 'a duration such as "30s" or integer seconds'
    if isinstance(value, str):
        match = _DURATION_RE.fullmatch(value.strip())
        if not match:
            raise ValueError(f"{key}: invalid duration {value!r} (use e.g. 30s, 5m, 4h, 5d)")
        seconds = float(match.group(1)) * _DURATION_UNITS[match.group(2)]
    elif isinstance(value, (int, float)) and not isinstance(value, bool):
        try:
            seconds = float(value)
        except OverflowError:  # an integer beyond any float
            raise ValueError(f"{key}: duration must be finite") from None
    else:
        raise ValueError(f"{key}: expected {what}, got {_type_name(value)}")
    if not math.isfinite(seconds):
        raise ValueError(f"{key}: duration must be finite")
    if seconds < 0:
        raise ValueError(f"{key}: duration must not be negative")
    return seconds


_SIZE_RE = re.compile(r"(\d+(?:\.\d+)?)\s*([kmgt]?)b?", re.IGNORECASE)
_SIZE_UNITS = {"": 1, "k": 2**10, "m": 2**20, "g": 2**30, "t": 2**40}


def parse_size(value: Any, key: str = "size") -> int:
    """Bytes from integer bytes or a string like "512K", "25M", "1G" (binary multiples)."""
    if isinstance(value, str):
        match = _SIZE_RE.fullmatch(value.strip())
        if not match:
            raise ValueError(f"{key}: invalid size {value!r} (use e.g. 512K, 25M, 1G)")
        size = float(match.group(1)) * _SIZE_UNITS[match.group(2).lower()]
        if not math.isfinite(size):
            raise ValueError(f"{key}: size too large")
        return int(size)
    size = _expect(value, int, key, 'a size such as "25M" or integer bytes')
    if size < 0:
        raise ValueError(f"{key}: size must not be negative")
    return size


_RATE_RE = re.compile(r"(\d+)\s*/\s*([a-z]+)")
_RATE_UNITS = {
    "s": 1.0, "sec": 1.0, "second": 1.0,
    "m": 60.0, "min": 60.0, "minute": 60.0,
    "h": 3600.0, "hour": 3600.0,
}  # fmt: skip


def parse_rate(value: Any, key: str = "rate") -> tuple[int, float]:
    """(count, period in seconds) from "10/s", "100/m" or "250/h"."""
    text = _expect(value, str, key, 'a rate such as "250/h"')
    match = _RATE_RE.fullmatch(text.strip().lower())
    if not match or match.group(2) not in _RATE_UNITS or int(match.group(1)) < 1:
        raise ValueError(f"{key}: invalid rate {value!r} (use e.g. 10/s, 100/m, 250/h)")
    return int(match.group(1)), _RATE_UNITS[match.group(2)]


def parse_hostport(value: Any, default_port: int | None, key: str = "address") -> tuple[str, int]:
    """(host, port) from "host:port", "host", "[v6]:port" or "[v6]"; port 0 means any free port.

    Unbracketed IPv6 is refused even without a port: "::1:25" would otherwise be
    silently read as an address with the default port.
    """
    text = _expect(value, str, key).strip()

    def invalid(why: str) -> ValueError:
        return ValueError(f"{key}: invalid address {value!r}: {why} (use e.g. 127.0.0.1:25)")

    if text.startswith("["):
        host, closed, rest = text[1:].partition("]")
        if not closed or (rest and not rest.startswith(":")):
            raise invalid("write IPv6 as [address]:port")
        if not _is_ip(host, version=6):
            raise invalid(f"{host!r} is not an IPv6 address")
        port_text = rest[1:] if rest else None
    elif text.count(":") > 1:
        raise invalid("IPv6 addresses must be in brackets, e.g. [::1]:25")
    else:
        host, colon, port_text = text.partition(":")
        port_text = port_text if colon else None
    if not host or any(c.isspace() or c in "/[]@" for c in host):
        raise invalid("missing or malformed host")
    if port_text is None:
        if default_port is None:
            raise invalid("a port is required")
        return host, default_port
    if not port_text.isdigit() or int(port_text) > 65535:
        raise invalid("the port must be a number from 0 to 65535")
    return host, int(port_text)


def format_hostport(host: str, port: int) -> str:
    """Inverse of parse_hostport: brackets IPv6 addresses."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _is_ip(text: str, version: int | None = None) -> bool:
    try:
        address = ipaddress.ip_address(text)
    except ValueError:
        return False
    return version is None or address.version == version


def is_loopback(host: str) -> bool:
    """`localhost` or a loopback address (127.0.0.0/8, ::1)."""
    if host.lower().rstrip(".") == "localhost":
        return True
    return _is_ip(host) and ipaddress.ip_address(host).is_loopback


# --------------------------------------------------------------------------- converters
# A converter takes (value, key path) and returns the parsed value or raises ValueError
# with a message that already starts with the key path.

Converter = Callable[[Any, str], Any]
# A table's schema: TOML key -> converter.
Schema = dict[str, Converter]


def _integer(minimum: int = 0, maximum: int | None = None) -> Converter:
    if maximum is not None:
        rule = f"must be between {minimum} and {maximum}"
    else:
        rule = {0: "must not be negative", 1: "must be a positive integer"}.get(
            minimum, f"must be at least {minimum}"
        )

    def convert(value: Any, key: str) -> int:
        number = _expect(value, int, key)
        if number < minimum or (maximum is not None and number > maximum):
            raise ValueError(f"{key}: {rule}")
        return number

    return convert


def _boolean(value: Any, key: str) -> bool:
    return _expect(value, bool, key)


def _string(value: Any, key: str) -> str:
    text = _expect(value, str, key).strip()
    if not text:
        raise ValueError(f"{key}: must not be empty")
    return text


def _optional_string(value: Any, key: str) -> str | None:
    # An empty string means "not set": it is how a TOML file says "off" (log.file = "").
    return _expect(value, str, key).strip() or None


def _choice(*options: str) -> Converter:
    def convert(value: Any, key: str) -> str:
        text = _expect(value, str, key).strip().lower()
        if text not in options:
            raise ValueError(f"{key}: must be one of {', '.join(options)}; got {value!r}")
        return text

    return convert


def _amount(parse: Converter, positive: bool) -> Converter:
    """A duration or size parsed by `parse`; with `positive`, 0 is refused."""

    def convert(value: Any, key: str) -> Any:
        amount = parse(value, key)
        if positive and amount == 0:
            raise ValueError(f"{key}: must be greater than 0")
        return amount

    return convert


def _duration(positive: bool = False) -> Converter:
    return _amount(parse_duration, positive)


def _size(positive: bool = False) -> Converter:
    return _amount(parse_size, positive)


def _domain(value: Any, key: str) -> str:
    text = _string(value, key).lower().rstrip(".")
    labels = text.split(".")
    if not all(labels) or any(c.isspace() or c in "@/:[]<>" for c in text):
        raise ValueError(f"{key}: {value!r} is not a domain name (e.g. example.com)")
    return text


def _hostname(value: Any, key: str) -> str:
    # Same rules as a domain, but keep the case the administrator wrote for EHLO.
    _domain(value, key)
    return _string(value, key)


def _address(value: Any, key: str) -> str:
    text = _string(value, key)
    local, at, domain = text.rpartition("@")
    if not at or not local or not domain or any(c.isspace() or c in "<>" for c in text):
        raise ValueError(f"{key}: {value!r} is not an address like user@example.com")
    return text


def _optional_address(value: Any, key: str) -> str | None:
    return _address(value, key) if _optional_string(value, key) else None


def _optional_domain(value: Any, key: str) -> str | None:
    return _domain(value, key) if _optional_string(value, key) else None


def _optional_rate(value: Any, key: str) -> tuple[int, float] | None:
    return parse_rate(value, key) if _optional_string(value, key) else None


def _list_of(item: Converter, non_empty: bool = False) -> Converter:
    """An array whose items are converted with `item`, reported as key[i]."""

    def convert(value: Any, key: str) -> tuple[Any, ...]:
        items = _expect(value, list, key)
        if non_empty and not items:
            raise ValueError(f"{key}: must not be empty")
        out, errors = [], []
        for i, entry in enumerate(items):
            try:
                out.append(item(entry, f"{key}[{i}]"))
            except ValueError as exc:
                errors.append(str(exc))
        if errors:
            raise ConfigError(errors)
        return tuple(out)

    return convert


def _listen_address(value: Any, key: str) -> tuple[str, int]:
    return parse_hostport(value, 25, key)


def _metrics_listen(value: Any, key: str) -> tuple[str, int] | None:
    if isinstance(value, str) and not value.strip():
        return None  # the default: no endpoint
    return parse_hostport(value, None, key)


def _network(value: Any, key: str) -> ipaddress.IPv4Network | ipaddress.IPv6Network:
    text = _string(value, key)
    try:
        return ipaddress.ip_network(text)  # strict: host bits set is a mistake, not a wish
    except ValueError as exc:
        hint = ""
        with contextlib.suppress(ValueError):  # only when the text is a network at all
            hint = f" (did you mean {ipaddress.ip_network(text, strict=False)}?)"
        raise ValueError(f"{key}: invalid network {value!r}: {exc}{hint}") from None


def _listen(value: Any, key: str) -> tuple[tuple[str, int], ...]:
    addresses = _list_of(_listen_address, non_empty=True)(value, key)
    for i, address in enumerate(addresses):
        if address in addresses[:i]:
            first = addresses.index(address)
            raise ValueError(f"{key}[{i}]: duplicate of {key}[{first}]")
    return addresses


def _aliases(value: Any, key: str) -> tuple[tuple[str, str], ...]:
    table = _expect(value, dict, key, 'a table such as { root = "admin@example.com" }')
    out: dict[str, str] = {}
    errors = []
    for local, target in table.items():
        path = f"{key}.{local}"
        try:
            name = local.strip().lower()
            if not name or "@" in name or any(c.isspace() for c in name):
                raise ValueError(f"{path}: the key must be a local part such as root")
            if name in out:
                raise ValueError(f"{path}: duplicate alias (local parts ignore case)")
            out[name] = _address(target, path)
        except ValueError as exc:
            errors.append(str(exc))
    if errors:
        raise ConfigError(errors)
    return tuple(sorted(out.items()))


# --------------------------------------------------------------------------- schemas
# One entry per TOML key. The TOML key is the field name, except where _FIELD_NAMES says.

_FIELD_NAMES = {"from": "from_address"}

_TOP: Schema = {"hostname": _hostname, "user": _optional_string}

_SMTP: Schema = {
    "listen": _listen,
    "allow": _list_of(_network),
    "max_message_size": _size(positive=True),
    "max_recipients": _integer(1),
    "max_clients": _integer(1),
    "timeout": _duration(positive=True),
    "tls_cert": _optional_string,
    "tls_key": _optional_string,
    "auth_users": _optional_string,
    "bare_newlines": _choice(*BARE_NEWLINES),
    "error_limit": _integer(1),
    "proxy_protocol": _boolean,
    "proxy_from": _list_of(_network),
}
_SPOOL: Schema = {"dir": _string}
_DELIVERY: Schema = {
    "workers": _integer(1, 256),
    "retry_min": _duration(positive=True),
    "retry_max": _duration(positive=True),
    "retry_for": _duration(positive=True),
    "warn_after": _duration(),
    "connect_timeout": _duration(positive=True),
    "timeout": _duration(positive=True),
}
_DSN: Schema = {"from": _address, "return_max": _size(), "postmaster": _optional_address}
_REWRITE: Schema = {
    "aliases": _aliases,
    "masquerade": _optional_domain,
    "force_from": _optional_address,
}
_LOG: Schema = {
    "level": _choice(*LOG_LEVELS),
    "file": _optional_string,
    "format": _choice(*LOG_FORMATS),
}
_REDIS_SCHEMES = ("redis://", "rediss://", "unix://")


def _redis_url(value: Any, key: str) -> str | None:
    url = _optional_string(value, key)
    if url is None:
        return None
    if not url.startswith(_REDIS_SCHEMES):
        raise ValueError(f"{key}: must be a redis://, rediss:// or unix:// URL")
    try:
        _ = urllib.parse.urlsplit(url).port  # raises for a port that is no port
    except ValueError:
        raise ValueError(f"{key}: invalid port in {redacted_url(url)}") from None
    return url


_FLEET: Schema = {
    "redis": _redis_url,
    "redis_password_file": _optional_string,
    "node": _string,
}
_METRICS: Schema = {"listen": _metrics_listen}
_BACKEND: Schema = {
    "name": _string,
    "host": _string,
    "port": _integer(1, 65535),
    "tls": _choice(*TLS_MODES),
    "tls_verify": _boolean,
    "tls_ca": _optional_string,
    "username": _optional_string,
    "password": _optional_string,
    "password_file": _optional_string,
    "password_command": _optional_string,
    "auth": _choice(*AUTH_MECHANISMS),
    "oauth2": lambda value, key: _oauth2(value, key),
    "weight": _integer(1),
    "backup": _boolean,
    "max_connections": _integer(1),
    "rate": _optional_rate,
    "max_fails": _integer(0),
    "fail_timeout": _duration(positive=True),
    "group": _string,
}
_OAUTH2: Schema = {
    "provider": _choice(*OAUTH2_PROVIDERS),
    "tenant": _optional_string,
    "flow": _choice(*OAUTH2_FLOWS),
    "client_id": _optional_string,
    "client_secret_file": _optional_string,
    "refresh_token_file": _optional_string,
    "scope": _optional_string,
    "token_url": _optional_string,
    "device_code_url": _optional_string,
    "authorize_url": _optional_string,
}
_ROUTE: Schema = {
    "sender_domain": _list_of(_domain),
    "recipient_domain": _list_of(_domain),
    "group": _string,
}
# Tables: TOML name (also the Config field) -> (schema, dataclass).
_TABLES: dict[str, tuple[Schema, Callable[..., Any]]] = {
    "smtp": (_SMTP, SmtpConfig),
    "spool": (_SPOOL, SpoolConfig),
    "delivery": (_DELIVERY, DeliveryConfig),
    "dsn": (_DSN, DsnConfig),
    "rewrite": (_REWRITE, RewriteConfig),
    "log": (_LOG, LogConfig),
    "fleet": (_FLEET, FleetConfig),
    "metrics": (_METRICS, MetricsConfig),
}
_ARRAYS = ("backend", "route")
_TOP_KEYS = (*_TOP, *_TABLES, *_ARRAYS)


def _join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


def _unknown_key(path: str, key: str, known: Any) -> str:
    close = difflib.get_close_matches(key, list(known), n=1)
    hint = f" (did you mean {close[0]}?)" if close else ""
    return f"{_join(path, key)}: unknown key{hint}"


def _parse_table(raw: Any, path: str, schema: Schema, errors: list[str]) -> dict[str, Any]:
    """Convert the known keys of one TOML table; report unknown keys and bad values."""
    if not isinstance(raw, dict):
        errors.append(f"{path}: expected a table, got {_type_name(raw)}")
        return {}
    values: dict[str, Any] = {}
    key: str  # a TOML table's keys are strings
    for key, value in raw.items():
        if key not in schema:
            errors.append(_unknown_key(path, key, schema))
            continue
        try:
            values[_FIELD_NAMES.get(key, key)] = schema[key](value, _join(path, key))
        except ConfigError as exc:
            errors.extend(exc.errors)
        except ValueError as exc:
            errors.append(str(exc))
    return values


def _parse_array(raw: Any, name: str, errors: list[str]) -> list[tuple[str, Any]] | None:
    """The entries of a [[name]] array of tables with their key paths; None if malformed."""
    if raw is None:
        return []
    if isinstance(raw, dict):
        errors.append(f"{name}: write [[{name}]] (an array of tables), not [{name}]")
        return None
    if not isinstance(raw, list):
        errors.append(f"{name}: expected [[{name}]] tables, got {_type_name(raw)}")
        return None
    return [(f"{name}[{i}]", entry) for i, entry in enumerate(raw)]


# --------------------------------------------------------------------------- cross-key rules


def _oauth2(raw: Any, key: str) -> OAuth2Config:
    """`[backend.oauth2]`: the table, its rules, the provider's defaults filled in."""
    errors: list[str] = []
    values = _parse_table(raw, key, _OAUTH2, errors)
    if not isinstance(raw, dict):
        raise ConfigError(errors)
    flow, provider_name = values.get("flow"), values.get("provider")
    if "flow" not in raw:
        errors.append(f"{key}.flow: required ({' or '.join(map(_quoted, OAUTH2_FLOWS))})")
    needs = f' for flow "{flow}"' if flow else ""
    if not values.get("client_id") and isinstance(raw.get("client_id", ""), str):
        errors.append(f"{key}.client_id: required{needs}")
    _check_oauth2_flow(key, values, errors)
    provider = OAUTH2_PROVIDERS.get(provider_name or "")
    if provider is None and "provider" not in raw and not values.get("token_url"):
        errors.append(f"{key}.token_url: required without a provider (or set provider)")
    if provider is not None:
        _fill_provider(key, provider_name or "", provider, values, errors)
    elif values.get("tenant"):
        errors.append(f'{key}.tenant: only for provider "microsoft"')
    for url_key in ("token_url", "device_code_url", "authorize_url"):
        problem = _url_problem(values.get(url_key))
        if problem:
            errors.append(f"{key}.{url_key}: {problem}")
    if errors:
        raise ConfigError(errors)
    values.setdefault("scope", "")
    return OAuth2Config(**values)


def _quoted(text: str) -> str:
    return f'"{text}"'


def _check_oauth2_flow(key: str, values: dict[str, Any], errors: list[str]) -> None:
    flow = values.get("flow")
    if flow == "client_credentials":
        if not values.get("client_secret_file"):
            errors.append(f'{key}.client_secret_file: required for flow "client_credentials"')
        if values.get("refresh_token_file"):
            errors.append(f'{key}.refresh_token_file: only for flow "refresh_token"')
    elif flow == "refresh_token" and not values.get("refresh_token_file"):
        errors.append(f'{key}.refresh_token_file: required for flow "refresh_token"')


def _fill_provider(
    key: str, name: str, provider: OAuth2Provider, values: dict[str, Any], errors: list[str]
) -> None:
    """The provider's token URL, scope and `oauth2 authorize` endpoints, where not set."""
    flow = values.get("flow")
    if flow and flow not in provider.scopes:
        offered = " or ".join(map(_quoted, provider.scopes))
        errors.append(f'{key}.flow: provider "{name}" offers {offered} only')
        return
    if name == "google" and not values.get("client_secret_file"):
        # Google's installed-app clients come with a secret that every request needs.
        errors.append(f'{key}.client_secret_file: required for provider "google"')
    tenant = values.get("tenant")
    if name == "microsoft":
        if not tenant:
            errors.append(
                f'{key}.tenant: required for provider "microsoft"'
                " (the directory ID or domain, e.g. contoso.onmicrosoft.com)"
            )
            return
        if not re.fullmatch(r"[A-Za-z0-9.-]+", tenant):
            errors.append(f"{key}.tenant: {tenant!r} is not a tenant ID or domain")
            return
    defaults = {
        "token_url": provider.token_url,
        "scope": provider.scopes.get(flow or "", ""),
        "device_code_url": provider.device_code_url,
        "authorize_url": provider.authorize_url,
    }
    for name_, default in defaults.items():
        if not values.get(name_) and default:
            values[name_] = default.replace("{tenant}", tenant or "")


def _url_problem(url: str | None) -> str | None:
    """Why a token endpoint URL is not acceptable: only https, or http to loopback."""
    if not url:
        return None
    parts = urllib.parse.urlsplit(url)
    if parts.scheme not in ("https", "http") or not parts.hostname:
        return f"{url!r} is not an https:// URL"
    if parts.scheme == "http" and not is_loopback(parts.hostname):
        return "must be https (http only to a loopback host)"
    return None


def _check_smtp(smtp: SmtpConfig, errors: list[str]) -> None:
    if bool(smtp.tls_cert) != bool(smtp.tls_key):
        missing, given = ("tls_key", "tls_cert") if smtp.tls_cert else ("tls_cert", "tls_key")
        errors.append(f"smtp.{missing}: required when smtp.{given} is set")
    if smtp.auth_users and not (smtp.tls_cert and smtp.tls_key):
        errors.append(
            "smtp.auth_users: requires smtp.tls_cert and smtp.tls_key"
            " (AUTH is offered only over TLS)"
        )
    if smtp.proxy_protocol and not smtp.proxy_from:
        errors.append(
            "smtp.proxy_from: required when smtp.proxy_protocol is true"
            " (the proxies allowed to send the PROXY header)"
        )


def _check_fleet(fleet: FleetConfig, errors: list[str]) -> None:
    if fleet.redis and importlib.util.find_spec("redis") is None:
        errors.append("fleet.redis: needs the redis library: pip install 'smarthost[fleet]'")
    if fleet.redis_password_file and not fleet.redis:
        errors.append("fleet.redis_password_file: set only with fleet.redis")


def _check_delivery(delivery: DeliveryConfig, errors: list[str]) -> None:
    if delivery.retry_min > delivery.retry_max:
        errors.append("delivery.retry_min: must not be greater than delivery.retry_max")


def _check_backend(
    path: str, backend: BackendConfig, errors: list[str], oauth2_given: bool = False
) -> None:
    """`oauth2_given`: the file has a [backend.oauth2] (maybe one with errors of its own)."""
    secrets = [key for key in SECRET_KEYS if getattr(backend, key)]
    if len(secrets) > 1:
        errors.append(f"{path}.{secrets[1]}: set only one of {', '.join(SECRET_KEYS)}")
    if secrets and not backend.username:
        errors.append(f"{path}.username: required when {secrets[0]} is set")
    if backend.oauth2 is not None or oauth2_given:
        _check_oauth2_backend(path, backend, secrets, errors)
    elif backend.username and not secrets:
        errors.append(f"{path}.username: needs one of {', '.join(SECRET_KEYS)}")
    if backend.auth != "auto" and not backend.username:
        errors.append(f"{path}.auth: {backend.auth!r} needs a username")
    if backend.tls == "none" and backend.username and not is_loopback(backend.host):
        errors.append(
            f"{path}.tls: credentials would travel in clear;"
            " use starttls or implicit, or a loopback host"
        )
    if ":" in backend.host and not _is_ip(backend.host, version=6):
        errors.append(f"{path}.host: give the port as {path}.port, not in the host")


def _check_oauth2_backend(
    path: str, backend: BackendConfig, secrets: list[str], errors: list[str]
) -> None:
    if backend.auth not in BEARER_MECHANISMS:
        errors.append(f'{path}.auth: must be "xoauth2" or "oauthbearer" with [backend.oauth2]')
    if secrets:
        errors.append(f"{path}.{secrets[0]}: not with [backend.oauth2], which gets the token")
    if not backend.username:
        errors.append(f"{path}.username: required with [backend.oauth2] (the mailbox to send as)")


def _parse_backends(raw: Any, errors: list[str]) -> list[tuple[str, BackendConfig]]:
    entries = _parse_array(raw, "backend", errors)
    if entries == []:
        errors.append("backend: at least one [[backend]] with a host is required")
    backends = []
    for path, entry in entries or ():
        values = _parse_table(entry, path, _BACKEND, errors)
        if "host" not in values:
            if isinstance(entry, dict) and "host" not in entry:
                errors.append(f"{path}.host: required")
            continue
        backend = BackendConfig(**values)
        _check_backend(path, backend, errors, isinstance(entry, dict) and "oauth2" in entry)
        backends.append((path, backend))
    seen: dict[str, str] = {}
    for path, backend in backends:
        if backend.name in seen:
            errors.append(
                f"{path}.name: duplicate name {backend.name!r} (also {seen[backend.name]})"
            )
        seen.setdefault(backend.name, path)
    return backends


def _check_groups(backends: list[tuple[str, BackendConfig]], errors: list[str]) -> set[str]:
    groups: dict[str, list[tuple[str, BackendConfig]]] = {}
    for path, backend in backends:
        groups.setdefault(backend.group, []).append((path, backend))
    if backends and DEFAULT_GROUP not in groups:
        errors.append(f"backend: no backend in group {DEFAULT_GROUP!r}, which unrouted mail uses")
    for group, members in groups.items():
        if all(backend.backup for _, backend in members):
            errors.append(f"{members[0][0]}.backup: group {group!r} has only backup backends")
    return set(groups)


def _parse_routes(raw: Any, groups: set[str], errors: list[str]) -> list[RouteConfig]:
    routes = []
    for path, entry in _parse_array(raw, "route", errors) or ():
        values = _parse_table(entry, path, _ROUTE, errors)
        if isinstance(entry, dict) and not (
            entry.get("sender_domain") or entry.get("recipient_domain")
        ):
            errors.append(f"{path}: set sender_domain or recipient_domain (or both)")
        if "group" not in values:
            if isinstance(entry, dict) and "group" not in entry:
                errors.append(f"{path}.group: required")
            continue
        # Without any backend at all, "backend:" already says so; don't pile on.
        if groups and values["group"] not in groups:
            errors.append(f"{path}.group: no backend in group {values['group']!r}")
        routes.append(RouteConfig(**values))
    return routes


# --------------------------------------------------------------------------- entry points


def parse_config(data: dict, path: str = "<config>") -> Config:
    """Validate an already loaded TOML document; raise ConfigError listing every problem."""
    errors: list[str] = []
    if not isinstance(data, dict):
        raise ConfigError([f"{path}: expected a TOML document (a table)"])
    for key in data:
        if key not in _TOP_KEYS:
            errors.append(_unknown_key("", key, _TOP_KEYS))
    top = _parse_table({k: v for k, v in data.items() if k in _TOP}, "", _TOP, errors)
    tables = {}
    for name, (schema, cls) in _TABLES.items():
        tables[name] = cls(**_parse_table(data.get(name, {}), name, schema, errors))
    _check_smtp(tables["smtp"], errors)
    _check_delivery(tables["delivery"], errors)
    _check_fleet(tables["fleet"], errors)
    backends = _parse_backends(data.get("backend"), errors)
    groups = _check_groups(backends, errors)
    routes = _parse_routes(data.get("route"), groups, errors)
    if errors:
        raise ConfigError(errors)
    return Config(
        **top,
        **tables,
        backends=tuple(backend for _, backend in backends),
        routes=tuple(routes),
        path=str(path),
    )


def load_config(path: str | os.PathLike) -> Config:
    """Read and validate a TOML config file; any problem raises ConfigError naming the file."""
    name = os.fspath(path)
    try:
        with open(name, "rb") as f:
            data = tomllib.load(f)
    except OSError as exc:
        raise ConfigError([f"{name}: cannot read: {exc.strerror or exc}"]) from exc
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError([f"{name}: TOML syntax error: {exc}"]) from exc
    except UnicodeDecodeError as exc:
        raise ConfigError([f"{name}: not valid UTF-8 ({exc.reason})"]) from exc
    return parse_config(data, name)


def default_config_path(cli_value: str | None) -> str:
    """-c/-C FILE, else $SMARTHOST_CONFIG, else /etc/smarthost/smarthost.toml."""
    return cli_value or os.environ.get(CONFIG_ENV) or DEFAULT_CONFIG_PATH


# --------------------------------------------------------------------------- check helpers


def _readable_by_others(label: str, path: str | None) -> str | None:
    if not path:
        return None
    try:
        mode = stat.S_IMODE(os.stat(path).st_mode)
    except (OSError, ValueError):
        return None  # a missing file is reported where it is used, not here
    if mode & 0o044:
        return f"{label} {path} is readable by other users (mode {mode:04o}); chmod 600 it"
    return None


def _oauth2_secret_files(path: str, backend: BackendConfig) -> list[tuple[str, str | None]]:
    if backend.oauth2 is None:
        return []
    files = ("client_secret_file", "refresh_token_file")
    return [(f"{path}.oauth2.{key}", getattr(backend.oauth2, key)) for key in files]


def config_warnings(cfg: Config) -> list[str]:
    """Secrets readable by other users: the config (if it holds a password), secret files."""
    candidates = [("smtp.tls_key", cfg.smtp.tls_key), ("smtp.auth_users", cfg.smtp.auth_users)]
    if any(backend.password for backend in cfg.backends):
        candidates.insert(0, ("config file", cfg.path))
    for i, backend in enumerate(cfg.backends):
        candidates.extend(_oauth2_secret_files(f"backend[{i}]", backend))
        candidates.append((f"backend[{i}].password_file", backend.password_file))
    candidates.append(("fleet.redis_password_file", cfg.fleet.redis_password_file))
    warnings = [_readable_by_others(label, path) for label, path in candidates]
    return [w for w in warnings if w]


def _fmt_duration(seconds: float) -> str:
    for suffix, unit in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= unit and seconds % unit == 0:
            return f"{int(seconds // unit)}{suffix}"
    return f"{seconds:g}s"


def _fmt_size(size: int) -> str:
    for suffix, unit in (("G", 2**30), ("M", 2**20), ("K", 2**10)):
        if size >= unit and size % unit == 0:
            return f"{size // unit}{suffix}"
    return str(size)


def _describe_backend(backend: BackendConfig) -> str:
    address = format_hostport(backend.host, backend.port)
    parts = [
        backend.name if backend.name == address else f"{backend.name} {address}",
        f"tls={backend.tls}" + ("" if backend.tls_verify else " (unverified)"),
        f"group={backend.group}",
        f"weight={backend.weight}",
    ]
    if backend.backup:
        parts.append("backup")
    if backend.oauth2 is not None:
        oauth2 = backend.oauth2
        parts.append(
            f"auth={backend.auth} user={backend.username} oauth2={oauth2.flow}"
            f" client_id={oauth2.client_id} token_url={oauth2.token_url}"
        )
    elif backend.username:
        # Name where the secret comes from, never the secret (nor the command, which
        # may embed one).
        source = next((key for key in SECRET_KEYS if getattr(backend, key)), "none")
        where = f" {backend.password_file}" if source == "password_file" else ""
        parts.append(f"auth={backend.auth} user={backend.username} secret={source}{where}")
    if backend.rate:
        count, period = backend.rate
        unit = {1.0: "s", 60.0: "m", 3600.0: "h"}.get(period) or _fmt_duration(period)
        parts.append(f"rate={count}/{unit}")
    return "  " + " ".join(parts)


def redacted_url(url: str) -> str:
    """A Redis URL without the credentials it may hold (never shown, never logged)."""
    scheme, sep, rest = url.partition("://")
    _, at, host = rest.rpartition("@")
    return f"{scheme}{sep}***@{host}" if at else url


def _describe_route(index: int, route: RouteConfig) -> str:
    match = []
    if route.sender_domain:
        match.append("sender " + ",".join(route.sender_domain))
    if route.recipient_domain:
        match.append("recipient " + ",".join(route.recipient_domain))
    return f"  route[{index}]: {' or '.join(match)} -> group {route.group}"


def _describe_metrics(metrics: MetricsConfig) -> str:
    if metrics.listen is None:
        return "off"
    return f"http://{format_hostport(*metrics.listen)}/metrics, /healthz, /readyz"


def summary(cfg: Config) -> str:
    """A human summary for `smarthost check`. Never includes a password."""
    smtp, delivery, dsn, rewrite = cfg.smtp, cfg.delivery, cfg.dsn, cfg.rewrite
    warn = _fmt_duration(delivery.warn_after) if delivery.warn_after else "never"
    lines = [
        f"config:    {cfg.path}",
        f"hostname:  {cfg.hostname}" + (f" (runs as {cfg.user})" if cfg.user else ""),
        "listen:    " + ", ".join(format_hostport(h, p) for h, p in smtp.listen),
        "allow:     " + (", ".join(str(n) for n in smtp.allow) or "nobody without AUTH"),
        "starttls:  " + (f"cert {smtp.tls_cert} key {smtp.tls_key}" if smtp.tls_cert else "off"),
        f"auth:      {'users from ' + smtp.auth_users if smtp.auth_users else 'off'}",
        f"limits:    message {_fmt_size(smtp.max_message_size)},"
        f" {smtp.max_recipients} recipients, {smtp.max_clients} clients",
        f"spool:     {cfg.spool.dir}",
        f"delivery:  {delivery.workers} workers, retry {_fmt_duration(delivery.retry_min)}"
        f"..{_fmt_duration(delivery.retry_max)} for {_fmt_duration(delivery.retry_for)},"
        f" delay warning after {warn}",
        f"dsn:       from {dsn.from_address}, full original up to {_fmt_size(dsn.return_max)},"
        f" double bounces to {dsn.postmaster or 'the log only'}",
        f"rewrite:   {len(rewrite.aliases)} aliases, masquerade {rewrite.masquerade or 'off'},"
        f" force_from {rewrite.force_from or 'off'}",
        f"log:       {cfg.log.level} {cfg.log.format} to {cfg.log.file or 'stderr'}",
        "proxy:     "
        + (
            "PROXY protocol from " + ", ".join(str(n) for n in smtp.proxy_from)
            if smtp.proxy_protocol
            else "off"
        ),
        "fleet:     "
        + (
            f"node {cfg.fleet.node}, redis {redacted_url(cfg.fleet.redis)}"
            if cfg.fleet.redis
            else "off"
        ),
        "metrics:   " + _describe_metrics(cfg.metrics),
        f"backends:  {len(cfg.backends)}",
        *(_describe_backend(backend) for backend in cfg.backends),
        f"routes:    {len(cfg.routes)} (unmatched mail: group {DEFAULT_GROUP})",
        *(_describe_route(i, route) for i, route in enumerate(cfg.routes)),
    ]
    return "\n".join(lines)
