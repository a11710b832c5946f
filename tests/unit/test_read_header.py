"""``shared.dicom.read_header`` skips pydicom's file-meta parse for a plain Part-10 file: it must
read the same header as ``dcmread`` for every file, and fall back to ``dcmread`` (its dataset or
its error) for every file it does not read itself."""

from __future__ import annotations

import struct
from io import BytesIO
from pathlib import Path
from typing import Any

import pydicom
import pytest
from pydicom import dcmread

from services.gateway.fastpath import file_meta
from shared import dicom
from shared.dicom import DEFLATED, dataset_json, dataset_start, header_json
from tests.dicomgen import small_set

DATA = Path(pydicom.__file__).parent / "data"
EXPLICIT_LE = "1.2.840.10008.1.2.1"
FILES = sorted(p for folder in ("test_files", "charset_files")
               for p in (DATA / folder).glob("*.dcm"))


def old_header_json(data: bytes) -> dict[str, Any]:
    """What storage stored before ``read_header``."""
    return dataset_json(dcmread(BytesIO(data), stop_before_pixels=True))


@pytest.mark.parametrize("path", FILES, ids=[p.name for p in FILES])
def test_same_header_as_dcmread(path: Path) -> None:
    data = path.read_bytes()
    try:
        expected = old_header_json(data)
    except Exception as exc:
        with pytest.raises(type(exc)):
            header_json(BytesIO(data))
        return
    assert header_json(BytesIO(data)) == expected
    assert header_json(path) == expected


def test_most_of_pydicoms_files_take_the_direct_read() -> None:
    direct = [p for p in FILES if dataset_start(p.read_bytes()[:4096]) is not None]
    assert len(direct) > len(FILES) // 2


def test_a_gateway_file_is_read_directly_and_gives_the_same_header(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    made = small_set(tmp_path, patients=1, studies=1, series=1, per_series=3, tag="rh")
    data = made[0].path.read_bytes()
    expected = old_header_json(data)

    def no_dcmread(*_args: object, **_kwargs: object) -> None:
        raise AssertionError("dcmread was called")

    monkeypatch.setattr(dicom, "dcmread", no_dcmread)
    assert dataset_start(data[:4096]) == (144 + struct.unpack_from("<I", data, 140)[0],
                                          EXPLICIT_LE)
    assert header_json(BytesIO(data)) == expected


def part10(meta: bytes, dataset: bytes = b"\x08\x00\x16\x00UI\x02\x001\x00") -> bytes:
    group_length = b"\x02\x00\x00\x00UL\x04\x00" + struct.pack("<I", len(meta))
    return b"\x00" * 128 + b"DICM" + group_length + meta + dataset


def syntax_element(uid: str) -> bytes:
    value = uid.encode() + (b"\x00" if len(uid) % 2 else b"")
    return b"\x02\x00\x10\x00UI" + struct.pack("<H", len(value)) + value


def version_element() -> bytes:  # (0002,0001) OB: the long form of the length
    return b"\x02\x00\x01\x00OB\x00\x00" + struct.pack("<I", 2) + b"\x00\x01"


def test_dataset_start_finds_the_dataset_after_the_meta() -> None:
    meta = version_element() + syntax_element(EXPLICIT_LE)
    data = part10(meta)
    assert dataset_start(data) == (144 + len(meta), EXPLICIT_LE)


def test_dataset_start_gives_a_deflated_datasets_start_for_the_streamed_read() -> None:
    meta = syntax_element(DEFLATED)
    assert dataset_start(part10(meta)) == (144 + len(meta), DEFLATED)


@pytest.mark.parametrize("data", [
    part10(version_element()),                                        # no transfer syntax
    part10(syntax_element(EXPLICIT_LE), b"\x00\x00\x00\x00UL\x04\x00\x00\x00\x00\x00"),  # cmd
    b"\x00" * 128 + b"DICM" + syntax_element(EXPLICIT_LE) + b"\x08\x00\x16\x00",  # no length
    part10(syntax_element(EXPLICIT_LE), version_element()),           # meta past its length
    part10(syntax_element(EXPLICIT_LE))[:150],                        # cut short
    part10(syntax_element(EXPLICIT_LE)).replace(b"DICM", b"NOPE"),    # no Part-10 preamble
], ids=["no-syntax", "command-group", "meta-past-length", "no-group-length", "short",
        "no-dicm"])
def test_dataset_start_leaves_other_files_to_dcmread(data: bytes) -> None:
    assert dataset_start(data) is None


def test_a_group_length_that_disagrees_with_the_elements_goes_to_dcmread() -> None:
    meta = syntax_element(EXPLICIT_LE)
    data = bytearray(part10(meta))
    struct.pack_into("<I", data, 140, len(meta) - 2)
    assert dataset_start(bytes(data)) is None


@pytest.mark.parametrize("syntax", [EXPLICIT_LE, "1.2.840.10008.1.2", "1.2.840.10008.1.2.4.50"])
def test_the_gateways_own_file_meta_takes_the_direct_read(syntax: str) -> None:
    """What storage reads is what the gateway spooled: ``fastpath.file_meta`` + the dataset."""
    meta = file_meta("1.2.840.10008.5.1.4.1.1.4", "1.2.3.4", syntax)
    data = b"\x00" * 128 + b"DICM" + meta + b"\x08\x00\x16\x00"
    assert dataset_start(data) == (132 + len(meta), syntax)
