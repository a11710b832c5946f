"""Wiring for the indexer; ``run`` is what ``__main__`` and the tests call."""

from __future__ import annotations

import asyncio
import logging

import asyncpg

from services.indexer.worker import IndexerWorker
from shared import broker, topology
from shared.lifecycle import heartbeat, heartbeat_path, retry_until, stop_event
from shared.settings import IndexerSettings

log = logging.getLogger("minipacs.indexer")


def _report_crash(task: asyncio.Task[None]) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.error("indexer batch writer stopped: nothing more will be indexed; reporting "
                  "unhealthy", exc_info=task.exception())


async def run(settings: IndexerSettings, stop: asyncio.Event | None = None) -> None:
    stop = stop or stop_event()

    async def connect_db() -> asyncpg.Pool:
        return await asyncpg.create_pool(settings.database_url, min_size=1, max_size=4,
                                         timeout=5)

    pool = await retry_until("PostgreSQL", connect_db, settings.startup_timeout)
    connection = await broker.connect(settings.amqp_url, settings.startup_timeout,
                                      name="minipacs-indexer")
    link = broker.health(connection)
    channel = await connection.channel()
    await channel.set_qos(prefetch_count=settings.batch_size * 2)
    _, queues = await topology.declare(channel)
    worker = IndexerWorker(settings, pool, stop)
    queue = queues[topology.INDEXER.name]
    tag = await queue.consume(worker.on_message)
    log.info("indexer consuming %s", queue.name)
    runner = asyncio.create_task(worker.run())
    runner.add_done_callback(_report_crash)
    beat = asyncio.create_task(heartbeat(heartbeat_path(settings.heartbeat_file, "indexer"), stop,
                                         lambda: link.healthy() and not runner.done()))
    try:
        await stop.wait()
    finally:
        log.info("indexer stopping: no new messages, writing %d held", len(worker.pending))
        await broker.cancel_consumer(queue, tag)
        if not runner.done():
            await asyncio.wait_for(runner, 60)
        beat.cancel()
        await connection.close()
        await pool.close()
        log.info("indexer stopped")
