"""How many CPU threads the engine steps with when the user has not fixed them: this machine's
cores minus the cores other work keeps busy, measured from /proc/stat over the last half second.

Why: the kernels split every matmul across the threads and wait for the last one. When another
process (or the hypervisor: /proc/stat's steal time) keeps a core busy, the thread that shares it
runs at a fraction of its speed and every step waits for it; one thread fewer is then faster
(mixtral-mini int4 batch-1 decode beside a busy `while True` process: 2 threads 106 t/s, 1 thread
124, against 151 idle with 2; docs/benchmarks.md, bench/threads.py). Others' load is the busy
time (user, nice, system, irq, softirq, steal) of the CPUs this process may run on (its
affinity: a container's neighbours on the rest of the host do not count) less this process's
own (/proc/self/stat), so our own threads, spinning or working, never count against us.

`ThreadGovernor.apply()` is called once a step: `threads()` reads the two files at most every
`interval` seconds, and torch's thread count is set when it changes. Without /proc (not Linux) it
keeps `cores`. torch's count is process-wide, so a governor starts from the count as it was before
any governor changed it: an engine made while an earlier one stepped with fewer threads still gets
them all back.
"""
import os
import time

import torch

_changed: tuple[int, int] | None = None  # (torch's count before a governor changed it, the count last set)


def _cores() -> int:
    """torch's thread count, as it was before a governor lowered it (unless changed since)."""
    now = torch.get_num_threads()
    return _changed[0] if _changed is not None and now == _changed[1] else now


_BUSY_FIELDS = (0, 1, 2, 5, 6, 7)  # user nice system (idle iowait) irq softirq steal of a /proc/stat "cpuN" line


def busy_ticks(stat: str, cpus: set[int]) -> int:
    """The busy ticks of the CPUs `cpus` in /proc/stat's text: only the CPUs this process may run
    on, so other work on the rest of a larger host (another container's) does not count."""
    total = 0
    for line in stat.splitlines():
        name, *fields = line.split()
        if name.startswith("cpu") and name[3:].isdigit() and int(name[3:]) in cpus:
            total += sum(int(fields[i]) for i in _BUSY_FIELDS)
    return total


def _ticks() -> tuple[int, int] | None:
    """(busy ticks of this process's CPUs, this process's ticks), or None where /proc cannot be read."""
    try:
        with open("/proc/stat") as f:
            stat = f.read()
        with open("/proc/self/stat") as f:
            own = f.read().rsplit(")", 1)[1].split()  # after the command name, which may hold spaces
        cpus = os.sched_getaffinity(0)
    except (OSError, IndexError, AttributeError):
        return None
    return busy_ticks(stat, cpus), int(own[11]) + int(own[12])  # utime, stime


class ThreadGovernor:
    """The thread count for a machine of `cores` CPUs shared with other work: `cores` minus the
    others' busy cores, rounded up from 0.4 of a core (a chosen threshold, not a measured
    crossover: only a fully busy neighbour was measured), at least 1."""

    def __init__(self, cores: int | None = None, interval: float = 0.5, clock=time.monotonic, ticks=_ticks,
                 ticks_per_second: int | None = None):
        self.cores, self.interval, self._clock, self._ticks = cores or _cores(), interval, clock, ticks
        self._hz = ticks_per_second or (os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100)
        self._chosen = self.cores
        self._last = (clock(), ticks())

    def threads(self) -> int:
        now = self._clock()
        if now - self._last[0] < self.interval:
            return self._chosen
        sample = self._ticks()
        then, before = self._last
        self._last = (now, sample)
        if sample is None or before is None:
            return self._chosen
        others = ((sample[0] - before[0]) - (sample[1] - before[1])) / self._hz / (now - then)
        self._chosen = max(1, self.cores - int(max(0.0, others) + 0.6))
        return self._chosen

    def apply(self) -> None:
        """Set torch's thread count to `threads()` if it differs (a row's bits do not depend on it)."""
        global _changed
        n = self.threads()
        if n != torch.get_num_threads():
            _changed = (_cores(), n)
            torch.set_num_threads(n)
