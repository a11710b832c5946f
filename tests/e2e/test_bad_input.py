"""Issue 2, bad input: each gets the right status or rejection, nothing is stored, the
gateway keeps serving. Raw files are sent with pynetdicom in chunked mode, so the bytes on the
wire are exactly the file's (malformed UIDs, truncation, mismatches)."""

from __future__ import annotations

import asyncio
import hashlib
import re
import socket
import struct
import subprocess
import time
from collections.abc import Iterator
from io import BytesIO
from pathlib import Path
from typing import Any

import psutil
import pytest
from pydicom import dcmread
from pydicom.uid import UID
from pynetdicom import AE, _config
from pynetdicom.association import Association

from scripts.native import Stack
from services.gateway import receive, statuses
from services.gateway.admission import REJECT_NO_CONTEXT
from shared import broker, topology
from shared import dimse_wire as wire
from shared.keys import object_key
from shared.messages import InstanceStored, batch_body
from tests.conftest import dsn, make_stack, s3_client, teardown
from tests.dicomgen import CT_IMAGE, MR_IMAGE, make_instance, uid
from tests.helpers import dcmtk, dcmtk_env, pg, s3_objects, s3_read, storescu, wait_until

pytestmark = pytest.mark.e2e
TS = "1.2.840.10008.1.2.1"
SOP_CLASS_UID, SOP_INSTANCE_UID, PATIENT_ID = 0x00080016, 0x00080018, 0x00100020
PATIENT_NAME, ROWS, PIXEL_DATA = 0x00100010, 0x00280010, 0x7FE00010
_LONG_VRS = {b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"UC", b"UN", b"UR", b"UT",
             b"SV", b"UV"}


# ---- hand-built DIMSE and datasets: the bytes pynetdicom's client would refuse to send -------

def dataset_of(path: Path) -> bytes:
    """The dataset bytes of a Part-10 file (what goes on the wire after the command)."""
    raw = path.read_bytes()
    return raw[wire.dataset_offset(raw):]


def _elements(dataset: bytes) -> Iterator[tuple[int, int, int, int]]:
    """(tag, header position, value position, value length) of each top-level element of an
    Explicit VR Little Endian dataset without undefined lengths (what ``instance`` writes)."""
    pos = 0
    while pos < len(dataset):
        group, elem, vr = struct.unpack_from("<HH2s", dataset, pos)
        if vr in _LONG_VRS:
            (length,) = struct.unpack_from("<L", dataset, pos + 8)
            value = pos + 12
        else:
            (length,) = struct.unpack_from("<H", dataset, pos + 6)
            value = pos + 8
        yield group << 16 | elem, pos, value, length
        pos = value + length


def set_value(dataset: bytes, tag: int, value: bytes | None = None,
              length: int | None = None) -> bytes:
    """``dataset`` with ``tag``'s value replaced by ``value`` as given (no padding: odd lengths,
    NUL bytes and backslashes stay) and its length field set to ``length`` (a lie, if it is
    not the value's length)."""
    for found, head, pos, old_length in _elements(dataset):
        if found != tag:
            continue
        new = dataset[pos:pos + old_length] if value is None else value
        size = len(new) if length is None else length
        field = (struct.pack("<L", size) if pos - head == 12 else struct.pack("<H", size))
        return dataset[:pos - len(field)] + field + new + dataset[pos + old_length:]
    raise KeyError(f"({tag >> 16:04X},{tag & 0xFFFF:04X}) not in the dataset")


def pdv(context_id: int, control: int, data: bytes) -> bytes:
    """A P-DATA-TF PDU holding one PDV."""
    return struct.pack(">BBLLBB", wire.P_DATA_TF, 0, len(data) + 6, len(data) + 2, context_id,
                       control) + data


def store_raw(stack: Stack, sop_class: str, sop_instance: str, dataset: bytes,
              context: str = CT_IMAGE) -> int | None:
    """One C-STORE with a hand-encoded command (any Affected SOP Class / Instance UID, even
    empty, over 64 characters or with a NUL) and ``dataset`` as it is, on a presentation
    context for ``context``. Returns the status, or None if the gateway never answered (the
    association aborted, or no response within 30 s)."""
    ae = AE(ae_title="TESTSCU")
    ae.add_requested_context(context, TS)
    ae.dimse_timeout = 30
    assoc = ae.associate("127.0.0.1", stack.config.gateway_port, ae_title="MINIPACS")
    assert assoc.is_established
    try:
        # The response echoes the command's UIDs: our client must read back whatever we sent.
        with pytest.MonkeyPatch.context() as mp:
            mp.setitem(_config.VALIDATORS, "UI", lambda _uid: (True, ""))
            cx = assoc.accepted_contexts[0].context_id
            assert cx is not None
            return _c_store(assoc, cx, sop_class, sop_instance, dataset)
    finally:
        if assoc.is_established:
            assoc.release()


def _c_store(assoc: Association, context_id: int, sop_class: str, sop_instance: str,
             dataset: bytes) -> int | None:
    return send_command(assoc, context_id, wire.c_store_rq(1, sop_class, sop_instance),
                        dataset)


def send_command(assoc: Association, context_id: int, command: bytes,
                 dataset: bytes) -> int | None:
    """``command`` (an encoded C-STORE-RQ, as it is) and ``dataset`` on the association; the
    response's status, None if none came."""
    # pynetdicom's own send_* pause its reactor so the response is left for them: so do we.
    assoc._reactor_checkpoint.clear()
    wait_until(lambda: assoc._is_paused, 10, every=0.001, what="the client reactor paused")
    try:
        sock = assoc.dul.socket.socket  # type: ignore[union-attr]
        assert sock is not None
        sock.sendall(pdv(context_id, 0x03, command) + pdv(context_id, 0x02, dataset))
        _cx, rsp = assoc.dimse.get_msg(block=True)
    finally:
        assoc._reactor_checkpoint.set()
    status = None if rsp is None else rsp.Status  # type: ignore[union-attr]
    return None if status is None else int(status)


def refusals(stack: Stack) -> int:
    return stack.log_text("gateway").count("C-STORE from TESTSCU@127.0.0.1 refused")


def send_file(stack: Stack, path: Path, aet: str = "TESTSCU") -> int:
    ae = AE(ae_title=aet)
    ae.add_requested_context(CT_IMAGE, TS)
    assoc = ae.associate("127.0.0.1", stack.config.gateway_port, ae_title="MINIPACS")
    assert assoc.is_established
    try:
        status = assoc.send_c_store(path)
        return int(status.Status)
    finally:
        assoc.release()


def instance(tmp: Path, name: str, **kw: object) -> Path:
    args: dict[str, object] = dict(sop_class=CT_IMAGE, sop_uid=uid("bad", name),
                                   study_uid=uid("bad", "study"), series_uid=uid("bad", "se"),
                                   patient_id="BAD", patient_name="B^I", rows=16, cols=16,
                                   modality="CT", instance_number=1)
    args.update(kw)
    return make_instance(tmp / f"{name}.dcm", **args)  # type: ignore[arg-type]


def rewrite(path: Path, meta_uid: str | None = None, dataset_uid: str | None = None) -> Path:
    ds = dcmread(path)
    if meta_uid is not None:
        ds.file_meta.MediaStorageSOPInstanceUID = UID(meta_uid)
    if dataset_uid is not None:
        ds.SOPInstanceUID = dataset_uid
    ds.save_as(path, enforce_file_format=False)
    return path


def nothing_stored(stack: Stack, *sop_uids: str) -> bool:
    """No row for these UIDs once the spool has drained (other tests' instances may be in
    flight: wait for them rather than race them)."""
    ready = Path(stack.config.base_dir) / "spool" / "ready"
    wait_until(lambda: not any(ready.iterdir()), 60, what="spool drained")
    wait_until(lambda: not _queue_busy(stack), 60, what="indexer idle")
    rows = pg(dsn(stack), "SELECT count(*) AS n FROM instance WHERE sop_instance_uid = "
              "ANY($1::text[])", list(sop_uids))
    return bool(rows[0]["n"] == 0) and not unindexed_objects_holding(stack, sop_uids)


def unindexed_objects_holding(stack: Stack, sop_uids: tuple[str, ...]) -> list[str]:
    """Keys of S3 objects that no instance or conflict row points at and whose head holds one
    of these UIDs (ones long enough not to occur by chance): what storage put in the bucket
    for an instance the index never took. Keys are content hashes, so look inside."""
    needles = [u.encode() for u in sop_uids if len(u) >= 10]
    rows = pg(dsn(stack), "SELECT object_key AS k FROM instance UNION "
              "SELECT rejected_key FROM ingest_conflict")
    client = s3_client(stack)
    found = []
    for key in set(s3_objects(client, "minipacs")) - {r["k"] for r in rows}:
        obj = client.get_object("minipacs", key, 0, 64 * 1024)
        try:
            head = obj.read()
        finally:
            obj.close()
            obj.release_conn()
        if any(n in head for n in needles):
            found.append(key)
    return found


def _queue_busy(stack: Stack) -> bool:
    out = subprocess.run(["rabbitmqctl", "-q", "list_queues", "-p", stack.config.vhost, "name",
                          "messages", "--no-table-headers"], capture_output=True, text=True,
                         check=True).stdout
    return any(line.split()[-1] != "0" for line in out.splitlines()
               if line.strip() and not line.split()[0].endswith(".dead"))


# Bad SOP Instance UIDs sent in both the command and the dataset ("..."), or only in the
# dataset with a good command ("...-in_dataset"): they go out by hand (``store_raw``), as
# pynetdicom's client refuses empty and over-long UIDs.
BAD_UIDS = {
    "backslash_uid": "1.2.3\\4",  # the value separator: would make it two UIDs
    "nul_uid": "1.2\x003.4",       # NUL inside the value, not as the trailing pad
    "long_uid": "1.2." + "3" * 70,  # 74 characters
    "letters_uid": "1.2.abc",
    "empty_uid": "",
}
CLEAN_BAD_UIDS = [v for v in BAD_UIDS.values() if v and "\x00" not in v]  # PostgreSQL text


@pytest.mark.usefixtures("chunked_send")
@pytest.mark.parametrize(("case", "expected"), [
    ("traversal_uid", statuses.INVALID_UID),
    ("slash_uid", statuses.INVALID_UID),
    ("newline_uid", statuses.INVALID_UID),  # would forge a log line, or a second UID
    ("missing_study_uid", statuses.INVALID_UID),
    ("uid_mismatch", statuses.DATASET_DOES_NOT_MATCH),
    ("truncated", statuses.CANNOT_UNDERSTAND),
    *[(name, statuses.INVALID_UID) for name in BAD_UIDS],
    *[(name + "-in_dataset", statuses.INVALID_UID) for name in BAD_UIDS],
    # The command's Affected SOP Class UID empty (and the dataset's): once got no response
    # at all (pynetdicom ignores such a request), the SCU waiting for its DIMSE timeout.
    ("empty_class_uid", statuses.INVALID_UID),
    ("empty_class_uid-in_dataset", statuses.INVALID_UID),
    # command and context say MR, the dataset is a CT image
    ("command_class_mismatch", statuses.DATASET_DOES_NOT_MATCH),
])
def test_bad_instance_gets_a_failure_status_and_nothing_is_stored(
        stack: Stack, tmp_path: Path, case: str, expected: int) -> None:
    good_uid = uid("bad", case)
    path = instance(tmp_path, case)
    refused_before = refusals(stack)
    raw: tuple[str, str, bytes, str] | None = None  # (command class, instance, dataset, context)
    name, _, where = case.partition("-")
    if name in BAD_UIDS:
        bad = BAD_UIDS[name]
        dataset = set_value(dataset_of(path), SOP_INSTANCE_UID, bad.encode("ascii"))
        raw = (CT_IMAGE, good_uid if where else bad, dataset, CT_IMAGE)
    elif name == "empty_class_uid":
        raw = (CT_IMAGE if where else "", good_uid,
               set_value(dataset_of(path), SOP_CLASS_UID, b""), CT_IMAGE)
    elif case == "command_class_mismatch":
        raw = (MR_IMAGE, good_uid, dataset_of(path), MR_IMAGE)
    if case == "traversal_uid":
        rewrite(path, meta_uid="../../x", dataset_uid="../../x")
    elif case == "slash_uid":
        rewrite(path, meta_uid="1.2/3", dataset_uid="1.2/3")
    elif case == "newline_uid":  # pydicom would clean it: the bytes are edited instead
        rewrite(path, meta_uid="1.2.3.4", dataset_uid="1.2.3.4")
        path.write_bytes(path.read_bytes().replace(b"1.2.3.4\x00", b"1.2.3.4\n"))
    elif case == "missing_study_uid":
        path = instance(tmp_path, case, study_uid="")
    elif case == "uid_mismatch":
        rewrite(path, meta_uid=good_uid + ".1")
    elif case == "truncated":
        path.write_bytes(path.read_bytes()[:-100])
    status = send_file(stack, path) if raw is None else store_raw(stack, *raw)
    assert status == expected, f"0x{status:04X}" if status is not None else "no response"
    assert nothing_stored(stack, good_uid, good_uid + ".1", "../../x", "1.2/3", "1.2.3.4\n",
                          "1.2.3.4", *CLEAN_BAD_UIDS)
    assert refusals(stack) == refused_before + 1  # one refusal logged, for this one
    # ...and the gateway keeps serving.
    ok = instance(tmp_path, case + "-after", sop_uid=uid("bad", case, "after"))
    assert send_file(stack, ok) == statuses.SUCCESS


def test_nothing_stored_also_looks_in_s3(stack: Stack, tmp_path: Path) -> None:
    """The check the tests here end with sees an object that holds the UID but that no row
    points at (what storage would leave if the index refused the instance after the upload)."""
    sop = uid("bad", "unindexed-object")
    data = instance(tmp_path, "unindexed-object", sop_uid=sop).read_bytes()
    key = object_key(hashlib.sha256(data).hexdigest())
    client = s3_client(stack)
    client.put_object("minipacs", key, BytesIO(data), len(data))
    try:
        assert not nothing_stored(stack, sop)
    finally:
        client.remove_object("minipacs", key)
    assert nothing_stored(stack, sop)


def echo(stack: Stack, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([dcmtk("echoscu"), "-v", *args, "127.0.0.1",
                           str(stack.config.gateway_port)], capture_output=True, text=True,
                          env=dcmtk_env(), timeout=60)


def test_wrong_called_ae_title_is_rejected(stack: Stack) -> None:
    proc = echo(stack, "-aec", "NOTUS")
    assert proc.returncode != 0
    assert "Called AE Title Not Recognized" in proc.stderr + proc.stdout
    assert "called AE title 'NOTUS' is not ours" in stack.log_text("gateway")


def test_unknown_calling_ae_title_is_rejected(stack: Stack, tmp_path: Path) -> None:
    proc = echo(stack, "-aec", "MINIPACS", "-aet", "INTRUDER")
    assert proc.returncode != 0
    assert "Calling AE Title Not Recognized" in proc.stderr + proc.stdout
    path = instance(tmp_path, "intruder")
    result = storescu(stack.config.gateway_port, [path], aet="INTRUDER")
    assert result.successes == 0
    assert nothing_stored(stack, uid("bad", "intruder"))


def test_a_node_that_may_not_store_gets_not_authorized(stack: Stack, tmp_path: Path) -> None:
    assert echo(stack, "-aec", "MINIPACS", "-aet", "READONLY").returncode == 0  # echo allowed
    path = instance(tmp_path, "readonly")
    result = storescu(stack.config.gateway_port, [path], aet="READONLY")
    assert result.successes == 0 and result.failures == 1, result.output[-1000:]
    assert "READONLY@127.0.0.1 may not store" in stack.log_text("gateway")
    assert nothing_stored(stack, uid("bad", "readonly"))


def test_known_ae_title_from_another_host_is_rejected(stack: Stack) -> None:
    proc = echo(stack, "-aec", "MINIPACS", "-aet", "ELSEWHERE")
    assert proc.returncode != 0
    assert "known, but not from 127.0.0.1" in stack.log_text("gateway")


def test_garbage_bytes_are_dropped_and_the_gateway_keeps_serving(stack: Stack) -> None:
    with socket.create_connection(("127.0.0.1", stack.config.gateway_port), timeout=30) as s:
        s.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n" + b"\xff" * 1000)
        s.settimeout(30)
        try:
            while s.recv(4096):
                pass
        except (ConnectionResetError, TimeoutError):
            pass
    assert echo(stack, "-aec", "MINIPACS").returncode == 0


def test_an_event_the_index_refuses_is_dead_lettered_and_its_neighbours_indexed(
        private_stack: Stack) -> None:
    """RELIABILITY, "poison contained", at the indexer: one ``instance.stored`` message of
    three events, one of which PostgreSQL refuses. That message is parked in the indexer's
    dead-letter queue (visible, replayable), its two other events are indexed, and the queue
    goes on draining. No gateway sends such an event (the NUL is in a UID it validates; NULs
    in header text are dropped): it stands for whatever the index may one day refuse."""
    stack = private_stack  # its own dead-letter queue, left with the poisoned message

    def event(n: int, sop: str) -> InstanceStored:
        sha = hashlib.sha256(f"index-poison {n}".encode()).hexdigest()
        return InstanceStored(
            sop_instance_uid=sop, sop_class_uid=CT_IMAGE, study_instance_uid=uid("ipoison", "st"),
            series_instance_uid=uid("ipoison", "se"), transfer_syntax="1.2.840.10008.1.2.1",
            size=100, sha256=sha, object_key=f"instances/{sha[:2]}/{sha}.dcm",
            calling_aet="POISONSCU", received_at="2026-12-07T20:00:00+00:00",
            header={"00100020": {"vr": "LO", "Value": ["IPOISON"]}})

    good = [uid("ipoison", 0), uid("ipoison", 2)]
    events = [event(0, good[0]), event(1, "1.2.3\x004"), event(2, good[1])]

    async def publish() -> None:
        conn = await broker.connect(stack.env["MINIPACS_AMQP_URL"], 10, name="test-poison")
        try:
            pub = broker.Publisher(conn, 10)
            await pub.open()
            await pub.publish_body(batch_body(events), InstanceStored.routing_key)
        finally:
            await conn.close()

    asyncio.run(publish())

    def indexed() -> set[str]:
        rows = pg(dsn(stack), "SELECT sop_instance_uid FROM instance WHERE sop_instance_uid = "
                  "ANY($1::text[])", good)
        return {r["sop_instance_uid"] for r in rows}

    def parked() -> int:
        out = subprocess.run(["rabbitmqctl", "-q", "list_queues", "-p", stack.config.vhost,
                              "name", "messages", "--no-table-headers"], capture_output=True,
                             text=True, check=True).stdout
        counts = dict(line.split() for line in out.splitlines() if line.strip())
        return int(counts.get(topology.INDEXER.dead_letter_queue, "0"))

    wait_until(lambda: indexed() == set(good) and parked() == 1, timeout=60,
               what="the two good events indexed, the message parked")
    log = stack.log_text("indexer")
    assert f"the index refuses obj={events[1].sha256[:12]}" in log
    assert "dead-lettering a message of 3 events, 1 refused (the others are indexed)" in log
    # the queue keeps draining: an instance sent afterwards is indexed
    later = make_instance(stack.config.base_dir / "later.dcm", sop_class=CT_IMAGE,
                          sop_uid=uid("ipoison", "later"), study_uid=uid("ipoison", "st2"),
                          series_uid=uid("ipoison", "se2"), patient_id="IPOISON",
                          patient_name="Later^Name", rows=8, cols=8, modality="CT",
                          instance_number=1)
    assert storescu(stack.config.gateway_port, [later]).successes == 1
    wait_until(lambda: pg(dsn(stack), "SELECT 1 FROM instance WHERE sop_instance_uid = $1",
                          uid("ipoison", "later")), timeout=60, what="a later instance indexed")


def test_association_limit_and_silent_connections(tmp_path: Path) -> None:
    """RELIABILITY: more associations than the limit are rejected as transient (the modality
    retries) while those running go on; a connection that never associates is closed after
    the ACSE timeout and its slot is free again."""
    from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

    stack = make_stack(tmp_path, "limit", MINIPACS_MAX_ASSOCIATIONS="2",
                       MINIPACS_ACSE_TIMEOUT="3")
    stack.start()
    try:
        port = stack.config.gateway_port
        ae = AE(ae_title="TESTSCU")
        ae.add_requested_context(Verification)
        ae.acse_timeout = 10
        held: list[Any] = []

        def two_held() -> bool:
            """Both slots free: pynetdicom counts every connection's thread, and the start-up
            readiness probe's may still be winding down."""
            pair = [ae.associate("127.0.0.1", port, ae_title="MINIPACS") for _ in range(2)]
            if all(a.is_established for a in pair):
                held.extend(pair)
                return True
            for a in pair:
                if a.is_established:
                    a.release()
            return False

        wait_until(two_held, 30, what="two associations held at once")
        first, second = held
        third = ae.associate("127.0.0.1", port, ae_title="MINIPACS")
        assert third.is_rejected and third.acceptor.primitive is not None
        assert third.acceptor.primitive.result == 0x02  # rejected-transient
        assert first.send_c_echo().Status == 0x0000  # the running ones are unaffected
        assert second.send_c_echo().Status == 0x0000
        first.release()
        second.release()
        held.clear()
        # connections that never send an A-ASSOCIATE-RQ, as many as the limit: the gateway
        # closes them, and then both slots are free again (a leaked slot would leave at most
        # one association possible, and ``two_held`` would never succeed)
        silent = [socket.create_connection(("127.0.0.1", port), timeout=30) for _ in range(2)]
        try:
            for s in silent:
                assert s.recv(1) == b""  # the gateway closed it (ACSE timeout 3 s)
        finally:
            for s in silent:
                s.close()
        wait_until(two_held, 30, what="two associations held at once after the silent ones")
        for a in held:
            assert a.send_c_echo().Status == 0x0000
            a.release()
        assert "rejected (association limit 2" in stack.log_text("gateway")
    finally:
        teardown(stack)


# ---- 1. a patient ID like a path ---------------------------------------------------------------

CONTENT_KEY = re.compile(r"instances/([0-9a-f]{2})/([0-9a-f]{64})\.dcm")


def test_a_patient_id_like_a_path_is_stored_under_a_content_key(stack: Stack,
                                                                 tmp_path: Path) -> None:
    """PatientID "../../.." with valid UIDs is an ordinary instance: stored and indexed with
    that patient ID as data, its object key built from the content hash only, no object
    anywhere in the bucket with ".." in its key."""
    sop = uid("bad", "dotdot-patient")
    path = instance(tmp_path, "dotdot-patient", sop_uid=sop, patient_id="../../..",
                    study_uid=uid("bad", "dotdot-study"), series_uid=uid("bad", "dotdot-se"))
    assert send_file(stack, path) == statuses.SUCCESS
    rows = wait_until(lambda: pg(
        dsn(stack), "SELECT i.object_key, i.sha256, i.size, p.patient_id FROM instance i "
        "JOIN series se ON se.id = i.series_fk JOIN study st ON st.id = se.study_fk "
        "JOIN patient p ON p.id = st.patient_fk WHERE i.sop_instance_uid = $1", sop), 60,
        what="the instance indexed")
    assert len(rows) == 1
    row = rows[0]
    assert row["patient_id"] == "../../.."  # kept as data...
    key = row["object_key"]
    match = CONTENT_KEY.fullmatch(key)  # ...never in the key
    assert match, key
    assert match.group(2) == row["sha256"] and match.group(1) == row["sha256"][:2]
    assert ".." not in key and "../../.." not in key
    client = s3_client(stack)
    data = s3_read(client, "minipacs", key)
    assert hashlib.sha256(data).hexdigest() == row["sha256"] and len(data) == row["size"]
    assert dataset_of_bytes(data) == dataset_of(path)
    escaped = [o.object_name for o in client.list_objects("minipacs", recursive=True)
               if ".." in (o.object_name or "")]
    assert escaped == []


def dataset_of_bytes(raw: bytes) -> bytes:
    return raw[wire.dataset_offset(raw):]


# ---- 2. element lengths ------------------------------------------------------------------------

@pytest.mark.parametrize(("case", "expected"), [
    # PatientName (a short VR) declares 0xFFF0 bytes: it would run 60 KB past the end
    ("name_overruns", statuses.CANNOT_UNDERSTAND),
    # the same from Rows, after every UID we key on: pydicom reads the bytes there are without
    # a word, and this one used to be stored with Success
    ("rows_overrun", statuses.CANNOT_UNDERSTAND),
    # Pixel Data declares 2 GiB over the 512 bytes sent: refused, never allocated
    ("pixels_overrun", statuses.CANNOT_UNDERSTAND),
    # a zero-byte dataset: no SOP Class / Instance UID in it (0xC001 is in the 0xCxxx
    # "cannot understand" range PS3.4 gives C-STORE)
    ("zero_bytes", statuses.INVALID_UID),
])
def test_bad_element_lengths_get_a_failure_status_and_nothing_is_stored(
        stack: Stack, tmp_path: Path, case: str, expected: int) -> None:
    sop = uid("bad", case)
    dataset = dataset_of(instance(tmp_path, case, sop_uid=sop))
    if case == "name_overruns":
        dataset = set_value(dataset, PATIENT_NAME, length=0xFFF0)
    elif case == "rows_overrun":
        dataset = set_value(dataset, ROWS, length=0xFFF0)
    elif case == "pixels_overrun":
        dataset = set_value(dataset, PIXEL_DATA, length=0x80000000)
    elif case == "zero_bytes":
        dataset = b""
    refused_before = refusals(stack)
    status = store_raw(stack, CT_IMAGE, sop, dataset)
    assert status == expected, f"0x{status:04X}" if status is not None else "no response"
    assert refusals(stack) == refused_before + 1
    assert nothing_stored(stack, sop)
    ok = instance(tmp_path, case + "-after", sop_uid=uid("bad", case, "after"))
    assert send_file(stack, ok) == statuses.SUCCESS


def test_an_odd_element_length_is_stored_as_received(stack: Stack, tmp_path: Path) -> None:
    """PS3.5 7.1.1 wants every value length even; PatientID here is "ODD" with length 3 (no
    pad). The gateway does not check parity: its structural walk only proves each element
    lies inside the bytes received, which this one does, and it never re-encodes. So the
    instance is acknowledged, stored byte for byte as sent (the odd length kept) and indexed
    with the value pydicom reads, "ODD"."""
    sop = uid("bad", "odd-length")
    path = instance(tmp_path, "odd-length", sop_uid=sop, study_uid=uid("bad", "odd-study"),
                    series_uid=uid("bad", "odd-se"))
    dataset = set_value(dataset_of(path), PATIENT_ID, b"ODD")
    assert b"\x10\x00\x20\x00LO\x03\x00ODD" in dataset  # really odd on the wire
    assert store_raw(stack, CT_IMAGE, sop, dataset) == statuses.SUCCESS
    rows = wait_until(lambda: pg(
        dsn(stack), "SELECT i.object_key, p.patient_id FROM instance i JOIN series se ON "
        "se.id = i.series_fk JOIN study st ON st.id = se.study_fk JOIN patient p ON "
        "p.id = st.patient_fk WHERE i.sop_instance_uid = $1", sop), 60,
        what="the instance indexed")
    assert rows[0]["patient_id"] == "ODD"
    assert dataset_of_bytes(s3_read(s3_client(stack), "minipacs", rows[0]["object_key"])) \
        == dataset


@pytest.mark.filterwarnings("ignore:Invalid value for VR UI")  # our client reads the echo
@pytest.mark.parametrize("where", ["instance", "class"])
def test_a_non_ascii_uid_in_the_command_is_refused_and_the_association_serves_on(
        stack: Stack, tmp_path: Path, where: str) -> None:
    """Bytes outside ASCII in the command's Affected SOP Instance (or Class) UID: 0xC001, the
    UIDs echoed as sent, a WARNING naming the caller, no spool file left; the next C-STORE on
    the same association succeeds. (It used to abort the association with a traceback, its
    empty spool file left in incoming/ for the sweeper.)"""
    text = assert_non_ascii_uid_refused(stack, tmp_path, where)
    name = "Instance" if where == "instance" else "Class"
    assert re.search(rf"WARNING .*C-STORE from TESTSCU@127\.0\.0\.1 refused -> 0xC001 "
                     rf"invalid uid: the command's Affected SOP {name} UID holds a non-ASCII "
                     rf"byte \(0x(C3|E9) at position \d+ of \d+\)", text), text


@pytest.mark.filterwarnings("ignore:Invalid value for VR UI")
def test_a_non_ascii_uid_in_the_command_is_refused_at_trace_level_too(tmp_path: Path) -> None:
    """At TRACE pynetdicom receives every C-STORE (to dump it): the same request failed there
    too, encoding the file meta group and then the response."""
    stack = make_stack(tmp_path, "latin_trace", MINIPACS_LOG_LEVEL="TRACE")
    try:
        stack.start()
        assert_non_ascii_uid_refused(stack, tmp_path, "instance")
    finally:
        teardown(stack)


def assert_non_ascii_uid_refused(stack: Stack, tmp_path: Path, where: str) -> str:
    """The checks of the two tests above; the gateway's log meanwhile."""
    sop = uid("bad", "latin", where)
    path = instance(tmp_path, f"latin-{where}", sop_uid=sop)
    bad = sop.encode("ascii") + b".\xc3\xa9"  # "é" in UTF-8
    sop_class = CT_IMAGE.encode("ascii")
    if where == "class":
        sop_class, bad = sop_class + b".\xe9", sop.encode("ascii")  # "é" in Latin-1
    command = wire.command_set([
        (0x0002, sop_class + b"\0" * (len(sop_class) % 2)),
        (0x0100, struct.pack("<H", wire.C_STORE_RQ)), (0x0110, struct.pack("<H", 7)),
        (0x0700, struct.pack("<H", 2)), (0x0800, struct.pack("<H", 1)),
        (0x1000, bad + b"\0" * (len(bad) % 2))])
    incoming = Path(stack.config.base_dir) / "spool" / "incoming"
    log_before = len(stack.log_text("gateway"))
    ok = instance(tmp_path, f"latin-{where}-after", sop_uid=uid("bad", "latin", where, "after"))
    ae = AE(ae_title="TESTSCU")
    ae.add_requested_context(CT_IMAGE, TS)
    ae.dimse_timeout = 30
    assoc = ae.associate("127.0.0.1", stack.config.gateway_port, ae_title="MINIPACS")
    assert assoc.is_established
    try:
        with pytest.MonkeyPatch.context() as mp:
            mp.setitem(_config.VALIDATORS, "UI", lambda _uid: (True, ""))
            cx = assoc.accepted_contexts[0].context_id
            assert cx is not None
            status = send_command(assoc, cx, command, dataset_of(path))
        assert status == statuses.INVALID_UID, status
        assert not list(incoming.iterdir())  # nothing spooled for it, nothing left behind
        assert assoc.is_established
        assert int(assoc.send_c_store(ok).Status) == statuses.SUCCESS
    finally:
        if assoc.is_established:
            assoc.release()
    text = stack.log_text("gateway")[log_before:]
    assert re.search(r"WARNING .*C-STORE from TESTSCU@127\.0\.0\.1 refused -> 0xC001", text)
    assert "Traceback" not in text and "aborted" not in text, text
    assert nothing_stored(stack, sop)
    return text


# ---- 3. SOP classes ----------------------------------------------------------------------------

def test_a_c_store_of_another_sop_class_on_an_accepted_context_is_refused(
        stack: Stack, tmp_path: Path) -> None:
    """An MR image (command and dataset agree) sent on the presentation context accepted for
    CT: 0x0122, not stored. (It used to be stored with Success: the gateway's reader left it
    to pynetdicom, which serves a C-STORE by its command's SOP class whatever the context.)"""
    sop = uid("bad", "off-context")
    dataset = dataset_of(instance(tmp_path, "off-context", sop_uid=sop, sop_class=MR_IMAGE))
    refused_before = refusals(stack)
    assert store_raw(stack, MR_IMAGE, sop, dataset, context=CT_IMAGE) == \
        statuses.SOP_CLASS_NOT_SUPPORTED
    assert refusals(stack) == refused_before + 1
    assert nothing_stored(stack, sop)
    ok = instance(tmp_path, "off-context-after", sop_uid=uid("bad", "off-context", "after"))
    assert send_file(stack, ok) == statuses.SUCCESS


MADE_UP_CLASS = "1.2.3.4.5.6.7"


def test_an_unsupported_sop_class_is_rejected_at_association(stack: Stack,
                                                             tmp_path: Path) -> None:
    """A made-up SOP class: its presentation context is rejected (result 3, abstract syntax
    not supported) while the CT one beside it is accepted; a C-STORE sent on the rejected
    context anyway aborts the association, with a log line saying why and from whom, nothing
    is stored and nothing is left in the spool's staging folder."""
    incoming = Path(stack.config.base_dir) / "spool" / "incoming"
    staged_before = set(incoming.iterdir())
    sop = uid("bad", "made-up-class")
    dataset = dataset_of(instance(tmp_path, "made-up-class", sop_uid=sop,
                                  sop_class=MADE_UP_CLASS))
    ae = AE(ae_title="TESTSCU")
    ae.add_requested_context(MADE_UP_CLASS, TS)
    ae.add_requested_context(CT_IMAGE, TS)
    assoc = ae.associate("127.0.0.1", stack.config.gateway_port, ae_title="MINIPACS")
    assert assoc.is_established
    try:
        rejected = {str(cx.abstract_syntax): cx for cx in assoc.rejected_contexts}
        accepted = {str(cx.abstract_syntax) for cx in assoc.accepted_contexts}
        assert set(rejected) == {MADE_UP_CLASS} and accepted == {CT_IMAGE}
        assert rejected[MADE_UP_CLASS].result == 0x03  # abstract syntax not supported
        with pytest.raises(ValueError, match="No presentation context"):
            assoc.send_c_store(instance(tmp_path, "made-up-class-2",
                                        sop_uid=uid("bad", "made-up-class", 2),
                                        sop_class=MADE_UP_CLASS))
        cx = rejected[MADE_UP_CLASS].context_id
        assert cx is not None
        sock = assoc.dul.socket.socket  # type: ignore[union-attr]
        assert sock is not None
        sock.sendall(pdv(cx, 0x03, wire.c_store_rq(1, MADE_UP_CLASS, sop))
                     + pdv(cx, 0x02, dataset))
        wait_until(lambda: assoc.is_aborted, 30, what="the gateway aborting the association")
    finally:
        if assoc.is_established:
            assoc.release()
    wait_until(lambda: f"TESTSCU@127.0.0.1: C-STORE on presentation context {cx}, which was "
               "not accepted: aborting" in stack.log_text("gateway"), 10,
               what="the abort logged with its reason")
    assert nothing_stored(stack, sop)
    assert set(incoming.iterdir()) - staged_before == set()
    ok = instance(tmp_path, "made-up-class-after", sop_uid=uid("bad", "made-up-class", "a"))
    assert send_file(stack, ok) == statuses.SUCCESS


# ---- 4. protocol garbage -----------------------------------------------------------------------

def _item(kind: int, value: bytes) -> bytes:
    return struct.pack(">BBH", kind, 0, len(value)) + value


def associate_rq(calling: str = "TESTSCU", called: str = "MINIPACS", *,
                 propose: bool = True, abstract: str = "1.2.840.10008.1.1") -> bytes:
    """A well-formed A-ASSOCIATE-RQ PDU (PS3.8 9.3.2) proposing ``abstract`` (Verification)
    in Implicit VR Little Endian as context 1 (or, without ``propose``, no presentation
    context at all)."""
    context = _item(0x20, bytes([1, 0, 0, 0]) + _item(0x30, abstract.encode())
                    + _item(0x40, b"1.2.840.10008.1.2")) if propose else b""
    body = (struct.pack(">HH", 1, 0) + called.encode().ljust(16) + calling.encode().ljust(16)
            + bytes(32) + _item(0x10, b"1.2.840.10008.3.1.1.1") + context
            + _item(0x50, _item(0x51, struct.pack(">L", 16384))))
    return struct.pack(">BBL", 0x01, 0, len(body)) + body


def _relength(pdu: bytes) -> bytes:
    """``pdu`` with its length field telling the truth about its (cut) body."""
    return pdu[:2] + struct.pack(">L", len(pdu) - 6) + pdu[6:]


def until_closed(s: socket.socket, why_open: str) -> bytes:
    """What the gateway sends until it closes the connection; a test failure (``why_open``)
    if it is still open when the socket's timeout passes."""
    received = b""
    try:
        while chunk := s.recv(65536):
            received += chunk
    except ConnectionResetError:
        pass
    except TimeoutError:
        pytest.fail(f"{why_open}, and the connection still open")
    return received


def send_until_closed(s: socket.socket, piece: bytes, most: int) -> int:
    """Sends ``piece`` again and again, up to ``most`` bytes or until the gateway hangs up;
    the bytes sent."""
    sent = 0
    try:
        while sent < most:
            s.sendall(piece)
            sent += len(piece)
    except (BrokenPipeError, ConnectionResetError):
        pass
    return sent


GARBAGE = {
    # the PDU declares its full length, the peer sends 40 bytes of it and waits
    "truncated_associate_rq": associate_rq()[:40],
    # the PDU's length matches what is sent, but it ends inside the presentation context
    "associate_rq_cut_inside_an_item": _relength(associate_rq()[:90]),
    # no such PDU type (PS3.8 9.3.1 defines 0x01-0x07), with a 4-byte body
    "unknown_pdu_type_08": b"\x08\x00" + struct.pack(">L", 4) + b"\x00" * 4,
}
A_ABORT = b"\x07\x00\x00\x00\x00\x04"
CLIENT_PATIENCE = 10.0  # s: well below DCMTK's and pynetdicom's 30 s


def test_protocol_garbage_is_closed_within_the_acse_timeout(tmp_path: Path) -> None:
    """RELIABILITY: a truncated A-ASSOCIATE-RQ or an unknown PDU type is aborted / closed
    within the ACSE timeout (3 s on this stack; the network timeout stays at its 60 s
    default), so the connection and its slot come back long before an SCU would give up.
    pynetdicom checks that timer between PDUs only: a PDU stopping half-way (the truncated
    request, or the unknown PDU's body it reads as the next header) used to be held until
    the network timeout. After each, the gateway answers an echo."""
    stack = make_stack(tmp_path, "garbage", MINIPACS_ACSE_TIMEOUT="3")
    stack.start()
    try:
        assert stack.log_text("gateway").count("'network_timeout': 60.0") == 1
        port = stack.config.gateway_port
        for name, garbage in GARBAGE.items():
            started = time.monotonic()
            with socket.create_connection(("127.0.0.1", port), timeout=CLIENT_PATIENCE) as s:
                s.sendall(garbage)
                received = until_closed(s, f"{name}: {CLIENT_PATIENCE} s passed")
            took = time.monotonic() - started
            assert took < CLIENT_PATIENCE, name
            if name != "truncated_associate_rq":  # (that one is only closed: nothing to abort)
                assert received.startswith(A_ABORT), (name, received[:20].hex())
            proc = echo(stack, "-aec", "MINIPACS")
            assert proc.returncode == 0, (name, proc.stdout + proc.stderr)
        assert re.search(r"connection from 127\.0\.0\.1:\d+: unknown PDU type 0x08: aborting",
                         stack.log_text("gateway"))
    finally:
        teardown(stack)


def test_a_pdu_declaring_gigabytes_before_any_association_is_refused_unread(
        stack: Stack) -> None:
    """RELIABILITY: a PDU longer than allowed is aborted, with no allocation of the declared
    length. Before any association nothing is negotiated, and pynetdicom read whatever an
    A-ASSOCIATE-RQ header declared: one connection declaring 4 GiB and sending 256 MiB grew
    the gateway by 256 MiB (512 MiB in a second, by hand), so a few anonymous connections
    could exhaust its memory. Now a PDU over ``ASSOCIATE_PDU_MAX`` before the association
    gets an A-ABORT unread, what follows is dropped in small pieces, and the gateway serves
    the next association."""
    gateway = psutil.Process(stack.procs["gateway"].pid)
    rss_before = gateway.memory_info().rss
    with socket.create_connection(("127.0.0.1", stack.config.gateway_port),
                                  timeout=CLIENT_PATIENCE) as s:
        s.sendall(struct.pack(">BBL", 0x01, 0, 0xFFFFFFF0))  # an A-ASSOCIATE-RQ of 4 GiB
        sent = send_until_closed(s, b"\x00" * 2**20, 256 * 2**20)
        grew = (gateway.memory_info().rss - rss_before) / 2**20
        received = until_closed(s, f"{sent} bytes sent")
    print(f"\n{sent / 2**20:.0f} MiB sent after the header; gateway RSS grew {grew:.1f} MiB")
    assert received.startswith(A_ABORT), received[:20].hex()
    assert grew < 64, f"the gateway grew by {grew:.0f} MiB for {sent / 2**20:.0f} MiB sent"
    assert re.search(r"connection from 127\.0\.0\.1:\d+: PDU type 0x01 of 4294967280 bytes, "
                     rf"over the {receive.ASSOCIATE_PDU_MAX} accepted before an association: "
                     "aborting", stack.log_text("gateway"))
    assert echo(stack, "-aec", "MINIPACS").returncode == 0


def test_an_association_proposing_no_presentation_context_is_rejected(stack: Stack) -> None:
    """PS3.8 9.3.2: an A-ASSOCIATE-RQ carries one or more presentation contexts. One without
    any gets A-ASSOCIATE-RJ (permanent, service user, no reason given) and a log line saying
    why, instead of an association on which nothing can be done."""
    before = stack.log_text("gateway").count("no presentation context proposed")
    received = b""
    with socket.create_connection(("127.0.0.1", stack.config.gateway_port),
                                  timeout=CLIENT_PATIENCE) as s:
        s.sendall(associate_rq(propose=False))
        while len(received) < 10 and (chunk := s.recv(4096)):
            received += chunk
    assert received[:1] == b"\x03", received[:20].hex()  # A-ASSOCIATE-RJ
    assert received[7:10] == bytes(REJECT_NO_CONTEXT), received[:10].hex()
    wait_until(lambda: stack.log_text("gateway").count(
        "association rejected: no presentation context proposed") == before + 1, 10,
        what="the rejection logged")
    assert echo(stack, "-aec", "MINIPACS").returncode == 0


# ---- 5. a request too large to hold ------------------------------------------------------------

STUDY_ROOT_FIND = "1.2.840.10008.5.1.4.1.2.2.1"
FRAGMENT = 256 * 1024


def _c_find_rq() -> bytes:
    return wire.command_set([(0x0002, STUDY_ROOT_FIND.encode() + b"\x00"),
                             (0x0100, struct.pack("<H", 0x0020)),
                             (0x0110, struct.pack("<H", 1)), (0x0700, struct.pack("<H", 0)),
                             (0x0800, struct.pack("<H", 0x0000))])


@pytest.mark.parametrize("part", ["identifier", "command"])
def test_a_request_too_large_to_hold_is_aborted(stack: Stack, part: str) -> None:
    """RELIABILITY: hostile input is refused with bounded memory. pynetdicom keeps every
    fragment of a DIMSE message other than a C-STORE dataset in memory until its last one, so
    a C-FIND identifier (or a command set) that never ends grew the gateway without limit. The
    gateway now aborts the association once one message passes what it holds for a request
    (``wire.MESSAGE_MAX``, ``wire.COMMAND_MAX``), logs what and from whom, and keeps serving."""
    assert_endless_request_aborted(stack, part)


def assert_endless_request_aborted(stack: Stack, part: str) -> None:
    """Sends a C-FIND whose identifier (``part`` "identifier") or command set ("command")
    never ends; checks the A-ABORT, the log line and that the gateway answers an echo."""
    limit = wire.MESSAGE_MAX if part == "identifier" else wire.COMMAND_MAX
    gateway = psutil.Process(stack.procs["gateway"].pid)
    rss_before = gateway.memory_info().rss
    with socket.create_connection(("127.0.0.1", stack.config.gateway_port),
                                  timeout=CLIENT_PATIENCE) as s:
        s.sendall(associate_rq(abstract=STUDY_ROOT_FIND))
        reply = s.recv(4096)
        assert reply[:1] == b"\x02", reply[:20].hex()  # A-ASSOCIATE-AC
        if part == "identifier":
            s.sendall(pdv(1, 0x03, _c_find_rq()))  # the whole command, then endless data
        control = 0x00 if part == "identifier" else 0x01  # never the last fragment
        # until the gateway hangs up, or 4 times what it may hold (and more than the socket
        # buffers can swallow): the old gateway took it all, and then waited
        fragment = pdv(1, control, b"\x00" * min(FRAGMENT, limit // 4))
        sent = send_until_closed(s, fragment, 4 * wire.MESSAGE_MAX)
        received = until_closed(s, f"{sent} bytes sent in one message")
    assert received.startswith(A_ABORT), (sent, received[:20].hex())
    kind = "a C-FIND-RQ" if part == "identifier" else "a command set"
    wait_until(lambda: f"assoc TESTSCU@127.0.0.1: {kind} of more than {limit} bytes"
               in stack.log_text("gateway"), 10, what="the abort logged with its reason")
    grew = (gateway.memory_info().rss - rss_before) / 2**20
    print(f"\n{part}: {sent / 2**20:.1f} MiB sent, aborted; gateway RSS grew "
          f"{grew:.1f} MiB")
    assert echo(stack, "-aec", "MINIPACS").returncode == 0
