"""Issue 2, faults at exact steps (RELIABILITY: "a consumer killed before its side effect,
after it but before the ack, and after the ack"): each service kills itself (SIGKILL,
``shared/crash.py``) at that step, where a ``kill -9`` from outside (``test_faults.py``) only
lands at random. Restarted, it converges: every instance stored once, indexed once, counted
once, no claim-check file left, nothing dead-lettered, no conflict recorded."""

from __future__ import annotations

import re
import signal
from collections.abc import Iterator
from pathlib import Path

import pytest

from scripts.native import Stack, port_open
from shared.spool import parse_marker
from shared.topology import QUEUES
from tests.conftest import dsn, make_stack, s3_client, teardown
from tests.dicomgen import Made, ct_series
from tests.e2e.test_ingest import assert_stored_byte_identical, indexed
from tests.helpers import pg, ready_now, s3_objects, storescu, wait_until

pytestmark = [pytest.mark.e2e, pytest.mark.slow]
COUNT = 12


@pytest.fixture
def crashing(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[Stack]:
    """A stack whose every service has ``request.param`` armed (each point names its
    service: only that one reaches it)."""
    stack = make_stack(tmp_path, "crash", MINIPACS_CRASH_AT=request.param)
    stack.start()
    yield stack
    teardown(stack)


def crashed(stack: Stack, service: str, point: str) -> None:
    """Wait for ``service`` to kill itself at ``point``, and forget the dead process."""
    proc = stack.procs[service]
    wait_until(lambda: proc.poll() is not None, 120, what=f"{service} to reach {point}")
    assert proc.returncode == -signal.SIGKILL, proc.returncode
    assert f"crash point {point} reached" in stack.log_text(service)
    stack.kill(service)


def ingest_until_the_crash(stack: Stack, tmp_path: Path, acknowledged: int = COUNT
                           ) -> list[Made]:
    """A CT series sent with ``storescu``, ``acknowledged`` of it acknowledged, then the armed
    service's death at its point."""
    point = stack.config.extra_env["MINIPACS_CRASH_AT"]
    made = ct_series(tmp_path / "ct", count=COUNT, tag=f"crash-{point}", size=64)
    sent = storescu(stack.config.gateway_port, [m.path for m in made])
    assert sent.successes == acknowledged, sent.output[-1500:]
    crashed(stack, point.split(".")[0], point)
    return made


def restart(stack: Stack, service: str) -> int:
    """Start ``service`` again, disarmed; returns where its new log lines begin."""
    start = len(stack.log_text(service))
    stack.start_service(service, env={"MINIPACS_CRASH_AT": ""})
    return start


def assert_converged(stack: Stack, made: list[Made]) -> None:
    study, series = made[0].study_uid, made[0].series_uid
    wait_until(lambda: indexed(stack, [study]) == len(made), 120,
               what="every instance indexed after the restart")
    assert_stored_byte_identical(stack, made)  # one row each, byte-identical in S3
    assert len(s3_objects(s3_client(stack), "minipacs")) == len(made)
    counts = pg(dsn(stack), "SELECT st.num_instances AS study, se.num_instances AS series "
                "FROM study st JOIN series se ON se.study_fk = st.id "
                "WHERE st.study_instance_uid = $1 AND se.series_instance_uid = $2",
                study, series)
    assert [(r["study"], r["series"]) for r in counts] == [(len(made), len(made))]
    assert pg(dsn(stack), "SELECT count(*) AS n FROM ingest_conflict")[0]["n"] == 0
    # no claim-check file left behind (a marker may wait for the sweeper: shared/spool.py)
    ready = Path(stack.config.base_dir) / "spool" / "ready"
    wait_until(lambda: all(parse_marker(f.name) for f in ready.iterdir()), 60,
               what="the spool's ready files consumed")
    # nothing waiting, nothing parked (exact counts: rabbitmqctl's are sampled)
    queues = [name for q in QUEUES for name in (q.name, q.dead_letter_queue)]
    wait_until(lambda: not any(ready_now(stack.env["MINIPACS_AMQP_URL"], queues).values()), 60,
               what="every queue empty")


def unindexed_keys(stack: Stack) -> set[str]:
    rows = pg(dsn(stack), "SELECT object_key FROM instance")
    return set(s3_objects(s3_client(stack), "minipacs")) - {r["object_key"] for r in rows}


@pytest.mark.parametrize("crashing", ["storage.taken", "storage.acked", "indexer.taken",
                                      "indexer.acked"], indirect=True)
def test_a_consumer_killed_before_its_work_or_after_its_ack(crashing: Stack,
                                                           tmp_path: Path) -> None:
    stack = crashing
    service, step = stack.config.extra_env["MINIPACS_CRASH_AT"].split(".")
    made = ingest_until_the_crash(stack, tmp_path)
    done = (len(s3_objects(s3_client(stack), "minipacs")) if service == "storage"
            else len(pg(dsn(stack), "SELECT 1 FROM instance")))
    # killed at its first message: before it, nothing of its work is done; after its ack,
    # that message's work is
    assert done == 0 if step == "taken" else done > 0
    restart(stack, service)
    assert_converged(stack, made)


@pytest.mark.parametrize("crashing", ["storage.uploaded"], indirect=True)
def test_storage_killed_between_upload_and_announce(crashing: Stack, tmp_path: Path) -> None:
    stack = crashing
    made = ingest_until_the_crash(stack, tmp_path)
    # an object is in S3 whose event never left storage: the index does not know it (yet)
    assert unindexed_keys(stack)
    restart(stack, "storage")
    assert_converged(stack, made)


@pytest.mark.parametrize("crashing", ["storage.announced"], indirect=True)
def test_storage_killed_between_announce_and_ack(crashing: Stack, tmp_path: Path) -> None:
    stack = crashing
    made = ingest_until_the_crash(stack, tmp_path)
    # what it announced is indexed although its message was never acked...
    wait_until(lambda: indexed(stack, [made[0].study_uid]) > 0, 60, what="announced indexed")
    start = restart(stack, "storage")
    # ...and its redelivery finds those stored and announced: not announced twice
    wait_until(lambda: "already stored and announced (redelivery)"
               in stack.log_text("storage")[start:], 60, what="the redelivery")
    assert_converged(stack, made)


@pytest.mark.parametrize("crashing", ["indexer.committed"], indirect=True)
def test_indexer_killed_between_commit_and_ack(crashing: Stack, tmp_path: Path) -> None:
    stack = crashing
    made = ingest_until_the_crash(stack, tmp_path)
    committed = indexed(stack, [made[0].study_uid])
    assert committed > 0  # the batch's rows are in, its messages not acked
    start = restart(stack, "indexer")

    def duplicates() -> int:
        return sum(int(n) for n in re.findall(r"indexed batch of \d+: \d+ new, (\d+) "
                                              r"duplicate", stack.log_text("indexer")[start:]))

    # the redelivered batch is recognised: duplicates, not new rows nor double counts
    wait_until(lambda: duplicates() >= committed, 60, what="the committed batch redelivered")
    assert_converged(stack, made)


@pytest.mark.parametrize("crashing", ["gateway.confirmed"], indirect=True)
def test_gateway_killed_between_confirm_and_response(crashing: Stack, tmp_path: Path) -> None:
    """The first instance is durable (confirmed by the broker) but never acknowledged: it is
    stored and indexed anyway; sent again by the modality, it converges to one copy."""
    stack = crashing
    made = ingest_until_the_crash(stack, tmp_path, acknowledged=0)  # it died before answering
    wait_until(lambda: indexed(stack, [made[0].study_uid]) == 1, 60,
               what="the confirmed instance indexed")
    rows = pg(dsn(stack), "SELECT sop_instance_uid FROM instance")
    assert [r["sop_instance_uid"] for r in rows] == [made[0].sop_uid]
    restart(stack, "gateway")
    wait_until(lambda: port_open(stack.config.gateway_port), 60, what="gateway back")
    again = storescu(stack.config.gateway_port, [m.path for m in made])
    assert again.successes == COUNT, again.output[-1500:]
    assert_converged(stack, made)

