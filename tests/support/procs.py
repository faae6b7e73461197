"""The relay's processes as /proc shows them: the process tree, its memory and CPU
time, and a sampler of its memory over time (for the tests and bench/)."""

from __future__ import annotations

import os
import threading


def _stat_fields(pid: int) -> list[str]:
    """The fields of /proc/PID/stat after the command name (state, ppid, ...); raises
    OSError once the process is gone."""
    with open(f"/proc/{pid}/stat", encoding="ascii") as f:
        return f.read().rsplit(")", 1)[1].split()


def parent_pid(pid: int) -> int:
    """The parent of a live process (0: gone, or a zombie)."""
    try:
        state, ppid = _stat_fields(pid)[:2]
    except (OSError, ValueError):
        return 0
    return 0 if state == "Z" else int(ppid)


def running(pid: int) -> bool:
    """The process exists and is not a zombie."""
    return parent_pid(pid) != 0


def child_pids(pid: int) -> list[int]:
    """The live children of `pid`: /proc/PID/task/*/children where the kernel has it
    (CONFIG_PROC_CHILDREN), else a scan of /proc for processes whose parent it is."""
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return []  # gone
    if not os.path.exists(f"/proc/{pid}/task/{pid}/children"):
        return sorted(
            int(e) for e in os.listdir("/proc") if e.isdigit() and parent_pid(int(e)) == pid
        )
    found: set[int] = set()
    for task in tasks:
        try:
            with open(f"/proc/{pid}/task/{task}/children", encoding="ascii") as f:
                found.update(int(child) for child in f.read().split())
        except OSError:
            continue  # the thread or the process ended meanwhile
    return sorted(found)


def process_tree(pid: int) -> list[int]:
    """`pid` and its live descendants (the relay and its delivery process)."""
    found, todo = [], [pid]
    while todo:
        current = todo.pop()
        found.append(current)
        todo.extend(child_pids(current))
    return found


def _kib_line(path: str, key: str) -> int:
    """The `key:   N kB` line of a /proc file, in KiB; 0 once the process is gone or
    where the file or the line is missing."""
    try:
        with open(path, encoding="ascii") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def proc_status_kib(pid: int, key: str) -> int:
    """A size line of /proc/PID/status (`VmRSS`, `VmHWM`) in KiB; 0 once the process is gone."""
    return _kib_line(f"/proc/{pid}/status", key)


def pss_kib(pid: int, kind: str = "Pss") -> int:
    """The proportional set size of one process in KiB (its share of the pages it
    shares); 0 once it is gone or where smaps_rollup is missing (Linux < 4.14).
    `kind="Pss_Anon"`: only its anonymous pages (heap, stacks), which no file backs,
    so that no process outside its own process tree can share them, unlike the pages
    of the interpreter and its libraries."""
    return _kib_line(f"/proc/{pid}/smaps_rollup", kind)


def context_switches(pid: int) -> int:
    """Every time any thread of `pid` was switched out so far: its wake-ups, near
    enough (0 once it is gone)."""
    total = 0
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return 0
    for task in tasks:
        try:
            with open(f"/proc/{pid}/task/{task}/status", encoding="ascii") as f:
                for line in f:
                    if line.startswith(("voluntary_ctxt_switches", "nonvoluntary_ctxt_switches")):
                        total += int(line.split()[1])
        except OSError:
            continue
    return total


def vm_rss_kib(pid: int) -> int:
    """The resident memory of one process in KiB (0 once it is gone)."""
    return proc_status_kib(pid, "VmRSS")


def reset_peak_rss(pid: int) -> bool:
    """Set a process's VmHWM back to its current RSS (Linux 4.0+: "5" to clear_refs)."""
    try:
        with open(f"/proc/{pid}/clear_refs", "w", encoding="ascii") as f:
            f.write("5")
    except OSError:
        return False
    return True


def cpu_seconds(pid: int, reaped: bool = False) -> float:
    """User + system CPU time of a live process, from /proc (0.0 once it is gone); with
    `reaped`, that of the children it has waited for too (cutime + cstime)."""
    try:
        fields = _stat_fields(pid)
    except OSError:
        return 0.0
    # After the command name: utime is the 12th field, stime the 13th, then cutime, cstime.
    ticks = fields[11:15] if reaped else fields[11:13]
    return sum(int(t) for t in ticks) / os.sysconf("SC_CLK_TCK")


def tree_cpu_seconds(pid: int) -> float:
    """CPU time of `pid` and its live descendants, each with its reaped children: the
    whole work of a process tree whose workers come and go (Postfix's smtpd, cleanup,
    smtp...). A worker that exits between two reads may be missed or counted twice."""
    return sum(cpu_seconds(p, reaped=True) for p in process_tree(pid))


class RssSampler:
    """Samples the RSS of a process tree every `every` seconds in a thread, from
    `start()` to `stop()` (or while the `with` block runs): `baseline` (KiB per pid,
    taken at the start), `peak` (the largest total), `peaks` (per pid), and split into
    [the process itself, its descendants] (the relay and its delivery process):
    `idle_split` at the start, `peak_split` the largest of each, `at_peak` the split of
    the sample with the largest total. The descendants are looked up at each sample, so
    a delivery process started again is followed. Figures in MiB through
    `growth_mib`/`summary`."""

    def __init__(self, pid: int, every: float = 0.02) -> None:
        self.pid = pid
        self.every = every
        self.baseline: dict[int, int] = {}
        self.peaks: dict[int, int] = {}
        self.peak = 0
        self.idle_split = [0, 0]
        self.peak_split = [0, 0]
        self.at_peak = [0, 0]
        self.samples = 0  # taken after the baseline
        self._halt = threading.Event()
        self._thread = threading.Thread(target=self._run, name="rss-sampler")

    @staticmethod
    def read(pid: int) -> int:
        """One process's memory in KiB (0 once it is gone)."""
        return vm_rss_kib(pid)

    def sample(self) -> dict[int, int]:
        return {p: self.read(p) for p in process_tree(self.pid)}

    def _split(self, rss: dict[int, int]) -> list[int]:
        return [rss.get(self.pid, 0), sum(kib for p, kib in rss.items() if p != self.pid)]

    def _record(self, rss: dict[int, int]) -> None:
        for p, kib in rss.items():
            self.peaks[p] = max(self.peaks.get(p, 0), kib)
        total = sum(rss.values())
        if total > self.peak:
            self.peak, self.at_peak = total, self._split(rss)
        self.peak_split = [max(a, b) for a, b in zip(self.peak_split, self._split(rss))]

    def _run(self) -> None:
        while not self._halt.wait(self.every):
            self._record(self.sample())
            self.samples += 1

    def start(self) -> RssSampler:
        self.baseline = self.sample()
        self.idle_split = self._split(self.baseline)
        self._record(self.baseline)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._halt.set()
        self._thread.join(10)
        self._record(self.sample())
        self.samples += 1

    def __enter__(self) -> RssSampler:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

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


class PssSampler(RssSampler):
    """The same of the proportional set size (`pss_kib`: pages shared between the
    processes, or with others, counted once). Reading smaps_rollup walks the process's
    page tables under its memory-map lock (~0.3 ms of the reader's CPU for a 25 MiB
    Python process), so sample every 0.1 s or more, not every 20 ms."""

    @staticmethod
    def read(pid: int) -> int:
        return pss_kib(pid)
