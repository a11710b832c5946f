"""Pure parts of C-MOVE / C-GET: final statuses, identifier checks, sub-operation outcomes,
presentation-context planning, the tally, progress routing and the move messages."""

from __future__ import annotations

import socket
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import pytest
from pydicom.dataset import Dataset

from services.gateway import statuses
from services.gateway.retrieve import (
    ProgressBoard,
    final_response,
    identifier_status,
    pending,
    read_identifier,
)
from services.mover.send import MAX_CONTEXTS, plan_contexts
from services.mover.worker import dead_lettered, deliveries
from shared.messages import BadMessage, MoveCancel, MoveProgress, MoveRequested
from shared.query import PATIENT_ROOT, STUDY_ROOT, QueryError
from shared.suboperations import Tally, classify

if TYPE_CHECKING:
    from pynetdicom.dimse_primitives import C_GET, C_STORE

    from shared.prefetch import Fetched


@dataclass(frozen=True)
class Ref:
    sop_instance_uid: str
    sop_class_uid: str
    transfer_syntax: str
    object_key: str = "k"
    size: int = 0  # unused by plan_contexts; services.mover.send.Ref has it


# ---- final responses ---------------------------------------------------------------------------

def test_all_completed_is_success_without_a_failed_list() -> None:
    r = final_response("done", 0, 5, 0, 0, [])
    assert (r.status, r.completed, r.failed, r.remaining, r.failed_uids) == (
        statuses.SUCCESS, 5, 0, None, None)
    assert r.final


def test_some_failed_is_b000_with_the_failed_uids() -> None:
    r = final_response("done", 0, 3, 2, 0, ["1.2.3", "1.2.4"])
    assert r.status == statuses.SUBOPERATIONS_WARNING == 0xB000
    assert r.failed_uids == ("1.2.3", "1.2.4") and r.remaining is None


def test_done_with_sub_operations_left_is_never_success() -> None:
    """A C-GET whose sub-operations stopped short (the association still up) once answered
    Success for instances it never sent: the ones left count as failed."""
    r = final_response("done", 3, 1, 0, 0, [])
    assert (r.status, r.completed, r.failed) == (statuses.SUBOPERATIONS_WARNING, 1, 3)
    assert final_response("done", 2, 0, 0, 0, []).status == statuses.SUBOPERATIONS_UNABLE


def test_warnings_alone_are_b000() -> None:
    assert final_response("done", 0, 0, 0, 2, []).status == 0xB000


def test_nothing_delivered_is_a702_and_counts_the_unsent_as_failed() -> None:
    r = final_response("failed", 0, 0, 4, 0, ["1", "2", "3", "4"], "ARCHIVE is not reachable")
    assert r.status == statuses.SUBOPERATIONS_UNABLE == 0xA702
    assert r.failed == 4 and r.comment == "ARCHIVE is not reachable"


def test_cancel_keeps_remaining() -> None:
    r = final_response("canceled", 7, 3, 0, 0, [])
    assert (r.status, r.remaining, r.completed) == (0xFE00, 7, 3)
    assert r.failed_uids == ()


def test_expired_is_a702() -> None:
    assert final_response("expired", 0, 0, 0, 0, []).status == 0xA702


def test_pending_is_not_final() -> None:
    p = pending(3, 1, 0, 0)
    assert p.status == 0xFF00 and not p.final and p.remaining == 3


# ---- identifiers --------------------------------------------------------------------------------

def ident(**keys: str) -> Dataset:
    ds = Dataset()
    for k, v in keys.items():
        setattr(ds, k, v)
    return ds


def test_read_identifier_levels() -> None:
    assert read_identifier(ident(QueryRetrieveLevel="PATIENT", PatientID="P"),
                           PATIENT_ROOT) == "PATIENT"
    assert read_identifier(ident(QueryRetrieveLevel="SERIES", StudyInstanceUID="1.2",
                                 SeriesInstanceUID="1.2.3"), STUDY_ROOT) == "SERIES"


@pytest.mark.parametrize(("keys", "model"), [
    ({"PatientID": "P"}, PATIENT_ROOT),
    ({"QueryRetrieveLevel": "PATIENT", "PatientID": "P"}, STUDY_ROOT),
    ({"QueryRetrieveLevel": "STUDY"}, STUDY_ROOT),
    ({"QueryRetrieveLevel": "STUDY", "StudyInstanceUID": "1.2.*"}, STUDY_ROOT),
    ({"QueryRetrieveLevel": "WARD", "PatientID": "P"}, PATIENT_ROOT),
])
def test_read_identifier_refuses(keys: dict[str, str], model: str) -> None:
    with pytest.raises(QueryError) as info:
        read_identifier(ident(**keys), model)
    assert identifier_status(info.value) == statuses.IDENTIFIER_DOES_NOT_MATCH


# ---- sub-operation outcomes ----------------------------------------------------------------------

@pytest.mark.parametrize(("status", "outcome"), [
    (0x0000, "completed"), (0xB000, "warning"), (0xB007, "warning"), (0x0001, "warning"),
    (0xA700, "failed"), (0xC000, "failed"), (0x0122, "failed"), (None, "failed"),
])
def test_store_statuses(status: int | None, outcome: str) -> None:
    assert classify(status) == outcome


# ---- presentation contexts ---------------------------------------------------------------------

def test_one_context_per_stored_class_and_syntax() -> None:
    refs = [Ref("1", "ct", "ex"), Ref("2", "ct", "ex"), Ref("3", "ct", "jpeg"),
            Ref("4", "mr", "ex")]
    assert plan_contexts(refs) == [refs]


def test_too_many_pairs_are_split_keeping_each_pair_in_one_group() -> None:
    refs = [Ref(str(i), f"class{i % 200}", "ex") for i in range(400)]
    groups = plan_contexts(refs)
    assert sum(len(g) for g in groups) == 400
    for g in groups:
        assert len({(r.sop_class_uid, r.transfer_syntax) for r in g}) <= MAX_CONTEXTS
    owner: dict[str, int] = {}
    for n, g in enumerate(groups):
        for r in g:
            assert owner.setdefault(r.sop_class_uid, n) == n


def test_a_convertible_pair_takes_two_presentation_contexts() -> None:
    """Stored in explicit VR little endian, an instance's pair is also offered in implicit VR,
    in a context of its own: 64 such pairs fill an association request."""
    from services.mover.scu import proposals

    explicit = "1.2.840.10008.1.2.1"
    refs = [Ref(str(i), f"class{i}", explicit) for i in range(100)]
    groups = plan_contexts(refs)
    assert [len(g) for g in groups] == [64, 36]
    pairs = sorted({(r.sop_class_uid, r.transfer_syntax) for r in groups[0]})
    assert len(proposals(pairs)) == MAX_CONTEXTS
    assert proposals([("c", explicit)]) == [(("c", explicit), explicit),
                                            (("c", explicit), "1.2.840.10008.1.2")]
    jpeg = "1.2.840.10008.1.2.4.70"  # JPEG lossless: also offered decompressed, two ways
    assert proposals([("c", jpeg)]) == [(("c", jpeg), jpeg), (("c", jpeg), explicit),
                                        (("c", jpeg), "1.2.840.10008.1.2")]
    assert [len(g) for g in plan_contexts([Ref(str(i), f"class{i}", jpeg)
                                           for i in range(50)])] == [42, 8]
    big_endian = "1.2.840.10008.1.2.2"  # also offered little endian, two ways
    assert proposals([("c", big_endian)]) == [(("c", big_endian), big_endian),
                                              (("c", big_endian), explicit),
                                              (("c", big_endian), "1.2.840.10008.1.2")]


# ---- tally and progress routing ------------------------------------------------------------------

def test_tally_counts_from_many_threads() -> None:
    changes = []
    tally = Tally(400, on_change=lambda: changes.append(1))

    def work(k: int) -> None:
        for i in range(100):
            tally.record(f"{k}.{i}", ("completed", "failed", "warning", "completed")[k])

    threads = [threading.Thread(target=work, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    remaining, completed, failed, warning, uids = tally.snapshot()
    assert (remaining, completed, failed, warning) == (0, 200, 100, 100)
    assert len(uids) == 100 and len(changes) == 400


def test_progress_goes_only_to_the_waiting_job() -> None:
    board = ProgressBoard()
    inbox = board.open("job-a")
    board.deliver(MoveProgress("job-b", "running", 3))
    board.deliver(MoveProgress("job-a", "running", 2, 1))
    assert inbox.get_nowait() == MoveProgress("job-a", "running", 2, 1)
    assert inbox.empty()
    board.close("job-a")
    board.deliver(MoveProgress("job-a", "done"))
    assert inbox.empty()


# ---- messages ----------------------------------------------------------------------------------

def test_move_messages_round_trip() -> None:
    job = MoveRequested(job_id="0b7e", level="STUDY",
                        identifier={"0020000D": {"vr": "UI", "Value": ["1.2.3"]}},
                        destination="archive", origin="api", start_by=12.5)
    assert MoveRequested.from_bytes(job.to_bytes()) == job
    done = MoveProgress("0b7e", "done", 0, 2, 1, 0, ["1.2.3.4"])
    assert MoveProgress.from_bytes(done.to_bytes()) == done and done.final
    assert not MoveProgress("0b7e", "running").final
    assert MoveCancel.from_bytes(MoveCancel("0b7e").to_bytes()).job_id == "0b7e"
    assert job.routing_key == "move.requested" and done.routing_key == "move.progress"
    with pytest.raises(BadMessage):
        MoveRequested.from_bytes(b'{"v": 1, "job_id": "x"}')


# ---- hand-encoded DIMSE (shared.dimse_wire) against pynetdicom's own encoding ------------------

def _pynetdicom_command(primitive: C_STORE | C_GET) -> bytes:
    from pynetdicom.dimse_messages import C_GET_RSP, C_STORE_RQ
    from pynetdicom.dsutils import encode

    message = (C_STORE_RQ if type(primitive).__name__ == "C_STORE" else C_GET_RSP)()
    message.primitive_to_message(primitive)
    return bytes(encode(message.command_set, True, True) or b"")


@pytest.mark.parametrize(("aet", "origin"), [("", None), ("MOVESCU", 7), ("ODD", 65535)])
def test_c_store_rq_is_byte_identical_to_pynetdicom(aet: str, origin: int | None) -> None:
    from io import BytesIO

    from pynetdicom.dimse_primitives import C_STORE

    from shared import dimse_wire

    p = C_STORE()
    p.MessageID = 12
    p.AffectedSOPClassUID = "1.2.840.10008.5.1.4.1.1.2"
    p.AffectedSOPInstanceUID = "1.2.3.45"
    p.Priority = 2
    p.MoveOriginatorApplicationEntityTitle = aet or None
    p.MoveOriginatorMessageID = origin
    p.DataSet = BytesIO(b"\x00" * 8)
    ours = dimse_wire.c_store_rq(12, "1.2.840.10008.5.1.4.1.1.2", "1.2.3.45", 2, aet, origin)
    assert ours == _pynetdicom_command(p)
    fields = dimse_wire.parse_command(ours)
    assert dimse_wire.us_value(fields, 0x0100) == 0x0001
    assert dimse_wire.us_value(fields, 0x0110) == 12


def test_c_get_pending_is_byte_identical_to_pynetdicom() -> None:
    from pynetdicom.dimse_primitives import C_GET

    from shared import dimse_wire

    p = C_GET()
    p.MessageIDBeingRespondedTo = 3
    p.AffectedSOPClassUID = "1.2.840.10008.5.1.4.1.2.2.3"
    p.Status = 0xFF00
    p.NumberOfRemainingSuboperations = 297
    p.NumberOfCompletedSuboperations = 2
    p.NumberOfFailedSuboperations = 1
    p.NumberOfWarningSuboperations = 0
    assert dimse_wire.c_get_pending(3, "1.2.840.10008.5.1.4.1.2.2.3", 0xFF00, 297, 2, 1,
                                    0) == _pynetdicom_command(p)


def test_dataset_offset_agrees_with_pynetdicom(tmp_path: Path) -> None:
    from pynetdicom.dsutils import split_dataset

    from shared import dimse_wire
    from tests.dicomgen import ct_series

    made = ct_series(tmp_path, count=1, tag="wire", size=16)[0]
    raw = made.path.read_bytes()
    assert dimse_wire.dataset_offset(raw) == split_dataset(made.path)[1]
    # without the preamble and DICM, and a bare dataset
    bare = raw[dimse_wire.dataset_offset(raw):]
    assert dimse_wire.dataset_offset(raw[132:]) == dimse_wire.dataset_offset(raw) - 132
    assert dimse_wire.dataset_offset(bare) == 0


def _read_message(sock: socket.socket) -> tuple[bytes, bytes, list[int]]:
    """(command, dataset, size of each dataset fragment) of one DIMSE message."""
    from shared import dimse_wire

    command, data, sizes = b"", b"", []
    while True:
        kind, pdu = dimse_wire.read_pdu(sock)
        assert kind == dimse_wire.P_DATA_TF
        for _cx, control, fragment in dimse_wire.pdvs(pdu):
            if control & 0x01:
                command += bytes(fragment)
            else:
                data += bytes(fragment)
                sizes.append(len(fragment))
            if control & 0x02 and not control & 0x01:
                return command, data, sizes


@pytest.mark.parametrize("in_memory", [True, False])
def test_send_message_fragments_the_stored_dataset_unchanged(tmp_path: Path,
                                                             in_memory: bool) -> None:
    from shared import dimse_wire
    from shared.prefetch import Blob
    from tests.dicomgen import ct_series, dataset_bytes

    made = ct_series(tmp_path, count=1, tag="frag", size=128)[0]
    blob = Blob(data=made.path.read_bytes()) if in_memory else Blob(path=made.path)
    a, b = socket.socketpair()
    got: list[tuple[bytes, bytes, list[int]]] = []
    reader = threading.Thread(target=lambda: got.append(_read_message(b)))
    reader.start()
    try:
        dimse_wire.send_message(a, 1, b"CMD!", blob, max_pdu=4096, batch=10_000)
        reader.join(10)
    finally:
        a.close()
        b.close()
    command, data, sizes = got[0]
    assert command == b"CMD!"
    assert data == dataset_bytes(made.path)
    assert max(sizes) == 4096 - 6 and len(sizes) == -(-len(data) // (4096 - 6))


# ---- prefetching -----------------------------------------------------------------------------

@dataclass(frozen=True)
class Obj:
    object_key: str
    size: int = 0


def test_prefetcher_keeps_order_counts_failures_and_stays_bounded() -> None:
    from shared.prefetch import Blob, Prefetcher

    refs = [Obj(str(i)) for i in range(20)]
    started: list[str] = []
    lock = threading.Lock()

    def fetch(ref: Obj) -> Blob:
        with lock:
            started.append(ref.object_key)
        if ref.object_key == "7":
            raise OSError("S3 said no")
        return Blob(data=ref.object_key.encode())

    taken: list[Fetched[Obj]] = []
    with Prefetcher(refs, fetch, threads=3, depth=4) as work:
        while (item := work.next()) is not None:
            assert len(started) <= len(taken) + 1 + 4  # never more than `depth` ahead
            taken.append(item)
    assert [i.ref for i in taken] == refs
    assert [i.ref.object_key for i in taken if i.blob is None] == ["7"]
    assert isinstance(taken[7].error, OSError)
    assert bytes(taken[3].blob.data or b"") == b"3"  # type: ignore[union-attr]


def test_prefetcher_gives_back_what_was_not_taken(tmp_path: Path) -> None:
    from shared.prefetch import Blob, Prefetcher

    def fetch(ref: Obj) -> Blob:
        path = tmp_path / ref.object_key
        path.write_bytes(b"x")
        return Blob(path=path)

    refs = [Obj(str(i)) for i in range(10)]
    work = Prefetcher(refs, fetch, threads=2, depth=3)
    first = work.next()
    assert first is not None and first.ref == refs[0]
    assert work.give_back() == refs[1:]
    assert work.next() is None
    work.close()
    # fetched ahead, not taken: deleted (by name: two threads finish fetches in any order)
    assert (tmp_path / "0").exists()
    assert not any((tmp_path / r.object_key).exists() for r in refs[1:])


# ---- the mover's own Storage SCU against pynetdicom's SCP ----------------------------------------

def test_store_association_sends_datasets_as_stored_and_releases(tmp_path: Path) -> None:
    from pydicom.uid import ExplicitVRLittleEndian
    from pynetdicom import AE, evt
    from pynetdicom.dimse_primitives import C_STORE
    from pynetdicom.sop_class import CTImageStorage  # type: ignore[attr-defined]

    from scripts.native import free_port
    from services.mover.scu import Refused, StoreAssociation, Timeouts
    from shared.prefetch import Blob
    from tests.dicomgen import CT_IMAGE, MR_IMAGE, ct_series, dataset_bytes

    got: list[tuple[str, bytes, str]] = []

    def on_store(event: evt.Event) -> int:
        request = cast(C_STORE, event.request)
        assert request.DataSet is not None
        got.append((str(request.AffectedSOPInstanceUID),
                    bytes(request.DataSet.getvalue()),
                    str(request.MoveOriginatorApplicationEntityTitle or "").strip()))
        return 0x0000

    ae = AE(ae_title="DEST")
    ae.add_supported_context(CTImageStorage, ExplicitVRLittleEndian)
    port = free_port()
    server = ae.start_server(("127.0.0.1", port), block=False,
                             evt_handlers=[(evt.EVT_C_STORE, on_store)])
    assert server is not None
    try:
        made = ct_series(tmp_path, count=2, tag="scu", size=32)
        contexts = [(CT_IMAGE, ExplicitVRLittleEndian), (MR_IMAGE, ExplicitVRLittleEndian)]
        assoc = StoreAssociation.open("127.0.0.1", port, "MINIPACS", "DEST", contexts,
                                      1 << 20, Timeouts(5, 5, 5))
        assert set(assoc.accepted) == {contexts[0]}  # MR refused by the SCP
        for n, m in enumerate(made):
            status = assoc.store(n + 1, CT_IMAGE, m.sop_uid, ExplicitVRLittleEndian,
                                 Blob(data=m.path.read_bytes()), "MOVESCU", 5)
            assert status == 0x0000
        with pytest.raises(LookupError):
            assoc.store(9, MR_IMAGE, "1.2.3", ExplicitVRLittleEndian, Blob(data=b""))
        assoc.release()
        assert [(u, d) for u, d, _ in got] == [(m.sop_uid, dataset_bytes(m.path)) for m in made]
        assert {o for _, _, o in got} == {"MOVESCU"}
    finally:
        server.shutdown()
    with pytest.raises(Refused):
        StoreAssociation.open("127.0.0.1", port, "MINIPACS", "DEST", contexts, 0,
                              Timeouts(5, 5, 5))


def test_prefetcher_fetches_one_large_object_ahead_not_depth() -> None:
    from shared.prefetch import Blob, Prefetcher

    gib = 1 << 30
    refs = [Obj(str(i), gib) for i in range(5)]
    started: list[str] = []
    lock = threading.Lock()

    def fetch(ref: Obj) -> Blob:
        with lock:
            started.append(ref.object_key)
        return Blob(data=b"")

    with Prefetcher(refs, fetch, threads=3, depth=6, budget=64 << 20) as work:
        taken = 0
        while work.next() is not None:
            taken += 1
            assert len(started) <= taken + 1  # one ahead of what was handed out
    assert taken == 5


@pytest.mark.parametrize(("headers", "expected"), [
    (None, 1),  # a first delivery carries no count
    ({"x-delivery-count": 0}, 1),  # RabbitMQ 3.x, first delivery
    ({"x-delivery-count": 3}, 4),  # RabbitMQ 3.x: every return counted
    ({"x-delivery-count": 1, "x-acquired-count": 3}, 4),  # 4.3: acquisitions counted apart
    ({"x-delivery-count": "3"}, 1),  # not a count: ignored, never an error
])
def test_deliveries_counts_this_one_and_never_fewer_than_the_broker(
        headers: dict[str, object] | None, expected: int) -> None:
    assert deliveries(headers) == expected


@pytest.mark.parametrize(("headers", "expected"), [
    (None, False),
    ({"x-delivery-count": 2}, False),  # redelivered, never dead-lettered
    ({"x-death": []}, False),
    ({"x-death": [{"queue": "mover.jobs", "reason": "rejected", "count": 1}]}, True),
])
def test_dead_lettered_is_read_from_x_death(headers: dict[str, object] | None,
                                            expected: bool) -> None:
    assert dead_lettered(headers) is expected


def test_store_association_refuses_an_endless_command_from_the_destination() -> None:
    """A destination answering a C-STORE with a command set that never ends (fragments without
    the last bit) no longer grows the mover's buffer: past ``COMMAND_MAX`` the sub-operation
    fails with the reason."""
    from services.mover.scu import StoreAssociation, Timeouts
    from shared import dimse_wire
    from shared.prefetch import Blob
    from tests.dicomgen import CT_IMAGE

    ts = "1.2.840.10008.1.2.1"
    ours, theirs = socket.socketpair()
    sent = 0

    def destination() -> None:
        nonlocal sent
        pdu = dimse_wire._pdv_header(1, 0x01, 16384) + bytes(16384)  # never the last one
        theirs.settimeout(10)
        theirs.recv(1 << 20)  # the request
        try:
            while sent < 32 * dimse_wire.COMMAND_MAX:
                theirs.sendall(pdu)
                sent += 16384
        except OSError:
            pass

    peer = threading.Thread(target=destination, daemon=True)
    peer.start()
    assoc = StoreAssociation(ours, {(CT_IMAGE, ts): (1, ts)}, 1 << 20, Timeouts(5, 5, 5), 1 << 20)
    with pytest.raises(dimse_wire.WireError, match="a command set of more than 65536 bytes"):
        assoc.store(1, CT_IMAGE, "1.2.3", ts, Blob(data=b"\x08\x00\x18\x00\x00\x00\x00\x00"))
    ours.close()
    peer.join(10)
    theirs.close()


# ---- a C-GET sub-operation whose dataset cannot be read ----------------------------------------

class _Breaking:
    """A dataset whose reads fail after ``good`` blocks."""

    def __init__(self, good: int) -> None:
        self.good = good
        self.length = 10 * 1000

    def blocks(self, size: int) -> Iterator[memoryview]:
        for _ in range(self.good):
            yield memoryview(bytes(100))
        raise OSError(5, "Input/output error")


def _takeover(sock: socket.socket) -> Any:
    """A ``SocketTakeover`` over ``sock`` for an association of nothing but what it uses."""
    import queue
    from types import SimpleNamespace

    from services.gateway.retrieve import SocketTakeover

    dul = SimpleNamespace(socket=SimpleNamespace(socket=sock), event_queue=queue.Queue(),
                          _idle_timer=SimpleNamespace(restart=lambda: None))
    assoc = SimpleNamespace(dul=dul, dimse=SimpleNamespace(maximum_pdu_size=4096),
                            acceptor=SimpleNamespace(maximum_length=4096), __dict__={})
    return SocketTakeover(assoc, 9, timeout=5)


def test_a_dataset_unreadable_before_sending_fails_that_sub_operation_only() -> None:
    """Nothing went out: the association is not lost (it once was, with no final response)."""
    from services.gateway.retrieve import Unreadable

    ours, theirs = socket.socketpair()
    try:
        taken = _takeover(ours)
        ref = Ref("1.2.3", "1.2.840.10008.5.1.4.1.1.2", "1.2.840.10008.1.2.1")
        with taken, pytest.raises(Unreadable):
            taken.store(1, 1, ref, _Breaking(good=0))
        assert not taken.lost and taken.dul.event_queue.empty()
        theirs.setblocking(False)
        with pytest.raises(BlockingIOError):
            theirs.recv(1)  # not a byte of the request
    finally:
        ours.close()
        theirs.close()


def test_a_dataset_unreadable_half_sent_aborts_the_association() -> None:
    from services.gateway.retrieve import Unreadable

    ours, theirs = socket.socketpair()
    try:
        taken = _takeover(ours)
        ref = Ref("1.2.3", "1.2.840.10008.5.1.4.1.1.2", "1.2.840.10008.1.2.1")
        with taken, pytest.raises(OSError) as raised:
            taken.store(1, 1, ref, _Breaking(good=1))
        assert not isinstance(raised.value, Unreadable)
        assert taken.lost and taken.dul.event_queue.get_nowait() == "Evt19"
        assert theirs.recv(65536)  # the request and part of its dataset went out
    finally:
        ours.close()
        theirs.close()
