"""Integration tests: a migrated PostgreSQL database of their own."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import asyncpg

from scripts.native import drop_database, ensure_database, ensure_postgres
from services.migrate.core import upgrade


@asynccontextmanager
async def migrated_database(prefix: str) -> AsyncIterator[asyncpg.Connection]:
    """A new database with every migration applied, dropped afterwards."""
    ensure_postgres()
    name = f"{prefix}_{uuid.uuid4().hex[:8]}"
    conn = await asyncpg.connect(ensure_database(name))
    try:
        await upgrade(conn)
        yield conn
    finally:
        await conn.close()
        drop_database(name)
