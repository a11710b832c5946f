"""DICOM JSON (PS3.18 F.2) of a pydicom ``Dataset``, encoded from its raw elements.

pydicom's ``Dataset.to_json_dict`` converts every raw element to a ``DataElement`` (value
objects, validation, a log line per inline binary) before it writes the JSON: about 11 µs per
element, 0.3 ms for a 26-element header and over 1 ms for a typical modality header, in
storage, for every instance. ``to_json`` writes the same dictionary straight from the raw
bytes for the plain cases (little endian; the default, Latin-1 or UTF-8 character set;
the common VRs) and hands every other element to pydicom's own ``to_json_dict``, so the result
is pydicom's, element for element. ``tests/unit/test_dicomjson.py`` holds it to that.
"""

from __future__ import annotations

import base64
import re
import struct
from typing import Any

from pydicom import config
from pydicom.datadict import dictionary_VR
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset

_NUMBERS = {"US": ("H", 2), "SS": ("h", 2), "UL": ("L", 4), "SL": ("l", 4), "FL": ("f", 4),
            "FD": ("d", 8), "SV": ("q", 8), "UV": ("Q", 8)}
_BINARY = frozenset({"OB", "OD", "OF", "OL", "OV", "OW"})  # UN: pydicom may re-type it
_SPLIT_STRINGS = frozenset({"AS", "CS", "DA", "DT", "TM"})  # convert_string
_TEXT = frozenset({"SH", "LO", "UC"})  # convert_text: charset, split, rstrip each
_SINGLE_TEXT = frozenset({"ST", "LT", "UT"})  # convert_single_string
_CHARSET_VRS = _TEXT | _SINGLE_TEXT | {"PN"}
_IS = re.compile(r"\s*[+-]?\d+\s*\Z")
_DS = re.compile(r"\s*[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?\s*\Z")
# pydicom's Python codec names for a SpecificCharacterSet we decode here (absent: pydicom's
# default, ISO-8859-1 in practice); anything else goes to pydicom
_CHARSETS = {"": "latin_1", "ISO_IR 6": "latin_1", "ISO_IR 100": "latin_1",
             "ISO_IR 192": "utf_8"}


class _Defer(Exception):
    """This element is not a plain case: pydicom encodes it."""


def to_json(ds: Dataset, bulk_threshold: int = 4096, charset: str | None = None
            ) -> dict[str, Any]:
    """``ds.to_json_dict(bulk_threshold, handler)`` with a handler answering "" for every
    bulk data element (an empty ``BulkDataURI``). ``charset``: the enclosing dataset's, for
    a sequence item."""
    own = ds.get_item(0x00080005)
    if own is not None:
        charset = _charset(own)
    elif charset is None:
        charset = "latin_1"
    out: dict[str, Any] = {}
    for tag in ds.keys():
        elem = ds.get_item(tag, keep_deferred=True)
        if isinstance(elem, RawDataElement) and elem.value is None and elem.length:
            out[f"{tag:08X}"] = {"vr": _deferred_vr(elem), "BulkDataURI": ""}
            continue  # not read (``defer_size``): left out like any bulk value
        try:
            if not isinstance(elem, RawDataElement) or not elem.is_little_endian:
                raise _Defer
            out[f"{tag:08X}"] = _element(ds, elem, bulk_threshold, charset)
        except _Defer:
            out[f"{tag:08X}"] = ds[tag].to_json_dict(_no_uri, bulk_threshold)
    return out


def _no_uri(_elem: Any) -> str:
    return ""


def _deferred_vr(elem: RawDataElement) -> str:
    """The VR of an element whose value was not read: its own (explicit VR), else the data
    dictionary's (the last choice where it has several, as for OB or OW), else UN."""
    if elem.VR:
        return str(elem.VR)
    try:
        return str(dictionary_VR(elem.tag)).split(" or ")[-1]
    except KeyError:
        return "UN"


def _charset(elem: Any) -> str:
    """The codec for a SpecificCharacterSet element, or "" (defer every text element)."""
    if isinstance(elem, RawDataElement):
        value = (elem.value or b"").decode("latin_1").strip(" \x00")
    else:
        value = elem.value if isinstance(elem.value, str) else "\\".join(elem.value or [])
    return _CHARSETS.get(value.strip(), "")


def _element(ds: Dataset, raw: RawDataElement, threshold: int, charset: str) -> dict[str, Any]:
    vr = raw.VR
    if vr is None:  # implicit VR: public tags from the dictionary, the rest to pydicom
        if raw.tag >> 16 & 1:
            raise _Defer
        try:
            vr = dictionary_VR(raw.tag)
        except KeyError:
            raise _Defer from None
    value: bytes = raw.value or b""
    if vr in _NUMBERS:
        fmt, size = _NUMBERS[vr]
        if len(value) % size:
            raise _Defer
        numbers = struct.unpack(f"<{len(value) // size}{fmt}", value)
        return {"vr": vr, "Value": list(numbers)} if numbers else {"vr": vr}
    if vr in _BINARY:
        if not value:
            return {"vr": vr}
        if len(value) > (threshold // 4) * 3:
            return {"vr": vr, "BulkDataURI": ""}
        return {"vr": vr, "InlineBinary": base64.b64encode(value).decode("ascii")}
    if vr == "SQ":
        return {"vr": vr, "Value": [to_json(item, threshold, charset)
                                     for item in ds[raw.tag].value]}
    if raw.length == 0xFFFFFFFF:
        raise _Defer
    if vr == "AT":
        if len(value) % 4:
            raise _Defer
        pairs = struct.unpack(f"<{len(value) // 2}H", value)
        tags = [f"{pairs[i]:04X}{pairs[i + 1]:04X}" for i in range(0, len(pairs), 2)]
        return {"vr": vr, "Value": tags} if tags else {"vr": vr}
    text = value.decode("latin_1")  # pydicom's default_encoding for these VRs
    if vr in _SPLIT_STRINGS or vr == "UI":
        if config.datetime_conversion and vr in ("DA", "DT", "TM"):
            raise _Defer
        if vr == "UI":
            text = text.rstrip("\0 ")
        return _values(vr, text.rstrip(" \x00").split("\\"))
    if vr == "AE":
        return _values(vr, [s.strip() for s in text.split("\\")])
    if vr in ("IS", "DS"):  # convert_IS_string / convert_DS_string (DS strips both ends)
        items = (text.strip() if vr == "DS" else text).rstrip(" \x00").split("\\")
        if items == [""]:
            return {"vr": vr}
        pattern, number, numpy = ((_IS, int, config.use_IS_numpy) if vr == "IS"
                                  else (_DS, float, config.use_DS_numpy))
        if numpy or not all(pattern.match(s) for s in items):
            raise _Defer
        return {"vr": vr, "Value": [number(s) for s in items]}
    if vr == "UR":
        return _values(vr, [text.rstrip()])
    if vr not in _CHARSET_VRS or not charset:
        raise _Defer
    decoded = _decode(value, charset)
    if vr in _SINGLE_TEXT:
        return _values(vr, [decoded.rstrip("\0 ")])
    if vr in _TEXT:
        return _values(vr, [s.rstrip("\0 ") for s in decoded.split("\\")])
    return _names(_decode(value.rstrip(b"\x00 "), charset).split("\\"))


def _decode(value: bytes, charset: str) -> str:
    try:
        return value.decode(charset)
    except UnicodeDecodeError:  # pydicom replaces, with a warning: its business
        raise _Defer from None


def _values(vr: str, items: list[str]) -> dict[str, Any]:
    """pydicom's rule: one value that is empty means no value at all."""
    if items == [""]:
        return {"vr": vr}
    return {"vr": vr, "Value": items}


def _names(items: list[str]) -> dict[str, Any]:
    if items == [""]:
        return {"vr": "PN"}
    out = []
    for item in items:
        groups = item.split("=")
        while groups and not groups[-1]:
            groups.pop()
        if not groups or len(groups) > 3:
            raise _Defer
        name = {"Alphabetic": groups[0]}
        if len(groups) > 1:
            name["Ideographic"] = groups[1]
        if len(groups) > 2:
            name["Phonetic"] = groups[2]
        out.append(name)
    return {"vr": "PN", "Value": out}

