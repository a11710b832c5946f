"""Issue 2, faults: the broker refuses a publish (RabbitMQ answers ``basic.nack``), or
blocks every publisher (a resource alarm).

A full work queue is what an admin gets with a length limit on it (a policy such as
``{"max-length": N}``; the queues overflow with ``reject-publish``): RabbitMQ then nacks every
publish to it. The gateway must answer a failure status (Out of Resources, 0xA7xx, so the
modality retries) and never Success, say why in its log, keep nothing of the refused instance,
lose nothing it acknowledged before, and store the same instance once it is sent again after
the limit is lifted.
"""

from __future__ import annotations

import json
import re
import signal
import subprocess
from pathlib import Path

import pytest

from scripts.native import Stack
from shared import topology
from tests.conftest import dsn, make_stack, teardown
from tests.dicomgen import CT_IMAGE, make_instance, uid
from tests.helpers import pg, queue_counts, storescu, wait_until

pytestmark = pytest.mark.e2e
POLICY = "minipacs-test-full"


def _queue_policy(vhost: str, queue: str) -> str:
    out = subprocess.run(["rabbitmqctl", "-q", "list_queues", "-p", vhost, "name", "policy",
                          "--no-table-headers"], capture_output=True, text=True, check=True,
                         timeout=60).stdout
    for line in out.splitlines():
        name, _, policy = line.partition("\t")
        if name.strip() == queue:
            return policy.strip()
    raise AssertionError(f"queue {queue} not found in vhost {vhost}: {out!r}")


def _set_policy(vhost: str, definition: dict[str, int],
                queue: str = topology.STORAGE.name) -> None:
    subprocess.run(["rabbitmqctl", "-q", "set_policy", "-p", vhost, "--apply-to", "queues",
                    "--priority", "100", POLICY, f"^{re.escape(queue)}$",
                    json.dumps(definition)], check=True, timeout=60, capture_output=True)


def _clear_policy(vhost: str) -> None:
    subprocess.run(["rabbitmqctl", "-q", "clear_policy", "-p", vhost, POLICY], timeout=60,
                   capture_output=True)


def _dead_letters(vhost: str) -> int:
    depths = queue_counts(vhost)
    return sum(depths[q.dead_letter_queue] for q in topology.QUEUES)


def _indexed(stack: Stack, sop_uid: str) -> int:
    rows = pg(dsn(stack), "SELECT count(*) AS n FROM instance WHERE sop_instance_uid = $1",
              sop_uid)
    return int(rows[0]["n"])


def _instance(tmp: Path, name: str) -> Path:
    return make_instance(tmp / f"{name}.dcm", sop_class=CT_IMAGE, sop_uid=uid("full", name),
                         study_uid=uid("full", "study"), series_uid=uid("full", "series"),
                         patient_id="FULL", patient_name="Queue^Full", rows=16, cols=16,
                         modality="CT", instance_number=1)


def _consumers(vhost: str, queue: str) -> int:
    return queue_counts(vhost, "consumers")[queue]


def _fill_until_refused(stack: Stack, files: list[Path]) -> tuple[list[str], Path]:
    """Send one file per storescu run (it stops at the first failure) until the gateway
    refuses one; returns the SOP Instance UIDs acknowledged before, and the refused file."""
    acknowledged: list[str] = []
    for path in files:
        result = storescu(stack.config.gateway_port, [path])
        if result.failures:
            assert result.successes == 0, result.output[-1500:]
            assert "OutOfResources" in result.output, result.output[-1500:]
            return acknowledged, path
        assert result.successes == 1, result.output[-1500:]
        acknowledged.append(uid("full", path.stem))
    raise AssertionError(f"the gateway acknowledged all of {len(files)} over the limit")


def _resumes(stack: Stack, acknowledged: list[str], refused: Path) -> str:
    """Storage running again: everything acknowledged gets indexed, the refused instance was
    not, and the modality's retry of it is accepted and indexed. Returns its UID."""
    wait_until(lambda: all(_indexed(stack, u) == 1 for u in acknowledged), 120,
               what="every acknowledged instance indexed")
    refused_uid = uid("full", refused.stem)
    assert _indexed(stack, refused_uid) == 0
    wait_until(lambda: storescu(stack.config.gateway_port, [refused]).successes == 1, 30,
               every=1, what="the gateway accepting the refused instance again")
    wait_until(lambda: _indexed(stack, refused_uid) == 1, 60, what="the resent instance indexed")
    return refused_uid


def test_a_publish_the_broker_refuses_gets_out_of_resources_never_success(
        private_stack: Stack, tmp_path: Path) -> None:
    """Twice: the queue drains under its limit (the same publishing channel is unblocked),
    and the limit is removed while the queue is over it (RabbitMQ 3.10 never unblocks that
    channel: the gateway has to publish on a new one)."""
    stack = private_stack
    vhost, queue = stack.config.vhost, topology.STORAGE.name
    spool = Path(stack.config.base_dir) / "spool"
    files = [_instance(tmp_path, f"i{n}") for n in range(10)]
    acknowledged: list[str] = []
    try:
        _set_policy(vhost, {"max-length": 1})
        wait_until(lambda: _queue_policy(vhost, queue) == POLICY, 60,
                   what="the length limit applied to the storage queue")
        for lift_the_limit in (False, True):
            # storage stopped: what the gateway publishes stays in the queue until it is full
            stack.kill("storage", signal.SIGTERM)
            wait_until(lambda: _consumers(vhost, queue) == 0, 60, what="storage stopped")
            before = sorted(p.name for p in (spool / "ready").iterdir())
            logged = stack.log_text("gateway").count("broker did not confirm")
            accepted, refused = _fill_until_refused(stack, files)
            files = files[len(accepted) + 1:]
            # quorum queues take publishes until they are over the limit, then refuse
            assert 1 <= len(accepted) <= 2, accepted
            acknowledged += accepted
            lines = [x for x in stack.log_text("gateway").splitlines()
                     if "broker did not confirm" in x]
            assert len(lines) == logged + 1
            assert "STORESCU@127.0.0.1" in lines[-1], lines[-1]
            assert "0xA700 out of resources" in lines[-1], lines[-1]
            # the refused instance's spooled file is gone at once; the accepted ones wait in
            # ready/ (storage is stopped), their publishes settled
            after = sorted(p.name for p in (spool / "ready").iterdir())
            assert len(after) == len(before) + len(accepted), (before, after)
            assert not any(name.endswith(".pending") for name in after), after
            assert list((spool / "rejected").iterdir()) == []
            if lift_the_limit:
                _clear_policy(vhost)
                wait_until(lambda: _queue_policy(vhost, queue) == "", 60,
                           what="the length limit lifted")
            stack.start_service("storage")
            refused_uid = _resumes(stack, acknowledged, refused)
            acknowledged.append(refused_uid)
    finally:
        _clear_policy(vhost)


def test_storage_keeps_what_it_cannot_announce_until_the_indexer_queue_takes_it(
        private_stack: Stack, tmp_path: Path) -> None:
    """The indexer's queue over its limit refuses storage's ``instance.stored`` messages:
    storage keeps the instances and retries (nothing dead-lettered), and once the limit is
    removed (the case where RabbitMQ 3.10 leaves the refusing channel blocked) everything
    the gateway acknowledged is indexed once."""
    stack = private_stack
    vhost, queue = stack.config.vhost, topology.INDEXER.name
    stack.kill("indexer", signal.SIGTERM)
    wait_until(lambda: _consumers(vhost, queue) == 0, 60, what="the indexer stopped")
    files = [_instance(tmp_path, f"s{n}") for n in range(6)]
    try:
        _set_policy(vhost, {"max-length": 1}, queue)
        wait_until(lambda: _queue_policy(vhost, queue) == POLICY, 60,
                   what="the length limit applied to the indexer queue")
        # one association per instance: each announcement is its own message
        for path in files:
            assert storescu(stack.config.gateway_port, [path]).successes == 1
        wait_until(lambda: "not stored yet" in stack.log_text("storage"), 60,
                   what="storage retrying the announcements the broker refused")
        _clear_policy(vhost)
        wait_until(lambda: _queue_policy(vhost, queue) == "", 60, what="the limit lifted")
    finally:
        _clear_policy(vhost)
    stack.start_service("indexer")
    uids = [uid("full", p.stem) for p in files]
    wait_until(lambda: all(_indexed(stack, u) == 1 for u in uids), 120,
               what="every acknowledged instance indexed")
    assert _dead_letters(vhost) == 0


def _alarms() -> str:
    return subprocess.run(["rabbitmqctl", "-q", "eval", "rabbit_alarm:get_alarms()."],
                          capture_output=True, text=True, check=True, timeout=60).stdout.strip()


def _watermark() -> str:
    """The memory high watermark as ``set_vm_memory_high_watermark`` takes it back."""
    value = subprocess.run(["rabbitmqctl", "-q", "eval",
                            "vm_memory_monitor:get_vm_memory_high_watermark()."],
                           capture_output=True, text=True, check=True, timeout=60).stdout.strip()
    absolute = re.fullmatch(r"\{absolute,\s*(\d+)\}", value)
    return f"absolute {absolute.group(1)}" if absolute else value


def test_a_memory_alarm_gets_out_of_resources_in_time_and_ingest_resumes_after_it(
        tmp_path: Path) -> None:
    """RabbitMQ's memory alarm blocks every publishing connection (the disk alarm does the
    same). The gateway must answer Out of Resources within its confirm timeout, not hang the
    modality, and take the instance once the alarm clears. The alarm is the broker's own,
    raised by lowering its watermark to one byte, and the watermark is put back afterwards."""
    stack = make_stack(tmp_path, "alarm", MINIPACS_CONFIRM_TIMEOUT="3")
    stack.start()
    before = _watermark()
    try:
        port = stack.config.gateway_port
        first, blocked = _instance(tmp_path, "a0"), _instance(tmp_path, "a1")
        assert storescu(port, [first]).successes == 1
        try:
            subprocess.run(["rabbitmqctl", "-q", "set_vm_memory_high_watermark", "absolute",
                            "1"], check=True, timeout=60, capture_output=True)
            wait_until(lambda: "memory" in _alarms(), 60, what="the broker's memory alarm")
            # -td: storescu's DIMSE timeout, so a gateway that hangs fails the test
            result = storescu(port, [blocked], extra=("-td", "30"))
            assert result.successes == 0, result.output[-1500:]
            assert result.failures == 1, result.output[-1500:]
            assert "OutOfResources" in result.output
        finally:
            subprocess.run(["rabbitmqctl", "-q", "set_vm_memory_high_watermark", *before.split()],
                           check=True, timeout=60, capture_output=True)
        wait_until(lambda: _alarms() == "[]", 60, what="the alarm cleared")
        wait_until(lambda: storescu(port, [blocked]).successes == 1, 60, every=1,
                   what="the gateway accepting instances again")
        for sop in (uid("full", "a0"), uid("full", "a1")):
            wait_until(lambda sop=sop: _indexed(stack, sop) == 1, 60,  # type: ignore[misc]
                       what="both instances indexed")
        assert _dead_letters(stack.config.vhost) == 0
    finally:
        teardown(stack)
