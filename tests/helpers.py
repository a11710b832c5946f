"""Helpers for driving a native stack from tests: DCMTK tools, PostgreSQL, S3, waiting."""

from __future__ import annotations

import asyncio
import os
import re
import subprocess
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import asyncpg
from minio import Minio
from pydicom.dataset import Dataset

T = TypeVar("T")
DCMTK = Path("/usr/bin")  # the venv's pynetdicom installs its own "storescu": never use that one


def dcmtk(tool: str) -> str:
    return str(DCMTK / tool)


def dcmtk_env() -> dict[str, str]:
    # Debian's DCMTK leaves Nagle on unless told: without this we'd measure delayed ACKs.
    return {**os.environ, "TCP_NODELAY": "1"}


def wait_until(check: Callable[[], T], timeout: float = 60.0, every: float = 0.2,
               what: str = "condition") -> T:
    """Poll ``check`` until it returns something truthy; fail the test after ``timeout``."""
    deadline = time.monotonic() + timeout
    value = check()
    while not value:
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(every)
        value = check()
    return value


@dataclass
class StoreResult:
    returncode: int
    successes: int
    failures: int
    output: str


def storescu(port: int, paths: Sequence[Path | str], aet: str = "STORESCU",
             called: str = "MINIPACS", extra: Sequence[str] = (), timeout: float = 600
             ) -> StoreResult:
    """Run DCMTK's storescu and count the responses (it exits 0 even on failure statuses)."""
    cmd = [dcmtk("storescu"), "-v", "-aet", aet, "-aec", called, *extra, "127.0.0.1",
           str(port), *map(str, paths)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=dcmtk_env(), timeout=timeout)
    out = proc.stdout + proc.stderr
    ok = len(re.findall(r"Received Store Response \(Success\)", out))
    bad = len(re.findall(r"Received Store Response \((?!Success)", out))
    return StoreResult(proc.returncode, ok, bad, out)


def send_as_is(port: int, paths: Sequence[Path], sop_class: str, syntax: str) -> None:
    """pynetdicom sends each file's dataset bytes as they are (chunked, no re-encoding), on
    one association proposing ``sop_class`` in ``syntax``; every one must get Success. For the
    syntaxes DCMTK 3.6.7's ``storescu`` does not know (HTJ2K) or re-encodes (deflated)."""
    from pynetdicom import AE, _config

    before = _config.STORE_SEND_CHUNKED_DATASET
    _config.STORE_SEND_CHUNKED_DATASET = True
    ae = AE(ae_title="TESTSCU")
    ae.add_requested_context(sop_class, syntax)
    assoc = ae.associate("127.0.0.1", port, ae_title="MINIPACS")
    try:
        assert assoc.is_established
        for path in paths:
            assert assoc.send_c_store(path).Status == 0x0000, path
    finally:
        assoc.release()
        _config.STORE_SEND_CHUNKED_DATASET = before


def storescu_at_once(port: int, groups: Sequence[Sequence[Path | str]]) -> list[StoreResult]:
    """One ``storescu`` per group, all running at once (several modalities, or associations)."""
    with ThreadPoolExecutor(max_workers=max(1, len(groups))) as pool:
        return list(pool.map(lambda group: storescu(port, group), groups))


def pg(dsn: str, sql: str, *args: Any) -> list[asyncpg.Record]:
    async def run() -> list[asyncpg.Record]:
        conn = await asyncpg.connect(dsn)
        try:
            return list(await conn.fetch(sql, *args))
        finally:
            await conn.close()

    return asyncio.run(run())


def s3_objects(client: Minio, bucket: str, prefix: str = "instances/") -> dict[str, int]:
    return {o.object_name: o.size for o in client.list_objects(bucket, prefix=prefix,
                                                                recursive=True)}


def s3_read(client: Minio, bucket: str, key: str) -> bytes:
    """The whole object, its connection handed back to the pool."""
    obj = client.get_object(bucket, key)
    try:
        return obj.read()
    finally:
        obj.close()
        obj.release_conn()


def queue_counts(vhost: str, column: str = "messages") -> dict[str, int]:
    """One ``rabbitmqctl list_queues`` column (messages, consumers...) by queue name."""
    out = subprocess.run(["rabbitmqctl", "-q", "list_queues", "-p", vhost, "name", column,
                          "--no-table-headers"], capture_output=True, text=True, check=True,
                         timeout=60).stdout
    rows = (line.split() for line in out.splitlines() if line.strip())
    return {row[0]: int(row[1]) for row in rows if len(row) == 2}


def ready_now(amqp_url: str, queues: Sequence[str]) -> dict[str, int]:
    """Messages ready in each queue now, by AMQP passive declare: exact, where
    ``rabbitmqctl list_queues`` and the dashboard show quorum queues' figures as last sampled
    (every 5 s). Messages delivered and not yet acked are not counted."""
    from shared import broker

    async def run() -> dict[str, int]:
        conn = await broker.connect(amqp_url, 10, name="test-depth")
        try:
            channel = await conn.channel()
            counts = {}
            for queue in queues:
                declared = await channel.declare_queue(queue, passive=True)
                counts[queue] = int(declared.declaration_result.message_count or 0)
            return counts
        finally:
            await conn.close()

    return asyncio.run(run())


def dead_letters(vhost: str) -> dict[str, int]:
    """Messages in each dead-letter queue of ``vhost`` now (exact: ``ready_now``), on the
    test broker directly (not through a service's proxy)."""
    from urllib.parse import quote

    from shared.topology import QUEUES

    return ready_now(f"amqp://guest:guest@127.0.0.1:5672/{quote(vhost, safe='')}",
                     [q.dead_letter_queue for q in QUEUES])


def commitment_request(transaction: str | None, refs: Sequence[tuple[str, str]]) -> Dataset:
    """The Action Information of a storage commitment N-ACTION: Transaction UID (left out if
    None) and a Referenced SOP Sequence of (SOP Class UID, SOP Instance UID)."""
    ds = Dataset()
    if transaction is not None:
        ds.TransactionUID = transaction
    items = []
    for sop_class, sop_instance in refs:
        item = Dataset()
        item.ReferencedSOPClassUID = sop_class
        item.ReferencedSOPInstanceUID = sop_instance
        items.append(item)
    ds.ReferencedSOPSequence = items
    return ds
