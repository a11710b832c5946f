"""The indexer's batch write (``services/indexer/store.py``) against PostgreSQL: new, repeated
and conflicting instances in one batch and across batches, and the derived counts."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import asyncpg
import pytest

from services.indexer.store import write_batch
from shared.messages import InstanceStored
from tests.integration.conftest import migrated_database


@pytest.fixture
async def conn() -> AsyncIterator[asyncpg.Connection]:
    async with migrated_database("minipacs_batches") as c:
        yield c


def stored(sop: str, series: str = "1.2.3.1", study: str = "1.2.3", sha: str = "a",
           number: int = 1, patient: str = "P1",
           received: str = "2026-11-26T10:00:00+00:00") -> InstanceStored:
    sha256 = (sha * 64)[:64]
    header = {"00100020": {"vr": "LO", "Value": [patient]},
              "00100010": {"vr": "PN", "Value": [{"Alphabetic": "Müller^Jörg"}]},
              "0020000D": {"vr": "UI", "Value": [study]},
              "0020000E": {"vr": "UI", "Value": [series]},
              "00080060": {"vr": "CS", "Value": ["CT"]},
              "00080018": {"vr": "UI", "Value": [sop]},
              "00200013": {"vr": "IS", "Value": [number]}}
    return InstanceStored(sop_instance_uid=sop, sop_class_uid="1.2.840.10008.5.1.4.1.1.2",
                          study_instance_uid=study, series_instance_uid=series,
                          transfer_syntax="1.2.840.10008.1.2.1", size=100, sha256=sha256,
                          object_key=f"instances/{sha256[:2]}/{sha256}.dcm",
                          calling_aet="CT1", received_at=received,
                          header=header)


async def test_one_batch_of_new_repeated_and_conflicting_instances(
        conn: asyncpg.Connection) -> None:
    first = await write_batch(conn, [stored("1.9.1", number=1), stored("1.9.2", number=2),
                                     stored("1.9.3", series="1.2.3.2", number=3)])
    assert (first.inserted, first.duplicates, first.conflicts) == (3, 0, 0)

    # redelivered (same bytes), repeated within the batch, a new one, and a conflict
    second = await write_batch(conn, [stored("1.9.1"), stored("1.9.4"), stored("1.9.4"),
                                      stored("1.9.2", sha="b")])
    assert (second.inserted, second.duplicates, second.conflicts) == (1, 2, 1)

    rows = await conn.fetch("SELECT sop_instance_uid, sha256, instance_number, header, "
                            "calling_aet FROM instance ORDER BY sop_instance_uid")
    assert [r["sop_instance_uid"] for r in rows] == ["1.9.1", "1.9.2", "1.9.3", "1.9.4"]
    assert rows[1]["sha256"] == "a" * 64  # keep-first
    assert rows[2]["instance_number"] == 3
    assert "Müller^Jörg" in rows[0]["header"]
    conflicts = await conn.fetch("SELECT sop_instance_uid, kept_sha256, rejected_sha256 "
                                 "FROM ingest_conflict")
    assert [tuple(r) for r in conflicts] == [("1.9.2", "a" * 64, "b" * 64)]

    counts = {r["series_instance_uid"]: r["num_instances"] for r in await conn.fetch(
        "SELECT series_instance_uid, num_instances FROM series")}
    assert counts == {"1.2.3.1": 3, "1.2.3.2": 1}
    study = await conn.fetchrow("SELECT num_series, num_instances FROM study")
    assert (study["num_series"], study["num_instances"]) == (2, 4)
    assert await conn.fetchval("SELECT count(*) FROM patient") == 1


async def hierarchy(conn: asyncpg.Connection) -> dict[str, Any]:
    """What C-FIND would see: each instance's bytes and place, and the parents' counts."""
    return {
        "instances": {r[0]: tuple(r[1:]) for r in await conn.fetch(
            "SELECT i.sop_instance_uid, left(i.sha256, 1), se.series_instance_uid, "
            "st.study_instance_uid, p.patient_id FROM instance i "
            "JOIN series se ON se.id = i.series_fk JOIN study st ON st.id = se.study_fk "
            "JOIN patient p ON p.id = st.patient_fk")},
        "series": {r[0]: r[1] for r in await conn.fetch(
            "SELECT series_instance_uid, num_instances FROM series")},
        "studies": {r[0]: (r[1], r[2]) for r in await conn.fetch(
            "SELECT study_instance_uid, num_series, num_instances FROM study")},
        "patients": {r[0] for r in await conn.fetch("SELECT patient_id FROM patient")},
    }


async def conflicts(conn: asyncpg.Connection) -> list[tuple[str, str, str, str]]:
    return [tuple(r) for r in await conn.fetch(
        "SELECT sop_instance_uid, left(kept_sha256, 1), left(rejected_sha256, 1), policy "
        "FROM ingest_conflict ORDER BY id")]


T0, T1, T2 = (f"2026-11-26T10:0{m}:00+00:00" for m in (0, 1, 2))


async def test_keep_first_a_conflicting_copy_naming_other_parents_leaves_none_behind(
        conn: asyncpg.Connection) -> None:
    """The refused copy names another patient, study and series: the upserts create them
    before its instance row is refused; none may stay behind empty (C-FIND would show a
    patient or study without instances)."""
    await write_batch(conn, [stored("1.9.1")])
    result = await write_batch(conn, [stored("1.9.1", sha="b", patient="P2", study="9.9",
                                             series="9.9.1", received=T1)])
    assert (result.inserted, result.conflicts, result.replaced) == (0, 1, 0)
    assert await hierarchy(conn) == {
        "instances": {"1.9.1": ("a", "1.2.3.1", "1.2.3", "P1")},
        "series": {"1.2.3.1": 1}, "studies": {"1.2.3": (1, 1)}, "patients": {"P1"}}
    assert await conflicts(conn) == [("1.9.1", "a", "b", "keep-first")]


@pytest.mark.parametrize("overwrite", [False, True])
async def test_two_copies_in_one_batch_naming_different_series_count_once(
        conn: asyncpg.Connection, overwrite: bool) -> None:
    """The policy picks the copy by when it was received, not by where it sorts; it alone is
    written and counted, and no series is created for the other."""
    result = await write_batch(conn, [stored("1.9.1", series="1.2.3.9", received=T0),
                                      stored("1.9.1", sha="b", series="1.2.3.1", received=T1)],
                               overwrite)
    assert (result.inserted, result.conflicts, result.replaced) == (1, 1, 0)
    view = await hierarchy(conn)
    (sha, series, _, _), = view["instances"].values()
    assert (sha, series) == (("b", "1.2.3.1") if overwrite else ("a", "1.2.3.9"))
    assert view["series"] == {series: 1} and view["studies"] == {"1.2.3": (1, 1)}


async def test_overwrite_keeps_the_copy_received_last_and_moves_it_where_it_says(
        conn: asyncpg.Connection) -> None:
    await write_batch(conn, [stored("1.9.1", received=T0), stored("1.9.2", number=2,
                                                                  received=T0)], True)
    # a corrected copy of 1.9.1, for another patient, study and series
    moved = await write_batch(conn, [stored("1.9.1", sha="b", patient="P2", study="9.9",
                                            series="9.9.1", received=T1)], True)
    assert (moved.inserted, moved.conflicts, moved.replaced) == (0, 1, 1)
    assert await hierarchy(conn) == {
        "instances": {"1.9.1": ("b", "9.9.1", "9.9", "P2"),
                      "1.9.2": ("a", "1.2.3.1", "1.2.3", "P1")},
        "series": {"1.2.3.1": 1, "9.9.1": 1}, "studies": {"1.2.3": (1, 1), "9.9": (1, 1)},
        "patients": {"P1", "P2"}}
    assert await conflicts(conn) == [("1.9.1", "b", "a", "overwrite")]
    row = await conn.fetchrow("SELECT object_key, header FROM instance "
                              "WHERE sop_instance_uid = '1.9.1'")
    assert row["object_key"] == stored("1.9.1", sha="b").object_key and "9.9.1" in row["header"]

    # the replaced copy redelivered, and an older one indexed late: neither comes back
    late = await write_batch(conn, [stored("1.9.1", received=T0),
                                    stored("1.9.1", sha="c", received=T0)], True)
    assert (late.conflicts, late.replaced) == (2, 0)
    assert (await hierarchy(conn))["instances"]["1.9.1"] == ("b", "9.9.1", "9.9", "P2")
    assert await conflicts(conn) == [("1.9.1", "b", "a", "overwrite"),
                                     ("1.9.1", "b", "c", "overwrite")]

    # the other instance follows: its old series, study and patient are left empty, and go
    await write_batch(conn, [stored("1.9.2", sha="d", number=2, patient="P2", study="9.9",
                                    series="9.9.1", received=T2)], True)
    assert await hierarchy(conn) == {
        "instances": {"1.9.1": ("b", "9.9.1", "9.9", "P2"),
                      "1.9.2": ("d", "9.9.1", "9.9", "P2")},
        "series": {"9.9.1": 2}, "studies": {"9.9": (1, 2)}, "patients": {"P2"}}


async def test_overwrite_does_not_depend_on_the_order_copies_are_indexed_in(
        conn: asyncpg.Connection) -> None:
    older, newer = stored("1.9.1", received=T0), stored("1.9.1", sha="b", received=T1)
    for batches in ([[older, newer]], [[newer, older]], [[newer], [older]], [[older], [newer]]):
        await conn.execute("TRUNCATE instance, series, study, patient, ingest_conflict")
        for batch in batches:
            await write_batch(conn, batch, True)
        assert (await hierarchy(conn))["instances"] == {"1.9.1": ("b", "1.2.3.1", "1.2.3", "P1")}
        assert await conflicts(conn) == [("1.9.1", "b", "a", "overwrite")], batches


async def test_overwrite_moves_the_study_to_the_patient_its_newest_copy_names(
        conn: asyncpg.Connection) -> None:
    """A study sent under a wrong PatientID and sent again corrected (same UIDs)."""
    await write_batch(conn, [stored("1.9.1", patient="WRONG", received=T0),
                             stored("1.9.2", patient="WRONG", number=2, received=T0)], True)
    await write_batch(conn, [stored("1.9.1", sha="b", patient="P1", received=T1),
                             stored("1.9.2", sha="c", patient="P1", number=2, received=T1)],
                      True)
    assert await hierarchy(conn) == {
        "instances": {"1.9.1": ("b", "1.2.3.1", "1.2.3", "P1"),
                      "1.9.2": ("c", "1.2.3.1", "1.2.3", "P1")},
        "series": {"1.2.3.1": 2}, "studies": {"1.2.3": (1, 2)}, "patients": {"P1"}}


async def test_an_empty_batch_writes_nothing(conn: asyncpg.Connection) -> None:
    result = await write_batch(conn, [])
    assert (result.inserted, result.duplicates, result.conflicts) == (0, 0, 0)
    assert await conn.fetchval("SELECT count(*) FROM instance") == 0


def _in_study(r: int, i: int, patient: str) -> InstanceStored:
    """The one instance of study ``1.5.<r>.<i>``, of ``patient``."""
    study = f"1.5.{r}.{i}"
    return stored(f"{study}.1.1", series=f"{study}.1", study=study, patient=patient,
                  sha=f"{r}{i}")


async def test_two_indexers_meeting_the_same_patients_in_opposite_order_do_not_deadlock(
        conn: asyncpg.Connection) -> None:
    """Two indexer processes (``--scale indexer=2``) write two batches at once that hold the
    same two patients, met in opposite order when the batch is sorted by Study Instance UID
    (patient A has studies .1 and .4, patient B .2 and .3). Patients are locked in one order
    whatever the studies, so neither transaction waits for the other in a cycle, which
    PostgreSQL ends by aborting one (deadlock detected)."""
    other = await asyncpg.connect(
        f"postgresql://minipacs@127.0.0.1:5432/{await conn.fetchval('SELECT current_database()')}")
    try:
        for r in range(10):
            a, b = f"A{r}", f"B{r}"
            first, second = await asyncio.gather(
                write_batch(conn, [_in_study(r, 1, a), _in_study(r, 2, b)]),
                write_batch(other, [_in_study(r, 3, b), _in_study(r, 4, a)]))
            assert first.inserted == second.inserted == 2
        patients = await conn.fetch("SELECT p.patient_id, count(*) AS studies FROM patient p "
                                    "JOIN study s ON s.patient_fk = p.id GROUP BY 1")
        assert sorted((p["patient_id"], p["studies"]) for p in patients) == sorted(
            [(f"A{r}", 2) for r in range(10)] + [(f"B{r}", 2) for r in range(10)])
    finally:
        await other.close()


async def test_nul_characters_in_text_values_are_dropped_not_a_refusal(
        conn: asyncpg.Connection) -> None:
    """PostgreSQL's text and jsonb hold no U+0000; a sender's NUL inside a value once made the
    whole instance unindexable, for ever, after its Success."""
    first = stored("1.9.1", patient="P\x001")
    first.header["00100010"] = {"vr": "PN", "Value": [{"Alphabetic": "DOE\x00^JANE"}]}
    first.header["00091010"] = {"vr": "LO", "Value": ["private\x00value"]}
    result = await write_batch(conn, [first, stored("1.9.2")])
    assert result.inserted == 2
    row = await conn.fetchrow(
        "SELECT p.patient_id, p.patient_name, i.header->'00091010'->'Value'->>0 AS private "
        "FROM instance i JOIN series se ON se.id = i.series_fk JOIN study st "
        "ON st.id = se.study_fk JOIN patient p ON p.id = st.patient_fk "
        "WHERE i.sop_instance_uid = '1.9.1'")
    assert (row["patient_id"], row["patient_name"], row["private"]) == (
        "P1", "DOE^JANE", "privatevalue")

    # the overwrite policy's replacement path writes the header too
    newer = stored("1.9.2", sha="b", received="2026-11-26T11:00:00+00:00")
    newer.header["00081030"] = {"vr": "LO", "Value": ["HEAD\x00CT"]}
    replaced = await write_batch(conn, [newer], overwrite=True)
    assert replaced.replaced == 1
    assert await conn.fetchval("SELECT header->'00081030'->'Value'->>0 FROM instance "
                               "WHERE sop_instance_uid = '1.9.2'") == "HEADCT"
