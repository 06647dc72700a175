"""Is the machine quiet enough to time on? CPU time other processes took while we timed, read from /proc.

    >>> with LoadWatch(threads=2) as watch:
    ...     time_things()
    >>> watch.stability            # Stability(stable=False, causes=('2 other processes (python3 x2) used ...',))

Where /proc is not readable (macOS, Windows) the 1-minute load average stands in.
"""
from __future__ import annotations

import os
import time
from collections import Counter

from .measurement import Stability

SPARE = 0.3  # cores others may use beyond the ones we leave free before timing counts as contended


def _smt() -> bool:
    """Whether the CPU runs two hardware threads per core (then a busy sibling slows our thread too)."""
    try:
        with open("/sys/devices/system/cpu/smt/active") as f:
            return f.read().strip() == "1"
    except OSError:
        return False


def _jiffies() -> tuple[int, int] | None:
    """(busy, total) CPU jiffies of the whole machine since boot."""
    try:
        with open("/proc/stat") as f:
            values = [int(v) for v in f.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    idle = values[3] + (values[4] if len(values) > 4 else 0)  # idle + iowait
    return sum(values) - idle, sum(values)


def _processes() -> dict[int, tuple[str, int]]:
    """{pid: (command name, user+system jiffies)} of every readable process but this one."""
    out = {}
    me = os.getpid()
    try:
        pids = [int(p) for p in os.listdir("/proc") if p.isdigit()]
    except OSError:
        return out
    for pid in pids:
        if pid == me:
            continue
        try:
            with open(f"/proc/{pid}/stat") as f:
                text = f.read()
        except OSError:
            continue
        name = text[text.find("(") + 1:text.rfind(")")]
        fields = text[text.rfind(")") + 2:].split()
        try:
            out[pid] = (name, int(fields[11]) + int(fields[12]))
        except (IndexError, ValueError):
            continue
    return out


class LoadWatch:
    """Context manager: how many cores other processes used while the block ran, against the cores and threads."""

    def __init__(self, threads: int | None = None, needs: int | None = None):
        """threads: the intra-op threads timing runs with; needs: the cores the timed work keeps busy, against
        which others' load is counted (default: threads; on a GPU, 1: the host thread that launches kernels)."""
        self.cores = os.cpu_count() or 1
        self.threads = threads or self.cores
        self.needs = needs or self.threads
        self.stability = Stability()
        self.others_cores: float | None = None

    def __enter__(self) -> "LoadWatch":
        self._wall = time.monotonic()
        self._own = sum(os.times()[:2])
        self._jiffies = _jiffies()
        self._procs = _processes() if self._jiffies else {}
        return self

    def __exit__(self, *exc) -> None:
        wall = time.monotonic() - self._wall
        if wall <= 0:
            return
        after = _jiffies()
        causes = []
        if self._jiffies and after:
            hz = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
            busy = (after[0] - self._jiffies[0]) / hz
            own = sum(os.times()[:2]) - self._own
            self.others_cores = max(busy - own, 0.0) / wall
            if self.others_cores > self._free() + SPARE:
                leave = f" (threads={max(self.threads - 1, 1)} leaves them a core)" \
                    if self.needs == self.threads else ""
                causes.append(f"{self._who(wall, hz)} used {self.others_cores:.1f} of {self.cores} cores while "
                              f"timing with {self.needs} thread(s): stop them or re-run when the machine is "
                              f"quiet{leave}")
            if own / wall > self.threads + 0.5:  # our timing runs at most `threads` cores busy
                causes.append(f"another thread of this process used the CPU while timing ({own / wall:.1f} cores "
                              f"busy for {self.threads} timing thread(s): a cell still running beside the panel?); "
                              "re-run when it has finished")
        elif hasattr(os, "getloadavg"):  # no /proc: the 1-minute load average, less our own timing threads
            others = max(os.getloadavg()[0] - self.threads, 0.0)
            if others > self._free() + 1:
                causes.append(f"the load average is {others + self.threads:.1f} on {self.cores} cores: other work "
                              "competes for the CPU; re-run when the machine is quiet")
        self.stability = Stability(not causes, tuple(causes))

    def _free(self) -> float:
        """Logical CPUs others may use without touching ours (a hardware sibling of ours counts as ours)."""
        return max(self.cores - self.needs * (2 if _smt() else 1), 0)

    def _who(self, wall: float, hz: float) -> str:
        """'2 other processes (python3 x2)': those that used at least a fifth of a core meanwhile."""
        now = _processes()
        busy = Counter()
        for pid, (name, jiffies) in now.items():
            before = self._procs[pid][1] if pid in self._procs else 0  # started meanwhile: all of it counts
            if (jiffies - before) / hz / wall >= 0.2:
                busy[name] += 1
        if not busy:
            return "other processes"
        names = ", ".join(f"{n} x{c}" if c > 1 else n for n, c in busy.most_common(3))
        total = sum(busy.values())
        return f"{total} other process{'es' if total > 1 else ''} ({names})"
