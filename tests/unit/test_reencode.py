"""Sending an instance stored in explicit VR little endian to a peer that takes only implicit
VR (and back): the same elements, the same value bytes, only the VR fields differ."""

from __future__ import annotations

from io import BytesIO
from pathlib import Path

import pytest
from pydicom.filereader import read_dataset

from shared import dicom
from shared.dicom import EXPLICIT_LE, IMPLICIT_LE, CannotConvert, convertible, reencode
from tests.dicomgen import CT_IMAGE, dataset_bytes, make_instance


def _instance(tmp: Path) -> bytes:
    path = make_instance(tmp / "x.dcm", sop_class=CT_IMAGE, sop_uid="1.2.3.4", study_uid="1.2.3",
                         series_uid="1.2.3.5", patient_id="P1", patient_name="Ünïcode^Näme",
                         rows=16, cols=16, modality="CT", instance_number=1,
                         charset="ISO_IR 100")
    from pydicom import dcmread

    ds = dcmread(path)
    ds.PixelRepresentation = 1
    ds.add_new(0x00280106, "SS", -5)  # Smallest Image Pixel Value: US or SS by the above
    block = ds.private_block(0x0009, "MINIPACS TEST", create=True)
    block.add_new(0x01, "LO", "private value")
    ds.save_as(path, enforce_file_format=True)
    return dataset_bytes(path)


def _values(raw: bytes, syntax: str) -> dict[int, bytes]:
    """Every element's value bytes, as stored (nested sequences included, as bytes)."""
    ds = read_dataset(BytesIO(raw), syntax == IMPLICIT_LE, True)
    return {int(tag): bytes(ds.get_item(tag).value or b"") for tag in ds.keys()
            if ds.get_item(tag).VR != "SQ" and ds.get_item(tag).value is not None}


def test_explicit_to_implicit_and_back_keeps_every_value(tmp_path: Path) -> None:
    explicit = _instance(tmp_path)
    implicit = reencode(explicit, EXPLICIT_LE, IMPLICIT_LE)
    assert implicit != explicit and len(implicit) < len(explicit)  # no VR fields
    back = reencode(implicit, IMPLICIT_LE, EXPLICIT_LE)
    original = _values(explicit, EXPLICIT_LE)
    assert len(original) > 20 and 0x7FE00010 in original and 0x00091001 in original
    assert _values(implicit, IMPLICIT_LE) == original
    assert _values(back, EXPLICIT_LE) == original
    again = read_dataset(BytesIO(back), False, True)
    assert again["SmallestImagePixelValue"].VR == "SS" and again.SmallestImagePixelValue == -5
    assert again.PatientName == "Ünïcode^Näme"


def test_only_the_little_endian_pair_is_converted(tmp_path: Path) -> None:
    assert convertible(EXPLICIT_LE) == IMPLICIT_LE and convertible(IMPLICIT_LE) == EXPLICIT_LE
    assert convertible("1.2.840.10008.1.2.4.70") is None  # JPEG lossless: never
    assert convertible(dicom.EXPLICIT_BE) is None  # would need the pixel bytes swapped
    with pytest.raises(CannotConvert, match="no conversion"):
        reencode(b"", "1.2.840.10008.1.2.4.70", EXPLICIT_LE)


def test_an_instance_too_large_to_convert_in_memory_is_refused(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    explicit = _instance(tmp_path)
    monkeypatch.setattr(dicom, "CONVERT_MAX", len(explicit) - 1)
    with pytest.raises(CannotConvert, match="converted in memory"):
        reencode(explicit, EXPLICIT_LE, IMPLICIT_LE)


def test_a_dataset_pydicom_cannot_read_is_refused_not_raised() -> None:
    """An unknown VR, a sequence cut short: the sub-operation fails with the reason
    (``CannotConvert``). pydicom raised NotImplementedError and OSError there, and an
    OSError would have been taken for a lost association."""
    with pytest.raises(CannotConvert, match=r"not convertible.*Unknown Value Representation"):
        reencode(b"\x08\x00\x05\x00ZZ\x04\x00ABCD", EXPLICIT_LE, IMPLICIT_LE)
    sequence_cut = (b"\x08\x00\x15\x11SQ\x00\x00\xff\xff\xff\xff"
                    b"\xfe\xff\x00\xe0\x10\x00\x00\x00\x01\x01\x01\x01")
    with pytest.raises(CannotConvert, match=r"not convertible.*OSError"):
        reencode(sequence_cut, EXPLICIT_LE, IMPLICIT_LE)
