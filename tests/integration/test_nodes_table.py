"""Remote nodes changed at run time (``shared.nodes``), against a real PostgreSQL: what the table
takes and refuses, and how soon the gateway's copy (``NodeBook``) follows, through a lost
connection too."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable

import asyncpg
import pytest

from shared import nodes
from shared.settings import OPERATIONS, Node
from tests.integration.conftest import migrated_database

ARCHIVE = Node("archive", "ARCHIVE", "127.0.0.1", 4242, OPERATIONS)
SETTINGS = {"archive": ARCHIVE}


@pytest.fixture()
async def conn() -> AsyncIterator[asyncpg.Connection]:
    async with migrated_database("minipacs_nodes") as c:
        await nodes.seed(c, SETTINGS)
        yield c


async def eventually(check: Callable[[], bool], what: str, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.05)


async def dsn_of(conn: asyncpg.Connection) -> str:
    database = await conn.fetchval("SELECT current_database()")
    return f"postgresql://minipacs@127.0.0.1:5432/{database}"


async def test_put_adds_then_changes_a_run_time_node(conn: asyncpg.Connection) -> None:
    mod = Node("ct", "CT1", "10.0.0.5", 104, frozenset({"echo", "store"}))
    assert await nodes.put(conn, mod) is True
    assert await nodes.by_aet(conn, "CT1") == mod
    moved = Node("ct", "CT2", "10.0.0.6", 11112, OPERATIONS)
    assert await nodes.put(conn, moved) is False
    assert await nodes.by_name(conn, "ct") == moved
    assert await nodes.by_aet(conn, "CT1") is None
    assert await nodes.sources(conn) == {"archive": "settings", "ct": "api"}


async def test_settings_nodes_are_not_changed_at_run_time(conn: asyncpg.Connection) -> None:
    with pytest.raises(nodes.NodeRefused, match="MINIPACS_NODES"):
        await nodes.put(conn, Node("archive", "EVIL", "10.9.9.9", 104, OPERATIONS))
    with pytest.raises(nodes.NodeRefused, match="MINIPACS_NODES"):
        await nodes.delete(conn, "archive")
    with pytest.raises(nodes.NodeRefused, match="no node"):
        await nodes.delete(conn, "nothing")
    assert await nodes.all_nodes(conn) == SETTINGS


async def test_a_gateway_start_keeps_the_run_time_nodes(conn: asyncpg.Connection) -> None:
    mod = Node("ct", "CT1", "10.0.0.5", 104, OPERATIONS)
    await nodes.put(conn, mod)
    await nodes.seed(conn, {})  # MINIPACS_NODES emptied, gateway restarted
    assert await nodes.all_nodes(conn) == {"ct": mod}
    await nodes.delete(conn, "ct")
    assert await nodes.all_nodes(conn) == {}


async def test_deleting_a_run_time_node_puts_back_the_settings_node_it_hid(
        conn: asyncpg.Connection) -> None:
    """A run-time node, then a settings node of the same name (the admin copied it into
    MINIPACS_NODES, restarted): the run-time one stays in front; deleted, the settings one
    applies at once, without another gateway start."""
    mod = Node("ct", "CT1", "10.0.0.5", 104, frozenset({"echo", "store"}))
    await nodes.put(conn, mod)
    filed = Node("ct", "CT1", "10.0.0.7", 11112, OPERATIONS)
    await nodes.seed(conn, {**SETTINGS, "ct": filed})  # gateway restarted
    assert await nodes.by_name(conn, "ct") == mod
    assert (await nodes.sources(conn))["ct"] == "api-over-settings"
    changed = Node("ct", "CT1", "10.0.0.6", 104, OPERATIONS)
    await nodes.put(conn, changed)  # still run time, still in front
    assert await nodes.by_name(conn, "ct") == changed
    assert await nodes.delete(conn, "ct") == filed
    assert await nodes.all_nodes(conn) == {**SETTINGS, "ct": filed}
    assert await nodes.sources(conn) == {"archive": "settings", "ct": "settings"}
    with pytest.raises(nodes.NodeRefused, match="MINIPACS_NODES"):
        await nodes.delete(conn, "ct")  # a settings node now
    # gone from the settings before the run-time node is deleted: nothing comes back
    await nodes.put(conn, Node("mr", "MR1", "10.0.0.8", 104, OPERATIONS))
    await nodes.seed(conn, {**SETTINGS, "mr": Node("mr", "MR9", "10.0.0.9", 104, OPERATIONS)})
    await nodes.seed(conn, SETTINGS)
    assert await nodes.delete(conn, "mr") is None
    assert await nodes.all_nodes(conn) == SETTINGS


async def test_put_refuses_a_name_the_command_line_would(conn: asyncpg.Connection) -> None:
    with pytest.raises(nodes.NodeRefused, match="node name"):
        await nodes.put(conn, Node("a b", "AB", "10.0.0.5", 104, OPERATIONS))


async def changes_reach(book: nodes.NodeBook, change: Callable[[], Awaitable[object]],
                        expected: dict[str, Node], what: str) -> None:
    await change()
    await eventually(lambda: dict(book()) == expected, what)


async def test_the_book_follows_every_change(conn: asyncpg.Connection) -> None:
    book = nodes.NodeBook({})
    await book.reload(conn)
    assert dict(book()) == SETTINGS
    # poll of an hour: only the notifications can make these changes arrive in time
    follow = asyncio.create_task(book.follow(await dsn_of(conn), poll=3600))
    try:
        mod = Node("ct", "CT1", "10.0.0.5", 104, OPERATIONS)
        await changes_reach(book, lambda: nodes.put(conn, mod), {**SETTINGS, "ct": mod},
                            "an added node")
        ro = Node("ct", "CT1", "10.0.0.5", 104, frozenset({"echo"}))
        await changes_reach(book, lambda: nodes.put(conn, ro), {**SETTINGS, "ct": ro},
                            "a changed node")
        await changes_reach(book, lambda: nodes.delete(conn, "ct"), SETTINGS, "a removal")
    finally:
        follow.cancel()


async def test_the_book_keeps_its_nodes_and_catches_up_after_losing_postgresql(
        conn: asyncpg.Connection) -> None:
    book = nodes.NodeBook({})
    await book.reload(conn)
    follow = asyncio.create_task(book.follow(await dsn_of(conn), poll=3600, retry=0.2))
    try:
        mod = Node("ct", "CT1", "10.0.0.5", 104, OPERATIONS)
        await changes_reach(book, lambda: nodes.put(conn, mod), {**SETTINGS, "ct": mod},
                            "an added node")
        listening = ("SELECT pid FROM pg_stat_activity WHERE datname = current_database() "
                     f"AND application_name = '{nodes.LISTENER}'")
        pids = await conn.fetch(listening)
        assert len(pids) == 1
        # the listening connection is cut (a PostgreSQL restart, a network blip); a change made
        # while it is down must still arrive once it is back
        # (waiting until the backend is gone, so no notification can carry this change)
        assert await conn.fetchval("SELECT pg_terminate_backend($1, 10000)", pids[0]["pid"])
        await nodes.delete(conn, "ct")
        await eventually(lambda: dict(book()) == SETTINGS, "the change made while cut off")
        deadline = time.monotonic() + 20
        while not await conn.fetch(listening):
            assert time.monotonic() < deadline, "the book did not listen again"
            await asyncio.sleep(0.05)
        await changes_reach(book, lambda: nodes.put(conn, mod), {**SETTINGS, "ct": mod},
                            "a change after the reconnection")
    finally:
        follow.cancel()
