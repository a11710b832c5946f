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

PostgreSQL unavailable (restarting, stopped, connection lost: ``TRANSIENT_ERRORS``) does not
cost a job a delivery: the mover holds its message and tries again, after 0.5 s, then twice
as long each time up to ``RETRY_MAX``, for as long as it runs, telling the requester it has
the job (a "running" progress message at least every ``keepalive_every`` seconds: no counts
before the job has started, its final ones before its end is recorded). Only when the mover
is told to stop does a held job go back to the queue: at once if it had not started, after
the grace if its end was not recorded yet. (A nack per failed try counted as a delivery on the
quorum queue: a PostgreSQL outage of a few seconds dead-lettered the jobs that arrived
meanwhile.) Other PostgreSQL errors return the job to the queue after a second, a bounded
number of times (the queue's delivery limit), then it is dead-lettered.

The job row's running counts are advisory (for a resume and the gateway's failure list): a
write of them that fails (PostgreSQL restarting, connection lost) is logged and skipped, and
the progress messages go on. The final record is not: until it is written, nothing final is
published and the message is neither acked nor returned, so no Success is answered without it
and the instances are not sent a second time.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

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

RETRY_FIRST = 0.5  # s before the next try of a job held while PostgreSQL is unavailable
RETRY_MAX = 10.0  # s: the pause doubles after each failed try, up to this

# what a lost or restarting PostgreSQL raises (refused, reset, terminated, too slow)
DATABASE_ERRORS = (OSError, asyncpg.PostgresError, asyncpg.InterfaceError, TimeoutError)
# those of them that pass by themselves: the job is held and tried again, not returned (as the
# indexer's ``_TRANSIENT_ERRORS``, with the whole connection class and crash shutdowns)
TRANSIENT_ERRORS = (OSError, TimeoutError, asyncpg.InterfaceError,
                    asyncpg.PostgresConnectionError, asyncpg.exceptions.CannotConnectNowError,
                    asyncpg.exceptions.AdminShutdownError, asyncpg.exceptions.CrashShutdownError,
                    asyncpg.exceptions.TooManyConnectionsError,
                    asyncpg.exceptions.TransactionRollbackError)


class Stopping(Exception):
    """The mover is stopping while this job waits for its lock or for PostgreSQL, or runs past
    the grace it was given: the job goes back to the queue, for the next mover."""


@dataclass
class Held:
    """A job held by this mover while PostgreSQL is unavailable: when it first and last told
    the requester that it has the job (epoch seconds, 0: not yet), and the next pause."""

    since: float = 0.0
    last: float = 0.0
    pause: float = RETRY_FIRST


@dataclass
class MoverWorker:
    settings: MoverSettings
    pool: asyncpg.Pool
    s3: Minio
    exchange: AbstractExchange  # on a channel with publisher confirms, for progress
    tmpdir: Path  # this process's scratch folder: instances over 4 MiB wait there to be sent
    running: dict[str, threading.Event] = field(default_factory=dict)
    cancelled_early: OrderedDict[str, None] = field(default_factory=OrderedDict)
    stopping: asyncio.Event = field(default_factory=asyncio.Event)  # set on SIGTERM
    # set once the grace after SIGTERM is over: running jobs stop and go back to the queue
    handing_back: threading.Event = field(default_factory=threading.Event)
    handed_back: asyncio.Event = field(default_factory=asyncio.Event)  # the same, for the loop

    def hand_back(self) -> None:
        """Stop every running job after the instance in flight, for the next mover to resume
        (not a cancel: nothing is recorded or answered for them)."""
        self.handing_back.set()
        self.handed_back.set()

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
        held = Held()
        while True:
            try:
                parked = await self.run_job(job, deliveries(message.headers),
                                            moved_back=dead_lettered(message.headers),
                                            held=held)
            except Stopping:
                log.info("job=%s back to the queue: this mover is stopping", job.job_id[:8])
                await message.nack(requeue=True)
                return
            except TRANSIENT_ERRORS as exc:
                if not self.stopping.is_set():
                    log.warning("job=%s held: PostgreSQL unavailable (%s: %s); trying again "
                                "in %.1fs", job.job_id[:8], type(exc).__name__,
                                str(exc) or "timed out", held.pause)
                    if not await self._hold(held, self.stopping,
                                            MoveProgress(job.job_id, "running")):
                        continue
                log.info("job=%s back to the queue: PostgreSQL unavailable and this mover is "
                         "stopping", job.job_id[:8])
                await message.nack(requeue=True)
                return
            except DATABASE_ERRORS as exc:
                log.error("job=%s could not run (%s: %s); returning it to the queue",
                          job.job_id[:8], type(exc).__name__, exc)
                await asyncio.sleep(1.0)
                await message.nack(requeue=True)
                return
            break
        if parked:
            await message.reject(requeue=False)  # to mover.jobs.dead, where an admin sees it
        else:
            await message.ack()

    async def _hold(self, held: Held, until: asyncio.Event, notice: MoveProgress) -> bool:
        """Wait ``held.pause`` before the next try of a held job (and double the pause after,
        up to ``RETRY_MAX``), publishing ``notice`` now and then so that the requester knows
        the job is taken (not after a cancel: the requester no longer waits for it). True when
        ``until`` is set meanwhile: stop trying."""
        deadline = time.monotonic() + held.pause
        held.pause = min(held.pause * 2, RETRY_MAX)
        every = max(self.settings.keepalive_every, PROGRESS_INTERVAL)
        while True:
            now = time.time()
            if now - held.last >= every and notice.job_id not in self.cancelled_early:
                await self.publish(notice)
                held.since = held.since or now
                held.last = now
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            try:
                await asyncio.wait_for(until.wait(), min(left, every))
            except TimeoutError:
                continue
            return True

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

    async def run_job(self, job: MoveRequested, delivery: int = 1, moved_back: bool = False,
                      held: Held | None = None) -> bool:
        """Run (or resume, or end) one job. True when the message is to be dead-lettered.
        ``moved_back``: the message was dead-lettered before, and an admin put it back.
        ``held``: how long this mover has held the job, PostgreSQL unavailable, telling its
        requester so (then the requester still waits, past ``start_by`` too)."""
        owner = await self._claim(job.job_id)
        try:
            return await self._run_claimed(job, delivery, moved_back, held or Held())
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

    async def _run_claimed(self, job: MoveRequested, delivery: int, moved_back: bool,
                           held: Held) -> bool:
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
                # the requester's last news of the job: the row's last write, or what this
                # mover published while it held the job
                quiet = min(before.quiet, time.time() - held.last)
                if job.origin == "c-move" and quiet > self.settings.move_idle_timeout:
                    await self._interrupted(job, before, (
                        f"interrupted: its mover stopped during the job and it was not resumed "
                        f"within {self.settings.move_idle_timeout:g}s, when the requester "
                        f"gives up"))
                    return False
                log.info("job=%s resumed: interrupted %.1fs ago with %d completed; sending "
                         "it again", short, quiet, before.completed)
            elif (job.start_by and time.time() > job.start_by and not resubmitted
                  and not 0 < held.since <= job.start_by):
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
                        tally, cancelled, self.tmpdir, job.requested_by_aet,
                        job.move_originator_message_id, stopping=self.handing_back)
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
        elif failed and not completed and not warning:  # the requester hears 0xA702
            state, error = "failed", (f"none of the {failed} instances could be sent (the "
                                      f"mover's log says why for each)")
        else:
            state = "done"
        await self._finish(job.job_id, state, remaining, completed, failed, warning,
                           failed_uids, error)
        seconds = time.perf_counter() - started
        log.info("job=%s %s: %d completed, %d failed, %d warning, %d remaining in %.2fs "
                 "(%.0f instances/s)%s", short, state, completed, failed, warning, remaining,
                 seconds, (completed + warning) / seconds if seconds else 0,
                 f": {error}" if error else "")
        await self.publish(MoveProgress(job.job_id, state, remaining, completed, failed,
                                        warning, failed_uids, error))

    async def _finish(self, job_id: str, state: str, remaining: int, completed: int,
                      failed: int, warning: int, failed_uids: list[str], error: str) -> None:
        """Record a job's outcome, holding it while PostgreSQL is unavailable (its requester
        hears its final counts, still "running", meanwhile): sending it again would duplicate
        every instance. ``Stopping`` when the mover hands its jobs back meanwhile."""
        held = Held()
        while True:
            try:
                async with self.pool.acquire() as conn:
                    await jobs.finish(conn, job_id, state, remaining, completed, failed,
                                      warning, failed_uids, error)
                return
            except TRANSIENT_ERRORS as exc:
                if self.handed_back.is_set():
                    raise Stopping(job_id) from exc
                log.warning("job=%s %s, not recorded yet: PostgreSQL unavailable (%s: %s); "
                            "trying again in %.1fs", job_id[:8], state, type(exc).__name__,
                            str(exc) or "timed out", held.pause)
            notice = MoveProgress(job_id, "running", remaining, completed, failed, warning)
            if await self._hold(held, self.handed_back, notice):
                raise Stopping(job_id)

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
