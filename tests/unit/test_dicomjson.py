"""``shared.dicomjson.to_json`` must give pydicom's DICOM JSON, element for element: over every
test and character-set file pydicom ships, and over hand-built datasets full of edge cases,
each read as explicit and implicit VR little endian (and big endian: all deferred)."""

from __future__ import annotations

import struct
from io import BytesIO
from pathlib import Path
from typing import Any

import pydicom
import pytest
from pydicom import dcmread

from shared.dicom import dataset_json
from shared.dicomjson import to_json

DATA = Path(pydicom.__file__).parent / "data"
FILES = sorted(p for folder in ("test_files", "charset_files")
               for p in (DATA / folder).glob("*.dcm"))


def pydicom_json(ds: pydicom.Dataset, threshold: int = 4096) -> dict[str, Any]:
    return ds.to_json_dict(bulk_data_threshold=threshold, bulk_data_element_handler=lambda _e: "")


def reference(ds: pydicom.Dataset, threshold: int = 4096) -> dict[str, Any]:
    """What storage stored before ``to_json``: pydicom, and per element if one fails."""
    try:
        return ds.to_json_dict(bulk_data_threshold=threshold,
                               bulk_data_element_handler=lambda _e: "")
    except Exception:
        out: dict[str, Any] = {}
        for elem in ds:
            try:
                sub = pydicom.Dataset()
                sub.add(elem)
                out.update(sub.to_json_dict(bulk_data_threshold=threshold,
                                            bulk_data_element_handler=lambda _e: ""))
            except Exception:
                continue
        return out


def read(data: bytes | Path) -> pydicom.Dataset:
    source = BytesIO(data) if isinstance(data, bytes) else data
    return dcmread(source, stop_before_pixels=True, force=True)


def test_there_are_files_to_compare() -> None:
    assert len(FILES) > 60


@pytest.mark.parametrize("path", FILES, ids=[p.name for p in FILES])
@pytest.mark.parametrize("threshold", [4096, 16])
def test_same_json_as_pydicom_for_its_own_test_files(path: Path, threshold: int) -> None:
    try:
        expected = pydicom_json(read(path), threshold)
    except Exception:  # pydicom fails on an element: storage keeps the others, as before
        try:
            expected = reference(read(path), threshold)
        except Exception as exc:  # pydicom cannot read it at all: nor can we
            with pytest.raises(type(exc)):
                dataset_json(read(path), threshold)
            return
        assert dataset_json(read(path), threshold) == expected
        return
    assert to_json(read(path), threshold) == expected


# ---- hand-built datasets -------------------------------------------------------------------

LONG_VRS = {"OB", "OD", "OF", "OL", "OV", "OW", "SQ", "SV", "UC", "UN", "UR", "UT", "UV"}


def element(tag: int, vr: str, value: bytes, explicit: bool, big: bool = False) -> bytes:
    e = ">" if big else "<"
    head = struct.pack(f"{e}HH", tag >> 16, tag & 0xFFFF)
    if not explicit:
        return head + struct.pack(f"{e}L", len(value)) + value
    if vr in LONG_VRS:
        return head + vr.encode() + b"\0\0" + struct.pack(f"{e}L", len(value)) + value
    return head + vr.encode() + struct.pack(f"{e}H", len(value)) + value


def part10(body: bytes, ts: str) -> bytes:
    def meta(tag: int, vr: str, value: bytes) -> bytes:
        return element(tag, vr, value, True)

    def ui(text: str) -> bytes:
        raw = text.encode()
        return raw + b"\0" * (len(raw) % 2)

    group = (meta(0x00020001, "OB", b"\0\1")
             + meta(0x00020002, "UI", ui("1.2.840.10008.5.1.4.1.1.7"))
             + meta(0x00020003, "UI", ui("1.2.3.4"))
             + meta(0x00020010, "UI", ui(ts)))
    return (b"\0" * 128 + b"DICM" + meta(0x00020000, "UL", struct.pack("<L", len(group)))
            + group + body)


def pad(raw: bytes, with_: bytes = b" ") -> bytes:
    return raw + with_ * (len(raw) % 2)


def edge_elements(charset: bytes | None, big: bool = False, poison: bool = False
                  ) -> list[tuple[int, str, bytes]]:
    e = ">" if big else "<"
    out: list[tuple[int, str, bytes]] = []
    if charset is not None:
        out.append((0x00080005, "CS", pad(charset)))
    out += [
        (0x00080008, "CS", pad(b"ORIGINAL\\PRIMARY\\ AXIAL \\")),
        (0x00080016, "UI", pad(b"1.2.840.10008.5.1.4.1.1.7", b"\0")),
        (0x00080018, "UI", pad(b"1.2.3.4\\5.6", b"\0")),
        (0x00080020, "DA", b"20261126"),
        (0x00080030, "TM", pad(b"101010.5 ")),
        (0x00080050, "SH", b""),
        (0x00080054, "AE", pad(b" STORE \\ ARCH")),
        (0x00080060, "CS", b"  "),
        (0x00080090, "PN", pad(b"Doe^John=\xe5\xb1\xb1^\xe5\xa4\xaa=yama^ta" if charset ==
                               b"ISO_IR 192" else b"Doe^John=Ido^Gr=Pho^N")),
        (0x00081030, "LO", pad(b"Study \\ with \\ parts  ")),
        (0x0008103E, "LO", pad(b"M\xfcller series" if charset == b"ISO_IR 100" else b"plain")),
        (0x00081010, "SH", pad(b"\xff\xfe bad utf8" if charset == b"ISO_IR 192" else b"ST1")),
        (0x00081040, "LO", b"\\\\"),
        (0x00100010, "PN", pad(b"Smith^Ann\\Jones^Bob=")),
        (0x00100020, "LO", pad(b" ID-42 ")),
        (0x00100030, "DA", b""),
        (0x00101010, "AS", b"042Y"),
        (0x00104000, "LT", pad(b"line one\\still one\r\nline two  ")),
        (0x00181030, "LO", pad(b"\xe5\xb1\xb1\xe7\x94\xb0" if charset == b"ISO_IR 192"
                               else b"Protocol")),
        (0x00200011, "IS", pad(b" 7 ")),
        (0x00200013, "IS", pad(b"1\\2\\+3")),
        (0x00200012, "IS", pad(b"4.0")),
        (0x00201041, "DS", pad(b" -1.5e2\\.5\\3. ")),
        (0x00281050, "DS", b"  "),
        (0x00280002, "US", struct.pack(f"{e}H", 1)),
        (0x00280010, "US", struct.pack(f"{e}HH", 64, 65)),
        (0x00189219, "SS", struct.pack(f"{e}h", -5)),
        (0x00281052, "DS", pad(b"-1024")),
        (0x00180050, "DS", pad(b"1.25")),
        (0x00189306, "FD", struct.pack(f"{e}dd", 1.5, -0.25)),
        (0x00089459, "FL", struct.pack(f"{e}f", 0.1)),
        (0x00209158, "LT", b""),
        (0x0020000D, "UI", b""),
        (0x00209165, "AT", struct.pack(f"{e}HHHH", 0x0010, 0x0010, 0x0020, 0x000D)),
        (0x00720082, "SV", struct.pack(f"{e}qq", -1, 2**40)),
        (0x0008040C, "UV", b""),
        (0x00080309, "UL", struct.pack(f"{e}LL", 123456, 7)),
        (0x0008041B, "OB", pad(b"tiny")),
        (0x00281201, "OW", b"\1\2" * 2000),
        (0x0008030E, "UT", pad(b"free \\ text ")),
        (0x00081190, "UR", pad(b"http://x/y ")),
        (0x00091010, "LO", pad(b"private value")),
        (0x00090010, "LO", pad(b"MINIPACS TEST")),
        (0x00290010, "UN", pad(b"raw")),
        (0x00189074, "DT", pad(b"20261126101010")),
    ]
    if poison:  # values pydicom's to_json_dict raises on, for the whole dataset
        out += [(0x00201002, "IS", pad(b"1\\")), (0x00280030, "DS", pad(b"0.5\\abc")),
                (0x00720064, "IS", pad(b"x"))]
    return sorted(out)


def sequence(items: list[bytes], explicit: bool, undefined: bool) -> bytes:
    body = b""
    for item in items:
        if undefined:
            body += struct.pack("<HHL", 0xFFFE, 0xE000, 0xFFFFFFFF) + item + \
                struct.pack("<HHL", 0xFFFE, 0xE00D, 0)
        else:
            body += struct.pack("<HHL", 0xFFFE, 0xE000, len(item)) + item
    tag = struct.pack("<HH", 0x0008, 0x1115)
    if undefined:
        length = struct.pack("<L", 0xFFFFFFFF)
        tail = struct.pack("<HHL", 0xFFFE, 0xE0DD, 0)
    else:
        length, tail = struct.pack("<L", len(body)), b""
    return tag + (b"SQ\0\0" if explicit else b"") + length + body + tail


def build(charset: bytes | None, explicit: bool, undefined_sq: bool = False,
          poison: bool = False) -> bytes:
    elements = edge_elements(charset, poison=poison)
    before = [x for x in elements if x[0] < 0x00081115]
    after = [x for x in elements if x[0] > 0x00081115]
    item1 = b"".join(element(t, v, raw, explicit) for t, v, raw in [
        (0x00081150, "UI", pad(b"1.2.840.10008.5.1.4.1.1.2", b"\0")),
        (0x00081155, "UI", pad(b"1.2.3.9", b"\0")),
        (0x00100010, "PN", pad(b"Item^Name"))])
    item2 = element(0x00080005, "CS", pad(b"ISO_IR 100"), explicit) + \
        element(0x00100010, "PN", pad(b"M\xfcller^J"), explicit)
    body = (b"".join(element(t, v, raw, explicit) for t, v, raw in before)
            + sequence([item1, item2, b""], explicit, undefined_sq)
            + b"".join(element(t, v, raw, explicit) for t, v, raw in after))
    return part10(body, "1.2.840.10008.1.2.1" if explicit else "1.2.840.10008.1.2")


CASES = [(charset, explicit, undefined)
         for charset in (None, b"ISO_IR 6", b"ISO_IR 100", b"ISO_IR 192", b"ISO 2022 IR 87",
                         b"")
         for explicit in (True, False) for undefined in (False, True)]


@pytest.mark.parametrize(("charset", "explicit", "undefined"), CASES)
def test_same_json_as_pydicom_for_edge_cases(charset: bytes | None, explicit: bool,
                                             undefined: bool) -> None:
    data = build(charset, explicit, undefined)
    expected = pydicom_json(read(data))
    assert len(expected) > 40
    assert to_json(read(data)) == expected
    poisoned = build(charset, explicit, undefined, poison=True)
    expected = reference(read(poisoned))  # element by element: the bad ones are left out
    assert len(expected) > 40 and "00201002" not in expected
    assert dataset_json(read(poisoned)) == expected


def test_big_endian_goes_to_pydicom_and_matches() -> None:
    body = b"".join(element(t, v, raw, True, big=True)
                    for t, v, raw in edge_elements(None, big=True))
    data = part10(body, "1.2.840.10008.1.2.2")
    assert to_json(read(data)) == pydicom_json(read(data))


def test_the_plain_cases_really_skip_pydicom(monkeypatch: pytest.MonkeyPatch,
                                            tmp_path: Path) -> None:
    """A typical header (the generated CT the bench uses) is encoded without pydicom
    converting any element but the character set."""
    from pydicom.dataelem import DataElement

    from tests.dicomgen import make_instance

    path = tmp_path / "ct.dcm"
    make_instance(path, sop_class="1.2.840.10008.5.1.4.1.1.2", sop_uid="1.2.3.1",
                  study_uid="1.2.3.2", series_uid="1.2.3.3", patient_id="P1",
                  patient_name="Doe^Jane", modality="CT", rows=8, cols=8, instance_number=1,
                  charset="ISO_IR 192")
    ds = read(path)

    original = DataElement.to_json_dict

    def only_the_charset(self: DataElement, *args: Any, **kw: Any) -> dict[str, Any]:
        # pydicom decodes SpecificCharacterSet while reading, to decode the rest: that one
        # element comes converted already
        assert self.tag == 0x00080005, f"pydicom encoded {self.tag}"
        return original(self, *args, **kw)

    monkeypatch.setattr(DataElement, "to_json_dict", only_the_charset)
    out = to_json(ds)
    assert out["00100010"] == {"vr": "PN", "Value": [{"Alphabetic": "Doe^Jane"}]}
    assert out["00080005"] == {"vr": "CS", "Value": ["ISO_IR 192"]}
    assert len(out) > 20
