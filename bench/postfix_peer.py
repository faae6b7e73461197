"""A private Postfix instance for bench.py: Postfix in the relay's place, on the same
sink, disk and load, so that the ratio between the two is in the project's own bench.

    load --SMTP--> Postfix (127.0.0.1:free port) --SMTP--> the bench's sink
                   relayhost = [127.0.0.1]:SINK, nothing delivered locally

Everything of the instance is its own, under the directory it is given: its
config_directory (main.cf, master.cf written here), queue_directory and
data_directory (master.lock lives there, master.pid in queue_directory/pid) and its
log file. So a system Postfix, such as the one a shared harness runs on port 2525, is
not disturbed: another config, queue, data directory and port. Only the programs and
their meta_directory files (postfix-files, postfix-script: what `postfix check` and
`postfix start` read) are the system's.

The settings are the ones that made Postfix a fair peer in side-by-side runs: a pure
loopback relay (IPv4 only, mynetworks 127.0.0.0/8), Postfix's defaults for delivery
concurrency, connection caching and in_flow_delay, no TLS anywhere, no local delivery
and no DNS (the relayhost is an IP literal; smtp_dns_support_level = disabled), no
chroot, and its log written to a file through postlogd (a container may run no syslog
daemon). master.cf holds the standard services (without the pipe transports).

Postfix checks ownership: `postfix check` creates the queue's subdirectories (owned by
postfix, maildrop and public by the postdrop group) and the data directory, and its
daemons, running as postfix, reach them through every directory above: those must be
searchable by others (mode 711 or 755). Hence root is needed, and the caller makes the
directory reachable.

`postfix start` daemonizes the master. While it starts and while it stops, this
process is the reaper of its orphaned descendants (PR_SET_CHILD_SUBREAPER), so that the
master and the workers it leaves at its stop are reaped here, not left to PID 1 (which
in a container may never reap them).
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import re
import shutil
import signal
import subprocess
import time
from collections import Counter
from collections.abc import Iterator

from support.procs import process_tree, running
from support.smtp import free_port

COMMAND_TIMEOUT = 60.0  # seconds for `postfix check`, `start`, `stop`, `abort`
PR_SET_CHILD_SUBREAPER = 36  # prctl(2), Linux 3.4+
LOG_PROBLEM = re.compile(r"\]: (?:warning|error|fatal|panic): ")
LOG_STATUS = re.compile(r" status=(\w+)")

MAIN_CF = """\
# A private Postfix instance of smarthost's bench/bench.py: a pure loopback relay to
# the bench's sink. Written by bench/postfix_peer.py.
compatibility_level = 3.6
queue_directory = {queue}
data_directory = {data}
myhostname = bench-postfix.localdomain
mydomain = localdomain
myorigin = $myhostname
smtpd_banner = $myhostname ESMTP Postfix (bench)
biff = no
append_dot_mydomain = no
readme_directory = no

# loopback only, IPv4 only; the smtpd listener itself is 127.0.0.1:{port} in master.cf
inet_interfaces = loopback-only
inet_protocols = ipv4
mynetworks = 127.0.0.0/8
smtpd_relay_restrictions = permit_mynetworks, reject_unauth_destination
smtpd_recipient_restrictions = permit_mynetworks, reject

# relay everything to the sink; nothing is delivered locally, nothing looked up in DNS
relayhost = [127.0.0.1]:{sink_port}
smtp_dns_support_level = disabled
mydestination =
relay_domains =
local_recipient_maps =
local_transport = error:5.1.1 local delivery is disabled on this relay
alias_maps =
alias_database =

# the bench has no TLS anywhere
smtpd_tls_security_level = none
smtp_tls_security_level = none

# queue: Postfix's defaults for delivery concurrency (20 per destination), connection
# caching and in_flow_delay; shorter retry timers than the defaults
queue_run_delay = 30s
minimal_backoff_time = 30s
maximal_backoff_time = 300s
maximal_queue_lifetime = 1d
bounce_queue_lifetime = 1d

# no syslog daemon needed: log to a file through postlogd
maillog_file_prefixes = {root}
maillog_file = {log}
"""

# The standard services, chroot off; the first line is the listener.
MASTER_CF = """\
127.0.0.1:{port} inet n - n - - smtpd
pickup     unix  n       -       n       60      1       pickup
cleanup    unix  n       -       n       -       0       cleanup
qmgr       unix  n       -       n       300     1       qmgr
tlsmgr     unix  -       -       n       1000?   1       tlsmgr
rewrite    unix  -       -       n       -       -       trivial-rewrite
bounce     unix  -       -       n       -       0       bounce
defer      unix  -       -       n       -       0       bounce
trace      unix  -       -       n       -       0       bounce
verify     unix  -       -       n       -       1       verify
flush      unix  n       -       n       1000?   0       flush
proxymap   unix  -       -       n       -       -       proxymap
proxywrite unix  -       -       n       -       1       proxymap
smtp       unix  -       -       n       -       -       smtp
relay      unix  -       -       n       -       -       smtp -o syslog_name=postfix/$service_name
showq      unix  n       -       n       -       -       showq
error      unix  -       -       n       -       -       error
retry      unix  -       -       n       -       -       error
discard    unix  -       -       n       -       -       discard
local      unix  -       n       n       -       -       local
virtual    unix  -       n       n       -       -       virtual
lmtp       unix  -       -       n       -       -       lmtp
anvil      unix  -       -       n       -       1       anvil
scache     unix  -       -       n       -       1       scache
postlog    unix-dgram n  -       n       -       1       postlogd
"""


def postfix_command() -> str | None:
    """The `postfix` program, on PATH or in the sbin directories a user's PATH may lack."""
    path = os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/usr/local/sbin", "/sbin"])
    return shutil.which("postfix", path=path)


def why_not() -> str:
    """Why a private Postfix instance cannot run here; "" when it can."""
    if postfix_command() is None:
        return "Postfix is not installed (no `postfix` command)"
    if os.geteuid() != 0:
        return "not root (a Postfix instance needs root to start)"
    return ""


def postfix_version() -> str:
    """The installed Postfix's version ("3.7.11"; "" when unknown)."""
    postconf = os.path.join(os.path.dirname(postfix_command() or ""), "postconf")
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        done = subprocess.run(
            [postconf, "-d", "-h", "mail_version"],
            capture_output=True,
            text=True,
            timeout=COMMAND_TIMEOUT,
            check=False,
        )
        return done.stdout.strip()
    return ""


@contextlib.contextmanager
def adopting_orphans() -> Iterator[None]:
    """Be the reaper of this process's descendants orphaned meanwhile (Linux 3.4+): the
    master that `postfix start` daemonizes, the workers it leaves at its stop."""
    prctl = ctypes.CDLL(None, use_errno=True).prctl
    prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)
    try:
        yield
    finally:
        prctl(PR_SET_CHILD_SUBREAPER, 0, 0, 0, 0)


def reap(pids: list[int], timeout: float) -> bool:
    """Wait until none of `pids` runs, reaping those that are our children (adopted
    orphans included); True when all are gone within `timeout` seconds."""
    deadline = time.monotonic() + timeout
    left = set(pids)
    while left:
        for pid in list(left):
            try:
                done = os.waitpid(pid, os.WNOHANG)[0] == pid
            except ChildProcessError:  # not ours: another parent reaps it
                done = not running(pid)
            if done:
                left.discard(pid)
        if not left or time.monotonic() > deadline:
            break
        time.sleep(0.02)
    return not left


class PostfixInstance:
    """A Postfix instance of its own under `root`, listening on 127.0.0.1:`port` (a free
    one by default) and relaying everything to 127.0.0.1:`sink_port`.

    `write_config()`, then `start()` (runs `postfix check` first, as `postfix start`
    does) and `stop()`, which waits until every process of the instance is gone.
    """

    def __init__(self, root: str, sink_port: int, port: int = 0) -> None:
        self.root = os.path.abspath(root)
        self.config_dir = os.path.join(self.root, "etc")
        self.queue_dir = os.path.join(self.root, "queue")
        self.data_dir = os.path.join(self.root, "data")
        self.log_path = os.path.join(self.root, "postfix.log")
        self.sink_port = sink_port
        self.port = port or free_port()
        self.master = 0  # the master daemon's pid, once started

    def write_config(self) -> None:
        """main.cf and master.cf, and the queue directory (`postfix check` fills it)."""
        os.makedirs(self.config_dir, exist_ok=True)
        os.makedirs(self.queue_dir, exist_ok=True)
        settings = {
            "root": self.root,
            "queue": self.queue_dir,
            "data": self.data_dir,
            "log": self.log_path,
            "port": self.port,
            "sink_port": self.sink_port,
        }
        for name, template in (("main.cf", MAIN_CF), ("master.cf", MASTER_CF)):
            with open(os.path.join(self.config_dir, name), "w", encoding="ascii") as f:
                f.write(template.format(**settings))

    def run(self, command: str) -> subprocess.CompletedProcess[str]:
        """`postfix -c CONFIG_DIR COMMAND`; its output in the result."""
        program = postfix_command()
        if program is None:
            raise RuntimeError(why_not())
        return subprocess.run(
            [program, "-c", self.config_dir, command],
            capture_output=True,
            text=True,
            timeout=COMMAND_TIMEOUT,
            check=False,
        )

    def check(self) -> str:
        """`postfix check`: its complaints, "" when it has none."""
        done = self.run("check")
        said = (done.stdout + done.stderr).strip()
        return said or (f"exit {done.returncode}" if done.returncode else "")

    def start(self) -> None:
        """`postfix start` (it checks, then waits for the master's initialization);
        raises RuntimeError with Postfix's words when it fails. Stopped again when
        anything goes wrong, Ctrl-C included."""
        try:
            with adopting_orphans():
                done = self.run("start")
            self.master = self.master_pid()
        except BaseException:
            self.master = self.master_pid()
            self.stop(5.0)
            raise
        if done.returncode != 0 or not running(self.master):
            self.stop(5.0)
            said = (done.stdout + done.stderr).strip().splitlines()
            raise RuntimeError(
                "postfix start failed: " + " / ".join(said[-3:] + self.problems()[-3:])
            )

    def master_pid(self) -> int:
        """The master's pid as it wrote it (0: none)."""
        try:
            with open(os.path.join(self.queue_dir, "pid", "master.pid"), encoding="ascii") as f:
                return int(f.read().strip() or 0)
        except (OSError, ValueError):
            return 0

    def stop(self, timeout: float) -> tuple[int | None, float]:
        """`postfix stop`, then wait until the master and the processes it had are gone;
        after `timeout` s `postfix abort` and SIGKILL. (`postfix stop`'s exit status, or
        None when the instance had to be killed; seconds it took.)"""
        if not self.master:
            return None, 0.0
        began = time.monotonic()
        pids = process_tree(self.master)
        with adopting_orphans():
            code: int | None = self.run("stop").returncode
            if not reap(pids, timeout):
                code = None
                self.run("abort")
                for pid in pids:
                    if running(pid):
                        with contextlib.suppress(OSError):
                            os.kill(pid, signal.SIGKILL)
                reap(pids, 5.0)
        self.master = 0
        return code, time.monotonic() - began

    def log_lines(self) -> list[str]:
        try:
            with open(self.log_path, encoding="utf-8", errors="replace") as f:
                return f.read().splitlines()
        except OSError:
            return []

    def problems(self) -> list[str]:
        """Its log lines at warning level or above, without the time stamp."""
        return [line.split(" ", 4)[-1] for line in self.log_lines() if LOG_PROBLEM.search(line)]

    def statuses(self) -> Counter[str]:
        """How many deliveries its log reports by status (sent, deferred, bounced)."""
        return Counter(m.group(1) for line in self.log_lines() if (m := LOG_STATUS.search(line)))
