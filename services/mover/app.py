"""Wiring for the mover; ``run`` is what ``__main__`` and the tests call."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable, Coroutine
from pathlib import Path
from typing import Any

import asyncpg
from aio_pika.abc import AbstractIncomingMessage

from services.mover.commitment import Reporter
from services.mover.worker import MoverWorker
from shared import broker, s3, topology
from shared.lifecycle import heartbeat, heartbeat_path, retry_until, stop_event
from shared.scratch import Scratch, sweep_and_say, sweep_forever
from shared.settings import MoverSettings

log = logging.getLogger("minipacs.mover")

REPORTS_AT_ONCE = 64  # storage commitment requests waiting for the index, or being reported
HAND_BACK_WAIT = 30.0  # s for jobs handed back to stop after the instance in flight, at most
LEFT_BY_MOVERS = "C-MOVE temp files left by movers that ended mid-job"


async def run(settings: MoverSettings, stop: asyncio.Event | None = None) -> None:
    stop = stop or stop_event()

    async def connect_db() -> asyncpg.Pool:
        return await asyncpg.create_pool(settings.database_url, min_size=1,
                                         max_size=2 * settings.jobs + 2, timeout=5)

    pool = await retry_until("PostgreSQL", connect_db, settings.startup_timeout)
    client = s3.client(settings)
    connection = await broker.connect(settings.amqp_url, settings.startup_timeout,
                                      name="minipacs-mover")
    link = broker.health(connection)
    progress_channel = await connection.channel(publisher_confirms=True)
    exchange, _ = await topology.declare(progress_channel)
    channel = await connection.channel()
    await channel.set_qos(prefetch_count=settings.jobs)
    _, queues = await topology.declare(channel)
    # temp files of instances on their way out: in a folder of this process's own, after
    # removing those of movers that ended without removing theirs (``shared.scratch``)
    root = Path(settings.spool_dir) / "move"
    await asyncio.to_thread(sweep_and_say, root, LEFT_BY_MOVERS)
    scratch = Scratch(root).open()
    sweeper = asyncio.create_task(sweep_forever(root, LEFT_BY_MOVERS))
    worker = MoverWorker(settings, pool, client, exchange, scratch.path)
    cancels = await topology.declare_listener(channel, topology.MOVE_CANCEL)
    cancel_tag = await cancels.consume(worker.on_cancel, no_ack=True)
    tasks: set[asyncio.Task[None]] = set()
    queue = queues[topology.MOVER.name]
    tag = await queue.consume(_in_tasks(worker.on_message, tasks, "move job"))

    reporter = Reporter(settings, pool)
    report_channel = await connection.channel()
    await report_channel.set_qos(prefetch_count=REPORTS_AT_ONCE)
    _, report_queues = await topology.declare(report_channel)
    reports: set[asyncio.Task[None]] = set()
    report_queue = report_queues[topology.COMMITMENTS.name]
    report_tag = await report_queue.consume(
        _in_tasks(reporter.on_message, reports, "storage commitment report"))
    beat = asyncio.create_task(heartbeat(heartbeat_path(settings.heartbeat_file, "mover"), stop,
                                         link.healthy))
    log.info("mover %s consuming %s (%d jobs at a time, %d associations each) and %s",
             settings.gateway_aet, queue.name, settings.jobs, settings.associations,
             report_queue.name)
    try:
        await stop.wait()
    finally:
        log.info("mover stopping: no new jobs; %d running may finish within %gs", len(tasks),
                 settings.stop_grace)
        worker.stopping.set()  # jobs waiting for another run's lock go back to the queue
        await broker.cancel_consumer(queue, tag)
        # reports not acked go back to mover.commitments with the connection, for the next mover
        await broker.cancel_consumer(report_queue, report_tag)
        for report in list(reports):
            report.cancel()
        if tasks:
            _, late = await asyncio.wait(tasks, timeout=settings.stop_grace)
            if late:
                # not cancelled: they stop after the instance in flight and go back to the
                # queue, as if this mover had been killed, and the next mover resumes them
                worker.hand_back()
                log.warning("handing back %d jobs still running after %gs: the next mover "
                            "resumes them", len(late), settings.stop_grace)
                _, late = await asyncio.wait(tasks, timeout=HAND_BACK_WAIT)
                if late:  # their messages go back with the connection
                    log.warning("%d jobs still in a sub-operation: leaving them to the "
                                "connection's close", len(late))
        await broker.cancel_consumer(cancels, cancel_tag)
        beat.cancel()
        sweeper.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await sweeper
        await connection.close()
        await pool.close()
        scratch.close()  # after the jobs: no sending thread reads its files any more
        log.info("mover stopped")


def _in_tasks(handle: Callable[[AbstractIncomingMessage], Coroutine[Any, Any, None]],
              tasks: set[asyncio.Task[None]], what: str
              ) -> Callable[[AbstractIncomingMessage], Awaitable[None]]:
    """A consumer callback that handles each message in a task of its own, kept in ``tasks``
    while it runs; an exception that escapes it is logged."""
    handled = broker.log_task_failure(what)

    async def on_message(message: AbstractIncomingMessage) -> None:
        task = asyncio.create_task(handle(message))
        tasks.add(task)
        task.add_done_callback(tasks.discard)
        task.add_done_callback(handled)

    return on_message
