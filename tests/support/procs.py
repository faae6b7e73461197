"""The relay's processes as /proc shows them: the process tree and its memory."""

from __future__ import annotations

import threading
from pathlib import Path


def process_tree(pid: int) -> list[int]:
    """`pid` and its live descendants (the relay and its delivery process), from
    /proc/PID/task/*/children."""
    found, todo = [], [pid]
    while todo:
        current = todo.pop()
        found.append(current)
        for children in Path(f"/proc/{current}/task").glob("*/children"):
            try:
                todo.extend(int(child) for child in children.read_text().split())
            except OSError:
                continue  # the thread or the process ended meanwhile
    return found


def vm_rss_kib(pid: int) -> int:
    """The resident memory of one process in KiB (0 once it is gone)."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


class RssSampler:
    """Samples the RSS of a process tree every `every` seconds in a thread while the
    `with` block runs: `baseline` (KiB per pid, taken on entry), `peak` (the largest
    total), `peaks` (per pid). Figures in MiB through `growth_mib`/`summary`."""

    def __init__(self, pid: int, every: float = 0.02) -> None:
        self.pid = pid
        self.every = every
        self.baseline: dict[int, int] = {}
        self.peaks: dict[int, int] = {}
        self.peak = 0
        self._halt = threading.Event()
        self._thread = threading.Thread(target=self._run, name="rss-sampler")

    def sample(self) -> dict[int, int]:
        return {p: vm_rss_kib(p) for p in process_tree(self.pid)}

    def _record(self, rss: dict[int, int]) -> None:
        for p, kib in rss.items():
            self.peaks[p] = max(self.peaks.get(p, 0), kib)
        self.peak = max(self.peak, sum(rss.values()))

    def _run(self) -> None:
        while not self._halt.wait(self.every):
            self._record(self.sample())

    def __enter__(self) -> RssSampler:
        self.baseline = self.sample()
        self._record(self.baseline)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._halt.set()
        self._thread.join(10)
        self._record(self.sample())

    @property
    def growth_mib(self) -> float:
        """Peak total minus the baseline total, in MiB."""
        return (self.peak - sum(self.baseline.values())) / 1024

    def summary(self) -> str:
        parts = [
            f"{p}: {self.baseline.get(p, 0) / 1024:.1f}->{kib / 1024:.1f}"
            for p, kib in sorted(self.peaks.items())
        ]
        return f"RSS +{self.growth_mib:.1f} MiB peak over idle (MiB per pid {', '.join(parts)})"
