"""CPU time and peak memory of process trees, read from /proc (psutil is not required)."""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from pathlib import Path

_TICK = os.sysconf("SC_CLK_TCK")


def _stat(pid: int) -> list[str] | None:
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # The command name may hold spaces; fields after it are well formed.
    return raw[raw.rindex(")") + 2 :].split()


def tree(root: int) -> list[int]:
    """``root`` and all its live descendants."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            fields = _stat(int(entry))
            if fields:
                children.setdefault(int(fields[1]), []).append(int(entry))
    out, todo = [], [root]
    while todo:
        pid = todo.pop()
        out.append(pid)
        todo += children.get(pid, [])
    return out


def cpu_seconds(pids: list[int]) -> float:
    total = 0.0
    for pid in pids:
        fields = _stat(pid)
        if fields:
            total += (int(fields[11]) + int(fields[12])) / _TICK  # utime, stime
    return total


def peak_rss_mib(pids: list[int]) -> float:
    """Sum of each process's peak resident set (VmHWM), MiB."""
    total = 0
    for pid in pids:
        try:
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("VmHWM:"):
                    total += int(line.split()[1])
        except OSError:
            pass
    return total / 1024


def machine_busy() -> tuple[float, float]:
    """(busy jiffies, total jiffies) of the whole machine, from /proc/stat."""
    fields = [int(x) for x in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    idle = fields[3] + fields[4]
    return float(sum(fields) - idle), float(sum(fields))


class Meter:
    """CPU use of some process trees and of the machine over a time window."""

    def __init__(self, roots: list[int]) -> None:
        self.roots = roots
        self.t0 = time.monotonic()
        self.pids = [p for r in roots for p in tree(r)]
        self.cpu0 = cpu_seconds(self.pids)
        self.m0 = machine_busy()

    def stop(self) -> dict[str, float]:
        wall = time.monotonic() - self.t0
        pids = sorted({p for r in self.roots for p in tree(r)} | set(self.pids))
        cpu = cpu_seconds(pids) - self.cpu0
        busy, total = machine_busy()
        return {
            "wall_s": wall,
            "proc_cpu_pct": 100.0 * cpu / wall if wall > 0 else 0.0,
            "machine_busy_pct": 100.0 * (busy - self.m0[0]) / max(1.0, total - self.m0[1]),
            "peak_rss_mib": peak_rss_mib(pids),
        }


def pids_named(*names: str) -> list[int]:
    """Live processes whose command name (``/proc/PID/comm``) is one of ``names``."""
    out = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                comm = Path(f"/proc/{entry}/comm").read_text().strip()
            except OSError:
                continue
            if comm in names:
                out.append(int(entry))
    return out


class Ledger:
    """CPU seconds of named groups of processes over a time window, and the machine's busy seconds.

    Each group is a function returning its pids, called at start and stop, so processes that
    start in the window count from zero. A process that exits inside the window loses its
    last reading; groups here are long-lived (pooled database connections, the worker's children).
    """

    def __init__(self, groups: dict[str, Callable[[], list[int]]]) -> None:
        self.groups = groups
        self.t0 = time.monotonic()
        self.m0 = machine_busy()
        self.cpu0 = {name: {p: cpu_seconds([p]) for p in find()} for name, find in groups.items()}

    def stop(self) -> tuple[float, float, dict[str, float]]:
        """(wall seconds, machine busy CPU seconds, CPU seconds per group)."""
        wall = time.monotonic() - self.t0
        busy, _ = machine_busy()
        used = {}
        for name, find in self.groups.items():
            before = self.cpu0[name]
            now = {p: cpu_seconds([p]) for p in find()}
            used[name] = sum(now[p] - before.get(p, 0.0) for p in now)
        return wall, (busy - self.m0[0]) / _TICK, used
