"""The indexer consumer: collects ``instance.stored`` messages into batches, writes each batch in
one transaction and acks after the commit.

PostgreSQL down: the batch is held and retried with backoff (not requeued, so the delivery
limit is not used up). A batch that fails on its data is split up, so one poison message is
dead-lettered and the rest are indexed.

RabbitMQ connection lost: the broker requeues every message not yet acked on the dead channel
and redelivers it once aio-pika has re-consumed. Held messages from that channel are dropped
(their redelivered copies take their place), and an ack that cannot be sent any more is logged,
not raised: indexing is idempotent, so the redelivered copy converges to the same row.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field

import asyncpg
from aio_pika.abc import AbstractIncomingMessage

from services.indexer.store import write_batch
from shared import crash
from shared.broker import delivered_on_live_channel, settle
from shared.messages import BadMessage, InstanceStored, read_batch
from shared.settings import IndexerSettings

log = logging.getLogger("minipacs.indexer")

# Worth trying again as they are: PostgreSQL away, or a transaction it rolled back (deadlock,
# serialization failure) that says nothing about the data.
_TRANSIENT_ERRORS = (OSError, asyncpg.exceptions.ConnectionDoesNotExistError,
                     asyncpg.exceptions.CannotConnectNowError,
                     asyncpg.exceptions.InterfaceError, asyncpg.exceptions.AdminShutdownError,
                     TimeoutError, asyncpg.exceptions.TransactionRollbackError)
_DATA_ERRORS = (asyncpg.PostgresError, ValueError, TypeError, KeyError)
Held = tuple[AbstractIncomingMessage, list[InstanceStored]]  # a message and its events


@dataclass
class IndexerWorker:
    settings: IndexerSettings
    pool: asyncpg.Pool
    stop: asyncio.Event
    pending: list[Held] = field(default_factory=list)
    wake: asyncio.Event = field(default_factory=asyncio.Event)

    def __post_init__(self) -> None:
        self.crash = crash.parse(self.settings.crash_at)

    async def on_message(self, message: AbstractIncomingMessage) -> None:
        try:
            events = read_batch(InstanceStored, message.body)
        except BadMessage as exc:
            log.error("dead-lettering unreadable message: %s", exc)
            await settle(message, "reject")
            return
        self.pending.append((message, events))
        self.wake.set()

    def held_events(self) -> int:
        return sum(len(events) for _, events in self.pending)

    def take_batch(self) -> list[Held]:
        """Whole messages from the front of ``pending``, up to ``batch_size`` events (at least
        one message)."""
        count, taken = 0, 0
        for _, events in self.pending:
            if taken and count + len(events) > self.settings.batch_size:
                break
            count += len(events)
            taken += 1
        batch = self.pending[:taken]
        del self.pending[:taken]
        return batch

    async def run(self) -> None:
        while not self.stop.is_set() or self.pending:
            if not self.pending:
                self.wake.clear()
                waiter = asyncio.create_task(self.wake.wait())
                stopper = asyncio.create_task(self.stop.wait())
                await asyncio.wait({waiter, stopper}, return_when=asyncio.FIRST_COMPLETED)
                waiter.cancel()
                stopper.cancel()
                continue
            if self.held_events() < self.settings.batch_size and not self.stop.is_set():
                await asyncio.sleep(self.settings.batch_wait)
            batch = self.take_batch()
            live = [item for item in batch if delivered_on_live_channel(item[0])]
            if len(live) < len(batch):
                log.warning("dropping %d held messages delivered on a closed channel (the "
                            "broker redelivers them)", len(batch) - len(live))
            if live:
                await self.flush(live)

    async def flush(self, batch: list[Held]) -> None:
        crash.reached(self.crash, "indexer.taken")
        delay = 0.5
        while True:
            started = time.perf_counter()
            try:
                async with self.pool.acquire() as conn:
                    result = await write_batch(conn, [e for _, events in batch for e in events],
                                               self.settings.overwrite_instances)
            except _TRANSIENT_ERRORS as exc:
                if self.stop.is_set():
                    for message, _ in batch:
                        await settle(message, "requeue")
                    return
                why = ("rolled the batch back" if isinstance(
                    exc, asyncpg.exceptions.TransactionRollbackError) else "unavailable")
                log.warning("PostgreSQL %s (%s); holding %d messages, retrying in %.1fs", why,
                            type(exc).__name__, len(batch), delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 10.0)
                continue
            except _DATA_ERRORS as exc:
                if len(batch) == 1:
                    await self.refused(batch[0], exc)
                    return
                half = len(batch) // 2
                await self.flush(batch[:half])
                await self.flush(batch[half:])
                return
            crash.reached(self.crash, "indexer.committed")
            unacked = 0
            for message, _ in batch:
                unacked += not await settle(message, "ack")
            if unacked:
                log.warning("%d of %d indexed messages could not be acked (broker connection "
                            "lost); their redelivery will be counted as duplicates", unacked,
                            len(batch))
            crash.reached(self.crash, "indexer.acked")
            log.info("indexed batch of %d: %d new, %d duplicate, %d conflict%s (%.1f ms)",
                     result.inserted + result.duplicates + result.conflicts, result.inserted,
                     result.duplicates, result.conflicts,
                     f" ({result.replaced} replaced)" if result.replaced else "",
                     (time.perf_counter() - started) * 1000)
            return

    async def refused(self, held: Held, exc: Exception) -> None:
        """One message the index refuses. Its events are written one by one (each its own
        transaction), so one bad instance does not keep the others of its batch out of the
        index; if any is refused, the whole message is dead-lettered (replaying it later is
        idempotent: the events already written count as duplicates)."""
        message, events = held
        bad = [(events[0], exc)] if len(events) == 1 else []
        for event in events if len(events) > 1 else []:
            try:
                async with self.pool.acquire() as conn:
                    await write_batch(conn, [event], self.settings.overwrite_instances)
            except _TRANSIENT_ERRORS:  # PostgreSQL went away meanwhile: try it all later
                await settle(message, "requeue")
                return
            except _DATA_ERRORS as one:
                bad.append((event, one))
        if not bad:  # it was not the data after all (e.g. a conflict between two events)
            await settle(message, "ack")
            return
        for event, error in bad:
            log.error("the index refuses obj=%s: %s: %s", event.sha256[:12],
                      type(error).__name__, error)
        log.error("dead-lettering a message of %d events, %d refused (the others are indexed)",
                  len(events), len(bad))
        await settle(message, "reject")
