"""The mover's hold of a job while PostgreSQL is unavailable (``services/mover/worker.py``),
with a pool that refuses every connection: the message is neither nacked nor acked while the
mover runs (each nack was a delivery of the quorum queue, and a few seconds of outage
dead-lettered the job), the tries back off, the requester hears that the job is taken; told to
stop, the mover returns the job at once."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

from services.mover.worker import RETRY_FIRST, MoverWorker
from shared.messages import MoveProgress, MoveRequested
from shared.settings import MoverSettings


class RefusingPool:
    def __init__(self) -> None:
        self.tries: list[float] = []

    async def acquire(self) -> Any:
        self.tries.append(time.monotonic())
        raise ConnectionRefusedError(111, "Connection refused")


@dataclass
class Exchange:
    published: list[MoveProgress] = field(default_factory=list)

    async def publish(self, message: Any, routing_key: str) -> None:
        self.published.append(MoveProgress.from_bytes(message.body))


@dataclass
class Message:
    body: bytes
    headers: dict[str, Any] = field(default_factory=dict)
    settled: list[str] = field(default_factory=list)

    async def ack(self) -> None:
        self.settled.append("ack")

    async def nack(self, requeue: bool = True) -> None:
        self.settled.append(f"nack requeue={requeue}")

    async def reject(self, requeue: bool = False) -> None:
        self.settled.append(f"reject requeue={requeue}")


async def test_a_job_is_held_with_backoff_while_postgresql_refuses_and_returned_on_stop(
        tmp_path: Path) -> None:
    pool, exchange = RefusingPool(), Exchange()
    worker = MoverWorker(MoverSettings(keepalive_every=0.2), cast(Any, pool), cast(Any, None),
                         cast(Any, exchange), tmp_path)
    job = MoveRequested(job_id="0f3c1b0e-2b1a-4c1e-9d2a-3f4e5a6b7c8d", level="STUDY",
                        identifier={}, destination="archive", start_by=time.time() + 10)
    message = Message(job.to_bytes())
    task = asyncio.create_task(worker.on_message(cast(Any, message)))
    await asyncio.sleep(8 * RETRY_FIRST)  # 4 s: a nack a second dead-lettered it in this time
    assert message.settled == []
    # tries after 0.5, 1 and 2 s: backing off, not one a second
    pauses = [b - a for a, b in zip(pool.tries, pool.tries[1:], strict=False)]
    assert len(pool.tries) == 4, pauses
    assert all(want - 0.05 < got < want + 0.4
               for got, want in zip(pauses, (0.5, 1.0, 2.0), strict=True)), pauses
    # the requester heard "running" (no counts yet) about every 0.2 s
    assert all(p.job_id == job.job_id and p.state == "running" and p.remaining == 0
               for p in exchange.published)
    assert len(exchange.published) >= 15, exchange.published
    worker.stopping.set()  # SIGTERM
    await asyncio.wait_for(task, 1.0)
    assert message.settled == ["nack requeue=True"]
