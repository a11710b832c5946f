"""A structural walk of a Part-10 file: every element's header, no value decoded.

The gateway's check of each received instance (``shared.dicom.inspect_instance``): one pass over
the file that proves every element, sequence item and pixel data fragment lies inside the bytes
received (nothing truncated, nothing malformed) and picks up the few top-level UIDs we key on.
It replaces a pydicom parse of the header plus a second walk after the pixel data: the same
verdicts at a fraction of the CPU. The file is memory-mapped, so a 1 GB instance costs no more
memory than a small one. Deflated transfer syntaxes are not walked here (the caller uses
pydicom for them).

Sequences of defined length are walked too, item by item, and every item and element must end
within the defined length around it (PS3.5 7.5): one that runs past it is ``Overrun``. pydicom
reads such a file without a word (an item is read as far as the bytes go), while DCMTK refuses
it or reads the elements after the sequence as if they were inside it, so the index and a
downstream archive would see two different datasets. A sequence is known by its explicit VR
(SQ), or in implicit VR by the public data dictionary, as pydicom knows it; an undefined-length UN
value is a sequence in implicit VR little endian (PS3.5 6.2.2), and is walked as one.
"""

from __future__ import annotations

import mmap
import struct
from pathlib import Path

from pydicom.datadict import dictionary_VR, keyword_dict

UNDEFINED = 0xFFFFFFFF
ITEM, ITEM_END, SEQUENCE_END = 0xFFFEE000, 0xFFFEE00D, 0xFFFEE0DD
PIXEL_DATA = 0x7FE00010
_LONG_VRS = frozenset({b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"UC", b"UN", b"UR",
                       b"UT", b"SV", b"UV"})
# The public tags whose VR is SQ: how an implicit VR dataset says an element is a sequence.
_SQ_TAGS = frozenset(tag for tag in keyword_dict.values() if dictionary_VR(tag) == "SQ")
_MAX_DEPTH = 32


class Malformed(ValueError):
    """The bytes are not a well-formed DICOM file (the message says where it went wrong)."""


class Overrun(Malformed):
    """A sequence item or element runs past the end of the defined-length sequence or item
    that holds it: malformed whatever reads it (pydicom reads it silently, DCMTK refuses it or
    reads what follows as part of the sequence)."""


class _Walker:
    def __init__(self, buf: mmap.mmap | bytes, implicit: bool, little: bool,
                 wanted: frozenset[int]) -> None:
        self.buf = buf
        self.size = len(buf)
        self.implicit = implicit
        order = "<" if little else ">"
        self.implicit_head = struct.Struct(order + "HHL").unpack_from  # tag, 4-byte length
        self.explicit_head = struct.Struct(order + "HH2sH").unpack_from  # tag, VR, length
        self.long_length = struct.Struct(order + "L").unpack_from
        self.wanted = wanted
        self.found: dict[int, bytes] = {}
        self._un: _Walker | None = None

    def header(self, pos: int, end: int, bounded: bool) -> tuple[int, bytes | None, int, int]:
        """(tag, VR, value length, value position) of the element at ``pos``, which must end by
        ``end``. The VR is None in implicit VR (b"SQ" for a sequence of the dictionary) and
        for item tags."""
        if pos + 8 > end:
            raise self.past(bounded, f"the element header at byte {pos}", end,
                            "dataset truncated inside an element header")
        if self.implicit:
            group, elem, length = self.implicit_head(self.buf, pos)
            tag = group << 16 | elem
            return tag, b"SQ" if tag in _SQ_TAGS else None, length, pos + 8
        group, elem, vr, length = self.explicit_head(self.buf, pos)
        if group == 0xFFFE:
            return group << 16 | elem, None, self.long_length(self.buf, pos + 4)[0], pos + 8
        if vr in _LONG_VRS:
            if pos + 12 > end:
                raise self.past(bounded, f"the element header at byte {pos}", end,
                                "dataset truncated inside an element header")
            return group << 16 | elem, vr, self.long_length(self.buf, pos + 8)[0], pos + 12
        if not (65 <= vr[0] <= 90 and 65 <= vr[1] <= 90):
            raise Malformed(f"invalid value representation in element ({group:04X},{elem:04X})")
        return group << 16 | elem, vr, length, pos + 8

    @staticmethod
    def past(bounded: bool, what: str, end: int, truncated: str) -> Malformed:
        """The error for ``what`` running past ``end``: the end of a defined-length sequence or
        item (``bounded``), or else of the file."""
        if bounded:
            return Overrun(f"{what} runs past the end of the defined-length sequence or item "
                           f"that holds it (at byte {end} of the file)")
        return Malformed(truncated)

    def dataset(self, pos: int, end: int, depth: int, delimited: bool, bounded: bool) -> int:
        """Walk elements from ``pos`` to ``end`` (the end of the file, ``bounded`` False, or of
        a defined-length item or sequence); for an undefined-length item (``delimited``), up
        to and past its delimiter, which must come before ``end``. Return the position after
        them."""
        top = depth == 0
        while pos < end:
            tag, vr, length, value = self.header(pos, end, bounded)
            if tag == ITEM_END and delimited:
                return value
            if tag >> 16 == 0xFFFE:
                raise Malformed(f"unexpected item tag ({tag >> 16:04X},{tag & 0xFFFF:04X})")
            if length == UNDEFINED:
                pos = self.undefined(tag, vr, value, end, depth + 1, bounded)
                continue
            at, pos = pos, value + length
            if pos > end:
                raise self.past(bounded, f"element ({tag >> 16:04X},{tag & 0xFFFF:04X}) at "
                                f"byte {at}, {length} bytes long,", end,
                                "dataset truncated: an element is longer than the data received")
            if vr == b"SQ":
                self.items(value, pos, depth + 1, True, delimited=False, datasets=True)
            elif top and tag in self.wanted:
                self.found[tag] = bytes(self.buf[value:pos])
        if delimited:
            raise self.past(bounded, "an undefined-length sequence item", end,
                            "dataset truncated inside a sequence item")
        return pos

    def undefined(self, tag: int, vr: bytes | None, pos: int, end: int, depth: int,
                  bounded: bool) -> int:
        """The items of the undefined-length element ``tag`` from ``pos``, up to and past its
        sequence delimiter: a sequence's items, or pixel data fragments."""
        if vr == b"UN" and not self.implicit:  # a sequence in implicit VR little endian
            if self._un is None:
                self._un = _Walker(self.buf, True, True, frozenset())
            return self._un.items(pos, end, depth, bounded, delimited=True, datasets=True)
        datasets = vr == b"SQ" or (vr is None and tag != PIXEL_DATA)
        return self.items(pos, end, depth, bounded, delimited=True, datasets=datasets)

    def items(self, pos: int, end: int, depth: int, bounded: bool, delimited: bool,
              datasets: bool) -> int:
        """The items from ``pos``: of a defined-length sequence ending at ``end``, or of an
        undefined-length element (``delimited``) up to and past its sequence delimiter, which
        must come before ``end``. Each item is walked as a dataset (``datasets``), or is a
        pixel data fragment."""
        if depth > _MAX_DEPTH:
            raise Malformed("sequences nested too deeply")
        while pos < end or delimited:
            tag, _vr, length, value = self.header(pos, end, bounded)
            if tag == SEQUENCE_END and delimited:
                return value
            if tag != ITEM:
                raise Malformed("malformed sequence: expected an item")
            if length == UNDEFINED:
                pos = self.dataset(value, end, depth, delimited=True, bounded=bounded)
                continue
            at, pos = pos, value + length
            if pos > end:
                raise self.past(bounded, f"the sequence item at byte {at}, {length} bytes "
                                "long,", end, "dataset truncated inside a sequence item")
            if datasets:
                self.dataset(value, pos, depth, delimited=False, bounded=True)
        return pos


def meta_end(buf: mmap.mmap | bytes) -> int:
    """Position of the dataset after the preamble, ``DICM`` and the File Meta group."""
    if len(buf) < 144 or buf[128:132] != b"DICM":
        raise Malformed("not a DICOM Part-10 file")
    group, elem, vr, length = struct.unpack_from("<HH2sH", buf, 132)
    if (group, elem, vr, length) != (0x0002, 0x0000, b"UL", 4):
        raise Malformed("File Meta Information has no group length")
    end = 144 + int(struct.unpack_from("<L", buf, 140)[0])
    if end > len(buf):
        raise Malformed("File Meta Information truncated")
    return end


def walk_file(path: Path, implicit: bool, little: bool,
              wanted: frozenset[int]) -> dict[int, bytes]:
    """Walk the dataset of the Part-10 file at ``path``; return the raw values of the ``wanted``
    top-level tags that are present. Raises ``Malformed``, ``Overrun`` for an item or element
    longer than the defined-length sequence or item around it."""
    with path.open("rb") as fp:
        size = fp.seek(0, 2)
        if size == 0:
            raise Malformed("empty file")
        with mmap.mmap(fp.fileno(), 0, access=mmap.ACCESS_READ) as buf:
            walker = _Walker(buf, implicit, little, wanted)
            walker.dataset(meta_end(buf), size, 0, delimited=False, bounded=False)
            return walker.found
