"""Sending an instance to a peer that does not take its stored syntax. Explicit VR little
endian to implicit (and back): the same elements, the same value bytes, only the VR fields
differ. A compressed one (RLE encoded by pydicom, JPEG 2000 and HTJ2K by imagecodecs; the
JPEG family end to end with DCMTK's encoders in ``tests/e2e/test_compressed.py``): the very
pixel values, decompressed."""

from __future__ import annotations

import struct
import zlib
from io import BytesIO
from pathlib import Path
from typing import Any

import imagecodecs
import numpy as np
import pytest
from pydicom.dataset import Dataset
from pydicom.encaps import encapsulate, generate_frames
from pydicom.filebase import DicomBytesIO
from pydicom.filereader import read_dataset
from pydicom.filewriter import write_dataset

from shared import dicom
from shared.dicom import EXPLICIT_LE, IMPLICIT_LE, CannotConvert, alternatives, reencode
from tests.dicomgen import (
    CT_IMAGE,
    HTJ2K_LOSSLESS,
    J2K_LOSSLESS,
    dataset_bytes,
    encode_j2k,
    make_instance,
)


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


def test_what_each_stored_syntax_may_be_converted_to() -> None:
    assert alternatives(EXPLICIT_LE) == (IMPLICIT_LE,)
    assert alternatives(IMPLICIT_LE) == (EXPLICIT_LE,)
    for compressed in (JPEG_LOSSLESS, "1.2.840.10008.1.2.4.80", RLE, "1.2.840.10008.1.2.4.90"):
        assert alternatives(compressed) == (EXPLICIT_LE, IMPLICIT_LE)
    assert alternatives(dicom.DEFLATED) == (EXPLICIT_LE, IMPLICIT_LE)
    for htj2k in ("1.2.840.10008.1.2.4.201", "1.2.840.10008.1.2.4.202",
                  "1.2.840.10008.1.2.4.203"):
        assert alternatives(htj2k) == (EXPLICIT_LE, IMPLICIT_LE)
    assert alternatives(dicom.EXPLICIT_BE) == (EXPLICIT_LE, IMPLICIT_LE)
    with pytest.raises(CannotConvert, match="no conversion"):
        reencode(b"", JPEG_LOSSLESS, dicom.EXPLICIT_BE)
    with pytest.raises(CannotConvert, match="no conversion"):
        reencode(b"", EXPLICIT_LE, JPEG_LOSSLESS)


def _endian_pair() -> tuple[bytes, Dataset]:
    """(a dataset encoded in explicit VR big endian, the same dataset to be expected once
    little endian). The word values (OW pixel data and LUT data, OF, OL, OD) are packed by
    hand in each byte order; the numbers (US, SS multi-valued, FL, FD, AT) pydicom encodes.
    One of each sits in a sequence item too."""

    def build(order: str) -> Dataset:
        ds = Dataset()
        ds.SOPInstanceUID = "1.2.3.77"
        ds.PatientName = "Big^Endian"
        ds.Rows, ds.Columns, ds.BitsAllocated, ds.BitsStored, ds.HighBit = 2, 3, 16, 12, 11
        ds.PixelRepresentation = 1
        ds.add_new(0x00280106, "SS", -5)
        ds.add_new(0x00281050, "DS", "40")
        ds.add_new(0x00181310, "US", [0, 512, 512, 0])  # Acquisition Matrix, VM 4
        ds.add_new(0x00209165, "AT", 0x00181310)
        ds.add_new(0x00189087, "FD", 1.5)  # Diffusion b-value
        ds.add_new(0x00720076, "FL", 2.25)
        ds.add_new(0x7FE00010, "OW", struct.pack(f"{order}6H", 1, 2, 0x1234, 4095, 0, 300))
        ds.add_new(0x00660016, "OF", struct.pack(f"{order}2f", 0.5, -3.0))
        ds.add_new(0x00660040, "OL", struct.pack(f"{order}2L", 7, 0x01020304))
        ds.add_new(0x00089459, "FL", 1.0)
        lut = Dataset()
        lut.add_new(0x00283002, "US", [3, 0, 16])
        lut.add_new(0x00283006, "OW", struct.pack(f"{order}3H", 0, 0x0102, 0xFFFF))
        lut.add_new(0x00660022, "OD", struct.pack(f"{order}d", 6.25))
        ds.add_new(0x00283010, "SQ", [lut])
        return ds

    out = DicomBytesIO()
    out.is_implicit_VR, out.is_little_endian = False, False
    write_dataset(out, build(">"))
    return out.getvalue(), build("<")


def _elements(ds: Dataset) -> list[tuple[int, Any]]:
    return [(int(e.tag), bytes(e.value) if isinstance(e.value, bytes) else e.value)
            for e in ds.iterall() if e.VR != "SQ"]


@pytest.mark.parametrize("target", [EXPLICIT_LE, IMPLICIT_LE])
def test_a_big_endian_instance_goes_out_little_endian_with_the_same_values(target: str) -> None:
    """Explicit VR big endian was retired in 2017 and many applications refuse it. Words
    (OW, OF, OL, OD), which pydicom leaves as bytes, are swapped; numbers are re-encoded;
    nested items too."""
    big, expected = _endian_pair()
    out = reencode(big, dicom.EXPLICIT_BE, target)
    got = read_dataset(BytesIO(out), target == IMPLICIT_LE, True)
    assert _elements(got) == _elements(expected)
    assert got.PixelData == struct.pack("<6H", 1, 2, 0x1234, 4095, 0, 300)
    assert got.SmallestImagePixelValue == -5 and got.AcquisitionMatrix == [0, 512, 512, 0]
    if target == EXPLICIT_LE:
        assert got["PixelData"].VR == "OW" and got[0x00660016].VR == "OF"


@pytest.mark.parametrize("bits", [32, 64])
def test_big_endian_pixel_cells_over_16_bits_are_swapped_whole(bits: int) -> None:
    """One big endian value per pixel cell of 32 or 64 bits (as pydicom reads it), not 16-bit
    words: otherwise 1,249,000 would come out as 250,085,395."""
    width = bits // 8
    values = [1249000, 7, 2**31 + 5, 0]
    ds = Dataset()
    ds.BitsAllocated = bits
    ds.add_new(0x7FE00010, "OW", b"".join(v.to_bytes(width, "big") for v in values))
    out = DicomBytesIO()
    out.is_implicit_VR, out.is_little_endian = False, False
    write_dataset(out, ds)
    got = read_dataset(BytesIO(reencode(out.getvalue(), dicom.EXPLICIT_BE, EXPLICIT_LE)),
                       False, True)
    assert got.PixelData == b"".join(v.to_bytes(width, "little") for v in values)


def test_a_real_big_endian_dose_file_gives_its_little_endian_twins_values() -> None:
    """pydicom's test files: an RT dose (32 bits allocated) in explicit VR big endian, and
    the same dose in implicit VR little endian."""
    from pydicom import dcmread
    from pydicom.data import get_testdata_file

    big, little = (Path(str(get_testdata_file(name))) for name in ("rtdose_expb.dcm",
                                                                    "rtdose.dcm"))
    converted = reencode(dataset_bytes(big), dicom.EXPLICIT_BE, IMPLICIT_LE)
    got = read_dataset(BytesIO(converted), True, True)
    twin = dcmread(little)
    assert got.PixelData == twin.PixelData
    assert got.DoseGridScaling == twin.DoseGridScaling and got.Rows == twin.Rows


def test_a_big_endian_value_not_made_of_whole_words_is_not_converted() -> None:
    ds = Dataset()
    ds.add_new(0x00660016, "OF", bytes(6))  # 1.5 floats
    out = DicomBytesIO()
    out.is_implicit_VR, out.is_little_endian = False, False
    write_dataset(out, ds)
    with pytest.raises(CannotConvert, match="not whole 4-byte words"):
        reencode(out.getvalue(), dicom.EXPLICIT_BE, EXPLICIT_LE)


JPEG_LOSSLESS = "1.2.840.10008.1.2.4.70"
RLE = "1.2.840.10008.1.2.5"


def _rle_instance(tmp: Path) -> tuple[bytes, bytes]:
    """(the dataset compressed in RLE lossless by pydicom, the original pixel data)."""
    from pydicom import dcmread

    path = make_instance(tmp / "rle.dcm", sop_class=CT_IMAGE, sop_uid="1.2.3.9",
                         study_uid="1.2.3", series_uid="1.2.3.5", patient_id="P1",
                         patient_name="RLE^TEST", rows=32, cols=24, modality="CT",
                         instance_number=1)
    ds = dcmread(path)
    ds.PixelData = pixels = b"".join(struct.pack("<H", i // 16) for i in range(32 * 24))
    ds.compress(RLE, generate_instance_uid=False)  # runs of 16: it compresses
    ds.save_as(path, enforce_file_format=True)
    return dataset_bytes(path), pixels


@pytest.mark.parametrize("target", [EXPLICIT_LE, IMPLICIT_LE])
def test_a_compressed_instance_is_decompressed_to_the_same_pixels(tmp_path: Path,
                                                                  target: str) -> None:
    compressed, pixels = _rle_instance(tmp_path)
    out = reencode(compressed, RLE, target)
    ds = read_dataset(BytesIO(out), target == IMPLICIT_LE, True)
    assert bytes(ds.PixelData) == pixels
    assert ds.SOPInstanceUID == "1.2.3.9"  # the same instance, not a new one
    assert (ds.Rows, ds.Columns, ds.BitsAllocated) == (32, 24, 16)
    assert ds.PatientName == "RLE^TEST"


@pytest.mark.parametrize("syntax", [HTJ2K_LOSSLESS, J2K_LOSSLESS])
def test_a_jpeg_2000_instance_is_decompressed_to_the_same_pixels(tmp_path: Path,
                                                                 syntax: str) -> None:
    """HTJ2K (OpenJPEG through pylibjpeg; GDCM has no decoder for it) and JPEG 2000 (GDCM),
    each encoded losslessly by another library (imagecodecs: OpenJPH, OpenJPEG)."""
    from pydicom import dcmread

    source = make_instance(tmp_path / "j.dcm", sop_class=CT_IMAGE, sop_uid="1.2.3.11",
                           study_uid="1.2.3", series_uid="1.2.3.5", patient_id="P1",
                           patient_name="J2K^TEST", rows=64, cols=48, modality="CT",
                           instance_number=1, seed=7)
    compressed = dataset_bytes(encode_j2k(source, tmp_path / "c.dcm", syntax))
    assert len(compressed) < len(dataset_bytes(source))
    out = reencode(compressed, syntax, EXPLICIT_LE)
    ds = read_dataset(BytesIO(out), False, True)
    assert bytes(ds.PixelData) == dcmread(source).PixelData
    assert ds.SOPInstanceUID == "1.2.3.11" and ds.PatientName == "J2K^TEST"


def test_a_compressed_instance_too_large_once_decompressed_is_refused(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The decoded size is read from the header and refused before anything is decoded."""
    compressed, pixels = _rle_instance(tmp_path)
    monkeypatch.setattr(dicom, "CONVERT_MAX", len(pixels) - 1)
    assert len(compressed) <= dicom.CONVERT_MAX
    with pytest.raises(CannotConvert, match="once decompressed"):
        reencode(compressed, RLE, EXPLICIT_LE)


def test_corrupt_compressed_pixel_data_is_refused_not_raised(tmp_path: Path) -> None:
    compressed, _ = _rle_instance(tmp_path)
    at = compressed.rindex(b"\xfe\xff\x00\xe0")  # the last fragment's item tag
    broken = compressed[:at + 8] + b"\x00" * 16 + compressed[at + 24:]
    with pytest.raises(CannotConvert, match="not convertible"):
        reencode(broken, RLE, EXPLICIT_LE)


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


def test_conversions_run_one_at_a_time_in_a_process(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Decompressing holds several times an image in memory: four threads converting at once
    (parallel C-GETs, the mover's associations) take turns."""
    import threading
    import time

    running, most = 0, 0
    guard = threading.Lock()

    def slow(raw: bytes, source: str, target: str) -> bytes:
        nonlocal running, most
        with guard:
            running += 1
            most = max(most, running)
        entered.set()
        release.wait(5)
        with guard:
            running -= 1
        return b"x"

    entered, release = threading.Event(), threading.Event()
    monkeypatch.setattr(dicom, "reencode", slow)
    blob = dicom.Converted(b"dataset")
    threads = [threading.Thread(target=dicom.convert, args=(blob, RLE, EXPLICIT_LE))
               for _ in range(4)]
    for t in threads:
        t.start()
    assert entered.wait(5)
    deadline = time.monotonic() + 1.0  # would a second one get in meanwhile?
    while most < 2 and time.monotonic() < deadline:
        time.sleep(0.01)
    release.set()
    for t in threads:
        t.join(10)
    assert most == 1


def _deflate(raw: bytes) -> bytes:
    deflater = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    return deflater.compress(raw) + deflater.flush()


@pytest.mark.parametrize("target", [EXPLICIT_LE, IMPLICIT_LE])
def test_a_deflated_instance_is_inflated_with_every_value(tmp_path: Path, target: str) -> None:
    explicit = _instance(tmp_path)
    deflated = _deflate(explicit)
    assert len(deflated) < len(explicit)
    out = reencode(deflated, dicom.DEFLATED, target)
    assert _values(out, target) == _values(explicit, EXPLICIT_LE)
    if target == EXPLICIT_LE:
        assert out == explicit  # pydicom writes back what it read


def test_a_deflated_dataset_inflating_past_the_limit_is_refused(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A few kilobytes that inflate to gigabytes are not inflated past ``CONVERT_MAX``."""
    monkeypatch.setattr(dicom, "CONVERT_MAX", 1 << 20)
    bomb = _deflate(bytes(8 << 20))
    assert len(bomb) < 16 << 10
    with pytest.raises(CannotConvert, match="once inflated"):
        reencode(bomb, dicom.DEFLATED, EXPLICIT_LE)
    with pytest.raises(CannotConvert, match="not convertible"):
        reencode(b"not deflate data", dicom.DEFLATED, EXPLICIT_LE)


def _lying(codec: str, claim: int) -> tuple[bytes, str]:
    """A 16 x 16 8-bit dataset compressed by ``codec`` whose codestream header declares
    ``claim`` x ``claim``, and its transfer syntax."""
    image = np.arange(256, dtype=np.uint8).reshape(16, 16)
    if codec == "jpeg":
        syntax, stream = "1.2.840.10008.1.2.4.50", bytearray(imagecodecs.jpeg8_encode(image))
        struct.pack_into(">HH", stream, stream.find(b"\xff\xc0") + 5, claim, claim)
    elif codec == "jpeg-ls":
        syntax, stream = "1.2.840.10008.1.2.4.80", bytearray(imagecodecs.jpegls_encode(image))
        struct.pack_into(">HH", stream, stream.find(b"\xff\xf7") + 5, claim, claim)
    else:
        syntax = "1.2.840.10008.1.2.4.90"
        stream = bytearray(imagecodecs.jpeg2k_encode(image, level=0, codecformat="J2K",
                                                     reversible=True))
        struct.pack_into(">II", stream, stream.find(b"\xff\x51") + 6, claim, claim)
    ds = Dataset()
    ds.SOPClassUID, ds.SOPInstanceUID = "1.2.840.10008.5.1.4.1.1.7", "1.2.3.4"
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.Rows = ds.Columns = 16
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
    ds.PixelData = encapsulate([bytes(stream)])
    ds["PixelData"].VR = "OB"
    out = DicomBytesIO()
    out.is_implicit_VR, out.is_little_endian = False, True
    write_dataset(out, ds)
    return out.getvalue(), syntax


@pytest.mark.parametrize("codec", ["jpeg", "jpeg-ls", "jpeg-2000"])
def test_the_codestream_header_is_read_as_the_decoders_read_it(codec: str) -> None:
    raw, _ = _lying(codec, 16)
    ds = read_dataset(BytesIO(raw), False, True)
    frame = next(generate_frames(ds.PixelData, number_of_frames=1))
    assert dicom.codestream_shape(frame) == (16, 16, 1)


@pytest.mark.parametrize("codec", ["jpeg", "jpeg-ls", "jpeg-2000"])
def test_a_codestream_declaring_another_size_than_the_dataset_is_refused_before_decoding(
        codec: str) -> None:
    """The decoders size their buffers from the codestream: 20000 x 20000 made CharLS take
    800 MB, and 60000 x 60000 made GDCM abort the process."""
    raw, syntax = _lying(codec, 20000)
    with pytest.raises(CannotConvert, match="the codestream declares 20000 x 20000 x 1, the "
                                            "dataset 16 x 16 x 1"):
        reencode(raw, syntax, EXPLICIT_LE)
    honest, _ = _lying(codec, 16)
    assert len(reencode(honest, syntax, EXPLICIT_LE)) > 256  # the same image, true to size


def test_compressed_pixel_data_without_a_codestream_header_is_refused() -> None:
    raw, syntax = _lying("jpeg-ls", 16)
    ds = read_dataset(BytesIO(raw), False, True)
    ds.PixelData = encapsulate([b"\x00" * 64])
    out = DicomBytesIO()
    out.is_implicit_VR, out.is_little_endian = False, True
    write_dataset(out, ds)
    with pytest.raises(CannotConvert, match="no codestream header"):
        reencode(out.getvalue(), syntax, EXPLICIT_LE)
