"""C-STORE requests read straight off the socket by each association's DUL thread.

For every P-DATA-TF PDU pynetdicom builds PDU and PDV objects, runs its state machine, passes
the fragments through two queues to the association's thread (``reactor.py`` makes that
thread wait instead of polling), decodes the command set through pydicom and converts it to a
primitive with validated UIDs, then dispatches an event. For a C-STORE request, the bulk of
what a PACS receives, that was most of the gateway's CPU per small instance. Here the DUL
thread reads the PDU itself:

- a C-STORE-RQ with a dataset, on an accepted context of its SOP class: the dataset streams
  into a spool file behind a File Meta group (as pynetdicom would write it), then the same
  handler the pynetdicom path calls decides the status, and the hand-encoded C-STORE-RSP is
  sent from this thread;
- anything else (other DIMSE messages, release, abort, association PDUs): handed to pynetdicom
  exactly as its own reader would have (``_decode_pdu``, event queue, PDU queue).

Ownership is decided per DIMSE message, by its command. Disabled while pynetdicom's DIMSE
logging is on (TRACE), so the dumps show every message. Memory is bounded by the PDU size.
"""

from __future__ import annotations

import contextlib
import logging
import os
import struct
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, cast

from pynetdicom.dul import DULServiceProvider

from services.gateway.announce import on_the_way
from services.gateway.fastpath import file_meta, store_response
from services.gateway.statuses import OUT_OF_RESOURCES
from shared import dimse_wire as wire

log = logging.getLogger("minipacs.gateway")

P_DATA_TF = wire.P_DATA_TF
NO_DATASET = wire.NO_DATASET

# (assoc, sop_class, sop_instance, message_id, transfer_syntax, path, context's abstract
# syntax) -> DIMSE status
StoreHandler = Callable[[Any, str, str, int, str, Path, str], int]


@dataclass
class _Store:
    """A C-STORE request being received by this module."""

    context_id: int
    sop_class: str
    sop_instance: str
    message_id: int
    transfer_syntax: str
    path: Path
    file: IO[bytes] | None  # None after a write failed: the rest is read and dropped
    context_class: str = ""  # the context's abstract syntax: the handler checks the command's
    error: str = ""


@dataclass
class _State:
    """Per association: who owns the DIMSE message in progress, and its command so far."""

    owner: str | _Store | None = None  # None between messages, "pynetdicom", or ours
    command: bytearray = field(default_factory=bytearray)


_handler: StoreHandler | None = None
_original_read = DULServiceProvider._read_pdu_data


def install(handler: StoreHandler) -> None:
    global _handler
    _handler = handler
    DULServiceProvider._read_pdu_data = _read_pdu_data  # type: ignore[method-assign]


def _enabled() -> bool:
    return _handler is not None and not logging.getLogger("pynetdicom").isEnabledFor(
        logging.DEBUG)


def _read_pdu_data(self: DULServiceProvider) -> None:
    if not _enabled() or self.state_machine.current_state != "Sta6":
        _read_within_artim(self)
        return
    sock = cast(Any, self.socket)
    try:
        head = sock.recv(6)
        pdu_type, _, length = struct.unpack(">BBL", head)
    except (OSError, TimeoutError, struct.error):
        _drop_partial(self)
        self.event_queue.put("Evt17")
        return
    limit = _limit(self, pdu_type)
    if limit and length > limit:  # refused before reading (or allocating) it: abort
        log.warning("assoc %s: PDU type 0x%02X of %d bytes, over the %d negotiated: aborting",
                    _who(self), pdu_type, length, limit)
        _drop_partial(self)
        self.event_queue.put("Evt19")  # pynetdicom answers an invalid PDU with A-ABORT
        return
    try:
        body = sock.recv(length) if length else b""
    except (OSError, TimeoutError):
        _drop_partial(self)
        self.event_queue.put("Evt17")
        return
    if len(body) != length:
        _drop_partial(self)
        self.event_queue.put("Evt17")
        return
    if pdu_type != P_DATA_TF:  # release, abort...: a C-STORE half received is dropped
        _drop_partial(self)
        _to_pynetdicom(self, bytes(head) + bytes(body))
        return
    try:
        items = list(wire.pdvs(body, start=0))
    except wire.WireError as exc:  # a PDU we cannot frame: let pynetdicom judge it (Evt19 / abort)
        log.warning("assoc %s: malformed P-DATA-TF (%s)", _who(self), exc)
        _to_pynetdicom(self, bytes(head) + bytes(body))
        return
    try:
        _p_data(self, items)
    except ProtocolError as exc:
        log.warning("assoc %s: %s: aborting", _who(self), exc)
        _drop_partial(self)
        self.event_queue.put("Evt19")  # pynetdicom answers an invalid PDU with A-ABORT


# States where a connection has no association yet (Sta1: the first read, before pynetdicom
# handles the connection event; Sta2: awaiting the A-ASSOCIATE-RQ) or awaits its close after
# an A-ABORT (Sta13). The ARTIM timer (the ACSE timeout) bounds them.
_ARTIM_STATES = frozenset({"Sta1", "Sta2", "Sta13"})


def _read_within_artim(dul: DULServiceProvider) -> None:
    """pynetdicom's reader, its socket reads ending with the ARTIM timer where that runs.

    pynetdicom checks ARTIM between PDUs only: a PDU that stops half-way (a truncated
    A-ASSOCIATE-RQ, the body of an unknown PDU type it reads as the next header) held the
    connection for the network timeout (60 s), past any SCU's patience. A read cut short
    ends the connection as a closed one would (Evt17)."""
    raw = getattr(dul.socket, "socket", None)
    if raw is None or dul.state_machine.current_state not in _ARTIM_STATES:
        _original_read(dul)
        return
    timer = dul.artim_timer
    if timer.timeout is None:  # no ACSE timeout configured
        _original_read(dul)
        return
    running = timer._start_time is not None and timer._end_time is None
    bound = timer.remaining if running else timer.timeout
    before = raw.gettimeout()
    raw.settimeout(max(bound, 0.001))
    try:
        _original_read(dul)
    finally:
        with contextlib.suppress(OSError):  # closed meanwhile
            raw.settimeout(before)


# Longest PDU other than P-DATA-TF we accept once associated (A-RELEASE / A-ABORT are 10 bytes)
OTHER_PDU_MAX = 64 * 1024


def _limit(dul: DULServiceProvider, pdu_type: int) -> int:
    """The largest PDU of ``pdu_type`` this association may send us (0: no limit): P-DATA-TF up
    to the maximum length we offered (its variable field), anything else small."""
    if pdu_type != P_DATA_TF:
        return OTHER_PDU_MAX
    return int(getattr(dul.assoc.acceptor, "maximum_length", 0) or 0)


def _drop_partial(dul: DULServiceProvider) -> None:
    """The connection ended (or was released / aborted) inside a C-STORE we were receiving:
    its spool file goes, nothing was acknowledged."""
    state: _State | None = dul.__dict__.get("_minipacs_receive")
    if state is None or not isinstance(state.owner, _Store):
        return
    store, state.owner = state.owner, None
    if store.file is not None:
        store.file.close()
        store.file = None
    store.path.unlink(missing_ok=True)
    on_the_way.end()
    log.warning("assoc %s: connection ended inside C-STORE msg=%d: partial dataset dropped",
                _who(dul), store.message_id)


def _to_pynetdicom(dul: DULServiceProvider, pdu_bytes: bytes) -> None:
    """What pynetdicom's own reader does with a complete PDU."""
    try:
        pdu, event = dul._decode_pdu(bytearray(pdu_bytes))
        dul.event_queue.put(event)
    except Exception:
        log.exception("unable to decode a received PDU")
        dul.event_queue.put("Evt19")
        return
    dul._recv_pdu.put(pdu)  # type: ignore[arg-type]


def _encode_pdvs(items: list[tuple[int, int, memoryview]]) -> bytes:
    body = b"".join(struct.pack(">LBB", len(data) + 2, cx, ctrl) + bytes(data)
                    for cx, ctrl, data in items)
    return struct.pack(">BBL", P_DATA_TF, 0, len(body)) + body


class ProtocolError(RuntimeError):
    """The peer broke the message framing, or sent a message on a presentation context that
    was not accepted: the reader logs it and aborts the association (PS3.8 Evt19)."""


def _p_data(dul: DULServiceProvider, items: list[tuple[int, int, memoryview]]) -> None:
    state: _State = dul.__dict__.setdefault("_minipacs_receive", _State())
    handed: list[tuple[int, int, memoryview]] = []  # PDVs for pynetdicom, in order
    for cx, ctrl, data in items:
        if isinstance(state.owner, _Store):
            store = state.owner
            if ctrl & 1 or cx != store.context_id:
                raise ProtocolError("a command, or another context, inside a C-STORE dataset")
            _write(store, data)
            if ctrl & 2:
                state.owner = None
                _finish(dul, store)
        elif state.owner == "pynetdicom":
            if ctrl & 1:
                raise ProtocolError("a command inside another message's dataset")
            handed.append((cx, ctrl, data))
            if ctrl & 2:
                state.owner = None
        else:  # between messages: this is (part of) a command
            if not ctrl & 1:
                raise ProtocolError("a dataset fragment without a command")
            state.command += data
            if not ctrl & 2:
                continue
            raw = bytes(state.command)
            state.command.clear()
            try:
                command: dict[int, bytes] | None = wire.parse_command(raw)
            except wire.WireError:
                command = None
            taken = _take(dul, command, cx) if command is not None else None
            if taken is not None:
                state.owner = taken
                continue
            handed.append((cx, 0x03, memoryview(raw)))  # the whole command, one fragment
            with_dataset = command is not None and wire.us_value(command, 0x0800) != NO_DATASET
            state.owner = "pynetdicom" if with_dataset else None
    if handed:
        _to_pynetdicom(dul, _encode_pdvs(handed))


def _ui(command: dict[int, bytes], elem: int) -> str:
    return command.get(elem, b"").decode("ascii", "replace").rstrip("\0 ")


def _take(dul: DULServiceProvider, command: dict[int, bytes], cx: int) -> _Store | None:
    if (wire.us_value(command, 0x0100) != wire.C_STORE_RQ
            or wire.us_value(command, 0x0800) == NO_DATASET):
        return None
    assoc = dul.assoc
    context = assoc._accepted_cx.get(cx)
    sop_class, sop_instance = _ui(command, 0x0002), _ui(command, 0x1000)
    message_id = wire.us_value(command, 0x0110)
    if context is None:  # pynetdicom would abort too, after spooling the dataset
        raise ProtocolError(f"C-STORE on presentation context {cx}, which was not accepted")
    # Also when the command's SOP class is not the context's, or empty: the handler answers
    # those (pynetdicom would store the first and leave the second without any response).
    if message_id is None:
        return None
    transfer_syntax = str(context.transfer_syntax[0])
    if log.isEnabledFor(logging.DEBUG):
        log.debug("assoc %s: C-STORE msg=%d read by the gateway's reader", _who(dul), message_id)
    fd, name = tempfile.mkstemp(suffix=".dcm")
    store = _Store(cx, sop_class, sop_instance, message_id, transfer_syntax, Path(name),
                   os.fdopen(fd, "wb"), str(context.abstract_syntax))
    _write(store, b"\x00" * 128 + b"DICM" + file_meta(sop_class, sop_instance,
                                                       transfer_syntax))
    on_the_way.begin()
    return store


def _write(store: _Store, data: memoryview | bytes) -> None:
    if store.file is None:
        return
    try:
        store.file.write(data)
    except OSError as exc:
        store.error = exc.strerror or str(exc)
        store.file.close()
        store.file = None


def _finish(dul: DULServiceProvider, store: _Store) -> None:
    """The dataset is complete: decide and answer."""
    status = OUT_OF_RESOURCES
    try:
        if store.file is not None:
            store.file.close()
            store.file = None
            assert _handler is not None
            status = _handler(dul.assoc, store.sop_class, store.sop_instance, store.message_id,
                              store.transfer_syntax, store.path, store.context_class)
        else:
            log.error("assoc %s: spool write failed (%s): C-STORE -> 0x%04X", _who(dul),
                      store.error, status)
    except Exception:
        log.exception("assoc %s: C-STORE handler failed", _who(dul))
        status = 0xC211  # what pynetdicom answers for an exception in the handler
    finally:
        on_the_way.end()  # if it was not announced (refused, or the handler failed)
        store.path.unlink(missing_ok=True)  # moved into the spool if it was accepted
    command = store_response(store.sop_class, store.sop_instance, store.message_id, status)
    pdu = _encode_pdvs([(store.context_id, 0x03, memoryview(command))])
    cast(Any, dul.socket).send(pdu)


def _who(dul: DULServiceProvider) -> str:
    try:
        return f"{dul.assoc.requestor.ae_title.strip()}@{dul.assoc.requestor.address}"
    except Exception:
        return "?"

