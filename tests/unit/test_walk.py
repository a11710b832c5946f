"""The structural walk (shared.walk) against pydicom: never accepts what pydicom's check
refuses, and finds the same UIDs."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
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

from shared.dicom import InvalidInstance, _inspect_with_pydicom, inspect_instance
from shared.walk import Malformed, walk_file

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
