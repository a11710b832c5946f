"""Storage commitment reports (PS3.4 J.3.3): one ``commitment.requested`` message = one report.

The gateway answered the modality's N-ACTION once this message was confirmed. Here: wait until
every referenced instance is in the index (storage verifies the object in S3 before the indexer
writes its row, so a row is the proof that the instance is safe), or until the request's
``report_by``; then send the N-EVENT-REPORT on a new association to the requester, and ack.
A report the requester does not take is tried 4 times (pauses of 2, 10 and 30 s), then
dead-lettered to ``mover.commitments.dead``, where the dashboard shows it: moved back to
``mover.commitments``, it is reported again, from the index as it is then. A mover stopped or
killed before its ack leaves the message to the next mover (or to itself, restarted), which
reports it: a modality may get a report twice, never none. An index that cannot be read
(PostgreSQL unavailable) when the deadline comes is waited for, the message held, as storage
and the indexer hold theirs: a report cannot say what the index does not, and putting the
message back would use up the queue's delivery limit on a fault that is not the message's.
"""

from __future__ import annotations

import asyncio
import logging
import time

import asyncpg
from aio_pika.abc import AbstractIncomingMessage
from pydicom.dataset import Dataset
from pynetdicom import AE, build_role

from shared.commitment import (
    STORAGE_COMMITMENT,
    STORAGE_COMMITMENT_INSTANCE,
    CommitRequest,
    report,
)
from shared.messages import BadMessage, CommitmentRequested
from shared.settings import MoverSettings

log = logging.getLogger("minipacs.mover")

INDEXED = ("SELECT sop_instance_uid, sop_class_uid FROM instance "
           "WHERE sop_instance_uid = ANY($1::text[])")
RETRY_PAUSES = (2.0, 10.0, 30.0)  # s between the attempts to deliver a report


def read(body: bytes) -> tuple[CommitmentRequested, CommitRequest]:
    """The message and the request it carries; ``BadMessage`` if it is not one."""
    job = CommitmentRequested.from_bytes(body)
    try:
        refs = tuple((str(c), str(i)) for c, i in job.refs)
    except (TypeError, ValueError) as exc:
        raise BadMessage(f"commitment.requested: refs: {exc}") from exc
    if not refs:
        raise BadMessage("commitment.requested: no refs")
    return job, CommitRequest(job.transaction_uid, refs)


class Reporter:
    def __init__(self, settings: MoverSettings, pool: asyncpg.Pool) -> None:
        self.settings = settings
        self.pool = pool

    async def on_message(self, message: AbstractIncomingMessage) -> None:
        try:
            job, request = read(message.body)
        except BadMessage as exc:
            log.error("dead-lettering unreadable storage commitment request: %s", exc)
            await message.reject(requeue=False)
            return
        if await self.settle(job, request):
            await message.ack()
        else:
            await message.reject(requeue=False)  # to mover.commitments.dead, where it shows

    async def settle(self, job: CommitmentRequested, request: CommitRequest) -> bool:
        """Wait for the index, then send the report: True once the requester took it."""
        indexed = await self._wait_indexed(request, job.report_by, job.report_aet)
        event_type, info = report(request, indexed, self.settings.gateway_aet)
        failed = len(info.get("FailedSOPSequence") or [])
        where = f"{job.report_aet} ({job.report_host}:{job.report_port})"
        for attempt, pause in enumerate((*RETRY_PAUSES, 0.0), start=1):
            try:
                status = await asyncio.to_thread(self._send, job, event_type, info)
            except Exception as exc:
                status, why = None, f"{type(exc).__name__}: {exc}"
            else:
                why = "no status in the answer" if status is None else f"0x{status:04X}"
            if status == 0x0000:
                log.info("storage commitment report sent to %s: %d committed, %d failed",
                         job.report_aet, len(request.refs) - failed, failed)
                return True
            log.warning("storage commitment report to %s not delivered (attempt %d: %s)",
                        where, attempt, why)
            if pause:
                await asyncio.sleep(pause)
        log.error("storage commitment report to %s given up: the request waits in "
                  "mover.commitments.dead (move it back to report again); the modality keeps "
                  "its copies and may ask again", where)
        return False

    async def _wait_indexed(self, request: CommitRequest, deadline: float,
                            requester: str) -> dict[str, str]:
        """The referenced instances in the index (with their class), polled until all are
        there or ``deadline`` (epoch seconds) passes; past it, until the index can be read
        (0.5 s, doubling up to 10 s; a stopping mover cancels this, and the message goes
        back to the queue with its connection)."""
        wanted = [uid for _, uid in request.refs]
        pause = 0.1
        held = 0.5
        indexed: dict[str, str] = {}
        while True:
            try:
                async with self.pool.acquire() as conn:
                    rows = await conn.fetch(INDEXED, wanted)
                indexed = {r["sop_instance_uid"]: r["sop_class_uid"] for r in rows}
                error = None
            except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
                error = exc
            if error is None and len(indexed) == len(set(wanted)):
                return indexed
            if error is not None and time.time() + pause > deadline:
                log.warning("storage commitment for %s: index not readable (%s: %s); held, "
                            "trying again in %.1fs", requester, type(error).__name__, error,
                            held)
                await asyncio.sleep(held)
                held = min(held * 2, 10.0)
                continue
            if time.time() + pause > deadline:
                return indexed
            await asyncio.sleep(pause)
            pause = min(pause * 2, 2.0)

    def _send(self, job: CommitmentRequested, event_type: int, info: Dataset) -> int | None:
        """One association to the requester, one N-EVENT-REPORT: its status, None if none."""
        s = self.settings
        ae = AE(ae_title=s.gateway_aet)
        ae.acse_timeout, ae.dimse_timeout, ae.network_timeout = (
            s.acse_timeout, s.dimse_timeout, s.network_timeout)
        ae.add_requested_context(STORAGE_COMMITMENT)
        # we send the report as the SCP of the class, on an association we request
        role = build_role(STORAGE_COMMITMENT, scu_role=False, scp_role=True)
        assoc = ae.associate(job.report_host, job.report_port, ae_title=job.report_aet,
                             ext_neg=[role])
        if not assoc.is_established:
            raise ConnectionError("association rejected or not answered")
        try:
            answer, _ = assoc.send_n_event_report(info, event_type, STORAGE_COMMITMENT,
                                                  STORAGE_COMMITMENT_INSTANCE)
        finally:
            assoc.release()
        return int(answer.Status) if answer and "Status" in answer else None
