"""The servers under test: DCMTK storescp and Orthanc (peers), each started fresh and empty
for every run, and minipacs (``target``), started once per bench run."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import threading
import time
import urllib.request
from abc import ABC, abstractmethod
from pathlib import Path
from typing import TypeVar

import psutil

from bench.cpu import CpuMeter
from scripts.native import free_port, port_open, wait_for

STORESCP = "/usr/bin/storescp"  # DCMTK's, never the pynetdicom one in .venv/bin
ORTHANC = "/usr/sbin/Orthanc"


def nodelay_env() -> dict[str, str]:
    """Debian's DCMTK (and so Orthanc) leave Nagle on unless told: see PERFORMANCE.md."""
    return {**os.environ, "TCP_NODELAY": "1"}


def stock_env() -> dict[str, str]:
    """The environment without TCP_NODELAY: DCMTK as Debian ships it, Nagle on."""
    return {k: v for k, v in os.environ.items() if k != "TCP_NODELAY"}


def spawn(argv: list[str], log: Path, env: dict[str, str]) -> subprocess.Popen[bytes]:
    with log.open("ab") as out:
        return subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, env=env,
                                stdin=subprocess.DEVNULL)


def wait_exited(procs: list[subprocess.Popen[bytes]], timeout: float) -> tuple[int, ...]:
    """Exit codes of ``procs``, returned the moment the last one exits. ``Popen.wait(timeout)``
    polls with sleeps of up to 50 ms, which added up to 50 ms to every measured run (a sixth of
    a 300-instance C-GET); a blocking ``wait()`` returns at once, and a timer kills what is
    still running at the deadline (its exit code is then negative)."""
    def kill() -> None:
        for p in procs:
            if p.poll() is None:
                p.kill()

    watchdog = threading.Timer(timeout, kill)
    watchdog.daemon = True
    watchdog.start()
    try:
        return tuple(p.wait() for p in procs)
    finally:
        watchdog.cancel()


def terminate(proc: subprocess.Popen[bytes] | None, timeout: float = 20) -> None:
    if proc is None or proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(10)


class Server(ABC):
    """One server under test. ``begin`` makes it ready and empty; ``end`` cleans up."""

    name: str
    aet: str
    port: int = 0

    @abstractmethod
    def begin(self, work: Path) -> None: ...

    @abstractmethod
    def meter(self) -> CpuMeter: ...

    def indexed_after(self, t0: float, acked: int, deadline: float) -> float | None:
        """Seconds from ``t0`` until everything acknowledged is indexed (minipacs only)."""
        return None

    @abstractmethod
    def end(self) -> None: ...

    def close(self) -> None:
        self.end()


class ProcessServer(Server):
    """A peer run as one child process, restarted with an empty directory for every run.

    Each run gets a new directory, and none is removed before the bench ends (``work`` goes
    then). On ext4 without a journal (this project's test machines) creating a file skips,
    one by one, the inodes freed in the last minutes, so removing a run's thousands of files
    made every file created in the next run (by whichever server) slower:
    ``docs/benchmarks.md``, "Traps"."""

    def __init__(self) -> None:
        self.proc: subprocess.Popen[bytes] | None = None
        self.dir: Path | None = None
        self.runs = 0

    @abstractmethod
    def launch(self, folder: Path) -> subprocess.Popen[bytes]: ...

    @abstractmethod
    def ready(self) -> bool: ...

    def begin(self, work: Path, attempts: int = 3) -> None:
        """Start empty on free ports. A port picked free can be taken before the server binds
        it (the clients' own ephemeral ports come from the same range): that start fails, and
        the next attempt picks other ports. The server's log tail goes into the error."""
        for attempt in range(1, attempts + 1):
            self.runs += 1
            self.dir = work / f"{self.name}-{self.runs}"
            self.dir.mkdir(parents=True)
            self.port = free_port()
            self.proc = self.launch(self.dir)
            try:
                wait_for(f"{self.name} on port {self.port}", self._up, 60, 0.1)
                return
            except RuntimeError as exc:
                logs = sorted(self.dir.glob("*.log"))
                tail = b"".join(logs[0].read_bytes().splitlines(keepends=True)[-5:]
                                ) if logs else b""
                terminate(self.proc)
                if attempt == attempts:
                    raise RuntimeError(f"{exc}; its log ends: {tail.decode(errors='replace')}"
                                       ) from exc
                print(f"  {self.name} did not start ({exc}), again on other ports; its log "
                      f"ends: {tail.decode(errors='replace').strip()[-300:]}", flush=True)

    def _up(self) -> bool:
        if self.proc is not None and self.proc.poll() is not None:
            raise RuntimeError(f"{self.name} exited with {self.proc.returncode}")
        return self.ready()

    def process(self) -> psutil.Process:
        assert self.proc is not None
        return psutil.Process(self.proc.pid)

    def end(self) -> None:
        terminate(self.proc)
        self.proc = None
        self.dir = None  # kept until the bench ends (see the class docstring)


class StoreSCP(ProcessServer):
    """DCMTK's storescp writing files (``--fork``: one process per association)."""

    name = "storescp"
    aet = "STORESCP"

    def launch(self, folder: Path) -> subprocess.Popen[bytes]:
        out = folder / "files"
        out.mkdir()
        return spawn([STORESCP, "--fork", "-aet", self.aet, "-od", str(out), str(self.port)],
                     folder / "storescp.log", nodelay_env())

    def ready(self) -> bool:
        return port_open(self.port)

    def meter(self) -> CpuMeter:
        parent = self.process()
        return CpuMeter(lambda: [(self.name, p) for p in (parent, *parent.children())],
                        reaper=(self.name, parent))


class Orthanc(ProcessServer):
    """The Debian Orthanc with TCP_NODELAY=1, its own storage and index directories."""

    name = "orthanc"
    aet = "ORTHANC"

    def __init__(self) -> None:
        super().__init__()
        self.http_port = 0

    def config(self, folder: Path) -> dict[str, object]:
        """Its configuration file: empty directories of its own, the ports of this run."""
        return {
            "Name": "bench",
            "StorageDirectory": str(folder / "storage"),
            "IndexDirectory": str(folder / "index"),
            "DicomAet": self.aet,
            "DicomPort": self.port,
            "HttpPort": self.http_port,
            "DicomCheckCalledAet": False,
            "DicomAlwaysAllowFind": True,  # the sent -> findable poller (bench/findable.py)
            "DicomAlwaysAllowGet": True,  # the tools as shipped (bench/stock.py)
            "RemoteAccessAllowed": False,
            "AuthenticationEnabled": False,
            "Plugins": [],
        }

    def launch(self, folder: Path) -> subprocess.Popen[bytes]:
        self.http_port = free_port()
        path = folder / "orthanc.json"
        path.write_text(json.dumps(self.config(folder), indent=2))
        return spawn([ORTHANC, str(path)], folder / "orthanc.log", nodelay_env())

    def ready(self) -> bool:
        url = f"http://127.0.0.1:{self.http_port}/system"
        try:
            with urllib.request.urlopen(url, timeout=1) as reply:  # loopback only
                return bool(reply.status == 200) and port_open(self.port)
        except OSError:
            return False

    def meter(self) -> CpuMeter:
        proc = self.process()
        return CpuMeter(lambda: [(self.name, proc)])


S = TypeVar("S")


def rotated(servers: list[S], trial: int) -> list[S]:
    """The servers in this trial's order: the order rotates from trial to trial, so drift on
    the shared machine hits every server alike."""
    shift = trial % len(servers)
    return servers[shift:] + servers[:shift]


def settle(seconds: float = 0.3) -> None:
    """A short pause between runs so one server's tail does not bleed into the next."""
    time.sleep(seconds)
