"""The query bench: C-FIND latency at study level (by PatientID, by StudyDate range, by
PatientName wildcard), 200 queries of each kind with varying values inside one association.

1. Orthanc (default SQLite index) and a fresh minipacs stack each receive the same small
   archive (the ``small`` set, 2000 instances) and are queried the same way: like for like.
   Then the PatientID queries again, while 4 ``storescu`` send each of them another small set
   (RELIABILITY: "C-FIND ... while ingesting → answers stay fast"): a pynetdicom client, as
   the queries must stop when the send does; only those that begin and end during it count.
2. Orthanc is stopped; minipacs' index is then seeded directly in PostgreSQL (INSERT ... SELECT
   over generate_series) up to >= 1,000,000 instances, ANALYZEd and queried again.
"""

from __future__ import annotations

import asyncio
import random
import shutil
import threading
import time
from contextlib import ExitStack
from dataclasses import asdict, dataclass, field
from pathlib import Path

import asyncpg
from pydicom.dataset import Dataset

from bench.datasets import OUT, DataSet, dataset
from bench.dimse import (
    Latencies,
    QROrthanc,
    find_latencies,
    findscu_latencies,
    fmt,
    study_query,
)
from bench.report import machine
from bench.send import Sent, send
from bench.servers import Server, settle
from bench.target import Minipacs

KINDS = ("patient_id", "date_range", "name_wildcard")
KIND_TEXT = {"patient_id": "PatientID (equality)",
             "date_range": "StudyDate range (7 days)",
             "name_wildcard": "PatientName wildcard (`SURNAME*`)"}
TARGET_MS = 20.0

# seeded names: SYLLABLE + ENDING (1000 surnames) ^ GIVEN
SYLLABLES = ("AB", "BAL", "BR", "CAR", "CH", "DAV", "DR", "ED", "FAR", "GAR", "GR", "HAL",
             "HAR", "JAN", "JOR", "KEL", "KR", "LAN", "LOW", "MAR", "MC", "MOR", "NEL", "OL",
             "PAR", "PR", "QU", "RAM", "ROB", "SAL", "SCH", "SM", "ST", "TAL", "THR", "VAL",
             "WAL", "WH", "YOR", "ZIM")
ENDINGS = ("SON", "MAN", "LEY", "TON", "FORD", "WELL", "BURY", "RIDGE", "WOOD", "FIELD",
           "INGS", "ERS", "OWSKI", "ENKO", "AGHER", "ITZ", "ANDEZ", "ELLI", "AUD", "ESCU",
           "STRAND", "BERG", "HOLM", "DALE", "MOOR")
GIVEN = ("JOHN", "MARY", "JAMES", "ANNA", "ROBERT", "LINDA", "MICHAEL", "SUSAN", "DAVID",
         "KAREN", "PAUL", "EMMA", "PETER", "SARAH", "MARK", "LAURA", "THOMAS", "JULIA",
         "ANDREW", "CLAIRE", "LUCAS", "SOPHIE", "HUGO", "INES", "OMAR", "LEILA", "YUKI",
         "KENJI", "ELENA", "IVAN")
MODALITIES = ("CT", "MR", "CR", "US", "DX", "MG", "PT", "NM")
DATE_DAYS = 5479  # 2010-01-01 .. 2024-12-31
SEED_ROOT = "1.2.826.0.1.3680043.9.7433.77"


@dataclass(frozen=True)
class Shape:
    patients: int
    studies: int = 5
    series: int = 4
    instances: int = 5

    @property
    def total(self) -> int:
        return self.patients * self.studies * self.series * self.instances


@dataclass(frozen=True)
class Options:
    shape: Shape
    queries: int = 200
    small: int = 2000
    keep: bool = False


@dataclass(frozen=True)
class Cell:
    archive: str  # "small", "ingesting" (the small archive while more arrives) or "large"
    server: str
    kind: str
    instances: int
    ms: tuple[float, ...]
    matches: tuple[int, ...]
    failures: int

    @property
    def lat(self) -> Latencies:
        return Latencies(self.ms, self.matches, self.failures)


@dataclass(frozen=True)
class QueryResult:
    cells: list[Cell]
    seed_seconds: float
    indexed_instances: int
    queries: int
    # the PatientID queries again from a pynetdicom client: "<archive> <server>" -> median ms
    pynetdicom: dict[str, float] = field(default_factory=dict)


def _sql_array(values: tuple[str, ...]) -> str:
    return "ARRAY[" + ",".join(f"'{v}'" for v in values) + "]"


def seed_sql(shape: Shape, run: int) -> list[str]:
    """INSERT ... SELECT statements adding ``shape`` after the rows already there (explicit
    ids above the current maxima; the sequences are moved past them afterwards)."""
    s, r, i = shape.studies, shape.series, shape.instances
    root = f"{SEED_ROOT}.{run}"
    mods = _sql_array(MODALITIES)
    return [
        "SET synchronous_commit = off",
        "CREATE TEMP TABLE base AS SELECT "
        "(SELECT coalesce(max(id), 0) FROM patient) AS p, "
        "(SELECT coalesce(max(id), 0) FROM study) AS s, "
        "(SELECT coalesce(max(id), 0) FROM series) AS r",
        f"""INSERT INTO patient (id, patient_id, patient_name, patient_birth_date, patient_sex)
        SELECT base.p + 1 + n, 'P' || lpad(n::text, 8, '0'),
               ({_sql_array(SYLLABLES)})[1 + n % {len(SYLLABLES)}]
               || ({_sql_array(ENDINGS)})[1 + (n / {len(SYLLABLES)}) % {len(ENDINGS)}]
               || '^' || ({_sql_array(GIVEN)})[1 + (n * 7) % {len(GIVEN)}],
               to_char(date '1930-01-01' + (n * 37) % 29000, 'YYYYMMDD'),
               CASE WHEN n % 2 = 0 THEN 'F' ELSE 'M' END
        FROM base, generate_series(0, {shape.patients - 1}) AS n""",
        f"""INSERT INTO study (id, patient_fk, study_instance_uid, study_date, study_time,
                               accession_number, study_id, referring_physician_name,
                               study_description, num_series, num_instances)
        SELECT base.s + 1 + n, base.p + 1 + n / {s}, '{root}.' || n,
               to_char(date '2010-01-01' + (n * 7919) % {DATE_DAYS}, 'YYYYMMDD'),
               lpad(((n * 13) % 24)::text, 2, '0') || lpad(((n * 7) % 60)::text, 2, '0')
               || '00',
               'ACC' || lpad(n::text, 9, '0'), (n % 1000)::text, 'REFERRER^DOCTOR',
               ({mods})[1 + n % {len(MODALITIES)}] || ' ROUTINE', {r}, {r * i}
        FROM base, generate_series(0, {shape.patients * s - 1}) AS n""",
        f"""INSERT INTO series (id, study_fk, series_instance_uid, modality, series_number,
                                series_description, num_instances)
        SELECT base.r + 1 + n, base.s + 1 + n / {r}, '{root}.' || (n / {r}) || '.' || (n % {r} + 1),
               ({mods})[1 + (n / {r}) % {len(MODALITIES)}], n % {r} + 1, 'SERIES ' || (n % {r} + 1),
               {i}
        FROM base, generate_series(0, {shape.patients * s * r - 1}) AS n""",
        f"""INSERT INTO instance (series_fk, sop_instance_uid, sop_class_uid, instance_number,
                                  transfer_syntax, object_key, size, sha256, calling_aet,
                                  received_at)
        SELECT base.r + 1 + n / {i},
               '{root}.' || (n / {i * r}) || '.' || (n / {i} % {r} + 1) || '.' || (n % {i} + 1),
               '1.2.840.10008.5.1.4.1.1.2', n % {i} + 1, '1.2.840.10008.1.2.1',
               'seed/' || n, 524288, lpad(to_hex(n), 64, '0'), 'SEED', now()
        FROM base, generate_series(0, {shape.total - 1}) AS n""",
        "SELECT setval('patient_id_seq', (SELECT max(id) FROM patient))",
        "SELECT setval('study_id_seq', (SELECT max(id) FROM study))",
        "SELECT setval('series_id_seq', (SELECT max(id) FROM series))",
        "ANALYZE patient",
        "ANALYZE study",
        "ANALYZE series",
        "ANALYZE instance",
    ]


def seed(dsn: str, shape: Shape) -> tuple[float, int]:
    """Seed and ANALYZE; (seconds, instances now in the index)."""

    async def go() -> tuple[float, int]:
        conn = await asyncpg.connect(dsn)
        try:
            t0 = time.monotonic()
            run = random.randrange(1, 10**9)
            for sql in seed_sql(shape, run):
                print(f"  seed: {' '.join(sql.split())[:70]}...", flush=True)
                await conn.execute(sql)
            seconds = time.monotonic() - t0
            return seconds, int(await conn.fetchval("SELECT count(*) FROM instance"))
        finally:
            await conn.close()

    return asyncio.run(go())


def large_queries(shape: Shape, count: int, rng: random.Random) -> dict[str, list[Dataset]]:
    out: dict[str, list[Dataset]] = {k: [] for k in KINDS}
    for _ in range(count):
        out["patient_id"].append(study_query(PatientID=f"P{rng.randrange(shape.patients):08d}"))
        day = rng.randrange(DATE_DAYS - 7)
        out["date_range"].append(study_query(StudyDate=_date_range(2010, day)))
        n = rng.randrange(min(shape.patients, len(SYLLABLES) * len(ENDINGS)))
        surname = SYLLABLES[n % len(SYLLABLES)] + ENDINGS[(n // len(SYLLABLES)) % len(ENDINGS)]
        out["name_wildcard"].append(study_query(PatientName=f"{surname}*"))
    return out


def _date_range(year: int, day: int) -> str:
    import datetime as dt

    start = dt.date(year, 1, 1) + dt.timedelta(days=day)
    end = start + dt.timedelta(days=6)
    return f"{start:%Y%m%d}-{end:%Y%m%d}"


def small_queries(tag: str, patients: int, count: int, rng: random.Random
                  ) -> dict[str, list[Dataset]]:
    """Values from the small set (tests.dicomgen.small_set: PatientID TAG-0000, name
    PATIENT^TAG0000, study dates 2024MMDD with the day from the patient)."""
    up = tag.upper()
    out: dict[str, list[Dataset]] = {k: [] for k in KINDS}
    for _ in range(count):
        out["patient_id"].append(study_query(PatientID=f"{up}-{rng.randrange(patients):04d}"))
        month = rng.randrange(1, 3)  # studies 0 and 1 are in January and February
        start = rng.randrange(1, max(2, min(patients, 28) - 5))  # day = patient % 28 + 1
        out["date_range"].append(study_query(
            StudyDate=f"2024{month:02d}{start:02d}-2024{month:02d}{start + 6:02d}"))
        out["name_wildcard"].append(study_query(
            PatientName=f"PATIENT^{up}{rng.randrange(max(1, patients // 10)):03d}*"))
    return out


def measure(server: Server, archive: str, instances: int, queries: dict[str, list[Dataset]],
            cells: list[Cell], pynetdicom: dict[str, float]) -> None:
    """Each kind timed by findscu; the PatientID queries also from a pynetdicom client."""
    lat = find_latencies(server.port, server.aet, queries["patient_id"])
    pynetdicom[f"{archive} {server.name}"] = lat.median
    print(f"  {archive:5} {server.name:8} patient_id, pynetdicom client: median "
          f"{lat.median:6.2f} ms" + (f", {lat.failures} NOT Success" if lat.failures else ""),
          flush=True)
    for kind in KINDS:
        lat = findscu_latencies(server.port, server.aet, queries[kind])
        cells.append(Cell(archive, server.name, kind, instances, lat.ms, lat.matches,
                          lat.failures))
        print(f"  {archive:5} {server.name:8} {kind:13}: median {lat.median:6.2f} ms, p95 "
              f"{lat.p95:6.2f} ms, median matches {lat.median_matches:.0f}"
              + (f", {lat.failures} NOT Success" if lat.failures else ""), flush=True)


def during_ingest(server: Server, archive: int, busy: DataSet, queries: list[Dataset],
                  work: Path, cells: list[Cell]) -> None:
    """The PatientID queries, round and round, while 4 ``storescu`` send ``busy``."""
    done = threading.Event()
    sent: list[Sent] = []

    def sender() -> None:
        try:
            sent.append(send(busy.files, server.port, server.aet, 4,
                             work / "storescu-busy" / server.name))
        finally:
            done.set()

    lat = find_latencies(server.port, server.aet, queries,
                         start=threading.Thread(target=sender, daemon=True).start,
                         running=lambda: not done.is_set())
    done.wait()
    if not sent or sent[0].acked != busy.count:
        raise RuntimeError(f"{server.name}: {sent[0].acked if sent else 0} of {busy.count} "
                           "acknowledged during the queries")
    if server.name == "minipacs" and server.indexed_after(
            sent[0].t0, archive + busy.count, 300) is None:
        raise RuntimeError("minipacs did not index the set sent during the queries in time")
    cells.append(Cell("ingesting", server.name, "patient_id", archive, lat.ms, lat.matches,
                      lat.failures))
    print(f"  ingesting {server.name:8} patient_id, pynetdicom client: {len(lat.ms)} queries "
          f"during {sent[0].seconds:.1f} s of storescu, median {lat.median:6.2f} ms, p95 "
          f"{lat.p95:6.2f} ms" + (f", {lat.failures} NOT Success" if lat.failures else ""),
          flush=True)


def load(server: Server, data: DataSet, work: Path) -> None:
    sent = send(data.files, server.port, server.aet, 4, work / "storescu" / server.name)
    if sent.acked != data.count:
        raise RuntimeError(f"{server.name}: {sent.acked} of {data.count} acknowledged")
    if server.indexed_after(sent.t0, sent.acked, 300) is None and server.name == "minipacs":
        raise RuntimeError("minipacs did not index the small archive in time")


def run_query(opts: Options) -> QueryResult:
    tag = "bquery"
    small = dataset("small", opts.small, tag)
    patients = opts.small // 40 if opts.small % 40 == 0 else opts.small // 20
    work = OUT / f"run-query-{time.strftime('%Y%m%d-%H%M%S')}"
    work.mkdir(parents=True, exist_ok=True)
    cells: list[Cell] = []
    pynetdicom: dict[str, float] = {}
    rng = random.Random(4242)
    with ExitStack() as cleanup:
        if not opts.keep:
            cleanup.callback(shutil.rmtree, work, True)
        minipacs = Minipacs(work)
        cleanup.callback(minipacs.close)
        orthanc = QROrthanc()
        cleanup.callback(orthanc.close)
        print("query: starting the minipacs stack and Orthanc", flush=True)
        minipacs.open()
        minipacs.begin(work)
        orthanc.begin(work)
        for server in (orthanc, minipacs):
            print(f"query: storing the small archive ({small.count}) into {server.name}",
                  flush=True)
            load(server, small, work)
        settle(2.0)
        queries = small_queries(tag, patients, opts.queries, rng)
        for server in (orthanc, minipacs):
            measure(server, "small", small.count, queries, cells, pynetdicom)
        busy = dataset("small", opts.small, f"{tag}busy")
        for server in (orthanc, minipacs):
            print(f"query: PatientID queries on {server.name} while it receives "
                  f"{busy.count} more", flush=True)
            during_ingest(server, small.count, busy, queries["patient_id"], work, cells)
        orthanc.end()
        print(f"query: seeding minipacs with {opts.shape.total} instances", flush=True)
        db = minipacs.stack.config.database
        seconds, indexed = seed(f"postgresql://minipacs@127.0.0.1:5432/{db}", opts.shape)
        print(f"query: seeded in {seconds:.0f} s, {indexed} instances in the index",
              flush=True)
        settle(2.0)
        measure(minipacs, "large", indexed, large_queries(opts.shape, opts.queries, rng), cells,
                pynetdicom)
    return QueryResult(cells, seconds, indexed, opts.queries, pynetdicom)


# -- report -----------------------------------------------------------------------------------


def _cell(result: QueryResult, archive: str, server: str, kind: str) -> Latencies | None:
    for c in result.cells:
        if (c.archive, c.server, c.kind) == (archive, server, kind):
            return c.lat
    return None


def target_line(result: QueryResult) -> str:
    lat = _cell(result, "large", "minipacs", "patient_id")
    value = lat.median if lat is not None else float("nan")
    ok = value < TARGET_MS and result.indexed_instances >= 1_000_000
    return (f"{'PASS' if ok else 'FAIL'}: PatientID study query, median inside one association, "
            f"{result.indexed_instances:,} instances: {fmt(value, 2)} ms (target < "
            f"{TARGET_MS:.0f} ms with >= 1,000,000 instances)")


def text_table(result: QueryResult) -> str:
    lines = [f"{'archive':10}{'server':10}{'query':15}{'median ms':>11}{'p95 ms':>9}"
             f"{'matches':>9}"]
    for c in result.cells:
        lat = c.lat
        lines.append(f"{c.archive:10}{c.server:10}{c.kind:15}{fmt(lat.median, 2):>11}"
                     f"{fmt(lat.p95, 2):>9}{fmt(lat.median_matches, 0):>9}")
    return "\n".join(lines)


def markdown(result: QueryResult, command: str) -> str:
    small = next((c.instances for c in result.cells if c.archive == "small"), 0)
    out = [f"Last run: {time.strftime('%Y-%m-%d %H:%M %Z')} on {machine()}; `{command}`; "
           f"{result.queries} queries of each kind with varying values, each kind inside one "
           "association of DCMTK's `findscu`, timed by its own log from request to final "
           "response (5 more before them to warm up, not counted).", "",
           "**Target (issue 3)**", "", f"- {target_line(result)}", "",
           "**C-FIND study level, ms per query (median / p95; median matches)**", "",
           f"| query | Orthanc, {small:,} instances (SQLite) | minipacs, {small:,} instances "
           "| minipacs / Orthanc latency (median; < 1 is faster) "
           f"| minipacs, {result.indexed_instances:,} instances |",
           "|---|---|---|---|---|"]
    for kind in KINDS:
        row = [KIND_TEXT[kind]]
        o = _cell(result, "small", "orthanc", kind)
        m = _cell(result, "small", "minipacs", kind)
        big = _cell(result, "large", "minipacs", kind)
        for lat in (o, m):
            row.append(_lat(lat))
        row.append(f"{m.median / o.median:.2f}x" if o and m and o.median else "-")
        row.append(_lat(big))
        out.append("| " + " | ".join(row) + " |")
    if result.pynetdicom:
        seen = ", ".join(f"{k} {fmt(v, 2)} ms" for k, v in result.pynetdicom.items())
        out += ["", "The PatientID queries again from a pynetdicom 3.0 client (Python: its "
                f"decoding and polling are in the time), median: {seen}."]
    out += ingesting_table(result)
    fails = sum(c.failures for c in result.cells)
    out += ["", f"Queries not answered with Success: {fails}." if fails else
            "Every query ended with Success.", "",
            f"Seeding {result.indexed_instances:,} instances in PostgreSQL (INSERT ... SELECT "
            f"over generate_series, then ANALYZE) took {result.seed_seconds:.0f} s."]
    return "\n".join(out)


def ingesting_table(result: QueryResult) -> list[str]:
    """The PatientID queries while each server receives another small set, beside the same
    client's figure on the idle server."""
    o = _cell(result, "ingesting", "orthanc", "patient_id")
    m = _cell(result, "ingesting", "minipacs", "patient_id")
    if o is None or m is None:
        return []
    idle_o = result.pynetdicom.get("small orthanc", float("nan"))
    idle_m = result.pynetdicom.get("small minipacs", float("nan"))
    return ["", "**While receiving** (RELIABILITY: C-FIND while ingesting): the PatientID "
            "queries from the pynetdicom client, one association, round and round while 4 "
            "`storescu` send the server another small set; only queries that began and ended "
            "during the send count. ms per query, median / p95 (queries counted)", "",
            "| PatientID query | Orthanc | minipacs | minipacs / Orthanc (median) |",
            "|---|---|---|---|",
            f"| idle (median) | {fmt(idle_o, 2)} | {fmt(idle_m, 2)} | "
            f"{_ratio(idle_m, idle_o)} |",
            f"| while receiving | {fmt(o.median, 2)} / {fmt(o.p95, 2)} ({len(o.ms)}) | "
            f"{fmt(m.median, 2)} / {fmt(m.p95, 2)} ({len(m.ms)}) | "
            f"{_ratio(m.median, o.median)} |"]


def _ratio(a: float, b: float) -> str:
    return f"{a / b:.2f}x" if b and a == a and b == b else "-"


def _lat(lat: Latencies | None) -> str:
    if lat is None:
        return "-"
    return f"{fmt(lat.median, 2)} / {fmt(lat.p95, 2)} ({fmt(lat.median_matches, 0)})"


def as_json(result: QueryResult) -> dict[str, object]:
    return asdict(result)
