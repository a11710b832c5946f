"""The C-FIND queries of shared/query use indexes: EXPLAIN on a seeded index (PostgreSQL only).

Checked in both plan modes asyncpg's prepared statements can end up in: custom plans (the
parameter values known to the planner) and generic plans (after a few executions).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import asyncpg
import pytest
from pydicom.dataset import Dataset

from services.migrate.core import downgrade, upgrade
from shared.query import STUDY_ROOT, Options, build_find, build_instances, find_instances
from tests.integration.conftest import migrated_database

N = 20000
SEED = f"""
INSERT INTO patient (patient_id, patient_name)
    SELECT 'PID' || g, 'NAME' || g || '^X' FROM generate_series(1, {N}) g;
INSERT INTO study (patient_fk, study_instance_uid, study_date, accession_number, num_series,
                   num_instances)
    SELECT id, '1.2.' || id, to_char(date '2015-01-01' + (id % 3000)::int, 'YYYYMMDD'), 'ACC' || id,
           1, 2 FROM patient;
INSERT INTO series (study_fk, series_instance_uid, modality)
    SELECT id, '1.3.' || id, CASE WHEN id % 3 = 0 THEN 'CT' ELSE 'MR' END FROM study;
INSERT INTO instance (series_fk, sop_instance_uid, sop_class_uid, transfer_syntax, object_key,
                      size, sha256)
    SELECT s.id, '1.4.' || s.id || '.' || n, '1.2.840.10008.5.1.4.1.1.4', '1.2.840.10008.1.2.1',
           'instances/' || s.id || '/' || n, 100, 'x'
    FROM series s, generate_series(1, 2) n;
ANALYZE;
"""


@pytest.fixture(scope="module")
async def conn() -> AsyncIterator[asyncpg.Connection]:
    async with migrated_database("minipacs_plans") as c:
        await c.execute(SEED)
        yield c


def ident(level: str, **keys: Any) -> Dataset:
    ds = Dataset()
    ds.QueryRetrieveLevel = level
    for keyword, value in keys.items():
        setattr(ds, keyword, value)
    return ds


async def plan(c: asyncpg.Connection, sql: str, args: tuple[Any, ...], mode: str) -> str:
    await c.execute(f"SET plan_cache_mode = {mode}")
    try:
        rows = await c.fetch("EXPLAIN " + sql, *args)
    finally:
        await c.execute("RESET plan_cache_mode")
    return "\n".join(r[0] for r in rows)


QUERIES = [
    ("PatientID", ident("STUDY", PatientID="PID123", StudyInstanceUID="", PatientName="")),
    ("PatientID wildcard", ident("STUDY", PatientID="PID1234*")),
    ("StudyInstanceUID", ident("STUDY", StudyInstanceUID="1.2.77")),
    ("list of UIDs", ident("STUDY", StudyInstanceUID=["1.2.77", "1.2.78"])),
    ("AccessionNumber", ident("STUDY", AccessionNumber="ACC4242")),
    ("StudyDate", ident("STUDY", StudyDate="20160101-20160102", ModalitiesInStudy="")),
    ("PatientName wildcard", ident("STUDY", PatientName="name1234*")),
    ("SeriesInstanceUID", ident("SERIES", StudyInstanceUID="1.2.9", SeriesInstanceUID="1.3.9")),
    ("SOPInstanceUID", ident("IMAGE", SOPInstanceUID="1.4.9.1")),
]


@pytest.mark.parametrize("mode", ["force_custom_plan", "force_generic_plan"])
@pytest.mark.parametrize(("what", "identifier"), QUERIES, ids=[q[0] for q in QUERIES])
async def test_no_full_scan(conn: asyncpg.Connection, what: str, identifier: Dataset,
                            mode: str) -> None:
    q = build_find(identifier, STUDY_ROOT, Options())
    text = await plan(conn, q.sql, q.args, mode)
    assert "Seq Scan" not in text, f"{what} ({mode}):\n{text}"
    assert (await conn.fetch(q.sql, *q.args)), f"{what}: no match in the seeded index"


async def test_retrieve_lookup_uses_indexes(conn: asyncpg.Connection) -> None:
    sql, args = build_instances("STUDY", ident("STUDY", StudyInstanceUID="1.2.10"))
    for mode in ("force_custom_plan", "force_generic_plan"):
        text = await plan(conn, sql, args, mode)
        assert "Seq Scan" not in text, text
    refs = await find_instances(conn, "STUDY", ident("STUDY", StudyInstanceUID="1.2.10"))
    assert [r.sop_instance_uid for r in refs] == ["1.4.10.1", "1.4.10.2"]
    assert refs[0].object_key == "instances/10/1" and refs[0].size == 100


async def test_migration_0002_down_and_up(conn: asyncpg.Connection) -> None:
    assert 2 in await downgrade(conn, 1)
    names = {r["indexname"] for r in await conn.fetch("SELECT indexname FROM pg_indexes")}
    assert "patient_id_pattern_idx" not in names
    assert await upgrade(conn)
    names = {r["indexname"] for r in await conn.fetch("SELECT indexname FROM pg_indexes")}
    assert {"patient_id_pattern_idx", "study_accession_pattern_idx",
            "series_study_modality_idx"} <= names
