"""Wiring for the storage service; ``run`` is what ``__main__`` and the tests call."""

from __future__ import annotations

import asyncio
import logging
from concurrent.futures import ThreadPoolExecutor

from services.storage.worker import StorageWorker
from shared import broker, s3, topology
from shared.lifecycle import heartbeat, heartbeat_path, retry_until, stop_event
from shared.settings import StorageSettings
from shared.spool import Spool

log = logging.getLogger("minipacs.storage")


async def run(settings: StorageSettings, stop: asyncio.Event | None = None) -> None:
    stop = stop or stop_event()
    # S3 uploads run in worker threads: as many as messages may be in progress at once
    asyncio.get_running_loop().set_default_executor(
        ThreadPoolExecutor(settings.concurrency, thread_name_prefix="storage"))
    spool = Spool(settings.spool_dir).create()
    client = s3.client(settings)

    async def bucket() -> None:
        await asyncio.to_thread(s3.ensure_bucket, client, settings.s3_bucket)
        await asyncio.to_thread(s3.probe_write, client, settings.s3_bucket)

    await retry_until("S3 (bucket, and a write probe)", bucket, settings.startup_timeout)
    connection = await broker.connect(settings.amqp_url, settings.startup_timeout,
                                      name="minipacs-storage")
    publisher = broker.Publisher(connection, settings.confirm_timeout)
    await publisher.open()
    channel = await connection.channel()
    await channel.set_qos(prefetch_count=settings.prefetch)
    _, queues = await topology.declare(channel)
    worker = StorageWorker(settings, spool, client, publisher, stop)
    sem = asyncio.Semaphore(settings.concurrency)
    tasks: set[asyncio.Task[None]] = set()
    beat = asyncio.create_task(heartbeat(heartbeat_path(settings.heartbeat_file, "storage"), stop,
                                         lambda: publisher.ready))
    sweeper = asyncio.create_task(worker.sweep_forever())
    reporter = asyncio.create_task(worker.report_forever())
    queue = queues[topology.STORAGE.name]
    log.info("storage consuming %s into bucket %s", queue.name, settings.s3_bucket)

    handled = broker.log_task_failure("storage message handler")

    async def on_message(message: object) -> None:
        await sem.acquire()
        task = asyncio.create_task(worker.handle(message))  # type: ignore[arg-type]
        tasks.add(task)
        task.add_done_callback(tasks.discard)
        task.add_done_callback(lambda _t: sem.release())
        task.add_done_callback(handled)

    tag = await queue.consume(on_message)  # type: ignore[arg-type]
    try:
        await stop.wait()
    finally:
        log.info("storage stopping: no new messages, finishing %d in flight", len(tasks))
        await broker.cancel_consumer(queue, tag)
        if tasks:
            await asyncio.wait(tasks, timeout=60)
        beat.cancel()
        sweeper.cancel()
        reporter.cancel()
        await connection.close()
        log.info("storage stopped")
