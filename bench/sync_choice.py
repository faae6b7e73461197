#!/usr/bin/env python3
"""What a group commit's syncs cost: syncfs(2) or per-file fsync(2), on a quiet file
system and beside a busy writer on the same file system (issue 19).

    .venv/bin/python bench/sync_choice.py             # ~1.5 min: syncfs and fsync, /var/tmp
    .venv/bin/python bench/sync_choice.py --dir /work --seconds 2 --sizes 1,8
    .venv/bin/python bench/sync_choice.py --methods spool --loads fsyncing   # the relay's
    PYTHONPATH=../main .venv/bin/python bench/sync_choice.py --methods spool --loads fsyncing

A batch is what `Spool.commit_many` does for N new 4 KiB messages: write each into
tmp/, make the data durable, rename each into msg/ and hard-link it into queue/, make
the names durable. Methods:

  syncfs  one syncfs for the data, one for the names (the fd of queue/ opened first)
  fsync   an fsync of each file after its write, then of msg/ and of queue/
  spool   smarthost's own `Spool.commit_many` (whatever it chooses: the columns
          `syncfs`/`fsync` count the calls it made); with PYTHONPATH set to another
          checkout, that checkout's spool (a before/after). Time it alone: a raw
          syncfs batch between two of its batches flushes the writer's pages for it

Loads, each on the spool's own file system (a child process, started --settle s
before the batches):

  quiet     nothing but the batches (and whatever else the machine runs)
  buffered  a writer overwriting a ring of --ring files of 64 MiB in place, 1 MiB
            buffered writes, never an fsync: its dirty pages are what syncfs must flush
  fsyncing  the same writer, but it fsyncs each 64 MiB file it has written

Within a load and a batch size the methods take turns, one batch each, for --seconds s
times the methods (at least --min-batches each), so they meet the same writer. The
files are unlinked after each batch, untimed. Prints the file system (`df -T`), the
load average, then one row per load, batch size and method: batches run, mean (what
throughput pays), median and p90 milliseconds per batch (the writes included: the same
for every method), the mean per message, and for `spool` the syncfs and fsync calls it
made (it also builds envelopes: on a quiet disk about 0.3 ms a batch more than the raw
method it chose); then each writer's MB/s. The machine's other disk users show in
every figure: run it more than once.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator

MESSAGE = b"x" * 4096
WRITER_FILE = 64 * 1024 * 1024
WRITER_CHUNK = 1024 * 1024
FSYNC = os.fsync  # the raw batches' own: `spool` counts the calls to os.fsync


def main() -> None:
    args = parse_args()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(1))  # clean up: the writer, the dir
    if args.writer:
        write_forever(args.writer, args.dir)
        return
    # After PYTHONPATH and the venv's own install: another checkout's spool can be timed.
    sys.path.append(os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
    import smarthost
    from smarthost import libc

    syncfs = libc.syncfs_call()
    if syncfs is None and {"syncfs"} & set(args.methods):
        sys.exit("no syncfs(2) that reports errors here (Linux 5.8+)")
    root = tempfile.mkdtemp(prefix="sync-choice-", dir=args.dir)
    try:
        for state in ("tmp", "msg", "queue"):  # the spool's, if it is timed, makes the rest
            os.mkdir(os.path.join(root, state), 0o700)
        print(subprocess.run(["df", "-T", root], capture_output=True, text=True).stdout.strip())
        print(
            f"load average {os.getloadavg()[0]:.2f}, {os.cpu_count()} CPUs; spool: "
            f"{os.path.dirname(smarthost.__file__)}"
        )
        print(
            f"{'load':9} {'batch':>5} {'method':7} {'batches':>7} {'mean ms':>8} {'p50 ms':>8}"
            f" {'p90 ms':>8} {'ms/msg':>7} {'syncfs':>6} {'fsync':>6}"
        )
        for load in args.loads:
            with writer(load, root, args) as rate:
                for size in args.sizes:
                    for method, times, calls in run_cell(root, size, args, syncfs):
                        print_row(load, size, method, times, calls)
            if load != "quiet":
                print(f"{load} writer: {rate():.0f} MB/s")
    finally:
        shutil.rmtree(root, ignore_errors=True)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    listed = lambda kind: lambda text: [kind(x) for x in text.split(",")]  # noqa: E731
    parser.add_argument("--dir", default="/var/tmp", help="where the temp spool goes")
    parser.add_argument("--sizes", type=listed(int), default=[1, 4, 8, 32])
    parser.add_argument("--loads", type=listed(str), default=["quiet", "buffered", "fsyncing"])
    parser.add_argument("--methods", type=listed(str), default=["syncfs", "fsync"])
    parser.add_argument("--seconds", type=float, default=3.0, help="a cell: this times the methods")
    parser.add_argument("--min-batches", type=int, default=5)
    parser.add_argument("--settle", type=float, default=3.0, help="writer head start, s")
    parser.add_argument("--ring", type=int, default=16, help="the writer's 64 MiB files")
    parser.add_argument("--writer", help=argparse.SUPPRESS)  # the child: its load
    return parser.parse_args()


# -- the batches ---------------------------------------------------------------------


def run_cell(
    root: str, size: int, args: argparse.Namespace, syncfs: Callable[[int], None] | None
) -> Iterator[tuple[str, list[float], list[int]]]:
    """The methods in turn, one batch each, until each had its time and its batches."""
    spool = make_spool(root) if "spool" in args.methods else None
    batch = {
        "syncfs": lambda names: raw_batch(root, names, syncfs),
        "fsync": lambda names: raw_batch(root, names, None),
        "spool": lambda names: spool_batch(spool, names),
    }
    times: dict[str, list[float]] = {m: [] for m in args.methods}
    serial, ends = 0, time.monotonic() + args.seconds * len(args.methods)
    with counting_calls(spool) as calls:
        while time.monotonic() < ends or min(map(len, times.values())) < args.min_batches:
            for method in args.methods:
                names = [f"{serial:08d}.{i}" for i in range(size)]
                serial += 1
                started = time.perf_counter()
                batch[method](names)
                took = time.perf_counter() - started
                times[method].append(took)
                for name in names:
                    for state in ("msg", "queue"):
                        os.unlink(os.path.join(root, state, name))
    for method in args.methods:
        yield method, times[method], calls if method == "spool" else []


def raw_batch(root: str, names: list[str], syncfs: Callable[[int], None] | None) -> None:
    """commit_many's steps with one method; syncfs None: per-file fsyncs."""
    queue_fd = os.open(os.path.join(root, "queue"), os.O_RDONLY | os.O_DIRECTORY)
    try:
        for name in names:
            fd = os.open(os.path.join(root, "tmp", name), os.O_WRONLY | os.O_CREAT, 0o600)
            os.write(fd, MESSAGE)
            if syncfs is None:
                FSYNC(fd)
            os.close(fd)
        if syncfs is not None:
            syncfs(queue_fd)
        for name in names:
            os.rename(os.path.join(root, "tmp", name), os.path.join(root, "msg", name))
            os.link(os.path.join(root, "msg", name), os.path.join(root, "queue", name))
        if syncfs is not None:
            syncfs(queue_fd)
        else:
            for state in ("msg", "queue"):
                fd = os.open(os.path.join(root, state), os.O_RDONLY | os.O_DIRECTORY)
                FSYNC(fd)
                os.close(fd)
    finally:
        os.close(queue_fd)


def make_spool(root: str):  # a smarthost.spool.Spool sharing the raw batches' directories
    from smarthost.spool import Spool

    spool = Spool(root)
    spool.create()
    return spool


def spool_batch(spool, names: list[str]) -> None:
    from smarthost.spool import Envelope, Recipient

    messages = [
        (
            Envelope(id=name, sender="a@b.test", recipients=[Recipient("c@d.test")], arrival=0.0),
            [MESSAGE],
        )
        for name in names
    ]
    errors = spool.commit_many(messages)
    assert errors == [None] * len(names), errors


@contextlib.contextmanager
def counting_calls(spool) -> Iterator[list[int]]:
    """[syncfs calls, fsync calls] this spool makes meanwhile."""
    counts = [0, 0]
    if spool is None:
        yield counts
        return
    real_syncfs, real_fsync = spool._syncfs, os.fsync

    def syncfs(fd: int) -> None:
        counts[0] += 1
        real_syncfs(fd)

    def fsync(fd: int) -> None:
        counts[1] += 1
        real_fsync(fd)

    if real_syncfs is not None:
        spool._syncfs = syncfs
    os.fsync = fsync  # type: ignore[assignment]
    try:
        yield counts
    finally:
        os.fsync = real_fsync


def print_row(load: str, size: int, method: str, times: list[float], calls: list[int]) -> None:
    times = sorted(times)
    mean, p50 = statistics.mean(times) * 1e3, statistics.median(times) * 1e3
    p90 = times[int(0.9 * (len(times) - 1))] * 1e3
    counted = f" {calls[0]:>6} {calls[1]:>6}" if calls else ""
    print(
        f"{load:9} {size:>5} {method:7} {len(times):>7} {mean:>8.2f} {p50:>8.2f} {p90:>8.2f}"
        f" {mean / size:>7.2f}{counted}",
        flush=True,
    )


# -- the busy writer -----------------------------------------------------------------


@contextlib.contextmanager
def writer(load: str, root: str, args: argparse.Namespace) -> Iterator[Callable[[], float]]:
    """Run the load's writer in a child process; yields its MB/s (read once it ended)."""
    if load == "quiet":
        yield lambda: 0.0
        return
    ring = os.path.join(root, f"writer-{load}")
    os.mkdir(ring)
    with open(os.path.join(ring, "ring"), "w") as f:
        f.write(str(args.ring))
    child = subprocess.Popen(
        [sys.executable, os.path.abspath(__file__), "--writer", load, "--dir", ring],
        stdout=subprocess.PIPE,
        text=True,
    )
    result: list[float] = []
    try:
        time.sleep(args.settle)  # its dirty pages build up
        yield lambda: result[0] if result else 0.0
    finally:
        child.send_signal(signal.SIGTERM)
        out, _ = child.communicate()
        with contextlib.suppress(ValueError):
            result.append(float(out.strip() or 0))
        shutil.rmtree(ring, ignore_errors=True)
        os.sync()  # the next load starts clean


def write_forever(load: str, ring: str) -> None:
    """The writer child: overwrite the ring's files in place until SIGTERM, then print
    MB/s. In place (no O_TRUNC), so that ext4 does not start writeback at close."""
    with open(os.path.join(ring, "ring")) as f:
        files = int(f.read())
    stop: list[bool] = []
    signal.signal(signal.SIGTERM, lambda *_: stop.append(True))
    chunk, written, started = b"w" * WRITER_CHUNK, 0, time.monotonic()
    while not stop:
        path = os.path.join(ring, f"{written // WRITER_FILE % files}")
        fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o600)
        for _ in range(WRITER_FILE // WRITER_CHUNK):
            if stop:
                break
            written += os.write(fd, chunk)
        if load == "fsyncing" and not stop:
            os.fsync(fd)
        os.close(fd)
    print(written / 1e6 / (time.monotonic() - started))


if __name__ == "__main__":
    main()
