"""Memory stays bounded whatever an instance's header claims: the gateway's check and
storage's header read never hold a whole deflated dataset inflated, nor a large value before
the pixel data (an Encapsulated Document, Float Pixel Data). ``tracemalloc`` measures the
Python heap's peak during the call, where the bytes of pydicom's reads and of zlib's output
live."""

from __future__ import annotations

import tracemalloc
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TypeVar

import pytest

from shared.dicom import DEFLATED, EXPLICIT_LE, InvalidInstance, header_json, inspect_instance
from tests.dicomgen import (
    ENCAPSULATED_PDF,
    Made,
    document_parts,
    element,
    long_header,
    write_part10,
    zeros,
)

MiB = 1 << 20
DOC = Made(Path("unused"), "DOC-PAT", "1.2.826.0.1.3680043.8.498.2",
           "1.2.826.0.1.3680043.8.498.3", "1.2.826.0.1.3680043.8.498.1")
T = TypeVar("T")


def write(path: Path, syntax: str, parts: Iterator[bytes]) -> Path:
    return write_part10(path, ENCAPSULATED_PDF, DOC.sop_uid, syntax, parts)


def peak_of(call: Callable[[], T]) -> tuple[T, int]:
    tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        result = call()
        return result, tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


@pytest.fixture(scope="module")
def deflated_bomb(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """512 MiB of zeros in an Encapsulated Document, deflated to well under a megabyte."""
    path = write(tmp_path_factory.mktemp("bomb") / "bomb.dcm", DEFLATED,
                 document_parts(DOC, b"DOE^JANE", 512 * MiB))
    assert path.stat().st_size < 2 * MiB
    return path


def test_the_gateways_check_of_a_deflated_bomb_holds_a_bounded_head(deflated_bomb: Path) -> None:
    info, peak = peak_of(lambda: inspect_instance(deflated_bomb, ENCAPSULATED_PDF, DOC.sop_uid,
                                                  DEFLATED))
    assert (info.sop_instance_uid, info.study_instance_uid) == (DOC.sop_uid, DOC.study_uid)
    assert peak < 64 * MiB, f"peak {peak / MiB:.0f} MiB for a 512 MiB inflated dataset"


def test_storages_header_of_a_deflated_bomb_is_bounded(deflated_bomb: Path) -> None:
    header, peak = peak_of(lambda: header_json(deflated_bomb))
    assert header["00100010"] == {"vr": "PN", "Value": [{"Alphabetic": "DOE^JANE"}]}
    assert header["00420011"] == {"vr": "OB", "BulkDataURI": ""}
    assert peak < 64 * MiB, f"peak {peak / MiB:.0f} MiB for a 512 MiB inflated dataset"


def test_a_deflated_dataset_cut_short_is_refused_as_unreadable(tmp_path: Path) -> None:
    whole = write(tmp_path / "whole.dcm", DEFLATED, iter([
        element(0x0008, 0x0016, "UI", ENCAPSULATED_PDF.encode()),
        element(0x0008, 0x0018, "UI", DOC.sop_uid.encode()),
        element(0x0042, 0x0011, "OB", bytes(range(256)) * 64)]))
    data = whole.read_bytes()
    cut = tmp_path / "cut.dcm"
    cut.write_bytes(data[:len(data) - 40])
    with pytest.raises(InvalidInstance) as refused:
        inspect_instance(cut, ENCAPSULATED_PDF, DOC.sop_uid, DEFLATED)
    assert refused.value.kind == "unreadable"
    assert "cut short" in refused.value.reason


def test_a_dataset_that_is_not_deflate_data_is_refused_as_unreadable(tmp_path: Path) -> None:
    path = write(tmp_path / "garbage.dcm", DEFLATED, iter([]))
    path.write_bytes(path.read_bytes()[:-2] + b"\xff" * 64)  # no deflate stream after the meta
    with pytest.raises(InvalidInstance) as refused:  # zlib.error, once a traceback and 0xC211
        inspect_instance(path, ENCAPSULATED_PDF, DOC.sop_uid, DEFLATED)
    assert refused.value.kind == "unreadable"


def test_a_large_value_before_the_pixel_data_is_not_read(tmp_path: Path) -> None:
    def parts() -> Iterator[bytes]:
        yield from document_parts(DOC, b"DOE^JANE", 48 * MiB)
        yield long_header(0x7FE0, 0x0008, "OF", 48 * MiB)  # Float Pixel Data
        yield from zeros(48 * MiB)

    path = write(tmp_path / "doc.dcm", EXPLICIT_LE, parts())
    header, peak = peak_of(lambda: header_json(path))
    assert header["00420011"] == {"vr": "OB", "BulkDataURI": ""}
    assert header["00420012"] == {"vr": "LO", "Value": ["application/pdf"]}
    assert "7FE00008" not in header
    assert header["0020000D"] == {"vr": "UI", "Value": [DOC.study_uid]}
    assert peak < 16 * MiB, f"peak {peak / MiB:.0f} MiB for 96 MiB of values"


def test_a_value_not_read_that_runs_past_the_end_is_still_refused(tmp_path: Path) -> None:
    """The walk refuses it first; pydicom's reading, which then decides, skips the value
    (``defer_size``) and must still see that it runs past the end."""
    path = write(tmp_path / "short.dcm", EXPLICIT_LE, iter([
        element(0x0008, 0x0016, "UI", ENCAPSULATED_PDF.encode()),
        element(0x0008, 0x0018, "UI", DOC.sop_uid.encode()),
        long_header(0x0042, 0x0011, "OB", 8 * MiB), bytes(1024)]))
    with pytest.raises(InvalidInstance) as refused:
        inspect_instance(path, ENCAPSULATED_PDF, DOC.sop_uid, EXPLICIT_LE)
    assert refused.value.kind == "unreadable"
    assert "truncated" in refused.value.reason
