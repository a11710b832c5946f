"""The ``move_job`` table, written only by the mover (one writer per store)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import datetime

import asyncpg

from shared.messages import MoveRequested

TERMINAL = frozenset({"done", "failed", "canceled", "expired"})

# pg_try_advisory_lock(LOCK_CLASS, hashtext(job id)): the session running a job holds it, so a
# job runs in one place at a time, whichever mover (or task) its message was delivered to; a
# mover that dies loses its session and the lock with it.
LOCK_CLASS = 0x6D6F7665  # "move"

START = """
INSERT INTO move_job (id, origin, requested_by_aet, requested_by_host, level, identifier,
                      destination, destination_aet, state, total, remaining, requested_at,
                      error, finished_at)
VALUES ($1::uuid, $2, $3, $4, $5, $6::jsonb, $7, $8, $9, $10, $10, $11, $12,
        CASE WHEN $9 = 'running' THEN NULL ELSE now() END)
ON CONFLICT (id) DO UPDATE SET state = EXCLUDED.state, total = EXCLUDED.total,
    remaining = EXCLUDED.remaining, completed = 0, failed = 0, warning = 0,
    failed_uids = '{}', error = EXCLUDED.error, destination_aet = EXCLUDED.destination_aet,
    started_at = now(), finished_at = EXCLUDED.finished_at, updated_at = now()
WHERE move_job.state NOT IN ('done', 'failed', 'canceled', 'expired')"""

PROGRESS = """
UPDATE move_job SET remaining = $2, completed = $3, failed = $4, warning = $5,
    failed_uids = $6, updated_at = now()
WHERE id = $1::uuid AND state = 'running'"""

FINISH = """
UPDATE move_job SET state = $2, remaining = $3, completed = $4, failed = $5, warning = $6,
    failed_uids = $7, error = $8, finished_at = now(), updated_at = now()
WHERE id = $1::uuid"""


def _time(value: str) -> datetime | None:
    try:
        return datetime.fromisoformat(value) if value else None
    except ValueError:
        return None


@dataclass(frozen=True)
class Recorded:
    """A job's row as the mover last wrote it."""

    state: str
    quiet: float  # seconds since the row was last written (every 1 to 5 s while it runs)
    remaining: int
    completed: int
    failed: int
    warning: int
    failed_uids: list[str]


async def recorded(conn: asyncpg.Connection, job_id: str) -> Recorded | None:
    row = await conn.fetchrow(
        "SELECT state, extract(epoch FROM now() - updated_at)::float8 AS quiet, remaining, "
        "completed, failed, warning, failed_uids FROM move_job WHERE id = $1::uuid", job_id)
    return Recorded(**dict(row)) if row is not None else None


async def claim(conn: asyncpg.Connection, job_id: str) -> bool:
    """Take the job's lock for this session; False while another session holds it."""
    return bool(await conn.fetchval("SELECT pg_try_advisory_lock($1, hashtext($2))",
                                    LOCK_CLASS, job_id))


async def unclaim(conn: asyncpg.Connection, job_id: str) -> None:
    await conn.execute("SELECT pg_advisory_unlock($1, hashtext($2))", LOCK_CLASS, job_id)


async def reopen(conn: asyncpg.Connection, job_id: str) -> bool:
    """A failed job to run again (an admin moved its message back from the dead-letter queue):
    its row is no longer finished, so ``start`` records the new run in it. False if it was
    not failed."""
    return await conn.fetchval(
        "UPDATE move_job SET state = 'running', finished_at = NULL, updated_at = now() "
        "WHERE id = $1::uuid AND state = 'failed' RETURNING true", job_id) is not None


async def start(conn: asyncpg.Connection, job: MoveRequested, state: str, total: int,
                destination_aet: str = "", error: str = "") -> None:
    """Record the job (again, on redelivery of an unfinished one). A finished job is kept."""
    await conn.execute(START, job.job_id, job.origin, job.requested_by_aet,
                       job.requested_by_host, job.level,
                       json.dumps(job.identifier, ensure_ascii=False), job.destination,
                       destination_aet, state, total, _time(job.requested_at), error)


async def progress(conn: asyncpg.Connection, job_id: str, remaining: int, completed: int,
                   failed: int, warning: int, failed_uids: list[str]) -> None:
    await conn.execute(PROGRESS, job_id, remaining, completed, failed, warning, failed_uids)


async def finish(conn: asyncpg.Connection, job_id: str, state: str, remaining: int,
                 completed: int, failed: int, warning: int, failed_uids: list[str],
                 error: str) -> None:
    await conn.execute(FINISH, job_id, state, remaining, completed, failed, warning,
                       failed_uids, error)
