"""Tests for smarthost.config: the SPEC §3 example, defaults, key-path errors, parsers."""

from __future__ import annotations

import ipaddress
import os
import textwrap

import pytest

from smarthost import config
from smarthost.config import (
    BackendConfig,
    ConfigError,
    RouteConfig,
    config_warnings,
    default_config_path,
    load_config,
    parse_duration,
    parse_hostport,
    parse_rate,
    parse_size,
    summary,
)

MINIMAL = """
[[backend]]
host = "smtp.example.com"
"""

SPEC_EXAMPLE = """
hostname = "relay.example.com"
user = "smarthost"

[smtp]
listen = ["127.0.0.1:25", "[::1]:25"]
allow = ["127.0.0.0/8", "::1/128"]
max_message_size = "25M"
max_recipients = 100
max_clients = 100
timeout = "5m"
tls_cert = "/etc/smarthost/cert.pem"
tls_key = "/etc/smarthost/key.pem"
auth_users = "/etc/smarthost/users"

[spool]
dir = "/var/spool/smarthost"

[delivery]
workers = 8
retry_min = "1m"
retry_max = "1h"
retry_for = "5d"
warn_after = "4h"
connect_timeout = "30s"
timeout = "5m"

[dsn]
from = "MAILER-DAEMON@relay.example.com"
return_max = "1M"
postmaster = "admin@example.com"

[rewrite]
aliases = { root = "admin@example.com", postmaster = "admin@example.com" }
masquerade = "example.com"
force_from = ""

[[backend]]
name = "primary"
host = "smtp1.example.com"
port = 587
tls = "starttls"
tls_verify = true
tls_ca = "/etc/ssl/certs/internal-ca.pem"
username = "mycompany"
password_file = "SECRET_FILE"
weight = 60
backup = false
max_connections = 4
rate = "250/h"
max_fails = 1
fail_timeout = "30s"
group = "default"

[[backend]]
host = "smtp2.example.com"
group = "shop"

[[route]]
sender_domain = ["shop.example.com"]
recipient_domain = []
group = "shop"

[log]
level = "info"
file = ""
format = "json"
"""


@pytest.fixture(autouse=True)
def fixed_fqdn(monkeypatch):
    """A deterministic (and DNS-free, hence fast) default hostname."""
    monkeypatch.setattr(config.socket, "getfqdn", lambda: "host.test")


def write(tmp_path, text, name="smarthost.toml"):
    path = tmp_path / name
    path.write_text(textwrap.dedent(text))
    return path


def load(tmp_path, text):
    return load_config(write(tmp_path, text))


def errors_of(tmp_path, text):
    with pytest.raises(ConfigError) as info:
        load(tmp_path, text)
    assert str(info.value) == "\n".join(info.value.errors)
    return info.value.errors


# ---------------------------------------------------------------- the documented shapes


def test_spec_example_parses_with_exact_values(tmp_path):
    secret = tmp_path / "primary.secret"
    secret.write_text("s3cret\n")
    cfg = load(tmp_path, SPEC_EXAMPLE.replace("SECRET_FILE", str(secret)))

    assert cfg.hostname == "relay.example.com"
    assert cfg.user == "smarthost"
    assert cfg.path == str(tmp_path / "smarthost.toml")
    assert cfg.smtp.listen == (("127.0.0.1", 25), ("::1", 25))
    assert cfg.smtp.allow == (
        ipaddress.ip_network("127.0.0.0/8"),
        ipaddress.ip_network("::1/128"),
    )
    assert cfg.smtp.max_message_size == 25 * 2**20
    assert (cfg.smtp.max_recipients, cfg.smtp.max_clients, cfg.smtp.timeout) == (100, 100, 300.0)
    assert cfg.smtp.tls_cert == "/etc/smarthost/cert.pem"
    assert cfg.smtp.tls_key == "/etc/smarthost/key.pem"
    assert cfg.smtp.auth_users == "/etc/smarthost/users"
    assert cfg.spool.dir == "/var/spool/smarthost"
    d = cfg.delivery
    assert (d.workers, d.retry_min, d.retry_max, d.retry_for) == (8, 60.0, 3600.0, 432000.0)
    assert (d.warn_after, d.connect_timeout, d.timeout) == (14400.0, 30.0, 300.0)
    assert cfg.dsn.from_address == "MAILER-DAEMON@relay.example.com"
    assert cfg.dsn.return_max == 2**20
    assert cfg.dsn.postmaster == "admin@example.com"
    assert cfg.rewrite.aliases == (
        ("postmaster", "admin@example.com"),
        ("root", "admin@example.com"),
    )
    assert cfg.rewrite.alias_map() == {
        "root": "admin@example.com",
        "postmaster": "admin@example.com",
    }
    assert cfg.rewrite.masquerade == "example.com"
    assert cfg.rewrite.force_from is None

    primary, shop = cfg.backends
    assert primary == BackendConfig(
        name="primary",
        host="smtp1.example.com",
        port=587,
        tls="starttls",
        tls_verify=True,
        tls_ca="/etc/ssl/certs/internal-ca.pem",
        username="mycompany",
        password_file=str(secret),
        weight=60,
        rate=(250, 3600.0),
        group="default",
    )
    assert (primary.auth, primary.max_connections, primary.max_fails) == ("auto", 4, 1)
    assert primary.fail_timeout == 30.0 and primary.backup is False
    assert (shop.name, shop.port, shop.group) == ("smtp2.example.com:587", 587, "shop")
    assert cfg.routes == (RouteConfig(sender_domain=("shop.example.com",), group="shop"),)
    assert (cfg.log.level, cfg.log.file, cfg.log.format) == ("info", None, "json")


def test_minimal_config_gets_every_default(tmp_path):
    cfg = load(tmp_path, MINIMAL)

    assert cfg.hostname == "host.test"
    assert cfg.user is None
    assert cfg.smtp.listen == (("127.0.0.1", 25),)
    assert [str(n) for n in cfg.smtp.allow] == ["127.0.0.0/8", "::1/128"]
    assert cfg.smtp.max_message_size == 26214400
    assert (cfg.smtp.max_recipients, cfg.smtp.max_clients, cfg.smtp.timeout) == (100, 100, 300.0)
    assert (cfg.smtp.tls_cert, cfg.smtp.tls_key, cfg.smtp.auth_users) == (None, None, None)
    assert cfg.spool.dir == "/var/spool/smarthost"
    d = cfg.delivery
    assert (d.workers, d.retry_min, d.retry_max, d.retry_for) == (8, 60.0, 3600.0, 432000.0)
    assert (d.warn_after, d.connect_timeout, d.timeout) == (14400.0, 30.0, 300.0)
    assert cfg.dsn.from_address == "MAILER-DAEMON@host.test"
    assert (cfg.dsn.return_max, cfg.dsn.postmaster) == (1048576, None)
    assert cfg.rewrite.aliases == () and cfg.rewrite.alias_map() == {}
    assert (cfg.rewrite.masquerade, cfg.rewrite.force_from) == (None, None)
    assert cfg.routes == ()
    assert (cfg.log.level, cfg.log.file, cfg.log.format) == ("info", None, "json")
    (b,) = cfg.backends
    assert (b.name, b.host, b.port, b.tls, b.tls_verify) == (
        "smtp.example.com:587",
        "smtp.example.com",
        587,
        "starttls",
        True,
    )
    assert (b.tls_ca, b.username, b.password, b.password_file, b.password_command) == (None,) * 5
    assert (b.auth, b.weight, b.backup, b.max_connections, b.rate) == ("auto", 1, False, 4, None)
    assert (b.max_fails, b.fail_timeout, b.group) == (1, 30.0, "default")


@pytest.mark.parametrize(
    ("tls", "port", "name"),
    [("starttls", 587, "h.example:587"), ("implicit", 465, "h.example:465"), ("none", 25, None)],
)
def test_port_and_name_default_from_tls(tmp_path, tls, port, name):
    cfg = load(tmp_path, f'[[backend]]\nhost = "h.example"\ntls = "{tls}"\n')
    assert cfg.backends[0].port == port
    assert cfg.backends[0].name == (name or f"h.example:{port}")


def test_ipv6_backend_name_is_bracketed(tmp_path):
    cfg = load(tmp_path, '[[backend]]\nhost = "::1"\ntls = "none"\n')
    assert cfg.backends[0].name == "[::1]:25"


def test_case_folding_and_empty_strings(tmp_path):
    cfg = load(
        tmp_path,
        """
        user = ""
        [log]
        level = "DEBUG"
        format = "Text"
        [rewrite]
        aliases = { Root = "a@example.com" }
        [[backend]]
        host = "a.example"
        [[route]]
        recipient_domain = ["Example.COM"]
        group = "default"
        """,
    )
    assert cfg.user is None
    assert (cfg.log.level, cfg.log.format) == ("debug", "text")
    assert cfg.rewrite.alias_map() == {"root": "a@example.com"}
    assert cfg.routes[0].recipient_domain == ("example.com",)


def test_durations_accept_integer_seconds_and_allow_may_be_empty(tmp_path):
    cfg = load(
        tmp_path,
        """
        [smtp]
        allow = []
        [delivery]
        retry_min = 90
        warn_after = "0"
        """
        + MINIMAL,
    )
    assert cfg.smtp.allow == ()
    assert (cfg.delivery.retry_min, cfg.delivery.warn_after) == (90.0, 0.0)


def test_config_is_frozen_and_repr_hides_password(tmp_path):
    cfg = load(
        tmp_path,
        '[[backend]]\nhost = "a.example"\nusername = "u"\npassword = "hunter2"\n',
    )
    assert cfg.backends[0].password == "hunter2"
    assert "hunter2" not in repr(cfg)
    with pytest.raises(AttributeError):
        cfg.hostname = "other"  # type: ignore[misc]


# ---------------------------------------------------------------- errors name their key


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        pytest.param(
            "[smtp]\nmax_client = 5\n",
            "smtp.max_client: unknown key (did you mean max_clients?)",
            id="unknown-key",
        ),
        pytest.param("hostnme = 'x'\n", "hostnme: unknown key (did you mean hostname?)", id="top"),
        pytest.param(
            "[smtp]\nmax_clients = 'many'\n",
            "smtp.max_clients: expected an integer, got string",
            id="wrong-type",
        ),
        pytest.param(
            "[smtp]\nmax_clients = 5.0\n",
            "smtp.max_clients: expected an integer, got float",
            id="float-for-int",
        ),
        pytest.param(
            "[smtp]\nmax_clients = true\n",
            "smtp.max_clients: expected an integer, got boolean",
            id="bool-for-int",
        ),
        pytest.param(
            "[delivery]\nretry_min = '5x'\n",
            "delivery.retry_min: invalid duration '5x' (use e.g. 30s, 5m, 4h, 5d)",
            id="duration",
        ),
        pytest.param(
            "[smtp]\nmax_message_size = '25Q'\n",
            "smtp.max_message_size: invalid size '25Q' (use e.g. 512K, 25M, 1G)",
            id="size",
        ),
        pytest.param("[smtp]\nmax_message_size = 0\n", "smtp.max_message_size: must be", id="0"),
        pytest.param(
            "[delivery]\nworkers = 0\n", "delivery.workers: must be between 1 and 256", id="range"
        ),
        pytest.param(
            "[smtp]\nlisten = ['127.0.0.1:25', '::1:25']\n",
            "smtp.listen[1]: invalid address '::1:25': IPv6 addresses must be in brackets",
            id="listen-ipv6",
        ),
        pytest.param(
            "[smtp]\nlisten = ['127.0.0.1:99999']\n",
            "smtp.listen[0]: invalid address '127.0.0.1:99999'",
            id="listen-port",
        ),
        pytest.param("[smtp]\nlisten = []\n", "smtp.listen: must not be empty", id="listen-empty"),
        pytest.param(
            "[smtp]\nlisten = ['a:25', 'a:25']\n",
            "smtp.listen[1]: duplicate of smtp.listen[0]",
            id="listen-dup",
        ),
        pytest.param(
            "[smtp]\nallow = ['127.0.0.1', '10.0.0.1/8']\n",
            "smtp.allow[1]: invalid network '10.0.0.1/8': 10.0.0.1/8 has host bits set"
            " (did you mean 10.0.0.0/8?)",
            id="allow-host-bits",
        ),
        pytest.param(
            "[smtp]\nallow = ['nowhere']\n", "smtp.allow[0]: invalid network 'nowhere'", id="allow"
        ),
        pytest.param(
            "[smtp]\ntls_cert = '/c.pem'\n",
            "smtp.tls_key: required when smtp.tls_cert is set",
            id="cert-without-key",
        ),
        pytest.param(
            "[smtp]\nauth_users = '/u'\n",
            "smtp.auth_users: requires smtp.tls_cert and smtp.tls_key"
            " (AUTH is offered only over TLS)",
            id="auth-without-tls",
        ),
        pytest.param(
            "[delivery]\nretry_min = '2h'\n",
            "delivery.retry_min: must not be greater than delivery.retry_max",
            id="retry-order",
        ),
        pytest.param(
            "[dsn]\nfrom = 'nobody'\n", "dsn.from: 'nobody' is not an address", id="dsn-from"
        ),
        pytest.param(
            "[rewrite]\naliases = { root = '' }\n",
            "rewrite.aliases.root: must not be empty",
            id="alias-empty",
        ),
        pytest.param(
            "[log]\nlevel = 'loud'\n",
            "log.level: must be one of debug, info, warning, error; got 'loud'",
            id="choice",
        ),
        pytest.param("smtp = 5\n", "smtp: expected a table, got integer", id="table-type"),
    ],
)
def test_error_names_its_key(tmp_path, text, expected):
    errors = errors_of(tmp_path, text + MINIMAL)
    assert any(e.startswith(expected) for e in errors), errors


@pytest.mark.parametrize(
    ("backend", "expected"),
    [
        pytest.param("weight = 0", "backend[0].weight: must be a positive integer", id="weight"),
        pytest.param("rate = '5/fortnight'", "backend[0].rate: invalid rate '5/fortnight'", id="r"),
        pytest.param("port = 0", "backend[0].port: must be between 1 and 65535", id="port"),
        pytest.param("tls = 'ssl'", "backend[0].tls: must be one of starttls", id="tls"),
        pytest.param(
            "password_file = '/s'",
            "backend[0].username: required when password_file is set",
            id="secret-without-username",
        ),
        pytest.param(
            "username = 'u'",
            "backend[0].username: needs one of password, password_file, password_command",
            id="username-without-secret",
        ),
        pytest.param(
            "username = 'u'\npassword = 'p'\npassword_file = '/s'",
            "backend[0].password_file: set only one of password",
            id="two-secrets",
        ),
        pytest.param(
            "tls = 'none'\nusername = 'u'\npassword_file = '/s'",
            "backend[0].tls: credentials would travel in clear;"
            " use starttls or implicit, or a loopback host",
            id="cleartext-credentials",
        ),
        pytest.param(
            "auth = 'plain'", "backend[0].auth: 'plain' needs a username", id="auth-no-user"
        ),
        pytest.param("backup = true", "backend[0].backup: group 'default' has only", id="backup"),
        pytest.param("max_fails = -1", "backend[0].max_fails: must not be negative", id="fails"),
        pytest.param(
            "grop = 'x'", "backend[0].grop: unknown key (did you mean group?)", id="unknown"
        ),
    ],
)
def test_backend_error_names_its_key(tmp_path, backend, expected):
    errors = errors_of(tmp_path, f'[[backend]]\nhost = "a.example"\n{backend}\n')
    assert any(e.startswith(expected) for e in errors), errors


@pytest.mark.parametrize("host", ["127.0.0.1", "127.8.9.10", "::1", "localhost", "LOCALHOST."])
def test_cleartext_credentials_allowed_to_loopback(tmp_path, host):
    cfg = load(
        tmp_path,
        f'[[backend]]\nhost = "{host}"\ntls = "none"\nusername = "u"\npassword = "p"\n',
    )
    assert cfg.backends[0].port == 25


def test_missing_host(tmp_path):
    errors = errors_of(tmp_path, "[[backend]]\nport = 25\n" + MINIMAL)
    assert errors == ["backend[0].host: required"]


def test_duplicate_backend_name(tmp_path):
    errors = errors_of(tmp_path, MINIMAL + '[[backend]]\nhost = "b"\nname = "smtp.example.com:587"')
    assert errors == ["backend[1].name: duplicate name 'smtp.example.com:587' (also backend[0])"]


def test_no_backend_at_all(tmp_path):
    errors = errors_of(tmp_path, 'hostname = "relay.example.com"\n')
    assert errors == ["backend: at least one [[backend]] with a host is required"]


def test_backend_written_as_table(tmp_path):
    errors = errors_of(tmp_path, '[backend]\nhost = "a.example"\n')
    assert errors == ["backend: write [[backend]] (an array of tables), not [backend]"]


def test_route_to_unknown_group(tmp_path):
    errors = errors_of(tmp_path, MINIMAL + '[[route]]\nsender_domain = ["x.example"]\ngroup = "x"')
    assert errors == ["route[0].group: no backend in group 'x'"]


def test_route_needs_a_domain(tmp_path):
    errors = errors_of(tmp_path, MINIMAL + '[[route]]\nsender_domain = []\ngroup = "default"')
    assert errors == ["route[0]: set sender_domain or recipient_domain (or both)"]


def test_no_default_group(tmp_path):
    errors = errors_of(tmp_path, '[[backend]]\nhost = "a.example"\ngroup = "shop"\n')
    assert errors == ["backend: no backend in group 'default', which unrouted mail uses"]


def test_several_errors_are_reported_together(tmp_path):
    errors = errors_of(
        tmp_path,
        """
        [smtp]
        max_client = 5
        timeout = "soon"
        [delivery]
        workers = "8"
        [rewrite]
        aliases = { root = "", abuse = "nobody" }
        [[backend]]
        host = "a.example"
        weight = -1
        [[backend]]
        tls = "none"
        """,
    )
    assert errors == [
        "smtp.max_client: unknown key (did you mean max_clients?)",
        "smtp.timeout: invalid duration 'soon' (use e.g. 30s, 5m, 4h, 5d)",
        "delivery.workers: expected an integer, got string",
        "rewrite.aliases.root: must not be empty",
        "rewrite.aliases.abuse: 'nobody' is not an address like user@example.com",
        "backend[0].weight: must be a positive integer",
        "backend[1].host: required",
    ]


def test_toml_syntax_error_names_file_and_line(tmp_path):
    path = write(tmp_path, '[[backend]]\nhost = "a.example"\nweight = \n')
    with pytest.raises(ConfigError) as info:
        load_config(path)
    (message,) = info.value.errors
    assert message.startswith(f"{path}: TOML syntax error")
    assert "line 3" in message


def test_missing_file_names_file(tmp_path):
    path = tmp_path / "nope.toml"
    with pytest.raises(ConfigError, match=r"nope\.toml: cannot read: No such file"):
        load_config(path)


# ---------------------------------------------------------------- value parsers


@pytest.mark.parametrize(
    ("value", "seconds"),
    [
        ("0", 0.0),
        ("30", 30.0),
        ("30s", 30.0),
        ("5m", 300.0),
        ("4h", 14400.0),
        ("5d", 432000.0),
        ("2w", 1209600.0),
        ("1.5h", 5400.0),
        (" 10 s ", 10.0),
        (0, 0.0),
        (45, 45.0),
        (2.5, 2.5),
    ],
)
def test_parse_duration(value, seconds):
    assert parse_duration(value) == seconds


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("-1", "negative"),
        (-1, "negative"),
        ("1.5x", "invalid duration '1.5x'"),
        ("", "invalid duration"),
        ("5 minutes", "invalid duration"),
        (True, "got boolean"),
        ([1], "got array"),
        (float("inf"), "finite"),
    ],
)
def test_parse_duration_rejects(value, message):
    with pytest.raises(ValueError, match=message) as info:
        parse_duration(value, "delivery.timeout")
    assert str(info.value).startswith("delivery.timeout: ")


@pytest.mark.parametrize(
    ("value", "size"),
    [
        ("0", 0),
        ("100", 100),
        (100, 100),
        ("512K", 524288),
        ("25M", 26214400),
        ("25m", 26214400),
        ("1G", 1073741824),
        ("1GB", 1073741824),
        ("2kb", 2048),
    ],
)
def test_parse_size(value, size):
    assert parse_size(value) == size


@pytest.mark.parametrize("value", ["-1", -1, "1.5x", "M", True, 1.5, ""])
def test_parse_size_rejects(value):
    with pytest.raises(ValueError, match=r"^dsn\.return_max: "):
        parse_size(value, "dsn.return_max")


@pytest.mark.parametrize(
    ("value", "rate"),
    [("250/h", (250, 3600.0)), ("10/s", (10, 1.0)), ("100/m", (100, 60.0)), ("5 / min", (5, 60.0))],
)
def test_parse_rate(value, rate):
    assert parse_rate(value) == rate


@pytest.mark.parametrize("value", ["250", "0/h", "-1/h", "5/d", "x/h", 250, True])
def test_parse_rate_rejects(value):
    with pytest.raises(ValueError, match=r"^rate: "):
        parse_rate(value)


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("127.0.0.1:25", ("127.0.0.1", 25)),
        ("[::1]:25", ("::1", 25)),
        ("[::1]", ("::1", 587)),
        ("localhost:2525", ("localhost", 2525)),
        ("0.0.0.0:0", ("0.0.0.0", 0)),
        ("mail.example.com", ("mail.example.com", 587)),
    ],
)
def test_parse_hostport(value, expected):
    assert parse_hostport(value, 587) == expected


@pytest.mark.parametrize(
    "value",
    ["::1", "::1:25", "[::1", "[::1]x", "[nothost]:25", ":25", "a:b", "a:-1", "a:70000", "a b", 25],
)
def test_parse_hostport_rejects(value):
    with pytest.raises(ValueError, match=r"^smtp\.listen\[0\]: "):
        parse_hostport(value, 25, "smtp.listen[0]")


def test_default_config_path(monkeypatch):
    monkeypatch.delenv("SMARTHOST_CONFIG", raising=False)
    assert default_config_path(None) == "/etc/smarthost/smarthost.toml"
    monkeypatch.setenv("SMARTHOST_CONFIG", "/env.toml")
    assert default_config_path(None) == "/env.toml"
    assert default_config_path("/cli.toml") == "/cli.toml"


# ---------------------------------------------------------------- check helpers


def _config_with_secret_file(tmp_path, mode):
    secret = tmp_path / "primary.secret"
    secret.write_text("s3cret\n")
    os.chmod(secret, mode)
    path = write(
        tmp_path,
        f'[[backend]]\nhost = "a.example"\nusername = "u"\npassword_file = "{secret}"\n',
    )
    os.chmod(path, 0o644)  # no password in it: its mode does not matter
    return load_config(path), secret


def test_warns_about_world_readable_password_file(tmp_path):
    cfg, secret = _config_with_secret_file(tmp_path, 0o644)
    assert config_warnings(cfg) == [
        f"backend[0].password_file {secret} is readable by other users (mode 0644); chmod 600 it"
    ]


def test_no_warning_for_private_password_file(tmp_path):
    cfg, _ = _config_with_secret_file(tmp_path, 0o600)
    assert config_warnings(cfg) == []


def test_warns_about_readable_config_holding_a_password(tmp_path):
    path = write(tmp_path, '[[backend]]\nhost = "a.example"\nusername = "u"\npassword = "p"\n')
    os.chmod(path, 0o640)
    assert config_warnings(load_config(path)) == [
        f"config file {path} is readable by other users (mode 0640); chmod 600 it"
    ]
    os.chmod(path, 0o600)
    assert config_warnings(load_config(path)) == []


def test_missing_secret_file_is_not_a_warning(tmp_path):
    cfg = load(
        tmp_path,
        '[[backend]]\nhost = "a.example"\nusername = "u"\npassword_file = "/nonexistent/s"\n',
    )
    assert config_warnings(cfg) == []


def test_summary_lists_backends_and_never_the_password(tmp_path):
    cfg = load(
        tmp_path,
        """
        [[backend]]
        name = "primary"
        host = "smtp1.example.com"
        username = "mycompany"
        password = "hunter2-very-secret"
        weight = 60
        [[backend]]
        host = "smtp2.example.com"
        tls = "implicit"
        backup = true
        [[backend]]
        host = "shop.example.net"
        group = "shop"
        [[route]]
        sender_domain = ["shop.example.com"]
        group = "shop"
        """,
    )
    text = summary(cfg)
    assert "hunter2" not in text
    assert "primary smtp1.example.com:587 tls=starttls group=default weight=60" in text
    assert "  smtp2.example.com:465 tls=implicit group=default weight=1 backup\n" in text
    assert "  shop.example.net:587 tls=starttls group=shop weight=1\n" in text
    assert "route[0]: sender shop.example.com -> group shop" in text
    assert "listen:    127.0.0.1:25" in text
    assert "spool:     /var/spool/smarthost" in text
    assert "8 workers" in text
