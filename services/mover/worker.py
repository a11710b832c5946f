"""The mover consumer: one ``move.requested`` message = one job.

Per job: record it (``move_job``), resolve what the identifier matches through the shared
query module, send it with ``send.Sender`` in worker threads, publish ``move.progress`` while it
runs (at most one per ``PROGRESS_INTERVAL``, carrying the counts of that moment; at least every
``keepalive_every`` seconds),
record the outcome, then ack. A job taken after its ``start_by`` is recorded as expired and not
run; a cancel (``move.cancel``) stops it between two instances. A mover told to stop hands its
running jobs back (``hand_back``, after the grace ``app.py`` gives them): each stops between two
instances as on cancel, but is recorded neither canceled nor failed, no final progress goes to
its requester, and its message goes back to the queue. A job whose mover stopped during
it (handed back, killed, restarted) is resumed, except on the queue's last delivery: a job that
stopped its mover on every earlier one is recorded failed there and dead-lettered, not tried
again until an admin moves it back to the job queue, which runs it again from the start.

The job row's running counts are advisory (for a resume and the gateway's failure list): a
write of them that fails (PostgreSQL restarting, connection lost) is logged and skipped, and
the progress messages go on. The final record is not: if it cannot be written, nothing final
is published and the job goes back to the queue, so no Success is answered without it.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass, field

import aio_pika
import asyncpg
from aio_pika.abc import AbstractExchange, AbstractIncomingMessage
from minio import Minio
from pydicom.dataset import Dataset

from services.mover import jobs
from services.mover.send import Destination, Sender
from shared import nodes, topology
from shared.messages import BadMessage, MoveCancel, MoveProgress, MoveRequested
from shared.query import InstanceRef, find_instances
from shared.settings import MoverSettings, Node
from shared.suboperations import Tally

log = logging.getLogger("minipacs.mover")

PROGRESS_INTERVAL = 0.1  # seconds between two progress messages of a running job, at least
CLAIM_EVERY = 1.0  # seconds between two tries for the lock of a job that runs elsewhere
PROGRESS_WRITE_TIMEOUT = 5.0  # seconds for one write of a running job's counts, at most

# what a lost or restarting PostgreSQL raises (refused, reset, terminated, too slow)
DATABASE_ERRORS = (OSError, asyncpg.PostgresError, asyncpg.InterfaceError, TimeoutError)


class Stopping(Exception):
    """The mover is stopping while this job waits for its lock, or runs past the grace it was
    given: the job goes back to the queue, for the next mover."""


@dataclass
class MoverWorker:
    settings: MoverSettings
    pool: asyncpg.Pool
    s3: Minio
    exchange: AbstractExchange  # on a channel with publisher confirms, for progress
    running: dict[str, threading.Event] = field(default_factory=dict)
    cancelled_early: OrderedDict[str, None] = field(default_factory=OrderedDict)
    stopping: asyncio.Event = field(default_factory=asyncio.Event)  # set on SIGTERM
    # set once the grace after SIGTERM is over: running jobs stop and go back to the queue
    handing_back: threading.Event = field(default_factory=threading.Event)

    def hand_back(self) -> None:
        """Stop every running job after the instance in flight, for the next mover to resume
        (not a cancel: nothing is recorded or answered for them)."""
        self.handing_back.set()

    # -- cancel requests (every mover gets them) --------------------------------------------
    async def on_cancel(self, message: AbstractIncomingMessage) -> None:
        try:
            job_id = MoveCancel.from_bytes(message.body).job_id
        except BadMessage:
            return
        event = self.running.get(job_id)
        if event is not None:
            log.info("job=%s cancel requested", job_id[:8])
            event.set()
        else:  # not (yet) ours: remember a few, in case the job comes after its cancel
            self.cancelled_early[job_id] = None
            while len(self.cancelled_early) > 1000:
                self.cancelled_early.popitem(last=False)

    # -- jobs ---------------------------------------------------------------------------------
    async def on_message(self, message: AbstractIncomingMessage) -> None:
        try:
            job = MoveRequested.from_bytes(message.body)
        except BadMessage as exc:
            log.error("dead-lettering unreadable move job: %s", exc)
            await message.reject(requeue=False)
            return
        try:
            parked = await self.run_job(job, deliveries(message.headers),
                                        moved_back=dead_lettered(message.headers))
        except Stopping:
            log.info("job=%s back to the queue: this mover is stopping", job.job_id[:8])
            await message.nack(requeue=True)
            return
        except DATABASE_ERRORS as exc:
            log.error("job=%s could not run (%s: %s); returning it to the queue",
                      job.job_id[:8], type(exc).__name__, exc)
            await asyncio.sleep(1.0)
            await message.nack(requeue=True)
            return
        if parked:
            await message.reject(requeue=False)  # to mover.jobs.dead, where an admin sees it
        else:
            await message.ack()

    async def publish(self, progress: MoveProgress) -> None:
        body = aio_pika.Message(progress.to_bytes(), content_type="application/json")
        try:
            await asyncio.wait_for(self.exchange.publish(body, topology.MOVE_PROGRESS),
                                   self.settings.confirm_timeout)
        except Exception as exc:  # progress is advisory: the job row has the truth
            log.warning("job=%s progress not published: %s", progress.job_id[:8], exc)

    async def _end(self, job: MoveRequested, state: str, error: str, total: int = 0,
                   destination_aet: str = "") -> None:
        async with self.pool.acquire() as conn:
            await jobs.start(conn, job, state, total, destination_aet, error)
        log.info("job=%s %s: %s", job.job_id[:8], state, error)
        await self.publish(MoveProgress(job.job_id, state, failed=total, error=error))

    async def _interrupted(self, job: MoveRequested, before: jobs.Recorded, error: str) -> None:
        """A job interrupted and not resumed: recorded failed with the counts last written,
        the rest not sent."""
        async with self.pool.acquire() as conn:
            await jobs.finish(conn, job.job_id, "failed", before.remaining, before.completed,
                              before.failed, before.warning, before.failed_uids, error)
        log.warning("job=%s failed: %s", job.job_id[:8], error)
        await self.publish(MoveProgress(job.job_id, "failed", before.remaining,
                                        before.completed, before.failed, before.warning,
                                        before.failed_uids, error))

    async def run_job(self, job: MoveRequested, delivery: int = 1,
                      moved_back: bool = False) -> bool:
        """Run (or resume, or end) one job. True when the message is to be dead-lettered.
        ``moved_back``: the message was dead-lettered before, and an admin put it back."""
        owner = await self._claim(job.job_id)
        try:
            return await self._run_claimed(job, delivery, moved_back)
        finally:
            try:
                await jobs.unclaim(owner, job.job_id)
            except DATABASE_ERRORS as exc:  # its session is gone, and the lock with it
                log.warning("job=%s lock not released by hand (%s: %s): it went with its "
                            "database session", job.job_id[:8], type(exc).__name__, exc)
            finally:
                await self.pool.release(owner)

    async def _claim(self, job_id: str) -> asyncpg.pool.PoolConnectionProxy:
        """A pool connection holding the job's lock. While another mover, or another task of
        this one, runs the job (its message came back after the channel that delivered it
        closed: connection lost, consumer timeout), wait for that run to end, instead of a
        second run beside it; then the row says what is left to do. ``Stopping`` when this
        mover is told to stop meanwhile: the job is not ours to finish."""
        waiting = False
        while True:
            conn = await self.pool.acquire()
            try:
                if await jobs.claim(conn, job_id):
                    return conn
            except BaseException:
                await self.pool.release(conn)
                raise
            await self.pool.release(conn)
            if not waiting:
                waiting = True
                log.info("job=%s redelivered while it runs (its channel closed): taken up "
                         "when that run ends", job_id[:8])
            try:
                await asyncio.wait_for(self.stopping.wait(), CLAIM_EVERY)
            except TimeoutError:
                continue
            raise Stopping(job_id)

    async def _run_claimed(self, job: MoveRequested, delivery: int, moved_back: bool) -> bool:
        short = job.job_id[:8]
        async with self.pool.acquire() as conn:
            before = await jobs.recorded(conn, job.job_id)
            if (before is not None and before.state == "failed" and moved_back
                    and await jobs.reopen(conn, job.job_id)):
                # Orthanc's "resubmit": the whole set again, to the same destination; its
                # requester stopped waiting long ago, so the row and the log tell the outcome
                log.info("job=%s moved back from %s: running it again", short,
                         topology.MOVER.dead_letter_queue)
                before = None
                resubmitted = True
            else:
                resubmitted = False
            if before is not None and before.state in jobs.TERMINAL:
                log.info("job=%s already %s (redelivered)", short, before.state)
                return False
            if job.job_id in self.cancelled_early:
                await self._end(job, "canceled", "canceled before it started")
                return False
            if before is not None and before.state == "running":
                # a mover took it and stopped before the end (killed, restarted)
                if delivery > topology.MOVER.delivery_limit:  # the queue's last delivery
                    await self._interrupted(job, before, (
                        f"interrupted {delivery - 1} times: its mover stopped during each "
                        f"attempt; not tried again, dead-lettered to "
                        f"{topology.MOVER.dead_letter_queue}"))
                    return True
                if job.origin == "c-move" and before.quiet > self.settings.move_idle_timeout:
                    await self._interrupted(job, before, (
                        f"interrupted: its mover stopped during the job and it was not resumed "
                        f"within {self.settings.move_idle_timeout:g}s, when the requester "
                        f"gives up"))
                    return False
                log.info("job=%s resumed: interrupted %.1fs ago with %d completed; sending "
                         "it again", short, before.quiet, before.completed)
            elif job.start_by and time.time() > job.start_by and not resubmitted:
                await self._end(job, "expired", "taken after its requester gave up")
                return False
            node = await nodes.by_name(conn, job.destination)
            if node is None:
                await self._end(job, "failed", f"unknown destination {job.destination!r}")
                return False
            try:
                identifier = Dataset.from_json(job.identifier)
                refs = await find_instances(conn, job.level, identifier)
            except (ValueError, KeyError, TypeError) as exc:
                await self._end(job, "failed", f"identifier refused: {exc}")
                return False
            await jobs.start(conn, job, "running", len(refs), node.aet)
        log.info("job=%s %s from %s: %d instances to %s@%s:%d", short, job.origin,
                 job.requested_by_aet or "-", len(refs), node.aet, node.host, node.port)
        cancelled = threading.Event()
        self.running[job.job_id] = cancelled
        try:
            await self._send(job, node, refs, cancelled)
        finally:
            self.running.pop(job.job_id, None)
        return False

    async def _send(self, job: MoveRequested, node: Node, refs: list[InstanceRef],
                    cancelled: threading.Event) -> None:
        """Send the job's instances, publishing progress, and record the outcome."""
        short = job.job_id[:8]
        loop = asyncio.get_running_loop()
        changed = asyncio.Event()

        def notify() -> None:  # from the sending threads: wake the reporter once, not per change
            if not changed.is_set():
                loop.call_soon_threadsafe(changed.set)

        tally = Tally(len(refs), on_change=notify)
        await self.publish(MoveProgress(job.job_id, "running", remaining=len(refs)))
        sender = Sender(self.settings, self.s3, Destination(node.aet, node.host, node.port),
                        tally, cancelled, job.requested_by_aet, job.move_originator_message_id,
                        stopping=self.handing_back)
        started = time.perf_counter()
        sending = asyncio.create_task(asyncio.to_thread(sender.run, refs) if refs
                                      else _nothing())
        sending.add_done_callback(lambda _: changed.set())
        reporter = asyncio.create_task(self._report(job.job_id, tally, changed, sending))
        try:
            error = await sending
        finally:
            await reporter
        remaining, completed, failed, warning, failed_uids = tally.snapshot()
        if self.handing_back.is_set() and remaining and not cancelled.is_set():
            # left running, as by a mover killed: the next mover resumes it (and its requester,
            # still waiting, hears from that one); the row's counts and time are brought up to
            # date for it
            await self._record_progress(job.job_id, remaining, completed, failed, warning,
                                        failed_uids)
            log.info("job=%s stopped with %d of %d instances answered: this mover is stopping",
                     short, len(refs) - remaining, len(refs))
            raise Stopping(job.job_id)
        if cancelled.is_set() and remaining:
            state = "canceled"
        elif error:
            state = "failed"
        else:
            state = "done"
        async with self.pool.acquire() as conn:
            await jobs.finish(conn, job.job_id, state, remaining, completed, failed, warning,
                              failed_uids, error)
        seconds = time.perf_counter() - started
        log.info("job=%s %s: %d completed, %d failed, %d warning, %d remaining in %.2fs "
                 "(%.0f instances/s)%s", short, state, completed, failed, warning, remaining,
                 seconds, (completed + warning) / seconds if seconds else 0,
                 f": {error}" if error else "")
        await self.publish(MoveProgress(job.job_id, state, remaining, completed, failed,
                                        warning, failed_uids, error))

    async def _report(self, job_id: str, tally: Tally, changed: asyncio.Event,
                      sending: asyncio.Task[str]) -> None:
        """Publish the counts while ``sending`` runs: coalesced, and a keep-alive when idle."""
        last_db = time.monotonic()
        last: tuple[int, int, int, int] | None = None
        while not sending.done():
            try:
                await asyncio.wait_for(changed.wait(), self.settings.keepalive_every)
            except TimeoutError:
                last = None  # publish the same counts again: "still working"
            changed.clear()
            if sending.done():
                return
            remaining, completed, failed, warning, failed_uids = tally.snapshot()
            counts = (remaining, completed, failed, warning)
            if counts != last:
                last = counts
                await self.publish(MoveProgress(job_id, "running", *counts))
            if time.monotonic() - last_db > 1.0:
                last_db = time.monotonic()
                await self._record_progress(job_id, *counts, failed_uids)
            # at most one progress message per interval: each one is a broker round trip and
            # a pending response; the counts they carry are exact, the final message too
            await asyncio.wait({sending},
                               timeout=max(self.settings.progress_every, PROGRESS_INTERVAL))

    async def _record_progress(self, job_id: str, remaining: int, completed: int, failed: int,
                               warning: int, failed_uids: list[str]) -> None:
        """Write a running job's counts to its row; a failure is logged and skipped (the next
        write, or the final one, brings the row up to date)."""
        try:
            async with asyncio.timeout(PROGRESS_WRITE_TIMEOUT), self.pool.acquire() as conn:
                await jobs.progress(conn, job_id, remaining, completed, failed, warning,
                                    failed_uids)
        except DATABASE_ERRORS as exc:
            log.warning("job=%s progress not recorded in move_job (%d completed, %d failed, "
                        "%d remaining): %s: %s; sending goes on", job_id[:8], completed, failed,
                        remaining, type(exc).__name__, str(exc) or "timed out")


def dead_lettered(headers: Mapping[str, object] | None) -> bool:
    """Whether the message was dead-lettered before (RabbitMQ's ``x-death`` header): in the
    job queue again, it was moved back from the dead-letter queue."""
    return bool((headers or {}).get("x-death"))


def deliveries(headers: Mapping[str, object] | None) -> int:
    """How many times the queue has delivered this message, this one included.

    A quorum queue counts the earlier deliveries and dead-letters the message once that count
    would pass its delivery limit. RabbitMQ 3.x counts every return in ``x-delivery-count``;
    4.3 counts only failed ones there (a consumer's connection lost among them) and every
    return in ``x-acquired-count``. The larger of the two never comes short of the broker's
    count, so the last delivery is never missed; at worst it is seen early.
    """
    counts = [(headers or {}).get(name, 0) for name in ("x-delivery-count", "x-acquired-count")]
    return max((c for c in counts if isinstance(c, int)), default=0) + 1


async def _nothing() -> str:
    return ""
