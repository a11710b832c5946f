"""Plain-SQL migrations from ``deploy/migrations`` (``NNNN_name.up.sql`` / ``.down.sql``),
applied in order inside transactions, tracked in ``schema_migrations``."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

import asyncpg

_NAME = re.compile(r"^(\d{4})_([a-z0-9_]+)\.(up|down)\.sql$")
DEFAULT_DIR = Path(__file__).resolve().parents[2] / "deploy" / "migrations"


@dataclass(frozen=True)
class Migration:
    version: int
    name: str
    up: Path
    down: Path


def discover(directory: Path | None = None) -> list[Migration]:
    directory = directory or Path(os.environ.get("MINIPACS_MIGRATIONS_DIR", DEFAULT_DIR))
    found: dict[int, dict[str, Path | str]] = {}
    for path in sorted(directory.iterdir()):
        m = _NAME.match(path.name)
        if m:
            entry = found.setdefault(int(m.group(1)), {"name": m.group(2)})
            entry[m.group(3)] = path
    return [Migration(v, str(e["name"]), Path(e["up"]), Path(e["down"]))
            for v, e in sorted(found.items())]


async def _applied(conn: asyncpg.Connection) -> set[int]:
    await conn.execute("CREATE TABLE IF NOT EXISTS schema_migrations ("
                       "version integer PRIMARY KEY, applied_at timestamptz DEFAULT now())")
    return {r["version"] for r in await conn.fetch("SELECT version FROM schema_migrations")}


async def upgrade(conn: asyncpg.Connection, target: int | None = None) -> list[int]:
    done = await _applied(conn)
    applied = []
    for mig in discover():
        if mig.version in done or (target is not None and mig.version > target):
            continue
        async with conn.transaction():
            await conn.execute(mig.up.read_text())
            await conn.execute("INSERT INTO schema_migrations (version) VALUES ($1)", mig.version)
        applied.append(mig.version)
    return applied


async def downgrade(conn: asyncpg.Connection, target: int = 0) -> list[int]:
    done = await _applied(conn)
    reverted = []
    for mig in reversed(discover()):
        if mig.version not in done or mig.version <= target:
            continue
        async with conn.transaction():
            await conn.execute(mig.down.read_text())
            await conn.execute("DELETE FROM schema_migrations WHERE version = $1", mig.version)
        reverted.append(mig.version)
    return reverted
