"""RELIABILITY, end to end on a native stack of the test's own:

- Poison contained: ``instance.received`` messages storage can never process (the spool file
  they point at is gone, or its bytes do not hash to the message's SHA-256) are dead-lettered
  to ``storage.instances.dead`` after one delivery (storage rejects them without requeue),
  visible in the management API, while the work queue keeps draining: an instance sent
  afterwards is stored and indexed.
- Staging leftovers are garbage-collected: the gateway SIGKILLed in the middle of a C-STORE
  leaves its temp file in ``spool/incoming/``; storage's sweeper removes it (sweep age set short
  through ``MINIPACS_SWEEP_AFTER``).
- Spool files a stopped gateway left without the broker's answer (a ``.pending`` marker beside
  the file in ``spool/ready/``) are announced again by storage's sweeper: stored byte-identical
  and indexed once, and the spool ends empty. Shown twice: with the state such a gateway leaves
  made by ``Spool.commit`` itself (no message at all, so only the sweeper can store it), and
  with the gateway SIGKILLed while RabbitMQ's memory alarm holds back its publisher confirm.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import shutil
import struct
import subprocess
import urllib.parse
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from pynetdicom import AE

from scripts.native import Stack, port_open
from shared import broker, topology
from shared.ingest import Caller, note_of
from shared.keys import object_key
from shared.messages import InstanceReceived
from shared.spool import PENDING, Spool
from tests.conftest import dsn, make_stack, s3_client, teardown
from tests.dicomgen import CT_IMAGE, Made, make_instance, uid
from tests.e2e.test_ingest import assert_stored_byte_identical
from tests.helpers import (
    dcmtk,
    dcmtk_env,
    pg,
    ready_now,
    s3_objects,
    s3_read,
    storescu,
    wait_until,
)

pytestmark = pytest.mark.e2e

# Seconds after which storage's sweeper treats a staging file as abandoned. Storage sweeps when
# it starts and then every SWEEP_AFTER seconds (``StorageWorker.sweep_forever``); a ``.pending``
# marker must be older than UNCONFIRMED_AFTER (the same here) and twice the confirm timeout.
SWEEP_AFTER = "2"
CONFIRM_TIMEOUT = "3"
SWEEP_EVERY = 2.0
UNCONFIRMED_AGE = 6.0


@pytest.fixture()
def sweep_stack(tmp_path: Path) -> Iterator[Stack]:
    """A stack of the test's own (its gateway gets killed, its dead-letter queue filled)."""
    stack = make_stack(tmp_path, "poison", MINIPACS_SWEEP_AFTER=SWEEP_AFTER,
                       MINIPACS_UNCONFIRMED_AFTER=SWEEP_AFTER,
                       MINIPACS_CONFIRM_TIMEOUT=CONFIRM_TIMEOUT)
    stack.start()
    yield stack
    teardown(stack)


def instance(tmp: Path, tag: str, n: int = 0) -> Made:
    sop, study, series = uid(tag, n), uid(tag, "st"), uid(tag, "se")
    path = make_instance(tmp / f"{tag}{n}.dcm", sop_class=CT_IMAGE, sop_uid=sop, study_uid=study,
                         series_uid=series, patient_id=tag.upper(), patient_name="Poi^Son",
                         rows=16, cols=16, modality="CT", instance_number=n + 1)
    return Made(path=path, patient_id=tag.upper(), study_uid=study, series_uid=series,
                sop_uid=sop)


def received(m: Made, *, size: int, sha256: str, spool_name: str) -> InstanceReceived:
    return InstanceReceived(sop_instance_uid=m.sop_uid, sop_class_uid=CT_IMAGE,
                            study_instance_uid=m.study_uid, series_instance_uid=m.series_uid,
                            transfer_syntax="1.2.840.10008.1.2.1", size=size, sha256=sha256,
                            spool_name=spool_name, calling_aet="POISON", peer_host="127.0.0.1")


def publish(stack: Stack, messages: list[InstanceReceived]) -> None:
    """Straight onto the broker, with publisher confirms, as the gateway would."""
    async def run() -> None:
        conn = await broker.connect(stack.env["MINIPACS_AMQP_URL"], 10, name="test-poison")
        try:
            pub = broker.Publisher(conn, 10)
            await pub.open()
            for message in messages:
                await pub.publish(message)
        finally:
            await conn.close()

    asyncio.run(run())


def management(stack: Stack, kind: str, name: str = "", body: Any = None) -> Any:
    """``/api/<kind>/<the stack's vhost>[/<name>]`` of the management HTTP API, what the RabbitMQ
    dashboard reads (GET) and writes (PUT ``body``)."""
    vhost = urllib.parse.quote(stack.config.vhost, safe="")
    path = f"/api/{kind}/{vhost}" + (f"/{urllib.parse.quote(name, safe='')}" if name else "")
    request = urllib.request.Request(
        f"http://127.0.0.1:15672{path}", method="GET" if body is None else "PUT",
        data=None if body is None else json.dumps(body).encode(),
        headers={"Authorization": "Basic " + base64.b64encode(b"guest:guest").decode(),
                 "Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=10) as response:
        raw = response.read()
    return json.loads(raw) if raw else None


def management_queue(stack: Stack, queue: str) -> dict[str, Any]:
    """The queue as the RabbitMQ dashboard shows it (management HTTP API)."""
    data: dict[str, Any] = management(stack, "queues", queue)
    return data


def move_messages(stack: Stack, source: str, destination: str) -> None:
    """What *Move messages* on a queue's page of the dashboard does (the shovel management
    plugin, enabled by ``deploy/rabbitmq/enabled_plugins``): a shovel that moves the messages
    in ``source`` at that moment to ``destination``, then deletes itself."""
    vhost = urllib.parse.quote(stack.config.vhost, safe="")
    name = f"Move from {source}"
    management(stack, "parameters/shovel", name, {
        "component": "shovel", "vhost": stack.config.vhost, "name": name, "value": {
            "src-uri": f"amqp:///{vhost}", "src-queue": source, "src-protocol": "amqp091",
            "src-prefetch-count": 1000, "src-delete-after": "queue-length",
            "dest-uri": f"amqp:///{vhost}", "dest-queue": destination,
            "dest-protocol": "amqp091", "dest-add-forward-headers": False,
            "ack-mode": "on-confirm"}})


def depth(stack: Stack, queue: str) -> int:
    """Messages in ``queue``, ready and unacknowledged (0 until the dashboard has a figure)."""
    return int(management_queue(stack, queue).get("messages") or 0)


@dataclass(frozen=True)
class DeadLetter:
    message: InstanceReceived
    x_death: list[dict[str, Any]]
    delivery_count: int


def take_dead_letters(stack: Stack) -> list[DeadLetter]:
    """Everything in storage's dead-letter queue (consumed: the test leaves it empty)."""
    async def run() -> list[DeadLetter]:
        conn = await broker.connect(stack.env["MINIPACS_AMQP_URL"], 10, name="test-dlq")
        out: list[DeadLetter] = []
        try:
            channel = await conn.channel()
            dlq = await channel.declare_queue(topology.STORAGE.dead_letter_queue, passive=True)
            while (got := await dlq.get(no_ack=False, fail=False)) is not None:
                headers = dict(got.headers or {})
                deaths = [dict(d) for d in headers.get("x-death") or []  # type: ignore[union-attr]
                          if isinstance(d, dict)]
                raw_count = headers.get("x-delivery-count", 0)
                out.append(DeadLetter(InstanceReceived.from_bytes(got.body), deaths,
                                      int(raw_count) if isinstance(raw_count, int) else 0))
                await got.ack()
        finally:
            await conn.close()
        return out

    return asyncio.run(run())


def indexed(stack: Stack, sops: list[str]) -> set[str]:
    rows = pg(dsn(stack), "SELECT sop_instance_uid FROM instance WHERE sop_instance_uid = "
              "ANY($1::text[])", sops)
    return {r["sop_instance_uid"] for r in rows}


def test_poison_messages_are_dead_lettered_and_the_queue_keeps_draining(
        sweep_stack: Stack, tmp_path: Path) -> None:
    stack = sweep_stack
    ready = Path(stack.config.base_dir) / "spool" / "ready"
    # 1. the claim check points at a spool file that does not exist (and nothing is in S3)
    gone = instance(tmp_path, "poison-gone")
    missing = received(gone, size=gone.path.stat().st_size,
                       sha256=hashlib.sha256(gone.path.read_bytes()).hexdigest(),
                       spool_name=f"{uuid.uuid4().hex}.dcm")
    assert not (ready / missing.spool_name).exists()
    # 2. the spool file is there, but its bytes do not hash to the message's SHA-256
    bad = instance(tmp_path, "poison-hash")
    name = f"{uuid.uuid4().hex}.dcm"
    (ready / name).write_bytes(bad.path.read_bytes())
    mismatch = received(bad, size=bad.path.stat().st_size,
                        sha256=hashlib.sha256(b"other bytes than the spooled ones").hexdigest(),
                        spool_name=name)
    poison = {missing.sha256: missing, mismatch.sha256: mismatch}

    publish(stack, [missing, mismatch])

    dlq = topology.STORAGE.dead_letter_queue
    wait_until(lambda: depth(stack, dlq) == len(poison), 60, every=0.5,
               what="both poison messages in the dead-letter queue, shown by the dashboard")
    # The queue is not blocked: an instance sent afterwards is stored and indexed.
    good = instance(tmp_path, "poison-good")
    sent = storescu(stack.config.gateway_port, [good.path])
    assert sent.successes == 1, sent.output[-1500:]
    wait_until(lambda: indexed(stack, [good.sop_uid]) == {good.sop_uid}, 60,
               what="the good instance indexed after the poison")
    assert_stored_byte_identical(stack, [good])
    wait_until(lambda: depth(stack, topology.STORAGE.name) == 0, 30, every=0.5,
               what="storage's work queue drained")

    dead = take_dead_letters(stack)
    assert sorted(d.message.sha256 for d in dead) == sorted(poison)
    for d in dead:
        assert d.message == poison[d.message.sha256]  # parked as published, for a replay
        # dead-lettered at its first delivery (rejected without requeue), well within the
        # queue's delivery limit: never requeued in a loop
        assert [(x.get("queue"), x.get("reason"), x.get("count")) for x in d.x_death] == \
            [(topology.STORAGE.name, "rejected", 1)], d.x_death
        assert d.delivery_count < topology.STORAGE.delivery_limit
    log = stack.log_text("storage")
    for sha in poison:
        assert log.count(f"dead-lettering obj={sha[:12]}") == 1, log[-3000:]
    assert "spool file is gone and the object is not in S3" in log
    # nothing of the poison was indexed, and no object under the key the bad hash names
    assert indexed(stack, [gone.sop_uid, bad.sop_uid]) == set()
    stored = s3_objects(s3_client(stack), "minipacs")
    assert object_key(missing.sha256) not in stored
    assert object_key(mismatch.sha256) not in stored
    assert list(stored) == [pg(dsn(stack), "SELECT object_key FROM instance WHERE "
                               "sop_instance_uid = $1", good.sop_uid)[0]["object_key"]]


def test_a_dead_letter_moved_back_from_the_dashboard_is_stored_once_its_cause_is_fixed(
        sweep_stack: Stack, tmp_path: Path) -> None:
    """An admin's way out of a dead-letter queue: a message was parked because the spool file
    behind it was missing (say the spool volume was not mounted); with the file back, *Move
    messages* on the dashboard's page of ``storage.instances.dead`` puts it back on the work
    queue, and the instance is stored and indexed like any other."""
    stack = sweep_stack
    lost = instance(tmp_path, "dlq-replay")
    data = lost.path.read_bytes()
    name = f"{uuid.uuid4().hex}.dcm"
    publish(stack, [received(lost, size=len(data), sha256=hashlib.sha256(data).hexdigest(),
                             spool_name=name)])
    dlq = topology.STORAGE.dead_letter_queue
    wait_until(lambda: depth(stack, dlq) == 1, 60, every=0.5, what="the message parked")
    assert indexed(stack, [lost.sop_uid]) == set()
    (Path(stack.config.base_dir) / "spool" / "ready" / name).write_bytes(data)  # the fix
    move_messages(stack, dlq, topology.STORAGE.name)
    wait_until(lambda: indexed(stack, [lost.sop_uid]) == {lost.sop_uid}, 60,
               what="the moved-back instance indexed")
    assert_stored_byte_identical(stack, [lost])
    wait_until(lambda: depth(stack, dlq) == 0 and not management(stack, "parameters/shovel"),
               30, every=0.5, what="the dead-letter queue empty and the shovel gone")


def test_a_redelivery_of_an_instance_already_stored_is_acked_not_dead_lettered(
        stack: Stack, tmp_path: Path) -> None:
    """Storage killed after it finished an instance (stored, announced, spool file moved to
    the hot cache) but before its ack reached the broker: the broker delivers the message
    again. The spool file is gone; the object is in S3 with the message's size, so storage
    acks it (no dead-letter, no second row, no second object)."""
    done = instance(tmp_path, "redelivered")
    sent = storescu(stack.config.gateway_port, [done.path])
    assert sent.successes == 1, sent.output[-1500:]
    rows = wait_until(lambda: pg(dsn(stack), "SELECT object_key FROM instance WHERE "
                                 "sop_instance_uid = $1", done.sop_uid), 60,
                      what="the instance indexed")
    key = rows[0]["object_key"]
    client = s3_client(stack)
    body = s3_read(client, "minipacs", key)
    sha = hashlib.sha256(body).hexdigest()
    assert key == object_key(sha)
    objects_before = set(s3_objects(client, "minipacs"))
    dead_before = _ready_count(stack, topology.STORAGE.dead_letter_queue)

    # the same message again, as the broker would redeliver it (its spool name long gone)
    publish(stack, [received(done, size=len(body), sha256=sha,
                             spool_name=f"{uuid.uuid4().hex}.dcm")])
    wait_until(lambda: f"obj={sha[:12]} already stored and announced (redelivery)"
               in stack.log_text("storage"), 60, what="storage handling the redelivery")
    wait_until(lambda: _ready_count(stack, topology.STORAGE.name) == 0, 30,
               what="storage's work queue drained")
    assert f"dead-lettering obj={sha[:12]}" not in stack.log_text("storage")
    assert _ready_count(stack, topology.STORAGE.dead_letter_queue) == dead_before
    assert _indexed_rows(stack, done.sop_uid) == 1
    assert set(s3_objects(client, "minipacs")) == objects_before


def _ready_count(stack: Stack, queue: str) -> int:
    return ready_now(stack.env["MINIPACS_AMQP_URL"], [queue])[queue]


@pytest.mark.slow
def test_gateway_killed_mid_transfer_leaves_incoming_that_the_sweeper_removes(
        sweep_stack: Stack, tmp_path: Path) -> None:
    from shared import dimse_wire as wire

    stack = sweep_stack
    port = stack.config.gateway_port
    incoming = Path(stack.config.base_dir) / "spool" / "incoming"
    cut = instance(tmp_path, "sweep-cut")
    raw = cut.path.read_bytes()
    dataset = raw[wire.dataset_offset(raw):]
    ae = AE(ae_title="TESTSCU")
    ae.add_requested_context(CT_IMAGE, "1.2.840.10008.1.2.1")
    assoc = ae.associate("127.0.0.1", port, ae_title="MINIPACS")
    assert assoc.is_established
    cx = next(c.context_id for c in assoc.accepted_contexts if c.abstract_syntax == CT_IMAGE)

    def pdv(control: int, data: bytes) -> bytes:
        return struct.pack(">BBLLBB", wire.P_DATA_TF, 0, len(data) + 6, len(data) + 2, cx,
                           control) + data

    sock = assoc.dul.socket.socket  # type: ignore[union-attr]
    assert sock is not None
    sock.sendall(pdv(0x03, wire.c_store_rq(7, CT_IMAGE, cut.sop_uid)))
    sock.sendall(pdv(0x00, dataset[: len(dataset) // 2]))  # not the last fragment
    leftovers = wait_until(lambda: list(incoming.iterdir()), 30,
                           what="the gateway receiving the dataset into incoming/")
    stack.kill("gateway")  # SIGKILL: no clean-up of its own
    wait_until(lambda: assoc.is_aborted, 30, what="the sender seeing the connection drop")
    assert all(p.exists() for p in leftovers)  # left behind by the killed gateway

    wait_until(lambda: not any(p.exists() for p in leftovers), SWEEP_EVERY + 30, every=0.5,
               what="storage's sweeper removing the incoming/ leftovers")
    assert "spool sweeper removed" in stack.log_text("storage")

    # the gateway back: the aborted instance was never published, a new one goes through
    stack.start_service("gateway")
    wait_until(lambda: port_open(port), 60, what="gateway back")
    good = instance(tmp_path, "sweep-good")
    sent = storescu(port, [good.path])
    assert sent.successes == 1, sent.output[-1500:]
    wait_until(lambda: indexed(stack, [good.sop_uid]) == {good.sop_uid}, 60,
               what="an instance sent after the restart indexed")
    assert indexed(stack, [cut.sop_uid]) == set()
    assert not any(incoming.iterdir())


def _spool_empty(ready: Path) -> bool:
    return not any(ready.iterdir())


def _indexed_rows(stack: Stack, sop: str) -> int:
    rows = pg(dsn(stack), "SELECT count(*) AS n FROM instance WHERE sop_instance_uid = $1", sop)
    return int(rows[0]["n"])


def test_a_spool_file_nobody_announced_is_announced_by_the_sweeper(
        sweep_stack: Stack, tmp_path: Path) -> None:
    """The state a gateway stopped right after its commit leaves (its publish never reached the
    broker), made with the gateway's own ``Spool.commit`` into the live stack's spool: no
    message exists, so only the sweeper can get the instance stored."""
    stack = sweep_stack
    spool = Spool(Path(stack.config.base_dir) / "spool")
    left = instance(tmp_path, "sweep-unannounced")
    staged = spool.incoming / "tmp-unannounced.dcm"
    shutil.copyfile(left.path, staged)
    spooled = spool.commit(staged, note_of(Caller("CT_ROOM_3", "127.0.0.7")))
    assert (spool.ready / spooled.marker).exists()

    wait_until(lambda: indexed(stack, [left.sop_uid]) == {left.sop_uid},
               UNCONFIRMED_AGE + SWEEP_EVERY + 60, what="the sweeper's announcement indexed")
    wait_until(lambda: _spool_empty(spool.ready), 30, what="file and marker gone from ready/")
    assert_stored_byte_identical(stack, [left])
    assert _indexed_rows(stack, left.sop_uid) == 1
    rows = pg(dsn(stack), "SELECT calling_aet FROM instance WHERE sop_instance_uid = $1",
              left.sop_uid)
    assert rows[0]["calling_aet"] == "CT_ROOM_3"  # who sent it, from the marker
    log = stack.log_text("storage")
    assert log.count(f"spool file {spooled.name} (obj={spooled.sha256[:12]}): its publish was "
                     "never confirmed (the gateway stopped, or got no answer): announced again"
                     ) == 1, log[-3000:]
    assert depth(stack, topology.STORAGE.dead_letter_queue) == 0


@pytest.mark.slow
def test_gateway_killed_waiting_for_the_confirm_leaves_nothing_on_the_spool(
        sweep_stack: Stack, tmp_path: Path) -> None:
    """RabbitMQ's memory alarm holds back the confirm; the gateway is SIGKILLed while it waits.
    The modality got no Success. Whether or not the message got into the queue before the
    connection died, the instance ends up stored and indexed once and ``ready/`` empties."""
    from tests.e2e.test_broker_refusal import _alarms, _watermark

    stack = sweep_stack
    port = stack.config.gateway_port
    ready = Path(stack.config.base_dir) / "spool" / "ready"
    left = instance(tmp_path, "sweep-killed")
    before = _watermark()
    try:
        subprocess.run(["rabbitmqctl", "-q", "set_vm_memory_high_watermark", "absolute", "1"],
                       check=True, timeout=60, capture_output=True)
        wait_until(lambda: "memory" in _alarms(), 60, what="the broker's memory alarm")
        sender = subprocess.Popen(
            [dcmtk("storescu"), "-v", "-aet", "STORESCU", "-aec", "MINIPACS", "-td", "30",
             "127.0.0.1", str(port), str(left.path)],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=dcmtk_env())
        try:
            wait_until(lambda: list(ready.glob("*" + PENDING)), 30, every=0.02,
                       what="the instance spooled, its publish waiting for the broker")
            stack.kill("gateway")
            output, _ = sender.communicate(timeout=60)
        finally:
            if sender.poll() is None:
                sender.kill()
        assert "Received Store Response (Success)" not in output, output[-1500:]
        assert list(ready.glob("*" + PENDING)), "the killed gateway's marker"
    finally:
        subprocess.run(["rabbitmqctl", "-q", "set_vm_memory_high_watermark", *before.split()],
                       check=True, timeout=60, capture_output=True)
    wait_until(lambda: _alarms() == "[]", 60, what="the alarm cleared")

    wait_until(lambda: indexed(stack, [left.sop_uid]) == {left.sop_uid},
               UNCONFIRMED_AGE + SWEEP_EVERY + 60, what="the unacknowledged instance indexed")
    wait_until(lambda: _spool_empty(ready), 60, what="file and marker gone from ready/")
    assert_stored_byte_identical(stack, [left])
    assert _indexed_rows(stack, left.sop_uid) == 1
    assert depth(stack, topology.STORAGE.dead_letter_queue) == 0

    # the gateway back, and the modality's retry converges on the same instance
    stack.start_service("gateway")
    wait_until(lambda: port_open(port), 60, what="gateway back")
    assert storescu(port, [left.path]).successes == 1
    wait_until(lambda: _spool_empty(ready), 60, what="the retry's spool file consumed")
    assert _indexed_rows(stack, left.sop_uid) == 1
