"""Pure tests of shared/query (identifier -> SQL, row -> response) and of the C-FIND handler."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Coroutine
from dataclasses import dataclass, field
from typing import Any, cast

import pytest
from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset

from services.gateway import statuses
from services.gateway.find import Finder
from shared.query import (
    PATIENT_ROOT,
    STUDY_ROOT,
    Options,
    QueryError,
    build_find,
    build_instances,
    like_pattern,
    response,
    time_upper,
)
from shared.settings import GatewaySettings

FIND_PATIENT = "1.2.840.10008.5.1.4.1.2.1.1"
FIND_STUDY = "1.2.840.10008.5.1.4.1.2.2.1"


def ident(level: str | None = "STUDY", **keys: Any) -> Dataset:
    ds = Dataset()
    if level is not None:
        ds.QueryRetrieveLevel = level
    for keyword, value in keys.items():
        setattr(ds, keyword, value)
    return ds


# ---- levels and the model ----------------------------------------------------------------------

@pytest.mark.parametrize(("model", "level"), [
    (STUDY_ROOT, None), (STUDY_ROOT, ""), (STUDY_ROOT, "PATIENT"), (PATIENT_ROOT, "FOO"),
    (PATIENT_ROOT, "SERIESX"),
])
def test_bad_levels_do_not_match_the_sop_class(model: str, level: str | None) -> None:
    with pytest.raises(QueryError) as err:
        build_find(ident(level, PatientID="X"), model, Options())
    assert err.value.kind == "identifier"


@pytest.mark.parametrize("level", ["Patient", "patient", "PATIENT "])
def test_level_is_case_insensitive_as_the_seed_writes_it(level: str) -> None:
    q = build_find(ident(level, PatientID="P1"), PATIENT_ROOT, Options())
    assert q.level == "PATIENT"
    assert "FROM patient p WHERE p.patient_id = $1" in q.sql
    assert q.args == ("P1",)


# ---- matching ----------------------------------------------------------------------------------

def test_values_are_parameters_never_sql() -> None:
    evil = "x'; DROP TABLE patient; --"
    q = build_find(ident("STUDY", PatientID=evil, PatientName=evil + "*",
                         AccessionNumber=evil, StudyDate=evil), STUDY_ROOT, Options())
    assert "DROP" not in q.sql and "x'" not in q.sql
    assert evil in q.args


def test_universal_matching_adds_no_condition_but_returns_the_key() -> None:
    q = build_find(ident("STUDY", PatientName="", StudyDate="", AccessionNumber="*"),
                   STUDY_ROOT, Options())
    assert " WHERE " not in q.sql and q.args == ()
    assert {r.keyword for r in q.returns} >= {"PatientName", "StudyDate", "AccessionNumber",
                                              "StudyInstanceUID"}


def test_single_value_and_list_of_uids() -> None:
    q = build_find(ident("STUDY", StudyInstanceUID="1.2.3"), STUDY_ROOT, Options())
    assert "st.study_instance_uid = $1" in q.sql and q.args == ("1.2.3",)
    q = build_find(ident("STUDY", StudyInstanceUID=["1.2.3", "1.2.4"]), STUDY_ROOT, Options())
    assert "st.study_instance_uid = ANY($1::text[])" in q.sql
    assert q.args == (["1.2.3", "1.2.4"],)


def test_like_pattern_escapes_sql_wildcards() -> None:
    assert like_pattern("a%b_c\\d*e?") == "a\\%b\\_c\\\\d%e_"


def test_wildcard_becomes_like_with_an_indexable_prefix_range() -> None:
    q = build_find(ident("STUDY", PatientID="AB_1*"), STUDY_ROOT, Options())
    assert "p.patient_id ~>=~ $2 AND p.patient_id ~<=~ $3 AND p.patient_id LIKE $1" in q.sql
    assert q.args == ("AB\\_1%", "AB_1", "AB_1\U0010ffff")
    q = build_find(ident("STUDY", PatientID="*X"), STUDY_ROOT, Options())
    assert "~>=~" not in q.sql and q.args == ("%X",)


def test_pn_case_is_an_option() -> None:
    q = build_find(ident("STUDY", PatientName="Doe^John"), STUDY_ROOT, Options())
    assert "lower(p.patient_name) = lower($1)" in q.sql
    q = build_find(ident("STUDY", PatientName="Doe^John"), STUDY_ROOT,
                   Options(pn_ignore_case=False))
    assert "p.patient_name = $1" in q.sql and "lower" not in q.sql


def test_pn_matches_on_the_alphabetic_group() -> None:
    q = build_find(ident("STUDY", PatientName="Yamada^Tarou=山田^太郎"), STUDY_ROOT, Options())
    assert q.args == ("Yamada^Tarou",)


@pytest.mark.parametrize(("value", "sql", "args"), [
    ("20240101", "st.study_date = $1", ("20240101",)),
    ("20240101-20240131", "st.study_date >= $1 AND st.study_date <= $2",
     ("20240101", "20240131")),
    ("20240101-", "st.study_date >= $1", ("20240101",)),
    ("-20240131", "st.study_date > '' AND st.study_date <= $1", ("20240131",)),
])
def test_date_ranges(value: str, sql: str, args: tuple[str, ...]) -> None:
    q = build_find(ident("STUDY", StudyDate=value), STUDY_ROOT, Options())
    assert f"WHERE {sql} ORDER BY" in q.sql
    assert q.args == args


def test_time_upper_bound_covers_its_precision() -> None:
    assert time_upper("10") == "109999.999999"
    assert time_upper("1015") == "101599.999999"
    assert time_upper("101530.5") == "101530.599999"
    assert time_upper("10:15") == "101599.999999"
    assert "101559" <= time_upper("1015") < "101600"


def test_time_range() -> None:
    q = build_find(ident("STUDY", StudyTime="0800-1000"), STUDY_ROOT, Options())
    assert q.args == ("0800", "100099.999999")


def test_date_and_time_ranges_match_as_one_datetime() -> None:
    q = build_find(ident("STUDY", StudyDate="20240101-20240102", StudyTime="2200-0200"),
                   STUDY_ROOT, Options())
    assert "(st.study_date || st.study_time) >= $1" in q.sql
    assert "(st.study_date || st.study_time) <= $2" in q.sql
    assert q.args[:2] == ("202401012200", "20240102020099.999999")
    assert "st.study_time >=" not in q.sql  # the time alone would wrongly cut the night
    assert "st.study_date >= $3 AND st.study_date <= $4" in q.sql  # the date's index still


def test_multiple_values_match_any() -> None:
    q = build_find(ident("STUDY", ModalitiesInStudy=["CT", "MR"]), STUDY_ROOT, Options())
    assert "EXISTS (SELECT 1 FROM series m WHERE m.study_fk = st.id AND m.modality = $1)" \
        in q.sql
    assert " OR " in q.sql and q.args == ("CT", "MR")


def test_integer_keys_and_a_bad_integer() -> None:
    q = build_find(ident("SERIES", StudyInstanceUID="1.2", SeriesNumber="3"), STUDY_ROOT,
                   Options())
    assert "se.series_number = $2" in q.sql and q.args == ("1.2", 3)


def test_a_bad_integer_matches_nothing() -> None:
    raw = (b"\x08\x00\x52\x00CS\x06\x00SERIES"  # QueryRetrieveLevel
           b"\x20\x00\x11\x00IS\x02\x00x ")   # SeriesNumber "x", as received
    ds = dcmread(DicomBytesIO(raw), force=True)
    assert "WHERE FALSE" in build_find(ds, STUDY_ROOT, Options()).sql


def test_keys_below_the_level_are_not_matched_nor_returned() -> None:
    q = build_find(ident("STUDY", Modality="CT", SOPInstanceUID="1.2"), STUDY_ROOT, Options())
    assert "modality" not in q.sql and "sop_instance_uid" not in q.sql
    assert {r.keyword for r in q.returns} == {"StudyInstanceUID"}


def test_counts_are_returned_not_matched() -> None:
    q = build_find(ident("STUDY", NumberOfStudyRelatedInstances="5"), STUDY_ROOT, Options())
    assert " WHERE " not in q.sql and "st.num_instances AS" in q.sql


def test_unique_keys_of_the_model_come_back_and_a_limit_plus_one() -> None:
    q = build_find(ident("IMAGE", SOPInstanceUID=""), PATIENT_ROOT, Options(limit=10))
    assert [r.keyword for r in q.returns][-3:] == ["PatientID", "StudyInstanceUID",
                                                   "SeriesInstanceUID"]
    assert q.sql.endswith("LIMIT 11")
    q = build_find(ident("IMAGE", SOPInstanceUID=""), STUDY_ROOT, Options(limit=None))
    assert "PatientID" not in {r.keyword for r in q.returns} and "LIMIT" not in q.sql


def test_keys_without_a_column_come_from_a_stored_header() -> None:
    q = build_find(ident("STUDY", InstitutionName=""), STUDY_ROOT, Options())
    assert "AS _header" in q.sql
    assert [r.alias for r in q.returns if r.keyword == "InstitutionName"] == [None]


# ---- responses ---------------------------------------------------------------------------------

def _encode(ds: Dataset) -> bytes:
    fp = DicomBytesIO()
    fp.is_little_endian, fp.is_implicit_VR = True, False
    write_dataset(fp, ds)
    return fp.getvalue()


def test_response_values_and_empty_keys() -> None:
    q = build_find(ident("STUDY", PatientName="", StudyDate="", ModalitiesInStudy="",
                         NumberOfStudyRelatedInstances="", AccessionNumber="",
                         RetrieveAETitle=""), STUDY_ROOT, Options())
    by_keyword = {"PatientName": "DOE^JOHN", "StudyDate": "20240102",
                  "ModalitiesInStudy": ["CT", "SR"], "NumberOfStudyRelatedInstances": 12,
                  "AccessionNumber": "", "StudyInstanceUID": "1.2.3"}
    row = {"_id": 1, **{r.alias: by_keyword[r.keyword] for r in q.returns if r.alias}}
    ds = response(q, row, Options(retrieve_aet="MINIPACS"))
    assert ds.QueryRetrieveLevel == "STUDY"
    assert str(ds.PatientName) == "DOE^JOHN" and ds.StudyDate == "20240102"
    assert list(ds.ModalitiesInStudy) == ["CT", "SR"]
    assert ds.NumberOfStudyRelatedInstances == 12
    assert "AccessionNumber" in ds and ds.AccessionNumber in ("", None)
    assert ds.RetrieveAETitle == "MINIPACS"
    assert "SpecificCharacterSet" not in ds
    _encode(ds)


def test_non_ascii_answers_declare_utf8() -> None:
    q = build_find(ident("PATIENT", PatientName="", SpecificCharacterSet="ISO_IR 100"),
                   PATIENT_ROOT, Options())
    by_keyword = {"PatientName": "Müller^Jürgen", "PatientID": "P1"}
    row = {"_id": 1, **{r.alias: by_keyword[r.keyword] for r in q.returns if r.alias}}
    ds = response(q, row, Options())
    assert ds.SpecificCharacterSet == "ISO_IR 192"
    assert "Müller".encode() in _encode(ds)
    name_alias = next(r.alias for r in q.returns if r.keyword == "PatientName")
    assert name_alias is not None
    ascii_row = {**row, name_alias: "MULLER"}
    assert response(q, ascii_row, Options()).SpecificCharacterSet in ("", None)


def test_header_keys_in_the_response() -> None:
    q = build_find(ident("IMAGE", SOPInstanceUID="", InstitutionName="", BodyPartThickness=""),
                   STUDY_ROOT, Options())
    header = {"00080080": {"vr": "LO", "Value": ["Hôpital"]}}
    row = {"_id": 1, "_header": json.dumps(header),
           **{r.alias: "1.2" for r in q.returns if r.alias}}
    ds = response(q, row, Options())
    assert ds.InstitutionName == "Hôpital" and ds.SpecificCharacterSet == "ISO_IR 192"
    assert "BodyPartThickness" in ds and ds.BodyPartThickness is None


# ---- retrieve ----------------------------------------------------------------------------------

def test_instances_need_the_levels_unique_key() -> None:
    with pytest.raises(QueryError):
        build_instances("STUDY", ident("STUDY", PatientID="P1"))
    with pytest.raises(QueryError):
        build_instances("STUDY", ident("STUDY", StudyInstanceUID=""))
    with pytest.raises(QueryError):
        build_instances("PATIENT", ident("PATIENT", PatientID="P*"))
    with pytest.raises(QueryError):
        build_instances("BOGUS", ident("BOGUS", PatientID="P1"))


def test_instances_of_series_list() -> None:
    sql, args = build_instances("SERIES", ident("SERIES", StudyInstanceUID="1.2",
                                                SeriesInstanceUID=["1.2.3", "1.2.4"]))
    assert "st.study_instance_uid = $1 AND se.series_instance_uid = ANY($2::text[])" in sql
    assert args == ("1.2", ["1.2.3", "1.2.4"])
    assert sql.startswith("SELECT i.sop_instance_uid, i.sop_class_uid, i.transfer_syntax, "
                          "i.object_key, i.size FROM instance i")


# ---- the C-FIND handler ------------------------------------------------------------------------

@dataclass
class FakeRequest:
    AffectedSOPClassUID: str
    MessageID: int = 7


@dataclass
class FakeEvent:
    identifier: Dataset
    request: FakeRequest
    cancel_after: int | None = None
    asked: int = 0
    assoc: object = field(default_factory=object)

    @property
    def is_cancelled(self) -> bool:
        self.asked += 1
        return self.cancel_after is not None and self.asked > self.cancel_after


class FakePool:
    def __init__(self, rows: list[dict[str, Any]] | Exception) -> None:
        self.rows = rows

    async def fetch(self, sql: str, *args: Any) -> list[dict[str, Any]]:
        if isinstance(self.rows, Exception):
            raise self.rows
        return self.rows


class FakeBridge:
    def run(self, coro: Coroutine[Any, Any, Any], timeout: float) -> Any:
        return asyncio.run(coro)


class TimeoutBridge:
    def run(self, coro: Coroutine[Any, Any, Any], timeout: float) -> Any:
        coro.close()
        raise TimeoutError("no answer")


def finder(rows: list[dict[str, Any]] | Exception, limit: int = 1000,
           bridge: Any = None) -> Finder:
    settings = GatewaySettings(find_limit=limit)
    return Finder(settings, FakePool(rows), bridge or FakeBridge(),  # type: ignore[arg-type]
                  lambda assoc: 1)


def rows(n: int) -> list[dict[str, Any]]:
    return [{"_id": i, "c1": f"1.2.{i}", "c2": f"1.2.{i}"} for i in range(n)]


def statuses_of(out: list[tuple[Any, Any]]) -> list[int]:
    return [s if isinstance(s, int) else int(s.Status) for s, _ in out]


def test_handler_yields_pending_then_success() -> None:
    event = FakeEvent(ident("STUDY", StudyInstanceUID=""), FakeRequest(FIND_STUDY))
    out = list(finder(rows(3)).on_find(event))  # type: ignore[arg-type]
    assert statuses_of(out) == [statuses.PENDING] * 3 + [statuses.SUCCESS]
    assert [cast(Dataset, ds).StudyInstanceUID for _, ds in out[:3]] == \
        ["1.2.0", "1.2.1", "1.2.2"]


def test_handler_honours_cancel() -> None:
    event = FakeEvent(ident("STUDY", StudyInstanceUID=""), FakeRequest(FIND_STUDY),
                      cancel_after=2)
    out = list(finder(rows(10)).on_find(event))  # type: ignore[arg-type]
    assert statuses_of(out) == [statuses.PENDING] * 2 + [statuses.CANCEL]


def test_handler_limit_sends_the_first_then_out_of_resources() -> None:
    event = FakeEvent(ident("STUDY", StudyInstanceUID=""), FakeRequest(FIND_STUDY))
    out = list(finder(rows(3), limit=2).on_find(event))  # type: ignore[arg-type]
    assert statuses_of(out) == [statuses.PENDING] * 2 + [statuses.OUT_OF_RESOURCES]
    last = out[-1][0]
    assert isinstance(last, Dataset)
    assert "more than 2 matches" in last.ErrorComment


@pytest.mark.parametrize(("identifier", "model", "status"), [
    (ident(None, PatientID="X"), FIND_STUDY, statuses.IDENTIFIER_DOES_NOT_MATCH),
    (ident("PATIENT", PatientID="X"), FIND_STUDY, statuses.IDENTIFIER_DOES_NOT_MATCH),
    (ident("PATIENT", PatientID="X"), "1.2.3.4", statuses.IDENTIFIER_DOES_NOT_MATCH),
])
def test_handler_refuses_bad_identifiers(identifier: Dataset, model: str, status: int) -> None:
    event = FakeEvent(identifier, FakeRequest(model))
    out = list(finder(rows(1)).on_find(event))  # type: ignore[arg-type]
    assert statuses_of(out) == [status] and out[0][1] is None
    first = out[0][0]
    assert isinstance(first, Dataset)
    assert first.ErrorComment


def test_handler_answers_out_of_resources_when_the_index_does_not() -> None:
    event = FakeEvent(ident("STUDY", StudyInstanceUID=""), FakeRequest(FIND_STUDY))
    out = list(finder(rows(1), bridge=TimeoutBridge()).on_find(event))  # type: ignore[arg-type]
    assert statuses_of(out) == [statuses.OUT_OF_RESOURCES]
    event = FakeEvent(ident("STUDY", StudyInstanceUID=""), FakeRequest(FIND_STUDY))
    out = list(finder(OSError("refused")).on_find(event))  # type: ignore[arg-type]
    assert statuses_of(out) == [statuses.OUT_OF_RESOURCES]


def test_handler_logs_no_identifiers_at_info(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level("INFO", "minipacs.gateway")
    event = FakeEvent(ident("STUDY", PatientID="SECRET-ID"),
                      FakeRequest(FIND_STUDY))
    list(finder(rows(2)).on_find(event))  # type: ignore[arg-type]
    info = [r.getMessage() for r in caplog.records if r.levelname == "INFO"]
    assert len(info) == 1 and "level=STUDY -> 2 matches" in info[0]
    assert "SECRET-ID" not in caplog.text


# ---- encode_response: the C-FIND match written without pydicom, same bytes -------------------

STUDY_KEYS = dict(PatientName="", PatientID="", StudyDate="", StudyTime="", AccessionNumber="",
                  StudyDescription="", StudyInstanceUID="", ModalitiesInStudy="",
                  NumberOfStudyRelatedInstances="")


def _values_for(query: Any, values: dict[str, Any]) -> dict[str, Any]:
    row: dict[str, Any] = {"_id": 1}
    for key in query.returns:
        row[key.alias] = values.get(key.keyword)
    return row


def _pydicom_bytes(ds: Dataset, implicit: bool) -> bytes:
    fp = DicomBytesIO()
    fp.is_implicit_VR, fp.is_little_endian = implicit, True
    write_dataset(fp, ds)
    return fp.getvalue()


@pytest.mark.parametrize("implicit", [True, False])
@pytest.mark.parametrize(("extra", "values"), [
    ({}, dict(PatientName="DOE^JOHN", PatientID="P1", StudyDate="20240102",
              StudyTime="101010", AccessionNumber="A1", StudyDescription="CT HEAD",
              StudyInstanceUID="1.2.3.45", ModalitiesInStudy=["CT", "SR"],
              NumberOfStudyRelatedInstances=301)),
    ({}, dict(PatientName="MÜLLER^JÖRG", PatientID="P12", StudyInstanceUID="1.2.3.4",
              StudyDescription="Schädel", NumberOfStudyRelatedInstances=0)),
    ({}, dict(PatientName="山田^太郎=ヤマダ^タロウ", PatientID="P123")),
    ({}, dict(PatientName="", PatientID=None, ModalitiesInStudy=[], StudyDate=None)),
    ({"SpecificCharacterSet": "", "RetrieveAETitle": ""},
     dict(PatientName="A^B", PatientID="P1", StudyInstanceUID="1.2")),
    ({"SpecificCharacterSet": "", "RetrieveAETitle": ""},
     dict(PatientName="Ärzte^X", StudyInstanceUID="1.2.3")),
])
def test_encode_response_is_what_pydicom_writes(implicit: bool, extra: dict[str, str],
                                                values: dict[str, Any]) -> None:
    from shared.query import encode_response

    for aet in ("MINIPACS", ""):
        opts = Options(retrieve_aet=aet)
        query = build_find(ident("STUDY", **STUDY_KEYS, **extra), STUDY_ROOT, opts)
        row = _values_for(query, values)
        raw = encode_response(query, row, opts, implicit)
        assert raw is not None
        assert raw == _pydicom_bytes(response(query, row, opts), implicit)


def test_encode_response_leaves_the_odd_cases_to_pydicom() -> None:
    from shared.query import encode_response

    opts = Options()
    with_header = build_find(ident("STUDY", StudyInstanceUID="", InstitutionName=""),
                             STUDY_ROOT, opts)
    assert with_header.needs_header
    assert encode_response(with_header, {"_id": 1, "_header": None}, opts, True) is None
    query = build_find(ident("STUDY", **STUDY_KEYS), STUDY_ROOT, opts)
    row = _values_for(query, dict(StudyDate=object()))  # not a str: pydicom's str() path
    assert encode_response(query, row, opts, True) is None
    row = _values_for(query, dict(StudyInstanceUID="1.2.Ü"))  # non-ASCII outside text VRs
    assert encode_response(query, row, opts, False) is None


@dataclass
class FakeContext:
    transfer_syntax: str


@pytest.mark.parametrize(("syntax", "encoded"), [("1.2.840.10008.1.2", True),
                                                 ("1.2.840.10008.1.2.1", True),
                                                 ("1.2.840.10008.1.2.2", False)])
def test_handler_sends_matches_pre_encoded_in_little_endian(syntax: str, encoded: bool) -> None:
    from services.gateway.fastpath import EncodedIdentifier, encode

    event = FakeEvent(ident("STUDY", StudyInstanceUID=""), FakeRequest(FIND_STUDY))
    event.context = FakeContext(syntax)  # type: ignore[attr-defined]
    handler = finder(rows(2))
    handler.pre_encoded = True
    out = list(handler.on_find(event))  # type: ignore[arg-type]
    assert statuses_of(out) == [statuses.PENDING] * 2 + [statuses.SUCCESS]
    for n, (_, ds) in enumerate(out[:2]):
        assert isinstance(ds, EncodedIdentifier) == encoded
        plain = ds.decoded() if isinstance(ds, EncodedIdentifier) else ds
        assert plain is not None
        assert plain.StudyInstanceUID == f"1.2.{n}" and plain.QueryRetrieveLevel == "STUDY"
        if isinstance(ds, EncodedIdentifier):  # pynetdicom's encode passes it through, or not
            assert encode(ds, ds.implicit, True) == ds.raw
            assert encode(ds, not ds.implicit, True) == _pydicom_bytes(plain, not ds.implicit)
