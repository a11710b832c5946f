"""The sent -> findable bench's pure parts: what a set should count, what a C-FIND answered,
and the summary and verdict it prints."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
from pydicom.dataset import Dataset

from bench.findable import (
    Findable,
    complete,
    expected_counts,
    found_counts,
    markdown,
    ratio,
    summarize,
    target_line,
)
from tests.dicomgen import small_set


def test_expected_counts_of_one_patient(tmp_path: Path) -> None:
    made = small_set(tmp_path, patients=1, per_series=5, tag="fx")
    patient, studies = expected_counts(m.path for m in made)
    assert patient == made[0].patient_id
    assert sorted(studies.values()) == [10, 10]
    assert set(studies) == {m.study_uid for m in made}


def test_expected_counts_refuses_two_patients(tmp_path: Path) -> None:
    made = small_set(tmp_path, patients=2, per_series=5, tag="fy")
    with pytest.raises(ValueError, match="one patient"):
        expected_counts(m.path for m in made)


def match(uid: str, count: str | None) -> Dataset:
    ds = Dataset()
    ds.StudyInstanceUID = uid
    if count is not None:
        ds.NumberOfStudyRelatedInstances = count
    return ds


def test_found_counts_and_completeness() -> None:
    found = found_counts([match("1.2.1", "10"), match("1.2.2", ""), match("1.2.3", None)])
    assert found == {"1.2.1": 10, "1.2.2": 0, "1.2.3": 0}
    assert complete({"1.2.1": 10}, found)
    assert not complete({"1.2.1": 10, "1.2.2": 10}, found)
    assert not complete({"1.2.9": 1}, found)  # a study not answered at all


def run(server: str, trial: int, acked: float, findable: float | None) -> Findable:
    return Findable(server, "small", 20, trial, acked, findable, 1)


def test_summary_ratio_and_verdict() -> None:
    runs = [run("orthanc", 0, 0.050, 0.055), run("orthanc", 1, 0.060, 0.064),
            run("minipacs", 0, 0.100, 0.140), run("minipacs", 1, 0.120, 0.150)]
    summaries = summarize(runs)
    mine = next(s for s in summaries if s.server == "minipacs")
    assert mine.acked_ms == pytest.approx(110)
    assert mine.findable_ms == pytest.approx(145)
    assert mine.lag_ms == pytest.approx(35)
    assert mine.worst_lag_ms == pytest.approx(40)
    assert ratio(summaries, "small", "findable_ms") == pytest.approx(145 / 59.5)
    assert target_line(summaries).startswith("PASS")
    text = "\n".join(markdown(summaries, 2))
    assert "| small | minipacs time / Orthanc time | 2.00x | 2.44x | |" in text


def test_a_set_never_findable_or_too_late_fails() -> None:
    never = summarize([run("orthanc", 0, 0.05, 0.05), run("minipacs", 0, 0.1, None)])
    assert target_line(never).startswith("FAIL") and "1 trial(s) never findable" in target_line(
        never)
    assert math.isnan(next(s for s in never if s.server == "minipacs").findable_ms)
    late = summarize([run("minipacs", 0, 0.1, 1.2)])
    assert target_line(late).startswith("FAIL")
    assert math.isnan(ratio(late, "small", "findable_ms"))  # no peer in this run
