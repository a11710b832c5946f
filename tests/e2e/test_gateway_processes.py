"""``MINIPACS_GATEWAY_PROCESSES=2``: two gateway processes on one DICOM port
(``services/gateway/workers.py``). DCMTK's tools see one gateway; the kernel spreads their
associations over both workers; a worker that dies is started again while the other serves;
the supervisor's stop stops both, and its ``kill -9`` leaves none behind."""

from __future__ import annotations

import re
import signal
import subprocess
import sys
from pathlib import Path

import psutil
import pytest

from scripts.native import Stack
from tests.conftest import make_stack, teardown
from tests.dicomgen import ct_series, small_set
from tests.e2e.test_ingest import assert_stored_byte_identical, indexed
from tests.helpers import dcmtk, dcmtk_env, dead_letters, storescu_at_once, wait_until

pytestmark = [pytest.mark.e2e, pytest.mark.slow]


def _echo(stack: Stack) -> bool:
    out = subprocess.run([dcmtk("echoscu"), "-aec", "MINIPACS", "127.0.0.1",
                          str(stack.config.gateway_port)], capture_output=True, timeout=60,
                         env=dcmtk_env())
    return out.returncode == 0


def _workers(stack: Stack) -> dict[int, psutil.Process]:
    """The supervisor's worker processes, by worker number."""
    out = {}
    for child in psutil.Process(stack.procs["gateway"].pid).children():
        try:
            number = child.environ().get("MINIPACS_GATEWAY_WORKER", "")
        except psutil.Error:
            continue
        if number.isdigit():
            out[int(number)] = child
    return out


def _alive(proc: psutil.Process) -> bool:
    try:
        return proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def _served(stack: Stack) -> set[str]:
    """Which workers logged an accepted association."""
    return set(re.findall(r" (gateway\.\d) minipacs\.gateway: assoc=\d+ accepted",
                          stack.log_text("gateway")))


def test_two_gateway_processes_share_the_port(tmp_path: Path) -> None:
    stack = make_stack(tmp_path, "procs", MINIPACS_GATEWAY_PROCESSES="2")
    stack.start()
    try:
        wait_until(lambda: len(_workers(stack)) == 2 and stack.log_text("gateway").count(
            "listening on") == 2, 60, what="two gateway workers listening")
        # Each new association goes to one of them (by a hash of its source port): keep
        # echoing until both have served one.
        wait_until(lambda: _echo(stack) and _served(stack) == {"gateway.1", "gateway.2"}, 60,
                   every=0.0, what="associations on both workers")

        made = small_set(tmp_path / "small", patients=8, studies=1, series=2, per_series=10,
                         tag="procs")
        results = storescu_at_once(stack.config.gateway_port,
                                   [[m.path for m in made[i::8]] for i in range(8)])
        assert sum(r.successes for r in results) == len(made), [r.output[-800:] for r in results]
        studies = sorted({m.study_uid for m in made})
        wait_until(lambda: indexed(stack, studies) == len(made), 120, what="all indexed")
        assert_stored_byte_identical(stack, made)

        # A worker killed: the other goes on serving, the supervisor starts it again.
        gone = _workers(stack)[1]
        gone.kill()
        gone.wait(30)
        assert _echo(stack) or _echo(stack)  # at worst the first try hit the dead socket
        wait_until(lambda: 1 in _workers(stack) and _workers(stack)[1].pid != gone.pid, 30,
                   what="worker 1 started again")
        wait_until(lambda: stack.log_text("gateway").count("listening on") == 3, 60,
                   what="the new worker 1 listening")
        assert "gateway worker 1 exited" in stack.log_text("gateway")

        # The supervisor's health follows its workers' heartbeats.
        check = subprocess.run([sys.executable, "-m", "services.gateway", "--check"],
                               env={**stack.env, "MINIPACS_GATEWAY_PROCESSES": "2",
                                    "MINIPACS_HEARTBEAT_FILE": stack.heartbeat_file("gateway")},
                               capture_output=True, text=True, timeout=60)
        assert check.returncode == 0, check.stdout + check.stderr

        # SIGTERM (compose stop, Ctrl-C): passed on, both workers finish and exit.
        workers = list(_workers(stack).values())
        stack.kill("gateway", signal.SIGTERM)
        psutil.wait_procs(workers, timeout=60)
        assert not any(_alive(w) for w in workers)
        assert "gateway stopped (2 workers)" in stack.log_text("gateway")

        # kill -9 of the supervisor: its workers get SIGTERM and go, freeing the port.
        stack.start_service("gateway")
        wait_until(lambda: len(_workers(stack)) == 2 and _echo(stack), 60,
                   what="the gateway up again")
        workers = list(_workers(stack).values())
        stack.kill("gateway", signal.SIGKILL)
        psutil.wait_procs(workers, timeout=60)
        assert not any(_alive(w) for w in workers)
        assert not _echo(stack)
    finally:
        teardown(stack)


def _peer_ports(proc: psutil.Process, port: int, local: bool) -> set[int]:
    """The ports at the other end of ``proc``'s open connections on the DICOM port: the
    senders' ports as a worker sees them (``local``), or a sender's own."""
    try:
        conns = proc.net_connections(kind="tcp")
    except psutil.Error:
        return set()
    return {(c.raddr if local else c.laddr).port for c in conns
            if c.status == psutil.CONN_ESTABLISHED and c.laddr and c.raddr
            and (c.laddr if local else c.raddr).port == port}


def test_a_worker_killed_mid_transfer_with_storage_and_indexer(tmp_path: Path) -> None:
    """The fault test of ``test_faults.py`` with two gateway processes: four modalities send
    at once; the worker holding an association, storage and the indexer are SIGKILLed in the
    middle. The senders on the other worker finish with every instance acknowledged; the
    killed worker's senders see an abort. After storage and the indexer restart, every
    acknowledged instance is stored byte-identical and indexed once, and what the aborted
    senders send again lands too (the in-flight instance converges to one)."""
    stack = make_stack(tmp_path, "procskill", MINIPACS_GATEWAY_PROCESSES="2")
    stack.start()
    try:
        port = stack.config.gateway_port
        wait_until(lambda: len(_workers(stack)) == 2 and stack.log_text("gateway").count(
            "listening on") == 2, 60, what="two gateway workers listening")
        groups = [ct_series(tmp_path / f"ct{i}", count=150, tag=f"procskill-{i}", size=256)
                  for i in range(4)]
        senders = [subprocess.Popen(
            [dcmtk("storescu"), "-v", "-aec", "MINIPACS", "127.0.0.1", str(port),
             *[str(m.path) for m in group]], stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT, text=True, env=dcmtk_env()) for group in groups]
        studies = [group[0].study_uid for group in groups]
        wait_until(lambda: indexed(stack, studies) >= 10, 120, what="ingest under way")
        victim = wait_until(lambda: next((n for n, w in sorted(_workers(stack).items())
                                          if _peer_ports(w, port, local=True)), None), 60,
                            every=0.0, what="a worker in the middle of a transfer")
        assert victim is not None
        worker = _workers(stack)[victim]
        cut_off = [bool(_peer_ports(psutil.Process(s.pid), port, local=False)
                        & _peer_ports(worker, port, local=True)) for s in senders]
        worker.kill()
        stack.kill("storage")
        stack.kill("indexer")
        assert any(cut_off), "the killed worker held no sender's association"

        outputs = [sender.communicate(timeout=300)[0] for sender in senders]
        acknowledged = [out.count("Received Store Response (Success)") for out in outputs]
        # storescu sends its files in order: what it saw acknowledged is a prefix of its list.
        # The killed worker's senders were cut short; the others' association went on.
        for cut, n, group, out in zip(cut_off, acknowledged, groups, outputs, strict=True):
            assert (n < len(group)) if cut else (n == len(group)), out[-1500:]
        wait_until(lambda: f"gateway worker {victim} exited" in stack.log_text("gateway"), 30,
                   what="the supervisor noticing its worker's death")

        stack.start_service("storage")
        stack.start_service("indexer")
        sent_ok = [m for n, group in zip(acknowledged, groups, strict=True) for m in group[:n]]
        wait_until(lambda: indexed(stack, studies) >= len(sent_ok), 180,
                   what="every acknowledged instance indexed after the restart")
        assert_stored_byte_identical(stack, sent_ok)

        # The aborted modalities send the rest again (the restarted worker serves too).
        wait_until(lambda: len(_workers(stack)) == 2 and stack.log_text("gateway").count(
            "listening on") == 3, 60, what="the killed worker started again")
        rest = [[m.path for m in group[n:]] for n, group in zip(acknowledged, groups, strict=True)
                if group[n:]]
        results = storescu_at_once(port, rest)
        assert [r.successes for r in results] == [len(r) for r in rest], \
            [r.output[-800:] for r in results]
        everything = [m for group in groups for m in group]
        wait_until(lambda: indexed(stack, studies) == len(everything), 180, what="all indexed")
        assert_stored_byte_identical(stack, everything)
        dead = dead_letters(stack.config.vhost)
        assert not any(dead.values()), dead
    finally:
        teardown(stack)
