"""`make run` as a user runs it: ``python -m scripts.native run --data DIR`` in the foreground.

It says it is up, takes DCMTK's echo and stores, stops everything it started on Ctrl-C (exit 0),
finds its instances again when started on the same data directory, stops the whole stack when
one of its services dies (exit 1), and refuses to start, in one line and exit 1, with a bad
setting or a port in use. Nothing here uses ``Stack``: the runner is a subprocess in its
own process group, on its own ports, PostgreSQL database and RabbitMQ vhost (the
``MINIPACS_NATIVE_*`` overrides), so a user's own ``make run`` is left alone.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import psutil
import pytest
from minio import Minio

from scripts.native import (
    ROOT,
    SERVICES,
    drop_database,
    drop_vhost,
    free_port,
    free_port_block,
)
from shared.lifecycle import EX_CONFIG
from tests.dicomgen import Made, small_set
from tests.e2e.test_find import findscu
from tests.helpers import dcmtk, dcmtk_env, pg, s3_objects, storescu, wait_until

pytestmark = pytest.mark.e2e

READY = "minipacs is up"
START_DEADLINE = 180.0  # PostgreSQL / RabbitMQ checks, SeaweedFS start, migrations, services
STOP_DEADLINE = 120.0   # the runner waits up to 30 s for each child before it kills it
EVERYTHING = {"s3", *SERVICES}


@dataclass(frozen=True)
class Target:
    """Where one runner's stack lives: ports, database, vhost, data directory."""

    data: Path
    gateway_port: int
    s3_port: int
    database: str
    vhost: str

    def env(self) -> dict[str, str]:
        # nothing of the caller's own minipacs settings (MINIPACS_DATA, _GATEWAY_AET...)
        env = {k: v for k, v in os.environ.items() if not k.startswith("MINIPACS_")}
        return {**env,
                "MINIPACS_GATEWAY_PORT": str(self.gateway_port),
                "MINIPACS_NATIVE_S3_PORT": str(self.s3_port),
                "MINIPACS_NATIVE_DATABASE": self.database,
                "MINIPACS_NATIVE_VHOST": self.vhost}

    def dsn(self) -> str:
        return f"postgresql://minipacs@127.0.0.1:5432/{self.database}"


class Runner:
    """``python -m scripts.native run`` as a subprocess in a process group of its own; a
    thread reads its output line by line, and callers wait on that with a deadline."""

    def __init__(self, target: Target, extra_env: dict[str, str] | None = None) -> None:
        self.target = target
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "scripts.native", "run", "--data", str(target.data)],
            cwd=ROOT, env={**target.env(), **(extra_env or {})}, stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, errors="replace",
            start_new_session=True)
        self.pgid = self.proc.pid  # start_new_session: it leads its own group
        self._lines: list[str] = []
        self._eof = False
        self._cond = threading.Condition()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        self.children: list[psutil.Process] = []

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            with self._cond:
                self._lines.append(line)
                self._cond.notify_all()
        with self._cond:
            self._eof = True
            self._cond.notify_all()

    def output(self, tail: int = 4000) -> str:
        with self._cond:
            return "".join(self._lines)[-tail:]

    def wait_for_line(self, text: str, timeout: float) -> str:
        """The first output line containing ``text``; fails at the deadline or when the
        output ends without it."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                for line in self._lines:
                    if text in line:
                        return line
                if self._eof:
                    raise AssertionError(f"runner's output ended (rc {self.proc.poll()}) "
                                         f"without {text!r}:\n{self.output()}")
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise AssertionError(f"no {text!r} from the runner within {timeout}s:\n"
                                         f"{self.output()}")
                self._cond.wait(remaining)

    def services(self) -> dict[str, psutil.Process]:
        """The runner's children by service name (``s3`` is SeaweedFS' ``weed mini``); also
        remembers every descendant, to check later that none is left."""
        self.children = psutil.Process(self.proc.pid).children(recursive=True)
        found: dict[str, psutil.Process] = {}
        for child in self.children:
            cmd = child.cmdline()
            if cmd and Path(cmd[0]).name == "weed" and "mini" in cmd:
                found["s3"] = child
                assert f"-s3.port={self.target.s3_port}" in cmd, cmd
            for name in SERVICES:
                if f"services.{name}" in cmd:
                    found[name] = child
        return found

    def wait_exit(self, timeout: float = STOP_DEADLINE) -> int:
        try:
            rc = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"runner still running {timeout}s after the signal:\n"
                                 f"{self.output()}") from None
        self._reader.join(30)  # the rest of its output
        return rc

    def left_behind(self) -> list[str]:
        """Descendants (as remembered by ``services()``) that still run after the runner."""
        return [f"{p.pid} {' '.join(p.cmdline())}" for p in self.children if _alive(p)]

    def kill_all(self) -> None:
        """Teardown: whatever is left of the group, SIGKILLed."""
        try:
            os.killpg(self.pgid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        for p in self.children:  # in case one left the group
            if _alive(p):
                p.kill()
        if self.proc.poll() is None:
            self.proc.wait(30)


def _alive(p: psutil.Process) -> bool:
    try:
        return p.is_running() and p.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


@pytest.fixture()
def new_target(tmp_path: Path) -> Iterator[Target]:
    tag = f"native_{os.getpid()}_{uuid.uuid4().hex[:6]}"
    target = Target(data=tmp_path / "data", gateway_port=free_port(),
                    s3_port=free_port_block(), database=f"minipacs_{tag}",
                    vhost=f"minipacs_{tag}")
    yield target
    drop_database(target.database)
    drop_vhost(target.vhost)


@pytest.fixture()
def start(new_target: Target) -> Iterator[list[Runner]]:
    """Runners started by the test, killed at the end whatever happened."""
    runners: list[Runner] = []
    yield runners
    for runner in runners:
        runner.kill_all()


def _start(runners: list[Runner], target: Target) -> tuple[Runner, dict[str, psutil.Process]]:
    runner = Runner(target)
    runners.append(runner)
    line = runner.wait_for_line(READY, START_DEADLINE)
    assert f"MINIPACS@127.0.0.1:{target.gateway_port}" in line, line
    services = runner.services()
    assert set(services) == EVERYTHING, (services, runner.output())
    return runner, services


def _indexed(target: Target, made: list[Made]) -> int:
    rows = pg(target.dsn(), "SELECT count(*) AS n FROM instance "
              "WHERE sop_instance_uid = ANY($1::text[])", [m.sop_uid for m in made])
    return int(rows[0]["n"])


def _wait_indexed(target: Target, made: list[Made], timeout: float = 60.0) -> None:
    wait_until(lambda: _indexed(target, made) >= len(made), timeout,
               what=f"{len(made)} acknowledged instances indexed")


def _assert_all_gone(runner: Runner) -> None:
    left = runner.left_behind()
    assert not left, f"still running after the runner exited: {left}\n{runner.output()}"


def _vhost_queues(vhost: str) -> set[str]:
    out = subprocess.run(["rabbitmqctl", "-q", "list_queues", "-p", vhost, "name",
                          "--no-table-headers"], capture_output=True, text=True, check=True)
    return {line.strip() for line in out.stdout.splitlines() if line.strip()}


def test_run_store_ctrl_c_and_run_again(start: list[Runner], new_target: Target,
                                        tmp_path: Path) -> None:
    target = new_target
    made = small_set(tmp_path / "in", patients=1, studies=1, series=1, per_series=4,
                     tag=f"native-{uuid.uuid4().hex[:8]}")
    study, series = made[0].study_uid, made[0].series_uid
    port = target.gateway_port

    # 1. up, on our ports, database and vhost
    runner, services = _start(start, target)
    assert "storage.instances" in _vhost_queues(target.vhost)

    # 2. DCMTK: echo, then store; acknowledged instances end up in the index
    echo = subprocess.run([dcmtk("echoscu"), "-v", "-aec", "MINIPACS", "127.0.0.1", str(port)],
                          capture_output=True, text=True, env=dcmtk_env(), timeout=60)
    assert echo.returncode == 0, echo.stdout + echo.stderr
    assert "Received Echo Response (Success)" in echo.stdout + echo.stderr
    sent = storescu(port, [m.path for m in made], timeout=120)
    assert (sent.returncode, sent.successes, sent.failures) == (0, len(made), 0), sent.output
    _wait_indexed(target, made)

    # 3. SIGINT to the runner alone: it must stop its children itself (a terminal's Ctrl-C
    # also reaches them directly, which would hide a runner that forgets them)
    assert all(_alive(p) for p in services.values())
    os.kill(runner.proc.pid, signal.SIGINT)
    assert runner.wait_exit() == 0, runner.output()
    _assert_all_gone(runner)

    # 4. again on the same data directory: same instances, in the index and in S3
    runner, services = _start(start, target)
    assert _indexed(target, made) == len(made)
    found = findscu(port, ["QueryRetrieveLevel=IMAGE", f"StudyInstanceUID={study}",
                           f"SeriesInstanceUID={series}", "SOPInstanceUID"])
    assert found.final == "Success", found.output
    assert found.values("SOPInstanceUID") == sorted(m.sop_uid for m in made), found.output
    keys = pg(target.dsn(), "SELECT object_key, size FROM instance "
              "WHERE sop_instance_uid = ANY($1::text[])", [m.sop_uid for m in made])
    stored = s3_objects(Minio(f"127.0.0.1:{target.s3_port}", access_key="minipacs",
                              secret_key="minipacs-secret", secure=False), "minipacs")
    assert {r["object_key"]: r["size"] for r in keys}.items() <= stored.items()

    # and Ctrl-C as a terminal sends it: SIGINT to the whole process group
    os.killpg(runner.pgid, signal.SIGINT)
    assert runner.wait_exit() == 0, runner.output()
    _assert_all_gone(runner)


def test_a_dead_service_stops_the_whole_stack(start: list[Runner], new_target: Target) -> None:
    runner, services = _start(start, new_target)
    services["storage"].kill()  # kill -9
    runner.wait_for_line(f"storage exited with {-signal.SIGKILL}; stopping", 30)
    # not a stop that was asked for: a supervisor (systemd's Restart=on-failure) must see it
    assert runner.wait_exit() == 1, runner.output()
    _assert_all_gone(runner)


def _strays(target: Target) -> list[str]:
    """Processes of this target's stack still running: its SeaweedFS (by its S3 port) and its
    services (by their heartbeat file, under the target's data directory)."""
    found = []
    for p in psutil.process_iter(["pid", "cmdline"]):
        try:
            cmd = p.info["cmdline"] or []
            ours = f"-s3.port={target.s3_port}" in cmd or any(
                v.startswith(str(target.data)) for k, v in p.environ().items()
                if k == "MINIPACS_HEARTBEAT_FILE")
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
        if ours and _alive(p):
            found.append(f"{p.pid} {' '.join(cmd)}")
    return found


def test_a_bad_setting_stops_the_start_with_one_line(start: list[Runner],
                                                     new_target: Target) -> None:
    """A malformed MINIPACS_NODES (the Orthanc-style node list) ends the gateway at once
    with a line that names the variable, and the runner stops everything at once instead of
    waiting for a gateway port that will never open; no Python traceback for the admin."""
    runner = Runner(new_target, {"MINIPACS_NODES": '{"archive": ["ARCHIVE", "127.0.0.1"'})
    start.append(runner)
    assert runner.wait_exit(START_DEADLINE) == 1, runner.output()
    out = runner.output(tail=100_000)
    assert "gateway: configuration error: MINIPACS_NODES is not JSON" in out, out
    assert (f"minipacs: cannot start: gateway exited with {EX_CONFIG} during start-up"
            in out), out
    assert "Traceback" not in out, out
    assert READY not in out, out
    assert not _strays(new_target), out


def test_a_busy_port_is_refused_before_anything_starts(start: list[Runner],
                                                       new_target: Target) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", new_target.gateway_port))
        busy.listen()
        runner = Runner(new_target)
        start.append(runner)
        assert runner.wait_exit(START_DEADLINE) == 1, runner.output()
    out = runner.output(tail=100_000)
    assert (f"minipacs: cannot start: port(s) [{new_target.gateway_port}] already in use"
            in out), out
    assert "Traceback" not in out, out
    assert "s3       |" not in out, out  # SeaweedFS was never started
    assert not _strays(new_target), out
