"""C-MOVE and C-GET on the gateway, owned by us instead of pynetdicom.

pynetdicom's own C-MOVE SCP opens the association to the destination and performs the
C-STORE sub-operations itself. Here it does neither: ``install`` makes pynetdicom use
``RetrieveServiceClass`` for the C-MOVE / C-GET information models, which only relays the
responses that our handlers yield.

- C-MOVE (``Retriever.on_move``): the destination must be a node in ``remote_node`` (else
  0xA801, no connection attempted). The job goes to the mover (``move.requested``); its
  ``move.progress`` messages become pending responses with Remaining / Completed / Failed /
  Warning, then the final status. No mover in ``move_start_timeout``, or silence for
  ``move_idle_timeout``: 0xA702, not a hang. C-CANCEL: the job is cancelled, 0xFE00.
- C-GET (``Retriever.on_get``): the instances go back on the same association, sent as stored
  (SOP class, transfer syntax, dataset bytes). S3 GETs run ahead in a few threads
  (``shared.prefetch``); while the sub-operations run, this thread owns the socket
  (``SocketTakeover``): hand-encoded C-STORE requests and pending responses, the C-STORE
  responses and a C-CANCEL read here, without pynetdicom's polling threads in between.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import queue
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from io import BytesIO
from pathlib import Path
from typing import Any, NoReturn

import asyncpg
from aio_pika.abc import AbstractIncomingMessage, AbstractQueue, AbstractRobustConnection
from minio import Minio
from pydicom.dataset import Dataset
from pynetdicom import AE, AllStoragePresentationContexts, evt
from pynetdicom import association as _association
from pynetdicom.dimse_primitives import C_GET, C_MOVE
from pynetdicom.dsutils import encode
from pynetdicom.dul import DULServiceProvider
from pynetdicom.events import Event
from pynetdicom.presentation import PresentationContext
from pynetdicom.service_class import QueryRetrieveServiceClass

from services.gateway import reactor, statuses
from services.gateway.bridge import LoopBridge
from shared import dimse_wire as wire
from shared import nodes, s3, topology
from shared.broker import Publisher
from shared.cache import hot_cache
from shared.dicom import CannotConvert, alternatives, convert
from shared.logs import TRACE
from shared.messages import BadMessage, MoveCancel, MoveProgress, MoveRequested
from shared.prefetch import Fetched, Prefetcher, fetcher
from shared.query import (
    PATIENT_ROOT,
    STUDY_ROOT,
    InstanceRef,
    QueryError,
    build_instances,
    find_instances,
)
from shared.query import query_level as _query_level
from shared.s3http import RawS3
from shared.scratch import Scratch, sweep_and_say, sweep_forever
from shared.settings import GatewaySettings, Node
from shared.suboperations import Tally, classify

log = logging.getLogger("minipacs.gateway")

MOVE_MODELS = {
    "1.2.840.10008.5.1.4.1.2.1.2": PATIENT_ROOT,   # Patient Root Q/R - MOVE
    "1.2.840.10008.5.1.4.1.2.2.2": STUDY_ROOT,     # Study Root Q/R - MOVE
}
GET_MODELS = {
    "1.2.840.10008.5.1.4.1.2.1.3": PATIENT_ROOT,   # Patient Root Q/R - GET
    "1.2.840.10008.5.1.4.1.2.2.3": STUDY_ROOT,     # Study Root Q/R - GET
}


# ---- responses (pure) ------------------------------------------------------------------------

@dataclass(frozen=True)
class Response:
    """One C-MOVE / C-GET response. ``remaining`` only in pending and cancel responses;
    ``failed_uids`` (Failed SOP Instance UID List) only with warning, failure or cancel."""

    status: int
    remaining: int | None = None
    completed: int | None = None
    failed: int | None = None
    warning: int | None = None
    failed_uids: tuple[str, ...] | None = None
    comment: str = ""

    @property
    def final(self) -> bool:
        return self.status != statuses.PENDING


def pending(remaining: int, completed: int, failed: int, warning: int) -> Response:
    return Response(statuses.PENDING, remaining, completed, failed, warning)


def final_response(state: str, remaining: int, completed: int, failed: int, warning: int,
                   failed_uids: list[str] | tuple[str, ...], error: str = "") -> Response:
    """The last response of a retrieve from its outcome (PS3.4 C.4.2.1.4, C.4.3.1.4)."""
    uids = tuple(failed_uids)
    if state == "canceled":
        return Response(statuses.CANCEL, remaining, completed, failed, warning, uids, error)
    if state == "expired":
        return Response(statuses.SUBOPERATIONS_UNABLE, None, 0, 0, 0, None, error)
    if state == "done" and not failed and not warning and not remaining:
        return Response(statuses.SUCCESS, None, completed, 0, 0)
    if not completed and not warning:  # nothing arrived: a failure, not a warning
        return Response(statuses.SUBOPERATIONS_UNABLE, None, 0, failed + remaining, 0, uids,
                        error)
    return Response(statuses.SUBOPERATIONS_WARNING, None, completed, failed + remaining, warning,
                    uids, error)


RECORDED_FAILURES = "SELECT failed_uids FROM move_job WHERE id = $1::uuid"


def identifier_status(exc: QueryError) -> int:
    return (statuses.IDENTIFIER_DOES_NOT_MATCH if exc.kind == "identifier"
            else statuses.UNABLE_TO_PROCESS)


def read_identifier(identifier: Dataset, model: str) -> str:
    """The level of a retrieve identifier, checked as far as it can be without the index
    (raises ``QueryError``)."""
    level = _query_level(identifier, model)
    build_instances(level, identifier)
    return level


# ---- the service class pynetdicom runs for the C-MOVE / C-GET contexts ------------------------

class RetrieveServiceClass(QueryRetrieveServiceClass):  # type: ignore[misc]
    """Sends what the bound EVT_C_MOVE / EVT_C_GET handler yields: ``Response`` values, the
    last one final. No sub-operation logic here."""

    def _move_scp(self, req: C_MOVE, context: PresentationContext) -> None:
        self._relay(req, context, C_MOVE, evt.EVT_C_MOVE)

    def _get_scp(self, req: C_GET, context: PresentationContext) -> None:
        self._relay(req, context, C_GET, evt.EVT_C_GET)

    def _relay(self, req: Any, context: PresentationContext, kind: Any, event: Any) -> None:
        cx_id = int(context.context_id or 0)
        syntax = context.transfer_syntax[0]
        try:
            responses = evt.trigger(self.assoc, event, {
                "request": req, "context": context.as_tuple, "_is_cancelled": self.is_cancelled})
            for response in responses or ():
                if not self.assoc.is_established or reactor.connection_lost(self.assoc):
                    return
                taken = SocketTakeover.of(self.assoc)
                if taken is not None and kind is C_GET and not response.final:
                    taken.send_pending(cx_id, req, response)
                    continue
                self.dimse.send_msg(_primitive(kind, req, response, syntax), cx_id)
                if response.final:
                    return
        except Exception:
            log.exception("retrieve handler failed")
            if self.assoc.is_established:
                failure = Response(statuses.UNABLE_TO_PROCESS)
                self.dimse.send_msg(_primitive(kind, req, failure, syntax), cx_id)


def _primitive(kind: Any, req: Any, r: Response, syntax: Any) -> Any:
    rsp = kind()
    rsp.MessageIDBeingRespondedTo = req.MessageID
    rsp.AffectedSOPClassUID = req.AffectedSOPClassUID
    rsp.Status = r.status
    rsp.NumberOfRemainingSuboperations = r.remaining
    rsp.NumberOfCompletedSuboperations = r.completed
    rsp.NumberOfFailedSuboperations = r.failed
    rsp.NumberOfWarningSuboperations = r.warning
    if r.comment and r.final and r.status not in (statuses.SUCCESS, statuses.CANCEL):
        rsp.ErrorComment = r.comment[:64]
    if r.failed_uids is not None and r.status != statuses.SUCCESS:
        ds = Dataset()
        ds.FailedSOPInstanceUIDList = list(r.failed_uids)
        raw = encode(ds, syntax.is_implicit_VR, syntax.is_little_endian, syntax.is_deflated)
        rsp.Identifier = BytesIO(raw or b"")
    return rsp


_original_lookup = _association.uid_to_service_class  # type: ignore[attr-defined]


def _service_class_for(uid: str) -> Any:
    if uid in MOVE_MODELS or uid in GET_MODELS:
        return RetrieveServiceClass
    return _original_lookup(uid)


def install(ae: AE) -> None:
    """Serve C-MOVE / C-GET with ``RetrieveServiceClass`` (process-wide: the gateway is the one
    AE here) and add their contexts, with the SCP role for storage so C-GET can send back.
    pynetdicom's DUL reads sockets through ``_transport_event`` (for ``SocketTakeover``)."""
    _association.uid_to_service_class = _service_class_for  # type: ignore[attr-defined]
    DULServiceProvider._is_transport_event = _transport_event  # type: ignore[method-assign]
    for uid in (*MOVE_MODELS, *GET_MODELS):
        ae.add_supported_context(uid)
    for cx in AllStoragePresentationContexts:
        if cx.abstract_syntax is not None:
            ae.add_supported_context(cx.abstract_syntax, [], scu_role=False, scp_role=True)


# ---- the C-GET association's socket, taken over from pynetdicom during the sub-operations -----

_LOCK = "_minipacs_socket_lock"
_TAKEN = reactor.SOCKET_TAKEN
_original_transport_event = DULServiceProvider._is_transport_event


def _transport_event(self: DULServiceProvider) -> bool:
    """pynetdicom's DUL checking its socket for incoming PDUs, unless a ``SocketTakeover``
    holds it. The lock makes taking over wait for a PDU the DUL is reading."""
    lock = self.__dict__.setdefault(_LOCK, threading.Lock())
    with lock:
        if self.__dict__.get(_TAKEN) is not None:
            return False
        return bool(_original_transport_event(self))


class SocketTakeover:
    """While a C-GET sends its sub-operations the handler's thread owns the association's
    socket: pynetdicom's DUL thread stops reading it, and nothing else writes to it (the
    association's own thread is the one running the handler). C-STORE requests and pending
    C-GET responses are written here, C-STORE responses and a C-CANCEL of the C-GET read here.
    Any other PDU (A-ABORT, A-RELEASE-RQ, another request) is handed back to pynetdicom."""

    def __init__(self, assoc: Any, get_msg_id: int, timeout: float) -> None:
        self.assoc = assoc
        self.dul = assoc.dul
        self.sock: socket.socket = assoc.dul.socket.socket
        self.max_pdu = int(assoc.dimse.maximum_pdu_size or 0)
        self.our_max_pdu = int(getattr(assoc.acceptor, "maximum_length", 0) or 0)
        self.get_msg_id = get_msg_id
        self.timeout = timeout
        self.cancelled = False
        self.lost = False
        self._saved_timeout: float | None = None

    @staticmethod
    def of(assoc: Any) -> SocketTakeover | None:
        taken = assoc.dul.__dict__.get(_TAKEN)
        return taken if isinstance(taken, SocketTakeover) else None

    def __enter__(self) -> SocketTakeover:
        with self.dul.__dict__.setdefault(_LOCK, threading.Lock()):
            self.dul.__dict__[_TAKEN] = self
        self._saved_timeout = self.sock.gettimeout()
        self.sock.settimeout(self.timeout)
        return self

    def __exit__(self, *exc: object) -> None:
        if not self.lost:
            self.sock.settimeout(self._saved_timeout)
        self.dul.__dict__[_TAKEN] = None
        reactor.wake_dul(self.assoc)

    def send_pending(self, cx_id: int, req: Any, r: Response) -> None:
        command = wire.c_get_pending(int(req.MessageID), str(req.AffectedSOPClassUID),
                                     r.status, r.remaining or 0, r.completed or 0,
                                     r.failed or 0, r.warning or 0)
        self._send(cx_id, command, None)

    def store(self, cx_id: int, msg_id: int, ref: InstanceRef, blob: wire.Dataset) -> int:
        """One C-STORE sub-operation: its response status (raises ``OSError`` when the
        association is gone or the SCU answered something else)."""
        command = wire.c_store_rq(msg_id, ref.sop_class_uid, ref.sop_instance_uid)
        if log.isEnabledFor(TRACE):
            log.log(TRACE, "C-STORE-RQ msg=%d cx=%d %s (%d bytes)", msg_id, cx_id,
                    ref.sop_instance_uid, blob.length)
        source = _Reading(blob)
        try:
            self._send(cx_id, command, source)
        except Unreadable:
            if source.started:  # the request is out, its dataset cut short: nothing to save
                self.lost = True
                self.dul.event_queue.put("Evt19")  # pynetdicom aborts once it has the socket
                raise OSError("a dataset became unreadable while it was being sent: "
                              "aborting") from None
            raise  # nothing was sent: that sub-operation failed, the association goes on
        status = self._response(msg_id)
        log.log(TRACE, "C-STORE-RSP msg=%d status=0x%04X", msg_id, status)
        return status

    def _send(self, cx_id: int, command: bytes, dataset: wire.Dataset | None) -> None:
        try:
            wire.send_message(self.sock, cx_id, command, dataset, self.max_pdu)
        except OSError:
            self.lost = True
            raise

    def _response(self, msg_id: int) -> int:
        command = bytearray()
        held: list[bytearray] = []  # the PDUs of a message that is not ours, to hand back
        handed = 0  # dataset bytes handed to pynetdicom, which holds them until their last
        try:
            while True:
                kind, pdu = wire.read_pdu(self.sock, self.our_max_pdu)
                self.dul._idle_timer.restart()
                if kind != wire.P_DATA_TF:
                    self._hand_back([pdu])
                    raise wire.WireError(f"the SCU sent PDU type 0x{kind:02X} during C-GET")
                fragments = list(wire.pdvs(pdu))
                if any(not control & 0x01 for _, control, _ in fragments):
                    handed += len(pdu)
                    if handed > wire.MESSAGE_MAX:
                        self._abort(f"more than {wire.MESSAGE_MAX} bytes of a dataset")
                    self._hand_back([pdu])  # a dataset: not ours
                    continue
                held.append(pdu)
                for _cx, control, fragment in fragments:
                    command += fragment
                    if len(command) > wire.COMMAND_MAX:
                        self._abort(f"a command set of more than {wire.COMMAND_MAX} bytes")
                    if not control & 0x02:
                        continue
                    fields = wire.parse_command(command)
                    field = wire.us_value(fields, 0x0100)
                    status = wire.us_value(fields, 0x0900)
                    if (field == wire.C_STORE_RSP and wire.us_value(fields, 0x0120) == msg_id
                            and status is not None):
                        return status
                    if (field == wire.C_CANCEL_RQ
                            and wire.us_value(fields, 0x0120) == self.get_msg_id):
                        self.cancelled = True
                    else:
                        self._hand_back(held)
                    command, held = bytearray(), []
        except OSError:
            self.lost = True
            raise

    def _abort(self, what: str) -> NoReturn:
        """The SCU sent more than we hold for one message: pynetdicom aborts the association
        (Evt19, as for an invalid PDU) once the socket is its own again."""
        self.dul.event_queue.put("Evt19")
        raise wire.WireError(f"the SCU sent {what} during C-GET: aborting")

    def _hand_back(self, pdus: list[bytearray]) -> None:
        for raw in pdus:
            try:
                pdu, event = self.dul._decode_pdu(raw)
            except Exception:  # undecodable: pynetdicom would abort too
                self.dul.event_queue.put("Evt19")
                continue
            self.dul.event_queue.put(event)
            self.dul._recv_pdu.put(pdu)


class Unreadable(Exception):
    """A C-GET sub-operation's dataset could not be read (not an ``OSError``: those mean the
    association is gone)."""


class _Reading:
    """The dataset of a sub-operation as ``wire.send_message`` reads it, its read errors told
    apart from the socket's. ``started``: a block was handed out, so the C-STORE request went
    out with it."""

    def __init__(self, blob: wire.Dataset) -> None:
        self.blob = blob
        self.length = blob.length
        self.started = False

    def blocks(self, size: int) -> Iterator[memoryview]:
        blocks = self.blob.blocks(size)
        while True:
            try:
                block = next(blocks)
            except StopIteration:
                return
            except OSError as exc:
                raise Unreadable(f"{type(exc).__name__}: {exc}") from exc
            self.started = True
            yield block


# ---- progress from the movers -------------------------------------------------------------------

class ProgressBoard:
    """Routes ``move.progress`` messages (every mover's, to every gateway) to the association
    thread waiting for that job; others' jobs are ignored."""

    def __init__(self) -> None:
        self._inboxes: dict[str, queue.SimpleQueue[MoveProgress]] = {}
        self._lock = threading.Lock()

    def open(self, job_id: str) -> queue.SimpleQueue[MoveProgress]:
        inbox: queue.SimpleQueue[MoveProgress] = queue.SimpleQueue()
        with self._lock:
            self._inboxes[job_id] = inbox
        return inbox

    def close(self, job_id: str) -> None:
        with self._lock:
            self._inboxes.pop(job_id, None)

    def deliver(self, progress: MoveProgress) -> None:
        with self._lock:
            inbox = self._inboxes.get(progress.job_id)
        if inbox is not None:
            inbox.put(progress)

    async def on_message(self, message: AbstractIncomingMessage) -> None:
        try:
            self.deliver(MoveProgress.from_bytes(message.body))
        except BadMessage as exc:
            log.warning("ignoring unreadable move progress: %s", exc)


# ---- the handlers ------------------------------------------------------------------------------

@dataclass
class Retriever:
    settings: GatewaySettings
    bridge: LoopBridge
    publisher: Publisher
    pool: asyncpg.Pool
    s3: Minio
    board: ProgressBoard
    ids: Callable[[Any], int]
    tmpdir: Path
    may: Callable[[Any, str], bool] = lambda _assoc, _op: True  # per-node permission
    prefetch_threads: int = 3
    prefetch_depth: int = 6

    def __post_init__(self) -> None:
        self.fetch = fetcher(self.s3, self.settings.s3_bucket, self.tmpdir,
                             RawS3.from_settings(self.settings),
                             cache=hot_cache(self.settings.spool_dir, self.settings.cache_mb))

    def handlers(self) -> list[Any]:
        return [(evt.EVT_C_MOVE, self.on_move), (evt.EVT_C_GET, self.on_get)]

    def _db(self, coro: Any) -> Any:
        return self.bridge.run(coro, self.settings.dimse_timeout)

    async def _node(self, aet: str) -> Node | None:
        async with self.pool.acquire() as conn:
            return await nodes.by_aet(conn, aet)

    async def _recorded_failures(self, job_id: str) -> tuple[str, ...]:
        async with self.pool.acquire() as conn:
            uids = await conn.fetchval(RECORDED_FAILURES, job_id)
        return tuple(uids or ())

    def _failed_so_far(self, job_id: str, who: str) -> tuple[str, ...]:
        """The UIDs the mover recorded as failed in the job's row (it writes them with the
        counts): the Failed SOP Instance UID List of an answer given without the mover."""
        try:
            return tuple(self._db(self._recorded_failures(job_id)))
        except Exception as exc:
            log.warning("%s job=%s: failed UIDs not read from the job row: %s", who,
                        job_id[:8], exc)
            return ()

    def _publish(self, message: Any) -> bool:
        try:
            self.bridge.run(self.publisher.publish(message), self.settings.confirm_timeout + 1)
        except Exception as exc:
            log.warning("%s not published: %s", type(message).__name__, exc)
            return False
        return True

    def _read(self, event: Event, models: dict[str, str]) -> tuple[str, Dataset]:
        identifier = event.identifier
        return read_identifier(identifier, models[event.context.abstract_syntax]), identifier

    def on_move(self, event: Event) -> Iterator[Response]:
        req: Any = event.request
        assoc = event.assoc
        who = f"assoc={self.ids(assoc)} msg={req.MessageID}"
        if not self.may(assoc, "move"):
            yield Response(statuses.NOT_AUTHORIZED, comment="this node may not C-MOVE")
            return
        try:
            level, identifier = self._read(event, MOVE_MODELS)
            body = identifier.to_json_dict()
        except QueryError as exc:
            log.warning("%s C-MOVE identifier refused: %s", who, exc.reason)
            yield Response(identifier_status(exc), comment=exc.reason)
            return
        except Exception as exc:
            log.warning("%s C-MOVE identifier unreadable: %s", who, exc)
            yield Response(statuses.IDENTIFIER_DOES_NOT_MATCH, comment="unreadable identifier")
            return
        destination = str(req.MoveDestination or "").strip()
        node = self._db(self._node(destination))
        if node is None:
            log.warning("%s C-MOVE %s to unknown destination %r -> 0xA801", who, level,
                        destination)
            yield Response(statuses.MOVE_DESTINATION_UNKNOWN,
                           comment="move destination unknown")
            return
        timeout = self.settings.move_start_timeout
        job = MoveRequested(
            job_id=str(uuid.uuid4()), level=level, identifier=body, destination=node.name,
            requested_by_aet=assoc.requestor.ae_title.strip(),
            requested_by_host=str(assoc.requestor.address),
            move_originator_message_id=int(req.MessageID),
            requested_at=datetime.now(UTC).isoformat(), start_by=time.time() + timeout)
        inbox = self.board.open(job.job_id)
        try:
            if not self._publish(job):
                yield Response(statuses.SUBOPERATIONS_UNABLE, comment="could not queue the job")
                return
            log.info("%s C-MOVE %s to %s (%s@%s:%d): job=%s", who, level, destination,
                     node.name, node.host, node.port, job.job_id[:8])
            yield from self._relay(event, job.job_id, inbox, who)
        finally:
            self.board.close(job.job_id)

    def _relay(self, event: Event, job_id: str, inbox: queue.SimpleQueue[MoveProgress],
               who: str) -> Iterator[Response]:
        s = self.settings
        deadline = time.monotonic() + s.move_start_timeout + 1.0
        why = f"no mover took the job within {s.move_start_timeout:g}s"
        cancelling = False
        last: tuple[int, int, int, int] | None = None
        while True:
            if not cancelling and event.is_cancelled:
                log.info("%s C-CANCEL: cancelling job=%s", who, job_id[:8])
                cancelling = True
                self._publish(MoveCancel(job_id))
                deadline = time.monotonic() + 10.0
                why = "the mover did not confirm the cancel"
            if not event.assoc.is_established or reactor.connection_lost(event.assoc):
                log.info("%s job=%s: the association is gone: cancelling", who, job_id[:8])
                self._publish(MoveCancel(job_id))
                return
            try:
                progress = inbox.get(timeout=0.05)
            except queue.Empty:
                if time.monotonic() < deadline:
                    continue
                self._publish(MoveCancel(job_id))
                log.warning("%s job=%s: %s", who, job_id[:8], why)
                if cancelling and last is not None:
                    yield Response(statuses.CANCEL, *last, failed_uids=())
                elif last is not None:  # what was not reported done counts as failed
                    yield final_response("failed", *last, self._failed_so_far(job_id, who),
                                         error=why)
                else:
                    yield Response(statuses.SUBOPERATIONS_UNABLE, comment=why)
                return
            if not cancelling:  # a cancel has its own, fixed deadline
                deadline = time.monotonic() + s.move_idle_timeout
                why = f"no progress from the mover for {s.move_idle_timeout:g}s"
            p = progress
            if p.final:
                r = final_response(p.state, p.remaining, p.completed, p.failed, p.warning,
                                   p.failed_uids, p.error)
                log.info("%s C-MOVE job=%s %s -> %s: %d completed, %d failed, %d warning%s",
                         who, job_id[:8], p.state, statuses.describe(r.status), p.completed,
                         p.failed, p.warning, f" ({p.error})" if p.error else "")
                yield r
                return
            # every running message, even a keep-alive with the same counts: SCUs with a DIMSE
            # timeout (pynetdicom's 30 s) must hear from us while a large instance travels
            last = (p.remaining, p.completed, p.failed, p.warning)
            yield pending(*last)

    # -- C-GET ---------------------------------------------------------------------------------
    def on_get(self, event: Event) -> Iterator[Response]:
        req: Any = event.request
        assoc = event.assoc
        who = f"assoc={self.ids(assoc)} msg={req.MessageID}"
        if not self.may(assoc, "get"):
            yield Response(statuses.NOT_AUTHORIZED, comment="this node may not C-GET")
            return
        try:
            level, identifier = self._read(event, GET_MODELS)
            refs = self._db(find_instances(self.pool, level, identifier))
        except QueryError as exc:
            log.warning("%s C-GET identifier refused: %s", who, exc.reason)
            yield Response(identifier_status(exc), comment=exc.reason)
            return
        started = time.perf_counter()
        counts = Tally(len(refs))
        cancelled = threading.Event()
        log.info("%s C-GET %s: %d instances", who, level, len(refs))
        with (SocketTakeover(assoc, int(req.MessageID), self.settings.dimse_timeout) as taken,
              Prefetcher(refs, self.fetch, self.prefetch_threads,
                         self.prefetch_depth) as work):
            yield from self._sub_operations(event, taken, work, counts, cancelled, who)
        if taken.lost:
            log.warning("%s C-GET: association lost after %d of %d", who,
                        len(refs) - counts.remaining, len(refs))
            return
        if cancelled.is_set():
            log.info("%s C-CANCEL after %d of %d", who, len(refs) - counts.remaining, len(refs))
            yield final_response("canceled", *counts.snapshot())
            return
        r = final_response("done", *counts.snapshot())
        seconds = time.perf_counter() - started
        log.info("%s C-GET -> %s: %d completed, %d failed, %d warning in %.2fs", who,
                 statuses.describe(r.status), counts.completed, counts.failed, counts.warning,
                 seconds)
        yield r

    def _sub_operations(self, event: Event, taken: SocketTakeover,
                        work: Prefetcher[InstanceRef], counts: Tally,
                        cancelled: threading.Event, who: str) -> Iterator[Response]:
        """The C-STORE sub-operations, a pending response after each but the last."""
        contexts: dict[tuple[str, str], tuple[int, str] | None] = {}
        req: Any = event.request
        msg_id = int(req.MessageID)
        while (item := work.next()) is not None:
            if event.is_cancelled or taken.cancelled:
                cancelled.set()
                if item.blob is not None:
                    item.blob.close()
                return
            msg_id = msg_id % 65535 + 1
            try:
                status = self._store(event.assoc, taken, contexts, item, msg_id, who)
            except Unreadable as exc:  # nothing was sent: this one failed, the rest go on
                log.warning("%s C-GET sub-operation failed: not read: %s", who, exc)
                status = None
            except OSError as exc:  # the association is gone: no more responses
                log.warning("%s C-GET sub-operation failed: %s: %s", who,
                            type(exc).__name__, exc)
                return
            finally:
                if item.blob is not None:
                    item.blob.close()
            counts.record(item.ref.sop_instance_uid, classify(status))
            if counts.remaining:
                yield pending(*counts.snapshot()[:4])

    def _store(self, assoc: Any, taken: SocketTakeover,
               contexts: dict[tuple[str, str], tuple[int, str] | None], item: Fetched[InstanceRef],
               msg_id: int, who: str) -> int | None:
        ref = item.ref
        if item.blob is None:
            log.warning("%s C-GET sub-operation failed: not read from S3: %s: %s", who,
                        type(item.error).__name__, item.error)
            return None
        pair = (ref.sop_class_uid, ref.transfer_syntax)
        if pair not in contexts:
            contexts[pair] = _context_for(assoc, *pair)
        found = contexts[pair]
        if found is None:
            log.warning("%s C-GET sub-operation failed: no accepted context with the SCP role "
                        "for %s in %s", who, *pair)
            return None
        cx_id, syntax = found
        blob: wire.Dataset = item.blob
        if syntax != ref.transfer_syntax:  # the SCU does not take the stored syntax
            try:
                blob = convert(item.blob, ref.transfer_syntax, syntax)
            except CannotConvert as exc:
                log.warning("%s C-GET sub-operation failed: %s", who, exc)
                return None
            except OSError as exc:  # the stored bytes could not be read: nothing was sent
                raise Unreadable(f"{type(exc).__name__}: {exc}") from exc
        return taken.store(cx_id, msg_id, ref, blob)


def _context_for(assoc: Any, sop_class: str, syntax: str) -> tuple[int, str] | None:
    """The accepted context (SCP role for the SCU) to send an instance stored in ``syntax``:
    (context ID, the transfer syntax to send it in), that one or the first the SCU takes of
    those it converts to (``shared.dicom.alternatives``); None if there is none."""
    # our own look-up: pynetdicom's (``_get_valid_context``) logs an ERROR for every syntax the
    # SCU did not accept, also when an alternative then serves the instance
    ours = {(str(cx.abstract_syntax), str(cx.transfer_syntax[0])): int(cx.context_id)
            for cx in assoc.accepted_contexts if cx.as_scu is True and cx.transfer_syntax}
    for candidate in (syntax, *alternatives(syntax)):
        if (sop_class, candidate) in ours:
            return ours[(sop_class, candidate)], candidate
    return None


# ---- wiring ----------------------------------------------------------------------------------

LEFT_BY_GATEWAYS = "C-GET temp files left by gateways that ended mid-C-GET"


@dataclass
class RetrieveResources:
    retriever: Retriever
    listener: AbstractQueue
    tag: str
    scratch: Scratch
    sweeper: asyncio.Task[None]

    async def close(self) -> None:
        self.sweeper.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self.sweeper
        await self.listener.cancel(self.tag)
        self.scratch.close()  # after the associations: no C-GET uses its files any more


async def open_retrieve(settings: GatewaySettings, pool: asyncpg.Pool,
                        connection: AbstractRobustConnection, publisher: Publisher,
                        bridge: LoopBridge, ids: Callable[[Any], int]) -> RetrieveResources:
    """Everything C-MOVE / C-GET need: S3, a listener for move progress (the nodes are read
    from the index at each C-MOVE), and this process's folder for C-GET temp files, after
    removing those of gateways that ended without removing theirs (``shared.scratch``)."""
    root = Path(settings.spool_dir) / "retrieve"
    await asyncio.to_thread(sweep_and_say, root, LEFT_BY_GATEWAYS)
    scratch = Scratch(root).open()
    board = ProgressBoard()
    channel = await connection.channel()
    listener = await topology.declare_listener(channel, topology.MOVE_PROGRESS)
    tag = await listener.consume(board.on_message, no_ack=True)
    retriever = Retriever(settings, bridge, publisher, pool, s3.client(settings), board, ids,
                          scratch.path)
    sweeper = asyncio.create_task(sweep_forever(root, LEFT_BY_GATEWAYS))
    return RetrieveResources(retriever, listener, tag, scratch, sweeper)
