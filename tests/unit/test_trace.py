"""The TRACE dumps of the DIMSE messages pynetdicom leaves out (services/gateway/trace.py)."""

from __future__ import annotations

import pytest
from pydicom.dataset import Dataset

from services.gateway.trace import move_request_dump, response_dump


def _store_rsp(status: int, comment: str | None = None) -> Dataset:
    cs = Dataset()
    cs.AffectedSOPClassUID = "1.2.840.10008.5.1.4.1.1.2"
    cs.MessageIDBeingRespondedTo = 7
    cs.AffectedSOPInstanceUID = "1.2.3.4"
    cs.Status = status
    if comment:
        cs.ErrorComment = comment
    return cs


def test_store_response_in_pynetdicoms_layout_with_the_status_named() -> None:
    lines = response_dump("C-STORE RSP", 41, _store_rsp(0xA700, "spool write failed"))
    assert lines[0] == f"{' OUTGOING DIMSE MESSAGE ':=^76}"
    assert lines[-1] == f"{' END DIMSE MESSAGE ':=^76}"
    assert lines[1:-1] == [
        "Message Type                  : C-STORE RSP",
        "Presentation Context ID       : 41",
        "Message ID Being Responded To : 7",
        "Affected SOP Class UID        : CT Image Storage",
        "Affected SOP Instance UID     : 1.2.3.4",
        "Data Set                      : None",
        "DIMSE Status                  : 0xA700 out of resources",
        "Error Comment                 : spool write failed",
    ]


def test_echo_response_without_instance_uid() -> None:
    cs = Dataset()
    cs.MessageIDBeingRespondedTo = 1
    cs.AffectedSOPClassUID = "1.2.840.10008.1.1"
    cs.Status = 0
    lines = response_dump("C-ECHO RSP", 1, cs)
    assert "Affected SOP Class UID        : Verification SOP Class" in lines
    assert "DIMSE Status                  : 0x0000 success" in lines
    assert not any(line.startswith("Affected SOP Instance UID") for line in lines)


@pytest.mark.filterwarnings("ignore:Invalid value for VR UI")  # the bad UID, on purpose
def test_move_request_names_its_destination_and_a_bad_uid_is_quoted() -> None:
    cs = Dataset()
    cs.MessageID = 3
    cs.AffectedSOPClassUID = "1.2.840.10008.5.1.4.1.2.2.2"
    cs.Priority = 2
    cs.MoveDestination = "ARCHIVE "
    lines = move_request_dump(5, cs, True)
    assert lines[1:-1] == [
        "Message Type                  : C-MOVE RQ",
        "Presentation Context ID       : 5",
        "Message ID                    : 3",
        "Affected SOP Class UID        : Study Root Query/Retrieve Information Model - MOVE",
        "Identifier                    : Present",
        "Priority                      : Low",
        "Move Destination              : ARCHIVE",
    ]
    cs.AffectedSOPClassUID = "../x"
    assert "Affected SOP Class UID        : '../x'" in move_request_dump(5, cs, False)
