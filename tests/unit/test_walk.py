"""The structural walk (shared.walk) against pydicom: never accepts what pydicom's check
refuses, and finds the same UIDs; refuses, finally, an item or element longer than the
defined-length sequence or item around it, which pydicom reads without a word."""

from __future__ import annotations

import struct
from collections.abc import Callable
from pathlib import Path

import pydicom
import pytest
from pydicom import dcmread
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.sequence import Sequence
from pydicom.uid import (
    UID,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEGBaseline8Bit,
)

from shared.dicom import (
    DEFLATED,
    InstanceInfo,
    InvalidInstance,
    _inspect_with_pydicom,
    inspect_instance,
)
from shared.walk import Malformed, Overrun, meta_end, walk_file

CT = "1.2.840.10008.5.1.4.1.1.2"
SOP = "1.2.826.0.1.3680043.8.498.1"
WANTED = frozenset({0x00080016, 0x00080018, 0x0020000D, 0x0020000E})


def _write(path: Path, ts: str, encapsulated: bool = False) -> Path:
    ds = Dataset()
    ds.SOPClassUID = CT
    ds.SOPInstanceUID = SOP
    ds.PatientName = "Doe^Jane"
    inner = Dataset()
    inner.CodeValue = "T-D0050"
    inner.CodingSchemeDesignator = "SRT"
    deeper = Dataset()
    deeper.CodeMeaning = "nested"
    inner.PurposeOfReferenceCodeSequence = Sequence([deeper])
    ds.AnatomicRegionSequence = Sequence([inner, Dataset()])
    ds.StudyInstanceUID = "1.2.3.4"
    ds.SeriesInstanceUID = "1.2.3.4.5"
    ds.Rows = ds.Columns = 4
    ds.BitsAllocated = 8
    if encapsulated:
        ds.PixelData = encapsulate([b"\xff\xd8" + b"x" * 30 + b"\xff\xd9", b"ab" * 9])
        ds["PixelData"].VR = "OB"
    else:
        ds.PixelData = bytes(range(16))
    ds.LossyImageCompression = "00"  # an element after the pixel data
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = UID(CT)
    meta.MediaStorageSOPInstanceUID = UID(SOP)
    meta.TransferSyntaxUID = UID(ts)
    ds.file_meta = meta
    ds.save_as(path, enforce_file_format=True)
    return path


CASES = [(ImplicitVRLittleEndian, False), (ExplicitVRLittleEndian, False),
         (ExplicitVRBigEndian, False), (JPEGBaseline8Bit, True)]


@pytest.mark.parametrize(("ts", "encapsulated"), CASES)
def test_walk_finds_the_uids(tmp_path: Path, ts: str, encapsulated: bool) -> None:
    path = _write(tmp_path / "x.dcm", ts, encapsulated)
    found = walk_file(path, ts == ImplicitVRLittleEndian, ts != ExplicitVRBigEndian, WANTED)
    assert found[0x00080018].rstrip(b"\0") == SOP.encode()
    assert found[0x0020000E].rstrip(b"\0") == b"1.2.3.4.5"
    info = inspect_instance(path, CT, SOP, ts)
    assert info == _inspect_with_pydicom(path, ts)


@pytest.mark.parametrize(("ts", "encapsulated"), CASES)
def test_walk_never_accepts_what_pydicom_refuses(tmp_path: Path, ts: str,
                                                  encapsulated: bool) -> None:
    whole = _write(tmp_path / "x.dcm", ts, encapsulated).read_bytes()
    implicit, little = ts == ImplicitVRLittleEndian, ts != ExplicitVRBigEndian
    cut = tmp_path / "cut.dcm"
    refused = 0
    for n in range(0, len(whole)):
        cut.write_bytes(whole[:n])
        try:
            walk_file(cut, implicit, little, WANTED)
        except Overrun:  # final, not handed to pydicom: never for a file cut short
            pytest.fail(f"a file cut at {n} bytes taken for an overrun")
        except Malformed:
            refused += 1
            continue
        # the walk accepted this prefix: what inspect_instance makes of it must be what
        # pydicom's check makes of it (accepted with the same UIDs, or refused)
        assert _verdict(lambda: inspect_instance(cut, CT, SOP, ts)) == \
            _verdict(lambda: _inspect_with_pydicom(cut, ts)), n
    assert refused > len(whole) // 2


def _verdict(check: Callable[[], object]) -> object:
    try:
        return check()
    except InvalidInstance:
        return "refused"


def test_inspect_refuses_a_truncated_sequence(tmp_path: Path) -> None:
    whole = _write(tmp_path / "x.dcm", ExplicitVRLittleEndian).read_bytes()
    at = whole.index(b"T-D0050")
    bad = tmp_path / "bad.dcm"
    bad.write_bytes(whole[:at + 3])
    with pytest.raises(Malformed):
        walk_file(bad, False, True, WANTED)
    with pytest.raises(InvalidInstance):
        inspect_instance(bad, CT, SOP, ExplicitVRLittleEndian)


# ---- sequences of defined length, by hand: every item and element within the length around it

UNDEFINED = 0xFFFFFFFF
SEQ = 0x00082218  # Anatomic Region Sequence: before Patient Name
LAST_SEQ = 0x0040A730  # Content Sequence: after every element _plain writes
SYNTAXES = [ExplicitVRLittleEndian, ImplicitVRLittleEndian, ExplicitVRBigEndian]


def _el(ts: str, tag: int, vr: str, value: bytes, length: int | None = None) -> bytes:
    """One element encoded in ``ts``, its length field ``length`` (the value's, if None)."""
    end = ">" if ts == ExplicitVRBigEndian else "<"
    size = len(value) if length is None else length
    if ts == ImplicitVRLittleEndian:
        return struct.pack(end + "HHL", tag >> 16, tag & 0xFFFF, size) + value
    if vr in ("SQ", "OB", "UN"):
        return struct.pack(end + "HH2sHL", tag >> 16, tag & 0xFFFF, vr.encode(), 0, size) + value
    return struct.pack(end + "HH2sH", tag >> 16, tag & 0xFFFF, vr.encode(), size) + value


def _mark(ts: str, elem: int, length: int) -> bytes:
    """An item (E000), item delimiter (E00D) or sequence delimiter (E0DD) header."""
    return struct.pack((">" if ts == ExplicitVRBigEndian else "<") + "HHL", 0xFFFE, elem, length)


def _item(ts: str, content: bytes, length: int | None = None) -> bytes:
    """A defined-length item; an undefined-length one, delimited, if ``length`` is UNDEFINED."""
    if length == UNDEFINED:
        return _mark(ts, 0xE000, UNDEFINED) + content + _mark(ts, 0xE00D, 0)
    return _mark(ts, 0xE000, len(content) if length is None else length) + content


def _sq(ts: str, items: bytes, length: int | None = None, tag: int = SEQ) -> bytes:
    if length == UNDEFINED:
        return _el(ts, tag, "SQ", items + _mark(ts, 0xE0DD, 0), UNDEFINED)
    return _el(ts, tag, "SQ", items, length)


def _code(ts: str, meaning_length: int | None = None) -> bytes:
    """34 bytes whatever the syntax: Code Value and Code Meaning."""
    return (_el(ts, 0x00080100, "SH", b"T-D0050 ab")
            + _el(ts, 0x00080104, "LO", b"nested  ", meaning_length))


def _plain(path: Path, ts: str) -> bytes:
    ds = Dataset()
    ds.SOPClassUID = CT
    ds.SOPInstanceUID = SOP
    ds.PatientName = "Doe^Jane"
    ds.StudyInstanceUID = "1.2.3.4"
    ds.SeriesInstanceUID = "1.2.3.4.5"
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = UID(CT)
    meta.MediaStorageSOPInstanceUID = UID(SOP)
    meta.TransferSyntaxUID = UID(ts)
    ds.file_meta = meta
    ds.save_as(path, enforce_file_format=True)
    return path.read_bytes()


def _with_sequence(path: Path, ts: str, sequence: bytes) -> Path:
    """A small Part-10 file in ``ts`` holding ``sequence``: in its place before Patient Name,
    or, a Content Sequence, as the last element of the file."""
    raw = _plain(path, ts)
    if sequence[:4] == _el(ts, LAST_SEQ, "SQ", b"")[:4]:
        path.write_bytes(raw + sequence)
        return path
    name = struct.pack(">HH" if ts == ExplicitVRBigEndian else "<HH", 0x0010, 0x0010)
    at = raw.index(name, meta_end(raw))
    path.write_bytes(raw[:at] + sequence + raw[at:])
    return path


def _valid(ts: str) -> dict[str, bytes]:
    code = _code(ts)
    return {
        "defined": _sq(ts, _item(ts, code)),
        "undefined_item_in_defined_sequence": _sq(ts, _item(ts, code, UNDEFINED)),
        "nested": _sq(ts, _item(ts, code + _sq(ts, _item(ts, code), tag=0x0040A170)
                                + _sq(ts, _item(ts, code, UNDEFINED), UNDEFINED, 0x0008114A))
                      + _item(ts, b"") + _item(ts, b"", UNDEFINED)),
        "defined_items_in_undefined_sequence": _sq(ts, _item(ts, code) * 2, UNDEFINED),
        "empty": _sq(ts, b""),
        "last_element_of_the_file": _sq(ts, _item(ts, code), tag=LAST_SEQ),
    }


def _overruns(ts: str) -> dict[str, bytes]:
    code = _code(ts)
    return {
        # the audit's three: each got Success and was indexed; pydicom reads them without a
        # word, DCMTK reads Patient Name as part of the sequence or refuses the file
        "item_0x100_in_a_42_byte_sequence": _sq(ts, _item(ts, code, 0x100)),
        "item_0xfffffff0_in_a_42_byte_sequence": _sq(ts, _item(ts, code, 0xFFFFFFF0)),
        "element_0x100_in_a_34_byte_item": _sq(ts, _item(ts, _code(ts, 0x100))),
        "item_overruns_a_nested_sequence": _sq(ts, _item(
            ts, _sq(ts, _item(ts, code, 0x30), 42, 0x0040A170) + code + code)),
        "element_overruns_an_item_of_an_undefined_length_sequence": _sq(
            ts, _item(ts, _code(ts, 0x100)), UNDEFINED),
        "undelimited_item_in_a_defined_sequence": _sq(
            ts, _mark(ts, 0xE000, UNDEFINED) + code),
        "header_across_the_end_of_the_sequence": _sq(ts, _item(ts, code) + b"\0" * 4),
        # as pydicom's DICOMDIR-nooffset: the item runs past the sequence and the file
        "last_item_overruns_the_sequence_and_the_file": _sq(ts, _item(ts, code, 0x100),
                                                            tag=LAST_SEQ),
    }


def _walk(path: Path, ts: str) -> dict[int, bytes]:
    return walk_file(path, ts == ImplicitVRLittleEndian, ts != ExplicitVRBigEndian, WANTED)


@pytest.mark.parametrize("ts", SYNTAXES)
@pytest.mark.parametrize("case", list(_valid(ExplicitVRLittleEndian)))
def test_valid_sequences_of_defined_length_are_walked_and_accepted(
        tmp_path: Path, ts: str, case: str) -> None:
    path = _with_sequence(tmp_path / "x.dcm", ts, _valid(ts)[case])
    assert _walk(path, ts)[0x00080018].rstrip(b"\0") == SOP.encode()
    assert inspect_instance(path, CT, SOP, ts) == _inspect_with_pydicom(path, ts)


@pytest.mark.parametrize("ts", SYNTAXES)
@pytest.mark.parametrize("case", list(_overruns(ExplicitVRLittleEndian)))
def test_an_item_or_element_longer_than_its_sequence_or_item_is_refused(
        tmp_path: Path, ts: str, case: str) -> None:
    path = _with_sequence(tmp_path / "x.dcm", ts, _overruns(ts)[case])
    with pytest.raises(Overrun, match="runs past the end of the defined-length sequence or "
                       "item that holds it"):
        _walk(path, ts)
    # final: not handed to pydicom, which reads these without complaint
    with pytest.raises(InvalidInstance, match="runs past the end") as refused:
        inspect_instance(path, CT, SOP, ts)
    assert refused.value.kind == "unreadable"


def test_other_refusals_inside_a_sequence_still_get_pydicoms_verdict(tmp_path: Path) -> None:
    """Not an item where one should be: the walk refuses, not finally; pydicom decides."""
    ts = ExplicitVRLittleEndian
    path = _with_sequence(tmp_path / "x.dcm", ts, _sq(ts, _code(ts)))
    with pytest.raises(Malformed, match="expected an item") as refused:
        _walk(path, ts)
    assert not isinstance(refused.value, Overrun)
    assert _verdict(lambda: inspect_instance(path, CT, SOP, ts)) == \
        _verdict(lambda: _inspect_with_pydicom(path, ts))


@pytest.mark.parametrize(("levels", "walked"), [(30, True), (40, False)])
def test_nested_sequences_of_defined_length_down_to_the_depth_limit(
        tmp_path: Path, levels: int, walked: bool) -> None:
    """Deeper than the walk goes: refused by the walk, not finally (pydicom decides)."""
    ts = ExplicitVRLittleEndian
    sequence = _code(ts)
    for _ in range(levels):
        sequence = _sq(ts, _item(ts, sequence))
    path = _with_sequence(tmp_path / "x.dcm", ts, sequence)
    if walked:
        _walk(path, ts)
    else:
        with pytest.raises(Malformed, match="nested too deeply") as refused:
            _walk(path, ts)
        assert not isinstance(refused.value, Overrun)
    assert inspect_instance(path, CT, SOP, ts) == _inspect_with_pydicom(path, ts)


PYDICOM_FILES = sorted(p for folder in ("test_files", "charset_files", "palettes")
                       for p in (Path(pydicom.__file__).parent / "data" / folder).glob("*.dcm"))
PYDICOM_FILES += sorted(p for p in (Path(pydicom.__file__).parent / "data" / "test_files"
                                    / "dicomdirtests").rglob("*") if p.is_file()
                        and p.name != "README.txt")
# Made from DICOMDIR by deleting two elements from its last directory record without fixing
# that item's length: it claims 24 bytes past the end of its sequence (and of the file).
KNOWN_OVERRUNS = {"DICOMDIR-nooffset"}


@pytest.mark.parametrize("path", PYDICOM_FILES, ids=[p.name for p in PYDICOM_FILES])
def test_pydicoms_files_get_the_walks_verdict_or_pydicoms(path: Path) -> None:
    """Every test file of pydicom: refused as an overrun only where it is one; otherwise the
    same verdict (and UIDs) as pydicom's check alone."""
    try:
        meta = dcmread(path, stop_before_pixels=True, specific_tags=[]).file_meta
        ts = str(meta.TransferSyntaxUID)
    except Exception:
        pytest.skip("no file meta or transfer syntax")
    command = (str(meta.get("MediaStorageSOPClassUID", "")),
               str(meta.get("MediaStorageSOPInstanceUID", "")))
    if ts == DEFLATED:
        pytest.skip("deflated: not walked")
    try:
        _walk(path, ts)
    except Overrun:
        assert path.name in KNOWN_OVERRUNS
        with pytest.raises(InvalidInstance):
            inspect_instance(path, *command, ts)
        return
    except Malformed:
        pass
    assert path.name not in KNOWN_OVERRUNS
    expected = _verdict(lambda: _inspect_with_pydicom(path, ts))
    if isinstance(expected, InstanceInfo):
        assert inspect_instance(path, expected.sop_class_uid, expected.sop_instance_uid,
                                ts) == expected
    else:
        assert _verdict(lambda: inspect_instance(path, *command, ts)) == "refused"
