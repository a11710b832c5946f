"""The gateway's own C-STORE reader (services/gateway/receive.py) against real SCUs: commands
and datasets fragmented over many small PDUs, and C-STORE mixed with the DIMSE messages it
leaves to pynetdicom on the same association."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from pydicom import dcmread, dcmwrite
from pydicom.dataset import Dataset
from pydicom.uid import UID
from pynetdicom import AE
from pynetdicom.sop_class import (  # type: ignore[attr-defined]
    StudyRootQueryRetrieveInformationModelFind,
    Verification,
)

from scripts.native import Stack
from tests.conftest import dsn, make_stack, s3_client, teardown
from tests.dicomgen import CT_IMAGE, Made, make_instance, uid
from tests.e2e.test_ingest import assert_stored_byte_identical
from tests.helpers import pg, s3_objects, s3_read, storescu, wait_until

pytestmark = pytest.mark.e2e




@pytest.fixture()
def small_pdu_stack(tmp_path: Path) -> Iterator[Stack]:
    """A gateway that accepts PDUs of 128 bytes at most: every command set (≈ 150 bytes with
    its UIDs) and every dataset arrive in several fragments."""
    stack = make_stack(tmp_path, "pdu", MINIPACS_MAX_PDU="128", MINIPACS_LOG_LEVEL="DEBUG")
    stack.start()
    yield stack
    teardown(stack)


def made(tmp: Path, tag: str, count: int) -> list[Made]:
    study, series = uid(tag, "st"), uid(tag, "se")
    out = []
    for n in range(count):
        sop = uid(tag, n)
        path = make_instance(tmp / f"{tag}{n}.dcm", sop_class=CT_IMAGE, sop_uid=sop,
                             study_uid=study, series_uid=series, patient_id=tag.upper(),
                             patient_name="Frag^Ment", rows=32, cols=32, modality="CT",
                             instance_number=n)
        out.append(Made(path=path, patient_id=tag.upper(), study_uid=study, series_uid=series,
                        sop_uid=sop))
    return out


def indexed_count(stack: Stack, sops: list[str]) -> int:
    rows = pg(dsn(stack), "SELECT count(*) AS n FROM instance WHERE sop_instance_uid = "
              "ANY($1::text[])", sops)
    return int(rows[0]["n"])


def test_fragmented_commands_and_datasets(small_pdu_stack: Stack, tmp_path: Path) -> None:
    stack = small_pdu_stack
    files = made(tmp_path, "frag", 3)
    ae = AE(ae_title="TESTSCU")
    ae.add_requested_context(CT_IMAGE)
    ae.add_requested_context(Verification)
    assoc = ae.associate("127.0.0.1", stack.config.gateway_port, ae_title="MINIPACS")
    assert assoc.is_established
    assert assoc.acceptor.maximum_length == 128
    try:
        assert assoc.send_c_echo().Status == 0x0000
        for m in files:
            assert assoc.send_c_store(dcmread(m.path)).Status == 0x0000
        assert assoc.send_c_echo().Status == 0x0000
    finally:
        assoc.release()
    # DCMTK too: it sends the command set in fragments of its own making
    sent = storescu(stack.config.gateway_port, [m.path for m in made(tmp_path, "dcmtk", 2)])
    assert sent.successes == 2, sent.output
    wait_until(lambda: indexed_count(stack, [m.sop_uid for m in files]) == 3, 60)
    assert_stored_byte_identical(stack, files)
    # all five went through the gateway's own reader, not pynetdicom's
    assert stack.log_text("gateway").count("read by the gateway's reader") == 5


def test_store_find_and_echo_share_an_association(stack: Stack, tmp_path: Path) -> None:
    files = made(tmp_path, "mixed", 4)
    ae = AE(ae_title="TESTSCU")
    ae.add_requested_context(CT_IMAGE, ["1.2.840.10008.1.2.1", "1.2.840.10008.1.2.2"])
    ae.add_requested_context(Verification)
    ae.add_requested_context(StudyRootQueryRetrieveInformationModelFind)
    assoc = ae.associate("127.0.0.1", stack.config.gateway_port, ae_title="MINIPACS")
    assert assoc.is_established
    try:
        for m in files[:2]:
            assert assoc.send_c_store(dcmread(m.path)).Status == 0x0000
        assert assoc.send_c_echo().Status == 0x0000
        wait_until(lambda: indexed_count(stack, [m.sop_uid for m in files[:2]]) == 2, 60)
        identifier = Dataset()
        identifier.QueryRetrieveLevel = "SERIES"
        identifier.StudyInstanceUID = files[0].study_uid
        identifier.SeriesInstanceUID = ""
        identifier.NumberOfSeriesRelatedInstances = ""
        answers = [ds for status, ds in assoc.send_c_find(
            identifier, StudyRootQueryRetrieveInformationModelFind) if status.Status == 0xFF00]
        assert len(answers) == 1
        assert answers[0] is not None
        assert int(answers[0].NumberOfSeriesRelatedInstances) == 2
        for m in files[2:]:  # and C-STORE again after pynetdicom's messages
            assert assoc.send_c_store(dcmread(m.path)).Status == 0x0000
    finally:
        assoc.release()
    wait_until(lambda: indexed_count(stack, [m.sop_uid for m in files]) == 4, 60)
    assert_stored_byte_identical(stack, files)


def test_a_c_store_cut_off_mid_dataset_leaves_nothing_behind(stack: Stack,
                                                             tmp_path: Path) -> None:
    """Command and half the dataset, then an A-ABORT: no spool file is left, nothing is
    stored or indexed, and the gateway keeps serving. "Nothing indexed" is checked behind a
    barrier: a good instance sent after the abort has gone all the way through (gateway,
    storage, indexer), so a late publish of the aborted one would have been indexed too."""
    import struct

    from shared import dimse_wire as wire

    m, good = made(tmp_path, "cut", 2)
    client = s3_client(stack)
    objects_before = set(s3_objects(client, "minipacs"))
    raw = m.path.read_bytes()
    dataset = raw[wire.dataset_offset(raw):]
    ae = AE(ae_title="TESTSCU")
    ae.add_requested_context(CT_IMAGE, "1.2.840.10008.1.2.1")
    ae.add_requested_context(Verification)
    assoc = ae.associate("127.0.0.1", stack.config.gateway_port, ae_title="MINIPACS")
    assert assoc.is_established
    cx = next(c.context_id for c in assoc.accepted_contexts if c.abstract_syntax == CT_IMAGE)

    def pdv(control: int, data: bytes) -> bytes:
        return struct.pack(">BBLLBB", wire.P_DATA_TF, 0, len(data) + 6, len(data) + 2, cx,
                           control) + data

    leftovers = set((Path(stack.config.base_dir) / "spool" / "incoming").iterdir())
    dropped = stack.log_text("gateway").count("partial dataset dropped")
    assert assoc.dul.socket is not None
    sock = assoc.dul.socket.socket
    assert sock is not None
    sock.sendall(pdv(0x03, wire.c_store_rq(7, CT_IMAGE, m.sop_uid)))
    sock.sendall(pdv(0x00, dataset[: len(dataset) // 2]))  # not the last fragment
    incoming = Path(stack.config.base_dir) / "spool" / "incoming"
    # (the stack is shared: other tests' leftovers, which the sweeper removes later, may be
    # there; this test looks at its own file and log line only)
    ours = wait_until(lambda: set(incoming.iterdir()) - leftovers, 30,
                      what="the gateway receiving the dataset")
    assoc.abort()
    wait_until(lambda: stack.log_text("gateway").count("partial dataset dropped") > dropped,
               30, what="the gateway dropping the partial dataset")
    assert not any(p.exists() for p in ours)
    again = ae.associate("127.0.0.1", stack.config.gateway_port, ae_title="MINIPACS")
    assert again.is_established
    assert again.send_c_echo().Status == 0x0000
    again.release()
    # the barrier: one good instance after the abort, waited for until it is indexed
    sent = storescu(stack.config.gateway_port, [good.path])
    assert sent.successes == 1, sent.output[-1500:]
    wait_until(lambda: indexed_count(stack, [good.sop_uid]) == 1, 60,
               what="the instance sent after the abort indexed")
    assert indexed_count(stack, [m.sop_uid]) == 0
    good_key = pg(dsn(stack), "SELECT object_key FROM instance WHERE sop_instance_uid = $1",
                  good.sop_uid)[0]["object_key"]
    new_objects = set(s3_objects(client, "minipacs")) - objects_before
    assert good_key in new_objects
    for key in new_objects:  # whatever else arrived meanwhile, none is the aborted instance
        assert m.sop_uid.encode() not in s3_read(client, "minipacs", key), key


TRANSFER_SYNTAXES = {
    "implicit-le": "1.2.840.10008.1.2",
    "explicit-be": "1.2.840.10008.1.2.2",
    "deflated": "1.2.840.10008.1.2.1.99",
    "jpeg-baseline": "1.2.840.10008.1.2.4.50",
    "jpeg-lossless": "1.2.840.10008.1.2.4.70",
    "jpeg-ls": "1.2.840.10008.1.2.4.80",
    "jpeg-2000": "1.2.840.10008.1.2.4.90",
    "rle": "1.2.840.10008.1.2.5",
}


def encode_as(source: Path, target: Path, ts: str) -> Path:
    """``source`` re-encoded in ``ts``. Compressed syntaxes get encapsulated fragments of
    made-up bytes: the gateway stores what it receives and never decodes pixel data."""
    from pydicom.encaps import encapsulate

    ds = dcmread(source)
    ds.file_meta.TransferSyntaxUID = UID(ts)
    if ts not in ("1.2.840.10008.1.2", "1.2.840.10008.1.2.2", "1.2.840.10008.1.2.1.99"):
        ds.PixelData = encapsulate([b"\xff\xd8" + bytes(range(200)) + b"\xff\xd9"])
        ds["PixelData"].VR = "OB"
    dcmwrite(target, ds, force_encoding=True,
             little_endian=ts != "1.2.840.10008.1.2.2", implicit_vr=ts == "1.2.840.10008.1.2")
    return target


def test_every_common_transfer_syntax_is_stored_as_received(stack: Stack, tmp_path: Path,
                                                            chunked_send: None) -> None:
    """Each file goes out byte for byte in its own transfer syntax (pynetdicom's chunked
    sending), is stored with exactly those dataset bytes and indexed with its syntax."""
    base = made(tmp_path, "ts", len(TRANSFER_SYNTAXES))
    files: list[Made] = []
    for m, (name, ts) in zip(base, TRANSFER_SYNTAXES.items(), strict=True):
        path = encode_as(m.path, tmp_path / f"{name}.dcm", ts)
        files.append(Made(path=path, patient_id=m.patient_id, study_uid=m.study_uid,
                          series_uid=m.series_uid, sop_uid=m.sop_uid))
        ae = AE(ae_title="TESTSCU")
        ae.add_requested_context(CT_IMAGE, ts)
        assoc = ae.associate("127.0.0.1", stack.config.gateway_port, ae_title="MINIPACS")
        assert assoc.is_established, name
        try:
            assert assoc.send_c_store(path).Status == 0x0000, name
        finally:
            assoc.release()
    sops = [m.sop_uid for m in files]
    wait_until(lambda: indexed_count(stack, sops) == len(sops), 60)
    assert_stored_byte_identical(stack, files)
    rows = pg(dsn(stack), "SELECT sop_instance_uid, transfer_syntax FROM instance WHERE "
              "sop_instance_uid = ANY($1::text[])", sops)
    assert {r["sop_instance_uid"]: r["transfer_syntax"] for r in rows} == \
        dict(zip(sops, TRANSFER_SYNTAXES.values(), strict=True))


def test_oversized_pdus_are_refused_without_allocating_them(stack: Stack) -> None:
    """RELIABILITY: a PDU longer than negotiated is refused without allocating the length it
    declares. Before an association: an A-ASSOCIATE-RQ declaring 4 GiB, then silence (memory
    follows what arrives). On an association: a P-DATA-TF declaring 64 MiB, over the 1 MiB
    we offered: aborted before it is read. The gateway's memory does not move and it keeps
    serving."""
    import socket
    import struct

    import psutil

    port = stack.config.gateway_port
    gateway = psutil.Process(stack.procs["gateway"].pid)
    before = gateway.memory_info().rss
    silent = socket.create_connection(("127.0.0.1", port))
    try:
        silent.sendall(b"\x01\x00" + struct.pack(">L", 0xFFFFFFF0) + bytes(1024))
        ae = AE(ae_title="TESTSCU")
        ae.add_requested_context(Verification)
        assoc = ae.associate("127.0.0.1", port, ae_title="MINIPACS")
        assert assoc.is_established
        assert assoc.dul.socket is not None
        sock = assoc.dul.socket.socket
        assert sock is not None
        sock.sendall(struct.pack(">BBL", 0x04, 0, 64 << 20) + bytes(1024))
        wait_until(lambda: assoc.is_aborted, 30, what="the gateway aborting the association")
        assert "of 67108864 bytes, over the 1048576 negotiated: aborting" in \
            stack.log_text("gateway")
        again = ae.associate("127.0.0.1", port, ae_title="MINIPACS")
        assert again.is_established
        assert again.send_c_echo().Status == 0x0000
        again.release()
        grown = gateway.memory_info().rss - before
        assert grown < 64 << 20, f"the gateway grew by {grown >> 20} MiB"
    finally:
        silent.close()
