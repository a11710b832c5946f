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

Ownership is decided per DIMSE message, by its command. While pynetdicom's DIMSE logging is
on (TRACE) every message goes to pynetdicom, C-STOREs included, so the dumps show them all;
the caps below still hold (a C-STORE's dataset then goes to pynetdicom's spool file).

Memory is bounded: a PDU by the maximum length negotiated (before an association, by
``ASSOCIATE_PDU_MAX``), a C-STORE dataset by nothing (it goes to disk), and everything
pynetdicom gathers in memory (a command set, a C-FIND / C-MOVE / C-GET identifier, an
N-ACTION's references) by ``wire.COMMAND_MAX`` and ``wire.MESSAGE_MAX``: a peer sending more
in one message is aborted, where pynetdicom would have kept every fragment.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import struct
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, cast

from pynetdicom.dimse_messages import _MESSAGE_TYPES
from pynetdicom.dul import DULServiceProvider

from services.gateway.announce import on_the_way
from services.gateway.fastpath import file_meta, store_response
from services.gateway.statuses import INVALID_UID, OUT_OF_RESOURCES, describe
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
    path: Path | None  # None for a refused request: its dataset is read and dropped
    file: IO[bytes] | None  # None after a write failed: the rest is read and dropped
    context_class: str = ""  # the context's abstract syntax: the handler checks the command's
    error: str = ""
    refused: str = ""  # why the command was refused before any byte was spooled
    response: bytes = b""  # the C-STORE-RSP of a refused request (echoing the command's UIDs)


@dataclass
class _State:
    """Per association: who owns the DIMSE message in progress, and its command so far."""

    owner: str | _Store | None = None  # None between messages, "pynetdicom", or ours
    command: bytearray = field(default_factory=bytearray)
    kind: str = ""  # the message pynetdicom is gathering ("C-FIND-RQ"), and its bytes so far
    held: int = 0



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
    """The DUL thread's read of the next PDU, in place of pynetdicom's, in every state.

    - **Length.** pynetdicom reads whatever length a PDU header declares: a peer that declared
      4 GiB and kept sending had the gateway hold it all, even before any association. A PDU
      over what the state allows (``ASSOCIATE_PDU_MAX`` before the association, ``_limit``
      after it) is refused unread (Evt19: pynetdicom answers it with an A-ABORT).
    - **After our A-ABORT** (Sta13) what the peer still sends is read in small pieces and
      dropped, never decoded (PS3.8 AA-6), until it closes or the ARTIM timer ends it.
    - **Time.** pynetdicom checks the ARTIM timer between PDUs only: a PDU that stops half-way
      (a truncated A-ASSOCIATE-RQ) held the connection for the network timeout (60 s), past
      any SCU's patience. Where ARTIM runs, a read cut short ends the connection as a closed
      one would (Evt17).
    - **C-STOREs.** A P-DATA-TF PDU of an association goes to ``_p_data``; every other PDU to
      pynetdicom, decoded as its own reader would."""
    raw = getattr(self.socket, "socket", None)
    if raw is None:
        _original_read(self)  # no socket: pynetdicom's reader reports the closed transport
        return
    state = self.state_machine.current_state
    if state == "Sta1" and not self.event_queue.empty():
        return  # the connection event (Evt5) first: the PDU waits in the socket for Sta2
    with _within_artim(self, raw, state):
        if state == "Sta13":
            _discard(self, raw)
            return
        pdu = _read_pdu(self, raw, state)
    if pdu is None:
        return
    head, body = pdu
    if head[0] != P_DATA_TF or state != "Sta6":
        _drop_partial(self)  # release, abort...: a C-STORE half received is dropped
        _to_pynetdicom(self, bytes(head) + bytes(body))
        return
    try:
        items = list(wire.pdvs(body, start=0))
    except wire.WireError as exc:  # a PDU we cannot frame: let pynetdicom judge it (Evt19 / abort)
        log.warning("assoc %s: malformed P-DATA-TF (%s)", _who(self), exc)
        _to_pynetdicom(self, bytes(head) + bytes(body))
        return
    try:
        _p_data(self, items, take=_enabled())
    except ProtocolError as exc:
        log.warning("assoc %s: %s: aborting", _who(self), exc)
        _drop_partial(self)
        self.event_queue.put("Evt19")  # pynetdicom answers an invalid PDU with A-ABORT


# States where a connection has no association yet (Sta1: the first read, before pynetdicom
# handles the connection event; Sta2: awaiting the A-ASSOCIATE-RQ) or awaits its close after
# an A-ABORT (Sta13). The ARTIM timer (the ACSE timeout) bounds them. (Sta5, where our own
# association awaits its A-ASSOCIATE-AC, is bounded by the network timeout.)
_ARTIM_STATES = frozenset({"Sta1", "Sta2", "Sta13"})
# Longest PDU before an association: an A-ASSOCIATE-RQ with all 128 presentation contexts,
# 30 transfer syntaxes each and two 64 KiB user identity items is ~250 KB.
ASSOCIATE_PDU_MAX = 1024 * 1024
_DISCARD = 64 * 1024


@contextlib.contextmanager
def _within_artim(dul: DULServiceProvider, raw: socket.socket, state: str) -> Iterator[None]:
    """The socket's reads end when the ARTIM timer does, in the states where it runs."""
    timer = dul.artim_timer
    if state not in _ARTIM_STATES or timer.timeout is None:
        yield
        return
    running = timer._start_time is not None and timer._end_time is None
    before = raw.gettimeout()
    raw.settimeout(max(timer.remaining if running else timer.timeout, 0.001))
    try:
        yield
    finally:
        with contextlib.suppress(OSError):  # closed meanwhile
            raw.settimeout(before)


def _read_pdu(dul: DULServiceProvider, raw: socket.socket, state: str
              ) -> tuple[bytearray, bytearray] | None:
    """The next PDU's header and body; None once the event that ends it is queued."""
    sock = cast(Any, dul.socket)  # pynetdicom's socket, its recv is ``wire.recv_upto``
    try:
        head: bytearray = sock.recv(6)
        pdu_type, _, length = struct.unpack(">BBL", head)
    except (OSError, TimeoutError, struct.error) as exc:
        _peer_closed(dul, state, exc)
        _drop_partial(dul)
        dul.event_queue.put("Evt17")
        return None
    before = state in _ARTIM_STATES
    who = f"connection from {_peer(raw)}" if before else f"assoc {_who(dul)}"
    if not 0x01 <= pdu_type <= 0x07:  # PS3.8 9.3.1 defines no other
        log.warning("%s: unknown PDU type 0x%02X: aborting", who, pdu_type)
        _drop_partial(dul)
        dul.event_queue.put("Evt19")
        return None
    limit = ASSOCIATE_PDU_MAX if before or state == "Sta5" else _limit(dul, pdu_type)
    if limit and length > limit:  # refused before reading (or allocating) it
        log.warning("%s: PDU type 0x%02X of %d bytes, over the %d %s: aborting", who,
                    pdu_type, length, limit,
                    "accepted before an association" if before else "negotiated")
        _drop_partial(dul)
        dul.event_queue.put("Evt19")
        return None
    try:
        body: bytearray = sock.recv(length) if length else bytearray()
        cut: BaseException | None = None
    except (OSError, TimeoutError) as exc:
        body, cut = bytearray(), exc
    if len(body) != length:  # fewer bytes: the peer closed (or reset) the connection
        _peer_closed(dul, state, cut)
        _drop_partial(dul)
        dul.event_queue.put("Evt17")
        return None
    return head, body


# Set on a DUL whose peer closed or reset the connection: "FIN" or "RST" (``closed_by_peer``)
PEER_CLOSED = "_minipacs_peer_closed"


def _peer_closed(dul: DULServiceProvider, state: str, exc: BaseException | None) -> None:
    """A read ended: by the peer closing (``exc`` None or ``struct.error``: fewer bytes than
    asked for) or resetting the connection, or by our side (the ARTIM timer's timeout, the
    socket closed under us), which is not the peer's doing and says nothing here.

    Before an association (a TCP health check, a port scanner, a modality giving up) this is
    the connection's one log line, with where it came from: the slot it held is free again
    once the DUL thread ends (``reactor._UserQueue``). In an association it is remembered for
    the line that reports the abort (``handlers.Gateway.on_aborted``)."""
    if isinstance(exc, ConnectionResetError):
        how = "RST"
    elif exc is None or isinstance(exc, struct.error):
        how = "FIN"
    else:
        return
    if dul.__dict__.get(PEER_CLOSED):
        return
    dul.__dict__[PEER_CLOSED] = how
    if state in ("Sta1", "Sta2"):
        peer = dul.assoc.requestor
        log.info("connection from %s:%s closed by peer before associating (%s)", peer.address,
                 peer.port, how)


def closed_by_peer(dul: DULServiceProvider) -> str:
    """"FIN" or "RST" if the peer closed or reset the connection, else ""."""
    return str(dul.__dict__.get(PEER_CLOSED) or "")


def _discard(dul: DULServiceProvider, raw: socket.socket) -> None:
    try:
        data = raw.recv(_DISCARD)
    except TimeoutError:
        return  # the ARTIM timer has run out: the reactor's Evt18 closes the connection
    except OSError:
        data = b""
    if not data:
        dul.event_queue.put("Evt17")


def _peer(raw: socket.socket) -> str:
    try:
        host, port = raw.getpeername()[:2]
        return f"{host}:{port}"
    except OSError:
        return "?"


# Longest PDU other than P-DATA-TF we accept once associated (A-RELEASE / A-ABORT are 10 bytes)
OTHER_PDU_MAX = 64 * 1024


def _limit(dul: DULServiceProvider, pdu_type: int) -> int:
    """The largest PDU of ``pdu_type`` this association may send us (0: no limit): P-DATA-TF up
    to the maximum length we offered (its variable field), anything else small."""
    if pdu_type != P_DATA_TF:
        return OTHER_PDU_MAX
    assoc = dul.assoc  # we are its acceptor, or (storage commitment reports) its requestor
    local = assoc.requestor if assoc.is_requestor else assoc.acceptor
    return int(getattr(local, "maximum_length", 0) or 0)


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
    if store.path is not None:
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


def _p_data(dul: DULServiceProvider, items: list[tuple[int, int, memoryview]], *,
            take: bool = True) -> None:
    """Sorts a P-DATA-TF PDU's fragments by message: C-STOREs this module receives (unless
    ``take`` is off: TRACE, where pynetdicom receives and prints them all), everything else
    handed to pynetdicom within the caps."""
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
            state.held += len(data)
            if state.held > wire.MESSAGE_MAX and state.kind != "C-STORE-RQ":
                raise ProtocolError(f"a {state.kind} of more than {wire.MESSAGE_MAX} bytes, the "
                                    "most the gateway holds for one request")
            handed.append((cx, ctrl, data))
            if ctrl & 2:
                state.owner = None
        else:  # between messages: this is (part of) a command
            if not ctrl & 1:
                raise ProtocolError("a dataset fragment without a command")
            state.command += data
            if len(state.command) > wire.COMMAND_MAX:
                raise ProtocolError(f"a command set of more than {wire.COMMAND_MAX} bytes")
            if not ctrl & 2:
                continue
            raw = bytes(state.command)
            state.command.clear()
            try:
                command: dict[int, bytes] | None = wire.parse_command(raw)
            except wire.WireError:
                command = None
            taken = _take(dul, command, cx) if take and command is not None else None
            if taken is not None:
                state.owner = taken
                continue
            handed.append((cx, 0x03, memoryview(raw)))  # the whole command, one fragment
            with_dataset = command is not None and wire.us_value(command, 0x0800) != NO_DATASET
            state.owner = "pynetdicom" if with_dataset else None
            state.kind, state.held = _kind(command), len(raw)
    if handed:
        _to_pynetdicom(dul, _encode_pdvs(handed))


def _kind(command: dict[int, bytes] | None) -> str:
    """The message's name for the log ("C-FIND-RQ"), from its Command Field."""
    field_ = None if command is None else wire.us_value(command, 0x0100)
    return _MESSAGE_TYPES.get(field_ or 0, ("DIMSE message",))[0]


_COMMAND_UIDS = {0x0002: "Affected SOP Class UID", 0x1000: "Affected SOP Instance UID"}


def _ui(command: dict[int, bytes], elem: int) -> str:
    """A UID of the command (raises ``UnicodeDecodeError`` for bytes outside ASCII)."""
    return command.get(elem, b"").decode("ascii").rstrip("\0 ")


def not_ascii(command: dict[int, bytes]) -> str:
    """Why the command's UIDs cannot even be read as text (bytes outside ASCII, which no UID
    holds), or "". Says where, never the value."""
    for elem, name in _COMMAND_UIDS.items():
        raw = command.get(elem, b"")
        bad = next((n for n, byte in enumerate(raw) if byte > 0x7F), None)
        if bad is not None:
            return (f"the command's {name} holds a non-ASCII byte (0x{raw[bad]:02X} at "
                    f"position {bad} of {len(raw)})")
    return ""


def refusal(command: dict[int, bytes], message_id: int, status: int) -> bytes:
    """The C-STORE-RSP refusing a request whose UIDs are not text: they are echoed byte for
    byte (PS3.7 9.3.1.2: the response's UIDs equal the request's)."""

    def echoed(elem: int) -> bytes:
        raw = command.get(elem, b"")
        return raw + b"\0" if len(raw) % 2 else raw

    return wire.command_set([
        (0x0002, echoed(0x0002)), (0x0100, struct.pack("<H", wire.C_STORE_RSP)),
        (0x0120, struct.pack("<H", message_id)), (0x0800, struct.pack("<H", NO_DATASET)),
        (0x0900, struct.pack("<H", status)), (0x1000, echoed(0x1000))])


def _take(dul: DULServiceProvider, command: dict[int, bytes], cx: int) -> _Store | None:
    if (wire.us_value(command, 0x0100) != wire.C_STORE_RQ
            or wire.us_value(command, 0x0800) == NO_DATASET):
        return None
    assoc = dul.assoc
    context = assoc._accepted_cx.get(cx)
    message_id = wire.us_value(command, 0x0110)
    if context is None:  # pynetdicom would abort too, after spooling the dataset
        raise ProtocolError(f"C-STORE on presentation context {cx}, which was not accepted")
    # Also when the command's SOP class is not the context's, or empty: the handler answers
    # those (pynetdicom would store the first and leave the second without any response).
    if message_id is None:
        return None
    transfer_syntax = str(context.transfer_syntax[0])
    if why := not_ascii(command):  # 0xC001: the dataset is read and dropped, nothing spooled
        return _Store(cx, "", "", message_id, transfer_syntax, None, None, refused=why,
                      response=refusal(command, message_id, INVALID_UID))
    sop_class, sop_instance = _ui(command, 0x0002), _ui(command, 0x1000)
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
    if store.refused:
        log.warning("msg=%d C-STORE from %s refused -> %s: %s", store.message_id, _who(dul),
                    describe(INVALID_UID), store.refused)
        _send_response(dul, store.context_id, store.response)
        return
    status = OUT_OF_RESOURCES
    try:
        if store.file is not None and store.path is not None:
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
        if store.path is not None:
            store.path.unlink(missing_ok=True)  # moved into the spool if it was accepted
    _send_response(dul, store.context_id, store_response(store.sop_class, store.sop_instance,
                                                         store.message_id, status))


def _send_response(dul: DULServiceProvider, context_id: int, command: bytes) -> None:
    pdu = _encode_pdvs([(context_id, 0x03, memoryview(command))])
    cast(Any, dul.socket).send(pdu)


def _who(dul: DULServiceProvider) -> str:
    try:
        return f"{dul.assoc.requestor.ae_title.strip()}@{dul.assoc.requestor.address}"
    except Exception:
        return "?"

