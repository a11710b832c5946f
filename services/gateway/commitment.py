"""Storage Commitment Push Model, SCP (PS3.4 Annex J): a modality asks, with N-ACTION, whether
the archive has taken charge of the instances it sent, and deletes its own copies once told so.

An instance is committed when it is in the index: storage writes the object to S3 and verifies
it before the indexer writes its row (file before index), so a row is the proof that the
instance is safe in the archive of record. The N-ACTION is answered at once; the report follows
as an N-EVENT-REPORT on a new association to the requester, found by its AE title among the
known nodes (``MINIPACS_NODES``), once every referenced instance is indexed or
``MINIPACS_COMMIT_TIMEOUT`` has passed: instances still missing then are reported failed (the
modality keeps them and may ask again). Instances just sent are usually indexed within a
second, so a request that follows the last C-STORE is reported successful, not failed.

Pending requests live in the gateway's memory: one the gateway is stopped during gets no
report, and the modality asks again after its own timeout, as it does when a report is lost.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, cast

import asyncpg
from pydicom.dataset import Dataset
from pynetdicom import AE, build_role
from pynetdicom.dimse_primitives import N_ACTION
from pynetdicom.events import Event

from services.gateway import statuses
from services.gateway.bridge import LoopBridge
from shared import nodes as node_table
from shared.keys import InvalidUID, validate_uid
from shared.settings import GatewaySettings, Node

log = logging.getLogger("minipacs.gateway")

STORAGE_COMMITMENT = "1.2.840.10008.1.20.1"            # Storage Commitment Push Model SOP Class
STORAGE_COMMITMENT_INSTANCE = "1.2.840.10008.1.20.1.1"  # its well-known SOP Instance
REQUEST_COMMITMENT = 1                  # the one Action Type ID of the class
ALL_COMMITTED, FAILURES_EXIST = 1, 2    # Event Type IDs of the report
NO_SUCH_OBJECT_INSTANCE = 0x0112        # Failure Reasons (PS3.3 C.14.1.1)
CLASS_INSTANCE_CONFLICT = 0x0119
# N-ACTION statuses (PS3.7 C) besides those in statuses.py
INVALID_ATTRIBUTE_VALUE = 0x0106
INVALID_OBJECT_INSTANCE = 0x0117
MISSING_ATTRIBUTE = 0x0120
NO_SUCH_ACTION = 0x0123

INDEXED = "SELECT sop_instance_uid, sop_class_uid FROM instance " \
          "WHERE sop_instance_uid = ANY($1::text[])"


class Refused(Exception):
    """An N-ACTION that cannot be taken: its status and the reason (the Error Comment)."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status


@dataclass(frozen=True)
class CommitRequest:
    transaction_uid: str
    refs: tuple[tuple[str, str], ...]  # (SOP Class UID, SOP Instance UID), in request order


def parse_request(action_type: int | None, requested_instance: str,
                  info: Dataset | None) -> CommitRequest:
    """An N-ACTION of the Storage Commitment Push Model SOP Class -> the request, or
    ``Refused`` with the status that says what is wrong with it."""
    if action_type != REQUEST_COMMITMENT:
        raise Refused(NO_SUCH_ACTION, f"Action Type ID {action_type} (only 1 is defined)")
    if requested_instance != STORAGE_COMMITMENT_INSTANCE:
        raise Refused(INVALID_OBJECT_INSTANCE, "Requested SOP Instance UID is not the "
                      f"well-known {STORAGE_COMMITMENT_INSTANCE}")
    if info is None:
        raise Refused(MISSING_ATTRIBUTE, "no Action Information")
    try:
        transaction = info.get("TransactionUID")
        items = info.get("ReferencedSOPSequence")
        if not transaction or not items:
            raise Refused(MISSING_ATTRIBUTE, "Transaction UID or Referenced SOP Sequence is "
                          "missing or empty")
        refs = tuple((validate_uid(str(item.get("ReferencedSOPClassUID") or ""),
                                   "Referenced SOP Class UID"),
                      validate_uid(str(item.get("ReferencedSOPInstanceUID") or ""),
                                   "Referenced SOP Instance UID"))
                     for item in items)
        return CommitRequest(validate_uid(str(transaction), "Transaction UID"), refs)
    except InvalidUID as exc:
        raise Refused(INVALID_ATTRIBUTE_VALUE, str(exc)) from None
    except Refused:
        raise
    except Exception as exc:  # pydicom decodes lazily: a malformed dataset fails here
        raise Refused(statuses.PROCESSING_FAILURE,
                      f"Action Information unreadable ({type(exc).__name__})") from None


def failure_reason(sop_class: str, indexed_class: str | None) -> int | None:
    """None when the instance is committed, else the Failure Reason to report."""
    if indexed_class is None:
        return NO_SUCH_OBJECT_INSTANCE
    return None if indexed_class == sop_class else CLASS_INSTANCE_CONFLICT


def report(request: CommitRequest, indexed: Mapping[str, str],
           retrieve_aet: str) -> tuple[int, Dataset]:
    """The Event Type ID and Event Information of the N-EVENT-REPORT, ``indexed`` mapping the
    SOP Instance UIDs found in the index to their SOP Class UID."""
    committed, failed = [], []
    for sop_class, sop_instance in request.refs:
        item = Dataset()
        item.ReferencedSOPClassUID = sop_class
        item.ReferencedSOPInstanceUID = sop_instance
        reason = failure_reason(sop_class, indexed.get(sop_instance))
        if reason is None:
            item.RetrieveAETitle = retrieve_aet
            committed.append(item)
        else:
            item.FailureReason = reason
            failed.append(item)
    info = Dataset()
    info.TransactionUID = request.transaction_uid
    info.RetrieveAETitle = retrieve_aet
    if committed:
        info.ReferencedSOPSequence = committed
    if failed:
        info.FailedSOPSequence = failed
    return (FAILURES_EXIST if failed else ALL_COMMITTED), info


@dataclass
class Committer:
    """The N-ACTION handler, and the reports it owes (tasks on the gateway's event loop)."""

    settings: GatewaySettings
    pool: asyncpg.Pool
    bridge: LoopBridge
    ids: Callable[[Any], int]
    may: Callable[[Any, str], bool]

    def __post_init__(self) -> None:
        self._pending: set[concurrent.futures.Future[None]] = set()

    def on_action(self, event: Event) -> tuple[int | Dataset, None]:
        assoc = event.assoc
        calling, host = assoc.requestor.ae_title.strip(), str(assoc.requestor.address)
        who = f"assoc={self.ids(assoc)} {calling}@{host}"
        if not self.may(assoc, "store"):
            return statuses.NOT_AUTHORIZED, None
        try:
            req = cast(N_ACTION, event.request)
            request = parse_request(event.action_type, str(req.RequestedSOPInstanceUID or ""),
                                    _information(event))
            node = self.bridge.run(self._requester(calling), self.settings.find_timeout)
            if node is None:
                raise Refused(statuses.PROCESSING_FAILURE, f"{calling!r} is not a known node "
                              "(MINIPACS_NODES): no address to send the report to")
        except Refused as exc:
            log.warning("%s N-ACTION storage commitment refused -> %s: %s", who,
                        statuses.describe(exc.status), exc)
            return _status(exc.status, str(exc)), None
        except Exception as exc:  # the index did not answer
            log.error("%s N-ACTION storage commitment: node look-up failed: %s", who, exc)
            return _status(statuses.PROCESSING_FAILURE, "node look-up failed"), None
        target = node if node.host != "*" else Node(node.name, node.aet, host, node.port)
        log.info("%s N-ACTION storage commitment of %d instance(s) -> Success; report to %s "
                 "(%s:%d) once indexed", who, len(request.refs), target.aet, target.host,
                 target.port)
        future = self.bridge.start(self._settle(request, target))
        self._pending.add(future)
        future.add_done_callback(self._pending.discard)
        return statuses.SUCCESS, None

    async def _requester(self, aet: str) -> Node | None:
        async with self.pool.acquire() as conn:
            return await node_table.by_aet(conn, aet)

    async def _settle(self, request: CommitRequest, node: Node) -> None:
        indexed = await self._wait_indexed(request)
        event_type, info = report(request, indexed, self.settings.gateway_aet)
        failed = len(info.get("FailedSOPSequence") or [])
        for attempt, pause in enumerate((2.0, 10.0, 30.0, 0.0), start=1):
            try:
                status = await asyncio.to_thread(self._send, node, event_type, info)
            except Exception as exc:
                status, why = None, f"{type(exc).__name__}: {exc}"
            else:
                why = "no status in the answer" if status is None else f"0x{status:04X}"
            if status == statuses.SUCCESS:
                log.info("storage commitment report sent to %s: %d committed, %d failed",
                         node.aet, len(request.refs) - failed, failed)
                return
            log.warning("storage commitment report to %s (%s:%d) not delivered (attempt %d: "
                        "%s)", node.aet, node.host, node.port, attempt, why)
            if pause:
                await asyncio.sleep(pause)
        log.error("storage commitment report to %s given up: the modality keeps its copies "
                  "and may ask again", node.aet)

    async def _wait_indexed(self, request: CommitRequest) -> dict[str, str]:
        """The referenced instances in the index, polled until all are there (with their
        class) or the commit timeout passes."""
        wanted = [uid for _, uid in request.refs]
        deadline = time.monotonic() + self.settings.commit_timeout
        pause = 0.1
        indexed: dict[str, str] = {}
        while True:
            try:
                async with self.pool.acquire() as conn:
                    rows = await conn.fetch(INDEXED, wanted)
                indexed = {r["sop_instance_uid"]: r["sop_class_uid"] for r in rows}
            except (OSError, asyncpg.PostgresError) as exc:  # asked again until the deadline
                log.warning("storage commitment: index not readable (%s)", exc)
            if len(indexed) == len(set(wanted)) or time.monotonic() + pause > deadline:
                return indexed
            await asyncio.sleep(pause)
            pause = min(pause * 2, 2.0)

    def _send(self, node: Node, event_type: int, info: Dataset) -> int | None:
        """One association to the requester, one N-EVENT-REPORT: its status, None if none."""
        s = self.settings
        ae = AE(ae_title=s.gateway_aet)
        ae.acse_timeout, ae.dimse_timeout, ae.network_timeout = (
            s.acse_timeout, s.dimse_timeout, s.network_timeout)
        ae.add_requested_context(STORAGE_COMMITMENT)
        # we send the report as the SCP of the class, on an association we request
        role = build_role(STORAGE_COMMITMENT, scu_role=False, scp_role=True)
        assoc = ae.associate(node.host, node.port, ae_title=node.aet, ext_neg=[role])
        if not assoc.is_established:
            raise ConnectionError("association rejected or not answered")
        try:
            answer, _ = assoc.send_n_event_report(info, event_type, STORAGE_COMMITMENT,
                                                  STORAGE_COMMITMENT_INSTANCE)
        finally:
            assoc.release()
        return int(answer.Status) if answer and "Status" in answer else None

    def close(self) -> None:
        """Stop waiting: the reports not sent yet are dropped (see the module's docstring)."""
        for future in list(self._pending):
            future.cancel()


def _information(event: Event) -> Dataset | None:
    try:
        return event.action_information
    except Exception:
        return None


def _status(status: int, comment: str) -> Dataset:
    ds = Dataset()
    ds.Status = status
    ds.ErrorComment = comment[:64]  # LO
    return ds
