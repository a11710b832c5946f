"""Under ``MINIPACS_LOG_LEVEL=TRACE``: dumps of the DIMSE messages pynetdicom's own logging
leaves out, in the layout of the ones it prints (and of DCMTK's ``-ll trace`` in the seed
report), so that the log shows every request and response of an association.

pynetdicom dumps neither the C-ECHO-RSP nor the C-STORE-RSP it sends (their logging handlers
return nothing), nor the C-MOVE-RQ it receives: for an admin reading why a modality got a
failure, or where a C-MOVE was asked to send, those are the lines that matter.
"""

from __future__ import annotations

import logging
from typing import Any

from pydicom.dataset import Dataset
from pydicom.uid import UID
from pynetdicom import evt
from pynetdicom.dimse_messages import C_ECHO_RSP, C_MOVE_RQ, C_STORE_RSP

from services.gateway.statuses import describe
from shared.logs import TRACE

log = logging.getLogger("minipacs.gateway.trace")

PRIORITY = {0: "Medium", 1: "High", 2: "Low"}


def _uid_name(value: Any) -> str:
    uid = UID(str(value))
    return uid.name if uid.is_valid else repr(str(value))


def _dump(direction: str, kind: str, fields: list[tuple[str, str]]) -> list[str]:
    return [f" {direction} DIMSE MESSAGE ".center(76, "="),
            f"{'Message Type':30}: {kind}",
            *(f"{name:30}: {value}" for name, value in fields),
            " END DIMSE MESSAGE ".center(76, "=")]


def response_dump(kind: str, context_id: int | None, cs: Dataset) -> list[str]:
    """An outgoing C-ECHO-RSP or C-STORE-RSP (``kind``), from its command set."""
    fields = [("Presentation Context ID", str(context_id)),
              ("Message ID Being Responded To", str(cs.get("MessageIDBeingRespondedTo", "")))]
    if "AffectedSOPClassUID" in cs:
        fields.append(("Affected SOP Class UID", _uid_name(cs.AffectedSOPClassUID)))
    if "AffectedSOPInstanceUID" in cs:
        fields.append(("Affected SOP Instance UID", str(cs.AffectedSOPInstanceUID)))
    fields.append(("Data Set", "None"))
    status = int(cs.get("Status", -1))
    fields.append(("DIMSE Status", describe(status) if status >= 0 else "missing"))
    if "ErrorComment" in cs:
        fields.append(("Error Comment", str(cs.ErrorComment)))
    return _dump("OUTGOING", kind, fields)


def move_request_dump(context_id: int | None, cs: Dataset, has_identifier: bool) -> list[str]:
    """An incoming C-MOVE-RQ, from its command set."""
    return _dump("INCOMING", "C-MOVE RQ", [
        ("Presentation Context ID", str(context_id)),
        ("Message ID", str(cs.get("MessageID", ""))),
        ("Affected SOP Class UID", _uid_name(cs.get("AffectedSOPClassUID", ""))),
        ("Identifier", "Present" if has_identifier else "None"),
        ("Priority", PRIORITY.get(int(cs.get("Priority", 0)), "?")),
        ("Move Destination", str(cs.get("MoveDestination", "")).strip()),
    ])


def _emit(lines: list[str]) -> None:
    for line in lines:
        log.log(TRACE, "%s", line)


def _on_sent(event: evt.Event) -> None:
    msg = event.message
    if isinstance(msg, C_STORE_RSP):
        _emit(response_dump("C-STORE RSP", msg.context_id, msg.command_set))
    elif isinstance(msg, C_ECHO_RSP):
        _emit(response_dump("C-ECHO RSP", msg.context_id, msg.command_set))


def _on_received(event: evt.Event) -> None:
    msg = event.message
    if isinstance(msg, C_MOVE_RQ):
        data = msg.data_set
        present = bool(data is not None and data.getvalue())
        _emit(move_request_dump(msg.context_id, msg.command_set, present))


def handlers() -> list[tuple[Any, Any]]:
    """The event handlers to bind, only when pynetdicom's own dumps are on (TRACE): bound at
    other levels, a DIMSE-sent handler would also turn off the hand-encoded C-STORE
    response (``fastpath.py``)."""
    if not logging.getLogger("pynetdicom").isEnabledFor(logging.DEBUG):
        return []
    return [(evt.EVT_DIMSE_SENT, _on_sent), (evt.EVT_DIMSE_RECV, _on_received)]
