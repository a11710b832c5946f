"""The query bench reads each C-FIND's latency from findscu's own timed log."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from pynetdicom import AE, evt
from pynetdicom.sop_class import (  # type: ignore[attr-defined]
    StudyRootQueryRetrieveInformationModelFind,
)

from bench.dimse import find_latencies, parse_findscu_log, study_query
from scripts.native import free_port

LOG = """\
23:59:59.990.125 Requesting Association
23:59:59.994.947 Association Accepted (Max Send PDV: 131060)
23:59:59.995.129 Sending Find Request (MsgID 1)
23:59:59.995.168 Request Identifiers:
23:59:59.995.168 (0010,0020) LO [P00002201 ]   #  10, 1 PatientID
23:59:59.998.614 ---------------------------
23:59:59.998.624 Find Response: 1 (Pending)
23:59:59.998.660 (0010,0020) LO [P00002201 ]   #  10, 1 PatientID
23:59:59.999.624 Find Response: 2 (Pending)
00:00:00.000.098 Received Final Find Response (Success)
00:00:00.000.167 Sending Find Request (MsgID 2)
00:00:00.002.167 Received Final Find Response (Failed: UnableToProcess)
00:00:00.002.500 Sending Find Request (MsgID 3)
"""


def test_each_query_is_timed_from_request_to_final_response() -> None:
    timed = parse_findscu_log(LOG)
    assert len(timed) == 2  # the third never got its final response: not counted
    (first_ms, first_n, first_ok), (second_ms, second_n, second_ok) = timed
    assert abs(first_ms - 4.969) < 1e-6 and first_n == 2 and first_ok  # across midnight
    assert abs(second_ms - 2.0) < 1e-6 and second_n == 0 and not second_ok


@contextmanager
def find_scp(aet: str, on_find: Callable[[evt.Event], Any]) -> Iterator[int]:
    """A pynetdicom Study Root C-FIND SCP on a free loopback port (yielded) for the test."""
    ae = AE(ae_title=aet)
    ae.add_supported_context(StudyRootQueryRetrieveInformationModelFind)
    port = free_port()
    server = ae.start_server(("127.0.0.1", port), block=False,
                             evt_handlers=[(evt.EVT_C_FIND, on_find)])
    assert server is not None
    try:
        yield port
    finally:
        server.shutdown()


def test_a_query_the_server_aborts_is_a_failure_and_the_rest_go_on() -> None:
    """The pynetdicom-client timing (``find_latencies``) against an SCP that aborts the
    association on one query: that query counts as a failure, the others are timed in a new
    association. A full bench once died on one such abort from Orthanc."""
    seen: list[str] = []

    def on_find(event: evt.Event):  # type: ignore[no-untyped-def]
        seen.append(event.identifier.PatientID)
        if event.identifier.PatientID == "ABORT":
            event.assoc.abort()
            return
        yield 0x0000, None

    with find_scp("FLAKY", on_find) as port:
        queries = [study_query(PatientID=p) for p in ("A", "B", "ABORT", "C", "D")]
        lat = find_latencies(port, "FLAKY", queries, warmup=1)
    assert seen == ["A", "A", "B", "ABORT", "C", "D"]
    assert lat.failures == 1 and len(lat.ms) == 4


def test_queries_during_a_load_go_round_until_it_ends_and_count_only_inside_it() -> None:
    """``find_latencies`` with ``start`` / ``running`` (the query bench's C-FIND while
    ingesting): the load starts after the warm-up, the queries go round the list while it
    runs, and the one that was still out when it ended is not counted."""
    seen: list[str] = []
    started_after: list[int] = []

    def on_find(event: evt.Event):  # type: ignore[no-untyped-def]
        seen.append(event.identifier.PatientID)
        yield 0x0000, None

    with find_scp("BUSY", on_find) as port:
        queries = [study_query(PatientID=p) for p in ("A", "B", "C")]
        lat = find_latencies(port, "BUSY", queries, warmup=2,
                             start=lambda: started_after.append(len(seen)),
                             running=lambda: len(seen) < 8)
    assert started_after == [2]  # after the two warm-up queries
    assert seen == ["A", "B", "A", "B", "C", "A", "B", "C"]  # round the list while running
    assert len(lat.ms) == 5 and lat.failures == 0  # the 8th ended after the load: not counted
