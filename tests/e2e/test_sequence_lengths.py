"""RELIABILITY, "bogus element lengths": an item or element longer than the defined-length
sequence or item that holds it. pydicom reads such a file without a word (an item is read as
far as the bytes go), DCMTK refuses it or reads the elements after the sequence as part of it:
the index and a downstream archive would see two different datasets. Each gets 0xC000, nothing
indexed, nothing in S3; a good file with defined-length sequences right after is stored.
The files go out byte for byte (pynetdicom, chunked): DCMTK's storescu would re-encode them."""

from __future__ import annotations

import struct
from pathlib import Path

import pytest

from scripts.native import Stack
from services.gateway import statuses
from tests.conftest import dsn, s3_client
from tests.dicomgen import Made, uid
from tests.e2e.test_bad_input import instance, nothing_stored, refusals, send_file
from tests.e2e.test_ingest import assert_stored_byte_identical
from tests.helpers import pg, s3_objects, wait_until

pytestmark = pytest.mark.e2e
UNDEFINED = 0xFFFFFFFF
PATIENT_NAME = struct.pack("<HH2s", 0x0010, 0x0010, b"PN")


def el(tag: int, vr: str, value: bytes, length: int | None = None) -> bytes:
    """An explicit VR little endian element whose length field says ``length`` (a lie, if it is
    not the value's length)."""
    size = len(value) if length is None else length
    if vr == "SQ":
        return struct.pack("<HH2sHL", tag >> 16, tag & 0xFFFF, b"SQ", 0, size) + value
    return struct.pack("<HH2sH", tag >> 16, tag & 0xFFFF, vr.encode(), size) + value


def item(content: bytes, length: int | None = None) -> bytes:
    if length == UNDEFINED:
        return struct.pack("<HHL", 0xFFFE, 0xE000, UNDEFINED) + content + \
            struct.pack("<HHL", 0xFFFE, 0xE00D, 0)
    return struct.pack("<HHL", 0xFFFE, 0xE000, len(content) if length is None else length) + \
        content


def sq(items: bytes, length: int | None = None, tag: int = 0x00082218) -> bytes:
    """Anatomic Region Sequence (by default): in tag order just before Patient Name."""
    if length == UNDEFINED:
        return el(tag, "SQ", items + struct.pack("<HHL", 0xFFFE, 0xE0DD, 0), UNDEFINED)
    return el(tag, "SQ", items, length)


def code(meaning_length: int | None = None) -> bytes:
    """A 34-byte item content: Code Value and Code Meaning."""
    return el(0x00080100, "SH", b"T-D0050 ab") + el(0x00080104, "LO", b"nested  ",
                                                     meaning_length)


BAD = {
    # the audit's three (each got Success and was indexed)
    "item_0x100_in_a_42_byte_sequence": sq(item(code(), 0x100)),
    "item_0xfffffff0_in_a_42_byte_sequence": sq(item(code(), 0xFFFFFFF0)),
    "element_0x100_in_a_34_byte_item": sq(item(code(0x100))),
    # deeper: an item past the end of a nested sequence, an element past the end of a
    # defined-length item of an undefined-length sequence
    "item_overruns_a_nested_sequence": sq(item(sq(item(code(), 0x30), 42, 0x0040A170)
                                               + code() + code())),
    "element_overruns_an_item_of_an_undefined_length_sequence": sq(item(code(0x100)),
                                                                   UNDEFINED),
}
GOOD = sq(item(code() + sq(item(code()), tag=0x0040A170) + sq(item(code(), UNDEFINED),
                                                              UNDEFINED, 0x0008114A))
          + item(code(), UNDEFINED) + item(b""))


def with_sequence(tmp: Path, name: str, sequence: bytes) -> Made:
    """A CT instance (explicit VR little endian) with ``sequence`` spliced in before Patient
    Name, as the bytes go on the wire."""
    sop, study, series = uid("sqlen", name), uid("sqlen", name, "st"), uid("sqlen", name, "se")
    path = instance(tmp, name, sop_uid=sop, study_uid=study, series_uid=series,
                    patient_id="SQLEN")
    raw = path.read_bytes()
    at = raw.index(PATIENT_NAME, 132)
    path.write_bytes(raw[:at] + sequence + raw[at:])
    return Made(path, "SQLEN", study, series, sop)


def objects(stack: Stack) -> dict[str, int]:
    return s3_objects(s3_client(stack), "minipacs")


def overruns(stack: Stack) -> int:
    return stack.log_text("gateway").count(
        "runs past the end of the defined-length sequence or item that holds it")


@pytest.mark.usefixtures("chunked_send")
@pytest.mark.parametrize("case", list(BAD))
def test_an_item_or_element_past_its_sequence_is_refused_and_nothing_stored(
        stack: Stack, tmp_path: Path, case: str) -> None:
    bad = with_sequence(tmp_path, case, BAD[case])
    assert nothing_stored(stack, bad.sop_uid)  # (waits for what other tests left in flight)
    before, refused_before, said_before = objects(stack), refusals(stack), overruns(stack)
    status = send_file(stack, bad.path)
    assert status == statuses.CANNOT_UNDERSTAND, f"0x{status:04X}"
    assert refusals(stack) == refused_before + 1
    assert overruns(stack) == said_before + 1  # the reason, in the gateway's log
    assert nothing_stored(stack, bad.sop_uid)
    assert objects(stack) == before
    # ...and a good one with sequences of defined (and undefined) length right after
    good = with_sequence(tmp_path, case + "-good", GOOD)
    assert send_file(stack, good.path) == statuses.SUCCESS
    wait_until(lambda: pg(dsn(stack), "SELECT 1 FROM instance WHERE sop_instance_uid = $1",
                          good.sop_uid), 60, what="the good instance indexed")
    assert_stored_byte_identical(stack, [good])
