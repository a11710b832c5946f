"""Issue 2, faults: services killed mid-ingest, the gateway killed mid-transfer, RabbitMQ
unreachable. At the end every acknowledged instance is stored byte-identical and indexed
exactly once, and nothing that failed was reported as Success."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from scripts.native import ROOT, SERVICES, Stack, free_port_block, port_open
from shared.topology import QUEUES
from tests.conftest import dsn, make_stack, teardown
from tests.dicomgen import ct_series
from tests.e2e.test_ingest import assert_stored_byte_identical, indexed
from tests.helpers import (
    dcmtk,
    dcmtk_env,
    dead_letters,
    pg,
    ready_now,
    storescu,
    wait_until,
)
from tests.proxy import CuttableProxy

pytestmark = [pytest.mark.e2e, pytest.mark.slow]


def count_successes(output: str) -> int:
    return output.count("Received Store Response (Success)")


def test_storage_indexer_and_gateway_killed_mid_ingest(tmp_path: Path) -> None:
    stack = make_stack(tmp_path, "kill")
    stack.start()
    try:
        made = ct_series(tmp_path / "ct", count=150, tag="kill-ct", size=256)
        port = stack.config.gateway_port
        sender = subprocess.Popen(
            [dcmtk("storescu"), "-v", "-aec", "MINIPACS", "127.0.0.1", str(port),
             *[str(m.path) for m in made]], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
            text=True, env=dcmtk_env())
        wait_until(lambda: indexed(stack, [made[0].study_uid]) >= 5, 120,
                   what="ingest under way")
        stack.kill("storage")
        stack.kill("indexer")
        output, _ = sender.communicate(timeout=300)
        acknowledged = count_successes(output)
        assert acknowledged == len(made), output[-1500:]  # the gateway kept acknowledging
        stack.start_service("storage")
        stack.start_service("indexer")
        wait_until(lambda: indexed(stack, [made[0].study_uid]) == len(made), 180,
                   what="every acknowledged instance indexed after the restart")
        assert_stored_byte_identical(stack, made)

        # The gateway killed in the middle of a transfer: the sender sees an abort, and what
        # it saw acknowledged before that is all there (no Success without durability).
        more = ct_series(tmp_path / "ct2", count=150, tag="kill-gw", size=256)
        sender = subprocess.Popen(
            [dcmtk("storescu"), "-v", "-aec", "MINIPACS", "127.0.0.1", str(port),
             *[str(m.path) for m in more]], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
            text=True, env=dcmtk_env())
        wait_until(lambda: indexed(stack, [more[0].study_uid]) >= 5, 120,
                   what="second ingest under way")
        stack.kill("gateway")
        output, _ = sender.communicate(timeout=120)
        acknowledged = count_successes(output)
        assert 5 <= acknowledged < len(more)
        stack.start_service("gateway")
        wait_until(lambda: port_open(port), 60, what="gateway back")
        # storescu sends the files in the order given, one at a time, and each response
        # comes before the next file: the acknowledged ones are exactly the first ones
        acked = more[:acknowledged]

        def indexed_uids() -> set[str]:
            return {r["sop_instance_uid"] for r in pg(
                dsn(stack), "SELECT sop_instance_uid FROM instance WHERE sop_instance_uid = "
                "ANY($1::text[])", [m.sop_uid for m in more])}

        wait_until(lambda: {m.sop_uid for m in acked} <= indexed_uids(), 120,
                   what="every acknowledged instance indexed")
        assert_stored_byte_identical(stack, acked)
        # beyond them at most the one in flight when the gateway died (spooled and published,
        # its response never sent): the sender will send it again, and it converges to one
        assert indexed_uids() - {m.sop_uid for m in acked} <= {more[acknowledged].sop_uid}
        dead = dead_letters(stack.config.vhost)
        assert not any(dead.values()), dead
    finally:
        teardown(stack)


def _work_queue_consumers(vhost: str) -> dict[str, int]:
    out = subprocess.run(["rabbitmqctl", "-q", "list_queues", "-p", vhost, "name", "consumers",
                          "--no-table-headers"], capture_output=True, text=True,
                         check=True).stdout
    rows = dict(line.split() for line in out.splitlines() if line.strip())
    return {q.name: int(rows.get(q.name, 0)) for q in QUEUES}


def _healthy(stack: Stack, name: str) -> bool:
    env = {**stack.env, "MINIPACS_HEARTBEAT_FILE": stack.heartbeat_file(name)}
    return subprocess.run([sys.executable, "-m", f"services.{name}", "--check"], env=env,
                          capture_output=True, cwd=ROOT, check=False).returncode == 0


def test_rabbitmq_unreachable_means_failure_status_never_success(tmp_path: Path) -> None:
    """Every service's broker connection goes through a proxy that is cut mid-ingest and then
    restored: the gateway answers failures while the broker is unreachable, every service
    reconnects once (no reconnection loop) with its consumers, and everything acknowledged
    before or after the outage is stored and indexed exactly once."""
    proxy = CuttableProxy(5672, free_port_block(1)).start()
    stack = make_stack(tmp_path, "amqp", MINIPACS_CONFIRM_TIMEOUT="3")
    vhost = stack.config.vhost
    stack.config.extra_env["MINIPACS_AMQP_URL"] = (
        f"amqp://guest:guest@127.0.0.1:{proxy.port}/{vhost}")
    stack.start()
    try:
        port = stack.config.gateway_port
        wait_until(lambda: all(n == 1 for n in _work_queue_consumers(vhost).values()), 60,
                   what="storage, indexer and mover consuming through the proxy")
        made = ct_series(tmp_path / "ct", count=60, tag="amqp-ct", size=32)
        study = [made[0].study_uid]
        before, down, after = made[:50], made[50:52], made[52:]

        # Cut in the middle of an ingest: some instances are on their way through storage and
        # the indexer when every connection is reset.
        sender = subprocess.Popen(
            [dcmtk("storescu"), "-v", "-aec", "MINIPACS", "127.0.0.1", str(port),
             *[str(m.path) for m in before]], stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT, text=True, env=dcmtk_env())
        wait_until(lambda: indexed(stack, study) >= 5, 60, what="ingest under way")
        proxy.cut()
        output, _ = sender.communicate(timeout=120)
        acknowledged = before[:count_successes(output)]
        assert len(acknowledged) >= 5
        wait_until(lambda: all("RabbitMQ connection lost" in stack.log_text(s)
                               for s in SERVICES), 30, what="every service noticed the cut")
        for m in down:  # storescu stops at the first failure: one file per run
            result = storescu(port, [m.path])
            assert result.successes == 0
            assert result.failures == 1, result.output[-1500:]
            assert "OutOfResources" in result.output

        proxy.restore()
        wait_until(lambda: all("RabbitMQ connection restored" in stack.log_text(s)
                               for s in SERVICES), 60, what="every service reconnected")
        wait_until(lambda: all(n == 1 for n in _work_queue_consumers(vhost).values()), 60,
                   what="every consumer restored")
        wait_until(lambda: storescu(port, [after[0].path]).successes == 1, 90, every=1,
                   what="the gateway publishing again after the broker came back")
        assert storescu(port, [m.path for m in after[1:]]).successes == len(after) - 1
        acknowledged += after

        ours = {m.sop_uid for m in acknowledged}
        wait_until(lambda: ours <= {r["sop_instance_uid"] for r in pg(
            dsn(stack), "SELECT sop_instance_uid FROM instance")}, 120,
            what="every acknowledged instance indexed")
        wait_until(lambda: all(_healthy(stack, s) for s in SERVICES), 30,
                   what="every service reporting healthy through --check")
        # Indexed once; a non-acknowledged instance may have made it (its confirm was lost
        # with the connection), nothing that was never sent did.
        rows = pg(dsn(stack), "SELECT sop_instance_uid FROM instance")
        uids = [r["sop_instance_uid"] for r in rows]
        assert len(uids) == len(set(uids))
        assert set(uids) <= {m.sop_uid for m in made}
        assert_stored_byte_identical(stack, [m for m in made if m.sop_uid in set(uids)])
        assert "broker did not confirm" in stack.log_text("gateway")
        # One loss and one recovery each: nobody looped through reconnections.
        for s in SERVICES:
            log = stack.log_text(s)
            assert log.count("RabbitMQ connection lost") == 1, (s, log[-3000:])
            assert "keeps dropping" not in log, (s, log[-3000:])
        dead = dead_letters(vhost)
        assert not any(dead.values()), dead
    finally:
        teardown(stack)
        proxy.close()


def test_postgresql_and_s3_unreachable_then_back(tmp_path: Path) -> None:
    """RELIABILITY: PostgreSQL and then the S3 store become unreachable during an ingest (each
    behind a proxy that is cut, the shared servers keep running). The gateway goes on
    acknowledging (it needs neither to make an instance durable); storage and the indexer
    hold and retry instead of dead-lettering; once both are back every acknowledged instance
    is stored byte-identical and indexed exactly once, and no message was parked."""
    stack = make_stack(tmp_path, "deps")
    pg_proxy = CuttableProxy(5432, free_port_block(1)).start()
    s3_proxy = CuttableProxy(stack.config.s3_port, free_port_block(1)).start()
    stack.config.extra_env["MINIPACS_DATABASE_URL"] = (
        f"postgresql://minipacs@127.0.0.1:{pg_proxy.port}/{stack.config.database}")
    stack.config.extra_env["MINIPACS_S3_ENDPOINT"] = f"127.0.0.1:{s3_proxy.port}"
    stack.start()
    try:
        port = stack.config.gateway_port
        made = ct_series(tmp_path / "ct", count=60, tag="deps-ct", size=32)
        study = [made[0].study_uid]
        first, without_pg, without_both = made[:20], made[20:40], made[40:]
        assert storescu(port, [m.path for m in first]).successes == len(first)
        wait_until(lambda: indexed(stack, study) == len(first), 60, what="first part indexed")

        pg_proxy.cut()
        assert storescu(port, [m.path for m in without_pg]).successes == len(without_pg)
        wait_until(lambda: "PostgreSQL unavailable" in stack.log_text("indexer"), 60,
                   what="the indexer holding its messages while PostgreSQL is gone")
        s3_proxy.cut()
        assert storescu(port, [m.path for m in without_both]).successes == len(without_both)
        wait_until(lambda: "not stored yet" in stack.log_text("storage"), 60,
                   what="storage retrying the S3 upload")

        s3_proxy.restore()
        pg_proxy.restore()
        wait_until(lambda: indexed(stack, study) == len(made), 180, every=1,
                   what="every acknowledged instance indexed after the outages")
        rows = pg(dsn(stack), "SELECT sop_instance_uid FROM instance")
        assert len(rows) == len({r["sop_instance_uid"] for r in rows}) == len(made)
        assert_stored_byte_identical(stack, made)
        # nothing parked, nothing left waiting (exact counts: rabbitmqctl's are sampled)
        dead = dead_letters(stack.config.vhost)
        assert not any(dead.values()), dead
        work = [q.name for q in QUEUES]
        wait_until(lambda: not any(ready_now(stack.env["MINIPACS_AMQP_URL"], work).values()),
                   30, what="the work queues empty")
    finally:
        teardown(stack)
        pg_proxy.close()
        s3_proxy.close()
