"""RELIABILITY, load: sustained ingest for ten minutes with a component killed (or RabbitMQ
restarted) every couple of minutes.

Two modalities (DCMTK ``storescu``) send a new patient of 20 small instances about every
second; when a run fails part-way (the gateway is down, the broker is away) the modality sends
what was not acknowledged again, as modalities do. In turn, every ``SOAK / 5`` seconds: storage, the
indexer and the gateway are SIGKILLed and started again once work has piled up behind them, and
RabbitMQ is stopped and started (``stop_app`` / ``start_app``). At the end:

- every instance the modalities were told Success for, and every one they sent again after,
  is indexed exactly once and stored byte-identical; nothing is dead-lettered;
- the spool is empty: staging leftovers of cut transfers swept, files a killed gateway left
  without the broker's answer announced again;
- memory stays flat: for each service process that ran for a minute and a whole restart period
  after it, its resident memory at the end is within ``GROWTH_MAX`` of what it was a minute
  into its life (the figures are printed).

``MINIPACS_SOAK_SECONDS`` shortens it for development (default 600).
"""

from __future__ import annotations

import os
import re
import subprocess
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import psutil
import pytest

from scripts.native import Stack, port_open
from shared import topology
from tests.conftest import dsn, make_stack, teardown
from tests.dicomgen import Made, small_set
from tests.e2e.test_ingest import assert_stored_byte_identical
from tests.helpers import dead_letters, pg, queue_counts, storescu, wait_until

SOAK = float(os.environ.get("MINIPACS_SOAK_SECONDS", "600"))

pytestmark = [pytest.mark.e2e, pytest.mark.slow, pytest.mark.timeout(int(SOAK) + 900)]
PERIOD = SOAK / 5  # between two faults
SENDERS = 2
PACE = 1.0  # s between two storescu runs of one modality
GROWTH_MAX = 64 * 1024 * 1024  # bytes of resident memory a long-lived service may gain
SETTLED_AFTER = min(60.0, PERIOD / 2)  # s into a process's life: its memory's baseline
_SENT = re.compile(r"Sending file: (\S+)|Received Store Response \((\w+)")


def acknowledged(output: str) -> set[str]:
    """The files of one ``storescu -v`` run that got a Success response."""
    ok: set[str] = set()
    current = None
    for match in _SENT.finditer(output):
        if match.group(1):
            current = match.group(1)
        elif current is not None:
            if match.group(2) == "Success":
                ok.add(current)
            current = None
    return ok


@dataclass
class Modality:
    """Sends patient after patient until ``stop``; keeps what was not acknowledged to send
    again."""

    stack: Stack
    folder: Path
    name: str
    stop: threading.Event
    made: list[Made] = field(default_factory=list)
    acked: set[str] = field(default_factory=set)
    pending: list[Made] = field(default_factory=list)
    failed_runs: int = 0

    def send(self) -> None:
        result = storescu(self.stack.config.gateway_port, [m.path for m in self.pending],
                          timeout=120)
        ok = acknowledged(result.output)
        self.acked |= {m.sop_uid for m in self.pending if str(m.path) in ok}
        self.pending = [m for m in self.pending if m.sop_uid not in self.acked]

    def run(self) -> None:
        patient = 0
        while not self.stop.is_set():
            if not self.pending:
                self.pending = small_set(self.folder / f"p{patient}", patients=1, studies=2,
                                         series=2, per_series=5, tag=f"{self.name}x{patient}")
                self.made += self.pending
                patient += 1
            self.send()
            if self.pending:
                self.failed_runs += 1
            # the modality's pace (a patient a second or so), and its retry interval: not a
            # synchronisation
            self.stop.wait(PACE)


@dataclass
class Memory:
    """Resident memory of each service process over its life: (seconds alive, bytes)."""

    samples: dict[tuple[str, int], list[tuple[float, int]]] = field(default_factory=dict)

    def sample(self, stack: Stack) -> None:
        for name, proc in list(stack.procs.items()):
            if name == "s3" or proc.poll() is not None:
                continue
            try:
                p = psutil.Process(proc.pid)
                alive, rss = time.time() - p.create_time(), p.memory_info().rss
            except psutil.Error:
                continue
            self.samples.setdefault((name, proc.pid), []).append((alive, rss))

    def growth(self, lived: float) -> dict[str, tuple[float, int, int]]:
        """Per process that lived at least ``lived`` s: (lifetime, baseline, last) bytes."""
        out = {}
        for (name, pid), series in self.samples.items():
            if series[-1][0] < lived:
                continue
            baseline = next(rss for alive, rss in series if alive >= SETTLED_AFTER)
            out[f"{name}[{pid}]"] = (series[-1][0], baseline, series[-1][1])
        return out


def _restart_service(stack: Stack, name: str, queue: str | None) -> None:
    stack.kill(name)
    if queue is not None:  # work piles up behind the dead consumer
        before = queue_counts(stack.config.vhost)[queue]
        wait_until(lambda: queue_counts(stack.config.vhost)[queue] > before, 60, every=0.5,
                   what=f"messages piling up for the killed {name}")
    stack.start_service(name)
    if name == "gateway":
        wait_until(lambda: port_open(stack.config.gateway_port), 60, what="gateway back")


def _restart_rabbitmq() -> None:
    subprocess.run(["rabbitmqctl", "-q", "stop_app"], check=True, timeout=120,
                   capture_output=True)
    subprocess.run(["rabbitmqctl", "-q", "start_app"], check=True, timeout=120,
                   capture_output=True)
    subprocess.run(["rabbitmqctl", "-q", "await_startup"], check=True, timeout=120,
                   capture_output=True)


def _indexed(stack: Stack, sops: list[str]) -> tuple[int, int]:
    rows = pg(dsn(stack), "SELECT count(*) AS n, count(DISTINCT sop_instance_uid) AS d "
              "FROM instance WHERE sop_instance_uid = ANY($1::text[])", sops)
    return int(rows[0]["n"]), int(rows[0]["d"])


def test_ten_minutes_of_ingest_with_a_fault_every_two(tmp_path: Path) -> None:
    stack = make_stack(tmp_path, "soak", MINIPACS_SWEEP_AFTER="5",
                       MINIPACS_UNCONFIRMED_AFTER="5", MINIPACS_CONFIRM_TIMEOUT="5")
    stack.start()
    stop = threading.Event()
    modalities = [Modality(stack, tmp_path / f"m{i}", f"soak{i}", stop) for i in range(SENDERS)]
    threads = [threading.Thread(target=m.run, name=m.name, daemon=True) for m in modalities]
    memory = Memory()
    faults = [("storage", topology.STORAGE.name), ("indexer", topology.INDEXER.name),
              ("gateway", None), ("rabbitmq", None)]
    done: list[str] = []
    try:
        for t in threads:
            t.start()
        started = time.monotonic()
        next_fault = started + PERIOD
        while (now := time.monotonic()) < started + SOAK:
            memory.sample(stack)
            if now >= next_fault and len(done) < len(faults):
                name, queue = faults[len(done)]
                if name == "rabbitmq":
                    _restart_rabbitmq()
                else:
                    _restart_service(stack, name, queue)
                done.append(name)
                next_fault += PERIOD
            stop.wait(2.0)  # the memory sampling interval
        stop.set()
        for t in threads:
            t.join(180)
            assert not t.is_alive()
        memory.sample(stack)
        assert done == [name for name, _ in faults]

        # what was never acknowledged, sent again with every component up
        for m in modalities:
            if m.pending:
                m.send()
            assert m.pending == [], f"{m.name}: {len(m.pending)} still refused"
        made = [x for m in modalities for x in m.made]
        sops = [x.sop_uid for x in made]
        acked = sum(len(m.acked) for m in modalities)
        wait_until(lambda: _indexed(stack, sops) == (len(made), len(made)), 300, every=1,
                   what="every instance sent indexed once")
        assert_stored_byte_identical(stack, made)
        dead = dead_letters(stack.config.vhost)
        assert not any(dead.values()), dead
        spool = Path(stack.config.base_dir) / "spool"
        wait_until(lambda: not any((spool / "ready").iterdir())
                   and not any((spool / "incoming").iterdir()), 120, every=1,
                   what="the spool emptied by storage and its sweeper")

        growth = memory.growth(SETTLED_AFTER + PERIOD)
        print(f"\nsoak: {SOAK:.0f} s, {len(made)} instances, {acked} acknowledged "
              f"(some after a retry), {sum(m.failed_runs for m in modalities)} storescu runs "
              f"cut short by the faults {done}")
        for proc, (lived, baseline, last) in sorted(growth.items()):
            print(f"soak memory: {proc} lived {lived:.0f} s: RSS {baseline / 2**20:.1f} MiB at "
                  f"{SETTLED_AFTER:.0f} s, {last / 2**20:.1f} MiB at the end "
                  f"({(last - baseline) / 2**20:+.1f})")
        assert growth, "no service process lived long enough to judge its memory"
        assert all(last - baseline < GROWTH_MAX for _, baseline, last in growth.values()), growth
    finally:
        stop.set()
        teardown(stack)
