"""CPU seconds spent by a changing set of processes over a time window.

A sampler thread re-reads the set every ``every`` seconds, so processes that start during the
window (new PostgreSQL backends, storescp's forked children) are counted too. Processes that
exist at the start only count what they spend after it.
"""

from __future__ import annotations

import contextlib
import re
import resource
import threading
from collections.abc import Callable, Iterable

import psutil

Key = tuple[str, int, float]  # (group, pid, create time)
Selector = Callable[[], Iterable[tuple[str, psutil.Process]]]

_BACKEND = re.compile(r"postgres: (?:[^:]+: )?(\S+) (\S+) (?:\d[\d.]*\(\d+\)|\[local\])")


def own_seconds(proc: psutil.Process) -> float:
    t = proc.cpu_times()
    return float(t.user + t.system)


def reaped_seconds(proc: psutil.Process) -> float:
    t = proc.cpu_times()
    return float(t.children_user + t.children_system)


def tree(roots: Iterable[psutil.Process]) -> list[psutil.Process]:
    """The roots and all their descendants that still exist (zombies included)."""
    out: list[psutil.Process] = []
    for root in roots:
        out.append(root)
        with contextlib.suppress(psutil.Error):
            out.extend(root.children(recursive=True))
    return out


def named(name: str) -> list[psutil.Process]:
    out = []
    for proc in psutil.process_iter(["name"]):
        if proc.info["name"] == name:
            out.append(proc)
    return out


def postgres_for(database: str) -> list[psutil.Process]:
    """The PostgreSQL server processes: postmaster, background workers, and the client
    backends of ``database`` (backends of other databases belong to other people's runs)."""
    out = []
    for proc in named("postgres"):
        try:
            title = " ".join(proc.cmdline())
        except psutil.Error:
            continue
        m = _BACKEND.search(title)
        if m is None or m.group(2) == database:
            out.append(proc)
    return out


def rabbitmq() -> list[psutil.Process]:
    return named("beam.smp")


def busy_seconds() -> float:
    """Machine-wide CPU seconds spent running something so far (not idle, iowait, steal;
    guest time is already inside user)."""
    t = psutil.cpu_times()
    return float(sum(getattr(t, f, 0.0) for f in ("user", "nice", "system", "irq", "softirq")))


def rusage_seconds(who: int) -> float:
    r = resource.getrusage(who)
    return r.ru_utime + r.ru_stime


class CpuMeter:
    """``start()`` ... ``stop()`` -> CPU seconds per group spent by the (group, process)
    pairs ``select`` returns.

    With ``reaper`` set, children of that process which exit and are reaped during the
    window are counted through its ``children_*`` times (storescp ``--fork``), not sampled.
    """

    def __init__(self, select: Selector, reaper: tuple[str, psutil.Process] | None = None,
                 every: float = 0.5) -> None:
        self.select = select
        self.reaper = reaper
        self.every = every
        self.base: dict[Key, float] = {}
        self.last: dict[Key, float] = {}
        self._reaped0 = 0.0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _sample(self) -> dict[Key, float]:
        seen: dict[Key, float] = {}
        for group, proc in self.select():
            try:
                seen[(group, proc.pid, proc.create_time())] = own_seconds(proc)
            except psutil.Error:
                continue
        return seen

    def _loop(self) -> None:
        while not self._stop.wait(self.every):
            self.last.update(self._sample())

    def start(self) -> CpuMeter:
        self.base = self._sample()
        self.last = dict(self.base)
        if self.reaper is not None:
            self._reaped0 = reaped_seconds(self.reaper[1])
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()
        return self

    def stop(self) -> dict[str, float]:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        final = self._sample()
        self.last.update(final)
        groups: dict[str, float] = {}
        for key, value in self.last.items():
            if self.reaper is not None and key not in final and key not in self.base:
                continue  # exited and reaped: counted below through the reaper
            groups[key[0]] = groups.get(key[0], 0.0) + value - self.base.get(key, 0.0)
        if self.reaper is not None:
            group, proc = self.reaper
            with contextlib.suppress(psutil.Error):
                groups[group] = groups.get(group, 0.0) + reaped_seconds(proc) - self._reaped0
        return groups
