"""The tools-as-shipped figures: medians per operation, set and server; ratio to Orthanc."""

from __future__ import annotations

import math

from bench.stock import StockRun, lines, markdown, medians


def _run(server: str, kind: str, seconds: float, trial: int = 0, acked: int = 200,
         got: int = 0, get_seconds: float = 0.0) -> StockRun:
    return StockRun(server, kind, 200 if kind == "small" else 60, trial, acked, seconds, got,
                    get_seconds)


def test_medians_and_ratio_per_row() -> None:
    runs = [_run("orthanc", "small", 10.0), _run("orthanc", "small", 8.0, 1),
            _run("orthanc", "small", 20.0, 2), _run("minipacs", "small", 1.0),
            _run("minipacs", "small", 2.0, 1), _run("minipacs", "small", 0.5, 2),
            _run("orthanc", "ct", 1.0, acked=60, got=60, get_seconds=3.0),
            _run("minipacs", "ct", 0.5, acked=60, got=60, get_seconds=0.1)]
    rates = medians(runs)
    assert rates[("C-STORE", "small", "orthanc")] == 20.0
    assert rates[("C-STORE", "small", "minipacs")] == 200.0
    assert rates[("C-GET", "ct", "orthanc")] == 20.0
    assert rates[("C-GET", "ct", "minipacs")] == 600.0
    printed = lines(runs)
    assert "minipacs 200.0 inst/s, Orthanc 20.0 inst/s: 10.00x" in printed[0]
    assert "`getscu`, C-GET, ct x60" in printed[2] and printed[2].endswith(": 30.00x")
    table = markdown(runs, 3)
    assert "| `storescu`, C-STORE, small, 200 instances | 20.0 | 200.0 | 10.00x |" in table
    assert "| `getscu`, C-GET, ct, 60 instances | 20.0 | 600.0 | 30.00x |" in table
    assert not any("NOT" in row for row in table)


def test_what_was_not_measured_is_nan_and_what_went_missing_is_said() -> None:
    runs = [_run("orthanc", "ct", 0.0, acked=0), _run("minipacs", "ct", 1.0, acked=60,
                                                     got=58, get_seconds=1.0)]
    printed = lines(runs)
    assert "nan" in printed[0]  # the small set was not measured
    assert printed[1].endswith("nanx")  # Orthanc acknowledged nothing: no ratio
    table = markdown(runs, 1)
    assert any("60 instance(s) sent by a stock `storescu` were NOT acknowledged" in row
               for row in table)
    assert any("2 instance(s) asked for by a stock `getscu` did NOT arrive" in row
               for row in table)
    assert math.isnan(medians(runs).get(("C-GET", "ct", "orthanc"), math.nan))
