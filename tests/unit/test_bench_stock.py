"""The stock-sender figures: medians per set and server, and the ratio to Orthanc."""

from __future__ import annotations

import math

from bench.stock import StockRun, lines, markdown, medians


def _run(server: str, kind: str, seconds: float, trial: int = 0, acked: int = 200) -> StockRun:
    return StockRun(server, kind, 200 if kind == "small" else 60, trial, acked, seconds)


def test_medians_and_ratio_per_set() -> None:
    runs = [_run("orthanc", "small", 10.0), _run("orthanc", "small", 8.0, 1),
            _run("orthanc", "small", 20.0, 2), _run("minipacs", "small", 1.0),
            _run("minipacs", "small", 2.0, 1), _run("minipacs", "small", 0.5, 2)]
    assert medians(runs) == {("small", "orthanc"): 20.0, ("small", "minipacs"): 200.0}
    assert "minipacs 200.0 inst/s, Orthanc 20.0 inst/s: 10.00x" in lines(runs)[0]
    table = markdown(runs, 3)
    assert "| small, 200 instances | 20.0 | 200.0 | 10.00x |" in table
    assert not any("NOT acknowledged" in row for row in table)


def test_a_set_not_measured_or_a_peer_at_zero_is_nan_not_an_error() -> None:
    runs = [_run("orthanc", "ct", 0.0, acked=0), _run("minipacs", "ct", 1.0, acked=60)]
    assert math.isnan(float(lines(runs)[1].rsplit(" ", 1)[1].rstrip("x")))
    assert "nan" in lines(runs)[0]  # the small set was not measured
    assert any("60 instance(s) sent by a stock `storescu` were NOT acknowledged" in row
               for row in markdown(runs, 1))
