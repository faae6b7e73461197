"""What of the benchmark can be checked quickly: its `--postfix` option, the private
Postfix instance it runs beside the relay (a real Postfix, skipped where it is missing
or this is not root), and how it reads memory. How fast anything goes, the benchmark
says: never a test."""

from __future__ import annotations

import mmap
import os
import shutil
import smtplib
import sys
import tempfile
from collections.abc import Iterator

import pytest

from support import ROOT
from support.messages import RCPT, SENDER, arrived, message
from support.procs import process_tree, pss_kib, running
from support.sink import Sink

sys.path.insert(0, str(ROOT / "bench"))
from postfix_peer import PostfixInstance, why_not

import bench

NO_POSTFIX = why_not()


def test_anonymous_pss_counts_the_heap_and_not_the_files_mapped() -> None:
    """The anonymous part of the PSS grows with the heap; a file mapped adds to the
    whole PSS only. (The benchmark reports both: only the first is the same beside any
    neighbour.)"""
    me = os.getpid()
    anon, whole = pss_kib(me, "Pss_Anon"), pss_kib(me)
    assert 0 < anon < whole
    heap = bytearray(16 << 20)  # zero pages until written
    heap[::4096] = b"x" * (len(heap) // 4096)  # one byte a page: all of it resident
    assert pss_kib(me, "Pss_Anon") - anon >= 15 << 10
    with tempfile.TemporaryFile() as f:
        f.write(b"y" * (8 << 20))
        f.flush()
        with mmap.mmap(f.fileno(), 0, prot=mmap.PROT_READ) as mapped:
            anon, whole = pss_kib(me, "Pss_Anon"), pss_kib(me)
            assert sum(mapped[i] for i in range(0, len(mapped), 4096)) > 0  # read in
            assert pss_kib(me) - whole >= 7 << 10
            assert abs(pss_kib(me, "Pss_Anon") - anon) < 1 << 10
    del heap


def test_postfix_runs_beside_by_default_and_the_option_takes_only_its_choices() -> None:
    assert bench.parse_args([]).postfix == "auto"
    assert bench.parse_args(["--postfix", "only"]).postfix == "only"
    with pytest.raises(SystemExit):
        bench.parse_args(["--postfix", "always"])


@pytest.fixture
def reachable_dir() -> Iterator[str]:
    """A temp dir Postfix's daemons (running as its mail_owner) can reach: pytest's own
    are mode 700."""
    path = tempfile.mkdtemp(prefix="smarthost-test-postfix-")
    os.chmod(path, 0o711)
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.mark.skipif(bool(NO_POSTFIX), reason=NO_POSTFIX or "-")
def test_private_postfix_relays_to_the_sink_and_stops_with_every_process(
    sink: Sink, reachable_dir: str
) -> None:
    instance = PostfixInstance(os.path.join(reachable_dir, "postfix"), sink.port)
    instance.write_config()
    assert instance.check() == ""
    instance.start()
    try:
        pids = process_tree(instance.master)
        with smtplib.SMTP("127.0.0.1", instance.port, timeout=10) as client:
            assert client.sendmail(SENDER, [RCPT], message("<peer.1@bench.test>")) == {}
        sink.wait_for(1, timeout=30)
    finally:
        code, _ = instance.stop(30)
    assert code == 0
    assert arrived(sink) == {"<peer.1@bench.test>": 1}
    assert not [pid for pid in pids if running(pid)]
    assert instance.statuses() == {"sent": 1}
    assert instance.problems() == []
