"""A Storage SCU association of our own: one blocking socket, no reactor threads.

pynetdicom runs two threads per association that poll every millisecond and moves every PDU
through queues and pydicom objects: with four associations that alone cost the mover more CPU
than the sending. The negotiation uses pynetdicom's PDU classes (A-ASSOCIATE-RQ/-AC/-RJ); the
C-STORE requests, their datasets and the responses are the fixed layouts of
``shared.dimse_wire``.
"""

from __future__ import annotations

import logging
import socket
from collections.abc import Sequence
from dataclasses import dataclass

from pydicom.uid import UID
from pynetdicom import PYNETDICOM_IMPLEMENTATION_UID, PYNETDICOM_IMPLEMENTATION_VERSION
from pynetdicom.pdu import A_ASSOCIATE_AC, A_ASSOCIATE_RQ
from pynetdicom.pdu_primitives import (
    A_ASSOCIATE,
    ImplementationClassUIDNotification,
    ImplementationVersionNameNotification,
    MaximumLengthNotification,
)
from pynetdicom.presentation import PresentationContext

from shared import dimse_wire as wire
from shared.dicom import alternatives, convert
from shared.logs import TRACE

log = logging.getLogger("minipacs.mover")

# An A-ASSOCIATE-AC with every context we may offer stays far below this
ASSOCIATION_PDU_MAX = 1 << 20

APPLICATION_CONTEXT = "1.2.840.10008.3.1.1.1"


class Refused(ConnectionError):
    """The peer rejected or aborted the association request, or could not be reached."""


@dataclass(frozen=True)
class Timeouts:
    acse: float = 30.0
    dimse: float = 60.0
    network: float = 60.0


def _request(calling: str, called: str, contexts: Sequence[tuple[str, str]],
             max_pdu: int) -> bytes:
    primitive = A_ASSOCIATE()
    primitive.application_context_name = UID(APPLICATION_CONTEXT)
    primitive.calling_ae_title = calling
    primitive.called_ae_title = called
    for n, ((sop_class, _), syntax) in enumerate(proposals(contexts)):
        cx = PresentationContext()
        cx.context_id = 2 * n + 1
        cx.abstract_syntax = UID(sop_class)
        cx.transfer_syntax = [UID(syntax)]
        primitive.presentation_context_definition_list.append(cx)
    length = MaximumLengthNotification()
    length.maximum_length_received = max_pdu
    implementation = ImplementationClassUIDNotification()
    implementation.implementation_class_uid = PYNETDICOM_IMPLEMENTATION_UID
    version = ImplementationVersionNameNotification()
    version.implementation_version_name = PYNETDICOM_IMPLEMENTATION_VERSION
    primitive.user_information = [length, implementation, version]
    return bytes(A_ASSOCIATE_RQ(primitive).encode())


class StoreAssociation:
    """``open`` an association offering one context per (SOP class, transfer syntax), then
    ``store`` datasets one at a time, then ``release`` (or ``abort``)."""

    def __init__(self, sock: socket.socket, accepted: dict[tuple[str, str], tuple[int, str]],
                 peer_max_pdu: int, timeouts: Timeouts, max_pdu: int = 0) -> None:
        self.sock = sock
        self.accepted = accepted
        self.peer_max_pdu = peer_max_pdu
        self.max_pdu = max_pdu  # what we offered: a longer PDU from the peer is refused
        self.timeouts = timeouts
        self.alive = True

    @classmethod
    def open(cls, host: str, port: int, calling: str, called: str,
             contexts: Sequence[tuple[str, str]], max_pdu: int,
             timeouts: Timeouts) -> StoreAssociation:
        try:
            sock = socket.create_connection((host, port), timeout=timeouts.acse)
        except OSError as exc:
            raise Refused(f"cannot connect: {exc}") from exc
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            wire.sendall(sock, [_request(calling, called, contexts, max_pdu)])
            kind, pdu = wire.read_pdu(sock, ASSOCIATION_PDU_MAX)
            if kind == 0x03:
                raise Refused("rejected the association")
            if kind != 0x02:
                raise Refused("aborted the association" if kind == wire.A_ABORT
                              else f"answered with PDU type 0x{kind:02X}")
            ac = A_ASSOCIATE_AC()
            ac.decode(bytes(pdu))
            answer = ac.to_primitive()
        except Refused:
            sock.close()
            raise
        except (OSError, ValueError) as exc:
            sock.close()
            raise Refused(f"association negotiation failed: {exc}") from exc
        proposed = proposals(contexts)
        accepted: dict[tuple[str, str], tuple[int, str]] = {}
        for cx in answer.presentation_context_definition_results_list:
            if cx.result == 0x00 and cx.context_id is not None and cx.transfer_syntax:
                n = (cx.context_id - 1) // 2
                if not 0 <= n < len(proposed):
                    continue
                pair, syntax = proposed[n]
                # the stored syntax when the peer takes it: then nothing is converted
                if str(cx.transfer_syntax[0]) == syntax and (syntax == pair[1]
                                                             or pair not in accepted):
                    accepted[pair] = (cx.context_id, syntax)
        peer_max = next((int(item.maximum_length_received or 0)
                         for item in answer.user_information
                         if isinstance(item, MaximumLengthNotification)), 0)
        sock.settimeout(timeouts.network)
        return cls(sock, accepted, peer_max, timeouts, max_pdu)

    def store(self, msg_id: int, sop_class: str, sop_instance: str, transfer_syntax: str,
              dataset: wire.Dataset, originator_aet: str = "",
              originator_id: int | None = None) -> int:
        """Send one C-STORE request; the response status. Raises ``LookupError`` when no
        context was accepted for this SOP class and transfer syntax, nor for any syntax it
        converts to (``shared.dicom.alternatives``), or the instance cannot be converted
        (nothing sent), and
        ``OSError`` (the association is then unusable) on network or protocol trouble."""
        found = self.accepted.get((sop_class, transfer_syntax))
        if found is None:
            raise LookupError(f"no accepted presentation context for {sop_class} in "
                              f"{transfer_syntax}")
        cx, syntax = found
        if syntax != transfer_syntax:  # the peer does not take the stored syntax
            dataset = convert(dataset, transfer_syntax, syntax)
        command = wire.c_store_rq(msg_id, sop_class, sop_instance, 2, originator_aet,
                                  originator_id)
        if log.isEnabledFor(TRACE):
            log.log(TRACE, "C-STORE-RQ msg=%d cx=%d %s %s (%d bytes)", msg_id, cx, sop_class,
                    sop_instance, dataset.length)
        try:
            self.sock.settimeout(self.timeouts.network)
            wire.send_message(self.sock, cx, command, dataset, self.peer_max_pdu)
            self.sock.settimeout(self.timeouts.dimse)
            status = self._response(msg_id)
        except OSError:
            self.abort()
            raise
        log.log(TRACE, "C-STORE-RSP msg=%d status=0x%04X", msg_id, status)
        return status

    def _response(self, msg_id: int) -> int:
        command = bytearray()
        while True:
            kind, pdu = wire.read_pdu(self.sock, self.max_pdu)
            if kind != wire.P_DATA_TF:
                raise wire.WireError("the peer released or aborted the association"
                                     if kind in (wire.A_ABORT, wire.A_RELEASE_RQ)
                                     else f"unexpected PDU type 0x{kind:02X}")
            for _cx, control, fragment in wire.pdvs(pdu):
                if not control & 0x01:
                    raise wire.WireError("a dataset where a C-STORE response was expected")
                command += fragment
                if len(command) > wire.COMMAND_MAX:
                    raise wire.WireError(f"a command set of more than {wire.COMMAND_MAX} bytes")
                if control & 0x02:
                    fields = wire.parse_command(command)
                    status = wire.us_value(fields, 0x0900)
                    if (wire.us_value(fields, 0x0100) != wire.C_STORE_RSP
                            or wire.us_value(fields, 0x0120) != msg_id or status is None):
                        raise wire.WireError("not the C-STORE response to our request")
                    return status

    def release(self) -> None:
        if not self.alive:
            return
        try:
            self.sock.settimeout(self.timeouts.acse)
            wire.sendall(self.sock, [wire.A_RELEASE_RQ_PDU])
            while wire.read_pdu(self.sock, self.max_pdu)[0] not in (wire.A_RELEASE_RP,
                                                                     wire.A_ABORT):
                pass
        except OSError:
            pass  # released or not, we are done with it
        finally:
            self.alive = False
            self.sock.close()

    def abort(self) -> None:
        if not self.alive:
            return
        self.alive = False
        try:
            self.sock.sendall(wire.a_abort_pdu())
        except OSError:
            pass
        finally:
            self.sock.close()


def offered(syntax: str) -> list[str]:
    """The transfer syntaxes proposed for an instance stored in ``syntax``: that one, then
    those it can be converted to (``shared.dicom.alternatives``: the other of the explicit /
    implicit VR little endian pair, or both for a compressed one), as Orthanc offers a
    destination what it can transcode to. Each in a presentation context of its own, so a
    peer that takes several is not left to choose one that needs converting."""
    return [syntax, *alternatives(syntax)]


def proposals(contexts: Sequence[tuple[str, str]]) -> list[tuple[tuple[str, str], str]]:
    """(SOP class and stored syntax, the transfer syntax offered) of every presentation
    context to propose, in order."""
    return [(pair, syntax) for pair in contexts for syntax in offered(pair[1])]

