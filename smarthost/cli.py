"""Command-line entry points (`smarthost`, `smarthost-sendmail`) and their exit codes."""

from __future__ import annotations

import argparse
import errno
import logging
import sys
from collections.abc import Sequence

from . import __version__, log
from .config import (
    Config,
    ConfigError,
    config_warnings,
    default_config_path,
    load_config,
    summary,
)

# sysexits.h
EX_OK = 0
EX_USAGE = 64
EX_UNAVAILABLE = 69
EX_CANTCREAT = 73
EX_TEMPFAIL = 75
EX_CONFIG = 78


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="smarthost",
        description="A store-and-forward SMTP relay to upstream smarthosts.",
    )
    parser.add_argument(
        "-c",
        "--config",
        metavar="FILE",
        help="config file (default: $SMARTHOST_CONFIG, else /etc/smarthost/smarthost.toml)",
    )
    parser.add_argument("--version", action="version", version=f"smarthost {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    commands.add_parser("serve", help="run the relay in the foreground")
    passwd = commands.add_parser("passwd", help="print a user:hash line for smtp.auth_users")
    passwd.add_argument("user", nargs="?", help="the SMTP login (default: your user name)")
    queue = commands.add_parser("queue", help="list and steer spooled messages")
    queue.add_argument("--json", action="store_true", help="list: one JSON object per line")
    actions = queue.add_subparsers(dest="action", metavar="ACTION")
    listing = actions.add_parser("list", help="list spooled messages (the default)")
    listing.add_argument("--json", action="store_true", dest="list_json")
    actions.add_parser("show", help="envelope, history and headers").add_argument("id")
    for name, text in (
        ("flush", "retry now (all waiting messages when no ID is given)"),
        ("hold", "park messages: never attempted while held"),
        ("release", "put held messages back, due now"),
        ("delete", "remove messages without a DSN"),
        ("bounce", "give up now: fail the remaining recipients with a DSN"),
    ):
        actions.add_parser(name, help=text).add_argument(
            "ids", nargs="*" if name == "flush" else "+", metavar="ID"
        )
    sendmail = commands.add_parser(
        "sendmail", help="sendmail-compatible submission (see smarthost-sendmail(8))"
    )
    sendmail.add_argument("args", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
    check = commands.add_parser("check", help="validate the config and print a summary")
    check.add_argument(
        "--connect",
        action="store_true",
        help="also open a session to every backend and report each step",
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    sendmail_args = _sendmail_command(argv)
    if sendmail_args is not None:
        # sendmail's own option syntax (-fADDR, -oi, ...) is not argparse's.
        return sendmail_main(sendmail_args)
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:
        return EX_USAGE if exc.code not in (0, None) else EX_OK
    if args.command == "passwd":
        return passwd(args.user)
    path = default_config_path(args.config)
    if args.command == "check":
        return check(path, args.connect)
    if args.command == "queue":
        return queue(path, args)
    return serve(path)


def passwd(user: str | None) -> int:
    """Read a password (twice, without echo, from a terminal; else one line of stdin)."""
    import getpass

    from .auth import hash_password

    user = user or getpass.getuser()
    if ":" in user or not user.strip():
        print("smarthost passwd: a user name cannot be empty or contain ':'", file=sys.stderr)
        return EX_USAGE
    if sys.stdin.isatty():
        password = getpass.getpass(f"Password for {user}: ")
        if getpass.getpass("Again: ") != password:
            print("smarthost passwd: the passwords differ", file=sys.stderr)
            return 1
    else:
        password = sys.stdin.readline().rstrip("\r\n")
    if not password:
        print("smarthost passwd: empty password", file=sys.stderr)
        return 1
    print(f"{user}:{hash_password(password)}")
    return EX_OK


def _load_or_report(path: str) -> Config | None:
    """The config, or None after printing every error with its key path."""
    try:
        return load_config(path)
    except ConfigError as exc:
        for error in exc.errors:
            print(f"smarthost: {error}", file=sys.stderr)
        return None


def queue(path: str, args: argparse.Namespace) -> int:
    from .queuectl import QueueControl, QueueError

    config = _load_or_report(path)
    if config is None:
        return EX_CONFIG
    if config.log.file:
        # Changes made here belong in the relay's log, next to the message's life.
        log.setup(config.log.level, config.log.file, config.log.format)
    control = QueueControl(config)
    action = args.action or "list"
    try:
        if action == "list":
            return control.list(args.json or getattr(args, "list_json", False))
        if action == "show":
            return control.show(args.id)
        return getattr(control, action)(args.ids)
    except QueueError as exc:
        print(f"{getattr(args, 'id', '')}: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:
        print(f"smarthost: queue {action}: {exc}", file=sys.stderr)
        return EX_TEMPFAIL


def _sendmail_command(argv: list[str]) -> list[str] | None:
    """For `smarthost [-c FILE] sendmail ARGS...`: the arguments for smarthost-sendmail."""
    config: list[str] = []
    i = 0
    while i < len(argv):
        arg = argv[i]
        if arg in ("-c", "--config") and i + 1 < len(argv):
            config, i = ["-C", argv[i + 1]], i + 2
        elif arg.startswith("--config="):
            config, i = ["-C", arg.split("=", 1)[1]], i + 1
        elif arg.startswith("-c") and len(arg) > 2:
            config, i = ["-C", arg[2:]], i + 1
        elif arg == "sendmail":
            return config + argv[i + 1 :]
        else:
            return None
    return None


def check(path: str, connect: bool) -> int:
    try:
        config = load_config(path)
    except ConfigError as exc:
        for error in exc.errors:
            print(error, file=sys.stderr)
        return 1
    from .receiver import check_listener_files

    file_errors = check_listener_files(config)
    for error in file_errors:
        print(error, file=sys.stderr)
    if file_errors:
        return 1
    print(summary(config))
    for warning in config_warnings(config):
        print(f"warning: {warning}", file=sys.stderr)
    if connect:
        from .sender import check_connections

        print()
        if not check_connections(config, print):
            return 1
    return EX_OK


def serve(path: str) -> int:
    from .daemon import serve as run
    from .privileges import PrivilegeError
    from .spool import SpoolError

    config = _load_or_report(path)
    if config is None:
        return EX_CONFIG
    try:
        log.setup(config.log.level, config.log.file, config.log.format)
    except OSError as exc:
        print(
            f"smarthost: log.file: cannot open {config.log.file}: {exc.strerror}", file=sys.stderr
        )
        return EX_CANTCREAT
    for warning in config_warnings(config):
        log.event("config_warning", level=logging.WARNING, warning=warning)
    try:
        return run(config)
    except ConfigError as exc:  # files the config names: certificate, users
        for error in exc.errors:
            print(f"smarthost: {error}", file=sys.stderr)
        return EX_CONFIG
    except PrivilegeError as exc:
        print(f"smarthost: {exc}", file=sys.stderr)
        return EX_CONFIG
    except SpoolError as exc:
        print(f"smarthost: {exc.strerror or exc}", file=sys.stderr)
        return EX_TEMPFAIL if exc.errno == errno.EBUSY else EX_CANTCREAT
    except PermissionError as exc:
        print(f"smarthost: {exc}", file=sys.stderr)
        return EX_CANTCREAT
    except OSError as exc:  # a listen address in use or not available
        print(f"smarthost: cannot start: {exc}", file=sys.stderr)
        return EX_TEMPFAIL


def sendmail_main(argv: Sequence[str] | None = None) -> int:
    """The `smarthost-sendmail` console script (and `smarthost sendmail`)."""
    from .sendmail import main as sendmail

    return sendmail(argv)
