"""C-FIND identifiers -> parameterised SQL over the index, and index rows -> response identifiers.

The one query module every reader uses (gateway C-FIND / C-MOVE / C-GET, later QIDO-RS).
Everything but ``run_find`` and ``find_instances`` is pure: no connection, no I/O.

Matching follows PS3.4 C.2.2.2:

- universal: an empty value (or ``*``) matches everything and asks for the value back;
- single value: equality (``=``), case-insensitive for PN when ``pn_ignore_case``;
- list of values (backslash, ``MultiValue``): any of them (``= ANY($n)`` for UIDs);
- wild card: ``*`` and ``?`` become ``%`` and ``_`` in ``LIKE`` (``%``, ``_`` and ``\\`` in the
  value are escaped), with a literal prefix also written as a range so a btree index serves it;
- range: ``A-B``, ``A-``, ``-B`` for DA, TM and DT (string comparison on well-formed values;
  a TM upper bound is padded to the end of its precision); StudyDate + StudyTime ranges given
  together match as one date-time range.

Values are only ever passed as parameters (``$1``, ``$2``, ...); the SQL text is built from the
fixed column table below.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import asyncpg
from pydicom.datadict import dictionary_VR
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue
from pydicom.tag import Tag

LEVELS = ("PATIENT", "STUDY", "SERIES", "IMAGE")
RANK = {level: i for i, level in enumerate(LEVELS)}
PATIENT_ROOT = "PATIENT"
STUDY_ROOT = "STUDY"
UNIQUE = {"PATIENT": "PatientID", "STUDY": "StudyInstanceUID", "SERIES": "SeriesInstanceUID",
          "IMAGE": "SOPInstanceUID"}
# Keys that steer the query rather than match anything.
_CONTROL = {"QueryRetrieveLevel", "SpecificCharacterSet", "RetrieveAETitle",
            "QueryRetrieveView", "TimezoneOffsetFromUTC"}
_UTF8 = "ISO_IR 192"


class QueryError(ValueError):
    """The identifier cannot be run. ``kind`` picks the DIMSE status at the boundary:

    - ``"identifier"``: it does not match the SOP class (no or wrong QueryRetrieveLevel, a level
      the information model does not have, no unique key where a retrieve needs one);
    - ``"unprocessable"``: it matches the SOP class but a value cannot be read.
    """

    def __init__(self, kind: str, reason: str) -> None:
        super().__init__(reason)
        self.kind = kind
        self.reason = reason


@dataclass(frozen=True)
class Column:
    """One index column a key maps to. ``kind`` selects the matching rule."""

    keyword: str
    level: str
    sql: str
    kind: str  # uid | text | pn | date | time | int | count | modalities


_COLUMNS = [
    Column("PatientName", "PATIENT", "p.patient_name", "pn"),
    Column("PatientID", "PATIENT", "p.patient_id", "text"),
    Column("IssuerOfPatientID", "PATIENT", "p.issuer_of_patient_id", "text"),
    Column("PatientBirthDate", "PATIENT", "p.patient_birth_date", "date"),
    Column("PatientSex", "PATIENT", "p.patient_sex", "text"),
    Column("NumberOfPatientRelatedStudies", "PATIENT",
           "(SELECT count(*) FROM study c WHERE c.patient_fk = p.id)", "count"),
    Column("NumberOfPatientRelatedSeries", "PATIENT",
           "(SELECT coalesce(sum(c.num_series), 0) FROM study c WHERE c.patient_fk = p.id)",
           "count"),
    Column("NumberOfPatientRelatedInstances", "PATIENT",
           "(SELECT coalesce(sum(c.num_instances), 0) FROM study c WHERE c.patient_fk = p.id)",
           "count"),
    Column("StudyInstanceUID", "STUDY", "st.study_instance_uid", "uid"),
    Column("StudyDate", "STUDY", "st.study_date", "date"),
    Column("StudyTime", "STUDY", "st.study_time", "time"),
    Column("AccessionNumber", "STUDY", "st.accession_number", "text"),
    Column("StudyID", "STUDY", "st.study_id", "text"),
    Column("ReferringPhysicianName", "STUDY", "st.referring_physician_name", "pn"),
    Column("StudyDescription", "STUDY", "st.study_description", "text"),
    Column("ModalitiesInStudy", "STUDY",
           "(SELECT array_agg(DISTINCT c.modality ORDER BY c.modality) FROM series c "
           "WHERE c.study_fk = st.id AND c.modality <> '')", "modalities"),
    Column("NumberOfStudyRelatedSeries", "STUDY", "st.num_series", "count"),
    Column("NumberOfStudyRelatedInstances", "STUDY", "st.num_instances", "count"),
    Column("SeriesInstanceUID", "SERIES", "se.series_instance_uid", "uid"),
    Column("Modality", "SERIES", "se.modality", "text"),
    Column("SeriesNumber", "SERIES", "se.series_number", "int"),
    Column("SeriesDescription", "SERIES", "se.series_description", "text"),
    Column("SeriesDate", "SERIES", "se.series_date", "date"),
    Column("SeriesTime", "SERIES", "se.series_time", "time"),
    Column("BodyPartExamined", "SERIES", "se.body_part_examined", "text"),
    Column("NumberOfSeriesRelatedInstances", "SERIES", "se.num_instances", "count"),
    Column("SOPInstanceUID", "IMAGE", "i.sop_instance_uid", "uid"),
    Column("SOPClassUID", "IMAGE", "i.sop_class_uid", "uid"),
    Column("InstanceNumber", "IMAGE", "i.instance_number", "int"),
]
COLUMNS = {c.keyword: c for c in _COLUMNS}
# Date + time pairs that match as one date-time range when both are ranges.
_DATETIME_PAIRS = (("StudyDate", "StudyTime"), ("SeriesDate", "SeriesTime"))

_FROM = {
    "PATIENT": "patient p",
    "STUDY": "study st JOIN patient p ON p.id = st.patient_fk",
    "SERIES": "series se JOIN study st ON st.id = se.study_fk "
              "JOIN patient p ON p.id = st.patient_fk",
    "IMAGE": "instance i JOIN series se ON se.id = i.series_fk "
             "JOIN study st ON st.id = se.study_fk JOIN patient p ON p.id = st.patient_fk",
}
_ORDER = {"PATIENT": "p.id", "STUDY": "st.id", "SERIES": "se.id",
          "IMAGE": "se.id, i.instance_number, i.id"}
# One instance's header, for keys the index has no column for (returned, not matched).
_HEADER = {
    "PATIENT": "(SELECT h.header FROM study t JOIN series s ON s.study_fk = t.id "
               "JOIN instance h ON h.series_fk = s.id WHERE t.patient_fk = p.id LIMIT 1)",
    "STUDY": "(SELECT h.header FROM series s JOIN instance h ON h.series_fk = s.id "
             "WHERE s.study_fk = st.id LIMIT 1)",
    "SERIES": "(SELECT h.header FROM instance h WHERE h.series_fk = se.id LIMIT 1)",
    "IMAGE": "i.header",
}


@dataclass(frozen=True)
class Options:
    pn_ignore_case: bool = True
    limit: int | None = 1000
    retrieve_aet: str = ""


@dataclass(frozen=True)
class ReturnKey:
    tag: int
    keyword: str
    vr: str
    alias: str | None  # the SELECT alias of its column; None: from the header


@dataclass(frozen=True)
class FindQuery:
    level: str
    sql: str
    args: tuple[Any, ...]
    returns: tuple[ReturnKey, ...]
    limit: int | None
    want_charset: bool = False
    want_retrieve_aet: bool = False
    needs_header: bool = False
    matching: tuple[str, ...] = field(default_factory=tuple)  # keywords with a condition


@dataclass(frozen=True)
class InstanceRef:
    """What a retrieve needs to send one instance."""

    sop_instance_uid: str
    sop_class_uid: str
    transfer_syntax: str
    object_key: str
    size: int


class _Params:
    def __init__(self) -> None:
        self.values: list[Any] = []

    def add(self, value: Any) -> str:
        self.values.append(value)
        return f"${len(self.values)}"


# ---- reading the identifier ------------------------------------------------------------------

def query_level(identifier: Dataset, model: str | None = None) -> str:
    """The QueryRetrieveLevel, checked against the information model (PATIENT / STUDY root)."""
    try:
        raw = identifier.get("QueryRetrieveLevel")
    except Exception as exc:
        raise QueryError("identifier", "QueryRetrieveLevel cannot be read") from exc
    level = str(raw or "").strip().upper()
    if not level:
        raise QueryError("identifier", "no QueryRetrieveLevel")
    if level not in RANK:
        raise QueryError("identifier", f"unknown QueryRetrieveLevel {level[:16]!r}")
    if model == STUDY_ROOT and level == "PATIENT":
        raise QueryError("identifier", "PATIENT level is not part of the Study Root model")
    return level


def _values(elem: Any) -> list[str]:
    """The element's values as text ('' values dropped); PN as its alphabetic group."""
    value = elem.value
    if value is None or value == "":
        return []
    items = list(value) if isinstance(value, MultiValue | list | tuple) else [value]
    out = []
    for item in items:
        text = str(item if elem.VR != "PN" else str(item).split("=")[0]).strip()
        if text:
            out.append(text)
    return out


def _elements(identifier: Dataset) -> list[tuple[int, str, str, list[str] | None]]:
    """(tag, keyword, VR, values or None for a sequence) of every key in the identifier."""
    out = []
    try:
        for elem in identifier:
            tag = int(elem.tag)
            if elem.tag.group in (0x0000, 0x0002) or elem.tag.is_private:
                continue
            values = None if elem.VR == "SQ" else _values(elem)
            out.append((tag, elem.keyword or "", str(elem.VR), values))
    except QueryError:
        raise
    except Exception as exc:  # pydicom decodes lazily: a bad value surfaces here
        raise QueryError("unprocessable", f"identifier cannot be decoded: "
                                          f"{type(exc).__name__}") from exc
    return out


# ---- matching --------------------------------------------------------------------------------

def like_pattern(value: str) -> str:
    """DICOM wild cards -> a LIKE pattern (escape character ``\\``)."""
    out = []
    for ch in value:
        if ch in "\\%_":
            out.append("\\" + ch)
        elif ch == "*":
            out.append("%")
        elif ch == "?":
            out.append("_")
        else:
            out.append(ch)
    return "".join(out)


def _literal_prefix(value: str) -> str:
    cut = [i for i in (value.find("*"), value.find("?")) if i >= 0]
    return value[:min(cut)] if cut else value


def _text_condition(col: str, value: str, p: _Params, fold: bool) -> str:
    wrap = (lambda s: f"lower({s})") if fold else (lambda s: s)
    if "*" not in value and "?" not in value:
        return f"{wrap(col)} = {wrap(p.add(value))}"
    cond = f"{wrap(col)} LIKE {wrap(p.add(like_pattern(value)))} ESCAPE '\\'"
    prefix = _literal_prefix(value)
    if prefix:
        # The same prefix as a range: usable by a text_pattern_ops index even in a generic plan.
        cond = (f"{wrap(col)} ~>=~ {wrap(p.add(prefix))} AND "
                f"{wrap(col)} ~<=~ {wrap(p.add(prefix + chr(0x10FFFF)))} AND {cond}")
    return cond


def time_upper(value: str) -> str:
    """Pad a TM upper bound to the end of its precision: '10' -> '105959.999999'-like."""
    value = value.replace(":", "")
    main, _, frac = value.partition(".")
    main = main.ljust(6, "9")
    return f"{main}.{(frac + '999999')[:6]}"


def _range(value: str) -> tuple[str, str] | None:
    if value.count("-") != 1:
        return None
    low, high = (part.strip() for part in value.split("-"))
    return low, high


def _range_condition(col: str, value: str, p: _Params, kind: str) -> str:
    rng = _range(value)
    if rng is None:
        return f"{col} = {p.add(value.replace(':', '') if kind == 'time' else value)}"
    low, high = rng
    if kind == "time":
        low = low.replace(":", "")
        high = time_upper(high) if high else ""
    parts = [f"{col} >= {p.add(low)}" if low else f"{col} > ''"]
    if high:
        parts.append(f"{col} <= {p.add(high)}")
    return " AND ".join(parts)


def _one(column: Column, value: str, p: _Params, opts: Options) -> str:
    col, kind = column.sql, column.kind
    if kind in ("date", "time"):
        return _range_condition(col, value, p, kind)
    if kind == "int":
        try:
            return f"{col} = {p.add(int(value))}"
        except ValueError:
            return "FALSE"
    if kind == "modalities":
        inner = _text_condition("m.modality", value, p, fold=False)
        return f"EXISTS (SELECT 1 FROM series m WHERE m.study_fk = st.id AND {inner})"  # noqa: S608
    return _text_condition(col, value, p, fold=kind == "pn" and opts.pn_ignore_case)


def condition(column: Column, values: Sequence[str], p: _Params, opts: Options) -> str | None:
    """The WHERE condition for one key, or None for universal matching."""
    if column.kind == "count" or not values or "*" in values:
        return None
    if column.kind == "uid":
        if len(values) == 1:
            return f"{column.sql} = {p.add(values[0])}"
        return f"{column.sql} = ANY({p.add(list(values))}::text[])"
    conds = [_one(column, v, p, opts) for v in values]
    return conds[0] if len(conds) == 1 else "(" + " OR ".join(f"({c})" for c in conds) + ")"


def _datetime_condition(date: Column, time: Column, dvalue: str, tvalue: str,
                        p: _Params) -> str | None:
    drange, trange = _range(dvalue), _range(tvalue)
    if drange is None or trange is None:
        return None
    (dlow, dhigh), (tlow, thigh) = drange, trange
    both = f"({date.sql} || {time.sql})"
    parts = []
    if dlow:
        parts.append(f"{both} >= {p.add(dlow + tlow.replace(':', ''))}")
    if dhigh:
        parts.append(f"{both} <= {p.add(dhigh + time_upper(thigh or '23'))}")
    return " AND ".join(parts) or None


def _where(keys: dict[str, list[str]], level: str, p: _Params, opts: Options
           ) -> tuple[list[str], list[str]]:
    """Conditions for the keys at or above ``level`` (keys below it are not matched)."""
    conds: list[str] = []
    used: list[str] = []
    combined: set[str] = set()
    for date_kw, time_kw in _DATETIME_PAIRS:
        if len(keys.get(date_kw, [])) == 1 and len(keys.get(time_kw, [])) == 1 and \
                RANK[COLUMNS[date_kw].level] <= RANK[level]:
            dt = _datetime_condition(COLUMNS[date_kw], COLUMNS[time_kw], keys[date_kw][0],
                                     keys[time_kw][0], p)
            if dt:
                conds.append(dt)
                combined.add(time_kw)  # the date's own range still narrows through its index
    for keyword, values in keys.items():
        column = COLUMNS.get(keyword)
        if column is None or keyword in combined or RANK[column.level] > RANK[level]:
            continue
        cond = condition(column, values, p, opts)
        if cond:
            conds.append(cond)
            used.append(keyword)
    return conds, used


# ---- C-FIND ----------------------------------------------------------------------------------

def build_find(identifier: Dataset, model: str, opts: Options) -> FindQuery:
    """C-FIND identifier -> SQL, parameters and the keys to return, for ``model``
    (``PATIENT_ROOT`` or ``STUDY_ROOT``)."""
    if model not in (PATIENT_ROOT, STUDY_ROOT):
        raise QueryError("identifier", "not a Patient Root or Study Root C-FIND")
    level = query_level(identifier, model)
    elements = _elements(identifier)
    keys = {kw: vals for _, kw, _, vals in elements if kw in COLUMNS and vals is not None}
    p = _Params()
    conds, used = _where(keys, level, p, opts)

    select = [f"{_ORDER[level].split(',')[0]} AS _id"]
    returns: list[ReturnKey] = []
    seen: set[int] = set()
    needs_header = False
    want_charset = want_aet = False
    # The unique keys of this level and above come back even when not asked for.
    first = RANK["PATIENT"] if model == PATIENT_ROOT else RANK["STUDY"]
    implied = [UNIQUE[lv] for lv in LEVELS[first:RANK[level] + 1]]
    requested = [(t, kw, vr) for t, kw, vr, _ in elements]
    for kw in implied:
        if all(kw != r[1] for r in requested):
            requested.append((int(Tag(kw)), kw, dictionary_VR(kw)))
    for tag, keyword, vr in requested:
        if tag in seen:
            continue
        seen.add(tag)
        if keyword == "SpecificCharacterSet":
            want_charset = True
            continue
        if keyword == "RetrieveAETitle":
            want_aet = True
            continue
        if keyword in _CONTROL:
            continue
        column = COLUMNS.get(keyword)
        if column is not None:
            if RANK[column.level] > RANK[level]:
                continue  # a key below the query level: not part of this level's answer
            alias = f"c{len(select)}"
            select.append(f"{column.sql} AS {alias}")
            returns.append(ReturnKey(tag, keyword, vr, alias))
        else:
            needs_header = True
            returns.append(ReturnKey(tag, keyword, vr, None))
    if needs_header:
        select.append(f"{_HEADER[level]} AS _header")
    # Only fixed column SQL and $n placeholders are joined here; values travel as parameters.
    sql = f"SELECT {', '.join(select)} FROM {_FROM[level]}"  # noqa: S608
    if conds:
        sql += " WHERE " + " AND ".join(conds)
    sql += f" ORDER BY {_ORDER[level]}"
    if opts.limit is not None:
        sql += f" LIMIT {int(opts.limit) + 1}"  # one more, to know the limit was passed
    return FindQuery(level, sql, tuple(p.values), tuple(returns), opts.limit, want_charset,
                     want_aet, needs_header, tuple(used))


def _is_ascii(value: Any) -> bool:
    if isinstance(value, str):
        return value.isascii()
    if isinstance(value, list | tuple):
        return all(_is_ascii(v) for v in value)
    return True


def _header_value(header: dict[str, Any], tag: int) -> dict[str, Any] | None:
    elem = header.get(f"{tag:08X}")
    return elem if isinstance(elem, dict) else None


def response(query: FindQuery, row: Any, opts: Options) -> Dataset:
    """One index row -> the C-FIND response identifier (values as requested)."""
    ds = Dataset()
    header: dict[str, Any] = {}
    if query.needs_header and row["_header"] is not None:
        raw = row["_header"]
        header = json.loads(raw) if isinstance(raw, str) else dict(raw)
    values: list[tuple[ReturnKey, Any]] = []
    extra: dict[str, Any] = {}
    for key in query.returns:
        if key.alias is None:
            stored = _header_value(header, key.tag)
            if stored is not None:
                extra[f"{key.tag:08X}"] = stored
            else:
                values.append((key, None))
            continue
        value = row[key.alias]
        if value is None or value == "":
            values.append((key, None))
        elif isinstance(value, list):
            values.append((key, [str(v) for v in value]))
        else:
            values.append((key, value if isinstance(value, int) else str(value)))
    non_ascii = any(not _is_ascii(v) for _, v in values) or \
        not json.dumps(extra, ensure_ascii=True) == json.dumps(extra, ensure_ascii=False)
    if non_ascii:
        ds.SpecificCharacterSet = _UTF8
    elif query.want_charset:
        ds.add_new(0x00080005, "CS", None)
    ds.QueryRetrieveLevel = query.level
    if query.want_retrieve_aet:
        ds.RetrieveAETitle = opts.retrieve_aet or None
    for key, value in values:
        ds.add_new(key.tag, key.vr if key.vr not in ("", "UN") else "UN", value)
    if extra:
        try:
            from_header = Dataset.from_json(extra)
            for elem in from_header:
                ds.add(elem)
        except Exception:  # noqa: S110 - one odd stored value must not fail the whole answer
            pass
    return ds


# VRs ``encode_response`` writes itself (2-byte length in Explicit VR), and which of them take
# the response's character set (the others must be ASCII).
_TEXT_VRS = frozenset({"LO", "LT", "PN", "SH", "ST"})
_PLAIN_VRS = frozenset({"AE", "AS", "CS", "DA", "DS", "DT", "IS", "TM", "UI"}) | _TEXT_VRS
_QR_LEVEL, _RETRIEVE_AET, _CHARSET = 0x00080052, 0x00080054, 0x00080005


def _field(vr: str, value: Any, charset: str) -> bytes | None:
    """One element's value as pydicom writes it, or None for what only pydicom handles."""
    if value is None:
        return b""
    items = value if isinstance(value, list) else [value]
    parts: list[str] = []
    for item in items:
        if isinstance(item, bool) or not isinstance(item, str | int):
            return None
        if isinstance(item, int) and vr != "IS":
            return None
        parts.append(str(item))
    text = "\\".join(parts)
    if not text.isascii() and vr not in _TEXT_VRS:
        return None
    raw = text.encode(charset)
    if len(raw) % 2:
        raw += b"\0" if vr == "UI" else b" "
    return raw


def encode_response(query: FindQuery, row: Any, opts: Options, implicit: bool) -> bytes | None:
    """``response(query, row, opts)`` encoded in Implicit (``implicit``) or Explicit VR Little
    Endian, byte for byte what pydicom writes, without building a ``Dataset`` (a fifth of the
    cost, per match). None when the answer needs pydicom: keys read from the stored header,
    other VRs or value types, a value too long for its length field."""
    if query.needs_header:
        return None
    pairs: list[tuple[int, str, Any]] = []
    non_ascii = False
    for key in query.returns:
        if key.vr not in _PLAIN_VRS:
            return None
        value = row[key.alias]
        if value == "" or value == []:
            value = None
        non_ascii = non_ascii or not _is_ascii(value)
        pairs.append((key.tag, key.vr, value))
    if non_ascii:
        pairs.append((_CHARSET, "CS", _UTF8))
    elif query.want_charset:
        pairs.append((_CHARSET, "CS", None))
    pairs.append((_QR_LEVEL, "CS", query.level))
    if query.want_retrieve_aet:
        pairs.append((_RETRIEVE_AET, "AE", opts.retrieve_aet or None))
    charset = "utf-8" if non_ascii else "ascii"
    out = bytearray()
    for tag, vr, value in sorted(pairs, key=lambda p: p[0]):
        raw = _field(vr, value, charset)
        if raw is None or len(raw) > 0xFFFF:
            return None
        out += struct.pack("<HH", tag >> 16, tag & 0xFFFF)
        if implicit:
            out += struct.pack("<I", len(raw))
        else:
            out += vr.encode() + struct.pack("<H", len(raw))
        out += raw
    return bytes(out)


async def run_find(conn: asyncpg.Connection | asyncpg.Pool, query: FindQuery
                   ) -> list[asyncpg.Record]:
    """Run a built query; at most ``query.limit + 1`` rows (the extra one means: truncated)."""
    return list(await conn.fetch(query.sql, *query.args))


# ---- retrieve (C-MOVE / C-GET) -----------------------------------------------------------------

def build_instances(level: str, identifier: Dataset, opts: Options | None = None
                    ) -> tuple[str, tuple[Any, ...]]:
    """SQL selecting the instances a C-MOVE / C-GET at ``level`` asks for.

    The level's unique key must be there with values (a list is fine) and without wild cards:
    an empty key would mean "the whole archive"."""
    level = level.strip().upper()
    if level not in RANK:
        raise QueryError("identifier", f"unknown QueryRetrieveLevel {level[:16]!r}")
    keys = {kw: vals for _, kw, _, vals in _elements(identifier)
            if kw in COLUMNS and vals is not None}
    unique = keys.get(UNIQUE[level], [])
    if not unique:
        raise QueryError("identifier", f"no {UNIQUE[level]} for a {level} level retrieve")
    if any("*" in v or "?" in v for v in unique):
        raise QueryError("identifier", f"wild cards in {UNIQUE[level]} are not allowed in a "
                                       "retrieve")
    p = _Params()
    conds, _ = _where(keys, level, p, opts or Options(pn_ignore_case=False))
    where = " AND ".join(conds)  # fixed SQL and $n placeholders only
    sql = ("SELECT i.sop_instance_uid, i.sop_class_uid, i.transfer_syntax, i.object_key, "  # noqa: S608
           f"i.size FROM {_FROM['IMAGE']} WHERE {where} "
           "ORDER BY st.id, se.id, i.instance_number, i.id")
    return sql, tuple(p.values)


async def find_instances(conn: asyncpg.Connection | asyncpg.Pool, level: str,
                         identifier: Dataset) -> list[InstanceRef]:
    """The instances a C-MOVE / C-GET identifier at ``level`` selects (raises QueryError)."""
    sql, args = build_instances(level, identifier)
    rows = await conn.fetch(sql, *args)
    return [InstanceRef(r["sop_instance_uid"], r["sop_class_uid"], r["transfer_syntax"],
                        r["object_key"], int(r["size"])) for r in rows]


def describe_keys(identifier: Iterable[Any]) -> str:
    """Keywords and values, for DEBUG logs only (may contain patient identifiers)."""
    return ", ".join(f"{e.keyword or e.tag}={e.value!r}" for e in identifier)
