"""DICOM file inspection and mapping, as pure functions where possible.

- ``inspect_instance``: the gateway's check of a received Part-10 file before acknowledging it.
- ``header_json``: the header (no pixel data, no bulk data) as DICOM JSON, for the index.
- ``index_record``: DICOM JSON -> the row values of patient / study / series / instance.
"""

from __future__ import annotations

import struct
import threading
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from io import BytesIO
from pathlib import Path
from typing import Any, BinaryIO

import numpy
from pydicom import config as pydicom_config
from pydicom import dcmread
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import generate_frames
from pydicom.errors import InvalidDicomError
from pydicom.filebase import DicomBytesIO
from pydicom.filereader import read_dataset
from pydicom.filewriter import correct_ambiguous_vr, write_dataset
from pydicom.tag import Tag
from pydicom.uid import UID

from shared import dimse_wire as wire
from shared.dicomjson import to_json
from shared.keys import InvalidUID, validate_uid
from shared.walk import Malformed, Overrun, meta_end, walk_file

IMPLICIT_LE = "1.2.840.10008.1.2"
EXPLICIT_LE = "1.2.840.10008.1.2.1"
EXPLICIT_BE = "1.2.840.10008.1.2.2"
DEFLATED = "1.2.840.10008.1.2.1.99"
_LONG_VRS = {b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"UC", b"UN", b"UR", b"UT",
             b"SV", b"UV"}
PIXEL_DATA = Tag(0x7FE0, 0x0010)
FLOAT_PIXEL_DATA = 0x7FE00008  # then Double Float Pixel Data (7FE0,0009), then Pixel Data
# A header element longer than this is not read (pydicom's ``defer_size``): its JSON is an empty
# ``BulkDataURI``, so a large Encapsulated Document or private blob before the pixel data costs
# no memory. Binary values over the JSON's bulk threshold (4 KiB) are left out of it anyway.
HEADER_VALUE_MAX = 1 << 20
# A deflated dataset is inflated as a stream; the header is read from its first bytes, this many
# at most (a small deflated file can claim gigabytes).
DEFLATED_HEAD_MAX = 16 << 20
_INFLATE_CHUNK = 1 << 20

# Every service that handles DICOM imports this module. The values we rely on are validated
# here and in shared.keys; pydicom's own per-element checks (a regex per value, on reading and
# on writing every command set and header) only warn, and cost more per instance than the
# checks we need, so they are off.
pydicom_config.settings.reading_validation_mode = pydicom_config.IGNORE
pydicom_config.settings.writing_validation_mode = pydicom_config.IGNORE


class InvalidInstance(ValueError):
    """A received instance we refuse. ``kind`` selects the DIMSE status (see gateway.statuses)."""

    def __init__(self, kind: str, reason: str) -> None:
        super().__init__(reason)
        self.kind = kind  # "unreadable" | "missing_uid" | "mismatch"
        self.reason = reason


@dataclass(frozen=True)
class InstanceInfo:
    sop_instance_uid: str
    sop_class_uid: str
    study_instance_uid: str
    series_instance_uid: str
    transfer_syntax: str


def _stop_at_pixels(tag: Any, vr: Any, length: Any) -> bool:
    """The header ends at the first pixel data element: float, double float or plain."""
    return bool(tag >= FLOAT_PIXEL_DATA)


def check_tail(fp: BinaryIO, size: int, implicit: bool, little: bool) -> None:
    """Walk the top-level elements from ``fp``'s position to the end of the file and raise
    ``InvalidInstance`` if an element claims more bytes than the file has (truncated data)."""
    end = "<" if little else ">"
    pos = fp.tell()
    while pos < size:
        head = fp.read(8)
        if len(head) < 8:
            raise InvalidInstance("unreadable", "dataset truncated inside an element header")
        group, _elem = struct.unpack(end + "HH", head[:4])
        if implicit or group == 0xFFFE:
            (length,) = struct.unpack(end + "L", head[4:8])
            header_len = 8
        elif head[4:6] in _LONG_VRS:
            more = fp.read(4)
            if len(more) < 4:
                raise InvalidInstance("unreadable", "dataset truncated inside an element header")
            (length,) = struct.unpack(end + "L", more)
            header_len = 12
        else:
            (length,) = struct.unpack(end + "H", head[6:8])
            header_len = 8
        if length == 0xFFFFFFFF:
            if group == 0x7FE0:
                _check_fragments(fp, size, end)
                pos = fp.tell()
                continue
            return  # an undefined-length sequence after the pixel data: rare, not walked
        pos += header_len + length
        if pos > size:
            raise InvalidInstance("unreadable", "dataset truncated: an element is longer than "
                                  "the data received")
        fp.seek(pos)


def _check_fragments(fp: BinaryIO, size: int, end: str) -> None:
    while True:
        head = fp.read(8)
        if len(head) < 8:
            raise InvalidInstance("unreadable", "encapsulated pixel data truncated")
        group, elem, length = struct.unpack(end + "HHL", head)
        if (group, elem) == (0xFFFE, 0xE0DD):
            return
        if (group, elem) != (0xFFFE, 0xE000) or length == 0xFFFFFFFF:
            raise InvalidInstance("unreadable", "malformed encapsulated pixel data")
        target = fp.tell() + length
        if target > size:
            raise InvalidInstance("unreadable", "encapsulated pixel data truncated")
        fp.seek(target)


_TAGS = {"SOPClassUID": 0x00080016, "SOPInstanceUID": 0x00080018,
         "StudyInstanceUID": 0x0020000D, "SeriesInstanceUID": 0x0020000E}
_WANTED = frozenset(_TAGS.values())


def inspect_instance(path: Path, command_sop_class: str, command_sop_instance: str,
                     transfer_syntax: str) -> InstanceInfo:
    """Check a received Part-10 file: readable, not truncated, the UIDs we key on present and
    well formed, and the dataset's SOP Class/Instance equal to the command's.

    Never decodes pixel data; memory stays bounded whatever the instance size. The fast path
    is a structural walk (``shared.walk``); files it refuses, and deflated ones, get pydicom's
    verdict, so the walk can only ever save time, never refuse what pydicom reads. Except an
    item or element longer than the defined-length sequence or item around it (``Overrun``):
    pydicom reads it without a word, DCMTK refuses it or reads on past the sequence."""
    try:
        cmd_iuid = validate_uid(command_sop_instance, "Affected SOP Instance UID")
        cmd_cuid = validate_uid(command_sop_class, "Affected SOP Class UID")
    except InvalidUID as exc:
        raise InvalidInstance("missing_uid", str(exc)) from exc
    info: InstanceInfo | None = None
    if transfer_syntax != DEFLATED:
        try:
            raw = walk_file(path, implicit=transfer_syntax == IMPLICIT_LE,
                            little=transfer_syntax != EXPLICIT_BE, wanted=_WANTED)
        except Overrun as exc:
            raise InvalidInstance("unreadable", str(exc)) from exc
        except (Malformed, OSError, ValueError):
            pass
        else:
            info = _info_from(lambda keyword: _raw_uid(raw, keyword), transfer_syntax)
    if info is None:
        info = _inspect_with_pydicom(path, transfer_syntax)
    if info.sop_instance_uid != cmd_iuid:
        raise InvalidInstance("mismatch", "SOP Instance UID in the dataset differs from the "
                              "command's Affected SOP Instance UID")
    if info.sop_class_uid != cmd_cuid:
        raise InvalidInstance("mismatch", "SOP Class UID in the dataset differs from the "
                              "command's Affected SOP Class UID")
    return info


def _raw_uid(raw: dict[int, bytes], keyword: str) -> str | None:
    value = raw.get(_TAGS[keyword])
    if value is None:
        return None
    try:
        return value.decode("ascii")
    except UnicodeDecodeError:
        return "?"  # not a UID: validate_uid says so


def _inspect_with_pydicom(path: Path, transfer_syntax: str) -> InstanceInfo:
    size = path.stat().st_size
    try:
        with path.open("rb") as fp:
            if transfer_syntax == DEFLATED:
                ds = _read_deflated(fp, whole=True)
            else:
                ds = dcmread(fp, stop_before_pixels=True, force=False,
                             defer_size=HEADER_VALUE_MAX)
                if fp.tell() > size:  # a value not read (deferred) runs past the end
                    raise InvalidInstance("unreadable", "dataset truncated: an element is "
                                          "longer than the data received")
            _check_short_values(ds)
            if transfer_syntax != DEFLATED:
                check_tail(fp, size, implicit=transfer_syntax == IMPLICIT_LE,
                           little=transfer_syntax != EXPLICIT_BE)

            def get(keyword: str) -> str | None:
                try:
                    value = ds.get(keyword)
                except Exception as exc:  # pydicom raises lazily on bad values
                    raise InvalidInstance("missing_uid", f"{keyword} cannot be read") from exc
                return None if value is None else str(value)

            return _info_from(get, transfer_syntax)
    except InvalidInstance:
        raise
    except (InvalidDicomError, EOFError, OSError, ValueError, KeyError, TypeError,
            struct.error, NotImplementedError, zlib.error) as exc:
        raise InvalidInstance("unreadable", f"dataset cannot be parsed: {type(exc).__name__}"
                              ) from exc


def _read_deflated(fp: BinaryIO, whole: bool) -> Dataset:
    """The header of a Part-10 file in Deflated Explicit VR Little Endian at ``fp``, read from
    at most ``DEFLATED_HEAD_MAX`` inflated bytes. ``whole``: inflate to the end of the stream
    (in chunks, keeping none of it) and refuse a stream cut short, as the gateway's check does;
    otherwise stop inflating once the head is in hand. Raises ``InvalidInstance``,
    ``zlib.error`` or pydicom's errors."""
    try:
        start = meta_end(fp.read(64 * 1024))
    except Malformed as exc:
        raise InvalidInstance("unreadable", str(exc)) from exc
    fp.seek(start)
    head = inflate_head(fp, DEFLATED_HEAD_MAX, whole)
    return read_dataset(BytesIO(head), False, True, stop_when=_stop_at_pixels,
                        defer_size=HEADER_VALUE_MAX)


def inflate_head(fp: BinaryIO, keep: int, whole: bool) -> bytes:
    """The first ``keep`` bytes of the raw deflate stream (PS3.5 A.5) read from ``fp``, inflated
    a chunk at a time, so memory stays bounded whatever the stream inflates to. ``whole``: go on
    to the end of the stream and raise ``InvalidInstance`` if it is cut short."""
    inflater = zlib.decompressobj(-zlib.MAX_WBITS)
    head = bytearray()
    while not inflater.eof:
        data = inflater.unconsumed_tail or fp.read(_INFLATE_CHUNK)
        out = inflater.decompress(data, _INFLATE_CHUNK)  # with no data: what zlib holds back
        if not data and not out:
            break
        if len(head) < keep:
            head += out[:keep - len(head)]
        elif not whole:
            return bytes(head)
    if whole and not inflater.eof:
        raise InvalidInstance("unreadable", "deflated dataset cut short: the deflate stream "
                              "does not end")
    return bytes(head)


def _check_short_values(ds: Dataset) -> None:
    """pydicom reads a value whose length runs past the end of the data as the bytes there are,
    silently: refuse it, as the walk does."""
    for tag in ds.keys():
        elem = ds.get_item(tag, keep_deferred=True)  # a value not read (deferred) stays so
        if (isinstance(elem, RawDataElement) and elem.length != 0xFFFFFFFF
                and isinstance(elem.value, bytes) and len(elem.value) < elem.length):
            raise InvalidInstance("unreadable", "dataset truncated: an element is longer than "
                                  "the data received")


def _info_from(get: Callable[[str], str | None], transfer_syntax: str) -> InstanceInfo:
    def uid(keyword: str) -> str:
        try:
            return validate_uid(get(keyword), keyword)
        except InvalidUID as exc:
            raise InvalidInstance("missing_uid", str(exc)) from exc

    return InstanceInfo(
        sop_instance_uid=uid("SOPInstanceUID"),
        sop_class_uid=uid("SOPClassUID"),
        study_instance_uid=uid("StudyInstanceUID"),
        series_instance_uid=uid("SeriesInstanceUID"),
        transfer_syntax=transfer_syntax,
    )


def header_json(source: Path | BinaryIO, bulk_threshold: int = 4096) -> dict[str, Any]:
    """The dataset's header (everything before Pixel Data) as DICOM JSON (PS3.18 F.2).

    Binary values larger than ``bulk_threshold`` are left out (an empty ``BulkDataURI``), so the
    message that carries this to the indexer stays small."""
    if isinstance(source, Path):
        with source.open("rb") as fp:
            return dataset_json(read_header(fp), bulk_threshold)
    return dataset_json(read_header(source), bulk_threshold)


_META_LONG_VRS = {b"OB", b"OW", b"OF", b"SQ", b"UT", b"UN"}


def dataset_start(head: bytes) -> tuple[int, str] | None:
    """Where the dataset of a Part-10 file begins and its transfer syntax, read from the first
    bytes of the file (``head``, at least up to the end of the file meta), or None where the file
    meta is not the plain kind this reads (no group length, a length that disagrees with its
    elements, more meta elements past it, a command group after it): ``dcmread`` reads those.
    A deflated dataset's start is given too; it is read inflated (``inflate_head``)."""
    try:
        end = meta_end(head)
    except Malformed:
        return None
    if len(head) < end + 4:
        return None
    pos, syntax = 144, None
    while pos < end:
        group, element = struct.unpack_from("<HH", head, pos)
        vr = head[pos + 4:pos + 6]
        if group != 2:
            return None
        if vr in _META_LONG_VRS:
            (length,), pos = struct.unpack_from("<I", head, pos + 8), pos + 12
        else:
            (length,), pos = struct.unpack_from("<H", head, pos + 6), pos + 8
        if element == 0x0010:
            syntax = head[pos:pos + length].decode("ascii", "replace").strip(" \x00")
        pos += length
    if pos != end or not syntax:
        return None
    if syntax == DEFLATED:
        return end, syntax
    if head[end:end + 2] in (b"\x00\x00", b"\x02\x00"):  # a command group, or more meta
        return None
    return end, syntax


def read_header(fp: BinaryIO) -> Dataset:
    """The dataset before the pixel data, values over ``HEADER_VALUE_MAX`` not read. A plain
    file meta (``dataset_start``) is skipped, and the dataset read from its first byte:
    pydicom's parse of the file meta is more than half of ``dcmread``'s cost for a small
    instance. A deflated dataset is read from its first ``DEFLATED_HEAD_MAX`` bytes, inflated
    as a stream. Anything else, or anything the direct read cannot read, goes to ``dcmread``
    (which gives the same dataset, or the error)."""
    start = fp.tell()
    head = fp.read(4096)
    found = dataset_start(head)
    if found is not None:
        offset, syntax = found
        fp.seek(start + offset)
        if syntax == DEFLATED:  # dcmread would inflate all of it in memory: never fall back
            return read_dataset(BytesIO(inflate_head(fp, DEFLATED_HEAD_MAX, whole=False)),
                                False, True, stop_when=_stop_at_pixels,
                                defer_size=HEADER_VALUE_MAX)
        try:
            return read_dataset(fp, syntax == IMPLICIT_LE, syntax != EXPLICIT_BE,
                                stop_when=_stop_at_pixels, defer_size=HEADER_VALUE_MAX)
        except Exception:  # noqa: S110 - dcmread below reads it again, or raises the error
            pass
    fp.seek(start)
    return dcmread(fp, stop_before_pixels=True, defer_size=HEADER_VALUE_MAX)


def dataset_json(ds: Dataset, bulk_threshold: int = 4096) -> dict[str, Any]:
    try:
        return to_json(ds, bulk_threshold)  # pydicom's to_json_dict, faster (dicomjson.py)
    except Exception:
        # One bad value must not lose the whole header: keep the elements that do encode.
        out: dict[str, Any] = {}
        for elem in ds:
            try:
                sub = Dataset()
                sub.add(elem)
                out.update(sub.to_json_dict(bulk_data_threshold=bulk_threshold,
                                            bulk_data_element_handler=lambda _e: ""))
            except Exception:  # noqa: S112 - skipping an unencodable element is the point
                continue
        return out


# ---- DICOM JSON -> index values --------------------------------------------------------------

def json_str(header: dict[str, Any], tag: str) -> str:
    """First value of ``tag`` (``"GGGGEEEE"``) as text; PN as its alphabetic form; '' if absent."""
    elem = header.get(tag)
    if not isinstance(elem, dict):
        return ""
    values = elem.get("Value")
    if not values:
        return ""
    first = values[0]
    if isinstance(first, dict):  # PN
        return str(first.get("Alphabetic", ""))
    return str(first)


def json_strs(header: dict[str, Any], tag: str) -> list[str]:
    elem = header.get(tag)
    if not isinstance(elem, dict):
        return []
    return [str(v.get("Alphabetic", "")) if isinstance(v, dict) else str(v)
            for v in elem.get("Value", []) or []]


def json_int(header: dict[str, Any], tag: str) -> int | None:
    value = json_str(header, tag)
    try:
        number = int(float(value)) if value else None
    except (ValueError, OverflowError):
        return None
    return number if number is not None and -(2**31) <= number < 2**31 else None


@dataclass(frozen=True)
class IndexRecord:
    """The values of one instance's rows at each level of the index."""

    patient: dict[str, Any]
    study: dict[str, Any]
    series: dict[str, Any]
    instance: dict[str, Any]


def index_record(header: dict[str, Any]) -> IndexRecord:
    s = json_str
    return IndexRecord(
        patient={
            "patient_id": s(header, "00100020"),
            "issuer_of_patient_id": s(header, "00100021"),
            "patient_name": s(header, "00100010"),
            "patient_birth_date": s(header, "00100030"),
            "patient_sex": s(header, "00100040"),
        },
        study={
            "study_instance_uid": s(header, "0020000D"),
            "study_date": s(header, "00080020"),
            "study_time": s(header, "00080030"),
            "accession_number": s(header, "00080050"),
            "study_id": s(header, "00200010"),
            "referring_physician_name": s(header, "00080090"),
            "study_description": s(header, "00081030"),
            "specific_character_set": "\\".join(json_strs(header, "00080005")),
        },
        series={
            "series_instance_uid": s(header, "0020000E"),
            "modality": s(header, "00080060"),
            "series_number": json_int(header, "00200011"),
            "series_description": s(header, "0008103E"),
            "series_date": s(header, "00080021"),
            "series_time": s(header, "00080031"),
            "body_part_examined": s(header, "00180015"),
        },
        instance={
            "sop_instance_uid": s(header, "00080018"),
            "sop_class_uid": s(header, "00080016"),
            "instance_number": json_int(header, "00200013"),
        },
    )


# ---- conversions for retrieve destinations ---------------------------------------------------

# Stored in one of these, an instance may go out in the other: the element values are the
# same bytes (little endian both), only the VR fields of their headers differ.
LITTLE_ENDIAN_PAIR = {IMPLICIT_LE: EXPLICIT_LE, EXPLICIT_LE: IMPLICIT_LE}
# Compressed syntaxes an instance is decompressed from for a destination that takes none of
# them, as Orthanc transcodes: pydicom's decoders (GDCM for the JPEG family, pyjpegls for
# JPEG-LS, OpenJPEG through pylibjpeg for HTJ2K, its own for RLE). A lossless one gives back
# the very pixel values that were compressed.
DECOMPRESSIBLE = frozenset({
    "1.2.840.10008.1.2.4.50",  # JPEG baseline (lossy)
    "1.2.840.10008.1.2.4.51",  # JPEG extended (lossy)
    "1.2.840.10008.1.2.4.57",  # JPEG lossless
    "1.2.840.10008.1.2.4.70",  # JPEG lossless, first-order prediction
    "1.2.840.10008.1.2.4.80",  # JPEG-LS lossless
    "1.2.840.10008.1.2.4.81",  # JPEG-LS near-lossless
    "1.2.840.10008.1.2.4.90",  # JPEG 2000 lossless
    "1.2.840.10008.1.2.4.91",  # JPEG 2000
    "1.2.840.10008.1.2.4.201",  # HTJ2K lossless
    "1.2.840.10008.1.2.4.202",  # HTJ2K lossless, RPCL
    "1.2.840.10008.1.2.4.203",  # HTJ2K
    "1.2.840.10008.1.2.5",     # RLE lossless
})
# A faster decoder where there is one: CharLS 2 (pyjpegls) decodes a 512x512 JPEG-LS image in
# 7.7 ms of CPU with pydicom around it, GDCM's bundled CharLS in 12.6 (10.8 to decode, 1.8 to
# turn its string into bytes; ``docs/benchmarks-history.md``, session 25).
_PREFERRED_DECODER = {"1.2.840.10008.1.2.4.80": "pyjpegls", "1.2.840.10008.1.2.4.81": "pyjpegls"}
CONVERT_MAX = 64 * 1024 * 1024  # the conversion holds the dataset in memory, a few times over


class CannotConvert(LookupError):
    """The instance would need a conversion minipacs does not make."""


def alternatives(source: str) -> tuple[str, ...]:
    """The other transfer syntaxes an instance stored in ``source`` may be sent in, in the
    order minipacs prefers them: the other of the little endian pair, or, for a compressed
    syntax it can decompress, for deflated and for explicit VR big endian (retired since 2017,
    and refused by many applications), explicit then implicit VR little endian (which every
    DICOM application accepts)."""
    if source in LITTLE_ENDIAN_PAIR:
        return (LITTLE_ENDIAN_PAIR[source],)
    if source in DECOMPRESSIBLE or source in (DEFLATED, EXPLICIT_BE):
        return (EXPLICIT_LE, IMPLICIT_LE)
    return ()


def reencode(raw: bytes | bytearray | memoryview, source: str, target: str) -> bytes:
    """The dataset ``raw`` (encoded in ``source``) encoded in ``target``, one of
    ``alternatives(source)``. Implicit VR takes the VRs from the data dictionary (UN for
    unknown private elements), and explicit VR resolves the ambiguous ones (US or SS, OB or
    OW) from the dataset, as pydicom writes them. Between the little endian pair pixel data is
    not decoded; a deflated dataset is inflated (``_inflate``), a compressed one decompressed
    (``_decompress``), a big endian one has its words swapped (``_swap_words``)."""
    if target not in alternatives(source):
        raise CannotConvert(f"no conversion from {source} to {target}")
    if len(raw) > CONVERT_MAX:
        raise CannotConvert(f"{len(raw)} bytes, over the {CONVERT_MAX} converted in memory")
    try:
        if source == DEFLATED:  # Deflated Explicit VR Little Endian: the whole dataset
            raw = _inflate(raw)
        ds = read_dataset(BytesIO(bytes(raw)), source == IMPLICIT_LE, source != EXPLICIT_BE)
        if source == EXPLICIT_BE:
            _swap_words(ds)
        if source in DECOMPRESSIBLE:
            _decompress(ds, source)
        out = DicomBytesIO()
        out.is_implicit_VR, out.is_little_endian = target == IMPLICIT_LE, True
        if target == EXPLICIT_LE:
            correct_ambiguous_vr(ds, True)
        write_dataset(out, ds)
    except CannotConvert:
        raise
    except Exception as exc:  # pydicom reads lazily: a malformed element fails here
        raise CannotConvert(f"not convertible ({type(exc).__name__}: {exc})") from None
    return out.getvalue()


# pydicom keeps the values of these VRs as bytes: words of this many bytes each, in the byte
# order of the syntax they were read in. It re-encodes every other value (US, SS, UL, FL, AT
# ...) in the byte order it writes; these it writes as they are.
_WORD_BYTES = {"OW": 2, "OF": 4, "OL": 4, "OD": 8, "OV": 8}


def _swap_words(ds: Dataset) -> None:
    """Every OW / OF / OL / OD / OV value of ``ds`` (read as big endian), nested sequences
    included, turned little endian in place. OW is swapped in 16-bit words, except pixel data
    of 32 or 64 bits allocated: one big endian value per pixel cell, as pydicom and GDCM read
    it (DCMTK 3.6.7's ``dcmconv`` swaps those in 16-bit words too, and changes the values).
    Pixel data sent as OB is a byte stream and stays; so do UN values, whose structure the
    dataset does not say."""
    for elem in ds:
        if elem.VR == "SQ":
            for item in elem.value or ():
                _swap_words(item)
            continue
        width = _WORD_BYTES.get(str(elem.VR))
        if not width or not isinstance(elem.value, bytes | bytearray) or not elem.value:
            continue
        if elem.tag == PIXEL_DATA and elem.VR == "OW":
            bits = ds.get("BitsAllocated")
            width = int(bits) // 8 if bits in (32, 64) else width
        if len(elem.value) % width:
            raise CannotConvert(f"{elem.tag} ({elem.VR}) has {len(elem.value)} bytes, not "
                                f"whole {width}-byte words")
        elem.value = numpy.frombuffer(elem.value, f">u{width}").astype(f"<u{width}").tobytes()


def _inflate(raw: bytes | bytearray | memoryview) -> bytes:
    """A deflated dataset's explicit VR little endian bytes (PS3.5 A.5: raw deflate, no zlib
    header), refused past ``CONVERT_MAX`` before inflating further (a small deflated dataset
    may claim gigabytes)."""
    inflater = zlib.decompressobj(-zlib.MAX_WBITS)
    plain = inflater.decompress(raw, CONVERT_MAX + 1)
    if len(plain) > CONVERT_MAX or inflater.unconsumed_tail:
        raise CannotConvert(f"more than {CONVERT_MAX} bytes once inflated, over what is "
                            "converted in memory")
    return plain + inflater.flush()


def decoded_size(ds: Dataset) -> int:
    """The bytes the pixel data of ``ds`` takes once decompressed, from its header."""
    frames = int(ds.get("NumberOfFrames") or 1)
    return (int(ds.Rows) * int(ds.Columns) * int(ds.get("SamplesPerPixel") or 1) * frames
            * ((int(ds.BitsAllocated) + 7) // 8))


def _decompress(ds: Dataset, source: str) -> None:
    """``ds``'s pixel data decompressed in place (colour YCbCr as RGB, as a native syntax
    requires), its SOP Instance UID kept; refused before decoding past ``CONVERT_MAX``."""
    if PIXEL_DATA not in ds:
        return  # nothing compressed in it (a dataset without pixels in a compressed syntax)
    size = decoded_size(ds)
    if size > CONVERT_MAX:
        raise CannotConvert(f"{size} bytes once decompressed, over the {CONVERT_MAX} "
                            "converted in memory")
    if source != RLE_LOSSLESS:  # RLE has no size of its own: decoded as the dataset says
        _check_codestreams(ds)
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = UID(source)
    preferred = _PREFERRED_DECODER.get(source, "")
    try:
        ds.decompress(generate_instance_uid=False, decoding_plugin=preferred)
    except Exception:
        if not preferred:
            raise
        ds.decompress(generate_instance_uid=False)  # the others (GDCM) may still read it


RLE_LOSSLESS = "1.2.840.10008.1.2.5"
# JPEG start-of-frame markers (ITU T.81 B.1.1.3: C0-CF but DHT C4, JPG C8, DAC CC) and JPEG-LS's
# SOF55 (ITU T.87): length, precision, lines, samples per line, components.
_SOF = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC} | {0xF7}
_J2K_START = b"\xff\x4f\xff\x51"  # SOC then SIZ (ITU T.800 A.5.1)


def codestream_shape(frame: bytes) -> tuple[int, int, int] | None:
    """(rows, columns, components) a JPEG, JPEG-LS, JPEG 2000 or HTJ2K codestream declares
    in its header, or None where ``frame`` holds no header this reads."""
    at = frame.find(_J2K_START, 0, 4096)  # at 0, or inside JP2 boxes some writers add
    if at >= 0 and len(frame) >= at + 42:
        xsiz, ysiz, xo, yo = struct.unpack_from(">IIII", frame, at + 8)
        (components,) = struct.unpack_from(">H", frame, at + 40)
        return ysiz - yo, xsiz - xo, components
    if not frame.startswith(b"\xff\xd8"):
        return None
    pos = 2
    while pos + 10 <= len(frame):
        if frame[pos] != 0xFF:
            return None
        marker = frame[pos + 1]
        if marker == 0xFF:  # a fill byte
            pos += 1
            continue
        if marker in _SOF:
            lines, per_line, components = struct.unpack_from(">HHB", frame, pos + 5)
            return lines, per_line, components
        pos += 2 + struct.unpack_from(">H", frame, pos + 2)[0]
    return None


def _check_codestreams(ds: Dataset) -> None:
    """Refuse compressed pixel data whose frames declare another size than the dataset's
    Rows, Columns and Samples per Pixel: the decoders size their buffers from the codestream,
    so a small instance claiming 60000 x 60000 in its codestream made CharLS fail to allocate
    and GDCM, tried next, abort the process (``std::length_error``)."""
    expected = (int(ds.Rows), int(ds.Columns), int(ds.get("SamplesPerPixel") or 1))
    frames = int(ds.get("NumberOfFrames") or 1)
    for n, frame in enumerate(generate_frames(ds.PixelData, number_of_frames=frames), 1):
        shape = codestream_shape(frame)
        if shape is None:
            raise CannotConvert(f"frame {n}: no codestream header found")
        if shape != expected:
            raise CannotConvert(f"frame {n}: the codestream declares {shape[0]} x {shape[1]} x "
                                f"{shape[2]}, the dataset {expected[0]} x {expected[1]} x "
                                f"{expected[2]} (rows x columns x samples)")


class Converted:
    """A converted dataset, in memory, to send (``shared.dimse_wire.Dataset``)."""

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.length = len(data)

    def blocks(self, size: int) -> Iterator[memoryview]:
        view = memoryview(self.data)
        for start in range(0, len(view), size):
            yield view[start:start + size]


# One conversion at a time in a process: decompressing holds about five times the decoded
# size at its peak (310 MB for a 57 MiB image), so parallel C-GETs or mover associations
# converting at once would multiply it.
_CONVERTING = threading.Lock()


def convert(dataset: wire.Dataset, source: str, target: str) -> Converted:
    """``dataset`` (a stored instance's, in ``source``) re-encoded in ``target`` (see
    ``reencode``), one conversion at a time per process; ``CannotConvert`` before anything is
    read if it is too large."""
    if dataset.length > CONVERT_MAX:
        raise CannotConvert(f"{dataset.length} bytes, over the {CONVERT_MAX} converted in "
                            "memory")
    with _CONVERTING:
        return Converted(reencode(b"".join(bytes(b) for b in dataset.blocks(1 << 20)),
                                  source, target))
