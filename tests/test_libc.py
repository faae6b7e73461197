"""libc.py: what each relay process sets up about itself, in a child interpreter."""

from __future__ import annotations

import subprocess
import sys

# Keeps one in 16 of 40,000 malloc'd blocks of 1,000 bytes (Python hands blocks over
# 512 bytes to malloc): what is freed between them is holes of whole pages, which
# malloc keeps until it is trimmed.
_HOLES = """
import sys
from smarthost import libc

def rss_kib():
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1])

blocks = [bytes(1000) + bytes([i % 256]) for i in range(40_000)]
kept = blocks[::16]
del blocks
before = rss_kib()
if sys.argv[1] == "trim":
    libc.release_free_memory()
print(before - rss_kib())
"""


def freed_kib(how: str) -> int:
    out = subprocess.run(
        [sys.executable, "-c", _HOLES, how], capture_output=True, text=True, check=True
    )
    return int(out.stdout)


def test_release_free_memory_gives_back_the_holes_malloc_keeps():
    assert freed_kib("keep") < 1024
    assert freed_kib("trim") > 16 * 1024  # of the ~37 MB freed
