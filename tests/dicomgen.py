"""Synthetic DICOM data sets for tests and benchmarks (written as Part-10 files).

``ct``: one CT series, 512x512 16-bit (~0.5 MB each). ``small``: 64x64 MR instances spread
over patients x studies x series. Everything is deterministic for a given seed.
"""

from __future__ import annotations

import hashlib
import struct
import zlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import UID, ExplicitVRLittleEndian

CT_IMAGE = "1.2.840.10008.5.1.4.1.1.2"
MR_IMAGE = "1.2.840.10008.5.1.4.1.1.4"
ENCAPSULATED_PDF = "1.2.840.10008.5.1.4.1.1.104.1"
DEFLATED = "1.2.840.10008.1.2.1.99"
ROOT = "1.2.826.0.1.3680043.10.1471."


def uid(*parts: object) -> str:
    digest = hashlib.sha256(".".join(map(str, parts)).encode()).hexdigest()
    return ROOT + str(int(digest[:24], 16))[:30]


@dataclass(frozen=True)
class Made:
    path: Path
    patient_id: str
    study_uid: str
    series_uid: str
    sop_uid: str


def make_instance(path: Path, *, sop_class: str, sop_uid: str, study_uid: str, series_uid: str,
                  patient_id: str, patient_name: str, rows: int, cols: int, modality: str,
                  instance_number: int, study_date: str = "20240102", accession: str = "",
                  study_description: str = "", series_number: int = 1, seed: int = 0,
                  charset: str | None = None, birth_date: str = "19700101", sex: str = "O"
                  ) -> Path:
    ds = Dataset()
    if charset:
        ds.SpecificCharacterSet = charset
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = sop_uid
    ds.StudyDate = study_date
    ds.StudyTime = "101500"
    ds.AccessionNumber = accession
    ds.Modality = modality
    ds.ReferringPhysicianName = "REF^DOCTOR"
    ds.StudyDescription = study_description
    ds.SeriesDescription = f"{modality} series {series_number}"
    ds.PatientName = patient_name
    ds.PatientID = patient_id
    ds.PatientBirthDate = birth_date
    ds.PatientSex = sex
    ds.StudyInstanceUID = study_uid
    ds.SeriesInstanceUID = series_uid
    ds.StudyID = "1"
    ds.SeriesNumber = series_number
    ds.InstanceNumber = instance_number
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows = rows
    ds.Columns = cols
    ds.BitsAllocated = 16
    ds.BitsStored = 12
    ds.HighBit = 11
    ds.PixelRepresentation = 0
    rng = np.random.default_rng(seed)
    ds.PixelData = rng.integers(0, 4096, size=(rows, cols), dtype=np.uint16).tobytes()
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = UID(sop_class)
    meta.MediaStorageSOPInstanceUID = UID(sop_uid)
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta = meta
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return path


def ct_series(folder: Path, count: int = 300, tag: str = "ct", size: int = 512) -> list[Made]:
    study, series = uid(tag, "study"), uid(tag, "series")
    out = []
    for i in range(count):
        sop = uid(tag, "sop", i)
        p = make_instance(folder / f"ct{i:04d}.dcm", sop_class=CT_IMAGE, sop_uid=sop,
                          study_uid=study, series_uid=series, patient_id=f"{tag.upper()}-PAT",
                          patient_name="CT^PATIENT", rows=size, cols=size, modality="CT",
                          instance_number=i + 1, accession=f"ACC{tag}", seed=i,
                          study_description="CT CHEST")
        out.append(Made(p, f"{tag.upper()}-PAT", study, series, sop))
    return out


def small_set(folder: Path, patients: int = 50, studies: int = 2, series: int = 2,
              per_series: int = 10, tag: str = "small") -> list[Made]:
    out = []
    n = 0
    for p in range(patients):
        pid = f"{tag.upper()}-{p:04d}"
        for s in range(studies):
            study = uid(tag, p, s)
            for r in range(series):
                ser = uid(tag, p, s, r)
                for i in range(per_series):
                    sop = uid(tag, p, s, r, i)
                    path = make_instance(
                        folder / f"{pid}_{s}_{r}_{i}.dcm", sop_class=MR_IMAGE, sop_uid=sop,
                        study_uid=study, series_uid=ser, patient_id=pid,
                        patient_name=f"PATIENT^{tag.upper()}{p:04d}", rows=64, cols=64,
                        modality="MR", instance_number=i + 1,
                        study_date=f"2024{(s % 12) + 1:02d}{(p % 28) + 1:02d}",
                        accession=f"A{p:04d}{s}", series_number=r + 1, seed=n,
                        study_description=f"MR STUDY {s}")
                    out.append(Made(path, pid, study, ser, sop))
                    n += 1
    return out


def dataset_bytes(path: Path) -> bytes:
    """The dataset part of a Part-10 file (what goes over the wire), without preamble/meta."""
    data = path.read_bytes()
    assert data[128:132] == b"DICM"
    # (0002,0000) group length is UL: tag(4) VR(2) len(2) value(4)
    group_len = int.from_bytes(data[140:144], "little")
    return data[144 + group_len:]


HTJ2K_LOSSLESS = "1.2.840.10008.1.2.4.201"
J2K_LOSSLESS = "1.2.840.10008.1.2.4.90"


def encode_j2k(source: Path, target: Path, syntax: str = HTJ2K_LOSSLESS) -> Path:
    """``source`` (uncompressed, one grey frame) with its pixel data compressed losslessly in
    HTJ2K (OpenJPH) or JPEG 2000 (OpenJPEG), both through imagecodecs: DCMTK 3.6.7 has no
    encoder for either. The other elements stay as they were."""
    import imagecodecs
    from pydicom import dcmread
    from pydicom.encaps import encapsulate

    ds = dcmread(source)
    pixels = ds.pixel_array
    if syntax == HTJ2K_LOSSLESS:
        stream = imagecodecs.htj2k_encode(pixels, reversible=True)
    elif syntax == J2K_LOSSLESS:
        stream = imagecodecs.jpeg2k_encode(pixels, level=0, codecformat="J2K", reversible=True,
                                           bitspersample=int(ds.BitsStored))
    else:
        raise ValueError(f"no encoder for {syntax}")
    ds.PixelData = encapsulate([bytes(stream)])
    ds["PixelData"].VR = "OB"
    ds.file_meta.TransferSyntaxUID = UID(syntax)
    target.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(target, enforce_file_format=True)
    return target


# ---- datasets written by hand, as a stream: values larger than memory, odd bytes --------------

_LONG_VRS = {"OB", "OD", "OF", "OL", "OV", "OW", "SQ", "UC", "UN", "UR", "UT"}


def element(group: int, elem: int, vr: str, value: bytes) -> bytes:
    """One explicit VR little endian element, its value padded to an even length."""
    if len(value) % 2:
        value += b"\x00" if vr in ("UI", "OB") else b" "
    if vr in _LONG_VRS:
        return struct.pack("<HH2sHI", group, elem, vr.encode(), 0, len(value)) + value
    return struct.pack("<HH2sH", group, elem, vr.encode(), len(value)) + value


def long_header(group: int, elem: int, vr: str, length: int) -> bytes:
    """The header of a long-form explicit VR little endian element whose value follows."""
    return struct.pack("<HH2sHI", group, elem, vr.encode(), 0, length)


def zeros(size: int, chunk: int = 4 << 20) -> Iterator[bytes]:
    block = bytes(chunk)
    while size > 0:
        yield block[:min(size, chunk)]
        size -= chunk


def write_part10(path: Path, sop_class: str, sop_uid: str, syntax: str,
                 parts: Iterable[bytes]) -> Path:
    """A Part-10 file with the gateway's own file meta and the explicit VR little endian
    dataset ``parts`` (deflated as a stream for the deflated syntax): never held in memory."""
    from services.gateway.fastpath import file_meta

    deflater = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS) if syntax == DEFLATED else None
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("wb") as fp:
        fp.write(b"\x00" * 128 + b"DICM" + file_meta(sop_class, sop_uid, syntax))
        for part in parts:
            fp.write(deflater.compress(part) if deflater else part)
        if deflater:
            fp.write(deflater.flush())
    return path


def document_parts(made: Made, patient_name: bytes, size: int) -> Iterator[bytes]:
    """An Encapsulated PDF Storage dataset for ``made`` whose document is ``size`` zero bytes."""
    yield b"".join([
        element(0x0008, 0x0016, "UI", ENCAPSULATED_PDF.encode()),
        element(0x0008, 0x0018, "UI", made.sop_uid.encode()),
        element(0x0008, 0x0060, "CS", b"DOC"),
        element(0x0010, 0x0010, "PN", patient_name),
        element(0x0010, 0x0020, "LO", made.patient_id.encode()),
        element(0x0020, 0x000D, "UI", made.study_uid.encode()),
        element(0x0020, 0x000E, "UI", made.series_uid.encode()),
    ])
    yield long_header(0x0042, 0x0011, "OB", size)  # Encapsulated Document
    yield from zeros(size)
    yield element(0x0042, 0x0012, "LO", b"application/pdf")
