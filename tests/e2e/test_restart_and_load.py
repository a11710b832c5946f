"""RELIABILITY, the whole stack: stopped and started again in the middle of an ingest (what
`make run`'s Ctrl-C or `docker compose restart` does), and tens of modalities sending at once.
Every acknowledged instance ends up stored byte-identical and indexed exactly once."""

from __future__ import annotations

import signal
import subprocess
import threading
from collections.abc import Sequence
from pathlib import Path

import pytest

from scripts.native import Stack, port_open
from shared import topology
from tests.conftest import dsn, make_stack, teardown
from tests.dicomgen import Made, ct_series, small_set
from tests.e2e.test_ingest import assert_stored_byte_identical, indexed
from tests.helpers import (
    StoreResult,
    dcmtk,
    dcmtk_env,
    pg,
    queue_counts,
    storescu,
    wait_until,
)

pytestmark = [pytest.mark.e2e, pytest.mark.slow]


def _dead_letters(stack: Stack) -> dict[str, int]:
    return {n: c for n, c in queue_counts(stack.config.vhost).items() if n.endswith(".dead")}


def _acknowledged(made: Sequence[Made], output: str) -> list[Made]:
    """storescu sends its files in order and stops at the first failure: the Successes are the
    first ones."""
    return list(made[:output.count("Received Store Response (Success)")])


def _ingest_under_way(stack: Stack, tmp: Path, tag: str, count: int, size: int
                      ) -> tuple[list[Made], list[str], subprocess.Popen[str]]:
    """A CT series on its way in from one ``storescu -v``, once a few of it are indexed."""
    made = ct_series(tmp / "ct", count=count, tag=tag, size=size)
    study = [made[0].study_uid]
    sender = subprocess.Popen(
        [dcmtk("storescu"), "-v", "-aec", "MINIPACS", "127.0.0.1",
         str(stack.config.gateway_port), *[str(m.path) for m in made]],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=dcmtk_env())
    wait_until(lambda: indexed(stack, study) >= 5, 120, what="ingest under way")
    return made, study, sender


def _all_lands_once(stack: Stack, made: list[Made], study: list[str],
                    acknowledged: list[Made]) -> None:
    """After the start: every instance acknowledged before is indexed; the modality sends
    the rest again (if the association was cut short) and all of it lands once,
    byte-identical, with nothing dead-lettered."""
    wait_until(lambda: indexed(stack, study) >= len(acknowledged), 180,
               what="every instance acknowledged before the stop indexed after the start")
    rest = made[len(acknowledged):]
    if rest:
        again = storescu(stack.config.gateway_port, [m.path for m in rest])
        assert again.successes == len(rest), again.output[-1500:]
    wait_until(lambda: indexed(stack, study) == len(made), 180, what="the whole series indexed")
    assert_stored_byte_identical(stack, made)
    dead = _dead_letters(stack)
    assert dead and not any(dead.values()), dead


def test_whole_stack_stopped_mid_ingest_and_started_again(tmp_path: Path) -> None:
    stack = make_stack(tmp_path, "restart")
    stack.start()
    try:
        made, study, sender = _ingest_under_way(stack, tmp_path, "restart-ct", 200, 256)
        stack.stop()  # SIGTERM to every service, then the S3 store
        output, _ = sender.communicate(timeout=120)
        acknowledged = _acknowledged(made, output)
        assert len(acknowledged) >= 5, output[-1500:]
        # The gateway lets a running association finish when it is stopped; storage and the
        # indexer stop at once: acknowledged instances wait in the spool and the broker.
        assert indexed(stack, study) < len(acknowledged)

        stack.start()
        _all_lands_once(stack, made, study, acknowledged)
        for name in ("storage", "indexer", "gateway"):
            assert "Traceback" not in stack.log_text(name), stack.log_text(name)[-3000:]
    finally:
        teardown(stack)


def test_whole_stack_killed_mid_ingest_and_started_again(tmp_path: Path) -> None:
    """``kill -9`` of every process (a crash, the OOM killer, ``docker kill``): nothing gets
    to finish. Storage and the indexer die first, so acknowledged instances are waiting in the
    broker when the gateway and the S3 store die in the middle of the association; after the
    start every one of them is stored and indexed once, and the resent rest lands once."""
    stack = make_stack(tmp_path, "crash")
    stack.start()
    try:
        made, study, sender = _ingest_under_way(stack, tmp_path, "crash-ct", 1000, 128)
        stack.kill("storage", signal.SIGKILL)
        stack.kill("indexer", signal.SIGKILL)
        wait_until(lambda: queue_counts(stack.config.vhost).get(topology.STORAGE.name, 0) >= 5, 60,
                   what="acknowledged instances waiting in the broker")
        for name in list(stack.procs):  # the gateway mid-association, the mover, SeaweedFS
            stack.kill(name, signal.SIGKILL)
        output, _ = sender.communicate(timeout=120)
        acknowledged = _acknowledged(made, output)
        assert len(acknowledged) >= 10, output[-1500:]
        assert indexed(stack, study) < len(acknowledged)
        print(f"acknowledged before the kill: {len(acknowledged)} of {len(made)}")

        stack.start()
        _all_lands_once(stack, made, study, acknowledged)
    finally:
        teardown(stack)


def test_rabbitmq_restarted_mid_ingest(tmp_path: Path) -> None:
    """The broker itself stopped and started (``rabbitmqctl stop_app`` / ``start_app``, what
    an upgrade or a crash of RabbitMQ does) in the middle of an ingest: what it confirmed
    before it stopped is still queued after it starts (quorum queues on disk), the gateway
    answered failures, never Success, while it was away, every service reconnects by itself,
    and the resent rest lands once."""
    stack = make_stack(tmp_path, "broker", MINIPACS_CONFIRM_TIMEOUT="3")
    stack.start()
    try:
        made, study, sender = _ingest_under_way(stack, tmp_path, "broker-ct", 1000, 128)
        try:
            subprocess.run(["rabbitmqctl", "-q", "stop_app"], check=True, timeout=120,
                           capture_output=True)
            output, _ = sender.communicate(timeout=120)
        finally:
            subprocess.run(["rabbitmqctl", "-q", "start_app"], check=True, timeout=120,
                           capture_output=True)
            subprocess.run(["rabbitmqctl", "-q", "await_startup"], check=True, timeout=120,
                           capture_output=True)
        acknowledged = _acknowledged(made, output)
        assert len(acknowledged) >= 5, output[-1500:]
        print(f"acknowledged before the broker stopped: {len(acknowledged)} of {len(made)}")
        wait_until(lambda: all("RabbitMQ connection restored" in stack.log_text(name)
                               for name in ("gateway", "storage", "indexer")), 120,
                   what="every service reconnected to the restarted broker")
        _all_lands_once(stack, made, study, acknowledged)
    finally:
        teardown(stack)


def test_tens_of_modalities_sending_at_once(stack: Stack, tmp_path: Path) -> None:
    """RELIABILITY's "tens of concurrent associations each sending hundreds of instances":
    24 associations at once (the gateway allows 32), each from its own storescu with 100
    instances: every instance is acknowledged, stored byte-identical and indexed, and the
    counts per patient, study and series reconcile."""
    assert port_open(stack.config.gateway_port)
    made = small_set(tmp_path / "small", patients=24, studies=1, series=2, per_series=50,
                     tag="load-24")
    by_patient: dict[str, list[Made]] = {}
    for m in made:
        by_patient.setdefault(m.patient_id, []).append(m)
    assert len(by_patient) == 24
    results: dict[str, StoreResult] = {}

    def send(patient: str, files: list[Made]) -> None:
        results[patient] = storescu(stack.config.gateway_port, [m.path for m in files])

    threads = [threading.Thread(target=send, args=item) for item in by_patient.items()]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    assert len(results) == 24
    for patient, result in results.items():
        assert result.successes == len(by_patient[patient]), (patient, result.output[-1500:])

    studies = sorted({m.study_uid for m in made})
    wait_until(lambda: indexed(stack, studies) == len(made), 180,
               what="every acknowledged instance indexed")
    assert_stored_byte_identical(stack, made)
    rows = pg(dsn(stack), "SELECT p.patient_id, st.num_series, st.num_instances FROM study st "
              "JOIN patient p ON p.id = st.patient_fk "
              "WHERE st.study_instance_uid = ANY($1::text[])", studies)
    assert len(rows) == 24
    assert {r["patient_id"] for r in rows} == set(by_patient)
    assert all(r["num_series"] == 2 and r["num_instances"] == 100 for r in rows)
