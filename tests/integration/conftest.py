"""Integration tests: a migrated PostgreSQL database of their own; a broker connection for
building a storage worker."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import asyncpg
import pytest
from aio_pika.abc import AbstractRobustConnection

from scripts.native import drop_database, ensure_database, ensure_postgres, ensure_rabbitmq
from services.migrate.core import upgrade
from shared import broker


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


@pytest.fixture()
async def connection() -> AsyncIterator[AbstractRobustConnection]:
    """A real broker connection (default vhost), for building a storage worker; the tests
    that use it publish nothing."""
    ensure_rabbitmq()
    conn = await broker.connect("amqp://guest:guest@127.0.0.1:5672/%2F", 30,
                                name="minipacs-test-integration")
    yield conn
    await conn.close()
