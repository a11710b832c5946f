"""C-FIND end to end: DCMTK findscu (-P / -S, every level) and Orthanc as the client.

The data set is stored with storescu through the gateway, then queried once indexed. Every run
uses its own patient IDs and UIDs, so the shared session stack may hold anything else.
"""

from __future__ import annotations

import json
import re
import subprocess
import tempfile
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from pydicom import dcmread
from pydicom.dataset import Dataset

from scripts.native import Stack
from tests.conftest import TEST_NODES, dsn, make_stack, teardown
from tests.dicomgen import MR_IMAGE, make_instance, uid
from tests.helpers import dcmtk, dcmtk_env, pg, storescu, wait_until
from tests.orthanc import Orthanc, start_orthanc

pytestmark = pytest.mark.e2e
CT_IMAGE = "1.2.840.10008.5.1.4.1.1.2"


@dataclass
class FindResult:
    returncode: int
    responses: list[Dataset]
    final: str
    output: str

    def values(self, keyword: str) -> list[str]:
        return sorted(str(r.get(keyword, "")) for r in self.responses)


def findscu(port: int, keys: list[str], model: str = "-S", aet: str = "FINDSCU",
            extra: tuple[str, ...] = ()) -> FindResult:
    with tempfile.TemporaryDirectory() as out:
        cmd = [dcmtk("findscu"), "-v", model, "-aet", aet, "-aec", "MINIPACS", "-X", "-od", out,
               *extra, "127.0.0.1", str(port)]
        for key in keys:
            cmd += ["-k", key]
        proc = subprocess.run(cmd, capture_output=True, text=True, env=dcmtk_env(), timeout=60)
        responses: list[Dataset] = [dcmread(p) for p in sorted(Path(out).glob("rsp*.dcm"))]
    output = proc.stdout + proc.stderr
    final = re.findall(r"Received Final Find Response \(([^)]*)\)", output)
    return FindResult(proc.returncode, responses, final[-1] if final else "", output)


@dataclass
class Seeded:
    tag: str
    pid1: str
    pid2: str
    name1: str
    name2: str
    study_a: str
    study_b: str
    study_c: str
    series_a1: str
    series_a2: str
    series_b: str
    sops_a1: list[str]
    accession_b: str


def _seed(stack: Stack, root: Path) -> Seeded:
    tag = uuid.uuid4().hex[:8].upper()
    s = Seeded(
        tag=tag, pid1=f"FIND-{tag}-1", pid2=f"FIND-{tag}-2",
        name1=f"FIND{tag}^ALPHA", name2=f"Müller{tag}^Jürgen",
        study_a=uid(tag, "a"), study_b=uid(tag, "b"), study_c=uid(tag, "c"),
        series_a1=uid(tag, "a1"), series_a2=uid(tag, "a2"), series_b=uid(tag, "b1"),
        sops_a1=[uid(tag, "a1", n) for n in range(2)], accession_b=f"ACC{tag}")
    plan = [  # patient, name, study, date, accession, series, modality, sops, charset
        (s.pid1, s.name1, s.study_a, "20240105", "", s.series_a1, "CT", s.sops_a1, None),
        (s.pid1, s.name1, s.study_a, "20240105", "", s.series_a2, "CT",
         [uid(tag, "a2", n) for n in range(2)], None),
        (s.pid1, s.name1, s.study_b, "20240320", s.accession_b, s.series_b, "MR",
         [uid(tag, "b1", 0)], None),
        (s.pid2, s.name2, s.study_c, "20231231", "", uid(tag, "c1"), "MR",
         [uid(tag, "c1", 0)], "ISO_IR 192"),
    ]
    paths = []
    for n, (pid, name, study, date, acc, series, modality, sops, charset) in enumerate(plan):
        for i, sop in enumerate(sops):
            paths.append(make_instance(
                root / f"{n}_{i}.dcm", sop_class=CT_IMAGE if modality == "CT" else MR_IMAGE,
                sop_uid=sop, study_uid=study, series_uid=series, patient_id=pid,
                patient_name=name, rows=8, cols=8, modality=modality, instance_number=i + 1,
                study_date=date, accession=acc, series_number=n + 1, charset=charset))
    result = storescu(stack.config.gateway_port, paths)
    assert result.successes == len(paths), result.output
    studies = [s.study_a, s.study_b, s.study_c]
    wait_until(lambda: pg(dsn(stack), "SELECT count(*) AS n FROM instance i JOIN series se ON "
                          "se.id = i.series_fk JOIN study st ON st.id = se.study_fk "
                          "WHERE st.study_instance_uid = ANY($1)", studies)[0]["n"]
               == len(paths), 60, what="the seeded instances to be indexed")
    return s


@pytest.fixture(scope="module")
def data(stack: Stack, tmp_path_factory: pytest.TempPathFactory) -> Seeded:
    return _seed(stack, tmp_path_factory.mktemp("find"))


def test_seed_command_patient_level_by_patient_id(stack: Stack, data: Seeded) -> None:
    # The seed's own command: -P, QueryRetrieveLevel=Patient (mixed case), PatientID only.
    r = findscu(stack.config.gateway_port, ["QueryRetrieveLevel=Patient",
                                            f"PatientID={data.pid1}"], model="-P")
    assert r.final == "Success", r.output
    assert [x.PatientID for x in r.responses] == [data.pid1]


def test_patient_level_return_keys(stack: Stack, data: Seeded) -> None:
    r = findscu(stack.config.gateway_port, [
        "QueryRetrieveLevel=PATIENT", f"PatientID=FIND-{data.tag}-*", "PatientName",
        "PatientBirthDate", "NumberOfPatientRelatedStudies", "NumberOfPatientRelatedInstances"],
        model="-P")
    assert r.final == "Success", r.output
    by_id = {x.PatientID: x for x in r.responses}
    assert set(by_id) == {data.pid1, data.pid2}
    one = by_id[data.pid1]
    assert str(one.PatientName) == data.name1
    assert one.PatientBirthDate == "19700101"
    assert int(one.NumberOfPatientRelatedStudies) == 2
    assert int(one.NumberOfPatientRelatedInstances) == 5


@pytest.mark.parametrize("model", ["-P", "-S"])
def test_study_level_by_patient_id(stack: Stack, data: Seeded, model: str) -> None:
    r = findscu(stack.config.gateway_port, [
        "QueryRetrieveLevel=STUDY", f"PatientID={data.pid1}", "StudyInstanceUID", "StudyDate",
        "PatientName", "ModalitiesInStudy", "NumberOfStudyRelatedSeries",
        "NumberOfStudyRelatedInstances", "AccessionNumber"], model=model)
    assert r.final == "Success", r.output
    by_uid = {x.StudyInstanceUID: x for x in r.responses}
    assert set(by_uid) == {data.study_a, data.study_b}
    a, b = by_uid[data.study_a], by_uid[data.study_b]
    assert (a.StudyDate, b.StudyDate) == ("20240105", "20240320")
    assert (a.ModalitiesInStudy, b.ModalitiesInStudy) == ("CT", "MR")
    assert (int(a.NumberOfStudyRelatedSeries), int(a.NumberOfStudyRelatedInstances)) == (2, 4)
    assert b.AccessionNumber == data.accession_b
    assert all(x.QueryRetrieveLevel == "STUDY" for x in r.responses)


@pytest.mark.parametrize(("dates", "expected"), [
    ("20240101-20240131", "a"), ("20240301-", "b"), ("-20240101", "c"), ("20240105", "a"),
    ("20230101-20241231", "abc"), ("20250101-", ""),
])
def test_study_date_ranges(stack: Stack, data: Seeded, dates: str, expected: str) -> None:
    r = findscu(stack.config.gateway_port, ["QueryRetrieveLevel=STUDY",
                                            f"PatientID=FIND-{data.tag}-?", f"StudyDate={dates}",
                                            "StudyInstanceUID"])
    assert r.final == "Success", r.output
    names = {data.study_a: "a", data.study_b: "b", data.study_c: "c"}
    assert "".join(sorted(names[u] for u in r.values("StudyInstanceUID"))) == expected


@pytest.mark.parametrize(("name", "count"), [
    ("FIND{tag}^ALPHA", 2), ("find{tag}*", 2), ("FIND{tag}^ALPH?", 2), ("*{tag}^ALPHA", 2),
    ("FIND{tag}^BETA", 0), ("FIND{tag}", 0),
])
def test_patient_name_matching(stack: Stack, data: Seeded, name: str, count: int) -> None:
    r = findscu(stack.config.gateway_port, ["QueryRetrieveLevel=STUDY",
                                            f"PatientName={name.format(tag=data.tag)}",
                                            "StudyInstanceUID"])
    assert r.final == "Success", r.output
    assert len(r.responses) == count, r.output


def test_accession_and_modalities_in_study(stack: Stack, data: Seeded) -> None:
    port = stack.config.gateway_port
    r = findscu(port, ["QueryRetrieveLevel=STUDY", f"AccessionNumber={data.accession_b}",
                       "StudyInstanceUID"])
    assert r.values("StudyInstanceUID") == [data.study_b], r.output
    r = findscu(port, ["QueryRetrieveLevel=STUDY", f"PatientID={data.pid1}",
                       "ModalitiesInStudy=MR", "StudyInstanceUID"])
    assert r.values("StudyInstanceUID") == [data.study_b], r.output
    r = findscu(port, ["QueryRetrieveLevel=STUDY", f"PatientID={data.pid1}",
                       "ModalitiesInStudy=CT\\MR", "StudyInstanceUID"])
    assert len(r.responses) == 2, r.output


@pytest.mark.parametrize("model", ["-P", "-S"])
def test_series_level(stack: Stack, data: Seeded, model: str) -> None:
    keys = ["QueryRetrieveLevel=SERIES", f"StudyInstanceUID={data.study_a}", "SeriesInstanceUID",
            "Modality", "SeriesNumber", "NumberOfSeriesRelatedInstances"]
    if model == "-P":
        keys.append(f"PatientID={data.pid1}")
    r = findscu(stack.config.gateway_port, keys, model=model)
    assert r.final == "Success", r.output
    assert r.values("SeriesInstanceUID") == sorted([data.series_a1, data.series_a2])
    assert {x.Modality for x in r.responses} == {"CT"}
    assert [int(x.NumberOfSeriesRelatedInstances) for x in r.responses] == [2, 2]
    assert all(x.StudyInstanceUID == data.study_a for x in r.responses)


@pytest.mark.parametrize("model", ["-P", "-S"])
def test_image_level(stack: Stack, data: Seeded, model: str) -> None:
    keys = ["QueryRetrieveLevel=IMAGE", f"StudyInstanceUID={data.study_a}",
            f"SeriesInstanceUID={data.series_a1}", "SOPInstanceUID", "SOPClassUID",
            "InstanceNumber", "SeriesDescription"]
    if model == "-P":
        keys.append(f"PatientID={data.pid1}")
    r = findscu(stack.config.gateway_port, keys, model=model)
    assert r.final == "Success", r.output
    assert r.values("SOPInstanceUID") == sorted(data.sops_a1)
    assert {x.SOPClassUID for x in r.responses} == {CT_IMAGE}
    assert [int(x.InstanceNumber) for x in r.responses] == [1, 2]
    assert {x.SeriesDescription for x in r.responses} == {"CT series 1"}  # from the header


def test_list_of_uids(stack: Stack, data: Seeded) -> None:
    r = findscu(stack.config.gateway_port, [
        "QueryRetrieveLevel=STUDY", f"StudyInstanceUID={data.study_a}\\{data.study_c}\\1.2.3.4",
        "PatientID"])
    assert r.final == "Success", r.output
    assert r.values("StudyInstanceUID") == sorted([data.study_a, data.study_c])


def test_non_ascii_name_answered_in_utf8(stack: Stack, data: Seeded) -> None:
    r = findscu(stack.config.gateway_port, [
        "SpecificCharacterSet=ISO_IR 192", "QueryRetrieveLevel=STUDY",
        f"PatientName=müller{data.tag}*", "PatientID", "StudyInstanceUID"])
    assert r.final == "Success", r.output
    assert len(r.responses) == 1, r.output
    rsp = r.responses[0]
    assert rsp.SpecificCharacterSet == "ISO_IR 192"
    assert str(rsp.PatientName) == data.name2
    assert rsp.PatientID == data.pid2
    # an ASCII query with a non-ASCII match still gets UTF-8, declared
    r = findscu(stack.config.gateway_port, ["QueryRetrieveLevel=PATIENT",
                                            f"PatientID={data.pid2}", "PatientName"], model="-P")
    assert r.responses[0].SpecificCharacterSet == "ISO_IR 192", r.output
    assert str(r.responses[0].PatientName) == data.name2


@pytest.mark.parametrize(("model", "keys"), [
    ("-S", ["PatientID=X"]),                                  # no QueryRetrieveLevel
    ("-S", ["QueryRetrieveLevel=PATIENT", "PatientID=X"]),    # no PATIENT level in Study Root
    ("-P", ["QueryRetrieveLevel=FOO", "PatientID=X"]),        # no such level
])
def test_malformed_identifier_refused(stack: Stack, model: str, keys: list[str]) -> None:
    r = findscu(stack.config.gateway_port, keys, model=model)
    # 0xA900, which DCMTK names after C-STORE's meaning of the same code
    assert r.final == "Error: DataSetDoesNotMatchSOPClass", r.output
    assert r.responses == []
    assert "C-FIND" in wait_until(lambda: _refused_line(stack), 10, what="the refusal log line")


def _refused_line(stack: Stack) -> str:
    lines = [x for x in stack.log_text("gateway").splitlines() if "C-FIND" in x and "refused" in x]
    return lines[-1] if lines else ""


def test_one_info_line_per_find_without_patient_data(stack: Stack, data: Seeded) -> None:
    r = findscu(stack.config.gateway_port, ["QueryRetrieveLevel=STUDY",
                                            f"PatientID={data.pid1}", "PatientName"])
    assert r.final == "Success", r.output
    line = wait_until(lambda: [x for x in stack.log_text("gateway").splitlines()
                               if "C-FIND study-root level=STUDY -> 2 matches" in x], 10,
                      what="the C-FIND log line")[-1]
    assert "INFO" in line and re.search(r"\d+\.\d ms", line)
    log = stack.log_text("gateway")
    assert data.pid1 not in log and data.tag not in log


# ---- Orthanc as the client -------------------------------------------------------------------

@pytest.fixture(scope="module")
def orthanc_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Stack, Orthanc]]:
    """A stack of its own that knows Orthanc's AE title (and sends at most 3 matches)."""
    tmp = tmp_path_factory.mktemp("orthanc-find")
    nodes = {**TEST_NODES, "orthanc": ["ORTHANCQ", "127.0.0.1", 4242]}
    s = make_stack(tmp, "find", MINIPACS_NODES=json.dumps(nodes), MINIPACS_FIND_LIMIT="3")
    s.start()
    orthanc = None
    try:
        orthanc = start_orthanc(tmp / "orthanc", "ORTHANCQ", {
            "minipacs": ["MINIPACS", "127.0.0.1", s.config.gateway_port]})
        yield s, orthanc
    finally:
        if orthanc:
            orthanc.stop()
        teardown(s)


def _orthanc_query(orthanc: Orthanc, level: str, query: dict[str, str]) -> list[dict[str, str]]:
    made = orthanc.rest("POST", "/modalities/minipacs/query", {"Level": level, "Query": query})
    path = made["Path"]
    answers = orthanc.rest("GET", f"{path}/answers")
    return [orthanc.rest("GET", f"{path}/answers/{i}/content?simplify") for i in answers]


def test_orthanc_queries_every_level(orthanc_stack: tuple[Stack, Orthanc],
                                     tmp_path: Path) -> None:
    s, orthanc = orthanc_stack
    data = _seed(s, tmp_path)
    patients = _orthanc_query(orthanc, "Patient", {"PatientID": data.pid1, "PatientName": ""})
    assert [(p["PatientID"], p["PatientName"]) for p in patients] == [(data.pid1, data.name1)]
    studies = _orthanc_query(orthanc, "Study", {"PatientID": data.pid1, "StudyDate": "20240101-",
                                                "StudyInstanceUID": "", "ModalitiesInStudy": ""})
    assert sorted(x["StudyInstanceUID"] for x in studies) == sorted([data.study_a, data.study_b])
    series = _orthanc_query(orthanc, "Series", {"StudyInstanceUID": data.study_a,
                                                "SeriesInstanceUID": "", "Modality": ""})
    assert sorted(x["SeriesInstanceUID"] for x in series) == sorted([data.series_a1,
                                                                     data.series_a2])
    images = _orthanc_query(orthanc, "Instance", {"StudyInstanceUID": data.study_a,
                                                  "SeriesInstanceUID": data.series_a1,
                                                  "SOPInstanceUID": ""})
    assert sorted(x["SOPInstanceUID"] for x in images) == sorted(data.sops_a1)
    named = _orthanc_query(orthanc, "Study", {"PatientName": f"müller{data.tag}*",
                                              "PatientID": ""})
    assert [(x["PatientID"], x["PatientName"]) for x in named] == [(data.pid2, data.name2)]


def test_limit_sends_the_first_matches_then_out_of_resources(
        orthanc_stack: tuple[Stack, Orthanc], tmp_path: Path) -> None:
    s, _ = orthanc_stack
    data = _seed(s, tmp_path)
    r = findscu(s.config.gateway_port, ["QueryRetrieveLevel=IMAGE",
                                        f"StudyInstanceUID={data.study_a}", "SOPInstanceUID"])
    assert len(r.responses) == 3, r.output
    assert r.final == "Refused: OutOfResources", r.output  # 0xA700
