"""Issue 2, faults: services killed mid-ingest, the gateway killed mid-transfer, RabbitMQ
unreachable. At the end every acknowledged instance is stored byte-identical and indexed
exactly once, and nothing that failed was reported as Success."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from scripts.native import free_port_block, port_open
from tests.conftest import dsn, make_stack, teardown
from tests.dicomgen import ct_series
from tests.e2e.test_ingest import assert_stored_byte_identical, indexed
from tests.helpers import dcmtk, dcmtk_env, pg, storescu, wait_until
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
        wait_until(lambda: indexed(stack, [more[0].study_uid]) >= acknowledged, 120,
                   what="acknowledged instances indexed")
        sent_ok = [m for m in more if m.sop_uid in {r["sop_instance_uid"] for r in pg(
            dsn(stack), "SELECT sop_instance_uid FROM instance")}]
        assert len(sent_ok) >= acknowledged
        assert_stored_byte_identical(stack, sent_ok)
        dead = subprocess.run(["rabbitmqctl", "-q", "list_queues", "-p", stack.config.vhost,
                               "name", "messages", "--no-table-headers"], capture_output=True,
                              text=True, check=True).stdout
        assert all(line.split()[-1] == "0" for line in dead.splitlines()
                   if ".dead" in line), dead
    finally:
        teardown(stack)


def test_rabbitmq_unreachable_means_failure_status_never_success(tmp_path: Path) -> None:
    proxy = CuttableProxy(5672, free_port_block(1)).start()
    stack = make_stack(tmp_path, "amqp", MINIPACS_CONFIRM_TIMEOUT="3")
    stack.start()
    try:
        # Only the gateway's broker connection goes through the cuttable proxy: this test is
        # about what the gateway answers while the broker is unreachable.
        direct = stack.env["MINIPACS_AMQP_URL"]
        stack.kill("gateway")
        stack.env["MINIPACS_AMQP_URL"] = (
            f"amqp://guest:guest@127.0.0.1:{proxy.port}/{stack.config.vhost}")
        stack.start_service("gateway")
        stack.env["MINIPACS_AMQP_URL"] = direct
        wait_until(lambda: port_open(stack.config.gateway_port), 60, what="gateway up")
        made = ct_series(tmp_path / "ct", count=6, tag="amqp-ct", size=32)
        port = stack.config.gateway_port
        assert storescu(port, [m.path for m in made[:2]]).successes == 2
        proxy.cut()
        for m in made[2:4]:  # storescu stops at the first failure: one file per run
            down = storescu(port, [m.path])
            assert down.successes == 0
            assert down.failures == 1, down.output[-1500:]
            assert "OutOfResources" in down.output
        proxy.restore()
        wait_until(lambda: storescu(port, [made[4].path]).successes == 1, 90, every=1,
                   what="the gateway publishing again after the broker came back")
        assert storescu(port, [made[5].path]).successes == 1
        wait_until(lambda: indexed(stack, [made[0].study_uid]) == 4, 120, what="indexed")
        rows = {r["sop_instance_uid"] for r in pg(dsn(stack), "SELECT sop_instance_uid FROM "
                                                   "instance")}
        assert rows == {made[i].sop_uid for i in (0, 1, 4, 5)}
        assert "broker did not confirm" in stack.log_text("gateway")
    finally:
        teardown(stack)
        proxy.close()
