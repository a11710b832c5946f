"""Storage commitment's pure parts: reading the N-ACTION, and the report's two lists."""

from __future__ import annotations

import pytest
from pydicom.dataset import Dataset

from shared.commitment import (
    ALL_COMMITTED,
    CLASS_INSTANCE_CONFLICT,
    FAILURES_EXIST,
    NO_SUCH_OBJECT_INSTANCE,
    STORAGE_COMMITMENT_INSTANCE,
    CommitRequest,
    Refused,
    parse_request,
    report,
)
from tests.helpers import commitment_request as info

CT, MR = "1.2.840.10008.5.1.4.1.1.2", "1.2.840.10008.5.1.4.1.1.4"


def test_a_well_formed_request_is_read_in_order() -> None:
    request = parse_request(1, STORAGE_COMMITMENT_INSTANCE,
                            info("9.8", [(CT, "1.1"), (MR, "1.2")]))
    assert request == CommitRequest("9.8", ((CT, "1.1"), (MR, "1.2")))


@pytest.mark.parametrize(("action", "instance", "ds", "status"), [
    (2, STORAGE_COMMITMENT_INSTANCE, info("9.8", [(CT, "1.1")]), 0x0123),
    (None, STORAGE_COMMITMENT_INSTANCE, info("9.8", [(CT, "1.1")]), 0x0123),
    (1, "1.2.3", info("9.8", [(CT, "1.1")]), 0x0117),
    (1, STORAGE_COMMITMENT_INSTANCE, None, 0x0120),
    (1, STORAGE_COMMITMENT_INSTANCE, info(None, [(CT, "1.1")]), 0x0120),
    (1, STORAGE_COMMITMENT_INSTANCE, info("9.8", []), 0x0120),
    (1, STORAGE_COMMITMENT_INSTANCE, info("9.8", [(CT, "")]), 0x0106),
    (1, STORAGE_COMMITMENT_INSTANCE, info("9.8", [("../x", "1.1")]), 0x0106),
    (1, STORAGE_COMMITMENT_INSTANCE, info("9.8/..", [(CT, "1.1")]), 0x0106),
])
def test_a_request_that_cannot_be_taken_is_refused_with_its_status(
        action: int | None, instance: str, ds: Dataset | None, status: int) -> None:
    with pytest.raises(Refused) as refused:
        parse_request(action, instance, ds)
    assert refused.value.status == status
    assert str(refused.value)


def test_the_report_lists_committed_and_failed_with_their_reasons() -> None:
    request = CommitRequest("9.8", ((CT, "1.1"), (CT, "1.2"), (CT, "1.3")))
    event, ds = report(request, {"1.1": CT, "1.2": MR}, "MINIPACS")
    assert event == FAILURES_EXIST
    assert ds.TransactionUID == "9.8" and ds.RetrieveAETitle == "MINIPACS"
    assert [i.ReferencedSOPInstanceUID for i in ds.ReferencedSOPSequence] == ["1.1"]
    assert {i.ReferencedSOPInstanceUID: i.FailureReason for i in ds.FailedSOPSequence} == {
        "1.2": CLASS_INSTANCE_CONFLICT, "1.3": NO_SUCH_OBJECT_INSTANCE}


def test_a_report_with_every_instance_indexed_has_no_failed_list() -> None:
    request = CommitRequest("9.8", ((CT, "1.1"), (MR, "1.2")))
    event, ds = report(request, {"1.1": CT, "1.2": MR}, "MINIPACS")
    assert event == ALL_COMMITTED
    assert "FailedSOPSequence" not in ds
    assert len(ds.ReferencedSOPSequence) == 2


def test_the_queued_request_round_trips_to_the_mover() -> None:
    """What the gateway queues is what the mover reports on, refs in request order."""
    from services.mover.commitment import read
    from shared.messages import CommitmentRequested

    sent = CommitmentRequested("9.8", [[CT, "1.1"], [MR, "1.2"]], "MODALITY", "10.0.0.7", 104,
                               1.5e9, "MODALITY", "10.0.0.7")
    job, request = read(sent.to_bytes())
    assert job == sent
    assert request == CommitRequest("9.8", ((CT, "1.1"), (MR, "1.2")))


@pytest.mark.parametrize("body", [
    b"{}", b"not json", b'{"v": 1, "transaction_uid": "9.8", "refs": [], "report_aet": "A", '
    b'"report_host": "h", "report_port": 1, "report_by": 0}',
    b'{"v": 1, "transaction_uid": "9.8", "refs": [["only-one"]], "report_aet": "A", '
    b'"report_host": "h", "report_port": 1, "report_by": 0}'])
def test_an_unreadable_queued_request_is_refused_for_the_dead_letter_queue(body: bytes) -> None:
    from services.mover.commitment import read
    from shared.messages import BadMessage

    with pytest.raises(BadMessage):
        read(body)
