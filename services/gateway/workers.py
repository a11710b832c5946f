"""Several gateway processes on one DICOM port (``MINIPACS_GATEWAY_PROCESSES`` > 1).

One Python process uses one core at most (the GIL): a single gateway acknowledges about as
many small instances per second as one core can receive, fsync and publish, however many cores
the machine has (``docs/benchmarks-history.md``, session 11). With N processes, each a whole
gateway with its own broker and database connections, all listening on the same port with
``SO_REUSEPORT``, the kernel spreads new associations over them.

This parent process only supervises: it starts the workers (``python -m services.gateway``
with ``MINIPACS_GATEWAY_WORKER=<i>``), starts again one that dies, passes SIGTERM / SIGINT on
and waits for them to finish their associations, and keeps the gateway's heartbeat fresh while
every worker's own heartbeat is. A worker's logs name it (``gateway.2``); association numbers
are per worker. ``MINIPACS_MAX_ASSOCIATIONS`` applies to each worker.
"""

from __future__ import annotations

import ctypes
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import FrameType

from shared.lifecycle import heartbeat_fresh, heartbeat_path
from shared.logs import configure
from shared.settings import GatewaySettings

WORKER_ENV = "MINIPACS_GATEWAY_WORKER"
RESTART_AFTER = 2.0  # s: a worker that died is started again at most this often
_PR_SET_PDEATHSIG = 1

log = logging.getLogger("minipacs.gateway")


def worker_number() -> int:
    """This process's worker number, 0 when it is not a worker of a supervisor."""
    value = os.environ.get(WORKER_ENV, "")
    return int(value) if value.isdigit() else 0


def _die_with_parent() -> None:
    """In the worker, before exec: SIGTERM when the supervisor dies, even by ``kill -9``, so
    no worker is left holding the port."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


def supervise(settings: GatewaySettings) -> int:
    configure(settings.log_level, "gateway")
    alive = heartbeat_path(settings.heartbeat_file, "gateway")
    beats = {i: f"{alive}.{i}" for i in range(1, settings.gateway_processes + 1)}

    def spawn(i: int) -> subprocess.Popen[bytes]:
        env = {**os.environ, WORKER_ENV: str(i), "MINIPACS_HEARTBEAT_FILE": beats[i]}
        return subprocess.Popen([sys.executable, "-m", "services.gateway"], env=env,
                                preexec_fn=_die_with_parent)

    workers = {i: spawn(i) for i in beats}
    started = dict.fromkeys(beats, time.monotonic())
    stopping: list[int] = []

    def forward(signum: int, _frame: FrameType | None) -> None:
        stopping.append(signum)
        for proc in workers.values():
            if proc.poll() is None:
                proc.send_signal(signum)

    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)
    log.info("gateway: %d worker processes on port %d", len(workers), settings.gateway_port)
    while workers:
        time.sleep(0.5)
        for i, proc in list(workers.items()):
            if proc.poll() is None:
                continue
            if stopping:
                del workers[i]
            elif time.monotonic() - started[i] >= RESTART_AFTER:
                log.error("gateway worker %d exited with status %s; starting it again", i,
                          proc.returncode)
                workers[i] = spawn(i)
                started[i] = time.monotonic()
        if not stopping and all(heartbeat_fresh(beats[i]) for i in workers):
            Path(alive).touch()
    log.info("gateway stopped (%d workers)", len(beats))
    return 0
