"""Command-line entry points (`smarthost`, `smarthost-sendmail`) and their exit codes."""

from __future__ import annotations

import argparse
import errno
import logging
import os
import sys
from collections.abc import Sequence

from . import __file__ as package_init
from . import __version__, log
from .config import (
    Config,
    ConfigError,
    config_warnings,
    default_config_path,
    load_config,
    summary,
)

DRAIN_DEFAULT_TIMEOUT = 300.0
# Beyond the drain's timeout: the relay's own orderly stop (commits, sessions,
# delivery attempts in flight get a few seconds each).
DRAIN_STOP_MARGIN = 30.0

CONFIG_HELP = "config file (default: $SMARTHOST_CONFIG, else /etc/smarthost/smarthost.toml)"


def _config_option(parser: argparse.ArgumentParser) -> None:
    """`-c FILE` after the command too (`smarthost check -c FILE`). SUPPRESS: a
    subcommand that is not given it leaves the one before the command in place."""
    parser.add_argument(
        "-c", "--config", metavar="FILE", default=argparse.SUPPRESS, help=CONFIG_HELP
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="smarthost",
        description="A store-and-forward SMTP relay to upstream smarthosts.",
    )
    parser.add_argument("-c", "--config", metavar="FILE", help=CONFIG_HELP)
    parser.add_argument("--version", action="version", version=f"smarthost {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    _config_option(commands.add_parser("serve", help="run the relay in the foreground"))
    passwd = commands.add_parser("passwd", help="print a user:hash line for smtp.auth_users")
    passwd.add_argument("user", nargs="?", help="the SMTP login (default: your user name)")
    queue = commands.add_parser("queue", help="list and steer spooled messages")
    _config_option(queue)
    queue.add_argument("--json", action="store_true", help="list: one JSON object per line")
    actions = queue.add_subparsers(dest="action", metavar="ACTION")
    listing = actions.add_parser("list", help="list spooled messages (the default)")
    listing.add_argument("--json", action="store_true", dest="list_json")
    _config_option(listing)
    summary = actions.add_parser("summary", help="the queue's shape by age, as qshape")
    summary.add_argument("--by", choices=("domain", "backend", "sender"), default="domain")
    summary.add_argument("--json", action="store_true", dest="summary_json")
    summary.add_argument("--top", type=_positive, metavar="N", help="only the N largest rows")
    _config_option(summary)
    show = actions.add_parser("show", help="envelope, history and headers")
    show.add_argument("id")
    _config_option(show)
    for name, text in (
        ("flush", "retry now (all waiting messages when no ID is given)"),
        ("hold", "park messages: never attempted while held"),
        ("release", "put held messages back, due now"),
        ("delete", "remove messages without a DSN"),
        ("bounce", "give up now: fail the remaining recipients with a DSN"),
    ):
        action = actions.add_parser(name, help=text)
        action.add_argument("ids", nargs="*" if name == "flush" else "+", metavar="ID")
        _config_option(action)
    sendmail = commands.add_parser(
        "sendmail", help="sendmail-compatible submission (see smarthost-sendmail(8))"
    )
    sendmail.add_argument("args", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
    drain = commands.add_parser(
        "drain", help="stop the running relay taking mail; exit once nothing is due"
    )
    drain.add_argument(
        "--timeout",
        type=_duration,
        default=DRAIN_DEFAULT_TIMEOUT,
        metavar="DURATION",
        help="stop the relay anyway after this long (default: 5m)",
    )
    _config_option(drain)
    check = commands.add_parser("check", help="validate the config and print a summary")
    _config_option(check)
    check.add_argument(
        "--connect",
        action="store_true",
        help="also open a session to every backend and report each step",
    )
    oauth2 = commands.add_parser("oauth2", help="OAuth 2.0 for upstreams")
    oauth2_actions = oauth2.add_subparsers(dest="action", metavar="ACTION", required=True)
    authorize = oauth2_actions.add_parser(
        "authorize", help="sign in once and write a backend's refresh token"
    )
    authorize.add_argument("backend", help="the backend's name")
    _config_option(authorize)
    return parser


def _duration(text: str) -> float:
    from .config import parse_duration

    try:
        return parse_duration(text, "--timeout")
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _positive(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"not a positive number: {text!r}")
    return int(text)


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
        return os.EX_USAGE if exc.code not in (0, None) else os.EX_OK
    if args.command == "passwd":
        return passwd(args.user)
    path = default_config_path(args.config)
    if args.command == "check":
        return check(path, args.connect)
    if args.command == "queue":
        return queue(path, args)
    if args.command == "drain":
        return drain(path, args.timeout)
    if args.command == "oauth2":
        return oauth2_authorize(path, args.backend)
    return serve(path)


def oauth2_authorize(path: str, backend: str) -> int:
    """`smarthost oauth2 authorize BACKEND`: the administrator's one-time sign-in."""
    from . import oauth2

    config = _load_or_report(path)
    if config is None:
        return os.EX_CONFIG
    try:
        oauth2.authorize(config, backend, sys.stdin, lambda line: print(line, flush=True))
    except (oauth2.AuthorizeError, oauth2.TokenError) as exc:
        print(f"smarthost oauth2 authorize: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:
        print(f"smarthost oauth2 authorize: {exc.filename}: {exc.strerror}", file=sys.stderr)
        return os.EX_CANTCREAT
    except KeyboardInterrupt:
        return 1
    return os.EX_OK


def passwd(user: str | None) -> int:
    """Read a password (twice, without echo, from a terminal; else one line of stdin)."""
    import getpass

    from .auth import hash_password

    user = user or getpass.getuser()
    if ":" in user or not user.strip():
        print("smarthost passwd: a user name cannot be empty or contain ':'", file=sys.stderr)
        return os.EX_USAGE
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
    return os.EX_OK


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
        return os.EX_CONFIG
    _queue_logging(config)
    control = QueueControl(config)
    action = args.action or "list"
    try:
        try:
            if action == "list":
                code = control.list(args.json or getattr(args, "list_json", False))
            elif action == "summary":
                code = control.summary(
                    args.by, args.json or args.summary_json, getattr(args, "top", None)
                )
            elif action == "show":
                code = control.show(args.id)
            else:
                code = getattr(control, action)(args.ids)
            sys.stdout.flush()  # a reader gone shows here, not at exit
            return code
        except QueueError as exc:
            sys.stdout.flush()
            print(f"{getattr(args, 'id', '')}: {exc}", file=sys.stderr)
            return 1
    except BrokenPipeError:
        # `smarthost queue | head -1`: the reader has what it wanted. Like a listing
        # that ends by itself: no message, exit 0 (so `set -o pipefail` scripts and
        # `| grep -q` work); what was acted on so far stays done.
        _stdout_gone()
        return os.EX_OK
    except OSError as exc:
        print(f"smarthost: queue {action}: {exc}", file=sys.stderr)
        return os.EX_TEMPFAIL


def drain(path: str, timeout: float) -> int:
    """Tell the relay that holds the spool's lock to drain (SIGUSR1, the timeout in
    the spool's `.drain` file), then wait until it has exited: the lock is free."""
    import signal
    import time

    from .spool import Spool

    config = _load_or_report(path)
    if config is None:
        return os.EX_CONFIG
    spool = Spool(config.spool.dir)
    try:
        lock_fd = spool.watch_lock()
    except FileNotFoundError:
        print(f"smarthost drain: no relay runs on spool {spool.root}", file=sys.stderr)
        return 1
    except OSError as exc:
        print(f"smarthost drain: {exc.filename}: {exc.strerror or exc}", file=sys.stderr)
        return 1
    try:
        pid = spool.lock_holder(lock_fd)
        if pid is None:
            print(f"smarthost drain: no relay runs on spool {spool.root}", file=sys.stderr)
            return 1
        try:
            spool.request_drain(timeout, os.fstat(lock_fd))
            os.kill(pid, signal.SIGUSR1)
        except OSError as exc:
            spool.take_drain_request()
            what = exc.filename or f"pid {pid}"
            print(f"smarthost drain: {what}: {exc.strerror or exc}", file=sys.stderr)
            return 1
        deadline = time.monotonic() + timeout + DRAIN_STOP_MARGIN
        while spool.lock_holder(lock_fd) is not None:
            if time.monotonic() > deadline:
                print(f"smarthost drain: the relay (pid {pid}) has not exited", file=sys.stderr)
                return 1
            time.sleep(0.1)
    finally:
        os.close(lock_fd)
    print(f"smarthost drain: the relay (pid {pid}) has drained and exited")
    return os.EX_OK


def _queue_logging(config: Config) -> None:
    """Where a queue command's events go: to `log.file`, next to the message's life in
    the relay's log, when one is configured; else nowhere (the relay's log is then the
    journal, and the command's output is the record). Never to the command's stderr,
    which is for its own messages only."""
    if config.log.file:
        try:
            log.setup_for(config)
            return
        except OSError as exc:
            print(
                f"smarthost: warning: log.file: cannot open {config.log.file}: "
                f"{exc.strerror or exc}; this command's changes are not logged",
                file=sys.stderr,
            )
    log.logger.addHandler(logging.NullHandler())
    log.logger.propagate = False  # not to the root logger's last-resort stderr either


def _stdout_gone() -> None:
    """Point stdout at /dev/null, so that the flush at exit does not fail again."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    except (OSError, ValueError):
        pass


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
    from .fleet import check_files
    from .receiver import check_listener_files

    file_errors = check_listener_files(config) + check_files(config)
    if config.metrics.listen is not None:
        from .metrics import requirement_errors

        file_errors += requirement_errors(config)
    for error in file_errors:
        print(error, file=sys.stderr)
    if file_errors:
        return 1
    print(summary(config))
    for warning in config_warnings(config) + interpreter_warnings(config):
        print(f"warning: {warning}", file=sys.stderr)
    if connect:
        from .fleet import check_connection
        from .sender import check_connections

        print()
        backends_ok = check_connections(config, print)
        if not (check_connection(config, print) and backends_ok):
            return 1
    return os.EX_OK


def interpreter_warnings(config: Config) -> list[str]:
    """The service user must be able to run this Python and import smarthost: a venv
    made with a python3 under /root (pyenv, a build in a home directory) is not
    reachable by it, and the relay (or its delivery process, or a module it imports
    later) fails after it drops root. The service user is `user`, else the owner of the
    spool (`install -d -o smarthost`, with systemd's User=) when that is another account.
    """
    account = _service_account(config)
    if account is None:
        return []
    groups = set(os.getgrouplist(account.pw_name, account.pw_gid))
    needed = [
        ("the Python interpreter", sys.executable, 0o1),
        ("the standard library", os.__file__, 0o4),
        ("the smarthost package", package_init, 0o4),
    ]
    warnings: list[str] = []
    for what, path, bits in needed:
        if not path:
            continue
        problem = _unreachable(os.path.abspath(path), account.pw_uid, groups, bits)
        if problem:
            real = os.path.realpath(path)
            named = path if real == path else f"{path} (that is, {real})"
            warnings.append(
                f"user {account.pw_name} cannot use {what} {named}: {problem}; "
                "install smarthost in a virtualenv made with the system Python "
                "(/usr/bin/python3 -m venv /opt/smarthost) or let that user reach it"
            )
            break  # one is enough: they share the cause
    return warnings


def _service_account(config: Config):  # -> pwd.struct_passwd | None
    """The account the relay runs as, when it is not the one running this command."""
    import pwd

    try:
        if config.user:
            account = pwd.getpwnam(config.user)
        else:
            account = pwd.getpwuid(os.stat(config.spool.dir).st_uid)
    except (KeyError, OSError):
        return None  # no such user (serve says so), or no spool yet
    if account.pw_uid in (0, os.geteuid()):
        return None  # root reaches everything; and we ourselves just ran it
    return account


def _unreachable(path: str, uid: int, groups: set[int], bits: int) -> str | None:
    """Why `uid` (in `groups`) cannot reach `path` with `bits` (4 read, 1 execute) on
    it, from the permission bits (ACLs aside); None if it can."""
    parts = path.split(os.sep)
    for end in range(1, len(parts)):
        directory = os.sep.join(parts[:end]) or os.sep
        if not _permits(directory, uid, groups, 0o1):
            return f"{directory} is not searchable by it"
    if not _permits(path, uid, groups, bits):
        return f"{path} is not {'readable' if bits & 0o4 else 'executable'} by it"
    real = os.path.realpath(path)
    if real != path:
        return _unreachable(real, uid, groups, bits)
    return None


def _permits(path: str, uid: int, groups: set[int], bits: int) -> bool:
    try:
        st = os.stat(path)
    except OSError:
        return True  # not there: not ours to report
    if st.st_uid == uid:
        granted = st.st_mode >> 6
    elif st.st_gid in groups:
        granted = st.st_mode >> 3
    else:
        granted = st.st_mode
    return granted & bits == bits


def serve(path: str) -> int:
    from .privileges import PrivilegeError
    from .relay import serve as run
    from .spool import SpoolError

    config = _load_or_report(path)
    if config is None:
        return os.EX_CONFIG
    try:
        log.setup_for(config)
    except OSError as exc:
        print(
            f"smarthost: log.file: cannot open {config.log.file}: {exc.strerror}", file=sys.stderr
        )
        return os.EX_CANTCREAT
    for warning in config_warnings(config) + interpreter_warnings(config):
        log.event("config_warning", level=logging.WARNING, warning=warning)
    try:
        return run(config)
    except ConfigError as exc:  # files the config names: certificate, users
        for error in exc.errors:
            print(f"smarthost: {error}", file=sys.stderr)
        return os.EX_CONFIG
    except PrivilegeError as exc:
        print(f"smarthost: {exc}", file=sys.stderr)
        return os.EX_CONFIG
    except SpoolError as exc:
        print(f"smarthost: {exc.strerror or exc}", file=sys.stderr)
        return os.EX_TEMPFAIL if exc.errno == errno.EBUSY else os.EX_CANTCREAT
    except PermissionError as exc:
        print(f"smarthost: {exc}", file=sys.stderr)
        return os.EX_CANTCREAT
    except OSError as exc:  # a listen address in use or not available
        # The message names the address (`smtp.listen HOST:PORT: ...`); "[Errno 98]"
        # tells an administrator nothing more.
        print(f"smarthost: cannot start: {exc.strerror or exc}", file=sys.stderr)
        return os.EX_TEMPFAIL


def sendmail_main(argv: Sequence[str] | None = None) -> int:
    """The `smarthost-sendmail` console script (and `smarthost sendmail`)."""
    from .sendmail import main as sendmail

    return sendmail(argv)
