"""Storage Commitment Push Model (PS3.4 Annex J), its pure parts: reading a request
(the gateway, which answers the N-ACTION) and writing the report (the mover, which sends the
N-EVENT-REPORT once the instances are indexed)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from pydicom.dataset import Dataset

from shared.keys import InvalidUID, validate_uid

PROCESSING_FAILURE = 0x0110

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
        raise Refused(PROCESSING_FAILURE,
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
