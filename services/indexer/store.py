"""Writing one batch of stored instances into the index, in one transaction (idempotent).

A second copy of a SOP Instance UID with different bytes is a conflict, logged and recorded in
``ingest_conflict``. What the index keeps is the policy's choice:

- keep-first (the default, Orthanc's ``"OverwriteInstances": false``): the instance row is never
  overwritten; the later copy is the one recorded. "First" is the copy indexed first: the one
  received first, but for copies received within the same instant, which storage (several
  instances at once) may finish in either order; within one batch the earlier received wins.
- overwrite (``MINIPACS_OVERWRITE_INSTANCES=true``, Orthanc's ``true``): the copy the gateway
  received last wins, whatever order the copies are indexed in (``received_at``, then the
  SHA-256 to break a tie); the copy it replaces is the one recorded. The instance moves to the
  series and study its new copy names, the study to the new copy's patient, and a series,
  study or patient left without instances is removed, as Orthanc deletes an overwritten
  instance with its empty parents. Parents keep the attributes they were created with.

Either way the superseded copy's object stays in S3 under its own key, for inspection.
"""

from __future__ import annotations

import json
import logging
from collections import Counter
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from typing import Any

import asyncpg

from shared.dicom import IndexRecord, index_record
from shared.messages import InstanceStored

log = logging.getLogger("minipacs.indexer")

UPSERT_PATIENT = """
INSERT INTO patient (patient_id, issuer_of_patient_id, patient_name, patient_birth_date,
                     patient_sex)
VALUES ($1, $2, $3, $4, $5)
ON CONFLICT (patient_id, issuer_of_patient_id) DO UPDATE SET patient_id = EXCLUDED.patient_id
RETURNING id, (xmax = 0) AS inserted"""

UPSERT_STUDY = """
INSERT INTO study (patient_fk, study_instance_uid, study_date, study_time, accession_number,
                   study_id, referring_physician_name, study_description, specific_character_set)
VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)
ON CONFLICT (study_instance_uid) DO UPDATE SET study_instance_uid = EXCLUDED.study_instance_uid
RETURNING id, (xmax = 0) AS inserted"""

UPSERT_SERIES = """
INSERT INTO series (study_fk, series_instance_uid, modality, series_number, series_description,
                    series_date, series_time, body_part_examined)
VALUES ($1, $2, $3, $4, $5, $6, $7, $8)
ON CONFLICT (series_instance_uid) DO UPDATE SET series_instance_uid = EXCLUDED.series_instance_uid
RETURNING id, study_fk, (xmax = 0) AS inserted"""

# One statement for the whole batch (a round trip per instance was most of the indexer's and
# PostgreSQL's time per instance). Rows in the order given; an existing SOP Instance UID, or
# one repeated within the batch, is skipped and not returned.
INSERT_INSTANCES = """
INSERT INTO instance (series_fk, sop_instance_uid, sop_class_uid, instance_number,
                      transfer_syntax, object_key, size, sha256, calling_aet, received_at, header)
SELECT * FROM unnest($1::bigint[], $2::text[], $3::text[], $4::integer[], $5::text[],
                     $6::text[], $7::bigint[], $8::text[], $9::text[], $10::timestamptz[],
                     $11::jsonb[])
ON CONFLICT (sop_instance_uid) DO NOTHING
RETURNING sop_instance_uid"""

KEPT_SHA256 = "SELECT sop_instance_uid, sha256 FROM instance WHERE sop_instance_uid = ANY($1)"

INSERT_CONFLICT = """
INSERT INTO ingest_conflict (sop_instance_uid, kept_sha256, rejected_sha256, rejected_key,
                             calling_aet, received_at, policy)
VALUES ($1, $2, $3, $4, $5, $6, $7)
ON CONFLICT (sop_instance_uid, rejected_sha256) DO NOTHING"""

# Overwrite: the row takes the new copy if the gateway received it later than the indexed one;
# returns what it held (nothing when the indexed copy is the newer, or the same bytes).
REPLACE_INSTANCE = """
WITH old AS (
    SELECT id, series_fk, sha256, object_key, calling_aet, received_at FROM instance
    WHERE sop_instance_uid = $2 FOR UPDATE)
UPDATE instance i SET series_fk = $1, sop_class_uid = $3, instance_number = $4,
    transfer_syntax = $5, object_key = $6, size = $7, sha256 = $8, calling_aet = $9,
    received_at = $10, header = $11::jsonb, indexed_at = now()
FROM old
WHERE i.id = old.id AND old.sha256 <> $8 AND $10::timestamptz IS NOT NULL
  AND (old.received_at IS NULL OR (old.received_at, old.sha256) < ($10::timestamptz, $8))
RETURNING old.series_fk, old.sha256, old.object_key, old.calling_aet, old.received_at,
          (SELECT study_fk FROM series WHERE id = old.series_fk) AS study_fk"""

# Overwrite: the study follows the patient its newest copy names; returns the one it had.
MOVE_STUDY = """
WITH old AS (SELECT id, patient_fk FROM study WHERE id = $1 FOR UPDATE)
UPDATE study s SET patient_fk = $2 FROM old WHERE s.id = old.id AND old.patient_fk <> $2
RETURNING old.patient_fk"""

# Parents left without children: a conflicting copy that named a new series, study or patient
# (which the upserts created before its instance row was refused), or what an overwrite left.
DELETE_EMPTY_SERIES = """
DELETE FROM series WHERE id = ANY($1::bigint[]) AND num_instances = 0 RETURNING study_fk"""
DELETE_EMPTY_STUDIES = """
DELETE FROM study st WHERE st.id = ANY($1::bigint[]) AND st.num_instances = 0
  AND NOT EXISTS (SELECT 1 FROM series se WHERE se.study_fk = st.id)
RETURNING patient_fk"""
DELETE_EMPTY_PATIENTS = """
DELETE FROM patient p WHERE p.id = ANY($1::bigint[])
  AND NOT EXISTS (SELECT 1 FROM study st WHERE st.patient_fk = p.id)"""

KEEP_FIRST = "keep-first"
OVERWRITE = "overwrite"


@dataclass
class BatchResult:
    inserted: int = 0
    duplicates: int = 0
    conflicts: int = 0
    replaced: int = 0  # conflicts where the new copy replaced the indexed one (overwrite)


@dataclass
class _Touched:
    """Counts to apply and parents to check for emptiness at the end of a batch."""
    in_series: Counter[int] = field(default_factory=Counter)
    in_study: Counter[int] = field(default_factory=Counter)
    series_in_study: Counter[int] = field(default_factory=Counter)
    series: set[int] = field(default_factory=set)  # created here, or left by an instance
    studies: set[int] = field(default_factory=set)
    patients: set[int] = field(default_factory=set)
    study_patient: dict[int, int] = field(default_factory=dict)  # of the studies created here

    def maybe_empty(self) -> tuple[list[int], list[int], list[int]]:
        """Series, studies and patients that may have been left without children: those
        created here or left by a moved instance that gained no instance in this batch."""
        filled = {p for s, p in self.study_patient.items() if self.in_study[s] > 0}
        return (sorted(s for s in self.series if self.in_series[s] <= 0),
                sorted(s for s in self.studies if self.in_study[s] <= 0),
                sorted(self.patients - filled))


def _patient_key(patient: dict[str, Any]) -> tuple[str, str]:
    """(PatientID, IssuerOfPatientID): the patient table's unique key."""
    return patient["patient_id"], patient["issuer_of_patient_id"]


def _time(value: str) -> datetime | None:
    try:
        return datetime.fromisoformat(value) if value else None
    except ValueError:
        return None


async def write_batch(conn: asyncpg.Connection, batch: list[InstanceStored],
                      overwrite: bool = False) -> BatchResult:
    """Index ``batch`` in one transaction. Concurrent indexers lock rows in the same order,
    so neither waits for the other in a cycle: all patients first, by key, then studies,
    series and instances by UID. ``overwrite``: conflicts are settled by the overwrite
    policy (see the module's docstring), else keep-first."""
    result = BatchResult()
    if not batch:
        return result
    patients: dict[tuple[str, str], int] = {}
    studies: dict[str, int] = {}
    series_ids: dict[str, tuple[int, int]] = {}
    touched = _Touched()
    batch, texts = _storable(batch)
    chosen, extras = _one_copy_per_uid(batch, overwrite)
    ordered = sorted(chosen, key=lambda m: (m.study_instance_uid, m.series_instance_uid,
                                            m.sop_instance_uid))
    rows: list[tuple[object, ...]] = []
    fks: dict[str, tuple[int, int]] = {}  # SOP Instance UID -> (series, study) ids
    records = [(msg, index_record(msg.header)) for msg in ordered]
    first_seen: dict[tuple[str, str], dict[str, Any]] = {}
    for _, rec in records:
        first_seen.setdefault(_patient_key(rec.patient), rec.patient)
    async with conn.transaction():
        for pkey in sorted(first_seen):
            p = first_seen[pkey]
            row = await conn.fetchrow(UPSERT_PATIENT, *pkey, p["patient_name"],
                                      p["patient_birth_date"], p["patient_sex"])
            patients[pkey] = row["id"]
            if row["inserted"]:
                touched.patients.add(row["id"])
        for msg, rec in records:
            pkey = _patient_key(rec.patient)
            st = rec.study
            if msg.study_instance_uid not in studies:
                row = await conn.fetchrow(
                    UPSERT_STUDY, patients[pkey], msg.study_instance_uid, st["study_date"],
                    st["study_time"], st["accession_number"], st["study_id"],
                    st["referring_physician_name"], st["study_description"],
                    st["specific_character_set"])
                studies[msg.study_instance_uid] = row["id"]
                if row["inserted"]:
                    touched.studies.add(row["id"])
                    touched.study_patient[row["id"]] = patients[pkey]
            se = rec.series
            if msg.series_instance_uid not in series_ids:
                row = await conn.fetchrow(
                    UPSERT_SERIES, studies[msg.study_instance_uid], msg.series_instance_uid,
                    se["modality"], se["series_number"], se["series_description"],
                    se["series_date"], se["series_time"], se["body_part_examined"])
                series_ids[msg.series_instance_uid] = (row["id"], row["study_fk"])
                if row["inserted"]:
                    touched.series_in_study[row["study_fk"]] += 1
                    touched.series.add(row["id"])
            fks[msg.sop_instance_uid] = series_ids[msg.series_instance_uid]
            rows.append(_instance_row(series_ids[msg.series_instance_uid][0], msg,
                                      rec.instance["instance_number"], texts[id(msg)]))
        inserted = {r["sop_instance_uid"] for r in await conn.fetch(
            INSERT_INSTANCES, *(list(column) for column in zip(*rows, strict=True)))}
        for uid in inserted:
            series_fk, study_fk = fks[uid]
            touched.in_series[series_fk] += 1
            touched.in_study[study_fk] += 1
        result.inserted = len(inserted)
        # already indexed; then the batch's other copies of its UIDs (never the ones to keep)
        skipped: list[tuple[InstanceStored, IndexRecord | None]] = [
            (msg, rec) for msg, rec in records if msg.sop_instance_uid not in inserted]
        skipped += [(msg, None) for msg in extras]
        if skipped:
            kept = dict(await conn.fetch(KEPT_SHA256, [m.sop_instance_uid for m, _ in skipped]))
            for msg, parsed in skipped:
                if kept.get(msg.sop_instance_uid) == msg.sha256:
                    result.duplicates += 1
                    continue
                result.conflicts += 1
                if overwrite and parsed is not None:  # the batch's newest copy of its UID
                    new = await _overwrite(conn, msg, parsed, texts[id(msg)], series_ids,
                                           patients, touched)
                    if new:
                        result.replaced += 1
                        kept[msg.sop_instance_uid] = msg.sha256
                        continue
                log.warning("conflict: an instance from %s reuses a stored SOP Instance UID "
                            "with different bytes; kept obj=%s, recorded obj=%s (%s)",
                            msg.calling_aet, str(kept.get(msg.sop_instance_uid))[:12],
                            msg.sha256[:12], OVERWRITE if overwrite else KEEP_FIRST)
                await conn.execute(INSERT_CONFLICT, msg.sop_instance_uid,
                                   kept.get(msg.sop_instance_uid), msg.sha256, msg.object_key,
                                   msg.calling_aet, _time(msg.received_at),
                                   OVERWRITE if overwrite else KEEP_FIRST)
        await _apply_counts(conn, touched)
    return result


def _received(msg: InstanceStored) -> tuple[datetime, str]:
    """When the gateway received the copy (SHA-256 breaks a tie): the policies' clock."""
    return _time(msg.received_at) or datetime.min.replace(tzinfo=UTC), msg.sha256


def _one_copy_per_uid(batch: list[InstanceStored], overwrite: bool
                      ) -> tuple[list[InstanceStored], list[InstanceStored]]:
    """The copy of each SOP Instance UID in the batch that the policy keeps (the first
    received; with ``overwrite``, the last), and the other copies."""
    chosen: dict[str, InstanceStored] = {}
    for msg in batch:
        have = chosen.get(msg.sop_instance_uid)
        if have is None:
            chosen[msg.sop_instance_uid] = msg
            continue
        mine, theirs = _received(msg), _received(have)
        if mine > theirs if overwrite else mine < theirs:
            chosen[msg.sop_instance_uid] = msg
    keep = set(map(id, chosen.values()))
    return list(chosen.values()), [m for m in batch if id(m) not in keep]


def _storable(batch: list[InstanceStored]
              ) -> tuple[list[InstanceStored], dict[int, str]]:
    """The batch with every NUL character taken out of its headers' text, and each header's
    JSON text (by ``id`` of its message). PostgreSQL's text and jsonb cannot hold U+0000,
    which DICOM allows in no text value but which senders put there: one such value would
    refuse the whole instance for ever (dead-lettered at each replay), once acknowledged."""
    out: list[InstanceStored] = []
    texts: dict[int, str] = {}
    for msg in batch:
        text = json.dumps(msg.header, ensure_ascii=False)
        if "\\u0000" in text:  # json writes U+0000 so: cheap to look for, rare to find
            msg = replace(msg, header=without_nul(msg.header))
            text = json.dumps(msg.header, ensure_ascii=False)
            log.warning("instance from %s: NUL characters dropped from its header's text "
                        "values to index it", msg.calling_aet)
        out.append(msg)
        texts[id(msg)] = text
    return out, texts


def without_nul(value: Any) -> Any:
    """``value`` (DICOM JSON) with every U+0000 removed from its strings, keys included."""
    if isinstance(value, str):
        return value.replace("\0", "")
    if isinstance(value, dict):
        return {without_nul(k): without_nul(v) for k, v in value.items()}
    if isinstance(value, list):
        return [without_nul(v) for v in value]
    return value


def _instance_row(series_fk: int, msg: InstanceStored, number: int | None,
                  header_text: str) -> tuple[object, ...]:
    """The columns of ``INSERT_INSTANCES`` (and ``REPLACE_INSTANCE``) for one instance."""
    return (series_fk, msg.sop_instance_uid, msg.sop_class_uid, number, msg.transfer_syntax,
            msg.object_key, msg.size, msg.sha256, msg.calling_aet, _time(msg.received_at),
            header_text)


async def _overwrite(conn: asyncpg.Connection, msg: InstanceStored, rec: IndexRecord,
                     header_text: str, series_ids: dict[str, tuple[int, int]],
                     patients: dict[tuple[str, str], int], touched: _Touched) -> bool:
    """Replace the indexed copy of ``msg``'s instance if ``msg`` was received later: move the
    instance (and its study) where the new copy says, record the replaced copy. False when
    the indexed copy is the newer one (copies indexed out of order, a late redelivery)."""
    series_fk, study_fk = series_ids[msg.series_instance_uid]
    old = await conn.fetchrow(REPLACE_INSTANCE,
                              *_instance_row(series_fk, msg, rec.instance["instance_number"],
                                             header_text))
    if old is None:
        return False
    if old["series_fk"] != series_fk:
        touched.in_series[series_fk] += 1
        touched.in_study[study_fk] += 1
        touched.in_series[old["series_fk"]] -= 1
        touched.in_study[old["study_fk"]] -= 1
        touched.series.add(old["series_fk"])
        touched.studies.add(old["study_fk"])
    moved_from = await conn.fetchval(MOVE_STUDY, study_fk, patients[_patient_key(rec.patient)])
    if moved_from is not None:
        touched.patients.add(moved_from)
    log.warning("conflict: an instance from %s reuses a stored SOP Instance UID with different "
                "bytes; it replaces obj=%s (%s), recorded", msg.calling_aet, old["sha256"][:12],
                OVERWRITE)
    await conn.execute(INSERT_CONFLICT, msg.sop_instance_uid, msg.sha256, old["sha256"],
                       old["object_key"], old["calling_aet"], old["received_at"], OVERWRITE)
    return True


async def _apply_counts(conn: asyncpg.Connection, t: _Touched) -> None:
    """The derived counts, then parents left empty removed (series, studies, patients)."""
    if t.in_series:
        await conn.executemany(
            "UPDATE series SET num_instances = num_instances + $2 WHERE id = $1",
            sorted(t.in_series.items()))
    study_ids = set(t.in_study) | set(t.series_in_study)
    if study_ids:
        await conn.executemany(
            "UPDATE study SET num_instances = num_instances + $2, "
            "num_series = num_series + $3 WHERE id = $1",
            [(s, t.in_study[s], t.series_in_study[s]) for s in sorted(study_ids)])
    series, studies, patients = t.maybe_empty()
    emptied: Counter[int] = Counter()
    if series:
        emptied.update(r["study_fk"] for r in await conn.fetch(DELETE_EMPTY_SERIES, series))
    if emptied:
        await conn.executemany("UPDATE study SET num_series = num_series - $2 WHERE id = $1",
                               sorted(emptied.items()))
    if studies or emptied:
        gone = await conn.fetch(DELETE_EMPTY_STUDIES, sorted(set(studies) | set(emptied)))
        patients = sorted(set(patients) | {r["patient_fk"] for r in gone})
    if patients:
        await conn.execute(DELETE_EMPTY_PATIENTS, patients)
