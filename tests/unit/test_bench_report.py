"""The ingest bench's "held open" figure (the whole stack, and the gateway's part of it) and the
ceiling the cores put on the acknowledged rate."""

from __future__ import annotations

import pytest

from bench.ingest import idle_text
from bench.report import Row, ceilings


def test_idle_text_names_the_gateways_share() -> None:
    parts = {"gateway": 0.2, "rabbitmq": 1.5, "s3": 0.6, "postgres": 0.04}
    assert idle_text(parts) == "2.3 % of a core (gateway 0.2 %)"


def test_idle_text_of_a_single_process_server() -> None:
    assert idle_text({"orthanc": 0.04}) == "0.0 % of a core"


def _row(kind: str, assoc: int, orthanc: float, cpu: float) -> Row:
    nan = float("nan")
    return Row(kind, assoc, 100, {"orthanc": orthanc, "minipacs": 100.0}, {},
               {"orthanc": 1.0, "minipacs": cpu}, {"orthanc": nan, "storescp": nan}, 1.0,
               {}, {}, {})


def test_ceiling_is_cores_times_the_indexing_allowance_over_cpu_per_instance() -> None:
    table = [_row("ct", 1, 120.0, 20.0), _row("ct", 4, 250.0, 15.0),
             _row("small", 4, 650.0, 8.0)]
    ct, small = ceilings(table, cores=2)
    assert (ct.kind, small.kind) == ("ct", "small")
    assert ct.most == pytest.approx(200.0)    # 2 x 1.5 / 15 ms
    assert ct.needed == pytest.approx(250.0)  # 1.0x Orthanc
    assert small.most == pytest.approx(375.0)
    assert small.needed == pytest.approx(455.0)  # 0.7x Orthanc
    assert "out of reach" in ct.line() and "at most 200 acknowledged/s" in ct.line()
    assert "needs 250/s" in ct.line()
    fast = ceilings([_row("ct", 4, 100.0, 15.0)], cores=2)[0]
    assert "not ruled out" in fast.line()


def test_no_ceiling_without_a_four_association_cell_or_a_figure() -> None:
    assert ceilings([_row("ct", 1, 120.0, 20.0)], cores=2) == []
    assert ceilings([_row("ct", 4, float("nan"), 20.0)], cores=2) == []
